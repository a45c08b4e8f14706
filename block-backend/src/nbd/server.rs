//! The NBD server: exports [`BlockDevice`]s over Unix sockets and TCP.
//!
//! # Shape
//! - [`NbdServer`] holds an [`ExportSource`] (by default its own [`ExportRegistry`], which the daemon fills and
//!   empties at runtime), the live connections and their statistics ([`NbdServer::connections`]), and the
//!   listeners ([`NbdServer::listen_unix`], [`NbdServer::listen_tcp`]).
//! - Connections run on the server's [I/O threads](crate::iothread) (round-robin; [`ServerConfig::io_threads`]):
//!   a connection's socket I/O, its requests and their data I/O (on the thread's own io_uring ring) never leave
//!   that thread. Measured on 4k QD32 reads this halved the server's CPU per request and removed the wake-up
//!   latency that had left a third of the machine idle (`tools/bench/RESULTS-nbd.md`).
//! - Each connection runs a fixed newstyle handshake, then splits into a *reader* (this connection's task),
//!   whose requests run as futures polled by the same task (a `FuturesUnordered`, no spawn per request), and one
//!   *writer* task that serialises replies. Replies go out in completion order, so a slow request never blocks
//!   fast ones; the writer batches whatever replies are ready into one vectored write.
//! - In-flight work per connection is bounded by a semaphore counted in 4 KiB units of payload (at least one
//!   per request), so a client cannot make the server buffer unbounded data.
//!
//! # TLS
//! With [`ServerConfig::tls`], `NBD_OPT_STARTTLS` upgrades a connection in place ([`super::tls`]): the handshake
//! is acknowledged, the TLS handshake runs on the same socket (its halves joined), and option haggling starts
//! over with nothing negotiated in the clear carried over. Listeners that require TLS refuse every other option
//! with `NBD_REP_ERR_TLS_REQD` and hang up on `NBD_OPT_EXPORT_NAME`. A TLS connection's transmission runs the
//! same pipeline over the TLS stream's halves; only the TLS handshake and session are extra.
//!
//! # Extended headers
//! `NBD_OPT_EXTENDED_HEADERS` is accepted (qemu 8.2+ and libnbd 1.18+ ask for it first): requests and reply
//! chunks then have 32-byte headers, every reply is a chunk echoing the request's offset (`NONE` for success
//! without data), and trim, write-zeroes, cache and block status take 64-bit lengths, so a client can zero or
//! map a whole large export in one request; block status then answers with `BLOCK_STATUS_EXT` (64-bit
//! descriptor lengths). Reads and writes stay within the advertised maximum payload. A huge trim or
//! write-zeroes reaches the device as a sequence of 1 GiB calls ([`crate::semantics::EFFECT_SLICE`]). After extended headers,
//! `NBD_OPT_STRUCTURED_REPLY` gets `NBD_REP_ERR_EXT_HEADER_REQD` and `NBD_OPT_EXPORT_NAME` (which a client
//! MUST NOT send then, and which cannot be refused) ends the connection. One leniency: a write without
//! `NBD_CMD_FLAG_PAYLOAD_LEN` is taken as carrying its length of payload, because qemu 10's client sends
//! them so (qemu's server accepts them too); see [`codec::decode_request`].
//!
//! # Request life cycle
//! `read 28-byte (32 with extended headers) header → codec::decode_request (parse + validate) → acquire in-flight budget → read payload →
//! queue the execute future → reply to the writer → writer sends and releases the budget`. A refused request is answered
//! with its errno (after its payload is skipped) and the session continues; a frame that breaks framing (bad
//! magic, a write larger than the advertised maximum) ends only this connection, after every request already
//! accepted has completed and been answered, so no acknowledged write is lost.
//!
//! # Reads
//! With structured replies, a read of at least [`ServerConfig::sparse_read_min`] bytes asks the device for
//! block status alongside the data and sends holes and zero extents as `OFFSET_HOLE` chunks, so sparse images
//! copy without their zeroes crossing the wire. Smaller reads go as one data chunk: the extra status lookup
//! would cost more than it saves.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;

use futures::stream::{FuturesUnordered, StreamExt};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::codec::{self, ClientOption, Command, InfoReply, Negotiated, ProtocolError, Request};
use super::proto::*;
use super::tls::{Joined, ServerTls, TlsPolicy};
use super::NbdError;
use crate::buf::IoBuf;
use crate::device::{BlockDevice, DeviceInfo, Extent, ExtentKind};
use crate::error::{errno, BlockError};
use crate::iothread::IoThreads;
use crate::semantics::{self, Request as SemReq, Response};

/// Metadata context id Shale gives `base:allocation` after `NBD_OPT_SET_META_CONTEXT`.
const BASE_ALLOCATION_ID: u32 = 1;
/// Longest option data accepted during negotiation; real options are names and context queries (< 8 KiB).
const MAX_OPTION_DATA: u32 = 64 << 10;
/// Unit of the per-connection in-flight budget.
const BUDGET_UNIT: u64 = 4096;
/// Data chunks smaller than this are copied into the writer's header buffer instead of getting their own
/// iovec.
const COPY_THRESHOLD: usize = 2048;
/// Most iovecs handed to one `writev`.
const MAX_IOVECS: usize = 512;

/// One exported volume.
pub struct Export {
    /// Name clients select it by (the VDI or snapshot name).
    pub name: String,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`, `nbdinfo --list`).
    pub description: String,
    /// The volume.
    pub device: Arc<dyn BlockDevice>,
    /// Refuse writes even if the device accepts them (e.g. a snapshot, or an export made read-only by policy).
    pub read_only: bool,
    /// Changed-block maps offered as `qemu:dirty-bitmap:NAME` metadata contexts, if any.
    pub bitmaps: Option<Arc<dyn DirtyBitmaps>>,
}

/// The changed-block maps an export offers as qemu's `qemu:dirty-bitmap:NAME` metadata contexts, so backup
/// clients (`nbdinfo --map=qemu:dirty-bitmap:NAME`, qemu's `x-dirty-bitmap`, libnbd) learn over NBD what changed
/// since a point in time and copy only that.
///
/// A selected map is fetched once, when the client selects it (`NBD_OPT_SET_META_CONTEXT`), and answers every
/// `NBD_CMD_BLOCK_STATUS` of the connection from memory: a point-in-time answer, exact for a read-only export.
#[async_trait]
pub trait DirtyBitmaps: Send + Sync {
    /// The names offered (the `NAME` of `qemu:dirty-bitmap:NAME`).
    fn names(&self) -> Vec<String>;
    /// Bitmap `name`'s dirty byte ranges as sorted, non-overlapping (offset, length).
    async fn extents(&self, name: &str) -> Result<Vec<(u64, u64)>, BlockError>;
}

impl Export {
    /// An export of `device` under `name`, read-write unless the device itself is read-only.
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Self {
        Export {
            name: name.into(),
            description: String::new(),
            device,
            read_only: false,
            bitmaps: None,
        }
    }

    /// Offer changed-block maps as `qemu:dirty-bitmap:` contexts.
    pub fn with_bitmaps(mut self, bitmaps: Arc<dyn DirtyBitmaps>) -> Self {
        self.bitmaps = Some(bitmaps);
        self
    }

    fn bitmap_names(&self) -> Vec<String> {
        self.bitmaps.as_ref().map(|b| b.names()).unwrap_or_default()
    }

    /// Set the description.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Force the export read-only.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    fn is_read_only(&self, info: &DeviceInfo) -> bool {
        self.read_only || info.read_only
    }
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("read_only", &self.read_only)
            .field("info", &self.device.info())
            .finish()
    }
}

/// What `NBD_OPT_LIST` and `shale nbd list` show about an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// Export name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Writes are refused.
    pub read_only: bool,
}

impl ExportSummary {
    fn of(e: &Export) -> Self {
        let info = e.device.info();
        ExportSummary {
            name: e.name.clone(),
            description: e.description.clone(),
            size: info.size,
            read_only: e.is_read_only(&info),
        }
    }
}

/// Where the server finds exports by name.
///
/// The daemon can either fill an [`ExportRegistry`] (the default) or implement this trait to open volumes on
/// demand when a client asks for them.
#[async_trait]
pub trait ExportSource: Send + Sync + 'static {
    /// The export a client asked for, if it exists. The empty name is the "default export".
    async fn lookup(&self, name: &str) -> Option<Arc<Export>>;
    /// Every export, for `NBD_OPT_LIST`.
    async fn list(&self) -> Vec<ExportSummary>;
}

/// A name → export map, changed at runtime while clients are connected.
///
/// Removing an export stops new connections to it; connections already using it keep their device until they
/// disconnect or are closed with [`NbdServer::disconnect_export`].
#[derive(Default)]
pub struct ExportRegistry {
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
    default: RwLock<Option<String>>,
}

impl ExportRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add an export; fails if the name is taken.
    pub fn add(&self, export: Export) -> Result<Arc<Export>, NbdError> {
        let mut map = self.exports.write();
        if map.contains_key(&export.name) {
            return Err(NbdError::ExportExists(export.name));
        }
        let e = Arc::new(export);
        map.insert(e.name.clone(), e.clone());
        info!(export = %e.name, "NBD export added");
        Ok(e)
    }

    /// Add or replace an export, returning the one replaced.
    pub fn insert(&self, export: Export) -> Option<Arc<Export>> {
        let e = Arc::new(export);
        self.exports.write().insert(e.name.clone(), e)
    }

    /// Remove an export by name.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let r = self.exports.write().remove(name);
        if r.is_some() {
            info!(export = %name, "NBD export removed");
        }
        r
    }

    /// The export with this exact name.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.exports.read().get(name).cloned()
    }

    /// Choose which export the empty name selects (by default: the only export, when there is exactly one).
    pub fn set_default(&self, name: Option<String>) {
        *self.default.write() = name;
    }

    /// Every export, sorted by name.
    pub fn summaries(&self) -> Vec<ExportSummary> {
        self.exports
            .read()
            .values()
            .map(|e| ExportSummary::of(e))
            .collect()
    }

    /// Resolve a client's name: exact match, or for the empty name the configured default or the only export.
    pub fn resolve(&self, name: &str) -> Option<Arc<Export>> {
        if let Some(e) = self.get(name) {
            return Some(e);
        }
        if !name.is_empty() {
            return None;
        }
        if let Some(d) = self.default.read().as_deref() {
            return self.get(d);
        }
        let map = self.exports.read();
        if map.len() == 1 {
            map.values().next().cloned()
        } else {
            None
        }
    }
}

#[async_trait]
impl ExportSource for ExportRegistry {
    async fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        self.resolve(name)
    }
    async fn list(&self) -> Vec<ExportSummary> {
        self.summaries()
    }
}

/// Tunables of an [`NbdServer`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest read or write payload, advertised as the maximum block size (`NBD_INFO_BLOCK_SIZE`).
    pub max_payload: u32,
    /// Per-connection budget of payload bytes in flight (reads being served plus writes being applied).
    pub max_in_flight_bytes: u64,
    /// A client that has not finished negotiating by then is dropped.
    pub handshake_timeout: Duration,
    /// Reads at least this long report holes as `OFFSET_HOLE` chunks (structured replies only).
    pub sparse_read_min: u32,
    /// Socket buffer size for the reader.
    pub read_buffer: usize,
    /// Serve connections on this many [I/O threads](crate::iothread) (started at the first connection), each
    /// connection on one of them start to finish with its data I/O on that thread's own ring. 0 serves them on
    /// the runtime that accepted them, with data I/O through the shared engine's ring thread.
    pub io_threads: usize,
    /// TLS credentials and which listeners require TLS; None serves without TLS (`STARTTLS` is refused).
    pub tls: Option<ServerTlsConfig>,
}

/// The server's TLS credentials and, per kind of listener, whether TLS is required or only offered.
///
/// The spec lets a server choose its TLS mode per connection as long as it keeps it for the connection's life;
/// Shale chooses by listener, because a Unix socket is already guarded by its file's permissions and local
/// tools (qemu-img, a backup job on the host) should not need certificates, while TCP reaches other hosts.
#[derive(Debug, Clone)]
pub struct ServerTlsConfig {
    /// Certificate, key and optional client CA.
    pub creds: ServerTls,
    /// Policy for TCP connections.
    pub tcp: TlsPolicy,
    /// Policy for Unix-socket connections (and [`NbdServer::serve_stream`]).
    pub unix: TlsPolicy,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_in_flight_bytes: 128 << 20,
            handshake_timeout: Duration::from_secs(30),
            sparse_read_min: 64 << 10,
            read_buffer: 256 << 10,
            io_threads: crate::iothread::default_threads(),
            tls: None,
        }
    }
}

/// Where a listener accepts connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// TCP address.
    Tcp(SocketAddr),
    /// Unix socket path.
    Unix(PathBuf),
}

impl ListenAddr {
    /// The URI a client (qemu, libnbd tools, [`super::NbdClient::connect_uri`]) uses to reach `export` here.
    pub fn uri(&self, export: &str) -> String {
        self.uri_tls(export, false)
    }

    /// [`ListenAddr::uri`], with the TLS scheme (`nbds://`, `nbds+unix://`) when `tls`.
    pub fn uri_tls(&self, export: &str, tls: bool) -> String {
        let s = if tls { "s" } else { "" };
        match self {
            ListenAddr::Tcp(a) => format!("nbd{s}://{a}/{export}"),
            ListenAddr::Unix(p) => format!("nbd{s}+unix:///{export}?socket={}", p.display()),
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A running accept loop. Dropping it leaves the loop running (it ends with [`NbdServer::shutdown`]);
/// [`Listener::stop`] ends it early.
#[derive(Debug)]
pub struct Listener {
    addr: ListenAddr,
    task: JoinHandle<()>,
}

impl Listener {
    /// The bound address (with the real port when binding port 0).
    pub fn local_addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// The URI of `export` through this listener.
    pub fn uri(&self, export: &str) -> String {
        self.addr.uri(export)
    }

    /// Stop accepting (established connections continue).
    pub fn stop(self) {
        self.task.abort();
        if let ListenAddr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A snapshot of one client connection, for `shale nbd list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Server-unique connection id.
    pub id: u64,
    /// Peer address (`tcp:ip:port` or `unix`).
    pub peer: String,
    /// Export selected (None while negotiating).
    pub export: Option<String>,
    /// When the client connected.
    pub connected_at: SystemTime,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Extended headers negotiated (64-bit lengths; implies structured replies).
    pub extended: bool,
    /// The connection runs over TLS.
    pub tls: bool,
    /// Read requests served.
    pub reads: u64,
    /// Write requests served (write, trim, write-zeroes).
    pub writes: u64,
    /// Bytes returned by reads.
    pub bytes_read: u64,
    /// Bytes received in writes.
    pub bytes_written: u64,
    /// Flush requests served.
    pub flushes: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Requests currently executing or waiting to be answered.
    pub in_flight: u64,
}

#[derive(Default)]
struct ConnCounters {
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
}

struct ConnState {
    id: u64,
    peer: String,
    connected_at: SystemTime,
    export: Mutex<Option<String>>,
    structured: std::sync::atomic::AtomicBool,
    extended: std::sync::atomic::AtomicBool,
    tls: std::sync::atomic::AtomicBool,
    counters: ConnCounters,
    kick: Notify,
}

impl ConnState {
    fn snapshot(&self) -> ConnectionInfo {
        let c = &self.counters;
        ConnectionInfo {
            id: self.id,
            peer: self.peer.clone(),
            export: self.export.lock().clone(),
            connected_at: self.connected_at,
            structured: self.structured.load(Ordering::Relaxed),
            extended: self.extended.load(Ordering::Relaxed),
            tls: self.tls.load(Ordering::Relaxed),
            reads: c.reads.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            in_flight: c.in_flight.load(Ordering::Relaxed),
        }
    }
}

struct Inner {
    config: ServerConfig,
    source: Arc<dyn ExportSource>,
    registry: Option<Arc<ExportRegistry>>,
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_conn: AtomicU64,
    shutdown: watch::Sender<bool>,
    /// Signalled whenever a connection ends, for [`NbdServer::wait_idle`].
    conn_closed: Notify,
    /// The I/O threads connections run on (started at the first connection; None inside when disabled or
    /// they could not be started).
    io: std::sync::OnceLock<Option<IoThreads>>,
}

/// An NBD server: an export source, listeners, and live connections. Cheap to clone (shared state).
#[derive(Clone)]
pub struct NbdServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("connections", &self.inner.conns.lock().len())
            .finish()
    }
}

impl NbdServer {
    /// A server with its own empty [`ExportRegistry`] (reach it with [`NbdServer::registry`]).
    pub fn new(config: ServerConfig) -> Self {
        let reg = Arc::new(ExportRegistry::new());
        Self::build(config, reg.clone(), Some(reg))
    }

    /// A server that finds exports through `source` (e.g. opening VDIs on demand).
    pub fn with_source(config: ServerConfig, source: Arc<dyn ExportSource>) -> Self {
        Self::build(config, source, None)
    }

    fn build(
        mut config: ServerConfig,
        source: Arc<dyn ExportSource>,
        registry: Option<Arc<ExportRegistry>>,
    ) -> Self {
        // The in-flight budget must admit the largest single request.
        config.max_payload = config.max_payload.clamp(4096, u32::MAX - 8);
        config.max_in_flight_bytes = config
            .max_in_flight_bytes
            .max(u64::from(config.max_payload));
        let (shutdown, _) = watch::channel(false);
        NbdServer {
            inner: Arc::new(Inner {
                config,
                source,
                registry,
                conns: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(1),
                shutdown,
                conn_closed: Notify::new(),
                io: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The built-in registry (None when the server was built [`NbdServer::with_source`]).
    pub fn registry(&self) -> Option<&Arc<ExportRegistry>> {
        self.inner.registry.as_ref()
    }

    /// Add an export to the built-in registry.
    pub fn add_export(&self, export: Export) -> Result<Arc<Export>, NbdError> {
        match &self.inner.registry {
            Some(r) => r.add(export),
            None => Err(NbdError::Io(io::Error::other(
                "server uses an external export source",
            ))),
        }
    }

    /// Remove an export from the built-in registry; connected clients keep it until
    /// [`NbdServer::disconnect_export`].
    pub fn remove_export(&self, name: &str) -> Option<Arc<Export>> {
        self.inner.registry.as_ref().and_then(|r| r.remove(name))
    }

    /// Every export the source offers.
    pub async fn exports(&self) -> Vec<ExportSummary> {
        self.inner.source.list().await
    }

    /// Every live connection with its counters.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let mut v: Vec<_> = self
            .inner
            .conns
            .lock()
            .values()
            .map(|c| c.snapshot())
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Close every connection using `export` (after their in-flight requests finish); returns how many.
    pub fn disconnect_export(&self, export: &str) -> usize {
        let conns = self.inner.conns.lock();
        let mut n = 0;
        for c in conns.values() {
            if c.export.lock().as_deref() == Some(export) {
                c.kick.notify_one();
                n += 1;
            }
        }
        n
    }

    /// Stop listeners and close every connection once its in-flight requests are answered. Returns at once;
    /// await [`NbdServer::wait_idle`] to know when every connection is gone (e.g. before closing volumes).
    pub fn shutdown(&self) {
        let _ = self.inner.shutdown.send(true);
        for c in self.inner.conns.lock().values() {
            c.kick.notify_one();
        }
    }

    /// Wait until no connection is open (after [`NbdServer::shutdown`] or [`NbdServer::disconnect_export`]).
    pub async fn wait_idle(&self) {
        loop {
            let closed = self.inner.conn_closed.notified();
            if self.inner.conns.lock().is_empty() {
                return;
            }
            closed.await;
        }
    }

    /// Wait until no connection uses `export`, e.g. after [`NbdServer::disconnect_export`] and before deleting
    /// the volume.
    pub async fn wait_export_idle(&self, export: &str) {
        loop {
            let closed = self.inner.conn_closed.notified();
            let busy = self
                .inner
                .conns
                .lock()
                .values()
                .any(|c| c.export.lock().as_deref() == Some(export));
            if !busy {
                return;
            }
            closed.await;
        }
    }

    /// Listen on TCP (use `127.0.0.1:0` for an ephemeral port; the default for Shale is loopback only).
    pub async fn listen_tcp(&self, addr: impl tokio::net::ToSocketAddrs) -> io::Result<Listener> {
        let l = TcpListener::bind(addr).await?;
        self.serve_tcp(l)
    }

    /// [`NbdServer::listen_tcp`] past the bind. Not generic, like [`NbdServer::listen_unix_path`], and for the
    /// same reason.
    fn serve_tcp(&self, l: TcpListener) -> io::Result<Listener> {
        let local = l.local_addr()?;
        let server = self.clone();
        let mut stop = self.inner.shutdown.subscribe();
        info!(addr = %local, "NBD server listening on TCP");
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped(&mut stop) => break,
                    r = l.accept() => match r {
                        Ok((s, peer)) => {
                            if let Err(e) = s.set_nodelay(true) {
                                debug!(%peer, error = %e, "TCP_NODELAY failed");
                            }
                            server.dispatch(s, format!("tcp:{peer}"), Transport::Tcp, |s| tokio::net::TcpStream::from_std(s).map(|s| s.into_split()));
                        }
                        Err(e) => {
                            warn!(error = %e, "NBD accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        });
        Ok(Listener {
            addr: ListenAddr::Tcp(local),
            task,
        })
    }

    /// Listen on a Unix socket at `path` (a stale socket file there is replaced).
    pub async fn listen_unix(&self, path: impl AsRef<Path>) -> io::Result<Listener> {
        self.listen_unix_path(path.as_ref().to_path_buf())
    }

    /// [`NbdServer::listen_unix`] for one concrete path type. The connection pipeline below (accept loop,
    /// `dispatch`, `serve_split` and every request's future) is generic over the socket halves, so it is compiled
    /// in whichever crate instantiates it: kept behind this non-generic function, that is this crate, with its
    /// optimisation settings. (While `listen_unix` itself held the pipeline, the daemon's copy was compiled in
    /// `shale-sr` at the dev profile's opt-level 0, and the thin-VDI exports ran about twice the user-space CPU
    /// per request of the file export.)
    fn listen_unix_path(&self, path: PathBuf) -> io::Result<Listener> {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let l = UnixListener::bind(&path)?;
        let sock_path = path.clone();
        let server = self.clone();
        let mut stop = self.inner.shutdown.subscribe();
        info!(path = %path.display(), "NBD server listening on Unix socket");
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped(&mut stop) => break,
                    r = l.accept() => match r {
                        Ok((s, _)) => {
                            server.dispatch(s, "unix".into(), Transport::Unix, |s| tokio::net::UnixStream::from_std(s).map(|s| s.into_split()));
                        }
                        Err(e) => {
                            warn!(error = %e, "NBD accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
            let _ = std::fs::remove_file(&sock_path);
        });
        Ok(Listener {
            addr: ListenAddr::Unix(path),
            task,
        })
    }

    /// The I/O threads, started on first use; None when disabled or unavailable.
    fn io_threads(&self) -> Option<&IoThreads> {
        self.inner
            .io
            .get_or_init(|| {
                let n = self.inner.config.io_threads;
                if n == 0 {
                    return None;
                }
                match IoThreads::new("shale-nbd", n) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        warn!(error = %e, "cannot start NBD I/O threads; serving on the runtime");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// Serve an accepted socket: on an I/O thread when there are any, else on this runtime.
    fn dispatch<S, R, W>(
        &self,
        stream: S,
        peer: String,
        transport: Transport,
        rebuild: fn(S::Std) -> io::Result<(R, W)>,
    ) where
        S: IntoStd,
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        // Detach the socket from this runtime's reactor; `rebuild` registers it with the serving runtime's.
        let std = match stream.into_std() {
            Ok(std) => std,
            Err(e) => {
                warn!(error = %e, "NBD connection setup failed");
                return;
            }
        };
        let server = self.clone();
        let serve = async move {
            match rebuild(std) {
                Ok((rd, wr)) => server.serve_split(rd, wr, peer, transport).await,
                Err(e) => warn!(error = %e, "NBD connection setup failed"),
            }
        };
        match self.io_threads() {
            Some(io) => io.spawn(serve),
            None => drop(tokio::spawn(serve)),
        }
    }

    /// Serve one already-accepted connection (any byte stream: a socketpair, a tunnel) until it ends. TLS, when
    /// configured, follows the Unix-socket policy.
    ///
    /// Generic, so the connection pipeline is compiled in the calling crate, at that crate's opt-level (see the
    /// workspace `Cargo.toml`): the listeners use the non-generic paths instead, and so should a data-path caller.
    pub async fn serve_stream<S>(&self, stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        self.serve_split(rd, wr, peer, Transport::Unix).await
    }

    /// The TLS policy and credentials for a connection over `transport`.
    fn tls_for(&self, transport: Transport) -> (TlsPolicy, Option<&ServerTls>) {
        match &self.inner.config.tls {
            None => (TlsPolicy::Off, None),
            Some(t) => {
                let policy = match transport {
                    Transport::Tcp => t.tcp,
                    Transport::Unix => t.unix,
                };
                (policy, (policy != TlsPolicy::Off).then_some(&t.creds))
            }
        }
    }

    async fn serve_split<R, W>(&self, rd: R, wr: W, peer: String, transport: Transport)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            id,
            peer,
            connected_at: SystemTime::now(),
            export: Mutex::new(None),
            structured: Default::default(),
            extended: Default::default(),
            tls: Default::default(),
            counters: ConnCounters::default(),
            kick: Notify::new(),
        });
        self.inner.conns.lock().insert(id, state.clone());
        if *self.inner.shutdown.borrow() {
            state.kick.notify_one();
        }
        debug!(conn = id, peer = %state.peer, "NBD connection opened");
        let deadline = tokio::time::Instant::now() + self.inner.config.handshake_timeout;
        let (policy, creds) = self.tls_for(transport);
        let mut rd = BufReader::with_capacity(self.inner.config.read_buffer, rd);
        let mut wr = wr;
        let hs = bounded(&state, deadline, async {
            let cflags = greet(&mut rd, &mut wr).await?;
            let stage = match policy {
                TlsPolicy::Off => TlsStage::Unavailable,
                TlsPolicy::Offer => TlsStage::Offered,
                TlsPolicy::Require => TlsStage::Required,
            };
            negotiate(&self.inner, &state, &mut rd, &mut wr, cflags, stage).await
        })
        .await;
        match (hs, creds) {
            (Ok(Some(HandshakeEnd::Session(session))), _) => {
                self.transmit(&state, session, rd, wr).await;
            }
            (Ok(Some(HandshakeEnd::StartTls(cflags))), Some(creds)) => {
                self.serve_tls(&state, creds, deadline, cflags, rd, wr)
                    .await;
            }
            (Ok(_), _) => {}
            (Err(e), _) => debug!(conn = id, error = %e, "NBD handshake ended"),
        }
        self.inner.conns.lock().remove(&id);
        self.inner.conn_closed.notify_waiters();
        debug!(conn = id, "NBD connection closed");
    }

    /// After `STARTTLS` was acknowledged: the TLS handshake on the same connection, then option haggling over
    /// TLS from the start (nothing negotiated in the clear carries over), then transmission.
    async fn serve_tls<R, W>(
        &self,
        state: &Arc<ConnState>,
        creds: &ServerTls,
        deadline: tokio::time::Instant,
        cflags: codec::ClientFlags,
        rd: BufReader<R>,
        wr: W,
    ) where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        // The client waits for our ACK before its TLS hello: bytes already buffered were sent in the clear after
        // STARTTLS, which the spec forbids (and which an attacker could have injected).
        if !rd.buffer().is_empty() {
            debug!(
                conn = state.id,
                bytes = rd.buffer().len(),
                "NBD client sent cleartext after STARTTLS; closing"
            );
            return;
        }
        let joined = Joined {
            rd: rd.into_inner(),
            wr,
        };
        let stream = match bounded(state, deadline, async {
            creds.accept(joined).await.map_err(NbdError::from)
        })
        .await
        {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                info!(conn = state.id, peer = %state.peer, error = %e, "NBD TLS handshake failed");
                return;
            }
        };
        state.tls.store(true, Ordering::Relaxed);
        state.structured.store(false, Ordering::Relaxed);
        state.extended.store(false, Ordering::Relaxed);
        let (rd, mut wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(self.inner.config.read_buffer, rd);
        let hs = bounded(
            state,
            deadline,
            negotiate(
                &self.inner,
                state,
                &mut rd,
                &mut wr,
                cflags,
                TlsStage::Active,
            ),
        )
        .await;
        match hs {
            Ok(Some(HandshakeEnd::Session(session))) => self.transmit(state, session, rd, wr).await,
            Ok(_) => {}
            Err(e) => debug!(conn = state.id, error = %e, "NBD handshake over TLS ended"),
        }
    }

    async fn transmit<R, W>(
        &self,
        state: &Arc<ConnState>,
        session: Session,
        rd: BufReader<R>,
        wr: W,
    ) where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        info!(conn = state.id, peer = %state.peer, export = %session.export.name, tls = state.tls.load(Ordering::Relaxed), "NBD client entered transmission");
        transmission(&self.inner, state, session, rd, wr).await;
    }
}

/// What kind of listener a connection came from (each has its own TLS policy).
#[derive(Debug, Clone, Copy)]
enum Transport {
    Tcp,
    Unix,
}

/// Run a handshake step until the connection's handshake deadline, or until the connection is kicked (server
/// shutdown, export removed), which ends it quietly: `Ok(None)`.
async fn bounded<T>(
    state: &ConnState,
    deadline: tokio::time::Instant,
    step: impl Future<Output = Result<T, NbdError>>,
) -> Result<Option<T>, NbdError> {
    tokio::select! {
        r = tokio::time::timeout_at(deadline, step) => r.unwrap_or(Err(NbdError::Timeout)).map(Some),
        _ = state.kick.notified() => Ok(None),
    }
}

/// A tokio socket that can leave its runtime (to be re-registered on an I/O thread's).
trait IntoStd: Send + 'static {
    type Std: Send + 'static;
    fn into_std(self) -> io::Result<Self::Std>;
}

impl IntoStd for tokio::net::TcpStream {
    type Std = std::net::TcpStream;
    fn into_std(self) -> io::Result<Self::Std> {
        tokio::net::TcpStream::into_std(self)
    }
}

impl IntoStd for tokio::net::UnixStream {
    type Std = std::os::unix::net::UnixStream;
    fn into_std(self) -> io::Result<Self::Std> {
        tokio::net::UnixStream::into_std(self)
    }
}

/// Resolves once the server's shutdown flag is set (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Handshake.

/// What a successful handshake hands to the transmission phase.
struct Session {
    export: Arc<Export>,
    neg: Negotiated,
    /// Metadata contexts selected for block status, with their ids.
    contexts: Arc<[(u32, Context)]>,
}

async fn send_rep<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    rep: u32,
    payload: &[u8],
) -> io::Result<()> {
    let mut v = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + payload.len());
    codec::encode_option_reply(&mut v, option, rep, payload);
    wr.write_all(&v).await
}

fn transmission_flags(export: &Export, info: &DeviceInfo, structured: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
    if export.is_read_only(info) {
        f |= FLAG_READ_ONLY;
    } else {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= FLAG_SEND_DF;
    }
    if info.can_multi_conn {
        f |= FLAG_CAN_MULTI_CONN;
    }
    f
}

fn block_sizes(config: &ServerConfig, info: &DeviceInfo) -> (u32, u32, u32) {
    let min = info.block_size.max(1);
    let preferred = info
        .preferred_block_size
        .max(min)
        .max(4096)
        .min(config.max_payload);
    // The maximum must be a multiple of the minimum.
    let max = config.max_payload / min * min;
    (min, preferred.next_power_of_two().min(max), max)
}

/// A metadata context an export offers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ContextName {
    /// `base:allocation`.
    Base,
    /// `qemu:dirty-bitmap:NAME`, with the index of NAME among the export's bitmaps (its id is 2 + index).
    Bitmap(usize, String),
}

impl ContextName {
    fn id(&self) -> u32 {
        match self {
            ContextName::Base => BASE_ALLOCATION_ID,
            ContextName::Bitmap(i, _) => {
                BASE_ALLOCATION_ID + 1 + u32::try_from(*i).unwrap_or(u32::MAX - 2)
            }
        }
    }

    fn full(&self) -> String {
        match self {
            ContextName::Base => BASE_ALLOCATION.to_string(),
            ContextName::Bitmap(_, n) => format!("{QEMU_DIRTY_BITMAP}{n}"),
        }
    }
}

/// Which of an export's contexts (`base:allocation`, then its `bitmaps`) a list of queries selects, in that
/// order and without repeats. Listing with no queries, or with a namespace alone (`base:`, `qemu:`,
/// `qemu:dirty-bitmap:`), names every context there; setting selects exact names (and `base:`, the namespace's
/// one context).
fn match_contexts(queries: &[String], bitmaps: &[String], list: bool) -> Vec<ContextName> {
    let all_bitmaps = || {
        bitmaps
            .iter()
            .enumerate()
            .map(|(i, n)| ContextName::Bitmap(i, n.clone()))
    };
    let mut out: Vec<ContextName> = Vec::new();
    let add = |c: ContextName, out: &mut Vec<ContextName>| {
        if !out.contains(&c) {
            out.push(c);
        }
    };
    if list && queries.is_empty() {
        add(ContextName::Base, &mut out);
        all_bitmaps().for_each(|c| add(c, &mut out));
        return out;
    }
    for q in queries {
        if q == "base:" || q == BASE_ALLOCATION {
            add(ContextName::Base, &mut out);
        } else if list && (q == "qemu:" || q == QEMU_DIRTY_BITMAP) {
            all_bitmaps().for_each(|c| add(c, &mut out));
        } else if let Some(name) = q.strip_prefix(QEMU_DIRTY_BITMAP) {
            if let Some(i) = bitmaps.iter().position(|b| b == name) {
                add(ContextName::Bitmap(i, name.to_string()), &mut out);
            }
        }
    }
    out.sort_by_key(ContextName::id);
    out
}

/// A context selected for a connection, ready to answer block status.
#[derive(Clone)]
enum Context {
    /// `base:allocation`, from the device's extents.
    Base,
    /// A dirty bitmap, fetched when it was selected.
    Dirty(Arc<[(u64, u64)]>),
}

/// How option haggling ended.
enum HandshakeEnd {
    /// The client chose an export: on to transmission.
    Session(Session),
    /// `STARTTLS` was acknowledged: the TLS handshake comes next (the client's flags carry over).
    StartTls(codec::ClientFlags),
    /// The client aborted, or asked for something that can only be answered by hanging up.
    Closed,
}

/// Where a connection stands with TLS during option haggling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsStage {
    /// The server has no TLS for this connection.
    Unavailable,
    /// TLS may be started; options are served in the clear meanwhile.
    Offered,
    /// TLS must be started before anything else.
    Required,
    /// TLS is running.
    Active,
}

/// Send the greeting and read the client's flags.
async fn greet<R, W>(rd: &mut BufReader<R>, wr: &mut W) -> Result<codec::ClientFlags, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let offered = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
    wr.write_all(&codec::encode_greeting(offered)).await?;
    wr.flush().await?;
    Ok(codec::decode_client_flags(rd.read_u32().await?, offered)?)
}

/// Option haggling, from the first option (or the first after the TLS handshake) to the end of the handshake.
async fn negotiate<R, W>(
    inner: &Inner,
    state: &ConnState,
    rd: &mut BufReader<R>,
    wr: &mut W,
    cflags: codec::ClientFlags,
    mut tls: TlsStage,
) -> Result<HandshakeEnd, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // The spec allows TLS only after fixed newstyle negotiation; a client without it cannot be made to upgrade.
    if !cflags.fixed_newstyle && tls == TlsStage::Required {
        info!(
            conn = state.id,
            "NBD client without fixed newstyle cannot start the TLS this server requires"
        );
        return Ok(HandshakeEnd::Closed);
    }
    if !cflags.fixed_newstyle {
        tls = TlsStage::Unavailable;
    }
    let mut replies = Replies::default();
    // (canonical export name, the contexts selected for it with their ids)
    let mut meta: Option<(String, Vec<(u32, Context)>)> = None;
    let mut data = Vec::new();
    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        rd.read_exact(&mut hdr).await?;
        let (option, len) = codec::decode_option_header(&hdr)?;
        if len > MAX_OPTION_DATA {
            return Err(ProtocolError::OptionTooLarge {
                option,
                len,
                max: MAX_OPTION_DATA,
            }
            .into());
        }
        data.resize(len as usize, 0);
        rd.read_exact(&mut data).await?;
        let opt = match codec::decode_option(option, &data) {
            Ok(o) => o,
            Err(ProtocolError::InvalidOption { reason, .. }) => {
                debug!(option = option_name(option), %reason, "invalid option");
                send_rep(wr, option, REP_ERR_INVALID, reason.as_bytes()).await?;
                wr.flush().await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        debug!(conn = state.id, option = option_name(option), "NBD option");
        if *inner.shutdown.borrow() && !matches!(opt, ClientOption::Abort) {
            send_rep(wr, option, REP_ERR_SHUTDOWN, b"server is shutting down").await?;
            wr.flush().await?;
            continue;
        }
        if tls == TlsStage::Required && !matches!(opt, ClientOption::StartTls | ClientOption::Abort)
        {
            if matches!(opt, ClientOption::ExportName(_)) {
                // EXPORT_NAME cannot be refused, and TLS is required: the spec says to hang up.
                info!(
                    conn = state.id,
                    "NBD client asked for an export without the TLS this server requires"
                );
                return Ok(HandshakeEnd::Closed);
            }
            send_rep(
                wr,
                option,
                REP_ERR_TLS_REQD,
                b"this server requires TLS: send NBD_OPT_STARTTLS first",
            )
            .await?;
            wr.flush().await?;
            continue;
        }
        match opt {
            ClientOption::ExportName(_) if replies.extended => {
                // A client that negotiated extended headers MUST NOT use EXPORT_NAME, which cannot be refused.
                info!(
                    conn = state.id,
                    "NBD client sent EXPORT_NAME after negotiating extended headers"
                );
                return Ok(HandshakeEnd::Closed);
            }
            ClientOption::ExportName(name) => {
                let Some(export) = inner.source.lookup(&name).await else {
                    // EXPORT_NAME cannot be answered with an error: the spec says to hang up.
                    info!(conn = state.id, export = %name, "NBD client asked for an unknown export");
                    return Ok(HandshakeEnd::Closed);
                };
                let info = export.device.info();
                let flags = transmission_flags(&export, &info, replies.structured);
                let mut v = Vec::with_capacity(8 + 2 + EXPORT_NAME_ZEROES);
                codec::encode_export_name_reply(&mut v, info.size, flags, cflags.no_zeroes);
                wr.write_all(&v).await?;
                wr.flush().await?;
                let contexts = selected_for(&mut meta, &export.name);
                return Ok(HandshakeEnd::Session(session(
                    inner, state, export, &info, flags, replies, contexts,
                )));
            }
            ClientOption::Abort => {
                let _ = send_rep(wr, option, REP_ACK, &[]).await;
                let _ = wr.flush().await;
                return Ok(HandshakeEnd::Closed);
            }
            ClientOption::List => {
                for e in inner.source.list().await {
                    send_rep(
                        wr,
                        option,
                        REP_SERVER,
                        &codec::encode_rep_server(&e.name, &e.description),
                    )
                    .await?;
                }
                send_rep(wr, option, REP_ACK, &[]).await?;
            }
            ClientOption::StartTls => match tls {
                TlsStage::Unavailable => {
                    send_rep(
                        wr,
                        option,
                        REP_ERR_POLICY,
                        b"TLS is not configured on this server",
                    )
                    .await?;
                }
                TlsStage::Active => {
                    send_rep(wr, option, REP_ERR_INVALID, b"TLS is already running").await?;
                }
                TlsStage::Offered | TlsStage::Required => {
                    send_rep(wr, option, REP_ACK, &[]).await?;
                    wr.flush().await?;
                    return Ok(HandshakeEnd::StartTls(cflags));
                }
            },
            ClientOption::StructuredReply if replies.extended => {
                send_rep(
                    wr,
                    option,
                    REP_ERR_EXT_HEADER_REQD,
                    b"extended headers are already negotiated",
                )
                .await?;
            }
            ClientOption::StructuredReply => {
                replies.structured = true;
                state.structured.store(true, Ordering::Relaxed);
                send_rep(wr, option, REP_ACK, &[]).await?;
            }
            ClientOption::ExtendedHeaders if replies.extended => {
                send_rep(
                    wr,
                    option,
                    REP_ERR_INVALID,
                    b"extended headers are already negotiated",
                )
                .await?;
            }
            ClientOption::ExtendedHeaders => {
                replies.extended = true;
                replies.structured = true;
                state.structured.store(true, Ordering::Relaxed);
                state.extended.store(true, Ordering::Relaxed);
                send_rep(wr, option, REP_ACK, &[]).await?;
            }
            ClientOption::Info { name, requests } | ClientOption::Go { name, requests } => {
                let go = option == OPT_GO;
                let Some(export) = inner.source.lookup(&name).await else {
                    let msg = format!("no export named {name:?}");
                    send_rep(wr, option, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    wr.flush().await?;
                    continue;
                };
                let info = export.device.info();
                let flags = transmission_flags(&export, &info, replies.structured);
                let (min, pref, max) = block_sizes(&inner.config, &info);
                let mut infos = vec![InfoReply::Export {
                    size: info.size,
                    flags,
                }];
                if requests.contains(&INFO_NAME) {
                    infos.push(InfoReply::Name(export.name.clone()));
                }
                if requests.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
                    infos.push(InfoReply::Description(export.description.clone()));
                }
                // Always sent: Shale needs aligned requests and clients must learn the maximum.
                infos.push(InfoReply::BlockSize {
                    min,
                    preferred: pref,
                    max,
                });
                for i in &infos {
                    send_rep(wr, option, REP_INFO, &codec::encode_info(i)).await?;
                }
                send_rep(wr, option, REP_ACK, &[]).await?;
                wr.flush().await?;
                if go {
                    let contexts = selected_for(&mut meta, &export.name);
                    return Ok(HandshakeEnd::Session(session(
                        inner, state, export, &info, flags, replies, contexts,
                    )));
                }
                continue;
            }
            ClientOption::ListMetaContext { export, queries }
            | ClientOption::SetMetaContext { export, queries } => {
                let set = option == OPT_SET_META_CONTEXT;
                if !replies.structured {
                    send_rep(
                        wr,
                        option,
                        REP_ERR_INVALID,
                        b"structured replies must be negotiated first",
                    )
                    .await?;
                } else if let Some(e) = inner.source.lookup(&export).await {
                    let names = e.bitmap_names();
                    let mut chosen = Vec::new();
                    for c in match_contexts(&queries, &names, !set) {
                        let ready = match (&c, set) {
                            (_, false) | (ContextName::Base, true) => Some(Context::Base),
                            (ContextName::Bitmap(_, n), true) => {
                                fetch_bitmap(&e, n, state.id).await
                            }
                        };
                        // A bitmap that cannot be read now is not selected (the client sees it missing).
                        let Some(ready) = ready else { continue };
                        let id = if set { c.id() } else { 0 };
                        send_rep(
                            wr,
                            option,
                            REP_META_CONTEXT,
                            &codec::encode_meta_context(id, &c.full()),
                        )
                        .await?;
                        chosen.push((id, ready));
                    }
                    if set {
                        meta = Some((e.name.clone(), chosen));
                    }
                    send_rep(wr, option, REP_ACK, &[]).await?;
                } else {
                    let msg = format!("no export named {export:?}");
                    send_rep(wr, option, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                }
            }
            ClientOption::Unknown(n) => {
                debug!(option = n, "unsupported NBD option");
                send_rep(wr, option, REP_ERR_UNSUP, b"option not supported").await?;
            }
        }
        wr.flush().await?;
    }
}

/// The reply framing negotiated so far on one connection.
#[derive(Debug, Clone, Copy, Default)]
struct Replies {
    /// `NBD_OPT_STRUCTURED_REPLY` (or extended headers, which include it).
    structured: bool,
    /// `NBD_OPT_EXTENDED_HEADERS`.
    extended: bool,
}

/// The contexts selected for `export` (none if the last `SET_META_CONTEXT` named another export).
fn selected_for(
    meta: &mut Option<(String, Vec<(u32, Context)>)>,
    export: &str,
) -> Vec<(u32, Context)> {
    match meta.take() {
        Some((name, contexts)) if name == export => contexts,
        _ => Vec::new(),
    }
}

/// Read dirty bitmap `name` of export `e` for a connection that selects it.
async fn fetch_bitmap(e: &Export, name: &str, conn: u64) -> Option<Context> {
    let bitmaps = e.bitmaps.as_ref()?;
    match bitmaps.extents(name).await {
        Ok(v) => Some(Context::Dirty(v.into())),
        Err(err) => {
            warn!(conn, export = %e.name, bitmap = name, error = %err, "dirty bitmap unavailable");
            None
        }
    }
}

fn session(
    inner: &Inner,
    state: &ConnState,
    export: Arc<Export>,
    info: &DeviceInfo,
    flags: u16,
    replies: Replies,
    contexts: Vec<(u32, Context)>,
) -> Session {
    let (min, _, max) = block_sizes(&inner.config, info);
    *state.export.lock() = Some(export.name.clone());
    Session {
        neg: Negotiated {
            size: info.size,
            min_block: min,
            max_payload: max,
            flags,
            structured: replies.structured,
            extended: replies.extended,
            block_status: !contexts.is_empty(),
        },
        export,
        contexts: contexts.into(),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Transmission.

/// A reply on its way to the writer task.
enum Reply {
    /// Simple reply without payload (any command's success or error, or any error without structured
    /// replies).
    Simple { handle: u64, error: u32 },
    /// Simple reply carrying read data.
    SimpleRead { handle: u64, buf: IoBuf },
    /// Structured read reply: data chunks, and hole chunks for the parts `holes` marks.
    StructuredRead {
        handle: u64,
        offset: u64,
        buf: IoBuf,
        extents: Option<Vec<Extent>>,
    },
    /// Structured error chunk with a message.
    Error {
        handle: u64,
        error: u32,
        message: String,
    },
    /// Block status descriptors, one list per selected context (by id).
    BlockStatus {
        handle: u64,
        chunks: Vec<(u32, Vec<(u64, u32)>)>,
    },
}

struct Outgoing {
    reply: Reply,
    /// The request's offset, which extended reply headers echo.
    offset: u64,
    /// In-flight budget, returned once the reply is on the socket.
    _permit: Option<OwnedSemaphorePermit>,
}

/// Shared by a connection's request tasks.
struct ConnCtx {
    device: Arc<dyn BlockDevice>,
    info: DeviceInfo,
    neg: Negotiated,
    contexts: Arc<[(u32, Context)]>,
    sparse_read_min: u32,
    state: Arc<ConnState>,
    tx: mpsc::UnboundedSender<Outgoing>,
    order: Overlaps,
}

/// Keeps overlapping requests of one connection in arrival order.
///
/// The spec lets a server execute requests in any order, but real clients (fio's `trimwrite`, qemu's mirror)
/// pipeline a trim and a write of the same block and expect the write to win, as it does with qemu-nbd. So a
/// request that overlaps an earlier in-flight request, where either of them modifies data, waits for the
/// earlier one to finish on the device. Disjoint requests (the common case) never wait; replies still go out in
/// completion order.
#[derive(Default)]
struct Overlaps {
    list: Mutex<Vec<InFlightRange>>,
    next: AtomicU64,
}

struct InFlightRange {
    seq: u64,
    start: u64,
    end: u64,
    writes: bool,
    /// Closed when the request has finished on the device (a closed semaphore is a sticky one-shot event).
    done: Arc<Semaphore>,
}

/// Removes its range from [`Overlaps`] and wakes waiters when dropped, even if the request task panics.
struct OverlapGuard<'a> {
    owner: &'a Overlaps,
    seq: u64,
    done: Arc<Semaphore>,
}

impl Overlaps {
    /// Register `[start, end)` and return the events of earlier conflicting requests to wait for.
    fn register(
        &self,
        start: u64,
        end: u64,
        writes: bool,
    ) -> (u64, Arc<Semaphore>, Vec<Arc<Semaphore>>) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let done = Arc::new(Semaphore::new(0));
        let mut list = self.list.lock();
        let deps = list
            .iter()
            .filter(|r| (r.writes || writes) && r.start < end && start < r.end)
            .map(|r| r.done.clone())
            .collect();
        list.push(InFlightRange {
            seq,
            start,
            end,
            writes,
            done: done.clone(),
        });
        (seq, done, deps)
    }
}

impl Drop for OverlapGuard<'_> {
    fn drop(&mut self) {
        let mut list = self.owner.list.lock();
        if let Some(i) = list.iter().position(|r| r.seq == self.seq) {
            list.swap_remove(i);
        }
        drop(list);
        self.done.close();
    }
}

/// Map a device error onto the errno values the NBD spec allows on the wire.
fn wire_errno(e: &BlockError) -> u32 {
    let n = e.errno();
    let allowed = [
        errno::EPERM,
        errno::EIO,
        errno::ENOMEM,
        errno::EINVAL,
        errno::ENOSPC,
        errno::EOVERFLOW,
        errno::ENOTSUP,
        errno::ESHUTDOWN,
    ];
    if allowed.contains(&n) {
        n as u32
    } else {
        errno::EIO as u32
    }
}

impl ConnCtx {
    fn error_reply(&self, handle: u64, error: u32, message: String) -> Reply {
        self.state.counters.errors.fetch_add(1, Ordering::Relaxed);
        if self.neg.structured {
            Reply::Error {
                handle,
                error,
                message,
            }
        } else {
            Reply::Simple { handle, error }
        }
    }

    fn block_error(&self, handle: u64, e: &BlockError) -> Reply {
        debug!(conn = self.state.id, handle, error = %e, "NBD request failed");
        self.error_reply(handle, wire_errno(e), e.to_string())
    }

    /// Queue the reply to the request at `offset`.
    fn send(&self, offset: u64, reply: Reply, permit: Option<OwnedSemaphorePermit>) {
        // The writer is gone only when the connection is closing; the reply has nowhere to go.
        let _ = self.tx.send(Outgoing {
            reply,
            offset,
            _permit: permit,
        });
    }

    /// Execute one validated request through the shared request semantics ([`crate::semantics`]), so NBD and
    /// virtio-blk treat flush, FUA, discard and write-zeroes identically; only the NBD-specific parts (fast-zero
    /// refusal, hole detection on reads, descriptor encoding) live here.
    async fn execute(&self, req: Request, payload: Option<IoBuf>) -> Reply {
        let h = req.handle;
        let c = &self.state.counters;
        let dev = &*self.device;
        let (offset, len) = (req.offset, req.len);
        let ok = Reply::Simple {
            handle: h,
            error: 0,
        };
        let res: Result<Reply, BlockError> = match req.command {
            Command::Read { df } => {
                c.reads.fetch_add(1, Ordering::Relaxed);
                // Validated against the maximum payload, a u32.
                let read_len = u32::try_from(len).unwrap_or(u32::MAX);
                let read = semantics::execute(
                    dev,
                    SemReq::Read {
                        offset,
                        len: read_len,
                    },
                );
                let sparse = self.neg.structured && !df && read_len >= self.sparse_read_min;
                let (data, extents) = if sparse {
                    let (data, status) = tokio::join!(
                        read,
                        semantics::execute(dev, SemReq::BlockStatus { offset, len })
                    );
                    // Status is an optimisation: if it fails, everything is sent as data.
                    let extents = match status {
                        Ok(Response::Extents(e)) => Some(e),
                        _ => None,
                    };
                    (data, extents)
                } else {
                    (read.await, None)
                };
                match data {
                    Ok(Response::Data(buf)) => {
                        c.bytes_read.fetch_add(len, Ordering::Relaxed);
                        Ok(if self.neg.structured {
                            Reply::StructuredRead {
                                handle: h,
                                offset,
                                buf,
                                extents,
                            }
                        } else {
                            Reply::SimpleRead { handle: h, buf }
                        })
                    }
                    Ok(_) => Err(BlockError::Other("read returned no data".into())),
                    Err(e) => Err(e),
                }
            }
            Command::Write { fua } => {
                c.writes.fetch_add(1, Ordering::Relaxed);
                c.bytes_written.fetch_add(len, Ordering::Relaxed);
                match payload {
                    Some(data) => semantics::execute(dev, SemReq::Write { offset, data, fua })
                        .await
                        .map(|_| ok),
                    None => Err(BlockError::Other("write without payload".into())),
                }
            }
            Command::Flush => {
                c.flushes.fetch_add(1, Ordering::Relaxed);
                semantics::execute(dev, SemReq::Flush).await.map(|_| ok)
            }
            Command::Trim { fua } => {
                c.writes.fetch_add(1, Ordering::Relaxed);
                semantics::execute(dev, SemReq::Discard { offset, len, fua })
                    .await
                    .map(|_| ok)
            }
            Command::WriteZeroes { fua, no_hole, fast } => {
                c.writes.fetch_add(1, Ordering::Relaxed);
                if fast && !self.info.can_fast_zero {
                    // FAST_ZERO asks us to fail rather than be slow; the client will fall back to writing.
                    Err(BlockError::Unsupported("fast zero"))
                } else {
                    let r = SemReq::WriteZeroes {
                        offset,
                        len,
                        may_trim: !no_hole,
                        fua,
                    };
                    semantics::execute(dev, r).await.map(|_| ok)
                }
            }
            Command::Cache => semantics::execute(dev, SemReq::Cache { offset, len })
                .await
                .map(|_| ok),
            Command::BlockStatus { req_one } => {
                let mut chunks = Vec::with_capacity(self.contexts.len());
                let mut failed = None;
                for (id, c) in self.contexts.iter() {
                    match c {
                        Context::Base => {
                            match semantics::execute(dev, SemReq::BlockStatus { offset, len }).await
                            {
                                Ok(Response::Extents(ext)) => {
                                    chunks.push((*id, descriptors(&ext, offset, req.len, req_one)))
                                }
                                Ok(_) => {
                                    failed = Some(BlockError::Other(
                                        "block status returned no extents".into(),
                                    ))
                                }
                                Err(e) => failed = Some(e),
                            }
                        }
                        Context::Dirty(map) => {
                            chunks.push((*id, dirty_descriptors(map, offset, req.len, req_one)))
                        }
                    }
                }
                match failed {
                    Some(e) => Err(e),
                    None => Ok(Reply::BlockStatus { handle: h, chunks }),
                }
            }
            Command::Disconnect => Ok(ok),
        };
        res.unwrap_or_else(|e| self.block_error(h, &e))
    }
}

fn state_flags(kind: ExtentKind) -> u32 {
    match kind {
        ExtentKind::Data => 0,
        ExtentKind::Zero => STATE_ZERO,
        ExtentKind::Hole => STATE_HOLE | STATE_ZERO,
    }
}

/// Turn device extents into `base:allocation` descriptors clipped to the request, merged when adjacent ones
/// share flags. The device returns at least the first byte; if it returns nothing usable the whole range is
/// reported as allocated data (status 0 is always safe). Descriptor lengths never exceed `len`, so a compact
/// (32-bit) request gets descriptors that fit the compact chunk.
fn descriptors(extents: &[Extent], offset: u64, len: u64, req_one: bool) -> Vec<(u64, u32)> {
    let end = offset + len;
    let mut pos = offset;
    let mut out: Vec<(u64, u32)> = Vec::new();
    for e in extents {
        let s = e.offset.max(pos);
        let t = e.offset.saturating_add(e.length).min(end);
        if t <= s {
            continue;
        }
        if s != pos {
            break; // a gap: report only the contiguous prefix
        }
        let flags = state_flags(e.kind);
        let l = t - s;
        match out.last_mut() {
            Some((ll, f)) if *f == flags => *ll += l,
            _ => out.push((l, flags)),
        }
        pos = t;
        if pos == end {
            break;
        }
    }
    if out.is_empty() {
        out.push((len, 0));
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// `qemu:dirty-bitmap:` descriptors for `[offset, offset + len)` from a bitmap's sorted dirty extents: runs of
/// clean (0) and dirty ([`STATE_DIRTY`]) bytes covering the whole range.
fn dirty_descriptors(map: &[(u64, u64)], offset: u64, len: u64, req_one: bool) -> Vec<(u64, u32)> {
    let end = offset.saturating_add(len);
    let mut out: Vec<(u64, u32)> = Vec::new();
    let push = |l: u64, f: u32, out: &mut Vec<(u64, u32)>| match out.last_mut() {
        Some((ll, ff)) if *ff == f => *ll += l,
        _ => out.push((l, f)),
    };
    let mut pos = offset;
    let first = map.partition_point(|&(o, l)| o.saturating_add(l) <= offset);
    for &(o, l) in &map[first..] {
        if pos >= end || o >= end {
            break;
        }
        if o > pos {
            push(o - pos, 0, &mut out);
            pos = o;
        }
        let t = o.saturating_add(l).min(end);
        if t > pos {
            push(t - pos, STATE_DIRTY, &mut out);
            pos = t;
        }
    }
    if pos < end {
        push(end - pos, 0, &mut out);
    }
    if req_one {
        out.truncate(1);
    }
    out
}

async fn transmission<R, W>(
    inner: &Inner,
    state: &Arc<ConnState>,
    session: Session,
    mut rd: BufReader<R>,
    wr: W,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let writer = tokio::spawn(write_loop(wr, rx, session.neg.extended, state.clone()));
    let ctx = Arc::new(ConnCtx {
        info: session.export.device.info(),
        device: session.export.device.clone(),
        neg: session.neg,
        contexts: session.contexts.clone(),
        sparse_read_min: inner.config.sparse_read_min,
        state: state.clone(),
        tx,
        order: Overlaps::default(),
    });
    let total_units = inner
        .config
        .max_in_flight_bytes
        .div_ceil(BUDGET_UNIT)
        .min(u64::from(u32::MAX >> 3)) as u32;
    let budget = Arc::new(Semaphore::new(total_units as usize));
    // Requests run as futures of this connection's task, polled whenever the reader waits: no task spawn per
    // request, and on an I/O thread everything stays on that thread.
    let running: Running = Mutex::new(FuturesUnordered::new());
    let end = {
        let reader = read_loop(&ctx, &mut rd, &budget, total_units, &running);
        tokio::pin!(reader);
        std::future::poll_fn(|cx| {
            let end = reader.as_mut().poll(cx);
            poll_running(&running, cx);
            end
        })
        .await
    };
    // Finish (and answer) every request already accepted, so no acknowledged write is lost.
    let mut rest = std::mem::take(&mut *running.lock());
    while rest.next().await.is_some() {}
    match &end {
        Ok(()) => debug!(conn = state.id, "NBD client disconnected"),
        Err(e) => info!(conn = state.id, peer = %state.peer, error = %e, "NBD connection closing"),
    }
    // Drop our sender: the writer finishes once every in-flight request has been answered.
    drop(ctx);
    let _ = writer.await;
}

/// The requests of one connection that are executing or waiting for an overlapping earlier one.
type Running = Mutex<FuturesUnordered<Pin<Box<dyn Future<Output = ()> + Send>>>>;

/// Poll the running requests until none is ready (each registers `cx` to be woken when it can progress).
fn poll_running(running: &Running, cx: &mut std::task::Context<'_>) {
    let mut r = running.lock();
    while let std::task::Poll::Ready(Some(())) = r.poll_next_unpin(cx) {}
}

/// Reads and dispatches requests until the client disconnects, breaks the protocol, or the connection is
/// kicked. Returns Ok on orderly ends (DISC, EOF between requests, kick).
async fn read_loop<R>(
    ctx: &Arc<ConnCtx>,
    rd: &mut BufReader<R>,
    budget: &Arc<Semaphore>,
    total_units: u32,
    running: &Running,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin + Send,
{
    let state = &ctx.state;
    loop {
        let mut buf = [0u8; EXT_REQUEST_HEADER_LEN];
        let hdr = &mut buf[..ctx.neg.request_header_len()];
        tokio::select! {
            biased;
            _ = state.kick.notified() => return Ok(()),
            r = rd.read_exact(hdr) => match r {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            },
        }
        let req = match codec::decode_request(hdr, &ctx.neg) {
            Ok(r) => r,
            Err(ProtocolError::Rejected {
                handle,
                offset,
                command,
                errno,
                skip,
                reason,
            }) => {
                debug!(
                    conn = state.id,
                    handle,
                    command = command_name(command),
                    errno,
                    reason,
                    "NBD request refused"
                );
                if skip > 0 {
                    let n =
                        tokio::io::copy(&mut (&mut *rd).take(skip), &mut tokio::io::sink()).await?;
                    if n < skip {
                        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                    }
                }
                // Error replies take budget too, so a client that floods bad requests without reading the
                // answers cannot grow the reply queue without bound.
                let Ok(permit) = budget.clone().acquire_many_owned(1).await else {
                    return Ok(());
                };
                let reply = ctx.error_reply(handle, errno as u32, reason.to_string());
                ctx.send(offset, reply, Some(permit));
                continue;
            }
            Err(ProtocolError::PayloadTooLarge {
                handle,
                offset,
                len,
                max,
            }) => {
                let reply = ctx.error_reply(
                    handle,
                    errno::EOVERFLOW as u32,
                    format!("payload {len} exceeds {max}"),
                );
                ctx.send(offset, reply, None);
                return Err(ProtocolError::PayloadTooLarge {
                    handle,
                    offset,
                    len,
                    max,
                }
                .into());
            }
            Err(e) => return Err(e.into()),
        };
        if req.command == Command::Disconnect {
            return Ok(());
        }
        let bytes = match req.command {
            Command::Read { .. } | Command::Write { .. } => req.len,
            _ => 0,
        };
        let units = (bytes / BUDGET_UNIT).clamp(1, u64::from(total_units)) as u32;
        let permit = match budget.clone().acquire_many_owned(units).await {
            Ok(p) => p,
            Err(_) => return Ok(()),
        };
        let payload = if req.payload_len() > 0 {
            let mut buf = IoBuf::for_overwrite(req.payload_len() as usize);
            rd.read_exact(&mut buf).await?;
            Some(buf)
        } else {
            None
        };
        state.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        // Ordering is decided here, in arrival order, before the request runs concurrently with others.
        let range = match req.command {
            Command::Read { .. } | Command::BlockStatus { .. } => Some(false),
            Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. } => {
                Some(true)
            }
            Command::Flush | Command::Cache | Command::Disconnect => None,
        }
        .map(|writes| ctx.order.register(req.offset, req.offset + req.len, writes));
        let ctx = ctx.clone();
        running.lock().push(Box::pin(async move {
            let guard = range.map(|(seq, done, deps)| {
                (
                    OverlapGuard {
                        owner: &ctx.order,
                        seq,
                        done,
                    },
                    deps,
                )
            });
            if let Some((_, deps)) = &guard {
                for d in deps {
                    // Err(Closed) is the signal that the earlier request finished.
                    let _ = d.acquire().await;
                }
            }
            let reply = ctx.execute(req, payload).await;
            drop(guard);
            ctx.state.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
            ctx.send(req.offset, reply, Some(permit));
        }));
    }
}

/// Accumulates encoded replies as header bytes plus references to data buffers, then writes them with as few
/// `writev` calls as possible.
struct Batch {
    meta: Vec<u8>,
    /// (in meta: start, end) or (in batch item idx: start, end) segments, in wire order.
    segs: Vec<Seg>,
    items: Vec<Outgoing>,
}

#[derive(Clone, Copy)]
enum Seg {
    Meta(usize, usize),
    Data(usize, usize, usize),
}

impl Batch {
    fn push_meta(&mut self, bytes: &[u8]) {
        let start = self.meta.len();
        self.meta.extend_from_slice(bytes);
        match self.segs.last_mut() {
            Some(Seg::Meta(_, e)) if *e == start => *e = self.meta.len(),
            _ => self.segs.push(Seg::Meta(start, self.meta.len())),
        }
    }

    fn push_data(&mut self, item: usize, data: &[u8], start: usize, end: usize) {
        if end - start < COPY_THRESHOLD {
            self.push_meta(&data[start..end]);
        } else {
            self.segs.push(Seg::Data(item, start, end));
        }
    }

    /// Append bytes to the header area with `put`, then record them as one segment (merged with a preceding
    /// header segment): the codec's `put_*` encoders write in place, with no buffer per reply.
    fn put_meta(&mut self, put: impl FnOnce(&mut Vec<u8>)) {
        let start = self.meta.len();
        put(&mut self.meta);
        match self.segs.last_mut() {
            Some(Seg::Meta(_, e)) if *e == start => *e = self.meta.len(),
            _ => self.segs.push(Seg::Meta(start, self.meta.len())),
        }
    }

    /// Encode one reply. `extended`: the connection negotiated extended headers, so every reply is a chunk
    /// with a 32-byte header echoing the request's offset, and simple replies become `NONE` or `ERROR` chunks.
    fn encode(&mut self, out: Outgoing, extended: bool) {
        let idx = self.items.len();
        let framing = extended.then_some(out.offset);
        match &out.reply {
            Reply::Simple { handle, error } => match (framing, *error) {
                (None, _) => self.push_meta(&codec::encode_simple_reply(*error, *handle)),
                (Some(_), 0) => self.put_meta(|m| codec::put_none(m, framing, *handle)),
                (Some(_), e) => {
                    self.put_meta(|m| codec::put_error_chunk(m, framing, *handle, e, ""))
                }
            },
            Reply::SimpleRead { handle, buf } => {
                self.push_meta(&codec::encode_simple_reply(0, *handle));
                self.push_data(idx, buf, 0, buf.len());
            }
            Reply::StructuredRead {
                handle,
                offset,
                buf,
                extents,
            } => {
                let len = buf.len();
                let chunks = read_chunks(extents.as_deref(), *offset, len);
                let n = chunks.len();
                for (i, (start, end, hole)) in chunks.into_iter().enumerate() {
                    let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
                    let off = *offset + start as u64;
                    let chunk_len = (end - start) as u32;
                    if hole {
                        self.put_meta(|m| {
                            codec::put_offset_hole(m, framing, flags, *handle, off, chunk_len)
                        });
                    } else {
                        self.put_meta(|m| {
                            codec::put_offset_data_header(
                                m, framing, flags, *handle, off, chunk_len,
                            )
                        });
                        self.push_data(idx, buf, start, end);
                    }
                }
            }
            Reply::Error {
                handle,
                error,
                message,
            } => {
                self.put_meta(|m| codec::put_error_chunk(m, framing, *handle, *error, message));
            }
            Reply::BlockStatus { handle, chunks } => {
                let last = chunks.len().saturating_sub(1);
                for (i, (id, descriptors)) in chunks.iter().enumerate() {
                    self.put_meta(|m| {
                        codec::put_block_status(m, framing, *handle, *id, descriptors, i == last)
                    });
                }
            }
        }
        self.items.push(out);
    }

    fn clear(&mut self) {
        self.meta.clear();
        self.segs.clear();
        self.items.clear();
    }

    async fn write_to<W: AsyncWrite + Unpin>(&self, wr: &mut W) -> io::Result<u64> {
        let mut written = 0u64;
        let mut seg = 0;
        let mut skip = 0usize; // bytes of segs[seg] already written
        while seg < self.segs.len() {
            let mut iov: Vec<IoSlice<'_>> =
                Vec::with_capacity((self.segs.len() - seg).min(MAX_IOVECS));
            for (i, s) in self.segs[seg..].iter().take(MAX_IOVECS).enumerate() {
                let bytes = match *s {
                    Seg::Meta(a, b) => &self.meta[a..b],
                    Seg::Data(item, a, b) => match &self.items[item].reply {
                        Reply::SimpleRead { buf, .. } | Reply::StructuredRead { buf, .. } => {
                            &buf[a..b]
                        }
                        _ => &[][..],
                    },
                };
                iov.push(IoSlice::new(if i == 0 { &bytes[skip..] } else { bytes }));
            }
            let mut n = wr.write_vectored(&iov).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            written += n as u64;
            // Advance over fully written segments.
            for s in iov.iter() {
                if n >= s.len() {
                    n -= s.len();
                    seg += 1;
                    skip = 0;
                } else {
                    skip += n;
                    break;
                }
            }
        }
        Ok(written)
    }
}

/// Split a read of `len` bytes at `offset` into `(start, end, is_hole)` chunks relative to the buffer.
fn read_chunks(extents: Option<&[Extent]>, offset: u64, len: usize) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    let mut pos = 0usize;
    if let Some(extents) = extents {
        for e in extents {
            let s = e.offset.max(offset + pos as u64);
            let t = e.offset.saturating_add(e.length).min(offset + len as u64);
            if t <= s {
                continue;
            }
            if s != offset + pos as u64 {
                break;
            }
            let hole = e.kind != ExtentKind::Data;
            let (a, b) = ((s - offset) as usize, (t - offset) as usize);
            match out.last_mut() {
                Some((_, end, h)) if *h == hole => *end = b,
                _ => out.push((a, b, hole)),
            }
            pos = b;
            if pos == len {
                break;
            }
        }
    }
    if pos < len {
        match out.last_mut() {
            Some((_, end, false)) => *end = len,
            _ => out.push((pos, len, false)),
        }
    }
    out
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    extended: bool,
    state: Arc<ConnState>,
) {
    let mut batch = Batch {
        meta: Vec::with_capacity(64 << 10),
        segs: Vec::new(),
        items: Vec::new(),
    };
    let mut broken = false;
    while let Some(first) = rx.recv().await {
        if broken {
            continue; // keep draining so request tasks can finish and release their budget
        }
        batch.encode(first, extended);
        while batch.items.len() < 256 && batch.meta.len() < (1 << 20) {
            match rx.try_recv() {
                Ok(o) => batch.encode(o, extended),
                Err(_) => break,
            }
        }
        if let Err(e) = batch.write_to(&mut wr).await {
            debug!(conn = state.id, error = %e, "NBD reply write failed; dropping further replies");
            broken = true;
        }
        batch.clear();
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, length: u64, kind: ExtentKind) -> Extent {
        Extent {
            offset,
            length,
            kind,
        }
    }

    #[test]
    fn descriptors_clip_and_merge() {
        let e = [
            ext(0, 4096, ExtentKind::Data),
            ext(4096, 4096, ExtentKind::Hole),
            ext(8192, 4096, ExtentKind::Zero),
            ext(12288, 4096, ExtentKind::Data),
        ];
        assert_eq!(
            descriptors(&e, 1024, 14336, false),
            vec![(3072, 0), (4096, 3), (4096, 2), (3072, 0)]
        );
        assert_eq!(descriptors(&e, 0, 4096, true), vec![(4096, 0)]);
        assert_eq!(descriptors(&[], 0, 512, false), vec![(512, 0)]);
        let holes = [
            ext(0, 4096, ExtentKind::Hole),
            ext(4096, 4096, ExtentKind::Hole),
        ];
        assert_eq!(descriptors(&holes, 0, 8192, false), vec![(8192, 3)]);
    }

    /// Dirty-bitmap descriptors cover the whole request in clean and dirty runs, whatever the extents.
    #[test]
    fn dirty_descriptors_cover_the_request() {
        let map = [(4096, 4096), (8192, 4096), (65536, 65536)];
        assert_eq!(
            dirty_descriptors(&map, 0, 1 << 20, false),
            vec![
                (4096, 0),
                (8192, STATE_DIRTY),
                (65536 - 12288, 0),
                (65536, STATE_DIRTY),
                ((1 << 20) - 131072, 0)
            ]
        );
        // Starting inside a dirty extent, ending inside another.
        assert_eq!(
            dirty_descriptors(&map, 6144, 65536, false),
            vec![(6144, STATE_DIRTY), (65536 - 12288, 0), (6144, STATE_DIRTY)]
        );
        assert_eq!(dirty_descriptors(&map, 0, 65536, true), vec![(4096, 0)]);
        assert_eq!(dirty_descriptors(&[], 512, 512, false), vec![(512, 0)]);
        assert_eq!(
            dirty_descriptors(&map, 1 << 20, 4096, false),
            vec![(4096, 0)]
        );
    }

    /// Context queries: listing with none or a namespace names everything there; setting takes exact names;
    /// ids are fixed per export (base:allocation 1, bitmap i at 2 + i) and the order follows them.
    #[test]
    fn contexts_match_queries() {
        let bm = vec!["base".to_string(), "inc1".to_string()];
        let q = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let names = |v: Vec<ContextName>| v.iter().map(|c| (c.id(), c.full())).collect::<Vec<_>>();
        let all = vec![
            (1, "base:allocation".to_string()),
            (2, "qemu:dirty-bitmap:base".to_string()),
            (3, "qemu:dirty-bitmap:inc1".to_string()),
        ];
        assert_eq!(names(match_contexts(&[], &bm, true)), all);
        assert_eq!(names(match_contexts(&q(&["qemu:"]), &bm, true)), all[1..]);
        assert_eq!(
            names(match_contexts(&q(&["qemu:dirty-bitmap:"]), &bm, true)),
            all[1..]
        );
        // Setting: a namespace alone selects nothing in qemu's, the one context in base's.
        assert!(match_contexts(&q(&["qemu:"]), &bm, false).is_empty());
        assert!(match_contexts(&[], &bm, false).is_empty());
        assert_eq!(
            names(match_contexts(
                &q(&[
                    "qemu:dirty-bitmap:inc1",
                    "base:",
                    "qemu:dirty-bitmap:nope",
                    "base:allocation"
                ]),
                &bm,
                false
            )),
            vec![all[0].clone(), all[2].clone()]
        );
        assert!(match_contexts(&q(&["qemu:dirty-bitmap:x"]), &[], true).is_empty());
        assert!(match_contexts(&q(&["other:thing"]), &bm, false).is_empty());
    }

    #[test]
    fn read_chunks_cover_the_request() {
        let e = [
            ext(0, 4096, ExtentKind::Data),
            ext(4096, 8192, ExtentKind::Hole),
            ext(12288, 4096, ExtentKind::Zero),
        ];
        assert_eq!(
            read_chunks(Some(&e), 0, 16384),
            vec![(0, 4096, false), (4096, 16384, true)]
        );
        assert_eq!(
            read_chunks(Some(&e), 2048, 4096),
            vec![(0, 2048, false), (2048, 4096, true)]
        );
        // Partial coverage: the rest is sent as data.
        assert_eq!(read_chunks(Some(&e[..1]), 0, 8192), vec![(0, 8192, false)]);
        assert_eq!(
            read_chunks(Some(&e[1..2]), 4096, 16384),
            vec![(0, 8192, true), (8192, 16384, false)]
        );
        assert_eq!(read_chunks(None, 0, 512), vec![(0, 512, false)]);
    }

    #[test]
    fn block_size_advertisement() {
        let info = DeviceInfo::for_tests(1 << 30);
        let (min, pref, max) = block_sizes(&ServerConfig::default(), &info);
        assert_eq!((min, pref, max), (512, 65536, 32 << 20));
        assert_eq!(max % min, 0);
    }
}
