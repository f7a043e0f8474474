//! The XDP probe as the agent sees it: loading the embedded object, attaching
//! it, running it on frames (`BPF_PROG_TEST_RUN`), and reading its maps.
//! What the kernel must offer is in `features`, the embedded objects in
//! `objects`, pinning in `pins`, the event readers in `readers`, the
//! benchmarks' floors in `baseline`.
#[cfg(feature = "bench")]
mod baseline;
mod features;
mod objects;
mod pins;
mod readers;

#[cfg(feature = "bench")]
pub use baseline::{Baseline, Floor, RingLayout};
use features::explain_permission;
pub use features::{EventPath, check_kernel_features};
use objects::{PROBE_OBJECT, PROBE_PERF_OBJECT, embedded, take_map, tc_test_run};
pub use objects::{ProbeError, TestRunOutput};
pub use pins::unpin;
use pins::{egress_link_pin_path, link_pin_path, pinning_possible};
pub use readers::{CpuRing, EventBuffer, EventReader};
use readers::{EventMap, per_cpu_rings, possible_cpus};
use std::{
    collections::HashMap as StdHashMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, perf::PerfEventArray},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, TestRun as _, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, TcError},
        xdp::{XdpLink, XdpLinkId},
    },
    util::KernelVersion,
};
use log::{info, warn};
use probe_common::{FlowKey, FlowValue, ProbeConfig, counter, names, role};

/// Pages per CPU for the event perf buffers (must be a power of two).
const EVENT_BUFFER_PAGES: usize = 64;

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
                Err(MapError::OutOfBounds { .. }) => continue,
                Err(error) => return Err(error).context("reading COUNTERS"),
            };
            *total = per_cpu.iter().sum();
        }
        Ok(Counters(totals))
    }

    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>> {
        match self.flows.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(error) => Err(error).context("reading the kernel flow table"),
        }
    }

    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        match self.flows.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
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

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so a large
/// flow table loads there too. Failing is not fatal: newer kernels ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!("could not lift RLIMIT_MEMLOCK: {}", std::io::Error::last_os_error());
    }
}
