//! NAT mappings: which public address and port the gateway gave a device's
//! connection. Fed by conntrack events; read when a flow's record is made.
use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::capture::tuple::Tuple;

pub mod conntrack;

/// One connection as conntrack saw it: the original direction (device →
/// remote, before NAT) and the reply direction (remote → public address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub original: Tuple,
    pub reply: Tuple,
}

impl Mapping {
    /// The address and port the internet saw: where replies are sent.
    pub fn public(&self) -> (std::net::IpAddr, u16) {
        (self.reply.dst, self.reply.dst_port)
    }
}

/// What the conntrack follower reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatEvent {
    New(Mapping),
    Destroy(Mapping),
    /// Events were lost (netlink buffer overrun) at some time after `since`,
    /// when the follower last found its socket drained.
    Overrun {
        since: DateTime<Utc>,
    },
}

/// Mappings by original and by reply direction. Destroyed mappings are kept
/// until `forget` so that flows closing after conntrack forgot them still join.
#[derive(Default)]
pub struct NatTable {
    by_original: HashMap<Tuple, Mapping>,
    by_reply: HashMap<Tuple, Tuple>,
    /// The mapping an original tuple had before its current one, where the
    /// two differ: a device reused a port within seconds, and the NAT gave
    /// the new connection another public port than the ended one's.
    preceding: HashMap<Tuple, Mapping>,
    destroyed: Vec<(u64, Tuple)>,
    overruns: u64,
    /// The earliest an overrun not yet reported may have begun.
    overrun_since: Option<DateTime<Utc>>,
}

impl NatTable {
    pub fn apply(&mut self, event: NatEvent, now_ns: u64) {
        match event {
            NatEvent::New(mapping) => {
                self.by_reply.insert(mapping.reply, mapping.original);
                match self.by_original.insert(mapping.original, mapping) {
                    Some(before) if before.reply != mapping.reply => {
                        self.preceding.insert(mapping.original, before);
                    }
                    _ => {
                        self.preceding.remove(&mapping.original);
                    }
                }
            }
            NatEvent::Destroy(mapping) => {
                // Make sure it is known (a NEW may have been missed), but the
                // public port may already have a new holder: keep it.
                self.by_reply.entry(mapping.reply).or_insert(mapping.original);
                self.by_original.insert(mapping.original, mapping);
                self.destroyed.push((now_ns, mapping.original));
            }
            NatEvent::Overrun { since } => {
                self.overruns += 1;
                self.overrun_since = Some(self.overrun_since.map_or(since, |earlier| earlier.min(since)));
            }
        }
    }

    /// Drops mappings destroyed before `before_ns`.
    pub fn forget(&mut self, before_ns: u64) {
        let keep_from = self.destroyed.partition_point(|(at, _)| *at < before_ns);
        for (_, original) in self.destroyed.drain(..keep_from) {
            if let Some(mapping) = self.by_original.remove(&original)
                && self.by_reply.get(&mapping.reply) == Some(&original)
            {
                self.by_reply.remove(&mapping.reply);
            }
            self.preceding.remove(&original);
        }
    }

    /// The mapping of a connection by its original (device-side) direction.
    pub fn by_original(&self, original: &Tuple) -> Option<&Mapping> {
        self.by_original.get(original)
    }

    /// The mapping of the connection that used `original` before the
    /// current one, if the NAT gave it another public address or port.
    pub fn preceding(&self, original: &Tuple) -> Option<&Mapping> {
        self.preceding.get(original)
    }

    /// The mapping whose reply direction (remote → public) is `reply`.
    pub fn by_reply(&self, reply: &Tuple) -> Option<&Mapping> {
        self.by_reply.get(reply).and_then(|original| self.by_original.get(original))
    }

    /// Conntrack event overruns seen (each followed by a resync).
    pub fn overruns(&self) -> u64 {
        self.overruns
    }

    /// When the overruns since the last call may have begun.
    pub fn take_overrun_since(&mut self) -> Option<DateTime<Utc>> {
        self.overrun_since.take()
    }

    pub fn len(&self) -> usize {
        self.by_original.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_original.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::tuple::ipv4;

    fn mapping() -> Mapping {
        let original = Tuple {
            src: ipv4(192, 168, 1, 23),
            src_port: 51544,
            dst: ipv4(203, 0, 113, 10),
            dst_port: 443,
            proto: probe_common::Proto::Tcp,
        };
        let reply = Tuple {
            src: ipv4(203, 0, 113, 10),
            src_port: 443,
            dst: ipv4(198, 51, 100, 1),
            dst_port: 10007,
            proto: probe_common::Proto::Tcp,
        };
        Mapping { original, reply }
    }

    #[test]
    fn joins_both_ways_and_forgets_after_destroy() {
        let mut table = NatTable::default();
        let m = mapping();
        table.apply(NatEvent::New(m), 1);
        assert_eq!(table.by_original(&m.original), Some(&m));
        assert_eq!(table.by_reply(&m.reply), Some(&m));
        assert_eq!(m.public(), (ipv4(198, 51, 100, 1), 10007));
        table.apply(NatEvent::Destroy(m), 10);
        table.forget(5);
        assert_eq!(table.by_reply(&m.reply), Some(&m), "kept until its grace ends");
        table.forget(11);
        assert!(table.is_empty());
        assert_eq!(table.by_reply(&m.reply), None);
    }

    #[test]
    fn a_device_port_reused_with_another_public_port_keeps_the_one_before() {
        let mut table = NatTable::default();
        let first = mapping();
        let again = Mapping { reply: Tuple { dst_port: 10099, ..first.reply }, ..first };
        table.apply(NatEvent::New(first), 1);
        assert_eq!(table.preceding(&first.original), None);
        table.apply(NatEvent::Destroy(first), 2);
        table.apply(NatEvent::New(again), 3);
        assert_eq!(table.by_original(&first.original), Some(&again));
        assert_eq!(table.preceding(&first.original), Some(&first));
        // The same public port again: the one before is the current one.
        table.apply(NatEvent::New(again), 4);
        assert_eq!(table.preceding(&first.original), None);
    }

    #[test]
    fn a_public_port_reused_by_another_device_joins_the_new_holder() {
        let mut table = NatTable::default();
        let old = mapping();
        let new = Mapping { original: Tuple { src: ipv4(192, 168, 1, 40), ..old.original }, reply: old.reply };
        table.apply(NatEvent::New(old), 1);
        table.apply(NatEvent::New(new), 2);
        // The old holder's destroy arriving late does not take the port back.
        table.apply(NatEvent::Destroy(old), 3);
        assert_eq!(table.by_reply(&new.reply), Some(&new));
        // Forgetting the old holder leaves the new one joined.
        table.forget(4);
        assert_eq!(table.by_reply(&new.reply), Some(&new));
        assert_eq!(table.by_original(&old.original), None);
        assert_eq!(table.len(), 1);
    }
}
