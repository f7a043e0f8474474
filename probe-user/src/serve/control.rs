//! The agent's local socket (`DIR/icr.sock`, or the configuration's
//! `socket`): while the agent holds the store, the command line sends the
//! requests that name the same `--db` here, and the agent's desk answers them
//! from its open store. Root, the agent's own user and the members of the
//! socket file's group may ask (mode 0660: the file says so, and so must
//! the peer's credentials); nobody else.
//!
//! One order per connection: a JSON line, `{"query": REQUEST}` (a
//! `query::Request`) or `{"sweep": {"config": null, "sudo_user": null}}`
//! (a `query::Sweep` by the peer's user); the answer is a JSON
//! line `{"status": N, "error": "..."}` followed by the answer's body.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::{
        fd::{AsRawFd as _, RawFd},
        unix::{
            fs::{MetadataExt as _, PermissionsExt as _},
            net::UnixStream as StdUnixStream,
        },
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use log::warn;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader as AsyncBufReader},
    net::{UnixListener, UnixStream},
};

use crate::{
    config::StoreConfig,
    query::{
        Desk, Request,
        request::{Operator, Sweep, Sweeper},
    },
    store::{Store, gaps::Gap},
};

const SOCKET_NAME: &str = "icr.sock";
/// A request line longer than this is refused.
const MAX_REQUEST: usize = 1 << 20;

/// What the command line asks of the agent: one JSON line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Order {
    /// A question, or a listing: answered by the agent's desk.
    Query(Box<Request>),
    /// Apply retention now: a sweep by the peer's user (`sudo_user` as the
    /// command line's environment says). `config` is the configuration the
    /// operator named, refused unless it is the agent's.
    Sweep {
        config: Option<PathBuf>,
        #[serde(default)]
        sudo_user: Option<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    /// The exit status the command line should give: 0, 1, or 3 (refused).
    status: i32,
    error: Option<String>,
    /// Capture gaps in the answer's window, for the command line to show.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    gaps: Vec<Gap>,
}

/// What the agent answered: its output is written already.
#[derive(Debug)]
pub struct Answer {
    pub status: i32,
    pub error: Option<String>,
    pub gaps: Vec<Gap>,
}

/// The agent's socket for the store in `db`: the configuration's `socket`,
/// else `DIR/icr.sock`.
pub fn socket_path(db: &Path, config: &crate::config::Config) -> PathBuf {
    config.socket.clone().unwrap_or_else(|| db.join(SOCKET_NAME))
}

/// Who may ask: root, the agent's own user, and the members of the socket
/// file's group (in a setgid directory such as the package's /run/icr, the
/// directory's group).
#[derive(Clone, Copy)]
struct Admitted {
    agent_uid: u32,
    group: u32,
}

impl Admitted {
    fn admits(self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        uid == 0 || uid == self.agent_uid || gid == self.group || groups.contains(&self.group)
    }
}

/// Serves the socket until the agent stops. Queries are authorised by
/// `authorising`, the agent's configuration, whatever the request names.
pub fn serve(socket: &Path, db: &Path, authorising: StoreConfig, store: Store) -> Result<()> {
    let path = socket.to_path_buf();
    let db = db.to_path_buf();
    if path.exists() {
        std::fs::remove_file(&path).with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
    // SAFETY: geteuid cannot fail.
    let agent_uid = unsafe { libc::geteuid() };
    let admitted = Admitted { agent_uid, group: std::fs::metadata(&path)?.gid() };
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let (db, store, authorising) = (db.clone(), store.clone(), authorising.clone());
                    tokio::spawn(async move {
                        if let Err(error) = answer(stream, admitted, db, store, authorising).await {
                            warn!("a local query failed: {error:#}");
                        }
                    });
                }
                // Out of file descriptors, say: the socket stays, and is
                // tried again shortly.
                Err(error) => {
                    warn!("the query socket could not accept a connection: {error}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

async fn answer(
    stream: UnixStream,
    admitted: Admitted,
    db: PathBuf,
    store: Store,
    authorising: StoreConfig,
) -> Result<()> {
    // The file mode admits the socket's group, and so must the peer's credentials.
    let peer = stream.peer_cred()?;
    let groups = peer_groups(stream.as_raw_fd())?;
    let (reader, mut writer) = stream.into_split();
    if !admitted.admits(peer.uid(), peer.gid(), &groups) {
        let reply = Reply {
            status: 3,
            error: Some("refused: the local socket is for root and the members of its group".into()),
            gaps: Vec::new(),
        };
        writer.write_all(&reply_line(&reply)?).await?;
        writer.shutdown().await?;
        // Its order is read and dropped, briefly: closing with it unread would
        // reset the connection before the refusal is read.
        let mut order = String::new();
        let mut reader = AsyncBufReader::new(tokio::io::AsyncReadExt::take(reader, MAX_REQUEST as u64));
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), reader.read_line(&mut order)).await;
        return Ok(());
    }
    let mut line = String::new();
    AsyncBufReader::new(tokio::io::AsyncReadExt::take(reader, MAX_REQUEST as u64)).read_line(&mut line).await?;
    let (reply, output) = match serde_json::from_str::<Order>(&line) {
        Ok(order) => {
            let db = db.clone();
            tokio::task::spawn_blocking(move || run(order, peer.uid(), &db, &store, &authorising)).await?
        }
        Err(error) => {
            (Reply { status: 1, error: Some(format!("a malformed order: {error}")), gaps: Vec::new() }, Vec::new())
        }
    };
    writer.write_all(&reply_line(&reply)?).await?;
    writer.write_all(&output).await?;
    writer.shutdown().await?;
    Ok(())
}

/// Carries out an order of the peer `uid` with the agent's store.
fn run(order: Order, uid: u32, db: &Path, store: &Store, governing: &StoreConfig) -> (Reply, Vec<u8>) {
    let desk = Desk::new(db, governing, store);
    let result = match order {
        Order::Query(request) => desk.answer(&request).map(|answer| (answer.body, answer.gaps)),
        Order::Sweep { config, sudo_user } => desk
            .sweep(&Sweep { by: Sweeper::Operator(Operator { uid, sudo_user }), config })
            .map(|summary| (format!("{summary}\n").into_bytes(), Vec::new())),
    };
    match result {
        Ok((output, gaps)) => (Reply { status: 0, error: None, gaps }, output),
        Err(failure) => {
            (Reply { status: failure.exit_status(), error: Some(failure.to_string()), gaps: Vec::new() }, Vec::new())
        }
    }
}

/// The connected peer's supplementary groups (SO_PEERGROUPS, Linux 4.13),
/// as they were when it connected.
fn peer_groups(fd: RawFd) -> std::io::Result<Vec<u32>> {
    const GID: usize = size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = (groups.len() * GID) as libc::socklen_t;
        // SAFETY: the buffer holds `len` bytes; the kernel writes at most that.
        let rc = unsafe {
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERGROUPS, groups.as_mut_ptr().cast(), &mut len)
        };
        if rc == 0 {
            groups.truncate(len as usize / GID);
            return Ok(groups);
        }
        let error = std::io::Error::last_os_error();
        // ERANGE: the kernel said how many there are.
        if error.raw_os_error() == Some(libc::ERANGE) && len as usize > groups.len() * GID {
            groups.resize(len as usize / GID, 0);
            continue;
        }
        return Err(error);
    }
}

fn reply_line(reply: &Reply) -> Result<Vec<u8>> {
    let mut line = serde_json::to_vec(reply)?;
    line.push(b'\n');
    Ok(line)
}

/// The command line's side: connects to the running agent's socket.
pub fn connect(socket: &Path) -> std::io::Result<StdUnixStream> {
    StdUnixStream::connect(socket)
}

/// Sends `order` to the agent over `stream` (from [`connect`]), copies the
/// output to `out`, and returns the exit status, error and gaps to report.
pub fn ask(mut stream: StdUnixStream, order: &Order, out: &mut dyn std::io::Write) -> Result<Answer> {
    let mut request = serde_json::to_vec(order)?;
    request.push(b'\n');
    // A refused caller's reply may come before its order is read: it still says why.
    if let Err(error) = stream.write_all(&request)
        && error.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(error.into());
    }
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    reader.read_line(&mut header)?;
    if header.is_empty() {
        bail!("the agent closed its socket without answering");
    }
    let reply: Reply = serde_json::from_str(&header).context("the agent's answer is malformed")?;
    std::io::copy(&mut reader.by_ref(), out)?;
    out.flush()?;
    Ok(Answer { status: reply.status, error: reply.error, gaps: reply.gaps })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        export::Format,
        query::{Ask, Who},
        store::test_records,
    };

    const POLICE: &str = "retention_days = 365\n[[authority]]\nname = \"met\"\nkind = \"police\"\npurposes = [2]\n";

    fn services(config: Option<PathBuf>, authority: &str) -> Order {
        Order::Query(Box::new(Request {
            ask: Ask::Services {
                device: "10.0.0.2".into(),
                from: "2026-11-22T00:00:00Z".into(),
                to: "2026-11-23T00:00:00Z".into(),
            },
            who: Who {
                authority: Some(authority.into()),
                officer: Some("PC 1".into()),
                reference: Some("OP-1".into()),
            },
            format: Format::Ndjson,
            bundle: None,
            config,
        }))
    }

    /// Sends one raw line to the socket; the reply's header and body.
    fn send(db: &Path, line: &[u8]) -> (Reply, Vec<u8>) {
        let mut stream = StdUnixStream::connect(db.join(SOCKET_NAME)).unwrap();
        stream.write_all(line).unwrap();
        stream.write_all(b"\n").unwrap();
        let mut reader = BufReader::new(stream);
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        let mut body = Vec::new();
        reader.read_to_end(&mut body).unwrap();
        (serde_json::from_str(&header).unwrap(), body)
    }

    #[test]
    fn the_socket_answers_typed_orders_with_the_agents_configuration_only() {
        let store_dir = tempfile::tempdir().unwrap();
        let db = store_dir.path();
        std::fs::write(db.join("icr.toml"), POLICE).unwrap();
        let store = test_records::open(db).unwrap();
        store.append(&test_records::samples(10)).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _serving = runtime.enter();
        let socket = db.join(SOCKET_NAME);
        runtime.block_on(async { serve(&socket, db, StoreConfig::of_agent(db, None), store.clone()) }).unwrap();
        let thread = std::thread::spawn({
            let db = db.to_path_buf();
            move || {
                let order = |order: &Order| send(&db, &serde_json::to_vec(order).unwrap());
                // Answered by the agent's desk.
                let (reply, body) = order(&services(None, "met"));
                assert_eq!((reply.status, reply.error.as_deref()), (0, None));
                assert!(!body.is_empty(), "the device's services");
                // A caller's own configuration, with authorities of its own: refused.
                let elsewhere = tempfile::tempdir().unwrap();
                let forged = elsewhere.path().join("mine.toml");
                std::fs::write(&forged, "[[authority]]\nname = \"fake\"\nkind = \"police\"\npurposes = [1, 2, 3]\n")
                    .unwrap();
                let (reply, body) = order(&services(Some(forged.clone()), "fake"));
                assert_eq!(reply.status, 3, "{:?}", reply.error);
                assert!(reply.error.unwrap().contains("authorised by the store's configuration"));
                assert!(body.is_empty());
                // The old argv protocol, with its own --db and --config, is no order.
                let argv = serde_json::json!({ "argv": ["icr", "query", "services", "--db", "/tmp/other", "--config", forged] });
                let (reply, _) = send(&db, argv.to_string().as_bytes());
                assert_eq!(reply.status, 1);
                assert!(reply.error.unwrap().contains("malformed order"));
                // A sweep naming another configuration is refused too.
                let (reply, _) = order(&Order::Sweep { config: Some(forged), sudo_user: None });
                assert_eq!(reply.status, 3, "{:?}", reply.error);
                let (reply, body) = order(&Order::Sweep { config: None, sudo_user: None });
                assert_eq!(reply.status, 0, "{:?}", reply.error);
                assert!(String::from_utf8_lossy(&body).contains("retention 365 days"));
            }
        });
        runtime.block_on(async {
            while !thread.is_finished() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        });
        thread.join().unwrap();
        let audit = std::fs::read_to_string(db.join("audit.log")).unwrap();
        let entries: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let outcomes: Vec<&str> = entries.iter().map(|e| e["outcome"].as_str().unwrap()).collect();
        assert_eq!(outcomes.len(), 4, "the answer, the refusal, the refused sweep, the sweep: {outcomes:?}");
        assert!(outcomes[2].starts_with("refused: the store is governed by its configuration"), "{outcomes:?}");
        // SAFETY: getuid cannot fail.
        let peer = unsafe { libc::getuid() };
        assert_eq!(entries[3]["officer"], format!("uid {peer}"), "the peer's user");
        assert_eq!(outcomes[0], "answered");
        assert!(
            outcomes[1].starts_with("refused: queries are authorised by the store's configuration"),
            "{outcomes:?}"
        );
        assert_eq!(entries[1]["authority"], "fake");
        assert_eq!(entries[0]["config_sha256"], entries[1]["config_sha256"], "both name the agent's configuration");
        assert!(entries[0]["config_sha256"].is_string());
    }

    /// One order sent from a thread of its own running as `uid` (primary
    /// group `gid`, supplementary `groups`): per-thread credentials, by the
    /// raw system calls (libc's setuid would change every thread's).
    fn send_as(socket: &Path, uid: u32, gid: u32, groups: &[u32], order: &Order) -> std::io::Result<(Reply, Vec<u8>)> {
        let (socket, groups, mut line) = (socket.to_path_buf(), groups.to_vec(), serde_json::to_vec(order).unwrap());
        std::thread::spawn(move || {
            // SAFETY: plain system calls on this thread's own credentials.
            unsafe {
                assert_eq!(libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()), 0);
                assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0);
                assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
            }
            let mut stream = StdUnixStream::connect(&socket)?;
            line.push(b'\n');
            // As `ask`: a refusal may come before the order is read.
            if let Err(error) = stream.write_all(&line)
                && error.kind() != std::io::ErrorKind::BrokenPipe
            {
                return Err(error);
            }
            let mut reader = BufReader::new(stream);
            let mut header = String::new();
            reader.read_line(&mut header)?;
            let mut body = Vec::new();
            reader.read_to_end(&mut body)?;
            Ok((serde_json::from_str(&header).unwrap(), body))
        })
        .join()
        .unwrap()
    }

    #[test]
    fn the_socket_answers_root_and_the_members_of_its_group_only() {
        const GROUP: u32 = 64_010;
        const NOBODY: u32 = 64_099;
        // SAFETY: geteuid cannot fail.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test changes a thread's user and groups: run it as root");
        let store_dir = tempfile::tempdir().unwrap();
        let db = store_dir.path().join("store");
        std::fs::create_dir(&db).unwrap();
        std::fs::write(db.join("icr.toml"), POLICE).unwrap();
        let store = test_records::open(&db).unwrap();
        store.append(&test_records::samples(10)).unwrap();
        // As the package's /run/icr: setgid, the group's, closed to others.
        let run = store_dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::os::unix::fs::chown(&run, Some(0), Some(GROUP)).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o2750)).unwrap();
        std::fs::set_permissions(store_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = run.join("icr.sock");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _serving = runtime.enter();
        runtime.block_on(async { serve(&socket, &db, StoreConfig::of_agent(&db, None), store.clone()) }).unwrap();
        let metadata = std::fs::metadata(&socket).unwrap();
        assert_eq!((metadata.gid(), metadata.permissions().mode() & 0o7777), (GROUP, 0o660));

        let thread = std::thread::spawn({
            let socket = socket.clone();
            move || {
                let order = services(None, "met");
                // A member, by a supplementary group or by its primary one: answered.
                for (uid, gid, groups) in [(64_001, 64_001, vec![GROUP]), (64_002, GROUP, vec![])] {
                    let (reply, body) = send_as(&socket, uid, gid, &groups, &order).unwrap();
                    assert_eq!((reply.status, reply.error.as_deref()), (0, None), "uid {uid}");
                    assert!(!body.is_empty(), "uid {uid}: the device's services");
                }
                // A member asks; it does not sweep (the agent's user is not its own).
                let sweep = Order::Sweep { config: None, sudo_user: None };
                let (reply, _) = send_as(&socket, 64_001, 64_001, &[GROUP], &sweep).unwrap();
                assert_eq!(reply.status, 3, "{:?}", reply.error);
                assert!(reply.error.unwrap().contains("a sweep is an operator's"));
                // Anyone else cannot reach it...
                let error = send_as(&socket, NOBODY, NOBODY, &[], &order).unwrap_err();
                assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied);
                // ...and, were the modes loosened, is refused by its credentials.
                std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o2755)).unwrap();
                std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
                let (reply, body) = send_as(&socket, NOBODY, NOBODY, &[], &order).unwrap();
                assert_eq!(reply.status, 3, "{:?}", reply.error);
                assert!(reply.error.unwrap().contains("members of its group"));
                assert!(body.is_empty());
            }
        });
        runtime.block_on(async {
            while !thread.is_finished() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        });
        thread.join().unwrap();
        let audit = std::fs::read_to_string(db.join("audit.log")).unwrap();
        assert_eq!(
            audit.lines().count(),
            3,
            "the two answers, the member's refused sweep, nothing for the refused caller"
        );
        assert!(audit.lines().nth(2).unwrap().contains(r#""officer":"uid 64001""#), "{audit}");
    }
}
