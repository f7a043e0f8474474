//! The probe's event maps and their readers: one BPF ring buffer per
//! possible CPU (in the probe's array of maps), or the perf buffers.
use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{
    ArrayOfMaps, MapData, MapError, RingBuf,
    perf::{PerfEventArray, PerfEventArrayBuffer},
};
use aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF;
use probe_common::names;

/// The event maps, before they are opened for reading.
pub(super) enum EventMap {
    Ring(Vec<CpuRing>),
    Perf(PerfEventArray<MapData>),
}

/// The probe's events, open for reading (`events::drain`, `events::spawn_readers`).
pub enum EventReader {
    /// One ring buffer per possible CPU.
    Ring(Vec<CpuRing>),
    /// One perf buffer per online CPU.
    Perf(Vec<EventBuffer>),
}

/// One CPU's ring buffer of flow events.
pub struct CpuRing {
    pub cpu: u32,
    pub ring: RingBuf<MapData>,
}

/// The number of CPUs the kernel may ever run (`bpf_get_smp_processor_id`
/// is below it).
pub(super) fn possible_cpus() -> Result<u32> {
    aya::util::nr_cpus()
        .map(|n| n as u32)
        .map_err(|(what, error)| anyhow!("reading the possible CPUs from {what}: {error}"))
}

/// Fills the probe's array of rings with one ring of `bytes` per possible
/// CPU, or, where an agent before us pinned the array, takes the rings it
/// holds (with what they still hold) and adds any that is missing.
/// With a pin directory each ring is pinned on its own too
/// (`EVENT_RINGS-<cpu>`): the next agent opens it by that path, which takes
/// no more than the pin's file mode, where taking it from the array by id
/// (`bpf_map_get_fd_by_id`) takes CAP_SYS_ADMIN.
pub(super) fn per_cpu_rings(map: aya::maps::Map, bytes: u32, pin_dir: Option<&Path>) -> Result<Vec<CpuRing>> {
    let mut array: ArrayOfMaps<MapData, RingBuf<MapData>> = ArrayOfMaps::try_from(map)
        .with_context(|| format!("the map {} is not an array of maps", names::EVENT_RINGS))?;
    (0..possible_cpus()?)
        .map(|cpu| {
            let pin = pin_dir.map(|dir| dir.join(format!("{}-{cpu}", names::EVENT_RINGS)));
            if let Some(pin) = pin.as_ref().filter(|pin| pin.exists()) {
                let data = MapData::from_pin(pin)
                    .with_context(|| format!("opening CPU {cpu}'s pinned event ring {}", pin.display()))?;
                return Ok(CpuRing { cpu, ring: RingBuf::try_from(aya::maps::Map::RingBuf(data))? });
            }
            let ring = match array.get(&cpu, 0) {
                // Pinned by an agent that did not pin the rings on their own.
                Ok(ring) => ring,
                Err(MapError::KeyNotFound) => {
                    let definition = aya_obj::Map::new_from_params(BPF_MAP_TYPE_RINGBUF as u32, 0, 0, bytes, 0);
                    let data = MapData::create(definition, &format!("icr_ring_{cpu}"), None)
                        .with_context(|| format!("creating the event ring of CPU {cpu} ({bytes} bytes)"))?;
                    let map = aya::maps::Map::RingBuf(data);
                    if let Some(pin) = &pin {
                        map.pin(pin).with_context(|| format!("pinning CPU {cpu}'s event ring at {}", pin.display()))?;
                    }
                    let ring = RingBuf::try_from(map)?;
                    array
                        .set(cpu, &ring, 0)
                        .with_context(|| format!("putting CPU {cpu}'s event ring in {}", names::EVENT_RINGS))?;
                    ring
                }
                Err(error) => {
                    return Err(anyhow::Error::from(error).context(format!("reading CPU {cpu}'s pinned event ring")));
                }
            };
            Ok(CpuRing { cpu, ring })
        })
        .collect()
}

/// One CPU's perf buffer of flow events.
pub struct EventBuffer {
    pub cpu: u32,
    pub buffer: PerfEventArrayBuffer<MapData>,
}
