//! The `icr` command line's flags (`docs/cli.md` is the contract).
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::{export::Format, query::request::LocalFilter};

#[derive(Parser, Debug)]
#[command(name = "icr", version, about = "Internet Connection Records: the XDP probe's agent and its queries")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The agent, in the foreground: attach XDP, follow conntrack, store ICRs.
    Run(RunArgs),
    /// Run a pcap/pcapng file through the same XDP program and assembler;
    /// print the ICRs as NDJSON (capture timestamps).
    Replay(ReplayArgs),
    /// Ask one of the three questions (authorised, purpose-bound, audited).
    #[command(subcommand)]
    Query(QueryCommand),
    /// Every stored ICR in the window (an operator's command; audited).
    List(ListArgs),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Apply retention now: drop every day older than `retention_days`.
    Sweep(SweepArgs),
    /// Stored records in the forms other tools read (an operator's request,
    /// audited like `list`).
    #[command(subcommand)]
    Export(ExportCommand),
    /// The central query service: the HTTP API (`[http]`) over the provider's
    /// ClickHouse cluster (`[clickhouse]`), with no capture. Its directory
    /// holds the governing configuration and the audit log.
    Serve(StoreArgs),
    /// The provider-wide store: a ClickHouse cluster every gateway ships to.
    #[command(subcommand, name = "clickhouse")]
    ClickHouse(ClickHouseCommand),
    /// Remove the probe a stopped agent left attached (the maps and XDP links
    /// pinned in the configuration's `[probe] pin_dir`).
    Detach(StoreArgs),
    /// The configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Read an HTTP API token on stdin; print its salted hash for an
    /// authority's `token_hash` (the token itself is never stored).
    HashToken,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Subscriber-side interfaces (comma-separated; default: `[capture] lan`).
    #[arg(long, value_delimiter = ',')]
    pub lan: Vec<String>,
    /// Internet-side interfaces (comma-separated; default: `[capture] wan`);
    /// with NAT, conntrack is followed.
    #[arg(long, value_delimiter = ',')]
    pub wan: Vec<String>,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// The capture file (pcap or pcapng; Ethernet, Linux cooked, raw IP, BSD null, PPP).
    pub file: PathBuf,
    /// Also store the records here (never the configuration's `db`: a
    /// replay goes to a store only when told).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Configuration file (timeouts, flow table size; default
    /// /etc/icr/icr.toml, else DIR/icr.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// The store directory (default: the configuration's `db`).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Configuration file (default: /etc/icr/icr.toml, else DIR/icr.toml if
    /// present).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Where a query is answered: a store directory (directly, or through its
/// running agent's socket), or a remote agent's HTTP API.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct QueryTarget {
    /// The store directory (default: the configuration's `db`). With
    /// --clickhouse: the directory of the configuration that governs the
    /// cluster's questions and of their audit log (default: the
    /// configuration's `db`, else /var/lib/icr).
    #[arg(long, conflicts_with = "server")]
    pub db: Option<PathBuf>,
    /// Ask the provider's ClickHouse cluster (any node's HTTP interface)
    /// across every gateway, instead of one gateway's store.
    #[arg(long, conflicts_with = "server")]
    pub clickhouse: Option<String>,
    /// A remote agent's HTTP API, e.g. https://gateway.example:8443. The
    /// bearer token is read from --token-file or $ICR_TOKEN and names the
    /// authority.
    #[arg(long)]
    pub server: Option<String>,
    /// Configuration file (default: /etc/icr/icr.toml), for its `db`.
    /// Queries are authorised by the configuration the store remembers (its
    /// agent's), else DIR/icr.toml: naming another is refused.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// With --server: a file holding the API token (else $ICR_TOKEN).
    #[arg(long, requires = "server")]
    pub token_file: Option<PathBuf>,
    /// With --server: trust this CA certificate (PEM) instead of the Web PKI.
    #[arg(long, requires = "server")]
    pub ca: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct Requester {
    /// The requesting authority, as configured.
    #[arg(long)]
    pub authority: Option<String>,
    /// The officer making the request.
    #[arg(long)]
    pub officer: Option<String>,
    /// The authorisation reference.
    #[arg(long)]
    pub reference: Option<String>,
    /// Output format (default: table on a terminal, NDJSON otherwise).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Also write a disclosure bundle here: the results, this query's audit
    /// entry, the capture gaps in its window, and a SHA-256 manifest of them
    /// (`sha256sum -c MANIFEST.sha256`).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum QueryCommand {
    /// Question 1: which device used this public address (and port) at this time.
    Resolve {
        /// The public address the communication came from.
        #[arg(long)]
        ip: std::net::IpAddr,
        /// Its public source port, when known.
        #[arg(long)]
        port: Option<u16>,
        /// When (RFC 3339, e.g. 2026-11-22T15:02:00Z).
        #[arg(long)]
        at: String,
        /// How far from --at a flow may lie (default 1s).
        #[arg(long, default_value = "1s")]
        tolerance: String,
        /// The remote end contacted: IP or IP:PORT.
        #[arg(long)]
        remote: Option<String>,
        /// The service contacted: a name.
        #[arg(long)]
        service: Option<String>,
        #[command(flatten)]
        store: QueryTarget,
        #[command(flatten)]
        who: Requester,
    },
    /// Question 2: the services a device used in a window.
    Services {
        /// A MAC, an IP or a subscriber id.
        #[arg(long)]
        device: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[command(flatten)]
        store: QueryTarget,
        #[command(flatten)]
        who: Requester,
    },
    /// Question 3: the devices that used any of these services in a window.
    Accessed {
        /// NAME, *.SUFFIX, IP or CIDR; repeatable.
        #[arg(long = "service")]
        services: Vec<String>,
        /// A file with one service per line.
        #[arg(long)]
        services_file: Option<PathBuf>,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        /// Records of exchanges that never left the gateway (a device and
        /// the gateway's own resolver): with the others, left out, or alone.
        #[arg(long, value_enum, default_value_t = LocalFilter::Include)]
        local: LocalFilter,
        #[command(flatten)]
        store: QueryTarget,
        #[command(flatten)]
        who: Requester,
    },
}

impl QueryCommand {
    pub fn target(&self) -> &QueryTarget {
        match self {
            Self::Resolve { store, .. } | Self::Services { store, .. } | Self::Accessed { store, .. } => store,
        }
    }
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// The window's start (RFC 3339).
    #[arg(long)]
    pub from: String,
    /// Its end: at most the configuration's `max_window_days` after --from.
    #[arg(long)]
    pub to: String,
    /// Who asks (an operator authority) and why, and the output.
    #[command(flatten)]
    pub who: Requester,
    #[command(flatten)]
    pub target: StoreOrCluster,
}

#[derive(Subcommand, Debug)]
pub enum ExportCommand {
    /// The window's records as IPFIX (RFC 7011): a file (RFC 5655) or sent
    /// to a collector, for back-filling.
    Ipfix(ExportIpfixArgs),
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("destination").required(true).args(["file", "collector"])))]
pub struct ExportIpfixArgs {
    /// The window's start (RFC 3339).
    #[arg(long)]
    pub from: String,
    /// Its end: at most the configuration's `max_window_days` after --from.
    #[arg(long)]
    pub to: String,
    /// Write the records to this IPFIX file (RFC 5655); never over an existing file.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Send them to this collector: udp://HOST:PORT or tcp://HOST:PORT.
    #[arg(long)]
    pub collector: Option<crate::remote::Collector>,
    /// The requesting authority (an operator), as configured.
    #[arg(long)]
    pub authority: Option<String>,
    /// The officer making the request.
    #[arg(long)]
    pub officer: Option<String>,
    /// The authorisation reference.
    #[arg(long)]
    pub reference: Option<String>,
    #[command(flatten)]
    pub target: StoreOrCluster,
}

#[derive(Args, Debug)]
pub struct SweepArgs {
    #[command(flatten)]
    pub target: StoreOrCluster,
}

/// A store, or the provider's cluster (`--clickhouse URL` in place of `--db`).
#[derive(Args, Debug)]
pub struct StoreOrCluster {
    /// The store directory (default: the configuration's `db`). With
    /// --clickhouse: the directory of the configuration that governs the
    /// cluster and of the audit log (default: the configuration's `db`, else
    /// /var/lib/icr).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Configuration file (default: /etc/icr/icr.toml), for its `db`. List
    /// and sweep are governed by the configuration the store remembers (its
    /// agent's), else DIR/icr.toml: naming another is refused.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The provider's ClickHouse cluster (any node's HTTP interface) instead
    /// of one gateway's store.
    #[arg(long)]
    pub clickhouse: Option<String>,
}

/// Where the configuration that governs questions to a cluster, and their
/// audit log, are when `--clickhouse` comes without `--db`.
pub const CENTRAL_DIR: &str = "/var/lib/icr";

#[derive(Subcommand, Debug)]
pub enum ClickHouseCommand {
    /// Create the central tables on every node of the cluster: each shard's
    /// local tables and the Distributed tables over them (again: no change).
    Init {
        /// Any node's HTTP interface, e.g. http://10.0.0.5:8123.
        #[arg(long)]
        url: String,
        /// The `remote_servers` cluster (omit for one server).
        #[arg(long)]
        cluster: Option<String>,
        /// The ClickHouse user that may create tables (default: ClickHouse's `default`).
        #[arg(long)]
        user: Option<String>,
        /// A file holding its password alone (root's, 0600 or 0400).
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// PEM certificates an https:// URL is verified against (default: the system's roots).
        #[arg(long)]
        ca: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check the hash chain; exit 0 if intact, else name the first broken entry.
    Verify {
        /// The store directory (default: the configuration's `db`).
        #[arg(long)]
        db: Option<PathBuf>,
        /// Configuration file (default: /etc/icr/icr.toml), for its `db`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The chain's head as kept elsewhere (SEQ:HASH, e.g. from a
        /// disclosure bundle or the system journal): the log must still
        /// reach it, so a cut tail is found.
        #[arg(long)]
        head: Option<crate::query::audit::Head>,
        /// The audit key (root's, outside the store), named by whoever
        /// verifies rather than read from the store's configuration: every
        /// entry must carry a valid MAC under it.
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Parse and validate the configuration; print the effective values,
    /// defaults included (TOML); exit 0 if it would load.
    Check {
        /// The file (default: /etc/icr/icr.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}
