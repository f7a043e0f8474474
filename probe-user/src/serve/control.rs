//! The agent's local socket (`DIR/icr.sock`, root only): while the agent
//! holds the store, the query commands that name the same `--db` are sent
//! here and answered by the same code, with the agent's open store.
//!
//! One request per connection: a JSON line `{"argv": [...]}`; the answer is a
//! JSON line `{"status": N, "error": "..."}` followed by the command's output.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream as StdUnixStream},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser as _;
use log::warn;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader as AsyncBufReader},
    net::{UnixListener, UnixStream},
};

use crate::{
    serve::cli::{Cli, Command},
    serve::commands,
    config::StoreConfig,
    store::{Store, gaps::Gap},
};

const SOCKET_NAME: &str = "icr.sock";
/// A request line longer than this is refused.
const MAX_REQUEST: usize = 1 << 20;

/// A query through the socket: one JSON line.
#[derive(Serialize, Deserialize)]
pub struct Request {
    pub argv: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Reply {
    /// The exit status the command line should give: 0, 1, or 3 (refused).
    status: i32,
    error: Option<String>,
    /// Capture gaps in the answer's window, for the command line to show.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    gaps: Vec<Gap>,
}

/// What the agent answered: the output went to stdout already.
pub struct Answer {
    pub status: i32,
    pub error: Option<String>,
    pub gaps: Vec<Gap>,
}

pub fn socket_path(db: &Path) -> PathBuf {
    db.join(SOCKET_NAME)
}

/// Serves the socket until the agent stops. Queries are authorised by
/// `authorising`, the agent's configuration, whatever the request names.
pub fn serve(db: &Path, authorising: StoreConfig, store: Store) -> Result<()> {
    let path = socket_path(db);
    if path.exists() {
        std::fs::remove_file(&path).with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let (store, authorising) = (store.clone(), authorising.clone());
                    tokio::spawn(async move {
                        if let Err(error) = answer(stream, store, authorising).await {
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

async fn answer(stream: UnixStream, store: Store, authorising: StoreConfig) -> Result<()> {
    // Root only: the file mode says so, and so must the peer.
    let peer = stream.peer_cred()?;
    let (reader, mut writer) = stream.into_split();
    if peer.uid() != 0 {
        let reply = Reply { status: 3, error: Some("refused: the local socket is for root only".into()), gaps: Vec::new() };
        writer.write_all(&reply_line(&reply)?).await?;
        return Ok(());
    }
    let mut line = String::new();
    AsyncBufReader::new(tokio::io::AsyncReadExt::take(reader, MAX_REQUEST as u64)).read_line(&mut line).await?;
    let request: Request = serde_json::from_str(&line).context("a malformed request")?;
    let (reply, output) = tokio::task::spawn_blocking(move || run(request.argv, &store, &authorising)).await?;
    writer.write_all(&reply_line(&reply)?).await?;
    writer.write_all(&output).await?;
    writer.shutdown().await?;
    Ok(())
}

/// Runs a store-reading command line against the agent's store.
fn run(argv: Vec<String>, store: &Store, authorising: &StoreConfig) -> (Reply, Vec<u8>) {
    let mut output = Vec::new();
    let result = match Cli::try_parse_from(argv) {
        Ok(Cli { command: Command::Query(query) }) => commands::query(query, store, authorising, &mut output),
        Ok(Cli { command: Command::List(args) }) => commands::list(args, store, authorising, &mut output),
        Ok(Cli { command: Command::Sweep(args) }) => commands::sweep(args, store, authorising, &mut output).map(|()| Vec::new()),
        Ok(_) => Err(anyhow::anyhow!("only queries, list and sweep are answered on this socket")),
        Err(error) => Err(anyhow::anyhow!("{}", error.to_string().lines().next().unwrap_or("bad arguments"))),
    };
    let reply = match result {
        Ok(gaps) => Reply { status: 0, error: None, gaps },
        Err(error) => {
            output.clear();
            Reply { status: if commands::is_refusal(&error) { 3 } else { 1 }, error: Some(format!("{error:#}")), gaps: Vec::new() }
        }
    };
    (reply, output)
}

fn reply_line(reply: &Reply) -> Result<Vec<u8>> {
    let mut line = serde_json::to_vec(reply)?;
    line.push(b'\n');
    Ok(line)
}

/// The command line's side: sends `argv` to the agent of `db`, copies the
/// output to stdout, and returns the exit status, error and gaps to report.
pub fn ask(db: &Path, argv: Vec<String>) -> Result<Answer> {
    let path = socket_path(db);
    let mut stream = StdUnixStream::connect(&path)
        .with_context(|| format!("the store is in use, and its agent's socket {} does not answer", path.display()))?;
    let mut request = serde_json::to_vec(&Request { argv })?;
    request.push(b'\n');
    stream.write_all(&request)?;
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    reader.read_line(&mut header)?;
    if header.is_empty() {
        bail!("the agent closed its socket without answering");
    }
    let reply: Reply = serde_json::from_str(&header).context("the agent's answer is malformed")?;
    let mut stdout = std::io::stdout().lock();
    std::io::copy(&mut reader.by_ref(), &mut stdout)?;
    stdout.flush()?;
    Ok(Answer { status: reply.status, error: reply.error, gaps: reply.gaps })
}
