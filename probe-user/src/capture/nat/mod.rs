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
    /// The table dumped after an overrun has been sent in full, as `New`s
    /// since the `Overrun`: a mapping it did not confirm was destroyed
    /// meanwhile, its destroy event lost with the overrun.
    Resynced,
}

/// A mapping as the table holds it.
struct Held {
    mapping: Mapping,
    /// When an event last told of it.
    confirmed_ns: u64,
    /// When conntrack destroyed it (then it is kept for a grace period).
    destroyed_ns: Option<u64>,
}

/// Destroyed mappings kept for late flows, at most, unless configured
/// (`[probe] nat_destroyed_kept`): about 300 bytes each, and as many as 130
/// connections a second make in a grace period of 6 minutes.
pub const DEFAULT_MAX_DESTROYED: usize = 1 << 16;

/// Mappings by original and by reply direction. Destroyed mappings are kept
/// until `forget` so that flows closing after conntrack forgot them still
/// join. Live mappings are at most the kernel's conntrack table; destroyed
/// ones, those of the grace period and at most `max_destroyed` (a flood of
/// short connections makes many). A destroy event lost in an overrun is
/// made good by the resync, so no mapping is held for ever.
pub struct NatTable {
    by_original: HashMap<Tuple, Held>,
    by_reply: HashMap<Tuple, Tuple>,
    /// The mapping an original tuple had before its current one, where the
    /// two differ: a device reused a port within seconds, and the NAT gave
    /// the new connection another public port than the ended one's.
    preceding: HashMap<Tuple, Mapping>,
    destroyed: Vec<(u64, Tuple)>,
    overruns: u64,
    /// The earliest an overrun not yet reported may have begun.
    overrun_since: Option<DateTime<Utc>>,
    /// When the last overrun was applied: mappings not confirmed since are
    /// gone once its resync is complete.
    resync_from_ns: Option<u64>,
    max_destroyed: usize,
    /// Destroyed mappings dropped before their grace ended, to stay within
    /// `max_destroyed`.
    dropped_early: u64,
}

impl Default for NatTable {
    fn default() -> Self {
        Self::with_max_destroyed(DEFAULT_MAX_DESTROYED)
    }
}

impl NatTable {
    /// A table that keeps at most `max_destroyed` destroyed mappings (the
    /// oldest go first, before their grace ends).
    pub fn with_max_destroyed(max_destroyed: usize) -> Self {
        Self {
            by_original: HashMap::new(),
            by_reply: HashMap::new(),
            preceding: HashMap::new(),
            destroyed: Vec::new(),
            overruns: 0,
            overrun_since: None,
            resync_from_ns: None,
            max_destroyed,
            dropped_early: 0,
        }
    }

    pub fn apply(&mut self, event: NatEvent, now_ns: u64) {
        match event {
            NatEvent::New(mapping) => {
                self.by_reply.insert(mapping.reply, mapping.original);
                let held = Held { mapping, confirmed_ns: now_ns, destroyed_ns: None };
                match self.by_original.insert(mapping.original, held) {
                    Some(before) if before.mapping.reply != mapping.reply => {
                        self.preceding.insert(mapping.original, before.mapping);
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
                let held = Held { mapping, confirmed_ns: now_ns, destroyed_ns: Some(now_ns) };
                self.by_original.insert(mapping.original, held);
                self.destroyed.push((now_ns, mapping.original));
            }
            NatEvent::Overrun { since } => {
                self.overruns += 1;
                self.overrun_since = Some(self.overrun_since.map_or(since, |earlier| earlier.min(since)));
                self.resync_from_ns = Some(now_ns);
            }
            NatEvent::Resynced => {
                let Some(from_ns) = self.resync_from_ns.take() else { return };
                for (original, held) in &mut self.by_original {
                    if held.destroyed_ns.is_none() && held.confirmed_ns < from_ns {
                        held.destroyed_ns = Some(now_ns);
                        self.destroyed.push((now_ns, *original));
                    }
                }
            }
        }
        if self.destroyed.len() > self.max_destroyed {
            let over = self.destroyed.len() - self.max_destroyed;
            self.dropped_early += over as u64;
            self.drop_destroyed(over);
        }
    }

    /// Drops mappings destroyed before `before_ns`.
    pub fn forget(&mut self, before_ns: u64) {
        let until = self.destroyed.partition_point(|(at, _)| *at < before_ns);
        self.drop_destroyed(until);
    }

    /// Drops the `count` oldest destroyed mappings.
    fn drop_destroyed(&mut self, count: usize) {
        for (at, original) in self.destroyed.drain(..count) {
            // The same tuple made anew (or destroyed again) since is not this
            // entry's to drop.
            if self.by_original.get(&original).is_some_and(|held| held.destroyed_ns == Some(at))
                && let Some(held) = self.by_original.remove(&original)
                && self.by_reply.get(&held.mapping.reply) == Some(&original)
            {
                self.by_reply.remove(&held.mapping.reply);
            }
            self.preceding.remove(&original);
        }
    }

    /// The mapping of a connection by its original (device-side) direction.
    pub fn by_original(&self, original: &Tuple) -> Option<&Mapping> {
        self.by_original.get(original).map(|held| &held.mapping)
    }

    /// The mapping of the connection that used `original` before the
    /// current one, if the NAT gave it another public address or port.
    pub fn preceding(&self, original: &Tuple) -> Option<&Mapping> {
        self.preceding.get(original)
    }

    /// The mapping whose reply direction (remote → public) is `reply`.
    pub fn by_reply(&self, reply: &Tuple) -> Option<&Mapping> {
        self.by_reply.get(reply).and_then(|original| self.by_original(original))
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

    /// Mappings conntrack destroyed that are kept for late flows.
    pub fn destroyed(&self) -> usize {
        self.destroyed.len()
    }

    /// Destroyed mappings dropped before their grace ended (the table held
    /// its most).
    pub fn dropped_early(&self) -> u64 {
        self.dropped_early
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

    #[test]
    fn a_destroy_lost_in_an_overrun_is_made_good_by_the_resync() {
        let mut table = NatTable::default();
        let lost = mapping();
        let live = Mapping {
            original: Tuple { src_port: 51545, ..lost.original },
            reply: Tuple { dst_port: 10008, ..lost.reply },
        };
        table.apply(NatEvent::New(lost), 1);
        table.apply(NatEvent::New(live), 2);
        // `lost` ends, its destroy event lost in an overrun; the dump that
        // follows finds `live` only.
        table.apply(NatEvent::Overrun { since: Utc::now() }, 10);
        table.apply(NatEvent::New(live), 11);
        table.apply(NatEvent::Resynced, 12);
        table.forget(12);
        assert_eq!(table.by_reply(&lost.reply), Some(&lost), "kept for its grace, like any destroyed mapping");
        table.forget(13);
        assert_eq!(table.by_original(&lost.original), None, "not held for ever");
        assert_eq!(table.by_reply(&lost.reply), None);
        assert_eq!(table.by_reply(&live.reply), Some(&live));
        assert_eq!((table.len(), table.destroyed()), (1, 0));
    }

    #[test]
    fn destroyed_mappings_beyond_the_most_kept_go_oldest_first() {
        let mut table = NatTable::with_max_destroyed(2);
        let port = |n: u16| {
            let m = mapping();
            Mapping {
                original: Tuple { src_port: 40000 + n, ..m.original },
                reply: Tuple { dst_port: 20000 + n, ..m.reply },
            }
        };
        let live = port(5000);
        table.apply(NatEvent::New(live), 1);
        // A flood of short connections: each made and destroyed at once.
        for n in 0..1000 {
            table.apply(NatEvent::New(port(n)), 10 + u64::from(n));
            table.apply(NatEvent::Destroy(port(n)), 10 + u64::from(n));
        }
        assert_eq!((table.len(), table.destroyed()), (3, 2), "the live one and the two newest destroyed");
        assert_eq!(table.by_reply(&port(999).reply), Some(&port(999)));
        assert_eq!(table.by_reply(&port(998).reply), Some(&port(998)));
        assert_eq!(table.by_reply(&port(997).reply), None);
        assert_eq!(table.by_reply(&live.reply), Some(&live), "live mappings are never dropped");
        assert_eq!(table.dropped_early(), 998);
    }

    #[test]
    fn a_tuple_made_anew_outlives_its_predecessors_grace() {
        let mut table = NatTable::default();
        let m = mapping();
        table.apply(NatEvent::New(m), 1);
        table.apply(NatEvent::Destroy(m), 2);
        // The same ports again, soon after (a client reusing its port).
        table.apply(NatEvent::New(m), 3);
        table.forget(10);
        assert_eq!(table.by_reply(&m.reply), Some(&m), "the live connection keeps its mapping");
    }
}
