//! One configuration file (`docs/cli.md`): the shipped `deploy/icr.toml`
//! loads as shipped, `icr config check` says what would load, the file
//! names the store for every command, and a store remembers the
//! configuration of its writer, so that questions asked after it stopped
//! are authorised by that file and by no other.
//!
//! The writer is `icr replay FILE --db DIR` where a store's governance is
//! the point (it opens the store for writing as the agent does and records
//! its configuration the same way, `query::audit::govern`), and a real
//! `icr run` in a lab of network namespaces, started with `--config` alone,
//! as the package's unit starts it. Runs the real binary; as root, for the
//! probe's BPF, the namespaces and the root-owned configurations.
use std::{
    collections::BTreeSet,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use icr_lab::{Agent, EXCHANGE_IP, GATEWAY_WAN_IF, Lab, TempDir, icr_binary};
use icr_test_kit::config::POLICE;

/// The repository's top folder.
fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `icr ARGS`, as on a machine with no `/etc/icr`: where this one has
/// one, the command runs in a mount namespace of its own with an empty
/// tmpfs over it.
fn icr_command(args: &[&str]) -> Command {
    let mut command = if Path::new("/etc/icr").exists() {
        let mut command = Command::new("/usr/bin/unshare");
        command.args(["--mount", "/bin/sh", "-c", "mount -t tmpfs tmpfs /etc/icr && exec \"$0\" \"$@\""]);
        command.arg(icr_binary());
        command
    } else {
        Command::new(icr_binary())
    };
    command.args(args);
    command
}

fn icr(args: &[&str]) -> Output {
    icr_command(args).output().expect("running icr")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Writes a configuration file: root's (the tests run as root), 0644.
fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// A capture file with no packets: enough for a replay to open the store
/// for writing.
fn empty_capture(dir: &Path) -> PathBuf {
    let file = dir.join("empty.pcap");
    let mut header = Vec::new();
    for field in
        [0xa1b2_c3d4u32.to_le_bytes(), [2, 0, 4, 0], [0; 4], [0; 4], 65_535u32.to_le_bytes(), 1u32.to_le_bytes()]
    {
        header.extend_from_slice(&field);
    }
    std::fs::write(&file, header).unwrap();
    file
}

/// `icr replay` of an empty capture into `db`, with `--config` if given.
fn replay(dir: &Path, db: &Path, config: Option<&Path>) -> Output {
    let capture = empty_capture(dir);
    let mut args = vec!["replay", path(&capture), "--db", path(db)];
    if let Some(config) = config {
        args.extend(["--config", path(config)]);
    }
    icr(&args)
}

/// Question 1 as `met`, with `extra` naming the store and configuration.
fn resolve(extra: &[&str]) -> Output {
    let mut args = vec![
        "query",
        "resolve",
        "--ip",
        "203.0.113.1",
        "--at",
        "2026-11-22T15:00:00Z",
        "--authority",
        "met",
        "--officer",
        "PC 1",
        "--reference",
        "OP-1",
        "--format",
        "ndjson",
    ];
    args.extend(extra);
    icr(&args)
}

/// The audit log of the store in `db`, parsed (empty if there is none).
fn audit_entries(db: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(db.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// The entries of the questions asked of the store in `db`.
fn questions(db: &Path) -> usize {
    audit_entries(db).iter().filter(|entry| entry["command"] == "query resolve").count()
}

fn sha256(file: &Path) -> String {
    let out = Command::new("sha256sum").arg(file).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

/// The (table, key) pairs a TOML text sets, commented out or not:
/// `# key = value` counts, as the shipped file comments out what names
/// something the package does not create.
fn keys(toml: &str) -> BTreeSet<(String, String)> {
    let mut table = String::new();
    let mut keys = BTreeSet::new();
    for line in toml.lines() {
        let line = line.trim_start().trim_start_matches('#').trim();
        if let Some(header) = line.strip_prefix('[') {
            let name = header.trim_start_matches('[');
            table = name[..name.find(']').unwrap_or(name.len())].trim().to_string();
        } else if let Some((key, _)) = line.split_once('=')
            && !key.trim().is_empty()
            && key.trim().chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            keys.insert((table.clone(), key.trim().to_string()));
        }
    }
    keys
}

#[test]
fn the_shipped_configuration_loads_where_nothing_of_icr_exists() {
    let shipped = repository().join("deploy/icr.toml");
    let home = TempDir::new("icr-config-home");
    let output = icr_command(&["config", "check", "--config", path(&shipped)])
        .env_clear()
        .env("HOME", home.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let effective = stdout(&output);
    // What the package relies on, and the defaults written out.
    for line in [
        "db = \"/var/lib/icr\"",
        "pin_dir = \"/sys/fs/bpf/icr\"",
        "retention_days = 365",
        "tcp_idle = \"5m\"",
        "console_idle = \"15m\"",
        "max_connections = 64",
    ] {
        assert!(effective.lines().any(|l| l == line), "{line} in:\n{effective}");
    }
    // Nothing in it names a file the package does not make.
    for absent in ["/etc/icr/audit.key", "[[authority]]", "[clickhouse]"] {
        assert!(!effective.contains(absent), "{absent} is commented out in the shipped file:\n{effective}");
    }
}

#[test]
fn every_key_the_contract_documents_is_shipped() {
    let contract = std::fs::read_to_string(repository().join("docs/cli.md")).unwrap();
    let section =
        &contract[contract.find("## The configuration file").expect("the contract's configuration section")..];
    let block = section.split("```toml").nth(1).and_then(|rest| rest.split("```").next()).expect("its TOML block");
    let documented = keys(block);
    assert!(documented.len() > 15, "the block was read: {documented:?}");
    let shipped = keys(&std::fs::read_to_string(repository().join("deploy/icr.toml")).unwrap());
    let missing: Vec<_> = documented.difference(&shipped).collect();
    assert!(missing.is_empty(), "documented in docs/cli.md, not in deploy/icr.toml: {missing:?}");
}

#[test]
fn config_check_prints_every_default_and_refuses_what_would_not_load() {
    let dir = TempDir::new("icr-config-check");
    let good = dir.path().join("good.toml");
    write_config(&good, &format!("probe_id = \"gw-test\"\n{POLICE}[timeouts]\nactive = \"1h30m\"\n"));
    let output = icr(&["config", "check", "--config", path(&good)]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let effective = stdout(&output);
    for line in
        ["probe_id = \"gw-test\"", "active = \"1h 30m\"", "udp_idle = \"1m\"", "write_queue = 64", "name = \"met\""]
    {
        assert!(effective.lines().any(|l| l == line), "{line} in:\n{effective}");
    }
    // What it prints loads again, as itself.
    let printed = dir.path().join("printed.toml");
    write_config(&printed, &effective);
    let again = icr(&["config", "check", "--config", path(&printed)]);
    assert_eq!((again.status.code(), stdout(&again)), (Some(0), effective));

    let key = dir.path().join("audit.key");
    for (text, says) in [
        ("retention_dayz = 30\n", "line 1 (retention_dayz): unknown field `retention_dayz`"),
        ("[http]\nconsole_idle = \"0s\"\n", "line 2 (console_idle): \"0s\": a duration must be longer than zero"),
        ("[timeouts]\ntcp_idle = \"soon\"\n", "line 2 (tcp_idle): \"soon\" is not a duration like 90s, 5m or 2h"),
        ("retention_days = 400\n", "retention_days = 400 exceeds the maximum of 365"),
        (&format!("[audit]\nkey = \"{}\"\n", key.display()), "[audit] key"),
        ("[subscribers]\nstatic = \"/nonexistent/subscribers.csv\"\n", "[subscribers] static names"),
    ] {
        let bad = dir.path().join("bad.toml");
        write_config(&bad, text);
        let output = icr(&["config", "check", "--config", path(&bad)]);
        assert_eq!(output.status.code(), Some(1), "{text}: {}", stderr(&output));
        let reason = stderr(&output);
        assert_eq!(reason.lines().count(), 1, "one line: {reason}");
        assert!(reason.contains(says), "{text}: {reason}");
        assert!(output.stdout.is_empty(), "nothing printed for a file that would not load");
    }
    let missing = icr(&["config", "check", "--config", path(&dir.path().join("nowhere.toml"))]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("reading the configuration"), "{}", stderr(&missing));
    // Without --config: /etc/icr/icr.toml, which is not there.
    let default = icr(&["config", "check"]);
    assert_eq!(default.status.code(), Some(1));
    assert!(stderr(&default).contains("/etc/icr/icr.toml"), "{}", stderr(&default));
}

#[test]
fn the_configuration_names_the_store_and_a_flag_overrides_it() {
    let dir = TempDir::new("icr-config-db");
    let (named_store, other_store) = (dir.path().join("named"), dir.path().join("other"));
    let config = dir.path().join("icr.toml");
    write_config(&config, &format!("db = \"{}\"\n{POLICE}", named_store.display()));
    for store in [&named_store, &other_store] {
        let output = replay(dir.path(), store, Some(&config));
        assert!(output.status.success(), "{}", stderr(&output));
    }
    // No --db: the configuration's store answers, and audits.
    let output = resolve(&["--config", path(&config)]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!((questions(&named_store), questions(&other_store)), (1, 0));
    // --db overrides it.
    let output = resolve(&["--config", path(&config), "--db", path(&other_store)]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!((questions(&named_store), questions(&other_store)), (1, 1));
    // Neither: no store is named.
    let nameless = dir.path().join("nameless.toml");
    write_config(&nameless, POLICE);
    let output = resolve(&["--config", path(&nameless)]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("name the store: --db DIR, or db = \"DIR\""), "{}", stderr(&output));
}

#[test]
fn a_store_is_governed_by_its_writers_configuration_after_it_stopped() {
    let dir = TempDir::new("icr-config-governs");
    let db = dir.path().join("store");
    let agents = dir.path().join("agent.toml");
    write_config(&agents, POLICE);
    let output = replay(dir.path(), &db, Some(&agents));
    assert!(output.status.success(), "{}", stderr(&output));
    // The store's own file grants nothing: the remembered one decides.
    write_config(&db.join("icr.toml"), "max_window_days = 1\n");
    let db_flag = path(&db);
    for extra in [vec!["--db", db_flag], vec!["--db", db_flag, "--config", path(&agents)]] {
        let output = resolve(&extra);
        assert_eq!(output.status.code(), Some(0), "{extra:?}: {}", stderr(&output));
    }
    assert_eq!(audit_entries(&db).last().unwrap()["config_sha256"], sha256(&agents).as_str());

    // A file of the asker's choosing is refused, and audited under the
    // store's configuration.
    let forged = dir.path().join("mine.toml");
    write_config(&forged, "[[authority]]\nname = \"fake\"\nkind = \"police\"\npurposes = [1, 2, 3]\n");
    let output = icr(&[
        "query",
        "resolve",
        "--ip",
        "203.0.113.1",
        "--at",
        "2026-11-22T15:00:00Z",
        "--authority",
        "fake",
        "--officer",
        "PC 1",
        "--reference",
        "OP-1",
        "--db",
        db_flag,
        "--config",
        path(&forged),
    ]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let canonical = std::fs::canonicalize(&agents).unwrap();
    assert!(
        stderr(&output).contains(&format!("authorised by the store's configuration {}", canonical.display())),
        "{}",
        stderr(&output)
    );
    let refused = audit_entries(&db).pop().unwrap();
    assert!(refused["outcome"].as_str().unwrap().starts_with("refused"), "{refused}");
    assert_eq!(refused["config_sha256"], sha256(&agents).as_str(), "{refused}");
    // Nor can it list, or sweep with its own retention.
    let output = icr(&["sweep", "--db", db_flag, "--config", path(&forged)]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    // Asking never re-points the store.
    assert_eq!(std::fs::read_to_string(db.join("governing-config")).unwrap(), format!("{}\n", canonical.display()));

    // A configuration others may write cannot be made to govern.
    let careless = dir.path().join("careless.toml");
    write_config(&careless, POLICE);
    std::fs::set_permissions(&careless, std::fs::Permissions::from_mode(0o666)).unwrap();
    let output = replay(dir.path(), &db, Some(&careless));
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("must be owned by root and writable by root alone"), "{}", stderr(&output));
    assert!(resolve(&["--db", db_flag, "--config", path(&agents)]).status.success());

    // The store moves to another configuration when its writer runs with it.
    let next = dir.path().join("next.toml");
    write_config(&next, POLICE);
    assert!(replay(dir.path(), &db, Some(&next)).status.success());
    assert_eq!(resolve(&["--db", db_flag, "--config", path(&next)]).status.code(), Some(0));
    assert_eq!(resolve(&["--db", db_flag, "--config", path(&agents)]).status.code(), Some(3));
    // Audited, as who did it and from which file to which.
    let moved = audit_entries(&db).into_iter().rfind(|entry| entry["command"] == "govern").unwrap();
    let next_canonical = std::fs::canonicalize(&next).unwrap();
    assert_eq!(moved["parameters"]["from"], canonical.to_str().unwrap(), "{moved}");
    assert_eq!(moved["parameters"]["to"], next_canonical.to_str().unwrap(), "{moved}");
    assert_eq!(moved["config_sha256"], sha256(&next).as_str(), "{moved}");
    let verify = icr(&["audit", "verify", "--db", db_flag]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    // A writer that names none keeps what the store remembers.
    assert!(replay(dir.path(), &db, None).status.success());
    assert_eq!(resolve(&["--db", db_flag, "--config", path(&next)]).status.code(), Some(0));
}

#[test]
fn without_etc_icr_a_store_keeps_its_own_configuration() {
    let dir = TempDir::new("icr-config-own");
    let db = dir.path().join("store");
    std::fs::create_dir_all(&db).unwrap();
    write_config(&db.join("icr.toml"), POLICE);
    let output = replay(dir.path(), &db, None);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!db.join("governing-config").exists(), "nothing recorded: the store's own file governs");
    let output = resolve(&["--db", path(&db)]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(audit_entries(&db).last().unwrap()["config_sha256"], sha256(&db.join("icr.toml")).as_str());
}

/// `icr list` as the operator `ops` over the last hour, with `extra`.
fn list(extra: &[&str]) -> Output {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let (from, to) = (icr_lab::rfc3339(now - 3600), icr_lab::rfc3339(now + 3600));
    let mut args = vec!["list", "--from", &from, "--to", &to, "--authority", "ops", "--officer", "lab"];
    args.extend(["--reference", "LAB-CONFIG", "--format", "ndjson"]);
    args.extend(extra);
    icr(&args)
}

#[test]
fn the_agent_runs_from_its_configuration_alone_and_its_store_stays_governed_by_it() {
    let lab = Lab::start(1).expect("building the lab");
    let db = lab.dir.join("db");
    let config = lab.dir.join("icr.toml");
    let lan: Vec<String> = lab.lan_interfaces().split(',').map(|name| format!("\"{name}\"")).collect();
    write_config(
        &config,
        &format!(
            "db = \"{}\"\n[capture]\nlan = [{}]\nwan = [\"{GATEWAY_WAN_IF}\"]\n[timeouts]\ntcp_closed = \"1s\"\n\
             [[authority]]\nname = \"ops\"\nkind = \"operator\"\n",
            db.display(),
            lan.join(", ")
        ),
    );
    // As the package's unit runs it: no flags but the file.
    let agent = Agent::start_with(&lab, &icr_binary(), &["run".as_ref(), "--config".as_ref(), config.as_os_str()])
        .expect("starting the agent");
    let port = lab.exchange(&lab.clients[0], 2_000, 30_000).expect("an exchange");
    std::thread::sleep(Duration::from_millis(2500)); // closed and stored
    let has_the_exchange = |output: &Output| {
        stdout(output).lines().any(|line| {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            record["device"]["port"] == u64::from(port) && record["remote"]["ip"] == EXCHANGE_IP
        })
    };
    // Through the running agent: its file, and no other.
    let running = list(&["--config", path(&config)]);
    assert!(running.status.success() && has_the_exchange(&running), "{}", stderr(&running));
    let forged = lab.dir.join("mine.toml");
    write_config(&forged, &format!("db = \"{}\"\n[[authority]]\nname = \"ops\"\nkind = \"operator\"\n", db.display()));
    assert_eq!(list(&["--config", path(&forged)]).status.code(), Some(3));
    agent.stop().expect("the agent stops cleanly");

    // Stopped: the same file authorises, named or not; another is refused.
    let stopped = list(&["--config", path(&config)]);
    assert!(stopped.status.success() && has_the_exchange(&stopped), "{}", stderr(&stopped));
    let unnamed = list(&["--db", path(&db)]);
    assert!(unnamed.status.success() && has_the_exchange(&unnamed), "{}", stderr(&unnamed));
    let refused = list(&["--config", path(&forged)]);
    assert_eq!(refused.status.code(), Some(3), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("authorised by the store's configuration"), "{}", stderr(&refused));
}

#[test]
fn the_query_service_will_not_start_on_a_configuration_others_may_write() {
    let dir = TempDir::new("icr-config-serve");
    let careless = dir.path().join("central.toml");
    write_config(
        &careless,
        &format!(
            "db = \"{}\"\n[clickhouse]\nurl = \"http://127.0.0.1:9\"\n[http]\nlisten = \"127.0.0.1:0\"\n{POLICE}",
            dir.path().join("central").display()
        ),
    );
    std::fs::set_permissions(&careless, std::fs::Permissions::from_mode(0o664)).unwrap();
    // Were it to start, it would serve until stopped: waited for 20 s at most.
    let mut child = icr_command(&["serve", "--config", path(&careless)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("must be owned by root and writable by root alone"), "{}", stderr(&output));
}
