//! `cargo xtask vm-test`: the probe's kernel tests and the namespace lab in a
//! VM running a distribution kernel, under qemu.
//!
//! The image (vm-images/: debootstrap, Debian's kernel, the lab's packages)
//! is cached as `<cache>/<kernel>-<hash of its recipe>/` and rebuilt only when
//! the recipe changes. The guest boots its own kernel (`-kernel`, `-initrd`
//! from the image), mounts this workspace read-only over 9p at
//! the same path as here (the test binaries have those paths built in), runs
//! the test binaries built here, prints `ICR-VM-RESULT: <code>` and powers
//! off. A watchdog kills qemu past the deadline.
//!
//! `--only package` boots the same image with systemd instead and runs
//! vm-images/package-test.sh: the Debian package (`cargo xtask deb`)
//! installed, its unit started, a question answered by a member of its
//! group, an upgrade to a newer build without a gap, removal and purge.
use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, setup};

/// The files an image is made from: a change to any of them (or to the
/// kernel's `<name>.env`) makes a new image. `guest-run.sh` is not among
/// them: it is handed to the guest at each run.
const RECIPE_FILES: &[&str] =
    &["build-image.sh", "init", "icr-vm-run.service", "packages-kernel", "packages", "python-packages"];

/// `--only package`: the Debian package's test, under systemd.
const PACKAGE_TEST: &str = "package";

/// The tests' own settings, handed to the guest when they are set here
/// (e.g. `ICR_FAILOPEN_FRAMES=100000` shortens the fail-open test under TCG).
const PASSED_ENV: &[&str] = &["ICR_FAILOPEN_FRAMES", "ICR_LAB_LOG", "ICR_LAB_SLOWDOWN"];
/// The lab's waits are scaled by this under TCG, unless ICR_LAB_SLOWDOWN is set.
const TCG_SLOWDOWN: &str = "4";
/// The VM's default deadline, boot included, in seconds.
const KVM_TIMEOUT: u64 = 2400;
const TCG_TIMEOUT: u64 = 7200;
/// The fail-open test's frames in an arm64 guest, unless ICR_FAILOPEN_FRAMES is set.
const ARM64_FAILOPEN_FRAMES: u32 = 20_000;

#[derive(clap::Args)]
pub struct Args {
    /// The image's kernel: `debian12` (Debian 12's linux-image-amd64, 6.1),
    /// `backports` (Debian 12 with bookworm-backports' linux-image-amd64, 6.12)
    /// or `bullseye` (Debian 12 with Debian 11's linux-image-amd64, 5.10).
    #[arg(long, default_value = "debian12")]
    kernel: String,
    /// The guest's architecture. `arm64` (Debian's linux-image-arm64 under
    /// `qemu-system-aarch64 -M virt`, always emulated here, so slow) has a
    /// lean image that runs only the kernel tests (`xdp`), cross-compiled,
    /// and the unit tests of what user space shares with the kernel and
    /// reads from files (probe-common, the store's codec, the pcap reader).
    #[arg(long, value_enum, default_value_t = Arch::Amd64)]
    arch: Arch,
    /// Test binaries to run in the VM, by target name (default: probe-user's
    /// `xdp` and every test of the `icr-tests` crate but `clickhouse_lab`),
    /// e.g. `--only xdp,nat_lab`. `--only package` instead boots the guest
    /// with systemd and tests the Debian package (vm-images/package-test.sh).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Kill the VM this many seconds after starting it (boot included).
    /// Default: 2400 with KVM, 7200 under TCG (the whole default set takes
    /// 35 to 45 minutes there).
    #[arg(long)]
    timeout: Option<u64>,
    /// Kill a test binary in the guest after this many seconds.
    #[arg(long, default_value_t = 1200)]
    test_timeout: u64,
    /// Where images are kept (outside the repository).
    #[arg(long, env = "ICR_VM_CACHE", default_value = "/var/cache/icr-vm")]
    cache: PathBuf,
    /// Under TCG: `single` runs both vCPUs on one host thread; `multi` runs
    /// each on its own. Guests on 6.12 under multi-threaded TCG often panic
    /// with an int3 Oops where the kernel patches its own code (static keys,
    /// the XDP dispatcher): a known emulation race (LKML, July 2023,
    /// "qemu-x86_64 booting with 8.0.0 stil see int3"), not the probe's.
    /// `single` avoids it, and the whole default set took as long with it.
    #[arg(long, value_enum, default_value_t = TcgThreads::Single)]
    tcg_threads: TcgThreads,
    /// Build (or find) the image, print where it is, and stop.
    #[arg(long)]
    image_only: bool,
    /// Passed to every test binary in the guest (a name filter, `--test-threads=1`, ...).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TcgThreads {
    Single,
    Multi,
}

/// Debian's name of the guest's architecture.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    fn name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// qemu's `-cpu` under TCG. For arm64, `max` with QEMU's own
    /// pointer-authentication algorithm instead of the architected QARMA,
    /// whose emulation costs much of TCG's time (QEMU's docs, "Arm CPU
    /// Features": pauth-impdef).
    fn tcg_cpu(self) -> &'static str {
        match self {
            Arch::Amd64 => "max",
            Arch::Arm64 => "max,pauth-impdef=on",
        }
    }

    /// The package lists of vm-images/ its image installs.
    fn package_lists(self) -> &'static str {
        match self {
            Arch::Amd64 => "packages-kernel packages",
            Arch::Arm64 => "packages-kernel",
        }
    }

    /// The name of an image (`suffix`: its recipe's hash) or of a run
    /// directory: amd64's keep the names they always had.
    fn image_name(self, kernel: &str, suffix: &str) -> String {
        match self {
            Arch::Amd64 => format!("{kernel}-{suffix}"),
            Arch::Arm64 => format!("{kernel}-arm64-{suffix}"),
        }
    }
}

/// The test binaries of an arm64 guest: the kernel tests, and the unit
/// tests of the layouts shared with the kernel and of the byte formats read
/// from disk (the store's codec, the pcap reader), as the cross-compiled code
/// runs them. Each with its own test filters.
const ARM64_TESTS: &[(&str, &str, &str)] = &[
    ("probe-user", "xdp", ""),
    ("probe-common", "probe_common", ""),
    ("probe-user", "icr", "store::codec:: store::wire:: capture::events:: capture::tuple:: replay::"),
];

/// A built image: `rootfs.ext4`, `vmlinuz`, `initrd.img`, `kernel-release`.
struct Image {
    dir: PathBuf,
    release: String,
}

/// What the guest runs.
enum Guest {
    /// Test binaries built here, under the image's own init.
    Tests(Vec<TestBinary>),
    /// The Debian package and a newer build of it, under systemd.
    Package { installed: PathBuf, upgrade: PathBuf },
}

impl Guest {
    fn names(&self) -> Vec<&str> {
        match self {
            Guest::Tests(tests) => tests.iter().map(|t| t.name.as_str()).collect(),
            Guest::Package { .. } => vec![PACKAGE_TEST],
        }
    }
}

/// A test binary, as the guest runs it.
struct TestBinary {
    name: String,
    /// Its package's directory: cargo runs tests there.
    dir: PathBuf,
    executable: PathBuf,
    /// Its own arguments (test filters), before the run's.
    filters: String,
}

pub fn run(args: &Args) -> Result<()> {
    let recipes = cmd::workspace_root().join("vm-images");
    if !recipes.join(format!("{}.env", args.kernel)).exists() {
        bail!("no VM image {:?}: there is {}", args.kernel, available_kernels(&recipes).join(", "));
    }
    if !setup::is_root() {
        bail!("vm-test builds images (debootstrap, chroot) and runs the lab: run it as root");
    }
    setup::ensure_vm()?;
    if args.arch == Arch::Arm64 {
        setup::ensure_vm_arm64()?;
        if let Some(other) = args.only.iter().find(|name| name.as_str() != "xdp") {
            bail!("the arm64 image runs the kernel tests only (`--only xdp`), not {other:?}");
        }
    }
    let started = Instant::now();
    let image = ensure_image(args, &recipes)?;
    let image_time = started.elapsed();
    if args.image_only {
        println!("{} (kernel {})", image.dir.display(), image.release);
        return Ok(());
    }
    let target = target_dir()?;
    if args.arch == Arch::Arm64 {
        let started = Instant::now();
        let guest = Guest::Tests(arm64_test_binaries()?);
        let build_time = started.elapsed();
        let result = boot_and_test(args, &recipes, &image, &target, &guest);
        eprintln!(
            "xtask: vm-test arm64: image {:.0} s (0 when cached), cross-compiling the tests {:.0} s",
            image_time.as_secs_f64(),
            build_time.as_secs_f64()
        );
        return result;
    }
    let guest = if args.only.iter().any(|name| name == PACKAGE_TEST) {
        if args.only.len() > 1 {
            bail!("--only {PACKAGE_TEST} boots the guest with systemd and runs alone");
        }
        package_builds(&target)?
    } else {
        setup::ensure(setup::Needs::Build)?;
        cmd::cargo(&["build", "--package", "probe-user"])?;
        Guest::Tests(test_binaries(&args.only, &target)?)
    };
    boot_and_test(args, &recipes, &image, &target, &guest)
}

/// The package as `cargo xtask deb` builds it, and a newer build of the same
/// code (its version with `+upgrade1`, which dpkg orders after it), each in a
/// directory of its own (cargo-deb replaces the earlier builds in its own).
fn package_builds(target: &Path) -> Result<Guest> {
    let dir = target.join("debian/vm-test");
    let _ = fs::remove_dir_all(&dir);
    let build = |name: &str, deb_version: Option<String>| {
        let output = dir.join(name);
        fs::create_dir_all(&output)?;
        crate::deb::build(&crate::deb::Args { target: None, deb_version, output: Some(output) })
    };
    let installed = build("installed", None)?;
    let name = installed.file_name().and_then(|n| n.to_str()).context("the package's file name")?;
    // icr_VERSION_ARCH.deb
    let version = name.split('_').nth(1).context("no version in the package's file name")?;
    let upgrade = build("upgrade", Some(format!("{version}+upgrade1")))?;
    Ok(Guest::Package { installed, upgrade })
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or the workspace's
/// `target/`): the guest mounts it at the same path when it is elsewhere.
pub fn target_dir() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(cmd::workspace_root())
        .env("PATH", cmd::path_with_cargo_bin())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed ({})", out.status);
    }
    let dir = json_string(&String::from_utf8_lossy(&out.stdout), "target_directory")
        .context("cargo metadata named no target_directory")?;
    Ok(PathBuf::from(dir))
}

fn available_kernels(recipes: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(recipes)
        .map(|dir| {
            dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.strip_suffix(".env").map(str::to_string)).collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// FNV-1a over the recipe's file names and contents: the image's cache key.
fn recipe_hash(recipes: &Path, kernel: &str) -> Result<String> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let env = format!("{kernel}.env");
    for name in RECIPE_FILES.iter().copied().chain([env.as_str()]) {
        let path = recipes.join(name);
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        for byte in name.bytes().chain([0]).chain(bytes).chain([0]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok(format!("{hash:016x}"))
}

fn ensure_image(args: &Args, recipes: &Path) -> Result<Image> {
    let hash = recipe_hash(recipes, &args.kernel)?;
    let dir = args.cache.join(args.arch.image_name(&args.kernel, &hash));
    if !dir.join("rootfs.ext4").exists() {
        fs::create_dir_all(&args.cache)?;
        eprintln!(
            "xtask: building the {} {} VM image in {} (debootstrap from Debian's mirror: several minutes)",
            args.kernel,
            args.arch.name(),
            dir.display()
        );
        let started = Instant::now();
        cmd::run(
            Command::new("bash")
                .arg(recipes.join("build-image.sh"))
                .arg(&args.kernel)
                .arg(&dir)
                .arg(args.arch.name())
                .arg(args.arch.package_lists()),
        )?;
        eprintln!("xtask: image built in {:.0} s", started.elapsed().as_secs_f64());
        remove_stale_images(&args.cache, &args.arch.image_name(&args.kernel, ""), &dir);
    }
    let release = fs::read_to_string(dir.join("kernel-release"))
        .with_context(|| format!("{}: incomplete image, remove it", dir.display()))?
        .trim()
        .to_string();
    Ok(Image { dir, release })
}

/// Images of an older recipe of the same kernel and architecture (`prefix`:
/// the image's name without its hash).
fn remove_stale_images(cache: &Path, prefix: &str, current: &Path) {
    let Ok(entries) = fs::read_dir(cache) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = name
            .strip_prefix(prefix)
            .is_some_and(|hash| hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()));
        if stale && path != current {
            eprintln!("xtask: removing the older image {}", path.display());
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// Tests of what no kernel changes (the provider's ClickHouse store, the web
/// console in a browser, IPFIX collectors): they need `clickhouse-server`,
/// Chromium or nfdump and pmacct, which the test images do not carry, and
/// run in the VM only when named with `--only`.
const HOST_ONLY: &[&str] = &["clickhouse_lab", "console_lab", "browser_harness", "ipfix_lab"];

/// Builds the test binaries and picks those the VM runs, from cargo's JSON
/// messages (`compiler-artifact` lines with an `executable`).
fn test_binaries(only: &[String], target: &Path) -> Result<Vec<TestBinary>> {
    eprintln!("xtask: building the test binaries (cargo test --no-run)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["test", "--workspace", "--exclude", "probe-ebpf", "--no-run", "--message-format=json"])
        .current_dir(cmd::workspace_root())
        .env("PATH", cmd::path_with_cargo_bin())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed ({})", out.status);
    }
    let root = cmd::workspace_root();
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.contains(r#""reason":"compiler-artifact""#) || !line.contains(r#""kind":["test"]"#) {
            continue;
        }
        let (Some(executable), Some(name), Some(manifest)) =
            (json_string(line, "executable"), json_string(line, "name"), json_string(line, "manifest_path"))
        else {
            continue;
        };
        let dir = Path::new(&manifest).parent().context("manifest path")?.to_path_buf();
        let ours = (dir == root.join("probe-user") && name == "xdp") || dir == root.join("tests");
        let wanted = if only.is_empty() { !HOST_ONLY.contains(&name.as_str()) } else { only.contains(&name) };
        if !ours || !wanted {
            continue;
        }
        let executable = PathBuf::from(executable);
        if !executable.starts_with(&root) && !executable.starts_with(target) {
            bail!(
                "{} is outside the workspace and the target directory, which is all the VM sees",
                executable.display()
            );
        }
        tests.push(TestBinary { name, dir, executable, filters: String::new() });
    }
    tests.sort_by(|a, b| a.name.cmp(&b.name));
    // xdp first: if the probe does not load, the labs cannot pass either.
    tests.sort_by_key(|t| t.name != "xdp");
    for wanted in only {
        if !tests.iter().any(|t| &t.name == wanted) {
            bail!("no test binary {wanted:?} (there are probe-user's xdp and the icr-tests crate's tests)");
        }
    }
    if tests.is_empty() {
        bail!("cargo test --no-run named no test binaries");
    }
    Ok(tests)
}

/// Cross-compiles ARM64_TESTS (`cargo test --no-run` for aarch64) and
/// returns them in that order.
fn arm64_test_binaries() -> Result<Vec<TestBinary>> {
    eprintln!("xtask: cross-compiling the arm64 guest's test binaries (cargo test --no-run)");
    let mut command = crate::cross::by_debian_arch("arm64")?.cargo("test")?;
    command.args(["--no-run", "--locked", "--message-format=json-render-diagnostics"]);
    command.args(["--package", "probe-user", "--test", "xdp", "--lib", "--package", "probe-common"]);
    command.stdout(Stdio::piped()).stderr(Stdio::inherit());
    eprintln!("xtask: running {}", cmd::describe(&command));
    let out = cmd::output(&mut command)?;
    let root = cmd::workspace_root();
    let mut built = Vec::new();
    // Test harnesses only (a library or a test target with an executable):
    // `--test xdp` also builds the `icr` binary, named as the library is.
    let harnesses = out.lines().filter(|line| {
        line.contains(r#""reason":"compiler-artifact""#)
            && (line.contains(r#""kind":["lib"]"#) || line.contains(r#""kind":["test"]"#))
    });
    for line in harnesses {
        let (Some(executable), Some(name), Some(manifest)) =
            (json_string(line, "executable"), json_string(line, "name"), json_string(line, "manifest_path"))
        else {
            continue;
        };
        let dir = Path::new(&manifest).parent().context("manifest path")?.to_path_buf();
        built.push((dir, name, PathBuf::from(executable)));
    }
    ARM64_TESTS
        .iter()
        .map(|&(package, name, filters)| {
            let dir = root.join(package);
            let (_, _, executable) = built
                .iter()
                .find(|(d, n, _)| *d == dir && n == name)
                .with_context(|| format!("cargo built no test binary {name} of {package}"))?;
            Ok(TestBinary { name: name.to_string(), dir, executable: executable.clone(), filters: filters.to_string() })
        })
        .collect()
}

/// The string value of the first `"key":"..."` in a JSON line (cargo's
/// messages put the target's `name` before any other `name`).
pub fn json_string(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut value = String::new();
    let mut chars = line[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(value),
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                't' => value.push('\t'),
                'u' => {
                    let code: String = chars.by_ref().take(4).collect();
                    value.push(char::from_u32(u32::from_str_radix(&code, 16).ok()?)?);
                }
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

/// The host's run directory, shared with the guest as 9p tag `icrctl`:
/// removed when the run ends, however it ends.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What the console said, as it said it.
#[derive(Default)]
struct Console {
    booted: Option<Instant>,
    result: Option<(Instant, i32)>,
    /// Per test binary: name, exit code, seconds (from ICR-VM-TEST-END).
    binaries: Vec<(String, i32, u64)>,
    passed: u64,
    failed: u64,
    ignored: u64,
    /// The guest kernel trapped on an int3 it did not place (see `--tcg-threads`).
    stray_int3: bool,
}

impl Console {
    fn read_line(&mut self, line: &str) {
        let line = line.trim_end();
        if line.contains("Oops: int3") {
            self.stray_int3 = true;
        }
        if line.starts_with("ICR-VM-BOOTED:") && self.booted.is_none() {
            self.booted = Some(Instant::now());
        } else if let Some(code) = line.strip_prefix("ICR-VM-RESULT: ") {
            if let Ok(code) = code.trim().parse() {
                self.result = Some((Instant::now(), code));
            }
        } else if let Some(rest) = line.strip_prefix("ICR-VM-TEST-END: ") {
            // NAME exit=N seconds=S
            let mut fields = rest.split_whitespace();
            let name = fields.next().unwrap_or("?").to_string();
            let value =
                |field: Option<&str>, key: &str| field.and_then(|f| f.strip_prefix(key)).and_then(|v| v.parse().ok());
            let code = value(fields.next(), "exit=").unwrap_or(-1);
            let seconds = value(fields.next(), "seconds=").unwrap_or(0);
            self.binaries.push((name, code, seconds as u64));
        } else if let Some(rest) = line.strip_prefix("test result: ") {
            // ok. 9 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.2s
            for part in rest.split([';', '.']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next().and_then(|n| n.parse::<u64>().ok()), words.next()) {
                    match what {
                        "passed" => self.passed += n,
                        "failed" => self.failed += n,
                        "ignored" => self.ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
}

/// qemu's pid, for the Ctrl-C handler.
static QEMU_PID: AtomicI32 = AtomicI32::new(0);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// How long a guest kernel may take to print its first line under KVM
/// before KVM is taken not to work here. A working KVM prints it within a
/// second or two.
const KVM_PROBE_SECONDS: u64 = 20;
/// What the kernel proper prints first (the decompressor's lines come before).
const KERNEL_FIRST_LINE: &str = "Linux version";

/// How qemu runs the guest.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Accel {
    Kvm,
    Tcg(TcgThreads),
}

impl Accel {
    fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "KVM",
            Accel::Tcg(_) => "TCG",
        }
    }
}

/// KVM when `/dev/kvm` opens and really boots this image's kernel, else TCG.
/// Under nested virtualization `/dev/kvm` can open and yet the guest kernel
/// hangs silently right after decompression ("KASLR disabled", then
/// nothing), so a short boot probe decides, not the device node.
fn choose_accel(image: &Image, tcg_threads: TcgThreads) -> Result<Accel> {
    if fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        eprintln!("xtask: /dev/kvm is not usable here: the VM runs under TCG software emulation, which is slow");
        return Ok(Accel::Tcg(tcg_threads));
    }
    eprintln!("xtask: /dev/kvm opens: checking that it boots the guest's kernel (at most {KVM_PROBE_SECONDS} s)");
    let started = Instant::now();
    if kernel_prints_under_kvm(image)? {
        eprintln!("xtask: KVM booted the kernel in {:.1} s: the VM runs with KVM", started.elapsed().as_secs_f64());
        Ok(Accel::Kvm)
    } else {
        eprintln!(
            "xtask: /dev/kvm opens, but the guest's kernel printed nothing under KVM in {KVM_PROBE_SECONDS} s \
             (nested virtualization?): the VM runs under TCG software emulation instead, which is slow"
        );
        Ok(Accel::Tcg(tcg_threads))
    }
}

/// Boots the image's kernel under KVM with no disk and watches the console
/// for the kernel's first line; qemu is killed either way.
fn kernel_prints_under_kvm(image: &Image) -> Result<bool> {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-no-reboot",
    ])
    .args(["-m", "512M", "-smp", "1", "-accel", "kvm", "-cpu", "host"])
    .arg("-kernel")
    .arg(image.dir.join("vmlinuz"))
    .args(["-append", "console=ttyS0 loglevel=7 panic=-1"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    // SAFETY: prctl is async-signal-safe; the probe dies with this process.
    unsafe {
        qemu.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = qemu.spawn().context("starting qemu-system-x86_64 for the KVM boot probe")?;
    let stdout = child.stdout.take().context("the KVM probe's console")?;
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buffer = Vec::new();
        while reader.read_until(b'\n', &mut buffer).is_ok_and(|n| n > 0) {
            if String::from_utf8_lossy(&buffer).contains(KERNEL_FIRST_LINE) {
                let _ = seen_tx.send(());
                return;
            }
            buffer.clear();
        }
    });
    let seen = seen_rx.recv_timeout(Duration::from_secs(KVM_PROBE_SECONDS)).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    Ok(seen)
}

fn boot_and_test(args: &Args, recipes: &Path, image: &Image, target: &Path, guest: &Guest) -> Result<()> {
    let root = cmd::workspace_root();
    // A target directory outside the workspace is shared on its own.
    let target_share = (!target.starts_with(&root)).then_some(target);

    let run_dir =
        RunDir(args.cache.join("runs").join(args.arch.image_name(&args.kernel, &std::process::id().to_string())));
    let _ = fs::remove_dir_all(&run_dir.0);
    fs::create_dir_all(&run_dir.0)?;
    fs::copy(recipes.join("guest-run.sh"), run_dir.0.join("guest-run.sh"))?;
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    // The `icr` the lab tests run: built for the guest's architecture.
    let icr = match args.arch {
        Arch::Amd64 => target.join("debug/icr"),
        Arch::Arm64 => target.join(crate::cross::by_debian_arch("arm64")?.triple).join("debug/icr"),
    };
    let mut env = format!(
        "ICR_VM_ROOT={}\nICR_VM_TARGET={}\nICR_VM_BIN={}\nICR_VM_TARGET_SHARED={}\nICR_VM_TEST_TIMEOUT={}\nICR_VM_TEST_ARGS={}\n",
        quote(&root.to_string_lossy()),
        quote(&target.to_string_lossy()),
        quote(&icr.to_string_lossy()),
        u8::from(target_share.is_some()),
        args.test_timeout,
        quote(&args.args.join(" ")),
    );
    for name in PASSED_ENV {
        if let Some(value) = std::env::var_os(name) {
            env.push_str(&format!("export {name}={}\n", quote(&value.to_string_lossy())));
        }
    }
    if args.arch == Arch::Arm64 && std::env::var_os("ICR_FAILOPEN_FRAMES").is_none() {
        // Emulated arm64 runs the XDP program some hundred times slower
        // than the host: the fail-open test on fewer frames keeps the step lean.
        env.push_str(&format!("export ICR_FAILOPEN_FRAMES={ARM64_FAILOPEN_FRAMES}\n"));
    }
    // No arm64 KVM on an x86_64 host: always emulated.
    let accel = match args.arch {
        Arch::Amd64 => choose_accel(image, args.tcg_threads)?,
        Arch::Arm64 => Accel::Tcg(args.tcg_threads),
    };
    if std::env::var_os("ICR_LAB_SLOWDOWN").is_none() && accel != Accel::Kvm {
        env.push_str(&format!("export ICR_LAB_SLOWDOWN={TCG_SLOWDOWN}\n"));
    }
    let console = match args.arch {
        Arch::Amd64 => "ttyS0",
        // The virt machine's PL011 UART.
        Arch::Arm64 => "ttyAMA0",
    };
    let mut append = format!("root=/dev/vda rw rootfstype=ext4 console={console} panic=1 loglevel=4");
    match guest {
        Guest::Tests(tests) => {
            let list: String = tests
                .iter()
                .map(|t| format!("{}\t{}\t{}\t{}\n", t.name, t.dir.display(), t.executable.display(), t.filters))
                .collect();
            fs::write(run_dir.0.join("tests.list"), list)?;
            append.push_str(" init=/sbin/icr-vm-init");
        }
        Guest::Package { installed, upgrade } => {
            fs::copy(recipes.join("package-test.sh"), run_dir.0.join("package-test.sh"))?;
            fs::copy(installed, run_dir.0.join("icr-installed.deb"))
                .with_context(|| format!("copying {}", installed.display()))?;
            fs::copy(upgrade, run_dir.0.join("icr-upgrade.deb"))
                .with_context(|| format!("copying {}", upgrade.display()))?;
            env.push_str("export ICR_VM_PACKAGE_TEST=1\n");
            // systemd's own status lines only when something fails.
            append.push_str(" init=/lib/systemd/systemd icr-vm.systemd systemd.show_status=error");
        }
    }
    fs::write(run_dir.0.join("run.env"), env)?;

    eprintln!("xtask: booting {} (kernel {}) under {}", args.kernel, image.release, accel.name());
    let qemu_program = match args.arch {
        Arch::Amd64 => "qemu-system-x86_64",
        Arch::Arm64 => "qemu-system-aarch64",
    };
    let mut qemu = Command::new(qemu_program);
    qemu.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-no-reboot",
    ])
    .args(["-m", "2G", "-smp", "2"]);
    if args.arch == Arch::Arm64 {
        qemu.args(["-machine", "virt"]);
    }
    match accel {
        Accel::Kvm => qemu.args(["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg(TcgThreads::Single) => qemu.args(["-accel", "tcg,thread=single"]),
        Accel::Tcg(TcgThreads::Multi) => qemu.args(["-accel", "tcg,thread=multi"]),
    };
    if let Accel::Tcg(_) = accel {
        qemu.args(["-cpu", args.arch.tcg_cpu()]);
    }
    qemu.arg("-kernel")
        .arg(image.dir.join("vmlinuz"))
        .arg("-initrd")
        .arg(image.dir.join("initrd.img"))
        .arg("-append")
        .arg(&append)
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio,snapshot=on", image.dir.join("rootfs.ext4").display()))
        .args(["-device", "virtio-rng-pci"])
        .arg("-virtfs")
        .arg(format!("local,path={},mount_tag=icrctl,security_model=none", run_dir.0.display()))
        .arg("-virtfs")
        .arg(format!("local,path={},mount_tag=icrroot,security_model=none,readonly=on", root.display()));
    if let Some(target) = target_share {
        qemu.arg("-virtfs")
            .arg(format!("local,path={},mount_tag=icrtarget,security_model=none,readonly=on", target.display()));
    }
    qemu.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    // SAFETY: prctl is async-signal-safe. qemu dies with this process, even
    // if it is killed without a chance to kill qemu itself.
    unsafe {
        qemu.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }

    let started = Instant::now();
    let mut child = qemu.spawn().with_context(|| format!("starting {qemu_program}"))?;
    QEMU_PID.store(child.id() as i32, Ordering::SeqCst);
    let _ = ctrlc::set_handler(|| {
        let pid = QEMU_PID.load(Ordering::SeqCst);
        if pid > 0 {
            INTERRUPTED.store(true, Ordering::SeqCst);
            eprintln!("\nxtask: interrupted: stopping qemu");
            // SAFETY: signalling the qemu this process started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });

    // The console, streamed as it comes, and read for the markers.
    let console = Arc::new(Mutex::new(Console::default()));
    let stdout = child.stdout.take().context("qemu's stdout")?;
    let reader = {
        let console = Arc::clone(&console);
        std::thread::spawn(move || {
            let mut stdout_lock = std::io::stdout();
            let mut reader = BufReader::new(stdout);
            let mut buffer = Vec::new();
            while reader.read_until(b'\n', &mut buffer).is_ok_and(|n| n > 0) {
                let line = String::from_utf8_lossy(&buffer).replace('\r', "");
                let _ = stdout_lock.write_all(line.as_bytes());
                let _ = stdout_lock.flush();
                console.lock().expect("console").read_line(&line);
                buffer.clear();
            }
        })
    };

    // The watchdog: qemu is killed past the deadline, or if it does not power
    // off soon after the guest gave its result.
    let timeout = args.timeout.unwrap_or(if accel == Accel::Kvm { KVM_TIMEOUT } else { TCG_TIMEOUT });
    let deadline = Duration::from_secs(timeout);
    let mut killed: Option<String> = None;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let result_at = console.lock().expect("console").result.map(|(at, _)| at);
        if started.elapsed() > deadline {
            killed = Some(format!("the VM ran past the {timeout} s deadline (--timeout)"));
        } else if result_at.is_some_and(|at| at.elapsed() > Duration::from_secs(60)) {
            killed = Some("the VM did not power off within 60 s of its result".into());
        }
        if let Some(why) = &killed {
            eprintln!("\nxtask: watchdog: {why}: killing qemu");
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    QEMU_PID.store(0, Ordering::SeqCst);
    let _ = reader.join();
    let total = started.elapsed();

    let console = console.lock().expect("console");
    let result = fs::read_to_string(run_dir.0.join("result"))
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok())
        .or(console.result.map(|(_, code)| code));
    let boot = console.booted.map(|at| at.duration_since(started));
    let tests_time = match (console.booted, console.result) {
        (Some(booted), Some((done, _))) => Some(done.duration_since(booted)),
        _ => None,
    };
    let seconds = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.0} s", d.as_secs_f64()));
    eprintln!();
    eprintln!(
        "xtask: vm-test {}: kernel {}, {}; boot {}, tests {}, total {:.0} s",
        args.kernel,
        image.release,
        accel.name(),
        seconds(boot),
        seconds(tests_time),
        total.as_secs_f64()
    );
    for (name, code, secs) in &console.binaries {
        let verdict = match code {
            0 => "ok".to_string(),
            124 | 137 => format!("TIMED OUT (exit {code})"),
            _ => format!("FAILED (exit {code})"),
        };
        eprintln!("xtask:   {name:<14} {verdict:<20} {secs} s");
    }
    let ran: Vec<&str> = console.binaries.iter().map(|(name, ..)| name.as_str()).collect();
    for name in guest.names().into_iter().filter(|name| !ran.contains(name)) {
        eprintln!("xtask:   {name:<14} did not finish");
    }
    // The plain closing line: the individual tests of every binary.
    println!(
        "vm-test {}: {} passed, {} failed, {} ignored",
        args.kernel, console.passed, console.failed, console.ignored
    );
    if console.stray_int3 && accel == Accel::Tcg(TcgThreads::Multi) {
        eprintln!(
            "xtask: the guest kernel trapped on a stray int3 (an Oops above): multi-threaded TCG's race with \
             the kernel patching its own code, not the probe; `--tcg-threads single` avoids it"
        );
    }
    if let Some(why) = killed {
        bail!("{why} (kernel {})", image.release);
    }
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    match result {
        Some(0) => Ok(()),
        Some(code) => bail!("tests failed in the {} VM (kernel {}, guest exit {code})", args.kernel, image.release),
        None => bail!(
            "the {} VM stopped ({status}) without a result: see its console above (kernel {})",
            args.kernel,
            image.release
        ),
    }
}
