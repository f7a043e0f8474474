//! Running commands, loudly: every command is printed before it runs.
use std::{ffi::OsStr, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// `~/.cargo/bin` first on PATH, where rustup and `cargo install` put tools.
pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    let mut path = home.join("bin").into_os_string();
    if let Some(rest) = std::env::var_os("PATH") {
        path.push(":");
        path.push(rest);
    }
    path
}

pub fn run(command: &mut Command) -> Result<()> {
    eprintln!("xtask: running {}", describe(command));
    let status = command.status().with_context(|| format!("starting {}", describe(command)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(command));
    }
    Ok(())
}

/// Runs `command` and returns whether it succeeded, quietly (for checks).
pub fn succeeds(command: &mut Command) -> bool {
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

pub fn output(command: &mut Command) -> Result<String> {
    let out = command.output().with_context(|| format!("starting {}", describe(command)))?;
    if !out.status.success() {
        bail!("{} failed: {}", describe(command), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn cargo(args: &[&str]) -> Result<()> {
    cargo_with_env(args, &[])
}

pub fn cargo_with_env(args: &[&str], env: &[(&str, &OsStr)]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(args).current_dir(workspace_root()).env("PATH", path_with_cargo_bin());
    for (key, value) in env {
        command.env(key, value);
    }
    run(&mut command)
}

pub fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}
