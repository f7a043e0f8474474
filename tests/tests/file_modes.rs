//! The store, its logs, the audit log and disclosure bundles are readable by
//! root alone (directories 0700, files 0600), whatever the umask `icr` was
//! started with.
use std::{
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::Path,
    process::Command,
};

use icr_lab::{TempDir, icr_binary};
use icr_test_kit::config::POLICE;

/// `program` as a user with umask 022 would start it.
fn with_umask_022(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    // SAFETY: umask is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    command
}

/// Every path under `dir` (itself included) whose mode is not 0700 for a
/// directory or 0600 for a file.
fn not_private(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let metadata = std::fs::symlink_metadata(dir).unwrap();
    let mode = metadata.permissions().mode() & 0o777;
    let wanted = if metadata.is_dir() { 0o700 } else { 0o600 };
    if mode != wanted && !metadata.file_type().is_symlink() {
        found.push(format!("{} {mode:o}", dir.display()));
    }
    if metadata.is_dir() {
        for entry in std::fs::read_dir(dir).unwrap() {
            found.extend(not_private(&entry.unwrap().path()));
        }
    }
    found
}

#[test]
fn the_store_audit_log_and_bundles_are_private_whatever_the_umask() {
    let dir = TempDir::new("icr-file-modes");
    let db = dir.path().join("store");
    // A store written with umask 022 by another program (as by an older icr).
    let out = with_umask_022(env!("CARGO_BIN_EXE_store-ingest")).arg(&db).args(["3", "2", "50"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(db.join("icr.toml"), POLICE).unwrap();
    assert!(!not_private(&db).is_empty(), "the writer left files others may read");

    // The agent's open (a sweep's here) makes the whole store private.
    let sweep = with_umask_022(icr_binary()).args(["sweep", "--db"]).arg(&db).output().unwrap();
    assert!(sweep.status.success(), "{}", String::from_utf8_lossy(&sweep.stderr));
    assert_eq!(not_private(&db), Vec::<String>::new());

    // A question on a new store: the store, the audit log and the bundle.
    let fresh = dir.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(fresh.join("icr.toml"), POLICE).unwrap();
    std::fs::set_permissions(fresh.join("icr.toml"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let bundle = dir.path().join("bundle");
    let query = with_umask_022(icr_binary())
        .args(["query", "resolve", "--ip", "203.0.113.1", "--at", "2026-11-22T15:00:00Z", "--db"])
        .arg(&fresh)
        .args(["--authority", "met", "--officer", "PC 1", "--reference", "OP-1", "--format", "ndjson", "--bundle"])
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(query.status.success(), "{}", String::from_utf8_lossy(&query.stderr));
    assert!(fresh.join("audit.log").exists() && bundle.exists());
    assert_eq!(not_private(&fresh), Vec::<String>::new());
    assert_eq!(not_private(&bundle), Vec::<String>::new());
}
