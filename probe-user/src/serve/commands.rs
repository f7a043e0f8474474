//! The store-reading commands: queries, list, audit verify, sweep. Each query
//! is authorised, answered from the store, and audited before it is printed.
//! They take the store they are given and write to `out`, so the same code
//! answers on the command line and, through its socket, inside the agent.
use std::{cell::Cell, io::Write};

use anyhow::{Context as _, Result, bail};
use chrono::{DateTime, Utc};
use sha2::{Digest as _, Sha256};

/// The longest value a request may carry in one field (a name, an officer,
/// a reference): DNS names are at most 253 bytes.
const MAX_FIELD_BYTES: usize = 1024;
/// The most a request's parameters may weigh in all (question 3 may name
/// thousands of services).
const MAX_PARAMETERS_BYTES: usize = 1 << 20;

use crate::{
    query::audit::{AuditLog, AuditRecord},
    serve::cli::{AuditCommand, ListArgs, QueryCommand, ReplayArgs, Requester, StoreArgs},
    config::{Config, LoadedConfig, StoreConfig},
    export::{self, Format},
    icr::{Icr, format_time},
    capture::probe::ProbeOptions,
    query::{self, Act, Authorisation, Purpose, Question, Refusal, ServiceSelector, parse_time},
    store::{Lookup, Store, gaps::Gap, index::IndexKey},
};

/// The store directory a store-reading command names.
pub fn store_dir(command: &crate::serve::cli::Command) -> Option<&std::path::Path> {
    use crate::serve::cli::Command;
    match command {
        Command::Query(QueryCommand::Resolve { store, .. })
        | Command::Query(QueryCommand::Services { store, .. })
        | Command::Query(QueryCommand::Accessed { store, .. }) => store.db.as_deref(),
        Command::Sweep(store) => Some(&store.db),
        Command::List(args) => Some(&args.store.db),
        _ => None,
    }
}

/// Answers a query; returns the capture gaps its window touches, which the
/// caller must show beside the answer (they are audited and bundled too).
/// `authorising` is the store's configuration as the door that took the
/// query knows it (see [`StoreConfig`]).
pub fn query(command: QueryCommand, store: &Store, authorising: &StoreConfig, out: &mut dyn Write) -> Result<Vec<Gap>> {
    match command {
        QueryCommand::Resolve { ip, port, at, tolerance, remote, service, store: args, who } => {
            let parameters = serde_json::json!({
                "ip": ip, "port": port, "at": at, "tolerance": tolerance, "remote": remote, "service": service,
            });
            let session = Session::open(&args.store_args()?, authorising, &who, Act::Ask(Purpose::Resolve), "query resolve", parameters, store)?;
            session.run(|session| {
                let Question::Resolve { ip, port, at, from, to, remote, service } =
                    Question::resolve(ip, port, &at, &tolerance, remote.as_deref(), service.as_deref())?
                else {
                    unreachable!("Question::resolve gives a Resolve")
                };
                session.check_window(from, to)?;
                let key = match port {
                    Some(port) => IndexKey::PublicPort(ip, port),
                    None => IndexKey::PublicAddr(ip),
                };
                let records = store.find(from, to, Lookup::Any(&[key]))?;
                let answer = query::resolve(records, at, ip, port, remote, service.as_ref());
                session.answer_records(&answer, &who, out)
            })
        }
        QueryCommand::Services { device, from, to, store: args, who } => {
            let parameters = serde_json::json!({ "device": device, "from": from, "to": to });
            let session = Session::open(&args.store_args()?, authorising, &who, Act::Ask(Purpose::Services), "query services", parameters, store)?;
            session.run(|session| {
                let Question::Services { device, from, to } = Question::services(&device, &from, &to)? else {
                    unreachable!("Question::services gives a Services")
                };
                session.check_window(from, to)?;
                let rows = store.services(from, to, &device.index_key())?.into_rows();
                let format = who.format.unwrap_or_else(Format::default_for_stdout);
                let mut rendered = Vec::new();
                export::write_services(&mut rendered, &rows, format)?;
                session.answer(rows.len() as u64, &export::ndjson(&rows)?, &rendered, format, who.bundle.as_deref(), out)
            })
        }
        QueryCommand::Accessed { services, services_file, from, to, store: args, who } => {
            // The audit entry holds the services themselves, the file's too.
            let listed = service_list(services.clone(), services_file.as_deref());
            let parameters = serde_json::json!({
                "services": listed.as_ref().unwrap_or(&services), "services_file": services_file, "from": from, "to": to,
            });
            let session = Session::open(&args.store_args()?, authorising, &who, Act::Ask(Purpose::Accessed), "query accessed", parameters, store)?;
            session.run(|session| {
                let texts = listed?;
                let Question::Accessed { services: selectors, from, to } = Question::accessed(&texts, &from, &to)? else {
                    unreachable!("Question::accessed gives an Accessed")
                };
                session.check_window(from, to)?;
                let keys: Option<Vec<IndexKey>> =
                    selectors.iter().map(ServiceSelector::index_keys).collect::<Option<Vec<_>>>().map(|k| k.concat());
                let lookup = keys.as_deref().map_or(Lookup::All, Lookup::Any);
                let mut records = query::accessed(store.find(from, to, lookup)?, &selectors);
                records.sort_by(|a, b| (a.start, &a.id).cmp(&(b.start, &b.id)));
                session.answer_records(&records, &who, out)
            })
        }
    }
}

/// The services a question 3 names: each --service, then each line of the
/// --services-file (blank lines and `#` comments skipped).
pub fn service_list(mut services: Vec<String>, file: Option<&std::path::Path>) -> Result<Vec<String>> {
    if let Some(file) = file {
        let list = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        services.extend(list.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned));
    }
    if services.is_empty() {
        bail!("name at least one --service (or a --services-file)");
    }
    Ok(services)
}

pub fn replay(args: ReplayArgs) -> Result<()> {
    let config = Config::load(args.config.as_deref(), args.db.as_deref())?;
    let store = args.db.as_deref().map(Store::open).transpose()?;
    // A replay never pins: it must not touch a running agent's maps.
    let options = ProbeOptions {
        flow_table_size: config.probe.flow_table_size,
        pin_dir: None,
        events: config.probe.events,
        event_ring_bytes: config.probe.event_ring_bytes,
    };
    let directory = crate::capture::subscribers::Directory::load(&config.subscribers)?;
    let mut out = std::io::stdout().lock();
    let stats = crate::capture::replay::replay(&args.file, options, config.flow_timeouts()?, |mut records| {
        for record in &mut records {
            record.device.subscriber = directory.subscriber(record);
        }
        out.write_all(&export::ndjson(&records)?)?;
        if let Some(store) = &store {
            store.append(&records)?;
        }
        Ok(())
    })?;
    out.flush()?;
    log::info!(
        "replayed {} packets ({} of unsupported link types skipped): {} records",
        stats.packets, stats.unsupported_link, stats.records
    );
    Ok(())
}

/// Every stored record in a window, for maintenance: a request like the
/// questions (an operator authority, an officer, a reference, a window of
/// at most `max_window_days`), audited with them. Returns the capture gaps
/// in the window, as [`query`] does.
pub fn list(args: ListArgs, store: &Store, authorising: &StoreConfig, out: &mut dyn Write) -> Result<Vec<Gap>> {
    let ListArgs { from, to, who, store: store_args } = args;
    let parameters = serde_json::json!({ "from": from, "to": to });
    let session = Session::open(&store_args, authorising, &who, Act::List, "list", parameters, store)?;
    session.run(|session| {
        let (from, to) = (parse_time(&from, "--from")?, parse_time(&to, "--to")?);
        session.check_window(from, to)?;
        let records = store.scan(from, to)?;
        session.answer_records(&records, &who, out)
    })
}

pub fn audit(command: AuditCommand, out: &mut dyn Write) -> Result<()> {
    match command {
        AuditCommand::Verify { db, head } => {
            // The store's own configuration names the key.
            let config = StoreConfig::of_store(&db).load()?.config;
            let log = AuditLog::open(&db, &config.audit)?;
            let verified = log.verify_to(head.as_ref()).with_context(|| format!("{} is not intact", log.path().display()))?;
            let authenticated = match (&config.audit.key, verified.unauthenticated) {
                (None, _) => "chained, not authenticated: no [audit] key is configured".to_string(),
                (Some(_), 0) => "each authenticated by the audit key".to_string(),
                (Some(_), n) => format!("authenticated by the audit key but for the first {n}, written before it was configured"),
            };
            writeln!(out, "audit log intact: {} entries, {authenticated}", verified.entries)?;
            Ok(())
        }
    }
}

pub fn detach(args: StoreArgs, out: &mut dyn Write) -> Result<()> {
    let config = Config::load(args.config.as_deref(), Some(&args.db))?;
    let Some(dir) = config.probe.pin_dir else {
        bail!("the configuration has no [probe] pin_dir: nothing is pinned");
    };
    if crate::serve::control::socket_path(&args.db).exists()
        && std::os::unix::net::UnixStream::connect(crate::serve::control::socket_path(&args.db)).is_ok()
    {
        bail!("the agent of {} is running; stop it first", args.db.display());
    }
    let removed = crate::capture::probe::unpin(&dir)?;
    writeln!(out, "removed {} pinned object(s) from {}: {}", removed.len(), dir.display(), removed.join(" "))?;
    Ok(())
}

/// A store-reading command that names a configuration other than the
/// store's is refused: its retention or authorities would be the caller's.
fn refuse_other_config(authorising: &StoreConfig, named: Option<&std::path::Path>) -> Result<()> {
    match named {
        Some(named) if !authorising.is(named) => Err(anyhow::Error::new(Refusal(format!(
            "the store is governed by its configuration {}, not by {}",
            authorising.path().display(),
            named.display()
        )))),
        _ => Ok(()),
    }
}

pub fn sweep(args: StoreArgs, store: &Store, authorising: &StoreConfig, out: &mut dyn Write) -> Result<()> {
    refuse_other_config(authorising, args.config.as_deref())?;
    let config = authorising.load()?.config;
    let summary = crate::query::audit::sweep(store, &args.db, &config.audit, config.retention_days, &operator())?;
    writeln!(out, "{summary}")?;
    Ok(())
}


/// An authorised query in progress: refused ones are audited and never get here.
struct Session<'a> {
    audit: AuditLog,
    record: AuditRecord,
    max_window: chrono::Duration,
    store: &'a Store,
    /// The window asked about, once checked: its gaps go with the answer.
    window: Cell<Option<(DateTime<Utc>, DateTime<Utc>)>>,
}

impl<'a> Session<'a> {
    fn open(
        args: &StoreArgs,
        authorising: &StoreConfig,
        who: &Requester,
        act: Act,
        command: &str,
        parameters: serde_json::Value,
        store: &'a Store,
    ) -> Result<Self> {
        let LoadedConfig { config, sha256 } = authorising.load()?;
        store.set_retention_days(config.retention_days);
        let audit = AuditLog::open(&args.db, &config.audit)?;
        let authorisation = Authorisation {
            authority: who.authority.clone(),
            officer: who.officer.clone(),
            reference: who.reference.clone(),
        };
        let record = AuditRecord {
            time: format_time(&Utc::now()),
            command: command.into(),
            authority: who.authority.clone(),
            officer: who.officer.clone(),
            reference: who.reference.clone(),
            purpose: match act {
                Act::Ask(purpose) => Some(purpose as u8),
                Act::List => None,
            },
            parameters,
            config_sha256: sha256,
            ..AuditRecord::default()
        };
        let max_window = chrono::Duration::days(i64::from(config.max_window_days));
        let oversized = oversized(&record);
        let mut session = Self { audit, record, max_window, store, window: Cell::new(None) };
        if let Some(reason) = oversized {
            // Audited without the oversized values: the entry says what was
            // refused and why, at a bounded size.
            session.record.parameters = serde_json::json!({ "oversized": reason });
            for field in [&mut session.record.officer, &mut session.record.reference, &mut session.record.authority] {
                if let Some(value) = field.as_mut().filter(|v| v.len() > MAX_FIELD_BYTES) {
                    *value = format!("{}... ({} bytes)", value.chars().take(64).collect::<String>(), value.len());
                }
            }
            return Err(session.refuse(Refusal(reason)));
        }
        // Whoever asks cannot bring authorities of their own.
        if let Some(named) = args.config.as_deref().filter(|named| !authorising.is(named)) {
            return Err(session.refuse(Refusal(format!(
                "queries are authorised by the store's configuration {}, not by {}",
                authorising.path().display(),
                named.display()
            ))));
        }
        if let Err(refusal) = query::authorise(&config, &authorisation, act) {
            return Err(session.refuse(refusal));
        }
        Ok(session)
    }

    /// Runs the authorised query; a failure that is no refusal (a bad
    /// parameter, an unreadable store) is audited too, as "failed".
    fn run<T>(&self, query: impl FnOnce(&Self) -> Result<T>) -> Result<T> {
        let result = query(self);
        if let Err(error) = &result
            && !is_refusal(error) {
                let mut record = self.record.clone();
                record.outcome = format!("failed: {error:#}");
                self.audit.append(record).context("auditing a failed query")?;
            }
        result
    }

    /// Audits a refusal and returns it as the command's error.
    fn refuse(&self, refusal: Refusal) -> anyhow::Error {
        let mut record = self.record.clone();
        record.outcome = refusal.to_string();
        match self.audit.append(record) {
            Ok(_) => anyhow::Error::new(refusal),
            Err(error) => error.context("auditing a refused query"),
        }
    }

    /// A window longer than the configured maximum is refused.
    fn check_window(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<()> {
        if to < from {
            bail!("the window ends before it starts");
        }
        if to - from > self.max_window {
            return Err(self.refuse(Refusal(format!(
                "the window is longer than the {} days allowed",
                self.max_window.num_days()
            ))));
        }
        self.window.set(Some((from, to)));
        Ok(())
    }

    fn answer_records(&self, records: &[Icr], who: &Requester, out: &mut dyn Write) -> Result<Vec<Gap>> {
        let format = who.format.unwrap_or_else(Format::default_for_stdout);
        let mut rendered = Vec::new();
        export::write_records(&mut rendered, records, format)?;
        self.answer(records.len() as u64, &export::ndjson(records)?, &rendered, format, who.bundle.as_deref(), out)
    }

    /// Audits the answer (its count, the SHA-256 of its NDJSON, the capture
    /// gaps in its window), writes the disclosure bundle if asked, then the
    /// answer itself; returns the gaps, for the caller to show.
    fn answer(
        &self,
        count: u64,
        ndjson: &[u8],
        rendered: &[u8],
        format: Format,
        bundle: Option<&std::path::Path>,
        out: &mut dyn Write,
    ) -> Result<Vec<Gap>> {
        let (from, to) = self.window.get().context("a query answered before its window was checked")?;
        let gaps = self.store.gaps(from, to)?;
        if let Some(dir) = bundle {
            // Checked before the answer is audited: a query that cannot be
            // delivered is not recorded as answered.
            if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
                bail!("the bundle directory {} is not empty", dir.display());
            }
        }
        let mut record = self.record.clone();
        record.outcome = "answered".into();
        record.result_count = count;
        record.result_sha256 = Some(sha256_hex(ndjson));
        record.gaps = gaps.len() as u64;
        let (_, entry) = self.audit.append_entry(record).context("auditing the query")?;
        if let Some(dir) = bundle {
            write_bundle(dir, ndjson, rendered, format, &entry, &gaps)?;
        }
        out.write_all(rendered)?;
        Ok(gaps)
    }
}

/// A disclosure bundle: the results (NDJSON, and the requested format if
/// another), the audit entry of the query, the capture gaps in its window
/// (`gaps.ndjson`, empty when none), and a manifest of their SHA-256 sums in
/// `sha256sum` form. An existing bundle is never overwritten.
fn write_bundle(dir: &std::path::Path, ndjson: &[u8], rendered: &[u8], format: Format, entry: &str, gaps: &[Gap]) -> Result<()> {
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

/// Whether an error is a refusal (the CLI exits 3 for those).
pub fn is_refusal(error: &anyhow::Error) -> bool {
    error.downcast_ref::<Refusal>().is_some()
}

/// A query's values, parsed and checked as the store would take them, with
/// no store and no authority: what the command line, the query socket and
/// the HTTP API all come to (and what `fuzz/`'s `query_request` drives).
/// A `--services-file` is read here.
pub fn parse_question(command: &QueryCommand) -> Result<Question> {
    match command {
        QueryCommand::Resolve { ip, port, at, tolerance, remote, service, .. } => {
            Question::resolve(*ip, *port, at, tolerance, remote.as_deref(), service.as_deref())
        }
        QueryCommand::Services { device, from, to, .. } => Question::services(device, from, to),
        QueryCommand::Accessed { services, services_file, from, to, .. } => {
            Question::accessed(&service_list(services.clone(), services_file.as_deref())?, from, to)
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Who runs an operator command, for the audit log.
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
    let field = fields.iter().filter_map(|f| f.as_ref()).map(String::len).chain([longest(&record.parameters)]).max().unwrap_or(0);
    if field > MAX_FIELD_BYTES {
        return Some(format!("a value of {field} bytes is longer than the {MAX_FIELD_BYTES} a request may carry"));
    }
    let total = serde_json::to_vec(&record.parameters).map_or(usize::MAX, |bytes| bytes.len());
    (total > MAX_PARAMETERS_BYTES).then(|| format!("the parameters weigh {total} bytes, more than the {MAX_PARAMETERS_BYTES} allowed"))
}

fn operator() -> String {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    match std::env::var("SUDO_USER") {
        Ok(user) => format!("uid {uid} (sudo by {user})"),
        Err(_) => format!("uid {uid}"),
    }
}
