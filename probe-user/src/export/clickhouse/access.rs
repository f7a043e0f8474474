//! How icr reaches ClickHouse: a URL that carries no credentials, the user
//! and password of `[clickhouse]` (sent as ClickHouse's `X-ClickHouse-User`
//! and `X-ClickHouse-Key` headers, which 18.16 reads), and `https://`
//! verified against `ca` or the system's roots.
use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail};
use hyper_rustls::ConfigBuilderExt as _;
use hyper_util::{
    client::legacy::{Client as HyperClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use thiserror::Error;

use crate::config::ClickHouseSection;

/// Why a ClickHouse URL is refused. The URL is shown without anything that
/// could be a secret.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UrlRefused {
    #[error("the ClickHouse URL {shown} is not a URL like https://HOST:PORT")]
    NotAUrl { shown: String },
    #[error(
        "the ClickHouse URL {shown} carries credentials ({what}): a URL is written to logs and the audit log, a password \
         must not be; give [clickhouse] user and password_file (icr clickhouse init: --user, --password-file) instead"
    )]
    Credentials { shown: String, what: &'static str },
    #[error("the ClickHouse URL {shown} is not http:// or https://HOST[:PORT] (the HTTP interface of any node)")]
    NotHttp { shown: String },
}

/// The parts of the URL query that ClickHouse's HTTP interface reads as
/// credentials.
const CREDENTIAL_PARAMETERS: [&str; 3] = ["user", "password", "quota_key"];

/// `text` as a ClickHouse node's base URL (`scheme://host:port`, nothing
/// else), or why not: credentials in it are refused, never dropped.
pub fn checked_url(text: &str) -> Result<url::Url, UrlRefused> {
    let parsed = url::Url::parse(text.trim()).map_err(|_| UrlRefused::NotAUrl { shown: shown(text) })?;
    let shown = shown(text);
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(UrlRefused::Credentials { shown, what: "user:password@" });
    }
    if parsed.query_pairs().any(|(key, _)| CREDENTIAL_PARAMETERS.iter().any(|c| key.eq_ignore_ascii_case(c))) {
        return Err(UrlRefused::Credentials { shown, what: "?user= or ?password=" });
    }
    if !matches!(parsed.scheme(), "http" | "https")
        || parsed.host_str().is_none()
        || parsed.query().is_some()
        || parsed.fragment().is_some()
        || !matches!(parsed.path(), "" | "/")
    {
        return Err(UrlRefused::NotHttp { shown });
    }
    Ok(parsed)
}

/// A URL as it may be written anywhere: its scheme, host and port, never a
/// user, password or query; "(not shown)" when it is no URL at all.
pub fn shown(text: &str) -> String {
    match url::Url::parse(text.trim()) {
        Ok(url) if url.host_str().is_some() => match url.port() {
            Some(port) => format!("{}://{}:{port}", url.scheme(), url.host_str().unwrap_or_default()),
            None => format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default()),
        },
        _ => "(not shown)".to_string(),
    }
}

/// Who icr is to ClickHouse, and whom it trusts.
#[derive(Clone)]
pub struct Access {
    user: Option<String>,
    password: Option<String>,
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "(set)"))
            .finish()
    }
}

/// Held by a connection pool this long idle; ClickHouse closes them after 3 s.
const POOL_IDLE: Duration = Duration::from_secs(2);
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

impl Access {
    /// Reads the password file (root's, 0600 or 0400, outside `store_dir`)
    /// and the CA of `section`.
    pub fn of(section: &ClickHouseSection, store_dir: Option<&Path>) -> Result<Self> {
        let url = checked_url(&section.url)?;
        let password = match &section.password_file {
            None => None,
            Some(path) => Some(password(path, store_dir)?),
        };
        let builder = || {
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .context("configuring TLS")
        };
        let tls = match (url.scheme(), &section.ca) {
            ("https", Some(ca)) => crate::serve::client::tls_trusting(ca)?,
            ("https", None) => builder()?
                .with_native_roots()
                .context("the system has no trusted root certificate to verify ClickHouse's with; give [clickhouse] ca = FILE")?
                .with_no_client_auth(),
            (_, Some(ca)) => bail!("[clickhouse] ca = {:?} is for an https:// URL; {} is plain HTTP", ca.display(), shown(&section.url)),
            // Plain HTTP: no TLS is ever made with it.
            (_, None) => builder()?.with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth(),
        };
        Ok(Self { user: section.user.clone(), password, tls: Arc::new(tls) })
    }

    /// A client of the node at `url` (checked), with connections of its own.
    pub fn client(&self, url: &str) -> clickhouse::Client {
        let mut http = HttpConnector::new();
        http.set_keepalive(Some(TCP_KEEPALIVE));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*self.tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let pool = HyperClient::builder(TokioExecutor::new()).pool_idle_timeout(POOL_IDLE).build(connector);
        // Answers come plain (18.16 compresses none unless asked by a
        // setting a read-only user may not set); inserts are compressed.
        let mut client = clickhouse::Client::with_http_client(pool)
            .with_url(url)
            .with_validation(false)
            .with_compression(clickhouse::Compression::None);
        if let Some(user) = &self.user {
            client = client.with_user(user);
        }
        if let Some(password) = &self.password {
            client = client.with_password(password);
        }
        client
    }
}

/// The password in `path`, its last line end dropped.
fn password(path: &Path, store_dir: Option<&Path>) -> Result<String> {
    let bytes = crate::config::read_secret(path, "the ClickHouse password file", store_dir)?;
    let text = String::from_utf8(bytes)
        .ok()
        .context(format!("the ClickHouse password file {} is not UTF-8", path.display()))?;
    let password = text.strip_suffix('\n').map(|p| p.strip_suffix('\r').unwrap_or(p)).unwrap_or(&text);
    // It travels in an HTTP header.
    if password.is_empty() || !password.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        bail!("the ClickHouse password file {} must hold one line of printable ASCII", path.display());
    }
    Ok(password.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_a_url_are_refused_and_never_shown() {
        for (url, what) in [
            ("https://icr:s3cret@10.0.0.5:8443", "user:password@"),
            ("https://s3cret@10.0.0.5:8443/", "user:password@"),
            ("http://10.0.0.5:8123/?password=s3cret", "?user= or ?password="),
            ("http://10.0.0.5:8123/?user=icr&PASSWORD=s3cret", "?user= or ?password="),
            ("http://10.0.0.5:8123?user=s3cret", "?user= or ?password="),
            ("http://10.0.0.5:8123?quota_key=s3cret", "?user= or ?password="),
        ] {
            let refused = checked_url(url).expect_err(url);
            assert!(matches!(refused, UrlRefused::Credentials { what: w, .. } if w == what), "{url}: {refused:?}");
            let message = refused.to_string();
            assert!(!message.contains("s3cret") && message.contains("password_file"), "{message}");
        }
        for url in [
            "ftp://10.0.0.5",
            "http://10.0.0.5:8123/?database=x",
            "http://10.0.0.5:8123/db",
            "10.0.0.5:8123",
            "http://#s3cret",
        ] {
            let refused = checked_url(url).expect_err(url);
            assert!(!refused.to_string().contains("s3cret"), "{refused}");
        }
        assert_eq!(checked_url("https://10.0.0.5:8443/").unwrap().as_str(), "https://10.0.0.5:8443/");
        assert_eq!(checked_url("http://[2001:db8::5]:8123").unwrap().host_str(), Some("[2001:db8::5]"));
        assert_eq!(shown("https://icr:s3cret@10.0.0.5:8443/?password=s3cret"), "https://10.0.0.5:8443");
    }
}
