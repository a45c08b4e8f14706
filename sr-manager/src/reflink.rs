//! The `reflink` SR type: an array driver (StorageLink style) that leaves snapshot and clone to the filesystem.
//!
//! An SR is a directory on a filesystem with shared extents (XFS formatted with `reflink=1`, or btrfs):
//!
//! - every VDI, snapshot and clone is a sparse raw file `vdis/<uuid>.raw`, served as a
//!   [`FileDevice`] on the host's io_uring engine (snapshots read-only);
//! - a snapshot is a copy made with the `FICLONE` ioctl: the new file shares every extent of the VDI, so it costs
//!   no data I/O and no space until either side is overwritten (the filesystem copies on write);
//! - a clone is `FICLONE` of a snapshot into a new writable file; revert is `FICLONE` of the snapshot into a
//!   temporary file renamed over the VDI (so the VDI must not be open); resize is `set_len`;
//! - the object model (names, kinds, sizes, which VDI a snapshot was taken of, which snapshot a clone came from)
//!   lives in a small JSON catalogue, `catalog.json`, replaced atomically (temporary file, fsync, rename, fsync
//!   of the directory) after the data files it names exist, so a crash can leave an unlisted file (reported by
//!   `check`) but never a listed object without its file.
//!
//! Reflinked files are independent once made: deleting a snapshot that has clones, or a VDI that has snapshots,
//! just unlinks that file and the filesystem keeps the shared extents alive for the others. There is therefore
//! nothing for Shale to reclaim later (`gc` returns 0) and no hidden snapshots. The catalogue forgets the link
//! (a clone's `parent`, a snapshot's `snapshot_of`) when the other side is destroyed.
//!
//! Data path syscalls go through `FileDevice` (io_uring); the metadata syscalls here (FICLONE, rename, fsync,
//! the catalogue) run on tokio's blocking pool. Mutations are serialised per SR.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use shale_block::file::FileDevice;
use shale_block::uring::IoEngine;
use shale_block::{BlockDevice, BlockError};
use shale_snapshot::{EngineError, MAX_VDI_SIZE};
use uuid::Uuid;

use crate::driver::{
    AttachedSr, Capabilities, CheckReport, SrCreateOptions, SrDriver, SrStats, VdiInfo, VdiKind,
};
use crate::error::{Result, SrError};
use crate::thin::{io_reason, prepare_dir};

/// `FICLONE` = `_IOW(0x94, 9, int)`: make the destination file share all of the source file's extents.
const FICLONE: u64 = 0x4004_9409;

/// The catalogue file inside the SR directory.
const CATALOG: &str = "catalog.json";

/// Format version of the catalogue.
const CATALOG_VERSION: u32 = 1;

/// Directory holding the data files.
const VDIS: &str = "vdis";

/// Make `dst` share all extents of `src` (the whole file, including its length).
fn ficlone(dst: &File, src: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument and touches no user memory; both
    // descriptors are valid for the duration of the call because `dst` and `src` are borrowed open files.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One object in the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    uuid: Uuid,
    name: String,
    kind: VdiKind,
    size: u64,
    #[serde(default)]
    parent: Option<Uuid>,
    #[serde(default)]
    snapshot_of: Option<Uuid>,
    created: u64,
}

/// The SR's catalogue: its identity and every object in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Catalog {
    version: u32,
    uuid: Uuid,
    objects: Vec<Entry>,
}

impl Catalog {
    fn get(&self, id: Uuid) -> Option<&Entry> {
        self.objects.iter().find(|e| e.uuid == id)
    }

    fn by_name(&self, name: &str) -> Option<&Entry> {
        self.objects.iter().find(|e| e.name == name)
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn data_path(dir: &Path, id: Uuid) -> PathBuf {
    dir.join(VDIS).join(format!("{id}.raw"))
}

fn temp_path(dir: &Path, id: Uuid) -> PathBuf {
    dir.join(VDIS).join(format!(".{id}.tmp"))
}

/// fsync a directory so a rename or unlink in it is durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replace the catalogue atomically: write a temporary file, fsync it, rename it over, fsync the directory.
fn write_catalog(dir: &Path, cat: &Catalog) -> io::Result<()> {
    let tmp = dir.join(format!(".{CATALOG}.tmp"));
    let json = serde_json::to_vec_pretty(cat).map_err(io::Error::other)?;
    let mut f = File::create(&tmp)?;
    f.write_all(&json)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(CATALOG))?;
    sync_dir(dir)
}

fn read_catalog(dir: &Path) -> io::Result<Catalog> {
    let path = dir.join(CATALOG);
    let bytes = fs::read(&path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot read reflink SR catalogue {}: {}",
                path.display(),
                io_reason(&e)
            ),
        )
    })?;
    let cat: Catalog = serde_json::from_slice(&bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("reflink SR catalogue {} is corrupt: {e}", path.display()),
        )
    })?;
    if cat.version != CATALOG_VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "reflink SR catalogue {} has version {}, this Shale reads version {CATALOG_VERSION}",
                path.display(),
                cat.version
            ),
        ));
    }
    Ok(cat)
}

/// Make a new data file `final_path` as a reflink copy of `src` (via `tmp`, so a crash never leaves a partial
/// file under a catalogue name). Snapshots get mode 0444 as a hint to people looking at the directory.
fn clone_file(src: &Path, tmp: &Path, final_path: &Path, read_only: bool) -> io::Result<()> {
    let res = (|| {
        let s = File::open(src)?;
        let d = OpenOptions::new().write(true).create_new(true).open(tmp)?;
        ficlone(&d, &s)?;
        if read_only {
            d.set_permissions(fs::Permissions::from_mode(0o444))?;
        }
        d.sync_all()?;
        drop(d);
        fs::rename(tmp, final_path)?;
        sync_dir(final_path.parent().unwrap_or(Path::new(".")))
    })();
    if res.is_err() {
        let _ = fs::remove_file(tmp);
    }
    res
}

/// Why the reflink probe failed: the filesystem refused FICLONE, or the directory could not be written at all.
enum ProbeError {
    NoReflink(io::Error),
    Write(io::Error),
}

/// Check that the filesystem under `dir` can share extents, by cloning a small probe file.
fn probe_reflink(dir: &Path) -> std::result::Result<(), ProbeError> {
    let src_path = dir.join(".reflink-probe-src");
    let dst_path = dir.join(".reflink-probe-dst");
    let res = (|| {
        // FICLONE needs the source open for reading.
        let mut src = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&src_path)
            .map_err(ProbeError::Write)?;
        src.write_all(&[0x5a; 4096]).map_err(ProbeError::Write)?;
        src.sync_all().map_err(ProbeError::Write)?;
        let dst = File::create(&dst_path).map_err(ProbeError::Write)?;
        ficlone(&dst, &src).map_err(ProbeError::NoReflink)
    })();
    let _ = fs::remove_file(&src_path);
    let _ = fs::remove_file(&dst_path);
    res
}

/// Run blocking filesystem work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

/// The `reflink` SR type. One per host; every reflink SR serves its files on the host's io_uring engine.
pub struct ReflinkDriver {
    io: IoEngine,
}

impl ReflinkDriver {
    /// The driver, doing its data I/O through `io`.
    pub fn new(io: IoEngine) -> Self {
        ReflinkDriver { io }
    }
}

#[async_trait]
impl SrDriver for ReflinkDriver {
    fn type_name(&self) -> &'static str {
        "reflink"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            thin: true,
            snapshot: true,
            clone: true,
            revert: true,
            resize_grow: true,
            resize_shrink: true,
            digest: true,
            check: true,
            gc: false,
            offloaded_snapshots: true,
            changed_blocks: false,
        }
    }

    async fn create(
        &self,
        label: &str,
        path: &Path,
        opts: &SrCreateOptions,
    ) -> Result<Arc<dyn AttachedSr>> {
        if opts.cluster_size.is_some() || opts.capacity.is_some() {
            return Err(SrError::InvalidArgument(
                "SR type reflink takes its block size and space from the filesystem; \
                 --cluster-size and --capacity are not supported"
                    .into(),
            ));
        }
        let created_dir = prepare_dir(path)?;
        let dir = path.to_path_buf();
        let probe_dir = dir.clone();
        let probe = tokio::task::spawn_blocking(move || probe_reflink(&probe_dir))
            .await
            .map_err(|e| SrError::Io(io::Error::other(e)))?;
        let cleanup = |path: &Path| {
            if created_dir {
                let _ = fs::remove_dir_all(path);
            } else if let Ok(entries) = fs::read_dir(path) {
                // Leave the user's directory as we found it: empty.
                for entry in entries.flatten() {
                    let _ =
                        fs::remove_dir_all(entry.path()).or_else(|_| fs::remove_file(entry.path()));
                }
            }
        };
        match probe {
            Ok(()) => {}
            Err(ProbeError::NoReflink(e)) => {
                tracing::debug!(path = %path.display(), error = %e, "FICLONE probe failed");
                cleanup(path);
                return Err(SrError::FailedPrecondition(format!(
                    "filesystem at {} does not support reflinks (FICLONE): use XFS with reflink=1 or btrfs",
                    path.display()
                )));
            }
            Err(ProbeError::Write(e)) => {
                cleanup(path);
                return Err(SrError::PathNotWritable(path.to_path_buf(), io_reason(&e)));
            }
        }
        let cat = Catalog {
            version: CATALOG_VERSION,
            uuid: Uuid::new_v4(),
            objects: Vec::new(),
        };
        let (d, c) = (dir.clone(), cat.clone());
        let res = blocking(move || {
            fs::create_dir(d.join(VDIS))?;
            write_catalog(&d, &c)
        })
        .await;
        if let Err(e) = res {
            cleanup(path);
            return Err(SrError::from_block(label, BlockError::Io(e)));
        }
        tracing::info!(sr = label, path = %path.display(), uuid = %cat.uuid, "created reflink SR");
        Ok(Arc::new(ReflinkSr::new(label, dir, self.io.clone(), cat)))
    }

    async fn attach(&self, label: &str, path: &Path) -> Result<Arc<dyn AttachedSr>> {
        let dir = path.to_path_buf();
        let d = dir.clone();
        let cat = blocking(move || read_catalog(&d)).await?;
        Ok(Arc::new(ReflinkSr::new(label, dir, self.io.clone(), cat)))
    }

    async fn destroy(&self, path: &Path) -> Result<()> {
        // The directory was empty when the SR was created, so everything in it belongs to the SR.
        match tokio::fs::remove_dir_all(path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SrError::Io(e)),
        }
    }
}

/// Volumes handed out by [`AttachedSr::open`], so revert, destroy and shrink can refuse while one is in use.
type OpenTable = Arc<Mutex<HashMap<Uuid, Vec<Weak<FileDevice>>>>>;

/// An attached reflink SR: its directory and in-memory copy of the catalogue.
pub struct ReflinkSr {
    label: String,
    dir: PathBuf,
    io: IoEngine,
    /// The catalogue as last written; `None` once detached.
    state: RwLock<Option<Catalog>>,
    /// Serialises mutations (each one reads the catalogue, changes files, then writes the catalogue).
    op: tokio::sync::Mutex<()>,
    open: OpenTable,
}

fn is_open(table: &HashMap<Uuid, Vec<Weak<FileDevice>>>, id: Uuid) -> bool {
    table
        .get(&id)
        .is_some_and(|v| v.iter().any(|w| w.strong_count() > 0))
}

impl ReflinkSr {
    fn new(label: &str, dir: PathBuf, io: IoEngine, cat: Catalog) -> Self {
        ReflinkSr {
            label: label.to_string(),
            dir,
            io,
            state: RwLock::new(Some(cat)),
            op: tokio::sync::Mutex::new(()),
            open: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn catalog(&self) -> Result<Catalog> {
        self.state
            .read()
            .clone()
            .ok_or_else(|| SrError::SrUnavailable(self.label.clone(), "detached".into()))
    }

    fn not_found(&self, what: &str) -> SrError {
        SrError::VdiNotFound(what.to_string(), format!(" in SR '{}'", self.label))
    }

    fn entry(&self, cat: &Catalog, id: Uuid) -> Result<Entry> {
        cat.get(id)
            .cloned()
            .ok_or_else(|| self.not_found(&id.to_string()))
    }

    fn io_err(&self, e: io::Error) -> SrError {
        SrError::from_block(&self.label, BlockError::Io(e))
    }

    fn engine_err(&self, e: EngineError) -> SrError {
        SrError::from_engine(&self.label, e)
    }

    fn check_new_name(&self, cat: &Catalog, name: &str) -> Result<()> {
        if name.is_empty()
            || name.len() > 128
            || name.contains('/')
            || name.chars().any(char::is_control)
        {
            return Err(self.engine_err(EngineError::InvalidName(name.to_string())));
        }
        if cat.by_name(name).is_some() {
            return Err(self.engine_err(EngineError::NameTaken(name.to_string())));
        }
        Ok(())
    }

    fn check_size(&self, size: u64) -> Result<()> {
        let why = if size == 0 {
            "must be greater than zero"
        } else if !size.is_multiple_of(512) {
            "must be a multiple of 512 bytes"
        } else if size > MAX_VDI_SIZE {
            "larger than the 64 PiB maximum"
        } else {
            return Ok(());
        };
        Err(self.engine_err(EngineError::InvalidSize(size, why)))
    }

    fn in_use(&self, e: &Entry) -> SrError {
        SrError::FailedPrecondition(format!(
            "'{}' is open (exported or attached to a VM); close it first",
            e.name
        ))
    }

    /// Persist `cat` and make it the current catalogue.
    async fn commit(&self, cat: Catalog) -> Result<()> {
        let dir = self.dir.clone();
        let c = cat.clone();
        blocking(move || write_catalog(&dir, &c))
            .await
            .map_err(|e| self.io_err(e))?;
        *self.state.write() = Some(cat);
        Ok(())
    }

    /// Add `entry` (whose data file already exists) to the catalogue; on failure remove the file again.
    async fn add(&self, mut cat: Catalog, entry: Entry) -> Result<VdiInfo> {
        let path = data_path(&self.dir, entry.uuid);
        cat.objects.push(entry.clone());
        if let Err(e) = self.commit(cat).await {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        self.info(entry.uuid)
    }

    fn to_info(&self, cat: &Catalog, e: &Entry) -> VdiInfo {
        let allocated_bytes = fs::metadata(data_path(&self.dir, e.uuid))
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
        VdiInfo {
            uuid: e.uuid,
            name: e.name.clone(),
            kind: e.kind,
            size: e.size,
            allocated_bytes,
            parent: e.parent,
            snapshot_of: e.snapshot_of,
            snapshots: cat
                .objects
                .iter()
                .filter(|o| o.snapshot_of == Some(e.uuid))
                .map(|o| o.uuid)
                .collect(),
            clones: cat
                .objects
                .iter()
                .filter(|o| o.parent == Some(e.uuid))
                .map(|o| o.uuid)
                .collect(),
            hidden: false,
            read_only: e.kind == VdiKind::Snapshot,
            created: e.created,
        }
    }

    /// Make a reflink copy of `src` as a new object `entry`.
    async fn clone_into(&self, cat: Catalog, src: Uuid, entry: Entry) -> Result<VdiInfo> {
        let (s, t, f) = (
            data_path(&self.dir, src),
            temp_path(&self.dir, entry.uuid),
            data_path(&self.dir, entry.uuid),
        );
        let ro = entry.kind == VdiKind::Snapshot;
        blocking(move || clone_file(&s, &t, &f, ro))
            .await
            .map_err(|e| self.io_err(e))?;
        self.add(cat, entry).await
    }
}

#[async_trait]
impl AttachedSr for ReflinkSr {
    fn stats(&self) -> SrStats {
        let Ok(cat) = self.catalog() else {
            return SrStats {
                uuid: Uuid::nil(),
                cluster_size: 0,
                capacity: None,
                allocated_bytes: 0,
                free_bytes: None,
                reclaimed_bytes: 0,
                gc_pending: 0,
                vdis: 0,
                snapshots: 0,
                metadata_reads: 0,
                metadata_error: None,
            };
        };
        let objects = self.list();
        let snapshots = objects
            .iter()
            .filter(|o| o.kind == VdiKind::Snapshot)
            .count();
        // Per-file allocation counts extents shared by reflinks once per file, so this is an upper bound.
        let allocated_bytes = objects.iter().map(|o| o.allocated_bytes).sum();
        let (block, free) = statvfs(&self.dir).unwrap_or((4096, None));
        SrStats {
            uuid: cat.uuid,
            cluster_size: block,
            capacity: None,
            allocated_bytes,
            free_bytes: free,
            reclaimed_bytes: 0,
            gc_pending: 0,
            vdis: objects.len() - snapshots,
            snapshots,
            metadata_reads: 0,
            metadata_error: None,
        }
    }

    async fn detach(&self) -> Result<()> {
        // Volumes already open keep their own descriptors and stay usable until dropped; nothing else to close.
        let _g = self.op.lock().await;
        self.state.write().take();
        Ok(())
    }

    fn open_objects(&self) -> Vec<String> {
        let Ok(cat) = self.catalog() else {
            return Vec::new();
        };
        let table = self.open.lock();
        let mut names: Vec<String> = table
            .keys()
            .filter(|id| is_open(&table, **id))
            .filter_map(|id| cat.get(*id).map(|e| e.name.clone()))
            .collect();
        names.sort();
        names
    }

    fn list(&self) -> Vec<VdiInfo> {
        match self.catalog() {
            Ok(cat) => cat.objects.iter().map(|e| self.to_info(&cat, e)).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn lookup(&self, name_or_uuid: &str) -> Result<VdiInfo> {
        let cat = self.catalog()?;
        let found = match Uuid::parse_str(name_or_uuid) {
            Ok(id) => cat.get(id).or_else(|| cat.by_name(name_or_uuid)),
            Err(_) => cat.by_name(name_or_uuid),
        };
        found
            .map(|e| self.to_info(&cat, e))
            .ok_or_else(|| self.not_found(name_or_uuid))
    }

    fn info(&self, id: Uuid) -> Result<VdiInfo> {
        let cat = self.catalog()?;
        let e = self.entry(&cat, id)?;
        Ok(self.to_info(&cat, &e))
    }

    async fn vdi_create(&self, name: &str, size: u64) -> Result<VdiInfo> {
        self.check_size(size)?;
        let _g = self.op.lock().await;
        let cat = self.catalog()?;
        self.check_new_name(&cat, name)?;
        let id = Uuid::new_v4();
        let (t, f) = (temp_path(&self.dir, id), data_path(&self.dir, id));
        blocking(move || {
            let res = (|| {
                let file = OpenOptions::new().write(true).create_new(true).open(&t)?;
                file.set_len(size)?;
                file.sync_all()?;
                fs::rename(&t, &f)?;
                sync_dir(f.parent().unwrap_or(Path::new(".")))
            })();
            if res.is_err() {
                let _ = fs::remove_file(&t);
            }
            res
        })
        .await
        .map_err(|e| self.io_err(e))?;
        tracing::info!(sr = %self.label, vdi = name, %id, size, "created VDI");
        let entry = Entry {
            uuid: id,
            name: name.to_string(),
            kind: VdiKind::Vdi,
            size,
            parent: None,
            snapshot_of: None,
            created: now(),
        };
        self.add(cat, entry).await
    }

    async fn vdi_destroy(&self, id: Uuid) -> Result<()> {
        let _g = self.op.lock().await;
        let mut cat = self.catalog()?;
        let e = self.entry(&cat, id)?;
        if is_open(&self.open.lock(), id) {
            return Err(self.in_use(&e));
        }
        // Reflinked files are independent: clones of a destroyed snapshot (and snapshots of a destroyed VDI) keep
        // their shared extents, so the object is simply forgotten and unlinked.
        cat.objects.retain(|o| o.uuid != id);
        for o in &mut cat.objects {
            if o.parent == Some(id) {
                o.parent = None;
            }
            if o.snapshot_of == Some(id) {
                o.snapshot_of = None;
            }
        }
        self.commit(cat).await?;
        let path = data_path(&self.dir, id);
        let res = blocking(move || match fs::remove_file(&path) {
            Ok(()) => sync_dir(path.parent().unwrap_or(Path::new("."))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        })
        .await;
        if let Err(err) = res {
            // The catalogue no longer lists it; `check` reports the leftover file.
            tracing::warn!(sr = %self.label, %id, error = %err, "could not unlink destroyed object's file");
        }
        tracing::info!(sr = %self.label, name = %e.name, %id, kind = e.kind.as_str(), "destroyed");
        Ok(())
    }

    async fn vdi_resize(&self, id: Uuid, size: u64, allow_shrink: bool) -> Result<VdiInfo> {
        self.check_size(size)?;
        let _g = self.op.lock().await;
        let mut cat = self.catalog()?;
        let e = self.entry(&cat, id)?;
        if e.kind != VdiKind::Vdi {
            return Err(self.engine_err(EngineError::WrongKind(e.name, "a snapshot", "a VDI")));
        }
        if size < e.size {
            if !allow_shrink {
                return Err(self.engine_err(EngineError::ShrinkRefused(e.name, e.size, size)));
            }
            // An open volume could write past the new end and grow the file back.
            if is_open(&self.open.lock(), id) {
                return Err(self.in_use(&e));
            }
        }
        // Growing while open is allowed; volumes already open keep their old size until reopened.
        let path = data_path(&self.dir, id);
        blocking(move || {
            let f = OpenOptions::new().write(true).open(&path)?;
            f.set_len(size)?;
            f.sync_all()
        })
        .await
        .map_err(|err| self.io_err(err))?;
        if let Some(o) = cat.objects.iter_mut().find(|o| o.uuid == id) {
            o.size = size;
        }
        self.commit(cat).await?;
        tracing::info!(sr = %self.label, name = %e.name, from = e.size, to = size, "resized VDI");
        self.info(id)
    }

    async fn vdi_snapshot(&self, id: Uuid, name: &str) -> Result<VdiInfo> {
        let _g = self.op.lock().await;
        let cat = self.catalog()?;
        let src = self.entry(&cat, id)?;
        if src.kind != VdiKind::Vdi {
            return Err(self.engine_err(EngineError::WrongKind(src.name, "a snapshot", "a VDI")));
        }
        self.check_new_name(&cat, name)?;
        let entry = Entry {
            uuid: Uuid::new_v4(),
            name: name.to_string(),
            kind: VdiKind::Snapshot,
            size: src.size,
            parent: None,
            snapshot_of: Some(id),
            created: now(),
        };
        tracing::info!(sr = %self.label, vdi = %src.name, snapshot = name, "snapshot (FICLONE)");
        self.clone_into(cat, id, entry).await
    }

    async fn vdi_clone(&self, snapshot: Uuid, name: &str) -> Result<VdiInfo> {
        let _g = self.op.lock().await;
        let cat = self.catalog()?;
        let src = self.entry(&cat, snapshot)?;
        if src.kind != VdiKind::Snapshot {
            return Err(self.engine_err(EngineError::WrongKind(src.name, "a VDI", "a snapshot")));
        }
        self.check_new_name(&cat, name)?;
        let entry = Entry {
            uuid: Uuid::new_v4(),
            name: name.to_string(),
            kind: VdiKind::Vdi,
            size: src.size,
            parent: Some(snapshot),
            snapshot_of: None,
            created: now(),
        };
        tracing::info!(sr = %self.label, snapshot = %src.name, clone = name, "clone (FICLONE)");
        self.clone_into(cat, snapshot, entry).await
    }

    async fn vdi_revert(&self, id: Uuid, snapshot: Uuid) -> Result<()> {
        let _g = self.op.lock().await;
        let mut cat = self.catalog()?;
        let vdi = self.entry(&cat, id)?;
        let snap = self.entry(&cat, snapshot)?;
        if vdi.kind != VdiKind::Vdi {
            return Err(self.engine_err(EngineError::WrongKind(vdi.name, "a snapshot", "a VDI")));
        }
        if snap.snapshot_of != Some(id) {
            return Err(self.engine_err(EngineError::NotSnapshotOf(snap.name, vdi.name)));
        }
        if is_open(&self.open.lock(), id) {
            return Err(self.in_use(&vdi));
        }
        let (s, t, f) = (
            data_path(&self.dir, snapshot),
            temp_path(&self.dir, id),
            data_path(&self.dir, id),
        );
        let open = self.open.clone();
        blocking(move || {
            let res = (|| {
                let src = File::open(&s)?;
                let dst = OpenOptions::new().write(true).create_new(true).open(&t)?;
                ficlone(&dst, &src)?;
                dst.set_permissions(fs::Permissions::from_mode(0o644))?;
                dst.sync_all()?;
                // Hold the open table across the rename so no volume is opened on the old file meanwhile.
                let table = open.lock();
                if is_open(&table, id) {
                    return Err(io::Error::new(
                        io::ErrorKind::ResourceBusy,
                        "opened during revert",
                    ));
                }
                fs::rename(&t, &f)?;
                drop(table);
                sync_dir(f.parent().unwrap_or(Path::new(".")))
            })();
            if res.is_err() {
                let _ = fs::remove_file(&t);
            }
            res
        })
        .await
        .map_err(|e| {
            if e.kind() == io::ErrorKind::ResourceBusy {
                self.in_use(&vdi)
            } else {
                self.io_err(e)
            }
        })?;
        if let Some(o) = cat.objects.iter_mut().find(|o| o.uuid == id) {
            o.size = snap.size;
        }
        self.commit(cat).await?;
        tracing::info!(sr = %self.label, vdi = %vdi.name, snapshot = %snap.name, "reverted (FICLONE)");
        Ok(())
    }

    fn open(&self, id: Uuid) -> Result<Arc<dyn BlockDevice>> {
        let cat = self.catalog()?;
        let e = self.entry(&cat, id)?;
        let mut table = self.open.lock();
        let dev = FileDevice::open(
            data_path(&self.dir, id),
            e.kind == VdiKind::Snapshot,
            self.io.clone(),
        )
        .map_err(|err| SrError::from_block(&self.label, err))?;
        let dev = Arc::new(dev);
        let list = table.entry(id).or_default();
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&dev));
        Ok(dev)
    }

    async fn digest(&self, id: Uuid) -> Result<String> {
        let cat = self.catalog()?;
        self.entry(&cat, id)?;
        // A private read-only handle: it does not count as "open" for revert, and keeps reading the file it
        // opened even if a revert renames another over it.
        let dev = FileDevice::open(data_path(&self.dir, id), true, self.io.clone())
            .map_err(|err| SrError::from_block(&self.label, err))?;
        shale_snapshot::digest::digest_device(&dev)
            .await
            .map_err(|err| SrError::from_block(&self.label, err))
    }

    async fn check(&self) -> Result<CheckReport> {
        let cat = self.catalog()?;
        let dir = self.dir.clone();
        let problems = blocking(move || Ok(check_catalog(&dir, &cat))).await?;
        let objects = self.catalog()?.objects.len();
        Ok(CheckReport {
            problems,
            mapped_clusters: 0,
            partial_entries: 0,
            free_clusters: 0,
            objects,
        })
    }

    async fn gc(&self) -> Result<u64> {
        // Space is shared and freed by the filesystem itself when files are unlinked.
        self.catalog()?;
        Ok(0)
    }
}

/// Block size and free bytes of the filesystem holding `dir`.
fn statvfs(dir: &Path) -> Option<(u32, Option<u64>)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the right type.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    let block = u32::try_from(st.f_bsize).unwrap_or(4096);
    Some((block, Some(st.f_bavail.saturating_mul(st.f_frsize))))
}

/// Catalogue vs files: every listed object has its file with the listed size, links point at listed objects of
/// the right kind, names and UUIDs are unique, and no unlisted file sits in `vdis/`.
fn check_catalog(dir: &Path, cat: &Catalog) -> Vec<String> {
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for e in &cat.objects {
        if !names.insert(e.name.as_str()) {
            problems.push(format!("name '{}' is used more than once", e.name));
        }
        if !ids.insert(e.uuid) {
            problems.push(format!("UUID {} is listed more than once", e.uuid));
        }
        let path = data_path(dir, e.uuid);
        match fs::metadata(&path) {
            Ok(m) if !m.is_file() => problems.push(format!(
                "'{}': {} is not a regular file",
                e.name,
                path.display()
            )),
            Ok(m) if m.len() != e.size => problems.push(format!(
                "'{}': file {} is {} bytes, the catalogue says {}",
                e.name,
                path.display(),
                m.len(),
                e.size
            )),
            Ok(_) => {}
            Err(err) => problems.push(format!(
                "'{}': data file {}: {}",
                e.name,
                path.display(),
                io_reason(&err)
            )),
        }
        if let Some(p) = e.parent {
            match cat.get(p) {
                Some(pe) if pe.kind == VdiKind::Snapshot => {}
                _ => problems.push(format!("'{}': parent {p} is not a listed snapshot", e.name)),
            }
        }
        if let Some(v) = e.snapshot_of {
            match cat.get(v) {
                Some(ve) if ve.kind == VdiKind::Vdi => {}
                _ => problems.push(format!("'{}': snapshot_of {v} is not a listed VDI", e.name)),
            }
        }
        if e.kind == VdiKind::Snapshot && e.parent.is_some() {
            problems.push(format!("snapshot '{}' has a parent", e.name));
        }
    }
    match fs::read_dir(dir.join(VDIS)) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let fname = entry.file_name();
                let fname = fname.to_string_lossy();
                let listed = fname
                    .strip_suffix(".raw")
                    .and_then(|s| Uuid::parse_str(s).ok())
                    .is_some_and(|id| ids.contains(&id));
                if !listed {
                    problems.push(format!(
                        "{} is not in the catalogue (left over from a crash or added by hand)",
                        entry.path().display()
                    ));
                }
            }
        }
        Err(err) => problems.push(format!(
            "cannot list {}: {}",
            dir.join(VDIS).display(),
            io_reason(&err)
        )),
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_round_trip_and_check() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(VDIS)).unwrap();
        let vdi = Uuid::new_v4();
        let cat = Catalog {
            version: CATALOG_VERSION,
            uuid: Uuid::new_v4(),
            objects: vec![Entry {
                uuid: vdi,
                name: "d".into(),
                kind: VdiKind::Vdi,
                size: 4096,
                parent: None,
                snapshot_of: None,
                created: 1,
            }],
        };
        write_catalog(dir.path(), &cat).unwrap();
        assert_eq!(read_catalog(dir.path()).unwrap(), cat);
        let problems = check_catalog(dir.path(), &cat);
        assert_eq!(problems.len(), 1, "{problems:?}");
        fs::File::create(data_path(dir.path(), vdi))
            .unwrap()
            .set_len(4096)
            .unwrap();
        assert!(check_catalog(dir.path(), &cat).is_empty());
        fs::write(dir.path().join(VDIS).join("stray.raw"), b"").unwrap();
        assert_eq!(check_catalog(dir.path(), &cat).len(), 1);
    }
}
