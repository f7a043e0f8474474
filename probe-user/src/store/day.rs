//! One UTC day of the store, as far as it is loaded: its sealed blocks'
//! metas, its index runs and the rollups not yet written as runs, and the
//! open block; sealing blocks, building runs, and finding the blocks a
//! question reads.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, Result, anyhow, bail};
use chrono::NaiveDate;

use super::{
    codec,
    index::{self, IndexKey, Lookup, RUN_BLOCKS},
    layout::{BlockMeta, key, number_of, page_key, run_key},
    rollup::{self, Rollup},
    wal::Wal,
};
use crate::record::Icr;

/// Where question 2's answer for one day comes from.
#[derive(Default)]
pub(super) struct Plan {
    /// Runs answered by their rollup.
    pub(super) runs: Vec<u32>,
    /// Whether the unrun blocks are answered by their rollup.
    pub(super) pending: bool,
    /// Blocks whose records are read.
    pub(super) decode: Vec<u32>,
}

/// One day partition, as far as it is loaded.
pub(super) struct Day {
    pub(super) tree: sled::Tree,
    /// Midnight UTC starting the day, µs.
    pub(super) start_us: i64,
    pub(super) blocks: Vec<BlockMeta>,
    /// Runs built: run `r` covers blocks `r*64 .. r*64+64`.
    pub(super) runs: u32,
    /// Fingerprints of the sealed blocks not yet in a run, by block number.
    pub(super) unrun: BTreeMap<u32, Vec<u32>>,
    /// The rollup of the same blocks, by run: kept in memory, not in sled,
    /// until the run is built (then written once, as its pages), and rebuilt
    /// from the blocks when the day is loaded.
    pub(super) pending: BTreeMap<u32, Rollup>,
    /// The open block: acknowledged records, also in `wal`.
    pub(super) open: Vec<Icr>,
    pub(super) wal: Option<Wal>,
}

impl Day {
    pub(super) fn load(tree: sled::Tree, date: NaiveDate) -> Result<Self> {
        let mut blocks = Vec::new();
        for entry in tree.scan_prefix([b'M']) {
            let (key, value) = entry.context("reading block metas")?;
            let number = number_of(&key)?;
            if number as usize != blocks.len() {
                bail!("block {number} follows {} blocks: the store is damaged", blocks.len());
            }
            blocks.push(BlockMeta::decode(&value)?);
        }
        let runs = tree.scan_prefix([b'R']).count() as u32;
        let mut unrun = BTreeMap::new();
        for entry in tree.scan_prefix([b'L']) {
            let (key, value) = entry.context("reading block fingerprints")?;
            unrun.insert(number_of(&key)?, index::decode_fingerprints(&value)?);
        }
        let mut pending = BTreeMap::<u32, Rollup>::new();
        for &number in unrun.keys() {
            let block = tree
                .get(key(b'B', number))
                .context("reading a block")?
                .ok_or_else(|| anyhow!("block {number} is missing"))?;
            let records = codec::decode(&block).with_context(|| format!("block {number}"))?;
            pending.entry(number / RUN_BLOCKS).or_default().add_records(&records);
        }
        let start_us = date.and_hms_opt(0, 0, 0).expect("midnight").and_utc().timestamp_micros();
        Ok(Self { tree, start_us, blocks, runs, unrun, pending, open: Vec::new(), wal: None })
    }

    /// Writes the first `count` open records as the next block, with its
    /// meta and fingerprints, in one atomic batch (made durable by the
    /// caller's flush); they leave the open block only once it is written.
    pub(super) fn seal_front(&mut self, count: usize) -> Result<()> {
        let records = &self.open[..count];
        let number = self.blocks.len() as u32;
        let meta = BlockMeta::of(records, self.start_us);
        let prints = index::block_fingerprints(records);
        let mut batch = sled::Batch::default();
        batch.insert(&key(b'B', number), codec::encode(records, true)?);
        batch.insert(&key(b'M', number), meta.encode());
        batch.insert(&key(b'L', number), index::encode_fingerprints(&prints));
        self.tree.apply_batch(batch).context("writing a block")?;
        self.blocks.push(meta);
        self.pending.entry(number / RUN_BLOCKS).or_default().add_records(records);
        self.unrun.insert(number, prints);
        self.open.drain(..count);
        Ok(())
    }

    /// Merges the fingerprints of every full set of 64 sealed blocks into a
    /// run, dropping the per-block lists in the same batch.
    pub(super) fn build_runs(&mut self) -> Result<()> {
        while self.blocks.len() as u32 >= (self.runs + 1) * RUN_BLOCKS {
            let run = self.runs;
            let numbers: Vec<u32> = (run * RUN_BLOCKS..(run + 1) * RUN_BLOCKS).collect();
            let lists: Vec<Vec<u32>> = numbers.iter().map(|n| self.unrun.get(n).cloned().unwrap_or_default()).collect();
            let mut batch = sled::Batch::default();
            for (first, page) in index::build_run(&lists) {
                batch.insert(&page_key(run, first), page);
            }
            let rollup =
                self.pending.get(&run).map(|r| r.pages(rollup::RUN_PAGE_BYTES)).transpose()?.unwrap_or_default();
            for (first, page) in rollup {
                batch.insert(&run_key(b'U', run, first), page);
            }
            for n in &numbers {
                batch.remove(&key(b'L', *n));
            }
            batch.insert(&key(b'R', run), &[]);
            self.tree.apply_batch(batch).context("writing an index run")?;
            for n in &numbers {
                self.unrun.remove(n);
            }
            self.pending.remove(&run);
            self.runs += 1;
        }
        Ok(())
    }

    /// How question 2 reads the window: the runs and unrun blocks whose
    /// every record is inside it answer from their rollups; the blocks at
    /// its edges that the index names for the device, from their records.
    pub(super) fn services_plan(&self, from_us: i64, to_us: i64, device: &IndexKey) -> Result<Plan> {
        let mut plan = Plan::default();
        let mut edges = BTreeSet::new();
        let overlapping = |n: u32| self.blocks[n as usize].overlaps(from_us, to_us, self.start_us);
        let within = |n: u32| self.blocks[n as usize].within(from_us, to_us);
        for run in 0..self.runs {
            let numbers = run * RUN_BLOCKS..(run + 1) * RUN_BLOCKS;
            if numbers.clone().all(within) {
                plan.runs.push(run);
            } else {
                edges.extend(numbers.filter(|&n| overlapping(n)));
            }
        }
        // The unrun blocks have one rollup between them.
        let unrun = self.runs * RUN_BLOCKS..self.blocks.len() as u32;
        if !unrun.is_empty() && unrun.clone().all(within) {
            plan.pending = true;
        } else {
            edges.extend(unrun.filter(|&n| overlapping(n)));
        }
        if !edges.is_empty() {
            plan.decode = self.candidates_among(edges, Lookup::Any(std::slice::from_ref(device)))?;
        }
        Ok(plan)
    }

    /// The sealed blocks that may hold records of the window with the keys.
    pub(super) fn candidates(&self, from_us: i64, to_us: i64, lookup: Lookup) -> Result<Vec<u32>> {
        let in_window: BTreeSet<u32> = (0..self.blocks.len() as u32)
            .filter(|&n| self.blocks[n as usize].overlaps(from_us, to_us, self.start_us))
            .collect();
        self.candidates_among(in_window, lookup)
    }

    /// Those of `in_window` that may hold records with the keys.
    pub(super) fn candidates_among(&self, in_window: BTreeSet<u32>, lookup: Lookup) -> Result<Vec<u32>> {
        let keys = match lookup {
            Lookup::All => return Ok(in_window.into_iter().collect()),
            Lookup::Any(keys) => keys,
        };
        let mut prints: Vec<u32> = keys.iter().map(IndexKey::fingerprint).collect();
        prints.sort_unstable();
        prints.dedup();
        let mut found = BTreeSet::new();
        let runs: BTreeSet<u32> = in_window.iter().map(|n| n / RUN_BLOCKS).filter(|r| *r < self.runs).collect();
        for run in runs {
            let mask = self.run_lookup(run, &prints)?;
            found.extend((0..RUN_BLOCKS).filter(|b| mask & (1 << b) != 0).map(|b| run * RUN_BLOCKS + b));
        }
        for (number, list) in self.unrun.range(self.runs * RUN_BLOCKS..) {
            if prints.iter().any(|p| list.binary_search(p).is_ok()) {
                found.insert(*number);
            }
        }
        Ok(found.intersection(&in_window).copied().collect())
    }

    /// The blocks of `run` (as a mask) holding any of the sorted `prints`:
    /// for each kind of key, the run's pages from the one holding the
    /// smallest fingerprint to the one holding the largest.
    pub(super) fn run_lookup(&self, run: u32, prints: &[u32]) -> Result<u64> {
        let mut mask = 0u64;
        let mut rest = prints;
        while let Some(&first) = rest.first() {
            let kind = IndexKey::kind_range(first);
            let count = rest.iter().take_while(|p| kind.contains(p)).count();
            let (group, tail) = rest.split_at(count);
            rest = tail;
            let last = *group.last().expect("not empty");
            // The page holding `first` starts at or before it.
            let start = match self.tree.range(page_key(run, 0)..=page_key(run, first)).next_back() {
                Some(entry) => entry.context("reading an index page")?.0,
                None => sled::IVec::from(&page_key(run, 0)),
            };
            let mut wanted = group.iter().peekable();
            for entry in self.tree.range(start..=sled::IVec::from(&page_key(run, last))) {
                let (page_key, page) = entry.context("reading an index page")?;
                let page_first =
                    u32::from_be_bytes(page_key.get(5..9).ok_or_else(|| anyhow!("a short page key"))?.try_into()?);
                for (print, blocks) in index::decode_page(page_first, &page)? {
                    while wanted.next_if(|w| **w < print).is_some() {}
                    if wanted.next_if(|w| **w == print).is_some() {
                        mask |= blocks;
                    }
                }
            }
        }
        Ok(mask)
    }
}
