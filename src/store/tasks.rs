//! The content store: one preallocated data file per task plus a small metadata file, so pieces
//! land at their offsets in any order, a restart resumes half-done tasks, and finished content is
//! served until garbage collection ([`super::gc`]) evicts it.
//!
//! Not for: checking pieces against their SHA-256 (callers verify before [`TaskEntry::write_piece`]
//! and the store trusts them), deciding what to evict (the GC planner), or async IO (blocking std
//! calls; async callers use `spawn_blocking` or a writer thread).
//!
//! Layout under `root/tasks/`:
//! - `<task>.data`: the content, preallocated to its full length, pieces at their offsets. Two
//!   complete tasks with the same SHA-256 share one inode (hard link), so identical content is
//!   stored once; unlinking either name leaves the other intact.
//! - `<task>.meta`: JSON (readable with `jq` when debugging a host): url without its query,
//!   geometry, state, whole SHA-256 once complete, each piece's SHA-256 as known, and the xxh3-64
//!   of each stored piece — a piece with an xxh3 *is* the bitmap, so the two cannot disagree.
//! - `*.tmp`: a metadata rewrite or a hard link in flight; removed on open.
//!
//! Durability: pieces go to the page cache with `pwrite`; the metadata is rewritten atomically
//! (tmp + fsync + rename) every [`FLUSH_EVERY_PIECES`] pieces or [`FLUSH_EVERY_BYTES`] bytes, on
//! [`TaskEntry::flush`], and when an entry is dropped. The data file is fsynced once, at
//! [`TaskEntry::complete`], before the metadata says "complete". After a crash the metadata may
//! claim pieces whose bytes never reached the disk, or miss the last batch; the scrub on open
//! compares every stored piece of an unfinished task with its xxh3 and drops the ones that differ,
//! and missing pieces are simply fetched again. Complete tasks were fsynced before they were
//! marked, so the open skips them (unless [`Scrub::All`]) and [`TaskEntry::read_piece`] checks
//! the xxh3 of every piece it returns instead (tens of microseconds per MiB).
//!
//! Locks, outermost first: the store's entry map, an entry's persist lock, an entry's state. No
//! code holds an entry's state while taking another lock. One process owns a root at a time.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::ops::Deref;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use d7q_wire::{Bitmap, Sha256, TaskId};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use xxhash_rust::xxh3::xxh3_64;

use super::{check_free_space, private, DataFile, StoreError};
use crate::task::{format_digest, parse_digest, Geometry};

/// Metadata is rewritten after this many newly stored pieces (or [`FLUSH_EVERY_BYTES`]).
pub const FLUSH_EVERY_PIECES: u32 = 64;
/// Metadata is rewritten after this many newly stored bytes (or [`FLUSH_EVERY_PIECES`]).
pub const FLUSH_EVERY_BYTES: u64 = 256 << 20;
/// Version of the metadata format; a file of another version is dropped on open.
const META_VERSION: u32 = 1;
/// Subdirectory of the store root that holds the task files.
const TASKS_DIR: &str = "tasks";

/// Which tasks the open-time scrub reads back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scrub {
    /// Unfinished tasks only: the ones a crash can have torn. Complete tasks were fsynced
    /// before they were marked complete, and reads check them piece by piece.
    #[default]
    Incomplete,
    /// Every stored piece of every task (reads the whole store).
    All,
}

/// What [`TaskStore::open`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenSummary {
    /// Tasks loaded.
    pub tasks: usize,
    /// Of those, complete.
    pub complete: usize,
    /// Stored pieces whose bytes did not match their xxh3, now to be fetched again.
    pub pieces_dropped: u64,
    /// Files removed: leftover tmp files, unreadable metadata and data files without metadata.
    pub files_removed: usize,
}

/// A snapshot of one entry, for listings and the GC planner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryInfo {
    /// The task.
    pub task: TaskId,
    /// Its URL without query.
    pub url: String,
    /// Its geometry.
    pub geometry: Geometry,
    /// Whether every piece is stored and the whole content was verified.
    pub complete: bool,
    /// Pieces stored.
    pub pieces: u32,
    /// SHA-256 of the whole content, once complete.
    pub sha256: Option<Sha256>,
    /// Bytes the data file occupies on disk.
    pub bytes: u64,
    /// Inode of the data file: entries with the same id share their bytes (hard links), which
    /// are freed only when the last of them goes. `None` when the file could not be examined.
    pub file_id: Option<u64>,
    /// When the task was created.
    pub created: SystemTime,
    /// When the task was last created, got, pinned or unpinned.
    pub last_access: SystemTime,
    /// Whether a download or upload is using it; GC never evicts it.
    pub pinned: bool,
}

/// The content store of one node. Cheap to clone; all clones share the same entries.
#[derive(Clone)]
pub struct TaskStore {
    inner: Arc<Inner>,
    summary: Arc<OpenSummary>,
}

struct Inner {
    dir: PathBuf,
    entries: Mutex<HashMap<TaskId, Arc<TaskEntry>>>,
}

impl TaskStore {
    /// Opens (creating if needed) the store under `root`, loading every task and scrubbing the
    /// unfinished ones.
    pub fn open(root: &Path) -> Result<TaskStore, StoreError> {
        Self::open_with(root, Scrub::Incomplete)
    }

    /// [`TaskStore::open`] with a choice of which tasks to scrub.
    pub fn open_with(root: &Path, scrub: Scrub) -> Result<TaskStore, StoreError> {
        let dir = root.join(TASKS_DIR);
        // Private, and tightened if an older build left the store readable by every local user.
        private::create_dir(root).map_err(StoreError::io(root))?;
        private::create_dir(&dir).map_err(StoreError::io(&dir))?;
        private::tighten_dir_entries(&dir).map_err(StoreError::io(&dir))?;
        let inner = Arc::new(Inner {
            dir: dir.clone(),
            entries: Mutex::new(HashMap::new()),
        });
        let mut summary = OpenSummary::default();

        let mut metas = Vec::new();
        let mut datas = Vec::new();
        for dirent in fs::read_dir(&dir).map_err(StoreError::io(&dir))? {
            let path = dirent.map_err(StoreError::io(&dir))?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("tmp") => summary.files_removed += usize::from(fs::remove_file(&path).is_ok()),
                Some("meta") => metas.push(path),
                Some("data") => datas.push(path),
                _ => {}
            }
        }

        let mut loaded = HashMap::new();
        for meta_path in metas {
            match load_entry(&meta_path, &dir, Arc::downgrade(&inner)) {
                Ok(entry) => {
                    if scrub == Scrub::All || !entry.is_complete() {
                        summary.pieces_dropped += entry.scrub();
                    }
                    if entry.is_complete() {
                        summary.complete += 1;
                    }
                    loaded.insert(entry.task, Arc::new(entry));
                }
                Err(reason) => {
                    warn!(path = %meta_path.display(), reason, "dropping unreadable task metadata");
                    if fs::remove_file(&meta_path).is_ok() {
                        summary.files_removed += 1;
                    }
                    if fs::remove_file(meta_path.with_extension("data")).is_ok() {
                        summary.files_removed += 1;
                    }
                }
            }
        }
        // Data without metadata: a create that crashed before its first metadata write, or a
        // removal that crashed between its two unlinks.
        for data_path in datas {
            let known = task_from_path(&data_path).is_some_and(|t| loaded.contains_key(&t));
            if !known && fs::remove_file(&data_path).is_ok() {
                summary.files_removed += 1;
            }
        }
        summary.tasks = loaded.len();
        *lock(&inner.entries) = loaded;
        info!(
            dir = %dir.display(),
            tasks = summary.tasks,
            complete = summary.complete,
            pieces_dropped = summary.pieces_dropped,
            files_removed = summary.files_removed,
            "content store opened"
        );
        Ok(TaskStore {
            inner,
            summary: Arc::new(summary),
        })
    }

    /// What the open found.
    pub fn open_summary(&self) -> &OpenSummary {
        &self.summary
    }

    /// The directory holding the task files.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Creates the entry for `task`, or returns the existing one so an interrupted download
    /// resumes from its bitmap. An existing entry with another geometry (the content behind the
    /// URL changed) is replaced. A new entry needs free space for its whole length first: a full
    /// disk is [`StoreError::NoSpace`] and leaves no file behind.
    pub fn create(
        &self,
        task: TaskId,
        url: &str,
        g: Geometry,
    ) -> Result<Arc<TaskEntry>, StoreError> {
        // Held across the preallocation so two creates of one task cannot race; fallocate is a
        // metadata operation on the filesystems we run on.
        let mut entries = lock(&self.inner.entries);
        if let Some(existing) = entries.get(&task) {
            if existing.geometry == g {
                existing.touch(SystemTime::now());
                return Ok(existing.clone());
            }
            warn!(%task, old = ?existing.geometry, new = ?g, "geometry changed; replacing the stored task");
            let old = entries.remove(&task).expect("present");
            old.unlink();
        }
        let dir = &self.inner.dir;
        check_free_space(dir, g.length)?;
        let data_path = dir.join(format!("{task}.data"));
        // Not in the map, so nobody owns a file that may be left there.
        let _ = fs::remove_file(&data_path);
        let data = DataFile::create(&data_path, g.length).inspect_err(|_| {
            let _ = fs::remove_file(&data_path);
        })?;
        let now = unix_ms(SystemTime::now());
        let entry = Arc::new(TaskEntry::new(
            task,
            strip_query(url),
            g,
            now,
            now,
            dir,
            data,
            State::new(g.piece_count),
            Arc::downgrade(&self.inner),
        ));
        // The metadata makes the data file a task rather than an orphan.
        if let Err(e) = entry.persist() {
            lock(&entry.state).removed = true;
            let _ = fs::remove_file(&entry.meta_path);
            let _ = fs::remove_file(&data_path);
            return Err(e);
        }
        debug!(%task, length = g.length, pieces = g.piece_count, "task created");
        entries.insert(task, entry.clone());
        Ok(entry)
    }

    /// The entry for `task`, bumping its last access.
    pub fn get(&self, task: TaskId) -> Option<Arc<TaskEntry>> {
        let entry = lock(&self.inner.entries).get(&task).cloned()?;
        entry.touch(SystemTime::now());
        Some(entry)
    }

    /// The entry for `task`, pinned in the same step so GC cannot evict it in between.
    pub fn pin(&self, task: TaskId) -> Option<PinGuard> {
        let entries = lock(&self.inner.entries);
        entries.get(&task).map(TaskEntry::pin)
    }

    /// Removes `task` and its files; returns whether it existed. Holders of the entry keep
    /// reading through their open file until they drop it. A task hard-linked to another keeps
    /// the other's content intact.
    pub fn remove(&self, task: TaskId) -> Result<bool, StoreError> {
        let mut entries = lock(&self.inner.entries);
        let Some(entry) = entries.remove(&task) else {
            return Ok(false);
        };
        entry.unlink_checked()?;
        debug!(%task, "task removed");
        Ok(true)
    }

    /// A snapshot of every entry.
    pub fn list(&self) -> Vec<EntryInfo> {
        let entries: Vec<_> = lock(&self.inner.entries).values().cloned().collect();
        entries.iter().map(|e| e.info()).collect()
    }

    /// Bytes the stored tasks occupy on disk, hard-linked files counted once.
    pub fn usage(&self) -> u64 {
        let mut seen = std::collections::HashSet::new();
        self.list()
            .iter()
            .filter(|e| e.file_id.is_none_or(|id| seen.insert(id)))
            .map(|e| e.bytes)
            .sum()
    }

    /// Rewrites the metadata of every entry with unsaved changes (pieces, digests, last access).
    /// Returns the first error after trying them all.
    pub fn flush(&self) -> Result<(), StoreError> {
        let entries: Vec<_> = lock(&self.inner.entries).values().cloned().collect();
        let mut first = None;
        for e in entries {
            if let Err(err) = e.flush() {
                first.get_or_insert(err);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Removes `task` unless it is pinned. For GC: the pin check and the removal happen under
    /// the entry map's lock, so [`TaskStore::pin`] cannot slip in between.
    pub(super) fn remove_unpinned(&self, task: TaskId) -> Result<Removal, StoreError> {
        let mut entries = lock(&self.inner.entries);
        let Some(entry) = entries.get(&task) else {
            return Ok(Removal::Gone);
        };
        {
            let mut st = lock(&entry.state);
            if st.pins > 0 {
                return Ok(Removal::Pinned);
            }
            st.removed = true;
        }
        let entry = entries.remove(&task).expect("present");
        entry.unlink_checked()?;
        Ok(Removal::Removed)
    }
}

/// Outcome of [`TaskStore::remove_unpinned`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Removal {
    /// Removed with its files.
    Removed,
    /// In use; left alone.
    Pinned,
    /// Not in the store (any more).
    Gone,
}

/// One task's content and metadata. Shared as `Arc<TaskEntry>`; every method takes `&self` and
/// may be called from several threads at once.
pub struct TaskEntry {
    task: TaskId,
    url: String,
    geometry: Geometry,
    created_ms: u64,
    data_path: PathBuf,
    meta_path: PathBuf,
    /// Swapped once if completion replaces the file with a hard link to identical content.
    data: RwLock<Arc<DataFile>>,
    last_access_ms: AtomicU64,
    /// Serializes metadata rewrites so an older snapshot never renames over a newer one.
    persist_lock: Mutex<()>,
    state: Mutex<State>,
    store: Weak<Inner>,
}

struct State {
    /// xxh3-64 of each stored piece; `None` where the piece is not stored.
    pieces: Vec<Option<u64>>,
    stored: u32,
    digests: Vec<Option<Sha256>>,
    sha256: Option<Sha256>,
    complete: bool,
    linked_to: Option<TaskId>,
    /// Changes not yet in the metadata file.
    dirty: bool,
    dirty_pieces: u32,
    dirty_bytes: u64,
    persisted_access_ms: u64,
    pins: usize,
    /// Removed from the store: its files are gone (or going) and must not be rewritten.
    removed: bool,
}

impl State {
    fn new(count: u32) -> Self {
        Self {
            pieces: vec![None; count as usize],
            stored: 0,
            digests: vec![None; count as usize],
            sha256: None,
            complete: false,
            linked_to: None,
            dirty: false,
            dirty_pieces: 0,
            dirty_bytes: 0,
            persisted_access_ms: 0,
            pins: 0,
            removed: false,
        }
    }

    fn drop_piece(&mut self, i: u32) {
        if self.pieces[i as usize].take().is_some() {
            self.stored -= 1;
            self.complete = false;
            self.dirty = true;
        }
    }
}

impl TaskEntry {
    /// The task.
    pub fn task(&self) -> TaskId {
        self.task
    }

    /// Its URL without query.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its piece geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Records piece SHA-256 digests `first..first + digests.len()` as they become known.
    /// Saved with the next metadata rewrite.
    pub fn set_digests(&self, first: u32, digests: &[Sha256]) -> Result<(), StoreError> {
        let count = self.geometry.piece_count;
        let end = first as u64 + digests.len() as u64;
        if end > count as u64 {
            return Err(StoreError::PieceOutOfRange {
                index: end.saturating_sub(1).min(u32::MAX as u64) as u32,
                count,
            });
        }
        let mut st = lock(&self.state);
        let st = &mut *st;
        for (slot, d) in st.digests[first as usize..end as usize]
            .iter_mut()
            .zip(digests)
        {
            if *slot != Some(*d) {
                *slot = Some(*d);
                st.dirty = true;
            }
        }
        Ok(())
    }

    /// The SHA-256 of piece `i`, if known.
    pub fn digest(&self, i: u32) -> Option<Sha256> {
        lock(&self.state).digests.get(i as usize).copied().flatten()
    }

    /// Every piece's SHA-256 as known, indexed by piece.
    pub fn digests(&self) -> Vec<Option<Sha256>> {
        lock(&self.state).digests.clone()
    }

    /// Stores piece `i`, which the caller has verified. Writes at the piece's offset without
    /// holding any lock, so pieces of one task can be written from several threads. Writing a
    /// piece that is already stored does nothing.
    pub fn write_piece(&self, i: u32, bytes: &[u8]) -> Result<(), StoreError> {
        self.check_piece(i, bytes.len())?;
        if self.has(i) {
            return Ok(());
        }
        let sum = xxh3_64(bytes);
        self.data().write_at(self.geometry.offset(i), bytes)?;
        let flush = {
            let mut st = lock(&self.state);
            let slot = &mut st.pieces[i as usize];
            if slot.is_none() {
                *slot = Some(sum);
                st.stored += 1;
                st.dirty = true;
                st.dirty_pieces += 1;
                st.dirty_bytes += bytes.len() as u64;
            }
            st.dirty_pieces >= FLUSH_EVERY_PIECES || st.dirty_bytes >= FLUSH_EVERY_BYTES
        };
        if flush {
            // The piece is stored either way; a failed rewrite stays dirty and is retried with
            // the next batch, and at worst the batch is fetched again after a crash.
            if let Err(e) = self.persist() {
                warn!(task = %self.task, error = %e, "metadata rewrite failed");
            }
        }
        Ok(())
    }

    /// Reads stored piece `i`, checking it against the xxh3 recorded when it was written. A
    /// piece that fails the check is dropped ([`StoreError::PieceCorrupt`]; the task is no
    /// longer complete) so it is fetched again rather than served.
    pub fn read_piece(&self, i: u32) -> Result<Vec<u8>, StoreError> {
        self.check_index(i)?;
        let Some(sum) = lock(&self.state).pieces[i as usize] else {
            return Err(StoreError::PieceMissing { index: i });
        };
        let (off, len) = (self.geometry.offset(i), self.geometry.piece_len(i) as usize);
        let bytes = self.data().read_at(off, len)?;
        if xxh3_64(&bytes) == sum {
            return Ok(bytes);
        }
        // Read once more before condemning it: a rewrite of a dropped piece may have raced us.
        let bytes = self.data().read_at(off, len)?;
        if xxh3_64(&bytes) == sum {
            return Ok(bytes);
        }
        warn!(task = %self.task, piece = i, "stored piece failed its checksum; dropped");
        {
            let mut st = lock(&self.state);
            if st.pieces[i as usize] == Some(sum) {
                st.drop_piece(i);
            }
        }
        if let Err(e) = self.persist() {
            warn!(task = %self.task, error = %e, "metadata rewrite failed");
        }
        Err(StoreError::PieceCorrupt {
            path: self.data_path.clone(),
            index: i,
        })
    }

    /// Whether piece `i` is stored.
    pub fn has(&self, i: u32) -> bool {
        lock(&self.state)
            .pieces
            .get(i as usize)
            .is_some_and(Option::is_some)
    }

    /// The stored pieces.
    pub fn bitmap(&self) -> Bitmap {
        let st = lock(&self.state);
        let mut b = Bitmap::new(self.geometry.piece_count);
        for (i, p) in st.pieces.iter().enumerate() {
            if p.is_some() {
                b.set(i as u32);
            }
        }
        b
    }

    /// Number of pieces stored.
    pub fn stored_pieces(&self) -> u32 {
        lock(&self.state).stored
    }

    /// Marks the task complete with the SHA-256 of its whole content, which the caller has
    /// verified: fsyncs the data once, replaces it with a hard link to an identical complete
    /// task if there is one, and saves the metadata. Fails if a piece is missing.
    pub fn complete(&self, sha256: Sha256) -> Result<(), StoreError> {
        {
            let st = lock(&self.state);
            if st.complete && st.sha256 == Some(sha256) {
                return Ok(());
            }
            if st.stored != self.geometry.piece_count {
                return Err(StoreError::Incomplete {
                    have: st.stored,
                    count: self.geometry.piece_count,
                });
            }
        }
        self.data().sync()?;
        let linked_to = match self.find_twin(&sha256) {
            Some((twin, twin_path)) => self.link_to(twin, &twin_path),
            None => None,
        };
        {
            let mut st = lock(&self.state);
            st.complete = true;
            st.sha256 = Some(sha256);
            if linked_to.is_some() {
                st.linked_to = linked_to;
            }
            st.dirty = true;
        }
        self.persist()?;
        info!(task = %self.task, length = self.geometry.length, linked_to = ?linked_to, "task complete");
        Ok(())
    }

    /// Whether the task is complete.
    pub fn is_complete(&self) -> bool {
        lock(&self.state).complete
    }

    /// SHA-256 of the whole content, once complete.
    pub fn sha256(&self) -> Option<Sha256> {
        let st = lock(&self.state);
        st.sha256.filter(|_| st.complete)
    }

    /// The task whose data file this one's was replaced by (same inode), if any. Informational:
    /// either name can be removed without affecting the other.
    pub fn linked_to(&self) -> Option<TaskId> {
        lock(&self.state).linked_to
    }

    /// Path of the data file. Valid to hard-link or read once [`TaskEntry::is_complete`].
    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    /// Keeps GC away from this entry until the guard is dropped. Prefer [`TaskStore::pin`],
    /// which looks up and pins in one step.
    pub fn pin(self: &Arc<Self>) -> PinGuard {
        lock(&self.state).pins += 1;
        self.touch(SystemTime::now());
        PinGuard {
            entry: self.clone(),
        }
    }

    /// Whether a [`PinGuard`] is alive.
    pub fn is_pinned(&self) -> bool {
        lock(&self.state).pins > 0
    }

    /// Rewrites the metadata now if anything changed since the last rewrite.
    pub fn flush(&self) -> Result<(), StoreError> {
        let needed = {
            let st = lock(&self.state);
            !st.removed
                && (st.dirty
                    || st.persisted_access_ms != self.last_access_ms.load(Ordering::Relaxed))
        };
        if needed {
            self.persist()?;
        }
        Ok(())
    }

    /// A snapshot for listings and GC.
    pub fn info(&self) -> EntryInfo {
        let (complete, pieces, sha256, pinned) = {
            let st = lock(&self.state);
            (
                st.complete,
                st.stored,
                st.sha256.filter(|_| st.complete),
                st.pins > 0,
            )
        };
        let (bytes, file_id) = match fs::metadata(&self.data_path) {
            Ok(m) => (m.blocks() * 512, Some(m.ino())),
            Err(_) => (0, None),
        };
        EntryInfo {
            task: self.task,
            url: self.url.clone(),
            geometry: self.geometry,
            complete,
            pieces,
            sha256,
            bytes,
            file_id,
            created: from_unix_ms(self.created_ms),
            last_access: from_unix_ms(self.last_access_ms.load(Ordering::Relaxed)),
            pinned,
        }
    }

    /// Moves the last access forward to `now` (never back).
    fn touch(&self, now: SystemTime) {
        self.last_access_ms
            .fetch_max(unix_ms(now), Ordering::Relaxed);
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        task: TaskId,
        url: String,
        geometry: Geometry,
        created_ms: u64,
        last_access_ms: u64,
        dir: &Path,
        data: DataFile,
        state: State,
        store: Weak<Inner>,
    ) -> Self {
        Self {
            task,
            url,
            geometry,
            created_ms,
            data_path: dir.join(format!("{task}.data")),
            meta_path: dir.join(format!("{task}.meta")),
            data: RwLock::new(Arc::new(data)),
            last_access_ms: AtomicU64::new(last_access_ms),
            persist_lock: Mutex::new(()),
            state: Mutex::new(state),
            store,
        }
    }

    fn data(&self) -> Arc<DataFile> {
        self.data
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn check_index(&self, i: u32) -> Result<(), StoreError> {
        if i >= self.geometry.piece_count {
            return Err(StoreError::PieceOutOfRange {
                index: i,
                count: self.geometry.piece_count,
            });
        }
        Ok(())
    }

    fn check_piece(&self, i: u32, len: usize) -> Result<(), StoreError> {
        self.check_index(i)?;
        let expected = self.geometry.piece_len(i);
        if len != expected as usize {
            return Err(StoreError::PieceLength {
                index: i,
                expected,
                got: len,
            });
        }
        Ok(())
    }

    /// Reads back every stored piece and drops those whose xxh3 differs. Returns how many.
    fn scrub(&self) -> u64 {
        let stored: Vec<(u32, u64)> = lock(&self.state)
            .pieces
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.map(|s| (i as u32, s)))
            .collect();
        let data = self.data();
        let mut bad = Vec::new();
        for (i, sum) in stored {
            let (off, len) = (self.geometry.offset(i), self.geometry.piece_len(i) as usize);
            if !data.read_at(off, len).is_ok_and(|b| xxh3_64(&b) == sum) {
                bad.push(i);
            }
        }
        if bad.is_empty() {
            return 0;
        }
        warn!(task = %self.task, pieces = ?bad, "scrub dropped stored pieces that failed their checksum");
        {
            let mut st = lock(&self.state);
            for &i in &bad {
                st.drop_piece(i);
            }
        }
        if let Err(e) = self.persist() {
            warn!(task = %self.task, error = %e, "metadata rewrite failed");
        }
        bad.len() as u64
    }

    /// Another complete task with the same content: its id and data path.
    fn find_twin(&self, sha256: &Sha256) -> Option<(TaskId, PathBuf)> {
        let store = self.store.upgrade()?;
        let entries = lock(&store.entries);
        entries.values().find_map(|e| {
            if e.task == self.task || e.geometry.length != self.geometry.length {
                return None;
            }
            let st = lock(&e.state);
            (st.complete && !st.removed && st.sha256 == Some(*sha256))
                .then(|| (e.task, e.data_path.clone()))
        })
    }

    /// Replaces this entry's data file with a hard link to `twin_path` (same directory, so same
    /// filesystem): link to a tmp name, then rename over ours, so the name always holds the
    /// content. Returns the twin on success; on failure keeps our own copy.
    fn link_to(&self, twin: TaskId, twin_path: &Path) -> Option<TaskId> {
        let _p = lock(&self.persist_lock);
        if lock(&self.state).removed {
            return None;
        }
        let same = |a: &Path, b: &Path| match (fs::metadata(a), fs::metadata(b)) {
            (Ok(a), Ok(b)) => Some(a.ino() == b.ino() && a.dev() == b.dev()),
            _ => None,
        };
        match same(twin_path, &self.data_path) {
            Some(true) => return Some(twin),
            Some(false) => {}
            None => return None,
        }
        let tmp = self.data_path.with_extension("link.tmp");
        let _ = fs::remove_file(&tmp);
        let linked = fs::hard_link(twin_path, &tmp)
            .and_then(|()| fs::rename(&tmp, &self.data_path))
            .map_err(StoreError::io(&self.data_path))
            .and_then(|()| DataFile::open(&self.data_path));
        match linked {
            Ok(file) => {
                *self.data.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(file);
                debug!(task = %self.task, %twin, "identical content; data file hard-linked");
                Some(twin)
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                warn!(task = %self.task, %twin, error = %e, "could not link identical content; keeping a copy");
                None
            }
        }
    }

    /// Rewrites the metadata file atomically with the current state.
    fn persist(&self) -> Result<(), StoreError> {
        let _p = lock(&self.persist_lock);
        let meta = {
            let mut st = lock(&self.state);
            if st.removed {
                return Ok(());
            }
            let access = self.last_access_ms.load(Ordering::Relaxed);
            let meta = self.meta(&st, access);
            st.dirty = false;
            st.dirty_pieces = 0;
            st.dirty_bytes = 0;
            st.persisted_access_ms = access;
            meta
        };
        write_meta(&self.meta_path, &meta).inspect_err(|_| {
            lock(&self.state).dirty = true;
        })
    }

    fn meta(&self, st: &State, last_access_ms: u64) -> Meta {
        Meta {
            version: META_VERSION,
            task: self.task.to_string(),
            url: self.url.clone(),
            length: self.geometry.length,
            piece_size: self.geometry.piece_size,
            piece_count: self.geometry.piece_count,
            state: if st.complete {
                MetaState::Complete
            } else {
                MetaState::InProgress
            },
            sha256: st.sha256.as_ref().map(format_digest),
            linked_to: st.linked_to.map(|t| t.to_string()),
            created_ms: self.created_ms,
            last_access_ms,
            pieces: st
                .pieces
                .iter()
                .map(|p| p.map(|s| format!("{s:016x}")))
                .collect(),
            digests: st
                .digests
                .iter()
                .map(|d| d.as_ref().map(format_digest))
                .collect(),
        }
    }

    /// Marks the entry removed and deletes its files, metadata first: a crash in between leaves
    /// only an orphan data file, which the next open removes.
    fn unlink_checked(&self) -> Result<(), StoreError> {
        lock(&self.state).removed = true;
        let _p = lock(&self.persist_lock);
        for path in [&self.meta_path, &self.data_path] {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io(path)(e)),
            }
        }
        Ok(())
    }

    fn unlink(&self) {
        if let Err(e) = self.unlink_checked() {
            warn!(task = %self.task, error = %e, "could not remove task files");
        }
    }
}

impl Drop for TaskEntry {
    fn drop(&mut self) {
        // Best effort: a graceful shutdown keeps the last batch and the last access.
        let _ = self.flush();
    }
}

impl std::fmt::Debug for TaskEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskEntry")
            .field("task", &self.task)
            .field("geometry", &self.geometry)
            .field("stored", &self.stored_pieces())
            .field("complete", &self.is_complete())
            .finish()
    }
}

/// Keeps an entry out of GC's reach while alive; derefs to the entry.
#[derive(Debug)]
pub struct PinGuard {
    entry: Arc<TaskEntry>,
}

impl PinGuard {
    /// The pinned entry.
    pub fn entry(&self) -> &Arc<TaskEntry> {
        &self.entry
    }
}

impl Deref for PinGuard {
    type Target = TaskEntry;

    fn deref(&self) -> &TaskEntry {
        &self.entry
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut st = lock(&self.entry.state);
        st.pins = st.pins.saturating_sub(1);
        drop(st);
        self.entry.touch(SystemTime::now());
    }
}

/// The metadata file. Hex strings rather than numbers so `jq` shows exact values.
#[derive(Serialize, Deserialize)]
struct Meta {
    version: u32,
    task: String,
    url: String,
    length: u64,
    piece_size: u32,
    piece_count: u32,
    state: MetaState,
    /// `sha256:HEX` of the whole content, once complete.
    sha256: Option<String>,
    /// The task whose data file ours was hard-linked to.
    linked_to: Option<String>,
    created_ms: u64,
    last_access_ms: u64,
    /// xxh3-64 (16 hex digits) of each stored piece; `null` where the piece is not stored.
    pieces: Vec<Option<String>>,
    /// `sha256:HEX` of each piece as known; `null` where not yet known.
    digests: Vec<Option<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum MetaState {
    InProgress,
    Complete,
}

/// Loads one task from its metadata file, checking everything a crash or an older version
/// could have got wrong. The error is a reason for the log.
fn load_entry(meta_path: &Path, dir: &Path, store: Weak<Inner>) -> Result<TaskEntry, String> {
    let task = task_from_path(meta_path).ok_or("file name is not a task id")?;
    let bytes = fs::read(meta_path).map_err(|e| e.to_string())?;
    let meta: Meta = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if meta.version != META_VERSION {
        return Err(format!("metadata version {}", meta.version));
    }
    if meta.task != task.to_string() {
        return Err("task id does not match the file name".into());
    }
    let g = Geometry::checked(meta.length, meta.piece_size, meta.piece_count)
        .map_err(|e| e.to_string())?;
    let count = g.piece_count as usize;
    if meta.pieces.len() != count || meta.digests.len() != count {
        return Err("piece lists do not match the geometry".into());
    }
    let mut state = State::new(g.piece_count);
    for (slot, p) in state.pieces.iter_mut().zip(&meta.pieces) {
        if let Some(hex) = p {
            *slot = Some(u64::from_str_radix(hex, 16).map_err(|_| "bad piece checksum")?);
            state.stored += 1;
        }
    }
    for (slot, d) in state.digests.iter_mut().zip(&meta.digests) {
        if let Some(s) = d {
            *slot = Some(parse_digest(s).ok_or("bad piece digest")?);
        }
    }
    state.sha256 = match &meta.sha256 {
        Some(s) => Some(parse_digest(s).ok_or("bad content digest")?),
        None => None,
    };
    state.complete = meta.state == MetaState::Complete;
    if state.complete && (state.sha256.is_none() || state.stored != g.piece_count) {
        return Err("complete without every piece and a content digest".into());
    }
    state.linked_to = meta.linked_to.as_deref().and_then(parse_task);
    state.persisted_access_ms = meta.last_access_ms;

    let data_path = meta_path.with_extension("data");
    let data = DataFile::open(&data_path).map_err(|e| e.to_string())?;
    let len = fs::metadata(&data_path).map_err(|e| e.to_string())?.len();
    if len != g.length {
        return Err(format!("data file has {len} bytes, expected {}", g.length));
    }
    Ok(TaskEntry::new(
        task,
        meta.url,
        g,
        meta.created_ms,
        meta.last_access_ms,
        dir,
        data,
        state,
        store,
    ))
}

/// Writes `meta` next to `path`, fsyncs it and renames it over `path`, then fsyncs the
/// directory: the file is always either the old or the new metadata.
fn write_meta(path: &Path, meta: &Meta) -> Result<(), StoreError> {
    let tmp = path.with_extension("meta.tmp");
    let json = serde_json::to_vec(meta).expect("metadata serializes");
    let written = private::create_file(&tmp)
        .and_then(|mut f| {
            f.write_all(&json)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(StoreError::io(path)(e));
    }
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn task_from_path(path: &Path) -> Option<TaskId> {
    parse_task(path.file_stem()?.to_str()?)
}

fn parse_task(hex: &str) -> Option<TaskId> {
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(TaskId(id))
}

/// The URL as stored: without query (it may carry signed credentials) or fragment.
fn strip_query(url: &str) -> String {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    url[..end].to_string()
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(u64::MAX as u128) as u64)
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Locks a mutex, ignoring poisoning: every critical section leaves its state consistent
/// before anything that could panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
impl TaskEntry {
    /// Sets the last access, for tests of LRU order.
    pub(crate) fn set_last_access(&self, t: SystemTime) {
        self.last_access_ms.store(unix_ms(t), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use sha2::Digest;

    use super::*;

    fn id(n: u8) -> TaskId {
        TaskId([n; 16])
    }

    fn content(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2654435761).to_be_bytes()[0] ^ seed)
            .collect()
    }

    fn sha(bytes: &[u8]) -> Sha256 {
        sha2::Sha256::digest(bytes).into()
    }

    fn piece<'a>(g: &Geometry, bytes: &'a [u8], i: u32) -> &'a [u8] {
        let off = g.offset(i) as usize;
        &bytes[off..off + g.piece_len(i) as usize]
    }

    /// Writes every piece of `bytes` and completes the task.
    fn store_all(e: &TaskEntry, bytes: &[u8]) {
        let g = e.geometry();
        for i in 0..g.piece_count {
            e.write_piece(i, piece(&g, bytes, i)).unwrap();
        }
        e.complete(sha(bytes)).unwrap();
    }

    #[test]
    fn pieces_written_out_of_order_from_threads_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(dir.path()).unwrap();
        let bytes = content(200 * 1000 + 123, 1);
        let g = Geometry::new(bytes.len() as u64, 1000).unwrap();
        let e = store.create(id(1), "https://o/x?token=secret", g).unwrap();
        assert_eq!(e.url(), "https://o/x");
        std::thread::scope(|s| {
            for t in 0..4u32 {
                let (e, bytes) = (&e, &bytes);
                s.spawn(move || {
                    // Each thread walks its share backwards.
                    for i in (0..g.piece_count).rev().filter(|i| i % 4 == t) {
                        e.write_piece(i, piece(&g, bytes, i)).unwrap();
                    }
                });
            }
        });
        assert!(e.bitmap().is_full());
        for i in 0..g.piece_count {
            assert_eq!(e.read_piece(i).unwrap(), piece(&g, &bytes, i), "piece {i}");
        }
        e.complete(sha(&bytes)).unwrap();
        assert_eq!(fs::read(e.data_path()).unwrap(), bytes);

        assert!(matches!(
            e.write_piece(g.piece_count, b"x"),
            Err(StoreError::PieceOutOfRange { .. })
        ));
        assert!(matches!(
            e.write_piece(0, b"short"),
            Err(StoreError::PieceLength { .. })
        ));
    }

    #[test]
    fn reads_and_completion_need_stored_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(dir.path()).unwrap();
        let bytes = content(3000, 2);
        let g = Geometry::new(3000, 1000).unwrap();
        let e = store.create(id(2), "u", g).unwrap();
        e.write_piece(1, piece(&g, &bytes, 1)).unwrap();
        assert!(matches!(
            e.read_piece(0),
            Err(StoreError::PieceMissing { index: 0 })
        ));
        assert!(matches!(
            e.complete(sha(&bytes)),
            Err(StoreError::Incomplete { have: 1, count: 3 })
        ));
        assert!(!e.is_complete());
    }

    #[test]
    fn reopen_keeps_complete_and_partial_tasks_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let whole = content(10_000, 3);
        let part = content(10_000, 4);
        let g = Geometry::new(10_000, 1000).unwrap();
        {
            let store = TaskStore::open(dir.path()).unwrap();
            let a = store.create(id(1), "https://o/a", g).unwrap();
            a.set_digests(0, &[[9; 32], [8; 32]]).unwrap();
            store_all(&a, &whole);
            let b = store.create(id(2), "https://o/b", g).unwrap();
            for i in [7, 2, 5] {
                b.write_piece(i, piece(&g, &part, i)).unwrap();
            }
            b.set_digests(9, &[[7; 32]]).unwrap();
            assert!(b.set_digests(9, &[[7; 32], [7; 32]]).is_err());
            // Fewer pieces than a batch: only the flush (or the drop) saves them.
            store.flush().unwrap();
        }
        let store = TaskStore::open(dir.path()).unwrap();
        let s = store.open_summary();
        assert_eq!((s.tasks, s.complete, s.pieces_dropped), (2, 1, 0));

        let a = store.get(id(1)).unwrap();
        assert!(a.is_complete());
        assert_eq!(a.sha256(), Some(sha(&whole)));
        assert_eq!(a.digest(1), Some([8; 32]));
        assert_eq!(a.digest(2), None);
        assert_eq!(a.read_piece(9).unwrap(), piece(&g, &whole, 9));

        let b = store.get(id(2)).unwrap();
        assert!(!b.is_complete());
        assert_eq!(b.bitmap().iter_ones().collect::<Vec<_>>(), vec![2, 5, 7]);
        assert_eq!(b.digest(9), Some([7; 32]));
        assert_eq!(b.read_piece(5).unwrap(), piece(&g, &part, 5));

        // A restarted download creates the task again and gets the stored pieces back.
        let resumed = store.create(id(2), "https://o/b", g).unwrap();
        assert!(Arc::ptr_eq(&resumed, &b));
        assert_eq!(resumed.stored_pieces(), 3);
        for i in 0..g.piece_count {
            resumed.write_piece(i, piece(&g, &part, i)).unwrap();
        }
        resumed.complete(sha(&part)).unwrap();
        assert_eq!(fs::read(resumed.data_path()).unwrap(), part);

        // Same id, other geometry: the content changed, the old task is replaced.
        let g2 = Geometry::new(5_000, 1000).unwrap();
        let c = store.create(id(2), "https://o/b", g2).unwrap();
        assert_eq!((c.stored_pieces(), c.geometry()), (0, g2));
    }

    #[test]
    fn batches_persist_without_flush() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(dir.path()).unwrap();
        let n = FLUSH_EVERY_PIECES + 3;
        let g = Geometry::new(n as u64 * 100, 100).unwrap();
        let bytes = content(g.length as usize, 5);
        let e = store.create(id(1), "u", g).unwrap();
        for i in 0..n {
            e.write_piece(i, piece(&g, &bytes, i)).unwrap();
        }
        // Read the file as a crash would leave it: the first batch is there, the rest is not.
        let meta: Meta = serde_json::from_slice(&fs::read(&e.meta_path).unwrap()).unwrap();
        let saved = meta.pieces.iter().filter(|p| p.is_some()).count();
        assert_eq!(saved, FLUSH_EVERY_PIECES as usize);
    }

    #[test]
    fn scrub_drops_exactly_the_corrupted_piece() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = content(8_000, 6);
        let g = Geometry::new(8_000, 1000).unwrap();
        let data_path;
        {
            let store = TaskStore::open(dir.path()).unwrap();
            let e = store.create(id(1), "u", g).unwrap();
            for i in 0..6 {
                e.write_piece(i, piece(&g, &bytes, i)).unwrap();
            }
            data_path = e.data_path().to_path_buf();
        }
        // A torn write: one byte of piece 3 never made it.
        let f = fs::OpenOptions::new().write(true).open(&data_path).unwrap();
        f.write_all_at(&[!bytes[3_500]], 3_500).unwrap();
        drop(f);
        fs::write(dir.path().join("tasks/leftover.meta.tmp"), b"x").unwrap();
        fs::write(dir.path().join(format!("tasks/{}.data", id(9))), b"orphan").unwrap();
        fs::write(
            dir.path().join(format!("tasks/{}.meta", id(8))),
            b"{not json",
        )
        .unwrap();

        let store = TaskStore::open(dir.path()).unwrap();
        let s = store.open_summary();
        assert_eq!((s.tasks, s.pieces_dropped, s.files_removed), (1, 1, 3));
        let e = store.get(id(1)).unwrap();
        assert_eq!(
            e.bitmap().iter_ones().collect::<Vec<_>>(),
            vec![0, 1, 2, 4, 5]
        );
        assert_eq!(fs::read_dir(dir.path().join("tasks")).unwrap().count(), 2);
        // The drop was saved: the next open has nothing to drop.
        drop((e, store));
        let store = TaskStore::open(dir.path()).unwrap();
        assert_eq!(store.open_summary().pieces_dropped, 0);
    }

    #[test]
    fn corrupt_complete_piece_is_caught_on_read_and_by_full_scrub() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = content(4_000, 7);
        let g = Geometry::new(4_000, 1000).unwrap();
        let data_path;
        {
            let store = TaskStore::open(dir.path()).unwrap();
            let e = store.create(id(1), "u", g).unwrap();
            store_all(&e, &bytes);
            let e2 = store.create(id(2), "u2", g).unwrap();
            store_all(&e2, &content(4_000, 8));
            data_path = e.data_path().to_path_buf();
        }
        let f = fs::OpenOptions::new().write(true).open(&data_path).unwrap();
        f.write_all_at(&[!bytes[10]], 10).unwrap();
        drop(f);

        // The default open trusts complete tasks; the read catches the damage.
        {
            let store = TaskStore::open(dir.path()).unwrap();
            assert_eq!(store.open_summary().pieces_dropped, 0);
            let e = store.get(id(1)).unwrap();
            assert!(matches!(
                e.read_piece(0),
                Err(StoreError::PieceCorrupt { index: 0, .. })
            ));
            assert!(!e.is_complete() && !e.has(0) && e.has(1));
            assert_eq!(e.read_piece(1).unwrap(), piece(&g, &bytes, 1));
            // Fetched again, it completes again.
            e.write_piece(0, piece(&g, &bytes, 0)).unwrap();
            e.complete(sha(&bytes)).unwrap();
        }
        let f = fs::OpenOptions::new().write(true).open(&data_path).unwrap();
        f.write_all_at(&[!bytes[2_000]], 2_000).unwrap();
        drop(f);
        let store = TaskStore::open_with(dir.path(), Scrub::All).unwrap();
        let s = store.open_summary();
        assert_eq!((s.tasks, s.complete, s.pieces_dropped), (2, 1, 1));
        assert_eq!(
            store
                .get(id(1))
                .unwrap()
                .bitmap()
                .iter_ones()
                .collect::<Vec<_>>(),
            vec![0, 1, 3]
        );
    }

    #[test]
    fn identical_content_is_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(dir.path()).unwrap();
        let bytes = content(5_000, 9);
        let g = Geometry::new(5_000, 1000).unwrap();
        let a = store.create(id(1), "https://mirror-a/x", g).unwrap();
        store_all(&a, &bytes);
        let b = store.create(id(2), "https://mirror-b/x", g).unwrap();
        store_all(&b, &bytes);
        assert_eq!(b.linked_to(), Some(id(1)));

        let (ma, mb) = (
            fs::metadata(a.data_path()).unwrap(),
            fs::metadata(b.data_path()).unwrap(),
        );
        assert_eq!((ma.ino(), ma.nlink()), (mb.ino(), 2));
        let infos = store.list();
        assert_eq!(infos[0].file_id, infos[1].file_id);
        assert_eq!(store.usage(), ma.blocks() * 512);

        assert!(store.remove(id(1)).unwrap());
        assert!(!store.remove(id(1)).unwrap());
        assert!(store.get(id(1)).is_none() && !a.data_path().exists());
        for i in 0..g.piece_count {
            assert_eq!(b.read_piece(i).unwrap(), piece(&g, &bytes, i));
        }
        assert_eq!(fs::metadata(b.data_path()).unwrap().nlink(), 1);
        drop((a, b, store));

        let store = TaskStore::open(dir.path()).unwrap();
        let b = store.get(id(2)).unwrap();
        assert!(b.is_complete());
        assert_eq!(fs::read(b.data_path()).unwrap(), bytes);
    }

    #[test]
    fn a_full_disk_is_refused_before_any_file_exists() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(dir.path()).unwrap();
        let g = Geometry::new(crate::task::MAX_CONTENT_LENGTH, d7q_wire::MAX_PIECE_SIZE).unwrap();
        let err = store.create(id(1), "u", g).unwrap_err();
        assert!(matches!(err, StoreError::NoSpace { .. }), "{err}");
        assert_eq!(fs::read_dir(store.dir()).unwrap().count(), 0);
        assert!(store.list().is_empty());
    }

    #[test]
    fn pins_count_and_removal_spares_holders() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(dir.path()).unwrap();
        let bytes = content(2_000, 10);
        let g = Geometry::new(2_000, 1000).unwrap();
        let e = store.create(id(1), "u", g).unwrap();
        store_all(&e, &bytes);
        let p1 = store.pin(id(1)).unwrap();
        let p2 = e.pin();
        assert!(store.list()[0].pinned);
        assert_eq!(store.remove_unpinned(id(1)).unwrap(), Removal::Pinned);
        drop(p1);
        assert!(e.is_pinned());
        drop(p2);
        assert!(!e.is_pinned());
        assert_eq!(store.remove_unpinned(id(1)).unwrap(), Removal::Removed);
        assert_eq!(store.remove_unpinned(id(1)).unwrap(), Removal::Gone);
        // A holder of the entry still reads through its open file.
        assert_eq!(e.read_piece(1).unwrap(), piece(&g, &bytes, 1));
        drop(e);
        assert_eq!(fs::read_dir(store.dir()).unwrap().count(), 0);
    }
}
