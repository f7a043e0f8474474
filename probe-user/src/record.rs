//! The Internet Connection Record: the one thing the probe keeps. Its JSON
//! form is a contract (`docs/record-format.md`): fields may be added, none
//! renamed. No payload, URL, path or query string ever has a field here.
use std::net::{IpAddr, SocketAddr};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Icr {
    /// UUIDv7: time-ordered, unique across restarts.
    pub id: String,
    /// The gateway that saw it (the configuration's `probe_id`).
    #[serde(default)]
    pub probe: Option<String>,
    #[serde(with = "micros")]
    pub start: DateTime<Utc>,
    #[serde(with = "micros")]
    pub end: DateTime<Utc>,
    pub end_reason: EndReason,
    pub proto: String,
    pub device: Device,
    pub public: Option<Endpoint>,
    pub remote: Endpoint,
    pub service: Option<Service>,
    /// Only on records of DNS traffic: the flow's first exchange, which is
    /// also `dns_all`'s first.
    pub dns: Option<Dns>,
    /// Every DNS exchange of the flow, in order; `null` in JSON when there
    /// is none, and read as none from NDJSON written before the field.
    #[serde(default, with = "null_when_empty")]
    pub dns_all: Vec<Dns>,
    pub packets_up: u64,
    pub packets_down: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub incomplete: bool,
    /// The exchange never left the gateway (a device and the gateway's own
    /// resolver, say): such records have no `public` end.
    #[serde(default)]
    pub local: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndReason {
    // The numbers are the stored form (store::codec): never renumber.
    Fin = 0,
    Rst = 1,
    Idle = 2,
    Active = 3,
    Shutdown = 4,
}

impl TryFrom<u8> for EndReason {
    type Error = anyhow::Error;

    /// From the stored number.
    fn try_from(number: u8) -> anyhow::Result<Self> {
        Ok(match number {
            0 => Self::Fin,
            1 => Self::Rst,
            2 => Self::Idle,
            3 => Self::Active,
            4 => Self::Shutdown,
            other => anyhow::bail!("unknown end reason {other}"),
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Device {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub port: Option<u16>,
    /// Outer to inner VLAN ids; empty when untagged.
    #[serde(default)]
    pub vlan: Vec<u16>,
    #[serde(default)]
    pub pppoe_session: Option<u16>,
    #[serde(default)]
    pub subscriber: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
}

impl ServiceSource {
    /// The record's spelling (`tls_sni`, `quic_sni`, `http_host`, `dns`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TlsSni => "tls_sni",
            Self::QuicSni => "quic_sni",
            Self::HttpHost => "http_host",
            Self::Dns => "dns",
        }
    }
}

impl TryFrom<u8> for ServiceSource {
    type Error = anyhow::Error;

    /// From the stored number.
    fn try_from(number: u8) -> anyhow::Result<Self> {
        Ok(match number {
            0 => Self::TlsSni,
            1 => Self::QuicSni,
            2 => Self::HttpHost,
            3 => Self::Dns,
            other => anyhow::bail!("unknown service source {other}"),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub source: ServiceSource,
    /// The ClientHello used Encrypted Client Hello: `name` is the outer,
    /// public name, not the service the user reached.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ech: bool,
    /// With `source: dns`, the exchange that named it.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<DnsOrigin>,
}

impl Service {
    /// A name the connection carried itself (SNI, Host).
    pub fn carried(name: String, source: ServiceSource, ech: bool) -> Self {
        Self { name, source, ech, origin: None }
    }
}

/// The DNS exchange a `source: dns` name came from: when the answer was
/// seen and which resolver sent it, so an analyst can find and check it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsOrigin {
    #[serde(with = "micros")]
    pub dns_at: DateTime<Utc>,
    /// `ip:port` (`[v6]:port`).
    pub resolver: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceSource {
    // The numbers are the stored form (store::codec): never renumber.
    TlsSni = 0,
    QuicSni = 1,
    HttpHost = 2,
    Dns = 3,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    pub qname: String,
    pub qtype: String,
    pub answers: Vec<String>,
}

/// Makes record ids: UUIDv7 (RFC 9562) whose time is the record's start, so
/// ids sort like records, and whose 74 other bits are 42 random bits drawn
/// once per generator followed by a 32-bit counter (RFC 9562 §6.2, method 1).
/// Unique across restarts (a new random part each time), and consecutive ids
/// differ only in their counter, which the store's delta coding makes nearly
/// free where random bits would cost 9 bytes a record.
pub struct RecordIds {
    node: u64,
    counter: u32,
}

impl Default for RecordIds {
    fn default() -> Self {
        Self { node: random_node(), counter: 0 }
    }
}

impl RecordIds {
    pub fn next(&mut self, start: &DateTime<Utc>) -> String {
        let millis = u128::from(start.timestamp_millis().max(0) as u64 & ((1 << 48) - 1));
        let random = (u128::from(self.node) << 32) | u128::from(self.counter);
        let (rand_a, rand_b) = (random >> 62, random & ((1 << 62) - 1));
        let id = (millis << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b;
        self.counter = self.counter.wrapping_add(1);
        if self.counter == 0 {
            self.node = random_node();
        }
        uuid::Uuid::from_u128(id).to_string()
    }
}

fn random_node() -> u64 {
    (uuid::Uuid::new_v4().as_u128() as u64) & ((1 << 42) - 1)
}

/// RFC 3339 in UTC with microseconds, as the format requires.
pub fn format_time(time: &DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A list that the contract writes as `null` when it is empty (as every
/// other field that does not apply), and that reads `null` or an absent
/// field as empty.
mod null_when_empty {
    use super::*;

    pub fn serialize<S: Serializer, T: Serialize>(items: &[T], s: S) -> Result<S::Ok, S::Error> {
        if items.is_empty() { s.serialize_none() } else { s.collect_seq(items) }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
        Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
    }
}

pub(crate) mod micros {
    use super::*;

    pub fn serialize<S: Serializer>(time: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_time(time))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text).map(|t| t.with_timezone(&Utc)).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Icr {
        Icr {
            id: "0192f1c4-0000-7000-8000-000000000001".into(),
            probe: None,
            start: DateTime::parse_from_rfc3339("2026-11-22T15:02:00.123456Z").unwrap().into(),
            end: DateTime::parse_from_rfc3339("2026-11-22T15:04:59.000001Z").unwrap().into(),
            end_reason: EndReason::Fin,
            proto: probe_common::Proto::Tcp.to_string(),
            device: Device {
                mac: Some(probe_common::Mac([2, 0, 0, 0, 0, 0x17]).to_string()),
                ip: Some("192.168.1.23".parse().unwrap()),
                port: Some(51544),
                ..Device::default()
            },
            public: Some(Endpoint { ip: "62.25.96.1".parse().unwrap(), port: 10007 }),
            remote: Endpoint { ip: "216.239.32.10".parse().unwrap(), port: 443 },
            service: None,
            dns: None,
            dns_all: vec![],
            packets_up: 12,
            packets_down: 15,
            bytes_up: 1840,
            bytes_down: 9120,
            incomplete: false,
            local: false,
        }
    }

    /// The field paths of a JSON value (`device.mac`, `dns_all.qname`).
    fn field_paths(value: &serde_json::Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, inner) in map {
                    let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                    field_paths(inner, &path, out);
                    out.insert(path);
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|item| field_paths(item, prefix, out)),
            _ => {}
        }
    }

    /// docs/record-format.md and the record agree: every field the contract
    /// shows is one the record has, and every field the record writes is
    /// shown there (or, for fields written only sometimes, named in its
    /// comments).
    #[test]
    fn the_record_format_document_and_the_record_agree() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/record-format.md")).unwrap();
        let block = doc.split("```json\n").nth(1).and_then(|rest| rest.split("```").next()).expect("a json block");
        let (mut code, mut comments) = (String::new(), String::new());
        for line in block.lines() {
            let (before, comment) = line.split_once("//").unwrap_or((line, ""));
            code.push_str(before);
            code.push('\n');
            comments.push_str(comment);
        }
        let shown: serde_json::Value =
            serde_json::from_str(&code).expect("the contract's example is JSON once its comments go");
        let mut documented = std::collections::BTreeSet::new();
        field_paths(&shown, "", &mut documented);

        let mut full = sample();
        full.probe = Some("gw-07".into());
        full.device.vlan = vec![100, 20];
        full.device.pppoe_session = Some(7);
        full.device.subscriber = Some("line-0042".into());
        full.service = Some(Service {
            origin: Some(DnsOrigin { dns_at: full.start, resolver: "192.0.2.53:53".parse().unwrap() }),
            ..Service::carried("mail.example.com".into(), ServiceSource::Dns, true)
        });
        let exchange =
            Dns { qname: "mail.example.com".into(), qtype: "A".into(), answers: vec!["216.239.32.10".into()] };
        full.dns = Some(exchange.clone());
        full.dns_all = vec![exchange];
        let mut written = std::collections::BTreeSet::new();
        field_paths(&serde_json::to_value(&full).unwrap(), "", &mut written);

        let missing: Vec<&String> = documented.difference(&written).collect();
        assert!(missing.is_empty(), "the contract shows fields the record does not have: {missing:?}");
        let unshown: Vec<&String> = written
            .difference(&documented)
            .filter(|path| !comments.contains(&format!("\"{}\"", path.rsplit('.').next().unwrap())))
            .collect();
        assert!(unshown.is_empty(), "the record writes fields docs/record-format.md does not name: {unshown:?}");
    }

    #[test]
    fn json_uses_the_contract_field_names() {
        let json: serde_json::Value = serde_json::to_value(sample()).unwrap();
        assert_eq!(json["start"], "2026-11-22T15:02:00.123456Z");
        assert_eq!(json["end_reason"], "fin");
        assert_eq!(json["proto"], "tcp");
        assert_eq!(json["device"]["mac"], "02:00:00:00:00:17");
        assert_eq!(json["device"]["vlan"], serde_json::json!([]));
        assert_eq!(json["device"]["pppoe_session"], serde_json::Value::Null);
        assert_eq!(json["public"]["port"], 10007);
        assert_eq!(json["remote"]["ip"], "216.239.32.10");
        assert_eq!(json["service"], serde_json::Value::Null);
        assert_eq!(json["bytes_down"], 9120);
        assert_eq!(json["incomplete"], false);
        assert_eq!(json["dns_all"], serde_json::Value::Null);
        assert_eq!(json["local"], false);
    }

    #[test]
    fn dns_all_is_null_when_empty_and_absent_in_older_ndjson() {
        let mut record = sample();
        let exchange = |qname: &str| Dns { qname: qname.into(), qtype: "A".into(), answers: vec!["192.0.2.1".into()] };
        record.dns = Some(exchange("a.example"));
        record.dns_all = vec![exchange("a.example"), exchange("b.example")];
        record.local = true;
        record.public = None;
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["dns_all"][1]["qname"], "b.example");
        assert_eq!(json["dns_all"][0]["answers"], serde_json::json!(["192.0.2.1"]));
        assert_eq!(json["local"], true);
        assert_eq!(json["public"], serde_json::Value::Null);
        assert_eq!(serde_json::from_value::<Icr>(json).unwrap(), record);
        // Written before the fields existed: no exchanges listed, not local.
        let mut old = serde_json::to_value(sample()).unwrap();
        let fields = old.as_object_mut().unwrap();
        fields.remove("dns_all");
        fields.remove("local");
        assert_eq!(serde_json::from_value::<Icr>(old).unwrap(), sample());
    }

    #[test]
    fn json_round_trips() {
        let record = sample();
        let text = serde_json::to_string(&record).unwrap();
        assert_eq!(serde_json::from_str::<Icr>(&text).unwrap(), record);
    }

    #[test]
    fn record_ids_are_v7_time_ordered_and_unique() {
        let mut ids = RecordIds::default();
        let start: DateTime<Utc> = DateTime::parse_from_rfc3339("2026-11-22T15:02:00.123456Z").unwrap().into();
        let a = uuid::Uuid::parse_str(&ids.next(&start)).unwrap();
        let b = uuid::Uuid::parse_str(&ids.next(&start)).unwrap();
        let later = uuid::Uuid::parse_str(&ids.next(&(start + chrono::Duration::milliseconds(1)))).unwrap();
        assert_eq!(a.get_version_num(), 7);
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        assert_ne!(a, b);
        assert!(a < b && b < later);
        let (secs, nanos) = a.get_timestamp().unwrap().to_unix();
        assert_eq!((secs, nanos), (start.timestamp() as u64, 123_000_000));
        let other = uuid::Uuid::parse_str(&RecordIds::default().next(&start)).unwrap();
        assert_ne!(a, other, "another generator draws another random part");
    }

    #[test]
    fn service_sources_are_snake_case() {
        let service = Service::carried("mail.example.com".into(), ServiceSource::TlsSni, false);
        assert_eq!(serde_json::to_value(service).unwrap()["source"], "tls_sni");
        for number in 0..=3 {
            let source = ServiceSource::try_from(number).unwrap();
            assert_eq!(serde_json::to_value(source).unwrap(), source.as_str(), "as_str spells it as the record does");
        }
    }
}
