//! A request, as every door hands it to the desk: the question with its
//! values as the asker gave them, who asks and why, and how the answer is
//! to be written. Values stay text until the desk parses them, so that a
//! malformed value is audited like any other outcome.
use std::{net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{config::Purpose, export::Format};

/// One request to the desk. This is also the local socket's wire form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub ask: Ask,
    pub who: Who,
    pub format: Format,
    /// Also write a disclosure bundle into this directory (on the machine
    /// that audits the request; no remote door offers it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<PathBuf>,
    /// A configuration the asker named: refused unless it is the one that
    /// governs the store (authorities never come from the asker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<PathBuf>,
}

/// What is asked, with its values as given: the three questions, and the
/// operator's listing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "question", rename_all = "snake_case", deny_unknown_fields)]
pub enum Ask {
    /// Question 1: who had `ip` (and `port`) at `at`.
    Resolve {
        ip: IpAddr,
        port: Option<u16>,
        at: String,
        #[serde(default = "default_tolerance")]
        tolerance: String,
        remote: Option<String>,
        service: Option<String>,
    },
    /// Question 2: the services `device` used in the window.
    Services { device: String, from: String, to: String },
    /// Question 3: the devices that used any of `services` in the window,
    /// with or without the exchanges that never left the gateway.
    Accessed {
        services: Vec<String>,
        from: String,
        to: String,
        #[serde(default)]
        local: LocalFilter,
    },
    /// Every record in the window, for maintenance (an operator's request).
    List { from: String, to: String },
    /// Every record in the window, as IPFIX to `destination` (a file or a
    /// collector's URL): an operator's back-filling, a listing by another name.
    ExportIpfix { from: String, to: String, destination: String },
}

/// Question 3's records that never left the gateway (`local`: a device and
/// the gateway's own resolver): kept with the others, left out, or alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LocalFilter {
    #[default]
    Include,
    Exclude,
    Only,
}

impl LocalFilter {
    pub fn keeps(self, record: &crate::record::Icr) -> bool {
        match self {
            Self::Include => true,
            Self::Exclude => !record.local,
            Self::Only => record.local,
        }
    }
}

/// How far from `at` a flow may lie when none is given.
pub const DEFAULT_TOLERANCE: &str = "1s";

fn default_tolerance() -> String {
    DEFAULT_TOLERANCE.to_string()
}

/// Who asks, under what authority. Missing values are refused by the desk,
/// not by the door, so that the refusal is audited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Who {
    pub authority: Option<String>,
    pub officer: Option<String>,
    pub reference: Option<String>,
}

/// A sweep: apply the governing configuration's retention now, the one
/// request that destroys records. It asks nothing, so it names no
/// authority; who sweeps is the process, as the system knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sweep {
    pub by: Sweeper,
    /// A configuration the operator named: refused unless it is the one
    /// that governs the store (its retention would be the caller's).
    pub config: Option<PathBuf>,
}

/// Who sweeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sweeper {
    /// The agent's own hourly schedule (never from a door).
    Schedule,
    /// A person's `icr sweep`.
    Operator(Operator),
}

impl std::fmt::Display for Sweeper {
    /// As the audit log names it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Schedule => f.write_str("agent (hourly retention)"),
            Self::Operator(operator) => operator.fmt(f),
        }
    }
}

/// A person running an operator's command: the user it runs as (through
/// the agent's socket, the peer's, from its credentials), and the sudo user
/// it says it was run by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operator {
    pub uid: u32,
    pub sudo_user: Option<String>,
}

impl Operator {
    /// This process's user.
    pub fn this_process() -> Self {
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        Self { uid, sudo_user: std::env::var("SUDO_USER").ok() }
    }
}

impl std::fmt::Display for Operator {
    /// As the audit log names it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.sudo_user {
            Some(user) => write!(f, "uid {} (sudo by {user})", self.uid),
            None => write!(f, "uid {}", self.uid),
        }
    }
}

/// What a request does with the records: ask one of the three questions, or
/// list them for maintenance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Ask(Purpose),
    List,
}

impl Ask {
    pub fn act(&self) -> Act {
        match self {
            Self::Resolve { .. } => Act::Ask(Purpose::Resolve),
            Self::Services { .. } => Act::Ask(Purpose::Services),
            Self::Accessed { .. } => Act::Ask(Purpose::Accessed),
            Self::List { .. } | Self::ExportIpfix { .. } => Act::List,
        }
    }

    /// The request's name in the audit log.
    pub fn command(&self) -> &'static str {
        match self {
            Self::Resolve { .. } => "query resolve",
            Self::Services { .. } => "query services",
            Self::Accessed { .. } => "query accessed",
            Self::List { .. } => "list",
            Self::ExportIpfix { .. } => "export ipfix",
        }
    }

    /// The values asked about, as the audit log keeps them: every selector,
    /// whichever door it came through.
    pub fn parameters(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(fields) = value.as_object_mut() {
            fields.remove("question");
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_travel_as_json_and_refuse_unknown_fields() {
        let request = Request {
            ask: Ask::Accessed {
                services: vec!["a.example".into(), "*.b.example".into()],
                from: "x".into(),
                to: "y".into(),
                local: LocalFilter::Exclude,
            },
            who: Who { authority: Some("met".into()), officer: Some("PC 1".into()), reference: Some("OP-1".into()) },
            format: Format::Csv,
            bundle: None,
            config: None,
        };
        let line = serde_json::to_string(&request).unwrap();
        assert!(line.contains(r#""question":"accessed""#), "{line}");
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), request);
        assert!(serde_json::from_str::<Request>(&line.replace(r#""from""#, r#""db":"/tmp","from""#)).is_err());
        assert_eq!(
            request.ask.parameters(),
            serde_json::json!({"services": ["a.example", "*.b.example"], "from": "x", "to": "y", "local": "exclude"}),
            "the local filter is audited with the services"
        );
        // Asked by an older client, without the field: today's answer.
        let older = line.replace(r#","local":"exclude""#, "");
        assert!(matches!(
            serde_json::from_str::<Request>(&older).unwrap().ask,
            Ask::Accessed { local: LocalFilter::Include, .. }
        ));
        assert!(serde_json::from_str::<Request>(&line.replace(r#""exclude""#, r#""sometimes""#)).is_err());
        let export = Ask::ExportIpfix { from: "x".into(), to: "y".into(), destination: "udp://10.0.0.9:4739".into() };
        assert_eq!((export.act(), export.command()), (Act::List, "export ipfix"), "an operator's listing, named");
        assert_eq!(
            export.parameters(),
            serde_json::json!({"from": "x", "to": "y", "destination": "udp://10.0.0.9:4739"})
        );
        let resolve: Ask = serde_json::from_str(r#"{"question":"resolve","ip":"192.0.2.1","at":"t"}"#).unwrap();
        assert!(matches!(resolve, Ask::Resolve { tolerance, port: None, .. } if tolerance == DEFAULT_TOLERANCE));
    }
}
