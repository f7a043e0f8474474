//! Synthetic gateway traffic and an AF_PACKET `sendmmsg` sender for it.
//!
//! Traffic: 4,096 connections in progress at any time, each packet taken from
//! the next connection in turn, so that flows interleave as on a real link.
//! When a connection's script ends, its slot starts a new connection with a
//! new 5-tuple (client address and port from a counter, so no 5-tuple repeats
//! within a run). Of every ten connections eight are TCP/443 (SYN, SYN-ACK,
//! ACK, a 517-byte ClientHello, `segments` 1,400-byte segments from the
//! server with an ACK from the client every second one, FIN, FIN, ACK: 55
//! packets with the default 32, a small web object), one is a DNS query and
//! its answer, one is QUIC (the client's Initial, the server's, then
//! `segments` 1,200-byte 1-RTT packets from the server with the client's
//! short ACKs: 50 packets). With 32, 3.3% of packets carry SYN and 3.3% FIN,
//! and the probe sends 0.08 events per packet.
//!
//! Frames are built once per script step from templates with the variable
//! fields (client address and port, server address) zeroed; sending one
//! copies the template, writes those fields and finishes the IPv4 and L4
//! checksums from the template's partial sum.
use std::{
    mem::{size_of, zeroed},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use etherparse::{PacketBuilder, TcpHeader};

const SLOTS: usize = 4096;
const BATCH: usize = 64;
const FRAME_MAX: usize = 1536;
const PORTS: u64 = 60_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Dns,
    Quic,
}

struct Template {
    frame: Vec<u8>,
    from_client: bool,
    /// Offset of the L4 checksum in the frame.
    l4_csum: usize,
    udp: bool,
    /// One's-complement sum of the pseudo-header and L4 segment with the
    /// variable fields and the checksum zeroed.
    partial: u32,
}

/// How many packets of each sort a traffic source produced.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mix {
    pub packets: u64,
    pub syn: u64,
    pub fin: u64,
    pub connections: u64,
}

pub struct Traffic {
    tcp: Vec<Template>,
    dns: Vec<Template>,
    quic: Vec<Template>,
    /// Per slot: connection number, next step.
    slots: Vec<(u64, usize)>,
    next_conn: u64,
    cursor: usize,
    pub mix: Mix,
}

fn kind_of(conn: u64) -> Kind {
    match conn % 10 {
        0 => Kind::Dns,
        5 => Kind::Quic,
        _ => Kind::Tcp,
    }
}

impl Traffic {
    /// Traffic whose connection numbers start at `first_conn` (give each
    /// phase its own range so that no 5-tuple is reused).
    pub fn new(src_mac: [u8; 6], dst_mac: [u8; 6], segments: u32, first_conn: u64) -> Self {
        let macs = (src_mac, dst_mac);
        let tcp = tcp_script(macs, segments);
        let dns = dns_script(macs);
        let quic = quic_script(macs, segments);
        // Slots start at staggered steps of their scripts, so that the
        // traffic is in its steady state from the first packet (4,096
        // connections opening at once would be a burst no link sees).
        let slots = (0..SLOTS as u64)
            .map(|i| {
                let conn = first_conn + i;
                let len = match kind_of(conn) {
                    Kind::Tcp => tcp.len(),
                    Kind::Dns => dns.len(),
                    Kind::Quic => quic.len(),
                };
                (conn, (i as usize * 7919) % len)
            })
            .collect();
        Self {
            tcp,
            dns,
            quic,
            slots,
            next_conn: first_conn + SLOTS as u64,
            cursor: 0,
            mix: Mix { connections: SLOTS as u64, ..Mix::default() },
        }
    }

    /// Writes the next frame into `buf`; returns its length.
    pub fn next_into(&mut self, buf: &mut [u8]) -> usize {
        let (conn, step) = self.slots[self.cursor];
        let script = match kind_of(conn) {
            Kind::Tcp => &self.tcp,
            Kind::Dns => &self.dns,
            Kind::Quic => &self.quic,
        };
        let template = &script[step];
        let len = template.frame.len();
        buf[..len].copy_from_slice(&template.frame);
        let client_index = conn / PORTS;
        let client_ip = [10, (client_index >> 16) as u8 | 0x40, (client_index >> 8) as u8, client_index as u8];
        let client_port = (1024 + conn % PORTS) as u16;
        let server_ip = match kind_of(conn) {
            Kind::Dns => [192, 0, 2, 53],
            _ => [198, 51, 100, 1 + (conn % 200) as u8],
        };
        let (src, dst, port_at) =
            if template.from_client { (client_ip, server_ip, 34) } else { (server_ip, client_ip, 36) };
        buf[26..30].copy_from_slice(&src);
        buf[30..34].copy_from_slice(&dst);
        buf[port_at..port_at + 2].copy_from_slice(&client_port.to_be_bytes());
        buf[24..26].copy_from_slice(&[0, 0]);
        let ip_csum = !fold(sum16(&buf[14..34], 0));
        buf[24..26].copy_from_slice(&ip_csum.to_be_bytes());
        let mut sum = template.partial + u32::from(client_port);
        sum = sum16(&client_ip, sum);
        sum = sum16(&server_ip, sum);
        let mut l4 = !fold(sum);
        if template.udp && l4 == 0 {
            l4 = 0xffff;
        }
        buf[template.l4_csum..template.l4_csum + 2].copy_from_slice(&l4.to_be_bytes());
        if kind_of(conn) == Kind::Tcp {
            let flags = buf[47];
            self.mix.syn += u64::from(flags & 0x02 != 0);
            self.mix.fin += u64::from(flags & 0x01 != 0);
        }
        self.mix.packets += 1;

        // Advance: this slot's next step, or a new connection in it.
        let next = step + 1;
        self.slots[self.cursor] = if next < script.len() {
            (conn, next)
        } else {
            self.next_conn += 1;
            self.mix.connections += 1;
            (self.next_conn - 1, 0)
        };
        self.cursor = (self.cursor + 1) % SLOTS;
        len
    }
}

fn sum16(bytes: &[u8], mut sum: u32) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for pair in &mut chunks {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

type Macs = ([u8; 6], [u8; 6]);

/// A template from the frame `l4` builds (returning it and whether it is UDP)
/// with zero addresses; the client's port must be 0 in it too.
fn template(
    macs: Macs,
    from_client: bool,
    l4: impl FnOnce(etherparse::PacketBuilderStep<etherparse::IpHeaders>) -> (Vec<u8>, bool),
) -> Template {
    let builder = PacketBuilder::ethernet2(macs.0, macs.1).ipv4([0; 4], [0; 4], 64);
    let (mut frame, udp) = l4(builder);
    let l4_csum = if udp { 40 } else { 50 };
    frame[l4_csum..l4_csum + 2].copy_from_slice(&[0, 0]);
    let l4_len = frame.len() - 34;
    let proto = if udp { 17 } else { 6 };
    let partial = sum16(&frame[34..], proto + l4_len as u32);
    Template { frame, from_client, l4_csum, udp, partial }
}

fn tcp_frame(macs: Macs, from_client: bool, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Template {
    template(macs, from_client, |b| {
        // Client port 0 here; filled in per connection.
        let (src, dst) = if from_client { (0, 443) } else { (443, 0) };
        let mut header = TcpHeader::new(src, dst, seq, 64240);
        header.acknowledgment_number = ack;
        header.fin = flags & 0x01 != 0;
        header.syn = flags & 0x02 != 0;
        header.psh = flags & 0x08 != 0;
        header.ack = flags & 0x10 != 0;
        let mut frame = Vec::new();
        b.tcp_header(header).write(&mut frame, payload).unwrap();
        (frame, false)
    })
}

fn udp_frame(macs: Macs, from_client: bool, server_port: u16, payload: &[u8]) -> Template {
    template(macs, from_client, |b| {
        let (src, dst) = if from_client { (0, server_port) } else { (server_port, 0) };
        let mut frame = Vec::new();
        b.udp(src, dst).write(&mut frame, payload).unwrap();
        (frame, true)
    })
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
const FIN: u8 = 0x01;

fn client_hello() -> Vec<u8> {
    // A TLS record header and handshake header; the bench does not parse it.
    let mut hello = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
    hello.resize(517, 0x5a);
    hello
}

fn tcp_script(macs: Macs, segments: u32) -> Vec<Template> {
    let (c, s) = (1000u32, 5000u32);
    let hello = client_hello();
    let mut script = vec![
        tcp_frame(macs, true, c, 0, SYN, &[]),
        tcp_frame(macs, false, s, c + 1, SYN | ACK, &[]),
        tcp_frame(macs, true, c + 1, s + 1, ACK, &[]),
        tcp_frame(macs, true, c + 1, s + 1, PSH | ACK, &hello),
    ];
    let c_end = c + 1 + hello.len() as u32;
    let data = vec![0xd7u8; 1400];
    for k in 0..segments {
        script.push(tcp_frame(macs, false, s + 1 + k * 1400, c_end, ACK, &data));
        if k % 2 == 1 {
            script.push(tcp_frame(macs, true, c_end, s + 1 + (k + 1) * 1400, ACK, &[]));
        }
    }
    let s_end = s + 1 + segments * 1400;
    script.push(tcp_frame(macs, true, c_end, s_end, FIN | ACK, &[]));
    script.push(tcp_frame(macs, false, s_end, c_end + 1, FIN | ACK, &[]));
    script.push(tcp_frame(macs, true, c_end + 1, s_end + 1, ACK, &[]));
    script
}

fn dns_script(macs: Macs) -> Vec<Template> {
    let query: Vec<u8> = [
        &[0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0][..],
        &[3, b'w', b'w', b'w', 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3, b'c', b'o', b'm', 0, 0, 1, 0, 1],
    ]
    .concat();
    let mut answer = query.clone();
    answer[2] = 0x81;
    answer[3] = 0x80;
    answer[7] = 1;
    answer.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0x0e, 0x10, 0, 4, 198, 51, 100, 7]);
    vec![udp_frame(macs, true, 53, &query), udp_frame(macs, false, 53, &answer)]
}

fn quic_script(macs: Macs, segments: u32) -> Vec<Template> {
    let mut initial = vec![0xc3, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x44, 0xd0];
    initial.resize(1200, 0);
    let mut server_initial = initial.clone();
    server_initial[5] = 0;
    let mut short = vec![0x43, 1, 2, 3, 4, 5, 6, 7, 8];
    short.resize(1200, 0x11);
    let ack = &short[..60];
    let mut script = vec![udp_frame(macs, true, 443, &initial), udp_frame(macs, false, 443, &server_initial)];
    for k in 0..segments {
        script.push(udp_frame(macs, false, 443, &short));
        if k % 2 == 1 {
            script.push(udp_frame(macs, true, 443, ack));
        }
    }
    script
}

/// How a send went.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    pub packets: u64,
    pub elapsed: Duration,
    /// sendmmsg calls that failed with ENOBUFS/EAGAIN and were retried.
    pub retries: u64,
}

/// Sends `traffic` out of `interface` (in the calling thread's netns) through
/// an AF_PACKET socket that bypasses the qdisc, in `sendmmsg` batches of 64,
/// at `rate` packets per second (`None`: as fast as it goes), until
/// `max_packets` are sent, `max_time` has passed or `stop` is set.
pub fn send(
    interface: &str,
    traffic: &mut Traffic,
    rate: Option<f64>,
    max_packets: u64,
    max_time: Duration,
    stop: &Arc<AtomicBool>,
) -> Result<Sent> {
    // SAFETY: plain syscalls on values we own; the socket is closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    struct Fd(i32);
    impl Drop for Fd {
        fn drop(&mut self) {
            // SAFETY: our fd.
            unsafe { libc::close(self.0) };
        }
    }
    let _guard = Fd(fd);
    let name = std::ffi::CString::new(interface)?;
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {interface}");
    }
    // SAFETY: sockaddr_ll is plain data; sizes passed match.
    unsafe {
        let mut addr: libc::sockaddr_ll = zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        // Protocol 0: this socket sends only, it receives nothing.
        if libc::bind(fd, (&raw const addr).cast(), size_of::<libc::sockaddr_ll>() as u32) != 0 {
            bail!("binding the AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        let one: libc::c_int = 1;
        if libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as u32,
        ) != 0
        {
            bail!("PACKET_QDISC_BYPASS: {}", std::io::Error::last_os_error());
        }
        let sndbuf: libc::c_int = 4 << 20;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&raw const sndbuf).cast(),
            size_of::<libc::c_int>() as u32,
        );
    }

    let mut frames = vec![[0u8; FRAME_MAX]; BATCH];
    // SAFETY: iovec and mmsghdr are plain data, filled in below.
    let mut iovecs: Vec<libc::iovec> = vec![unsafe { zeroed() }; BATCH];
    // SAFETY: as above.
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { zeroed() }; BATCH];
    let start = Instant::now();
    let mut sent = Sent::default();
    while sent.packets < max_packets && !stop.load(Ordering::Relaxed) {
        let elapsed = start.elapsed();
        if elapsed >= max_time {
            break;
        }
        if let Some(rate) = rate {
            // Ahead of schedule: wait (bounded by max_time).
            let due = Duration::from_secs_f64(sent.packets as f64 / rate);
            if due > elapsed {
                std::thread::sleep((due - elapsed).min(Duration::from_millis(5)));
                continue;
            }
        }
        let n = BATCH.min((max_packets - sent.packets) as usize);
        for i in 0..n {
            let len = traffic.next_into(&mut frames[i]);
            iovecs[i] = libc::iovec { iov_base: frames[i].as_mut_ptr().cast(), iov_len: len };
            msgs[i].msg_hdr.msg_iov = &raw mut iovecs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_len = 0;
        }
        let mut done = 0;
        while done < n {
            // SAFETY: msgs[done..n] point at live iovecs and frames.
            let ret = unsafe { libc::sendmmsg(fd, msgs[done..].as_mut_ptr(), (n - done) as u32, 0) };
            if ret < 0 {
                let error = std::io::Error::last_os_error();
                match error.raw_os_error() {
                    Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => {
                        sent.retries += 1;
                        if start.elapsed() >= max_time {
                            break;
                        }
                        std::thread::yield_now();
                        continue;
                    }
                    _ => bail!("sendmmsg: {error}"),
                }
            }
            done += ret as usize;
        }
        sent.packets += done as u64;
    }
    sent.elapsed = start.elapsed();
    Ok(sent)
}
