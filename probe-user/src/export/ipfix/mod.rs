//! IPFIX export (RFC 7011): the gateway's records in the flow collectors
//! providers already run (nfdump's `nfcapd`, pmacct's `nfacctd`). The
//! templates are in [`templates`], the framing in [`message`], the agent's
//! export in [`live`].
pub mod collector;
pub mod live;
pub mod message;
pub mod templates;

pub use collector::Collector;
pub use message::{Encoder, Message, PATH_MTU_MESSAGE};

/// RFC 5612's enterprise number for documentation: the default until the
/// provider configures its own.
pub const DOCUMENTATION_PEN: u32 = 32473;

#[cfg(test)]
mod tests;
