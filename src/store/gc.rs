//! Garbage collection of the content store, in two halves: [`plan`] decides what to evict from a
//! snapshot of the entries and the disk (pure: no IO, no clock), and [`TaskStore::gc`] reads the
//! disk, plans and removes.
//!
//! Rules, in order:
//! 1. An entry not accessed for longer than the TTL goes.
//! 2. When the disk's used space is above the high watermark, entries go least recently used
//!    first — complete ones before unfinished ones — until it is at or below the low watermark.
//! 3. A pinned entry (a download or upload is using it) never goes.
//!
//! Hard-linked duplicates share their bytes: evicting one name frees nothing while another keeps
//! the inode, so rule 2 evicts a group of links as one unit, ordered by its most recent access.
//!
//! Not for: scheduling (the daemon and supernode call [`TaskStore::gc`] on a timer, on the
//! blocking pool) or parsing watermarks from configuration (the config module builds
//! [`Watermark`]s).

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use d7q_wire::TaskId;
use tracing::{info, warn};

use super::tasks::{EntryInfo, Removal, TaskStore};
use super::StoreError;

/// A level of disk use: a share of the disk or an absolute number of bytes used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watermark {
    /// Percent of the disk's total size (values above 100 mean 100).
    Percent(u8),
    /// Bytes used.
    Bytes(u64),
}

impl Watermark {
    /// The watermark in bytes used on a disk of `total` bytes.
    pub fn to_bytes(self, total: u64) -> u64 {
        match self {
            Watermark::Percent(p) => (total as u128 * p.min(100) as u128 / 100) as u64,
            Watermark::Bytes(b) => b,
        }
    }
}

/// Size and free space of the filesystem holding the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// Total bytes.
    pub total: u64,
    /// Bytes available to the store (an unprivileged writer).
    pub free: u64,
}

impl DiskUsage {
    /// Bytes not available: used, plus any reserved for root.
    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.free)
    }
}

/// When GC evicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcConfig {
    /// Above this much used space, eviction starts.
    pub high_watermark: Watermark,
    /// Eviction stops at or below this much used space (a value above the high watermark acts
    /// as the high watermark).
    pub low_watermark: Watermark,
    /// Entries not accessed for longer than this are evicted whatever the disk use;
    /// `Duration::MAX` keeps them.
    pub ttl: Duration,
}

impl Default for GcConfig {
    /// 90 % / 80 % of the disk, one day.
    fn default() -> Self {
        Self {
            high_watermark: Watermark::Percent(90),
            low_watermark: Watermark::Percent(80),
            ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// What one GC pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// The disk as read before the pass; `None` if it could not be read (then only the TTL
    /// applied).
    pub disk: Option<DiskUsage>,
    /// Tasks removed, in eviction order.
    pub evicted: Vec<TaskId>,
    /// Bytes those removals released (shared inodes counted once, when their last name went).
    pub bytes_freed: u64,
    /// Planned tasks left alone because they were pinned by the time of removal.
    pub skipped_pinned: Vec<TaskId>,
    /// Planned tasks whose removal failed (logged).
    pub failed: Vec<TaskId>,
}

/// Decides which entries to evict, in order. Pure: everything it needs is passed in.
pub fn plan(
    entries: &[EntryInfo],
    disk: DiskUsage,
    cfg: &GcConfig,
    now: SystemTime,
) -> Vec<TaskId> {
    let mut acct = Accounting::new(entries, disk);
    let mut out = Vec::new();

    for e in entries.iter().filter(|e| !e.pinned) {
        let idle = now.duration_since(e.last_access).unwrap_or(Duration::ZERO);
        if idle > cfg.ttl {
            acct.evict(e);
            out.push(e.task);
        }
    }

    let high = cfg.high_watermark.to_bytes(disk.total);
    let low = cfg.low_watermark.to_bytes(disk.total).min(high);
    if acct.used <= high {
        return out;
    }
    for group in lru_groups(entries, &acct.evicted) {
        if acct.used <= low {
            break;
        }
        for e in group.members {
            acct.evict(e);
            out.push(e.task);
        }
    }
    out
}

impl TaskStore {
    /// One GC pass against the disk holding the store: reads its usage, plans and removes.
    /// Also saves unsaved metadata first, so last-access times (and with them the LRU order)
    /// survive a restart without a rewrite on every access.
    pub fn gc(&self, cfg: &GcConfig, now: SystemTime) -> GcReport {
        if let Err(e) = self.flush() {
            warn!(error = %e, "could not save task metadata");
        }
        let disk = match disk_usage(self.dir()) {
            Ok(d) => Some(d),
            Err(e) => {
                warn!(error = %e, "cannot read disk usage; applying the TTL only");
                None
            }
        };
        let mut report = self.gc_with(cfg, disk.unwrap_or_default(), now);
        report.disk = disk;
        report
    }

    /// One GC pass against a given usage: for tests, and for a store that keeps to a quota
    /// rather than the whole disk (`total` = quota, `free` = quota − [`TaskStore::usage`]).
    pub fn gc_with(&self, cfg: &GcConfig, disk: DiskUsage, now: SystemTime) -> GcReport {
        let entries = self.list();
        let victims = plan(&entries, disk, cfg, now);
        let mut report = GcReport {
            disk: Some(disk),
            ..GcReport::default()
        };
        if victims.is_empty() {
            return report;
        }
        let mut acct = Accounting::new(&entries, disk);
        let by_task: HashMap<TaskId, &EntryInfo> = entries.iter().map(|e| (e.task, e)).collect();
        for task in victims {
            match self.remove_unpinned(task) {
                Ok(Removal::Removed) => {
                    if let Some(e) = by_task.get(&task) {
                        report.bytes_freed += acct.evict(e);
                    }
                    report.evicted.push(task);
                }
                Ok(Removal::Pinned) => report.skipped_pinned.push(task),
                Ok(Removal::Gone) => {}
                Err(e) => {
                    warn!(%task, error = %e, "GC could not remove a task");
                    report.failed.push(task);
                }
            }
        }
        info!(
            evicted = report.evicted.len(),
            bytes_freed = report.bytes_freed,
            skipped_pinned = report.skipped_pinned.len(),
            failed = report.failed.len(),
            "content store GC"
        );
        report
    }
}

/// Size and free space of the filesystem holding `dir` (statvfs).
pub fn disk_usage(dir: &Path) -> Result<DiskUsage, StoreError> {
    let bad_path = || StoreError::Io {
        path: dir.into(),
        source: std::io::ErrorKind::InvalidInput.into(),
    };
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| bad_path())?;
    // SAFETY: all-zero is a valid `statvfs` (plain integers).
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(StoreError::Io {
            path: dir.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    let frsize = st.f_frsize as u64;
    Ok(DiskUsage {
        total: (st.f_blocks as u64).saturating_mul(frsize),
        free: (st.f_bavail as u64).saturating_mul(frsize),
    })
}

/// Used space as entries go, with hard-linked files released only with their last name.
struct Accounting {
    used: u64,
    /// Names still present per shared inode.
    links: HashMap<u64, usize>,
    evicted: HashSet<TaskId>,
}

impl Accounting {
    fn new(entries: &[EntryInfo], disk: DiskUsage) -> Self {
        let mut links = HashMap::new();
        for id in entries.iter().filter_map(|e| e.file_id) {
            *links.entry(id).or_insert(0) += 1;
        }
        Self {
            used: disk.used(),
            links,
            evicted: HashSet::new(),
        }
    }

    /// Records the eviction of `e`; returns the bytes it releases.
    fn evict(&mut self, e: &EntryInfo) -> u64 {
        if !self.evicted.insert(e.task) {
            return 0;
        }
        let last = match e.file_id.and_then(|id| self.links.get_mut(&id)) {
            Some(n) => {
                *n -= 1;
                *n == 0
            }
            None => true,
        };
        if !last {
            return 0;
        }
        self.used = self.used.saturating_sub(e.bytes);
        e.bytes
    }
}

/// Entries sharing one data file; evicted together.
struct Group<'a> {
    members: Vec<&'a EntryInfo>,
}

/// Groups of unpinned, not yet evicted entries in eviction order: complete before unfinished,
/// then least recently used (by the group's most recent access), then task id for a stable
/// order. A group with any pinned member is left out: evicting the others would free nothing.
fn lru_groups<'a>(entries: &'a [EntryInfo], evicted: &HashSet<TaskId>) -> Vec<Group<'a>> {
    let mut by_file: HashMap<u64, Vec<&'a EntryInfo>> = HashMap::new();
    let mut groups = Vec::new();
    for e in entries.iter().filter(|e| !evicted.contains(&e.task)) {
        match e.file_id {
            Some(id) => by_file.entry(id).or_default().push(e),
            None => groups.push(vec![e]),
        }
    }
    groups.extend(by_file.into_values());
    let mut groups: Vec<_> = groups
        .into_iter()
        .filter(|g| g.iter().all(|e| !e.pinned))
        .map(|mut members| {
            members.sort_by_key(|e| e.task);
            let complete = members.iter().all(|e| e.complete);
            let last = members
                .iter()
                .map(|e| e.last_access)
                .max()
                .expect("non-empty");
            (!complete, last, members[0].task, Group { members })
        })
        .collect();
    groups.sort_by_key(|g| (g.0, g.1, g.2));
    groups.into_iter().map(|g| g.3).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sha2::Digest;

    use super::*;
    use crate::task::Geometry;

    const T0: Duration = Duration::from_secs(1_700_000_000);
    const MB: u64 = 1 << 20;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
    }

    fn id(n: u8) -> TaskId {
        TaskId([n; 16])
    }

    /// A complete, unpinned entry of `mb` MiB on its own inode, last accessed at `at(secs)`.
    fn entry(n: u8, mb: u64, secs: u64) -> EntryInfo {
        EntryInfo {
            task: id(n),
            url: format!("https://o/{n}"),
            geometry: Geometry::new(mb * MB, 1 << 20).unwrap(),
            complete: true,
            pieces: mb as u32,
            sha256: None,
            bytes: mb * MB,
            file_id: Some(1000 + n as u64),
            created: at(0),
            last_access: at(secs),
            pinned: false,
        }
    }

    fn cfg(high: u64, low: u64, ttl: Duration) -> GcConfig {
        GcConfig {
            high_watermark: Watermark::Bytes(high * MB),
            low_watermark: Watermark::Bytes(low * MB),
            ttl,
        }
    }

    fn disk(total: u64, used: u64) -> DiskUsage {
        DiskUsage {
            total: total * MB,
            free: (total - used) * MB,
        }
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn watermarks_in_bytes() {
        assert_eq!(Watermark::Percent(90).to_bytes(1000), 900);
        assert_eq!(Watermark::Percent(250).to_bytes(1000), 1000);
        assert_eq!(Watermark::Percent(50).to_bytes(u64::MAX), u64::MAX / 2);
        assert_eq!(Watermark::Bytes(7).to_bytes(1000), 7);
    }

    #[test]
    fn ttl_evicts_idle_entries_whatever_the_disk() {
        let entries = [entry(1, 10, 0), entry(2, 10, 90_000), entry(3, 10, 100)];
        let now = at(100 + 86_400 + 1);
        let plan = plan(&entries, disk(1000, 30), &cfg(900, 800, DAY), now);
        assert_eq!(plan, vec![id(1), id(3)]);
        // Duration::MAX keeps everything.
        assert!(
            super::plan(&entries, disk(1000, 30), &cfg(900, 800, Duration::MAX), now).is_empty()
        );
    }

    #[test]
    fn below_the_high_watermark_nothing_goes() {
        let entries = [entry(1, 100, 0), entry(2, 100, 1)];
        assert!(plan(&entries, disk(1000, 900), &cfg(900, 500, DAY), at(2)).is_empty());
    }

    #[test]
    fn above_the_high_watermark_lru_goes_until_the_low_one() {
        // 950 used, high 900, low 800: 150 must go; oldest first.
        let entries = [
            entry(1, 100, 30),
            entry(2, 100, 10),
            entry(3, 100, 20),
            entry(4, 100, 40),
        ];
        let plan = plan(&entries, disk(1000, 950), &cfg(900, 800, DAY), at(50));
        assert_eq!(plan, vec![id(2), id(3)]);
    }

    #[test]
    fn unfinished_entries_go_after_complete_ones() {
        let mut old_partial = entry(1, 100, 0);
        old_partial.complete = false;
        let entries = [old_partial, entry(2, 100, 10), entry(3, 100, 20)];
        let plan1 = plan(&entries, disk(1000, 950), &cfg(900, 800, DAY), at(50));
        assert_eq!(plan1, vec![id(2), id(3)]);
        let plan2 = plan(&entries, disk(1000, 950), &cfg(900, 700, DAY), at(50));
        assert_eq!(plan2, vec![id(2), id(3), id(1)]);
    }

    #[test]
    fn pinned_entries_never_go() {
        let mut a = entry(1, 100, 0);
        a.pinned = true;
        let mut b = entry(2, 100, 1);
        b.pinned = true;
        b.complete = false;
        let entries = [a, b, entry(3, 100, 2)];
        // Everything is past its TTL and the disk is full; only the unpinned one goes.
        let plan = plan(
            &entries,
            disk(1000, 1000),
            &cfg(10, 0, DAY),
            at(10 * 86_400),
        );
        assert_eq!(plan, vec![id(3)]);
    }

    #[test]
    fn hard_linked_duplicates_count_once() {
        // 1 and 2 share one inode of 100 MiB (disk used counts it once) and are the oldest.
        let mut a = entry(1, 100, 0);
        let mut b = entry(2, 100, 5);
        a.file_id = Some(7);
        b.file_id = Some(7);
        let entries = [a.clone(), b.clone(), entry(3, 100, 1), entry(4, 100, 30)];
        // 950 used, low 750: 200 must go. The pair frees 100 (not 200), so 3 goes too; the
        // pair is ordered by its most recent access (5), after 3 (1).
        let plan1 = plan(&entries, disk(1000, 950), &cfg(900, 750, DAY), at(50));
        assert_eq!(plan1, vec![id(3), id(1), id(2)]);
        // A pin on one name keeps both: evicting the other would free nothing.
        b.pinned = true;
        let entries = [a, b, entry(3, 100, 1), entry(4, 100, 30)];
        let plan2 = plan(&entries, disk(1000, 950), &cfg(900, 750, DAY), at(50));
        assert_eq!(plan2, vec![id(3), id(4)]);
    }

    #[test]
    fn ttl_evictions_count_toward_the_low_watermark() {
        let entries = [
            entry(1, 200, 0),
            entry(2, 100, 86_400),
            entry(3, 100, 86_401),
        ];
        // 950 used; the TTL takes 200, leaving 750 ≤ low 800.
        let plan = plan(&entries, disk(1000, 950), &cfg(900, 800, DAY), at(86_402));
        assert_eq!(plan, vec![id(1)]);
        // A low watermark above the high one acts as the high one.
        let plan = super::plan(
            &entries,
            disk(1000, 950),
            &cfg(900, 990, Duration::MAX),
            at(86_402),
        );
        assert_eq!(plan, vec![id(1)]);
    }

    fn complete_task(store: &TaskStore, n: u8, seed: u8) -> Arc<crate::store::tasks::TaskEntry> {
        let len = 64 * 1024;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ seed).collect();
        let g = Geometry::new(len as u64, 16 * 1024).unwrap();
        let e = store.create(id(n), "u", g).unwrap();
        for i in 0..g.piece_count {
            let off = g.offset(i) as usize;
            e.write_piece(i, &bytes[off..off + g.piece_len(i) as usize])
                .unwrap();
        }
        e.complete(sha2::Sha256::digest(&bytes).into()).unwrap();
        e
    }

    #[test]
    fn store_gc_evicts_lru_and_respects_pins() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(dir.path()).unwrap();
        let entries: Vec<_> = (1..=4).map(|n| complete_task(&store, n, n)).collect();
        for (k, e) in entries.iter().enumerate() {
            e.set_last_access(at(100 + k as u64));
        }
        let each = store.list()[0].bytes;
        assert!(each >= 64 * 1024);
        // A disk holding only the store, just above the high watermark; two entries must go.
        let used = store.usage();
        let disk = DiskUsage {
            total: used * 2,
            free: used,
        };
        let cfg = GcConfig {
            high_watermark: Watermark::Bytes(used - 1),
            low_watermark: Watermark::Bytes(used - 2 * each),
            ttl: Duration::MAX,
        };
        // The oldest is in use: the next two go instead.
        let pin = store.pin(id(1)).unwrap();
        drop(entries);
        let report = store.gc_with(&cfg, disk, at(200));
        assert_eq!(report.evicted, vec![id(2), id(3)]);
        assert_eq!(report.bytes_freed, 2 * each);
        assert!(store.get(id(2)).is_none() && store.get(id(3)).is_none());
        assert!(pin.is_complete() && store.get(id(4)).is_some());
        let left: HashSet<_> = store.list().iter().map(|e| e.task).collect();
        assert_eq!(left, HashSet::from([id(1), id(4)]));
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 4);

        // The TTL takes the idle one, never the pinned one. (Pinning touched entry 1 with the
        // real clock, so "later" here is a day after now.)
        let ttl = GcConfig {
            ttl: Duration::from_secs(60),
            ..GcConfig::default()
        };
        let later = SystemTime::now() + DAY;
        let report = store.gc_with(&ttl, DiskUsage::default(), later);
        assert_eq!(report.evicted, vec![id(4)]);
        drop(pin);
        let report = store.gc_with(&ttl, DiskUsage::default(), later);
        assert_eq!(report.evicted, vec![id(1)]);
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 0);
    }

    #[test]
    fn store_gc_reads_the_real_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(dir.path()).unwrap();
        complete_task(&store, 1, 1);
        let d = disk_usage(store.dir()).unwrap();
        assert!(d.total > 0 && d.free <= d.total);
        // Generous watermarks: nothing to do.
        let cfg = GcConfig {
            high_watermark: Watermark::Percent(100),
            low_watermark: Watermark::Percent(100),
            ttl: Duration::MAX,
        };
        let report = store.gc(&cfg, SystemTime::now());
        assert!(report.disk.is_some() && report.evicted.is_empty());
    }
}
