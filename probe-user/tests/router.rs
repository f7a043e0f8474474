//! The HTTP API's and the web console's routes, driven in-process
//! (`tower::ServiceExt::oneshot` on `serve::http::App`) over a temporary
//! store: every refusal, status, header and limit a door decides itself,
//! and what the audit log keeps of it. The listener's own limits (deadlines,
//! idle and slow connections) are in `http_service.rs`, over real sockets.
use std::{net::SocketAddr, path::Path, sync::Arc};

use axum::{
    Router,
    body::Body,
    extract::ConnectInfo,
    http::{Request, Response, StatusCode, header},
};
use icr::{
    config::{Config, MAX_BODY_BYTES},
    serve::{http::App, tokens::hash_token},
    store::Store,
};
use icr_test_kit::{
    config::{self as kit, Authority},
    samples,
};
use serde_json::Value;
use tower::ServiceExt as _;

const TOKEN: &str = "met-token-0123456789";
const AUDITOR_TOKEN: &str = "audit-token-0123456789";
const COUNCIL_TOKEN: &str = "council-token-0123456789";
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

struct Doors {
    router: Router,
    dir: tempfile::TempDir,
}

impl Doors {
    /// The routes over a store holding [`samples::tcp`]: `met` (police, every
    /// question, [`TOKEN`]), `nca` (police, question 2 only, same token),
    /// `audit` (auditor) and `borough` (a local government authority).
    fn new(http: &str) -> Doors {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().to_path_buf();
        let hash = hash_token(TOKEN).unwrap();
        let text = kit::Config::new()
            .authority(Authority::police("met").token_hash(&hash))
            .authority(Authority::new("nca", "police", &[2]).token_hash(&hash))
            .authority(Authority::auditor("audit").token(AUDITOR_TOKEN))
            .authority(Authority::new("borough", "local", &[1, 2, 3]).token(COUNCIL_TOKEN))
            .section("http", http)
            .to_string();
        std::fs::write(db.join("icr.toml"), &text).unwrap();
        let config = Config::parse(&text).unwrap();
        let store = Store::open(&db).unwrap();
        store.append(&[samples::tcp()]).unwrap();
        let app = App::new(&config.http, db, None, Arc::new(store)).unwrap();
        Doors { router: app.router, dir }
    }

    fn db(&self) -> &Path {
        self.dir.path()
    }

    /// The response to `request`, as from 192.0.2.1.
    async fn send(&self, mut request: Request<Body>) -> Response<Body> {
        let client: SocketAddr = "192.0.2.1:40000".parse().unwrap();
        request.extensions_mut().insert(ConnectInfo(client));
        self.router.clone().oneshot(request).await.unwrap()
    }

    fn audit(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.db().join("audit.log")).unwrap_or_default();
        text.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
    }
}

async fn body_text(response: Response<Body>) -> String {
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn query(kind: &str) -> axum::http::request::Builder {
    Request::post(format!("/v1/query/{kind}")).header(header::HOST, "127.0.0.1:8443")
}

fn json(builder: axum::http::request::Builder, body: &str) -> Request<Body> {
    builder.header(header::CONTENT_TYPE, "application/json").body(Body::from(body.to_string())).unwrap()
}

const RESOLVE: &str =
    r#"{"officer":"PC 1","reference":"OP-1","ip":"203.0.113.1","port":20000,"at":"2026-11-22T10:00:02Z"}"#;

#[tokio::test]
async fn the_api_refuses_before_reading_what_no_page_of_another_site_may_send() {
    let doors = Doors::new("");
    // A cross-site form can send text/plain, never JSON: 415, unread.
    let plain = query("resolve")
        .header(header::CONTENT_TYPE, "text/plain")
        .header("icr-authority", "met")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Body::from(RESOLVE))
        .unwrap();
    assert_eq!(doors.send(plain).await.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // JSON from another origin, or a browser saying cross-site: 403.
    let other_origin = json(
        query("resolve")
            .header(header::ORIGIN, "https://evil.example")
            .header("icr-authority", "met")
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}")),
        RESOLVE,
    );
    assert_eq!(doors.send(other_origin).await.status(), StatusCode::FORBIDDEN);
    let cross_site = json(query("resolve").header("sec-fetch-site", "cross-site"), RESOLVE);
    assert_eq!(doors.send(cross_site).await.status(), StatusCode::FORBIDDEN);
    // No such question.
    assert_eq!(doors.send(json(query("everything"), "{}")).await.status(), StatusCode::NOT_FOUND);
    // None of these was read, so none is audited.
    assert!(doors.audit().is_empty(), "{:?}", doors.audit());
}

#[tokio::test]
async fn a_body_larger_than_the_limit_is_refused_unread() {
    let doors = Doors::new("");
    let big = format!(r#"{{"officer":"{}"}}"#, "x".repeat(MAX_BODY_BYTES));
    let request = json(
        query("resolve").header("icr-authority", "met").header(header::AUTHORIZATION, format!("Bearer {TOKEN}")),
        &big,
    );
    let response = doors.send(request).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(doors.audit().is_empty());
}

#[tokio::test]
async fn requests_without_a_valid_token_are_refused_and_audited_with_a_bounded_claim() {
    let doors = Doors::new("");
    // No authority named.
    let response = doors.send(json(query("resolve"), RESOLVE)).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let error: Value = serde_json::from_str(&body_text(response).await).unwrap();
    assert!(error["error"].as_str().unwrap().contains("names no authority"), "{error}");
    // A huge claimed authority and a wrong token.
    let claimed = "a".repeat(100_000);
    let wrong =
        json(query("resolve").header("icr-authority", &claimed).header(header::AUTHORIZATION, "Bearer nope"), RESOLVE);
    assert_eq!(doors.send(wrong).await.status(), StatusCode::UNAUTHORIZED);
    let audit = doors.audit();
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert!(audit.iter().all(|entry| entry["outcome"].as_str().unwrap().starts_with("refused")));
    let kept = audit[1].to_string().len();
    assert!(kept < 4096, "the audit keeps a bounded prefix of the claim, not {kept} bytes");
}

#[tokio::test]
async fn an_authorised_question_is_answered_with_its_gaps_and_a_refused_or_malformed_one_is_audited() {
    let doors = Doors::new("");
    let ask = |authority: &str, body: &str| {
        json(
            query("resolve")
                .header("icr-authority", authority)
                .header(header::AUTHORIZATION, format!("Bearer {TOKEN}")),
            body,
        )
    };
    let response = doors.send(ask("met", RESOLVE)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/x-ndjson");
    assert_eq!(response.headers()["icr-gaps"], "0");
    let answer = body_text(response).await;
    let record: Value = serde_json::from_str(answer.lines().next().unwrap()).unwrap();
    assert_eq!(record["device"]["ip"], "192.168.50.11");
    // nca may not ask question 1: 403, audited.
    assert_eq!(doors.send(ask("nca", RESOLVE)).await.status(), StatusCode::FORBIDDEN);
    // An authenticated request with a field the question does not have: 400, audited.
    let malformed = r#"{"officer":"PC 1","reference":"OP-1","ip":"203.0.113.1","at":"x","db":"/etc"}"#;
    assert_eq!(doors.send(ask("met", malformed)).await.status(), StatusCode::BAD_REQUEST);
    let outcomes: Vec<String> =
        doors.audit().iter().map(|entry| entry["outcome"].as_str().unwrap().to_string()).collect();
    assert_eq!(outcomes.len(), 3, "{outcomes:?}");
    assert_eq!(outcomes[0], "answered");
    assert!(outcomes[1].starts_with("refused"), "{outcomes:?}");
    assert!(outcomes[2].starts_with("failed"), "{outcomes:?}");
}

/// The API's refusal table, each row's status, and each refusal audited:
/// the same table `http_api` drives through a real agent's listener.
#[tokio::test]
async fn every_refusal_has_its_status_and_is_audited() {
    let doors = Doors::new("");
    let ask = |kind: &str, authority: Option<&str>, token: Option<&str>, body: &str| {
        let mut builder = query(kind);
        if let Some(authority) = authority {
            builder = builder.header("icr-authority", authority);
        }
        if let Some(token) = token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        json(builder, body)
    };
    let services = r#"{"officer":"PC 1","reference":"OP-1","device":"192.168.50.11","from":"2026-11-22T00:00:00Z","to":"2026-11-23T00:00:00Z"}"#;
    let cases = [
        ("wrong token", ask("services", Some("met"), Some("not-a-token"), services), StatusCode::UNAUTHORIZED),
        ("no token", ask("services", Some("met"), None, services), StatusCode::UNAUTHORIZED),
        ("no authority named", ask("services", None, Some(TOKEN), services), StatusCode::UNAUTHORIZED),
        (
            "another authority's token",
            ask("services", Some("met"), Some(AUDITOR_TOKEN), services),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "a local government authority",
            ask("services", Some("borough"), Some(COUNCIL_TOKEN), services),
            StatusCode::FORBIDDEN,
        ),
        ("an auditor asks", ask("services", Some("audit"), Some(AUDITOR_TOKEN), services), StatusCode::FORBIDDEN),
        ("a purpose not granted", ask("resolve", Some("nca"), Some(TOKEN), RESOLVE), StatusCode::FORBIDDEN),
        (
            "no reference",
            ask("services", Some("met"), Some(TOKEN), &services.replace(r#""reference":"OP-1","#, "")),
            StatusCode::FORBIDDEN,
        ),
        (
            "a window past max_window_days",
            ask("services", Some("met"), Some(TOKEN), &services.replace("2026-11-22T00", "2020-01-01T00")),
            StatusCode::FORBIDDEN,
        ),
        ("not JSON", ask("services", Some("met"), Some(TOKEN), "device=1"), StatusCode::BAD_REQUEST),
        (
            "an unknown field",
            ask("services", Some("met"), Some(TOKEN), r#"{"db":"/tmp/elsewhere"}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            "a time that is none",
            ask("services", Some("met"), Some(TOKEN), &services.replace("2026-11-23T00:00:00Z", "tomorrow")),
            StatusCode::BAD_REQUEST,
        ),
    ];
    let mut audited = doors.audit().len();
    for (case, request, status) in cases {
        let response = doors.send(request).await;
        assert_eq!(response.status(), status, "{case}");
        let error: Value = serde_json::from_str(&body_text(response).await).unwrap();
        assert!(error["error"].as_str().is_some_and(|e| !e.is_empty()), "{case}: an error says why: {error}");
        let audit = doors.audit();
        assert_eq!(audit.len(), audited + 1, "{case} is audited");
        let outcome = audit[audited]["outcome"].as_str().unwrap();
        assert!(outcome.starts_with("refused") || outcome.starts_with("failed"), "{case}: {outcome}");
        audited += 1;
    }
    // No such question: nothing to audit, nothing read.
    assert_eq!(doors.send(ask("everything", Some("met"), Some(TOKEN), services)).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(doors.audit().len(), audited);
}

#[tokio::test]
async fn every_console_page_carries_the_strict_headers_and_the_cookie_is_strict() {
    let doors = Doors::new("");
    let page = doors.send(Request::get("/console").body(Body::empty()).unwrap()).await;
    assert_eq!(page.status(), StatusCode::OK);
    let headers = page.headers();
    assert_eq!(headers[header::CONTENT_SECURITY_POLICY], CSP);
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(headers[header::REFERRER_POLICY], "same-origin");
    // The console's own script and style only.
    let script = doors.send(Request::get("/console/assets/console.js").body(Body::empty()).unwrap()).await;
    assert_eq!(script.headers()[header::CONTENT_TYPE], "text/javascript; charset=utf-8");
    assert_eq!(script.headers()[header::CONTENT_SECURITY_POLICY], CSP);
    let missing = doors.send(Request::get("/console/assets/other.js").body(Body::empty()).unwrap()).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    let sign_in = |origin: Option<&str>, token: &str| {
        let mut builder = Request::post("/console/sign-in")
            .header(header::HOST, "127.0.0.1:8443")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(origin) = origin {
            builder = builder.header(header::ORIGIN, origin);
        }
        builder.body(Body::from(format!("authority=met&token={token}"))).unwrap()
    };
    // From another site: refused before any token check.
    let response = doors.send(sign_in(Some("https://evil.example"), TOKEN)).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(response.headers().get(header::SET_COOKIE).is_none());
    let response = doors.send(sign_in(Some("https://127.0.0.1:8443"), "wrong")).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().get(header::SET_COOKIE).is_none());
    let response = doors.send(sign_in(Some("https://127.0.0.1:8443"), TOKEN)).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let cookie = response.headers()[header::SET_COOKIE].to_str().unwrap().to_string();
    assert!(cookie.ends_with("; Path=/console; HttpOnly; Secure; SameSite=Strict"), "{cookie}");

    // Signed in: a question form; its POST without the session's
    // anti-forgery token is refused, and nothing is asked or audited.
    let session = cookie.split(';').next().unwrap().to_string();
    let form = doors
        .send(Request::get("/console/ask/resolve").header(header::COOKIE, &session).body(Body::empty()).unwrap())
        .await;
    assert_eq!(form.status(), StatusCode::OK);
    let before = doors.audit().len();
    let forged = Request::post("/console/ask/resolve")
        .header(header::HOST, "127.0.0.1:8443")
        .header(header::COOKIE, &session)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("csrf=guess&ip=203.0.113.1&at=2026-11-22T10:00:02Z&officer=PC1&reference=OP1"))
        .unwrap();
    let response = doors.send(forged).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(body_text(response).await.contains("anti-forgery token"));
    assert_eq!(doors.audit().len(), before, "a forged form asks nothing");
}
