//! The web console in a real browser: Debian's Chromium, headless, driven
//! over WebDriver (`icr_lab::browser`) against the lab's agent after real
//! traffic. Sign in with an authority's token, ask each question, see the
//! right rows, the gaps and the timeline, filter the table, download the
//! CSV and the disclosure bundle and check them, see a local authority
//! refused (and audited), read the audit log as an auditor, sign out. A
//! cross-site POST and requests without a session are refused. A
//! screenshot of each page is saved under the test's target directory.
use std::{
    collections::BTreeMap,
    io::Read as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use icr_lab::{Agent, Lab, TempDir, WEB_NAME, browser::Browser, hash_token, icr_binary, rfc3339};
use serde_json::Value;
use sha2::Digest as _;

const PORT: u16 = 8490;
const POLICE_TOKEN: &str = "police-token-5c1e77";
const BOROUGH_TOKEN: &str = "borough-token-0a9f31";
const AUDITOR_TOKEN: &str = "auditor-token-4b8d22";

fn write_config(db: &Path) {
    std::fs::create_dir_all(db).unwrap();
    let config = format!(
        r#"
[[authority]]
name = "lab-police"
kind = "police"
purposes = [1, 2, 3]
token_hash = "{police}"
[[authority]]
name = "lab-borough"
kind = "local"
purposes = [1, 2, 3]
token_hash = "{borough}"
[[authority]]
name = "lab-auditor"
kind = "auditor"
purposes = []
token_hash = "{auditor}"
[http]
listen = "127.0.0.1:{PORT}"
[probe]
flow_table_size = 65536
[timeouts]
tcp_closed = "1s"
udp_idle = "2s"
"#,
        police = hash_token(POLICE_TOKEN),
        borough = hash_token(BOROUGH_TOKEN),
        auditor = hash_token(AUDITOR_TOKEN),
    );
    std::fs::write(db.join("icr.toml"), config).unwrap();
}

fn url(path: &str) -> String {
    format!("http://127.0.0.1:{PORT}{path}")
}

/// Where the screenshots go: kept after the test, named in its output.
fn shots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn shoot(browser: &Browser, name: &str) {
    let path = shots().join(name);
    browser.screenshot(&path).unwrap();
    println!("screenshot {}", path.display());
}

fn sign_in(browser: &Browser, authority: &str, token: &str) {
    browser.goto(&url("/console")).unwrap();
    browser.fill("#authority", authority).unwrap();
    browser.fill("#token", token).unwrap();
    browser.click("#sign-in button").unwrap();
    if !browser.exists("#who").unwrap() {
        panic!("not signed in at {}: {}", browser.current_url().unwrap(), browser.page_source().unwrap());
    }
    assert!(browser.text("#who").unwrap().contains(authority));
}

fn sign_out(browser: &Browser) {
    browser.click("#sign-out").unwrap();
    browser.wait_for("#sign-in").unwrap();
}

/// Fills a question's form and asks it.
fn ask(browser: &Browser, question: &str, fields: &[(&str, &str)]) {
    browser.goto(&url(&format!("/console/ask/{question}"))).unwrap();
    browser.fill("#officer", "PC 1").unwrap();
    browser.fill("#reference", "OP-CONSOLE").unwrap();
    for (name, value) in fields {
        if *name == "local" {
            browser.select("#local", value).unwrap();
        } else {
            browser.fill(&format!("#{name}"), value).unwrap();
        }
    }
    browser.click("#ask-button").unwrap();
}

/// curl inside the gateway: (status, headers and body); status 0 when it
/// could not connect.
fn curl(lab: &Lab, args: &[&str]) -> (u16, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.gateway, "curl", "-s", "-i", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

#[test]
fn the_console_answers_in_a_real_browser_and_refuses_what_the_desk_refuses() {
    let lab = Lab::start(2).expect("building the lab");
    let db = lab.dir.join("db");
    write_config(&db);
    let agent = Agent::start(&lab, &icr_binary(), &db).expect("starting the agent");
    let (c1, c2) = (&lab.clients[0], &lab.clients[1]);
    lab.exec(&c1.ns, Command::new("curl").args(["-sk", "--max-time", "10", &format!("https://{WEB_NAME}/")]))
        .expect("c1's HTTPS");
    lab.exchange(c2, 200, 300).expect("c2's exchange");
    std::thread::sleep(Duration::from_secs(4));
    let now = chrono::Utc::now().timestamp();
    let (from, to) = (rfc3339(now - 3600), rfc3339(now + 600));
    let stored = icr_lab::stored_records(&db);
    let tls = stored
        .iter()
        .find(|r| r["device"]["ip"] == c1.ip.as_str() && r["remote"]["port"] == 443)
        .expect("c1's HTTPS record")
        .clone();

    // Without a session: a page asks to sign in, a POST is refused.
    let (status, text) = curl(&lab, &[&url("/console/answers/1")]);
    assert_eq!(status, 401, "{text}");
    let (status, text) =
        curl(&lab, &["-X", "POST", "--data", "device=x&from=a&to=b&csrf=0", &url("/console/ask/services")]);
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("no session"), "{text}");
    let (_, headers) = curl(&lab, &["-I", &url("/console")]);
    let csp = headers
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("content-security-policy:"))
        .unwrap_or_else(|| panic!("{headers}"));
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");

    let downloads = TempDir::new("console-downloads");
    let browser = Browser::start(&lab.gateway, downloads.path()).expect("starting Chromium");
    browser.goto(&url("/console")).unwrap();
    shoot(&browser, "01-sign-in.png");
    sign_in(&browser, "lab-police", POLICE_TOKEN);
    shoot(&browser, "02-home.png");
    let cookies = browser.cookies().unwrap();
    let session = cookies.iter().find(|c| c.name == "icr_console").expect("the session cookie");
    assert!(session.http_only && session.secure, "{:?}", (session.http_only, session.secure));
    assert_eq!(session.same_site.as_deref(), Some("Strict"));
    assert!(
        browser.execute("return document.cookie").unwrap().as_str().is_some_and(|c| !c.contains("icr_console")),
        "HttpOnly"
    );

    // Question 2: client 1's services, and its timeline.
    ask(&browser, "services", &[("device", &c1.mac), ("from", &from), ("to", &to)]);
    browser.wait_for("#rows").unwrap();
    let services = browser.texts("#rows td.service").unwrap();
    assert!(services.iter().any(|s| s == WEB_NAME), "{services:?}");
    assert!(browser.exists("#timeline svg circle.mark").unwrap(), "a timeline with marks");
    assert!(browser.text("#gaps").unwrap().contains("gap"), "the window's gaps are stated");
    // Sorting by bytes, one way then the other (the console's script).
    let bytes = |browser: &Browser| -> Vec<u64> {
        browser.texts("#rows tbody tr td:nth-child(7)").unwrap().iter().map(|b| b.parse().unwrap()).collect()
    };
    browser.click("#rows thead th:nth-child(7)").unwrap();
    let ascending = bytes(&browser);
    assert!(ascending.len() >= 2 && ascending.is_sorted(), "{ascending:?}");
    browser.click("#rows thead th:nth-child(7)").unwrap();
    assert_eq!(bytes(&browser), ascending.iter().rev().copied().collect::<Vec<_>>());
    shoot(&browser, "03-services.png");

    // Question 3: who reached the web server's name; filter the table.
    ask(&browser, "accessed", &[("services", WEB_NAME), ("from", &from), ("to", &to), ("local", "include")]);
    browser.wait_for("#rows").unwrap();
    let devices = browser.texts("#rows tbody tr td:nth-child(4)").unwrap();
    assert!(!devices.is_empty() && devices.iter().all(|ip| ip == &c1.ip), "only client 1 used it: {devices:?}");
    let total: usize = browser.text("#shown").unwrap().parse().unwrap();
    browser.fill("#filter", "tls_sni").unwrap();
    let shown: usize = browser.text("#shown").unwrap().parse().unwrap();
    assert!(shown >= 1 && shown < total, "the filter keeps the TLS connection only: {shown} of {total}");
    let audit_seq = browser.text("#audit-seq").unwrap();
    shoot(&browser, "04-accessed-filtered.png");

    // Downloads: the CSV, and the bundle with a manifest that holds.
    browser.click("#download-csv").unwrap();
    let csv = std::fs::read_to_string(browser.wait_for_download(".csv").unwrap()).unwrap();
    let mut lines = csv.lines();
    assert!(lines.next().unwrap().starts_with("id,start,end,"), "{csv}");
    assert_eq!(lines.count(), total, "{csv}");
    assert!(csv.contains(WEB_NAME) && csv.contains(&c1.mac));
    browser.click("#download-ndjson").unwrap();
    let ndjson = std::fs::read_to_string(browser.wait_for_download(".ndjson").unwrap()).unwrap();
    let parsed: Vec<Value> = ndjson.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(parsed.len(), total);
    assert!(parsed.iter().all(|r| r["device"]["mac"] == c1.mac.as_str()), "{ndjson}");
    browser.click("#download-ecs").unwrap();
    let ecs = std::fs::read_to_string(browser.wait_for_download(".ecs.ndjson").unwrap()).unwrap();
    assert!(
        ecs.lines().any(|l| l.contains("\"@timestamp\"")) && ecs.contains(WEB_NAME),
        "Elasticsearch bulk lines: {ecs}"
    );
    browser.click("#download-bundle").unwrap();
    let zip = browser.wait_for_download(".zip").unwrap();
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&zip).unwrap()).unwrap();
    let mut files = BTreeMap::new();
    for index in 0..archive.len() {
        let mut file = archive.by_index(index).unwrap();
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).unwrap();
        files.insert(file.name().trim_start_matches("bundle/").to_string(), bytes);
    }
    let manifest = String::from_utf8(files["MANIFEST.sha256"].clone()).unwrap();
    for line in manifest.lines() {
        let (sum, name) = line.split_once("  ").unwrap();
        assert_eq!(hex::encode(sha2::Sha256::digest(&files[name])), sum, "{name} in the bundle's manifest");
    }
    for name in ["results.ndjson", "results.csv", "audit-entry.json", "gaps.ndjson"] {
        assert!(manifest.contains(name), "{name} in {manifest}");
    }
    let entry: Value = serde_json::from_slice(&files["audit-entry.json"]).unwrap();
    assert_eq!(entry["seq"].to_string(), audit_seq, "the bundle carries this answer's audit entry");
    assert_eq!(entry["officer"], "PC 1");

    // Question 1: who had client 1's public address and port then.
    let public = tls["public"]["ip"].as_str().unwrap().to_string();
    let port = tls["public"]["port"].to_string();
    let at = tls["start"].as_str().unwrap().to_string();
    ask(&browser, "resolve", &[("ip", &public), ("port", &port), ("at", &at)]);
    browser.wait_for("#rows").unwrap();
    let macs = browser.texts("#rows tbody tr td:nth-child(3)").unwrap();
    assert_eq!(macs, std::slice::from_ref(&c1.mac), "question 1 names client 1");
    shoot(&browser, "05-resolve.png");

    // A cross-site POST (another origin on the same host, as a page an
    // officer was lured to) is refused even with the session cookie.
    let evil_dir = TempDir::new("console-evil");
    std::fs::write(
        evil_dir.path().join("evil.html"),
        format!(
            r#"<!doctype html><form method="post" action="{}"><input name="device" value="{}"><input name="from" value="{from}"><input name="to" value="{to}"><button id="go">go</button></form>"#,
            url("/console/ask/services"),
            c2.mac
        ),
    )
    .unwrap();
    let mut evil = lab
        .spawn_in(
            &lab.gateway,
            Command::new("python3")
                .args(["-m", "http.server", "18491", "--bind", "127.0.0.1", "--directory"])
                .arg(evil_dir.path()),
            "evil",
        )
        .unwrap();
    icr_lab::wait_for(Duration::from_secs(10), "the other site", || {
        Ok(curl(&lab, &["http://127.0.0.1:18491/evil.html"]).0 == 200)
    })
    .unwrap();
    browser.goto("http://127.0.0.1:18491/evil.html").unwrap();
    browser.click("#go").unwrap();
    browser.wait_for("#refusal").unwrap();
    assert!(browser.text("#refusal").unwrap().contains("another site"), "{}", browser.text("#refusal").unwrap());
    let _ = evil.kill();
    let _ = evil.wait();

    // A local authority is refused by the desk, and the refusal is shown.
    browser.goto(&url("/console")).unwrap();
    sign_out(&browser);
    sign_in(&browser, "lab-borough", BOROUGH_TOKEN);
    ask(&browser, "services", &[("device", &c1.mac), ("from", &from), ("to", &to)]);
    browser.wait_for("#refusal").unwrap();
    let refusal = browser.text("#refusal").unwrap();
    assert!(refusal.contains("local authorit"), "{refusal}");
    assert!(!browser.exists("#rows").unwrap());
    shoot(&browser, "06-refused.png");
    sign_out(&browser);

    // The auditor reads the audit log: the questions, the refusal, the chain.
    sign_in(&browser, "lab-auditor", AUDITOR_TOKEN);
    browser.click("#audit-link").unwrap();
    browser.wait_for("#audit").unwrap();
    assert!(browser.text("#verification").unwrap().contains("verifies"));
    let outcomes = browser.texts("#audit tbody tr td:nth-child(7)").unwrap();
    assert!(outcomes.iter().any(|o| o.contains("local authorit")), "the refusal is audited: {outcomes:?}");
    assert!(outcomes.iter().filter(|o| o.as_str() == "answered").count() >= 3, "{outcomes:?}");
    shoot(&browser, "07-audit.png");

    // Signing out ends the session: its pages ask to sign in again.
    sign_out(&browser);
    assert!(browser.cookies().unwrap().iter().all(|c| c.name != "icr_console" || c.value.is_empty()));
    browser.goto(&url("/console/answers/1")).unwrap();
    assert!(browser.exists("#sign-in").unwrap(), "no answer without a session");
    shoot(&browser, "08-signed-out.png");
    drop(browser);
    agent.stop().expect("the agent stops cleanly");
}
