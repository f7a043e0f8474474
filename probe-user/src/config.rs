//! The configuration file (TOML, `docs/cli.md`): retention, authorities,
//! and the probe's tunables. Unknown keys are refused so a typo cannot
//! silently weaken a safeguard.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::capture::flow::Timeouts;

/// Twelve months: the legal maximum; a longer retention is refused.
pub use crate::store::MAX_RETENTION_DAYS;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_retention")]
    pub retention_days: u32,
    #[serde(default, rename = "authority")]
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
    #[serde(default)]
    pub probe_id: Option<String>,
    /// Where records and gaps are shipped for provider-wide questions.
    #[serde(default)]
    pub clickhouse: Option<ClickHouseSection>,
    /// The running agent's local query socket (default `DIR/icr.sock`).
    /// Root, the agent's user and the members of the socket's group may
    /// connect (the package's `/run/icr/icr.sock` is the group icr-query's).
    #[serde(default)]
    pub socket: Option<PathBuf>,
}

/// `[clickhouse]`: a cluster (or one server) that every record and gap is
/// shipped to.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseSection {
    /// The HTTP interface of any node, e.g. `https://10.0.0.5:8443`; never
    /// with credentials in it.
    pub url: String,
    /// The `remote_servers` cluster; omitted for one server.
    pub cluster: Option<String>,
    /// The ClickHouse user (ClickHouse's `default` when not given).
    #[serde(default)]
    pub user: Option<String>,
    /// A file holding the user's password alone: root's, 0600 or 0400,
    /// outside the store.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM certificates an `https://` server is verified against (default:
    /// the system's roots).
    #[serde(default)]
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
        crate::export::clickhouse::access::checked_url(&self.url)?;
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

/// Reads a secret file (`what` names it in errors): root's and readable by
/// root only, and outside the store in `store_dir` when there is one
/// (whoever can rewrite the store must not hold it).
pub fn read_secret(path: &Path, what: &str, store_dir: Option<&Path>) -> Result<Vec<u8>> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = std::fs::metadata(path).with_context(|| format!("reading {what} {}", path.display()))?;
    if !metadata.is_file() {
        bail!("{what} {} is not a file", path.display());
    }
    if metadata.uid() != 0 || metadata.mode() & 0o077 != 0 {
        bail!(
            "{what} {} must be owned by root and readable by root only (chmod 0400 or 0600); it is uid {} mode {:o}",
            path.display(),
            metadata.uid(),
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
    std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
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

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Authority {
    pub name: String,
    pub kind: AuthorityKind,
    #[serde(default)]
    pub purposes: Vec<Purpose>,
    /// For HTTP access; never the token itself.
    #[serde(default)]
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

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthorityKind {
    Police,
    Intelligence,
    Approved,
    Local,
    /// Maintenance: may `list` records, and ask none of the three questions.
    Operator,
    /// Reads the audit log; may neither list records nor ask the questions.
    Auditor,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSection {
    /// Capacity of the kernel flow table.
    #[serde(default = "default_flow_table_size")]
    pub flow_table_size: u32,
    /// Pin maps and XDP links here (a bpffs directory, e.g. /sys/fs/bpf/icr):
    /// the probe then keeps counting while the agent restarts or upgrades.
    /// `icr detach --config FILE` removes them.
    #[serde(default)]
    pub pin_dir: Option<std::path::PathBuf>,
    /// How events reach the agent: `"ring"` or `"perf"`. Unset: the ring
    /// buffer where the kernel can (5.18 and later), else perf buffers.
    #[serde(default)]
    pub events: Option<crate::capture::probe::EventPath>,
    /// Size of each CPU's event ring buffer in bytes (a power of two, 64 KiB
    /// to 1 GiB): how long a burst it absorbs while the agent is busy.
    #[serde(default = "default_event_ring_bytes")]
    pub event_ring_bytes: u32,
    /// DNS answers held to name the connections that follow them, all
    /// devices together (about 150 bytes each).
    #[serde(default = "default_dns_cache_entries")]
    pub dns_cache_entries: usize,
}

impl Default for ProbeSection {
    fn default() -> Self {
        Self {
            flow_table_size: default_flow_table_size(),
            pin_dir: None,
            events: None,
            event_ring_bytes: default_event_ring_bytes(),
            dns_cache_entries: default_dns_cache_entries(),
        }
    }
}

fn default_dns_cache_entries() -> usize {
    crate::capture::hints::answers::DEFAULT_MAX_ENTRIES
}

fn default_event_ring_bytes() -> u32 {
    probe_common::EVENT_RING_BYTES
}

/// Durations as `90s`, `5m`, `2h`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsSection {
    pub tcp_closed: Option<String>,
    pub tcp_idle: Option<String>,
    pub udp_idle: Option<String>,
    pub active: Option<String>,
    pub full_sweep: Option<String>,
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

/// The configuration that authorises the queries of a store: the store's
/// own (`DIR/icr.toml`), or the file its agent was started with (`icr run
/// --config FILE`). The door that takes a query chooses it, never the
/// request: a query naming another configuration is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    path: PathBuf,
}

/// What a [`StoreConfig`] holds now: the configuration, and the SHA-256 of
/// its file (recorded with every audit entry it authorises; `None` when the
/// store has no file and the defaults apply).
pub struct LoadedConfig {
    pub config: Config,
    pub sha256: Option<String>,
}

impl StoreConfig {
    /// `DIR/icr.toml`.
    pub fn of_store(db: &Path) -> Self {
        Self { path: db.join("icr.toml") }
    }

    /// The agent's: its `--config FILE`, else the store's own.
    pub fn of_agent(db: &Path, config_file: Option<&Path>) -> Self {
        config_file.map_or_else(|| Self::of_store(db), |path| Self { path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `named` (a request's `--config`) is this configuration.
    pub fn is(&self, named: &Path) -> bool {
        let canonical = |path: &Path| std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        canonical(named) == canonical(&self.path)
    }

    /// Reads it now (authorities change without a restart); a store without
    /// a configuration file has the defaults, and no authority.
    pub fn load(&self) -> Result<LoadedConfig> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(LoadedConfig { config: Config::default(), sha256: None });
            }
            Err(error) => {
                return Err(error).with_context(|| format!("reading the configuration {}", self.path.display()));
            }
        };
        let text = String::from_utf8(bytes)
            .with_context(|| format!("the configuration {} is not UTF-8", self.path.display()))?;
        let config = Config::parse(&text).with_context(|| format!("in the configuration {}", self.path.display()))?;
        let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes()));
        Ok(LoadedConfig { config, sha256: Some(sha256) })
    }
}

impl Config {
    /// `--config FILE` if given, else `DIR/icr.toml` if present, else defaults.
    pub fn load(explicit: Option<&Path>, db: Option<&Path>) -> Result<Self> {
        let path = match (explicit, db) {
            (Some(path), _) => Some(path.to_path_buf()),
            (None, Some(db)) => Some(db.join("icr.toml")).filter(|p| p.exists()),
            (None, None) => None,
        };
        let Some(path) = path else { return Ok(Self::default()) };
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("reading the configuration {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in the configuration {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let config: Config = toml::from_str(text)?;
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
        self.http.max_connections()?;
        self.http.request_timeout()?;
        self.http.console_idle()?;
        self.http.max_token_checks()?;
        self.http.max_body_bytes_in_flight()?;
        self.http.console_sessions()?;
        self.http.console_answer_bytes()?;
        let ring = self.probe.event_ring_bytes;
        if !ring.is_power_of_two() || !(64 << 10..=1 << 30).contains(&ring) {
            bail!("[probe] event_ring_bytes = {ring} must be a power of two from 65536 (64 KiB) to 1073741824 (1 GiB)");
        }
        if !(1..=86_400).contains(&self.store.write_queue) {
            bail!("[store] write_queue = {} must be between 1 and 86400 (ticks of records)", self.store.write_queue);
        }
        if !(1..=1 << 20).contains(&self.store.cache_mb) {
            bail!("[store] cache_mb = {} must be between 1 and 1048576 (MiB)", self.store.cache_mb);
        }
        self.flow_timeouts()?;
        if let Some(clickhouse) = &self.clickhouse {
            clickhouse.validate()?;
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

    pub fn flow_timeouts(&self) -> Result<Timeouts> {
        let defaults = Timeouts::default();
        let t = &self.timeouts;
        Ok(Timeouts {
            tcp_closed: duration(&t.tcp_closed, defaults.tcp_closed, "tcp_closed")?,
            tcp_idle: duration(&t.tcp_idle, defaults.tcp_idle, "tcp_idle")?,
            udp_idle: duration(&t.udp_idle, defaults.udp_idle, "udp_idle")?,
            active: duration(&t.active, defaults.active, "active")?,
            full_sweep: duration(&t.full_sweep, defaults.full_sweep, "full_sweep")?,
        })
    }
}

fn duration(text: &Option<String>, default: Duration, name: &str) -> Result<Duration> {
    match text {
        None => Ok(default),
        Some(text) => match parse_duration(text).with_context(|| format!("timeouts.{name}"))? {
            // A zero timeout would close every flow at its first packet, or
            // sweep without pause.
            zero if zero.is_zero() => bail!("timeouts.{name} = {text:?}: a timeout must be longer than zero"),
            duration => Ok(duration),
        },
    }
}

/// `90s`, `5m`, `2h`, `1h30m`, `250ms`.
pub fn parse_duration(text: &str) -> Result<Duration> {
    humantime::parse_duration(text.trim()).with_context(|| format!("{text:?} is not a duration like 90s, 5m or 2h"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(config.flow_timeouts().unwrap(), Timeouts::default());
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
        let timeouts = config.flow_timeouts().unwrap();
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
        assert!(
            refusal("[timeouts]\ntcp_idle = \"0s\"")
                .contains("timeouts.tcp_idle = \"0s\": a timeout must be longer than zero")
        );
        assert!(refusal("[probe]\nevent_ring_bytes = 100000").contains("must be a power of two"));
        assert!(Config::parse(police).is_ok());
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

/// `[http]`: the HTTP API.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Address to serve on, e.g. "127.0.0.1:8443".
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain and key: HTTPS when both are set.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Open connections at most; one more is closed at once (default 64).
    pub max_connections: Option<usize>,
    /// How long a client may take to send its TLS handshake, its headers, and
    /// then its body, each (default 10s).
    pub request_timeout: Option<String>,
    /// A web console session ends after this long without a request
    /// (default 15m).
    pub console_idle: Option<String>,
    /// Token checks (argon2, 19 MiB each) run at once at most; a request
    /// past them is answered 503 (default 2).
    pub max_token_checks: Option<usize>,
    /// Bytes of request bodies held at once over all connections; a body
    /// past it is answered 503 (default 8 MiB).
    pub max_body_bytes_in_flight: Option<usize>,
    /// Console sessions one authority may have at once; signing in past it
    /// ends that authority's idlest session, never another's (default 8).
    pub console_sessions: Option<usize>,
    /// Bytes of answers a console session keeps for its pages and
    /// downloads; past it the oldest answers are dropped (default 64 MiB).
    pub console_answer_bytes: Option<usize>,
}

/// Default of `[http] max_connections`.
const MAX_CONNECTIONS: usize = 64;
/// Default of `[http] request_timeout`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `[http] console_idle`.
const CONSOLE_IDLE: Duration = Duration::from_secs(15 * 60);
/// Default of `[http] max_token_checks`.
const MAX_TOKEN_CHECKS: usize = 2;
/// Default of `[http] max_body_bytes_in_flight`.
const MAX_BODY_BYTES_IN_FLIGHT: usize = 8 << 20;
/// Default of `[http] console_sessions`.
const CONSOLE_SESSIONS: usize = 8;
/// Default of `[http] console_answer_bytes`.
const CONSOLE_ANSWER_BYTES: usize = 64 << 20;
impl HttpSection {
    pub fn max_connections(&self) -> Result<usize> {
        at_least_one("max_connections", self.max_connections, MAX_CONNECTIONS)
    }

    pub fn max_token_checks(&self) -> Result<usize> {
        at_least_one("max_token_checks", self.max_token_checks, MAX_TOKEN_CHECKS)
    }

    pub fn max_body_bytes_in_flight(&self) -> Result<usize> {
        // One request's body must fit: a smaller budget would refuse it always.
        match at_least_one("max_body_bytes_in_flight", self.max_body_bytes_in_flight, MAX_BODY_BYTES_IN_FLIGHT)? {
            small if small < crate::serve::http::MAX_BODY_BYTES => {
                bail!(
                    "[http] max_body_bytes_in_flight = {small} must be at least {} (one request's body)",
                    crate::serve::http::MAX_BODY_BYTES
                )
            }
            // The semaphore that counts them holds at most this many.
            big if big > u32::MAX as usize => {
                bail!("[http] max_body_bytes_in_flight = {big} must be at most {}", u32::MAX)
            }
            bytes => Ok(bytes),
        }
    }

    pub fn console_sessions(&self) -> Result<usize> {
        at_least_one("console_sessions", self.console_sessions, CONSOLE_SESSIONS)
    }

    pub fn console_answer_bytes(&self) -> Result<usize> {
        at_least_one("console_answer_bytes", self.console_answer_bytes, CONSOLE_ANSWER_BYTES)
    }

    pub fn console_idle(&self) -> Result<Duration> {
        positive_duration("console_idle", self.console_idle.as_deref(), CONSOLE_IDLE)
    }

    pub fn request_timeout(&self) -> Result<Duration> {
        positive_duration("request_timeout", self.request_timeout.as_deref(), REQUEST_TIMEOUT)
    }
}

/// `[http] key`'s count, `default` when not given; zero is refused.
fn at_least_one(key: &str, value: Option<usize>, default: usize) -> Result<usize> {
    match value {
        None => Ok(default),
        Some(0) => bail!("[http] {key} must be at least 1"),
        Some(n) => Ok(n),
    }
}

/// `[http] key`'s duration, `default` when not given; zero is refused.
fn positive_duration(key: &str, text: Option<&str>, default: Duration) -> Result<Duration> {
    let Some(text) = text else { return Ok(default) };
    match parse_duration(text).with_context(|| format!("[http] {key}"))? {
        zero if zero.is_zero() => bail!("[http] {key} = {text:?} must be longer than zero"),
        duration => Ok(duration),
    }
}

/// `[audit]` in the configuration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// A file of at least 32 random bytes, outside the store, owned by root
    /// and readable by root only: each entry is authenticated with it.
    pub key: Option<PathBuf>,
    /// The system journal's socket, where each entry's head is sent (default
    /// `/run/systemd/journal/socket`, when it exists).
    pub journal: Option<PathBuf>,
}

/// `[metrics]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Address to serve `/metrics` on, e.g. "127.0.0.1:9464".
    pub listen: Option<SocketAddr>,
}
