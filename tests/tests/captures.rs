//! `icr replay` on third-party captures (Zeek's and Suricata's test traces,
//! in `tests/captures`): the service names it recovers, per protocol,
//! against what tshark dissects from the same files. A name tshark does not
//! see is a false name and fails the test; recall must not fall below what
//! the probe achieved when this test was written (the misses are listed in
//! the output: tunnels, three VLAN tags, non-standard DNS ports, SSDP).
//!
//! The captures are replayed in this process by `icr replay`'s own code
//! (`icr::capture::replay::Replayer`, serialised by `icr::export::ndjson`), with one
//! probe load per thread rather than one per file: loading (the verifier)
//! is most of a short replay's time, tens of seconds under emulation (a VM
//! without KVM). The `icr replay` command itself is run on the last file with
//! records of each thread, and must print the same records: that proves both the
//! command and that a reused probe starts each file afresh.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use icr::{capture::probe::ProbeOptions, capture::replay::Replayer, config::Config, export};
use icr_lab::icr_binary;
use serde_json::Value;

fn captures_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("captures");
    assert!(dir.join("MANIFEST.tsv").exists(), "the test captures are missing at {}", dir.display());
    dir
}

/// Kinds compared: (record source, MANIFEST column of tshark's names).
const KINDS: [(&str, &str); 4] = [
    ("tls_sni", "tshark_tls_sni"),
    ("quic_sni", "tshark_quic_sni"),
    ("http_host", "tshark_http_hosts"),
    ("dns", "tshark_dns_qnames"),
];
/// Names recovered when this test was written (of 54, 25, 33, 115); DNS
/// went from 104 to 107 when records kept every question of a flow.
const FLOOR: [usize; 4] = [54, 25, 29, 107];

#[test]
fn replayed_names_agree_with_tshark() {
    let dir = captures_dir();
    let manifest = std::fs::read_to_string(dir.join("MANIFEST.tsv")).unwrap();
    let mut lines = manifest.lines();
    let header: Vec<&str> = lines.next().unwrap().split('\t').collect();
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (mut expected, mut recovered, mut false_names) = ([0usize; 4], [0usize; 4], Vec::new());
    let mut report = Vec::new();
    let mut replayed = 0;

    // Two threads, each with its own probe loaded once for its half.
    let rows: Vec<&str> = lines.collect();
    let outputs: Vec<(Vec<&str>, String)> = std::thread::scope(|scope| {
        let halves: Vec<_> = rows
            .chunks(rows.len().div_ceil(2))
            .map(|half| {
                let dir = &dir;
                let column = &column;
                scope.spawn(move || {
                    let config = Config::default();
                    // As `icr replay` loads it.
                    let options = ProbeOptions { pin_dir: None, ..config.probe.probe_options() };
                    let mut replayer = Replayer::load(options).expect("loading the probe");
                    let outputs: Vec<_> = half
                        .iter()
                        .map(|line| {
                            let fields: Vec<&str> = line.split('\t').collect();
                            let file = fields[column("file")];
                            let mut out = Vec::new();
                            replayer
                                .replay(&dir.join(file), config.flow_timeouts(), |records| {
                                    out.extend(export::ndjson(&records)?);
                                    Ok(())
                                })
                                .unwrap_or_else(|error| panic!("replaying {file} failed: {error:#}"));
                            (fields, String::from_utf8(out).expect("NDJSON is UTF-8"))
                        })
                        .collect();
                    // The last file with records: replayed after many others by the same probe.
                    let (fields, in_process) =
                        outputs.iter().rev().find(|(_, records)| !records.is_empty()).expect("a half has records");
                    let file = fields[column("file")];
                    assert_same_records(&dir.join(file), in_process, &replay_command(&dir.join(file)));
                    outputs
                })
            })
            .collect();
        halves.into_iter().flat_map(|h| h.join().expect("a replay thread panicked")).collect()
    });

    for (fields, stdout) in outputs {
        let file = fields[column("file")];
        replayed += 1;
        let mut names: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for record in stdout.lines() {
            let record: Value = serde_json::from_str(record).expect("NDJSON");
            if let (Some(source), Some(name)) =
                (record["service"]["source"].as_str(), record["service"]["name"].as_str())
            {
                let kind = KINDS.iter().find(|(k, _)| *k == source).map(|(k, _)| *k);
                if let Some(kind) = kind {
                    names.entry(kind).or_default().insert(name.to_string());
                }
            }
            // Every question of the flow, not only its first (`dns`).
            for exchange in record["dns_all"].as_array().into_iter().flatten() {
                if let Some(qname) = exchange["qname"].as_str() {
                    names.entry("dns").or_default().insert(qname.to_string());
                }
            }
        }
        for (i, (kind, tshark_column)) in KINDS.iter().enumerate() {
            let want: BTreeSet<String> = fields[column(tshark_column)]
                .split(';')
                .filter(|v| !v.is_empty())
                .map(|v| v.trim_end_matches('.').to_ascii_lowercase())
                .collect();
            let got = names.remove(kind).unwrap_or_default();
            expected[i] += want.len();
            recovered[i] += want.intersection(&got).count();
            let missing: Vec<&String> = want.difference(&got).collect();
            for extra in got.difference(&want) {
                false_names.push(format!("{file}: {kind} {extra}"));
            }
            if !missing.is_empty() {
                report.push(format!("  {file}: {kind} not recovered: {missing:?}"));
            }
        }
    }

    println!("replayed {replayed} captures; names recovered / named by tshark:");
    for (i, (kind, _)) in KINDS.iter().enumerate() {
        println!("  {kind:9} {:3} / {:3}", recovered[i], expected[i]);
    }
    println!("{}", report.join("\n"));
    assert!(replayed >= 100, "the MANIFEST lists over 100 captures");
    assert!(false_names.is_empty(), "names tshark does not see: {false_names:#?}");
    for (i, (kind, _)) in KINDS.iter().enumerate() {
        assert!(recovered[i] >= FLOOR[i], "{kind}: {} recovered, fewer than {}", recovered[i], FLOOR[i]);
    }
}

/// `icr replay FILE`'s standard output.
fn replay_command(file: &Path) -> String {
    let out = Command::new(icr_binary()).arg("replay").arg(file).output().unwrap();
    assert!(out.status.success(), "icr replay {} failed: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("NDJSON is UTF-8")
}

/// The same records, in any order, but for their `id` (new at each replay)
/// and `probe` (the command names this host; the in-process replayer, no
/// configuration's gateway).
fn assert_same_records(file: &Path, in_process: &str, command: &str) {
    let records = |ndjson: &str| -> Vec<String> {
        let mut records: Vec<String> = ndjson
            .lines()
            .map(|line| {
                let mut record: Value = serde_json::from_str(line).expect("NDJSON");
                let fields = record.as_object_mut().expect("a record is an object");
                fields.remove("id");
                fields.remove("probe");
                record.to_string()
            })
            .collect();
        records.sort();
        records
    };
    let (ours, theirs) = (records(in_process), records(command));
    assert!(!theirs.is_empty(), "icr replay {} printed no records", file.display());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    for line in command.lines() {
        let record: Value = serde_json::from_str(line).expect("NDJSON");
        assert_eq!(record["probe"], host.as_str(), "icr replay names this host as the probe (no probe_id configured)");
    }
    assert_eq!(ours, theirs, "{}: the reused probe's records differ from icr replay's", file.display());
}
