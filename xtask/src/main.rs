//! `cargo xtask`: the project's commands. Each one first installs what it
//! needs and is missing (Debian packages, the nightly's rust-src, bpf-linker),
//! saying what it does.
mod cmd;
mod demo;
mod setup;

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
    Setup,
    /// Build the XDP object and the `icr` binary (release).
    Build,
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
    /// Benchmarks, figures printed at the end (`probe`: kernel cost per packet).
    Bench {
        #[arg(default_value = "probe")]
        which: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::ensure(setup::Needs::Test),
        Command::Build => build(),
        Command::Test { args } => test(&args),
        Command::Demo => demo::run(),
        Command::Bench { which } => bench(&which),
    };
    if let Err(error) = result {
        eprintln!("xtask: {error:#}");
        std::process::exit(1);
    }
}

fn build() -> Result<()> {
    setup::ensure(setup::Needs::Build)?;
    cmd::cargo(&["build", "--release", "--package", "probe-user"])?;
    println!("built {}", cmd::workspace_root().join("target/release/icr").display());
    Ok(())
}

fn bench(which: &str) -> Result<()> {
    setup::ensure(setup::Needs::Build)?;
    match which {
        "probe" => cmd::cargo(&["bench", "--package", "probe-user", "--bench", "probe"]),
        other => anyhow::bail!("no benchmark {other:?} (there is: probe)"),
    }
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
