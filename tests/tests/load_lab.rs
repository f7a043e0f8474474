//! Steady load through the NAT lab: every HTTPS request nginx logged is one
//! record naming its device, public address and service, and no record
//! names a device on the WAN side (a late packet of a connection already
//! written is no new flow). The agent's memory is printed at start and end.
use std::{collections::HashMap, process::Command, time::Duration};

use icr_lab::{Agent, GATEWAY_WAN_IF, LAN_NET, Lab, PUBLIC_IP, WEB_IP, WEB_NAME, icr_binary};
use serde_json::Value;

const CLIENTS: usize = 3;
/// Each client's requests, one connection each, back to back.
const REQUESTS: usize = 250;
/// The most the load may take (a slow machine stops early, and says so).
const LOAD_LIMIT: Duration = Duration::from_secs(60);

/// `ICR_SOAK_SECONDS=N` makes the run a soak: each client keeps up about
/// `ICR_SOAK_RATE` requests a second (default 20) for N seconds, and the
/// agent's memory is printed every minute. `ICR_SOAK_SMALL=1` gives the agent
/// the bounds configure.md suggests for a small gateway.
fn soak() -> Option<(u64, u64)> {
    let seconds = std::env::var("ICR_SOAK_SECONDS").ok()?.parse().ok()?;
    let rate = std::env::var("ICR_SOAK_RATE").ok().and_then(|r| r.parse().ok()).unwrap_or(20);
    Some((seconds, rate))
}

/// Where a soaking agent serves its metrics, inside the gateway.
const SOAK_METRICS: &str = "127.0.0.1:9464";

/// The agent's configuration: short timeouts, so that every connection is
/// written soon after it ends. A soak adds its metrics, `[store] cache_mb`
/// from `ICR_SOAK_CACHE_MB` when set, and with `ICR_SOAK_SMALL` the small
/// gateway's bounds (configure.md, `[probe]`).
fn agent_config() -> String {
    let small = soak().is_some() && std::env::var_os("ICR_SOAK_SMALL").is_some();
    let (probe, tcp_idle) = if small {
        (
            "flow_table_size = 16384\nevent_ring_bytes = 1048576\ndns_cache_entries = 4096\nnat_destroyed_kept = 8192\n",
            "tcp_idle = \"120s\"\n",
        )
    } else {
        ("flow_table_size = 65536\n", "")
    };
    let mut config = format!(
        "retention_days = 30\n[probe]\n{probe}[timeouts]\ntcp_closed = \"1s\"\nudp_idle = \"2s\"\nfull_sweep = \"1s\"\n{tcp_idle}"
    );
    if soak().is_none() {
        return config;
    }
    config += &format!("[metrics]\nlisten = \"{SOAK_METRICS}\"\n");
    let cache_mb = std::env::var("ICR_SOAK_CACHE_MB").ok().or_else(|| small.then(|| "8".to_string()));
    if let Some(cache_mb) = cache_mb {
        config += &format!("[store]\ncache_mb = {cache_mb}\n");
    }
    config
}

/// The agent's memory and the sizes of its maps, from its metrics, on one line.
fn soak_sample(lab: &Lab) -> String {
    const SHOWN: [&str; 13] = [
        "memory_resident_bytes",
        "memory_anonymous_bytes",
        "memory_file_bytes",
        "malloc_in_use_bytes",
        "malloc_free_bytes",
        "flows_open",
        "flows_held",
        "flows_hinted",
        "flow_checks_scheduled",
        "dns_cache_entries",
        "nat_mappings",
        "store_open_records",
        "records_stored_total",
    ];
    let url = format!("http://{SOAK_METRICS}/metrics");
    let Ok(out) = lab.exec(&lab.gateway, Command::new("curl").args(["-s", "--max-time", "5", &url])) else {
        return "metrics unavailable".into();
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |name: &str| {
        text.lines().find_map(|line| line.strip_prefix(&format!("icr_{name} "))).unwrap_or("-").to_string()
    };
    SHOWN
        .iter()
        .map(|name| match (name.strip_suffix("_bytes"), value(name).parse::<f64>()) {
            (Some(short), Ok(bytes)) => format!("{short}={:.1}MiB", bytes / f64::from(1 << 20)),
            _ => format!("{name}={}", value(name)),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// About 25 s. A failure keeps the lab's store and logs (see `Lab::keep`).
#[test]
fn every_connection_under_steady_load_is_one_whole_record() {
    let lab = Lab::start(CLIENTS).expect("building the lab");
    let db = lab.dir.join("db");
    std::fs::create_dir_all(&db).unwrap();
    std::fs::write(db.join("icr.toml"), agent_config()).unwrap();
    // `ICR_LAB_CAPTURE=1`: the gateway's LAN bridge and WAN port are
    // captured too, kept with the rest on failure.
    let _captures = std::env::var_os("ICR_LAB_CAPTURE").map(|_| {
        [("brlan", "gateway-lan"), (GATEWAY_WAN_IF, "gateway-wan")]
            .map(|(interface, name)| lab.capture_in(&lab.gateway, interface, name).expect("tcpdump on the gateway"))
    });
    let agent = Agent::start(&lab, &icr_binary(), &db).expect("starting the agent");
    let rss_start = agent.rss_kib().expect("the agent's memory");

    // Each client: a bounded shell loop of curl, one TLS connection (and one
    // lookup) a request; a deadline stops it whatever the machine's speed.
    let script = match soak() {
        // A second's requests, then the rest of the second asleep.
        Some((seconds, rate)) => format!(
            "end=$(( $(date +%s) + {seconds} )); while [ $(date +%s) -lt $end ]; do s=$(date +%s); i=0; \
             while [ $i -lt {rate} ]; do curl -sk -o /dev/null --max-time 5 https://{WEB_NAME}/; i=$((i+1)); done; \
             while [ $(date +%s) -eq $s ]; do sleep 0.05; done; done"
        ),
        None => format!(
            "end=$(( $(date +%s) + {} )); i=0; while [ $i -lt {REQUESTS} ] && [ $(date +%s) -lt $end ]; do \
             curl -sk -o /dev/null --max-time 5 https://{WEB_NAME}/; i=$((i+1)); done",
            LOAD_LIMIT.as_secs()
        ),
    };
    let load: Vec<_> = lab
        .clients
        .iter()
        .enumerate()
        .map(|(n, client)| {
            lab.spawn_in(&client.ns, Command::new("sh").args(["-c", &script]), &format!("load-{n}"))
                .expect("a client's load")
        })
        .collect();
    let started = std::time::Instant::now();
    let mut next_sample = Duration::from_secs(60);
    for mut child in load {
        while child.try_wait().expect("a client's load").is_none() {
            std::thread::sleep(Duration::from_secs(1));
            if soak().is_some() && started.elapsed() >= next_sample {
                eprintln!(
                    "agent RSS after {} s: {} KiB | {}",
                    started.elapsed().as_secs(),
                    agent.rss_kib().expect("the agent's memory"),
                    soak_sample(&lab)
                );
                next_sample += Duration::from_secs(60);
            }
        }
    }
    let rss_end = agent.rss_kib().expect("the agent's memory");
    // Past tcp_closed and a sweep: every connection closed by the agent itself.
    std::thread::sleep(Duration::from_secs(4));
    let stopped = agent.stop();
    let kept = |what: &str| match lab.keep() {
        Ok(path) => format!("{what}; the lab's store and logs are kept in {}", path.display()),
        Err(error) => format!("{what}; keeping the lab failed: {error:#}"),
    };
    match stopped {
        // Its last counts: flows, losses, orphans, ports reused.
        Ok(log) => eprintln!("{}", log.lines().rfind(|line| line.contains("lost events")).unwrap_or_default()),
        Err(error) => panic!("{}", kept(&format!("the agent did not stop cleanly: {error:#}"))),
    }
    eprintln!("agent RSS: {rss_start} KiB at start, {rss_end} KiB after the load");

    let access = lab.web_access_log().unwrap();
    assert!(access.len() >= CLIENTS * 20, "the load ran: {} requests", access.len());
    eprintln!("{} requests in nginx's log", access.len());
    let records = icr_lab::stored_records(&db);
    let wan_devices: Vec<&Value> =
        records.iter().filter(|r| !r["device"]["ip"].as_str().is_some_and(|ip| ip.starts_with(LAN_NET))).collect();
    assert!(wan_devices.is_empty(), "{}", kept(&format!("records whose device is not on the LAN: {wan_devices:#?}")));

    // nginx's log is the ground truth: each request's public port has one record.
    let mut by_public: HashMap<u64, Vec<&Value>> = HashMap::new();
    for r in records.iter().filter(|r| r["remote"]["ip"] == WEB_IP && r["remote"]["port"] == 443) {
        by_public.entry(r["public"]["port"].as_u64().unwrap_or(0)).or_default().push(r);
    }
    let mut broken = Vec::new();
    for line in &access {
        assert_eq!(line.address, PUBLIC_IP);
        let found = by_public.get(&u64::from(line.port)).map(Vec::as_slice).unwrap_or_default();
        // A public port may serve several connections over the run, even
        // within a second (a device reuses its port as soon as the server
        // has closed): the one open at the request's time. nginx logs after
        // its answer, between the connection's SYN and its last packet, in
        // whole milliseconds.
        let at = |r: &Value, field: &str| {
            chrono::DateTime::parse_from_rfc3339(r[field].as_str().unwrap()).unwrap().timestamp_micros() as f64 / 1e6
        };
        const LOG_ROUNDING: f64 = 0.002;
        let matching: Vec<&&Value> = found
            .iter()
            .filter(|r| at(r, "start") - LOG_ROUNDING <= line.time && line.time <= at(r, "end") + LOG_ROUNDING)
            .collect();
        let whole = matching.len() == 1
            && matching[0]["device"]["mac"].is_string()
            && matching[0]["service"]["name"] == WEB_NAME
            && matching[0]["packets_up"].as_u64().unwrap_or(0) > 0;
        if !whole {
            broken.push((line.port, line.time, matching));
        }
    }
    assert!(
        broken.is_empty(),
        "{}",
        kept(&format!("{} of {} requests without exactly one whole record: {broken:#?}", broken.len(), access.len()))
    );
}
