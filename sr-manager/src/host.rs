//! The host: every SR this daemon owns, the drivers behind them, and the object model's addressing rules.
//!
//! [`Host`] is what the gRPC service calls, and what later front ends (the NBD server, the VMM) hold to reach
//! volumes: [`Host::open_volume`] turns a user's reference into an `Arc<dyn BlockDevice>`, whatever the SR type.
//!
//! Addressing (the same for every caller):
//! - an SR is named by its host-unique name or its UUID;
//! - a VDI or snapshot by its UUID, by `SR/NAME`, or by a bare `NAME`. Names are unique within an SR only, so a
//!   bare name found in several SRs is refused ([`SrError::Ambiguous`]) with a hint to write `SR/NAME` or the UUID,
//!   never silently resolved to one of them.
//!
//! Locking: one async `RwLock` guards the registry and the attached-SR table. SR create/destroy take it for write
//! (they change the table); everything else takes it for read just long enough to clone the SR's handle, so VDI
//! I/O and long operations (digest, check) never block each other.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use shale_block::{BlockDevice, BlockError, IoBuf, WriteFlags};
use tokio::sync::RwLock;
use uuid::Uuid;

use crate::driver::{
    AttachedSr, Capabilities, CheckReport, SrCreateOptions, SrDriver, SrStats, VdiInfo,
};
use crate::error::{Result, SrError};
use crate::registry::{Registry, SrRecord};

/// Name of the SR created on a host's first start.
pub const DEFAULT_SR_NAME: &str = "local";
/// Type of the SR created on a host's first start.
pub const DEFAULT_SR_TYPE: &str = "thin";
/// Largest single read or write through [`Host::read`]/[`Host::write`] (scripted I/O, not a data path).
pub const MAX_IO: u64 = 16 << 20;
/// Chunk size for the I/O those calls issue to the device.
const IO_CHUNK: u64 = 1 << 20;

/// An SR as the host sees it: its registry record, and its live state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SrView {
    /// The registry record (name, type, path).
    pub record: SrRecord,
    /// `None` when attached; the reason otherwise.
    pub unavailable: Option<String>,
    /// Detached on purpose ([`Host::sr_detach`]) rather than failed; `unavailable` then says how to attach it.
    pub detached: bool,
    /// Space accounting (attached SRs only).
    pub stats: Option<SrStats>,
    /// What the SR's type can do.
    pub capabilities: Capabilities,
}

/// A related object, with its name for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Named {
    /// The object's UUID.
    pub uuid: Uuid,
    /// Its name (empty when it no longer exists).
    pub name: String,
}

/// A VDI or snapshot with its SR and the names of related objects.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VdiView {
    /// UUID of the SR holding it.
    pub sr_uuid: Uuid,
    /// Name of that SR.
    pub sr_name: String,
    /// The object.
    pub info: VdiInfo,
    /// The snapshot a clone was made from.
    pub parent: Option<Named>,
    /// The VDI a snapshot was taken of.
    pub snapshot_of: Option<Named>,
    /// Snapshots of this VDI.
    pub snapshots: Vec<Named>,
    /// Clones of this snapshot.
    pub clones: Vec<Named>,
}

struct SrSlot {
    record: SrRecord,
    sr: std::result::Result<Arc<dyn AttachedSr>, String>,
    /// Set by [`Host::sr_detach`], cleared by [`Host::sr_attach`].
    detached: bool,
}

struct Inner {
    registry: Registry,
    srs: Vec<SrSlot>,
}

/// A resolved reference: the SR that holds the object, and the object.
#[derive(Clone)]
pub struct Resolved {
    /// The SR's registry record.
    pub record: SrRecord,
    /// The attached SR.
    pub sr: Arc<dyn AttachedSr>,
    /// The object.
    pub vdi: VdiInfo,
}

/// Every SR of this host and the drivers behind them.
pub struct Host {
    state_dir: PathBuf,
    drivers: BTreeMap<&'static str, Arc<dyn SrDriver>>,
    inner: RwLock<Inner>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Check an SR name: 1-64 characters from `[A-Za-z0-9._-]`, not starting with '-' or '.', and not a UUID (which
/// would make `SR/NAME` and UUID addressing ambiguous).
pub fn validate_sr_name(name: &str) -> Result<()> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > 64 || !ok_chars || name.starts_with(['-', '.']) {
        return Err(SrError::InvalidArgument(format!(
            "invalid SR name '{name}': use 1-64 characters from A-Z a-z 0-9 . _ - (not starting with . or -)"
        )));
    }
    if Uuid::parse_str(name).is_ok() {
        return Err(SrError::InvalidArgument(format!(
            "invalid SR name '{name}': an SR name cannot be a UUID"
        )));
    }
    Ok(())
}

impl Host {
    /// Open the host state in `state_dir`: load the SR registry and attach every SR. On the first start (no
    /// registry yet) a default `local` thin SR is created at `STATE_DIR/srs/local`.
    ///
    /// An SR that fails to attach is kept in the registry and reported as unavailable, so one broken SR never
    /// stops the daemon from serving the others.
    pub async fn open(state_dir: &Path, drivers: Vec<Arc<dyn SrDriver>>) -> Result<Host> {
        let drivers: BTreeMap<_, _> = drivers.into_iter().map(|d| (d.type_name(), d)).collect();
        let (registry, first_start) = match Registry::load(state_dir)? {
            Some(r) => (r, false),
            None => (Registry::empty(state_dir), true),
        };
        let host = Host {
            state_dir: state_dir.to_path_buf(),
            drivers,
            inner: RwLock::new(Inner {
                registry,
                srs: Vec::new(),
            }),
        };
        {
            let mut inner = host.inner.write().await;
            let records = inner.registry.records().to_vec();
            for record in records {
                let sr = match host.driver(&record.sr_type) {
                    Ok(d) => d
                        .attach(&record.name, &record.path)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match &sr {
                    Ok(_) => {
                        tracing::info!(sr = %record.name, path = %record.path.display(), "attached SR")
                    }
                    Err(e) => tracing::error!(sr = %record.name, error = %e, "SR unavailable"),
                }
                inner.srs.push(SrSlot {
                    record,
                    sr,
                    detached: false,
                });
            }
        }
        if first_start {
            let path = state_dir.join("srs").join(DEFAULT_SR_NAME);
            let occupied = std::fs::read_dir(&path)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false);
            if occupied {
                // The registry was lost but the default SR is still there: adopt it rather than refuse to start.
                tracing::warn!(path = %path.display(), "no registry but a default SR exists: adopting it");
                host.sr_adopt(DEFAULT_SR_NAME, DEFAULT_SR_TYPE, &path)
                    .await?;
            } else {
                tracing::info!(path = %path.display(), "first start: creating the default SR");
                host.sr_create(
                    DEFAULT_SR_NAME,
                    DEFAULT_SR_TYPE,
                    &path,
                    &SrCreateOptions::default(),
                )
                .await?;
            }
        }
        Ok(host)
    }

    /// Attach an existing SR at `path` and register it as `name`.
    async fn sr_adopt(&self, name: &str, sr_type: &str, path: &Path) -> Result<SrView> {
        let driver = self.driver(sr_type)?;
        let mut inner = self.inner.write().await;
        let sr = driver.attach(name, path).await?;
        let record = SrRecord {
            uuid: sr.stats().uuid,
            name: name.to_string(),
            sr_type: sr_type.to_string(),
            path: path.to_path_buf(),
            created: now(),
        };
        if let Err(e) = inner.registry.add(record.clone()) {
            let _ = sr.detach().await;
            return Err(e);
        }
        let slot = SrSlot {
            record,
            sr: Ok(sr),
            detached: false,
        };
        let view = self.view(&slot);
        inner.srs.push(slot);
        Ok(view)
    }

    /// The daemon's state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Names of the SR types this host can create.
    pub fn sr_types(&self) -> Vec<String> {
        self.drivers.keys().map(|s| s.to_string()).collect()
    }

    fn driver(&self, sr_type: &str) -> Result<Arc<dyn SrDriver>> {
        self.drivers.get(sr_type).cloned().ok_or_else(|| {
            SrError::UnknownType(
                sr_type.to_string(),
                self.drivers.keys().copied().collect::<Vec<_>>().join(", "),
            )
        })
    }

    fn capabilities_of(&self, sr_type: &str) -> Capabilities {
        self.drivers
            .get(sr_type)
            .map(|d| d.capabilities())
            .unwrap_or_default()
    }

    fn view(&self, slot: &SrSlot) -> SrView {
        SrView {
            record: slot.record.clone(),
            unavailable: slot.sr.as_ref().err().cloned(),
            detached: slot.detached,
            stats: slot.sr.as_ref().ok().map(|sr| sr.stats()),
            capabilities: self.capabilities_of(&slot.record.sr_type),
        }
    }

    fn find_slot<'a>(inner: &'a Inner, sr_ref: &str) -> Result<&'a SrSlot> {
        Ok(&inner.srs[Self::slot_index(inner, sr_ref)?])
    }

    fn attached(slot: &SrSlot) -> Result<Arc<dyn AttachedSr>> {
        slot.sr
            .clone()
            .map_err(|e| SrError::SrUnavailable(slot.record.name.clone(), e))
    }

    /// Create an SR of `sr_type` at `path` (absolute; absent or an empty directory) and register it as `name`.
    pub async fn sr_create(
        &self,
        name: &str,
        sr_type: &str,
        path: &Path,
        opts: &SrCreateOptions,
    ) -> Result<SrView> {
        validate_sr_name(name)?;
        let driver = self.driver(sr_type)?;
        if !path.is_absolute() {
            return Err(SrError::InvalidArgument(format!(
                "SR path {} must be absolute",
                path.display()
            )));
        }
        let path = normalize(path);
        let mut inner = self.inner.write().await;
        if inner.srs.iter().any(|s| s.record.name == name) {
            return Err(SrError::SrNameTaken(name.to_string()));
        }
        if let Some(s) = inner
            .srs
            .iter()
            .find(|s| s.record.path.starts_with(&path) || path.starts_with(&s.record.path))
        {
            return Err(SrError::SrPathInUse(path, s.record.name.clone()));
        }
        let sr = driver.create(name, &path, opts).await?;
        let record = SrRecord {
            uuid: sr.stats().uuid,
            name: name.to_string(),
            sr_type: sr_type.to_string(),
            path,
            created: now(),
        };
        if let Err(e) = inner.registry.add(record.clone()) {
            // Do not leave an SR on disk that the registry does not know about.
            let _ = sr.detach().await;
            let _ = driver.destroy(&record.path).await;
            return Err(e);
        }
        tracing::info!(sr = %record.name, uuid = %record.uuid, path = %record.path.display(), "created SR");
        let slot = SrSlot {
            record,
            sr: Ok(sr),
            detached: false,
        };
        let view = self.view(&slot);
        inner.srs.push(slot);
        Ok(view)
    }

    /// Every registered SR, in creation order.
    pub async fn sr_list(&self) -> Vec<SrView> {
        let inner = self.inner.read().await;
        inner.srs.iter().map(|s| self.view(s)).collect()
    }

    /// One SR by name or UUID.
    pub async fn sr_show(&self, sr_ref: &str) -> Result<SrView> {
        let inner = self.inner.read().await;
        Ok(self.view(Self::find_slot(&inner, sr_ref)?))
    }

    /// Destroy an SR: refuse while it holds VDIs or snapshots unless `force`; detach it, delete its data and
    /// metadata, and remove it from the registry. An SR that could not be attached is only forgotten (its files
    /// are left alone, since the daemon cannot tell what they hold), and only with `force`.
    pub async fn sr_destroy(&self, sr_ref: &str, force: bool) -> Result<SrRecord> {
        let mut inner = self.inner.write().await;
        let slot = Self::find_slot(&inner, sr_ref)?;
        let record = slot.record.clone();
        match &slot.sr {
            Ok(sr) => {
                let objects = sr.list().len();
                if objects > 0 && !force {
                    return Err(SrError::SrNotEmpty(record.name, objects));
                }
                let sr = sr.clone();
                let driver = self.driver(&record.sr_type)?;
                sr.detach().await?;
                driver.destroy(&record.path).await?;
            }
            Err(_) if slot.detached && !force => {
                let (name, path) = (&record.name, record.path.display());
                return Err(SrError::FailedPrecondition(format!(
                    "SR '{name}' is detached: attach it first (`shale sr attach {name}`) to destroy it with its \
                     data, or pass --force to only remove it from the registry (its files at {path} are left in \
                     place)"
                )));
            }
            Err(reason) => {
                if !force {
                    return Err(SrError::FailedPrecondition(format!(
                        "SR '{}' is unavailable ({reason}); pass --force to remove it from the registry (its files \
                         at {} are left in place)",
                        record.name,
                        record.path.display()
                    )));
                }
            }
        }
        inner.registry.remove(record.uuid)?;
        inner.srs.retain(|s| s.record.uuid != record.uuid);
        tracing::info!(sr = %record.name, uuid = %record.uuid, "destroyed SR");
        Ok(record)
    }

    async fn sr_handle(&self, sr_ref: &str) -> Result<(SrRecord, Arc<dyn AttachedSr>)> {
        let inner = self.inner.read().await;
        let slot = Self::find_slot(&inner, sr_ref)?;
        Ok((slot.record.clone(), Self::attached(slot)?))
    }

    /// Consistency check of one SR.
    pub async fn sr_check(&self, sr_ref: &str) -> Result<(SrRecord, CheckReport)> {
        let (record, sr) = self.sr_handle(sr_ref).await?;
        let report = sr.check().await?;
        if !report.ok() {
            tracing::warn!(sr = %record.name, problems = report.problems.len(), "SR check found problems");
        }
        Ok((record, report))
    }

    /// Run space reclamation on one SR now.
    pub async fn sr_gc(&self, sr_ref: &str) -> Result<(SrRecord, u64)> {
        let (record, sr) = self.sr_handle(sr_ref).await?;
        let bytes = sr.gc().await?;
        Ok((record, bytes))
    }

    /// Detach an SR without destroying it, as XenServer's `pbd-unplug`: close its metadata store and data files
    /// and keep it in the registry as detached, so its objects disappear from listings and exports until
    /// [`Host::sr_attach`]. Refused while any of its VDIs or snapshots is open (an NBD client, a VM disk), naming
    /// them: detaching under a writer would fail its I/O. This is how an SR degraded by a failed metadata write
    /// (a full filesystem) is recovered without restarting the daemon and so without dropping other SRs' users.
    /// The state is not persisted: a daemon restart attaches every registered SR, as XenServer plugs every PBD
    /// when a host starts. Detaching a detached SR changes nothing.
    pub async fn sr_detach(&self, sr_ref: &str) -> Result<SrView> {
        let mut inner = self.inner.write().await;
        let idx = Self::slot_index(&inner, sr_ref)?;
        let slot = &inner.srs[idx];
        let Ok(sr) = slot.sr.clone() else {
            // Already detached, or never attached: nothing to release.
            return Ok(self.view(slot));
        };
        let open = sr.open_objects();
        if !open.is_empty() {
            return Err(SrError::FailedPrecondition(format!(
                "SR '{}' is in use: {} open (exported over NBD or a VM disk); disconnect {} first",
                slot.record.name,
                quoted_with_verb(&open),
                if open.len() == 1 { "it" } else { "them" }
            )));
        }
        let name = slot.record.name.clone();
        // Whatever detach reports, the handle is spent: later calls on it fail, so the slot says detached.
        let result = sr.detach().await;
        let slot = &mut inner.srs[idx];
        slot.detached = result.is_ok();
        slot.sr = Err(match &result {
            Ok(()) => format!("detached (`shale sr attach {name}` attaches it again)"),
            Err(e) => format!("detach did not complete ({e}); `shale sr attach {name}` retries"),
        });
        result?;
        tracing::info!(sr = %name, "detached SR");
        Ok(self.view(&inner.srs[idx]))
    }

    /// Attach a registered SR that is detached or failed to attach (its disk was missing when the daemon started,
    /// say), as XenServer's `pbd-plug`. The SR found at the recorded path must be the registered one (same UUID),
    /// so a different filesystem mounted there is refused rather than served under this SR's name. Attaching an
    /// attached SR changes nothing.
    pub async fn sr_attach(&self, sr_ref: &str) -> Result<SrView> {
        let mut inner = self.inner.write().await;
        let idx = Self::slot_index(&inner, sr_ref)?;
        if inner.srs[idx].sr.is_ok() {
            return Ok(self.view(&inner.srs[idx]));
        }
        let record = inner.srs[idx].record.clone();
        let driver = self.driver(&record.sr_type)?;
        let attached = match driver.attach(&record.name, &record.path).await {
            Ok(sr) if sr.stats().uuid != record.uuid => {
                let found = sr.stats().uuid;
                let _ = sr.detach().await;
                Err(SrError::FailedPrecondition(format!(
                    "{} holds SR {found}, not SR '{}' ({}); mount or restore the right one there",
                    record.path.display(),
                    record.name,
                    record.uuid
                )))
            }
            other => other,
        };
        match attached {
            Ok(sr) => {
                inner.srs[idx].sr = Ok(sr);
                inner.srs[idx].detached = false;
                tracing::info!(sr = %record.name, path = %record.path.display(), "attached SR");
                Ok(self.view(&inner.srs[idx]))
            }
            Err(e) => {
                // No longer detached on purpose: unavailable, with the reason the attach failed.
                inner.srs[idx].sr = Err(e.to_string());
                inner.srs[idx].detached = false;
                tracing::warn!(sr = %record.name, error = %e, "SR attach failed");
                Err(e)
            }
        }
    }

    fn slot_index(inner: &Inner, sr_ref: &str) -> Result<usize> {
        let by_uuid = Uuid::parse_str(sr_ref).ok();
        inner
            .srs
            .iter()
            .position(|s| s.record.name == sr_ref || Some(s.record.uuid) == by_uuid)
            .ok_or_else(|| SrError::SrNotFound(sr_ref.to_string()))
    }

    /// Every attached SR with its handle.
    async fn attached_srs(&self) -> Vec<(SrRecord, Arc<dyn AttachedSr>)> {
        let inner = self.inner.read().await;
        inner
            .srs
            .iter()
            .filter_map(|s| s.sr.as_ref().ok().map(|sr| (s.record.clone(), sr.clone())))
            .collect()
    }

    /// Resolve a VDI/snapshot reference (UUID, `SR/NAME` or `NAME`). A bare name is looked up in `prefer` first
    /// (e.g. the VDI's own SR when naming one of its snapshots), then in every SR.
    pub async fn resolve(&self, vdi_ref: &str, prefer: Option<Uuid>) -> Result<Resolved> {
        let vdi_ref = vdi_ref.trim();
        if vdi_ref.is_empty() {
            return Err(SrError::InvalidArgument("empty VDI reference".into()));
        }
        if let Some((sr_ref, name)) = vdi_ref.split_once('/') {
            let (record, sr) = self.sr_handle(sr_ref).await?;
            let vdi = sr.lookup(name)?;
            return Ok(Resolved { record, sr, vdi });
        }
        let srs = self.attached_srs().await;
        if let Ok(id) = Uuid::parse_str(vdi_ref) {
            for (record, sr) in srs {
                if let Ok(vdi) = sr.info(id) {
                    return Ok(Resolved { record, sr, vdi });
                }
            }
            return Err(SrError::VdiNotFound(vdi_ref.to_string(), String::new()));
        }
        if let Some(p) = prefer {
            if let Some((record, sr)) = srs.iter().find(|(r, _)| r.uuid == p) {
                if let Ok(vdi) = sr.lookup(vdi_ref) {
                    return Ok(Resolved {
                        record: record.clone(),
                        sr: sr.clone(),
                        vdi,
                    });
                }
            }
        }
        let mut found = Vec::new();
        for (record, sr) in srs {
            match sr.lookup(vdi_ref) {
                Ok(vdi) => found.push(Resolved { record, sr, vdi }),
                Err(SrError::VdiNotFound(..)) => {}
                Err(e) => return Err(e),
            }
        }
        match found.len() {
            0 => Err(SrError::VdiNotFound(vdi_ref.to_string(), String::new())),
            1 => Ok(found.remove(0)),
            _ => {
                let names: Vec<_> = found.iter().map(|r| r.record.name.clone()).collect();
                Err(SrError::Ambiguous {
                    name: vdi_ref.to_string(),
                    example: format!("{}/{vdi_ref}", names[0]),
                    srs: names.join(", "),
                })
            }
        }
    }

    fn view_of(record: &SrRecord, sr: &dyn AttachedSr, vdi: VdiInfo) -> VdiView {
        let all = sr.list();
        let names: HashMap<Uuid, &str> = all.iter().map(|o| (o.uuid, o.name.as_str())).collect();
        Self::view_with(record, &names, vdi)
    }

    fn view_with(record: &SrRecord, names: &HashMap<Uuid, &str>, vdi: VdiInfo) -> VdiView {
        let named = |id: &Uuid| Named {
            uuid: *id,
            name: names.get(id).map(|s| s.to_string()).unwrap_or_default(),
        };
        VdiView {
            sr_uuid: record.uuid,
            sr_name: record.name.clone(),
            parent: vdi.parent.as_ref().map(named),
            snapshot_of: vdi.snapshot_of.as_ref().map(named),
            snapshots: vdi.snapshots.iter().map(named).collect(),
            clones: vdi.clones.iter().map(named).collect(),
            info: vdi,
        }
    }

    fn view_resolved(r: &Resolved) -> VdiView {
        Self::view_of(&r.record, r.sr.as_ref(), r.vdi.clone())
    }

    /// Create a VDI in `sr_ref` (or in the only SR, when `sr_ref` is `None` and the host has exactly one).
    pub async fn vdi_create(&self, sr_ref: Option<&str>, name: &str, size: u64) -> Result<VdiView> {
        let (record, sr) = match sr_ref.filter(|s| !s.is_empty()) {
            Some(r) => self.sr_handle(r).await?,
            None => {
                let inner = self.inner.read().await;
                match inner.srs.as_slice() {
                    [only] => (only.record.clone(), Self::attached(only)?),
                    [] => {
                        return Err(SrError::SrRequired(
                            "this host has no SR; create one with `shale sr create`".into(),
                        ))
                    }
                    many => {
                        let names: Vec<_> = many.iter().map(|s| s.record.name.as_str()).collect();
                        return Err(SrError::SrRequired(format!(
                            "this host has several SRs ({}); pass --sr",
                            names.join(", ")
                        )));
                    }
                }
            }
        };
        if name.contains('/') {
            return Err(SrError::InvalidArgument(format!(
                "invalid name '{name}': names cannot contain '/'"
            )));
        }
        if Uuid::parse_str(name).is_ok() {
            return Err(SrError::InvalidArgument(format!(
                "invalid name '{name}': a name cannot be a UUID"
            )));
        }
        check_size(size)?;
        let vdi = sr.vdi_create(name, size).await?;
        tracing::info!(sr = %record.name, vdi = %vdi.name, uuid = %vdi.uuid, size, "created VDI");
        Ok(Self::view_of(&record, sr.as_ref(), vdi))
    }

    /// VDIs and snapshots of one SR or of all; hidden snapshots only with `all`.
    pub async fn vdi_list(&self, sr_ref: Option<&str>, all: bool) -> Result<Vec<VdiView>> {
        let srs = match sr_ref.filter(|s| !s.is_empty()) {
            Some(r) => vec![self.sr_handle(r).await?],
            None => self.attached_srs().await,
        };
        let mut out = Vec::new();
        for (record, sr) in srs {
            let objects = sr.list();
            let names: HashMap<Uuid, &str> =
                objects.iter().map(|o| (o.uuid, o.name.as_str())).collect();
            let mut views: Vec<_> = objects
                .iter()
                .filter(|o| all || !o.hidden)
                .map(|o| Self::view_with(&record, &names, o.clone()))
                .collect();
            views.sort_by(|a, b| {
                (a.info.created, &a.info.name).cmp(&(b.info.created, &b.info.name))
            });
            out.extend(views);
        }
        Ok(out)
    }

    /// One VDI or snapshot.
    pub async fn vdi_show(&self, vdi_ref: &str) -> Result<VdiView> {
        Ok(Self::view_resolved(&self.resolve(vdi_ref, None).await?))
    }

    /// Resize a VDI.
    pub async fn vdi_resize(
        &self,
        vdi_ref: &str,
        size: u64,
        allow_shrink: bool,
    ) -> Result<VdiView> {
        let r = self.resolve(vdi_ref, None).await?;
        check_size(size)?;
        let vdi = r.sr.vdi_resize(r.vdi.uuid, size, allow_shrink).await?;
        tracing::info!(sr = %r.record.name, vdi = %vdi.name, from = r.vdi.size, to = size, "resized VDI");
        Ok(Self::view_of(&r.record, r.sr.as_ref(), vdi))
    }

    /// Snapshot a VDI; the snapshot lives in the VDI's SR.
    pub async fn vdi_snapshot(&self, vdi_ref: &str, name: &str) -> Result<VdiView> {
        let r = self.resolve(vdi_ref, None).await?;
        let snap = r.sr.vdi_snapshot(r.vdi.uuid, name).await?;
        tracing::info!(sr = %r.record.name, vdi = %r.vdi.name, snapshot = %snap.name, "took snapshot");
        Ok(Self::view_of(&r.record, r.sr.as_ref(), snap))
    }

    /// Clone a snapshot into a new VDI in the same SR.
    pub async fn vdi_clone(&self, snap_ref: &str, name: &str) -> Result<VdiView> {
        let r = self.resolve(snap_ref, None).await?;
        let vdi = r.sr.vdi_clone(r.vdi.uuid, name).await?;
        tracing::info!(sr = %r.record.name, snapshot = %r.vdi.name, clone = %vdi.name, "cloned snapshot");
        Ok(Self::view_of(&r.record, r.sr.as_ref(), vdi))
    }

    /// Resolve the snapshot `snap_ref` that an operation on `r` pairs it with: a bare name is looked up in `r`'s
    /// SR first, and a snapshot in another SR is refused (revert and diff work within one SR).
    async fn resolve_in_same_sr(&self, r: &Resolved, snap_ref: &str) -> Result<Resolved> {
        let s = self.resolve(snap_ref, Some(r.record.uuid)).await?;
        if s.record.uuid != r.record.uuid {
            return Err(SrError::FailedPrecondition(format!(
                "snapshot '{}' is in SR '{}' but '{}' is in SR '{}'",
                s.vdi.name, s.record.name, r.vdi.name, r.record.name
            )));
        }
        Ok(s)
    }

    /// Revert a VDI to one of its snapshots (a bare snapshot name is looked up in the VDI's SR first).
    pub async fn vdi_revert(&self, vdi_ref: &str, snap_ref: &str) -> Result<VdiView> {
        let r = self.resolve(vdi_ref, None).await?;
        let s = self.resolve_in_same_sr(&r, snap_ref).await?;
        r.sr.vdi_revert(r.vdi.uuid, s.vdi.uuid).await?;
        tracing::info!(sr = %r.record.name, vdi = %r.vdi.name, snapshot = %s.vdi.name, "reverted VDI");
        let vdi = r.sr.info(r.vdi.uuid)?;
        Ok(Self::view_of(&r.record, r.sr.as_ref(), vdi))
    }

    /// Destroy a VDI or snapshot. Returns the object as it is afterwards (`hidden` set when a snapshot is kept
    /// for its clones), or `None` when it is gone.
    pub async fn vdi_destroy(&self, vdi_ref: &str) -> Result<(VdiInfo, Option<VdiInfo>)> {
        let r = self.resolve(vdi_ref, None).await?;
        r.sr.vdi_destroy(r.vdi.uuid).await?;
        let after = r.sr.info(r.vdi.uuid).ok();
        tracing::info!(sr = %r.record.name, vdi = %r.vdi.name, hidden = after.is_some(), "destroyed VDI");
        Ok((r.vdi, after))
    }

    /// blake3 digest of a VDI's or snapshot's content.
    pub async fn vdi_digest(&self, vdi_ref: &str) -> Result<(VdiInfo, String)> {
        let r = self.resolve(vdi_ref, None).await?;
        let d = r.sr.digest(r.vdi.uuid).await?;
        Ok((r.vdi, d))
    }

    /// What a VDI (or a later snapshot) changed since snapshot `from_ref` (a bare name is looked up in the VDI's
    /// SR first): changed-block tracking for incremental backups. Returns the two objects and the extents.
    pub async fn vdi_diff(
        &self,
        vdi_ref: &str,
        from_ref: &str,
    ) -> Result<(VdiInfo, VdiInfo, crate::driver::Changes)> {
        let r = self.resolve(vdi_ref, None).await?;
        let f = self.resolve_in_same_sr(&r, from_ref).await?;
        if !self.capabilities_of(&r.record.sr_type).changed_blocks {
            return Err(SrError::Unsupported(
                r.record.name.clone(),
                r.record.sr_type.clone(),
                "listing changed blocks",
            ));
        }
        let changes = r.sr.changes(f.vdi.uuid, r.vdi.uuid).await?;
        Ok((r.vdi, f.vdi, changes))
    }

    /// Open a VDI's or snapshot's data as a [`BlockDevice`]: the entry point for the NBD server and the VMM.
    pub async fn open_volume(&self, vdi_ref: &str) -> Result<(Resolved, Arc<dyn BlockDevice>)> {
        let r = self.resolve(vdi_ref, None).await?;
        let dev = r.sr.open(r.vdi.uuid)?;
        Ok((r, dev))
    }

    /// Every object that can be exported, as (`SR/NAME`, SR record, object): what an NBD server lists.
    pub async fn exports(&self) -> Vec<(String, SrRecord, VdiInfo)> {
        let mut out = Vec::new();
        for (record, sr) in self.attached_srs().await {
            for vdi in sr.list().into_iter().filter(|v| !v.hidden) {
                out.push((format!("{}/{}", record.name, vdi.name), record.clone(), vdi));
            }
        }
        out
    }

    /// Write `data` at `offset` of a VDI, doing read-modify-write for a range not aligned to the block size;
    /// with `flush`, the write is durable when this returns.
    pub async fn write(&self, vdi_ref: &str, offset: u64, data: &[u8], flush: bool) -> Result<u64> {
        let (r, dev) = self.open_volume(vdi_ref).await?;
        if r.vdi.read_only || dev.read_only() {
            return Err(SrError::FailedPrecondition(format!(
                "'{}' is a read-only {}; write to a VDI (or clone the snapshot)",
                r.vdi.name,
                r.vdi.kind.as_str()
            )));
        }
        let sr = r.record.name.clone();
        write_bytes(dev.as_ref(), offset, data, flush)
            .await
            .map_err(|e| io_error(&sr, &r.vdi, e))?;
        Ok(data.len() as u64)
    }

    /// Read `len` bytes at `offset` of a VDI or snapshot (any alignment).
    pub async fn read(&self, vdi_ref: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let (r, dev) = self.open_volume(vdi_ref).await?;
        let sr = r.record.name.clone();
        read_bytes(dev.as_ref(), offset, len)
            .await
            .map_err(|e| io_error(&sr, &r.vdi, e))
    }

    /// Detach every SR (on daemon shutdown), so engines close cleanly.
    pub async fn shutdown(&self) {
        let inner = self.inner.read().await;
        for slot in &inner.srs {
            if let Ok(sr) = &slot.sr {
                if let Err(e) = sr.detach().await {
                    tracing::warn!(sr = %slot.record.name, error = %e, "detach failed");
                } else {
                    tracing::info!(sr = %slot.record.name, "detached SR");
                }
            }
        }
    }
}

/// `'a', 'b' and 'c'`: names for a one-line message.
fn quoted_with_verb(names: &[String]) -> String {
    let q: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
    match q.as_slice() {
        [] => String::new(),
        [one] => format!("{one} is"),
        [rest @ .., last] => format!("{} and {last} are", rest.join(", ")),
    }
}

/// A VDI size must be a positive multiple of 512 (the block size every volume offers).
pub fn check_size(size: u64) -> Result<()> {
    if size == 0 {
        return Err(SrError::InvalidArgument(
            "invalid size 0: a VDI needs at least 512 bytes".into(),
        ));
    }
    if !size.is_multiple_of(512) {
        return Err(SrError::InvalidArgument(format!(
            "invalid size {size}: sizes must be a multiple of 512 bytes"
        )));
    }
    Ok(())
}

/// Collapse `.` and `..` components lexically, so path-overlap checks compare like with like.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn io_error(sr: &str, vdi: &VdiInfo, e: BlockError) -> SrError {
    match e {
        BlockError::OutOfRange { offset, len, size } => SrError::InvalidArgument(format!(
            "range {offset}+{len} is beyond the end of '{}' ({size} bytes)",
            vdi.name
        )),
        BlockError::ReadOnly => SrError::FailedPrecondition(format!("'{}' is read-only", vdi.name)),
        other => SrError::from_block(sr, other),
    }
}

/// Round `x` down to a multiple of `a`.
fn align_down(x: u64, a: u64) -> u64 {
    x - x % a
}

/// Round `x` up to a multiple of `a` (saturating).
fn align_up(x: u64, a: u64) -> u64 {
    align_down(x.saturating_add(a - 1), a)
}

fn check_bounds(
    dev: &dyn BlockDevice,
    offset: u64,
    len: u64,
) -> std::result::Result<u64, BlockError> {
    let size = dev.size();
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(end),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

/// Write any byte range through a block device, reading back partial blocks at the edges.
pub async fn write_bytes(
    dev: &dyn BlockDevice,
    offset: u64,
    data: &[u8],
    flush: bool,
) -> std::result::Result<(), BlockError> {
    let end = check_bounds(dev, offset, data.len() as u64)?;
    let bs = u64::from(dev.block_size().max(1));
    let mut pos = align_down(offset, bs);
    let stop = align_up(end, bs);
    while pos < stop {
        let chunk_end = (align_down(pos, IO_CHUNK) + IO_CHUNK).min(stop);
        let len = (chunk_end - pos) as usize;
        let buf = if pos >= offset && chunk_end <= end {
            IoBuf::from_slice(&data[(pos - offset) as usize..(chunk_end - offset) as usize])
        } else {
            let mut buf = dev.read(pos, IoBuf::zeroed(len)).await?;
            let from = pos.max(offset);
            let to = chunk_end.min(end);
            if from < to {
                buf.as_mut_slice()[(from - pos) as usize..(to - pos) as usize]
                    .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            }
            buf
        };
        dev.write(pos, buf, WriteFlags::default()).await?;
        pos = chunk_end;
    }
    if flush {
        dev.flush().await?;
    }
    Ok(())
}

/// Read any byte range through a block device.
pub async fn read_bytes(
    dev: &dyn BlockDevice,
    offset: u64,
    len: u64,
) -> std::result::Result<Vec<u8>, BlockError> {
    let end = check_bounds(dev, offset, len)?;
    let bs = u64::from(dev.block_size().max(1));
    let mut out = Vec::with_capacity(len as usize);
    let mut pos = align_down(offset, bs);
    let stop = align_up(end, bs);
    while pos < stop {
        let chunk_end = (align_down(pos, IO_CHUNK) + IO_CHUNK).min(stop);
        let buf = dev
            .read(pos, IoBuf::zeroed((chunk_end - pos) as usize))
            .await?;
        let from = pos.max(offset);
        let to = chunk_end.min(end);
        if from < to {
            out.extend_from_slice(&buf.as_slice()[(from - pos) as usize..(to - pos) as usize]);
        }
        pos = chunk_end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sr_names() {
        assert!(validate_sr_name("local").is_ok());
        assert!(validate_sr_name("fast-nvme_0.a").is_ok());
        assert!(validate_sr_name("").is_err());
        assert!(validate_sr_name("a/b").is_err());
        assert!(validate_sr_name("-x").is_err());
        assert!(validate_sr_name(".x").is_err());
        assert!(validate_sr_name("a b").is_err());
        assert!(validate_sr_name(&"x".repeat(65)).is_err());
        assert!(validate_sr_name(&Uuid::new_v4().to_string()).is_err());
    }

    #[test]
    fn sizes() {
        assert!(check_size(512).is_ok());
        assert!(check_size(1 << 40).is_ok());
        assert!(check_size(0).is_err());
        let e = check_size(1000).unwrap_err();
        assert!(e.to_string().contains("multiple of 512"), "{e}");
    }

    /// An in-memory block device for the byte-range helpers.
    struct Mem(parking_lot::Mutex<Vec<u8>>);

    #[async_trait::async_trait]
    impl BlockDevice for Mem {
        fn info(&self) -> shale_block::DeviceInfo {
            shale_block::DeviceInfo {
                size: self.0.lock().len() as u64,
                block_size: 512,
                preferred_block_size: 4096,
                read_only: false,
                can_trim: false,
                can_fast_zero: false,
                can_multi_conn: true,
            }
        }
        async fn read(&self, offset: u64, mut buf: IoBuf) -> shale_block::Result<IoBuf> {
            shale_block::device::check_range(&self.info(), offset, buf.len() as u64)?;
            let d = self.0.lock();
            let n = buf.len();
            buf.as_mut_slice()
                .copy_from_slice(&d[offset as usize..offset as usize + n]);
            Ok(buf)
        }
        async fn write(&self, offset: u64, data: IoBuf, _f: WriteFlags) -> shale_block::Result<()> {
            shale_block::device::check_range(&self.info(), offset, data.len() as u64)?;
            self.0.lock()[offset as usize..offset as usize + data.len()]
                .copy_from_slice(data.as_slice());
            Ok(())
        }
        async fn flush(&self) -> shale_block::Result<()> {
            Ok(())
        }
        async fn discard(&self, _o: u64, _l: u64) -> shale_block::Result<()> {
            Err(BlockError::Unsupported("discard"))
        }
        async fn write_zeroes(
            &self,
            _o: u64,
            _l: u64,
            _t: bool,
            _f: WriteFlags,
        ) -> shale_block::Result<()> {
            Err(BlockError::Unsupported("write_zeroes"))
        }
        async fn block_status(
            &self,
            offset: u64,
            len: u64,
        ) -> shale_block::Result<Vec<shale_block::Extent>> {
            Ok(vec![shale_block::Extent {
                offset,
                length: len,
                kind: shale_block::ExtentKind::Data,
            }])
        }
    }

    #[tokio::test]
    async fn unaligned_byte_io_matches_a_model() {
        let size = 3 * IO_CHUNK as usize + 4096;
        let dev = Mem(parking_lot::Mutex::new(vec![0u8; size]));
        let mut model = vec![0u8; size];
        let cases: [(usize, usize); 6] = [
            (0, 512),
            (1, 1),
            (511, 2),
            (1000, 70_000),
            (IO_CHUNK as usize - 3, IO_CHUNK as usize + 10),
            (size - 7, 7),
        ];
        for (i, &(off, len)) in cases.iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|j| (i * 31 + j * 7) as u8 | 1).collect();
            write_bytes(&dev, off as u64, &data, true).await.unwrap();
            model[off..off + len].copy_from_slice(&data);
            assert_eq!(*dev.0.lock(), model, "after write {i}");
            let back = read_bytes(&dev, off as u64, len as u64).await.unwrap();
            assert_eq!(back, data);
        }
        let e = write_bytes(&dev, size as u64 - 1, &[1, 2], false)
            .await
            .unwrap_err();
        assert!(matches!(e, BlockError::OutOfRange { .. }));
        assert!(read_bytes(&dev, u64::MAX, 2).await.is_err());
        assert!(read_bytes(&dev, 5, 0).await.unwrap().is_empty());
    }

    #[test]
    fn paths_normalize() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
        assert_eq!(align_up(1, 512), 512);
        assert_eq!(align_up(512, 512), 512);
        assert_eq!(align_down(1023, 512), 512);
    }
}
