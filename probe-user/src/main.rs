//! `icr`: argument parsing and wiring; the work is in the library's modules.
use std::{
    io::Write,
    path::{Path, PathBuf},
};

use clap::Parser as _;
use icr::{
    agent::{self, RunOptions},
    config::{Config, StoreConfig},
    query::{Desk, Failure, Request},
    serve::{
        cli::{Cli, ClickHouseCommand, Command, ConfigCommand, ExportCommand, RunArgs},
        commands,
        control::{self, Order},
    },
    store::{OpenError, Store},
};

fn main() {
    // Everything icr writes (the store, its logs, the audit log with
    // officers and targets, disclosure bundles) is for root alone, whatever
    // umask it was started with.
    // SAFETY: umask cannot fail; no other thread runs yet.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,clickhouse=warn"))
        .format_target(false)
        .init();
    let mut stdout = std::io::stdout().lock();
    let result: Result<(), Failure> = match cli.command {
        Command::Run(args) => run(args).map_err(Failure::from),
        Command::Replay(args) => commands::replay(args).map_err(Failure::from),
        Command::Detach(args) => commands::detach(args, &mut stdout).map_err(Failure::from),
        Command::HashToken => hash_token(&mut stdout).map_err(Failure::from),
        Command::Audit(audit) => commands::audit(audit, &mut stdout).map_err(Failure::from),
        Command::Query(query) => match commands::query_request(&query) {
            Err(error) => Err(Failure::Invalid(format!("{error:#}"))),
            Ok(request) => {
                let target = query.target();
                let (named, db) = (target.config.as_deref(), target.db.as_deref());
                match (&target.server, &target.clickhouse) {
                    (Some(_), _) => icr::serve::client::query(target, &request, &mut stdout).map(|gaps| warn_of(&gaps)),
                    (None, Some(url)) => commands::cluster_dir(named, db)
                        .map_err(Failure::from)
                        .and_then(|dir| ask_cluster(url, &dir, request, &mut stdout)),
                    (None, None) => commands::store_dir(named, db)
                        .map_err(Failure::from)
                        .and_then(|dir| ask_store(&dir, named, request, &mut stdout)),
                }
            }
        },
        Command::List(args) => {
            let (named, db) = (args.target.config.as_deref(), args.target.db.as_deref());
            match &args.target.clickhouse {
                Some(url) => commands::cluster_dir(named, db)
                    .map_err(Failure::from)
                    .and_then(|dir| ask_cluster(url, &dir, commands::list_request(&args), &mut stdout)),
                None => commands::store_dir(named, db)
                    .map_err(Failure::from)
                    .and_then(|dir| ask_store(&dir, named, commands::list_request(&args), &mut stdout)),
            }
        }
        Command::Export(ExportCommand::Ipfix(args)) => {
            let (named, db) = (args.target.config.as_deref(), args.target.db.as_deref());
            commands::IpfixSink::open(&args).map_err(Failure::from).and_then(|sink| {
                let request = sink.request(&args);
                let mut ndjson = Vec::new();
                let asked = match &args.target.clickhouse {
                    Some(url) => commands::cluster_dir(named, db)
                        .map_err(Failure::from)
                        .and_then(|dir| ask_cluster(url, &dir, request, &mut ndjson).map(|()| dir)),
                    None => commands::store_dir(named, db)
                        .map_err(Failure::from)
                        .and_then(|dir| ask_store(&dir, named, request, &mut ndjson).map(|()| dir)),
                };
                let dir = match asked {
                    Ok(dir) => dir,
                    Err(failure) => {
                        sink.abandon();
                        return Err(failure);
                    }
                };
                let section = Config::choose(named, Some(&dir)).map(|chosen| chosen.config.ipfix).unwrap_or_default();
                sink.write(&ndjson, section.as_ref(), &mut stdout).map_err(Failure::from)
            })
        }
        Command::Sweep(args) => {
            let (named, db) = (args.target.config.as_deref(), args.target.db.as_deref());
            match &args.target.clickhouse {
                Some(url) => commands::cluster_dir(named, db).map_err(Failure::from).and_then(|dir| {
                    let governing = StoreConfig::of_store(&dir)?;
                    let summary = commands::sweep_cluster(named, url, &dir, &governing)?;
                    writeln!(stdout, "{summary}").map_err(|e| Failure::from(anyhow::Error::from(e)))
                }),
                None => commands::store_dir(named, db)
                    .map_err(Failure::from)
                    .and_then(|dir| sweep(&dir, named, &mut stdout)),
            }
        }
        Command::Config(ConfigCommand::Check { config }) => {
            commands::config_check(config.as_deref(), &mut stdout).map_err(Failure::from)
        }
        Command::Serve(args) => commands::serve_cluster(args).map_err(Failure::from),
        Command::ClickHouse(ClickHouseCommand::Init { url, cluster, user, password_file, ca }) => {
            let section = icr::config::ClickHouseSection { url, cluster, user, password_file, ca };
            commands::clickhouse_init(section, &mut stdout).map_err(Failure::from)
        }
    };
    if let Err(failure) = result {
        eprintln!("icr: {failure}");
        std::process::exit(failure.exit_status());
    }
}

/// `icr run`: the configuration's store and interfaces, unless flags name
/// others.
fn run(args: RunArgs) -> anyhow::Result<()> {
    let chosen = Config::choose(args.store.config.as_deref(), args.store.db.as_deref())?;
    let db = chosen.db(args.store.db.as_deref())?;
    let or_configured =
        |flag: Vec<String>, configured: &Vec<String>| if flag.is_empty() { configured.clone() } else { flag };
    let lan = or_configured(args.lan, &chosen.config.capture.lan);
    let wan = or_configured(args.wan, &chosen.config.capture.wan);
    if lan.is_empty() {
        anyhow::bail!(
            "name the subscriber-side interfaces: --lan IF[,IF..], or [capture] lan = [...] in the configuration"
        );
    }
    let config_file = chosen.source.agent_file().map(Path::to_path_buf);
    let options = RunOptions { lan, wan, db, config: chosen.config, config_file };
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(agent::run(options))
}

fn hash_token(out: &mut dyn Write) -> anyhow::Result<()> {
    let mut token = String::new();
    std::io::stdin().read_line(&mut token)?;
    writeln!(out, "{}", icr::serve::tokens::hash_token(token.trim())?)?;
    Ok(())
}

/// Answers a request from the store in `db`: here, with the store's own
/// configuration, or through its running agent's socket when the agent
/// holds the store, or when the store is not the caller's to read (a member
/// of the socket's group).
fn ask_store(db: &Path, named: Option<&Path>, request: Request, out: &mut dyn Write) -> Result<(), Failure> {
    let socket = agent_socket(db, named);
    match Store::open_read_only(db) {
        Ok(store) => {
            let governing = StoreConfig::of_store(db)?;
            let answer = Desk::new(db, &governing, &store).answer(&request)?;
            out.write_all(&answer.body).map_err(anyhow::Error::from)?;
            warn_of(&answer.gaps);
            Ok(())
        }
        Err(OpenError::InUse(_)) => from_agent(&socket, &Order::Query(Box::new(request))),
        Err(OpenError::Failed(error)) => match control::connect(&socket) {
            Ok(stream) => answered_by_agent(stream, &Order::Query(Box::new(request))),
            Err(_) => Err(error.into()),
        },
    }
}

/// The socket of the agent that holds the store in `db`, as the
/// configuration named (else the store's own) says; the default one when
/// that cannot be read here.
fn agent_socket(db: &Path, named: Option<&Path>) -> PathBuf {
    control::socket_path(db, &Config::choose(named, Some(db)).map(|chosen| chosen.config).unwrap_or_default())
}

/// Answers a request from the provider's cluster: the configuration in `dir`
/// governs it, and its audit log there records it.
fn ask_cluster(url: &str, dir: &Path, request: Request, out: &mut dyn Write) -> Result<(), Failure> {
    let governing = StoreConfig::of_store(dir)?;
    let cluster = commands::cluster_of(url, &governing)?;
    let answer = Desk::new(dir, &governing, &cluster).answer(&request)?;
    out.write_all(&answer.body).map_err(anyhow::Error::from)?;
    warn_of(&answer.gaps);
    Ok(())
}

/// A sweep, here or by the running agent.
fn sweep(db: &Path, named: Option<&Path>, out: &mut dyn Write) -> Result<(), Failure> {
    match Store::open(db) {
        Ok(store) => {
            let governing = StoreConfig::of_store(db)?;
            let summary = Desk::new(db, &governing, &store).sweep_store(&store, named)?;
            writeln!(out, "{summary}").map_err(anyhow::Error::from)?;
            Ok(())
        }
        Err(OpenError::InUse(_)) => {
            from_agent(&agent_socket(db, named), &Order::Sweep { config: named.map(Path::to_path_buf) })
        }
        Err(OpenError::Failed(error)) => Err(error.into()),
    }
}

/// Sends `order` to the agent that holds the store; its answer goes to
/// stdout, and the process exits as the agent says.
fn from_agent(socket: &Path, order: &Order) -> Result<(), Failure> {
    let stream = control::connect(socket).map_err(|error| {
        anyhow::Error::from(error)
            .context(format!("the store is in use, and its agent's socket {} does not answer", socket.display()))
    })?;
    answered_by_agent(stream, order)
}

fn answered_by_agent(stream: std::os::unix::net::UnixStream, order: &Order) -> Result<(), Failure> {
    let answer = control::ask(stream, order)?;
    warn_of(&answer.gaps);
    if let Some(reason) = answer.error {
        eprintln!("icr: {reason}");
    }
    std::process::exit(answer.status);
}

/// Capture gaps go to stderr, one line each, so stdout stays the answer
/// that scripts parse.
fn warn_of(gaps: &[icr::store::gaps::Gap]) {
    for gap in gaps {
        eprintln!("icr: warning: {}", gap.describe());
    }
}
