//! The only `unsafe` of netsim: opening a TUN device, entering a network namespace, reading
//! and writing packets on a raw descriptor, and sending signals. Each call is a thin, checked wrapper over one
//! syscall; everything above works with [`OwnedFd`]s and `io::Result`s.
//!
//! Not for: deciding anything — names, addresses and routes are set with `ip` by the caller.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

/// Longest interface name the kernel accepts (IFNAMSIZ less the terminating NUL).
pub const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Opens `/dev/net/tun` and attaches a new layer-3 TUN device named `name` (no packet-info
/// header: each read is one IP packet), nonblocking and close-on-exec. The device lives in the
/// calling thread's network namespace and disappears when the descriptor is closed.
pub fn open_tun(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() > MAX_IFNAME_LEN || name.bytes().any(|b| b == 0 || b == b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
    let raw = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just returned by a successful open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data (arrays, integers, a union of those); all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is, and `fd` is open.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETIFF,
            &mut req as *mut libc::ifreq,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Moves the calling thread into the network namespace `ns` is open on (a file under
/// `/run/netns`). Only this thread changes; call it on a thread made for the purpose.
pub fn enter_netns(ns: &File) -> io::Result<()> {
    // SAFETY: `ns` is an open descriptor; setns only reads it.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Hands a nonblocking descriptor to tokio's reactor.
pub fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` is moved into the `AsyncFd`, which owns it from here on; nothing
    // else holds this descriptor, so it cannot be closed or replaced while registered.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// `kill(2)`: sends `signal` to process `pid`, or to process group `-pid` when `pid` is negative.
pub fn kill(pid: i32, signal: libc::c_int) -> io::Result<()> {
    if pid == 0 || pid == -1 {
        // 0 and -1 mean "my group" and "everyone": never wanted here.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "refusing pid 0 or -1",
        ));
    }
    // SAFETY: kill has no memory-safety preconditions; the pid was checked above.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One `read(2)`: one whole packet from a TUN descriptor.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` writable bytes for the duration of the call.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One `write(2)`: one whole packet into a TUN descriptor (the kernel receives it).
pub fn write(fd: BorrowedFd<'_>, packet: &[u8]) -> io::Result<usize> {
    // SAFETY: `packet` is valid for `packet.len()` readable bytes for the duration of the call.
    let n = unsafe { libc::write(fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
