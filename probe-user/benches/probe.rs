//! `cargo xtask bench probe`: what the probe costs per packet. Needs root.
//! Machines are noisy (and this one is shared): every figure stands beside a
//! baseline measured in the same run, and the ratios are what to quote.
//!
//! 1. Kernel cost per packet from `BPF_PROG_TEST_RUN`, beside a bare
//!    `XDP_PASS` program and a program that parses and does the one flow
//!    table lookup and nothing else (probe-ebpf's `baseline`: the floor a
//!    flow-table design cannot go under), and beside that floor plus each
//!    of the probe's per-packet steps alone (clocks, a counter, atomics), so
//!    that each step's cost reads as the difference;
//!    then reserve contention: one flow event per run sent from one CPU and
//!    from two at once, through one shared ring and through a ring per CPU.
//!    Then, per path:
//!    - mid-flow TCP: one established flow, the same data packet from the
//!      server `repeat` times;
//!    - SYN (new flow), ClientHello (a 1,400-byte segment from the client on
//!      a flow just opened: a hint), DNS query and QUIC Initial (each the
//!      first packet of a new UDP flow: a start event and a hint): these
//!      paths are taken once per flow, so a repeated frame would measure the
//!      mid-flow path after its first run. They are measured as one run per
//!      call on distinct flows, beside the bare program and a mid-flow packet
//!      measured the same way; `*_est_ns` is the large-repeat mid-flow cost
//!      plus the path's extra cost over mid-flow in that one-call setting.
//!    - the LAN egress program (TC), beside a bare TC classifier on the same
//!      frame: a forwarded packet (it returns at once), the gateway's own
//!      mid-flow packet, and the gateway resolver's answer to a query XDP
//!      saw (counted and sent as a hint; one run per call).
//! 2. Live: packets per second through a veth pair between two namespaces
//!    made for the run, from an AF_PACKET `sendmmsg` sender (a mix of TCP,
//!    DNS and QUIC connections, 4,096 at a time, no 5-tuple reused) into the
//!    peer, without XDP, with the bare program and with the probe (`icr_lan`),
//!    whose events are drained meanwhile the way the agent does
//!    (`events::spawn_readers`), through the per-CPU ring buffers and, once more,
//!    through the perf buffers of the fallback; events lost are reported (the kernel's
//!    counter, plus any sent but never received), and if any are lost at the
//!    highest rate, a rate at which none are. With `bpf_stats` on, the
//!    programs' own run time per packet, live; and, as a diagnostic, the
//!    probe's with its event buffers closed (the cost without delivery).
//! 3. softflowd on the same interface with the same traffic: its CPU time per
//!    million packets, beside ours (XDP run time + the event reader's CPU).
//!
//! The last line is one JSON object for scripts. Knobs: ICR_BENCH_REPEAT,
//! ICR_BENCH_FLOWS, ICR_BENCH_SECONDS (per live phase, default 4),
//! ICR_BENCH_MAX_PACKETS (per live phase), ICR_BENCH_FLOW_TABLE (the flow
//! table's entries, for the probe and the floors), ICR_BENCH_SEGMENTS (server
//! segments per connection, default 32), ICR_BENCH_SENDER_CPU and
//! ICR_BENCH_READER_CPU (pin those threads), ICR_BENCH_LIVE=0 (test runs
//! only), ICR_BENCH_EVENTS=ring|perf (the probe's event path; default: what
//! the agent would choose), ICR_BENCH_VERBOSE (softflowctl's statistics).
mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use etherparse::{PacketBuilder, TcpHeader};
use icr::{
    capture::events::{self, ProbeEvent},
    capture::probe::{Baseline, EventPath, EventReader, Floor, Probe, ProbeOptions, RingLayout},
    capture::tuple::{Tuple, ipv4},
};
use icr_test_kit::netns::{self, NetnsPair};
use probe_common::{Proto, counter, event_kind, role};
use serde_json::{Map, Value, json};
use support::{
    softflowd::Softflowd,
    traffic::{self, Traffic},
};

const ROUNDS: usize = 5;
/// Rounds of the large-repeat runs, each program in turn within a round, so
/// that a noisy spell on a shared machine hits them alike.
const REPEAT_ROUNDS: usize = 25;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The event path to bench: ICR_BENCH_EVENTS, else the agent's choice.
fn event_path() -> Option<EventPath> {
    match std::env::var("ICR_BENCH_EVENTS").ok().as_deref() {
        Some("ring") => Some(EventPath::Ring),
        Some("perf") => Some(EventPath::Perf),
        _ => None,
    }
}

/// The flow table size of the probe and of the floors it is measured
/// against (ICR_BENCH_FLOW_TABLE; default: the probe's default).
fn flow_table_size() -> u32 {
    env("ICR_BENCH_FLOW_TABLE", probe_common::DEFAULT_FLOW_TABLE_SIZE).max(1)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

// ---------------------------------------------------------------- test runs

const CLIENT: [u8; 4] = [192, 168, 1, 23];
const SERVER: [u8; 4] = [203, 0, 113, 10];

/// A TCP frame between CLIENT:`client_port` and SERVER:443.
fn tcp(client_port: u16, from_client: bool, syn: bool, payload: usize) -> Vec<u8> {
    let (src, dst, sport, dport) =
        if from_client { (CLIENT, SERVER, client_port, 443) } else { (SERVER, CLIENT, 443, client_port) };
    let mut header = TcpHeader::new(sport, dport, 1, 64240);
    header.syn = syn;
    header.ack = !syn || !from_client;
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0x17], [2, 0, 0, 0, 0, 1])
        .ipv4(src, dst, 64)
        .tcp_header(header)
        .write(&mut frame, &vec![0x42; payload])
        .unwrap();
    frame
}

fn udp(client_port: u16, server: [u8; 4], server_port: u16, payload: &[u8]) -> Vec<u8> {
    udp_between(true, client_port, server, server_port, payload)
}

/// As [`udp`], from the server back to CLIENT, as the gateway's resolver
/// sends its answer.
fn udp_back(client_port: u16, server: [u8; 4], server_port: u16, payload: &[u8]) -> Vec<u8> {
    udp_between(false, client_port, server, server_port, payload)
}

fn udp_between(from_client: bool, client_port: u16, server: [u8; 4], server_port: u16, payload: &[u8]) -> Vec<u8> {
    let (client_mac, gateway_mac) = ([2, 0, 0, 0, 0, 0x17], [2, 0, 0, 0, 0, 1]);
    let builder = if from_client {
        PacketBuilder::ethernet2(client_mac, gateway_mac).ipv4(CLIENT, server, 64).udp(client_port, server_port)
    } else {
        PacketBuilder::ethernet2(gateway_mac, client_mac).ipv4(server, CLIENT, 64).udp(server_port, client_port)
    };
    let mut frame = Vec::new();
    builder.write(&mut frame, payload).unwrap();
    frame
}

/// The gateway's LAN address, where its own resolver listens.
const GATEWAY: [u8; 4] = [192, 168, 1, 1];

fn quic_initial() -> Vec<u8> {
    let mut payload = vec![0xc3, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x44, 0xd0];
    payload.resize(1200, 0);
    payload
}

const DNS_QUERY: [u8; 33] = [
    0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w', b'w', b'w', 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3,
    b'c', b'o', b'm', 0, 0, 1, 0, 1,
];

/// Its answer: one A record.
const DNS_ANSWER: [u8; 49] = [
    0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0, 3, b'w', b'w', b'w', 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e',
    3, b'c', b'o', b'm', 0, 0, 1, 0, 1, 0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 1, 0x2c, 0, 4, 198, 51, 100, 10,
];

fn clear_flows(probe: &mut Probe) -> Result<()> {
    for key in probe.flow_keys()? {
        probe.remove_flow(&key)?;
    }
    Ok(())
}

/// Mean ns of one run per call of `timed(i)` on flows `0..flows`, each after
/// `prepare(i)` (untimed) has put flow `i` in the state to measure; and of
/// the bare program on the same frames. The flow table starts empty.
fn per_call(
    probe: &mut Probe,
    baseline: &Baseline,
    buffers: &mut EventReader,
    flows: u16,
    prepare: impl Fn(u16) -> Vec<Vec<u8>>,
    timed: impl Fn(u16) -> Vec<u8>,
) -> Result<(f64, f64)> {
    clear_flows(probe)?;
    let (mut total, mut bare) = (0u64, 0u64);
    let mut sink = Vec::new();
    for i in 0..flows {
        for frame in prepare(i) {
            probe.test_run(role::LAN, &frame)?;
        }
        let frame = timed(i);
        bare += baseline.test_run_repeat(&frame, 1)?;
        total += probe.test_run(role::LAN, &frame)?.duration_ns;
        if i % 50 == 49 {
            sink.clear();
            events::drain(buffers, &mut sink);
        }
    }
    sink.clear();
    events::drain(buffers, &mut sink);
    Ok((total as f64 / f64::from(flows), bare as f64 / f64::from(flows)))
}

struct TestRuns {
    json: Map<String, Value>,
}

fn test_runs() -> Result<TestRuns> {
    let repeat: u32 = env("ICR_BENCH_REPEAT", 200_000);
    let flows: u16 = env("ICR_BENCH_FLOWS", 10_000u16).min(30_000);
    let options = ProbeOptions { events: event_path(), flow_table_size: flow_table_size(), ..ProbeOptions::default() };
    let mut baseline = Baseline::load_with_rings(options.flow_table_size, CONTENTION_RING_BYTES)?;
    let mut probe = Probe::load(options)?;
    let mut buffers = probe.open_events()?;

    // Large repeat: the bare program, parsing plus the lookup (which finds
    // the flow, as the probe does), and a mid-flow packet of an established
    // flow: data from the server (never a hint).
    let data = tcp(40000, false, false, 100);
    probe.test_run(role::LAN, &tcp(40000, true, true, 0))?;
    let server_to_client = Tuple {
        src: ipv4(203, 0, 113, 10),
        src_port: 443,
        dst: ipv4(192, 168, 1, 23),
        dst_port: 40000,
        proto: Proto::Tcp,
    };
    baseline.insert_flow(server_to_client.key().0)?;
    let floors: Vec<Floor> = Floor::ALL.into_iter().filter(|floor| baseline.has(*floor)).collect();
    let mut floor_reps = vec![Vec::new(); floors.len()];
    let mut mid_rep = Vec::new();
    // The LAN egress program (TC), on the same frame: its bare floor, a
    // forwarded packet (what nearly every packet leaving a LAN port is),
    // and the gateway's own packet counted against its flow.
    let (mut tc_bare_rep, mut egress_forwarded_rep, mut egress_gateway_rep) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..REPEAT_ROUNDS {
        for (floor, reps) in floors.iter().zip(&mut floor_reps) {
            reps.push(baseline.floor_test_run_repeat(*floor, &data, repeat)? as f64);
        }
        mid_rep.push(probe.test_run_repeat(role::LAN, &data, repeat)?.duration_ns as f64);
        tc_bare_rep.push(baseline.tc_pass_test_run_repeat(&data, repeat)? as f64);
        egress_forwarded_rep.push(probe.egress_test_run_repeat(&data, false, repeat)?.duration_ns as f64);
        egress_gateway_rep.push(probe.egress_test_run_repeat(&data, true, repeat)?.duration_ns as f64);
        let mut sink = Vec::new();
        events::drain(&mut buffers, &mut sink);
    }

    // One run per call on distinct flows. Ports differ per round so that a
    // round never meets the flows of the one before (the table is cleared
    // too).
    let quic = quic_initial();
    let mut rows: Vec<(&str, &str, Vec<f64>, Vec<f64>)> = vec![
        ("midflow", "mid-flow TCP, 100 B from the server (no hint)", vec![], vec![]),
        ("syn", "SYN: new flow, start event", vec![], vec![]),
        ("clienthello", "ClientHello: 1,400 B client segment, hint", vec![], vec![]),
        ("dns", "DNS query: new UDP flow, start + hint", vec![], vec![]),
        ("quic_initial", "QUIC Initial 1,200 B: new UDP flow, start + hint", vec![], vec![]),
    ];
    for round in 0..ROUNDS {
        let port = move |i: u16| 1024 + ((u32::from(i) + round as u32 * 11_000) % 64_000) as u16;
        let b = &mut buffers;
        let results = [
            per_call(
                &mut probe,
                &baseline,
                b,
                flows,
                |i| vec![tcp(port(i), true, true, 0), tcp(port(i), false, true, 0)],
                |i| tcp(port(i), false, false, 100),
            )?,
            per_call(&mut probe, &baseline, b, flows, |_| vec![], |i| tcp(port(i), true, true, 0))?,
            per_call(
                &mut probe,
                &baseline,
                b,
                flows,
                |i| vec![tcp(port(i), true, true, 0), tcp(port(i), false, true, 0)],
                |i| tcp(port(i), true, false, 1400),
            )?,
            per_call(
                &mut probe,
                &baseline,
                b,
                flows,
                |_| vec![],
                |i| udp(port(i), [198, 51, 100, 53], 53, &DNS_QUERY),
            )?,
            per_call(&mut probe, &baseline, b, flows, |_| vec![], |i| udp(port(i), SERVER, 443, &quic))?,
        ];
        for (row, (probe_ns, bare_ns)) in rows.iter_mut().zip(results) {
            row.2.push(probe_ns);
            row.3.push(bare_ns);
        }
    }
    // The gateway resolver's answer on egress: one run per call, each on a
    // flow whose query XDP saw (untimed): counted, and sent as a hint.
    let mut answer_rows: (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let port = move |i: u16| 1024 + ((u32::from(i) + round as u32 * 11_000) % 64_000) as u16;
        clear_flows(&mut probe)?;
        let (mut total, mut bare) = (0u64, 0u64);
        let mut sink = Vec::new();
        for i in 0..flows {
            probe.test_run(role::LAN, &udp(port(i), GATEWAY, 53, &DNS_QUERY))?;
            let answer = udp_back(port(i), GATEWAY, 53, &DNS_ANSWER);
            bare += baseline.tc_pass_test_run_repeat(&answer, 1)?;
            total += probe.egress_test_run(&answer, true)?.duration_ns;
            if i % 50 == 49 {
                sink.clear();
                events::drain(&mut buffers, &mut sink);
            }
        }
        sink.clear();
        events::drain(&mut buffers, &mut sink);
        answer_rows.0.push(total as f64 / f64::from(flows));
        answer_rows.1.push(bare as f64 / f64::from(flows));
    }
    let counters = probe.counters()?;
    let floor_ns: Vec<(Floor, f64)> = floors.iter().copied().zip(floor_reps.into_iter().map(median)).collect();
    let floor = |wanted: Floor| floor_ns.iter().find(|(f, _)| *f == wanted).map(|(_, ns)| *ns);
    let (bare, lookup, mid) =
        (floor(Floor::Pass).unwrap_or(f64::NAN), floor(Floor::Lookup).unwrap_or(f64::NAN), median(mid_rep));
    let mid_one = median(rows[0].2.clone());

    let mut json = Map::new();
    println!(
        "== BPF_PROG_TEST_RUN (median of {ROUNDS} rounds; ns per packet; events through the {}) ==",
        probe.event_path().name()
    );
    println!("  large repeat (median of {REPEAT_ROUNDS} rounds of {repeat} runs of one frame):");
    println!("    bare XDP_PASS                                   {bare:8.1}");
    println!("    parse + one flow table lookup (the floor)       {lookup:8.1}   {:6.2}x bare", lookup / bare);
    println!(
        "    mid-flow TCP, 100 B from the server             {mid:8.1}   {:6.2}x bare, {:.2}x the floor",
        mid / bare,
        mid / lookup
    );
    println!("  what each per-packet step adds to the floor (the floor plus that one step, minus the floor):");
    for (step, ns) in &floor_ns {
        let (label, key) = match step {
            Floor::Parse => ("parse and build the key (the floor minus the lookup)", "parse"),
            Floor::Clock => ("precise clock, bpf_ktime_get_ns", "clock"),
            Floor::CoarseClock => ("coarse clock, bpf_ktime_get_coarse_ns", "coarse_clock"),
            Floor::Now => ("the probe's clock (replay override + precise)", "now"),
            Floor::Counter => ("one per-CPU counter", "counter"),
            Floor::Atomics => ("two atomic adds on the flow", "atomics"),
            Floor::Pass | Floor::Lookup | Floor::Upsert => continue,
        };
        if *step == Floor::Parse {
            println!("    {label:<47} {ns:8.1}");
            json.insert("parse_only_ns".into(), json!(ns));
        } else {
            println!("    {label:<47} {:8.1}", ns - lookup);
            json.insert(format!("step_{key}_ns"), json!(ns - lookup));
        }
    }
    json.insert("event_path".into(), json!(probe.event_path().name()));
    json.insert("lookup_baseline_ns".into(), json!(lookup));
    json.insert("midflow_over_lookup".into(), json!(mid / lookup));
    println!("  one run per call ({flows} distinct flows per round; per-call overhead included):");
    println!("    {:<48} {:>8} {:>8} {:>9} {:>9}", "", "probe", "bare", "x bare", "est. ns");
    json.insert("xdp_pass_ns".into(), json!(bare));
    json.insert("midflow_ns".into(), json!(mid));
    json.insert("midflow_ratio".into(), json!(mid / bare));
    for (key, label, probe_ns, bare_ns) in rows {
        let (p, b) = (median(probe_ns), median(bare_ns));
        // Large-repeat mid-flow cost plus this path's extra over mid-flow.
        let est = mid + (p - mid_one);
        println!("    {label:<48} {p:8.1} {b:8.1} {:8.2}x {est:9.1}", p / b);
        if key == "midflow" {
            json.insert("midflow_single_ns".into(), json!(p));
            json.insert("midflow_single_xdp_pass_ns".into(), json!(b));
        } else {
            json.insert(format!("{key}_ns"), json!(p));
            json.insert(format!("{key}_xdp_pass_ns"), json!(b));
            json.insert(format!("{key}_ratio"), json!(p / b));
            json.insert(format!("{key}_est_ns"), json!(est));
            json.insert(format!("{key}_est_ratio"), json!(est / bare));
            // The measure: each event path against the mid-flow path.
            json.insert(format!("{key}_over_midflow"), json!(est / mid));
        }
    }
    println!(
        "  (est. ns = large-repeat mid-flow + (path - mid-flow, one run per call); ratio to the large-repeat bare: est/{bare:.1})"
    );
    let (tc_bare, forwarded, gateway) = (median(tc_bare_rep), median(egress_forwarded_rep), median(egress_gateway_rep));
    let (answer, answer_bare) = (median(answer_rows.0), median(answer_rows.1));
    println!("  the LAN egress program (TC) beside XDP, same frame, same run:");
    println!("    bare TC classifier                              {tc_bare:8.1}   (bare XDP_PASS {bare:.1})");
    println!(
        "    forwarded packet (returns at once)              {forwarded:8.1}   {:6.2}x bare TC, {:+.1} ns",
        forwarded / tc_bare,
        forwarded - tc_bare
    );
    println!(
        "    the gateway's own mid-flow packet               {gateway:8.1}   {:6.2}x bare TC, {:+.1} ns (XDP mid-flow: {:+.1} ns over bare XDP)",
        gateway / tc_bare,
        gateway - tc_bare,
        mid - bare
    );
    println!(
        "    the gateway resolver's answer: counted + hint   {answer:8.1}   {:6.2}x bare TC (one run per call; bare {answer_bare:.1})",
        answer / answer_bare
    );
    json.insert("tc_pass_ns".into(), json!(tc_bare));
    json.insert("egress_forwarded_ns".into(), json!(forwarded));
    json.insert("egress_forwarded_over_tc_pass".into(), json!(forwarded / tc_bare));
    json.insert("egress_gateway_midflow_ns".into(), json!(gateway));
    json.insert("egress_gateway_midflow_over_tc_pass".into(), json!(gateway / tc_bare));
    json.insert("egress_gateway_midflow_over_xdp_midflow".into(), json!(gateway / mid));
    json.insert("egress_dns_answer_ns".into(), json!(answer));
    json.insert("egress_dns_answer_tc_pass_ns".into(), json!(answer_bare));
    println!(
        "  events sent {}, lost {}, flow table full {}",
        counters.get(counter::EVENTS_SENT),
        counters.get(counter::EVENTS_LOST),
        counters.get(counter::FLOW_TABLE_FULL)
    );
    json.extend(ring_contention(&mut baseline, &data)?);
    Ok(TestRuns { json })
}

/// Each contention ring's size: two CPUs' `CONTENTION_REPEAT` records fit.
const CONTENTION_RING_BYTES: u32 = 64 << 20;
const CONTENTION_REPEAT: u32 = 100_000;

/// Reserve contention on the event ring: ns per event sent through one ring
/// with one CPU sending, with both CPUs sending at once, and through one
/// ring per CPU with both sending. Rounds interleave the three.
fn ring_contention(baseline: &mut Baseline, frame: &[u8]) -> Result<Map<String, Value>> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mut json = Map::new();
    if cpus < 2 {
        println!("  reserve contention: needs two CPUs, this machine has {cpus}");
        return Ok(json);
    }
    let (mut alone, mut shared, mut per_cpu) = (Vec::new(), Vec::new(), Vec::new());
    let (_, lost_before) = baseline.drain_rings()?;
    let mut records = 0;
    for _ in 0..REPEAT_ROUNDS {
        alone.push(run_on_cpus(baseline, RingLayout::Shared, frame, 1)?);
        records += baseline.drain_rings()?.0;
        shared.push(run_on_cpus(baseline, RingLayout::Shared, frame, 2)?);
        records += baseline.drain_rings()?.0;
        per_cpu.push(run_on_cpus(baseline, RingLayout::PerCpu, frame, 2)?);
        records += baseline.drain_rings()?.0;
    }
    let (_, lost_after) = baseline.drain_rings()?;
    let lost = lost_after - lost_before;
    let expected = REPEAT_ROUNDS as u64 * 5 * u64::from(CONTENTION_REPEAT);
    if records + lost != expected {
        bail!("reserve contention: {records} records and {lost} without room, {expected} sent");
    }
    let (alone, shared, per_cpu) = (median(alone), median(shared), median(per_cpu));
    println!(
        "  reserve contention (ns per flow event sent, median of {REPEAT_ROUNDS} rounds of {CONTENTION_REPEAT} per CPU):"
    );
    println!("    one ring, one CPU sending                       {alone:8.1}");
    println!("    one ring, both CPUs sending at once             {shared:8.1}   {:6.2}x one CPU", shared / alone);
    println!("    a ring per CPU, both CPUs sending at once       {per_cpu:8.1}   {:6.2}x one CPU", per_cpu / alone);
    println!("    ({records} records read back, {lost} sends found no room)");
    json.insert("ring_event_one_cpu_ns".into(), json!(alone));
    json.insert("ring_event_shared_two_cpus_ns".into(), json!(shared));
    json.insert("ring_event_per_cpu_two_cpus_ns".into(), json!(per_cpu));
    json.insert("ring_shared_contention".into(), json!(shared / alone));
    json.insert("ring_per_cpu_contention".into(), json!(per_cpu / alone));
    Ok(json)
}

/// Runs `layout`'s program on CPUs `0..cpus` at once, a thread pinned to
/// each; returns the mean of their ns per run.
fn run_on_cpus(baseline: &Baseline, layout: RingLayout, frame: &[u8], cpus: usize) -> Result<f64> {
    let start = std::sync::Barrier::new(cpus);
    let per_run = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..cpus)
            .map(|cpu| {
                let start = &start;
                scope.spawn(move || {
                    pin(cpu);
                    start.wait();
                    baseline.ring_test_run_repeat(layout, frame, CONTENTION_REPEAT)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| thread.join().map_err(|_| anyhow::anyhow!("a sending thread panicked"))?)
            .collect::<Result<Vec<u64>>>()
    })?;
    Ok(per_run.iter().sum::<u64>() as f64 / cpus as f64)
}

// --------------------------------------------------------------------- live

/// Run time, run count and JIT size of the XDP program attached to the
/// receiver.
fn prog_stats(pair: &NetnsPair) -> Result<(u64, u64, u32)> {
    let id = pair.rx_xdp_prog_id()?.context("no XDP program on the receiving interface")?;
    for info in aya::programs::loaded_programs() {
        let info = info?;
        if info.id() == id {
            return Ok((info.run_time().as_nanos() as u64, info.run_count(), info.size_jitted()));
        }
    }
    bail!("program {id} not found")
}

/// Load average and CPU pressure (the share of time some task waited for a
/// CPU, last 10 s): how busy the machine was around the figures.
fn loadavg() -> String {
    let load = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let pressure = std::fs::read_to_string("/proc/pressure/cpu").unwrap_or_default();
    let some =
        pressure.lines().find(|l| l.starts_with("some")).and_then(|l| l.split_whitespace().nth(1)).unwrap_or("avg10=?");
    format!("{load}, CPU pressure {some}%")
}

struct Phase {
    sent: traffic::Sent,
    mix: traffic::Mix,
    received: u64,
    rx_dropped: u64,
}

impl Phase {
    fn pps(&self) -> f64 {
        self.received as f64 / self.sent.elapsed.as_secs_f64()
    }
}

/// Sends traffic from the sender's namespace (a thread made for it) at `rate`
/// (None: flat out) and counts what the receiving interface received.
fn send_phase(
    pair: &NetnsPair,
    macs: ([u8; 6], [u8; 6]),
    segments: u32,
    first_conn: u64,
    rate: Option<f64>,
    seconds: f64,
    max_packets: u64,
) -> Result<Phase> {
    let (rx0, drop0) = pair.rx_stats()?;
    let (ns, interface) = (pair.tx.name().to_string(), pair.tx_if.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let sender = std::thread::spawn(move || -> Result<(traffic::Sent, traffic::Mix)> {
        netns::enter(&ns)?;
        if let Some(cpu) = std::env::var("ICR_BENCH_SENDER_CPU").ok().and_then(|n| n.parse::<usize>().ok()) {
            pin(cpu);
        }
        let mut traffic = Traffic::new(macs.0, macs.1, segments, first_conn);
        let sent = traffic::send(&interface, &mut traffic, rate, max_packets, Duration::from_secs_f64(seconds), &stop)?;
        Ok((sent, traffic.mix))
    });
    let (sent, mix) = sender.join().map_err(|_| anyhow::anyhow!("the sender panicked"))??;
    // Let the receiver's softirq finish what is queued.
    std::thread::sleep(Duration::from_millis(100));
    let (rx1, drop1) = pair.rx_stats()?;
    Ok(Phase { sent, mix, received: rx1 - rx0, rx_dropped: drop1 - drop0 })
}

#[derive(Default, Debug)]
struct ReaderResult {
    flow_events: u64,
    hints: u64,
    lost_records: u64,
    malformed: u64,
    cpu: Duration,
    /// The longest time between two batches of events received: a reader
    /// kept off the CPU this long lets the buffers fill.
    longest_gap: Duration,
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; plain syscall on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

fn thread_cpu() -> Duration {
    // SAFETY: clock_gettime with a valid pointer.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The agent's event path: a current-thread tokio runtime on its own thread
/// running `events::spawn_readers` into a channel of the agent's size, and a
/// consumer counting what arrives, until `stop`.
fn spawn_reader(
    reader: Option<EventReader>,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Result<ReaderResult>> {
    std::thread::spawn(move || {
        if let Some(cpu) = std::env::var("ICR_BENCH_READER_CPU").ok().and_then(|n| n.parse::<usize>().ok()) {
            pin(cpu);
        }
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let cpu0 = thread_cpu();
        let mut result = runtime.block_on(async move {
            let (tx, mut rx) = tokio::sync::mpsc::channel(1 << 16);
            match reader {
                Some(reader) => drop(events::spawn_readers(reader, tx)?),
                None => drop(tx),
            }
            let mut result = ReaderResult::default();
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut last: Option<Instant> = None;
            loop {
                tokio::select! {
                    event = rx.recv() => match event {
                        Some(ProbeEvent::Flow(_)) => {
                            let now = Instant::now();
                            if let Some(last) = last {
                                result.longest_gap = result.longest_gap.max(now - last);
                            }
                            last = Some(now);
                            result.flow_events += 1;
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(ProbeEvent::Hint(event, _)) => {
                            debug_assert_eq!(event.kind, event_kind::HINT);
                            result.hints += 1;
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(ProbeEvent::Lost { count, .. }) => result.lost_records += count,
                        Some(ProbeEvent::Malformed { .. }) => result.malformed += 1,
                        Some(ProbeEvent::CaughtUp { .. } | ProbeEvent::ReaderStopped { .. }) => {}
                        None => break,
                    },
                    _ = tick.tick() => if stop.load(Ordering::Relaxed) { break },
                }
            }
            anyhow::Ok(result)
        })?;
        result.cpu = thread_cpu() - cpu0;
        Ok(result)
    })
}

struct ProbePhase {
    path: EventPath,
    phase: Phase,
    reader: ReaderResult,
    events_sent: u64,
    events_lost: u64,
    packets_seen: u64,
    flows_created: u64,
    table_full: u64,
    run_ns: u64,
    run_cnt: u64,
    jited: u32,
    irq_work: u64,
}

impl ProbePhase {
    /// Events lost: those the kernel could not put in a buffer (the
    /// buffers' lost records count the same ones again), those sent but
    /// never received, and malformed ones.
    fn lost(&self) -> u64 {
        let received = self.reader.flow_events + self.reader.hints;
        self.events_lost + self.events_sent.saturating_sub(received) + self.reader.malformed
    }
}

/// IRQ work interrupts so far, all CPUs (each perf event wakeup from XDP
/// raises one).
fn irq_work_interrupts() -> u64 {
    let text = std::fs::read_to_string("/proc/interrupts").unwrap_or_default();
    text.lines()
        .find(|line| line.trim_start().starts_with("IWI:"))
        .map(|line| line.split_whitespace().skip(1).map_while(|n| n.parse::<u64>().ok()).sum())
        .unwrap_or(0)
}

/// The probe on the receiver with its events drained live. Without
/// `deliver`, its event buffers are not read: perf buffers are not even
/// opened (each event fails at once), a ring fills and then fails each
/// event; counted lost, which shows what the probe costs without delivery.
#[allow(clippy::too_many_arguments)]
fn probe_phase(
    pair: &NetnsPair,
    macs: ([u8; 6], [u8; 6]),
    segments: u32,
    first_conn: u64,
    rate: Option<f64>,
    seconds: f64,
    max_packets: u64,
    deliver: bool,
    events: Option<EventPath>,
) -> Result<ProbePhase> {
    let mut probe =
        Probe::load(ProbeOptions { events, flow_table_size: flow_table_size(), ..ProbeOptions::default() })?;
    pair.rx.run(|| probe.attach(&pair.rx_if, role::LAN))??;
    let (stop, received) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let reader = if deliver { Some(probe.open_events()?) } else { None };
    let path = probe.event_path();
    let reader = spawn_reader(reader, stop.clone(), received.clone());
    let stats0 = prog_stats(pair)?;
    let iwi0 = irq_work_interrupts();
    let phase = send_phase(pair, macs, segments, first_conn, rate, seconds, max_packets);
    // Wait (bounded) for the reader to take every event sent.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let counters = probe.counters()?;
        if !deliver
            || received.load(Ordering::Relaxed) >= counters.get(counter::EVENTS_SENT)
            || Instant::now() > deadline
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let stats1 = prog_stats(pair)?;
    let irq_work = irq_work_interrupts() - iwi0;
    stop.store(true, Ordering::Relaxed);
    let reader = reader.join().map_err(|_| anyhow::anyhow!("the reader panicked"))??;
    let phase = phase?;
    let counters = probe.counters()?;
    Ok(ProbePhase {
        path,
        phase,
        reader,
        events_sent: counters.get(counter::EVENTS_SENT),
        events_lost: counters.get(counter::EVENTS_LOST),
        packets_seen: counters.get(counter::PACKETS),
        flows_created: counters.get(counter::FLOWS_CREATED),
        table_full: counters.get(counter::FLOW_TABLE_FULL),
        run_ns: stats1.0 - stats0.0,
        run_cnt: stats1.1 - stats0.1,
        jited: stats1.2,
        irq_work,
    })
}

fn live() -> Result<Map<String, Value>> {
    let seconds: f64 = env("ICR_BENCH_SECONDS", 4.0);
    let max_packets: u64 = env("ICR_BENCH_MAX_PACKETS", 20_000_000);
    let segments: u32 = env("ICR_BENCH_SEGMENTS", 32u32).clamp(2, 1000);
    let pair = NetnsPair::create("icrb")?;
    let macs = (pair.mac(&pair.tx, &pair.tx_if)?, pair.mac(&pair.rx, &pair.rx_if)?);
    // Each phase gets its own range of connection numbers.
    let mut conn_base = 0u64;
    let mut next_base = || {
        conn_base += 100_000_000;
        conn_base
    };
    let mut json = Map::new();
    println!(
        "== live: veth between namespaces {} and {}, AF_PACKET sendmmsg sender ({seconds} s per phase; load average {}) ==",
        pair.tx.name(),
        pair.rx.name(),
        loadavg()
    );

    // Warm-up (page cache, allocator, CPU frequency), not reported.
    send_phase(&pair, macs, segments, next_base(), None, 0.5, max_packets)?;

    let none = send_phase(&pair, macs, segments, next_base(), None, seconds, max_packets)?;

    // Program run time per packet, for the bare program and the probe: the
    // kernel's bpf_stats, on while this fd is open (closed on any exit).
    let stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    let (bare, bare_ns, bare_cnt, bare_jited) = {
        let mut baseline = Baseline::load(16)?;
        pair.rx.run(|| baseline.attach(Floor::Pass, &pair.rx_if))??;
        let s0 = prog_stats(&pair)?;
        let phase = send_phase(&pair, macs, segments, next_base(), None, seconds, max_packets)?;
        let s1 = prog_stats(&pair)?;
        (phase, s1.0 - s0.0, s1.1 - s0.1, s1.2)
    };
    // The live floor: parse, look up, create what is missing, in a table
    // the probe's size.
    let (upsert_ns, upsert_cnt) = {
        let mut baseline = Baseline::load(flow_table_size())?;
        pair.rx.run(|| baseline.attach(Floor::Upsert, &pair.rx_if))??;
        let s0 = prog_stats(&pair)?;
        send_phase(&pair, macs, segments, next_base(), None, seconds, max_packets)?;
        let s1 = prog_stats(&pair)?;
        (s1.0 - s0.0, s1.1 - s0.1)
    };
    let path = event_path();
    let max = probe_phase(&pair, macs, segments, next_base(), None, seconds, max_packets, true, path)?;
    // Losses at the highest rate: find a rate without (halving, bounded).
    let mut lossless = None;
    if max.lost() > 0 {
        let mut rate = max.phase.pps() / 2.0;
        for _ in 0..5 {
            let run =
                probe_phase(&pair, macs, segments, next_base(), Some(rate), seconds.min(3.0), max_packets, true, path)?;
            println!("  rate {rate:.0} pps: {} events lost", run.lost());
            if run.lost() == 0 {
                lossless = Some((rate, run));
                break;
            }
            rate /= 2.0;
        }
    }
    // Diagnostic: the probe with no event delivery (buffers not opened).
    let silent = probe_phase(&pair, macs, segments, next_base(), None, seconds, max_packets, false, path)?;
    // The perf buffer fallback at its highest rate, for comparison.
    let perf = (max.path != EventPath::Perf)
        .then(|| {
            probe_phase(&pair, macs, segments, next_base(), None, seconds, max_packets, true, Some(EventPath::Perf))
        })
        .transpose()?;
    drop(stats_fd);

    // softflowd on the same interface, same traffic, no XDP program.
    let softflowd = Softflowd::start(pair.rx.name(), &pair.rx_if)?;
    let cpu0 = softflowd.cpu()?;
    let (processed0, _, _) = softflowd.statistics()?;
    let sf = send_phase(&pair, macs, segments, next_base(), None, seconds, max_packets)?;
    // Let it take what its capture buffer still holds (bounded).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut processed = 0;
    let mut pcap_dropped = 0;
    while Instant::now() < deadline {
        let (p, d, _) = softflowd.statistics()?;
        let before = processed;
        (processed, pcap_dropped) = (p - processed0, d);
        // Done when all is taken or dropped, or it stopped moving.
        if processed + pcap_dropped >= sf.received || (processed > 0 && processed == before) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let sf_cpu = softflowd.cpu()? - cpu0;
    let (_, _, sf_text) = softflowd.statistics()?;
    let sf_exported = softflowd.exported.load(Ordering::Relaxed);
    let sf_command = softflowd.command_line.clone();
    drop(softflowd);

    // Report.
    let row = |label: &str, p: &Phase| {
        println!(
            "  {label:<34} {:>10.0} pps  ({} sent in {:.2} s, {} received, {} rx dropped)",
            p.pps(),
            p.sent.packets,
            p.sent.elapsed.as_secs_f64(),
            p.received,
            p.rx_dropped
        );
    };
    let m = &max.phase.mix;
    println!(
        "  traffic: {} packets in {} connections (80% TCP/443, 10% DNS, 10% QUIC, {segments} segments from the server; {:.1}% SYN, {:.1}% FIN), 4,096 at a time",
        m.packets,
        m.connections,
        100.0 * m.syn as f64 / m.packets.max(1) as f64,
        100.0 * m.fin as f64 / m.packets.max(1) as f64
    );
    row("no XDP program", &none);
    row("bare XDP_PASS attached", &bare);
    row(&format!("probe (icr_lan), {}", max.path.name()), &max.phase);
    if let Some(perf) = &perf {
        row("probe (icr_lan), perf buffers", &perf.phase);
    }
    row("softflowd, no XDP program", &sf);
    let (p_none, p_bare, p_probe) = (none.pps(), bare.pps(), max.phase.pps());
    println!(
        "  probe: {:.2}x the pps without XDP, {:.2}x the pps with the bare program",
        p_probe / p_none,
        p_probe / p_bare
    );
    // The sender is one thread, and the receiving side runs in its context
    // (softirq on the sender's CPU): 1/pps is what a packet costs that CPU,
    // and its growth over the run without XDP is what the receiver's
    // additions cost, kernel side included (which softflowd's own CPU time,
    // below, does not show: its capture copies packets in softirq).
    let extra = |p: f64| 1e6 / p - 1e6 / p_none;
    println!(
        "  sender CPU per packet: {:.2} us without XDP; extra with bare XDP_PASS {:.2} us, with the probe {:.2} us, with softflowd {:.2} us",
        1e6 / p_none,
        extra(p_bare),
        extra(p_probe),
        extra(sf.pps())
    );
    let probe_ns_pkt = max.run_ns as f64 / max.run_cnt.max(1) as f64;
    let bare_ns_pkt = bare_ns as f64 / bare_cnt.max(1) as f64;
    println!(
        "  program run time (bpf_stats): bare {bare_ns_pkt:.1} ns/packet over {bare_cnt} runs, probe {probe_ns_pkt:.1} ns/packet over {} runs ({:.2}x); JIT size {bare_jited} vs {} bytes",
        max.run_cnt,
        probe_ns_pkt / bare_ns_pkt,
        max.jited
    );
    let upsert_ns_pkt = upsert_ns as f64 / upsert_cnt.max(1) as f64;
    println!(
        "  the live floor (parse, one lookup, create the flow when missing; same table size): {upsert_ns_pkt:.1} ns/packet; \
         the probe is {:.2}x it",
        probe_ns_pkt / upsert_ns_pkt
    );
    json.insert("live_upsert_floor_run_ns".into(), json!(upsert_ns_pkt));
    json.insert("live_probe_over_upsert_floor".into(), json!(probe_ns_pkt / upsert_ns_pkt));
    let silent_ns_pkt = silent.run_ns as f64 / silent.run_cnt.max(1) as f64;
    println!(
        "  diagnostic, probe with its event buffers closed (every event fails at once): {:.0} pps, {silent_ns_pkt:.1} ns/packet \
         ({:.2}x bare); so event delivery costs {:.1} ns/packet here, {:.0} ns per event ({} events, one IRQ work interrupt each: {})",
        silent.phase.pps(),
        silent_ns_pkt / bare_ns_pkt,
        probe_ns_pkt - silent_ns_pkt,
        (probe_ns_pkt - silent_ns_pkt) * max.run_cnt as f64 / max.events_sent.max(1) as f64,
        max.events_sent,
        max.irq_work
    );
    let show_events = |label: &str, run: &ProbePhase| {
        println!(
            "  events {label}: {} sent, {} flow + {} hints received; LOST {} (kernel counter {}, never received {}, malformed {}; \
             the buffers' lost records: {}); packets seen {}, flows {}, table full {}, IRQ work interrupts {}, reader CPU {:.3} s, \
             longest pause between flow events received {:.1} ms",
            run.events_sent,
            run.reader.flow_events,
            run.reader.hints,
            run.lost(),
            run.events_lost,
            run.events_sent.saturating_sub(run.reader.flow_events + run.reader.hints),
            run.reader.malformed,
            run.reader.lost_records,
            run.packets_seen,
            run.flows_created,
            run.table_full,
            run.irq_work,
            run.reader.cpu.as_secs_f64(),
            run.reader.longest_gap.as_secs_f64() * 1e3
        );
    };
    show_events("at the highest rate", &max);
    if let Some(perf) = &perf {
        show_events("at the highest rate, perf buffers", perf);
    }
    if let Some((rate, run)) = &lossless {
        show_events(&format!("at {rate:.0} pps"), run);
    }

    // CPU per million packets.
    let cpu_per_mpkt =
        |run: &ProbePhase| (run.run_ns as f64 / 1e9 + run.reader.cpu.as_secs_f64()) / (run.run_cnt.max(1) as f64 / 1e6);
    let icr_cpu_s = cpu_per_mpkt(&max);
    let icr_kernel_s = (max.run_ns as f64 / 1e9) / (max.run_cnt.max(1) as f64 / 1e6);
    let sf_per = processed.max(1);
    let sf_cpu_s = sf_cpu.as_secs_f64() / (sf_per as f64 / 1e6);
    println!("  CPU seconds per million packets:");
    println!(
        "    softflowd   {sf_cpu_s:8.4}   ({:.2} s CPU for {processed} packets processed of {} received, pcap dropped {pcap_dropped}, {sf_exported} NetFlow datagrams; {sf_command})",
        sf_cpu.as_secs_f64(),
        sf.received
    );
    println!(
        "    icr         {icr_cpu_s:8.4}   (XDP {icr_kernel_s:.4} + reader {:.4}; {:.3} s XDP + {:.3} s reader for {} packets)",
        icr_cpu_s - icr_kernel_s,
        max.run_ns as f64 / 1e9,
        max.reader.cpu.as_secs_f64(),
        max.run_cnt
    );
    if let Some(perf) = &perf {
        let perf_cpu_s = cpu_per_mpkt(perf);
        println!(
            "    icr, perf   {perf_cpu_s:8.4}   (the fallback; {:.3} s XDP + {:.3} s reader for {} packets)",
            perf.run_ns as f64 / 1e9,
            perf.reader.cpu.as_secs_f64(),
            perf.run_cnt
        );
        json.insert("icr_perf_cpu_s_per_mpkt".into(), json!(perf_cpu_s));
        json.insert("softflowd_over_icr_perf_cpu".into(), json!(sf_cpu_s / perf_cpu_s));
        json.insert("live_pps_perf".into(), json!(perf.phase.pps()));
        json.insert("live_lost_events_perf_at_max".into(), json!(perf.lost()));
    }
    println!("    softflowd / icr: {:.1}x", sf_cpu_s / icr_cpu_s);
    println!("  load average at the end: {}", loadavg());
    if std::env::var_os("ICR_BENCH_VERBOSE").is_some() {
        println!("softflowctl statistics:\n{sf_text}");
    }

    let live_lost = lossless.as_ref().map_or(max.lost(), |(_, run)| run.lost());
    json.insert("live_pps_max".into(), json!(p_probe));
    json.insert("live_pps_without_probe".into(), json!(p_none));
    json.insert("live_pps_xdp_pass".into(), json!(p_bare));
    json.insert("live_pps_softflowd".into(), json!(sf.pps()));
    json.insert("live_pps_ratio_vs_none".into(), json!(p_probe / p_none));
    json.insert("live_pps_ratio_vs_xdp_pass".into(), json!(p_probe / p_bare));
    json.insert("live_lost_events_at_max".into(), json!(max.lost()));
    json.insert("live_lost_events".into(), json!(live_lost));
    json.insert("live_lossless_pps".into(), json!(lossless.as_ref().map_or(p_probe, |(_, run)| run.phase.pps())));
    json.insert("live_events_sent".into(), json!(max.events_sent));
    json.insert("live_reader_longest_pause_ms".into(), json!(max.reader.longest_gap.as_secs_f64() * 1e3));
    json.insert("live_probe_run_ns".into(), json!(probe_ns_pkt));
    json.insert("live_xdp_pass_run_ns".into(), json!(bare_ns_pkt));
    json.insert("live_probe_run_ns_ratio".into(), json!(probe_ns_pkt / bare_ns_pkt));
    json.insert("live_probe_no_delivery_run_ns".into(), json!(silent_ns_pkt));
    json.insert("live_events_per_packet".into(), json!(max.events_sent as f64 / max.run_cnt.max(1) as f64));
    json.insert("softflowd_cpu_s_per_mpkt".into(), json!(sf_cpu_s));
    json.insert("icr_cpu_s_per_mpkt".into(), json!(icr_cpu_s));
    json.insert("icr_xdp_cpu_s_per_mpkt".into(), json!(icr_kernel_s));
    json.insert("softflowd_over_icr_cpu".into(), json!(sf_cpu_s / icr_cpu_s));
    json.insert("softflowd_pcap_dropped".into(), json!(pcap_dropped));
    json.insert("sender_extra_us_per_pkt_probe".into(), json!(extra(p_probe)));
    json.insert("sender_extra_us_per_pkt_xdp_pass".into(), json!(extra(p_bare)));
    json.insert("sender_extra_us_per_pkt_softflowd".into(), json!(extra(sf.pps())));
    Ok(json)
}

fn main() -> Result<()> {
    let mut json = test_runs()?.json;
    if env("ICR_BENCH_LIVE", 1u8) != 0 {
        json.extend(live()?);
    }
    println!("{}", Value::Object(json));
    Ok(())
}
