//! The probe's kernel cost per packet, from `BPF_PROG_TEST_RUN`, beside a
//! bare `XDP_PASS` program measured in the same run (machines are noisy:
//! ratios to that baseline are the figures to quote). Needs root.
//!
//! - mid-flow TCP: one established flow, the same data packet `repeat` times;
//! - new flow (SYN): distinct SYNs, one run each (each inserts a flow and
//!   sends a start event), against the baseline run the same way.
//!
//! - hints, each on an existing flow, one run per call: a ClientHello-sized
//!   TCP segment from the client, a DNS query, a QUIC Initial; beside a
//!   mid-flow data packet measured the same way.
//!
//! The last line is one JSON object for scripts.
use anyhow::Result;
use etherparse::{PacketBuilder, TcpHeader};
use icr::{
    events,
    probe::{Baseline, Probe, ProbeOptions},
};
use probe_common::role;

const ROUNDS: usize = 5;

fn tcp(src_port: u16, syn: bool, payload: usize) -> Vec<u8> {
    let mut header = TcpHeader::new(src_port, 443, 1, 64240);
    header.syn = syn;
    header.ack = !syn;
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0x17], [2, 0, 0, 0, 0, 1])
        .ipv4([192, 168, 1, 23], [203, 0, 113, 10], 64)
        .tcp_header(header)
        .write(&mut frame, &vec![0x42; payload])
        .unwrap();
    frame
}

fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0x17], [2, 0, 0, 0, 0, 1])
        .ipv4([192, 168, 1, 23], [203, 0, 113, 53], 64)
        .udp(src_port, dst_port)
        .write(&mut frame, payload)
        .unwrap();
    frame
}

/// ns per packet of `timed(i)`, one run per call, each after `prepare(i)`
/// (untimed) has put flow `i` in the state to measure.
fn per_flow(
    probe: &Probe,
    buffers: &mut [icr::probe::EventBuffer],
    flows: u16,
    prepare: impl Fn(u16) -> Vec<Vec<u8>>,
    timed: impl Fn(u16) -> Vec<u8>,
) -> Result<f64> {
    let mut total = 0u64;
    let mut sink = Vec::new();
    for i in 0..flows {
        for frame in prepare(i) {
            probe.test_run(role::LAN, &frame)?;
        }
        total += probe.test_run(role::LAN, &timed(i))?.duration_ns;
        if i % 50 == 49 {
            sink.clear();
            events::drain(buffers, &mut sink);
        }
    }
    sink.clear();
    events::drain(buffers, &mut sink);
    Ok(total as f64 / f64::from(flows))
}

fn tcp_with(src_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut header = TcpHeader::new(src_port, 443, 1, 64240);
    header.ack = true;
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0x17], [2, 0, 0, 0, 0, 1])
        .ipv4([192, 168, 1, 23], [203, 0, 113, 10], 64)
        .tcp_header(header)
        .write(&mut frame, payload)
        .unwrap();
    frame
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> Result<()> {
    let repeat: u32 = std::env::var("ICR_BENCH_REPEAT").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let new_flows: u16 = std::env::var("ICR_BENCH_FLOWS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let baseline = Baseline::load()?;
    let mut probe = Probe::load(ProbeOptions::default())?;
    let mut buffers = probe.open_event_buffers()?;
    let mut sink = Vec::new();

    // Mid-flow: the flow exists; the packet only updates counters.
    let data = tcp(40000, false, 100);
    probe.test_run(role::LAN, &tcp(40000, true, 0))?;
    let (mut bare_mid, mut probe_mid) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        bare_mid.push(baseline.test_run_repeat(&data, repeat)? as f64);
        probe_mid.push(probe.test_run_repeat(role::LAN, &data, repeat)?.duration_ns as f64);
    }

    // New flows: each SYN is a new key; one run each, for both programs.
    let (mut bare_new, mut probe_new) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let (mut bare_ns, mut probe_ns) = (0u64, 0u64);
        for i in 0..new_flows {
            let port = (i % 60000) + 1024;
            let mut syn = tcp(port, true, 0);
            // A distinct destination per round so every SYN is a new flow.
            syn[14 + 19] = round as u8 + 1;
            bare_ns += baseline.test_run_repeat(&syn, 1)?;
            probe_ns += probe.test_run(role::LAN, &syn)?.duration_ns;
            if i % 1000 == 999 {
                sink.clear();
                events::drain(&mut buffers, &mut sink);
            }
        }
        bare_new.push(bare_ns as f64 / f64::from(new_flows));
        probe_new.push(probe_ns as f64 / f64::from(new_flows));
        for key in probe.flow_keys()? {
            probe.remove_flow(&key)?;
        }
    }
    // Hints on existing flows, against a mid-flow packet measured the same way.
    let quic_initial = {
        let mut payload = vec![0xc3, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x44, 0xd0];
        payload.resize(1200, 0);
        payload
    };
    let dns_query = [0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w', b'w', b'w', 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3, b'c', b'o', b'm', 0, 0, 1, 0, 1];
    let (mut mid_one, mut hello_one, mut dns_one, mut quic_one, mut bare_one) = (vec![], vec![], vec![], vec![], vec![]);
    let flows = new_flows.min(10_000);
    for round in 0..ROUNDS {
        for key in probe.flow_keys()? {
            probe.remove_flow(&key)?;
        }
        let port = move |i: u16| 1024 + (i % 60000) + round as u16;
        // Mid-flow: SYN and a first (hint) segment already seen; then an ACK with data past the budget.
        let spent = vec![0x17u8; usize::from(probe_common::HINT_BUDGET)];
        mid_one.push(per_flow(&probe, &mut buffers, flows, |i| vec![tcp(port(i), true, 0), tcp_with(port(i), &spent)], |i| tcp(port(i), false, 100))?);
        for key in probe.flow_keys()? {
            probe.remove_flow(&key)?;
        }
        hello_one.push(per_flow(&probe, &mut buffers, flows, |i| vec![tcp(port(i), true, 0)], |i| tcp(port(i), false, 1400))?);
        dns_one.push(per_flow(&probe, &mut buffers, flows, |i| vec![udp(port(i), 53, &dns_query)], |i| udp(port(i), 53, &dns_query))?);
        quic_one.push(per_flow(&probe, &mut buffers, flows, |i| vec![udp(port(i), 443, &quic_initial)], |i| udp(port(i), 443, &quic_initial))?);
        let mut bare = 0u64;
        for i in 0..flows {
            bare += baseline.test_run_repeat(&tcp(port(i), false, 100), 1)?;
        }
        bare_one.push(bare as f64 / f64::from(flows));
    }
    let (mo, ho, dno, qo, bo) = (median(mid_one), median(hello_one), median(dns_one), median(quic_one), median(bare_one));
    let counters = probe.counters()?;

    let (bm, pm, bn, pn) = (median(bare_mid), median(probe_mid), median(bare_new), median(probe_new));
    println!("BPF_PROG_TEST_RUN, median of {ROUNDS} rounds (ns per packet):");
    println!("  bare XDP_PASS, repeat {repeat:>9}: {bm:7.1} ns");
    println!("  probe, mid-flow TCP (100 B data):   {pm:7.1} ns  ({:.2}x the bare program)", pm / bm);
    println!("  bare XDP_PASS, one run per call:     {bn:7.1} ns");
    println!("  probe, new-flow SYN ({new_flows} flows):  {pn:7.1} ns  ({:.2}x the bare program)", pn / bn);
    println!("  one run per call, on existing flows ({flows} flows):");
    println!("    bare XDP_PASS:                     {bo:7.1} ns");
    println!("    mid-flow TCP (no hint):            {mo:7.1} ns  ({:.2}x bare)", mo / bo);
    println!("    ClientHello segment (1400 B hint): {ho:7.1} ns  ({:.2}x bare, {:.2}x mid-flow)", ho / bo, ho / mo);
    println!("    DNS query (hint):                  {dno:7.1} ns  ({:.2}x bare, {:.2}x mid-flow)", dno / bo, dno / mo);
    println!("    QUIC Initial (1200 B hint):        {qo:7.1} ns  ({:.2}x bare, {:.2}x mid-flow)", qo / bo, qo / mo);
    println!(
        "  events sent {}, lost {}, flow table full {}",
        counters.get(probe_common::counter::EVENTS_SENT),
        counters.get(probe_common::counter::EVENTS_LOST),
        counters.get(probe_common::counter::FLOW_TABLE_FULL)
    );
    println!(
        "{}",
        serde_json::json!({
            "bare_pass_ns": bm, "tcp_midflow_ns": pm, "tcp_midflow_ratio": pm / bm,
            "bare_pass_single_ns": bn, "tcp_syn_newflow_ns": pn, "tcp_syn_newflow_ratio": pn / bn,
            "midflow_single_ns": mo, "client_hello_ns": ho, "dns_query_ns": dno, "quic_initial_ns": qo,
        })
    );
    Ok(())
}
