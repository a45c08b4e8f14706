//! Checksummed metadata records.
//!
//! Records are small JSON documents followed by a 16-byte blake3 tag, so `sr check` (and every load) detects a
//! torn or corrupted record, and the format stays readable with `ldb` when debugging. They change rarely
//! (control-plane operations only); the hot metadata, the extent map, has its own compact binary encoding.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{EngineError, Result};

/// Current on-disk format version.
pub const FORMAT_VERSION: u32 = 1;

/// The SR's identity and geometry, written once at creation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SuperBlock {
    /// On-disk format version.
    pub format: u32,
    /// SR uuid.
    pub uuid: Uuid,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Maximum data bytes, if limited.
    pub capacity: Option<u64>,
    /// Creation time, unix seconds.
    pub created: u64,
}

/// Whether an object is a writable VDI or a read-only snapshot.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ObjectKind {
    /// A writable virtual disk (the head of a volume).
    Vdi,
    /// A read-only point-in-time view of a VDI.
    Snapshot,
}

impl ObjectKind {
    /// Lower-case name for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Vdi => "VDI",
            ObjectKind::Snapshot => "snapshot",
        }
    }
}

/// A VDI or snapshot as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ObjectRecord {
    /// Object uuid.
    pub uuid: Uuid,
    /// Name, unique within the SR (empty for hidden snapshots).
    pub name: String,
    /// VDI or snapshot.
    pub kind: ObjectKind,
    /// Virtual size in bytes.
    pub size: u64,
    /// The volume holding the data.
    pub vol: u64,
    /// For a snapshot: the epoch it froze.
    pub epoch: Option<u64>,
    /// For a VDI: the snapshot it was cloned (or reverted) from.
    pub parent: Option<Uuid>,
    /// For a snapshot: the VDI it was taken of.
    pub snapshot_of: Option<Uuid>,
    /// A destroyed snapshot kept because clones still read through it.
    pub hidden: bool,
    /// Creation time, unix seconds.
    pub created: u64,
}

/// Where a clone's unmapped clusters fall through to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ParentRef {
    /// Parent volume.
    pub vol: u64,
    /// The parent view's epoch.
    pub epoch: u64,
    /// The parent view's size; clusters beyond it read as zeroes.
    pub size: u64,
}

/// A volume: one extent map keyed by (cluster, epoch), with at most one writable head.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeRecord {
    /// Volume id.
    pub id: u64,
    /// The epoch new head writes go to.
    pub epoch: u64,
    /// Parent view for clones.
    pub parent: Option<ParentRef>,
    /// The VDI whose head this volume is, if any.
    pub head: Option<Uuid>,
}

const TAG: usize = 16;

/// Serialise a record with its blake3 tag.
pub fn encode<T: Serialize>(rec: &T) -> Result<Vec<u8>> {
    let mut v =
        serde_json::to_vec(rec).map_err(|e| EngineError::Corrupt(format!("encode: {e}")))?;
    let tag = blake3::hash(&v);
    v.extend_from_slice(&tag.as_bytes()[..TAG]);
    Ok(v)
}

/// Verify the tag and deserialise a record; `what` names it in errors.
pub fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    if bytes.len() < TAG {
        return Err(EngineError::Corrupt(format!("{what}: record too short")));
    }
    let (body, tag) = bytes.split_at(bytes.len() - TAG);
    if &blake3::hash(body).as_bytes()[..TAG] != tag {
        return Err(EngineError::Corrupt(format!("{what}: checksum mismatch")));
    }
    serde_json::from_slice(body).map_err(|e| EngineError::Corrupt(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_tamper() {
        let r = VolumeRecord {
            id: 3,
            epoch: 7,
            parent: Some(ParentRef {
                vol: 1,
                epoch: 2,
                size: 4096,
            }),
            head: None,
        };
        let mut b = encode(&r).unwrap();
        assert_eq!(decode::<VolumeRecord>("v", &b).unwrap(), r);
        b[2] ^= 0x20;
        assert!(matches!(
            decode::<VolumeRecord>("v", &b),
            Err(EngineError::Corrupt(_))
        ));
        assert!(decode::<VolumeRecord>("v", b"x").is_err());
    }
}
