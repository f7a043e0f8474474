//! Capture: the XDP probe and what reads it. Packets are parsed in the
//! kernel (`probe-ebpf`); here its events become flows (`flow`), named by
//! their hints (`hints`), joined to NAT (`nat`) and subscribers, and closed
//! into records for the store. Capture writes to the store and reads
//! nothing of the query side.
pub mod clock;
pub mod events;
pub mod flow;
pub mod handover;
pub mod hints;
pub mod loss;
pub mod nat;
pub mod privileges;
pub mod probe;
pub mod replay;
pub mod subscribers;
pub mod tuple;
