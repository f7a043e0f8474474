//! Kernel time to UTC. The XDP program stamps packets with the monotonic
//! clock (`bpf_ktime_get_ns`); records carry UTC. While replaying a capture
//! the program is given capture times, which are already UTC.
use chrono::{DateTime, Utc};

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// UTC ns minus kernel ns.
    offset_ns: i128,
    live: bool,
}

impl Clock {
    /// For packets stamped by the kernel: measures the monotonic clock's
    /// offset from UTC now.
    pub fn live() -> Self {
        let offset_ns = i128::from(read(libc::CLOCK_REALTIME)) - i128::from(monotonic_ns());
        Self { offset_ns, live: true }
    }

    /// For packets stamped with capture times (ns since the Unix epoch).
    pub fn capture() -> Self {
        Self { offset_ns: 0, live: false }
    }

    pub fn to_utc(&self, kernel_ns: u64) -> DateTime<Utc> {
        let utc_ns = i128::from(kernel_ns) + self.offset_ns;
        let utc_ns = i64::try_from(utc_ns).unwrap_or(i64::MAX);
        DateTime::from_timestamp_nanos(utc_ns)
    }

    /// Kernel time now (live clocks only; a capture clock has no "now").
    pub fn now_ns(&self) -> Option<u64> {
        self.live.then(monotonic_ns)
    }
}

/// `CLOCK_MONOTONIC` in ns, the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC)
}

fn read(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid clock id and pointer; these clocks cannot fail.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_clock_maps_now_to_now() {
        let clock = Clock::live();
        let now = clock.to_utc(clock.now_ns().unwrap());
        let drift = (Utc::now() - now).num_milliseconds().abs();
        assert!(drift < 1000, "drift {drift} ms");
    }

    #[test]
    fn capture_clock_is_unix_time() {
        let clock = Clock::capture();
        assert_eq!(clock.to_utc(1_700_000_000_123_456_000).to_rfc3339(), "2023-11-14T22:13:20.123456+00:00");
        assert_eq!(clock.now_ns(), None);
    }
}
