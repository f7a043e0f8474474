//! The audit log: one line per query or refusal, each carrying the hash of the
//! line before, so that an edit, a deletion or a reordering is detectable
//! (`icr audit verify`). Appends are serialised with a file lock and synced
//! before the answer is given.
//!
//! A hash chain alone can be rewritten by whoever can write the file: delete
//! an entry, recompute the rest. So with `[audit] key` (a file outside the
//! store, root's only) each entry also carries an HMAC-SHA256 under that
//! key, which a rewrite cannot recompute; and each entry's head (`SEQ:HASH`)
//! is sent to the system journal, where a cut tail shows
//! (`icr audit verify --head`).
use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use crate::config::{AuditSection, StoreConfig};
use anyhow::{Context as _, Result, bail};
use ring::hmac;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// systemd-journald's native socket.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// The shortest key accepted: HMAC-SHA256's block of strength.
const MIN_KEY_BYTES: usize = 32;

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What is recorded about one query. The chain fields are added on append.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub time: String,
    pub command: String,
    pub authority: Option<String>,
    pub officer: Option<String>,
    pub reference: Option<String>,
    pub purpose: Option<crate::config::Purpose>,
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
    /// SHA-256 of the configuration that authorised (or refused) the
    /// request; absent when the store has no configuration file, and in
    /// entries written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
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
    /// HMAC-SHA256 of the same bytes as `hash`, under `[audit] key`
    /// (absent from entries written without a key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
}

impl Entry {
    /// What `hash` and `mac` are computed over.
    fn body(seq: u64, prev: &str, record: &AuditRecord) -> Result<Vec<u8>> {
        #[derive(Serialize)]
        struct Body<'a> {
            seq: u64,
            prev: &'a str,
            #[serde(flatten)]
            record: &'a AuditRecord,
        }
        Ok(serde_json::to_vec(&Body { seq, prev, record })?)
    }
}

/// The chain's head as the operator keeps it elsewhere: `SEQ:HASH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

impl std::str::FromStr for Head {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (seq, hash) = text.split_once(':').ok_or_else(|| format!("{text:?} is not SEQ:HASH"))?;
        let seq = seq.parse().map_err(|_| format!("{seq:?} is not an entry's sequence number"))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{hash:?} is not an entry's hash (64 hex digits)"));
        }
        Ok(Self { seq, hash: hash.to_ascii_lowercase() })
    }
}

pub struct AuditLog {
    path: PathBuf,
    key: Option<hmac::Key>,
    journal: Option<PathBuf>,
    /// Every entry must carry a MAC, not only those after the first that
    /// does: the key was named from outside the store (`verify --key`), so
    /// nothing in the store says which entries predate it.
    every_entry_keyed: bool,
}

/// What `verify` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    pub entries: u64,
    /// Entries at the start written before a key was configured.
    pub unauthenticated: u64,
}

impl AuditLog {
    /// The log of the store in `dir`, without a key: entries are chained but
    /// not authenticated (tests, and stores without `[audit] key`).
    pub fn in_dir(dir: &Path) -> Self {
        Self { path: dir.join("audit.log"), key: None, journal: None, every_entry_keyed: false }
    }

    /// The log of the store in `dir`, as `section` configures it; refuses a
    /// key that is missing, short, inside the store, or readable by anyone
    /// but root.
    pub fn open(dir: &Path, section: &AuditSection) -> Result<Self> {
        let key = section.key.as_deref().map(|path| load_key(path, dir)).transpose()?;
        let journal =
            section.journal.clone().or_else(|| Some(PathBuf::from(JOURNAL_SOCKET)).filter(|path| path.exists()));
        Ok(Self { path: dir.join("audit.log"), key, journal, every_entry_keyed: false })
    }

    /// The log of the store in `dir`, to be verified against the key at
    /// `key`, named by whoever verifies rather than by the store's own
    /// configuration (which whoever rewrites the store can edit): every
    /// entry must carry a valid MAC.
    pub fn verifying_with(dir: &Path, key: &Path) -> Result<Self> {
        Ok(Self { path: dir.join("audit.log"), key: Some(load_key(key, dir)?), journal: None, every_entry_keyed: true })
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
        let body = Entry::body(seq, &prev, &record)?;
        let hash = hex::encode(Sha256::digest(&body));
        let mac = self.key.as_ref().map(|key| hex::encode(hmac::sign(key, &body)));
        let head = format!("{seq}:{hash}");
        let mut line = serde_json::to_vec(&Entry { seq, prev, record, hash, mac })?;
        line.push(b'\n');
        file.write_all(&line).context("writing the audit log")?;
        file.sync_data().context("syncing the audit log")?;
        line.pop();
        if let Some(journal) = &self.journal {
            // The entry is durable already; a journal that cannot take the
            // head is reported, not fatal.
            if let Err(error) = send_head(journal, &head) {
                log::warn!("could not send the audit head {head} to {}: {error}", journal.display());
            }
        }
        Ok((seq, String::from_utf8(line)?))
    }

    /// Checks the whole chain and that it still reaches `head` (a sequence
    /// number and its hash, kept elsewhere: a chain cut after it is whole
    /// but ends early); returns the number of entries, or the first broken one.
    pub fn verify_to(&self, head: Option<&Head>) -> Result<Verified> {
        let (verified, hashes) = self.walk(head.map(|h| h.seq))?;
        if let Some(head) = head {
            match hashes {
                Some(hash) if hash == head.hash => {}
                Some(hash) => {
                    bail!("entry {} has the hash {hash}, not the head's {}: the log was rewritten", head.seq, head.hash)
                }
                None => bail!(
                    "the log has {} entries but the head names entry {}: its tail was cut",
                    verified.entries,
                    head.seq
                ),
            }
        }
        Ok(verified)
    }

    /// Checks the whole chain; returns the number of entries, or the first
    /// broken one.
    pub fn verify(&self) -> Result<u64> {
        self.walk(None).map(|(verified, _)| verified.entries)
    }

    /// Walks the chain; returns what it found and the hash of entry `seq`,
    /// if asked for and present. Every entry from the first that carries a
    /// MAC on must carry one, key or no key; with a key each MAC must be
    /// valid and the last entry must carry one (and, with a key named from
    /// outside, every entry); without one a log with MACs is not taken as
    /// verified.
    fn walk(&self, seq: Option<u64>) -> Result<(Verified, Option<String>)> {
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Verified { entries: 0, unauthenticated: 0 }, None));
            }
            Err(error) => {
                return Err(error).with_context(|| format!("opening {}", self.path.display()));
            }
        };
        let mut prev = GENESIS.to_string();
        let mut expected_seq = 1;
        let mut found = None;
        let mut unauthenticated = 0;
        // Whether an entry so far carried a MAC: from then on every one must,
        // with a key or without (no setting can lower that bar).
        let mut keyed = false;
        for (index, line) in BufReader::new(file).lines().enumerate() {
            let line_no = index + 1;
            let line = line.with_context(|| format!("reading line {line_no}"))?;
            let entry: Entry = serde_json::from_str(&line)
                .with_context(|| format!("entry at line {line_no} is not a valid audit entry"))?;
            if entry.seq != expected_seq {
                bail!(
                    "entry at line {line_no}: sequence {} where {expected_seq} was expected (an entry was removed or moved)",
                    entry.seq
                );
            }
            if entry.prev != prev {
                bail!("entry {} (line {line_no}) does not follow the entry before it", entry.seq);
            }
            let body = Entry::body(entry.seq, &entry.prev, &entry.record)?;
            if hex::encode(Sha256::digest(&body)) != entry.hash {
                bail!("entry {} (line {line_no}) was altered: its hash does not match its content", entry.seq);
            }
            match &entry.mac {
                Some(mac) => {
                    if let Some(key) = &self.key
                        && hmac::verify(key, &body, &hex::decode(mac).unwrap_or_default()).is_err()
                    {
                        bail!(
                            "entry {} (line {line_no}) is not authenticated by the audit key: the log was rewritten (or the key \
                             is not the one it was written with)",
                            entry.seq
                        );
                    }
                    keyed = true;
                }
                None if keyed => bail!(
                    "entry {} (line {line_no}) carries no MAC after entries that did: the log was rewritten without the key",
                    entry.seq
                ),
                None if self.every_entry_keyed => bail!(
                    "entry {} (line {line_no}) carries no MAC, and the key given must authenticate every entry: the log was \
                     rewritten without it, or written without a key",
                    entry.seq
                ),
                None => unauthenticated += 1,
            }
            if Some(entry.seq) == seq {
                found = Some(entry.hash.clone());
            }
            prev = entry.hash;
            expected_seq += 1;
        }
        let entries = expected_seq - 1;
        if keyed && self.key.is_none() {
            bail!(
                "the log's entries are authenticated: verify it with its key (--key FILE, or the store's [audit] key)"
            );
        }
        if self.key.is_some() && entries > 0 && !keyed {
            bail!(
                "no entry of the {entries} is authenticated by the audit key: the log was rewritten without it, or nothing was \
                 audited since the key was configured"
            );
        }
        Ok((Verified { entries, unauthenticated: if self.key.is_some() { unauthenticated } else { entries } }, found))
    }
}

/// Reads the audit key at `path`, which must be root's alone and outside the
/// store in `store_dir` (whoever can rewrite the store must not hold it).
fn load_key(path: &Path, store_dir: &Path) -> Result<hmac::Key> {
    let bytes = crate::config::read_secret(path, "the audit key", Some(store_dir))?;
    if bytes.len() < MIN_KEY_BYTES {
        bail!(
            "the audit key {} holds {} bytes; it needs at least {MIN_KEY_BYTES} random bytes (head -c 32 /dev/urandom)",
            path.display(),
            bytes.len()
        );
    }
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
}

/// Sends an entry's head to the journal socket, in journald's native
/// format (a datagram of `FIELD=value` lines).
fn send_head(socket: &Path, head: &str) -> std::io::Result<()> {
    let message = format!("MESSAGE=icr audit head {head}\nSYSLOG_IDENTIFIER=icr\nPRIORITY=6\nICR_AUDIT_HEAD={head}\n");
    std::os::unix::net::UnixDatagram::unbound()?.send_to(message.as_bytes(), socket)?;
    Ok(())
}

/// The last complete entry, however long. A torn last line (a crash
/// mid-write, never acknowledged) is cut off so the chain continues from the
/// last whole entry.
fn last_entry(file: &mut File) -> Result<Option<Entry>> {
    let len = file.seek(SeekFrom::End(0))?;
    // Read back from the end in chunks until the last two newlines (or the
    // start of the file) are in hand.
    const CHUNK: u64 = 64 * 1024;
    let mut tail: Vec<u8> = Vec::new();
    let mut start = len;
    let (complete, line_start) = loop {
        let newlines: Vec<usize> =
            tail.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i).rev().take(2).collect();
        match newlines.as_slice() {
            [last, before, ..] => break (Some(*last), *before + 1),
            [last] if start == 0 => break (Some(*last), 0),
            [] if start == 0 => break (None, 0),
            _ => {}
        }
        let read = CHUNK.min(start);
        start -= read;
        file.seek(SeekFrom::Start(start))?;
        let mut chunk = vec![0; read as usize];
        file.read_exact(&mut chunk).context("reading the audit log")?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
    };
    let Some(complete) = complete else {
        if len > 0 {
            log::warn!("the audit log held only a torn entry (a crash while writing); cutting it off");
            file.set_len(0)?;
        }
        return Ok(None);
    };
    if complete + 1 != tail.len() {
        log::warn!("the audit log ended in a torn entry (a crash while writing); cutting it off");
        file.set_len(start + complete as u64 + 1)?;
    }
    let entry =
        serde_json::from_slice(&tail[line_start..complete]).context("the audit log's last entry is unreadable")?;
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

/// Makes the agent's configuration (`config_file`; `None`: the store's own)
/// govern `store`, in `db`, from now on: recorded in the store, so that
/// questions asked after the agent stops are authorised by the same file,
/// and audited when it changes (which file authorises the questions is as
/// much the auditor's business as the questions). This is how a store moves
/// to another configuration: its agent is started with the new one.
pub fn govern(store: &crate::store::Store, db: &Path, config_file: Option<&Path>) -> Result<StoreConfig> {
    let governing = StoreConfig::named(db, config_file)?;
    // Loaded first: a file that would not load is not recorded.
    let loaded = governing.load()?;
    let recorded = governing.agent_file();
    let before = store.govern(recorded).context("recording the store's configuration")?;
    if before.as_deref() != recorded {
        let shown = |path: Option<&Path>| path.unwrap_or(&db.join("icr.toml")).display().to_string();
        let (from, to) = (shown(before.as_deref()), shown(recorded));
        log::info!("the store {} is governed by {to} from now on (it was by {from})", db.display());
        AuditLog::open(db, &loaded.config.audit)?.append(AuditRecord {
            time: crate::record::format_time(&chrono::Utc::now()),
            command: "govern".into(),
            officer: Some(crate::query::request::Operator::this_process().to_string()),
            parameters: serde_json::json!({ "from": from, "to": to }),
            outcome: format!("the store's questions are authorised by {to} from now on"),
            config_sha256: loaded.sha256.clone(),
            ..AuditRecord::default()
        })?;
    }
    Ok(governing)
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
            purpose: Some(crate::config::Purpose::Services),
            parameters: serde_json::json!({ "device": "10.0.0.2" }),
            outcome: "answered".into(),
            result_count: n,
            result_sha256: None,
            // Half with gaps, half without the field at all: both verify.
            gaps: n % 2,
            config_sha256: None,
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

    /// A key file as `[audit] key` wants it: root's, 0400, outside `store`.
    fn key_file(dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.join("audit.key");
        std::fs::write(&path, [7u8; 32]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        path
    }

    /// Deletes entry `gone` and recomputes the chain after it, as someone
    /// who can write the file but lacks the key would.
    fn rechain_without(log: &AuditLog, gone: u64) {
        let mut prev = GENESIS.to_string();
        let mut out = Vec::new();
        for line in lines(log) {
            let mut entry: Entry = serde_json::from_str(&line).unwrap();
            if entry.seq == gone {
                continue;
            }
            entry.seq = out.len() as u64 + 1;
            entry.prev = prev.clone();
            entry.hash = hex::encode(Sha256::digest(Entry::body(entry.seq, &entry.prev, &entry.record).unwrap()));
            prev = entry.hash.clone();
            out.push(serde_json::to_string(&entry).unwrap());
        }
        write(log, &out);
    }

    #[test]
    fn a_rechained_log_verifies_without_a_key_and_fails_with_one() {
        let store = tempfile::tempdir().unwrap();
        let keys = tempfile::tempdir().unwrap();
        let section = AuditSection { key: Some(key_file(keys.path())), journal: None };
        let log = AuditLog::open(store.path(), &section).unwrap();
        for i in 1..=4 {
            log.append(record(i)).unwrap();
        }
        assert_eq!(log.verify_to(None).unwrap(), Verified { entries: 4, unauthenticated: 0 });
        rechain_without(&log, 2);
        let error = format!("{:#}", log.verify_to(None).unwrap_err());
        assert!(error.contains("entry 2 (line 2) is not authenticated by the audit key"), "{error}");
        // Stripping every MAC does not help either.
        strip_macs(&log);
        // The chain alone is whole again (what `icr audit verify` said
        // before there was a key): only the key tells.
        assert_eq!(AuditLog::in_dir(store.path()).verify().unwrap(), 3);
        let error = format!("{:#}", log.verify_to(None).unwrap_err());
        assert!(error.contains("no entry of the 3 is authenticated"), "{error}");
    }

    #[test]
    fn entries_from_before_the_key_are_counted_and_none_may_lack_it_after() {
        let store = tempfile::tempdir().unwrap();
        let keys = tempfile::tempdir().unwrap();
        let unkeyed = AuditLog::in_dir(store.path());
        unkeyed.append(record(1)).unwrap();
        unkeyed.append(record(2)).unwrap();
        let keyed =
            AuditLog::open(store.path(), &AuditSection { key: Some(key_file(keys.path())), journal: None }).unwrap();
        keyed.append(record(3)).unwrap();
        assert_eq!(keyed.verify_to(None).unwrap(), Verified { entries: 3, unauthenticated: 2 });
        unkeyed.append(record(4)).unwrap();
        let error = format!("{:#}", keyed.verify_to(None).unwrap_err());
        assert!(error.contains("entry 4 (line 4) carries no MAC after entries that did"), "{error}");
        // Without a key the MACs cannot be checked, but a MAC-less entry
        // after a keyed one is still a rewrite.
        let error = format!("{:#}", unkeyed.verify_to(None).unwrap_err());
        assert!(error.contains("entry 4 (line 4) carries no MAC after entries that did"), "{error}");
    }

    /// Drops every entry's MAC, as whoever lacks the key would to hide a
    /// rewrite (the chain is untouched: the MAC is not part of the hash).
    fn strip_macs(log: &AuditLog) {
        let stripped: Vec<String> = lines(log)
            .into_iter()
            .map(|line| {
                let mut entry: Entry = serde_json::from_str(&line).unwrap();
                entry.mac = None;
                serde_json::to_string(&entry).unwrap()
            })
            .collect();
        write(log, &stripped);
    }

    #[test]
    fn a_key_named_from_outside_wants_every_entry_authenticated() {
        let store = tempfile::tempdir().unwrap();
        let keys = tempfile::tempdir().unwrap();
        let key = key_file(keys.path());
        let keyed = AuditLog::open(store.path(), &AuditSection { key: Some(key.clone()), journal: None }).unwrap();
        for i in 1..=3 {
            keyed.append(record(i)).unwrap();
        }
        let outside = AuditLog::verifying_with(store.path(), &key).unwrap();
        assert_eq!(outside.verify_to(None).unwrap(), Verified { entries: 3, unauthenticated: 0 });
        rechain_without(&keyed, 2);
        strip_macs(&keyed);
        // With no key in hand the rewrite is a whole chain; the key named
        // from outside finds it, whatever the store's configuration says.
        assert_eq!(AuditLog::in_dir(store.path()).verify().unwrap(), 2);
        let error = format!("{:#}", outside.verify_to(None).unwrap_err());
        assert!(
            error.contains("entry 1 (line 1) carries no MAC, and the key given must authenticate every entry"),
            "{error}"
        );
        // A log written before any key is not taken for authenticated either.
        let plain = tempfile::tempdir().unwrap();
        AuditLog::in_dir(plain.path()).append(record(1)).unwrap();
        assert!(AuditLog::verifying_with(plain.path(), &key).unwrap().verify().is_err());
    }

    #[test]
    fn a_mac_less_entry_after_a_keyed_one_fails_with_no_key_at_all() {
        let store = tempfile::tempdir().unwrap();
        let keys = tempfile::tempdir().unwrap();
        let keyed =
            AuditLog::open(store.path(), &AuditSection { key: Some(key_file(keys.path())), journal: None }).unwrap();
        keyed.append(record(1)).unwrap();
        AuditLog::in_dir(store.path()).append(record(2)).unwrap();
        let error = format!("{:#}", AuditLog::in_dir(store.path()).verify().unwrap_err());
        assert!(
            error.contains("entry 2 (line 2) carries no MAC after entries that did: the log was rewritten"),
            "{error}"
        );
        // Whole and keyed, but no key to check it with: not verified.
        let whole = tempfile::tempdir().unwrap();
        let keyed =
            AuditLog::open(whole.path(), &AuditSection { key: Some(key_file(keys.path())), journal: None }).unwrap();
        keyed.append(record(1)).unwrap();
        let error = format!("{:#}", AuditLog::in_dir(whole.path()).verify().unwrap_err());
        assert!(error.contains("verify it with its key (--key FILE"), "{error}");
    }

    #[test]
    fn a_key_must_be_roots_alone_long_and_outside_the_store() {
        use std::os::unix::fs::PermissionsExt as _;
        let store = tempfile::tempdir().unwrap();
        let keys = tempfile::tempdir().unwrap();
        let open =
            |path: &Path| AuditLog::open(store.path(), &AuditSection { key: Some(path.to_path_buf()), journal: None });
        let key = key_file(keys.path());
        assert!(open(&key).is_ok());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(format!("{:#}", open(&key).err().unwrap()).contains("readable by root only"));
        let inside = key_file(store.path());
        assert!(format!("{:#}", open(&inside).err().unwrap()).contains("is inside the store"));
        let short = keys.path().join("short.key");
        std::fs::write(&short, b"too short").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(format!("{:#}", open(&short).err().unwrap()).contains("needs at least 32"));
        assert!(format!("{:#}", open(&keys.path().join("missing")).err().unwrap()).contains("reading the audit key"));
    }

    #[test]
    fn each_head_goes_to_the_journal() {
        let store = tempfile::tempdir().unwrap();
        let journal = store.path().join("journal.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&journal).unwrap();
        let log = AuditLog::open(store.path(), &AuditSection { key: None, journal: Some(journal) }).unwrap();
        let (seq, line) = log.append_entry(record(1)).unwrap();
        let entry: Entry = serde_json::from_str(&line).unwrap();
        let mut buffer = [0u8; 512];
        let n = socket.recv(&mut buffer).unwrap();
        let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
        assert!(message.contains(&format!("\nICR_AUDIT_HEAD={seq}:{}\n", entry.hash)), "{message}");
        assert!(message.starts_with("MESSAGE=icr audit head "), "{message}");
    }

    #[test]
    fn entries_of_any_size_chain_on() {
        let (_dir, log) = log_with(2);
        let mut big = record(3);
        big.parameters = serde_json::json!({ "services": vec!["x".repeat(100); 2000] });
        assert_eq!(log.append(big).unwrap(), 3, "a 200 KB entry");
        assert_eq!(log.append(record(4)).unwrap(), 4, "and one after it");
        assert_eq!(log.verify().unwrap(), 4);
        // A torn last line after a long one is cut, the chain goes on.
        let mut bytes = std::fs::read(log.path()).unwrap();
        bytes.extend_from_slice(b"{\"seq\":5,\"prev");
        std::fs::write(log.path(), bytes).unwrap();
        assert_eq!(log.append(record(5)).unwrap(), 5);
        assert_eq!(log.verify().unwrap(), 5);
    }

    #[test]
    fn a_cut_tail_is_found_against_the_head() {
        let (_dir, log) = log_with(4);
        let last: Entry = serde_json::from_str(&lines(&log)[3]).unwrap();
        let head: Head = format!("4:{}", last.hash).parse().unwrap();
        assert_eq!(log.verify_to(Some(&head)).unwrap().entries, 4);
        write(&log, &lines(&log)[..3]);
        let error = format!("{:#}", log.verify_to(Some(&head)).unwrap_err());
        assert!(error.contains("the log has 3 entries but the head names entry 4: its tail was cut"), "{error}");
        let other: Head = format!("2:{}", last.hash).parse().unwrap();
        assert!(format!("{:#}", log.verify_to(Some(&other)).unwrap_err()).contains("the log was rewritten"));
        assert!("4:abc".parse::<Head>().is_err() && "x:".parse::<Head>().is_err());
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
