//! Network namespaces made for one test or bench run and always removed: on
//! return, on error and on panic (`Drop`). Names carry the run's pid;
//! namespaces left by a run that was killed (its pid gone) are removed when
//! the next one makes its own.
use std::{fs::File, os::fd::AsRawFd as _, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

/// A network namespace of our own, its loopback up; deleted when dropped.
pub struct Netns {
    name: String,
}

impl Netns {
    /// `<prefix>-<pid>`, after removing those of runs that are gone.
    pub fn create(prefix: &str) -> Result<Self> {
        remove_stale(prefix);
        let netns = Self { name: format!("{prefix}-{}", std::process::id()) };
        // From here on, Drop removes it.
        ip(&["netns", "add", &netns.name])?;
        ip(&["-n", &netns.name, "link", "set", "dev", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` with the calling thread in this namespace ([`in_netns`]).
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        in_netns(&self.name, f)
    }

    /// A veth pair `a`–`b`, both ends in this namespace and up.
    pub fn add_veth(&self, a: &str, b: &str) -> Result<()> {
        ip(&["-n", &self.name, "link", "add", a, "type", "veth", "peer", "name", b])?;
        for end in [a, b] {
            ip(&["-n", &self.name, "link", "set", "dev", end, "up"])?;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}

/// A pair of namespaces joined by a veth pair: a sender and a receiver.
pub struct NetnsPair {
    /// The sender, holding `tx_if`.
    pub tx: Netns,
    /// The receiver, holding `rx_if` (where XDP is attached).
    pub rx: Netns,
    pub tx_if: String,
    pub rx_if: String,
}

impl NetnsPair {
    /// `<prefix>-tx-<pid>` and `<prefix>-rx-<pid>`, joined by `vtx`–`vrx`.
    pub fn create(prefix: &str) -> Result<Self> {
        let pair = Self {
            tx: Netns::create(&format!("{prefix}-tx"))?,
            rx: Netns::create(&format!("{prefix}-rx"))?,
            tx_if: "vtx".into(),
            rx_if: "vrx".into(),
        };
        ip(&[
            "-n",
            pair.tx.name(),
            "link",
            "add",
            &pair.tx_if,
            "type",
            "veth",
            "peer",
            "name",
            &pair.rx_if,
            "netns",
            pair.rx.name(),
        ])?;
        for (ns, interface) in [(&pair.tx, &pair.tx_if), (&pair.rx, &pair.rx_if)] {
            ip(&["-n", ns.name(), "link", "set", "dev", interface, "up"])?;
        }
        Ok(pair)
    }

    /// The MAC address of `interface` in `ns`.
    pub fn mac(&self, ns: &Netns, interface: &str) -> Result<[u8; 6]> {
        let out = ip_output(&["-n", ns.name(), "-j", "link", "show", "dev", interface])?;
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
        let out = ip_output(&["-n", self.rx.name(), "-j", "-s", "link", "show", "dev", &self.rx_if])?;
        let json: serde_json::Value = serde_json::from_str(&out)?;
        let rx = &json[0]["stats64"]["rx"];
        Ok((rx["packets"].as_u64().unwrap_or(0), rx["dropped"].as_u64().unwrap_or(0)))
    }

    /// The XDP program attached to the receiving interface, if any.
    pub fn rx_xdp_prog_id(&self) -> Result<Option<u32>> {
        let out = ip_output(&["-n", self.rx.name(), "-j", "-d", "link", "show", "dev", &self.rx_if])?;
        let json: serde_json::Value = serde_json::from_str(&out)?;
        Ok(json[0]["xdp"]["prog"]["id"].as_u64().map(|id| id as u32))
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
    let target = File::open(Path::new("/run/netns").join(ns)).with_context(|| format!("opening netns {ns}"))?;
    enter_file(&target).with_context(|| format!("entering netns {ns}"))
}

/// As [`enter`], the namespace given by a file opened before (one that may
/// be gone by name when the thread gets to it).
pub fn enter_file(netns: &File) -> Result<()> {
    // SAFETY: setns on a namespace file we hold open; it changes only the
    // calling thread's network namespace.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) -> Result<()> {
    ip_output(args).map(drop)
}

/// `program`, to be run in namespace `netns` (through `ip netns exec`,
/// which execs it) or, without one, here.
pub fn command_in(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns, program]);
            command
        }
        None => Command::new(program),
    }
}

/// `ip ARGS`'s output; it must succeed.
pub fn ip_output(args: &[&str]) -> Result<String> {
    let out =
        Command::new("ip").args(args).stdin(std::process::Stdio::null()).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Removes the namespaces `<prefix>-<pid>` of runs that no longer exist
/// (killed before Drop).
fn remove_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(prefix).and_then(|rest| rest.strip_prefix('-')) else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing netns {name}, left by a run that was killed");
            let _ = Command::new("ip").args(["netns", "delete", &name]).status();
        }
    }
}
