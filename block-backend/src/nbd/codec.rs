//! One NBD codec for both ends: bytes to typed messages and back.
//!
//! The server and the client share every encoder and decoder here, so a frame the client writes is by
//! construction a frame the server parses, and the round-trip unit tests below cover both directions at once.
//!
//! Decoding follows "parse, validate, then execute" (see STYLE.md): [`decode_request`] turns a 28-byte request
//! header plus the negotiated [`Negotiated`] parameters into a typed [`Request`] that is already known to be in
//! range, aligned, permitted and correctly flagged, or into a [`ProtocolError`] that says exactly what reply (or
//! disconnect) it deserves. The code that executes requests never sees raw bytes.
//!
//! Functions here are pure (no I/O): the callers read exactly the header lengths named in [`super::proto`],
//! and payload lengths that these decoders return.

use super::proto::*;
use crate::error::errno;

/// A violation of the NBD protocol by the peer, or a request that must be refused.
///
/// [`ProtocolError::is_fatal`] says whether the connection can continue: a refused request gets an error reply
/// and the session goes on; a frame that leaves the byte stream unsynchronised ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A magic number did not match: the stream is not NBD or lost synchronisation.
    #[error("bad {what} magic {found:#x}")]
    BadMagic {
        /// Which frame was being read.
        what: &'static str,
        /// The value received.
        found: u64,
    },
    /// The server speaks oldstyle negotiation or not fixed newstyle; Shale needs fixed newstyle.
    #[error("server does not offer fixed newstyle negotiation")]
    NotFixedNewstyle,
    /// The client set flags the server did not offer.
    #[error("client flags {0:#x} not offered by the server")]
    BadClientFlags(u32),
    /// An option's data is longer than the server accepts during negotiation.
    #[error("option {} carries {len} bytes, more than the {max}-byte limit", option_name(*option))]
    OptionTooLarge {
        /// Option number.
        option: u32,
        /// Declared data length.
        len: u32,
        /// Limit.
        max: u32,
    },
    /// An option is known but its data is malformed; answered with `NBD_REP_ERR_INVALID`.
    #[error("invalid {} option: {reason}", option_name(*option))]
    InvalidOption {
        /// Option number.
        option: u32,
        /// What is wrong.
        reason: String,
    },
    /// A write's payload is larger than the advertised maximum: the server answers `EOVERFLOW` and closes,
    /// rather than reading up to 4 GiB of data it will not use.
    #[error("request {handle:#x}: payload of {len} bytes exceeds the {max}-byte maximum")]
    PayloadTooLarge {
        /// Request handle.
        handle: u64,
        /// Request offset (echoed in an extended error reply).
        offset: u64,
        /// Declared payload length.
        len: u64,
        /// Advertised maximum.
        max: u32,
    },
    /// A request that is well-framed but refused; answered with `errno`, after discarding `skip` payload bytes.
    #[error("{} request {handle:#x} refused (errno {errno}): {reason}", command_name(*command))]
    Rejected {
        /// Request handle (echoed in the error reply).
        handle: u64,
        /// Request offset (echoed in an extended error reply).
        offset: u64,
        /// Command number as received.
        command: u16,
        /// Error value for the reply.
        errno: i32,
        /// Payload bytes that follow the header and must be read and dropped to stay in sync.
        skip: u64,
        /// Why, for logs and structured error messages.
        reason: &'static str,
    },
    /// A frame from the peer is inconsistent (lengths, types, strings).
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// Which frame.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
}

impl ProtocolError {
    /// True when the connection cannot continue after this error.
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            ProtocolError::Rejected { .. } | ProtocolError::InvalidOption { .. }
        )
    }

    fn malformed(what: &'static str, detail: impl Into<String>) -> Self {
        ProtocolError::Malformed {
            what,
            detail: detail.into(),
        }
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A cursor over option or reply data that turns short reads into typed errors instead of panics.
struct Cursor<'a> {
    data: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(data: &'a [u8], what: &'static str) -> Self {
        Cursor { data, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.data.len() < n {
            return Err(format!(
                "{} truncated: need {n} more bytes, have {}",
                self.what,
                self.data.len()
            ));
        }
        let (a, b) = self.data.split_at(n);
        self.data = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, String> {
        self.take(2).map(be16)
    }
    fn u32(&mut self) -> Result<u32, String> {
        self.take(4).map(be32)
    }
    fn u64(&mut self) -> Result<u64, String> {
        self.take(8).map(be64)
    }
    fn string(&mut self, len: usize) -> Result<String, String> {
        let raw = self.take(len)?;
        check_string(raw)
    }
    fn rest_string(&mut self) -> Result<String, String> {
        let n = self.data.len();
        self.string(n)
    }
    fn finish(&self) -> Result<(), String> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} has {} unexpected trailing bytes",
                self.what,
                self.data.len()
            ))
        }
    }
}

/// Validate an NBD string: UTF-8, no NUL, at most [`MAX_STRING_LEN`] bytes.
fn check_string(raw: &[u8]) -> Result<String, String> {
    if raw.len() > MAX_STRING_LEN {
        return Err(format!(
            "string of {} bytes exceeds {MAX_STRING_LEN}",
            raw.len()
        ));
    }
    if raw.contains(&0) {
        return Err("string contains NUL".into());
    }
    String::from_utf8(raw.to_vec()).map_err(|_| "string is not UTF-8".into())
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

// ---------------------------------------------------------------------------------------------------------
// Handshake.

/// The server's first 18 bytes: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&handshake_flags.to_be_bytes());
    b
}

/// Parse the server greeting (client side); returns the handshake flags.
pub fn decode_greeting(b: &[u8; GREETING_LEN]) -> Result<u16, ProtocolError> {
    let m = be64(&b[..8]);
    if m != NBDMAGIC {
        return Err(ProtocolError::BadMagic {
            what: "greeting",
            found: m,
        });
    }
    let m = be64(&b[8..16]);
    if m != IHAVEOPT {
        // 0x00420281861253 is the oldstyle magic; Shale does not speak oldstyle.
        return Err(ProtocolError::BadMagic {
            what: "newstyle greeting",
            found: m,
        });
    }
    let flags = be16(&b[16..]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtocolError::NotFixedNewstyle);
    }
    Ok(flags)
}

/// What the client asked for in its 32-bit flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub fixed_newstyle: bool,
    /// `NBD_FLAG_C_NO_ZEROES`.
    pub no_zeroes: bool,
}

/// Validate the client's flags against what the server offered; the spec requires dropping the connection
/// on unknown or unoffered flags.
pub fn decode_client_flags(flags: u32, offered: u16) -> Result<ClientFlags, ProtocolError> {
    let mut allowed = 0;
    if offered & FLAG_FIXED_NEWSTYLE != 0 {
        allowed |= FLAG_C_FIXED_NEWSTYLE;
    }
    if offered & FLAG_NO_ZEROES != 0 {
        allowed |= FLAG_C_NO_ZEROES;
    }
    if flags & !allowed != 0 {
        return Err(ProtocolError::BadClientFlags(flags));
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// Encode an option header (client side).
pub fn encode_option_header(option: u32, len: u32) -> [u8; OPTION_HEADER_LEN] {
    let mut b = [0u8; OPTION_HEADER_LEN];
    b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..].copy_from_slice(&len.to_be_bytes());
    b
}

/// Parse an option header (server side): returns `(option, data length)`.
pub fn decode_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<(u32, u32), ProtocolError> {
    let m = be64(&b[..8]);
    if m != IHAVEOPT {
        return Err(ProtocolError::BadMagic {
            what: "option",
            found: m,
        });
    }
    Ok((be32(&b[8..12]), be32(&b[12..])))
}

/// A client option, decoded and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`: select and enter transmission.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`: describe an export.
    Info {
        /// Export name.
        name: String,
        /// Requested `NBD_INFO_*` types.
        requests: Vec<u16>,
    },
    /// `NBD_OPT_GO`: describe and select an export.
    Go {
        /// Export name.
        name: String,
        /// Requested `NBD_INFO_*` types.
        requests: Vec<u16>,
    },
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext {
        /// Export name.
        export: String,
        /// Queries (empty: all contexts).
        queries: Vec<String>,
    },
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext {
        /// Export name.
        export: String,
        /// Queries (empty: select none).
        queries: Vec<String>,
    },
    /// Any other option number; answered with `NBD_REP_ERR_UNSUP`.
    Unknown(u32),
}

impl ClientOption {
    /// The option number on the wire.
    pub fn number(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => OPT_EXPORT_NAME,
            ClientOption::Abort => OPT_ABORT,
            ClientOption::List => OPT_LIST,
            ClientOption::StartTls => OPT_STARTTLS,
            ClientOption::Info { .. } => OPT_INFO,
            ClientOption::Go { .. } => OPT_GO,
            ClientOption::StructuredReply => OPT_STRUCTURED_REPLY,
            ClientOption::ExtendedHeaders => OPT_EXTENDED_HEADERS,
            ClientOption::ListMetaContext { .. } => OPT_LIST_META_CONTEXT,
            ClientOption::SetMetaContext { .. } => OPT_SET_META_CONTEXT,
            ClientOption::Unknown(n) => *n,
        }
    }
}

/// Decode an option's data (server side). Malformed data of a known option yields
/// [`ProtocolError::InvalidOption`] (answer `NBD_REP_ERR_INVALID`, keep negotiating).
pub fn decode_option(option: u32, data: &[u8]) -> Result<ClientOption, ProtocolError> {
    let invalid = |reason: String| ProtocolError::InvalidOption { option, reason };
    let no_data = |opt: ClientOption| {
        if data.is_empty() {
            Ok(opt)
        } else {
            Err(ProtocolError::InvalidOption {
                option,
                reason: format!("unexpected {} data bytes", data.len()),
            })
        }
    };
    match option {
        OPT_EXPORT_NAME => check_string(data)
            .map(ClientOption::ExportName)
            .map_err(invalid),
        OPT_ABORT => no_data(ClientOption::Abort),
        OPT_LIST => no_data(ClientOption::List),
        OPT_STARTTLS => no_data(ClientOption::StartTls),
        OPT_STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
        OPT_EXTENDED_HEADERS => no_data(ClientOption::ExtendedHeaders),
        OPT_INFO | OPT_GO => {
            let parse = || -> Result<(String, Vec<u16>), String> {
                let mut c = Cursor::new(data, "info request");
                let n = c.u32()? as usize;
                let name = c.string(n)?;
                let count = c.u16()? as usize;
                let mut requests = Vec::with_capacity(count.min(16));
                for _ in 0..count {
                    requests.push(c.u16()?);
                }
                c.finish()?;
                Ok((name, requests))
            };
            let (name, requests) = parse().map_err(invalid)?;
            Ok(if option == OPT_GO {
                ClientOption::Go { name, requests }
            } else {
                ClientOption::Info { name, requests }
            })
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let parse = || -> Result<(String, Vec<String>), String> {
                let mut c = Cursor::new(data, "meta context request");
                let n = c.u32()? as usize;
                let export = c.string(n)?;
                let count = c.u32()? as usize;
                let mut queries = Vec::with_capacity(count.min(16));
                for _ in 0..count {
                    let n = c.u32()? as usize;
                    queries.push(c.string(n)?);
                }
                c.finish()?;
                Ok((export, queries))
            };
            let (export, queries) = parse().map_err(invalid)?;
            Ok(if option == OPT_SET_META_CONTEXT {
                ClientOption::SetMetaContext { export, queries }
            } else {
                ClientOption::ListMetaContext { export, queries }
            })
        }
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// Encode a whole option (header and data) for sending (client side).
pub fn encode_option(opt: &ClientOption, out: &mut Vec<u8>) {
    let mut data = Vec::new();
    match opt {
        ClientOption::ExportName(name) => data.extend_from_slice(name.as_bytes()),
        ClientOption::Info { name, requests } | ClientOption::Go { name, requests } => {
            put_string(&mut data, name);
            data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
            for r in requests {
                data.extend_from_slice(&r.to_be_bytes());
            }
        }
        ClientOption::ListMetaContext { export, queries }
        | ClientOption::SetMetaContext { export, queries } => {
            put_string(&mut data, export);
            data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
            for q in queries {
                put_string(&mut data, q);
            }
        }
        ClientOption::Abort
        | ClientOption::List
        | ClientOption::StartTls
        | ClientOption::StructuredReply
        | ClientOption::ExtendedHeaders
        | ClientOption::Unknown(_) => {}
    }
    out.extend_from_slice(&encode_option_header(opt.number(), data.len() as u32));
    out.extend_from_slice(&data);
}

/// Encode an option reply (server side).
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, payload: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// An option reply header (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply_type: u32,
    /// Payload length that follows.
    pub length: u32,
}

/// Parse an option reply header (client side).
pub fn decode_option_reply_header(
    b: &[u8; OPTION_REPLY_HEADER_LEN],
) -> Result<OptionReplyHeader, ProtocolError> {
    let m = be64(&b[..8]);
    if m != OPTION_REPLY_MAGIC {
        return Err(ProtocolError::BadMagic {
            what: "option reply",
            found: m,
        });
    }
    Ok(OptionReplyHeader {
        option: be32(&b[8..12]),
        reply_type: be32(&b[12..16]),
        length: be32(&b[16..]),
    })
}

/// Payload of an `NBD_REP_SERVER` reply: the name, then an optional description.
pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len() + description.len());
    put_string(&mut v, name);
    v.extend_from_slice(description.as_bytes());
    v
}

/// Parse an `NBD_REP_SERVER` payload into `(name, description)`.
pub fn decode_rep_server(data: &[u8]) -> Result<(String, String), ProtocolError> {
    let mut c = Cursor::new(data, "NBD_REP_SERVER");
    let mut parse = || -> Result<(String, String), String> {
        let n = c.u32()? as usize;
        let name = c.string(n)?;
        let desc = c.rest_string()?;
        Ok((name, desc))
    };
    parse().map_err(|e| ProtocolError::malformed("NBD_REP_SERVER", e))
}

/// One `NBD_REP_INFO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload size.
        max: u32,
    },
    /// An info type this codec does not know (clients ignore it).
    Unknown(u16),
}

/// Encode an `NBD_REP_INFO` payload.
pub fn encode_info(info: &InfoReply) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    match info {
        InfoReply::Export { size, flags } => {
            v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
            v.extend_from_slice(&size.to_be_bytes());
            v.extend_from_slice(&flags.to_be_bytes());
        }
        InfoReply::Name(s) => {
            v.extend_from_slice(&INFO_NAME.to_be_bytes());
            v.extend_from_slice(s.as_bytes());
        }
        InfoReply::Description(s) => {
            v.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
            v.extend_from_slice(s.as_bytes());
        }
        InfoReply::BlockSize {
            min,
            preferred,
            max,
        } => {
            v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
            v.extend_from_slice(&min.to_be_bytes());
            v.extend_from_slice(&preferred.to_be_bytes());
            v.extend_from_slice(&max.to_be_bytes());
        }
        InfoReply::Unknown(t) => v.extend_from_slice(&t.to_be_bytes()),
    }
    v
}

/// Parse an `NBD_REP_INFO` payload.
pub fn decode_info(data: &[u8]) -> Result<InfoReply, ProtocolError> {
    let mut c = Cursor::new(data, "NBD_REP_INFO");
    let mut parse = || -> Result<InfoReply, String> {
        let t = c.u16()?;
        let r = match t {
            INFO_EXPORT => InfoReply::Export {
                size: c.u64()?,
                flags: c.u16()?,
            },
            INFO_NAME => InfoReply::Name(c.rest_string()?),
            INFO_DESCRIPTION => InfoReply::Description(c.rest_string()?),
            INFO_BLOCK_SIZE => InfoReply::BlockSize {
                min: c.u32()?,
                preferred: c.u32()?,
                max: c.u32()?,
            },
            other => return Ok(InfoReply::Unknown(other)),
        };
        c.finish()?;
        Ok(r)
    };
    parse().map_err(|e| ProtocolError::malformed("NBD_REP_INFO", e))
}

/// Payload of an `NBD_REP_META_CONTEXT` reply.
pub fn encode_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// Parse an `NBD_REP_META_CONTEXT` payload into `(id, name)`.
pub fn decode_meta_context(data: &[u8]) -> Result<(u32, String), ProtocolError> {
    let mut c = Cursor::new(data, "NBD_REP_META_CONTEXT");
    let mut parse = || -> Result<(u32, String), String> { Ok((c.u32()?, c.rest_string()?)) };
    parse().map_err(|e| ProtocolError::malformed("NBD_REP_META_CONTEXT", e))
}

/// The answer to `NBD_OPT_EXPORT_NAME`: size, flags, and (without `NO_ZEROES`) 124 zero bytes.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_ZEROES]);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Transmission: requests.

/// A request header exactly as on the wire (client side encoding, tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestHeader {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub command: u16,
    /// Opaque handle echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length: the payload length for writes (and, with extended headers, whenever
    /// `NBD_CMD_FLAG_PAYLOAD_LEN` is set), otherwise the effect length. Compact headers carry 32 bits of it.
    pub length: u64,
}

/// Encode a compact request header (`length` must fit in 32 bits; callers split larger requests).
pub fn encode_request_header(h: &RequestHeader) -> [u8; REQUEST_HEADER_LEN] {
    debug_assert!(h.length <= u64::from(u32::MAX), "compact request length");
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.command.to_be_bytes());
    b[8..16].copy_from_slice(&h.handle.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
    b[24..].copy_from_slice(&(h.length as u32).to_be_bytes());
    b
}

/// Encode an extended request header (after `NBD_OPT_EXTENDED_HEADERS`): 32 bytes, 64-bit length. Writes must
/// carry `NBD_CMD_FLAG_PAYLOAD_LEN` in `flags`.
pub fn encode_ext_request_header(h: &RequestHeader) -> [u8; EXT_REQUEST_HEADER_LEN] {
    let mut b = [0u8; EXT_REQUEST_HEADER_LEN];
    b[..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.command.to_be_bytes());
    b[8..16].copy_from_slice(&h.handle.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
    b[24..].copy_from_slice(&h.length.to_be_bytes());
    b
}

/// Parse a request header without validating it against an export (magic only). `b` is a compact (28-byte)
/// or extended (32-byte) header; which one the connection uses is fixed by negotiation, and the other magic is
/// a [`ProtocolError::BadMagic`].
pub fn decode_request_header(b: &[u8]) -> Result<RequestHeader, ProtocolError> {
    let (want, what) = match b.len() {
        REQUEST_HEADER_LEN => (REQUEST_MAGIC, "request"),
        EXT_REQUEST_HEADER_LEN => (EXTENDED_REQUEST_MAGIC, "extended request"),
        n => {
            return Err(ProtocolError::malformed(
                "request header",
                format!("{n} bytes"),
            ))
        }
    };
    let m = be32(&b[..4]);
    if m != want {
        return Err(ProtocolError::BadMagic {
            what,
            found: u64::from(m),
        });
    }
    Ok(RequestHeader {
        flags: be16(&b[4..6]),
        command: be16(&b[6..8]),
        handle: be64(&b[8..16]),
        offset: be64(&b[16..24]),
        length: if b.len() == REQUEST_HEADER_LEN {
            u64::from(be32(&b[24..]))
        } else {
            be64(&b[24..])
        },
    })
}

/// What one connection negotiated; the context [`decode_request`] validates against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Export size in bytes.
    pub size: u64,
    /// Minimum block size: offsets and lengths must be multiples of it.
    pub min_block: u32,
    /// Largest read or write payload accepted.
    pub max_payload: u32,
    /// Transmission flags advertised to this client.
    pub flags: u16,
    /// Structured replies were negotiated (always true with extended headers).
    pub structured: bool,
    /// Extended headers were negotiated: 32-byte requests and reply chunks, 64-bit effect lengths.
    pub extended: bool,
    /// `base:allocation` was selected (block status allowed).
    pub block_status: bool,
}

impl Negotiated {
    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Length of every request header on this connection.
    pub fn request_header_len(&self) -> usize {
        if self.extended {
            EXT_REQUEST_HEADER_LEN
        } else {
            REQUEST_HEADER_LEN
        }
    }
}

/// A validated transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes.
    Read {
        /// Don't fragment: send at most one content chunk.
        df: bool,
    },
    /// Write the `len`-byte payload that follows the header.
    Write {
        /// Force unit access.
        fua: bool,
    },
    /// Disconnect once in-flight requests finish.
    Disconnect,
    /// Flush.
    Flush,
    /// Discard.
    Trim {
        /// Force unit access.
        fua: bool,
    },
    /// Prefetch hint.
    Cache,
    /// Write zeroes.
    WriteZeroes {
        /// Force unit access.
        fua: bool,
        /// Must not deallocate (`NBD_CMD_FLAG_NO_HOLE`).
        no_hole: bool,
        /// Fail with `ENOTSUP` rather than be slow (`NBD_CMD_FLAG_FAST_ZERO`).
        fast: bool,
    },
    /// Report `base:allocation` status.
    BlockStatus {
        /// At most one extent.
        req_one: bool,
    },
}

/// A request that passed validation: in range, aligned, permitted and correctly flagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Opaque handle for the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length: at most the maximum payload for reads and writes; up to the export's size for trim, write
    /// zeroes, cache and block status with extended headers (32 bits without).
    pub len: u64,
    /// What to do.
    pub command: Command,
}

impl Request {
    /// Bytes of payload that follow the header on the wire.
    pub fn payload_len(&self) -> u64 {
        match self.command {
            Command::Write { .. } => self.len,
            _ => 0,
        }
    }
}

/// Parse and validate one request header (compact or extended, as negotiated: `b` is
/// [`Negotiated::request_header_len`] bytes) against what the connection negotiated.
///
/// Errors: [`ProtocolError::BadMagic`] (fatal: the stream is out of sync), [`ProtocolError::PayloadTooLarge`]
/// (fatal after an `EOVERFLOW` reply), and [`ProtocolError::Rejected`] carrying the errno to answer and the
/// payload length to skip. Validation order follows the spec's error preferences: unknown command or flag
/// (`EINVAL`), read-only (`EPERM`), size limit (`EOVERFLOW`), alignment (`EINVAL`), range (`EINVAL` for reads,
/// `ENOSPC` for writes).
///
/// With extended headers a payload is announced by `NBD_CMD_FLAG_PAYLOAD_LEN`: any command but a write that
/// sets it is refused after its payload is skipped, as the spec asks of a server that supports no payload for
/// that command. A write's length is its payload length with or without the flag: the spec says writes MUST
/// set it, but qemu 10's client does not, and qemu's own server accepts that too (noting it in a trace), so
/// refusing would only break the most common client.
pub fn decode_request(b: &[u8], n: &Negotiated) -> Result<Request, ProtocolError> {
    if b.len() != n.request_header_len() {
        return Err(ProtocolError::malformed(
            "request header",
            format!("{} bytes, expected {}", b.len(), n.request_header_len()),
        ));
    }
    let h = decode_request_header(b)?;
    let has_payload = h.command == CMD_WRITE || n.extended && h.flags & CMD_FLAG_PAYLOAD_LEN != 0;
    let skip = if has_payload { h.length } else { 0 };
    let reject = |errno: i32, reason: &'static str| ProtocolError::Rejected {
        handle: h.handle,
        offset: h.offset,
        command: h.command,
        errno,
        skip,
        reason,
    };
    if has_payload && h.length > u64::from(n.max_payload) {
        return Err(ProtocolError::PayloadTooLarge {
            handle: h.handle,
            offset: h.offset,
            len: h.length,
            max: n.max_payload,
        });
    }
    if has_payload && h.command != CMD_WRITE && h.command != CMD_DISC {
        return Err(reject(
            errno::EINVAL,
            "command takes no payload (NBD_CMD_FLAG_PAYLOAD_LEN)",
        ));
    }
    // The payload flag was checked above; what remains is the command's own flags.
    let flags = if n.extended {
        h.flags & !CMD_FLAG_PAYLOAD_LEN
    } else {
        h.flags
    };
    // FUA is accepted on every command once advertised: real clients set it on flush and others.
    let fua_ok = if n.has(FLAG_SEND_FUA) {
        CMD_FLAG_FUA
    } else {
        0
    };
    let (command, allowed) = match h.command {
        CMD_DISC => {
            return Ok(Request {
                handle: h.handle,
                offset: h.offset,
                len: h.length,
                command: Command::Disconnect,
            })
        }
        CMD_READ => {
            let df_ok = if n.structured && n.has(FLAG_SEND_DF) {
                CMD_FLAG_DF
            } else {
                0
            };
            (
                Command::Read {
                    df: flags & CMD_FLAG_DF != 0,
                },
                fua_ok | df_ok,
            )
        }
        CMD_WRITE => (
            Command::Write {
                fua: flags & CMD_FLAG_FUA != 0,
            },
            fua_ok,
        ),
        CMD_FLUSH => (Command::Flush, fua_ok),
        CMD_TRIM => (
            Command::Trim {
                fua: flags & CMD_FLAG_FUA != 0,
            },
            fua_ok,
        ),
        CMD_CACHE => (Command::Cache, fua_ok),
        CMD_WRITE_ZEROES => {
            let fast_ok = if n.has(FLAG_SEND_FAST_ZERO) {
                CMD_FLAG_FAST_ZERO
            } else {
                0
            };
            (
                Command::WriteZeroes {
                    fua: flags & CMD_FLAG_FUA != 0,
                    no_hole: flags & CMD_FLAG_NO_HOLE != 0,
                    fast: flags & CMD_FLAG_FAST_ZERO != 0,
                },
                fua_ok | CMD_FLAG_NO_HOLE | fast_ok,
            )
        }
        CMD_BLOCK_STATUS => (
            Command::BlockStatus {
                req_one: flags & CMD_FLAG_REQ_ONE != 0,
            },
            fua_ok | CMD_FLAG_REQ_ONE,
        ),
        _ => return Err(reject(errno::EINVAL, "unknown command")),
    };
    if flags & !allowed != 0 {
        return Err(reject(
            errno::EINVAL,
            "command flag not valid for this command or not negotiated",
        ));
    }
    let advertised = match command {
        Command::Flush => n.has(FLAG_SEND_FLUSH),
        Command::Cache => n.has(FLAG_SEND_CACHE),
        Command::BlockStatus { .. } => n.block_status,
        _ => true,
    };
    if !advertised {
        return Err(reject(errno::EINVAL, "command not negotiated"));
    }
    let writes = matches!(
        command,
        Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. }
    );
    if writes && n.has(FLAG_READ_ONLY) {
        return Err(reject(errno::EPERM, "export is read-only"));
    }
    if matches!(command, Command::Flush) {
        return Ok(Request {
            handle: h.handle,
            offset: 0,
            len: 0,
            command,
        });
    }
    if matches!(command, Command::Read { .. }) && h.length > u64::from(n.max_payload) {
        return Err(reject(
            errno::EOVERFLOW,
            "request exceeds the maximum block size",
        ));
    }
    if h.length == 0 {
        return Err(reject(errno::EINVAL, "zero-length request"));
    }
    let align = u64::from(n.min_block.max(1));
    if h.offset % align != 0 || h.length % align != 0 {
        return Err(reject(
            errno::EINVAL,
            "offset or length not aligned to the minimum block size",
        ));
    }
    let in_range = h
        .offset
        .checked_add(h.length)
        .is_some_and(|end| end <= n.size);
    if !in_range {
        let e = if writes { errno::ENOSPC } else { errno::EINVAL };
        return Err(reject(e, "request extends beyond the end of the export"));
    }
    Ok(Request {
        handle: h.handle,
        offset: h.offset,
        len: h.length,
        command,
    })
}

// ---------------------------------------------------------------------------------------------------------
// Transmission: replies.

/// A simple reply (16 bytes; read data, if any, follows).
pub fn encode_simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&handle.to_be_bytes());
    b
}

/// How the chunks of one reply are framed: `None` for structured replies (20-byte headers), or, with
/// extended headers, `Some` of the request's offset, which every extended chunk header echoes.
pub type Framing = Option<u64>;

/// Append a reply chunk header (the payload of `length` bytes follows), structured or extended per `framing`.
/// A structured header carries 32 bits of length; callers keep payloads within the maximum payload.
pub fn put_chunk_header(
    out: &mut Vec<u8>,
    framing: Framing,
    flags: u16,
    typ: u16,
    handle: u64,
    length: u64,
) {
    let magic = if framing.is_some() {
        EXTENDED_REPLY_MAGIC
    } else {
        STRUCTURED_REPLY_MAGIC
    };
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    match framing {
        Some(offset) => {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&length.to_be_bytes());
        }
        None => {
            debug_assert!(length <= u64::from(u32::MAX), "structured chunk length");
            out.extend_from_slice(&(length as u32).to_be_bytes());
        }
    }
}

/// Append the header of an `OFFSET_DATA` chunk (chunk header plus the 8-byte offset); `data_len` bytes of data
/// follow.
pub fn put_offset_data_header(
    out: &mut Vec<u8>,
    framing: Framing,
    flags: u16,
    handle: u64,
    offset: u64,
    data_len: u32,
) {
    put_chunk_header(
        out,
        framing,
        flags,
        REPLY_TYPE_OFFSET_DATA,
        handle,
        u64::from(data_len) + 8,
    );
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Append a complete `OFFSET_HOLE` chunk.
pub fn put_offset_hole(
    out: &mut Vec<u8>,
    framing: Framing,
    flags: u16,
    handle: u64,
    offset: u64,
    len: u32,
) {
    put_chunk_header(out, framing, flags, REPLY_TYPE_OFFSET_HOLE, handle, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Append a complete `NBD_REPLY_TYPE_NONE` chunk with the DONE flag: the success of a command without data
/// (with extended headers, where simple replies are not allowed).
pub fn put_none(out: &mut Vec<u8>, framing: Framing, handle: u64) {
    put_chunk_header(out, framing, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0);
}

/// Append a complete `NBD_REPLY_TYPE_ERROR` chunk with the DONE flag and a human-readable message.
pub fn put_error_chunk(
    out: &mut Vec<u8>,
    framing: Framing,
    handle: u64,
    error: u32,
    message: &str,
) {
    // Message length is 16 bits; truncate on a character boundary.
    let mut end = message.len().min(MAX_STRING_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    put_chunk_header(
        out,
        framing,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        6 + msg.len() as u64,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// Append a complete block status chunk for descriptors `(length, flags)` of one metadata context (DONE on the
/// last context's chunk): with extended headers
/// an `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` chunk (64-bit lengths, descriptor count filled in), otherwise
/// `NBD_REPLY_TYPE_BLOCK_STATUS`, whose lengths are 32 bits (callers keep compact descriptors within that; a
/// compact request cannot ask for more).
pub fn put_block_status(
    out: &mut Vec<u8>,
    framing: Framing,
    handle: u64,
    context_id: u32,
    descriptors: &[(u64, u32)],
    done: bool,
) {
    let n = descriptors.len() as u64;
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    if framing.is_some() {
        put_chunk_header(
            out,
            framing,
            flags,
            REPLY_TYPE_BLOCK_STATUS_EXT,
            handle,
            8 + 16 * n,
        );
        out.extend_from_slice(&context_id.to_be_bytes());
        out.extend_from_slice(&(n as u32).to_be_bytes());
        for (l, f) in descriptors {
            out.extend_from_slice(&l.to_be_bytes());
            out.extend_from_slice(&0u32.to_be_bytes());
            out.extend_from_slice(&f.to_be_bytes());
        }
    } else {
        put_chunk_header(out, None, flags, REPLY_TYPE_BLOCK_STATUS, handle, 4 + 8 * n);
        out.extend_from_slice(&context_id.to_be_bytes());
        for (l, f) in descriptors {
            debug_assert!(*l <= u64::from(u32::MAX), "compact block status length");
            out.extend_from_slice(&(*l as u32).to_be_bytes());
            out.extend_from_slice(&f.to_be_bytes());
        }
    }
}

/// A structured reply chunk header (the payload of `length` bytes follows).
pub fn encode_chunk_header(flags: u16, typ: u16, handle: u64, length: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(CHUNK_HEADER_LEN);
    put_chunk_header(&mut v, None, flags, typ, handle, u64::from(length));
    v
}

/// Header of a structured `OFFSET_DATA` chunk (see [`put_offset_data_header`]).
pub fn encode_offset_data_header(flags: u16, handle: u64, offset: u64, data_len: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(CHUNK_HEADER_LEN + 8);
    put_offset_data_header(&mut v, None, flags, handle, offset, data_len);
    v
}

/// A complete structured `OFFSET_HOLE` chunk.
pub fn encode_offset_hole(flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(CHUNK_HEADER_LEN + 12);
    put_offset_hole(&mut v, None, flags, handle, offset, len);
    v
}

/// A complete structured `NBD_REPLY_TYPE_NONE` chunk with the DONE flag.
pub fn encode_none(handle: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(CHUNK_HEADER_LEN);
    put_none(&mut v, None, handle);
    v
}

/// A complete structured `NBD_REPLY_TYPE_ERROR` chunk (see [`put_error_chunk`]).
pub fn encode_error_chunk(out: &mut Vec<u8>, handle: u64, error: u32, message: &str) {
    put_error_chunk(out, None, handle, error, message);
}

/// A complete structured `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (with DONE) for 32-bit descriptors.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    handle: u64,
    context_id: u32,
    descriptors: &[(u32, u32)],
) {
    let wide: Vec<(u64, u32)> = descriptors
        .iter()
        .map(|&(l, f)| (u64::from(l), f))
        .collect();
    put_block_status(out, None, handle, context_id, &wide, true);
}

/// A reply header as the client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// Simple reply; for a successful read, the request's length of data follows.
    Simple {
        /// Error value (0 for success).
        error: u32,
        /// Request handle.
        handle: u64,
    },
    /// One structured or extended chunk; `length` payload bytes follow.
    Chunk {
        /// `NBD_REPLY_FLAG_*`.
        flags: u16,
        /// `NBD_REPLY_TYPE_*`.
        typ: u16,
        /// Request handle.
        handle: u64,
        /// Payload length (32 bits on the wire for structured chunks, 64 for extended ones).
        length: u64,
        /// Extended chunks only: the offset of the request this chunk answers.
        offset: Option<u64>,
    },
}

/// Total header length (including the 4 magic bytes) for a reply starting with `magic`.
pub fn reply_header_len(magic: u32) -> Result<usize, ProtocolError> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
        STRUCTURED_REPLY_MAGIC => Ok(CHUNK_HEADER_LEN),
        EXTENDED_REPLY_MAGIC => Ok(EXT_CHUNK_HEADER_LEN),
        other => Err(ProtocolError::BadMagic {
            what: "reply",
            found: u64::from(other),
        }),
    }
}

/// Parse a reply header of the length [`reply_header_len`] gave.
pub fn decode_reply_header(b: &[u8]) -> Result<ReplyHeader, ProtocolError> {
    if b.len() < 4 {
        return Err(ProtocolError::malformed(
            "reply header",
            "shorter than its magic",
        ));
    }
    let magic = be32(b);
    let need = reply_header_len(magic)?;
    if b.len() != need {
        return Err(ProtocolError::malformed(
            "reply header",
            format!("{} bytes, expected {need}", b.len()),
        ));
    }
    Ok(match magic {
        SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
            error: be32(&b[4..8]),
            handle: be64(&b[8..16]),
        },
        STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk {
            flags: be16(&b[4..6]),
            typ: be16(&b[6..8]),
            handle: be64(&b[8..16]),
            length: u64::from(be32(&b[16..20])),
            offset: None,
        },
        _ => ReplyHeader::Chunk {
            flags: be16(&b[4..6]),
            typ: be16(&b[6..8]),
            handle: be64(&b[8..16]),
            length: be64(&b[24..32]),
            offset: Some(be64(&b[16..24])),
        },
    })
}

/// Parse an `OFFSET_HOLE` payload into `(offset, length)`.
pub fn decode_offset_hole(data: &[u8]) -> Result<(u64, u32), ProtocolError> {
    if data.len() != 12 {
        return Err(ProtocolError::malformed(
            "OFFSET_HOLE chunk",
            format!("length {} (expected 12)", data.len()),
        ));
    }
    let len = be32(&data[8..]);
    if len == 0 {
        return Err(ProtocolError::malformed(
            "OFFSET_HOLE chunk",
            "zero-length hole",
        ));
    }
    Ok((be64(data), len))
}

/// A decoded error chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    /// Error value (nonzero).
    pub error: u32,
    /// Message for humans (may be empty).
    pub message: String,
    /// For `ERROR_OFFSET`: where the error happened.
    pub offset: Option<u64>,
}

/// Parse the payload of an error chunk (any type with bit 15 set).
pub fn decode_error_chunk(typ: u16, data: &[u8]) -> Result<ErrorChunk, ProtocolError> {
    let mut c = Cursor::new(data, "error chunk");
    let mut parse = || -> Result<ErrorChunk, String> {
        let error = c.u32()?;
        let n = c.u16()? as usize;
        let raw = c.take(n)?;
        let message = String::from_utf8_lossy(raw).into_owned();
        let offset = if typ == REPLY_TYPE_ERROR_OFFSET {
            Some(c.u64()?)
        } else {
            None
        };
        Ok(ErrorChunk {
            error,
            message,
            offset,
        })
    };
    let e = parse().map_err(|e| ProtocolError::malformed("error chunk", e))?;
    if e.error == 0 {
        return Err(ProtocolError::malformed(
            "error chunk",
            "error value is zero",
        ));
    }
    Ok(e)
}

/// Parse a `BLOCK_STATUS` (`typ` [`REPLY_TYPE_BLOCK_STATUS`]) or `BLOCK_STATUS_EXT` payload into the context id
/// and `(length, flags)` descriptors. Zero-length descriptors are malformed (the spec requires progress), as is
/// an extended chunk whose descriptor count, when given, disagrees with its length.
pub fn decode_block_status(typ: u16, data: &[u8]) -> Result<(u32, Vec<(u64, u32)>), ProtocolError> {
    let (what, head, size) = if typ == REPLY_TYPE_BLOCK_STATUS_EXT {
        ("BLOCK_STATUS_EXT chunk", 8, 16)
    } else {
        ("BLOCK_STATUS chunk", 4, 8)
    };
    if data.len() < head + size || !(data.len() - head).is_multiple_of(size) {
        return Err(ProtocolError::malformed(
            what,
            format!("length {}", data.len()),
        ));
    }
    let id = be32(data);
    let n = (data.len() - head) / size;
    if typ == REPLY_TYPE_BLOCK_STATUS_EXT {
        let count = be32(&data[4..8]) as usize;
        if count != 0 && count != n {
            return Err(ProtocolError::malformed(
                what,
                format!("descriptor count {count} but {n} descriptors"),
            ));
        }
    }
    let descs: Vec<(u64, u32)> = data[head..]
        .chunks_exact(size)
        .map(|d| {
            if size == 16 {
                (be64(d), be32(&d[12..]))
            } else {
                (u64::from(be32(d)), be32(&d[4..]))
            }
        })
        .collect();
    if descs.iter().any(|&(l, _)| l == 0) {
        return Err(ProtocolError::malformed(what, "zero-length descriptor"));
    }
    Ok((id, descs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neg() -> Negotiated {
        Negotiated {
            size: 1 << 20,
            min_block: 512,
            max_payload: 1 << 16,
            flags: FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES
                | FLAG_SEND_DF
                | FLAG_SEND_CACHE
                | FLAG_SEND_FAST_ZERO,
            structured: true,
            extended: false,
            block_status: true,
        }
    }

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> [u8; REQUEST_HEADER_LEN] {
        encode_request_header(&RequestHeader {
            flags,
            command,
            handle: 0xabcdef,
            offset,
            length: u64::from(length),
        })
    }

    fn ext_req(command: u16, flags: u16, offset: u64, length: u64) -> [u8; EXT_REQUEST_HEADER_LEN] {
        encode_ext_request_header(&RequestHeader {
            flags,
            command,
            handle: 0xabcdef,
            offset,
            length,
        })
    }

    /// Extended headers: 64-bit effect lengths, payloads announced by `NBD_CMD_FLAG_PAYLOAD_LEN` (a write's
    /// length is its payload either way; other commands with it are refused after the payload is skipped), and
    /// the other framing's magic is fatal.
    #[test]
    fn extended_requests_are_validated() {
        let mut n = neg();
        n.extended = true;
        n.size = 1 << 40;
        let r = decode_request(&ext_req(CMD_TRIM, 0, 0, 1 << 36), &n).unwrap();
        assert_eq!((r.len, r.command), (1 << 36, Command::Trim { fua: false }));
        let r = decode_request(&ext_req(CMD_BLOCK_STATUS, 0, 4096, (1 << 40) - 4096), &n).unwrap();
        assert_eq!(r.len, (1 << 40) - 4096);
        let r = decode_request(
            &ext_req(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_FUA, 512, 4096),
            &n,
        )
        .unwrap();
        assert_eq!(
            (r.len, r.payload_len(), r.command),
            (4096, 4096, Command::Write { fua: true })
        );
        // qemu 10 sends extended writes without the flag: the length is still the payload's.
        let r = decode_request(&ext_req(CMD_WRITE, 0, 0, 4096), &n).unwrap();
        assert_eq!(r.payload_len(), 4096);
        match decode_request(&ext_req(CMD_TRIM, CMD_FLAG_PAYLOAD_LEN, 0, 1024), &n) {
            Err(ProtocolError::Rejected {
                errno,
                skip,
                offset,
                ..
            }) => {
                assert_eq!((errno, skip, offset), (errno::EINVAL, 1024, 0))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode_request(&ext_req(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 1 << 17), &n),
            Err(ProtocolError::PayloadTooLarge { len: 131072, .. })
        ));
        // Reads stay within the maximum payload; ranges are checked in 64 bits.
        assert_eq!(
            errno_of(decode_request(&ext_req(CMD_READ, 0, 0, 1 << 17), &n)),
            errno::EOVERFLOW
        );
        assert!(
            decode_request(&ext_req(CMD_TRIM, 0, 1 << 39, 1 << 39), &n).is_ok(),
            "ends exactly at the export's end"
        );
        assert_eq!(
            errno_of(decode_request(
                &ext_req(CMD_TRIM, 0, 512, u64::MAX - 511),
                &n
            )),
            errno::ENOSPC
        );
        // The wrong framing for the connection: out of sync, fatal.
        assert!(decode_request(&req(CMD_READ, 0, 0, 512), &n)
            .unwrap_err()
            .is_fatal());
        let mut bad = ext_req(CMD_READ, 0, 0, 512);
        bad[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        assert!(matches!(
            decode_request(&bad, &n),
            Err(ProtocolError::BadMagic { .. })
        ));
        assert!(decode_request(&ext_req(CMD_READ, 0, 0, 512), &neg())
            .unwrap_err()
            .is_fatal());
        // Compact headers never accept the payload flag.
        assert_eq!(
            errno_of(decode_request(
                &req(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 512),
                &neg()
            )),
            errno::EINVAL
        );
    }

    /// Extended reply chunks carry the request's offset and a 64-bit length; 64-bit block status descriptors
    /// round-trip, and a descriptor count that disagrees with the length is refused.
    #[test]
    fn extended_replies_round_trip() {
        let mut v = Vec::new();
        put_offset_data_header(&mut v, Some(8192), 0, 7, 12288, 512);
        assert_eq!(v.len(), EXT_CHUNK_HEADER_LEN + 8);
        assert_eq!(
            reply_header_len(EXTENDED_REPLY_MAGIC).unwrap(),
            EXT_CHUNK_HEADER_LEN
        );
        assert_eq!(
            decode_reply_header(&v[..EXT_CHUNK_HEADER_LEN]).unwrap(),
            ReplyHeader::Chunk {
                flags: 0,
                typ: REPLY_TYPE_OFFSET_DATA,
                handle: 7,
                length: 520,
                offset: Some(8192),
            }
        );
        let descs = [(1u64 << 35, STATE_HOLE | STATE_ZERO), (4096, 0)];
        let mut v = Vec::new();
        put_block_status(&mut v, Some(0), 3, 1, &descs, true);
        let h = decode_reply_header(&v[..EXT_CHUNK_HEADER_LEN]).unwrap();
        assert!(matches!(
            h,
            ReplyHeader::Chunk {
                typ: REPLY_TYPE_BLOCK_STATUS_EXT,
                length: 40,
                ..
            }
        ));
        let payload = &v[EXT_CHUNK_HEADER_LEN..];
        assert_eq!(
            decode_block_status(REPLY_TYPE_BLOCK_STATUS_EXT, payload).unwrap(),
            (1, descs.to_vec())
        );
        let mut wrong_count = payload.to_vec();
        wrong_count[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(decode_block_status(REPLY_TYPE_BLOCK_STATUS_EXT, &wrong_count).is_err());
        let mut uncounted = payload.to_vec();
        uncounted[4..8].copy_from_slice(&0u32.to_be_bytes());
        assert!(decode_block_status(REPLY_TYPE_BLOCK_STATUS_EXT, &uncounted).is_ok());
        let mut v = Vec::new();
        put_none(&mut v, Some(77), 9);
        assert!(matches!(
            decode_reply_header(&v).unwrap(),
            ReplyHeader::Chunk {
                typ: REPLY_TYPE_NONE,
                flags: REPLY_FLAG_DONE,
                length: 0,
                offset: Some(77),
                ..
            }
        ));
    }

    fn errno_of(r: Result<Request, ProtocolError>) -> i32 {
        match r {
            Err(ProtocolError::Rejected { errno, .. }) => errno,
            other => panic!("expected rejection, got {other:?}"),
        }
    }

    #[test]
    fn request_round_trip() {
        let h = RequestHeader {
            flags: 1,
            command: CMD_WRITE,
            handle: 7,
            offset: 4096,
            length: 512,
        };
        assert_eq!(
            decode_request_header(&encode_request_header(&h)).unwrap(),
            h
        );
        let r = decode_request(&encode_request_header(&h), &neg()).unwrap();
        assert_eq!(r.command, Command::Write { fua: true });
        assert_eq!(r.payload_len(), 512);
    }

    #[test]
    fn request_validation() {
        let n = neg();
        let mut b = req(CMD_READ, 0, 0, 512);
        b[0] ^= 1;
        assert!(matches!(
            decode_request(&b, &n),
            Err(ProtocolError::BadMagic { .. })
        ));
        assert!(decode_request(&b, &n).unwrap_err().is_fatal());
        assert_eq!(
            errno_of(decode_request(&req(99, 0, 0, 512), &n)),
            errno::EINVAL
        );
        assert_eq!(
            errno_of(decode_request(&req(CMD_READ, 0, 1 << 20, 512), &n)),
            errno::EINVAL
        );
        assert_eq!(
            errno_of(decode_request(&req(CMD_READ, 0, u64::MAX - 511, 512), &n)),
            errno::EINVAL
        );
        assert_eq!(
            errno_of(decode_request(&req(CMD_READ, 0, 1, 512), &n)),
            errno::EINVAL
        );
        assert_eq!(
            errno_of(decode_request(&req(CMD_READ, 0, 0, 0), &n)),
            errno::EINVAL
        );
        assert_eq!(
            errno_of(decode_request(&req(CMD_READ, 0, 0, 1 << 17), &n)),
            errno::EOVERFLOW
        );
        assert_eq!(
            errno_of(decode_request(&req(CMD_READ, 1 << 9, 0, 512), &n)),
            errno::EINVAL
        );
        assert_eq!(
            errno_of(decode_request(&req(CMD_WRITE, 0, 1 << 20, 512), &n)),
            errno::ENOSPC
        );
        assert_eq!(
            errno_of(decode_request(&req(CMD_WRITE_ZEROES, 0, 1 << 20, 512), &n)),
            errno::ENOSPC
        );
        assert!(matches!(
            decode_request(&req(CMD_WRITE, 0, 0, u32::MAX), &n),
            Err(ProtocolError::PayloadTooLarge { .. })
        ));
        // A rejected write still tells the caller how much payload to skip.
        match decode_request(&req(CMD_WRITE, 0, 1 << 20, 512), &n) {
            Err(ProtocolError::Rejected { skip, .. }) => assert_eq!(skip, 512),
            other => panic!("{other:?}"),
        }
        let ro = Negotiated {
            flags: n.flags | FLAG_READ_ONLY,
            ..n
        };
        assert_eq!(
            errno_of(decode_request(&req(CMD_WRITE, 0, 0, 512), &ro)),
            errno::EPERM
        );
        assert_eq!(
            errno_of(decode_request(&req(CMD_TRIM, 0, 0, 512), &ro)),
            errno::EPERM
        );
        assert!(decode_request(&req(CMD_READ, 0, 0, 512), &ro).is_ok());
        let plain = Negotiated {
            structured: false,
            block_status: false,
            ..n
        };
        assert_eq!(
            errno_of(decode_request(&req(CMD_BLOCK_STATUS, 0, 0, 512), &plain)),
            errno::EINVAL
        );
        assert_eq!(
            errno_of(decode_request(&req(CMD_READ, CMD_FLAG_DF, 0, 512), &plain)),
            errno::EINVAL
        );
        let r = decode_request(
            &req(
                CMD_WRITE_ZEROES,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                0,
                1 << 20,
            ),
            &n,
        )
        .unwrap();
        assert_eq!(
            r.command,
            Command::WriteZeroes {
                fua: false,
                no_hole: true,
                fast: true
            }
        );
        // Trim and write-zeroes may exceed the payload limit: they carry no payload.
        assert!(decode_request(&req(CMD_TRIM, 0, 0, 1 << 20), &n).is_ok());
        assert_eq!(
            decode_request(&req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &n)
                .unwrap()
                .command,
            Command::Flush
        );
        assert_eq!(
            decode_request(&req(CMD_DISC, 0, 0, 0), &n).unwrap().command,
            Command::Disconnect
        );
    }

    #[test]
    fn options_round_trip() {
        let opts = [
            ClientOption::ExportName("vdi-1".into()),
            ClientOption::Abort,
            ClientOption::List,
            ClientOption::StartTls,
            ClientOption::StructuredReply,
            ClientOption::Go {
                name: "x".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME],
            },
            ClientOption::Info {
                name: "".into(),
                requests: vec![],
            },
            ClientOption::SetMetaContext {
                export: "x".into(),
                queries: vec![BASE_ALLOCATION.into()],
            },
            ClientOption::ListMetaContext {
                export: "x".into(),
                queries: vec![],
            },
            ClientOption::Unknown(4242),
        ];
        for o in opts {
            let mut v = Vec::new();
            encode_option(&o, &mut v);
            let mut h = [0u8; OPTION_HEADER_LEN];
            h.copy_from_slice(&v[..OPTION_HEADER_LEN]);
            let (num, len) = decode_option_header(&h).unwrap();
            assert_eq!(len as usize, v.len() - OPTION_HEADER_LEN);
            assert_eq!(decode_option(num, &v[OPTION_HEADER_LEN..]).unwrap(), o);
        }
    }

    #[test]
    fn malformed_options_are_invalid_not_fatal() {
        for (opt, data) in [
            (OPT_GO, &[0u8, 0, 0, 9, b'a'][..]),
            (OPT_GO, &[0xff, 0xff, 0xff, 0xff][..]),
            (OPT_LIST, &[1u8][..]),
            (
                OPT_SET_META_CONTEXT,
                &[0u8, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 50][..],
            ),
            (OPT_EXPORT_NAME, &[b'a', 0, b'b'][..]),
            (OPT_EXPORT_NAME, &[0xc3, 0x28][..]),
        ] {
            let e = decode_option(opt, data).unwrap_err();
            assert!(matches!(e, ProtocolError::InvalidOption { .. }), "{e:?}");
            assert!(!e.is_fatal());
        }
    }

    #[test]
    fn handshake_frames() {
        let g = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(
            decode_greeting(&g).unwrap(),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        assert_eq!(
            decode_greeting(&encode_greeting(0)),
            Err(ProtocolError::NotFixedNewstyle)
        );
        let offered = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
        assert!(decode_client_flags(3, offered).unwrap().no_zeroes);
        assert!(decode_client_flags(4, offered).is_err());
        assert!(decode_client_flags(2, FLAG_FIXED_NEWSTYLE).is_err());
        for info in [
            InfoReply::Export {
                size: 123,
                flags: 7,
            },
            InfoReply::Name("n".into()),
            InfoReply::Description("d d".into()),
            InfoReply::BlockSize {
                min: 512,
                preferred: 4096,
                max: 1 << 25,
            },
        ] {
            assert_eq!(decode_info(&encode_info(&info)).unwrap(), info);
        }
        assert_eq!(
            decode_rep_server(&encode_rep_server("a", "desc")).unwrap(),
            ("a".into(), "desc".into())
        );
        assert_eq!(
            decode_meta_context(&encode_meta_context(1, BASE_ALLOCATION)).unwrap(),
            (1, BASE_ALLOCATION.into())
        );
        let mut v = Vec::new();
        encode_option_reply(&mut v, OPT_GO, REP_ACK, &[]);
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        h.copy_from_slice(&v);
        assert_eq!(
            decode_option_reply_header(&h).unwrap(),
            OptionReplyHeader {
                option: OPT_GO,
                reply_type: REP_ACK,
                length: 0
            }
        );
    }

    #[test]
    fn reply_frames() {
        let s = encode_simple_reply(22, 9);
        assert_eq!(reply_header_len(SIMPLE_REPLY_MAGIC).unwrap(), 16);
        assert_eq!(
            decode_reply_header(&s).unwrap(),
            ReplyHeader::Simple {
                error: 22,
                handle: 9
            }
        );
        let d = encode_offset_data_header(0, 5, 4096, 512);
        assert_eq!(
            decode_reply_header(&d[..CHUNK_HEADER_LEN]).unwrap(),
            ReplyHeader::Chunk {
                flags: 0,
                typ: REPLY_TYPE_OFFSET_DATA,
                handle: 5,
                length: 520,
                offset: None,
            }
        );
        let hole = encode_offset_hole(REPLY_FLAG_DONE, 5, 8192, 4096);
        assert_eq!(
            decode_offset_hole(&hole[CHUNK_HEADER_LEN..]).unwrap(),
            (8192, 4096)
        );
        let mut v = Vec::new();
        encode_error_chunk(&mut v, 3, 5, "boom");
        let e = decode_error_chunk(REPLY_TYPE_ERROR, &v[CHUNK_HEADER_LEN..]).unwrap();
        assert_eq!(
            e,
            ErrorChunk {
                error: 5,
                message: "boom".into(),
                offset: None
            }
        );
        let mut v = Vec::new();
        encode_block_status(&mut v, 3, 1, &[(512, 0), (1024, 3)]);
        assert_eq!(
            decode_block_status(REPLY_TYPE_BLOCK_STATUS, &v[CHUNK_HEADER_LEN..]).unwrap(),
            (1, vec![(512, 0), (1024, 3)])
        );
        assert!(decode_block_status(REPLY_TYPE_BLOCK_STATUS, &[0, 0, 0, 1]).is_err());
        assert!(reply_header_len(0x1234).is_err());
        assert_eq!(encode_none(1)[4..6], REPLY_FLAG_DONE.to_be_bytes());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Strings as options carry them: short, any Unicode.
        fn name() -> impl Strategy<Value = String> + Clone {
            "\\PC{0,24}"
        }

        fn client_option() -> impl Strategy<Value = ClientOption> {
            let infos = proptest::collection::vec(any::<u16>(), 0..6);
            let queries = proptest::collection::vec(name(), 0..4);
            prop_oneof![
                name().prop_map(ClientOption::ExportName),
                Just(ClientOption::Abort),
                Just(ClientOption::List),
                Just(ClientOption::StartTls),
                Just(ClientOption::StructuredReply),
                (name(), infos.clone())
                    .prop_map(|(name, requests)| ClientOption::Info { name, requests }),
                (name(), infos).prop_map(|(name, requests)| ClientOption::Go { name, requests }),
                (name(), queries.clone()).prop_map(|(export, queries)| {
                    ClientOption::ListMetaContext { export, queries }
                }),
                (name(), queries)
                    .prop_map(|(export, queries)| ClientOption::SetMetaContext { export, queries }),
            ]
        }

        /// Every `NBD_FLAG_SEND_*` a server may advertise.
        const ALL_SEND: u16 = FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_SEND_DF
            | FLAG_SEND_CACHE
            | FLAG_SEND_FAST_ZERO;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// What the client encodes, the server decodes to the same option.
            #[test]
            fn options_round_trip(opt in client_option()) {
                let mut wire = Vec::new();
                encode_option(&opt, &mut wire);
                let hdr: [u8; OPTION_HEADER_LEN] = wire[..OPTION_HEADER_LEN].try_into().unwrap();
                let (number, len) = decode_option_header(&hdr).unwrap();
                prop_assert_eq!(len as usize, wire.len() - OPTION_HEADER_LEN);
                prop_assert_eq!(decode_option(number, &wire[OPTION_HEADER_LEN..]).unwrap(), opt);
            }

            /// Any option number with any data decodes or is refused, never panics; known options with bad
            /// data are `InvalidOption` (answered, the session goes on).
            #[test]
            fn any_option_data_is_decoded_or_refused(
                number in prop_oneof![1u32..12, any::<u32>()],
                data in proptest::collection::vec(any::<u8>(), 0..64),
            ) {
                match decode_option(number, &data) {
                    Ok(opt) => prop_assert_eq!(opt.number(), number),
                    Err(e) => prop_assert!(matches!(e, ProtocolError::InvalidOption { .. }), "{e}"),
                }
            }

            /// Every info reply the server can send reads back the same.
            #[test]
            fn info_round_trip(
                info in prop_oneof![
                    (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| InfoReply::Export { size, flags }),
                    name().prop_map(InfoReply::Name),
                    name().prop_map(InfoReply::Description),
                    (any::<u32>(), any::<u32>(), any::<u32>())
                        .prop_map(|(min, preferred, max)| InfoReply::BlockSize { min, preferred, max }),
                ]
            ) {
                prop_assert_eq!(decode_info(&encode_info(&info)).unwrap(), info);
            }

            /// The client's decoders take whatever a server sends without panicking.
            #[test]
            fn server_frames_never_panic_the_decoders(
                data in proptest::collection::vec(any::<u8>(), 0..48),
                typ in any::<u16>(),
            ) {
                let _ = decode_info(&data);
                let _ = decode_rep_server(&data);
                let _ = decode_meta_context(&data);
                let _ = decode_offset_hole(&data);
                let _ = decode_error_chunk(typ | REPLY_TYPE_FLAG_ERROR, &data);
                let _ = decode_block_status(REPLY_TYPE_BLOCK_STATUS, &data);
                let _ = decode_block_status(REPLY_TYPE_BLOCK_STATUS_EXT, &data);
                if data.len() >= 4 {
                    let magic = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                    if let Ok(n) = reply_header_len(magic) {
                        if data.len() >= n {
                            let _ = decode_reply_header(&data[..n]);
                        }
                    }
                }
                if data.len() >= OPTION_REPLY_HEADER_LEN {
                    let _ = decode_option_reply_header(&data[..OPTION_REPLY_HEADER_LEN].try_into().unwrap());
                }
            }
        }

        proptest! {
            // Cheap cases, and the interesting ones (a request ending exactly at or just past the end) are rare.
            #![proptest_config(ProptestConfig::with_cases(8192))]

            /// A request header the validator accepts is one the server can execute as it stands: a known
            /// command, flags it may carry, in range, aligned, and no larger than the payload limit; a write to
            /// a read-only export is never accepted.
            #[test]
            fn accepted_requests_are_executable(
                command in prop_oneof![6 => 0u16..8, 1 => any::<u16>()],
                flags in prop_oneof![
                    4 => Just(0u16),
                    2 => proptest::sample::select(vec![
                        CMD_FLAG_FUA,
                        CMD_FLAG_DF,
                        CMD_FLAG_NO_HOLE,
                        CMD_FLAG_REQ_ONE,
                        CMD_FLAG_FAST_ZERO,
                        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
                        CMD_FLAG_PAYLOAD_LEN,
                        CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_FUA,
                    ]),
                    1 => any::<u16>(),
                ],
                // Mostly multiples of the block size, often ending near the export's end, so that many
                // requests pass validation and many fail it narrowly.
                (offset_mode, back, raw_offset) in (0u8..6, 0u64..24, any::<u64>()),
                (length_units, raw_length, raw_len_mode) in (0u32..24, any::<u32>(), 0u8..8),
                size_units in 0u64..512,
                min_block in prop_oneof![Just(1u32), Just(512), Just(4096)],
                tflags in prop_oneof![
                    2 => Just(ALL_SEND),
                    1 => Just(ALL_SEND | FLAG_READ_ONLY),
                    1 => any::<u16>(),
                ],
                structured in any::<bool>(),
                extended in any::<bool>(),
                block_status in any::<bool>(),
            ) {
                let unit = u64::from(min_block.max(512));
                let size = size_units * unit;
                let n = Negotiated {
                    size,
                    min_block,
                    max_payload: 1 << 16,
                    flags: tflags | FLAG_HAS_FLAGS,
                    structured: structured || extended,
                    extended,
                    block_status,
                };
                let offset = match offset_mode {
                    0..=3 => size.saturating_sub(back * unit),
                    4 => raw_offset % (1 << 21),
                    _ => raw_offset,
                };
                let length = match raw_len_mode {
                    0 => raw_length,
                    1 => raw_length % (1 << 17),
                    _ => length_units * unit as u32,
                };
                let h = RequestHeader { flags, command, handle: 9, offset, length: u64::from(length) };
                let wire = if extended {
                    encode_ext_request_header(&h).to_vec()
                } else {
                    encode_request_header(&h).to_vec()
                };
                let Ok(r) = decode_request(&wire, &n) else { return Ok(()) };
                prop_assert_eq!(r.handle, 9);
                if r.command == Command::Disconnect {
                    return Ok(()); // its flags, offset and length mean nothing
                }
                // Flags only where they mean something and were offered; commands only if advertised.
                let t = n.flags;
                let read = matches!(r.command, Command::Read { .. });
                let status = matches!(r.command, Command::BlockStatus { .. });
                let zeroes = matches!(r.command, Command::WriteZeroes { .. });
                prop_assert!(flags & CMD_FLAG_FUA == 0 || t & FLAG_SEND_FUA != 0);
                prop_assert!(flags & CMD_FLAG_DF == 0 || read && n.structured && t & FLAG_SEND_DF != 0);
                let write = matches!(r.command, Command::Write { .. });
                // With extended headers only writes may announce a payload.
                prop_assert!(!extended || flags & CMD_FLAG_PAYLOAD_LEN == 0 || write);
                prop_assert!(flags & CMD_FLAG_REQ_ONE == 0 || status);
                prop_assert!(flags & CMD_FLAG_NO_HOLE == 0 || zeroes);
                prop_assert!(flags & CMD_FLAG_FAST_ZERO == 0 || zeroes && t & FLAG_SEND_FAST_ZERO != 0);
                let payload_flag = if extended && write { CMD_FLAG_PAYLOAD_LEN } else { 0 };
                let known = CMD_FLAG_FUA | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO
                    | payload_flag;
                prop_assert!(flags & !known == 0);
                match r.command {
                    Command::Flush => prop_assert!(t & FLAG_SEND_FLUSH != 0),
                    Command::Cache => prop_assert!(t & FLAG_SEND_CACHE != 0),
                    Command::BlockStatus { .. } => prop_assert!(block_status),
                    _ => {}
                }
                match r.command {
                    Command::Flush => return Ok(()),
                    Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. } => {
                        prop_assert!(n.flags & FLAG_READ_ONLY == 0)
                    }
                    Command::Read { .. } => prop_assert!(r.len <= u64::from(n.max_payload)),
                    _ => {}
                }
                if let Command::Write { .. } = r.command {
                    prop_assert!(r.len <= u64::from(n.max_payload));
                }
                prop_assert!(r.len > 0);
                prop_assert!(r.offset.checked_add(r.len).is_some_and(|end| end <= size));
                prop_assert!(r.offset % u64::from(min_block) == 0 && r.len % u64::from(min_block) == 0);
            }
        }
    }
}
