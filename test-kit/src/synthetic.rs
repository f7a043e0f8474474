//! Realistic synthetic ICRs for the benches (store, export), the crash
//! test's writer and the gateways of the ClickHouse lab: many
//! devices behind a CGNAT pool (public ports drawn per connection),
//! Zipf-distributed service names (a few very popular, a long tail), DNS
//! lookups, flows of exponentially distributed length, emitted in the order
//! a gateway closes them.
use std::net::{IpAddr, Ipv4Addr};

use chrono::{DateTime, Utc};
use rand::{Rng as _, SeedableRng as _, rngs::SmallRng};
use rand_distr::{Distribution as _, Exp, Zipf};

use icr::record::{Device, Dns, EndReason, Endpoint, Icr, RecordIds, Service, ServiceSource};
use probe_common::Mac;

#[derive(Clone, Debug)]
pub struct Options {
    pub devices: u32,
    pub names: u32,
    /// Public IPv4 addresses of the CGNAT pool.
    pub public_ips: u32,
    /// When the first connection closes.
    pub start: DateTime<Utc>,
    /// Connections closed per second of record time.
    pub per_second: f64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            devices: 20_000,
            names: 100_000,
            public_ips: 128,
            start: DateTime::from_timestamp(1_795_000_000, 0).expect("a valid time"),
            per_second: 1_000.0,
        }
    }
}

pub struct Generator {
    options: Options,
    rng: SmallRng,
    ids: RecordIds,
    names: Zipf<f64>,
    devices: Zipf<f64>,
    duration_s: Exp<f64>,
    /// Record time of the next close, µs.
    now_us: f64,
}

impl Generator {
    pub fn new(seed: u64, options: Options) -> Self {
        Self {
            rng: SmallRng::seed_from_u64(seed),
            ids: RecordIds::default(),
            names: Zipf::new(f64::from(options.names), 1.0).expect("names > 0"),
            // Some lines are far busier than others.
            devices: Zipf::new(f64::from(options.devices), 0.6).expect("devices > 0"),
            duration_s: Exp::new(1.0 / 20.0).expect("a positive rate"),
            now_us: options.start.timestamp_micros() as f64,
            options,
        }
    }

    /// The service name of rank `rank` (1 = most popular).
    pub fn name(rank: u32) -> String {
        let domain = rank % 5_000;
        match rank % 4 {
            0 => format!("www.site{domain}.example"),
            1 => format!("api{rank}.site{domain}.example"),
            2 => format!("cdn{}.edge{domain}.example", rank % 97),
            _ => format!("s{rank}.site{domain}.example"),
        }
    }

    /// A device's MAC, IP and subscriber, by number.
    pub fn device(number: u32) -> Device {
        let [_, a, b, c] = number.to_be_bytes();
        Device {
            mac: Some(Mac([2, 0x1c, 0, a, b, c]).to_string()),
            ip: Some(IpAddr::V4(Ipv4Addr::new(100, 64 + (a & 0x3f), b, c))),
            port: None,
            vlan: Vec::new(),
            pppoe_session: None,
            subscriber: Some(format!("line-{number:06}")),
        }
    }

    pub fn next_record(&mut self) -> Icr {
        self.now_us += self.rng.random::<f64>() * 2e6 / self.options.per_second;
        let end_us = self.now_us as i64;
        let duration_us = (self.duration_s.sample(&mut self.rng).min(1800.0) * 1e6) as i64;
        let start_us = end_us - duration_us;
        let device_number = self.devices.sample(&mut self.rng) as u32 - 1;
        let mut device = Self::device(device_number);
        device.port = Some(self.rng.random_range(32768..61000));
        let public_ip = IpAddr::V4(Ipv4Addr::from(
            u32::from(Ipv4Addr::new(198, 18, 0, 0)) + device_number % self.options.public_ips,
        ));
        let public = Endpoint { ip: public_ip, port: self.rng.random_range(1024..=65535) };
        let kind = self.rng.random_range(0..100);
        let rank = self.names.sample(&mut self.rng) as u32;
        let remote_ip = IpAddr::V4(Ipv4Addr::from(0xC633_6400u32.wrapping_add(rank.wrapping_mul(2_654_435_761) >> 12)));
        let (proto, remote, service, dns) = match kind {
            0..=9 => {
                let qname = Self::name(rank);
                let answer = remote_ip.to_string();
                (
                    "udp",
                    Endpoint { ip: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 53)), port: 53 },
                    Some(Service::carried(qname.clone(), ServiceSource::Dns, false)),
                    Some(Dns { qname, qtype: "A".into(), answers: vec![answer] }),
                )
            }
            10..=19 => ("tcp", Endpoint { ip: remote_ip, port: 443 }, None, None),
            20..=34 => {
                let name = Self::name(rank);
                (
                    "udp",
                    Endpoint { ip: remote_ip, port: 443 },
                    Some(Service::carried(name, ServiceSource::QuicSni, false)),
                    None,
                )
            }
            _ => {
                let name = Self::name(rank);
                (
                    "tcp",
                    Endpoint { ip: remote_ip, port: 443 },
                    Some(Service::carried(name, ServiceSource::TlsSni, false)),
                    None,
                )
            }
        };
        let start = DateTime::from_timestamp_micros(start_us).expect("in range");
        let up = self.rng.random_range(5..200u64);
        Icr {
            id: self.ids.next(&start),
            probe: None,
            start,
            end: DateTime::from_timestamp_micros(end_us).expect("in range"),
            end_reason: if proto == "udp" {
                EndReason::Idle
            } else if kind % 7 == 0 {
                EndReason::Rst
            } else {
                EndReason::Fin
            },
            proto: proto.into(),
            device,
            public: Some(public),
            remote,
            service,
            dns_all: dns.iter().cloned().collect(),
            dns,
            packets_up: up,
            packets_down: up + self.rng.random_range(0..400),
            bytes_up: up * self.rng.random_range(60..900),
            bytes_down: up * self.rng.random_range(60..1400),
            incomplete: false,
            local: false,
        }
    }
}
