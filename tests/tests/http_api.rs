//! The HTTP API over TLS, with real requests, and the refusals it must make;
//! then data minimisation: a request with a path and a query string crosses
//! the gateway, and neither shows up in the store, the audit log, the
//! agent's log or an export.
use std::{path::Path, process::Command, time::Duration};

use icr_lab::{Agent, Lab, WEB_IP, WEB_NAME, hash_token, icr_binary};
use serde_json::Value;

const PORT: u16 = 8480;
const POLICE_TOKEN: &str = "police-token-7f3a9c";
const COUNCIL_TOKEN: &str = "council-token-1b2c3d";
const NARROW_TOKEN: &str = "narrow-token-9e8d7c";

fn write_config(db: &Path, lab_dir: &Path) {
    std::fs::create_dir_all(db).unwrap();
    let config = format!(
        r#"
[[authority]]
name = "lab-police"
kind = "police"
purposes = [1, 2, 3]
token_hash = "{police}"

[[authority]]
name = "lab-council"
kind = "local"
purposes = [1, 2, 3]
token_hash = "{council}"

[[authority]]
name = "lab-narrow"
kind = "approved"
purposes = [2]
token_hash = "{narrow}"

[http]
listen = "127.0.0.1:{PORT}"
cert = "{cert}"
key = "{key}"
max_connections = {MAX_CONNECTIONS}
request_timeout = "2s"

[probe]
flow_table_size = 65536

[timeouts]
tcp_closed = "1s"
udp_idle = "2s"
"#,
        police = hash_token(POLICE_TOKEN),
        council = hash_token(COUNCIL_TOKEN),
        narrow = hash_token(NARROW_TOKEN),
        cert = lab_dir.join("api.pem").display(),
        key = lab_dir.join("api.key").display(),
    );
    assert!(!config.contains(POLICE_TOKEN), "only hashes are configured");
    std::fs::write(db.join("icr.toml"), config).unwrap();
}

/// A CA and, signed by it, the API's certificate for 127.0.0.1, so that
/// `icr query --server` can verify the server (`--ca`).
fn make_api_certificate(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-days", "2", "-subj", "/CN=icr lab CA", "-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
    );
    openssl(&[&["req"][..], &ec, &["-subj", "/CN=127.0.0.1", "-keyout", "api.key", "-out", "api.csr"]].concat());
    std::fs::write(dir.join("api.ext"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "api.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "api.ext",
        "-out",
        "api.pem",
    ]);
}

/// `icr query ... --server` from inside the gateway: (exit code, stdout, stderr).
fn icr_remote(lab: &Lab, args: &[&str]) -> (i32, String, String) {
    let token_file = lab.dir.join("token");
    std::fs::write(&token_file, format!("{POLICE_TOKEN}\n")).unwrap();
    let mut command = Command::new("ip");
    command.args(["netns", "exec", &lab.gateway]).arg(icr_binary()).args(["query"]).args(args);
    command
        .args(["--server", &format!("https://127.0.0.1:{PORT}"), "--ca"])
        .arg(lab.dir.join("ca.pem"))
        .arg("--token-file")
        .arg(&token_file);
    let out = command.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Holds `max` TLS connections open without a request, tries one more, then
/// sends headers that never end on one connection and times how long the
/// server waits: one JSON line.
const ABUSE_SCRIPT: &str = r#"
import json, socket, ssl, sys, time
port, limit = int(sys.argv[1]), int(sys.argv[2])
tls = ssl.create_default_context()
tls.check_hostname = False
tls.verify_mode = ssl.CERT_NONE
def connect():
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return tls.wrap_socket(raw, server_hostname="127.0.0.1")
held = [connect() for _ in range(limit)]
try:
    extra = connect()
    extra.settimeout(5)
    over_closed = extra.recv(1) == b""
except socket.timeout:
    over_closed = False
except (ssl.SSLError, ConnectionError, OSError):
    over_closed = True
for conn in held:
    conn.close()
time.sleep(0.5)
slow = connect()
slow.sendall(b"POST /v1/query/services HTTP/1.1\r\nHost: 127.0.0.1\r\n")
slow.settimeout(10)
start = time.monotonic()
try:
    slow.recv(4096)
    cut = True
except socket.timeout:
    cut = False
except (ssl.SSLError, ConnectionError, OSError):
    cut = True
after = time.monotonic() - start
print(json.dumps({"within_limit_open": len(held), "over_limit_closed": over_closed, "slow_headers_cut_after_s": after if cut and after < 10 else None}))
"#;

/// The lab agent's `[http] max_connections`.
const MAX_CONNECTIONS: usize = 4;

/// POSTs `body` to the agent's API from inside the gateway, as `authority`
/// with `token`; (status, body).
fn post(lab: &Lab, kind: &str, authority: Option<&str>, token: Option<&str>, body: &str) -> (u16, String) {
    post_with(lab, &[], kind, authority, token, body)
}

/// As `post`, with more curl arguments.
fn post_with(
    lab: &Lab,
    curl: &[&str],
    kind: &str,
    authority: Option<&str>,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut args: Vec<String> = curl.iter().map(|arg| arg.to_string()).collect();
    args.extend([
        "-sk".to_string(),
        "-o".into(),
        "-".into(),
        "-w".into(),
        "\n%{http_code}".into(),
        "-X".into(),
        "POST".into(),
    ]);
    if let Some(authority) = authority {
        args.extend(["-H".into(), format!("ICR-Authority: {authority}")]);
    }
    if let Some(token) = token {
        args.extend(["-H".into(), format!("Authorization: Bearer {token}")]);
    }
    args.extend(["-H".into(), "Content-Type: application/json".into(), "--data-binary".into(), body.into()]);
    args.push(format!("https://127.0.0.1:{PORT}/v1/query/{kind}"));
    let out = lab.exec(&lab.gateway, Command::new("curl").args(&args)).expect("curl to the API");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

#[test]
fn the_api_answers_authorised_queries_and_refuses_the_rest() {
    let lab = Lab::start(1).expect("building the lab");
    let db = lab.dir.join("db");
    make_api_certificate(&lab.dir);
    write_config(&db, &lab.dir);
    let agent = Agent::start(&lab, &icr_binary(), &db).expect("starting the agent");
    let c1 = &lab.clients[0];
    // A request whose URL carries a path and a query string: neither may be kept.
    lab.exec(
        &c1.ns,
        Command::new("curl").args([
            "-sk",
            "-o",
            "/dev/null",
            &format!("https://{WEB_NAME}/private/report.pdf?session=hunter2secret"),
        ]),
    )
    .unwrap();
    lab.exec(
        &c1.ns,
        Command::new("curl").args([
            "-s",
            "-o",
            "/dev/null",
            &format!("http://{WEB_NAME}/plain/secretpath?token=plaintextsecret"),
        ]),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));

    let now = chrono::Utc::now();
    let (from, to) = ((now - chrono::Duration::hours(1)).to_rfc3339(), (now + chrono::Duration::hours(1)).to_rfc3339());
    let services = format!(
        r#"{{"officer": "PC 1", "reference": "OP-HTTP-1", "device": "{}", "from": "{from}", "to": "{to}"}}"#,
        c1.ip
    );
    let accessed = format!(
        r#"{{"officer": "PC 1", "reference": "OP-HTTP-2", "service": ["{WEB_NAME}"], "from": "{from}", "to": "{to}", "format": "csv"}}"#
    );

    // Authorised: question 2 (NDJSON) and question 3 (CSV).
    let (status, body) = post(&lab, "services", Some("lab-police"), Some(POLICE_TOKEN), &services);
    assert_eq!(status, 200, "{body}");
    let rows: Vec<Value> = body.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(rows.iter().any(|r| r["name"] == WEB_NAME), "{rows:?}");
    let (status, body) = post(&lab, "accessed", Some("lab-police"), Some(POLICE_TOKEN), &accessed);
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("id,start,end"), "CSV: {body}");
    // Question 3 finds a device's DNS lookups of the name too (dns_all).
    assert_eq!(body.lines().count(), 5, "a header, the two lookups of the name and the two connections: {body}");
    // The last column lists every question of the flow: the resolver asks
    // A and AAAA from one socket, and both are kept.
    let dns_all = body.lines().next().unwrap().split(',').position(|c| c == "dns_all").expect("a dns_all column");
    let lookups = body
        .lines()
        .filter(|l| l.split(',').nth(dns_all).is_some_and(|all| all.split(';').any(|q| q == format!("{WEB_NAME}/A"))));
    assert_eq!(lookups.count(), 2, "{body}");
    assert!(
        body.lines().next().unwrap().ends_with(",probe,local,dns_all,service_dns_at,service_resolver"),
        "local, dns_all and a name's DNS exchange appended: {body}"
    );
    // The local filter: these connections left the gateway.
    for (local, lines) in [("include", 5), ("exclude", 5), ("only", 1)] {
        let (status, body) = post(
            &lab,
            "accessed",
            Some("lab-police"),
            Some(POLICE_TOKEN),
            &accessed.replace(r#""format""#, &format!(r#""local": "{local}", "format""#)),
        );
        assert_eq!((status, body.lines().count()), (200, lines), "local {local}: {body}");
    }
    let (status, body) = post(
        &lab,
        "accessed",
        Some("lab-police"),
        Some(POLICE_TOKEN),
        &accessed.replace(r#""format""#, r#""local": "sometimes", "format""#),
    );
    assert_eq!(status, 400, "an unknown local filter is refused: {body}");
    assert!(body.contains("sometimes"), "{body}");

    // Refusals, each audited.
    let cases = [
        ("wrong token", post(&lab, "services", Some("lab-police"), Some("not-a-token"), &services), 401),
        ("no token", post(&lab, "services", Some("lab-police"), None, &services), 401),
        ("no authority named", post(&lab, "services", None, Some(POLICE_TOKEN), &services), 401),
        ("another authority's token", post(&lab, "services", Some("lab-police"), Some(NARROW_TOKEN), &services), 401),
        ("local authority", post(&lab, "services", Some("lab-council"), Some(COUNCIL_TOKEN), &services), 403),
        ("wrong purpose", post(&lab, "accessed", Some("lab-narrow"), Some(NARROW_TOKEN), &accessed), 403),
        (
            "no reference",
            post(
                &lab,
                "services",
                Some("lab-police"),
                Some(POLICE_TOKEN),
                &services.replace(r#""reference": "OP-HTTP-1", "#, ""),
            ),
            403,
        ),
        (
            "window too long",
            post(
                &lab,
                "services",
                Some("lab-police"),
                Some(POLICE_TOKEN),
                &services.replace(&from, "2020-01-01T00:00:00Z"),
            ),
            403,
        ),
        ("not JSON", post(&lab, "services", Some("lab-police"), Some(POLICE_TOKEN), "device=1"), 400),
        (
            "unknown parameter",
            post(&lab, "services", Some("lab-police"), Some(POLICE_TOKEN), r#"{"db": "/tmp/elsewhere"}"#),
            400,
        ),
        (
            "bad time",
            post(&lab, "services", Some("lab-police"), Some(POLICE_TOKEN), &services.replace(&to, "tomorrow")),
            400,
        ),
        ("no such question", post(&lab, "everything", Some("lab-police"), Some(POLICE_TOKEN), &services), 404),
    ];
    for (name, (status, body), expected) in &cases {
        assert_eq!(status, expected, "{name}: {body}");
    }
    // The authority comes from the token, never from the body.
    let (status, _) = post(
        &lab,
        "services",
        Some("lab-narrow"),
        Some(NARROW_TOKEN),
        &services.replace(r#""officer""#, r#""authority": "lab-police", "officer""#),
    );
    assert_eq!(status, 400);

    // The command line asks the same API with --server (verifying the
    // server's certificate): the same rows, a table drawn locally, and a
    // refusal when the token is not the authority the officer names.
    let services_args = [
        "services",
        "--device",
        c1.ip.as_str(),
        "--from",
        from.as_str(),
        "--to",
        to.as_str(),
        "--officer",
        "PC 1",
        "--reference",
        "OP-HTTP-3",
    ];
    let (code, stdout, stderr) =
        icr_remote(&lab, &[&services_args[..], &["--authority", "lab-police", "--format", "ndjson"]].concat());
    assert_eq!(code, 0, "{stderr}");
    let remote_rows: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(remote_rows, rows, "--server answers as the API does");
    assert!(!stderr.contains("capture gap"), "no loss, no warning: {stderr}");
    let (code, table, stderr) =
        icr_remote(&lab, &[&services_args[..], &["--authority", "lab-police", "--format", "table"]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(table.lines().next().unwrap().contains("connections") && table.contains(WEB_NAME), "a table: {table}");
    let (code, stdout, stderr) = icr_remote(&lab, &[&services_args[..], &["--authority", "lab-council"]].concat());
    assert_eq!((code, stdout.as_str()), (3, ""), "another authority's name is refused: {stderr}");
    assert!(stderr.contains("refused"), "{stderr}");

    // Abuse: an oversized body, headers that never end, more connections
    // than allowed; then an answer as before.
    let huge = lab.dir.join("huge.json");
    std::fs::write(&huge, format!(r#"{{"officer": "{}"}}"#, "x".repeat(3 << 20))).unwrap();
    // (HTTP/1.1: over HTTP/2 the server's early answer resets the stream,
    // which curl reports as its own failure.)
    let (status, body) = post_with(
        &lab,
        &["--http1.1"],
        "services",
        Some("lab-police"),
        Some(POLICE_TOKEN),
        &format!("@{}", huge.display()),
    );
    assert_eq!(status, 413, "a 3 MiB body: {body}");
    let abuse = lab.exec(
        &lab.gateway,
        Command::new(icr_lab::lab_python())
            .arg("-c")
            .arg(ABUSE_SCRIPT)
            .arg(PORT.to_string())
            .arg(MAX_CONNECTIONS.to_string()),
    );
    let abuse = String::from_utf8_lossy(&abuse.expect("the abuse script runs").stdout).into_owned();
    let seen: Value = serde_json::from_str(abuse.trim()).unwrap_or_else(|e| panic!("{e}: {abuse}"));
    assert_eq!(seen["over_limit_closed"], true, "a connection over the limit is closed at once: {seen}");
    assert_eq!(seen["within_limit_open"], MAX_CONNECTIONS, "connections within the limit are served: {seen}");
    let cut_after = seen["slow_headers_cut_after_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("headers that never end are cut off: {seen}"));
    assert!((1.5..6.0).contains(&cut_after), "cut off after the 2 s request timeout: {seen}");
    let (status, body) = post(&lab, "services", Some("lab-police"), Some(POLICE_TOKEN), &services);
    assert_eq!(status, 200, "answered after the abuse: {body}");

    let log = agent.stop().expect("the agent stops cleanly");
    let verify = Command::new(icr_binary()).args(["audit", "verify", "--db"]).arg(&db).output().unwrap();
    assert!(verify.status.success());
    // 2 answers + 3 with a local filter + wrong token + no token + no
    // authority named + another's token + local + wrong purpose + no
    // reference + window = 13, and the bad time, audited as failed = 14;
    // then the two --server answers and its refusal = 17; the agent's
    // retention sweep when it started = 18; and the answer after the abuse
    // = 19; and the authenticated requests the API could not read — the
    // unknown local filter, not JSON, the unknown parameter, the authority
    // in the body — audited as failed = 23. (The oversized body, refused
    // before its token was checked, is not.)
    assert!(
        String::from_utf8_lossy(&verify.stdout).contains("23 entries"),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let audit = std::fs::read_to_string(db.join("audit.log")).unwrap();
    assert_eq!(audit.matches(r#""local":"only""#).count(), 1, "the local filter is audited: {audit}");
    assert_eq!(
        audit.matches("\"officer\":\"agent (hourly retention)\"").count(),
        1,
        "the agent's sweep is audited: {audit}"
    );
    assert!(!audit.contains(POLICE_TOKEN), "tokens are never logged");

    // Data minimisation: nothing of the URLs anywhere we write.
    let export = icr_lab::icr_list(&db, "csv", None);
    let mut haystack = String::from_utf8_lossy(&export.stdout).into_owned();
    haystack.push_str(&log);
    for entry in walk(&db) {
        haystack.push_str(&String::from_utf8_lossy(&std::fs::read(entry).unwrap()));
    }
    assert!(haystack.contains(WEB_NAME), "the search covers what was stored");
    for secret in ["private/report.pdf", "hunter2secret", "session=", "secretpath", "plaintextsecret", "token="] {
        assert!(!haystack.contains(secret), "{secret:?} was written somewhere");
    }
    assert!(haystack.contains(WEB_IP));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else if path.is_file() {
            files.push(path);
        }
    }
    files
}
