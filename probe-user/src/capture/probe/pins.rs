//! Pinning on bpffs: where the maps and links of a probe that outlives its
//! agent are kept, so the next agent adopts them without a gap.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use log::warn;

/// Whether maps and links can be pinned in `dir`: it must be on a BPF file
/// system (bpffs). When it is not (bpffs not mounted at /sys/fs/bpf, or the
/// agent runs under `ip netns exec`, whose fresh sysfs hides the mount), the
/// agent runs unpinned and says so: it records as before, but its maps and
/// links die with it, so a restart leaves a gap.
#[allow(clippy::unnecessary_cast)] // BPF_FS_MAGIC is a c_long: i64 on 64-bit targets only
pub(super) fn pinning_possible(dir: &Path) -> bool {
    match file_system_of(dir) {
        Some(magic) if magic == libc::BPF_FS_MAGIC as i64 => true,
        found => {
            let found = match found {
                Some(magic) => format!("file system magic {magic:#x}"),
                None => "no existing directory".into(),
            };
            warn!(
                "pin_dir {} is not on a BPF file system (bpffs is not mounted there: {found}; \
                 `mount -t bpf bpf /sys/fs/bpf`): the maps and XDP links are not pinned, so they \
                 end with the agent and a restart will leave a gap in counting",
                dir.display()
            );
            false
        }
    }
}

/// `statfs`'s magic number of the file system holding `dir`, or of its
/// nearest existing ancestor.
pub(super) fn file_system_of(dir: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let existing = dir.ancestors().find(|path| path.is_dir())?;
    let path = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    // SAFETY: a NUL-terminated path and a zeroed statfs for the kernel to fill.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)]
    Some(stat.f_type as i64)
}

/// Removes what a pin directory holds: the pinned links (which detaches the
/// XDP programs) and maps. For `icr detach`.
pub fn unpin(dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    if !dir.exists() {
        return Ok(removed);
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        removed.push(path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(removed)
}

pub(super) fn link_pin_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("link-{interface}"))
}

pub(super) fn egress_link_pin_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("link-{interface}-egress"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_dir_off_bpffs_is_not_used() {
        // /tmp is no bpffs (tmpfs or the root file system).
        let dir = std::env::temp_dir().join("icr-probe-test-no-bpffs/pins");
        assert!(!pinning_possible(&dir));
        assert!(file_system_of(&dir).is_some(), "an existing ancestor was found");
    }
}
