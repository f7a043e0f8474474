//! Where records are written and read back. sled holds one tree per UTC day
//! (of a record's start), so retention drops whole days, indexes and all.
//! Within a day:
//!
//! - records are sealed into blocks of [`BLOCK_RECORDS`], encoded column by
//!   column and compressed ([`codec`]); each block has a small meta (its
//!   time span) so a window touches only the blocks that overlap it;
//! - each block's index fingerprints are merged every 64 blocks into a run
//!   ([`index`]) that maps a key to the blocks holding it, for the three
//!   questions: public ip:port, device, service;
//! - the open block lives in memory behind a synced append log ([`wal`]):
//!   `append` returns only when its records are durable.
//!
//! - each block's devices and the services they used are rolled up
//!   ([`rollup`]), and merged per run, so question 2 reads one page per run.
//!
//! The keys in a day's tree are in [`layout`]; a day's blocks and runs in
//! [`day`]; the store's files (its lock, sled, private modes) in [`files`].
pub mod codec;
mod day;
mod files;
pub mod gaps;
pub mod governing;
pub mod index;
mod layout;
mod migrate;
pub mod outbox;
pub mod rollup;
#[cfg(test)]
pub(crate) mod test_records;
mod wal;
mod wire;
mod zstd_contexts;

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result, anyhow, bail};
use chrono::{DateTime, Days, NaiveDate, Utc};
use log::{info, warn};

use crate::record::Icr;
use day::Day;
pub use files::{OpenError, StoreInUse};
use files::{lock_store, make_private, open_sled, remove_if_present};
use gaps::{Gap, LossKind, Watermark};
use index::IndexKey;
pub use index::Lookup;
use layout::{DAY_PREFIX, day_bounds, day_name, key, rollup_page};
use rollup::Services;
use wal::{Damage, DamageKind, Wal};

/// Records a sealed block holds (the design brief measured 4,096 as the
/// point where compression stops improving). The unit tests use small blocks
/// to reach sealed blocks and built runs with a few thousand records.
pub const BLOCK_RECORDS: usize = 4096;
/// sled's page cache, in MiB, unless `[store] cache_mb` says otherwise.
pub const DEFAULT_CACHE_MB: u64 = 64;
/// Gap entries ([`gaps`]), beside the days: a gap may span midnight.
const GAPS_TREE: &str = "gaps";
/// The agent's loss watermark ([`Watermark`]), one key.
const AGENT_TREE: &str = "agent";
const WATERMARK_KEY: &[u8] = b"watermark";
/// The first layout's trees (one JSON value per record): migrated on open.
const JSON_DAY_PREFIX: &str = "icr/";
/// Records start at most this long before a window and still overlap it
/// (the active timeout slices longer flows).
pub const LOOKBACK_DAYS: u64 = 1;
/// The longest retention the law allows (12 months), and the store's until
/// its configuration says less.
pub const MAX_RETENTION_DAYS: u32 = 365;
/// Under the open-block log directory: damaged log ranges, kept as they were.
const QUARANTINE_DIR: &str = "quarantine";
/// `DIR/handover`: see [`Store::leave_handover`].
const HANDOVER_FILE: &str = "handover";

/// A handle on the store; clones share it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    /// `DIR/icr.lock`, flocked while the store is open: one process at a
    /// time, and "in use" known from the lock's errno.
    _lock: std::fs::File,
    /// The store's directory.
    dir: PathBuf,
    path: PathBuf,
    wal_dir: PathBuf,
    days: Mutex<BTreeMap<NaiveDate, Day>>,
    /// Opened for questions only: no file of the store is changed.
    read_only: bool,
    /// Records per sealed block: [`BLOCK_RECORDS`], or fewer where tests
    /// want many blocks from few records.
    block_records: usize,
    /// Damage found in open-block logs by a read-only open, which may not
    /// record it: reported with the stored gaps.
    unrecorded_gaps: Vec<Gap>,
    /// Days kept ([`Store::set_retention_days`]; 0: not set, nothing
    /// filtered): reads return nothing a sweep now would drop, whether or
    /// not one has run.
    retention_days: std::sync::atomic::AtomicU32,
    /// Appends and gap entries are also spooled for shipping (`outbox`).
    outbox: std::sync::atomic::AtomicBool,
    /// Records the outbox holds.
    outbox_records: std::sync::atomic::AtomicU64,
}

impl Store {
    /// Opens (or creates) the store in `dir`, recovering what a crash left:
    /// append logs are read back and the records that a block sealed before
    /// the crash already holds are not counted twice. What a log held that
    /// is not a whole, checked frame is moved aside as it was (a torn tail
    /// too, though it was never acknowledged); damage to acknowledged
    /// records becomes a `store_corruption` gap of that day.
    pub fn open(dir: &Path) -> Result<Self, OpenError> {
        Self::open_with(dir, false, BLOCK_RECORDS)
    }

    /// Opens the store to answer questions: the open-block logs are read,
    /// not repaired, and their damage is reported as gaps without being
    /// written; appends are refused.
    pub fn open_read_only(dir: &Path) -> Result<Self, OpenError> {
        Self::open_with(dir, true, BLOCK_RECORDS)
    }

    /// As [`Store::open`] (or read-only), sealing blocks of `block_records`
    /// (tests: many blocks from few records).
    pub fn open_with(dir: &Path, read_only: bool, block_records: usize) -> Result<Self, OpenError> {
        Self::open_inner(dir, read_only, block_records, DEFAULT_CACHE_MB << 20)
    }

    /// As [`Store::open`], keeping at most `cache_bytes` of the store in
    /// memory (the agent's `[store] cache_mb`).
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self, OpenError> {
        Self::open_inner(dir, false, BLOCK_RECORDS, cache_bytes)
    }

    fn open_inner(dir: &Path, read_only: bool, block_records: usize, cache_bytes: u64) -> Result<Self, OpenError> {
        if block_records == 0 {
            return Err(anyhow::anyhow!("a block holds at least one record").into());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating the store directory {}", dir.display()))?;
        if !read_only {
            make_private(dir)?;
        }
        let path = dir.join("records");
        // sled locks its files too, but says so only in an error's text.
        let lock = lock_store(dir)?;
        let db = open_sled(&path, cache_bytes)?;
        migrate::to_current_layout(&db, &path)?;
        let wal_dir = dir.join("open-blocks");
        std::fs::create_dir_all(&wal_dir).with_context(|| format!("creating {}", wal_dir.display()))?;
        let mut store = Self {
            inner: Arc::new(Inner {
                db,
                _lock: lock,
                dir: dir.to_path_buf(),
                path,
                wal_dir,
                days: Mutex::new(BTreeMap::new()),
                read_only,
                block_records,
                unrecorded_gaps: Vec::new(),
                retention_days: 0.into(),
                outbox: false.into(),
                outbox_records: 0.into(),
            }),
        };
        let gaps = store.recover_logs()?;
        if read_only {
            Arc::get_mut(&mut store.inner).expect("not shared yet").unrecorded_gaps = gaps;
        } else {
            store.record_gaps(&gaps, None)?;
            store.migrate_json_days()?;
        }
        Ok(store)
    }

    /// Writes `records` and makes them durable: when this returns, they
    /// survive a crash. Blocks that fill up are sealed.
    pub fn append(&self, records: &[Icr]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        if self.inner.read_only {
            bail!("the store was opened read-only, for questions");
        }
        let mut by_day: BTreeMap<NaiveDate, Vec<Icr>> = BTreeMap::new();
        for record in records {
            by_day.entry(record.start.date_naive()).or_default().push(record.clone());
        }
        let newest = *by_day.keys().next_back().expect("not empty");
        if self.is_spooling() {
            // Before the records are acknowledged: nothing acknowledged is
            // missing from the outbox (a failed append retried is spooled
            // twice; the cluster keeps one row per record id).
            self.spool_records(records)?;
        }
        let mut days = self.lock()?;
        // First every record into its day's log. If one day's log fails, the
        // logs this call already wrote are rewritten from their open blocks
        // by the next append (the writer's retry of the same records), so
        // that a failed call keeps no record twice.
        let mut logged = Vec::new();
        for (date, records) in &by_day {
            let day = self.day(&mut days, *date)?;
            let written = match &mut day.wal {
                Some(wal) => wal.append(records),
                // No log yet, or the last write to it failed (a full disk):
                // write it anew with every open record, so a torn frame is
                // never followed by good ones.
                None => Wal::create(
                    &self.wal_path(*date),
                    day.blocks.len() as u32,
                    &[day.open.as_slice(), records].concat(),
                )
                .map(|wal| day.wal = Some(wal)),
            };
            if let Err(error) = written {
                day.wal = None;
                for date in logged {
                    days.get_mut(&date).expect("present").wal = None;
                }
                return Err(error);
            }
            logged.push(*date);
        }
        // Durable now: they join the open blocks. Sealing may still fail (a
        // full disk); that loses nothing, and the next append seals again.
        for (date, records) in by_day {
            days.get_mut(&date).expect("present").open.extend(records);
        }
        if let Err(error) = self.seal_filled(&mut days, &logged, newest) {
            warn!(
                "sealing blocks failed; their records are safe in the open-block logs and sealing is retried: {error:#}"
            );
        }
        Ok(())
    }

    /// Seals the full blocks of `touched` days and what days two behind the
    /// newest hold, then rewrites those days' logs with what stays open.
    fn seal_filled(&self, days: &mut BTreeMap<NaiveDate, Day>, touched: &[NaiveDate], newest: NaiveDate) -> Result<()> {
        let mut sealed = Vec::new();
        for date in touched {
            let day = days.get_mut(date).expect("present");
            let block_records = self.inner.block_records;
            if day.open.len() >= block_records {
                while day.open.len() >= block_records {
                    day.seal_front(block_records)?;
                }
                sealed.push(*date);
            }
        }
        // A day two days behind the newest gets no more records: seal what
        // it has, so open blocks (memory, logs) stay few.
        let stale: Vec<NaiveDate> = days
            .iter()
            .filter(|(date, day)| {
                !day.open.is_empty() && **date < newest.checked_sub_days(Days::new(1)).unwrap_or(NaiveDate::MIN)
            })
            .map(|(date, _)| *date)
            .collect();
        for date in stale {
            let day = days.get_mut(&date).expect("present");
            day.seal_front(day.open.len())?;
            sealed.push(date);
        }
        if sealed.is_empty() {
            return Ok(());
        }
        self.inner.db.flush().context("flushing sealed blocks")?;
        for date in sealed {
            let path = self.wal_path(date);
            let day = days.get_mut(&date).expect("present");
            day.wal = None;
            day.wal = Some(Wal::create(&path, day.blocks.len() as u32, &day.open)?);
            day.build_runs()?;
        }
        Ok(())
    }

    /// Records in open blocks (held in memory, and in their logs, until
    /// their block is sealed), all days together.
    pub fn open_records(&self) -> usize {
        self.lock().map(|days| days.values().map(|day| day.open.len()).sum()).unwrap_or(0)
    }

    /// How many days the store keeps (the configuration's `retention_days`,
    /// at most [`MAX_RETENTION_DAYS`]): from now on, reads return nothing a
    /// sweep would drop now. Every reader that answers a request sets it
    /// (the agent, queries, list); until then nothing is filtered.
    pub fn set_retention_days(&self, days: u32) {
        self.inner.retention_days.store(days.clamp(1, MAX_RETENTION_DAYS), std::sync::atomic::Ordering::Relaxed);
    }

    /// The oldest day a sweep at `now` keeps (the cluster's too).
    pub fn oldest_kept(retention_days: u32, now: DateTime<Utc>) -> NaiveDate {
        now.date_naive().checked_sub_days(Days::new(u64::from(retention_days))).unwrap_or(NaiveDate::MIN)
    }

    /// The oldest day reads may return now.
    fn oldest_readable(&self) -> NaiveDate {
        match self.inner.retention_days.load(std::sync::atomic::Ordering::Relaxed) {
            0 => NaiveDate::MIN,
            days => Self::oldest_kept(days, Utc::now()),
        }
    }

    /// Records whose lifetime overlaps `[from, to]` and that have any of the
    /// keys asked for, in no particular order.
    pub fn find(&self, from: DateTime<Utc>, to: DateTime<Utc>, lookup: Lookup) -> Result<Vec<Icr>> {
        if to < from {
            bail!("the window ends before it starts");
        }
        let (from_us, to_us) = (from.timestamp_micros(), to.timestamp_micros());
        let first_day = from.date_naive().checked_sub_days(Days::new(LOOKBACK_DAYS)).unwrap_or(NaiveDate::MIN);
        let filter = match lookup {
            Lookup::All => None,
            Lookup::Any(keys) => Some(index::KeyFilter::new(keys)),
        };
        let wanted = |record: &Icr| {
            record.end >= from && record.start <= to && filter.as_ref().is_none_or(|f| f.matches_record(record))
        };
        let fields = filter.as_ref().map(index::KeyFilter::fields).unwrap_or_default();
        let wanted_view = |view: &codec::Keys| {
            view.end_us >= from_us && view.start_us <= to_us && filter.as_ref().is_none_or(|f| f.matches_view(view))
        };
        let mut found = Vec::new();
        let oldest = self.oldest_readable();
        for date in self.days()? {
            if date < first_day || date < oldest || date > to.date_naive() {
                continue;
            }
            // Under the lock: which blocks to read, and the open block.
            let (tree, blocks) = {
                let mut days = self.lock()?;
                let day = self.day(&mut days, date)?;
                found.extend(day.open.iter().filter(|r| wanted(r)).cloned());
                let blocks = day.candidates(from_us, to_us, lookup)?;
                (day.tree.clone(), blocks)
            };
            for block in blocks {
                let bytes = tree
                    .get(key(b'B', block))
                    .context("reading a block")?
                    .ok_or_else(|| anyhow!("block {block} of {date} is missing"))?;
                found.extend(
                    codec::decode_filtered(&bytes, fields, wanted_view)
                        .with_context(|| format!("block {block} of {date}"))?,
                );
            }
        }
        Ok(found)
    }

    /// Question 2: the services used by the device `device` (a MAC, device
    /// IP or subscriber key) in records overlapping `[from, to]`. Blocks and
    /// runs wholly inside the window answer from their rollups; the others
    /// (at the window's edges, and the open block) from their records.
    pub fn services(&self, from: DateTime<Utc>, to: DateTime<Utc>, device: &IndexKey) -> Result<Services> {
        if to < from {
            bail!("the window ends before it starts");
        }
        if !matches!(device, IndexKey::Mac(_) | IndexKey::DeviceIp(_) | IndexKey::Subscriber(_)) {
            bail!("{device:?} does not name a device");
        }
        let (from_us, to_us) = (from.timestamp_micros(), to.timestamp_micros());
        let first_day = from.date_naive().checked_sub_days(Days::new(LOOKBACK_DAYS)).unwrap_or(NaiveDate::MIN);
        let filter = index::KeyFilter::new(std::slice::from_ref(device));
        let wanted_view =
            |view: &codec::Keys| view.end_us >= from_us && view.start_us <= to_us && filter.matches_view(view);
        let mut services = Services::default();
        let oldest = self.oldest_readable();
        for date in self.days()? {
            if date < first_day || date < oldest || date > to.date_naive() {
                continue;
            }
            let (tree, plan) = {
                let mut days = self.lock()?;
                let day = self.day(&mut days, date)?;
                for record in day.open.iter().filter(|r| r.end >= from && r.start <= to && filter.matches_record(r)) {
                    services.add_record(record);
                }
                let plan = day.services_plan(from_us, to_us, device)?;
                if plan.pending {
                    for rollup in day.pending.values() {
                        rollup.lookup(device, &mut services);
                    }
                }
                (day.tree.clone(), plan)
            };
            let print = device.fingerprint();
            for run in plan.runs {
                let context = || format!("the rollup of run {run} of {date}");
                let mut aliases = Vec::new();
                if let Some(page) = rollup_page(&tree, run, print).with_context(context)? {
                    rollup::lookup(&page, device, true, &mut services, &mut aliases).with_context(context)?;
                }
                for alias in aliases {
                    if let Some(page) = rollup_page(&tree, run, alias).with_context(context)? {
                        rollup::lookup_print(&page, alias, device, false, &mut services, &mut Vec::new())
                            .with_context(context)?;
                    }
                }
            }
            for block in plan.decode {
                let bytes = tree
                    .get(key(b'B', block))
                    .context("reading a block")?
                    .ok_or_else(|| anyhow!("block {block} of {date} is missing"))?;
                for record in codec::decode_filtered(&bytes, filter.fields(), wanted_view)
                    .with_context(|| format!("block {block} of {date}"))?
                {
                    services.add_record(&record);
                }
            }
        }
        Ok(services)
    }

    /// Every record overlapping `[from, to]`, in start order.
    pub fn scan(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Vec<Icr>> {
        let mut records = self.find(from, to, Lookup::All)?;
        records.sort_by(|a, b| (a.start, &a.id).cmp(&(b.start, &b.id)));
        Ok(records)
    }

    /// Drops every day partition more than `retention_days` before `now`:
    /// its blocks, indexes and open block together.
    pub fn sweep(&self, retention_days: u32, now: DateTime<Utc>) -> Result<Vec<NaiveDate>> {
        let oldest_kept = Self::oldest_kept(retention_days, now);
        let mut days = self.lock()?;
        let mut dropped = Vec::new();
        for date in self.days()? {
            if date < oldest_kept {
                days.remove(&date);
                self.inner.db.drop_tree(day_name(date)).context("dropping an expired day")?;
                remove_if_present(&self.wal_path(date))?;
                dropped.push(date);
            }
        }
        let cutoff = oldest_kept.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
        let gaps = self.gaps_tree()?;
        for entry in gaps.iter() {
            let (key, value) = entry.context("reading gap entries")?;
            let gap: Gap = serde_json::from_slice(&value).context("a damaged gap entry")?;
            if gap.to < cutoff {
                gaps.remove(key).context("dropping an expired gap entry")?;
            }
        }
        self.inner.db.flush().context("flushing the store")?;
        Ok(dropped)
    }

    /// Writes (or rewrites, when an episode grew) gap entries, and the
    /// watermark they were counted from, durably.
    pub fn record_gaps(&self, gaps: &[Gap], watermark: Option<&Watermark>) -> Result<()> {
        if self.is_spooling() && !gaps.is_empty() {
            self.spool_gaps(gaps)?;
        }
        let tree = self.gaps_tree()?;
        for gap in gaps {
            tree.insert(gap.key(), serde_json::to_vec(gap)?).context("writing a gap entry")?;
        }
        if let Some(watermark) = watermark {
            self.agent_tree()?
                .insert(WATERMARK_KEY, serde_json::to_vec(watermark)?)
                .context("writing the loss watermark")?;
        }
        self.inner.db.flush().context("flushing gap entries")?;
        Ok(())
    }

    /// The gap entries that overlap `[from, to]`, oldest first.
    pub fn gaps(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Vec<Gap>> {
        let end = (to.timestamp_micros().max(0) as u64).to_be_bytes();
        // Gaps expire with the days they are about.
        let oldest = self.oldest_readable();
        let from = if oldest == NaiveDate::MIN {
            from
        } else {
            from.max(oldest.and_hms_opt(0, 0, 0).expect("midnight").and_utc())
        };
        if to < from {
            return Ok(Vec::new());
        }
        let mut found: Vec<Gap> =
            self.inner.unrecorded_gaps.iter().filter(|gap| gap.overlaps(from, to)).cloned().collect();
        // Keys sort by start: every gap starting after `to` is past the range.
        for entry in self.gaps_tree()?.range(..=[end.as_slice(), &[u8::MAX]].concat()) {
            let (_, value) = entry.context("reading gap entries")?;
            let gap: Gap = serde_json::from_slice(&value).context("a damaged gap entry")?;
            if gap.overlaps(from, to) {
                found.push(gap);
            }
        }
        found.sort_by_key(|gap| gap.from);
        Ok(found)
    }

    /// The loss watermark the last agent left, if any.
    pub fn watermark(&self) -> Result<Option<Watermark>> {
        match self.agent_tree()?.get(WATERMARK_KEY).context("reading the loss watermark")? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).context("a damaged loss watermark")?)),
            None => Ok(None),
        }
    }

    fn gaps_tree(&self) -> Result<sled::Tree> {
        self.inner.db.open_tree(GAPS_TREE).context("opening the gap entries")
    }

    fn agent_tree(&self) -> Result<sled::Tree> {
        self.inner.db.open_tree(AGENT_TREE).context("opening the agent's state")
    }

    /// The day partitions present, oldest first.
    pub fn days(&self) -> Result<Vec<NaiveDate>> {
        let mut days: Vec<NaiveDate> = self
            .inner
            .db
            .tree_names()
            .iter()
            .filter_map(|name| std::str::from_utf8(name).ok()?.strip_prefix(DAY_PREFIX)?.parse().ok())
            .collect();
        days.sort_unstable();
        Ok(days)
    }

    /// Bytes the store takes on disk (sled and the open blocks' logs).
    pub fn size_on_disk(&self) -> u64 {
        let logs: u64 = std::fs::read_dir(&self.inner.wal_dir)
            .map(|dir| dir.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
            .unwrap_or(0);
        self.inner.db.size_on_disk().unwrap_or(0) + logs
    }

    /// Bytes of keys and values in the day trees by the kind of entry
    /// (blocks, metas, index, rollups...): where the store's size goes.
    pub fn bytes_by_kind(&self) -> Result<BTreeMap<String, u64>> {
        let mut sizes = BTreeMap::new();
        for date in self.days()? {
            let tree = self.inner.db.open_tree(day_name(date)).context("opening a day partition")?;
            for entry in tree.iter() {
                let (key, value) = entry.context("reading a day partition")?;
                let kind = match key.first() {
                    Some(b'B') => "blocks",
                    Some(b'M') => "metas",
                    Some(b'L' | b'I' | b'R') => "index",
                    Some(b'U') => "rollups",
                    _ => "other",
                };
                *sizes.entry(kind.to_owned()).or_insert(0) += (key.len() + value.len()) as u64;
            }
        }
        Ok(sizes)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Leaves what an agent stopping with its probe pinned hands to the
    /// next (`capture::handover`), once its last records are durable.
    pub fn leave_handover(&self, bytes: &[u8]) -> Result<()> {
        files::replace_private(&self.inner.dir.join(HANDOVER_FILE), bytes)
    }

    /// Takes what the last agent handed over, if it left anything: read
    /// once, then removed, so that no later agent resumes from it again.
    pub fn take_handover(&self) -> Result<Option<Vec<u8>>> {
        let path = self.inner.dir.join(HANDOVER_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
        };
        remove_if_present(&path)?;
        files::sync_parent(&path)?;
        Ok(Some(bytes))
    }

    /// Records that the configuration file `config` (absolute; `None`: the
    /// store's own `DIR/icr.toml`) governs this store from now on, and
    /// returns what governed it before. A writer's act: refused on a store
    /// opened for questions, so that no one who merely asks can choose the
    /// file that authorises them.
    pub fn govern(&self, config: Option<&Path>) -> Result<Option<PathBuf>> {
        if self.inner.read_only {
            bail!(
                "the store {} is open for questions only: it cannot record a configuration",
                self.inner.dir.display()
            );
        }
        let before = governing::remembered(&self.inner.dir)?;
        if before.as_deref() != config {
            governing::remember(&self.inner.dir, config)?;
        }
        Ok(before)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<NaiveDate, Day>>> {
        self.inner.days.lock().map_err(|_| anyhow!("the store's state was poisoned by a panic"))
    }

    fn wal_path(&self, date: NaiveDate) -> PathBuf {
        self.inner.wal_dir.join(format!("{date}.log"))
    }

    /// The day's state, loaded on first use.
    fn day<'a>(&self, days: &'a mut BTreeMap<NaiveDate, Day>, date: NaiveDate) -> Result<&'a mut Day> {
        if let std::collections::btree_map::Entry::Vacant(e) = days.entry(date) {
            let tree = self.inner.db.open_tree(day_name(date)).context("opening a day partition")?;
            e.insert(Day::load(tree, date).with_context(|| format!("loading the day {date}"))?);
        }
        Ok(days.get_mut(&date).expect("inserted"))
    }

    /// Reads back every open block's log after a stop or a crash; returns a
    /// gap for each day whose log lost acknowledged records.
    fn recover_logs(&self) -> Result<Vec<Gap>> {
        let entries = std::fs::read_dir(&self.inner.wal_dir)
            .with_context(|| format!("listing {}", self.inner.wal_dir.display()))?;
        let mut days = self.lock()?;
        let mut gaps = Vec::new();
        for entry in entries {
            let path = entry?.path();
            let Some(date) = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<NaiveDate>().ok()) else {
                continue;
            };
            if path.extension().is_some_and(|e| e == "tmp") {
                if !self.inner.read_only {
                    remove_if_present(&path)?; // a log rewrite that did not finish: the old log stands
                }
                continue;
            }
            let recovered = Wal::read(&path)?;
            if recovered.lost_records() {
                let (from, to) = day_bounds(date);
                let damaged = recovered
                    .damage
                    .iter()
                    .filter(|d| d.kind != DamageKind::TornTail)
                    .map(|d| d.bytes.len() as u64)
                    .sum();
                let gap = Gap::new(LossKind::StoreCorruption, from, to, damaged);
                warn!("{}: {}", path.display(), gap.describe());
                gaps.push(gap);
            }
            let day = self.day(&mut days, date)?;
            // Blocks sealed from this log before the crash hold its first records.
            let sealed: usize = day.blocks.iter().skip(recovered.base_block as usize).map(|b| b.records as usize).sum();
            let records = recovered.records.get(sealed..).unwrap_or_default().to_vec();
            if !self.inner.read_only {
                self.set_aside(date, &recovered.damage)?;
                if sealed > 0 || !recovered.damage.is_empty() {
                    // Only whole frames, and only the records no block holds.
                    day.wal = Some(Wal::create(&path, day.blocks.len() as u32, &records)?);
                } else {
                    day.wal = Some(Wal::reopen(&path)?);
                }
            }
            day.open = records;
        }
        Ok(gaps)
    }

    /// Keeps each damaged range of a day's log, byte for byte, in
    /// `open-blocks/quarantine/DATE-OFFSET-KIND.bad`, before the log is
    /// rewritten without it.
    fn set_aside(&self, date: NaiveDate, damage: &[Damage]) -> Result<()> {
        if damage.is_empty() {
            return Ok(());
        }
        let dir = self.inner.wal_dir.join(QUARANTINE_DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for damaged in damage {
            let kind = match damaged.kind {
                DamageKind::TornTail => "torn",
                DamageKind::Corrupt => "corrupt",
                DamageKind::NotALog => "not-a-log",
            };
            // Never over an earlier file: the same day's log may be damaged
            // again, at the same offset, after a repair.
            let (path, mut file) = (0..)
                .map(|n| {
                    dir.join(format!(
                        "{date}-{}-{kind}{}.bad",
                        damaged.offset,
                        if n == 0 { String::new() } else { format!(".{n}") }
                    ))
                })
                .find_map(|path| match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                    Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => None,
                    opened => Some(
                        opened.map(|file| (path.clone(), file)).with_context(|| format!("creating {}", path.display())),
                    ),
                })
                .expect("an unused name")?;
            file.write_all(&damaged.bytes)
                .and_then(|()| file.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
            warn!(
                "kept {} damaged bytes of the {date} open-block log aside in {}",
                damaged.bytes.len(),
                path.display()
            );
        }
        std::fs::File::open(&dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))
    }

    /// Moves records of the first layout (one JSON value each) into blocks.
    fn migrate_json_days(&self) -> Result<()> {
        for name in self.inner.db.tree_names() {
            if !name.starts_with(JSON_DAY_PREFIX.as_bytes()) {
                continue;
            }
            let tree = self.inner.db.open_tree(&name)?;
            let records = tree
                .iter()
                .values()
                .map(|value| serde_json::from_slice::<Icr>(&value?).context("decoding a record of the JSON layout"))
                .collect::<Result<Vec<_>>>()?;
            self.append(&records)?;
            self.inner.db.drop_tree(&name)?;
            info!("moved {} records of {} to the block layout", records.len(), String::from_utf8_lossy(&name));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RecordIds;
    use index::RUN_BLOCKS;
    use layout::{BlockMeta, LAYOUT, LAYOUT_KEY, number_of, run_key};
    use test_records::{TEST_BLOCK_RECORDS, reopen, reopen_read_only, sample_at, samples};

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().into()
    }

    fn sorted(mut records: Vec<Icr>) -> Vec<Icr> {
        records.sort_by(|a, b| a.id.cmp(&b.id));
        records
    }

    #[test]
    fn a_store_open_elsewhere_is_in_use_by_its_error_type() {
        let dir = tempfile::tempdir().unwrap();
        let first = test_records::open(dir.path()).unwrap();
        for second in [test_records::open(dir.path()), test_records::open_read_only(dir.path())] {
            let error = second.err().expect("the store is held");
            assert!(matches!(error, OpenError::InUse(StoreInUse(_))), "{error}");
        }
        drop(first);
        assert!(test_records::open_read_only(dir.path()).is_ok(), "free once closed");
    }

    #[test]
    fn windows_return_overlapping_records_across_days() {
        let dir = tempfile::tempdir().unwrap();
        let store = reopen(dir.path()).unwrap();
        let mut ids = RecordIds::default();
        let mut late = sample_at(1, at("2026-11-21T23:59:50Z"), &mut ids);
        late.end = at("2026-11-22T00:00:10Z");
        let noon = sample_at(2, at("2026-11-22T12:00:00Z"), &mut ids);
        let next = sample_at(3, at("2026-11-23T08:00:00Z"), &mut ids);
        store.append(&[noon.clone(), late.clone(), next.clone()]).unwrap();
        assert_eq!(store.days().unwrap().len(), 3);

        let got = store.scan(at("2026-11-22T00:00:00Z"), at("2026-11-22T23:59:59Z")).unwrap();
        assert_eq!(got, vec![late.clone(), noon.clone()], "the record spanning midnight counts");
        assert!(store.scan(at("2026-11-22T12:00:02Z"), at("2026-11-23T07:00:00Z")).unwrap().is_empty());
        assert!(store.scan(at("2026-11-23T00:00:00Z"), at("2026-11-22T00:00:00Z")).is_err());
    }

    /// Enough records for sealed blocks and a built run, queried by every
    /// kind of key, before and after reopening: the index answers exactly
    /// what a full scan answers.
    #[test]
    fn index_lookups_equal_a_scan_in_runs_unrun_blocks_and_the_open_block() {
        let dir = tempfile::tempdir().unwrap();
        let records = samples(TEST_BLOCK_RECORDS as u64 * (RUN_BLOCKS as u64 + 3) + 30);
        let (from, to) = (records[0].start, records.last().unwrap().end);
        let check = |store: &Store| {
            let day = store.lock().unwrap();
            let state = &day[&from.date_naive()];
            assert_eq!(state.runs, 1);
            assert_eq!(state.blocks.len(), RUN_BLOCKS as usize + 3);
            assert_eq!(state.open.len(), 30);
            drop(day);
            let queries: Vec<Vec<IndexKey>> = vec![
                vec![IndexKey::PublicPort("203.0.113.1".parse().unwrap(), 1024 + 777)],
                vec![IndexKey::PublicAddr("203.0.113.1".parse().unwrap())],
                vec![IndexKey::Mac([2, 0, 0, 0, 9, 0x17])],
                vec![IndexKey::Subscriber("line-200".into())],
                vec![IndexKey::Name("s3.example.com".into()), IndexKey::Name("s39.example.com".into())],
                vec![IndexKey::Domain("example.com".into())],
                vec![IndexKey::RemoteIp("192.0.2.77".parse().unwrap())],
                vec![IndexKey::Name("nowhere.example".into())],
            ];
            let all = store.scan(from, to).unwrap();
            assert_eq!(all.len(), records.len());
            for keys in queries {
                let window = (records[80].start, records[records.len() - 90].start);
                let expected: Vec<Icr> = all
                    .iter()
                    .filter(|r| {
                        index::KeyFilter::new(&keys).matches_record(r) && r.end >= window.0 && r.start <= window.1
                    })
                    .cloned()
                    .collect();
                let got = store.find(window.0, window.1, Lookup::Any(&keys)).unwrap();
                assert_eq!(sorted(got), sorted(expected), "{keys:?}");
            }
        };
        {
            let store = reopen(dir.path()).unwrap();
            for chunk in records.chunks(1000) {
                store.append(chunk).unwrap();
            }
            check(&store);
        }
        check(&reopen(dir.path()).unwrap());
    }

    /// Question 2 from rollups (runs, unrun blocks) and records (the open
    /// block, the blocks at a window's edges) equals the answer from a full
    /// scan, for each kind of device key, before and after reopening.
    #[test]
    fn services_from_rollups_equal_services_from_a_scan() {
        let dir = tempfile::tempdir().unwrap();
        let mut records = samples(TEST_BLOCK_RECORDS as u64 * (2 * RUN_BLOCKS as u64 + 3) + 30);
        // Devices known by IP or subscriber only, and one whose IP another
        // device also had: their rows come through the rollups' aliases.
        for (i, record) in records.iter_mut().enumerate().filter(|(i, _)| i % 97 == 0) {
            record.device.mac = None;
            if i % 2 == 0 {
                record.device.ip = None;
            }
        }
        let check = |store: &Store| {
            {
                let days = store.lock().unwrap();
                let day = &days[&records[0].start.date_naive()];
                assert_eq!((day.runs, day.blocks.len(), day.open.len()), (2, 2 * RUN_BLOCKS as usize + 3, 30));
                let plan = day
                    .services_plan(
                        at("2026-11-22T00:00:00Z").timestamp_micros(),
                        at("2026-11-23T00:00:00Z").timestamp_micros(),
                        &IndexKey::Mac([2, 0, 0, 0, 9, 0x17]),
                    )
                    .unwrap();
                assert_eq!(
                    (plan.runs.len(), plan.pending, plan.decode.len()),
                    (2, true, 0),
                    "a whole day reads rollups only"
                );
            }
            let all = store.scan(records[0].start, records.last().unwrap().end).unwrap();
            let keys = [
                IndexKey::Mac([2, 0, 0, 0, 9, 0x17]),
                IndexKey::Mac([2, 0, 0, 0, 0, 0x17]),
                IndexKey::DeviceIp("10.0.1.11".parse().unwrap()),
                IndexKey::DeviceIp(records[97].device.ip.unwrap()),
                IndexKey::Subscriber("line-200".into()),
                IndexKey::Subscriber(records[194].device.subscriber.clone().unwrap()),
                IndexKey::Subscriber("nobody".into()),
            ];
            let windows = [
                (at("2026-11-22T00:00:00Z"), at("2026-11-22T23:59:59.999999Z")),
                (records[80].start, records[records.len() - 90].start),
                (records[5000].end, records[6000].start),
                (at("2026-11-21T00:00:00Z"), at("2026-11-23T00:00:00Z")),
            ];
            for key in &keys {
                let filter = index::KeyFilter::new(std::slice::from_ref(key));
                for (from, to) in windows {
                    let mut expected = Services::default();
                    for record in all.iter().filter(|r| r.end >= from && r.start <= to && filter.matches_record(r)) {
                        expected.add_record(record);
                    }
                    let expected = expected.into_sorted();
                    assert!(!expected.is_empty() || matches!(key, IndexKey::Subscriber(s) if s == "nobody"), "{key:?}");
                    assert_eq!(store.services(from, to, key).unwrap().into_sorted(), expected, "{key:?} {from} {to}");
                }
            }
        };
        {
            let store = reopen(dir.path()).unwrap();
            for chunk in records.chunks(1000) {
                store.append(chunk).unwrap();
            }
            check(&store);
        }
        check(&reopen(dir.path()).unwrap());
    }

    /// Rewrites a layout 2 store as layout 1 had it: version 1 blocks, short
    /// metas, no rollup pages, no marker. Blocks before `from_block` stay as
    /// they are: a migration that stopped after them.
    fn downgrade_to_layout_1(store: &Store, from_block: u32) {
        let db = &store.inner.db;
        for name in db.tree_names().into_iter().filter(|name| name.starts_with(DAY_PREFIX.as_bytes())) {
            let tree = db.open_tree(&name).unwrap();
            for entry in tree.scan_prefix([b'M']) {
                let (meta_key, meta) = entry.unwrap();
                let number = number_of(&meta_key).unwrap();
                if number < from_block {
                    continue;
                }
                let meta = BlockMeta::decode(&meta).unwrap();
                let mut old = [meta.min_start_us.to_be_bytes(), meta.max_end_us.to_be_bytes()].concat();
                old.extend_from_slice(&meta.records.to_be_bytes());
                meta.alive.iter().for_each(|word| old.extend_from_slice(&word.to_be_bytes()));
                assert_eq!(old.len(), migrate::V1_META_LEN);
                tree.insert(meta_key, old).unwrap();
                let records = codec::decode(&tree.get(key(b'B', number)).unwrap().unwrap()).unwrap();
                tree.insert(key(b'B', number), codec::encode_v1(&records, true).unwrap()).unwrap();
            }
            for entry in tree.scan_prefix([b'U']) {
                let (page_key, _) = entry.unwrap();
                if number_of(&page_key).unwrap() >= from_block / RUN_BLOCKS {
                    tree.remove(page_key).unwrap();
                }
            }
        }
        db.remove(LAYOUT_KEY).unwrap();
        db.flush().unwrap();
    }

    #[test]
    fn a_layout_1_store_is_moved_to_layout_2_when_opened_and_answers_the_same() {
        // What layout 1's blocks can hold: one DNS exchange, never local, no DNS origin of a name.
        let records: Vec<Icr> = samples(TEST_BLOCK_RECORDS as u64 * (2 * RUN_BLOCKS as u64 + 3) + 30)
            .into_iter()
            .map(|r| Icr {
                dns_all: r.dns.iter().cloned().collect(),
                local: false,
                service: r.service.map(|s| crate::record::Service { origin: None, ..s }),
                ..r
            })
            .collect();
        let window = (records[0].start, records.last().unwrap().end);
        let devices = [IndexKey::Mac([2, 0, 0, 0, 9, 0x17]), IndexKey::Subscriber("line-200".into())];
        let answers = |store: &Store| {
            let services: Vec<_> =
                devices.iter().map(|d| store.services(window.0, window.1, d).unwrap().into_sorted()).collect();
            (sorted(store.scan(window.0, window.1).unwrap()), services)
        };
        // Stopped after no run, and after the first run's batch.
        for from_block in [0, RUN_BLOCKS] {
            let dir = tempfile::tempdir().unwrap();
            let expected = {
                let store = reopen(dir.path()).unwrap();
                for chunk in records.chunks(1000) {
                    store.append(chunk).unwrap();
                }
                let expected = answers(&store);
                assert_eq!(expected.0, sorted(records.clone()));
                downgrade_to_layout_1(&store, from_block);
                expected
            };
            let store = reopen(dir.path()).unwrap();
            assert_eq!(answers(&store), expected, "the same answers after moving from block {from_block}");
            let db = &store.inner.db;
            assert_eq!(db.get(LAYOUT_KEY).unwrap().unwrap().as_ref(), LAYOUT.to_be_bytes());
            let tree = db.open_tree(day_name(records[0].start.date_naive())).unwrap();
            assert!(
                tree.scan_prefix([b'B']).all(|entry| entry.unwrap().1[0] != 1),
                "every block is rewritten in the current version"
            );
            for run in 0..2u32 {
                assert!(
                    tree.scan_prefix(&run_key(b'U', run, 0)[..5]).next().is_some(),
                    "run {run} has its rollup pages"
                );
            }
            let days = store.lock().unwrap();
            let day = &days[&records[0].start.date_naive()];
            let plan =
                day.services_plan(window.0.timestamp_micros(), window.1.timestamp_micros(), &devices[0]).unwrap();
            assert_eq!((plan.runs.len(), plan.pending), (2, true), "question 2 reads the new rollups");
        }
    }

    /// A day's log of three frames, 60 acknowledged records (fewer than a block holds) in its open
    /// block, and where each frame starts.
    fn store_with_three_frames(dir: &Path) -> (Vec<Icr>, PathBuf, [usize; 3]) {
        let records = samples(60);
        let store = reopen(dir).unwrap();
        let log = store.wal_path(records[0].start.date_naive());
        let mut starts = [0; 3];
        for (frame, chunk) in records.chunks(20).enumerate() {
            // The first append writes the log's header too: 12 bytes.
            starts[frame] = std::fs::metadata(&log).map_or(12, |m| m.len() as usize);
            store.append(chunk).unwrap();
        }
        (records, log, starts)
    }

    fn day_window(records: &[Icr]) -> (DateTime<Utc>, DateTime<Utc>) {
        day_bounds(records[0].start.date_naive())
    }

    #[test]
    fn a_damaged_log_frame_costs_its_records_only_is_kept_aside_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (records, log, starts) = store_with_three_frames(dir.path());
        let mut bytes = std::fs::read(&log).unwrap();
        bytes[starts[0] + 30] ^= 0x01; // a byte of the first frame's records
        std::fs::write(&log, &bytes).unwrap();
        let (from, to) = day_window(&records);

        // A question: the other frames' records, a gap for the day, and
        // nothing on disk changed.
        {
            let store = reopen_read_only(dir.path()).unwrap();
            assert_eq!(sorted(store.scan(from, to).unwrap()), sorted(records[20..].to_vec()));
            let gaps = store.gaps(from, to).unwrap();
            assert_eq!(gaps.len(), 1, "{gaps:?}");
            assert_eq!(gaps[0].kind, LossKind::StoreCorruption);
            assert_eq!(gaps[0].count, (starts[1] - starts[0]) as u64, "the damaged frame's bytes");
            assert!(store.append(&records[..1]).is_err(), "read-only");
        }
        assert_eq!(std::fs::read(&log).unwrap(), bytes, "a question changes no byte of the log");
        assert!(!dir.path().join("open-blocks").join(QUARANTINE_DIR).exists());

        // The agent's open: the damaged frame kept aside as it was, the log
        // rewritten with the good frames, the gap recorded.
        {
            let store = reopen(dir.path()).unwrap();
            assert_eq!(sorted(store.scan(from, to).unwrap()), sorted(records[20..].to_vec()));
            assert_eq!(store.gaps(from, to).unwrap().len(), 1);
        }
        let quarantine = dir.path().join("open-blocks").join(QUARANTINE_DIR);
        let kept: Vec<_> = std::fs::read_dir(&quarantine).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(std::fs::read(&kept[0]).unwrap(), bytes[starts[0]..starts[1]], "byte for byte");
        let store = reopen_read_only(dir.path()).unwrap();
        let gaps = store.gaps(from, to).unwrap();
        assert_eq!(gaps.len(), 1, "recorded once, found again after the repair: {gaps:?}");
        assert_eq!(sorted(store.scan(from, to).unwrap()), sorted(records[20..].to_vec()));
        drop(store);
        // Damaged again at the same place after the repair: kept beside the first.
        let mut again = std::fs::read(&log).unwrap();
        again[starts[0] + 30] ^= 0x01;
        std::fs::write(&log, &again).unwrap();
        drop(reopen(dir.path()).unwrap());
        assert_eq!(std::fs::read_dir(&quarantine).unwrap().count(), 2, "the first file is not overwritten");
        assert_eq!(std::fs::read(&kept[0]).unwrap(), bytes[starts[0]..starts[1]]);
    }

    #[test]
    fn a_flipped_byte_in_a_large_batch_costs_at_most_a_thousand_records() {
        // One append of 5,000 records, fewer than a block holds: all of
        // them in the day's log, as `icr replay` leaves a day.
        fn open_large(dir: &Path) -> Result<Store, OpenError> {
            Store::open_with(dir, false, 2 * BLOCK_RECORDS)
        }
        let dir = tempfile::tempdir().unwrap();
        let records = samples(5000);
        let log = {
            let store = test_records::reopen_with(dir.path(), open_large).unwrap();
            store.append(&records).unwrap();
            store.wal_path(records[0].start.date_naive())
        };
        let mut bytes = std::fs::read(&log).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x20;
        std::fs::write(&log, &bytes).unwrap();
        let (from, to) = day_window(&records);
        let store = test_records::reopen_with(dir.path(), open_large).unwrap();
        let read = store.scan(from, to).unwrap();
        assert!(read.len() >= 4000, "{} of 5000 records readable", read.len());
        assert!(read.iter().all(|record| records.contains(record)), "none altered");
        let gaps = store.gaps(from, to).unwrap();
        assert_eq!(gaps.len(), 1, "{gaps:?}");
        assert_eq!(gaps[0].kind, LossKind::StoreCorruption);
        assert!(gaps[0].count <= 8 + (64 << 10), "at most one bounded frame's bytes: {}", gaps[0].count);
    }

    #[test]
    fn a_frame_claiming_two_gigabytes_costs_its_records_only() {
        let dir = tempfile::tempdir().unwrap();
        let (records, log, starts) = store_with_three_frames(dir.path());
        let mut bytes = std::fs::read(&log).unwrap();
        bytes[starts[1]..starts[1] + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        std::fs::write(&log, &bytes).unwrap();
        let (from, to) = day_window(&records);
        let store = reopen(dir.path()).unwrap();
        let expected = [&records[..20], &records[40..]].concat();
        assert_eq!(sorted(store.scan(from, to).unwrap()), sorted(expected));
        assert_eq!(store.gaps(from, to).unwrap()[0].kind, LossKind::StoreCorruption);
    }

    #[test]
    fn a_torn_last_frame_is_set_aside_without_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let (records, log, starts) = store_with_three_frames(dir.path());
        let bytes = std::fs::read(&log).unwrap();
        std::fs::write(&log, &bytes[..bytes.len() - 7]).unwrap(); // an append a crash cut short
        let (from, to) = day_window(&records);
        let store = reopen(dir.path()).unwrap();
        assert_eq!(sorted(store.scan(from, to).unwrap()), sorted(records[..40].to_vec()));
        assert!(store.gaps(from, to).unwrap().is_empty(), "never acknowledged: no loss");
        let quarantine = dir.path().join("open-blocks").join(QUARANTINE_DIR);
        let kept: Vec<_> = std::fs::read_dir(&quarantine).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(std::fs::read(&kept[0]).unwrap(), bytes[starts[2]..bytes.len() - 7], "kept aside all the same");
    }

    #[test]
    fn one_damaged_day_does_not_stop_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let (records, _, _) = store_with_three_frames(dir.path());
        let other_day = dir.path().join("open-blocks").join("2026-11-20.log");
        std::fs::write(&other_day, b"").unwrap();
        let third_day = dir.path().join("open-blocks").join("2026-11-19.log");
        std::fs::write(&third_day, b"XCRWAL1\n\0\0\0\0garbage").unwrap();
        let (from, to) = day_window(&records);
        for open in [reopen_read_only, reopen] {
            let store = open(dir.path()).unwrap();
            assert_eq!(sorted(store.scan(from, to).unwrap()), sorted(records.clone()), "the good day answers");
            let damaged = store.gaps(at("2026-11-19T00:00:00Z"), at("2026-11-20T23:59:59Z")).unwrap();
            assert_eq!(damaged.iter().filter(|g| g.kind == LossKind::StoreCorruption).count(), 2, "{damaged:?}");
            drop(store);
        }
    }

    #[test]
    fn a_store_of_a_newer_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = reopen(dir.path()).unwrap();
            store.append(&samples(10)).unwrap();
            store.inner.db.insert(LAYOUT_KEY, &3u32.to_be_bytes()).unwrap();
            store.inner.db.flush().unwrap();
        }
        let error = reopen(dir.path()).err().expect("refused").to_string();
        assert!(error.contains("layout 3") && error.contains("newer"), "{error}");
    }

    #[test]
    fn a_crash_between_sealing_and_rewriting_the_log_counts_no_record_twice() {
        let dir = tempfile::tempdir().unwrap();
        let records = samples(TEST_BLOCK_RECORDS as u64 + 10);
        let log = dir.path().join("open-blocks").join("2026-11-22.log");
        {
            let store = reopen(dir.path()).unwrap();
            store.append(&records[..TEST_BLOCK_RECORDS - 5]).unwrap();
        }
        // The log as it was before the block sealed.
        let before = std::fs::read(&log).unwrap();
        {
            let store = reopen(dir.path()).unwrap();
            store.append(&records[TEST_BLOCK_RECORDS - 5..]).unwrap();
        }
        // Put back the old log plus a frame of the last records: as if the
        // crash came after the block was flushed but before the rewrite.
        let mut wal = {
            std::fs::write(&log, &before).unwrap();
            Wal::reopen(&log).unwrap()
        };
        wal.append(&records[TEST_BLOCK_RECORDS - 5..]).unwrap();
        drop(wal);
        let store = reopen(dir.path()).unwrap();
        let all = store.scan(records[0].start, records.last().unwrap().end).unwrap();
        assert_eq!(sorted(all), sorted(records));
    }

    #[test]
    fn a_retried_append_after_one_day_failed_keeps_every_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = RecordIds::default();
        let earlier = sample_at(0, at("2026-11-21T23:59:00Z"), &mut ids);
        let batch = vec![
            sample_at(1, at("2026-11-21T23:59:30Z"), &mut ids),
            sample_at(2, at("2026-11-22T00:00:10Z"), &mut ids),
        ];
        let store = reopen(dir.path()).unwrap();
        store.append(std::slice::from_ref(&earlier)).unwrap();
        // The second day's log cannot be created (as on a full disk) after
        // the first day's took its record.
        let blocker = dir.path().join("open-blocks/2026-11-22.tmp");
        std::fs::create_dir(&blocker).unwrap();
        assert!(store.append(&batch).is_err());
        std::fs::remove_dir(&blocker).unwrap();
        store.append(&batch).unwrap();
        let everything = (at("2026-11-20T00:00:00Z"), at("2026-11-23T00:00:00Z"));
        let expected = sorted(vec![earlier, batch[0].clone(), batch[1].clone()]);
        assert_eq!(store.scan(everything.0, everything.1).unwrap(), expected);
        drop(store);
        assert_eq!(
            reopen(dir.path()).unwrap().scan(everything.0, everything.1).unwrap(),
            expected,
            "and after reopening"
        );
    }

    #[test]
    fn sweep_drops_expired_days_with_their_indexes_and_open_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = RecordIds::default();
        let old: Vec<Icr> =
            (0..TEST_BLOCK_RECORDS as u64 + 1).map(|i| sample_at(i, at("2025-11-01T10:00:00Z"), &mut ids)).collect();
        let recent = sample_at(1, at("2026-11-20T10:00:00Z"), &mut ids);
        {
            let store = reopen(dir.path()).unwrap();
            store.append(&old).unwrap();
            store.append(std::slice::from_ref(&recent)).unwrap();
        }
        let store = reopen(dir.path()).unwrap();
        let everything = (at("2025-01-01T00:00:00Z"), at("2026-12-31T00:00:00Z"));
        assert_eq!(store.scan(everything.0, everything.1).unwrap().len(), old.len() + 1);
        // The clock moved: a year and a day later, retention 365 days.
        let dropped = store.sweep(365, at("2026-11-02T00:00:00Z")).unwrap();
        assert_eq!(dropped, vec![NaiveDate::from_ymd_opt(2025, 11, 1).unwrap()]);
        let key = [IndexKey::Subscriber("line-3".into())];
        let check = |store: &Store| {
            assert_eq!(store.scan(everything.0, everything.1).unwrap(), vec![recent.clone()]);
            assert!(store.find(everything.0, everything.1, Lookup::Any(&key)).unwrap().is_empty());
            assert!(!dir.path().join("open-blocks/2025-11-01.log").exists());
        };
        check(&store);
        drop(store);
        check(&reopen(dir.path()).unwrap());
    }

    #[test]
    fn records_of_the_json_layout_move_into_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let records = samples(20);
        {
            let db = sled::open(dir.path().join("records")).unwrap();
            let tree = db.open_tree("icr/2026-11-22").unwrap();
            for r in &records {
                tree.insert(r.id.as_bytes(), serde_json::to_vec(r).unwrap()).unwrap();
            }
            db.flush().unwrap();
        }
        let store = reopen(dir.path()).unwrap();
        assert_eq!(sorted(store.scan(records[0].start, records[19].end).unwrap()), sorted(records));
        assert_eq!(store.days().unwrap().len(), 1);
    }
}
