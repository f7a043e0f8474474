//! Reading the probe's per-CPU perf buffers: decoding flow events, and
//! noticing the kernel's own "lost N samples" records.
use std::mem::size_of;

use anyhow::Result;
use aya::maps::perf::PerfEvent;
use log::warn;
use probe_common::FlowEvent;
use tokio::{io::unix::AsyncFd, sync::mpsc};

use crate::probe::EventBuffer;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeEvent {
    Flow(FlowEvent),
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
            let mut bytes = [0u8; size_of::<FlowEvent>()];
            let from_head = head.len().min(bytes.len());
            bytes[..from_head].copy_from_slice(&head[..from_head]);
            let from_tail = bytes.len() - from_head;
            bytes[from_head..].copy_from_slice(&tail[..from_tail]);
            // SAFETY: `FlowEvent` is plain old data of exactly this size.
            ProbeEvent::Flow(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
        }
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
