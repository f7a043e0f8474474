//! The store-reading commands: queries, list, audit verify, sweep. Each query
//! is authorised, answered from the store, and audited before it is printed.
use std::{io::Write as _, net::IpAddr};

use anyhow::{Context as _, Result, anyhow, bail};
use chrono::{DateTime, Utc};
use sha2::{Digest as _, Sha256};

use crate::{
    audit::{AuditLog, AuditRecord},
    cli::{AuditCommand, ListArgs, QueryCommand, ReplayArgs, Requester, StoreArgs},
    config::{Config, parse_duration},
    export::{self, Format},
    icr::{Icr, format_time},
    probe::ProbeOptions,
    query::{self, Authorisation, DeviceSelector, Purpose, Refusal, ServiceSelector},
    store::Store,
};

pub fn query(command: QueryCommand) -> Result<()> {
    match command {
        QueryCommand::Resolve { ip, port, at, tolerance, remote, service, store, who } => {
            let parameters = serde_json::json!({
                "ip": ip, "port": port, "at": at, "tolerance": tolerance, "remote": remote, "service": service,
            });
            let session = Session::open(&store, &who, Purpose::Resolve, "query resolve", parameters)?;
            let at = parse_time(&at, "--at")?;
            let tolerance = chrono::Duration::from_std(parse_duration(&tolerance)?)?;
            let remote = remote.as_deref().map(parse_remote).transpose()?;
            let service = service.as_deref().map(ServiceSelector::parse).transpose().map_err(|e| anyhow!(e))?;
            let records = session.store.scan(at - tolerance, at + tolerance)?;
            let answer = query::resolve(records, at, ip, port, remote, service.as_ref());
            session.answer_records(&answer, who.format)
        }
        QueryCommand::Services { device, from, to, store, who } => {
            let parameters = serde_json::json!({ "device": device, "from": from, "to": to });
            let session = Session::open(&store, &who, Purpose::Services, "query services", parameters)?;
            let (from, to) = (parse_time(&from, "--from")?, parse_time(&to, "--to")?);
            let records = session.store.scan(from, to)?;
            let rows = query::services_of(&records, &DeviceSelector::parse(&device));
            let digest = sha256_hex(&export::ndjson(&rows)?);
            session.audit_answer(rows.len() as u64, digest)?;
            let mut out = std::io::stdout().lock();
            export::write_services(&mut out, &rows, who.format.unwrap_or_else(Format::default_for_stdout))?;
            out.flush()?;
            Ok(())
        }
        QueryCommand::Accessed { services, services_file, from, to, store, who } => {
            let parameters = serde_json::json!({
                "services": services, "services_file": services_file, "from": from, "to": to,
            });
            let session = Session::open(&store, &who, Purpose::Accessed, "query accessed", parameters)?;
            let mut texts = services;
            if let Some(file) = services_file {
                let list = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                texts.extend(list.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned));
            }
            if texts.is_empty() {
                bail!("name at least one --service (or a --services-file)");
            }
            let selectors = texts
                .iter()
                .map(|t| ServiceSelector::parse(t))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow!(e))?;
            let (from, to) = (parse_time(&from, "--from")?, parse_time(&to, "--to")?);
            let records = session.store.scan(from, to)?;
            session.answer_records(&query::accessed(records, &selectors), who.format)
        }
    }
}

pub fn replay(args: ReplayArgs) -> Result<()> {
    let config = Config::load(args.config.as_deref(), args.db.as_deref())?;
    let store = args.db.as_deref().map(Store::open).transpose()?;
    let options = ProbeOptions { flow_table_size: config.probe.flow_table_size };
    let directory = crate::subscribers::Directory::load(&config.subscribers)?;
    let mut out = std::io::stdout().lock();
    let stats = crate::replay::replay(&args.file, options, config.flow_timeouts()?, |mut records| {
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

pub fn list(args: ListArgs) -> Result<()> {
    let from = args.from.as_deref().map(|t| parse_time(t, "--from")).transpose()?.unwrap_or(DateTime::UNIX_EPOCH);
    let to = args.to.as_deref().map(|t| parse_time(t, "--to")).transpose()?.unwrap_or_else(|| Utc::now() + chrono::Duration::days(1));
    Config::load(args.store.config.as_deref(), Some(&args.store.db))?;
    let store = Store::open(&args.store.db)?;
    let records = store.scan(from, to)?;
    let bytes = export::ndjson(&records)?;
    AuditLog::in_dir(&args.store.db).append(AuditRecord {
        time: format_time(&Utc::now()),
        command: "list".into(),
        officer: Some(operator()),
        parameters: serde_json::json!({ "from": format_time(&from), "to": format_time(&to) }),
        outcome: "answered".into(),
        result_count: records.len() as u64,
        result_sha256: Some(sha256_hex(&bytes)),
        ..AuditRecord::default()
    })?;
    let mut out = std::io::stdout().lock();
    export::write_records(&mut out, &records, args.format.unwrap_or_else(Format::default_for_stdout))?;
    out.flush()?;
    Ok(())
}

pub fn audit(command: AuditCommand) -> Result<()> {
    match command {
        AuditCommand::Verify { db } => {
            let log = AuditLog::in_dir(&db);
            let entries = log.verify().with_context(|| format!("{} is not intact", log.path().display()))?;
            println!("audit log intact: {entries} entries");
            Ok(())
        }
    }
}

pub fn sweep(args: StoreArgs) -> Result<()> {
    let config = Config::load(args.config.as_deref(), Some(&args.db))?;
    let store = Store::open(&args.db)?;
    let dropped = store.sweep(config.retention_days, Utc::now())?;
    println!("retention {} days: dropped {} day(s){}", config.retention_days, dropped.len(),
        if dropped.is_empty() { String::new() } else { format!(" ({} .. {})", dropped[0], dropped[dropped.len() - 1]) });
    Ok(())
}

/// An authorised query in progress: refused ones are audited and never get here.
struct Session {
    store: Store,
    audit: AuditLog,
    record: AuditRecord,
}

impl Session {
    fn open(args: &StoreArgs, who: &Requester, purpose: Purpose, command: &str, parameters: serde_json::Value) -> Result<Self> {
        let config = Config::load(args.config.as_deref(), Some(&args.db))?;
        let audit = AuditLog::in_dir(&args.db);
        let authorisation = Authorisation {
            authority: who.authority.clone(),
            officer: who.officer.clone(),
            reference: who.reference.clone(),
        };
        let mut record = AuditRecord {
            time: format_time(&Utc::now()),
            command: command.into(),
            authority: who.authority.clone(),
            officer: who.officer.clone(),
            reference: who.reference.clone(),
            purpose: Some(purpose as u8),
            parameters,
            ..AuditRecord::default()
        };
        if let Err(refusal) = query::authorise(&config, &authorisation, purpose) {
            record.outcome = refusal.to_string();
            audit.append(record).context("auditing a refused query")?;
            return Err(anyhow::Error::new(refusal));
        }
        let store = Store::open(&args.db)?;
        Ok(Self { store, audit, record })
    }

    fn audit_answer(&self, count: u64, digest: String) -> Result<()> {
        let mut record = self.record.clone();
        record.outcome = "answered".into();
        record.result_count = count;
        record.result_sha256 = Some(digest);
        self.audit.append(record).context("auditing the query")?;
        Ok(())
    }

    fn answer_records(&self, records: &[Icr], format: Option<Format>) -> Result<()> {
        let bytes = export::ndjson(records)?;
        self.audit_answer(records.len() as u64, sha256_hex(&bytes))?;
        let mut out = std::io::stdout().lock();
        export::write_records(&mut out, records, format.unwrap_or_else(Format::default_for_stdout))?;
        out.flush()?;
        Ok(())
    }
}

/// Whether an error is a refusal (the CLI exits 3 for those).
pub fn is_refusal(error: &anyhow::Error) -> bool {
    error.downcast_ref::<Refusal>().is_some()
}

fn parse_time(text: &str, flag: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .with_context(|| format!("{flag} {text:?} is not an RFC 3339 time like 2026-11-22T15:02:00Z"))
}

fn parse_remote(text: &str) -> Result<(IpAddr, Option<u16>)> {
    if let Ok(ip) = text.parse() {
        return Ok((ip, None));
    }
    let address: std::net::SocketAddr = text.parse().with_context(|| format!("--remote {text:?} is not IP or IP:PORT"))?;
    Ok((address.ip(), Some(address.port())))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Who runs an operator command, for the audit log.
fn operator() -> String {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    match std::env::var("SUDO_USER") {
        Ok(user) => format!("uid {uid} (sudo by {user})"),
        Err(_) => format!("uid {uid}"),
    }
}
