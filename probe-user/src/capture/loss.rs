//! Loss accounting: turns the agent's cumulative loss counters into gap
//! entries ([`crate::store::gaps`]). Each tick the agent hands over the
//! totals; a kind whose total grew lost something since the tick before,
//! so a gap runs from that tick to this one, extending the kind's episode
//! when the tick before lost too.
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::store::gaps::{Gap, LossKind};

/// Cumulative losses, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Events the kernel could not output (its `EVENTS_LOST` counter).
    pub events_lost: u64,
    /// New flows the full kernel table could not take.
    pub flow_table_full: u64,
    pub conntrack_overruns: u64,
    /// The earliest the overruns counted since the last tick may have begun
    /// (they are noticed only when the follower reads again).
    pub conntrack_overrun_since: Option<DateTime<Utc>>,
    /// Ticks at which the agent's loop waited for the store writer.
    pub writer_waits: u64,
}

impl Totals {
    /// The losses the probe counts in the kernel; the agent's own are zero.
    pub fn of_kernel(counters: &crate::capture::probe::Counters) -> Self {
        Self {
            events_lost: counters.get(probe_common::counter::EVENTS_LOST),
            flow_table_full: counters.get(probe_common::counter::FLOW_TABLE_FULL),
            ..Self::default()
        }
    }

    fn of(&self, kind: LossKind) -> u64 {
        match kind {
            LossKind::EventBufferFull => self.events_lost,
            LossKind::FlowTableFull => self.flow_table_full,
            LossKind::ConntrackOverrun => self.conntrack_overruns,
            LossKind::WriterBackpressure => self.writer_waits,
            LossKind::NotCapturing | LossKind::StoreCorruption => 0,
        }
    }
}

pub struct LossTracker {
    last: Totals,
    seen_at: DateTime<Utc>,
    /// The latest episode of each kind.
    episodes: BTreeMap<LossKind, Gap>,
}

impl LossTracker {
    /// Counts from `baseline`, last seen at `since`.
    pub fn new(baseline: Totals, since: DateTime<Utc>) -> Self {
        Self { last: baseline, seen_at: since, episodes: BTreeMap::new() }
    }

    /// The totals at `now`: the gap entries that are new or grew.
    pub fn observe(&mut self, totals: Totals, now: DateTime<Utc>) -> Vec<Gap> {
        let mut changed = Vec::new();
        for kind in LossKind::ALL {
            // A total below the last one (a counter that restarted) is all new.
            let (total, last) = (totals.of(kind), self.last.of(kind));
            let grown = if total >= last { total - last } else { total };
            if grown == 0 {
                continue;
            }
            let noticed_late = if kind == LossKind::ConntrackOverrun { totals.conntrack_overrun_since } else { None };
            let from = noticed_late.map_or(self.seen_at, |since| since.min(self.seen_at));
            let gap = match self.episodes.get_mut(&kind) {
                Some(gap) if gap.to >= from => {
                    gap.to = now;
                    gap.count += grown;
                    gap.clone()
                }
                _ => {
                    let gap = Gap::new(kind, from, now, grown);
                    self.episodes.insert(kind, gap.clone());
                    gap
                }
            };
            changed.push(gap);
        }
        self.last = totals;
        self.seen_at = now;
        changed
    }

    pub fn totals(&self) -> Totals {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: u32) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!("2026-11-22T10:00:{second:02}Z")).unwrap().into()
    }

    #[test]
    fn consecutive_losses_are_one_episode_and_a_quiet_tick_ends_it() {
        let mut tracker = LossTracker::new(Totals { events_lost: 5, ..Totals::default() }, at(0));
        assert!(tracker.observe(Totals { events_lost: 5, ..Totals::default() }, at(1)).is_empty(), "no growth, no gap");
        let first = tracker.observe(Totals { events_lost: 9, writer_waits: 1, ..Totals::default() }, at(2));
        assert_eq!(
            first,
            vec![
                Gap::new(LossKind::EventBufferFull, at(1), at(2), 4),
                Gap::new(LossKind::WriterBackpressure, at(1), at(2), 1)
            ]
        );
        let grown = tracker.observe(Totals { events_lost: 20, writer_waits: 1, ..Totals::default() }, at(3));
        assert_eq!(grown, vec![Gap::new(LossKind::EventBufferFull, at(1), at(3), 15)], "the same episode, longer");
        assert!(tracker.observe(Totals { events_lost: 20, writer_waits: 1, ..Totals::default() }, at(4)).is_empty());
        let later = tracker.observe(
            Totals {
                events_lost: 21,
                writer_waits: 1,
                flow_table_full: 3,
                conntrack_overruns: 1,
                conntrack_overrun_since: None,
            },
            at(5),
        );
        assert_eq!(
            later,
            vec![
                Gap::new(LossKind::EventBufferFull, at(4), at(5), 1),
                Gap::new(LossKind::FlowTableFull, at(4), at(5), 3),
                Gap::new(LossKind::ConntrackOverrun, at(4), at(5), 1),
            ],
            "after a quiet tick, a new episode"
        );
    }

    #[test]
    fn an_overrun_noticed_late_is_dated_from_when_the_socket_was_last_drained() {
        let mut tracker = LossTracker::new(Totals::default(), at(0));
        assert!(tracker.observe(Totals::default(), at(5)).is_empty());
        let late = tracker.observe(
            Totals { conntrack_overruns: 1, conntrack_overrun_since: Some(at(2)), ..Totals::default() },
            at(6),
        );
        assert_eq!(late, vec![Gap::new(LossKind::ConntrackOverrun, at(2), at(6), 1)]);
    }

    #[test]
    fn a_restarted_counter_counts_from_zero() {
        let mut tracker = LossTracker::new(Totals { flow_table_full: 100, ..Totals::default() }, at(0));
        assert_eq!(
            tracker.observe(Totals { flow_table_full: 3, ..Totals::default() }, at(1)),
            vec![Gap::new(LossKind::FlowTableFull, at(0), at(1), 3)]
        );
    }
}
