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
/// process runs or starts can take it back. Call it while the process has
/// one thread. A capability not held is no error.
pub fn drop_after_setup() -> Result<(), DropError> {
    let capability = DROPPED_AFTER_SETUP;
    for set in [CapSet::Ambient, CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        caps::drop(None, set, capability).map_err(|source| DropError { capability, set, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a thread of its own (capabilities are a thread's): afterwards the
    /// capability is in none of the four sets, whether it was held or not.
    #[test]
    fn drops_sys_admin_from_every_set() {
        std::thread::spawn(|| {
            drop_after_setup().unwrap();
            for set in [CapSet::Ambient, CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
                assert!(!caps::has_cap(None, set, Capability::CAP_SYS_ADMIN).unwrap(), "{set:?}");
            }
        })
        .join()
        .unwrap();
    }
}
