//! Installs what the build and the tests need, only when it is missing.
//! Recipe (docs/design.md): bpf-linker is built against Debian's LLVM 22,
//! the LLVM of the nightly that builds the eBPF crate.
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::cmd;

const BPF_LINKER_VERSION: &str = "0.13.0";
/// `cargo xtask deb`'s packager (its systemd, sysusers.d and tmpfiles.d support).
const CARGO_DEB_VERSION: &str = "3.8.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Needed only to build bpf-linker.
const LLVM_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "libzstd-dev", "zlib1g-dev"];
/// The lab: namespaces, NAT, real servers and clients.
const LAB_PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "conntrack",
    "curl",
    "openssl",
    "bind9-dnsutils",
    "dnsmasq-base",
    "busybox", // udhcpc: the DHCP lab's clients
    "nginx-light",
    "python3",
    "python3-venv",
    "python3-scapy",
    "tcpdump",
    "tshark",
    // The IPFIX export's tests: the collectors providers run (nfdump's
    // nfcapd and nfdump, pmacct's nfacctd).
    "nfdump",
    "pmacct",
    // The provider-wide store's tests: two servers as two shards.
    "clickhouse-server",
    // The console's browser tests (icr_lab::browser): a headless Chromium
    // driven over WebDriver.
    "chromium",
    "chromium-driver",
];
/// `cargo xtask bench`: namespaces and veth, and softflowd to compare
/// against,
/// and ClickHouse for the store bench's second backend (asked through curl).
const BENCH_PACKAGES: &[&str] = &["iproute2", "softflowd", "clickhouse-server", "curl"];
/// Test VMs (`cargo xtask vm-test`): qemu, debootstrap, `mkfs.ext4 -d`.
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "debootstrap", "e2fsprogs"];
/// arm64 test VMs: qemu-system-aarch64, and qemu-user-static to run the
/// arm64 image's programs while debootstrap and apt build it.
const VM_ARM64_PACKAGES: &[&str] = &["qemu-system-arm", "qemu-user-static"];
/// qemu-user-static's binfmt_misc rule for arm64 programs (the `F` flag:
/// its interpreter is opened now, so it works inside a chroot).
const BINFMT_ARM64_RULE: &str = "/usr/lib/binfmt.d/qemu-aarch64.conf";
const BINFMT_MISC: &str = "/proc/sys/fs/binfmt_misc";
/// PyPI packages of the lab's Python (a venv in target/): a real QUIC peer.
const LAB_PYTHON_PACKAGES: &[&str] = &["aioquic==1.7.2"];

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Building the probe.
    Build,
    /// Building, plus running the lab (tests and demo).
    Test,
    /// Building, plus the live benchmark (namespaces, softflowd).
    Bench,
}

pub fn ensure(needs: Needs) -> Result<()> {
    warn_if_disk_short(needs);
    let mut packages: Vec<&str> = Vec::new();
    let linker_missing = !has_bpf_linker();
    if linker_missing {
        packages.extend(LLVM_PACKAGES);
    }
    if needs == Needs::Test {
        packages.extend(LAB_PACKAGES);
    }
    if needs == Needs::Bench {
        packages.extend(BENCH_PACKAGES);
    }
    packages.retain(|package| !is_installed(package));
    let nightly_missing = !cmd::succeeds(rustup().args(["run", "nightly", "rustc", "--version"]));
    let rust_src_missing = nightly_missing || !has_rust_src();

    let python_missing = needs == Needs::Test && !lab_python_ready();
    if packages.is_empty() && !nightly_missing && !rust_src_missing && !linker_missing && !python_missing {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing prerequisites ({}) and not root: run as root so that they can be installed",
            describe_missing(&packages, nightly_missing, rust_src_missing, linker_missing)
        );
    }
    if !packages.is_empty() {
        apt_install(&packages)?;
    }
    if nightly_missing {
        eprintln!("xtask: installing the nightly toolchain (builds the eBPF crate)");
        cmd::run(rustup().args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    if rust_src_missing {
        eprintln!("xtask: adding rust-src to the nightly toolchain (build-std for BPF)");
        cmd::run(rustup().args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    if needs == Needs::Test {
        ensure_lab_python()?;
    }
    if linker_missing {
        eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)");
        let mut path = std::ffi::OsString::from(format!("{LLVM_PREFIX}/bin:"));
        path.push(cmd::path_with_cargo_bin());
        cmd::run(
            Command::new("cargo")
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", LLVM_PREFIX)
                .env("PATH", path),
        )?;
    }
    Ok(())
}

/// The cross toolchain of a target (`cargo xtask build --target ...`).
pub fn ensure_cross(target: &crate::cross::Target) -> Result<()> {
    ensure_packages(target.packages)
}

/// What `cargo xtask vm-test` needs to build and boot its images.
pub fn ensure_vm() -> Result<()> {
    ensure_packages(VM_PACKAGES)
}

/// What an arm64 test VM needs besides `ensure_vm`'s: its qemu, and arm64
/// programs running here (through qemu-user) for building its image. The
/// package registers the rule only where systemd or binfmt-support runs.
pub fn ensure_vm_arm64() -> Result<()> {
    ensure_packages(VM_ARM64_PACKAGES)?;
    let misc = std::path::Path::new(BINFMT_MISC);
    if misc.join("qemu-aarch64").exists() {
        return Ok(());
    }
    if !misc.join("register").exists() {
        eprintln!("xtask: mounting binfmt_misc at {BINFMT_MISC}");
        cmd::run(Command::new("mount").args(["-t", "binfmt_misc", "binfmt_misc", BINFMT_MISC]))?;
    }
    let rule = std::fs::read_to_string(BINFMT_ARM64_RULE)
        .with_context(|| format!("reading {BINFMT_ARM64_RULE} (qemu-user-static)"))?;
    eprintln!("xtask: registering qemu-user-static for arm64 programs with binfmt_misc");
    for line in rule.lines().filter(|line| line.starts_with(':')) {
        std::fs::write(misc.join("register"), line)
            .with_context(|| format!("registering {BINFMT_ARM64_RULE} in {BINFMT_MISC}/register"))?;
    }
    Ok(())
}

fn ensure_packages(packages: &[&str]) -> Result<()> {
    let mut packages = packages.to_vec();
    packages.retain(|package| !is_installed(package));
    if packages.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing prerequisites ({}) and not root: run as root so that they can be installed",
            describe_missing(&packages, false, false, false)
        );
    }
    apt_install(&packages)
}

fn apt_install(packages: &[&str]) -> Result<()> {
    eprintln!("xtask: installing Debian packages: {}", packages.join(" "));
    cmd::run(Command::new("apt-get").arg("update").arg("-q"))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// cargo-fuzz, for `cargo xtask fuzz`.
pub fn ensure_cargo_fuzz() -> Result<()> {
    if cmd::succeeds(Command::new("cargo").args(["fuzz", "--version"]).env("PATH", cmd::path_with_cargo_bin())) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz");
    cmd::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]).env("PATH", cmd::path_with_cargo_bin()))
}

/// cargo-deb, for `cargo xtask deb`, at the version the package is made with.
pub fn ensure_cargo_deb() -> Result<()> {
    let version = Command::new("cargo").args(["deb", "--version"]).env("PATH", cmd::path_with_cargo_bin()).output();
    if version.is_ok_and(|out| out.status.success() && String::from_utf8_lossy(&out.stdout).contains(CARGO_DEB_VERSION))
    {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-deb {CARGO_DEB_VERSION} (a few minutes)");
    cmd::run(
        Command::new("cargo")
            .args(["install", "cargo-deb", "--version", CARGO_DEB_VERSION, "--locked"])
            .env("PATH", cmd::path_with_cargo_bin()),
    )
}

/// The lab's Python: a venv of Debian's python3 with aioquic from PyPI.
pub fn lab_python() -> std::path::PathBuf {
    cmd::workspace_root().join("target/lab-python/bin/python3")
}

fn lab_python_ready() -> bool {
    cmd::succeeds(Command::new(lab_python()).args(["-c", "import aioquic"]))
}

fn ensure_lab_python() -> Result<()> {
    if lab_python_ready() {
        return Ok(());
    }
    let venv = cmd::workspace_root().join("target/lab-python");
    eprintln!("xtask: creating the lab's Python venv in {} (aioquic from PyPI)", venv.display());
    cmd::run(Command::new("/usr/bin/python3").args(["-m", "venv"]).arg(&venv))?;
    cmd::run(Command::new(venv.join("bin/pip")).args(["install", "-q"]).args(LAB_PYTHON_PACKAGES))?;
    Ok(())
}

fn describe_missing(packages: &[&str], nightly: bool, rust_src: bool, linker: bool) -> String {
    let mut missing: Vec<String> = packages.iter().map(|p| format!("apt:{p}")).collect();
    if nightly {
        missing.push("nightly toolchain".into());
    }
    if rust_src {
        missing.push("rust-src (nightly)".into());
    }
    if linker {
        missing.push("bpf-linker".into());
    }
    missing.join(", ")
}

fn rustup() -> Command {
    let mut command = Command::new("rustup");
    command.env("PATH", cmd::path_with_cargo_bin());
    command
}

fn has_bpf_linker() -> bool {
    cmd::succeeds(Command::new("bpf-linker").arg("--version").env("PATH", cmd::path_with_cargo_bin()))
}

fn has_rust_src() -> bool {
    cmd::output(rustup().args(["component", "list", "--toolchain", "nightly", "--installed"]))
        .is_ok_and(|list| list.lines().any(|line| line.starts_with("rust-src")))
}

fn is_installed(package: &str) -> bool {
    cmd::output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", package]))
        .is_ok_and(|status| status.starts_with("ii"))
}

/// Says so before a long build when the disk is short: cargo would stop
/// with "No space left on device" many minutes in (CI did).
fn warn_if_disk_short(needs: Needs) {
    // A clean build of what each needs under target/, with room to spare
    // for the tests' stores (measured: see docs/develop.md, Tests).
    let need_gib = if needs == Needs::Test { 4 } else { 2 };
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| cmd::workspace_root().join("target"), Into::into);
    let on = target.ancestors().find(|dir| dir.exists()).unwrap_or(&target);
    match free_bytes(on) {
        Ok(free) if free < need_gib << 30 => eprintln!(
            "xtask: warning: {} has {:.1} GiB free; a clean build and its tests need about {need_gib} GiB",
            on.display(),
            free as f64 / f64::from(1u32 << 30)
        ),
        Ok(_) => {}
        Err(error) => eprintln!("xtask: warning: cannot tell the free disk space of {}: {error}", on.display()),
    }
}

fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer statvfs fills on success.
    if unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the buffer.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_bavail * stat.f_frsize)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}
