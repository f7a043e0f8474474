//! The whole path on real parts: clients in namespaces behind a NAT gateway
//! (nftables masquerade) with the XDP probe attached, real servers, real
//! curl/dig/TCP traffic; then the stored ICRs and the queries on them.
use std::{
    collections::HashSet,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use icr_lab::{
    Agent, DNS_IP, EXCHANGE_IP, EXCHANGE_PORT, Lab, PUBLIC_IP, WEB_IP, WEB_NAME, agent_config, client_timeout, icr,
    icr_binary,
};
use icr_test_kit::config::Authority;
use serde_json::Value;

/// A window around the test run (queries may span at most 31 days).
static WINDOW: std::sync::LazyLock<(String, String)> = std::sync::LazyLock::new(|| {
    let now = chrono::Utc::now();
    let day = chrono::Duration::days(1);
    ((now - day).to_rfc3339(), (now + day).to_rfc3339())
});

const AUTHORITY_FLAGS: [&str; 6] = ["--authority", "lab-police", "--officer", "PC 1", "--reference", "OP-LAB-1"];

fn write_config(db: &Path, c1_mac: &str) {
    std::fs::create_dir_all(db).unwrap();
    let subscribers = db.join("subscribers.csv");
    std::fs::write(&subscribers, format!("mac_or_ip,subscriber\n{c1_mac},line-0001\n192.168.50.0/24,lab-lan\n"))
        .unwrap();
    agent_config("gw-lab-1", "127.0.0.1:9464")
        .authority(Authority::new("lab-council", "local", &[1, 2, 3]))
        .authority(Authority::new("lab-narrow", "approved", &[2]))
        .section("subscribers", &format!("static = \"{}\"", subscribers.display()))
        .section("probe", "flow_table_size = 65536")
        .write(&db.join("icr.toml"));
}

fn ndjson(out: &Output) -> Vec<Value> {
    assert!(out.status.success(), "icr failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|line| serde_json::from_str(line).expect("NDJSON")).collect()
}

/// IP bytes of `app` bytes of TCP payload in `packets` packets: each packet
/// carries 40 to 80 bytes of IP and TCP headers (options vary).
fn within_headers(ip_bytes: u64, app: u64, packets: u64) -> bool {
    ip_bytes >= app + 40 * packets && ip_bytes <= app + 80 * packets
}

#[test]
fn nat_gateway_records_real_traffic_and_answers_questions() {
    let lab = Lab::start(2).expect("building the lab");
    let db = lab.dir.join("db");
    let (c1, c2) = (&lab.clients[0], &lab.clients[1]);
    write_config(&db, &c1.mac);
    let agent = Agent::start(&lab, &icr_binary(), &db).expect("starting the agent");

    // A TCP exchange whose payload sizes we know, from client 1.
    let (up, down) = (3_000u64, 20_000u64);
    let c1_port = lab.exchange(c1, up as usize, down as usize).expect("the exchange");
    // HTTPS by name (DNS through dnsmasq, then TLS to nginx), and a dig, from client 2.
    let curl = lab
        .exec(
            &c2.ns,
            Command::new("curl").args(["-sk", "--max-time", &client_timeout(10), &format!("https://{WEB_NAME}/")]),
        )
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&curl.stdout), format!("hello from {WEB_NAME}\n"));
    lab.lookup(&c2.ns, "mail.example.test", "A").expect("dig");

    // Let the closed flows pass tcp_closed, then stop: the rest closes as "shutdown".
    std::thread::sleep(Duration::from_secs(3));

    // While the agent runs it holds the store: queries go through its socket.
    let db_arg = db.to_str().unwrap();
    let mut args = vec![
        "query",
        "services",
        "--device",
        c1.mac.as_str(),
        "--from",
        &WINDOW.0,
        "--to",
        &WINDOW.1,
        "--db",
        db_arg,
        "--format",
        "ndjson",
    ];
    args.extend(AUTHORITY_FLAGS);
    let live = ndjson(&icr(&args));
    assert_eq!(live.len(), 1, "answered by the running agent: {live:?}");
    assert_eq!(live[0]["remote"], format!("{EXCHANGE_IP}:{EXCHANGE_PORT}"));
    let refused = icr(&[
        "query",
        "services",
        "--device",
        &c1.ip,
        "--from",
        "2000-01-01T00:00:00Z",
        "--to",
        "2100-01-01T00:00:00Z",
        "--db",
        db_arg,
    ]);
    assert_eq!(
        refused.status.code(),
        Some(3),
        "refused through the socket too: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let too_long = icr(&[
        &[
            "query",
            "services",
            "--device",
            &c1.ip,
            "--from",
            "2000-01-01T00:00:00Z",
            "--to",
            "2100-01-01T00:00:00Z",
            "--db",
            db_arg,
        ][..],
        &AUTHORITY_FLAGS,
    ]
    .concat());
    assert_eq!(too_long.status.code(), Some(3), "a century is longer than the 31 days allowed");

    // Prometheus metrics, from inside the gateway.
    let metrics = lab
        .exec(&lab.gateway, Command::new("curl").args(["-sf", "http://127.0.0.1:9464/metrics"]))
        .expect("GET /metrics");
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    let sample = |name: &str| -> f64 {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {metrics}"));
        line.split(' ').nth(1).unwrap().parse().unwrap()
    };
    assert!(sample("icr_probe_packets_total") > 20.0);
    assert!(sample("icr_records_stored_total") >= 1.0);
    assert_eq!(sample("icr_probe_events_lost_total"), 0.0);
    assert_eq!(sample("icr_probe_flow_table_full_total"), 0.0);

    let log = agent.stop().expect("the agent stops cleanly");
    assert!(!db.join("icr.sock").exists(), "the socket goes with the agent");
    assert!(!log.contains("lost events 1"), "no events lost:\n{log}");

    let records = ndjson(&icr_lab::icr_list(&db, "ndjson", None));
    let find = |device_ip: &str, remote_ip: &str, remote_port: u64| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| {
                r["device"]["ip"] == device_ip && r["remote"]["ip"] == remote_ip && r["remote"]["port"] == remote_port
            })
            .collect()
    };

    // The exchange: one record, every field as the test knows it.
    let exchange = find(&c1.ip, EXCHANGE_IP, u64::from(EXCHANGE_PORT));
    assert_eq!(exchange.len(), 1, "one record for the exchange in {records:#?}");
    let r = exchange[0];
    assert_eq!(r["proto"], "tcp");
    assert_eq!(r["device"]["mac"], c1.mac.as_str());
    assert_eq!(r["device"]["port"], u64::from(c1_port));
    assert_eq!(r["public"]["ip"], PUBLIC_IP, "the NAT mapping from conntrack");
    assert!(r["public"]["port"].as_u64().is_some());
    assert_eq!(r["end_reason"], "fin");
    assert_eq!(r["incomplete"], false);
    assert_eq!(r["device"]["subscriber"], "line-0001", "from the static directory, by MAC");
    assert_eq!(r["probe"], "gw-lab-1", "the gateway that saw it, from probe_id");
    let (pu, pd) = (r["packets_up"].as_u64().unwrap(), r["packets_down"].as_u64().unwrap());
    let (bu, bd) = (r["bytes_up"].as_u64().unwrap(), r["bytes_down"].as_u64().unwrap());
    assert!((4..=40).contains(&pu), "packets up {pu}");
    assert!((4..=60).contains(&pd), "packets down {pd} (counted on the WAN side)");
    assert!(within_headers(bu, up, pu), "bytes up {bu} for {up} bytes in {pu} packets");
    assert!(within_headers(bd, down, pd), "bytes down {bd} for {down} bytes in {pd} packets");
    assert!(r["start"].as_str().unwrap() <= r["end"].as_str().unwrap());

    // HTTPS: nginx's access log is the ground truth for the public port.
    let access = lab.web_access_log().unwrap();
    assert_eq!(access.len(), 1, "{access:?}");
    assert_eq!(access[0].address, PUBLIC_IP, "nginx saw the NATed address");
    let web = find(&c2.ip, WEB_IP, 443);
    assert_eq!(web.len(), 1, "one HTTPS record in {records:#?}");
    assert_eq!(web[0]["public"]["port"], u64::from(access[0].port), "public port = what the server saw");
    assert_eq!(web[0]["device"]["mac"], c2.mac.as_str());
    assert_eq!(web[0]["device"]["subscriber"], "lab-lan", "by network when the MAC is not listed");
    assert!(web[0]["bytes_down"].as_u64().unwrap() > 500, "the TLS handshake came back");

    // DNS over UDP: the name lookup curl made and the dig.
    let dns = find(&c2.ip, DNS_IP, 53);
    assert!(!dns.is_empty(), "DNS records in {records:#?}");
    assert!(dns.iter().all(|r| r["proto"] == "udp" && r["public"]["ip"] == PUBLIC_IP));
    assert!(dns.iter().all(|r| r["packets_up"].as_u64().unwrap() >= 1 && r["packets_down"].as_u64().unwrap() >= 1));

    // No record may name a device outside the LAN.
    let devices: HashSet<&str> = records.iter().filter_map(|r| r["device"]["ip"].as_str()).collect();
    assert!(devices.iter().all(|d| d.starts_with("192.168.50.")), "{devices:?}");

    // Question 2: the services client 1 used.
    let mut args = vec![
        "query",
        "services",
        "--device",
        "line-0001",
        "--from",
        &WINDOW.0,
        "--to",
        &WINDOW.1,
        "--db",
        db_arg,
        "--format",
        "ndjson",
    ];
    args.extend(AUTHORITY_FLAGS);
    let rows = ndjson(&icr(&args));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["remote"], format!("{EXCHANGE_IP}:{EXCHANGE_PORT}"));
    assert_eq!(rows[0]["connections"], 1);

    // Question 3: who used the web server.
    let mut args = vec![
        "query",
        "accessed",
        "--service",
        WEB_IP,
        "--from",
        &WINDOW.0,
        "--to",
        &WINDOW.1,
        "--db",
        db_arg,
        "--format",
        "ndjson",
    ];
    args.extend(AUTHORITY_FLAGS);
    let hits = ndjson(&icr(&args));
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0]["device"]["ip"], c2.ip.as_str());

    // The same question as a disclosure bundle (CSV), checkable by the receiver.
    let bundle = lab.dir.join("bundle");
    let bundle_arg = bundle.to_str().unwrap();
    let mut args = vec![
        "query",
        "accessed",
        "--service",
        WEB_IP,
        "--from",
        &WINDOW.0,
        "--to",
        &WINDOW.1,
        "--db",
        db_arg,
        "--format",
        "csv",
        "--bundle",
        bundle_arg,
    ];
    args.extend(AUTHORITY_FLAGS);
    let csv_out = icr(&args);
    assert!(csv_out.status.success(), "{}", String::from_utf8_lossy(&csv_out.stderr));
    let check = Command::new("sha256sum").args(["-c", "MANIFEST.sha256"]).current_dir(&bundle).output().unwrap();
    assert!(check.status.success(), "the manifest checks: {}", String::from_utf8_lossy(&check.stdout));
    let manifest = std::fs::read_to_string(bundle.join("MANIFEST.sha256")).unwrap();
    assert!(["results.ndjson", "results.csv", "audit-entry.json"].iter().all(|f| manifest.contains(f)), "{manifest}");
    assert_eq!(
        std::fs::read(bundle.join("results.csv")).unwrap(),
        csv_out.stdout,
        "the bundle holds what was disclosed"
    );
    let entry: Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("audit-entry.json")).unwrap()).unwrap();
    assert_eq!(entry["reference"], "OP-LAB-1");
    assert_eq!(entry["result_count"], 1);
    let audit_log = std::fs::read_to_string(db.join("audit.log")).unwrap();
    assert!(audit_log.contains(entry["hash"].as_str().unwrap()), "the bundled entry is the logged one");
    let again = icr(&args);
    assert!(!again.status.success(), "a bundle is never overwritten");

    // ECS for Elasticsearch: action and document lines.
    let mut args = vec![
        "query",
        "accessed",
        "--service",
        WEB_IP,
        "--from",
        &WINDOW.0,
        "--to",
        &WINDOW.1,
        "--db",
        db_arg,
        "--format",
        "ecs",
    ];
    args.extend(AUTHORITY_FLAGS);
    let ecs = ndjson(&icr(&args));
    assert_eq!(ecs.len(), 2);
    assert!(ecs[0]["create"]["_id"].is_string());
    assert_eq!(ecs[1]["source"]["ip"], c2.ip.as_str());
    assert_eq!(ecs[1]["source"]["nat"]["ip"], PUBLIC_IP);
    assert_eq!(ecs[1]["destination"]["ip"], WEB_IP);

    // Refusals: no reference; a local authority. Exit 3, and audited.
    let refused = icr(&[
        "query",
        "accessed",
        "--service",
        WEB_IP,
        "--from",
        "2000-01-01T00:00:00Z",
        "--to",
        "2100-01-01T00:00:00Z",
        "--db",
        db_arg,
        "--authority",
        "lab-police",
        "--officer",
        "PC 1",
    ]);
    assert_eq!(refused.status.code(), Some(3), "{}", String::from_utf8_lossy(&refused.stderr));
    let local = icr(&[
        "query",
        "services",
        "--device",
        &c1.ip,
        "--from",
        "2000-01-01T00:00:00Z",
        "--to",
        "2100-01-01T00:00:00Z",
        "--db",
        db_arg,
        "--authority",
        "lab-council",
        "--officer",
        "X",
        "--reference",
        "R",
    ]);
    assert_eq!(local.status.code(), Some(3));
    let narrow = icr(&[
        "query",
        "accessed",
        "--service",
        WEB_IP,
        "--from",
        &WINDOW.0,
        "--to",
        &WINDOW.1,
        "--db",
        db_arg,
        "--authority",
        "lab-narrow",
        "--officer",
        "X",
        "--reference",
        "R",
    ]);
    assert_eq!(narrow.status.code(), Some(3), "purpose 3 is not among lab-narrow's");
    assert!(String::from_utf8_lossy(&narrow.stderr).contains("purpose 3"));
    // Malformed parameters: a clear error (exit 1), no panic, nothing answered.
    for (bad, says) in [
        (vec!["query", "resolve", "--ip", PUBLIC_IP, "--at", "yesterday-ish"], "RFC 3339"),
        (
            vec!["query", "accessed", "--service", "example.com/path?q=1", "--from", &WINDOW.0, "--to", &WINDOW.1],
            "no URLs",
        ),
        (vec!["query", "services", "--device", "x", "--from", &WINDOW.1, "--to", &WINDOW.0], "ends before it starts"),
    ] {
        let out = icr(&[&bad[..], &["--db", db_arg], &AUTHORITY_FLAGS].concat());
        assert_eq!(out.status.code(), Some(1), "{bad:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says) && stderr.lines().count() == 1, "{bad:?}: {stderr}");
    }
    let verify = icr(&["audit", "verify", "--db", db_arg]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    assert!(
        String::from_utf8_lossy(&verify.stdout).contains("16 entries"),
        "while running: the agent's retention sweep at start, 1 answer, 2 refusals; after: list, 4 answers (one bundle), \
         3 refusals, 4 failed: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let audit_log = std::fs::read_to_string(db.join("audit.log")).unwrap();
    assert_eq!(
        audit_log.matches("\"outcome\":\"failed: ").count(),
        4,
        "the second bundle and the malformed queries are audited as failed"
    );
}
