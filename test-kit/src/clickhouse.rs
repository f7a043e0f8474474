//! One `clickhouse-server` (Debian's package) of our own: its data, logs and
//! config.xml in a directory of the caller's, optionally inside a network
//! namespace; stopped when dropped. The store bench runs one on loopback,
//! the lab's provider cluster one per shard.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{patience, wait_for};

/// The server-wide compression of every part (config.xml's `<compression>`;
/// 18.16 has no per-column codecs), as docs/cluster.md advises it.
pub const COMPRESSION_XML: &str = include_str!("clickhouse-compression.xml");

/// What [`COMPRESSION_XML`] is, for a bench's output: the method and level.
pub fn compression() -> String {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        COMPRESSION_XML.split_once(&open).and_then(|(_, rest)| rest.split_once('<')).map_or("?", |(value, _)| value)
    };
    format!("server-wide {} level {}", tag("method"), tag("level"))
}

/// How one server is set up.
#[derive(Clone, Debug)]
pub struct Setup {
    /// Its config.xml, data, temporary files and logs.
    pub dir: PathBuf,
    /// The address it listens on.
    pub host: String,
    pub http_port: u16,
    pub tcp_port: u16,
    /// Its users.xml.
    pub users: PathBuf,
    pub mark_cache_size: u64,
    /// More of config.xml (`<https_port>`, `<remote_servers>`, ...).
    pub more_xml: String,
    /// The network namespace it runs in (and is asked from).
    pub netns: Option<String>,
    /// User and password it is asked as; `None`: the `default` user.
    pub login: Option<(String, String)>,
}

impl Setup {
    /// A server on loopback with Debian's users, on ports of our own
    /// unlikely to be taken (the pid picks them).
    pub fn loopback(dir: &Path) -> Self {
        let port = 20_000 + (std::process::id() % 20_000) as u16;
        Self {
            dir: dir.to_path_buf(),
            host: "127.0.0.1".into(),
            http_port: port,
            tcp_port: port + 1,
            users: PathBuf::from("/etc/clickhouse-server/users.xml"),
            mark_cache_size: 1 << 30,
            more_xml: String::new(),
            netns: None,
            login: None,
        }
    }

    fn config_xml(&self) -> String {
        let d = self.dir.display();
        format!(
            "<yandex>\n  <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/error.log</errorlog><size>10M</size><count>1</count></logger>\n  \
             <http_port>{}</http_port>\n  <tcp_port>{}</tcp_port>\n  <listen_host>{}</listen_host>\n  \
             <path>{d}/data/</path>\n  <tmp_path>{d}/tmp/</tmp_path>\n  <user_files_path>{d}/user_files/</user_files_path>\n  \
             <users_config>{}</users_config>\n  <default_profile>default</default_profile>\n  \
             <default_database>default</default_database>\n  <mark_cache_size>{}</mark_cache_size>\n  \
             {}\n  {COMPRESSION_XML}</yandex>\n",
            self.http_port,
            self.tcp_port,
            self.host,
            self.users.display(),
            self.mark_cache_size,
            self.more_xml,
        )
    }
}

pub struct Server {
    setup: Setup,
    child: Option<Child>,
}

impl Server {
    /// Writes its config.xml, starts it and waits until it answers.
    pub fn start(setup: Setup) -> Result<Self> {
        fs::create_dir_all(setup.dir.join("tmp"))?;
        fs::write(setup.dir.join("config.xml"), setup.config_xml())?;
        let mut server = Self { setup, child: None };
        server.restart()?;
        Ok(server)
    }

    /// Starts it (again, after [`Server::stop`]) and waits until it answers.
    pub fn restart(&mut self) -> Result<()> {
        let dir = self.setup.dir.clone();
        let log = fs::File::create(dir.join("stdout.log"))?;
        // `ip netns exec` execs the server: the child's pid is the server's.
        let mut command = crate::netns::command_in(self.setup.netns.as_deref(), "clickhouse-server");
        let child = command
            .arg("--config-file")
            .arg(dir.join("config.xml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context(
                "starting clickhouse-server (Debian's clickhouse-server package; `cargo xtask setup` installs it)",
            )?;
        self.child = Some(child);
        wait_for(patience(Duration::from_secs(60)), &format!("clickhouse-server at {} to answer", self.url()), || {
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "clickhouse-server at {} exited ({status}): {}",
                    self.url(),
                    fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
            }
            Ok(self.query("SELECT 1").is_ok_and(|answer| answer.trim() == "1"))
        })
    }

    /// Stops it (SIGTERM) and waits for it.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child, not yet waited for.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait()?;
        }
        Ok(())
    }

    /// Its HTTP interface.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.setup.host, self.setup.http_port)
    }

    /// `sql`'s text answer, asked as the setup's login.
    pub fn query(&self, sql: &str) -> Result<String> {
        self.query_within(sql, ANSWER_WITHIN)
    }

    /// [`Self::query`] for a statement that may take longer than a question
    /// (a merge of a day of a large gateway), waited for up to `limit`.
    pub fn query_within(&self, sql: &str, limit: Duration) -> Result<String> {
        let login =
            self.setup.login.iter().flat_map(|(user, password)| ["-u".to_string(), format!("{user}:{password}")]);
        ask_within(self.setup.netns.as_deref(), &login.collect::<Vec<_>>(), &self.url(), sql, limit)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// `sql` POSTed to `url` by curl (from namespace `netns`, with curl's
/// `extra` arguments: credentials, a CA); its text answer, or ClickHouse's
/// error.
pub fn ask(netns: Option<&str>, extra: &[String], url: &str, sql: &str) -> Result<String> {
    ask_within(netns, extra, url, sql, ANSWER_WITHIN)
}

/// How long [`ask`] waits for an answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// [`ask`], waiting up to `limit` for the answer.
pub fn ask_within(netns: Option<&str>, extra: &[String], url: &str, sql: &str, limit: Duration) -> Result<String> {
    let mut command = crate::netns::command_in(netns, "curl");
    let out = command
        .args(["-sS", "--fail-with-body", "--max-time", &limit.as_secs().max(1).to_string()])
        .args(extra)
        .args(["--data-binary", sql, url])
        .stdin(Stdio::null())
        .output()
        .context("running curl")?;
    if !out.status.success() {
        bail!("{sql}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
