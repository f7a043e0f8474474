//! DNS messages: the question and the answers (A, AAAA, CNAME chains,
//! HTTPS/SVCB targets and address hints). Over TCP a message is prefixed by
//! its 2-byte length.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use simple_dns::{
    Packet,
    rdata::{RData, SVCParam},
};

use super::parse::Parse;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The transaction id: pairs a response with its query.
    pub id: u16,
    pub response: bool,
    /// The first question's name (lower-case, no trailing dot) and type.
    pub qname: String,
    pub qtype: String,
    pub answers: Vec<Answer>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The owner name of the record (lower-case, no trailing dot).
    pub name: String,
    /// An address, a name (CNAME, HTTPS/SVCB target), as text.
    pub data: String,
    /// Set for A, AAAA and address hints: what the per-device cache keeps.
    pub ip: Option<IpAddr>,
    pub ttl: u32,
}

/// A DNS name in RFC 1035 presentation form, from its labels' octets:
/// printable ASCII as is (letters lower-cased), `.` and `\` inside a label
/// escaped with a backslash, every other octet as `\DDD`. Nothing is
/// dropped and nothing raw comes out, so a tunnel's or a typo's names are
/// evidence like any other. `None` for the root (no label).
pub fn presentation<'a>(labels: impl IntoIterator<Item = &'a [u8]>) -> Option<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    for (index, label) in labels.into_iter().enumerate() {
        if index > 0 {
            out.push('.');
        }
        for &octet in label {
            match octet {
                b'.' | b'\\' => {
                    out.push('\\');
                    out.push(char::from(octet));
                }
                0x21..=0x7e => out.push(char::from(octet.to_ascii_lowercase())),
                _ => {
                    let _ = write!(out, "\\{octet:03}");
                }
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Whether `text` is a name exactly as [`presentation`] writes one (for
/// names read back from elsewhere, which must be what capture made).
pub fn is_presentation(text: &str) -> bool {
    let mut labels: Vec<Vec<u8>> = vec![Vec::new()];
    let mut bytes = text.bytes();
    while let Some(byte) = bytes.next() {
        let label = labels.last_mut().expect("one label at least");
        match byte {
            b'.' => labels.push(Vec::new()),
            b'\\' => match bytes.next() {
                Some(escaped @ (b'.' | b'\\')) => label.push(escaped),
                Some(first) => {
                    let digits = [Some(first), bytes.next(), bytes.next()];
                    let value = digits.iter().try_fold(0u16, |sum, digit| match digit {
                        Some(d @ b'0'..=b'9') => Some(sum * 10 + u16::from(d - b'0')),
                        _ => None,
                    });
                    match value.and_then(|v| u8::try_from(v).ok()) {
                        Some(octet) => label.push(octet),
                        None => return false,
                    }
                }
                None => return false,
            },
            other => label.push(other),
        }
    }
    let fits =
        labels.iter().all(|l| (1..=63).contains(&l.len())) && labels.iter().map(|l| l.len() + 1).sum::<usize>() <= 255;
    fits && presentation(labels.iter().map(Vec::as_slice)).as_deref() == Some(text)
}

fn name_of(name: &simple_dns::Name) -> Option<String> {
    presentation(name.as_bytes())
}

/// Parses one DNS message (UDP payload). A message whose answers are
/// damaged or cut still gives its question.
pub fn message(bytes: &[u8]) -> Option<Message> {
    let Ok(packet) = Packet::parse(bytes) else { return question_only(bytes) };
    let question = packet.questions.first()?;
    let qname = name_of(&question.qname)?;
    let qtype = type_name(u16::from(question.qtype));
    let mut answers = Vec::new();
    for record in &packet.answers {
        let Some(name) = name_of(&record.name) else { continue };
        let ttl = record.ttl;
        let mut push = |data: String, ip: Option<IpAddr>| answers.push(Answer { name: name.clone(), data, ip, ttl });
        match &record.rdata {
            RData::A(a) => {
                let ip = IpAddr::V4(Ipv4Addr::from(a.address));
                push(ip.to_string(), Some(ip));
            }
            RData::AAAA(aaaa) => {
                let ip = IpAddr::V6(Ipv6Addr::from(aaaa.address));
                push(ip.to_string(), Some(ip));
            }
            RData::CNAME(cname) => {
                if let Some(target) = name_of(&cname.0) {
                    push(target, None);
                }
            }
            RData::HTTPS(simple_dns::rdata::HTTPS(svcb)) | RData::SVCB(svcb) => {
                if let Some(target) = name_of(&svcb.target) {
                    push(target, None);
                }
                for param in svcb.iter_params() {
                    match param {
                        SVCParam::Ipv4Hint(ips) => {
                            for ip in ips {
                                let ip = IpAddr::V4(Ipv4Addr::from(*ip));
                                push(ip.to_string(), Some(ip));
                            }
                        }
                        SVCParam::Ipv6Hint(ips) => {
                            for ip in ips {
                                let ip = IpAddr::V6(Ipv6Addr::from(*ip));
                                push(ip.to_string(), Some(ip));
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Message {
        id: packet.id(),
        response: packet.has_flags(simple_dns::PacketFlag::RESPONSE),
        qname,
        qtype,
        answers,
    })
}

/// The header and first question of a message the full parser refused.
fn question_only(bytes: &[u8]) -> Option<Message> {
    let header = bytes.get(..12)?;
    if u16::from_be_bytes([header[4], header[5]]) == 0 {
        return None;
    }
    let mut at = 12;
    let mut labels: Vec<&[u8]> = Vec::new();
    loop {
        let length = usize::from(*bytes.get(at)?);
        at += 1;
        match length {
            0 => break,
            1..=63 => {
                labels.push(bytes.get(at..at + length)?);
                at += length;
            }
            // A compression pointer or an extended label: not in a question we trust.
            _ => return None,
        }
        if at > 12 + 255 {
            return None;
        }
    }
    let qtype = u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?);
    let qname = presentation(labels)?;
    Some(Message {
        id: u16::from_be_bytes([header[0], header[1]]),
        response: header[2] & 0x80 != 0,
        qname,
        qtype: type_name(qtype),
        answers: Vec::new(),
    })
}

/// DNS over TCP: the messages of a stream, each after its 2-byte length.
/// `NeedMore` while the first message is incomplete.
pub fn tcp_messages(stream: &[u8]) -> Parse<Vec<Message>> {
    let mut messages = Vec::new();
    let mut rest = stream;
    while rest.len() >= 2 {
        let length = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        if rest.len() < 2 + length {
            break;
        }
        match message(&rest[2..2 + length]) {
            Some(message) => messages.push(message),
            None => return if messages.is_empty() { Parse::NotThis } else { Parse::Done(messages) },
        }
        rest = &rest[2 + length..];
    }
    if messages.is_empty() { Parse::NeedMore } else { Parse::Done(messages) }
}

/// The mnemonic of an RR type (RFC 3597's `TYPEn` for the others).
fn type_name(code: u16) -> String {
    let name = match code {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        64 => "SVCB",
        65 => "HTTPS",
        255 => "ANY",
        257 => "CAA",
        other => return format!("TYPE{other}"),
    };
    name.to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use simple_dns::{CLASS, Label, Name, QCLASS, QTYPE, Question, ResourceRecord, TYPE, rdata};

    use super::*;

    pub fn response(qname: &str, qtype: TYPE, answers: Vec<ResourceRecord<'static>>) -> Vec<u8> {
        let mut packet = Packet::new_reply(7);
        packet.questions.push(Question::new(
            Name::new_unchecked(qname).into_owned(),
            QTYPE::TYPE(qtype),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        packet.answers = answers;
        packet.build_bytes_vec().unwrap()
    }

    pub fn a_record(name: &str, ip: [u8; 4]) -> ResourceRecord<'static> {
        ResourceRecord::new(
            Name::new_unchecked(name).into_owned(),
            CLASS::IN,
            300,
            RData::A(rdata::A { address: u32::from_be_bytes(ip) }),
        )
    }

    #[test]
    fn a_cname_chain_and_addresses() {
        let cname = ResourceRecord::new(
            Name::new_unchecked("www.example.com").into_owned(),
            CLASS::IN,
            60,
            RData::CNAME(rdata::CNAME(Name::new_unchecked("edge.CDN.example.net").into_owned())),
        );
        let bytes = response("WWW.example.com", TYPE::A, vec![cname, a_record("edge.cdn.example.net", [192, 0, 2, 7])]);
        let m = message(&bytes).unwrap();
        assert!(m.response);
        assert_eq!((m.qname.as_str(), m.qtype.as_str()), ("www.example.com", "A"));
        assert_eq!(m.answers.len(), 2);
        assert_eq!(m.answers[0].data, "edge.cdn.example.net");
        assert_eq!(m.answers[1].ip, Some("192.0.2.7".parse().unwrap()));
        assert_eq!(m.answers[1].ttl, 300);
    }

    #[test]
    fn https_records_give_their_target_and_hints() {
        let mut svcb = rdata::SVCB::new(1, Name::new_unchecked("svc.example.com").into_owned());
        svcb.set_ipv4hint(&[0xc000_0201]);
        let https = ResourceRecord::new(
            Name::new_unchecked("example.com").into_owned(),
            CLASS::IN,
            120,
            RData::HTTPS(rdata::HTTPS(svcb)),
        );
        let m = message(&response("example.com", TYPE::HTTPS, vec![https])).unwrap();
        assert_eq!(m.qtype, "HTTPS");
        let data: Vec<&str> = m.answers.iter().map(|a| a.data.as_str()).collect();
        assert_eq!(data, ["svc.example.com", "192.0.2.1"]);
    }

    #[test]
    fn names_keep_every_octet_in_presentation_form() {
        let labels: [&[u8]; 3] = [b"ab=cd+ef/GH", b"odd label\xff.x\\", b"example"];
        let name = presentation(labels).unwrap();
        assert_eq!(name, "ab=cd+ef/gh.odd\\032label\\255\\.x\\\\.example");
        assert!(is_presentation(&name));
        for made_elsewhere in
            ["UPPER.example", "a..b", "raw space.example", "bad\\99x.example", "\\256.example", "a\\061b.example", ""]
        {
            assert!(!is_presentation(made_elsewhere), "{made_elsewhere:?} is not as capture writes it");
        }
        assert!(is_presentation("www.example.com") && is_presentation("_dmarc.example.com"));
        // Through the parser: a question with such labels keeps them.
        let mut packet = Packet::new_query(9);
        let qname = Name::new_with_labels(&[Label::new_unchecked(&b"a=b+c/d"[..]), Label::new_unchecked(&b"T"[..])]);
        packet.questions.push(Question::new(qname, QTYPE::TYPE(TYPE::TXT), QCLASS::CLASS(CLASS::IN), false));
        let m = message(&packet.build_bytes_vec().unwrap()).unwrap();
        assert_eq!((m.qname.as_str(), m.qtype.as_str()), ("a=b+c/d.t", "TXT"));
    }

    #[test]
    fn tcp_framing_and_garbage() {
        let one = response("a.example", TYPE::AAAA, vec![]);
        let mut stream = (one.len() as u16).to_be_bytes().to_vec();
        stream.extend_from_slice(&one);
        assert_eq!(tcp_messages(&stream[..10]), Parse::NeedMore);
        let Parse::Done(messages) = tcp_messages(&stream) else { panic!() };
        assert_eq!(messages[0].qtype, "AAAA");
        assert_eq!(message(&[1, 2, 3]), None);
        let mut cut = response("cut.example", TYPE::A, vec![a_record("cut.example", [192, 0, 2, 1])]);
        cut.truncate(cut.len() - 3);
        let m = message(&cut).expect("the question of a cut response");
        assert_eq!((m.qname.as_str(), m.qtype.as_str(), m.response), ("cut.example", "A", true));
        assert!(m.answers.is_empty());
        assert_eq!(message(&[0; 12]), None, "no question");
        assert_eq!(type_name(4242), "TYPE4242");
    }
}
