//! The store's files: its lock, sled's database, and private modes.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

/// The store is held by another process: the running agent, whose socket
/// answers instead.
#[derive(Debug, thiserror::Error)]
#[error("the store {} is in use by another process (a running agent?)", .0.display())]
pub struct StoreInUse(pub PathBuf);

/// Why a store did not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    InUse(#[from] StoreInUse),
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

/// Opens sled's database under the store's lock. sled's own file lock
/// outlives a close in this process by a moment (its flusher thread), so an
/// I/O error is tried again briefly: no other process can hold the store.
pub(super) fn open_sled(path: &Path, cache_bytes: u64) -> Result<sled::Db> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match sled::Config::new().path(path).cache_capacity(cache_bytes).open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(error) => return Err(error).with_context(|| format!("opening the store {}", path.display())),
        }
    }
}

/// Takes the store's lock, or says it is in use (by the errno of a
/// non-blocking exclusive `flock`).
pub(super) fn lock_store(dir: &Path) -> Result<std::fs::File, OpenError> {
    use std::os::fd::AsRawFd as _;
    let path = dir.join("icr.lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening the store's lock {}", path.display()))?;
    // SAFETY: a valid fd, which the returned file owns (the lock goes with it).
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = std::io::Error::last_os_error();
        if error.kind() == std::io::ErrorKind::WouldBlock {
            return Err(StoreInUse(dir.to_path_buf()).into());
        }
        return Err(anyhow::Error::new(error).context(format!("locking {}", path.display())).into());
    }
    Ok(file)
}

/// Makes `dir` and everything under it readable by its owner (root) only:
/// directories 0700, files 0600. Stores made before this, or by a process
/// with a looser umask, are fixed when the agent opens them.
pub(super) fn make_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let metadata = std::fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mode = if metadata.is_dir() { 0o700 } else { 0o600 };
    if metadata.file_type().is_symlink() {
        return Ok(()); // not followed: what it points to is not the store's
    }
    if metadata.permissions().mode() & 0o777 != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("making {} private", dir.display()))?;
    }
    if metadata.is_dir() {
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            make_private(&entry?.path())?;
        }
    }
    Ok(())
}

/// Replaces `path` by `bytes`, atomically and durably, readable by its
/// owner only, and never through a link left in its place (root may be the
/// writer: it writes only the store's own file).
pub(super) fn replace_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temporary)
        .with_context(|| format!("creating {}", temporary.display()))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("renaming {} into place", temporary.display()))?;
    sync_parent(path)
}

/// Makes a file's creation, renaming or removal durable.
pub(super) fn sync_parent(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))
}

pub(super) fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(error).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}
