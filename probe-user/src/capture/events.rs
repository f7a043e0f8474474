//! Reading the probe's events: from its ring buffers, one per CPU (each
//! drained when the probe wakes us, which it does only once a batch is
//! waiting, and on a short timer) or, on older kernels, from per-CPU perf buffers, whose
//! kernel "lost N samples" records are noticed too.
use std::{mem::size_of, time::Duration};

use anyhow::Result;
use aya::maps::{MapData, RingBuf, perf::PerfEvent};
use log::warn;
use probe_common::{EVENT_RING_DRAIN_MS, FlowEvent, event_kind};
use tokio::{io::unix::AsyncFd, sync::mpsc, time::MissedTickBehavior};

use crate::capture::probe::{CpuRing, EventBuffer, EventReader};

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

/// Reads the events as they come and forwards them. A full channel makes
/// the readers wait, so the kernel side counts the overflow rather than the
/// agent growing without bound.
pub fn spawn_readers(reader: EventReader, tx: mpsc::Sender<ProbeEvent>) -> Result<()> {
    match reader {
        EventReader::Ring(rings) => {
            for ring in rings {
                spawn_ring_reader(ring, tx.clone())?;
            }
            Ok(())
        }
        EventReader::Perf(buffers) => spawn_perf_readers(buffers, tx),
    }
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
                        return;
                    }
                },
                _ = timer.tick() => {}
            }
            drain_ring(fd.get_mut(), &mut batch);
            for event in batch.drain(..) {
                if tx.send(event).await.is_err() {
                    return; // the agent is shutting down
                }
            }
        }
    });
    Ok(())
}

/// One task per CPU's perf buffer, each woken by the kernel per event.
fn spawn_perf_readers(buffers: Vec<EventBuffer>, tx: mpsc::Sender<ProbeEvent>) -> Result<()> {
    for EventBuffer { cpu, buffer } in buffers {
        // SAFETY: the buffer owns its perf fd and keeps it open (and the same)
        // for as long as the `AsyncFd` that owns the buffer.
        let mut fd = unsafe { AsyncFd::register(buffer)? };
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            loop {
                let mut guard = match fd.readable_mut().await {
                    Ok(guard) => guard,
                    Err(error) => {
                        warn!("event buffer of CPU {cpu} failed: {error}");
                        return;
                    }
                };
                // Clear first: a sample that lands while we drain re-arms the
                // readiness instead of being left until the next one.
                guard.clear_ready();
                guard.get_inner_mut().for_each(|event| batch.push(decode(cpu, event)));
                for event in batch.drain(..) {
                    if tx.send(event).await.is_err() {
                        return; // the agent is shutting down
                    }
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
