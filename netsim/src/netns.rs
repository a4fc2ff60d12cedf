//! Network namespaces, for the TUN link and the scenario runner: create and delete them, run
//! `ip` inside them, and run a closure on a thread that has entered one (so a socket or a TUN
//! device can be made there by a process that stays in its own namespace).
//!
//! Not for: shaping or forwarding traffic (that is [`crate::tun`]), nor for anything that needs a
//! process to live in the namespace — start those with `ip netns exec`.
//! Everything here needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::tun::sys;

/// The TUN clone device.
const TUN_DEVICE: &str = "/dev/net/tun";
/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Longest namespace name accepted (a file name, kept short for readable `ip` output).
pub const MAX_NETNS_NAME_LEN: usize = 64;

/// Why a namespace operation failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NetnsError {
    /// A name that `ip netns` would refuse or that could escape its directory.
    #[error("bad namespace name {0:?}")]
    BadName(String),
    /// `ip` could not be run at all.
    #[error("cannot run `ip` (is iproute2 installed?): {0}")]
    Spawn(#[source] std::io::Error),
    /// `ip` ran and failed.
    #[error("`ip {args}` failed: {stderr}")]
    Ip {
        /// The arguments, joined.
        args: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The namespace could not be opened or entered.
    #[error("cannot enter network namespace {name}: {source}")]
    Enter {
        /// The namespace.
        name: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The helper thread died.
    #[error("the thread working in namespace {0} panicked")]
    Thread(String),
}

/// A namespace this process created; dropping it deletes the namespace (and with it every
/// interface inside). Processes still running inside keep it alive until they exit, so stop
/// them first.
#[derive(Debug)]
pub struct OwnedNetns {
    name: String,
}

impl OwnedNetns {
    /// Creates namespace `name` with its loopback up. Fails if it exists.
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        check_name(name)?;
        ip(&["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for OwnedNetns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            tracing::warn!(netns = %self.name, error = %e, "cannot delete namespace");
        }
    }
}

/// True if namespace `name` exists.
pub fn exists(name: &str) -> bool {
    check_name(name).is_ok() && path(name).exists()
}

/// Runs `f` on a new thread that has entered namespace `name`, and returns its result. Sockets
/// and devices `f` creates belong to that namespace for good; the calling thread is untouched.
pub fn run_in<T, F>(name: &str, f: F) -> Result<T, NetnsError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    check_name(name)?;
    let file = File::open(path(name)).map_err(|source| NetnsError::Enter {
        name: name.to_owned(),
        source,
    })?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                sys::enter_netns(&file).map_err(|source| NetnsError::Enter {
                    name: name.to_owned(),
                    source,
                })?;
                Ok(f())
            })
            .join()
            .map_err(|_| NetnsError::Thread(name.to_owned()))?
    })
}

/// Signals a process this program started, by id: `SIGTERM` or `SIGKILL` (no `kill` binary
/// needed — minimal systems lack one).
pub fn signal(pid: u32, kill: bool) -> std::io::Result<()> {
    let pid = i32::try_from(pid).map_err(std::io::Error::other)?;
    sys::kill(pid, if kill { libc::SIGKILL } else { libc::SIGTERM })
}

/// Signals the process group `pgid` (a group this program made with `process_group(0)`).
pub fn signal_group(pgid: u32, kill: bool) -> std::io::Result<()> {
    let pgid = i32::try_from(pgid).map_err(std::io::Error::other)?;
    sys::kill(-pgid, if kill { libc::SIGKILL } else { libc::SIGTERM })
}

/// Kills (SIGKILL) every process inside namespace `name`, then deletes it: for what a crashed run
/// of this program left behind.
pub fn remove_stale(name: &str) -> Result<(), NetnsError> {
    check_name(name)?;
    let pids = ip(&["netns", "pids", name]).unwrap_or_default();
    for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
        let _ = signal(pid, true);
    }
    ip(&["netns", "del", name]).map(drop)
}

/// Runs `ip ARGS`, returning its stdout.
pub fn ip(args: &[&str]) -> Result<String, NetnsError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(NetnsError::Spawn)?;
    if !out.status.success() {
        return Err(NetnsError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when this process can make namespaces and TUN devices: root, a usable `/dev/net/tun`
/// and `ip`. Otherwise says what is missing and how to provide it, for a caller to print.
pub fn privileged() -> Result<(), String> {
    let uid = effective_uid();
    if uid != 0 {
        return Err(format!(
            "not root (effective uid {uid}): run as root, e.g. with sudo"
        ));
    }
    let tun = Path::new(TUN_DEVICE);
    if !std::fs::metadata(tun).is_ok_and(|m| m.file_type().is_char_device()) {
        return Err(format!(
            "no {TUN_DEVICE}: load the module (`modprobe tun`) or make the node \
             (`mkdir -p /dev/net && mknod {TUN_DEVICE} c 10 200`)"
        ));
    }
    // The node can exist while the driver behind it does not (ENODEV on open); opening without
    // attaching an interface has no effect.
    if let Err(e) = OpenOptions::new().read(true).write(true).open(tun) {
        return Err(format!(
            "cannot open {TUN_DEVICE} ({e}): load the module (`modprobe tun`)"
        ));
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Err("no `ip`: install iproute2 (`apt-get install iproute2`)".into());
    }
    Ok(())
}

/// The effective uid, read from /proc so that this module needs no `unsafe` of its own.
fn effective_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

fn check_name(name: &str) -> Result<(), NetnsError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NETNS_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(NetnsError::BadName(name.to_owned()))
    }
}

fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}
