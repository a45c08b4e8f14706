//! NBD export of every VDI and snapshot of a [`Host`]: the daemon's NBD front end.
//!
//! # Export names
//! Every VDI and (non-hidden) snapshot of every attached SR is exported, under three names:
//! - `SR/NAME` — always unique; this is the *canonical* name, the one `NBD_OPT_LIST` shows, the one reported
//!   back in `NBD_INFO_NAME` and the one `shale nbd list` shows for connections;
//! - the object's UUID — stable across renames;
//! - the bare `NAME` — only while exactly one SR holds an object of that name (the same rule as the CLI's
//!   addressing, [`Host::resolve`]); an ambiguous bare name is answered as an unknown export.
//!
//! The empty (default) export name selects the host's only object, when it has exactly one.
//!
//! VDIs are exported read-write, snapshots read-only (writes get `EPERM`).
//!
//! # Changed blocks
//! An export also offers `qemu:dirty-bitmap:SNAPSHOT` metadata contexts, one per snapshot it can be compared
//! with ([`AttachedSr::comparable`]): block status in such a context marks what changed since that snapshot,
//! as `shale vdi diff` lists it, so NBD backup clients copy only that.
//!
//! # Why lazily opened
//! The engine refuses to destroy or revert a volume while a handle to it is open, so exports are not opened up
//! front: [`HostExports`] implements [`ExportSource`] and opens the volume when a client selects it
//! (`NBD_OPT_GO`/`EXPORT_NAME`). The connection owns the only handle and drops it when it ends, so a VDI is
//! "in use" exactly while an NBD client is connected to it, and exports appear and disappear with the VDIs
//! without the daemon having to keep a registry in sync.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use shale_block::nbd::{
    ConnectionInfo, DirtyBitmaps, Export, ExportSource, ExportSummary, ListenAddr, NbdServer,
    ServerConfig, ServerTls, ServerTlsConfig, TlsPolicy,
};
use shale_block::BlockError;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::driver::{AttachedSr, VdiInfo, VdiKind};
use crate::error::{Result, SrError};
use crate::host::Host;
use crate::proto;

/// The TCP address `shale serve` listens on for NBD unless told otherwise (the IANA NBD port, loopback only).
pub const DEFAULT_NBD_TCP: &str = "127.0.0.1:10809";

/// File name of the NBD Unix socket inside the state directory.
pub const NBD_SOCKET_NAME: &str = "nbd.sock";

/// How long a clean shutdown waits for NBD clients to finish their in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Canonical export name of an object: `SR/NAME`.
pub fn canonical_name(sr_name: &str, vdi_name: &str) -> String {
    format!("{sr_name}/{vdi_name}")
}

/// An [`ExportSource`] over a [`Host`]: resolves names on demand and opens the volume per connection.
pub struct HostExports {
    host: Arc<Host>,
}

impl HostExports {
    /// Export every VDI and snapshot of `host`.
    pub fn new(host: Arc<Host>) -> Self {
        HostExports { host }
    }

    fn description(sr: &str, v: &VdiInfo) -> String {
        let access = if v.read_only || v.kind == VdiKind::Snapshot {
            "read-only"
        } else {
            "read-write"
        };
        format!(
            "{} {} in SR {sr} ({access}; also exported as {})",
            v.kind.as_str(),
            v.name,
            v.uuid
        )
    }

    /// Open the object `name` refers to, as an export named canonically.
    async fn open(&self, name: &str) -> Result<Arc<Export>> {
        let name = if name.is_empty() {
            // The default export: only meaningful when there is exactly one object.
            let all = self.host.exports().await;
            match all.as_slice() {
                [(canonical, ..)] => canonical.clone(),
                _ => {
                    return Err(SrError::InvalidArgument(
                        "no default export: name one".into(),
                    ))
                }
            }
        } else {
            name.to_string()
        };
        let r = self.host.resolve(&name, None).await?;
        if r.vdi.hidden {
            return Err(SrError::VdiNotFound(name, String::new()));
        }
        let dev = r.sr.open(r.vdi.uuid)?;
        let read_only = r.vdi.read_only || r.vdi.kind == VdiKind::Snapshot || dev.read_only();
        let export = Export::new(canonical_name(&r.record.name, &r.vdi.name), dev)
            .with_description(Self::description(&r.record.name, &r.vdi))
            .read_only(read_only)
            .with_bitmaps(Arc::new(SnapshotBitmaps {
                sr: r.sr.clone(),
                object: r.vdi.uuid,
            }));
        Ok(Arc::new(export))
    }
}

/// The changed blocks of an exported VDI or snapshot since each snapshot it can be compared with (a snapshot of
/// the same VDI taken before it, or the snapshot it was cloned from or reverted to), offered over NBD as
/// `qemu:dirty-bitmap:SNAPSHOT` contexts: the `shale vdi diff` answer for backup clients that speak NBD. The
/// snapshots are looked up only when a client asks about metadata contexts, not on every connection.
struct SnapshotBitmaps {
    sr: Arc<dyn AttachedSr>,
    object: Uuid,
}

impl SnapshotBitmaps {
    /// (snapshot name, uuid) of every snapshot the object compares with, oldest first.
    fn bases(&self) -> Vec<(String, Uuid)> {
        self.sr
            .list()
            .into_iter()
            .filter(|s| s.kind == VdiKind::Snapshot && !s.hidden && s.uuid != self.object)
            .filter(|s| self.sr.comparable(s.uuid, self.object))
            .map(|s| (s.name, s.uuid))
            .collect()
    }
}

#[async_trait]
impl DirtyBitmaps for SnapshotBitmaps {
    fn names(&self) -> Vec<String> {
        self.bases().into_iter().map(|(n, _)| n).collect()
    }

    async fn extents(&self, name: &str) -> std::result::Result<Vec<(u64, u64)>, BlockError> {
        let (_, from) = self
            .bases()
            .into_iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| BlockError::Other(format!("no dirty bitmap {name:?}")))?;
        self.sr
            .changes(from, self.object)
            .await
            .map(|c| c.extents)
            .map_err(|e| BlockError::Other(e.to_string()))
    }
}

#[async_trait]
impl ExportSource for HostExports {
    async fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        match self.open(name).await {
            Ok(e) => {
                debug!(requested = %name, export = %e.name, "NBD export opened");
                Some(e)
            }
            Err(e) => {
                info!(export = %name, error = %e, "NBD export not available");
                None
            }
        }
    }

    async fn list(&self) -> Vec<ExportSummary> {
        self.host
            .exports()
            .await
            .into_iter()
            .map(|(canonical, record, vdi)| ExportSummary {
                name: canonical,
                description: Self::description(&record.name, &vdi),
                size: vdi.size,
                read_only: vdi.read_only || vdi.kind == VdiKind::Snapshot,
            })
            .collect()
    }
}

/// Where the NBD front end listens.
#[derive(Debug, Clone, Default)]
pub struct NbdOptions {
    /// Unix socket path; `None` = no Unix listener.
    pub unix: Option<PathBuf>,
    /// TCP address; `None` = no TCP listener.
    pub tcp: Option<String>,
    /// How many I/O threads serve NBD connections (each connection stays on one, with its own io_uring ring);
    /// `None` = the server's default, half the cores up to four, since on a hyperconverged host the clients
    /// (VMs, a loopback backup job) share the cores.
    pub io_threads: Option<usize>,
    /// Serve TLS with these credentials: required on TCP, offered on the Unix socket (whose file permissions
    /// already decide who connects). None: no TLS.
    pub tls: Option<NbdTlsFiles>,
}

/// PEM files of the NBD server's TLS credentials.
#[derive(Debug, Clone)]
pub struct NbdTlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// The certificate's private key.
    pub key: PathBuf,
    /// CA certificates that clients' certificates must chain to; None: clients need no certificate.
    pub client_ca: Option<PathBuf>,
}

/// The daemon's NBD front end: the server over [`HostExports`] and its listeners.
pub struct NbdFrontend {
    server: NbdServer,
    unix: Option<ListenAddr>,
    tcp: Option<ListenAddr>,
    /// TCP clients must use TLS (the URIs say `nbds://`).
    tcp_tls: bool,
}

impl NbdFrontend {
    /// Start the server and bind its listeners. A listener that cannot bind fails the start (a daemon that
    /// silently does not serve NBD would be worse than one that says why).
    pub async fn start(host: Arc<Host>, opts: &NbdOptions) -> Result<Arc<NbdFrontend>> {
        let mut config = ServerConfig::default();
        if let Some(n) = opts.io_threads {
            config.io_threads = n;
        }
        if let Some(t) = &opts.tls {
            let creds = ServerTls::from_pem_files(&t.cert, &t.key, t.client_ca.as_deref())
                .map_err(|e| SrError::InvalidArgument(format!("NBD TLS: {e}")))?;
            config.tls = Some(ServerTlsConfig {
                creds,
                tcp: TlsPolicy::Require,
                unix: TlsPolicy::Offer,
            });
        }
        let tcp_tls = opts.tls.is_some();
        let server = NbdServer::with_source(config, Arc::new(HostExports::new(host)));
        let mut unix = None;
        if let Some(path) = &opts.unix {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            // A socket file left by a crashed daemon; the state-directory lock says no live daemon owns it.
            if path.exists() {
                std::fs::remove_file(path)?;
            }
            let l = server.listen_unix(path).await.map_err(|e| {
                SrError::FailedPrecondition(format!(
                    "cannot listen for NBD on {}: {e}",
                    path.display()
                ))
            })?;
            unix = Some(l.local_addr().clone());
        }
        let mut tcp = None;
        if let Some(addr) = &opts.tcp {
            let l = server.listen_tcp(addr.as_str()).await.map_err(|e| {
                SrError::FailedPrecondition(format!(
                    "cannot listen for NBD on {addr}: {e} (choose another address with --nbd-listen, or --no-nbd-tcp)"
                ))
            })?;
            tcp = Some(l.local_addr().clone());
        }
        info!(
            unix = ?unix.as_ref().map(|a| a.to_string()),
            tcp = ?tcp.as_ref().map(|a| a.to_string()),
            tls = tcp_tls,
            "NBD exports served"
        );
        Ok(Arc::new(NbdFrontend {
            server,
            unix,
            tcp,
            tcp_tls,
        }))
    }

    /// The underlying server.
    pub fn server(&self) -> &NbdServer {
        &self.server
    }

    /// The URIs a client uses to reach `export`: TCP first (`nbds://` when TLS is required there), then Unix.
    pub fn uris(&self, export: &str) -> Vec<String> {
        let tcp = self.tcp.iter().map(|a| a.uri_tls(export, self.tcp_tls));
        tcp.chain(self.unix.iter().map(|a| a.uri(export))).collect()
    }

    /// The listeners, as `tcp:ADDR` / `unix:PATH` (`tcp+tls:ADDR` when TLS is required there).
    pub fn listeners(&self) -> Vec<String> {
        let tcp = self.tcp.iter().map(|a| match self.tcp_tls {
            true => format!("tcp+tls:{}", a.to_string().trim_start_matches("tcp:")),
            false => a.to_string(),
        });
        tcp.chain(self.unix.iter().map(|a| a.to_string())).collect()
    }

    /// Stop accepting, close every connection once its in-flight requests are answered, and wait (bounded) for
    /// them to go, so the volumes they hold are closed before the SRs are detached.
    pub async fn shutdown(&self) {
        self.server.shutdown();
        if tokio::time::timeout(DRAIN_TIMEOUT, self.server.wait_idle())
            .await
            .is_err()
        {
            warn!(
                open = self.server.connections().len(),
                "NBD connections still open after the drain timeout"
            );
        } else {
            info!("NBD connections drained");
        }
    }

    /// The `VdiExport` reply for an object of `host`.
    pub async fn vdi_export(&self, host: &Host, vdi_ref: &str) -> Result<proto::VdiExportReply> {
        let r = host.resolve(vdi_ref, None).await?;
        if r.vdi.hidden {
            return Err(SrError::VdiNotFound(vdi_ref.to_string(), String::new()));
        }
        let canonical = canonical_name(&r.record.name, &r.vdi.name);
        // The bare name is an alias only while it is unique across SRs.
        let unique = host
            .exports()
            .await
            .iter()
            .filter(|(_, _, v)| v.name == r.vdi.name)
            .count()
            == 1;
        let mut names = Vec::new();
        if unique {
            names.push(r.vdi.name.clone());
        }
        names.push(canonical.clone());
        names.push(r.vdi.uuid.to_string());
        let preferred = names[0].clone();
        Ok(proto::VdiExportReply {
            uuid: r.vdi.uuid.to_string(),
            name: r.vdi.name.clone(),
            sr_name: r.record.name.clone(),
            export_names: names,
            read_only: r.vdi.read_only || r.vdi.kind == VdiKind::Snapshot,
            size: r.vdi.size,
            tcp_uri: self
                .tcp
                .as_ref()
                .map(|a| a.uri_tls(&preferred, self.tcp_tls)),
            unix_uri: self.unix.as_ref().map(|a| a.uri(&preferred)),
            uris: self.uris(&preferred),
        })
    }

    /// The `NbdList` reply: every export and every live connection.
    pub async fn list(&self) -> proto::NbdListReply {
        let exports = self
            .server
            .exports()
            .await
            .into_iter()
            .map(|e| proto::NbdExport {
                name: e.name,
                description: e.description,
                size: e.size,
                read_only: e.read_only,
            })
            .collect();
        let connections = self
            .server
            .connections()
            .into_iter()
            .map(connection_to_proto)
            .collect();
        proto::NbdListReply {
            listeners: self.listeners(),
            exports,
            connections,
        }
    }
}

fn connection_to_proto(c: ConnectionInfo) -> proto::NbdConnection {
    proto::NbdConnection {
        id: c.id,
        peer: c.peer,
        export: c.export.unwrap_or_default(),
        connected_at: c
            .connected_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        structured: c.structured,
        extended: c.extended,
        reads: c.reads,
        writes: c.writes,
        bytes_read: c.bytes_read,
        bytes_written: c.bytes_written,
        flushes: c.flushes,
        errors: c.errors,
        in_flight: c.in_flight,
        tls: c.tls,
    }
}
