//! The doors that serve others: the agent's local socket, the HTTP API,
//! the web console on the API's listener, and the metrics. Each turns what
//! it is given into a query request and hands it to the desk
//! (`crate::query`); none authorises or answers by itself. The command
//! line, the door an operator types at, is `crate::cli`.
pub mod bodies;
pub mod console;
pub mod control;
pub mod doorkeeper;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod refusals;
pub mod tokens;
