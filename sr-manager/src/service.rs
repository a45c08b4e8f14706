//! The gRPC service: the `Shale` API of `proto/shale.proto` on top of a [`Host`].
//!
//! Each handler parses its request (references, sizes), calls the host, and converts the result to the wire
//! types; errors become statuses through `From<SrError> for Status` in one place ([`crate::error`]).

use std::path::PathBuf;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::driver::{Capabilities, SrCreateOptions};
use crate::error::SrError;
use crate::export::NbdFrontend;
use crate::host::{Host, Named, SrView, VdiView, MAX_IO};
use crate::proto::{self, shale_server::Shale};

/// The tonic service; cheap to clone (the host is shared).
#[derive(Clone)]
pub struct ShaleService {
    host: Arc<Host>,
    socket: PathBuf,
    /// The NBD front end, when the daemon runs one (`VdiExport`/`NbdList` need it).
    nbd: Option<Arc<NbdFrontend>>,
}

impl ShaleService {
    /// Serve `host`; `socket` is only reported by `HostInfo`.
    pub fn new(host: Arc<Host>, socket: PathBuf) -> Self {
        ShaleService {
            host,
            socket,
            nbd: None,
        }
    }

    /// Report NBD exports and connections of `nbd` (the daemon's NBD server).
    pub fn with_nbd(mut self, nbd: Arc<NbdFrontend>) -> Self {
        self.nbd = Some(nbd);
        self
    }

    fn nbd(&self) -> Result<&NbdFrontend, Status> {
        self.nbd
            .as_deref()
            .ok_or_else(|| Status::unavailable("this daemon does not run an NBD server"))
    }

    /// The tonic server wrapper, with message limits raised for scripted reads/writes of up to [`MAX_IO`].
    pub fn into_server(self) -> proto::shale_server::ShaleServer<ShaleService> {
        let limit = MAX_IO as usize + (1 << 20);
        proto::shale_server::ShaleServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }
}

fn caps(c: Capabilities) -> proto::Capabilities {
    proto::Capabilities {
        thin: c.thin,
        snapshot: c.snapshot,
        clone: c.clone,
        revert: c.revert,
        resize_grow: c.resize_grow,
        resize_shrink: c.resize_shrink,
        digest: c.digest,
        check: c.check,
        gc: c.gc,
        offloaded_snapshots: c.offloaded_snapshots,
        changed_blocks: c.changed_blocks,
    }
}

/// Wire form of an SR.
pub fn sr_to_proto(v: SrView) -> proto::Sr {
    let stats = v.stats.clone();
    proto::Sr {
        uuid: v.record.uuid.to_string(),
        name: v.record.name,
        r#type: v.record.sr_type,
        path: v.record.path.display().to_string(),
        status: sr_status(
            v.unavailable.as_deref(),
            v.detached,
            stats.as_ref().and_then(|s| s.metadata_error.as_deref()),
        ),
        cluster_size: stats.as_ref().map(|s| s.cluster_size).unwrap_or(0),
        capacity: stats.as_ref().and_then(|s| s.capacity),
        allocated_bytes: stats.as_ref().map(|s| s.allocated_bytes).unwrap_or(0),
        free_bytes: stats.as_ref().and_then(|s| s.free_bytes),
        reclaimed_bytes: stats.as_ref().map(|s| s.reclaimed_bytes).unwrap_or(0),
        gc_pending: stats.as_ref().map(|s| s.gc_pending).unwrap_or(0),
        vdis: stats.as_ref().map(|s| s.vdis as u64).unwrap_or(0),
        snapshots: stats.as_ref().map(|s| s.snapshots as u64).unwrap_or(0),
        metadata_reads: stats.as_ref().map(|s| s.metadata_reads).unwrap_or(0),
        capabilities: Some(caps(v.capabilities)),
        created: v.record.created,
    }
}

/// An SR's one-line status: attached, degraded (a metadata write failed, so it refuses changes until attached
/// again), detached on purpose (the reason says how to attach it), or unavailable and why.
fn sr_status(unavailable: Option<&str>, detached: bool, metadata_error: Option<&str>) -> String {
    match (unavailable, metadata_error) {
        (Some(reason), _) if detached => reason.to_string(),
        (None, None) => "attached".into(),
        (None, Some(e)) => format!(
            "degraded: a metadata write failed ({}); no changes until the SR is attached again (`shale sr \
             detach` and `shale sr attach` once there is room)",
            if shale_snapshot::error::is_no_space(e) {
                "the filesystem is full"
            } else {
                e
            }
        ),
        (Some(reason), _) => format!("unavailable: {reason}"),
    }
}

fn named(n: Named) -> proto::ObjectRef {
    proto::ObjectRef {
        uuid: n.uuid.to_string(),
        name: n.name,
    }
}

/// Wire form of a VDI or snapshot.
pub fn vdi_to_proto(v: VdiView) -> proto::Vdi {
    proto::Vdi {
        uuid: v.info.uuid.to_string(),
        name: v.info.name,
        sr_uuid: v.sr_uuid.to_string(),
        sr_name: v.sr_name,
        kind: v.info.kind.as_str().into(),
        size: v.info.size,
        allocated_bytes: v.info.allocated_bytes,
        parent: v.parent.map(named),
        snapshot_of: v.snapshot_of.map(named),
        snapshots: v.snapshots.into_iter().map(named).collect(),
        clones: v.clones.into_iter().map(named).collect(),
        hidden: v.info.hidden,
        read_only: v.info.read_only,
        created: v.info.created,
    }
}

fn required<'a>(what: &str, s: &'a str) -> Result<&'a str, Status> {
    let s = s.trim();
    if s.is_empty() {
        return Err(SrError::InvalidArgument(format!("{what} is required")).into());
    }
    Ok(s)
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Shale for ShaleService {
    async fn host_info(
        &self,
        _req: Request<proto::HostInfoRequest>,
    ) -> Reply<proto::HostInfoReply> {
        Ok(Response::new(proto::HostInfoReply {
            version: env!("CARGO_PKG_VERSION").into(),
            state_dir: self.host.state_dir().display().to_string(),
            socket: self.socket.display().to_string(),
            pid: std::process::id(),
            sr_types: self.host.sr_types(),
        }))
    }

    async fn sr_create(&self, req: Request<proto::SrCreateRequest>) -> Reply<proto::Sr> {
        let r = req.into_inner();
        let name = required("SR name", &r.name)?;
        let path = required("SR path", &r.path)?;
        let sr_type = if r.r#type.is_empty() {
            crate::host::DEFAULT_SR_TYPE
        } else {
            r.r#type.as_str()
        };
        let opts = SrCreateOptions {
            cluster_size: (r.cluster_size != 0).then_some(r.cluster_size),
            capacity: r.capacity,
        };
        let v = self
            .host
            .sr_create(name, sr_type, std::path::Path::new(path), &opts)
            .await?;
        Ok(Response::new(sr_to_proto(v)))
    }

    async fn sr_list(&self, _req: Request<proto::SrListRequest>) -> Reply<proto::SrListReply> {
        let srs = self
            .host
            .sr_list()
            .await
            .into_iter()
            .map(sr_to_proto)
            .collect();
        Ok(Response::new(proto::SrListReply { srs }))
    }

    async fn sr_show(&self, req: Request<proto::SrRef>) -> Reply<proto::Sr> {
        let r = req.into_inner();
        let v = self.host.sr_show(required("SR", &r.sr)?).await?;
        Ok(Response::new(sr_to_proto(v)))
    }

    async fn sr_destroy(
        &self,
        req: Request<proto::SrDestroyRequest>,
    ) -> Reply<proto::SrDestroyReply> {
        let r = req.into_inner();
        let rec = self
            .host
            .sr_destroy(required("SR", &r.sr)?, r.force)
            .await?;
        Ok(Response::new(proto::SrDestroyReply {
            uuid: rec.uuid.to_string(),
            name: rec.name,
        }))
    }

    async fn sr_detach(&self, req: Request<proto::SrRef>) -> Reply<proto::Sr> {
        let r = req.into_inner();
        let v = self.host.sr_detach(required("SR", &r.sr)?).await?;
        Ok(Response::new(sr_to_proto(v)))
    }

    async fn sr_attach(&self, req: Request<proto::SrRef>) -> Reply<proto::Sr> {
        let r = req.into_inner();
        let v = self.host.sr_attach(required("SR", &r.sr)?).await?;
        Ok(Response::new(sr_to_proto(v)))
    }

    async fn sr_check(&self, req: Request<proto::SrRef>) -> Reply<proto::SrCheckReply> {
        let r = req.into_inner();
        let (rec, rep) = self.host.sr_check(required("SR", &r.sr)?).await?;
        Ok(Response::new(proto::SrCheckReply {
            sr: rec.name,
            ok: rep.ok(),
            problems: rep.problems,
            mapped_clusters: rep.mapped_clusters,
            partial_entries: rep.partial_entries,
            free_clusters: rep.free_clusters,
            objects: rep.objects as u64,
        }))
    }

    async fn sr_gc(&self, req: Request<proto::SrRef>) -> Reply<proto::SrGcReply> {
        let r = req.into_inner();
        let (rec, bytes) = self.host.sr_gc(required("SR", &r.sr)?).await?;
        Ok(Response::new(proto::SrGcReply {
            sr: rec.name,
            reclaimed_bytes: bytes,
        }))
    }

    async fn vdi_create(&self, req: Request<proto::VdiCreateRequest>) -> Reply<proto::Vdi> {
        let r = req.into_inner();
        let name = required("VDI name", &r.name)?;
        let v = self
            .host
            .vdi_create(Some(r.sr.as_str()), name, r.size)
            .await?;
        Ok(Response::new(vdi_to_proto(v)))
    }

    async fn vdi_list(&self, req: Request<proto::VdiListRequest>) -> Reply<proto::VdiListReply> {
        let r = req.into_inner();
        let vdis = self.host.vdi_list(Some(r.sr.as_str()), r.all).await?;
        Ok(Response::new(proto::VdiListReply {
            vdis: vdis.into_iter().map(vdi_to_proto).collect(),
        }))
    }

    async fn vdi_show(&self, req: Request<proto::VdiRef>) -> Reply<proto::Vdi> {
        let r = req.into_inner();
        Ok(Response::new(vdi_to_proto(
            self.host.vdi_show(required("VDI", &r.vdi)?).await?,
        )))
    }

    async fn vdi_resize(&self, req: Request<proto::VdiResizeRequest>) -> Reply<proto::Vdi> {
        let r = req.into_inner();
        let v = self
            .host
            .vdi_resize(required("VDI", &r.vdi)?, r.size, r.allow_shrink)
            .await?;
        Ok(Response::new(vdi_to_proto(v)))
    }

    async fn vdi_snapshot(&self, req: Request<proto::VdiSnapshotRequest>) -> Reply<proto::Vdi> {
        let r = req.into_inner();
        let v = self
            .host
            .vdi_snapshot(
                required("VDI", &r.vdi)?,
                required("snapshot name", &r.name)?,
            )
            .await?;
        Ok(Response::new(vdi_to_proto(v)))
    }

    async fn vdi_clone(&self, req: Request<proto::VdiCloneRequest>) -> Reply<proto::Vdi> {
        let r = req.into_inner();
        let v = self
            .host
            .vdi_clone(
                required("snapshot", &r.snapshot)?,
                required("clone name", &r.name)?,
            )
            .await?;
        Ok(Response::new(vdi_to_proto(v)))
    }

    async fn vdi_revert(&self, req: Request<proto::VdiRevertRequest>) -> Reply<proto::Vdi> {
        let r = req.into_inner();
        let v = self
            .host
            .vdi_revert(required("VDI", &r.vdi)?, required("snapshot", &r.snapshot)?)
            .await?;
        Ok(Response::new(vdi_to_proto(v)))
    }

    async fn vdi_destroy(&self, req: Request<proto::VdiRef>) -> Reply<proto::VdiDestroyReply> {
        let r = req.into_inner();
        let (before, after) = self.host.vdi_destroy(required("VDI", &r.vdi)?).await?;
        Ok(Response::new(proto::VdiDestroyReply {
            uuid: before.uuid.to_string(),
            name: before.name,
            hidden: after.map(|a| a.hidden).unwrap_or(false),
        }))
    }

    async fn vdi_digest(&self, req: Request<proto::VdiRef>) -> Reply<proto::VdiDigestReply> {
        let r = req.into_inner();
        let (vdi, digest) = self.host.vdi_digest(required("VDI", &r.vdi)?).await?;
        Ok(Response::new(proto::VdiDigestReply {
            uuid: vdi.uuid.to_string(),
            name: vdi.name,
            digest,
            size: vdi.size,
        }))
    }

    async fn vdi_diff(&self, req: Request<proto::VdiDiffRequest>) -> Reply<proto::VdiDiffReply> {
        let r = req.into_inner();
        let (vdi, from, ch) = self
            .host
            .vdi_diff(required("VDI", &r.vdi)?, required("snapshot", &r.from)?)
            .await?;
        Ok(Response::new(proto::VdiDiffReply {
            vdi: Some(named(Named {
                uuid: vdi.uuid,
                name: vdi.name,
            })),
            from: Some(named(Named {
                uuid: from.uuid,
                name: from.name,
            })),
            size: ch.size,
            granularity: ch.granularity,
            changed_bytes: ch.changed_bytes(),
            extents: ch
                .extents
                .iter()
                .map(|&(offset, length)| proto::Extent { offset, length })
                .collect(),
        }))
    }

    async fn vdi_write(&self, req: Request<proto::VdiWriteRequest>) -> Reply<proto::VdiWriteReply> {
        let r = req.into_inner();
        if r.data.len() as u64 > MAX_IO {
            return Err(SrError::InvalidArgument(format!(
                "a single write is limited to {MAX_IO} bytes"
            ))
            .into());
        }
        let written = self
            .host
            .write(required("VDI", &r.vdi)?, r.offset, &r.data, r.flush)
            .await?;
        Ok(Response::new(proto::VdiWriteReply { written }))
    }

    async fn vdi_read(&self, req: Request<proto::VdiReadRequest>) -> Reply<proto::VdiReadReply> {
        let r = req.into_inner();
        if r.length > MAX_IO {
            return Err(SrError::InvalidArgument(format!(
                "a single read is limited to {MAX_IO} bytes"
            ))
            .into());
        }
        let data = self
            .host
            .read(required("VDI", &r.vdi)?, r.offset, r.length)
            .await?;
        Ok(Response::new(proto::VdiReadReply { data }))
    }

    async fn vdi_export(&self, req: Request<proto::VdiRef>) -> Reply<proto::VdiExportReply> {
        let r = req.into_inner();
        let reply = self
            .nbd()?
            .vdi_export(&self.host, required("VDI", &r.vdi)?)
            .await?;
        Ok(Response::new(reply))
    }

    async fn nbd_list(&self, _req: Request<proto::NbdListRequest>) -> Reply<proto::NbdListReply> {
        Ok(Response::new(self.nbd()?.list().await))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every capability reaches the wire, offloaded snapshots (the reflink type's) included.
    #[test]
    fn capabilities_reach_the_wire() {
        let c = caps(Capabilities {
            snapshot: true,
            clone: true,
            offloaded_snapshots: true,
            ..Default::default()
        });
        assert!(c.snapshot && c.clone && c.offloaded_snapshots && !c.thin);
        assert!(!caps(Capabilities::default()).offloaded_snapshots);
    }

    /// A failed metadata write shows in the status, in words a user can act on.
    #[test]
    fn degraded_status() {
        assert_eq!(sr_status(None, false, None), "attached");
        let full = sr_status(
            None,
            false,
            Some("IO error: No space left on device: While appending to file: meta/000009.log"),
        );
        assert!(full.starts_with("degraded: a metadata write failed (the filesystem is full)"));
        assert!(full.contains("shale sr attach"), "{full}");
        assert!(sr_status(None, false, Some("IO error: EIO")).contains("(IO error: EIO)"));
        assert_eq!(sr_status(Some("gone"), false, None), "unavailable: gone");
        assert_eq!(
            sr_status(
                Some("detached (`shale sr attach x` attaches it again)"),
                true,
                None
            ),
            "detached (`shale sr attach x` attaches it again)"
        );
    }
}
