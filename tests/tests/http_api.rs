//! The HTTP API over TLS, with real requests, and the refusals it must make;
//! then data minimisation: a request with a path and a query string crosses
//! the gateway, and neither shows up in the store, the audit log, the
//! agent's log or an export.
use std::{path::Path, process::Command, time::Duration};

use icr_tests::lab::{Agent, Lab, WEB_IP, WEB_NAME, icr_binary};
use serde_json::Value;

const PORT: u16 = 8480;
const POLICE_TOKEN: &str = "police-token-7f3a9c";
const COUNCIL_TOKEN: &str = "council-token-1b2c3d";
const NARROW_TOKEN: &str = "narrow-token-9e8d7c";

fn hash(token: &str) -> String {
    let mut child = Command::new(icr_binary())
        .arg("hash-token")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(format!("{token}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

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

[probe]
flow_table_size = 65536

[timeouts]
tcp_closed = "1s"
udp_idle = "2s"
"#,
        police = hash(POLICE_TOKEN),
        council = hash(COUNCIL_TOKEN),
        narrow = hash(NARROW_TOKEN),
        cert = lab_dir.join("cert.pem").display(),
        key = lab_dir.join("key.pem").display(),
    );
    assert!(!config.contains(POLICE_TOKEN), "only hashes are configured");
    std::fs::write(db.join("icr.toml"), config).unwrap();
}

/// POSTs `body` to the agent's API from inside the gateway; (status, body).
fn post(lab: &Lab, kind: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut args = vec!["-sk".to_string(), "-o".into(), "-".into(), "-w".into(), "\n%{http_code}".into(), "-X".into(), "POST".into()];
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
    write_config(&db, &lab.dir);
    let agent = Agent::start(&lab, &icr_binary(), &db).expect("starting the agent");
    let c1 = &lab.clients[0];
    // A request whose URL carries a path and a query string: neither may be kept.
    lab.exec(&c1.ns, Command::new("curl").args(["-sk", "-o", "/dev/null", &format!("https://{WEB_NAME}/private/report.pdf?session=hunter2secret")]))
        .unwrap();
    lab.exec(&c1.ns, Command::new("curl").args(["-s", "-o", "/dev/null", &format!("http://{WEB_NAME}/plain/secretpath?token=plaintextsecret")]))
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));

    let now = chrono::Utc::now();
    let (from, to) = ((now - chrono::Duration::hours(1)).to_rfc3339(), (now + chrono::Duration::hours(1)).to_rfc3339());
    let services = format!(r#"{{"officer": "PC 1", "reference": "OP-HTTP-1", "device": "{}", "from": "{from}", "to": "{to}"}}"#, c1.ip);
    let accessed = format!(r#"{{"officer": "PC 1", "reference": "OP-HTTP-2", "service": ["{WEB_NAME}"], "from": "{from}", "to": "{to}", "format": "csv"}}"#);

    // Authorised: question 2 (NDJSON) and question 3 (CSV).
    let (status, body) = post(&lab, "services", Some(POLICE_TOKEN), &services);
    assert_eq!(status, 200, "{body}");
    let rows: Vec<Value> = body.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(rows.iter().any(|r| r["name"] == WEB_NAME), "{rows:?}");
    let (status, body) = post(&lab, "accessed", Some(POLICE_TOKEN), &accessed);
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("id,start,end"), "CSV: {body}");
    assert_eq!(body.lines().count(), 3, "a header and the two connections: {body}");

    // Refusals, each audited.
    let cases = [
        ("wrong token", post(&lab, "services", Some("not-a-token"), &services), 401),
        ("no token", post(&lab, "services", None, &services), 401),
        ("local authority", post(&lab, "services", Some(COUNCIL_TOKEN), &services), 403),
        ("wrong purpose", post(&lab, "accessed", Some(NARROW_TOKEN), &accessed), 403),
        ("no reference", post(&lab, "services", Some(POLICE_TOKEN), &services.replace(r#""reference": "OP-HTTP-1", "#, "")), 403),
        ("window too long", post(&lab, "services", Some(POLICE_TOKEN), &services.replace(&from, "2020-01-01T00:00:00Z")), 403),
        ("not JSON", post(&lab, "services", Some(POLICE_TOKEN), "device=1"), 400),
        ("unknown parameter", post(&lab, "services", Some(POLICE_TOKEN), r#"{"db": "/tmp/elsewhere"}"#), 400),
        ("bad time", post(&lab, "services", Some(POLICE_TOKEN), &services.replace(&to, "tomorrow")), 400),
        ("no such question", post(&lab, "everything", Some(POLICE_TOKEN), &services), 404),
    ];
    for (name, (status, body), expected) in &cases {
        assert_eq!(status, expected, "{name}: {body}");
    }
    // The authority comes from the token, never from the body.
    let (status, _) = post(&lab, "services", Some(NARROW_TOKEN), &services.replace(r#""officer""#, r#""authority": "lab-police", "officer""#));
    assert_eq!(status, 400);

    let log = agent.stop().expect("the agent stops cleanly");
    let verify = Command::new(icr_binary()).args(["audit", "verify", "--db"]).arg(&db).output().unwrap();
    assert!(verify.status.success());
    // 2 answers + wrong token + no token + local + wrong purpose + no reference
    // + window = 8, and the bad time, audited as failed = 9. (Requests that
    // never became a query — not JSON, unknown parameters — are not.)
    assert!(String::from_utf8_lossy(&verify.stdout).contains("9 entries"), "{}", String::from_utf8_lossy(&verify.stdout));
    let audit = std::fs::read_to_string(db.join("audit.log")).unwrap();
    assert!(!audit.contains(POLICE_TOKEN), "tokens are never logged");

    // Data minimisation: nothing of the URLs anywhere we write.
    let export = Command::new(icr_binary()).args(["list", "--format", "csv", "--db"]).arg(&db).output().unwrap();
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
