//! The subscriber directory: who a device belonged to *at the time* of a
//! flow. From a static CSV (`mac,subscriber` and `ip-or-cidr,subscriber`
//! rows), DHCP leases (dnsmasq's leases file, ISC Kea's lease CSV) kept as a
//! history of time-bounded IP→MAC assignments, and optionally the line a
//! device is on (its VLAN ids or PPPoE session).
use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context as _, Result, bail};
use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::record::Icr;

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubscribersSection {
    /// CSV of `mac,subscriber` and `ip-or-cidr,subscriber` rows.
    #[serde(rename = "static", skip_serializing_if = "Option::is_none")]
    pub static_csv: Option<PathBuf>,
    /// dnsmasq's leases file (`expiry mac ip hostname client-id` lines).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dnsmasq_leases: Option<PathBuf>,
    /// ISC Kea's memfile lease CSV (`address,hwaddr,...,valid_lifetime,expire,...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kea_leases: Option<PathBuf>,
    /// Where nothing else names the subscriber, name the line: `vlan`
    /// (`vlan:<outer>.<inner>`) or `pppoe` (`pppoe:<session>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line_id: Option<LineId>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LineId {
    Vlan,
    Pppoe,
}

/// An IP address leased to a MAC for a while.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub ip: IpAddr,
    pub mac: String,
    pub from: DateTime<Utc>,
    pub until: DateTime<Utc>,
}

#[derive(Default)]
pub struct Directory {
    config: SubscribersSection,
    by_mac: HashMap<String, String>,
    by_net: Vec<(IpNet, String)>,
    /// Lease history, oldest first per address.
    leases: Vec<Lease>,
    seen: HashMap<PathBuf, SystemTime>,
}

impl Directory {
    pub fn load(config: &SubscribersSection) -> Result<Self> {
        let mut directory = Self { config: config.clone(), ..Self::default() };
        directory.refresh(Utc::now())?;
        Ok(directory)
    }

    /// Re-reads the sources that changed since the last read.
    pub fn refresh(&mut self, now: DateTime<Utc>) -> Result<()> {
        if let Some(path) = self.config.static_csv.clone()
            && let Some(text) = self.changed(&path)?
        {
            let (by_mac, by_net) = parse_static(&text).with_context(|| format!("in {}", path.display()))?;
            self.by_mac = by_mac;
            self.by_net = by_net;
        }
        if let Some(path) = self.config.dnsmasq_leases.clone()
            && let Some(text) = self.changed(&path)?
        {
            let leases = parse_dnsmasq(&text, now).with_context(|| format!("in {}", path.display()))?;
            self.merge(leases);
        }
        if let Some(path) = self.config.kea_leases.clone()
            && let Some(text) = self.changed(&path)?
        {
            let leases = parse_kea(&text).with_context(|| format!("in {}", path.display()))?;
            self.merge(leases);
        }
        Ok(())
    }

    fn changed(&mut self, path: &Path) -> Result<Option<String>> {
        let modified = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .with_context(|| format!("reading the subscriber source {}", path.display()))?;
        if self.seen.get(path) == Some(&modified) {
            return Ok(None);
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        self.seen.insert(path.to_path_buf(), modified);
        Ok(Some(text))
    }

    /// Adds leases to the history. A lease seen again extends its end; an
    /// address given to another MAC ends the previous holder's lease there.
    pub fn merge(&mut self, leases: Vec<Lease>) {
        for lease in leases {
            let current = self.leases.iter_mut().rev().find(|l| l.ip == lease.ip);
            match current {
                Some(held) if held.mac == lease.mac => {
                    held.until = held.until.max(lease.until);
                    held.from = held.from.min(lease.from);
                }
                Some(held) => {
                    held.until = held.until.min(lease.from);
                    self.leases.push(lease);
                }
                None => self.leases.push(lease),
            }
        }
    }

    /// The MAC that held `ip` at `at`.
    pub fn lease_at(&self, ip: IpAddr, at: DateTime<Utc>) -> Option<&Lease> {
        self.leases.iter().rev().find(|l| l.ip == ip && l.from <= at && at < l.until)
    }

    /// Names closed records as this gateway's: its `probe` id, and each
    /// device's subscriber (the agent's records and a replay's alike).
    pub fn name(&self, records: &mut [Icr], probe: &str) {
        for record in records {
            record.probe = Some(probe.to_string());
            record.device.subscriber = self.subscriber(record);
        }
    }

    /// The subscriber of a record's device at the record's start.
    pub fn subscriber(&self, record: &Icr) -> Option<String> {
        let device = &record.device;
        if let Some(name) = device.mac.as_deref().and_then(|mac| self.by_mac.get(mac)) {
            return Some(name.clone());
        }
        if let Some(ip) = device.ip {
            if let Some(lease) = self.lease_at(ip, record.start)
                && let Some(name) = self.by_mac.get(&lease.mac)
            {
                return Some(name.clone());
            }
            if let Some((_, name)) =
                self.by_net.iter().filter(|(net, _)| net.contains(&ip)).max_by_key(|(net, _)| net.prefix_len())
            {
                return Some(name.clone());
            }
        }
        match self.config.line_id? {
            LineId::Vlan if !device.vlan.is_empty() => {
                Some(format!("vlan:{}", device.vlan.iter().map(u16::to_string).collect::<Vec<_>>().join(".")))
            }
            LineId::Pppoe => device.pppoe_session.map(|session| format!("pppoe:{session}")),
            _ => None,
        }
    }
}

fn normalise_mac(text: &str) -> Option<String> {
    let parts: Vec<&str> = text.trim().split([':', '-']).collect();
    (parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok()))
        .then(|| parts.join(":").to_ascii_lowercase())
}

type StaticMaps = (HashMap<String, String>, Vec<(IpNet, String)>);

/// `mac,subscriber` and `ip-or-cidr,subscriber` rows; `#` comments; an
/// optional header row.
fn parse_static(text: &str) -> Result<StaticMaps> {
    let mut by_mac = HashMap::new();
    let mut by_net = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, name)) = line.split_once(',') else { bail!("line {}: expected `key,subscriber`", index + 1) };
        let (key, name) = (key.trim(), name.trim().to_string());
        if name.is_empty() {
            bail!("line {}: no subscriber", index + 1);
        }
        if let Some(mac) = normalise_mac(key) {
            by_mac.insert(mac, name);
        } else if let Ok(ip) = key.parse::<IpAddr>() {
            by_net.push((IpNet::from(ip), name));
        } else if let Ok(net) = key.parse::<IpNet>() {
            by_net.push((net.trunc(), name));
        } else if index == 0 {
            continue; // a header row
        } else {
            bail!("line {}: {key:?} is neither a MAC nor an IP or CIDR", index + 1);
        }
    }
    Ok((by_mac, by_net))
}

/// dnsmasq: `expiry(epoch) mac ip hostname client-id`; expiry 0 is infinite.
/// The file says when a lease ends, not when it began: a lease first seen
/// now is taken to begin now.
fn parse_dnsmasq(text: &str, now: DateTime<Utc>) -> Result<Vec<Lease>> {
    let mut leases = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() || fields[0] == "duid" {
            continue;
        }
        let [expiry, mac, ip, ..] = fields[..] else { bail!("line {}: too few fields", index + 1) };
        let expiry: i64 = expiry.parse().with_context(|| format!("line {}: bad expiry", index + 1))?;
        let until = if expiry == 0 {
            DateTime::<Utc>::MAX_UTC
        } else {
            DateTime::from_timestamp(expiry, 0).context("expiry out of range")?
        };
        let Some(mac) = normalise_mac(mac) else { continue }; // IPv6 leases carry an IAID here
        let ip = ip.parse().with_context(|| format!("line {}: bad address", index + 1))?;
        leases.push(Lease { ip, mac, from: now.min(until), until });
    }
    Ok(leases)
}

/// Kea memfile CSV: a header naming the columns; `expire - valid_lifetime`
/// is when the lease began.
fn parse_kea(text: &str) -> Result<Vec<Lease>> {
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(text.as_bytes());
    let headers = reader.headers()?.clone();
    let column = |name: &str| headers.iter().position(|h| h == name).with_context(|| format!("no {name} column"));
    let (address, hwaddr, lifetime, expire) =
        (column("address")?, column("hwaddr")?, column("valid_lifetime")?, column("expire")?);
    let state = headers.iter().position(|h| h == "state");
    let mut leases = Vec::new();
    for row in reader.records() {
        let row = row?;
        // State 0 is a live lease (1 declined, 2 expired-reclaimed).
        if state.and_then(|s| row.get(s)).is_some_and(|s| s != "0") {
            continue;
        }
        let Some(mac) = row.get(hwaddr).and_then(normalise_mac) else { continue };
        let ip = row.get(address).unwrap_or_default().parse().context("bad address")?;
        let expire: i64 = row.get(expire).unwrap_or_default().parse().context("bad expire")?;
        let lifetime: i64 = row.get(lifetime).unwrap_or_default().parse().context("bad valid_lifetime")?;
        let until = DateTime::from_timestamp(expire, 0).context("expire out of range")?;
        let from = DateTime::from_timestamp(expire - lifetime, 0).context("start out of range")?;
        leases.push(Lease { ip, mac, from, until });
    }
    Ok(leases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Device, EndReason, Endpoint};

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(s, 0).unwrap()
    }

    fn record(mac: Option<&str>, ip: &str, start: i64) -> Icr {
        Icr {
            id: "x".into(),
            probe: None,
            start: at(start),
            end: at(start + 1),
            end_reason: EndReason::Fin,
            proto: "tcp".into(),
            device: Device { mac: mac.map(str::to_owned), ip: Some(ip.parse().unwrap()), ..Device::default() },
            public: None,
            remote: Endpoint { ip: "192.0.2.1".parse().unwrap(), port: 443 },
            service: None,
            dns: None,
            dns_all: vec![],
            packets_up: 1,
            packets_down: 1,
            bytes_up: 1,
            bytes_down: 1,
            incomplete: false,
            local: false,
        }
    }

    #[test]
    fn static_rows_by_mac_then_the_narrowest_network() {
        let (by_mac, by_net) = parse_static(
            "key,subscriber\n02-00-00-00-00-17, line-0042\n10.0.0.0/8,isp-pool\n10.1.0.0/16,line-7\n# comment\n",
        )
        .unwrap();
        let directory = Directory { by_mac, by_net, ..Directory::default() };
        assert_eq!(
            directory.subscriber(&record(Some("02:00:00:00:00:17"), "10.1.2.3", 0)).as_deref(),
            Some("line-0042")
        );
        assert_eq!(directory.subscriber(&record(None, "10.1.2.3", 0)).as_deref(), Some("line-7"));
        assert_eq!(directory.subscriber(&record(None, "10.2.0.1", 0)).as_deref(), Some("isp-pool"));
        assert_eq!(directory.subscriber(&record(None, "192.168.0.1", 0)), None);
        assert!(parse_static("not-a-key,x\nreally-not,y").is_err());
        assert!(parse_static("02:00:00:00:00:17,").is_err());
    }

    #[test]
    fn records_are_named_with_the_probe_and_their_subscribers() {
        let (by_mac, by_net) = parse_static("10.1.0.0/16,line-7\n").unwrap();
        let directory = Directory { by_mac, by_net, ..Directory::default() };
        let mut records = [record(None, "10.1.2.3", 0), record(None, "192.168.0.1", 0)];
        records[1].device.subscriber = Some("stale".into());
        directory.name(&mut records, "gw-7");
        let named: Vec<_> = records.iter().map(|r| (r.probe.as_deref(), r.device.subscriber.as_deref())).collect();
        assert_eq!(named, [(Some("gw-7"), Some("line-7")), (Some("gw-7"), None)]);
    }

    #[test]
    fn a_lease_change_moves_an_address_between_subscribers() {
        let (by_mac, by_net) = parse_static("02:00:00:00:00:0a,alice\n02:00:00:00:00:0b,bob\n").unwrap();
        let mut directory = Directory { by_mac, by_net, ..Directory::default() };
        // dnsmasq: .50 leased to alice's MAC when first read at t=1000...
        directory.merge(parse_dnsmasq("5000 02:00:00:00:00:0a 192.168.1.50 alice-pc 01:02\n", at(1000)).unwrap());
        // ...and to bob's when read again at t=2000 (alice released it).
        directory.merge(parse_dnsmasq("9000 02:00:00:00:00:0b 192.168.1.50 bob-pc *\n", at(2000)).unwrap());
        let before = record(None, "192.168.1.50", 1500);
        let after = record(None, "192.168.1.50", 2500);
        assert_eq!(directory.subscriber(&before).as_deref(), Some("alice"));
        assert_eq!(directory.subscriber(&after).as_deref(), Some("bob"));
        assert_eq!(directory.subscriber(&record(None, "192.168.1.50", 500)), None, "before any lease");
    }

    #[test]
    fn kea_leases_know_when_they_began() {
        let csv = "address,hwaddr,client_id,valid_lifetime,expire,subnet_id,fqdn_fwd,fqdn_rev,hostname,state,user_context\n\
                   192.168.1.60,02:00:00:00:00:0c,,3600,10000,1,0,0,carol,0,\n\
                   192.168.1.61,02:00:00:00:00:0d,,3600,10000,1,0,0,dave,2,\n";
        let leases = parse_kea(csv).unwrap();
        assert_eq!(leases.len(), 1, "reclaimed leases are skipped");
        assert_eq!((leases[0].from, leases[0].until), (at(6400), at(10000)));
        assert!(parse_kea("address,hwaddr\n1.2.3.4,02:00:00:00:00:01\n").is_err(), "columns missing");
    }

    #[test]
    fn lines_by_vlan_or_pppoe() {
        let mut r = record(None, "10.9.9.9", 0);
        r.device.vlan = vec![100, 20];
        r.device.pppoe_session = Some(0x1234);
        let vlan = Directory {
            config: SubscribersSection { line_id: Some(LineId::Vlan), ..Default::default() },
            ..Directory::default()
        };
        assert_eq!(vlan.subscriber(&r).as_deref(), Some("vlan:100.20"));
        let pppoe = Directory {
            config: SubscribersSection { line_id: Some(LineId::Pppoe), ..Default::default() },
            ..Directory::default()
        };
        assert_eq!(pppoe.subscriber(&r).as_deref(), Some("pppoe:4660"));
    }
}
