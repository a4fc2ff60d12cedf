//! Files only the node's own user may read: the content store, its metadata, the node id, the
//! proxy CA and private keys. Files are created 0600 and directories 0700 whatever the umask,
//! and what an older build left readable is tightened when it is opened again.
//!
//! Why it matters: a blob in the store may be a private layer that the registry would show
//! only to some clients; the proxy CA key signs certificates every local client trusts.
//!
//! Not for: files made for the user (`d7q get -o FILE`, `d7q pull` output), which keep the
//! user's umask.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of every private file.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every private directory.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` and its missing parents 0700, and tightens `dir` itself when it exists with
/// group or other bits. Parents that already exist are left alone: they may be shared
/// (`/var/lib`).
pub fn create_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    tighten(dir)
}

/// Opens a new file for writing, 0600, truncating one that exists (and tightening it: `mode`
/// applies only to files this call creates).
pub fn create_file(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    tighten_open(&f, FILE_MODE)?;
    Ok(f)
}

/// Writes `bytes` to `path` as a private file.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = create_file(path)?;
    f.write_all(bytes)
}

/// Removes group and other bits from `path` (a file or a directory) if it has any. Left alone:
/// a symlink (the store never makes one, and chmod through it would touch its target), what
/// another user owns, and a sticky directory (`--data-dir /tmp` must not lock everyone out of
/// /tmp; what is inside the store is private anyway).
pub fn tighten(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.file_type().is_symlink() || meta.uid() != euid || meta.mode() & 0o1000 != 0 {
        return Ok(());
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode & !0o077))?;
    }
    Ok(())
}

/// [`tighten`] for every entry of `dir` (not recursive) and `dir` itself.
pub fn tighten_dir_entries(dir: &Path) -> io::Result<()> {
    tighten(dir)?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        match tighten(&entry.path()) {
            Ok(()) => {}
            // Removed meanwhile (a concurrent cleanup): nothing to tighten.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sets an open file's mode to `mode` when it has more than that.
pub fn tighten_open(f: &File, mode: u32) -> io::Result<()> {
    let have = f.metadata()?.mode() & 0o7777;
    if have & !mode != 0 {
        f.set_permissions(fs::Permissions::from_mode(have & mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn created_private_whatever_the_umask_and_tightened_when_loose() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        create_dir(&nested).unwrap();
        assert_eq!(mode(&dir.path().join("a")), DIR_MODE);
        assert_eq!(mode(&nested), DIR_MODE);

        let file = nested.join("f");
        fs::write(&file, b"old").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        write_file(&file, b"new").unwrap();
        assert_eq!(mode(&file), FILE_MODE);
        assert_eq!(fs::read(&file).unwrap(), b"new");

        fs::set_permissions(&nested, fs::Permissions::from_mode(0o755)).unwrap();
        create_dir(&nested).unwrap();
        assert_eq!(mode(&nested), DIR_MODE);

        let loose = nested.join("g");
        fs::write(&loose, b"x").unwrap();
        fs::set_permissions(&loose, fs::Permissions::from_mode(0o664)).unwrap();
        fs::set_permissions(&nested, fs::Permissions::from_mode(0o711)).unwrap();
        tighten_dir_entries(&nested).unwrap();
        assert_eq!(mode(&loose), 0o600);
        assert_eq!(mode(&nested), 0o700);
    }
}
