//! DNS answers that may name a device's later connections. Only an answer
//! to a question the device itself asked gets here (the assembler decides
//! that, see `capture::flow`): a neighbour on the LAN can send any frame,
//! and a name it could plant on another device's records would make every
//! answer built on them worthless.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use probe_common::Mac;

use super::dns;

/// A device as the LAN shows it: its MAC and the address it used. A
/// question sent with another device's address but the sender's own MAC
/// names nothing of that other device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceId {
    pub mac: Mac,
    pub ip: IpAddr,
}

/// The exchange a name came from, for the record it names: an analyst can
/// find that exchange and check it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NamedBy {
    pub name: String,
    /// Kernel time of the answer.
    pub answered_ns: u64,
    /// The resolver's address and port, as the answer came from it.
    pub resolver: SocketAddr,
}

/// Per-device answers, so that a connection without a name of its own is
/// named by what the device looked up for that address shortly before.
pub struct DnsCache {
    by_device: HashMap<DeviceId, HashMap<IpAddr, Cached>>,
    entries: usize,
    /// Answers held at most, all devices together (answers beyond are not
    /// kept, so their connections go unnamed by DNS).
    max_entries: usize,
}

impl Default for DnsCache {
    fn default() -> Self {
        Self::with_max_entries(DEFAULT_MAX_ENTRIES)
    }
}

#[derive(Clone, Debug)]
struct Cached {
    named_by: NamedBy,
    until_ns: u64,
}

const SECOND_NS: u64 = 1_000_000_000;
/// An answer names connections for its TTL, and never longer than this.
pub const MAX_HOLD_NS: u64 = 3_600 * SECOND_NS;
/// ...but at least this long: an application connects right after its
/// answer, and a TTL of 0 (dnsmasq's local names, some load balancers)
/// only means "do not cache", not "do not use".
pub const MIN_HOLD_NS: u64 = 10 * SECOND_NS;
/// Clocks of answer and connection may differ by this much (events of
/// different CPUs).
const SKEW_NS: u64 = SECOND_NS;
/// Addresses remembered per device, and in all: the cache's memory is
/// bounded whatever the LAN sends.
const MAX_PER_DEVICE: usize = 4096;
/// About 150 bytes each: some 10 MB at most, for a few hundred devices each
/// holding an hour of lookups.
pub const DEFAULT_MAX_ENTRIES: usize = 1 << 16;

impl DnsCache {
    pub fn with_max_entries(max_entries: usize) -> Self {
        Self { by_device: HashMap::new(), entries: 0, max_entries }
    }

    /// Remembers a response's addresses under the name `device` asked for.
    pub fn insert(&mut self, device: DeviceId, message: &dns::Message, answered_ns: u64, resolver: SocketAddr) {
        let max_entries = self.max_entries;
        let entries = self.by_device.entry(device).or_default();
        for answer in &message.answers {
            let Some(ip) = answer.ip else { continue };
            let hold = (u64::from(answer.ttl) * SECOND_NS).clamp(MIN_HOLD_NS, MAX_HOLD_NS);
            let known = entries.contains_key(&ip);
            if !known && (entries.len() >= MAX_PER_DEVICE || self.entries >= max_entries) {
                continue;
            }
            let named_by = NamedBy { name: message.qname.clone(), answered_ns, resolver };
            entries.insert(ip, Cached { named_by, until_ns: answered_ns.saturating_add(hold) });
            self.entries += usize::from(!known);
        }
    }

    /// What `device` resolved to `remote` shortly before `at_ns`, if that
    /// answer's TTL still covers it.
    pub fn lookup(&self, device: DeviceId, remote: IpAddr, at_ns: u64) -> Option<&NamedBy> {
        let entry = self.by_device.get(&device)?.get(&remote)?;
        (entry.named_by.answered_ns <= at_ns.saturating_add(SKEW_NS) && at_ns <= entry.until_ns)
            .then_some(&entry.named_by)
    }

    /// Forgets answers that expired before `before_ns`.
    pub fn expire(&mut self, before_ns: u64) {
        let mut kept = 0;
        self.by_device.retain(|_, entries| {
            entries.retain(|_, entry| entry.until_ns >= before_ns);
            kept += entries.len();
            !entries.is_empty()
        });
        self.entries = kept;
    }

    /// Every answer held: the device, the address it resolved, the
    /// answer, until when it names (for `capture::handover`).
    pub fn entries(&self) -> impl Iterator<Item = (DeviceId, IpAddr, &NamedBy, u64)> {
        self.by_device.iter().flat_map(|(device, entries)| {
            entries.iter().map(|(remote, cached)| (*device, *remote, &cached.named_by, cached.until_ns))
        })
    }

    /// Holds an answer an earlier agent held, within the same bounds as
    /// answers seen.
    pub fn restore(&mut self, device: DeviceId, remote: IpAddr, named_by: NamedBy, until_ns: u64) {
        let until_ns = until_ns.min(named_by.answered_ns.saturating_add(MAX_HOLD_NS));
        let entries = self.by_device.entry(device).or_default();
        let known = entries.contains_key(&remote);
        if !known && (entries.len() >= MAX_PER_DEVICE || self.entries >= self.max_entries) {
            return;
        }
        entries.insert(remote, Cached { named_by, until_ns });
        self.entries += usize::from(!known);
    }

    /// Answers held, all devices together.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }
}

#[cfg(test)]
mod tests {
    use simple_dns::TYPE;

    use super::*;
    use crate::capture::hints::dns::tests::{a_record, response};

    const SEC: u64 = SECOND_NS;

    fn answer(ttl: u32) -> dns::Message {
        let mut record = a_record("www.example.test", [198, 51, 100, 10]);
        record.ttl = ttl;
        dns::message(&response("www.example.test", TYPE::A, vec![record])).unwrap()
    }

    fn device(mac: u8, ip: &str) -> DeviceId {
        DeviceId { mac: Mac([2, 0, 0, 0, 0, mac]), ip: ip.parse().unwrap() }
    }

    #[test]
    fn an_answer_names_its_device_only_for_its_ttl_and_at_most_an_hour() {
        let resolver: SocketAddr = "192.0.2.53:53".parse().unwrap();
        let web: IpAddr = "198.51.100.10".parse().unwrap();
        let b = device(0xb, "192.168.50.12");
        let mut cache = DnsCache::default();
        cache.insert(b, &answer(120), 10 * SEC, resolver);
        let named = cache.lookup(b, web, 12 * SEC).expect("within its TTL");
        assert_eq!((named.name.as_str(), named.answered_ns, named.resolver), ("www.example.test", 10 * SEC, resolver));
        assert!(cache.lookup(b, web, 131 * SEC).is_none(), "past its TTL");
        assert!(cache.lookup(b, web, 5 * SEC).is_none(), "not before the answer");
        assert!(cache.lookup(device(0xa, "192.168.50.12"), web, 12 * SEC).is_none(), "same address, another MAC");
        assert!(cache.lookup(device(0xb, "192.168.50.13"), web, 12 * SEC).is_none(), "same MAC, another address");

        // A TTL of 0 is used at once, not later.
        cache.insert(b, &answer(0), 500 * SEC, resolver);
        assert!(cache.lookup(b, web, 500 * SEC + 1).is_some(), "connected right after its answer");
        assert!(cache.lookup(b, web, 511 * SEC).is_none());
        // A day's TTL is held for an hour.
        cache.insert(b, &answer(86_400), 1_000 * SEC, resolver);
        assert!(cache.lookup(b, web, (1_000 + 3_599) * SEC).is_some());
        assert!(cache.lookup(b, web, (1_000 + 3_601) * SEC).is_none(), "an hour at most");
        assert_eq!(cache.len(), 1);
        cache.expire(10_000 * SEC);
        assert!(cache.is_empty() && cache.by_device.is_empty());
    }

    #[test]
    fn the_cache_holds_no_more_answers_than_configured() {
        let resolver: SocketAddr = "192.0.2.53:53".parse().unwrap();
        let mut cache = DnsCache::with_max_entries(2);
        for host in 1..=5u8 {
            cache.insert(device(host, &format!("192.168.50.{host}")), &answer(600), SEC, resolver);
        }
        assert_eq!(cache.len(), 2);
        let web: IpAddr = "198.51.100.10".parse().unwrap();
        assert!(cache.lookup(device(1, "192.168.50.1"), web, 2 * SEC).is_some(), "the first answers are kept");
        assert!(cache.lookup(device(3, "192.168.50.3"), web, 2 * SEC).is_none());
    }
}
