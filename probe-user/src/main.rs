//! `icr`: argument parsing and wiring; the work is in the library's modules.
use std::io::Write as _;

use clap::{Parser as _, ValueEnum as _};
use icr::{
    agent::{self, RunOptions},
    serve::cli::{Cli, Command},
    serve::commands, serve::control,
    config::{Config, StoreConfig},
    export::Format,
    store::{Store, StoreInUse},
};

fn main() {
    // Everything icr writes (the store, its logs, the audit log with
    // officers and targets, disclosure bundles) is for root alone, whatever
    // umask it was started with.
    // SAFETY: umask cannot fail; no other thread runs yet.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let mut stdout = std::io::stdout().lock();
    let result = match cli.command {
        Command::Run(args) => Config::load(args.store.config.as_deref(), Some(&args.store.db)).and_then(|config| {
            let options = RunOptions { lan: args.lan, wan: args.wan, db: args.store.db, config, config_file: args.store.config };
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(agent::run(options))
        }),
        Command::Replay(args) => commands::replay(args),
        Command::Detach(args) => commands::detach(args, &mut stdout),
        Command::HashToken => {
            let mut token = String::new();
            std::io::stdin().read_line(&mut token).map_err(anyhow::Error::from).and_then(|_| {
                let hash = icr::serve::http::hash_token(token.trim())?;
                writeln!(stdout, "{hash}")?;
                Ok(())
            })
        }
        Command::Audit(audit) => commands::audit(audit, &mut stdout),
        Command::Query(query) if query.target().server.is_some() => {
            icr::serve::client::query(&query, &mut stdout).map(|gaps| warn_of(&gaps))
        }
        command @ (Command::Query(_) | Command::List(_) | Command::Sweep(_)) => {
            let db = commands::store_dir(&command).expect("store commands name a store").to_path_buf();
            // Questions change nothing in the store; a sweep does.
            let open = if matches!(command, Command::Sweep(_)) { Store::open } else { Store::open_read_only };
            // Without an agent, the store's own configuration governs it.
            let authorising = StoreConfig::of_store(&db);
            match open(&db) {
                Ok(store) => match command {
                    Command::Query(query) => commands::query(query, &store, &authorising, &mut stdout).map(|gaps| warn_of(&gaps)),
                    Command::List(args) => commands::list(args, &store, &authorising, &mut stdout).map(|gaps| warn_of(&gaps)),
                    Command::Sweep(args) => commands::sweep(args, &store, &authorising, &mut stdout),
                    _ => unreachable!("matched above"),
                },
                // The agent holds the store: it answers through its socket.
                Err(error) if error.downcast_ref::<StoreInUse>().is_some() => {
                    drop(stdout);
                    let wants_format = matches!(command, Command::Query(_) | Command::List(_));
                    match control::ask(&db, argv_for_agent(wants_format)) {
                        Ok(answer) => {
                            warn_of(&answer.gaps);
                            if let Some(reason) = answer.error {
                                eprintln!("icr: {reason}");
                            }
                            std::process::exit(answer.status);
                        }
                        Err(error) => Err(error),
                    }
                }
                Err(error) => Err(error),
            }
        }
    };
    if let Err(error) = result {
        eprintln!("icr: {error:#}");
        std::process::exit(if commands::is_refusal(&error) { 3 } else { 1 });
    }
}

/// Capture gaps go to stderr, one line each, so stdout stays the answer
/// that scripts parse.
fn warn_of(gaps: &[icr::store::gaps::Gap]) {
    for gap in gaps {
        eprintln!("icr: warning: {}", gap.describe());
    }
}

/// This command line, with the output format decided here (the agent cannot
/// see whether our stdout is a terminal).
fn argv_for_agent(wants_format: bool) -> Vec<String> {
    let mut argv: Vec<String> = std::env::args().collect();
    if wants_format && !argv.iter().any(|a| a == "--format" || a.starts_with("--format=")) {
        let format = Format::default_for_stdout().to_possible_value().expect("formats have names");
        argv.extend(["--format".to_string(), format.get_name().to_string()]);
    }
    argv
}
