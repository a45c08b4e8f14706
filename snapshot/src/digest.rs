//! Range scans of a view's map, and the content digest built on them.
//!
//! `shale vdi digest` must agree for two objects with the same content however differently they are stored
//! (written zeroes, holes, zero entries, clones reading through parents), and must not read a terabyte of holes.
//! The digest is therefore defined over content, in fixed 1 MiB chunks independent of the cluster size:
//!
//! `digest = blake3("shale-digest-v1" ‖ size as u64 LE ‖ blake3(chunk₀) ‖ blake3(chunk₁) ‖ …)`
//!
//! where the last chunk is short if the size is not a multiple of 1 MiB. Chunks the map shows as unmapped are
//! hashed from a precomputed all-zero chunk hash without any I/O; chunks with data are read through the normal
//! read path. An allocated chunk that happens to hold zeroes hashes the same as a hole.

use std::collections::BTreeMap;
use std::sync::Arc;

use shale_block::{BlockDevice, IoBuf};

use crate::engine::Inner;
use crate::error::{EngineError, Result};
use crate::keys;
use crate::state::VolState;
use crate::volume::Volume;

/// Digest chunk size.
pub const CHUNK: u64 = 1 << 20;

/// Clusters in [first, last) that the view (vs, epoch) maps, own entries shadowing the parent chain's, with their
/// physical cluster (or [`keys::ZERO_CLUSTER`]). Cost is proportional to the entries in the range, not its size.
pub(crate) fn mapped_clusters(
    inner: &Inner,
    vs: &Arc<VolState>,
    epoch: u64,
    first: u64,
    last: u64,
) -> Result<Vec<(u64, u64)>> {
    let mut out = BTreeMap::new();
    let mut v = vs.clone();
    let mut e = epoch;
    let mut last = last;
    loop {
        scan_own(inner, v.id, e, first, last, &mut out)?;
        match (v.parent, v.parent_state.clone()) {
            (Some(p), Some(ps)) => {
                last = last.min(p.size.div_ceil(inner.cs));
                if first >= last {
                    break;
                }
                e = p.epoch;
                v = ps;
            }
            _ => break,
        }
    }
    Ok(out.into_iter().collect())
}

fn scan_own(
    inner: &Inner,
    vol: u64,
    epoch: u64,
    first: u64,
    last: u64,
    out: &mut BTreeMap<u64, u64>,
) -> Result<()> {
    if first >= last {
        return Ok(());
    }
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_iterate_upper_bound(keys::map(vol, last, u64::MAX).to_vec());
    let mut it = inner.db.raw_iterator_opt(ro);
    it.seek(keys::map(vol, first, epoch));
    while let (Some(k), Some(val)) = (it.key(), it.value()) {
        let (_, c, e) =
            keys::parse_map(k).ok_or_else(|| EngineError::Corrupt("malformed map key".into()))?;
        if e > epoch {
            it.seek(keys::map(vol, c, epoch));
            continue;
        }
        let p = keys::parse_map_value(k, val).ok_or_else(|| {
            EngineError::Corrupt(format!(
                "map entry vol {vol} cluster {c} fails its checksum"
            ))
        })?;
        out.entry(c).or_insert(p);
        match c.checked_add(1) {
            Some(n) if n < last => it.seek(keys::map(vol, n, epoch)),
            _ => break,
        }
    }
    it.status()?;
    Ok(())
}

/// Chunks examined per map scan: the map is walked in windows of this many chunks (4 GiB), so the cost of a
/// digest is one range scan per window plus reads of the chunks that hold data.
const WINDOW: u64 = 4096;

/// Content digest of an open volume (see the module docs for the definition). A volume's `block_status` walks
/// its map, so this costs one range scan per 4 GiB window plus reads of the chunks that hold data.
pub async fn digest(vol: &Volume) -> Result<String> {
    Ok(digest_device(vol).await?)
}

/// Digest of plain bytes under the same definition, for tests and for comparing with files.
pub fn digest_bytes(data: &[u8]) -> String {
    let mut outer = blake3::Hasher::new();
    outer.update(b"shale-digest-v1");
    outer.update(&(data.len() as u64).to_le_bytes());
    for chunk in data.chunks(CHUNK as usize) {
        outer.update(blake3::hash(chunk).as_bytes());
    }
    outer.finalize().to_hex().to_string()
}

/// Content digest of any [`BlockDevice`] under the same definition, so volumes of other SR types (e.g. files on
/// a reflink filesystem) can be compared with native ones. Chunks that `block_status` reports as holes or zero
/// extents are hashed without I/O; the device is asked about one 4 GiB window at a time.
pub async fn digest_device(dev: &dyn BlockDevice) -> shale_block::Result<String> {
    let size = dev.size();
    let zero_chunk = blake3::hash(&vec![0u8; CHUNK as usize]);
    let mut outer = blake3::Hasher::new();
    outer.update(b"shale-digest-v1");
    outer.update(&size.to_le_bytes());
    let chunks = size.div_ceil(CHUNK);
    let mut first = 0u64;
    while first < chunks {
        let last = (first + WINDOW).min(chunks);
        let (start, end) = (first * CHUNK, (last * CHUNK).min(size));
        // Chunk indexes touched by data extents; block_status may answer a prefix, so ask until covered.
        let mut with_data = std::collections::BTreeSet::new();
        let mut pos = start;
        while pos < end {
            let extents = dev.block_status(pos, end - pos).await?;
            let mut next = pos;
            for e in extents {
                let e_end = (e.offset + e.length).min(end);
                if e.kind == shale_block::ExtentKind::Data && e_end > e.offset {
                    with_data.extend(e.offset / CHUNK..e_end.div_ceil(CHUNK));
                }
                next = next.max(e_end);
            }
            if next <= pos {
                // No progress: treat the rest as data rather than loop forever.
                with_data.extend(pos / CHUNK..end.div_ceil(CHUNK));
                break;
            }
            pos = next;
        }
        for i in first..last {
            let off = i * CHUNK;
            let n = CHUNK.min(size - off);
            let h = if !with_data.contains(&i) {
                if n == CHUNK {
                    zero_chunk
                } else {
                    blake3::hash(&vec![0u8; n as usize])
                }
            } else {
                let buf = dev.read(off, IoBuf::zeroed(n as usize)).await?;
                blake3::hash(&buf)
            };
            outer.update(h.as_bytes());
        }
        first = last;
    }
    Ok(outer.finalize().to_hex().to_string())
}
