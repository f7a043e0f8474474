//! The XDP probe: parses each packet's headers, counts it against its flow in
//! the kernel flow table, and tells the agent when a flow starts or ends.
//! Every packet leaves with `XDP_PASS`, unmodified: the probe is passive and
//! fails open; what it could not parse is counted, never acted on.
//!
//! XDP sees what arrives. What the gateway itself answers a device (its
//! resolver, DHCP server, web page) leaves by a LAN port and arrives
//! nowhere, so a TC egress program on the LAN ports ([`gateway_egress`])
//! counts those packets, with the same parsing, flow table and events.
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
pub mod frame;
pub mod maps;
pub mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action},
    programs::{TcContext, XdpContext},
};
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

/// The program for one packet leaving by a LAN port. Forwarded packets
/// return at once: XDP counted them where they arrived. Every packet goes
/// on unmodified; `TC_ACT_UNSPEC` lets any classifier after this one decide.
#[inline(always)]
pub fn gateway_egress<S: EventSink>(ctx: &TcContext, events: &S, mid_flow_clock: MidFlowClock) -> i32 {
    if frame::sent_by_gateway(ctx) {
        match parse::packet(ctx) {
            Ok(packet) => flow::from_gateway(ctx, &packet, events, mid_flow_clock),
            Err(skip) => maps::count(skip.counter()),
        }
    }
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects programs that could reach here; this is never run.
    loop {}
}
