//! The eBPF objects embedded at build time, and what loading one and
//! running its programs on frames share (the probe's and the benchmarks').
use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};

/// The XDP objects built from `probe-ebpf`, embedded at build time: events
/// through per-CPU ring buffers, and through per-CPU perf buffers (the fallback).
pub(super) static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe"));
pub(super) static PROBE_PERF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe-perf"));

/// Why a probe cannot be loaded, where the caller may want to tell.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "this icr carries no XDP program: it was built with AYA_BUILD_SKIP=1 (for checks only); \
         build it with `cargo xtask build`, which installs the eBPF toolchain when it is missing"
    )]
    NotBuilt,
}

/// The embedded object, or why there is none.
pub(super) fn embedded(object: &'static [u8]) -> Result<&'static [u8], ProbeError> {
    if object.is_empty() { Err(ProbeError::NotBuilt) } else { Ok(object) }
}

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Debug)]
pub struct TestRunOutput {
    pub action: u32,
    pub data_out: Vec<u8>,
    pub duration_ns: u64,
}

/// Runs a TC program `repeat` times on `frame`, as a packet the gateway sent
/// (`from_gateway`) or one it forwards.
pub(super) fn tc_test_run(
    program: &SchedClassifier,
    frame: &[u8],
    from_gateway: bool,
    repeat: u32,
) -> Result<TestRunOutput> {
    // The kernel builds the socket buffer from `struct __sk_buff`: a
    // forwarded packet has the interface it arrived on (loopback's index
    // will do), one the gateway made has none.
    let mut context = [0u8; SK_BUFF_CONTEXT_BYTES];
    if !from_gateway {
        context[SK_BUFF_INGRESS_IFINDEX..].copy_from_slice(&1u32.to_ne_bytes());
    }
    let mut data_out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut data_out),
            ctx_in: Some(&context),
            repeat,
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN of a TC program")?;
    data_out.truncate(result.data_size_out as usize);
    Ok(TestRunOutput { action: result.return_value, data_out, duration_ns: result.duration.as_nanos() as u64 })
}

/// `struct __sk_buff` (uapi/linux/bpf.h) up to and including `ingress_ifindex`
/// at byte 36 (after len, pkt_type, mark, queue_mapping, protocol,
/// vlan_present, vlan_tci, vlan_proto, priority): what `BPF_PROG_TEST_RUN`
/// takes as a TC program's context.
const SK_BUFF_INGRESS_IFINDEX: usize = 36;
const SK_BUFF_CONTEXT_BYTES: usize = SK_BUFF_INGRESS_IFINDEX + 4;

pub(super) fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name).ok_or_else(|| anyhow!("the XDP object has no map {name}"))
}
