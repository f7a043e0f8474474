//! The kernel flow table: counts each packet against its flow and direction,
//! and reports flow starts and ends (FIN/RST) and hints through an
//! [`EventSink`].
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::bindings::BPF_NOEXIST;
use probe_common::{
    FlowEvent, FlowKey, FlowValue, HINT_BUDGET, HINT_MAX_FRAME, SYN_RETRY_SHIFT, counter, event_kind, ip_proto,
    role as roles, tcp_flags,
};

use crate::{
    events::EventSink,
    frame::Frame,
    maps::{self, FLOWS, MidFlowClock},
    parse::Packet,
};

const EEXIST: i32 = 17;
const DNS_PORT: u16 = 53;

/// Builds the direction-independent key and the packet's direction in it.
#[inline(always)]
pub fn key_of(packet: &Packet) -> (FlowKey, u8) {
    FlowKey::of(packet.src, packet.src_port, packet.dst, packet.dst_port, packet.proto)
}

#[inline(always)]
pub fn track<F: Frame, S: EventSink>(ctx: &F, packet: &Packet, role: u8, events: &S, mid_flow_clock: MidFlowClock) {
    let (key, dir) = key_of(packet);
    if let Some(value) = FLOWS.get_ptr_mut(key) {
        update(ctx, &key, value, packet, dir, role, events, mid_flow_clock);
        return;
    }
    if is_wan_stray(packet, role) {
        maps::count(counter::WAN_STRAYS);
        return;
    }
    // A flow's start is always precise: question 1 matches on it.
    let now = maps::now_ns(MidFlowClock::Precise);
    let mut value = FlowValue::default();
    first_packet(&mut value, ctx, packet, dir, role, now);
    match FLOWS.insert(key, value, BPF_NOEXIST as u64) {
        Ok(()) => {
            maps::count(counter::FLOWS_CREATED);
            announce(ctx, event_kind::FLOW_START, &key, &value, packet, dir, role, events);
        }
        // Another CPU created it between our lookup and insert.
        Err(e) if -e == EEXIST => {
            if let Some(value) = FLOWS.get_ptr_mut(key) {
                update(ctx, &key, value, packet, dir, role, events, MidFlowClock::Precise);
            }
        }
        Err(_) => maps::count(counter::FLOW_TABLE_FULL),
    }
}

/// Makes `value` the entry of a flow whose first packet is `packet`.
#[inline(always)]
fn first_packet<F: Frame>(value: &mut FlowValue, ctx: &F, packet: &Packet, dir: u8, role: u8, now: u64) {
    let index = dir as usize & 1;
    *value = FlowValue::default();
    value.first_ns = now;
    value.last_ns = now;
    value.first_dir = dir;
    value.first_tcp_flags = packet.tcp_flags;
    value.first_ifindex = ctx.ifindex();
    value.vlan = packet.vlan;
    value.pppoe_session = packet.pppoe_session;
    value.l2_from_lan = (role == roles::LAN) as u8;
    value.end_sent = (ends_flow(packet.tcp_flags) as u8) << index;
    let hint = wants_hint(packet, dir, value);
    // Constant indices: a variable index into a value on the stack can
    // compile to a pointer OR, which the verifier refuses.
    if index == 0 {
        first_side::<0>(value, packet, role, hint);
    } else {
        first_side::<1>(value, packet, role, hint);
    }
}

/// The events of a flow's first packet: `kind` (its start), and its hint
/// and end if it carries them.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn announce<F: Frame, S: EventSink>(
    ctx: &F,
    kind: u8,
    key: &FlowKey,
    value: &FlowValue,
    packet: &Packet,
    dir: u8,
    role: u8,
    events: &S,
) {
    let now = value.first_ns;
    emit(ctx, kind, key, packet, dir, role, now, events);
    if value.hint_bytes[dir as usize & 1] != 0 {
        emit(ctx, event_kind::HINT, key, packet, dir, role, now, events);
    }
    if value.end_sent != 0 {
        emit(ctx, event_kind::FLOW_END, key, packet, dir, role, now, events);
    }
}

/// Whether `packet` opens a new TCP connection on the 5-tuple of an ended
/// one: a SYN from a side that already sent FIN or RST (no connection sends
/// SYN after its end; a device or a NAT reusing a port within seconds does).
#[inline(always)]
fn reopens(packet: &Packet, value: &FlowValue, index: usize) -> bool {
    packet.proto == ip_proto::TCP
        && packet.tcp_flags & tcp_flags::SYN != 0
        && value.tcp_flags[index & 1] & (tcp_flags::FIN | tcp_flags::RST) != 0
}

/// Moves the ended connection in `value` aside (to its key's retired
/// generation, where the agent records it) and starts the new one in its
/// place. False when an earlier connection moved aside is still there (not
/// recorded yet): the new one is then counted into the ended one.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn reopen<F: Frame, S: EventSink>(
    ctx: &F,
    key: &FlowKey,
    value: *mut FlowValue,
    packet: &Packet,
    dir: u8,
    role: u8,
    events: &S,
) -> bool {
    // SAFETY: `value` points into a live hash map entry; the helper copies
    // it from there (no room on the stack for a copy, so the borrow stays).
    #[allow(clippy::needless_borrows_for_generic_args)]
    let moved_aside = FLOWS.insert(key.retired(), unsafe { &*value }, BPF_NOEXIST as u64);
    if moved_aside.is_err() {
        maps::count(counter::REOPEN_MERGED);
        return false;
    }
    maps::count(counter::REOPENED);
    // SAFETY: as above. Other CPUs may count into it meanwhile: the new
    // connection's first packets, at worst a count lost to the race.
    let value = unsafe { &mut *value };
    first_packet(value, ctx, packet, dir, role, maps::now_ns(MidFlowClock::Precise));
    announce(ctx, event_kind::FLOW_REOPEN, key, value, packet, dir, role, events);
    true
}

/// A packet the gateway itself sent to a device (TC egress on a LAN port):
/// counted against the device's flow, if the probe tracks it, as the
/// flow's downstream side, with the gateway's role. Never creates a flow:
/// the device's first packet, seen by XDP, does; what the gateway starts on
/// its own is no device's connection.
#[inline(always)]
pub fn from_gateway<F: Frame, S: EventSink>(ctx: &F, packet: &Packet, events: &S, mid_flow_clock: MidFlowClock) {
    let (key, dir) = key_of(packet);
    if let Some(value) = FLOWS.get_ptr_mut(key) {
        update(ctx, &key, value, packet, dir, roles::GATEWAY, events, mid_flow_clock);
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn update<F: Frame, S: EventSink>(
    ctx: &F,
    key: &FlowKey,
    value: *mut FlowValue,
    packet: &Packet,
    dir: u8,
    role: u8,
    events: &S,
    mid_flow_clock: MidFlowClock,
) {
    let index = dir as usize & 1;
    let side = 1u8 << index;
    // SAFETY: `value` points into a live hash map entry.
    if reopens(packet, unsafe { &*value }, index) && reopen(ctx, key, value, packet, dir, role, events) {
        return;
    }
    // SAFETY: `value` points into a live hash map entry. Both directions of a
    // flow may be counted on different CPUs at once, so the counters are
    // atomic; the other fields tolerate a lost race (a flag bit, a MAC).
    unsafe {
        let retry = packet.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN && dir == (*value).first_dir;
        let hint = wants_hint(packet, dir, &*value);
        let ends = ends_flow(packet.tcp_flags) && (*value).end_sent & side == 0;
        // A packet that sends an event, or times a SYN retry, is stamped
        // precisely; one that only updates the flow may take the coarse clock.
        let now = maps::now_ns(if hint || ends || retry { MidFlowClock::Precise } else { mid_flow_clock });
        add(&raw mut (*value).packets[index], 1);
        add(&raw mut (*value).bytes[index], packet.ip_len as u64);
        // Never backwards: a coarse stamp can be older than a precise one
        // of a packet just before it.
        if now > (*value).last_ns {
            (*value).last_ns = now;
        }
        (*value).tcp_flags[index] |= packet.tcp_flags;
        if retry {
            (*value).syn_retry = (now.saturating_sub((*value).first_ns) >> SYN_RETRY_SHIFT) as u32;
        }
        (*value).roles[index] |= role;
        if (*value).mac[index] == [0; 6] {
            (*value).mac[index] = packet.mac_src;
        }
        if role == roles::LAN && (*value).l2_from_lan == 0 {
            (*value).l2_from_lan = 1;
            (*value).vlan = packet.vlan;
            (*value).pppoe_session = packet.pppoe_session;
        }
        if hint {
            (*value).hint_bytes[index] = (*value).hint_bytes[index].saturating_add(packet.payload_len);
            emit(ctx, event_kind::HINT, key, packet, dir, role, now, events);
        }
        // One end event per direction: the first FIN (or RST) each side sends.
        if ends {
            (*value).end_sent |= side;
            emit(ctx, event_kind::FLOW_END, key, packet, dir, role, now, events);
        }
    }
}

/// An atomic add whose result is unused, which the BPF backend emits as one
/// `lock xadd` instruction (core's `AtomicU64::fetch_add` is not available
/// on the BPF target).
#[inline(always)]
unsafe fn add(counter: *mut u64, amount: u64) {
    // SAFETY: the caller passes a pointer into a live map value.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, amount) };
}

/// Whether this packet's payload may name the service, within the flow's
/// budget: TCP data from the side that opened the connection (ClientHello,
/// HTTP request) or either side of DNS; UDP DNS, and QUIC Initials from the
/// client.
#[inline(always)]
fn wants_hint(packet: &Packet, dir: u8, value: &FlowValue) -> bool {
    if packet.payload_len == 0 || value.hint_bytes[dir as usize & 1] >= HINT_BUDGET {
        return false;
    }
    let dns = packet.src_port == DNS_PORT || packet.dst_port == DNS_PORT;
    match packet.proto {
        ip_proto::TCP => dns || dir == value.first_dir,
        ip_proto::UDP => dns || (dir == value.first_dir && packet.quic_initial),
        _ => false,
    }
}

/// A new flow's counters for the direction `SIDE` its first packet took.
#[inline(always)]
fn first_side<const SIDE: usize>(value: &mut FlowValue, packet: &Packet, role: u8, hint: bool) {
    value.packets[SIDE] = 1;
    value.bytes[SIDE] = packet.ip_len as u64;
    value.mac[SIDE] = packet.mac_src;
    value.tcp_flags[SIDE] = packet.tcp_flags;
    value.roles[SIDE] = role;
    if hint {
        value.hint_bytes[SIDE] = packet.payload_len;
    }
}

/// A TCP packet on the WAN side that opens nothing: without SYN, it belongs
/// to a connection the table no longer (or never) held. Made a flow, a late
/// FIN or ACK of a connection already written became a second record with
/// the remote end as its "device". A device's connection opens from the LAN
/// (where a packet without SYN still makes a flow: a connection the probe
/// joined mid-way, at its first load), an inbound one with a SYN from the WAN.
/// (A non-first fragment, without ports or flags, keeps its 3-tuple flow.)
#[inline(always)]
fn is_wan_stray(packet: &Packet, role: u8) -> bool {
    let fragment = packet.src_port == 0 && packet.dst_port == 0;
    role == roles::WAN && packet.proto == ip_proto::TCP && packet.tcp_flags & tcp_flags::SYN == 0 && !fragment
}

#[inline(always)]
fn ends_flow(flags: u8) -> bool {
    flags & (tcp_flags::FIN | tcp_flags::RST) != 0
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn emit<F: Frame, S: EventSink>(
    ctx: &F,
    kind: u8,
    key: &FlowKey,
    packet: &Packet,
    dir: u8,
    role: u8,
    now: u64,
    events: &S,
) {
    let frame_len = if kind == event_kind::HINT {
        let len = ctx.len();
        if len < HINT_MAX_FRAME { len } else { HINT_MAX_FRAME }
    } else {
        0
    };
    let event = FlowEvent {
        kind,
        dir,
        role,
        tcp_flags: packet.tcp_flags,
        ifindex: ctx.ifindex(),
        ts_ns: now,
        key: *key,
        mac_src: packet.mac_src,
        payload_offset: packet.payload_offset,
        captured_len: frame_len as u16,
        pppoe_session: packet.pppoe_session,
        vlan: packet.vlan,
        tcp_seq: packet.tcp_seq,
        _pad: [0; 4],
    };
    match events.send(ctx, &event, frame_len) {
        Ok(()) => {
            maps::count(counter::EVENTS_SENT);
            if kind == event_kind::HINT {
                maps::count(counter::HINTS_SENT);
            }
        }
        Err(_) => maps::count(counter::EVENTS_LOST),
    }
}
