//! Writing answers in the forms analysts' tools read: NDJSON (the record
//! contract), CSV with a header row, and a table for people at a terminal.
use std::io::Write;

pub mod clickhouse;
pub mod ipfix;

use anyhow::Result;
use serde::Serialize;

use crate::{
    record::{Icr, ServiceSource, format_time},
    store::rollup::ServiceRow,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Ndjson,
    Csv,
    Table,
    /// Elastic Common Schema, as Elasticsearch `_bulk` lines (an action line
    /// before each document), ready for a Kibana/Elasticsearch import.
    Ecs,
}

impl Format {
    /// The default: a table for a person at a terminal, NDJSON for programs.
    pub fn default_for_stdout() -> Self {
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) { Self::Table } else { Self::Ndjson }
    }
}

/// The NDJSON of `records`: what is written and what the audit digest covers.
pub fn ndjson<T: Serialize>(items: &[T]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for item in items {
        serde_json::to_writer(&mut out, item)?;
        out.push(b'\n');
    }
    Ok(out)
}

// New columns go last: spreadsheets and scripts read the others by place.
const RECORD_COLUMNS: [&str; 30] = [
    "id",
    "start",
    "end",
    "end_reason",
    "proto",
    "device_mac",
    "device_ip",
    "device_port",
    "device_vlan",
    "device_pppoe_session",
    "device_subscriber",
    "public_ip",
    "public_port",
    "remote_ip",
    "remote_port",
    "service_name",
    "service_source",
    "dns_qname",
    "dns_qtype",
    "dns_answers",
    "packets_up",
    "packets_down",
    "bytes_up",
    "bytes_down",
    "incomplete",
    "probe",
    "local",
    "dns_all",
    "service_dns_at",
    "service_resolver",
];

pub fn write_records(out: &mut (impl Write + ?Sized), records: &[Icr], format: Format) -> Result<()> {
    match format {
        Format::Ndjson => out.write_all(&ndjson(records)?)?,
        Format::Ecs => {
            for record in records {
                let action = serde_json::json!({ "create": { "_index": "icr", "_id": record.id } });
                serde_json::to_writer(&mut *out, &action)?;
                out.write_all(b"\n")?;
                serde_json::to_writer(&mut *out, &ecs(record))?;
                out.write_all(b"\n")?;
            }
        }
        Format::Csv => write_csv(out, &RECORD_COLUMNS, records.iter().map(record_fields))?,
        Format::Table => {
            let rows: Vec<Vec<String>> = records
                .iter()
                .map(|r| {
                    let f = record_fields(r);
                    // A local exchange has no public end: the column says why.
                    let public = if r.local { "local".to_string() } else { endpoint(&f[11], &f[12]) };
                    vec![
                        f[1].clone(),
                        f[4].clone(),
                        f[5].clone(),
                        endpoint(&f[6], &f[7]),
                        public,
                        endpoint(&f[13], &f[14]),
                        f[15].clone(),
                        format!("{}/{}", r.bytes_up, r.bytes_down),
                        f[3].clone(),
                    ]
                })
                .collect();
            table(
                out,
                &["start", "proto", "mac", "device", "public", "remote", "service", "bytes up/down", "end"],
                &rows,
            )?;
        }
    }
    Ok(())
}

/// One record in Elastic Common Schema fields.
pub fn ecs(r: &Icr) -> serde_json::Value {
    use serde_json::json;
    let service = r.service.as_ref();
    let origin = service.and_then(|s| s.origin);
    let sni = service.filter(|s| matches!(s.source, ServiceSource::TlsSni | ServiceSource::QuicSni)).map(|s| &s.name);
    let host = service.filter(|s| s.source == ServiceSource::HttpHost).map(|s| &s.name);
    let duration_ns = (r.end - r.start).num_nanoseconds().unwrap_or(0);
    let mut doc = json!({
        "@timestamp": format_time(&r.start),
        "ecs": { "version": "8.11.0" },
        "observer": r.probe.as_ref().map(|name| json!({ "name": name, "type": "gateway" })),
        "event": {
            "id": r.id, "kind": "event", "category": ["network"], "type": ["connection"],
            "start": format_time(&r.start), "end": format_time(&r.end), "duration": duration_ns,
        },
        "network": {
            "transport": r.proto, "packets": r.packets_up + r.packets_down, "bytes": r.bytes_up + r.bytes_down,
            // ECS's word for a connection that stays inside the monitored
            // network; other records' direction is left unsaid, as before.
            "direction": r.local.then_some("internal"),
            "vlan": r.device.vlan.first().map(|id| json!({ "id": id.to_string() })),
            "inner": r.device.vlan.get(1).map(|id| json!({ "vlan": { "id": id.to_string() } })),
        },
        "source": {
            "ip": r.device.ip, "port": r.device.port, "mac": r.device.mac.as_ref().map(|m| m.replace(':', "-").to_ascii_uppercase()),
            "packets": r.packets_up, "bytes": r.bytes_up,
            "nat": r.public.map(|p| json!({ "ip": p.ip, "port": p.port })),
            "user": r.device.subscriber.as_ref().map(|s| json!({ "id": s })),
        },
        "destination": {
            "ip": r.remote.ip, "port": r.remote.port, "packets": r.packets_down, "bytes": r.bytes_down,
            "domain": service.map(|s| &s.name),
        },
        "tls": sni.map(|name| json!({ "client": { "server_name": name } })),
        "url": host.map(|name| json!({ "domain": name })),
        "dns": r.dns.as_ref().map(|d| json!({
            "question": { "name": d.qname, "type": d.qtype },
            "answers": d.answers.iter().map(|a| json!({ "data": a })).collect::<Vec<_>>(),
        })),
        // ECS's `dns` holds one question; a flow's every exchange has no ECS
        // field, so it goes under our own name, as ECS asks of custom fields.
        // So is the exchange that named a connection from DNS.
        "icr": (!r.dns_all.is_empty() || origin.is_some()).then(|| json!({
            "dns_all": (!r.dns_all.is_empty()).then_some(&r.dns_all),
            "service_origin": origin,
        })),
        "labels": {
            "end_reason": serde_json::to_value(r.end_reason).ok(),
            "service_source": service.and_then(|s| serde_json::to_value(s.source).ok()),
            "incomplete": r.incomplete.to_string(),
            // Beside `incomplete`: a flag of ours, always said.
            "local": r.local.to_string(),
            "pppoe_session": r.device.pppoe_session.map(|s| s.to_string()),
        },
    });
    strip_nulls(&mut doc);
    doc
}

/// ECS documents leave unknown fields out rather than null.
fn strip_nulls(value: &mut serde_json::Value) {
    if let serde_json::Value::Object(map) = value {
        map.retain(|_, v| !v.is_null());
        for v in map.values_mut() {
            strip_nulls(v);
        }
    }
}

pub fn write_services(out: &mut (impl Write + ?Sized), rows: &[ServiceRow], format: Format) -> Result<()> {
    let fields = |row: &ServiceRow| {
        vec![
            row.name.clone().unwrap_or_default(),
            row.remote.clone(),
            row.proto.clone(),
            row.first.clone(),
            row.last.clone(),
            row.connections.to_string(),
            row.bytes.to_string(),
        ]
    };
    const HEADER: [&str; 7] = ["name", "remote", "proto", "first", "last", "connections", "bytes"];
    match format {
        // Service rows are no connection records: ECS gets them as NDJSON.
        Format::Ndjson | Format::Ecs => out.write_all(&ndjson(rows)?)?,
        Format::Csv => write_csv(out, &HEADER, rows.iter().map(fields))?,
        Format::Table => table(out, &HEADER, &rows.iter().map(fields).collect::<Vec<_>>())?,
    }
    Ok(())
}

fn record_fields(r: &Icr) -> Vec<String> {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let origin = r.service.as_ref().and_then(|s| s.origin);
    vec![
        r.id.clone(),
        format_time(&r.start),
        format_time(&r.end),
        serde_json::to_value(r.end_reason).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
        r.proto.clone(),
        opt(r.device.mac.clone()),
        opt(r.device.ip.map(|ip| ip.to_string())),
        opt(r.device.port.map(|p| p.to_string())),
        r.device.vlan.iter().map(u16::to_string).collect::<Vec<_>>().join(";"),
        opt(r.device.pppoe_session.map(|s| s.to_string())),
        opt(r.device.subscriber.clone()),
        opt(r.public.map(|p| p.ip.to_string())),
        opt(r.public.map(|p| p.port.to_string())),
        r.remote.ip.to_string(),
        r.remote.port.to_string(),
        opt(r.service.as_ref().map(|s| s.name.clone())),
        opt(r.service.as_ref().and_then(|s| serde_json::to_value(s.source).ok()?.as_str().map(str::to_owned))),
        opt(r.dns.as_ref().map(|d| d.qname.clone())),
        opt(r.dns.as_ref().map(|d| d.qtype.clone())),
        opt(r.dns.as_ref().map(|d| d.answers.join(";"))),
        r.packets_up.to_string(),
        r.packets_down.to_string(),
        r.bytes_up.to_string(),
        r.bytes_down.to_string(),
        r.incomplete.to_string(),
        opt(r.probe.clone()),
        r.local.to_string(),
        // Each exchange as qname/qtype; its answers are left out (the
        // first's are in dns_answers; NDJSON has them all): a cell stays
        // readable.
        r.dns_all.iter().map(|d| format!("{}/{}", d.qname, d.qtype)).collect::<Vec<_>>().join(";"),
        opt(origin.map(|o| format_time(&o.dns_at))),
        opt(origin.map(|o| o.resolver.to_string())),
    ]
}

fn endpoint(ip: &str, port: &str) -> String {
    match (ip.is_empty(), ip.contains(':')) {
        (true, _) => "-".into(),
        (false, true) => format!("[{ip}]:{port}"),
        (false, false) => format!("{ip}:{port}"),
    }
}

/// The one CSV writer (the command line's answers, a bundle's
/// `results.csv`, the console's download): every cell passes
/// [`spreadsheet_cell`].
fn write_csv(out: &mut (impl Write + ?Sized), header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> Result<()> {
    let mut csv = csv::Writer::from_writer(out);
    csv.write_record(header.iter().map(|cell| spreadsheet_cell(cell).into_owned()))?;
    for row in rows {
        csv.write_record(row.iter().map(|cell| spreadsheet_cell(cell).into_owned()))?;
    }
    csv.flush()?;
    Ok(())
}

/// A cell as a spreadsheet may open it: one that begins with `=`, `+`, `-`,
/// `@`, tab or CR would be taken for a formula (names such as `-2.example`
/// are captured, and a forged central row can hold anything), so it gets a
/// leading `'`, which makes it text (OWASP's advice on CSV injection).
pub fn spreadsheet_cell(cell: &str) -> std::borrow::Cow<'_, str> {
    if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{cell}").into() } else { cell.into() }
}

/// A cell as a terminal may print it: control characters (C0, DEL, C1,
/// and so the ESC that starts every escape sequence) and the bidirectional
/// overrides that reorder what is shown are written as visible escapes.
pub fn terminal_cell(cell: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !cell.chars().any(unsafe_char) {
        return cell.into();
    }
    let mut shown = String::with_capacity(cell.len() + 8);
    for c in cell.chars() {
        match c {
            c if !unsafe_char(c) => shown.push(c),
            c if c.is_ascii() => shown.push_str(&format!("\\x{:02x}", c as u32)),
            c => shown.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    shown.into()
}

fn table(out: &mut (impl Write + ?Sized), header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let rows: Vec<Vec<std::borrow::Cow<str>>> =
        rows.iter().map(|row| row.iter().map(|cell| terminal_cell(cell)).collect()).collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in &rows {
        writeln!(out, "{}", line(row.iter().map(|cell| cell.as_ref()).collect()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Device, Dns, EndReason, Endpoint};

    fn record() -> Icr {
        Icr {
            id: "0192f1c4-0000-7000-8000-000000000001".into(),
            probe: Some("gw-07".into()),
            start: chrono::DateTime::from_timestamp(0, 0).unwrap(),
            end: chrono::DateTime::from_timestamp(1, 0).unwrap(),
            end_reason: EndReason::Idle,
            proto: "udp".into(),
            device: Device {
                ip: Some("10.0.0.2".parse().unwrap()),
                port: Some(5353),
                vlan: vec![100, 20],
                ..Device::default()
            },
            public: None,
            remote: Endpoint { ip: "2001:db8::1".parse().unwrap(), port: 53 },
            service: None,
            dns: None,
            dns_all: vec![],
            packets_up: 1,
            packets_down: 2,
            bytes_up: 3,
            bytes_down: 4,
            incomplete: true,
            local: false,
        }
    }

    #[test]
    fn csv_has_a_header_and_one_line_per_record() {
        let mut out = Vec::new();
        write_records(&mut out, &[record(), record()], Format::Csv).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("id,start,end,end_reason,proto,device_mac"));
        assert!(lines[1].contains(",idle,udp,,10.0.0.2,5353,100;20,"), "{}", lines[1]);
        assert!(
            lines[1].ends_with(",1,2,3,4,true,gw-07,false,,,"),
            "probe, then local, dns_all and a name's DNS origin: {}",
            lines[1]
        );
    }

    #[test]
    fn csv_appends_local_and_every_exchange_after_the_probe() {
        let mut r = record();
        let exchange = |qname: &str, qtype: &str| Dns {
            qname: qname.into(),
            qtype: qtype.into(),
            answers: vec!["192.0.2.1".into()],
        };
        r.dns_all = vec![exchange("a.example", "A"), exchange("a.example", "AAAA"), exchange("b.example", "HTTPS")];
        r.dns = r.dns_all.first().cloned();
        r.local = true;
        let mut out = Vec::new();
        write_records(&mut out, &[r], Format::Csv).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let header: Vec<&str> = lines[0].split(',').collect();
        assert_eq!(header.len(), 30);
        assert_eq!(header[..26], RECORD_COLUMNS[..26], "the columns before stay where they were");
        assert_eq!((header[25], header[26], header[27]), ("probe", "local", "dns_all"));
        assert_eq!((header[28], header[29]), ("service_dns_at", "service_resolver"));
        assert!(lines[1].ends_with(",gw-07,true,a.example/A;a.example/AAAA;b.example/HTTPS,,"), "{}", lines[1]);
        // A connection named from DNS says by which exchange, in the last two columns.
        let mut named = record();
        named.service = Some(crate::record::Service {
            origin: Some(crate::record::DnsOrigin {
                dns_at: chrono::DateTime::from_timestamp(1_700_000_000, 210_000_000).unwrap(),
                resolver: "[2001:db8::53]:53".parse().unwrap(),
            }),
            ..crate::record::Service::carried("www.example.test".into(), ServiceSource::Dns, false)
        });
        let mut out = Vec::new();
        write_records(&mut out, &[named], Format::Csv).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.trim_end().ends_with(",2023-11-14T22:13:20.210000Z,[2001:db8::53]:53"), "{text}");
        assert!(lines[1].contains(",a.example,A,192.0.2.1,"), "dns_* is the first exchange, as before: {}", lines[1]);
    }

    #[test]
    fn ndjson_is_the_record_contract() {
        let mut out = Vec::new();
        write_records(&mut out, &[record()], Format::Ndjson).unwrap();
        let back: Icr = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, record());
    }

    #[test]
    fn ecs_round_trips_into_the_record_fields() {
        let mut r = record();
        r.service = Some(crate::record::Service::carried("mail.example.com".into(), ServiceSource::TlsSni, false));
        r.public = Some(Endpoint { ip: "203.0.113.1".parse().unwrap(), port: 20001 });
        r.device.mac = Some("02:00:00:00:00:17".into());
        r.device.subscriber = Some("line-0042".into());
        let mut out = Vec::new();
        write_records(&mut out, &[r.clone()], Format::Ecs).unwrap();
        let lines: Vec<serde_json::Value> =
            String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "an action line, then the document");
        assert_eq!(lines[0]["create"]["_id"], r.id.as_str());
        let doc = &lines[1];
        assert_eq!(doc["@timestamp"], format_time(&r.start));
        assert_eq!(doc["source"]["ip"], "10.0.0.2");
        assert_eq!(doc["source"]["port"], 5353);
        assert_eq!(doc["source"]["mac"], "02-00-00-00-00-17");
        assert_eq!(doc["source"]["nat"]["port"], 20001);
        assert_eq!(doc["source"]["user"]["id"], "line-0042");
        assert_eq!(doc["destination"]["ip"], "2001:db8::1");
        assert_eq!((doc["source"]["bytes"].as_u64(), doc["destination"]["bytes"].as_u64()), (Some(3), Some(4)));
        assert_eq!(doc["network"]["transport"], "udp");
        assert_eq!(doc["network"]["vlan"]["id"], "100");
        assert_eq!(doc["network"]["inner"]["vlan"]["id"], "20");
        assert_eq!(doc["tls"]["client"]["server_name"], "mail.example.com");
        assert_eq!(doc["labels"]["incomplete"], "true");
        assert!(doc.get("dns").is_none() && doc.get("url").is_none(), "absent, not null");
        assert!(doc.get("icr").is_none() && doc["network"].get("direction").is_none());
        assert_eq!(doc["labels"]["local"], "false");
    }

    #[test]
    fn ecs_names_local_exchanges_internal_and_keeps_every_exchange() {
        let mut r = record();
        r.dns_all = vec![
            Dns { qname: "a.example".into(), qtype: "A".into(), answers: vec!["192.0.2.1".into()] },
            Dns { qname: "b.example".into(), qtype: "AAAA".into(), answers: vec![] },
        ];
        r.dns = r.dns_all.first().cloned();
        r.local = true;
        let doc = ecs(&r);
        assert_eq!(doc["network"]["direction"], "internal");
        assert_eq!(doc["labels"]["local"], "true");
        assert_eq!(doc["dns"]["question"]["name"], "a.example");
        assert_eq!(doc["icr"]["dns_all"][1]["qname"], "b.example");
        assert_eq!(doc["icr"]["dns_all"][1]["answers"], serde_json::json!([]), "an empty list is kept: it is not null");
    }

    #[test]
    fn table_says_local_where_the_public_end_would_be() {
        let mut r = record();
        r.local = true;
        let mut out = Vec::new();
        write_records(&mut out, &[r], Format::Table).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.lines().nth(1).unwrap().contains("  local  "), "{text}");
    }

    #[test]
    fn csv_parses_back() {
        let mut out = Vec::new();
        write_records(&mut out, &[record()], Format::Csv).unwrap();
        let mut reader = csv::Reader::from_reader(out.as_slice());
        let headers = reader.headers().unwrap().clone();
        let row = reader.records().next().unwrap().unwrap();
        let field = |name: &str| row.get(headers.iter().position(|h| h == name).unwrap()).unwrap().to_string();
        assert_eq!(field("device_ip"), "10.0.0.2");
        assert_eq!(field("remote_ip"), "2001:db8::1");
        assert_eq!(field("bytes_down"), "4");
        assert_eq!(field("start"), format_time(&record().start));
    }

    /// A record whose names a spreadsheet would take for formulas, and a
    /// terminal for escape sequences (a forged central row can hold any).
    fn hostile() -> Icr {
        let mut r = record();
        r.service = Some(crate::record::Service::carried(
            "=HYPERLINK(\"http://x.example/\",\"open\")".into(),
            ServiceSource::TlsSni,
            false,
        ));
        r.dns = Some(Dns { qname: "-2.example.test".into(), qtype: "A".into(), answers: vec!["+1".into()] });
        r.dns_all = vec![r.dns.clone().unwrap()];
        r.device.subscriber = Some("@SUM(1+1)".into());
        r.probe = Some("\tgw".into());
        r.proto = "\r=1".into();
        r.device.mac = Some("\u{1b}[2J\u{1b}]0;owned\u{7}\u{9b}31m\u{7f}".into());
        r
    }

    fn service_row(name: &str, remote: &str) -> ServiceRow {
        let (first, last) = (format_time(&record().start), format_time(&record().end));
        ServiceRow {
            name: Some(name.into()),
            remote: remote.into(),
            proto: "tcp".into(),
            first,
            last,
            connections: 1,
            bytes: 2,
        }
    }

    #[test]
    fn csv_cells_a_spreadsheet_would_evaluate_are_neutralised() {
        let mut out = Vec::new();
        write_records(&mut out, &[hostile()], Format::Csv).unwrap();
        let mut reader = csv::Reader::from_reader(out.as_slice());
        let headers = reader.headers().unwrap().clone();
        let row = reader.records().next().unwrap().unwrap();
        let field = |name: &str| row.get(headers.iter().position(|h| h == name).unwrap()).unwrap().to_string();
        assert_eq!(field("service_name"), "'=HYPERLINK(\"http://x.example/\",\"open\")");
        assert_eq!(field("dns_qname"), "'-2.example.test");
        assert_eq!(field("dns_answers"), "'+1");
        assert_eq!(field("device_subscriber"), "'@SUM(1+1)");
        assert_eq!(field("probe"), "'\tgw");
        assert_eq!(field("proto"), "'\r=1");
        assert_eq!(field("dns_all"), "'-2.example.test/A");
        assert_eq!(field("remote_ip"), "2001:db8::1", "a harmless cell is as it was");
        for cell in row.iter().chain(&headers) {
            assert!(!cell.starts_with(['=', '+', '-', '@', '\t', '\r']), "{cell:?}");
        }

        let rows = [service_row("-1.5-0.5", "+x")];
        let mut out = Vec::new();
        write_services(&mut out, &rows, Format::Csv).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.lines().nth(1).unwrap().starts_with("'-1.5-0.5,'+x,"), "{text}");
    }

    #[test]
    fn table_prints_no_control_character() {
        let mut out = Vec::new();
        write_records(&mut out, &[hostile()], Format::Table).unwrap();
        let rows = [service_row("a\u{1b}[31mred\u{0}\u{85}", "192.0.2.1")];
        write_services(&mut out, &rows, Format::Table).unwrap();
        let text = String::from_utf8(out).unwrap();
        let controls: Vec<char> = text.chars().filter(|c| c.is_control() && *c != '\n').collect();
        assert!(controls.is_empty(), "{controls:?} in {text}");
        assert!(text.contains("\\x1b[2J\\x1b]0;owned\\x07\\u{9b}31m\\x7f"), "escaped, visibly: {text}");
        assert!(text.contains("a\\x1b[31mred\\x00\\u{85}"), "{text}");
    }

    #[test]
    fn table_aligns_columns() {
        let mut out = Vec::new();
        write_records(&mut out, &[record()], Format::Table).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.lines().next().unwrap().starts_with("start"));
        assert!(text.contains("[2001:db8::1]:53"));
    }
}
