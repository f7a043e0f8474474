//! Reading the probe's events: from its ring buffers, one per CPU (each
//! drained when the probe wakes us, which it does only once a batch is
//! waiting, and on a short timer) or, on older kernels, from per-CPU perf buffers, whose
//! kernel "lost N samples" records are noticed too.
use std::{collections::BTreeMap, mem::size_of, time::Duration};

use anyhow::Result;
use aya::maps::{MapData, RingBuf, perf::PerfEvent};
use log::warn;
use probe_common::{EVENT_RING_DRAIN_MS, FlowEvent, event_kind};
use tokio::{io::unix::AsyncFd, sync::mpsc, time::MissedTickBehavior};

use crate::capture::{
    clock::monotonic_ns,
    probe::{CpuRing, EventBuffer, EventReader},
};

/// How long after its timestamp an event is surely in its buffer: the probe
/// stamps it and commits it in one run of a program (microseconds), and
/// its mid-flow clock may be the coarse one, a scheduler tick behind.
const IN_FLIGHT_NS: u64 = 50_000_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeEvent {
    Flow(FlowEvent),
    /// A packet whose payload may name the service: the event and the frame.
    Hint(FlowEvent, Vec<u8>),
    /// The kernel dropped `count` events of this CPU's perf buffer.
    Lost {
        cpu: u32,
        count: u64,
    },
    /// A record too short to be a `FlowEvent` (a version mismatch); `cpu`
    /// is `None` for a ring buffer record.
    Malformed {
        cpu: Option<u32>,
        len: usize,
    },
    /// The reader of `cpu`'s buffer had read all the buffer held at `at_ns`
    /// (the probe's clock), and sent it before this.
    CaughtUp {
        cpu: u32,
        at_ns: u64,
    },
    /// The reader of `cpu`'s buffer failed: nothing more comes from it.
    ReaderStopped {
        cpu: u32,
    },
}

/// The time up to which every event of the probe has been read, from what
/// the readers say ([`ProbeEvent::CaughtUp`]). A busy agent's queue holds
/// events of the last moments: what is decided from the kernel's table as
/// of a later time than this may miss them (a start event taken for lost,
/// a flow closed before its name was read).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadHorizon {
    /// Each running reader's last caught-up time, by CPU.
    readers: BTreeMap<u32, u64>,
}

impl ReadHorizon {
    /// Readers of `cpus`, none of which has read anything yet.
    pub fn new(cpus: impl IntoIterator<Item = u32>) -> Self {
        Self { readers: cpus.into_iter().map(|cpu| (cpu, 0)).collect() }
    }

    /// The reader of `cpu` had read all its buffer held at `at_ns`.
    pub fn caught_up(&mut self, cpu: u32, at_ns: u64) {
        if let Some(read) = self.readers.get_mut(&cpu) {
            *read = (*read).max(at_ns);
        }
    }

    /// The reader of `cpu` failed: the horizon no longer waits for it.
    pub fn stopped(&mut self, cpu: u32) {
        self.readers.remove(&cpu);
    }

    /// `now_ns`, or the last time whose events are all read when that is earlier.
    pub fn clamp(&self, now_ns: u64) -> u64 {
        match self.readers.values().min() {
            Some(&read) => now_ns.min(read.saturating_sub(IN_FLIGHT_NS)),
            None => now_ns,
        }
    }
}

/// Decodes one perf sample, which may wrap around the ring (`head` + `tail`).
pub fn decode(cpu: u32, event: PerfEvent<'_>) -> ProbeEvent {
    match event {
        PerfEvent::Lost { count } => ProbeEvent::Lost { cpu, count },
        PerfEvent::Sample { head, tail } => {
            decode_record(head, tail).unwrap_or(ProbeEvent::Malformed { cpu: Some(cpu), len: head.len() + tail.len() })
        }
    }
}

/// Decodes one ring buffer record. A hint's record is longer than its frame
/// (the probe reserves a slot of a fixed size): `captured_len` says how much
/// of it is the frame.
pub fn decode_ring(record: &[u8]) -> ProbeEvent {
    decode_record(record, &[]).unwrap_or(ProbeEvent::Malformed { cpu: None, len: record.len() })
}

/// A `FlowEvent` and, for a hint, the frame after it, from `head` + `tail`;
/// `None` when they are too short for that.
fn decode_record(head: &[u8], tail: &[u8]) -> Option<ProbeEvent> {
    let len = head.len() + tail.len();
    if len < size_of::<FlowEvent>() {
        return None;
    }
    let mut header = [0u8; size_of::<FlowEvent>()];
    copy_out(head, tail, 0, &mut header);
    // SAFETY: `FlowEvent` is plain old data of exactly this size.
    let event: FlowEvent = unsafe { std::ptr::read_unaligned(header.as_ptr().cast()) };
    if event.kind != event_kind::HINT {
        return Some(ProbeEvent::Flow(event));
    }
    let captured = usize::from(event.captured_len);
    if len < header.len() + captured {
        return None;
    }
    let mut frame = vec![0u8; captured];
    copy_out(head, tail, header.len(), &mut frame);
    Some(ProbeEvent::Hint(event, frame))
}

/// Copies `out.len()` bytes starting at `offset` of the sample `head`+`tail`.
/// The caller has checked that the sample holds `offset + out.len()` bytes.
fn copy_out(head: &[u8], tail: &[u8], offset: usize, out: &mut [u8]) {
    let from_head = head.len().saturating_sub(offset).min(out.len());
    out[..from_head].copy_from_slice(&head[offset.min(head.len())..][..from_head]);
    let rest = out.len() - from_head;
    if rest > 0 {
        let tail_start = offset + from_head - head.len();
        out[from_head..].copy_from_slice(&tail[tail_start..tail_start + rest]);
    }
}

/// Takes everything waiting, without blocking (replay, tests).
pub fn drain(reader: &mut EventReader, out: &mut Vec<ProbeEvent>) {
    match reader {
        EventReader::Ring(rings) => {
            for CpuRing { ring, .. } in rings {
                drain_ring(ring, out);
            }
        }
        EventReader::Perf(buffers) => {
            for EventBuffer { cpu, buffer } in buffers {
                let cpu = *cpu;
                buffer.for_each(|event| out.push(decode(cpu, event)));
            }
        }
    }
}

fn drain_ring(ring: &mut RingBuf<MapData>, out: &mut Vec<ProbeEvent>) {
    while let Some(record) = ring.next() {
        out.push(decode_ring(&record));
    }
}

/// Reads the events as they come and forwards them, each reader saying
/// after each pass how far it has read; returns the readers' horizon. A
/// full channel makes the readers wait, so the kernel side counts the
/// overflow rather than the agent growing without bound.
pub fn spawn_readers(reader: EventReader, tx: mpsc::Sender<ProbeEvent>) -> Result<ReadHorizon> {
    match reader {
        EventReader::Ring(rings) => {
            let horizon = ReadHorizon::new(rings.iter().map(|ring| ring.cpu));
            for ring in rings {
                spawn_ring_reader(ring, tx.clone())?;
            }
            Ok(horizon)
        }
        EventReader::Perf(buffers) => {
            let horizon = ReadHorizon::new(buffers.iter().map(|buffer| buffer.cpu));
            spawn_perf_readers(buffers, tx)?;
            Ok(horizon)
        }
    }
}

/// Forwards one pass's events, then how far the pass read (`at_ns`, taken
/// before it began); false when the agent is shutting down.
async fn forward(tx: &mpsc::Sender<ProbeEvent>, batch: &mut Vec<ProbeEvent>, cpu: u32, at_ns: u64) -> bool {
    for event in batch.drain(..) {
        if tx.send(event).await.is_err() {
            return false;
        }
    }
    tx.send(ProbeEvent::CaughtUp { cpu, at_ns }).await.is_ok()
}

/// Drains a CPU's ring when the probe wakes us (a batch is waiting) and
/// every [`EVENT_RING_DRAIN_MS`] ms, since below the batch size the probe
/// does not wake us at all.
fn spawn_ring_reader(CpuRing { cpu, ring }: CpuRing, tx: mpsc::Sender<ProbeEvent>) -> Result<()> {
    // SAFETY: the ring owns its map fd and keeps it open (and the same) for
    // as long as the `AsyncFd` that owns the ring.
    let mut fd = unsafe { AsyncFd::register(ring)? };
    tokio::spawn(async move {
        let mut timer = tokio::time::interval(Duration::from_millis(EVENT_RING_DRAIN_MS));
        timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                ready = fd.readable_mut() => match ready {
                    // Clear first: a record that lands while we drain re-arms
                    // the readiness instead of being left until the next one.
                    Ok(mut guard) => guard.clear_ready(),
                    Err(error) => {
                        warn!("the event ring of CPU {cpu} failed: {error}");
                        let _ = tx.send(ProbeEvent::ReaderStopped { cpu }).await;
                        return;
                    }
                },
                _ = timer.tick() => {}
            }
            let at_ns = monotonic_ns();
            drain_ring(fd.get_mut(), &mut batch);
            if !forward(&tx, &mut batch, cpu, at_ns).await {
                return; // the agent is shutting down
            }
        }
    });
    Ok(())
}

/// One task per CPU's perf buffer, each woken by the kernel per event, and
/// on the ring readers' timer, so that an idle CPU says it has read all.
fn spawn_perf_readers(buffers: Vec<EventBuffer>, tx: mpsc::Sender<ProbeEvent>) -> Result<()> {
    for EventBuffer { cpu, buffer } in buffers {
        // SAFETY: the buffer owns its perf fd and keeps it open (and the same)
        // for as long as the `AsyncFd` that owns the buffer.
        let mut fd = unsafe { AsyncFd::register(buffer)? };
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut timer = tokio::time::interval(Duration::from_millis(EVENT_RING_DRAIN_MS));
            timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut batch = Vec::new();
            loop {
                tokio::select! {
                    ready = fd.readable_mut() => match ready {
                        // Clear first: a sample that lands while we drain
                        // re-arms the readiness instead of being left until the next one.
                        Ok(mut guard) => guard.clear_ready(),
                        Err(error) => {
                            warn!("event buffer of CPU {cpu} failed: {error}");
                            let _ = tx.send(ProbeEvent::ReaderStopped { cpu }).await;
                            return;
                        }
                    },
                    _ = timer.tick() => {}
                }
                let at_ns = monotonic_ns();
                fd.get_mut().for_each(|event| batch.push(decode(cpu, event)));
                if !forward(&tx, &mut batch, cpu, at_ns).await {
                    return; // the agent is shutting down
                }
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(event: &FlowEvent, frame: &[u8]) -> Vec<u8> {
        // SAFETY: plain old data.
        let header: [u8; size_of::<FlowEvent>()] = unsafe { std::mem::transmute_copy(event) };
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(frame);
        bytes.extend_from_slice(&[0; 4]); // the kernel's alignment padding
        bytes
    }

    #[test]
    fn hints_decode_whether_or_not_the_sample_wraps() {
        let frame: Vec<u8> = (0..200u8).collect();
        let event = FlowEvent { kind: event_kind::HINT, captured_len: 200, ..FlowEvent::default() };
        let bytes = sample(&event, &frame);
        for split in [0, 10, 80, 81, 150, bytes.len()] {
            let (head, tail) = bytes.split_at(split);
            assert_eq!(
                decode(0, PerfEvent::Sample { head, tail }),
                ProbeEvent::Hint(event, frame.clone()),
                "split at {split}"
            );
        }
    }

    #[test]
    fn short_samples_are_reported_not_read() {
        let event = FlowEvent { kind: event_kind::HINT, captured_len: 500, ..FlowEvent::default() };
        let bytes = sample(&event, &[1, 2, 3]);
        let decoded = decode(3, PerfEvent::Sample { head: &bytes, tail: &[] });
        assert!(matches!(decoded, ProbeEvent::Malformed { cpu: Some(3), .. }));
        assert!(matches!(decode(1, PerfEvent::Sample { head: &[0; 10], tail: &[] }), ProbeEvent::Malformed { .. }));
        assert_eq!(decode(2, PerfEvent::Lost { count: 7 }), ProbeEvent::Lost { cpu: 2, count: 7 });
    }

    #[test]
    fn the_horizon_is_the_slowest_readers_pass_less_what_may_be_in_flight() {
        let now = 100 * 1_000_000_000;
        assert_eq!(ReadHorizon::default().clamp(now), now, "no readers (a capture file): no wait");
        let mut horizon = ReadHorizon::new([0, 1]);
        assert_eq!(horizon.clamp(now), 0, "nothing read yet");
        horizon.caught_up(0, now);
        horizon.caught_up(1, now - 3_000_000_000);
        horizon.caught_up(7, 1); // no reader of this horizon
        assert_eq!(horizon.clamp(now), now - 3_000_000_000 - IN_FLIGHT_NS);
        horizon.caught_up(1, now - 4_000_000_000); // an older pass says nothing new
        assert_eq!(horizon.clamp(now), now - 3_000_000_000 - IN_FLIGHT_NS);
        horizon.stopped(1);
        assert_eq!(horizon.clamp(now), now - IN_FLIGHT_NS);
        horizon.stopped(0);
        assert_eq!(horizon.clamp(now), now);
    }

    #[test]
    fn a_ring_record_holds_its_frame_in_a_longer_slot() {
        let frame: Vec<u8> = (0..200u8).collect();
        let event = FlowEvent { kind: event_kind::HINT, captured_len: 200, ..FlowEvent::default() };
        let mut record = sample(&event, &frame);
        record.resize(size_of::<FlowEvent>() + 512, 0xee); // the slot's unused rest
        assert_eq!(decode_ring(&record), ProbeEvent::Hint(event, frame));
        let flow = FlowEvent { kind: event_kind::FLOW_START, ..FlowEvent::default() };
        assert_eq!(decode_ring(&sample(&flow, &[])), ProbeEvent::Flow(flow));
        assert!(matches!(decode_ring(&record[..100]), ProbeEvent::Malformed { cpu: None, len: 100 }));
    }
}
