//! Bad input to the real `icr` binary: a clear error and exit status 1 (3
//! for a refusal), never a panic (101), and a query that fails is audited.
use std::{
    io::Write as _,
    path::Path,
    process::{Command, Output, Stdio},
};

use icr_lab::{TempDir, icr_binary};
use icr_test_kit::config::{POLICE, StoreDir};

fn icr(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(icr_binary())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running icr");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn resolve(store: &StoreDir, tolerance: &str) -> Output {
    let db = store.path().to_str().unwrap();
    icr(
        &[
            "query",
            "resolve",
            "--ip",
            "203.0.113.1",
            "--at",
            "2026-11-22T15:00:00Z",
            "--tolerance",
            tolerance,
            "--db",
            db,
            "--authority",
            "met",
            "--officer",
            "PC 1",
            "--reference",
            "OP-1",
            "--format",
            "ndjson",
        ],
        b"",
    )
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn an_overflowing_tolerance_is_a_clear_audited_error_not_a_panic() {
    let store = StoreDir::with_config("icr-bad-input", POLICE);
    let output = resolve(&store, "300000years");
    assert_eq!(output.status.code(), Some(1), "exit 1, not a panic: {}", stderr(&output));
    assert!(
        stderr(&output).contains("--tolerance \"300000years\" reaches past the times this can represent"),
        "{}",
        stderr(&output)
    );
    let audit = std::fs::read_to_string(store.path().join("audit.log")).unwrap();
    assert_eq!(audit.lines().count(), 1, "the failed query is audited: {audit}");
    assert!(audit.contains("\"outcome\":\"failed: --tolerance"), "{audit}");
    let verify = icr(&["audit", "verify", "--db", store.path().to_str().unwrap()], b"");
    assert!(verify.status.success(), "{}", stderr(&verify));
    // A tolerance that fits is answered.
    assert!(resolve(&store, "5m").status.success());
}

#[test]
fn an_authority_configured_twice_is_refused_before_anything_is_answered() {
    // The second entry's kind and purposes must not be taken for the first's.
    let local = "[[authority]]\nname = \"met\"\nkind = \"local\"\npurposes = [1, 2, 3]\n";
    let store = StoreDir::with_config("icr-bad-input", format!("{POLICE}{local}"));
    let output = resolve(&store, "5m");
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("authority \"met\" is configured twice"), "{}", stderr(&output));
    assert!(
        !store.path().join("audit.log").exists()
            || std::fs::read_to_string(store.path().join("audit.log")).unwrap().is_empty()
    );
}

#[test]
fn empty_authority_names_and_zero_timeouts_are_refused() {
    for (config, says) in [
        ("[[authority]]\nname = \"\"\nkind = \"police\"\npurposes = [1]\n", "empty name"),
        (
            &format!("{POLICE}[timeouts]\ntcp_idle = \"0s\"\n"),
            "(tcp_idle): \"0s\": a duration must be longer than zero",
        ),
    ] {
        let store = StoreDir::with_config("icr-bad-input", config);
        let output = resolve(&store, "5m");
        assert_eq!(output.status.code(), Some(1), "{config}: {}", stderr(&output));
        assert!(stderr(&output).contains(says), "{config}: {}", stderr(&output));
    }
}

#[test]
fn an_empty_token_is_not_hashed() {
    let output = icr(&["hash-token"], b"\n");
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("the token is empty"), "{}", stderr(&output));
    assert!(output.stdout.is_empty(), "no hash printed");
    assert!(icr(&["hash-token"], b"a-real-token\n").status.success());
}

fn query_accessed(store: &StoreDir, service: &str) -> Output {
    let db = store.path().to_str().unwrap();
    icr(
        &[
            "query",
            "accessed",
            "--service",
            service,
            "--from",
            "2026-11-22T00:00:00Z",
            "--to",
            "2026-11-22T12:00:00Z",
            "--db",
            db,
            "--authority",
            "met",
            "--officer",
            "PC 1",
            "--reference",
            "OP-1",
            "--format",
            "ndjson",
        ],
        b"",
    )
}

#[test]
fn an_oversized_request_is_refused_audited_and_breaks_nothing_after_it() {
    let store = StoreDir::with_config("icr-bad-input", POLICE);
    let huge = format!("{}.example", "a".repeat(70_000));
    let output = query_accessed(&store, &huge);
    assert_eq!(output.status.code(), Some(3), "a refusal: {}", stderr(&output));
    assert!(stderr(&output).contains("longer than the 1024 a request may carry"), "{}", stderr(&output));
    let audit = std::fs::read_to_string(store.path().join("audit.log")).unwrap();
    assert!(audit.contains("\"outcome\":\"refused: a value of 70008 bytes"), "audited: {audit}");
    assert!(audit.len() < 4096, "audited at a bounded size: {} bytes", audit.len());
    // Later requests are answered and the chain is intact.
    assert!(query_accessed(&store, "www.example.test").status.success());
    let verify = icr(&["audit", "verify", "--db", store.path().to_str().unwrap()], b"");
    assert!(verify.status.success(), "{}", stderr(&verify));
}

#[test]
fn a_cut_audit_tail_is_found_against_the_head_kept_elsewhere() {
    let store = StoreDir::with_config("icr-bad-input", POLICE);
    for _ in 0..3 {
        assert!(query_accessed(&store, "www.example.test").status.success());
    }
    let path = store.path().join("audit.log");
    let log = std::fs::read_to_string(&path).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    let head = format!("{}:{}", last["seq"], last["hash"].as_str().unwrap());
    let db = store.path().to_str().unwrap();
    assert!(icr(&["audit", "verify", "--db", db, "--head", &head], b"").status.success());
    // Cut the last entry: the chain is whole, but no longer reaches the head.
    let cut: String = log.lines().take(2).map(|line| format!("{line}\n")).collect();
    std::fs::write(&path, cut).unwrap();
    assert!(icr(&["audit", "verify", "--db", db], b"").status.success(), "without the head a cut tail looks intact");
    let output = icr(&["audit", "verify", "--db", db, "--head", &head], b"");
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("its tail was cut"), "{}", stderr(&output));
}

/// SHA-256 of `bytes`, hex (coreutils' sha256sum).
fn sha256_hex(bytes: &[u8]) -> String {
    let out = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().and_then(|mut child| {
        child.stdin.take().unwrap().write_all(bytes)?;
        child.wait_with_output()
    });
    String::from_utf8_lossy(&out.expect("sha256sum").stdout).split_whitespace().next().unwrap().to_string()
}

/// Deletes the audit entry `gone` and re-chains the rest with plain SHA-256,
/// as whoever can write the store could (the MACs, which need the key, are
/// dropped).
fn rechain_without(log: &str, gone: usize) -> String {
    let mut prev = "0".repeat(64);
    let mut out = String::new();
    for (seq, line) in log.lines().enumerate().filter(|(index, _)| index + 1 != gone).map(|(_, line)| line).enumerate()
    {
        let after_prev = line.find(",\"prev\":\"").unwrap() + ",\"prev\":\"".len() + 64 + 1;
        let record = &line[after_prev..line.find(",\"hash\":\"").unwrap()];
        let body = format!("{{\"seq\":{},\"prev\":\"{prev}\"{record}}}", seq + 1);
        let hash = sha256_hex(body.as_bytes());
        out.push_str(&format!("{},\"hash\":\"{hash}\"}}\n", &body[..body.len() - 1]));
        prev = hash;
    }
    out
}

#[test]
fn with_an_audit_key_a_rechained_log_fails_verification() {
    use std::os::unix::fs::PermissionsExt as _;
    let keys = TempDir::new("icr-audit-key");
    let key = keys.path().join("audit.key");
    std::fs::write(&key, [0x5au8; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
    let keyed = format!("{POLICE}\n[audit]\nkey = \"{}\"\n", key.display());
    let store = StoreDir::with_config("icr-bad-input", &keyed);
    for _ in 0..3 {
        assert!(query_accessed(&store, "www.example.test").status.success());
    }
    let db = store.path().to_str().unwrap();
    let output = icr(&["audit", "verify", "--db", db], b"");
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("3 entries, each authenticated by the audit key"));

    let path = store.path().join("audit.log");
    std::fs::write(&path, rechain_without(&std::fs::read_to_string(&path).unwrap(), 2)).unwrap();
    // Without the key the rewrite passes, as every log did before keys.
    std::fs::write(store.path().join("icr.toml"), POLICE).unwrap();
    assert!(icr(&["audit", "verify", "--db", db], b"").status.success(), "a re-chained log is a whole chain");
    std::fs::write(store.path().join("icr.toml"), &keyed).unwrap();
    let output = icr(&["audit", "verify", "--db", db], b"");
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("no entry of the 2 is authenticated by the audit key"), "{}", stderr(&output));

    // A key others can read is refused before anything is answered.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = query_accessed(&store, "www.example.test");
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("readable by root only"), "{}", stderr(&output));
    assert!(output.stdout.is_empty());
}

#[test]
fn a_log_stripped_of_its_macs_fails_against_the_key_named_from_outside() {
    use std::os::unix::fs::PermissionsExt as _;
    let keys = TempDir::new("icr-audit-key");
    let key = keys.path().join("audit.key");
    std::fs::write(&key, [0x5au8; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
    let store = StoreDir::with_config("icr-bad-input", format!("{POLICE}\n[audit]\nkey = \"{}\"\n", key.display()));
    for _ in 0..3 {
        assert!(query_accessed(&store, "www.example.test").status.success());
    }
    let db = store.path().to_str().unwrap();
    let key_arg = key.to_str().unwrap();
    let output = icr(&["audit", "verify", "--db", db, "--key", key_arg], b"");
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("3 entries, each authenticated by the key"));
    // Whoever can write the store: entry 2 deleted, the rest re-chained
    // without MACs, and the store's [audit] key deleted.
    let path = store.path().join("audit.log");
    std::fs::write(&path, rechain_without(&std::fs::read_to_string(&path).unwrap(), 2)).unwrap();
    std::fs::write(store.path().join("icr.toml"), POLICE).unwrap();
    let output = icr(&["audit", "verify", "--db", db], b"");
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("not authenticated"), "says so");
    let output = icr(&["audit", "verify", "--db", db, "--key", key_arg], b"");
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("entry 1 (line 1) carries no MAC"), "{}", stderr(&output));
}

#[test]
fn question_3_over_a_wide_network_is_a_bulk_read_and_refused() {
    let store = StoreDir::with_config("icr-bad-input", POLICE);
    for wide in ["0.0.0.0/0", "::/0", "10.0.0.0/8", "2001:db8::/31"] {
        let output = query_accessed(&store, wide);
        assert_eq!(output.status.code(), Some(3), "{wide}: a refusal: {}", stderr(&output));
        assert!(stderr(&output).contains("is wider than the /"), "{wide}: {}", stderr(&output));
        let last = store.audit_entries().pop().unwrap();
        assert!(last["outcome"].as_str().unwrap().starts_with("refused: "), "audited: {last}");
        assert_eq!(last["parameters"]["services"][0], wide, "{last}");
    }
    assert!(query_accessed(&store, "10.1.0.0/16").status.success(), "a /16 is a question");
    // A wider limit lets a /8 through, never the whole space.
    let wider = StoreDir::with_config("icr-bad-input", format!("max_selector_v4 = 8\nmax_selector_v6 = 0\n{POLICE}"));
    assert!(query_accessed(&wider, "10.0.0.0/8").status.success());
    for everything in ["0.0.0.0/0", "::/0"] {
        assert_eq!(query_accessed(&wider, everything).status.code(), Some(3), "{everything}");
    }
}

#[test]
fn a_query_is_authorised_by_the_stores_configuration_never_the_callers() {
    let store = StoreDir::with_config("icr-bad-input", POLICE);
    let db = store.path().to_str().unwrap();
    // The caller's own file: an authority of their making, a long window.
    let elsewhere = TempDir::new("icr-caller-config");
    let forged = elsewhere.path().join("mine.toml");
    std::fs::write(
        &forged,
        "max_window_days = 365\n[[authority]]\nname = \"fake\"\nkind = \"police\"\npurposes = [1, 2, 3]\n",
    )
    .unwrap();
    let ask = |config: &Path, authority: &str| {
        icr(
            &[
                "query",
                "accessed",
                "--service",
                "www.example.test",
                "--from",
                "2026-01-01T00:00:00Z",
                "--to",
                "2026-11-22T00:00:00Z",
                "--db",
                db,
                "--config",
                config.to_str().unwrap(),
                "--authority",
                authority,
                "--officer",
                "PC 1",
                "--reference",
                "OP-1",
                "--format",
                "ndjson",
            ],
            b"",
        )
    };
    let output = ask(&forged, "fake");
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(stderr(&output).contains("authorised by the store's configuration"), "{}", stderr(&output));
    let entries = store.audit_entries();
    let refused = entries.last().unwrap();
    assert!(refused["outcome"].as_str().unwrap().starts_with("refused"), "{refused}");
    // The entry names the configuration that decided: the store's.
    let own = store.path().join("icr.toml");
    let expected = {
        let out = Command::new("sha256sum").arg(&own).output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
    };
    assert_eq!(refused["config_sha256"], expected.as_str(), "{refused}");

    // Naming the store's own file is no change; the window rule is its own.
    let output = ask(&own, "met");
    assert_eq!(output.status.code(), Some(3), "the store allows 31 days: {}", stderr(&output));
    assert!(stderr(&output).contains("longer than the 31 days"), "{}", stderr(&output));
    // Nor can a sweep bring its own retention.
    let output = icr(&["sweep", "--db", db, "--config", forged.to_str().unwrap()], b"");
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(stderr(&output).contains("governed by its configuration"), "{}", stderr(&output));
}

#[test]
fn the_services_of_a_services_file_are_audited_themselves() {
    let store = StoreDir::with_config("icr-bad-input", POLICE);
    let db = store.path().to_str().unwrap();
    let list = store.path().join("services.txt");
    std::fs::write(&list, "# wanted\nfirst.example.test\n\n*.second.example.test\n").unwrap();
    let output = icr(
        &[
            "query",
            "accessed",
            "--services-file",
            list.to_str().unwrap(),
            "--service",
            "third.example.test",
            "--from",
            "2026-11-22T00:00:00Z",
            "--to",
            "2026-11-22T12:00:00Z",
            "--db",
            db,
            "--authority",
            "met",
            "--officer",
            "PC 1",
            "--reference",
            "OP-1",
            "--format",
            "ndjson",
        ],
        b"",
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let entry = store.audit_entries().pop().unwrap();
    assert_eq!(
        entry["parameters"]["services"],
        serde_json::json!(["third.example.test", "first.example.test", "*.second.example.test"]),
        "{entry}"
    );
}

#[test]
fn listing_is_a_request_an_operator_makes_for_a_bounded_window_and_it_is_audited() {
    let operator = "[[authority]]\nname = \"noc\"\nkind = \"operator\"\npurposes = []\n";
    let store = StoreDir::with_config("icr-bad-input", format!("{POLICE}\n{operator}"));
    let db = store.path().to_str().unwrap();
    let list = |extra: &[&str]| icr(&[&["list", "--db", db, "--format", "ndjson"][..], extra].concat(), b"");
    let window = ["--from", "2026-11-01T00:00:00Z", "--to", "2026-11-22T00:00:00Z"];
    let who = |authority: &'static str| ["--authority", authority, "--officer", "NOC 7", "--reference", "MAINT-12"];

    // What every caller got before: everything since 1970, no questions asked.
    let output = list(&[]);
    assert_eq!(output.status.code(), Some(2), "--from and --to are required: {}", stderr(&output));
    let output = list(&window);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(stderr(&output).contains("no --authority named"), "{}", stderr(&output));
    let output = list(&[&window[..], &who("met")].concat());
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(stderr(&output).contains("only an operator may list"), "{}", stderr(&output));
    let output = list(&[
        "--from",
        "2025-01-01T00:00:00Z",
        "--to",
        "2026-11-22T00:00:00Z",
        "--authority",
        "noc",
        "--officer",
        "NOC 7",
        "--reference",
        "MAINT-12",
    ]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(stderr(&output).contains("longer than the 31 days"), "{}", stderr(&output));

    let output = list(&[&window[..], &who("noc")].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    let entry = store.audit_entries().pop().unwrap();
    assert_eq!(entry["command"], "list");
    assert_eq!(
        (entry["authority"].as_str(), entry["officer"].as_str(), entry["reference"].as_str()),
        (Some("noc"), Some("NOC 7"), Some("MAINT-12"))
    );
    assert_eq!(entry["parameters"]["from"], "2026-11-01T00:00:00Z");
    assert_eq!(entry["outcome"], "answered");
    // An operator asks none of the three questions.
    let output = icr(
        &[
            "query",
            "accessed",
            "--service",
            "www.example.test",
            "--from",
            "2026-11-22T00:00:00Z",
            "--to",
            "2026-11-22T12:00:00Z",
            "--db",
            db,
            "--authority",
            "noc",
            "--officer",
            "NOC 7",
            "--reference",
            "MAINT-12",
        ],
        b"",
    );
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(stderr(&output).contains("operator authority"), "{}", stderr(&output));
    assert_eq!(
        store.audit_entries().iter().filter(|e| e["outcome"].as_str().unwrap().starts_with("refused")).count(),
        4
    );
}
