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
};

use anyhow::{Context as _, Result, bail};
use icr_test_kit::clickhouse::{Server, Setup, ask};

use crate::{Lab, ip, next_prefix, output};

pub const HTTP_PORT: u16 = 18123;
/// Every shard's HTTPS port, when [`ClickHouseCluster::start_secured`].
pub const HTTPS_PORT: u16 = 18443;
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
    shards: Vec<Server>,
    links: usize,
    /// With password users and HTTPS: the CA that signed every shard's
    /// certificate.
    pub ca: Option<PathBuf>,
}

/// A ClickHouse user of a secured cluster, as docs/cluster.md's "ClickHouse
/// users" sets them up.
#[derive(Clone, Copy, Debug)]
pub struct User {
    pub name: &'static str,
    pub password: &'static str,
}

/// May do anything (init, sweep); the shards use it between themselves.
pub const ADMIN: User = User { name: "icr_admin", password: "admin-Secret-1" };
/// A gateway's: may insert into `icr_ingest` only.
pub const GATEWAY: User = User { name: "icr_gw07", password: "gateway-Secret-7" };
/// The query service's: reads `icr`, read-only.
pub const QUERY: User = User { name: "icr_query", password: "query-Secret-2" };

impl ClickHouseCluster {
    /// Starts `shards` servers and waits until each answers over HTTP.
    pub fn start(shards: usize) -> Result<Self> {
        Self::start_with(shards, false)
    }

    /// Starts `shards` servers with the users [`ADMIN`], [`GATEWAY`] and
    /// [`QUERY`] (and no `default` user), each also on HTTPS with a
    /// certificate of a CA made here.
    pub fn start_secured(shards: usize) -> Result<Self> {
        Self::start_with(shards, true)
    }

    fn start_with(shards: usize, secured: bool) -> Result<Self> {
        let prefix = next_prefix();
        let ns = format!("{prefix}-ch");
        let dir = std::env::temp_dir().join(&ns);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let mut cluster = Self { ns: ns.clone(), dir, shards: Vec::new(), links: 0, ca: None };
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        for shard in 0..shards {
            ip(&["-n", &ns, "addr", "add", &format!("{}/32", Self::address(shard)), "dev", "lo"])?;
        }
        // Shards ask each other as the admin user when there is no default one.
        let between = if secured {
            format!("<user>{}</user><password>{}</password>", ADMIN.name, ADMIN.password)
        } else {
            String::new()
        };
        let replicas: String = (0..shards)
            .map(|s| {
                format!(
                    "<shard><replica><host>{}</host><port>{}</port>{between}</replica></shard>",
                    Self::address(s),
                    TCP_PORT + s as u16
                )
            })
            .collect();
        let users = if secured {
            cluster.ca = Some(cluster.make_certificates(shards)?);
            let users = cluster.dir.join("users.xml");
            fs::write(&users, users_xml()?)?;
            users
        } else {
            PathBuf::from("/etc/clickhouse-server/users.xml")
        };
        for shard in 0..shards {
            let https = if secured {
                let c = cluster.dir.display();
                format!(
                    "<https_port>{HTTPS_PORT}</https_port>\n  <openSSL><server><certificateFile>{c}/shard{shard}.pem</certificateFile>\
                     <privateKeyFile>{c}/shard{shard}.key</privateKeyFile><verificationMode>none</verificationMode>\
                     <loadDefaultCAFile>false</loadDefaultCAFile><disableProtocols>sslv2,sslv3,tlsv1,tlsv1_1</disableProtocols>\
                     </server></openSSL>\n  "
                )
            } else {
                String::new()
            };
            let server = Server::start(Setup {
                dir: cluster.dir.join(format!("shard{shard}")),
                host: Self::address(shard),
                http_port: HTTP_PORT,
                tcp_port: TCP_PORT + shard as u16,
                users: users.clone(),
                mark_cache_size: 256 << 20,
                more_xml: format!("{https}<remote_servers><{CLUSTER}>{replicas}</{CLUSTER}></remote_servers>"),
                netns: Some(ns.clone()),
                login: secured.then(|| (ADMIN.name.to_string(), ADMIN.password.to_string())),
            })
            .with_context(|| format!("ClickHouse shard {shard}"))?;
            cluster.shards.push(server);
        }
        Ok(cluster)
    }

    /// A CA, and a certificate of it for each shard's address; the CA's path.
    fn make_certificates(&self, shards: usize) -> Result<PathBuf> {
        let openssl = |args: &[&str]| -> Result<()> {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&self.dir)
                .stdin(Stdio::null())
                .output()
                .context("running openssl")?;
            if !out.status.success() {
                bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &["-days", "2", "-subj", "/CN=icr lab ClickHouse CA", "-keyout", "ca.key", "-out", "ca.pem"],
            ]
            .concat(),
        )?;
        for shard in 0..shards {
            let (key, csr, pem, ext) = (
                format!("shard{shard}.key"),
                format!("shard{shard}.csr"),
                format!("shard{shard}.pem"),
                format!("shard{shard}.ext"),
            );
            let address = Self::address(shard);
            openssl(
                &[&["req"][..], &ec, &["-subj", &format!("/CN={address}"), "-keyout", &key, "-out", &csr]].concat(),
            )?;
            fs::write(self.dir.join(&ext), format!("subjectAltName=IP:{address}\n"))?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &pem,
            ])?;
        }
        Ok(self.dir.join("ca.pem"))
    }

    fn address(shard: usize) -> String {
        format!("10.99.0.{}", shard + 1)
    }

    /// The HTTP interface of `shard`.
    pub fn url(&self, shard: usize) -> String {
        format!("http://{}:{HTTP_PORT}", Self::address(shard))
    }

    /// The HTTPS interface of `shard` (a secured cluster's).
    pub fn https_url(&self, shard: usize) -> String {
        format!("https://{}:{HTTPS_PORT}", Self::address(shard))
    }

    /// Starts `shard` again and waits until it answers.
    pub fn start_shard(&mut self, shard: usize) -> Result<()> {
        self.shards[shard].restart()
    }

    /// Stops `shard` (SIGTERM) and waits for it.
    pub fn stop_shard(&mut self, shard: usize) -> Result<()> {
        self.shards[shard].stop()
    }

    /// Runs `sql` on the node at `url`; its text answer. A secured
    /// cluster is asked as [`ADMIN`].
    pub fn query_at(&self, url: &str, sql: &str) -> Result<String> {
        match self.ca {
            Some(_) => self.query_as(ADMIN, url, sql),
            None => ask(Some(&self.ns), &[], url, sql),
        }
    }

    /// Runs `sql` as `user` (basic authentication; `https://` verified with
    /// the cluster's CA); its text answer, or ClickHouse's error.
    pub fn query_as(&self, user: User, url: &str, sql: &str) -> Result<String> {
        let credentials = format!("{}:{}", user.name, user.password);
        let mut args = vec!["-u".to_string(), credentials];
        if let Some(ca) = &self.ca {
            args.extend(["--cacert".to_string(), ca.display().to_string()]);
        }
        ask(Some(&self.ns), &args, url, sql)
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
        wrapped
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {:?} in {}", command.get_program(), self.ns))
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

/// The users of a secured cluster (ClickHouse 18.16's users.xml;
/// docs/cluster.md, "ClickHouse users"): no `default` user at all.
fn users_xml() -> Result<String> {
    let sha256 = |text: &str| -> Result<String> {
        let out = Command::new("openssl")
            .args(["dgst", "-sha256", "-r"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                child.stdin.take().expect("piped").write_all(text.as_bytes())?;
                child.wait_with_output()
            })?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .context("openssl dgst says nothing")?
            .to_string())
    };
    let user = |user: User, profile: &str, database: Option<&str>| -> Result<String> {
        let hash = sha256(user.password)?;
        let databases = database
            .map(|d| format!("<allow_databases><database>{d}</database></allow_databases>"))
            .unwrap_or_default();
        Ok(format!(
            "<{0}><password_sha256_hex>{hash}</password_sha256_hex><networks><ip>::/0</ip></networks>\
             <profile>{profile}</profile><quota>default</quota>{databases}</{0}>",
            user.name
        ))
    };
    Ok(format!(
        "<yandex>\n<profiles><default></default><gateway><readonly>0</readonly><allow_ddl>0</allow_ddl></gateway>\
         <query><readonly>1</readonly></query></profiles>\n\
         <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows>\
         <read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>\n<users>{}{}{}</users>\n</yandex>\n",
        user(ADMIN, "default", None)?,
        user(GATEWAY, "gateway", Some("icr_ingest"))?,
        user(QUERY, "query", Some("icr"))?,
    ))
}

impl Drop for ClickHouseCluster {
    fn drop(&mut self) {
        // The servers first (their own Drop), then whatever else runs there.
        self.shards.clear();
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
