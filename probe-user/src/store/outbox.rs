//! The outbox: what this gateway has still to ship to the provider's
//! cluster (`export::clickhouse::ship`). With shipping on, every append
//! and every gap entry is also spooled here, durably, before the store
//! acknowledges it; the shipper removes entries once the cluster holds
//! them. The outbox's first key is the shipping cursor: it survives
//! restarts, and a cluster out of reach for hours only makes it longer.
use std::sync::atomic::Ordering;

use anyhow::{Context as _, Result, bail};

use super::{Store, codec, gaps::Gap};
use crate::icr::Icr;

const OUTBOX_TREE: &str = "outbox";
const RECORDS: u8 = 1;
const GAPS: u8 = 2;

/// One spooled entry.
#[derive(Clone, Debug, PartialEq)]
pub enum Spooled {
    Records(Vec<Icr>),
    Gaps(Vec<Gap>),
}

impl Spooled {
    fn encode(&self) -> Result<Vec<u8>> {
        Ok(match self {
            Self::Records(records) => [vec![RECORDS], codec::encode(records, true)?].concat(),
            Self::Gaps(gaps) => [vec![GAPS], serde_json::to_vec(gaps)?].concat(),
        })
    }

    fn decode(bytes: &[u8]) -> Result<Self> {
        match bytes.split_first() {
            Some((&RECORDS, block)) => Ok(Self::Records(codec::decode(block)?)),
            Some((&GAPS, json)) => Ok(Self::Gaps(serde_json::from_slice(json)?)),
            _ => bail!("an outbox entry of unknown kind"),
        }
    }

    fn records(&self) -> u64 {
        match self {
            Self::Records(records) => records.len() as u64,
            Self::Gaps(_) => 0,
        }
    }
}

impl Store {
    /// Spools every later append and gap entry for shipping. Counts what the
    /// outbox holds already (left by an earlier run).
    pub fn enable_outbox(&self) -> Result<()> {
        let mut records = 0;
        for entry in self.outbox_tree()?.iter() {
            let (_, value) = entry.context("reading the outbox")?;
            records += Spooled::decode(&value).map_or(0, |spooled| spooled.records());
        }
        self.inner.outbox_records.store(records, Ordering::Relaxed);
        self.inner.outbox.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether shipping is on.
    pub fn is_spooling(&self) -> bool {
        self.inner.outbox.load(Ordering::Acquire)
    }

    /// Writes `spooled` to the outbox, durably.
    pub(super) fn spool(&self, spooled: &Spooled) -> Result<()> {
        let tree = self.outbox_tree()?;
        // Monotonic across restarts: keys sort in the order things were spooled.
        let key = self.inner.db.generate_id().context("numbering an outbox entry")?;
        tree.insert(key.to_be_bytes(), spooled.encode()?).context("writing to the outbox")?;
        self.inner.db.flush().context("flushing the outbox")?;
        self.inner.outbox_records.fetch_add(spooled.records(), Ordering::Relaxed);
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
            removed += Spooled::decode(&value).map_or(0, |spooled| spooled.records());
            tree.remove(key).context("removing a shipped outbox entry")?;
        }
        self.inner.db.flush().context("flushing the outbox")?;
        self.inner.outbox_records.fetch_sub(removed.min(self.outbox_backlog()), Ordering::Relaxed);
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
            assert_eq!(kinds, vec![Spooled::Records(records[10..60].to_vec()), Spooled::Gaps(vec![gap]), Spooled::Records(records[60..].to_vec())]);
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
