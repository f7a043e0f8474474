//! The gateway's own resolver, as on nearly every home router: dnsmasq on the
//! gateway's LAN addresses, forwarding to a server on the WAN side. Its
//! answers leave by the LAN ports, which only the TC egress program sees.
//! Over IPv4 (through NAT) and IPv6 (global addresses, routed), with several
//! clients and names: a connection with no name of its own is named from
//! the gateway resolver's answer to its device, a socket's three questions
//! are all kept, exchanges with the gateway are local, the gateway's own
//! queries upstream are no device's, and `icr replay` of a capture taken on
//! a LAN port gives the same names as the live agent.
use std::{collections::BTreeSet, path::Path, process::Command, time::Duration};

use icr_lab::{
    ALIAS_NAME, Agent, DNS_IP, EXCHANGE_IP, EXCHANGE_IP6, EXCHANGE_NAME, GATEWAY_LAN_IP, GATEWAY_LAN_IP6,
    GATEWAY_WAN_IP6, Lab, MAIL_IP, MAIL_NAME, WEB_IP, WEB_NAME, client_ip6, icr_binary, rfc3339,
};
use serde_json::Value;

fn write_config(db: &Path) {
    std::fs::create_dir_all(db).unwrap();
    std::fs::write(
        db.join("icr.toml"),
        "[[authority]]\nname = \"lab-police\"\nkind = \"police\"\npurposes = [3]\n\n\
         [probe]\nflow_table_size = 65536\n[timeouts]\ntcp_closed = \"1s\"\nudp_idle = \"2s\"\nfull_sweep = \"1s\"\n",
    )
    .unwrap();
}

/// Unix seconds now.
fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Every name a record gives: its service, and each DNS exchange's question.
fn names_of<'a>(records: impl Iterator<Item = &'a Value>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for record in records {
        if let Some(name) = record["service"]["name"].as_str() {
            names.insert(format!("{} {name}", record["service"]["source"].as_str().unwrap_or("-")));
        }
        for exchange in record["dns_all"].as_array().into_iter().flatten() {
            names.insert(format!("dns-question {}", exchange["qname"].as_str().unwrap_or("-")));
        }
    }
    names
}

#[test]
fn the_gateways_resolver_names_connections_and_its_exchanges_are_local() {
    let mut lab = Lab::start(3).expect("building the lab");
    lab.enable_ipv6().expect("routing IPv6");
    lab.start_gateway_resolver().expect("dnsmasq on the gateway");
    let db = lab.dir.join("db");
    write_config(&db);
    let agent = Agent::start(&lab, &icr_binary(), &db).expect("starting the agent");
    let (c1, c2, c3) = (&lab.clients[0], &lab.clients[1], &lab.clients[2]);
    let c2_ip6 = client_ip6(1);
    let capture = lab.capture(c1, "c1").expect("tcpdump on client 1's LAN port");

    // Client 1, IPv4: looks the exchange server up through the gateway, then
    // connects to the address it got; the exchange speaks no TLS or HTTP.
    let looked_up = lab.ask(c1, GATEWAY_LAN_IP, &[&format!("{EXCHANGE_NAME}:A")]).expect("asking the gateway");
    assert_eq!(looked_up, [(EXCHANGE_NAME.to_string(), vec![EXCHANGE_IP.to_string()])]);
    lab.exchange_with(c1, EXCHANGE_IP, 200, 300).expect("the IPv4 exchange");
    // Three questions from one socket.
    let three = [format!("{WEB_NAME}:A"), format!("{MAIL_NAME}:A"), format!("{ALIAS_NAME}:A")];
    let three: Vec<&str> = three.iter().map(String::as_str).collect();
    let answered = lab.ask(c1, GATEWAY_LAN_IP, &three).expect("three questions");
    assert_eq!(answered.len(), 3, "{answered:?}");

    // Client 2, IPv6 and no NAT: the same through the gateway's IPv6 address.
    let looked_up =
        lab.ask(c2, GATEWAY_LAN_IP6, &[&format!("{EXCHANGE_NAME}:AAAA")]).expect("asking the gateway over IPv6");
    assert_eq!(looked_up, [(EXCHANGE_NAME.to_string(), vec![EXCHANGE_IP6.to_string()])]);
    lab.exchange_with(c2, EXCHANGE_IP6, 200, 300).expect("the IPv6 exchange");

    // Client 3 asks the gateway for its own name only, then reaches the
    // exchange by address: client 1's lookup names no one else's connection.
    let router = lab.ask(c3, GATEWAY_LAN_IP, &["router.lan:A"]).expect("asking for the router");
    assert_eq!(router, [("router.lan".to_string(), vec![GATEWAY_LAN_IP.to_string()])]);
    lab.exchange_with(c3, EXCHANGE_IP, 200, 300).expect("client 3's exchange");

    std::thread::sleep(Duration::from_secs(3));
    let log = agent.stop().expect("the agent stops cleanly");
    assert!(log.contains("icr_lan_egress"), "the agent attached the egress program:\n{log}");
    let pcap = capture.stop().expect("stopping tcpdump");
    let records = icr_lab::stored_records(&db);
    let find = |device: &str, remote: &str, port: u64, proto: &str| {
        icr_lab::records_between(&records, device, remote, port, proto)
    };
    let service = icr_lab::service_of;

    // Connections named from the gateway resolver's answers, per device.
    let v4 = find(&c1.ip, EXCHANGE_IP, 9000, "tcp");
    assert_eq!(v4.len(), 1, "{records:#?}");
    assert_eq!(service(v4[0]), (EXCHANGE_NAME.into(), "dns".into()), "{:#}", v4[0]);
    assert_eq!(v4[0]["public"]["ip"], lab.public_ip.as_str());
    assert_eq!(v4[0]["local"], false);
    let v6 = find(&c2_ip6, EXCHANGE_IP6, 9000, "tcp");
    assert_eq!(v6.len(), 1, "{records:#?}");
    assert_eq!(service(v6[0]), (EXCHANGE_NAME.into(), "dns".into()), "{:#}", v6[0]);
    assert_eq!(v6[0]["public"]["ip"], c2_ip6.as_str(), "routed: the device's own address");
    let unnamed = find(&c3.ip, EXCHANGE_IP, 9000, "tcp");
    assert_eq!(unnamed.len(), 1, "{records:#?}");
    assert_eq!(unnamed[0]["service"], Value::Null, "client 3 looked nothing up for it");

    // Every exchange with the gateway's resolver is local, and complete.
    let with_gateway: Vec<&Value> = records
        .iter()
        .filter(|r| r["remote"]["ip"] == GATEWAY_LAN_IP || r["remote"]["ip"] == GATEWAY_LAN_IP6)
        .collect();
    assert_eq!(with_gateway.len(), 4, "four sockets asked the gateway: {with_gateway:#?}");
    for record in &with_gateway {
        assert_eq!(record["local"], true, "{record:#}");
        assert_eq!(record["public"], Value::Null, "{record:#}");
        assert_eq!(record["incomplete"], false, "{record:#}");
        assert!(record["packets_down"].as_u64().unwrap() >= 1, "the gateway's answers are counted: {record:#}");
    }
    let socket_of_three = find(&c1.ip, GATEWAY_LAN_IP, 53, "udp")
        .into_iter()
        .find(|r| r["dns_all"].as_array().is_some_and(|all| all.len() > 1))
        .unwrap_or_else(|| panic!("no flow with several questions: {with_gateway:#?}"));
    let asked: Vec<&str> =
        socket_of_three["dns_all"].as_array().unwrap().iter().map(|e| e["qname"].as_str().unwrap()).collect();
    assert_eq!(asked, [WEB_NAME, MAIL_NAME, ALIAS_NAME], "every question, in order");
    assert_eq!(socket_of_three["dns"], socket_of_three["dns_all"][0], "dns is the first exchange");
    let answers = |i: usize| socket_of_three["dns_all"][i]["answers"].clone();
    assert_eq!(answers(0), serde_json::json!([WEB_IP]));
    assert_eq!(answers(1), serde_json::json!([MAIL_IP]));
    assert!(answers(2).as_array().unwrap().iter().any(|a| a == WEB_IP), "the CNAME's address: {}", answers(2));
    assert_eq!(socket_of_three["packets_down"], 3);

    // The gateway's own queries upstream are no device's.
    for record in &records {
        assert_ne!(record["remote"]["ip"], DNS_IP, "only the gateway asked the upstream server: {record:#}");
        assert!(
            record["device"]["ip"] != lab.public_ip.as_str() && record["device"]["ip"] != GATEWAY_WAN_IP6,
            "{record:#}"
        );
    }

    // Question 3 finds the devices that asked for a name, and tells local
    // exchanges apart.
    let now = unix_now();
    let window = (rfc3339(now - 3600), rfc3339(now + 3600));
    let accessed = |name: &str, local: &str| -> Vec<Value> {
        let out = Command::new(icr_binary())
            .args(["query", "accessed", "--service", name, "--local", local, "--format", "ndjson"])
            .args(["--from", &window.0, "--to", &window.1])
            .args(["--authority", "lab-police", "--officer", "PC 1", "--reference", "OP-RESOLVER", "--db"])
            .arg(&db)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let devices = |records: &[Value]| -> BTreeSet<String> {
        records.iter().map(|r| r["device"]["ip"].as_str().unwrap().to_string()).collect()
    };
    // Only client 1 asked for the mail server's name, as the second question of its socket.
    let mail = accessed(MAIL_NAME, "include");
    assert_eq!(devices(&mail), BTreeSet::from([c1.ip.clone()]), "{mail:#?}");
    assert!(mail.iter().all(|r| r["local"] == true));
    assert!(accessed(MAIL_NAME, "exclude").is_empty(), "a lookup alone is a local exchange");
    // The exchange server: looked up by clients 1 and 2, reached by all three
    // (client 3's connection has no name, so it is not found by name).
    let exchange_only_local = accessed(EXCHANGE_NAME, "only");
    assert_eq!(
        devices(&exchange_only_local),
        BTreeSet::from([c1.ip.clone(), c2_ip6.clone()]),
        "{exchange_only_local:#?}"
    );
    let exchange_connections = accessed(EXCHANGE_NAME, "exclude");
    assert_eq!(exchange_connections.len(), 2, "{exchange_connections:#?}");
    assert!(exchange_connections.iter().all(|r| r["local"] == false && r["remote"]["port"] == 9000));
    assert_eq!(accessed(EXCHANGE_NAME, "include").len(), 4);

    // The capture of client 1's LAN port, replayed: the same names.
    let out = Command::new(icr_binary()).arg("replay").arg(&pcap).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let replayed: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let live = names_of(records.iter().filter(|r| r["device"]["ip"] == c1.ip.as_str()));
    assert!(
        live.contains(&format!("dns {EXCHANGE_NAME}")) && live.contains(&format!("dns-question {MAIL_NAME}")),
        "{live:?}"
    );
    assert_eq!(
        names_of(replayed.iter().filter(|r| r["device"]["ip"] == c1.ip.as_str())),
        live,
        "icr replay and the live agent"
    );
}
