//! How icr reaches ClickHouse: a URL that carries no credentials, the user
//! and password of `[clickhouse]` (sent as ClickHouse's `X-ClickHouse-User`
//! and `X-ClickHouse-Key` headers, which 18.16 reads), and `https://`
//! verified against `ca` or the system's roots.
use std::{path::Path, sync::Arc, time::Duration};

use crate::{
    config::ClickHouseSection,
    remote::{checked_url, shown, tls_trusting},
};
use anyhow::{Context as _, Result, bail};
use hyper_rustls::ConfigBuilderExt as _;
use hyper_util::{
    client::legacy::{Client as HyperClient, connect::HttpConnector},
    rt::TokioExecutor,
};

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
            ("https", Some(ca)) => tls_trusting(ca)?,
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
