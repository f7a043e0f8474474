//! The configuration file (TOML, `docs/cli.md`): retention, authorities,
//! and the probe's tunables. Unknown keys are refused so a typo cannot
//! silently weaken a safeguard.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::capture::flow::Timeouts;

/// Twelve months: the legal maximum; a longer retention is refused.
pub use crate::store::MAX_RETENTION_DAYS;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The store: the commands' `--db DIR` when they name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db: Option<PathBuf>,
    #[serde(default = "default_retention")]
    pub retention_days: u32,
    /// The interfaces the agent captures on (`--lan`/`--wan` override).
    #[serde(default)]
    pub capture: CaptureSection,
    #[serde(default, rename = "authority", skip_serializing_if = "Vec::is_empty")]
    pub authorities: Vec<Authority>,
    /// The longest window a query may cover.
    #[serde(default = "default_max_window_days")]
    pub max_window_days: u32,
    /// The widest IPv4 network question 3 may name (a prefix length): a
    /// wider one is a bulk read, which is the operator's `list`.
    #[serde(default = "default_max_selector_v4")]
    pub max_selector_v4: u8,
    /// The same for IPv6.
    #[serde(default = "default_max_selector_v6")]
    pub max_selector_v6: u8,
    #[serde(default)]
    pub probe: ProbeSection,
    #[serde(default)]
    pub timeouts: TimeoutsSection,
    #[serde(default)]
    pub subscribers: crate::capture::subscribers::SubscribersSection,
    #[serde(default)]
    pub http: HttpSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub audit: AuditSection,
    /// Names this gateway on every record (default: the host name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_id: Option<String>,
    /// Where records and gaps are shipped for provider-wide questions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clickhouse: Option<ClickHouseSection>,
    /// Live IPFIX export of every closed record to flow collectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipfix: Option<IpfixSection>,
    /// The running agent's local query socket (default `DIR/icr.sock`).
    /// Root, the agent's user and the members of the socket's group may
    /// connect (the package's `/run/icr/icr.sock` is the group icr-query's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

/// `[capture]`: the interfaces `icr run` attaches to.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CaptureSection {
    /// Subscriber-facing interfaces.
    #[serde(default)]
    pub lan: Vec<String>,
    /// Internet-facing interfaces; with NAT, conntrack is followed.
    #[serde(default)]
    pub wan: Vec<String>,
}

/// `[clickhouse]`: a cluster (or one server) that every record and gap is
/// shipped to.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseSection {
    /// The HTTP interface of any node, e.g. `https://10.0.0.5:8443`; never
    /// with credentials in it.
    pub url: String,
    /// The `remote_servers` cluster; omitted for one server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The ClickHouse user (ClickHouse's `default` when not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// A file holding the user's password alone: root's, 0600 or 0400,
    /// outside the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// PEM certificates an `https://` server is verified against (default:
    /// the system's roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

impl ClickHouseSection {
    /// The section with `url` alone, as `icr clickhouse init --url` gives it.
    pub fn at(url: impl Into<String>) -> Self {
        Self { url: url.into(), cluster: None, user: None, password_file: None, ca: None }
    }

    /// What can be checked without reading a file: the URL carries no
    /// credentials and is http(s); the names are names.
    pub fn validate(&self) -> Result<()> {
        crate::remote::checked_url(&self.url)?;
        if let Some(cluster) = &self.cluster
            && (cluster.is_empty() || !cluster.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        {
            bail!("[clickhouse] cluster {cluster:?} is not a cluster name");
        }
        // It travels in an HTTP header: printable ASCII, as ClickHouse's names are.
        if let Some(user) = &self.user
            && (user.is_empty() || user.len() > 255 || !user.chars().all(|c| c.is_ascii_graphic()))
        {
            bail!("[clickhouse] user {user:?} is not a ClickHouse user name (1 to 255 printable ASCII characters)");
        }
        Ok(())
    }
}

/// `[ipfix]`: collectors every closed record is sent to as IPFIX, after
/// the store has it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IpfixSection {
    /// `udp://HOST:PORT` or `tcp://HOST:PORT`, one or more.
    pub collectors: Vec<crate::remote::Collector>,
    /// The observation domain id every message carries (RFC 7011 §3.1).
    #[serde(default)]
    pub observation_domain: u32,
    /// The IANA Private Enterprise Number icr's own elements are filed
    /// under: the provider's own (32473, the default, is for documentation).
    #[serde(default = "default_enterprise_number")]
    pub enterprise_number: u32,
    /// How often templates are sent again over UDP, where a collector that
    /// restarts has no other way to learn them.
    #[serde(default = "default_template_interval")]
    pub template_interval: Span,
}

impl IpfixSection {
    pub fn validate(&self) -> Result<()> {
        if self.collectors.is_empty() {
            bail!("[ipfix] collectors is empty: name at least one udp://HOST:PORT or tcp://HOST:PORT");
        }
        if self.enterprise_number == 0 {
            bail!("[ipfix] enterprise_number = 0 is IANA's own: give the provider's Private Enterprise Number");
        }
        Ok(())
    }
}

/// RFC 5612's enterprise number for documentation: the default until the
/// provider configures its own.
pub const DOCUMENTATION_PEN: u32 = 32473;

fn default_enterprise_number() -> u32 {
    DOCUMENTATION_PEN
}

fn default_template_interval() -> Span {
    Span(Duration::from_secs(60))
}

/// Reads a secret file (`what` names it in errors): root's and readable by
/// root only, and outside the store in `store_dir` when there is one
/// (whoever can rewrite the store must not hold it).
pub fn read_secret(path: &Path, what: &str, store_dir: Option<&Path>) -> Result<Vec<u8>> {
    check_secret(path, what, store_dir)?;
    std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}

/// What [`read_secret`] checks before it reads: a file, root's alone,
/// outside the store. Its group may read it only when that group is this
/// process's own: the package's agent runs as user `icr`, whose group no
/// person belongs to (`chown root:icr`, mode 0440).
fn check_secret(path: &Path, what: &str, store_dir: Option<&Path>) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = std::fs::metadata(path).with_context(|| format!("reading {what} {}", path.display()))?;
    if !metadata.is_file() {
        bail!("{what} {} is not a file", path.display());
    }
    // SAFETY: getegid has no arguments and cannot fail.
    let own_group = metadata.gid() == unsafe { libc::getegid() };
    let loose = if own_group { 0o037 } else { 0o077 };
    if metadata.uid() != 0 || metadata.mode() & loose != 0 {
        bail!(
            "{what} {} must be owned by root and readable by root only (chmod 0400 or 0600), or also by the \
             agent's own group (chown root:icr, chmod 0440); it is uid {} gid {} mode {:o}",
            path.display(),
            metadata.uid(),
            metadata.gid(),
            metadata.mode() & 0o7777
        );
    }
    if let Some(store_dir) = store_dir {
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        if canonical(path).starts_with(canonical(store_dir)) {
            bail!(
                "{what} {} is inside the store {}: keep it where the store's writers cannot read it",
                path.display(),
                store_dir.display()
            );
        }
    }
    Ok(())
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Ticks (seconds) of records that may wait for a slow or failing disk
    /// before the agent stops reading events (back-pressure, reported as a
    /// gap). More tolerates longer stalls at the cost of memory.
    #[serde(default = "default_write_queue")]
    pub write_queue: usize,
    /// MiB of the store's index and blocks the agent keeps in memory (sled's
    /// page cache): its resident memory grows to about this much, then stays.
    #[serde(default = "default_cache_mb")]
    pub cache_mb: u64,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self { write_queue: default_write_queue(), cache_mb: default_cache_mb() }
    }
}

fn default_cache_mb() -> u64 {
    crate::store::DEFAULT_CACHE_MB
}

fn default_write_queue() -> usize {
    64
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Authority {
    pub name: String,
    pub kind: AuthorityKind,
    #[serde(default)]
    pub purposes: Vec<Purpose>,
    /// For HTTP access; never the token itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_hash: Option<String>,
}

/// The three questions an ICR exists to answer; an authority is granted
/// some of them. Written as their numbers, 1 to 3, in the configuration and
/// the audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum Purpose {
    /// 1: which device sent a communication.
    Resolve = 1,
    /// 2: which services a device used.
    Services = 2,
    /// 3: which devices used given services.
    Accessed = 3,
}

impl TryFrom<u8> for Purpose {
    type Error = String;

    fn try_from(number: u8) -> Result<Self, String> {
        match number {
            1 => Ok(Self::Resolve),
            2 => Ok(Self::Services),
            3 => Ok(Self::Accessed),
            other => Err(format!("purpose {other} is not 1, 2 or 3")),
        }
    }
}

impl From<Purpose> for u8 {
    fn from(purpose: Purpose) -> u8 {
        purpose as u8
    }
}

impl std::fmt::Display for Purpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", *self as u8)
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthorityKind {
    Police,
    Intelligence,
    Approved,
    /// A local government authority (a council), which the law forbids
    /// communications data: refused whatever its purposes. Not to be
    /// confused with a *local record*, one that never left the gateway.
    #[serde(rename = "local")]
    LocalGovernment,
    /// Maintenance: may `list` records, and ask none of the three questions.
    Operator,
    /// Reads the audit log; may neither list records nor ask the questions.
    Auditor,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSection {
    /// Capacity of the kernel flow table.
    #[serde(default = "default_flow_table_size")]
    pub flow_table_size: u32,
    /// Pin maps and XDP links here (a bpffs directory, e.g. /sys/fs/bpf/icr):
    /// the probe then keeps counting while the agent restarts or upgrades.
    /// `icr detach --config FILE` removes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_dir: Option<PathBuf>,
    /// How events reach the agent: `"ring"` or `"perf"`. Unset: the ring
    /// buffer where the kernel can (5.18 and later), else perf buffers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<crate::capture::probe::EventPath>,
    /// Size of each CPU's event ring buffer in bytes (a power of two, 64 KiB
    /// to 1 GiB): how long a burst it absorbs while the agent is busy.
    #[serde(default = "default_event_ring_bytes")]
    pub event_ring_bytes: u32,
    /// DNS answers held to name the connections that follow them, all
    /// devices together (about 150 bytes each).
    #[serde(default = "default_dns_cache_entries")]
    pub dns_cache_entries: usize,
    /// NAT mappings kept after conntrack destroyed them (for flows that
    /// close after their mapping), at most; about 300 bytes each.
    #[serde(default = "default_nat_destroyed_kept")]
    pub nat_destroyed_kept: usize,
}

impl Default for ProbeSection {
    fn default() -> Self {
        Self {
            flow_table_size: default_flow_table_size(),
            pin_dir: None,
            events: None,
            event_ring_bytes: default_event_ring_bytes(),
            dns_cache_entries: default_dns_cache_entries(),
            nat_destroyed_kept: default_nat_destroyed_kept(),
        }
    }
}

impl ProbeSection {
    /// The probe these keys describe, pinned in `pin_dir` when it is set
    /// (a replay unsets it: it must not touch a running agent's maps).
    pub fn probe_options(&self) -> crate::capture::probe::ProbeOptions {
        crate::capture::probe::ProbeOptions {
            flow_table_size: self.flow_table_size,
            pin_dir: self.pin_dir.clone(),
            events: self.events,
            event_ring_bytes: self.event_ring_bytes,
        }
    }
}

fn default_nat_destroyed_kept() -> usize {
    crate::capture::nat::DEFAULT_MAX_DESTROYED
}

fn default_dns_cache_entries() -> usize {
    crate::capture::hints::answers::DEFAULT_MAX_ENTRIES
}

fn default_event_ring_bytes() -> u32 {
    probe_common::EVENT_RING_BYTES
}

/// `[timeouts]`: when flows close ([`Timeouts`] says what each is).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutsSection {
    pub tcp_closed: Span,
    pub tcp_idle: Span,
    pub udp_idle: Span,
    pub active: Span,
    pub full_sweep: Span,
}

impl Default for TimeoutsSection {
    fn default() -> Self {
        let Timeouts { tcp_closed, tcp_idle, udp_idle, active, full_sweep } = Timeouts::default();
        Self {
            tcp_closed: Span(tcp_closed),
            tcp_idle: Span(tcp_idle),
            udp_idle: Span(udp_idle),
            active: Span(active),
            full_sweep: Span(full_sweep),
        }
    }
}

/// A duration longer than zero, written like `90s`, `5m`, `2h`, `1h30m` or
/// `250ms`: parsed, and zero refused, when the configuration is read, so no
/// use of it can forget to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span(pub Duration);

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let text = String::deserialize(deserializer)?;
        match parse_duration(&text).map_err(|error| D::Error::custom(format!("{error:#}")))? {
            // A zero timeout would close every flow at its first packet, a
            // zero idle time end every session at once.
            zero if zero.is_zero() => Err(D::Error::custom(format!("{text:?}: a duration must be longer than zero"))),
            duration => Ok(Self(duration)),
        }
    }
}

impl Serialize for Span {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(self.0))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            retention_days: default_retention(),
            authorities: Vec::new(),
            max_window_days: default_max_window_days(),
            max_selector_v4: default_max_selector_v4(),
            max_selector_v6: default_max_selector_v6(),
            probe: ProbeSection::default(),
            timeouts: TimeoutsSection::default(),
            subscribers: Default::default(),
            http: Default::default(),
            audit: Default::default(),
            metrics: Default::default(),
            store: StoreSection::default(),
            probe_id: None,
            clickhouse: None,
            ipfix: None,
            db: None,
            capture: CaptureSection::default(),
            socket: None,
        }
    }
}

fn default_retention() -> u32 {
    MAX_RETENTION_DAYS
}

fn default_max_window_days() -> u32 {
    31
}

fn default_max_selector_v4() -> u8 {
    16
}

fn default_max_selector_v6() -> u8 {
    32
}

fn default_flow_table_size() -> u32 {
    probe_common::DEFAULT_FLOW_TABLE_SIZE
}

/// The configuration that authorises the questions of a store: the file its
/// agent was started with, which the store remembers ([`crate::query::audit::govern`]),
/// else the store's own `DIR/icr.toml`. The door that takes a question
/// chooses it, never the request: a question naming another configuration
/// is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    path: PathBuf,
    /// The store's own `DIR/icr.toml`, which may be absent (the defaults,
    /// and no authority). Any other file must be there, and root's alone.
    own: bool,
}

/// What a [`StoreConfig`] holds now: the configuration, and the SHA-256 of
/// its file (recorded with every audit entry it authorises; `None` when the
/// store has no file and the defaults apply).
pub struct LoadedConfig {
    pub config: Config,
    pub sha256: Option<String>,
}

impl StoreConfig {
    /// The configuration that governs the store in `db` now: the file its
    /// agent recorded, else the store's own `DIR/icr.toml`.
    pub fn of_store(db: &Path) -> Result<Self> {
        Ok(match crate::store::governing::remembered(db)? {
            Some(path) => Self { path, own: false },
            None => Self::own(db),
        })
    }

    /// `DIR/icr.toml`.
    fn own(db: &Path) -> Self {
        Self { path: db.join("icr.toml"), own: true }
    }

    /// The agent's: its configuration file, else the store's own.
    pub fn of_agent(db: &Path, config_file: Option<&Path>) -> Self {
        config_file.map_or_else(|| Self::own(db), |path| Self { path: path.to_path_buf(), own: false })
    }

    /// The configuration an agent (or a storing replay) names: `config_file`
    /// as a canonical path, or the store's own `DIR/icr.toml`. Recording it
    /// in the store is [`crate::query::audit::govern`].
    pub fn named(db: &Path, config_file: Option<&Path>) -> Result<Self> {
        Ok(match config_file {
            None => Self::own(db),
            Some(file) => {
                let path = std::fs::canonicalize(file)
                    .with_context(|| format!("finding the configuration {}", file.display()))?;
                Self { path, own: false }
            }
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file an agent names to its doors: `None` for the store's own.
    pub fn agent_file(&self) -> Option<&Path> {
        (!self.own).then_some(self.path.as_path())
    }

    /// Whether `named` (a request's `--config`) is this configuration.
    pub fn is(&self, named: &Path) -> bool {
        let canonical = |path: &Path| std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        canonical(named) == canonical(&self.path)
    }

    /// Reads it now (authorities change without a restart); a store without
    /// a configuration file of its own has the defaults, and no authority.
    pub fn load(&self) -> Result<LoadedConfig> {
        let reading = || format!("reading the configuration {}", self.path.display());
        let mut file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound && self.own => {
                return Ok(LoadedConfig { config: Config::default(), sha256: None });
            }
            Err(error) => return Err(error).with_context(reading),
        };
        // The file read is the file checked: its handle, not its name,
        // which another file could take in between.
        if !self.own {
            only_root_may_write(&self.path, &file.metadata().with_context(reading)?)?;
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut bytes).with_context(reading)?;
        let text = String::from_utf8(bytes)
            .with_context(|| format!("the configuration {} is not UTF-8", self.path.display()))?;
        let config = Config::parse(&text).with_context(|| format!("in the configuration {}", self.path.display()))?;
        let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes()));
        Ok(LoadedConfig { config, sha256: Some(sha256) })
    }
}

/// A configuration that authorises questions must be root's, and writable
/// by root alone: whoever could write it could grant themselves an
/// authority.
pub fn only_root_may_write(path: &Path, metadata: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    if metadata.uid() != 0 || metadata.mode() & 0o022 != 0 {
        bail!(
            "the configuration {} authorises questions: it must be owned by root and writable by root alone \
             (chown root; chmod go-w); it is uid {} mode {:o}",
            path.display(),
            metadata.uid(),
            metadata.mode() & 0o7777
        );
    }
    Ok(())
}

/// The configuration every command reads unless `--config FILE` names
/// another.
pub const DEFAULT_PATH: &str = "/etc/icr/icr.toml";

/// Where a command's configuration came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `--config FILE`, or [`DEFAULT_PATH`] when no file is named.
    File(PathBuf),
    /// The store's own `DIR/icr.toml`: no file named and none at the
    /// default path.
    Store(PathBuf),
    /// No file at all: the defaults.
    Defaults,
}

impl Source {
    /// The file read, if any.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Self::File(path) | Self::Store(path) => Some(path),
            Self::Defaults => None,
        }
    }

    /// The file an agent names to its doors (which re-read it for every
    /// request): `None` for the store's own, which is found again from the
    /// store, and for none.
    pub fn agent_file(&self) -> Option<&Path> {
        match self {
            Self::File(path) => Some(path),
            Self::Store(_) | Self::Defaults => None,
        }
    }
}

/// A command's configuration, and where it came from.
#[derive(Clone, Debug)]
pub struct Chosen {
    pub config: Config,
    pub source: Source,
}

impl Chosen {
    /// The store a command works on: its `--db`, else the configuration's
    /// `db`.
    pub fn db(&self, flag: Option<&Path>) -> Result<PathBuf> {
        match (flag, self.config.db.as_deref()) {
            (Some(dir), _) | (None, Some(dir)) => Ok(dir.to_path_buf()),
            (None, None) => match self.source.file() {
                Some(file) => {
                    bail!("name the store: --db DIR, or db = \"DIR\" in the configuration {}", file.display())
                }
                None => bail!("name the store: --db DIR, or db = \"DIR\" in the configuration {DEFAULT_PATH} (absent)"),
            },
        }
    }
}

impl Config {
    /// The configuration a command reads: `named` (`--config FILE`), else
    /// [`DEFAULT_PATH`] if it exists; else, for the store in `db` (the
    /// command's `--db`), the configuration it remembers (its agent's), else
    /// its own `DIR/icr.toml` if present; else the defaults.
    pub fn choose(named: Option<&Path>, db: Option<&Path>) -> Result<Chosen> {
        let default = Path::new(DEFAULT_PATH);
        let source = match (named, db) {
            (Some(path), _) => Source::File(path.to_path_buf()),
            (None, _) if exists(default)? => Source::File(default.to_path_buf()),
            (None, Some(db)) => match crate::store::governing::remembered(db)? {
                Some(remembered) => Source::File(remembered),
                None if exists(&db.join("icr.toml"))? => Source::Store(db.join("icr.toml")),
                None => Source::Defaults,
            },
            (None, None) => Source::Defaults,
        };
        let config = match source.file() {
            Some(path) => Self::read(path)?,
            None => Self::default(),
        };
        Ok(Chosen { config, source })
    }

    /// The configuration in the file at `path`, checked.
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading the configuration {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in the configuration {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let config: Config = toml::from_str(text).map_err(|error| anyhow::anyhow!(one_line(&error, text)))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if self.retention_days > MAX_RETENTION_DAYS {
            bail!("retention_days = {} exceeds the maximum of {MAX_RETENTION_DAYS} (12 months)", self.retention_days);
        }
        if self.retention_days == 0 {
            bail!("retention_days must be at least 1");
        }
        if self.probe_id.as_deref().is_some_and(|id| id.trim().is_empty() || id.len() > 255) {
            bail!("probe_id must be a name of 1 to 255 bytes");
        }
        if self.max_window_days == 0 || self.max_window_days > MAX_RETENTION_DAYS {
            bail!("max_window_days must be between 1 and {MAX_RETENTION_DAYS}");
        }
        if self.max_selector_v4 > 32 || self.max_selector_v6 > 128 {
            bail!("max_selector_v4 is a prefix length of 0 to 32, max_selector_v6 one of 0 to 128");
        }
        let mut names = std::collections::BTreeSet::new();
        for authority in &self.authorities {
            if authority.name.trim().is_empty() {
                bail!("an [[authority]] has an empty name: every authority must be named");
            }
            // Requests name their authority: two of one name would let a
            // token of the second be taken for the first.
            if !names.insert(authority.name.as_str()) {
                bail!("authority {:?} is configured twice: names must be unique", authority.name);
            }
        }
        if let Some(listen) = self.http.listen
            && self.http.cert.is_none()
            && self.http.key.is_none()
            && !listen.ip().is_loopback()
        {
            bail!(
                "[http] listen = \"{listen}\" without cert and key would take bearer tokens in clear over the network: \
                 plain HTTP is allowed on loopback only (127.0.0.0/8, ::1); set cert and key for HTTPS"
            );
        }
        self.http.validate()?;
        let ring = self.probe.event_ring_bytes;
        if !ring.is_power_of_two() || !(64 << 10..=1 << 30).contains(&ring) {
            bail!("[probe] event_ring_bytes = {ring} must be a power of two from 65536 (64 KiB) to 1073741824 (1 GiB)");
        }
        if !(1..=86_400).contains(&self.store.write_queue) {
            bail!("[store] write_queue = {} must be between 1 and 86400 (ticks of records)", self.store.write_queue);
        }
        if self.probe.nat_destroyed_kept == 0 {
            bail!("[probe] nat_destroyed_kept = 0: at least one mapping must be kept for flows that close after it");
        }
        if !(1..=1 << 20).contains(&self.store.cache_mb) {
            bail!("[store] cache_mb = {} must be between 1 and 1048576 (MiB)", self.store.cache_mb);
        }
        if let Some(clickhouse) = &self.clickhouse {
            clickhouse.validate()?;
        }
        if let Some(ipfix) = &self.ipfix {
            ipfix.validate()?;
        }
        Ok(())
    }

    /// What `icr config check` adds to parsing: every file the
    /// configuration names is there (secrets root's alone and outside the
    /// store), so that a restart does not find one missing. The store and
    /// the pin directory are made by the agent.
    pub fn check_files(&self) -> Result<()> {
        let store = self.db.as_deref();
        if let Some(key) = &self.audit.key {
            check_secret(key, "[audit] key", store)?;
        }
        let clickhouse = self.clickhouse.as_ref();
        if let Some(password) = clickhouse.and_then(|section| section.password_file.as_ref()) {
            check_secret(password, "[clickhouse] password_file", store)?;
        }
        for (what, path) in [
            ("[clickhouse] ca", clickhouse.and_then(|section| section.ca.as_ref())),
            ("[http] cert", self.http.cert.as_ref()),
            ("[http] key", self.http.key.as_ref()),
            ("[audit] journal", self.audit.journal.as_ref()),
            ("[subscribers] static", self.subscribers.static_csv.as_ref()),
            ("[subscribers] dnsmasq_leases", self.subscribers.dnsmasq_leases.as_ref()),
            ("[subscribers] kea_leases", self.subscribers.kea_leases.as_ref()),
        ] {
            if let Some(path) = path {
                std::fs::metadata(path).with_context(|| format!("{what} names {}", path.display()))?;
            }
        }
        Ok(())
    }

    /// The name records of this gateway carry: `probe_id`, else the host
    /// name.
    pub fn probe_id(&self) -> String {
        match &self.probe_id {
            Some(id) => id.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|name| name.trim().to_string())
                .unwrap_or_default(),
        }
    }

    pub fn authority(&self, name: &str) -> Option<&Authority> {
        self.authorities.iter().find(|a| a.name == name)
    }

    pub fn flow_timeouts(&self) -> Timeouts {
        let TimeoutsSection { tcp_closed, tcp_idle, udp_idle, active, full_sweep } = &self.timeouts;
        Timeouts {
            tcp_closed: tcp_closed.0,
            tcp_idle: tcp_idle.0,
            udp_idle: udp_idle.0,
            active: active.0,
            full_sweep: full_sweep.0,
        }
    }

    /// The configuration as it takes effect, every default written out
    /// (TOML): what `icr config check` prints. Keys without a default that
    /// are not set are left out.
    pub fn effective(&self) -> Result<String> {
        let mut effective = self.clone();
        effective.probe_id = Some(self.probe_id());
        toml::to_string_pretty(&effective).context("writing the configuration as TOML")
    }
}

/// A TOML error on one line, as the command line's reasons are: where,
/// the key (never the value: a misplaced secret is not echoed), and what.
fn one_line(error: &toml::de::Error, text: &str) -> String {
    let message = error.message().trim().replace('\n', " ");
    let Some(before) = error.span().and_then(|span| text.get(..span.start)) else { return message };
    let line = before.matches('\n').count() + 1;
    let key = text
        .lines()
        .nth(line - 1)
        .and_then(|line| line.split_once('='))
        .map(|(key, _)| key.trim())
        .filter(|key| !key.is_empty() && !key.starts_with('['));
    match key {
        Some(key) => format!("line {line} ({key}): {message}"),
        None => format!("line {line}: {message}"),
    }
}

/// Whether `path` exists; an error (not "no") when that cannot be found
/// out, so that an unreadable /etc/icr is not taken for an absent one.
fn exists(path: &Path) -> Result<bool> {
    path.try_exists().with_context(|| format!("looking for {}", path.display()))
}

/// `90s`, `5m`, `2h`, `1h30m`, `250ms`.
pub fn parse_duration(text: &str) -> Result<Duration> {
    humantime::parse_duration(text.trim()).with_context(|| format!("{text:?} is not a duration like 90s, 5m or 2h"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_may_be_read_by_the_agents_own_group_and_no_other() {
        use std::os::unix::fs::{PermissionsExt as _, chown};
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("audit.key");
        std::fs::write(&secret, [7u8; 32]).unwrap();
        // SAFETY: no arguments.
        let (uid, own) = unsafe { (libc::geteuid(), libc::getegid()) };
        if uid != 0 {
            return; // only root can make root's files: the labs run as root
        }
        let check = |gid: u32, mode: u32| {
            chown(&secret, Some(0), Some(gid)).unwrap();
            std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(mode)).unwrap();
            check_secret(&secret, "the key", None).map_err(|e| e.to_string())
        };
        let other = if own == 0 { 1 } else { 0 };
        assert!(check(own, 0o400).is_ok());
        assert!(check(own, 0o440).is_ok(), "the agent's own group");
        let refused = check(other, 0o440).unwrap_err();
        assert!(refused.contains("readable by root only") && refused.contains("chown root:icr"), "{refused}");
        assert!(check(own, 0o444).is_err(), "others may not read it");
        assert!(check(own, 0o460).is_err(), "nor the group write it");
    }

    #[test]
    fn the_documented_example_parses() {
        let config = Config::parse(
            r#"
            retention_days = 365
            [[authority]]
            name = "met-police"
            kind = "police"
            purposes = [1, 2, 3]
            "#,
        )
        .unwrap();
        assert_eq!(config.authority("met-police").unwrap().kind, AuthorityKind::Police);
        assert_eq!(config.flow_timeouts(), Timeouts::default());
    }

    #[test]
    fn more_than_twelve_months_is_refused() {
        let error = Config::parse("retention_days = 366").unwrap_err();
        assert!(format!("{error:#}").contains("exceeds the maximum of 365"), "{error:#}");
    }

    #[test]
    fn typos_bad_purposes_and_bad_durations_are_refused() {
        assert!(Config::parse("retention_dayz = 30").is_err());
        assert!(Config::parse("[[authority]]\nname = \"x\"\nkind = \"police\"\npurposes = [4]").is_err());
        assert!(Config::parse("[[authority]]\nname = \"x\"\nkind = \"sheriff\"").is_err());
        assert!(Config::parse("[timeouts]\ntcp_idle = \"soon\"").is_err());
        let config = Config::parse("[timeouts]\ntcp_idle = \"2m\"\nactive = \"1h\"").unwrap();
        let timeouts = config.flow_timeouts();
        assert_eq!(timeouts.tcp_idle, Duration::from_secs(120));
        assert_eq!(timeouts.active, Duration::from_secs(3600));
    }

    #[test]
    fn memory_bounds_are_configurable_for_a_small_gateway() {
        let config = Config::default();
        assert_eq!((config.store.cache_mb, config.probe.dns_cache_entries), (64, 1 << 16));
        let config = Config::parse("[store]\ncache_mb = 8\n[probe]\ndns_cache_entries = 4096").unwrap();
        assert_eq!((config.store.cache_mb, config.probe.dns_cache_entries), (8, 4096));
        assert!(refusal("[store]\ncache_mb = 0").contains("cache_mb"));
        assert_eq!(config.probe.nat_destroyed_kept, 1 << 16);
        let config = Config::parse("[probe]\nnat_destroyed_kept = 8192").unwrap();
        assert_eq!(config.probe.nat_destroyed_kept, 8192);
        assert!(refusal("[probe]\nnat_destroyed_kept = 0").contains("nat_destroyed_kept"));
    }

    #[test]
    fn the_probe_section_is_the_probes_options() {
        let config =
            Config::parse("[probe]\nflow_table_size = 4096\npin_dir = \"/sys/fs/bpf/x\"\nevents = \"perf\"\nevent_ring_bytes = 131072")
                .unwrap();
        let options = config.probe.probe_options();
        assert_eq!(options.flow_table_size, 4096);
        assert_eq!(options.pin_dir.as_deref(), Some(Path::new("/sys/fs/bpf/x")));
        assert_eq!(options.events, Some(crate::capture::probe::EventPath::Perf));
        assert_eq!(options.event_ring_bytes, 131_072);
    }

    fn refusal(text: &str) -> String {
        format!("{:#}", Config::parse(text).expect_err(text))
    }

    #[test]
    fn duplicate_or_empty_authority_names_and_zero_timeouts_are_refused() {
        let police = "[[authority]]\nname = \"force\"\nkind = \"police\"\npurposes = [1]\n";
        let local = "[[authority]]\nname = \"force\"\nkind = \"local\"\npurposes = [1, 2, 3]\n";
        assert!(refusal(&format!("{police}{local}")).contains("authority \"force\" is configured twice"));
        assert!(refusal("[[authority]]\nname = \" \"\nkind = \"police\"").contains("empty name"));
        assert_eq!(
            refusal("[timeouts]\ntcp_idle = \"0s\""),
            "line 2 (tcp_idle): \"0s\": a duration must be longer than zero"
        );
        assert!(refusal("[probe]\nevent_ring_bytes = 100000").contains("must be a power of two"));
        assert!(Config::parse(police).is_ok());
    }

    #[test]
    fn ipfix_collectors_are_checked_when_the_configuration_is_read() {
        let config = Config::parse(
            "[ipfix]\ncollectors = [\"udp://10.0.0.9:4739\", \"tcp://[2001:db8::9]:4739\"]\nobservation_domain = 7\n",
        )
        .unwrap();
        let ipfix = config.ipfix.unwrap();
        assert_eq!(ipfix.collectors.len(), 2);
        assert_eq!((ipfix.observation_domain, ipfix.enterprise_number), (7, 32473), "RFC 5612's number by default");
        assert_eq!(ipfix.template_interval, Span(Duration::from_secs(60)));
        assert!(refusal("[ipfix]\ncollectors = [\"10.0.0.9:4739\"]").contains("is not udp://HOST:PORT"));
        assert!(refusal("[ipfix]\ncollectors = []").contains("collectors is empty"));
        assert!(refusal("[ipfix]\ncollectors = [\"udp://a:1\"]\nenterprise_number = 0").contains("enterprise_number"));
        assert!(refusal("[ipfix]\ncollectors = [\"udp://a:1\"]\ncollector = \"x\"").contains("unknown field"));
    }

    #[test]
    fn a_clickhouse_url_with_credentials_is_refused_without_showing_them() {
        for url in [
            "https://icr:s3cret@10.0.0.5:8443",
            "http://10.0.0.5:8123/?password=s3cret",
            "http://10.0.0.5:8123/?user=icr",
        ] {
            let refused = refusal(&format!("[clickhouse]\nurl = \"{url}\"\n"));
            assert!(refused.contains("carries credentials") && !refused.contains("s3cret"), "{refused}");
        }
        assert!(
            refusal("[clickhouse]\nurl = \"https://10.0.0.5:8443\"\nuser = \"a b\"\n")
                .contains("is not a ClickHouse user name")
        );
        assert!(
            refusal("[clickhouse]\nurl = \"https://10.0.0.5:8443\"\npassword = \"s3cret\"\n").contains("unknown field")
        );
        let config = Config::parse(
            "[clickhouse]\nurl = \"https://10.0.0.5:8443\"\ncluster = \"icr\"\nuser = \"icr_gw07\"\n\
             password_file = \"/etc/icr/clickhouse.password\"\nca = \"/etc/icr/clickhouse-ca.pem\"\n",
        )
        .unwrap();
        assert_eq!(config.clickhouse.unwrap().user.as_deref(), Some("icr_gw07"));
    }

    #[test]
    fn the_effective_configuration_writes_every_default_and_loads_again_as_itself() {
        let config =
            Config::parse("probe_id = \"gw\"\n[timeouts]\nactive = \"90m\"\n[http]\nconsole_idle = \"2m\"").unwrap();
        assert_eq!(config.flow_timeouts().active, Duration::from_secs(90 * 60));
        assert_eq!(config.http.console_idle, Span(Duration::from_secs(120)));
        let effective = config.effective().unwrap();
        for line in [
            "retention_days = 365",
            "tcp_idle = \"5m\"",
            "active = \"1h 30m\"",
            "max_connections = 64",
            "cache_mb = 64",
        ] {
            assert!(effective.lines().any(|l| l == line), "{line} in {effective}");
        }
        assert_eq!(Config::parse(&effective).unwrap().effective().unwrap(), effective);
        assert!(refusal("[http]\nrequest_timeout = \"0s\"").contains("must be longer than zero"));
        assert!(refusal("[http]\nmax_connections = 0").contains("[http] max_connections must be at least 1"));
    }

    #[test]
    fn a_flag_names_the_store_before_the_configuration() {
        let chosen = |db: Option<&str>| Chosen {
            config: Config { db: db.map(PathBuf::from), ..Config::default() },
            source: Source::File(PathBuf::from("/etc/x.toml")),
        };
        assert_eq!(chosen(Some("/a")).db(None).unwrap(), PathBuf::from("/a"));
        assert_eq!(chosen(Some("/a")).db(Some(Path::new("/b"))).unwrap(), PathBuf::from("/b"));
        let refused = format!("{:#}", chosen(None).db(None).unwrap_err());
        assert!(
            refused.contains("name the store: --db DIR, or db = \"DIR\" in the configuration /etc/x.toml"),
            "{refused}"
        );
    }

    #[test]
    fn plain_http_is_refused_off_loopback() {
        assert!(refusal("[http]\nlisten = \"0.0.0.0:8080\"").contains("plain HTTP is allowed on loopback only"));
        assert!(refusal("[http]\nlisten = \"[2001:db8::1]:8080\"").contains("plain HTTP is allowed on loopback only"));
        assert!(Config::parse("[http]\nlisten = \"127.0.0.1:8080\"").is_ok());
        assert!(Config::parse("[http]\nlisten = \"[::1]:8080\"").is_ok());
        assert!(
            Config::parse("[http]\nlisten = \"0.0.0.0:8443\"\ncert = \"/etc/icr/c.pem\"\nkey = \"/etc/icr/k.pem\"")
                .is_ok()
        );
    }
}

/// The largest request body: a query's parameters (1 MiB), with room for
/// JSON's quoting.
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// `[http]`: the HTTP API.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    /// Address to serve on, e.g. "127.0.0.1:8443".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain and key: HTTPS when both are set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Open connections at most; one more is closed at once.
    pub max_connections: usize,
    /// How long a client may take to send its TLS handshake, its headers, and
    /// then its body, each.
    pub request_timeout: Span,
    /// A web console session ends after this long without a request.
    pub console_idle: Span,
    /// Token checks (argon2, 19 MiB each) run at once at most; a request
    /// past them is answered 503.
    pub max_token_checks: usize,
    /// Bytes of request bodies held at once over all connections; a body
    /// past it is answered 503.
    pub max_body_bytes_in_flight: usize,
    /// Console sessions one authority may have at once; signing in past it
    /// ends that authority's idlest session, never another's.
    pub console_sessions: usize,
    /// Bytes of answers a console session keeps for its pages and
    /// downloads; past it the oldest answers are dropped.
    pub console_answer_bytes: usize,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            listen: None,
            cert: None,
            key: None,
            max_connections: 64,
            request_timeout: Span(Duration::from_secs(10)),
            console_idle: Span(Duration::from_secs(15 * 60)),
            max_token_checks: 2,
            max_body_bytes_in_flight: 8 << 20,
            console_sessions: 8,
            console_answer_bytes: 64 << 20,
        }
    }
}

impl HttpSection {
    fn validate(&self) -> Result<()> {
        for (key, count) in [
            ("max_connections", self.max_connections),
            ("max_token_checks", self.max_token_checks),
            ("max_body_bytes_in_flight", self.max_body_bytes_in_flight),
            ("console_sessions", self.console_sessions),
            ("console_answer_bytes", self.console_answer_bytes),
        ] {
            if count == 0 {
                bail!("[http] {key} must be at least 1");
            }
        }
        // One request's body must fit: a smaller budget would refuse it always.
        let bytes = self.max_body_bytes_in_flight;
        if bytes < MAX_BODY_BYTES {
            bail!("[http] max_body_bytes_in_flight = {bytes} must be at least {} (one request's body)", MAX_BODY_BYTES);
        }
        // The semaphore that counts them holds at most this many.
        if bytes > u32::MAX as usize {
            bail!("[http] max_body_bytes_in_flight = {bytes} must be at most {}", u32::MAX);
        }
        Ok(())
    }
}

/// `[audit]` in the configuration.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// A file of at least 32 random bytes, outside the store, owned by root
    /// and readable by root only: each entry is authenticated with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// The system journal's socket, where each entry's head is sent (default
    /// `/run/systemd/journal/socket`, when it exists).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal: Option<PathBuf>,
}

/// `[metrics]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Address to serve `/metrics` on, e.g. "127.0.0.1:9464".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}
