//! Reading the probe's per-CPU perf buffers: decoding flow events, and
//! noticing the kernel's own "lost N samples" records.
use std::mem::size_of;

use anyhow::Result;
use aya::maps::perf::PerfEvent;
use log::warn;
use probe_common::{FlowEvent, event_kind};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use crate::probe::EventBuffer;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeEvent {
    Flow(FlowEvent),
    /// A packet whose payload may name the service: the event and the frame.
    Hint(FlowEvent, Vec<u8>),
    /// The kernel dropped `count` events of this CPU's buffer.
    Lost { cpu: u32, count: u64 },
    /// A sample too short to be a `FlowEvent` (a version mismatch).
    Malformed { cpu: u32, len: usize },
}

/// Decodes one perf sample, which may wrap around the ring (`head` + `tail`).
pub fn decode(cpu: u32, event: PerfEvent<'_>) -> ProbeEvent {
    match event {
        PerfEvent::Lost { count } => ProbeEvent::Lost { cpu, count },
        PerfEvent::Sample { head, tail } => {
            let len = head.len() + tail.len();
            if len < size_of::<FlowEvent>() {
                return ProbeEvent::Malformed { cpu, len };
            }
            let mut header = [0u8; size_of::<FlowEvent>()];
            copy_out(head, tail, 0, &mut header);
            // SAFETY: `FlowEvent` is plain old data of exactly this size.
            let event: FlowEvent = unsafe { std::ptr::read_unaligned(header.as_ptr().cast()) };
            if event.kind != event_kind::HINT {
                return ProbeEvent::Flow(event);
            }
            let captured = usize::from(event.captured_len);
            if len < header.len() + captured {
                return ProbeEvent::Malformed { cpu, len };
            }
            let mut frame = vec![0u8; captured];
            copy_out(head, tail, header.len(), &mut frame);
            ProbeEvent::Hint(event, frame)
        }
    }
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

/// Takes everything waiting in every buffer, without blocking (replay, tests).
pub fn drain(buffers: &mut [EventBuffer], out: &mut Vec<ProbeEvent>) {
    for EventBuffer { cpu, buffer } in buffers {
        let cpu = *cpu;
        buffer.for_each(|event| out.push(decode(cpu, event)));
    }
}

/// Reads every CPU's buffer as it becomes readable and forwards the events.
/// A full channel makes the readers wait, so the kernel side counts the
/// overflow rather than the agent growing without bound.
pub fn spawn_readers(buffers: Vec<EventBuffer>, tx: mpsc::Sender<ProbeEvent>) -> Result<()> {
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
            assert_eq!(decode(0, PerfEvent::Sample { head, tail }), ProbeEvent::Hint(event, frame.clone()), "split at {split}");
        }
    }

    #[test]
    fn short_samples_are_reported_not_read() {
        let event = FlowEvent { kind: event_kind::HINT, captured_len: 500, ..FlowEvent::default() };
        let bytes = sample(&event, &[1, 2, 3]);
        let decoded = decode(3, PerfEvent::Sample { head: &bytes, tail: &[] });
        assert!(matches!(decoded, ProbeEvent::Malformed { cpu: 3, .. }));
        assert!(matches!(decode(1, PerfEvent::Sample { head: &[0; 10], tail: &[] }), ProbeEvent::Malformed { .. }));
        assert_eq!(decode(2, PerfEvent::Lost { count: 7 }), ProbeEvent::Lost { cpu: 2, count: 7 });
    }
}
