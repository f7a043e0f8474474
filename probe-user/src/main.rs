//! `icr`: argument parsing and wiring; the work is in the library's modules.
use clap::Parser as _;
use icr::{
    agent::{self, RunOptions},
    cli::{Cli, Command},
    commands,
    config::Config,
};

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let result = match cli.command {
        Command::Run(args) => Config::load(args.store.config.as_deref(), Some(&args.store.db))
            .and_then(|config| {
                let options = RunOptions { lan: args.lan, wan: args.wan, db: args.store.db, config };
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(agent::run(options))
            }),
        Command::Replay(args) => commands::replay(args),
        Command::Query(query) => commands::query(query),
        Command::List(args) => commands::list(args),
        Command::Audit(audit) => commands::audit(audit),
        Command::Sweep(args) => commands::sweep(args),
    };
    if let Err(error) = result {
        eprintln!("icr: {error:#}");
        std::process::exit(if commands::is_refusal(&error) { 3 } else { 1 });
    }
}
