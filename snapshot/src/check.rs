//! `sr check`: an offline-quality consistency check of a live SR.
//!
//! Verifies, from the committed metadata: every record's checksum; the name index against the objects; every
//! object's volume and snapshot view; every map entry's checksum, that it points below the allocator's high-water
//! mark and at a cluster that is free neither on disk nor in the allocator's memory, and that no cluster is owned
//! by two entries; and that every cluster below the mark is mapped, free, or reserved by a write in flight (no
//! leaks). The committed metadata is read from one RocksDB snapshot, taken under the allocator's lock together
//! with its in-flight reservations and free list, so a live SR is checked as of one instant and writes in flight
//! do not show as leaks.

use std::collections::{BTreeSet, HashMap};

use rocksdb::{Direction, IteratorMode};
use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::error::Result;
use crate::keys::{self, ZERO_CLUSTER};
use crate::records::{self, ObjectKind, ObjectRecord, VolumeRecord};

/// What `check` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// One line per inconsistency; empty when the SR is consistent.
    pub problems: Vec<String>,
    /// Map entries pointing at data clusters.
    pub mapped_clusters: u64,
    /// Map entries holding only some sub-clusters of their cluster (small writes after a snapshot; GC folds them
    /// once no snapshot needs the entry beneath).
    pub partial_entries: u64,
    /// Zero entries (shadowing older data, owning no cluster).
    pub zero_entries: u64,
    /// Clusters on the free list.
    pub free_clusters: u64,
    /// Objects checked.
    pub objects: usize,
}

impl CheckReport {
    /// True when no problem was found.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Engine {
    /// Check the SR's metadata for consistency (see the module docs).
    pub fn check(&self) -> Result<CheckReport> {
        let inner = &self.inner;
        // One point-in-time view of everything: the high-water mark, the map, the free list and the counts are
        // changed together in batches, so read from one snapshot they agree even while I/O goes on (reading the
        // mark before iterating reported the entries of writes committed in between as beyond it).
        //
        // The allocator's view is captured under its lock at the same instant: reservations still in flight (their
        // map entries not committed yet, possibly below a mark a later commit raised) and the free list in memory
        // (which also holds fresh clusters given back by failed writes, free only in memory until reused). Commits
        // do not take the allocator's lock, so a reservation settled after this was committed after the snapshot,
        // or is mapped in it.
        let (db, in_flight, mem_free) = {
            let a = inner.alloc.lock();
            (
                inner.db.snapshot(),
                a.in_flight().clone(),
                a.free_set().clone(),
            )
        };
        let mut rep = CheckReport::default();
        let mut objects: HashMap<uuid::Uuid, ObjectRecord> = HashMap::new();
        let mut volumes: HashMap<u64, VolumeRecord> = HashMap::new();
        let mut names: HashMap<String, uuid::Uuid> = HashMap::new();
        let mut views: BTreeSet<(u64, u64)> = BTreeSet::new();
        let mut free: BTreeSet<u64> = BTreeSet::new();
        let mut owner: HashMap<u64, (u64, u64, u64)> = HashMap::new();
        let mut stored_counts: HashMap<(u64, u64), i64> = HashMap::new();
        let mut actual_counts: HashMap<(u64, u64), i64> = HashMap::new();
        let high_water = db
            .get(keys::HIGH_WATER)?
            .and_then(|v| v.as_slice().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        if let Some(v) = db.get(keys::SUPER)? {
            if let Err(e) = records::decode::<records::SuperBlock>("superblock", &v) {
                rep.problems.push(e.to_string());
            }
        } else {
            rep.problems.push("superblock missing".into());
        }
        // The partial entry just above (vol, cluster, mask), and whether it lies on another partial entry.
        let mut partial_above: Option<(u64, u64, u32, bool)> = None;
        let mut partial_on_parent: Vec<(u64, u64)> = Vec::new();
        for r in db.iterator(IteratorMode::From(b"a", Direction::Forward)) {
            let (k, v) = r?;
            match k.first().copied() {
                Some(keys::prefix::OBJECT) => match records::decode::<ObjectRecord>("object", &v) {
                    Ok(o) => {
                        objects.insert(o.uuid, o);
                    }
                    Err(e) => rep.problems.push(e.to_string()),
                },
                Some(keys::prefix::VOLUME) => match records::decode::<VolumeRecord>("volume", &v) {
                    Ok(vr) => {
                        volumes.insert(vr.id, vr);
                    }
                    Err(e) => rep.problems.push(e.to_string()),
                },
                Some(keys::prefix::NAME) => {
                    let name = String::from_utf8_lossy(&k[1..]).to_string();
                    match uuid::Uuid::from_slice(&v) {
                        Ok(u) => {
                            names.insert(name, u);
                        }
                        Err(_) => rep
                            .problems
                            .push(format!("name index entry '{name}' is malformed")),
                    }
                }
                Some(keys::prefix::VIEW) => {
                    if let (Some(vol), Some(e)) = (keys::u64_at(&k, 1), keys::u64_at(&k, 9)) {
                        views.insert((vol, e));
                    }
                }
                Some(keys::prefix::COUNT) => {
                    if let (Some(vol), Some(e)) = (keys::u64_at(&k, 1), keys::u64_at(&k, 9)) {
                        let n = v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0) as i64;
                        stored_counts.insert((vol, e), n);
                    }
                }
                Some(keys::prefix::FREE) => {
                    if let Some(p) = keys::u64_at(&k, 1) {
                        free.insert(p);
                        if p >= high_water {
                            rep.problems.push(format!(
                                "free cluster {p} is above the high-water mark {high_water}"
                            ));
                        }
                    }
                }
                Some(keys::prefix::MAP) => {
                    let Some((vol, c, e)) = keys::parse_map(&k) else {
                        rep.problems.push("malformed map key".into());
                        continue;
                    };
                    let entry = keys::parse_map_entry(&k, &v);
                    // A partial entry must lie on a full data entry of its own volume (the next key), or on a
                    // partial one holding none of its sub-clusters that itself lies on a full one, or else read
                    // through to the volume's parent view (checked below, once volumes are known).
                    let mut on_partial = false;
                    if let Some((avol, ac, amask, above_on_partial)) = partial_above.take() {
                        if (avol, ac) == (vol, c) {
                            let ok = match entry {
                                Some((p, m)) if p != ZERO_CLUSTER && m == keys::FULL_MASK => true,
                                Some((p, m)) if p != ZERO_CLUSTER && !above_on_partial => {
                                    on_partial = true;
                                    m & !amask == 0
                                }
                                _ => false,
                            };
                            if !ok {
                                rep.problems.push(format!(
                                    "partial entry vol {vol} cluster {c} lies on a zero entry, a partial entry it \
                                     does not cover, or two partial entries (epoch {e})"
                                ));
                            }
                        } else {
                            partial_on_parent.push((avol, ac));
                        }
                    }
                    if let Some((_, m)) = entry.filter(|&(_, m)| m != keys::FULL_MASK) {
                        rep.partial_entries += 1;
                        partial_above = Some((vol, c, m, on_partial));
                    }
                    match entry.map(|(p, _)| p) {
                        None => rep.problems.push(format!(
                            "map entry vol {vol} cluster {c} epoch {e}: checksum mismatch"
                        )),
                        Some(ZERO_CLUSTER) => rep.zero_entries += 1,
                        Some(p) => {
                            rep.mapped_clusters += 1;
                            *actual_counts.entry((vol, e)).or_default() += 1;
                            if p >= high_water {
                                rep.problems.push(format!("map entry vol {vol} cluster {c} epoch {e} points at {p}, beyond the high-water mark {high_water}"));
                            }
                            if let Some(prev) = owner.insert(p, (vol, c, e)) {
                                rep.problems.push(format!(
                                    "cluster {p} owned twice: by {prev:?} and by {:?}",
                                    (vol, c, e)
                                ));
                            }
                        }
                    }
                    if !volumes.contains_key(&vol) && db.get(keys::volume(vol))?.is_none() {
                        rep.problems
                            .push(format!("map entry for missing volume {vol}"));
                    }
                }
                _ => {}
            }
        }
        for key in stored_counts.keys().chain(actual_counts.keys()) {
            let (stored, actual) = (
                stored_counts.get(key).copied().unwrap_or(0),
                actual_counts.get(key).copied().unwrap_or(0),
            );
            if stored != actual {
                rep.problems.push(format!(
                    "volume {} epoch {}: cluster count says {stored}, the map holds {actual}",
                    key.0, key.1
                ));
            }
        }
        for (p, who) in &owner {
            if free.contains(p) {
                rep.problems
                    .push(format!("cluster {p} is both free and mapped by {who:?}"));
            }
            if mem_free.contains(p) {
                rep.problems.push(format!(
                    "cluster {p} is mapped by {who:?} but the allocator would hand it out"
                ));
            }
        }
        let leaked = (0..high_water)
            .filter(|p| {
                !owner.contains_key(p)
                    && !free.contains(p)
                    && !in_flight.contains(p)
                    && !mem_free.contains(p)
            })
            .count();
        if leaked > 0 {
            rep.problems.push(format!(
                "{leaked} clusters are neither mapped nor free (leaked)"
            ));
        }
        for o in objects.values() {
            if !o.name.is_empty() && names.get(&o.name) != Some(&o.uuid) {
                rep.problems.push(format!(
                    "object {} ('{}') missing from the name index",
                    o.uuid, o.name
                ));
            }
            if !volumes.contains_key(&o.vol) {
                rep.problems.push(format!(
                    "object {} refers to missing volume {}",
                    o.uuid, o.vol
                ));
            }
            if o.kind == ObjectKind::Snapshot {
                match o.epoch {
                    Some(e) if views.contains(&(o.vol, e)) => {}
                    _ => rep
                        .problems
                        .push(format!("snapshot {} has no view record", o.uuid)),
                }
            }
        }
        for (name, u) in &names {
            if objects.get(u).map(|o| &o.name) != Some(name) {
                rep.problems.push(format!(
                    "name index entry '{name}' points at {u}, which does not carry that name"
                ));
            }
        }
        partial_on_parent.extend(partial_above.map(|(v, c, _, _)| (v, c)));
        for (vol, c) in partial_on_parent {
            let covered = volumes
                .get(&vol)
                .and_then(|v| v.parent)
                .is_some_and(|p| c < p.size.div_ceil(inner.cs));
            if !covered {
                rep.problems.push(format!(
                    "partial entry vol {vol} cluster {c} has nothing beneath it"
                ));
            }
        }
        for v in volumes.values() {
            if let Some(p) = v.parent {
                if !volumes.contains_key(&p.vol) || !views.contains(&(p.vol, p.epoch)) {
                    rep.problems.push(format!(
                        "volume {} reads through a missing view {:?}",
                        v.id,
                        (p.vol, p.epoch)
                    ));
                }
            }
        }
        rep.free_clusters = mem_free.len() as u64;
        rep.objects = objects.len();
        Ok(rep)
    }
}
