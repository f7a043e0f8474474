//! Builds the XDP object from `probe-ebpf` (nightly + bpf-linker, through
//! aya-build) so that `icr` embeds it. `AYA_BUILD_SKIP=1` skips this for
//! `cargo check`/clippy on machines without bpf-linker.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("reading the workspace metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == "probe-ebpf")
        .ok_or_else(|| anyhow!("the probe-ebpf package is missing from the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() }],
        Toolchain::Nightly,
    )
}
