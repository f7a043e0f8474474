//! Records and gap entries as ClickHouse rows, in the column types both
//! 18.16 and current releases have: times as microseconds (no DateTime64),
//! addresses as 16 bytes (IPv4 mapped; no IPv6 type), absent texts as ''.
//! A row reads back as the record it was made from.
use std::net::{IpAddr, Ipv6Addr};

use anyhow::{Context as _, Result, anyhow, bail};
use chrono::{DateTime, NaiveDate, Utc};
use clickhouse::Row;
use serde::{Deserialize, Serialize};

use crate::{
    capture::hints::{dns, normalise_name},
    record::{Device, Dns, DnsOrigin, EndReason, Endpoint, Icr, Service, ServiceSource},
    store::{
        gaps::{Gap, LossKind},
        rollup::{ServiceKey, ServiceUse},
    },
};

/// One record: the columns of `records_local` (ordered for question 1), in
/// their order. The narrow tables of questions 2 and 3 hold only their key
/// and the record's `(public_ip, public_port)` ([`super::schema`]).
/// Compact where the record allows: the id and the MAC as their bytes, the
/// first DNS exchange only once (it is `dns_all`'s first, as in the store).
#[derive(Clone, Debug, PartialEq, Row, Serialize, Deserialize)]
pub struct RecordRow {
    /// Days since 1970-01-01 (ClickHouse `Date`): the day partition.
    pub day: u16,
    /// The UUID's 16 bytes.
    pub id: [u8; 16],
    pub probe: String,
    pub start_us: i64,
    pub end_us: i64,
    pub end_reason: u8,
    pub proto: String,
    pub device_mac: Option<[u8; 6]>,
    pub device_ip: Option<[u8; 16]>,
    pub device_port: Option<u16>,
    pub vlan: Vec<u16>,
    pub pppoe_session: Option<u16>,
    pub subscriber: String,
    /// All zero when the exchange never left the gateway.
    pub public_ip: [u8; 16],
    pub public_port: u16,
    pub remote_ip: [u8; 16],
    pub remote_port: u16,
    pub service_name: String,
    /// 0 none, else the [`ServiceSource`] + 1.
    pub service_source: u8,
    pub service_ech: u8,
    /// Every DNS exchange, one array element each; the first is the
    /// record's `dns`. Parallel arrays, so question 3 tests the names alone
    /// with `has`/`arrayExists`, which 18.16 has.
    pub dns_all_qname: Vec<String>,
    pub dns_all_qtype: Vec<String>,
    pub dns_all_answers: Vec<Vec<String>>,
    pub packets_up: u64,
    pub packets_down: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub incomplete: u8,
    pub local: u8,
    /// With `service_source` dns: the answer's time (0: none) and the
    /// resolver (`ip:port`, '' none) of the exchange that named it.
    pub service_dns_at_us: i64,
    pub service_resolver: String,
}

/// The column list of [`RecordRow`], for `CREATE TABLE` and `SELECT`.
pub const RECORD_COLUMNS: &[(&str, &str)] = &[
    ("day", "Date"),
    ("id", "FixedString(16)"),
    ("probe", "String"),
    ("start_us", "Int64"),
    ("end_us", "Int64"),
    ("end_reason", "UInt8"),
    ("proto", "String"),
    ("device_mac", "Nullable(FixedString(6))"),
    ("device_ip", "Nullable(FixedString(16))"),
    ("device_port", "Nullable(UInt16)"),
    ("vlan", "Array(UInt16)"),
    ("pppoe_session", "Nullable(UInt16)"),
    ("subscriber", "String"),
    ("public_ip", "FixedString(16)"),
    ("public_port", "UInt16"),
    ("remote_ip", "FixedString(16)"),
    ("remote_port", "UInt16"),
    ("service_name", "String"),
    ("service_source", "UInt8"),
    ("service_ech", "UInt8"),
    ("dns_all_qname", "Array(String)"),
    ("dns_all_qtype", "Array(String)"),
    ("dns_all_answers", "Array(Array(String))"),
    ("packets_up", "UInt64"),
    ("packets_down", "UInt64"),
    ("bytes_up", "UInt64"),
    ("bytes_down", "UInt64"),
    ("incomplete", "UInt8"),
    ("local", "UInt8"),
    ("service_dns_at_us", "Int64"),
    ("service_resolver", "String"),
];

/// Why a record cannot become a row.
#[derive(Debug, thiserror::Error)]
pub enum Unrowable {
    #[error("its id {0:?} is not a UUID")]
    Id(String),
    #[error("its MAC {0:?} is not a MAC address")]
    Mac(String),
    #[error(transparent)]
    Dns(#[from] crate::store::codec::InconsistentDns),
    #[error("{0} is outside ClickHouse's Date range (1970 to 2149)")]
    Day(DateTime<Utc>),
}

/// An address as ClickHouse keeps it.
pub fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn ip_of(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// The day partition of a time.
pub fn day_number(time: DateTime<Utc>) -> Result<u16, Unrowable> {
    let days = time.date_naive().signed_duration_since(NaiveDate::default()).num_days();
    u16::try_from(days).map_err(|_| Unrowable::Day(time))
}

fn text(value: Option<&str>) -> String {
    value.unwrap_or_default().to_string()
}

fn optional(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

impl RecordRow {
    /// The row of a record as the store keeps it (its id a UUID, its `dns`
    /// the first of `dns_all`).
    pub fn of(record: &Icr) -> Result<Self, Unrowable> {
        crate::store::codec::consistent_dns(record)?;
        let service = record.service.as_ref();
        let mac = match record.device.mac.as_deref() {
            None => None,
            // Only as capture writes it, so that it reads back the same.
            Some(text) => match text.parse::<probe_common::Mac>() {
                Ok(mac) if mac.to_string() == text => Some(mac.0),
                _ => return Err(Unrowable::Mac(text.to_string())),
            },
        };
        Ok(Self {
            day: day_number(record.start)?,
            id: *uuid::Uuid::parse_str(&record.id).map_err(|_| Unrowable::Id(record.id.clone()))?.as_bytes(),
            probe: text(record.probe.as_deref()),
            start_us: record.start.timestamp_micros(),
            end_us: record.end.timestamp_micros(),
            end_reason: record.end_reason as u8,
            proto: record.proto.clone(),
            device_mac: mac,
            device_ip: record.device.ip.map(ip_bytes),
            device_port: record.device.port,
            vlan: record.device.vlan.clone(),
            pppoe_session: record.device.pppoe_session,
            subscriber: text(record.device.subscriber.as_deref()),
            public_ip: record.public.map_or([0; 16], |p| ip_bytes(p.ip)),
            public_port: record.public.map_or(0, |p| p.port),
            remote_ip: ip_bytes(record.remote.ip),
            remote_port: record.remote.port,
            service_name: text(service.map(|s| s.name.as_str())),
            service_source: service.map_or(0, |s| s.source as u8 + 1),
            service_ech: service.map_or(0, |s| u8::from(s.ech)),
            dns_all_qname: record.dns_all.iter().map(|d| d.qname.clone()).collect(),
            dns_all_qtype: record.dns_all.iter().map(|d| d.qtype.clone()).collect(),
            dns_all_answers: record.dns_all.iter().map(|d| d.answers.clone()).collect(),
            packets_up: record.packets_up,
            packets_down: record.packets_down,
            bytes_up: record.bytes_up,
            bytes_down: record.bytes_down,
            incomplete: u8::from(record.incomplete),
            local: u8::from(record.local),
            service_dns_at_us: service.and_then(|s| s.origin).map_or(0, |o| o.dns_at.timestamp_micros()),
            service_resolver: service.and_then(|s| s.origin).map(|o| o.resolver.to_string()).unwrap_or_default(),
        })
    }

    /// The record's id, as it is written.
    pub fn id_text(&self) -> String {
        uuid::Uuid::from_bytes(self.id).to_string()
    }

    /// The record this row holds, once it is checked as a captured one is
    /// made: anyone who could write the cluster could have written it.
    pub fn into_icr(self) -> Result<Icr> {
        self.check()?;
        let id = self.id_text();
        let time = |us: i64| DateTime::from_timestamp_micros(us).ok_or_else(|| anyhow!("time {us} µs is out of range"));
        let end_reason = EndReason::try_from(self.end_reason).with_context(|| format!("record {id}"))?;
        let source = match self.service_source {
            0 => None,
            stored => Some(ServiceSource::try_from(stored - 1).with_context(|| format!("record {id}"))?),
        };
        let origin = match (self.service_dns_at_us, optional(self.service_resolver)) {
            (0, None) => None,
            (at, Some(resolver)) => Some(DnsOrigin {
                dns_at: time(at).with_context(|| format!("record {id}"))?,
                resolver: resolver.parse().with_context(|| format!("record {id}: resolver {resolver:?}"))?,
            }),
            (_, None) => bail!("record {id}: a DNS answer's time without its resolver"),
        };
        let service = match (optional(self.service_name), source) {
            (Some(name), Some(source)) => {
                Some(Service { origin, ..Service::carried(name, source, self.service_ech != 0) })
            }
            _ => None,
        };
        let count = self.dns_all_qname.len();
        if self.dns_all_qtype.len() != count || self.dns_all_answers.len() != count {
            bail!("record {id}: its dns_all arrays differ in length");
        }
        let dns_all: Vec<Dns> = self
            .dns_all_qname
            .into_iter()
            .zip(self.dns_all_qtype)
            .zip(self.dns_all_answers)
            .map(|((qname, qtype), answers)| Dns { qname, qtype, answers })
            .collect();
        Ok(Icr {
            start: time(self.start_us).with_context(|| format!("record {id}"))?,
            end: time(self.end_us).with_context(|| format!("record {id}"))?,
            id,
            probe: optional(self.probe),
            end_reason,
            proto: self.proto,
            device: Device {
                mac: self.device_mac.map(|mac| probe_common::Mac(mac).to_string()),
                ip: self.device_ip.map(ip_of),
                port: self.device_port,
                vlan: self.vlan,
                pppoe_session: self.pppoe_session,
                subscriber: optional(self.subscriber),
            },
            public: (self.public_ip != [0; 16]).then(|| Endpoint { ip: ip_of(self.public_ip), port: self.public_port }),
            remote: Endpoint { ip: ip_of(self.remote_ip), port: self.remote_port },
            service,
            dns: dns_all.first().cloned(),
            dns_all,
            packets_up: self.packets_up,
            packets_down: self.packets_down,
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            incomplete: self.incomplete != 0,
            local: self.local != 0,
        })
    }
}

/// A row read back that no gateway could have written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the cluster holds a row that is no valid record (id {id:?}): its {field} {value:?} is {why}; it is not answered"
)]
pub struct InvalidRow {
    pub id: String,
    pub field: &'static str,
    /// The value, cut short (it is shown escaped).
    pub value: String,
    pub why: &'static str,
}

/// The longest free text (probe, subscriber) a row may hold.
const MAX_TEXT: usize = 255;

impl RecordRow {
    /// Checks each text column as capture makes it: names through the same
    /// normaliser, addresses as typed values written back in their one
    /// spelling, free texts without control characters. (The id and the MAC
    /// are bytes: any value is one.)
    fn check(&self) -> Result<(), InvalidRow> {
        let row = Checked { id: self.id };
        row.service_use(&self.proto, &self.service_name, self.service_source, self.start_us, self.end_us)?;
        for (field, text) in [("probe", &self.probe), ("subscriber", &self.subscriber)] {
            if text.len() > MAX_TEXT || text.chars().any(char::is_control) {
                return Err(row.refuse(field, text, "too long or holds control characters"));
            }
        }
        for qname in &self.dns_all_qname {
            row.dns_name("dns qname", qname)?;
        }
        for qtype in &self.dns_all_qtype {
            if qtype.is_empty()
                || qtype.len() > 10
                || !qtype.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
            {
                return Err(row.refuse("dns qtype", qtype, "not a DNS type"));
            }
        }
        for answer in self.dns_all_answers.iter().flatten() {
            let address = answer.parse::<IpAddr>().ok().map(|ip| ip.to_string());
            if address.as_deref() != Some(answer.as_str()) {
                row.dns_name("dns answer", answer)?;
            }
        }
        Ok(())
    }
}

/// The checks of a row's columns, by the row's id.
struct Checked {
    id: [u8; 16],
}

impl Checked {
    fn refuse(&self, field: &'static str, value: &str, why: &'static str) -> InvalidRow {
        InvalidRow {
            id: uuid::Uuid::from_bytes(self.id).to_string(),
            field,
            value: value.chars().take(80).collect(),
            why,
        }
    }

    fn canonical(
        &self,
        field: &'static str,
        value: &str,
        made: Option<String>,
        why: &'static str,
    ) -> Result<(), InvalidRow> {
        match made {
            Some(made) if made == value => Ok(()),
            _ => Err(self.refuse(field, value, why)),
        }
    }

    /// Names from DNS keep every octet, escaped (RFC 1035 presentation form).
    fn dns_name(&self, field: &'static str, value: &str) -> Result<(), InvalidRow> {
        match dns::is_presentation(value) {
            true => Ok(()),
            false => Err(self.refuse(field, value, "not a DNS name as capture writes one")),
        }
    }

    /// The columns question 2 reads ([`ServiceUseRow`]), as capture makes them.
    fn service_use(
        &self,
        proto: &str,
        service_name: &str,
        service_source: u8,
        start_us: i64,
        end_us: i64,
    ) -> Result<(), InvalidRow> {
        let made = proto.parse::<probe_common::Proto>().ok().map(|p| p.to_string());
        self.canonical("proto", proto, made, "not a protocol")?;
        if !service_name.is_empty() {
            match service_source.checked_sub(1).map(ServiceSource::try_from) {
                Some(Ok(ServiceSource::Dns)) => self.dns_name("service_name", service_name)?,
                _ => self.canonical(
                    "service_name",
                    service_name,
                    normalise_name(service_name.as_bytes()),
                    "not a name as capture writes one",
                )?,
            }
        }
        if end_us < start_us {
            return Err(self.refuse("end_us", &end_us.to_string(), "before its start"));
        }
        Ok(())
    }
}

/// What question 2 reads of a record ([`Services`](crate::store::rollup::Services)): its service or remote
/// end, times, bytes and mark. Read instead of the whole row, whose DNS
/// exchanges are most of its bytes.
#[derive(Clone, Debug, PartialEq, Row, Deserialize)]
pub struct ServiceUseRow {
    pub id: [u8; 16],
    pub start_us: i64,
    pub end_us: i64,
    pub proto: String,
    pub remote_ip: [u8; 16],
    pub remote_port: u16,
    pub service_name: String,
    pub service_source: u8,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub incomplete: u8,
}

/// The columns of [`ServiceUseRow`], in its order.
pub const SERVICE_USE_COLUMNS: &[&str] = &[
    "id",
    "start_us",
    "end_us",
    "proto",
    "remote_ip",
    "remote_port",
    "service_name",
    "service_source",
    "bytes_up",
    "bytes_down",
    "incomplete",
];

impl ServiceUseRow {
    /// What the record adds to its device's services (as
    /// `Services::add_record` takes it from its [`Icr`]), checked as [`RecordRow::into_icr`] checks it.
    pub fn into_use(self) -> Result<(ServiceKey, ServiceUse)> {
        Checked { id: self.id }.service_use(
            &self.proto,
            &self.service_name,
            self.service_source,
            self.start_us,
            self.end_us,
        )?;
        let id = uuid::Uuid::from_bytes(self.id);
        for us in [self.start_us, self.end_us] {
            DateTime::from_timestamp_micros(us).ok_or_else(|| anyhow!("record {id}: time {us} µs is out of range"))?;
        }
        let source = match self.service_source {
            0 => None,
            stored => Some(ServiceSource::try_from(stored - 1).with_context(|| format!("record {id}"))?),
        };
        let proto = self.proto.parse::<probe_common::Proto>().map_or(0, u8::from);
        let remote = (ip_of(self.remote_ip), self.remote_port);
        let key = match (self.service_name.is_empty(), source) {
            (false, Some(_)) => ServiceKey::Name(self.service_name),
            _ => ServiceKey::Remote(remote.0, remote.1, proto),
        };
        let used = ServiceUse {
            first_us: self.start_us,
            last_us: self.end_us,
            connections: 1,
            bytes: self.bytes_up.saturating_add(self.bytes_down),
            incomplete: self.incomplete != 0,
            remote,
            proto,
        };
        Ok((key, used))
    }
}

/// One gap entry of one gateway. An episode that grows is shipped again
/// with a later `to_us`; readers keep the longest.
#[derive(Clone, Debug, PartialEq, Row, Serialize, Deserialize)]
pub struct GapRow {
    pub day: u16,
    pub probe: String,
    pub from_us: i64,
    pub to_us: i64,
    pub kind: u8,
    pub count: u64,
}

pub const GAP_COLUMNS: &[(&str, &str)] = &[
    ("day", "Date"),
    ("probe", "String"),
    ("from_us", "Int64"),
    ("to_us", "Int64"),
    ("kind", "UInt8"),
    ("count", "UInt64"),
];

impl GapRow {
    pub fn of(gap: &Gap, probe: &str) -> Result<Self> {
        Ok(Self {
            day: day_number(gap.from)?,
            probe: probe.to_string(),
            from_us: gap.from.timestamp_micros(),
            to_us: gap.to.timestamp_micros(),
            kind: gap.kind as u8,
            count: gap.count,
        })
    }

    pub fn into_gap(self) -> Result<Gap> {
        let kind = LossKind::ALL
            .into_iter()
            .find(|kind| *kind as u8 == self.kind)
            .ok_or_else(|| anyhow!("unknown loss kind {}", self.kind))?;
        let time = |us: i64| DateTime::from_timestamp_micros(us).ok_or_else(|| anyhow!("time {us} µs is out of range"));
        let mut gap = Gap::new(kind, time(self.from_us)?, time(self.to_us)?, self.count);
        if !self.probe.is_empty() {
            gap.place = format!("{} (gateway {})", gap.place, self.probe);
        }
        Ok(gap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_records::samples;

    #[test]
    fn rows_read_back_as_the_records_they_were_made_from() {
        let mut records = samples(200);
        records[3].probe = Some("gw-07".into());
        records[4].public = None;
        records[5].dns =
            Some(Dns { qname: "a.example".into(), qtype: "AAAA".into(), answers: vec!["2001:db8::1".into()] });
        records[6].service = Some(Service::carried("ech.example".into(), ServiceSource::QuicSni, true));
        records[5].dns_all = vec![records[5].dns.clone().unwrap()];
        records[7].device = Device { vlan: vec![100, 20], pppoe_session: Some(7), ..Device::default() };
        assert!(
            records.iter().any(|r| r.dns_all.len() > 1) && records.iter().any(|r| r.local),
            "the samples have both"
        );
        for record in &records {
            assert_eq!(&RecordRow::of(record).unwrap().into_icr().unwrap(), record);
        }
        let dns = records.iter().find(|r| r.dns_all.len() > 1).unwrap();
        let mut bad = RecordRow::of(dns).unwrap();
        bad.dns_all_qtype.pop();
        assert!(bad.into_icr().is_err(), "arrays of different lengths are an error, not a panic");
        assert!(day_number(DateTime::from_timestamp(-1, 0).unwrap()).is_err(), "before 1970");
    }

    #[test]
    fn a_row_keeps_the_id_and_mac_as_bytes_and_the_first_exchange_once() {
        let mut record = samples(1).remove(0);
        record.id = "0192f1c4-5e6f-7a00-8b00-0000000000ff".into();
        record.device.mac = Some("02:1c:00:0a:0b:0c".into());
        let exchange = |qname: &str| Dns { qname: qname.into(), qtype: "A".into(), answers: vec!["192.0.2.1".into()] };
        record.dns_all = vec![exchange("a.example"), exchange("b.example")];
        record.dns = Some(exchange("a.example"));
        let row = RecordRow::of(&record).unwrap();
        assert_eq!(row.id, [0x01, 0x92, 0xf1, 0xc4, 0x5e, 0x6f, 0x7a, 0, 0x8b, 0, 0, 0, 0, 0, 0, 0xff]);
        assert_eq!(row.device_mac, Some([2, 0x1c, 0, 10, 11, 12]));
        assert_eq!(row.dns_all_qname, ["a.example", "b.example"], "the first exchange once, in dns_all");
        assert_eq!(row.clone().into_icr().unwrap(), record);
        // No MAC is NULL, not a MAC of zeros.
        record.device.mac = None;
        assert_eq!(RecordRow::of(&record).unwrap().device_mac, None);
        // What the store would refuse is refused here too, named, never a panic.
        let mut odd = record.clone();
        odd.id = "line-7".into();
        assert!(matches!(RecordRow::of(&odd), Err(Unrowable::Id(id)) if id == "line-7"));
        let mut odd = record.clone();
        odd.device.mac = Some("02-1c-00-0a-0b-0c".into());
        assert!(matches!(RecordRow::of(&odd), Err(Unrowable::Mac(_))));
        let mut odd = record;
        odd.dns = Some(exchange("b.example"));
        assert!(matches!(RecordRow::of(&odd), Err(Unrowable::Dns(_))));
    }

    #[test]
    fn a_row_no_gateway_could_write_is_reported_not_returned() {
        let mut record = samples(1).remove(0);
        record.service = Some(Service::carried("-2.example.test".into(), ServiceSource::TlsSni, false));
        record.dns = Some(Dns {
            qname: "a.example".into(),
            qtype: "A".into(),
            answers: vec!["192.0.2.1".into(), "cdn.example".into()],
        });
        record.dns_all = vec![record.dns.clone().unwrap()];
        record.device.mac = Some("02:00:00:00:00:17".into());
        let good = RecordRow::of(&record).unwrap();
        assert_eq!(good.clone().into_icr().unwrap(), record, "a captured name such as -2.example.test is a name");
        type Forgery = (&'static str, fn(&mut RecordRow));
        let forged: [Forgery; 8] = [
            ("service_name", |r| r.service_name = "=HYPERLINK(\"http://x/\",\"a\")".into()),
            ("service_name", |r| r.service_name = "A.Example".into()),
            ("dns qname", |r| r.dns_all_qname[0] = "a.example\u{1b}[2J".into()),
            ("dns qtype", |r| r.dns_all_qtype[0] = "a\n".into()),
            ("dns answer", |r| r.dns_all_answers[0][1] = "+cmd|' /C calc'!A0".into()),
            ("dns answer", |r| r.dns_all_answers[0][0] = "::FFFF:192.0.2.1".into()),
            ("proto", |r| r.proto = "tcp\u{7}".into()),
            ("subscriber", |r| r.subscriber = "line\r\n7".into()),
        ];
        for (field, forge) in forged {
            let mut row = good.clone();
            forge(&mut row);
            let refused = row.check().expect_err(field);
            assert_eq!(refused.field, field, "{refused}");
            let message = format!("{:#}", row.into_icr().unwrap_err());
            assert!(!message.chars().any(char::is_control), "the report escapes what it shows: {message}");
        }
    }

    /// The narrow row question 2 reads, made from a record's full row.
    fn service_use_row(row: &RecordRow) -> ServiceUseRow {
        ServiceUseRow {
            id: row.id,
            start_us: row.start_us,
            end_us: row.end_us,
            proto: row.proto.clone(),
            remote_ip: row.remote_ip,
            remote_port: row.remote_port,
            service_name: row.service_name.clone(),
            service_source: row.service_source,
            bytes_up: row.bytes_up,
            bytes_down: row.bytes_down,
            incomplete: row.incomplete,
        }
    }

    #[test]
    fn question_2_from_the_narrow_rows_is_question_2_from_the_records() {
        use crate::store::rollup::Services;
        let mut records = samples(500);
        records[1].service = None;
        records[2].bytes_up = u64::MAX;
        let (mut whole, mut narrow) = (Services::default(), Services::default());
        for record in &records {
            whole.add_record(record);
            let (key, used) = service_use_row(&RecordRow::of(record).unwrap()).into_use().unwrap();
            narrow.add(key, &used);
        }
        assert!(whole.len() > 10, "the samples use many services");
        assert_eq!(narrow.into_sorted(), whole.into_sorted());

        // A forged row is refused here as in the whole record.
        let good = RecordRow::of(&records[0]).unwrap();
        type Forgery = (&'static str, fn(&mut RecordRow));
        let forged: [Forgery; 4] = [
            ("service_name", |r| r.service_name = "=HYPERLINK(\"http://x/\",\"a\")".into()),
            ("proto", |r| r.proto = "tcp\u{7}".into()),
            ("end_us", |r| r.end_us = r.start_us - 1),
            ("service_source", |r| {
                r.service_name = "a.example".into();
                r.service_source = 200;
            }),
        ];
        for (field, forge) in forged {
            let mut row = good.clone();
            forge(&mut row);
            assert!(service_use_row(&row).into_use().is_err(), "{field}");
            assert!(row.into_icr().is_err(), "{field}");
        }
    }
}
