//! The probe with its events in one BPF ring buffer (see `events::RingEvents`).
#![no_std]
#![no_main]

use aya_ebpf::{macros::{map, xdp}, programs::XdpContext};
use probe_common::{EVENT_RING_BYTES, role};
use probe_ebpf::{events::RingEvents, probe};

#[map(name = "EVENT_RING")]
static EVENT_RING: RingEvents = RingEvents::with_byte_size(EVENT_RING_BYTES);

/// Attached to subscriber-facing interfaces.
#[xdp]
pub fn icr_lan(ctx: XdpContext) -> u32 {
    probe(&ctx, role::LAN, &EVENT_RING)
}

/// Attached to internet-facing interfaces.
#[xdp]
pub fn icr_wan(ctx: XdpContext) -> u32 {
    probe(&ctx, role::WAN, &EVENT_RING)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
