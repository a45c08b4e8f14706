//! The NBD protocol: one codec, a server that exports any [`BlockDevice`], and a client that is one.
//!
//! Implemented from the NBD specification (NetworkBlockDevice/nbd `doc/proto.md`), fixed newstyle only:
//!
//! - [`proto`]: the wire constants;
//! - [`codec`]: encoders and decoders for every handshake and transmission frame, shared by both ends.
//!   Requests are parsed and validated into a typed [`codec::Request`] before anything executes them;
//! - [`server`]: [`NbdServer`], an export registry plus Unix and TCP listeners, many connections, many requests
//!   in flight per connection with out-of-order replies, structured replies with holes, `base:allocation` and
//!   qemu's `qemu:dirty-bitmap:` changed-block contexts ([`server::DirtyBitmaps`]), extended headers (64-bit
//!   lengths);
//! - [`client`]: [`NbdClient`], a [`BlockDevice`] backed by a remote export (used for remote VM disks and for
//!   testing the server against itself), with many requests in flight over one connection, extended headers
//!   when the server offers them;
//! - [`tls`]: `NBD_OPT_STARTTLS` on both ends (X.509 certificates, rustls).
//!
//! The crate-level `nbd` crate on crates.io cannot serve here: it disconnects on options libnbd clients send and
//! has neither structured replies nor block status.
//!
//! [`BlockDevice`]: crate::BlockDevice

pub mod client;
pub mod codec;
pub mod proto;
pub mod server;
pub mod tls;

pub use client::{ConnectOptions, NbdAddr, NbdClient, NbdUri};
pub use codec::ProtocolError;
pub use server::{
    ConnectionInfo, DirtyBitmaps, Export, ExportRegistry, ExportSource, ExportSummary, ListenAddr,
    Listener, NbdServer, ServerConfig, ServerTlsConfig,
};
pub use tls::{ClientTls, ServerTls, TlsError, TlsPolicy};

use std::io;

/// Errors of the NBD server and client outside individual block requests (which use [`crate::BlockError`]).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The peer broke the protocol.
    #[error("NBD protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// Socket or listener I/O failed.
    #[error("NBD I/O error: {0}")]
    Io(#[from] io::Error),
    /// An export with this name is already registered.
    #[error("export {0:?} already exists")]
    ExportExists(String),
    /// The server has no export with this name (client: the server said so).
    #[error("no such export {0:?}")]
    NoSuchExport(String),
    /// The server refused an option the client needs.
    #[error("server refused {option}: {message}")]
    Refused {
        /// Option name.
        option: &'static str,
        /// Server's message, or the reply code.
        message: String,
    },
    /// An NBD URI could not be parsed.
    #[error("invalid NBD URI {uri:?}: {reason}")]
    BadUri {
        /// The URI.
        uri: String,
        /// Why.
        reason: &'static str,
    },
    /// The handshake did not complete in time.
    #[error("NBD handshake timed out")]
    Timeout,
    /// TLS could not be set up or negotiated.
    #[error(transparent)]
    Tls(#[from] TlsError),
}
