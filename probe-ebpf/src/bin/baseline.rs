//! The floors the benchmarks measure the probe against, in the same run
//! (`cargo xtask bench probe`): the cost of running any XDP program at all,
//! and of the least a flow-table probe must do.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use probe_ebpf::{flow, maps::FLOWS, parse};

/// A bare `XDP_PASS`.
#[xdp]
pub fn baseline_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Parsing and the one flow-table lookup, and nothing else: no clock, no
/// counters, no update. A flow-table design cannot go under this.
#[xdp]
pub fn baseline_lookup(ctx: XdpContext) -> u32 {
    if let Ok(packet) = parse::packet(&ctx) {
        let (key, _) = flow::key_of(&packet);
        // The helper call is kept: LLVM cannot see what it does.
        let _ = FLOWS.get_ptr_mut(&key);
    }
    xdp_action::XDP_PASS
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
