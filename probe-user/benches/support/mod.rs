//! Helpers of the live part of `benches/probe.rs`.
pub mod softflowd;
pub mod traffic;
