//! The ICR agent and command line: loads the XDP probe, assembles its flows
//! into Internet Connection Records, stores them, and answers the three
//! questions under the safeguards the law requires.
pub mod clock;
pub mod events;
pub mod flow;
pub mod icr;
pub mod nat;
pub mod probe;
pub mod tuple;
