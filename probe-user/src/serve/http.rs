//! The HTTP API (when `[http] listen` is configured; TLS when a certificate
//! is): `POST /v1/query/{resolve,services,accessed}` with a JSON body of the
//! same parameters as the command line, and `Authorization: Bearer <token>`.
//! The token names the authority (it is checked against each authority's
//! argon2 `token_hash`; the token itself is never stored), and the query runs
//! through the same code as on the command line: authorised, purpose-bound,
//! audited. A request without a valid token is refused and audited too.
use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use argon2::{Argon2, PasswordHash, PasswordVerifier as _};
use axum::{
    Router,
    body::Body,
    extract::{ConnectInfo, Path as UrlPath, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use axum_server::accept::{Accept, DefaultAcceptor};
use log::{info, warn};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use serde::Deserialize;

use crate::{
    config::{Config, HttpSection, StoreConfig},
    export::Format,
    query::{Ask, Backend, Desk, Failure, Refusal, Request, Who, request::LocalFilter},
    serve::{
        console::{self, ConsoleState},
        tokens::{self, Failures},
    },
    store::gaps::Gap,
};


/// The largest request body: a query's parameters (1 MiB), with room for
/// JSON's quoting.
pub const MAX_BODY_BYTES: usize = 2 << 20;

#[derive(Clone)]
struct AppState {
    db: PathBuf,
    config_file: Option<PathBuf>,
    backend: Arc<dyn Backend>,
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
/// `backend` answers: the agent's store, or the provider's cluster (`icr
/// serve`).
pub async fn serve(section: &HttpSection, db: PathBuf, config_file: Option<PathBuf>, backend: Arc<dyn Backend>) -> Result<()> {
    let Some(listen) = section.listen else { return Ok(()) };
    let request_timeout = section.request_timeout()?;
    let permits = Arc::new(Semaphore::new(section.max_connections()?));
    let failures: Arc<Failures> = Arc::default();
    let console = ConsoleState::new(db.clone(), config_file.clone(), backend.clone(), failures.clone(), section.console_idle()?)?;
    let state = AppState { db, config_file, backend, request_timeout, failures };
    let app = Router::new()
        .route("/v1/query/{kind}", post(query))
        .with_state(state)
        .merge(console::routes(console))
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
    if !QUESTIONS.contains(&kind) {
        return (error(StatusCode::NOT_FOUND, "no such question"), Auth::NotChecked);
    }
    let governing = state.authorising();
    let desk = Desk::new(&state.db, &governing, state.backend.as_ref());
    let loaded = match desk.configuration() {
        Ok(loaded) => loaded,
        Err(e) => return (error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")), Auth::NotChecked),
    };
    let authority = match authenticate(&loaded.config, headers) {
        Ok(authority) => authority,
        Err(reason) => {
            let response = match desk.refuse_unread(&loaded, &format!("http query {kind}"), None, Refusal(reason)) {
                refused @ Failure::Refused(_) => error(StatusCode::UNAUTHORIZED, refused.to_string()),
                other => failure(&other),
            };
            return (response, Auth::Failed);
        }
    };
    let request = match request_of(kind, &authority, body) {
        Ok(request) => request,
        Err(e) => return (error(StatusCode::BAD_REQUEST, format!("{e:#}")), Auth::Passed),
    };
    let response = match desk.answer(&request) {
        Ok(answer) => {
            let content_type = if answer.format == Format::Csv { "text/csv" } else { "application/x-ndjson" };
            let mut response = ([(header::CONTENT_TYPE, content_type)], answer.body).into_response();
            gap_headers(response.headers_mut(), &answer.gaps);
            response
        }
        Err(refused) => failure(&refused),
    };
    (response, Auth::Passed)
}

fn failure(failure: &Failure) -> Response {
    let status = match failure {
        Failure::Refused(_) => StatusCode::FORBIDDEN,
        Failure::Invalid(_) => StatusCode::BAD_REQUEST,
        Failure::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, failure.to_string())
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
    verify: impl FnMut(&str, &PasswordHash) -> bool,
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
    tokens::check(config, name, token, verify)
}

/// The questions served: `POST /v1/query/{kind}`.
const QUESTIONS: [&str; 3] = ["resolve", "services", "accessed"];

/// A body's fields for each question: the command line's flags, without
/// anything that names a path on the server (`db`, `config`, `bundle`,
/// `services_file`) and without `authority`, which the token names. (Each
/// lists who asks itself: serde cannot refuse unknown fields past a
/// flattened one.)
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveBody {
    officer: Option<String>,
    reference: Option<String>,
    format: Option<Format>,
    ip: IpAddr,
    port: Option<Port>,
    at: String,
    tolerance: Option<String>,
    remote: Option<String>,
    service: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServicesBody {
    officer: Option<String>,
    reference: Option<String>,
    format: Option<Format>,
    device: String,
    from: String,
    to: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessedBody {
    officer: Option<String>,
    reference: Option<String>,
    format: Option<Format>,
    service: OneOrMany,
    from: String,
    to: String,
    /// `include` (when absent), `exclude` or `only`.
    local: Option<LocalFilter>,
}

/// A port as a number or as its digits.
#[derive(Deserialize)]
#[serde(untagged)]
enum Port {
    Number(u16),
    Text(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The request a body stands for, on behalf of the authenticated `authority`.
pub fn request_of(kind: &str, authority: &str, body: &[u8]) -> Result<Request> {
    let (ask, (officer, reference, format)) = match kind {
        "resolve" => {
            let b: ResolveBody = serde_json::from_slice(body).context("the body")?;
            let port = match b.port {
                None => None,
                Some(Port::Number(port)) => Some(port),
                Some(Port::Text(text)) => Some(text.trim().parse().with_context(|| format!("port {text:?} is not a port number"))?),
            };
            let tolerance = b.tolerance.unwrap_or_else(|| crate::query::request::DEFAULT_TOLERANCE.to_string());
            (Ask::Resolve { ip: b.ip, port, at: b.at, tolerance, remote: b.remote, service: b.service }, (b.officer, b.reference, b.format))
        }
        "services" => {
            let b: ServicesBody = serde_json::from_slice(body).context("the body")?;
            (Ask::Services { device: b.device, from: b.from, to: b.to }, (b.officer, b.reference, b.format))
        }
        "accessed" => {
            let b: AccessedBody = serde_json::from_slice(body).context("the body")?;
            let services = match b.service {
                OneOrMany::One(service) => vec![service],
                OneOrMany::Many(services) => services,
            };
            let local = b.local.unwrap_or_default();
            (Ask::Accessed { services, from: b.from, to: b.to, local }, (b.officer, b.reference, b.format))
        }
        other => bail!("no such question {other:?}"),
    };
    let format = format.unwrap_or(Format::Ndjson);
    if format == Format::Table {
        bail!("format must be ndjson, csv or ecs");
    }
    Ok(Request {
        ask,
        who: Who { authority: Some(authority.to_string()), officer, reference },
        format,
        bundle: None,
        config: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::tokens::hash_token;

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
    fn bodies_become_requests_for_the_desk() {
        let body = br#"{"officer": "PC 1", "reference": "OP-1", "service": ["a.example", "*.b.example"], "from": "2026-11-22T00:00:00Z", "to": "2026-11-23T00:00:00Z"}"#;
        let request = request_of("accessed", "met", body).unwrap();
        assert_eq!(request.who, Who { authority: Some("met".into()), officer: Some("PC 1".into()), reference: Some("OP-1".into()) });
        assert!(matches!(&request.ask, Ask::Accessed { services, .. } if services.len() == 2));
        assert_eq!((request.format, request.bundle, request.config), (Format::Ndjson, None, None));
        let one = request_of("accessed", "met", br#"{"service": "a.example", "from": "f", "to": "t"}"#).unwrap();
        assert!(matches!(&one.ask, Ask::Accessed { services, local: LocalFilter::Include, .. } if services == &["a.example"]));
        for (text, local) in [("include", LocalFilter::Include), ("exclude", LocalFilter::Exclude), ("only", LocalFilter::Only)] {
            let body = format!(r#"{{"service": "a.example", "from": "f", "to": "t", "local": "{text}"}}"#);
            let request = request_of("accessed", "met", body.as_bytes()).unwrap();
            assert!(matches!(request.ask, Ask::Accessed { local: l, .. } if l == local), "{text}");
            assert_eq!(request.ask.parameters()["local"], text, "audited as asked");
        }
        for bad in [r#""sometimes""#, r#""Only""#, "true", "1", "null"] {
            let body = format!(r#"{{"service": "a.example", "from": "f", "to": "t", "local": {bad}}}"#);
            let refused = request_of("accessed", "met", body.as_bytes());
            // `null` is the field left out; anything else not named is refused.
            assert_eq!(refused.is_ok(), bad == "null", "{bad}");
        }
        assert!(request_of("services", "met", br#"{"device": "d", "from": "f", "to": "t", "local": "only"}"#).is_err(), "question 3's alone");
        let port = |body: &[u8]| request_of("resolve", "met", body).map(|r| match r.ask {
            Ask::Resolve { port, .. } => port,
            _ => unreachable!(),
        });
        assert_eq!(port(br#"{"ip": "192.0.2.1", "port": 10007, "at": "t"}"#).unwrap(), Some(10007));
        assert_eq!(port(br#"{"ip": "192.0.2.1", "port": "10007", "at": "t"}"#).unwrap(), Some(10007));
        assert!(port(br#"{"ip": "192.0.2.1", "port": "many", "at": "t"}"#).is_err());
        // Nothing that names a path on the server, and no authority but the token's.
        for field in [r#""db": "/tmp/x""#, r#""bundle": "/tmp/x""#, r#""config": "/tmp/x""#, r#""authority": "nca""#, r#""services_file": "/x""#] {
            let body = format!(r#"{{{field}, "service": "a.example", "from": "f", "to": "t"}}"#);
            assert!(request_of("accessed", "met", body.as_bytes()).is_err(), "{field}");
        }
        assert!(request_of("resolve", "met", b"[1, 2]").is_err());
        assert!(request_of("services", "met", br#"{"device": "d", "from": "f", "to": "t", "format": "table"}"#).is_err());
        assert!(request_of("list", "met", br#"{"from": "f", "to": "t"}"#).is_err());
    }
}
