//! The command line's side of the doors: its flags become a request for the
//! desk (`crate::query`; `route` says where it is answered), and the
//! operator's commands that are neither questions nor sweeps (detach,
//! audit verify, serve, clickhouse init) run here.
use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use chrono::Utc;

use crate::{
    cli::{
        args::{AuditCommand, ExportIpfixArgs, ListArgs, QueryCommand, Requester, StoreArgs},
        route::{self, Answered, Place},
    },
    config::{ClickHouseSection, Config, StoreConfig},
    export::{
        self, Format,
        clickhouse::{ClickHouse, block_on},
    },
    query::{Ask, Failure, Request, Who, audit::AuditLog, cluster::Cluster},
};

/// `icr config check`: the configuration `named` (else
/// /etc/icr/icr.toml) loads; its effective values are printed.
pub fn config_check(named: Option<&Path>, out: &mut dyn Write) -> Result<()> {
    let path = named.unwrap_or(Path::new(crate::config::DEFAULT_PATH));
    let config = Config::read(path)?;
    config.check_files()?;
    // It loads; the agent would still refuse to let it authorise questions.
    if let Err(error) = std::fs::metadata(path)
        .map_err(anyhow::Error::from)
        .and_then(|metadata| crate::config::only_root_may_write(path, &metadata))
    {
        eprintln!("icr: warning: {error:#}");
    }
    out.write_all(config.effective()?.as_bytes())?;
    Ok(())
}

/// The request a query's flags make. The services of a `--services-file`
/// are read here, so the desk audits them themselves; the format is decided
/// here, where it is known whether stdout is a terminal.
pub fn query_request(command: &QueryCommand) -> Result<Request> {
    let (ask, who) = match command {
        QueryCommand::Resolve { ip, port, at, tolerance, remote, service, who, .. } => (
            Ask::Resolve {
                ip: *ip,
                port: *port,
                at: at.clone(),
                tolerance: tolerance.clone(),
                remote: remote.clone(),
                service: service.clone(),
            },
            who,
        ),
        QueryCommand::Services { device, from, to, who, .. } => {
            (Ask::Services { device: device.clone(), from: from.clone(), to: to.clone() }, who)
        }
        QueryCommand::Accessed { services, services_file, from, to, local, who, .. } => {
            let services = service_list(services.clone(), services_file.as_deref())?;
            (Ask::Accessed { services, from: from.clone(), to: to.clone(), local: *local }, who)
        }
    };
    Ok(request(ask, who, command.target().config.clone()))
}

/// The request `icr list` makes.
pub fn list_request(args: &ListArgs) -> Request {
    let ask = Ask::List { from: args.from.clone(), to: args.to.clone() };
    request(ask, &args.who, args.target.config.clone())
}

/// Where `icr export ipfix` writes: made ready before the records are asked
/// for, so that a file that cannot be made is refused before the request is
/// audited as answered.
pub enum IpfixSink {
    File(std::fs::File, PathBuf),
    Collector(crate::remote::Collector),
}

/// `icr export ipfix`: the window's records, asked at the desk of the
/// store (or its agent) or the cluster like any read, then written as
/// IPFIX to the file or the collector; the file goes if nothing was answered.
pub fn export_ipfix(args: &ExportIpfixArgs, out: &mut dyn Write) -> Result<Answered, Failure> {
    let place = Place::of_store_or_cluster(&args.target)?;
    let sink = IpfixSink::open(args)?;
    let mut ndjson = Vec::new();
    let answered = match place.ask(&sink.request(args), &mut ndjson) {
        Ok(Answered::ByAgent(answer)) if answer.error.is_some() => {
            sink.abandon();
            return Ok(Answered::ByAgent(answer));
        }
        Ok(answered) => answered,
        Err(failure) => {
            sink.abandon();
            return Err(failure);
        }
    };
    let (dir, named) = match &place {
        Place::Store { db, named } => (db, named),
        Place::Cluster { dir, named, .. } => (dir, named),
        Place::Remote(_) => return Err(Failure::Invalid("an export reads a store or a cluster".into())),
    };
    let section = Config::choose(named.as_deref(), Some(dir)).map(|chosen| chosen.config.ipfix).unwrap_or_default();
    sink.write(&ndjson, section.as_ref(), out)?;
    Ok(answered)
}

impl IpfixSink {
    pub fn open(args: &ExportIpfixArgs) -> Result<Self> {
        match (&args.file, &args.collector) {
            (Some(path), _) => {
                let file =
                    std::fs::OpenOptions::new().write(true).create_new(true).open(path).with_context(|| {
                        format!("creating {} (an existing file is never overwritten)", path.display())
                    })?;
                Ok(Self::File(file, path.clone()))
            }
            (None, Some(collector)) => Ok(Self::Collector(collector.clone())),
            (None, None) => bail!("name --file F or --collector URL"),
        }
    }

    /// The request was not answered: the file made for it goes.
    pub fn abandon(self) {
        if let Self::File(file, path) = self {
            drop(file);
            let _ = std::fs::remove_file(path);
        }
    }

    fn destination(&self) -> String {
        match self {
            Self::File(_, path) => path.display().to_string(),
            Self::Collector(collector) => collector.to_string(),
        }
    }

    /// The request: every record of the window, audited as `export ipfix`
    /// with its destination, answered as NDJSON for [`IpfixSink::write`].
    pub fn request(&self, args: &ExportIpfixArgs) -> Request {
        let ask = Ask::ExportIpfix { from: args.from.clone(), to: args.to.clone(), destination: self.destination() };
        Request {
            ask,
            who: Who {
                authority: args.authority.clone(),
                officer: args.officer.clone(),
                reference: args.reference.clone(),
            },
            format: Format::Ndjson,
            bundle: None,
            config: args.target.config.clone(),
        }
    }

    /// Writes the answer's records as IPFIX, templates first, with the
    /// observation domain and enterprise number of `[ipfix]` (the defaults
    /// without it); says what was done on `out`.
    pub fn write(
        self,
        ndjson: &[u8],
        section: Option<&crate::config::IpfixSection>,
        out: &mut dyn Write,
    ) -> Result<()> {
        let records = ndjson
            .split(|b| *b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice::<crate::record::Icr>(line).context("reading the answer's records"))
            .collect::<Result<Vec<_>>>()?;
        let section = section.cloned().unwrap_or_else(|| crate::config::IpfixSection {
            collectors: Vec::new(),
            observation_domain: 0,
            enterprise_number: crate::config::DOCUMENTATION_PEN,
            template_interval: crate::config::Span(std::time::Duration::from_secs(60)),
        });
        let destination = self.destination();
        match self {
            Self::File(mut file, _) => {
                let mut encoder = export::ipfix::Encoder::new(
                    section.observation_domain,
                    section.enterprise_number,
                    export::ipfix::PATH_MTU_MESSAGE,
                );
                let now = Utc::now().timestamp().clamp(0, i64::from(u32::MAX)) as u32;
                let messages = encoder.encode(&records, now, true);
                for message in &messages {
                    file.write_all(&message.bytes)?;
                }
                file.sync_all()?;
                writeln!(
                    out,
                    "{} records in {} IPFIX messages written to {destination}",
                    records.len(),
                    messages.len()
                )?;
            }
            Self::Collector(collector) => {
                let stats = export::ipfix::live::send_all(&section, &collector, &records);
                use std::sync::atomic::Ordering::Relaxed;
                let (sent, failed) = (stats.records_sent.load(Relaxed), stats.records_failed.load(Relaxed));
                writeln!(out, "{sent} of {} records sent to {destination}", records.len())?;
                if failed > 0 {
                    bail!(
                        "{failed} of {} records did not reach {destination}; the store still has them all",
                        records.len()
                    );
                }
            }
        }
        Ok(())
    }
}

fn request(ask: Ask, who: &Requester, config: Option<PathBuf>) -> Request {
    Request {
        ask,
        who: Who { authority: who.authority.clone(), officer: who.officer.clone(), reference: who.reference.clone() },
        format: who.format.unwrap_or_else(Format::default_for_stdout),
        bundle: who.bundle.clone(),
        config,
    }
}

/// The services a question 3 names: each --service, then each line of the
/// --services-file (blank lines and `#` comments skipped).
pub fn service_list(mut services: Vec<String>, file: Option<&Path>) -> Result<Vec<String>> {
    if let Some(file) = file {
        let list = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        services
            .extend(list.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned));
    }
    if services.is_empty() {
        bail!("name at least one --service (or a --services-file)");
    }
    Ok(services)
}

pub fn audit(command: AuditCommand, out: &mut dyn Write) -> Result<()> {
    match command {
        AuditCommand::Verify { db, config, head, key: Some(key) } => {
            let db = route::store_dir(config.as_deref(), db.as_deref())?;
            // The key named here, not the store's configuration, decides:
            // whoever rewrites the store can edit that.
            let log = AuditLog::verifying_with(&db, &key)?;
            let verified =
                log.verify_to(head.as_ref()).with_context(|| format!("{} is not intact", log.path().display()))?;
            writeln!(
                out,
                "audit log intact: {} entries, each authenticated by the key {}",
                verified.entries,
                key.display()
            )?;
            Ok(())
        }
        AuditCommand::Verify { db, config, head, key: None } => {
            let db = route::store_dir(config.as_deref(), db.as_deref())?;
            let config = StoreConfig::of_store(&db)?.load()?.config;
            let log = AuditLog::open(&db, &config.audit)?;
            let verified =
                log.verify_to(head.as_ref()).with_context(|| format!("{} is not intact", log.path().display()))?;
            let authenticated = match (&config.audit.key, verified.unauthenticated) {
                (None, _) => "chained, not authenticated: no key was given (--key FILE) or configured".to_string(),
                (Some(_), 0) => "each authenticated by the audit key".to_string(),
                (Some(_), n) => {
                    format!("authenticated by the audit key but for the first {n}, written before it was configured")
                }
            };
            writeln!(out, "audit log intact: {} entries, {authenticated}", verified.entries)?;
            Ok(())
        }
    }
}

pub fn detach(args: StoreArgs, out: &mut dyn Write) -> Result<()> {
    let chosen = Config::choose(args.config.as_deref(), args.db.as_deref())?;
    let db = chosen.db(args.db.as_deref())?;
    let socket = crate::serve::control::socket_path(&db, &chosen.config);
    let Some(dir) = chosen.config.probe.pin_dir else {
        bail!("the configuration has no [probe] pin_dir: nothing is pinned");
    };
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        bail!("the agent of {} is running; stop it first", db.display());
    }
    let removed = crate::capture::probe::unpin(&dir)?;
    writeln!(out, "removed {} pinned object(s) from {}: {}", removed.len(), dir.display(), removed.join(" "))?;
    Ok(())
}

/// `icr serve`: the HTTP API over the cluster until SIGINT or SIGTERM.
pub fn serve_cluster(args: StoreArgs) -> Result<()> {
    let chosen = Config::choose(args.config.as_deref(), args.db.as_deref())?;
    let db = chosen.db(args.db.as_deref())?;
    let config_file = chosen.source.agent_file().map(Path::to_path_buf);
    // Every request re-reads it: one that would refuse them all stops the start.
    StoreConfig::of_agent(&db, config_file.as_deref()).load()?;
    let config = chosen.config;
    let section =
        config.clickhouse.clone().context("icr serve answers from a cluster: the configuration has no [clickhouse]")?;
    let Some(listen) = config.http.listen else {
        bail!("icr serve is the HTTP API: the configuration has no [http] listen")
    };
    let cluster = Cluster::new(ClickHouse::new(&section, Some(&db))?)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        crate::serve::http::serve(&config.http, db.clone(), config_file, std::sync::Arc::new(cluster)).await?;
        log::info!("icr serving questions on {listen} from the cluster at {}", crate::remote::shown(&section.url));
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        Ok(())
    })
}

/// `icr clickhouse init`: the tables on every node; says which.
pub fn clickhouse_init(section: ClickHouseSection, out: &mut dyn Write) -> Result<()> {
    let clickhouse = ClickHouse::new(&section, None)?;
    // Each change and each day copied is said as it happens: a copy of an
    // older layout's year takes a while.
    let mut unsaid = None;
    let mut say = |line: String| {
        if let Err(error) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            unsaid.get_or_insert(error);
        }
    };
    let nodes = block_on(clickhouse.init(&mut say))?;
    if let Some(error) = unsaid {
        return Err(error).context("writing what init changed");
    }
    writeln!(out, "the ICR tables are on {} node(s): {}", nodes.len(), nodes.join(" "))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::{
        cli::args::{Cli, Command},
        query::LocalFilter,
    };

    fn accessed(extra: &[&str]) -> Result<Request> {
        let base = [
            "icr",
            "query",
            "accessed",
            "--service",
            "a.example",
            "--from",
            "f",
            "--to",
            "t",
            "--db",
            "/nonexistent",
            "--format",
            "csv",
        ];
        let cli = Cli::try_parse_from(base.iter().chain(extra))?;
        let Command::Query(query) = cli.command else { bail!("not a query") };
        query_request(&query)
    }

    #[test]
    fn accessed_takes_a_local_filter_that_defaults_to_include() {
        let local = |extra: &[&str]| match accessed(extra).unwrap().ask {
            Ask::Accessed { local, .. } => local,
            other => panic!("{other:?}"),
        };
        assert_eq!(local(&[]), LocalFilter::Include);
        assert_eq!(local(&["--local", "include"]), LocalFilter::Include);
        assert_eq!(local(&["--local", "exclude"]), LocalFilter::Exclude);
        assert_eq!(local(&["--local", "only"]), LocalFilter::Only);
        let refused = format!("{:#}", accessed(&["--local", "sometimes"]).unwrap_err());
        assert!(
            refused.contains("include") && refused.contains("exclude") && refused.contains("only"),
            "names the values: {refused}"
        );
    }
}
