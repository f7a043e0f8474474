//! The key layout of a store. In the default tree, `layout` names the
//! layout version; each UTC day is a tree named `day/DATE`, whose keys
//! (block and run numbers big-endian) are:
//! `B`+block → block, `M`+block → meta, `L`+block → the block's fingerprints
//! (until its run is built; their rollup is kept in memory), `I`+run+first
//! fingerprint → run index page, `U`+run+first fingerprint → run rollup
//! page, `R`+run → the run is complete.
use anyhow::{Context as _, Result, anyhow, bail};
use chrono::{DateTime, NaiveDate, Utc};

use crate::record::Icr;

pub(super) const DAY_PREFIX: &str = "day/";
/// The layout written and read: 2 added rollups and longer block metas.
/// An older store is migrated when opened ([`super::migrate`]); a newer one refused.
pub(super) const LAYOUT: u32 = 2;
pub(super) const LAYOUT_KEY: &[u8] = b"layout";
/// Minutes in a day: a block's meta says in which of them any of its
/// records was alive, so a query for one moment skips the blocks that only
/// a few long flows stretch over it.
pub(super) const MINUTES: usize = 1440;
pub(super) const MINUTE_US: i64 = 60_000_000;
pub(super) const MINUTE_WORDS: usize = MINUTES.div_ceil(64);

#[derive(Clone, Debug)]
pub(super) struct BlockMeta {
    pub(super) min_start_us: i64,
    pub(super) max_end_us: i64,
    /// With the two above: whether every record of the block overlaps a
    /// window, so that its rollup stands for it (question 2).
    pub(super) max_start_us: i64,
    pub(super) min_end_us: i64,
    pub(super) records: u32,
    /// Bit m: a record was alive in minute m of the partition's day (or
    /// after the day, for the last bit).
    pub(super) alive: [u64; MINUTE_WORDS],
}

impl BlockMeta {
    pub(super) const LEN: usize = 36 + MINUTE_WORDS * 8;

    pub(super) fn of(records: &[Icr], day_start_us: i64) -> Self {
        let mut alive = [0u64; MINUTE_WORDS];
        for record in records {
            let minute = |us: i64| ((us - day_start_us).div_euclid(MINUTE_US)).clamp(0, MINUTES as i64 - 1) as usize;
            for m in minute(record.start.timestamp_micros())..=minute(record.end.timestamp_micros()) {
                alive[m / 64] |= 1 << (m % 64);
            }
        }
        Self {
            min_start_us: records.iter().map(|r| r.start.timestamp_micros()).min().unwrap_or(0),
            max_end_us: records.iter().map(|r| r.end.timestamp_micros()).max().unwrap_or(0),
            max_start_us: records.iter().map(|r| r.start.timestamp_micros()).max().unwrap_or(0),
            min_end_us: records.iter().map(|r| r.end.timestamp_micros()).min().unwrap_or(0),
            records: records.len() as u32,
            alive,
        }
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.extend_from_slice(&self.min_start_us.to_be_bytes());
        out.extend_from_slice(&self.max_end_us.to_be_bytes());
        out.extend_from_slice(&self.max_start_us.to_be_bytes());
        out.extend_from_slice(&self.min_end_us.to_be_bytes());
        out.extend_from_slice(&self.records.to_be_bytes());
        for word in &self.alive {
            out.extend_from_slice(&word.to_be_bytes());
        }
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != Self::LEN {
            bail!("a block meta of {} bytes", bytes.len());
        }
        let mut alive = [0u64; MINUTE_WORDS];
        for (word, chunk) in alive.iter_mut().zip(bytes[36..].chunks_exact(8)) {
            *word = u64::from_be_bytes(chunk.try_into()?);
        }
        Ok(Self {
            min_start_us: i64::from_be_bytes(bytes[..8].try_into()?),
            max_end_us: i64::from_be_bytes(bytes[8..16].try_into()?),
            max_start_us: i64::from_be_bytes(bytes[16..24].try_into()?),
            min_end_us: i64::from_be_bytes(bytes[24..32].try_into()?),
            records: u32::from_be_bytes(bytes[32..36].try_into()?),
            alive,
        })
    }

    /// Every record of the block overlaps `[from, to]`.
    pub(super) fn within(&self, from_us: i64, to_us: i64) -> bool {
        self.records > 0 && self.min_end_us >= from_us && self.max_start_us <= to_us
    }

    pub(super) fn overlaps(&self, from_us: i64, to_us: i64, day_start_us: i64) -> bool {
        if self.min_start_us > to_us || self.max_end_us < from_us {
            return false;
        }
        let minute = |us: i64| ((us - day_start_us).div_euclid(MINUTE_US)).clamp(0, MINUTES as i64 - 1) as usize;
        (minute(from_us)..=minute(to_us)).any(|m| self.alive[m / 64] & (1 << (m % 64)) != 0)
    }
}

pub(super) fn key(tag: u8, number: u32) -> [u8; 5] {
    let mut key = [tag; 5];
    key[1..].copy_from_slice(&number.to_be_bytes());
    key
}

pub(super) fn page_key(run: u32, first: u32) -> [u8; 9] {
    run_key(b'I', run, first)
}

pub(super) fn run_key(tag: u8, run: u32, first: u32) -> [u8; 9] {
    let mut key = [tag; 9];
    key[1..5].copy_from_slice(&run.to_be_bytes());
    key[5..].copy_from_slice(&first.to_be_bytes());
    key
}

/// The rollup page of `run` that would hold `print`.
pub(super) fn rollup_page(tree: &sled::Tree, run: u32, print: u32) -> Result<Option<sled::IVec>> {
    match tree.range(run_key(b'U', run, 0)..=run_key(b'U', run, print)).next_back() {
        Some(entry) => Ok(Some(entry.context("reading a rollup page")?.1)),
        None => Ok(None),
    }
}

/// A UTC day as a window: its first and its last microsecond.
pub(super) fn day_bounds(date: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
    let from = date.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    (from, from + chrono::Duration::days(1) - chrono::Duration::microseconds(1))
}

pub(super) fn number_of(key: &[u8]) -> Result<u32> {
    Ok(u32::from_be_bytes(key.get(1..5).ok_or_else(|| anyhow!("a short key in the store"))?.try_into()?))
}

pub(super) fn day_name(date: NaiveDate) -> String {
    format!("{DAY_PREFIX}{date}")
}
