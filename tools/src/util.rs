//! Helpers every benchmark needs: child processes timed from spawn to exit with the CPU they
//! used, a temp directory that removes itself, incompressible test data, and the summary
//! statistics each table reports (median, min, max).
//!
//! Not for timing anything inside a process: CPU time comes from `/proc` at clock-tick
//! resolution (10 ms), right for whole transfers, useless for microbenchmarks.

use std::fs::{self, File};
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Clock ticks per second in `/proc/<pid>/stat` (USER_HZ: 100 on every Linux architecture we
/// run on, whatever the kernel's HZ).
const USER_HZ: f64 = 100.0;

/// Bytes of test data generated and written, or read and hashed, at a time.
const FILL_CHUNK: usize = 4 << 20;

/// Lines of a log shown with an error.
const LOG_TAIL_LINES: usize = 15;

/// CPU time in seconds, user and system.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct CpuTimes {
    /// User-mode seconds.
    pub user: f64,
    /// Kernel-mode seconds.
    pub sys: f64,
}

impl CpuTimes {
    /// This process, all its threads.
    pub fn of_self() -> Result<Self> {
        let s = proc_stat("self")?;
        Ok(Self::from_ticks(s.utime, s.stime))
    }

    /// The children of this process that have been waited for (and their own waited-for
    /// descendants): read it around one child's wait to get that child's CPU time.
    pub fn of_children() -> Result<Self> {
        let s = proc_stat("self")?;
        Ok(Self::from_ticks(s.cutime, s.cstime))
    }

    /// A running process, all its threads.
    pub fn of_pid(pid: u32) -> Result<Self> {
        let s = proc_stat(&pid.to_string())?;
        Ok(Self::from_ticks(s.utime, s.stime))
    }

    /// User plus system.
    pub fn total(&self) -> f64 {
        self.user + self.sys
    }

    /// CPU used since `earlier`, a reading of the same counter (rounded to the clock tick, so
    /// the difference of two tick counts prints as one).
    pub fn since(&self, earlier: CpuTimes) -> CpuTimes {
        let tick = |s: f64| (s * USER_HZ).round() / USER_HZ;
        CpuTimes {
            user: tick(self.user - earlier.user),
            sys: tick(self.sys - earlier.sys),
        }
    }

    fn from_ticks(user: u64, sys: u64) -> Self {
        Self {
            user: user as f64 / USER_HZ,
            sys: sys as f64 / USER_HZ,
        }
    }
}

/// A child process run to completion by [`run_timed`].
pub struct Finished {
    /// From just before spawn to just after it was reaped.
    pub wall: Duration,
    /// CPU the child used (user and system, all threads).
    pub cpu: CpuTimes,
    /// Exit status and captured stdout and stderr.
    pub output: Output,
}

/// Runs `cmd` to completion (stdin closed, stdout and stderr captured), killing it after
/// `timeout`. Its CPU time is the growth of this process's children counter across the wait, so
/// no other child may be reaped meanwhile: run one timed child at a time.
pub async fn run_timed(cmd: &mut tokio::process::Command, timeout: Duration) -> Result<Finished> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let before = CpuTimes::of_children()?;
    let start = Instant::now();
    let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => out.with_context(|| format!("waiting for {cmd:?}"))?,
        Err(_) => bail!("{cmd:?} did not finish within {timeout:?}"),
    };
    let wall = start.elapsed();
    let cpu = CpuTimes::of_children()?.since(before);
    Ok(Finished { wall, cpu, output })
}

/// Fails with the child's stderr unless it exited successfully.
pub fn check_success(what: &str, output: &Output) -> Result<()> {
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The last lines of a log, for an error message: `what (path), last lines:` and the lines.
pub fn log_tail(path: &Path, what: &str) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    format!("{what} ({}), last lines:\n{tail}", path.display())
}

/// The binary `name` next to the running executable (both live in `target/release`).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating this executable")?;
    let path = me.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} not found; build it (cargo build --release) or pass its path",
            path.display()
        );
    }
    Ok(path)
}

/// A directory that is removed, with everything in it, when dropped.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `parent/PREFIX-PID-NANOS`.
    pub fn new(parent: &Path, prefix: &str) -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = parent.join(format!("{prefix}-{}-{nanos:09}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Writes `len` pseudo-random bytes (xorshift64* from `seed`) to a new file at `path` and returns
/// their SHA-256. Incompressible and fast to make: the hash costs more than the bytes.
pub fn write_random_file(path: &Path, len: u64, seed: u64) -> Result<[u8; 32]> {
    let mut file =
        File::create_new(path).with_context(|| format!("creating {}", path.display()))?;
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    if state == 0 {
        state = 1;
    }
    let mut buf = vec![0u8; FILL_CHUNK];
    let mut hasher = Sha256::new();
    let mut left = len;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        let n = left.min(FILL_CHUNK as u64) as usize;
        file.write_all(&buf[..n])?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    file.sync_all()?;
    Ok(hasher.finalize().into())
}

/// SHA-256 of a file's content.
pub fn sha256_file(path: &Path) -> Result<[u8; 32]> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut BufReader::with_capacity(FILL_CHUNK, file), &mut hasher)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(hasher.finalize().into())
}

/// The one-minute load average, a hint of how busy the machine was: more than its core count
/// means other work competed with the benchmark.
pub fn load_average() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Median and range of a set of measurements.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spread {
    /// The middle value (the mean of the two middle ones for an even count).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => v[n / 2],
            _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    /// Every field multiplied by `k` (unit conversions).
    pub fn scaled(self, k: f64) -> Self {
        Self {
            median: self.median * k,
            min: self.min * k,
            max: self.max * k,
        }
    }
}

/// The fields of `/proc/<pid>/stat` the benchmarks read, in clock ticks.
struct ProcStat {
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

fn proc_stat(pid: &str) -> Result<ProcStat> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat(&text).with_context(|| format!("parsing {path}"))
}

/// Parses a `/proc/<pid>/stat` line. The command name (field 2) is in parentheses and may itself
/// contain spaces and parentheses, so fields are counted after the last `)`.
fn parse_stat(text: &str) -> Result<ProcStat> {
    let rest = text.rsplit_once(')').context("no ')'")?.1;
    // `rest` starts at field 3 (state); utime is field 14, stime 15, cutime 16, cstime 17.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        let s = fields.get(n - 3).context("too few fields")?;
        // cutime and cstime are signed in the kernel's format but never negative.
        Ok(s.parse::<i64>()?.max(0) as u64)
    };
    Ok(ProcStat {
        utime: field(14)?,
        stime: field(15)?,
        cutime: field(16)?,
        cstime: field(17)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let line = "4242 (d7q) get (x)) S 1 2 3 4 5 6 7 8 9 10 150 25 7 3 20 0 4 0 100 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!((s.utime, s.stime, s.cutime, s.cstime), (150, 25, 7, 3));
    }

    #[test]
    fn reads_own_cpu_time() {
        assert!(CpuTimes::of_self().unwrap().total() >= 0.0);
        assert!(CpuTimes::of_children().is_ok());
    }

    #[test]
    fn spread_takes_the_middle() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert_eq!(Spread::of(&[]), None);
    }

    #[test]
    fn random_file_is_sized_seeded_and_not_zeros() {
        let dir = TempDir::new(&std::env::temp_dir(), "d7q-bench-test").unwrap();
        let len = FILL_CHUNK as u64 + 13;
        let a = write_random_file(&dir.path().join("a"), len, 7).unwrap();
        let b = write_random_file(&dir.path().join("b"), len, 7).unwrap();
        let c = write_random_file(&dir.path().join("c"), len, 8).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let bytes = fs::read(dir.path().join("a")).unwrap();
        assert_eq!(bytes.len() as u64, len);
        assert_eq!(<[u8; 32]>::from(Sha256::digest(&bytes)), a);
        assert_eq!(sha256_file(&dir.path().join("a")).unwrap(), a);
        assert!(bytes.iter().filter(|&&b| b == 0).count() < bytes.len() / 100);
    }
}
