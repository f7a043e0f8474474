//! The shipper: moves the store's outbox to the cluster, oldest first, and
//! forgets an entry only once the cluster holds it. While the cluster is out
//! of reach the outbox grows (the `export_backlog_records` metric) and
//! nothing is lost; it catches up when the cluster returns.
use std::time::Duration;

use anyhow::{Context as _, Result};
use log::{info, warn};

use super::{
    ClickHouse,
    rows::{GapRow, RecordRow},
};
use crate::store::{Store, outbox::Spooled};

/// Entries shipped in one insert (each is one tick's records, or gaps).
const BATCH_ENTRIES: usize = 64;
/// How often an idle shipper looks at the outbox.
const IDLE: Duration = Duration::from_millis(500);
/// Waits after a failed insert: doubled up to the last.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Ships until the agent stops. `probe` names this gateway on its gap rows.
pub async fn run(store: Store, cluster: ClickHouse, probe: String) {
    let mut retry = RETRY_FIRST;
    let mut failing = false;
    loop {
        match ship_batch(&store, &cluster, &probe).await {
            Ok(0) => tokio::time::sleep(IDLE).await,
            Ok(shipped) => {
                if failing {
                    info!("shipping to {} again: {shipped} records in the first batch", cluster.url());
                }
                failing = false;
                retry = RETRY_FIRST;
            }
            Err(error) => {
                if !failing {
                    warn!("shipping to {} failed, the outbox keeps everything: {error:#}", cluster.url());
                }
                failing = true;
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Ships the oldest entries; returns how many records went, and at least 1
/// when only gap entries did (0: nothing to do).
pub async fn ship_batch(store: &Store, cluster: &ClickHouse, probe: &str) -> Result<usize> {
    let entries = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.outbox_peek(BATCH_ENTRIES)).await??
    };
    let Some(&(last, _)) = entries.last() else { return Ok(0) };
    let (mut records, mut gaps) = (Vec::new(), Vec::new());
    for (key, entry) in entries {
        match entry {
            Ok(Spooled::Records(batch)) => {
                for record in &batch {
                    records.push(RecordRow::of(record).with_context(|| format!("record {}", record.id))?);
                }
            }
            Ok(Spooled::Gaps(batch)) => {
                for gap in &batch {
                    gaps.push(GapRow::of(gap, probe)?);
                }
            }
            // Damage in the outbox cannot be shipped, and must not stop what
            // follows: the records are still in the store.
            Err(error) => {
                warn!("outbox entry {key} is damaged and is skipped (its records stay in the store): {error:#}")
            }
        }
    }
    if !records.is_empty() {
        cluster.insert_records(&records).await?;
    }
    if !gaps.is_empty() {
        cluster.insert_gaps(&gaps).await?;
    }
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.outbox_remove_through(last)).await??;
    Ok(records.len().max(1))
}
