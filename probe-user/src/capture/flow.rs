//! The flow assembler: turns kernel flows into ICRs.
//!
//! The XDP program counts; this module decides when a flow is over. It learns
//! of flows from start/end events, checks each one when its next timeout is
//! due (one map lookup, not a scan), and every `full_sweep` walks the whole
//! kernel table to adopt flows whose start event was lost. A flow is closed
//! after FIN/RST plus a quiet `tcp_closed`, after an idle timeout, or reported
//! in slices every `active` for long flows; its kernel entry is then removed,
//! so the table never evicts anything by itself.
//!
//! On a NAT gateway a connection is two kernel flows: the LAN one (device ↔
//! remote, upstream packets) and the WAN one (remote ↔ public address,
//! downstream packets). Conntrack mappings join them into one record.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::Result;
use probe_common::{FlowEvent, FlowKey, FlowValue, Mac, Proto, Role, Roles, SYN_RETRY_SHIFT, event_kind, tcp_flags};

use crate::{
    capture::clock::Clock,
    capture::events::{ProbeEvent, ReadHorizon},
    capture::handover::{HandedAnswer, HandedFlow, Handover},
    capture::hints::{DeviceId, DnsCache, FlowHints, HintPacket, Seen, answers::NamedBy, dns},
    capture::nat::{Mapping, NatTable},
    capture::tuple::Tuple,
    record::{Device, DnsOrigin, EndReason, Endpoint, Icr, RecordIds, Service, ServiceSource},
};

/// A sweep adopts a flow it has no event of once its first packet is this
/// old as of the events read ([`ReadHorizon`]).
const ADOPT_AFTER_NS: u64 = 1_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Quiet time after FIN or RST before a TCP flow is closed.
    pub tcp_closed: Duration,
    /// TCP flows without FIN/RST are closed after this long without packets.
    pub tcp_idle: Duration,
    /// Non-TCP flows (UDP, ICMP, ...) are closed after this long without packets.
    pub udp_idle: Duration,
    /// Long flows are reported in slices of this length.
    pub active: Duration,
    /// How often the whole kernel table is walked for flows we were not told of.
    pub full_sweep: Duration,
}

impl Timeouts {
    /// How long a destroyed NAT mapping is kept: conntrack destroys a
    /// mapping no earlier than its connection's last packet, and a flow
    /// closes within its idle timeout of that packet (a minute's margin for
    /// a busy agent). Held longer, mappings are only memory: at 130
    /// connections a second, some 150 bytes each per second held.
    pub fn nat_grace(&self) -> Duration {
        self.tcp_idle.max(self.udp_idle).max(self.tcp_closed) + Duration::from_secs(60)
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_closed: Duration::from_secs(5),
            tcp_idle: Duration::from_secs(300),
            udp_idle: Duration::from_secs(60),
            active: Duration::from_secs(1800),
            full_sweep: Duration::from_secs(30),
        }
    }
}

/// The kernel flow table, as the assembler uses it (a trait so the logic can
/// be tested without a kernel).
pub trait FlowTable {
    fn get(&self, key: &FlowKey) -> Result<Option<FlowValue>>;
    fn remove(&mut self, key: &FlowKey) -> Result<()>;
    fn keys(&self) -> Result<Vec<FlowKey>>;
}

impl FlowTable for crate::capture::probe::Probe {
    fn get(&self, key: &FlowKey) -> Result<Option<FlowValue>> {
        self.flow(key)
    }
    fn remove(&mut self, key: &FlowKey) -> Result<()> {
        self.remove_flow(key)
    }
    fn keys(&self) -> Result<Vec<FlowKey>> {
        self.flow_keys()
    }
}

/// What the assembler remembers of a kernel flow.
#[derive(Clone, Copy, Debug, Default)]
struct Known {
    /// Counters already reported in earlier active-timeout slices.
    reported_packets: [u64; 2],
    reported_bytes: [u64; 2],
    /// Start of the slice not yet reported (0: the flow's first packet).
    slice_start_ns: u64,
    /// Something may be missing (events overrun).
    incomplete: bool,
    /// Found by a sweep before its start event arrived: that event, and the
    /// hints after it, may be lost. Cleared if the start event comes late.
    adopted: bool,
    /// The LAN flow this WAN flow belongs to, once joined.
    joined_to: Option<FlowKey>,
    /// When its next check is scheduled: one check a flow, so the schedule
    /// never holds more entries than the table holds flows.
    due_ns: Option<u64>,
}

/// What a check of one flow may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    /// Close it if it ended or idled out, slice it if its slice is due.
    Due,
    /// Close it whatever its state (the end of a capture, an agent stopping
    /// with its probe).
    Close(EndReason),
    /// Close it if it ended; else report it so far and keep following it
    /// (an agent handing its pinned probe over).
    Slice(EndReason),
}

/// Why a check closes a flow, if it does.
fn close_reason(timeouts: &Timeouts, proto: Proto, flags: u8, last_ns: u64, now_ns: u64) -> Option<EndReason> {
    let quiet = Duration::from_nanos(now_ns.saturating_sub(last_ns));
    if proto == Proto::Tcp {
        if let Some(ended) = ended_by(flags)
            && quiet >= timeouts.tcp_closed
        {
            return Some(ended);
        }
        (quiet >= timeouts.tcp_idle).then_some(EndReason::Idle)
    } else {
        (quiet >= timeouts.udp_idle).then_some(EndReason::Idle)
    }
}

/// What the two sides' TCP flags say of the connection's end: RST from
/// either side, or FIN only once both sides sent one. One FIN alone is a
/// half-close: the other side may go on sending (or reading) for long.
fn closing_flags(sent: u8, received: u8) -> u8 {
    let either = sent | received;
    if either & tcp_flags::RST != 0 {
        tcp_flags::RST
    } else if sent & received & tcp_flags::FIN != 0 {
        tcp_flags::FIN
    } else {
        0
    }
}

/// RST or FIN, from the TCP flags a flow saw.
fn ended_by(flags: u8) -> Option<EndReason> {
    if flags & tcp_flags::RST != 0 {
        Some(EndReason::Rst)
    } else if flags & tcp_flags::FIN != 0 {
        Some(EndReason::Fin)
    } else {
        None
    }
}

pub struct Assembler {
    timeouts: Timeouts,
    clock: Clock,
    /// Whether public addresses come from NAT mappings (a WAN interface is
    /// watched and conntrack followed). Without, `public` is the device's own.
    nat_expected: bool,
    known: HashMap<FlowKey, Known>,
    /// Closed flows whose records are not durable yet: their kernel entries
    /// stay until [`Assembler::release`], so an agent killed meanwhile
    /// leaves them for its successor to record, instead of losing them.
    /// With each, its first packet's time: the kernel may move it aside for
    /// a new connection on its 5-tuple (see `FlowKey::retired`).
    held: HashMap<FlowKey, u64>,
    /// WAN halves found older than the connection whose mapping names
    /// them: they stay no one's after that connection's LAN half is gone.
    superseded: HashSet<FlowKey>,
    /// Those of them closed since the last [`Assembler::take_closed_flows`].
    closed: Vec<FlowKey>,
    /// Each known flow's next check, earliest first.
    due: BTreeSet<(u64, FlowKey)>,
    next_full_sweep_ns: u64,
    records: Vec<Icr>,
    /// What each kernel flow's hints have told (service names, DNS).
    hints: HashMap<FlowKey, FlowHints>,
    dns_cache: DnsCache,
    /// How far the probe's events are read: flows are checked as of then.
    horizon: ReadHorizon,
    /// What the device had looked up for the remote address when its flow
    /// started: a long connection keeps the name after the answer's TTL.
    named_at_start: HashMap<FlowKey, NamedBy>,
    /// DNS responses whose question is not known yet (its NAT mapping or
    /// its event from another CPU is late).
    pending_dns: Vec<DnsAnswer>,
    pub dns_answers: DnsAnswerCounts,
    /// Flows adopted by a full sweep: their start event never arrived.
    pub adopted: u64,
    pub events_lost: u64,
    /// Flows that were no internet connection (link-local, multicast,
    /// broadcast, unspecified): closed without a record.
    pub local_flows: u64,
    /// The gateway's own connections (its resolver's queries upstream,
    /// NTP): no device's, closed without a record.
    pub gateway_flows: u64,
    /// WAN halves no device's connection could take: closed without a record.
    pub orphans: OrphanCounts,
    ids: RecordIds,
}

impl Assembler {
    pub fn new(timeouts: Timeouts, clock: Clock, nat_expected: bool) -> Self {
        Self {
            timeouts,
            clock,
            nat_expected,
            ids: RecordIds::default(),
            known: HashMap::new(),
            held: HashMap::new(),
            superseded: HashSet::new(),
            closed: Vec::new(),
            due: BTreeSet::new(),
            next_full_sweep_ns: 0,
            records: Vec::new(),
            hints: HashMap::new(),
            dns_cache: DnsCache::default(),
            horizon: ReadHorizon::default(),
            named_at_start: HashMap::new(),
            pending_dns: Vec::new(),
            dns_answers: DnsAnswerCounts::default(),
            adopted: 0,
            events_lost: 0,
            local_flows: 0,
            gateway_flows: 0,
            orphans: OrphanCounts::default(),
        }
    }

    /// Bounds the DNS answers held to name later connections (see
    /// [`DnsCache::with_max_entries`]).
    pub fn with_dns_cache_entries(mut self, max_entries: usize) -> Self {
        self.dns_cache = DnsCache::with_max_entries(max_entries);
        self
    }

    /// Checks flows as of the time up to which the probe's readers have
    /// read every event (without readers, as of the time it is told).
    pub fn with_readers(mut self, horizon: ReadHorizon) -> Self {
        self.horizon = horizon;
        self
    }

    /// Flows the assembler is following.
    pub fn open_flows(&self) -> usize {
        self.known.len()
    }

    /// Records closed since the last call.
    pub fn take_records(&mut self) -> Vec<Icr> {
        std::mem::take(&mut self.records)
    }

    /// The kernel flows closed since the last call: hand them back to
    /// [`Assembler::release`] once the records taken with them are durable.
    pub fn take_closed_flows(&mut self) -> Vec<FlowKey> {
        std::mem::take(&mut self.closed)
    }

    /// Deletes the kernel entries of closed flows whose records are stored.
    pub fn release(&mut self, flows: &[FlowKey], table: &mut impl FlowTable) -> Result<()> {
        for key in flows {
            // Moved aside since it was taken (a new connection on its 5-tuple).
            let key = if self.held.contains_key(key) { *key } else { key.retired() };
            let Some(first_ns) = self.held.remove(&key) else { continue };
            // Moved aside by the kernel, the agent not told yet: the entry
            // under its key is the new connection's.
            let moved = !key.is_retired() && table.get(&key)?.is_some_and(|value| value.first_ns != first_ns);
            table.remove(&if moved { key.retired() } else { key })?;
        }
        Ok(())
    }

    /// Closed flows whose kernel entries wait for their records to be stored.
    pub fn held_flows(&self) -> usize {
        self.held.len()
    }

    /// How much each of the assembler's maps holds (`/metrics`): what its
    /// memory is made of.
    pub fn sizes(&self) -> AssemblerSizes {
        AssemblerSizes {
            held_flows: self.held.len(),
            hinted_flows: self.hints.len(),
            named_flows: self.named_at_start.len(),
            scheduled_checks: self.due.len(),
            pending_dns: self.pending_dns.len(),
            dns_cache_entries: self.dns_cache.len(),
        }
    }

    /// Events were lost (a perf buffer's lost record, or the kernel's
    /// counter grew): any open flow may have lost its end event, so say so
    /// on its record.
    pub fn events_went_missing(&mut self) {
        self.known.values_mut().for_each(|known| known.incomplete = true);
    }

    pub fn on_event(&mut self, event: ProbeEvent, nat: &NatTable) {
        // A late packet of a flow already closed (its record on its way to
        // the store) opens nothing again.
        // (A new connection on its 5-tuple does: see `retire`.)
        if let ProbeEvent::Flow(FlowEvent { key, kind, .. }) | ProbeEvent::Hint(FlowEvent { key, kind, .. }, _) = &event
            && *kind != event_kind::FLOW_REOPEN
            && self.held.contains_key(key)
        {
            return;
        }
        match event {
            ProbeEvent::Flow(event) => {
                if event.kind == event_kind::FLOW_REOPEN {
                    self.retire(event.key, event.ts_ns);
                }
                let syn_only = event.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
                if is_start(event.kind) && Proto::from(event.key.proto) == Proto::Tcp && syn_only {
                    self.hints.entry(event.key).or_default().client_syn(event.dir, event.tcp_seq);
                }
                self.on_flow_event(&event);
            }
            ProbeEvent::Lost { count, .. } => {
                self.events_lost += count;
                self.events_went_missing();
            }
            ProbeEvent::Hint(event, frame) => {
                if let std::collections::hash_map::Entry::Vacant(unknown) = self.known.entry(event.key) {
                    // Its start event is late (another CPU's) or lost. The
                    // sweep passes over flows the agent knows: followed as
                    // adopted (until that event comes), or it would never
                    // be checked, and its entries never leave memory.
                    unknown.insert(Known { adopted: true, ..Known::default() });
                    self.schedule(event.key, event.ts_ns.saturating_add(ADOPT_AFTER_NS));
                }
                self.on_hint(&event, &frame, nat);
            }
            ProbeEvent::Malformed { cpu, len } => {
                let from = cpu.map_or_else(|| "the ring buffer".to_string(), |cpu| format!("CPU {cpu}"));
                log::warn!("ignored a {len}-byte event from {from}: agent and probe disagree");
            }
            ProbeEvent::CaughtUp { cpu, at_ns } => self.horizon.caught_up(cpu, at_ns),
            ProbeEvent::ReaderStopped { cpu } => {
                log::warn!("no more events are read from CPU {cpu}: its flows may lack their end and names");
                self.horizon.stopped(cpu);
                self.events_went_missing();
            }
        }
    }

    /// The kernel moved `key`'s ended connection aside (to its retired
    /// generation) for a new one on the same 5-tuple: what the agent knows
    /// of the ended one goes with it, and it is due once quiet for `tcp_closed`.
    fn retire(&mut self, key: FlowKey, now_ns: u64) {
        let retired = key.retired();
        if let Some(first_ns) = self.held.remove(&key) {
            self.held.insert(retired, first_ns);
            self.closed.iter_mut().filter(|closed| **closed == key).for_each(|closed| *closed = retired);
        }
        if let Some(mut known) = self.known.remove(&key) {
            // Its check moves with it: the 5-tuple's is the new connection's.
            if let Some(due_ns) = known.due_ns.take() {
                self.due.remove(&(due_ns, key));
            }
            self.known.insert(retired, known);
            self.schedule(retired, now_ns.saturating_add(nanos(self.timeouts.tcp_closed)));
        }
        if let Some(hints) = self.hints.remove(&key) {
            self.hints.insert(retired, hints);
        }
        if let Some(named) = self.named_at_start.remove(&key) {
            self.named_at_start.insert(retired, named);
        }
        if self.superseded.remove(&key) {
            self.superseded.insert(retired);
        }
    }

    fn on_flow_event(&mut self, event: &FlowEvent) {
        let known = self.known.entry(event.key).or_default();
        if is_start(event.kind) {
            // Late, not lost (the agent was behind when the sweep ran).
            known.adopted = false;
            if Roles::from_bits(event.role).has(Role::Lan) {
                let opened = Tuple::from_key(&event.key, event.dir);
                let device = DeviceId { mac: Mac(event.mac_src), ip: opened.src };
                if let Some(named) = self.dns_cache.lookup(device, opened.dst, event.ts_ns) {
                    self.named_at_start.insert(event.key, named.clone());
                }
            }
        }
        let wait = match event.kind {
            event_kind::FLOW_END => self.timeouts.tcp_closed,
            _ => self.idle_timeout(Proto::from(event.key.proto)).min(self.timeouts.active),
        };
        self.schedule(event.key, event.ts_ns.saturating_add(nanos(wait)));
    }

    fn on_hint(&mut self, event: &FlowEvent, frame: &[u8], nat: &NatTable) {
        let Some(payload) = frame.get(usize::from(event.payload_offset)..) else { return };
        let packet = Tuple::from_key(&event.key, event.dir);
        let (src_mac, dst_mac) = Seen::macs(frame);
        let seen = Seen { ts_ns: event.ts_ns, roles: Roles::from_bits(event.role), src_mac, dst_mac };
        let hint = HintPacket {
            dir: event.dir,
            proto: Proto::from(event.key.proto),
            src_port: packet.src_port,
            dst_port: packet.dst_port,
            tcp_seq: event.tcp_seq,
            payload,
            seen,
        };
        let responses = self.hints.entry(event.key).or_default().add(&hint);
        for message in responses {
            let answer = DnsAnswer { packet, seen, message };
            match self.asker(&answer, nat) {
                Ok(device) => self.trust(device, &answer),
                Err(Untrusted::NotYet) => self.pending_dns.push(answer),
                Err(Untrusted::FromLan) => self.dns_answers.from_lan += 1,
                Err(Untrusted::Unasked) => self.dns_answers.unasked += 1,
            }
        }
    }

    /// The device whose question a DNS answer answers. A name is evidence
    /// only if the device asked for it: the answer must match a question
    /// (id, name, type, ports) the device sent before it, and come from the
    /// resolver's side: from the WAN through the device's own NAT mapping
    /// (or routed to its address), or from the gateway's own resolver. Any
    /// device on the LAN can send any frame, so an answer arriving on a LAN
    /// port names nothing where the probe sees both sides.
    fn asker(&self, answer: &DnsAnswer, nat: &NatTable) -> Result<DeviceId, Untrusted> {
        let roles = answer.seen.roles;
        let from_gateway = roles.has(Role::Gateway);
        let from_wan = roles.has(Role::Wan) && !from_gateway;
        if !from_gateway && !from_wan && self.nat_expected {
            return Err(Untrusted::FromLan);
        }
        // The question: device → resolver, on the flow it was sent in.
        let question = match nat.by_reply(&answer.packet) {
            Some(mapping) if from_wan => mapping.original,
            // Routed, the gateway's own answer, or one capture point: the same flow.
            _ => answer.packet.reversed(),
        };
        let (key, dir) = question.key();
        let Some(asked) = self.hints.get(&key).and_then(|hints| hints.question(&answer.message, dir)) else {
            return Err(Untrusted::NotYet);
        };
        if asked.seen.ts_ns > answer.seen.ts_ns {
            return Err(Untrusted::Unasked);
        }
        // One capture point on the LAN (a replayed capture, or no WAN port
        // watched): the answer must at least come from the hop the device
        // sent its question to.
        if !from_gateway && !from_wan && answer.seen.src_mac != asked.seen.dst_mac {
            return Err(Untrusted::FromLan);
        }
        Ok(DeviceId { mac: asked.seen.src_mac, ip: question.src })
    }

    fn trust(&mut self, device: DeviceId, answer: &DnsAnswer) {
        let resolver = SocketAddr::new(answer.packet.src, answer.packet.src_port);
        self.dns_cache.insert(device, &answer.message, answer.seen.ts_ns, resolver);
        self.dns_answers.trusted += 1;
    }

    /// Places DNS answers whose question has come since (a late NAT
    /// mapping, an event from another CPU); answers still unplaced after a
    /// while were asked by nobody. Forgets expired answers.
    fn retry_pending_dns(&mut self, now_ns: u64, nat: &NatTable) {
        const GIVE_UP_NS: u64 = 10_000_000_000;
        for answer in std::mem::take(&mut self.pending_dns) {
            match self.asker(&answer, nat) {
                Ok(device) => self.trust(device, &answer),
                Err(Untrusted::NotYet) if now_ns.saturating_sub(answer.seen.ts_ns) < GIVE_UP_NS => {
                    self.pending_dns.push(answer)
                }
                Err(Untrusted::FromLan) => self.dns_answers.from_lan += 1,
                Err(Untrusted::NotYet | Untrusted::Unasked) => self.dns_answers.unasked += 1,
            }
        }
        self.dns_cache.expire(now_ns);
    }

    fn idle_timeout(&self, proto: Proto) -> Duration {
        if proto == Proto::Tcp { self.timeouts.tcp_idle } else { self.timeouts.udp_idle }
    }

    /// Checks `key` at `at_ns`, unless a check comes earlier (which
    /// schedules the next one). An unknown flow has nothing to check.
    fn schedule(&mut self, key: FlowKey, at_ns: u64) {
        let Some(known) = self.known.get_mut(&key) else { return };
        match known.due_ns {
            Some(due_ns) if due_ns <= at_ns => return,
            Some(due_ns) => {
                self.due.remove(&(due_ns, key));
            }
            None => {}
        }
        known.due_ns = Some(at_ns);
        self.due.insert((at_ns, key));
    }

    /// Closes what is due at `now_ns` (kernel time).
    pub fn tick(&mut self, now_ns: u64, table: &mut impl FlowTable, nat: &NatTable) -> Result<()> {
        // An agent behind its events decides as of where it is: a flow
        // whose start or name is still queued is neither adopted nor closed.
        let now_ns = self.horizon.clamp(now_ns);
        self.retry_pending_dns(now_ns, nat);
        if now_ns >= self.next_full_sweep_ns {
            self.full_sweep(table, now_ns, ADOPT_AFTER_NS)?;
            self.next_full_sweep_ns = now_ns.saturating_add(nanos(self.timeouts.full_sweep));
        }
        while let Some(&(at_ns, key)) = self.due.first() {
            if at_ns > now_ns {
                break;
            }
            self.due.pop_first();
            if let Some(known) = self.known.get_mut(&key) {
                known.due_ns = None;
            }
            self.check(key, now_ns, table, nat, Check::Due)?;
        }
        Ok(())
    }

    /// Follows a step of the wall clock: records converted afterwards
    /// (all still open, too) are dated by the new time.
    pub fn resync_clock(&mut self) -> Option<chrono::TimeDelta> {
        self.clock.resync()
    }

    /// Closes every flow, as at shutdown or the end of a capture.
    pub fn close_all(
        &mut self,
        now_ns: u64,
        reason: EndReason,
        table: &mut impl FlowTable,
        nat: &NatTable,
    ) -> Result<()> {
        // Every event has been handled: what the table holds beyond is adopted.
        self.full_sweep(table, now_ns, 0)?;
        let mut keys: Vec<FlowKey> = self.known.keys().copied().collect();
        keys.sort_unstable();
        for key in keys {
            // WAN flows first join their LAN flow, so close LAN flows first.
            if let Some(value) = table.get(&key)?
                && is_wan_only(&value)
            {
                continue;
            }
            self.check(key, now_ns, table, nat, Check::Close(reason))?;
        }
        let rest: Vec<FlowKey> = self.known.keys().copied().collect();
        for key in rest {
            self.check(key, now_ns, table, nat, Check::Close(reason))?;
        }
        self.due.clear();
        self.known.values_mut().for_each(|known| known.due_ns = None);
        Ok(())
    }

    /// Hands the open flows over to the next agent, the probe staying
    /// pinned and counting: each one that ended is closed, each other one is
    /// recorded so far (`reason`) and stays in the kernel table. Returns
    /// what the next agent needs to go on from there ([`Assembler::take_over`]).
    pub fn hand_over(
        &mut self,
        now_ns: u64,
        reason: EndReason,
        table: &mut impl FlowTable,
        nat: &NatTable,
    ) -> Result<(Vec<HandedFlow>, Vec<HandedAnswer>)> {
        let mut keys: Vec<FlowKey> = self.known.keys().copied().collect();
        keys.sort_unstable();
        // WAN flows are reported with their LAN flow: LAN flows first, then
        // the WAN flows no LAN flow took. Each is looked at once: a slice
        // does not end a flow.
        let mut wan_halves = Vec::new();
        for key in keys {
            if table.get(&key)?.is_some_and(|value| is_wan_only(&value)) {
                wan_halves.push(key);
            } else {
                self.check(key, now_ns, table, nat, Check::Slice(reason))?;
            }
        }
        for key in wan_halves {
            self.check(key, now_ns, table, nat, Check::Slice(reason))?;
        }
        self.due.clear();
        let mut flows = Vec::with_capacity(self.known.len());
        for (key, known) in &mut self.known {
            known.due_ns = None;
            let Some(value) = table.get(key)? else { continue };
            flows.push(HandedFlow {
                key: (*key).into(),
                first_ns: value.first_ns,
                reported_packets: known.reported_packets,
                reported_bytes: known.reported_bytes,
                slice_start_ns: known.slice_start_ns,
                incomplete: known.incomplete || known.adopted,
                joined_to: known.joined_to.map(Into::into),
                service: self.hints.get(key).and_then(|hints| hints.service.clone()),
                named_at_start: self.named_at_start.get(key).cloned(),
            });
        }
        let answers = self
            .dns_cache
            .entries()
            .map(|(device, remote, named_by, until_ns)| HandedAnswer {
                mac: device.mac.0,
                device: device.ip,
                remote,
                named_by: named_by.clone(),
                until_ns,
            })
            .collect();
        Ok((flows, answers))
    }

    /// Goes on from where the last agent stopped ([`Assembler::hand_over`]):
    /// each flow it handed over whose kernel entry is still that flow's is
    /// followed as if this agent had seen it all. Before the first sweep,
    /// which would adopt them as unknown. Returns how many were resumed.
    pub fn take_over(&mut self, handover: Handover, table: &impl FlowTable, now_ns: u64) -> Result<usize> {
        for answer in handover.answers {
            let device = DeviceId { mac: Mac(answer.mac), ip: answer.device };
            self.dns_cache.restore(device, answer.remote, answer.named_by, answer.until_ns);
        }
        let mut resumed = 0;
        for flow in handover.flows {
            let key = FlowKey::from(flow.key);
            // Its entry may have ended and another connection taken its key.
            if table.get(&key)?.is_none_or(|value| value.first_ns != flow.first_ns) {
                continue;
            }
            let known = Known {
                reported_packets: flow.reported_packets,
                reported_bytes: flow.reported_bytes,
                slice_start_ns: flow.slice_start_ns,
                incomplete: flow.incomplete,
                adopted: false,
                joined_to: flow.joined_to.map(Into::into),
                due_ns: None,
            };
            self.known.insert(key, known);
            if flow.service.is_some() {
                self.hints.insert(key, FlowHints::resumed(flow.service));
            }
            if let Some(named) = flow.named_at_start {
                self.named_at_start.insert(key, named);
            }
            self.schedule(key, now_ns);
            resumed += 1;
        }
        Ok(resumed)
    }

    /// Adopts the flows of the kernel table the agent has no event of, once
    /// their first packet is `grace_ns` old (their start event may be on its way).
    fn full_sweep(&mut self, table: &mut impl FlowTable, now_ns: u64, grace_ns: u64) -> Result<()> {
        for key in table.keys()? {
            if self.known.contains_key(&key) || self.held.contains_key(&key) {
                continue;
            }
            let Some(value) = table.get(&key)? else { continue };
            // Moved aside after it was closed, the agent not told yet: its
            // record is made.
            if key.is_retired() && self.held.get(&key.current()) == Some(&value.first_ns) {
                continue;
            }
            if grace_ns > 0 && now_ns.saturating_sub(value.first_ns) < grace_ns {
                continue;
            }
            self.adopt(key, now_ns);
        }
        Ok(())
    }

    /// Follows a kernel flow the agent has no start event of.
    fn adopt(&mut self, key: FlowKey, now_ns: u64) {
        self.adopted += 1;
        self.known.insert(key, Known { adopted: true, ..Known::default() });
        self.schedule(key, now_ns);
    }

    /// Looks at one flow: closes it, slices it, or schedules its next check,
    /// as `mode` asks.
    fn check(
        &mut self,
        key: FlowKey,
        now_ns: u64,
        table: &mut impl FlowTable,
        nat: &NatTable,
        mode: Check,
    ) -> Result<()> {
        let Some(known) = self.known.get(&key).copied() else { return Ok(()) };
        let Some(value) = table.get(&key)? else {
            // Removed with the LAN flow it was joined to.
            self.forget(&key);
            return Ok(());
        };

        // Seen on the WAN side only, and conntrack has it untranslated: a
        // connection of the gateway's own, which no device made.
        let mut gateways_own = false;
        // Seen on the WAN side only, and no device's connection it can join:
        // closed without a record (see `Orphan`).
        let mut orphan = None;
        if is_wan_only(&value) {
            let lan_half = |mapping: &Mapping| -> Result<FlowKey> {
                let lan_key = mapping.original.key().0;
                // A half moved aside goes with the LAN half moved aside with it.
                Ok(if key.is_retired() && table.get(&lan_key.retired())?.is_some() {
                    lan_key.retired()
                } else {
                    lan_key
                })
            };
            match wan_mapping(&key, nat).map(lan_half).transpose()? {
                Some(lan_key) if lan_key == key => gateways_own = true,
                // The mapping is a later connection's that was given the
                // same public port for the same remote end (CGNAT reuses
                // ports within seconds): this half predates its LAN half, so
                // it is not that device's, and its own mapping is gone.
                // So is a half moved aside (its connection ended and another
                // took its ports) whose LAN half was not moved aside with it:
                // the mapping is the newer connection's, never this one's.
                Some(lan_key)
                    if self.superseded.contains(&key)
                        || (key.is_retired() && !lan_key.is_retired())
                        || !table.get(&lan_key)?.is_none_or(|lan| is_own_half(&lan, &value)) =>
                {
                    self.superseded.insert(key);
                    orphan = Some(Orphan::Superseded);
                }
                Some(lan_key) => {
                    // A LAN half the agent was not told of (its start event
                    // lost, no sweep since): follow it now, so it reports this one.
                    if !self.known.contains_key(&lan_key) && table.get(&lan_key)?.is_some() {
                        self.adopt(lan_key, now_ns);
                    }
                    // Its LAN flow reports it; only a forced close without one reaches below.
                    self.known.entry(key).or_default().joined_to = Some(lan_key);
                    if self.known.contains_key(&lan_key) {
                        if mode == Check::Due {
                            let next = value.last_ns.saturating_add(nanos(self.idle_timeout(Proto::from(key.proto))));
                            self.schedule(key, next.max(now_ns + 1));
                        }
                        return Ok(());
                    }
                    // Its LAN half was written and removed. A TCP half
                    // that did not open with the connection holds only what
                    // came after it (a late FIN, RST or ACK); a datagram
                    // after the LAN half idled out is the mapping's own
                    // traffic, recorded as a slice of its device's.
                    if Proto::from(key.proto) == Proto::Tcp && value.first_tcp_flags & tcp_flags::SYN == 0 {
                        orphan = Some(Orphan::LateHalf);
                    }
                }
                // No mapping names a device behind the NAT: an inbound
                // packet conntrack never confirmed (a scan of the public
                // address), or a half whose mapping is long gone.
                None if self.nat_expected => orphan = Some(Orphan::Unmapped),
                None => {}
            }
        }

        let view = FlowView::new(&key, &value, nat, self.nat_expected);
        // The WAN half of this connection, unless the entry under its key
        // began before it did: an older connection's, whose public port and
        // remote end this one was given again. Its counts are not this
        // connection's, and this record lacks its own downstream packets.
        let mut wan_not_own = false;
        let wan_key = match view.wan_key() {
            Some(wan_key) if key.is_retired() => self.retired_wan_half(&key, wan_key, table)?,
            wan_key => wan_key,
        };
        let wan = match wan_key {
            Some(wan_key) if wan_key != key => match table.get(&wan_key)? {
                Some(wan_value) if is_own_half(&value, &wan_value) => Some((wan_key, wan_value)),
                Some(_) => {
                    wan_not_own = true;
                    self.superseded.insert(wan_key);
                    None
                }
                None => None,
            },
            _ => None,
        };
        // The public port has been given to a later connection to the same
        // remote end while this one's WAN entry was still kept (CGNAT reuses
        // ports within seconds of a close): that connection's packets count
        // in the same entry, so its last packet need not be this one's.
        let handed_over = wan.is_some()
            && view
                .mapping
                .is_some_and(|own| nat.by_reply(&own.reply).is_some_and(|holder| holder.original != own.original));
        // TCP flags per side of the connection, the WAN flow's included.
        let device_side = usize::from(view.device_dir);
        let (mut sent, mut received) = (value.tcp_flags[device_side], value.tcp_flags[1 - device_side]);
        let mut last_ns = value.last_ns;
        if let (Some((_, wan_value)), Some(mapping)) = (&wan, view.mapping) {
            let (_, reply_dir) = mapping.reply.key();
            received |= wan_value.tcp_flags[usize::from(reply_dir)];
            sent |= wan_value.tcp_flags[1 - usize::from(reply_dir)];
            if !handed_over {
                last_ns = last_ns.max(wan_value.last_ns);
            }
        }
        let flags = closing_flags(sent, received);

        // A forced close (shutdown, end of capture) of a flow that already
        // saw FIN or RST still says how it ended.
        let ended = (Proto::from(key.proto) == Proto::Tcp).then(|| ended_by(flags)).flatten();
        let reason = match mode {
            Check::Close(forced) => Some(ended.unwrap_or(forced)),
            // What came after its connection was written: nothing to wait for.
            _ if orphan == Some(Orphan::LateHalf) => {
                close_reason(&self.timeouts, Proto::from(key.proto), tcp_flags::RST, last_ns, now_ns)
            }
            // A connection that ended is closed, whoever records what is left.
            Check::Slice(_) => {
                ended.or_else(|| close_reason(&self.timeouts, Proto::from(key.proto), flags, last_ns, now_ns))
            }
            Check::Due => close_reason(&self.timeouts, Proto::from(key.proto), flags, last_ns, now_ns),
        };
        let slice_start = if known.slice_start_ns == 0 { value.first_ns } else { known.slice_start_ns };
        let active_due = slice_start.saturating_add(nanos(self.timeouts.active));
        let slice_reason = match mode {
            Check::Slice(reason) => Some(reason),
            _ if now_ns >= active_due => Some(EndReason::Active),
            _ => None,
        };

        match (reason, slice_reason) {
            (Some(reason), _) => {
                log::debug!(
                    "closing {key:?} ({reason:?}): first {} last {last_ns} now {now_ns} wan {:?}",
                    value.first_ns,
                    wan.as_ref().map(|(k, v)| (k.port_lo, k.port_hi, v.first_ns, v.last_ns))
                );
                if gateways_own {
                    self.gateway_flows += 1;
                } else if let Some(orphan) = orphan {
                    match orphan {
                        Orphan::LateHalf => self.orphans.late_halves += 1,
                        Orphan::Unmapped => self.orphans.unmapped += 1,
                        Orphan::Superseded => self.orphans.superseded += 1,
                    }
                } else {
                    let mut record = self.record(&view, &known, wan.as_ref(), last_ns, reason);
                    record.incomplete |= wan_not_own || handed_over;
                    self.keep(record);
                }
                self.hold(key, value.first_ns);
                if let Some((wan_key, wan_value)) = wan {
                    self.hold(wan_key, wan_value.first_ns);
                }
            }
            (None, Some(slice_reason)) => {
                if !gateways_own && orphan.is_none() {
                    let mut record = self.record(&view, &known, wan.as_ref(), now_ns, slice_reason);
                    record.incomplete |= wan_not_own || handed_over;
                    self.keep(record);
                }
                let entry = self.known.entry(key).or_default();
                entry.reported_packets = value.packets;
                entry.reported_bytes = value.bytes;
                entry.slice_start_ns = now_ns;
                entry.incomplete = false;
                entry.adopted = false;
                if let Some((wan_key, wan_value)) = wan {
                    let entry = self.known.entry(wan_key).or_default();
                    entry.reported_packets = wan_value.packets;
                    entry.reported_bytes = wan_value.bytes;
                }
                self.schedule(key, now_ns.saturating_add(nanos(self.timeouts.active)));
            }
            (None, None) => {
                let idle_due = if Proto::from(key.proto) == Proto::Tcp && flags & (tcp_flags::FIN | tcp_flags::RST) != 0
                {
                    last_ns.saturating_add(nanos(self.timeouts.tcp_closed))
                } else {
                    last_ns.saturating_add(nanos(self.idle_timeout(Proto::from(key.proto))))
                };
                self.schedule(key, idle_due.min(active_due).max(now_ns + 1));
            }
        }
        Ok(())
    }

    /// A flow is closed: its kernel entry waits for its record to be stored.
    fn hold(&mut self, key: FlowKey, first_ns: u64) {
        self.forget(&key);
        if self.held.insert(key, first_ns).is_none() {
            self.closed.push(key);
        }
    }

    /// The WAN half of the LAN half moved aside under `key`: the one moved
    /// aside with it, or the current one if it has not been (yet, or ever:
    /// the new connection was given another public port), unless that
    /// began with the LAN half's successor.
    fn retired_wan_half(&self, key: &FlowKey, wan_key: FlowKey, table: &impl FlowTable) -> Result<Option<FlowKey>> {
        if table.get(&wan_key.retired())?.is_some() {
            return Ok(Some(wan_key.retired()));
        }
        let successor = table.get(&key.current())?;
        let current = table.get(&wan_key.current())?;
        Ok(match (successor, current) {
            (Some(successor), Some(wan)) if wan.first_ns >= successor.first_ns => None,
            _ => Some(wan_key.current()),
        })
    }

    /// Drops what the assembler holds of a kernel flow that is gone.
    fn forget(&mut self, key: &FlowKey) {
        if let Some(Known { due_ns: Some(due_ns), .. }) = self.known.remove(key) {
            self.due.remove(&(due_ns, *key));
        }
        self.superseded.remove(key);
        self.hints.remove(key);
        self.named_at_start.remove(key);
    }

    fn keep(&mut self, mut record: Icr) {
        let device = record.device.ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        if is_local_only(device) || is_local_only(record.remote.ip) {
            self.local_flows += 1;
        } else {
            record.id = self.ids.next(&record.start);
            self.records.push(record);
        }
    }

    fn record(
        &self,
        view: &FlowView,
        known: &Known,
        wan_flow: Option<&(FlowKey, FlowValue)>,
        last_ns: u64,
        reason: EndReason,
    ) -> Icr {
        let wan = wan_flow.map(|(_, value)| value);
        let wan_known = wan_flow.and_then(|(key, _)| self.known.get(key));
        let value = view.value;
        let up = view.device_dir as usize;
        let down = 1 - up;
        // (Saturating: a connection's entry begun again for a new one, the
        // agent not told, holds less than the slices reported.)
        let mut packets_up = value.packets[up].saturating_sub(known.reported_packets[up]);
        let mut packets_down = value.packets[down].saturating_sub(known.reported_packets[down]);
        let mut bytes_up = value.bytes[up].saturating_sub(known.reported_bytes[up]);
        let mut bytes_down = value.bytes[down].saturating_sub(known.reported_bytes[down]);
        if let (Some(wan), Some(mapping)) = (wan, view.mapping) {
            let (_, reply_dir) = mapping.reply.key();
            let (_, sent_dir) = mapping.reply.reversed().key();
            let base = wan_known.copied().unwrap_or_default();
            let (r, s) = (reply_dir as usize, sent_dir as usize);
            packets_down += wan.packets[r].saturating_sub(base.reported_packets[r]);
            bytes_down += wan.bytes[r].saturating_sub(base.reported_bytes[r]);
            // Upstream packets are counted on the LAN side; the WAN side sees
            // them only where the probe also watches WAN egress (never in XDP).
            packets_up += wan.packets[s].saturating_sub(base.reported_packets[s]);
            bytes_up += wan.bytes[s].saturating_sub(base.reported_bytes[s]);
        }
        let start_ns = if known.slice_start_ns == 0 { opened_ns(value) } else { known.slice_start_ns };
        let device = view.device;
        let mac = Mac(value.mac[up]);
        let local = view.is_local();
        let public = if local { None } else { view.public() };
        let missing_nat = public.is_none() && !local;
        let (mut service, dns_all) =
            FlowHints::merged(self.hints.get(view.key), wan_flow.and_then(|(key, _)| self.hints.get(key)));
        let dns = dns_all.first().cloned();
        if service.is_none() && dns_all.is_empty() {
            // No name of its own: what this device looked up for this address.
            let asker = DeviceId { mac, ip: device.src };
            let named =
                self.named_at_start.get(view.key).or_else(|| self.dns_cache.lookup(asker, device.dst, value.first_ns));
            service = named.map(|named| Service {
                name: named.name.clone(),
                source: ServiceSource::Dns,
                ech: false,
                origin: Some(DnsOrigin { dns_at: self.clock.to_utc(named.answered_ns), resolver: named.resolver }),
            });
        }
        Icr {
            id: String::new(), // given by `keep`, for the records kept
            probe: None,
            start: self.clock.to_utc(start_ns),
            end: self.clock.to_utc(last_ns.max(start_ns)),
            end_reason: reason,
            proto: Proto::from(view.key.proto).to_string(),
            device: Device {
                mac: (!mac.is_unset()).then(|| mac.to_string()),
                ip: Some(device.src),
                port: Some(device.src_port),
                vlan: value.vlan.iter().copied().filter(|&id| id != 0).collect(),
                pppoe_session: (value.pppoe_session != 0).then_some(value.pppoe_session),
                subscriber: None,
            },
            public,
            remote: Endpoint { ip: device.dst, port: device.dst_port },
            service,
            dns_all,
            dns,
            packets_up,
            packets_down,
            bytes_up,
            bytes_down,
            incomplete: known.incomplete
                || known.adopted
                || wan_known.is_some_and(|w| w.incomplete || w.adopted)
                || missing_nat,
            local,
        }
    }
}

/// A half of a connection seen on the WAN side only that no device's
/// connection can take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Orphan {
    /// A TCP half re-opened by a packet after its connection was written.
    LateHalf,
    /// No NAT mapping names a device for it.
    Unmapped,
    /// The only mapping naming a device for it is a later connection's.
    Superseded,
}

/// WAN halves closed without a record, by why (`/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrphanCounts {
    /// Late packets of a TCP connection already written.
    pub late_halves: u64,
    /// Flows no NAT mapping joins to a device (unconfirmed inbound packets).
    pub unmapped: u64,
    /// Halves older than the connection whose mapping now holds their
    /// public port: their own mapping is gone (an agent died meanwhile).
    pub superseded: u64,
}

/// The sizes of the assembler's maps (`/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AssemblerSizes {
    /// Closed flows whose records are on their way to the store.
    pub held_flows: usize,
    /// Flows with hint state (service names, DNS questions).
    pub hinted_flows: usize,
    /// Flows named by a DNS answer when they started.
    pub named_flows: usize,
    /// Flow checks scheduled (at most one a known flow).
    pub scheduled_checks: usize,
    /// DNS answers waiting for their question (at most 10 s).
    pub pending_dns: usize,
    /// DNS answers held to name later connections.
    pub dns_cache_entries: usize,
}

/// A DNS response, and where it was seen.
struct DnsAnswer {
    /// As it travelled: resolver → device (or → the device's public address).
    packet: Tuple,
    seen: Seen,
    message: dns::Message,
}

/// Why an answer names nothing (yet).
enum Untrusted {
    /// Its question has not been seen: wait a little (a late NAT mapping).
    NotYet,
    /// No device asked it: unsolicited, or an answer to a spoofed question.
    Unasked,
    /// It arrived on a LAN port, from another device.
    FromLan,
}

/// DNS answers, by what became of them (`/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsAnswerCounts {
    /// Answers to a device's own question: they may name its connections.
    pub trusted: u64,
    /// Answers no device asked for (unsolicited, or to a spoofed question).
    pub unasked: u64,
    /// Answers that arrived on a LAN port from another device.
    pub from_lan: u64,
}

/// A kernel flow seen from the device: which direction is upstream, and the
/// NAT mapping of the connection, if any.
struct FlowView<'a> {
    key: &'a FlowKey,
    value: &'a FlowValue,
    /// Direction in which the device sends.
    device_dir: u8,
    /// The upstream tuple: device → remote.
    device: Tuple,
    mapping: Option<&'a Mapping>,
    nat_expected: bool,
}

impl<'a> FlowView<'a> {
    fn new(key: &'a FlowKey, value: &'a FlowValue, nat: &'a NatTable, nat_expected: bool) -> Self {
        // A WAN flow reported on its own: the device is behind the NAT and
        // sends against the mapping's reply, whichever end sent the first
        // packet the probe saw (a late FIN from the server is no device's).
        if is_wan_only(value)
            && let Some(mapping) = wan_mapping(key, nat)
        {
            let (_, reply_dir) = mapping.reply.key();
            return Self {
                key,
                value,
                device_dir: 1 - reply_dir,
                device: mapping.original,
                mapping: Some(mapping),
                nat_expected,
            };
        }
        let device_dir = device_direction(value);
        let mut device = Tuple::from_key(key, device_dir);
        // A connection moved aside for a newer one on its 5-tuple had the
        // mapping before the newer one's, if the NAT changed it.
        let preceding = if key.is_retired() { nat.preceding(&device) } else { None };
        let mapping = preceding.or_else(|| nat.by_original(&device)).or_else(|| nat.by_reply(&device.reversed()));
        if let Some(mapping) = mapping {
            // A WAN flow reported on its own: the device is behind the NAT.
            device = mapping.original;
        }
        Self { key, value, device_dir, device, mapping, nat_expected }
    }

    /// The kernel key of the WAN side of this connection, if NAT changed it.
    fn wan_key(&self) -> Option<FlowKey> {
        self.mapping.map(|mapping| mapping.reply.key().0)
    }

    /// Whether the exchange never left the gateway: the gateway itself
    /// answered the device (its resolver, DHCP server, web page: the TC
    /// egress program saw it), and no packet of it crossed the WAN side or
    /// was translated.
    fn is_local(&self) -> bool {
        let roles = roles_of(self.value);
        roles.has(Role::Gateway)
            && !roles.has(Role::Wan)
            && self.mapping.is_none_or(|m| m.reply == m.original.reversed())
    }

    fn public(&self) -> Option<Endpoint> {
        if let Some(mapping) = self.mapping {
            let (ip, port) = mapping.public();
            return Some(Endpoint { ip, port });
        }
        let routed = roles_of(self.value).has(Role::Wan);
        (routed || !self.nat_expected).then_some(Endpoint { ip: self.device.src, port: self.device.src_port })
    }
}

/// Whether a flow event says its entry counts a new connection.
fn is_start(kind: u8) -> bool {
    kind == event_kind::FLOW_START || kind == event_kind::FLOW_REOPEN
}

/// When the connection opened: its first packet, or for TCP the last SYN
/// its opener retried unanswered. Under CGNAT a device's SYNs are dropped
/// until a public port frees; dating its record from the first of them made
/// it overlap the port's previous holder, and question 1 named the wrong
/// device.
fn opened_ns(value: &FlowValue) -> u64 {
    value.first_ns.saturating_add(u64::from(value.syn_retry) << SYN_RETRY_SHIFT)
}

/// The device's sending direction: the one that arrived on a LAN interface;
/// when both or neither did (a single capture point), the connection's
/// initiator.
fn device_direction(value: &FlowValue) -> u8 {
    let lan = value.roles.map(|bits| Roles::from_bits(bits).has(Role::Lan));
    match lan {
        [true, false] => 0,
        [false, true] => 1,
        _ => {
            let syn_ack = tcp_flags::SYN | tcp_flags::ACK;
            if value.first_tcp_flags & syn_ack == syn_ack { 1 - value.first_dir } else { value.first_dir }
        }
    }
}

/// Addresses no internet connection has at either end: neighbour discovery,
/// multicast group chatter, DHCP broadcasts, duplicate address detection.
fn is_local_only(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast() || v6.is_unicast_link_local(),
    }
}

/// The NAT mapping whose reply direction (remote → public address) a WAN
/// flow carries, whichever way its first packet went.
fn wan_mapping<'a>(key: &FlowKey, nat: &'a NatTable) -> Option<&'a Mapping> {
    [0, 1].into_iter().find_map(|dir| nat.by_reply(&Tuple::from_key(key, dir)))
}

/// Whether `wan` can be the WAN half of the connection whose LAN half is
/// `lan`: a connection's WAN half begins after its LAN half (the device's
/// packet is translated before any answer comes back). Both times are the
/// kernel's one monotonic clock.
fn is_own_half(lan: &FlowValue, wan: &FlowValue) -> bool {
    wan.first_ns >= lan.first_ns
}

fn is_wan_only(value: &FlowValue) -> bool {
    let roles = roles_of(value);
    roles.has(Role::Wan) && !roles.has(Role::Lan)
}

/// The roles a flow's packets were seen with, either way.
fn roles_of(value: &FlowValue) -> Roles {
    Roles::from_bits(value.roles[0]).union(Roles::from_bits(value.roles[1]))
}

pub fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{capture::nat::NatEvent, capture::tuple::ipv4};
    use probe_common::role;

    const SEC: u64 = 1_000_000_000;

    #[derive(Default)]
    struct FakeTable(HashMap<FlowKey, FlowValue>);

    impl FlowTable for FakeTable {
        fn get(&self, key: &FlowKey) -> Result<Option<FlowValue>> {
            Ok(self.0.get(key).copied())
        }
        fn remove(&mut self, key: &FlowKey) -> Result<()> {
            self.0.remove(key);
            Ok(())
        }
        fn keys(&self) -> Result<Vec<FlowKey>> {
            Ok(self.0.keys().copied().collect())
        }
    }

    impl FakeTable {
        /// Counts a packet the way the XDP program does.
        fn packet(&mut self, tuple: Tuple, bytes: u64, flags: u8, role: u8, at: u64) -> FlowKey {
            self.packet_from(role_mac(role), tuple, bytes, flags, role, at)
        }

        /// A packet from the device with that MAC.
        fn packet_from(&mut self, mac: [u8; 6], tuple: Tuple, bytes: u64, flags: u8, role: u8, at: u64) -> FlowKey {
            let (key, dir) = tuple.key();
            let d = dir as usize;
            // A SYN from a side that ended: the ended connection moves aside
            // (unless one moved aside before is still there).
            let ended = |value: &FlowValue| value.tcp_flags[d] & (tcp_flags::FIN | tcp_flags::RST) != 0;
            if tuple.proto == Proto::Tcp
                && flags & tcp_flags::SYN != 0
                && self.0.get(&key).is_some_and(ended)
                && !self.0.contains_key(&key.retired())
            {
                let value = self.0.remove(&key).expect("there");
                self.0.insert(key.retired(), value);
            }
            let value = self.0.entry(key).or_insert_with(|| FlowValue {
                first_ns: at,
                first_dir: dir,
                first_tcp_flags: flags,
                ..FlowValue::default()
            });
            value.last_ns = at;
            if value.packets[d] > 0
                && flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
                && dir == value.first_dir
            {
                value.syn_retry = ((at - value.first_ns) >> SYN_RETRY_SHIFT) as u32;
            }
            value.packets[d] += 1;
            value.bytes[d] += bytes;
            value.tcp_flags[d] |= flags;
            value.roles[d] |= role;
            if value.mac[d] == [0; 6] {
                value.mac[d] = mac;
            }
            key
        }
    }

    fn start_event(key: FlowKey, at: u64) -> ProbeEvent {
        ProbeEvent::Flow(FlowEvent { kind: event_kind::FLOW_START, key, ts_ns: at, ..FlowEvent::default() })
    }

    fn reopen_event(key: FlowKey, at: u64) -> ProbeEvent {
        ProbeEvent::Flow(FlowEvent { kind: event_kind::FLOW_REOPEN, key, ts_ns: at, ..FlowEvent::default() })
    }

    fn end_event(key: FlowKey, at: u64) -> ProbeEvent {
        ProbeEvent::Flow(FlowEvent { kind: event_kind::FLOW_END, key, ts_ns: at, ..FlowEvent::default() })
    }

    fn device_tuple() -> Tuple {
        Tuple {
            src: ipv4(192, 168, 1, 23),
            src_port: 51544,
            dst: ipv4(203, 0, 113, 10),
            dst_port: 443,
            proto: Proto::Tcp,
        }
    }

    #[test]
    fn routed_tcp_flow_closes_after_fin_with_both_directions() {
        let mut table = FakeTable::default();
        let nat = NatTable::default();
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), true);
        let up = device_tuple();
        let key = table.packet(up, 60, tcp_flags::SYN, role::LAN, SEC);
        assembler.on_event(start_event(key, SEC), &NatTable::default());
        table.packet(up.reversed(), 60, tcp_flags::SYN | tcp_flags::ACK, role::WAN, 2 * SEC);
        table.packet(up, 500, tcp_flags::ACK | tcp_flags::PSH, role::LAN, 3 * SEC);
        table.packet(up.reversed(), 1500, tcp_flags::ACK | tcp_flags::FIN, role::WAN, 4 * SEC);
        assembler.on_event(end_event(key, 4 * SEC), &NatTable::default());
        table.packet(up, 40, tcp_flags::ACK | tcp_flags::FIN, role::LAN, 4 * SEC);

        assembler.tick(5 * SEC, &mut table, &nat).unwrap();
        assert!(assembler.take_records().is_empty(), "still inside tcp_closed");
        assembler.tick(10 * SEC, &mut table, &nat).unwrap();
        let records = assembler.take_records();
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(r.end_reason, EndReason::Fin);
        assert_eq!(r.device.ip, Some(up.src));
        assert_eq!(r.device.port, Some(up.src_port));
        assert_eq!(r.device.mac.as_deref(), Some("02:00:00:00:00:01"));
        assert_eq!(r.remote, Endpoint { ip: up.dst, port: 443 });
        assert_eq!(r.public, Some(Endpoint { ip: up.src, port: up.src_port }), "routed: no NAT");
        assert_eq!((r.packets_up, r.packets_down, r.bytes_up, r.bytes_down), (3, 2, 600, 1560));
        assert_eq!(r.start.timestamp(), 1);
        assert_eq!(r.end.timestamp(), 4);
        assert!(!r.incomplete);
        assert_eq!(table.0.len(), 1, "a closed flow's kernel entry waits for its record to be stored");
        // A late packet of it (a retransmitted FIN) opens nothing again.
        table.packet(up, 40, tcp_flags::FIN | tcp_flags::ACK, role::LAN, 5 * SEC);
        assembler.on_event(end_event(key, 5 * SEC), &NatTable::default());
        assembler.tick(20 * SEC, &mut table, &NatTable::default()).unwrap();
        assert!(assembler.take_records().is_empty(), "no second record of it");
        let closed = assembler.take_closed_flows();
        assembler.release(&closed, &mut table).unwrap();
        assert!(table.0.is_empty(), "stored: the kernel entry goes");
        assert_eq!(assembler.held_flows(), 0);
    }

    #[test]
    fn the_schedule_holds_one_check_per_followed_flow() {
        let mut table = FakeTable::default();
        let nat = NatTable::default();
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), true);
        // Steady load: short connections, one after the other, each closed
        // by FIN well inside tcp_idle (300 s).
        for n in 0..500u16 {
            let at = SEC + u64::from(n) * SEC / 10;
            let up = Tuple { src_port: 40000 + n, ..device_tuple() };
            let key = table.packet(up, 60, tcp_flags::SYN, role::LAN, at);
            assembler.on_event(start_event(key, at), &nat);
            table.packet(up.reversed(), 60, tcp_flags::SYN | tcp_flags::ACK, role::WAN, at);
            table.packet(up, 40, tcp_flags::ACK | tcp_flags::FIN, role::LAN, at);
            table.packet(up.reversed(), 40, tcp_flags::ACK | tcp_flags::FIN, role::WAN, at);
            assembler.on_event(end_event(key, at), &nat);
            assembler.tick(at, &mut table, &nat).unwrap();
            let closed = assembler.take_closed_flows();
            assembler.release(&closed, &mut table).unwrap();
        }
        let sizes = assembler.sizes();
        let open = assembler.open_flows();
        assert!(sizes.scheduled_checks <= open, "{sizes:?}, {open} open");
        assert!(open <= 60, "flows close tcp_closed after their FIN: {open} open");
        let mut recorded = assembler.take_records().len();
        assert_eq!(recorded + open, 500);
        // The rest close on time: the check kept for each was its earliest.
        assembler.tick(60 * SEC, &mut table, &nat).unwrap();
        recorded += assembler.take_records().len();
        assert_eq!(recorded, 500);
        assert_eq!((assembler.open_flows(), assembler.sizes().scheduled_checks), (0, 0));
    }

    /// The MAC the fake table gives packets arriving with `role`.
    fn role_mac(role: u8) -> [u8; 6] {
        [2, 0, 0, 0, 0, role]
    }

    /// The gateway's own MAC: where devices send, what its answers come from.
    const GATEWAY_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x99];

    /// A hint event of `tuple`'s packet arriving with `role`, from
    /// `role_mac(role)` to the gateway.
    fn hint_event(tuple: Tuple, role: u8, at: u64, payload: &[u8]) -> ProbeEvent {
        hint_frame(tuple, role, at, (role_mac(role), GATEWAY_MAC), payload)
    }

    /// A hint event of an Ethernet frame from `macs.0` to `macs.1`.
    fn hint_frame(tuple: Tuple, role: u8, at: u64, macs: ([u8; 6], [u8; 6]), payload: &[u8]) -> ProbeEvent {
        let (key, dir) = tuple.key();
        let mut frame = macs.1.to_vec();
        frame.extend_from_slice(&macs.0);
        frame.extend_from_slice(payload);
        let event = FlowEvent {
            kind: event_kind::HINT,
            key,
            dir,
            role,
            ts_ns: at,
            mac_src: macs.0,
            payload_offset: 12,
            ..FlowEvent::default()
        };
        ProbeEvent::Hint(event, frame)
    }

    /// At 1 s, 192.168.1.23 asks the gateway's resolver for
    /// www.example.test and is answered 198.51.100.10; conntrack follows
    /// the exchange with the gateway too, untranslated. Then, at 2 s, the
    /// device opens a connection to that address with no name of its own,
    /// NATed to 203.0.113.1:10001. Returns the connection's tuple and reply.
    fn a_lookup_then_a_connection(
        table: &mut FakeTable,
        nat: &mut NatTable,
        assembler: &mut Assembler,
    ) -> (Tuple, Tuple, FlowKey) {
        use crate::capture::hints::dns::tests::{a_record, response};
        let device = ipv4(192, 168, 1, 23);
        let web = ipv4(198, 51, 100, 10);
        let lookup = Tuple { src: device, src_port: 40000, dst: ipv4(192, 168, 1, 1), dst_port: 53, proto: Proto::Udp };
        nat.apply(NatEvent::New(Mapping { original: lookup, reply: lookup.reversed() }), SEC);
        let answer =
            response("www.example.test", simple_dns::TYPE::A, vec![a_record("www.example.test", [198, 51, 100, 10])]);
        let mut question = answer.clone();
        question[2] &= 0x7f;
        let key = table.packet(lookup, 60, 0, role::LAN, SEC);
        assembler.on_event(start_event(key, SEC), nat);
        assembler.on_event(hint_event(lookup, role::LAN, SEC, &question), nat);
        table.packet(lookup.reversed(), 90, 0, role::GATEWAY, SEC + 1000);
        assembler.on_event(hint_event(lookup.reversed(), role::GATEWAY, SEC + 1000, &answer), nat);

        let up = Tuple { src: device, src_port: 51000, dst: web, dst_port: 8080, proto: Proto::Tcp };
        let reply = Tuple { src: web, src_port: 8080, dst: ipv4(203, 0, 113, 1), dst_port: 10001, proto: Proto::Tcp };
        nat.apply(NatEvent::New(Mapping { original: up, reply }), 2 * SEC);
        let lan = table.packet(up, 60, tcp_flags::SYN, role::LAN, 2 * SEC);
        table.packet(reply, 60, tcp_flags::SYN | tcp_flags::ACK, role::WAN, 2 * SEC + 1000);
        assembler.on_event(start_event(lan, 2 * SEC), nat);
        (up, reply, lan)
    }

    #[test]
    fn the_gateways_resolver_answer_names_a_later_connection_and_its_exchange_is_local() {
        let mut table = FakeTable::default();
        let mut nat = NatTable::default();
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), true);
        let (_, reply, _) = a_lookup_then_a_connection(&mut table, &mut nat, &mut assembler);

        assembler.close_all(3 * SEC, EndReason::Shutdown, &mut table, &nat).unwrap();
        let records = assembler.take_records();
        assert_eq!(records.len(), 2, "{records:#?}");
        let exchange = records.iter().find(|r| r.remote.port == 53).unwrap();
        assert_eq!(exchange.public, None, "the exchange never left the gateway");
        assert!(exchange.local);
        assert!(!exchange.incomplete, "no NAT mapping is missing from a local exchange");
        assert_eq!((exchange.packets_up, exchange.packets_down), (1, 1));
        assert_eq!(exchange.dns.as_ref().map(|d| d.answers.clone()), Some(vec!["198.51.100.10".to_string()]));
        let connection = records.iter().find(|r| r.remote.port == 8080).unwrap();
        let service = connection.service.as_ref().expect("named from the gateway resolver's answer");
        assert_eq!((service.name.as_str(), service.source), ("www.example.test", ServiceSource::Dns));
        assert_eq!(connection.public, Some(Endpoint { ip: reply.dst, port: reply.dst_port }));
        assert!(!connection.local);
    }

    #[test]
    fn an_agent_handing_its_probe_over_leaves_the_rest_of_each_connection_to_the_next_named() {
        let mut table = FakeTable::default();
        let mut nat = NatTable::default();
        let mut before = Assembler::new(Timeouts::default(), Clock::capture(), true);
        // The connection is a download, open when the agent stops.
        let (up, reply, lan) = a_lookup_then_a_connection(&mut table, &mut nat, &mut before);
        for at in 3..=5 {
            table.packet(reply, 1500, tcp_flags::ACK, role::WAN, at * SEC);
            table.packet(up, 40, tcp_flags::ACK, role::LAN, at * SEC);
        }
        // One that ended is closed, not handed over.
        let ended = Tuple { src_port: 51001, ..up };
        let ended_key = table.packet(ended, 60, tcp_flags::SYN, role::LAN, 2 * SEC);
        before.on_event(start_event(ended_key, 2 * SEC), &nat);
        table.packet(ended, 40, tcp_flags::ACK | tcp_flags::RST, role::LAN, 5 * SEC);

        let (flows, answers) = before.hand_over(6 * SEC, EndReason::Shutdown, &mut table, &nat).unwrap();
        let so_far = before.take_records();
        assert_eq!(so_far.len(), 3, "{so_far:#?}");
        let first = so_far.iter().find(|r| r.remote.port == 8080 && r.device.port == Some(51000)).unwrap();
        assert_eq!(first.end_reason, EndReason::Shutdown);
        assert_eq!((first.packets_up, first.packets_down, first.bytes_down), (4, 4, 60 + 3 * 1500));
        let reset = so_far.iter().find(|r| r.device.port == Some(51001)).unwrap();
        assert_eq!(reset.end_reason, EndReason::Rst, "a connection that ended is closed as it ended");
        let closed = before.take_closed_flows();
        assert!(closed.contains(&ended_key), "its entry goes once stored");
        before.release(&closed, &mut table).unwrap();
        assert!(!table.0.contains_key(&ended_key));
        assert!(!flows.iter().any(|f| FlowKey::from(f.key) == ended_key));
        assert!(table.0.contains_key(&lan), "an open connection's entry stays for the next agent");

        // The probe goes on counting while no agent runs.
        for at in 7..=9 {
            table.packet(reply, 1500, tcp_flags::ACK, role::WAN, at * SEC);
            table.packet(up, 40, tcp_flags::ACK, role::LAN, at * SEC);
        }
        let handover = Handover::decode(&Handover::new(7, flows, answers).encode().unwrap(), 7).unwrap();
        let mut after = Assembler::new(Timeouts::default(), Clock::capture(), true);
        assert_eq!(
            after.take_over(handover, &table, 10 * SEC).unwrap(),
            3,
            "the download's two halves and the exchange"
        );
        // A new connection to the address looked up before the handover.
        let again = Tuple { src_port: 51002, ..up };
        let reply_again = Tuple { dst_port: 10002, ..reply };
        nat.apply(NatEvent::New(Mapping { original: again, reply: reply_again }), 11 * SEC);
        let again_key = table.packet(again, 60, tcp_flags::SYN, role::LAN, 11 * SEC);
        after.on_event(start_event(again_key, 11 * SEC), &nat);
        table.packet(reply, 40, tcp_flags::ACK | tcp_flags::FIN, role::WAN, 12 * SEC);
        table.packet(up, 40, tcp_flags::ACK | tcp_flags::FIN, role::LAN, 12 * SEC);
        after.on_event(end_event(lan, 12 * SEC), &nat);
        after.close_all(20 * SEC, EndReason::Shutdown, &mut table, &nat).unwrap();
        let rest = after.take_records();
        let second = rest.iter().find(|r| r.device.port == Some(51000)).expect("the rest of the download");
        assert_eq!(second.end_reason, EndReason::Fin);
        assert_eq!(second.start, first.end, "it starts where the first record ended");
        assert_eq!((second.packets_up, second.packets_down, second.bytes_down), (4, 4, 3 * 1500 + 40), "no byte twice");
        assert_eq!(second.public, first.public);
        assert!(!second.incomplete, "{second:#?}");
        assert_eq!(second.service, first.service, "named as before");
        assert_eq!(second.service.as_ref().map(|s| s.name.as_str()), Some("www.example.test"));
        let new = rest.iter().find(|r| r.device.port == Some(51002)).expect("the new connection");
        assert_eq!(new.service.as_ref().map(|s| s.name.as_str()), Some("www.example.test"), "the lookup is remembered");
        assert_eq!(after.adopted, 0, "nothing was taken for unknown");
    }

    #[test]
    fn a_gateway_answer_names_the_device_without_a_conntrack_entry() {
        use crate::capture::hints::dns::tests::{a_record, response};
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), true);
        let device = ipv4(192, 168, 1, 23);
        let lookup = Tuple { src: device, src_port: 40000, dst: ipv4(192, 168, 1, 1), dst_port: 53, proto: Proto::Udp };
        let answer =
            response("www.example.test", simple_dns::TYPE::A, vec![a_record("www.example.test", [198, 51, 100, 10])]);
        let mut question = answer.clone();
        question[2] &= 0x7f;
        assembler.on_event(hint_event(lookup, role::LAN, SEC, &question), &NatTable::default());
        assembler.on_event(hint_event(lookup.reversed(), role::GATEWAY, SEC + 1000, &answer), &NatTable::default());
        let asker = DeviceId { mac: Mac(role_mac(role::LAN)), ip: device };
        let named = assembler.dns_cache.lookup(asker, ipv4(198, 51, 100, 10), 2 * SEC).expect("the device asked");
        assert_eq!((named.name.as_str(), named.resolver), ("www.example.test", "192.168.1.1:53".parse().unwrap()));
        assert!(assembler.pending_dns.is_empty(), "the gateway sent it to the device: no NAT mapping to wait for");
        assert_eq!(assembler.dns_answers, DnsAnswerCounts { trusted: 1, ..DnsAnswerCounts::default() });
    }

    /// Device A (one MAC) and device B (another) behind a NAT gateway, and
    /// the records of B's connections to an address A tries to name.
    struct Neighbours {
        table: FakeTable,
        nat: NatTable,
        assembler: Assembler,
    }

    const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
    const HOUR: u64 = 3_600 * SEC;

    impl Neighbours {
        fn new(nat_expected: bool) -> Self {
            Self {
                table: FakeTable::default(),
                nat: NatTable::default(),
                assembler: Assembler::new(Timeouts::default(), Clock::capture(), nat_expected),
            }
        }

        fn b() -> IpAddr {
            ipv4(192, 168, 1, 12)
        }

        /// A DNS message naming `illegal-content.example` 198.51.100.77 for a day.
        fn dns(id: u16, response: bool) -> Vec<u8> {
            use crate::capture::hints::dns::tests::{a_record, response as answer};
            let mut record = a_record("illegal-content.example", [198, 51, 100, 77]);
            record.ttl = 86_400;
            let mut bytes = answer("illegal-content.example", simple_dns::TYPE::A, vec![record]);
            bytes[..2].copy_from_slice(&id.to_be_bytes());
            if !response {
                bytes[2] &= 0x7f;
            }
            bytes
        }

        /// A question through NAT to an upstream resolver, from `mac` with
        /// `src` as its address, and the resolver's answer arriving on the WAN.
        fn ask_upstream(&mut self, mac: [u8; 6], src: IpAddr, port: u16, public_port: u16, at: u64) {
            let question = Tuple { src, src_port: port, dst: ipv4(9, 9, 9, 9), dst_port: 53, proto: Proto::Udp };
            let reply = Tuple {
                src: ipv4(9, 9, 9, 9),
                src_port: 53,
                dst: ipv4(203, 0, 113, 1),
                dst_port: public_port,
                proto: Proto::Udp,
            };
            self.nat.apply(NatEvent::New(Mapping { original: question, reply }), at);
            let key = self.table.packet_from(mac, question, 70, 0, role::LAN, at);
            self.assembler.on_event(start_event(key, at), &self.nat);
            self.assembler
                .on_event(hint_frame(question, role::LAN, at, (mac, GATEWAY_MAC), &Self::dns(7, false)), &self.nat);
            self.table.packet_from([2, 0, 0, 0, 0, 0xee], reply, 120, 0, role::WAN, at + 20_000_000);
            let answer = hint_frame(
                reply,
                role::WAN,
                at + 20_000_000,
                ([2, 0, 0, 0, 0, 0xee], [2, 0, 0, 0, 0, 0xf0]),
                &Self::dns(7, true),
            );
            self.assembler.on_event(answer, &self.nat);
        }

        /// B connects to the named address without SNI, at `at`.
        fn b_connects(&mut self, port: u16, at: u64) {
            let up =
                Tuple { src: Self::b(), src_port: port, dst: ipv4(198, 51, 100, 77), dst_port: 443, proto: Proto::Tcp };
            let reply =
                Tuple { src: up.dst, src_port: 443, dst: ipv4(203, 0, 113, 1), dst_port: port, proto: Proto::Tcp };
            self.nat.apply(NatEvent::New(Mapping { original: up, reply }), at);
            let lan = self.table.packet_from(MAC_B, up, 60, tcp_flags::SYN, role::LAN, at);
            self.table.packet(reply, 60, tcp_flags::SYN | tcp_flags::ACK, role::WAN, at + 1000);
            let (_, dir) = up.key();
            let start = FlowEvent {
                kind: event_kind::FLOW_START,
                key: lan,
                dir,
                role: role::LAN,
                mac_src: MAC_B,
                ts_ns: at,
                ..FlowEvent::default()
            };
            self.assembler.on_event(ProbeEvent::Flow(start), &self.nat);
            self.assembler.tick(at + 1, &mut self.table, &self.nat).unwrap();
        }

        /// The names on B's connections to 198.51.100.77, by start.
        fn b_names(mut self, at: u64) -> (Vec<Option<Service>>, DnsAnswerCounts) {
            self.assembler.close_all(at, EndReason::Shutdown, &mut self.table, &self.nat).unwrap();
            let mut records = self.assembler.take_records();
            records.sort_by_key(|r| r.start);
            let names = records
                .into_iter()
                .filter(|r| r.remote.port == 443 && r.device.ip == Some(Self::b()))
                .map(|r| r.service)
                .collect();
            (names, self.assembler.dns_answers)
        }
    }

    #[test]
    fn an_answer_nobody_asked_for_names_nothing() {
        for nat_expected in [true, false] {
            let mut lab = Neighbours::new(nat_expected);
            // A sends B, from its own port 53, an answer B never asked for.
            let planted = Tuple {
                src: ipv4(192, 168, 1, 10),
                src_port: 53,
                dst: Neighbours::b(),
                dst_port: 40000,
                proto: Proto::Udp,
            };
            lab.table.packet_from(MAC_A, planted, 120, 0, role::LAN, SEC);
            lab.assembler
                .on_event(hint_frame(planted, role::LAN, SEC, (MAC_A, MAC_B), &Neighbours::dns(7, true)), &lab.nat);
            lab.b_connects(50001, 2 * SEC);
            lab.b_connects(50002, 3 * HOUR);
            let (names, answers) = lab.b_names(3 * HOUR + SEC);
            assert_eq!(names, [None, None], "nat_expected {nat_expected}: B's connections are not named by A's answer");
            assert_eq!(answers.trusted, 0);
            assert_eq!(answers.unasked + answers.from_lan, 1, "nat_expected {nat_expected}: counted");
        }
    }

    #[test]
    fn an_answer_to_a_question_spoofed_with_another_devices_address_names_nothing_of_it() {
        // Through NAT to an upstream resolver.
        let mut lab = Neighbours::new(true);
        lab.ask_upstream(MAC_A, Neighbours::b(), 40000, 20000, SEC);
        lab.b_connects(50001, 2 * SEC);
        let (names, answers) = lab.b_names(3 * SEC);
        assert_eq!(names, [None]);
        assert_eq!(answers.trusted, 1, "the answer went to the (MAC, address) that asked: A's MAC, B's address");

        // To the gateway's own resolver, which answers B's address.
        let mut lab = Neighbours::new(true);
        let question =
            Tuple { src: Neighbours::b(), src_port: 40000, dst: ipv4(192, 168, 1, 1), dst_port: 53, proto: Proto::Udp };
        lab.table.packet_from(MAC_A, question, 70, 0, role::LAN, SEC);
        lab.assembler
            .on_event(hint_frame(question, role::LAN, SEC, (MAC_A, GATEWAY_MAC), &Neighbours::dns(7, false)), &lab.nat);
        lab.table.packet_from(GATEWAY_MAC, question.reversed(), 120, 0, role::GATEWAY, SEC + 1000);
        let answer =
            hint_frame(question.reversed(), role::GATEWAY, SEC + 1000, (GATEWAY_MAC, MAC_B), &Neighbours::dns(7, true));
        lab.assembler.on_event(answer, &lab.nat);
        lab.b_connects(50001, 2 * SEC);
        let (names, _) = lab.b_names(3 * SEC);
        assert_eq!(names, [None]);
    }

    #[test]
    fn a_devices_own_answer_names_its_connections_for_the_ttl_and_an_hour_at_most() {
        let mut lab = Neighbours::new(true);
        lab.ask_upstream(MAC_B, Neighbours::b(), 40000, 20000, SEC);
        lab.b_connects(50001, 2 * SEC);
        lab.b_connects(50002, 3 * HOUR);
        let (names, answers) = lab.b_names(3 * HOUR + SEC);
        let first = names[0].as_ref().expect("B asked: its connection is named");
        assert_eq!((first.name.as_str(), first.source), ("illegal-content.example", ServiceSource::Dns));
        let origin = first.origin.expect("the exchange that named it");
        assert_eq!(origin.resolver, "9.9.9.9:53".parse().unwrap());
        assert_eq!(origin.dns_at, Clock::capture().to_utc(SEC + 20_000_000));
        assert_eq!(names[1], None, "a day's TTL names for an hour at most");
        assert_eq!(answers, DnsAnswerCounts { trusted: 1, ..DnsAnswerCounts::default() });
    }

    #[test]
    fn an_answer_from_the_lan_names_nothing_where_both_sides_are_watched() {
        let mut lab = Neighbours::new(true);
        // B asks a resolver on the LAN side (or A races the real answer).
        let question = Tuple {
            src: Neighbours::b(),
            src_port: 40000,
            dst: ipv4(192, 168, 1, 10),
            dst_port: 53,
            proto: Proto::Udp,
        };
        lab.table.packet_from(MAC_B, question, 70, 0, role::LAN, SEC);
        lab.assembler
            .on_event(hint_frame(question, role::LAN, SEC, (MAC_B, MAC_A), &Neighbours::dns(7, false)), &lab.nat);
        lab.assembler.on_event(
            hint_frame(question.reversed(), role::LAN, SEC + 1000, (MAC_A, MAC_B), &Neighbours::dns(7, true)),
            &lab.nat,
        );
        lab.b_connects(50001, 2 * SEC);
        let (names, answers) = lab.b_names(3 * SEC);
        assert_eq!(names, [None]);
        assert_eq!(answers, DnsAnswerCounts { from_lan: 1, ..DnsAnswerCounts::default() });

        // One capture point (a replayed LAN capture): the hop B asked may answer, no other.
        for (answerer, named) in [(MAC_A, true), (GATEWAY_MAC, false)] {
            let mut lab = Neighbours::new(false);
            lab.table.packet_from(MAC_B, question, 70, 0, role::LAN, SEC);
            lab.assembler
                .on_event(hint_frame(question, role::LAN, SEC, (MAC_B, MAC_A), &Neighbours::dns(7, false)), &lab.nat);
            lab.assembler.on_event(
                hint_frame(question.reversed(), role::LAN, SEC + 1000, (answerer, MAC_B), &Neighbours::dns(7, true)),
                &lab.nat,
            );
            lab.b_connects(50001, 2 * SEC);
            let (names, _) = lab.b_names(3 * SEC);
            assert_eq!(names[0].is_some(), named, "answered from {answerer:?}");
        }
    }

    #[test]
    fn the_gateways_own_upstream_connections_are_no_devices_and_leave_the_table() {
        let mut table = FakeTable::default();
        let mut nat = NatTable::default();
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), true);
        // The gateway's resolver asks upstream from its WAN address: XDP sees the answer arrive.
        let query = Tuple {
            src: ipv4(203, 0, 113, 1),
            src_port: 33000,
            dst: ipv4(9, 9, 9, 9),
            dst_port: 53,
            proto: Proto::Udp,
        };
        nat.apply(NatEvent::New(Mapping { original: query, reply: query.reversed() }), SEC);
        let key = table.packet(query.reversed(), 90, 0, role::WAN, SEC);
        assembler.on_event(start_event(key, SEC), &nat);
        assembler.tick(2 * SEC, &mut table, &nat).unwrap();
        assert_eq!(assembler.open_flows(), 1, "open until idle");
        assembler.tick(120 * SEC, &mut table, &nat).unwrap();
        assert!(assembler.take_records().is_empty(), "no device made it");
        assert_eq!(assembler.gateway_flows, 1);
        let closed = assembler.take_closed_flows();
        assembler.release(&closed, &mut table).unwrap();
        assert!(table.0.is_empty(), "closed: its kernel entry is removed");
        assert_eq!(assembler.open_flows(), 0);
    }

    #[test]
    fn nat_joins_lan_and_wan_flows_into_one_record() {
        let mut table = FakeTable::default();
        let mut nat = NatTable::default();
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), true);
        let up = device_tuple();
        let public = (ipv4(198, 51, 100, 1), 10007);
        let reply = Tuple { src: up.dst, src_port: up.dst_port, dst: public.0, dst_port: public.1, proto: Proto::Tcp };
        nat.apply(NatEvent::New(Mapping { original: up, reply }), SEC);

        let lan = table.packet(up, 60, tcp_flags::SYN, role::LAN, SEC);
        let wan = table.packet(reply, 60, tcp_flags::SYN | tcp_flags::ACK, role::WAN, 2 * SEC);
        table.packet(up, 100, tcp_flags::ACK | tcp_flags::FIN, role::LAN, 3 * SEC);
        table.packet(reply, 900, tcp_flags::ACK | tcp_flags::FIN, role::WAN, 4 * SEC);
        assembler.on_event(start_event(wan, 2 * SEC), &NatTable::default());
        assembler.on_event(start_event(lan, SEC), &NatTable::default());
        assembler.on_event(end_event(lan, 3 * SEC), &NatTable::default());
        assembler.on_event(end_event(wan, 4 * SEC), &NatTable::default());

        assembler.tick(20 * SEC, &mut table, &nat).unwrap();
        let records = assembler.take_records();
        assert_eq!(records.len(), 1, "{records:#?}");
        let r = &records[0];
        assert_eq!(r.public, Some(Endpoint { ip: public.0, port: public.1 }));
        assert_eq!(r.device.ip, Some(up.src));
        assert_eq!((r.packets_up, r.packets_down, r.bytes_up, r.bytes_down), (2, 2, 160, 960));
        assert_eq!(r.end.timestamp(), 4, "the WAN side's last packet counts");
        assert!(!r.incomplete);
        let closed = assembler.take_closed_flows();
        assembler.release(&closed, &mut table).unwrap();
        assert!(table.0.is_empty());
        assert_eq!(assembler.open_flows(), 0);
    }

    /// The store took the closed flows' records: their kernel entries go.
    fn stored(assembler: &mut Assembler, table: &mut FakeTable) {
        let closed = assembler.take_closed_flows();
        assembler.release(&closed, table).unwrap();
    }

    /// A NATed connection to 203.0.113.10:443 through 198.51.100.1:10007,
    /// opened, exchanged and closed on both sides by 3 s; its mapping known.
    fn nat_connection(table: &mut FakeTable, nat: &mut NatTable) -> (Tuple, Tuple) {
        let up = device_tuple();
        let reply = Tuple {
            src: up.dst,
            src_port: up.dst_port,
            dst: ipv4(198, 51, 100, 1),
            dst_port: 10007,
            proto: Proto::Tcp,
        };
        nat.apply(NatEvent::New(Mapping { original: up, reply }), SEC);
        table.packet(up, 60, tcp_flags::SYN, role::LAN, SEC);
        table.packet(reply, 60, tcp_flags::SYN | tcp_flags::ACK, role::WAN, SEC + 1000);
        table.packet(up, 400, tcp_flags::ACK | tcp_flags::PSH, role::LAN, 2 * SEC);
        table.packet(reply, 900, tcp_flags::ACK | tcp_flags::FIN, role::WAN, 3 * SEC);
        table.packet(up, 52, tcp_flags::ACK | tcp_flags::FIN, role::LAN, 3 * SEC);
        (up, reply)
    }

    /// The device opens a second connection from the same port to the same
    /// server at `again` (its first ended at 3 s, not written yet), and the
    /// NAT gives it `public_port`; it is answered and closed within 100 ms.
    /// Returns the second connection's reply tuple.
    fn port_reused(
        table: &mut FakeTable,
        nat: &mut NatTable,
        assembler: &mut Assembler,
        (up, reply): (Tuple, Tuple),
        again: u64,
        public_port: u16,
    ) -> Tuple {
        let reply_again = Tuple { dst_port: public_port, ..reply };
        nat.apply(NatEvent::Destroy(Mapping { original: up, reply }), again);
        nat.apply(NatEvent::New(Mapping { original: up, reply: reply_again }), again);
        table.packet(up, 60, tcp_flags::SYN, role::LAN, again);
        assembler.on_event(reopen_event(up.key().0, again), nat);
        let wan_event =
            |at| if public_port == reply.dst_port { reopen_event } else { start_event }(reply_again.key().0, at);
        table.packet(reply_again, 60, tcp_flags::SYN | tcp_flags::ACK, role::WAN, again + 1000);
        assembler.on_event(wan_event(again + 1000), nat);
        table.packet(up, 300, tcp_flags::ACK | tcp_flags::PSH, role::LAN, again + 50_000_000);
        table.packet(reply_again, 700, tcp_flags::ACK | tcp_flags::FIN, role::WAN, again + 90_000_000);
        table.packet(up, 52, tcp_flags::ACK | tcp_flags::FIN, role::LAN, again + 100_000_000);
        assembler.on_event(end_event(up.key().0, again + 100_000_000), nat);
        reply_again
    }

    /// Both connections of [`port_reused`]: one record each, with its own
    /// times, counts and public port; every kernel entry gone once stored.
    fn two_connections_on_one_port(public_port: u16) {
        let mut table = FakeTable::default();
        let mut nat = NatTable::default();
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), true);
        let (up, reply) = nat_connection(&mut table, &mut nat);
        assembler.on_event(start_event(up.key().0, SEC), &nat);
        assembler.on_event(start_event(reply.key().0, SEC + 1000), &nat);
        assembler.on_event(end_event(up.key().0, 3 * SEC), &nat);
        let again = 3 * SEC + SEC / 2;
        port_reused(&mut table, &mut nat, &mut assembler, (up, reply), again, public_port);
        assembler.tick(20 * SEC, &mut table, &nat).unwrap();
        let mut records = assembler.take_records();
        records.sort_by_key(|r| r.start);
        assert_eq!(records.len(), 2, "{records:#?}");
        let at = |time: &chrono::DateTime<chrono::Utc>| time.timestamp_nanos_opt().unwrap() as u64;
        let (first, second) = (&records[0], &records[1]);
        assert_eq!((at(&first.start), at(&first.end)), (SEC, 3 * SEC), "the first: {first:#?}");
        assert_eq!((at(&second.start), at(&second.end)), (again, again + 100_000_000), "the second: {second:#?}");
        assert_eq!((first.packets_up, first.packets_down), (3, 2));
        assert_eq!((second.packets_up, second.packets_down), (3, 2));
        assert_eq!(first.public.map(|p| p.port), Some(reply.dst_port));
        assert_eq!(second.public.map(|p| p.port), Some(public_port));
        assert!(records.iter().all(|r| !r.incomplete && r.end_reason == EndReason::Fin), "{records:#?}");
        stored(&mut assembler, &mut table);
        assert!(table.0.is_empty(), "{:#?}", table.0);
        assert_eq!(assembler.held_flows(), 0);
    }

    #[test]
    fn a_port_reused_within_a_second_is_two_records_each_with_its_own_times() {
        two_connections_on_one_port(10007);
    }

    #[test]
    fn a_port_reused_with_another_public_port_keeps_each_connections_own() {
        two_connections_on_one_port(10099);
    }

    #[test]
    fn a_port_reused_after_its_connection_was_written_leaves_no_copy_of_it() {
        // The first connection is written at 4.2 s and its entries held;
        // the second opens at 4.5 s, before the record is stored.
        let mut table = FakeTable::default();
        let mut nat = NatTable::default();
        let timeouts = Timeouts { tcp_closed: Duration::from_secs(1), ..Timeouts::default() };
        let mut assembler = Assembler::new(timeouts, Clock::capture(), true);
        let (up, reply) = nat_connection(&mut table, &mut nat);
        assembler.on_event(start_event(up.key().0, SEC), &nat);
        assembler.on_event(start_event(reply.key().0, SEC + 1000), &nat);
        assembler.on_event(end_event(up.key().0, 3 * SEC), &nat);
        assembler.tick(4 * SEC + SEC / 5, &mut table, &nat).unwrap();
        assert_eq!(assembler.take_records().len(), 1);
        let closed = assembler.take_closed_flows();
        let again = 4 * SEC + SEC / 2;
        port_reused(&mut table, &mut nat, &mut assembler, (up, reply), again, reply.dst_port);
        assembler.release(&closed, &mut table).unwrap();
        assert_eq!(table.0.len(), 2, "the second connection's entries stay: {:#?}", table.0);
        assembler.tick(20 * SEC, &mut table, &nat).unwrap();
        let records = assembler.take_records();
        assert_eq!(records.len(), 1, "the second, and no copy of the first: {records:#?}");
        assert_eq!(records[0].start.timestamp_nanos_opt(), Some(again as i64));
        stored(&mut assembler, &mut table);
        assert!(table.0.is_empty(), "{:#?}", table.0);
    }

    #[test]
    fn a_late_wan_packet_after_the_connection_was_written_is_no_record() {
        let mut table = FakeTable::default();
        let mut nat = NatTable::default();
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), true);
        let (up, reply) = nat_connection(&mut table, &mut nat);
        assembler.on_event(start_event(up.key().0, SEC), &nat);
        assembler.on_event(start_event(reply.key().0, SEC + 1000), &nat);
        assembler.on_event(end_event(up.key().0, 3 * SEC), &nat);
        assembler.tick(10 * SEC, &mut table, &nat).unwrap();
        assert_eq!(assembler.take_records().len(), 1, "the connection, written once");
        stored(&mut assembler, &mut table);
        assert!(table.0.is_empty());

        // The server retransmits its FIN after both halves left the table
        // (a probe older than this agent's let it make a flow).
        let late = table.packet(reply, 52, tcp_flags::ACK | tcp_flags::FIN, role::WAN, 11 * SEC);
        assembler.on_event(start_event(late, 11 * SEC), &nat);
        assembler.on_event(end_event(late, 11 * SEC), &nat);
        // Past every timeout: whatever the assembler waits for has come.
        assembler.tick(400 * SEC, &mut table, &nat).unwrap();
        let records = assembler.take_records();
        assert!(records.is_empty(), "a late packet is no second record: {records:#?}");
        assert_eq!(assembler.orphans, OrphanCounts { late_halves: 1, ..OrphanCounts::default() });
        stored(&mut assembler, &mut table);
        assert!(table.0.is_empty(), "its entry leaves the table");
        assert_eq!(assembler.open_flows(), 0);
    }

    #[test]
    fn a_wan_half_on_its_own_never_names_the_remote_end_as_device() {
        // A datagram from the server after the device's UDP flow idled out:
        // the mapping's own traffic, recorded with the device behind the NAT.
        let mut table = FakeTable::default();
        let mut nat = NatTable::default();
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), true);
        let up = Tuple { proto: Proto::Udp, ..device_tuple() };
        let reply = Tuple {
            src: up.dst,
            src_port: up.dst_port,
            dst: ipv4(198, 51, 100, 1),
            dst_port: 10007,
            proto: Proto::Udp,
        };
        nat.apply(NatEvent::New(Mapping { original: up, reply }), SEC);
        let key = table.packet(reply, 300, 0, role::WAN, SEC);
        assembler.on_event(start_event(key, SEC), &nat);
        assembler.tick(70 * SEC, &mut table, &nat).unwrap();
        let records = assembler.take_records();
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!((r.device.ip, r.device.port), (Some(up.src), Some(up.src_port)), "the device behind the NAT");
        assert_eq!(r.remote, Endpoint { ip: up.dst, port: up.dst_port });
        assert_eq!(r.public, Some(Endpoint { ip: reply.dst, port: reply.dst_port }));
        assert_eq!((r.packets_up, r.packets_down), (0, 1));
        assert_eq!(r.device.mac, None, "no MAC but the device's own");

        // An inbound SYN no mapping names (a scan of the public address,
        // which conntrack never confirmed): no device, no record.
        let scan = Tuple {
            src: ipv4(203, 0, 113, 66),
            src_port: 40000,
            dst: ipv4(198, 51, 100, 1),
            dst_port: 22,
            proto: Proto::Tcp,
        };
        let key = table.packet(scan, 60, tcp_flags::SYN, role::WAN, 100 * SEC);
        assembler.on_event(start_event(key, 100 * SEC), &nat);
        assembler.tick(500 * SEC, &mut table, &nat).unwrap();
        assert!(assembler.take_records().is_empty());
        assert_eq!(assembler.orphans, OrphanCounts { unmapped: 1, ..OrphanCounts::default() });
        stored(&mut assembler, &mut table);
        assert!(table.0.is_empty());
    }

    #[test]
    fn a_wan_half_whose_lan_half_the_agent_missed_joins_it() {
        // The LAN half's start event was lost and no sweep has run since:
        // the WAN half's close finds it in the table and waits for it.
        let mut table = FakeTable::default();
        let mut nat = NatTable::default();
        let timeouts = Timeouts { full_sweep: Duration::from_secs(3600), ..Timeouts::default() };
        let mut assembler = Assembler::new(timeouts, Clock::capture(), true);
        assembler.tick(0, &mut table, &nat).unwrap();
        let (up, reply) = nat_connection(&mut table, &mut nat);
        assembler.on_event(start_event(reply.key().0, SEC + 1000), &nat);
        assembler.on_event(end_event(reply.key().0, 3 * SEC), &nat);
        assembler.tick(10 * SEC, &mut table, &nat).unwrap();
        let records = assembler.take_records();
        assert_eq!(records.len(), 1, "{records:#?}");
        let r = &records[0];
        assert_eq!(r.device.ip, Some(up.src));
        assert_eq!(r.device.mac.as_deref(), Some("02:00:00:00:00:01"));
        assert_eq!((r.packets_up, r.packets_down), (3, 2), "both halves");
        assert!(r.incomplete, "its start event was lost");
        stored(&mut assembler, &mut table);
        assert!(table.0.is_empty());
    }

    /// X (device 1) ran while no agent did: its conntrack mapping is gone,
    /// its kernel entries are still there (a killed agent, a pinned probe).
    /// Y (device 2) is given the same public port to the same server 2 s
    /// later (CGNAT): its answers land in X's WAN entry; its data at 6 s
    /// carries `y_flags` too. Returns the table, Y's mapping, X, Y and the
    /// reply tuple they share.
    fn port_given_again(y_flags: u8) -> (FakeTable, NatTable, Tuple, Tuple, Tuple) {
        let mut table = FakeTable::default();
        let (x, reply) = nat_connection(&mut table, &mut NatTable::default());
        let y = Tuple { src: ipv4(192, 168, 1, 40), src_port: 40000, ..x };
        let mut nat = NatTable::default();
        nat.apply(NatEvent::New(Mapping { original: y, reply }), 5 * SEC);
        table.packet_from(MAC_B, y, 60, tcp_flags::SYN, role::LAN, 5 * SEC);
        table.packet(reply, 60, tcp_flags::SYN | tcp_flags::ACK, role::WAN, 5 * SEC + 1000);
        table.packet_from(MAC_B, y, 300, tcp_flags::ACK | tcp_flags::PSH | y_flags, role::LAN, 6 * SEC);
        (table, nat, x, y, reply)
    }

    #[test]
    fn a_successor_never_joins_a_half_to_a_later_connections_mapping_of_its_public_port() {
        let (mut table, nat, x, y, reply) = port_given_again(0);

        // A new agent adopts all three entries.
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), true);
        assembler.close_all(10 * SEC, EndReason::Shutdown, &mut table, &nat).unwrap();
        let records = assembler.take_records();
        assert_eq!(records.len(), 2, "{records:#?}");
        let of = |device: &Tuple| records.iter().find(|r| r.device.ip == Some(device.src)).unwrap();
        let (rx, ry) = (of(&x), of(&y));
        assert_eq!(rx.public, None, "X's own mapping cannot be known any more");
        assert!(rx.incomplete);
        assert_eq!(ry.public, Some(Endpoint { ip: reply.dst, port: reply.dst_port }), "Y's own mapping");
        assert_eq!(ry.start.timestamp(), 5, "Y's record begins with Y");
        // X's WAN half had ended (the server's FIN): Y's answer moved it
        // aside, and began an entry of Y's own.
        assert_eq!((ry.packets_up, ry.packets_down), (2, 1), "none of X's packets down are Y's");
        assert!(ry.incomplete, "adopted");
        assert!(
            !records.iter().any(|r| r.device.mac.as_deref() == Some("02:00:00:00:00:0b") && r.start.timestamp() < 5),
            "Y's device is named for no earlier time"
        );
        assert_eq!(assembler.orphans, OrphanCounts { superseded: 1, ..OrphanCounts::default() });
    }

    #[test]
    fn a_superseded_half_stays_no_ones_after_the_later_connection_is_written() {
        // As above, and Y closes at 6 s.
        let (mut table, nat, _, y, reply) = port_given_again(tcp_flags::FIN);
        table.packet(reply, 100, tcp_flags::ACK | tcp_flags::FIN, role::WAN, 6 * SEC + 1000);
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), true);
        // The first tick finds the WAN half older than Y; Y's and X's LAN
        // halves are written (X idles out) and Y's entry is released before
        // the WAN half is looked at again.
        assembler.tick(20 * SEC, &mut table, &nat).unwrap();
        let idle = 20 * SEC + nanos(Timeouts::default().tcp_idle);
        table.0.retain(|key, _| *key != y.key().0);
        assembler.tick(idle + 10 * SEC, &mut table, &nat).unwrap();
        assembler.close_all(idle + 20 * SEC, EndReason::Shutdown, &mut table, &nat).unwrap();
        let records = assembler.take_records();
        assert!(
            !records.iter().any(|r| r.device.ip == Some(y.src) && r.start.timestamp() < 5),
            "Y's device is named for no earlier time: {records:#?}"
        );
    }

    #[test]
    fn a_half_moved_aside_whose_lan_half_is_gone_is_no_later_holders() {
        // An agent killed after writing X, before deleting X's WAN entry;
        // Y's answer moved that entry aside; Y is written and its LAN entry
        // gone too. The successor finds the entry X left: Y's mapping names
        // its public port now, and it is not Y's.
        let (mut table, nat, x, y, _) = port_given_again(tcp_flags::FIN);
        table.0.retain(|key, _| *key != x.key().0 && *key != y.key().0);
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), true);
        assembler.close_all(10 * SEC, EndReason::Shutdown, &mut table, &nat).unwrap();
        let records = assembler.take_records();
        assert!(
            !records.iter().any(|r| r.device.ip == Some(y.src) && r.start.timestamp() < 5),
            "Y's device is named for no earlier time: {records:#?}"
        );
        assert!(assembler.orphans.superseded >= 1, "{:?}", assembler.orphans);
    }

    #[test]
    fn a_closed_connection_does_not_last_into_the_next_holder_of_its_public_port() {
        // X closed at 3 s; its WAN entry is still kept when the NAT gives its
        // public port to Y, another device, for the same server at 5 s, and
        // Y's answers count in X's WAN entry until X is written at 7 s.
        let mut table = FakeTable::default();
        let mut nat = NatTable::default();
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), true);
        let (x, reply) = nat_connection(&mut table, &mut nat);
        assembler.on_event(start_event(x.key().0, SEC), &nat);
        assembler.on_event(start_event(reply.key().0, SEC + 1000), &nat);
        nat.apply(NatEvent::Destroy(Mapping { original: x, reply }), 4 * SEC);
        let y = Tuple { src: ipv4(192, 168, 1, 40), src_port: 40000, ..x };
        nat.apply(NatEvent::New(Mapping { original: y, reply }), 5 * SEC);
        table.packet_from(MAC_B, y, 60, tcp_flags::SYN, role::LAN, 5 * SEC);
        assembler.on_event(start_event(y.key().0, 5 * SEC), &nat);
        table.packet(reply, 60, tcp_flags::SYN | tcp_flags::ACK, role::WAN, 5 * SEC + 1000);
        table.packet_from(MAC_B, y, 300, tcp_flags::ACK | tcp_flags::PSH, role::LAN, 6 * SEC);
        table.packet(reply, 900, tcp_flags::ACK | tcp_flags::PSH, role::WAN, 6 * SEC + 1000);

        assembler.close_all(7 * SEC, EndReason::Shutdown, &mut table, &nat).unwrap();
        let records = assembler.take_records();
        let rx = records.iter().find(|r| r.device.ip == Some(x.src)).unwrap();
        assert_eq!(rx.public, Some(Endpoint { ip: reply.dst, port: reply.dst_port }), "X's own mapping");
        assert_eq!(rx.end.timestamp(), 3, "X's record ends with X, not with Y's packets: {rx:#?}");
        assert!(rx.incomplete, "Y's packets down are counted in X's WAN entry");
    }

    #[test]
    fn destroyed_nat_mappings_are_kept_as_long_as_a_flow_may_still_close() {
        assert_eq!(Timeouts::default().nat_grace(), Duration::from_secs(360));
        let small =
            Timeouts { tcp_idle: Duration::from_secs(120), udp_idle: Duration::from_secs(30), ..Timeouts::default() };
        assert_eq!(small.nat_grace(), Duration::from_secs(180));
    }

    #[test]
    fn a_connection_opens_with_the_last_syn_its_device_retried() {
        let mut table = FakeTable::default();
        let mut nat = NatTable::default();
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), true);
        let up = device_tuple();
        // No public port free: the NAT drops the SYNs at 1 s and 2 s; the one
        // at 4 s gets port 10007 and its answer.
        for at in [SEC, 2 * SEC, 4 * SEC] {
            table.packet(up, 60, tcp_flags::SYN, role::LAN, at);
        }
        let reply = Tuple {
            src: up.dst,
            src_port: up.dst_port,
            dst: ipv4(198, 51, 100, 1),
            dst_port: 10007,
            proto: Proto::Tcp,
        };
        nat.apply(NatEvent::New(Mapping { original: up, reply }), 4 * SEC);
        table.packet(reply, 60, tcp_flags::SYN | tcp_flags::ACK, role::WAN, 4 * SEC + 10_000_000);
        table.packet(up, 40, tcp_flags::ACK | tcp_flags::FIN, role::LAN, 5 * SEC);
        table.packet(reply, 40, tcp_flags::ACK | tcp_flags::FIN, role::WAN, 5 * SEC);
        assembler.close_all(6 * SEC, EndReason::Shutdown, &mut table, &nat).unwrap();
        let r = &assembler.take_records()[0];
        let start_ns = r.start.timestamp_nanos_opt().unwrap() as u64;
        assert!(
            start_ns <= 4 * SEC && 4 * SEC - start_ns < 1 << SYN_RETRY_SHIFT,
            "opened with the SYN at 4 s: {}",
            r.start
        );
        assert_eq!(r.packets_up, 4, "the dropped SYNs were still sent");
        assert_eq!(r.end_reason, EndReason::Fin);
    }

    #[test]
    fn lan_flow_without_mapping_on_a_nat_gateway_is_incomplete() {
        let mut table = FakeTable::default();
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), true);
        let key = table.packet(device_tuple(), 60, tcp_flags::SYN, role::LAN, SEC);
        assembler.on_event(start_event(key, SEC), &NatTable::default());
        assembler.close_all(2 * SEC, EndReason::Shutdown, &mut table, &NatTable::default()).unwrap();
        let r = &assembler.take_records()[0];
        assert_eq!(r.end_reason, EndReason::Shutdown);
        assert_eq!(r.public, None);
        assert!(r.incomplete);
    }

    #[test]
    fn udp_idles_out_and_lost_start_events_are_adopted() {
        let mut table = FakeTable::default();
        let nat = NatTable::default();
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), false);
        let dns =
            Tuple { src: ipv4(10, 0, 0, 2), src_port: 5353, dst: ipv4(10, 0, 0, 1), dst_port: 53, proto: Proto::Udp };
        table.packet(dns, 70, 0, role::LAN, SEC);
        table.packet(dns.reversed(), 120, 0, role::LAN, SEC + 1000);
        // No start event: the full sweep finds it.
        assembler.tick(2 * SEC, &mut table, &nat).unwrap();
        assert_eq!(assembler.adopted, 1);
        assembler.tick(30 * SEC, &mut table, &nat).unwrap();
        assert!(assembler.take_records().is_empty());
        assembler.tick(62 * SEC, &mut table, &nat).unwrap();
        let records = assembler.take_records();
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(r.end_reason, EndReason::Idle);
        assert_eq!(r.proto, "udp");
        assert_eq!(r.device.ip, Some(dns.src), "the initiator is the device on one interface");
        assert_eq!((r.packets_up, r.packets_down), (1, 1));
        assert!(r.incomplete, "its start event was lost");
    }

    #[test]
    fn a_flow_known_only_by_its_hint_is_closed_and_forgotten() {
        use crate::capture::hints::dns::tests::{a_record, response};
        let mut table = FakeTable::default();
        let nat = NatTable::default();
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), false);
        let lookup =
            Tuple { src: ipv4(10, 0, 0, 2), src_port: 5353, dst: ipv4(10, 0, 0, 1), dst_port: 53, proto: Proto::Udp };
        let mut question =
            response("www.example.test", simple_dns::TYPE::A, vec![a_record("www.example.test", [198, 51, 100, 10])]);
        question[2] &= 0x7f;
        // Its start event was lost (a full ring); its hint came through.
        table.packet(lookup, 70, 0, role::LAN, SEC);
        assembler.on_event(hint_event(lookup, role::LAN, SEC, &question), &nat);
        for second in 2..=70 {
            assembler.tick(second * SEC, &mut table, &nat).unwrap();
        }
        let records = assembler.take_records();
        assert_eq!(records.len(), 1, "closed after udp_idle, as any flow");
        assert!(records[0].incomplete, "its start event was lost");
        let closed = assembler.take_closed_flows();
        assembler.release(&closed, &mut table).unwrap();
        assert_eq!((assembler.open_flows(), assembler.sizes().hinted_flows), (0, 0), "nothing of it is held");
        assert!(table.0.is_empty(), "its kernel entry goes too");

        // A hint of a flow already stored and gone from the kernel holds nothing either.
        assembler.on_event(hint_event(lookup, role::LAN, 71 * SEC, &question), &nat);
        assembler.tick(73 * SEC, &mut table, &nat).unwrap();
        assert!(assembler.take_records().is_empty());
        assert_eq!((assembler.open_flows(), assembler.sizes().hinted_flows), (0, 0));
    }

    #[test]
    fn a_start_event_behind_a_sweep_is_late_not_lost() {
        let mut table = FakeTable::default();
        let nat = NatTable::default();
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), false);
        let young = table.packet(device_tuple(), 60, tcp_flags::SYN, role::LAN, 10 * SEC);
        let old = table.packet(Tuple { src_port: 51545, ..device_tuple() }, 60, tcp_flags::SYN, role::LAN, 8 * SEC);
        // A sweep at 10.5 s: the young flow's start event may be on its way.
        assembler.tick(10 * SEC + SEC / 2, &mut table, &nat).unwrap();
        assert_eq!(assembler.adopted, 1, "only the flow a second old is adopted");
        // Both start events arrive after all.
        assembler.on_event(start_event(young, 10 * SEC), &nat);
        assembler.on_event(start_event(old, 8 * SEC), &nat);
        assembler.close_all(12 * SEC, EndReason::Shutdown, &mut table, &nat).unwrap();
        let records = assembler.take_records();
        assert_eq!(records.len(), 2);
        assert!(records.iter().all(|r| !r.incomplete), "{records:#?}");
    }

    #[test]
    fn an_agent_behind_its_events_neither_adopts_nor_closes_what_they_still_name() {
        use crate::capture::hints::dns::tests::{a_record, response};
        let mut table = FakeTable::default();
        let nat = NatTable::default();
        let mut assembler =
            Assembler::new(Timeouts::default(), Clock::capture(), false).with_readers(ReadHorizon::new([0, 1]));
        let lookup =
            Tuple { src: ipv4(10, 0, 0, 2), src_port: 5353, dst: ipv4(10, 0, 0, 1), dst_port: 53, proto: Proto::Udp };
        let mut question =
            response("www.example.test", simple_dns::TYPE::A, vec![a_record("www.example.test", [198, 51, 100, 10])]);
        question[2] &= 0x7f;
        let key = table.packet(lookup, 70, 0, role::LAN, SEC);
        // The agent has read CPU 0 up to now, CPU 1 only up to before the
        // lookup: its start event and its question are still queued.
        assembler.on_event(ProbeEvent::CaughtUp { cpu: 0, at_ns: 70 * SEC }, &nat);
        assembler.on_event(ProbeEvent::CaughtUp { cpu: 1, at_ns: SEC / 2 }, &nat);
        for second in 2..=70 {
            assembler.tick(second * SEC, &mut table, &nat).unwrap();
        }
        assert_eq!(assembler.adopted, 0, "its start event is not lost, only late");
        assert!(assembler.take_records().is_empty(), "nothing closed on events not read yet");

        // CPU 1's reader catches up.
        assembler.on_event(start_event(key, SEC), &nat);
        assembler.on_event(hint_event(lookup, role::LAN, SEC, &question), &nat);
        assembler.on_event(ProbeEvent::CaughtUp { cpu: 1, at_ns: 71 * SEC }, &nat);
        assembler.tick(71 * SEC, &mut table, &nat).unwrap();
        let records = assembler.take_records();
        assert_eq!(records.len(), 1, "closed once its events are read");
        assert!(!records[0].incomplete, "{:?}", records[0]);
        assert_eq!(records[0].dns.as_ref().map(|dns| dns.qname.as_str()), Some("www.example.test"));

        // A reader that stops is no longer waited for.
        let other = table.packet(Tuple { src_port: 5354, ..lookup }, 70, 0, role::LAN, 72 * SEC);
        assembler.on_event(start_event(other, 72 * SEC), &nat);
        assembler.on_event(ProbeEvent::ReaderStopped { cpu: 1 }, &nat);
        assembler.on_event(ProbeEvent::CaughtUp { cpu: 0, at_ns: 200 * SEC }, &nat);
        assembler.tick(200 * SEC, &mut table, &nat).unwrap();
        let records = assembler.take_records();
        assert_eq!(records.len(), 1);
        assert!(records[0].incomplete, "its end may have been on the stopped reader's CPU");
    }

    #[test]
    fn link_local_and_multicast_flows_are_counted_not_recorded() {
        let mut table = FakeTable::default();
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), false);
        let mld = Tuple {
            src: "fe80::1".parse().unwrap(),
            src_port: 0,
            dst: "ff02::16".parse().unwrap(),
            dst_port: 0,
            proto: Proto::Icmpv6,
        };
        let dad = Tuple {
            src: "::".parse().unwrap(),
            src_port: 0,
            dst: "ff02::1:ff00:1".parse().unwrap(),
            dst_port: 0,
            proto: Proto::Icmpv6,
        };
        let dhcp = Tuple {
            src: ipv4(0, 0, 0, 0),
            src_port: 68,
            dst: ipv4(255, 255, 255, 255),
            dst_port: 67,
            proto: Proto::Udp,
        };
        for t in [mld, dad, dhcp] {
            table.packet(t, 90, 0, role::LAN, SEC);
        }
        table.packet(device_tuple(), 60, tcp_flags::SYN, role::LAN, SEC);
        assembler.close_all(2 * SEC, EndReason::Shutdown, &mut table, &NatTable::default()).unwrap();
        assert_eq!(assembler.take_records().len(), 1);
        assert_eq!(assembler.local_flows, 3);
        let closed = assembler.take_closed_flows();
        assembler.release(&closed, &mut table).unwrap();
        assert!(table.0.is_empty(), "their kernel entries are removed too");
    }

    #[test]
    fn a_half_closed_connection_stays_open_until_both_sides_finish() {
        let mut table = FakeTable::default();
        let nat = NatTable::default();
        let mut assembler = Assembler::new(Timeouts::default(), Clock::capture(), false);
        let up = device_tuple();
        let key = table.packet(up, 60, tcp_flags::SYN, role::LAN, SEC);
        assembler.on_event(start_event(key, SEC), &nat);
        // The server sends its data and FIN; the device reads much later.
        table.packet(up.reversed(), 5000, tcp_flags::ACK | tcp_flags::FIN, role::WAN, 2 * SEC);
        assembler.on_event(end_event(key, 2 * SEC), &nat);
        assembler.tick(20 * SEC, &mut table, &nat).unwrap();
        assert!(assembler.take_records().is_empty(), "one FIN is a half-close");
        table.packet(up, 52, tcp_flags::ACK | tcp_flags::FIN, role::LAN, 30 * SEC);
        assembler.on_event(end_event(key, 30 * SEC), &nat);
        assembler.tick(40 * SEC, &mut table, &nat).unwrap();
        let records = assembler.take_records();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].end_reason, EndReason::Fin);
        assert_eq!(records[0].end.timestamp(), 30);
    }

    #[test]
    fn long_flows_are_reported_in_active_slices() {
        let mut table = FakeTable::default();
        let nat = NatTable::default();
        let timeouts = Timeouts { active: Duration::from_secs(10), ..Timeouts::default() };
        let mut assembler = Assembler::new(timeouts, Clock::capture(), false);
        let up = device_tuple();
        let key = table.packet(up, 100, tcp_flags::SYN, role::LAN, SEC);
        assembler.on_event(start_event(key, SEC), &NatTable::default());
        table.packet(up, 100, tcp_flags::ACK, role::LAN, 9 * SEC);
        assembler.tick(11 * SEC, &mut table, &nat).unwrap();
        let first = assembler.take_records();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].end_reason, EndReason::Active);
        assert_eq!(first[0].packets_up, 2);
        table.packet(up, 100, tcp_flags::ACK | tcp_flags::FIN, role::LAN, 12 * SEC);
        table.packet(up.reversed(), 40, tcp_flags::ACK | tcp_flags::FIN, role::LAN, 12 * SEC);
        assembler.on_event(end_event(key, 12 * SEC), &NatTable::default());
        assembler.tick(18 * SEC, &mut table, &nat).unwrap();
        let second = assembler.take_records();
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].end_reason, EndReason::Fin);
        assert_eq!(second[0].packets_up, 1, "only what the first slice did not report");
        assert_eq!(second[0].start.timestamp(), 11);
        assert_ne!(first[0].id, second[0].id);
    }
}
