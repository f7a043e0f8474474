//! Builds the XDP objects from `probe-ebpf` (nightly + bpf-linker, through
//! aya-build) so that `icr` embeds them.
//!
//! `AYA_BUILD_SKIP=1` skips that, for `cargo check` and clippy on machines
//! without the eBPF toolchain: aya-build then writes nothing, so this writes
//! empty objects in their place, and an `icr` built that way refuses to load
//! a probe (`probe::ProbeError::NotBuilt`).
use std::path::PathBuf;

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The binaries of probe-ebpf that `probe.rs` embeds.
const OBJECTS: &[&str] = &["probe", "probe-perf", "baseline"];

fn main() -> anyhow::Result<()> {
    if build_skipped() {
        // aya-build prints its own warning and has already asked cargo to
        // rerun this when AYA_BUILD_SKIP changes.
        let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
        for object in OBJECTS {
            std::fs::write(out_dir.join(object), []).with_context(|| format!("writing the empty {object} object"))?;
        }
    }
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("reading the workspace metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == "probe-ebpf")
        .ok_or_else(|| anyhow!("the probe-ebpf package is missing from the workspace"))?;
    let root_dir =
        ebpf.manifest_path.parent().ok_or_else(|| anyhow!("{} has no parent directory", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() }],
        Toolchain::Nightly,
    )
}

/// The same test aya-build makes: `1` or `true`.
fn build_skipped() -> bool {
    std::env::var_os("AYA_BUILD_SKIP").is_some_and(|value| value == "1" || value.eq_ignore_ascii_case("true"))
}
