//! The probe with its events in one BPF ring buffer (see `events::RingEvents`),
//! for Linux 5.18 and later (`bpf_xdp_load_bytes`), which have the coarse
//! clock too (5.11): packets that only update a flow take it.
#![no_std]
#![no_main]

use aya_ebpf::{macros::{map, xdp}, programs::XdpContext};
use probe_common::{EVENT_RING_BYTES, role};
use probe_ebpf::{maps::MidFlowClock, events::RingEvents, probe};

#[map(name = "EVENT_RING")]
static EVENT_RING: RingEvents = RingEvents::with_byte_size(EVENT_RING_BYTES);

/// Attached to subscriber-facing interfaces.
#[xdp]
pub fn icr_lan(ctx: XdpContext) -> u32 {
    probe(&ctx, role::LAN, &EVENT_RING, MidFlowClock::Coarse)
}

/// Attached to internet-facing interfaces.
#[xdp]
pub fn icr_wan(ctx: XdpContext) -> u32 {
    probe(&ctx, role::WAN, &EVENT_RING, MidFlowClock::Coarse)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
