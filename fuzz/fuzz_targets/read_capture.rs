//! A pcap or pcapng file, read packet by packet and each packet made an
//! Ethernet frame, as `icr replay` does before the XDP program.
#![no_main]
use std::{path::PathBuf, sync::OnceLock};

use libfuzzer_sys::fuzz_target;

/// One scratch file per process, rewritten for every input.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("input.pcap");
        (dir, path)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    std::fs::write(path, data).expect("writing the scratch capture");
    let _ = icr::capture::replay::read_capture(path, |_ts_ns, link, packet| {
        if let Some(frame) = icr::capture::replay::to_ethernet(link, packet) {
            assert!(frame.len() >= 14);
        }
        Ok(())
    });
});
