//! The doors: the command line, the agent's local socket, the HTTP API, the
//! web console on the API's listener, and the metrics. Each turns what it is given into a query request and hands
//! it to the desk (`crate::query`); none authorises or answers by itself.
pub mod bodies;
pub mod cli;
pub mod client;
pub mod commands;
pub mod console;
pub mod control;
pub mod doorkeeper;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod refusals;
pub mod route;
pub mod tokens;
