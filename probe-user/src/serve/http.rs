//! The HTTP API (when `[http] listen` is configured; TLS when a certificate
//! is): `POST /v1/query/{resolve,services,accessed}` with a JSON body of the
//! same parameters as the command line, and `Authorization: Bearer <token>`.
//! The token names the authority (it is checked against each authority's
//! argon2 `token_hash`; the token itself is never stored), and the query runs
//! through the same code as on the command line: authorised, purpose-bound,
//! audited. A request without a valid token is refused and audited too.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use anyhow::{Context as _, Result, bail};
use argon2::{Argon2, PasswordVerifier as _};
use axum::{
    Router,
    body::{Body, Bytes},
    extract::{ConnectInfo, Path as UrlPath, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use log::{info, warn};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

use crate::{
    config::MAX_BODY_BYTES,
    config::{HttpSection, StoreConfig},
    export::Format,
    query::{Backend, Desk, Failure, Request},
    serve::{
        bodies,
        console::{self, ConsoleState},
        doorkeeper::{BUSY, Doorkeeper, same_origin},
        listener::{self, BodyRefused, Limits},
        refusals::{self, Refusals},
        tokens::{self, Gate},
    },
    store::gaps::Gap,
};

#[derive(Clone)]
struct AppState {
    db: PathBuf,
    config_file: Option<PathBuf>,
    backend: Arc<dyn Backend>,
    doorkeeper: Arc<Doorkeeper>,
}

impl AppState {
    /// Queries over HTTP are authorised by the agent's configuration.
    fn authorising(&self) -> StoreConfig {
        StoreConfig::of_agent(&self.db, self.config_file.as_deref())
    }
}

/// The API, serving.
pub struct Served {
    /// Where it listens (the port chosen, for `listen = "...:0"`).
    pub addr: SocketAddr,
    /// Its task: aborting it stops the API.
    pub task: tokio::task::JoinHandle<()>,
}

/// The API's and the console's routes over one backend, with the state
/// they share: what the listener serves, and what tests drive in-process.
#[derive(Clone)]
pub struct App {
    pub router: Router,
    state: AppState,
}

impl App {
    /// The routes for `section`'s limits. `backend` answers: the agent's
    /// store, or the provider's cluster (`icr serve`); `config_file` is the
    /// agent's configuration (`None`: the store's own in `db`).
    pub fn new(
        section: &HttpSection,
        db: PathBuf,
        config_file: Option<PathBuf>,
        backend: Arc<dyn Backend>,
    ) -> Result<Self> {
        let doorkeeper =
            Arc::new(Doorkeeper { gate: Gate::new(section.max_token_checks), refusals: Refusals::default() });
        let console = ConsoleState::new(console::Settings {
            db: db.clone(),
            config_file: config_file.clone(),
            backend: backend.clone(),
            doorkeeper: doorkeeper.clone(),
            idle: section.console_idle.0,
            sessions_per_authority: section.console_sessions,
            answer_bytes: section.console_answer_bytes,
        })?;
        let state = AppState { db, config_file, backend, doorkeeper };
        let router = Router::new()
            .route("/v1/query/{kind}", post(query))
            .with_state(state.clone())
            .merge(console::routes(console));
        Ok(Self { router, state })
    }

    /// Audits the summaries of refusal floods whose window is over (all,
    /// when `all`); the listener does it every few seconds.
    pub fn write_summaries(&self, all: bool) -> Result<()> {
        let state = &self.state;
        let governing = state.authorising();
        state.doorkeeper.write_summaries(&Desk::new(&state.db, &governing, state.backend.as_ref()), all)
    }
}

/// Serves the API on its own task; a listener that cannot bind, or a
/// certificate that does not load, is an error here. `None` when no
/// `listen` is configured.
pub async fn serve(
    section: &HttpSection,
    db: PathBuf,
    config_file: Option<PathBuf>,
    backend: Arc<dyn Backend>,
) -> Result<Option<Served>> {
    let Some(listen) = section.listen else { return Ok(None) };
    let limits = Limits {
        max_connections: section.max_connections,
        request_timeout: section.request_timeout.0,
        body_bytes_in_flight: section.max_body_bytes_in_flight,
    };
    let app = App::new(section, db, config_file, backend)?;
    let (router, summaries) = (app.router.clone(), app);
    let tls = match (&section.cert, &section.key) {
        (Some(cert), Some(key)) => Some(
            tls_acceptor(cert, key)
                .with_context(|| format!("loading the certificate {} and key {}", cert.display(), key.display()))?,
        ),
        (None, None) => None,
        _ => bail!("[http] needs both cert and key for HTTPS, or neither"),
    };
    let listener = std::net::TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    match tls {
        Some(_) => info!("HTTPS API on {addr}"),
        None => info!("HTTP API on {addr} (no certificate configured: plain HTTP)"),
    }
    // One task for both: aborting it stops the listener and the summaries.
    let task = tokio::spawn(async move {
        let summarising = async move {
            let mut tick = tokio::time::interval(refusals::WINDOW / 4);
            loop {
                tick.tick().await;
                let summaries = summaries.clone();
                let written = tokio::task::spawn_blocking(move || summaries.write_summaries(false)).await;
                if let Ok(Err(error)) = written {
                    warn!("auditing refused requests: {error:#}");
                }
            }
        };
        tokio::select! {
            () = listener::serve(listener, tls, router, limits) => {}
            () = summarising => {}
        }
    });
    Ok(Some(Served { addr, task }))
}

/// The TLS side of the listener: the certificate and key, HTTP/1.1 only.
fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<tokio_rustls::TlsAcceptor> {
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    // No h2: a client that offers only HTTP/2 fails the handshake.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A request body read whole within the listener's limits and `limit`, or
/// the answer that says why not.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, Response> {
    axum::body::to_bytes(body, limit).await.map_err(|e| match listener::body_refusal(&e) {
        Some(BodyRefused::TooSlow) => error(StatusCode::REQUEST_TIMEOUT, BodyRefused::TooSlow.to_string()),
        Some(BodyRefused::Busy) => error(StatusCode::SERVICE_UNAVAILABLE, BodyRefused::Busy.to_string()),
        None => error(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is larger than {limit} bytes, or broken")),
    })
}

/// Whether a request's body is declared JSON.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

async fn query(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    UrlPath(kind): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Before anything is read, checked or audited: a page on another site
    // can send a `text/plain` form here, never `application/json`, and a
    // browser says where a request comes from.
    if !is_json(&headers) {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "the body must be JSON (Content-Type: application/json)");
    }
    if !same_origin(&headers) {
        return error(StatusCode::FORBIDDEN, "a request from another site is refused");
    }
    if !QUESTIONS.contains(&kind.as_str()) {
        return error(StatusCode::NOT_FOUND, "no such question");
    }
    let body = match read_body(body, MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let credentials = match credentials(&headers) {
        Ok(credentials) => credentials,
        Err((claimed, reason)) => {
            // Nothing to check: refused without a token check or a slowdown.
            let state = state.clone();
            let refused = tokio::task::spawn_blocking(move || {
                let governing = state.authorising();
                let desk = Desk::new(&state.db, &governing, state.backend.as_ref());
                match desk.configuration() {
                    Ok(loaded) => state.doorkeeper.refuse_unauthenticated(
                        &desk,
                        &loaded,
                        client.ip(),
                        &format!("http query {kind}"),
                        claimed.as_deref(),
                        reason,
                    ),
                    Err(e) => Failure::Failed(e),
                }
            })
            .await;
            return match refused {
                Ok(refused @ Failure::Refused(_)) => error(StatusCode::UNAUTHORIZED, refused.to_string()),
                Ok(other) => failure(&other),
                Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}")).into_response(),
            };
        }
    };
    let doorkeeper = state.doorkeeper.clone();
    let Some(attempt) = doorkeeper.gate.enter(client.ip(), &credentials.0).await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, BUSY);
    };
    let answering = state.clone();
    match tokio::task::spawn_blocking(move || answer(&answering, client.ip(), &kind, &credentials, &body)).await {
        Ok((response, passed)) => {
            if passed {
                attempt.succeeded();
            }
            response
        }
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}")).into_response(),
    }
}

fn error(status: StatusCode, reason: impl Into<String>) -> Response {
    (status, axum::Json(serde_json::json!({ "error": reason.into() }))).into_response()
}

/// The answer to an authenticated-or-not request, and whether its token
/// was the authority's.
fn answer(
    state: &AppState,
    client: IpAddr,
    kind: &str,
    (name, token): &(String, String),
    body: &[u8],
) -> (Response, bool) {
    let governing = state.authorising();
    let desk = Desk::new(&state.db, &governing, state.backend.as_ref());
    let loaded = match desk.configuration() {
        Ok(loaded) => loaded,
        Err(e) => return (error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")), false),
    };
    let command = format!("http query {kind}");
    let authority = match tokens::check(&loaded.config, name, token, |token, hash| {
        Argon2::default().verify_password(token.as_bytes(), hash).is_ok()
    }) {
        Ok(authority) => authority,
        Err(reason) => {
            let response =
                match state.doorkeeper.refuse_unauthenticated(&desk, &loaded, client, &command, Some(name), reason) {
                    refused @ Failure::Refused(_) => error(StatusCode::UNAUTHORIZED, refused.to_string()),
                    other => failure(&other),
                };
            return (response, false);
        }
    };
    let request = match request_of(kind, &authority, body) {
        Ok(request) => request,
        // The authority is known: its malformed request is audited.
        Err(e) => return (failure(&desk.invalid_unread(&loaded, &command, &authority, format!("{e:#}"))), true),
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
    (response, true)
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

/// The authority a request names and the token it carries; or what it
/// claimed (its authority, if any) and why it cannot be checked. One argon2
/// check per request follows, whatever the number of authorities: the
/// request names whose token it carries (see [`tokens::check`]).
fn credentials(headers: &HeaderMap) -> Result<(String, String), (Option<String>, String)> {
    let name = headers
        .get(AUTHORITY_HEADER)
        .and_then(|name| name.to_str().ok())
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .ok_or_else(|| (None, "the request names no authority (the ICR-Authority header)".to_string()))?;
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| (Some(name.to_string()), "no bearer token".to_string()))?;
    Ok((name.to_string(), token.to_string()))
}

/// The questions served: `POST /v1/query/{kind}`.
const QUESTIONS: [&str; 3] = ["resolve", "services", "accessed"];

/// The request a JSON body stands for, on behalf of the authenticated
/// `authority`: read as the console's forms are (`bodies`).
pub fn request_of(kind: &str, authority: &str, body: &[u8]) -> Result<Request> {
    let body = serde_json::from_slice(body).context("the body")?;
    bodies::request_of(kind, authority, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::{Ask, LocalFilter, Who};
    use crate::{config::Config, serve::tokens::hash_token};
    use argon2::PasswordHash;

    /// [`credentials`], then the token checked by `verify`.
    fn authenticate_with(
        config: &Config,
        headers: &HeaderMap,
        verify: impl FnMut(&str, &PasswordHash) -> bool,
    ) -> Result<String, String> {
        let (name, token) = credentials(headers).map_err(|(_, reason)| reason)?;
        tokens::check(config, &name, &token, verify)
    }

    fn authenticate(config: &Config, headers: &HeaderMap) -> Result<String, String> {
        authenticate_with(config, headers, |token, hash| {
            Argon2::default().verify_password(token.as_bytes(), hash).is_ok()
        })
    }

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
            .map(|(i, hash)| {
                format!("[[authority]]\nname = \"a{i}\"\nkind = \"police\"\npurposes = [1]\ntoken_hash = \"{hash}\"\n")
            })
            .collect();
        let config = Config::parse(&config).unwrap();
        for (name, token, accepted) in
            [("a4", "token-4", true), ("a4", "token-0", false), ("a2", "wrong", false), ("nobody", "token-1", false)]
        {
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
        assert_eq!(
            request.who,
            Who { authority: Some("met".into()), officer: Some("PC 1".into()), reference: Some("OP-1".into()) }
        );
        assert!(matches!(&request.ask, Ask::Accessed { services, .. } if services.len() == 2));
        assert_eq!((request.format, request.bundle, request.config), (Format::Ndjson, None, None));
        let one = request_of("accessed", "met", br#"{"service": "a.example", "from": "f", "to": "t"}"#).unwrap();
        assert!(
            matches!(&one.ask, Ask::Accessed { services, local: LocalFilter::Include, .. } if services == &["a.example"])
        );
        for (text, local) in
            [("include", LocalFilter::Include), ("exclude", LocalFilter::Exclude), ("only", LocalFilter::Only)]
        {
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
        assert!(
            request_of("services", "met", br#"{"device": "d", "from": "f", "to": "t", "local": "only"}"#).is_err(),
            "question 3's alone"
        );
        let port = |body: &[u8]| {
            request_of("resolve", "met", body).map(|r| match r.ask {
                Ask::Resolve { port, .. } => port,
                _ => unreachable!(),
            })
        };
        assert_eq!(port(br#"{"ip": "192.0.2.1", "port": 10007, "at": "t"}"#).unwrap(), Some(10007));
        assert_eq!(port(br#"{"ip": "192.0.2.1", "port": "10007", "at": "t"}"#).unwrap(), Some(10007));
        assert!(port(br#"{"ip": "192.0.2.1", "port": "many", "at": "t"}"#).is_err());
        // Nothing that names a path on the server, and no authority but the token's.
        for field in [
            r#""db": "/tmp/x""#,
            r#""bundle": "/tmp/x""#,
            r#""config": "/tmp/x""#,
            r#""authority": "nca""#,
            r#""services_file": "/x""#,
        ] {
            let body = format!(r#"{{{field}, "service": "a.example", "from": "f", "to": "t"}}"#);
            assert!(request_of("accessed", "met", body.as_bytes()).is_err(), "{field}");
        }
        assert!(request_of("resolve", "met", b"[1, 2]").is_err());
        assert!(
            request_of("services", "met", br#"{"device": "d", "from": "f", "to": "t", "format": "table"}"#).is_err()
        );
        assert!(request_of("list", "met", br#"{"from": "f", "to": "t"}"#).is_err());
    }
}
