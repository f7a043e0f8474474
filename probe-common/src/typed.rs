//! The raw integers of the `#[repr(C)]` types, decoded: user space works
//! with these past the point where it reads a map or an event.
use core::{fmt, str::FromStr};

use crate::{ip_proto, role};

/// Which side of the gateway a port faces, or the gateway itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Lan,
    Wan,
    /// Sent by the gateway itself to a device (seen leaving a LAN port).
    Gateway,
}

impl Role {
    /// The bit the kernel sets for this role.
    pub const fn bit(self) -> u8 {
        match self {
            Self::Lan => role::LAN,
            Self::Wan => role::WAN,
            Self::Gateway => role::GATEWAY,
        }
    }
}

/// The roles a flow's packets (or an event's packet) were seen with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Roles(u8);

impl Roles {
    pub const fn from_bits(bits: u8) -> Self {
        Self(bits)
    }

    pub const fn of(role: Role) -> Self {
        Self(role.bit())
    }

    pub const fn has(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

/// An IP protocol. The record spells it `tcp`, `udp`, `icmp`, `icmpv6`, or
/// `other:<n>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Other(u8),
}

const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

impl From<u8> for Proto {
    fn from(number: u8) -> Self {
        match number {
            ip_proto::TCP => Self::Tcp,
            ip_proto::UDP => Self::Udp,
            ICMP => Self::Icmp,
            ICMPV6 => Self::Icmpv6,
            other => Self::Other(other),
        }
    }
}

impl From<Proto> for u8 {
    fn from(proto: Proto) -> u8 {
        match proto {
            Proto::Tcp => ip_proto::TCP,
            Proto::Udp => ip_proto::UDP,
            Proto::Icmp => ICMP,
            Proto::Icmpv6 => ICMPV6,
            Proto::Other(number) => number,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp => f.write_str("tcp"),
            Self::Udp => f.write_str("udp"),
            Self::Icmp => f.write_str("icmp"),
            Self::Icmpv6 => f.write_str("icmpv6"),
            Self::Other(number) => write!(f, "other:{number}"),
        }
    }
}

/// Text that names no protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadProto;

impl FromStr for Proto {
    type Err = BadProto;

    fn from_str(text: &str) -> Result<Self, BadProto> {
        match text {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            "icmp" => Ok(Self::Icmp),
            "icmpv6" => Ok(Self::Icmpv6),
            other => {
                let number: u8 = other.strip_prefix("other:").ok_or(BadProto)?.parse().map_err(|_| BadProto)?;
                Ok(Self::from(number))
            }
        }
    }
}

/// An Ethernet address. Spelled `02:00:5e:10:00:01`; read with `:` or `-`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// No address was seen (the kernel leaves the field zero).
    pub fn is_unset(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Text that is not six hexadecimal pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadMac;

impl FromStr for Mac {
    type Err = BadMac;

    fn from_str(text: &str) -> Result<Self, BadMac> {
        let mut mac = [0u8; 6];
        let mut parts = text.split([':', '-']);
        for byte in &mut mac {
            let part = parts.next().ok_or(BadMac)?;
            if part.len() != 2 {
                return Err(BadMac);
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| BadMac)?;
        }
        if parts.next().is_some() {
            return Err(BadMac);
        }
        Ok(Self(mac))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::ToString as _;

    use super::*;

    #[test]
    fn protocols_and_macs_read_back_as_written() {
        for number in 0..=255u8 {
            let proto = Proto::from(number);
            assert_eq!(u8::from(proto), number);
            assert_eq!(proto.to_string().parse::<Proto>(), Ok(proto));
        }
        assert_eq!(Proto::from(6).to_string(), "tcp");
        assert_eq!(Proto::from(47).to_string(), "other:47");
        assert_eq!("sctp".parse::<Proto>(), Err(BadProto));
        let mac: Mac = "02-00-5E-10-00-01".parse().unwrap();
        assert_eq!(mac.to_string(), "02:00:5e:10:00:01");
        for bad in ["02:00:5e:10:00", "02:00:5e:10:00:01:02", "020:0:5e:10:00:01", "zz:00:5e:10:00:01", ""] {
            assert_eq!(bad.parse::<Mac>(), Err(BadMac), "{bad}");
        }
        let roles = Roles::of(Role::Lan).union(Roles::from_bits(role::WAN));
        assert!(roles.has(Role::Lan) && roles.has(Role::Wan));
        assert!(!Roles::default().has(Role::Lan));
    }
}
