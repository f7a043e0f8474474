//! The desk: the one place a request is answered. Whatever door it came
//! through, a request is checked against the configuration that governs the
//! store (never one the asker brings), authorised, written to the audit log
//! (synced before anything is answered), answered from a [`Backend`], and
//! given the capture gaps of its window.
use std::{os::unix::fs::MetadataExt as _, path::Path};

use anyhow::Context as _;
use chrono::Utc;
use sha2::{Digest as _, Sha256};

use crate::{
    config::{Config, LoadedConfig, StoreConfig},
    export::{self, Format},
    query::{
        audit::{AuditLog, AuditRecord},
        authorise::{Refusal, authorise, authorise_sweep},
        backend::{Backend, Swept},
        questions::{self, Question, SelectorLimits},
        request::{Act, LocalFilter, Request, Sweep},
    },
    record::{Icr, format_time},
    store::gaps::Gap,
};

/// The longest value a request may carry in one field (a name, an officer,
/// a reference): DNS names are at most 253 bytes.
const MAX_FIELD_BYTES: usize = 1024;
/// The most a request's parameters may weigh in all (question 3 may name
/// thousands of services).
const MAX_PARAMETERS_BYTES: usize = 1 << 20;

/// Why a request was not answered. Each is audited before it is returned.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Not allowed: the command line exits 3, HTTP answers 403.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// A value the asker gave is malformed or contradictory (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The store, the audit log or the configuration failed (HTTP 500).
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

impl Failure {
    pub fn invalid(error: impl std::fmt::Display) -> Self {
        Self::Invalid(error.to_string())
    }

    /// The exit status the command line gives for it.
    pub fn exit_status(&self) -> i32 {
        match self {
            Self::Refused(_) => 3,
            Self::Invalid(_) | Self::Failed(_) => 1,
        }
    }
}

/// A request naming a configuration other than the one that governs the
/// store is refused: authorities (or retention) would be the caller's.
/// `what` says so up to the governing configuration's path.
fn refuse_another(named: Option<&Path>, governing: &StoreConfig, what: &str) -> Result<(), Refusal> {
    match named.filter(|named| !governing.is(named)) {
        Some(named) => Err(Refusal(format!("{what} {}, not by {}", governing.path().display(), named.display()))),
        None => Ok(()),
    }
}

/// An answered request.
#[derive(Debug)]
pub struct Answer {
    /// The answer, written in the requested format.
    pub body: Vec<u8>,
    pub format: Format,
    /// The capture gaps in the window: no record inside a gap is not no
    /// connection. The door shows them beside the answer.
    pub gaps: Vec<Gap>,
    /// The window the question read, as the desk parsed it.
    pub window: (chrono::DateTime<Utc>, chrono::DateTime<Utc>),
}

pub struct Desk<'a> {
    /// Where the audit log is (the store's directory).
    audit_dir: &'a Path,
    governing: &'a StoreConfig,
    backend: &'a dyn Backend,
}

impl<'a> Desk<'a> {
    pub fn new(audit_dir: &'a Path, governing: &'a StoreConfig, backend: &'a dyn Backend) -> Self {
        Self { audit_dir, governing, backend }
    }

    /// The configuration that governs this desk, as it is now.
    pub fn configuration(&self) -> anyhow::Result<LoadedConfig> {
        self.governing.load()
    }

    /// Applies the governing configuration's retention now, or says why
    /// not; either way it is audited, once.
    pub fn sweep(&self, request: &Sweep) -> Result<String, Failure> {
        let LoadedConfig { config, sha256 } = self.configuration()?;
        let audit = AuditLog::open(self.audit_dir, &config.audit)?;
        let retention_days = config.retention_days;
        let mut entry = AuditRecord {
            time: format_time(&Utc::now()),
            command: "sweep".into(),
            officer: Some(request.by.to_string()),
            parameters: serde_json::json!({ "retention_days": retention_days }),
            config_sha256: sha256,
            ..AuditRecord::default()
        };
        // The sudo user is the caller's word: kept, at a bounded size.
        shorten(&mut entry.officer);
        let open = Open { audit: &audit, entry: &entry };
        if let Err(refusal) =
            refuse_another(request.config.as_deref(), self.governing, "the store is governed by its configuration")
        {
            return Err(open.refuse(refusal));
        }
        let owner = std::fs::metadata(self.audit_dir)
            .with_context(|| format!("reading the owner of {}", self.audit_dir.display()))?
            .uid();
        if let Err(refusal) = authorise_sweep(&request.by, owner) {
            return Err(open.refuse(refusal));
        }
        let mut done = entry.clone();
        match self.backend.sweep(retention_days, Utc::now()) {
            Ok(Swept { dropped, clickhouse }) => {
                let span = match (dropped.first(), dropped.last()) {
                    (Some(first), Some(last)) => format!(" ({first} .. {last})"),
                    _ => String::new(),
                };
                let on = clickhouse.as_ref().map(|url| format!(" on {url}")).unwrap_or_default();
                let summary = format!("retention {retention_days} days{on}: dropped {} day(s){span}", dropped.len());
                let dropped: Vec<String> = dropped.iter().map(ToString::to_string).collect();
                done.parameters = match clickhouse {
                    Some(url) => {
                        serde_json::json!({ "retention_days": retention_days, "clickhouse": url, "dropped": dropped })
                    }
                    None => serde_json::json!({ "retention_days": retention_days, "dropped": dropped }),
                };
                done.outcome = summary.clone();
                done.result_count = dropped.len() as u64;
                audit.append(done).context("auditing the sweep")?;
                Ok(summary)
            }
            Err(error) => {
                let failure = Failure::Failed(error);
                done.outcome = format!("failed: {failure}");
                match audit.append(done) {
                    Ok(_) => Err(failure),
                    Err(error) => Err(Failure::Failed(error.context(format!("auditing a failed sweep ({failure})")))),
                }
            }
        }
    }

    /// Audits a request refused before it could be read (a door's own
    /// refusal, e.g. an API token that does not match), and returns it.
    pub fn refuse_unread(
        &self,
        loaded: &LoadedConfig,
        command: &str,
        authority: Option<String>,
        refusal: Refusal,
    ) -> Failure {
        match self.note_unread(loaded, command, authority, refusal.to_string(), serde_json::Value::Null) {
            Ok(()) => Failure::Refused(refusal),
            Err(error) => Failure::Failed(error.context("auditing a refused request")),
        }
    }

    /// Audits a request an authenticated authority sent that the door could
    /// not read (a malformed body), as the desk audits a malformed question,
    /// and returns it.
    pub fn invalid_unread(&self, loaded: &LoadedConfig, command: &str, authority: &str, reason: String) -> Failure {
        let invalid = Failure::Invalid(reason);
        match self.note_unread(
            loaded,
            command,
            Some(authority.to_string()),
            format!("failed: {invalid}"),
            serde_json::Value::Null,
        ) {
            Ok(()) => invalid,
            Err(error) => Failure::Failed(error.context("auditing a malformed request")),
        }
    }

    /// Appends an entry for something a door decided before a request
    /// could be read.
    pub fn note_unread(
        &self,
        loaded: &LoadedConfig,
        command: &str,
        authority: Option<String>,
        outcome: String,
        parameters: serde_json::Value,
    ) -> anyhow::Result<()> {
        let record = AuditRecord {
            time: format_time(&Utc::now()),
            command: command.to_string(),
            authority,
            outcome,
            parameters,
            config_sha256: loaded.sha256.clone(),
            ..AuditRecord::default()
        };
        AuditLog::open(self.audit_dir, &loaded.config.audit).and_then(|log| log.append(record)).map(|_| ())
    }

    /// Answers `request`, or says why not; either way it is audited first.
    pub fn answer(&self, request: &Request) -> Result<Answer, Failure> {
        let LoadedConfig { config, sha256 } = self.configuration()?;
        let audit = AuditLog::open(self.audit_dir, &config.audit)?;
        let act = request.ask.act();
        let mut entry = AuditRecord {
            time: format_time(&Utc::now()),
            command: request.ask.command().into(),
            authority: request.who.authority.clone(),
            officer: request.who.officer.clone(),
            reference: request.who.reference.clone(),
            purpose: match act {
                Act::Ask(purpose) => Some(purpose),
                Act::List => None,
            },
            parameters: request.ask.parameters(),
            config_sha256: sha256,
            ..AuditRecord::default()
        };
        if let Some(reason) = oversized(&entry) {
            // Audited without the oversized values: the entry says what was
            // refused and why, at a bounded size.
            entry.parameters = serde_json::json!({ "oversized": reason });
            for field in [&mut entry.officer, &mut entry.reference, &mut entry.authority] {
                shorten(field);
            }
            return Err(Open { audit: &audit, entry: &entry }.refuse(Refusal(reason)));
        }
        let open = Open { audit: &audit, entry: &entry };
        // Whoever asks cannot bring authorities of their own.
        if let Err(refusal) = refuse_another(
            request.config.as_deref(),
            self.governing,
            "queries are authorised by the store's configuration",
        ) {
            return Err(open.refuse(refusal));
        }
        if let Err(refusal) = authorise(&config, &request.who, act) {
            return Err(open.refuse(refusal));
        }
        match self.answer_authorised(&config, &open, request) {
            Ok(answer) => Ok(answer),
            // Refusals are audited where they are decided.
            Err(failure @ Failure::Refused(_)) => Err(failure),
            Err(failure) => {
                let mut failed = entry.clone();
                failed.outcome = format!("failed: {failure}");
                match audit.append(failed) {
                    Ok(_) => Err(failure),
                    Err(error) => Err(Failure::Failed(error.context(format!("auditing a failed request ({failure})")))),
                }
            }
        }
    }

    fn answer_authorised(&self, config: &Config, open: &Open, request: &Request) -> Result<Answer, Failure> {
        let question = Question::of(&request.ask).map_err(|e| Failure::invalid(format!("{e:#}")))?;
        let (from, to) = question.window();
        if to < from {
            return Err(Failure::invalid("the window ends before it starts"));
        }
        let max_window = chrono::Duration::days(i64::from(config.max_window_days));
        if to - from > max_window {
            return Err(
                open.refuse(Refusal(format!("the window is longer than the {} days allowed", config.max_window_days)))
            );
        }
        if let Question::Accessed { services, .. } = &question
            && let Some(reason) = SelectorLimits::of(config).refuses(services)
        {
            return Err(open.refuse(Refusal(reason)));
        }
        if let Some(dir) = &request.bundle {
            // Checked before the answer is audited: a request that cannot be
            // delivered is not recorded as answered.
            if dir.exists()
                && std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.next().is_some()
            {
                return Err(Failure::invalid(format!("the bundle directory {} is not empty", dir.display())));
            }
        }
        self.backend.keep_days(config.retention_days);
        let format = request.format;
        let (count, ndjson, body) = match question {
            Question::Resolve { ip, port, at, from, to, remote, service } => {
                let records = self.backend.by_public(from, to, ip, port)?;
                let resolved = questions::resolve(records, at, ip, port, remote, service.as_ref());
                let unmapped = if resolved.nearest && !resolved.records.is_empty() {
                    self.backend.by_services(from, to, &resolved.remote_ends(), LocalFilter::Exclude)?
                } else {
                    Vec::new()
                };
                render_records(&resolved.without_unknown_holders(at, &unmapped), format)?
            }
            Question::Services { device, from, to } => {
                let rows = self.backend.services(from, to, &device)?.into_rows();
                let mut body = Vec::new();
                export::write_services(&mut body, &rows, format)?;
                (rows.len() as u64, export::ndjson(&rows)?, body)
            }
            Question::Accessed { services, from, to, local } => {
                let mut records =
                    questions::accessed(self.backend.by_services(from, to, &services, local)?, &services, local);
                records.sort_by(|a, b| (a.start, &a.id).cmp(&(b.start, &b.id)));
                render_records(&records, format)?
            }
            Question::List { from, to } => render_records(&self.backend.all(from, to)?, format)?,
        };
        let gaps = self.backend.gaps(from, to)?;
        let mut entry = open.entry.clone();
        entry.outcome = "answered".into();
        entry.result_count = count;
        entry.result_sha256 = Some(sha256_hex(&ndjson));
        entry.gaps = gaps.len() as u64;
        let (_, line) = open.audit.append_entry(entry).context("auditing the answer")?;
        if let Some(dir) = &request.bundle {
            write_bundle(dir, &ndjson, &body, format, &line, &gaps)?;
        }
        Ok(Answer { body, format, gaps, window: (from, to) })
    }
}

/// A request being answered: its audit log and the entry it will be
/// recorded as.
struct Open<'a> {
    audit: &'a AuditLog,
    entry: &'a AuditRecord,
}

impl Open<'_> {
    /// Audits a refusal and returns it.
    fn refuse(&self, refusal: Refusal) -> Failure {
        let mut entry = self.entry.clone();
        entry.outcome = refusal.to_string();
        match self.audit.append(entry) {
            Ok(_) => Failure::Refused(refusal),
            Err(error) => Failure::Failed(error.context("auditing a refused request")),
        }
    }
}

/// The count, the NDJSON (what the audit digest covers) and the answer as
/// asked for.
fn render_records(records: &[Icr], format: Format) -> anyhow::Result<(u64, Vec<u8>, Vec<u8>)> {
    let mut body = Vec::new();
    export::write_records(&mut body, records, format)?;
    Ok((records.len() as u64, export::ndjson(records)?, body))
}

/// A disclosure bundle: the results (NDJSON, and the requested format if
/// another), the audit entry of the request, the capture gaps in its window
/// (`gaps.ndjson`, empty when none), and a manifest of their SHA-256 sums in
/// `sha256sum` form. An existing bundle is never overwritten.
fn write_bundle(
    dir: &Path,
    ndjson: &[u8],
    rendered: &[u8],
    format: Format,
    entry: &str,
    gaps: &[Gap],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        ("results.ndjson", ndjson.to_vec()),
        ("audit-entry.json", format!("{entry}\n").into_bytes()),
        ("gaps.ndjson", export::ndjson(gaps)?),
    ];
    match format {
        Format::Csv => files.push(("results.csv", rendered.to_vec())),
        Format::Ecs => files.push(("results.ecs.ndjson", rendered.to_vec())),
        Format::Ndjson | Format::Table => {}
    }
    let mut manifest = String::new();
    for (name, bytes) in &files {
        std::fs::write(dir.join(name), bytes).with_context(|| format!("writing {name} to the bundle"))?;
        manifest.push_str(&format!("{}  {name}\n", sha256_hex(bytes)));
    }
    std::fs::write(dir.join("MANIFEST.sha256"), manifest).context("writing the bundle's manifest")?;
    Ok(())
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A value longer than a request may carry, as the audit log keeps it: its
/// start and its length.
fn shorten(field: &mut Option<String>) {
    if let Some(value) = field.as_mut().filter(|v| v.len() > MAX_FIELD_BYTES) {
        *value = format!("{}... ({} bytes)", value.chars().take(64).collect::<String>(), value.len());
    }
}

/// Why a request is too large to answer (or audit as it is), if it is.
fn oversized(record: &AuditRecord) -> Option<String> {
    fn longest(value: &serde_json::Value) -> usize {
        match value {
            serde_json::Value::String(text) => text.len(),
            serde_json::Value::Array(items) => items.iter().map(longest).max().unwrap_or(0),
            serde_json::Value::Object(fields) => fields.values().map(longest).max().unwrap_or(0),
            _ => 0,
        }
    }
    let fields = [&record.officer, &record.reference, &record.authority];
    let field = fields
        .iter()
        .filter_map(|f| f.as_ref())
        .map(String::len)
        .chain([longest(&record.parameters)])
        .max()
        .unwrap_or(0);
    if field > MAX_FIELD_BYTES {
        return Some(format!("a value of {field} bytes is longer than the {MAX_FIELD_BYTES} a request may carry"));
    }
    let total = serde_json::to_vec(&record.parameters).map_or(usize::MAX, |bytes| bytes.len());
    (total > MAX_PARAMETERS_BYTES)
        .then(|| format!("the parameters weigh {total} bytes, more than the {MAX_PARAMETERS_BYTES} allowed"))
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Duration};

    use super::*;
    use crate::{
        query::request::{Ask, Operator, Sweeper, Who},
        record::Endpoint,
        store::{Store, test_records},
    };

    const POLICE: &str = "retention_days = 365\n[[authority]]\nname = \"met\"\nkind = \"police\"\npurposes = [1]\n";

    fn resolve(desk: &Desk, at: DateTime<Utc>) -> Vec<Icr> {
        let request = Request {
            ask: Ask::Resolve {
                ip: "203.0.113.1".parse().unwrap(),
                port: Some(20000),
                at: format_time(&at),
                tolerance: "1s".into(),
                remote: None,
                service: None,
            },
            who: Who { authority: Some("met".into()), officer: Some("PC 1".into()), reference: Some("OP-1".into()) },
            format: Format::Ndjson,
            bundle: None,
            config: None,
        };
        let answer = desk.answer(&request).unwrap();
        String::from_utf8(answer.body).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect()
    }

    /// The CGNAT lab's case after a killed agent: X's connection lost its
    /// mapping (no public end); port 20000 went to Y 84 ms after the time
    /// a server logged X's request. The nearest record is Y's, and it is no
    /// answer.
    #[test]
    fn question_1_names_nobody_rather_than_a_neighbour_when_the_holder_is_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path();
        std::fs::write(db.join("icr.toml"), POLICE).unwrap();
        let store = test_records::open(db).unwrap();
        let logged = test_records::sample(1).start + Duration::milliseconds(900);
        let toward = |i: u64, start: DateTime<Utc>, public: Option<u16>| {
            let mut record = test_records::sample(i);
            record.remote = Endpoint { ip: "192.0.2.10".parse().unwrap(), port: 443 };
            record.public = public.map(|port| Endpoint { ip: "203.0.113.1".parse().unwrap(), port });
            record.local = false;
            record.end = start + Duration::milliseconds(400);
            record.start = start;
            record
        };
        let x = toward(1, logged - Duration::milliseconds(300), None);
        let y = toward(2, logged + Duration::milliseconds(84), Some(20000));
        let governing = StoreConfig::of_store(db).unwrap();

        // Without X's record, Y's is the nearest within the tolerance: a
        // server's clock a little off the gateway's.
        store.append(std::slice::from_ref(&y)).unwrap();
        let desk = Desk::new(db, &governing, &store);
        let hits = resolve(&desk, logged);
        assert_eq!(hits.iter().map(|r| r.device.ip).collect::<Vec<_>>(), vec![y.device.ip]);

        // With it, the port may have been X's at that time: nobody is named.
        store.append(std::slice::from_ref(&x)).unwrap();
        assert!(resolve(&desk, logged).is_empty(), "Y did not make the connection");
        // At a time Y's record covers, Y is the answer whatever X's record says.
        assert_eq!(resolve(&desk, y.start + Duration::milliseconds(10)).len(), 1);
    }

    fn sweeps(db: &Path) -> Vec<serde_json::Value> {
        let audit = std::fs::read_to_string(db.join("audit.log")).unwrap_or_default();
        audit.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
    }

    /// A store holding a record of 10 days ago and one of now, kept 5 days.
    fn expiring_store(db: &Path) -> Store {
        std::fs::write(db.join("icr.toml"), POLICE.replace("365", "5")).unwrap();
        let store = test_records::open(db).unwrap();
        let mut ids = crate::record::RecordIds::default();
        let old = test_records::sample_at(1, Utc::now() - Duration::days(10), &mut ids);
        let new = test_records::sample_at(2, Utc::now(), &mut ids);
        store.append(&[old, new]).unwrap();
        store
    }

    #[test]
    fn a_sweep_is_authorised_and_audited_once_at_the_desk() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path();
        let store = expiring_store(db);
        let governing = StoreConfig::of_store(db).unwrap();
        let desk = Desk::new(db, &governing, &store);
        let owner = std::fs::metadata(db).unwrap().uid();
        let operator = |uid| Sweeper::Operator(Operator { uid, sudo_user: Some("alice".into()) });
        let days = || store.days().unwrap().len();

        // Neither a user other than root and the store's owner, nor another
        // configuration's retention: refused, each audited once, nothing dropped.
        let stranger = if owner == 64_099 { 64_098 } else { 64_099 };
        let refused = desk.sweep(&Sweep { by: operator(stranger), config: None }).unwrap_err();
        assert!(matches!(&refused, Failure::Refused(r) if r.0.contains("operator's")), "{refused}");
        let elsewhere = tempfile::tempdir().unwrap();
        let forged = elsewhere.path().join("mine.toml");
        std::fs::write(&forged, "retention_days = 1\n").unwrap();
        let refused = desk.sweep(&Sweep { by: operator(owner), config: Some(forged) }).unwrap_err();
        assert!(matches!(&refused, Failure::Refused(r) if r.0.contains("governed by its configuration")), "{refused}");
        assert_eq!(days(), 2, "nothing dropped");
        let entries = sweeps(db);
        assert_eq!(entries.len(), 2, "each refusal audited once: {entries:?}");
        assert!(
            entries.iter().all(|e| e["command"] == "sweep" && e["outcome"].as_str().unwrap().starts_with("refused"))
        );
        assert_eq!(entries[0]["officer"], format!("uid {stranger} (sudo by alice)"));
        assert!(entries[0]["config_sha256"].is_string(), "the configuration that refused it");

        // The owner sweeps, and the agent's schedule: each audited once.
        let summary = desk.sweep(&Sweep { by: operator(owner), config: None }).unwrap();
        assert!(summary.starts_with("retention 5 days: dropped 1 day(s)"), "{summary}");
        assert_eq!(days(), 1, "the expired day is gone, today's kept");
        let summary = desk.sweep(&Sweep { by: Sweeper::Schedule, config: None }).unwrap();
        assert_eq!(summary, "retention 5 days: dropped 0 day(s)");
        let entries = sweeps(db);
        assert_eq!(entries.len(), 4, "{entries:?}");
        assert_eq!(entries[2]["officer"], format!("uid {owner} (sudo by alice)"));
        assert_eq!(entries[2]["result_count"], 1);
        assert_eq!(entries[2]["parameters"]["retention_days"], 5);
        assert_eq!(entries[2]["parameters"]["dropped"].as_array().unwrap().len(), 1);
        assert!(entries[2].get("clickhouse").is_none() && entries[2]["parameters"].get("clickhouse").is_none());
        assert_eq!(entries[3]["officer"], "agent (hourly retention)");

        // A sudo user is the caller's word: audited at a bounded size.
        let long = Sweeper::Operator(Operator { uid: stranger, sudo_user: Some("x".repeat(100_000)) });
        assert!(matches!(desk.sweep(&Sweep { by: long, config: None }), Err(Failure::Refused(_))));
        let officer = sweeps(db)[4]["officer"].as_str().unwrap().to_string();
        assert!(officer.len() < 200 && officer.ends_with("bytes)"), "{officer}");
    }
}
