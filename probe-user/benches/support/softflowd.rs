//! softflowd (Debian's libpcap NetFlow exporter) on the receiving interface,
//! for comparison: started in the foreground in the receiver's namespace,
//! exporting NetFlow v5 to a UDP sink there, and always killed (`Drop`).
use std::{
    net::UdpSocket,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use icr_test_kit::netns;

const EXPORT_PORT: u16 = 9995;

pub struct Softflowd {
    child: Child,
    ctl: PathBuf,
    pid_file: PathBuf,
    pub command_line: String,
    stop: Arc<AtomicBool>,
    sink: Option<JoinHandle<()>>,
    /// NetFlow datagrams the sink received.
    pub exported: Arc<AtomicU64>,
}

impl Softflowd {
    pub fn start(ns: &str, interface: &str) -> Result<Self> {
        let pid = std::process::id();
        let ctl = PathBuf::from(format!("/run/icrb-softflowd-{pid}.ctl"));
        let pid_file = PathBuf::from(format!("/run/icrb-softflowd-{pid}.pid"));
        let _ = std::fs::remove_file(&ctl);
        // The collector: a UDP socket in the receiver's namespace, so the
        // export is real (and counted) rather than refused.
        let (stop, exported) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let socket =
            netns::in_netns(ns, || UdpSocket::bind(("127.0.0.1", EXPORT_PORT)))?.context("binding the NetFlow sink")?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let sink = {
            let (stop, exported) = (stop.clone(), exported.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if socket.recv(&mut buf).is_ok() {
                        exported.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        // -d: stay in the foreground; -m: track as many flows as the probe's
        // default table holds, so neither side evicts flows early.
        let args = [
            "-d",
            "-i",
            interface,
            "-m",
            "1048576",
            "-n",
            &format!("127.0.0.1:{EXPORT_PORT}"),
            "-c",
            &ctl.to_string_lossy(),
            "-p",
            &pid_file.to_string_lossy(),
        ]
        .map(String::from);
        let command_line = format!("softflowd {}", args.join(" "));
        // `ip netns exec` execs softflowd in place: the child is softflowd.
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "softflowd"])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting softflowd (apt-get install softflowd; `cargo xtask bench` installs it)")?;
        let mut this = Self { child, ctl, pid_file, command_line, stop, sink: Some(sink), exported };
        // Ready when its control socket exists (it opened the capture first).
        let deadline = Instant::now() + Duration::from_secs(5);
        while !this.ctl.exists() {
            if let Some(status) = this.child.try_wait()? {
                bail!("softflowd exited at start: {status}");
            }
            if Instant::now() > deadline {
                bail!("softflowd did not start within 5 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", this.child.id())).unwrap_or_default();
        if comm.trim() != "softflowd" {
            bail!("expected softflowd as pid {}, found {comm:?}", this.child.id());
        }
        Ok(this)
    }

    /// utime+stime of softflowd so far.
    pub fn cpu(&self) -> Result<Duration> {
        process_cpu(self.child.id())
    }

    /// softflowctl's statistics: (packets processed, packets dropped by pcap).
    pub fn statistics(&self) -> Result<(u64, u64, String)> {
        let out = Command::new("softflowctl").args(["-c", &self.ctl.to_string_lossy(), "statistics"]).output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // "Packets processed: N" and "Packets dropped by libpcap: N"
        let number = |label: &str| -> u64 {
            text.lines()
                .find_map(|line| line.split_once(label).map(|(_, rest)| rest.trim()))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        let (processed, dropped) = (number("Packets processed:"), number("Packets dropped by libpcap:"));
        Ok((processed, dropped, text))
    }
}

impl Drop for Softflowd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sink) = self.sink.take() {
            let _ = sink.join();
        }
        let _ = std::fs::remove_file(&self.ctl);
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

/// utime+stime of process `pid` (from /proc/PID/stat).
pub fn process_cpu(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let utime: u64 = fields[11].parse()?;
    let stime: u64 = fields[12].parse()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(Duration::from_secs_f64((utime + stime) as f64 / ticks))
}
