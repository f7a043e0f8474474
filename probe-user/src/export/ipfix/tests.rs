//! The encoder against a decoder written from RFC 7011 here: every message
//! is read back field by field.
use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::{
    Encoder, PATH_MTU_MESSAGE,
    templates::{self, MAX_NAME, MAX_QUESTIONS},
};
use crate::record::{Device, Dns, EndReason, Endpoint, Icr, Service, ServiceSource};

const PEN: u32 = 32473;
const EXPORT_TIME: u32 = 1_795_000_000;

fn time(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().into()
}

pub(super) fn record() -> Icr {
    Icr {
        id: "0192f1c4-0000-7000-8000-000000000001".into(),
        probe: Some("gw-07".into()),
        start: time("2026-11-22T15:02:00.123456Z"),
        end: time("2026-11-22T15:04:59.000001Z"),
        end_reason: EndReason::Fin,
        proto: "tcp".into(),
        device: Device {
            mac: Some("02:00:00:00:00:17".into()),
            ip: Some("192.168.1.23".parse().unwrap()),
            port: Some(51544),
            vlan: vec![100, 20],
            pppoe_session: Some(7),
            subscriber: Some("line-0042".into()),
        },
        public: Some(Endpoint { ip: "62.25.96.1".parse().unwrap(), port: 10007 }),
        remote: Endpoint { ip: "216.239.32.10".parse().unwrap(), port: 443 },
        service: Some(Service::carried("mail.example.com".into(), ServiceSource::TlsSni, true)),
        dns: None,
        dns_all: vec![
            Dns { qname: "mail.example.com".into(), qtype: "A".into(), answers: vec![] },
            Dns { qname: "mail.example.com".into(), qtype: "AAAA".into(), answers: vec![] },
        ],
        packets_up: 12,
        packets_down: 15,
        bytes_up: 1840,
        bytes_down: 9120,
        incomplete: false,
        local: false,
    }
}

fn v6_record() -> Icr {
    let mut r = record();
    r.device.ip = Some("2001:db8:50::11".parse().unwrap());
    r.remote = Endpoint { ip: "2001:db8:100::10".parse().unwrap(), port: 443 };
    r.public = None;
    r
}

/// A field specifier: (enterprise number, element id, length).
pub(super) type Spec = (Option<u32>, u16, u16);
/// A data record's fields by (enterprise number, element id).
pub(super) type Fields = HashMap<(Option<u32>, u16), Vec<u8>>;

/// One decoded message.
#[derive(Debug)]
pub(super) struct Decoded {
    pub length: u16,
    pub export_time: u32,
    pub sequence: u32,
    pub domain: u32,
    /// Data records: (template id, fields by (enterprise, id)).
    pub records: Vec<(u16, Fields)>,
}

fn be16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[0], bytes[1]])
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().unwrap())
}

/// Reads a message, learning templates into `known` (RFC 7011 §3).
pub(super) fn decode(message: &[u8], known: &mut HashMap<u16, Vec<Spec>>) -> Decoded {
    assert_eq!(be16(message), 10, "version 10");
    let length = be16(&message[2..]);
    assert_eq!(usize::from(length), message.len(), "the header's length is the message's");
    let mut decoded = Decoded {
        length,
        export_time: be32(&message[4..]),
        sequence: be32(&message[8..]),
        domain: be32(&message[12..]),
        records: Vec::new(),
    };
    let mut at = 16;
    while at < message.len() {
        let (set_id, set_len) = (be16(&message[at..]), usize::from(be16(&message[at + 2..])));
        assert!(set_len >= 4 && at + set_len <= message.len(), "a set inside the message");
        let body = &message[at + 4..at + set_len];
        at += set_len;
        if set_id == 2 {
            let mut t = 0;
            while t < body.len() {
                let (id, count) = (be16(&body[t..]), be16(&body[t + 2..]));
                t += 4;
                let mut specs = Vec::new();
                for _ in 0..count {
                    let (element, length) = (be16(&body[t..]), be16(&body[t + 2..]));
                    t += 4;
                    let pen = (element & 0x8000 != 0).then(|| {
                        t += 4;
                        be32(&body[t - 4..])
                    });
                    specs.push((pen, element & 0x7FFF, length));
                }
                known.insert(id, specs);
            }
            continue;
        }
        assert!(set_id >= 256, "a data set");
        let specs = known.get(&set_id).expect("the template came first").clone();
        let mut d = 0;
        while d < body.len() {
            let mut fields = HashMap::new();
            for (pen, element, length) in &specs {
                let length = if *length == 0xFFFF {
                    let short = usize::from(body[d]);
                    d += 1;
                    if short == 255 {
                        d += 2;
                        usize::from(be16(&body[d - 2..]))
                    } else {
                        short
                    }
                } else {
                    usize::from(*length)
                };
                fields.insert((*pen, *element), body[d..d + length].to_vec());
                d += length;
            }
            decoded.records.push((set_id, fields));
        }
    }
    decoded
}

fn decode_all(messages: &[super::Message]) -> Vec<Decoded> {
    let mut known = HashMap::new();
    messages.iter().map(|m| decode(&m.bytes, &mut known)).collect()
}

pub(super) fn iana(fields: &Fields, id: u16) -> &[u8] {
    fields.get(&(None, id)).unwrap_or_else(|| panic!("element {id} in {fields:?}"))
}

fn ours(fields: &Fields, id: u16) -> String {
    String::from_utf8(fields[&(Some(PEN), id)].clone()).unwrap()
}

pub(super) fn number(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0, |n, b| n << 8 | u64::from(*b))
}

#[test]
fn the_header_is_byte_exact_and_templates_do_not_count() {
    let mut encoder = Encoder::new(7, PEN, PATH_MTU_MESSAGE);
    let templates = encoder.templates(EXPORT_TIME);
    let len = templates.bytes.len() as u16;
    let mut header = vec![0x00, 0x0a];
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(&EXPORT_TIME.to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 7]);
    assert_eq!(&templates.bytes[..16], &header[..]);
    assert_eq!(templates.data_records, 0);
    // The NAT44 event template, field by field (RFC 7011 §3.4.1, RFC 8158).
    let nat: [u8; 48] = [
        0x00, 0x02, 0, 0, // the template set's header (length checked below)
        0x01, 0x00, 0x00, 0x0a, // template 256, 10 fields
        0x01, 0x43, 0x00, 0x08, // 323 observationTimeMilliseconds
        0x00, 0xe6, 0x00, 0x01, // 230 natEvent
        0x00, 0x08, 0x00, 0x04, // 8 sourceIPv4Address
        0x00, 0x07, 0x00, 0x02, // 7 sourceTransportPort
        0x00, 0xe1, 0x00, 0x04, // 225 postNATSourceIPv4Address
        0x00, 0xe3, 0x00, 0x02, // 227 postNAPTSourceTransportPort
        0x00, 0x0c, 0x00, 0x04, // 12 destinationIPv4Address
        0x00, 0x0b, 0x00, 0x02, // 11 destinationTransportPort
        0x00, 0x04, 0x00, 0x01, // 4 protocolIdentifier
        0x00, 0x38, 0x00, 0x06, // 56 sourceMacAddress
    ];
    assert_eq!(&templates.bytes[16..18], &nat[..2]);
    assert_eq!(usize::from(be16(&templates.bytes[18..])), templates.bytes.len() - 16, "one set: every template");
    assert_eq!(&templates.bytes[20..64], &nat[4..]);
    // An enterprise field: the enterprise bit, then the number.
    let ours = [0x80, 12, 0xff, 0xff, 0x00, 0x00, 0x7e, 0xd9];
    assert!(templates.bytes.windows(8).any(|w| w == ours), "serviceName under PEN 32473, variable length");
    let reverse = [0x80, 0x01, 0x00, 0x08, 0x00, 0x00, 0x72, 0x79];
    assert!(templates.bytes.windows(8).any(|w| w == reverse), "reverse octetDeltaCount (RFC 5103, PEN 29305)");

    // Data: sequence numbers count data records sent before the message,
    // an ICR and its two NAT events being three.
    let first = encoder.encode(&[record(), record()], EXPORT_TIME, true);
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].records, first[0].data_records), (2, 6));
    let decoded = decode_all(&first);
    assert_eq!((decoded[0].sequence, decoded[0].domain, decoded[0].export_time), (0, 7, EXPORT_TIME));
    let second = encoder.encode(&[record()], EXPORT_TIME + 1, false);
    assert_eq!(be32(&second[0].bytes[8..]), 6, "the templates resent did not count; six data records did");
    assert_eq!(encoder.sequence(), 9);
    encoder.restart_sequence();
    assert_eq!(encoder.sequence(), 0);
}

#[test]
fn a_record_with_every_field_reads_back() {
    let r = record();
    let mut encoder = Encoder::new(7, PEN, PATH_MTU_MESSAGE);
    let messages = encoder.encode(std::slice::from_ref(&r), EXPORT_TIME, true);
    let decoded = decode_all(&messages);
    let records = &decoded[0].records;
    assert_eq!(records.len(), 3);
    let events: Vec<_> = records.iter().filter(|(id, _)| *id == templates::NAT44_EVENT.id).collect();
    assert_eq!(events.len(), 2);
    for (fields, (event, at)) in events.iter().map(|(_, f)| f).zip([(4, r.start), (5, r.end)]) {
        assert_eq!(iana(fields, 230), [event], "NAT44 session create, then delete");
        assert_eq!(number(iana(fields, 323)), at.timestamp_millis() as u64);
        assert_eq!(iana(fields, 8), [192, 168, 1, 23]);
        assert_eq!(number(iana(fields, 7)), 51544);
        assert_eq!(iana(fields, 225), [62, 25, 96, 1]);
        assert_eq!(number(iana(fields, 227)), 10007);
        assert_eq!(iana(fields, 12), [216, 239, 32, 10]);
        assert_eq!(number(iana(fields, 11)), 443);
        assert_eq!(iana(fields, 4), [6]);
        assert_eq!(iana(fields, 56), [2, 0, 0, 0, 0, 0x17]);
        assert!(!fields.contains_key(&(None, 1)), "no counters beside natEvent (pmacct drops them)");
    }
    let (id, fields) = records.iter().find(|(id, _)| *id != templates::NAT44_EVENT.id).unwrap();
    assert_eq!(*id, templates::ICR_V4_NAT.id);
    assert!(!fields.contains_key(&(None, 230)), "the ICR template has no natEvent");
    assert_eq!(number(iana(fields, 152)), 1_795_359_720_123, "milliseconds since 1970");
    assert_eq!(number(iana(fields, 153)), r.end.timestamp_millis() as u64);
    assert_eq!(iana(fields, 8), [192, 168, 1, 23]);
    assert_eq!(number(iana(fields, 7)), 51544);
    assert_eq!(iana(fields, 12), [216, 239, 32, 10]);
    assert_eq!(number(iana(fields, 11)), 443);
    assert_eq!(iana(fields, 225), [62, 25, 96, 1]);
    assert_eq!(number(iana(fields, 227)), 10007);
    assert_eq!(iana(fields, 4), [6]);
    assert_eq!(number(iana(fields, 2)), 12);
    assert_eq!(number(iana(fields, 1)), 1840);
    assert_eq!(number(&fields[&(Some(29305), 2)]), 15);
    assert_eq!(number(&fields[&(Some(29305), 1)]), 9120);
    assert_eq!(iana(fields, 136), [3], "fin: end of flow detected");
    assert_eq!(iana(fields, 56), [2, 0, 0, 0, 0, 0x17]);
    assert_eq!(number(iana(fields, 58)), 100);
    assert_eq!(number(iana(fields, 245)), 20);
    assert_eq!(number(&fields[&(Some(PEN), 11)]), 7);
    assert_eq!(ours(fields, 12), "mail.example.com");
    assert_eq!(ours(fields, 13), "tls_sni");
    assert_eq!(fields[&(Some(PEN), 14)], [1], "ECH: true is 1");
    assert_eq!(ours(fields, 15), "mail.example.com/A mail.example.com/AAAA");
    assert_eq!(ours(fields, 16), "line-0042");

    // Without a service, VLAN or public end: an ICR template without 225/227.
    let mut local = record();
    (local.public, local.service, local.local, local.end_reason) = (None, None, true, EndReason::Idle);
    local.device.vlan.clear();
    let decoded = decode_all(&encoder.encode(&[local], EXPORT_TIME, true));
    let [(id, fields)] = &decoded[0].records[..] else { panic!("one record, no NAT events") };
    assert_eq!(*id, templates::ICR_V4.id);
    assert!(!fields.contains_key(&(None, 225)) && !fields.contains_key(&(None, 227)));
    assert_eq!(ours(fields, 12), "");
    assert_eq!(fields[&(Some(PEN), 14)], [2], "ECH: false is 2");
    assert_eq!(iana(fields, 136), [1], "idle timeout");
    assert_eq!(number(iana(fields, 58)), 0, "untagged");
}

#[test]
fn ipv6_records_use_27_28_and_281() {
    let mut encoder = Encoder::new(7, PEN, PATH_MTU_MESSAGE);
    let mut nat66 = v6_record();
    nat66.public = Some(Endpoint { ip: "2001:db8:113::1".parse().unwrap(), port: 40000 });
    let decoded = decode_all(&encoder.encode(&[v6_record(), nat66], EXPORT_TIME, true));
    let records = &decoded[0].records;
    assert_eq!(records.len(), 2, "no NAT44 events for IPv6");
    let plain = &records.iter().find(|(id, _)| *id == templates::ICR_V6.id).unwrap().1;
    let device: std::net::Ipv6Addr = "2001:db8:50::11".parse().unwrap();
    assert_eq!(iana(plain, 27), device.octets());
    assert_eq!(iana(plain, 28), "2001:db8:100::10".parse::<std::net::Ipv6Addr>().unwrap().octets());
    assert!(!plain.contains_key(&(None, 8)) && !plain.contains_key(&(None, 281)));
    let translated = &records.iter().find(|(id, _)| *id == templates::ICR_V6_NAT.id).unwrap().1;
    assert_eq!(iana(translated, 281), "2001:db8:113::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    assert_eq!(number(iana(translated, 227)), 40000);
}

#[test]
fn long_names_take_the_three_octet_length_and_are_capped() {
    let mut r = record();
    r.service.as_mut().unwrap().name = format!("{}.example", "a".repeat(292));
    let mut encoder = Encoder::new(7, PEN, PATH_MTU_MESSAGE);
    let messages = encoder.encode(std::slice::from_ref(&r), EXPORT_TIME, false);
    let name = r.service.as_ref().unwrap().name.clone();
    assert_eq!(name.len(), 300);
    let mut encoded = vec![255, 0x01, 0x2c];
    encoded.extend_from_slice(name.as_bytes());
    assert!(messages[0].bytes.windows(encoded.len()).any(|w| w == encoded), "255, then 300 in two octets");
    assert_eq!(
        decode_all(&encoder.encode(&[r.clone()], EXPORT_TIME, true))[0].records[2].1[&(Some(PEN), 12)],
        name.as_bytes()
    );
    assert_eq!(encoder.truncated, 0);

    // Longer than any DNS name: cut at a character boundary, and counted.
    r.service.as_mut().unwrap().name = "é".repeat(400);
    r.dns_all =
        (0..100).map(|i| Dns { qname: format!("q{i}.example.com"), qtype: "A".into(), answers: vec![] }).collect();
    let decoded = decode_all(&encoder.encode(&[r], EXPORT_TIME, true));
    let fields = &decoded.last().unwrap().records.last().unwrap().1;
    let name = ours(fields, 12);
    assert!(name.len() <= MAX_NAME && name.chars().all(|c| c == 'é') && name.len() == MAX_NAME);
    let questions = ours(fields, 15);
    assert!(questions.len() <= MAX_QUESTIONS && questions.starts_with("q0.example.com/A q1.example.com/A"));
    assert!(questions.ends_with("/A"), "whole questions only: {questions}");
    assert_eq!(encoder.truncated, 1);
}

#[test]
fn records_split_across_messages_under_the_bound() {
    let mut encoder = Encoder::new(9, PEN, PATH_MTU_MESSAGE);
    let records: Vec<Icr> = (0..100u16)
        .map(|i| {
            let mut r = if i % 3 == 0 { v6_record() } else { record() };
            r.device.port = Some(40000 + i);
            r
        })
        .collect();
    let messages = encoder.encode(&records, EXPORT_TIME, true);
    assert!(messages.len() > 3, "{} messages", messages.len());
    assert!(messages.iter().all(|m| m.bytes.len() <= PATH_MTU_MESSAGE));
    assert_eq!(messages.iter().map(|m| m.records).sum::<usize>(), 100);
    let decoded = decode_all(&messages);
    let mut expected = 0u32;
    let mut ports = Vec::new();
    for (message, decoded) in messages.iter().zip(&decoded) {
        assert_eq!(decoded.sequence, expected, "each message counts the data records before it");
        assert_eq!(decoded.records.len() as u32, message.data_records);
        assert_eq!(usize::from(decoded.length), message.bytes.len());
        expected += message.data_records;
        ports.extend(
            decoded.records.iter().filter(|(id, _)| *id != templates::NAT44_EVENT.id).map(|(_, f)| number(iana(f, 7))),
        );
        // A record's NAT events travel with it.
        let icr_v4 = decoded.records.iter().filter(|(id, _)| *id == templates::ICR_V4_NAT.id).count();
        let events = decoded.records.iter().filter(|(id, _)| *id == templates::NAT44_EVENT.id).count();
        assert_eq!(events, 2 * icr_v4);
    }
    ports.sort_unstable();
    assert_eq!(ports, (40000..40100).collect::<Vec<u64>>(), "every record once");
    assert_eq!(encoder.sequence(), expected);
}

#[test]
fn the_largest_record_fits_a_message_of_its_own() {
    let mut r = record();
    r.service.as_mut().unwrap().name = "n".repeat(10_000);
    r.device.subscriber = Some("s".repeat(10_000));
    r.dns_all = (0..1000)
        .map(|i| Dns { qname: format!("{i}.{}", "d".repeat(240)), qtype: "HTTPS".into(), answers: vec![] })
        .collect();
    let mut v6 = r.clone();
    v6.device.ip = Some("2001:db8:50::11".parse().unwrap());
    v6.remote.ip = "2001:db8:100::10".parse().unwrap();
    v6.public = Some(Endpoint { ip: "2001:db8:113::1".parse().unwrap(), port: 1 });
    for r in [r, v6] {
        let messages = Encoder::new(7, PEN, PATH_MTU_MESSAGE).encode(&[r.clone(), r], EXPORT_TIME, true);
        assert_eq!(messages.iter().map(|m| m.records).collect::<Vec<_>>(), [0, 1, 1], "the templates alone first");
        assert!(messages.iter().all(|m| m.bytes.len() <= PATH_MTU_MESSAGE));
        assert_eq!(decode_all(&messages).iter().map(|d| d.sequence).collect::<Vec<_>>()[..2], [0, 0]);
    }
}
