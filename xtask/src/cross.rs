//! Building for another architecture than this machine's (arm64 gateways).
//!
//! This machine has only its own Rust standard library: nightly's
//! `-Z build-std` builds the target's from rust-src, and Debian's cross gcc
//! links (passed as cargo `--config`, so that no checked-in cargo config
//! changes the host's builds). The embedded BPF objects target `bpfel`
//! whatever the host: `build` checks that the target's `icr` embeds the very
//! bytes the host's does.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, setup};

/// A Rust target this project builds for besides the host's.
pub struct Target {
    pub triple: &'static str,
    /// Debian's name of the architecture (the package's, the VM's).
    pub debian_arch: &'static str,
    /// The C cross compiler: cargo's linker, and what the `cc` crate finds
    /// by the target's name for ring and zstd.
    linker: &'static str,
    /// Debian packages of the cross toolchain (the C library's headers and
    /// objects are only a recommendation of gcc's, so named here).
    pub packages: &'static [&'static str],
}

pub const TARGETS: &[Target] = &[Target {
    triple: "aarch64-unknown-linux-gnu",
    debian_arch: "arm64",
    linker: "aarch64-linux-gnu-gcc",
    packages: &["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"],
}];

/// The BPF objects `icr` embeds (probe-user's build script writes them to its OUT_DIR).
const EMBEDDED_OBJECTS: &[&str] = &["probe", "probe-perf", "baseline"];

pub fn find(triple: &str) -> Result<&'static Target> {
    TARGETS.iter().find(|target| target.triple == triple).with_context(|| {
        let known: Vec<&str> = TARGETS.iter().map(|target| target.triple).collect();
        format!("no cross build for {triple:?} (there is: {})", known.join(", "))
    })
}

pub fn by_debian_arch(arch: &str) -> Result<&'static Target> {
    TARGETS.iter().find(|target| target.debian_arch == arch).with_context(|| {
        let known: Vec<&str> = TARGETS.iter().map(|target| target.debian_arch).collect();
        format!("no cross build for the architecture {arch:?} (there is: {})", known.join(", "))
    })
}

impl Target {
    /// `cargo +nightly SUBCOMMAND` for this target, with the standard
    /// library built from source and the cross linker; installs what it needs.
    pub fn cargo(&self, subcommand: &str) -> Result<Command> {
        setup::ensure(setup::Needs::Build)?;
        setup::ensure_cross(self)?;
        let mut command = Command::new("cargo");
        command
            .args(["+nightly", subcommand, "--target", self.triple, "-Z", "build-std"])
            .arg("--config")
            .arg(format!("target.{}.linker={:?}", self.triple, self.linker))
            .current_dir(cmd::workspace_root())
            .env("PATH", cmd::path_with_cargo_bin())
            // `cargo xtask` runs under stable's cargo, which names its rustc here.
            .env_remove("RUSTC");
        Ok(command)
    }

    /// Release `icr` for this target; returns it. With `compare`, also
    /// builds the host's and fails unless both embed the same BPF objects.
    pub fn build_icr(&self, compare: bool) -> Result<PathBuf> {
        let mut command = self.cargo("build")?;
        command.args(["--release", "--package", "probe-user", "--bin", "icr", "--locked"]);
        let ours = objects_dir(command)?;
        let icr = crate::vm::target_dir()?.join(self.triple).join("release/icr");
        if compare {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut host = Command::new(cargo);
            host.args(["build", "--release", "--package", "probe-user", "--bin", "icr", "--locked"])
                .current_dir(cmd::workspace_root())
                .env("PATH", cmd::path_with_cargo_bin());
            let hosts = objects_dir(host)?;
            compare_objects(&hosts, &ours, self.triple)?;
        }
        Ok(icr)
    }
}

/// Runs a cargo build and returns probe-user's build script's OUT_DIR,
/// where the embedded BPF objects are, from cargo's JSON messages.
fn objects_dir(mut command: Command) -> Result<PathBuf> {
    command.arg("--message-format=json-render-diagnostics").stdout(Stdio::piped()).stderr(Stdio::inherit());
    eprintln!("xtask: running {}", cmd::describe(&command));
    let out = cmd::output(&mut command)?;
    out.lines()
        .filter(|line| {
            line.contains(r#""reason":"build-script-executed""#) && line.contains(r#""package_id":"path+file://"#)
        })
        .filter(|line| line.contains("/probe-user#"))
        .find_map(|line| crate::vm::json_string(line, "out_dir"))
        .map(PathBuf::from)
        .context("cargo named no OUT_DIR of probe-user's build script")
}

/// The objects are built for `bpfel` from the same source on both sides.
/// aya-build compiles them with `--cfg bpf_target_arch="<the target's arch>"`,
/// which picks aya-ebpf-bindings' module of that architecture: the code is
/// the same, but the debug info and BTF's line info name
/// `src/aarch64/helpers.rs` where the host's name `src/x86_64/helpers.rs`.
/// So: byte-identical, or else every section the kernel runs or maps
/// (programs, maps, relocations, symbols) identical and only debug info and
/// BTF different; anything else fails.
fn compare_objects(host: &Path, ours: &Path, triple: &str) -> Result<()> {
    let mut differ = Vec::new();
    for name in EMBEDDED_OBJECTS {
        let read =
            |dir: &Path| std::fs::read(dir.join(name)).with_context(|| format!("reading {name} in {}", dir.display()));
        let (a, b) = (read(host)?, read(ours)?);
        if a.is_empty() {
            bail!("the host's {name} object is empty (AYA_BUILD_SKIP set?): nothing to compare");
        }
        let verdict = if a == b {
            "byte-identical".to_string()
        } else {
            let (sa, sb) = (sections(&a, name)?, sections(&b, name)?);
            let kernel = |s: &[(String, Vec<u8>)]| -> Vec<(String, Vec<u8>)> {
                s.iter().filter(|(n, _)| !debug_or_btf(n)).cloned().collect()
            };
            if kernel(&sa) == kernel(&sb) {
                let names: Vec<&str> = sa.iter().filter(|s| !sb.contains(s)).map(|(n, _)| n.as_str()).collect();
                format!(
                    "not byte-identical: programs, maps and relocations identical; differ only in {}",
                    names.join(" ")
                )
            } else {
                differ.push(*name);
                "DIFFERENT programs or maps".to_string()
            }
        };
        println!("BPF object {name:<10} {} bytes (host), {} bytes ({triple}): {verdict}", a.len(), b.len());
    }
    if !differ.is_empty() {
        bail!("the {triple} build embeds other BPF programs or maps than the host's: {}", differ.join(", "));
    }
    Ok(())
}

/// Debug info and BTF (and their relocations), which name source files.
fn debug_or_btf(section: &str) -> bool {
    let name = section.strip_prefix(".rel").unwrap_or(section);
    name.starts_with(".debug") || name.starts_with(".BTF")
}

/// An ELF object's sections by name, with their bytes.
fn sections(bytes: &[u8], name: &str) -> Result<Vec<(String, Vec<u8>)>> {
    use object::{Object as _, ObjectSection as _};
    let file = object::File::parse(bytes).with_context(|| format!("reading the {name} object as ELF"))?;
    file.sections()
        .map(|section| {
            let data = section.data().with_context(|| format!("reading a section of {name}"))?;
            Ok((section.name().unwrap_or("?").to_string(), data.to_vec()))
        })
        .collect()
}
