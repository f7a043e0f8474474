//! Where records are written: sled, one tree per UTC day of the record's
//! start, keys ordered by start time, so a time window is a range scan and
//! retention drops whole days.
//!
//! This first layout keeps one key per record (JSON value). The design brief
//! measured that this does not scale to ISP volumes; compressed record blocks
//! with per-partition indexes replace it (the store issue) behind this API.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use chrono::{DateTime, Days, NaiveDate, Utc};

use crate::icr::Icr;

const PARTITION_PREFIX: &str = "icr/";
/// The longest record slice (active timeout) we look back for when a window
/// starts: records starting up to a day before it may still overlap it.
const LOOKBACK_DAYS: u64 = 1;

/// A handle on the store; clones share it (sled is thread-safe).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    path: PathBuf,
}

/// The store is held by another process: the running agent, whose socket
/// answers instead.
#[derive(Debug)]
pub struct StoreInUse(pub PathBuf);

impl std::fmt::Display for StoreInUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the store {} is in use by another process (a running agent?)", self.0.display())
    }
}

impl std::error::Error for StoreInUse {}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the store directory {}", dir.display()))?;
        let path = dir.join("records");
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(64 << 20)
            .open()
            .map_err(|error| match error {
                sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("lock") =>
                {
                    anyhow::Error::new(StoreInUse(path.clone()))
                }
                other => anyhow::Error::new(other)
                    .context(format!("opening the store {}", path.display())),
            })?;
        Ok(Self { db, path })
    }

    /// Writes `records` (one batch per day partition) and makes them durable.
    pub fn append(&self, records: &[Icr]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut by_day: std::collections::BTreeMap<NaiveDate, sled::Batch> = Default::default();
        for record in records {
            let value = serde_json::to_vec(record).context("encoding a record")?;
            by_day.entry(record.start.date_naive()).or_default().insert(key_of(record)?, value);
        }
        for (day, batch) in by_day {
            self.partition(day)?.apply_batch(batch).context("writing records")?;
        }
        self.db.flush().context("flushing the store")?;
        Ok(())
    }

    /// Records whose lifetime overlaps `[from, to]`, in start order.
    pub fn scan(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Vec<Icr>> {
        if to < from {
            bail!("the window ends before it starts");
        }
        let first_day = from.date_naive().checked_sub_days(Days::new(LOOKBACK_DAYS)).unwrap_or(NaiveDate::MIN);
        let upper = micros(&to).saturating_add(1).to_be_bytes();
        let mut records = Vec::new();
        for day in self.days()? {
            if day < first_day || day > to.date_naive() {
                continue;
            }
            let tree = self.partition(day)?;
            for entry in tree.range(..upper.as_slice()) {
                let (_, value) = entry.context("reading the store")?;
                let record: Icr = serde_json::from_slice(&value).context("decoding a stored record")?;
                if record.end >= from && record.start <= to {
                    records.push(record);
                }
            }
        }
        Ok(records)
    }

    /// Drops every day partition that ended more than `retention_days` before `now`.
    pub fn sweep(&self, retention_days: u32, now: DateTime<Utc>) -> Result<Vec<NaiveDate>> {
        let oldest_kept = now
            .date_naive()
            .checked_sub_days(Days::new(u64::from(retention_days)))
            .unwrap_or(NaiveDate::MIN);
        let mut dropped = Vec::new();
        for day in self.days()? {
            if day < oldest_kept {
                self.db.drop_tree(partition_name(day)).context("dropping an expired partition")?;
                dropped.push(day);
            }
        }
        self.db.flush().context("flushing the store")?;
        Ok(dropped)
    }

    /// The day partitions present, oldest first.
    pub fn days(&self) -> Result<Vec<NaiveDate>> {
        let mut days: Vec<NaiveDate> = self
            .db
            .tree_names()
            .iter()
            .filter_map(|name| std::str::from_utf8(name).ok()?.strip_prefix(PARTITION_PREFIX)?.parse().ok())
            .collect();
        days.sort_unstable();
        Ok(days)
    }

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn partition(&self, day: NaiveDate) -> Result<sled::Tree> {
        self.db.open_tree(partition_name(day)).context("opening a day partition")
    }
}

fn partition_name(day: NaiveDate) -> String {
    format!("{PARTITION_PREFIX}{day}")
}

fn micros(time: &DateTime<Utc>) -> u64 {
    time.timestamp_micros().max(0) as u64
}

/// Start time (µs, big-endian, so keys sort by time) then the record id.
fn key_of(record: &Icr) -> Result<Vec<u8>> {
    let id = uuid::Uuid::parse_str(&record.id).with_context(|| format!("bad record id {}", record.id))?;
    let mut key = micros(&record.start).to_be_bytes().to_vec();
    key.extend_from_slice(id.as_bytes());
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::icr::{Device, EndReason, Endpoint};

    fn record(start: &str, seconds: i64) -> Icr {
        let start: DateTime<Utc> = DateTime::parse_from_rfc3339(start).unwrap().into();
        Icr {
            id: uuid::Uuid::now_v7().to_string(),
            start,
            end: start + chrono::Duration::seconds(seconds),
            end_reason: EndReason::Fin,
            proto: "tcp".into(),
            device: Device { ip: Some("10.0.0.2".parse().unwrap()), port: Some(40000), ..Device::default() },
            public: None,
            remote: Endpoint { ip: "192.0.2.1".parse().unwrap(), port: 443 },
            service: None,
            dns: None,
            packets_up: 1,
            packets_down: 1,
            bytes_up: 60,
            bytes_down: 60,
            incomplete: false,
        }
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().into()
    }

    #[test]
    fn windows_return_overlapping_records_across_days() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let late = record("2026-11-21T23:59:50Z", 20);
        let noon = record("2026-11-22T12:00:00Z", 1);
        let next = record("2026-11-23T08:00:00Z", 1);
        store.append(&[noon.clone(), late.clone(), next.clone()]).unwrap();
        assert_eq!(store.days().unwrap().len(), 3);

        let got = store.scan(at("2026-11-22T00:00:00Z"), at("2026-11-22T23:59:59Z")).unwrap();
        assert_eq!(got, vec![late.clone(), noon.clone()], "the record spanning midnight counts");
        let got = store.scan(at("2026-11-22T12:00:02Z"), at("2026-11-23T07:00:00Z")).unwrap();
        assert!(got.is_empty());
        assert!(store.scan(at("2026-11-23T00:00:00Z"), at("2026-11-22T00:00:00Z")).is_err());
    }

    #[test]
    fn records_survive_reopening_and_sweep_drops_whole_days() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.append(&[record("2025-11-01T10:00:00Z", 1), record("2026-11-20T10:00:00Z", 1)]).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.scan(at("2025-01-01T00:00:00Z"), at("2026-12-31T00:00:00Z")).unwrap().len(), 2);
        let dropped = store.sweep(365, at("2026-11-22T00:00:00Z")).unwrap();
        assert_eq!(dropped, vec![NaiveDate::from_ymd_opt(2025, 11, 1).unwrap()]);
        let left = store.scan(at("2025-01-01T00:00:00Z"), at("2026-12-31T00:00:00Z")).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].start, at("2026-11-20T10:00:00Z"));
    }
}
