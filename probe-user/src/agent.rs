//! `icr run`: the agent. Attaches the probe, reads its events, follows
//! conntrack, closes flows into ICRs and writes them, until SIGINT/SIGTERM,
//! when it records every open flow so far (`shutdown`), flushes and returns
//! (handing its open flows to the next agent when the probe stays pinned).
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use log::{error, info, warn};
use probe_common::{FlowKey, counter, role};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::{MissedTickBehavior, interval},
};

use crate::{
    capture::clock::{Clock, monotonic_ns},
    capture::events,
    capture::flow::{Assembler, nanos},
    capture::handover::Handover,
    capture::loss::{LossTracker, Totals},
    capture::nat::{NatEvent, NatTable, conntrack},
    capture::privileges,
    capture::probe::Probe,
    capture::subscribers::Directory,
    config::Config,
    export::clickhouse::ClickHouse,
    query::{Desk, Sweep, Sweeper},
    record::{EndReason, Icr},
    store::{
        Store,
        gaps::{Gap, LossKind, Watermark},
    },
};

/// How often due flows are closed and records written.
const TICK: Duration = Duration::from_secs(1);
/// How often the probe's counters are logged.
const STATS_EVERY: Duration = Duration::from_secs(60);
/// How often retention is applied while running.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);
/// Events waiting between the event readers and the assembler.
const EVENT_QUEUE: usize = 1 << 16;
/// How long the writer waits before retrying a failed write (a full disk).
const WRITE_RETRY: Duration = Duration::from_secs(5);
/// How often (in ticks) the loss watermark is written even without loss:
/// the next agent dates what it finds lost, or a stop, from the last one.
const WATERMARK_TICKS: u64 = 10;

/// One tick's output for the writer.
#[derive(Default)]
struct Batch {
    records: Vec<Icr>,
    /// The kernel flows the records were made of: deleted from the kernel
    /// only once the records are durable, so a kill between the two loses
    /// nothing (the next agent finds the flows and records them).
    flows: Vec<FlowKey>,
    gaps: Vec<Gap>,
    watermark: Option<Watermark>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.records.is_empty() && self.flows.is_empty() && self.gaps.is_empty() && self.watermark.is_none()
    }

    fn absorb(&mut self, other: Batch) {
        self.records.extend(other.records);
        self.flows.extend(other.flows);
        // Written in order: a later entry of an episode replaces the earlier.
        self.gaps.extend(other.gaps);
        self.watermark = other.watermark.or(self.watermark.take());
    }
}

pub struct RunOptions {
    pub lan: Vec<String>,
    pub wan: Vec<String>,
    pub db: PathBuf,
    pub config: Config,
    /// The configuration file given (`--config`, or /etc/icr/icr.toml), which
    /// the store records and queries re-read (authorities change); `None`:
    /// the store's own.
    pub config_file: Option<PathBuf>,
}

/// The doors (the query socket, the HTTP API, metrics) on a runtime of
/// their own, on threads of their own: no request, however slow or many,
/// takes the capture's thread. Shut down when dropped.
struct ServiceRuntime(Option<tokio::runtime::Runtime>);

/// The doors' threads.
const SERVICE_THREADS: usize = 2;

impl ServiceRuntime {
    async fn start(
        db: &Path,
        config: &Config,
        governing: crate::config::StoreConfig,
        store: &Store,
        snapshot: &crate::serve::metrics::Shared,
    ) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(SERVICE_THREADS)
            .thread_name("icr-doors")
            .enable_all()
            .build()
            .context("starting the query service's runtime")?;
        let socket = crate::serve::control::socket_path(db, config);
        let (db, http, metrics, store, snapshot) =
            (db.to_path_buf(), config.http.clone(), config.metrics.clone(), store.clone(), snapshot.clone());
        let config_file = governing.agent_file().map(Path::to_path_buf);
        // Started there, so that their tasks run there; a listener that
        // cannot start is reported here.
        let started = runtime.spawn(async move {
            crate::serve::control::serve(&socket, &db, governing, store.clone())?;
            crate::serve::http::serve(&http, db.clone(), config_file, std::sync::Arc::new(store)).await?;
            crate::serve::metrics::serve(&metrics, snapshot).await
        });
        let doors = Self(Some(runtime));
        started.await.context("the query service's runtime")??;
        Ok(doors)
    }
}

impl Drop for ServiceRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            // Dropped from within the agent's runtime, which may not block.
            runtime.shutdown_background();
        }
    }
}

pub async fn run(options: RunOptions) -> Result<()> {
    let RunOptions { lan, wan, db, config, config_file } = options;
    let timeouts = config.flow_timeouts();
    // The store's threads (sled's flusher) are started without CAP_SYS_ADMIN.
    let store = privileges::without_admin(|| Store::open_with_cache(&db, config.store.cache_mb << 20))??;
    store.set_retention_days(config.retention_days);
    let governing = crate::query::audit::govern(&store, &db, config_file.as_deref())?;
    let mut directory = Directory::load(&config.subscribers).context("loading the subscriber directory")?;
    // The setup that needs privileges before any other thread is started
    // (the doors' runtime, blocking tasks): CAP_SYS_ADMIN is dropped
    // before one exists to keep it.
    let loaded_at = Utc::now();
    let mut probe = Probe::load(config.probe.probe_options())?;
    // Readers first: a flow event sent before its CPU's buffer is open is
    // lost, and the first packets arrive as soon as the program attaches.
    let (event_tx, mut event_rx) = mpsc::channel(EVENT_QUEUE);
    let read_horizon = events::spawn_readers(probe.open_events()?, event_tx)?;
    for interface in &lan {
        probe.attach(interface, role::LAN)?;
    }
    for interface in &wan {
        probe.attach(interface, role::WAN)?;
    }
    privileges::drop_after_setup()?;
    let snapshot = crate::serve::metrics::Shared::default();
    let _doors = ServiceRuntime::start(&db, &config, governing.clone(), &store, &snapshot).await?;
    let probe_id = config.probe_id();
    if let Some(section) = &config.clickhouse {
        let cluster = ClickHouse::new(section, Some(&db))?;
        // Before the first append: everything from now on is spooled.
        store.enable_outbox().context("opening the outbox")?;
        info!("shipping records and gap entries to {} ({} records waiting)", cluster.url(), store.outbox_backlog());
        tokio::spawn(crate::export::clickhouse::ship::run(store.clone(), cluster, probe_id.clone()));
    }

    let (nat_tx, mut nat_rx) = mpsc::channel(EVENT_QUEUE);
    let nat_expected = !wan.is_empty();
    if nat_expected && let Err(error) = conntrack::spawn(nat_tx) {
        warn!("{error:#}; records will have no public address");
    }

    // Batches (one a tick) waiting for the writer. When it is full the
    // loop waits for the writer (back-pressure, counted), the event buffer
    // fill, and the kernel counts what it cannot send: memory stays bounded
    // and every loss is counted where it happens.
    let write_queue = config.store.write_queue;
    let (write_tx, write_rx) = mpsc::channel(write_queue);
    // Flows whose records are stored come back to have their kernel entries deleted.
    let (stored_tx, mut stored_rx) = mpsc::unbounded_channel();
    // IPFIX collectors get each batch after the store has it.
    let ipfix = crate::export::ipfix::live::Feed::start(config.ipfix.as_ref())?;
    if let Ok(mut s) = snapshot.lock() {
        s.ipfix = ipfix.stats();
    }
    let writer = spawn_writer(store.clone(), write_rx, stored_tx, snapshot.clone(), ipfix);

    let mut losses = loss_tracker(&store, &probe, loaded_at)?;
    let mut ticks = 0u64;
    // The kernel's lost-event count as of the last tick (an adopted probe's
    // earlier losses are not this agent's open flows').
    let mut kernel_events_lost = probe.counters().map(|c| c.get(counter::EVENTS_LOST)).unwrap_or(0);

    let mut assembler = Assembler::new(timeouts, Clock::live(), nat_expected)
        .with_dns_cache_entries(config.probe.dns_cache_entries)
        .with_readers(read_horizon);
    let nat_grace = nanos(timeouts.nat_grace());
    let mut nat = NatTable::with_max_destroyed(config.probe.nat_destroyed_kept);
    take_handover(&store, &mut assembler, &probe)?;
    let mut tick = interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stats = interval(STATS_EVERY);
    let mut sweep = interval(SWEEP_EVERY);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut backpressure = 0u64;
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
            Some(flows) = stored_rx.recv() => assembler.release(&flows, &mut probe)?,
            _ = tick.tick() => {
                if let Some(step) = assembler.resync_clock() {
                    let (way, by) = if step < chrono::TimeDelta::zero() { ("back", -step) } else { ("forward", step) };
                    let by = humantime::format_duration(by.to_std().unwrap_or_default());
                    warn!("the wall clock stepped {way} by {by}: records closed from now on are dated by the new time");
                }
                let now = monotonic_ns();
                // Read once a tick: the loss totals and the metrics share it.
                let counters = probe.counters();
                if let Ok(counters) = &counters {
                    // The ring buffers report no loss in their stream: the
                    // kernel's counter says an event went missing.
                    let lost = counters.get(counter::EVENTS_LOST);
                    if lost > kernel_events_lost {
                        assembler.events_went_missing();
                    }
                    kernel_events_lost = lost;
                }
                assembler.tick(now, &mut probe, &nat)?;
                nat.forget(now.saturating_sub(nat_grace));
                // Leases change at any time: the directory re-reads what
                // changed (a stat per source) before records are named.
                if let Err(error) = directory.refresh(Utc::now()) {
                    warn!("refreshing the subscriber directory: {error:#}");
                }
                let mut batch = Batch {
                    records: named_records(&mut assembler, &directory, &probe_id),
                    flows: assembler.take_closed_flows(),
                    ..Batch::default()
                };
                ticks += 1;
                if let Ok(counters) = &counters {
                    let totals = Totals {
                        conntrack_overruns: nat.overruns(),
                        conntrack_overrun_since: nat.take_overrun_since(),
                        writer_waits: backpressure,
                        ..Totals::of_kernel(counters)
                    };
                    batch.gaps = losses.observe(totals, Utc::now());
                    for gap in &batch.gaps {
                        warn!("{}", gap.describe());
                    }
                    if !batch.gaps.is_empty() || ticks.is_multiple_of(WATERMARK_TICKS) {
                        batch.watermark = Some(watermark(&probe, &losses));
                    }
                }
                if !queue_batch(&write_tx, batch).await? {
                    backpressure += 1;
                }
                if let (Ok(counters), Ok(mut s)) = (counters, snapshot.lock()) {
                    s.probe = counters;
                    s.open_flows = assembler.open_flows() as u64;
                    s.write_queue = (write_queue - write_tx.capacity()) as u64;
                    s.write_queue_capacity = write_queue as u64;
                    s.writer_backpressure = backpressure;
                    s.flows_adopted = assembler.adopted;
                    s.local_flows = assembler.local_flows;
                    s.gateway_flows = assembler.gateway_flows;
                    s.orphans = assembler.orphans;
                    s.dns_answers = assembler.dns_answers;
                    s.events_lost_userspace = assembler.events_lost;
                    s.nat_mappings = nat.len() as u64;
                    s.nat_destroyed = nat.destroyed() as u64;
                    s.nat_dropped_early = nat.dropped_early();
                    s.assembler = assembler.sizes();
                    s.dns_cache_capacity = config.probe.dns_cache_entries as u64;
                    s.nat_overruns = nat.overruns();
                    s.event_queue = event_rx.len() as u64;
                    s.event_queue_capacity = EVENT_QUEUE as u64;
                }
            }
            _ = stats.tick() => {
                log_stats(&probe, &assembler, &nat, stored(&snapshot), backpressure);
                if let Ok(mut s) = snapshot.lock() {
                    s.store_bytes = store.size_on_disk();
                }
            }
            _ = sweep.tick() => {
                // Reads hide the expired days meanwhile: a sweep that fails
                // (an unreadable configuration, say) is tried again, and
                // stops no capture.
                match Desk::new(&db, &governing, &store).sweep(&Sweep { by: Sweeper::Schedule, config: None }) {
                    Ok(summary) => info!("{summary}"),
                    Err(failure) => error!("the retention sweep failed, tried again in an hour: {failure}"),
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }

    // Take what is already queued so that flows and mappings are complete.
    while let Ok(event) = nat_rx.try_recv() {
        apply_nat(&mut nat, event);
    }
    while let Ok(event) = event_rx.try_recv() {
        assembler.on_event(event, &nat);
    }
    // A pinned probe goes on counting: the next agent records the rest of
    // each open connection from where this one's records end.
    let handover = if probe.pin_dir().is_some() {
        info!("stopping: recording open flows so far, for the next agent to go on");
        Some(assembler.hand_over(monotonic_ns(), EndReason::Shutdown, &mut probe, &nat)?)
    } else {
        info!("stopping: closing open flows");
        assembler.close_all(monotonic_ns(), EndReason::Shutdown, &mut probe, &nat)?;
        None
    };
    let records = named_records(&mut assembler, &directory, &probe_id);
    let flows = assembler.take_closed_flows();
    queue_batch(&write_tx, Batch { records, flows, gaps: Vec::new(), watermark: Some(watermark(&probe, &losses)) })
        .await?;
    drop(write_tx);
    writer.await.context("the writer task failed")?;
    while let Ok(flows) = stored_rx.try_recv() {
        assembler.release(&flows, &mut probe)?;
    }
    // Only once the records so far are durable: a handover without them
    // would have the next agent leave their part out.
    if let Some((flows, answers)) = handover {
        let handed = flows.len();
        store.leave_handover(&Handover::new(probe.instance(), flows, answers).encode()?)?;
        info!("handed {handed} open flows over to the next agent");
    }
    let stored = stored(&snapshot);
    log_stats(&probe, &assembler, &nat, stored, backpressure);
    let _ = std::fs::remove_file(crate::serve::control::socket_path(&db, &config));
    if let Some(dir) = probe.pin_dir() {
        info!("the probe stays attached and counting (pinned in {}); `icr detach` removes it", dir.display());
    }
    info!("stopped; {stored} records stored");
    Ok(())
}

/// Goes on from where the last agent stopped, if it handed its open flows
/// over to this probe. Taken in any case: a handover is read once.
fn take_handover(store: &Store, assembler: &mut Assembler, probe: &Probe) -> Result<()> {
    let Some(bytes) = store.take_handover()? else { return Ok(()) };
    if !probe.adopted() {
        info!("the last agent's open flows ended with its probe: nothing to go on from");
        return Ok(());
    }
    match Handover::decode(&bytes, probe.instance()) {
        Ok(handover) => {
            let handed = handover.flows.len();
            let resumed = assembler.take_over(handover, probe, monotonic_ns())?;
            info!("went on with {resumed} of the {handed} open flows the last agent handed over");
        }
        Err(refused) => {
            warn!("not going on from the last agent's handover: {refused}; its open flows are adopted as incomplete")
        }
    }
    Ok(())
}

fn apply_nat(nat: &mut NatTable, event: NatEvent) {
    if matches!(event, NatEvent::Overrun { .. }) {
        warn!("conntrack events were lost: some records may lack their public address");
    }
    nat.apply(event, monotonic_ns());
}

/// The closed flows' records, named with their subscribers.
fn named_records(assembler: &mut Assembler, directory: &Directory, probe: &str) -> Vec<Icr> {
    let mut records = assembler.take_records();
    directory.name(&mut records, probe);
    records
}

/// Hands a tick's batch to the writer; false when the queue was full and
/// the loop had to wait for it.
async fn queue_batch(queue: &mpsc::Sender<Batch>, batch: Batch) -> Result<bool> {
    if batch.is_empty() {
        return Ok(true);
    }
    match queue.try_send(batch) {
        Ok(()) => Ok(true),
        Err(mpsc::error::TrySendError::Full(batch)) => {
            warn!("the store writer is behind ({} batches queued): waiting for it", queue.max_capacity());
            queue.send(batch).await.map_err(|_| anyhow::anyhow!("the store writer stopped"))?;
            Ok(false)
        }
        Err(mpsc::error::TrySendError::Closed(_)) => anyhow::bail!("the store writer stopped"),
    }
}

/// Where loss counting starts. A probe adopted from pins counted while no
/// agent ran: its losses count from the watermark the last agent left (and
/// are dated from then). A freshly loaded probe means nothing captured since
/// the last agent's last watermark: that is a gap of its own. A probe this
/// agent loaded counts from zero at `loaded_at`: all its losses are ours.
fn loss_tracker(store: &Store, probe: &Probe, loaded_at: DateTime<Utc>) -> Result<LossTracker> {
    let now = Utc::now();
    let counters = probe.counters()?;
    let kernel = Totals::of_kernel(&counters);
    let last = store.watermark()?;
    match last {
        Some(last) if probe.adopted() && last.probe == probe.instance() => {
            let baseline =
                Totals { events_lost: last.events_lost, flow_table_full: last.flow_table_full, ..Totals::default() };
            info!(
                "adopted the pinned probe: counting losses since the last agent's watermark at {}",
                crate::record::format_time(&last.at)
            );
            Ok(LossTracker::new(baseline, last.at))
        }
        last => {
            if probe.adopted() && kernel != Totals::default() {
                warn!(
                    "the adopted probe had counted {} lost events and {} flows not tracked before this agent, at times unknown",
                    kernel.events_lost, kernel.flow_table_full
                );
            }
            if probe.adopted() {
                return Ok(LossTracker::new(kernel, now));
            }
            if let Some(last) = last {
                let gap = Gap::new(LossKind::NotCapturing, last.at, loaded_at, 0);
                warn!("{}", gap.describe());
                store.record_gaps(&[gap], None).context("recording the time no agent captured")?;
            }
            Ok(LossTracker::new(Totals::default(), loaded_at))
        }
    }
}

fn watermark(probe: &Probe, losses: &LossTracker) -> Watermark {
    let totals = losses.totals();
    Watermark {
        probe: probe.instance(),
        at: Utc::now(),
        events_lost: totals.events_lost,
        flow_table_full: totals.flow_table_full,
    }
}

/// The writer: takes queued batches (several at once when it is behind),
/// appends them durably, and counts them stored only then. A failed write
/// (a full disk) is retried until it succeeds: records are never dropped;
/// meanwhile the queue fills and back-pressure reaches the kernel, which
/// keeps forwarding and counting.
fn spawn_writer(
    store: Store,
    mut queue: mpsc::Receiver<Batch>,
    stored: mpsc::UnboundedSender<Vec<FlowKey>>,
    snapshot: crate::serve::metrics::Shared,
    ipfix: crate::export::ipfix::live::Feed,
) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_blocking(move || {
        while let Some(mut batch) = queue.blocking_recv() {
            while let Ok(more) = queue.try_recv() {
                batch.absorb(more);
            }
            let started = std::time::Instant::now();
            let what = format!("storing {} records", batch.records.len());
            until_written(&what, &snapshot, || store.append(&batch.records));
            ipfix.offer(&batch.records);
            if !batch.flows.is_empty() {
                // The loop stopping first only leaves the flows to the next agent.
                let _ = stored.send(std::mem::take(&mut batch.flows));
            }
            if !batch.gaps.is_empty() || batch.watermark.is_some() {
                until_written("recording capture gaps", &snapshot, || {
                    store.record_gaps(&batch.gaps, batch.watermark.as_ref())
                });
            }
            if let Ok(mut s) = snapshot.lock() {
                s.records_stored += batch.records.len() as u64;
                s.gaps_recorded += batch.gaps.len() as u64;
                s.write_seconds = started.elapsed().as_secs_f64();
                s.store_bytes = store.size_on_disk();
                s.store_open_records = store.open_records() as u64;
                if store.is_spooling() {
                    s.export_backlog = Some(store.outbox_backlog());
                }
            }
        }
    })
}

/// Retries `write` every [`WRITE_RETRY`] until it succeeds, counting and
/// logging the failures.
fn until_written(what: &str, snapshot: &crate::serve::metrics::Shared, mut write: impl FnMut() -> Result<()>) {
    let mut failures = 0u64;
    while let Err(error) = write() {
        failures += 1;
        if failures == 1 || failures.is_multiple_of(60) {
            error!("{what} failed ({failures} tries so far), retrying every {WRITE_RETRY:?}: {error:#}");
        }
        if let Ok(mut s) = snapshot.lock() {
            s.write_errors += 1;
        }
        std::thread::sleep(WRITE_RETRY);
    }
    if failures > 0 {
        info!("{what} works again after {failures} failed tries");
    }
}

fn stored(snapshot: &crate::serve::metrics::Shared) -> u64 {
    snapshot.lock().map(|s| s.records_stored).unwrap_or(0)
}

fn log_stats(probe: &Probe, assembler: &Assembler, nat: &NatTable, stored: u64, backpressure: u64) {
    match probe.counters() {
        Ok(counters) => {
            let lost = counters.get(counter::EVENTS_LOST) + assembler.events_lost;
            let full = counters.get(counter::FLOW_TABLE_FULL);
            let line = format!(
                "packets {} flows {} open {} stored {} local {} nat {} | lost events {} table full {} adopted {} malformed {} writer waits {} | \
                 orphans: late {} unmapped {} superseded {}, wan strays {}, reopened {} (merged {})",
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
                backpressure,
                assembler.orphans.late_halves,
                assembler.orphans.unmapped,
                assembler.orphans.superseded,
                counters.get(counter::WAN_STRAYS),
                counters.get(counter::REOPENED),
                counters.get(counter::REOPEN_MERGED),
            );
            if lost + full > 0 { warn!("{line}") } else { info!("{line}") }
        }
        Err(error) => warn!("reading the probe's counters: {error:#}"),
    }
}
