//! A pair of network namespaces joined by a veth pair, made for one bench run
//! and always removed: on return, on error and on panic (`Drop`). Names carry
//! the bench's pid; pairs left by a bench that was killed (its pid gone) are
//! removed when the next one starts.
use std::{fs::File, os::fd::AsRawFd as _, process::Command};

use anyhow::{Context as _, Result, bail};

const PREFIX: &str = "icrb";

pub struct NetnsPair {
    /// Namespace of the sender, holding `tx_if`.
    pub tx_ns: String,
    /// Namespace of the receiver, holding `rx_if` (where XDP is attached).
    pub rx_ns: String,
    pub tx_if: String,
    pub rx_if: String,
}

impl NetnsPair {
    pub fn create() -> Result<Self> {
        remove_stale();
        let pid = std::process::id();
        let pair = Self {
            tx_ns: format!("{PREFIX}-tx-{pid}"),
            rx_ns: format!("{PREFIX}-rx-{pid}"),
            tx_if: "vtx".into(),
            rx_if: "vrx".into(),
        };
        // From here on, Drop removes whatever was made.
        ip(&["netns", "add", &pair.tx_ns])?;
        ip(&["netns", "add", &pair.rx_ns])?;
        ip(&[
            "-n",
            &pair.tx_ns,
            "link",
            "add",
            &pair.tx_if,
            "type",
            "veth",
            "peer",
            "name",
            &pair.rx_if,
            "netns",
            &pair.rx_ns,
        ])?;
        for (ns, interface) in [(&pair.tx_ns, &pair.tx_if), (&pair.rx_ns, &pair.rx_if)] {
            ip(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", "dev", interface, "up"])?;
        }
        Ok(pair)
    }

    /// The MAC address of `interface` in `ns`.
    pub fn mac(&self, ns: &str, interface: &str) -> Result<[u8; 6]> {
        let out = ip_output(&["-n", ns, "-j", "link", "show", "dev", interface])?;
        let json: serde_json::Value = serde_json::from_str(&out)?;
        let text = json[0]["address"].as_str().context("no MAC address")?;
        let mut mac = [0u8; 6];
        for (byte, part) in mac.iter_mut().zip(text.split(':')) {
            *byte = u8::from_str_radix(part, 16)?;
        }
        Ok(mac)
    }

    /// rx_packets and rx_dropped of the receiving interface.
    pub fn rx_stats(&self) -> Result<(u64, u64)> {
        let out = ip_output(&["-n", &self.rx_ns, "-j", "-s", "link", "show", "dev", &self.rx_if])?;
        let json: serde_json::Value = serde_json::from_str(&out)?;
        let rx = &json[0]["stats64"]["rx"];
        Ok((rx["packets"].as_u64().unwrap_or(0), rx["dropped"].as_u64().unwrap_or(0)))
    }

    /// The XDP program attached to the receiving interface, if any.
    pub fn rx_xdp_prog_id(&self) -> Result<Option<u32>> {
        let out = ip_output(&["-n", &self.rx_ns, "-j", "-d", "link", "show", "dev", &self.rx_if])?;
        let json: serde_json::Value = serde_json::from_str(&out)?;
        Ok(json[0]["xdp"]["prog"]["id"].as_u64().map(|id| id as u32))
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.tx_ns, &self.rx_ns] {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// Runs `f` with the calling thread in network namespace `ns`, then moves the
/// thread back (even if `f` fails).
pub fn in_netns<T>(ns: &str, f: impl FnOnce() -> T) -> Result<T> {
    let home = File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
    enter(ns)?;
    let result = f();
    // SAFETY: setns on a namespace fd we hold open.
    if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        // The thread would stay in the wrong namespace: not recoverable.
        panic!("returning to the original netns: {}", std::io::Error::last_os_error());
    }
    Ok(result)
}

/// Moves the calling thread into network namespace `ns` for good (for
/// threads made for the purpose).
pub fn enter(ns: &str) -> Result<()> {
    let target = File::open(format!("/run/netns/{ns}")).with_context(|| format!("opening netns {ns}"))?;
    // SAFETY: setns on a namespace fd we hold open.
    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("entering netns {ns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn ip(args: &[&str]) -> Result<()> {
    let status = Command::new("ip").args(args).status().context("running ip")?;
    if !status.success() {
        bail!("ip {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn ip_output(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Removes pairs left by benches that no longer run (killed before Drop).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) =
            name.strip_prefix(&format!("{PREFIX}-tx-")).or_else(|| name.strip_prefix(&format!("{PREFIX}-rx-")))
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing netns {name}, left by a bench that was killed");
            let _ = Command::new("ip").args(["netns", "delete", &name]).status();
        }
    }
}
