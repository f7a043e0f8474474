//! `cargo xtask deb`: the Debian package, made by cargo-deb from
//! probe-user's `[package.metadata.deb]`. deploy/ holds the systemd unit,
//! the sysusers.d and tmpfiles.d files, and deploy/debian/ the maintainer
//! scripts.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

use crate::{cmd, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Build for this Rust target (e.g. aarch64-unknown-linux-gnu) instead of this machine's.
    #[arg(long)]
    pub target: Option<String>,
    /// The package's version, instead of the crate's with revision 1
    /// (`0.1.0-1`): e.g. a newer build of the same code, to test an upgrade.
    #[arg(long)]
    pub deb_version: Option<String>,
    /// Write the package here (a file or a directory; default target/debian,
    /// where cargo-deb replaces the earlier packages of the same name).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// Builds the package (release); returns its path.
pub fn build(args: &Args) -> Result<PathBuf> {
    setup::ensure(setup::Needs::Build)?;
    setup::ensure_cargo_deb()?;
    let mut command = Command::new("cargo");
    command.args(["deb", "--package", "probe-user", "--locked"]);
    if let Some(triple) = &args.target {
        // cargo-deb's own build would look for the target's standard
        // library, which only `-Z build-std` makes here: build first, then
        // package what was built (cargo-deb strips with the target's strip).
        crate::cross::find(triple)?.build_icr(false)?;
        command.args(["--target", triple, "--no-build"]);
    }
    if let Some(version) = &args.deb_version {
        command.args(["--deb-version", version]);
    }
    if let Some(output) = &args.output {
        command.arg("--output").arg(output);
    }
    command.current_dir(cmd::workspace_root()).env("PATH", cmd::path_with_cargo_bin()).stderr(Stdio::inherit());
    // cargo-deb prints the package's path, alone, on stdout.
    let out = cmd::output(&mut command)?;
    let path = out.lines().map(str::trim).rfind(|line| line.ends_with(".deb")).context("cargo deb named no package")?;
    Ok(PathBuf::from(path))
}

pub fn run(args: &Args) -> Result<()> {
    let package = build(args)?;
    let bytes = std::fs::metadata(&package).with_context(|| format!("reading {}", package.display()))?.len();
    println!("built {} ({:.1} MiB)", package.display(), bytes as f64 / (1024.0 * 1024.0));
    Ok(())
}
