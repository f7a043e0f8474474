//! The templates icr exports and how a record fills them.
//!
//! Two kinds, kept apart because pmacct drops the counters of records whose
//! template carries natEvent (docs/design.md, "IPFIX"):
//! - RFC 8158 NAT44 session create/delete events (natEvent 4 and 5), what
//!   NAT-keyed collectors already read from carrier-grade NATs;
//! - the ICR itself, without natEvent: the 5-tuple with the post-NAT source,
//!   both directions' counters (RFC 5103 reverse elements for the way back,
//!   which nfdump reads as `out_packets`/`out_bytes`), the end reason, the
//!   device's MAC, VLAN and PPPoE ids, and the names icr found, as
//!   enterprise-specific strings under the provider's enterprise number.
//!
//! An ICR template comes in four forms, by address family and by whether
//! the record has a public (post-NAT) end: a field that does not apply is
//! left out rather than sent as zero.
use std::net::IpAddr;

use crate::record::{EndReason, Icr};

/// RFC 5103's enterprise number for reverse (responder-to-initiator) elements.
const REVERSE_PEN: u32 = 29305;
/// A field of variable length (RFC 7011 §7).
pub const VARIABLE: u16 = 0xFFFF;

/// The longest service name and subscriber sent, and the longest list of
/// DNS questions, in bytes: the largest record then still fits one message
/// under the path MTU (a unit test checks it). A DNS name has at most 253
/// characters, so a real service name is never cut; a long list of
/// questions loses its last ones, and the cut is counted.
pub const MAX_NAME: usize = 320;
pub const MAX_SUBSCRIBER: usize = 128;
pub const MAX_QUESTIONS: usize = 600;

/// Where an element's number is defined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registry {
    /// IANA's IPFIX registry.
    Iana,
    /// RFC 5103's reverse elements (enterprise 29305).
    Reverse,
    /// The provider's enterprise number (`[ipfix] enterprise_number`).
    Provider,
}

/// One field of a template, in the order records carry them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// observationTimeMilliseconds (323): when the NAT event happened.
    EventTime,
    /// natEvent (230).
    NatEvent,
    /// flowStartMilliseconds (152), flowEndMilliseconds (153).
    Start,
    End,
    /// sourceIPv4Address (8) / sourceIPv6Address (27): the device.
    DeviceV4,
    DeviceV6,
    /// sourceTransportPort (7).
    DevicePort,
    /// destinationIPv4Address (12) / destinationIPv6Address (28).
    RemoteV4,
    RemoteV6,
    /// destinationTransportPort (11).
    RemotePort,
    /// protocolIdentifier (4).
    Protocol,
    /// postNATSourceIPv4Address (225) / postNATSourceIPv6Address (281).
    PublicV4,
    PublicV6,
    /// postNAPTSourceTransportPort (227).
    PublicPort,
    /// packetDeltaCount (2), octetDeltaCount (1): device to remote.
    PacketsUp,
    BytesUp,
    /// The same, reversed (RFC 5103): remote to device.
    PacketsDown,
    BytesDown,
    /// flowEndReason (136).
    EndReason,
    /// sourceMacAddress (56).
    DeviceMac,
    /// vlanId (58): the outer tag; dot1qCustomerVlanId (245): the inner.
    OuterVlan,
    InnerVlan,
    /// Enterprise elements under the provider's number.
    PppoeSession,
    ServiceName,
    ServiceSource,
    Ech,
    DnsQuestions,
    Subscriber,
}

/// The provider's enterprise elements: their numbers and names, as a
/// collector is configured with them (docs/ipfix.md).
pub const ENTERPRISE_ELEMENTS: [(Field, u16, &str); 6] = [
    (Field::PppoeSession, 11, "pppoeSessionId (unsigned16)"),
    (Field::ServiceName, 12, "serviceName (string)"),
    (Field::ServiceSource, 13, "serviceNameSource (string: tls_sni, quic_sni, http_host, dns)"),
    (Field::Ech, 14, "encryptedClientHello (boolean)"),
    (Field::DnsQuestions, 15, "dnsQuestions (string: QNAME/QTYPE, space-separated)"),
    (Field::Subscriber, 16, "subscriberId (string)"),
];

impl Field {
    /// The element's registry, number and length on the wire.
    pub fn spec(self) -> (Registry, u16, u16) {
        use Registry::*;
        let enterprise = |field| {
            let (_, id, _) =
                ENTERPRISE_ELEMENTS.iter().find(|(f, _, _)| *f == field).expect("every enterprise field is listed");
            *id
        };
        match self {
            Self::EventTime => (Iana, 323, 8),
            Self::NatEvent => (Iana, 230, 1),
            Self::Start => (Iana, 152, 8),
            Self::End => (Iana, 153, 8),
            Self::DeviceV4 => (Iana, 8, 4),
            Self::DeviceV6 => (Iana, 27, 16),
            Self::DevicePort => (Iana, 7, 2),
            Self::RemoteV4 => (Iana, 12, 4),
            Self::RemoteV6 => (Iana, 28, 16),
            Self::RemotePort => (Iana, 11, 2),
            Self::Protocol => (Iana, 4, 1),
            Self::PublicV4 => (Iana, 225, 4),
            Self::PublicV6 => (Iana, 281, 16),
            Self::PublicPort => (Iana, 227, 2),
            Self::PacketsUp => (Iana, 2, 8),
            Self::BytesUp => (Iana, 1, 8),
            Self::PacketsDown => (Reverse, 2, 8),
            Self::BytesDown => (Reverse, 1, 8),
            Self::EndReason => (Iana, 136, 1),
            Self::DeviceMac => (Iana, 56, 6),
            Self::OuterVlan => (Iana, 58, 2),
            Self::InnerVlan => (Iana, 245, 2),
            Self::PppoeSession => (Provider, enterprise(self), 2),
            Self::Ech => (Provider, enterprise(self), 1),
            Self::ServiceName | Self::ServiceSource | Self::DnsQuestions | Self::Subscriber => {
                (Provider, enterprise(self), VARIABLE)
            }
        }
    }
}

/// A template: its id and fields.
#[derive(Debug)]
pub struct Template {
    pub id: u16,
    pub fields: &'static [Field],
}

/// RFC 8158 NAT44 session create/delete (natEvent 4 and 5).
pub const NAT44_EVENT: Template = Template {
    id: 256,
    fields: {
        use Field::*;
        &[EventTime, NatEvent, DeviceV4, DevicePort, PublicV4, PublicPort, RemoteV4, RemotePort, Protocol, DeviceMac]
    },
};

/// What every ICR template carries after its addresses.
macro_rules! icr_template {
    ($id:expr, [$($addresses:ident),*]) => {
        Template {
            id: $id,
            fields: {
                use Field::*;
                &[Start, End, $($addresses,)* Protocol, PacketsUp, BytesUp, PacketsDown, BytesDown, EndReason,
                DeviceMac, OuterVlan, InnerVlan, PppoeSession, ServiceName, ServiceSource, Ech, DnsQuestions,
                Subscriber]
            },
        }
    };
}

pub const ICR_V4_NAT: Template = icr_template!(257, [DeviceV4, DevicePort, RemoteV4, RemotePort, PublicV4, PublicPort]);
pub const ICR_V4: Template = icr_template!(258, [DeviceV4, DevicePort, RemoteV4, RemotePort]);
pub const ICR_V6_NAT: Template = icr_template!(259, [DeviceV6, DevicePort, RemoteV6, RemotePort, PublicV6, PublicPort]);
pub const ICR_V6: Template = icr_template!(260, [DeviceV6, DevicePort, RemoteV6, RemotePort]);

/// Every template, as a template set announces them.
pub const ALL: [&Template; 5] = [&NAT44_EVENT, &ICR_V4_NAT, &ICR_V4, &ICR_V6_NAT, &ICR_V6];

/// RFC 8158's natEvent values icr sends.
const NAT44_SESSION_CREATE: u8 = 4;
const NAT44_SESSION_DELETE: u8 = 5;

impl Template {
    /// The template record (RFC 7011 §3.4.1): id, field count, then each
    /// field specifier, enterprise ones with the enterprise bit and number.
    pub fn write_record(&self, enterprise_number: u32, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&(self.fields.len() as u16).to_be_bytes());
        for field in self.fields {
            let (registry, id, length) = field.spec();
            let pen = match registry {
                Registry::Iana => None,
                Registry::Reverse => Some(REVERSE_PEN),
                Registry::Provider => Some(enterprise_number),
            };
            let id = if pen.is_some() { id | 0x8000 } else { id };
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&length.to_be_bytes());
            if let Some(pen) = pen {
                out.extend_from_slice(&pen.to_be_bytes());
            }
        }
    }
}

/// One record made ready for its templates: the values that take work to
/// compute (the list of questions, the cut strings), computed once.
pub struct Prepared<'a> {
    record: &'a Icr,
    template: &'static Template,
    proto: u8,
    service_name: &'a str,
    subscriber: &'a str,
    questions: String,
    /// Some text was cut to fit (counted by the exporter).
    pub truncated: bool,
}

impl<'a> Prepared<'a> {
    pub fn new(record: &'a Icr) -> Self {
        let v6 = matches!(record.device.ip.unwrap_or(record.remote.ip), IpAddr::V6(_));
        let public = record.public.filter(|public| public.ip.is_ipv6() == v6);
        let template = match (v6, public.is_some()) {
            (false, true) => &ICR_V4_NAT,
            (false, false) => &ICR_V4,
            (true, true) => &ICR_V6_NAT,
            (true, false) => &ICR_V6,
        };
        let name = record.service.as_ref().map_or("", |s| s.name.as_str());
        let subscriber = record.device.subscriber.as_deref().unwrap_or("");
        let (service_name, cut_name) = cut(name, MAX_NAME);
        let (subscriber, cut_subscriber) = cut(subscriber, MAX_SUBSCRIBER);
        let (questions, cut_questions) = questions(record);
        Self {
            record,
            template,
            // The record spells what it read from the packet; 255 is IANA's
            // "reserved" should a stored spelling not parse.
            proto: record.proto.parse::<probe_common::Proto>().map_or(255, u8::from),
            service_name,
            subscriber,
            questions,
            truncated: cut_name || cut_subscriber || cut_questions,
        }
    }

    /// The ICR's template.
    pub fn template(&self) -> &'static Template {
        self.template
    }

    /// The NAT44 events of a record translated from IPv4 to IPv4: a
    /// session created at its start and deleted at its end.
    pub fn nat_events(&self) -> Option<[u8; 2]> {
        (self.template.id == ICR_V4_NAT.id).then_some([NAT44_SESSION_CREATE, NAT44_SESSION_DELETE])
    }

    /// Appends the data record of `template` (the ICR's own, or the NAT
    /// event one with `event`) to `out`.
    pub fn write(&self, template: &Template, event: Option<u8>, out: &mut Vec<u8>) {
        let r = self.record;
        let millis = |time: &chrono::DateTime<chrono::Utc>| time.timestamp_millis().max(0) as u64;
        let v4 = |ip: Option<IpAddr>| match ip {
            Some(IpAddr::V4(ip)) => ip.octets(),
            _ => [0; 4],
        };
        let v6 = |ip: Option<IpAddr>| match ip {
            Some(IpAddr::V6(ip)) => ip.octets(),
            _ => [0; 16],
        };
        let public = r.public.map(|p| p.ip);
        for field in template.fields {
            match field {
                Field::EventTime => {
                    let at = if event == Some(NAT44_SESSION_DELETE) { &r.end } else { &r.start };
                    out.extend_from_slice(&millis(at).to_be_bytes());
                }
                Field::NatEvent => out.push(event.unwrap_or(0)),
                Field::Start => out.extend_from_slice(&millis(&r.start).to_be_bytes()),
                Field::End => out.extend_from_slice(&millis(&r.end).to_be_bytes()),
                Field::DeviceV4 => out.extend_from_slice(&v4(r.device.ip)),
                Field::DeviceV6 => out.extend_from_slice(&v6(r.device.ip)),
                Field::DevicePort => out.extend_from_slice(&r.device.port.unwrap_or(0).to_be_bytes()),
                Field::RemoteV4 => out.extend_from_slice(&v4(Some(r.remote.ip))),
                Field::RemoteV6 => out.extend_from_slice(&v6(Some(r.remote.ip))),
                Field::RemotePort => out.extend_from_slice(&r.remote.port.to_be_bytes()),
                Field::Protocol => out.push(self.proto),
                Field::PublicV4 => out.extend_from_slice(&v4(public)),
                Field::PublicV6 => out.extend_from_slice(&v6(public)),
                Field::PublicPort => out.extend_from_slice(&r.public.map_or(0, |p| p.port).to_be_bytes()),
                Field::PacketsUp => out.extend_from_slice(&r.packets_up.to_be_bytes()),
                Field::BytesUp => out.extend_from_slice(&r.bytes_up.to_be_bytes()),
                Field::PacketsDown => out.extend_from_slice(&r.packets_down.to_be_bytes()),
                Field::BytesDown => out.extend_from_slice(&r.bytes_down.to_be_bytes()),
                Field::EndReason => out.push(end_reason(r.end_reason)),
                Field::DeviceMac => {
                    let mac = r.device.mac.as_deref().and_then(|m| m.parse::<probe_common::Mac>().ok());
                    out.extend_from_slice(&mac.map_or([0; 6], |m| m.0));
                }
                // 0: untagged (no VLAN has id 0).
                Field::OuterVlan => out.extend_from_slice(&r.device.vlan.first().copied().unwrap_or(0).to_be_bytes()),
                Field::InnerVlan => out.extend_from_slice(&r.device.vlan.get(1).copied().unwrap_or(0).to_be_bytes()),
                Field::PppoeSession => out.extend_from_slice(&r.device.pppoe_session.unwrap_or(0).to_be_bytes()),
                Field::ServiceName => write_string(self.service_name, out),
                Field::ServiceSource => write_string(r.service.as_ref().map_or("", |s| s.source.as_str()), out),
                // RFC 7011 §6.1.5: true is 1, false 2.
                Field::Ech => out.push(if r.service.as_ref().is_some_and(|s| s.ech) { 1 } else { 2 }),
                Field::DnsQuestions => write_string(&self.questions, out),
                Field::Subscriber => write_string(self.subscriber, out),
            }
        }
    }
}

/// IANA's flowEndReason: idle 1, active 2, end of flow 3, forced end 4.
fn end_reason(reason: EndReason) -> u8 {
    match reason {
        EndReason::Idle => 1,
        EndReason::Active => 2,
        EndReason::Fin | EndReason::Rst => 3,
        EndReason::Shutdown => 4,
    }
}

/// A variable-length field (RFC 7011 §7): one length octet below 255,
/// else 255 and two length octets.
pub fn write_string(text: &str, out: &mut Vec<u8>) {
    let length = text.len();
    if length < 255 {
        out.push(length as u8);
    } else {
        out.push(255);
        out.extend_from_slice(&(length as u16).to_be_bytes());
    }
    out.extend_from_slice(text.as_bytes());
}

/// `text` cut to at most `max` bytes at a character boundary, and whether it was cut.
fn cut(text: &str, max: usize) -> (&str, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let end = (0..=max).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    (&text[..end], true)
}

/// Every DNS question of the flow as `QNAME/QTYPE`, space-separated, whole
/// questions only up to [`MAX_QUESTIONS`] bytes; and whether some were left out.
fn questions(record: &Icr) -> (String, bool) {
    let mut out = String::new();
    for dns in &record.dns_all {
        let extra = usize::from(!out.is_empty()) + dns.qname.len() + 1 + dns.qtype.len();
        if out.len() + extra > MAX_QUESTIONS {
            return (out, true);
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&dns.qname);
        out.push('/');
        out.push_str(&dns.qtype);
    }
    (out, false)
}
