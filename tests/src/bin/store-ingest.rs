//! The store crash test's writer: appends synthetic ICRs to a store in
//! batches, like the agent's writer, and prints each record's id only once
//! `Store::append` has returned for it, the moment the agent would count
//! it stored. The test kills it at random moments and checks that every id
//! printed survives, once.
//!
//! Usage: store-ingest DIR SEED BATCHES BATCH_SIZE [DAYS_AGO]
//! (records start DAYS_AGO days before now, default 1)
use std::io::Write as _;

use anyhow::{Context as _, Result};
// The store bench's generator: one definition of a realistic ICR stream.
use icr_test_kit::synthetic::{Generator, Options};

use icr::store::Store;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (dir, seed, batches, size, days_ago) = match args.as_slice() {
        [_, dir, seed, batches, size] => (dir, seed, batches, size, 1),
        [_, dir, seed, batches, size, days_ago] => (dir, seed, batches, size, days_ago.parse()?),
        _ => anyhow::bail!("usage: store-ingest DIR SEED BATCHES BATCH_SIZE [DAYS_AGO]"),
    };
    // Relative to now: retention applies to what the store holds.
    let start = chrono::Utc::now() - chrono::Duration::days(days_ago);
    let store = Store::open(dir.as_ref()).with_context(|| format!("opening the store {dir}"))?;
    let mut generator = Generator::new(seed.parse()?, Options { per_second: 20_000.0, start, ..Options::default() });
    let mut out = std::io::stdout().lock();
    for _ in 0..batches.parse::<u32>()? {
        let batch: Vec<_> = (0..size.parse::<u32>()?).map(|_| generator.next_record()).collect();
        store.append(&batch)?;
        let mut acknowledged = String::with_capacity(batch.len() * 37);
        for record in &batch {
            acknowledged.push_str(&record.id);
            acknowledged.push('\n');
        }
        out.write_all(acknowledged.as_bytes())?;
        out.flush()?;
    }
    Ok(())
}
