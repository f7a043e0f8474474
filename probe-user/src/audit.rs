//! The audit log: one line per query or refusal, each carrying the hash of the
//! line before, so that an edit, a deletion or a reordering is detectable
//! (`icr audit verify`). Appends are serialised with a file lock and synced
//! before the answer is given.
use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What is recorded about one query. The chain fields are added on append.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub time: String,
    pub command: String,
    pub authority: Option<String>,
    pub officer: Option<String>,
    pub reference: Option<String>,
    pub purpose: Option<u8>,
    /// The query's parameters as given.
    pub parameters: serde_json::Value,
    /// "answered" or "refused: <reason>".
    pub outcome: String,
    pub result_count: u64,
    /// SHA-256 of the NDJSON of the results, so a disclosure can be checked later.
    pub result_sha256: Option<String>,
    /// Capture gaps in the window, reported with the answer (absent when
    /// none, so entries written before gaps existed verify unchanged).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gaps: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Entry {
    seq: u64,
    prev: String,
    #[serde(flatten)]
    record: AuditRecord,
    hash: String,
}

impl Entry {
    fn digest(seq: u64, prev: &str, record: &AuditRecord) -> Result<String> {
        #[derive(Serialize)]
        struct Body<'a> {
            seq: u64,
            prev: &'a str,
            #[serde(flatten)]
            record: &'a AuditRecord,
        }
        let bytes = serde_json::to_vec(&Body { seq, prev, record })?;
        Ok(hex::encode(Sha256::digest(&bytes)))
    }
}

pub struct AuditLog {
    path: PathBuf,
}

impl AuditLog {
    pub fn in_dir(dir: &Path) -> Self {
        Self { path: dir.join("audit.log") }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` to the chain and syncs it; returns its sequence number.
    pub fn append(&self, record: AuditRecord) -> Result<u64> {
        self.append_entry(record).map(|(seq, _)| seq)
    }

    /// As `append`, also returning the entry's line as written (for a
    /// disclosure bundle).
    pub fn append_entry(&self, record: AuditRecord) -> Result<(u64, String)> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&self.path)
            .with_context(|| format!("opening the audit log {}", self.path.display()))?;
        let _lock = FileLock::exclusive(&file)?;
        let (seq, prev) = match last_entry(&mut file)? {
            Some(entry) => (entry.seq + 1, entry.hash),
            None => (1, GENESIS.to_string()),
        };
        let hash = Entry::digest(seq, &prev, &record)?;
        let mut line = serde_json::to_vec(&Entry { seq, prev, record, hash })?;
        line.push(b'\n');
        file.write_all(&line).context("writing the audit log")?;
        file.sync_data().context("syncing the audit log")?;
        line.pop();
        Ok((seq, String::from_utf8(line)?))
    }

    /// Checks the whole chain; returns the number of entries, or the first
    /// broken one.
    pub fn verify(&self) -> Result<u64> {
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(error) => {
                return Err(error).with_context(|| format!("opening {}", self.path.display()));
            }
        };
        let mut prev = GENESIS.to_string();
        let mut expected_seq = 1;
        for (index, line) in BufReader::new(file).lines().enumerate() {
            let line_no = index + 1;
            let line = line.with_context(|| format!("reading line {line_no}"))?;
            let entry: Entry = serde_json::from_str(&line)
                .with_context(|| format!("entry at line {line_no} is not a valid audit entry"))?;
            if entry.seq != expected_seq {
                bail!("entry at line {line_no}: sequence {} where {expected_seq} was expected (an entry was removed or moved)", entry.seq);
            }
            if entry.prev != prev {
                bail!("entry {} (line {line_no}) does not follow the entry before it", entry.seq);
            }
            if Entry::digest(entry.seq, &entry.prev, &entry.record)? != entry.hash {
                bail!("entry {} (line {line_no}) was altered: its hash does not match its content", entry.seq);
            }
            prev = entry.hash;
            expected_seq += 1;
        }
        Ok(expected_seq - 1)
    }
}

/// The last complete entry. A torn last line (a crash mid-write, never
/// acknowledged) is cut off so the chain continues from the last whole entry.
fn last_entry(file: &mut File) -> Result<Option<Entry>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    let tail_len = len.min(64 * 1024);
    file.seek(SeekFrom::Start(len - tail_len))?;
    let mut tail = Vec::with_capacity(tail_len as usize);
    file.read_to_end(&mut tail)?;
    let complete = match tail.iter().rposition(|&b| b == b'\n') {
        Some(end) => end,
        None => bail!("the audit log's last entry is longer than 64 KiB or torn; refusing to append"),
    };
    if complete + 1 != tail.len() {
        let keep = len - tail_len + complete as u64 + 1;
        log::warn!("the audit log ended in a torn entry (a crash while writing); cutting it off");
        file.set_len(keep)?;
    }
    let body = &tail[..complete];
    let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let entry = serde_json::from_slice(&body[start..]).context("the audit log's last entry is unreadable")?;
    Ok(Some(entry))
}

/// An exclusive `flock` on the log, released on drop (or when the file closes).
struct FileLock(std::os::fd::RawFd);

impl FileLock {
    fn exclusive(file: &File) -> Result<Self> {
        let fd = file.as_raw_fd();
        // SAFETY: a valid fd.
        if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).context("locking the audit log");
        }
        Ok(Self(fd))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: the lock is dropped before the file that owns the fd.
        unsafe { libc::flock(self.0, libc::LOCK_UN) };
    }
}

/// Applies retention now and audits it: what was dropped, by whom (the
/// agent's hourly sweep, or an operator's `icr sweep`).
pub fn sweep(store: &crate::store::Store, db: &std::path::Path, retention_days: u32, by: &str) -> Result<String> {
    let dropped = store.sweep(retention_days, chrono::Utc::now())?;
    let span = match (dropped.first(), dropped.last()) {
        (Some(first), Some(last)) => format!(" ({first} .. {last})"),
        _ => String::new(),
    };
    let summary = format!("retention {retention_days} days: dropped {} day(s){span}", dropped.len());
    AuditLog::in_dir(db).append(AuditRecord {
        time: crate::icr::format_time(&chrono::Utc::now()),
        command: "sweep".into(),
        officer: Some(by.to_owned()),
        parameters: serde_json::json!({ "retention_days": retention_days, "dropped": dropped.iter().map(|d| d.to_string()).collect::<Vec<_>>() }),
        outcome: summary.clone(),
        result_count: dropped.len() as u64,
        ..AuditRecord::default()
    })?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> AuditRecord {
        AuditRecord {
            time: format!("2026-11-22T15:0{n}:00Z"),
            command: "query services".into(),
            authority: Some("met-police".into()),
            officer: Some("PC 1234".into()),
            reference: Some(format!("OP-{n}")),
            purpose: Some(2),
            parameters: serde_json::json!({ "device": "10.0.0.2" }),
            outcome: "answered".into(),
            result_count: n,
            result_sha256: None,
            // Half with gaps, half without the field at all: both verify.
            gaps: n % 2,
        }
    }

    fn log_with(n: u64) -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::in_dir(dir.path());
        for i in 1..=n {
            assert_eq!(log.append(record(i)).unwrap(), i);
        }
        (dir, log)
    }

    fn lines(log: &AuditLog) -> Vec<String> {
        std::fs::read_to_string(log.path()).unwrap().lines().map(str::to_owned).collect()
    }

    fn write(log: &AuditLog, lines: &[String]) {
        std::fs::write(log.path(), lines.join("\n") + "\n").unwrap();
    }

    #[test]
    fn an_intact_chain_verifies() {
        let (_dir, log) = log_with(4);
        assert_eq!(log.verify().unwrap(), 4);
    }

    #[test]
    fn an_edit_is_detected_and_named() {
        let (_dir, log) = log_with(3);
        let mut l = lines(&log);
        l[1] = l[1].replace("OP-2", "OP-9");
        write(&log, &l);
        let error = log.verify().unwrap_err().to_string();
        assert!(error.contains("entry 2") && error.contains("altered"), "{error}");
    }

    #[test]
    fn a_deletion_and_a_reordering_are_detected() {
        let (_dir, log) = log_with(3);
        let l = lines(&log);
        write(&log, &[l[0].clone(), l[2].clone()]);
        assert!(log.verify().unwrap_err().to_string().contains("line 2"));
        write(&log, &[l[1].clone(), l[0].clone(), l[2].clone()]);
        assert!(log.verify().is_err());
        // Dropping the tail cannot be seen from the chain alone, but a
        // re-hashed forgery of a middle entry cannot follow its successor.
        write(&log, &l);
        assert_eq!(log.verify().unwrap(), 3);
    }

    #[test]
    fn a_torn_last_line_is_cut_and_the_chain_goes_on() {
        let (_dir, log) = log_with(2);
        let mut file = OpenOptions::new().append(true).open(log.path()).unwrap();
        file.write_all(b"{\"seq\":3,\"prev\":\"ab").unwrap();
        drop(file);
        assert_eq!(log.append(record(3)).unwrap(), 3);
        assert_eq!(log.verify().unwrap(), 3);
    }
}
