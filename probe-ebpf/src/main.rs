//! The XDP probe: parses each packet's headers, counts it against its flow in
//! the kernel flow table, and tells the agent when a flow starts or ends.
//! Every packet leaves with `XDP_PASS`, unmodified: the probe is passive and
//! fails open; what it could not parse is counted, never acted on.
#![no_std]
#![no_main]
// For the one atomic add the flow counters need (see `flow::add`).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod events;
mod flow;
mod maps;
mod parse;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use probe_common::{counter, role};

/// Attached to subscriber-facing interfaces.
#[xdp]
pub fn icr_lan(ctx: XdpContext) -> u32 {
    probe(&ctx, role::LAN)
}

/// Attached to internet-facing interfaces.
#[xdp]
pub fn icr_wan(ctx: XdpContext) -> u32 {
    probe(&ctx, role::WAN)
}

#[inline(always)]
fn probe(ctx: &XdpContext, role: u8) -> u32 {
    maps::count(counter::PACKETS);
    match parse::packet(ctx) {
        Ok(packet) => flow::track(ctx, &packet, role),
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

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
