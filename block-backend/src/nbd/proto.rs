//! NBD wire constants, named as in the protocol specification (NetworkBlockDevice/nbd `doc/proto.md`).
//!
//! Only numbers live here; how they are combined into frames is [`super::codec`]'s job. Everything on the wire
//! is big-endian.

/// Server greeting, first 8 bytes: ASCII `NBDMAGIC`.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle greeting and the prefix of every client option: ASCII `IHAVEOPT`.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply in fixed newstyle negotiation.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Prefix of every transmission request once extended headers are negotiated.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Prefix of every reply chunk once extended headers are negotiated.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Server greeting length: NBDMAGIC + IHAVEOPT + 16-bit handshake flags.
pub const GREETING_LEN: usize = 18;
/// Option header length: IHAVEOPT + option + data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Option reply header length: magic + option + reply type + data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Transmission request header length (compact headers).
pub const REQUEST_HEADER_LEN: usize = 28;
/// Transmission request header length with extended headers (64-bit length).
pub const EXT_REQUEST_HEADER_LEN: usize = 32;
/// Simple reply length (without read data).
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured reply chunk header length.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Extended reply chunk header length (adds the request's offset, 64-bit payload length).
pub const EXT_CHUNK_HEADER_LEN: usize = 32;
/// Length of the reserved zeroes after an `NBD_OPT_EXPORT_NAME` reply (omitted with `NO_ZEROES`).
pub const EXPORT_NAME_ZEROES: usize = 124;
/// Longest string the spec allows (export names, descriptions, context names).
pub const MAX_STRING_LEN: usize = 4096;

// Handshake flags (server, 16 bits).
/// Server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

// Client flags (32 bits).
/// Client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags (16 bits).
/// Always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Export behaves like a rotational disk.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is supported on reads (only with structured replies).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Flush and FUA on one connection cover writes from every connection to the export.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_RESIZE` is supported (not offered by Shale).
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_CMD_CACHE` is supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
/// Select an export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// End negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Withdrawn `PEEK_EXPORT` extension.
pub const OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export without selecting it.
pub const OPT_INFO: u32 = 6;
/// Describe and select an export, then enter transmission.
pub const OPT_GO: u32 = 7;
/// Enable structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts for `NBD_CMD_BLOCK_STATUS`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// 64-bit extended headers for requests and replies (implies structured replies).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
/// Option accepted / list finished.
pub const REP_ACK: u32 = 1;
/// One export in a `NBD_OPT_LIST` answer.
pub const REP_SERVER: u32 = 2;
/// One piece of export information in an `NBD_OPT_INFO`/`GO` answer.
pub const REP_INFO: u32 = 3;
/// One metadata context in a `LIST`/`SET_META_CONTEXT` answer.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks error replies.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Unknown option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Known option, refused by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Known option, malformed.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// TLS required first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Client must ask for `NBD_INFO_BLOCK_SIZE`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Option payload too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// Extended headers are required, or are already on (so structured replies cannot be asked for).
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// Info types (in `NBD_REP_INFO`).
/// Size and transmission flags (always sent).
pub const INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
/// Read.
pub const CMD_READ: u16 = 0;
/// Write (payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Disconnect after in-flight requests complete.
pub const CMD_DISC: u16 = 2;
/// Make acknowledged writes durable.
pub const CMD_FLUSH: u16 = 3;
/// Discard.
pub const CMD_TRIM: u16 = 4;
/// Prefetch hint.
pub const CMD_CACHE: u16 = 5;
/// Write zeroes without a payload.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Query metadata contexts.
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Resize (not offered by Shale).
pub const CMD_RESIZE: u16 = 8;

// Command flags.
/// Force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Write zeroes must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Read: at most one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Block status: at most one extent.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Write zeroes: fail with `ENOTSUP` unless it is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers: the length field is a payload length (that many bytes follow), not an effect length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply flags and types.
/// Final chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// No payload; ends a reply.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Read data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// A run of zeroes at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Block status descriptors for one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Block status descriptors with 64-bit lengths (extended headers only).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit 15 marks error chunk types.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// Error for the whole request.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// Error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

/// The allocation metadata context every export offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of qemu's changed-block contexts, `qemu:dirty-bitmap:NAME` (qemu's `docs/interop/nbd.rst`): an export
/// offers one per snapshot it can report changes since.
pub const QEMU_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";
/// `qemu:dirty-bitmap:NAME`: the extent changed (is "dirty") since the bitmap's point in time.
pub const STATE_DIRTY: u32 = 1 << 0;
/// `base:allocation`: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// Default TCP port (IANA).
pub const DEFAULT_PORT: u16 = 10809;
/// Largest read/write payload when a server advertises none (the spec's conventional default).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

/// Name of a command for logs and error messages.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        CMD_RESIZE => "RESIZE",
        _ => "UNKNOWN",
    }
}

/// Name of an option for logs.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        OPT_PEEK_EXPORT => "PEEK_EXPORT",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => "UNKNOWN",
    }
}
