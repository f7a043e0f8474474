//! The console's pages, as HTML written with maud: every value is escaped
//! by its type, and no page has inline script or style (the
//! Content-Security-Policy forbids both).
use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use super::sessions::{Answered, Kind, Rows, Signed};
use crate::{
    record::{Icr, format_time},
    store::rollup::ServiceRow,
};

fn page(title: &str, signed: Option<&Signed>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " - icr console" }
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/console.js" defer {}
            }
            body {
                header {
                    a href="/console" { "icr console" }
                    @if let Some(signed) = signed {
                        span #who { "Signed in as " strong { (signed.authority) } }
                        form method="post" action="/console/sign-out" {
                            input type="hidden" name="csrf" value=(signed.csrf);
                            button #sign-out type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub fn sign_in(error: Option<&str>) -> Markup {
    page(
        "Sign in",
        None,
        html! {
            h1 { "Sign in" }
            p { "With the name of your authority and its API token." }
            @if let Some(error) = error {
                p.refusal #refusal { (error) }
            }
            form.ask #sign-in method="post" action="/console/sign-in" {
                label for="authority" { "Authority" }
                input #authority name="authority" required autocomplete="username";
                label for="token" { "Token" }
                input #token type="password" name="token" required autocomplete="current-password";
                button type="submit" { "Sign in" }
            }
        },
    )
}

pub fn home(signed: &Signed) -> Markup {
    page(
        "Home",
        Some(signed),
        html! {
            h1 { "Questions" }
            nav.questions {
                @for kind in Kind::ALL {
                    a href={"/console/ask/" (kind.path())} { (kind.title()) }
                }
                @if signed.auditor {
                    a #audit-link href="/console/audit" { "The audit log" }
                }
            }
            p { "Every question is authorised against this gateway's configuration and written to the audit log before it is answered." }
        },
    )
}

/// A question's form, with what was given before and the refusal, if any.
pub fn ask(
    signed: &Signed,
    kind: Kind,
    given: &std::collections::HashMap<String, String>,
    refusal: Option<&str>,
) -> Markup {
    let value = |name: &str| given.get(name).cloned().unwrap_or_default();
    let field = |name: &str, label: &str, hint: &str| {
        html! {
            label for=(name) { (label) }
            input id=(name) name=(name) value=(value(name)) placeholder=(hint);
        }
    };
    page(
        kind.title(),
        Some(signed),
        html! {
            h1 { (kind.title()) }
            @if let Some(refusal) = refusal {
                p.refusal #refusal { (refusal) }
            }
            form.ask #ask method="post" action={"/console/ask/" (kind.path())} {
                input type="hidden" name="csrf" value=(signed.csrf);
                fieldset {
                    legend { "Who asks, and why" }
                    (field("officer", "Officer", "PC 1234"))
                    (field("reference", "Authorisation reference", "OP-1"))
                }
                fieldset {
                    legend { "The question" }
                    @match kind {
                        Kind::Resolve => {
                            (field("ip", "Public address", "203.0.113.1"))
                            (field("port", "Public port (optional)", "10007"))
                            (field("at", "At (RFC 3339)", "2026-11-22T15:02:00Z"))
                            (field("tolerance", "Tolerance (optional)", "1s"))
                            (field("remote", "Remote IP[:PORT] (optional)", ""))
                            (field("service", "Service name (optional)", ""))
                        }
                        Kind::Services => {
                            (field("device", "Device: MAC, IP or subscriber", "02:00:00:00:00:17"))
                            (field("from", "From (RFC 3339)", "2026-11-22T00:00:00Z"))
                            (field("to", "To (RFC 3339)", "2026-11-23T00:00:00Z"))
                        }
                        Kind::Accessed => {
                            label for="services" { "Services: names, *.suffixes, IPs or CIDRs, one a line" }
                            textarea #services name="services" rows="4" { (value("services")) }
                            (field("from", "From (RFC 3339)", "2026-11-22T00:00:00Z"))
                            (field("to", "To (RFC 3339)", "2026-11-23T00:00:00Z"))
                            label for="local" { "Exchanges that never left the gateway" }
                            select #local name="local" {
                                @for (option, text) in [("include", "include"), ("exclude", "leave out"), ("only", "only these")] {
                                    option value=(option) selected[value("local") == option] { (text) }
                                }
                            }
                        }
                    }
                }
                button #ask-button type="submit" { "Ask" }
            }
        },
    )
}

/// An answer: its gaps first, the timeline, the table, the downloads.
/// Rows a page of an answer's table shows.
pub const PAGE_ROWS: usize = 250;

/// Page `page` (from 1) of an answer: its table shows [`PAGE_ROWS`] rows.
pub fn answer(signed: &Signed, answered: &Answered, timeline: Markup, page_number: usize) -> Markup {
    let base = format!("/console/answers/{}", answered.id);
    let total = answered.rows.len();
    let pages = total.div_ceil(PAGE_ROWS).max(1);
    let page_number = page_number.clamp(1, pages);
    let shown = (page_number - 1) * PAGE_ROWS..(page_number * PAGE_ROWS).min(total);
    page(
        "Answer",
        Some(signed),
        html! {
            h1 { (answered.kind.title()) }
            p #summary { (answered.summary) }
            p {
                "Audit entry " strong #audit-seq { (answered.audit_seq) } ". "
                @if answered.shown { span #count { (answered.rows.len()) } " rows." } @else { "Too many rows to show here." }
            }
            @if answered.gaps.is_empty() {
                p.nogaps #gaps { "No capture gaps in this window." }
            } @else {
                div.gaps #gaps {
                    p { strong { (answered.gaps.len()) " capture gap(s) in this window." } " No record inside a gap is not no connection." }
                    ul {
                        @for gap in &answered.gaps {
                            li { (format_time(&gap.from)) " to " (format_time(&gap.to)) ": " (kind_of(gap)) " (" (gap.count) ") at " (gap.place) }
                        }
                    }
                }
            }
            h2 { "Timeline" }
            div #timeline { (timeline) }
            h2 { "Rows" }
            p.downloads #downloads {
                a #download-csv href={(base) "/results.csv"} { "CSV" }
                a #download-ndjson href={(base) "/results.ndjson"} { "NDJSON" }
                @if let Rows::Records(_) = answered.rows {
                    a #download-ecs href={(base) "/results.ecs.ndjson"} { "ECS (Kibana)" }
                }
                a #download-bundle href={(base) "/bundle.zip"} { "Disclosure bundle (zip)" }
            }
            @if !answered.shown {
                p.refusal #too-large { "This answer is larger than the console keeps for a session: download it." }
            }
            label for="filter" { "Filter: " }
            input #filter type="search" placeholder="any text in a row";
            " " span #shown { (shown.len()) } " shown"
            @if pages > 1 {
                nav.pages #pages {
                    "Rows " (shown.start + 1) " to " (shown.end) " of " (total) ", page " span #page { (page_number) } " of " (pages) ". "
                    @if page_number > 1 {
                        a #page-previous href={(base) "?page=" (page_number - 1)} { "Previous" } " "
                    }
                    @if page_number < pages {
                        a #page-next href={(base) "?page=" (page_number + 1)} { "Next" }
                    }
                }
            }
            @match &answered.rows {
                Rows::Records(records) => (records_table(&records[shown.clone()])),
                Rows::Services(services) => (services_table(&services[shown.clone()])),
            }
        },
    )
}

fn kind_of(gap: &crate::store::gaps::Gap) -> String {
    match serde_json::to_value(gap.kind) {
        Ok(Value::String(text)) => text,
        _ => String::new(),
    }
}

fn records_table(records: &[Icr]) -> Markup {
    html! {
        table.answer #rows {
            thead { tr {
                th { "start" } th { "end" } th { "device MAC" } th { "device IP" } th.num { "port" } th { "subscriber" }
                th { "public" } th { "remote" } th { "proto" } th { "service" } th { "source" } th.num { "bytes up" } th.num { "bytes down" } th { "note" }
            } }
            tbody {
                @for r in records {
                    tr {
                        td { (format_time(&r.start)) } td { (format_time(&r.end)) }
                        td { (r.device.mac.as_deref().unwrap_or("")) }
                        td { (r.device.ip.map(|ip| ip.to_string()).unwrap_or_default()) }
                        td { (r.device.port.map(|p| p.to_string()).unwrap_or_default()) }
                        td { (r.device.subscriber.as_deref().unwrap_or("")) }
                        @if r.local {
                            td.local { "local" }
                        } @else {
                            td { (r.public.map(|p| format!("{}:{}", p.ip, p.port)).unwrap_or_default()) }
                        }
                        td { (format!("{}:{}", r.remote.ip, r.remote.port)) }
                        td { (r.proto) }
                        td.service { (r.service.as_ref().map(|s| s.name.as_str()).or(r.dns.as_ref().map(|d| d.qname.as_str())).unwrap_or("")) }
                        td { (source_of(r)) }
                        td { (r.bytes_up) } td { (r.bytes_down) }
                        td { @if r.incomplete { "incomplete" } }
                    }
                }
            }
        }
    }
}

fn source_of(record: &Icr) -> String {
    match (&record.service, record.dns_all.len()) {
        (Some(service), _) => {
            serde_json::to_value(service.source).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
        }
        (None, 0) => String::new(),
        (None, 1) => "dns lookup".into(),
        (None, n) => format!("dns lookups ({n})"),
    }
}

fn services_table(services: &[ServiceRow]) -> Markup {
    html! {
        table.answer #rows {
            thead { tr {
                th { "service" } th { "remote" } th { "proto" } th { "first" } th { "last" } th.num { "connections" } th.num { "bytes" }
            } }
            tbody {
                @for s in services {
                    tr {
                        td.service { (s.name.as_deref().unwrap_or("")) } td { (s.remote) } td { (s.proto) }
                        td { (s.first) } td { (s.last) } td { (s.connections) } td { (s.bytes) }
                    }
                }
            }
        }
    }
}

/// The audit log, newest first, and whether its chain verifies.
pub fn audit(signed: &Signed, verified: Result<u64, String>, entries: &[Value]) -> Markup {
    page(
        "Audit log",
        Some(signed),
        html! {
            h1 { "The audit log" }
            @match &verified {
                Ok(count) => p.verified #verification { "The chain verifies: " (count) " entries." },
                Err(error) => p.broken #verification { "The chain does not verify: " (error) },
            }
            table.answer #audit {
                thead { tr { th.num { "seq" } th { "time" } th { "command" } th { "authority" } th { "officer" } th { "reference" } th { "outcome" } th.num { "results" } } }
                tbody {
                    @for entry in entries {
                        @let text = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| if v.is_null() { String::new() } else { v.to_string() });
                        tr {
                            td { (text(&entry["seq"])) } td { (text(&entry["time"])) } td { (text(&entry["command"])) }
                            td { (text(&entry["authority"])) } td { (text(&entry["officer"])) }
                            td { (text(&entry["reference"])) } td { (text(&entry["outcome"])) }
                            td { (text(&entry["result_count"])) }
                        }
                    }
                }
            }
        },
    )
}

/// A page for a request the console refuses outright (no session, a
/// forged form).
pub fn refused(reason: &str) -> Markup {
    page(
        "Refused",
        None,
        html! {
            h1 { "Refused" }
            p.refusal #refusal { (reason) }
            p { a href="/console" { "Sign in" } }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    #[test]
    fn an_answers_table_pages() {
        let answered = Answered {
            id: 7,
            kind: Kind::Accessed,
            summary: String::new(),
            from: Utc::now(),
            to: Utc::now(),
            rows: Rows::Records(crate::store::test_records::samples(600)),
            shown: true,
            gaps: Vec::new(),
            audit_seq: 1,
            bundle: "/nonexistent".into(),
            bytes: 0,
        };
        let signed = Signed { authority: "met", csrf: "c", auditor: false };
        let rows_on = |page_number| {
            let page = answer(&signed, &answered, html! {}, page_number).into_string();
            let body = page.split("<tbody>").nth(1).unwrap().split("</tbody>").next().unwrap().to_string();
            (body.matches("<tr>").count(), page)
        };
        let (rows, page) = rows_on(1);
        assert_eq!(rows, PAGE_ROWS);
        assert!(page.contains(r#"href="/console/answers/7?page=2""#) && !page.contains("page=0"), "a next link only");
        let (rows, page) = rows_on(3);
        assert_eq!(rows, 600 - 2 * PAGE_ROWS, "the rest");
        assert!(page.contains("Rows 501 to 600 of 600") && page.contains("?page=2") && !page.contains("?page=4"));
        assert_eq!(rows_on(99).0, 100, "past the last page: the last");
        assert_eq!(rows_on(0).0, PAGE_ROWS, "before the first: the first");
    }
}
