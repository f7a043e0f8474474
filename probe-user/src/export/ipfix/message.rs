//! RFC 7011 framing: messages of sets under a length bound, with the
//! sequence number counting data records.
use std::collections::BTreeMap;

use super::templates::{self, Prepared};
use crate::record::Icr;

pub const VERSION: u16 = 10;
pub const HEADER_LEN: usize = 16;
const SET_HEADER_LEN: usize = 4;
const TEMPLATE_SET: u16 = 2;

/// The longest message on an Ethernet path: 1500 bytes less the IPv6 (40)
/// and UDP (8) headers, so that no datagram is fragmented on the way.
pub const PATH_MTU_MESSAGE: usize = 1452;

/// What one message carries: its bytes and the records in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub bytes: Vec<u8>,
    /// The ICRs whose data records it carries (each whole in one message).
    pub records: usize,
    /// Its data records (an ICR's own, and its NAT events).
    pub data_records: u32,
}

/// One exporting process's state towards one collector: its observation
/// domain, enterprise number, message bound and sequence number.
#[derive(Clone, Debug)]
pub struct Encoder {
    domain: u32,
    enterprise_number: u32,
    max_len: usize,
    sequence: u32,
    /// Records whose text was cut to fit (counted for the metrics).
    pub truncated: u64,
}

impl Encoder {
    pub fn new(domain: u32, enterprise_number: u32, max_len: usize) -> Self {
        Self { domain, enterprise_number, max_len, sequence: 0, truncated: 0 }
    }

    /// The sequence number the next message carries.
    pub fn sequence(&self) -> u32 {
        self.sequence
    }

    /// A new transport session (a TCP reconnection) counts from zero.
    pub fn restart_sequence(&mut self) {
        self.sequence = 0;
    }

    /// The template set alone.
    pub fn templates(&self, export_time: u32) -> Message {
        let mut builder = Builder::new(self.max_len);
        builder.push_templates(self.enterprise_number);
        builder.finish(self.header(export_time))
    }

    /// `records` as messages under the bound, each ICR with its NAT events
    /// in one message; the first message opens with the template set when
    /// `with_templates` (alone, when the first record does not fit beside it).
    pub fn encode(&mut self, records: &[Icr], export_time: u32, with_templates: bool) -> Vec<Message> {
        let mut messages = Vec::new();
        let mut builder = Builder::new(self.max_len);
        if with_templates {
            builder.push_templates(self.enterprise_number);
        }
        let mut group = Vec::new();
        for record in records {
            let prepared = Prepared::new(record);
            self.truncated += u64::from(prepared.truncated);
            group.clear();
            for event in prepared.nat_events().into_iter().flatten() {
                let mut bytes = Vec::new();
                prepared.write(&templates::NAT44_EVENT, Some(event), &mut bytes);
                group.push((templates::NAT44_EVENT.id, bytes));
            }
            let mut bytes = Vec::new();
            prepared.write(prepared.template(), None, &mut bytes);
            group.push((prepared.template().id, bytes));
            if !builder.fits(&group) && (builder.records > 0 || builder.has_templates) {
                let full = std::mem::replace(&mut builder, Builder::new(self.max_len));
                messages.push(self.seal(full, export_time));
            }
            // The caps on names (templates::MAX_*) make every group fit a
            // message of its own; a test checks it.
            builder.push_group(&group);
        }
        if builder.records > 0 || builder.has_templates {
            messages.push(self.seal(builder, export_time));
        }
        messages
    }

    fn seal(&mut self, builder: Builder, export_time: u32) -> Message {
        let message = builder.finish(self.header(export_time));
        self.sequence = self.sequence.wrapping_add(message.data_records);
        message
    }

    fn header(&self, export_time: u32) -> Header {
        Header { export_time, sequence: self.sequence, domain: self.domain }
    }
}

struct Header {
    export_time: u32,
    sequence: u32,
    domain: u32,
}

/// One message being filled: its sets by set id (a data set per template).
struct Builder {
    max_len: usize,
    len: usize,
    sets: BTreeMap<u16, Vec<u8>>,
    records: usize,
    data_records: u32,
    has_templates: bool,
}

impl Builder {
    fn new(max_len: usize) -> Self {
        Self { max_len, len: HEADER_LEN, sets: BTreeMap::new(), records: 0, data_records: 0, has_templates: false }
    }

    fn push_templates(&mut self, enterprise_number: u32) {
        let set = self.sets.entry(TEMPLATE_SET).or_default();
        for template in templates::ALL {
            template.write_record(enterprise_number, set);
        }
        self.len += SET_HEADER_LEN + set.len();
        self.has_templates = true;
    }

    /// The bytes `group` adds: its records, and a set header for each set
    /// the message does not have yet (counted once per set).
    fn added(&self, group: &[(u16, Vec<u8>)]) -> usize {
        let mut new_sets: Vec<u16> = group.iter().map(|(id, _)| *id).filter(|id| !self.sets.contains_key(id)).collect();
        new_sets.dedup();
        new_sets.len() * SET_HEADER_LEN + group.iter().map(|(_, bytes)| bytes.len()).sum::<usize>()
    }

    fn fits(&self, group: &[(u16, Vec<u8>)]) -> bool {
        self.len + self.added(group) <= self.max_len
    }

    fn push_group(&mut self, group: &[(u16, Vec<u8>)]) {
        self.len += self.added(group);
        for (id, bytes) in group {
            self.sets.entry(*id).or_default().extend_from_slice(bytes);
            self.data_records += 1;
        }
        self.records += 1;
    }

    fn finish(self, header: Header) -> Message {
        let mut bytes = Vec::with_capacity(self.len);
        bytes.extend_from_slice(&VERSION.to_be_bytes());
        bytes.extend_from_slice(&(self.len as u16).to_be_bytes());
        bytes.extend_from_slice(&header.export_time.to_be_bytes());
        bytes.extend_from_slice(&header.sequence.to_be_bytes());
        bytes.extend_from_slice(&header.domain.to_be_bytes());
        for (id, set) in &self.sets {
            bytes.extend_from_slice(&id.to_be_bytes());
            bytes.extend_from_slice(&((SET_HEADER_LEN + set.len()) as u16).to_be_bytes());
            bytes.extend_from_slice(set);
        }
        debug_assert_eq!(bytes.len(), self.len);
        Message { bytes, records: self.records, data_records: self.data_records }
    }
}
