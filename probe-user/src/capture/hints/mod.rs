//! Service names from connection setup only: the ClientHello's SNI (TLS and
//! QUIC), the HTTP Host header, DNS questions and answers. Payload is looked
//! at here and nowhere else, and nothing but names leaves this module: no
//! path, query string or content is ever kept.
use std::collections::BTreeMap;

use probe_common::{Mac, Proto, Role, Roles};

use crate::record::{Dns, Service, ServiceSource};

pub mod answers;
pub mod dns;
pub mod http;
mod parse;
pub mod quic;
pub mod tls;

pub use answers::{DeviceId, DnsCache};
use parse::contiguous;
pub use parse::{Parse, normalise_name};

/// One hint packet, as the assembler hands it over.
pub struct HintPacket<'a> {
    pub dir: u8,
    pub proto: Proto,
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_seq: u32,
    pub payload: &'a [u8],
    pub seen: Seen,
}

/// Where and when a hint packet was seen: what decides whose question a
/// DNS message is, and whose answer may name later connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    pub ts_ns: u64,
    /// Where it arrived (XDP: a LAN or WAN port), or that the gateway sent it (TC egress).
    pub roles: Roles,
    /// The frame's Ethernet source and destination.
    pub src_mac: Mac,
    pub dst_mac: Mac,
}

impl Seen {
    /// The Ethernet addresses of a frame (unset when it is too short for them).
    pub fn macs(frame: &[u8]) -> (Mac, Mac) {
        let mac = |range: std::ops::Range<usize>| {
            frame.get(range).and_then(|b| b.try_into().ok()).map(Mac).unwrap_or_default()
        };
        (mac(6..12), mac(0..6))
    }
}

/// A DNS question as a device sent it: the direction it travelled in its
/// kernel flow (device → resolver), and how it was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Asked {
    pub dir: u8,
    pub seen: Seen,
}

const DNS_PORT: u16 = 53;
/// Cleartext before a ClientHello (STARTTLS, SOCKS) is short: past this
/// much, a stream that is neither TLS nor HTTP is given up on.
const PRELUDE_MAX: usize = 2048;
/// Bytes kept per stream while a name is being looked for.
const STREAM_CAP: usize = probe_common::HINT_BUDGET as usize * 2;

/// What the hints of one kernel flow have told so far.
#[derive(Default)]
pub struct FlowHints {
    streams: [Stream; 2],
    /// The client's stream was recognised (or given up on): stop parsing it.
    client_decided: bool,
    quic: quic::InitialCrypto,
    pub service: Option<Service>,
    /// The flow's DNS exchanges, in the order their first message came.
    exchanges: Vec<Exchange>,
}

/// One DNS question of a flow and what was answered to it. A stub
/// resolver may ask many from one socket (A and AAAA, search domains, the
/// names of a page): each is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Exchange {
    id: u16,
    dns: Dns,
    /// The query, if one was seen arriving from a device (the first, when
    /// it was retransmitted).
    asked: Option<Asked>,
}

impl Exchange {
    fn is(&self, id: u16, qname: &str, qtype: &str) -> bool {
        self.id == id && self.dns.qname == qname && self.dns.qtype == qtype
    }

    fn add_answers<'a>(&mut self, answers: impl IntoIterator<Item = &'a String>) {
        for data in answers {
            if !self.dns.answers.contains(data) {
                self.dns.answers.push(data.clone());
            }
        }
    }
}

/// Exchanges kept per flow: the hint budget bounds them already (a question
/// takes some 30 bytes of it); this bounds a flow's memory whatever comes.
const MAX_EXCHANGES: usize = 256;

impl FlowHints {
    /// The hints of a flow an earlier agent followed: the name it had found
    /// (the packets that gave it are not seen again).
    pub fn resumed(service: Option<Service>) -> Self {
        Self { client_decided: service.is_some(), service, ..Self::default() }
    }

    /// The client's SYN was seen: its data starts at `isn + 1`, so segments
    /// arriving out of order are placed right.
    pub fn client_syn(&mut self, dir: u8, isn: u32) {
        let stream = &mut self.streams[usize::from(dir & 1)];
        if stream.base.is_none() {
            stream.base = Some(isn.wrapping_add(1));
        }
    }

    /// Takes one hint packet; returns the DNS responses it completed (for
    /// the per-device answer cache).
    pub fn add(&mut self, packet: &HintPacket) -> Vec<dns::Message> {
        let is_dns = packet.src_port == DNS_PORT || packet.dst_port == DNS_PORT;
        match (packet.proto, is_dns) {
            (Proto::Udp, true) => {
                dns::message(packet.payload).and_then(|m| self.note_dns(m, packet)).into_iter().collect()
            }
            (Proto::Tcp, true) => {
                let stream = &mut self.streams[usize::from(packet.dir & 1)];
                stream.insert(packet.tcp_seq, packet.payload);
                // After the insert: an earlier segment moves the base back and resets it.
                let before = stream.consumed;
                let bytes = stream.contiguous();
                match dns::tcp_messages(&bytes[before..]) {
                    Parse::Done(messages) => {
                        stream.consumed = before + dns_tcp_len(&bytes[before..], messages.len());
                        messages.into_iter().filter_map(|m| self.note_dns(m, packet)).collect()
                    }
                    _ => Vec::new(),
                }
            }
            (Proto::Tcp, false) => {
                if !self.client_decided {
                    let stream = &mut self.streams[usize::from(packet.dir & 1)];
                    stream.insert(packet.tcp_seq, packet.payload);
                    let bytes = stream.contiguous();
                    self.client_stream(&bytes);
                }
                Vec::new()
            }
            (Proto::Udp, false) => {
                if self.service.is_none()
                    && let Some(hello) = self.quic.add_packet(packet.payload)
                {
                    self.service = hello.sni.map(|name| Service::carried(name, ServiceSource::QuicSni, hello.ech));
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    fn client_stream(&mut self, bytes: &[u8]) {
        let named =
            |hello: tls::ClientHello| hello.sni.map(|name| Service::carried(name, ServiceSource::TlsSni, hello.ech));
        match tls::client_hello(bytes) {
            Parse::Done(hello) => return self.decide(named(hello)),
            Parse::NeedMore if bytes.len() < STREAM_CAP => return,
            _ => {}
        }
        match http::host(bytes) {
            Parse::Done(host) => {
                return self.decide(host.map(|name| Service::carried(name, ServiceSource::HttpHost, false)));
            }
            Parse::NeedMore if bytes.len() < STREAM_CAP => return,
            _ => {}
        }
        // TLS may still follow a short cleartext prelude (STARTTLS, SOCKS).
        match tls::client_hello_after_prelude(bytes) {
            Parse::Done(hello) => self.decide(named(hello)),
            Parse::NeedMore if bytes.len() < PRELUDE_MAX => {}
            // Neither TLS nor HTTP: nothing in this stream names the service.
            _ => self.decide(None),
        }
    }

    fn decide(&mut self, service: Option<Service>) {
        self.client_decided = true;
        self.service = service;
        self.streams = Default::default();
    }

    /// Folds a DNS message into the flow's exchanges (a response joins its
    /// query's); returns it if it is a response.
    fn note_dns(&mut self, message: dns::Message, packet: &HintPacket) -> Option<dns::Message> {
        let answers = message.answers.iter().map(|answer| &answer.data);
        // Only a query that arrived from a device is a device's question.
        let asked = (!message.response && packet.seen.roles.has(Role::Lan))
            .then_some(Asked { dir: packet.dir, seen: packet.seen });
        let known = self.exchanges.iter().position(|e| e.is(message.id, &message.qname, &message.qtype));
        match known {
            Some(index) => {
                let exchange = &mut self.exchanges[index];
                exchange.add_answers(answers);
                exchange.asked = exchange.asked.or(asked);
            }
            None if self.exchanges.len() < MAX_EXCHANGES => {
                let mut exchange = Exchange {
                    id: message.id,
                    dns: Dns { qname: message.qname.clone(), qtype: message.qtype.clone(), answers: Vec::new() },
                    asked,
                };
                exchange.add_answers(answers);
                self.exchanges.push(exchange);
            }
            None => {}
        }
        message.response.then_some(message)
    }

    /// The question a response answers, if a device asked it on this flow:
    /// same transaction id, name and type, sent in direction `dir` (device
    /// to resolver, so the ports match too).
    pub fn question(&self, response: &dns::Message, dir: u8) -> Option<Asked> {
        self.exchanges
            .iter()
            .filter(|e| e.is(response.id, &response.qname, &response.qtype))
            .find_map(|e| e.asked.filter(|asked| asked.dir == dir))
    }

    /// Combines what the two kernel flows of one NATed connection learnt:
    /// the service name, and every DNS exchange (questions seen on the LAN
    /// side joined by the answers seen on the WAN side), first one first.
    pub fn merged(lan: Option<&FlowHints>, wan: Option<&FlowHints>) -> (Option<Service>, Vec<Dns>) {
        let service = lan.and_then(|h| h.service.clone()).or_else(|| wan.and_then(|h| h.service.clone()));
        let mut exchanges = lan.map(|h| h.exchanges.clone()).unwrap_or_default();
        for answered in wan.map(|h| h.exchanges.as_slice()).unwrap_or_default() {
            let dns = &answered.dns;
            let known = exchanges.iter().position(|e| e.is(answered.id, &dns.qname, &dns.qtype));
            match known {
                Some(index) => exchanges[index].add_answers(&dns.answers),
                None if exchanges.len() < MAX_EXCHANGES => exchanges.push(answered.clone()),
                None => {}
            }
        }
        (service, exchanges.into_iter().map(|e| e.dns).collect())
    }
}

/// Bytes taken by the first `count` length-prefixed DNS messages.
fn dns_tcp_len(bytes: &[u8], count: usize) -> usize {
    let mut offset = 0;
    for _ in 0..count {
        offset += 2 + usize::from(u16::from_be_bytes([bytes[offset], bytes[offset + 1]]));
    }
    offset
}

/// A TCP byte stream from hint segments, in sequence order, bounded.
#[derive(Default)]
struct Stream {
    base: Option<u32>,
    /// Offset from `base` → bytes.
    segments: BTreeMap<u32, Vec<u8>>,
    bytes: usize,
    /// Bytes already parsed (DNS over TCP).
    consumed: usize,
}

impl Stream {
    fn insert(&mut self, seq: u32, data: &[u8]) {
        if data.is_empty() || self.bytes + data.len() > STREAM_CAP {
            return;
        }
        let base = *self.base.get_or_insert(seq);
        let offset = seq.wrapping_sub(base) as i32;
        if offset < 0 {
            // An earlier segment arrived late: move the base back to it.
            let shift = offset.unsigned_abs();
            // Segments pushed past 4 GiB from the new base can never be reached: dropped.
            for (o, d) in std::mem::take(&mut self.segments) {
                match o.checked_add(shift) {
                    Some(o) => {
                        self.segments.insert(o, d);
                    }
                    None => self.bytes -= d.len(),
                }
            }
            self.base = Some(seq);
            self.consumed = 0;
            self.segments.insert(0, data.to_vec());
        } else {
            let slot = self.segments.entry(offset as u32).or_default();
            if slot.len() >= data.len() {
                return; // a retransmission
            }
            *slot = data.to_vec();
        }
        self.bytes += data.len();
    }

    /// The bytes from the base up to the first gap.
    fn contiguous(&self) -> Vec<u8> {
        contiguous(self.segments.iter().map(|(&offset, data)| (u64::from(offset), data.as_slice())))
    }
}

#[cfg(test)]
mod tests {
    use simple_dns::TYPE;

    use super::*;

    pub(crate) fn from_lan() -> Seen {
        Seen { roles: Roles::of(Role::Lan), ..Seen::default() }
    }

    fn tcp(dir: u8, seq: u32, payload: &[u8]) -> HintPacket<'_> {
        HintPacket { dir, proto: Proto::Tcp, src_port: 50000, dst_port: 443, tcp_seq: seq, payload, seen: from_lan() }
    }

    #[test]
    fn a_client_hello_over_segments_in_any_order() {
        let stream = tls::tests::in_records(
            &tls::tests::client_hello_bytes(Some("seg.example.com"), &[(21, vec![0; 3000])]),
            16384,
        );
        let chunks: Vec<&[u8]> = stream.chunks(1400).collect();
        let mut hints = FlowHints::default();
        hints.client_syn(0, 1000);
        // Second and third segments first, then the first.
        hints.add(&tcp(0, 1001 + 1400, chunks[1]));
        hints.add(&tcp(0, 1001 + 2800, chunks[2]));
        assert_eq!(hints.service, None);
        hints.add(&tcp(0, 1001, chunks[0]));
        assert_eq!(hints.service.as_ref().map(|s| s.name.as_str()), Some("seg.example.com"));
        assert_eq!(hints.service.as_ref().map(|s| s.source), Some(ServiceSource::TlsSni));
    }

    #[test]
    fn http_host_and_nothing_else() {
        let mut hints = FlowHints::default();
        hints.add(&tcp(0, 1, b"GET /private/path?token=secret HTTP/1.1\r\nHost: Www.Example.Test\r\n\r\n"));
        let service = hints.service.unwrap();
        assert_eq!((service.name.as_str(), service.source), ("www.example.test", ServiceSource::HttpHost));
        let mut other = FlowHints::default();
        other.add(&tcp(0, 1, b"SSH-2.0-OpenSSH_9.2\r\n"));
        assert!(!other.client_decided, "a short prelude may still lead to TLS");
        other.add(&tcp(0, 22, &[0x5a; PRELUDE_MAX]));
        assert!(other.service.is_none() && other.client_decided, "past the prelude limit: given up");
        assert!(other.streams[0].segments.is_empty(), "and its bytes are dropped");
    }

    #[test]
    fn dns_question_and_answers_merge_across_nat_sides() {
        let query = dns::tests::response("www.example.test", TYPE::A, vec![]);
        let mut query_only = query.clone();
        query_only[2] &= 0x7f; // clear QR: a query
        let answer = dns::tests::response(
            "www.example.test",
            TYPE::A,
            vec![dns::tests::a_record("www.example.test", [198, 51, 100, 10])],
        );
        let udp = |dir, payload| HintPacket {
            dir,
            proto: Proto::Udp,
            src_port: 40000,
            dst_port: 53,
            tcp_seq: 0,
            payload,
            seen: from_lan(),
        };
        let mut lan = FlowHints::default();
        assert!(lan.add(&udp(0, &query_only)).is_empty(), "a query is no response");
        let mut wan = FlowHints::default();
        let responses = wan.add(&udp(1, &answer));
        assert_eq!(responses.len(), 1);
        let (service, exchanges) = FlowHints::merged(Some(&lan), Some(&wan));
        assert!(service.is_none());
        assert_eq!(exchanges.len(), 1, "the answer joins its question");
        let dns = &exchanges[0];
        assert_eq!((dns.qname.as_str(), dns.qtype.as_str()), ("www.example.test", "A"));
        assert_eq!(dns.answers, ["198.51.100.10"]);

        assert_eq!(lan.question(&responses[0], 0).map(|asked| asked.dir), Some(0), "the LAN side holds the question");
        assert_eq!(wan.question(&responses[0], 0), None, "an answer is no question");
    }

    #[test]
    fn every_question_of_one_socket_is_kept_with_its_answers() {
        let udp = |dir, payload| HintPacket {
            dir,
            proto: Proto::Udp,
            src_port: 40000,
            dst_port: 53,
            tcp_seq: 0,
            payload,
            seen: from_lan(),
        };
        let exchange = |id: u16, qname: &str, qtype, ip| {
            let mut query = dns::tests::response(qname, qtype, vec![]);
            query[..2].copy_from_slice(&id.to_be_bytes());
            query[2] &= 0x7f;
            let mut answer = dns::tests::response(qname, qtype, vec![dns::tests::a_record(qname, ip)]);
            answer[..2].copy_from_slice(&id.to_be_bytes());
            (query, answer)
        };
        let asked = [
            exchange(1, "one.example.test", TYPE::A, [192, 0, 2, 1]),
            exchange(2, "two.example.test", TYPE::A, [192, 0, 2, 2]),
            // The same name again, a new transaction: a new exchange.
            exchange(3, "one.example.test", TYPE::A, [192, 0, 2, 3]),
        ];
        let mut hints = FlowHints::default();
        // Questions first, then the answers in another order.
        for (query, _) in &asked {
            hints.add(&udp(0, query));
        }
        for index in [1, 0, 2] {
            assert_eq!(hints.add(&udp(1, &asked[index].1)).len(), 1);
        }
        let (_, exchanges) = FlowHints::merged(Some(&hints), None);
        let seen: Vec<(&str, Vec<&str>)> =
            exchanges.iter().map(|d| (d.qname.as_str(), d.answers.iter().map(String::as_str).collect())).collect();
        assert_eq!(
            seen,
            [
                ("one.example.test", vec!["192.0.2.1"]),
                ("two.example.test", vec!["192.0.2.2"]),
                ("one.example.test", vec!["192.0.2.3"])
            ]
        );
    }

    /// Found by fuzzing (fuzz/artifacts/flow_hints/regression-*).
    #[test]
    fn an_earlier_segment_after_parsed_dns_over_tcp() {
        let one = dns::tests::response("tcp.example.test", TYPE::A, vec![]);
        let mut framed = (one.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&one);
        let dns_tcp = |seq, payload| HintPacket {
            dir: 1,
            proto: Proto::Tcp,
            src_port: 53,
            dst_port: 40000,
            tcp_seq: seq,
            payload,
            seen: from_lan(),
        };
        let mut hints = FlowHints::default();
        assert_eq!(hints.add(&dns_tcp(5000, &framed)).len(), 1);
        // Before the base, with a gap: fewer contiguous bytes than were parsed.
        assert!(hints.add(&dns_tcp(4000, &[0])).is_empty());
        assert_eq!(hints.streams[1].consumed, 0);
    }

    #[test]
    fn segments_four_gib_apart_do_not_overflow_offsets() {
        let mut hints = FlowHints::default();
        for seq in [0x1000_0000, 0x8fff_ffff, 0x9000_0000, 0x8fff_ffff] {
            hints.add(&tcp(0, seq, b"x"));
        }
        assert!(hints.service.is_none() && !hints.client_decided);
        assert_eq!(hints.streams[0].bytes, hints.streams[0].segments.values().map(Vec::len).sum::<usize>());
    }

    #[test]
    fn names_are_normalised_or_refused() {
        assert_eq!(normalise_name(b"WWW.Example.COM.").as_deref(), Some("www.example.com"));
        assert_eq!(normalise_name(b"bad name"), None);
        assert_eq!(normalise_name(b"a/b"), None);
        assert_eq!(normalise_name(&[0xff, 0xfe]), None);
        assert_eq!(normalise_name(b""), None);
    }
}
