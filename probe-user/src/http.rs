//! The HTTP API (when `[http] listen` is configured; TLS when a certificate
//! is): `POST /v1/query/{resolve,services,accessed}` with a JSON body of the
//! same parameters as the command line, and `Authorization: Bearer <token>`.
//! The token names the authority (it is checked against each authority's
//! argon2 `token_hash`; the token itself is never stored), and the query runs
//! through the same code as on the command line: authorised, purpose-bound,
//! audited. A request without a valid token is refused and audited too.
use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context as _, Result, bail};
use argon2::{Argon2, PasswordHash, PasswordHasher as _, PasswordVerifier as _, password_hash::SaltString};
use axum::{
    Router,
    body::Bytes,
    extract::{Path as UrlPath, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use chrono::Utc;
use clap::Parser as _;
use log::info;
use serde::Deserialize;
use serde_json::Value;

use crate::{
    audit::{AuditLog, AuditRecord},
    cli::{Cli, Command},
    commands,
    config::Config,
    icr::format_time,
    store::{Store, gaps::Gap},
};

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Address to serve on, e.g. "127.0.0.1:8443".
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain and key: HTTPS when both are set.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

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
fn allowed(kind: &str) -> Option<&'static [&'static str]> {
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
}

pub async fn serve(section: &HttpSection, db: PathBuf, config_file: Option<PathBuf>, store: Store) -> Result<()> {
    let Some(listen) = section.listen else { return Ok(()) };
    let app = Router::new()
        .route("/v1/query/{kind}", post(query))
        .with_state(AppState { db, config_file, store });
    match (&section.cert, &section.key) {
        (Some(cert), Some(key)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .with_context(|| format!("loading the certificate {} and key {}", cert.display(), key.display()))?;
            info!("HTTPS API on {listen}");
            tokio::spawn(async move { axum_server::bind_rustls(listen, tls).serve(app.into_make_service()).await });
        }
        (None, None) => {
            let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
            info!("HTTP API on {listen} (no certificate configured: plain HTTP)");
            tokio::spawn(async move { axum::serve(listener, app).await });
        }
        _ => bail!("[http] needs both cert and key for HTTPS, or neither"),
    }
    Ok(())
}

async fn query(State(state): State<AppState>, UrlPath(kind): UrlPath<String>, headers: HeaderMap, body: Bytes) -> Response {
    let state2 = state.clone();
    match tokio::task::spawn_blocking(move || answer(&state2, &kind, &headers, &body)).await {
        Ok(response) => response,
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}")).into_response(),
    }
}

fn error(status: StatusCode, reason: impl Into<String>) -> Response {
    (status, axum::Json(serde_json::json!({ "error": reason.into() }))).into_response()
}

fn answer(state: &AppState, kind: &str, headers: &HeaderMap, body: &[u8]) -> Response {
    let Some(params) = allowed(kind) else { return error(StatusCode::NOT_FOUND, "no such question") };
    let config = match Config::load(state.config_file.as_deref(), Some(&state.db)) {
        Ok(config) => config,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    };
    let refuse = |status: StatusCode, authority: Option<String>, reason: String| {
        let audit = AuditLog::in_dir(&state.db).append(AuditRecord {
            time: format_time(&Utc::now()),
            command: format!("http query {kind}"),
            authority,
            outcome: format!("refused: {reason}"),
            ..AuditRecord::default()
        });
        match audit {
            Ok(_) => error(status, format!("refused: {reason}")),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("auditing: {e:#}")),
        }
    };
    let Some(authority) = authenticate(&config, headers) else {
        return refuse(StatusCode::UNAUTHORIZED, None, "no valid token".into());
    };
    // A client may say which authority it acts for (`icr query --server
    // --authority`): the token must be that authority's.
    if let Some(claimed) = headers.get("icr-authority") {
        if claimed.as_bytes() != authority.as_bytes() {
            let claimed = String::from_utf8_lossy(claimed.as_bytes()).into_owned();
            return refuse(StatusCode::FORBIDDEN, Some(authority), format!("the token is not {claimed:?}'s"));
        }
    }
    let argv = match argv(kind, params, &authority, &state.db, state.config_file.as_deref(), body) {
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
    match commands::query(command, &state.store, &mut out) {
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

/// The authority whose token this is.
fn authenticate(config: &Config, headers: &HeaderMap) -> Option<String> {
    let token = headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")?.trim();
    if token.is_empty() {
        return None;
    }
    config.authorities.iter().find_map(|authority| {
        let hash = PasswordHash::new(authority.token_hash.as_deref()?).ok()?;
        Argon2::default().verify_password(token.as_bytes(), &hash).ok()?;
        Some(authority.name.clone())
    })
}

/// The command line this request stands for.
fn argv(
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
        let config = Config::parse(&format!(
            "[[authority]]\nname = \"met\"\nkind = \"police\"\npurposes = [1]\ntoken_hash = \"{hash}\"\n"
        ))
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer s3cret-token".parse().unwrap());
        assert_eq!(authenticate(&config, &headers).as_deref(), Some("met"));
        headers.insert(header::AUTHORIZATION, "Bearer wrong".parse().unwrap());
        assert_eq!(authenticate(&config, &headers), None);
        headers.remove(header::AUTHORIZATION);
        assert_eq!(authenticate(&config, &headers), None);
    }

    #[test]
    fn bodies_become_the_same_command_line() {
        let db = std::path::Path::new("/var/lib/icr");
        let body = br#"{"officer": "PC 1", "reference": "OP-1", "service": ["a.example", "*.b.example"], "from": "2026-11-22T00:00:00Z", "to": "2026-11-23T00:00:00Z"}"#;
        let line = argv("accessed", allowed("accessed").unwrap(), "met", db, None, body).unwrap();
        assert!(Cli::try_parse_from(&line).is_ok(), "{line:?}");
        assert_eq!(line.iter().filter(|a| *a == "--service").count(), 2);
        assert!(argv("accessed", allowed("accessed").unwrap(), "met", db, None, br#"{"db": "/tmp/x"}"#).is_err(), "no server paths");
        assert!(argv("accessed", allowed("accessed").unwrap(), "met", db, None, br#"{"bundle": "/tmp/x"}"#).is_err());
        assert!(argv("resolve", allowed("resolve").unwrap(), "met", db, None, b"[1, 2]").is_err());
        assert!(argv("resolve", allowed("resolve").unwrap(), "met", db, None, br#"{"format": "table"}"#).is_err());
        assert!(allowed("list").is_none());
    }
}
