//! The byte-level pieces the store's encodings share (blocks in [`codec`],
//! rollup pages in [`rollup`]): varints, zigzag varints, tagged addresses,
//! and a reader that checks every read, so bad data is an error, never a
//! panic.
//!
//! [`codec`]: super::codec
//! [`rollup`]: super::rollup
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Result, anyhow, bail, ensure};
use integer_encoding::VarInt;

pub fn push_varint(out: &mut Vec<u8>, value: u64) {
    let mut buffer = [0u8; 10];
    let n = value.encode_var(&mut buffer);
    out.extend_from_slice(&buffer[..n]);
}

pub fn push_signed(out: &mut Vec<u8>, value: i64) {
    let mut buffer = [0u8; 10];
    let n = value.encode_var(&mut buffer);
    out.extend_from_slice(&buffer[..n]);
}

/// An address as a family tag (0 none, 4, 6) and its octets.
pub fn push_ip(out: &mut Vec<u8>, ip: Option<IpAddr>) {
    match ip {
        None => out.push(0),
        Some(IpAddr::V4(ip)) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        Some(IpAddr::V6(ip)) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
}

/// Reads what the `push_` functions wrote; every read is checked.
#[derive(Clone)]
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// What is left unread.
    pub fn rest(self) -> &'a [u8] {
        self.bytes
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        ensure!(self.bytes.len() >= n, "the data ends early");
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }

    pub fn varint(&mut self) -> Result<u64> {
        let (value, n) = u64::decode_var(self.bytes).ok_or_else(|| anyhow!("a bad varint"))?;
        self.bytes = &self.bytes[n..];
        Ok(value)
    }

    pub fn signed(&mut self) -> Result<i64> {
        let (value, n) = i64::decode_var(self.bytes).ok_or_else(|| anyhow!("a bad varint"))?;
        self.bytes = &self.bytes[n..];
        Ok(value)
    }

    pub fn ip(&mut self) -> Result<Option<IpAddr>> {
        Ok(match self.u8()? {
            0 => None,
            4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(self.bytes(4)?)?))),
            6 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(self.bytes(16)?)?))),
            other => bail!("unknown address family tag {other}"),
        })
    }
}
