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

/// A metric's type, as Prometheus names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// A sample's value.
#[derive(Clone, Copy, Debug)]
pub enum Value {
    Count(u64),
    Seconds(f64),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Count(count) => write!(f, "{count}"),
            Value::Seconds(seconds) => write!(f, "{seconds:.6}"),
        }
    }
}

/// One metric, declared once: `/metrics` renders it from here, and
/// docs/operate.md's table of every metric is made from the same list
/// (a test holds them together).
pub struct Metric {
    /// Its name after `icr_`.
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// Its value, or `None` where it is not measured (no memory figures
    /// on this kernel; no backlog when not shipping).
    pub value: fn(&Snapshot) -> Option<Value>,
}

/// Declares a metric whose value is a count the snapshot always has.
macro_rules! metric {
    ($kind:ident, $name:literal, $help:literal, |$s:ident| $value:expr) => {
        Metric { name: $name, kind: Kind::$kind, help: $help, value: |$s| Some(Value::Count(($value) as u64)) }
    };
}

/// The XDP program's counters (`probe_common::counter`), each
/// `icr_probe_NAME_total`, in the kernel's index order.
pub const PROBE_HELP: [&str; counter::COUNT as usize] = [
    "Packets the XDP programs saw",
    "Packets that were not IPv4 or IPv6 (ARP, LLDP): passed, not tracked",
    "Packets whose headers were truncated or malformed: passed, not tracked",
    "Flows added to the kernel's flow table",
    "Packets of new flows the full flow table could not take (flow_table_full gaps)",
    "Events the event buffer had no room for (event_buffer_full gaps)",
    "Events sent to the agent",
    "Non-first IP fragments, counted under their flow without ports",
    "Hint events sent (the first payload bytes that name a service)",
    "TCP packets without SYN on the WAN side for no known flow: they open none",
    "New TCP connections on the ports of one that had just ended: the ended one set aside and recorded apart",
    "Such new connections counted into the ended one, when three used one port pair within seconds",
];

/// Every metric of the agent's own, in the order `/metrics` gives them.
pub const METRICS: &[Metric] = &[
    metric!(
        Counter,
        "events_lost_userspace_total",
        "Samples the kernel reported lost in the perf buffers (the fallback path; the ring path counts its losses in icr_probe_events_lost_total)",
        |s| s.events_lost_userspace
    ),
    metric!(Gauge, "flows_open", "Flows the assembler follows", |s| s.open_flows),
    metric!(Counter, "flows_adopted_total", "Flows found by a table sweep whose start event was lost", |s| s
        .flows_adopted),
    metric!(Counter, "flows_local_total", "Link-local, multicast and broadcast flows closed without a record", |s| s
        .local_flows),
    metric!(
        Counter,
        "flows_gateway_total",
        "The gateway's own connections (its resolver upstream, NTP) closed without a record",
        |s| s.gateway_flows
    ),
    metric!(
        Counter,
        "flows_orphan_late_total",
        "WAN halves re-opened by a late packet of a TCP connection already written, closed without a record",
        |s| s.orphans.late_halves
    ),
    metric!(
        Counter,
        "flows_orphan_superseded_total",
        "WAN halves older than the connection whose NAT mapping now holds their public port (their own mapping is gone), closed without a record",
        |s| s.orphans.superseded
    ),
    metric!(
        Counter,
        "flows_orphan_unmapped_total",
        "WAN-only flows no NAT mapping joins to a device (unconfirmed inbound packets), closed without a record",
        |s| s.orphans.unmapped
    ),
    metric!(
        Counter,
        "dns_answers_trusted_total",
        "DNS answers to a device's own question: they may name its later connections",
        |s| s.dns_answers.trusted
    ),
    metric!(
        Counter,
        "dns_answers_unasked_total",
        "DNS answers that name nothing: no device asked the question (unsolicited, or a spoofed question)",
        |s| s.dns_answers.unasked
    ),
    metric!(
        Counter,
        "dns_answers_from_lan_total",
        "DNS answers that name nothing: they arrived on a LAN port, from another device",
        |s| s.dns_answers.from_lan
    ),
    metric!(Counter, "records_stored_total", "ICRs written to the store", |s| s.records_stored),
    metric!(Gauge, "nat_mappings", "Conntrack mappings held", |s| s.nat_mappings),
    metric!(Counter, "nat_overruns_total", "Conntrack event overruns (ENOBUFS), each followed by a resync", |s| s
        .nat_overruns),
    metric!(Gauge, "event_queue", "Events waiting between the event readers and the assembler", |s| s.event_queue),
    metric!(Gauge, "event_queue_capacity", "Capacity of that queue", |s| s.event_queue_capacity),
    metric!(Gauge, "store_bytes", "Size of the store on disk", |s| s.store_bytes),
    Metric {
        name: "store_write_seconds",
        kind: Kind::Gauge,
        help: "Time the last batch took to write and flush",
        value: |s| Some(Value::Seconds(s.write_seconds)),
    },
    metric!(Gauge, "write_queue", "Record batches waiting for the store writer", |s| s.write_queue),
    metric!(Gauge, "write_queue_capacity", "Capacity of that queue", |s| s.write_queue_capacity),
    metric!(Counter, "writer_backpressure_total", "Times the agent waited for the store writer", |s| s
        .writer_backpressure),
    metric!(Counter, "store_write_errors_total", "Failed store writes, each retried until it succeeded", |s| s
        .write_errors),
    metric!(
        Counter,
        "gap_entries_written_total",
        "Gap entries written to the store (loss episodes, rewritten as they grow)",
        |s| s.gaps_recorded
    ),
    metric!(Gauge, "flows_held", "Closed flows whose records are on their way to the store", |s| s
        .assembler
        .held_flows),
    metric!(Gauge, "flows_hinted", "Flows with hint state (service names, DNS questions)", |s| s
        .assembler
        .hinted_flows),
    metric!(Gauge, "flows_named_by_dns", "Open flows named by a DNS answer when they started", |s| s
        .assembler
        .named_flows),
    metric!(Gauge, "flow_checks_scheduled", "Flow checks scheduled (at most one a followed flow)", |s| s
        .assembler
        .scheduled_checks),
    metric!(Gauge, "dns_answers_pending", "DNS answers waiting for their question (at most 10 s)", |s| s
        .assembler
        .pending_dns),
    metric!(Gauge, "dns_cache_entries", "DNS answers held to name later connections", |s| s
        .assembler
        .dns_cache_entries),
    metric!(Gauge, "dns_cache_capacity", "The most DNS answers held ([probe] dns_cache_entries)", |s| s
        .dns_cache_capacity),
    metric!(
        Gauge,
        "nat_mappings_destroyed",
        "Of the conntrack mappings held, those conntrack destroyed (kept for late flows)",
        |s| s.nat_destroyed
    ),
    metric!(
        Counter,
        "nat_mappings_dropped_early_total",
        "Destroyed conntrack mappings dropped before their grace ended ([probe] nat_destroyed_kept reached): a flow closing later has no public address",
        |s| s.nat_dropped_early
    ),
    metric!(
        Gauge,
        "store_open_records",
        "Records in the store's open blocks, held in memory until their block is sealed",
        |s| s.store_open_records
    ),
    Metric {
        name: "memory_resident_bytes",
        kind: Kind::Gauge,
        help: "Resident memory (VmRSS), read when scraped",
        value: |s| s.memory.map(|m| Value::Count(m.resident)),
    },
    Metric {
        name: "memory_anonymous_bytes",
        kind: Kind::Gauge,
        help: "Resident anonymous memory (heap, stacks)",
        value: |s| s.memory.map(|m| Value::Count(m.anonymous)),
    },
    Metric {
        name: "memory_file_bytes",
        kind: Kind::Gauge,
        help: "Resident file-backed memory (the binary's pages)",
        value: |s| s.memory.map(|m| Value::Count(m.file)),
    },
    Metric {
        name: "malloc_in_use_bytes",
        kind: Kind::Gauge,
        help: "Bytes allocated and not freed (glibc's allocator)",
        value: |s| s.memory.and_then(|m| m.malloc).map(|m| Value::Count(m.in_use)),
    },
    Metric {
        name: "malloc_free_bytes",
        kind: Kind::Gauge,
        help: "Bytes freed but kept by the allocator in its arenas",
        value: |s| s.memory.and_then(|m| m.malloc).map(|m| Value::Count(m.free)),
    },
    Metric {
        name: "export_backlog_records",
        kind: Kind::Gauge,
        help: "Records stored but not yet shipped to the ClickHouse cluster (when shipping)",
        value: |s| s.export_backlog.map(Value::Count),
    },
];

fn write_family(out: &mut String, name: &str, kind: Kind, help: &str) {
    let _ = writeln!(out, "# HELP icr_{name} {help}\n# TYPE icr_{name} {}", kind.name());
}

/// The Prometheus text exposition of a snapshot.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    for (index, (name, help)) in counter::NAMES.iter().zip(PROBE_HELP).enumerate() {
        let name = format!("probe_{name}_total");
        write_family(&mut out, &name, Kind::Counter, help);
        let _ = writeln!(out, "icr_{name} {}", s.probe.0[index]);
    }
    for metric in METRICS {
        if let Some(value) = (metric.value)(s) {
            write_family(&mut out, metric.name, metric.kind, metric.help);
            let _ = writeln!(out, "icr_{} {value}", metric.name);
        }
    }
    ipfix(&mut out, &s.ipfix);
    out
}

/// The IPFIX export's counters, one series per collector.
fn ipfix(out: &mut String, collectors: &[Arc<crate::export::ipfix::live::Stats>]) {
    let Some(first) = collectors.first() else { return };
    for (index, (name, help, _)) in first.series().into_iter().enumerate() {
        write_family(out, &format!("ipfix_{name}"), Kind::Counter, help);
        for stats in collectors {
            let collector = stats.collector.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(out, "icr_ipfix_{name}{{collector=\"{collector}\"}} {}", stats.series()[index].2);
        }
    }
}

/// docs/operate.md's table of every metric, made from the declarations.
pub fn reference_table() -> String {
    let mut out = String::from("| metric | type | what |\n| --- | --- | --- |\n");
    let mut row = |name: &str, kind: Kind, help: &str| {
        let _ = writeln!(out, "| `icr_{name}` | {} | {help} |", kind.name());
    };
    for (name, help) in counter::NAMES.iter().zip(PROBE_HELP) {
        row(&format!("probe_{name}_total"), Kind::Counter, help);
    }
    for metric in METRICS {
        row(metric.name, metric.kind, metric.help);
    }
    for (name, help, _) in crate::export::ipfix::live::Stats::default().series() {
        row(&format!("ipfix_{name}{{collector}}"), Kind::Counter, help);
    }
    out
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

    /// The docs' table of every metric is the declarations' (regenerate it
    /// with `ICR_BLESS_DOCS=1 cargo test -p probe-user --lib metrics`), and
    /// every `icr_..._total` the docs name is declared.
    #[test]
    fn the_docs_list_every_metric_as_declared() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
        let operate = docs.join("operate.md");
        let text = std::fs::read_to_string(&operate).unwrap();
        let (begin, end) = ("<!-- metrics: made from serve/metrics.rs -->\n", "<!-- end of metrics -->");
        let from = text.find(begin).expect("operate.md marks its table of metrics") + begin.len();
        let to = from + text[from..].find(end).expect("and its end");
        let wanted = reference_table();
        if text[from..to] != wanted {
            if std::env::var_os("ICR_BLESS_DOCS").is_some() {
                std::fs::write(&operate, format!("{}{wanted}{}", &text[..from], &text[to..])).unwrap();
            } else {
                panic!(
                    "docs/operate.md's table of metrics is not the declarations'; regenerate it with ICR_BLESS_DOCS=1"
                );
            }
        }

        let declared: std::collections::HashSet<String> = render(&Snapshot {
            memory: Some(Memory { malloc: Some(Malloc::default()), ..Memory::default() }),
            export_backlog: Some(0),
            ipfix: vec![Arc::default()],
            ..Snapshot::default()
        })
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.split(' ').next().map(String::from))
        .collect();
        let mut pages: Vec<_> = std::fs::read_dir(&docs).unwrap().map(|entry| entry.unwrap().path()).collect();
        pages.push(docs.join("../README.md"));
        for page in pages.iter().filter(|page| page.extension().is_some_and(|e| e == "md")) {
            let text = std::fs::read_to_string(page).unwrap();
            for named in text.split('`').filter(|word| word.starts_with("icr_") && word.ends_with("_total")) {
                let named = named.split('{').next().unwrap_or(named);
                assert!(declared.contains(named), "{} names {named}, which is not a metric", page.display());
            }
        }
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
