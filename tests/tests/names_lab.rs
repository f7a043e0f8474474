//! Service names on real traffic through the NAT gateway: TLS SNI from curl
//! (TLS 1.2 and 1.3) and openssl (a ClientHello padded past two segments),
//! HTTP Host, DNS over UDP and TCP with a CNAME chain, and a connection
//! named only by the DNS lookup its device made before it.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
    time::Duration,
};

use icr_lab::{
    ALIAS_NAME, Agent, DNS_IP, EXCHANGE_IP, EXCHANGE_NAME, Lab, MAIL_IP, MAIL_NAME, QUIC_NAME, WEB_IP, WEB_IP6,
    WEB_NAME, client_timeout, icr_binary,
};
use serde_json::Value;

fn write_config(db: &Path) {
    std::fs::create_dir_all(db).unwrap();
    std::fs::write(
        db.join("icr.toml"),
        "[probe]\nflow_table_size = 65536\n[timeouts]\ntcp_closed = \"1s\"\nudp_idle = \"2s\"\nfull_sweep = \"1s\"\n",
    )
    .unwrap();
}

#[test]
fn names_come_from_sni_host_and_dns() {
    let lab = Lab::start(2).expect("building the lab");
    let db = lab.dir.join("db");
    write_config(&db);
    let agent = Agent::start(&lab, &icr_binary(), &db).expect("starting the agent");
    let (c1, c2) = (&lab.clients[0], &lab.clients[1]);
    let run = |ns: &str, command: &mut Command| lab.exec(ns, command).expect("client command");
    let (timeout, dig_time) = (client_timeout(10), format!("+time={}", client_timeout(2)));
    let captures = [lab.capture(c1, "c1").expect("tcpdump"), lab.capture(c2, "c2").expect("tcpdump")];

    // Client 1: TLS 1.3 and TLS 1.2 by name (each after a DNS lookup).
    run(&c1.ns, Command::new("curl").args(["-sk", "--max-time", &timeout, &format!("https://{WEB_NAME}/")]));
    run(
        &c1.ns,
        Command::new("curl").args([
            "-sk",
            "--max-time",
            &timeout,
            "--tlsv1.2",
            "--tls-max",
            "1.2",
            &format!("https://{MAIL_NAME}/"),
        ]),
    );
    // Client 2: openssl with a ClientHello over 2 KB (a long ALPN list), by address.
    let alpn: Vec<String> = (0..120).map(|i| format!("proto-{i:04}-padding")).collect();
    run(&c2.ns, Command::new("sh").args(["-c", &format!(
        "openssl s_client -connect {MAIL_IP}:443 -servername {MAIL_NAME} -alpn {} </dev/null >/dev/null 2>&1; true",
        alpn.join(",")
    )]));
    // Plain HTTP; DNS over TCP with a CNAME; then a connection named only by DNS.
    run(&c2.ns, Command::new("curl").args(["-s", "--max-time", &timeout, &format!("http://{WEB_NAME}/")]));
    run(&c2.ns, Command::new("dig").args(["+tcp", &dig_time, "+tries=1", &format!("@{DNS_IP}"), ALIAS_NAME, "A"]));
    run(&c2.ns, Command::new("dig").args(["+short", &dig_time, "+tries=1", &format!("@{DNS_IP}"), EXCHANGE_NAME, "A"]));
    let aaaa = run(
        &c2.ns,
        Command::new("dig").args(["+short", &dig_time, "+tries=1", &format!("@{DNS_IP}"), WEB_NAME, "AAAA"]),
    );
    assert_eq!(String::from_utf8_lossy(&aaaa.stdout).trim(), WEB_IP6);
    run(&c2.ns, Command::new("dig").args([&dig_time, "+tries=1", &format!("@{DNS_IP}"), WEB_NAME, "HTTPS"]));
    lab.exchange(c2, 100, 100).expect("the exchange");
    // QUIC (aioquic client and server): the SNI from the decrypted Initial.
    lab.quic_connect(c1, QUIC_NAME).expect("the QUIC handshake");

    std::thread::sleep(Duration::from_secs(3));
    agent.stop().expect("the agent stops cleanly");
    let pcaps: Vec<_> = captures.into_iter().map(|c| c.stop().expect("stopping tcpdump")).collect();
    let records = icr_lab::stored_records(&db);
    let find = |device: &str, remote: &str, port: u64, proto: &str| {
        icr_lab::records_between(&records, device, remote, port, proto)
    };
    let service = icr_lab::service_of;

    let tls13 = find(&c1.ip, WEB_IP, 443, "tcp");
    assert_eq!(tls13.len(), 1, "{records:#?}");
    assert_eq!(service(tls13[0]), (WEB_NAME.into(), "tls_sni".into()));
    let tls12 = find(&c1.ip, MAIL_IP, 443, "tcp");
    assert_eq!(tls12.len(), 1, "{records:#?}");
    assert_eq!(service(tls12[0]), (MAIL_NAME.into(), "tls_sni".into()));

    let padded = find(&c2.ip, MAIL_IP, 443, "tcp");
    assert_eq!(padded.len(), 1, "{records:#?}");
    assert_eq!(service(padded[0]), (MAIL_NAME.into(), "tls_sni".into()));
    assert!(padded[0]["bytes_up"].as_u64().unwrap() > 2500, "the ClientHello spanned segments: {:?}", padded[0]);

    let http = find(&c2.ip, WEB_IP, 80, "tcp");
    assert_eq!(http.len(), 1);
    assert_eq!(service(http[0]), (WEB_NAME.into(), "http_host".into()));

    // DNS records: names asked, and the answers the device got back.
    let dns_udp = find(&c1.ip, DNS_IP, 53, "udp");
    let asked: Vec<&str> = dns_udp.iter().filter_map(|r| r["dns"]["qname"].as_str()).collect();
    assert!(asked.contains(&WEB_NAME) && asked.contains(&MAIL_NAME), "{dns_udp:#?}");
    let web_lookup = dns_udp.iter().find(|r| r["dns"]["qname"] == WEB_NAME).unwrap();
    assert!(web_lookup["dns"]["answers"].as_array().unwrap().iter().any(|a| a == WEB_IP), "{web_lookup}");
    let dns_tcp = find(&c2.ip, DNS_IP, 53, "tcp");
    assert_eq!(dns_tcp.len(), 1, "{records:#?}");
    assert_eq!(dns_tcp[0]["dns"]["qname"], ALIAS_NAME);
    let answers: Vec<&str> =
        dns_tcp[0]["dns"]["answers"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(answers.contains(&WEB_NAME) && answers.contains(&WEB_IP), "the CNAME chain: {answers:?}");

    // AAAA and HTTPS lookups from client 2 (each on its own source port).
    let c2_dns: Vec<&Value> =
        find(&c2.ip, DNS_IP, 53, "udp").into_iter().filter(|r| r["dns"]["qname"] == WEB_NAME).collect();
    let by_type = |qtype: &str| {
        c2_dns.iter().find(|r| r["dns"]["qtype"] == qtype).unwrap_or_else(|| panic!("no {qtype} lookup in {c2_dns:#?}"))
    };
    assert_eq!(by_type("AAAA")["dns"]["answers"], serde_json::json!([WEB_IP6]));
    assert_eq!(by_type("HTTPS")["dns"]["answers"], serde_json::json!([WEB_IP]), "the HTTPS record's ipv4hint");

    // The exchange speaks neither TLS nor HTTP: named by the device's own lookup.
    let exchange = find(&c2.ip, EXCHANGE_IP, 9000, "tcp");
    assert_eq!(exchange.len(), 1);
    assert_eq!(service(exchange[0]), (EXCHANGE_NAME.into(), "dns".into()));

    let quic = find(&c1.ip, WEB_IP, 443, "udp");
    assert_eq!(quic.len(), 1, "{records:#?}");
    assert_eq!(service(quic[0]), (QUIC_NAME.into(), "quic_sni".into()));

    // The same traffic, captured by tcpdump at the clients and replayed:
    // every name tshark dissects from the capture, on the same flow.
    for pcap in &pcaps {
        let ours = replayed_names(pcap);
        let tshark = tshark_names(pcap);
        assert!(!tshark.is_empty(), "tshark found names in {}", pcap.display());
        assert_eq!(ours, tshark, "icr replay and tshark disagree on {}", pcap.display());
    }

    // No record carries a path, query string or payload.
    let text = serde_json::to_string(&records).unwrap();
    assert!(!text.contains("hello from") && !text.contains("GET /"), "no content in records");
}

/// An agent that falls seconds behind its events (here stopped, as under a
/// load it cannot keep up with) reads what its buffers hold before it
/// decides: connections that started and ended meanwhile are whole records
/// with their names, not flows its sweep found and closed unnamed.
#[test]
fn connections_made_while_the_agent_was_behind_keep_their_names() {
    let lab = Lab::start(1).expect("building the lab");
    let db = lab.dir.join("db");
    write_config(&db);
    let agent = Agent::start(&lab, &icr_binary(), &db).expect("starting the agent");
    let c1 = &lab.clients[0];
    let timeout = client_timeout(10);

    agent.pause().expect("stopping the agent");
    for name in [WEB_NAME, MAIL_NAME] {
        let out = lab
            .exec(&c1.ns, Command::new("curl").args(["-sk", "--max-time", &timeout, &format!("https://{name}/")]))
            .expect("curl");
        assert!(out.status.success(), "curl {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Past the sweep's grace, tcp_closed and udp_idle: all of it could close.
    std::thread::sleep(Duration::from_secs(4));
    agent.resume().expect("resuming the agent");
    std::thread::sleep(Duration::from_secs(4));
    agent.stop().expect("the agent stops cleanly");

    let records = icr_lab::stored_records(&db);
    for (ip, name) in [(WEB_IP, WEB_NAME), (MAIL_IP, MAIL_NAME)] {
        let tls = icr_lab::records_between(&records, &c1.ip, ip, 443, "tcp");
        assert_eq!(tls.len(), 1, "{records:#?}");
        assert_eq!(icr_lab::service_of(tls[0]), (name.into(), "tls_sni".into()), "{:#}", tls[0]);
        assert_eq!(tls[0]["incomplete"], false, "{:#}", tls[0]);
    }
    let lookups = icr_lab::records_between(&records, &c1.ip, DNS_IP, 53, "udp");
    let asked: BTreeSet<&str> = lookups.iter().filter_map(|r| r["dns"]["qname"].as_str()).collect();
    assert!(asked.contains(WEB_NAME) && asked.contains(MAIL_NAME), "{lookups:#?}");
    assert!(lookups.iter().all(|r| r["incomplete"] == false), "{lookups:#?}");
}

type FlowNames = BTreeMap<(String, u64, String, u64), BTreeSet<String>>;

/// Names per flow (client ip, port, server ip, port) from `icr replay`.
fn replayed_names(pcap: &Path) -> FlowNames {
    let out = Command::new(icr_binary()).arg("replay").arg(pcap).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut names = FlowNames::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        let flow = (
            r["device"]["ip"].as_str().unwrap().to_string(),
            r["device"]["port"].as_u64().unwrap(),
            r["remote"]["ip"].as_str().unwrap().to_string(),
            r["remote"]["port"].as_u64().unwrap(),
        );
        // Names from the connection's own setup; DNS-derived ones tshark cannot know.
        if r["service"]["source"] != "dns"
            && let Some(name) = r["service"]["name"].as_str()
        {
            names.entry(flow.clone()).or_default().insert(name.to_string());
        }
        if let Some(qname) = r["dns"]["qname"].as_str() {
            names.entry(flow).or_default().insert(qname.to_string());
        }
    }
    names
}

/// Names per flow as tshark dissects them: ClientHello SNI (TLS and QUIC),
/// DNS query names, HTTP Host.
fn tshark_names(pcap: &Path) -> FlowNames {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(pcap)
        .args(["-Y", "tls.handshake.type == 1 || (dns && dns.flags.response == 0) || http.request"])
        .args(["-T", "fields", "-E", "separator=|"])
        .args([
            "-e",
            "ip.src",
            "-e",
            "tcp.srcport",
            "-e",
            "udp.srcport",
            "-e",
            "ip.dst",
            "-e",
            "tcp.dstport",
            "-e",
            "udp.dstport",
        ])
        .args(["-e", "tls.handshake.extensions_server_name", "-e", "dns.qry.name", "-e", "http.host"])
        .output()
        .expect("running tshark");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut names = FlowNames::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split('|').collect();
        let port = |tcp: &str, udp: &str| if tcp.is_empty() { udp.parse().unwrap() } else { tcp.parse().unwrap() };
        let flow = (f[0].to_string(), port(f[1], f[2]), f[3].to_string(), port(f[4], f[5]));
        for name in f[6..].iter().flat_map(|v| v.split(',')).filter(|v| !v.is_empty()) {
            names.entry(flow.clone()).or_default().insert(name.to_ascii_lowercase());
        }
    }
    names
}
