//! Row e's baseline for [`crate::swarm`]: the same file to the same peers over the same links as
//! a BitTorrent swarm — `aria2c` clients, an `opentracker`, a `.torrent` made by `mktorrent` with
//! the piece size the mesh uses for that length.
//!
//! The tracker and the seed run in the supernode's namespace, so the seed has the supernode's
//! link; unlike the mesh's supernode, which fetches the file from the origin during the run, the
//! seed starts with it (a hard link to the origin's copy). Every peer runs one `aria2c` into its
//! own directory, DHT and local peer discovery off, peer exchange on, no upload limit, no file
//! allocation, seeding for as long as it runs. A peer's completion is the time stamp its
//! `--on-bt-download-complete` hook writes next to the file (aria2 runs it when the last piece is
//! verified, before seeding); the peers keep seeding until [`Peers::stop`], as daemons keep serving.
//!
//! Not here: the timing against the other runs, the counters and the hashing of the outputs (the
//! swarm benchmark does those for every kind of run), and anything of d7q's.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use tokio::process::{Child, Command};

use crate::netns::Topology;
use crate::util::{self, CpuTimes};

/// The programs, each with the Debian package that has it.
const ARIA2C: (&str, &str) = ("aria2c", "aria2");
const OPENTRACKER: (&str, &str) = ("opentracker", "opentracker");
const MKTORRENT: (&str, &str) = ("mktorrent", "mktorrent");

/// The tracker's HTTP (and UDP) port, and every client's BitTorrent port (each namespace has
/// its own).
pub const TRACKER_PORT: u16 = 6969;
const BT_PORT: u16 = 6881;

/// The tracker's whitelist, relative to the directory it chroots into: Debian's opentracker is
/// built with a whitelist and refuses every torrent not in it.
const WHITELIST: &str = "whitelist";

/// How long the tracker and the seed may take to be ready (the seed announced), and how often
/// that is asked.
const SEED_READY_TIMEOUT: Duration = Duration::from_secs(30);
const SEED_POLL: Duration = Duration::from_millis(100);

/// How often the peers' hook files are looked for. A peer's time is the hook's own stamp, so
/// this only delays noticing, not the measurement.
const DONE_POLL: Duration = Duration::from_millis(50);

/// Longest `mktorrent` (SHA-1 of the whole file) or `aria2c -S` may take.
const MKTORRENT_TIMEOUT: Duration = Duration::from_secs(600);

/// The hook: `aria2c` runs it with the GID, the number of files and the first file's path; it
/// writes the time as Unix seconds to that path + [`DONE_SUFFIX`], whole or not at all.
const HOOK_SCRIPT: &str = "#!/bin/sh\n\
    # aria2c --on-bt-download-complete: $1 GID, $2 number of files, $3 the first file.\n\
    date +%s.%N > \"$3.done.tmp\" && mv \"$3.done.tmp\" \"$3.done\"\n";
const DONE_SUFFIX: &str = ".done";

/// The programs a torrent run needs, found on `PATH`.
pub struct Tools {
    aria2c: PathBuf,
    opentracker: PathBuf,
    mktorrent: PathBuf,
    /// The first line of `aria2c --version`.
    pub aria2_version: String,
}

impl Tools {
    /// Finds all three, or fails naming the package to install.
    pub fn find() -> Result<Self> {
        let find = |(program, package): (&str, &str)| {
            program_in_path(program).with_context(|| {
                format!(
                    "--aria2 needs {program}, not found on PATH: install the Debian package \
                     {package} (apt-get install -y aria2 opentracker mktorrent)"
                )
            })
        };
        let aria2c = find(ARIA2C)?;
        let version = std::process::Command::new(&aria2c)
            .arg("--version")
            .output()
            .with_context(|| format!("running {} --version", aria2c.display()))?;
        Ok(Self {
            aria2_version: String::from_utf8_lossy(&version.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
            aria2c,
            opentracker: find(OPENTRACKER)?,
            mktorrent: find(MKTORRENT)?,
        })
    }
}

/// A `.torrent` for the benchmark's file.
#[derive(Clone, Debug, Serialize)]
pub struct Torrent {
    /// The metainfo file (in the benchmark's temp dir, so not in the record).
    #[serde(skip)]
    pub path: PathBuf,
    /// The file's name in it (what every client writes in its directory).
    pub name: String,
    /// SHA-1 of the info dictionary, lower-case hex.
    pub info_hash: String,
    pub piece_size: u32,
    pub announce: String,
}

impl Torrent {
    /// Runs `mktorrent` on `file` with the mesh's piece size for its length, announcing to
    /// `tracker`; writes `out`. Checks the piece length it wrote and reads the info hash back
    /// through `aria2c -S`.
    pub async fn make(tools: &Tools, file: &Path, tracker: Ipv4Addr, out: &Path) -> Result<Self> {
        let len = std::fs::metadata(file)?.len();
        let piece_size = piece_size(len)?;
        let announce = format!("http://{tracker}:{TRACKER_PORT}/announce");
        let name = file
            .file_name()
            .context("the file has no name")?
            .to_string_lossy()
            .into_owned();
        let mut cmd = Command::new(&tools.mktorrent);
        cmd.args(["-d", "-l", &piece_size.trailing_zeros().to_string()])
            .args(["-a", &announce, "-n", &name, "-o"])
            .arg(out)
            .arg(file);
        let done = util::run_timed(&mut cmd, MKTORRENT_TIMEOUT).await?;
        util::check_success("mktorrent", &done.output)?;
        let meta = std::fs::read(out).with_context(|| format!("reading {}", out.display()))?;
        ensure!(
            bencoded_int(&meta, "piece length") == Some(u64::from(piece_size)),
            "mktorrent wrote a piece length of {:?}, asked for {piece_size}",
            bencoded_int(&meta, "piece length")
        );
        let mut cmd = Command::new(&tools.aria2c);
        cmd.arg("-S").arg(out);
        let shown = util::run_timed(&mut cmd, MKTORRENT_TIMEOUT).await?;
        util::check_success("aria2c -S", &shown.output)?;
        let text = String::from_utf8_lossy(&shown.output.stdout);
        let info_hash = info_hash_from_show(&text)
            .with_context(|| format!("no info hash in aria2c -S's output:\n{text}"))?;
        Ok(Self {
            path: out.to_path_buf(),
            name,
            info_hash,
            piece_size,
            announce,
        })
    }
}

/// The tracker and the seed, both in one namespace; killed on drop.
pub struct Seeded {
    tracker: Child,
    seed: Child,
    tracker_log: PathBuf,
    seed_log: PathBuf,
}

impl Seeded {
    /// Starts `opentracker` on `addr` and an `aria2c` seeding `source` (hard-linked into
    /// `dir/seed`) in `node`'s namespace, and waits until the tracker counts the seed as
    /// complete — so no peer announces into an empty swarm. `bench` (this binary) asks the
    /// tracker, from inside the namespace.
    pub async fn start(
        tools: &Tools,
        torrent: &Torrent,
        node: &str,
        addr: Ipv4Addr,
        source: &Path,
        dir: &Path,
        bench: &Path,
    ) -> Result<Self> {
        let tracker_dir = dir.join("tracker");
        std::fs::create_dir(&tracker_dir)?;
        std::fs::write(
            tracker_dir.join(WHITELIST),
            format!("{}\n", torrent.info_hash),
        )?;
        let tracker_log = dir.join("tracker.log");
        let mut cmd = Topology::command(node, &tools.opentracker);
        let port = TRACKER_PORT.to_string();
        // As root it chroots into -d and then reads the whitelist from inside.
        cmd.args(["-i", &addr.to_string(), "-p", &port, "-P", &port, "-d"])
            .arg(&tracker_dir)
            .args(["-w", &format!("/{WHITELIST}")]);
        let tracker = spawn_logged(cmd, &tracker_log, "opentracker")?;

        let seed_dir = dir.join("seed");
        std::fs::create_dir(&seed_dir)?;
        let copy = seed_dir.join(&torrent.name);
        if std::fs::hard_link(source, &copy).is_err() {
            std::fs::copy(source, &copy)
                .with_context(|| format!("copying {} for the seed", source.display()))?;
        }
        let seed_log = dir.join("seed.log");
        let mut cmd = Topology::command(node, &tools.aria2c);
        cmd.args(aria2_args(&seed_dir, &torrent.path, None));
        let seed = spawn_logged(cmd, &seed_log, "the seed's aria2c")?;
        let mut s = Self {
            tracker,
            seed,
            tracker_log,
            seed_log,
        };
        s.wait_seed_announced(torrent, node, SocketAddrV4::new(addr, TRACKER_PORT), bench)
            .await?;
        Ok(s)
    }

    /// Fails if the tracker or the seed has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for (child, log, what) in [
            (&mut self.tracker, &self.tracker_log, "opentracker"),
            (&mut self.seed, &self.seed_log, "the seed's aria2c"),
        ] {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{what} exited ({status})\n{}",
                    util::log_tail(log, "its log")
                );
            }
        }
        Ok(())
    }

    /// CPU seconds so far of the seed and of the tracker.
    pub fn cpu_s(&self) -> (f64, f64) {
        (cpu_of(&self.seed), cpu_of(&self.tracker))
    }

    /// Kills the seed, then the tracker.
    pub async fn stop(mut self) {
        for c in [&mut self.seed, &mut self.tracker] {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    async fn wait_seed_announced(
        &mut self,
        torrent: &Torrent,
        node: &str,
        tracker: SocketAddrV4,
        bench: &Path,
    ) -> Result<()> {
        let deadline = Instant::now() + SEED_READY_TIMEOUT;
        let path = scrape_path(&torrent.info_hash);
        let last = loop {
            self.check_alive()?;
            let mut cmd = Topology::command(node, bench);
            cmd.args(["scrape", &tracker.to_string(), &path]);
            let out = util::run_timed(&mut cmd, SEED_READY_TIMEOUT).await?;
            let body = String::from_utf8_lossy(&out.output.stdout);
            if out.output.status.success() && scrape_complete(&body).unwrap_or(0) >= 1 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                break if out.output.status.success() {
                    format!("the tracker said {body:?}")
                } else {
                    String::from_utf8_lossy(&out.output.stderr)
                        .trim()
                        .to_owned()
                };
            }
            tokio::time::sleep(SEED_POLL).await;
        };
        bail!(
            "the seed was not registered at the tracker within {SEED_READY_TIMEOUT:?} ({last})\n{}\n{}",
            util::log_tail(&self.seed_log, "the seed"),
            util::log_tail(&self.tracker_log, "the tracker")
        )
    }
}

/// One `aria2c` per peer, all started at once; killed on drop.
pub struct Peers {
    children: Vec<Child>,
    /// Each peer's directory: its output, the hook's stamp, aria2's control file.
    dirs: Vec<PathBuf>,
    logs: Vec<PathBuf>,
    name: String,
    /// When they were started, as Unix seconds (the hooks' clock).
    start_unix: f64,
}

impl Peers {
    /// Starts one `aria2c` in each of `nodes`, downloading into `dir/NODE/`, logging to
    /// `dir/NODE.log`. The common start is taken just before the first spawn.
    pub fn start(tools: &Tools, torrent: &Torrent, nodes: &[String], dir: &Path) -> Result<Self> {
        let hook = dir.join("done-hook.sh");
        write_hook(&hook)?;
        let dirs: Vec<PathBuf> = nodes.iter().map(|n| dir.join(n)).collect();
        let logs: Vec<PathBuf> = nodes.iter().map(|n| dir.join(format!("{n}.log"))).collect();
        let mut cmds = Vec::new();
        for (node, pdir) in nodes.iter().zip(&dirs) {
            std::fs::create_dir(pdir)?;
            let mut cmd = Topology::command(node, &tools.aria2c);
            cmd.args(aria2_args(pdir, &torrent.path, Some(&hook)));
            cmds.push(cmd);
        }
        let start_unix = unix_now();
        let mut children = Vec::new();
        for ((cmd, log), node) in cmds.into_iter().zip(&logs).zip(nodes) {
            children.push(spawn_logged(cmd, log, &format!("aria2c in {node}"))?);
        }
        Ok(Self {
            children,
            dirs,
            logs,
            name: torrent.name.clone(),
            start_unix,
        })
    }

    /// Waits until every peer's hook has written its stamp; returns each peer's seconds from the
    /// common start. Fails if an `aria2c` exits first, if `seeded` fails, or after `timeout`.
    pub async fn wait_done(&mut self, seeded: &mut Seeded, timeout: Duration) -> Result<Vec<f64>> {
        let deadline = Instant::now() + timeout;
        let mut secs: Vec<Option<f64>> = vec![None; self.children.len()];
        loop {
            for (i, slot) in secs.iter_mut().enumerate().filter(|(_, s)| s.is_none()) {
                let stamp = self.dirs[i].join(format!("{}{DONE_SUFFIX}", self.name));
                if let Ok(text) = std::fs::read_to_string(&stamp) {
                    let t = parse_stamp(&text)
                        .with_context(|| format!("{} holds {text:?}", stamp.display()))?;
                    *slot = Some(t - self.start_unix);
                } else if let Some(status) = self.children[i].try_wait()? {
                    bail!(
                        "aria2c in p{} exited ({status}) before it had the file\n{}",
                        i + 1,
                        util::log_tail(&self.logs[i], "its log")
                    );
                }
            }
            if let Some(all) = secs.iter().copied().collect::<Option<Vec<f64>>>() {
                return Ok(all);
            }
            seeded.check_alive()?;
            if Instant::now() >= deadline {
                let missing: Vec<String> = secs
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.is_none())
                    .map(|(i, _)| format!("p{}", i + 1))
                    .collect();
                let first = secs.iter().position(Option::is_none).unwrap_or(0);
                bail!(
                    "the aria2c peers did not all finish within {timeout:?} (missing: {})\n{}",
                    missing.join(" "),
                    util::log_tail(&self.logs[first], "the first missing one's log")
                );
            }
            tokio::time::sleep(DONE_POLL).await;
        }
    }

    /// CPU seconds so far of every `aria2c` together.
    pub fn cpu_s(&self) -> f64 {
        self.children.iter().map(cpu_of).sum()
    }

    /// Every peer's downloaded file, p1 first.
    pub fn outputs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join(&self.name)).collect()
    }

    /// Kills every `aria2c` (they were seeding).
    pub async fn stop(&mut self) {
        for c in &mut self.children {
            let _ = c.start_kill();
        }
        for c in &mut self.children {
            let _ = c.wait().await;
        }
    }
}

/// The piece size the mesh uses for `len` bytes, as a `.torrent` can hold it (a power of two).
pub fn piece_size(len: u64) -> Result<u32> {
    let size = d7q::task::Geometry::for_length(len)?.piece_size;
    ensure!(
        size.is_power_of_two(),
        "the mesh's piece size {size} is not a power of two, mktorrent cannot make it"
    );
    Ok(size)
}

/// `aria2c`'s options for one client writing into (or, as the seed, reading from) `dir`; only a
/// peer has a `hook`. Everything else is aria2's default (its choking, its 55 peers at most).
fn aria2_args(dir: &Path, torrent: &Path, hook: Option<&Path>) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=false",
        "--enable-peer-exchange=true",
        "--disable-ipv6=true",
        &format!("--listen-port={BT_PORT}"),
        "--max-overall-upload-limit=0",
        "--max-upload-limit=0",
        // Seed for as long as it runs: no ratio, no time.
        "--seed-ratio=0.0",
        "--file-allocation=none",
        "--check-integrity=false",
        "--auto-file-renaming=false",
        "--allow-overwrite=true",
        "--summary-interval=0",
        "--show-console-readout=false",
        "--enable-color=false",
        "--console-log-level=notice",
        // Ends by itself should this benchmark die without killing it.
        &format!("--stop-with-process={}", std::process::id()),
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    let mut dir_arg = OsString::from("--dir=");
    dir_arg.push(dir);
    args.push(dir_arg);
    match hook {
        Some(hook) => {
            let mut a = OsString::from("--on-bt-download-complete=");
            a.push(hook);
            args.push(a);
        }
        // The seed's file is the origin's: whole, so there is nothing to verify first.
        None => args.push("--bt-seed-unverified=true".into()),
    }
    args.push(torrent.into());
    args
}

fn write_hook(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, HOOK_SCRIPT)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The hook's stamp, `SECONDS.NANOS` since the Unix epoch.
fn parse_stamp(text: &str) -> Option<f64> {
    let t: f64 = text.trim().parse().ok()?;
    (t.is_finite() && t > 0.0).then_some(t)
}

/// The scrape request for one torrent: the info hash's bytes, each percent-encoded.
fn scrape_path(info_hash_hex: &str) -> String {
    let mut path = String::from("/scrape?info_hash=");
    for pair in info_hash_hex.as_bytes().chunks(2) {
        path.push('%');
        path.push_str(&String::from_utf8_lossy(pair));
    }
    path
}

/// The seeders a scrape answer counts: `…8:completei<N>e…` (the only torrent asked about; the
/// info hash before it may be mangled by a lossy decode, the counts are ASCII).
fn scrape_complete(body: &str) -> Option<u64> {
    let rest = body.split_once("8:completei")?.1;
    rest.split_once('e')?.0.parse().ok()
}

/// The info hash in `aria2c -S`'s listing, `Info Hash: <40 hex digits>`.
fn info_hash_from_show(text: &str) -> Option<String> {
    let hash = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Info Hash:"))?
        .trim()
        .to_ascii_lowercase();
    (hash.len() == 40 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hash)
}

/// The integer under `key` in bencoded `data` (`<len>:<key>i<N>e`), wherever it is.
fn bencoded_int(data: &[u8], key: &str) -> Option<u64> {
    let needle = format!("{}:{key}i", key.len());
    let at = data
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())?;
    let rest = &data[at + needle.len()..];
    let end = rest.iter().position(|&b| b == b'e')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// Starts `cmd` with stdin closed and stdout and stderr into `log`, killed on drop.
fn spawn_logged(mut cmd: Command, log: &Path, what: &str) -> Result<Child> {
    let file = std::fs::File::create(log)?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {what}"))
}

fn cpu_of(c: &Child) -> f64 {
    c.id()
        .and_then(|pid| CpuTimes::of_pid(pid).ok())
        .map_or(0.0, |t| t.total())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The first executable file called `name` in a directory of `PATH`.
fn program_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_size_is_the_mesh_s() {
        assert_eq!(piece_size(32 << 20).unwrap(), 1 << 20);
        assert_eq!(piece_size(128 << 20).unwrap(), 1 << 20);
        assert_eq!(piece_size(1 << 30).unwrap(), 1 << 20);
        assert_eq!(piece_size((1 << 30) + 1).unwrap(), 2 << 20);
        assert_eq!(piece_size(4 << 30).unwrap(), 4 << 20);
        // mktorrent's -l is the exponent.
        assert_eq!(piece_size(4 << 30).unwrap().trailing_zeros(), 22);
    }

    #[test]
    fn reads_the_hook_s_stamp() {
        assert_eq!(
            parse_stamp("1796348799.715406469\n"),
            Some(1_796_348_799.715_406_5)
        );
        assert_eq!(parse_stamp(""), None);
        assert_eq!(parse_stamp("%s.%N\n"), None);
        assert_eq!(parse_stamp("-1.0"), None);
        assert!(HOOK_SCRIPT.contains(DONE_SUFFIX));
    }

    #[test]
    fn reads_scrape_answers() {
        // opentracker's answer, the 20 hash bytes as a lossy decode leaves them.
        let body = "d5:filesd20:'k\u{fffd}\u{fffd}0SO>\u{fffd}\u{fffd}y)\u{fffd}\
                    d8:completei1e10:downloadedi0e10:incompletei3eeee";
        assert_eq!(scrape_complete(body), Some(1));
        assert_eq!(scrape_complete("d5:filesdee"), None);
        assert_eq!(
            scrape_path("276bfd72a89e30534f3e85adf8d9798629d083ee"),
            "/scrape?info_hash=%27%6b%fd%72%a8%9e%30%53%4f%3e%85%ad%f8%d9%79%86%29%d0%83%ee"
        );
    }

    #[test]
    fn reads_aria2_s_listing() {
        let text = "*** BitTorrent File Information ***\n\
                    Mode: single\n\
                    Announce:\n http://10.77.0.3:6969/announce\n\
                    Info Hash: 276BFD72a89e30534f3e85adf8d9798629d083ee\n\
                    Piece Length: 1.0MiB\n";
        assert_eq!(
            info_hash_from_show(text).as_deref(),
            Some("276bfd72a89e30534f3e85adf8d9798629d083ee")
        );
        assert_eq!(info_hash_from_show("Info Hash: 12ab\n"), None);
        assert_eq!(info_hash_from_show("Mode: single\n"), None);
    }

    #[test]
    fn reads_the_piece_length_of_a_metainfo_file() {
        let meta = b"d8:announce30:http://10.77.0.3:6969/announce4:infod6:lengthi33554432e\
                     4:name8:blob.bin12:piece lengthi1048576e6:pieces0:ee";
        assert_eq!(bencoded_int(meta, "piece length"), Some(1 << 20));
        assert_eq!(bencoded_int(meta, "length"), Some(32 << 20));
        assert_eq!(bencoded_int(meta, "private"), None);
    }

    #[test]
    fn peers_seed_forever_and_only_peers_have_the_hook() {
        let peer = aria2_args(Path::new("/d/p1"), Path::new("/t"), Some(Path::new("/h")));
        let has = |args: &[OsString], a: &str| args.iter().any(|x| x == a);
        assert!(has(&peer, "--seed-ratio=0.0"));
        assert!(has(&peer, "--enable-dht=false"));
        assert!(has(&peer, "--file-allocation=none"));
        assert!(has(&peer, "--on-bt-download-complete=/h"));
        assert!(has(&peer, "--dir=/d/p1"));
        assert!(!has(&peer, "--bt-seed-unverified=true"));
        assert!(!peer
            .iter()
            .any(|x| x.to_string_lossy().starts_with("--seed-time")));
        assert_eq!(peer.last().map(OsString::as_os_str), Some("/t".as_ref()));
        let seed = aria2_args(Path::new("/d/seed"), Path::new("/t"), None);
        assert!(has(&seed, "--bt-seed-unverified=true"));
        assert!(!seed
            .iter()
            .any(|x| x.to_string_lossy().starts_with("--on-bt")));
    }
}
