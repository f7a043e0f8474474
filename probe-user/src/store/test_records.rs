//! Realistic records for the store's tests.
use crate::record::{Device, EndReason, Endpoint, Icr, RecordIds, Service, ServiceSource};
use chrono::{DateTime, Utc};

/// Opens the store in `dir`, waiting (at most 5 s) for a handle this
/// process just dropped: sled releases its file lock from a background
/// thread after the drop returns (spacejam/sled#1289).
pub fn reopen(dir: &std::path::Path) -> anyhow::Result<super::Store> {
    reopen_with(dir, open)
}

/// As [`reopen`], read-only.
pub fn reopen_read_only(dir: &std::path::Path) -> anyhow::Result<super::Store> {
    reopen_with(dir, open_read_only)
}

/// Records per block in the tests: many blocks from few records.
pub const TEST_BLOCK_RECORDS: usize = 64;

/// [`super::Store::open`] with [`TEST_BLOCK_RECORDS`].
pub fn open(dir: &std::path::Path) -> Result<super::Store, super::OpenError> {
    super::Store::open_with(dir, false, TEST_BLOCK_RECORDS)
}

/// [`super::Store::open_read_only`] with [`TEST_BLOCK_RECORDS`].
pub fn open_read_only(dir: &std::path::Path) -> Result<super::Store, super::OpenError> {
    super::Store::open_with(dir, true, TEST_BLOCK_RECORDS)
}

pub fn reopen_with(
    dir: &std::path::Path,
    open: fn(&std::path::Path) -> Result<super::Store, super::OpenError>,
) -> anyhow::Result<super::Store> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match open(dir) {
            Err(super::OpenError::InUse(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            result => return Ok(result?),
        }
    }
}

/// Some samples are DNS records (one or several exchanges), and some
/// never left the gateway (`local`, no public end).
pub fn sample_at(i: u64, start: DateTime<Utc>, ids: &mut RecordIds) -> Icr {
    let local = i % 23 == 7;
    let exchange =
        |qname: String, qtype: &str, answers: Vec<String>| crate::record::Dns { qname, qtype: qtype.into(), answers };
    let dns_all = match i % 18 {
        0 => vec![
            exchange("a.example".into(), "A", vec!["192.0.2.1".into()]),
            exchange(format!("cdn{}.b.example", i % 5), "AAAA", vec![]),
            exchange(format!("cdn{}.b.example", i % 5), "A", vec!["192.0.2.7".into(), "192.0.2.8".into()]),
        ],
        9 => vec![exchange("a.example".into(), "A", vec!["192.0.2.1".into()])],
        _ => vec![],
    };
    Icr {
        id: ids.next(&start),
        probe: None,
        start,
        end: start + chrono::Duration::milliseconds(1500 + (i % 7) as i64 * 100),
        end_reason: if i.is_multiple_of(5) { EndReason::Rst } else { EndReason::Fin },
        proto: if i.is_multiple_of(3) { "udp".into() } else { "tcp".into() },
        device: Device {
            mac: Some(probe_common::Mac([2, 0, 0, 0, (i % 250) as u8, 0x17]).to_string()),
            ip: Some(format!("10.0.{}.{}", i % 3, i % 250 + 2).parse().unwrap()),
            port: Some(40000 + (i % 20000) as u16),
            vlan: if i.is_multiple_of(11) { vec![100, 20] } else { vec![] },
            pppoe_session: i.is_multiple_of(13).then_some(7),
            subscriber: Some(format!("line-{}", i % 250)),
        },
        public: (!local).then(|| Endpoint { ip: "203.0.113.1".parse().unwrap(), port: 1024 + (i % 60000) as u16 }),
        remote: Endpoint { ip: format!("192.0.2.{}", i % 200 + 1).parse().unwrap(), port: 443 },
        service: match i % 8 {
            1 | 5 => None,
            // Named from a DNS answer the device had, shortly before.
            3 => Some(Service {
                origin: Some(crate::record::DnsOrigin {
                    dns_at: start - chrono::Duration::milliseconds((i % 900) as i64),
                    resolver: if i.is_multiple_of(3) {
                        "[2001:db8::53]:53".parse().unwrap()
                    } else {
                        "192.0.2.53:53".parse().unwrap()
                    },
                }),
                ..Service::carried(format!("s{}.example.com", i % 40), ServiceSource::Dns, false)
            }),
            _ => Some(Service::carried(format!("s{}.example.com", i % 40), ServiceSource::TlsSni, false)),
        },
        dns: dns_all.first().cloned(),
        dns_all,
        packets_up: 10 + i % 50,
        packets_down: 12 + i % 70,
        bytes_up: 1000 + i * 3 % 5000,
        bytes_down: 9000 + i * 7 % 90000,
        incomplete: i.is_multiple_of(17),
        local,
    }
}

pub fn sample(i: u64) -> Icr {
    let start: DateTime<Utc> = DateTime::parse_from_rfc3339("2026-11-22T10:00:00Z").unwrap().into();
    sample_at(i, start + chrono::Duration::milliseconds(i as i64 * 37), &mut RecordIds::default())
}

pub fn samples(n: u64) -> Vec<Icr> {
    let start: DateTime<Utc> = DateTime::parse_from_rfc3339("2026-11-22T10:00:00Z").unwrap().into();
    let mut ids = RecordIds::default();
    (0..n).map(|i| sample_at(i, start + chrono::Duration::milliseconds(i as i64 * 37), &mut ids)).collect()
}
