//! The hint packets of one kernel flow, in order, into `FlowHints` (TCP
//! reassembly, TLS/HTTP/DNS-over-TCP, QUIC, DNS over UDP), then the merge of
//! two NAT sides and the per-device DNS cache.
//!
//! Input: one byte for the flow, bit 0 UDP (else TCP), bits 1-2 the server
//! port (53, 443, 80, 8080); then packets of
//!   flags: u8   bit 0 dir (1: from the server), bit 1 a SYN
//!               (`client_syn(dir, seq)`) instead of a packet, bit 2 the
//!               other NAT side's flow (same connection, other `FlowHints`)
//!   seq:   u32  big-endian TCP sequence number (ISN for a SYN)
//!   len:   u16  big-endian payload length (the last payload may be cut)
//!   payload
#![no_main]
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use icr::capture::hints::{DeviceId, DnsCache, FlowHints, HintPacket, Seen};
use libfuzzer_sys::fuzz_target;
use probe_common::{Mac, Proto, Role, Roles};

const PORTS: [u16; 4] = [53, 443, 80, 8080];
const CLIENT_PORT: u16 = 50000;

fuzz_target!(|data: &[u8]| {
    let Some((&flow, mut rest)) = data.split_first() else { return };
    let proto = if flow & 1 != 0 { Proto::Udp } else { Proto::Tcp };
    let port = PORTS[usize::from(flow >> 1 & 3)];
    let mut sides = [FlowHints::default(), FlowHints::default()];
    let mut cache = DnsCache::with_max_entries(1 << 12);
    let device = DeviceId { mac: Mac([2, 0, 0, 0, 0, 2]), ip: IpAddr::V4(Ipv4Addr::new(192, 168, 1, 2)) };
    let resolver = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1)), 53);
    let mut now_ns = 1_000_000_000u64;
    while let [flags, s0, s1, s2, s3, l0, l1, tail @ ..] = rest {
        let length = usize::from(u16::from_be_bytes([*l0, *l1])).min(tail.len());
        let (payload, next) = tail.split_at(length);
        rest = next;
        let dir = flags & 1;
        let seq = u32::from_be_bytes([*s0, *s1, *s2, *s3]);
        let hints = &mut sides[usize::from(flags >> 2 & 1)];
        if flags & 2 != 0 {
            hints.client_syn(dir, seq);
            continue;
        }
        let (src_port, dst_port) = if dir == 0 { (CLIENT_PORT, port) } else { (port, CLIENT_PORT) };
        let roles = Roles::of(if dir == 0 { Role::Lan } else { Role::Wan });
        let seen = Seen { ts_ns: now_ns, roles, ..Seen::default() };
        let packet = HintPacket { dir, proto, src_port, dst_port, tcp_seq: seq, payload, seen };
        for response in hints.add(&packet) {
            let _ = hints.question(&response, 0);
            cache.insert(device, &response, now_ns, resolver);
            for answer in &response.answers {
                if let Some(ip) = answer.ip {
                    let _ = cache.lookup(device, ip, now_ns);
                }
            }
        }
        now_ns += 1_000_000;
    }
    let _ = FlowHints::merged(Some(&sides[0]), Some(&sides[1]));
    cache.expire(now_ns);
});
