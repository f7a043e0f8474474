//! `--server URL`: a query asked of a remote agent's HTTP API (`http.rs`)
//! with the same flags as a local one. The bearer token (from --token-file
//! or $ICR_TOKEN) names the authority, and the server authorises, audits and
//! answers; the answer is printed as a local one would be, and its capture
//! gaps are returned for the caller to show.
use std::{io::Write, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::{
    cli::args::QueryTarget,
    export::{self, Format},
    query::{Ask, Failure, Refusal, Request},
    record::Icr,
    store::{gaps::Gap, rollup::ServiceRow},
};

/// Long enough for a 30-day question over a busy gateway.
const TIMEOUT: Duration = Duration::from_secs(300);
const TOKEN_VARIABLE: &str = "ICR_TOKEN";

/// Sends `request` to `--server` and writes its answer to `out`; returns the
/// capture gaps the server reported.
pub fn query(target: &QueryTarget, request: &Request, out: &mut dyn Write) -> Result<Vec<Gap>, Failure> {
    let server = target.server.as_deref().context("no --server given")?;
    if request.bundle.is_some() {
        return Err(Failure::invalid("--bundle needs --db: a disclosure bundle is written where the query is audited"));
    }
    // The API answers in machine formats; a table is drawn here from NDJSON.
    let asked = if request.format == Format::Table { Format::Ndjson } else { request.format };
    let (kind, mut body) = match &request.ask {
        Ask::Resolve { ip, port, at, tolerance, remote, service } => (
            "resolve",
            json!({ "ip": ip, "port": port, "at": at, "tolerance": tolerance, "remote": remote, "service": service }),
        ),
        Ask::Services { device, from, to } => ("services", json!({ "device": device, "from": from, "to": to })),
        Ask::Accessed { services, from, to, local } => {
            ("accessed", json!({ "service": services, "from": from, "to": to, "local": local }))
        }
        Ask::List { .. } | Ask::ExportIpfix { .. } => {
            return Err(Failure::invalid("the HTTP API answers the three questions; list records with --db"));
        }
    };
    let fields = body.as_object_mut().expect("an object");
    fields.retain(|_, value| !value.is_null());
    for (key, value) in [("officer", &request.who.officer), ("reference", &request.who.reference)] {
        if let Some(value) = value {
            fields.insert(key.into(), json!(value));
        }
    }
    fields.insert("format".into(), json!(asked));

    let url = format!("{}/v1/query/{kind}", server.trim_end_matches('/'));
    let call = agent(target)?.post(&url);
    check_transport(&call.request_url().with_context(|| format!("--server {server:?} is not a URL"))?)?;
    // The server checks the token against the authority named, and only it.
    let authority = request
        .who
        .authority
        .as_deref()
        .context("--server needs --authority NAME: the server checks the token against it")?;
    let call = call
        .set("Authorization", &format!("Bearer {}", token(target)?))
        .set("ICR-Authority", authority)
        .timeout(TIMEOUT);
    let response = match call.send_json(body) {
        Ok(response) => response,
        Err(ureq::Error::Status(status, response)) => {
            let reason = response
                .into_json::<Value>()
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_default();
            return Err(match status {
                401 | 403 => Failure::Refused(Refusal(format!("{server} refused the query: {reason}"))),
                400 => Failure::Invalid(format!("{server}: {reason}")),
                _ => Failure::Failed(anyhow!("{server} answered {status}: {reason}")),
            });
        }
        Err(error) => return Err(anyhow::Error::new(error).context(format!("asking {url}")).into()),
    };
    let gaps = response
        .all("ICR-Gap")
        .into_iter()
        .map(|value| {
            serde_json::from_str(value).with_context(|| format!("{server} sent a malformed ICR-Gap header: {value}"))
        })
        .collect::<Result<Vec<Gap>>>()?;
    let listed: usize = response.header("ICR-Gaps").and_then(|n| n.parse().ok()).unwrap_or(gaps.len());
    if listed > gaps.len() {
        log::warn!("{server} reports {listed} capture gaps in the window; only the first {} are listed", gaps.len());
    }
    let answer = response.into_string().with_context(|| format!("reading the answer of {url}"))?;
    if request.format == Format::Table {
        draw_table(kind, &answer, out)?;
    } else {
        out.write_all(answer.as_bytes()).context("writing the answer")?;
    }
    Ok(gaps)
}

fn draw_table(kind: &str, ndjson: &str, out: &mut dyn Write) -> Result<()> {
    let lines = ndjson.lines().filter(|l| !l.trim().is_empty());
    if kind == "services" {
        let rows = lines
            .map(|l| serde_json::from_str(l).context("a malformed service row"))
            .collect::<Result<Vec<ServiceRow>>>()?;
        export::write_services(out, &rows, Format::Table)
    } else {
        let records =
            lines.map(|l| serde_json::from_str(l).context("a malformed record")).collect::<Result<Vec<Icr>>>()?;
        export::write_records(out, &records, Format::Table)
    }
}

/// A token travels over HTTPS, or over plain HTTP to this machine only:
/// anywhere else it would cross the network in clear.
fn check_transport(url: &ureq::RequestUrl) -> Result<()> {
    let host = url.host().trim_start_matches('[').trim_end_matches(']');
    let loopback =
        host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => bail!(
            "--server {}: the token would cross the network in clear; use https:// (plain http:// only to loopback)",
            url.as_url()
        ),
        scheme => bail!("--server {}: {scheme}:// is not http:// or https://", url.as_url()),
    }
}

fn token(target: &QueryTarget) -> Result<String> {
    let token = match &target.token_file {
        Some(file) => {
            std::fs::read_to_string(file).with_context(|| format!("reading the token file {}", file.display()))?
        }
        None => std::env::var(TOKEN_VARIABLE)
            .map_err(|_| anyhow!("--server needs the API token: --token-file FILE or ${TOKEN_VARIABLE}"))?,
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        bail!("the API token is empty");
    }
    Ok(token)
}

fn agent(target: &QueryTarget) -> Result<ureq::Agent> {
    let builder = ureq::AgentBuilder::new();
    let Some(ca) = &target.ca else { return Ok(builder.build()) };
    Ok(builder.tls_config(Arc::new(crate::remote::tls_trusting(ca)?)).build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(url: &str) -> Result<()> {
        check_transport(&ureq::get(url).request_url().unwrap())
    }

    #[test]
    fn tokens_go_in_clear_to_loopback_only() {
        for url in [
            "https://icr.example:8443/v1/query/resolve",
            "http://127.0.0.1:8481/v1",
            "http://localhost:1/v1",
            "http://[::1]:1/v1",
        ] {
            assert!(transport(url).is_ok(), "{url}");
        }
        for url in ["http://192.0.2.10:8080/v1", "http://icr.example/v1", "http://[2001:db8::1]/v1"] {
            let error = format!("{:#}", transport(url).expect_err(url));
            assert!(error.contains("the token would cross the network in clear"), "{url}: {error}");
        }
        assert!(format!("{:#}", transport("ftp://127.0.0.1/").unwrap_err()).contains("is not http:// or https://"));
    }
}
