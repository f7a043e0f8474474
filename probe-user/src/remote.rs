//! How icr reaches other servers (the ClickHouse cluster, a remote icr's
//! API): a base URL that carries no credentials, shown without anything that
//! could be a secret, and TLS that trusts one CA file. Read by `config`
//! (validation), `export` and `serve`; it imports none of them.
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use thiserror::Error;

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

/// TLS (ring) that trusts the PEM certificates in `ca` alone.
pub fn tls_trusting(ca: &std::path::Path) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in
        CertificateDer::pem_file_iter(ca).with_context(|| format!("reading the CA file {}", ca.display()))?
    {
        let certificate = certificate.with_context(|| format!("a malformed certificate in {}", ca.display()))?;
        roots.add(certificate).with_context(|| format!("an unusable CA certificate in {}", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("{} holds no certificate", ca.display());
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("configuring TLS")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tls)
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
