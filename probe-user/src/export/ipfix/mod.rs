//! IPFIX export (RFC 7011): the gateway's records in the flow collectors
//! providers already run (nfdump's `nfcapd`, pmacct's `nfacctd`). The
//! templates are in [`templates`], the framing in [`message`], the agent's
//! export in [`live`].
pub mod live;
pub mod message;
pub mod templates;

pub use crate::{config::DOCUMENTATION_PEN, remote::Collector};
pub use message::{Encoder, Message, PATH_MTU_MESSAGE};

#[cfg(test)]
mod tests;
