//! The agent's capabilities after its setup. `CAP_SYS_ADMIN` is needed for
//! one thing only: on kernels without BPF ring buffers the events come
//! through per-CPU perf buffers, and Debian's kernels (and Ubuntu's) refuse
//! `perf_event_open` without `CAP_SYS_ADMIN` at their default
//! `kernel.perf_event_paranoid` of 3 (`CAP_PERFMON` is not enough there).
//! Once the buffers are open nothing needs it: it is dropped before the
//! first packet is read, and before any thread exists to keep it
//! (capabilities are a thread's, and threads inherit their creator's).
use caps::{CapSet, Capability, errors::CapsError};

/// What is dropped after the setup: not needed once the event buffers are
/// open and the programs attached.
pub const DROPPED_AFTER_SETUP: Capability = Capability::CAP_SYS_ADMIN;

#[derive(Debug, thiserror::Error)]
#[error("dropping {capability} from the {set:?} capabilities: {source}")]
pub struct DropError {
    capability: Capability,
    set: CapSet,
    source: CapsError,
}

/// Drops `CAP_SYS_ADMIN` from the calling thread's ambient, inheritable,
/// effective and permitted sets (in that order: a capability leaves the
/// ambient set before it can leave the others), so that nothing this
/// thread runs or starts can take it back. Call it while no other thread
/// holds it (see `without_admin`). A capability not held is no error.
pub fn drop_after_setup() -> Result<(), DropError> {
    let capability = DROPPED_AFTER_SETUP;
    for set in [CapSet::Ambient, CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        caps::drop(None, set, capability).map_err(|source| DropError { capability, set, source })?;
    }
    Ok(())
}

/// Runs `work` on a thread of its own that has dropped `CAP_SYS_ADMIN`
/// first, so that the threads `work` starts (the store's flusher) never
/// hold it, while the calling thread keeps it for the setup.
pub fn without_admin<T: Send>(work: impl FnOnce() -> T + Send) -> Result<T, DropError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                drop_after_setup()?;
                Ok(work())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holds_admin() -> bool {
        [CapSet::Ambient, CapSet::Inheritable, CapSet::Effective, CapSet::Permitted]
            .into_iter()
            .any(|set| caps::has_cap(None, set, Capability::CAP_SYS_ADMIN).unwrap())
    }

    /// A thread started by `without_admin`'s work holds CAP_SYS_ADMIN in
    /// none of the four sets, whether the caller held it or not; the
    /// caller's own sets are untouched.
    #[test]
    fn threads_started_without_admin_do_not_hold_it() {
        let before = holds_admin();
        let started = without_admin(|| std::thread::spawn(holds_admin).join().unwrap()).unwrap();
        assert!(!started);
        assert_eq!(holds_admin(), before);
    }
}
