//! The per-CPU perf event array the probe reports through.
//!
//! aya-ebpf's `PerfEventArray::output` discards the helper's result, so a full
//! buffer would go unnoticed; this wrapper returns it so that every lost event
//! is counted.
use core::{cell::UnsafeCell, ffi::c_void, mem::size_of};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_CURRENT_CPU, bpf_map_def, bpf_map_type::BPF_MAP_TYPE_PERF_EVENT_ARRAY},
    helpers::bpf_perf_event_output,
};

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

    /// Sends `event`, followed by the first `frame_len` bytes of the packet
    /// (0: none), to the current CPU's buffer; `Err` if it had no room. The
    /// kernel copies the packet bytes itself (the upper 32 bits of the flags
    /// of `bpf_perf_event_output` with an XDP context), so no copy loop is
    /// needed here.
    #[inline(always)]
    pub fn output<C: EbpfContext, T>(&self, ctx: &C, event: &T, frame_len: u32) -> Result<(), i64> {
        let flags = BPF_F_CURRENT_CPU | (u64::from(frame_len) << 32);
        // SAFETY: `event` is a live, initialised `T` of `size_of::<T>()` bytes;
        // the helper checks `frame_len` against the packet.
        let ret = unsafe {
            bpf_perf_event_output(
                ctx.as_ptr(),
                self.0.get().cast(),
                flags,
                (event as *const T).cast_mut().cast::<c_void>(),
                size_of::<T>() as u64,
            )
        };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }
}
