//! `cargo xtask bench store [--records N] [--backend clickhouse]`: the store
//! at ISP scale. Writes N synthetic ICRs (`icr_test_kit::synthetic`) through
//! `Store::append` on one thread, then asks the three questions many times
//! over the result, through the desk's `Backend`. Each rate is also given as
//! a ratio to this disk's raw sequential write speed, measured in the same
//! run. With `--backend clickhouse` the same records then go to a
//! `clickhouse-server` started here (one server, the tables `icr clickhouse
//! init` makes), in batches as the shipper sends them, and the same
//! questions are asked of it; the two are printed side by side. The last
//! line is one JSON object for scripts (the sled figures the line before).
use std::{
    io::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use chrono::{DateTime, Days, Utc};
use icr::{
    config::ClickHouseSection,
    export::clickhouse::{ClickHouse, rows::RecordRow},
    query::{Backend, DeviceSelector, LocalFilter, ServiceSelector, cluster::Cluster, questions},
    record::Icr,
    store::Store,
};
use icr_test_kit::{
    clickhouse::{self, Setup},
    synthetic::{Generator, Options},
};
use rand::{Rng as _, SeedableRng as _, rngs::SmallRng};

/// Records handed to `append` at once (the agent hands one tick's worth).
const BATCH: usize = 16_384;
const RESOLVE_QUERIES: usize = 1_000;
const DEVICE_QUERIES: usize = 100;
const NAME_QUERIES: usize = 3;

struct Args {
    records: u64,
    dir: PathBuf,
    per_second: f64,
    keep: bool,
    clickhouse: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        records: 10_000_000,
        dir: PathBuf::from(concat!(env!("CARGO_TARGET_TMPDIR"), "/bench-store")),
        per_second: 1_157.0,
        keep: false,
        clickhouse: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--records" => args.records = value()?.replace('_', "").parse().context("--records")?,
            "--dir" => args.dir = value()?.into(),
            "--per-second" => args.per_second = value()?.parse().context("--per-second")?,
            "--keep" => args.keep = true,
            "--backend" => match value()?.as_str() {
                "sled" => args.clickhouse = false,
                "clickhouse" => args.clickhouse = true,
                other => bail!("--backend {other}: sled or clickhouse"),
            },
            "--bench" => {}
            other => bail!(
                "unknown argument {other} (there is --records N, --dir DIR, --per-second R, --keep, --backend sled|clickhouse)"
            ),
        }
    }
    Ok(args)
}

/// Where the records go, and how its size on disk is read.
trait Target {
    fn append(&mut self, batch: &[Icr]) -> Result<()>;
    /// Writes what `append` may still hold.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
    fn bytes(&self) -> Result<u64>;
    fn backend(&self) -> &dyn Backend;
}

struct Sled(Store);

impl Target for Sled {
    fn append(&mut self, batch: &[Icr]) -> Result<()> {
        self.0.append(batch)
    }
    fn bytes(&self) -> Result<u64> {
        Ok(self.0.size_on_disk())
    }
    fn backend(&self) -> &dyn Backend {
        &self.0
    }
}

struct ClickHouseTarget {
    server: clickhouse::Server,
    clickhouse: ClickHouse,
    cluster: Cluster,
    runtime: tokio::runtime::Runtime,
    /// Records waiting for the next insert.
    pending: Vec<Icr>,
}

/// Records in one insert: what the shipper sends when it is behind (64
/// one-second ticks of a gateway closing ~1,000 connections a second).
const CLICKHOUSE_BATCH: usize = 65_536;
/// Gateways shipping to the one node at once, and the inserts each sends.
const SHIPPERS: usize = 6;
const SHIPPER_BATCHES: usize = 4;
/// How long the merge of one table's day may take.
const MERGE_WITHIN: Duration = Duration::from_secs(3600);

impl ClickHouseTarget {
    fn flush(&mut self) -> Result<()> {
        let rows = self
            .pending
            .drain(..)
            .map(|r| RecordRow::of(&r).map_err(anyhow::Error::from))
            .collect::<Result<Vec<_>>>()?;
        self.runtime.block_on(self.clickhouse.insert_records(&rows))
    }

    /// Every table merged to one part a day, as the background merges leave
    /// them in time.
    fn merge_all(&self) -> Result<()> {
        let parts = self
            .server
            .query("SELECT DISTINCT table, partition FROM system.parts WHERE database = 'icr' AND active FORMAT TSV")?;
        for line in parts.lines() {
            let (table, partition) = line.split_once('\t').context("table and partition")?;
            // A day partition, shown as YYYY-MM-DD (quoted by some releases).
            let day = partition.trim_matches('\'');
            // A day of 100M records takes minutes to merge on two cores.
            self.server.query_within(&format!("OPTIMIZE TABLE icr.{table} PARTITION '{day}' FINAL"), MERGE_WITHIN)?;
        }
        Ok(())
    }

    /// [`SHIPPERS`] gateways inserting at once, each its own records, probe
    /// id and connections, [`SHIPPER_BATCHES`] inserts of
    /// [`CLICKHOUSE_BATCH`] records each (made before, and turned into rows
    /// in the timed part, as [`Self::flush`] does): the records all of them
    /// ship a second.
    fn many_shippers(&self, options: &Options) -> Result<f64> {
        let records: Vec<Vec<Icr>> = (0..SHIPPERS)
            .map(|n| {
                let mut generator = Generator::new(100 + n as u64, options.clone());
                (0..SHIPPER_BATCHES * CLICKHOUSE_BATCH)
                    .map(|_| Icr { probe: Some(format!("gw-{n}")), ..generator.next_record() })
                    .collect()
            })
            .collect();
        let ready = std::sync::Barrier::new(SHIPPERS + 1);
        let (started, ended) = std::thread::scope(|scope| -> Result<(Instant, Vec<Instant>)> {
            let shippers: Vec<_> = records
                .iter()
                .map(|records| {
                    let (clickhouse, ready) = (self.clickhouse.with_own_connections(), &ready);
                    scope.spawn(move || -> Result<Instant> {
                        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                        ready.wait();
                        for batch in records.chunks(CLICKHOUSE_BATCH) {
                            let rows = batch.iter().map(RecordRow::of).collect::<Result<Vec<_>, _>>()?;
                            runtime.block_on(clickhouse.insert_records(&rows))?;
                        }
                        Ok(Instant::now())
                    })
                })
                .collect();
            ready.wait();
            let started = Instant::now();
            let ended = shippers
                .into_iter()
                .map(|s| s.join().map_err(|_| anyhow::anyhow!("a shipper panicked"))?)
                .collect::<Result<_>>()?;
            Ok((started, ended))
        })?;
        let last = ended.into_iter().max().context("no shipper")?;
        Ok((SHIPPERS * SHIPPER_BATCHES * CLICKHOUSE_BATCH) as f64 / (last - started).as_secs_f64())
    }

    /// Bytes on disk per ICR of each table, and of each column of it.
    fn breakdown(&self, records: u64) -> Result<()> {
        let per =
            |bytes: &str| -> Result<f64> { Ok(bytes.trim().parse::<f64>().context("a byte count")? / records as f64) };
        let tables = self.server.query(
            "SELECT table, sum(bytes_on_disk) AS b FROM system.parts WHERE database = 'icr' AND active \
             GROUP BY table ORDER BY b DESC FORMAT TSV",
        )?;
        let columns = self.server.query(
            "SELECT table, column, sum(column_data_compressed_bytes) AS b FROM system.parts_columns \
             WHERE database = 'icr' AND active GROUP BY table, column ORDER BY table, b DESC FORMAT TSV",
        )?;
        for line in tables.lines() {
            let (table, bytes) = line.split_once('\t').context("table and bytes")?;
            let listed: Vec<String> = columns
                .lines()
                .filter_map(|l| l.split('\t').collect::<Vec<_>>().try_into().ok())
                .filter(|[t, _, _]: &[&str; 3]| *t == table)
                .map(|[_, column, bytes]| Ok(format!("{column} {:.2}", per(bytes)?)))
                .collect::<Result<_>>()?;
            println!("  {table}: {:.2} bytes/ICR; by column: {}", per(bytes)?, listed.join(", "));
        }
        Ok(())
    }
}

impl Target for ClickHouseTarget {
    fn append(&mut self, batch: &[Icr]) -> Result<()> {
        self.pending.extend_from_slice(batch);
        if self.pending.len() >= CLICKHOUSE_BATCH { self.flush() } else { Ok(()) }
    }
    fn finish(&mut self) -> Result<()> {
        self.flush()
    }
    fn bytes(&self) -> Result<u64> {
        // Every table: the records, the narrow tables of questions 2 and 3
        // and the holders, compressed, once merged.
        self.merge_all()?;
        let text =
            self.server.query("SELECT sum(bytes_on_disk) FROM system.parts WHERE database = 'icr' AND active")?;
        text.trim().parse().with_context(|| format!("bytes on disk: {text:?}"))
    }
    fn backend(&self) -> &dyn Backend {
        &self.cluster
    }
}

/// What one backend measured.
struct Figures {
    written: u64,
    ingest_per_s: f64,
    ingest_mb_per_s: f64,
    bytes_per_icr: f64,
    resolve: (f64, f64),
    resolved: usize,
    device: (f64, f64),
    names: (f64, f64),
    peak_rss_mb: f64,
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir).with_context(|| format!("clearing {}", args.dir.display()))?;
    }
    std::fs::create_dir_all(&args.dir)?;
    let disk_mb_per_s = raw_write_speed(&args.dir)?;
    println!("raw sequential write (1 GiB, 4 MiB writes, then fdatasync): {disk_mb_per_s:.0} MB/s");

    println!("== sled (the gateway's store)");
    let mut sled = Sled(Store::open(&args.dir.join("store"))?);
    let sled_figures = measure(&args, &mut sled, disk_mb_per_s)?;
    let by_kind = sled.0.bytes_by_kind()?;
    println!(
        "stored values by kind (bytes/ICR): {}",
        by_kind
            .iter()
            .map(|(kind, bytes)| format!("{kind} {:.1}", *bytes as f64 / sled_figures.written as f64))
            .collect::<Vec<_>>()
            .join(", ")
    );
    drop(sled);
    let mut sled_json = json(&sled_figures, "sled", disk_mb_per_s);
    sled_json["value_bytes_per_icr"] = by_kind
        .iter()
        .map(|(k, b)| (k.clone(), serde_json::json!((*b as f64 / sled_figures.written as f64 * 10.0).round() / 10.0)))
        .collect::<serde_json::Map<_, _>>()
        .into();

    let clickhouse_figures = if args.clickhouse {
        println!("== clickhouse (one clickhouse-server, the cluster's tables)");
        let server = clickhouse::Server::start(Setup::loopback(&args.dir.join("clickhouse")))?;
        let clickhouse = ClickHouse::new(&ClickHouseSection::at(server.url()), None)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(clickhouse.init(&mut |line| println!("{line}")))?;
        let cluster = Cluster::new(clickhouse.clone())?;
        let mut target = ClickHouseTarget { server, clickhouse, cluster, runtime, pending: Vec::new() };
        let figures = measure(&args, &mut target, disk_mb_per_s)?;
        println!("bytes on disk by table and column (after OPTIMIZE FINAL; {}):", clickhouse::compression());
        target.breakdown(figures.written)?;
        let aggregate = target.many_shippers(&Options { per_second: args.per_second, ..Options::default() })?;
        println!(
            "ingest with {SHIPPERS} shippers at once ({} inserts of {CLICKHOUSE_BATCH} records each): {aggregate:.0} ICRs/s in all",
            SHIPPER_BATCHES
        );
        Some((figures, aggregate))
    } else {
        None
    };

    if !args.keep {
        std::fs::remove_dir_all(&args.dir).ok();
    }
    if let Some((clickhouse, aggregate)) = &clickhouse_figures {
        // (what, sled, clickhouse, decimals)
        let (s, c) = (&sled_figures, clickhouse);
        let rows: [(&str, f64, f64, usize); 8] = [
            ("ingest (ICRs/s)", s.ingest_per_s, c.ingest_per_s, 0),
            ("bytes per ICR on disk", s.bytes_per_icr, c.bytes_per_icr, 1),
            ("resolve p50 (ms)", s.resolve.0, c.resolve.0, 2),
            ("resolve p99 (ms)", s.resolve.1, c.resolve.1, 2),
            ("services, one device, one day p50 (ms)", s.device.0, c.device.0, 1),
            ("services, one device, one day p99 (ms)", s.device.1, c.device.1, 1),
            ("1,000 names over 30 days, median (ms)", s.names.0, c.names.0, 0),
            ("1,000 names over 30 days, max (ms)", s.names.1, c.names.1, 0),
        ];
        println!("\n{:<42} {:>12} {:>12} {:>16}", "", "sled", "clickhouse", "clickhouse/sled");
        for (what, sled, clickhouse, decimals) in rows {
            println!("{what:<42} {sled:>12.decimals$} {clickhouse:>12.decimals$} {:>16.2}", clickhouse / sled);
        }
        println!("{:<42} {:>12} {aggregate:>12.0}", format!("ingest, {SHIPPERS} shippers at once (ICRs/s)"), "");
        println!("{sled_json}");
        let mut clickhouse_json = json(clickhouse, "clickhouse", disk_mb_per_s);
        clickhouse_json["shippers"] = SHIPPERS.into();
        clickhouse_json["ingest_shippers_per_s"] = aggregate.round().into();
        println!("{clickhouse_json}");
    } else {
        println!("{sled_json}");
    }
    Ok(())
}

fn json(f: &Figures, backend: &str, disk_mb_per_s: f64) -> serde_json::Value {
    serde_json::json!({
        "backend": backend,
        "records": f.written,
        "ingest_per_s": f.ingest_per_s.round(),
        "disk_write_mb_per_s": disk_mb_per_s.round(),
        "ingest_mb_per_s": (f.ingest_mb_per_s * 10.0).round() / 10.0,
        "ingest_vs_disk": (f.ingest_mb_per_s / disk_mb_per_s * 1000.0).round() / 1000.0,
        "bytes_per_icr": (f.bytes_per_icr * 10.0).round() / 10.0,
        "resolve_p50_ms": round3(f.resolve.0),
        "resolve_p99_ms": round3(f.resolve.1),
        "resolve_found": f.resolved,
        "device_day_p50_ms": round3(f.device.0),
        "device_day_p99_ms": round3(f.device.1),
        "names_1000_30d_ms": f.names.0.round(),
        "peak_rss_mb": f.peak_rss_mb.round(),
    })
}

/// Writes the records to `target` and asks the questions of it. The same
/// seeds give every backend the same records and the same questions.
fn measure(args: &Args, target: &mut dyn Target, disk_mb_per_s: f64) -> Result<Figures> {
    let options = Options { per_second: args.per_second, ..Options::default() };
    let mut generator = Generator::new(7, options.clone());
    let mut rng = SmallRng::seed_from_u64(11);
    let mut samples: Vec<Icr> = Vec::with_capacity(RESOLVE_QUERIES);
    let mut batch = Vec::with_capacity(BATCH);
    let (mut appending, mut generating) = (Duration::ZERO, Duration::ZERO);
    let mut written = 0u64;
    let mut last_end = options.start;
    print!("ingesting {} records", args.records);
    while written < args.records {
        let started = Instant::now();
        batch.clear();
        while batch.len() < BATCH && written + (batch.len() as u64) < args.records {
            batch.push(generator.next_record());
        }
        generating += started.elapsed();
        // Reservoir sample of the records, for resolve queries.
        for (i, record) in batch.iter().enumerate() {
            let seen = written + i as u64;
            if samples.len() < RESOLVE_QUERIES {
                samples.push(record.clone());
            } else if rng.random_range(0..=seen) < RESOLVE_QUERIES as u64 {
                samples[rng.random_range(0..RESOLVE_QUERIES)] = record.clone();
            }
        }
        last_end = batch.last().map_or(last_end, |r| r.end);
        let started = Instant::now();
        target.append(&batch)?;
        if written + batch.len() as u64 >= args.records {
            target.finish()?;
        }
        appending += started.elapsed();
        written += batch.len() as u64;
        if written % 1_000_000 < BATCH as u64 {
            print!(".");
            std::io::stdout().flush()?;
        }
    }
    println!();
    let peak_rss_mb = peak_rss_mb()?;
    let ingest_per_s = written as f64 / appending.as_secs_f64();
    let bytes = target.bytes()?;
    let bytes_per_icr = bytes as f64 / written as f64;
    let ingest_mb_per_s = bytes as f64 / 1e6 / appending.as_secs_f64();
    println!(
        "ingest: {written} ICRs over {:.1} days of record time in {:.1} s of appends ({:.1} s generating): {ingest_per_s:.0} ICRs/s",
        (last_end - options.start).num_seconds() as f64 / 86_400.0,
        appending.as_secs_f64(),
        generating.as_secs_f64()
    );
    println!(
        "on disk: {:.1} MB = {bytes_per_icr:.1} bytes/ICR with indexes; written at {ingest_mb_per_s:.1} MB/s = {:.3} x the raw disk",
        bytes as f64 / 1e6,
        ingest_mb_per_s / disk_mb_per_s
    );
    println!("peak RSS while ingesting: {peak_rss_mb:.0} MB");
    let backend = target.backend();

    // Question 1: a public ip:port at a moment of each sampled connection.
    let mut resolve_ms = Vec::new();
    let mut resolved = 0;
    for sample in &samples {
        let public = sample.public.expect("synthetic records have a public address");
        let span = (sample.end - sample.start).num_microseconds().unwrap_or(0).max(1);
        let at = sample.start + chrono::Duration::microseconds(rng.random_range(0..span));
        let tolerance = chrono::Duration::seconds(1);
        let started = Instant::now();
        let found = backend.by_public(at - tolerance, at + tolerance, public.ip, Some(public.port))?;
        let answer = questions::resolve(found, at, public.ip, Some(public.port), None, None);
        resolve_ms.push(started.elapsed().as_secs_f64() * 1e3);
        resolved += usize::from(answer.records.iter().any(|r| r.id == sample.id));
    }
    let resolve = (percentile(&mut resolve_ms, 0.50), percentile(&mut resolve_ms, 0.99));
    println!(
        "resolve ip:port:time (±1 s): p50 {:.2} ms, p99 {:.2} ms; the sampled connection found {resolved}/{}",
        resolve.0,
        resolve.1,
        samples.len()
    );

    // Question 2: the services of one device over the day of one of its records.
    let mut device_ms = Vec::new();
    let mut rows_total = 0;
    for sample in samples.iter().take(DEVICE_QUERIES) {
        let device = DeviceSelector::parse(sample.device.mac.as_deref().expect("a MAC"));
        let day = sample.start.date_naive();
        let from: DateTime<Utc> = day.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
        let to = from + chrono::Duration::days(1) - chrono::Duration::microseconds(1);
        let started = Instant::now();
        let rows = backend.services(from, to, &device)?.into_rows();
        device_ms.push(started.elapsed().as_secs_f64() * 1e3);
        rows_total += rows.len();
    }
    let device = (percentile(&mut device_ms, 0.50), percentile(&mut device_ms, 0.99));
    println!(
        "services of one device over one day: p50 {:.1} ms, p99 {:.1} ms ({:.0} services a device on average)",
        device.0,
        device.1,
        rows_total as f64 / DEVICE_QUERIES as f64
    );

    // Question 3: the devices that used any of 1,000 names over 30 days.
    let to = last_end;
    let from = to.checked_sub_days(Days::new(30)).expect("in range");
    let mut names_ms = Vec::new();
    let mut hits = 0;
    for _ in 0..NAME_QUERIES {
        let selectors: Vec<ServiceSelector> =
            (0..1_000).map(|_| ServiceSelector::Name(Generator::name(rng.random_range(1..=options.names)))).collect();
        let started = Instant::now();
        let found = questions::accessed(
            backend.by_services(from, to, &selectors, LocalFilter::Include)?,
            &selectors,
            LocalFilter::Include,
        );
        names_ms.push(started.elapsed().as_secs_f64() * 1e3);
        hits += found.len();
    }
    let names = (percentile(&mut names_ms, 0.5), names_ms.iter().cloned().fold(0.0, f64::max));
    println!(
        "devices using any of 1,000 names over 30 days: median {:.0} ms, max {:.0} ms ({} records a query)",
        names.0,
        names.1,
        hits / NAME_QUERIES
    );
    let _ = disk_mb_per_s;
    Ok(Figures { written, ingest_per_s, ingest_mb_per_s, bytes_per_icr, resolve, resolved, device, names, peak_rss_mb })
}

/// This disk's sequential write speed, MB/s: 1 GiB in 4 MiB writes, synced.
fn raw_write_speed(dir: &std::path::Path) -> Result<f64> {
    let path = dir.join("raw-write-test");
    let chunk: Vec<u8> = (0..4 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let started = Instant::now();
    let mut file = std::fs::File::create(&path)?;
    for _ in 0..256 {
        file.write_all(&chunk)?;
    }
    file.sync_data()?;
    let seconds = started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(1024.0 * 1024.0 * 1024.0 / 1e6 / seconds)
}

fn peak_rss_mb() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")?;
    Ok(kb / 1024.0)
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(((values.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0)
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}
