//! A gateway without capture, for the many-gateways lab: its own store and
//! probe id, fed synthetic ICRs (the store bench's generator) in ticks as
//! the agent's writer feeds it, and shipped by the agent's own shipper
//! (outbox, batches, retries) to the cluster its configuration names. It
//! exits 0 once every record is appended and the outbox is empty, and
//! fails if that takes longer than the deadline.
//!
//! Usage: gateway-ship DIR SEED TICKS RECORDS_A_TICK
//! (DIR/icr.toml gives `probe_id`, `retention_days` and `[clickhouse]`;
//! a tick every 500 ms; records close in the minutes before now)
use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
// The store bench's generator: one definition of a realistic ICR stream.
use icr_test_kit::synthetic::{Generator, Options};

use icr::{config::Config, export::clickhouse::ClickHouse, store::Store};

const TICK: Duration = Duration::from_millis(500);
/// Longest it may take, after the last tick, for the outbox to empty (the
/// shipper's retries wait up to 30 s after a failure).
const DRAIN_DEADLINE: Duration = Duration::from_secs(120);

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    // The shipper's own lines (a failed insert, shipping again), as the agent logs them.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,clickhouse=warn")).init();
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, seed, ticks, per_tick] = args.as_slice() else {
        bail!("usage: gateway-ship DIR SEED TICKS RECORDS_A_TICK");
    };
    let dir = Path::new(dir);
    let config = Config::read(&dir.join("icr.toml"))?;
    let section = config.clickhouse.as_ref().context("the configuration has no [clickhouse]")?;
    let probe = config.probe_id();
    let store = Store::open(dir).with_context(|| format!("opening the store {}", dir.display()))?;
    store.set_retention_days(config.retention_days);
    let cluster = ClickHouse::new(section, Some(dir))?;
    // As the agent does: spooled from the first append on.
    store.enable_outbox()?;
    tokio::spawn(icr::export::clickhouse::ship::run(store.clone(), cluster, probe.clone()));

    let (ticks, per_tick): (u32, u32) = (ticks.parse()?, per_tick.parse()?);
    // Records close over the 10 minutes before now: within any window of
    // today, and never in the future.
    let span_s = 600.0;
    let start = chrono::Utc::now() - chrono::Duration::seconds(span_s as i64 + 60);
    let per_second = f64::from(ticks * per_tick) / span_s;
    let mut generator = Generator::new(seed.parse()?, Options { per_second, start, ..Options::default() });
    for _ in 0..ticks {
        let batch: Vec<_> = (0..per_tick)
            .map(|_| {
                let mut record = generator.next_record();
                record.probe = Some(probe.clone());
                record
            })
            .collect();
        let writer = store.clone();
        tokio::task::spawn_blocking(move || writer.append(&batch)).await??;
        tokio::time::sleep(TICK).await;
    }
    let deadline = tokio::time::Instant::now() + DRAIN_DEADLINE;
    while store.outbox_backlog() > 0 {
        if tokio::time::Instant::now() > deadline {
            bail!("{probe}: {} records still unshipped after {DRAIN_DEADLINE:?}", store.outbox_backlog());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("{probe}: {} records appended and shipped", ticks * per_tick);
    Ok(())
}
