//! Writing answers in the forms analysts' tools read: NDJSON (the record
//! contract), CSV with a header row, and a table for people at a terminal.
use std::io::Write;

use anyhow::Result;
use serde::Serialize;

use crate::{
    icr::{Icr, format_time},
    query::ServiceRow,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Ndjson,
    Csv,
    Table,
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

const RECORD_COLUMNS: [&str; 25] = [
    "id", "start", "end", "end_reason", "proto", "device_mac", "device_ip", "device_port",
    "device_vlan", "device_pppoe_session", "device_subscriber", "public_ip", "public_port",
    "remote_ip", "remote_port", "service_name", "service_source", "dns_qname", "dns_qtype",
    "dns_answers", "packets_up", "packets_down", "bytes_up", "bytes_down", "incomplete",
];

pub fn write_records(out: &mut (impl Write + ?Sized), records: &[Icr], format: Format) -> Result<()> {
    match format {
        Format::Ndjson => out.write_all(&ndjson(records)?)?,
        Format::Csv => {
            let mut csv = csv::Writer::from_writer(out);
            csv.write_record(RECORD_COLUMNS)?;
            for r in records {
                csv.write_record(record_fields(r))?;
            }
            csv.flush()?;
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = records
                .iter()
                .map(|r| {
                    let f = record_fields(r);
                    vec![
                        f[1].clone(), f[4].clone(), f[5].clone(), endpoint(&f[6], &f[7]),
                        endpoint(&f[11], &f[12]), endpoint(&f[13], &f[14]), f[15].clone(),
                        format!("{}/{}", r.bytes_up, r.bytes_down), f[3].clone(),
                    ]
                })
                .collect();
            table(out, &["start", "proto", "mac", "device", "public", "remote", "service", "bytes up/down", "end"], &rows)?;
        }
    }
    Ok(())
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
        Format::Ndjson => out.write_all(&ndjson(rows)?)?,
        Format::Csv => {
            let mut csv = csv::Writer::from_writer(out);
            csv.write_record(HEADER)?;
            for row in rows {
                csv.write_record(fields(row))?;
            }
            csv.flush()?;
        }
        Format::Table => table(out, &HEADER, &rows.iter().map(fields).collect::<Vec<_>>())?,
    }
    Ok(())
}

fn record_fields(r: &Icr) -> Vec<String> {
    let opt = |v: Option<String>| v.unwrap_or_default();
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
    ]
}

fn endpoint(ip: &str, port: &str) -> String {
    match (ip.is_empty(), ip.contains(':')) {
        (true, _) => "-".into(),
        (false, true) => format!("[{ip}]:{port}"),
        (false, false) => format!("{ip}:{port}"),
    }
}

fn table(out: &mut (impl Write + ?Sized), header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::icr::{Device, EndReason, Endpoint};

    fn record() -> Icr {
        Icr {
            id: "0192f1c4-0000-7000-8000-000000000001".into(),
            start: chrono::DateTime::from_timestamp(0, 0).unwrap(),
            end: chrono::DateTime::from_timestamp(1, 0).unwrap(),
            end_reason: EndReason::Idle,
            proto: "udp".into(),
            device: Device { ip: Some("10.0.0.2".parse().unwrap()), port: Some(5353), vlan: vec![100, 20], ..Device::default() },
            public: None,
            remote: Endpoint { ip: "2001:db8::1".parse().unwrap(), port: 53 },
            service: None,
            dns: None,
            packets_up: 1,
            packets_down: 2,
            bytes_up: 3,
            bytes_down: 4,
            incomplete: true,
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
        assert!(lines[1].ends_with(",1,2,3,4,true"));
    }

    #[test]
    fn ndjson_is_the_record_contract() {
        let mut out = Vec::new();
        write_records(&mut out, &[record()], Format::Ndjson).unwrap();
        let back: Icr = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, record());
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
