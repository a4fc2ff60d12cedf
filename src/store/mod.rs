//! Files on disk: free-space checks, preallocated data files written at piece offsets in any
//! order, and the rules that keep a half-written file from ever looking like a finished one.
//!
//! Blocking std IO: async callers run these on the blocking pool or a writer thread, so disk
//! writes never hold up network reads.

pub mod gc;
pub mod private;
pub mod tasks;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Head room kept free on a disk beyond what a download needs.
pub const FREE_SPACE_MARGIN: u64 = 64 << 20;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Not enough free space for the content.
    #[error("not enough disk space in {dir}: need {needed} bytes, {available} available")]
    NoSpace {
        /// The directory.
        dir: PathBuf,
        /// Bytes needed (with margin).
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A piece index past the last piece of the task.
    #[error("piece {index} out of range: the task has {count} pieces")]
    PieceOutOfRange {
        /// The index asked for.
        index: u32,
        /// Pieces in the task.
        count: u32,
    },
    /// Piece bytes of the wrong length for their index.
    #[error("piece {index} has {got} bytes, expected {expected}")]
    PieceLength {
        /// The piece.
        index: u32,
        /// Its length in the task's geometry.
        expected: u32,
        /// The length given.
        got: usize,
    },
    /// The piece is not stored (not yet, or dropped after a failed check).
    #[error("piece {index} is not stored")]
    PieceMissing {
        /// The piece.
        index: u32,
    },
    /// A stored piece no longer matches the xxh3 recorded when it was written. It has been
    /// dropped from the bitmap and must be fetched again.
    #[error("{path}: piece {index} is corrupt on disk")]
    PieceCorrupt {
        /// The data file.
        path: PathBuf,
        /// The piece.
        index: u32,
    },
    /// A task was marked complete before all of its pieces were stored.
    #[error("task incomplete: {have} of {count} pieces stored")]
    Incomplete {
        /// Pieces stored.
        have: u32,
        /// Pieces in the task.
        count: u32,
    },
}

impl StoreError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
        move |source| {
            if source.raw_os_error() == Some(libc::ENOSPC) {
                return StoreError::NoSpace {
                    dir: path.to_path_buf(),
                    needed: 0,
                    available: 0,
                };
            }
            StoreError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// Bytes available to an unprivileged writer on the filesystem holding `dir`.
pub fn free_space(dir: &Path) -> Result<u64, StoreError> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| StoreError::Io {
        path: dir.into(),
        source: io::ErrorKind::InvalidInput.into(),
    })?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(StoreError::Io {
            path: dir.into(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Refuses to start when `dir` cannot hold `needed` more bytes plus a margin.
pub fn check_free_space(dir: &Path, needed: u64) -> Result<(), StoreError> {
    let available = free_space(dir)?;
    let want = needed.saturating_add(FREE_SPACE_MARGIN);
    if available < want {
        return Err(StoreError::NoSpace {
            dir: dir.into(),
            needed: want,
            available,
        });
    }
    Ok(())
}

/// A data file written at piece offsets.
#[derive(Debug)]
pub struct DataFile {
    file: File,
    path: PathBuf,
}

impl DataFile {
    /// Creates `path` (which must not exist) with `len` bytes reserved on disk, readable by
    /// this user only: a store file (see [`private`]).
    pub fn create(path: &Path, len: u64) -> Result<Self, StoreError> {
        Self::create_mode(path, len, private::FILE_MODE)
    }

    /// [`DataFile::create`] with `mode` (before the umask).
    fn create_mode(path: &Path, len: u64, mode: u32) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(StoreError::io(path))?;
        let df = Self {
            file,
            path: path.into(),
        };
        df.reserve(len)?;
        Ok(df)
    }

    /// Opens an existing store file, taking away what an older build let others read.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(StoreError::io(path))?;
        private::tighten_open(&file, private::FILE_MODE).map_err(StoreError::io(path))?;
        Ok(Self {
            file,
            path: path.into(),
        })
    }

    /// Reserves `len` bytes so later writes cannot fail for lack of space.
    pub fn reserve(&self, len: u64) -> Result<(), StoreError> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the fd is owned by `self.file` and open for writing.
        let rc = unsafe {
            use std::os::fd::AsRawFd;
            libc::posix_fallocate(self.file.as_raw_fd(), 0, len as libc::off_t)
        };
        match rc {
            0 => Ok(()),
            // Filesystems without fallocate: fall back to a sparse file of the right length.
            libc::EOPNOTSUPP | libc::EINVAL => {
                self.file.set_len(len).map_err(StoreError::io(&self.path))
            }
            e => Err(StoreError::io(&self.path)(io::Error::from_raw_os_error(e))),
        }
    }

    /// Writes `bytes` at `offset`.
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.file
            .write_all_at(bytes, offset)
            .map_err(StoreError::io(&self.path))
    }

    /// Reads `len` bytes at `offset`.
    pub fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(StoreError::io(&self.path))?;
        Ok(buf)
    }

    /// Flushes data to stable storage.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.file.sync_data().map_err(StoreError::io(&self.path))
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A temporary file next to `target` that becomes `target` only by [`TempOutput::commit`];
/// dropped uncommitted, it is removed. This is how a user's FILE is never half-written.
#[derive(Debug)]
pub struct TempOutput {
    data: Option<Arc<DataFile>>,
    tmp: PathBuf,
    target: PathBuf,
}

impl TempOutput {
    /// Checks free space and creates the preallocated temporary file.
    pub fn create(target: &Path, len: u64) -> Result<Self, StoreError> {
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        check_free_space(&dir, len)?;
        let tmp = dir.join(format!(".{name}.d7q-{:016x}.part", rand::random::<u64>()));
        // The user's own file: their umask decides who may read it, as for any download.
        let data = Arc::new(DataFile::create_mode(&tmp, len, 0o666)?);
        Ok(Self {
            data: Some(data),
            tmp,
            target: target.to_path_buf(),
        })
    }

    /// The data file to write pieces into.
    pub fn file(&self) -> &DataFile {
        self.data.as_ref().expect("present until commit")
    }

    /// A shared handle to the data file, for a writer thread.
    pub fn file_handle(&self) -> Arc<DataFile> {
        self.data.clone().expect("present until commit")
    }

    /// fsyncs once and renames into place.
    pub fn commit(mut self) -> Result<(), StoreError> {
        let data = self.data.take().expect("present until commit");
        data.sync()?;
        drop(data);
        fs::rename(&self.tmp, &self.target).map_err(StoreError::io(&self.target))?;
        if let Some(dir) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Make the rename itself durable.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if self.data.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_output_appears_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let out = TempOutput::create(&target, 10).unwrap();
        out.file().write_at(5, b"world").unwrap();
        out.file().write_at(0, b"hello").unwrap();
        assert!(!target.exists());
        out.commit().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"helloworld");

        let target2 = dir.path().join("dropped.bin");
        let out = TempOutput::create(&target2, 10).unwrap();
        drop(out);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "only the committed file remains"
        );
    }

    #[test]
    fn refuses_more_than_the_disk_holds() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_free_space(dir.path(), u64::MAX / 2).unwrap_err();
        assert!(matches!(err, StoreError::NoSpace { .. }), "{err}");
    }
}
