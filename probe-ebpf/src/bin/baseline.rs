//! The floors the benchmarks measure the probe against, in the same run
//! (`cargo xtask bench probe`): the cost of running any XDP program at all,
//! of the least a flow-table probe must do, and a staircase of programs that
//! each add one of the probe's per-packet steps to that floor, so that the
//! bench can say what each step costs.
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_UNSPEC, xdp_action},
    helpers,
    macros::{btf_map, classifier, map, xdp},
    programs::{TcContext, XdpContext},
};
use probe_common::{FlowEvent, FlowValue, counter, event_kind};
use probe_ebpf::{
    events::{EventSink, PerCpuRings, RingEvents},
    flow,
    maps::{self, FLOWS},
    parse,
};

/// A bare `XDP_PASS`.
#[xdp]
pub fn baseline_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// A bare TC classifier that lets every packet go on: the floor of the
/// probe's LAN egress program.
#[classifier]
pub fn baseline_tc_pass(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// Parsing and building the flow key, without the lookup.
#[xdp]
pub fn baseline_parse(ctx: XdpContext) -> u32 {
    if let Ok(packet) = parse::packet(&ctx) {
        // black_box: the key must not be optimised away (every byte of it
        // is initialised, which the verifier checks).
        let _ = core::hint::black_box(flow::key_of(&packet));
    }
    xdp_action::XDP_PASS
}

/// Parsing and the one flow-table lookup, and nothing else: no clock, no
/// counters, no update. A flow-table design cannot go under this.
#[xdp]
pub fn baseline_lookup(ctx: XdpContext) -> u32 {
    let _ = lookup(&ctx);
    xdp_action::XDP_PASS
}

/// The floor, plus creating the flow when it is missing: what any
/// flow-table probe does live, where new flows keep arriving. The live
/// benchmark's floor.
#[xdp]
pub fn baseline_upsert(ctx: XdpContext) -> u32 {
    if let Ok(packet) = parse::packet(&ctx) {
        let (key, _) = flow::key_of(&packet);
        if FLOWS.get_ptr_mut(key).is_none() {
            let _ = FLOWS.insert(key, FlowValue::default(), BPF_NOEXIST as u64);
        }
    }
    xdp_action::XDP_PASS
}

/// The floor, plus the precise clock stored in the flow.
#[xdp]
pub fn baseline_clock(ctx: XdpContext) -> u32 {
    if let Some(value) = lookup(&ctx) {
        // SAFETY: helper without arguments; `value` is a live map entry.
        unsafe { (*value).last_ns = helpers::bpf_ktime_get_ns() };
    }
    xdp_action::XDP_PASS
}

/// The floor, plus the probe's clock (`maps::now_ns`: the replay override's
/// CONFIG lookup, then the precise clock) stored in the flow.
#[xdp]
pub fn baseline_now(ctx: XdpContext) -> u32 {
    if let Some(value) = lookup(&ctx) {
        // SAFETY: `value` is a live map entry.
        unsafe { (*value).last_ns = maps::now_ns(maps::MidFlowClock::Precise) };
    }
    xdp_action::XDP_PASS
}

/// The floor, plus one per-CPU counter.
#[xdp]
pub fn baseline_counter(ctx: XdpContext) -> u32 {
    maps::count(counter::PACKETS);
    let _ = lookup(&ctx);
    xdp_action::XDP_PASS
}

/// The floor, plus the flow's two atomic adds (packets and bytes).
#[xdp]
pub fn baseline_atomics(ctx: XdpContext) -> u32 {
    if let Some(value) = lookup(&ctx) {
        // SAFETY: `value` is a live map entry.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*value).packets[0], 1);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*value).bytes[0], 100);
        }
    }
    xdp_action::XDP_PASS
}

#[inline(always)]
fn lookup(ctx: &XdpContext) -> Option<*mut FlowValue> {
    let packet = parse::packet(ctx).ok()?;
    let (key, _) = flow::key_of(&packet);
    FLOWS.get_ptr_mut(key)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// The floor, plus the coarse clock stored in the flow (5.11 and later).
#[xdp]
pub fn baseline_coarse_clock(ctx: XdpContext) -> u32 {
    if let Some(value) = lookup(&ctx) {
        // SAFETY: helper without arguments; `value` is a live map entry.
        unsafe { (*value).last_ns = helpers::bpf_ktime_get_coarse_ns() };
    }
    xdp_action::XDP_PASS
}

// Reserve contention: one ring all CPUs share, against one ring per CPU
// (the probe's design, filled by the agent's loader), each CPU sending an
// event per run. The loader sizes them.
#[map(name = "SHARED_RING")]
static SHARED_RING: RingEvents = RingEvents::with_byte_size(1 << 12);
#[btf_map]
static CPU_RINGS: PerCpuRings = PerCpuRings::new();

/// Sends one flow event through the ring all CPUs share.
#[xdp]
pub fn baseline_ring_shared(ctx: XdpContext) -> u32 {
    send_event(&ctx, &SHARED_RING);
    xdp_action::XDP_PASS
}

/// Sends one flow event through this CPU's own ring.
#[xdp]
pub fn baseline_ring_per_cpu(ctx: XdpContext) -> u32 {
    send_event(&ctx, &CPU_RINGS);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn send_event(ctx: &XdpContext, ring: &impl EventSink) {
    let event = FlowEvent { kind: event_kind::FLOW_START, ..FlowEvent::default() };
    if ring.send(ctx, &event, 0).is_err() {
        maps::count(counter::EVENTS_LOST);
    }
}
