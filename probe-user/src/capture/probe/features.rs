//! What the kernel must offer before an object is loaded, probed with aya's
//! feature probes, so that a kernel without it is refused by the feature's
//! name rather than with a loader or verifier error; and the event path
//! that follows from it.
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};
use log::info;

/// What either XDP object needs from the kernel. Probed (aya's feature
/// probes: a minimal program or map is created) before an object is loaded,
/// so that a kernel without one is refused with the feature's name rather
/// than with a loader or verifier error.
const KERNEL_NEEDS: [KernelNeed; 6] = [
    KernelNeed::XdpPrograms,
    KernelNeed::TcPrograms,
    KernelNeed::HashMaps,
    KernelNeed::ArrayMaps,
    KernelNeed::PerCpuArrayMaps,
    KernelNeed::KtimeHelper,
];
/// What the ring buffer object needs besides.
/// (The coarse clock comes with 5.11, before the others; probed all the same,
/// so that a kernel that lacks it is refused by name.)
const RING_NEEDS: [KernelNeed; 7] = [
    KernelNeed::RingBufMaps,
    KernelNeed::ArrayOfMaps,
    KernelNeed::RingBufHelpers,
    KernelNeed::TcRingBufHelpers,
    KernelNeed::XdpLoadBytesHelper,
    KernelNeed::SkbLoadBytesHelper,
    KernelNeed::CoarseClockHelper,
];
/// What the perf buffer object needs besides.
const PERF_NEEDS: [KernelNeed; 3] =
    [KernelNeed::PerfEventArrayMaps, KernelNeed::PerfOutputHelper, KernelNeed::TcPerfOutputHelper];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KernelNeed {
    XdpPrograms,
    TcPrograms,
    HashMaps,
    ArrayMaps,
    PerCpuArrayMaps,
    PerfEventArrayMaps,
    KtimeHelper,
    PerfOutputHelper,
    TcPerfOutputHelper,
    RingBufMaps,
    ArrayOfMaps,
    RingBufHelpers,
    TcRingBufHelpers,
    XdpLoadBytesHelper,
    SkbLoadBytesHelper,
    CoarseClockHelper,
}

impl KernelNeed {
    fn name(self) -> &'static str {
        match self {
            Self::XdpPrograms => "XDP programs (BPF_PROG_TYPE_XDP, Linux 4.8)",
            Self::TcPrograms => "TC classifier programs (BPF_PROG_TYPE_SCHED_CLS, the LAN egress program)",
            Self::HashMaps => "BPF hash maps (the flow table)",
            Self::ArrayMaps => "BPF array maps (the probe's settings)",
            Self::PerCpuArrayMaps => "per-CPU array maps (the counters, Linux 4.6)",
            Self::PerfEventArrayMaps => "perf event array maps (the event buffers, Linux 4.3)",
            Self::KtimeHelper => "the bpf_ktime_get_ns helper in XDP programs",
            Self::PerfOutputHelper => "the bpf_perf_event_output helper in XDP programs (Linux 4.15)",
            Self::TcPerfOutputHelper => "the bpf_perf_event_output helper in TC programs (Linux 4.4)",
            Self::TcRingBufHelpers => "the bpf_ringbuf_reserve/submit/query helpers in TC programs (Linux 5.8)",
            Self::SkbLoadBytesHelper => "the bpf_skb_load_bytes helper in TC programs (Linux 4.5)",
            Self::RingBufMaps => "BPF ring buffer maps (Linux 5.8)",
            Self::ArrayOfMaps => "arrays of maps (the per-CPU rings, Linux 4.12)",
            Self::RingBufHelpers => "the bpf_ringbuf_reserve/submit/query helpers in XDP programs (Linux 5.8)",
            Self::XdpLoadBytesHelper => "the bpf_xdp_load_bytes helper (Linux 5.18)",
            Self::CoarseClockHelper => "the bpf_ktime_get_coarse_ns helper in XDP programs (Linux 5.11)",
        }
    }

    fn probe(self) -> Result<bool> {
        let xdp_helper = |helper| is_helper_supported(ProgramType::Xdp, helper);
        let tc_helper = |helper| is_helper_supported(ProgramType::SchedClassifier, helper);
        Ok(match self {
            Self::XdpPrograms => is_program_supported(ProgramType::Xdp)?,
            Self::TcPrograms => is_program_supported(ProgramType::SchedClassifier)?,
            Self::TcPerfOutputHelper => tc_helper(BpfHelper::BPF_FUNC_perf_event_output)?,
            Self::TcRingBufHelpers => {
                tc_helper(BpfHelper::BPF_FUNC_ringbuf_reserve)? && tc_helper(BpfHelper::BPF_FUNC_ringbuf_query)?
            }
            Self::SkbLoadBytesHelper => tc_helper(BpfHelper::BPF_FUNC_skb_load_bytes)?,
            Self::HashMaps => is_map_supported(MapType::Hash)?,
            Self::ArrayMaps => is_map_supported(MapType::Array)?,
            Self::PerCpuArrayMaps => is_map_supported(MapType::PerCpuArray)?,
            Self::PerfEventArrayMaps => is_map_supported(MapType::PerfEventArray)?,
            Self::KtimeHelper => xdp_helper(BpfHelper::BPF_FUNC_ktime_get_ns)?,
            Self::PerfOutputHelper => xdp_helper(BpfHelper::BPF_FUNC_perf_event_output)?,
            Self::RingBufMaps => is_map_supported(MapType::RingBuf)?,
            Self::ArrayOfMaps => is_map_supported(MapType::ArrayOfMaps)?,
            Self::RingBufHelpers => {
                xdp_helper(BpfHelper::BPF_FUNC_ringbuf_reserve)? && xdp_helper(BpfHelper::BPF_FUNC_ringbuf_query)?
            }
            Self::XdpLoadBytesHelper => xdp_helper(BpfHelper::BPF_FUNC_xdp_load_bytes)?,
            Self::CoarseClockHelper => xdp_helper(BpfHelper::BPF_FUNC_ktime_get_coarse_ns)?,
        })
    }
}

/// Probes the kernel for what the probe needs and picks the event path:
/// `wanted`, or the ring buffer where the kernel has all of [`RING_NEEDS`],
/// else the perf buffers. Refuses, naming each missing feature, when the
/// path cannot load. Logs what it found, with what the probe can do
/// without (BTF: the objects have no CO-RE relocations, and aya leaves out
/// the program BTF a kernel cannot take).
pub fn check_kernel_features(wanted: Option<EventPath>) -> Result<EventPath> {
    let probe = |needs: &'static [KernelNeed]| needs.iter().map(|need| (need.name(), need.probe()));
    check_features(&kernel_release(), probe(&KERNEL_NEEDS))?;
    let path = match wanted {
        Some(EventPath::Ring) => {
            check_features(&kernel_release(), probe(&RING_NEEDS))?;
            EventPath::Ring
        }
        Some(EventPath::Perf) => {
            check_features(&kernel_release(), probe(&PERF_NEEDS))?;
            EventPath::Perf
        }
        None => match check_features(&kernel_release(), probe(&RING_NEEDS)) {
            Ok(()) => EventPath::Ring,
            Err(ring_missing) => {
                check_features(&kernel_release(), probe(&PERF_NEEDS))
                    .with_context(|| format!("and the ring buffer path cannot load either: {ring_missing:#}"))?;
                info!("events go through per-CPU perf buffers, a wakeup each: {ring_missing:#}");
                EventPath::Perf
            }
        },
    };
    let btf_vmlinux = Path::new("/sys/kernel/btf/vmlinux").exists();
    info!(
        "kernel {}: XDP programs, hash, array and per-CPU array maps, bpf_ktime_get_ns: present; events through \
         the {}; program BTF: {}; kernel BTF (/sys/kernel/btf/vmlinux): {}",
        kernel_release(),
        path.name(),
        if aya::features().btf().is_some() { "supported" } else { "not supported (loaded without it)" },
        if btf_vmlinux { "present" } else { "absent (not needed)" },
    );
    Ok(path)
}

/// The verdict on the probed features: the first probe that fails (EPERM:
/// no BPF permission) ends the check; features probed absent are named.
fn check_features<'a>(release: &str, probed: impl Iterator<Item = (&'a str, Result<bool>)>) -> Result<()> {
    let mut missing = Vec::new();
    for (name, result) in probed {
        match result {
            Ok(true) => {}
            Ok(false) => missing.push(name),
            Err(error) => return Err(explain_permission(error.context(format!("probing the kernel for {name}")))),
        }
    }
    if !missing.is_empty() {
        bail!(
            "this kernel ({release}) lacks what the XDP probe needs: {}. The probe is proven on Linux 5.10 and later \
             (see docs/install.md, Kernels)",
            missing.join("; ")
        );
    }
    Ok(())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|r| r.trim().to_string()).unwrap_or_else(|_| "?".into())
}

/// How the probe's events reach the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventPath {
    /// A BPF ring buffer per CPU, wakeups batched (Linux 5.18 and later:
    /// ring buffers, arrays of maps and `bpf_xdp_load_bytes` in XDP).
    Ring,
    /// Per-CPU perf event arrays, a wakeup per event: the fallback.
    Perf,
}

impl EventPath {
    pub fn name(self) -> &'static str {
        match self {
            EventPath::Ring => "per-CPU ring buffers",
            EventPath::Perf => "per-CPU perf buffers",
        }
    }
}

/// With an EPERM anywhere in `error`, says first what the agent needs.
pub(super) fn explain_permission(error: anyhow::Error) -> anyhow::Error {
    let eperm = error
        .chain()
        .any(|cause| cause.downcast_ref::<std::io::Error>().is_some_and(|io| io.raw_os_error() == Some(libc::EPERM)));
    if !eperm {
        return error;
    }
    error.context(
        "no permission to use BPF: the agent needs root, or the capabilities CAP_BPF and CAP_NET_ADMIN \
         (deploy/icr.service grants them; on kernels before 5.11 a low RLIMIT_MEMLOCK also gives this error)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_kernel_feature_is_named_in_the_refusal() {
        let probed = KERNEL_NEEDS.iter().chain(&PERF_NEEDS).map(|need| {
            let present = !matches!(need, KernelNeed::PerfEventArrayMaps | KernelNeed::PerfOutputHelper);
            (need.name(), Ok(present))
        });
        let message = format!("{:#}", check_features("4.4.0-test", probed).unwrap_err());
        assert!(message.contains("this kernel (4.4.0-test) lacks what the XDP probe needs"), "{message}");
        assert!(message.contains("perf event array maps (the event buffers, Linux 4.3)"), "{message}");
        assert!(message.contains("bpf_perf_event_output helper in XDP programs"), "{message}");
        assert!(!message.contains("hash maps"), "{message}");
        assert!(check_features("6.1", KERNEL_NEEDS.iter().map(|need| (need.name(), Ok(true)))).is_ok());
    }

    #[test]
    fn a_failed_probe_without_permission_says_what_is_needed() {
        let eperm = anyhow::Error::from(std::io::Error::from_raw_os_error(libc::EPERM));
        let message = format!("{:#}", check_features("6.1", [("XDP programs", Err(eperm))].into_iter()).unwrap_err());
        assert!(message.contains("needs root, or the capabilities CAP_BPF and CAP_NET_ADMIN"), "{message}");
        assert!(message.contains("probing the kernel for XDP programs"), "{message}");
    }
}
