//! What an agent stopping while its probe stays pinned hands to the next
//! one (an upgrade, a restart). The probe keeps counting; the stopping
//! agent records each open flow so far ("shutdown") and leaves here how far
//! it reported each one and the names it knew, so that the next agent
//! records what is left of each connection: named, and no byte twice.
//!
//! The agent leaves it in the store's directory once its last records are
//! durable, and the next agent takes it (read once, removed) when it adopts
//! the probe. A flow is resumed only if its kernel entry is still the one
//! handed over (the same key and first packet); anything else is adopted as
//! after a crash: whole, and marked incomplete.
use std::net::IpAddr;

use anyhow::{Context as _, Result};
use probe_common::FlowKey;
use serde::{Deserialize, Serialize};

use crate::{capture::hints::answers::NamedBy, record::Service};

/// Bumped when the meaning of a field changes: a handover of another
/// version is not resumed from.
const VERSION: u32 = 1;

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Handover {
    pub version: u32,
    /// The probe instance whose kernel flows these are.
    pub probe: u32,
    pub flows: Vec<HandedFlow>,
    /// The DNS answers that may still name devices' later connections.
    pub answers: Vec<HandedAnswer>,
}

/// One open kernel flow, as far as the stopping agent reported it.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct HandedFlow {
    pub key: HandedKey,
    /// Its first packet's kernel time: the entry resumed must be this one.
    pub first_ns: u64,
    pub reported_packets: [u64; 2],
    pub reported_bytes: [u64; 2],
    /// Where its next record starts (the "shutdown" record's end).
    pub slice_start_ns: u64,
    pub incomplete: bool,
    /// The LAN flow a WAN flow belongs to.
    pub joined_to: Option<HandedKey>,
    pub service: Option<Service>,
    pub named_at_start: Option<NamedBy>,
}

/// A DNS answer a device asked for, held until `until_ns`.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct HandedAnswer {
    pub mac: [u8; 6],
    pub device: IpAddr,
    pub remote: IpAddr,
    pub named_by: NamedBy,
    pub until_ns: u64,
}

/// A [`FlowKey`] in a form serde writes (no padding, no 40-byte array).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedKey {
    pub addr_lo: [u8; 16],
    pub addr_hi: [u8; 16],
    pub port_lo: u16,
    pub port_hi: u16,
    pub proto: u8,
    pub generation: u8,
}

impl From<FlowKey> for HandedKey {
    fn from(key: FlowKey) -> Self {
        let FlowKey { addr_lo, addr_hi, port_lo, port_hi, proto, generation, _pad } = key;
        Self { addr_lo, addr_hi, port_lo, port_hi, proto, generation }
    }
}

impl From<HandedKey> for FlowKey {
    fn from(key: HandedKey) -> Self {
        let HandedKey { addr_lo, addr_hi, port_lo, port_hi, proto, generation } = key;
        FlowKey { addr_lo, addr_hi, port_lo, port_hi, proto, generation, _pad: [0; 2] }
    }
}

impl Handover {
    pub fn new(probe: u32, flows: Vec<HandedFlow>, answers: Vec<HandedAnswer>) -> Self {
        Self { version: VERSION, probe, flows, answers }
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).context("encoding the handover")
    }

    /// What the last agent left for the probe `probe`; `None` (and why)
    /// when it is not this probe's or not of this version.
    pub fn decode(bytes: &[u8], probe: u32) -> Result<Handover, Refused> {
        let handover: Handover = serde_json::from_slice(bytes).map_err(|e| Refused::Damaged(e.to_string()))?;
        if handover.version != VERSION {
            return Err(Refused::Version(handover.version));
        }
        if handover.probe != probe {
            return Err(Refused::OtherProbe(handover.probe));
        }
        Ok(handover)
    }
}

/// Why a handover is not resumed from.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("it is damaged ({0})")]
    Damaged(String),
    #[error("it is of version {0}, this agent reads version {VERSION}")]
    Version(u32),
    #[error("it is of probe instance {0}, not of the probe adopted")]
    OtherProbe(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handover_reads_back_only_for_its_own_probe_and_version() {
        let key = FlowKey::of([1; 16], 40_000, [2; 16], 443, 6).0;
        let flow = HandedFlow {
            key: key.into(),
            first_ns: 7,
            reported_packets: [3, 4],
            reported_bytes: [300, 4000],
            slice_start_ns: 9,
            incomplete: false,
            joined_to: Some(FlowKey { generation: FlowKey::RETIRED, ..key }.into()),
            service: None,
            named_at_start: Some(NamedBy {
                name: "www.example.test".into(),
                answered_ns: 5,
                resolver: "192.0.2.53:53".parse().unwrap(),
            }),
        };
        let handover = Handover::new(42, vec![flow], Vec::new());
        let bytes = handover.encode().unwrap();
        assert_eq!(Handover::decode(&bytes, 42).unwrap(), handover);
        assert_eq!(FlowKey::from(handover.flows[0].key), key);
        assert!(matches!(Handover::decode(&bytes, 43), Err(Refused::OtherProbe(42))));
        assert!(matches!(Handover::decode(&bytes[..bytes.len() / 2], 42), Err(Refused::Damaged(_))));
        let other = Handover { version: VERSION + 1, ..Handover::new(42, Vec::new(), Vec::new()) };
        assert!(matches!(Handover::decode(&other.encode().unwrap(), 42), Err(Refused::Version(_))));
    }
}
