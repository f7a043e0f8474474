//! `cargo xtask demo`: the lab, the probe on its gateway, real traffic, and
//! what an investigator would then ask.
use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use icr_lab::{self as lab, Agent, DNS_IP, EXCHANGE_IP, Lab, MAIL_NAME, WEB_IP, WEB_NAME};

use crate::{cmd, setup};

pub fn run() -> Result<()> {
    setup::ensure(setup::Needs::Test)?;
    if !setup::is_root() {
        bail!("the demo builds network namespaces and loads XDP: run it as root");
    }
    cmd::cargo(&["build", "--release", "--package", "probe-user"])?;
    let icr = cmd::workspace_root().join("target/release/icr");

    println!("\n== Building the lab: 3 clients, a NAT gateway with the probe, an internet with servers");
    let lab = Lab::start(3)?;
    let prefix = lab.prefix.clone();
    ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: removing the lab");
        lab::remove_lab(&prefix);
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;

    let db = lab.dir.join("db");
    write_config(&db)?;
    let agent = Agent::start(&lab, &icr, &db)?;
    println!("   icr run --lan {} --wan {} --db {}", lab.lan_interfaces(), lab::GATEWAY_WAN_IF, db.display());
    for (i, c) in lab.clients.iter().enumerate() {
        println!("   client {}: {} {} (gateway port {})", i + 1, c.ip, c.mac, c.gateway_if);
    }

    println!("\n== Traffic");
    let [c1, c2, c3] = [&lab.clients[0], &lab.clients[1], &lab.clients[2]];
    show(&lab, &c1.ns, Command::new("curl").args(["-sk", "--max-time", "10", &format!("https://{WEB_NAME}/")]))?;
    show(&lab, &c2.ns, Command::new("curl").args(["-sk", "--max-time", "10", &format!("https://{MAIL_NAME}/")]))?;
    show(
        &lab,
        &c2.ns,
        Command::new("dig").args(["+short", "+time=2", "+tries=1", &format!("@{DNS_IP}"), WEB_NAME, "A"]),
    )?;
    show(&lab, &c3.ns, Command::new("curl").args(["-s", "--max-time", "10", &format!("http://{WEB_NAME}/")]))?;
    let port = lab.exchange(c3, 5_000, 50_000)?;
    println!("   [{}] TCP exchange to {EXCHANGE_IP}: 5000 bytes up, 50000 down, from port {port}", c3.ip);

    std::thread::sleep(Duration::from_millis(2500));
    println!("\n== Stopping the agent (open flows close as \"shutdown\")");
    let log = agent.stop()?;
    for line in log.lines().filter(|l| l.contains("stored") || l.contains("WARN")) {
        println!("   {line}");
    }

    let db_arg = db.to_str().context("non-UTF-8 path")?;
    // Queries, and listings, may cover at most 31 days: the hour around the demo.
    let (from, to) = window_around_now();
    let window = ["--from", from.as_str(), "--to", to.as_str()];
    // Listing is maintenance: an operator authority's, audited like a query.
    let operator = ["--authority", "demo-noc", "--officer", "NOC 1", "--reference", "MAINT-DEMO-1"];
    println!("\n== The records (icr list, as the operator)");
    icr_print(&icr, &[&["list", "--db", db_arg, "--format", "table"][..], &window, &operator].concat())?;
    println!("\n== The records as NDJSON (ICR-FORMAT.md), first two");
    let ndjson = icr_output(&icr, &[&["list", "--db", db_arg, "--format", "ndjson"][..], &window, &operator].concat())?;
    for line in ndjson.lines().take(2) {
        println!("{line}");
    }
    let who = ["--authority", "demo-police", "--officer", "PC 4242", "--reference", "OP-DEMO-1"];
    println!("\n== Question 2: which services did client 2 ({}) use?", c2.mac);
    icr_print(
        &icr,
        &[&["query", "services", "--device", &c2.mac, "--db", db_arg, "--format", "table"][..], &window, &who].concat(),
    )?;
    println!("\n== Question 3: which devices used {WEB_NAME} (by name) or the web server {WEB_IP}?");
    icr_print(
        &icr,
        &[
            &["query", "accessed", "--service", WEB_NAME, "--service", WEB_IP, "--db", db_arg, "--format", "table"][..],
            &window,
            &who,
        ]
        .concat(),
    )?;
    println!("\n== A local authority asks: refused (exit 3), and audited");
    let refused = Command::new(&icr)
        .args(
            [
                &[
                    "query",
                    "accessed",
                    "--service",
                    WEB_IP,
                    "--db",
                    db_arg,
                    "--authority",
                    "demo-council",
                    "--officer",
                    "X",
                    "--reference",
                    "Y",
                ][..],
                &window,
            ]
            .concat(),
        )
        .output()?;
    println!("   exit {:?}: {}", refused.status.code(), String::from_utf8_lossy(&refused.stderr).trim());
    println!("\n== The audit log (icr audit verify)");
    icr_print(&icr, &["audit", "verify", "--db", db_arg])?;
    println!("\n== Removing the lab");
    drop(lab);
    Ok(())
}

/// RFC 3339 times an hour before and after now.
fn window_around_now() -> (String, String) {
    let now = chrono::Utc::now();
    let hour = chrono::Duration::hours(1);
    ((now - hour).to_rfc3339(), (now + hour).to_rfc3339())
}

fn write_config(db: &Path) -> Result<()> {
    std::fs::create_dir_all(db)?;
    std::fs::write(
        db.join("icr.toml"),
        r#"retention_days = 365

[[authority]]
name = "demo-police"
kind = "police"
purposes = [1, 2, 3]

[[authority]]
name = "demo-council"
kind = "local"
purposes = [1, 2, 3]

[[authority]]
name = "demo-noc"
kind = "operator"
purposes = []

[probe]
flow_table_size = 65536

[timeouts]
tcp_closed = "1s"
udp_idle = "2s"
"#,
    )?;
    Ok(())
}

fn show(lab: &Lab, ns: &str, command: &mut Command) -> Result<()> {
    let describe = format!(
        "{} {}",
        command.get_program().to_string_lossy(),
        command.get_args().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
    );
    let out = lab.exec(ns, command)?;
    let client = lab.clients.iter().find(|c| c.ns == ns).map_or(ns, |c| c.ip.as_str());
    println!("   [{client}] {describe} -> {}", String::from_utf8_lossy(&out.stdout).trim());
    Ok(())
}

fn icr_output(icr: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(icr).args(args).output()?;
    if !out.status.success() {
        bail!("icr {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn icr_print(icr: &Path, args: &[&str]) -> Result<()> {
    print!("{}", icr_output(icr, args)?);
    Ok(())
}
