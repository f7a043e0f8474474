//! The outbox: what this gateway has still to ship to the provider's
//! cluster (`export::clickhouse::ship`). With shipping on, every append
//! and every gap entry is also spooled here, durably, before the store
//! acknowledges it; the shipper removes entries once the cluster holds
//! them. The outbox's first key is the shipping cursor: it survives
//! restarts, and a cluster out of reach for hours only makes it longer.
use std::sync::atomic::Ordering;

use anyhow::{Context as _, Result, bail};

use super::{Store, codec, gaps::Gap};
use crate::record::Icr;

const OUTBOX_TREE: &str = "outbox";
const RECORDS: u8 = 1;
const GAPS: u8 = 2;
/// An entry: its kind, its record count (big-endian u32, so the backlog is
/// counted without decoding), then the records' block or the gaps' JSON.
const HEADER: usize = 5;

/// One spooled entry, decoded.
#[derive(Clone, Debug, PartialEq)]
pub enum Spooled {
    Records(Vec<Icr>),
    Gaps(Vec<Gap>),
}

impl Spooled {
    fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < HEADER {
            bail!("an outbox entry of {} bytes", bytes.len());
        }
        match bytes[0] {
            RECORDS => Ok(Self::Records(codec::decode(&bytes[HEADER..])?)),
            GAPS => Ok(Self::Gaps(serde_json::from_slice(&bytes[HEADER..])?)),
            other => bail!("an outbox entry of unknown kind {other}"),
        }
    }
}

/// The records an entry holds, from its header alone.
fn records_in(bytes: &[u8]) -> u64 {
    bytes.get(1..HEADER).map_or(0, |count| u64::from(u32::from_be_bytes(count.try_into().expect("four bytes"))))
}

impl Store {
    /// Spools every later append and gap entry for shipping. Counts what the
    /// outbox holds already (left by an earlier run).
    pub fn enable_outbox(&self) -> Result<()> {
        let mut records = 0;
        for entry in self.outbox_tree()?.iter() {
            let (_, value) = entry.context("reading the outbox")?;
            records += records_in(&value);
        }
        self.inner.outbox_records.store(records, Ordering::Relaxed);
        self.inner.outbox.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether shipping is on.
    pub fn is_spooling(&self) -> bool {
        self.inner.outbox.load(Ordering::Acquire)
    }

    /// Spools `records` (one block, as the store keeps them).
    pub(super) fn spool_records(&self, records: &[Icr]) -> Result<()> {
        let count = u32::try_from(records.len()).context("an append of more than 4 billion records")?;
        self.spool(RECORDS, count, codec::encode(records, true)?)
    }

    pub(super) fn spool_gaps(&self, gaps: &[Gap]) -> Result<()> {
        self.spool(GAPS, 0, serde_json::to_vec(gaps)?)
    }

    /// Writes an entry to the outbox, durably.
    fn spool(&self, kind: u8, records: u32, payload: Vec<u8>) -> Result<()> {
        let mut entry = Vec::with_capacity(HEADER + payload.len());
        entry.push(kind);
        entry.extend_from_slice(&records.to_be_bytes());
        entry.extend_from_slice(&payload);
        // Monotonic across restarts: keys sort in the order things were spooled.
        let key = self.inner.db.generate_id().context("numbering an outbox entry")?;
        self.outbox_tree()?.insert(key.to_be_bytes(), entry).context("writing to the outbox")?;
        self.inner.db.flush().context("flushing the outbox")?;
        self.inner.outbox_records.fetch_add(u64::from(records), Ordering::Relaxed);
        Ok(())
    }

    /// The oldest `max` entries, with their keys. An entry that no longer
    /// decodes is returned as an error with its key, so it can be set aside.
    pub fn outbox_peek(&self, max: usize) -> Result<Vec<(u64, Result<Spooled>)>> {
        let mut entries = Vec::new();
        for entry in self.outbox_tree()?.iter().take(max) {
            let (key, value) = entry.context("reading the outbox")?;
            let key = u64::from_be_bytes(key.as_ref().try_into().context("an outbox key")?);
            entries.push((key, Spooled::decode(&value)));
        }
        Ok(entries)
    }

    /// Forgets the entries up to `last` (shipped), durably.
    pub fn outbox_remove_through(&self, last: u64) -> Result<()> {
        let tree = self.outbox_tree()?;
        let mut removed = 0;
        for entry in tree.range(..=last.to_be_bytes()) {
            let (key, value) = entry.context("reading the outbox")?;
            removed += records_in(&value);
            tree.remove(key).context("removing a shipped outbox entry")?;
        }
        self.inner.db.flush().context("flushing the outbox")?;
        let _ = self
            .inner
            .outbox_records
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(removed)));
        Ok(())
    }

    /// Records waiting to be shipped.
    pub fn outbox_backlog(&self) -> u64 {
        self.inner.outbox_records.load(Ordering::Relaxed)
    }

    fn outbox_tree(&self) -> Result<sled::Tree> {
        self.inner.db.open_tree(OUTBOX_TREE).context("opening the outbox")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{gaps::LossKind, test_records};

    #[test]
    fn appends_and_gaps_are_spooled_in_order_until_shipped_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let records = test_records::samples(100);
        {
            let store = test_records::open(dir.path()).unwrap();
            store.append(&records[..10]).unwrap();
            assert!(store.outbox_peek(10).unwrap().is_empty(), "nothing spooled before shipping is on");
            store.enable_outbox().unwrap();
            store.append(&records[10..60]).unwrap();
            let gap = Gap::new(LossKind::EventBufferFull, records[0].start, records[1].start, 3);
            store.record_gaps(std::slice::from_ref(&gap), None).unwrap();
            store.append(&records[60..]).unwrap();
            assert_eq!(store.outbox_backlog(), 90);
            let entries = store.outbox_peek(10).unwrap();
            let kinds: Vec<Spooled> = entries.into_iter().map(|(_, e)| e.unwrap()).collect();
            assert_eq!(
                kinds,
                vec![
                    Spooled::Records(records[10..60].to_vec()),
                    Spooled::Gaps(vec![gap]),
                    Spooled::Records(records[60..].to_vec())
                ]
            );
        }
        let store = test_records::reopen(dir.path()).unwrap();
        store.enable_outbox().unwrap();
        assert_eq!(store.outbox_backlog(), 90, "counted again after a restart");
        let first = store.outbox_peek(1).unwrap()[0].0;
        store.outbox_remove_through(first).unwrap();
        assert_eq!(store.outbox_backlog(), 40);
        let rest: Vec<u64> = store.outbox_peek(10).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(rest.len(), 2);
        assert!(rest.iter().all(|k| *k > first));
    }
}
