//! `cargo xtask`: the project's commands. Each one first installs what it
//! needs and is missing (Debian packages, the nightly's rust-src, bpf-linker),
//! saying what it does.
mod cmd;
mod cross;
mod deb;
mod demo;
mod imports;
mod setup;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, set up, test and demo icr-probe")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need, when it is missing.
    Setup {
        /// Also the cross toolchain of this Rust target (e.g. aarch64-unknown-linux-gnu).
        #[arg(long)]
        target: Option<String>,
    },
    /// Build the XDP object and the `icr` binary (release).
    Build {
        /// Build for this Rust target (aarch64-unknown-linux-gnu), with the
        /// nightly's `-Z build-std` and Debian's cross gcc, into
        /// target/TARGET/release/icr; the host's `icr` is built too and both
        /// must embed byte-identical BPF objects.
        #[arg(long)]
        target: Option<String>,
    },
    /// The Debian package (`target/debian/icr_VERSION_ARCH.deb`): the agent
    /// as a systemd unit under its own user, its configuration, the pins.
    Deb(deb::Args),
    /// Run every test: unit, kernel (BPF_PROG_TEST_RUN) and namespace lab tests.
    Test {
        /// Passed to `cargo test` after `--` (a test name filter, `--nocapture`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The lab demo: namespaces with clients behind a NAT gateway running the
    /// probe, real HTTPS/DNS/TCP traffic, then the records and the answers to
    /// questions 2 and 3. Removes everything it made, also on failure or Ctrl-C.
    Demo,
    /// Long fuzzing: the fail-open test on many more frames through the real
    /// XDP program, then every cargo-fuzz target of fuzz/ for a while each.
    Fuzz {
        /// Seconds per cargo-fuzz target.
        #[arg(long, default_value_t = 120)]
        seconds: u64,
        /// Frames for the fail-open test.
        #[arg(long, default_value_t = 20_000_000)]
        frames: u64,
    },
    /// Boot a VM with a distribution kernel (vm-images/: `debian12`, `backports`,
    /// `bullseye`) under qemu (KVM when it really boots a guest here, else
    /// TCG) and run the kernel (xdp) and namespace lab tests in it; with
    /// `--only package`, boot it with systemd and test the Debian package.
    VmTest(vm::Args),
    /// Which file of probe-user/src imports which; fails on an import circle
    /// between files or between the top-level folders (run by CI).
    Imports {
        /// Print every file's imports.
        #[arg(long)]
        verbose: bool,
    },
    /// Benchmarks, figures printed at the end, the last line JSON (`probe`:
    /// kernel cost per packet; `store`: ingest, size and query latency,
    /// `--records N` sets the store size; `export`: CPU and bytes per record,
    /// IPFIX beside NDJSON).
    Bench {
        #[arg(default_value = "probe")]
        which: String,
        /// Passed to the benchmark (`--records 100000000`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup { target } => setup(target.as_deref()),
        Command::Build { target } => build(target.as_deref()),
        Command::Deb(args) => deb::run(&args),
        Command::Test { args } => test(&args),
        Command::Demo => demo::run(),
        Command::Bench { which, args } => bench(&which, &args),
        Command::Fuzz { seconds, frames } => fuzz(seconds, frames),
        Command::VmTest(args) => vm::run(&args),
        Command::Imports { verbose } => imports::run(verbose),
    };
    if let Err(error) = result {
        eprintln!("xtask: {error:#}");
        std::process::exit(1);
    }
}

fn setup(target: Option<&str>) -> Result<()> {
    setup::ensure(setup::Needs::Test)?;
    match target {
        Some(triple) => setup::ensure_cross(cross::find(triple)?),
        None => Ok(()),
    }
}

fn build(target: Option<&str>) -> Result<()> {
    if let Some(triple) = target {
        let started = std::time::Instant::now();
        let icr = cross::find(triple)?.build_icr(true)?;
        println!("built {} in {:.0} s", icr.display(), started.elapsed().as_secs_f64());
        return Ok(());
    }
    setup::ensure(setup::Needs::Build)?;
    cmd::cargo(&["build", "--release", "--package", "probe-user"])?;
    println!("built {}", cmd::workspace_root().join("target/release/icr").display());
    Ok(())
}

fn bench(which: &str, args: &[String]) -> Result<()> {
    setup::ensure(setup::Needs::Bench)?;
    if !["probe", "store", "export"].contains(&which) {
        anyhow::bail!("no benchmark {which:?} (there is: probe, store, export)");
    }
    let mut cargo_args = vec!["bench", "--package", "probe-user", "--bench", which];
    if !args.is_empty() {
        cargo_args.push("--");
        cargo_args.extend(args.iter().map(String::as_str));
    }
    cmd::cargo(&cargo_args)
}

fn fuzz(seconds: u64, frames: u64) -> Result<()> {
    setup::ensure(setup::Needs::Build)?;
    let frames = frames.to_string();
    cmd::cargo_with_env(
        &[
            "test",
            "--release",
            "--package",
            "probe-user",
            "--test",
            "xdp",
            "a_million_mutated_frames",
            "--",
            "--nocapture",
        ],
        &[("ICR_FAILOPEN_FRAMES", std::ffi::OsStr::new(&frames))],
    )?;
    setup::ensure_cargo_fuzz()?;
    let dir = cmd::workspace_root().join("fuzz");
    let list = cmd::output(
        std::process::Command::new("cargo")
            .args(["+nightly", "fuzz", "list"])
            .current_dir(&dir)
            .env("PATH", cmd::path_with_cargo_bin()),
    )?;
    for target in list.lines().map(str::trim).filter(|t| !t.is_empty()) {
        cmd::run(
            std::process::Command::new("cargo")
                .args(["+nightly", "fuzz", "run", target, "--", &format!("-max_total_time={seconds}")])
                .current_dir(&dir)
                .env("PATH", cmd::path_with_cargo_bin()),
        )?;
    }
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    setup::ensure(setup::Needs::Test)?;
    // The lab tests run the real binary; build it first and tell them where.
    cmd::cargo(&["build", "--package", "probe-user"])?;
    let icr = cmd::workspace_root().join("target/debug/icr");
    // probe-ebpf only builds for BPF, through probe-user's build script.
    let mut test_args = vec!["test", "--workspace", "--exclude", "probe-ebpf", "--no-fail-fast"];
    if !args.is_empty() {
        test_args.push("--");
        test_args.extend(args.iter().map(String::as_str));
    }
    let python = setup::lab_python();
    cmd::cargo_with_env(&test_args, &[("ICR_BIN", icr.as_os_str()), ("ICR_LAB_PYTHON", python.as_os_str())])
}
