//! What the probe needs of a packet's context, for the two hooks it runs at:
//! XDP on ingress (`XdpContext`) and TC on LAN egress (`TcContext`). Parsing,
//! flow counting and event sending are written once against this trait.
use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};

#[expect(clippy::len_without_is_empty, reason = "a frame the kernel hands over is never empty")]
pub trait Frame: EbpfContext {
    /// Start and end of the bytes the program may read directly (for TC,
    /// the linear part of the socket buffer, which holds the headers).
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The whole frame's length, what a hint may copy.
    fn len(&self) -> u32;
    /// The interface the packet arrived on (XDP) or leaves by (TC).
    fn ifindex(&self) -> u32;
    /// Copies `len` bytes from `offset` to `to`; 0 on success.
    ///
    /// # Safety
    /// `to` must be writable for `len` bytes.
    unsafe fn load_bytes(&self, offset: u32, to: *mut c_void, len: u32) -> i64;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    unsafe fn load_bytes(&self, offset: u32, to: *mut c_void, len: u32) -> i64 {
        // SAFETY: the caller passes a writable buffer of `len` bytes.
        unsafe { bpf_xdp_load_bytes(self.as_ptr().cast(), offset, to, len) }
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context is the kernel's live `__sk_buff`.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    unsafe fn load_bytes(&self, offset: u32, to: *mut c_void, len: u32) -> i64 {
        // SAFETY: the caller passes a writable buffer of `len` bytes; the
        // helper reads past the linear part too.
        unsafe { bpf_skb_load_bytes(self.as_ptr().cast_const(), offset, to, len) }
    }
}

/// Whether a packet leaving by TC egress was made by the gateway itself
/// (its resolver's answer, its web page, a DHCP reply), not forwarded:
/// the kernel sets a received packet's input interface, and a forwarded
/// packet keeps it; a packet the gateway's own stack built has none.
#[inline(always)]
pub fn sent_by_gateway(ctx: &TcContext) -> bool {
    // SAFETY: the context is the kernel's live `__sk_buff`.
    unsafe { (*ctx.skb.skb).ingress_ifindex == 0 }
}
