//! `icr replay`: a capture file through the agent's own pipeline (the XDP
//! program, the assembler, the naming of records), its records written as
//! NDJSON and, when a store is named, stored as the agent stores them.
use std::{io::Write, path::Path};

use anyhow::Result;

use crate::{
    capture::{
        probe::ProbeOptions,
        replay::{ReplayStats, replay},
        subscribers::Directory,
    },
    config::Config,
    export,
    store::Store,
};

/// Replays `file` with the configuration `named` (else as
/// [`Config::choose`] finds one for `db`), writing its records to `out`
/// and, with `db`, to that store.
pub fn run(file: &Path, db: Option<&Path>, named: Option<&Path>, out: &mut dyn Write) -> Result<ReplayStats> {
    let chosen = Config::choose(named, db)?;
    let config = chosen.config;
    let store = db.map(Store::open).transpose()?;
    // A replay that stores is the store's writer, as an agent is: its
    // configuration governs the store's questions from now on.
    if let (Some(store), Some(db)) = (&store, db) {
        crate::query::audit::govern(store, db, chosen.source.agent_file())?;
    }
    // Never pinned: a replay must not touch a running agent's maps.
    let options = ProbeOptions { pin_dir: None, ..config.probe.probe_options() };
    let directory = Directory::load(&config.subscribers)?;
    let probe_id = config.probe_id();
    let stats = replay(file, options, config.flow_timeouts(), |mut records| {
        directory.name(&mut records, &probe_id);
        out.write_all(&export::ndjson(&records)?)?;
        if let Some(store) = &store {
            store.append(&records)?;
        }
        Ok(())
    })?;
    out.flush()?;
    log::info!(
        "replayed {} packets ({} of unsupported link types skipped, {} damaged packet records skipped): {} records",
        stats.packets,
        stats.unsupported_link,
        stats.damaged,
        stats.records
    );
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DNS over UDP: a few queries and their answers.
    const CAPTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/captures/suricata-verify/tests/dns/dns-udp-eve-log-answer-only/dns-udp-google.com-a-aaaa-mx.pcap"
    );

    /// As the agent's: named with the probe id and the subscriber, and in
    /// the store, which the replay's configuration governs from now on.
    #[test]
    fn a_replay_names_and_stores_its_records_as_the_agent_does() {
        let dir = tempfile::tempdir().unwrap();
        let (db, config, subscribers) =
            (dir.path().join("store"), dir.path().join("icr.toml"), dir.path().join("subscribers.csv"));
        std::fs::write(&subscribers, "0.0.0.0/0,line-4\n::/0,line-6\n").unwrap();
        std::fs::write(
            &config,
            format!("probe_id = \"gw-replay\"\n[subscribers]\nstatic = \"{}\"\n", subscribers.display()),
        )
        .unwrap();
        let mut out = Vec::new();
        let stats = run(Path::new(CAPTURE), Some(&db), Some(&config), &mut out).expect("replayed (as root)");
        let printed: Vec<crate::record::Icr> =
            String::from_utf8(out).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        assert!(stats.records > 0 && printed.len() as u64 == stats.records, "{} records", printed.len());
        for record in &printed {
            assert_eq!(record.probe.as_deref(), Some("gw-replay"));
            assert!(matches!(record.device.subscriber.as_deref(), Some("line-4" | "line-6")), "{record:?}");
        }

        let store = crate::store::test_records::reopen_read_only(&db).unwrap();
        let from = printed.iter().map(|r| r.start).min().unwrap();
        let to = printed.iter().map(|r| r.end).max().unwrap();
        let mut stored = store.scan(from, to).unwrap();
        let mut printed = printed;
        for records in [&mut stored, &mut printed] {
            records.sort_by(|a, b| a.id.cmp(&b.id));
        }
        assert_eq!(stored, printed, "the store holds what was printed");
        let governing = crate::config::StoreConfig::of_store(&db).unwrap();
        assert!(governing.is(&config), "{}", governing.path().display());
    }
}
