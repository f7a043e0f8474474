//! Gap entries: when the probe or the agent lost something, what and how
//! much. They are kept beside the records (tree `gaps`, keyed by start time)
//! and reported with every answer whose window they touch, so that "no
//! record" inside a gap is never read as "no connection".
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::record::micros;

/// What was lost, and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// The kernel could not hand events (flow starts and ends, hints) to the
    /// agent: a CPU's event buffer was full. Flows still count in the kernel
    /// table; their records may lack a name or be marked incomplete.
    EventBufferFull = 1,
    /// The kernel flow table was full: new flows were not counted at all.
    FlowTableFull = 2,
    /// Conntrack events overran the agent's socket (ENOBUFS): NAT mappings
    /// made meanwhile may be missing from records (public address, port).
    ConntrackOverrun = 3,
    /// The store writer fell behind and the agent waited for it; the kernel
    /// buffers filled meanwhile.
    WriterBackpressure = 4,
    /// Nothing was capturing: the agent was stopped or had crashed, and no
    /// pinned probe counted for it.
    NotCapturing = 5,
    /// A day's open-block log was damaged on disk: records acknowledged that
    /// day may be missing. The damaged bytes are kept aside, as they were,
    /// under `open-blocks/quarantine/`.
    StoreCorruption = 6,
}

impl LossKind {
    pub const ALL: [LossKind; 6] = [
        Self::EventBufferFull,
        Self::FlowTableFull,
        Self::ConntrackOverrun,
        Self::WriterBackpressure,
        Self::NotCapturing,
        Self::StoreCorruption,
    ];

    /// Where the loss happened, for people.
    pub fn place(self) -> &'static str {
        match self {
            Self::EventBufferFull => "kernel event buffers (probe to agent)",
            Self::FlowTableFull => "kernel flow table",
            Self::ConntrackOverrun => "conntrack event socket",
            Self::WriterBackpressure => "store writer queue",
            Self::NotCapturing => "agent",
            Self::StoreCorruption => "store: a day's open-block log",
        }
    }

    /// What the count counts.
    pub fn unit(self) -> &'static str {
        match self {
            Self::EventBufferFull => "events lost",
            Self::FlowTableFull => "flows not counted",
            Self::ConntrackOverrun => "overruns",
            Self::WriterBackpressure => "waits",
            Self::NotCapturing => "unknown losses",
            Self::StoreCorruption => "damaged bytes kept aside",
        }
    }
}

/// One episode of loss of one kind: consecutive observations with loss
/// extend it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// The loss happened after this time...
    #[serde(with = "micros")]
    pub from: DateTime<Utc>,
    /// ...and before this one.
    #[serde(with = "micros")]
    pub to: DateTime<Utc>,
    pub kind: LossKind,
    /// How many were lost (events, flows, overruns, waits; 0 when unknown).
    pub count: u64,
    #[serde(rename = "where")]
    pub place: String,
}

impl Gap {
    pub fn new(kind: LossKind, from: DateTime<Utc>, to: DateTime<Utc>, count: u64) -> Self {
        Self { from, to, kind, count, place: kind.place().to_owned() }
    }

    /// Its key: start time (µs since the epoch, big-endian, so keys sort by
    /// time) and kind; rewriting an extended episode replaces it.
    pub(super) fn key(&self) -> [u8; 9] {
        let mut key = [0u8; 9];
        key[..8].copy_from_slice(&(self.from.timestamp_micros().max(0) as u64).to_be_bytes());
        key[8] = self.kind as u8;
        key
    }

    pub(super) fn overlaps(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> bool {
        self.from <= to && self.to >= from
    }

    /// One line for an operator or an investigator.
    pub fn describe(&self) -> String {
        let count = if self.kind == LossKind::NotCapturing {
            String::new()
        } else {
            format!(": {} {}", self.count, self.kind.unit())
        };
        format!(
            "capture gap from {} to {} in the {}{count}; a missing record in this interval is not proof of no connection",
            crate::record::format_time(&self.from),
            crate::record::format_time(&self.to),
            self.place,
        )
    }
}

/// The last loss totals the agent saw of a probe instance, and when: the
/// next agent that adopts the same pinned probe counts from here, so losses
/// while no agent ran are reported, dated from the last one's last sight.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    /// Kernel id of the probe's counter map: the same while it stays pinned.
    pub probe: u32,
    #[serde(with = "micros")]
    pub at: DateTime<Utc>,
    pub events_lost: u64,
    pub flow_table_full: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().into()
    }

    #[test]
    fn gaps_are_found_by_overlap_grow_in_place_survive_reopening_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let old = Gap::new(LossKind::NotCapturing, at("2025-10-01T23:00:00Z"), at("2025-10-02T01:00:00Z"), 0);
        let mut episode =
            Gap::new(LossKind::EventBufferFull, at("2026-11-22T10:00:00Z"), at("2026-11-22T10:00:01Z"), 40);
        let table = Gap::new(LossKind::FlowTableFull, at("2026-11-22T10:00:00Z"), at("2026-11-22T10:00:01Z"), 7);
        let watermark = Watermark { probe: 9, at: at("2026-11-22T10:00:01Z"), events_lost: 40, flow_table_full: 7 };
        {
            let store = crate::store::test_records::reopen(dir.path()).unwrap();
            assert_eq!(store.watermark().unwrap(), None);
            store.record_gaps(&[old.clone(), episode.clone(), table.clone()], Some(&watermark)).unwrap();
            // The next observation still loses: the same episode, longer.
            episode.to = at("2026-11-22T10:00:02Z");
            episode.count = 90;
            store.record_gaps(std::slice::from_ref(&episode), None).unwrap();
        }
        let store = crate::store::test_records::reopen(dir.path()).unwrap();
        assert_eq!(store.watermark().unwrap(), Some(watermark));
        let window = |from, to| store.gaps(at(from), at(to)).unwrap();
        assert_eq!(window("2026-11-22T10:00:02Z", "2026-11-22T11:00:00Z"), vec![episode.clone()]);
        assert_eq!(window("2026-11-22T09:00:00Z", "2026-11-22T10:00:00Z"), vec![episode.clone(), table.clone()]);
        assert!(window("2026-11-22T10:00:03Z", "2026-11-23T00:00:00Z").is_empty());
        assert!(window("2026-11-22T09:00:00Z", "2026-11-22T09:59:59Z").is_empty());
        assert_eq!(
            window("2025-10-02T00:30:00Z", "2025-10-02T00:31:00Z"),
            vec![old.clone()],
            "a gap spanning midnight"
        );
        // A year later, the old gap goes with its days; the recent ones stay.
        store.sweep(365, at("2026-11-22T12:00:00Z")).unwrap();
        assert_eq!(window("2025-01-01T00:00:00Z", "2026-12-31T00:00:00Z"), vec![episode, table]);
    }

    #[test]
    fn descriptions_say_what_and_how_many() {
        let gap = Gap::new(LossKind::EventBufferFull, at("2026-11-22T10:00:00Z"), at("2026-11-22T10:00:05Z"), 1234);
        assert_eq!(
            gap.describe(),
            "capture gap from 2026-11-22T10:00:00.000000Z to 2026-11-22T10:00:05.000000Z in the kernel event buffers \
             (probe to agent): 1234 events lost; a missing record in this interval is not proof of no connection"
        );
        let json = serde_json::to_value(&gap).unwrap();
        assert_eq!(json["kind"], "event_buffer_full");
        assert_eq!(json["where"], "kernel event buffers (probe to agent)");
        assert_eq!(serde_json::from_value::<Gap>(json).unwrap(), gap);
    }
}
