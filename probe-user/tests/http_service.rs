//! The HTTP API and the web console stay up under abuse: real listeners on
//! loopback (`serve::http::serve` on 127.0.0.1:0), real sockets, a real
//! store and audit log in a temporary directory. No root, no namespaces.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use icr::{config::Config, serve::http::Served, store::Store};
use icr_test_kit::config::{self as kit, Authority};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
    time::timeout,
};

const TOKEN: &str = "met-token-0123456789";
const OTHER_TOKEN: &str = "nca-token-0123456789";

/// A running API over a fresh store.
struct Api {
    served: Served,
    dir: tempfile::TempDir,
}

impl Api {
    /// Serves with `http` added to `[http]` (and a certificate when `tls`).
    async fn start(http: &str, tls: bool) -> Api {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        std::fs::create_dir(&db).unwrap();
        let certificate = if tls {
            make_certificate(dir.path());
            format!(
                "cert = \"{}\"\nkey = \"{}\"\n",
                dir.path().join("api.pem").display(),
                dir.path().join("api.key").display()
            )
        } else {
            String::new()
        };
        let text = kit::Config::new()
            .authority(Authority::police("met").token(TOKEN))
            .authority(Authority::police("nca").token(OTHER_TOKEN))
            .http("127.0.0.1:0", &format!("{certificate}{http}"))
            .to_string();
        std::fs::write(db.join("icr.toml"), &text).unwrap();
        let config = Config::parse(&text).unwrap();
        let store = Store::open(&db).unwrap();
        let served = icr::serve::http::serve(&config.http, db, None, Arc::new(store)).await.unwrap().unwrap();
        Api { served, dir }
    }

    fn addr(&self) -> SocketAddr {
        self.served.addr
    }

    fn audit_log(&self) -> PathBuf {
        self.dir.path().join("db/audit.log")
    }

    fn audit_bytes(&self) -> u64 {
        std::fs::metadata(self.audit_log()).map(|m| m.len()).unwrap_or(0)
    }

    fn audit_text(&self) -> String {
        std::fs::read_to_string(self.audit_log()).unwrap_or_default()
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.served.task.abort();
    }
}

/// A CA and a certificate for 127.0.0.1 signed by it (`ca.pem`, `api.pem`, `api.key` in `dir`).
fn make_certificate(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[&["req", "-x509"][..], &ec, &["-days", "2", "-subj", "/CN=test CA", "-keyout", "ca.key", "-out", "ca.pem"]]
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

/// A TLS client trusting the test CA, offering `alpn`.
fn tls_connector(dir: &Path, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Connects from `from` (an address of 127.0.0.0/8) to `to`.
async fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{from}:0").parse().unwrap())?;
    socket.connect(to).await
}

/// Sends `request` whole and reads the answer until the server closes or
/// `wait` passes: (status, the whole answer). Status 0: closed without an answer.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, request: &[u8], wait: Duration) -> (u16, String) {
    let _ = timeout(wait, stream.write_all(request)).await;
    let mut answer = Vec::new();
    let _ = timeout(wait, stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    (status, text)
}

async fn ask(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    match connect_from("127.0.0.1", addr).await {
        Ok(stream) => exchange(stream, request, Duration::from_secs(30)).await,
        Err(_) => (0, String::new()),
    }
}

fn get_console() -> Vec<u8> {
    b"GET /console HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".to_vec()
}

fn sign_in(authority: &str, token: &str) -> Vec<u8> {
    let body = format!("authority={authority}&token={token}");
    format!(
        "POST /console/sign-in HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn api_request(headers: &str, body: &str) -> Vec<u8> {
    format!("POST /v1/query/services HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

const SERVICES: &str = r#"{"officer": "PC 1", "reference": "OP-1", "device": "192.0.2.1", "from": "2026-11-22T00:00:00Z", "to": "2026-11-22T01:00:00Z"}"#;

/// Tries a new client every quarter second until the console answers it:
/// how long that took, or `None` within `limit`.
async fn served_within(addr: SocketAddr, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Ok(stream)) = timeout(Duration::from_secs(1), connect_from("127.0.0.1", addr)).await {
            let (status, _) = exchange(stream, &get_console(), Duration::from_secs(1)).await;
            if status == 200 {
                return Some(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

/// Whether the server closed `stream` within `limit` (reads end or fail).
async fn closed_within<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> bool {
    let mut buffer = [0u8; 4096];
    let start = Instant::now();
    while start.elapsed() < limit {
        match timeout(limit.saturating_sub(start.elapsed()), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_cannot_hold_the_service() {
    let api = Api::start("max_connections = 8\nrequest_timeout = \"2s\"\n", false).await;
    // 8 sockets hold every place: 4 send nothing, 4 send HTTP/2's preface.
    let mut held = Vec::new();
    for index in 0..8 {
        let mut stream = connect_from("127.0.0.1", api.addr()).await.unwrap();
        if index % 2 == 1 {
            stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        }
        held.push(stream);
    }
    let served = served_within(api.addr(), Duration::from_secs(12)).await;
    // Before: each held 60 s and more, so no new client for the whole wait.
    assert!(
        served.is_some_and(|after| after < Duration::from_secs(8)),
        "a new client is served while the idle sockets are open: {served:?}"
    );
    // Each is closed `request_timeout` after the server accepted it, which
    // can be later than the new client was served: give the server's timer
    // the request timeout again as margin (before: open past 60 s).
    for stream in &mut held {
        assert!(closed_within(stream, Duration::from_secs(4)).await, "an idle socket is closed by the server");
    }

    // A kept-alive connection that goes quiet after its answer is closed.
    let mut stream = connect_from("127.0.0.1", api.addr()).await.unwrap();
    stream.write_all(b"GET /console HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
    let mut first = [0u8; 12];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let start = Instant::now();
    assert!(closed_within(&mut stream, Duration::from_secs(8)).await, "an idle kept-alive connection is closed");
    assert!(start.elapsed() < Duration::from_secs(6), "after the request timeout: {:?}", start.elapsed());

    // A client that pipelines requests and reads none of the answers is cut
    // off once the server cannot write for the request timeout.
    let mut stream = connect_from("127.0.0.1", api.addr()).await.unwrap();
    let asset = b"GET /console/assets/console.css HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".repeat(100);
    let start = Instant::now();
    let mut cut = None;
    while start.elapsed() < Duration::from_secs(20) {
        if let Ok(Err(_)) = timeout(Duration::from_millis(500), stream.write_all(&asset)).await {
            cut = Some(start.elapsed());
            break;
        }
    }
    // Before: held for as long as the client likes.
    assert!(
        cut.is_some_and(|after| after < Duration::from_secs(12)),
        "a client that reads nothing is cut off: {cut:?}"
    );

    // A console form sent a byte at a time is cut off, as the API's bodies are.
    let mut stream = connect_from("127.0.0.1", api.addr()).await.unwrap();
    stream
        .write_all(b"POST /console/sign-in HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let mut cut = None;
    while start.elapsed() < Duration::from_secs(12) {
        if stream.write_all(b"a").await.is_err() {
            cut = Some(start.elapsed());
            break;
        }
        let mut buffer = [0u8; 512];
        match timeout(Duration::from_millis(200), stream.read(&mut buffer)).await {
            Ok(Ok(_)) | Ok(Err(_)) => {
                cut = Some(start.elapsed());
                break;
            }
            Err(_) => {}
        }
    }
    // Before: still being read after 30 s.
    assert!(cut.is_some_and(|after| after < Duration::from_secs(6)), "a dribbled form is cut off: {cut:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_connections_cannot_hold_the_service_and_http2_is_not_offered() {
    let api = Api::start("max_connections = 8\nrequest_timeout = \"2s\"\n", true).await;
    let connector = tls_connector(api.dir.path(), &[b"h2", b"http/1.1"]);
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    // 8 connections finish TLS and then say nothing.
    let mut held = Vec::new();
    for _ in 0..8 {
        let tcp = connect_from("127.0.0.1", api.addr()).await.unwrap();
        let tls = connector.connect(name.clone(), tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]), "HTTP/1.1 only");
        held.push(tls);
    }
    let start = Instant::now();
    for stream in &mut held {
        assert!(closed_within(stream, Duration::from_secs(8)).await, "an idle TLS connection is closed by the server");
    }
    // Before: held 60 s and more.
    assert!(start.elapsed() < Duration::from_secs(6), "within the request timeout: {:?}", start.elapsed());
    let tcp = connect_from("127.0.0.1", api.addr()).await.unwrap();
    let tls = connector.connect(name.clone(), tcp).await.unwrap();
    assert_eq!(exchange(tls, &get_console(), Duration::from_secs(10)).await.0, 200, "then a new client is served");
    // A client that speaks HTTP/2 only finds no protocol in common.
    let tcp = connect_from("127.0.0.1", api.addr()).await.unwrap();
    assert!(tls_connector(api.dir.path(), &[b"h2"]).connect(name, tcp).await.is_err(), "no HTTP/2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_checks_and_unread_bodies_are_bounded() {
    let api =
        Api::start("max_token_checks = 2\nmax_body_bytes_in_flight = 4194304\nrequest_timeout = \"10s\"\n", false)
            .await;
    // 40 wrong sign-ins at once, from 40 addresses (no slowdown shared).
    let guesses: Vec<_> = (0..40)
        .map(|index| {
            let addr = api.addr();
            tokio::spawn(async move {
                let stream = connect_from(&format!("127.0.1.{}", index + 1), addr).await.unwrap();
                exchange(stream, &sign_in(&format!("nobody{index}"), "wrong"), Duration::from_secs(60)).await.0
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for guess in guesses {
        statuses.push(guess.await.unwrap());
    }
    let checked = statuses.iter().filter(|&&s| s == 401).count();
    let busy = statuses.iter().filter(|&&s| s == 503).count();
    assert_eq!(checked + busy, 40, "{statuses:?}");
    // Before: 40 argon2 checks at once (19 MiB each), none refused.
    assert!(busy >= 10, "past 2 checks at once, the rest are answered 503 at once: {checked} checked, {busy} busy");

    // 16 connections each send half of a 2 MiB body and stop: 4 MiB is held at most.
    let mut bodies = Vec::new();
    for _ in 0..16 {
        let mut stream = connect_from("127.0.0.1", api.addr()).await.unwrap();
        let head = "POST /v1/query/services HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2097152\r\n\r\n";
        stream.write_all(head.as_bytes()).await.unwrap();
        let _ = timeout(Duration::from_secs(2), stream.write_all(&vec![b' '; 1 << 20])).await;
        bodies.push(stream);
    }
    let mut refused = 0;
    for stream in &mut bodies {
        let mut answer = [0u8; 12];
        if let Ok(Ok(_)) = timeout(Duration::from_secs(2), stream.read_exact(&mut answer)).await
            && &answer == b"HTTP/1.1 503"
        {
            refused += 1;
        }
    }
    // Before: all 16 MiB buffered, no answer until the timeout.
    assert!(refused >= 10, "bodies past the 4 MiB budget are refused at once: {refused} of 16");
    drop(bodies);
    // Once the held bodies are given back (their connections closed), a request is served.
    let request = api_request("Content-Type: application/json\r\nICR-Authority: met\r\n", SERVICES);
    let mut status = 0;
    for _ in 0..40 {
        status = ask(api.addr(), &request).await.0;
        if status != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(status, 401, "then served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_refusals_cannot_fill_the_audit_log() {
    let api = Api::start("", false).await;
    // A sign-in naming a 1.5 MB authority.
    let huge = "a".repeat(1_500_000);
    let before = api.audit_bytes();
    assert_eq!(ask(api.addr(), &sign_in(&huge, "wrong")).await.0, 401);
    let grown = api.audit_bytes() - before;
    // Before: +3.0 MB (the name, twice).
    assert!(grown > 0 && grown < 4096, "one bounded entry: {grown} bytes");
    assert!(api.audit_text().contains("(1500000 bytes)"), "the entry says how long the name was");

    // 30 API requests at once from one address, each naming a 40 KB authority.
    let before = api.audit_bytes();
    let name = "b".repeat(40_000);
    let requests: Vec<_> = (0..30)
        .map(|_| {
            let (addr, request) = (
                api.addr(),
                api_request(&format!("Content-Type: application/json\r\nICR-Authority: {name}\r\n"), SERVICES),
            );
            tokio::spawn(async move { ask(addr, &request).await.0 })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), 401);
    }
    let grown = api.audit_bytes() - before;
    // Before: 30 entries of 80 KB each.
    assert!(grown < 8 * 1024, "a few bounded entries, not 30: {grown} bytes");
    // When the window is over, one entry counts the rest.
    let start = Instant::now();
    while !api.audit_text().contains("\"http refusals\"") && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let text = api.audit_text();
    let summary = text
        .lines()
        .find(|line| line.contains("\"http refusals\""))
        .unwrap_or_else(|| panic!("a summary entry: {text}"));
    let summary: serde_json::Value = serde_json::from_str(summary).unwrap();
    assert_eq!(summary["parameters"]["client"], "127.0.0.1");
    let written = text.lines().filter(|line| line.contains("\"http query services\"")).count() as u64;
    assert_eq!(summary["parameters"]["refused"].as_u64().unwrap() + written, 30, "every refusal counted once: {text}");
    let verify = icr::query::audit::AuditLog::open(&api.dir.path().join("db"), &Default::default()).unwrap().verify();
    assert!(verify.is_ok(), "the chain holds: {verify:?}");
}

/// How long a wrong API guess from `from` for `authority` takes to answer (401).
async fn guess(addr: SocketAddr, from: &str, authority: &str, token: &str) -> (u16, Duration) {
    let start = Instant::now();
    let request = api_request(
        &format!("Content-Type: application/json\r\nICR-Authority: {authority}\r\nAuthorization: Bearer {token}\r\n"),
        SERVICES,
    );
    // A busy answer (503) is not a guess: tried again.
    for _ in 0..400 {
        let stream = connect_from(from, addr).await.unwrap();
        let (status, _) = exchange(stream, &request, Duration::from_secs(60)).await;
        if status != 503 {
            return (status, start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (503, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guesses_slow_down_per_address_and_per_name_even_in_parallel() {
    let api = Api::start("max_token_checks = 2\nrequest_timeout = \"30s\"\n", false).await;
    let addr = api.addr();
    let parallel: Vec<_> =
        (0..8).map(|_| tokio::spawn(async move { guess(addr, "127.0.0.1", "met", "wrong").await })).collect();
    let mut took = Vec::new();
    for guess in parallel {
        let (status, after) = guess.await.unwrap();
        assert_eq!(status, 401);
        took.push(after);
    }
    took.sort();
    // Before: all 8 checked at once, none slowed (answered in ~0.5 s).
    assert!(took[7] >= Duration::from_secs(3), "parallel guesses are slowed one after another: {took:?}");
    // A success does not wipe the slate; another address guessing the same
    // name is slowed too. (8 counted: each waits the longest delay.)
    let succeeded = tokio::spawn(async move { guess(addr, "127.0.0.1", "met", TOKEN).await });
    let elsewhere = tokio::spawn(async move { guess(addr, "127.0.0.2", "met", "wrong").await });
    // Meanwhile, both slowed down: another authority from another address is
    // checked at once, not kept out by the guesser's waits (no 503).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = Instant::now();
    let stream = connect_from("127.0.0.3", addr).await.unwrap();
    let request = api_request(
        &format!("Content-Type: application/json\r\nICR-Authority: nca\r\nAuthorization: Bearer {OTHER_TOKEN}\r\n"),
        SERVICES,
    );
    let (status, answer) = exchange(stream, &request, Duration::from_secs(30)).await;
    assert_eq!(status, 200, "{answer}");
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
    assert_eq!(succeeded.await.unwrap().0, 200, "the right token is still accepted");
    let (status, after) = elsewhere.await.unwrap();
    assert_eq!(status, 401);
    assert!(after >= Duration::from_secs(2), "per name: {after:?}");
    let (status, after) = guess(addr, "127.0.0.1", "met", "wrong").await;
    assert_eq!(status, 401);
    assert!(after >= Duration::from_secs(2), "not reset by the success: {after:?}");
}

/// The session cookie a sign-in answer sets.
fn cookie_of(answer: &str) -> String {
    let line = answer
        .lines()
        .find(|line| line.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("a cookie: {answer}"));
    line.split_once(':').unwrap().1.split(';').next().unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_authority_signing_in_again_and_again_ends_only_its_own_sessions() {
    let api = Api::start("console_sessions = 4\n", false).await;
    let (status, answer) = ask(api.addr(), &sign_in("nca", OTHER_TOKEN)).await;
    assert_eq!(status, 303, "{answer}");
    let nca = cookie_of(&answer);
    let mut met = Vec::new();
    for _ in 0..64 {
        let (status, answer) = ask(api.addr(), &sign_in("met", TOKEN)).await;
        assert_eq!(status, 303, "{answer}");
        met.push(cookie_of(&answer));
    }
    let home = |cookie: &str| {
        format!("GET /console HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nCookie: {cookie}\r\n\r\n")
            .into_bytes()
    };
    let (_, page) = ask(api.addr(), &home(&nca)).await;
    // Before: evicted by met's 64 sign-ins.
    assert!(page.contains("Signed in as"), "nca's session is alive");
    let (_, page) = ask(api.addr(), &home(&met[0])).await;
    assert!(!page.contains("Signed in as"), "met's oldest session ended");
    let (_, page) = ask(api.addr(), &home(&met[63])).await;
    assert!(page.contains("Signed in as"), "met's newest session is alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_requests_are_refused_unread_and_malformed_ones_audited() {
    let api = Api::start("", false).await;
    let authorised = format!("ICR-Authority: met\r\nAuthorization: Bearer {TOKEN}\r\n");
    let before = api.audit_bytes();
    // What a page on another site can send: a text/plain form, or JSON with its Origin.
    let (status, answer) =
        ask(api.addr(), &api_request("Content-Type: text/plain\r\nICR-Authority: met\r\n", SERVICES)).await;
    assert_eq!(status, 415, "{answer}");
    let (status, _) = ask(
        api.addr(),
        &api_request(
            "Content-Type: application/json\r\nOrigin: https://evil.example\r\nICR-Authority: met\r\n",
            SERVICES,
        ),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = ask(
        api.addr(),
        &api_request(
            &format!("Content-Type: application/json\r\nSec-Fetch-Site: cross-site\r\n{authorised}"),
            SERVICES,
        ),
    )
    .await;
    assert_eq!(status, 403);
    // Before: 401 and an audit entry each.
    assert_eq!(api.audit_bytes(), before, "nothing audited");

    // An authenticated request with a field the API does not take: 400, audited.
    let (status, answer) = ask(
        api.addr(),
        &api_request(&format!("Content-Type: application/json\r\n{authorised}"), r#"{"db": "/tmp/elsewhere"}"#),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    let text = api.audit_text();
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().unwrap_or_else(|| panic!("audited: {text}"))).unwrap();
    assert_eq!(
        (last["command"].as_str(), last["authority"].as_str()),
        (Some("http query services"), Some("met")),
        "{last}"
    );
    assert!(last["outcome"].as_str().unwrap().starts_with("failed: "), "{last}");
    // And a good one still answers.
    let (status, answer) = ask(
        api.addr(),
        &api_request(&format!("Content-Type: application/json; charset=utf-8\r\n{authorised}"), SERVICES),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
}
