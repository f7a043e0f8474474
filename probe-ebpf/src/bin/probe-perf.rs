//! The probe with its events in per-CPU perf event arrays: the fallback for
//! kernels without BPF ring buffers or `bpf_xdp_load_bytes` (before 5.18).
#![no_std]
#![no_main]

use aya_ebpf::{macros::{map, xdp}, programs::XdpContext};
use probe_common::role;
use probe_ebpf::{events::PerCpuEvents, probe};

#[map(name = "EVENTS")]
static EVENTS: PerCpuEvents = PerCpuEvents::new();

/// Attached to subscriber-facing interfaces.
#[xdp]
pub fn icr_lan(ctx: XdpContext) -> u32 {
    probe(&ctx, role::LAN, &EVENTS)
}

/// Attached to internet-facing interfaces.
#[xdp]
pub fn icr_wan(ctx: XdpContext) -> u32 {
    probe(&ctx, role::WAN, &EVENTS)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
