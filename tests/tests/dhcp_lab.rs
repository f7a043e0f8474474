//! Subscribers through a DHCP lease change: the gateway's dnsmasq hands out
//! one address; device A leases it, uses the web service, releases it;
//! device B leases the same address and uses the mail service. The agent
//! follows dnsmasq's real leases file. Resolving each request nginx logged
//! (public ip:port and time) must name the device and subscriber that made
//! it, and each subscriber's services must be only its own.
use std::{path::Path, process::Command, time::Duration};

use chrono::{DateTime, SecondsFormat, Utc};
use icr_lab::{
    Agent, GATEWAY_LAN_IP, LAN_NET, Lab, MAIL_NAME, PUBLIC_IP, WEB_IP, WEB_NAME, client_timeout, icr_binary, patience,
    wait_for,
};
use serde_json::Value;

const WHO: [&str; 6] = ["--authority", "lab-police", "--officer", "PC 1", "--reference", "OP-DHCP"];

/// busybox udhcpc's hook: configure what the server offered, or remove it.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface" ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/24" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    ;;
esac
exit 0
"#;

fn rfc3339(unix: f64) -> String {
    DateTime::<Utc>::from_timestamp_micros((unix * 1e6) as i64).unwrap().to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn icr(db: &Path, args: &[&str]) -> Vec<Value> {
    let out =
        Command::new(icr_binary()).args(args).args(["--format", "ndjson", "--db"]).arg(db).args(WHO).output().unwrap();
    assert!(out.status.success(), "icr {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn an_address_moving_between_devices_resolves_to_each_holder_in_turn() {
    let lab = Lab::start(2).expect("building the lab");
    let (a, b) = (&lab.clients[0], &lab.clients[1]);
    let leases = lab.dir.join("dnsmasq.leases");
    std::fs::write(&leases, "").unwrap();
    let shared_ip = format!("{LAN_NET}.100");
    let dhcp = lab
        .spawn_in(
            &lab.gateway,
            Command::new("dnsmasq").args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--port=0",
                "--interface=brlan",
                "--bind-interfaces",
                "--dhcp-authoritative",
                &format!("--dhcp-range={shared_ip},{shared_ip},255.255.255.0,10m"),
                &format!("--dhcp-option=option:router,{GATEWAY_LAN_IP}"),
                &format!("--dhcp-leasefile={}", leases.display()),
                &format!("--pid-file={}", lab.dir.join("dhcp.pid").display()),
                "--user=root",
            ]),
            "dhcp",
        )
        .expect("starting dnsmasq's DHCP server");
    let _dhcp = KillOnDrop(dhcp);
    let script = lab.dir.join("udhcpc.sh");
    std::fs::write(&script, UDHCPC_SCRIPT).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let db = lab.dir.join("db");
    std::fs::create_dir_all(&db).unwrap();
    let subscribers = lab.dir.join("subscribers.csv");
    std::fs::write(&subscribers, format!("mac,subscriber\n{},alice\n{},bob\n", a.mac, b.mac)).unwrap();
    std::fs::write(
        db.join("icr.toml"),
        format!(
            "[[authority]]\nname = \"lab-police\"\nkind = \"police\"\npurposes = [1, 2]\n\
             [probe]\nflow_table_size = 65536\n[timeouts]\ntcp_closed = \"1s\"\nudp_idle = \"2s\"\nfull_sweep = \"1s\"\n\
             [subscribers]\nstatic = \"{}\"\ndnsmasq_leases = \"{}\"\n",
            subscribers.display(),
            leases.display()
        ),
    )
    .unwrap();
    let agent = Agent::start(&lab, &icr_binary(), &db).expect("starting the agent");

    // udhcpc stays in the foreground holding the lease; SIGTERM makes it
    // release the lease (-R) and exit.
    let udhcpc = |client: &icr_lab::Client| {
        lab.exec(&client.ns, Command::new("ip").args(["addr", "flush", "dev", "eth0"])).unwrap();
        let child = lab
            .spawn_in(
                &client.ns,
                Command::new("busybox")
                    .args(["udhcpc", "-i", "eth0", "-f", "-R", "-t", "5", "-T", &client_timeout(1), "-s"])
                    .arg(&script),
                &format!("udhcpc-{}", client.ns),
            )
            .expect("udhcpc");
        KillOnDrop(child)
    };
    let leased_to = |mac: &str| {
        std::fs::read_to_string(&leases).unwrap_or_default().lines().any(|l| l.contains(mac) && l.contains(&shared_ip))
    };
    let curl = |client: &icr_lab::Client, name: &str| {
        lab.exec(
            &client.ns,
            Command::new("curl").args([
                "-sk",
                "-o",
                "/dev/null",
                "--max-time",
                &client_timeout(10),
                "--resolve",
                &format!("{name}:443:{WEB_IP}"),
                &format!("https://{name}/dhcp"),
            ]),
        )
        .expect("curl");
    };

    // A holds the address and uses the web service.
    let a_lease = udhcpc(a);
    wait_for(patience(Duration::from_secs(10)), "A's lease in the leases file", || Ok(leased_to(&a.mac))).unwrap();
    std::thread::sleep(patience(Duration::from_secs(2))); // the agent re-reads the file each second
    curl(a, WEB_NAME);
    // A releases it; B gets the same address and uses the mail service.
    a_lease.release();
    wait_for(patience(Duration::from_secs(10)), "A's lease to be released", || Ok(!leased_to(&a.mac))).unwrap();
    let _b_lease = udhcpc(b);
    wait_for(patience(Duration::from_secs(10)), "B's lease in the leases file", || Ok(leased_to(&b.mac))).unwrap();
    std::thread::sleep(patience(Duration::from_secs(2)));
    curl(b, MAIL_NAME);
    std::thread::sleep(Duration::from_secs(3));
    let log = agent.stop().expect("the agent stops cleanly");
    drop(_dhcp);

    let requests = lab.web_access_log().unwrap();
    assert_eq!(requests.len(), 2, "both requests reached nginx: {requests:?}");
    for (request, (client, subscriber)) in requests.iter().zip([(a, "alice"), (b, "bob")]) {
        assert_eq!(request.address, PUBLIC_IP);
        let hits = icr(
            &db,
            &[
                "query",
                "resolve",
                "--ip",
                PUBLIC_IP,
                "--port",
                &request.port.to_string(),
                "--at",
                &rfc3339(request.time),
            ],
        );
        assert_eq!(hits.len(), 1, "one connection used {}:{} then: {hits:#?}\n{log}", PUBLIC_IP, request.port);
        assert_eq!(hits[0]["device"]["ip"], shared_ip.as_str(), "{hits:#?}");
        assert_eq!(hits[0]["device"]["mac"], client.mac.as_str(), "{hits:#?}");
        assert_eq!(hits[0]["device"]["subscriber"], subscriber, "{hits:#?}");
        assert_eq!(hits[0]["service"]["name"], request.server_name.as_str());
    }
    let window = ["--from", &rfc3339(requests[0].time - 60.0), "--to", &rfc3339(requests[1].time + 60.0)];
    for (subscriber, name) in [("alice", WEB_NAME), ("bob", MAIL_NAME)] {
        let rows = icr(&db, &[&["query", "services", "--device", subscriber][..], &window[..]].concat());
        let names: Vec<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
        assert_eq!(names, vec![name], "{subscriber}: {rows:#?}");
    }
}

struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    /// SIGTERM, and wait for the exit.
    fn release(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
