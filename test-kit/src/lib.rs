//! The test kit: what the tests, the benches and the lab share, written
//! once. Network namespaces ([`netns`]), a `clickhouse-server` of one's own
//! ([`clickhouse`]), stores and their configuration ([`config`]), and with
//! the `icr` feature records on the agent's own types: a synthetic stream
//! ([`synthetic`]) and samples ([`samples`]).
//!
//! A dev-dependency only: the product `icr` never links it.

pub mod clickhouse;
pub mod config;
pub mod netns;
#[cfg(feature = "icr")]
pub mod samples;
#[cfg(feature = "icr")]
pub mod synthetic;

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

/// How long to wait for something a test starts: `base`, times
/// `ICR_LAB_SLOWDOWN` when set (`cargo xtask vm-test` sets 4 under software
/// emulation, where everything runs several times slower).
pub fn patience(base: Duration) -> Duration {
    let factor =
        std::env::var("ICR_LAB_SLOWDOWN").ok().and_then(|f| f.parse::<f64>().ok()).filter(|f| *f >= 1.0).unwrap_or(1.0);
    base.mul_f64(factor)
}

/// Polls `ready` every 50 ms until it says yes, at most `limit`.
pub fn wait_for(limit: Duration, what: &str, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
    let started = Instant::now();
    loop {
        if ready()? {
            return Ok(());
        }
        if started.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A directory of its own under the system's temporary directory, removed
/// (with everything in it) when dropped, also when a test fails.
pub struct TempDir(PathBuf);

impl TempDir {
    /// `<tmp>/<name>-<pid>-<n>`: unique within this process and across runs.
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{name}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir); // left by a killed run with the same pid
        fs::create_dir_all(&dir).unwrap_or_else(|error| panic!("creating {}: {error}", dir.display()));
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
