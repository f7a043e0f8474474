//! Kernel time to UTC. The XDP program stamps packets with the monotonic
//! clock (`bpf_ktime_get_ns`); records carry UTC. While replaying a capture
//! the program is given capture times, which are already UTC.
use chrono::{DateTime, TimeDelta, Utc};

/// A smaller change in the offset is the time between its two clock reads,
/// not a step of the wall clock.
const STEP_NS: i128 = 1_000_000;

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
        Self { offset_ns: live_offset_ns().0, live: true }
    }

    /// Measures a live clock's offset again; returns the step when the wall
    /// clock moved. It can step while the agent runs: a gateway without a
    /// real-time clock boots in 1970 or at its last shutdown, and its first
    /// NTP sync moves it. Records converted afterwards carry the new time.
    pub fn resync(&mut self) -> Option<TimeDelta> {
        if !self.live {
            return None;
        }
        let (offset_ns, error_ns) = live_offset_ns();
        // Too uncertain to tell a step from the error: the next call looks again.
        if i128::from(error_ns) >= STEP_NS / 4 {
            return None;
        }
        self.step_to(offset_ns)
    }

    fn step_to(&mut self, offset_ns: i128) -> Option<TimeDelta> {
        let step_ns = offset_ns - self.offset_ns;
        if step_ns.abs() < STEP_NS {
            return None;
        }
        self.offset_ns = offset_ns;
        let step_ns = i64::try_from(step_ns).unwrap_or(if step_ns < 0 { i64::MIN } else { i64::MAX });
        Some(TimeDelta::nanoseconds(step_ns))
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

/// UTC minus kernel time now, and how far off that may be. The wall-clock
/// read is bracketed by kernel-time reads and retried when the bracket is
/// wide, so a preemption between the reads is not taken for a clock step.
fn live_offset_ns() -> (i128, u64) {
    let mut best = (0, u64::MAX);
    for _ in 0..5 {
        let before = monotonic_ns();
        let utc = read(libc::CLOCK_REALTIME);
        let width = monotonic_ns().saturating_sub(before);
        if width < best.1 {
            best = (i128::from(utc) - i128::from(before + width / 2), width / 2);
        }
        if best.1 < 10_000 {
            break;
        }
    }
    best
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
    fn a_wall_clock_step_moves_later_conversions_and_jitter_does_not() {
        let mut clock = Clock::live();
        assert_eq!(clock.resync(), None, "no step between two reads");
        // As if the agent had started before NTP moved the clock 90 days on.
        let kernel_ns = clock.now_ns().unwrap();
        let before = clock.to_utc(kernel_ns);
        let ninety_days = TimeDelta::days(90);
        clock.offset_ns -= i128::from(ninety_days.num_nanoseconds().unwrap());
        let step = clock.resync().expect("the step is seen");
        assert!((step - ninety_days).num_milliseconds().abs() < 1000, "step {step}");
        let after = clock.to_utc(kernel_ns);
        assert!((after - before).num_milliseconds().abs() < 1000, "dated {after}, not {before}");
        assert_eq!(clock.step_to(clock.offset_ns + STEP_NS - 1), None, "sub-millisecond jitter is ignored");
        assert_eq!(clock.step_to(clock.offset_ns - STEP_NS), Some(TimeDelta::milliseconds(-1)), "a step back");
    }

    #[test]
    fn a_capture_clock_never_steps() {
        let mut clock = Clock::capture();
        assert_eq!(clock.resync(), None);
        assert_eq!(clock.to_utc(0), DateTime::UNIX_EPOCH);
    }

    #[test]
    fn capture_clock_is_unix_time() {
        let clock = Clock::capture();
        assert_eq!(clock.to_utc(1_700_000_000_123_456_000).to_rfc3339(), "2023-11-14T22:13:20.123456+00:00");
        assert_eq!(clock.now_ns(), None);
    }
}
