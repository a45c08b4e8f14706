//! Shale's SR manager: the storage object model and the host's control plane.
//!
//! - [`driver`]: the SR driver seam ([`SrDriver`] for an SR type, [`AttachedSr`] for one attached SR) and the
//!   driver-neutral model (VDIs, snapshots, space accounting, capabilities).
//! - [`thin`]: the `thin` SR type, on the native engine (`shale-snapshot`).
//! - [`reflink`]: the `reflink` SR type, files on XFS/btrfs with snapshot/clone offloaded to `FICLONE`.
//! - [`registry`]: which SRs this host owns (a small JSON file in the state directory, replaced atomically).
//! - [`host`]: [`Host`], every SR of this host plus the addressing rules (`NAME`, `SR/NAME`, UUID); the object
//!   later front ends (NBD, VMs) use to reach volumes as `Arc<dyn BlockDevice>`.
//! - [`export`]: NBD export of every VDI and snapshot (names `SR/NAME`, UUID, unique `NAME`), opened per
//!   connection so an exported volume is "in use" only while a client is connected.
//! - [`service`]: the tonic gRPC service over [`Host`]; [`proto`] is the generated API (`proto/shale.proto`).
//! - [`client`]: connecting to a daemon over its Unix socket.
//! - [`size`]: human-readable sizes (`10G`, `64K`) in and out.
//! - [`error`]: the crate's error enum and its mapping to gRPC status codes.

#![warn(missing_docs)]

pub mod client;
pub mod driver;
pub mod error;
pub mod export;
pub mod host;
pub mod reflink;
pub mod registry;
pub mod service;
pub mod size;
pub mod thin;

/// The generated gRPC API (`proto/shale.proto`, package `shale.v1`).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("shale.v1");
}

pub use driver::{
    AttachedSr, Capabilities, CheckReport, SrCreateOptions, SrDriver, SrStats, VdiInfo, VdiKind,
};
pub use error::{Result, SrError};
pub use host::Host;
