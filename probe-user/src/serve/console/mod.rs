//! The web console, for the people who receive and answer disclosure
//! requests: the three questions as forms, answers as a table and a
//! timeline with their capture gaps, downloads (CSV, NDJSON, ECS, the
//! disclosure bundle as a zip), and the audit log for auditors. Served by
//! the HTTP API's listener (same TLS, same tokens); every question goes to
//! the same desk as the command line's, so it is refused, authorised and
//! audited exactly as there.
//!
//! Sessions: signing in checks an authority's API token once and sets an
//! HttpOnly, Secure, SameSite=Strict cookie naming a random session, kept
//! in memory; a session idle for `[http] console_idle` ends. Every form
//! carries the session's anti-forgery token, and a request from another
//! origin (`Origin`, `Sec-Fetch-Site`) is refused. Pages come with a strict
//! Content-Security-Policy: the only script and style are the console's
//! own, embedded in the binary.
mod pages;
mod sessions;
mod timeline;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use axum::{
    Form, Router,
    extract::{ConnectInfo, Path as UrlPath, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware,
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use chrono::Utc;
use maud::Markup;
use serde::Deserialize;

use crate::{
    config::{AuthorityKind, StoreConfig},
    export::{self, Format},
    query::{
        Ask, Backend, Desk, Failure, Request,
        audit::{AuditLog, AuditRecord},
    },
    record::format_time,
    serve::{
        bodies,
        doorkeeper::{BUSY, Doorkeeper, same_origin},
        tokens,
    },
};
pub use sessions::{Answered, Kind, Rows};
use sessions::{COOKIE, Session, Sessions, Signed, cookie, random_hex};

/// Audit entries the auditor's page lists (the newest).
const AUDIT_ROWS: usize = 500;

/// What every console response carries.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// How the console is set up.
pub struct Settings {
    pub db: PathBuf,
    pub config_file: Option<PathBuf>,
    pub backend: Arc<dyn Backend>,
    pub doorkeeper: Arc<Doorkeeper>,
    /// A session ends after this long without a request.
    pub idle: Duration,
    /// Sessions one authority may have at once.
    pub sessions_per_authority: usize,
    /// Bytes of answers one session keeps.
    pub answer_bytes: usize,
}

/// What the console's handlers share.
#[derive(Clone)]
pub struct ConsoleState {
    db: PathBuf,
    config_file: Option<PathBuf>,
    backend: Arc<dyn Backend>,
    doorkeeper: Arc<Doorkeeper>,
    sessions: Arc<Sessions>,
    /// Where answers' bundles are written: `DIR/console`, root's only.
    bundles: PathBuf,
}

impl ConsoleState {
    pub fn new(settings: Settings) -> anyhow::Result<Self> {
        let Settings { db, config_file, backend, doorkeeper, idle, sessions_per_authority, answer_bytes } = settings;
        let bundles = db.join("console");
        // Bundles of sessions that ended with an earlier agent.
        if bundles.exists() {
            std::fs::remove_dir_all(&bundles).with_context(|| format!("clearing {}", bundles.display()))?;
        }
        let sessions = Sessions { idle, per_authority: sessions_per_authority, answer_bytes, map: Mutex::default() };
        Ok(Self { db, config_file, backend, doorkeeper, sessions: Arc::new(sessions), bundles })
    }

    fn governing(&self) -> StoreConfig {
        StoreConfig::of_agent(&self.db, self.config_file.as_deref())
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock()
    }

    /// The session the request's cookie names, if it is alive: marks it seen.
    fn session_id(&self, headers: &HeaderMap) -> Option<String> {
        cookie(headers).filter(|id| self.sessions.alive(id))
    }
}

/// The console's routes, on the API's listener.
pub fn routes(state: ConsoleState) -> Router {
    Router::new()
        .route("/console", get(home))
        .route("/console/sign-in", post(sign_in))
        .route("/console/sign-out", post(sign_out))
        .route("/console/ask/{question}", get(ask_form).post(ask))
        .route("/console/answers/{id}", get(answer_page))
        .route("/console/answers/{id}/{file}", get(download))
        .route("/console/audit", get(audit_page))
        .route("/console/assets/{name}", get(asset))
        .layer(middleware::map_response(secure_headers))
        .with_state(state)
}

async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Not `no-referrer`: under it a browser sends `Origin: null` with the
    // console's own forms, and the origin check would refuse them.
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn asset(UrlPath(name): UrlPath<String>) -> Response {
    let (body, content_type) = match name.as_str() {
        "console.css" => (include_str!("assets/console.css"), "text/css; charset=utf-8"),
        "console.js" => (include_str!("assets/console.js"), "text/javascript; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn html(status: StatusCode, markup: Markup) -> Response {
    (status, markup).into_response()
}

fn refused(status: StatusCode, reason: &str) -> Response {
    html(status, pages::refused(reason))
}

fn server_error(error: impl std::fmt::Display) -> Response {
    refused(StatusCode::INTERNAL_SERVER_ERROR, &format!("{error:#}"))
}

async fn home(State(state): State<ConsoleState>, headers: HeaderMap) -> Response {
    match state.session_id(&headers) {
        Some(id) => {
            let sessions = state.sessions();
            match sessions.get(&id) {
                Some(session) => html(StatusCode::OK, pages::home(&session.signed())),
                None => html(StatusCode::OK, pages::sign_in(None)),
            }
        }
        None => html(StatusCode::OK, pages::sign_in(None)),
    }
}

#[derive(Deserialize)]
struct SignIn {
    authority: String,
    token: String,
}

async fn sign_in(
    State(state): State<ConsoleState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<SignIn>,
) -> Response {
    if !same_origin(&headers) {
        return refused(StatusCode::FORBIDDEN, "a sign-in from another site is refused");
    }
    let name = form.authority.trim().to_string();
    let Some(attempt) = state.doorkeeper.gate.enter(client.ip(), &name).await else {
        return html(StatusCode::SERVICE_UNAVAILABLE, pages::sign_in(Some(BUSY)));
    };
    let checking = state.clone();
    let asked = name.clone();
    let checked = tokio::task::spawn_blocking(move || -> anyhow::Result<Result<AuthorityKind, String>> {
        let governing = checking.governing();
        let desk = Desk::new(&checking.db, &governing, checking.backend.as_ref());
        let loaded = desk.configuration()?;
        match tokens::verify(&loaded.config, &asked, &form.token) {
            Ok(_) => Ok(Ok(loaded.config.authority(&asked).map_or(AuthorityKind::LocalGovernment, |a| a.kind))),
            Err(reason) => {
                // Audited like the API's refusals (never the token).
                let refusal = checking.doorkeeper.refuse_unauthenticated(
                    &desk,
                    &loaded,
                    client.ip(),
                    "console sign-in",
                    Some(&asked),
                    reason,
                );
                Ok(Err(refusal.to_string()))
            }
        }
    })
    .await;
    let kind = match checked {
        Ok(Ok(Ok(kind))) => kind,
        Ok(Ok(Err(reason))) => return html(StatusCode::UNAUTHORIZED, pages::sign_in(Some(&reason))),
        Ok(Err(error)) => return server_error(error),
        Err(error) => return server_error(error),
    };
    attempt.succeeded();
    let (Ok(id), Ok(csrf)) = (random_hex(), random_hex()) else { return server_error("no randomness for a session") };
    state.sessions.start(
        id.clone(),
        Session { authority: name, kind, csrf, last_seen: Instant::now(), answers: Vec::new(), next_answer: 1 },
    );
    // Secure: browsers keep it from plain HTTP except on loopback, where
    // the API allows plain HTTP at all.
    let cookie = format!("{COOKIE}={id}; Path=/console; HttpOnly; Secure; SameSite=Strict");
    let mut response = Redirect::to("/console").into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// A form's anti-forgery token.
#[derive(Deserialize)]
struct Csrf {
    csrf: String,
}

/// The session of a state-changing request, if its form is genuine: the
/// session is alive, the request comes from the console's own origin, and
/// its anti-forgery token is the session's.
fn genuine(state: &ConsoleState, headers: &HeaderMap, csrf: &str) -> Result<String, Box<Response>> {
    if !same_origin(headers) {
        return Err(Box::new(refused(StatusCode::FORBIDDEN, "a request from another site is refused")));
    }
    let Some(id) = state.session_id(headers) else {
        return Err(Box::new(refused(StatusCode::FORBIDDEN, "no session: sign in first")));
    };
    // Digests compared: how long the comparison takes says nothing of the token.
    let digest = |text: &str| <sha2::Sha256 as sha2::Digest>::digest(text.as_bytes());
    let matches = state.sessions().get(&id).is_some_and(|s| digest(&s.csrf) == digest(csrf));
    if !matches {
        return Err(Box::new(refused(StatusCode::FORBIDDEN, "the form's anti-forgery token is missing or wrong")));
    }
    Ok(id)
}

async fn sign_out(State(state): State<ConsoleState>, headers: HeaderMap, Form(form): Form<Csrf>) -> Response {
    let id = match genuine(&state, &headers, &form.csrf) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    // Bind first: the lock is released before the bundles are removed.
    let ended = state.sessions().remove(&id);
    if let Some(session) = ended {
        session.end();
    }
    let mut response = Redirect::to("/console").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("icr_console=; Path=/console; HttpOnly; Secure; SameSite=Strict; Max-Age=0"),
    );
    response
}

/// The signed-in page for `id`, or the sign-in page.
fn with_session(state: &ConsoleState, headers: &HeaderMap, page: impl FnOnce(&Session) -> Response) -> Response {
    let Some(id) = state.session_id(headers) else {
        return html(StatusCode::UNAUTHORIZED, pages::sign_in(Some("Sign in first (or again: the session ended).")));
    };
    match state.sessions().get(&id) {
        Some(session) => page(session),
        None => html(StatusCode::UNAUTHORIZED, pages::sign_in(None)),
    }
}

async fn ask_form(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    UrlPath(question): UrlPath<String>,
) -> Response {
    let Some(kind) = Kind::from_path(&question) else { return StatusCode::NOT_FOUND.into_response() };
    with_session(&state, &headers, |session| {
        html(StatusCode::OK, pages::ask(&session.signed(), kind, &HashMap::new(), None))
    })
}

/// The desk's request for a form: the form's values as given, read as the
/// API reads a body (`bodies`); the signed-in authority; the answer as CSV
/// with a bundle.
fn request_of(kind: Kind, authority: &str, form: &HashMap<String, String>, bundle: &Path) -> Result<Request, String> {
    let text = |name: &str| form.get(name).map(|v| v.trim().to_string()).unwrap_or_default();
    // What the desk checks (a time, a device) is passed on even empty, so
    // that it is audited; a field left empty is otherwise left out, as from
    // a body.
    let (given, optional): (&[&str], &[&str]) = match kind {
        Kind::Resolve => (&["ip", "at"], &["port", "tolerance", "remote", "service"]),
        Kind::Services => (&["device", "from", "to"], &[]),
        Kind::Accessed => (&["from", "to"], &["local"]),
    };
    let mut body = serde_json::Map::new();
    for name in given {
        body.insert(name.to_string(), serde_json::Value::String(text(name)));
    }
    for name in ["officer", "reference"].iter().chain(optional) {
        if let Some(value) = Some(text(name)).filter(|value| !value.is_empty()) {
            body.insert(name.to_string(), serde_json::Value::String(value));
        }
    }
    if kind == Kind::Accessed {
        // One service a line.
        let services =
            text("services").lines().map(str::trim).filter(|s| !s.is_empty()).map(serde_json::Value::from).collect();
        body.insert("service".into(), serde_json::Value::Array(services));
    }
    let request =
        bodies::request_of(kind.path(), authority, serde_json::Value::Object(body)).map_err(|e| format!("{e:#}"))?;
    Ok(Request { format: Format::Csv, bundle: Some(bundle.to_path_buf()), ..request })
}

async fn ask(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    UrlPath(question): UrlPath<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let Some(kind) = Kind::from_path(&question) else { return StatusCode::NOT_FOUND.into_response() };
    let id = match genuine(&state, &headers, form.get("csrf").map(String::as_str).unwrap_or_default()) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    let (authority, answer_id) = {
        let mut sessions = state.sessions();
        let Some(session) = sessions.get_mut(&id) else {
            return refused(StatusCode::FORBIDDEN, "no session: sign in first");
        };
        session.next_answer += 1;
        (session.authority.clone(), session.next_answer - 1)
    };
    let Ok(bundle_name) = random_hex() else { return server_error("no randomness") };
    let bundle = state.bundles.join(&bundle_name[..32]);
    let form_page = |status: StatusCode, message: &str| {
        with_session(&state, &headers, |session| {
            html(status, pages::ask(&session.signed(), kind, &form, Some(message)))
        })
    };
    let request = match request_of(kind, &authority, &form, &bundle) {
        Ok(request) => request,
        Err(reason) => return form_page(StatusCode::BAD_REQUEST, &reason),
    };
    let asking = state.clone();
    let summary = summary_of(&request.ask);
    let answered = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&asking.bundles)
            .map_err(|e| Failure::Failed(anyhow::Error::from(e).context("creating the console's bundle directory")))?;
        let governing = asking.governing();
        Desk::new(&asking.db, &governing, asking.backend.as_ref())
            .answer(&request)
            .map(|answer| (answer.gaps, answer.window))
    })
    .await;
    let (gaps, (from, to)) = match answered {
        Ok(Ok(answered)) => answered,
        Ok(Err(failure)) => {
            let status = match failure {
                Failure::Refused(_) => StatusCode::FORBIDDEN,
                Failure::Invalid(_) => StatusCode::BAD_REQUEST,
                Failure::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            return form_page(status, &failure.to_string());
        }
        Err(error) => return server_error(error),
    };
    let (rows, audit_seq, bytes) = match read_bundle(kind, &bundle, state.sessions.answer_bytes) {
        Ok(read) => read,
        Err(error) => return server_error(error.context("reading the answer's bundle back")),
    };
    let (rows, shown) = match rows {
        Some(rows) => (rows, true),
        None => (if kind == Kind::Services { Rows::Services(Vec::new()) } else { Rows::Records(Vec::new()) }, false),
    };
    let bytes = if shown { bytes } else { 0 };
    let answered =
        Arc::new(Answered { id: answer_id, kind, summary, from, to, rows, shown, gaps, audit_seq, bundle, bytes });
    if !state.sessions.keep(&id, answered) {
        return refused(StatusCode::FORBIDDEN, "the session ended");
    }
    Redirect::to(&format!("/console/answers/{answer_id}")).into_response()
}

fn summary_of(ask: &Ask) -> String {
    match ask {
        Ask::Resolve { ip, port, at, .. } => {
            format!("Who had {ip}{} at {at}", port.map(|p| format!(":{p}")).unwrap_or_default())
        }
        Ask::Services { device, from, to } => format!("Services of {device} from {from} to {to}"),
        Ask::Accessed { services, from, to, local } => {
            format!("Devices that used {} from {from} to {to} (local exchanges: {local:?})", services.join(", "))
        }
        Ask::List { from, to } => format!("Every record from {from} to {to}"),
        Ask::ExportIpfix { from, to, destination } => {
            format!("Every record from {from} to {to}, as IPFIX to {destination}")
        }
    }
}

/// The rows (none when they are larger than `max_bytes`: the page then
/// offers the downloads only), the audit entry's number and the rows' size,
/// from the bundle the desk wrote.
fn read_bundle(kind: Kind, dir: &Path, max_bytes: usize) -> anyhow::Result<(Option<Rows>, u64, usize)> {
    let results = dir.join("results.ndjson");
    let size = usize::try_from(std::fs::metadata(&results)?.len()).unwrap_or(usize::MAX);
    let rows = if size > max_bytes {
        None
    } else {
        let ndjson = std::fs::read_to_string(&results)?;
        let lines = ndjson.lines().filter(|l| !l.trim().is_empty());
        Some(match kind {
            Kind::Services => Rows::Services(lines.map(serde_json::from_str).collect::<Result<_, _>>()?),
            Kind::Resolve | Kind::Accessed => Rows::Records(lines.map(serde_json::from_str).collect::<Result<_, _>>()?),
        })
    };
    let entry: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("audit-entry.json"))?)?;
    Ok((rows, entry["seq"].as_u64().unwrap_or_default(), size))
}

/// A session's answer by its number.
fn answer_of(
    state: &ConsoleState,
    headers: &HeaderMap,
    id: u64,
) -> Result<(Arc<Answered>, String, String, bool), Box<Response>> {
    let Some(session_id) = state.session_id(headers) else {
        return Err(Box::new(html(
            StatusCode::UNAUTHORIZED,
            pages::sign_in(Some("Sign in first (or again: the session ended).")),
        )));
    };
    let sessions = state.sessions();
    let session =
        sessions.get(&session_id).ok_or_else(|| Box::new(refused(StatusCode::FORBIDDEN, "the session ended")))?;
    let answer = session
        .answers
        .iter()
        .find(|a| a.id == id)
        .cloned()
        .ok_or_else(|| Box::new(StatusCode::NOT_FOUND.into_response()))?;
    Ok((answer, session.authority.clone(), session.csrf.clone(), session.kind == AuthorityKind::Auditor))
}

/// `?page=N` of an answer.
#[derive(Deserialize)]
struct Page {
    page: Option<usize>,
}

async fn answer_page(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<u64>,
    Query(page): Query<Page>,
) -> Response {
    let (answered, authority, csrf, auditor) = match answer_of(&state, &headers, id) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let timeline = match &answered.rows {
        Rows::Records(records) => timeline::of_records(records, answered.from, answered.to, &answered.gaps),
        Rows::Services(rows) => timeline::of_services(rows, answered.from, answered.to, &answered.gaps),
    };
    let signed = Signed { authority: &authority, csrf: &csrf, auditor };
    html(StatusCode::OK, pages::answer(&signed, &answered, timeline, page.page.unwrap_or(1)))
}

async fn download(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    UrlPath((id, file)): UrlPath<(u64, String)>,
) -> Response {
    let (answered, ..) = match answer_of(&state, &headers, id) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let stem = format!("icr-{}-{}", answered.kind.path(), answered.audit_seq);
    let made = match file.as_str() {
        "results.csv" => std::fs::read(answered.bundle.join("results.csv"))
            .map(|b| (b, "text/csv; charset=utf-8", format!("{stem}.csv")))
            .map_err(anyhow::Error::from),
        "results.ndjson" => std::fs::read(answered.bundle.join("results.ndjson"))
            .map(|b| (b, "application/x-ndjson", format!("{stem}.ndjson")))
            .map_err(anyhow::Error::from),
        "results.ecs.ndjson" => match &answered.rows {
            Rows::Records(records) => {
                let mut body = Vec::new();
                export::write_records(&mut body, records, Format::Ecs)
                    .map(|()| (body, "application/x-ndjson", format!("{stem}.ecs.ndjson")))
            }
            Rows::Services(_) => return StatusCode::NOT_FOUND.into_response(),
        },
        "bundle.zip" => zip_bundle(&answered.bundle).map(|b| (b, "application/zip", format!("{stem}-bundle.zip"))),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    match made {
        Ok((body, content_type, name)) => {
            let disposition = format!("attachment; filename=\"{name}\"");
            ([(header::CONTENT_TYPE, content_type.to_string()), (header::CONTENT_DISPOSITION, disposition)], body)
                .into_response()
        }
        Err(error) => server_error(error),
    }
}

/// The bundle's files in one zip, under a folder named like the bundle.
fn zip_bundle(dir: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    names.sort();
    for path in names {
        let name = path.file_name().and_then(|n| n.to_str()).context("a bundle file's name")?;
        zip.start_file(format!("bundle/{name}"), options)?;
        zip.write_all(&std::fs::read(&path)?)?;
    }
    Ok(zip.finish()?.into_inner())
}

/// The audit page's content: whether the chain verifies (its entry count,
/// or why not), and the newest entries.
type AuditView = (Result<u64, String>, Vec<serde_json::Value>);

async fn audit_page(State(state): State<ConsoleState>, headers: HeaderMap) -> Response {
    let Some(id) = state.session_id(&headers) else {
        return html(StatusCode::UNAUTHORIZED, pages::sign_in(Some("Sign in first.")));
    };
    let (authority, csrf, kind) = match state.sessions().get(&id) {
        Some(s) => (s.authority.clone(), s.csrf.clone(), s.kind),
        None => return html(StatusCode::UNAUTHORIZED, pages::sign_in(None)),
    };
    let reading = state.clone();
    let who = authority.clone();
    let read = tokio::task::spawn_blocking(move || -> anyhow::Result<Result<AuditView, String>> {
        let loaded = reading.governing().load()?;
        let log = AuditLog::open(&reading.db, &loaded.config.audit)?;
        let mut entry = AuditRecord {
            time: format_time(&Utc::now()),
            command: "console audit".into(),
            authority: Some(who),
            config_sha256: loaded.sha256.clone(),
            ..AuditRecord::default()
        };
        if kind != AuthorityKind::Auditor {
            entry.outcome = "refused: only an auditor authority reads the audit log".into();
            log.append(entry.clone())?;
            return Ok(Err(entry.outcome));
        }
        // The read is itself an entry, written before the log is shown.
        entry.outcome = "answered".into();
        log.append(entry)?;
        let verified = log.verify().map_err(|e| format!("{e:#}"));
        let text = std::fs::read_to_string(log.path()).unwrap_or_default();
        let mut entries: Vec<serde_json::Value> =
            text.lines().rev().take(AUDIT_ROWS).filter_map(|l| serde_json::from_str(l).ok()).collect();
        entries.shrink_to_fit();
        Ok(Ok((verified, entries)))
    })
    .await;
    let signed = Signed { authority: &authority, csrf: &csrf, auditor: kind == AuthorityKind::Auditor };
    match read {
        Ok(Ok(Ok((verified, entries)))) => html(StatusCode::OK, pages::audit(&signed, verified, &entries)),
        Ok(Ok(Err(reason))) => refused(StatusCode::FORBIDDEN, &reason),
        Ok(Err(error)) => server_error(error),
        Err(error) => server_error(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::{LocalFilter, Who};

    #[test]
    fn forms_become_the_desks_requests() {
        let form: HashMap<String, String> = [
            ("officer", " PC 1 "),
            ("reference", "OP-1"),
            ("services", "www.example.test\n\n*.example.org\r\n198.51.100.0/24"),
            ("from", "2026-11-22T00:00:00Z"),
            ("to", "2026-11-23T00:00:00Z"),
            ("local", "exclude"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let request = request_of(Kind::Accessed, "met-police", &form, Path::new("/tmp/b")).unwrap();
        assert_eq!(
            request.ask,
            Ask::Accessed {
                services: vec!["www.example.test".into(), "*.example.org".into(), "198.51.100.0/24".into()],
                from: "2026-11-22T00:00:00Z".into(),
                to: "2026-11-23T00:00:00Z".into(),
                local: LocalFilter::Exclude,
            }
        );
        assert_eq!(
            request.who,
            Who { authority: Some("met-police".into()), officer: Some("PC 1".into()), reference: Some("OP-1".into()) }
        );
        assert_eq!(
            (request.format, request.bundle.as_deref(), request.config.as_deref()),
            (Format::Csv, Some(Path::new("/tmp/b")), None)
        );
        let mut bad = form.clone();
        bad.insert("local".into(), "sometimes".into());
        let refused = request_of(Kind::Accessed, "met-police", &bad, Path::new("/tmp/b")).unwrap_err();
        assert!(["sometimes", "include", "exclude", "only"].iter().all(|word| refused.contains(word)), "{refused}");
        // Left empty: today's answer, as from a body without it.
        bad.insert("local".into(), " ".into());
        let request = request_of(Kind::Accessed, "met-police", &bad, Path::new("/tmp/b")).unwrap();
        assert!(matches!(request.ask, Ask::Accessed { local: LocalFilter::Include, .. }));
        // What the desk checks is passed on even empty: the desk audits it.
        bad.insert("from".into(), String::new());
        let request = request_of(Kind::Accessed, "met-police", &bad, Path::new("/tmp/b")).unwrap();
        assert!(matches!(request.ask, Ask::Accessed { from, .. } if from.is_empty()));
        let resolve: HashMap<String, String> = [("ip", "203.0.113.1"), ("port", ""), ("at", "2026-11-22T15:02:00Z")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let Ask::Resolve { ip, port, tolerance, .. } =
            request_of(Kind::Resolve, "a", &resolve, Path::new("/tmp/b")).unwrap().ask
        else {
            panic!()
        };
        assert_eq!((ip.to_string(), port, tolerance.as_str()), ("203.0.113.1".into(), None, "1s"));
        let mut bad_ip = resolve.clone();
        bad_ip.insert("ip".into(), "not-an-ip".into());
        assert!(request_of(Kind::Resolve, "a", &bad_ip, Path::new("/tmp/b")).is_err());
    }

    #[test]
    fn a_bundle_zips_every_file_under_one_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("results.ndjson"), b"{}\n").unwrap();
        std::fs::write(dir.path().join("MANIFEST.sha256"), b"x  results.ndjson\n").unwrap();
        let bytes = zip_bundle(dir.path()).unwrap();
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        let names: Vec<String> = (0..archive.len()).map(|i| archive.by_index(i).unwrap().name().to_string()).collect();
        assert_eq!(names, ["bundle/MANIFEST.sha256", "bundle/results.ndjson"]);
        let mut text = String::new();
        std::io::Read::read_to_string(&mut archive.by_name("bundle/results.ndjson").unwrap(), &mut text).unwrap();
        assert_eq!(text, "{}\n");
    }
}
