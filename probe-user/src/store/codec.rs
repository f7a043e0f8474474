//! The stored form of records: a block of records encoded column by column
//! (times and ids as deltas, small numbers as varints), then zstd-compressed.
//! Columns of like values compress far better than JSON rows: the design
//! brief measured 15 bytes a record for such blocks against 1 KB for JSON.
//!
//! Each column is compressed on its own, so a query decompresses only the
//! columns it tests (a resolve: times and public endpoints; question 3:
//! times and names) and the rest only for blocks where something matched.
//!
//! A block starts with a version byte; a reader refuses versions it does not
//! know rather than guessing (version 1 compressed the columns together;
//! version 3 added the gateway's name, `probe`, which older blocks lack;
//! version 4 added every DNS exchange, `dns_all`, and `local`: older blocks
//! read as the first exchange alone and not local; version 5 added the
//! exchange a `source: dns` name came from, which older blocks lack).
use std::{
    borrow::Cow,
    net::{IpAddr, SocketAddr},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use chrono::{DateTime, Utc};

use super::{
    wire::{Reader, push_ip, push_signed, push_varint},
    zstd_contexts,
};
use crate::record::{Device, Dns, DnsOrigin, EndReason, Endpoint, Icr, Service, ServiceSource};
use probe_common::{Mac, Proto};

/// The encoding version written now.
const VERSION: u8 = 5;
/// Columns of blocks before version 3 (no `probe`).
const COLUMNS_V2: usize = 22;
/// Columns of version 3 blocks (no `dns_all` past the first, no `local`).
const COLUMNS_V3: usize = 23;
/// Columns of version 4 blocks (no DNS origin of a name).
const COLUMNS_V4: usize = 25;
/// zstd level: 1 was as small as 3 on synthetic ICRs and twice as fast.
const ZSTD_LEVEL: i32 = 1;
/// A decoded block may not claim more than this (a corrupt header must not
/// make us allocate gigabytes).
const MAX_DECODED_BYTES: usize = 256 << 20;

// The columns, in the order they are written.
const ID_HIGH: usize = 0;
const ID_LOW: usize = 1;
const START: usize = 2;
const DURATION: usize = 3;
const END_REASON: usize = 4;
const PROTO: usize = 5;
const MAC: usize = 6;
const DEVICE_IP: usize = 7;
const DEVICE_PORT: usize = 8;
const VLAN: usize = 9;
const PPPOE: usize = 10;
const SUBSCRIBER: usize = 11;
const PUBLIC_IP: usize = 12;
const PUBLIC_PORT: usize = 13;
const REMOTE_IP: usize = 14;
const REMOTE_PORT: usize = 15;
const SERVICE_NAME: usize = 16;
const SERVICE_META: usize = 17;
const DNS: usize = 18;
const PACKETS: usize = 19;
const BYTES: usize = 20;
const INCOMPLETE: usize = 21;
const PROBE: usize = 22;
/// Per record: how many exchanges follow the first (the first is `DNS`),
/// then each as `DNS` writes one. A block without the column reads as
/// zeros: no exchange past the first.
const DNS_ALL: usize = 23;
/// One byte a record: 1 if it never left the gateway.
const LOCAL: usize = 24;
/// Per record: the resolver's address (none: the name came from no DNS
/// answer), then the answer's time before the record's start (µs) and the
/// resolver's port.
const DNS_ORIGIN: usize = 25;
const COLUMNS: usize = 26;

/// Encodes records into one block (`compress` false for the append log,
/// where every write is small and latency matters more than size).
pub fn encode(records: &[Icr], compress: bool) -> Result<Vec<u8>> {
    encode_as(VERSION, &encode_columns(records)?, records.len(), compress)
}

/// A version 4 block, as icr wrote them before a name's DNS origin.
#[cfg(test)]
pub fn encode_v4(records: &[Icr], compress: bool) -> Result<Vec<u8>> {
    encode_as(4, &encode_columns(records)?[..COLUMNS_V4], records.len(), compress)
}

/// A version 3 block, as icr wrote them before `dns_all` and `local`.
#[cfg(test)]
pub fn encode_v3(records: &[Icr], compress: bool) -> Result<Vec<u8>> {
    encode_as(3, &encode_columns(records)?[..COLUMNS_V3], records.len(), compress)
}

/// A version 2 block, as icr wrote them before records named their probe.
#[cfg(test)]
pub fn encode_v2(records: &[Icr], compress: bool) -> Result<Vec<u8>> {
    encode_as(2, &encode_columns(records)?[..COLUMNS_V2], records.len(), compress)
}

fn encode_as(version: u8, columns: &[Vec<u8>], count: usize, compress: bool) -> Result<Vec<u8>> {
    let mut out = vec![version, u8::from(compress)];
    push_varint(&mut out, count as u64);
    let stored: Vec<Cow<[u8]>> = columns
        .iter()
        .map(|column| {
            Ok(if compress && !column.is_empty() {
                Cow::Owned(zstd_contexts::compress(column, ZSTD_LEVEL).context("compressing a block")?)
            } else {
                Cow::Borrowed(column.as_slice())
            })
        })
        .collect::<Result<_>>()?;
    for (column, stored) in columns.iter().zip(&stored) {
        push_varint(&mut out, column.len() as u64);
        push_varint(&mut out, stored.len() as u64);
    }
    for stored in &stored {
        out.extend_from_slice(stored);
    }
    Ok(out)
}

fn encode_columns(records: &[Icr]) -> Result<[Vec<u8>; COLUMNS]> {
    let mut columns: [Vec<u8>; COLUMNS] = Default::default();
    let mut previous = Previous::default();
    for record in records {
        encode_record(record, &mut columns, &mut previous).with_context(|| format!("encoding record {}", record.id))?;
    }
    Ok(columns)
}

/// A version 1 block, as icr wrote them before layout 2: for tests of
/// reading and migrating old stores.
#[cfg(test)]
pub fn encode_v1(records: &[Icr], compress: bool) -> Result<Vec<u8>> {
    let columns = encode_columns(records)?;
    let columns = &columns[..COLUMNS_V2];
    let mut out = vec![1, u8::from(compress)];
    push_varint(&mut out, records.len() as u64);
    for column in columns {
        push_varint(&mut out, column.len() as u64);
    }
    let body = columns.concat();
    out.extend_from_slice(&if compress { zstd_contexts::compress(&body, ZSTD_LEVEL)? } else { body });
    Ok(out)
}

/// Decodes a block written by [`encode`] (or an older version).
pub fn decode(block: &[u8]) -> Result<Vec<Icr>> {
    decode_filtered(block, KeyFields::default(), |_| true)
}

/// Which of a record's keys a filter tests; times are always read.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeyFields {
    pub public: bool,
    pub mac: bool,
    pub device_ip: bool,
    pub subscriber: bool,
    pub remote: bool,
    pub service_name: bool,
}

impl KeyFields {
    fn columns(self) -> Vec<usize> {
        let mut columns = vec![START, DURATION];
        let mut add = |wanted: bool, more: &[usize]| {
            if wanted {
                columns.extend_from_slice(more);
            }
        };
        add(self.public, &[PUBLIC_IP, PUBLIC_PORT]);
        add(self.mac, &[MAC]);
        add(self.device_ip, &[DEVICE_IP]);
        add(self.subscriber, &[SUBSCRIBER]);
        add(self.remote, &[REMOTE_IP, REMOTE_PORT]);
        // Question 3 finds a DNS record by any name it asked for.
        add(self.service_name, &[SERVICE_NAME, DNS, DNS_ALL]);
        columns
    }
}

/// A block's header: its record count and where each column is.
struct Columns<'a> {
    count: usize,
    compressed: bool,
    /// (decoded length, stored bytes) of each column.
    stored: Vec<(usize, Cow<'a, [u8]>)>,
    /// Columns the block holds; those after them were made up, plain.
    written: usize,
}

impl<'a> Columns<'a> {
    fn parse(block: &'a [u8]) -> Result<Self> {
        let mut header = Reader::new(block);
        let version = header.u8()?;
        if version == 1 {
            return Self::parse_v1(header);
        }
        let written = match version {
            2 => COLUMNS_V2,
            3 => COLUMNS_V3,
            4 => COLUMNS_V4,
            VERSION => COLUMNS,
            _ => bail!("block encoding version {version} is not known to this icr (it knows 1 to {VERSION})"),
        };
        let compressed = header.u8()? != 0;
        let count = usize::try_from(header.varint()?)?;
        let mut lengths = Vec::with_capacity(COLUMNS);
        for _ in 0..written {
            lengths.push((usize::try_from(header.varint()?)?, usize::try_from(header.varint()?)?));
        }
        let total: usize = lengths
            .iter()
            .try_fold(0usize, |sum, l| sum.checked_add(l.0))
            .ok_or_else(|| anyhow!("column lengths overflow"))?;
        ensure!(total <= MAX_DECODED_BYTES, "a block claims {total} bytes of columns");
        let mut body = header.rest();
        let mut stored = Vec::with_capacity(COLUMNS);
        for (length, stored_length) in lengths {
            ensure!(body.len() >= stored_length, "a block ends early");
            ensure!(
                compressed || length == stored_length,
                "an uncompressed column of {stored_length} bytes claims {length}"
            );
            let (column, rest) = body.split_at(stored_length);
            stored.push((length, Cow::Borrowed(column)));
            body = rest;
        }
        ensure!(body.is_empty(), "{} bytes follow a block's columns", body.len());
        let mut columns = Self { count, compressed, stored, written: 0 };
        columns.add_missing();
        Ok(columns)
    }

    /// Version 1 (stores written before layout 2, and their open-block
    /// logs): the same columns, compressed together. Read for migrating
    /// them and for replaying old logs; never written.
    fn parse_v1(mut header: Reader<'a>) -> Result<Self> {
        let compressed = header.u8()? != 0;
        let count = usize::try_from(header.varint()?)?;
        let mut lengths = [0usize; COLUMNS_V2];
        for length in &mut lengths {
            *length = usize::try_from(header.varint()?)?;
        }
        let total: usize = lengths
            .iter()
            .try_fold(0usize, |sum, l| sum.checked_add(*l))
            .ok_or_else(|| anyhow!("column lengths overflow"))?;
        ensure!(total <= MAX_DECODED_BYTES, "a block claims {total} bytes of columns");
        let rest = header.rest();
        let body = if compressed {
            zstd_contexts::decompress(rest, total).context("decompressing a block")?
        } else {
            rest.to_vec()
        };
        ensure!(body.len() == total, "block body is {} bytes, its header says {total}", body.len());
        let mut offset = 0;
        let stored = lengths
            .iter()
            .map(|&length| {
                let column = body[offset..offset + length].to_vec();
                offset += length;
                (length, Cow::Owned(column))
            })
            .collect();
        let mut columns = Self { count, compressed: false, stored, written: 0 };
        columns.add_missing();
        Ok(columns)
    }

    /// Columns an older block does not have read as absent values, a zero
    /// byte for each record, stored plain: a `probe` of `None`, no DNS
    /// exchange past the first, not local.
    fn add_missing(&mut self) {
        self.written = self.stored.len();
        while self.stored.len() < COLUMNS {
            self.stored.push((self.count, Cow::Owned(vec![0u8; self.count])));
        }
    }

    /// Column `c`, decompressed if need be.
    fn load(&self, c: usize) -> Result<Cow<'_, [u8]>> {
        let (length, stored) = (self.stored[c].0, self.stored[c].1.as_ref());
        if !self.compressed || length == 0 || c >= self.written {
            ensure!(stored.len() == length, "column {c} is {} bytes, its header says {length}", stored.len());
            return Ok(Cow::Borrowed(stored));
        }
        let body = zstd_contexts::decompress(stored, length)
            .with_context(|| format!("decompressing column {c} of a block"))?;
        ensure!(body.len() == length, "column {c} is {} bytes, its header says {length}", body.len());
        Ok(Cow::Owned(body))
    }
}

/// Decodes the records of a block that `keep` keeps. `keep` sees the times
/// and the keys named in `fields` (the others are `None`), read first for
/// every record from only their columns; the other columns are decompressed
/// and read only if some record is kept, and a record is built only if it
/// is: most blocks a query reads keep few records or none.
pub fn decode_filtered(block: &[u8], fields: KeyFields, mut keep: impl FnMut(&Keys) -> bool) -> Result<Vec<Icr>> {
    let block = Columns::parse(block)?;
    let mut bodies: Vec<Option<Cow<[u8]>>> = vec![None; COLUMNS];
    for c in fields.columns() {
        bodies[c] = Some(block.load(c)?);
    }
    let mut kept = Vec::new();
    {
        let mut key_columns: Vec<Reader> =
            bodies.iter().map(|b| Reader::new(b.as_deref().unwrap_or_default())).collect();
        let mut start_us = 0i64;
        for index in 0..block.count {
            let keys = decode_keys(&mut key_columns, fields, &mut start_us)
                .with_context(|| format!("decoding record {index} of a block"))?;
            if keep(&keys) {
                kept.push(index);
            }
        }
    }
    if kept.is_empty() {
        return Ok(Vec::new());
    }
    for (c, body) in bodies.iter_mut().enumerate() {
        if body.is_none() {
            *body = Some(block.load(c)?);
        }
    }
    let mut columns: Vec<Reader> = bodies.iter().map(|b| Reader::new(b.as_deref().unwrap_or_default())).collect();
    let mut records = Vec::with_capacity(kept.len());
    let mut previous = Previous::default();
    let mut wanted = kept.iter().peekable();
    for index in 0..block.count {
        if wanted.peek().is_none() {
            break;
        }
        if wanted.next_if(|k| **k == index).is_some() {
            let view = decode_view(&mut columns, &mut previous)
                .with_context(|| format!("decoding record {index} of a block"))?;
            records.push(view.to_icr().with_context(|| format!("decoding record {index} of a block"))?);
        } else {
            skip_record(&mut columns, &mut previous).with_context(|| format!("decoding record {index} of a block"))?;
        }
    }
    Ok(records)
}

/// A stored record's times and index keys, borrowing its texts from the
/// block: what a query tests before it decodes the rest.
pub struct Keys<'a> {
    pub start_us: i64,
    pub end_us: i64,
    pub mac: Option<[u8; 6]>,
    pub device_ip: Option<IpAddr>,
    pub subscriber: Option<&'a str>,
    pub public: Option<(IpAddr, u16)>,
    pub remote: Option<(IpAddr, u16)>,
    pub service_name: Option<&'a str>,
    /// The first DNS exchange's name (with `service_name`).
    pub dns_first: Option<&'a str>,
    /// The names of the exchanges after the first: empty, and so not
    /// allocated, but for flows of several exchanges.
    pub dns_more: Vec<&'a str>,
}

impl<'a> Keys<'a> {
    /// The name of every DNS exchange, in order (names may repeat).
    pub fn dns_names(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.dns_first.into_iter().chain(self.dns_more.iter().copied())
    }
}

/// Reads the next record's [`Keys`] from their columns only (each column
/// is read in its own order, so the others can be left unread).
fn decode_keys<'a>(c: &mut [Reader<'a>], fields: KeyFields, start_us: &mut i64) -> Result<Keys<'a>> {
    *start_us = start_us.wrapping_add(c[START].signed()?);
    let end_us = start_us.wrapping_add(c[DURATION].signed()?);
    let mut keys = Keys {
        start_us: *start_us,
        end_us,
        mac: None,
        device_ip: None,
        subscriber: None,
        public: None,
        remote: None,
        service_name: None,
        dns_first: None,
        dns_more: Vec::new(),
    };
    if fields.mac && c[MAC].u8()? != 0 {
        keys.mac = Some(<[u8; 6]>::try_from(c[MAC].bytes(6)?)?);
    }
    if fields.device_ip {
        keys.device_ip = c[DEVICE_IP].ip()?;
    }
    if fields.subscriber {
        keys.subscriber = c[SUBSCRIBER].text_ref()?;
    }
    if fields.public
        && let Some(ip) = c[PUBLIC_IP].ip()?
    {
        keys.public = Some((ip, u16::try_from(c[PUBLIC_PORT].varint()?)?));
    }
    if fields.remote {
        let ip = c[REMOTE_IP].ip()?.ok_or_else(|| anyhow!("a record without a remote address"))?;
        keys.remote = Some((ip, u16::try_from(c[REMOTE_PORT].varint()?)?));
    }
    if fields.service_name {
        keys.service_name = c[SERVICE_NAME].text_ref()?;
        keys.dns_first = c[DNS].text_ref()?;
        if keys.dns_first.is_some() {
            skip_exchange_rest(&mut c[DNS])?;
        }
        for _ in 0..c[DNS_ALL].varint()? {
            let qname = c[DNS_ALL].text_ref()?.unwrap_or_default();
            skip_exchange_rest(&mut c[DNS_ALL])?;
            keys.dns_more.push(qname);
        }
    }
    Ok(keys)
}

/// What the delta-coded columns are relative to.
#[derive(Default)]
struct Previous {
    start_us: i64,
    id_low: u64,
}

/// A record whose `dns` is not the first of its `dns_all`: the store keeps
/// the first exchange once, so it could not give both back.
#[derive(Debug, thiserror::Error)]
#[error("its dns ({dns}) is not the first of its {count} dns_all exchanges")]
pub struct InconsistentDns {
    dns: String,
    count: usize,
}

/// Refuses a record whose `dns` is not the first of its `dns_all` (every
/// store that keeps the first exchange once: this one, the cluster's).
pub(crate) fn consistent_dns(r: &Icr) -> Result<(), InconsistentDns> {
    if r.dns_all.first() != r.dns.as_ref() {
        let dns = r.dns.as_ref().map_or_else(|| "none".to_string(), |d| format!("{} {}", d.qname, d.qtype));
        return Err(InconsistentDns { dns, count: r.dns_all.len() });
    }
    Ok(())
}

fn encode_record(r: &Icr, c: &mut [Vec<u8>; COLUMNS], previous: &mut Previous) -> Result<()> {
    consistent_dns(r)?;
    let start_us = r.start.timestamp_micros();
    // A UUIDv7 carries its millisecond time in its top 48 bits; ours is the
    // record's start, so only the version and counter bits remain.
    let id = uuid::Uuid::parse_str(&r.id).context("the id is not a UUID")?.as_u128();
    let (high, low) = ((id >> 64) as u64, id as u64);
    let expected_high = ((start_us.div_euclid(1000) as u64) << 16) | 0x7000;
    push_signed(&mut c[ID_HIGH], high.wrapping_sub(expected_high) as i64);
    push_signed(&mut c[ID_LOW], low.wrapping_sub(previous.id_low) as i64);
    previous.id_low = low;
    push_signed(&mut c[START], start_us.wrapping_sub(previous.start_us));
    previous.start_us = start_us;
    push_signed(&mut c[DURATION], r.end.timestamp_micros().wrapping_sub(start_us));
    c[END_REASON].push(r.end_reason as u8);
    c[PROTO].push(
        r.proto
            .parse::<Proto>()
            .map(u8::from)
            .map_err(|_| ())
            .ok()
            .ok_or_else(|| anyhow!("unknown proto {:?}", r.proto))?,
    );
    match &r.device.mac {
        Some(mac) => {
            c[MAC].push(1);
            c[MAC].extend_from_slice(
                &mac.parse::<Mac>().map(|mac| mac.0).ok().ok_or_else(|| anyhow!("bad MAC {mac:?}"))?,
            );
        }
        None => c[MAC].push(0),
    }
    push_ip(&mut c[DEVICE_IP], r.device.ip);
    push_optional(&mut c[DEVICE_PORT], r.device.port.map(u64::from));
    push_varint(&mut c[VLAN], r.device.vlan.len() as u64);
    for vlan in &r.device.vlan {
        push_varint(&mut c[VLAN], u64::from(*vlan));
    }
    push_optional(&mut c[PPPOE], r.device.pppoe_session.map(u64::from));
    push_text(&mut c[SUBSCRIBER], r.device.subscriber.as_deref());
    push_text(&mut c[PROBE], r.probe.as_deref());
    push_ip(&mut c[PUBLIC_IP], r.public.map(|p| p.ip));
    if let Some(public) = r.public {
        push_varint(&mut c[PUBLIC_PORT], u64::from(public.port));
    }
    push_ip(&mut c[REMOTE_IP], Some(r.remote.ip));
    push_varint(&mut c[REMOTE_PORT], u64::from(r.remote.port));
    push_text(&mut c[SERVICE_NAME], r.service.as_ref().map(|s| s.name.as_str()));
    if let Some(service) = &r.service {
        c[SERVICE_META].push(service.source as u8 | (u8::from(service.ech) << 7));
    }
    match &r.dns {
        Some(dns) => push_exchange(&mut c[DNS], dns),
        None => push_text(&mut c[DNS], None),
    }
    let more = r.dns_all.get(1..).unwrap_or_default();
    push_varint(&mut c[DNS_ALL], more.len() as u64);
    for dns in more {
        push_exchange(&mut c[DNS_ALL], dns);
    }
    c[LOCAL].push(u8::from(r.local));
    let origin = r.service.as_ref().and_then(|s| s.origin);
    push_ip(&mut c[DNS_ORIGIN], origin.map(|o| o.resolver.ip()));
    if let Some(origin) = origin {
        push_signed(&mut c[DNS_ORIGIN], start_us.wrapping_sub(origin.dns_at.timestamp_micros()));
        push_varint(&mut c[DNS_ORIGIN], u64::from(origin.resolver.port()));
    }
    push_varint(&mut c[PACKETS], r.packets_up);
    push_varint(&mut c[PACKETS], r.packets_down);
    push_varint(&mut c[BYTES], r.bytes_up);
    push_varint(&mut c[BYTES], r.bytes_down);
    c[INCOMPLETE].push(u8::from(r.incomplete));
    Ok(())
}

/// A decoded record that borrows its texts from the block, before it is
/// built into an [`Icr`].
struct View<'a> {
    id: u128,
    start_us: i64,
    end_us: i64,
    end_reason: u8,
    proto: u8,
    mac: Option<[u8; 6]>,
    device_ip: Option<IpAddr>,
    device_port: Option<u64>,
    vlan: Vec<u16>,
    pppoe: Option<u64>,
    subscriber: Option<&'a str>,
    probe: Option<&'a str>,
    public: Option<(IpAddr, u16)>,
    remote: (IpAddr, u16),
    service_name: Option<&'a str>,
    service_meta: u8,
    dns: Option<Exchange<'a>>,
    dns_more: Vec<Exchange<'a>>,
    local: bool,
    /// The resolver and the answer's time (µs), for a name from DNS.
    dns_origin: Option<(SocketAddr, i64)>,
    packets: (u64, u64),
    bytes: (u64, u64),
    incomplete: bool,
}

fn decode_view<'a>(c: &mut [Reader<'a>], previous: &mut Previous) -> Result<View<'a>> {
    let id_high_delta = c[ID_HIGH].signed()?;
    let low = previous.id_low.wrapping_add(c[ID_LOW].signed()? as u64);
    previous.id_low = low;
    let start_us = previous.start_us.wrapping_add(c[START].signed()?);
    previous.start_us = start_us;
    let expected_high = ((start_us.div_euclid(1000) as u64) << 16) | 0x7000;
    let high = expected_high.wrapping_add(id_high_delta as u64);
    let end_us = start_us.wrapping_add(c[DURATION].signed()?);
    let end_reason = c[END_REASON].u8()?;
    let proto = c[PROTO].u8()?;
    let mac = match c[MAC].u8()? {
        0 => None,
        _ => Some(<[u8; 6]>::try_from(c[MAC].bytes(6)?)?),
    };
    let device_ip = c[DEVICE_IP].ip()?;
    let device_port = c[DEVICE_PORT].optional()?;
    let vlan_count = c[VLAN].varint()?;
    let vlan = (0..vlan_count).map(|_| Ok(u16::try_from(c[VLAN].varint()?)?)).collect::<Result<Vec<u16>>>()?;
    let pppoe = c[PPPOE].optional()?;
    let subscriber = c[SUBSCRIBER].text_ref()?;
    let probe = c[PROBE].text_ref()?;
    let public = match c[PUBLIC_IP].ip()? {
        Some(ip) => Some((ip, u16::try_from(c[PUBLIC_PORT].varint()?)?)),
        None => None,
    };
    let remote_ip = c[REMOTE_IP].ip()?.ok_or_else(|| anyhow!("a record without a remote address"))?;
    let remote = (remote_ip, u16::try_from(c[REMOTE_PORT].varint()?)?);
    let service_name = c[SERVICE_NAME].text_ref()?;
    let service_meta = if service_name.is_some() { c[SERVICE_META].u8()? } else { 0 };
    let dns = match c[DNS].text_ref()? {
        Some(qname) => Some(read_exchange_rest(&mut c[DNS], qname)?),
        None => None,
    };
    let more = c[DNS_ALL].varint()?;
    let dns_more = (0..more)
        .map(|_| {
            let qname = c[DNS_ALL].text_ref()?.unwrap_or_default();
            read_exchange_rest(&mut c[DNS_ALL], qname)
        })
        .collect::<Result<Vec<_>>>()?;
    if dns.is_none() && !dns_more.is_empty() {
        bail!("a record with {more} DNS exchanges after a first it does not have");
    }
    Ok(View {
        id: (u128::from(high) << 64) | u128::from(low),
        start_us,
        end_us,
        end_reason,
        proto,
        mac,
        device_ip,
        device_port,
        vlan,
        pppoe,
        subscriber,
        probe,
        public,
        remote,
        service_name,
        service_meta,
        dns,
        dns_more,
        local: c[LOCAL].u8()? != 0,
        dns_origin: match c[DNS_ORIGIN].ip()? {
            Some(ip) => {
                let answered_us = start_us.wrapping_sub(c[DNS_ORIGIN].signed()?);
                Some((SocketAddr::new(ip, u16::try_from(c[DNS_ORIGIN].varint()?)?), answered_us))
            }
            None => None,
        },
        packets: (c[PACKETS].varint()?, c[PACKETS].varint()?),
        bytes: (c[BYTES].varint()?, c[BYTES].varint()?),
        incomplete: c[INCOMPLETE].u8()? != 0,
    })
}

/// A DNS exchange as a block holds it: qname, qtype, answers.
type Exchange<'a> = (&'a str, &'a str, Vec<&'a str>);

fn push_exchange(out: &mut Vec<u8>, dns: &Dns) {
    push_text(out, Some(&dns.qname));
    push_text(out, Some(&dns.qtype));
    push_varint(out, dns.answers.len() as u64);
    for answer in &dns.answers {
        push_text(out, Some(answer));
    }
}

/// The rest of an exchange whose qname was read.
fn read_exchange_rest<'a>(column: &mut Reader<'a>, qname: &'a str) -> Result<Exchange<'a>> {
    let qtype = column.text_ref()?.unwrap_or_default();
    let count = column.varint()?;
    let answers = (0..count).map(|_| Ok(column.text_ref()?.unwrap_or_default())).collect::<Result<Vec<_>>>()?;
    Ok((qname, qtype, answers))
}

/// Moves past the rest of an exchange whose qname was read.
fn skip_exchange_rest(column: &mut Reader) -> Result<()> {
    column.skip_text()?;
    for _ in 0..column.varint()? {
        column.skip_text()?;
    }
    Ok(())
}

/// Moves past a record as [`decode_view`] reads it, building nothing: the
/// records a query does not keep cost no allocation or text check.
fn skip_record(c: &mut [Reader], previous: &mut Previous) -> Result<()> {
    c[ID_HIGH].signed()?;
    previous.id_low = previous.id_low.wrapping_add(c[ID_LOW].signed()? as u64);
    previous.start_us = previous.start_us.wrapping_add(c[START].signed()?);
    c[DURATION].signed()?;
    c[END_REASON].u8()?;
    c[PROTO].u8()?;
    if c[MAC].u8()? != 0 {
        c[MAC].bytes(6)?;
    }
    c[DEVICE_IP].ip()?;
    c[DEVICE_PORT].varint()?;
    for _ in 0..c[VLAN].varint()? {
        c[VLAN].varint()?;
    }
    c[PPPOE].varint()?;
    c[SUBSCRIBER].skip_text()?;
    c[PROBE].skip_text()?;
    if c[PUBLIC_IP].ip()?.is_some() {
        c[PUBLIC_PORT].varint()?;
    }
    c[REMOTE_IP].ip()?;
    c[REMOTE_PORT].varint()?;
    if c[SERVICE_NAME].skip_text()? {
        c[SERVICE_META].u8()?;
    }
    if c[DNS].skip_text()? {
        skip_exchange_rest(&mut c[DNS])?;
    }
    for _ in 0..c[DNS_ALL].varint()? {
        c[DNS_ALL].skip_text()?;
        skip_exchange_rest(&mut c[DNS_ALL])?;
    }
    c[LOCAL].u8()?;
    if c[DNS_ORIGIN].ip()?.is_some() {
        c[DNS_ORIGIN].signed()?;
        c[DNS_ORIGIN].varint()?;
    }
    for column in [PACKETS, PACKETS, BYTES, BYTES] {
        c[column].varint()?;
    }
    c[INCOMPLETE].u8()?;
    Ok(())
}

impl View<'_> {
    fn to_icr(&self) -> Result<Icr> {
        let end_reason = EndReason::try_from(self.end_reason)?;
        let service = match self.service_name {
            Some(name) => {
                let source = ServiceSource::try_from(self.service_meta & 0x7f)?;
                let origin = match self.dns_origin {
                    Some((resolver, answered_us)) => Some(DnsOrigin { dns_at: time(answered_us)?, resolver }),
                    None => None,
                };
                Some(Service { origin, ..Service::carried(name.to_owned(), source, self.service_meta & 0x80 != 0) })
            }
            None => None,
        };
        Ok(Icr {
            id: uuid::Uuid::from_u128(self.id).to_string(),
            probe: self.probe.map(str::to_owned),
            start: time(self.start_us)?,
            end: time(self.end_us)?,
            end_reason,
            proto: Proto::from(self.proto).to_string(),
            device: Device {
                mac: self.mac.map(|mac| Mac(mac).to_string()),
                ip: self.device_ip,
                port: self.device_port.map(u16::try_from).transpose()?,
                vlan: self.vlan.clone(),
                pppoe_session: self.pppoe.map(u16::try_from).transpose()?,
                subscriber: self.subscriber.map(str::to_owned),
            },
            public: self.public.map(|(ip, port)| Endpoint { ip, port }),
            remote: Endpoint { ip: self.remote.0, port: self.remote.1 },
            service,
            dns: self.dns.as_ref().map(exchange),
            dns_all: self.dns.iter().chain(&self.dns_more).map(exchange).collect(),
            packets_up: self.packets.0,
            packets_down: self.packets.1,
            bytes_up: self.bytes.0,
            bytes_down: self.bytes.1,
            incomplete: self.incomplete,
            local: self.local,
        })
    }
}

fn exchange((qname, qtype, answers): &Exchange) -> Dns {
    Dns {
        qname: (*qname).to_owned(),
        qtype: (*qtype).to_owned(),
        answers: answers.iter().map(|a| (*a).to_owned()).collect(),
    }
}

fn time(micros: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros).ok_or_else(|| anyhow!("time {micros} µs is out of range"))
}

/// The protocol number behind a record's `proto` text.
/// `None` as 0, a value as value + 1.
fn push_optional(out: &mut Vec<u8>, value: Option<u64>) {
    push_varint(out, value.map_or(0, |v| v + 1));
}

fn push_text(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        Some(text) => {
            push_varint(out, text.len() as u64 + 1);
            out.extend_from_slice(text.as_bytes());
        }
        None => push_varint(out, 0),
    }
}

/// The column reads only blocks make.
impl<'a> Reader<'a> {
    /// `None` as 0, a value as value + 1.
    fn optional(&mut self) -> Result<Option<u64>> {
        Ok(self.varint()?.checked_sub(1))
    }

    fn text_ref(&mut self) -> Result<Option<&'a str>> {
        let Some(length) = self.optional()? else { return Ok(None) };
        let bytes = self.bytes(usize::try_from(length)?)?;
        Ok(Some(std::str::from_utf8(bytes).context("a stored text is not UTF-8")?))
    }

    /// Moves past a text; whether there was one.
    fn skip_text(&mut self) -> Result<bool> {
        let Some(length) = self.optional()? else { return Ok(false) };
        self.bytes(usize::try_from(length)?)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_records::{sample, samples};

    /// Records as a block older than version 4 gives them back: the first
    /// DNS exchange alone, and not local.
    fn before_v4(records: &[Icr]) -> Vec<Icr> {
        before_v5(records)
            .into_iter()
            .map(|r| Icr { dns_all: r.dns.iter().cloned().collect(), local: false, ..r })
            .collect()
    }

    /// Records as a block older than version 5 gives them back: a name from
    /// DNS without the exchange that named it.
    fn before_v5(records: &[Icr]) -> Vec<Icr> {
        let without = |s: Service| Service { origin: None, ..s };
        records.iter().cloned().map(|r| Icr { service: r.service.map(without), ..r }).collect()
    }

    #[test]
    fn version_4_blocks_read_without_the_dns_origin_of_names() {
        let records = samples(300);
        assert!(
            records.iter().any(|r| r.service.as_ref().is_some_and(|s| s.origin.is_some())),
            "the samples have some"
        );
        for compress in [false, true] {
            let old = encode_v4(&records, compress).unwrap();
            assert_eq!(old[0], 4);
            assert_eq!(decode(&old).unwrap(), before_v5(&records), "compressed: {compress}");
        }
    }

    #[test]
    fn blocks_round_trip_every_field() {
        let records = samples(500);
        for compress in [false, true] {
            let block = encode(&records, compress).unwrap();
            assert_eq!(decode(&block).unwrap(), records);
        }
        assert_eq!(decode(&encode(&[], true).unwrap()).unwrap(), Vec::<Icr>::new());
    }

    #[test]
    fn version_1_blocks_are_still_read_and_filtered() {
        let records = before_v4(&samples(500));
        for compress in [false, true] {
            let block = encode_v1(&records, compress).unwrap();
            assert_eq!(decode(&block).unwrap(), records);
            let fields = KeyFields { service_name: true, ..KeyFields::default() };
            let mut seen = 0;
            let kept = decode_filtered(&block, fields, |_| {
                seen += 1;
                seen % 5 == 0
            })
            .unwrap();
            assert_eq!(kept, records.iter().skip(4).step_by(5).cloned().collect::<Vec<_>>());
        }
        let mut damaged = encode_v1(&records, true).unwrap();
        damaged.truncate(damaged.len() - 9);
        assert!(decode(&damaged).is_err(), "a damaged version 1 block is an error");
    }

    #[test]
    fn blocks_written_before_records_named_their_probe_read_as_no_probe() {
        let named: Vec<Icr> =
            before_v4(&samples(300)).into_iter().map(|r| Icr { probe: Some("gw-07".into()), ..r }).collect();
        let unnamed: Vec<Icr> = named.iter().cloned().map(|r| Icr { probe: None, ..r }).collect();
        for compress in [false, true] {
            assert_eq!(decode(&encode(&named, compress).unwrap()).unwrap(), named);
            let old = encode_v2(&named, compress).unwrap();
            assert_eq!(old[0], 2);
            assert_eq!(decode(&old).unwrap(), unnamed, "compressed: {compress}");
            let fields = KeyFields { public: true, ..KeyFields::default() };
            assert_eq!(
                decode_filtered(&old, fields, |keys| keys.public.is_some()).unwrap().len(),
                unnamed.iter().filter(|r| r.public.is_some()).count()
            );
        }
    }

    #[test]
    fn every_dns_exchange_and_local_round_trip() {
        let records = samples(400);
        assert!(
            records.iter().any(|r| r.dns_all.len() > 1) && records.iter().any(|r| r.local),
            "the samples have both"
        );
        for compress in [false, true] {
            let decoded = decode(&encode(&records, compress).unwrap()).unwrap();
            assert_eq!(decoded, records);
            for record in &decoded {
                assert_eq!(record.dns.as_ref(), record.dns_all.first(), "dns is the first exchange");
            }
        }
        // Skipped records leave DNS_ALL and LOCAL in step with the others.
        let fields = KeyFields { service_name: true, ..KeyFields::default() };
        let mut seen = 0;
        let kept = decode_filtered(&encode(&records, true).unwrap(), fields, |keys| {
            seen += 1;
            keys.dns_more.len() > 1 || seen % 11 == 0
        })
        .unwrap();
        let expected: Vec<Icr> = records
            .iter()
            .enumerate()
            .filter(|(i, r)| r.dns_all.len() > 2 || (i + 1) % 11 == 0)
            .map(|(_, r)| r.clone())
            .collect();
        assert_eq!(kept, expected);
    }

    #[test]
    fn version_3_blocks_read_as_their_first_exchange_and_not_local() {
        let records = samples(300);
        let as_v3 = before_v4(&records);
        for compress in [false, true] {
            let old = encode_v3(&records, compress).unwrap();
            assert_eq!(old[0], 3);
            assert_eq!(decode(&old).unwrap(), as_v3, "compressed: {compress}");
            let fields = KeyFields { service_name: true, ..KeyFields::default() };
            let kept =
                decode_filtered(&old, fields, |keys| keys.dns_first == Some("a.example") && keys.dns_more.is_empty())
                    .unwrap();
            assert_eq!(kept, as_v3.iter().filter(|r| r.dns.is_some()).cloned().collect::<Vec<_>>());
            // Older still: no probe either, and the same defaults.
            let unnamed: Vec<Icr> = as_v3.iter().cloned().map(|r| Icr { probe: None, ..r }).collect();
            assert_eq!(decode(&encode_v2(&records, compress).unwrap()).unwrap(), unnamed);
            assert_eq!(decode(&encode_v1(&records, compress).unwrap()).unwrap(), unnamed);
        }
    }

    #[test]
    fn a_record_whose_dns_is_not_its_first_exchange_is_refused() {
        let mut records = samples(20);
        let dns = records[9].dns.clone().expect("sample 9 is a DNS record");
        let cases = [
            (None, vec![dns.clone()]),
            (Some(dns.clone()), vec![]),
            (Some(dns.clone()), vec![Dns { qname: "other.example".into(), ..dns.clone() }, dns.clone()]),
        ];
        for (first, all) in cases {
            records[9].dns = first;
            records[9].dns_all = all;
            let error = encode(&records, true).unwrap_err();
            assert!(error.downcast_ref::<InconsistentDns>().is_some(), "{error:#}");
            assert!(format!("{error:#}").contains(&format!("encoding record {}", records[9].id)), "{error:#}");
        }
    }

    #[test]
    fn a_filter_keeps_exactly_the_records_it_chose() {
        let records = samples(500);
        let block = encode(&records, true).unwrap();
        let mut seen = 0;
        let fields = KeyFields { service_name: true, ..KeyFields::default() };
        let kept = decode_filtered(&block, fields, |keys| {
            seen += 1;
            assert!(keys.mac.is_none(), "only the columns asked for are read");
            (seen - 1) % 7 == 3
        })
        .unwrap();
        let expected: Vec<Icr> = records.iter().skip(3).step_by(7).cloned().collect();
        assert_eq!(kept, expected, "records skipped between the kept ones leave the columns in step");
    }

    #[test]
    fn random_uuids_and_odd_values_round_trip() {
        let mut record = sample(7);
        record.id = uuid::Uuid::from_u128(0x1234_5678_9abc_def0_0fed_cba9_8765_4321).to_string();
        record.proto = "other:47".into();
        record.start = DateTime::from_timestamp_micros(-5).unwrap();
        record.end = DateTime::from_timestamp_micros(1).unwrap();
        record.device = Device::default();
        record.public = None;
        record.service = Some(Service::carried("ech.example".into(), ServiceSource::QuicSni, true));
        record.dns = Some(Dns { qname: "a.example".into(), qtype: "AAAA".into(), answers: vec![] });
        record.dns_all = vec![
            record.dns.clone().unwrap(),
            Dns { qname: String::new(), qtype: String::new(), answers: vec![String::new()] },
        ];
        record.local = true;
        record.packets_up = u64::MAX;
        record.probe = Some("gw-07".into());
        let block = encode(std::slice::from_ref(&record), true).unwrap();
        assert_eq!(decode(&block).unwrap(), vec![record]);
    }

    #[test]
    fn damaged_blocks_are_errors_not_panics() {
        let block = encode(&samples(50), true).unwrap();
        let mut unknown = block.clone();
        unknown[0] = 9;
        assert!(decode(&unknown).unwrap_err().to_string().contains("version 9"));
        for cut in [0, 1, 2, 5, block.len() / 2, block.len() - 1] {
            assert!(decode(&block[..cut]).is_err(), "cut at {cut}");
        }
        let plain = encode(&samples(50), false).unwrap();
        for flip in (0..plain.len()).step_by(7) {
            let mut bad = plain.clone();
            bad[flip] ^= 0xa5;
            let _ = decode(&bad); // must return, whatever it says
        }
    }

    #[test]
    fn compressed_blocks_are_small() {
        let records = samples(4096);
        let block = encode(&records, true).unwrap();
        let json: usize = records.iter().map(|r| serde_json::to_vec(r).unwrap().len()).sum();
        assert!(block.len() * 10 < json, "block {} bytes vs JSON {json}", block.len());
    }
}
