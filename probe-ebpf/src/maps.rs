//! Every map the probe uses but the event buffer (each object defines its
//! own, `src/bin/`), defined once. Names and value types come from
//! `probe-common`, which the agent reads them with.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use probe_common::{DEFAULT_FLOW_TABLE_SIZE, FlowKey, FlowValue, ProbeConfig, counter};

/// The kernel flow table. A plain (not LRU) hash, so that no flow is ever
/// evicted behind the agent's back: the agent removes flows it has closed,
/// and a full table is counted (`counter::FLOW_TABLE_FULL`). The agent may
/// resize it at load time.
#[map(name = "FLOWS")]
pub static FLOWS: HashMap<FlowKey, FlowValue> = HashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Per-CPU counters, indexed by `probe_common::counter`.
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Settings the agent writes at run time (one entry).
#[map(name = "CONFIG")]
pub static CONFIG: Array<ProbeConfig> = Array::with_max_entries(1, 0);

/// Adds one to a per-CPU counter. Per-CPU, so no atomics are needed.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's slot of a live array entry.
        unsafe { *slot += 1 };
    }
}

/// Which kernel clock may stamp a packet that only updates its flow.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum MidFlowClock {
    /// `bpf_ktime_get_ns`, as every other packet.
    Precise,
    /// `bpf_ktime_get_coarse_ns` (Linux 5.11): the same clock as of the last
    /// tick, so up to one tick (4 ms at HZ=250, 10 ms at HZ=100) early, for
    /// a twentieth of the cost (43 ns against 2 ns measured by
    /// `cargo xtask bench probe`). Such packets only move a flow's end,
    /// which queries match within a tolerance (1 s by default); starts and
    /// every event keep the precise clock.
    Coarse,
}

/// "Now" for flow timestamps: the kernel's monotonic clock (precise, or as
/// of the last tick), or the clock the agent set while replaying a capture.
#[inline(always)]
pub fn now_ns(clock: MidFlowClock) -> u64 {
    if let Some(config) = CONFIG.get(0)
        && config.clock_override_ns != 0
    {
        return config.clock_override_ns;
    }
    // SAFETY: helpers without arguments.
    unsafe {
        match clock {
            MidFlowClock::Precise => aya_ebpf::helpers::bpf_ktime_get_ns(),
            MidFlowClock::Coarse => aya_ebpf::helpers::bpf_ktime_get_coarse_ns(),
        }
    }
}
