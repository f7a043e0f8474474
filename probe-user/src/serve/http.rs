//! The HTTP API (when `[http] listen` is configured; TLS when a certificate
//! is): `POST /v1/query/{resolve,services,accessed}` with a JSON body of the
//! same parameters as the command line, and `Authorization: Bearer <token>`.
//! The token names the authority (it is checked against each authority's
//! argon2 `token_hash`; the token itself is never stored), and the query runs
//! through the same code as on the command line: authorised, purpose-bound,
//! audited. A request without a valid token is refused and audited too.
use std::{
    collections::HashMap as StdHashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use argon2::{Argon2, PasswordHash, PasswordHasher as _, PasswordVerifier as _, password_hash::SaltString};
use axum::{
    Router,
    body::Body,
    extract::{ConnectInfo, Path as UrlPath, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use chrono::Utc;
use clap::Parser as _;
use axum_server::accept::{Accept, DefaultAcceptor};
use log::{info, warn};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use serde_json::Value;

use crate::{
    config::HttpSection,
    query::audit::{AuditLog, AuditRecord},
    serve::cli::{Cli, Command},
    serve::commands,
    config::{Config, LoadedConfig, StoreConfig},
    icr::format_time,
    store::{Store, gaps::Gap},
};


/// The largest request body: a query's parameters (1 MiB), with room for
/// JSON's quoting.
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// The salted argon2 hash of a token, for an authority's `token_hash`.
pub fn hash_token(token: &str) -> Result<String> {
    if token.is_empty() {
        anyhow::bail!("the token is empty: give the token on standard input");
    }
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).map_err(|_| anyhow::anyhow!("no randomness for a salt"))?;
    let salt = SaltString::encode_b64(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Argon2::default().hash_password(token.as_bytes(), &salt).map_err(|e| anyhow::anyhow!("{e}"))?.to_string())
}

/// Parameters each question takes over HTTP (as command-line flags). Paths
/// on the server (`--db`, `--config`, `--bundle`, `--services-file`) are not
/// among them.
pub fn allowed(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "resolve" => Some(&["ip", "port", "at", "tolerance", "remote", "service"]),
        "services" => Some(&["device", "from", "to"]),
        "accessed" => Some(&["service", "from", "to"]),
        _ => None,
    }
}

#[derive(Clone)]
struct AppState {
    db: PathBuf,
    config_file: Option<PathBuf>,
    store: Store,
    request_timeout: Duration,
    failures: Arc<Failures>,
}

impl AppState {
    /// Queries over HTTP are authorised by the agent's configuration.
    fn authorising(&self) -> StoreConfig {
        StoreConfig::of_agent(&self.db, self.config_file.as_deref())
    }
}

/// Serves the API on its own task; a listener that cannot bind, or a
/// certificate that does not load, is an error here.
pub async fn serve(section: &HttpSection, db: PathBuf, config_file: Option<PathBuf>, store: Store) -> Result<()> {
    let Some(listen) = section.listen else { return Ok(()) };
    let request_timeout = section.request_timeout()?;
    let permits = Arc::new(Semaphore::new(section.max_connections()?));
    let state = AppState { db, config_file, store, request_timeout, failures: Arc::default() };
    let app = Router::new()
        .route("/v1/query/{kind}", post(query))
        .with_state(state)
        .into_make_service_with_connect_info::<SocketAddr>();
    let listener = std::net::TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    listener.set_nonblocking(true)?;
    let server = axum_server::from_tcp(listener)?;
    match (&section.cert, &section.key) {
        (Some(cert), Some(key)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .with_context(|| format!("loading the certificate {} and key {}", cert.display(), key.display()))?;
            let tls = axum_server::tls_rustls::RustlsAcceptor::new(tls).handshake_timeout(request_timeout);
            let mut server = server.acceptor(LimitAcceptor { inner: tls, permits });
            limit_headers(server.http_builder(), request_timeout);
            info!("HTTPS API on {listen}");
            tokio::spawn(async move {
                if let Err(error) = server.serve(app).await {
                    warn!("the HTTPS API stopped: {error}");
                }
            });
        }
        (None, None) => {
            let mut server = server.acceptor(LimitAcceptor { inner: DefaultAcceptor, permits });
            limit_headers(server.http_builder(), request_timeout);
            info!("HTTP API on {listen} (no certificate configured: plain HTTP)");
            tokio::spawn(async move {
                if let Err(error) = server.serve(app).await {
                    warn!("the HTTP API stopped: {error}");
                }
            });
        }
        _ => bail!("[http] needs both cert and key for HTTPS, or neither"),
    }
    Ok(())
}

/// A client that dribbles its headers is cut off after `timeout`.
fn limit_headers(builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>, timeout: Duration) {
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(timeout);
}

/// Closes a connection at once when `permits` are all taken; each open
/// connection holds one until it closes.
#[derive(Clone)]
struct LimitAcceptor<A> {
    inner: A,
    permits: Arc<Semaphore>,
}

impl<I, S, A> Accept<I, S> for LimitAcceptor<A>
where
    A: Accept<I, S>,
    A::Future: Send + 'static,
    A::Stream: Send + 'static,
    A::Service: Send + 'static,
{
    type Stream = Limited<A::Stream>;
    type Service = A::Service;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<(Self::Stream, Self::Service)>> + Send>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            // Dropping `stream` closes it: no handshake, no task kept.
            return Box::pin(std::future::ready(Err(std::io::Error::other("the connection limit is reached"))));
        };
        let accepted = self.inner.accept(stream, service);
        Box::pin(async move {
            let (stream, service) = accepted.await?;
            Ok((Limited { stream, _permit: permit }, service))
        })
    }
}

/// A connection with its permit, given back when it closes.
struct Limited<S> {
    stream: S,
    _permit: OwnedSemaphorePermit,
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Failed authentications per client address: after a few, each answer to
/// that address waits, longer each time, so that tokens cannot be guessed at
/// speed. Forgotten after a quiet spell, and on success.
#[derive(Default)]
struct Failures(Mutex<StdHashMap<IpAddr, (u32, Instant)>>);

/// Failures allowed before answers slow down.
const FREE_FAILURES: u32 = 3;
/// The first wait, doubled at each further failure, up to `MAX_FAILURE_DELAY`.
const FIRST_FAILURE_DELAY: Duration = Duration::from_millis(250);
const MAX_FAILURE_DELAY: Duration = Duration::from_secs(8);
/// A client quiet this long starts afresh.
const FAILURE_MEMORY: Duration = Duration::from_secs(15 * 60);
/// Addresses remembered at most (the oldest are forgotten first).
const MAX_FAILING_CLIENTS: usize = 10_000;

impl Failures {
    fn delay(&self, client: IpAddr) -> Duration {
        let map = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match map.get(&client) {
            Some(&(count, last)) if count >= FREE_FAILURES && last.elapsed() < FAILURE_MEMORY => {
                let doublings = (count - FREE_FAILURES).min(16);
                (FIRST_FAILURE_DELAY * 2u32.pow(doublings)).min(MAX_FAILURE_DELAY)
            }
            _ => Duration::ZERO,
        }
    }

    fn failed(&self, client: IpAddr) {
        let mut map = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if map.len() >= MAX_FAILING_CLIENTS && !map.contains_key(&client) {
            map.retain(|_, (_, last)| last.elapsed() < FAILURE_MEMORY);
            if map.len() >= MAX_FAILING_CLIENTS
                && let Some(oldest) = map.iter().min_by_key(|(_, (_, last))| *last).map(|(ip, _)| *ip)
            {
                map.remove(&oldest);
            }
        }
        let entry = map.entry(client).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_MEMORY {
            entry.0 = 0;
        }
        *entry = (entry.0.saturating_add(1), Instant::now());
    }

    fn succeeded(&self, client: IpAddr) {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&client);
    }
}

async fn query(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    UrlPath(kind): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // The body within the time and size limits, before any work.
    let body = match tokio::time::timeout(state.request_timeout, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => return error(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is larger than {MAX_BODY_BYTES} bytes, or broken")),
        Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "the body took too long"),
    };
    let delay = state.failures.delay(client.ip());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let state2 = state.clone();
    let answered = tokio::task::spawn_blocking(move || answer(&state2, &kind, &headers, &body)).await;
    match answered {
        Ok((response, auth)) => {
            match auth {
                Auth::Passed => state.failures.succeeded(client.ip()),
                Auth::Failed => state.failures.failed(client.ip()),
                Auth::NotChecked => {}
            }
            response
        }
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}")).into_response(),
    }
}

fn error(status: StatusCode, reason: impl Into<String>) -> Response {
    (status, axum::Json(serde_json::json!({ "error": reason.into() }))).into_response()
}

/// Whether a request's token was checked, and how it went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Auth {
    NotChecked,
    Passed,
    Failed,
}

fn answer(state: &AppState, kind: &str, headers: &HeaderMap, body: &[u8]) -> (Response, Auth) {
    let Some(params) = allowed(kind) else { return (error(StatusCode::NOT_FOUND, "no such question"), Auth::NotChecked) };
    let loaded = match state.authorising().load() {
        Ok(loaded) => loaded,
        Err(e) => return (error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")), Auth::NotChecked),
    };
    let authority = match authenticate(&loaded.config, headers) {
        Ok(authority) => authority,
        Err(reason) => return (refuse(state, &loaded, kind, StatusCode::UNAUTHORIZED, None, reason), Auth::Failed),
    };
    (answer_authenticated(state, kind, params, &authority, body), Auth::Passed)
}

/// Refuses a request, audited.
fn refuse(state: &AppState, loaded: &LoadedConfig, kind: &str, status: StatusCode, authority: Option<String>, reason: String) -> Response {
    let audit = AuditLog::open(&state.db, &loaded.config.audit).and_then(|log| log.append(AuditRecord {
        time: format_time(&Utc::now()),
        command: format!("http query {kind}"),
        authority,
        outcome: format!("refused: {reason}"),
        config_sha256: loaded.sha256.clone(),
        ..AuditRecord::default()
    }));
    match audit {
        Ok(_) => error(status, format!("refused: {reason}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("auditing: {e:#}")),
    }
}

fn answer_authenticated(state: &AppState, kind: &str, params: &[&str], authority: &str, body: &[u8]) -> Response {
    let argv = match request_argv(kind, params, authority, &state.db, state.config_file.as_deref(), body) {
        Ok(argv) => argv,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{e:#}")),
    };
    let command = match Cli::try_parse_from(&argv) {
        Ok(Cli { command: Command::Query(query) }) => query,
        Ok(_) => return error(StatusCode::BAD_REQUEST, "not a query"),
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string().lines().next().unwrap_or("bad parameters").to_string()),
    };
    let format = argv.iter().position(|a| a == "--format").and_then(|i| argv.get(i + 1)).cloned().unwrap_or_default();
    let mut out = Vec::new();
    match commands::query(command, &state.store, &state.authorising(), &mut out) {
        Ok(gaps) => {
            let content_type = if format == "csv" { "text/csv" } else { "application/x-ndjson" };
            let mut response = ([(header::CONTENT_TYPE, content_type)], out).into_response();
            gap_headers(response.headers_mut(), &gaps);
            response
        }
        Err(e) if commands::is_refusal(&e) => error(StatusCode::FORBIDDEN, format!("{e:#}")),
        Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
    }
}

/// Most gap entries listed in a response's `ICR-Gap` headers; `ICR-Gaps`
/// always has the full count.
const MAX_GAP_HEADERS: usize = 100;

/// Capture gaps in the window ride beside the body, which stays the answer:
/// `ICR-Gaps: N` and one `ICR-Gap` header per gap, its JSON.
fn gap_headers(headers: &mut HeaderMap, gaps: &[Gap]) {
    headers.insert("icr-gaps", gaps.len().into());
    for gap in gaps.iter().take(MAX_GAP_HEADERS) {
        if let Ok(value) = serde_json::to_string(gap).map_err(anyhow::Error::from).and_then(|json| Ok(json.parse()?)) {
            headers.append("icr-gap", value);
        }
    }
}

/// The header that names the authority a request acts for (`icr query
/// --server --authority NAME` sends it).
pub const AUTHORITY_HEADER: &str = "icr-authority";

/// The authority the request names, if its token is that authority's. One
/// argon2 check per request, whatever the number of authorities: the
/// request names whose token it carries, and an unknown name is checked
/// against a stand-in hash so that it takes as long as a wrong token.
fn authenticate(config: &Config, headers: &HeaderMap) -> Result<String, String> {
    authenticate_with(config, headers, |token, hash| Argon2::default().verify_password(token.as_bytes(), hash).is_ok())
}

/// [`authenticate`], with the argon2 check given (tests count its calls).
fn authenticate_with(
    config: &Config,
    headers: &HeaderMap,
    mut verify: impl FnMut(&str, &PasswordHash) -> bool,
) -> Result<String, String> {
    let name = headers
        .get(AUTHORITY_HEADER)
        .and_then(|name| name.to_str().ok())
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .ok_or_else(|| "the request names no authority (the ICR-Authority header)".to_string())?;
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| "no bearer token".to_string())?;
    let configured = config.authority(name).and_then(|authority| authority.token_hash.as_deref());
    let hash = configured.and_then(|hash| PasswordHash::new(hash).ok());
    let verified = match &hash {
        Some(hash) => verify(token, hash),
        None => {
            if let Ok(stand_in) = PasswordHash::new(stand_in_hash()) {
                verify(token, &stand_in);
            }
            false
        }
    };
    if verified { Ok(name.to_string()) } else { Err(format!("no valid token for authority {name:?}")) }
}

/// A hash no token matches, for names without one.
fn stand_in_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| hash_token("no authority has this token").unwrap_or_default())
}

/// The command line a request's body stands for.
pub fn request_argv(
    kind: &str,
    params: &[&str],
    authority: &str,
    db: &std::path::Path,
    config_file: Option<&std::path::Path>,
    body: &[u8],
) -> Result<Vec<String>> {
    let Value::Object(fields) = serde_json::from_slice::<Value>(body).context("the body is not a JSON object")? else {
        bail!("the body is not a JSON object");
    };
    let mut argv: Vec<String> = vec!["icr".into(), "query".into(), kind.into(), "--authority".into(), authority.into()];
    argv.extend(["--db".into(), db.display().to_string()]);
    if let Some(file) = config_file {
        argv.extend(["--config".into(), file.display().to_string()]);
    }
    let mut format = "ndjson".to_string();
    for (key, value) in fields {
        let texts: Vec<String> = match &value {
            Value::String(s) => vec![s.clone()],
            Value::Number(n) => vec![n.to_string()],
            Value::Array(items) => items.iter().map(|v| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())).collect(),
            _ => bail!("{key}: expected a string, number or list"),
        };
        match key.as_str() {
            "officer" | "reference" => argv.extend([format!("--{key}"), texts.concat()]),
            "format" => format = texts.concat(),
            other if params.contains(&other) => {
                for text in texts {
                    argv.extend([format!("--{other}"), text]);
                }
            }
            other => bail!("unknown parameter {other:?} for {kind}"),
        }
    }
    if !["ndjson", "csv", "ecs"].contains(&format.as_str()) {
        bail!("format must be ndjson, csv or ecs");
    }
    argv.extend(["--format".into(), format]);
    Ok(argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_against_their_hash_only() {
        assert!(format!("{:#}", hash_token("").unwrap_err()).contains("the token is empty"));
        let hash = hash_token("s3cret-token").unwrap();
        assert!(!hash.contains("s3cret"), "the hash does not contain the token");
        let other = hash_token("other-token").unwrap();
        let config = Config::parse(&format!(
            "[[authority]]\nname = \"met\"\nkind = \"police\"\npurposes = [1]\ntoken_hash = \"{hash}\"\n\
             [[authority]]\nname = \"nca\"\nkind = \"police\"\npurposes = [1]\ntoken_hash = \"{other}\"\n"
        ))
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer s3cret-token".parse().unwrap());
        let refused = authenticate(&config, &headers).unwrap_err();
        assert!(refused.contains("names no authority"), "{refused}");
        headers.insert(AUTHORITY_HEADER, "met".parse().unwrap());
        assert_eq!(authenticate(&config, &headers).as_deref(), Ok("met"));
        // Another authority's token, or an authority that is not configured.
        headers.insert(AUTHORITY_HEADER, "nca".parse().unwrap());
        assert!(authenticate(&config, &headers).unwrap_err().contains("no valid token for authority \"nca\""));
        headers.insert(AUTHORITY_HEADER, "nobody".parse().unwrap());
        assert!(authenticate(&config, &headers).is_err());
        headers.insert(AUTHORITY_HEADER, "met".parse().unwrap());
        headers.insert(header::AUTHORIZATION, "Bearer wrong".parse().unwrap());
        assert!(authenticate(&config, &headers).is_err());
        headers.remove(header::AUTHORIZATION);
        assert_eq!(authenticate(&config, &headers), Err("no bearer token".to_string()));
    }

    #[test]
    fn a_request_costs_one_argon2_check_whatever_the_number_of_authorities() {
        let hashes: Vec<String> = (0..5).map(|i| hash_token(&format!("token-{i}")).unwrap()).collect();
        let config: String = hashes
            .iter()
            .enumerate()
            .map(|(i, hash)| format!("[[authority]]\nname = \"a{i}\"\nkind = \"police\"\npurposes = [1]\ntoken_hash = \"{hash}\"\n"))
            .collect();
        let config = Config::parse(&config).unwrap();
        for (name, token, accepted) in [("a4", "token-4", true), ("a4", "token-0", false), ("a2", "wrong", false), ("nobody", "token-1", false)] {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
            headers.insert(AUTHORITY_HEADER, name.parse().unwrap());
            let mut checks = 0;
            let result = authenticate_with(&config, &headers, |token, hash| {
                checks += 1;
                Argon2::default().verify_password(token.as_bytes(), hash).is_ok()
            });
            assert_eq!(result.is_ok(), accepted, "{name} {token}");
            assert_eq!(checks, 1, "{name} {token}: one argon2 check, not one per authority");
        }
    }

    #[test]
    fn repeated_failures_from_one_address_are_slowed_and_forgotten_on_success() {
        let failures = Failures::default();
        let (client, other): (IpAddr, IpAddr) = ("192.0.2.7".parse().unwrap(), "192.0.2.8".parse().unwrap());
        for _ in 0..FREE_FAILURES {
            assert_eq!(failures.delay(client), Duration::ZERO);
            failures.failed(client);
        }
        assert_eq!(failures.delay(client), FIRST_FAILURE_DELAY);
        failures.failed(client);
        assert_eq!(failures.delay(client), FIRST_FAILURE_DELAY * 2);
        for _ in 0..40 {
            failures.failed(client);
        }
        assert_eq!(failures.delay(client), MAX_FAILURE_DELAY);
        assert_eq!(failures.delay(other), Duration::ZERO, "per address");
        failures.succeeded(client);
        assert_eq!(failures.delay(client), Duration::ZERO);
    }

    #[test]
    fn bodies_become_the_same_command_line() {
        let db = std::path::Path::new("/var/lib/icr");
        let body = br#"{"officer": "PC 1", "reference": "OP-1", "service": ["a.example", "*.b.example"], "from": "2026-11-22T00:00:00Z", "to": "2026-11-23T00:00:00Z"}"#;
        let line = request_argv("accessed", allowed("accessed").unwrap(), "met", db, None, body).unwrap();
        assert!(Cli::try_parse_from(&line).is_ok(), "{line:?}");
        assert_eq!(line.iter().filter(|a| *a == "--service").count(), 2);
        assert!(request_argv("accessed", allowed("accessed").unwrap(), "met", db, None, br#"{"db": "/tmp/x"}"#).is_err(), "no server paths");
        assert!(request_argv("accessed", allowed("accessed").unwrap(), "met", db, None, br#"{"bundle": "/tmp/x"}"#).is_err());
        assert!(request_argv("resolve", allowed("resolve").unwrap(), "met", db, None, b"[1, 2]").is_err());
        assert!(request_argv("resolve", allowed("resolve").unwrap(), "met", db, None, br#"{"format": "table"}"#).is_err());
        assert!(allowed("list").is_none());
    }
}
