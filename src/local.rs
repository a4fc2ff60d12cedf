//! The local API between `d7q get` and the daemon: a Unix socket speaking JSON lines.
//!
//! The client sends one request line; the daemon answers with progress lines and one final
//! line (`done` with the path of the verified content in its store, or `error` with the exit
//! code and message `d7q get` reports). The client then places a copy itself, through a
//! temporary file and a rename, with the user's own permissions.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::debug;

use crate::daemon::State;
use crate::peer::{GetError, GetOutcome, GetRequest, ProgressFn};
use crate::store::{self, StoreError};

/// Longest request line accepted.
pub const MAX_REQUEST_LINE: usize = 256 << 10;
/// Local clients served at once.
pub const MAX_CLIENTS: usize = 256;

/// A download request from a local client.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    /// URL.
    pub url: String,
    /// Headers for the origin.
    pub headers: Vec<(String, String)>,
    /// Expected digest, `sha256:HEX`.
    pub digest: Option<String>,
}

/// One answer line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// Bytes done, total.
    Progress(u64, u64),
    /// The content is complete and verified at `path`.
    Done {
        /// Path in the daemon's store.
        path: PathBuf,
        /// Length.
        length: u64,
        /// SHA-256, `sha256:HEX`.
        sha256: String,
    },
    /// The download failed.
    Error {
        /// Exit code for `d7q get`.
        code: i32,
        /// One-line message.
        message: String,
    },
}

/// What the daemon does with a request.
pub type Handler = Arc<dyn Fn(Request) -> watch::Receiver<State> + Send + Sync>;

/// Binds the socket, replacing a stale one, readable and writable by the owner and group.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        // A socket nobody answers on is left over from a crash.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running daemon", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Serves local clients.
pub async fn serve(listener: UnixListener, handler: Handler) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, handler).await {
                debug!(error = %e, "local client");
            }
            drop(permit);
        });
    }
}

async fn serve_one(stream: UnixStream, handler: Handler) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST_LINE as u64));
    reader.read_line(&mut line).await?;
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let a = Answer::Error {
                code: crate::exit::USAGE,
                message: format!("bad request: {e}"),
            };
            return write_answer(&mut write, &a).await;
        }
    };
    let mut rx = handler(req);
    loop {
        let state = rx.borrow_and_update().clone();
        match state {
            State::Running(done, total) => {
                write_answer(&mut write, &Answer::Progress(done, total)).await?
            }
            State::Done(Ok(c)) => {
                let a = Answer::Done {
                    path: c.path,
                    length: c.length,
                    sha256: crate::task::format_digest(&c.sha256),
                };
                return write_answer(&mut write, &a).await;
            }
            State::Done(Err(f)) => {
                return write_answer(
                    &mut write,
                    &Answer::Error {
                        code: f.code,
                        message: f.message,
                    },
                )
                .await
            }
        }
        if rx.changed().await.is_err() {
            // The download task ended without a final state: report it rather than hang.
            let state = rx.borrow().clone();
            if let State::Done(_) = state {
                continue;
            }
            let a = Answer::Error {
                code: crate::exit::FAILURE,
                message: "daemon download ended".into(),
            };
            return write_answer(&mut write, &a).await;
        }
    }
}

async fn write_answer(w: &mut tokio::net::unix::OwnedWriteHalf, a: &Answer) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(a).expect("answer serializes");
    line.push(b'\n');
    w.write_all(&line).await
}

/// Whether a daemon answers on `path`.
pub fn daemon_running(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Downloads through the daemon at `socket` and places the result at `req.output`.
pub async fn get(
    socket: &Path,
    req: &GetRequest,
    progress: Option<ProgressFn>,
) -> Result<GetOutcome, GetError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| GetError::Mesh(format!("daemon socket {}: {e}", socket.display())))?;
    let (read, mut write) = stream.into_split();
    let request = Request {
        url: req.url.clone(),
        headers: req.headers.clone(),
        digest: req.digest.as_ref().map(crate::task::format_digest),
    };
    let mut line = serde_json::to_vec(&request).expect("request serializes");
    line.push(b'\n');
    write
        .write_all(&line)
        .await
        .map_err(|e| GetError::Mesh(format!("daemon socket: {e}")))?;
    let mut lines = BufReader::new(read).lines();
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(|e| GetError::Mesh(format!("daemon socket: {e}")))?
            .ok_or_else(|| GetError::Mesh("the daemon closed the connection".into()))?;
        let answer: Answer = serde_json::from_str(&line)
            .map_err(|e| GetError::Mesh(format!("daemon answered nonsense: {e}")))?;
        match answer {
            Answer::Progress(done, total) => {
                if let Some(p) = &progress {
                    p(done, total);
                }
            }
            Answer::Done {
                path,
                length,
                sha256,
            } => {
                let sha = crate::task::parse_digest(&sha256)
                    .ok_or_else(|| GetError::Mesh("daemon sent a bad digest".into()))?;
                let output = req.output.clone();
                tokio::task::spawn_blocking(move || place(&path, &output))
                    .await
                    .map_err(|e| GetError::Mesh(format!("placing the file: {e}")))??;
                return Ok(GetOutcome {
                    length,
                    sha256: sha,
                    from_supernode: None,
                    from_peers: 0,
                });
            }
            Answer::Error { code, message } => {
                return Err(match code {
                    crate::exit::ORIGIN => GetError::Origin(message),
                    crate::exit::INTEGRITY => GetError::Integrity(message),
                    crate::exit::LOCAL => GetError::Mesh(format!("daemon: {message}")),
                    _ => GetError::Mesh(message),
                })
            }
        }
    }
}

/// Puts a copy of the store's file at `target` through a temporary name and a rename.
fn place(source: &Path, target: &Path) -> Result<(), StoreError> {
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.d7q-{:016x}.part", rand::random::<u64>()));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source: std::io::Error| StoreError::Io { path, source }
    };
    // A copy, not a hard link: the user may write to their file, and a shared inode would
    // corrupt the store. std::fs::copy uses copy_file_range, so the bytes do not pass through
    // this process (and filesystems that can share extents do).
    let len = std::fs::metadata(source).map_err(io(source))?.len();
    store::check_free_space(&dir, len)?;
    let copied = std::fs::copy(source, &tmp).and_then(|_| std::fs::File::open(&tmp)?.sync_all());
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&tmp)(e));
    }
    std::fs::rename(&tmp, target).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(target)(e)
    })
}
