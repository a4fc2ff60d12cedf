//! The one configuration file shared by `d7q daemon` and `d7q supernode`, and the parsers for the
//! human units its values (and the matching flags) are written in.
//!
//! Every flag has a key here, and flags win: the command line parses its flags into `Option`s,
//! loads a [`ConfigFile`], and merges each setting with [`pick`] / [`pick_list`] / [`require`].
//! That is why every field of [`SupernodeFile`] and [`DaemonFile`] is an `Option`: "absent from the
//! file" must stay distinguishable from "set to the default".
//!
//! A file with a key this build does not know, or a value it cannot use, is refused when the
//! process starts, with the dotted key named — a typo must never silently fall back to a default:
//!
//! ```text
//! config /etc/d7q/d7q.toml: unknown key `daemon.uplod_rate`; did you mean `upload_rate`?
//! config /etc/d7q/d7q.toml: daemon.upload_rate: expected a rate like "100MiB" or "800Mbit", found "fast"
//! ```
//!
//! Relative paths in the file are taken relative to the directory of the file, so a file reads
//! the same whatever directory the process was started from.
//!
//! Not in here: the runtime configuration structs of the daemon and the supernode (they live next
//! to their code and are built from the merged values), and what the values mean beyond their
//! form.
//!
//! ```toml
//! [supernode]
//! listen = "0.0.0.0:8002"
//! metrics = "0.0.0.0:8001"
//! data_dir = "/var/lib/d7q/supernode"
//! pki = "/etc/d7q/node"
//! upstream = ["10.0.0.1:8002"]
//! dc = "dc1"
//! origin_ca = ["/etc/ssl/extra.pem"]
//! back_to_source_rate = "200MiB"
//! origin_allow = ["169.254.170.2/32"]
//! origin_deny = ["127.0.0.0/8", "::1"]
//!
//! [daemon]
//! listen = "0.0.0.0:65002"
//! proxy = "127.0.0.1:65001"
//! data_dir = "/var/lib/d7q/daemon"
//! pki = "/etc/d7q/node"
//! supernode = ["10.0.0.5:8002"]
//! upload_rate = "800Mbit"
//! registry = ["registry.test", "*.corp.example"]
//! mirror_upstream = "registry-1.docker.io"
//! proxy_allow = ["registry.internal:5000", "10.20.0.0/16"]
//! metrics = "127.0.0.1:65003"
//!
//! [daemon.storage]
//! high_watermark = "90%"
//! low_watermark = "80%"
//! ttl = "7d"
//!
//! [daemon.proxy_ca]
//! dir = "/var/lib/d7q/proxy-ca"
//!
//! [transport]
//! congestion = "bbr"
//! initial_rtt = "100ms"
//! stream_window = "4MiB"
//! connection_window = "64MiB"
//! keep_alive = "4s"
//! idle_timeout = "30s"
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess};
use serde::Deserialize;

/// Where the daemon and the supernode look for their config file when `--config` is not given.
/// A missing file there is not an error; a missing file named by `--config` is.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/d7q/d7q.toml";

/// Built-in defaults, for the settings that have one. Settings without a default (`data_dir`,
/// `pki`, the daemon's `supernode` list) must be given as a flag or a key; see [`require`].
pub mod defaults {
    use std::time::Duration;

    use super::Watermark;

    /// `supernode.listen`: UDP, QUIC mesh and admin API.
    pub const SUPERNODE_LISTEN: &str = "0.0.0.0:8002";
    /// `supernode.metrics`: TCP, Prometheus `/metrics` and `/health`.
    pub const SUPERNODE_METRICS: &str = "0.0.0.0:8001";
    /// `daemon.listen`: UDP, QUIC mesh (uploads to other peers).
    pub const DAEMON_LISTEN: &str = "0.0.0.0:65002";
    /// `daemon.proxy`: TCP, HTTP proxy, registry mirror, `/ca.crt` and `/metrics`. Loopback only
    /// by default: an open proxy is not something to get by accident.
    pub const DAEMON_PROXY: &str = "127.0.0.1:65001";
    /// `daemon.storage.high_watermark`: garbage collection starts above this.
    pub const HIGH_WATERMARK: Watermark = Watermark::Percent(90.0);
    /// `daemon.storage.low_watermark`: garbage collection stops below this.
    pub const LOW_WATERMARK: Watermark = Watermark::Percent(80.0);
    /// `daemon.storage.ttl`: content unused for this long is collected.
    pub const TTL: Duration = Duration::from_secs(7 * 24 * 3600);
}

/// The whole config file. Both sections are optional: a daemon ignores `[supernode]` and the
/// other way round, so one file can serve a host that runs both.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `[supernode]`.
    pub supernode: Option<SupernodeFile>,
    /// `[daemon]`.
    pub daemon: Option<DaemonFile>,
    /// `[transport]`: QUIC on the mesh, for either role.
    pub transport: Option<TransportFile>,
}

/// `[transport]`: how the mesh's QUIC behaves on a path; one key per `--congestion`,
/// `--initial-rtt`, `--stream-window`, `--connection-window`, `--keep-alive`, `--idle-timeout`
/// flag of both roles (see [`crate::transport::Tuning`] for the bounds).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportFile {
    /// `"bbr"`, `"cubic"` or `"newreno"`.
    #[serde(default, deserialize_with = "de_congestion")]
    pub congestion: Option<crate::transport::Congestion>,
    /// RTT assumed before the first sample, e.g. `"100ms"`.
    #[serde(default, deserialize_with = "de_duration")]
    pub initial_rtt: Option<Duration>,
    /// Receive window per stream, e.g. `"4MiB"`.
    #[serde(default, deserialize_with = "de_size")]
    pub stream_window: Option<u64>,
    /// Receive and send window per connection: at least the bandwidth-delay product.
    #[serde(default, deserialize_with = "de_size")]
    pub connection_window: Option<u64>,
    /// Keep-alive interval, e.g. `"4s"` (`"0"`: none).
    #[serde(default, deserialize_with = "de_duration")]
    pub keep_alive: Option<Duration>,
    /// A connection silent this long is dead, e.g. `"30s"`.
    #[serde(default, deserialize_with = "de_duration")]
    pub idle_timeout: Option<Duration>,
}

/// `[supernode]`: one key per `d7q supernode` flag.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupernodeFile {
    /// `--listen`: UDP address for QUIC (mesh and admin API).
    pub listen: Option<SocketAddr>,
    /// `--metrics`: TCP address for `/metrics` and `/health`.
    pub metrics: Option<SocketAddr>,
    /// `--data-dir`: the content store.
    pub data_dir: Option<PathBuf>,
    /// `--pki`: node identity directory (from `d7q ca issue`).
    pub pki: Option<PathBuf>,
    /// `--upstream`: supernodes asked before the origin (one datacenter up the chain).
    pub upstream: Option<Vec<SocketAddr>>,
    /// `--dc`: datacenter label.
    pub dc: Option<String>,
    /// `--zone`: zone label.
    pub zone: Option<String>,
    /// `--host`: host label; default: the host name ([`default_host`]).
    pub host: Option<String>,
    /// `--origin-ca`: extra CA certificates (PEM) trusted for origins.
    pub origin_ca: Option<Vec<PathBuf>>,
    /// `--back-to-source-rate`: bytes per second fetched from origins, all tasks together;
    /// 0 = unlimited.
    #[serde(default, deserialize_with = "de_rate")]
    pub back_to_source_rate: Option<u64>,
    /// `--origin-allow`: addresses or blocks origin fetches may connect to although the
    /// built-in policy refuses them (see [`crate::origin::policy`]).
    #[serde(default, deserialize_with = "de_blocks")]
    pub origin_allow: Option<Vec<crate::cidr::Cidr>>,
    /// `--origin-deny`: addresses or blocks origin fetches must not connect to.
    #[serde(default, deserialize_with = "de_blocks")]
    pub origin_deny: Option<Vec<crate::cidr::Cidr>>,
    /// `--log`: log filter (tracing syntax).
    #[serde(default, deserialize_with = "de_log")]
    pub log: Option<String>,
}

/// `[daemon]`: one key per `d7q daemon` flag.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonFile {
    /// `--listen`: UDP address for the QUIC mesh.
    pub listen: Option<SocketAddr>,
    /// `--advertise`: the mesh address other peers dial, when `listen` is not reachable as is.
    pub advertise: Option<SocketAddr>,
    /// `--proxy`: TCP address of the HTTP proxy, registry mirror and (without `metrics`)
    /// `/metrics`.
    pub proxy: Option<SocketAddr>,
    /// `--metrics`: TCP address for `/metrics` and `/health`, off the proxy port.
    pub metrics: Option<SocketAddr>,
    /// `--proxy-allow`: targets the proxy may connect to beyond its defaults (`HOST:PORT`,
    /// `*:PORT`, `ADDR:PORT`, `ADDR`, `CIDR`; see [`crate::proxy::policy`]).
    #[serde(default, deserialize_with = "de_proxy_allow")]
    pub proxy_allow: Option<Vec<crate::proxy::policy::Allow>>,
    /// `--data-dir`: the content store.
    pub data_dir: Option<PathBuf>,
    /// `--pki`: node identity directory (from `d7q ca issue`).
    pub pki: Option<PathBuf>,
    /// `--supernode`: the supernodes, in any order (each task picks its home by hashing).
    pub supernode: Option<Vec<SocketAddr>>,
    /// `--socket`: the local socket `d7q get` and `d7q pull` talk to; default:
    /// [`default_socket_path`].
    pub socket: Option<PathBuf>,
    /// `--dc`: datacenter label.
    pub dc: Option<String>,
    /// `--zone`: zone label.
    pub zone: Option<String>,
    /// `--host`: host label; default: the host name ([`default_host`]).
    pub host: Option<String>,
    /// `--upload-rate`: bytes per second uploaded to other peers, all tasks together;
    /// 0 = unlimited.
    #[serde(default, deserialize_with = "de_rate")]
    pub upload_rate: Option<u64>,
    /// `--download-rate`: bytes per second downloaded, all tasks together; 0 = unlimited.
    #[serde(default, deserialize_with = "de_rate")]
    pub download_rate: Option<u64>,
    /// `--per-download-rate`: bytes per second for any one download; 0 = unlimited.
    #[serde(default, deserialize_with = "de_rate")]
    pub per_download_rate: Option<u64>,
    /// `--registry`: registries whose CONNECTs the proxy intercepts and whose blobs go through the
    /// mesh: `host`, `host:port`, or `*.domain` patterns (validated by [`parse_registry`]).
    #[serde(default, deserialize_with = "de_registries")]
    pub registry: Option<Vec<String>>,
    /// `--origin-ca`: extra CA certificates (PEM) trusted for origins and registries.
    pub origin_ca: Option<Vec<PathBuf>>,
    /// `--mirror-upstream`: the registry (`host[:port]`, HTTPS) the registry mirror on the proxy
    /// port serves when a request names none (containerd's `?ns=`); default
    /// `registry-1.docker.io`.
    pub mirror_upstream: Option<String>,
    /// `--log`: log filter (tracing syntax).
    #[serde(default, deserialize_with = "de_log")]
    pub log: Option<String>,
    /// `[daemon.storage]`.
    pub storage: Option<StorageFile>,
    /// `[daemon.proxy_ca]`.
    pub proxy_ca: Option<ProxyCaFile>,
}

/// `[daemon.storage]`: disk use of the content store.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageFile {
    /// `--gc-high-watermark`: garbage collection starts above this.
    #[serde(default, deserialize_with = "de_watermark")]
    pub high_watermark: Option<Watermark>,
    /// `--gc-low-watermark`: garbage collection stops below this.
    #[serde(default, deserialize_with = "de_watermark")]
    pub low_watermark: Option<Watermark>,
    /// `--gc-ttl`: content not used for this long is collected.
    #[serde(default, deserialize_with = "de_duration")]
    pub ttl: Option<Duration>,
}

/// `[daemon.proxy_ca]`: the CA that signs the proxy's leaf certificates for intercepted hosts.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyCaFile {
    /// `--proxy-ca`: directory of the proxy CA (created by `d7q ca`).
    pub dir: Option<PathBuf>,
}

/// A disk watermark for garbage collection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Watermark {
    /// Percent (0–100) of the filesystem holding the content store that is in use.
    Percent(f64),
    /// Bytes used by the content store itself.
    Bytes(u64),
}

/// Why a config file was refused, or a setting is missing. Every message names the file and the
/// key, so it can be printed as is on one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config {}: line {line}, column {column}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What the TOML parser said.
        message: String,
    },
    /// A key this build does not know, most likely a typo.
    #[error(
        "config {}: unknown key `{key}`{}",
        path.display(),
        suggestion.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_default()
    )]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The dotted key, e.g. `daemon.uplod_rate`.
        key: String,
        /// A known key close to it, e.g. `upload_rate`.
        suggestion: Option<String>,
    },
    /// A value of the wrong type or form.
    #[error("config {}: {key}: {message}", path.display())]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The dotted key, e.g. `daemon.upload_rate` or `daemon.supernode[1]`.
        key: String,
        /// What was expected and what was found.
        message: String,
    },
    /// A setting without a default was given neither as a flag nor in the config file.
    #[error("missing {flag} (or `{key}` in the config file)")]
    Missing {
        /// The flag, e.g. `--data-dir`.
        flag: &'static str,
        /// The dotted key, e.g. `daemon.data_dir`.
        key: &'static str,
    },
}

/// Why a value written in human units was refused. The messages are written to follow a key or
/// a flag name (clap prints them after `invalid value 'x' for '--upload-rate <RATE>'`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Not a rate.
    #[error("expected a rate like \"100MiB\" or \"800Mbit\"")]
    Rate,
    /// Not a size.
    #[error("expected a size like \"10GiB\" or \"500MB\"")]
    Size,
    /// Not a duration.
    #[error("expected a duration like \"7d\", \"12h\", \"30m\" or \"45s\"")]
    Duration,
    /// Not a watermark.
    #[error("expected a watermark like \"90%\" or \"500GiB\"")]
    Watermark,
    /// Not a registry host or pattern.
    #[error(
        "expected a registry like \"registry.test\", \"registry.test:5000\" or \"*.corp.example\""
    )]
    Registry,
    /// `Mb` and friends: bits or bytes?
    #[error("\"{0}b\" is ambiguous: write \"{0}B\" for bytes or \"{0}bit\" for bits")]
    Ambiguous(String),
    /// Too large to represent.
    #[error("value too large")]
    Overflow,
}

impl ConfigFile {
    /// Reads and checks a config file. Relative paths in it are resolved against its directory.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = ConfigFile::parse(&text).map_err(|e| e.in_file(path))?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        Ok(cfg)
    }

    /// The file named by `--config`, else [`DEFAULT_CONFIG_PATH`] if it exists, else an empty
    /// config (all defaults).
    pub fn load_or_default(explicit: Option<&Path>) -> Result<ConfigFile, ConfigError> {
        match explicit {
            Some(p) => ConfigFile::load(p),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                ConfigFile::load(Path::new(DEFAULT_CONFIG_PATH))
            }
            None => Ok(ConfigFile::default()),
        }
    }

    /// Parses and checks config text; errors carry an empty path until [`ConfigFile::load`]
    /// names the file.
    pub fn parse(text: &str) -> Result<ConfigFile, ConfigError> {
        // Two steps: TOML syntax first (its errors have line and column), then the typed
        // structure through a deserializer that knows the dotted key of every value it hands
        // out — toml's own errors name the key only as a source snippet.
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let (line, column) = e
                .span()
                .map(|s| line_column(text, s.start))
                .unwrap_or((1, 1));
            ConfigError::Syntax {
                path: PathBuf::new(),
                line,
                column,
                // One line: the CLI prints every failure as one `d7q: …` line.
                message: e.message().trim().replace('\n', "; "),
            }
        })?;
        let cfg = ConfigFile::deserialize(ValueDe {
            value: toml::Value::Table(table),
            path: String::new(),
        })
        .map_err(DeError::into_config_error)?;
        cfg.check()?;
        Ok(cfg)
    }

    /// The `[supernode]` section, empty when absent.
    pub fn supernode(&self) -> SupernodeFile {
        self.supernode.clone().unwrap_or_default()
    }

    /// The `[daemon]` section, empty when absent.
    pub fn daemon(&self) -> DaemonFile {
        self.daemon.clone().unwrap_or_default()
    }

    /// Rules that involve more than one key.
    fn check(&self) -> Result<(), ConfigError> {
        let storage = self.daemon.as_ref().and_then(|d| d.storage.as_ref());
        if let Some(StorageFile {
            high_watermark: Some(high),
            low_watermark: Some(low),
            ..
        }) = storage
        {
            let inverted = match (low, high) {
                (Watermark::Percent(l), Watermark::Percent(h)) => l > h,
                (Watermark::Bytes(l), Watermark::Bytes(h)) => l > h,
                _ => false,
            };
            if inverted {
                return Err(ConfigError::BadValue {
                    path: PathBuf::new(),
                    key: "daemon.storage.low_watermark".into(),
                    message: "must not be above daemon.storage.high_watermark".into(),
                });
            }
        }
        Ok(())
    }

    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(s) = &mut self.supernode {
            s.data_dir.iter_mut().for_each(fix);
            s.pki.iter_mut().for_each(fix);
            s.origin_ca.iter_mut().flatten().for_each(fix);
        }
        if let Some(d) = &mut self.daemon {
            d.data_dir.iter_mut().for_each(fix);
            d.pki.iter_mut().for_each(fix);
            d.socket.iter_mut().for_each(fix);
            d.origin_ca.iter_mut().flatten().for_each(fix);
            if let Some(ca) = &mut d.proxy_ca {
                ca.dir.iter_mut().for_each(fix);
            }
        }
    }
}

impl ConfigError {
    fn in_file(mut self, file: &Path) -> ConfigError {
        match &mut self {
            ConfigError::Read { path, .. }
            | ConfigError::Syntax { path, .. }
            | ConfigError::UnknownKey { path, .. }
            | ConfigError::BadValue { path, .. } => *path = file.to_path_buf(),
            ConfigError::Missing { .. } => {}
        }
        self
    }
}

/// Merges one setting: the flag if given, else the file's value, else the default.
pub fn pick<T>(flag: Option<T>, file: Option<T>, default: T) -> T {
    flag.or(file).unwrap_or(default)
}

/// Merges a repeatable flag: the flags if any were given (they replace the file's list, they do
/// not add to it), else the file's list, else empty.
pub fn pick_list<T>(flag: Vec<T>, file: Option<Vec<T>>) -> Vec<T> {
    if flag.is_empty() {
        file.unwrap_or_default()
    } else {
        flag
    }
}

/// Merges a setting that has no default: the flag, else the file's value, else
/// [`ConfigError::Missing`] naming both.
pub fn require<T>(
    flag: Option<T>,
    file: Option<T>,
    flag_name: &'static str,
    key: &'static str,
) -> Result<T, ConfigError> {
    flag.or(file).ok_or(ConfigError::Missing {
        flag: flag_name,
        key,
    })
}

/// The daemon's local socket, used by the daemon to listen and by `d7q get`/`d7q pull` to find
/// it: `$XDG_RUNTIME_DIR/d7q/daemon.sock` when that is set, else `/run/d7q/daemon.sock` for
/// root, else `/tmp/d7q-$UID/daemon.sock`. The daemon creates a missing parent directory 0700
/// and refuses one another user owns or may write; clients refuse such a socket too
/// ([`crate::local::check_socket`]).
pub fn default_socket_path() -> PathBuf {
    let xdg = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty());
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    socket_path_for(xdg.as_deref().map(Path::new), uid)
}

/// Where a client looks for a running daemon when `--daemon` is not given, in order: the
/// system daemon's `/run/d7q/daemon.sock` (a user's `d7q get` must find the daemon that systemd
/// started as root), then its own [`default_socket_path`]. /run first: only root can create
/// names there, while a path under /tmp is one any local user might have planted.
pub fn socket_candidates() -> Vec<PathBuf> {
    socket_candidates_for(default_socket_path())
}

fn socket_candidates_for(own: PathBuf) -> Vec<PathBuf> {
    let system = PathBuf::from(SYSTEM_SOCKET);
    if own == system {
        vec![system]
    } else {
        vec![system, own]
    }
}

/// The host label when none is configured: the host name.
pub fn default_host() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

/// Parses a rate into bytes per second: `"100MiB"`, `"1.5GB"`, `"800Mbit"`, `"1Gbps"`, a bare
/// number of bytes, or `"0"` (unlimited). A `/s` suffix is allowed. Byte units are `B`, `kB`,
/// `MB`, `GB`, `TB` (powers of 1000) and `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024); bit
/// units are `bit`, `kbit`, `Mbit`, `Gbit`, `Tbit` and the same with `bps`.
pub fn parse_rate(s: &str) -> Result<u64, UnitError> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let (mantissa, scale, unit) = split_number(t).ok_or(UnitError::Rate)?;
    let (num, den) = match byte_unit(unit) {
        Some(m) => (m, 1),
        None => match bit_unit(unit) {
            Some(m) => (m, 8),
            None => return Err(ambiguous(unit).unwrap_or(UnitError::Rate)),
        },
    };
    scaled(mantissa, scale, num, den)
}

/// Parses a size into bytes: `"10GiB"`, `"500MB"`, `"1.5TiB"`, a bare number of bytes, or `"0"`.
/// Units as for [`parse_rate`], bytes only.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let (mantissa, scale, unit) = split_number(s.trim()).ok_or(UnitError::Size)?;
    match byte_unit(unit) {
        Some(m) => scaled(mantissa, scale, m, 1),
        None => Err(ambiguous(unit).unwrap_or(UnitError::Size)),
    }
}

/// Parses a duration: `"7d"`, `"12h"`, `"30m"`, `"45s"`, `"500ms"`, combinations like
/// `"1h30m"`, or `"0"`.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = t;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return Err(UnitError::Duration);
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let letters = rest[digits..]
            .bytes()
            .take_while(u8::is_ascii_alphabetic)
            .count();
        if digits == 0 || letters == 0 {
            return Err(UnitError::Duration);
        }
        let n: u64 = rest[..digits].parse().map_err(|_| UnitError::Overflow)?;
        let unit_ms: u64 = match &rest[digits..digits + letters] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(UnitError::Duration),
        };
        let ms = n.checked_mul(unit_ms).ok_or(UnitError::Overflow)?;
        total = total
            .checked_add(Duration::from_millis(ms))
            .ok_or(UnitError::Overflow)?;
        rest = &rest[digits + letters..];
    }
    Ok(total)
}

/// Parses a watermark: a percentage of the filesystem (`"90%"`, `"92.5%"`) or a size
/// (`"500GiB"`, see [`parse_size`]).
pub fn parse_watermark(s: &str) -> Result<Watermark, UnitError> {
    let t = s.trim();
    match t.strip_suffix('%') {
        Some(p) => {
            let (mantissa, scale, unit) = split_number(p.trim_end()).ok_or(UnitError::Watermark)?;
            if !unit.is_empty() {
                return Err(UnitError::Watermark);
            }
            let pct = mantissa as f64 / 10f64.powi(scale as i32);
            if pct > 100.0 {
                return Err(UnitError::Watermark);
            }
            Ok(Watermark::Percent(pct))
        }
        None => parse_size(t).map(Watermark::Bytes).map_err(|e| match e {
            UnitError::Size => UnitError::Watermark,
            other => other,
        }),
    }
}

/// Checks a `--registry` value: `host`, `host:port` or `*.domain[:port]`, no scheme and no path.
/// Returns it lowercased, as host names compare.
pub fn parse_registry(s: &str) -> Result<String, UnitError> {
    let t = s.trim().to_ascii_lowercase();
    let (host, port) = match t.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (t.as_str(), None),
    };
    if let Some(p) = port {
        if parse_port(p).is_none() {
            return Err(UnitError::Registry);
        }
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(UnitError::Registry);
    }
    Ok(t)
}

/// A TCP port as a rule or an authority writes it: ASCII digits only, 1 to 65535. `u16`'s own
/// parser also takes a sign, which made `127.0.0.1:+43` a host *name* rule of `--proxy-allow`
/// (the address form refuses the sign) and `registry.test:+5000` an intercept pattern.
pub fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|&p| p != 0)
}

/// The socket of the system's daemon (root's default).
pub const SYSTEM_SOCKET: &str = "/run/d7q/daemon.sock";

fn socket_path_for(xdg_runtime_dir: Option<&Path>, uid: u32) -> PathBuf {
    match xdg_runtime_dir {
        Some(dir) => dir.join("d7q").join("daemon.sock"),
        None if uid == 0 => PathBuf::from(SYSTEM_SOCKET),
        None => PathBuf::from(format!("/tmp/d7q-{uid}/daemon.sock")),
    }
}

/// Splits `"1.5GiB"` into mantissa 15, decimal scale 1 and unit `"GiB"`. Digits only: no sign,
/// no exponent, at most 9 decimals.
fn split_number(s: &str) -> Option<(u128, u32, &str)> {
    let end = s
        .bytes()
        .position(|b| !(b.is_ascii_digit() || b == b'.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() || frac.len() > 9 || (num.contains('.') && frac.is_empty()) {
        return None;
    }
    if int.len() + frac.len() > 30 {
        return None;
    }
    let mantissa: u128 = format!("{int}{frac}").parse().ok()?;
    Some((mantissa, frac.len() as u32, unit.trim_start()))
}

/// `mantissa / 10^scale * num / den`, rounded to the nearest integer, if it fits in a u64.
fn scaled(mantissa: u128, scale: u32, num: u128, den: u128) -> Result<u64, UnitError> {
    let top = mantissa.checked_mul(num).ok_or(UnitError::Overflow)?;
    let bottom = den * 10u128.pow(scale);
    let v = (top + bottom / 2) / bottom;
    u64::try_from(v).map_err(|_| UnitError::Overflow)
}

fn byte_unit(unit: &str) -> Option<u128> {
    Some(match unit {
        "" | "B" => 1,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    })
}

fn bit_unit(unit: &str) -> Option<u128> {
    let prefix = unit
        .strip_suffix("bit")
        .or_else(|| unit.strip_suffix("bps"))?;
    Some(match prefix {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return None,
    })
}

/// `Mb`, `Gb`…: people mean both bits and bytes by these, so neither is guessed.
fn ambiguous(unit: &str) -> Option<UnitError> {
    let prefix = unit.strip_suffix('b')?;
    matches!(prefix, "k" | "K" | "M" | "G" | "T").then(|| UnitError::Ambiguous(prefix.into()))
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

// ---- field deserializers: human units, checked when the file is loaded ----

/// A visitor for values written as a string in human units (or, where `from_int` allows it, as
/// a plain non-negative integer).
struct Human<T> {
    parse: fn(&str) -> Result<T, UnitError>,
    from_int: Option<fn(u64) -> T>,
    expecting: UnitError,
}

impl<T> de::Visitor<'_> for Human<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The UnitError messages read "expected …"; serde adds its own "expected".
        let msg = self.expecting.to_string();
        f.write_str(msg.strip_prefix("expected ").unwrap_or(&msg))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        (self.parse)(v).map(Some).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        match (self.from_int, u64::try_from(v)) {
            (Some(f), Ok(n)) => Ok(Some(f(n))),
            _ => Err(E::invalid_type(de::Unexpected::Signed(v), &self)),
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        match self.from_int {
            Some(f) => Ok(Some(f(v))),
            None => Err(E::invalid_type(de::Unexpected::Unsigned(v), &self)),
        }
    }
}

fn de_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    d.deserialize_any(Human {
        parse: parse_rate,
        from_int: Some(|n| n),
        expecting: UnitError::Rate,
    })
}

fn de_watermark<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Watermark>, D::Error> {
    d.deserialize_any(Human {
        parse: parse_watermark,
        from_int: Some(Watermark::Bytes),
        expecting: UnitError::Watermark,
    })
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    // No bare integers: seconds or days? The unit is always written.
    d.deserialize_any(Human {
        parse: parse_duration,
        from_int: None,
        expecting: UnitError::Duration,
    })
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    d.deserialize_any(Human {
        parse: parse_size,
        from_int: Some(|n| n),
        expecting: UnitError::Size,
    })
}

fn de_congestion<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<crate::transport::Congestion>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(de::Error::custom)
}

fn de_registries<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    list.iter()
        .map(|r| parse_registry(r).map_err(|e| de::Error::custom(format_args!("{e}, found {r:?}"))))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn de_proxy_allow<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<crate::proxy::policy::Allow>>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    list.iter()
        .map(|r| r.parse().map_err(de::Error::custom))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn de_blocks<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<crate::cidr::Cidr>>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    list.iter()
        .map(|b| crate::origin::policy::parse_block(b).map_err(de::Error::custom))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn de_log<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    tracing_subscriber::EnvFilter::try_new(&s)
        .map_err(|e| de::Error::custom(format_args!("not a log filter: {e}")))?;
    Ok(Some(s))
}

// ---- a deserializer over toml::Value that knows the dotted key of every value ----
//
// toml's own errors point at a span of the source, not at a key path, and unknown-key errors do
// not say in which table the key was. This walks the parsed table itself and stamps the first
// (innermost) key an error passes through. It supports what the config structs use: tables into
// structs, arrays into Vecs, scalars.

/// An error on its way out of the deserializer; `key` is set by the innermost table or array
/// that sees it.
#[derive(Debug)]
struct DeError {
    key: Option<String>,
    kind: DeErrorKind,
}

#[derive(Debug)]
enum DeErrorKind {
    UnknownKey {
        name: String,
        expected: &'static [&'static str],
    },
    /// `found_shown`: the message already says what was found.
    Value { message: String, found_shown: bool },
}

impl DeError {
    /// Stamps the key on an error that has none yet — the innermost table or array it leaves —
    /// with what was found there, unless the message already says.
    fn at(mut self, key: &str, found: Option<String>) -> DeError {
        if self.key.is_some() {
            return self;
        }
        self.key = Some(key.to_string());
        if let DeErrorKind::Value {
            message,
            found_shown: found_shown @ false,
        } = &mut self.kind
        {
            if let Some(found) = found {
                message.push_str(", found ");
                message.push_str(&found);
                *found_shown = true;
            }
        }
        self
    }

    fn into_config_error(self) -> ConfigError {
        let key = self.key.unwrap_or_default();
        match self.kind {
            DeErrorKind::UnknownKey { name, expected } => ConfigError::UnknownKey {
                path: PathBuf::new(),
                key,
                suggestion: closest(&name, expected).map(str::to_string),
            },
            DeErrorKind::Value { message, .. } => ConfigError::BadValue {
                path: PathBuf::new(),
                key,
                message,
            },
        }
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            DeErrorKind::UnknownKey { name, .. } => write!(f, "unknown key `{name}`"),
            DeErrorKind::Value { message, .. } => f.write_str(message),
        }
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            key: None,
            kind: DeErrorKind::Value {
                message: msg.to_string(),
                found_shown: false,
            },
        }
    }

    fn invalid_type(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        DeError {
            key: None,
            kind: DeErrorKind::Value {
                message: format!("expected {exp}, found {unexp}"),
                found_shown: true,
            },
        }
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        DeError {
            key: None,
            kind: DeErrorKind::UnknownKey {
                name: field.to_string(),
                expected,
            },
        }
    }
}

/// A scalar as it was written, for "found …" in messages.
fn describe(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(format!("{s:?}")),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(x) => Some(x.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(d) => Some(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

fn unexpected(v: &toml::Value) -> de::Unexpected<'_> {
    match v {
        toml::Value::String(s) => de::Unexpected::Str(s),
        toml::Value::Integer(i) => de::Unexpected::Signed(*i),
        toml::Value::Float(x) => de::Unexpected::Float(*x),
        toml::Value::Boolean(b) => de::Unexpected::Bool(*b),
        toml::Value::Datetime(_) => de::Unexpected::Other("a date-time"),
        toml::Value::Array(_) => de::Unexpected::Seq,
        toml::Value::Table(_) => de::Unexpected::Map,
    }
}

/// The known key nearest to a misspelt one, if it is near enough to be the likely intent.
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

struct ValueDe {
    value: toml::Value,
    /// Dotted key of `value`; empty for the document itself.
    path: String,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl<'de> Deserializer<'de> for ValueDe {
    type Error = DeError;

    fn deserialize_any<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.value {
            toml::Value::String(s) => visitor.visit_string(s),
            toml::Value::Integer(i) => visitor.visit_i64(i),
            toml::Value::Float(x) => visitor.visit_f64(x),
            toml::Value::Boolean(b) => visitor.visit_bool(b),
            toml::Value::Datetime(d) => visitor.visit_string(d.to_string()),
            toml::Value::Array(items) => visitor.visit_seq(SeqDe {
                items: items.into_iter().enumerate(),
                path: self.path,
            }),
            toml::Value::Table(t) => visitor.visit_map(MapDe {
                entries: t.into_iter(),
                path: self.path,
                pending: None,
            }),
        }
    }

    fn deserialize_option<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        // TOML has no null: a key that is present has a value.
        visitor.visit_some(self)
    }

    fn deserialize_seq<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        // A single value where a list is expected is a list of one:
        // `supernode = "10.0.0.5:8002"` means what it says.
        let items = match self.value {
            toml::Value::Array(items) => items,
            one => vec![one],
        };
        visitor.visit_seq(SeqDe {
            items: items.into_iter().enumerate(),
            path: self.path,
        })
    }

    fn deserialize_struct<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self.value {
            toml::Value::Table(t) => visitor.visit_map(MapDe {
                entries: t.into_iter(),
                path: self.path,
                pending: None,
            }),
            other => Err(de::Error::invalid_type(unexpected(&other), &"a table")),
        }
    }

    fn deserialize_newtype_struct<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self.value {
            toml::Value::String(s) => visitor.visit_enum(s.into_deserializer()),
            other => ValueDe {
                value: other,
                path: self.path,
            }
            .deserialize_any(visitor),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct tuple tuple_struct map identifier ignored_any
    }
}

struct SeqDe {
    items: std::iter::Enumerate<std::vec::IntoIter<toml::Value>>,
    path: String,
}

impl<'de> SeqAccess<'de> for SeqDe {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some((i, value)) = self.items.next() else {
            return Ok(None);
        };
        let path = format!("{}[{i}]", self.path);
        let shown = describe(&value);
        seed.deserialize(ValueDe {
            value,
            path: path.clone(),
        })
        .map(Some)
        .map_err(|e| e.at(&path, shown))
    }
}

struct MapDe {
    entries: toml::map::IntoIter,
    path: String,
    pending: Option<(String, toml::Value)>,
}

impl<'de> MapAccess<'de> for MapDe {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        let path = join(&self.path, &key);
        let k = seed
            .deserialize(key.into_deserializer())
            .map_err(|e: DeError| e.at(&path, None))?;
        self.pending = Some((path, value));
        Ok(Some(k))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let Some((path, value)) = self.pending.take() else {
            return Err(de::Error::custom("value asked for before its key"));
        };
        let shown = describe(&value);
        seed.deserialize(ValueDe {
            value,
            path: path.clone(),
        })
        .map_err(|e| e.at(&path, shown))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[supernode]
listen = "0.0.0.0:8002"
metrics = "0.0.0.0:8001"
data_dir = "/var/lib/d7q/supernode"
pki = "node"
upstream = ["10.0.0.1:8002", "10.0.0.2:8002"]
dc = "dc1"
zone = ""
origin_ca = ["/etc/ssl/extra.pem"]
back_to_source_rate = "200MiB"
origin_allow = ["169.254.170.2"]
origin_deny = ["127.0.0.0/8", "::1"]

[daemon]
listen = "0.0.0.0:65002"
proxy = "127.0.0.1:65001"
data_dir = "/var/lib/d7q/daemon"
pki = "/etc/d7q/node"
supernode = "10.0.0.5:8002"
socket = "/run/d7q/daemon.sock"
host = "h1"
upload_rate = "800Mbit"
download_rate = 0
per_download_rate = "1.5GB/s"
registry = ["Registry.test", "*.corp.example:5000"]
origin_ca = []
mirror_upstream = "mirror.corp:5000"
proxy_allow = ["registry.internal:5000", "127.0.0.0/8"]
metrics = "127.0.0.1:65003"
log = "info,d7q=debug"

[daemon.storage]
high_watermark = "90%"
low_watermark = "500GiB"
ttl = "7d"

[daemon.proxy_ca]
dir = "proxy-ca"
"#;

    fn parse_err(text: &str) -> String {
        ConfigFile::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn good_file_loads_with_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d7q.toml");
        std::fs::write(&path, GOOD).unwrap();
        let cfg = ConfigFile::load(&path).unwrap();

        let sn = cfg.supernode();
        assert_eq!(sn.listen, Some("0.0.0.0:8002".parse().unwrap()));
        assert_eq!(sn.metrics, Some("0.0.0.0:8001".parse().unwrap()));
        assert_eq!(sn.data_dir, Some("/var/lib/d7q/supernode".into()));
        assert_eq!(
            sn.pki,
            Some(dir.path().join("node")),
            "relative to the file"
        );
        assert_eq!(sn.upstream.as_ref().map(Vec::len), Some(2));
        assert_eq!(sn.dc.as_deref(), Some("dc1"));
        assert_eq!(sn.zone.as_deref(), Some(""));
        assert_eq!(sn.host, None);
        assert_eq!(sn.back_to_source_rate, Some(200 << 20));
        let block = |b: &str| crate::origin::policy::parse_block(b).unwrap();
        assert_eq!(sn.origin_allow, Some(vec![block("169.254.170.2/32")]));
        assert_eq!(
            sn.origin_deny,
            Some(vec![block("127.0.0.0/8"), block("::1/128")])
        );

        let d = cfg.daemon();
        assert_eq!(d.proxy, Some("127.0.0.1:65001".parse().unwrap()));
        assert_eq!(
            d.supernode,
            Some(vec!["10.0.0.5:8002".parse().unwrap()]),
            "a single value is a list of one"
        );
        assert_eq!(d.upload_rate, Some(100_000_000));
        assert_eq!(d.download_rate, Some(0));
        assert_eq!(d.per_download_rate, Some(1_500_000_000));
        assert_eq!(
            d.registry,
            Some(vec!["registry.test".into(), "*.corp.example:5000".into()])
        );
        assert_eq!(d.origin_ca, Some(vec![]));
        assert_eq!(d.mirror_upstream.as_deref(), Some("mirror.corp:5000"));
        assert_eq!(
            d.proxy_allow,
            Some(vec![
                "registry.internal:5000".parse().unwrap(),
                "127.0.0.0/8".parse().unwrap()
            ])
        );
        assert_eq!(d.metrics, Some("127.0.0.1:65003".parse().unwrap()));
        assert_eq!(d.log.as_deref(), Some("info,d7q=debug"));
        let st = d.storage.unwrap();
        assert_eq!(st.high_watermark, Some(Watermark::Percent(90.0)));
        assert_eq!(st.low_watermark, Some(Watermark::Bytes(500 << 30)));
        assert_eq!(st.ttl, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(d.proxy_ca.unwrap().dir, Some(dir.path().join("proxy-ca")));
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(ConfigFile::parse("").unwrap(), ConfigFile::default());
        assert_eq!(
            ConfigFile::parse("[daemon]\n").unwrap().daemon(),
            DaemonFile::default()
        );
    }

    #[test]
    fn unknown_keys_are_named_with_their_table() {
        let e = ConfigFile::parse("[daemon]\nuplod_rate = \"1MiB\"\n").unwrap_err();
        match &e {
            ConfigError::UnknownKey {
                key, suggestion, ..
            } => {
                assert_eq!(key, "daemon.uplod_rate");
                assert_eq!(suggestion.as_deref(), Some("upload_rate"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            e.in_file(Path::new("/etc/d7q.toml")).to_string(),
            "config /etc/d7q.toml: unknown key `daemon.uplod_rate`; did you mean `upload_rate`?"
        );

        assert_eq!(
            parse_err("[deamon]\n"),
            "config : unknown key `deamon`; did you mean `daemon`?"
        );
        assert_eq!(
            parse_err("colour = 1\n"),
            "config : unknown key `colour`",
            "no suggestion when nothing is close"
        );
        assert_eq!(
            parse_err("[daemon.storage]\nttl = \"1d\"\nhigh = \"90%\"\n"),
            "config : unknown key `daemon.storage.high`"
        );
        assert_eq!(
            parse_err("[daemon]\nproxy_ca = { dir = \"x\", name = \"y\" }\n"),
            "config : unknown key `daemon.proxy_ca.name`"
        );
        // A key that belongs to the other section is still refused where it is.
        assert_eq!(
            parse_err("[daemon]\nupstream = []\n"),
            "config : unknown key `daemon.upstream`"
        );
    }

    #[test]
    fn bad_values_are_named_with_their_key() {
        let e = ConfigFile::parse("[daemon]\nupload_rate = \"fast\"\n")
            .unwrap_err()
            .in_file(Path::new("/etc/d7q.toml"));
        assert_eq!(
            e.to_string(),
            "config /etc/d7q.toml: daemon.upload_rate: \
             expected a rate like \"100MiB\" or \"800Mbit\", found \"fast\""
        );
        let cases = [
            (
                "[daemon]\nupload_rate = true\n",
                "daemon.upload_rate: expected a rate like \"100MiB\" or \"800Mbit\", \
                 found boolean `true`",
            ),
            (
                "[daemon]\nupload_rate = -5\n",
                "daemon.upload_rate: expected a rate like \"100MiB\" or \"800Mbit\", \
                 found integer `-5`",
            ),
            (
                "[daemon]\ndownload_rate = \"100Mb\"\n",
                "daemon.download_rate: \"Mb\" is ambiguous: write \"MB\" for bytes or \
                 \"Mbit\" for bits, found \"100Mb\"",
            ),
            (
                "[daemon]\nlisten = 65002\n",
                "daemon.listen: expected socket address, found integer `65002`",
            ),
            (
                "[daemon]\nlisten = \"0.0.0.0\"\n",
                "daemon.listen: invalid socket address syntax, found \"0.0.0.0\"",
            ),
            (
                "[daemon]\nsupernode = [\"10.0.0.5:8002\", \"nope\"]\n",
                "daemon.supernode[1]: invalid socket address syntax, found \"nope\"",
            ),
            (
                "[daemon]\nproxy_allow = [\"127.0.0.1\", \"localhost\"]\n",
                "daemon.proxy_allow: expected HOST:PORT, *:PORT, ADDR:PORT, [V6]:PORT, ADDR \
                 or CIDR (like 127.0.0.0/8), found \"localhost\"",
            ),
            (
                "[daemon]\nregistry = [\"https://registry.test/v2\"]\n",
                "daemon.registry: expected a registry like \"registry.test\", \
                 \"registry.test:5000\" or \"*.corp.example\", found \"https://registry.test/v2\"",
            ),
            (
                "[daemon.storage]\nttl = 7\n",
                "daemon.storage.ttl: expected a duration like \"7d\", \"12h\", \"30m\" or \
                 \"45s\", found integer `7`",
            ),
            (
                "[daemon.storage]\nhigh_watermark = \"120%\"\n",
                "daemon.storage.high_watermark: expected a watermark like \"90%\" or \
                 \"500GiB\", found \"120%\"",
            ),
            (
                "[daemon.storage]\nhigh_watermark = \"80%\"\nlow_watermark = \"90%\"\n",
                "daemon.storage.low_watermark: must not be above \
                 daemon.storage.high_watermark",
            ),
            (
                "daemon = 3\n",
                "daemon: expected a table, found integer `3`",
            ),
            (
                "[supernode]\nlog = \"d7q=loud\"\n",
                "supernode.log: not a log filter",
            ),
            (
                "[supernode]\norigin_deny = [\"localhost\"]\n",
                "supernode.origin_deny: expected an address or a block like \
                 169.254.169.254/32 or fd00::/8, found \"localhost\"",
            ),
        ];
        for (text, want) in cases {
            let got = parse_err(text);
            let got = got.strip_prefix("config : ").unwrap_or(&got);
            assert!(got.starts_with(want), "{text:?}:\n got {got}\nwant {want}");
        }
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        match ConfigFile::parse("[daemon]\nlisten = \n").unwrap_err() {
            ConfigError::Syntax {
                line,
                column,
                message,
                ..
            } => {
                assert_eq!((line, column), (2, 10));
                assert!(!message.contains('\n'), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let e = ConfigFile::load(Path::new("/nonexistent/d7q.toml")).unwrap_err();
        assert!(
            e.to_string().starts_with("config /nonexistent/d7q.toml: "),
            "{e}"
        );
    }

    #[test]
    fn units() {
        let rates: &[(&str, u64)] = &[
            ("0", 0),
            ("1000", 1000),
            ("100B", 100),
            ("100MiB", 100 << 20),
            ("100 MiB", 100 << 20),
            ("100MiB/s", 100 << 20),
            ("1.5GB", 1_500_000_000),
            ("1.5GiB", 3 << 29),
            ("10kB", 10_000),
            ("10KB", 10_000),
            ("10KiB", 10_240),
            ("800Mbit", 100_000_000),
            ("800Mbps", 100_000_000),
            ("1Gbit/s", 125_000_000),
            ("12bit", 2),
            ("2TiB", 2 << 40),
        ];
        for &(s, want) in rates {
            assert_eq!(parse_rate(s), Ok(want), "{s}");
        }
        for s in [
            "",
            "fast",
            "-1MiB",
            "1e6",
            "1.MiB",
            ".5MiB",
            "10 M",
            "10mib",
            "1.0000000001GB",
        ] {
            assert_eq!(parse_rate(s), Err(UnitError::Rate), "{s:?}");
        }
        assert_eq!(parse_rate("1Gb"), Err(UnitError::Ambiguous("G".into())));
        assert_eq!(parse_rate("20000000TiB"), Err(UnitError::Overflow));

        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("10Gbit"), Err(UnitError::Size));

        let durations: &[(&str, u64)] = &[
            ("0", 0),
            ("45s", 45),
            ("30m", 1800),
            ("12h", 43_200),
            ("7d", 604_800),
            ("1h30m", 5400),
        ];
        for &(s, want) in durations {
            assert_eq!(parse_duration(s), Ok(Duration::from_secs(want)), "{s}");
        }
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for s in ["", "7", "d", "7 days", "1.5h", "-1s", "7w"] {
            assert_eq!(parse_duration(s), Err(UnitError::Duration), "{s:?}");
        }

        assert_eq!(parse_watermark("90%"), Ok(Watermark::Percent(90.0)));
        assert_eq!(parse_watermark("92.5 %"), Ok(Watermark::Percent(92.5)));
        assert_eq!(parse_watermark("500GiB"), Ok(Watermark::Bytes(500 << 30)));
        for s in ["101%", "%", "90%%", "ninety"] {
            assert_eq!(parse_watermark(s), Err(UnitError::Watermark), "{s:?}");
        }

        assert_eq!(parse_registry("Registry.Test"), Ok("registry.test".into()));
        assert_eq!(
            parse_registry("localhost:5000"),
            Ok("localhost:5000".into())
        );
        assert_eq!(
            parse_registry("*.corp.example"),
            Ok("*.corp.example".into())
        );
        for s in [
            "",
            "https://r.test",
            "r.test/v2",
            "r.test:0",
            "r.test:x",
            "r.test:+5000",
            "*",
            "a..b",
            "-a.b",
        ] {
            assert_eq!(parse_registry(s), Err(UnitError::Registry), "{s:?}");
        }
        assert_eq!(parse_port("5000"), Some(5000));
        for p in ["", "0", "+5000", " 5000", "65536", "5e3"] {
            assert_eq!(parse_port(p), None, "{p:?}");
        }
    }

    #[test]
    fn flags_win_then_file_then_default() {
        let file = ConfigFile::parse(
            "[daemon]\nupload_rate = \"1MiB\"\nsupernode = [\"10.0.0.5:8002\"]\n\
             data_dir = \"/file\"\n",
        )
        .unwrap()
        .daemon();
        assert_eq!(pick(Some(5), file.upload_rate, 0), 5);
        assert_eq!(pick(None, file.upload_rate, 0), 1 << 20);
        assert_eq!(pick(None, file.download_rate, 7), 7);

        let flag: SocketAddr = "10.9.9.9:8002".parse().unwrap();
        assert_eq!(pick_list(vec![flag], file.supernode.clone()), vec![flag]);
        assert_eq!(
            pick_list(vec![], file.supernode.clone()),
            file.supernode.clone().unwrap()
        );
        assert!(pick_list::<SocketAddr>(vec![], None).is_empty());

        assert_eq!(
            require(
                Some(PathBuf::from("/flag")),
                file.data_dir.clone(),
                "--data-dir",
                "daemon.data_dir"
            )
            .unwrap(),
            PathBuf::from("/flag")
        );
        assert_eq!(
            require(None, file.data_dir.clone(), "--data-dir", "daemon.data_dir").unwrap(),
            PathBuf::from("/file")
        );
        assert_eq!(
            require::<PathBuf>(None, None, "--pki", "daemon.pki")
                .unwrap_err()
                .to_string(),
            "missing --pki (or `daemon.pki` in the config file)"
        );
    }

    #[test]
    fn transport_section_parses_and_refuses_bad_values() {
        let cfg = ConfigFile::parse(
            "[transport]\ncongestion = \"cubic\"\ninitial_rtt = \"80ms\"\n\
             stream_window = \"8MiB\"\nconnection_window = \"128MiB\"\n\
             keep_alive = \"2s\"\nidle_timeout = \"1m\"\n",
        )
        .unwrap();
        let t = cfg.transport.unwrap();
        assert_eq!(t.congestion, Some(crate::transport::Congestion::Cubic));
        assert_eq!(t.initial_rtt, Some(Duration::from_millis(80)));
        assert_eq!(t.stream_window, Some(8 << 20));
        assert_eq!(t.connection_window, Some(128 << 20));
        assert_eq!(t.keep_alive, Some(Duration::from_secs(2)));
        assert_eq!(t.idle_timeout, Some(Duration::from_secs(60)));
        let err = parse_err("[transport]\ncongestion = \"vegas\"\n");
        assert!(err.contains("transport.congestion"), "{err}");
        assert!(err.contains("bbr, cubic or newreno"), "{err}");
        let err = parse_err("[transport]\nidle_timeout = 30\n");
        assert!(err.contains("transport.idle_timeout"), "{err}");
    }

    #[test]
    fn socket_path_rules() {
        assert_eq!(
            socket_path_for(Some(Path::new("/run/user/1000")), 1000),
            PathBuf::from("/run/user/1000/d7q/daemon.sock")
        );
        assert_eq!(
            socket_path_for(None, 0),
            PathBuf::from("/run/d7q/daemon.sock")
        );
        assert_eq!(
            socket_path_for(None, 1000),
            PathBuf::from("/tmp/d7q-1000/daemon.sock")
        );
        assert_eq!(
            socket_candidates().first().unwrap(),
            Path::new("/run/d7q/daemon.sock")
        );
        assert_eq!(
            socket_candidates_for(PathBuf::from("/tmp/d7q-1000/daemon.sock")),
            [
                PathBuf::from("/run/d7q/daemon.sock"),
                PathBuf::from("/tmp/d7q-1000/daemon.sock")
            ]
        );
        assert_eq!(
            socket_candidates_for(PathBuf::from("/run/d7q/daemon.sock")),
            [PathBuf::from("/run/d7q/daemon.sock")]
        );
    }
}
