//! The indexes for the three questions. Every record yields index keys (its
//! public ip and ip:port for question 1; its MAC, device IP and subscriber
//! for question 2; its service name, every parent domain of it, its remote
//! IP and remote network for question 3), and each key a 32-bit fingerprint.
//!
//! A sealed block stores the sorted fingerprints of its records' keys. Every
//! [`RUN_BLOCKS`] blocks these are merged into a *run*: fingerprint → the
//! blocks of the run holding it, in pages sorted by fingerprint, one sled
//! value a page. A lookup is then one page read per run, not a read per
//! block, and never a read per record. Fingerprints may collide: a block
//! found through the index is a candidate, and its records are checked
//! against the keys themselves.
use std::net::IpAddr;

use anyhow::{Result, anyhow, ensure};
use integer_encoding::VarInt;
use ipnet::IpNet;

use crate::{icr::Icr, store::codec::parse_mac};

/// Blocks merged into one run (a u64 mask says which of them hold a key).
pub const RUN_BLOCKS: u32 = 64;
/// Fingerprints per page of a run.
const PAGE_ENTRIES: usize = 2048;

/// What a query looks records up by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum IndexKey {
    PublicAddr(IpAddr),
    PublicPort(IpAddr, u16),
    Mac([u8; 6]),
    DeviceIp(IpAddr),
    Subscriber(String),
    /// A service name exactly.
    Name(String),
    /// A domain the service name is in (`example.com` for `mail.example.com`).
    Domain(String),
    RemoteIp(IpAddr),
    /// The remote address's /24 (IPv4) or /48 (IPv6).
    RemoteNet(IpNet),
}

impl IndexKey {
    /// The network a remote address is indexed under.
    pub fn remote_net(ip: IpAddr) -> IpNet {
        let prefix = if ip.is_ipv4() { 24 } else { 48 };
        IpNet::new(ip, prefix).expect("a valid prefix length").trunc()
    }

    /// The key's kind in the top 4 bits, a hash of it in the other 28: the
    /// keys of one kind are one contiguous range of a run, so a query for a
    /// thousand names reads the name pages of a run, not all of them.
    pub fn fingerprint(&self) -> u32 {
        let mut bytes = Vec::with_capacity(24);
        let ip = |bytes: &mut Vec<u8>, ip: &IpAddr| match ip {
            IpAddr::V4(ip) => bytes.extend_from_slice(&ip.octets()),
            IpAddr::V6(ip) => bytes.extend_from_slice(&ip.octets()),
        };
        match self {
            Self::PublicAddr(addr) => {
                bytes.push(1);
                ip(&mut bytes, addr);
            }
            Self::PublicPort(addr, port) => {
                bytes.push(2);
                ip(&mut bytes, addr);
                bytes.extend_from_slice(&port.to_be_bytes());
            }
            Self::Mac(mac) => {
                bytes.push(3);
                bytes.extend_from_slice(mac);
            }
            Self::DeviceIp(addr) => {
                bytes.push(4);
                ip(&mut bytes, addr);
            }
            Self::Subscriber(name) => {
                bytes.push(5);
                bytes.extend_from_slice(name.as_bytes());
            }
            Self::Name(name) => {
                bytes.push(6);
                bytes.extend_from_slice(name.as_bytes());
            }
            Self::Domain(name) => {
                bytes.push(7);
                bytes.extend_from_slice(name.as_bytes());
            }
            Self::RemoteIp(addr) => {
                bytes.push(8);
                ip(&mut bytes, addr);
            }
            Self::RemoteNet(net) => {
                bytes.push(9);
                ip(&mut bytes, &net.network());
                bytes.push(net.prefix_len());
            }
        }
        let kind = u32::from(bytes[0]);
        (kind << 28) | (xxhash_rust::xxh3::xxh3_64(&bytes) >> 36) as u32
    }

    /// The fingerprints of one kind lie in `kind_range(print)`.
    pub fn kind_range(print: u32) -> std::ops::RangeInclusive<u32> {
        (print & 0xf000_0000)..=(print | 0x0fff_ffff)
    }
}

/// Every index key of a record.
pub fn keys_of(record: &Icr) -> Vec<IndexKey> {
    let mut keys = Vec::with_capacity(10);
    if let Some(public) = record.public {
        keys.push(IndexKey::PublicAddr(public.ip));
        keys.push(IndexKey::PublicPort(public.ip, public.port));
    }
    if let Some(mac) = record.device.mac.as_deref().and_then(parse_mac) {
        keys.push(IndexKey::Mac(mac));
    }
    if let Some(ip) = record.device.ip {
        keys.push(IndexKey::DeviceIp(ip));
    }
    if let Some(subscriber) = &record.device.subscriber {
        keys.push(IndexKey::Subscriber(subscriber.clone()));
    }
    if let Some(service) = &record.service {
        let name = service.name.to_ascii_lowercase();
        let mut rest = name.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if parent.is_empty() {
                break;
            }
            keys.push(IndexKey::Domain(parent.to_string()));
            rest = parent;
        }
        keys.push(IndexKey::Name(name));
    }
    keys.push(IndexKey::RemoteIp(record.remote.ip));
    keys.push(IndexKey::RemoteNet(IndexKey::remote_net(record.remote.ip)));
    keys
}

/// Whether a record has any of `keys` (the exact check behind a fingerprint).
pub fn has_any(record: &Icr, keys: &[IndexKey]) -> bool {
    keys.iter().any(|key| key.matches(record))
}

impl IndexKey {
    /// Whether `record` has this key (what [`keys_of`] would say, without
    /// building them all: this runs for every record a query reads).
    pub fn matches(&self, record: &Icr) -> bool {
        let name = || record.service.as_ref().map(|s| s.name.as_str());
        match self {
            Self::PublicAddr(ip) => record.public.is_some_and(|p| p.ip == *ip),
            Self::PublicPort(ip, port) => record.public.is_some_and(|p| p.ip == *ip && p.port == *port),
            Self::Mac(mac) => record.device.mac.as_deref().and_then(parse_mac) == Some(*mac),
            Self::DeviceIp(ip) => record.device.ip == Some(*ip),
            Self::Subscriber(name) => record.device.subscriber.as_deref() == Some(name.as_str()),
            Self::Name(wanted) => name().is_some_and(|n| n.eq_ignore_ascii_case(wanted)),
            Self::Domain(domain) => name().is_some_and(|n| {
                n.len() > domain.len() + 1
                    && n.is_char_boundary(n.len() - domain.len() - 1)
                    && n[n.len() - domain.len()..].eq_ignore_ascii_case(domain)
                    && n.as_bytes()[n.len() - domain.len() - 1] == b'.'
                    && !n[..n.len() - domain.len() - 1].is_empty()
            }),
            Self::RemoteIp(ip) => record.remote.ip == *ip,
            Self::RemoteNet(net) => Self::remote_net(record.remote.ip) == *net,
        }
    }
}

/// The sorted, distinct fingerprints of a block's records.
pub fn block_fingerprints(records: &[Icr]) -> Vec<u32> {
    let mut prints: Vec<u32> = records.iter().flat_map(keys_of).map(|key| key.fingerprint()).collect();
    prints.sort_unstable();
    prints.dedup();
    prints
}

/// A block's fingerprints as stored until its run is built: deltas as varints.
pub fn encode_fingerprints(prints: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(prints.len() * 3);
    let mut previous = 0u32;
    for &print in prints {
        push(&mut out, u64::from(print - previous));
        previous = print;
    }
    out
}

pub fn decode_fingerprints(mut bytes: &[u8]) -> Result<Vec<u32>> {
    let mut prints = Vec::with_capacity(bytes.len() / 2);
    let mut previous = 0u32;
    while !bytes.is_empty() {
        let delta = take(&mut bytes)?;
        previous = previous.checked_add(u32::try_from(delta)?).ok_or_else(|| anyhow!("a fingerprint overflows"))?;
        prints.push(previous);
    }
    Ok(prints)
}

/// Merges the fingerprints of up to [`RUN_BLOCKS`] consecutive blocks into
/// the pages of a run: `(first fingerprint of the page, page bytes)`.
pub fn build_run(blocks: &[Vec<u32>]) -> Vec<(u32, Vec<u8>)> {
    assert!(blocks.len() <= RUN_BLOCKS as usize);
    let mut entries: Vec<(u32, u8)> = blocks
        .iter()
        .enumerate()
        .flat_map(|(index, prints)| prints.iter().map(move |&print| (print, index as u8)))
        .collect();
    entries.sort_unstable();
    let mut postings: Vec<(u32, u64)> = Vec::new();
    for (print, block) in entries {
        match postings.last_mut() {
            Some((last, mask)) if *last == print => *mask |= 1u64 << block,
            _ => postings.push((print, 1u64 << block)),
        }
    }
    postings
        .chunks(PAGE_ENTRIES)
        .map(|page| {
            let mut out = Vec::with_capacity(page.len() * 4);
            let mut previous = page[0].0;
            for &(print, mask) in page {
                push(&mut out, u64::from(print - previous));
                previous = print;
                // One block (the common case) is its index; several, a mask.
                if mask.is_power_of_two() {
                    push(&mut out, u64::from(mask.trailing_zeros()));
                } else {
                    push(&mut out, u64::from(RUN_BLOCKS));
                    push(&mut out, mask);
                }
            }
            (page[0].0, out)
        })
        .collect()
}

/// A run page: `(fingerprint, mask of the run's blocks holding it)`, sorted.
pub fn decode_page(first: u32, mut page: &[u8]) -> Result<Vec<(u32, u64)>> {
    let mut entries = Vec::with_capacity(PAGE_ENTRIES);
    let mut current = first;
    while !page.is_empty() {
        let delta = u32::try_from(take(&mut page)?)?;
        ensure!(entries.is_empty() || delta > 0, "a run page is not sorted");
        current = current.checked_add(delta).ok_or_else(|| anyhow!("a run page overflows"))?;
        let block = take(&mut page)?;
        let mask = if block == u64::from(RUN_BLOCKS) {
            take(&mut page)?
        } else {
            ensure!(block < u64::from(RUN_BLOCKS), "a run page names block {block}");
            1 << block
        };
        entries.push((current, mask));
    }
    Ok(entries)
}

fn push(out: &mut Vec<u8>, value: u64) {
    let mut buffer = [0u8; 10];
    let n = value.encode_var(&mut buffer);
    out.extend_from_slice(&buffer[..n]);
}

fn take(bytes: &mut &[u8]) -> Result<u64> {
    let (value, n) = u64::decode_var(bytes).ok_or_else(|| anyhow!("a bad varint in an index"))?;
    *bytes = &bytes[n..];
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_records::sample;

    #[test]
    fn a_record_is_found_by_each_of_its_keys() {
        let record = sample(3);
        let keys = keys_of(&record);
        let public = record.public.unwrap();
        assert!(keys.contains(&IndexKey::PublicPort(public.ip, public.port)));
        assert!(keys.contains(&IndexKey::Domain("example.com".into())));
        assert!(keys.contains(&IndexKey::Domain("com".into())));
        assert!(keys.contains(&IndexKey::RemoteNet("192.0.2.0/24".parse().unwrap())));
        assert!(has_any(&record, &[IndexKey::Subscriber("line-3".into())]));
        assert!(!has_any(&record, &[IndexKey::Subscriber("line-4".into())]));
        for key in &keys {
            assert!(key.matches(&record), "{key:?}");
        }
        for other in ["example.com.", ".example.com", "3.example.com", "xample.com", ""] {
            assert!(!IndexKey::Domain(other.into()).matches(&record), "{other:?}");
        }
        assert!(!IndexKey::Name("s3.example.co".into()).matches(&record));
    }

    #[test]
    fn runs_map_each_fingerprint_to_its_blocks() {
        let blocks: Vec<Vec<u32>> = (0..RUN_BLOCKS)
            .map(|b| {
                let mut prints: Vec<u32> = (0..3000u32).map(|i| i.wrapping_mul(2_654_435_761).wrapping_add(b * 7)).collect();
                prints.push(42); // in every block
                prints.sort_unstable();
                prints.dedup();
                prints
            })
            .collect();
        for block in &blocks {
            assert_eq!(decode_fingerprints(&encode_fingerprints(block)).unwrap(), *block);
        }
        let pages = build_run(&blocks);
        assert!(pages.len() > 1);
        let find = |print: u32| {
            let (first, page) = pages.iter().rev().find(|(first, _)| *first <= print).unwrap();
            let entries = decode_page(*first, page).unwrap();
            entries.binary_search_by_key(&print, |e| e.0).map_or(0, |i| entries[i].1)
        };
        assert_eq!(find(42), u64::MAX);
        for (index, block) in blocks.iter().enumerate() {
            for &print in block.iter().step_by(97) {
                assert!(find(print) & (1 << index) != 0);
            }
        }
        assert_eq!(find(43), 0);
    }
}
