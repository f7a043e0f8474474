//! A provider's ClickHouse cluster for the lab: real `clickhouse-server`
//! processes, one per shard, each with its own data directory, inside a
//! namespace of their own (the provider's network). Every shard listens on
//! its own address, on the same ports, as a deployment's nodes do; a
//! `remote_servers` cluster `icr` lists them. Gateways are linked to it by
//! a veth pair each. Removed, processes and namespace, when dropped.
use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{Lab, ip, next_prefix, output, patience, wait_for};

pub const HTTP_PORT: u16 = 18123;
/// Shard N's native port is this + N. All in one namespace, a replica at one
/// of the server's own addresses *and* its own port would be taken for the
/// server itself (ClickHouse reads such a "local" replica directly), so the
/// ports differ where hosts would in a deployment.
const TCP_PORT: u16 = 19000;
pub const CLUSTER: &str = "icr";

pub struct ClickHouseCluster {
    /// The provider's namespace: the servers run here, and so do the
    /// commands that ask them.
    pub ns: String,
    pub dir: PathBuf,
    shards: Vec<Option<Child>>,
    links: usize,
}

impl ClickHouseCluster {
    /// Starts `shards` servers and waits until each answers over HTTP.
    pub fn start(shards: usize) -> Result<Self> {
        let prefix = next_prefix();
        let ns = format!("{prefix}-ch");
        let dir = std::env::temp_dir().join(&ns);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let mut cluster = Self { ns: ns.clone(), dir, shards: Vec::new(), links: 0 };
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        for shard in 0..shards {
            ip(&["-n", &ns, "addr", "add", &format!("{}/32", Self::address(shard)), "dev", "lo"])?;
        }
        let replicas: String = (0..shards)
            .map(|s| format!("<shard><replica><host>{}</host><port>{}</port></replica></shard>", Self::address(s), TCP_PORT + s as u16))
            .collect();
        for shard in 0..shards {
            let data = cluster.dir.join(format!("shard{shard}"));
            fs::create_dir_all(data.join("tmp"))?;
            let d = data.display();
            fs::write(
                data.join("config.xml"),
                format!(
                    "<yandex>\n  <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/error.log</errorlog><size>10M</size><count>1</count></logger>\n  \
                     <http_port>{HTTP_PORT}</http_port>\n  <tcp_port>{}</tcp_port>\n  <listen_host>{}</listen_host>\n  \
                     <path>{d}/data/</path>\n  <tmp_path>{d}/tmp/</tmp_path>\n  <user_files_path>{d}/user_files/</user_files_path>\n  \
                     <users_config>/etc/clickhouse-server/users.xml</users_config>\n  <default_profile>default</default_profile>\n  \
                     <default_database>default</default_database>\n  <mark_cache_size>268435456</mark_cache_size>\n  \
                     <remote_servers><{CLUSTER}>{replicas}</{CLUSTER}></remote_servers>\n</yandex>\n",
                    TCP_PORT + shard as u16,
                    Self::address(shard)
                ),
            )?;
            cluster.shards.push(None);
            cluster.start_shard(shard)?;
        }
        Ok(cluster)
    }

    fn address(shard: usize) -> String {
        format!("10.99.0.{}", shard + 1)
    }

    /// The HTTP interface of `shard`.
    pub fn url(&self, shard: usize) -> String {
        format!("http://{}:{HTTP_PORT}", Self::address(shard))
    }

    /// Starts `shard` (again) and waits until it answers.
    pub fn start_shard(&mut self, shard: usize) -> Result<()> {
        let data = self.dir.join(format!("shard{shard}"));
        let log = fs::File::create(data.join("stdout.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "clickhouse-server", "--config-file"])
            .arg(data.join("config.xml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting clickhouse-server (Debian's clickhouse-server package)")?;
        self.shards[shard] = Some(child);
        let url = self.url(shard);
        wait_for(patience(Duration::from_secs(60)), &format!("ClickHouse shard {shard} to answer"), || {
            if let Some(Some(child)) = self.shards.get_mut(shard)
                && let Some(status) = child.try_wait()?
            {
                bail!("clickhouse-server of shard {shard} exited ({status}): {}", fs::read_to_string(data.join("error.log")).unwrap_or_default());
            }
            Ok(self.query_at(&url, "SELECT 1").is_ok_and(|answer| answer.trim() == "1"))
        })
    }

    /// Stops `shard` (SIGTERM) and waits for it.
    pub fn stop_shard(&mut self, shard: usize) -> Result<()> {
        if let Some(mut child) = self.shards[shard].take() {
            // `ip netns exec` execs the server: its pid is the server's.
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait()?;
        }
        Ok(())
    }

    /// Runs `sql` on the node at `url`; its text answer.
    pub fn query_at(&self, url: &str, sql: &str) -> Result<String> {
        let out = self.exec(Command::new("curl").args(["-sS", "--fail-with-body", "--max-time", "60", "--data-binary", sql, url]))?;
        if !out.status.success() {
            bail!("{sql}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `command` in the provider's namespace (any outcome).
    pub fn exec(&self, command: &mut Command) -> Result<Output> {
        let mut wrapped = Command::new("ip");
        wrapped.args(["netns", "exec", &self.ns]).arg(command.get_program()).args(command.get_args());
        for (key, value) in command.get_envs() {
            if let Some(value) = value {
                wrapped.env(key, value);
            }
        }
        wrapped.stdin(Stdio::null()).output().with_context(|| format!("running {:?} in {}", command.get_program(), self.ns))
    }

    /// Starts `command` in the provider's namespace, its output in `log_name`.log.
    pub fn spawn(&self, command: &mut Command, log_name: &str) -> Result<Child> {
        let log = fs::File::create(self.dir.join(format!("{log_name}.log")))?;
        let mut wrapped = Command::new("ip");
        wrapped.args(["netns", "exec", &self.ns]).arg(command.get_program()).args(command.get_args());
        wrapped.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        wrapped.spawn().with_context(|| format!("starting {log_name} in {}", self.ns))
    }

    /// Links a lab's gateway to the provider's network: the gateway reaches
    /// every shard through it (and nothing else does).
    pub fn link(&mut self, lab: &Lab) -> Result<()> {
        self.links += 1;
        let (here, there) = (format!("gw{}", self.links), "prov0");
        let net = format!("10.98.{}", self.links);
        ip(&["-n", &self.ns, "link", "add", &here, "type", "veth", "peer", "name", there, "netns", &lab.gateway])?;
        ip(&["-n", &self.ns, "addr", "add", &format!("{net}.1/30"), "dev", &here])?;
        ip(&["-n", &self.ns, "link", "set", &here, "up"])?;
        ip(&["-n", &lab.gateway, "addr", "add", &format!("{net}.2/30"), "dev", there])?;
        ip(&["-n", &lab.gateway, "link", "set", there, "up"])?;
        ip(&["-n", &lab.gateway, "route", "add", "10.99.0.0/24", "via", &format!("{net}.1")])?;
        Ok(())
    }
}

impl Drop for ClickHouseCluster {
    fn drop(&mut self) {
        for shard in 0..self.shards.len() {
            let _ = self.stop_shard(shard);
        }
        if let Ok(pids) = output(Command::new("ip").args(["netns", "pids", &self.ns])) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                // SAFETY: a process inside our own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = output(Command::new("ip").args(["netns", "del", &self.ns]));
        let _ = fs::remove_dir_all(&self.dir);
    }
}
