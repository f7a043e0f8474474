//! The provider-wide store on real ClickHouse servers (Debian's
//! `clickhouse-server`, two of them as two shards of cluster `icr`), fed by
//! real gateways' agents (and six capture-less gateways shipping at once),
//! asked through the same desk as one gateway's store.
use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use icr_lab::{
    Agent, Bpffs, Lab, Nat, TempDir, WEB_IP, WEB_NAME,
    clickhouse::{ADMIN, CLUSTER, ClickHouseCluster, GATEWAY, QUERY, User},
    icr_binary, patience, wait_for,
};
use serde_json::Value;

const AUTHORITIES: &str = r#"
[[authority]]
name = "lab-police"
kind = "police"
purposes = [1, 2, 3]

[[authority]]
name = "lab-noc"
kind = "operator"
purposes = []
"#;
const WHO: [&str; 6] = ["--authority", "lab-police", "--officer", "PC 1", "--reference", "OP-CH-1"];
const TOKEN: &str = "central-police-token";
/// The central query service's HTTP API, inside the provider's namespace.
const CENTRAL_HTTP: &str = "127.0.0.1:8480";

/// The central query service's directory: its configuration names the
/// cluster and the authorities; its audit log records every question.
fn central_dir(cluster: &ClickHouseCluster) -> std::path::PathBuf {
    central_dir_with(cluster, "central", &plain_section(cluster))
}

/// A central directory `name` whose `[clickhouse]` is `section`.
fn central_dir_with(cluster: &ClickHouseCluster, name: &str, section: &str) -> std::path::PathBuf {
    let dir = cluster.dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let authorities = AUTHORITIES.replacen(
        "purposes = [1, 2, 3]\n",
        &format!("purposes = [1, 2, 3]\ntoken_hash = \"{}\"\n", icr_lab::hash_token(TOKEN)),
        1,
    );
    std::fs::write(
        dir.join("icr.toml"),
        format!("retention_days = 30\n{section}[http]\nlisten = \"{CENTRAL_HTTP}\"\n{authorities}"),
    )
    .unwrap();
    dir
}

/// `[clickhouse]` for the cluster over plain HTTP as ClickHouse's `default` user.
fn plain_section(cluster: &ClickHouseCluster) -> String {
    format!("[clickhouse]\nurl = \"{}\"\ncluster = \"{CLUSTER}\"\n", cluster.url(0))
}

/// `[clickhouse]` for a secured cluster over HTTPS as `user`, whose
/// password is in `password_file`.
fn secured_section(cluster: &ClickHouseCluster, user: User, password_file: &Path) -> String {
    format!(
        "[clickhouse]\nurl = \"{}\"\ncluster = \"{CLUSTER}\"\nuser = \"{}\"\npassword_file = \"{}\"\nca = \"{}\"\n",
        cluster.https_url(0),
        user.name,
        password_file.display(),
        cluster.ca.as_ref().expect("a secured cluster").display()
    )
}

/// A password file as icr wants one: root's, 0600.
fn password_file(path: &Path, password: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, format!("{password}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_path_buf()
}

/// `icr ARGS` in the provider's namespace: (exit code, stdout, stderr).
fn icr(cluster: &ClickHouseCluster, args: &[&str]) -> (i32, String, String) {
    let out = cluster.exec(Command::new(icr_binary()).args(args)).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ndjson(text: &str) -> Vec<Value> {
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Question 1 over the cluster for a request of nginx's log, as the query
/// service in `db` asks it.
fn resolve_on_cluster(cluster: &ClickHouseCluster, url: &str, db: &str, line: &icr_lab::AccessLine) -> Vec<Value> {
    let at = icr_lab::rfc3339(line.time as i64);
    let (code, stdout, stderr) = icr(
        cluster,
        &[
            &[
                "query",
                "resolve",
                "--ip",
                &line.address,
                "--port",
                &line.port.to_string(),
                "--at",
                &at,
                "--tolerance",
                "2s",
            ][..],
            &["--clickhouse", url, "--db", db, "--format", "ndjson"],
            &WHO,
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{stderr}");
    ndjson(&stdout)
}

fn init(cluster: &ClickHouseCluster) -> String {
    let (code, stdout, stderr) = icr(cluster, &["clickhouse", "init", "--url", &cluster.url(0), "--cluster", CLUSTER]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("on 2 node(s)"), "{stdout}");
    stdout
}

/// `sql` on every shard.
fn on_every_shard(cluster: &ClickHouseCluster, sql: &str) {
    for shard in 0..2 {
        cluster.query_at(&cluster.url(shard), sql).unwrap();
    }
}

/// A record as a gateway ships it (through `icr_ingest`): it started
/// `age_days` before `now` (Unix seconds) and lasted 10 s.
fn insert_record(cluster: &ClickHouseCluster, id: &str, now: i64, age_days: u32, public: &str, port: u16) {
    let now_us = now * 1_000_000 - i64::from(age_days) * 86_400_000_000;
    let sync = format!("{}/?insert_distributed_sync=1", cluster.url(0));
    cluster
        .query_at(
            &sync,
            &format!(
                "INSERT INTO icr_ingest.records (day, id, start_us, end_us, device_mac, public_ip, public_port, remote_ip, proto) \
                 VALUES (toDate(toDateTime({})), UUIDStringToNum('{id}'), {now_us}, {}, toFixedString(unhex('021c00000001'), 6), \
                 toFixedString(unhex('00000000000000000000ffff{}'), 16), {port}, toFixedString(unhex('00000000000000000000ffffc6336410'), 16), 'tcp')",
                now_us / 1_000_000,
                now_us + 10_000_000,
                hex_v4(public),
            ),
        )
        .unwrap();
}

fn hex_v4(ip: &str) -> String {
    ip.split('.').map(|octet| format!("{:02x}", octet.parse::<u8>().unwrap())).collect()
}

/// The shard (0 or 1) the records of `public` go to: `cityHash64(public_ip)`
/// over two shards of weight 1, as ClickHouse computes it.
fn shard_of(cluster: &ClickHouseCluster, public: &str) -> usize {
    let sql = format!("SELECT cityHash64(toFixedString(unhex('00000000000000000000ffff{}'), 16)) % 2", hex_v4(public));
    cluster.query_at(&cluster.url(0), &sql).unwrap().trim().parse().unwrap()
}

#[test]
fn init_makes_the_tables_on_every_shard_and_a_shard_down_fails_the_answer_clearly() {
    let mut cluster = ClickHouseCluster::start(2).expect("two ClickHouse shards");
    let made = init(&cluster);
    assert!(made.contains("10.99.0.2:18123: made ") && made.contains("icr.by_name_local"), "{made}");
    let again = init(&cluster);
    assert!(!again.contains("made") && !again.contains("noted"), "again: nothing changes, nothing fails: {again}");
    for shard in 0..2 {
        let tables = cluster.query_at(&cluster.url(shard), "SHOW TABLES FROM icr").unwrap();
        for table in ["records", "records_local", "by_device_local", "by_name_local", "gaps", "public_holders_local"] {
            assert!(tables.lines().any(|t| t == table), "shard {shard} has {table}: {tables}");
        }
    }

    let central = central_dir(&cluster);
    let db = central.to_str().unwrap();
    let (code, stdout, stderr) = resolve_at(&cluster, db, "203.0.113.1", 40000, "2026-11-22T15:00:00Z");
    assert_eq!((code, stdout.as_str()), (0, ""), "an empty cluster answers nothing: {stderr}");

    // Retention: a record 40 days old (retention_days = 30) goes with its
    // day partition, on every shard and in every table; today's stays.
    let started = chrono_now();
    insert_record(&cluster, "0192f1c4-0000-7000-8000-000000000040", started, 40, "203.0.113.1", 40000);
    insert_record(&cluster, "0192f1c4-0000-7000-8000-000000000001", started, 0, "203.0.113.1", 40000);
    let (code, stdout, stderr) = icr(&cluster, &["sweep", "--db", db, "--clickhouse", &cluster.url(0)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("dropped 1 day(s)"), "{stdout}");
    for shard in 0..2 {
        for table in ["records_local", "by_device_local", "by_name_local", "public_holders_local"] {
            let left = cluster
                .query_at(&cluster.url(shard), &format!("SELECT count() FROM icr.{table} WHERE day < today() - 30"))
                .unwrap();
            assert_eq!(left.trim(), "0", "{table} keeps nothing past retention");
        }
    }
    let kept = cluster.query_at(&cluster.url(0), "SELECT UUIDNumToString(id) FROM icr.records").unwrap();
    assert_eq!(kept.trim(), "0192f1c4-0000-7000-8000-000000000001");

    // A record on each shard, now.
    let address_on: Vec<String> = (0..2)
        .map(|shard| {
            (2..40).map(|n| format!("203.0.113.{n}")).find(|ip| shard_of(&cluster, ip) == shard).expect("an address")
        })
        .collect();
    for (shard, ip) in address_on.iter().enumerate() {
        insert_record(&cluster, &format!("0192f1c4-0000-7000-8000-00000000010{shard}"), started, 0, ip, 41000);
    }
    // A moment each record was alive (a resolve that finds none alive also
    // asks every shard who else held the remote end).
    let now = icr_lab::rfc3339(started + 1);
    cluster.stop_shard(1).unwrap();
    let (code, stdout, stderr) = resolve_at(&cluster, db, &address_on[0], 41000, &now);
    assert_eq!((code, stdout.as_str()), (1, ""), "a shard down fails the answer, never a partial one: {stderr}");
    assert!(stderr.contains("10.99.0.2"), "the error names the shard that did not answer: {stderr}");
    cluster.start_shard(1).unwrap();

    // Shard 1 cannot read its records now: a question that asks it fails.
    on_shard(&cluster, 1, "RENAME TABLE icr.records_local TO icr.records_hidden");
    // The layout init noted is today's: records of earlier days may lie
    // where another layout put them, so a resolve asks every shard.
    let (code, _, stderr) = resolve_at(&cluster, db, &address_on[0], 41000, &now);
    assert_eq!(code, 1, "every shard asked: {stderr}");
    // Noted three days ago, the layout holds for every day a resolve of
    // now reads: it asks the one shard that holds the address.
    on_shard(&cluster, 0, "DROP TABLE icr.shard_layout_local");
    on_shard(
        &cluster,
        0,
        "CREATE TABLE icr.shard_layout_local (since DateTime, layout String) ENGINE = MergeTree ORDER BY since",
    );
    on_shard(&cluster, 0, "INSERT INTO icr.shard_layout_local VALUES (now() - 3 * 86400, '1*1 2*1')");
    let (code, stdout, stderr) = resolve_at(&cluster, db, &address_on[0], 41000, &now);
    assert_eq!(code, 0, "shard 0 alone answers for its own address: {stderr}");
    let answer = ndjson(&stdout);
    assert_eq!(answer.len(), 1, "{stdout}");
    assert_eq!(answer[0]["id"], "0192f1c4-0000-7000-8000-000000000100");
    let (code, stdout, stderr) = resolve_at(&cluster, db, &address_on[1], 41000, &now);
    assert_eq!((code, stdout.as_str()), (1, ""), "shard 1's address: shard 1 asked, and its failure is the answer's");
    assert!(stderr.contains("10.99.0.2") && stderr.contains("records_local"), "{stderr}");
    let audit = std::fs::read_to_string(central.join("audit.log")).unwrap();
    assert_eq!(audit.lines().count(), 6, "every question and the sweep audited: {audit}");
    assert!(audit.lines().last().unwrap().contains("\"outcome\":\"failed: "), "{audit}");
}

/// Question 1 for `ip:port` at `at` (±5 s) over the cluster, asked by the
/// query service in `db`: (exit code, stdout, stderr).
fn resolve_at(cluster: &ClickHouseCluster, db: &str, ip: &str, port: u16, at: &str) -> (i32, String, String) {
    let port = port.to_string();
    icr(
        cluster,
        &[
            &["query", "resolve", "--ip", ip, "--port", &port, "--at", at, "--tolerance", "5s", "--clickhouse"][..],
            &[cluster.url(0).as_str(), "--db", db, "--format", "ndjson"],
            &WHO,
        ]
        .concat(),
    )
}

/// `sql` on `shard` alone (the other may be down).
fn on_shard(cluster: &ClickHouseCluster, shard: usize, sql: &str) {
    cluster.query_at(&cluster.url(shard), sql).unwrap();
}

/// The tables of the first layout, as icr made them before the compact
/// one (each record three times; ids and MACs as text), and before
/// `dns_all` and `local` existed.
fn first_layout(cluster: &ClickHouseCluster) {
    let columns = "day Date, id String, probe String, start_us Int64, end_us Int64, end_reason UInt8, proto String, \
        device_mac String, device_ip Nullable(FixedString(16)), device_port Nullable(UInt16), vlan Array(UInt16), \
        pppoe_session Nullable(UInt16), subscriber String, public_ip FixedString(16), public_port UInt16, \
        remote_ip FixedString(16), remote_port UInt16, service_name String, service_source UInt8, service_ech UInt8, \
        dns_qname String, dns_qtype String, dns_answers Array(String), packets_up UInt64, packets_down UInt64, \
        bytes_up UInt64, bytes_down UInt64, incomplete UInt8";
    for sql in [
        "CREATE DATABASE icr".to_string(),
        "CREATE DATABASE icr_ingest".to_string(),
        format!("CREATE TABLE icr.records_local ({columns}) ENGINE = MergeTree PARTITION BY day ORDER BY (public_ip, public_port, start_us)"),
        format!("CREATE TABLE icr.records_by_device_local ({columns}) ENGINE = MergeTree PARTITION BY day ORDER BY (device_mac, start_us)"),
        format!("CREATE TABLE icr.records_by_service_local ({columns}) ENGINE = MergeTree PARTITION BY day ORDER BY (service_name, remote_ip, start_us)"),
        "CREATE MATERIALIZED VIEW icr.records_by_device_mv TO icr.records_by_device_local AS SELECT * FROM icr.records_local".to_string(),
        "CREATE MATERIALIZED VIEW icr.records_by_service_mv TO icr.records_by_service_local AS SELECT * FROM icr.records_local".to_string(),
        format!("CREATE TABLE icr.records AS icr.records_local ENGINE = Distributed({CLUSTER}, icr, records_local, cityHash64(public_ip))"),
        format!("CREATE TABLE icr.records_by_device AS icr.records_by_device_local ENGINE = Distributed({CLUSTER}, icr, records_by_device_local, rand())"),
        format!("CREATE TABLE icr_ingest.records_local ({columns}) ENGINE = Null"),
        "CREATE MATERIALIZED VIEW icr_ingest.records_mv TO icr.records_local AS SELECT * FROM icr_ingest.records_local".to_string(),
        format!("CREATE TABLE icr_ingest.records AS icr_ingest.records_local ENGINE = Distributed({CLUSTER}, icr_ingest, records_local, cityHash64(public_ip))"),
    ] {
        on_every_shard(cluster, &sql);
    }
}

#[test]
fn init_copies_an_older_layout_into_the_compact_one_and_its_records_stay_answerable() {
    let cluster = ClickHouseCluster::start(2).expect("two ClickHouse shards");
    first_layout(&cluster);
    // Records of two days on both shards, as gateways shipped them then:
    // a DNS exchange in dns_* alone; and a row no gateway could write.
    let sync = format!("{}/?insert_distributed_sync=1", cluster.url(0));
    let now = chrono_now();
    let mut rows = Vec::new();
    for (n, age) in [(1u32, 1i64), (2, 1), (3, 2), (4, 2), (5, 2), (6, 1)] {
        let start_us = (now - age * 86_400) * 1_000_000;
        rows.push(format!(
            "(toDate(toDateTime({})), '0192f1c4-0000-7000-8000-00000000000{n}', 'gw-old', {start_us}, {}, 1, 'udp', \
             '02:1c:00:00:00:0{n}', toFixedString(unhex('00000000000000000000ffff6440000{n}'), 16), 5353, [], NULL, 'line-{n}', \
             toFixedString(unhex('00000000000000000000ffffcb00710{n}'), 16), 4000{n}, toFixedString(unhex('00000000000000000000ffffc6336435'), 16), 53, \
             'old{n}.example', 1, 0, 'old{n}.example', 'A', ['198.51.100.{n}'], 1, 1, 60, 90, 0)",
            start_us / 1_000_000,
            start_us + 2_000_000,
        ));
    }
    rows.push(
        "(today() - 1, 'forged', 'gw-old', 0, 0, 1, 'tcp', '', NULL, NULL, [], NULL, '', toFixedString(unhex('00000000000000000000ffffcb007101'), 16), \
         1, toFixedString(unhex('00000000000000000000ffffc6336435'), 16), 443, '', 0, 0, '', '', [], 0, 0, 0, 0, 0)"
            .to_string(),
    );
    cluster.query_at(&sync, &format!("INSERT INTO icr.records VALUES {}", rows.join(", "))).unwrap();
    let three_times = cluster.query_at(&cluster.url(0), "SELECT count() FROM icr.records_by_device").unwrap();
    assert_eq!(three_times.trim(), "7", "the first layout keeps each record again per question");

    let said = init(&cluster);
    for node in ["10.99.0.1", "10.99.0.2"] {
        assert!(said.contains(&format!("{node}:18123: the records of the older layout")), "{said}");
        assert!(
            said.contains(&format!("{node}:18123: every record of the older layout is in the new tables")),
            "{said}"
        );
    }
    let copied: u64 = said
        .lines()
        .filter(|l| l.contains(": copied day "))
        .map(|l| l.split(": ").nth(2).unwrap().split(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(copied, 6, "a progress line a day and node, every valid record: {said}");
    assert!(said.contains("1 row(s) no gateway could have written"), "{said}");
    for shard in 0..2 {
        let tables = cluster.query_at(&cluster.url(shard), "SHOW TABLES FROM icr").unwrap();
        for gone in ["records_by_device_local", "records_by_service_local", "records_v1_local"] {
            assert!(!tables.lines().any(|t| t == gone), "shard {shard} keeps no {gone}: {tables}");
        }
    }
    let again = init(&cluster);
    assert!(!again.contains("copied") && !again.contains("older layout"), "{again}");

    // Each older record answers the three questions through the new tables.
    let central = central_dir(&cluster);
    let db = central.to_str().unwrap();
    let ask = |args: &[&str]| {
        let (code, stdout, stderr) = icr(
            &cluster,
            &[args, &["--clickhouse", cluster.url(0).as_str(), "--db", db, "--format", "ndjson"], &WHO].concat(),
        );
        assert_eq!(code, 0, "{args:?}: {stderr}");
        ndjson(&stdout)
    };
    let (from, to) = (icr_lab::rfc3339(now - 3 * 86_400), icr_lab::rfc3339(now));
    for (n, age) in [(1, 1i64), (4, 2)] {
        let at = icr_lab::rfc3339(now - age * 86_400 + 1);
        let answer =
            ask(&["query", "resolve", "--ip", &format!("203.0.113.{n}"), "--port", &format!("4000{n}"), "--at", &at]);
        assert_eq!(answer.len(), 1, "{answer:?}");
        let record = &answer[0];
        assert_eq!(record["id"], format!("0192f1c4-0000-7000-8000-00000000000{n}"));
        assert_eq!(record["device"]["mac"], format!("02:1c:00:00:00:0{n}"));
        assert_eq!(record["dns"]["qname"], format!("old{n}.example"), "the exchange of dns_*: {record}");
        assert_eq!(record["dns_all"][0], record["dns"], "and as dns_all's first");
        let services =
            ask(&["query", "services", "--device", &format!("02:1c:00:00:00:0{n}"), "--from", &from, "--to", &to]);
        assert_eq!(services.len(), 1, "{services:?}");
        assert_eq!(services[0]["name"], format!("old{n}.example"));
        let accessed =
            ask(&["query", "accessed", "--service", &format!("old{n}.example"), "--from", &from, "--to", &to]);
        let ids: Vec<&str> = accessed.iter().map(|r| r["id"].as_str().unwrap()).collect();
        assert_eq!(ids, [format!("0192f1c4-0000-7000-8000-00000000000{n}")]);
    }
}

/// The config of a gateway that ships to the cluster.
/// Pinned, so that an agent killed outright loses no flow (its successor
/// adopts them), and with short timeouts, so that flows close soon.
fn gateway_config(db: &Path, probe: &str, cluster: &ClickHouseCluster, metrics_port: u16, pins: &Path) {
    gateway_config_with(db, probe, &plain_section(cluster), metrics_port, pins);
}

fn gateway_config_with(db: &Path, probe: &str, section: &str, metrics_port: u16, pins: &Path) {
    std::fs::create_dir_all(db).unwrap();
    std::fs::write(
        db.join("icr.toml"),
        format!(
            "retention_days = 30\nprobe_id = \"{probe}\"\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\
             [probe]\nflow_table_size = 65536\npin_dir = \"{}\"\n\
             [timeouts]\ntcp_closed = \"1s\"\nudp_idle = \"2s\"\nfull_sweep = \"1s\"\n\
             {section}{AUTHORITIES}",
            pins.display(),
        ),
    )
    .unwrap();
}

fn fetch(lab: &Lab, client: usize, times: usize) {
    for _ in 0..times {
        lab.exec(
            &lab.clients[client].ns,
            Command::new("curl")
                .args(["-sk", "--max-time", "10", "-o", "/dev/null", &format!("https://{WEB_NAME}/")])
                .args(["--resolve", &format!("{WEB_NAME}:443:{WEB_IP}")]),
        )
        .expect("curl through the gateway");
    }
}

/// The backlog a gateway's agent reports.
fn backlog(lab: &Lab, port: u16) -> Option<u64> {
    let out =
        lab.exec(&lab.gateway, Command::new("curl").args(["-s", &format!("http://127.0.0.1:{port}/metrics")])).ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("icr_export_backlog_records ").and_then(|v| v.trim().parse().ok()))
}

/// Every record a gateway's own store holds, by id (listed through its
/// running agent).
fn gateway_records(lab: &Lab, db: &Path) -> BTreeMap<String, Value> {
    let now = chrono_now();
    let out = lab
        .exec(
            &lab.gateway,
            Command::new(icr_binary()).args(["list", "--db"]).arg(db).args([
                "--from",
                &icr_lab::rfc3339(now - 86_400),
                "--to",
                &icr_lab::rfc3339(now + 3_600),
                "--authority",
                "lab-noc",
                "--officer",
                "NOC 1",
                "--reference",
                "MAINT-1",
                "--format",
                "ndjson",
            ]),
        )
        .expect("listing the gateway's store");
    ndjson(&String::from_utf8_lossy(&out.stdout))
        .into_iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r))
        .collect()
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Rows and distinct record ids the cluster holds.
fn stored(cluster: &ClickHouseCluster) -> (u64, u64) {
    let text = cluster.query_at(&cluster.url(0), "SELECT count(), uniqExact(id) FROM icr.records").unwrap();
    let mut numbers = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

/// Waits until both gateways have shipped everything; else fails with
/// their agents' logs.
fn drain(labs: &[Lab; 2], ports: [u16; 2], agents: &[Option<Agent>]) {
    let drained = wait_for(patience(Duration::from_secs(90)), "the backlogs to drain", || {
        Ok(labs.iter().zip(ports).all(|(lab, port)| backlog(lab, port) == Some(0)))
    });
    if let Err(error) = drained {
        let backlogs: Vec<Option<u64>> = labs.iter().zip(ports).map(|(lab, port)| backlog(lab, port)).collect();
        let logs: Vec<String> = agents.iter().flatten().map(Agent::log_text).collect();
        panic!("{error:#}: backlogs {backlogs:?}\n{}", logs.join("\n----\n"));
    }
}

#[test]
fn two_gateways_ship_every_record_once_and_the_cluster_answers_for_both() {
    let mut cluster = ClickHouseCluster::start(2).expect("two ClickHouse shards");
    init(&cluster);
    let labs = [
        Lab::start_with_public(2, Nat::Masquerade, "203.0.113.1").expect("gateway A"),
        Lab::start_with_public(2, Nat::Masquerade, "203.0.113.2").expect("gateway B"),
    ];
    let dirs = [TempDir::new("ch-gw-a"), TempDir::new("ch-gw-b")];
    let bpffs: Vec<Bpffs> = labs.iter().map(|lab| Bpffs::mount(lab.dir.join("bpffs"))).collect();
    let ports = [9471u16, 9472];
    let mut agents = Vec::new();
    for (index, lab) in labs.iter().enumerate() {
        cluster.link(lab).unwrap();
        gateway_config(
            dirs[index].path(),
            ["gw-a", "gw-b"][index],
            &cluster,
            ports[index],
            &bpffs[index].0.join("icr"),
        );
        agents.push(Some(Agent::start(lab, &icr_binary(), dirs[index].path()).expect("the agent starts")));
    }

    // Traffic through both gateways; then ClickHouse goes away for a while
    // (both servers stopped), and traffic goes on.
    for lab in &labs {
        fetch(lab, 0, 3);
        fetch(lab, 1, 2);
    }
    cluster.stop_shard(0).unwrap();
    cluster.stop_shard(1).unwrap();
    for lab in &labs {
        fetch(lab, 0, 2);
        fetch(lab, 1, 3);
    }
    // The agents close flows within seconds; their records wait in the outbox.
    wait_for(patience(Duration::from_secs(40)), "records waiting while ClickHouse is down", || {
        Ok(labs.iter().zip(ports).all(|(lab, port)| backlog(lab, port).is_some_and(|n| n > 0)))
    })
    .unwrap();
    // Gateway A's agent is killed outright meanwhile, and started again;
    // first its flows close and are stored (a record closed in the last
    // tick before a kill is lost: see the note on #18).
    std::thread::sleep(Duration::from_secs(4));
    agents[0].take().unwrap().kill().unwrap();
    agents[0] = Some(Agent::start(&labs[0], &icr_binary(), dirs[0].path()).expect("the agent restarts"));
    cluster.start_shard(0).unwrap();
    cluster.start_shard(1).unwrap();
    drain(&labs, ports, &agents);
    // More traffic while shipping runs, and a kill in the middle of it.
    fetch(&labs[0], 0, 4);
    std::thread::sleep(Duration::from_secs(4));
    agents[0].take().unwrap().kill().unwrap();
    agents[0] = Some(Agent::start(&labs[0], &icr_binary(), dirs[0].path()).expect("the agent restarts"));
    fetch(&labs[1], 1, 2);

    // Every flow closed (1 s after its FIN) and shipped.
    std::thread::sleep(Duration::from_secs(4));
    drain(&labs, ports, &agents);
    let gateway: Vec<BTreeMap<String, Value>> =
        labs.iter().zip(&dirs).map(|(lab, dir)| gateway_records(lab, dir.path())).collect();
    let (rows, ids) = stored(&cluster);
    let all: BTreeMap<&String, &Value> = gateway.iter().flatten().collect();
    eprintln!("cluster: {rows} rows, {ids} distinct records; gateways: {} records", all.len());
    assert_eq!(ids as usize, all.len(), "every record of both gateways arrived");

    // What an agent killed between an insert and forgetting the batch does:
    // the batch is stored twice. Here every record of gateway A is (the
    // same rows again); answers must still hold each record once.
    let again = format!("{}/?insert_distributed_sync=1", cluster.url(0));
    cluster.query_at(&again, "INSERT INTO icr.records SELECT * FROM icr.records WHERE probe = 'gw-a'").unwrap();
    let (rows, ids) = stored(&cluster);
    let gw_a = gateway[0].len() as u64;
    assert_eq!((rows, ids), (all.len() as u64 + gw_a, all.len() as u64), "gateway A's records are stored twice");

    // Every request nginx logged resolves across the cluster to its device and gateway.
    let central = central_dir(&cluster);
    let db = central.to_str().unwrap();
    let url = cluster.url(0);
    let mut resolved = 0;
    for (lab, records) in labs.iter().zip(&gateway) {
        for line in lab.web_access_log().unwrap() {
            let answer = resolve_on_cluster(&cluster, &url, db, &line);
            assert!(!answer.is_empty(), "{}:{} at {} resolves", line.address, line.port, line.time);
            let ids: Vec<&str> = answer.iter().map(|r| r["id"].as_str().unwrap()).collect();
            let unique: std::collections::BTreeSet<&str> = ids.iter().copied().collect();
            assert_eq!(unique.len(), ids.len(), "no record twice in an answer: {ids:?}");
            let first = &answer[0];
            let theirs = &records[first["id"].as_str().unwrap()];
            assert_eq!(first, theirs, "the cluster's record is the gateway's own");
            assert_eq!(first["public"]["ip"], lab.public_ip.as_str());
            resolved += 1;
        }
    }
    assert!(resolved >= 20, "{resolved} requests resolved");

    // Questions 2 and 3 across the cluster: the union of both gateways' answers.
    let (from, to) = (icr_lab::rfc3339(chrono_now() - 3_600), icr_lab::rfc3339(chrono_now() + 60));
    let (code, stdout, stderr) = icr(
        &cluster,
        &[
            &["query", "accessed", "--service", WEB_NAME, "--from", &from, "--to", &to][..],
            &["--clickhouse", url.as_str(), "--db", db, "--format", "ndjson"],
            &WHO,
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{stderr}");
    let across: std::collections::BTreeSet<String> =
        ndjson(&stdout).iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    let expected: std::collections::BTreeSet<String> = gateway
        .iter()
        .flatten()
        .filter(|(_, r)| {
            r["service"]["name"] == WEB_NAME
                || r["dns_all"].as_array().is_some_and(|all| all.iter().any(|d| d["qname"] == WEB_NAME))
        })
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(across, expected, "question 3 over the cluster is the union of the gateways'");
    let probes: std::collections::BTreeSet<String> =
        ndjson(&stdout).iter().map(|r| r["probe"].as_str().unwrap_or_default().to_string()).collect();
    assert_eq!(probes, ["gw-a", "gw-b"].map(String::from).into(), "both gateways named");
    // The local filter, in the cluster's SQL: these connections all left
    // their gateway.
    for (local, expected) in [("exclude", expected.clone()), ("only", Default::default())] {
        let (code, stdout, stderr) = icr(
            &cluster,
            &[
                &[
                    "query",
                    "accessed",
                    "--service",
                    WEB_NAME,
                    "--service",
                    "*.example.invalid",
                    "--local",
                    local,
                    "--from",
                    &from,
                    "--to",
                    &to,
                ][..],
                &["--clickhouse", url.as_str(), "--db", db, "--format", "ndjson"],
                &WHO,
            ]
            .concat(),
        );
        assert_eq!(code, 0, "{stderr}");
        let ids: std::collections::BTreeSet<String> =
            ndjson(&stdout).iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
        assert_eq!(ids, expected, "--local {local}");
    }
    let device = &labs[1].clients[1];
    let (code, stdout, stderr) = icr(
        &cluster,
        &[
            &["query", "services", "--device", &device.mac, "--from", &from, "--to", &to][..],
            &["--clickhouse", url.as_str(), "--db", db, "--format", "ndjson"],
            &WHO,
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{stderr}");
    let rows = ndjson(&stdout);
    let web = rows.iter().find(|r| r["name"] == WEB_NAME).unwrap_or_else(|| panic!("{rows:?}"));
    // The labs give their clients the same MACs: the device is on both
    // gateways, and the cluster's answer is the union of theirs.
    let connections = gateway
        .iter()
        .flat_map(|g| g.values())
        .filter(|r| r["device"]["mac"] == device.mac.as_str() && r["service"]["name"] == WEB_NAME)
        .count();
    assert_eq!(
        web["connections"], connections as u64,
        "question 2 over the cluster: both gateways' connections, each once"
    );

    // An operator's listing over the cluster: every record once.
    let (code, stdout, stderr) = icr(
        &cluster,
        &[
            &[
                "list",
                "--from",
                &from,
                "--to",
                &to,
                "--authority",
                "lab-noc",
                "--officer",
                "NOC 1",
                "--reference",
                "MAINT-CH",
            ][..],
            &["--clickhouse", url.as_str(), "--db", db, "--format", "ndjson"],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{stderr}");
    let listing = stdout;
    let listed: Vec<String> = ndjson(&listing).iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(listed.len(), all.len(), "listed once each, though gateway A's are stored twice");
    assert_eq!(listed.iter().collect::<std::collections::BTreeSet<_>>(), all.keys().copied().collect());

    // The same window as IPFIX for a provider's collector (`icr export
    // ipfix` over the cluster), to a file tshark reads: every record's device
    // port in it, and an audit entry at the desk.
    let file = Path::new(db).join("cluster.ipfix");
    let (code, stdout, stderr) = icr(
        &cluster,
        &[
            "export",
            "ipfix",
            "--from",
            &from,
            "--to",
            &to,
            "--authority",
            "lab-noc",
            "--officer",
            "NOC 1",
            "--reference",
            "MAINT-CH-IPFIX",
            "--clickhouse",
            url.as_str(),
            "--db",
            db,
            "--file",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with(&format!("{} records", listed.len())), "{stdout}");
    let tshark = |extra: &[&str]| {
        let out = Command::new("tshark").arg("-r").arg(&file).args(extra).output().unwrap();
        assert!(out.status.success(), "tshark reads the file: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let in_file: std::collections::BTreeSet<u64> = tshark(&["-T", "fields", "-e", "cflow.srcport"])
        .split([',', '\n'])
        .filter_map(|port| port.trim().parse().ok())
        .collect();
    let listed_ports: std::collections::BTreeSet<u64> =
        ndjson(&listing).iter().map(|r| r["device"]["port"].as_u64().unwrap()).collect();
    assert_eq!(in_file, listed_ports, "every record of the cluster's window in the file");
    let expert = tshark(&["-q", "-z", "expert,warn"]);
    assert!(!expert.contains("Warns") && !expert.contains("Errors"), "tshark on the file:\n{expert}");
    let audit = std::fs::read_to_string(Path::new(db).join("audit.log")).unwrap();
    assert_eq!(audit.lines().filter(|l| l.contains("\"export ipfix\"") && l.contains("MAINT-CH-IPFIX")).count(), 1);

    // The central query service: the same question over HTTP, answered from
    // the cluster by `icr serve`, audited in the same log.
    let line = &labs[1].web_access_log().unwrap()[0];
    let mut serve = cluster.spawn(Command::new(icr_binary()).args(["serve", "--db", db]), "serve").unwrap();
    let body = format!(
        r#"{{"ip": "{}", "port": {}, "at": "{}", "tolerance": "2s", "officer": "PC 1", "reference": "OP-CH-HTTP"}}"#,
        line.address,
        line.port,
        icr_lab::rfc3339(line.time as i64)
    );
    let post = || {
        cluster
            .exec(Command::new("curl").args([
                "-s",
                "--max-time",
                "20",
                "-w",
                "\n%{http_code}",
                "-H",
                "ICR-Authority: lab-police",
                "-H",
                &format!("Authorization: Bearer {TOKEN}"),
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &body,
                &format!("http://{CENTRAL_HTTP}/v1/query/resolve"),
            ]))
            .unwrap()
    };
    wait_for(patience(Duration::from_secs(20)), "icr serve to answer", || {
        Ok(String::from_utf8_lossy(&post().stdout).ends_with("200"))
    })
    .unwrap();
    let answer = String::from_utf8_lossy(&post().stdout).into_owned();
    let (records, _) = answer.rsplit_once('\n').unwrap();
    let over_http = ndjson(records);
    assert_eq!(over_http[0]["public"]["ip"], "203.0.113.2");
    assert_eq!(
        over_http[0],
        gateway[1][over_http[0]["id"].as_str().unwrap()],
        "the central API answers with gateway B's own record"
    );
    // SAFETY: our own child.
    unsafe { libc::kill(serve.id() as i32, libc::SIGTERM) };
    serve.wait().unwrap();

    for (agent, dir) in agents.iter_mut().zip(&dirs) {
        agent.take().unwrap().stop().expect("the agent stops");
        let detach = Command::new(icr_binary()).args(["detach", "--db"]).arg(dir.path()).output().unwrap();
        assert!(detach.status.success(), "{}", String::from_utf8_lossy(&detach.stderr));
    }
    // Retention on the cluster: nothing is older than 30 days, nothing dropped.
    let (code, stdout, stderr) = icr(&cluster, &["sweep", "--db", db, "--clickhouse", url.as_str()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("dropped 0 day(s)"), "{stdout}");
    let verify = icr(&cluster, &["audit", "verify", "--db", db]);
    assert_eq!(verify.0, 0, "{}", verify.2);
}

#[test]
fn a_secured_cluster_takes_each_user_over_https_for_its_part_only() {
    let mut cluster = ClickHouseCluster::start_secured(2).expect("two ClickHouse shards with password users and HTTPS");
    let ca = cluster.ca.clone().unwrap();
    let secrets = cluster.dir.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let url = cluster.https_url(0);
    let init = |url: &str, password_file: &Path, ca: Option<&Path>| {
        let mut args = vec![
            "clickhouse",
            "init",
            "--url",
            url,
            "--cluster",
            CLUSTER,
            "--user",
            ADMIN.name,
            "--password-file",
            password_file.to_str().unwrap(),
        ];
        if let Some(ca) = ca {
            args.extend(["--ca", ca.to_str().unwrap()]);
        }
        icr(&cluster, &args)
    };

    // The cluster has no password-less user at all.
    let anonymous = cluster
        .exec(Command::new("curl").args(["-sS", "--cacert", ca.to_str().unwrap(), "--data-binary", "SELECT 1", &url]))
        .unwrap();
    assert!(String::from_utf8_lossy(&anonymous.stdout).contains("Unknown user default"), "{anonymous:?}");

    // A wrong password fails, clearly, and is not shown.
    let wrong = password_file(&secrets.join("wrong.password"), "not-the-Password");
    let (code, _, stderr) = init(&url, &wrong, Some(&ca));
    assert_ne!(code, 0);
    assert!(stderr.contains("Wrong password for user icr_admin") && !stderr.contains("not-the-Password"), "{stderr}");
    // Credentials in the URL: refused (not dropped), and never shown.
    let admin_password = password_file(&secrets.join("admin.password"), ADMIN.password);
    for bad in [
        format!("https://{}:{}@10.99.0.1:18443", ADMIN.name, ADMIN.password),
        format!("{url}/?password={}", ADMIN.password),
        format!("{url}/?user={}&password={}", ADMIN.name, ADMIN.password),
    ] {
        let (code, _, stderr) = init(&bad, &admin_password, Some(&ca));
        assert_ne!(code, 0);
        assert!(stderr.contains("carries credentials") && !stderr.contains(ADMIN.password), "{stderr}");
    }
    // A password file others may read is refused.
    let loose = secrets.join("loose.password");
    std::fs::write(&loose, ADMIN.password).unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (code, _, stderr) = init(&url, &loose, Some(&ca));
    assert_ne!(code, 0);
    assert!(stderr.contains("readable by root only"), "{stderr}");
    // HTTPS is verified: the system's roots do not know the lab's CA.
    let (code, _, stderr) = init(&url, &admin_password, None);
    assert_ne!(code, 0);
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    let (code, stdout, stderr) = init(&url, &admin_password, Some(&ca));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("on 2 node(s)") && stdout.contains("https://10.99.0.2:18443"), "{stdout}");

    // A gateway ships over HTTPS as its own user.
    let lab = Lab::start_with_public(2, Nat::Masquerade, "203.0.113.1").expect("a gateway");
    let store = TempDir::new("ch-gw-secured");
    let bpffs = Bpffs::mount(lab.dir.join("bpffs"));
    cluster.link(&lab).unwrap();
    let gateway_password = password_file(&secrets.join("gw07.password"), GATEWAY.password);
    let port = 9473;
    gateway_config_with(
        store.path(),
        "gw-07",
        &secured_section(&cluster, GATEWAY, &gateway_password),
        port,
        &bpffs.0.join("icr"),
    );
    let agent = Agent::start(&lab, &icr_binary(), store.path()).expect("the agent starts");
    fetch(&lab, 0, 3);
    fetch(&lab, 1, 2);
    std::thread::sleep(Duration::from_secs(3));
    let shipped = wait_for(patience(Duration::from_secs(60)), "the gateway to ship", || {
        Ok(backlog(&lab, port) == Some(0) && stored(&cluster).1 > 0)
    });
    if let Err(error) = shipped {
        panic!("{error:#}: backlog {:?}\n{}", backlog(&lab, port), agent.log_text());
    }
    let records = gateway_records(&lab, store.path());
    assert_eq!(stored(&cluster).1 as usize, records.len(), "every record arrived");

    // Questions over HTTPS as the read-only query user.
    let query_password = password_file(&secrets.join("query.password"), QUERY.password);
    let central = central_dir_with(&cluster, "central-secured", &secured_section(&cluster, QUERY, &query_password));
    let db = central.to_str().unwrap();
    let lines = lab.web_access_log().unwrap();
    assert!(lines.len() >= 5, "{} requests", lines.len());
    for line in &lines {
        let answer = resolve_on_cluster(&cluster, &url, db, line);
        assert_eq!(answer[0], records[answer[0]["id"].as_str().unwrap()], "the cluster's record is the gateway's own");
    }
    // A password file inside the directory it serves is refused.
    let inside = password_file(&central.join("query.password"), QUERY.password);
    let careless = central_dir_with(&cluster, "central-careless", &secured_section(&cluster, QUERY, &inside));
    std::fs::rename(&inside, careless.join("query.password")).unwrap();
    let careless_config = std::fs::read_to_string(careless.join("icr.toml"))
        .unwrap()
        .replace(inside.to_str().unwrap(), careless.join("query.password").to_str().unwrap());
    std::fs::write(careless.join("icr.toml"), careless_config).unwrap();
    let line = &lines[0];
    let at = icr_lab::rfc3339(line.time as i64);
    let resolve =
        ["query", "resolve", "--ip", &line.address, "--port", &line.port.to_string(), "--at", &at, "--tolerance", "2s"];
    let (code, _, stderr) = icr(
        &cluster,
        &[&resolve[..], &["--clickhouse", url.as_str(), "--db", careless.to_str().unwrap()], &WHO].concat(),
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("inside the store"), "{stderr}");
    // A URL with credentials is refused for questions too, and audited nowhere.
    let with_password = format!("https://{}:{}@10.99.0.1:18443", QUERY.name, QUERY.password);
    let (code, _, stderr) =
        icr(&cluster, &[&resolve[..], &["--clickhouse", with_password.as_str(), "--db", db], &WHO].concat());
    assert_ne!(code, 0);
    assert!(stderr.contains("carries credentials") && !stderr.contains(QUERY.password), "{stderr}");
    let audit = std::fs::read_to_string(central.join("audit.log")).unwrap();
    assert!(!audit.contains(QUERY.password) && !audit.contains(GATEWAY.password), "{audit}");

    // A row forged into the cluster (by whoever holds a writer's password)
    // is reported, never answered as it is.
    let now_us = chrono_now() * 1_000_000;
    let forged_at = icr_lab::rfc3339(now_us / 1_000_000);
    let forged = format!(
        "INSERT INTO icr_ingest.records (day, id, start_us, end_us, public_ip, public_port, remote_ip, remote_port, proto, service_name, service_source) \
         VALUES (today(), UUIDStringToNum('0192f1c4-0000-7000-8000-0000000000ff'), {now_us}, {now_us}, toFixedString(unhex('00000000000000000000ffffcb007101'), 16), \
         40999, toFixedString(unhex('00000000000000000000ffffc6336410'), 16), 443, 'tcp', '=HYPERLINK(\\'http://x.example/\\',\\'open\\')', 1)"
    );
    cluster.query_as(GATEWAY, &format!("{url}/?insert_distributed_sync=1"), &forged).unwrap();
    let (code, stdout, stderr) = icr(
        &cluster,
        &[
            &["query", "resolve", "--ip", "203.0.113.1", "--port", "40999", "--at", &forged_at][..],
            &["--clickhouse", url.as_str(), "--db", db, "--format", "csv"],
            &WHO,
        ]
        .concat(),
    );
    assert_ne!(code, 0, "{stdout}");
    assert!(
        !stdout.contains("HYPERLINK") && stderr.contains("no valid record") && stderr.contains("service_name"),
        "{stdout}{stderr}"
    );
    // A name capture could have made, which a spreadsheet would take for a
    // formula: answered, and neutralised in the CSV and the bundle's copy.
    let plausible = forged
        .replace("8000-0000000000ff", "8000-0000000000fe")
        .replace("40999", "40998")
        .replace("'=HYPERLINK(\\'http://x.example/\\',\\'open\\')'", "'-2.example.test'");
    assert!(plausible.contains("'-2.example.test'"), "{plausible}");
    cluster.query_as(GATEWAY, &format!("{url}/?insert_distributed_sync=1"), &plausible).unwrap();
    let bundle = cluster.dir.join("bundle-csv");
    let (code, stdout, stderr) =
        icr(
            &cluster,
            &[
                &[
                    "query",
                    "resolve",
                    "--ip",
                    "203.0.113.1",
                    "--port",
                    "40998",
                    "--at",
                    &forged_at,
                    "--tolerance",
                    "5s",
                ][..],
                &["--clickhouse", url.as_str(), "--db", db, "--format", "csv", "--bundle", bundle.to_str().unwrap()],
                &WHO,
            ]
            .concat(),
        );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.lines().nth(1).is_some_and(|row| row.contains(",'-2.example.test,")), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(bundle.join("results.csv")).unwrap(),
        stdout,
        "the bundle's CSV is the one disclosed"
    );

    // What each user may do, as ClickHouse 18.16 enforces it.
    let refused = |user: User, url: &str, sql: &str| cluster.query_as(user, url, sql).expect_err(sql).to_string();
    let ddl_forced = format!("{url}/?allow_ddl=1");
    assert!(
        refused(GATEWAY, &url, "SELECT count() FROM icr.records")
            .contains("Access denied to database icr for user icr_gw07")
    );
    assert_eq!(
        cluster.query_as(GATEWAY, &url, "SELECT count() FROM icr_ingest.records").unwrap().trim(),
        "0",
        "what it wrote is not kept where it may read"
    );
    for sql in [
        "DROP TABLE icr.records_local",
        "ALTER TABLE icr.records_local DROP PARTITION today()",
        "TRUNCATE TABLE icr.records",
    ] {
        // allow_ddl=0 alone would not hold: 18.16 takes allow_ddl=1 from the URL.
        assert!(
            refused(GATEWAY, &ddl_forced, sql).contains("Access denied to database icr for user icr_gw07"),
            "{sql}"
        );
    }
    assert!(refused(GATEWAY, &url, "DROP TABLE icr_ingest.records").contains("DDL queries are prohibited"));
    assert!(refused(QUERY, &url, "INSERT INTO icr.records_local (id) VALUES ('forged')").contains("readonly mode"));
    assert!(
        refused(QUERY, &url, "INSERT INTO icr_ingest.records_local (id) VALUES ('forged')").contains("readonly mode")
    );
    assert!(refused(QUERY, &url, "DROP TABLE icr.records").contains("readonly mode"));
    assert!(refused(QUERY, &format!("{url}/?readonly=0"), "SELECT 1").contains("readonly"));
    let kept = cluster.query_at(&url, "SELECT count() FROM icr.records").unwrap();
    assert_eq!(kept.trim().parse::<usize>().unwrap(), records.len() + 2, "nothing dropped; the forged rows are there");

    agent.stop().expect("the agent stops");
    let detach = Command::new(icr_binary()).args(["detach", "--db"]).arg(store.path()).output().unwrap();
    assert!(detach.status.success(), "{}", String::from_utf8_lossy(&detach.stderr));
}

/// A sweep of the cluster is the desk's, as a store's is: refused to a user
/// other than root and the owner of the directory that governs and audits
/// it, and to another configuration's retention; audited once whatever its
/// outcome; carried out by the cluster backend. Asked in-process, from a
/// thread in the provider's namespace.
#[test]
fn a_cluster_sweep_is_authorised_and_audited_once_at_the_desk() {
    use std::os::unix::fs::MetadataExt as _;

    use icr::{
        config::StoreConfig,
        query::{Desk, Failure, Operator, Sweep, Sweeper},
    };

    let cluster = ClickHouseCluster::start(2).expect("two ClickHouse shards");
    init(&cluster);
    let central = central_dir(&cluster);
    let started = chrono_now();
    insert_record(&cluster, "0192f1c4-0000-7000-8000-000000000040", started, 40, "203.0.113.1", 40000);
    insert_record(&cluster, "0192f1c4-0000-7000-8000-000000000001", started, 0, "203.0.113.1", 40000);
    let count = || cluster.query_at(&cluster.url(0), "SELECT count() FROM icr.records").unwrap().trim().to_string();
    assert_eq!(count(), "2");
    let forged = cluster.dir.join("mine.toml");
    std::fs::write(&forged, "retention_days = 1\n").unwrap();

    let (url, dir, ns) = (cluster.url(0), central.clone(), cluster.ns.clone());
    let outcomes = std::thread::spawn(move || {
        icr_test_kit::netns::enter(&ns).unwrap();
        let governing = StoreConfig::of_store(&dir).unwrap();
        let backend = icr::cli::route::cluster_of(&url, &governing).unwrap();
        let desk = Desk::new(&dir, &governing, &backend);
        let owner = std::fs::metadata(&dir).unwrap().uid();
        let operator = |uid| Sweeper::Operator(Operator { uid, sudo_user: None });
        let stranger = if owner == 64_099 { 64_098 } else { 64_099 };
        [
            desk.sweep(&Sweep { by: operator(stranger), config: None }),
            desk.sweep(&Sweep { by: operator(owner), config: Some(forged) }),
            desk.sweep(&Sweep { by: operator(owner), config: None }),
        ]
    })
    .join()
    .unwrap();
    let [stranger, forged, swept] = outcomes;
    assert!(matches!(&stranger, Err(Failure::Refused(r)) if r.0.contains("operator's")), "{stranger:?}");
    assert!(matches!(&forged, Err(Failure::Refused(r)) if r.0.contains("governed by its configuration")), "{forged:?}");
    let summary = swept.unwrap();
    assert!(summary.starts_with(&format!("retention 30 days on {}: dropped 1 day(s)", cluster.url(0))), "{summary}");
    assert_eq!(count(), "1", "the 40-day-old record's day is gone, today's kept");

    let audit = std::fs::read_to_string(central.join("audit.log")).unwrap();
    let entries: Vec<Value> = audit.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(entries.len(), 3, "each sweep audited once: {audit}");
    assert!(entries.iter().all(|entry| entry["command"] == "sweep"), "{audit}");
    assert!(entries[..2].iter().all(|entry| entry["outcome"].as_str().unwrap().starts_with("refused")), "{audit}");
    assert_eq!(entries[2]["outcome"], summary.as_str());
    assert_eq!(entries[2]["parameters"]["clickhouse"], cluster.url(0).as_str());
    assert_eq!(entries[2]["result_count"], 1);
    let verify = icr(&cluster, &["audit", "verify", "--db", central.to_str().unwrap()]);
    assert_eq!(verify.0, 0, "{}", verify.2);
}

/// Gateways shipping at once: each ships [`SHIP_TICKS`] ticks of
/// [`SHIP_PER_TICK`] records, half a second apart.
const GATEWAYS: usize = 6;
const SHIP_TICKS: u32 = 16;
const SHIP_PER_TICK: u32 = 250;

/// The names question 3 asks for: some of the most popular of the
/// synthetic stream's, and one no record carries.
fn popular_names() -> Vec<String> {
    let mut names: Vec<String> =
        [1u32, 2, 3, 5, 8, 13, 21, 34].into_iter().map(icr_test_kit::synthetic::Generator::name).collect();
    names.push("nobody.example".to_string());
    names
}

#[test]
fn six_gateways_ship_at_once_through_a_shard_restart_and_the_cluster_answers_their_union() {
    let started = std::time::Instant::now();
    let mut cluster = ClickHouseCluster::start_secured(2).expect("two ClickHouse shards with password users and HTTPS");
    let secrets = cluster.dir.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let admin = password_file(&secrets.join("admin.password"), ADMIN.password);
    let url = cluster.https_url(0);
    let ca = cluster.ca.clone().unwrap();
    let (code, _, stderr) = icr(
        &cluster,
        &[
            "clickhouse",
            "init",
            "--url",
            &url,
            "--cluster",
            CLUSTER,
            "--user",
            ADMIN.name,
            "--password-file",
            admin.to_str().unwrap(),
            "--ca",
            ca.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{stderr}");

    // Six gateways, each its own store and probe id, shipping over HTTPS as
    // a gateway user, at the same time.
    let gateway_password = password_file(&secrets.join("gateway.password"), GATEWAY.password);
    let section = secured_section(&cluster, GATEWAY, &gateway_password);
    let dirs: Vec<TempDir> = (0..GATEWAYS).map(|n| TempDir::new(&format!("ch-gw{n}"))).collect();
    let mut shippers: Vec<std::process::Child> = dirs
        .iter()
        .enumerate()
        .map(|(n, dir)| {
            std::fs::write(
                dir.path().join("icr.toml"),
                format!("retention_days = 30\nprobe_id = \"gw-{n}\"\n{section}{AUTHORITIES}"),
            )
            .unwrap();
            cluster
                .spawn(
                    Command::new(env!("CARGO_BIN_EXE_gateway-ship")).arg(dir.path()).args([
                        &(100 + n).to_string(),
                        &SHIP_TICKS.to_string(),
                        &SHIP_PER_TICK.to_string(),
                    ]),
                    &format!("gw-{n}"),
                )
                .unwrap()
        })
        .collect();
    let logs = |cluster: &ClickHouseCluster| -> String {
        (0..GATEWAYS)
            .map(|n| std::fs::read_to_string(cluster.dir.join(format!("gw-{n}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("----\n")
    };

    // Mid-run, once every gateway has shipped something, shard 1 stops
    // for a while and comes back.
    let shipped_by_all = wait_for(patience(Duration::from_secs(30)), "every gateway to ship something", || {
        let probes = cluster.query_at(&cluster.url(0), "SELECT uniqExact(probe) FROM icr.records")?;
        Ok(probes.trim() == GATEWAYS.to_string())
    });
    if let Err(error) = shipped_by_all {
        panic!("{error:#}\n{}", logs(&cluster));
    }
    cluster.stop_shard(1).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let during = shippers.iter_mut().map(|s| s.try_wait().unwrap()).filter(Option::is_none).count();
    assert_eq!(during, GATEWAYS, "every gateway still ships while the shard is down\n{}", logs(&cluster));
    cluster.start_shard(1).unwrap();
    for shipper in &mut shippers {
        let done = wait_for(patience(Duration::from_secs(150)), "a gateway to ship everything", || {
            Ok(shipper.try_wait()?.is_some())
        });
        if let Err(error) = done {
            let _ = shipper.kill();
            panic!("{error:#}\n{}", logs(&cluster));
        }
        assert!(shipper.wait().unwrap().success(), "{}", logs(&cluster));
    }
    let shipped_at = started.elapsed();
    let said = logs(&cluster);
    assert!(
        said.contains("failed, the outbox keeps everything")
            && said.contains("shipping to https://10.99.0.1:18443 again"),
        "the shard's absence was felt, and shipping resumed: {said}"
    );

    // Each gateway's own records, from its own store.
    let now = chrono_now();
    let (from, to) = (icr_lab::rfc3339(now - 2 * 3_600), icr_lab::rfc3339(now + 60));
    let own = |dir: &TempDir, args: &[&str]| -> Vec<Value> {
        let out = Command::new(icr_binary())
            .args(args)
            .args(["--from", &from, "--to", &to, "--db"])
            .arg(dir.path())
            .args(["--format", "ndjson"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        ndjson(&String::from_utf8_lossy(&out.stdout))
    };
    let listing = ["list", "--authority", "lab-noc", "--officer", "NOC 1", "--reference", "MAINT-6"];
    let mut every: BTreeMap<String, Value> = BTreeMap::new();
    for (n, dir) in dirs.iter().enumerate() {
        let records = own(dir, &listing);
        assert_eq!(records.len(), (SHIP_TICKS * SHIP_PER_TICK) as usize, "gateway {n} keeps what it was fed");
        for record in records {
            assert_eq!(record["probe"], format!("gw-{n}"));
            every.insert(record["id"].as_str().unwrap().to_string(), record);
        }
    }
    assert_eq!(every.len(), GATEWAYS * (SHIP_TICKS * SHIP_PER_TICK) as usize, "no id shared between gateways");

    // Every record of every gateway is in the cluster, once.
    let rows = cluster
        .query_at(&cluster.url(0), "SELECT UUIDNumToString(id), probe FROM icr.records ORDER BY id FORMAT TSV")
        .unwrap();
    let stored: Vec<(&str, &str)> = rows.lines().map(|l| l.split_once('\t').unwrap()).collect();
    let twice: Vec<&(&str, &str)> = stored.windows(2).filter(|w| w[0].0 == w[1].0).map(|w| &w[1]).collect();
    assert!(twice.is_empty(), "{} records stored more than once: {:?}", twice.len(), &twice[..twice.len().min(5)]);
    let ids: std::collections::BTreeSet<&str> = stored.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, every.keys().map(String::as_str).collect(), "the cluster holds exactly the gateways' records");
    for (id, probe) in &stored {
        assert_eq!(every[*id]["probe"], *probe, "{id} is named for its own gateway");
    }

    // Question 3 across all gateways through the query service (over HTTPS
    // as the read-only user) is the union of each gateway's own answer.
    let query_password = password_file(&secrets.join("query.password"), QUERY.password);
    let central = central_dir_with(&cluster, "central-six", &secured_section(&cluster, QUERY, &query_password));
    let names = popular_names();
    let mut accessed = vec!["query", "accessed"];
    for name in &names {
        accessed.extend(["--service", name.as_str()]);
    }
    accessed.extend(WHO);
    let mut union: BTreeMap<String, Value> = BTreeMap::new();
    for dir in &dirs {
        for record in own(dir, &accessed) {
            union.insert(record["id"].as_str().unwrap().to_string(), record);
        }
    }
    let (code, stdout, stderr) = icr(
        &cluster,
        &[
            &accessed[..],
            &["--from", &from, "--to", &to, "--clickhouse", &url, "--db", central.to_str().unwrap()],
            &["--format", "ndjson"],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{stderr}");
    let across = ndjson(&stdout);
    let mut answered: BTreeMap<String, Value> = BTreeMap::new();
    for record in across {
        let id = record["id"].as_str().unwrap().to_string();
        assert!(answered.insert(id.clone(), record).is_none(), "{id} answered twice");
    }
    assert!(union.len() > 100, "the names are popular: {} records", union.len());
    let probes: std::collections::BTreeSet<&str> = union.values().map(|r| r["probe"].as_str().unwrap()).collect();
    assert_eq!(probes.len(), GATEWAYS, "every gateway has records of these names");
    assert_eq!(answered.keys().collect::<Vec<_>>(), union.keys().collect::<Vec<_>>(), "the same records");
    assert_eq!(answered, union, "the cluster's records are the gateways' own, field for field");
    // Asked for many names, the query service reads the records' names
    // rather than the name table: the same answer.
    let mut many = accessed.clone();
    let absent: Vec<String> = (0..150).map(|n| format!("absent{n}.example")).collect();
    for name in &absent {
        many.extend(["--service", name.as_str()]);
    }
    let (code, stdout, stderr) = icr(
        &cluster,
        &[
            &many[..],
            &["--from", &from, "--to", &to, "--clickhouse", &url, "--db", central.to_str().unwrap()],
            &["--format", "ndjson"],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{stderr}");
    let scanned: BTreeMap<String, Value> =
        ndjson(&stdout).into_iter().map(|r| (r["id"].as_str().unwrap().to_string(), r)).collect();
    assert_eq!(scanned, union, "{} names: the same records", names.len() + absent.len());
    eprintln!(
        "{GATEWAYS} gateways: {} records shipped through a shard restart in {:.0} s; question 3: {} records; test {:.0} s",
        every.len(),
        shipped_at.as_secs_f64(),
        union.len(),
        started.elapsed().as_secs_f64()
    );
}
