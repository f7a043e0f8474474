//! Which configuration governs a store: the file its agent ran with,
//! recorded when the agent opens the store for writing, so that questions
//! asked after the agent stops are authorised by that same file. Only a
//! writer records it ([`super::Store::govern`]); whoever merely asks never
//! does. No record: the store's own `DIR/icr.toml` governs.
use std::{
    ffi::OsStr,
    fs,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use super::files::{replace_private, sync_parent};

/// `DIR/governing-config`: the absolute path of the configuration, on one
/// line.
const FILE: &str = "governing-config";

/// The configuration the store in `dir` remembers, if any. Read without
/// opening the store, so that it can be found while an agent holds it.
pub fn remembered(dir: &Path) -> Result<Option<PathBuf>> {
    let path = dir.join(FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    };
    let line = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    let config = PathBuf::from(OsStr::from_bytes(line));
    if !config.is_absolute() || line.contains(&b'\n') || line.contains(&0) {
        bail!("{} is damaged: it must hold the absolute path of a configuration file", path.display());
    }
    Ok(Some(config))
}

/// Records that `config` (an absolute path; `None`: the store's own
/// `DIR/icr.toml`) governs the store in `dir`, atomically and durably.
pub(super) fn remember(dir: &Path, config: Option<&Path>) -> Result<()> {
    let path = dir.join(FILE);
    let Some(config) = config else {
        return match fs::remove_file(&path) {
            Ok(()) => sync_parent(&path),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(error).with_context(|| format!("removing {}", path.display())),
        };
    };
    let bytes = config.as_os_str().as_bytes();
    if !config.is_absolute() || bytes.contains(&b'\n') {
        bail!("{} cannot be recorded as the store's configuration: not an absolute path on one line", config.display());
    }
    replace_private(&path, &[bytes, b"\n"].concat())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::store::Store;

    #[test]
    fn only_a_writer_records_the_configuration_and_a_reader_cannot() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (Path::new("/etc/icr/icr.toml"), Path::new("/etc/icr/next.toml"));
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.govern(Some(first)).unwrap(), None);
            assert_eq!(store.govern(Some(second)).unwrap().as_deref(), Some(first));
        }
        assert_eq!(super::remembered(dir.path()).unwrap().as_deref(), Some(second));
        {
            let reader = Store::open_read_only(dir.path()).unwrap();
            let refused = format!("{:#}", reader.govern(Some(first)).unwrap_err());
            assert!(refused.contains("open for questions only"), "{refused}");
        }
        assert_eq!(super::remembered(dir.path()).unwrap().as_deref(), Some(second));
        // Back to the store's own file: nothing recorded.
        Store::open(dir.path()).unwrap().govern(None).unwrap();
        assert_eq!(super::remembered(dir.path()).unwrap(), None);
        // A relative path is never recorded, nor read back.
        assert!(Store::open(dir.path()).unwrap().govern(Some(Path::new("icr.toml"))).is_err());
        std::fs::write(dir.path().join(super::FILE), "icr.toml\n").unwrap();
        assert!(format!("{:#}", super::remembered(dir.path()).unwrap_err()).contains("is damaged"));
    }
}
