//! Question 2's answer kept ready: for each device seen in a block (and,
//! merged, in a run of blocks), one entry per service it used, with the
//! first and last time, the connections and the bytes. `icr query services`
//! then reads one page per run instead of decoding every block a busy
//! device appears in (nearly all of them).
//!
//! A device is its records' (MAC, IP, subscriber) triple, an *identity*.
//! Pages hold items sorted by fingerprint: an identity under the
//! fingerprint of its first known key (MAC, else IP, else subscriber), and
//! an alias from each other key's fingerprint to that one. A lookup reads
//! the page of the key's fingerprint, follows its aliases once, and keeps
//! only identities whose key equals the one asked for: a fingerprint
//! collision never lends another device's services.
use std::{collections::HashMap, net::IpAddr};

use anyhow::{Context as _, Result, anyhow, bail, ensure};

use probe_common::{Mac, Proto};

use crate::{
    record::{Icr, format_time},
    store::{
        index::IndexKey,
        wire::{Reader, push_ip, push_signed, push_varint},
        zstd_contexts,
    },
};

/// Raw bytes a run's page is filled to before it is compressed and a new
/// one begins (a fingerprint's items are never split across pages). A
/// block's rollup is one page.
pub const RUN_PAGE_BYTES: usize = if cfg!(test) { 2048 } else { 32 << 10 };
/// A page may not decompress to more than this.
const MAX_PAGE_BYTES: usize = 64 << 20;
const ZSTD_LEVEL: i32 = 1;

/// What a row of question 2 groups by: the service name when the
/// connection named one, else the remote ip:port and protocol.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceKey {
    Name(String),
    Remote(IpAddr, u16, u8),
}

/// A device's use of one service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceUse {
    pub first_us: i64,
    pub last_us: i64,
    pub connections: u64,
    pub bytes: u64,
    pub incomplete: bool,
    /// The remote end and protocol of the first connection (the earliest
    /// start; among equal starts, the smallest remote): a named service's
    /// row shows one, and this choice does not depend on record order.
    pub remote: (IpAddr, u16),
    pub proto: u8,
}

impl ServiceUse {
    fn of(record: &Icr) -> Self {
        Self {
            first_us: record.start.timestamp_micros(),
            last_us: record.end.timestamp_micros(),
            connections: 1,
            bytes: record.bytes_up.saturating_add(record.bytes_down),
            incomplete: record.incomplete,
            remote: (record.remote.ip, record.remote.port),
            proto: record.proto.parse::<Proto>().map_or(0, u8::from),
        }
    }

    fn merge(&mut self, other: &Self) {
        if (other.first_us, other.remote, other.proto) < (self.first_us, self.remote, self.proto) {
            self.remote = other.remote;
            self.proto = other.proto;
        }
        self.first_us = self.first_us.min(other.first_us);
        self.last_us = self.last_us.max(other.last_us);
        self.connections = self.connections.saturating_add(other.connections);
        self.bytes = self.bytes.saturating_add(other.bytes);
        self.incomplete |= other.incomplete;
    }
}

/// One device's services, merged from records and stored entries. Names
/// are looked up by `&str`, so merging a stored entry allocates only for a
/// service not seen yet.
#[derive(Debug, Default)]
pub struct Services {
    names: HashMap<String, ServiceUse, Hasher>,
    remotes: HashMap<(IpAddr, u16, u8), ServiceUse, Hasher>,
}

/// These maps are built for every block written: a fast hash, not SipHash
/// (their keys are not chosen by an attacker who could profit from
/// collisions; at worst a lookup slows).
type Hasher = xxhash_rust::xxh3::Xxh3DefaultBuilder;

impl Services {
    pub fn add_record(&mut self, record: &Icr) {
        let used = ServiceUse::of(record);
        match &record.service {
            Some(service) => self.add_name(&service.name, &used),
            None => self.add_remote((record.remote.ip, record.remote.port, used.proto), &used),
        }
    }

    /// One connection's use of `key` (or a merged one's).
    pub fn add(&mut self, key: ServiceKey, used: &ServiceUse) {
        match key {
            ServiceKey::Name(name) => self.add_name(&name, used),
            ServiceKey::Remote(ip, port, proto) => self.add_remote((ip, port, proto), used),
        }
    }

    fn add_name(&mut self, name: &str, used: &ServiceUse) {
        match self.names.get_mut(name) {
            Some(known) => known.merge(used),
            None => {
                self.names.insert(name.to_owned(), *used);
            }
        }
    }

    fn add_remote(&mut self, remote: (IpAddr, u16, u8), used: &ServiceUse) {
        self.remotes.entry(remote).and_modify(|known| known.merge(used)).or_insert(*used);
    }

    pub fn merge(&mut self, other: &Services) {
        for (name, used) in &other.names {
            self.add_name(name, used);
        }
        for (remote, used) in &other.remotes {
            self.add_remote(*remote, used);
        }
    }

    pub fn len(&self) -> usize {
        self.names.len() + self.remotes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The services, first used first (ties by key, so the order is stable).
    pub fn into_sorted(self) -> Vec<(ServiceKey, ServiceUse)> {
        let mut all: Vec<(ServiceKey, ServiceUse)> = self
            .names
            .into_iter()
            .map(|(name, used)| (ServiceKey::Name(name), used))
            .chain(
                self.remotes.into_iter().map(|((ip, port, proto), used)| (ServiceKey::Remote(ip, port, proto), used)),
            )
            .collect();
        all.sort_by(|a, b| (a.1.first_us, &a.0).cmp(&(b.1.first_us, &b.0)));
        all
    }
}

/// A device as its records name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Identity {
    mac: Option<[u8; 6]>,
    ip: Option<IpAddr>,
    subscriber: Option<String>,
}

impl Identity {
    fn of(record: &Icr) -> Self {
        Self {
            mac: record.device.mac.as_deref().and_then(|mac| mac.parse::<Mac>().ok()).map(|mac| mac.0),
            ip: record.device.ip,
            subscriber: record.device.subscriber.clone(),
        }
    }

    fn keys(&self) -> impl Iterator<Item = IndexKey> + '_ {
        self.mac
            .map(IndexKey::Mac)
            .into_iter()
            .chain(self.ip.map(IndexKey::DeviceIp))
            .chain(self.subscriber.clone().map(IndexKey::Subscriber))
    }

    fn matches(&self, key: &IndexKey) -> bool {
        match key {
            IndexKey::Mac(mac) => self.mac.as_ref() == Some(mac),
            IndexKey::DeviceIp(ip) => self.ip.as_ref() == Some(ip),
            IndexKey::Subscriber(name) => self.subscriber.as_deref() == Some(name.as_str()),
            _ => false,
        }
    }
}

/// The services of every device of some records, being built.
#[derive(Default)]
pub struct Rollup {
    identities: HashMap<Identity, usize, Hasher>,
    services: Vec<Services>,
}

impl Rollup {
    pub fn of(records: &[Icr]) -> Self {
        let mut rollup = Self::default();
        rollup.add_records(records);
        rollup
    }

    pub fn add_records(&mut self, records: &[Icr]) {
        for record in records {
            let identity = Identity::of(record);
            if identity.mac.is_none() && identity.ip.is_none() && identity.subscriber.is_none() {
                continue; // no key asks for it
            }
            self.services_of(identity).add_record(record);
        }
    }

    /// Adds to `out` the services of the identities `key` names.
    pub fn lookup(&self, key: &IndexKey, out: &mut Services) {
        for (identity, &index) in &self.identities {
            if identity.matches(key) {
                out.merge(&self.services[index]);
            }
        }
    }

    fn services_of(&mut self, identity: Identity) -> &mut Services {
        let next = self.services.len();
        let index = *self.identities.entry(identity).or_insert(next);
        if index == next {
            self.services.push(Services::default());
        }
        &mut self.services[index]
    }

    /// Adds every identity of a page (built by [`Rollup::pages`]): reads a
    /// page whole (the store itself reads pages by key).
    #[cfg(test)]
    pub fn merge_page(&mut self, compressed: &[u8]) -> Result<()> {
        if compressed.is_empty() {
            return Ok(()); // a block without devices
        }
        let page = decompress(compressed)?;
        let mut reader = Reader::new(&page);
        let base_us = reader.signed()?;
        let mut print = 0u32;
        while !reader.is_empty() {
            let (item_print, kind, mut payload) = reader.item(print)?;
            print = item_print;
            if kind == IDENTITY {
                let identity = payload.identity()?;
                ensure!(identity.keys().next().is_some(), "a rollup identity without a key");
                payload.services(base_us, self.services_of(identity))?;
            }
        }
        Ok(())
    }

    /// The rollup as pages of about `page_bytes` (before compression):
    /// `(first fingerprint, compressed page)`, sorted.
    pub fn pages(&self, page_bytes: usize) -> Result<Vec<(u32, Vec<u8>)>> {
        let base_us = self
            .services
            .iter()
            .flat_map(|s| s.names.values().chain(s.remotes.values()))
            .map(|u| u.first_us)
            .min()
            .unwrap_or(0);
        let mut ordered: Vec<(&Identity, usize)> = self.identities.iter().map(|(i, n)| (i, *n)).collect();
        ordered.sort();
        // (fingerprint, kind, the identity's place in `ordered`)
        let mut items: Vec<(u32, u8, usize)> = Vec::with_capacity(ordered.len() * 3);
        for (place, (identity, _)) in ordered.iter().enumerate() {
            let mut keys = identity.keys();
            let primary = keys.next().expect("identities have a key").fingerprint();
            items.push((primary, IDENTITY, place));
            items.extend(keys.map(|key| (key.fingerprint(), ALIAS, place)));
        }
        items.sort_unstable();
        let primary_of = |place: usize| ordered[place].0.keys().next().expect("identities have a key").fingerprint();
        items.dedup_by(|b, a| a.1 == ALIAS && b.1 == ALIAS && a.0 == b.0 && primary_of(a.2) == primary_of(b.2));

        let mut pages = Vec::new();
        let mut page: Vec<u8> = Vec::new();
        let mut first = 0u32;
        let mut previous = 0u32;
        let mut payload = Vec::new();
        for (index, &(print, kind, place)) in items.iter().enumerate() {
            if page.is_empty() {
                push_signed(&mut page, base_us);
                // A page's fingerprints are deltas from 0, so it reads alone.
                first = print;
                previous = 0;
            }
            payload.clear();
            if kind == IDENTITY {
                let (identity, services) = (ordered[place].0, &self.services[ordered[place].1]);
                write_identity(&mut payload, identity);
                write_services(&mut payload, services, base_us);
            } else {
                push_varint(&mut payload, u64::from(primary_of(place)));
            }
            push_varint(&mut page, u64::from(print - previous));
            page.push(kind);
            push_varint(&mut page, payload.len() as u64);
            page.extend_from_slice(&payload);
            previous = print;
            // A fingerprint's items stay on one page: a lookup reads one.
            let print_ends = items.get(index + 1).is_none_or(|next| next.0 != print);
            if print_ends && (page.len() >= page_bytes || index + 1 == items.len()) {
                pages.push((first, zstd_contexts::compress(&page, ZSTD_LEVEL).context("compressing a rollup page")?));
                page.clear();
            }
        }
        Ok(pages)
    }
}

const IDENTITY: u8 = 0;
const ALIAS: u8 = 1;

/// Adds to `out` the services of the identities on a page that `key`
/// names, and pushes to `aliases` the fingerprints where other identities
/// it names are kept (when `follow` is set).
pub fn lookup(
    compressed: &[u8],
    key: &IndexKey,
    follow: bool,
    out: &mut Services,
    aliases: &mut Vec<u32>,
) -> Result<()> {
    lookup_print(compressed, key.fingerprint(), key, follow, out, aliases)
}

/// [`lookup`] of the identities kept under `print`.
pub fn lookup_print(
    compressed: &[u8],
    print: u32,
    key: &IndexKey,
    follow: bool,
    out: &mut Services,
    aliases: &mut Vec<u32>,
) -> Result<()> {
    if compressed.is_empty() {
        return Ok(()); // a block without devices
    }
    let page = decompress(compressed)?;
    let mut reader = Reader::new(&page);
    let base_us = reader.signed()?;
    let mut current = 0u32;
    while !reader.is_empty() {
        let (item_print, kind, mut payload) = reader.item(current)?;
        current = item_print;
        if current > print {
            break;
        }
        if current < print {
            continue;
        }
        match kind {
            IDENTITY => {
                if payload.identity()?.matches(key) {
                    payload.services(base_us, out)?;
                }
            }
            ALIAS if follow => {
                let target = u32::try_from(payload.varint()?)?;
                if !aliases.contains(&target) {
                    aliases.push(target);
                }
            }
            ALIAS => {}
            other => bail!("a rollup item of kind {other}"),
        }
    }
    Ok(())
}

fn decompress(compressed: &[u8]) -> Result<Vec<u8>> {
    let size = zstd::zstd_safe::get_frame_content_size(compressed)
        .ok()
        .flatten()
        .ok_or_else(|| anyhow!("a rollup page without its size"))?;
    ensure!(size <= MAX_PAGE_BYTES as u64, "a rollup page claims {size} bytes");
    zstd_contexts::decompress(compressed, size as usize).context("decompressing a rollup page")
}

fn write_identity(out: &mut Vec<u8>, identity: &Identity) {
    match identity.mac {
        Some(mac) => {
            out.push(1);
            out.extend_from_slice(&mac);
        }
        None => out.push(0),
    }
    push_ip(out, identity.ip);
    match &identity.subscriber {
        Some(name) => {
            push_varint(out, name.len() as u64 + 1);
            out.extend_from_slice(name.as_bytes());
        }
        None => push_varint(out, 0),
    }
}

fn write_services(out: &mut Vec<u8>, services: &Services, base_us: i64) {
    push_varint(out, services.len() as u64);
    let mut names: Vec<(&String, &ServiceUse)> = services.names.iter().collect();
    names.sort_unstable_by_key(|(name, _)| *name);
    for (name, used) in names {
        out.push(NAMED | if used.incomplete { INCOMPLETE } else { 0 });
        push_varint(out, name.len() as u64);
        out.extend_from_slice(name.as_bytes());
        write_use(out, used, base_us);
    }
    let mut remotes: Vec<(&(IpAddr, u16, u8), &ServiceUse)> = services.remotes.iter().collect();
    remotes.sort_unstable_by_key(|(remote, _)| **remote);
    for (_, used) in remotes {
        out.push(if used.incomplete { INCOMPLETE } else { 0 });
        write_use(out, used, base_us);
    }
}

const NAMED: u8 = 1;
const INCOMPLETE: u8 = 2;

fn write_use(out: &mut Vec<u8>, used: &ServiceUse, base_us: i64) {
    push_ip(out, Some(used.remote.0));
    push_varint(out, u64::from(used.remote.1));
    out.push(used.proto);
    push_signed(out, used.first_us.wrapping_sub(base_us));
    push_signed(out, used.last_us.wrapping_sub(used.first_us));
    push_varint(out, used.connections);
    push_varint(out, used.bytes);
}

/// The reads only rollup pages make.
impl<'a> Reader<'a> {
    fn text(&mut self, length: u64) -> Result<&'a str> {
        let bytes = self.bytes(usize::try_from(length)?)?;
        std::str::from_utf8(bytes).context("a rollup text is not UTF-8")
    }

    /// The next item: its fingerprint, kind and payload.
    fn item(&mut self, previous: u32) -> Result<(u32, u8, Reader<'a>)> {
        let delta = u32::try_from(self.varint()?)?;
        let print = previous.checked_add(delta).ok_or_else(|| anyhow!("a rollup page overflows"))?;
        let kind = self.u8()?;
        let length = usize::try_from(self.varint()?)?;
        Ok((print, kind, Reader::new(self.bytes(length)?)))
    }

    fn identity(&mut self) -> Result<Identity> {
        let mac = match self.u8()? {
            0 => None,
            _ => Some(<[u8; 6]>::try_from(self.bytes(6)?)?),
        };
        let ip = self.ip()?;
        let subscriber = match self.varint()? {
            0 => None,
            length => Some(self.text(length - 1)?.to_owned()),
        };
        Ok(Identity { mac, ip, subscriber })
    }

    fn services(&mut self, base_us: i64, out: &mut Services) -> Result<()> {
        let count = self.varint()?;
        for _ in 0..count {
            let flags = self.u8()?;
            let name = if flags & NAMED != 0 {
                let length = self.varint()?;
                Some(self.text(length)?)
            } else {
                None
            };
            let remote_ip = self.ip()?.ok_or_else(|| anyhow!("a rollup entry without a remote address"))?;
            let remote = (remote_ip, u16::try_from(self.varint()?)?);
            let proto = self.u8()?;
            let first_us = base_us.wrapping_add(self.signed()?);
            let used = ServiceUse {
                first_us,
                last_us: first_us.wrapping_add(self.signed()?),
                connections: self.varint()?,
                bytes: self.varint()?,
                incomplete: flags & INCOMPLETE != 0,
                remote,
                proto,
            };
            match name {
                Some(name) => out.add_name(name, &used),
                None => out.add_remote((remote.0, remote.1, proto), &used),
            }
        }
        Ok(())
    }
}

/// One row of the answer to question 2.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ServiceRow {
    /// The service name, when the connection setup named one.
    pub name: Option<String>,
    pub remote: String,
    pub proto: String,
    pub first: String,
    pub last: String,
    pub connections: u64,
    pub bytes: u64,
}

impl Services {
    /// The rows of question 2's answer, first used first.
    pub fn into_rows(self) -> Vec<ServiceRow> {
        let time = |us: i64| chrono::DateTime::from_timestamp_micros(us).map(|t| format_time(&t)).unwrap_or_default();
        self.into_sorted()
            .into_iter()
            .map(|(key, used)| ServiceRow {
                name: match key {
                    ServiceKey::Name(name) => Some(name),
                    ServiceKey::Remote(..) => None,
                },
                remote: remote_string(used.remote.0, used.remote.1),
                proto: Proto::from(used.proto).to_string(),
                first: time(used.first_us),
                last: time(used.last_us),
                connections: used.connections,
                bytes: used.bytes,
            })
            .collect()
    }
}

fn remote_string(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(ip) => format!("{ip}:{port}"),
        IpAddr::V6(ip) => format!("[{ip}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_records::samples;

    fn expected(records: &[Icr], key: &IndexKey) -> Vec<(ServiceKey, ServiceUse)> {
        let mut services = Services::default();
        for record in records.iter().filter(|r| Identity::of(r).matches(key)) {
            services.add_record(record);
        }
        services.into_sorted()
    }

    fn looked_up(pages: &[(u32, Vec<u8>)], key: &IndexKey) -> Vec<(ServiceKey, ServiceUse)> {
        let page_of =
            |print: u32| pages.iter().rev().find(|(first, _)| *first <= print).map(|(_, page)| page.as_slice());
        let mut services = Services::default();
        let mut aliases = Vec::new();
        if let Some(page) = page_of(key.fingerprint()) {
            lookup(page, key, true, &mut services, &mut aliases).unwrap();
        }
        for print in aliases {
            lookup_print(page_of(print).unwrap(), print, key, false, &mut services, &mut Vec::new()).unwrap();
        }
        services.into_sorted()
    }

    #[test]
    fn pages_answer_each_device_key_as_the_records_do() {
        let mut records = samples(3000);
        // A device with only an IP, one with only a subscriber, and one
        // whose subscriber is shared with another device.
        records[5].device.mac = None;
        records[6].device.mac = None;
        records[6].device.ip = None;
        records[7].device.subscriber = records[8].device.subscriber.clone();
        let halves = [Rollup::of(&records[..1500]), Rollup::of(&records[1500..])];
        let mut merged = Rollup::default();
        for half in &halves {
            for (_, page) in half.pages(usize::MAX).unwrap() {
                merged.merge_page(&page).unwrap();
            }
        }
        let pages = merged.pages(RUN_PAGE_BYTES).unwrap();
        assert!(pages.len() > 3, "{} pages", pages.len());
        let mut keys: Vec<IndexKey> =
            records.iter().take(300).flat_map(|r| Identity::of(r).keys().collect::<Vec<_>>()).collect();
        keys.push(IndexKey::Subscriber("nobody".into()));
        for key in keys {
            assert_eq!(looked_up(&pages, &key), expected(&records, &key), "{key:?}");
        }
    }

    #[test]
    fn damaged_pages_are_errors_not_panics() {
        let pages = Rollup::of(&samples(500)).pages(usize::MAX).unwrap();
        let key = IndexKey::Subscriber("line-3".into());
        let page = decompress(&pages[0].1).unwrap();
        for cut in [0, 1, page.len() / 3, page.len() - 1] {
            let bad = zstd::bulk::compress(&page[..cut], 1).unwrap();
            let _ = lookup_print(&bad, pages[0].0, &key, true, &mut Services::default(), &mut Vec::new());
            let _ = Rollup::default().merge_page(&bad);
        }
        for flip in (0..page.len()).step_by(13) {
            let mut bad = page.clone();
            bad[flip] ^= 0x5a;
            let bad = zstd::bulk::compress(&bad, 1).unwrap();
            let _ = lookup_print(&bad, pages[0].0, &key, true, &mut Services::default(), &mut Vec::new());
            let _ = Rollup::default().merge_page(&bad);
        }
        assert!(lookup(b"not zstd", &key, true, &mut Services::default(), &mut Vec::new()).is_err());
    }
}
