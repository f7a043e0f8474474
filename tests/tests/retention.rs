//! Retention holds on reads: nothing older than `retention_days` is
//! returned, whether or not a sweep has run; and every sweep is audited.
use std::process::Command;

use icr_lab::{TempDir, icr_binary};

fn icr(args: &[&str], db: &std::path::Path) -> std::process::Output {
    Command::new(icr_binary()).args(args).arg("--db").arg(db).output().expect("running icr")
}

fn listed(db: &std::path::Path) -> usize {
    let out = icr_lab::icr_list(db, "ndjson", None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn set_retention(db: &std::path::Path, days: u32) {
    std::fs::write(db.join("icr.toml"), format!("retention_days = {days}\n")).unwrap();
}

#[test]
fn records_past_retention_are_not_returned_before_a_sweep_and_sweeps_are_audited() {
    let dir = TempDir::new("icr-retention");
    let db = dir.path().join("store");
    // 200 records of ten days ago.
    let out = Command::new(env!("CARGO_BIN_EXE_store-ingest")).arg(&db).args(["5", "2", "100", "10"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    set_retention(&db, 30);
    assert_eq!(listed(&db), 200, "within 30 days");
    set_retention(&db, 5);
    assert_eq!(listed(&db), 0, "past 5 days: not returned, though no sweep has run");

    let sweep = icr(&["sweep"], &db);
    assert!(sweep.status.success(), "{}", String::from_utf8_lossy(&sweep.stderr));
    let audit = std::fs::read_to_string(db.join("audit.log")).unwrap();
    let sweeps: Vec<&str> = audit.lines().filter(|line| line.contains("\"command\":\"sweep\"")).collect();
    assert_eq!(sweeps.len(), 1, "the sweep is audited: {audit}");
    assert!(sweeps[0].contains("\"retention_days\":5") && sweeps[0].contains("dropped 1 day(s)"), "{}", sweeps[0]);
    set_retention(&db, 30);
    assert_eq!(listed(&db), 0, "swept: gone for good");
    let verify = Command::new(icr_binary()).args(["audit", "verify", "--db"]).arg(&db).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
}
