//! An NBD client that is a [`BlockDevice`]: a remote export used like a local volume.
//!
//! Other hosts reach remote VM disks through it, and the tests use it to drive the server. One connection
//! carries many requests at once: callers submit through a channel to a writer task (which batches frames
//! into few syscalls), and a reader task matches replies to callers by handle, so replies may arrive in any
//! order. Reads use structured replies when the server offers them (holes arrive as `OFFSET_HOLE` chunks and
//! are zero-filled locally), and block status uses `base:allocation`. Extended headers are asked for first
//! ([`ConnectOptions::extended_headers`]): with them write-zeroes, trim and block status go out as one request
//! however long the range, and every reply chunk must echo its request's offset. [`NbdClient::connect_multi`] opens
//! several such connections to an export whose server advertises `NBD_FLAG_CAN_MULTI_CONN` and spreads
//! requests over them round-robin; a flush then goes to one of them, which the flag makes cover all.
//! [`NbdClient::connect_with`] can upgrade every connection to TLS ([`ConnectOptions::tls`]; `nbds://` URIs):
//! `NBD_OPT_STARTTLS` goes first, and a server that refuses it ends the attempt rather than the client
//! carrying on in the clear.
//!
//! The server is not trusted: the reader checks every reply before it touches a caller's buffer. A read's
//! chunks must lie inside the request (offsets checked without overflow), must not overlap, and must cover all
//! of it: a reply that ends short fails that read (the caller never sees bytes the server did not send), and
//! anything that breaks the framing ends the connection, failing every pending and later request with the
//! reason. Block sizes outside the spec's rules fail the handshake. `tests` play a hostile server, by hand and
//! with generated replies.
//!
//! Semantics follow the [`BlockDevice`] contract, which is stricter than NBD in one place: `discard` must leave
//! the range reading as zeroes, while `NBD_CMD_TRIM` promises nothing. So `discard` is sent as
//! `NBD_CMD_WRITE_ZEROES` that may punch holes, and only falls back to writing zero buffers when the server has
//! no write-zeroes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf,
};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::codec::{self, ClientOption, InfoReply, ProtocolError, ReplyHeader, RequestHeader};
use super::proto::*;
use super::tls::{self, ClientTls, TlsError};
use super::NbdError;
use crate::buf::IoBuf;
use crate::device::{
    check_range, check_write, BlockDevice, DeviceInfo, Extent, ExtentKind, WriteFlags,
};
use crate::error::{errno, BlockError, Result};

/// Largest option reply payload the client accepts during negotiation.
const MAX_OPTION_REPLY: u32 = 1 << 20;
/// Largest non-data chunk payload (block status, errors) accepted in transmission.
const MAX_CONTROL_CHUNK: u64 = 16 << 20;
/// Largest write-zeroes / block-status length sent in one request (32-bit length, kept block aligned).
const MAX_NO_PAYLOAD_LEN: u64 = 1 << 30;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// `host:port`.
    Tcp(String),
    /// Unix socket path.
    Unix(PathBuf),
}

impl NbdAddr {
    /// Parse a plain NBD URI (`nbd://host[:port]/export`, `nbd+unix:///export?socket=/path`) into the address
    /// and the export name. TLS URIs (`nbds://`, `nbds+unix://`) are refused here: they need credentials, see
    /// [`NbdUri::parse`] and [`NbdClient::connect_uri_with`].
    pub fn parse_uri(uri: &str) -> Result<(NbdAddr, String), NbdError> {
        let u = NbdUri::parse(uri)?;
        if u.tls {
            return Err(NbdError::BadUri {
                uri: uri.to_string(),
                reason: "a TLS URI needs TLS credentials (NbdClient::connect_uri_with)",
            });
        }
        Ok((u.addr, u.export))
    }
}

/// A parsed NBD URI (the scheme of the NBD project's `doc/uri.md`, as qemu and libnbd read it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server listens.
    pub addr: NbdAddr,
    /// The export name (empty: the server's default export).
    pub export: String,
    /// The scheme asks for TLS (`nbds://`, `nbds+unix://`): the connection must upgrade or fail.
    pub tls: bool,
}

impl NbdUri {
    /// Parse `nbd[s]://host[:port]/export` or `nbd[s]+unix:///export?socket=/path`.
    pub fn parse(uri: &str) -> Result<NbdUri, NbdError> {
        let (tls, rest) = match uri.strip_prefix("nbds") {
            Some(r) => (true, r),
            None => (false, uri.strip_prefix("nbd").unwrap_or("")),
        };
        let (addr, export) = parse_after_scheme(uri, rest)?;
        Ok(NbdUri { addr, export, tls })
    }
}

/// The part of an NBD URI after `nbd`/`nbds`: `://host…` or `+unix://…`.
fn parse_after_scheme(uri: &str, rest: &str) -> Result<(NbdAddr, String), NbdError> {
    let bad = |reason| NbdError::BadUri {
        uri: uri.to_string(),
        reason,
    };
    if let Some(rest) = rest.strip_prefix("+unix://") {
        let (path_part, query) = rest
            .split_once('?')
            .ok_or_else(|| bad("missing ?socket="))?;
        let export = path_part.strip_prefix('/').unwrap_or(path_part).to_string();
        let socket = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("socket="))
            .ok_or_else(|| bad("missing socket= parameter"))?;
        return Ok((NbdAddr::Unix(PathBuf::from(socket)), export));
    }
    if let Some(rest) = rest.strip_prefix("://") {
        // Query parameters (libnbd's `tls-certificates=`, say) are not part of the export name.
        let rest = rest.split_once('?').map_or(rest, |(r, _)| r);
        let (hostport, export) = match rest.split_once('/') {
            Some((h, e)) => (h, e.to_string()),
            None => (rest, String::new()),
        };
        if hostport.is_empty() {
            return Err(bad("missing host"));
        }
        let has_port = match hostport.rfind(':') {
            Some(i) => !hostport[i..].contains(']'),
            None => false,
        };
        let hp = if has_port {
            hostport.to_string()
        } else {
            format!("{hostport}:{DEFAULT_PORT}")
        };
        return Ok((NbdAddr::Tcp(hp), export));
    }
    Err(bad(
        "scheme must be nbd://, nbds://, nbd+unix:// or nbds+unix://",
    ))
}

/// A frame for the writer task.
struct Frame {
    /// The request header: `header[..header_len]` (compact or extended).
    header: [u8; EXT_REQUEST_HEADER_LEN],
    header_len: u8,
    payload: Option<IoBuf>,
}

impl Frame {
    /// Encode `h` the way the connection negotiated: an extended header (with `NBD_CMD_FLAG_PAYLOAD_LEN` on
    /// writes) or a compact one.
    fn new(h: &RequestHeader, extended: bool, payload: Option<IoBuf>) -> Frame {
        let mut header = [0u8; EXT_REQUEST_HEADER_LEN];
        let header_len = if extended {
            let mut h = *h;
            if h.command == CMD_WRITE {
                h.flags |= CMD_FLAG_PAYLOAD_LEN;
            }
            header.copy_from_slice(&codec::encode_ext_request_header(&h));
            EXT_REQUEST_HEADER_LEN
        } else {
            header[..REQUEST_HEADER_LEN].copy_from_slice(&codec::encode_request_header(h));
            REQUEST_HEADER_LEN
        };
        Frame {
            header,
            header_len: header_len as u8,
            payload,
        }
    }

    fn header(&self) -> &[u8] {
        &self.header[..usize::from(self.header_len)]
    }
}

/// What a pending request is collecting.
enum Op {
    Read {
        offset: u64,
        buf: IoBuf,
        /// Which bytes of `buf` the reply has filled so far.
        covered: Coverage,
    },
    Status {
        offset: u64,
        len: u64,
        extents: Vec<Extent>,
    },
    Plain,
}

/// The parts of a read's buffer that structured reply chunks have filled: the spec has a read's chunks cover
/// the request exactly once, and without this check a reply that left a gap would hand the caller whatever the
/// buffer held before (stale or uninitialised data read as if it were the disk's).
#[derive(Debug, Default)]
struct Coverage {
    /// Filled byte ranges `[start, end)` of the buffer, sorted, disjoint and not touching. Inline: a reply is
    /// almost always one chunk, and this is built for every read.
    runs: smallvec::SmallVec<[(u64, u64); 2]>,
    /// Bytes filled in all.
    total: u64,
}

impl Coverage {
    /// A coverage of the whole of a `len`-byte buffer (a simple reply's data).
    fn whole(len: u64) -> Self {
        Coverage {
            runs: smallvec::smallvec![(0, len)],
            total: len,
        }
    }

    /// Record `[start, start + len)` as filled; false (and nothing recorded) if it overlaps what is already.
    fn add(&mut self, start: u64, len: u64) -> bool {
        let end = start + len;
        // The first run ending after `start`: the new range overlaps a run only if it overlaps this one.
        let i = self.runs.partition_point(|r| r.1 <= start);
        if self.runs.get(i).is_some_and(|r| r.0 < end) {
            return false;
        }
        self.total += len;
        let prev = i.checked_sub(1).filter(|&j| self.runs[j].1 == start);
        let next = self.runs.get(i).is_some_and(|r| r.0 == end);
        match (prev, next) {
            (Some(j), true) => {
                self.runs[j].1 = self.runs[i].1;
                self.runs.remove(i);
            }
            (Some(j), false) => self.runs[j].1 = end,
            (None, true) => self.runs[i].0 = start,
            (None, false) => self.runs.insert(i, (start, end)),
        }
        true
    }
}

enum Done {
    Read(IoBuf),
    Status(Vec<Extent>),
    Ok,
}

struct Pending {
    /// The request's offset: extended reply chunks must echo it.
    offset: u64,
    op: Op,
    error: Option<BlockError>,
    tx: oneshot::Sender<Result<Done>>,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<PendingMap>,
    next_handle: AtomicU64,
}

#[derive(Default)]
struct PendingMap {
    map: HashMap<u64, Pending>,
    /// Why the connection is unusable, once it is.
    dead: Option<String>,
}

impl Shared {
    fn fail_all(&self, why: String) {
        let drained: Vec<Pending> = {
            let mut p = self.pending.lock();
            p.dead = Some(why.clone());
            p.map.drain().map(|(_, v)| v).collect()
        };
        for p in drained {
            let _ = p.tx.send(Err(dead_error(&why)));
        }
    }
}

fn dead_error(why: &str) -> BlockError {
    BlockError::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        format!("NBD connection lost: {why}"),
    ))
}

/// Map an NBD error value onto the crate's error vocabulary.
fn remote_error(error: u32, message: &str) -> BlockError {
    if !message.is_empty() {
        debug!(error, message, "NBD server reported an error");
    }
    match error as i32 {
        errno::EPERM => BlockError::ReadOnly,
        errno::ENOSPC => BlockError::NoSpace,
        errno::ENOTSUP => BlockError::Unsupported("operation refused by the NBD server"),
        errno::ESHUTDOWN => BlockError::Shutdown,
        e => BlockError::Remote(e),
    }
}

/// What the handshake learned about the export.
#[derive(Debug, Clone)]
struct ExportParams {
    size: u64,
    flags: u16,
    min_block: u32,
    preferred_block: u32,
    max_payload: u32,
    structured: bool,
    /// Extended headers negotiated (implies `structured`).
    extended: bool,
    meta_id: Option<u32>,
    description: Option<String>,
}

impl ExportParams {
    /// Whether two connections describe the export the same way: multi-conn needs every connection to see
    /// the same size, flags, request limit and block status.
    fn same_export(&self, o: &ExportParams) -> bool {
        (
            self.size,
            self.flags,
            self.max_payload,
            self.meta_id.is_some(),
        ) == (o.size, o.flags, o.max_payload, o.meta_id.is_some())
    }
}

/// One connection's transmission machinery: the channel to its writer task, and the requests awaiting replies
/// that its reader task completes.
struct Conn {
    tx: mpsc::UnboundedSender<Frame>,
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Conn {
    /// Start the writer and reader tasks on a negotiated stream.
    fn start<R, W>(r: BufReader<R>, w: W, params: &ExportParams) -> Conn
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(w, rx, shared.clone(), params.extended));
        tokio::spawn(read_loop(
            r,
            shared.clone(),
            params.meta_id,
            params.structured,
            params.extended,
        ));
        Conn {
            tx,
            shared,
            writer: Mutex::new(Some(writer)),
        }
    }

    fn is_dead(&self) -> bool {
        self.shared.pending.lock().dead.is_some()
    }

    /// Send `NBD_CMD_DISC` after the frames already queued and wait for the socket to close.
    async fn close(self) {
        let writer = self.writer.lock().take();
        drop(self.tx);
        if let Some(w) = writer {
            let _ = w.await;
        }
    }
}

/// A connection (or, with [`NbdClient::connect_multi`], several) to one NBD export, usable as a [`BlockDevice`].
pub struct NbdClient {
    info: DeviceInfo,
    params: ExportParams,
    export: String,
    /// At least one; more only if the server advertised `NBD_FLAG_CAN_MULTI_CONN`.
    conns: Vec<Conn>,
    /// Round-robin position over `conns`.
    next: AtomicUsize,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("export", &self.export)
            .field("info", &self.info)
            .finish()
    }
}

impl NbdClient {
    /// Connect to `export` at `addr`.
    pub async fn connect(addr: &NbdAddr, export: &str) -> Result<Self, NbdError> {
        Self::connect_with(addr, export, &ConnectOptions::default()).await
    }

    /// Connect using an NBD URI (`nbd://…`, `nbd+unix://…`).
    pub async fn connect_uri(uri: &str) -> Result<Self, NbdError> {
        Self::connect_uri_with(uri, &ConnectOptions::default()).await
    }

    /// Connect with `opts`: TLS and how many connections (see [`NbdClient::connect_multi`]).
    pub async fn connect_with(
        addr: &NbdAddr,
        export: &str,
        opts: &ConnectOptions,
    ) -> Result<Self, NbdError> {
        let (params, first) = open(addr, export, opts).await?;
        let mut conns = vec![first];
        if params.flags & FLAG_CAN_MULTI_CONN != 0 {
            while conns.len() < opts.connections {
                let (p, c) = open(addr, export, opts).await?;
                if !p.same_export(&params) {
                    for c in conns.into_iter().chain([c]) {
                        c.close().await;
                    }
                    return Err(malformed(
                        "multi-conn",
                        "connections to the same export were described differently",
                    ));
                }
                conns.push(c);
            }
        }
        Ok(Self::from_conns(export, params, conns))
    }

    /// Connect using any NBD URI with `opts`. A TLS URI (`nbds://`, `nbds+unix://`) needs `opts.tls`, and with
    /// `opts.tls` set every connection upgrades to TLS (or fails), whatever the scheme.
    pub async fn connect_uri_with(uri: &str, opts: &ConnectOptions) -> Result<Self, NbdError> {
        let u = NbdUri::parse(uri)?;
        if u.tls && opts.tls.is_none() {
            return Err(NbdError::BadUri {
                uri: uri.to_string(),
                reason: "a TLS URI needs TLS credentials (ConnectOptions::tls)",
            });
        }
        Self::connect_with(&u.addr, &u.export, opts).await
    }

    /// Connect to `export` with up to `n` connections, requests spread over them round-robin: one connection is
    /// one TCP stream and, on a server like Shale's, one I/O thread, so several carry more I/O (what `nbdcopy
    /// --connections` and qemu's `multi-conn` do).
    ///
    /// Extra connections are opened only if the server advertises `NBD_FLAG_CAN_MULTI_CONN`: the promise that a
    /// flush on any connection makes durable every write completed on all of them, which is what lets
    /// [`BlockDevice::flush`] go to just one. Otherwise this is [`NbdClient::connect`]. Every connection must
    /// describe the export the same way (size, flags), or the call fails. A connection that dies later is
    /// skipped while others live; its own in-flight requests fail.
    pub async fn connect_multi(addr: &NbdAddr, export: &str, n: usize) -> Result<Self, NbdError> {
        let opts = ConnectOptions {
            connections: n,
            ..Default::default()
        };
        Self::connect_with(addr, export, &opts).await
    }

    /// [`NbdClient::connect_multi`] with an NBD URI.
    pub async fn connect_uri_multi(uri: &str, n: usize) -> Result<Self, NbdError> {
        let opts = ConnectOptions {
            connections: n,
            ..Default::default()
        };
        Self::connect_uri_with(uri, &opts).await
    }

    /// How many connections carry this client's requests.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Ask the server at `addr` for its exports: `(name, description)` pairs.
    pub async fn list_exports(addr: &NbdAddr) -> Result<Vec<(String, String)>, NbdError> {
        Self::list_exports_with(addr, &ConnectOptions::default()).await
    }

    /// [`NbdClient::list_exports`] with the options of [`NbdClient::connect_with`]: over TLS with `opts.tls` (a
    /// server that requires TLS lists nothing without it), within `opts.handshake_timeout`.
    pub async fn list_exports_with(
        addr: &NbdAddr,
        opts: &ConnectOptions,
    ) -> Result<Vec<(String, String)>, NbdError> {
        async fn list<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
            r: &mut R,
            w: &mut W,
        ) -> Result<Vec<(String, String)>, NbdError> {
            send_option(w, &ClientOption::List).await?;
            let mut out = Vec::new();
            loop {
                let (h, data) = read_option_reply(r).await?;
                match h.reply_type {
                    REP_SERVER => out.push(codec::decode_rep_server(&data)?),
                    REP_ACK => break,
                    t => return Err(refused("LIST", t, &data)),
                }
            }
            send_option(w, &ClientOption::Abort).await?;
            let _ = read_option_reply(r).await;
            Ok(out)
        }
        async fn run<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
            r: R,
            mut w: W,
            tls: Option<(&ClientTls, Option<&str>)>,
        ) -> Result<Vec<(String, String)>, NbdError> {
            let mut r = BufReader::new(r);
            greet(&mut r, &mut w).await?;
            match tls {
                None => list(&mut r, &mut w).await,
                Some((tls, host)) => {
                    let (mut r, mut w) = start_tls(r, w, tls, host).await?;
                    list(&mut r, &mut w).await
                }
            }
        }
        let tls = opts.tls.as_ref();
        let listed = async {
            match addr {
                NbdAddr::Tcp(hp) => {
                    let (r, w) = TcpStream::connect(hp).await?.into_split();
                    run(r, w, tls.map(|t| (t, Some(tls::host_of(hp))))).await
                }
                NbdAddr::Unix(p) => {
                    let (r, w) = UnixStream::connect(p).await?.into_split();
                    run(r, w, tls.map(|t| (t, None))).await
                }
            }
        };
        tokio::time::timeout(opts.handshake_timeout, listed)
            .await
            .unwrap_or(Err(NbdError::Timeout))
    }

    /// Negotiate on an established byte stream and start the reader and writer tasks.
    pub async fn handshake<R, W>(r: R, w: W, export: &str) -> Result<Self, NbdError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (params, conn) = handshake_conn(r, w, export, None, true).await?;
        Ok(Self::from_conns(export, params, vec![conn]))
    }

    fn from_conns(export: &str, params: ExportParams, conns: Vec<Conn>) -> Self {
        let min = params.min_block.max(1);
        let block_size = if min < 512 && params.size.is_multiple_of(512) {
            512
        } else {
            min
        };
        let f = params.flags;
        let info = DeviceInfo {
            size: params.size,
            block_size,
            preferred_block_size: params.preferred_block.max(block_size),
            read_only: f & FLAG_READ_ONLY != 0,
            can_trim: f & FLAG_SEND_TRIM != 0,
            can_fast_zero: f & FLAG_SEND_FAST_ZERO != 0,
            can_multi_conn: f & FLAG_CAN_MULTI_CONN != 0,
        };
        debug!(export, ?info, structured = params.structured, meta = ?params.meta_id, connections = conns.len(), "NBD client connected");
        NbdClient {
            info,
            params,
            export: export.to_string(),
            conns,
            next: AtomicUsize::new(0),
        }
    }

    /// The export name this client selected.
    pub fn export_name(&self) -> &str {
        &self.export
    }

    /// The export's description, if the server sent one.
    pub fn description(&self) -> Option<&str> {
        self.params.description.as_deref()
    }

    /// Transmission flags the server advertised.
    pub fn transmission_flags(&self) -> u16 {
        self.params.flags
    }

    /// Structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.params.structured
    }

    /// Whether extended headers were negotiated: write-zeroes, trim and block status then go out as one
    /// request however long the range (64-bit lengths), where compact headers split them.
    pub fn extended_headers(&self) -> bool {
        self.params.extended
    }

    /// `base:allocation` block status is available.
    pub fn has_block_status(&self) -> bool {
        self.params.meta_id.is_some()
    }

    /// Largest read or write sent as one request (larger ones are split).
    pub fn max_payload(&self) -> u32 {
        self.params.max_payload
    }

    /// Disconnect cleanly: send `NBD_CMD_DISC` after the requests already submitted and wait for the socket to
    /// close.
    pub async fn disconnect(self) {
        futures::future::join_all(self.conns.into_iter().map(Conn::close)).await;
    }

    /// The connection for the next request: round-robin, skipping dead ones while any lives.
    fn conn(&self) -> &Conn {
        let n = self.conns.len();
        if n == 1 {
            // The usual case: no choice, and `submit` reports a dead connection itself.
            return &self.conns[0];
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.conns[(start + i) % n])
            .find(|c| !c.is_dead())
            .unwrap_or(&self.conns[start % n])
    }

    fn has(&self, flag: u16) -> bool {
        self.params.flags & flag != 0
    }

    async fn submit(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: Option<IoBuf>,
        op: Op,
    ) -> Result<Done> {
        let conn = self.conn();
        let handle = conn.shared.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = conn.shared.pending.lock();
            if let Some(why) = &p.dead {
                return Err(dead_error(why));
            }
            p.map.insert(
                handle,
                Pending {
                    offset,
                    op,
                    error: None,
                    tx,
                },
            );
        }
        let h = RequestHeader {
            flags,
            command,
            handle,
            offset,
            length,
        };
        if conn
            .tx
            .send(Frame::new(&h, self.params.extended, payload))
            .is_err()
        {
            conn.shared.pending.lock().map.remove(&handle);
            return Err(BlockError::Shutdown);
        }
        rx.await.map_err(|_| BlockError::Shutdown)?
    }

    async fn read_one(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len() as u64;
        match self
            .submit(
                CMD_READ,
                0,
                offset,
                len,
                None,
                Op::Read {
                    offset,
                    buf,
                    covered: Coverage::default(),
                },
            )
            .await?
        {
            Done::Read(b) => Ok(b),
            _ => Err(BlockError::Other("NBD read completed without data".into())),
        }
    }

    async fn write_one(&self, offset: u64, data: IoBuf, fua: bool) -> Result<()> {
        let len = data.len() as u64;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.submit(CMD_WRITE, flags, offset, len, Some(data), Op::Plain)
            .await
            .map(|_| ())
    }

    /// Zero a range by sending zero buffers, for servers without write-zeroes.
    async fn zero_by_writing(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let chunk = u64::from(self.params.max_payload.min(1 << 20));
        let mut pos = offset;
        while pos < offset + len {
            let n = chunk.min(offset + len - pos);
            self.write_one(pos, IoBuf::zeroed(n as usize), fua).await?;
            pos += n;
        }
        Ok(())
    }

    /// Largest effect length of one write-zeroes or block status request: the whole range with extended
    /// headers (64-bit lengths), otherwise [`MAX_NO_PAYLOAD_LEN`] rounded down to the block size.
    fn effect_step(&self) -> u64 {
        if self.params.extended {
            u64::MAX
        } else {
            let bs = u64::from(self.info.block_size);
            MAX_NO_PAYLOAD_LEN / bs * bs
        }
    }

    async fn zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        if !self.has(FLAG_SEND_WRITE_ZEROES) {
            return self.zero_by_writing(offset, len, fua).await;
        }
        let mut flags = if may_trim { 0 } else { CMD_FLAG_NO_HOLE };
        let emulate_fua = fua && !self.has(FLAG_SEND_FUA);
        if fua && !emulate_fua {
            flags |= CMD_FLAG_FUA;
        }
        let step = self.effect_step();
        let mut pos = offset;
        while pos < offset + len {
            let n = step.min(offset + len - pos);
            self.submit(CMD_WRITE_ZEROES, flags, pos, n, None, Op::Plain)
                .await?;
            pos += n;
        }
        if emulate_fua {
            self.flush().await?;
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for NbdClient {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        check_range(&self.info, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(buf);
        }
        let max = self.params.max_payload as usize;
        if buf.len() <= max {
            return self.read_one(offset, buf).await;
        }
        // Larger than one request: read in pieces (concurrently) and assemble.
        let mut buf = buf;
        let pieces = futures::future::try_join_all((0..buf.len()).step_by(max).map(|start| {
            let n = max.min(buf.len() - start);
            self.read_one(offset + start as u64, IoBuf::zeroed(n))
        }))
        .await?;
        let mut pos = 0;
        for p in pieces {
            buf[pos..pos + p.len()].copy_from_slice(&p);
            pos += p.len();
        }
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: IoBuf, flags: WriteFlags) -> Result<()> {
        check_write(&self.info, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let emulate_fua = flags.fua && !self.has(FLAG_SEND_FUA);
        let fua = flags.fua && !emulate_fua;
        let max = self.params.max_payload as usize;
        if data.len() <= max {
            self.write_one(offset, data, fua).await?;
        } else {
            futures::future::try_join_all(
                (0..data.len())
                    .step_by(max)
                    .map(|start| {
                        let end = (start + max).min(data.len());
                        (start, IoBuf::from_slice(&data[start..end]))
                    })
                    .map(|(start, piece)| self.write_one(offset + start as u64, piece, fua)),
            )
            .await?;
        }
        if emulate_fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        if !self.has(FLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.submit(CMD_FLUSH, 0, 0, 0, None, Op::Plain)
            .await
            .map(|_| ())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_write(&self.info, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.zeroes(offset, len, true, false).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        flags: WriteFlags,
    ) -> Result<()> {
        check_write(&self.info, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.zeroes(offset, len, may_trim, flags.fua).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.info, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.params.meta_id.is_none() {
            return Ok(vec![Extent {
                offset,
                length: len,
                kind: ExtentKind::Data,
            }]);
        }
        let n = len.min(self.effect_step());
        let op = Op::Status {
            offset,
            len: n,
            extents: Vec::new(),
        };
        match self
            .submit(CMD_BLOCK_STATUS, 0, offset, n, None, op)
            .await?
        {
            Done::Status(e) if !e.is_empty() => Ok(e),
            _ => Err(BlockError::Other(
                "NBD block status returned no extents".into(),
            )),
        }
    }
}

/// How [`NbdClient::connect_with`] connects.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Upgrade every connection to TLS with these settings (`NBD_OPT_STARTTLS` first, before any other
    /// option); a server that refuses ends the attempt rather than carrying on in the clear.
    pub tls: Option<ClientTls>,
    /// Open up to this many connections when the server advertises multi-conn (at least one is opened).
    pub connections: usize,
    /// Give up on a connection whose connect, TLS handshake and negotiation take longer than this: a server
    /// that accepts and then says nothing (hung, or not an NBD server) must not hang the caller.
    pub handshake_timeout: Duration,
    /// Ask for extended headers (`NBD_OPT_EXTENDED_HEADERS`: 64-bit write-zeroes, trim and block status
    /// lengths), falling back to structured replies when the server declines. On by default, as in qemu and
    /// libnbd; off forces the compact headers (for testing servers in that mode).
    pub extended_headers: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            tls: None,
            connections: 1,
            handshake_timeout: Duration::from_secs(30),
            extended_headers: true,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Negotiation.

/// Read-buffer size of a connection.
const READ_BUFFER: usize = 256 << 10;

/// Open one connection to `export` at `addr` and negotiate, within `opts.handshake_timeout` (over TLS with
/// `opts.tls`).
async fn open(
    addr: &NbdAddr,
    export: &str,
    opts: &ConnectOptions,
) -> Result<(ExportParams, Conn), NbdError> {
    tokio::time::timeout(
        opts.handshake_timeout,
        open_now(addr, export, opts.tls.as_ref(), opts.extended_headers),
    )
    .await
    .unwrap_or(Err(NbdError::Timeout))
}

async fn open_now(
    addr: &NbdAddr,
    export: &str,
    tls: Option<&ClientTls>,
    extended: bool,
) -> Result<(ExportParams, Conn), NbdError> {
    match addr {
        NbdAddr::Tcp(hp) => {
            let s = TcpStream::connect(hp).await?;
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            let tls = tls.map(|t| (t, Some(tls::host_of(hp))));
            handshake_conn(r, w, export, tls, extended).await
        }
        NbdAddr::Unix(p) => {
            let (r, w) = UnixStream::connect(p).await?.into_split();
            handshake_conn(r, w, export, tls.map(|t| (t, None)), extended).await
        }
    }
}

/// Negotiate on a byte stream (upgrading it to TLS first with `tls`: the settings and the host connected to),
/// then start its transmission tasks.
async fn handshake_conn<R, W>(
    r: R,
    mut w: W,
    export: &str,
    tls: Option<(&ClientTls, Option<&str>)>,
    extended: bool,
) -> Result<(ExportParams, Conn), NbdError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut r = BufReader::with_capacity(READ_BUFFER, r);
    let no_zeroes = greet(&mut r, &mut w).await?;
    let Some((tls, host)) = tls else {
        let params = negotiate(&mut r, &mut w, export, no_zeroes, extended).await?;
        let conn = Conn::start(r, w, &params);
        return Ok((params, conn));
    };
    let (mut r, mut w) = start_tls(r, w, tls, host).await?;
    let params = negotiate(&mut r, &mut w, export, no_zeroes, extended).await?;
    let conn = Conn::start(r, w, &params);
    Ok((params, conn))
}

/// A connection's halves after `NBD_OPT_STARTTLS` and the TLS handshake.
type TlsHalves<R, W> = (
    BufReader<ReadHalf<tokio_rustls::client::TlsStream<tls::Joined<R, W>>>>,
    WriteHalf<tokio_rustls::client::TlsStream<tls::Joined<R, W>>>,
);

/// Upgrade a greeted connection to TLS, checking the server's certificate against `host` (None: a Unix socket).
/// `STARTTLS` goes before any other option, so none travels in the clear, and any answer but ACK ends the
/// attempt (the spec: a client that wants TLS terminates rather than continue without it).
async fn start_tls<R, W>(
    mut r: BufReader<R>,
    mut w: W,
    tls: &ClientTls,
    host: Option<&str>,
) -> Result<TlsHalves<R, W>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let name = tls.name_for(host)?;
    send_option(&mut w, &ClientOption::StartTls).await?;
    let (h, data) = read_option_reply(&mut r).await?;
    if h.reply_type != REP_ACK {
        return Err(TlsError::Handshake(format!(
            "the server refused STARTTLS (reply {:#x}: {})",
            h.reply_type,
            String::from_utf8_lossy(&data)
        ))
        .into());
    }
    if !r.buffer().is_empty() {
        return Err(malformed(
            "STARTTLS",
            "the server sent cleartext after acknowledging STARTTLS",
        ));
    }
    let joined = tls::Joined {
        rd: r.into_inner(),
        wr: w,
    };
    let stream = tls.connect(name, joined).await?;
    let (r, w) = tokio::io::split(stream);
    Ok((BufReader::with_capacity(READ_BUFFER, r), w))
}

fn refused(option: &'static str, reply_type: u32, data: &[u8]) -> NbdError {
    let msg = String::from_utf8_lossy(data);
    NbdError::Refused {
        option,
        message: format!("reply {:#x}: {msg}", reply_type),
    }
}

/// Read the greeting and send client flags; returns whether `NO_ZEROES` is in effect.
async fn greet<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
) -> Result<bool, NbdError> {
    let mut g = [0u8; GREETING_LEN];
    r.read_exact(&mut g).await?;
    let flags = codec::decode_greeting(&g)?;
    let no_zeroes = flags & FLAG_NO_ZEROES != 0;
    let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    w.write_all(&cflags.to_be_bytes()).await?;
    Ok(no_zeroes)
}

async fn send_option<W: AsyncWrite + Unpin>(w: &mut W, opt: &ClientOption) -> Result<(), NbdError> {
    let mut v = Vec::new();
    codec::encode_option(opt, &mut v);
    w.write_all(&v).await?;
    w.flush().await?;
    Ok(())
}

async fn read_option_reply<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(codec::OptionReplyHeader, Vec<u8>), NbdError> {
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    r.read_exact(&mut h).await?;
    let h = codec::decode_option_reply_header(&h)?;
    if h.length > MAX_OPTION_REPLY {
        return Err(ProtocolError::Malformed {
            what: "option reply",
            detail: format!("{} bytes", h.length),
        }
        .into());
    }
    let mut data = vec![0u8; h.length as usize];
    r.read_exact(&mut data).await?;
    Ok((h, data))
}

/// The spec's rules for `NBD_INFO_BLOCK_SIZE`: minimum a power of two up to 64 KiB, preferred a power of two
/// at least the minimum, maximum at least the minimum. The client sizes its requests from these, so values
/// outside them (a zero-sized step, a minimum above 1 GiB) would make it loop or send requests no server takes.
fn check_block_sizes(min: u32, preferred: u32, max: u32) -> Result<(), NbdError> {
    let ok = min.is_power_of_two()
        && min <= 64 << 10
        && preferred.is_power_of_two()
        && preferred >= min
        && max >= min;
    if ok {
        Ok(())
    } else {
        Err(malformed(
            "NBD_INFO_BLOCK_SIZE",
            format!("minimum {min}, preferred {preferred}, maximum {max}"),
        ))
    }
}

async fn negotiate<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    export: &str,
    no_zeroes: bool,
    want_extended: bool,
) -> Result<ExportParams, NbdError> {
    // Extended headers first (they include structured replies); structured replies alone if declined.
    let mut extended = false;
    if want_extended {
        send_option(w, &ClientOption::ExtendedHeaders).await?;
        let (h, _) = read_option_reply(r).await?;
        extended = h.reply_type == REP_ACK;
    }
    let structured = if extended {
        true
    } else {
        send_option(w, &ClientOption::StructuredReply).await?;
        let (h, _) = read_option_reply(r).await?;
        h.reply_type == REP_ACK
    };

    let mut meta_id = None;
    if structured {
        let q = ClientOption::SetMetaContext {
            export: export.to_string(),
            queries: vec![BASE_ALLOCATION.to_string()],
        };
        send_option(w, &q).await?;
        loop {
            let (h, data) = read_option_reply(r).await?;
            match h.reply_type {
                REP_META_CONTEXT => {
                    let (id, name) = codec::decode_meta_context(&data)?;
                    if name == BASE_ALLOCATION {
                        meta_id = Some(id);
                    }
                }
                REP_ACK => break,
                REP_ERR_UNKNOWN => return Err(NbdError::NoSuchExport(export.to_string())),
                // Any other error: no block status, carry on.
                _ if h.reply_type & REP_FLAG_ERROR != 0 => break,
                t => return Err(refused("SET_META_CONTEXT", t, &data)),
            }
        }
    }

    let go = ClientOption::Go {
        name: export.to_string(),
        requests: vec![INFO_BLOCK_SIZE, INFO_DESCRIPTION],
    };
    send_option(w, &go).await?;
    let mut p = ExportParams {
        size: 0,
        flags: 0,
        min_block: 1,
        preferred_block: 4096,
        max_payload: DEFAULT_MAX_PAYLOAD,
        structured,
        extended,
        meta_id,
        description: None,
    };
    let mut have_export = false;
    loop {
        let (h, data) = read_option_reply(r).await?;
        match h.reply_type {
            REP_INFO => match codec::decode_info(&data)? {
                InfoReply::Export { size, flags } => {
                    p.size = size;
                    p.flags = flags;
                    have_export = true;
                }
                InfoReply::BlockSize {
                    min,
                    preferred,
                    max,
                } => {
                    check_block_sizes(min, preferred, max)?;
                    p.min_block = min.max(1);
                    p.preferred_block = preferred.max(1);
                    p.max_payload = max.min(u32::MAX - 8).max(min.max(1));
                }
                InfoReply::Description(d) => p.description = Some(d),
                InfoReply::Name(_) | InfoReply::Unknown(_) => {}
            },
            REP_ACK => break,
            REP_ERR_UNSUP if !extended => {
                // Old server: fall back to NBD_OPT_EXPORT_NAME (no error reporting possible). Not after
                // extended headers, which forbid it (and a server that offers them must support GO).
                send_option(w, &ClientOption::ExportName(export.to_string())).await?;
                p.size = r.read_u64().await?;
                p.flags = r.read_u16().await?;
                if !no_zeroes {
                    let mut z = [0u8; EXPORT_NAME_ZEROES];
                    r.read_exact(&mut z).await?;
                }
                have_export = true;
                break;
            }
            REP_ERR_UNKNOWN => return Err(NbdError::NoSuchExport(export.to_string())),
            t => return Err(refused("GO", t, &data)),
        }
    }
    if !have_export {
        return Err(ProtocolError::Malformed {
            what: "GO reply",
            detail: "no NBD_INFO_EXPORT".into(),
        }
        .into());
    }
    // Block status is only meaningful with the flags a server sends for it.
    if !p.structured {
        p.meta_id = None;
    }
    // Max payload must be a multiple of the minimum block size.
    p.max_payload = (p.max_payload / p.min_block * p.min_block).max(p.min_block);
    Ok(p)
}

// ---------------------------------------------------------------------------------------------------------
// Transmission tasks.

async fn write_loop<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::UnboundedReceiver<Frame>,
    shared: Arc<Shared>,
    extended: bool,
) {
    let mut w = BufWriter::with_capacity(256 << 10, w);
    let res: std::io::Result<()> = async {
        while let Some(f) = rx.recv().await {
            w.write_all(f.header()).await?;
            if let Some(p) = &f.payload {
                w.write_all(p).await?;
            }
            while let Ok(f) = rx.try_recv() {
                w.write_all(f.header()).await?;
                if let Some(p) = &f.payload {
                    w.write_all(p).await?;
                }
            }
            w.flush().await?;
        }
        // Every sender is gone: the client was dropped or disconnected. Say goodbye properly.
        let disc = RequestHeader {
            command: CMD_DISC,
            ..Default::default()
        };
        w.write_all(Frame::new(&disc, extended, None).header())
            .await?;
        w.flush().await?;
        w.shutdown().await
    }
    .await;
    if let Err(e) = res {
        debug!(error = %e, "NBD client writer stopped");
        shared.fail_all(format!("write failed: {e}"));
    }
}

/// Fails every pending and later request when the reader task ends, however it ends: with the reason it gives,
/// or, if its future is dropped unfinished (a panic in it, which tokio catches, or the runtime shutting down),
/// with a generic one. Without this, callers would wait for replies nobody reads.
struct FailPendingOnDrop<'a> {
    shared: &'a Shared,
    why: String,
}

impl Drop for FailPendingOnDrop<'_> {
    fn drop(&mut self) {
        self.shared.fail_all(std::mem::take(&mut self.why));
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut r: BufReader<R>,
    shared: Arc<Shared>,
    meta_id: Option<u32>,
    structured: bool,
    extended: bool,
) {
    let mut guard = FailPendingOnDrop {
        shared: &shared,
        why: "the reply reader stopped".into(),
    };
    guard.why = match read_replies(&mut r, &shared, meta_id, structured, extended).await {
        Ok(()) => "server closed the connection".to_string(),
        Err(e) => {
            warn!(error = %e, "NBD client connection failed");
            e.to_string()
        }
    };
}

fn take_pending(shared: &Shared, handle: u64) -> Result<Pending, NbdError> {
    shared.pending.lock().map.remove(&handle).ok_or_else(|| {
        ProtocolError::Malformed {
            what: "reply",
            detail: format!("unknown handle {handle:#x}"),
        }
        .into()
    })
}

fn complete(p: Pending) {
    let r = match p.error {
        Some(e) => Err(e),
        None => match p.op {
            Op::Read {
                offset,
                buf,
                covered,
            } if covered.total != buf.len() as u64 => Err(BlockError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "NBD server's reply to a read of {} bytes at {offset} covered {} of them",
                    buf.len(),
                    covered.total
                ),
            ))),
            op => Ok(done(op)),
        },
    };
    let _ = p.tx.send(r);
}

/// What a request that succeeded hands back.
fn done(op: Op) -> Done {
    match op {
        Op::Read { buf, .. } => Done::Read(buf),
        Op::Status { extents, .. } => Done::Status(extents),
        Op::Plain => Done::Ok,
    }
}

async fn read_replies<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    shared: &Shared,
    meta_id: Option<u32>,
    structured: bool,
    extended: bool,
) -> Result<(), NbdError> {
    let mut hdr = [0u8; EXT_CHUNK_HEADER_LEN];
    loop {
        match r.read_exact(&mut hdr[..4]).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        // Extended headers replace both other reply forms; without them, extended replies are not allowed.
        if (magic == EXTENDED_REPLY_MAGIC) != extended {
            return Err(ProtocolError::BadMagic {
                what: if extended { "extended reply" } else { "reply" },
                found: u64::from(magic),
            }
            .into());
        }
        let n = codec::reply_header_len(magic)?;
        r.read_exact(&mut hdr[4..n]).await?;
        match codec::decode_reply_header(&hdr[..n])? {
            ReplyHeader::Simple { error, handle } => {
                let mut p = take_pending(shared, handle)?;
                if let Err(e) = simple(r, &mut p, error, structured).await {
                    return Err(fail(p, e));
                }
                complete(p);
            }
            ReplyHeader::Chunk {
                flags,
                typ,
                handle,
                length,
                offset,
            } => {
                let mut p = take_pending(shared, handle)?;
                if offset.is_some_and(|o| o != p.offset) {
                    let e = malformed(
                        "extended reply",
                        format!("offset {offset:?} does not echo the request's {}", p.offset),
                    );
                    return Err(fail(p, e));
                }
                if let Err(e) = chunk(r, &mut p, typ, length, meta_id, extended).await {
                    return Err(fail(p, e));
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    complete(p);
                } else {
                    shared.pending.lock().map.insert(handle, p);
                }
            }
        }
    }
}

fn malformed(what: &'static str, detail: impl Into<String>) -> NbdError {
    ProtocolError::Malformed {
        what,
        detail: detail.into(),
    }
    .into()
}

/// Answer the request whose reply broke the connection with the reason (the others get it from
/// [`Shared::fail_all`]), and hand the error on.
fn fail(p: Pending, e: NbdError) -> NbdError {
    let _ = p.tx.send(Err(dead_error(&e.to_string())));
    e
}

/// Apply a simple reply to its pending request. Once structured replies are negotiated, the spec allows a simple
/// reply to a read only for an error, without data: a successful one is a protocol violation, and reading the
/// bytes after it as the read's data would hand the caller whatever frames follow.
async fn simple<R: AsyncRead + Unpin>(
    r: &mut R,
    p: &mut Pending,
    error: u32,
    structured: bool,
) -> Result<(), NbdError> {
    if error != 0 {
        p.error = Some(remote_error(error, ""));
    } else if structured && matches!(p.op, Op::Read { .. }) {
        return Err(malformed(
            "reply",
            "successful simple reply to READ after structured replies were negotiated",
        ));
    } else if let Op::Read { buf, covered, .. } = &mut p.op {
        r.read_exact(buf).await?;
        *covered = Coverage::whole(buf.len() as u64);
    } else if let Op::Status { .. } = &p.op {
        return Err(malformed("reply", "simple reply to BLOCK_STATUS"));
    }
    Ok(())
}

/// Where in a read's buffer a chunk of `n` bytes at export offset `off` goes, recording it as covered. A chunk
/// that is empty, reaches outside the request (arithmetic checked: the offset is the server's) or overlaps an
/// earlier chunk is a protocol violation.
fn place_chunk(
    req_offset: u64,
    buf_len: usize,
    covered: &mut Coverage,
    off: u64,
    n: u64,
    what: &'static str,
) -> Result<usize, NbdError> {
    let start = off
        .checked_sub(req_offset)
        .filter(|&s| n > 0 && s.checked_add(n).is_some_and(|end| end <= buf_len as u64));
    let Some(start) = start else {
        return Err(malformed(
            what,
            format!("{n} bytes at {off} outside the request ({buf_len} bytes at {req_offset})"),
        ));
    };
    if !covered.add(start, n) {
        return Err(malformed(
            what,
            format!("{n} bytes at {off} overlap an earlier chunk"),
        ));
    }
    Ok(start as usize)
}

/// Apply one structured chunk to its pending request.
async fn chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    p: &mut Pending,
    typ: u16,
    length: u64,
    meta_id: Option<u32>,
    extended: bool,
) -> Result<(), NbdError> {
    match typ {
        REPLY_TYPE_NONE => {
            if length != 0 {
                return Err(malformed("NONE chunk", format!("length {length}")));
            }
        }
        REPLY_TYPE_OFFSET_DATA => {
            let Op::Read {
                offset,
                buf,
                covered,
            } = &mut p.op
            else {
                return Err(malformed("OFFSET_DATA chunk", "not a read"));
            };
            if length < 9 {
                return Err(malformed("OFFSET_DATA chunk", format!("length {length}")));
            }
            let off = r.read_u64().await?;
            let n = length - 8;
            let start = place_chunk(*offset, buf.len(), covered, off, n, "OFFSET_DATA chunk")?;
            r.read_exact(&mut buf[start..start + n as usize]).await?;
        }
        REPLY_TYPE_OFFSET_HOLE => {
            let Op::Read {
                offset,
                buf,
                covered,
            } = &mut p.op
            else {
                return Err(malformed("OFFSET_HOLE chunk", "not a read"));
            };
            let mut d = [0u8; 12];
            if length != 12 {
                return Err(malformed("OFFSET_HOLE chunk", format!("length {length}")));
            }
            r.read_exact(&mut d).await?;
            let (off, n) = codec::decode_offset_hole(&d)?;
            let n = u64::from(n);
            let start = place_chunk(*offset, buf.len(), covered, off, n, "OFFSET_HOLE chunk")?;
            buf[start..start + n as usize].fill(0);
        }
        REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => {
            if length > MAX_CONTROL_CHUNK {
                return Err(malformed("BLOCK_STATUS chunk", format!("length {length}")));
            }
            if typ == REPLY_TYPE_BLOCK_STATUS_EXT && !extended {
                return Err(malformed(
                    "BLOCK_STATUS_EXT chunk",
                    "without extended headers",
                ));
            }
            let mut d = vec![0u8; length as usize];
            r.read_exact(&mut d).await?;
            let (id, descs) = codec::decode_block_status(typ, &d)?;
            let Op::Status {
                offset,
                len,
                extents,
            } = &mut p.op
            else {
                return Err(malformed(
                    "BLOCK_STATUS chunk",
                    "not a block status request",
                ));
            };
            if Some(id) != meta_id {
                return Ok(()); // a context we did not ask for: ignore
            }
            let end = *offset + *len;
            let mut pos = *offset;
            for (l, f) in descs {
                if pos >= end || l == 0 {
                    break;
                }
                let l = l.min(end - pos);
                let kind = if f & STATE_HOLE != 0 {
                    ExtentKind::Hole
                } else if f & STATE_ZERO != 0 {
                    ExtentKind::Zero
                } else {
                    ExtentKind::Data
                };
                match extents.last_mut() {
                    Some(e) if e.kind == kind => e.length += l,
                    _ => extents.push(Extent {
                        offset: pos,
                        length: l,
                        kind,
                    }),
                }
                pos += l;
            }
        }
        t if t & REPLY_TYPE_FLAG_ERROR != 0 => {
            if length > MAX_CONTROL_CHUNK {
                return Err(malformed("error chunk", format!("length {length}")));
            }
            let mut d = vec![0u8; length as usize];
            r.read_exact(&mut d).await?;
            let e = codec::decode_error_chunk(t, &d)?;
            if p.error.is_none() {
                p.error = Some(remote_error(e.error, &e.message));
            }
        }
        t => return Err(malformed("reply chunk", format!("unknown type {t}"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::DuplexStream;

    /// The bytes a scripted server answers a request with, given its handle.
    type ReplyTo = fn(u64) -> Vec<u8>;

    /// Export size the scripted server announces.
    const SIZE: u64 = 1 << 20;

    /// A client connected to a scripted server: the server half of the negotiation accepts structured replies
    /// and `base:allocation` (context 1) and answers GO with a [`SIZE`]-byte export and `block` (minimum,
    /// preferred, maximum) as `NBD_INFO_BLOCK_SIZE`. The test then reads requests from and writes replies to
    /// the returned stream, byte by byte as it likes: this is how a broken or hostile server is played.
    async fn scripted(block: (u32, u32, u32)) -> (Result<NbdClient, NbdError>, DuplexStream) {
        let (c, mut s) = tokio::io::duplex(1 << 20);
        let server = async move {
            s.write_all(&codec::encode_greeting(
                FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
            ))
            .await?;
            s.read_u32().await?;
            loop {
                let mut h = [0u8; OPTION_HEADER_LEN];
                s.read_exact(&mut h).await?;
                let (opt, len) = codec::decode_option_header(&h).map_err(std::io::Error::other)?;
                s.read_exact(&mut vec![0u8; len as usize]).await?;
                let mut out = Vec::new();
                let rep = |out: &mut Vec<u8>, typ, payload: &[u8]| {
                    codec::encode_option_reply(out, opt, typ, payload)
                };
                match opt {
                    OPT_STRUCTURED_REPLY => rep(&mut out, REP_ACK, &[]),
                    OPT_SET_META_CONTEXT => {
                        rep(
                            &mut out,
                            REP_META_CONTEXT,
                            &codec::encode_meta_context(1, BASE_ALLOCATION),
                        );
                        rep(&mut out, REP_ACK, &[]);
                    }
                    OPT_GO => {
                        let export = InfoReply::Export {
                            size: SIZE,
                            flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
                        };
                        let (min, preferred, max) = block;
                        let sizes = InfoReply::BlockSize {
                            min,
                            preferred,
                            max,
                        };
                        rep(&mut out, REP_INFO, &codec::encode_info(&export));
                        rep(&mut out, REP_INFO, &codec::encode_info(&sizes));
                        rep(&mut out, REP_ACK, &[]);
                        s.write_all(&out).await?;
                        return Ok::<_, std::io::Error>(s);
                    }
                    _ => rep(&mut out, REP_ERR_UNSUP, &[]),
                }
                s.write_all(&out).await?;
            }
        };
        let (r, w) = tokio::io::split(c);
        let (client, server) = tokio::join!(NbdClient::handshake(r, w, "x"), server);
        (client, server.expect("scripted negotiation"))
    }

    /// Read one request header the client sent.
    async fn request(s: &mut DuplexStream) -> RequestHeader {
        let mut h = [0u8; REQUEST_HEADER_LEN];
        s.read_exact(&mut h).await.expect("request header");
        codec::decode_request_header(&h).expect("request magic")
    }

    /// An `OFFSET_DATA` chunk of `len` bytes of `fill` at `offset`.
    fn data_chunk(flags: u16, handle: u64, offset: u64, len: u32, fill: u8) -> Vec<u8> {
        let mut v = codec::encode_offset_data_header(flags, handle, offset, len).to_vec();
        v.resize(v.len() + len as usize, fill);
        v
    }

    /// Read `len` bytes at `offset` into a buffer that starts out as 0xEE, giving up after five seconds.
    async fn read(client: &NbdClient, offset: u64, len: usize) -> Result<IoBuf> {
        let mut buf = IoBuf::zeroed(len);
        buf.fill(0xEE);
        tokio::time::timeout(Duration::from_secs(5), client.read(offset, buf))
            .await
            .expect("a read must end, whatever the server sends")
    }

    #[test]
    fn coverage_merges_runs_and_refuses_overlaps() {
        let mut c = Coverage::default();
        assert!(c.add(8, 4));
        assert!(c.add(0, 4));
        assert!(c.add(16, 4));
        assert!(!c.add(2, 4), "overlaps [0, 4)");
        assert!(!c.add(11, 6), "overlaps [8, 12) and [16, 20)");
        assert!(!c.add(0, 100), "covers everything");
        assert!(c.add(4, 4), "fills the gap between [0, 4) and [8, 12)");
        assert_eq!(c.runs.as_slice(), [(0, 12), (16, 20)]);
        assert!(c.add(12, 4));
        assert_eq!((c.runs.as_slice(), c.total), (&[(0, 20)][..], 20));
    }

    #[tokio::test]
    async fn block_sizes_outside_the_spec_fail_the_handshake() {
        for bad in [
            (3, 4096, 1 << 25),
            (1 << 20, 1 << 20, 1 << 25),
            (4096, 512, 1 << 25),
            (4096, 4096, 512),
            (0, 4096, 1 << 25),
        ] {
            let (client, _s) = scripted(bad).await;
            let err = client.expect_err("bad block sizes accepted");
            assert!(
                err.to_string().contains("NBD_INFO_BLOCK_SIZE"),
                "{bad:?}: {err}"
            );
        }
        let (client, _s) = scripted((512, 4096, 1 << 25)).await;
        assert_eq!(client.expect("valid sizes").info().block_size, 512);
    }

    /// Have `client` read 8 KiB at 4 KiB while the scripted server answers the request with the bytes
    /// `reply(handle)` returns.
    async fn exchange(
        client: &NbdClient,
        s: &mut DuplexStream,
        reply: impl FnOnce(u64) -> Vec<u8>,
    ) -> Result<IoBuf> {
        let script = async {
            let h = request(s).await;
            assert_eq!((h.command, h.offset, h.length), (CMD_READ, 4096, 8192));
            s.write_all(&reply(h.handle)).await.expect("reply");
        };
        // Bounded as a whole: if the request never reaches this server (it went to another connection), the
        // script would wait for it forever.
        tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(read(client, 4096, 8192), script).0
        })
        .await
        .expect("the request reached the scripted server and was answered")
    }

    /// Data at 8 KiB then a hole at 4 KiB: a whole, valid reply sent out of order.
    fn valid_reply(handle: u64) -> Vec<u8> {
        let mut v = data_chunk(0, handle, 8192, 4096, 7);
        v.extend(codec::encode_offset_hole(
            REPLY_FLAG_DONE,
            handle,
            4096,
            4096,
        ));
        v
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Whatever reply frames a server sends to a read (chunks of every type, for this handle or another,
        /// anywhere, of any length, in any order, with or without DONE, then the connection closed), the read
        /// ends, and if it succeeds every byte the caller gets was sent for it: none is left from before.
        #[test]
        fn any_reply_to_a_read_ends_it_and_never_returns_stale_bytes(
            frames in proptest::collection::vec(
                (0u8..7, proptest::bool::weighted(0.85), -8192i64..16384, 0u32..12288, proptest::bool::ANY),
                0..6,
            )
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let (client, mut s) = scripted((1, 4096, 1 << 25)).await;
                let client = client.expect("handshake");
                let script = async move {
                    let handle = request(&mut s).await.handle;
                    let mut out = Vec::new();
                    for (i, &(kind, ours, delta, len, done)) in frames.iter().enumerate() {
                        let h = if ours { handle } else { handle + 1 + i as u64 };
                        let off = 4096u64.wrapping_add_signed(delta);
                        let flags = if done { REPLY_FLAG_DONE } else { 0 };
                        match kind {
                            0 => out.extend(data_chunk(flags, h, off, len, i as u8 + 1)),
                            1 => out.extend(codec::encode_offset_hole(flags, h, off, len)),
                            2 => out.extend(codec::encode_chunk_header(flags, REPLY_TYPE_NONE, h, 0)),
                            3 => codec::encode_error_chunk(&mut out, h, 5, "injected"),
                            4 => {
                                out.extend(codec::encode_simple_reply(0, h));
                                out.resize(out.len() + len as usize, i as u8 + 1);
                            }
                            5 => codec::encode_block_status(&mut out, h, 1, &[(len, 0)]),
                            _ => out.extend(codec::encode_chunk_header(flags, 77, h, len)),
                        }
                    }
                    // A client that gave up on the connection stops reading: the write may fail.
                    let _ = s.write_all(&out).await;
                    // Dropped here: the connection closes after the frames.
                };
                let (got, ()) = tokio::join!(read(&client, 4096, 8192), script);
                if let Ok(buf) = got {
                    assert!(!buf.contains(&0xEE), "a successful read returned bytes nobody sent");
                }
            });
        }
    }

    #[tokio::test]
    async fn a_dead_connection_is_skipped_while_another_lives() {
        let (a, s0) = scripted((1, 4096, 1 << 25)).await;
        let (b, mut s1) = scripted((1, 4096, 1 << 25)).await;
        let NbdClient { params, conns, .. } = a.expect("handshake");
        let NbdClient { conns: more, .. } = b.expect("handshake");
        let client = NbdClient::from_conns("x", params, conns.into_iter().chain(more).collect());
        assert_eq!(client.connections(), 2);

        drop(s0); // the first connection's server hangs up
        for _ in 0..100 {
            if client.conns[0].is_dead() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(client.conns[0].is_dead());
        for _ in 0..4 {
            exchange(&client, &mut s1, valid_reply)
                .await
                .expect("every request goes to the live connection");
        }
        drop(s1);
        let err = read(&client, 0, 4096)
            .await
            .expect_err("no connection left");
        assert!(err.to_string().contains("NBD connection lost"), "{err}");
    }

    #[tokio::test]
    async fn read_chunks_must_cover_the_request_once_and_stay_inside_it() {
        let (client, mut s) = scripted((1, 4096, 1 << 25)).await;
        let client = client.expect("handshake");
        let got = exchange(&client, &mut s, valid_reply)
            .await
            .expect("valid reply");
        assert!(got[..4096].iter().all(|&b| b == 0) && got[4096..].iter().all(|&b| b == 7));

        // Half the request, then DONE: the caller must not get the other half's old bytes. The stream is still
        // in step, so the connection goes on.
        let short = |h| {
            let mut v = data_chunk(0, h, 4096, 4096, 5);
            v.extend(codec::encode_none(h));
            v
        };
        let err = exchange(&client, &mut s, short)
            .await
            .expect_err("short reply");
        assert!(err.to_string().contains("covered 4096"), "{err}");
        exchange(&client, &mut s, valid_reply)
            .await
            .expect("the connection survives a short reply");

        // Overlapping chunks: the server is broken, the connection is given up.
        let overlap = |h| {
            let mut v = data_chunk(0, h, 4096, 4096, 1);
            v.extend(data_chunk(REPLY_FLAG_DONE, h, 6144, 4096, 2));
            v
        };
        let err = exchange(&client, &mut s, overlap)
            .await
            .expect_err("overlap");
        assert!(err.to_string().contains("overlap"), "{err}");
        let after = read(&client, 0, 4096)
            .await
            .expect_err("connection given up");
        assert!(after.to_string().contains("overlap"), "{after}");

        // Offsets whose arithmetic overflows, empty holes, unknown handles: each ends its connection with an
        // error for the caller, never a panic or a hang.
        let hostile: [(&str, ReplyTo); 4] = [
            // Offset - 4096 + 8192 wraps around to fewer than 8192.
            ("data near 2^64", |h| {
                data_chunk(REPLY_FLAG_DONE, h, u64::MAX - 100, 8192, 1)
            }),
            ("hole near 2^64", |h| {
                codec::encode_offset_hole(REPLY_FLAG_DONE, h, u64::MAX - 100, 8192).to_vec()
            }),
            ("empty hole", |h| {
                codec::encode_offset_hole(REPLY_FLAG_DONE, h, 4096, 0).to_vec()
            }),
            ("unknown handle", |h| {
                codec::encode_simple_reply(0, h ^ 0x55).to_vec()
            }),
        ];
        for (what, reply) in hostile {
            let (client, mut s) = scripted((1, 4096, 1 << 25)).await;
            let client = client.expect("handshake");
            let err = exchange(&client, &mut s, reply).await.expect_err(what);
            assert!(
                err.to_string().contains("NBD connection lost"),
                "{what}: {err}"
            );
            read(&client, 0, 4096).await.expect_err(what);
        }
    }

    #[tokio::test]
    async fn a_server_that_says_nothing_times_out() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = NbdAddr::Tcp(l.local_addr().unwrap().to_string());
        // Accepts, then never sends the greeting.
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let opts = ConnectOptions {
            handshake_timeout: Duration::from_millis(200),
            ..Default::default()
        };
        let t0 = std::time::Instant::now();
        let e = NbdClient::connect_with(&addr, "x", &opts)
            .await
            .unwrap_err();
        assert!(matches!(e, NbdError::Timeout), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10));
        let e = NbdClient::list_exports_with(&addr, &opts)
            .await
            .unwrap_err();
        assert!(matches!(e, NbdError::Timeout), "{e}");
        hold.abort();
    }

    #[test]
    fn uris() {
        assert_eq!(
            NbdAddr::parse_uri("nbd://127.0.0.1:1234/vdi").unwrap(),
            (NbdAddr::Tcp("127.0.0.1:1234".into()), "vdi".into())
        );
        assert_eq!(
            NbdAddr::parse_uri("nbd://host").unwrap(),
            (NbdAddr::Tcp("host:10809".into()), "".into())
        );
        assert_eq!(
            NbdAddr::parse_uri("nbd://[::1]/x").unwrap(),
            (NbdAddr::Tcp("[::1]:10809".into()), "x".into())
        );
        assert_eq!(
            NbdAddr::parse_uri("nbd+unix:///snap?socket=/run/s.sock").unwrap(),
            (NbdAddr::Unix("/run/s.sock".into()), "snap".into())
        );
        assert!(NbdAddr::parse_uri("http://x").is_err());
        assert!(NbdAddr::parse_uri("nbd+unix:///x").is_err());
        assert!(NbdAddr::parse_uri("nbdx://host/x").is_err());
        // TLS schemes: parsed by NbdUri, refused where no credentials can be given.
        assert_eq!(
            NbdUri::parse("nbds://h:1/v?tls-certificates=/pki").unwrap(),
            NbdUri {
                addr: NbdAddr::Tcp("h:1".into()),
                export: "v".into(),
                tls: true
            }
        );
        assert_eq!(
            NbdUri::parse("nbds+unix:///v?socket=/s&tls-certificates=/pki").unwrap(),
            NbdUri {
                addr: NbdAddr::Unix("/s".into()),
                export: "v".into(),
                tls: true
            }
        );
        assert!(!NbdUri::parse("nbd://h/v").unwrap().tls);
        assert!(matches!(
            NbdAddr::parse_uri("nbds://h/v"),
            Err(NbdError::BadUri { .. })
        ));
    }
}
