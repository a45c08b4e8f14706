//! An NBD client that is a [`BlockDevice`]: a remote export used like a local volume.
//!
//! Other hosts reach remote VM disks through it, and the tests use it to drive the server. One connection
//! carries many requests at once: callers submit through a channel to a writer task (which batches frames
//! into few syscalls), and a reader task matches replies to callers by handle, so replies may arrive in any
//! order. Reads use structured replies when the server offers them (holes arrive as `OFFSET_HOLE` chunks and
//! are zero-filled locally), and block status uses `base:allocation`.
//!
//! Semantics follow the [`BlockDevice`] contract, which is stricter than NBD in one place: `discard` must leave
//! the range reading as zeroes, while `NBD_CMD_TRIM` promises nothing. So `discard` is sent as
//! `NBD_CMD_WRITE_ZEROES` that may punch holes, and only falls back to writing zero buffers when the server has
//! no write-zeroes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::codec::{self, ClientOption, InfoReply, ProtocolError, ReplyHeader, RequestHeader};
use super::proto::*;
use super::NbdError;
use crate::buf::IoBuf;
use crate::device::{
    check_range, check_write, BlockDevice, DeviceInfo, Extent, ExtentKind, WriteFlags,
};
use crate::error::{errno, BlockError, Result};

/// Largest option reply payload the client accepts during negotiation.
const MAX_OPTION_REPLY: u32 = 1 << 20;
/// Largest non-data chunk payload (block status, errors) accepted in transmission.
const MAX_CONTROL_CHUNK: u32 = 16 << 20;
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
    /// Parse an NBD URI (`nbd://host[:port]/export`, `nbd+unix:///export?socket=/path`) into the address and
    /// the export name.
    pub fn parse_uri(uri: &str) -> Result<(NbdAddr, String), NbdError> {
        let bad = |reason| NbdError::BadUri {
            uri: uri.to_string(),
            reason,
        };
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
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
        if let Some(rest) = uri.strip_prefix("nbd://") {
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
        Err(bad("scheme must be nbd:// or nbd+unix://"))
    }
}

/// A frame for the writer task.
struct Frame {
    header: [u8; REQUEST_HEADER_LEN],
    payload: Option<IoBuf>,
}

/// What a pending request is collecting.
enum Op {
    Read {
        offset: u64,
        buf: IoBuf,
    },
    Status {
        offset: u64,
        len: u64,
        extents: Vec<Extent>,
    },
    Plain,
}

enum Done {
    Read(IoBuf),
    Status(Vec<Extent>),
    Ok,
}

struct Pending {
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
    meta_id: Option<u32>,
    description: Option<String>,
}

/// A connection to one NBD export, usable as a [`BlockDevice`].
pub struct NbdClient {
    info: DeviceInfo,
    params: ExportParams,
    export: String,
    tx: mpsc::UnboundedSender<Frame>,
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
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
        match addr {
            NbdAddr::Tcp(hp) => {
                let s = TcpStream::connect(hp).await?;
                s.set_nodelay(true)?;
                let (r, w) = s.into_split();
                Self::handshake(r, w, export).await
            }
            NbdAddr::Unix(p) => {
                let s = UnixStream::connect(p).await?;
                let (r, w) = s.into_split();
                Self::handshake(r, w, export).await
            }
        }
    }

    /// Connect using an NBD URI (`nbd://…`, `nbd+unix://…`).
    pub async fn connect_uri(uri: &str) -> Result<Self, NbdError> {
        let (addr, export) = NbdAddr::parse_uri(uri)?;
        Self::connect(&addr, &export).await
    }

    /// Ask the server at `addr` for its exports: `(name, description)` pairs.
    pub async fn list_exports(addr: &NbdAddr) -> Result<Vec<(String, String)>, NbdError> {
        async fn run<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
            r: R,
            mut w: W,
        ) -> Result<Vec<(String, String)>, NbdError> {
            let mut r = BufReader::new(r);
            greet(&mut r, &mut w).await?;
            send_option(&mut w, &ClientOption::List).await?;
            let mut out = Vec::new();
            loop {
                let (h, data) = read_option_reply(&mut r).await?;
                match h.reply_type {
                    REP_SERVER => out.push(codec::decode_rep_server(&data)?),
                    REP_ACK => break,
                    t => return Err(refused("LIST", t, &data)),
                }
            }
            send_option(&mut w, &ClientOption::Abort).await?;
            let _ = read_option_reply(&mut r).await;
            Ok(out)
        }
        match addr {
            NbdAddr::Tcp(hp) => {
                let (r, w) = TcpStream::connect(hp).await?.into_split();
                run(r, w).await
            }
            NbdAddr::Unix(p) => {
                let (r, w) = UnixStream::connect(p).await?.into_split();
                run(r, w).await
            }
        }
    }

    /// Negotiate on an established byte stream and start the reader and writer tasks.
    pub async fn handshake<R, W>(r: R, mut w: W, export: &str) -> Result<Self, NbdError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut r = BufReader::with_capacity(256 << 10, r);
        let no_zeroes = greet(&mut r, &mut w).await?;
        let params = negotiate(&mut r, &mut w, export, no_zeroes).await?;
        let min = params.min_block.max(1);
        let block_size = if min < 512 && params.size % 512 == 0 {
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
        debug!(export, ?info, structured = params.structured, meta = ?params.meta_id, "NBD client connected");
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(w, rx, shared.clone()));
        tokio::spawn(read_loop(r, shared.clone(), params.meta_id));
        Ok(NbdClient {
            info,
            params,
            export: export.to_string(),
            tx,
            shared,
            writer: Mutex::new(Some(writer)),
        })
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
        let writer = self.writer.lock().take();
        drop(self.tx);
        if let Some(w) = writer {
            let _ = w.await;
        }
    }

    fn has(&self, flag: u16) -> bool {
        self.params.flags & flag != 0
    }

    async fn submit(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<IoBuf>,
        op: Op,
    ) -> Result<Done> {
        let handle = self.shared.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.shared.pending.lock();
            if let Some(why) = &p.dead {
                return Err(dead_error(why));
            }
            p.map.insert(
                handle,
                Pending {
                    op,
                    error: None,
                    tx,
                },
            );
        }
        let header = codec::encode_request_header(&RequestHeader {
            flags,
            command,
            handle,
            offset,
            length,
        });
        if self.tx.send(Frame { header, payload }).is_err() {
            self.shared.pending.lock().map.remove(&handle);
            return Err(BlockError::Shutdown);
        }
        rx.await.map_err(|_| BlockError::Shutdown)?
    }

    async fn read_one(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len() as u32;
        match self
            .submit(CMD_READ, 0, offset, len, None, Op::Read { offset, buf })
            .await?
        {
            Done::Read(b) => Ok(b),
            _ => Err(BlockError::Other("NBD read completed without data".into())),
        }
    }

    async fn write_one(&self, offset: u64, data: IoBuf, fua: bool) -> Result<()> {
        let len = data.len() as u32;
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

    async fn zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        if !self.has(FLAG_SEND_WRITE_ZEROES) {
            return self.zero_by_writing(offset, len, fua).await;
        }
        let mut flags = if may_trim { 0 } else { CMD_FLAG_NO_HOLE };
        let emulate_fua = fua && !self.has(FLAG_SEND_FUA);
        if fua && !emulate_fua {
            flags |= CMD_FLAG_FUA;
        }
        let step =
            MAX_NO_PAYLOAD_LEN / u64::from(self.info.block_size) * u64::from(self.info.block_size);
        let mut pos = offset;
        while pos < offset + len {
            let n = step.min(offset + len - pos);
            self.submit(CMD_WRITE_ZEROES, flags, pos, n as u32, None, Op::Plain)
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
        let step =
            MAX_NO_PAYLOAD_LEN / u64::from(self.info.block_size) * u64::from(self.info.block_size);
        let n = len.min(step);
        let op = Op::Status {
            offset,
            len: n,
            extents: Vec::new(),
        };
        match self
            .submit(CMD_BLOCK_STATUS, 0, offset, n as u32, None, op)
            .await?
        {
            Done::Status(e) if !e.is_empty() => Ok(e),
            _ => Err(BlockError::Other(
                "NBD block status returned no extents".into(),
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Negotiation.

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

async fn negotiate<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    export: &str,
    no_zeroes: bool,
) -> Result<ExportParams, NbdError> {
    send_option(w, &ClientOption::StructuredReply).await?;
    let (h, _) = read_option_reply(r).await?;
    let structured = h.reply_type == REP_ACK;

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
                    p.min_block = min.max(1);
                    p.preferred_block = preferred.max(1);
                    p.max_payload = max.min(u32::MAX - 8).max(min.max(1));
                }
                InfoReply::Description(d) => p.description = Some(d),
                InfoReply::Name(_) | InfoReply::Unknown(_) => {}
            },
            REP_ACK => break,
            REP_ERR_UNSUP => {
                // Old server: fall back to NBD_OPT_EXPORT_NAME (no error reporting possible).
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
) {
    let mut w = BufWriter::with_capacity(256 << 10, w);
    let res: std::io::Result<()> = async {
        while let Some(f) = rx.recv().await {
            w.write_all(&f.header).await?;
            if let Some(p) = &f.payload {
                w.write_all(p).await?;
            }
            while let Ok(f) = rx.try_recv() {
                w.write_all(&f.header).await?;
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
        w.write_all(&codec::encode_request_header(&disc)).await?;
        w.flush().await?;
        w.shutdown().await
    }
    .await;
    if let Err(e) = res {
        debug!(error = %e, "NBD client writer stopped");
        shared.fail_all(format!("write failed: {e}"));
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut r: BufReader<R>,
    shared: Arc<Shared>,
    meta_id: Option<u32>,
) {
    let why = match read_replies(&mut r, &shared, meta_id).await {
        Ok(()) => "server closed the connection".to_string(),
        Err(e) => {
            warn!(error = %e, "NBD client connection failed");
            e.to_string()
        }
    };
    shared.fail_all(why);
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
        None => Ok(match p.op {
            Op::Read { buf, .. } => Done::Read(buf),
            Op::Status { extents, .. } => Done::Status(extents),
            Op::Plain => Done::Ok,
        }),
    };
    let _ = p.tx.send(r);
}

async fn read_replies<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    shared: &Shared,
    meta_id: Option<u32>,
) -> Result<(), NbdError> {
    let mut hdr = [0u8; CHUNK_HEADER_LEN];
    loop {
        match r.read_exact(&mut hdr[..4]).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let n = codec::reply_header_len(magic)?;
        r.read_exact(&mut hdr[4..n]).await?;
        match codec::decode_reply_header(&hdr[..n])? {
            ReplyHeader::Simple { error, handle } => {
                let mut p = take_pending(shared, handle)?;
                if error != 0 {
                    p.error = Some(remote_error(error, ""));
                } else if let Op::Read { buf, .. } = &mut p.op {
                    r.read_exact(buf).await?;
                } else if let Op::Status { .. } = &p.op {
                    return Err(ProtocolError::Malformed {
                        what: "reply",
                        detail: "simple reply to BLOCK_STATUS".into(),
                    }
                    .into());
                }
                complete(p);
            }
            ReplyHeader::Chunk {
                flags,
                typ,
                handle,
                length,
            } => {
                let mut p = take_pending(shared, handle)?;
                chunk(r, &mut p, typ, length, meta_id).await?;
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

/// Apply one structured chunk to its pending request.
async fn chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    p: &mut Pending,
    typ: u16,
    length: u32,
    meta_id: Option<u32>,
) -> Result<(), NbdError> {
    match typ {
        REPLY_TYPE_NONE => {
            if length != 0 {
                return Err(malformed("NONE chunk", format!("length {length}")));
            }
        }
        REPLY_TYPE_OFFSET_DATA => {
            let Op::Read { offset, buf } = &mut p.op else {
                return Err(malformed("OFFSET_DATA chunk", "not a read"));
            };
            if length < 9 {
                return Err(malformed("OFFSET_DATA chunk", format!("length {length}")));
            }
            let off = r.read_u64().await?;
            let n = (length - 8) as u64;
            let start = off
                .checked_sub(*offset)
                .filter(|s| s + n <= buf.len() as u64);
            let Some(start) = start else {
                return Err(malformed(
                    "OFFSET_DATA chunk",
                    format!("{n} bytes at {off} outside the request"),
                ));
            };
            r.read_exact(&mut buf[start as usize..(start + n) as usize])
                .await?;
        }
        REPLY_TYPE_OFFSET_HOLE => {
            let Op::Read { offset, buf } = &mut p.op else {
                return Err(malformed("OFFSET_HOLE chunk", "not a read"));
            };
            let mut d = [0u8; 12];
            if length != 12 {
                return Err(malformed("OFFSET_HOLE chunk", format!("length {length}")));
            }
            r.read_exact(&mut d).await?;
            let (off, n) = codec::decode_offset_hole(&d)?;
            let n = u64::from(n);
            let start = off
                .checked_sub(*offset)
                .filter(|s| s + n <= buf.len() as u64);
            let Some(start) = start else {
                return Err(malformed(
                    "OFFSET_HOLE chunk",
                    format!("{n} bytes at {off} outside the request"),
                ));
            };
            buf[start as usize..(start + n) as usize].fill(0);
        }
        REPLY_TYPE_BLOCK_STATUS => {
            if length > MAX_CONTROL_CHUNK {
                return Err(malformed("BLOCK_STATUS chunk", format!("length {length}")));
            }
            let mut d = vec![0u8; length as usize];
            r.read_exact(&mut d).await?;
            let (id, descs) = codec::decode_block_status(&d)?;
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
                let l = u64::from(l).min(end - pos);
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
    }
}
