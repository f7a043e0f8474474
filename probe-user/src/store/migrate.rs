//! Which layout a store has, and bringing an older one to the current
//! layout when it is opened: an upgraded agent keeps its records.
//!
//! Layout 1 had block metas without the bounds that tell whether a block
//! lies wholly inside a window, blocks in codec version 1 (columns
//! compressed together) and no rollup pages. Layout 2 rewrites each block
//! with its meta, and writes each complete run's rollup pages in the same
//! batch as its blocks, one run at a time: a migration stopped part way
//! (a crash, a full disk) leaves every run either old or new, whole, and
//! the next open goes on from the first old one. The layout marker is
//! written last. Open-block logs need nothing: their frames carry their
//! codec version, and version 1 is still read.
use std::path::Path;

use anyhow::{Context as _, Result, anyhow, bail};
use chrono::NaiveDate;
use log::info;

use super::{
    codec,
    layout::{BlockMeta, DAY_PREFIX, LAYOUT, LAYOUT_KEY, MINUTE_WORDS, key, run_key},
    rollup,
};
use crate::store::{index::RUN_BLOCKS, rollup::Rollup};

/// A layout 1 block meta: start and end bounds, record count, minutes alive.
pub(super) const V1_META_LEN: usize = 20 + MINUTE_WORDS * 8;

/// Brings the store to [`LAYOUT`], or refuses one it does not know (written
/// by a newer icr); marks a new store.
pub(super) fn to_current_layout(db: &sled::Db, path: &Path) -> Result<()> {
    let found = match db.get(LAYOUT_KEY).context("reading the store's layout")? {
        Some(value) => {
            u32::from_be_bytes(value.as_ref().try_into().map_err(|_| anyhow!("the store's layout marker is damaged"))?)
        }
        // Day partitions without a marker: layout 1 predates the marker.
        None if day_trees(db).next().is_some() => 1,
        None => LAYOUT,
    };
    match found {
        LAYOUT => {}
        1 => {
            info!("the store {} has layout 1: moving it to layout {LAYOUT} (rollups for question 2)", path.display());
            for name in day_trees(db) {
                from_layout_1(db, &name)
                    .with_context(|| format!("moving {} to layout {LAYOUT}", String::from_utf8_lossy(&name)))?;
            }
        }
        other => bail!(
            "the store {} has layout {other}, newer than this icr reads (layout {LAYOUT}): use the icr that wrote it",
            path.display()
        ),
    }
    db.insert(LAYOUT_KEY, &LAYOUT.to_be_bytes()).context("marking the store's layout")?;
    db.flush().context("marking the store's layout")?;
    Ok(())
}

fn day_trees(db: &sled::Db) -> impl Iterator<Item = sled::IVec> {
    db.tree_names().into_iter().filter(|name| name.starts_with(DAY_PREFIX.as_bytes()))
}

/// Rewrites one day partition's blocks, metas and run rollups, one run (or
/// the blocks after the last run) per batch.
fn from_layout_1(db: &sled::Db, name: &[u8]) -> Result<()> {
    let date: NaiveDate = std::str::from_utf8(&name[DAY_PREFIX.len()..])
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| anyhow!("a day partition with a bad name"))?;
    let day_start_us = date.and_hms_opt(0, 0, 0).expect("midnight").and_utc().timestamp_micros();
    let tree = db.open_tree(name).context("opening a day partition")?;
    let blocks = tree.scan_prefix([b'M']).count() as u32;
    let runs = tree.scan_prefix([b'R']).count() as u32;
    let mut moved = 0u32;
    for first in (0..blocks).step_by(RUN_BLOCKS as usize) {
        let numbers = first..(first + RUN_BLOCKS).min(blocks);
        let meta = tree
            .get(key(b'M', first))
            .context("reading a block meta")?
            .ok_or_else(|| anyhow!("block {first}'s meta is missing"))?;
        match meta.len() {
            BlockMeta::LEN => continue, // moved before an earlier migration stopped
            V1_META_LEN => {}
            other => bail!("block {first}'s meta is {other} bytes, neither layout 1 nor {LAYOUT}"),
        }
        let run = first / RUN_BLOCKS;
        let complete = run < runs;
        let mut rollup = Rollup::default();
        let mut batch = sled::Batch::default();
        for number in numbers.clone() {
            let block = tree
                .get(key(b'B', number))
                .context("reading a block")?
                .ok_or_else(|| anyhow!("block {number} is missing"))?;
            let records = codec::decode(&block).with_context(|| format!("decoding block {number}"))?;
            batch.insert(&key(b'B', number), codec::encode(&records, true)?);
            batch.insert(&key(b'M', number), BlockMeta::of(&records, day_start_us).encode());
            if complete {
                rollup.add_records(&records);
            }
        }
        // Blocks not yet in a run have their rollup rebuilt in memory when
        // the day is loaded, as in layout 2.
        if complete {
            for (first_print, page) in rollup.pages(rollup::RUN_PAGE_BYTES)? {
                batch.insert(&run_key(b'U', run, first_print), page);
            }
        }
        tree.apply_batch(batch).with_context(|| format!("writing blocks {numbers:?}"))?;
        moved += numbers.len() as u32;
    }
    tree.flush().context("flushing a day partition")?;
    info!("{date}: {moved} of {blocks} blocks moved to layout {LAYOUT}");
    Ok(())
}
