//! virtio-blk requests: parse a descriptor chain into a typed [`Request`], before any I/O.
//!
//! Everything here treats the chain as hostile (Firecracker's `request.rs` pattern): descriptor ranges must lie
//! in guest RAM, driver-readable buffers must come before device-writable ones, the header and the status byte
//! must be where the spec puts them, data lengths must be whole sectors, sector ranges must lie on the disk, and
//! totals are capped so a guest cannot make the VMM allocate unbounded host memory. A chain that fails any check
//! becomes a [`RequestError`]; execution code never sees raw descriptors.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemoryMmap;

/// Sector size of the virtio-blk protocol (always 512, whatever the device's block size).
pub const SECTOR_SIZE: u64 = 512;
/// Largest data transfer one request may carry; larger requests get IOERR. Matches the advertised
/// `seg_max * size_max`.
pub const MAX_REQUEST_BYTES: u64 = 8 << 20;
/// Most descriptors one chain may have (the advertised `seg_max` plus header and status).
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Advertised maximum number of data segments per request.
pub const SEG_MAX: u32 = 126;
/// Advertised maximum size of one segment.
pub const SIZE_MAX: u32 = 64 << 10;
/// Advertised maximum number of ranges in one DISCARD / WRITE_ZEROES request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;

/// Request type codes (virtio 1.2, 5.2.6).
pub mod types {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush the volatile write cache.
    pub const FLUSH: u32 = 4;
    /// Device identifier string.
    pub const GET_ID: u32 = 8;
    /// Discard ranges.
    pub const DISCARD: u32 = 11;
    /// Write zeroes to ranges.
    pub const WRITE_ZEROES: u32 = 13;
}

/// One descriptor as the guest gave it (already flattened out of any indirect table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

/// A contiguous piece of guest memory a request reads from or writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address (validated to lie in RAM).
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// One DISCARD or WRITE_ZEROES range, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Byte offset on the disk.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// WRITE_ZEROES only: the driver allows the device to deallocate.
    pub unmap: bool,
}

/// A validated virtio-blk request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset` into `segments`.
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// Total length (sum of segments).
        len: u64,
        /// Where the data goes.
        segments: Vec<Segment>,
    },
    /// Write `len` bytes at `offset` from `segments`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// Total length.
        len: u64,
        /// Where the data comes from.
        segments: Vec<Segment>,
    },
    /// Make completed writes durable.
    Flush,
    /// Write the device id string into `segment`.
    GetId {
        /// Destination (at most [`ID_BYTES`] bytes are written).
        segment: Segment,
    },
    /// Discard ranges.
    Discard(Vec<Range>),
    /// Zero ranges.
    WriteZeroes(Vec<Range>),
}

impl Request {
    /// Bytes the device writes into driver buffers on success, not counting the status byte (the used length).
    pub fn data_in_len(&self) -> u32 {
        match self {
            Request::Read { len, .. } => *len as u32,
            Request::GetId { segment } => segment.len.min(ID_BYTES as u32),
            _ => 0,
        }
    }
}

/// Why a chain was rejected. Reported to the guest as IOERR (or UNSUPP), and counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A descriptor points outside guest RAM.
    #[error("descriptor {addr:#x}+{len} is outside guest RAM")]
    BadAddress {
        /// Descriptor address.
        addr: u64,
        /// Descriptor length.
        len: u32,
    },
    /// The chain is longer than the device accepts.
    #[error("descriptor chain too long")]
    TooManyDescriptors,
    /// A driver-readable descriptor follows a device-writable one.
    #[error("readable descriptor after a writable one")]
    BadOrder,
    /// There is no room for the 16-byte header.
    #[error("request header missing or short")]
    NoHeader,
    /// There is no device-writable byte for the status.
    #[error("no status byte")]
    NoStatus,
    /// The request type is not one this device implements.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// The data length is not a whole number of sectors, or the buffers have the wrong direction.
    #[error("bad data length {0}")]
    BadLength(u64),
    /// The request carries more data than [`MAX_REQUEST_BYTES`].
    #[error("request of {0} bytes is too large")]
    TooLarge(u64),
    /// The sector range is not on the disk.
    #[error("sectors {sector}+{sectors} are beyond the end of the disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
    },
    /// A write-type request to a read-only disk.
    #[error("disk is read-only")]
    ReadOnly,
    /// The request type was not negotiated (e.g. DISCARD without VIRTIO_BLK_F_DISCARD).
    #[error("request type {0} was not negotiated")]
    NotNegotiated(u32),
    /// Reading guest memory failed.
    #[error("guest memory read failed")]
    Memory,
}

impl RequestError {
    /// The virtio status byte the guest gets for this error.
    pub fn status(&self) -> u8 {
        use shale_block::error::virtio_status;
        match self {
            RequestError::Unsupported(_) | RequestError::NotNegotiated(_) => virtio_status::UNSUPP,
            _ => virtio_status::IOERR,
        }
    }
}

/// What the device knows when it parses a request.
#[derive(Debug, Clone, Copy)]
pub struct ParseContext {
    /// Disk size in bytes.
    pub disk_size: u64,
    /// The disk refuses writes.
    pub read_only: bool,
    /// DISCARD was negotiated.
    pub discard: bool,
    /// WRITE_ZEROES was negotiated.
    pub write_zeroes: bool,
    /// FLUSH was negotiated.
    pub flush: bool,
}

/// A parsed chain: the request (or why it was refused) and where its status byte goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Where to write the status byte; `None` when the chain has no valid writable byte (then the chain is
    /// returned with used length 0 and no status).
    pub status: Option<GuestAddress>,
    /// The request, or why it was refused.
    pub request: Result<Request, RequestError>,
}

/// True when `[addr, addr+len)` lies entirely in guest RAM.
pub fn in_ram(mem: &GuestMemoryMmap, addr: u64, len: usize) -> bool {
    GuestMemoryBackend::check_range(mem, GuestAddress(addr), len)
}

/// Gather `n` bytes that may span several readable segments, starting `skip` bytes in.
fn gather(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    mut skip: u64,
    out: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0usize;
    for s in segs {
        if done == out.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = ((len - skip) as usize).min(out.len() - done);
        mem.read_slice(&mut out[done..done + take], GuestAddress(s.addr.0 + skip))
            .map_err(|_| RequestError::Memory)?;
        done += take;
        skip = 0;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(RequestError::Memory)
    }
}

/// Cut the first `skip` bytes off a segment list.
fn skip_bytes(segs: &[Segment], mut skip: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        out.push(Segment {
            addr: GuestAddress(s.addr.0 + skip),
            len: (len - skip) as u32,
        });
        skip = 0;
    }
    out
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

fn check_sectors(ctx: &ParseContext, sector: u64, bytes: u64) -> Result<u64, RequestError> {
    let sectors = bytes / SECTOR_SIZE;
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(RequestError::OutOfRange { sector, sectors })?;
    match offset.checked_add(bytes) {
        Some(end) if end <= ctx.disk_size => Ok(offset),
        _ => Err(RequestError::OutOfRange { sector, sectors }),
    }
}

/// Parse the descriptors of one chain. Never panics and never touches memory outside guest RAM: every
/// descriptor is range-checked before any byte is read through it.
pub fn parse(mem: &GuestMemoryMmap, descs: &[Desc], ctx: &ParseContext) -> Parsed {
    // Find the status byte first, so even a malformed request can be answered.
    let status = descs
        .last()
        .filter(|d| d.writable && d.len >= 1)
        .and_then(|d| {
            let addr = d.addr.checked_add(u64::from(d.len) - 1)?;
            in_ram(mem, addr, 1).then_some(GuestAddress(addr))
        });
    Parsed {
        status,
        request: parse_request(mem, descs, ctx, status.is_some()),
    }
}

fn parse_request(
    mem: &GuestMemoryMmap,
    descs: &[Desc],
    ctx: &ParseContext,
    has_status: bool,
) -> Result<Request, RequestError> {
    if descs.len() > MAX_DESCRIPTORS {
        return Err(RequestError::TooManyDescriptors);
    }
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for d in descs {
        if d.len > 0 && !in_ram(mem, d.addr, d.len as usize) {
            return Err(RequestError::BadAddress {
                addr: d.addr,
                len: d.len,
            });
        }
        let seg = Segment {
            addr: GuestAddress(d.addr),
            len: d.len,
        };
        if d.writable {
            writable.push(seg);
        } else if !writable.is_empty() {
            return Err(RequestError::BadOrder);
        } else {
            readable.push(seg);
        }
    }
    if !has_status {
        return Err(RequestError::NoStatus);
    }
    // Drop the status byte from the writable list.
    if let Some(last) = writable.last_mut() {
        last.len -= 1;
        if last.len == 0 {
            writable.pop();
        }
    }
    let mut header = [0u8; 16];
    if total(&readable) < 16 {
        return Err(RequestError::NoHeader);
    }
    gather(mem, &readable, 0, &mut header)?;
    let type_ = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let payload = skip_bytes(&readable, 16);
    let out_len = total(&payload);
    let in_len = total(&writable);

    match type_ {
        types::IN => {
            if out_len != 0 || !in_len.is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::BadLength(in_len));
            }
            if in_len > MAX_REQUEST_BYTES {
                return Err(RequestError::TooLarge(in_len));
            }
            let offset = check_sectors(ctx, sector, in_len)?;
            Ok(Request::Read {
                offset,
                len: in_len,
                segments: writable,
            })
        }
        types::OUT => {
            if in_len != 0 || !out_len.is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::BadLength(out_len));
            }
            if out_len > MAX_REQUEST_BYTES {
                return Err(RequestError::TooLarge(out_len));
            }
            if ctx.read_only {
                return Err(RequestError::ReadOnly);
            }
            let offset = check_sectors(ctx, sector, out_len)?;
            Ok(Request::Write {
                offset,
                len: out_len,
                segments: payload,
            })
        }
        types::FLUSH => {
            if !ctx.flush {
                return Err(RequestError::NotNegotiated(type_));
            }
            Ok(Request::Flush)
        }
        types::GET_ID => {
            let Some(&first) = writable.first() else {
                return Err(RequestError::BadLength(0));
            };
            Ok(Request::GetId { segment: first })
        }
        types::DISCARD | types::WRITE_ZEROES => {
            let negotiated = if type_ == types::DISCARD {
                ctx.discard
            } else {
                ctx.write_zeroes
            };
            if !negotiated {
                return Err(RequestError::NotNegotiated(type_));
            }
            if ctx.read_only {
                return Err(RequestError::ReadOnly);
            }
            if out_len == 0 || !out_len.is_multiple_of(16) || in_len != 0 {
                return Err(RequestError::BadLength(out_len));
            }
            let count = out_len / 16;
            if count > u64::from(MAX_DISCARD_SEG) {
                return Err(RequestError::TooLarge(out_len));
            }
            let mut ranges = Vec::with_capacity(count as usize);
            for i in 0..count {
                let mut raw = [0u8; 16];
                gather(mem, &payload, i * 16, &mut raw)?;
                let sector = u64::from_le_bytes([
                    raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
                ]);
                let sectors = u64::from(u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]));
                let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
                // Only the UNMAP flag is defined, and only for WRITE_ZEROES (virtio 1.2, 5.2.6.2).
                if flags & !1 != 0 || (type_ == types::DISCARD && flags != 0) {
                    return Err(RequestError::Unsupported(type_));
                }
                let bytes = sectors * SECTOR_SIZE;
                let offset = check_sectors(ctx, sector, bytes)?;
                ranges.push(Range {
                    offset,
                    len: bytes,
                    unmap: flags & 1 != 0,
                });
            }
            Ok(if type_ == types::DISCARD {
                Request::Discard(ranges)
            } else {
                Request::WriteZeroes(ranges)
            })
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("test memory")
    }

    fn ctx() -> ParseContext {
        ParseContext {
            disk_size: 1 << 20,
            read_only: false,
            discard: true,
            write_zeroes: true,
            flush: true,
        }
    }

    fn header(m: &GuestMemoryMmap, at: u64, type_: u32, sector: u64) {
        m.write_obj(type_, GuestAddress(at)).expect("write");
        m.write_obj(0u32, GuestAddress(at + 4)).expect("write");
        m.write_obj(sector, GuestAddress(at + 8)).expect("write");
    }

    fn d(addr: u64, len: u32, writable: bool) -> Desc {
        Desc {
            addr,
            len,
            writable,
        }
    }

    #[test]
    fn read_write_flush() {
        let m = mem();
        header(&m, 0x1000, types::IN, 2);
        let p = parse(
            &m,
            &[
                d(0x1000, 16, false),
                d(0x2000, 1024, true),
                d(0x3000, 1, true),
            ],
            &ctx(),
        );
        assert_eq!(p.status, Some(GuestAddress(0x3000)));
        assert_eq!(
            p.request,
            Ok(Request::Read {
                offset: 1024,
                len: 1024,
                segments: vec![Segment {
                    addr: GuestAddress(0x2000),
                    len: 1024
                }]
            })
        );
        // Data and status in one descriptor, header and data in one descriptor.
        header(&m, 0x1000, types::OUT, 0);
        let p = parse(
            &m,
            &[d(0x1000, 16 + 512, false), d(0x3000, 1, true)],
            &ctx(),
        );
        assert_eq!(
            p.request,
            Ok(Request::Write {
                offset: 0,
                len: 512,
                segments: vec![Segment {
                    addr: GuestAddress(0x1010),
                    len: 512
                }]
            })
        );
        header(&m, 0x1000, types::IN, 0);
        let p = parse(&m, &[d(0x1000, 16, false), d(0x2000, 513, true)], &ctx());
        assert_eq!(p.status, Some(GuestAddress(0x2200)));
        assert!(matches!(p.request, Ok(Request::Read { len: 512, .. })));
        header(&m, 0x1000, types::FLUSH, 0);
        assert_eq!(
            parse(&m, &[d(0x1000, 16, false), d(0x3000, 1, true)], &ctx()).request,
            Ok(Request::Flush)
        );
    }

    #[test]
    fn hostile_chains() {
        let m = mem();
        header(&m, 0x1000, types::IN, 0);
        // Status outside RAM: no status at all.
        let p = parse(
            &m,
            &[
                d(0x1000, 16, false),
                d(0x2000, 512, true),
                d(1 << 40, 1, true),
            ],
            &ctx(),
        );
        assert_eq!(p.status, None);
        assert!(p.request.is_err());
        // Data outside RAM, or wrapping the address space.
        let p = parse(
            &m,
            &[
                d(0x1000, 16, false),
                d(0xff000, 0x2000, true),
                d(0x3000, 1, true),
            ],
            &ctx(),
        );
        assert!(matches!(p.request, Err(RequestError::BadAddress { .. })));
        let p = parse(
            &m,
            &[
                d(0x1000, 16, false),
                d(u64::MAX - 10, 512, true),
                d(0x3000, 1, true),
            ],
            &ctx(),
        );
        assert!(matches!(p.request, Err(RequestError::BadAddress { .. })));
        let p = parse(
            &m,
            &[d(0x1000, 16, false), d(0x3000, u32::MAX, true)],
            &ctx(),
        );
        assert!(p.status.is_none());
        // Short header, readable after writable, partial sector.
        let p = parse(&m, &[d(0x1000, 8, false), d(0x3000, 1, true)], &ctx());
        assert_eq!(p.request, Err(RequestError::NoHeader));
        let p = parse(
            &m,
            &[
                d(0x2000, 512, true),
                d(0x1000, 16, false),
                d(0x3000, 1, true),
            ],
            &ctx(),
        );
        assert_eq!(p.request, Err(RequestError::BadOrder));
        let p = parse(
            &m,
            &[
                d(0x1000, 16, false),
                d(0x2000, 100, true),
                d(0x3000, 1, true),
            ],
            &ctx(),
        );
        assert!(matches!(p.request, Err(RequestError::BadLength(100))));
        // Out of range sectors, including overflow.
        header(&m, 0x1000, types::IN, 2048);
        let p = parse(
            &m,
            &[
                d(0x1000, 16, false),
                d(0x2000, 512, true),
                d(0x3000, 1, true),
            ],
            &ctx(),
        );
        assert!(matches!(p.request, Err(RequestError::OutOfRange { .. })));
        header(&m, 0x1000, types::IN, u64::MAX / 256);
        let p = parse(
            &m,
            &[
                d(0x1000, 16, false),
                d(0x2000, 512, true),
                d(0x3000, 1, true),
            ],
            &ctx(),
        );
        assert!(matches!(p.request, Err(RequestError::OutOfRange { .. })));
        // Unknown type: UNSUPP.
        header(&m, 0x1000, 99, 0);
        let p = parse(&m, &[d(0x1000, 16, false), d(0x3000, 1, true)], &ctx());
        assert_eq!(p.request.as_ref().map_err(RequestError::status), Err(2));
        // Too many descriptors.
        let many: Vec<Desc> = (0..200).map(|i| d(0x1000 + i * 16, 16, false)).collect();
        assert!(parse(&m, &many, &ctx()).request.is_err());
        // Empty chain.
        let p = parse(&m, &[], &ctx());
        assert_eq!(p.status, None);
        // Writes to a read-only disk.
        header(&m, 0x1000, types::OUT, 0);
        let ro = ParseContext {
            read_only: true,
            ..ctx()
        };
        let p = parse(&m, &[d(0x1000, 16 + 512, false), d(0x3000, 1, true)], &ro);
        assert_eq!(p.request, Err(RequestError::ReadOnly));
    }

    #[test]
    fn discard_segments() {
        let m = mem();
        header(&m, 0x1000, types::DISCARD, 0);
        m.write_obj(8u64, GuestAddress(0x1010)).expect("write");
        m.write_obj(16u32, GuestAddress(0x1018)).expect("write");
        m.write_obj(0u32, GuestAddress(0x101c)).expect("write");
        let p = parse(&m, &[d(0x1000, 32, false), d(0x3000, 1, true)], &ctx());
        assert_eq!(
            p.request,
            Ok(Request::Discard(vec![Range {
                offset: 4096,
                len: 8192,
                unmap: false
            }]))
        );
        let no = ParseContext {
            discard: false,
            ..ctx()
        };
        assert_eq!(
            parse(&m, &[d(0x1000, 32, false), d(0x3000, 1, true)], &no)
                .request
                .map_err(|e| e.status()),
            Err(2)
        );
        m.write_obj(4096u32, GuestAddress(0x1018)).expect("write");
        let p = parse(&m, &[d(0x1000, 32, false), d(0x3000, 1, true)], &ctx());
        assert!(matches!(p.request, Err(RequestError::OutOfRange { .. })));
    }
}
