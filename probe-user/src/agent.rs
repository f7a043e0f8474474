//! `icr run`: the agent. Attaches the probe, reads its events, follows
//! conntrack, closes flows into ICRs and writes them, until SIGINT/SIGTERM,
//! when it closes every open flow (`shutdown`), flushes and returns.
use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use chrono::Utc;
use log::{info, warn};
use probe_common::{counter, role};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::{MissedTickBehavior, interval},
};

use crate::{
    clock::{Clock, monotonic_ns},
    config::Config,
    events,
    flow::Assembler,
    icr::EndReason,
    nat::{NatEvent, NatTable, conntrack},
    probe::{Probe, ProbeOptions},
    store::Store,
    subscribers::Directory,
};

/// How often due flows are closed and records written.
const TICK: Duration = Duration::from_secs(1);
/// How often the probe's counters are logged.
const STATS_EVERY: Duration = Duration::from_secs(60);
/// How often retention is applied while running.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);
/// How long destroyed NAT mappings are kept for flows still closing.
const NAT_GRACE: Duration = Duration::from_secs(600);
/// Events waiting between the perf readers and the assembler.
const EVENT_QUEUE: usize = 1 << 16;

pub struct RunOptions {
    pub lan: Vec<String>,
    pub wan: Vec<String>,
    pub db: PathBuf,
    pub config: Config,
    /// The configuration file given, which queries re-read (authorities change).
    pub config_file: Option<PathBuf>,
}

pub async fn run(options: RunOptions) -> Result<()> {
    let RunOptions { lan, wan, db, config, config_file } = options;
    let timeouts = config.flow_timeouts()?;
    let store = Store::open(&db)?;
    crate::control::serve(&db, store.clone())?;
    crate::http::serve(&config.http, db.clone(), config_file, store.clone()).await?;
    let snapshot = crate::metrics::Shared::default();
    crate::metrics::serve(&config.metrics, snapshot.clone()).await?;
    let mut directory = Directory::load(&config.subscribers).context("loading the subscriber directory")?;
    let mut probe = Probe::load(ProbeOptions {
        flow_table_size: config.probe.flow_table_size,
        pin_dir: config.probe.pin_dir.clone(),
    })?;
    for interface in &lan {
        probe.attach(interface, role::LAN)?;
    }
    for interface in &wan {
        probe.attach(interface, role::WAN)?;
    }

    let (event_tx, mut event_rx) = mpsc::channel(EVENT_QUEUE);
    events::spawn_readers(probe.open_event_buffers()?, event_tx)?;
    let (nat_tx, mut nat_rx) = mpsc::channel(EVENT_QUEUE);
    let nat_expected = !wan.is_empty();
    if nat_expected {
        if let Err(error) = conntrack::spawn(nat_tx) {
            warn!("{error:#}; records will have no public address");
        }
    }

    let clock = Clock::live();
    let mut assembler = Assembler::new(timeouts, clock, nat_expected);
    let mut nat = NatTable::default();
    let mut tick = interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stats = interval(STATS_EVERY);
    let mut sweep = interval(SWEEP_EVERY);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut stored = 0u64;
    info!(
        "icr running: lan [{}] wan [{}], store {}, retention {} days",
        lan.join(","),
        wan.join(","),
        store.path().display(),
        config.retention_days
    );

    loop {
        tokio::select! {
            Some(event) = event_rx.recv() => assembler.on_event(event, &nat),
            Some(event) = nat_rx.recv() => apply_nat(&mut nat, event),
            _ = tick.tick() => {
                let now = monotonic_ns();
                assembler.tick(now, &mut probe, &nat)?;
                nat.forget(now.saturating_sub(NAT_GRACE.as_nanos() as u64));
                let started = std::time::Instant::now();
                stored += write(&store, &mut assembler, &directory)?;
                let written = started.elapsed();
                if let (Ok(counters), Ok(mut s)) = (probe.counters(), snapshot.lock()) {
                    s.probe = counters;
                    s.open_flows = assembler.open_flows() as u64;
                    s.records_stored = stored;
                    s.flows_adopted = assembler.adopted;
                    s.local_flows = assembler.local_flows;
                    s.events_lost_userspace = assembler.events_lost;
                    s.nat_mappings = nat.len() as u64;
                    s.nat_overruns = nat.overruns();
                    s.event_queue = event_rx.len() as u64;
                    s.event_queue_capacity = EVENT_QUEUE as u64;
                    s.write_seconds = written.as_secs_f64();
                }
            }
            _ = stats.tick() => {
                log_stats(&probe, &assembler, &nat, stored);
                if let Ok(mut s) = snapshot.lock() {
                    s.store_bytes = store.size_on_disk();
                }
                if let Err(error) = directory.refresh(Utc::now()) {
                    warn!("refreshing the subscriber directory: {error:#}");
                }
            }
            _ = sweep.tick() => {
                let dropped = store.sweep(config.retention_days, Utc::now())?;
                if !dropped.is_empty() {
                    info!("retention: dropped {} day(s) of records", dropped.len());
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }

    info!("stopping: closing open flows");
    // Take what is already queued so that flows and mappings are complete.
    while let Ok(event) = nat_rx.try_recv() {
        apply_nat(&mut nat, event);
    }
    while let Ok(event) = event_rx.try_recv() {
        assembler.on_event(event, &nat);
    }
    assembler.close_all(monotonic_ns(), EndReason::Shutdown, &mut probe, &nat)?;
    stored += write(&store, &mut assembler, &directory)?;
    log_stats(&probe, &assembler, &nat, stored);
    let _ = std::fs::remove_file(crate::control::socket_path(&db));
    if let Some(dir) = &config.probe.pin_dir {
        info!("the probe stays attached and counting (pinned in {}); `icr detach` removes it", dir.display());
    }
    info!("stopped; {stored} records stored");
    Ok(())
}

fn apply_nat(nat: &mut NatTable, event: NatEvent) {
    if event == NatEvent::Overrun {
        warn!("conntrack events were lost: some records may lack their public address");
    }
    nat.apply(event, monotonic_ns());
}

fn write(store: &Store, assembler: &mut Assembler, directory: &Directory) -> Result<u64> {
    let mut records = assembler.take_records();
    for record in &mut records {
        record.device.subscriber = directory.subscriber(record);
    }
    store.append(&records).context("storing records")?;
    Ok(records.len() as u64)
}

fn log_stats(probe: &Probe, assembler: &Assembler, nat: &NatTable, stored: u64) {
    match probe.counters() {
        Ok(counters) => {
            let lost = counters.get(counter::EVENTS_LOST) + assembler.events_lost;
            let full = counters.get(counter::FLOW_TABLE_FULL);
            let line = format!(
                "packets {} flows {} open {} stored {} local {} nat {} | lost events {} table full {} adopted {} malformed {}",
                counters.get(counter::PACKETS),
                counters.get(counter::FLOWS_CREATED),
                assembler.open_flows(),
                stored,
                assembler.local_flows,
                nat.len(),
                lost,
                full,
                assembler.adopted,
                counters.get(counter::MALFORMED),
            );
            if lost + full > 0 { warn!("{line}") } else { info!("{line}") }
        }
        Err(error) => warn!("reading the probe's counters: {error:#}"),
    }
}
