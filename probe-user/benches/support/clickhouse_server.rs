//! One `clickhouse-server` (Debian's package) for the store bench, on
//! loopback, its data in the bench's directory; stopped when dropped.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// The lab's server-wide compression (tests/lab/src/clickhouse.rs).
const COMPRESSION_XML: &str = include_str!("../../../tests/lab/src/clickhouse-compression.xml");

/// What it is, for the bench's output: the method and level it names.
pub fn compression() -> String {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        COMPRESSION_XML.split_once(&open).and_then(|(_, rest)| rest.split_once('<')).map_or("?", |(value, _)| value)
    };
    format!("server-wide {} level {}", tag("method"), tag("level"))
}

pub struct Server {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Server {
    pub fn start(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join("tmp"))?;
        // Ports of our own, unlikely to be taken: the bench's pid picks them.
        let port = 20_000 + (std::process::id() % 20_000) as u16;
        let d = dir.display();
        std::fs::write(
            dir.join("config.xml"),
            format!(
                "<yandex><logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/error.log</errorlog></logger>\
                 <http_port>{port}</http_port><tcp_port>{}</tcp_port><listen_host>127.0.0.1</listen_host>\
                 <path>{d}/data/</path><tmp_path>{d}/tmp/</tmp_path><user_files_path>{d}/user_files/</user_files_path>\
                 <users_config>/etc/clickhouse-server/users.xml</users_config><default_profile>default</default_profile>\
                 <default_database>default</default_database><mark_cache_size>1073741824</mark_cache_size>{COMPRESSION_XML}</yandex>",
                port + 1
            ),
        )?;
        let log = std::fs::File::create(dir.join("stdout.log"))?;
        let child = Command::new("clickhouse-server")
            .arg("--config-file")
            .arg(dir.join("config.xml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting clickhouse-server (cargo xtask bench installs Debian's clickhouse-server)")?;
        let mut server = Self { child, dir: dir.to_path_buf(), port };
        let started = Instant::now();
        while server.query("SELECT 1").map(|answer| answer.trim() != "1").unwrap_or(true) {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "clickhouse-server exited ({status}): {}",
                    std::fs::read_to_string(server.dir.join("error.log")).unwrap_or_default()
                );
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("clickhouse-server did not answer within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `sql`'s text answer.
    pub fn query(&self, sql: &str) -> Result<String> {
        Ok(ureq::post(&self.url()).send_string(sql)?.into_string()?)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}
