//! The ICR agent and command line: loads the XDP probe, assembles its flows
//! into Internet Connection Records, stores them, and answers the three
//! questions under the safeguards the law requires.
pub mod agent;
pub mod audit;
pub mod cli;
pub mod client;
pub mod clock;
pub mod commands;
pub mod config;
pub mod control;
pub mod events;
pub mod export;
pub mod flow;
pub mod hints;
pub mod http;
pub mod icr;
pub mod loss;
pub mod metrics;
pub mod nat;
pub mod probe;
pub mod query;
pub mod replay;
pub mod store;
pub mod subscribers;
pub mod synthetic;
pub mod tuple;
