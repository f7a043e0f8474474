//! Directed 5-tuples, and their relation to the kernel's direction-free
//! `FlowKey`.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use probe_common::{FlowKey, Proto};

/// One direction of a connection: `src` sent to `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
    pub proto: Proto,
}

impl Tuple {
    /// The direction `dir` (0: lo→hi, 1: hi→lo) of a kernel flow.
    pub fn from_key(key: &FlowKey, dir: u8) -> Self {
        let lo = ip_from_bytes(key.addr_lo);
        let hi = ip_from_bytes(key.addr_hi);
        if dir == 0 {
            Tuple { src: lo, src_port: key.port_lo, dst: hi, dst_port: key.port_hi, proto: Proto::from(key.proto) }
        } else {
            Tuple { src: hi, src_port: key.port_hi, dst: lo, dst_port: key.port_lo, proto: Proto::from(key.proto) }
        }
    }

    pub fn reversed(&self) -> Self {
        Tuple { src: self.dst, src_port: self.dst_port, dst: self.src, dst_port: self.src_port, proto: self.proto }
    }

    /// The kernel's key for this tuple's flow, and this tuple's direction in
    /// it (`FlowKey::of`, as the XDP program builds it).
    pub fn key(&self) -> (FlowKey, u8) {
        FlowKey::of(ip_to_bytes(self.src), self.src_port, ip_to_bytes(self.dst), self.dst_port, u8::from(self.proto))
    }
}

/// 16 kernel bytes to an address; IPv4-mapped addresses become IPv4.
pub fn ip_from_bytes(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

pub fn ip_to_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn ipv4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_shared_by_both_directions() {
        let up =
            Tuple { src: ipv4(10, 0, 0, 2), src_port: 40000, dst: ipv4(1, 1, 1, 1), dst_port: 443, proto: Proto::Tcp };
        let (key_up, dir_up) = up.key();
        let (key_down, dir_down) = up.reversed().key();
        assert_eq!(key_up, key_down);
        assert_ne!(dir_up, dir_down);
        assert_eq!(Tuple::from_key(&key_up, dir_up), up);
        assert_eq!(Tuple::from_key(&key_up, dir_down), up.reversed());
    }

    #[test]
    fn ipv6_round_trips() {
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(ip_from_bytes(ip_to_bytes(ip)), ip);
        assert_eq!(ip_from_bytes(ip_to_bytes(ipv4(192, 0, 2, 1))), ipv4(192, 0, 2, 1));
    }
}
