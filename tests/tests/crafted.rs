//! Encapsulations the lab's veths do not carry, from captures crafted with
//! scapy (tests/lab/crafted.py): 802.1Q, QinQ, PPPoE with IPv6, IPv6
//! extension headers, a ClientHello split over out-of-order segments.
//! Each replays to a record with the right name, VLAN ids and PPPoE session.
//! And a neighbour's attempts to plant DNS names on another device's
//! records (tests/lab/dns_planted.py).
use std::process::Command;

use icr_lab::icr_binary;
use serde_json::{Value, json};

/// The records `icr replay` makes of the capture a script of tests/lab/ writes.
fn replay_crafted(script: &str) -> Vec<Value> {
    let dir = std::env::temp_dir().join(format!("icr-crafted-{}-{script}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pcap = dir.join("crafted.pcap");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("lab").join(script);
    let made = Command::new("/usr/bin/python3").arg(script).arg(&pcap).output().expect("python3 with scapy");
    assert!(made.status.success(), "crafting: {}", String::from_utf8_lossy(&made.stderr));

    let out = Command::new(icr_binary()).arg("replay").arg(&pcap).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn crafted_encapsulations_replay_to_named_records() {
    let records = replay_crafted("crafted.py");
    assert_eq!(records.len(), 5, "{records:#?}");
    let by_port = |port: u64| {
        records.iter().find(|r| r["device"]["port"] == port).unwrap_or_else(|| panic!("no record from port {port}"))
    };

    for (port, name, vlan, pppoe) in [
        (40001, "vlan.example.test", json!([100]), Value::Null),
        (40002, "qinq.example.test", json!([300, 20]), Value::Null),
        (40003, "pppoe6.example.test", json!([]), json!(0x1234)),
        (40004, "ext6.example.test", json!([]), Value::Null),
        (40005, "split.example.test", json!([]), Value::Null),
    ] {
        let r = by_port(port);
        assert_eq!(r["service"]["name"], name, "{r}");
        assert_eq!(r["service"]["source"], "tls_sni");
        assert_eq!(r["device"]["vlan"], vlan, "{r}");
        assert_eq!(r["device"]["pppoe_session"], pppoe, "{r}");
        assert_eq!(r["device"]["mac"], "02:00:00:00:00:17");
        assert_eq!(r["end_reason"], "fin");
    }
    assert_eq!(by_port(40003)["device"]["ip"], "2001:db8::23");
}

#[test]
fn a_neighbour_cannot_plant_dns_names_on_another_devices_records() {
    let records = replay_crafted("dns_planted.py");
    let to = |port: u64| {
        records
            .iter()
            .find(|r| r["device"]["port"] == port)
            .unwrap_or_else(|| panic!("no record from port {port}: {records:#?}"))
    };
    // A's unsolicited answer, and the gateway's answer to A's question sent
    // with B's address, name none of B's connections, at once or later.
    for port in [50077, 50078, 50177] {
        let r = to(port);
        assert_eq!(r["device"]["mac"], "02:00:00:00:00:0b");
        assert_eq!(r["service"], Value::Null, "{r}");
    }
    // B's own question names its connection, and says which exchange did.
    let named = &to(50079)["service"];
    assert_eq!(named["name"], "legit.example", "{named}");
    assert_eq!(named["source"], "dns");
    assert_eq!(named["resolver"], "192.168.1.1:53");
    assert_eq!(named["dns_at"], "2023-11-14T22:13:20.210000Z");

    // Names the protocol allows are kept, escaped, not dropped.
    let asked: Vec<&str> =
        to(40003)["dns_all"].as_array().unwrap().iter().map(|d| d["qname"].as_str().unwrap()).collect();
    assert_eq!(asked, ["ab=cd+ef/gh.t.example", "odd\\032label\\255.t.example"]);
}
