//! The lab: network namespaces with LAN clients, a NAT gateway running the
//! probe, and an "internet" with real servers (nginx over HTTPS, dnsmasq,
//! a TCP exchange server). Used by the integration tests and `cargo xtask demo`.
//!
//! Everything a lab creates is named after its prefix, and removed when the
//! `Lab` is dropped, also when a test fails; labs left by killed runs are
//! removed by the next one.

pub mod browser;
pub mod clickhouse;

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
pub use icr_test_kit::{TempDir, patience, wait_for};
use icr_test_kit::{
    config::{Authority, Config},
    netns::ip,
};

/// Names of everything a lab creates start with this.
const NAME_PREFIX: &str = "icrlab";

pub const LAN_NET: &str = "192.168.50";
pub const GATEWAY_LAN_IP: &str = "192.168.50.1";
/// The gateway's public address: every client is NATed to it.
pub const PUBLIC_IP: &str = "203.0.113.1";
pub const INTERNET_ROUTER_IP: &str = "203.0.113.254";
pub const WEB_IP: &str = "198.51.100.10";
pub const MAIL_IP: &str = "198.51.100.11";
pub const EXCHANGE_IP: &str = "198.51.100.20";
pub const EXCHANGE_PORT: u16 = 9000;
pub const DNS_IP: &str = "198.51.100.53";
pub const WEB_NAME: &str = "www.example.test";
/// The web server's IPv6 address, as DNS gives it (AAAA); not routed in the lab.
pub const WEB_IP6: &str = "2001:db8:100::10";
/// The QUIC server listens on the web server's address, UDP 443.
pub const QUIC_NAME: &str = "quic.example.test";
pub const MAIL_NAME: &str = "mail.example.test";
/// A name for the TCP exchange server, which speaks no TLS or HTTP: its
/// records can only be named from the client's DNS lookups.
pub const EXCHANGE_NAME: &str = "exchange.example.test";
/// A CNAME pointing at the web server.
pub const ALIAS_NAME: &str = "alias.example.test";
/// The exchange server's IPv6 address (AAAA of [`EXCHANGE_NAME`]); it listens
/// there once [`Lab::enable_ipv6`] has routed IPv6.
pub const EXCHANGE_IP6: &str = "2001:db8:100::20";

/// IPv6, once enabled: global addresses on both sides and no NAT, as on a
/// dual-stack line. The LAN is `LAN_NET6::/64`, clients at `::11`, `::12`, ..
pub const LAN_NET6: &str = "2001:db8:50:";
pub const GATEWAY_LAN_IP6: &str = "2001:db8:50::1";
pub const GATEWAY_WAN_IP6: &str = "2001:db8:113::1";
pub const INTERNET_ROUTER_IP6: &str = "2001:db8:113::fe";

/// The gateway's interfaces, as `icr run` is given them.
pub const GATEWAY_WAN_IF: &str = "wan0";

/// The gateway's NAT.
#[derive(Clone, Copy, Debug)]
pub enum Nat {
    /// nftables masquerade to the public address.
    Masquerade,
    /// SNAT of TCP and UDP to the public address and this port range.
    SnatPorts(u16, u16),
}

pub struct Client {
    pub ns: String,
    pub ip: String,
    pub mac: String,
    /// The gateway's port for this client (a bridge port, where XDP runs).
    pub gateway_if: String,
}

pub struct Lab {
    pub prefix: String,
    /// The gateway's public address ([`PUBLIC_IP`] unless chosen).
    pub public_ip: String,
    pub gateway: String,
    pub internet: String,
    pub clients: Vec<Client>,
    /// Configs, logs, the store: removed with the lab.
    pub dir: PathBuf,
    servers: Vec<Child>,
    /// [`Lab::enable_ipv6`] has routed IPv6.
    ipv6: bool,
}

static LABS: AtomicU32 = AtomicU32::new(0);

/// A fresh name for a lab's namespaces (stale ones of dead runs removed).
fn next_prefix() -> String {
    remove_stale_labs();
    format!("{NAME_PREFIX}{}x{}", std::process::id(), LABS.fetch_add(1, Ordering::Relaxed))
}

impl Lab {
    /// Builds the lab (masquerade NAT) and starts its servers.
    pub fn start(clients: usize) -> Result<Self> {
        Self::start_with(clients, Nat::Masquerade)
    }

    /// Builds the lab with the given NAT on the gateway.
    pub fn start_with(clients: usize, nat: Nat) -> Result<Self> {
        Self::start_with_public(clients, nat, PUBLIC_IP)
    }

    /// As [`Lab::start_with`], the gateway's public address `public_ip`
    /// (in 203.0.113.0/24): labs of several gateways of one provider.
    pub fn start_with_public(clients: usize, nat: Nat, public_ip: &str) -> Result<Self> {
        if clients == 0 || clients > 200 {
            bail!("a lab has 1 to 200 clients");
        }
        let prefix = next_prefix();
        let dir = std::env::temp_dir().join(&prefix);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let mut lab = Lab {
            public_ip: public_ip.to_string(),
            gateway: format!("{prefix}-gw"),
            internet: format!("{prefix}-inet"),
            clients: Vec::new(),
            prefix,
            dir,
            servers: Vec::new(),
            ipv6: false,
        };
        // From here on, a failure drops `lab`, which removes what was made.
        lab.build_network(clients, nat).context("building the lab network")?;
        lab.start_servers().context("starting the lab's servers")?;
        Ok(lab)
    }

    fn build_network(&mut self, clients: usize, nat: Nat) -> Result<()> {
        let (gw, inet) = (self.gateway.clone(), self.internet.clone());
        for ns in [&gw, &inet] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        // Gateway ↔ internet.
        ip(&["-n", &gw, "link", "add", GATEWAY_WAN_IF, "type", "veth", "peer", "name", "eth0", "netns", &inet])?;
        ip(&["-n", &gw, "addr", "add", &format!("{}/24", self.public_ip), "dev", GATEWAY_WAN_IF])?;
        ip(&["-n", &gw, "link", "set", GATEWAY_WAN_IF, "up"])?;
        ip(&["-n", &inet, "addr", "add", &format!("{INTERNET_ROUTER_IP}/24"), "dev", "eth0"])?;
        ip(&["-n", &inet, "link", "set", "eth0", "up"])?;
        for server in [WEB_IP, MAIL_IP, EXCHANGE_IP, DNS_IP] {
            ip(&["-n", &inet, "addr", "add", &format!("{server}/32"), "dev", "lo"])?;
        }
        ip(&["-n", &gw, "route", "add", "default", "via", INTERNET_ROUTER_IP])?;

        // The LAN: a bridge on the gateway, one port per client.
        ip(&["-n", &gw, "link", "add", "brlan", "type", "bridge"])?;
        ip(&["-n", &gw, "addr", "add", &format!("{GATEWAY_LAN_IP}/24"), "dev", "brlan"])?;
        ip(&["-n", &gw, "link", "set", "brlan", "up"])?;
        for index in 1..=clients {
            let ns = format!("{}-c{index}", self.prefix);
            let ip_address = format!("{LAN_NET}.{}", 10 + index);
            let mac = format!("02:00:00:00:{:02x}:{:02x}", index / 256, index % 256);
            let port = format!("lan{index}");
            ip(&["netns", "add", &ns])?;
            self.clients.push(Client {
                ns: ns.clone(),
                ip: ip_address.clone(),
                mac: mac.clone(),
                gateway_if: port.clone(),
            });
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &gw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["-n", &gw, "link", "set", &port, "master", "brlan"])?;
            ip(&["-n", &gw, "link", "set", &port, "up"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "address", &mac])?;
            ip(&["-n", &ns, "addr", "add", &format!("{ip_address}/24"), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "route", "add", "default", "via", GATEWAY_LAN_IP])?;
            // `ip netns exec` bind-mounts this over /etc/resolv.conf.
            let etc = Path::new("/etc/netns").join(&ns);
            fs::create_dir_all(&etc)?;
            fs::write(etc.join("resolv.conf"), format!("nameserver {DNS_IP}\n"))?;
        }

        // Routing and NAT on the gateway.
        run(Command::new("ip").args(["netns", "exec", &gw, "sysctl", "-qw", "net.ipv4.ip_forward=1"]))?;
        let action = match nat {
            Nat::Masquerade => "masquerade".to_string(),
            // CGNAT-like: a small port range; conntrack forgets closed connections
            // after 1 s (set below, once the NAT rules have loaded conntrack),
            // so that public ports are soon reused by other devices.
            Nat::SnatPorts(first, last) => format!("snat to {}:{first}-{last}", self.public_ip),
        };
        let rules = self.dir.join("nat.nft");
        fs::write(
            &rules,
            format!(
                "table ip nat {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat;\n    \
                 oifname \"{GATEWAY_WAN_IF}\" ip protocol {{ tcp, udp }} {action}\n    \
                 oifname \"{GATEWAY_WAN_IF}\" masquerade\n  }}\n}}\n"
            ),
        )?;
        run(Command::new("ip").args(["netns", "exec", &gw, "nft", "-f"]).arg(&rules))?;
        if let Nat::SnatPorts(..) = nat {
            run(Command::new("ip").args([
                "netns",
                "exec",
                &gw,
                "sysctl",
                "-qw",
                "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
            ]))?;
        }
        Ok(())
    }

    fn start_servers(&mut self) -> Result<()> {
        let dir = self.dir.clone();
        // HTTPS for two names, with a self-signed certificate.
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={WEB_NAME}"),
                "-addext",
                &format!("subjectAltName=DNS:{WEB_NAME},DNS:{MAIL_NAME}"),
            ])
            .arg("-keyout")
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem")))?;
        fs::create_dir_all(dir.join("nginx-tmp"))?;
        let d = dir.display();
        let nginx_conf = format!(
            r#"worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
    log_format icr '$remote_addr $remote_port $msec $ssl_server_name $request_length $bytes_sent $request_uri';
    access_log {d}/access.log icr;
    client_body_temp_path {d}/nginx-tmp;
    proxy_temp_path {d}/nginx-tmp;
    fastcgi_temp_path {d}/nginx-tmp;
    uwsgi_temp_path {d}/nginx-tmp;
    scgi_temp_path {d}/nginx-tmp;
    server {{
        listen {WEB_IP}:443 ssl;
        listen {MAIL_IP}:443 ssl;
        server_name {WEB_NAME} {MAIL_NAME};
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        location / {{ return 200 "hello from $host\n"; }}
    }}
    server {{
        listen {WEB_IP}:80;
        location / {{ return 200 "plain hello\n"; }}
    }}
}}
"#
        );
        fs::write(dir.join("nginx.conf"), nginx_conf)?;
        let nginx = self.spawn_in(
            &self.internet.clone(),
            Command::new("nginx").arg("-c").arg(dir.join("nginx.conf")),
            "nginx",
        )?;
        self.servers.push(nginx);

        let dnsmasq = self.spawn_in(
            &self.internet.clone(),
            Command::new("dnsmasq").args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                &format!("--listen-address={DNS_IP}"),
                "--port=53",
                "--user=root",
                &format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
                &format!("--address=/{WEB_NAME}/{WEB_IP}"),
                &format!("--address=/{MAIL_NAME}/{MAIL_IP}"),
                &format!("--address=/{EXCHANGE_NAME}/{EXCHANGE_IP}"),
                &format!("--host-record={WEB_NAME},{WEB_IP},{WEB_IP6}"),
                &format!("--host-record={EXCHANGE_NAME},{EXCHANGE_IP},{EXCHANGE_IP6}"),
                // An HTTPS record (type 65): priority 1, target ".", ipv4hint = the web server.
                &format!("--dns-rr={WEB_NAME},65,000100000400{}", "04c633640a"),
                &format!("--cname={ALIAS_NAME},{WEB_NAME}"),
            ]),
            "dnsmasq",
        )?;
        self.servers.push(dnsmasq);

        let exchange = self.spawn_in(
            &self.internet.clone(),
            Command::new("python3").arg(exchange_script()).args(["serve", EXCHANGE_IP, &EXCHANGE_PORT.to_string()]),
            "exchange",
        )?;
        self.servers.push(exchange);

        let quic = self.spawn_in(
            &self.internet.clone(),
            Command::new(lab_python())
                .arg(quic_script())
                .args(["serve", WEB_IP, "443"])
                .arg(dir.join("cert.pem"))
                .arg(dir.join("key.pem")),
            "quic",
        )?;
        self.servers.push(quic);

        wait_for(patience(Duration::from_secs(20)), "the servers to listen", || {
            let listening = output(Command::new("ip").args(["netns", "exec", &self.internet, "ss", "-Hltnu"]))?;
            let udp = output(Command::new("ip").args(["netns", "exec", &self.internet, "ss", "-Hlun"]))?;
            if !udp.contains(&format!("{WEB_IP}:443")) {
                return Ok(false);
            }
            Ok([format!("{WEB_IP}:443"), format!("{DNS_IP}:53"), format!("{EXCHANGE_IP}:{EXCHANGE_PORT}")]
                .iter()
                .all(|a| listening.contains(a.as_str())))
        })
    }

    /// Starts `command` inside `ns`, its output in the lab directory.
    pub fn spawn_in(&self, ns: &str, command: &mut Command, log_name: &str) -> Result<Child> {
        let log = fs::File::create(self.dir.join(format!("{log_name}.log")))?;
        let mut wrapped = Command::new("ip");
        wrapped.args(["netns", "exec", ns]).arg(command.get_program()).args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        wrapped.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        wrapped.spawn().with_context(|| format!("starting {log_name} in {ns}"))
    }

    /// Runs `command` inside `ns` and returns its output (it must succeed).
    pub fn exec(&self, ns: &str, command: &mut Command) -> Result<Output> {
        let mut wrapped = Command::new("ip");
        wrapped.args(["netns", "exec", ns]).arg(command.get_program()).args(command.get_args());
        let out = wrapped.output().with_context(|| format!("running {:?} in {ns}", command.get_program()))?;
        if !out.status.success() {
            bail!(
                "{:?} in {ns} failed ({}): {}",
                command.get_program(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// A device's lookup from `ns`: `dig +short NAME QTYPE` asked of the
    /// lab's resolver, one try (it must succeed).
    pub fn lookup(&self, ns: &str, name: &str, qtype: &str) -> Result<Output> {
        self.exec(
            ns,
            Command::new("dig").args([
                "+short",
                &format!("+time={}", client_timeout(2)),
                "+tries=1",
                &format!("@{DNS_IP}"),
                name,
                qtype,
            ]),
        )
    }

    /// Routes IPv6 through the gateway, without NAT: global addresses for
    /// the gateway's two sides, the clients and the internet's servers
    /// ([`WEB_IP6`], and [`EXCHANGE_IP6`], where an exchange server starts).
    pub fn enable_ipv6(&mut self) -> Result<()> {
        let (gw, inet) = (self.gateway.clone(), self.internet.clone());
        // `nodad`: addresses usable at once, not after duplicate detection.
        let add = |ns: &str, address: &str, dev: &str| ip(&["-n", ns, "addr", "add", address, "dev", dev, "nodad"]);
        run(Command::new("ip").args(["netns", "exec", &gw, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]))?;
        add(&gw, &format!("{GATEWAY_LAN_IP6}/64"), "brlan")?;
        add(&gw, &format!("{GATEWAY_WAN_IP6}/64"), GATEWAY_WAN_IF)?;
        add(&inet, &format!("{INTERNET_ROUTER_IP6}/64"), "eth0")?;
        for server in [WEB_IP6, EXCHANGE_IP6] {
            add(&inet, &format!("{server}/128"), "lo")?;
        }
        ip(&["-n", &gw, "-6", "route", "add", "default", "via", INTERNET_ROUTER_IP6])?;
        ip(&["-n", &inet, "-6", "route", "add", &format!("{LAN_NET6}:/64"), "via", GATEWAY_WAN_IP6])?;
        for (index, client) in self.clients.iter().enumerate() {
            add(&client.ns, &format!("{}/64", client_ip6(index)), "eth0")?;
            ip(&["-n", &client.ns, "-6", "route", "add", "default", "via", GATEWAY_LAN_IP6])?;
        }
        let exchange = self.spawn_in(
            &inet,
            Command::new("python3").arg(exchange_script()).args(["serve", EXCHANGE_IP6, &EXCHANGE_PORT.to_string()]),
            "exchange6",
        )?;
        self.servers.push(exchange);
        self.ipv6 = true;
        wait_for(patience(Duration::from_secs(20)), "the IPv6 exchange server to listen", || {
            Ok(output(Command::new("ip").args(["netns", "exec", &inet, "ss", "-Hltn"]))?
                .contains(&format!("[{EXCHANGE_IP6}]:{EXCHANGE_PORT}")))
        })
    }

    /// Runs a resolver on the gateway, as home routers do: dnsmasq on the
    /// gateway's LAN addresses (IPv6 too, if enabled), forwarding to the
    /// internet's DNS server; it answers `router.lan` itself.
    pub fn start_gateway_resolver(&mut self) -> Result<()> {
        let gw = self.gateway.clone();
        let mut args = vec![
            "--keep-in-foreground".to_string(),
            "--conf-file=/dev/null".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--bind-interfaces".into(),
            format!("--listen-address={GATEWAY_LAN_IP}"),
            format!("--server={DNS_IP}"),
            "--user=root".into(),
            format!("--pid-file={}", self.dir.join("gateway-dnsmasq.pid").display()),
            format!("--host-record=router.lan,{GATEWAY_LAN_IP}"),
        ];
        let ipv6 = self.ipv6;
        if ipv6 {
            args.push(format!("--listen-address={GATEWAY_LAN_IP6}"));
        }
        let dnsmasq = self.spawn_in(&gw, Command::new("dnsmasq").args(&args), "gateway-dnsmasq")?;
        self.servers.push(dnsmasq);
        wait_for(patience(Duration::from_secs(20)), "the gateway's resolver to listen", || {
            let listening = output(Command::new("ip").args(["netns", "exec", &gw, "ss", "-Hlun"]))?;
            Ok(listening.contains(&format!("{GATEWAY_LAN_IP}:53"))
                && (!ipv6 || listening.contains(&format!("[{GATEWAY_LAN_IP6}]:53"))))
        })
    }

    /// A TCP exchange from `client`: sends `up` bytes, reads `down` bytes back.
    /// Returns the client's source port.
    pub fn exchange(&self, client: &Client, up: usize, down: usize) -> Result<u16> {
        self.exchange_with(client, EXCHANGE_IP, up, down)
    }

    /// As [`Lab::exchange`], with the exchange server at `server` ([`EXCHANGE_IP`] or [`EXCHANGE_IP6`]).
    pub fn exchange_with(&self, client: &Client, server: &str, up: usize, down: usize) -> Result<u16> {
        let out = self.exec(
            &client.ns,
            Command::new("python3").arg(exchange_script()).args([
                "connect",
                server,
                &EXCHANGE_PORT.to_string(),
                &up.to_string(),
                &down.to_string(),
            ]),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim().parse().with_context(|| format!("the exchange client printed {text:?}"))
    }

    /// DNS questions (`name:A`, `name:AAAA`) from `client` to `server`, all
    /// from one UDP socket; returns each name with the addresses answered.
    pub fn ask(&self, client: &Client, server: &str, questions: &[&str]) -> Result<Vec<(String, Vec<String>)>> {
        let out = self.exec(&client.ns, Command::new("python3").arg(ask_script()).arg(server).args(questions))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| {
                let mut words = line.split_whitespace().map(str::to_string);
                (words.next().unwrap_or_default(), words.collect())
            })
            .collect())
    }

    /// A QUIC handshake from `client` to the lab's QUIC server with `sni`.
    pub fn quic_connect(&self, client: &Client, sni: &str) -> Result<()> {
        let out = self.exec(
            &client.ns,
            Command::new(lab_python()).arg(quic_script()).args(["connect", WEB_IP, "443", sni, &client_timeout(15)]),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim() != "ok" {
            bail!("the QUIC client said {text:?}");
        }
        Ok(())
    }

    /// Starts tcpdump on `client`'s interface, writing a pcap in the lab dir.
    pub fn capture(&self, client: &Client, name: &str) -> Result<Capture> {
        self.capture_in(&client.ns, "eth0", name)
    }

    /// Starts tcpdump on `interface` of the namespace `ns` (a client's, or
    /// the gateway's), writing `name.pcap` in the lab dir.
    pub fn capture_in(&self, ns: &str, interface: &str, name: &str) -> Result<Capture> {
        let path = self.dir.join(format!("{name}.pcap"));
        let log = self.dir.join(format!("{name}-tcpdump.log"));
        let child = self.spawn_in(
            ns,
            Command::new("tcpdump").args(["-i", interface, "-n", "-U", "-s", "0", "-w"]).arg(&path),
            &format!("{name}-tcpdump"),
        )?;
        let mut capture = Capture { child: Some(child), path };
        wait_for(patience(Duration::from_secs(10)), "tcpdump to listen", || {
            if let Some(status) = capture.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("tcpdump exited ({status}): {}", fs::read_to_string(&log).unwrap_or_default());
            }
            Ok(fs::read_to_string(&log).unwrap_or_default().contains("listening on"))
        })?;
        Ok(capture)
    }

    /// Starts an exchange from `client` that pauses `pause` seconds in the
    /// middle; returns the running client and its source port.
    pub fn slow_exchange(&self, client: &Client, up: usize, down: usize, pause: f64) -> Result<(Child, u16)> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &client.ns, "python3"])
            .arg(exchange_script())
            .args([
                "connect",
                EXCHANGE_IP,
                &EXCHANGE_PORT.to_string(),
                &up.to_string(),
                &down.to_string(),
                &pause.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
        let port = line.trim().parse().with_context(|| format!("the exchange client printed {line:?}"))?;
        Ok((child, port))
    }

    /// nginx's access log: the ground truth of what the server saw.
    pub fn web_access_log(&self) -> Result<Vec<AccessLine>> {
        let text = fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
        text.lines()
            .map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 7 {
                    bail!("unexpected access log line {line:?}");
                }
                Ok(AccessLine {
                    address: f[0].to_string(),
                    port: f[1].parse()?,
                    time: f[2].parse()?,
                    server_name: f[3].to_string(),
                    uri: f[6].to_string(),
                })
            })
            .collect()
    }

    /// Copies the lab's directory (configs, the servers' and the agent's
    /// logs, the store, captures) to where it outlives the lab:
    /// `$ICR_LAB_KEEP/<lab>`, by default under `/var/tmp`. For a failed
    /// test, whose lab is removed when it unwinds.
    pub fn keep(&self) -> Result<PathBuf> {
        let base = std::env::var_os("ICR_LAB_KEEP").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
        fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
        let kept = base.join(&self.prefix);
        run(Command::new("cp").arg("-a").arg(&self.dir).arg(&kept))?;
        Ok(kept)
    }

    /// The client-facing interfaces of the gateway, as `icr run --lan` takes them.
    pub fn lan_interfaces(&self) -> String {
        self.clients.iter().map(|c| c.gateway_if.as_str()).collect::<Vec<_>>().join(",")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_lab(&self.prefix);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One request as nginx logged it.
#[derive(Clone, Debug)]
pub struct AccessLine {
    /// The client address and port as the server saw them (after NAT).
    pub address: String,
    pub port: u16,
    /// Unix time with milliseconds, when the request was logged.
    pub time: f64,
    pub server_name: String,
    pub uri: String,
}

/// A running tcpdump.
pub struct Capture {
    child: Option<Child>,
    pub path: PathBuf,
}

impl Capture {
    /// Stops tcpdump (SIGTERM flushes the file) and returns the pcap's path.
    pub fn stop(mut self) -> Result<PathBuf> {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait()?;
        Ok(self.path.clone())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether the running kernel is `major.minor` or later.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release.trim().split(['.', '-']).map(|part| part.parse::<u32>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= (major, minor)
}

/// Every record of the store in `db` (over the default window of
/// [`icr_list`]), parsed.
pub fn stored_records(db: &Path) -> Vec<serde_json::Value> {
    let out = icr_list(db, "ndjson", None);
    assert!(out.status.success(), "icr list: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("NDJSON")).collect()
}

/// The records (NDJSON, parsed) of `device`'s flows to `remote`:`port` over `proto`.
pub fn records_between<'a>(
    records: &'a [serde_json::Value],
    device: &str,
    remote: &str,
    port: u64,
    proto: &str,
) -> Vec<&'a serde_json::Value> {
    records
        .iter()
        .filter(|r| {
            r["device"]["ip"] == device
                && r["remote"]["ip"] == remote
                && r["remote"]["port"] == port
                && r["proto"] == proto
        })
        .collect()
}

/// A record's service name and its source, `-` for none.
pub fn service_of(record: &serde_json::Value) -> (String, String) {
    let text = |value: &serde_json::Value| value.as_str().unwrap_or("-").to_string();
    (text(&record["service"]["name"]), text(&record["service"]["source"]))
}

/// The IPv6 address of the client at `index` (0-based), once IPv6 is enabled.
pub fn client_ip6(index: usize) -> String {
    format!("{LAN_NET6}:{}", 11 + index)
}

/// A running `icr run` on the gateway.
pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Agent {
    /// Starts the agent in the gateway and waits until it says it runs.
    pub fn start(lab: &Lab, icr: &Path, db: &Path) -> Result<Self> {
        Self::start_as(lab, Command::new(icr), &Self::run_args(lab, db))
    }

    /// `run` on the lab's interfaces with the store `db`.
    fn run_args(lab: &Lab, db: &Path) -> Vec<std::ffi::OsString> {
        let lan = lab.lan_interfaces();
        let flags = ["run", "--lan", lan.as_str(), "--wan", GATEWAY_WAN_IF, "--db"];
        flags.iter().map(Into::into).chain([db.as_os_str().to_owned()]).collect()
    }

    /// As [`Agent::start`], `icr` given `args` (`run` and its flags).
    pub fn start_with(lab: &Lab, icr: &Path, args: &[&std::ffi::OsStr]) -> Result<Self> {
        Self::start_as(lab, Command::new(icr), args)
    }

    /// As [`Agent::start`], with only the capabilities the Debian package's
    /// unit gives it (deploy/icr.service), through setpriv: every other one
    /// dropped, CAP_SYS_ADMIN first.
    pub fn start_confined(lab: &Lab, icr: &Path, db: &Path) -> Result<Self> {
        let caps = "-all,+bpf,+net_admin,+perfmon";
        let mut command = Command::new("setpriv");
        command
            .arg(format!("--inh-caps={caps}"))
            .arg(format!("--ambient-caps={caps}"))
            .arg(format!("--bounding-set={caps}"))
            .arg("--")
            .arg(icr);
        Self::start_as(lab, command, &Self::run_args(lab, db))
    }

    fn start_as(lab: &Lab, mut command: Command, args: &[impl AsRef<std::ffi::OsStr>]) -> Result<Self> {
        let log = lab.dir.join("agent.log");
        command.args(args).env("RUST_LOG", std::env::var("ICR_LAB_LOG").unwrap_or_else(|_| "info".into()));
        let child = lab.spawn_in(&lab.gateway, &mut command, "agent")?;
        let mut agent = Agent { child: Some(child), log };
        let started = Instant::now();
        loop {
            let text = fs::read_to_string(&agent.log).unwrap_or_default();
            if text.contains("icr running") {
                return Ok(agent);
            }
            if let Some(status) = agent.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("the agent exited ({status}) before running:\n{text}");
            }
            if started.elapsed() > patience(Duration::from_secs(30)) {
                bail!("the agent did not start within 30 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the agent dies at once, as in a crash.
    pub fn kill(mut self) -> Result<()> {
        let mut child = self.child.take().expect("running");
        let killed = child.kill();
        child.wait()?;
        Ok(killed?)
    }

    /// SIGTERM, then waits (at most 30 s) for a clean exit.
    pub fn stop(mut self) -> Result<String> {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > patience(Duration::from_secs(30)) {
                let _ = child.kill();
                bail!("the agent did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        if !status.success() {
            bail!("the agent exited with {status}:\n{log}");
        }
        Ok(log)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGSTOP: the agent stops reading while the kernel side goes on (a
    /// descheduled or stuck agent); [`Agent::resume`] continues it.
    /// The agent's resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let child = self.child.as_ref().context("the agent is not running")?;
        // `ip netns exec` execs the agent: the child's pid is the agent's.
        let status = fs::read_to_string(format!("/proc/{}/status", child.id()))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .context("no VmRSS in the agent's status")?
            .parse()
            .context("VmRSS")
    }

    pub fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    pub fn resume(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, signal: i32) -> Result<()> {
        let child = self.child.as_ref().context("the agent is not running")?;
        // SAFETY: signalling our own child, which has not been waited for.
        if unsafe { libc::kill(child.id() as i32, signal) } != 0 {
            bail!("signalling the agent: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `token_hash` for an authority's API token, as `icr hash-token` gives it.
pub fn hash_token(token: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new(icr_binary())
        .arg("hash-token")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running icr hash-token");
    child.stdin.take().expect("piped").write_all(format!("{token}\n").as_bytes()).expect("writing the token");
    let out = child.wait_with_output().expect("icr hash-token");
    assert!(out.status.success(), "icr hash-token failed");
    String::from_utf8(out.stdout).expect("a hash is text").trim().to_string()
}

/// A client's own time limit (curl's `--max-time`, dig's `+time`, ...) in
/// whole seconds, as its argument: `base_seconds` scaled like [`patience`]
/// (under TCG, a 10 s limit becomes 40 s).
pub fn client_timeout(base_seconds: u64) -> String {
    patience(Duration::from_secs(base_seconds)).as_secs().to_string()
}

/// The `icr` binary under test: `ICR_BIN` (set by `cargo xtask test`), else
/// the workspace's debug build.
pub fn icr_binary() -> PathBuf {
    std::env::var_os("ICR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/icr"))
}

/// The authority the labs' questions are asked as: police, every question.
pub const LAB_POLICE: &str = "lab-police";

/// The configuration of a lab's agent: `probe_id`, metrics on `metrics`,
/// [`LAB_POLICE`], a month's retention and short timeouts, so that records
/// close within seconds of their traffic. Tests add their own parts.
pub fn agent_config(probe_id: &str, metrics: &str) -> Config {
    Config::new()
        .key("retention_days = 30")
        .key(&format!("probe_id = \"{probe_id}\""))
        .metrics(metrics)
        .authority(Authority::police(LAB_POLICE))
        .section("timeouts", "tcp_closed = \"1s\"\nudp_idle = \"2s\"\nfull_sweep = \"1s\"")
}

/// `icr ARGS` (the binary under test), its output.
pub fn icr(args: &[&str]) -> Output {
    Command::new(icr_binary()).args(args).output().expect("running icr")
}

/// The operator authority `icr list` runs as in the lab's stores.
pub const LAB_OPERATOR: &str = "lab-operator";

/// Adds [`LAB_OPERATOR`] to the configuration of the store in `db` (made if
/// missing), so that the store may be listed.
pub fn allow_listing(db: &Path) -> Result<()> {
    let path = db.join("icr.toml");
    let config = match fs::read_to_string(&path) {
        Ok(config) => config,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    };
    if !config.contains(&format!("name = \"{LAB_OPERATOR}\"")) {
        let operator = format!("\n{}", Authority::operator(LAB_OPERATOR));
        fs::create_dir_all(db)?;
        fs::write(&path, config + &operator).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `icr list --db db --format format` as the lab's operator, over the window
/// `from..to` (Unix seconds; default: the last 29 days to a day ahead).
pub fn icr_list(db: &Path, format: &str, window: Option<(i64, i64)>) -> Output {
    allow_listing(db).expect("allowing the lab's operator to list");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let (from, to) = window.unwrap_or((now - 29 * 86_400, now + 86_400));
    Command::new(icr_binary())
        .args(["list", "--format", format, "--from", &rfc3339(from), "--to", &rfc3339(to)])
        .args(["--authority", LAB_OPERATOR, "--officer", "lab", "--reference", "LAB-LIST", "--db"])
        .arg(db)
        .output()
        .expect("running icr list")
}

/// Unix seconds as an RFC 3339 UTC time.
pub fn rfc3339(unix: i64) -> String {
    // Howard Hinnant's days-to-civil.
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

/// The lab's Python with aioquic: `ICR_LAB_PYTHON` (set by `cargo xtask
/// test`), else the venv `cargo xtask setup` makes in target/.
pub fn lab_python() -> PathBuf {
    std::env::var_os("ICR_LAB_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/lab-python/bin/python3"))
}

pub fn quic_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("quic.py")
}

pub fn exchange_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("exchange.py")
}

pub fn ask_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ask.py")
}

fn run(command: &mut Command) -> Result<()> {
    output(command).map(drop)
}

fn output(command: &mut Command) -> Result<String> {
    let out = command.stdin(Stdio::null()).output().with_context(|| format!("starting {:?}", command.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed: {}",
            command.get_program(),
            command.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes every namespace (and its processes and resolv.conf) of the lab
/// named `prefix`: for signal handlers, which cannot run `Drop`.
pub fn remove_lab(prefix: &str) {
    let Ok(list) = output(Command::new("ip").args(["netns", "list"])) else { return };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        if !name.starts_with(&format!("{prefix}-")) {
            continue;
        }
        if let Ok(pids) = output(Command::new("ip").args(["netns", "pids", name])) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                // SAFETY: signalling a process inside our own lab namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = output(Command::new("ip").args(["netns", "del", name]));
        let _ = fs::remove_dir_all(Path::new("/etc/netns").join(name));
    }
}

/// Labs of processes that no longer exist (a killed test run) are removed.
fn remove_stale_labs() {
    let Ok(list) = output(Command::new("ip").args(["netns", "list"])) else { return };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(rest) = name.strip_prefix(NAME_PREFIX) else { continue };
        let Some((pid, _)) = rest.split_once('x') else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let prefix = name.split('-').next().unwrap_or(name);
            remove_lab(prefix);
            let _ = fs::remove_dir_all(std::env::temp_dir().join(prefix));
        }
    }
}

/// A bpffs of a test's own (`ip netns exec` hides /sys/fs/bpf behind a
/// fresh sysfs, but not other mounts), unmounted however the test ends.
pub struct Bpffs(pub PathBuf);

impl Bpffs {
    pub fn mount(at: PathBuf) -> Self {
        fs::create_dir_all(&at).unwrap();
        let out = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&at).output().unwrap();
        assert!(out.status.success(), "mounting bpffs: {}", String::from_utf8_lossy(&out.stderr));
        Self(at)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = fs::remove_dir(&self.0);
    }
}

/// Reads lines of a child's output file until `pattern` appears.
pub fn file_contains(path: &Path, pattern: &str) -> bool {
    fs::File::open(path)
        .map(|f| BufReader::new(f).lines().map_while(Result::ok).any(|l| l.contains(pattern)))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #[test]
    fn unix_seconds_are_written_as_rfc3339() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_173_323), "2026-12-02T01:02:03Z");
        assert_eq!(super::rfc3339(951_868_799), "2000-02-29T23:59:59Z");
    }
}
