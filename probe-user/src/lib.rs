//! The ICR agent and command line: loads the XDP probe, assembles its flows
//! into Internet Connection Records, stores them, and answers the three
//! questions under the safeguards the law requires.
//!
//! One folder per concern; imports run one way:
//! `cli` → `serve` → `query` → `store`, `capture` → `store`, `query` →
//! `export` → `store`. `record` (the ICR itself), `config` and `remote`
//! (URLs and TLS of the servers icr reaches) are read by all. `agent`
//! wires capture, store and the doors together; `replay` wires a capture
//! file's replay to the same naming and store.
pub mod agent;
pub mod capture;
pub mod cli;
pub mod config;
pub mod export;
pub mod query;
pub mod record;
pub mod remote;
pub mod replay;
pub mod serve;
pub mod store;
