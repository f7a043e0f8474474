//! The probe with its events in per-CPU perf event arrays: the fallback for
//! kernels without BPF ring buffers or `bpf_xdp_load_bytes` (before 5.18).
//! Every packet takes the precise clock: the coarse one needs 5.11.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{classifier, map, xdp},
    programs::{TcContext, XdpContext},
};
use probe_common::role;
use probe_ebpf::{events::PerCpuEvents, gateway_egress, maps::MidFlowClock, probe};

#[map(name = "EVENTS")]
static EVENTS: PerCpuEvents = PerCpuEvents::new();

/// Attached to subscriber-facing interfaces.
#[xdp]
pub fn icr_lan(ctx: XdpContext) -> u32 {
    probe(&ctx, role::LAN, &EVENTS, MidFlowClock::Precise)
}

/// Attached to internet-facing interfaces.
#[xdp]
pub fn icr_wan(ctx: XdpContext) -> u32 {
    probe(&ctx, role::WAN, &EVENTS, MidFlowClock::Precise)
}

/// Attached to subscriber-facing interfaces' egress (TC): what the gateway
/// itself sends to devices.
#[classifier]
pub fn icr_lan_egress(ctx: TcContext) -> i32 {
    gateway_egress(&ctx, &EVENTS, MidFlowClock::Precise)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
