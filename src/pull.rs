//! `d7q pull IMAGE`: resolve an image at its registry (tag or digest, index or manifest list
//! to the wanted platform), fetch its config and layers through the mesh — each blob is one
//! mesh download of its registry URL, keyed and verified by its digest, with the registry's
//! `Authorization` for the seed's back-to-source — and write an OCI image layout or a
//! docker-archive.
//!
//! Blobs are staged in a hidden directory next to the output; the output appears by rename
//! only when every blob is verified, so a failed pull leaves nothing half-written.
//! Not for: the daemon's HTTPS proxy (which serves Docker itself) or registry protocol details
//! (see [`crate::registry`]).

use std::io::{BufRead, IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::stream::{self, StreamExt, TryStreamExt};

use crate::engine::{ConnPool, EngineConfig};
use crate::peer::{self, GetError, GetOutcome, GetRequest, ProgressFn};
use crate::pki::{ClusterCa, NodeIdentity};
use crate::registry::auth::{self, Credentials};
use crate::registry::layout::{self, LayoutError};
use crate::registry::manifest::{self, Descriptor, Manifest, ManifestError};
use crate::registry::{FetchedManifest, Platform, Reference, RegistryClient, RegistryError};
use crate::supernode::{Supernode, SupernodeConfig};
use crate::{config, exit, local, transport};

/// Blobs downloaded at once.
pub const MAX_PARALLEL_BLOBS: usize = 4;
/// Longest password line read from stdin.
pub const MAX_PASSWORD_LEN: usize = 64 << 10;

/// Command-line arguments of `d7q pull`.
#[derive(clap::Args, Debug)]
pub struct PullArgs {
    /// Image: `alpine`, `registry.test:5000/team/app:v1`, `app@sha256:…`.
    pub image: String,
    /// Write an OCI image layout to this directory (absent or empty).
    #[arg(short = 'o', long, conflicts_with = "docker_archive")]
    pub output: Option<PathBuf>,
    /// Write a docker-archive (for `docker load`) to this file.
    #[arg(long)]
    pub docker_archive: Option<PathBuf>,
    /// Platform to pull from a multi-platform image, OS/ARCH[/VARIANT] [default: this host's,
    /// linux/amd64 on x86-64].
    #[arg(long)]
    pub platform: Option<String>,
    /// Registry user name (with --password-stdin); default: ~/.docker/config.json.
    #[arg(long, requires = "password_stdin")]
    pub username: Option<String>,
    /// Read the registry password (or token) from stdin.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
    /// Supernode address; repeatable. None: the local daemon, else the embedded default.
    #[arg(long)]
    pub supernode: Vec<SocketAddr>,
    /// Node identity directory (required with --supernode).
    #[arg(long)]
    pub pki: Option<PathBuf>,
    /// Extra CA certificate (PEM) trusted for the registry; repeatable.
    #[arg(long = "origin-ca")]
    pub origin_ca: Vec<PathBuf>,
    /// The local daemon's socket (default: the daemon's default path, used when a daemon
    /// answers there).
    #[arg(long)]
    pub daemon: Option<PathBuf>,
    /// Never use a local daemon.
    #[arg(long)]
    pub no_daemon: bool,
    /// No progress bars.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Where the image goes.
#[derive(Clone, Debug)]
pub enum Output {
    /// An OCI image layout directory.
    OciLayout(PathBuf),
    /// A docker-archive file.
    DockerArchive(PathBuf),
}

impl Output {
    fn path(&self) -> &Path {
        match self {
            Output::OciLayout(p) | Output::DockerArchive(p) => p,
        }
    }
}

/// How blobs reach this process.
#[derive(Clone, Debug)]
pub enum MeshChoice {
    /// Through the local daemon at this socket.
    Daemon(PathBuf),
    /// Straight from these supernodes, with this node identity.
    Supernodes(Vec<SocketAddr>, PathBuf),
    /// Through a supernode inside this process.
    Embedded,
}

/// A pull to perform.
#[derive(Clone, Debug)]
pub struct PullRequest {
    /// The image.
    pub image: Reference,
    /// Where it goes.
    pub output: Output,
    /// The platform asked for: picked from a multi-platform image, checked against a
    /// single-platform one. `None`: this host's, and a single-platform image is taken as is.
    pub platform: Option<Platform>,
    /// Registry credentials, if any.
    pub credentials: Option<Credentials>,
    /// Extra CAs trusted for the registry.
    pub origin_cas: Vec<PathBuf>,
    /// How blobs are fetched.
    pub mesh: MeshChoice,
}

/// A finished pull.
#[derive(Clone, Debug)]
pub struct PullOutcome {
    /// Digest of the image manifest at the registry (an OCI layout holds the OCI form of a
    /// Docker manifest, whose digest differs).
    pub manifest_digest: String,
    /// Layers.
    pub layers: usize,
    /// Bytes of config and layers.
    pub bytes: u64,
}

/// Why a pull failed; each kind maps to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The registry refused or failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A blob could not be fetched through the mesh.
    #[error("blob {digest}: {source}")]
    Blob {
        /// The blob.
        digest: String,
        /// Why.
        source: GetError,
    },
    /// Content did not match what the manifest says.
    #[error("{0}")]
    Integrity(String),
    /// Writing the output failed.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Local set-up failed.
    #[error("{0}")]
    Local(String),
    /// The mesh could not be set up.
    #[error("{0}")]
    Mesh(String),
}

impl PullError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            PullError::Usage(_) => exit::USAGE,
            PullError::Registry(e) => e.exit_code(),
            PullError::Blob { source, .. } => source.exit_code(),
            PullError::Integrity(_) => exit::INTEGRITY,
            PullError::Layout(_) | PullError::Local(_) => exit::LOCAL,
            PullError::Mesh(_) => exit::MESH,
        }
    }
}

/// Runs `d7q pull`; returns the exit code.
pub async fn main(a: PullArgs) -> i32 {
    let fail = |code: i32, msg: &str| {
        eprintln!("d7q: {msg}");
        code
    };
    let req = match request(&a) {
        Ok(r) => r,
        Err(e) => return fail(e.exit_code(), &e.to_string()),
    };
    let bars = (!a.quiet && std::io::stderr().is_terminal()).then(MultiBar::default);
    let shown = req.image.to_string();
    let result = tokio::select! {
        r = pull(&req, bars.clone()) => r,
        _ = crate::cli::shutdown_signal() => return fail(exit::FAILURE, "interrupted"),
    };
    match result {
        Ok(o) => {
            println!(
                "{shown}: {} ({} layers, {}) written to {}",
                o.manifest_digest,
                o.layers,
                crate::cli::human_bytes(o.bytes),
                req.output.path().display()
            );
            exit::OK
        }
        Err(e) => fail(e.exit_code(), &e.to_string()),
    }
}

/// Turns the command line into a [`PullRequest`]: parses the image and platform, reads
/// credentials (stdin or the Docker config), picks the mesh like `d7q get` does.
fn request(a: &PullArgs) -> Result<PullRequest, PullError> {
    let image = Reference::parse(&a.image).map_err(|e| PullError::Usage(e.to_string()))?;
    let output = match (&a.output, &a.docker_archive) {
        (Some(d), None) => Output::OciLayout(d.clone()),
        (None, Some(f)) => Output::DockerArchive(f.clone()),
        _ => {
            return Err(PullError::Usage(
                "give -o DIR (OCI image layout) or --docker-archive FILE".into(),
            ))
        }
    };
    check_output(&output)?;
    let platform = a
        .platform
        .as_deref()
        .map(Platform::parse)
        .transpose()
        .map_err(|e| PullError::Usage(format!("--platform: {e}")))?;
    let credentials = match &a.username {
        Some(u) => Some(Credentials {
            username: u.clone(),
            password: read_password()?,
        }),
        None => match auth::docker_config_path() {
            Some(path) => auth::docker_config_credentials(&path, &image.registry)
                .map_err(|e| PullError::Registry(RegistryError::Auth(e)))?,
            None => None,
        },
    };
    let mesh = if !a.supernode.is_empty() {
        let pki = a
            .pki
            .clone()
            .ok_or_else(|| PullError::Usage("--pki NODEDIR is required with --supernode".into()))?;
        MeshChoice::Supernodes(a.supernode.clone(), pki)
    } else {
        let socket = a.daemon.clone().or_else(|| {
            config::socket_candidates()
                .into_iter()
                .find(|p| local::daemon_running(p))
        });
        match socket {
            Some(s) if !a.no_daemon => MeshChoice::Daemon(s),
            _ => MeshChoice::Embedded,
        }
    };
    Ok(PullRequest {
        image,
        output,
        platform,
        credentials,
        origin_cas: a.origin_ca.clone(),
        mesh,
    })
}

fn read_password() -> Result<String, PullError> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .take(MAX_PASSWORD_LEN as u64)
        .read_line(&mut line)
        .map_err(|e| PullError::Usage(format!("--password-stdin: {e}")))?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        return Err(PullError::Usage(
            "--password-stdin: no password on stdin".into(),
        ));
    }
    Ok(password)
}

/// Refuses outputs that would clobber something: a non-empty directory for a layout, a
/// directory for an archive.
fn check_output(output: &Output) -> Result<(), PullError> {
    match output {
        Output::OciLayout(dir) => {
            if dir.is_file() {
                return Err(PullError::Local(format!("{} is a file", dir.display())));
            }
            if dir.is_dir() {
                let mut entries = std::fs::read_dir(dir)
                    .map_err(|e| PullError::Local(format!("{}: {e}", dir.display())))?;
                if entries.next().is_some() {
                    return Err(PullError::Local(format!(
                        "{} exists and is not empty",
                        dir.display()
                    )));
                }
            }
        }
        Output::DockerArchive(file) => {
            if file.is_dir() {
                return Err(PullError::Local(format!(
                    "{} is a directory",
                    file.display()
                )));
            }
        }
    }
    Ok(())
}

/// Pulls `req`: resolves the manifest, fetches the blobs through the mesh, writes the output.
pub async fn pull(req: &PullRequest, bars: Option<MultiBar>) -> Result<PullOutcome, PullError> {
    let client = RegistryClient::new(&req.origin_cas, req.credentials.clone())?;
    let image = &req.image;
    let wanted = req.platform.clone().unwrap_or_else(Platform::host);
    let (fetched, manifest, from_index) = resolve(&client, image, &wanted).await?;
    let parent = parent_dir(req.output.path());
    let staging = ScratchDir::create(&parent, req.output.path())?;
    // OCI layout readers take OCI manifests only; a Docker one is rewritten with OCI types.
    let (written_bytes, written_type) = match &req.output {
        Output::OciLayout(_) if fetched.media_type == manifest::DOCKER_MANIFEST => (
            manifest::to_oci(&manifest),
            manifest::OCI_MANIFEST.to_string(),
        ),
        _ => (fetched.bytes.to_vec(), fetched.media_type.clone()),
    };
    let written_digest = manifest::sha256_digest(&written_bytes);
    layout::write_blob(&staging.0, &written_digest, &written_bytes)?;

    let mut blobs: Vec<Descriptor> = Vec::new();
    for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
        if !blobs.iter().any(|b| b.digest == d.digest) {
            blobs.push(d.clone());
        }
    }
    let total: u64 = blobs.iter().map(|b| b.size).sum();
    let mesh = MeshSession::open(&req.mesh, &req.origin_cas, &parent).await?;
    let fetch_all = stream::iter(blobs.iter().map(|d| {
        let (client, mesh, staging, bars) = (&client, &mesh, &staging.0, bars.clone());
        async move {
            let authorization = client.authorization(image).await?;
            let digest = crate::task::parse_digest(&d.digest)
                .ok_or_else(|| PullError::Integrity(format!("bad digest {}", d.digest)))?;
            let get = GetRequest {
                url: image.blob_url(&d.digest),
                output: layout::blob_path(staging, &d.digest),
                digest: Some(digest),
                headers: authorization
                    .map(|a| vec![("Authorization".to_string(), a)])
                    .unwrap_or_default(),
            };
            if let Some(dir) = get.output.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| PullError::Local(format!("{}: {e}", dir.display())))?;
            }
            let progress = bars.as_ref().map(|b| b.bar(&d.digest, d.size));
            let got = mesh
                .get(&get, progress)
                .await
                .map_err(|source| PullError::Blob {
                    digest: d.digest.clone(),
                    source,
                })?;
            if got.length != d.size {
                return Err(PullError::Integrity(format!(
                    "blob {}: {} bytes, but the manifest says {}",
                    d.digest, got.length, d.size
                )));
            }
            Ok::<_, PullError>(())
        }
    }))
    .buffer_unordered(MAX_PARALLEL_BLOBS)
    .try_collect::<Vec<()>>()
    .await;
    mesh.close();
    fetch_all?;
    let small_config = manifest.config.size <= manifest::MAX_MANIFEST_SIZE as u64;
    if let (Some(wanted), false, true) = (&req.platform, from_index, small_config) {
        // A single-platform image asked for by platform: its config says what it is.
        let config = std::fs::read(layout::blob_path(&staging.0, &manifest.config.digest))
            .map_err(|e| PullError::Local(format!("reading the image config: {e}")))?;
        if let Some(have) = manifest::config_platform(&config) {
            if !manifest::platform_matches(&have, wanted) {
                return Err(RegistryError::Manifest {
                    image: image.to_string(),
                    source: ManifestError::NoPlatform {
                        wanted: wanted.clone(),
                        available: have.to_string(),
                    },
                }
                .into());
            }
        }
    }

    let manifest_desc = Descriptor {
        media_type: written_type,
        digest: written_digest,
        size: written_bytes.len() as u64,
        platform: None,
        annotations: None,
    };
    let staged = staging.0.clone();
    let output = req.output.clone();
    let tag = image.tag.clone();
    let repo_tags: Vec<String> = tag
        .iter()
        .map(|t| format!("{}:{t}", image.familiar_name()))
        .collect();
    let config = manifest.config.clone();
    let layers = manifest.layers.clone();
    tokio::task::spawn_blocking(move || -> Result<(), PullError> {
        match output {
            Output::OciLayout(dir) => {
                layout::finish_oci_layout(&staged, &manifest_desc, tag.as_deref())?;
                if dir.is_dir() {
                    // Checked empty before the pull; rename(2) replaces an empty directory.
                    let _ = std::fs::remove_dir(&dir);
                }
                std::fs::rename(&staged, &dir)
                    .map_err(|e| PullError::Local(format!("{}: {e}", dir.display())))
            }
            Output::DockerArchive(file) => {
                layout::write_docker_archive(&file, &staged, &config, &layers, &repo_tags)?;
                Ok(())
            }
        }
    })
    .await
    .map_err(|e| PullError::Local(format!("writing the image: {e}")))??;
    drop(staging);
    Ok(PullOutcome {
        manifest_digest: fetched.digest,
        layers: manifest.layers.len(),
        bytes: total,
    })
}

/// The image manifest for `platform`: the tag or digest's manifest, or the entry of its index
/// (then the flag is true).
async fn resolve(
    client: &RegistryClient,
    image: &Reference,
    platform: &Platform,
) -> Result<(FetchedManifest, manifest::ImageManifest, bool), PullError> {
    let top = client.manifest(image, image.manifest_reference()).await?;
    let entry = match &top.manifest {
        Manifest::Image(m) => return Ok((top.clone(), m.clone(), false)),
        Manifest::Index { manifests, .. } => manifest::select_platform(manifests, platform)
            .map_err(|source| RegistryError::Manifest {
                image: image.to_string(),
                source,
            })?
            .clone(),
    };
    let child = client.manifest(image, &entry.digest).await?;
    if child.bytes.len() as u64 != entry.size {
        return Err(PullError::Integrity(format!(
            "manifest {}: {} bytes, but the index says {}",
            entry.digest,
            child.bytes.len(),
            entry.size
        )));
    }
    match &child.manifest {
        Manifest::Image(m) => {
            let m = m.clone();
            Ok((child, m, true))
        }
        Manifest::Index { .. } => Err(RegistryError::Manifest {
            image: image.to_string(),
            source: ManifestError::Unsupported("an index nested in an index".into()),
        }
        .into()),
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A hidden directory next to the output, removed on drop unless renamed away.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create(parent: &Path, output: &Path) -> Result<Self, PullError> {
        let name = output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let dir = parent.join(format!(".{name}.d7q-{:016x}.part", rand::random::<u64>()));
        std::fs::create_dir(&dir)
            .map_err(|e| PullError::Local(format!("{}: {e}", dir.display())))?;
        Ok(Self(dir))
    }
}

/// Attempts at removing a scratch directory, [`SCRATCH_RETRY`] apart.
const SCRATCH_ATTEMPTS: u32 = 20;
/// Pause between attempts at removing a scratch directory.
const SCRATCH_RETRY: std::time::Duration = std::time::Duration::from_millis(25);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // After a failed blob the others' futures are dropped mid-way, and a file operation one
        // of them handed to a blocking thread can still create a file in here while
        // `remove_dir_all` runs (it then fails with "directory not empty"). Those operations
        // are short: try again until the directory is gone.
        for _ in 0..SCRATCH_ATTEMPTS {
            let _ = std::fs::remove_dir_all(&self.0);
            if !self.0.exists() {
                return;
            }
            std::thread::sleep(SCRATCH_RETRY);
        }
        tracing::warn!(dir = %self.0.display(), "could not remove the scratch directory");
    }
}

/// One mesh for all the blobs of a pull.
enum MeshSession {
    Daemon(PathBuf),
    Pool {
        pool: Box<ConnPool>,
        endpoint: quinn::Endpoint,
        supernodes: Vec<SocketAddr>,
        // The embedded supernode: its task and its store, both gone when the pull ends.
        embedded: Option<(tokio::task::JoinHandle<()>, ScratchDir)>,
    },
}

impl MeshSession {
    async fn open(
        choice: &MeshChoice,
        origin_cas: &[PathBuf],
        parent: &Path,
    ) -> Result<Self, PullError> {
        let bind: SocketAddr = "0.0.0.0:0".parse().expect("literal");
        match choice {
            MeshChoice::Daemon(socket) => Ok(MeshSession::Daemon(socket.clone())),
            MeshChoice::Supernodes(addrs, pki) => {
                let identity = NodeIdentity::load(pki)
                    .map_err(|e| PullError::Mesh(format!("node identity: {e}")))?;
                let endpoint = transport::endpoint(&identity, bind, false)
                    .map_err(|e| PullError::Mesh(e.to_string()))?;
                Ok(MeshSession::Pool {
                    pool: Box::new(ConnPool::new(endpoint.clone())),
                    endpoint,
                    supernodes: addrs.clone(),
                    embedded: None,
                })
            }
            MeshChoice::Embedded => {
                let setup =
                    |e: &dyn std::fmt::Display| PullError::Mesh(format!("embedded supernode: {e}"));
                let ca = ClusterCa::generate().map_err(|e| setup(&e))?;
                let seed = ca.issue("embedded-supernode").map_err(|e| setup(&e))?;
                let me = ca.issue("embedded-peer").map_err(|e| setup(&e))?;
                let store = ScratchDir::create(parent, Path::new("d7q-embedded"))?;
                let loopback: SocketAddr = "127.0.0.1:0".parse().expect("literal");
                let sn = Supernode::start(SupernodeConfig {
                    listen: loopback,
                    data_dir: store.0.clone(),
                    identity: seed,
                    origin_cas: origin_cas.to_vec(),
                    labels: Default::default(),
                    origin_rate: 0,
                    metrics: Arc::new(crate::metrics::Metrics::new(
                        crate::metrics::Role::Supernode,
                    )),
                })
                .await
                .map_err(|e| setup(&e))?;
                let addr = sn.local_addr();
                let endpoint = transport::endpoint(&me, loopback, false)
                    .map_err(|e| PullError::Mesh(e.to_string()))?;
                Ok(MeshSession::Pool {
                    pool: Box::new(ConnPool::new(endpoint.clone())),
                    endpoint,
                    supernodes: vec![addr],
                    embedded: Some((tokio::spawn(sn.run()), store)),
                })
            }
        }
    }

    async fn get(
        &self,
        req: &GetRequest,
        progress: Option<ProgressFn>,
    ) -> Result<GetOutcome, GetError> {
        match self {
            MeshSession::Daemon(socket) => local::get(socket, req, progress).await,
            MeshSession::Pool {
                pool, supernodes, ..
            } => peer::get_with(pool, supernodes, req, EngineConfig::downloader(), progress).await,
        }
    }

    fn close(&self) {
        if let MeshSession::Pool {
            pool,
            endpoint,
            embedded,
            ..
        } = self
        {
            pool.close();
            endpoint.close(transport::close::DONE, b"");
            if let Some((task, _)) = embedded {
                task.abort();
            }
        }
    }
}

impl Drop for MeshSession {
    fn drop(&mut self) {
        self.close();
    }
}

/// One progress line per blob on stderr, redrawn in place a few times a second.
#[derive(Clone, Default)]
pub struct MultiBar {
    state: Arc<Mutex<BarState>>,
}

#[derive(Default)]
struct BarState {
    lines: Vec<(String, u64, u64)>,
    drawn: usize,
    last: Option<Instant>,
}

impl MultiBar {
    /// A new line for blob `digest` of `size` bytes; the returned callback updates it.
    pub fn bar(&self, digest: &str, size: u64) -> ProgressFn {
        let label = digest
            .strip_prefix("sha256:")
            .unwrap_or(digest)
            .chars()
            .take(12)
            .collect::<String>();
        let index = {
            let mut s = self.state.lock().expect("progress lock");
            s.lines.push((label, 0, size));
            s.lines.len() - 1
        };
        let me = self.clone();
        Arc::new(move |done, total| me.update(index, done, total))
    }

    fn update(&self, index: usize, done: u64, total: u64) {
        let mut s = self.state.lock().expect("progress lock");
        if let Some(line) = s.lines.get_mut(index) {
            line.1 = done;
            line.2 = total.max(line.2);
        }
        let now = Instant::now();
        if s.last
            .is_some_and(|l| now.duration_since(l).as_millis() < 150)
            && done < total
        {
            return;
        }
        s.last = Some(now);
        let mut out = String::new();
        if s.drawn > 0 {
            out.push_str(&format!("\x1b[{}A", s.drawn));
        }
        for (label, done, total) in &s.lines {
            let pct = if *total == 0 {
                100.0
            } else {
                *done as f64 * 100.0 / *total as f64
            };
            let width = 30usize;
            let filled = (((pct / 100.0) * width as f64) as usize).min(width);
            out.push_str(&format!(
                "\r\x1b[2K{label} [{}{}] {:5.1}% {} / {}\n",
                "#".repeat(filled),
                "-".repeat(width - filled),
                pct,
                crate::cli::human_bytes(*done),
                crate::cli::human_bytes(*total)
            ));
        }
        s.drawn = s.lines.len();
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(out.as_bytes());
        let _ = err.flush();
    }
}
