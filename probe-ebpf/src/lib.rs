//! The XDP probe: parses each packet's headers, counts it against its flow in
//! the kernel flow table, and tells the agent when a flow starts or ends.
//! Every packet leaves with `XDP_PASS`, unmodified: the probe is passive and
//! fails open; what it could not parse is counted, never acted on.
//!
//! The code is shared by two objects that differ only in how events reach
//! the agent (`events::EventSink`): `probe` (one BPF ring buffer, wakeups
//! batched) and `probe-perf` (per-CPU perf event arrays, for kernels
//! without ring buffers). The agent picks one at start.
#![no_std]
// For the one atomic add the flow counters need (see `flow::add`).
#![allow(internal_features)]
#![feature(core_intrinsics)]

pub mod events;
pub mod flow;
pub mod maps;
pub mod parse;

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use probe_common::counter;

use crate::{events::EventSink, maps::MidFlowClock};

/// The whole program for one packet that arrived on an interface of `role`.
/// `mid_flow_clock`: what the object's kernels allow (see [`MidFlowClock`]).
#[inline(always)]
pub fn probe<S: EventSink>(ctx: &XdpContext, role: u8, events: &S, mid_flow_clock: MidFlowClock) -> u32 {
    maps::count(counter::PACKETS);
    match parse::packet(ctx) {
        Ok(packet) => flow::track(ctx, &packet, role, events, mid_flow_clock),
        Err(skip) => maps::count(skip.counter()),
    }
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects programs that could reach here; this is never run.
    loop {}
}
