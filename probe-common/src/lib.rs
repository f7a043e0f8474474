//! Types shared by the XDP programs (`probe-ebpf`) and the agent (`probe-user`).
//!
//! Everything here is `#[repr(C)]`, made of plain integers and arrays, with
//! padding spelled out as fields and sizes asserted at compile time, so both
//! sides agree on every byte and the userspace side may implement `aya::Pod`.
#![no_std]

use core::mem::size_of;

mod typed;
pub use typed::{BadMac, BadProto, Mac, Proto, Role, Roles};

/// Map and program names: the ELF symbols the agent looks up.
pub mod names {
    pub const FLOWS: &str = "FLOWS";
    /// The per-CPU perf event arrays of the `probe-perf` object.
    pub const EVENTS: &str = "EVENTS";
    /// The `probe` object's array of per-CPU ring buffers.
    pub const EVENT_RINGS: &str = "EVENT_RINGS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const CONFIG: &str = "CONFIG";
    pub const PROG_LAN: &str = "icr_lan";
    pub const PROG_WAN: &str = "icr_wan";
    /// The TC program on LAN ports' egress (the gateway's own answers).
    pub const PROG_LAN_EGRESS: &str = "icr_lan_egress";
}

/// Default capacity of the kernel flow table (entries); the agent may resize
/// it at load time.
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1 << 20;

/// Where a packet was seen: which side of the gateway it arrived on (XDP),
/// or leaving a LAN port from the gateway itself (TC egress).
pub mod role {
    /// Subscriber side: packets from devices, before NAT.
    pub const LAN: u8 = 1;
    /// Internet side: packets towards the public address, before de-NAT.
    pub const WAN: u8 = 2;
    /// Sent by the gateway's own stack to a device (its resolver, DHCP
    /// server, web page): the exchange never left the gateway.
    pub const GATEWAY: u8 = 4;
}

/// TCP flag bits as they sit in the TCP header's flags byte.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// A flow, keyed so that both directions of a connection share one entry:
/// the endpoint that sorts lower (address, then port) is `lo`. A packet from
/// `lo` to `hi` travels in direction 0, the reverse in direction 1.
///
/// Addresses are 16 bytes; IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`).
/// Ports are host byte order; for ICMP they are 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub addr_lo: [u8; 16],
    pub addr_hi: [u8; 16],
    pub port_lo: u16,
    pub port_hi: u16,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...).
    pub proto: u8,
    /// 0 for the 5-tuple's current connection. [`FlowKey::RETIRED`]: an
    /// ended TCP connection the XDP program moved aside when a new one
    /// opened on the same 5-tuple (a port reused within seconds), so that
    /// the two are counted and recorded apart.
    pub generation: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

impl FlowKey {
    /// The key both directions of a flow share, and the direction of a
    /// packet from `src` to `dst` in it: the one ordering the XDP program,
    /// the agent and the tests all use.
    #[inline(always)]
    pub fn of(src: [u8; 16], src_port: u16, dst: [u8; 16], dst_port: u16, proto: u8) -> (FlowKey, u8) {
        // Big-endian integers compare as the bytes do, in fewer instructions.
        let src_is_lo = (u128::from_be_bytes(src), src_port) <= (u128::from_be_bytes(dst), dst_port);
        let (addr_lo, port_lo, addr_hi, port_hi, dir) =
            if src_is_lo { (src, src_port, dst, dst_port, 0) } else { (dst, dst_port, src, src_port, 1) };
        (FlowKey { addr_lo, addr_hi, port_lo, port_hi, proto, generation: 0, _pad: [0; 2] }, dir)
    }

    /// [`FlowKey::generation`] of a connection moved aside for a newer one.
    pub const RETIRED: u8 = 1;

    /// Where the XDP program moves this 5-tuple's ended connection when a
    /// new one opens on it.
    #[inline(always)]
    pub fn retired(&self) -> FlowKey {
        FlowKey { generation: Self::RETIRED, ..*self }
    }

    /// The 5-tuple's current connection's key.
    pub fn current(&self) -> FlowKey {
        FlowKey { generation: 0, ..*self }
    }

    pub fn is_retired(&self) -> bool {
        self.generation != 0
    }
}

/// IP protocol numbers (IANA), as the key's `proto` holds them.
pub mod ip_proto {
    pub const HOPOPTS: u8 = 0;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const DSTOPTS: u8 = 60;
}

/// Per-flow state in the kernel flow table. Counters are indexed by direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Kernel time (ns, CLOCK_MONOTONIC, or the replay clock) of the first packet.
    pub first_ns: u64,
    /// Kernel time of the latest packet.
    pub last_ns: u64,
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    /// Source MAC of the first packet seen in each direction (zero if none).
    pub mac: [[u8; 6]; 2],
    /// OR of the TCP flags seen in each direction.
    pub tcp_flags: [u8; 2],
    /// Bit set of [`role`]s each direction was seen arriving on.
    pub roles: [u8; 2],
    /// Direction of the first packet seen.
    pub first_dir: u8,
    /// TCP flags of the first packet seen (a lone SYN names the client).
    pub first_tcp_flags: u8,
    /// Bit per direction: a flow-end event was sent for that side's first
    /// FIN or RST (each side's end is reported once).
    pub end_sent: u8,
    /// Set once the layer-2 fields below come from a LAN-side packet.
    pub l2_from_lan: u8,
    /// Interface the first packet arrived on.
    pub first_ifindex: u32,
    /// VLAN ids (outer, inner; 0: none) and PPPoE session (0: none) of the
    /// device's side.
    pub vlan: [u16; 2],
    pub pppoe_session: u16,
    /// Payload bytes already shipped as hints, per direction (see [`HINT_BUDGET`]).
    pub hint_bytes: [u16; 2],
    pub _pad: [u8; 2],
    /// When the opener last sent a TCP SYN without ACK again, in units of
    /// 2^20 ns (about 1 ms) after `first_ns`; 0 if it never did. A SYN is
    /// retried when it got no answer, e.g. dropped by a NAT with no public
    /// port free: the connection opened with the last one, perhaps seconds
    /// after the first. (In what was padding: maps pinned by an older probe
    /// keep their size and read 0.)
    pub syn_retry: u32,
}
const _: () = assert!(size_of::<FlowValue>() == 88);

/// The unit of [`FlowValue::syn_retry`], as a shift of nanoseconds: a
/// shift is cheaper than a division in the kernel, and 32 bits of it span
/// 52 days.
pub const SYN_RETRY_SHIFT: u32 = 20;

/// Payload bytes per flow and direction the probe ships as hints: enough
/// for a ClientHello with post-quantum key shares spread over several
/// segments or QUIC Initials, and for a few DNS transactions.
pub const HINT_BUDGET: u16 = 8192;
/// Frames longer than this are shipped cut (jumbo frames).
/// (A power of two: the ring buffer's hint slots are; see probe-ebpf's
/// `events::RingEvents`. A frame this long holds the whole payload budget.)
pub const HINT_MAX_FRAME: u32 = 8192;

/// Default size of each CPU's event ring buffer (a power of two number of
/// pages): room for about 50,000 flow events, or 2,500 full-frame hints, from
/// one CPU while the agent is between two reads. The agent may size them at
/// load time.
pub const EVENT_RING_BYTES: u32 = 4 << 20;
/// The ring the probe's object declares as the template of its per-CPU
/// rings: the kernel checks the agent's rings against its type, not its size.
pub const EVENT_RING_TEMPLATE_BYTES: u32 = 4096;
/// The per-CPU ring array's size in the object; the agent sizes it to the
/// machine's possible CPUs at load time.
pub const EVENT_RINGS_MAX_CPUS: u32 = 1024;
/// A record wakes the agent only when its ring holds 1/this of its size (128
/// KiB of the default); below it the agent's timer drains the ring
/// ([`EVENT_RING_DRAIN_MS`]). One wakeup costs microseconds, so it is spread
/// over thousands of events.
pub const EVENT_RING_WAKEUP_DIVISOR: u32 = 32;
/// The probe's global holding that threshold in bytes, set by the agent when
/// it loads the ring buffer object.
pub const EVENT_RING_WAKEUP_GLOBAL: &str = "ICR_RING_WAKEUP_BYTES";
/// How often the agent drains the ring whether or not it was woken: the
/// longest a quiet ring holds an event.
pub const EVENT_RING_DRAIN_MS: u64 = 50;

/// Kinds of [`FlowEvent`].
pub mod event_kind {
    /// A new entry was added to the flow table.
    pub const FLOW_START: u8 = 1;
    /// A side of a tracked flow sent its first FIN or RST (once per side).
    pub const FLOW_END: u8 = 2;
    /// A packet whose payload may name the service (TLS ClientHello, QUIC
    /// Initial, DNS, HTTP request): the frame follows the event.
    pub const HINT: u8 = 3;
    /// A new TCP connection opened on the 5-tuple of an ended one (a SYN
    /// from a side that had sent FIN or RST): the ended one was moved to
    /// [`FlowKey::retired`](crate::FlowKey::retired), and the entry now
    /// counts the new one, as from a [`FLOW_START`].
    pub const FLOW_REOPEN: u8 = 4;
}

/// What the XDP program sends to the agent through its event buffer:
/// flow starts and ends, and hints, never one event per packet. A hint
/// event is followed by `captured_len` bytes of the frame, from its start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub kind: u8,
    /// Direction of the packet that caused the event.
    pub dir: u8,
    /// [`role`] of the interface it arrived on.
    pub role: u8,
    pub tcp_flags: u8,
    pub ifindex: u32,
    pub ts_ns: u64,
    pub key: FlowKey,
    pub mac_src: [u8; 6],
    /// Where the transport payload starts in the frame.
    pub payload_offset: u16,
    /// Frame bytes following this event (hints only).
    pub captured_len: u16,
    pub pppoe_session: u16,
    pub vlan: [u16; 2],
    /// TCP sequence number of the packet (for reassembling hints).
    pub tcp_seq: u32,
    pub _pad: [u8; 4],
}
const _: () = assert!(size_of::<FlowEvent>() == 80);

/// Indices into the per-CPU `COUNTERS` array.
pub mod counter {
    /// Packets the program saw.
    pub const PACKETS: u32 = 0;
    /// Packets that were not IPv4/IPv6 (ARP, LLDP, ...): passed, not tracked.
    pub const NOT_IP: u32 = 1;
    /// Packets whose headers were truncated or malformed: passed, not tracked.
    pub const MALFORMED: u32 = 2;
    /// Flows added to the flow table.
    pub const FLOWS_CREATED: u32 = 3;
    /// Packets of new flows that the full flow table could not take.
    pub const FLOW_TABLE_FULL: u32 = 4;
    /// Events the perf buffer had no room for.
    pub const EVENTS_LOST: u32 = 5;
    /// Events sent.
    pub const EVENTS_SENT: u32 = 6;
    /// Non-first IP fragments (no ports): counted under their 3-tuple flow.
    pub const FRAGMENTS: u32 = 7;
    /// Hint events sent (payload for service names).
    pub const HINTS_SENT: u32 = 8;
    /// TCP packets without SYN that arrived on the WAN side for no flow the
    /// table holds: a late packet of a connection already closed (a
    /// retransmitted FIN or RST, a stray ACK), or one begun before the probe
    /// was loaded. They create no flow: every connection of a device opens
    /// with a SYN from the LAN, an inbound one with a SYN from the WAN.
    pub const WAN_STRAYS: u32 = 9;
    /// New TCP connections on the 5-tuple of an ended one still in the
    /// table, which was moved aside (see `event_kind::FLOW_REOPEN`).
    pub const REOPENED: u32 = 10;
    /// Such new connections counted into the ended one instead, because an
    /// earlier one moved aside was not recorded yet (three connections on
    /// one 5-tuple within a few seconds): their record covers both.
    pub const REOPEN_MERGED: u32 = 11;
    pub const COUNT: u32 = 12;

    /// Names for logs and metrics, in index order.
    pub const NAMES: [&str; COUNT as usize] = [
        "packets",
        "not_ip",
        "malformed",
        "flows_created",
        "flow_table_full",
        "events_lost",
        "events_sent",
        "fragments",
        "hints_sent",
        "wan_strays",
        "reopened",
        "reopen_merged",
    ];
}

/// Run-time settings the agent writes into the one-entry `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeConfig {
    /// When non-zero, the program uses this as "now" instead of the kernel
    /// clock: `icr replay` sets it to each captured packet's timestamp.
    pub clock_override_ns: u64,
}
const _: () = assert!(size_of::<ProbeConfig>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain integers and arrays, `repr(C)`, no implicit padding
    // (sizes asserted above); so are the three below.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProbeConfig {}
}
