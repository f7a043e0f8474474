//! What the agent does when the system lacks something the probe uses. It
//! probes the kernel at start (XDP programs, the map types, the helpers),
//! says what it found and which event path that gives (per-CPU ring buffers from
//! 5.18, else perf buffers); a kernel lacking one is refused with the
//! feature's name (a unit test of probe.rs: every kernel `cargo xtask
//! vm-test` boots has them all). Here, on a real system: a pin directory
//! that is not on bpffs — as on a gateway that does not mount bpffs, or
//! that runs the agent under `ip netns exec`, whose fresh sysfs hides
//! /sys/fs/bpf, as this lab does — makes the agent run unpinned, with a
//! warning naming bpffs, and still record.
use std::{path::Path, process::Command};

use icr_lab::{Agent, EXCHANGE_IP, Lab, icr_binary};
use serde_json::Value;

/// A pin directory under /sys/fs/bpf, which the agent (in the gateway's
/// namespace, under `ip netns exec`) sees on a fresh sysfs, not on bpffs.
fn pin_dir(lab: &Lab) -> String {
    format!("/sys/fs/bpf/{}-pins", lab.prefix)
}

fn write_config(db: &Path, pins: &str) {
    std::fs::create_dir_all(db).unwrap();
    std::fs::write(
        db.join("icr.toml"),
        format!(
            "[probe]\nflow_table_size = 65536\npin_dir = \"{pins}\"\n[timeouts]\ntcp_closed = \"1s\"\nudp_idle = \"2s\"\nfull_sweep = \"1s\"\n"
        ),
    )
    .unwrap();
}

#[test]
fn without_bpffs_the_agent_records_unpinned_and_says_why() {
    let lab = Lab::start(1).expect("building the lab");
    let db = lab.dir.join("db");
    let pins = pin_dir(&lab);
    write_config(&db, &pins);
    let c1 = &lab.clients[0];

    let agent = Agent::start(&lab, &icr_binary(), &db).expect("starting the agent");
    let started = agent.log_text();
    assert!(
        started.contains("XDP programs, hash, array and per-CPU array maps, bpf_ktime_get_ns: present;"),
        "the agent says what it probed in the kernel:\n{started}"
    );
    // Ring buffers with bpf_xdp_load_bytes from 5.18, else perf buffers.
    let path = if icr_lab::kernel_at_least(5, 18) {
        "events through the per-CPU ring buffers"
    } else {
        "events through the per-CPU perf buffers"
    };
    assert!(started.contains(path), "the agent says which event path this kernel gets ({path}):\n{started}");
    assert!(
        started.contains(&format!("pin_dir {pins} is not on a BPF file system"))
            && started.contains("mount -t bpf bpf /sys/fs/bpf"),
        "the agent names bpffs as what is missing:\n{started}"
    );
    assert!(!started.contains("pinning the XDP link"), "{started}");

    let port = lab.exchange(c1, 2_000, 30_000).expect("an exchange");
    let log = agent.stop().expect("the agent stops cleanly");
    if std::env::var_os("ICR_LAB_LOG").is_some() {
        eprintln!("{log}");
    }
    // Nothing was pinned in the host's bpffs either (the same path there is
    // on bpffs when the host mounts it).
    assert!(!Path::new(&pins).exists(), "nothing pinned at {pins}");
    // Unpinned, the programs went with the agent: nothing is left attached.
    let link = lab.exec(&lab.gateway, Command::new("ip").args(["-d", "link", "show", "dev", &c1.gateway_if])).unwrap();
    assert!(!String::from_utf8_lossy(&link.stdout).contains("prog/xdp"), "{}", String::from_utf8_lossy(&link.stdout));

    let out = icr_lab::icr_list(&db, "ndjson", None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let records: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let matching: Vec<&Value> =
        records.iter().filter(|r| r["device"]["port"] == u64::from(port) && r["remote"]["ip"] == EXCHANGE_IP).collect();
    assert_eq!(matching.len(), 1, "the exchange was recorded: {records:#?}");
    assert!(matching[0]["bytes_up"].as_u64().unwrap() >= 2_000, "{}", matching[0]);
    assert!(matching[0]["bytes_down"].as_u64().unwrap() >= 30_000, "{}", matching[0]);
}
