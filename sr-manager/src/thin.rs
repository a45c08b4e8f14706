//! The `thin` SR type: Shale's native copy-on-write engine ([`shale_snapshot::Engine`]) in a directory.
//!
//! The driver is a thin translation layer: it checks the SR path before handing it to the engine (so "path not
//! writable" is reported as such, not as an engine I/O error), maps engine records to the driver-neutral
//! [`VdiInfo`], and names the SR in the errors users see most (SR full, name taken). Engine calls that touch
//! RocksDB synchronously and may take a while (create, open, check) run on the blocking pool so they never stall
//! the daemon's async workers.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::RwLock;
use shale_block::uring::IoEngine;
use shale_block::BlockDevice;
use shale_snapshot::{Engine, ObjectInfo, ObjectKind, SrConfig};
use uuid::Uuid;

use crate::driver::{
    AttachedSr, Capabilities, CheckReport, SrCreateOptions, SrDriver, SrStats, VdiInfo, VdiKind,
};
use crate::error::{Result, SrError};

/// Default allocation unit of a thin SR.
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 * 1024;

/// The `thin` SR type. One per host; every thin SR shares the host's io_uring engine.
pub struct ThinDriver {
    io: IoEngine,
}

impl ThinDriver {
    /// The driver, doing its data I/O through `io`.
    pub fn new(io: IoEngine) -> Self {
        ThinDriver { io }
    }
}

/// Make sure `path` is (or can become) an empty, writable directory; returns whether we created it.
pub(crate) fn prepare_dir(path: &Path) -> Result<bool> {
    let not_writable =
        |e: std::io::Error| SrError::PathNotWritable(path.to_path_buf(), io_reason(&e));
    let existed = match fs::metadata(path) {
        Ok(m) if m.is_dir() => true,
        Ok(_) => {
            return Err(SrError::PathNotWritable(
                path.to_path_buf(),
                "it exists and is not a directory".into(),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(not_writable(e)),
    };
    if existed {
        let mut entries = fs::read_dir(path).map_err(not_writable)?;
        if entries.next().is_some() {
            return Err(SrError::InvalidArgument(format!(
                "path {} is not empty; an SR needs an empty or new directory",
                path.display()
            )));
        }
    } else {
        fs::create_dir_all(path).map_err(not_writable)?;
    }
    // Root passes permission checks, so probe for real (read-only mounts, full filesystems, odd mounts).
    let probe = path.join(".shale-probe");
    let res = fs::write(&probe, b"probe").and_then(|_| fs::remove_file(&probe));
    if let Err(e) = res {
        if !existed {
            let _ = fs::remove_dir_all(path);
        }
        return Err(not_writable(e));
    }
    Ok(!existed)
}

/// A short reason for an I/O error, without the "(os error N)" suffix.
pub(crate) fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[async_trait]
impl SrDriver for ThinDriver {
    fn type_name(&self) -> &'static str {
        "thin"
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
            gc: true,
            offloaded_snapshots: false,
            changed_blocks: true,
        }
    }

    async fn create(
        &self,
        label: &str,
        path: &Path,
        opts: &SrCreateOptions,
    ) -> Result<Arc<dyn AttachedSr>> {
        let created_dir = prepare_dir(path)?;
        let cfg = SrConfig {
            cluster_size: opts.cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE),
            capacity: opts.capacity,
        };
        let io = self.io.clone();
        let dir = path.to_path_buf();
        let res = tokio::task::spawn_blocking(move || Engine::create(&dir, cfg, io))
            .await
            .map_err(|e| SrError::Io(std::io::Error::other(e)))?;
        match res {
            Ok(engine) => Ok(Arc::new(ThinSr::new(label, engine))),
            Err(e) => {
                if created_dir {
                    let _ = fs::remove_dir_all(path);
                } else if let Ok(entries) = fs::read_dir(path) {
                    // Leave the user's directory as we found it: empty.
                    for entry in entries.flatten() {
                        let _ = fs::remove_dir_all(entry.path())
                            .or_else(|_| fs::remove_file(entry.path()));
                    }
                }
                Err(SrError::from_engine(label, e))
            }
        }
    }

    async fn attach(&self, label: &str, path: &Path) -> Result<Arc<dyn AttachedSr>> {
        let io = self.io.clone();
        let dir = path.to_path_buf();
        let engine = tokio::task::spawn_blocking(move || Engine::open(&dir, io))
            .await
            .map_err(|e| SrError::Io(std::io::Error::other(e)))?
            .map_err(|e| SrError::from_engine(label, e))?;
        Ok(Arc::new(ThinSr::new(label, engine)))
    }

    async fn destroy(&self, path: &Path) -> Result<()> {
        // The directory was empty when the SR was created, so everything in it belongs to the SR.
        match tokio::fs::remove_dir_all(path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SrError::Io(e)),
        }
    }
}

/// An attached thin SR: one open [`Engine`].
pub struct ThinSr {
    label: String,
    engine: RwLock<Option<Engine>>,
}

impl ThinSr {
    fn new(label: &str, engine: Engine) -> Self {
        ThinSr {
            label: label.to_string(),
            engine: RwLock::new(Some(engine)),
        }
    }

    /// The open engine (a cheap clone), or an error once detached.
    fn engine(&self) -> Result<Engine> {
        self.engine
            .read()
            .clone()
            .ok_or_else(|| SrError::SrUnavailable(self.label.clone(), "detached".into()))
    }

    fn err(&self, e: shale_snapshot::EngineError) -> SrError {
        SrError::from_engine(&self.label, e)
    }
}

/// Translate an engine record to the driver-neutral model.
fn to_vdi(o: ObjectInfo) -> VdiInfo {
    VdiInfo {
        uuid: o.uuid,
        name: o.name,
        kind: match o.kind {
            ObjectKind::Vdi => VdiKind::Vdi,
            ObjectKind::Snapshot => VdiKind::Snapshot,
        },
        size: o.size,
        allocated_bytes: o.allocated_bytes,
        parent: o.parent,
        snapshot_of: o.snapshot_of,
        snapshots: o.snapshots,
        clones: o.clones,
        hidden: o.hidden,
        read_only: o.read_only,
        created: o.created,
    }
}

#[async_trait]
impl AttachedSr for ThinSr {
    fn stats(&self) -> SrStats {
        let objects = self.list();
        let snapshots = objects
            .iter()
            .filter(|o| o.kind == VdiKind::Snapshot)
            .count();
        let guard = self.engine.read();
        let Some(engine) = guard.as_ref() else {
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
        let i = engine.sr_info();
        SrStats {
            uuid: i.uuid,
            cluster_size: i.cluster_size,
            capacity: i.capacity,
            allocated_bytes: i.allocated_bytes,
            free_bytes: i.free_bytes,
            reclaimed_bytes: i.reclaimed_bytes,
            gc_pending: i.gc_pending,
            vdis: objects.len() - snapshots,
            snapshots,
            metadata_reads: i.metadata_reads,
            metadata_error: i.metadata_error,
        }
    }

    async fn detach(&self) -> Result<()> {
        // Closing waits for in-flight operations and open volumes (which hold engine clones) to finish, then
        // releases RocksDB and the data file so the SR can be reopened or deleted.
        let engine = self.engine.write().take();
        match engine {
            Some(e) => e.close().await.map_err(|e| self.err(e)),
            None => Ok(()),
        }
    }

    fn open_objects(&self) -> Vec<String> {
        self.engine
            .read()
            .as_ref()
            .map(|e| e.open_objects())
            .unwrap_or_default()
    }

    fn list(&self) -> Vec<VdiInfo> {
        match self.engine() {
            Ok(e) => e.list().into_iter().map(to_vdi).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn lookup(&self, name_or_uuid: &str) -> Result<VdiInfo> {
        self.engine()?
            .lookup(name_or_uuid)
            .map(to_vdi)
            .map_err(|e| self.err(e))
    }

    fn info(&self, id: Uuid) -> Result<VdiInfo> {
        self.engine()?.info(id).map(to_vdi).map_err(|e| self.err(e))
    }

    async fn vdi_create(&self, name: &str, size: u64) -> Result<VdiInfo> {
        self.engine()?
            .create_vdi(name, size)
            .await
            .map(to_vdi)
            .map_err(|e| self.err(e))
    }

    async fn vdi_destroy(&self, id: Uuid) -> Result<()> {
        self.engine()?.destroy(id).await.map_err(|e| self.err(e))
    }

    async fn vdi_resize(&self, id: Uuid, size: u64, allow_shrink: bool) -> Result<VdiInfo> {
        self.engine()?
            .resize(id, size, allow_shrink)
            .await
            .map(to_vdi)
            .map_err(|e| self.err(e))
    }

    async fn vdi_snapshot(&self, id: Uuid, name: &str) -> Result<VdiInfo> {
        self.engine()?
            .snapshot(id, name)
            .await
            .map(to_vdi)
            .map_err(|e| self.err(e))
    }

    async fn vdi_clone(&self, snapshot: Uuid, name: &str) -> Result<VdiInfo> {
        self.engine()?
            .clone_snapshot(snapshot, name)
            .await
            .map(to_vdi)
            .map_err(|e| self.err(e))
    }

    async fn vdi_revert(&self, id: Uuid, snapshot: Uuid) -> Result<()> {
        self.engine()?
            .revert(id, snapshot)
            .await
            .map_err(|e| self.err(e))
    }

    fn open(&self, id: Uuid) -> Result<Arc<dyn BlockDevice>> {
        let vol = self.engine()?.open_volume(id).map_err(|e| self.err(e))?;
        Ok(vol)
    }

    async fn digest(&self, id: Uuid) -> Result<String> {
        self.engine()?.digest(id).await.map_err(|e| self.err(e))
    }

    fn comparable(&self, from: Uuid, to: Uuid) -> bool {
        self.engine().is_ok_and(|e| e.comparable(from, to))
    }

    async fn changes(&self, from: Uuid, to: Uuid) -> Result<crate::driver::Changes> {
        let engine = self.engine()?;
        // One range scan of the map: off the async workers, like check and digest's scans.
        tokio::task::spawn_blocking(move || engine.changes(from, to))
            .await
            .map_err(|e| SrError::Io(std::io::Error::other(format!("diff task: {e}"))))?
            .map_err(|e| self.err(e))
    }

    async fn check(&self) -> Result<CheckReport> {
        let engine = self.engine()?;
        let report = tokio::task::spawn_blocking(move || engine.check())
            .await
            .map_err(|e| SrError::Io(std::io::Error::other(e)))?
            .map_err(|e| self.err(e))?;
        Ok(CheckReport {
            problems: report.problems,
            mapped_clusters: report.mapped_clusters,
            partial_entries: report.partial_entries,
            free_clusters: report.free_clusters,
            objects: report.objects,
        })
    }

    async fn gc(&self) -> Result<u64> {
        self.engine()?.gc_now().await.map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_dir_rules() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("a/b");
        assert!(prepare_dir(&fresh).unwrap());
        assert!(!prepare_dir(&fresh).unwrap(), "empty existing dir is fine");
        fs::write(fresh.join("x"), b"x").unwrap();
        assert!(matches!(
            prepare_dir(&fresh),
            Err(SrError::InvalidArgument(_))
        ));
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            prepare_dir(&file),
            Err(SrError::PathNotWritable(..))
        ));
        let under_file = file.join("sr");
        let e = prepare_dir(&under_file).unwrap_err();
        assert!(matches!(e, SrError::PathNotWritable(..)), "{e}");
        assert!(e.to_string().contains("not writable"), "{e}");
    }
}
