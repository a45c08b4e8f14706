//! Metadata headroom: new data clusters stop while the SR's filesystem still has room for the metadata store.
//!
//! **Why.** The data file and RocksDB share the SR's filesystem. Data writes that fill it must fail first, with
//! ENOSPC on that write alone, because a metadata write that fails is far worse: the engine runs RocksDB with
//! manual WAL flushes (see `engine::db_options`), and RocksDB treats a failed WAL append there as a fatal
//! background error. The SR then accepts no change at all until it is attached again, and what was written
//! since the last flush is dropped as a crash would drop it. So a new cluster that needs new filesystem blocks is
//! admitted only while the filesystem keeps [`SpaceGuard::headroom`] bytes free after it: room for RocksDB to
//! roll its WAL and flush the memtable that retires the old one ([`BASE_HEADROOM`]), and to compact (a
//! compaction writes its output before deleting its inputs, so the SST files' size again). Clusters the data
//! file already holds (preallocated, or written and rewritten in place) need no new blocks and are not checked.
//!
//! The cost on a big SR is a fraction of a percent of the filesystem; like ext4's root reservation or ZFS's slop
//! space, it is what keeps a full filesystem a recoverable event. On the 128 MiB filesystem of the
//! `thin_sr_on_a_full_filesystem` test it is a third.
//!
//! **What it cannot prevent.** Another writer on the same filesystem can still take the last blocks. Then a
//! RocksDB write fails with ENOSPC, the engine reports `EngineError::MetadataNoSpace`, and once space is freed
//! the SR is attached again (`shale sr detach` and `shale sr attach`, or a daemon restart); every flushed write
//! is still there.
//!
//! **Cost on the data path.** Free space comes from `fstatvfs` on the data file, cached for [`REFRESH`] while
//! more than [`SLACK`] bytes stay above the headroom; each admitted cluster is subtracted from the cached figure.
//! A nearly full filesystem is asked on every new cluster: one system call per 64 KiB cluster allocated.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::warn;

/// Headroom kept for RocksDB besides its SST files: its next WAL file, preallocated 16 MiB at a time
/// (`max_total_wal_size`), the SST of the memtable flush that lets the old WAL go (at most about as large as that
/// WAL), and the MANIFEST, OPTIONS and info LOG files.
pub const BASE_HEADROOM: u64 = 40 << 20;
/// How long a free-space figure is trusted while it is far from the headroom.
pub const REFRESH: Duration = Duration::from_secs(1);
/// Above the headroom by more than this, a cached free-space figure admits clusters without a system call.
pub const SLACK: u64 = 256 << 20;

/// Where free space is read from: [`free_bytes`] of the data file, or a figure a unit test sets.
type FreeSpace = Box<dyn Fn() -> std::io::Result<u64> + Send + Sync>;

/// Free space on the data file's filesystem, less the headroom.
pub struct SpaceGuard {
    free: FreeSpace,
    state: Mutex<Budget>,
}

struct Budget {
    /// Free bytes above the headroom at `at`, less what was admitted since.
    room: i64,
    /// When `room` was measured; `None` before the first measurement.
    at: Option<Instant>,
    /// The headroom used for `room`.
    headroom: u64,
}

impl SpaceGuard {
    /// A guard for the filesystem holding `data` (the SR's data file).
    pub fn new(data: Arc<File>) -> Self {
        Self::with_source(Box::new(move || free_bytes(&data)))
    }

    fn with_source(free: FreeSpace) -> Self {
        SpaceGuard {
            free,
            state: Mutex::new(Budget {
                room: 0,
                at: None,
                headroom: BASE_HEADROOM,
            }),
        }
    }

    /// Take `bytes` of new filesystem blocks if the filesystem keeps its headroom after them. `sst_bytes` gives
    /// the metadata store's SST size; it is asked only when free space is measured again.
    pub fn admit(&self, bytes: u64, sst_bytes: impl FnOnce() -> u64) -> bool {
        let mut st = self.state.lock();
        let want = i64::try_from(bytes).unwrap_or(i64::MAX);
        if !st.fresh() || st.room - want < SLACK as i64 {
            st.measure((self.free)(), sst_bytes);
        }
        if st.room >= want {
            st.room -= want;
            true
        } else {
            false
        }
    }

    /// Take up to `bytes` of new filesystem blocks, as many as the headroom allows; returns how many. For
    /// growing the data file ahead of the allocator, which is worth doing only with room to spare.
    pub fn take_up_to(&self, bytes: u64, sst_bytes: impl FnOnce() -> u64) -> u64 {
        let mut st = self.state.lock();
        if !st.fresh() {
            st.measure((self.free)(), sst_bytes);
        }
        let grant = (st.room.max(0) as u64).min(bytes);
        st.room -= grant as i64;
        grant
    }

    /// The headroom last used: [`BASE_HEADROOM`] plus the SST files' size.
    pub fn headroom(&self) -> u64 {
        self.state.lock().headroom
    }
}

impl Budget {
    fn fresh(&self) -> bool {
        self.at.is_some_and(|t| t.elapsed() < REFRESH)
    }

    fn measure(&mut self, free: std::io::Result<u64>, sst_bytes: impl FnOnce() -> u64) {
        self.headroom = BASE_HEADROOM.saturating_add(sst_bytes());
        match free {
            Ok(free) => {
                self.room = i64::try_from(free)
                    .unwrap_or(i64::MAX)
                    .saturating_sub(i64::try_from(self.headroom).unwrap_or(i64::MAX));
            }
            // Without a figure, admit: the write itself then reports ENOSPC as it did before this guard.
            Err(e) => {
                warn!(error = %e, "fstatvfs on the SR's data file failed; not enforcing metadata headroom");
                self.room = i64::MAX / 2;
            }
        }
        self.at = Some(Instant::now());
    }
}

/// Bytes an unprivileged process may still allocate on `file`'s filesystem (`f_bavail`): the daemon usually
/// runs as root, so the filesystem's root reservation is extra headroom on top of ours.
pub fn free_bytes(file: &File) -> std::io::Result<u64> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `file` keeps the descriptor open for the call; fstatvfs writes at most one `statvfs` into `st`,
    // which is that large.
    let rc = unsafe { libc::fstatvfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fstatvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    const MIB: u64 = 1 << 20;
    const CS: u64 = 64 << 10;

    /// A guard reading free space from a figure the test sets, as a filesystem would report it.
    fn guard(free: u64) -> (Arc<AtomicU64>, SpaceGuard) {
        let fs = Arc::new(AtomicU64::new(free));
        let src = fs.clone();
        let g = SpaceGuard::with_source(Box::new(move || Ok(src.load(Ordering::SeqCst))));
        (fs, g)
    }

    #[test]
    fn free_bytes_reads_the_real_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(File::create(dir.path().join("data")).unwrap());
        let free = free_bytes(&f).unwrap();
        assert!(free > 0);
        // A headroom larger than any filesystem admits nothing; the base headroom alone admits a cluster where
        // the test's filesystem has room.
        assert!(!SpaceGuard::new(f.clone()).admit(CS, || u64::MAX / 4));
        if free > BASE_HEADROOM + SLACK {
            assert!(SpaceGuard::new(f).admit(CS, || 0));
        }
    }

    #[test]
    fn admits_until_the_headroom_and_no_further() {
        let (fs, g) = guard(BASE_HEADROOM + 3 * MIB + 10 * CS);
        let sst = 3 * MIB;
        let mut n = 0;
        while g.admit(CS, || sst) {
            n += 1;
            // What an admitted cluster takes, the filesystem reports gone.
            fs.fetch_sub(CS, Ordering::SeqCst);
            assert!(n <= 10, "admitted past the headroom");
        }
        assert_eq!(n, 10);
        assert_eq!(g.headroom(), BASE_HEADROOM + sst);
        assert_eq!(g.take_up_to(CS, || sst), 0);
        // Space freed elsewhere (GC punching clusters) is seen at once near the headroom.
        fs.fetch_add(2 * CS, Ordering::SeqCst);
        for _ in 0..2 {
            assert!(g.admit(CS, || sst));
            fs.fetch_sub(CS, Ordering::SeqCst);
        }
        assert!(!g.admit(CS, || sst));
    }

    #[test]
    fn far_from_the_headroom_the_cached_figure_serves() {
        let (fs, g) = guard(BASE_HEADROOM + 10 * SLACK);
        assert!(g.admit(CS, || 0));
        // The filesystem fills behind the guard's back: within REFRESH, and while the cached room stays above
        // SLACK, clusters are admitted from the cache without measuring.
        fs.store(0, Ordering::SeqCst);
        assert!(g.admit(CS, || 0));
        // Once the cache would drop under SLACK it measures again and refuses.
        assert!(!g.admit(9 * SLACK + SLACK / 2, || 0));
        assert!(!g.admit(CS, || 0));
    }

    #[test]
    fn take_up_to_grants_what_is_left() {
        let (_fs, g) = guard(BASE_HEADROOM + MIB);
        assert_eq!(g.take_up_to(64 * MIB, || 0), MIB);
        assert_eq!(g.take_up_to(64 * MIB, || 0), 0);
        let (_fs, g) = guard(BASE_HEADROOM / 2);
        assert_eq!(g.take_up_to(64 * MIB, || 0), 0);
        assert!(!g.admit(CS, || 0));
    }

    #[test]
    fn a_failed_measurement_admits() {
        let g = SpaceGuard::with_source(Box::new(|| Err(std::io::Error::other("no statvfs"))));
        assert!(g.admit(CS, || 0));
    }
}
