//! IPFIX export end to end, with the collectors providers run: the agent in
//! the NAT lab exports to nfdump's `nfcapd` and pmacct's `nfacctd` on the
//! gateway's loopback. For every connection, nfdump's answer to
//! `src nip PUBLIC and src nport PORT` is icr's own answer to question 1;
//! nfacctd reads the names through the enterprise elements; tshark decodes
//! every template; a collector stopped mid-run costs the store nothing, its
//! gap counted; and `icr export ipfix` back-fills the stored window. IPv6
//! records, from real IPv6 captures replayed into a store, reach tshark and
//! nfcapd with their addresses (on the host's loopback, no lab).
use std::{
    net::IpAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use icr_lab::{
    Agent, LAB_OPERATOR, Lab, PUBLIC_IP, TempDir, WEB_NAME, agent_config, client_timeout, icr, icr_binary, patience,
};
use icr_test_kit::{
    config::{Authority, Config, StoreDir},
    netns::command_in,
};
use serde_json::Value;

const NFCAPD_PORT: u16 = 9995;
const NFACCTD_PORT: u16 = 9996;
const METRICS: &str = "127.0.0.1:9464";
/// The captures replayed into one store for the IPv6 test (tests/captures):
/// TLS and QUIC from a global IPv6 address (a TCP and a UDP record), and
/// HTTP over IPv4, so that one file holds both families' templates (no
/// capture there has unicast flows of both within a retention's reach).
const IPV6_CAPTURE: &str = "suricata-verify/tests/ja4-tls-quic/input.pcap";
const IPV4_CAPTURE: &str = "zeek/Traces/tls/ssl-to-http-server.pcap";
const AUTHORITY_FLAGS: [&str; 6] = ["--authority", "lab-police", "--officer", "PC 1", "--reference", "OP-IPFIX-1"];

/// The enterprise elements as a pmacct operator declares them (docs/ipfix.md).
const PMACCT_PRIMITIVES: &str = "\
name=pppoe_session field_type=32473:11 len=2 semantics=u_int
name=service_name field_type=32473:12 len=vlen semantics=str
name=service_source field_type=32473:13 len=vlen semantics=str
name=ech field_type=32473:14 len=1 semantics=u_int
name=dns_questions field_type=32473:15 len=vlen semantics=str
name=subscriber field_type=32473:16 len=vlen semantics=str
";

fn write_config(db: &Path) {
    std::fs::create_dir_all(db).unwrap();
    agent_config("gw-lab-ipfix", METRICS)
        .section(
            "ipfix",
            &format!(
                "collectors = [\"udp://127.0.0.1:{NFCAPD_PORT}\", \"udp://127.0.0.1:{NFACCTD_PORT}\"]\n\
                 observation_domain = 7\ntemplate_interval = \"2s\""
            ),
        )
        .write(&db.join("icr.toml"));
}

/// A collector (in the namespace `netns`, or here) in a process group of
/// its own (nfacctd forks its plugins), stopped with `signal` to the group;
/// its output in `log`.
struct Collector {
    child: Option<Child>,
}

impl Collector {
    fn start(netns: Option<&str>, command: &Command, log: &Path) -> Self {
        let program = command.get_program().to_str().expect("a collector's name is text");
        let log = std::fs::File::create(log).expect("a collector's log");
        // `ip netns exec` execs the collector: the group stays the child's.
        let child = command_in(netns, program)
            .args(command.get_args())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("a collector's log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("starting {program}: {error}"));
        // Bound: until it listens (nothing answers a UDP port; give it a moment).
        std::thread::sleep(patience(Duration::from_secs(1)));
        Self { child: Some(child) }
    }

    /// Signals the whole group and waits (at most 10 s, then SIGKILL).
    fn stop(&mut self, signal: i32) {
        let Some(mut child) = self.child.take() else { return };
        let group = child.id() as i32;
        // SAFETY: signalling a process group this test started.
        unsafe { libc::kill(-group, signal) };
        let started = std::time::Instant::now();
        while child.try_wait().ok().flatten().is_none() {
            if started.elapsed() > Duration::from_secs(10) {
                // SAFETY: as above.
                unsafe { libc::kill(-group, libc::SIGKILL) };
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above; nfacctd's plugins outlive their core otherwise.
        unsafe { libc::kill(-group, libc::SIGKILL) };
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop(libc::SIGKILL);
    }
}

/// nfcapd on `127.0.0.1:port` (in `netns`, or here), writing into `dir`
/// (its log beside it).
fn nfcapd(netns: Option<&str>, dir: &Path, port: u16) -> Collector {
    std::fs::create_dir_all(dir).unwrap();
    let mut command = Command::new("nfcapd");
    command.arg("-w").arg(dir).args(["-b", "127.0.0.1", "-p", &port.to_string(), "-t", "3600"]);
    Collector::start(netns, &command, &dir.with_extension("log"))
}

fn nfacctd(lab: &Lab) -> (Collector, PathBuf) {
    let primitives = lab.dir.join("primitives.lst");
    std::fs::write(&primitives, PMACCT_PRIMITIVES).unwrap();
    let output = lab.dir.join("nfacctd.json");
    let config = lab.dir.join("nfacctd.conf");
    std::fs::write(
        &config,
        format!(
            "daemonize: false\nnfacctd_ip: 127.0.0.1\nnfacctd_port: {NFACCTD_PORT}\naggregate_primitives: {}\n\
             plugins: print[icr]\n\
             aggregate[icr]: src_mac, src_host, src_port, dst_host, dst_port, proto, post_nat_src_host, \
             post_nat_src_port, timestamp_start, timestamp_end, nat_event, vlan, pppoe_session, service_name, \
             service_source, ech, dns_questions, subscriber\n\
             print_output[icr]: json\nprint_output_file[icr]: {}\nprint_output_file_append[icr]: true\n\
             print_refresh_time[icr]: 1\n",
            primitives.display(),
            output.display()
        ),
    )
    .unwrap();
    let mut command = Command::new("nfacctd");
    command.arg("-f").arg(&config);
    (Collector::start(Some(&lab.gateway), &command, &lab.dir.join("nfacctd.log")), output)
}

fn ndjson(text: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(text)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// nfdump's flows for `filter` over the files of `dirs`, as JSON.
fn nfdump(dirs: &[&Path], filter: &str) -> Vec<Value> {
    let mut flows = Vec::new();
    for dir in dirs {
        let out =
            Command::new("nfdump").env("TZ", "UTC").arg("-R").arg(dir).args(["-o", "json", filter]).output().unwrap();
        assert!(out.status.success(), "nfdump: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        // What nfdump 1.7.1 prints for none is not JSON.
        if !text.trim().is_empty() && !text.contains("No matching flows") {
            flows.extend(serde_json::from_str::<Vec<Value>>(&text).unwrap_or_else(|e| panic!("{e}: {text}")));
        }
    }
    flows
}

/// A record time as nfdump prints it: UTC, milliseconds.
fn millis(rfc3339: &str) -> String {
    let time = chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap().with_timezone(&chrono::Utc);
    time.format("%Y-%m-%dT%H:%M:%S%.3f").to_string()
}

/// `icr export ipfix` (in `netns`, or here) of the store in `db` over the
/// days around now, as the lab's operator, to `destination`.
fn export_ipfix(netns: Option<&str>, db: &Path, destination: &[&str]) -> Output {
    let now = chrono::Utc::now();
    let (from, to) = ((now - chrono::Duration::days(1)).to_rfc3339(), (now + chrono::Duration::days(1)).to_rfc3339());
    command_in(netns, icr_binary().to_str().expect("the binary's path is text"))
        .args(["export", "ipfix", "--from", &from, "--to", &to, "--db", db.to_str().unwrap()])
        .args(["--authority", LAB_OPERATOR, "--officer", "ops", "--reference", "BACKFILL-1"])
        .args(destination)
        .output()
        .expect("running icr export ipfix")
}

/// What tshark prints for the IPFIX file `file` with `args` (it must read it).
fn tshark_file(file: &Path, args: &[&str]) -> String {
    let out = Command::new("tshark").arg("-r").arg(file).args(args).output().expect("running tshark");
    assert!(out.status.success(), "tshark reads {}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// tshark's expert info on the IPFIX file `file` has no warning or error
/// (a malformed message is an error).
fn assert_no_expert_warnings(file: &Path) {
    let expert = tshark_file(file, &["-q", "-z", "expert,warn"]);
    assert!(!expert.contains("Warns") && !expert.contains("Errors"), "tshark on {}:\n{expert}", file.display());
}

/// The value of a metric series in a Prometheus text.
fn sample(metrics: &str, series: &str) -> u64 {
    let line = metrics.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("no {series} in {metrics}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn nfdump_and_pmacct_read_the_gateways_records_and_a_stopped_collector_is_counted() {
    let lab = Lab::start(2).expect("building the lab");
    let db = lab.dir.join("db");
    let (c1, c2) = (&lab.clients[0], &lab.clients[1]);
    write_config(&db);
    let (first_run, second_run) = (lab.dir.join("nfcapd-1"), lab.dir.join("nfcapd-2"));
    let mut capd = nfcapd(Some(&lab.gateway), &first_run, NFCAPD_PORT);
    let (mut acctd, acctd_output) = nfacctd(&lab);
    let capture = lab.capture_in(&lab.gateway, "lo", "ipfix").expect("tcpdump on the gateway's loopback");
    let agent = Agent::start(&lab, &icr_binary(), &db).expect("starting the agent");
    let settle = || std::thread::sleep(patience(Duration::from_secs(4)));

    // Both collectors up: a TCP exchange, HTTPS by name (TLS SNI), a DNS question.
    lab.exchange(c1, 3_000, 20_000).expect("an exchange");
    let curl = lab
        .exec(
            &c2.ns,
            Command::new("curl").args(["-sk", "--max-time", &client_timeout(10), &format!("https://{WEB_NAME}/")]),
        )
        .expect("curl");
    assert!(curl.status.success());
    lab.lookup(&c2.ns, "mail.example.test", "A").expect("dig");
    settle();

    // nfcapd stops: what closes meanwhile is stored, and counted as not
    // exported. One exchange at a time: the first message after the stop
    // still leaves (the port's ICMP error comes back after it), the next
    // is refused unsent, so nfcapd sees a jump in the sequence numbers.
    capd.stop(libc::SIGTERM);
    let unexported: Vec<u16> = (0..2)
        .map(|_| {
            let port = lab.exchange(c1, 1_000, 2_000).expect("an exchange while nfcapd is down");
            settle();
            port
        })
        .collect();

    // It comes back (templates resent), and takes the rest.
    let mut capd = nfcapd(Some(&lab.gateway), &second_run, NFCAPD_PORT);
    lab.exchange(c2, 2_000, 5_000).expect("an exchange after nfcapd is back");
    settle();
    let metrics = lab
        .exec(&lab.gateway, Command::new("curl").args(["-sf", &format!("http://{METRICS}/metrics")]))
        .expect("GET /metrics");
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    let capd_series = format!("{{collector=\"udp://127.0.0.1:{NFCAPD_PORT}\"}}");
    let acctd_series = format!("{{collector=\"udp://127.0.0.1:{NFACCTD_PORT}\"}}");
    let failed = sample(&metrics, &format!("icr_ipfix_records_failed_total{capd_series}"));
    assert_eq!(sample(&metrics, &format!("icr_ipfix_records_failed_total{acctd_series}")), 0, "{metrics}");
    assert_eq!(sample(&metrics, &format!("icr_ipfix_records_dropped_total{capd_series}")), 0);

    agent.stop().expect("the agent stops cleanly");
    std::thread::sleep(patience(Duration::from_secs(2)));
    capd.stop(libc::SIGTERM);
    let pcap = capture.stop().expect("the capture");
    // nfacctd writes its cache every second.
    std::thread::sleep(patience(Duration::from_secs(3)));
    acctd.stop(libc::SIGKILL);

    let records = icr_lab::stored_records(&db);
    assert!(records.len() >= 6, "the exchanges, HTTPS, DNS: {records:#?}");
    for port in &unexported {
        assert!(
            records.iter().any(|r| r["device"]["port"] == u64::from(*port) && r["device"]["ip"] == c1.ip.as_str()),
            "the store has what closed while nfcapd was down ({port})"
        );
    }

    // nfdump: each record as question 1 answers it, found by its public end.
    let runs = [first_run.as_path(), second_run.as_path()];
    let every_flow = nfdump(&runs, "any");
    let flows_of =
        |flows: &[Value]| -> Vec<Value> { flows.iter().filter(|f| f.get("nat_event").is_none()).cloned().collect() };
    assert_eq!(
        flows_of(&every_flow).len() as u64 + failed,
        records.len() as u64,
        "every record reached nfcapd, or is counted as not exported"
    );
    let window = |record: &Value| record["start"].as_str().unwrap().to_string();
    let mut compared = 0;
    for record in &records {
        let public = &record["public"];
        assert_eq!(public["ip"], PUBLIC_IP, "{record}");
        let port = public["port"].as_u64().unwrap();
        let filter = format!("src nip {PUBLIC_IP} and src nport {port}");
        let found = nfdump(&runs, &filter);
        let device_port = record["device"]["port"].as_u64().unwrap();
        if unexported.contains(&(device_port as u16)) && record["device"]["ip"] == c1.ip.as_str() {
            assert!(flows_of(&found).iter().all(|f| f["src_port"] != device_port), "nfcapd was down: {found:#?}");
            continue;
        }
        // icr's own answer to question 1 for that public end, at the record's start.
        let at = window(record);
        let port_text = port.to_string();
        let mut args = vec![
            "query", "resolve", "--ip", PUBLIC_IP, "--port", &port_text, "--at", &at, "--format", "ndjson", "--db",
        ];
        let db_text = db.to_str().unwrap();
        args.push(db_text);
        args.extend(AUTHORITY_FLAGS);
        let answer = icr(&args);
        assert!(answer.status.success(), "{}", String::from_utf8_lossy(&answer.stderr));
        let answer: Vec<Value> = ndjson(&answer.stdout).into_iter().filter(|a| a["id"] == record["id"]).collect();
        assert_eq!(answer.len(), 1, "question 1 finds the record");
        let answer = &answer[0];

        let flows: Vec<Value> = flows_of(&found).into_iter().filter(|f| f["src_port"] == device_port).collect();
        assert_eq!(flows.len(), 1, "one flow for {filter} from port {device_port}: {found:#?}");
        let flow = &flows[0];
        assert_eq!(flow["in_src_mac"], answer["device"]["mac"], "{flow:#}");
        assert_eq!(flow["src4_addr"], answer["device"]["ip"]);
        assert_eq!(flow["src_port"], answer["device"]["port"]);
        assert_eq!(flow["src4_xlt_ip"], PUBLIC_IP);
        assert_eq!(flow["src_xlt_port"], port.to_string(), "nfdump writes the translated port as text");
        assert_eq!(flow["dst4_addr"], answer["remote"]["ip"]);
        assert_eq!(flow["dst_port"], answer["remote"]["port"]);
        assert_eq!(flow["first"], millis(answer["start"].as_str().unwrap()));
        assert_eq!(flow["last"], millis(answer["end"].as_str().unwrap()));
        assert_eq!(flow["in_packets"], answer["packets_up"]);
        assert_eq!(flow["in_bytes"], answer["bytes_up"]);
        assert_eq!(flow["out_packets"], answer["packets_down"]);
        assert_eq!(flow["out_bytes"], answer["bytes_down"]);
        // And the RFC 8158 events a NAT-keyed collector reads.
        let events: Vec<&Value> =
            found.iter().filter(|f| f.get("nat_event").is_some() && f["src_port"] == device_port).collect();
        let kinds: Vec<&str> = events.iter().map(|e| e["nat_event"].as_str().unwrap()).collect();
        assert_eq!(kinds.len(), 2, "{events:#?}");
        assert!(kinds.contains(&"NAT44 session create") && kinds.contains(&"NAT44 session delete"), "{kinds:?}");
        for event in events {
            let at = if event["nat_event"] == "NAT44 session create" { &answer["start"] } else { &answer["end"] };
            // nfdump 1.7.1 prints an event's milliseconds unpadded (".15" for 15 ms).
            let (seconds, ms) = event["t_event"].as_str().unwrap().rsplit_once('.').unwrap();
            assert_eq!(format!("{seconds}.{:03}", ms.parse::<u32>().unwrap()), millis(at.as_str().unwrap()));
            assert_eq!(event["in_src_mac"], answer["device"]["mac"]);
        }
        compared += 1;
    }
    assert_eq!(compared + unexported.len(), records.len());

    // nfacctd: every record (nfacctd never stopped), its names through the
    // enterprise elements.
    let lines = ndjson(&std::fs::read(&acctd_output).expect("nfacctd's output"));
    let (mut named, mut asked) = (0, 0);
    for record in &records {
        let line = lines
            .iter()
            .filter(|l| l["nat_event"] == 0)
            .find(|l| l["ip_src"] == record["device"]["ip"] && l["port_src"] == record["device"]["port"])
            .unwrap_or_else(|| panic!("nfacctd has {record}: {lines:#?}"));
        let service = |field: &str| record["service"][field].as_str().unwrap_or("").to_string();
        assert_eq!(line["service_name"], service("name"), "{line}");
        assert_eq!(line["service_source"], service("source"));
        let questions: Vec<String> = record["dns_all"]
            .as_array()
            .map(|all| {
                all.iter()
                    .map(|d| format!("{}/{}", d["qname"].as_str().unwrap(), d["qtype"].as_str().unwrap()))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(line["dns_questions"], questions.join(" "));
        asked += usize::from(!questions.is_empty());
        assert_eq!(line["packets"], record["packets_up"], "pmacct reads the forward counters");
        named += usize::from(!service("name").is_empty());
    }
    assert!(
        lines.iter().any(|l| l["service_name"] == WEB_NAME && l["service_source"] == "tls_sni"),
        "the HTTPS connection's SNI: {lines:#?}"
    );
    assert!(named >= 1 && asked >= 1, "names and DNS questions were exported ({named}, {asked})");

    // tshark decodes every template, and every message, without a warning.
    let decode_as = |port: u16| format!("udp.port=={port},cflow");
    let tshark = |extra: &[&str]| {
        let out = Command::new("tshark")
            .arg("-r")
            .arg(&pcap)
            .args(["-d", &decode_as(NFCAPD_PORT), "-d", &decode_as(NFACCTD_PORT)])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "tshark: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let verbose = tshark(&["-V"]);
    for id in 256..=260 {
        assert!(verbose.contains(&format!("Template Id: {id}")), "template {id} decoded");
    }
    assert!(verbose.contains("NAT44 session create") || verbose.contains("natEvent"), "RFC 8158 events decoded");
    let expert = |port: u16| tshark(&["-q", "-z", &format!("expert,warn,udp.dstport=={port}")]);
    let acctd_expert = expert(NFACCTD_PORT);
    assert!(!acctd_expert.contains("Warns") && !acctd_expert.contains("Errors"), "tshark:\n{acctd_expert}");
    // To nfcapd, the messages not sent while it was down show as what they
    // are for a collector: a jump in the sequence numbers, and only that.
    let capd_expert = expert(NFCAPD_PORT);
    let warnings: Vec<&str> = capd_expert.lines().filter(|l| l.contains("CFLOW")).collect();
    assert!(!warnings.is_empty() && !capd_expert.contains("Errors"), "tshark:\n{capd_expert}");
    assert!(warnings.iter().all(|w| w.contains("Unexpected flow sequence for domain ID 7")), "tshark:\n{capd_expert}");
    assert!(!verbose.contains("Malformed"), "no malformed packet");

    // `icr export ipfix`: the stored window again, as an operator's
    // back-filling, to an RFC 5655 file and to a collector; audited.
    let export = |destination: &[&str]| export_ipfix(Some(&lab.gateway), &db, destination);
    let file = lab.dir.join("backfill.ipfix");
    let written = export(&["--file", file.to_str().unwrap()]);
    assert!(written.status.success(), "{}", String::from_utf8_lossy(&written.stderr));
    assert!(String::from_utf8_lossy(&written.stdout).starts_with(&format!("{} records", records.len())));
    let read = |extra: &[&str]| tshark_file(&file, extra);
    let verbose = read(&["-V"]);
    for id in 256..=260 {
        assert!(verbose.contains(&format!("Template Id: {id}")), "template {id} in the file");
    }
    assert_no_expert_warnings(&file);
    let mut ports: Vec<u64> = read(&["-T", "fields", "-e", "cflow.srcport"])
        .split([',', '\n'])
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    let mut stored: Vec<u64> = records.iter().map(|r| r["device"]["port"].as_u64().unwrap()).collect();
    stored.sort_unstable();
    stored.dedup();
    assert_eq!(ports, stored, "every record in the file");
    let again = export(&["--file", file.to_str().unwrap()]);
    assert!(!again.status.success(), "a file is never overwritten");

    let third_run = lab.dir.join("nfcapd-3");
    let mut capd = nfcapd(Some(&lab.gateway), &third_run, NFCAPD_PORT);
    let sent = export(&["--collector", &format!("udp://127.0.0.1:{NFCAPD_PORT}")]);
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    capd.stop(libc::SIGTERM);
    assert_eq!(flows_of(&nfdump(&[&third_run], "any")).len(), records.len(), "nfcapd got every record");
    let refused = export(&["--collector", "udp://127.0.0.1:9"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("did not reach"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let audit = std::fs::read_to_string(db.join("audit.log")).unwrap();
    let exports: Vec<&str> = audit.lines().filter(|l| l.contains("\"export ipfix\"")).collect();
    assert_eq!(exports.len(), 3, "each export asked is audited (not the one refused its file):\n{audit}");
    assert!(
        exports.iter().any(|l| l.contains("backfill.ipfix"))
            && exports.iter().any(|l| l.contains("udp://127.0.0.1:9\""))
    );
}

/// A copy of the capture `name` (tests/captures) in `dir`, its packets
/// moved in time so that the first is an hour ago: a store reads nothing
/// older than its retention.
fn recent_copy(name: &str, dir: &Path) -> PathBuf {
    let capture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("captures").join(name);
    let run = |command: &mut Command| {
        let out = command.output().unwrap_or_else(|error| panic!("running {:?}: {error}", command.get_program()));
        assert!(out.status.success(), "{:?}: {}", command.get_program(), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // "FILE<TAB>SECONDS.FRACTION": the first packet's time.
    let first = run(Command::new("capinfos").args(["-a", "-T", "-r", "-S"]).arg(&capture));
    let first: f64 = first.trim().rsplit('\t').next().and_then(|t| t.parse().ok()).expect("capinfos' first time");
    let shift = chrono::Utc::now().timestamp() - 3600 - first as i64;
    let copy = dir.join(name.replace('/', "-"));
    run(Command::new("editcap").arg("-t").arg(shift.to_string()).arg(&capture).arg(&copy));
    copy
}

/// Every data record tshark dissects in the IPFIX file `file`, with its
/// template id.
fn tshark_flows(file: &Path) -> Vec<(u64, Value)> {
    let packets: Vec<Value> = serde_json::from_str(&tshark_file(file, &["-T", "json"])).expect("tshark's JSON");
    let mut flows = Vec::new();
    for packet in &packets {
        let sets = packet["_source"]["layers"]["cflow"].as_object().expect("an IPFIX message");
        for set in sets.values() {
            let Some(id) = set["cflow.flowset_id"].as_str().and_then(|id| id.parse().ok()) else { continue };
            let records = set.as_object().into_iter().flatten().filter(|(key, _)| key.starts_with("Flow "));
            flows.extend(records.map(|(_, flow)| (id, flow.clone())));
        }
    }
    flows
}

/// An address as tshark, nfdump and icr write it (none if missing).
fn address(value: &Value) -> Option<IpAddr> {
    value.as_str().and_then(|text| text.parse().ok())
}

/// A value as text: tshark writes numbers as strings.
fn text(value: &Value) -> String {
    value.as_str().map_or_else(|| value.to_string(), str::to_owned)
}

#[test]
fn replayed_ipv6_records_reach_tshark_and_nfcapd_with_their_addresses() {
    let dir = TempDir::new("icr-ipfix-v6");
    let store = StoreDir::with_config(
        "icr-ipfix-v6-store",
        Config::new().key("retention_days = 30").authority(Authority::operator(LAB_OPERATOR)),
    );
    let db = store.path();
    for capture in [IPV6_CAPTURE, IPV4_CAPTURE] {
        let copy = recent_copy(capture, dir.path());
        let replayed = icr(&["replay", copy.to_str().unwrap(), "--db", db.to_str().unwrap()]);
        assert!(replayed.status.success(), "icr replay {capture}: {}", String::from_utf8_lossy(&replayed.stderr));
    }
    let records = icr_lab::stored_records(db);
    let ipv6: Vec<&Value> =
        records.iter().filter(|r| address(&r["device"]["ip"]).is_some_and(|ip| ip.is_ipv6())).collect();
    assert!(
        ["tcp", "udp"].iter().all(|proto| ipv6.iter().any(|r| r["proto"] == *proto)),
        "a TCP and a UDP record over IPv6: {records:#?}"
    );
    assert!(ipv6.len() < records.len(), "and IPv4 ones in the same store: {records:#?}");
    // Routed IPv6, no NAT66: the public end (281, 227) is the device's own.
    assert!(ipv6.iter().all(|r| !r["public"].is_null()), "{ipv6:#?}");

    // The file, as tshark dissects it: every IPv6 record in template 259
    // or 260, with its ends.
    let file = dir.path().join("replayed.ipfix");
    let written = export_ipfix(None, db, &["--file", file.to_str().unwrap()]);
    assert!(written.status.success(), "{}", String::from_utf8_lossy(&written.stderr));
    assert_no_expert_warnings(&file);
    let flows: Vec<Value> =
        tshark_flows(&file).into_iter().filter(|(id, _)| matches!(id, 259 | 260)).map(|(_, flow)| flow).collect();
    assert_eq!(flows.len(), ipv6.len(), "one IPv6 flow per IPv6 record: {flows:#?}");
    for record in &ipv6 {
        let (device, remote, public) = (&record["device"], &record["remote"], &record["public"]);
        let flow = flows
            .iter()
            .find(|f| {
                address(&f["cflow.srcaddrv6"]) == address(&device["ip"])
                    && text(&f["cflow.srcport"]) == text(&device["port"])
            })
            .unwrap_or_else(|| panic!("tshark finds {record}: {flows:#?}"));
        assert_eq!(address(&flow["cflow.dstaddrv6"]), address(&remote["ip"]), "{flow:#}");
        assert_eq!(text(&flow["cflow.dstport"]), text(&remote["port"]));
        assert_eq!(address(&flow["cflow.post_nat_source_ipv6_address"]), address(&public["ip"]), "{flow:#}");
        assert_eq!(text(&flow["cflow.post_naptsource_transport_port"]), text(&public["port"]));
    }

    // A real nfcapd on loopback; nfdump 1.7.1 decodes 27/28 and 227 but
    // not 281 (postNATSourceIPv6Address), which tshark checked above.
    let port = std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("a free port").port();
    let received = dir.path().join("nfcapd");
    let mut capd = nfcapd(None, &received, port);
    let sent = export_ipfix(None, db, &["--collector", &format!("udp://127.0.0.1:{port}")]);
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    // Bound: a moment for nfcapd to read what loopback holds for it.
    std::thread::sleep(patience(Duration::from_secs(1)));
    capd.stop(libc::SIGTERM);
    let flows: Vec<Value> =
        nfdump(&[&received], "any").into_iter().filter(|f| address(&f["src6_addr"]).is_some()).collect();
    assert_eq!(flows.len(), ipv6.len(), "one IPv6 flow per IPv6 record: {flows:#?}");
    for record in &ipv6 {
        let (device, remote) = (&record["device"], &record["remote"]);
        let flow = flows
            .iter()
            .find(|f| address(&f["src6_addr"]) == address(&device["ip"]) && f["src_port"] == device["port"])
            .unwrap_or_else(|| panic!("nfdump finds {record}: {flows:#?}"));
        assert_eq!(address(&flow["dst6_addr"]), address(&remote["ip"]), "{flow:#}");
        assert_eq!(flow["dst_port"], remote["port"]);
        assert_eq!(flow["src_xlt_port"], text(&record["public"]["port"]), "nfdump writes the translated port as text");
        assert_eq!(flow["in_src_mac"], device["mac"]);
        assert_eq!(flow["first"], millis(record["start"].as_str().unwrap()));
        assert_eq!(flow["last"], millis(record["end"].as_str().unwrap()));
        assert_eq!(flow["in_packets"], record["packets_up"]);
        assert_eq!(flow["out_packets"], record["packets_down"]);
    }
}
