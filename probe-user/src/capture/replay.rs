//! `icr replay`: a capture file through the same XDP program (in the kernel,
//! with `BPF_PROG_TEST_RUN`, its clock set to each packet's capture time) and
//! the same assembler as the live agent. This is how evidence is reprocessed
//! and how the probe is tested on captures it did not make.
use std::{borrow::Cow, fs::File, io::BufReader, path::Path};

use anyhow::{Context as _, Result, bail};
use pcap_file::{
    DataLink, Endianness, TsResolution,
    pcap::PcapReader,
    pcapng::{Block, PcapNgReader, blocks::interface_description::InterfaceDescriptionOption},
};
use probe_common::role;

use crate::{
    capture::clock::Clock,
    capture::events::{self, ProbeEvent},
    capture::flow::{Assembler, Timeouts},
    capture::nat::NatTable,
    capture::probe::{EventReader, Probe, ProbeOptions},
    record::{EndReason, Icr},
};

const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];
/// How often (capture time) due flows are closed.
const TICK_NS: u64 = 1_000_000_000;

/// What a replay saw, besides its records.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplayStats {
    pub packets: u64,
    /// Packets of link types the probe cannot take (counted, skipped).
    pub unsupported_link: u64,
    /// Damaged packet records (counted, skipped).
    pub damaged: u64,
    pub records: u64,
}

/// Replays `path`, handing every record to `sink` as it closes.
pub fn replay(
    path: &Path,
    options: ProbeOptions,
    timeouts: Timeouts,
    sink: impl FnMut(Vec<Icr>) -> Result<()>,
) -> Result<ReplayStats> {
    Replayer::load(options)?.replay(path, timeouts, sink)
}

/// A probe loaded once for replaying capture files one after another: each
/// file starts from an empty kernel flow table and empty event buffers, as
/// with a freshly loaded probe. Loading (the verifier) is what a short
/// capture's replay spends most of its time on, and under emulation (a VM
/// without KVM) it takes tens of seconds.
pub struct Replayer {
    probe: Probe,
    buffers: EventReader,
}

impl Replayer {
    pub fn load(options: ProbeOptions) -> Result<Self> {
        let mut probe = Probe::load(options)?;
        let buffers = probe.open_events()?;
        Ok(Self { probe, buffers })
    }

    /// Replays `path`, handing every record to `sink` as it closes.
    pub fn replay(
        &mut self,
        path: &Path,
        timeouts: Timeouts,
        sink: impl FnMut(Vec<Icr>) -> Result<()>,
    ) -> Result<ReplayStats> {
        self.reset()?;
        let result = replay_loaded(&mut self.probe, &mut self.buffers, path, timeouts, sink);
        // A failed file may leave flows and events behind: the next one must not see them.
        if result.is_err() {
            let _ = self.reset();
        }
        result
    }

    /// Forgets what an earlier file left. A replay that ends normally leaves
    /// nothing (closing every flow empties the kernel table, the clock is
    /// reset): this is for one that failed midway, which leaves flows,
    /// unread events and its capture clock.
    fn reset(&mut self) -> Result<()> {
        for key in self.probe.flow_keys()? {
            self.probe.remove_flow(&key)?;
        }
        let mut stale = Vec::new();
        events::drain(&mut self.buffers, &mut stale);
        self.probe.set_clock_override(0)
    }
}

fn replay_loaded(
    probe: &mut Probe,
    buffers: &mut EventReader,
    path: &Path,
    timeouts: Timeouts,
    mut sink: impl FnMut(Vec<Icr>) -> Result<()>,
) -> Result<ReplayStats> {
    let mut assembler = Assembler::new(timeouts, Clock::capture(), false);
    let nat = NatTable::default();
    let mut stats = ReplayStats::default();
    let mut events = Vec::new();
    let mut next_tick_ns = 0u64;
    let mut last_ns = 0u64;

    let mut on_packet = |ts_ns: u64, frame: &[u8], probe: &mut Probe| -> Result<()> {
        stats.packets += 1;
        // Time never runs backwards for the flow table, even in a capture that does.
        let ts_ns = ts_ns.max(last_ns).max(1);
        last_ns = ts_ns;
        probe.set_clock_override(ts_ns)?;
        let out = probe.test_run(role::LAN, frame)?;
        if out.action != 2 {
            bail!("the probe returned XDP action {} instead of XDP_PASS", out.action);
        }
        events::drain(buffers, &mut events);
        for event in events.drain(..) {
            assembler.on_event(event, &nat);
        }
        if ts_ns >= next_tick_ns {
            assembler.tick(ts_ns, probe, &nat)?;
            next_tick_ns = ts_ns + TICK_NS;
            let records = assembler.take_records();
            stats.records += records.len() as u64;
            sink(records)?;
            let closed = assembler.take_closed_flows();
            assembler.release(&closed, probe)?;
        }
        Ok(())
    };
    let mut unsupported_link = 0;
    let damaged = read_capture(path, |ts_ns, link, data| match to_ethernet(link, data) {
        Some(frame) => on_packet(ts_ns, &frame, probe),
        None => {
            unsupported_link += 1;
            Ok(())
        }
    })?;
    stats.unsupported_link = unsupported_link;
    stats.damaged = damaged;

    let mut rest = Vec::new();
    events::drain(buffers, &mut rest);
    for event in rest {
        if !matches!(event, ProbeEvent::Malformed { .. }) {
            assembler.on_event(event, &nat);
        }
    }
    // The capture ends: what is still open closes as if the probe stopped.
    assembler.close_all(last_ns.max(1), EndReason::Shutdown, probe, &nat)?;
    let records = assembler.take_records();
    stats.records += records.len() as u64;
    sink(records)?;
    let closed = assembler.take_closed_flows();
    assembler.release(&closed, probe)?;
    probe.set_clock_override(0)?;
    Ok(stats)
}

/// Calls `each(timestamp_ns, link_type, bytes)` for every packet of a pcap or
/// pcapng file; returns how many damaged packet records were skipped.
///
/// Files are read as capture tools write them, not as a validator would
/// like: a packet longer than the file's snap length (`tcpdump -s`) is
/// handed over as far as it was captured; a record that contradicts itself
/// (a fraction of a second of a second or more, more bytes captured than
/// sent, a packet of an undeclared interface) is skipped and counted; a
/// record whose length runs past the end of the file (a capture cut short)
/// ends the file there, counted. Only a file that is no capture at all is
/// refused.
pub fn read_capture(path: &Path, mut each: impl FnMut(u64, DataLink, &[u8]) -> Result<()>) -> Result<u64> {
    let open = || -> Result<BufReader<File>> {
        Ok(BufReader::new(File::open(path).with_context(|| format!("opening {}", path.display()))?))
    };
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut open()?, &mut magic)
        .with_context(|| format!("{} is too short to be a capture", path.display()))?;
    let mut damaged = 0u64;
    let cut_short = |error: pcap_file::PcapError, damaged: &mut u64| {
        *damaged += 1;
        log::warn!(
            "{}: a record runs past the end of the file or cannot be framed ({error}): the file ends there",
            path.display()
        );
    };
    if magic == [0x0a, 0x0d, 0x0d, 0x0a] {
        let mut reader =
            PcapNgReader::new(open()?).with_context(|| format!("{} is not a readable pcapng file", path.display()))?;
        // Per interface: link type and timestamp units (ns per unit).
        let mut interfaces: Vec<(DataLink, u128, u128)> = Vec::new();
        loop {
            // The section's byte order, for the block that follows (only a
            // section header, which carries its own, changes it).
            let endianness = reader.section().endianness;
            // Raw blocks, decoded here: the crate's reader stops for good at
            // a block it cannot decode, even one whose framing is whole.
            let raw = match reader.next_raw_block() {
                None => break,
                Some(Ok(raw)) => raw,
                Some(Err(error)) => {
                    cut_short(error, &mut damaged);
                    break;
                }
            };
            let block = match endianness {
                Endianness::Big => raw.try_into_block::<byteorder::BigEndian>(),
                Endianness::Little => raw.try_into_block::<byteorder::LittleEndian>(),
            };
            let Ok(block) = block else {
                damaged += 1;
                continue;
            };
            match block {
                Block::SectionHeader(_) => interfaces.clear(),
                Block::InterfaceDescription(interface) => {
                    let resolution = interface.options.iter().find_map(|option| match option {
                        InterfaceDescriptionOption::IfTsResol(r) => Some(*r),
                        _ => None,
                    });
                    let (num, den) = ts_units(resolution.unwrap_or(6));
                    interfaces.push((interface.linktype, num, den));
                }
                Block::EnhancedPacket(packet) => {
                    let Some(&(link, num, den)) = interfaces.get(packet.interface_id as usize) else {
                        damaged += 1;
                        continue;
                    };
                    // pcap-file reports the raw timestamp units as if they were ns.
                    let units = packet.timestamp.as_nanos();
                    let ns = u64::try_from(units * num / den).unwrap_or(u64::MAX);
                    each(ns, link, &packet.data)?;
                }
                Block::SimplePacket(packet) => {
                    let link = interfaces.first().map_or(DataLink::ETHERNET, |i| i.0);
                    each(0, link, &packet.data)?;
                }
                _ => {}
            }
        }
    } else {
        let mut reader = PcapReader::new(open()?)
            .with_context(|| format!("{} is neither a pcap nor a pcapng file", path.display()))?;
        let header = reader.header();
        let ns_per_unit = match header.ts_resolution {
            TsResolution::MicroSecond => 1_000,
            TsResolution::NanoSecond => 1,
        };
        // Raw records, checked here: the crate's own check refuses every
        // packet longer than the snap length, i.e. every file taken with one.
        loop {
            let packet = match reader.next_raw_packet() {
                None => break,
                Some(Ok(packet)) => packet,
                Some(Err(error)) => {
                    cut_short(error, &mut damaged);
                    break;
                }
            };
            let fraction_ns = u64::from(packet.ts_frac) * ns_per_unit;
            if fraction_ns >= 1_000_000_000 || packet.incl_len > packet.orig_len {
                damaged += 1;
                continue;
            }
            each(u64::from(packet.ts_sec) * 1_000_000_000 + fraction_ns, header.datalink, &packet.data)?;
        }
    }
    if damaged > 0 {
        log::warn!("{}: {damaged} damaged packet record(s) skipped", path.display());
    }
    Ok(damaged)
}

/// ns per timestamp unit as a fraction, from pcapng's `if_tsresol`.
fn ts_units(resolution: u8) -> (u128, u128) {
    let exponent = u32::from(resolution & 0x7f);
    if resolution & 0x80 == 0 {
        // 10^-exponent seconds.
        if exponent <= 9 { (10u128.pow(9 - exponent), 1) } else { (1, 10u128.pow((exponent - 9).min(30))) }
    } else {
        // 2^-exponent seconds.
        (1_000_000_000, 1u128 << exponent.min(100))
    }
}

/// The packet as an Ethernet frame, which is what the XDP program parses:
/// other link layers get a synthetic Ethernet header. `None`: unsupported.
pub fn to_ethernet(link: DataLink, data: &[u8]) -> Option<Cow<'_, [u8]>> {
    let with_header = |source: [u8; 6], ethertype: [u8; 2], payload: &[u8]| {
        let mut frame = Vec::with_capacity(ETH_HEADER + payload.len());
        frame.extend_from_slice(&[0; 6]);
        frame.extend_from_slice(&source);
        frame.extend_from_slice(&ethertype);
        frame.extend_from_slice(payload);
        Cow::Owned(frame)
    };
    let by_ip_version = |payload: &[u8]| -> Option<[u8; 2]> {
        match payload.first()? >> 4 {
            4 => Some(ETHERTYPE_IPV4),
            6 => Some(ETHERTYPE_IPV6),
            _ => None,
        }
    };
    match link {
        DataLink::ETHERNET => (data.len() >= ETH_HEADER).then_some(Cow::Borrowed(data)),
        DataLink::LINUX_SLL => {
            // Packet type, ARPHRD type, address length, 8 address bytes, protocol.
            let header = data.get(..16)?;
            let mut source = [0u8; 6];
            if u16::from_be_bytes([header[4], header[5]]) == 6 {
                source.copy_from_slice(&header[6..12]);
            }
            Some(with_header(source, [header[14], header[15]], &data[16..]))
        }
        DataLink::LINUX_SLL2 => {
            // Protocol, reserved, ifindex, ARPHRD type, packet type, address length, 8 address bytes.
            let header = data.get(..20)?;
            let mut source = [0u8; 6];
            if header[11] == 6 {
                source.copy_from_slice(&header[12..18]);
            }
            Some(with_header(source, [header[0], header[1]], &data[20..]))
        }
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => Some(with_header([0; 6], by_ip_version(data)?, data)),
        DataLink::NULL | DataLink::LOOP => {
            let payload = data.get(4..)?;
            Some(with_header([0; 6], by_ip_version(payload)?, payload))
        }
        DataLink::PPP => {
            // Optional address/control bytes (FF 03), then the PPP protocol.
            let rest = data.strip_prefix(&[0xff, 0x03]).unwrap_or(data);
            // With protocol field compression an odd first byte is the protocol.
            let (protocol, payload) = match rest.first()? {
                byte if byte & 1 == 1 => (u16::from(*byte), rest.get(1..)?),
                _ => (u16::from_be_bytes([rest[0], *rest.get(1)?]), rest.get(2..)?),
            };
            let ethertype = match protocol {
                0x21 => ETHERTYPE_IPV4,
                0x57 => ETHERTYPE_IPV6,
                _ => return None,
            };
            Some(with_header([0; 6], ethertype, payload))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_units() {
        assert_eq!(ts_units(6), (1000, 1), "microseconds by default");
        assert_eq!(ts_units(9), (1, 1));
        assert_eq!(ts_units(12), (1, 1000));
        assert_eq!(ts_units(0x80 | 10), (1_000_000_000, 1024));
    }

    #[test]
    fn link_layers_become_ethernet() {
        let ip = [0x45, 0, 0, 20];
        let raw = to_ethernet(DataLink::RAW, &ip).unwrap();
        assert_eq!(&raw[12..14], &ETHERTYPE_IPV4);
        assert_eq!(&raw[14..], &ip);
        let null = to_ethernet(DataLink::NULL, &[2, 0, 0, 0, 0x60, 0, 0, 0]).unwrap();
        assert_eq!(&null[12..14], &ETHERTYPE_IPV6);
        let mut sll = vec![0, 0, 0, 1, 0, 6, 2, 0, 0, 0, 0, 0x17, 0, 0, 0x08, 0x00];
        sll.extend_from_slice(&ip);
        let frame = to_ethernet(DataLink::LINUX_SLL, &sll).unwrap();
        assert_eq!(&frame[6..12], &[2, 0, 0, 0, 0, 0x17]);
        assert_eq!(&frame[12..], &[0x08, 0x00, 0x45, 0, 0, 20]);
        let ppp = to_ethernet(DataLink::PPP, &[0xff, 0x03, 0x00, 0x21, 0x45]).unwrap();
        assert_eq!(&ppp[12..], &[0x08, 0x00, 0x45]);
        assert!(to_ethernet(DataLink::PPP, &[0xc0, 0x21, 1]).is_none(), "LCP");
        assert!(to_ethernet(DataLink::ETHERNET, &[0; 10]).is_none());
        assert!(to_ethernet(DataLink::LINUX_SLL, &[0; 8]).is_none());
        assert!(to_ethernet(DataLink::FDDI, &[0; 40]).is_none());
    }
}
