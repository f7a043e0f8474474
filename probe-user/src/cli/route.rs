//! Which door a command line's request takes: a remote agent's HTTP API
//! (`--server`), the provider's cluster (`--clickhouse`), or a store, opened
//! here or asked through its running agent's socket. The flags decide the
//! place ([`Place`]); for a store, whether this process may open it decides
//! the door ([`StoreDoor`]). Wherever it goes, a request meets a desk.
use std::{
    io::Write,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::{
    cli::{
        args::{CENTRAL_DIR, QueryTarget, StoreOrCluster},
        client,
    },
    config::{ClickHouseSection, Config, StoreConfig},
    export::clickhouse::ClickHouse,
    query::{Desk, Failure, Operator, Request, Sweep, Sweeper, cluster::Cluster},
    serve::control::{self, Order},
    store::{OpenError, Store, gaps::Gap},
};

/// Where the flags send a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// A remote agent's HTTP API, with the token and CA the flags name.
    Remote(QueryTarget),
    /// The provider's cluster at `url`, governed and audited by the
    /// configuration and log in `dir`; `named` as for a store.
    Cluster { url: String, dir: PathBuf, named: Option<PathBuf> },
    /// A gateway's store in `db`; `named`: the configuration the caller
    /// named (for the agent's socket, and refused by the desk unless it
    /// governs the store).
    Store { db: PathBuf, named: Option<PathBuf> },
}

/// How a store is reached now.
pub enum StoreDoor {
    /// Opened by this process.
    Here(Store),
    /// Through the socket of the agent that holds it: the agent holds the
    /// store, or the store is not this user's to read (a member of the
    /// socket's group).
    Agent(UnixStream),
}

/// What answered a request; its answer is written already.
#[derive(Debug)]
pub enum Answered {
    /// This process's desk, or a remote API: the capture gaps of the
    /// answer's window, to show beside it.
    Here { gaps: Vec<Gap> },
    /// The running agent: the command line exits with its status.
    ByAgent(control::Answer),
}

/// The store a command works on: its `--db`, else the `db` of its
/// configuration (`named`, else /etc/icr/icr.toml), which is read only then.
pub fn store_dir(named: Option<&Path>, flag: Option<&Path>) -> Result<PathBuf> {
    match flag {
        Some(dir) => Ok(dir.to_path_buf()),
        None => Config::choose(named, None)?.db(None),
    }
}

/// The directory of the configuration and audit log of a cluster's
/// questions: `--db`, else the configuration's `db`, else [`CENTRAL_DIR`].
pub fn cluster_dir(named: Option<&Path>, flag: Option<&Path>) -> Result<PathBuf> {
    match flag {
        Some(dir) => Ok(dir.to_path_buf()),
        None => Ok(Config::choose(named, None)?.config.db.unwrap_or_else(|| PathBuf::from(CENTRAL_DIR))),
    }
}

/// The cluster at `url`, as the governing configuration's `[clickhouse]`
/// names it (its cluster name, user, password and CA; one server and
/// ClickHouse's `default` user when it names none). Its password file must
/// be outside the directory of that configuration.
pub fn cluster_of(url: &str, governing: &StoreConfig) -> Result<Cluster> {
    let section = match governing.load()?.config.clickhouse {
        Some(section) => ClickHouseSection { url: url.to_string(), ..section },
        None => ClickHouseSection::at(url),
    };
    Cluster::new(ClickHouse::new(&section, governing.path().parent())?)
}

impl Place {
    /// Where a query's flags send it.
    pub fn of_query(target: &QueryTarget) -> Result<Self> {
        match (&target.server, &target.clickhouse) {
            (Some(_), _) => Ok(Self::Remote(target.clone())),
            (None, url) => Self::of(target.config.as_deref(), target.db.as_deref(), url.as_deref()),
        }
    }

    /// Where the flags of a list or a sweep send it.
    pub fn of_store_or_cluster(target: &StoreOrCluster) -> Result<Self> {
        Self::of(target.config.as_deref(), target.db.as_deref(), target.clickhouse.as_deref())
    }

    fn of(named: Option<&Path>, db: Option<&Path>, clickhouse: Option<&str>) -> Result<Self> {
        let named_file = named.map(Path::to_path_buf);
        Ok(match clickhouse {
            Some(url) => Self::Cluster { url: url.to_string(), dir: cluster_dir(named, db)?, named: named_file },
            None => Self::Store { db: store_dir(named, db)?, named: named_file },
        })
    }

    /// Answers `request` here, and writes the answer to `out`.
    pub fn ask(&self, request: &Request, out: &mut dyn Write) -> Result<Answered, Failure> {
        match self {
            Self::Remote(target) => client::query(target, request, out).map(|gaps| Answered::Here { gaps }),
            Self::Cluster { url, dir, .. } => {
                let governing = StoreConfig::of_store(dir)?;
                let cluster = cluster_of(url, &governing)?;
                let answer = Desk::new(dir, &governing, &cluster).answer(request)?;
                write(out, &answer.body)?;
                Ok(Answered::Here { gaps: answer.gaps })
            }
            Self::Store { db, named } => match StoreDoor::to_read(db, named.as_deref())? {
                StoreDoor::Here(store) => {
                    let governing = StoreConfig::of_store(db)?;
                    let answer = Desk::new(db, &governing, &store).answer(request)?;
                    write(out, &answer.body)?;
                    Ok(Answered::Here { gaps: answer.gaps })
                }
                StoreDoor::Agent(stream) => by_agent(stream, &Order::Query(Box::new(request.clone())), out),
            },
        }
    }

    /// Applies retention now, as the operator running this process, and
    /// writes what it dropped to `out`.
    pub fn sweep(&self, out: &mut dyn Write) -> Result<Answered, Failure> {
        let operator = Operator::this_process();
        let sweep = |named: Option<&Path>| Sweep {
            by: Sweeper::Operator(operator.clone()),
            config: named.map(Path::to_path_buf),
        };
        let summary = match self {
            Self::Remote(_) => return Err(Failure::invalid("a sweep is applied at the store or the cluster")),
            Self::Cluster { url, dir, named } => {
                let governing = StoreConfig::of_store(dir)?;
                let cluster = cluster_of(url, &governing)?;
                Desk::new(dir, &governing, &cluster).sweep(&sweep(named.as_deref()))?
            }
            Self::Store { db, named } => match StoreDoor::to_write(db, named.as_deref())? {
                StoreDoor::Here(store) => {
                    let governing = StoreConfig::of_store(db)?;
                    Desk::new(db, &governing, &store).sweep(&sweep(named.as_deref()))?
                }
                StoreDoor::Agent(stream) => {
                    let order = Order::Sweep { config: named.clone(), sudo_user: operator.sudo_user.clone() };
                    return by_agent(stream, &order, out);
                }
            },
        };
        writeln!(out, "{summary}").context("writing the sweep's summary")?;
        Ok(Answered::Here { gaps: Vec::new() })
    }
}

impl StoreDoor {
    /// For a question: the store opened read-only here; through the agent's
    /// socket when the agent holds it, or when it is not this user's to
    /// read and the socket answers.
    pub fn to_read(db: &Path, named: Option<&Path>) -> Result<Self, Failure> {
        match Store::open_read_only(db) {
            Ok(store) => Ok(Self::Here(store)),
            Err(OpenError::InUse(_)) => Self::agent(db, named),
            Err(OpenError::Failed(error)) => match control::connect(&agent_socket(db, named)) {
                Ok(stream) => Ok(Self::Agent(stream)),
                Err(_) => Err(error.into()),
            },
        }
    }

    /// For a sweep: the store opened to write here; through the agent's
    /// socket when the agent holds it.
    pub fn to_write(db: &Path, named: Option<&Path>) -> Result<Self, Failure> {
        match Store::open(db) {
            Ok(store) => Ok(Self::Here(store)),
            Err(OpenError::InUse(_)) => Self::agent(db, named),
            Err(OpenError::Failed(error)) => Err(error.into()),
        }
    }

    fn agent(db: &Path, named: Option<&Path>) -> Result<Self, Failure> {
        let socket = agent_socket(db, named);
        let stream = control::connect(&socket).with_context(|| {
            format!("the store is in use, and its agent's socket {} does not answer", socket.display())
        })?;
        Ok(Self::Agent(stream))
    }
}

/// The socket of the agent that holds the store in `db`, as the
/// configuration named (else the store's own) says; the default one when
/// that cannot be read here.
fn agent_socket(db: &Path, named: Option<&Path>) -> PathBuf {
    control::socket_path(db, &Config::choose(named, Some(db)).map(|chosen| chosen.config).unwrap_or_default())
}

fn by_agent(stream: UnixStream, order: &Order, out: &mut dyn Write) -> Result<Answered, Failure> {
    Ok(Answered::ByAgent(control::ask(stream, order, out)?))
}

fn write(out: &mut dyn Write, body: &[u8]) -> Result<(), Failure> {
    out.write_all(body).context("writing the answer")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::{
        cli::args::{Cli, Command},
        export::Format,
        query::{Ask, Who},
        store::test_records,
    };

    const POLICE: &str = "retention_days = 365\n[[authority]]\nname = \"met\"\nkind = \"police\"\npurposes = [2]\n";

    /// The place the command line `args` (after `icr`) sends its request.
    fn place(args: &[&str]) -> Result<Place> {
        let cli = Cli::try_parse_from(["icr"].iter().chain(args))?;
        match &cli.command {
            Command::Query(query) => Place::of_query(query.target()),
            Command::List(list) => Place::of_store_or_cluster(&list.target),
            Command::Sweep(sweep) => Place::of_store_or_cluster(&sweep.target),
            other => anyhow::bail!("not a request: {other:?}"),
        }
    }

    #[test]
    fn the_flags_choose_the_place() {
        let dir = tempfile::tempdir().unwrap();
        let with_db = dir.path().join("with-db.toml");
        std::fs::write(&with_db, "db = \"/srv/icr\"\n").unwrap();
        let without_db = dir.path().join("without-db.toml");
        std::fs::write(&without_db, "retention_days = 30\n").unwrap();
        let (with_db, without_db) = (with_db.to_str().unwrap(), without_db.to_str().unwrap());
        let services = ["query", "services", "--device", "10.0.0.2", "--from", "f", "--to", "t"];
        let query = |more: &[&str]| place(&[&services[..], more].concat());
        let url = "http://10.0.0.5:8123";

        assert!(matches!(query(&["--server", "https://gw.example:8443"]).unwrap(), Place::Remote(_)));
        let store = |db: &str, named: Option<&str>| Place::Store { db: db.into(), named: named.map(PathBuf::from) };
        let cluster = |dir: &str, named: Option<&str>| Place::Cluster {
            url: url.into(),
            dir: dir.into(),
            named: named.map(PathBuf::from),
        };
        assert_eq!(query(&["--db", "/data/gw"]).unwrap(), store("/data/gw", None));
        // The configuration's db, when no --db: the store, or the cluster's directory.
        assert_eq!(query(&["--config", with_db]).unwrap(), store("/srv/icr", Some(with_db)));
        assert_eq!(query(&["--clickhouse", url, "--db", "/data/central"]).unwrap(), cluster("/data/central", None));
        assert_eq!(query(&["--clickhouse", url, "--config", with_db]).unwrap(), cluster("/srv/icr", Some(with_db)));
        assert_eq!(
            query(&["--clickhouse", url, "--config", without_db]).unwrap(),
            cluster(CENTRAL_DIR, Some(without_db))
        );
        let list = ["list", "--from", "f", "--to", "t", "--config", with_db];
        assert_eq!(place(&list).unwrap(), store("/srv/icr", Some(with_db)));
        assert_eq!(place(&["sweep", "--db", "/data/gw"]).unwrap(), store("/data/gw", None));
        assert_eq!(
            place(&["sweep", "--clickhouse", url, "--db", "/data/central", "--config", with_db]).unwrap(),
            cluster("/data/central", Some(with_db)),
        );
        // A store must be named somewhere.
        let unnamed = place(&["sweep", "--config", without_db]).unwrap_err();
        assert!(format!("{unnamed:#}").contains("name the store"), "{unnamed:#}");
    }

    fn services() -> Request {
        Request {
            ask: Ask::Services {
                device: "10.0.0.2".into(),
                from: "2026-11-22T00:00:00Z".into(),
                to: "2026-11-23T00:00:00Z".into(),
            },
            who: Who { authority: Some("met".into()), officer: Some("PC 1".into()), reference: Some("OP-1".into()) },
            format: Format::Ndjson,
            bundle: None,
            config: None,
        }
    }

    /// A store its agent holds is asked and swept through the agent's
    /// socket; with the agent gone and the store still held, the answer says
    /// the socket does not answer; a free store is opened here. The desk
    /// audits each request once, wherever it was.
    #[test]
    fn a_store_is_opened_here_or_asked_through_its_agent() {
        let store_dir = tempfile::tempdir().unwrap();
        let db = store_dir.path().to_path_buf();
        std::fs::write(db.join("icr.toml"), POLICE).unwrap();
        let held = test_records::open(&db).unwrap();
        held.append(&test_records::samples(10)).unwrap();
        let place = Place::Store { db: db.clone(), named: None };

        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let serving = runtime.enter();
        let socket = control::socket_path(&db, &Config::default());
        runtime
            .block_on(async { control::serve(&socket, &db, StoreConfig::of_agent(&db, None), held.clone()) })
            .unwrap();
        let asking = std::thread::spawn({
            let place = place.clone();
            move || {
                let (mut answer, mut swept) = (Vec::new(), Vec::new());
                (place.ask(&services(), &mut answer).unwrap(), answer, place.sweep(&mut swept).unwrap(), swept)
            }
        });
        runtime.block_on(async {
            while !asking.is_finished() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        });
        let (asked, answer, swept, summary) = asking.join().unwrap();
        assert!(matches!(&asked, Answered::ByAgent(a) if a.status == 0 && a.error.is_none()), "{asked:?}");
        assert!(!answer.is_empty(), "the agent's answer is written");
        assert!(matches!(&swept, Answered::ByAgent(a) if a.status == 0), "{swept:?}");
        assert!(String::from_utf8_lossy(&summary).starts_with("retention 365 days"));

        // The agent stops; its store stays held (as by a dying agent).
        drop(serving);
        drop(runtime);
        let failure = place.ask(&services(), &mut Vec::new()).unwrap_err();
        assert!(matches!(&failure, Failure::Failed(_)), "{failure}");
        assert!(failure.to_string().contains("does not answer"), "{failure}");
        assert!(matches!(place.sweep(&mut Vec::new()), Err(Failure::Failed(_))));

        // Free: opened here.
        drop(held);
        let mut answer = Vec::new();
        assert!(matches!(place.ask(&services(), &mut answer).unwrap(), Answered::Here { .. }));
        assert!(!answer.is_empty());
        let mut summary = Vec::new();
        assert!(matches!(place.sweep(&mut summary).unwrap(), Answered::Here { .. }));
        assert!(String::from_utf8_lossy(&summary).starts_with("retention 365 days"));

        let audit = std::fs::read_to_string(db.join("audit.log")).unwrap();
        let commands: Vec<serde_json::Value> = audit
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["command"].clone())
            .collect();
        assert_eq!(commands, ["query services", "sweep", "query services", "sweep"], "each once: {audit}");
    }
}
