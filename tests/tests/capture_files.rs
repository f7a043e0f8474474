//! Capture files as people take them, written byte by byte here: a snap
//! length (`tcpdump -s 98`, every longer packet cut to it), and a damaged
//! packet record among good ones. `icr replay` reads them: what was
//! captured is processed as far as it goes, a name that was cut off is not
//! invented, and a damaged record is skipped and counted.
use std::{path::Path, process::Command};

use icr_lab::{TempDir, icr_binary};
use serde_json::Value;

const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x17];
const GATEWAY_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const CLIENT: [u8; 4] = [192, 168, 1, 23];
const SERVER: [u8; 4] = [192, 0, 2, 10];
const SNAPLEN: u32 = 98;
const T0: u32 = 1_700_000_000;

/// One packet: its capture time, and the frame as it was on the wire.
struct Packet {
    sec: u32,
    usec: u32,
    frame: Vec<u8>,
}

/// A classic pcap file (microseconds, Ethernet) with `snaplen`: each frame
/// is cut to it, its record keeping the original length.
fn pcap(snaplen: u32, packets: &[Packet]) -> Vec<u8> {
    let mut file = Vec::new();
    for field in [0xa1b2_c3d4u32.to_le_bytes(), [2, 0, 4, 0], [0; 4], [0; 4], snaplen.to_le_bytes(), 1u32.to_le_bytes()]
    {
        file.extend_from_slice(&field);
    }
    for packet in packets {
        let kept = &packet.frame[..packet.frame.len().min(snaplen as usize)];
        for field in [packet.sec, packet.usec, kept.len() as u32, packet.frame.len() as u32] {
            file.extend_from_slice(&field.to_le_bytes());
        }
        file.extend_from_slice(kept);
    }
    file
}

/// An Ethernet + IPv4 + TCP frame; `to_server` picks the direction.
fn tcp(to_server: bool, sport: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let (src_mac, dst_mac, src, dst, src_port, dst_port) = if to_server {
        (CLIENT_MAC, GATEWAY_MAC, CLIENT, SERVER, sport, 443)
    } else {
        (GATEWAY_MAC, CLIENT_MAC, SERVER, CLIENT, 443, sport)
    };
    let mut frame = Vec::new();
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 20 + payload.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let sum = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!(((folded & 0xffff) + (folded >> 16)) as u16)).to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&src_port.to_be_bytes());
    frame.extend_from_slice(&dst_port.to_be_bytes());
    frame.extend_from_slice(&seq.to_be_bytes());
    frame.extend_from_slice(&ack.to_be_bytes());
    frame.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// A TLS record holding a ClientHello whose only extension names `sni`.
fn client_hello(sni: &str) -> Vec<u8> {
    let name = sni.as_bytes();
    let mut server_name = vec![0];
    server_name.extend_from_slice(&(name.len() as u16).to_be_bytes());
    server_name.extend_from_slice(name);
    let mut extension = (server_name.len() as u16).to_be_bytes().to_vec();
    extension.extend_from_slice(&server_name);
    let mut extensions = vec![0, 0];
    extensions.extend_from_slice(&(extension.len() as u16).to_be_bytes());
    extensions.extend_from_slice(&extension);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(&extensions);
    let mut handshake = vec![1];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![22, 3, 1];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// A connection from the client's `sport` at second `at`: handshake, the
/// ClientHello in segments of `segment` bytes, and both FINs.
fn connection(sport: u16, at: u32, hello: &[u8], segment: usize) -> Vec<Packet> {
    let (isn, server_isn) = (1000u32, 5000u32);
    let mut frames = vec![
        tcp(true, sport, isn, 0, 0x02, &[]),
        tcp(false, sport, server_isn, isn + 1, 0x12, &[]),
        tcp(true, sport, isn + 1, server_isn + 1, 0x10, &[]),
    ];
    let mut seq = isn + 1;
    for chunk in hello.chunks(segment) {
        frames.push(tcp(true, sport, seq, server_isn + 1, 0x18, chunk));
        seq += chunk.len() as u32;
    }
    frames.push(tcp(true, sport, seq, server_isn + 1, 0x11, &[]));
    frames.push(tcp(false, sport, server_isn + 1, seq + 1, 0x11, &[]));
    frames.push(tcp(true, sport, seq + 1, server_isn + 2, 0x10, &[]));
    frames.into_iter().enumerate().map(|(i, frame)| Packet { sec: at, usec: i as u32 * 1000, frame }).collect()
}

/// `icr replay FILE`: its records, and what it said on stderr.
fn replay(file: &Path) -> (Vec<Value>, String) {
    let out = Command::new(icr_binary()).arg("replay").arg(file).output().expect("running icr replay");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "icr replay refused {}: {stderr}", file.display());
    let records =
        String::from_utf8_lossy(&out.stdout).lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    (records, stderr)
}

fn by_port(records: &[Value], port: u16) -> &Value {
    records
        .iter()
        .find(|r| r["device"]["port"] == port)
        .unwrap_or_else(|| panic!("no record from port {port}: {records:#?}"))
}

#[test]
fn a_capture_with_a_snap_length_replays_without_inventing_cut_names() {
    let dir = TempDir::new("icr-capture-files");
    // Port 40001: the ClientHello in one segment, cut by the snap length
    // before its name; port 40002: the same in segments that each fit.
    let cut = client_hello("cut-off-before-the-name.example.test");
    let whole = client_hello("whole.example.test");
    assert!(tcp(true, 0, 0, 0, 0, &cut).len() > SNAPLEN as usize + 40, "the name lies past the snap length");
    let mut packets = connection(40001, T0, &cut, cut.len());
    packets.extend(connection(40002, T0 + 1, &whole, 40));
    let file = dir.path().join("snapped.pcap");
    std::fs::write(&file, pcap(SNAPLEN, &packets)).unwrap();

    let (records, stderr) = replay(&file);
    assert_eq!(records.len(), 2, "{stderr}\n{records:#?}");
    let cut_record = by_port(&records, 40001);
    assert_eq!(cut_record["service"], Value::Null, "a name that was cut off is not invented: {cut_record}");
    assert_eq!(cut_record["remote"]["ip"], "192.0.2.10");
    // Every packet of it counted, the cut one too (its bytes as far as
    // they were captured: the probe bounds an IP length by the frame).
    assert_eq!(
        (&cut_record["packets_up"], &cut_record["packets_down"]),
        (&Value::from(5), &Value::from(2)),
        "{cut_record}"
    );
    let named = by_port(&records, 40002);
    assert_eq!(named["service"]["name"], "whole.example.test", "{named}");
    assert_eq!(named["service"]["source"], "tls_sni");
}

#[test]
fn a_damaged_packet_record_is_skipped_and_counted_not_the_file() {
    let dir = TempDir::new("icr-capture-files");
    let mut packets = connection(40003, T0, &client_hello("before.example.test"), 1000);
    let mut damaged = connection(40004, T0 + 1, &client_hello("damaged.example.test"), 1000);
    // The ClientHello's record: a fraction of a second of a whole second.
    damaged[3].usec = 1_000_000;
    packets.extend(damaged);
    packets.extend(connection(40005, T0 + 2, &client_hello("after.example.test"), 1000));
    let file = dir.path().join("damaged.pcap");
    std::fs::write(&file, pcap(65535, &packets)).unwrap();

    let (records, stderr) = replay(&file);
    assert_eq!(by_port(&records, 40003)["service"]["name"], "before.example.test", "{records:#?}");
    assert_eq!(by_port(&records, 40005)["service"]["name"], "after.example.test", "{records:#?}");
    assert_eq!(by_port(&records, 40004)["service"], Value::Null, "its hello was in the damaged record");
    assert!(stderr.contains("1 damaged packet record(s) skipped"), "{stderr}");

    // A capture cut short inside its last record: what came before stands.
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&file, &bytes).unwrap();
    let (records, stderr) = replay(&file);
    assert_eq!(by_port(&records, 40005)["service"]["name"], "after.example.test", "{records:#?}");
    assert!(stderr.contains("2 damaged packet record(s) skipped"), "{stderr}");
}
