//! The three questions, as the store's records answer them: their values
//! parsed and typed ([`Question`]), the selectors investigators name devices
//! and services by, and the answers' final ranking and filtering, which is
//! the same whichever backend found the candidate records.
use std::net::IpAddr;

use anyhow::{Context as _, Result, bail};
use chrono::{DateTime, Utc};
use ipnet::IpNet;

use probe_common::Mac;

use crate::{
    query::request::{Ask, LocalFilter},
    record::Icr,
    store::{
        index::{IndexKey, normal_name},
        rollup::{ServiceRow, Services},
    },
};

/// A question with its values parsed and checked, before it is authorised:
/// times are times, the window is representable, selectors are typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Question {
    /// 1: who had `ip` (and `port`) at `at`, looked for in `from..=to`.
    Resolve {
        ip: IpAddr,
        port: Option<u16>,
        at: DateTime<Utc>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        remote: Option<(IpAddr, Option<u16>)>,
        service: Option<ServiceSelector>,
    },
    /// 2: the services `device` used in `from..to`.
    Services { device: DeviceSelector, from: DateTime<Utc>, to: DateTime<Utc> },
    /// 3: the devices that used any of `services` in `from..to`, records
    /// that never left the gateway kept or not as `local` says.
    Accessed { services: Vec<ServiceSelector>, from: DateTime<Utc>, to: DateTime<Utc>, local: LocalFilter },
    /// Every record in `from..to` (maintenance).
    List { from: DateTime<Utc>, to: DateTime<Utc> },
}

impl Question {
    /// The question a request asks, its values parsed and checked.
    pub fn of(ask: &Ask) -> Result<Self> {
        match ask {
            Ask::Resolve { ip, port, at, tolerance, remote, service } => {
                Self::resolve(*ip, *port, at, tolerance, remote.as_deref(), service.as_deref())
            }
            Ask::Services { device, from, to } => Self::services(device, from, to),
            Ask::Accessed { services, from, to, local } => Self::accessed(services, from, to, *local),
            Ask::List { from, to } | Ask::ExportIpfix { from, to, .. } => {
                Ok(Self::List { from: parse_time(from, "--from")?, to: parse_time(to, "--to")? })
            }
        }
    }

    pub fn resolve(
        ip: IpAddr,
        port: Option<u16>,
        at: &str,
        tolerance: &str,
        remote: Option<&str>,
        service: Option<&str>,
    ) -> Result<Self> {
        let at = parse_time(at, "--at")?;
        let tolerance = chrono::Duration::from_std(crate::config::parse_duration(tolerance)?)
            .ok()
            .and_then(|tolerance| at.checked_sub_signed(tolerance).zip(at.checked_add_signed(tolerance)))
            .with_context(|| format!("--tolerance {tolerance:?} reaches past the times this can represent"))?;
        let remote = remote.map(parse_remote).transpose()?;
        let service = service.map(ServiceSelector::parse).transpose()?;
        Ok(Self::Resolve { ip, port, at, from: tolerance.0, to: tolerance.1, remote, service })
    }

    pub fn services(device: &str, from: &str, to: &str) -> Result<Self> {
        Ok(Self::Services {
            device: DeviceSelector::parse(device),
            from: parse_time(from, "--from")?,
            to: parse_time(to, "--to")?,
        })
    }

    /// `services`: at least one.
    pub fn accessed(services: &[String], from: &str, to: &str, local: LocalFilter) -> Result<Self> {
        if services.is_empty() {
            bail!("name at least one --service (or a --services-file)");
        }
        let services = services.iter().map(|text| ServiceSelector::parse(text)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self::Accessed { services, from: parse_time(from, "--from")?, to: parse_time(to, "--to")?, local })
    }

    /// The window the question reads.
    pub fn window(&self) -> (DateTime<Utc>, DateTime<Utc>) {
        match self {
            Self::Resolve { from, to, .. }
            | Self::Services { from, to, .. }
            | Self::Accessed { from, to, .. }
            | Self::List { from, to } => (*from, *to),
        }
    }
}

/// An RFC 3339 time given with `flag`.
pub fn parse_time(text: &str, flag: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .with_context(|| format!("{flag} {text:?} is not an RFC 3339 time like 2026-11-22T15:02:00Z"))
}

/// `--remote`: IP or IP:PORT.
fn parse_remote(text: &str) -> Result<(IpAddr, Option<u16>)> {
    if let Ok(ip) = text.parse() {
        return Ok((ip, None));
    }
    let address: std::net::SocketAddr =
        text.parse().with_context(|| format!("--remote {text:?} is not IP or IP:PORT"))?;
    Ok((address.ip(), Some(address.port())))
}

/// A device, as an investigator names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSelector {
    Mac(Mac),
    Ip(IpAddr),
    Subscriber(String),
}

impl DeviceSelector {
    pub fn parse(text: &str) -> Self {
        let text = text.trim();
        if let Ok(ip) = text.parse() {
            return Self::Ip(ip);
        }
        if let Ok(mac) = text.parse() {
            return Self::Mac(mac);
        }
        Self::Subscriber(text.to_string())
    }

    /// The index key the store finds this device's records by.
    pub fn index_key(&self) -> IndexKey {
        match self {
            Self::Mac(mac) => IndexKey::Mac(mac.0),
            Self::Ip(ip) => IndexKey::DeviceIp(*ip),
            Self::Subscriber(name) => IndexKey::Subscriber(name.clone()),
        }
    }

    pub fn matches(&self, record: &Icr) -> bool {
        match self {
            Self::Mac(mac) => record.device.mac.as_deref().and_then(|text| text.parse::<Mac>().ok()) == Some(*mac),
            Self::Ip(ip) => record.device.ip == Some(*ip),
            Self::Subscriber(name) => record.device.subscriber.as_deref() == Some(name.as_str()),
        }
    }
}

/// A service, as an investigator names it: `mail.example.com`,
/// `*.example.com` (the domain and its subdomains), an IP or a CIDR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceSelector {
    Name(String),
    Suffix(String),
    Net(IpNet),
}

/// A service an investigator named that is no name, suffix, IP or CIDR.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadSelector(String);

impl ServiceSelector {
    pub fn parse(text: &str) -> Result<Self, BadSelector> {
        let text = text.trim();
        if text.is_empty() {
            return Err(BadSelector("an empty service".into()));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Self::Net(IpNet::from(ip)));
        }
        if let Ok(net) = text.parse::<IpNet>() {
            return Ok(Self::Net(net.trunc()));
        }
        let name = text.trim_end_matches('.').to_ascii_lowercase();
        if name.starts_with('*') {
            return match name.strip_prefix("*.") {
                Some(suffix) if !suffix.is_empty() && !suffix.contains('*') => Ok(Self::Suffix(suffix.to_string())),
                _ => Err(BadSelector(format!("{text:?} is not a suffix like *.example.com"))),
            };
        }
        if name.contains(['/', '?', ' ']) {
            return Err(BadSelector(format!("{text:?} is not a host name, IP or CIDR (no URLs)")));
        }
        Ok(Self::Name(name))
    }

    /// The index keys the store finds these services by; `None` for
    /// networks too wide to enumerate (the window is then scanned).
    pub fn index_keys(&self) -> Option<Vec<IndexKey>> {
        match self {
            Self::Name(name) => Some(vec![IndexKey::Name(name.clone())]),
            Self::Suffix(domain) => Some(vec![IndexKey::Name(domain.clone()), IndexKey::Domain(domain.clone())]),
            Self::Net(net) if net.prefix_len() == net.max_prefix_len() => Some(vec![IndexKey::RemoteIp(net.addr())]),
            Self::Net(net) => {
                // Remote addresses are indexed by /24 (IPv4) or /48 (IPv6).
                let indexed = IndexKey::remote_net(net.addr()).prefix_len();
                if net.prefix_len() >= indexed {
                    return Some(vec![IndexKey::RemoteNet(IndexKey::remote_net(net.addr()))]);
                }
                if indexed - net.prefix_len() > 8 {
                    return None;
                }
                Some(net.subnets(indexed).ok()?.map(IndexKey::RemoteNet).collect())
            }
        }
    }

    /// A name or suffix matches the service name or any DNS exchange's name.
    pub fn matches(&self, record: &Icr) -> bool {
        let mut names = names_of(record);
        match self {
            Self::Name(wanted) => names.any(|name| name == wanted.as_str()),
            Self::Suffix(suffix) => names.any(|name| {
                name == suffix.as_str() || name.strip_suffix(suffix.as_str()).is_some_and(|rest| rest.ends_with('.'))
            }),
            Self::Net(net) => net.contains(&record.remote.ip),
        }
    }
}

/// The widest address networks question 3 may name, as prefix lengths
/// (`max_selector_v4`, `max_selector_v6`): a wider question is a bulk read,
/// which only an operator's audited `list` may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectorLimits {
    pub v4: u8,
    pub v6: u8,
}

impl SelectorLimits {
    pub fn of(config: &crate::config::Config) -> Self {
        Self { v4: config.max_selector_v4, v6: config.max_selector_v6 }
    }

    /// Why question 3 may not name `services`, if it may not: a network
    /// wider than the limit, the whole address space whatever the limit,
    /// or networks that together hold more addresses than the widest one
    /// allowed (many narrow networks are as much a bulk read as one wide one).
    pub fn refuses(&self, services: &[ServiceSelector]) -> Option<String> {
        let mut named = [0u128; 2];
        for service in services {
            let ServiceSelector::Net(net) = service else { continue };
            let (family, widest, bits) = match net {
                IpNet::V4(_) => (0, self.v4.max(1), 32),
                IpNet::V6(_) => (1, self.v6.max(1), 128),
            };
            if net.prefix_len() < widest {
                return Some(format!(
                    "{net} is wider than the /{widest} question 3 may name: a bulk read is an operator's list"
                ));
            }
            named[family] = named[family].saturating_add(1u128 << (bits - net.prefix_len()).min(127));
            if named[family] > 1u128 << (bits - widest).min(127) {
                return Some(format!(
                    "the networks named hold more addresses than one /{widest}, the most question 3 may name: a bulk read \
                     is an operator's list"
                ));
            }
        }
        None
    }
}

/// The names question 3 knows a record by: its service's, and each of its
/// DNS exchanges' (lowercase, without a trailing dot).
fn names_of(record: &Icr) -> impl Iterator<Item = std::borrow::Cow<'_, str>> {
    let service = record.service.iter().map(|s| s.name.as_str());
    service.chain(record.dns_all.iter().map(|d| d.qname.as_str())).map(normal_name)
}

/// Question 2 over records: one row per service (by name when known, else
/// remote ip:port and protocol). The store answers it from its rollups
/// ([`crate::store::Store::services`]); this is the same answer from records.
pub fn services_of(records: &[Icr], device: &DeviceSelector) -> Vec<ServiceRow> {
    let mut services = Services::default();
    for record in records.iter().filter(|r| device.matches(r)) {
        services.add_record(record);
    }
    services.into_rows()
}

/// Question 1's answer, before the desk's last check ([`Resolved::nearest`]).
#[derive(Debug)]
pub struct Resolved {
    /// The devices with the most matching connections first.
    pub records: Vec<Icr>,
    /// No record was alive at the time asked: these are the nearest within
    /// the tolerance (a server's clock a little off the gateway's).
    pub nearest: bool,
}

impl Resolved {
    /// The remote ends of a nearest answer: where a connection whose public
    /// end is unknown may have held the port instead ([`Self::without_unknown_holders`]).
    pub fn remote_ends(&self) -> Vec<ServiceSelector> {
        let mut ips: Vec<IpAddr> = self.records.iter().map(|r| r.remote.ip).collect();
        ips.sort_unstable();
        ips.dedup();
        ips.into_iter().map(|ip| ServiceSelector::Net(IpNet::from(ip))).collect()
    }

    /// A nearest record is no answer when a connection of another device to
    /// the same remote end, whose public end the probe could not learn (its
    /// NAT mapping was lost, as when an agent dies), was alive between the
    /// time asked and that record: the port may have been that connection's,
    /// and question 1 names nobody rather than a device that did not make
    /// the connection. `unmapped` may hold any records; only those without
    /// a public end count.
    pub fn without_unknown_holders(self, at: DateTime<Utc>, unmapped: &[Icr]) -> Vec<Icr> {
        if !self.nearest {
            return self.records;
        }
        let unknown: Vec<&Icr> = unmapped.iter().filter(|u| u.public.is_none() && !u.local).collect();
        self.records
            .into_iter()
            .filter(|hit| {
                let (from, to) = if hit.end < at { (hit.end, at) } else { (at, hit.start) };
                !unknown.iter().any(|u| {
                    u.remote == hit.remote
                        && (&u.device.mac, u.device.ip) != (&hit.device.mac, hit.device.ip)
                        && u.start <= to
                        && u.end >= from
                })
            })
            .collect()
    }
}

/// Question 1: which device used public `ip` (and `port`) at `at`. Records
/// in `records` lie within the tolerance of `at`; those whose lifetime
/// contains `at` are the answer when there are any (a public port reused by
/// another device a moment earlier or later must not confuse it), else the
/// nearest. Narrowed by the remote end and service; the devices with the
/// most matching connections first.
pub fn resolve(
    records: Vec<Icr>,
    at: DateTime<Utc>,
    ip: IpAddr,
    port: Option<u16>,
    remote: Option<(IpAddr, Option<u16>)>,
    service: Option<&ServiceSelector>,
) -> Resolved {
    let mut hits: Vec<Icr> = records
        .into_iter()
        .filter(|r| r.public.is_some_and(|p| p.ip == ip && port.is_none_or(|port| p.port == port)))
        .filter(|r| remote.is_none_or(|(rip, rport)| r.remote.ip == rip && rport.is_none_or(|p| r.remote.port == p)))
        .filter(|r| service.is_none_or(|s| s.matches(r)))
        .collect();
    let nearest = !hits.iter().any(|r| r.start <= at && at <= r.end);
    if !nearest {
        hits.retain(|r| r.start <= at && at <= r.end);
        if port.is_some() {
            // A public ip:port toward one remote end has one user at a time;
            // when NAT hands it over, the old flow's closing packets overlap
            // the new flow's first ones. The latest to start is the user.
            let mut latest: std::collections::HashMap<(IpAddr, u16), DateTime<Utc>> = Default::default();
            for r in &hits {
                let start = latest.entry((r.remote.ip, r.remote.port)).or_insert(r.start);
                *start = (*start).max(r.start);
            }
            hits.retain(|r| latest[&(r.remote.ip, r.remote.port)] == r.start);
        }
    }
    let device = |r: &Icr| (r.device.mac.clone(), r.device.ip);
    let mut counts = std::collections::HashMap::new();
    for r in &hits {
        *counts.entry(device(r)).or_insert(0usize) += 1;
    }
    let distance = |r: &Icr| {
        if r.start > at {
            r.start - at
        } else if r.end < at {
            at - r.end
        } else {
            chrono::Duration::zero()
        }
    };
    hits.sort_by_key(|r| (std::cmp::Reverse(counts[&device(r)]), distance(r), r.start));
    Resolved { records: hits, nearest }
}

/// Question 3: the records of any device that used any of `services` (by
/// service name, any DNS exchange's name, or remote address), as `local`
/// keeps them. Names and suffixes are looked up in sets: with 1,000
/// selectors and 400,000 candidate records, testing each against each took
/// seconds.
pub fn accessed(records: Vec<Icr>, services: &[ServiceSelector], local: LocalFilter) -> Vec<Icr> {
    let mut names = std::collections::HashSet::new();
    let mut suffixes = std::collections::HashSet::new();
    let mut nets = Vec::new();
    for selector in services {
        match selector {
            ServiceSelector::Name(name) => names.insert(name.as_str()),
            ServiceSelector::Suffix(suffix) => suffixes.insert(suffix.as_str()),
            ServiceSelector::Net(net) => {
                nets.push(*net);
                true
            }
        };
    }
    let named = |name: &str| {
        names.contains(name)
            || (!suffixes.is_empty()
                && (suffixes.contains(name)
                    || name.match_indices('.').any(|(dot, _)| suffixes.contains(&name[dot + 1..]))))
    };
    records
        .into_iter()
        .filter(|r| local.keeps(r))
        .filter(|r| names_of(r).any(|name| named(&name)) || nets.iter().any(|net| net.contains(&r.remote.ip)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Device, Dns, EndReason, Endpoint, Service, ServiceSource};

    fn record(device: &str, remote: &str, port: u16, name: Option<&str>, start: i64) -> Icr {
        let start = DateTime::from_timestamp(start, 0).unwrap();
        Icr {
            id: uuid::Uuid::now_v7().to_string(),
            probe: None,
            start,
            end: start + chrono::Duration::seconds(5),
            end_reason: EndReason::Fin,
            proto: "tcp".into(),
            device: Device {
                ip: Some(device.parse().unwrap()),
                mac: Some("02:00:00:00:00:17".into()),
                ..Device::default()
            },
            public: None,
            remote: Endpoint { ip: remote.parse().unwrap(), port },
            service: name.map(|n| Service::carried(n.into(), ServiceSource::TlsSni, false)),
            dns: None,
            dns_all: vec![],
            packets_up: 1,
            packets_down: 1,
            bytes_up: 100,
            bytes_down: 1000,
            incomplete: false,
            local: false,
        }
    }

    #[test]
    fn question_3_names_no_network_wider_than_the_limit_and_never_everything() {
        let nets = |texts: &[&str]| texts.iter().map(|t| ServiceSelector::parse(t).unwrap()).collect::<Vec<_>>();
        let default = SelectorLimits::of(&crate::config::Config::default());
        assert_eq!(default, SelectorLimits { v4: 16, v6: 32 });
        for allowed in
            [&["10.1.0.0/16"][..], &["2001:db8::/32"], &["a.example", "*.example", "192.0.2.7", "2001:db8::1"]]
        {
            assert_eq!(default.refuses(&nets(allowed)), None, "{allowed:?}");
        }
        for wide in ["0.0.0.0/0", "::/0", "10.0.0.0/8", "10.0.0.0/15", "2001::/16"] {
            let reason = default.refuses(&nets(&["a.example", wide])).unwrap_or_else(|| panic!("{wide} is refused"));
            assert!(reason.contains("is wider than the /") && reason.contains("operator's list"), "{reason}");
        }
        // The whole address space stays refused however wide the limit.
        let widest = SelectorLimits { v4: 0, v6: 0 };
        assert_eq!(widest.refuses(&nets(&["128.0.0.0/1", "::/1"])), None);
        assert!(widest.refuses(&nets(&["0.0.0.0/0"])).is_some() && widest.refuses(&nets(&["::/0"])).is_some());
        // Two /16s hold more than one /16: the everything-in-pieces request.
        let pieces = nets(&["10.1.0.0/16", "10.2.0.0/16"]);
        assert!(default.refuses(&pieces).unwrap().contains("more addresses than one /16"));
        assert_eq!(SelectorLimits { v4: 15, v6: 32 }.refuses(&pieces), None);
    }

    #[test]
    fn selectors_parse_and_match() {
        assert_eq!(DeviceSelector::parse("02-00-00-00-00-17"), DeviceSelector::Mac(Mac([2, 0, 0, 0, 0, 0x17])));
        assert_eq!(DeviceSelector::parse("line-0042"), DeviceSelector::Subscriber("line-0042".into()));
        let r = record("10.0.0.2", "192.0.2.10", 443, Some("mail.example.com"), 0);
        assert!(DeviceSelector::parse("02:00:00:00:00:17").matches(&r));
        assert!(DeviceSelector::parse("10.0.0.2").matches(&r));
        assert!(ServiceSelector::parse("Mail.Example.com.").unwrap().matches(&r));
        assert!(ServiceSelector::parse("*.example.com").unwrap().matches(&r));
        assert!(!ServiceSelector::parse("*.ample.com").unwrap().matches(&r));
        assert!(ServiceSelector::parse("192.0.2.0/24").unwrap().matches(&r));
        assert!(!ServiceSelector::parse("192.0.3.0/24").unwrap().matches(&r));
        assert!(ServiceSelector::parse("example.com/path?q=1").is_err());
        assert!(ServiceSelector::parse("*.").is_err());
    }

    #[test]
    fn resolve_prefers_the_flow_alive_at_the_time_and_ranks_devices() {
        let public = |mut r: Icr, port: u16| {
            r.public = Some(Endpoint { ip: "203.0.113.1".parse().unwrap(), port });
            r
        };
        let at = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
        // Port 20000: device .2 for [100, 105], then device .3 for [106, 111].
        let records = vec![
            public(record("10.0.0.2", "192.0.2.10", 443, Some("mail.example.com"), 100), 20000),
            public(record("10.0.0.3", "192.0.2.10", 443, Some("mail.example.com"), 106), 20000),
            public(record("10.0.0.3", "192.0.2.10", 443, Some("mail.example.com"), 107), 20001),
            public(record("10.0.0.4", "192.0.2.99", 443, None, 107), 20002),
        ];
        let ip: IpAddr = "203.0.113.1".parse().unwrap();
        let first = |hits: Vec<Icr>| hits.first().and_then(|r| r.device.ip).map(|ip| ip.to_string());
        assert_eq!(
            first(resolve(records.clone(), at(104), ip, Some(20000), None, None).records).as_deref(),
            Some("10.0.0.2")
        );
        let hits = resolve(records.clone(), at(108), ip, Some(20000), None, None).records;
        assert_eq!(hits.len(), 1, "only the flow alive at the time");
        assert_eq!(first(hits).as_deref(), Some("10.0.0.3"));
        // A hand-over: .2 is still closing (until 105) when .3 starts at 104.5.
        let mut overlap = records.clone();
        overlap[1].start = DateTime::from_timestamp_millis(104_500).unwrap();
        let hits =
            resolve(overlap, DateTime::from_timestamp_millis(104_800).unwrap(), ip, Some(20000), None, None).records;
        assert_eq!(hits.len(), 1);
        assert_eq!(first(hits).as_deref(), Some("10.0.0.3"), "the latest to start holds the port");
        // Without a port: ranked by matching connections to the service.
        let mail = ServiceSelector::parse("mail.example.com").unwrap();
        let hits = resolve(records.clone(), at(108), ip, None, None, Some(&mail)).records;
        assert_eq!(first(hits).as_deref(), Some("10.0.0.3"));
        let elsewhere =
            resolve(records, at(108), ip, None, Some(("192.0.2.99".parse().unwrap(), Some(443))), None).records;
        assert_eq!(first(elsewhere).as_deref(), Some("10.0.0.4"));
    }

    #[test]
    fn services_are_grouped_per_name_or_remote() {
        let records = vec![
            record("10.0.0.2", "192.0.2.10", 443, Some("mail.example.com"), 0),
            record("10.0.0.2", "192.0.2.11", 443, Some("mail.example.com"), 10),
            record("10.0.0.2", "192.0.2.20", 853, None, 20),
            record("10.0.0.3", "192.0.2.20", 853, None, 30),
        ];
        let rows = services_of(&records, &DeviceSelector::parse("10.0.0.2"));
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].name.as_deref(), Some("mail.example.com"));
        assert_eq!(rows[0].connections, 2);
        assert_eq!(rows[0].bytes, 2200);
        assert_eq!(rows[0].last, "1970-01-01T00:00:15.000000Z");
        assert_eq!(rows[1].remote, "192.0.2.20:853");
        assert_eq!(rows[1].connections, 1);
        let hits = accessed(records.clone(), &[ServiceSelector::parse("192.0.2.20").unwrap()], LocalFilter::Include);
        assert_eq!(hits.len(), 2);
        // The sets answer as each selector's own match does.
        let selectors: Vec<ServiceSelector> = [
            "mail.example.com",
            "*.example.com",
            "*.com",
            "*.ample.com",
            "192.0.2.11",
            "192.0.2.0/30",
            "other.example",
        ]
        .iter()
        .map(|t| ServiceSelector::parse(t).unwrap())
        .collect();
        for chosen in 0..selectors.len() {
            for pair in [vec![chosen], vec![chosen, (chosen + 3) % selectors.len()]] {
                let wanted: Vec<ServiceSelector> = pair.iter().map(|i| selectors[*i].clone()).collect();
                let expected: Vec<Icr> =
                    records.iter().filter(|r| wanted.iter().any(|s| s.matches(r))).cloned().collect();
                assert_eq!(accessed(records.clone(), &wanted, LocalFilter::Include), expected, "{wanted:?}");
            }
        }
    }

    /// A DNS record from device .2 to the gateway's own resolver, asking
    /// `first` and then `second`.
    fn lookup(device: &str, first: &str, second: &str, local: bool) -> Icr {
        let mut r = record(device, "192.168.1.1", 53, None, 40);
        let exchange = |qname: &str| Dns { qname: qname.into(), qtype: "A".into(), answers: vec![] };
        r.dns_all = vec![exchange(first), exchange(second)];
        r.dns = r.dns_all.first().cloned();
        r.local = local;
        r
    }

    #[test]
    fn accessed_finds_any_dns_exchange_and_keeps_local_records_as_asked() {
        let records = vec![
            record("10.0.0.2", "192.0.2.10", 443, Some("mail.example.com"), 0),
            lookup("10.0.0.3", "other.example", "Mail.Example.com.", true),
            lookup("10.0.0.4", "other.example", "www.example.com", false),
        ];
        let device = |hits: &[Icr]| hits.iter().map(|r| r.device.ip.unwrap().to_string()).collect::<Vec<_>>();
        let mail = [ServiceSelector::parse("mail.example.com").unwrap()];
        assert_eq!(
            device(&accessed(records.clone(), &mail, LocalFilter::Include)),
            ["10.0.0.2", "10.0.0.3"],
            "by the second exchange"
        );
        assert_eq!(device(&accessed(records.clone(), &mail, LocalFilter::Exclude)), ["10.0.0.2"]);
        assert_eq!(device(&accessed(records.clone(), &mail, LocalFilter::Only)), ["10.0.0.3"]);
        let suffix = [ServiceSelector::parse("*.example.com").unwrap()];
        assert_eq!(
            device(&accessed(records.clone(), &suffix, LocalFilter::Include)),
            ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
        );
        assert_eq!(device(&accessed(records.clone(), &suffix, LocalFilter::Exclude)), ["10.0.0.2", "10.0.0.4"]);
        for selector in suffix.iter().chain(&mail) {
            assert!(selector.matches(&records[1]), "{selector:?} matches as accessed does");
        }
        let resolver = [ServiceSelector::parse("192.168.1.1").unwrap()];
        assert_eq!(device(&accessed(records, &resolver, LocalFilter::Only)), ["10.0.0.3"], "addresses as before");
    }

    #[test]
    fn selectors_name_the_index_keys_that_find_them() {
        let r = record("10.0.0.2", "192.0.2.10", 443, Some("mail.example.com"), 0);
        let prints = crate::store::index::fingerprints_of(&r);
        for text in
            ["mail.example.com", "*.example.com", "*.com", "192.0.2.10", "192.0.2.0/24", "192.0.2.8/29", "192.0.0.0/16"]
        {
            let wanted = ServiceSelector::parse(text).unwrap().index_keys().unwrap();
            assert!(wanted.iter().any(|k| prints.contains(&k.fingerprint())), "{text}");
        }
        assert_eq!(ServiceSelector::parse("192.0.0.0/16").unwrap().index_keys().unwrap().len(), 256);
        assert!(ServiceSelector::parse("10.0.0.0/8").unwrap().index_keys().is_none());
        assert!(ServiceSelector::parse("2001:db8::/44").unwrap().index_keys().is_some());
        for text in ["02:00:00:00:00:17", "10.0.0.2"] {
            assert!(prints.contains(&DeviceSelector::parse(text).index_key().fingerprint()), "{text}");
        }
    }
}
