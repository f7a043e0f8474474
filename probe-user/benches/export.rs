//! `cargo xtask bench export [--records N]`: what exporting a record costs,
//! IPFIX beside NDJSON. N synthetic ICRs (`icr_test_kit::synthetic`), in
//! batches of one tick's worth, are encoded as NDJSON (the record contract,
//! what files and the audit digest carry) and as IPFIX messages (the live
//! export's encoder), and the IPFIX messages are also sent over UDP to a
//! socket on loopback, as the agent sends them (the sender's cost only). For each: CPU time per
//! record (this process's user and system time) and bytes per record. The
//! last line is one JSON object for scripts.
use std::{net::UdpSocket, time::Duration};

use anyhow::{Context as _, Result, bail};
use icr::{
    export::{
        ipfix::{DOCUMENTATION_PEN, Encoder, PATH_MTU_MESSAGE},
        ndjson,
    },
    record::Icr,
};

use icr_test_kit::synthetic::{Generator, Options};

/// Records a tick hands the writer on a busy gateway (1,000 connections
/// closed a second).
const BATCH: usize = 1_000;

fn records_arg() -> Result<usize> {
    let mut records = 200_000;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--records" => {
                records = it.next().context("--records needs a value")?.replace('_', "").parse().context("--records")?
            }
            "--bench" => {}
            other => bail!("unknown argument {other} (there is --records N)"),
        }
    }
    Ok(records)
}

/// This process's CPU time (user and system).
fn cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1_000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// CPU time and bytes of `encode` over every batch.
fn measure(batches: &[Vec<Icr>], mut encode: impl FnMut(&[Icr]) -> Result<u64>) -> Result<(Duration, u64)> {
    let started = cpu();
    let mut bytes = 0;
    for batch in batches {
        bytes += encode(batch)?;
    }
    Ok((cpu() - started, bytes))
}

fn main() -> Result<()> {
    let records = records_arg()?;
    let mut generator = Generator::new(7, Options::default());
    let all: Vec<Icr> = (0..records).map(|_| generator.next_record()).collect();
    let batches: Vec<Vec<Icr>> = all.chunks(BATCH).map(<[Icr]>::to_vec).collect();
    let export_time = 1_795_000_000;

    let (ndjson_cpu, ndjson_bytes) = measure(&batches, |batch| Ok(ndjson(batch)?.len() as u64))?;
    let mut encoder = Encoder::new(7, DOCUMENTATION_PEN, PATH_MTU_MESSAGE);
    let mut messages = 0u64;
    let (ipfix_cpu, ipfix_bytes) = measure(&batches, |batch| {
        let encoded = encoder.encode(batch, export_time, false);
        messages += encoded.len() as u64;
        Ok(encoded.iter().map(|m| m.bytes.len() as u64).sum())
    })?;
    let collector = UdpSocket::bind("127.0.0.1:0")?;
    let sender = UdpSocket::bind("127.0.0.1:0")?;
    sender.connect(collector.local_addr()?)?;
    // Never read: what overflows its buffer is dropped by the kernel there,
    // and the cost measured is the sender's alone.
    let mut encoder = Encoder::new(7, DOCUMENTATION_PEN, PATH_MTU_MESSAGE);
    let (sent_cpu, sent_bytes) = measure(&batches, |batch| {
        let mut bytes = 0;
        for message in encoder.encode(batch, export_time, false) {
            bytes += sender.send(&message.bytes)? as u64;
        }
        Ok(bytes)
    })?;

    let per = |cpu: Duration| cpu.as_nanos() as f64 / 1_000.0 / records as f64;
    let n = records as f64;
    println!("{records} synthetic records, batches of {BATCH}");
    println!("{:<34} {:>14} {:>16}", "", "CPU µs/record", "bytes/record");
    println!("{:<34} {:>14.2} {:>16.1}", "NDJSON (serialise)", per(ndjson_cpu), ndjson_bytes as f64 / n);
    println!("{:<34} {:>14.2} {:>16.1}", "IPFIX (encode)", per(ipfix_cpu), ipfix_bytes as f64 / n);
    println!(
        "{:<34} {:>14.2} {:>16.1}",
        "IPFIX (encode and send over UDP)",
        per(sent_cpu),
        // On the wire: each message's IPv4 and UDP headers too.
        (sent_bytes + messages * 28) as f64 / n
    );
    println!("IPFIX: {messages} messages, {:.1} records each", n / messages as f64);
    println!(
        "{}",
        serde_json::json!({
            "records": records,
            "ndjson_cpu_us_per_record": per(ndjson_cpu),
            "ndjson_bytes_per_record": ndjson_bytes as f64 / n,
            "ipfix_cpu_us_per_record": per(ipfix_cpu),
            "ipfix_bytes_per_record": ipfix_bytes as f64 / n,
            "ipfix_udp_cpu_us_per_record": per(sent_cpu),
            "ipfix_wire_bytes_per_record": (sent_bytes + messages * 28) as f64 / n,
        })
    );
    Ok(())
}
