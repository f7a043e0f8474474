//! The real XDP program, loaded into the running kernel and run on crafted
//! frames with `BPF_PROG_TEST_RUN`: every frame must pass unmodified, and the
//! flow table, counters and events must say what the frame was.
//! Needs root (CAP_BPF, CAP_NET_ADMIN).
use etherparse::{PacketBuilder, TcpHeader, VlanId};
use icr::{
    capture::events::{self, ProbeEvent},
    capture::probe::{EventPath, EventReader, Probe, ProbeOptions},
    capture::tuple::{Tuple, ipv4},
};
use icr_test_kit::netns::Netns;
use probe_common::{FlowEvent, FlowValue, Proto, SYN_RETRY_SHIFT, counter, event_kind, role, tcp_flags};

const XDP_PASS: u32 = 2;
/// What the TC egress program returns for every packet: no verdict of its
/// own, so the packet goes on (and any classifier after it decides).
const TC_ACT_UNSPEC: u32 = -1i32 as u32;
const DEVICE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x17];
const GATEWAY_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

struct Harness {
    probe: Probe,
    buffers: EventReader,
}

impl Harness {
    fn new() -> Self {
        Self::with_table(ProbeOptions::default())
    }

    fn with_table(options: ProbeOptions) -> Self {
        let mut probe = Probe::load(options).expect("loading the probe (are we root?)");
        let buffers = probe.open_events().unwrap();
        Self { probe, buffers }
    }

    /// Runs the program on `frame` and checks the fail-open contract.
    fn run(&mut self, role: u8, frame: &[u8]) {
        let out = self.probe.test_run(role, frame).unwrap();
        assert_eq!(out.action, XDP_PASS, "every packet must pass");
        assert_eq!(out.data_out, frame, "the packet must leave unmodified");
    }

    /// Runs the TC egress program on `frame`, sent by the gateway itself or
    /// forwarded, and checks the same contract.
    ///
    /// Returns false, having run nothing, for a forwarded packet on a kernel
    /// whose `BPF_PROG_TEST_RUN` cannot set `ingress_ifindex` (5.10's
    /// refuses the context): there only the lab tests show it.
    fn egress(&mut self, frame: &[u8], from_gateway: bool) -> bool {
        let out = match self.probe.egress_test_run(frame, from_gateway) {
            Ok(out) => out,
            Err(error) if !from_gateway && refused_by_kernel(&error) => {
                eprintln!("this kernel's BPF_PROG_TEST_RUN cannot mark a packet forwarded: not run");
                return false;
            }
            Err(error) => panic!("the egress program on {frame:02x?}: {error:#}"),
        };
        assert_eq!(out.action, TC_ACT_UNSPEC, "every packet must go on");
        assert_eq!(out.data_out, frame, "the packet must leave unmodified");
        true
    }

    /// Flow start/end events (hints are checked apart, with `hints`).
    fn events(&mut self) -> Vec<FlowEvent> {
        self.all_events()
            .into_iter()
            .filter_map(|event| match event {
                ProbeEvent::Flow(event) => Some(event),
                ProbeEvent::Hint(..) => None,
                other => panic!("unexpected event {other:?}"),
            })
            .collect()
    }

    fn all_events(&mut self) -> Vec<ProbeEvent> {
        let mut out = Vec::new();
        events::drain(&mut self.buffers, &mut out);
        out
    }

    fn hints(&mut self) -> Vec<(FlowEvent, Vec<u8>)> {
        self.all_events()
            .into_iter()
            .filter_map(|event| match event {
                ProbeEvent::Hint(event, frame) => Some((event, frame)),
                _ => None,
            })
            .collect()
    }

    fn flow(&self, tuple: &Tuple) -> Option<(FlowValue, usize)> {
        let (key, dir) = tuple.key();
        self.probe.flow(&key).unwrap().map(|value| (value, dir as usize))
    }

    fn counter(&self, index: u32) -> u64 {
        self.probe.counters().unwrap().get(index)
    }
}

fn tcp_frame(t: &Tuple, flags: u8, payload: &[u8], mac: [u8; 6]) -> Vec<u8> {
    let mut tcp = TcpHeader::new(t.src_port, t.dst_port, 1000, 64240);
    tcp.syn = flags & tcp_flags::SYN != 0;
    tcp.ack = flags & tcp_flags::ACK != 0;
    tcp.fin = flags & tcp_flags::FIN != 0;
    tcp.rst = flags & tcp_flags::RST != 0;
    let builder = PacketBuilder::ethernet2(mac, GATEWAY_MAC);
    let builder = match (t.src, t.dst) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => builder.ipv4(s.octets(), d.octets(), 64),
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => builder.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed families"),
    };
    let builder = builder.tcp_header(tcp);
    let mut frame = Vec::new();
    builder.write(&mut frame, payload).unwrap();
    frame
}

fn udp_frame(t: &Tuple, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(DEVICE_MAC, GATEWAY_MAC);
    let builder = match (t.src, t.dst) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => builder.ipv4(s.octets(), d.octets(), 64),
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => builder.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed families"),
    };
    let mut frame = Vec::new();
    builder.udp(t.src_port, t.dst_port).write(&mut frame, payload).unwrap();
    frame
}

fn client() -> Tuple {
    Tuple { src: ipv4(192, 168, 1, 23), src_port: 51544, dst: ipv4(203, 0, 113, 10), dst_port: 443, proto: Proto::Tcp }
}

#[test]
fn tcp_connection_is_one_flow_with_both_directions_counted() {
    let mut h = Harness::new();
    let up = client();
    let syn = tcp_frame(&up, tcp_flags::SYN, &[], DEVICE_MAC);
    h.run(role::LAN, &syn);

    let (value, dir) = h.flow(&up).expect("a flow entry for the SYN");
    assert_eq!(value.packets[dir], 1);
    assert_eq!(value.bytes[dir], 40, "IP bytes of a bare SYN");
    assert_eq!(value.mac[dir], DEVICE_MAC);
    assert_eq!(value.roles[dir], role::LAN);
    assert_eq!(value.first_dir as usize, dir);
    assert_eq!(value.first_tcp_flags, tcp_flags::SYN);
    let events = h.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kind, event_kind::FLOW_START);
    assert_eq!(events[0].key, up.key().0);
    assert_eq!(events[0].mac_src, DEVICE_MAC);
    assert_eq!(events[0].role, role::LAN);

    let syn_ack = tcp_frame(&up.reversed(), tcp_flags::SYN | tcp_flags::ACK, &[], GATEWAY_MAC);
    h.run(role::WAN, &syn_ack);
    let server_data = tcp_frame(&up.reversed(), tcp_flags::ACK, &[9u8; 300], GATEWAY_MAC);
    h.run(role::WAN, &server_data);
    assert!(h.hints().is_empty(), "the server's data is no hint (not DNS)");
    let data = tcp_frame(&up, tcp_flags::ACK, &[7u8; 100], DEVICE_MAC);
    h.run(role::LAN, &data);
    let hints = h.hints();
    assert_eq!(hints.len(), 1, "the client's first data is a hint");
    assert_eq!(hints[0].1, data, "the whole frame follows the event");
    assert_eq!(usize::from(hints[0].0.payload_offset), data.len() - 100);
    assert_eq!(hints[0].0.tcp_seq, 1000);
    let (value, dir) = h.flow(&up).unwrap();
    let back = 1 - dir;
    assert_eq!((value.packets[dir], value.packets[back]), (2, 2));
    assert_eq!((value.bytes[dir], value.bytes[back]), (40 + 140, 40 + 340));
    assert_eq!(value.roles[back], role::WAN);
    assert_eq!(value.tcp_flags[back], tcp_flags::SYN | tcp_flags::ACK);
    assert!(h.events().is_empty(), "mid-flow packets send no events");

    let fin = tcp_frame(&up, tcp_flags::FIN | tcp_flags::ACK, &[], DEVICE_MAC);
    h.run(role::LAN, &fin);
    let events = h.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, event_kind::FLOW_END);
    let fin_again = tcp_frame(&up, tcp_flags::FIN | tcp_flags::ACK, &[], DEVICE_MAC);
    h.run(role::LAN, &fin_again);
    assert!(h.events().is_empty(), "one end event per side");
    let fin_back = tcp_frame(&up.reversed(), tcp_flags::FIN | tcp_flags::ACK, &[], GATEWAY_MAC);
    h.run(role::WAN, &fin_back);
    let events = h.events();
    assert_eq!(events.len(), 1, "the other side's FIN is reported too");
    assert_eq!(events[0].kind, event_kind::FLOW_END);

    assert_eq!(h.counter(counter::PACKETS), 7);
    assert_eq!(h.counter(counter::FLOWS_CREATED), 1);
    assert_eq!(h.counter(counter::EVENTS_SENT), 4);
    assert_eq!(h.counter(counter::HINTS_SENT), 1);
    assert_eq!(h.counter(counter::EVENTS_LOST), 0);
}

#[test]
fn ipv6_udp_and_vlan_tagged_ipv4_are_tracked() {
    let mut h = Harness::new();
    let dns6 = Tuple {
        src: "2001:db8::23".parse().unwrap(),
        src_port: 40000,
        dst: "2001:db8:53::1".parse().unwrap(),
        dst_port: 53,
        proto: Proto::Udp,
    };
    h.run(role::LAN, &udp_frame(&dns6, &[0u8; 30]));
    let (value, dir) = h.flow(&dns6).expect("IPv6 UDP flow");
    assert_eq!(value.packets[dir], 1);
    assert_eq!(value.bytes[dir], 40 + 8 + 30);

    let v4 =
        Tuple { src: ipv4(10, 1, 0, 5), src_port: 5000, dst: ipv4(10, 2, 0, 9), dst_port: 6000, proto: Proto::Udp };
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(DEVICE_MAC, GATEWAY_MAC)
        .single_vlan(VlanId::try_new(100).unwrap())
        .ipv4([10, 1, 0, 5], [10, 2, 0, 9], 64)
        .udp(5000, 6000)
        .write(&mut frame, &[1, 2, 3])
        .unwrap();
    h.run(role::LAN, &frame);
    assert!(h.flow(&v4).is_some(), "the VLAN tag is looked through");
    let (value, _) = h.flow(&v4).unwrap();
    assert_eq!(value.vlan, [100, 0]);
    let events = h.all_events();
    let starts = events.iter().filter(|e| matches!(e, ProbeEvent::Flow(f) if f.kind == event_kind::FLOW_START)).count();
    let hints: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            ProbeEvent::Hint(f, _) => Some(f),
            _ => None,
        })
        .collect();
    assert_eq!(starts, 2);
    assert_eq!(hints.len(), 1, "DNS is a hint, other UDP is not");
    assert_eq!(hints[0].key, dns6.key().0);
}

#[test]
fn ipv6_extension_headers_are_walked_to_the_ports() {
    let mut h = Harness::new();
    let up = Tuple {
        src: "2001:db8::23".parse().unwrap(),
        src_port: 41000,
        dst: "2001:db8::443".parse().unwrap(),
        dst_port: 443,
        proto: Proto::Tcp,
    };
    let mut frame = tcp_frame(&up, tcp_flags::SYN, &[], DEVICE_MAC);
    // Insert a hop-by-hop header (8 bytes, one PadN option) after the IPv6 header.
    const IPV6_START: usize = 14;
    let next_header = frame[IPV6_START + 6];
    frame[IPV6_START + 6] = 0;
    let payload_len = u16::from_be_bytes([frame[IPV6_START + 4], frame[IPV6_START + 5]]) + 8;
    frame[IPV6_START + 4..IPV6_START + 6].copy_from_slice(&payload_len.to_be_bytes());
    let hop_by_hop = [next_header, 0, 1, 4, 0, 0, 0, 0];
    frame.splice(IPV6_START + 40..IPV6_START + 40, hop_by_hop);

    h.run(role::LAN, &frame);
    let (value, dir) = h.flow(&up).expect("ports found behind the extension header");
    assert_eq!(value.tcp_flags[dir], tcp_flags::SYN);
}

#[test]
fn malformed_and_non_ip_frames_pass_untouched_and_are_counted() {
    let mut h = Harness::new();
    let good = tcp_frame(&client(), tcp_flags::SYN, &[], DEVICE_MAC);
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x43; // IPv4 with a 12-byte header
    let mut bad_version = good.clone();
    bad_version[14] = 0x65;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // (Frames shorter than an Ethernet header never reach XDP; the kernel
        // refuses them in BPF_PROG_TEST_RUN too.)
        ("Ethernet header only", good[..14].to_vec()),
        ("truncated IPv4 header", good[..14 + 12].to_vec()),
        ("truncated TCP header", good[..14 + 20 + 10].to_vec()),
        ("IHL below 5", bad_ihl),
        ("IPv4 ethertype, version 6", bad_version),
        ("truncated VLAN tag", {
            let mut f = good[..14].to_vec();
            f[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&[0, 100]);
            f
        }),
    ];
    for (name, frame) in &cases {
        let out = h.probe.test_run(role::LAN, frame).unwrap();
        assert_eq!(out.action, XDP_PASS, "{name}");
        assert_eq!(&out.data_out, frame, "{name}");
    }
    let mut arp = good[..14].to_vec();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    arp.extend_from_slice(&[0u8; 28]);
    h.run(role::LAN, &arp);

    assert_eq!(h.counter(counter::MALFORMED), cases.len() as u64);
    assert_eq!(h.counter(counter::NOT_IP), 1);
    assert_eq!(h.counter(counter::FLOWS_CREATED), 0);
    assert!(h.probe.flow_keys().unwrap().is_empty());
    assert!(h.events().is_empty());
}

#[test]
fn a_full_flow_table_is_counted_not_evicted() {
    let mut h = Harness::with_table(ProbeOptions { flow_table_size: 2, ..ProbeOptions::default() });
    for port in [1000, 1001, 1002] {
        let t = Tuple { src_port: port, ..client() };
        h.run(role::LAN, &tcp_frame(&t, tcp_flags::SYN, &[], DEVICE_MAC));
    }
    assert_eq!(h.counter(counter::FLOWS_CREATED), 2);
    assert_eq!(h.counter(counter::FLOW_TABLE_FULL), 1);
    assert!(h.flow(&Tuple { src_port: 1000, ..client() }).is_some(), "old flows stay");
    assert_eq!(h.events().len(), 2);
}

#[test]
fn a_late_wan_packet_of_no_known_flow_makes_no_flow_and_is_counted() {
    let mut h = Harness::new();
    // The server's retransmitted FIN, a stray ACK and a RST, to the public
    // address, after the connection was written and its entries removed.
    let from_server = Tuple {
        src: ipv4(203, 0, 113, 10),
        src_port: 443,
        dst: ipv4(198, 51, 100, 1),
        dst_port: 10007,
        proto: Proto::Tcp,
    };
    for flags in [tcp_flags::FIN | tcp_flags::ACK, tcp_flags::ACK, tcp_flags::RST] {
        h.run(role::WAN, &tcp_frame(&from_server, flags, &[], GATEWAY_MAC));
    }
    assert!(h.flow(&from_server).is_none(), "a late packet opens nothing");
    assert!(h.events().is_empty());
    assert_eq!(h.counter(counter::WAN_STRAYS), 3);
    assert_eq!(h.counter(counter::FLOWS_CREATED), 0);

    // A SYN from the WAN (an inbound connection) and its SYN-ACK to a
    // device's SYN still open flows.
    let inbound = Tuple { src_port: 40000, dst_port: 22, ..from_server };
    h.run(role::WAN, &tcp_frame(&inbound, tcp_flags::SYN, &[], GATEWAY_MAC));
    h.run(role::WAN, &tcp_frame(&from_server, tcp_flags::SYN | tcp_flags::ACK, &[], GATEWAY_MAC));
    assert!(h.flow(&inbound).is_some() && h.flow(&from_server).is_some());
    // And the packets after them are counted in those flows, not as strays.
    h.run(role::WAN, &tcp_frame(&from_server, tcp_flags::FIN | tcp_flags::ACK, &[], GATEWAY_MAC));
    assert_eq!(h.flow(&from_server).unwrap().0.packets.iter().sum::<u64>(), 2);
    // On the LAN a packet without SYN still opens a flow: a connection the
    // probe joins mid-way, at its first load.
    h.run(role::LAN, &tcp_frame(&client(), tcp_flags::ACK, &[], DEVICE_MAC));
    assert!(h.flow(&client()).is_some());
    assert_eq!(h.counter(counter::WAN_STRAYS), 3);
    assert_eq!(h.counter(counter::FLOWS_CREATED), 3);
}

/// The kernel's CLOCK_MONOTONIC, which the probe's clocks read.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes into `now`, which we own.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) }, 0);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[test]
fn mid_flow_packets_never_date_a_flow_before_its_start() {
    // The ring object stamps packets that only update a flow with the
    // coarse clock, which lags by up to a tick: right after the precise
    // start, a plain stamp would fall before it.
    let mut h = Harness::new();
    let up = client();
    let before = monotonic_ns();
    h.run(role::LAN, &tcp_frame(&up, tcp_flags::SYN, &[], DEVICE_MAC));
    h.run(role::WAN, &tcp_frame(&up.reversed(), tcp_flags::SYN | tcp_flags::ACK, &[], GATEWAY_MAC));
    for _ in 0..100 {
        h.run(role::WAN, &tcp_frame(&up.reversed(), tcp_flags::ACK, &[9u8; 300], GATEWAY_MAC));
    }
    let after = monotonic_ns();
    let (value, _) = h.flow(&up).unwrap();
    assert!(
        before <= value.first_ns && value.first_ns <= after,
        "the start is precise: {before} <= {} <= {after}",
        value.first_ns
    );
    assert!(
        value.first_ns <= value.last_ns && value.last_ns <= after,
        "first {} last {} after {after}",
        value.first_ns,
        value.last_ns
    );
    assert_eq!(value.packets.iter().sum::<u64>(), 102);
    let start = h.events();
    assert_eq!(start.len(), 1);
    assert_eq!(start[0].ts_ns, value.first_ns, "the start event carries the flow's start");
}

#[test]
fn the_replay_clock_overrides_kernel_time() {
    let mut h = Harness::new();
    let capture_ns = 1_700_000_000_123_456_000;
    h.probe.set_clock_override(capture_ns).unwrap();
    h.run(role::LAN, &tcp_frame(&client(), tcp_flags::SYN, &[], DEVICE_MAC));
    let (value, _) = h.flow(&client()).unwrap();
    assert_eq!(value.first_ns, capture_ns);
    assert_eq!(h.events()[0].ts_ns, capture_ns);
}

#[test]
fn a_retried_syn_is_dated_and_answers_are_not() {
    let mut h = Harness::new();
    let first_ns = 1_700_000_000_000_000_000;
    let up = client();
    h.probe.set_clock_override(first_ns).unwrap();
    h.run(role::LAN, &tcp_frame(&up, tcp_flags::SYN, &[], DEVICE_MAC));
    assert_eq!(h.flow(&up).unwrap().0.syn_retry, 0, "a first SYN is no retry");
    // Unanswered (a NAT with no public port free), the SYN is sent again 3 s later.
    h.probe.set_clock_override(first_ns + 3_000_000_000).unwrap();
    h.run(role::LAN, &tcp_frame(&up, tcp_flags::SYN, &[], DEVICE_MAC));
    let retried = (3_000_000_000u64 >> SYN_RETRY_SHIFT) as u32;
    assert_eq!(h.flow(&up).unwrap().0.syn_retry, retried);
    // The answer, the handshake's ACK and the server's SYN-ACK sent again move nothing.
    h.probe.set_clock_override(first_ns + 5_000_000_000).unwrap();
    h.run(role::WAN, &tcp_frame(&up.reversed(), tcp_flags::SYN | tcp_flags::ACK, &[], GATEWAY_MAC));
    h.run(role::LAN, &tcp_frame(&up, tcp_flags::ACK, &[], DEVICE_MAC));
    h.run(role::WAN, &tcp_frame(&up.reversed(), tcp_flags::SYN | tcp_flags::ACK, &[], GATEWAY_MAC));
    let (value, dir) = h.flow(&up).unwrap();
    assert_eq!(value.syn_retry, retried);
    assert_eq!(value.packets[dir], 3, "every SYN is counted");
}

#[test]
fn qinq_and_pppoe_sessions_are_parsed_and_kept() {
    let mut h = Harness::new();
    let up = client();
    let inner = tcp_frame(&up, tcp_flags::SYN, &[], DEVICE_MAC);
    // QinQ: 802.1ad outer tag 300, 802.1Q inner tag 20.
    let mut qinq = inner[..12].to_vec();
    qinq.extend_from_slice(&[0x88, 0xa8, 0x01, 0x2c, 0x81, 0x00, 0x00, 0x14]);
    qinq.extend_from_slice(&inner[12..]);
    h.run(role::LAN, &qinq);
    let (value, _) = h.flow(&up).expect("tracked through two tags");
    assert_eq!(value.vlan, [300, 20]);

    // PPPoE session 0x1234 carrying IPv4 (PPP protocol 0x0021).
    let other = Tuple { src_port: 51545, ..client() };
    let ip = &tcp_frame(&other, tcp_flags::SYN, &[], DEVICE_MAC)[14..];
    let mut pppoe = inner[..12].to_vec();
    pppoe.extend_from_slice(&[0x88, 0x64, 0x11, 0x00, 0x12, 0x34]);
    pppoe.extend_from_slice(&((ip.len() + 2) as u16).to_be_bytes());
    pppoe.extend_from_slice(&[0x00, 0x21]);
    pppoe.extend_from_slice(ip);
    h.run(role::LAN, &pppoe);
    let (value, dir) = h.flow(&other).expect("tracked inside PPPoE");
    assert_eq!(value.pppoe_session, 0x1234);
    assert_eq!(value.bytes[dir], 40);
    let starts = h.events();
    assert_eq!(starts.len(), 2);
    assert_eq!(starts[1].pppoe_session, 0x1234);

    // PPP control traffic (LCP, 0xc021) is not IP.
    let mut lcp = pppoe.clone();
    lcp[20..22].copy_from_slice(&[0xc0, 0x21]);
    h.run(role::LAN, &lcp);
    assert_eq!(h.counter(counter::NOT_IP), 1);
}

#[test]
fn hints_stop_at_the_budget() {
    let mut h = Harness::new();
    let up = client();
    h.run(role::LAN, &tcp_frame(&up, tcp_flags::SYN, &[], DEVICE_MAC));
    let segment = tcp_frame(&up, tcp_flags::ACK, &[0x16; 1400], DEVICE_MAC);
    let mut sent = 0;
    for _ in 0..8 {
        h.run(role::LAN, &segment);
        sent += h.hints().len();
    }
    let budget = usize::from(probe_common::HINT_BUDGET);
    assert_eq!(sent, budget.div_ceil(1400), "hints until {budget} payload bytes, then none");
    let (value, dir) = h.flow(&up).unwrap();
    assert_eq!(value.packets[dir], 9, "every packet is still counted");
}

/// A connection's life as frames (role, frame): handshake, the client's
/// first data (a hint), the server's data, a DNS query and answer (hints
/// both ways), and both FINs.
/// A device's DNS exchange with the gateway's own resolver: XDP sees the
/// query arrive, only the egress program sees the answer leave.
fn resolver_exchange() -> (Tuple, Vec<u8>, Vec<u8>) {
    let query = Tuple {
        src: ipv4(192, 168, 1, 23),
        src_port: 40000,
        dst: ipv4(192, 168, 1, 1),
        dst_port: 53,
        proto: Proto::Udp,
    };
    let question = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x07example\x04test\x00\x00\x01\x00\x01";
    let mut answer = question.to_vec();
    answer[2] = 0x81;
    answer[7] = 1;
    answer.extend_from_slice(b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04\xc6\x33\x64\x0a");
    let answer_frame = {
        let builder = PacketBuilder::ethernet2(GATEWAY_MAC, DEVICE_MAC).ipv4([192, 168, 1, 1], [192, 168, 1, 23], 64);
        let mut frame = Vec::new();
        builder.udp(53, 40000).write(&mut frame, &answer).unwrap();
        frame
    };
    (query, udp_frame(&query, question), answer_frame)
}

#[test]
fn the_gateways_own_dns_answer_is_counted_and_handed_over_on_egress() {
    let mut h = Harness::new();
    let (query, question, answer) = resolver_exchange();
    h.run(role::LAN, &question);
    h.egress(&answer, true);
    let (value, up) = h.flow(&query).expect("the query made a flow");
    let down = 1 - up;
    assert_eq!(
        value.packets,
        {
            let mut p = [0; 2];
            p[up] = 1;
            p[down] = 1;
            p
        },
        "both directions counted, once each"
    );
    assert_eq!(value.roles[up], role::LAN);
    assert_eq!(value.roles[down], role::GATEWAY, "the answer is the gateway's own");
    assert_eq!(value.mac[down], GATEWAY_MAC);
    let hints = h.hints();
    assert_eq!(hints.len(), 2, "the query and the answer");
    let (event, frame) = &hints[1];
    assert_eq!((event.role, event.dir as usize, event.kind), (role::GATEWAY, down, event_kind::HINT));
    assert_eq!(frame, &answer, "the whole answer frame");
    assert_eq!(h.counter(counter::FLOWS_CREATED), 1, "egress never creates a flow");

    // Over TCP: the answer segment from port 53 is a hint too.
    let tcp_query = Tuple { src_port: 40001, proto: Proto::Tcp, ..query };
    h.run(role::LAN, &tcp_frame(&tcp_query, tcp_flags::SYN, &[], DEVICE_MAC));
    let tcp_answer =
        tcp_frame(&tcp_query.reversed(), tcp_flags::ACK, b"\x00\x20rest-of-a-dns-answer-over-tcp...", GATEWAY_MAC);
    h.egress(&tcp_answer, true);
    let hints = h.hints();
    assert_eq!(hints.len(), 1);
    assert_eq!((hints[0].0.role, &hints[0].1), (role::GATEWAY, &tcp_answer));
}

#[test]
fn forwarded_and_untracked_packets_are_left_alone_on_egress() {
    let mut h = Harness::new();
    let (query, question, answer) = resolver_exchange();
    h.run(role::LAN, &question);
    h.hints();
    // Forwarded: XDP counted it where it arrived.
    if h.egress(&answer, false) {
        let (value, up) = h.flow(&query).unwrap();
        assert_eq!(value.packets[1 - up], 0, "a forwarded packet is not counted again");
        assert!(h.all_events().is_empty());
    }
    // The gateway's own packet to a device, of no flow a device opened.
    let unsolicited = Tuple {
        src: ipv4(192, 168, 1, 1),
        src_port: 5353,
        dst: ipv4(192, 168, 1, 23),
        dst_port: 5353,
        proto: Proto::Udp,
    };
    h.egress(&udp_frame(&unsolicited, b"hello"), true);
    assert!(h.flow(&unsolicited).is_none(), "egress never creates a flow");
    assert!(h.all_events().is_empty());
    assert_eq!(h.counter(counter::FLOWS_CREATED), 1);
}

#[test]
fn malformed_frames_on_egress_pass_and_are_counted() {
    let mut h = Harness::new();
    let good = tcp_frame(&client().reversed(), tcp_flags::ACK, &[], GATEWAY_MAC);
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x43;
    let mut bad_version = good.clone();
    bad_version[14] = 0x65;
    // (The kernel refuses to test-run a frame whose IP header is cut: the
    // stack never sends one either.)
    let frames = [good[..14 + 20 + 10].to_vec(), bad_ihl, bad_version];
    for frame in &frames {
        h.egress(frame, true);
        // Forwarded frames are not even parsed.
        h.egress(frame, false);
    }
    let mut arp = good[..14].to_vec();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    arp.extend_from_slice(&[0u8; 28]);
    h.egress(&arp, true);
    assert_eq!(h.counter(counter::MALFORMED), frames.len() as u64);
    assert_eq!(h.counter(counter::NOT_IP), 1);
    assert_eq!(h.counter(counter::PACKETS), 0, "PACKETS counts what XDP saw");
    assert!(h.all_events().is_empty());
}

fn a_connection_and_a_lookup() -> Vec<(u8, Vec<u8>)> {
    let up = client();
    let dns = Tuple { dst_port: 53, proto: Proto::Udp, ..client() };
    vec![
        (role::LAN, udp_frame(&dns, &[0x12; 40])),
        (role::WAN, udp_frame(&dns.reversed(), &[0x34; 120])),
        (role::LAN, tcp_frame(&up, tcp_flags::SYN, &[], DEVICE_MAC)),
        (role::WAN, tcp_frame(&up.reversed(), tcp_flags::SYN | tcp_flags::ACK, &[], GATEWAY_MAC)),
        (role::LAN, tcp_frame(&up, tcp_flags::ACK, &[0x16; 600], DEVICE_MAC)),
        (role::LAN, tcp_frame(&up, tcp_flags::ACK, &[0x16; 1400], DEVICE_MAC)),
        (role::WAN, tcp_frame(&up.reversed(), tcp_flags::ACK, &[9; 1000], GATEWAY_MAC)),
        (role::LAN, tcp_frame(&up, tcp_flags::FIN | tcp_flags::ACK, &[], DEVICE_MAC)),
        (role::WAN, tcp_frame(&up.reversed(), tcp_flags::FIN | tcp_flags::ACK, &[], GATEWAY_MAC)),
    ]
}

/// Whether this kernel has what the ring buffer path needs: ring buffers
/// (5.8) and `bpf_xdp_load_bytes` (5.18).
fn kernel_has_ring_path() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release.trim().split(['.', '-']).map(|part| part.parse::<u32>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= (5, 18)
}

#[test]
fn the_ring_buffer_and_the_perf_fallback_deliver_the_same_events() {
    if !kernel_has_ring_path() {
        let error = Probe::load(ProbeOptions { events: Some(EventPath::Ring), ..ProbeOptions::default() })
            .err()
            .expect("no ring path here");
        assert!(format!("{error:#}").contains("bpf_xdp_load_bytes"), "{error:#}");
    }
    let paths: &[EventPath] =
        if kernel_has_ring_path() { &[EventPath::Ring, EventPath::Perf] } else { &[EventPath::Perf] };
    let mut delivered = Vec::new();
    for &path in paths {
        let mut h = Harness::with_table(ProbeOptions { events: Some(path), ..ProbeOptions::default() });
        assert_eq!(h.probe.event_path(), path);
        let mut events = Vec::new();
        for (at, (role, frame)) in a_connection_and_a_lookup().into_iter().enumerate() {
            // The replay clock: the same time stamps on both paths.
            h.probe.set_clock_override(1_000_000 * (at as u64 + 1)).unwrap();
            h.run(role, &frame);
            events.extend(h.all_events());
        }
        let hints = events.iter().filter(|event| matches!(event, ProbeEvent::Hint(..))).count();
        assert_eq!(hints, 4, "{path:?}: the DNS query and answer and the client's two segments: {events:?}");
        for event in &events {
            if let ProbeEvent::Hint(event, frame) = event {
                assert_eq!(usize::from(event.captured_len), frame.len(), "{path:?}");
                assert!(frame.len() > 14 + 20 + 8, "{path:?}: the whole frame, headers and payload");
            }
        }
        assert_eq!(h.counter(counter::EVENTS_LOST), 0, "{path:?}");
        delivered.push(events);
    }
    assert!(
        delivered.windows(2).all(|pair| pair[0] == pair[1]),
        "ring and perf buffers carry the same events and frames"
    );
}

#[test]
fn the_ring_buffer_is_chosen_where_the_kernel_has_it() {
    let probe = Probe::load(ProbeOptions::default()).unwrap();
    let expected = if kernel_has_ring_path() { EventPath::Ring } else { EventPath::Perf };
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(probe.event_path(), expected, "kernel {}", release.trim());
}

/// Waits up to `ms` for an edge-triggered epoll on `fd` to report it readable.
fn woken_within(epoll: i32, ms: i32) -> bool {
    let mut event = libc::epoll_event { events: 0, u64: 0 };
    // SAFETY: one event slot we own.
    let n = unsafe { libc::epoll_wait(epoll, &mut event, 1, ms) };
    assert!(n >= 0, "epoll_wait: {}", std::io::Error::last_os_error());
    n == 1
}

#[test]
fn the_ring_buffer_wakes_the_reader_only_for_a_batch() {
    if !kernel_has_ring_path() {
        return; // the refusal is checked above
    }
    // The default ring, and a small one: the agent sets the threshold from
    // the size it loads.
    for ring_bytes in [probe_common::EVENT_RING_BYTES, 64 << 10] {
        wakes_for_a_batch_only(ring_bytes);
    }
}

fn wakes_for_a_batch_only(ring_bytes: u32) {
    use std::os::fd::AsRawFd as _;
    let options =
        ProbeOptions { events: Some(EventPath::Ring), event_ring_bytes: ring_bytes, ..ProbeOptions::default() };
    // The probe sends through the ring of the CPU it runs on: stay on one.
    pin_to_cpu(0);
    let mut h = Harness::with_table(options);
    let EventReader::Ring(rings) = &h.buffers else { panic!("the ring path was asked for") };
    let ring = &rings.iter().find(|ring| ring.cpu == 0).expect("CPU 0 has a ring").ring;
    // Edge-triggered, as tokio's reactor registers it: only a wakeup
    // from the kernel makes it readable.
    // SAFETY: plain syscalls on fds we own.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(epoll >= 0);
    let mut interest = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLET) as u32, u64: 1 };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, ring.as_raw_fd(), &mut interest) }, 0);
    assert!(!woken_within(epoll, 0), "an empty ring is not readable");

    // One flow start each: 80 bytes and the ring's 8-byte record header.
    let record = (size_of::<FlowEvent>() + 8) as u64;
    let threshold = u64::from(ring_bytes / probe_common::EVENT_RING_WAKEUP_DIVISOR);
    let below = threshold / record - 2;
    let syn = |port: u16| tcp_frame(&Tuple { src_port: port, ..client() }, tcp_flags::SYN, &[], DEVICE_MAC);
    for port in 0..below as u16 {
        h.run(role::LAN, &syn(1024 + port));
    }
    assert!(!woken_within(epoll, 200), "{ring_bytes}-byte ring: {below} events below the batch size woke the reader");
    for port in below as u16..below as u16 + 8 {
        h.run(role::LAN, &syn(1024 + port));
    }
    assert!(woken_within(epoll, 1000), "{ring_bytes}-byte ring: a batch's worth of events did not wake the reader");
    // SAFETY: our fd.
    unsafe { libc::close(epoll) };
    let events = h.events();
    assert_eq!(events.len() as u64, below + 8, "every event is read, woken or not");
    assert_eq!(h.counter(counter::EVENTS_LOST), 0);
}

/// Keeps the calling thread on `cpu`.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; a plain syscall on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set), 0, "pinning to CPU {cpu}");
    }
}

#[test]
fn each_cpu_sends_through_its_own_ring() {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if !kernel_has_ring_path() || cpus < 2 {
        return; // one ring is all there is to read
    }
    let mut h = Harness::with_table(ProbeOptions { events: Some(EventPath::Ring), ..ProbeOptions::default() });
    for cpu in 0..2 {
        pin_to_cpu(cpu);
        h.run(
            role::LAN,
            &tcp_frame(&Tuple { src_port: 2000 + cpu as u16, ..client() }, tcp_flags::SYN, &[], DEVICE_MAC),
        );
    }
    let EventReader::Ring(rings) = &mut h.buffers else { panic!("the ring path was asked for") };
    assert!(rings.len() >= 2, "a ring per CPU: {}", rings.len());
    for icr::capture::probe::CpuRing { cpu, ring } in rings.iter_mut() {
        let mut ports = Vec::new();
        while let Some(record) = ring.next() {
            match events::decode_ring(&record) {
                ProbeEvent::Flow(event) => ports.push(event.key.port_lo.max(event.key.port_hi)),
                other => panic!("unexpected {other:?}"),
            }
        }
        let expected: Vec<u16> = if *cpu < 2 { vec![2000 + *cpu as u16] } else { vec![] };
        assert_eq!(ports, expected, "CPU {cpu}'s ring");
    }
}

/// A small, seeded generator: the same frames on every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Seeds for mutation: every header path the parser has.
fn seed_frames() -> Vec<Vec<u8>> {
    let up = client();
    let v6 = Tuple { src: "2001:db8::23".parse().unwrap(), dst: "2001:db8::443".parse().unwrap(), ..client() };
    let dns = Tuple { dst_port: 53, proto: Proto::Udp, ..client() };
    let quic = Tuple { dst_port: 443, proto: Proto::Udp, ..client() };
    let mut quic_payload = vec![0xc3, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x44, 0xd0];
    quic_payload.resize(1200, 0x55);
    let syn = tcp_frame(&up, tcp_flags::SYN, &[], DEVICE_MAC);
    let mut frames = vec![
        syn.clone(),
        tcp_frame(&up, tcp_flags::ACK, &[0x16, 3, 1, 2, 0, 1, 0, 1, 0xfc, 3, 3], DEVICE_MAC),
        tcp_frame(&v6, tcp_flags::SYN | tcp_flags::ACK, &[], DEVICE_MAC),
        udp_frame(&dns, &[0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 1, 0, 1]),
        udp_frame(&quic, &quic_payload),
    ];
    // QinQ, PPPoE (IPv4 and compressed-protocol IPv6) and an IPv6 extension chain.
    let mut qinq = syn[..12].to_vec();
    qinq.extend_from_slice(&[0x88, 0xa8, 0x01, 0x2c, 0x81, 0x00, 0x00, 0x14]);
    qinq.extend_from_slice(&syn[12..]);
    frames.push(qinq);
    let mut pppoe = syn[..12].to_vec();
    pppoe.extend_from_slice(&[0x88, 0x64, 0x11, 0x00, 0x12, 0x34, 0x00, 42, 0x00, 0x21]);
    pppoe.extend_from_slice(&syn[14..]);
    frames.push(pppoe);
    let mut ext = tcp_frame(&v6, tcp_flags::SYN, &[], DEVICE_MAC);
    let next = ext[20];
    ext[20] = 0;
    ext.splice(54..54, [43, 0, 0, 0, 0, 0, 0, 0, 44, 0, 0, 1, 0, 0, 0, 0]);
    ext[54] = 44; // hop-by-hop → fragment → original
    ext[62] = next;
    frames.push(ext);
    frames
}

fn mutate(rng: &mut XorShift, seed: &[u8]) -> Vec<u8> {
    let mut frame = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            // Flip bits anywhere, or in the headers where the parser looks.
            0 => {
                let at = rng.below(frame.len());
                frame[at] ^= 1 << rng.below(8);
            }
            1 => {
                let at = rng.below(frame.len().min(80));
                frame[at] = rng.next() as u8;
            }
            // Truncate (never below an Ethernet header: the kernel refuses those).
            2 => frame.truncate(14 + rng.below(frame.len().saturating_sub(14) + 1)),
            // Extend with junk.
            3 => frame.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
            // Lengths and counts to extremes: IPv4 IHL/total length, IPv6 payload length.
            4 => {
                let at = [14, 16, 17, 18, 19, 20, 21, 46, 47, 54, 55].get(rng.below(11)).copied().unwrap_or(14);
                if at < frame.len() {
                    frame[at] = [0x00, 0xff, 0x0f, 0xf0, 0x45, 0x4f][rng.below(6)];
                }
            }
            // Ethertype to one of the tags the parser follows.
            _ => {
                let kind: [u8; 2] =
                    [[0x81, 0x00], [0x88, 0xa8], [0x88, 0x64], [0x86, 0xdd], [0x08, 0x00]][rng.below(5)];
                frame[12..14].copy_from_slice(&kind);
            }
        }
    }
    if frame.len() < 14 {
        frame.resize(14, 0);
    }
    frame
}

/// Fail-open: random and mutated frames through the real program, each must
/// pass unmodified. `ICR_FAILOPEN_FRAMES` sets the count (`cargo xtask
/// fuzz` runs more); CI runs a million.
#[test]
fn a_million_mutated_frames_all_pass_unmodified() {
    let count: u64 = std::env::var("ICR_FAILOPEN_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    // A small table: a full table is one more path to exercise.
    let mut h = Harness::with_table(ProbeOptions { flow_table_size: 4096, ..ProbeOptions::default() });
    let seeds = seed_frames();
    let mut rng = XorShift(0x1c2_0b5e_7ea5_5eed);
    let mut sink = Vec::new();
    let mut egress_runs = 0u64;
    for i in 0..count {
        let frame = if i % 16 == 0 {
            (0..14 + rng.below(200)).map(|_| rng.next() as u8).collect()
        } else {
            let seed = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, seed)
        };
        let role = if i % 2 == 0 { role::LAN } else { role::WAN };
        let out = h.probe.test_run(role, &frame).unwrap();
        assert_eq!(out.action, XDP_PASS, "frame {i} did not pass: {frame:02x?}");
        assert_eq!(out.data_out, frame, "frame {i} was modified");
        if i % 4 == 3 {
            // The same frame leaving by a LAN port, as the gateway's own.
            match h.probe.egress_test_run(&frame, true) {
                Ok(out) => {
                    assert_eq!(out.action, TC_ACT_UNSPEC, "frame {i} did not go on from egress: {frame:02x?}");
                    assert_eq!(out.data_out, frame, "frame {i} was modified on egress");
                    egress_runs += 1;
                }
                Err(error) if refused_by_kernel(&error) => {}
                Err(error) => panic!("frame {i} on egress: {error:#}"),
            }
        }
        if i % 2048 == 0 {
            sink.clear();
            events::drain(&mut h.buffers, &mut sink);
        }
        if i % 100_000 == 0 {
            for key in h.probe.flow_keys().unwrap() {
                h.probe.remove_flow(&key).unwrap();
            }
        }
    }
    let counters = h.probe.counters().unwrap();
    assert_eq!(counters.get(counter::PACKETS), count);
    // Every kind of outcome was reached.
    for index in [counter::MALFORMED, counter::NOT_IP, counter::FLOWS_CREATED, counter::HINTS_SENT, counter::FRAGMENTS]
    {
        assert!(counters.get(index) > 0, "{} never counted", counter::NAMES[index as usize]);
    }
    assert!(egress_runs > count / 8, "only {egress_runs} of {} frames ran on egress", count / 4);
    println!("{count} frames passed unmodified ({egress_runs} on egress too): {:?}", counters.named());
}

/// `BPF_PROG_TEST_RUN` refused the frame (EINVAL): the kernel will not build
/// a socket buffer whose IP header is cut, and its stack never sends one.
fn refused_by_kernel(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<aya::programs::ProgramError>(),
            Some(aya::programs::ProgramError::SyscallError(call)) if call.io_error.raw_os_error() == Some(libc::EINVAL)
        )
    })
}

#[test]
fn an_interface_with_another_xdp_program_is_named_in_the_error() {
    let ns = Netns::create("icrt-busy").unwrap();
    ns.add_veth("busy0", "busy1").unwrap();
    let mut other = icr::capture::probe::Baseline::load(16).unwrap();
    ns.run(|| other.attach(icr::capture::probe::Floor::Pass, "busy0")).unwrap().unwrap();
    let mut probe = Probe::load(ProbeOptions::default()).unwrap();
    let error = ns.run(|| probe.attach("busy0", role::LAN)).unwrap().expect_err("the interface is busy");
    let message = format!("{error:#}");
    assert!(message.contains("busy0 already has an XDP program attached"), "{message}");
    assert!(message.contains("icr detach") && message.contains("ip link set dev busy0 xdp off"), "{message}");
    // The free peer still takes the probe.
    ns.run(|| probe.attach("busy1", role::LAN)).unwrap().unwrap();
}

/// Run by `without_bpf_permission_the_error_says_what_is_needed` as an
/// unprivileged user (it does nothing unless asked to).
#[test]
#[ignore = "run as an unprivileged child by the test below"]
fn unprivileged_child_loads_the_probe() {
    if std::env::var_os("ICR_TEST_UNPRIVILEGED_CHILD").is_none() {
        return;
    }
    let error = Probe::load(ProbeOptions::default()).err().expect("loading needs privileges");
    println!("ERROR: {error:#}");
}

#[test]
fn without_bpf_permission_the_error_says_what_is_needed() {
    // The test binary again, as nobody without capabilities.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "unprivileged_child_loads_the_probe", "--ignored", "--nocapture", "--test-threads=1"])
        .env("ICR_TEST_UNPRIVILEGED_CHILD", "1")
        .output()
        .expect("running setpriv (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let message = stdout
        .lines()
        .find_map(|line| line.split_once("ERROR: ").map(|(_, message)| message))
        .unwrap_or_else(|| panic!("no error printed: {stdout}"));
    assert!(message.contains("needs root, or the capabilities CAP_BPF and CAP_NET_ADMIN"), "{message}");
}
