//! The programs the probe is measured against (probe-ebpf's `baseline`
//! object): for the benchmarks only, behind the `bench` feature, so the
//! product's binary does not carry them.
use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp, XdpMode},
};
use probe_common::{FlowKey, FlowValue, counter, names};

use super::{
    objects::{embedded, take_map, tc_test_run},
    readers::{CpuRing, per_cpu_rings, possible_cpus},
};

/// The benchmarks' floors: a bare `XDP_PASS`, and parsing plus one lookup.
static BASELINE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/baseline"));

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
