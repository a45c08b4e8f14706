//! Shale's data path.
//!
//! This crate owns the one seam every volume offers and every front end consumes, [`BlockDevice`], plus the
//! machinery underneath and in front of it:
//!
//! - [`buf`]: page-aligned owned I/O buffers, so the same buffer can go to `O_DIRECT` io_uring requests, NBD
//!   sockets and guest memory copies without re-allocation.
//! - [`device`]: the `BlockDevice` trait and its vocabulary (extents, write flags, capabilities).
//! - [`error`]: the crate's error enum, and the single place where errors become NBD errno values and
//!   virtio-blk status bytes.
//! - [`uring`]: the io_uring engine (`IoEngine`) on dedicated threads.
//! - [`iothread`]: I/O threads — single-threaded runtimes with their own ring, so a front end's request is served
//!   start to finish on one thread (`local_ring` is the per-thread ring they drive).
//! - [`file`](mod@file): a raw file or block device as a `BlockDevice`, on the io_uring engine.
//! - [`semantics`]: how front-end commands (NBD, virtio-blk) map onto `BlockDevice` calls, shared so flush, FUA,
//!   discard and write-zeroes behave the same on every front.
//! - [`nbd`]: the NBD protocol: one codec for server and client.

pub mod buf;
pub mod device;
pub mod error;
pub mod file;
pub mod iothread;
mod local_ring;
pub mod nbd;
pub mod semantics;
pub mod uring;

pub use buf::IoBuf;
pub use device::{BlockDevice, DeviceInfo, Extent, ExtentKind, WriteFlags};
pub use error::{BlockError, Result};
pub use iothread::IoThreads;
