//! `icr`: argument parsing and dispatch; the work, and the choice of door
//! (`cli::route`), are in the library's modules.
use std::{io::Write, path::Path};

use clap::Parser as _;
use icr::{
    agent::{self, RunOptions},
    cli::{
        args::{Cli, ClickHouseCommand, Command, ConfigCommand, ExportCommand, RunArgs},
        commands,
        route::{Answered, Place},
    },
    config::Config,
    query::Failure,
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
        Command::Replay(args) => icr::replay::run(&args.file, args.db.as_deref(), args.config.as_deref(), &mut stdout)
            .map(drop)
            .map_err(Failure::from),
        Command::Detach(args) => commands::detach(args, &mut stdout).map_err(Failure::from),
        Command::HashToken => hash_token(&mut stdout).map_err(Failure::from),
        Command::Audit(audit) => commands::audit(audit, &mut stdout).map_err(Failure::from),
        Command::Query(query) => commands::query_request(&query)
            .map_err(|error| Failure::Invalid(format!("{error:#}")))
            .and_then(|request| Place::of_query(query.target())?.ask(&request, &mut stdout))
            .map(report),
        Command::List(args) => Place::of_store_or_cluster(&args.target)
            .map_err(Failure::from)
            .and_then(|place| place.ask(&commands::list_request(&args), &mut stdout))
            .map(report),
        Command::Export(ExportCommand::Ipfix(args)) => commands::export_ipfix(&args, &mut stdout).map(report),
        Command::Sweep(args) => Place::of_store_or_cluster(&args.target)
            .map_err(Failure::from)
            .and_then(|place| place.sweep(&mut stdout))
            .map(report),
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

/// Shows what came beside an answer: capture gaps on stderr, one line each,
/// so stdout stays the answer that scripts parse. The agent's answer ends
/// the process with the agent's exit status.
fn report(answered: Answered) {
    let gaps = match &answered {
        Answered::Here { gaps } => gaps,
        Answered::ByAgent(answer) => &answer.gaps,
    };
    for gap in gaps {
        eprintln!("icr: warning: {}", gap.describe());
    }
    if let Answered::ByAgent(answer) = answered {
        if let Some(reason) = answer.error {
            eprintln!("icr: {reason}");
        }
        std::process::exit(answer.status);
    }
}
