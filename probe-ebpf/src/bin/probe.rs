//! The probe with its events in a BPF ring buffer per CPU (see
//! `events::PerCpuRings`),
//! for Linux 5.18 and later (`bpf_xdp_load_bytes`), which have the coarse
//! clock too (5.11): packets that only update a flow take it.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use probe_common::role;
use probe_ebpf::{events::PerCpuRings, gateway_egress, maps::MidFlowClock, probe};

#[btf_map]
static EVENT_RINGS: PerCpuRings = PerCpuRings::new();

/// Attached to subscriber-facing interfaces.
#[xdp]
pub fn icr_lan(ctx: XdpContext) -> u32 {
    probe(&ctx, role::LAN, &EVENT_RINGS, MidFlowClock::Coarse)
}

/// Attached to internet-facing interfaces.
#[xdp]
pub fn icr_wan(ctx: XdpContext) -> u32 {
    probe(&ctx, role::WAN, &EVENT_RINGS, MidFlowClock::Coarse)
}

/// Attached to subscriber-facing interfaces' egress (TC): what the gateway
/// itself sends to devices.
#[classifier]
pub fn icr_lan_egress(ctx: TcContext) -> i32 {
    gateway_egress(&ctx, &EVENT_RINGS, MidFlowClock::Coarse)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
