//! Encapsulations the lab's veths do not carry, from captures crafted with
//! scapy (tests/lab/crafted.py): 802.1Q, QinQ, PPPoE with IPv6, IPv6
//! extension headers, a ClientHello split over out-of-order segments.
//! Each replays to a record with the right name, VLAN ids and PPPoE session.
use std::process::Command;

use icr_lab::icr_binary;
use serde_json::{Value, json};

#[test]
fn crafted_encapsulations_replay_to_named_records() {
    let dir = std::env::temp_dir().join(format!("icr-crafted-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pcap = dir.join("crafted.pcap");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/crafted.py");
    let made = Command::new("/usr/bin/python3").arg(script).arg(&pcap).output().expect("python3 with scapy");
    assert!(made.status.success(), "crafting: {}", String::from_utf8_lossy(&made.stderr));

    let out = Command::new(icr_binary()).arg("replay").arg(&pcap).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let records: Vec<Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 5, "{records:#?}");
    let by_port = |port: u64| records.iter().find(|r| r["device"]["port"] == port).unwrap_or_else(|| panic!("no record from port {port}"));

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
