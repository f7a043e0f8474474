//! Restarts without a gap: with the maps and XDP links pinned, the probe
//! keeps counting while the agent is dead (kill -9) and the next agent takes
//! over the links and adopts what accumulated. Every flow of the test
//! traffic — finished before the crash, spanning it, made while no agent
//! ran, and after — is in the store, with every byte counted. Both agents
//! run with the Debian package's capabilities only (no CAP_SYS_ADMIN). A
//! stopped agent (an upgrade) hands its open connections to the next.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use icr_lab::{Agent, Bpffs, EXCHANGE_IP, Lab, icr_binary};
use serde_json::Value;

/// A lab of one client, a bpffs, and a store configured to pin the probe.
fn pinned_lab() -> (Lab, Bpffs, PathBuf) {
    let lab = Lab::start(1).expect("building the lab");
    let bpffs = Bpffs::mount(lab.dir.join("bpffs"));
    let db = lab.dir.join("db");
    write_config(&db, &bpffs.0.join("icr"));
    (lab, bpffs, db)
}

fn write_config(db: &Path, pins: &Path) {
    std::fs::create_dir_all(db).unwrap();
    std::fs::write(
        db.join("icr.toml"),
        format!(
            "[probe]\nflow_table_size = 65536\npin_dir = \"{}\"\n[timeouts]\ntcp_closed = \"1s\"\nudp_idle = \"2s\"\nfull_sweep = \"1s\"\n",
            pins.display()
        ),
    )
    .unwrap();
}

#[test]
fn a_killed_agent_restarts_without_losing_a_flow() {
    let (lab, bpffs, db) = pinned_lab();
    let pins = bpffs.0.join("icr");
    let c1 = &lab.clients[0];

    let agent = Agent::start_confined(&lab, &icr_binary(), &db).expect("starting the agent");
    assert!(pins.join("FLOWS").exists() && pins.join("link-lan1").exists(), "maps and links pinned");
    // The LAN egress program's link too, where the kernel attaches it by a
    // tcx link (6.6); a netlink filter cannot be pinned.
    let tcx = icr_lab::kernel_at_least(6, 6);
    assert_eq!(pins.join("link-lan1-egress").exists(), tcx, "the egress link pinned on tcx kernels");
    let before = lab.exchange(c1, 2_000, 30_000).expect("exchange before the crash");
    std::thread::sleep(Duration::from_millis(2500)); // closed and stored
    let (mut spanning, spanning_port) = lab.slow_exchange(c1, 3_000, 40_000, 4.0).expect("a slow exchange");
    std::thread::sleep(Duration::from_millis(500));

    agent.kill().expect("kill -9");
    // No agent runs: the pinned probe keeps counting.
    let during = lab.exchange(c1, 4_000, 50_000).expect("exchange while no agent runs");
    std::thread::sleep(Duration::from_millis(500));

    let agent = Agent::start_confined(&lab, &icr_binary(), &db).expect("restarting the agent");
    assert!(agent.log_text().contains("took over the pinned XDP link"), "{}", agent.log_text());
    if tcx {
        assert!(agent.log_text().contains("took over the pinned egress link of lan1"), "{}", agent.log_text());
    }
    assert!(spanning.wait().unwrap().success(), "the slow exchange completed across the restart");
    let after = lab.exchange(c1, 5_000, 60_000).expect("exchange after the restart");
    std::thread::sleep(Duration::from_millis(2500));
    let log = agent.stop().expect("the agent stops cleanly");
    if std::env::var_os("ICR_LAB_LOG").is_some() {
        eprintln!("{log}");
    }

    let out = icr_lab::icr_list(&db, "ndjson", None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(!warnings.contains("in the agent"), "the pinned probe counted on: no time without capture:\n{warnings}");
    let records: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (name, port, up, down) in [
        ("before", before, 2_000, 30_000),
        ("spanning", spanning_port, 3_000, 40_000),
        ("during", during, 4_000, 50_000),
        ("after", after, 5_000, 60_000),
    ] {
        let matching = of_port(&records, port);
        assert_eq!(matching.len(), 1, "{name}: one record in {records:#?}");
        assert_every_byte(name, &matching, up, down);
    }

    let detach = Command::new(icr_binary()).args(["detach", "--db"]).arg(&db).output().unwrap();
    assert!(detach.status.success(), "{}", String::from_utf8_lossy(&detach.stderr));
    assert!(!pins.exists(), "icr detach removes the pins");
}

#[test]
fn a_stopped_agent_hands_its_open_connections_to_the_next() {
    let (lab, _bpffs, db) = pinned_lab();
    let c1 = &lab.clients[0];

    let agent = Agent::start_confined(&lab, &icr_binary(), &db).expect("starting the agent");
    let (mut spanning, port) = lab.slow_exchange(c1, 3_000, 40_000, 4.0).expect("a slow exchange");
    std::thread::sleep(Duration::from_millis(1000));
    // An upgrade's restart: SIGTERM, and the next agent at once.
    let first_log = agent.stop().expect("the agent stops cleanly");
    assert!(first_log.contains("open flows over to the next agent"), "{first_log}");
    let agent = Agent::start_confined(&lab, &icr_binary(), &db).expect("restarting the agent");
    assert!(!db.join("handover").exists(), "a handover is taken once");
    assert!(spanning.wait().unwrap().success(), "the slow exchange completed across the restart");
    std::thread::sleep(Duration::from_millis(2500));
    let log = agent.stop().expect("the agent stops cleanly");
    // The exchange's LAN and WAN halves at least (ND and multicast flows too).
    let resumed = log.split("went on with ").nth(1).and_then(|rest| rest.split(' ').next()?.parse::<u32>().ok());
    assert!(resumed >= Some(2), "{log}");

    let out = icr_lab::icr_list(&db, "ndjson", None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let records: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let halves = of_port(&records, port);
    assert_eq!(halves.len(), 2, "what the first agent saw, then the rest: {records:#?}");
    let (first, rest) = (halves[0], halves[1]);
    assert_eq!(first["end_reason"], "shutdown", "{first}");
    assert_eq!(rest["end_reason"], "fin", "{rest}");
    assert_eq!(rest["start"], first["end"], "the rest starts where the first record ended");
    assert_eq!(rest["public"], first["public"], "the same NAT mapping");
    assert!(rest["public"]["port"].is_u64(), "{rest}");
    for half in [first, rest] {
        assert_ne!(half["incomplete"], true, "the next agent knew where to go on from: {half}");
    }
    assert_every_byte("spanning a stop", &halves, 3_000, 40_000);

    let detach = Command::new(icr_binary()).args(["detach", "--db"]).arg(&db).output().unwrap();
    assert!(detach.status.success(), "{}", String::from_utf8_lossy(&detach.stderr));
}

/// The records of the connection from `port` to the exchange server, in
/// the order they started.
fn of_port(records: &[Value], port: u16) -> Vec<&Value> {
    let mut matching: Vec<&Value> =
        records.iter().filter(|r| r["device"]["port"] == u64::from(port) && r["remote"]["ip"] == EXCHANGE_IP).collect();
    matching.sort_by_key(|r| r["start"].as_str().map(str::to_owned));
    matching
}

/// Every byte of an exchange of `up` and `down` payload bytes counted once
/// over its records, with the NAT mapping found.
fn assert_every_byte(name: &str, records: &[&Value], up: u64, down: u64) {
    let sum = |field: &str| records.iter().map(|r| r[field].as_u64().unwrap()).sum::<u64>();
    let (bu, bd) = (sum("bytes_up"), sum("bytes_down"));
    let (pu, pd) = (sum("packets_up"), sum("packets_down"));
    // IP bytes: the payload plus 40 to 80 bytes of IP and TCP headers a
    // packet (a slow machine sends more, smaller packets and ACKs).
    assert!(bu >= up + 40 * pu && bu <= up + 80 * pu, "{name}: every byte up counted once: {records:#?}");
    assert!(bd >= down + 40 * pd && bd <= down + 80 * pd, "{name}: every byte down counted once: {records:#?}");
    for r in records {
        assert!(r["public"]["port"].is_u64(), "{name}: the NAT mapping was found again: {r}");
    }
}
