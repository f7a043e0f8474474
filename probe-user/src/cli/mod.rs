//! The command line, `icr` (`docs/cli.md` is the contract): its flags
//! (`args`), what they become (`commands`: a request for the desk, or an
//! operator's command), where a request is answered (`route`: a store, its
//! agent's socket, the cluster, or a remote agent's API through `client`).
pub mod args;
pub mod client;
pub mod commands;
pub mod route;
