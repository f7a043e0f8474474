//! The lab: network namespaces with LAN clients, a NAT gateway running the
//! probe, and an "internet" with real servers (nginx over HTTPS, dnsmasq,
//! a TCP exchange server). Used by the integration tests and `cargo xtask demo`.
//!
//! Everything a lab creates is named after its prefix, and removed when the
//! `Lab` is dropped, also when a test fails; labs left by killed runs are
//! removed by the next one.
pub mod lab;
