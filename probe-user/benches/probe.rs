//! `cargo xtask bench probe`: what the probe costs per packet. Needs root.
//! Machines are noisy (and this one is shared): every figure stands beside a
//! baseline measured in the same run, and the ratios are what to quote.
//!
//! 1. Kernel cost per packet from `BPF_PROG_TEST_RUN`, beside a bare
//!    `XDP_PASS` program (probe-ebpf's `baseline`):
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
//!
//! The last line is one JSON object for scripts. Knobs: ICR_BENCH_REPEAT,
//! ICR_BENCH_FLOWS.
use anyhow::Result;
use etherparse::{PacketBuilder, TcpHeader};
use icr::{
    events,
    probe::{Baseline, EventBuffer, Probe, ProbeOptions},
};
use probe_common::{counter, role};
use serde_json::{Map, Value, json};

const ROUNDS: usize = 5;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
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
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0x17], [2, 0, 0, 0, 0, 1])
        .ipv4(CLIENT, server, 64)
        .udp(client_port, server_port)
        .write(&mut frame, payload)
        .unwrap();
    frame
}

fn quic_initial() -> Vec<u8> {
    let mut payload = vec![0xc3, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x44, 0xd0];
    payload.resize(1200, 0);
    payload
}

const DNS_QUERY: [u8; 33] = [
    0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w', b'w', b'w', 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3, b'c',
    b'o', b'm', 0, 0, 1, 0, 1,
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
    buffers: &mut [EventBuffer],
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
    let repeat: u32 = env("ICR_BENCH_REPEAT", 1_000_000);
    let flows: u16 = env("ICR_BENCH_FLOWS", 10_000u16).min(30_000);
    let baseline = Baseline::load()?;
    let mut probe = Probe::load(ProbeOptions::default())?;
    let mut buffers = probe.open_event_buffers()?;

    // Large repeat: the bare program, and a mid-flow packet of an
    // established flow: data from the server (never a hint).
    let data = tcp(40000, false, false, 100);
    probe.test_run(role::LAN, &tcp(40000, true, true, 0))?;
    let (mut bare_rep, mut mid_rep) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        bare_rep.push(baseline.test_run_repeat(&data, repeat)? as f64);
        mid_rep.push(probe.test_run_repeat(role::LAN, &data, repeat)?.duration_ns as f64);
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
            per_call(&mut probe, &baseline, b, flows, |i| vec![tcp(port(i), true, true, 0), tcp(port(i), false, true, 0)], |i| tcp(port(i), false, false, 100))?,
            per_call(&mut probe, &baseline, b, flows, |_| vec![], |i| tcp(port(i), true, true, 0))?,
            per_call(&mut probe, &baseline, b, flows, |i| vec![tcp(port(i), true, true, 0), tcp(port(i), false, true, 0)], |i| tcp(port(i), true, false, 1400))?,
            per_call(&mut probe, &baseline, b, flows, |_| vec![], |i| udp(port(i), [198, 51, 100, 53], 53, &DNS_QUERY))?,
            per_call(&mut probe, &baseline, b, flows, |_| vec![], |i| udp(port(i), SERVER, 443, &quic))?,
        ];
        for (row, (probe_ns, bare_ns)) in rows.iter_mut().zip(results) {
            row.2.push(probe_ns);
            row.3.push(bare_ns);
        }
    }
    let counters = probe.counters()?;
    let (bare, mid) = (median(bare_rep), median(mid_rep));
    let mid_one = median(rows[0].2.clone());

    let mut json = Map::new();
    println!("== BPF_PROG_TEST_RUN (median of {ROUNDS} rounds; ns per packet) ==");
    println!("  large repeat ({repeat} runs of one frame):");
    println!("    bare XDP_PASS                                   {bare:8.1}");
    println!("    mid-flow TCP, 100 B from the server             {mid:8.1}   {:6.2}x bare", mid / bare);
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
        }
    }
    println!(
        "  (est. ns = large-repeat mid-flow + (path - mid-flow, one run per call); ratio to the large-repeat bare: est/{bare:.1})"
    );
    println!(
        "  events sent {}, lost {}, flow table full {}",
        counters.get(counter::EVENTS_SENT),
        counters.get(counter::EVENTS_LOST),
        counters.get(counter::FLOW_TABLE_FULL)
    );
    Ok(TestRuns { json })
}

fn main() -> Result<()> {
    let json = test_runs()?.json;
    println!("{}", Value::Object(json));
    Ok(())
}
