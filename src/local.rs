//! The local API between `d7q get` / `d7q pull` and the daemon: a Unix socket speaking JSON
//! lines.
//!
//! The client sends one request line; the daemon answers with progress lines and one final
//! line: `error` with the exit code and message the client reports, or `done` with the length
//! and SHA-256 of the content, followed by exactly that many bytes of it. The client writes them
//! to a temporary file next to its output, with the user's own permissions, hashes them as they
//! arrive, and renames the file into place only when the length, the daemon's digest and the
//! user's `--digest` all match. Content travels over the socket rather than as a path in the
//! daemon's store so that the store stays readable by the daemon's user only
//! ([`crate::store::private`]), and so that a client never opens a file someone else named.
//!
//! Trust: a client talks only to a socket owned by root or by itself, reached through
//! directories nobody else may change ([`check_socket`]); a socket another user planted (under
//! /tmp, say) is refused with an error. Even then the client verifies what it receives.
//!
//! Bounds: [`MAX_REQUEST_LINE`], [`MAX_ANSWER_LINE`], [`MAX_CLIENTS`] (a client over it gets a
//! `busy` error line, not a silent close), [`REQUEST_LINE_TIMEOUT`] for the request line (a
//! client that connects and sends nothing, or half a line, loses its connection and its slot),
//! [`CLIENT_STALL_TIMEOUT`] for each write to a client that stopped reading.

use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tracing::debug;

use crate::daemon::{Completed, State};
use crate::peer::{GetError, GetOutcome, GetRequest, ProgressFn};
use crate::store::TempOutput;

/// Longest request line accepted.
pub const MAX_REQUEST_LINE: usize = 256 << 10;
/// Longest answer line a client accepts (progress, `done`, or an error message).
pub const MAX_ANSWER_LINE: usize = 64 << 10;
/// Local clients served at once.
pub const MAX_CLIENTS: usize = 256;
/// Bytes moved per read when content is sent or received over the socket.
pub const CONTENT_CHUNK: usize = 1 << 20;
/// Time a client has, from connecting, to send its whole request line. `d7q get` writes it
/// the moment it connects; the allowance is the mesh's for a first message
/// ([`crate::proto::REQUEST_TIMEOUT`]).
pub const REQUEST_LINE_TIMEOUT: Duration = crate::proto::REQUEST_TIMEOUT;
/// Time one write to a client (an answer line, a chunk of content) may stay blocked because
/// the client does not read: then the client is dropped and its slot freed. `d7q get` reads as
/// fast as its disk takes the bytes; a chunk not taken in this long is a client gone quiet.
pub const CLIENT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// The content is complete and verified; exactly `length` bytes of it follow this line.
    Done {
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

/// Why a client refuses a daemon socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The path, or a directory on the way to it, could not be examined.
    #[error("daemon socket {}: {source}", path.display())]
    Io {
        /// What was examined.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Something other than a socket is at the path.
    #[error("daemon socket {}: not a socket", .0.display())]
    NotASocket(PathBuf),
    /// The socket, or a directory on the way to it, belongs to another user, who could answer
    /// in the daemon's place.
    #[error(
        "refusing daemon socket {}: {} is owned by uid {owner}, not by root or you (uid {me})",
        socket.display(), path.display()
    )]
    Owner {
        /// The socket.
        socket: PathBuf,
        /// The socket or the directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// A directory on the way to the socket may be written by other users, who could replace
    /// the socket.
    #[error(
        "refusing daemon socket {}: {} is writable by other users (mode {mode:04o})",
        socket.display(), path.display()
    )]
    Writable {
        /// The socket.
        socket: PathBuf,
        /// The directory.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
}

/// What the daemon does with a request.
pub type Handler = Arc<dyn Fn(Request) -> watch::Receiver<State> + Send + Sync>;

/// Binds the socket, replacing a stale one, readable and writable by the owner and group.
///
/// A missing directory is created 0700, except the system socket's (`/run/d7q`), created
/// 0755 so that users reach the socket (whose own mode then decides). A directory that exists
/// must belong to this user or root and be writable by nobody else, or the daemon refuses to
/// start: another user could replace the socket and answer its clients.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.exists() {
        let system = Path::new(crate::config::SYSTEM_SOCKET).parent();
        let mode = if system == Some(dir.as_path()) {
            0o755
        } else {
            0o700
        };
        DirBuilder::new().recursive(true).mode(mode).create(&dir)?;
    }
    let meta = std::fs::metadata(&dir)?;
    let me = euid();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "socket directory {} is owned by uid {}: another user could replace the socket",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    if writable_by_others(meta.mode()) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "socket directory {} is writable by other users (mode {:04o})",
                dir.display(),
                meta.mode() & 0o7777
            ),
        ));
    }
    if path.exists() {
        // A socket nobody answers on is left over from a crash.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
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
            // Said, not just closed: the client reports why. A new socket's buffer is empty, so
            // the line goes out without waiting (and if not, the close says enough).
            let busy = Answer::Error {
                code: crate::exit::MESH,
                message: format!("daemon busy: {MAX_CLIENTS} local clients at once; try again"),
            };
            let _ = stream.try_write(&answer_line(&busy));
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

async fn serve_one(stream: UnixStream, handler: Handler) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let line = tokio::time::timeout(
        REQUEST_LINE_TIMEOUT,
        read_line(&mut reader, MAX_REQUEST_LINE),
    )
    .await
    .unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no whole request line within {REQUEST_LINE_TIMEOUT:?}"),
        ))
    });
    let req = match line {
        Ok(Some(line)) => serde_json::from_slice::<Request>(&line).map_err(|e| e.to_string()),
        Ok(None) => return Ok(()),
        Err(e) => Err(e.to_string()),
    };
    let req = match req {
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
            State::Done(Ok(c)) => return send_content(&mut write, &c).await,
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

/// The `done` line and the content after it. The file is opened before the line is sent, so a
/// collection that removes it afterwards does not cut the stream (the open file stays whole).
async fn send_content(w: &mut tokio::net::unix::OwnedWriteHalf, c: &Completed) -> io::Result<()> {
    let opened = match tokio::fs::File::open(&c.path).await {
        Ok(f) => f.metadata().await.map(|m| (f, m.len())),
        Err(e) => Err(e),
    };
    let file = match opened {
        Ok((f, len)) if len == c.length => f,
        Ok((_, len)) => {
            let a = Answer::Error {
                code: crate::exit::LOCAL,
                message: format!(
                    "daemon store {}: {len} bytes, expected {}",
                    c.path.display(),
                    c.length
                ),
            };
            return write_answer(w, &a).await;
        }
        Err(e) => {
            let a = Answer::Error {
                code: crate::exit::LOCAL,
                message: format!("daemon store {}: {e}", c.path.display()),
            };
            return write_answer(w, &a).await;
        }
    };
    let done = Answer::Done {
        length: c.length,
        sha256: crate::task::format_digest(&c.sha256),
    };
    write_answer(w, &done).await?;
    let mut content = file.take(c.length);
    let mut chunk = vec![0u8; CONTENT_CHUNK];
    let mut sent = 0u64;
    loop {
        let n = content.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        stalled(w.write_all(&chunk[..n])).await?;
        sent += n as u64;
    }
    if sent != c.length {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{}: sent {sent} of {} bytes", c.path.display(), c.length),
        ));
    }
    w.shutdown().await
}

async fn write_answer(w: &mut tokio::net::unix::OwnedWriteHalf, a: &Answer) -> io::Result<()> {
    stalled(w.write_all(&answer_line(a))).await
}

fn answer_line(a: &Answer) -> Vec<u8> {
    let mut line = serde_json::to_vec(a).expect("answer serializes");
    line.push(b'\n');
    line
}

/// A write to a client, given up after [`CLIENT_STALL_TIMEOUT`] without completing.
async fn stalled(write: impl std::future::Future<Output = io::Result<()>>) -> io::Result<()> {
    tokio::time::timeout(CLIENT_STALL_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("client read nothing for {CLIENT_STALL_TIMEOUT:?}"),
            ))
        })
}

/// One line of at most `max` bytes (without its `\n`); `None` at a clean end of stream. A
/// longer line, or one cut by the end of the stream, is an error: the reader never buffers more
/// than `max` bytes for a peer that sends no newline.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(max as u64 + 1)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if line.pop() != Some(b'\n') {
        let msg = if n > max {
            format!("line longer than {max} bytes")
        } else {
            "line cut short".to_string()
        };
        return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
    }
    Ok(Some(line))
}

/// Whether a daemon answers on `path`.
pub fn daemon_running(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Checks that `path` is a socket only root or this user could have put there: the socket and
/// every directory above it owned by root or by this user, and no directory writable by other
/// users unless it is sticky (`/tmp`: others may add names there but not replace ours).
/// Returns the path with symlinks resolved — the one to connect to, so that a symlink swapped
/// after the check leads nowhere new.
pub fn check_socket(path: &Path) -> Result<PathBuf, SocketError> {
    let io_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| SocketError::Io { path: p, source }
    };
    let real = std::fs::canonicalize(path).map_err(io_err(path))?;
    let meta = std::fs::metadata(&real).map_err(io_err(&real))?;
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(real));
    }
    let me = euid();
    let trusted = |uid: u32| uid == 0 || uid == me;
    if !trusted(meta.uid()) {
        return Err(SocketError::Owner {
            socket: real.clone(),
            path: real.clone(),
            owner: meta.uid(),
            me,
        });
    }
    for dir in real.ancestors().skip(1) {
        let m = std::fs::metadata(dir).map_err(io_err(dir))?;
        if !trusted(m.uid()) {
            return Err(SocketError::Owner {
                socket: real.clone(),
                path: dir.to_path_buf(),
                owner: m.uid(),
                me,
            });
        }
        if writable_by_others(m.mode()) {
            return Err(SocketError::Writable {
                socket: real.clone(),
                path: dir.to_path_buf(),
                mode: m.mode() & 0o7777,
            });
        }
    }
    Ok(real)
}

/// Downloads through the daemon at `socket` and places the result at `req.output`, verified
/// against `req.digest` and against the length and digest the daemon announced.
pub async fn get(
    socket: &Path,
    req: &GetRequest,
    progress: Option<ProgressFn>,
) -> Result<GetOutcome, GetError> {
    let socket = check_socket(socket).map_err(|e| GetError::Mesh(e.to_string()))?;
    let sock_err =
        |e: io::Error| GetError::Mesh(format!("daemon socket {}: {e}", socket.display()));
    let stream = UnixStream::connect(&socket).await.map_err(sock_err)?;
    let (read, mut write) = stream.into_split();
    let request = Request {
        url: req.url.clone(),
        headers: req.headers.clone(),
        digest: req.digest.as_ref().map(crate::task::format_digest),
    };
    let mut line = serde_json::to_vec(&request).expect("request serializes");
    line.push(b'\n');
    write.write_all(&line).await.map_err(sock_err)?;
    let mut reader = BufReader::with_capacity(CONTENT_CHUNK, read);
    loop {
        let line = read_line(&mut reader, MAX_ANSWER_LINE)
            .await
            .map_err(sock_err)?
            .ok_or_else(|| GetError::Mesh("the daemon closed the connection".into()))?;
        let answer: Answer = serde_json::from_slice(&line)
            .map_err(|e| GetError::Mesh(format!("daemon answered nonsense: {e}")))?;
        match answer {
            Answer::Progress(done, total) => {
                if let Some(p) = &progress {
                    p(done, total);
                }
            }
            Answer::Done { length, sha256 } => {
                let announced = crate::task::parse_digest(&sha256)
                    .ok_or_else(|| GetError::Mesh("daemon sent a bad digest".into()))?;
                let sha = receive(&mut reader, length, announced, req).await?;
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

/// Writes the `length` bytes after a `done` line to a temporary file beside `req.output`,
/// hashing them on the way, and renames it into place only if they are all there and match
/// both the daemon's digest and the user's. Disk writes run on a blocking thread, fed a chunk at
/// a time, so the socket is read while the disk is written.
async fn receive<R: AsyncRead + Unpin>(
    from: &mut R,
    length: u64,
    announced: d7q_wire::Sha256,
    req: &GetRequest,
) -> Result<d7q_wire::Sha256, GetError> {
    let out = {
        let output = req.output.clone();
        tokio::task::spawn_blocking(move || TempOutput::create(&output, length))
            .await
            .map_err(|e| GetError::Mesh(format!("placing the file: {e}")))??
    };
    let file = out.file_handle();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
    let writer = tokio::task::spawn_blocking(move || {
        let mut hasher = sha2::Sha256::new();
        let mut at = 0u64;
        while let Some(chunk) = rx.blocking_recv() {
            hasher.update(&chunk);
            file.write_at(at, &chunk)?;
            at += chunk.len() as u64;
        }
        Ok::<_, crate::store::StoreError>(<[u8; 32]>::from(hasher.finalize()))
    });
    let mut left = length;
    let mut read_err = None;
    while left > 0 {
        let mut chunk = vec![0u8; (left.min(CONTENT_CHUNK as u64)) as usize];
        match from.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => {
                chunk.truncate(n);
                left -= n as u64;
                if tx.send(chunk).await.is_err() {
                    // The writer failed; its error is the one to report.
                    break;
                }
            }
            Err(e) => {
                read_err = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| GetError::Mesh(format!("placing the file: {e}")))?;
    // Every early return drops `out`, which removes the temporary file.
    let sha = written?;
    if left > 0 {
        let why = read_err.map(|e| format!(": {e}")).unwrap_or_default();
        return Err(GetError::Mesh(format!(
            "the daemon sent {} of {length} bytes{why}",
            length - left
        )));
    }
    if let Some(want) = &req.digest {
        if sha != *want {
            return Err(GetError::Integrity(format!(
                "content from the daemon is {}, not the expected {}",
                crate::task::format_digest(&sha),
                crate::task::format_digest(want)
            )));
        }
    }
    if sha != announced {
        return Err(GetError::Integrity(format!(
            "content from the daemon is {}, not the {} it announced",
            crate::task::format_digest(&sha),
            crate::task::format_digest(&announced)
        )));
    }
    tokio::task::spawn_blocking(move || out.commit())
        .await
        .map_err(|e| GetError::Mesh(format!("placing the file: {e}")))??;
    Ok(sha)
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Group- or other-writable, and not sticky.
fn writable_by_others(mode: u32) -> bool {
    mode & 0o022 != 0 && mode & 0o1000 == 0
}
