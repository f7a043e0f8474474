//! The indexes for the three questions. Every record yields index keys (its
//! public ip and ip:port for question 1; its MAC, device IP and subscriber
//! for question 2; its service name and the name of each of its DNS
//! exchanges, every parent domain of them, its remote IP and remote network
//! for question 3), and each key a 32-bit fingerprint.
//!
//! A sealed block stores the sorted fingerprints of its records' keys. Every
//! [`RUN_BLOCKS`] blocks these are merged into a *run*: fingerprint → the
//! blocks of the run holding it, in pages sorted by fingerprint, one sled
//! value a page. A lookup is then one page read per run, not a read per
//! block, and never a read per record. Fingerprints may collide: a block
//! found through the index is a candidate, and its records are checked
//! against the keys themselves.
use std::{collections::HashSet, net::IpAddr};

use anyhow::{Result, anyhow, ensure};
use integer_encoding::VarInt;
use ipnet::IpNet;

use probe_common::Mac;

use crate::{
    record::Icr,
    store::codec::{KeyFields, Keys},
};

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
    /// A service name, or a DNS exchange's name, exactly.
    Name(String),
    /// A domain such a name is in (`example.com` for `mail.example.com`).
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
        match self {
            Self::PublicAddr(addr) => key_bytes(&mut bytes, PUBLIC_ADDR, |b| put_ip(b, addr)),
            Self::PublicPort(addr, port) => key_bytes(&mut bytes, PUBLIC_PORT, |b| {
                put_ip(b, addr);
                b.extend_from_slice(&port.to_be_bytes());
            }),
            Self::Mac(mac) => key_bytes(&mut bytes, MAC, |b| b.extend_from_slice(mac)),
            Self::DeviceIp(addr) => key_bytes(&mut bytes, DEVICE_IP, |b| put_ip(b, addr)),
            Self::Subscriber(name) => key_bytes(&mut bytes, SUBSCRIBER, |b| b.extend_from_slice(name.as_bytes())),
            Self::Name(name) => key_bytes(&mut bytes, NAME, |b| b.extend_from_slice(name.as_bytes())),
            Self::Domain(name) => key_bytes(&mut bytes, DOMAIN, |b| b.extend_from_slice(name.as_bytes())),
            Self::RemoteIp(addr) => key_bytes(&mut bytes, REMOTE_IP, |b| put_ip(b, addr)),
            Self::RemoteNet(net) => key_bytes(&mut bytes, REMOTE_NET, |b| put_net(b, net)),
        }
        print_of(&bytes)
    }

    /// The fingerprints of one kind lie in `kind_range(print)`.
    pub fn kind_range(print: u32) -> std::ops::RangeInclusive<u32> {
        (print & 0xf000_0000)..=(print | 0x0fff_ffff)
    }
}

// The kinds of key, the first byte of what is hashed.
const PUBLIC_ADDR: u8 = 1;
const PUBLIC_PORT: u8 = 2;
const MAC: u8 = 3;
const DEVICE_IP: u8 = 4;
const SUBSCRIBER: u8 = 5;
const NAME: u8 = 6;
const DOMAIN: u8 = 7;
const REMOTE_IP: u8 = 8;
const REMOTE_NET: u8 = 9;

fn key_bytes(buffer: &mut Vec<u8>, kind: u8, fill: impl FnOnce(&mut Vec<u8>)) {
    buffer.clear();
    buffer.push(kind);
    fill(buffer);
}

fn print_of(bytes: &[u8]) -> u32 {
    (u32::from(bytes[0]) << 28) | (xxhash_rust::xxh3::xxh3_64(bytes) >> 36) as u32
}

fn put_ip(buffer: &mut Vec<u8>, ip: &IpAddr) {
    match ip {
        IpAddr::V4(ip) => buffer.extend_from_slice(&ip.octets()),
        IpAddr::V6(ip) => buffer.extend_from_slice(&ip.octets()),
    }
}

fn put_net(buffer: &mut Vec<u8>, net: &IpNet) {
    put_ip(buffer, &net.network());
    buffer.push(net.prefix_len());
}

/// The fingerprints of every index key of a record (its public ip and
/// ip:port, MAC, device IP, subscriber, service name and each distinct DNS
/// exchange's name and each parent domain of them, remote IP and remote
/// network), into `prints`. Built without allocating (but for names that
/// are not lowercase): this runs for every record written.
fn record_prints(record: &Icr, buffer: &mut Vec<u8>, prints: &mut Vec<u32>) {
    let mut add = |buffer: &mut Vec<u8>, kind: u8, fill: &dyn Fn(&mut Vec<u8>)| {
        key_bytes(buffer, kind, fill);
        prints.push(print_of(buffer));
    };
    if let Some(public) = record.public {
        add(buffer, PUBLIC_ADDR, &|b| put_ip(b, &public.ip));
        add(buffer, PUBLIC_PORT, &|b| {
            put_ip(b, &public.ip);
            b.extend_from_slice(&public.port.to_be_bytes());
        });
    }
    if let Some(mac) = record.device.mac.as_deref().and_then(|mac| mac.parse::<Mac>().ok()).map(|mac| mac.0) {
        add(buffer, MAC, &|b| b.extend_from_slice(&mac));
    }
    if let Some(ip) = record.device.ip {
        add(buffer, DEVICE_IP, &|b| put_ip(b, &ip));
    }
    if let Some(subscriber) = &record.device.subscriber {
        add(buffer, SUBSCRIBER, &|b| b.extend_from_slice(subscriber.as_bytes()));
    }
    let service = record.service.as_ref().map(|s| s.name.as_str());
    let qnames = || record.dns_all.iter().map(|d| d.qname.as_str());
    for (index, name) in service.into_iter().chain(qnames()).enumerate() {
        // A name is indexed once per record, however many exchanges ask it.
        let earlier = service.into_iter().chain(qnames()).take(index);
        if name.is_empty() || earlier.clone().any(|e| same_name(e, name)) {
            continue;
        }
        let name = normal_name(name);
        add(buffer, NAME, &|b| b.extend_from_slice(name.as_bytes()));
        for domain in parent_domains(&name) {
            add(buffer, DOMAIN, &|b| b.extend_from_slice(domain.as_bytes()));
        }
    }
    add(buffer, REMOTE_IP, &|b| put_ip(b, &record.remote.ip));
    add(buffer, REMOTE_NET, &|b| put_net(b, &IndexKey::remote_net(record.remote.ip)));
}

/// Every fingerprint a record is indexed under.
pub fn fingerprints_of(record: &Icr) -> Vec<u32> {
    let mut prints = Vec::with_capacity(12);
    record_prints(record, &mut Vec::with_capacity(64), &mut prints);
    prints
}

/// `example.com` and `com` for `mail.example.com`.
fn parent_domains(name: &str) -> impl Iterator<Item = &str> {
    name.match_indices('.').map(|(dot, _)| &name[dot + 1..]).filter(|d| !d.is_empty())
}

/// A name as it is indexed and compared: lowercase, without the root's
/// trailing dot (a DNS question may carry it; service names never do).
pub(crate) fn normal_name(name: &str) -> std::borrow::Cow<'_, str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

fn same_name(a: &str, b: &str) -> bool {
    a.strip_suffix('.').unwrap_or(a).eq_ignore_ascii_case(b.strip_suffix('.').unwrap_or(b))
}

/// The keys a query asks for, as sets: testing a record against a thousand
/// names costs a few hash lookups, not a thousand comparisons.
#[derive(Debug, Default)]
pub struct KeyFilter {
    public_addr: HashSet<IpAddr>,
    public_port: HashSet<(IpAddr, u16)>,
    mac: HashSet<[u8; 6]>,
    device_ip: HashSet<IpAddr>,
    subscriber: HashSet<String>,
    name: HashSet<String>,
    domain: HashSet<String>,
    remote_ip: HashSet<IpAddr>,
    remote_net: HashSet<IpNet>,
}

impl KeyFilter {
    pub fn new(keys: &[IndexKey]) -> Self {
        let mut filter = Self::default();
        for key in keys {
            match key {
                IndexKey::PublicAddr(ip) => filter.public_addr.insert(*ip),
                IndexKey::PublicPort(ip, port) => filter.public_port.insert((*ip, *port)),
                IndexKey::Mac(mac) => filter.mac.insert(*mac),
                IndexKey::DeviceIp(ip) => filter.device_ip.insert(*ip),
                IndexKey::Subscriber(name) => filter.subscriber.insert(name.clone()),
                IndexKey::Name(name) => filter.name.insert(name.to_ascii_lowercase()),
                IndexKey::Domain(name) => filter.domain.insert(name.to_ascii_lowercase()),
                IndexKey::RemoteIp(ip) => filter.remote_ip.insert(*ip),
                IndexKey::RemoteNet(net) => filter.remote_net.insert(*net),
            };
        }
        filter
    }

    /// Whether a stored record's keys (read for [`KeyFilter::fields`]) include one asked for.
    pub fn matches_view(&self, view: &Keys) -> bool {
        self.matches(view.public, view.mac, view.device_ip, view.subscriber, view.remote.map(|r| r.0))
            || view.service_name.into_iter().chain(view.dns_names()).any(|name| self.matches_name(name))
    }

    /// The keys this filter tests: a block decodes only their columns.
    pub fn fields(&self) -> KeyFields {
        KeyFields {
            public: !self.public_addr.is_empty() || !self.public_port.is_empty(),
            mac: !self.mac.is_empty(),
            device_ip: !self.device_ip.is_empty(),
            subscriber: !self.subscriber.is_empty(),
            remote: !self.remote_ip.is_empty() || !self.remote_net.is_empty(),
            service_name: !self.name.is_empty() || !self.domain.is_empty(),
        }
    }

    pub fn matches_record(&self, record: &Icr) -> bool {
        self.matches(
            record.public.map(|p| (p.ip, p.port)),
            record.device.mac.as_deref().and_then(|mac| mac.parse::<Mac>().ok()).map(|mac| mac.0),
            record.device.ip,
            record.device.subscriber.as_deref(),
            Some(record.remote.ip),
        ) || record
            .service
            .iter()
            .map(|s| s.name.as_str())
            .chain(record.dns_all.iter().map(|d| d.qname.as_str()))
            .any(|name| self.matches_name(name))
    }

    /// Whether a service or DNS name is one asked for, or in a domain asked for.
    fn matches_name(&self, name: &str) -> bool {
        if self.name.is_empty() && self.domain.is_empty() {
            return false;
        }
        let name = normal_name(name);
        self.name.contains(name.as_ref())
            || (!self.domain.is_empty() && parent_domains(&name).any(|d| self.domain.contains(d)))
    }

    fn matches(
        &self,
        public: Option<(IpAddr, u16)>,
        mac: Option<[u8; 6]>,
        device_ip: Option<IpAddr>,
        subscriber: Option<&str>,
        remote_ip: Option<IpAddr>,
    ) -> bool {
        public.is_some_and(|(ip, port)| self.public_addr.contains(&ip) || self.public_port.contains(&(ip, port)))
            || mac.is_some_and(|mac| self.mac.contains(&mac))
            || device_ip.is_some_and(|ip| self.device_ip.contains(&ip))
            || subscriber.is_some_and(|name| self.subscriber.contains(name))
            || remote_ip.is_some_and(|ip| {
                self.remote_ip.contains(&ip)
                    || (!self.remote_net.is_empty() && self.remote_net.contains(&IndexKey::remote_net(ip)))
            })
    }
}

/// The sorted, distinct fingerprints of a block's records.
pub fn block_fingerprints(records: &[Icr]) -> Vec<u32> {
    let mut prints = Vec::with_capacity(records.len() * 12);
    let mut buffer = Vec::with_capacity(64);
    for record in records {
        record_prints(record, &mut buffer, &mut prints);
    }
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

/// What a query asks the store for: every record in the window, or those
/// with any of these index keys.
#[derive(Clone, Copy, Debug)]
pub enum Lookup<'a> {
    All,
    Any(&'a [IndexKey]),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_records::sample;

    #[test]
    fn a_record_is_found_by_each_of_its_keys() {
        let record = sample(3);
        let prints = fingerprints_of(&record);
        let public = record.public.unwrap();
        let keys = [
            IndexKey::PublicAddr(public.ip),
            IndexKey::PublicPort(public.ip, public.port),
            IndexKey::Mac([2, 0, 0, 0, 3, 0x17]),
            IndexKey::DeviceIp(record.device.ip.unwrap()),
            IndexKey::Subscriber("line-3".into()),
            IndexKey::Name("s3.example.com".into()),
            IndexKey::Domain("example.com".into()),
            IndexKey::Domain("com".into()),
            IndexKey::RemoteIp(record.remote.ip),
            IndexKey::RemoteNet("192.0.2.0/24".parse().unwrap()),
        ];
        assert_eq!(prints.len(), keys.len());
        for key in &keys {
            assert!(prints.contains(&key.fingerprint()), "{key:?}");
            assert!(KeyFilter::new(std::slice::from_ref(key)).matches_record(&record), "{key:?}");
        }
        let not = [
            IndexKey::Subscriber("line-4".into()),
            IndexKey::Name("s3.example.co".into()),
            IndexKey::Domain("s3.example.com".into()),
            IndexKey::Domain("xample.com".into()),
            IndexKey::PublicPort(public.ip, public.port + 1),
        ];
        for key in &not {
            assert!(!KeyFilter::new(std::slice::from_ref(key)).matches_record(&record), "{key:?}");
        }
        let mut upper = record.clone();
        upper.service.as_mut().unwrap().name = "S3.Example.COM".into();
        assert_eq!(fingerprints_of(&upper), prints, "names are indexed lowercase");
        assert!(KeyFilter::new(&[IndexKey::Domain("example.com".into())]).matches_record(&upper));
    }

    #[test]
    fn a_dns_record_is_found_by_the_name_of_any_of_its_exchanges() {
        let record = sample(18);
        assert_eq!(record.dns_all.len(), 3, "a.example, then cdn3.b.example twice");
        let prints = fingerprints_of(&record);
        let second = IndexKey::Name("cdn3.b.example".into());
        for key in [
            second.clone(),
            IndexKey::Domain("b.example".into()),
            IndexKey::Name("a.example".into()),
            IndexKey::Domain("example".into()),
        ] {
            assert!(prints.contains(&key.fingerprint()), "{key:?}");
            let filter = KeyFilter::new(std::slice::from_ref(&key));
            assert!(filter.matches_record(&record), "{key:?}");
            assert!(filter.fields().service_name, "{key:?} reads the name columns");
        }
        assert_eq!(
            prints.iter().filter(|p| **p == second.fingerprint()).count(),
            1,
            "a name asked twice is indexed once"
        );
        // Not by its first exchange alone: a record of one exchange is not found.
        let first_only = Icr { dns_all: record.dns_all[..1].to_vec(), ..record.clone() };
        assert!(!KeyFilter::new(std::slice::from_ref(&second)).matches_record(&first_only));
        assert!(!fingerprints_of(&first_only).contains(&second.fingerprint()));
        // As the store reads it: the keys of a block's records, not the records.
        let records = crate::store::test_records::samples(40);
        let block = crate::store::codec::encode(&records, true).unwrap();
        let filter = KeyFilter::new(&[IndexKey::Domain("b.example".into())]);
        let found =
            crate::store::codec::decode_filtered(&block, filter.fields(), |keys| filter.matches_view(keys)).unwrap();
        let expected: Vec<Icr> = records.iter().filter(|r| r.dns_all.len() > 1).cloned().collect();
        assert_eq!(found.len(), 3);
        assert_eq!(found, expected);
        let mut trailing = record;
        trailing.dns_all[1].qname = "CDN3.B.Example.".into();
        assert!(
            KeyFilter::new(std::slice::from_ref(&second)).matches_record(&trailing),
            "case and the root's dot aside"
        );
    }

    #[test]
    fn runs_map_each_fingerprint_to_its_blocks() {
        let blocks: Vec<Vec<u32>> = (0..RUN_BLOCKS)
            .map(|b| {
                let mut prints: Vec<u32> =
                    (0..3000u32).map(|i| i.wrapping_mul(2_654_435_761).wrapping_add(b * 7)).collect();
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
