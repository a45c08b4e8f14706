//! Metadata key layout in the SR's RocksDB.
//!
//! One keyspace, a one-byte prefix per record type, big-endian integers so RocksDB's byte order is numeric order:
//!
//! | key | value | meaning |
//! |---|---|---|
//! | `S` | [`crate::records::SuperBlock`] | format version, SR uuid, cluster size, capacity |
//! | `o` uuid | [`crate::records::ObjectRecord`] | a VDI or snapshot |
//! | `n` name | uuid | name index (names are unique within an SR) |
//! | `v` vol | [`crate::records::VolumeRecord`] | a volume: current epoch, parent view, head |
//! | `s` vol epoch | uuid | a live snapshot view of a volume |
//! | `m` vol cluster !epoch | pcluster [+ sub-cluster mask] + check | the extent map (mask only on partial entries) |
//! | `f` pcluster | – | a free cluster below the high-water mark |
//! | `a` | u64 (merge: max) | allocator high-water mark (clusters ever used) |
//! | `g` vol | – | the volume needs garbage collection |
//! | `t` | u64 (merge: add) | bytes reclaimed by GC over the SR's life |
//! | `k` vol epoch | u64 (merge: add, two's complement) | data clusters mapped at that (volume, epoch) |
//!
//! Map keys store the epoch inverted (`!epoch`), so for one (volume, cluster) the newest entry sorts first and
//! "the newest entry with epoch <= E" is a single seek to `m vol cluster !E`. That is what keeps reads O(1) in
//! the number of snapshots.

use uuid::Uuid;

/// The superblock key.
pub const SUPER: &[u8] = b"S";
/// The allocator high-water key.
pub const HIGH_WATER: &[u8] = b"a";
/// The reclaimed-bytes statistic key.
pub const RECLAIMED: &[u8] = b"t";

/// Prefix bytes.
pub mod prefix {
    /// Object records.
    pub const OBJECT: u8 = b'o';
    /// Name index.
    pub const NAME: u8 = b'n';
    /// Volume records.
    pub const VOLUME: u8 = b'v';
    /// Snapshot views.
    pub const VIEW: u8 = b's';
    /// Extent map.
    pub const MAP: u8 = b'm';
    /// Free clusters.
    pub const FREE: u8 = b'f';
    /// Pending GC.
    pub const GC: u8 = b'g';
    /// Cluster counts per (volume, epoch).
    pub const COUNT: u8 = b'k';
}

/// Length of a map key.
pub const MAP_KEY_LEN: usize = 25;

fn with_u64s(p: u8, vals: &[u64]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 8 * vals.len());
    k.push(p);
    for v in vals {
        k.extend_from_slice(&v.to_be_bytes());
    }
    k
}

/// Key of an object record.
pub fn object(id: &Uuid) -> Vec<u8> {
    let mut k = vec![prefix::OBJECT];
    k.extend_from_slice(id.as_bytes());
    k
}

/// Key of a name-index entry.
pub fn name(name: &str) -> Vec<u8> {
    let mut k = vec![prefix::NAME];
    k.extend_from_slice(name.as_bytes());
    k
}

/// Key of a volume record.
pub fn volume(vol: u64) -> Vec<u8> {
    with_u64s(prefix::VOLUME, &[vol])
}

/// Key of a live snapshot view.
pub fn view(vol: u64, epoch: u64) -> Vec<u8> {
    with_u64s(prefix::VIEW, &[vol, epoch])
}

/// Key of a map entry.
pub fn map(vol: u64, cluster: u64, epoch: u64) -> [u8; MAP_KEY_LEN] {
    let mut k = [0u8; MAP_KEY_LEN];
    k[0] = prefix::MAP;
    k[1..9].copy_from_slice(&vol.to_be_bytes());
    k[9..17].copy_from_slice(&cluster.to_be_bytes());
    k[17..25].copy_from_slice(&(!epoch).to_be_bytes());
    k
}

/// Decode a map key into (volume, cluster, epoch).
pub fn parse_map(k: &[u8]) -> Option<(u64, u64, u64)> {
    if k.len() != MAP_KEY_LEN || k[0] != prefix::MAP {
        return None;
    }
    let rd = |r: std::ops::Range<usize>| {
        k.get(r)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_be_bytes)
    };
    Some((rd(1..9)?, rd(9..17)?, !rd(17..25)?))
}

/// Key of a free-cluster entry.
pub fn free(pcluster: u64) -> Vec<u8> {
    with_u64s(prefix::FREE, &[pcluster])
}

/// Key of the cluster count of (volume, epoch).
pub fn count(vol: u64, epoch: u64) -> Vec<u8> {
    with_u64s(prefix::COUNT, &[vol, epoch])
}

/// A signed delta as a merge operand for a count key (added with wrapping arithmetic).
pub fn delta(d: i64) -> [u8; 8] {
    (d as u64).to_be_bytes()
}

/// Key of a pending-GC marker.
pub fn gc(vol: u64) -> Vec<u8> {
    with_u64s(prefix::GC, &[vol])
}

/// Parse the trailing big-endian u64 at `at` of a key.
pub fn u64_at(k: &[u8], at: usize) -> Option<u64> {
    k.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
}

/// Value marking a map entry that reads as zeroes and owns no cluster (it shadows older data).
pub const ZERO_CLUSTER: u64 = u64::MAX;

/// Sub-cluster mask of an entry that holds its whole cluster. Entries written before sub-clusters existed, and
/// every entry whose sub-clusters have all been written, are full.
pub const FULL_MASK: u32 = u32::MAX;

/// Encode a full map value: the physical cluster and a 4-byte blake3 check over key and cluster, so `sr check`
/// detects a corrupted or misplaced entry.
pub fn map_value(key: &[u8], pcluster: u64) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..8].copy_from_slice(&pcluster.to_be_bytes());
    let mut h = blake3::Hasher::new();
    h.update(key);
    h.update(&v[..8]);
    v[8..].copy_from_slice(&h.finalize().as_bytes()[..4]);
    v
}

/// Encode a *partial* map value: the physical cluster holds only the sub-clusters whose bits are set in `mask`;
/// the others read through to the entry beneath (see `volume`). 16 bytes (cluster, mask, check), so full
/// entries keep their 12-byte format and SRs written before sub-clusters existed read unchanged.
pub fn map_value_partial(key: &[u8], pcluster: u64, mask: u32) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&pcluster.to_be_bytes());
    v[8..12].copy_from_slice(&mask.to_be_bytes());
    let mut h = blake3::Hasher::new();
    h.update(key);
    h.update(&v[..12]);
    v[12..].copy_from_slice(&h.finalize().as_bytes()[..4]);
    v
}

/// Put the map value for (pcluster, mask) into a batch: the 12-byte form when `mask` is [`FULL_MASK`].
pub fn put_map(b: &mut rocksdb::WriteBatch, key: &[u8], pcluster: u64, mask: u32) {
    if mask == FULL_MASK {
        b.put(key, map_value(key, pcluster));
    } else {
        b.put(key, map_value_partial(key, pcluster, mask));
    }
}

/// Decode a map value into (physical cluster, sub-cluster mask), verifying its check. `None` means corruption.
pub fn parse_map_entry(key: &[u8], v: &[u8]) -> Option<(u64, u32)> {
    let p = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    match v.len() {
        12 => (map_value(key, p) == v).then_some((p, FULL_MASK)),
        16 => {
            let mask = u32::from_be_bytes(v[8..12].try_into().ok()?);
            (map_value_partial(key, p, mask) == v && mask != FULL_MASK && p != ZERO_CLUSTER)
                .then_some((p, mask))
        }
        _ => None,
    }
}

/// Decode a map value's physical cluster, verifying its check. `None` means corruption.
pub fn parse_map_value(key: &[u8], v: &[u8]) -> Option<u64> {
    parse_map_entry(key, v).map(|(p, _)| p)
}

/// RocksDB merge operator: `a` takes the maximum, `t` adds. Both are order-independent, so concurrent batches
/// that bump the high-water mark or the statistic never lose an update.
pub fn merge(
    key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    let rd = |b: &[u8]| b.try_into().map(u64::from_be_bytes).unwrap_or(0);
    let mut acc = existing.map(rd).unwrap_or(0);
    for op in operands {
        let v = rd(op);
        acc = if key == HIGH_WATER {
            acc.max(v)
        } else {
            acc.wrapping_add(v)
        };
    }
    Some(acc.to_be_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_keys_sort_newest_first() {
        let a = map(1, 5, 3);
        let b = map(1, 5, 2);
        let c = map(1, 6, 9);
        assert!(a < b && b < c);
        assert_eq!(parse_map(&a), Some((1, 5, 3)));
        // Seeking to epoch 2 lands on the entry with epoch 2, skipping the newer one.
        assert!(map(1, 5, 2) > a);
    }

    #[test]
    fn map_value_check() {
        let k = map(1, 2, 3);
        let v = map_value(&k, 77);
        assert_eq!(parse_map_value(&k, &v), Some(77));
        let mut bad = v;
        bad[0] ^= 1;
        assert_eq!(parse_map_value(&k, &bad), None);
        assert_eq!(parse_map_value(&map(1, 2, 4), &v), None);
    }

    #[test]
    fn partial_map_value_check() {
        let k = map(1, 2, 3);
        let v = map_value_partial(&k, 77, 0b1010);
        assert_eq!(parse_map_entry(&k, &v), Some((77, 0b1010)));
        assert_eq!(parse_map_value(&k, &v), Some(77));
        assert_eq!(
            parse_map_entry(&k, &map_value(&k, 77)),
            Some((77, FULL_MASK))
        );
        let mut bad = v;
        bad[9] ^= 1;
        assert_eq!(parse_map_entry(&k, &bad), None);
        assert_eq!(parse_map_entry(&map(1, 2, 4), &v), None);
        // A "partial" value claiming every sub-cluster, or a zero entry, is not a valid encoding.
        assert_eq!(
            parse_map_entry(&k, &map_value_partial(&k, 77, FULL_MASK)),
            None
        );
        assert_eq!(
            parse_map_entry(&k, &map_value_partial(&k, ZERO_CLUSTER, 1)),
            None
        );
        assert_eq!(parse_map_entry(&k, &v[..13]), None);
    }
}
