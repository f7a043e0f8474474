//! Header parsing, in the manner of xdp-tools' parsing helpers: one cursor,
//! one bounds check per header, one function per header returning what comes
//! next. Every loop is bounded so the verifier can see its end.
use core::mem::size_of;

use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};
use probe_common::{
    counter,
    ip_proto::{
        DSTOPTS as IPPROTO_DSTOPTS, FRAGMENT as IPPROTO_FRAGMENT, HOPOPTS as IPPROTO_HOPOPTS,
        ROUTING as IPPROTO_ROUTING, TCP as IPPROTO_TCP, UDP as IPPROTO_UDP,
    },
};

use crate::frame::Frame;

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const ETH_P_PPPOE_SESSION: u16 = 0x8864;
const PPP_IPV4: u16 = 0x0021;
const PPP_IPV6: u16 = 0x0057;

/// VLAN tags we look through (802.1Q, QinQ).
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers we walk before giving up on the ports.
const MAX_IPV6_EXT_HEADERS: usize = 4;

/// Why a packet is not tracked; each reason has its counter. One register wide.
#[derive(Clone, Copy)]
pub struct Skip(u32);

impl Skip {
    const NOT_IP: Skip = Skip(counter::NOT_IP);
    const MALFORMED: Skip = Skip(counter::MALFORMED);

    pub fn counter(self) -> u32 {
        self.0
    }
}
const _: () = assert!(size_of::<Skip>() == 4);

/// What the flow table needs to know about one packet.
pub struct Packet {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub mac_src: [u8; 6],
    /// Bytes at the IP layer (the IP header's length field, bounded by the frame).
    pub ip_len: u32,
    /// VLAN ids, outer then inner (0: none).
    pub vlan: [u16; 2],
    /// PPPoE session id (0: none).
    pub pppoe_session: u16,
    /// Where the transport payload starts, and how long it is (0 if none).
    pub payload_offset: u16,
    pub payload_len: u16,
    pub tcp_seq: u32,
    /// Where the IP header starts.
    pub l3_offset: u16,
    /// A QUIC v1 or v2 Initial: a long header whose type is Initial.
    pub quic_initial: bool,
}

/// A read position in the packet.
struct Cursor<'a, F: Frame> {
    ctx: &'a F,
    offset: usize,
}

impl<F: Frame> Cursor<'_, F> {
    /// Returns a pointer to a `T` at the cursor and moves past it, or
    /// `MALFORMED` if the packet ends first. The only bounds check in the file.
    #[inline(always)]
    fn next<T>(&mut self) -> Result<*const T, Skip> {
        let start = self.ctx.data() + self.offset;
        if start + size_of::<T>() > self.ctx.data_end() {
            return Err(Skip::MALFORMED);
        }
        self.offset += size_of::<T>();
        Ok(start as *const T)
    }

    #[inline(always)]
    fn skip(&mut self, len: usize) {
        self.offset += len;
    }

    #[inline(always)]
    fn remaining(&self) -> usize {
        (self.ctx.data_end() - self.ctx.data()).saturating_sub(self.offset)
    }
}

#[inline(always)]
fn be16(bytes: [u8; 2]) -> u16 {
    u16::from_be_bytes(bytes)
}

#[inline(always)]
fn ipv4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3]]
}

/// Parses Ethernet (with up to two VLAN tags), IPv4 or IPv6, then TCP or UDP.
#[inline(always)]
pub fn packet<F: Frame>(ctx: &F) -> Result<Packet, Skip> {
    let mut cursor = Cursor { ctx, offset: 0 };
    let eth = cursor.next::<EthHdr>()?;
    // SAFETY: `next` checked that the header lies inside the packet.
    let (mac_src, mut ether_type) = unsafe { ((*eth).src_addr, u16::from_be((*eth).ether_type)) };

    let mut packet = Packet {
        src: [0; 16],
        dst: [0; 16],
        src_port: 0,
        dst_port: 0,
        proto: 0,
        tcp_flags: 0,
        mac_src,
        ip_len: 0,
        vlan: [0; 2],
        pppoe_session: 0,
        payload_offset: 0,
        payload_len: 0,
        tcp_seq: 0,
        l3_offset: 0,
        quic_initial: false,
    };
    for tag in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let vlan = cursor.next::<VlanHdr>()?;
        // SAFETY: bounds checked by `next`.
        let (tci, next) = unsafe { (be16((*vlan).tci), u16::from_be((*vlan).ether_type)) };
        packet.vlan[tag] = tci & 0x0fff;
        ether_type = next;
    }
    if ether_type == ETH_P_PPPOE_SESSION {
        ether_type = pppoe(&mut cursor, &mut packet)?;
    }

    packet.l3_offset = cursor.offset as u16;
    let first_fragment = match ether_type {
        ETH_P_IPV4 => ipv4(&mut cursor, &mut packet)?,
        ETH_P_IPV6 => ipv6(&mut cursor, &mut packet)?,
        _ => return Err(Skip::NOT_IP),
    };
    if first_fragment {
        transport(&mut cursor, &mut packet)?;
    }
    Ok(packet)
}

/// PPPoE session header (RFC 2516) and the PPP protocol: returns the
/// ethertype of what it carries, or `NOT_IP` for PPP control traffic.
#[inline(always)]
fn pppoe<F: Frame>(cursor: &mut Cursor<F>, packet: &mut Packet) -> Result<u16, Skip> {
    let header = cursor.next::<[u8; 6]>()?;
    let protocol = cursor.next::<[u8; 2]>()?;
    // SAFETY: bounds checked by `next`.
    let (header, protocol) = unsafe { (*header, *protocol) };
    packet.pppoe_session = be16([header[2], header[3]]);
    // Protocol field compression (RFC 1661 6.5): an odd first byte is the
    // whole protocol number. Some PPPoE peers use it despite RFC 2516.
    let protocol = if protocol[0] & 1 == 1 {
        cursor.offset -= 1;
        u16::from(protocol[0])
    } else {
        be16(protocol)
    };
    match protocol {
        PPP_IPV4 => Ok(ETH_P_IPV4),
        PPP_IPV6 => Ok(ETH_P_IPV6),
        _ => Err(Skip::NOT_IP),
    }
}

/// Returns whether the transport header follows (false for non-first fragments).
#[inline(always)]
fn ipv4<F: Frame>(cursor: &mut Cursor<F>, packet: &mut Packet) -> Result<bool, Skip> {
    let available = cursor.remaining();
    let ip = cursor.next::<Ipv4Hdr>()?;
    // SAFETY: bounds checked by `next`.
    let ip = unsafe { &*ip };
    let header_len = ip.ihl() as usize;
    if ip.version() != 4 || header_len < Ipv4Hdr::LEN {
        return Err(Skip::MALFORMED);
    }
    cursor.skip(header_len - Ipv4Hdr::LEN);
    packet.src = ipv4_mapped(ip.src_addr);
    packet.dst = ipv4_mapped(ip.dst_addr);
    packet.proto = ip.proto;
    packet.ip_len = bounded_len(be16(ip.tot_len) as usize, available);
    let first_fragment = ip.frag_offset() == 0;
    if !first_fragment {
        crate::maps::count(counter::FRAGMENTS);
    }
    Ok(first_fragment)
}

/// Walks a bounded number of extension headers to find the transport header.
#[inline(always)]
fn ipv6<F: Frame>(cursor: &mut Cursor<F>, packet: &mut Packet) -> Result<bool, Skip> {
    let available = cursor.remaining();
    let ip = cursor.next::<Ipv6Hdr>()?;
    // SAFETY: bounds checked by `next`.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Err(Skip::MALFORMED);
    }
    packet.src = ip.src_addr;
    packet.dst = ip.dst_addr;
    packet.ip_len = bounded_len(be16(ip.payload_len) as usize + Ipv6Hdr::LEN, available);

    let mut next_header = ip.next_hdr;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next_header {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext = cursor.next::<[u8; 2]>()?;
                // SAFETY: bounds checked by `next`.
                let [next, len_units] = unsafe { *ext };
                // Length in 8-octet units, not counting the first 8 octets.
                cursor.skip(6 + len_units as usize * 8);
                next_header = next;
            }
            IPPROTO_FRAGMENT => {
                let frag = cursor.next::<[u8; 8]>()?;
                // SAFETY: bounds checked by `next`.
                let frag = unsafe { *frag };
                next_header = frag[0];
                let offset = be16([frag[2], frag[3]]) >> 3;
                if offset != 0 {
                    packet.proto = next_header;
                    crate::maps::count(counter::FRAGMENTS);
                    return Ok(false);
                }
            }
            _ => break,
        }
    }
    packet.proto = next_header;
    Ok(true)
}

/// Fills ports (and TCP flags); other protocols are tracked by addresses alone.
#[inline(always)]
fn transport<F: Frame>(cursor: &mut Cursor<F>, packet: &mut Packet) -> Result<(), Skip> {
    match packet.proto {
        IPPROTO_TCP => {
            let tcp = cursor.next::<TcpHdr>()?;
            // SAFETY: bounds checked by `next`.
            let tcp = unsafe { &*tcp };
            packet.src_port = be16(tcp.source);
            packet.dst_port = be16(tcp.dest);
            packet.tcp_seq = u32::from_be_bytes(tcp.seq);
            // Byte 13 of the header: CWR ECE URG ACK PSH RST SYN FIN.
            // SAFETY: `tcp` spans the 20-byte header.
            let [offset_byte, flags] = unsafe { *(tcp as *const TcpHdr).cast::<[u8; 2]>().add(6) };
            packet.tcp_flags = flags;
            let header_len = (offset_byte >> 4) as usize * 4;
            if header_len < TcpHdr::LEN {
                return Err(Skip::MALFORMED);
            }
            cursor.skip(header_len - TcpHdr::LEN);
        }
        IPPROTO_UDP => {
            let udp = cursor.next::<UdpHdr>()?;
            // SAFETY: bounds checked by `next`.
            let udp = unsafe { &*udp };
            packet.src_port = be16(udp.src);
            packet.dst_port = be16(udp.dst);
        }
        _ => return Ok(()),
    }
    // The payload: what the IP length says follows the transport header,
    // bounded by the frame (Ethernet padding is not payload).
    let l3_end = packet.l3_offset as usize + packet.ip_len as usize;
    if cursor.offset < l3_end && cursor.offset < u16::MAX as usize {
        packet.payload_offset = cursor.offset as u16;
        packet.payload_len = (l3_end - cursor.offset) as u16;
        if packet.proto == IPPROTO_UDP {
            packet.quic_initial = quic_initial(cursor);
        }
    }
    Ok(())
}

/// Whether the UDP payload at the cursor starts a QUIC Initial packet: the
/// long-header bit, then the type bits that mean Initial in its version.
/// (0-RTT and Handshake packets cannot be read by an observer.)
#[inline(always)]
fn quic_initial<F: Frame>(cursor: &mut Cursor<F>) -> bool {
    const QUIC_V1: u32 = 0x0000_0001;
    const QUIC_V2: u32 = 0x6b33_43cf;
    let Ok(header) = cursor.next::<[u8; 5]>() else { return false };
    // SAFETY: bounds checked by `next`.
    let [first, v0, v1, v2, v3] = unsafe { *header };
    let packet_type = (first & 0x30) >> 4;
    first & 0x80 != 0
        && match u32::from_be_bytes([v0, v1, v2, v3]) {
            QUIC_V1 => packet_type == 0,
            QUIC_V2 => packet_type == 1,
            _ => false,
        }
}

#[inline(always)]
fn bounded_len(claimed: usize, available: usize) -> u32 {
    if claimed < available { claimed as u32 } else { available as u32 }
}
