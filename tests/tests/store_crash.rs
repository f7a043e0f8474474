//! Durability: a writer appending to the store is killed (SIGKILL) at random
//! moments, mid-append, mid-seal, mid-flush, many times over; after each
//! crash the store must open, and at the end every record the writer had
//! acknowledged must be there exactly once.
use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use icr::store::Store;
use icr_lab::TempDir;

const CRASHES: u64 = 25;

#[test]
fn no_acknowledged_record_is_lost_or_doubled_by_kill_9() {
    let dir = TempDir::new("icr-store-crash");
    let db = dir.path().join("store");
    let mut acknowledged: Vec<String> = Vec::new();
    let mut seed = 0u64;
    for crash in 0..=CRASHES {
        seed += 1;
        // Batches cross block boundaries (4,096) at varying points.
        let batch = 500 + (seed * 337) % 3000;
        let mut child = Command::new(env!("CARGO_BIN_EXE_store-ingest"))
            .args([db.to_str().unwrap(), &seed.to_string(), "40", &batch.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting store-ingest");
        let stdout = child.stdout.take().unwrap();
        let (lines_tx, lines_rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        // The last run is not killed: it must finish cleanly.
        let deadline = if crash < CRASHES {
            Instant::now() + Duration::from_millis(100 + (seed * 7919) % 900)
        } else {
            Instant::now() + Duration::from_secs(120)
        };
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if crash < CRASHES {
            let _ = child.kill();
        }
        let status = child.wait().unwrap();
        reader.join().unwrap();
        // A line is an acknowledgement only when whole (36 characters, a UUID).
        let lines: Vec<String> = lines_rx.try_iter().filter(|l| l.len() == 36).collect();
        if crash == CRASHES {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            assert!(status.success(), "the last run failed: {stderr}");
        }
        acknowledged.extend(lines);
    }
    assert!(acknowledged.len() > 100_000, "too few records were written to test anything: {}", acknowledged.len());

    let store = Store::open(&db).expect("the store opens after the crashes");
    let from = chrono::DateTime::from_timestamp(0, 0).unwrap();
    let to = chrono::DateTime::from_timestamp(4_000_000_000, 0).unwrap();
    let records = store.scan(from, to).unwrap();
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for record in &records {
        *copies.entry(record.id.as_str()).or_default() += 1;
    }
    let doubled = copies.values().filter(|n| **n > 1).count();
    let missing: Vec<&String> = acknowledged.iter().filter(|id| !copies.contains_key(id.as_str())).collect();
    eprintln!(
        "{} crashes: {} records acknowledged, {} stored ({} written but not yet acknowledged when killed)",
        CRASHES,
        acknowledged.len(),
        records.len(),
        records.len() - acknowledged.len().min(records.len())
    );
    assert_eq!(doubled, 0, "records stored twice");
    assert!(
        missing.is_empty(),
        "{} acknowledged records missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
}

/// `icr list --format ndjson` on `db`: the records' ids, and stderr.
fn list_ids(db: &std::path::Path) -> (Vec<String>, String) {
    let out = icr_lab::icr_list(db, "ndjson", None);
    assert!(out.status.success(), "icr list: {}", String::from_utf8_lossy(&out.stderr));
    let ids = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["id"].as_str().unwrap().to_owned())
        .collect();
    (ids, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// One byte flipped in the first of three frames of a day's open-block log
/// (300 acknowledged records): a question answers the other 200 and warns
/// of the damage without changing the log; the agent's next open keeps the
/// damaged frame aside, byte for byte, and the warning stays.
#[test]
fn a_damaged_log_frame_costs_its_own_records_and_is_reported() {
    let dir = TempDir::new("icr-store-damage");
    let db = dir.path().join("store");
    let out = Command::new(env!("CARGO_BIN_EXE_store-ingest")).arg(&db).args(["7", "3", "100"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(written.len(), 300);
    let logs: Vec<_> = std::fs::read_dir(db.join("open-blocks")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(logs.len(), 1, "one day's log: {logs:?}");
    let mut bytes = std::fs::read(&logs[0]).unwrap();
    // The 12-byte log header, the first frame's 8-byte header, then its records.
    bytes[12 + 8 + 30] ^= 0x01;
    std::fs::write(&logs[0], &bytes).unwrap();

    let sorted = |mut ids: Vec<String>| {
        ids.sort();
        ids
    };
    let expected = sorted(written[100..].to_vec());
    let (ids, warnings) = list_ids(&db);
    assert_eq!(sorted(ids), expected, "the second and third frames' records, and only those");
    assert!(warnings.contains("store: a day's open-block log"), "the answer warns of the damage: {warnings}");
    assert_eq!(std::fs::read(&logs[0]).unwrap(), bytes, "a question changes no byte of the log");

    // The agent's open (here: a sweep's) keeps the damage aside.
    let sweep = Command::new(icr_lab::icr_binary()).args(["sweep", "--db"]).arg(&db).output().unwrap();
    assert!(sweep.status.success(), "{}", String::from_utf8_lossy(&sweep.stderr));
    let kept: Vec<_> =
        std::fs::read_dir(db.join("open-blocks/quarantine")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let frame_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    assert_eq!(std::fs::read(&kept[0]).unwrap(), bytes[12..12 + 8 + frame_len], "the damaged frame, byte for byte");
    let (ids, warnings) = list_ids(&db);
    assert_eq!(sorted(ids), expected);
    assert!(warnings.contains("store: a day's open-block log"), "recorded, the gap is still reported: {warnings}");
}
