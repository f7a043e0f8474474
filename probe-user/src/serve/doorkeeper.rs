//! Who may ask, for the API's and the console's handlers alike: the token
//! checks at once and the slowdown of failing guessers, the refusals of
//! unauthenticated requests (audited, or summarised when they flood), and
//! whether a request comes from the console's own pages.
use std::net::IpAddr;

use anyhow::Result;
use axum::http::{HeaderMap, header};

use crate::{
    query::{Desk, Failure, Refusal},
    serve::{
        refusals::{self, Refusals},
        tokens::Gate,
    },
};

/// What the API's and the console's handlers share about who may ask.
pub struct Doorkeeper {
    /// Token checks at once, and the slowdown of failing guessers.
    pub gate: Gate,
    /// Refusals of unauthenticated requests, by address.
    pub refusals: Refusals,
}

impl Doorkeeper {
    /// Audits the refusal of a request that did not authenticate, unless a
    /// flood from `client` is being summarised instead; the refusal either way.
    pub fn refuse_unauthenticated(
        &self,
        desk: &Desk,
        loaded: &crate::config::LoadedConfig,
        client: IpAddr,
        command: &str,
        claimed: Option<&str>,
        reason: String,
    ) -> Failure {
        let refusal = Refusal(reason);
        if !self.refusals.admit(client) {
            return Failure::Refused(refusal);
        }
        desk.refuse_unread(loaded, command, claimed.map(refusals::claimed), refusal)
    }

    /// Audits the summaries of floods whose window is over (all, when `all`).
    pub fn write_summaries(&self, desk: &Desk, all: bool) -> Result<()> {
        let due = self.refusals.due(all);
        if due.is_empty() {
            return Ok(());
        }
        let loaded = desk.configuration()?;
        for summary in due {
            // `::` stands for the addresses past those followed one by one.
            let from =
                if summary.client.is_unspecified() { "many addresses".to_string() } else { summary.client.to_string() };
            let outcome = format!(
                "refused: {} more requests from {from} without a valid token, counted rather than written one by one",
                summary.refused
            );
            let parameters = serde_json::json!({
                "client": summary.client.to_string(),
                "refused": summary.refused,
                "from": crate::record::format_time(&summary.from),
                "to": crate::record::format_time(&summary.to),
            });
            desk.note_unread(&loaded, "http refusals", None, outcome, parameters)?;
        }
        Ok(())
    }
}

/// The answer when every token check is taken.
pub const BUSY: &str = "too many tokens are being checked at once: try again shortly";

/// Whether a state-changing request comes from the console's own pages: a
/// browser says where a request comes from (`Origin`, `Sec-Fetch-Site`).
pub fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return false;
    }
    match (text(header::ORIGIN), text(header::HOST)) {
        (Some(origin), Some(host)) => origin.split_once("://").is_some_and(|(_, rest)| rest == host),
        (Some(_), None) => false,
        (None, _) => true,
    }
}

/// Request headers from name and value pairs, for the doors' unit tests.
#[cfg(test)]
pub(crate) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        headers.append(
            header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            axum::http::HeaderValue::from_str(value).unwrap(),
        );
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_consoles_own_origin_may_post() {
        assert!(same_origin(&headers(&[
            ("host", "127.0.0.1:8443"),
            ("origin", "https://127.0.0.1:8443"),
            ("sec-fetch-site", "same-origin")
        ])));
        assert!(
            same_origin(&headers(&[("host", "127.0.0.1:8443")])),
            "no browser headers: a plain client, which still needs the session and token"
        );
        assert!(!same_origin(&headers(&[("host", "127.0.0.1:8443"), ("origin", "https://evil.example")])));
        assert!(!same_origin(&headers(&[("host", "127.0.0.1:8443"), ("origin", "http://127.0.0.1:9999")])));
        assert!(!same_origin(&headers(&[("host", "127.0.0.1:8443"), ("sec-fetch-site", "cross-site")])));
        assert!(!same_origin(&headers(&[("host", "127.0.0.1:8443"), ("sec-fetch-site", "same-site")])));
        assert!(!same_origin(&headers(&[("origin", "https://127.0.0.1:8443")])), "an origin without a host to match");
    }
}
