//! A question's fields as a door received them, made into the desk's
//! [`Request`]: the HTTP API's JSON body, and the console's form made into
//! the same object. One reading for both doors: the same names, the same
//! defaults, the same refusals.
use std::net::IpAddr;

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::{
    export::Format,
    query::{Ask, Request, Who, request::LocalFilter},
};

/// A body's fields for each question: the command line's flags, without
/// anything that names a path on the server (`db`, `config`, `bundle`,
/// `services_file`) and without `authority`, which the token names. (Each
/// lists who asks itself: serde cannot refuse unknown fields past a
/// flattened one.)
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveBody {
    officer: Option<String>,
    reference: Option<String>,
    format: Option<Format>,
    ip: IpAddr,
    port: Option<Port>,
    at: String,
    tolerance: Option<String>,
    remote: Option<String>,
    service: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServicesBody {
    officer: Option<String>,
    reference: Option<String>,
    format: Option<Format>,
    device: String,
    from: String,
    to: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessedBody {
    officer: Option<String>,
    reference: Option<String>,
    format: Option<Format>,
    service: OneOrMany,
    from: String,
    to: String,
    /// `include` (when absent), `exclude` or `only`.
    local: Option<LocalFilter>,
}

/// A port as a number or as its digits.
#[derive(Deserialize)]
#[serde(untagged)]
enum Port {
    Number(u16),
    Text(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The request `body` stands for, on behalf of the authenticated
/// `authority`; the answer in NDJSON unless it names another format.
pub fn request_of(kind: &str, authority: &str, body: Value) -> Result<Request> {
    let (ask, (officer, reference, format)) = match kind {
        "resolve" => {
            let b: ResolveBody = serde_json::from_value(body).context("the body")?;
            let port = match b.port {
                None => None,
                Some(Port::Number(port)) => Some(port),
                Some(Port::Text(text)) => {
                    Some(text.trim().parse().with_context(|| format!("port {text:?} is not a port number"))?)
                }
            };
            let tolerance = b.tolerance.unwrap_or_else(|| crate::query::request::DEFAULT_TOLERANCE.to_string());
            (
                Ask::Resolve { ip: b.ip, port, at: b.at, tolerance, remote: b.remote, service: b.service },
                (b.officer, b.reference, b.format),
            )
        }
        "services" => {
            let b: ServicesBody = serde_json::from_value(body).context("the body")?;
            (Ask::Services { device: b.device, from: b.from, to: b.to }, (b.officer, b.reference, b.format))
        }
        "accessed" => {
            let b: AccessedBody = serde_json::from_value(body).context("the body")?;
            let services = match b.service {
                OneOrMany::One(service) => vec![service],
                OneOrMany::Many(services) => services,
            };
            let local = b.local.unwrap_or_default();
            (Ask::Accessed { services, from: b.from, to: b.to, local }, (b.officer, b.reference, b.format))
        }
        other => bail!("no such question {other:?}"),
    };
    let format = format.unwrap_or(Format::Ndjson);
    if format == Format::Table {
        bail!("format must be ndjson, csv or ecs");
    }
    Ok(Request {
        ask,
        who: Who { authority: Some(authority.to_string()), officer, reference },
        format,
        bundle: None,
        config: None,
    })
}
