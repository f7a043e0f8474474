//! Prometheus metrics (`GET /metrics` when `[metrics] listen` is set): the
//! probe's kernel counters, every loss counter, the assembler's and the
//! store's figures. The agent's loop refreshes a snapshot each tick; the
//! endpoint only renders it, so scraping never touches the hot path.
use std::{
    fmt::Write as _,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result};
use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use log::info;
use probe_common::counter;

use crate::{capture::probe::Counters, config::MetricsSection};

/// What the agent knows of itself at its last tick.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub probe: Counters,
    pub open_flows: u64,
    pub records_stored: u64,
    pub flows_adopted: u64,
    pub local_flows: u64,
    pub gateway_flows: u64,
    pub orphans: crate::capture::flow::OrphanCounts,
    pub dns_answers: crate::capture::flow::DnsAnswerCounts,
    pub events_lost_userspace: u64,
    pub nat_mappings: u64,
    pub nat_overruns: u64,
    pub event_queue: u64,
    pub event_queue_capacity: u64,
    pub store_bytes: u64,
    pub write_seconds: f64,
    /// Batches waiting for the store writer, and how many it may hold.
    pub write_queue: u64,
    pub write_queue_capacity: u64,
    /// Times the agent's loop waited for the writer (back-pressure).
    pub writer_backpressure: u64,
    /// Failed writes (each retried until it succeeds).
    pub write_errors: u64,
    /// Gap entries written (an episode that grows is written again).
    pub gaps_recorded: u64,
    /// Records waiting in the outbox for the cluster (when shipping).
    pub export_backlog: Option<u64>,
    /// The sizes of the assembler's maps and caches.
    pub assembler: crate::capture::flow::AssemblerSizes,
    /// The most DNS answers the cache holds (`[probe] dns_cache_entries`).
    pub dns_cache_capacity: u64,
    /// NAT mappings kept after conntrack destroyed them (for late flows).
    pub nat_destroyed: u64,
    /// Of those, dropped before their grace ended (the most were kept).
    pub nat_dropped_early: u64,
    /// Records in the store's open blocks, held in memory until sealed.
    pub store_open_records: u64,
    /// The process's memory, read when scraped.
    pub memory: Option<Memory>,
    /// Each IPFIX collector's export, live counters.
    pub ipfix: Vec<Arc<crate::export::ipfix::live::Stats>>,
}

/// The process's memory as the kernel and the allocator see it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Resident set (VmRSS), bytes.
    pub resident: u64,
    /// Of which anonymous (heap, stacks): what the agent's data holds.
    pub anonymous: u64,
    /// Of which file-backed: the binary's pages and mapped files.
    pub file: u64,
    /// What glibc's allocator holds, where it is the allocator.
    pub malloc: Option<Malloc>,
}

/// glibc's allocator, all arenas together (`mallinfo2`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Malloc {
    /// Bytes allocated and not freed (small chunks and mmapped ones).
    pub in_use: u64,
    /// Bytes freed but kept by the allocator in its arenas.
    pub free: u64,
}

impl Memory {
    /// This process's memory (`/proc/self/status`, and `mallinfo2`).
    pub fn of_self() -> Option<Self> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        Some(Self { malloc: Malloc::of_self(), ..Self::of_status(&status)? })
    }

    /// The figures of a `/proc/PID/status` text.
    pub fn of_status(status: &str) -> Option<Self> {
        let kib = |field: &str| -> Option<u64> {
            let line = status.lines().find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?;
            Some(line.split_whitespace().next()?.parse::<u64>().ok()? * 1024)
        };
        Some(Self { resident: kib("VmRSS")?, anonymous: kib("RssAnon")?, file: kib("RssFile")?, malloc: None })
    }
}

impl Malloc {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn of_self() -> Option<Self> {
        // SAFETY: mallinfo2 takes no argument and only reads the allocator's
        // own statistics (under its arenas' locks).
        let info = unsafe { libc::mallinfo2() };
        Some(Self { in_use: (info.uordblks + info.hblkhd) as u64, free: info.fordblks as u64 })
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    fn of_self() -> Option<Self> {
        None
    }
}

pub type Shared = Arc<Mutex<Snapshot>>;

pub async fn serve(section: &MetricsSection, snapshot: Shared) -> Result<()> {
    let Some(listen) = section.listen else { return Ok(()) };
    let app = Router::new().route("/metrics", get(metrics)).with_state(snapshot);
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
    info!("metrics on http://{listen}/metrics");
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(())
}

async fn metrics(State(snapshot): State<Shared>) -> impl IntoResponse {
    let mut snapshot = snapshot.lock().map(|s| s.clone()).unwrap_or_default();
    snapshot.memory = Memory::of_self();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], render(&snapshot))
}

/// The Prometheus text exposition of a snapshot.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP icr_{name} {help}\n# TYPE icr_{name} {kind}\nicr_{name} {value}");
    };
    for (index, name) in counter::NAMES.iter().enumerate() {
        metric(
            &format!("probe_{name}_total"),
            "counter",
            &format!("XDP probe counter {name}, all CPUs"),
            s.probe.0[index].to_string(),
        );
    }
    metric(
        "events_lost_userspace_total",
        "counter",
        "Samples the kernel reported lost in the perf buffers",
        s.events_lost_userspace.to_string(),
    );
    metric("flows_open", "gauge", "Flows the assembler follows", s.open_flows.to_string());
    metric(
        "flows_adopted_total",
        "counter",
        "Flows found by a table sweep whose start event was lost",
        s.flows_adopted.to_string(),
    );
    metric(
        "flows_local_total",
        "counter",
        "Link-local, multicast and broadcast flows closed without a record",
        s.local_flows.to_string(),
    );
    metric(
        "flows_gateway_total",
        "counter",
        "The gateway's own connections (its resolver upstream, NTP) closed without a record",
        s.gateway_flows.to_string(),
    );
    metric(
        "flows_orphan_late_total",
        "counter",
        "WAN halves re-opened by a late packet of a TCP connection already written, closed without a record",
        s.orphans.late_halves.to_string(),
    );
    metric(
        "flows_orphan_superseded_total",
        "counter",
        "WAN halves older than the connection whose NAT mapping now holds their public port (their own mapping is gone), closed without a record",
        s.orphans.superseded.to_string(),
    );
    metric(
        "flows_orphan_unmapped_total",
        "counter",
        "WAN-only flows no NAT mapping joins to a device (unconfirmed inbound packets), closed without a record",
        s.orphans.unmapped.to_string(),
    );
    metric(
        "dns_answers_trusted_total",
        "counter",
        "DNS answers to a device's own question: they may name its later connections",
        s.dns_answers.trusted.to_string(),
    );
    metric(
        "dns_answers_unasked_total",
        "counter",
        "DNS answers that name nothing: no device asked the question (unsolicited, or a spoofed question)",
        s.dns_answers.unasked.to_string(),
    );
    metric(
        "dns_answers_from_lan_total",
        "counter",
        "DNS answers that name nothing: they arrived on a LAN port, from another device",
        s.dns_answers.from_lan.to_string(),
    );
    metric("records_stored_total", "counter", "ICRs written to the store", s.records_stored.to_string());
    metric("nat_mappings", "gauge", "Conntrack mappings held", s.nat_mappings.to_string());
    metric(
        "nat_overruns_total",
        "counter",
        "Conntrack event overruns (ENOBUFS), each followed by a resync",
        s.nat_overruns.to_string(),
    );
    metric(
        "event_queue",
        "gauge",
        "Events waiting between the perf readers and the assembler",
        s.event_queue.to_string(),
    );
    metric("event_queue_capacity", "gauge", "Capacity of that queue", s.event_queue_capacity.to_string());
    metric("store_bytes", "gauge", "Size of the store on disk", s.store_bytes.to_string());
    metric(
        "store_write_seconds",
        "gauge",
        "Time the last batch took to write and flush",
        format!("{:.6}", s.write_seconds),
    );
    metric("write_queue", "gauge", "Record batches waiting for the store writer", s.write_queue.to_string());
    metric("write_queue_capacity", "gauge", "Capacity of that queue", s.write_queue_capacity.to_string());
    metric(
        "writer_backpressure_total",
        "counter",
        "Times the agent waited for the store writer",
        s.writer_backpressure.to_string(),
    );
    metric(
        "store_write_errors_total",
        "counter",
        "Failed store writes, each retried until it succeeded",
        s.write_errors.to_string(),
    );
    metric(
        "gap_entries_written_total",
        "counter",
        "Gap entries written to the store (loss episodes, rewritten as they grow)",
        s.gaps_recorded.to_string(),
    );
    let sizes = &s.assembler;
    for (name, help, value) in [
        ("flows_held", "Closed flows whose records are on their way to the store", sizes.held_flows),
        ("flows_hinted", "Flows with hint state (service names, DNS questions)", sizes.hinted_flows),
        ("flows_named_by_dns", "Open flows named by a DNS answer when they started", sizes.named_flows),
        ("flow_checks_scheduled", "Flow checks scheduled (at most one a followed flow)", sizes.scheduled_checks),
        ("dns_answers_pending", "DNS answers waiting for their question (at most 10 s)", sizes.pending_dns),
        ("dns_cache_entries", "DNS answers held to name later connections", sizes.dns_cache_entries),
    ] {
        metric(name, "gauge", help, value.to_string());
    }
    metric(
        "dns_cache_capacity",
        "gauge",
        "The most DNS answers held ([probe] dns_cache_entries)",
        s.dns_cache_capacity.to_string(),
    );
    metric(
        "nat_mappings_destroyed",
        "gauge",
        "Of the conntrack mappings held, those conntrack destroyed (kept for late flows)",
        s.nat_destroyed.to_string(),
    );
    metric(
        "nat_mappings_dropped_early_total",
        "counter",
        "Destroyed conntrack mappings dropped before their grace ended ([probe] nat_destroyed_kept reached): a flow closing later has no public address",
        s.nat_dropped_early.to_string(),
    );
    metric(
        "store_open_records",
        "gauge",
        "Records in the store's open blocks, held in memory until their block is sealed",
        s.store_open_records.to_string(),
    );
    if let Some(memory) = &s.memory {
        metric("memory_resident_bytes", "gauge", "Resident memory (VmRSS)", memory.resident.to_string());
        metric(
            "memory_anonymous_bytes",
            "gauge",
            "Resident anonymous memory (heap, stacks)",
            memory.anonymous.to_string(),
        );
        metric(
            "memory_file_bytes",
            "gauge",
            "Resident file-backed memory (the binary's pages)",
            memory.file.to_string(),
        );
        if let Some(malloc) = &memory.malloc {
            metric("malloc_in_use_bytes", "gauge", "Bytes allocated and not freed", malloc.in_use.to_string());
            metric(
                "malloc_free_bytes",
                "gauge",
                "Bytes freed but kept by the allocator in its arenas",
                malloc.free.to_string(),
            );
        }
    }
    if let Some(backlog) = s.export_backlog {
        metric(
            "export_backlog_records",
            "gauge",
            "Records stored but not yet shipped to the ClickHouse cluster",
            backlog.to_string(),
        );
    }
    ipfix(&mut out, &s.ipfix);
    out
}

/// The IPFIX export's counters, one series per collector.
fn ipfix(out: &mut String, collectors: &[Arc<crate::export::ipfix::live::Stats>]) {
    let Some(first) = collectors.first() else { return };
    for (index, (name, help, _)) in first.series().into_iter().enumerate() {
        let _ = writeln!(out, "# HELP icr_ipfix_{name} {help}\n# TYPE icr_ipfix_{name} counter");
        for stats in collectors {
            let collector = stats.collector.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(out, "icr_ipfix_{name}{{collector=\"{collector}\"}} {}", stats.series()[index].2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipfix_counters_have_one_series_per_collector() {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = |collector: &str, failed: u64| {
            let stats = crate::export::ipfix::live::Stats { collector: collector.into(), ..Default::default() };
            stats.records_failed.store(failed, Relaxed);
            Arc::new(stats)
        };
        let snapshot = Snapshot {
            ipfix: vec![stats("udp://127.0.0.1:2055", 3), stats("tcp://[::1]:4739", 0)],
            ..Snapshot::default()
        };
        let text = render(&snapshot);
        assert!(text.contains("icr_ipfix_records_failed_total{collector=\"udp://127.0.0.1:2055\"} 3\n"), "{text}");
        assert!(text.contains("icr_ipfix_records_failed_total{collector=\"tcp://[::1]:4739\"} 0\n"));
        assert_eq!(text.matches("# TYPE icr_ipfix_records_failed_total counter").count(), 1);
        assert!(!render(&Snapshot::default()).contains("icr_ipfix"), "nothing without collectors");
    }

    #[test]
    fn renders_every_counter_in_the_exposition_format() {
        let mut snapshot = Snapshot { records_stored: 7, write_seconds: 0.0015, ..Snapshot::default() };
        snapshot.probe.0[counter::EVENTS_LOST as usize] = 3;
        let text = render(&snapshot);
        assert!(text.contains("# TYPE icr_probe_events_lost_total counter\nicr_probe_events_lost_total 3\n"));
        assert!(text.contains("icr_records_stored_total 7\n"));
        assert!(text.contains("icr_store_write_seconds 0.001500\n"));
        for name in counter::NAMES {
            assert!(text.contains(&format!("icr_probe_{name}_total ")), "{name}");
        }
        assert!(text.lines().all(|l| l.starts_with('#') || l.split(' ').count() == 2), "one sample per line");
    }

    #[test]
    fn memory_is_read_from_the_process_and_shown_with_the_maps_sizes() {
        let status = "Name:\ticr\nVmRSS:\t   87220 kB\nRssAnon:\t   46096 kB\nRssFile:\t   41124 kB\n";
        let memory = Memory::of_status(status).unwrap();
        assert_eq!((memory.resident, memory.anonymous, memory.file), (87_220 << 10, 46_096 << 10, 41_124 << 10));
        assert_eq!(Memory::of_status("Name:\ticr\n"), None, "a kernel without the fields: no figures");

        let own = Memory::of_self().expect("this process's memory");
        assert!(own.resident > 0 && own.resident >= own.anonymous, "{own:?}");
        let snapshot = Snapshot {
            memory: Some(own),
            assembler: crate::capture::flow::AssemblerSizes { scheduled_checks: 12, ..Default::default() },
            nat_destroyed: 5,
            ..Snapshot::default()
        };
        let text = render(&snapshot);
        assert!(text.contains(&format!("icr_memory_resident_bytes {}\n", own.resident)));
        assert!(text.contains("icr_flow_checks_scheduled 12\n"));
        assert!(text.contains("icr_nat_mappings_destroyed 5\n"));
        #[cfg(target_env = "gnu")]
        assert!(text.contains("icr_malloc_in_use_bytes "), "glibc's figures");
    }
}
