//! How events reach the agent. `flow` decides what to send; an
//! [`EventSink`] sends it, and says when it had no room, so that every lost
//! event is counted by the caller.
use core::{cell::UnsafeCell, ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_CPU, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, bpf_map_def,
        bpf_map_type::BPF_MAP_TYPE_PERF_EVENT_ARRAY,
    },
    btf_maps::{ArrayOfMaps, RingBuf as BtfRingBuf},
    helpers::{
        bpf_get_smp_processor_id, bpf_perf_event_output, bpf_ringbuf_discard, bpf_ringbuf_output, bpf_ringbuf_query,
        bpf_ringbuf_reserve, bpf_ringbuf_submit,
    },
    maps::RingBuf,
};
use probe_common::{
    EVENT_RING_BYTES, EVENT_RING_TEMPLATE_BYTES, EVENT_RING_WAKEUP_DIVISOR, EVENT_RINGS_MAX_CPUS, FlowEvent,
    HINT_MAX_FRAME,
};

use crate::frame::Frame;

/// The buffer had no room: the event is lost (and the caller counts it).
pub struct Full;

pub trait EventSink {
    /// Sends `event`, followed by the first `frame_len` bytes of the frame
    /// (0: none; at most [`HINT_MAX_FRAME`]), as one record.
    fn send<F: Frame>(&self, ctx: &F, event: &FlowEvent, frame_len: u32) -> Result<(), Full>;
}

/// Per-CPU perf event arrays. aya-ebpf's `PerfEventArray::output` discards
/// the helper's result, so a full buffer would go unnoticed; this wrapper
/// returns it. Each record wakes the reader (aya 0.14's reader asks for a
/// wakeup per event), which is why the ring buffer is preferred.
#[repr(transparent)]
pub struct PerCpuEvents(UnsafeCell<bpf_map_def>);

// SAFETY: the kernel owns the map; the definition is only read by the loader.
unsafe impl Sync for PerCpuEvents {}

impl PerCpuEvents {
    pub const fn new() -> Self {
        Self(UnsafeCell::new(bpf_map_def {
            type_: BPF_MAP_TYPE_PERF_EVENT_ARRAY,
            key_size: size_of::<u32>() as u32,
            value_size: size_of::<u32>() as u32,
            // 0: the loader sizes it to the number of CPUs.
            max_entries: 0,
            map_flags: 0,
            id: 0,
            pinning: 0,
        }))
    }
}

impl Default for PerCpuEvents {
    fn default() -> Self {
        Self::new()
    }
}

impl EventSink for PerCpuEvents {
    /// The kernel copies the frame bytes itself (the upper 32 bits of the
    /// flags of `bpf_perf_event_output` with an XDP or socket buffer context).
    #[inline(always)]
    fn send<F: Frame>(&self, ctx: &F, event: &FlowEvent, frame_len: u32) -> Result<(), Full> {
        let flags = BPF_F_CURRENT_CPU | (u64::from(frame_len) << 32);
        // SAFETY: `event` is a live `FlowEvent`; the helper checks
        // `frame_len` against the packet.
        let ret = unsafe {
            bpf_perf_event_output(
                ctx.as_ptr(),
                self.0.get().cast(),
                flags,
                (event as *const FlowEvent).cast_mut().cast::<c_void>(),
                size_of::<FlowEvent>() as u64,
            )
        };
        if ret == 0 { Ok(()) } else { Err(Full) }
    }
}

/// How full a ring must be before a record wakes the reader
/// (`probe_common::EVENT_RING_WAKEUP_GLOBAL`): the agent sets it at load
/// time from the rings' size.
#[unsafe(no_mangle)]
static ICR_RING_WAKEUP_BYTES: u64 = (EVENT_RING_BYTES / EVENT_RING_WAKEUP_DIVISOR) as u64;

/// One BPF ring buffer per CPU, in an array of maps the agent fills at load
/// time (`probe_common::names::EVENT_RINGS`): a CPU never waits on another
/// to reserve (`cargo xtask bench probe` measured one shared ring at 7.5x
/// the cost per event with two CPUs sending). The inner map here is only
/// the template the kernel checks the agent's rings against.
pub type PerCpuRings =
    ArrayOfMaps<BtfRingBuf<u8, { EVENT_RING_TEMPLATE_BYTES as usize }>, { EVENT_RINGS_MAX_CPUS as usize }>;

impl EventSink for PerCpuRings {
    #[inline(always)]
    fn send<F: Frame>(&self, ctx: &F, event: &FlowEvent, frame_len: u32) -> Result<(), Full> {
        // SAFETY: helper without arguments.
        let cpu = unsafe { bpf_get_smp_processor_id() };
        // A CPU without a ring (the agent sized the array from the
        // possible CPUs, so none) loses the event, counted by the caller.
        let ring = self.get(cpu).ok_or(Full)?;
        Ring((ring as *const BtfRingBuf<u8, { EVENT_RING_TEMPLATE_BYTES as usize }>).cast_mut().cast())
            .send(ctx, event, frame_len)
    }
}

/// One BPF ring buffer all CPUs share: the benchmarks' comparison for
/// [`PerCpuRings`].
#[repr(transparent)]
pub struct RingEvents(RingBuf);

impl RingEvents {
    pub const fn with_byte_size(bytes: u32) -> Self {
        Self(RingBuf::with_byte_size(bytes, 0))
    }
}

impl EventSink for RingEvents {
    #[inline(always)]
    fn send<F: Frame>(&self, ctx: &F, event: &FlowEvent, frame_len: u32) -> Result<(), Full> {
        // The map's address is what the loader relocates to the map.
        Ring((&raw const self.0).cast_mut().cast()).send(ctx, event, frame_len)
    }
}

/// A ring buffer map, by the address the helpers take. A record wakes the
/// reader only when the ring holds `ICR_RING_WAKEUP_BYTES` or more; below
/// that the agent's timer drains it, so events are delivered in batches.
#[derive(Clone, Copy)]
struct Ring(*mut c_void);

/// A hint's record: the event, then a slot for the frame. The kernel needs
/// a reservation's size at verification time, so there are a few sizes and
/// a frame takes the smallest that holds it (DNS fits the first, a full
/// Ethernet frame the second). Powers of two, for the copy's bound (see
/// `send_hint`).
#[repr(C)]
struct HintRecord<const SLOT: usize> {
    event: FlowEvent,
    frame: [u8; SLOT],
}

const SMALL_SLOT: usize = 512;
const MTU_SLOT: usize = 2048;
const JUMBO_SLOT: usize = HINT_MAX_FRAME as usize;
const _: () = assert!(SMALL_SLOT.is_power_of_two() && MTU_SLOT.is_power_of_two() && JUMBO_SLOT.is_power_of_two());

impl Ring {
    #[inline(always)]
    fn send<F: Frame>(self, ctx: &F, event: &FlowEvent, frame_len: u32) -> Result<(), Full> {
        if frame_len == 0 {
            // SAFETY: `event` is a live `FlowEvent`, copied by the helper.
            let ret = unsafe {
                bpf_ringbuf_output(
                    self.0,
                    (event as *const FlowEvent).cast_mut().cast(),
                    size_of::<FlowEvent>() as u64,
                    self.wakeup(),
                )
            };
            return if ret == 0 { Ok(()) } else { Err(Full) };
        }
        if frame_len <= SMALL_SLOT as u32 {
            self.send_hint::<F, SMALL_SLOT>(ctx, event, frame_len)
        } else if frame_len <= MTU_SLOT as u32 {
            self.send_hint::<F, MTU_SLOT>(ctx, event, frame_len)
        } else {
            self.send_hint::<F, JUMBO_SLOT>(ctx, event, frame_len)
        }
    }

    /// Wake the reader only once the ring holds a batch worth reading.
    #[inline(always)]
    fn wakeup(self) -> u64 {
        // SAFETY: a plain read of a global; volatile, so that the value the
        // agent sets at load time is read, not the one compiled in.
        let threshold = unsafe { core::ptr::read_volatile(&raw const ICR_RING_WAKEUP_BYTES) };
        // SAFETY: `self.0` is a ring buffer map.
        if unsafe { bpf_ringbuf_query(self.0, BPF_RB_AVAIL_DATA as u64) } >= threshold {
            BPF_RB_FORCE_WAKEUP as u64
        } else {
            BPF_RB_NO_WAKEUP as u64
        }
    }

    #[inline(always)]
    fn send_hint<F: Frame, const SLOT: usize>(self, ctx: &F, event: &FlowEvent, frame_len: u32) -> Result<(), Full> {
        if frame_len == 0 || frame_len > SLOT as u32 {
            return Err(Full);
        }
        // The verifier must see the copy's length within 1 ..= SLOT. LLVM
        // knows the caller chose the slot by length, so it drops or merges
        // plain checks (a `len == 0 || len > SLOT` becomes one compare of
        // `len - 1`, whose bound older verifiers, 6.1's, do not carry back
        // to `len`). An opaque value and a mask give the bound by
        // arithmetic alone; for the lengths that get here it is `len` itself.
        let len = (core::hint::black_box(frame_len).wrapping_sub(1) & (SLOT as u32 - 1)) + 1;
        // SAFETY: `self.0` is a ring buffer map; a constant size.
        let record =
            unsafe { bpf_ringbuf_reserve(self.0, size_of::<HintRecord<SLOT>>() as u64, 0) }.cast::<HintRecord<SLOT>>();
        if record.is_null() {
            return Err(Full);
        }
        // SAFETY: `record` points at a reserved, writable `HintRecord<SLOT>`;
        // the helper writes `len` <= SLOT bytes into its frame slot.
        let copied = unsafe {
            (&raw mut (*record).event).write(FlowEvent { captured_len: len as u16, ..*event });
            ctx.load_bytes(0, (&raw mut (*record).frame).cast(), len)
        };
        if copied != 0 {
            // The frame is shorter than the caller measured: cannot happen
            // for a frame that was parsed, but never send garbage.
            // SAFETY: a record reserved above, not yet submitted.
            unsafe { bpf_ringbuf_discard(record.cast(), BPF_RB_NO_WAKEUP as u64) };
            return Err(Full);
        }
        // SAFETY: a record reserved above, written in full.
        unsafe { bpf_ringbuf_submit(record.cast(), self.wakeup()) };
        Ok(())
    }
}
