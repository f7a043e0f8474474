//! The XDP probe as the agent sees it: loading the embedded object, attaching
//! it, running it on frames (`BPF_PROG_TEST_RUN`), and reading its maps.
use std::{
    collections::HashMap as StdHashMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, ArrayOfMaps, HashMap, MapData, MapError, MapType, PerCpuArray, RingBuf,
        perf::{PerfEventArray, PerfEventArrayBuffer},
    },
    programs::{
        ProgramError, ProgramType, SchedClassifier, TcAttachType, TestRun as _, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, TcError},
        xdp::{XdpLink, XdpLinkId},
    },
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
    util::KernelVersion,
};
use aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF;
use log::{info, warn};
use probe_common::{FlowKey, FlowValue, ProbeConfig, counter, names, role};

/// The XDP objects built from `probe-ebpf`, embedded at build time: events
/// through per-CPU ring buffers, and through per-CPU perf buffers (the fallback).
static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe"));
static PROBE_PERF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe-perf"));

/// The benchmarks' floors: a bare `XDP_PASS`, and parsing plus one lookup.
static BASELINE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/baseline"));

/// Why a probe cannot be loaded, where the caller may want to tell.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "this icr carries no XDP program: it was built with AYA_BUILD_SKIP=1 (for checks only); \
         build it with `cargo xtask build`, which installs the eBPF toolchain when it is missing"
    )]
    NotBuilt,
}

/// The embedded object, or why there is none.
fn embedded(object: &'static [u8]) -> Result<&'static [u8], ProbeError> {
    if object.is_empty() { Err(ProbeError::NotBuilt) } else { Ok(object) }
}

/// Pages per CPU for the event perf buffers (must be a power of two).
const EVENT_BUFFER_PAGES: usize = 64;

/// How the probe's events reach the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
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

#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Capacity of the kernel flow table.
    pub flow_table_size: u32,
    /// Where to pin the maps and XDP links (bpffs). With it, the programs stay
    /// attached and keep counting when the agent exits or dies, and the next
    /// agent adopts the maps and replaces the programs without a gap.
    pub pin_dir: Option<PathBuf>,
    /// The event path; `None`: the ring buffers where the kernel has what it
    /// needs, else the perf buffers.
    pub events: Option<EventPath>,
    /// Size of each CPU's event ring buffer, bytes: a power of two, at
    /// least a page.
    pub event_ring_bytes: u32,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            flow_table_size: probe_common::DEFAULT_FLOW_TABLE_SIZE,
            pin_dir: None,
            events: None,
            event_ring_bytes: probe_common::EVENT_RING_BYTES,
        }
    }
}

/// How an interface ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    Driver,
    Generic,
}

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Debug)]
pub struct TestRunOutput {
    pub action: u32,
    pub data_out: Vec<u8>,
    pub duration_ns: u64,
}

pub struct Probe {
    // Keeps the programs loaded and their links attached.
    ebpf: Ebpf,
    flows: HashMap<MapData, FlowKey, FlowValue>,
    counters: PerCpuArray<MapData, u64>,
    config: Array<MapData, ProbeConfig>,
    /// Taken by [`Probe::open_events`].
    events: Option<EventMap>,
    event_path: EventPath,
    pin_dir: Option<PathBuf>,
    /// The maps were pinned by an agent before us, and taken over.
    adopted: bool,
    /// Kernel id of the counter map: names this probe instance.
    instance: u32,
}

impl Probe {
    /// Loads the XDP programs and their maps into the kernel (not attached).
    pub fn load(options: ProbeOptions) -> Result<Self> {
        raise_memlock_limit();
        if options.flow_table_size == 0 {
            bail!("the flow table size must be at least 1");
        }
        let event_path = check_kernel_features(options.events)?;
        let (object, event_map) = match event_path {
            EventPath::Ring => (embedded(PROBE_OBJECT)?, names::EVENT_RINGS),
            EventPath::Perf => (embedded(PROBE_PERF_OBJECT)?, names::EVENTS),
        };
        let pin_dir = options.pin_dir.filter(|dir| pinning_possible(dir));
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::FLOWS, options.flow_table_size);
        let wakeup_bytes = u64::from(options.event_ring_bytes / probe_common::EVENT_RING_WAKEUP_DIVISOR);
        if event_path == EventPath::Ring {
            if !options.event_ring_bytes.is_power_of_two() || options.event_ring_bytes < 4096 {
                bail!(
                    "the event ring size must be a power of two of at least 4096 bytes, not {}",
                    options.event_ring_bytes
                );
            }
            loader.map_max_entries(names::EVENT_RINGS, possible_cpus()?);
            loader.override_global(probe_common::EVENT_RING_WAKEUP_GLOBAL, &wakeup_bytes, true);
        }
        let map_pins: Vec<(&str, PathBuf)> = match &pin_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating the pin directory {} (is bpffs mounted?)", dir.display()))?;
                [names::FLOWS, names::COUNTERS, names::CONFIG, event_map]
                    .into_iter()
                    .map(|name| (name, dir.join(name)))
                    .collect()
            }
            None => Vec::new(),
        };
        let adopted = map_pins.iter().any(|(name, path)| *name == names::COUNTERS && path.exists());
        for (name, path) in &map_pins {
            // An existing pin is reused: the maps of the agent before us.
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).map_err(|error| {
            explain_permission(anyhow::Error::from(error).context("loading the XDP object into the kernel"))
        })?;
        for name in [names::PROG_LAN, names::PROG_WAN] {
            let program: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("the XDP object has no program {name}"))?
                .try_into()
                .with_context(|| format!("{name} is not an XDP program"))?;
            program
                .load()
                .map_err(|error| explain_permission(anyhow::Error::from(error).context(format!("loading {name}"))))?;
        }
        let egress: &mut SchedClassifier = ebpf
            .program_mut(names::PROG_LAN_EGRESS)
            .ok_or_else(|| anyhow!("the XDP object has no program {}", names::PROG_LAN_EGRESS))?
            .try_into()
            .with_context(|| format!("{} is not a TC classifier", names::PROG_LAN_EGRESS))?;
        egress.load().map_err(|error| {
            explain_permission(anyhow::Error::from(error).context(format!("loading {}", names::PROG_LAN_EGRESS)))
        })?;
        let flows = HashMap::try_from(take_map(&mut ebpf, names::FLOWS)?)?;
        let counters = take_map(&mut ebpf, names::COUNTERS)?;
        let instance = match &counters {
            aya::maps::Map::PerCpuArray(data) => data.info().context("reading the counter map's id")?.id(),
            _ => bail!("the map {} is not a per-CPU array", names::COUNTERS),
        };
        let counters = PerCpuArray::try_from(counters)?;
        let config = Array::try_from(take_map(&mut ebpf, names::CONFIG)?)?;
        let events = match event_path {
            EventPath::Ring => EventMap::Ring(per_cpu_rings(
                take_map(&mut ebpf, event_map)?,
                options.event_ring_bytes,
                pin_dir.as_deref(),
            )?),
            EventPath::Perf => EventMap::Perf(PerfEventArray::try_from(take_map(&mut ebpf, event_map)?)?),
        };
        Ok(Self { ebpf, flows, counters, config, events: Some(events), event_path, pin_dir, adopted, instance })
    }

    /// How this probe's events reach the agent.
    pub fn event_path(&self) -> EventPath {
        self.event_path
    }

    /// Whether the maps are those an earlier agent pinned (it counted while
    /// no agent ran).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The probe instance: the same for every agent that adopts it.
    pub fn instance(&self) -> u32 {
        self.instance
    }

    /// Where the maps and links are pinned: the configured pin directory,
    /// unless it is not on a BPF file system (then nothing is pinned).
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    fn program(&self, role: u8) -> Result<&Xdp> {
        let name = program_name(role);
        let program = self.ebpf.program(name).ok_or_else(|| anyhow!("no program {name}"))?;
        Ok(program.try_into()?)
    }

    fn program_mut(&mut self, role: u8) -> Result<&mut Xdp> {
        let name = program_name(role);
        let program = self.ebpf.program_mut(name).ok_or_else(|| anyhow!("no program {name}"))?;
        Ok(program.try_into()?)
    }

    /// Attaches the program for `role` to `interface`: native (driver) mode
    /// when the driver supports it, generic mode otherwise. With a pin
    /// directory, a link pinned there by an earlier agent is taken over (its
    /// program replaced atomically: not a packet uncounted), and a new link is
    /// pinned so it outlives this process.
    ///
    /// A LAN port also gets the TC egress program, which counts what the
    /// gateway itself sends to devices (see [`Probe::attach_egress`]).
    pub fn attach(&mut self, interface: &str, role: u8) -> Result<AttachMode> {
        let mode = self.attach_xdp(interface, role)?;
        if role == role::LAN {
            self.attach_egress(interface)?;
        }
        Ok(mode)
    }

    fn attach_xdp(&mut self, interface: &str, role: u8) -> Result<AttachMode> {
        let Some(dir) = self.pin_dir.clone() else { return Ok(self.attach_new(interface, role)?.0) };
        let pin = link_pin_path(&dir, interface);
        if pin.exists() {
            let pinned =
                PinnedLink::from_pin(&pin).with_context(|| format!("opening the pinned link {}", pin.display()))?;
            let link = XdpLink::try_from(FdLink::from(pinned)).context("the pinned link is not an XDP link")?;
            let program = self.program_mut(role)?;
            let id =
                program.attach_to_link(link).with_context(|| format!("taking over the XDP link of {interface}"))?;
            // Ours now, but left attached when we exit.
            drop(program.take_link(id)?);
            info!("took over the pinned XDP link of {interface}: counting went on without a gap");
            return Ok(AttachMode::Driver);
        }
        let (mode, id) = self.attach_new(interface, role)?;
        let program = self.program_mut(role)?;
        let link = program.take_link(id)?;
        match FdLink::try_from(link) {
            Ok(fd_link) => {
                fd_link
                    .pin(&pin)
                    .with_context(|| format!("pinning the XDP link of {interface} at {}", pin.display()))?;
            }
            Err(_) => warn!(
                "{interface}: this kernel attaches XDP by netlink, which cannot be pinned; a restart will leave a gap"
            ),
        }
        Ok(mode)
    }

    /// Attaches the TC program to `interface`'s egress. Linux 6.6 and later
    /// attach it by a tcx link, which is pinned like the XDP links and taken
    /// over by the next agent; older kernels by a netlink filter on a
    /// `clsact` qdisc (added if missing, and left there: other filters may
    /// use it), detached when the agent exits.
    pub fn attach_egress(&mut self, interface: &str) -> Result<()> {
        // aya picks tcx by the same test.
        let tcx = KernelVersion::current().is_ok_and(|version| version >= KernelVersion::new(6, 6, 0));
        let pin = self.pin_dir.as_deref().filter(|_| tcx).map(|dir| egress_link_pin_path(dir, interface));
        let program = self.egress_program_mut()?;
        if let Some(pin) = &pin
            && pin.exists()
        {
            let pinned =
                PinnedLink::from_pin(pin).with_context(|| format!("opening the pinned link {}", pin.display()))?;
            let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                .context("the pinned egress link is not a tcx link")?;
            let id =
                program.attach_to_link(link).with_context(|| format!("taking over the egress link of {interface}"))?;
            // Ours now, but left attached when we exit.
            drop(program.take_link(id)?);
            info!("took over the pinned egress link of {interface}");
            return Ok(());
        }
        if !tcx {
            match tc::qdisc_add_clsact(interface) {
                Ok(()) | Err(TcError::AlreadyAttached) => {}
                Err(TcError::NetlinkError(error)) if error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(error) => return Err(error).with_context(|| format!("adding a clsact qdisc to {interface}")),
            }
        }
        let id = program
            .attach(interface, TcAttachType::Egress)
            .with_context(|| format!("attaching {} to the egress of {interface}", names::PROG_LAN_EGRESS))?;
        if let Some(pin) = pin {
            let link = FdLink::try_from(program.take_link(id)?).context("a tcx link is an fd link")?;
            link.pin(&pin).with_context(|| format!("pinning the egress link of {interface} at {}", pin.display()))?;
        } else if self.pin_dir.is_some() {
            warn!(
                "{interface}: this kernel attaches TC programs by netlink, which cannot be pinned; the egress program detaches when the agent exits"
            );
        }
        info!("attached {} to the egress of {interface}", names::PROG_LAN_EGRESS);
        Ok(())
    }

    fn egress_program_mut(&mut self) -> Result<&mut SchedClassifier> {
        let program = self
            .ebpf
            .program_mut(names::PROG_LAN_EGRESS)
            .ok_or_else(|| anyhow!("no program {}", names::PROG_LAN_EGRESS))?;
        Ok(program.try_into()?)
    }

    /// Runs the TC egress program once on `frame`, as a packet the gateway
    /// sent (`from_gateway`) or forwarded; returns its verdict.
    pub fn egress_test_run(&self, frame: &[u8], from_gateway: bool) -> Result<TestRunOutput> {
        self.egress_test_run_repeat(frame, from_gateway, 1)
    }

    /// As [`Probe::egress_test_run`], `repeat` times; the duration is per run.
    pub fn egress_test_run_repeat(&self, frame: &[u8], from_gateway: bool, repeat: u32) -> Result<TestRunOutput> {
        let program: &SchedClassifier = self
            .ebpf
            .program(names::PROG_LAN_EGRESS)
            .ok_or_else(|| anyhow!("no program {}", names::PROG_LAN_EGRESS))?
            .try_into()?;
        tc_test_run(program, frame, from_gateway, repeat)
    }

    fn attach_new(&mut self, interface: &str, role: u8) -> Result<(AttachMode, XdpLinkId)> {
        let program = self.program_mut(role)?;
        match program.attach(interface, XdpMode::Driver) {
            Ok(id) => {
                info!("attached {} to {interface} in driver mode", program_name(role));
                Ok((AttachMode::Driver, id))
            }
            Err(ProgramError::UnknownInterface { .. }) => {
                bail!("interface {interface} does not exist")
            }
            Err(error) if is_busy(&error) => bail!(busy_message(interface)),
            Err(driver_error) => {
                warn!(
                    "driver-mode XDP unavailable on {interface} ({driver_error}); \
                     falling back to generic mode"
                );
                let id = match program.attach(interface, XdpMode::Skb) {
                    Ok(id) => id,
                    Err(error) if is_busy(&error) => bail!(busy_message(interface)),
                    Err(error) => return Err(error).with_context(|| format!("attaching XDP to {interface}")),
                };
                info!("attached {} to {interface} in generic mode", program_name(role));
                Ok((AttachMode::Generic, id))
            }
        }
    }

    /// Runs the program for `role` once on `frame` with `BPF_PROG_TEST_RUN`.
    pub fn test_run(&self, role: u8, frame: &[u8]) -> Result<TestRunOutput> {
        self.test_run_repeat(role, frame, 1)
    }

    /// As [`Probe::test_run`], `repeat` times; the duration is per run.
    pub fn test_run_repeat(&self, role: u8, frame: &[u8], repeat: u32) -> Result<TestRunOutput> {
        // XDP may grow the frame by its tailroom; leave space for that.
        let mut data_out = vec![0u8; frame.len() + 256];
        let result = self
            .program(role)?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut data_out),
                repeat,
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        data_out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput { action: result.return_value, data_out, duration_ns: result.duration.as_nanos() as u64 })
    }

    /// Makes the program use `ns` as "now" (0: the kernel clock again).
    pub fn set_clock_override(&mut self, ns: u64) -> Result<()> {
        self.config.set(0, ProbeConfig { clock_override_ns: ns }, 0).context("writing the probe's CONFIG map")
    }

    /// Every counter of `probe_common::counter`, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let mut totals = [0u64; counter::COUNT as usize];
        for (index, total) in totals.iter_mut().enumerate() {
            let per_cpu = match self.counters.get(&(index as u32), 0) {
                Ok(per_cpu) => per_cpu,
                // A counter newer than the pinned map of the probe adopted: 0.
                Err(aya::maps::MapError::OutOfBounds { .. }) => continue,
                Err(error) => return Err(error).context("reading COUNTERS"),
            };
            *total = per_cpu.iter().sum();
        }
        Ok(Counters(totals))
    }

    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>> {
        match self.flows.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(error) => Err(error).context("reading the kernel flow table"),
        }
    }

    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        match self.flows.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(error) => Err(error).context("removing a flow from the kernel flow table"),
        }
    }

    /// Every key currently in the kernel flow table.
    pub fn flow_keys(&self) -> Result<Vec<FlowKey>> {
        self.flows.keys().collect::<Result<Vec<_>, _>>().context("listing the kernel flow table")
    }

    /// Opens the event buffers for reading: a ring, or a perf buffer, per
    /// CPU. Can be called once.
    pub fn open_events(&mut self) -> Result<EventReader> {
        match self.events.take().ok_or_else(|| anyhow!("the event buffers are already open"))? {
            EventMap::Ring(rings) => Ok(EventReader::Ring(rings)),
            EventMap::Perf(mut events) => {
                let cpus = aya::util::online_cpus()
                    .map_err(|(what, error)| anyhow!("reading the online CPUs from {what}: {error}"))?;
                let buffers = cpus
                    .into_iter()
                    .map(|cpu| {
                        let buffer = events
                            .open(cpu, Some(EVENT_BUFFER_PAGES))
                            .with_context(|| format!("opening the event buffer of CPU {cpu}"))?;
                        Ok(EventBuffer { cpu, buffer })
                    })
                    .collect::<Result<_>>()?;
                Ok(EventReader::Perf(buffers))
            }
        }
    }
}

/// The programs the probe is measured against (probe-ebpf's `baseline`
/// object), loaded for benchmarks.
pub struct Baseline {
    ebpf: Ebpf,
    /// The reserve-contention program's per-CPU rings.
    cpu_rings: Vec<CpuRing>,
}

/// One of the baseline object's programs: the floors, and the floor plus one
/// of the probe's per-packet steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Floor {
    /// A bare `XDP_PASS`.
    Pass,
    /// Parsing alone.
    Parse,
    /// Parsing and the one flow-table lookup: the floor of a flow-table probe.
    Lookup,
    /// The lookup plus the precise clock (`bpf_ktime_get_ns`).
    Clock,
    /// The lookup plus the coarse clock (`bpf_ktime_get_coarse_ns`, 5.11+).
    CoarseClock,
    /// The lookup plus the probe's clock (replay override, then precise).
    Now,
    /// The lookup plus one per-CPU counter.
    Counter,
    /// The lookup plus the flow's two atomic adds.
    Atomics,
    /// The lookup, and creating the flow when it is missing: the floor of a
    /// flow-table probe live, where new flows keep arriving.
    Upsert,
}

impl Floor {
    pub const ALL: [Floor; 9] = [
        Floor::Pass,
        Floor::Parse,
        Floor::Lookup,
        Floor::Clock,
        Floor::CoarseClock,
        Floor::Now,
        Floor::Counter,
        Floor::Atomics,
        Floor::Upsert,
    ];

    fn program(self) -> &'static str {
        match self {
            Floor::Pass => "baseline_pass",
            Floor::Parse => "baseline_parse",
            Floor::Lookup => "baseline_lookup",
            Floor::Clock => "baseline_clock",
            Floor::CoarseClock => "baseline_coarse_clock",
            Floor::Now => "baseline_now",
            Floor::Counter => "baseline_counter",
            Floor::Atomics => "baseline_atomics",
            Floor::Upsert => "baseline_upsert",
        }
    }
}

/// Where the reserve-contention programs send their events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingLayout {
    /// One ring all CPUs share.
    Shared,
    /// One ring per CPU, as the probe has.
    PerCpu,
}

impl RingLayout {
    const SHARED_RING: &str = "SHARED_RING";
    const CPU_RINGS: &str = "CPU_RINGS";

    fn program(self) -> &'static str {
        match self {
            RingLayout::Shared => "baseline_ring_shared",
            RingLayout::PerCpu => "baseline_ring_per_cpu",
        }
    }
}

/// The bare TC classifier: the egress program's floor.
const TC_PASS: &str = "baseline_tc_pass";

impl Baseline {
    /// ns per run of the bare TC classifier on `frame`, `repeat` times.
    pub fn tc_pass_test_run_repeat(&self, frame: &[u8], repeat: u32) -> Result<u64> {
        let program: &SchedClassifier =
            self.ebpf.program(TC_PASS).ok_or_else(|| anyhow!("no {TC_PASS} program"))?.try_into()?;
        Ok(tc_test_run(program, frame, true, repeat)?.duration_ns)
    }

    /// Loads the baselines; their flow table has `flow_table_size` entries,
    /// like the probe they are compared with. A program the kernel refuses
    /// (the coarse clock before 5.11) is left out: [`Baseline::has`].
    pub fn load(flow_table_size: u32) -> Result<Self> {
        Self::load_with_rings(flow_table_size, 4096)
    }

    /// As [`Baseline::load`], with each of the rings the reserve-contention
    /// programs send to `ring_bytes` large (a power of two, 4096 or more).
    /// Their records never wake a reader: what is measured is reserving and
    /// submitting.
    pub fn load_with_rings(flow_table_size: u32, ring_bytes: u32) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::FLOWS, flow_table_size);
        loader.map_max_entries(RingLayout::SHARED_RING, ring_bytes);
        loader.map_max_entries(RingLayout::CPU_RINGS, possible_cpus()?);
        loader.override_global(probe_common::EVENT_RING_WAKEUP_GLOBAL, &u64::MAX, true);
        let mut ebpf = loader.load(embedded(BASELINE_OBJECT)?).context("loading the baseline XDP programs")?;
        let programs = Floor::ALL.map(|floor| (floor.program(), floor != Floor::CoarseClock));
        let rings = [RingLayout::Shared, RingLayout::PerCpu].map(|layout| (layout.program(), true));
        for (name, required) in programs.into_iter().chain(rings) {
            let program: &mut Xdp = ebpf.program_mut(name).ok_or_else(|| anyhow!("no {name} program"))?.try_into()?;
            let loaded = program.load();
            if required {
                loaded.with_context(|| format!("loading {name}"))?;
            }
        }
        let tc_pass: &mut SchedClassifier =
            ebpf.program_mut(TC_PASS).ok_or_else(|| anyhow!("no {TC_PASS} program"))?.try_into()?;
        tc_pass.load().with_context(|| format!("loading {TC_PASS}"))?;
        let cpu_rings = per_cpu_rings(take_map(&mut ebpf, RingLayout::CPU_RINGS)?, ring_bytes, None)?;
        Ok(Self { ebpf, cpu_rings })
    }

    /// Runs `layout`'s program `repeat` times, each run sending one flow
    /// event; returns the kernel's ns per run.
    pub fn ring_test_run_repeat(&self, layout: RingLayout, frame: &[u8], repeat: u32) -> Result<u64> {
        self.test_run_program(layout.program(), frame, repeat)
    }

    /// Empties the reserve-contention rings; returns how many records they
    /// held, and how many sends found no room.
    pub fn drain_rings(&mut self) -> Result<(u64, u64)> {
        let mut records = 0;
        let name = RingLayout::SHARED_RING;
        let mut shared =
            RingBuf::try_from(self.ebpf.map_mut(name).ok_or_else(|| anyhow!("the baseline has no map {name}"))?)?;
        while shared.next().is_some() {
            records += 1;
        }
        for CpuRing { ring, .. } in &mut self.cpu_rings {
            while ring.next().is_some() {
                records += 1;
            }
        }
        let counters: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf.map(names::COUNTERS).ok_or_else(|| anyhow!("the baseline has no counters"))?,
        )?;
        let lost = counters.get(&counter::EVENTS_LOST, 0)?.iter().sum();
        Ok((records, lost))
    }

    /// Whether `floor`'s program loaded.
    pub fn has(&self, floor: Floor) -> bool {
        self.ebpf.program(floor.program()).is_some_and(|program| program.fd().is_ok())
    }

    /// Puts `key` in the baselines' flow table, so that their lookup finds
    /// the flow as the probe's does mid-flow.
    pub fn insert_flow(&mut self, key: FlowKey) -> Result<()> {
        let mut flows: HashMap<&mut MapData, FlowKey, FlowValue> = HashMap::try_from(
            self.ebpf.map_mut(names::FLOWS).ok_or_else(|| anyhow!("the baseline has no flow table"))?,
        )?;
        flows.insert(key, FlowValue::default(), 0).context("inserting into the baseline's flow table")
    }

    /// Attaches `floor`'s program to `interface` (driver mode), for live
    /// benchmarks; it stays attached until this is dropped.
    pub fn attach(&mut self, floor: Floor, interface: &str) -> Result<()> {
        let name = floor.program();
        let program: &mut Xdp = self.ebpf.program_mut(name).ok_or_else(|| anyhow!("no {name} program"))?.try_into()?;
        program
            .attach(interface, XdpMode::Driver)
            .with_context(|| format!("attaching the baseline XDP program to {interface}"))?;
        Ok(())
    }

    /// Runs the bare `XDP_PASS` `repeat` times on `frame`; returns the
    /// kernel's ns per run.
    pub fn test_run_repeat(&self, frame: &[u8], repeat: u32) -> Result<u64> {
        self.floor_test_run_repeat(Floor::Pass, frame, repeat)
    }

    /// As [`Baseline::test_run_repeat`], for `floor`'s program.
    pub fn floor_test_run_repeat(&self, floor: Floor, frame: &[u8], repeat: u32) -> Result<u64> {
        self.test_run_program(floor.program(), frame, repeat)
    }

    fn test_run_program(&self, name: &str, frame: &[u8], repeat: u32) -> Result<u64> {
        let program: &Xdp = self.ebpf.program(name).ok_or_else(|| anyhow!("no {name} program"))?.try_into()?;
        let result = program
            .test_run(TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::default() })
            .context("BPF_PROG_TEST_RUN")?;
        Ok(result.duration.as_nanos() as u64)
    }
}

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
             (see README, Kernel support)",
            missing.join("; ")
        );
    }
    Ok(())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|r| r.trim().to_string()).unwrap_or_else(|_| "?".into())
}

/// Whether maps and links can be pinned in `dir`: it must be on a BPF file
/// system (bpffs). When it is not (bpffs not mounted at /sys/fs/bpf, or the
/// agent runs under `ip netns exec`, whose fresh sysfs hides the mount), the
/// agent runs unpinned and says so: it records as before, but its maps and
/// links die with it, so a restart leaves a gap.
#[allow(clippy::unnecessary_cast)] // BPF_FS_MAGIC is a c_long: i64 on 64-bit targets only
fn pinning_possible(dir: &Path) -> bool {
    match file_system_of(dir) {
        Some(magic) if magic == libc::BPF_FS_MAGIC as i64 => true,
        found => {
            let found = match found {
                Some(magic) => format!("file system magic {magic:#x}"),
                None => "no existing directory".into(),
            };
            warn!(
                "pin_dir {} is not on a BPF file system (bpffs is not mounted there: {found}; \
                 `mount -t bpf bpf /sys/fs/bpf`): the maps and XDP links are not pinned, so they \
                 end with the agent and a restart will leave a gap in counting",
                dir.display()
            );
            false
        }
    }
}

/// `statfs`'s magic number of the file system holding `dir`, or of its
/// nearest existing ancestor.
fn file_system_of(dir: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let existing = dir.ancestors().find(|path| path.is_dir())?;
    let path = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    // SAFETY: a NUL-terminated path and a zeroed statfs for the kernel to fill.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)]
    Some(stat.f_type as i64)
}

/// Removes what a pin directory holds: the pinned links (which detaches the
/// XDP programs) and maps. For `icr detach`.
pub fn unpin(dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    if !dir.exists() {
        return Ok(removed);
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        removed.push(path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(removed)
}

/// With an EPERM anywhere in `error`, says first what the agent needs.
fn explain_permission(error: anyhow::Error) -> anyhow::Error {
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

/// Whether attaching failed because the interface already has an XDP
/// program: EBUSY (a program or link is there), or EEXIST (one in the other
/// mode: native and generic cannot be active at once).
fn is_busy(error: &ProgramError) -> bool {
    let errno = match error {
        ProgramError::SyscallError(error) => error.io_error.raw_os_error(),
        ProgramError::XdpError(aya::programs::xdp::XdpError::NetlinkError(error)) => error.raw_os_error(),
        _ => None,
    };
    matches!(errno, Some(libc::EBUSY | libc::EEXIST))
}

fn busy_message(interface: &str) -> String {
    format!(
        "{interface} already has an XDP program attached, so the probe cannot attach there: \
         if it is an earlier icr's, stop that agent and run `icr detach` (with its --db / pin_dir); \
         otherwise remove it with `ip link set dev {interface} xdp off` (see `ip -d link show dev {interface}`)"
    )
}

fn link_pin_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("link-{interface}"))
}

fn egress_link_pin_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("link-{interface}-egress"))
}

/// Runs a TC program `repeat` times on `frame`, as a packet the gateway sent
/// (`from_gateway`) or one it forwards.
fn tc_test_run(program: &SchedClassifier, frame: &[u8], from_gateway: bool, repeat: u32) -> Result<TestRunOutput> {
    // The kernel builds the socket buffer from `struct __sk_buff`: a
    // forwarded packet has the interface it arrived on (loopback's index
    // will do), one the gateway made has none.
    let mut context = [0u8; SK_BUFF_CONTEXT_BYTES];
    if !from_gateway {
        context[SK_BUFF_INGRESS_IFINDEX..].copy_from_slice(&1u32.to_ne_bytes());
    }
    let mut data_out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut data_out),
            ctx_in: Some(&context),
            repeat,
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN of a TC program")?;
    data_out.truncate(result.data_size_out as usize);
    Ok(TestRunOutput { action: result.return_value, data_out, duration_ns: result.duration.as_nanos() as u64 })
}

/// `struct __sk_buff` (uapi/linux/bpf.h) up to and including `ingress_ifindex`
/// at byte 36 (after len, pkt_type, mark, queue_mapping, protocol,
/// vlan_present, vlan_tci, vlan_proto, priority): what `BPF_PROG_TEST_RUN`
/// takes as a TC program's context.
const SK_BUFF_INGRESS_IFINDEX: usize = 36;
const SK_BUFF_CONTEXT_BYTES: usize = SK_BUFF_INGRESS_IFINDEX + 4;

/// The event maps, before they are opened for reading.
enum EventMap {
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
fn possible_cpus() -> Result<u32> {
    aya::util::nr_cpus()
        .map(|n| n as u32)
        .map_err(|(what, error)| anyhow!("reading the possible CPUs from {what}: {error}"))
}

/// Fills the probe's array of rings with one ring of `bytes` per possible
/// CPU, or, where an agent before us pinned the array, takes the rings it
/// holds (with what they still hold) and adds any that is missing.
/// Each CPU's event ring, held in the array of maps the programs write
/// through. With a pin directory each ring is pinned on its own too
/// (`EVENT_RINGS-<cpu>`): the next agent opens it by that path, which takes
/// no more than the pin's file mode, where taking it from the array by id
/// (`bpf_map_get_fd_by_id`) takes CAP_SYS_ADMIN.
fn per_cpu_rings(map: aya::maps::Map, bytes: u32, pin_dir: Option<&Path>) -> Result<Vec<CpuRing>> {
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

/// Snapshot of the probe's counters, indexed by `probe_common::counter`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; counter::COUNT as usize]);

impl Counters {
    pub fn get(&self, index: u32) -> u64 {
        self.0[index as usize]
    }

    /// Name → value, for logs and metrics.
    pub fn named(&self) -> StdHashMap<&'static str, u64> {
        counter::NAMES.iter().copied().zip(self.0).collect()
    }
}

fn program_name(role: u8) -> &'static str {
    if role == role::WAN { names::PROG_WAN } else { names::PROG_LAN }
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name).ok_or_else(|| anyhow!("the XDP object has no map {name}"))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so a large
/// flow table loads there too. Failing is not fatal: newer kernels ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!("could not lift RLIMIT_MEMLOCK: {}", std::io::Error::last_os_error());
    }
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

    #[test]
    fn a_pin_dir_off_bpffs_is_not_used() {
        // /tmp is no bpffs (tmpfs or the root file system).
        let dir = std::env::temp_dir().join("icr-probe-test-no-bpffs/pins");
        assert!(!pinning_possible(&dir));
        assert!(file_system_of(&dir).is_some(), "an existing ancestor was found");
    }
}
