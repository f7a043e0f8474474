//! The agent's live export: each batch of records the store has written is
//! offered to a thread per collector, through a bounded queue that never
//! makes the writer wait (a full queue drops the batch, counted). The store
//! is the evidence; what a collector misses is counted, never retried from
//! memory.
use std::{
    collections::VecDeque,
    io::{self, Write as _},
    net::{SocketAddr, TcpStream, ToSocketAddrs as _, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc::{self, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use log::{info, warn};

use super::{Encoder, Message, PATH_MTU_MESSAGE};
use crate::{
    config::IpfixSection,
    record::Icr,
    remote::{Collector, Transport},
};

/// Batches (one a tick) a collector's thread may have waiting.
const QUEUE: usize = 64;
/// How often an idle thread looks at its link (a refused datagram, a
/// closed connection) and at the template timer.
const LOOK: Duration = Duration::from_secs(1);
/// A TCP connection's deadline to open, and each write's.
const TCP_DEADLINE: Duration = Duration::from_secs(2);
/// Waits between TCP connection attempts: doubled on each failure up to the most.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MOST: Duration = Duration::from_secs(30);
/// How long the agent waits at exit for the threads to send what they hold.
const DRAIN: Duration = Duration::from_secs(5);
/// Messages a TCP connection keeps apart while unacknowledged; past it a
/// message joins the newest (see `InFlight::wrote`). A full 4 MB send
/// buffer of messages of one record each is about that many.
const MOST_IN_FLIGHT: usize = 16_384;

/// What one collector's export has done, for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub collector: String,
    /// ICRs that reached the collector's host: over TCP once its kernel
    /// acknowledged their bytes, over UDP once handed to the network (a
    /// refused datagram's are then counted failed too).
    pub records_sent: AtomicU64,
    /// ICRs the collector did not get: not connected, a failed send,
    /// (TCP) written but not acknowledged when the connection ended, or
    /// (UDP) a datagram the collector's host refused.
    pub records_failed: AtomicU64,
    /// ICRs dropped because the thread was behind (its queue full).
    pub records_dropped: AtomicU64,
    /// ICRs whose names or DNS questions were cut to fit a message.
    pub records_truncated: AtomicU64,
    /// Messages and bytes handed to the network (acknowledged or not).
    pub messages_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// TCP connections opened, and attempts that failed.
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
}

impl Stats {
    /// Each counter's metric name, meaning and value.
    pub fn series(&self) -> [(&'static str, &'static str, u64); 8] {
        let value = |counter: &AtomicU64| counter.load(Relaxed);
        [
            (
                "records_sent_total",
                "ICRs sent to the collector: over TCP once its host acknowledged them, over UDP once handed to the \
                 network",
                value(&self.records_sent),
            ),
            (
                "records_failed_total",
                "ICRs the collector did not get: not connected, a failed send, written over TCP but unacknowledged \
                 when the connection ended, or a datagram refused",
                value(&self.records_failed),
            ),
            (
                "records_dropped_total",
                "ICRs dropped because the export was behind (its queue full)",
                value(&self.records_dropped),
            ),
            (
                "records_truncated_total",
                "ICRs whose names or DNS questions were cut to fit a message",
                value(&self.records_truncated),
            ),
            ("messages_sent_total", "IPFIX messages handed to the network", value(&self.messages_sent)),
            ("bytes_sent_total", "Bytes of IPFIX messages handed to the network", value(&self.bytes_sent)),
            ("connects_total", "TCP connections opened to the collector", value(&self.connects)),
            ("connect_failures_total", "TCP connection attempts that failed", value(&self.connect_failures)),
        ]
    }
}

/// Records the store has written, shared by every collector's thread.
type Batch = Arc<[Icr]>;

/// The writer's end: offers stored batches to every collector.
#[derive(Default)]
pub struct Feed {
    queues: Vec<(SyncSender<Batch>, Arc<Stats>)>,
    threads: Vec<JoinHandle<()>>,
}

impl Feed {
    /// One thread per collector of `section`; none without it.
    pub fn start(section: Option<&IpfixSection>) -> Result<Self> {
        let mut feed = Self::default();
        let Some(section) = section else { return Ok(feed) };
        for collector in &section.collectors {
            let (queue, batches) = mpsc::sync_channel(QUEUE);
            let mut export = Export::new(section, collector);
            let stats = export.stats.clone();
            let thread = std::thread::Builder::new()
                .name("icr-ipfix".into())
                .spawn(move || export.run(&batches))
                .context("starting the IPFIX export thread")?;
            info!("exporting records as IPFIX to {collector}");
            feed.queues.push((queue, stats));
            feed.threads.push(thread);
        }
        Ok(feed)
    }

    /// Every collector's counters.
    pub fn stats(&self) -> Vec<Arc<Stats>> {
        self.queues.iter().map(|(_, stats)| stats.clone()).collect()
    }

    /// Hands `records` (stored already) to every collector's thread, never
    /// waiting: a thread that is behind loses the batch, counted.
    pub fn offer(&self, records: &[Icr]) {
        if self.queues.is_empty() || records.is_empty() {
            return;
        }
        let batch: Batch = records.into();
        for (queue, stats) in &self.queues {
            match queue.try_send(batch.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    stats.records_dropped.fetch_add(records.len() as u64, Relaxed);
                }
            }
        }
    }
}

impl Drop for Feed {
    /// Closes the queues and gives the threads a moment to send what they hold.
    fn drop(&mut self) {
        self.queues.clear();
        let deadline = Instant::now() + DRAIN;
        while self.threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Sends `records` to `collector` now, on this thread, in batches of a
/// busy tick's size (`icr export ipfix`); returns what it counted.
pub fn send_all(section: &IpfixSection, collector: &Collector, records: &[Icr]) -> Arc<Stats> {
    const BATCH: usize = 1_000;
    let mut export = Export::new(section, collector);
    if records.is_empty() {
        export.send(&[]);
    }
    for batch in records.chunks(BATCH) {
        export.send(batch);
    }
    export.link.finish(&export.stats);
    export.stats
}

/// One collector's export (its thread's, or `send_all`'s).
struct Export {
    encoder: Encoder,
    link: Link,
    stats: Arc<Stats>,
    template_interval: Duration,
    templates_sent: Option<Instant>,
}

impl Export {
    fn new(section: &IpfixSection, collector: &Collector) -> Self {
        Self {
            encoder: Encoder::new(section.observation_domain, section.enterprise_number, PATH_MTU_MESSAGE),
            link: Link::new(collector.clone()),
            stats: Arc::new(Stats { collector: collector.to_string(), ..Stats::default() }),
            template_interval: section.template_interval.0,
            templates_sent: None,
        }
    }

    fn run(&mut self, batches: &mpsc::Receiver<Batch>) {
        loop {
            match batches.recv_timeout(LOOK) {
                Ok(batch) => self.send(&batch),
                Err(RecvTimeoutError::Timeout) => self.look(),
                Err(RecvTimeoutError::Disconnected) => return self.link.finish(&self.stats),
            }
        }
    }

    /// Templates are due: never sent on this link, or (UDP) the interval passed.
    fn templates_due(&self) -> bool {
        match self.templates_sent {
            None => true,
            Some(at) => self.link.transport() == Transport::Udp && at.elapsed() >= self.template_interval,
        }
    }

    fn send(&mut self, records: &[Icr]) {
        self.look();
        if self.link.connect(&self.stats) {
            // A new TCP session: its own sequence numbers and templates.
            self.encoder.restart_sequence();
            self.templates_sent = None;
        }
        let with_templates = self.templates_due();
        let truncated = self.encoder.truncated;
        let messages = self.encoder.encode(records, export_time(), with_templates);
        self.stats.records_truncated.fetch_add(self.encoder.truncated - truncated, Relaxed);
        // The encoder numbered every message: on UDP one that fails is a
        // gap the collector sees in the sequence numbers; on TCP the
        // connection is dropped and the next one counts from zero.
        for (index, message) in messages.iter().enumerate() {
            if !self.link.send(message, &self.stats) {
                self.forget_templates();
            } else if index == 0 && with_templates {
                self.templates_sent = Some(Instant::now());
            }
        }
    }

    /// Between batches: what the collector's host acknowledged is counted
    /// sent, a refused datagram or a closed connection is found and
    /// counted, and UDP templates are sent when due.
    fn look(&mut self) {
        if self.link.check(&self.stats) {
            self.forget_templates();
        }
        if self.link.transport() == Transport::Udp && self.templates_sent.is_some() && self.templates_due() {
            let templates = self.encoder.templates(export_time());
            if self.link.send(&templates, &self.stats) {
                self.templates_sent = Some(Instant::now());
            }
        }
    }

    /// The collector may have lost them (restarted, or a new connection):
    /// the next message carries them.
    fn forget_templates(&mut self) {
        self.templates_sent = None;
    }
}

fn export_time() -> u32 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as u32)
}

/// The transport to one collector.
struct Link {
    collector: Collector,
    udp: Option<UdpSocket>,
    tcp: Option<Connection>,
    /// ICRs in the last datagram, counted failed if the collector's host refuses it.
    last_datagram: u64,
    next_attempt: Instant,
    retry: Duration,
    /// Whether the last attempt failed: a failure and a recovery are logged once.
    failing: bool,
}

impl Link {
    fn new(collector: Collector) -> Self {
        Self {
            collector,
            udp: None,
            tcp: None,
            last_datagram: 0,
            next_attempt: Instant::now(),
            retry: RETRY_FIRST,
            failing: false,
        }
    }

    fn transport(&self) -> Transport {
        self.collector.transport
    }

    fn address(&self) -> io::Result<SocketAddr> {
        (self.collector.host.as_str(), self.collector.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the name has no address"))
    }

    /// Opens the socket when it is not open and an attempt is due; true
    /// when a new TCP connection was opened.
    fn connect(&mut self, stats: &Stats) -> bool {
        if self.is_open() || Instant::now() < self.next_attempt {
            return false;
        }
        let opened = self.address().and_then(|address| match self.collector.transport {
            Transport::Udp => {
                let local: SocketAddr = if address.is_ipv6() {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                } else {
                    ([0, 0, 0, 0], 0).into()
                };
                let socket = UdpSocket::bind(local)?;
                socket.connect(address)?;
                self.udp = Some(socket);
                Ok(false)
            }
            Transport::Tcp => {
                let stream = TcpStream::connect_timeout(&address, TCP_DEADLINE)?;
                stream.set_write_timeout(Some(TCP_DEADLINE))?;
                stream.set_nodelay(true)?;
                self.tcp = Some(Connection::new(stream));
                stats.connects.fetch_add(1, Relaxed);
                Ok(true)
            }
        });
        match opened {
            Ok(new_session) => {
                self.retry = RETRY_FIRST;
                new_session
            }
            Err(error) => {
                if self.collector.transport == Transport::Tcp {
                    stats.connect_failures.fetch_add(1, Relaxed);
                }
                self.next_attempt = Instant::now() + self.retry;
                self.retry = (self.retry * 2).min(RETRY_MOST);
                self.failed(&format!("connecting: {error}"));
                false
            }
        }
    }

    fn is_open(&self) -> bool {
        self.udp.is_some() || self.tcp.is_some()
    }

    /// Sends one message; false (and its records counted failed) when it
    /// could not be sent. Over TCP its records count sent once the
    /// collector's host acknowledges them (at a later send or look).
    fn send(&mut self, message: &Message, stats: &Stats) -> bool {
        let sent = match (&self.udp, &mut self.tcp) {
            (Some(socket), _) => socket.send(&message.bytes).map(|_| ()),
            (None, Some(tcp)) => tcp.stream.write_all(&message.bytes),
            (None, None) => Err(io::Error::new(io::ErrorKind::NotConnected, "not connected")),
        };
        match sent {
            Ok(()) => {
                match &mut self.tcp {
                    Some(tcp) => {
                        tcp.in_flight.wrote(message.bytes.len() as u64, message.records as u64);
                        tcp.count_acknowledged(stats);
                    }
                    None => {
                        // UDP has no acknowledgement: a datagram lost on the way
                        // without an ICMP refusal shows only as the collector's
                        // sequence gap (RFC 7011 §10.3.2), never here.
                        stats.records_sent.fetch_add(message.records as u64, Relaxed);
                        self.last_datagram = message.records as u64;
                    }
                }
                stats.messages_sent.fetch_add(1, Relaxed);
                stats.bytes_sent.fetch_add(message.bytes.len() as u64, Relaxed);
                if self.failing {
                    self.failing = false;
                    info!("IPFIX export to {} works again", self.collector);
                }
                true
            }
            Err(error) => {
                stats.records_failed.fetch_add(message.records as u64, Relaxed);
                if error.kind() == io::ErrorKind::ConnectionRefused {
                    // The refusal of the last datagram, reported by this send.
                    stats.records_failed.fetch_add(std::mem::take(&mut self.last_datagram), Relaxed);
                }
                if let Some(tcp) = self.tcp.take() {
                    tcp.end(stats);
                    self.next_attempt = Instant::now();
                }
                self.failed(&format!("sending: {error}"));
                false
            }
        }
    }

    /// At the end of an export: gives the collector's host a moment to
    /// acknowledge what was written (TCP) or to refuse the last datagram
    /// (UDP, whose refusal comes back after it); what is then still
    /// unacknowledged is counted failed.
    fn finish(&mut self, stats: &Stats) {
        let deadline = Instant::now() + TCP_DEADLINE;
        match &mut self.tcp {
            Some(tcp) => {
                tcp.count_acknowledged(stats);
                while !tcp.in_flight.is_empty() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                    tcp.count_acknowledged(stats);
                }
            }
            None if self.udp.is_some() => std::thread::sleep(Duration::from_millis(200)),
            None => {}
        }
        self.check(stats);
        if let Some(tcp) = self.tcp.take()
            && tcp.end(stats) > 0
        {
            self.failed("the collector did not acknowledge every message in time");
        }
    }

    /// Looks for a refusal of the last datagram (an ICMP port unreachable
    /// the kernel keeps on the socket) or a connection the collector
    /// closed; true when one was found.
    fn check(&mut self, stats: &Stats) -> bool {
        if let Some(socket) = &self.udp
            && let Ok(Some(error)) = socket.take_error()
        {
            stats.records_failed.fetch_add(std::mem::take(&mut self.last_datagram), Relaxed);
            self.failed(&format!("the collector's host refused a message: {error}"));
            return true;
        }
        if let Some(tcp) = &mut self.tcp {
            // A collector sends nothing: anything readable is its end of the
            // connection (or an error).
            let mut byte = [0u8; 1];
            let closed = tcp.stream.set_nonblocking(true).is_ok()
                && !matches!(tcp.stream.peek(&mut byte), Err(error) if error.kind() == io::ErrorKind::WouldBlock);
            let _ = tcp.stream.set_nonblocking(false);
            if !closed {
                tcp.count_acknowledged(stats);
                return false;
            }
            let lost = self.tcp.take().map_or(0, |tcp| tcp.end(stats));
            self.next_attempt = Instant::now();
            self.failed(&format!("the collector closed the connection ({lost} records written were not acknowledged)"));
            return true;
        }
        false
    }

    fn failed(&mut self, what: &str) {
        if !self.failing {
            self.failing = true;
            warn!(
                "IPFIX export to {}: {what}; records are counted as not exported until it works again",
                self.collector
            );
        }
    }
}

/// A TCP connection to a collector, and what was written on it that its
/// host has not acknowledged yet: the kernel took those bytes, but a reset
/// or a collector gone loses them.
struct Connection {
    stream: TcpStream,
    in_flight: InFlight,
}

impl Connection {
    fn new(stream: TcpStream) -> Self {
        // The SYN counts as an acknowledged byte: the stream starts after it.
        let in_flight = InFlight::new(bytes_acked(&stream).unwrap_or(0));
        Self { stream, in_flight }
    }

    /// Counts the records the collector's host acknowledged since the last look as sent.
    fn count_acknowledged(&mut self, stats: &Stats) {
        // Without tcpi_bytes_acked (Linux before 4.1) a written message
        // counts as acknowledged, as handed to the kernel.
        let acked = bytes_acked(&self.stream).unwrap_or(u64::MAX);
        stats.records_sent.fetch_add(self.in_flight.acknowledged(acked), Relaxed);
    }

    /// The connection ends (closed, failed or given up): what its host
    /// acknowledged counts sent, the rest failed. Returns the failed records.
    fn end(mut self, stats: &Stats) -> u64 {
        self.count_acknowledged(stats);
        let lost = self.in_flight.records();
        stats.records_failed.fetch_add(lost, Relaxed);
        lost
    }
}

/// The messages written on a connection and not yet acknowledged.
struct InFlight {
    /// The acknowledged byte count when the connection opened.
    acked_at_open: u64,
    /// Bytes written on the connection.
    written: u64,
    /// Each message's end in the connection's byte stream and its records, oldest first.
    messages: VecDeque<(u64, u64)>,
}

impl InFlight {
    fn new(acked_at_open: u64) -> Self {
        Self { acked_at_open, written: 0, messages: VecDeque::new() }
    }

    /// A message of `bytes` holding `records` was written. Past
    /// `MOST_IN_FLIGHT` it joins the newest entry: those records then count
    /// sent only once the later message's end is acknowledged, and failed
    /// otherwise (coarser, never uncounted).
    fn wrote(&mut self, bytes: u64, records: u64) {
        self.written += bytes;
        let full = self.messages.len() >= MOST_IN_FLIGHT;
        match self.messages.back_mut() {
            Some((end, held)) if full => {
                *end = self.written;
                *held += records;
            }
            _ => self.messages.push_back((self.written, records)),
        }
    }

    /// Forgets the messages whose every byte is in `acked` (the kernel's
    /// count since the connection opened); returns their records.
    fn acknowledged(&mut self, acked: u64) -> u64 {
        let acked = acked.saturating_sub(self.acked_at_open);
        let mut records = 0;
        while let Some(&(end, held)) = self.messages.front()
            && end <= acked
        {
            records += held;
            self.messages.pop_front();
        }
        records
    }

    fn records(&self) -> u64 {
        self.messages.iter().map(|(_, records)| records).sum()
    }

    fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

/// The bytes the peer of `stream` has acknowledged, its SYN included
/// (`tcpi_bytes_acked`, Linux 4.1 on). The count stays readable after a
/// reset, when the kernel has dropped what was not acknowledged.
fn bytes_acked(stream: &TcpStream) -> io::Result<u64> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut length = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `stream` owns an open socket; `info` holds `length` bytes and
    // the kernel writes at most that many. A zeroed tcp_info (integers
    // only) is a valid one, whatever part the kernel filled.
    let info = unsafe {
        if libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut length,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        info.assume_init()
    };
    // An older kernel's tcp_info ends before the field.
    if (length as usize) < std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + size_of::<u64>() {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "tcp_info has no tcpi_bytes_acked"));
    }
    Ok(info.tcpi_bytes_acked)
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        io::Read as _,
        net::{TcpListener, UdpSocket},
    };

    use super::*;
    use crate::{
        config::Span,
        export::ipfix::tests::{Decoded, Spec, decode, iana, number, record},
    };

    fn section(collector: &str) -> IpfixSection {
        IpfixSection {
            collectors: vec![collector.parse().unwrap()],
            observation_domain: 7,
            enterprise_number: 32473,
            template_interval: Span(Duration::from_secs(60)),
        }
    }

    /// `count` records, their device ports counting from `first`.
    fn records(first: u16, count: u16) -> Vec<Icr> {
        (first..first + count)
            .map(|port| {
                let mut r = record();
                r.device.port = Some(port);
                r
            })
            .collect()
    }

    fn until(what: &str, mut done: impl FnMut() -> bool) {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < Duration::from_secs(10), "waited 10 s for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn datagram(socket: &UdpSocket, known: &mut HashMap<u16, Vec<Spec>>) -> Decoded {
        let mut buffer = [0u8; 65535];
        let length = socket.recv(&mut buffer).expect("a datagram within the timeout");
        decode(&buffer[..length], known)
    }

    /// The device ports of a message's ICRs.
    fn ports(decoded: &Decoded) -> Vec<u64> {
        decoded.records.iter().filter(|(id, _)| *id != 256).map(|(_, f)| number(iana(f, 7))).collect()
    }

    /// One IPFIX message off a TCP stream.
    fn read_message(stream: &mut TcpStream, known: &mut HashMap<u16, Vec<Spec>>) -> Decoded {
        let mut header = [0u8; 16];
        stream.read_exact(&mut header).unwrap();
        let mut message = header.to_vec();
        message.resize(usize::from(u16::from_be_bytes([header[2], header[3]])), 0);
        stream.read_exact(&mut message[16..]).unwrap();
        decode(&message, known)
    }

    #[test]
    fn udp_export_sends_templates_then_records_and_counts_a_refused_collector() {
        let collector = UdpSocket::bind("127.0.0.1:0").unwrap();
        collector.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let address = collector.local_addr().unwrap();
        let feed = Feed::start(Some(&section(&format!("udp://{address}")))).unwrap();
        let stats = feed.stats()[0].clone();
        feed.offer(&records(1000, 2));
        let mut known = HashMap::new();
        let first = datagram(&collector, &mut known);
        assert_eq!((first.sequence, first.domain), (0, 7));
        assert_eq!(ports(&first), [1000, 1001], "templates and records in one message");
        feed.offer(&records(1002, 1));
        assert_eq!(datagram(&collector, &mut known).sequence, 6, "no template needed: it was sent");
        until("the counts", || stats.records_sent.load(Relaxed) == 3);

        // The collector stops: its host refuses the datagrams, and the
        // export counts them as failed.
        drop(collector);
        feed.offer(&records(2000, 4));
        until("the refusal to be counted", || stats.records_failed.load(Relaxed) == 4);
        feed.offer(&records(2004, 1));
        until("the second refusal", || stats.records_failed.load(Relaxed) == 5);

        // It comes back: the next message carries the templates again, and
        // its sequence number shows the collector what it missed.
        let collector = UdpSocket::bind(address).unwrap();
        collector.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        feed.offer(&records(3000, 1));
        let back = datagram(&collector, &mut HashMap::new());
        assert_eq!(ports(&back), [3000], "decoded with the templates it carries itself");
        assert_eq!(back.sequence, 9 + 15, "three records received, five missed, at three data records each");
        // Sent: handed to the network, the refused ones too.
        until("the last send to be counted", || stats.records_sent.load(Relaxed) == 9);
        assert_eq!(stats.records_failed.load(Relaxed), 5);
        assert_eq!(stats.records_dropped.load(Relaxed), 0);
    }

    #[test]
    fn tcp_export_reconnects_with_templates_and_a_new_sequence() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let feed = Feed::start(Some(&section(&format!("tcp://{address}")))).unwrap();
        let stats = feed.stats()[0].clone();
        feed.offer(&records(1000, 1));
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut known = HashMap::new();
        assert_eq!(ports(&read_message(&mut stream, &mut known)), [1000]);
        feed.offer(&records(1001, 1));
        assert_eq!(read_message(&mut stream, &mut known).sequence, 3);

        // The collector closes the connection: found before the next
        // batch, which goes on a new connection, templates first.
        drop(stream);
        std::thread::sleep(Duration::from_millis(100));
        feed.offer(&records(1002, 1));
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let again = read_message(&mut stream, &mut HashMap::new());
        assert_eq!((ports(&again), again.sequence), (vec![1002], 0), "a new session: its own templates and numbers");
        assert_eq!(stats.connects.load(Relaxed), 2);
        assert_eq!(stats.records_failed.load(Relaxed), 0, "nothing was written to the closed connection");

        // No collector at all: counted, retried.
        drop((stream, listener));
        std::thread::sleep(Duration::from_millis(100));
        feed.offer(&records(1003, 2));
        until("the failure to be counted", || stats.records_failed.load(Relaxed) == 2);
        assert!(stats.connect_failures.load(Relaxed) >= 1);
    }

    #[test]
    fn a_collector_that_does_not_read_never_makes_the_writer_wait() {
        // Accepts, never reads: the export's writes block, its queue fills.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let feed = Feed::start(Some(&section(&format!("tcp://{address}")))).unwrap();
        let stats = feed.stats()[0].clone();
        let batch = records(1000, 200);
        // Each offer only queues (or drops): none waits for the export, whose
        // writes block for seconds once the collector's buffers are full.
        let slowest = (0..2000)
            .map(|_| {
                let started = Instant::now();
                feed.offer(&batch);
                started.elapsed()
            })
            .max()
            .unwrap();
        assert!(slowest < Duration::from_secs(1), "an offer took {slowest:?}");
        let (_stream, _) = listener.accept().unwrap();
        assert!(stats.records_dropped.load(Relaxed) > 0, "a full queue drops, counted");
        drop(feed);
    }

    /// Sets SO_RCVBUF on `listener`: the connections it accepts inherit it,
    /// and their window with it.
    fn set_receive_buffer(listener: &TcpListener, bytes: libc::c_int) {
        // SAFETY: the descriptor is the listener's own, the value a c_int.
        let rc = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const bytes).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVBUF: {}", io::Error::last_os_error());
    }

    #[test]
    fn a_tcp_collector_that_dies_with_bytes_unacknowledged_has_their_records_counted_failed() {
        // A small receive window: what the collector does not read soon
        // stays unacknowledged in the export's send buffer.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        set_receive_buffer(&listener, 4096);
        let section = section(&format!("tcp://{}", listener.local_addr().unwrap()));
        // On this thread: each send returns once the kernel has the bytes.
        let mut export = Export::new(&section, &section.collectors[0]);
        let stats = export.stats.clone();
        export.send(&records(1000, 20));
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (mut known, mut read) = (HashMap::new(), 0);
        while read < 20 {
            read += ports(&read_message(&mut stream, &mut known)).len();
        }
        until("the read records to count as sent", || {
            export.look();
            stats.records_sent.load(Relaxed) == 20
        });

        // It stops reading: its window closes; then it dies with unread
        // bytes, and its kernel resets the connection.
        let offered = 20 + 3 * 100;
        for batch in 0..3 {
            export.send(&records(2000 + batch * 100, 100));
        }
        assert_eq!(stats.records_failed.load(Relaxed), 0, "every write was taken by the kernel");
        drop(stream);
        until("the loss to be counted", || {
            export.look();
            stats.records_failed.load(Relaxed) > 0
        });
        let (sent, failed) = (stats.records_sent.load(Relaxed), stats.records_failed.load(Relaxed));
        assert_eq!(sent + failed, offered, "every record counted once: {sent} sent, {failed} failed");
        assert!(sent >= 20, "what the collector read was acknowledged: {sent}");
        // Its host acknowledged at most its receive buffer's worth (8 kB,
        // about 40 records) of what followed.
        assert!(failed >= 200, "the unacknowledged bytes count as failed: {failed}");
        export.look();
        assert_eq!(stats.records_failed.load(Relaxed), failed, "counted once");
    }

    #[test]
    fn the_messages_in_flight_count_once_acknowledged_and_stay_bounded() {
        let mut in_flight = InFlight::new(1);
        in_flight.wrote(100, 3);
        in_flight.wrote(50, 2);
        assert_eq!(in_flight.acknowledged(1 + 120), 3, "the first message's bytes are in, not the second's");
        assert_eq!(in_flight.acknowledged(1 + 120), 0, "counted once");
        assert_eq!(in_flight.records(), 2);
        for _ in 0..MOST_IN_FLIGHT + 10 {
            in_flight.wrote(10, 1);
        }
        assert_eq!(in_flight.messages.len(), MOST_IN_FLIGHT, "bounded");
        assert_eq!(in_flight.records(), 2 + MOST_IN_FLIGHT as u64 + 10, "no record uncounted past the bound");
        let all = in_flight.written + 1;
        assert_eq!(in_flight.acknowledged(all), 2 + MOST_IN_FLIGHT as u64 + 10);
        assert!(in_flight.is_empty());
    }
}
