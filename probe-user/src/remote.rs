//! How icr reaches other servers (the ClickHouse cluster, a remote icr's
//! API, IPFIX collectors): a base URL that carries no credentials, shown
//! without anything that could be a secret, and TLS that trusts one CA file. Read by `config`
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

/// An IPFIX collector's address as the configuration and `icr export ipfix`
/// write it: `udp://HOST:PORT` or `tcp://HOST:PORT`.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Collector {
    pub transport: Transport,
    /// A name or an address (an IPv6 one without its brackets).
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("the IPFIX collector {0:?} is not udp://HOST:PORT or tcp://HOST:PORT")]
pub struct BadCollector(pub String);

impl std::str::FromStr for Collector {
    type Err = BadCollector;

    fn from_str(text: &str) -> Result<Self, BadCollector> {
        let bad = || BadCollector(text.to_string());
        let url = url::Url::parse(text).map_err(|_| bad())?;
        let transport = match url.scheme() {
            "udp" => Transport::Udp,
            "tcp" => Transport::Tcp,
            _ => return Err(bad()),
        };
        // HOST:PORT and nothing else: a path, query or user would be ignored silently.
        if !url.username().is_empty()
            || url.password().is_some()
            || !url.path().is_empty()
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(bad());
        }
        let host = url.host_str().filter(|host| !host.is_empty()).ok_or_else(bad)?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host).to_string();
        let port = url.port().filter(|&port| port != 0).ok_or_else(bad)?;
        Ok(Self { transport, host, port })
    }
}

impl std::fmt::Display for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.transport {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl serde::Serialize for Collector {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Collector {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <String as serde::Deserialize>::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
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

    #[test]
    fn collectors_are_udp_or_tcp_host_and_port() {
        let udp: Collector = "udp://10.0.0.9:4739".parse().unwrap();
        assert_eq!((udp.transport, udp.host.as_str(), udp.port), (Transport::Udp, "10.0.0.9", 4739));
        let tcp: Collector = "tcp://[2001:db8::9]:4739".parse().unwrap();
        assert_eq!((tcp.transport, tcp.host.as_str()), (Transport::Tcp, "2001:db8::9"));
        assert_eq!(tcp.to_string(), "tcp://[2001:db8::9]:4739");
        assert_eq!("udp://collector.example:2055".parse::<Collector>().unwrap().host, "collector.example");
        for bad in [
            "10.0.0.9:4739",
            "http://10.0.0.9:4739",
            "udp://10.0.0.9",
            "udp://10.0.0.9:0",
            "udp://10.0.0.9:4739/path",
            "udp://user@10.0.0.9:4739",
            "udp://10.0.0.9:4739?x=1",
            "udp://:4739",
            "sctp://10.0.0.9:4739",
        ] {
            assert_eq!(bad.parse::<Collector>(), Err(BadCollector(bad.into())), "{bad}");
        }
    }
}
