//! Scenario tests of the engine's user-visible behaviour: thin provisioning, in-place vs redirect-on-write,
//! hidden parents, GC accounting, ENOSPC, locking and the error cases.

use shale_block::uring::{IoEngine, IoEngineConfig};
use shale_block::{BlockDevice, BlockError, ExtentKind, IoBuf, WriteFlags};
use shale_snapshot::{Engine, EngineError, SrConfig};

const CS: u64 = 65536;

fn io() -> IoEngine {
    IoEngine::new(IoEngineConfig::default()).unwrap()
}

async fn sr(dir: &std::path::Path, capacity: Option<u64>) -> Engine {
    Engine::create(
        &dir.join("sr"),
        SrConfig {
            cluster_size: CS as u32,
            capacity,
        },
        io(),
    )
    .unwrap()
}

/// The smallest cluster size: many clusters (and GC batches) for little data.
const SMALL: u64 = 4096;

/// An SR with [`SMALL`] clusters.
fn small_sr(dir: &std::path::Path) -> Engine {
    Engine::create(
        dir,
        SrConfig {
            cluster_size: SMALL as u32,
            capacity: None,
        },
        io(),
    )
    .unwrap()
}

fn pattern(n: usize, seed: u8) -> IoBuf {
    IoBuf::from_slice(
        &(0..n)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect::<Vec<_>>(),
    )
}

#[tokio::test]
async fn thin_vdi_costs_nothing_until_written() {
    let t = tempfile::tempdir().unwrap();
    let e = sr(t.path(), None).await;
    let v = e.create_vdi("big", 1 << 40).await.unwrap();
    assert_eq!(v.size, 1 << 40);
    assert_eq!(v.allocated_bytes, 0);
    assert_eq!(e.sr_info().allocated_bytes, 0);
    let vol = e.open_volume(v.uuid).unwrap();
    let ext = vol.block_status(0, 1 << 30).await.unwrap();
    assert_eq!(ext.len(), 1);
    assert_eq!(ext[0].kind, ExtentKind::Hole);
    let r = vol
        .read((1 << 40) - 4096, IoBuf::zeroed(4096))
        .await
        .unwrap();
    assert!(r.iter().all(|&b| b == 0));
    vol.write(1 << 39, pattern(4096, 1), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(e.info(v.uuid).unwrap().allocated_bytes, CS);
    let ext = vol.block_status(1 << 39, CS).await.unwrap();
    assert_eq!(ext[0].kind, ExtentKind::Data);
}

#[tokio::test]
async fn overwrite_in_place_until_a_snapshot_then_redirect() {
    let t = tempfile::tempdir().unwrap();
    let e = sr(t.path(), None).await;
    let v = e.create_vdi("v", 16 * CS).await.unwrap();
    let vol = e.open_volume(v.uuid).unwrap();
    vol.write(0, pattern(4096, 1), WriteFlags::default())
        .await
        .unwrap();
    let used = e.sr_info().allocated_bytes;
    vol.write(4096, pattern(4096, 2), WriteFlags::default())
        .await
        .unwrap();
    vol.write(0, pattern(4096, 3), WriteFlags::FUA)
        .await
        .unwrap();
    assert_eq!(
        e.sr_info().allocated_bytes,
        used,
        "head-only cluster overwritten in place"
    );
    let s = e.snapshot(v.uuid, "s").await.unwrap();
    vol.write(0, pattern(4096, 4), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(
        e.sr_info().allocated_bytes,
        used + CS,
        "first write after a snapshot redirects"
    );
    vol.write(8192, pattern(4096, 5), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(
        e.sr_info().allocated_bytes,
        used + CS,
        "then the new cluster is the head's own"
    );
    let sv = e.open_volume(s.uuid).unwrap();
    let got = sv.read(0, IoBuf::zeroed(8192)).await.unwrap();
    assert_eq!(&got[..4096], &pattern(4096, 3)[..]);
    assert_eq!(&got[4096..], &pattern(4096, 2)[..]);
    assert!(matches!(
        sv.write(0, pattern(512, 0), WriteFlags::default()).await,
        Err(BlockError::ReadOnly)
    ));
    // Destroying the snapshot makes the old cluster garbage, and the head's cluster in-place again.
    drop(sv);
    e.destroy(s.uuid).await.unwrap();
    let reclaimed = e.gc_now().await.unwrap();
    assert_eq!(reclaimed, CS);
    assert_eq!(e.sr_info().reclaimed_bytes, CS);
    assert!(e.check().unwrap().ok());
}

/// Writes spanning several clusters: a rewrite of clusters the head owns in one physical run goes in place as one
/// I/O; a rewrite spanning clusters a snapshot shares, or clusters not in one run, redirects piece by piece. Either
/// way the head reads what was written and the snapshot what it froze, and nothing is allocated for the in-place
/// rewrite.
#[tokio::test]
async fn multi_cluster_writes_in_place_runs_and_redirects() {
    let t = tempfile::tempdir().unwrap();
    let e = sr(t.path(), None).await;
    let v = e.create_vdi("v", 32 * CS).await.unwrap();
    let vol = e.open_volume(v.uuid).unwrap();
    let len = (8 * CS) as usize;
    // Clusters 2..=9 allocated in one sequential write, cluster 11 and then 10 out of order (not one run with them).
    vol.write(2 * CS, pattern(len, 1), WriteFlags::default())
        .await
        .unwrap();
    vol.write(11 * CS, pattern(CS as usize, 2), WriteFlags::default())
        .await
        .unwrap();
    vol.write(10 * CS, pattern(CS as usize, 3), WriteFlags::default())
        .await
        .unwrap();
    let used = e.sr_info().allocated_bytes;
    assert_eq!(used, 10 * CS);
    // In place, unaligned at both ends, FUA and not.
    vol.write(2 * CS + 512, pattern(len - 1024, 4), WriteFlags::default())
        .await
        .unwrap();
    vol.write(3 * CS, pattern(2 * CS as usize, 5), WriteFlags::FUA)
        .await
        .unwrap();
    // Across the run's end and the out-of-order clusters: piece by piece, still in place.
    vol.write(
        9 * CS + 4096,
        pattern(3 * CS as usize - 4096, 6),
        WriteFlags::default(),
    )
    .await
    .unwrap();
    assert_eq!(e.sr_info().allocated_bytes, used, "rewrites stay in place");
    let mut want = vec![0u8; 32 * CS as usize];
    let put = |w: &mut Vec<u8>, at: u64, b: &IoBuf| {
        w[at as usize..at as usize + b.len()].copy_from_slice(b)
    };
    put(&mut want, 2 * CS, &pattern(len, 1));
    put(&mut want, 11 * CS, &pattern(CS as usize, 2));
    put(&mut want, 10 * CS, &pattern(CS as usize, 3));
    put(&mut want, 2 * CS + 512, &pattern(len - 1024, 4));
    put(&mut want, 3 * CS, &pattern(2 * CS as usize, 5));
    put(
        &mut want,
        9 * CS + 4096,
        &pattern(3 * CS as usize - 4096, 6),
    );
    let got = vol.read(0, IoBuf::zeroed(want.len())).await.unwrap();
    assert!(got[..] == want[..], "head after in-place rewrites");

    // After a snapshot the run is shared: the same write redirects, and the snapshot keeps the old data.
    let s = e.snapshot(v.uuid, "s").await.unwrap();
    let frozen = want.clone();
    vol.write(2 * CS + 512, pattern(len - 1024, 7), WriteFlags::default())
        .await
        .unwrap();
    put(&mut want, 2 * CS + 512, &pattern(len - 1024, 7));
    assert!(
        e.sr_info().allocated_bytes > used,
        "shared clusters redirect"
    );
    // Then the head owns them again (new clusters): a second rewrite is in place.
    let after = e.sr_info().allocated_bytes;
    vol.write(2 * CS, pattern(len, 8), WriteFlags::default())
        .await
        .unwrap();
    put(&mut want, 2 * CS, &pattern(len, 8));
    assert_eq!(e.sr_info().allocated_bytes, after);
    let got = vol.read(0, IoBuf::zeroed(want.len())).await.unwrap();
    assert!(got[..] == want[..], "head after the snapshot");
    let sv = e.open_volume(s.uuid).unwrap();
    let got = sv.read(0, IoBuf::zeroed(frozen.len())).await.unwrap();
    assert!(got[..] == frozen[..], "snapshot unchanged");
    assert!(e.check().unwrap().ok());
}

/// A snapshot does not leave the head with a cold lookup cache: lookups cached before it answer for the head
/// after it until the head writes the cluster (no RocksDB read per cluster on the first I/O after every
/// snapshot), and what the head and the snapshots read stays exact throughout.
#[tokio::test]
async fn snapshots_keep_the_head_lookup_cache_warm() {
    const N: u64 = 32;
    let t = tempfile::tempdir().unwrap();
    let e = sr(t.path(), None).await;
    let v = e.create_vdi("v", 2 * N * CS).await.unwrap();
    let vol = e.open_volume(v.uuid).unwrap();
    // Clusters 0..N written whole; N..2N never written (holes).
    for c in 0..N {
        vol.write(c * CS, pattern(CS as usize, c as u8), WriteFlags::default())
            .await
            .unwrap();
    }
    let read_all = |vol: std::sync::Arc<shale_snapshot::Volume>| async move {
        let mut out = Vec::new();
        for c in 0..N {
            out.push(vol.read(c * CS, IoBuf::zeroed(CS as usize)).await.unwrap());
        }
        out
    };
    let before = read_all(vol.clone()).await;
    for (c, got) in before.iter().enumerate() {
        assert_eq!(&got[..], &pattern(CS as usize, c as u8)[..]);
    }

    let s1 = e.snapshot(v.uuid, "s1").await.unwrap();
    let m = e.sr_info().metadata_reads;
    let after = read_all(vol.clone()).await;
    assert_eq!(after.len(), before.len());
    for (a, b) in after.iter().zip(&before) {
        assert_eq!(&a[..], &b[..]);
    }
    assert_eq!(
        e.sr_info().metadata_reads,
        m,
        "head reads right after a snapshot are answered from the cache"
    );
    // Small writes after the snapshot (redirects to partial entries) need no metadata read either.
    for c in (0..N).step_by(2) {
        vol.write(c * CS + 4096, pattern(4096, 200), WriteFlags::default())
            .await
            .unwrap();
    }
    assert_eq!(e.sr_info().metadata_reads, m);

    // The counter does count: clusters never looked up before do read RocksDB.
    vol.read(N * CS, IoBuf::zeroed(4096)).await.unwrap();
    assert!(e.sr_info().metadata_reads > m);

    let s2 = e.snapshot(v.uuid, "s2").await.unwrap();
    let m = e.sr_info().metadata_reads;
    let head = read_all(vol.clone()).await;
    assert_eq!(
        e.sr_info().metadata_reads,
        m,
        "a second snapshot carries the lookups over again, redirected clusters included"
    );
    let expect = |c: u64, written_after_s1: bool| {
        let mut x = pattern(CS as usize, c as u8).to_vec();
        if written_after_s1 && c.is_multiple_of(2) {
            x[4096..8192].copy_from_slice(&pattern(4096, 200));
        }
        x
    };
    for c in 0..N {
        assert_eq!(
            &head[c as usize][..],
            &expect(c, true)[..],
            "head, cluster {c}"
        );
    }
    for (snap, written) in [(s1.uuid, false), (s2.uuid, true)] {
        let sv = e.open_volume(snap).unwrap();
        let got = read_all(sv).await;
        for c in 0..N {
            assert_eq!(
                &got[c as usize][..],
                &expect(c, written)[..],
                "snapshot, cluster {c}"
            );
        }
    }
    // Overwrite after the second snapshot, then check everything again from a cold cache.
    vol.write(0, pattern(4096, 201), WriteFlags::default())
        .await
        .unwrap();
    let mut first = expect(0, true);
    first[..4096].copy_from_slice(&pattern(4096, 201));
    let got = vol.read(0, IoBuf::zeroed(CS as usize)).await.unwrap();
    assert_eq!(&got[..], &first[..]);
    drop(vol);
    e.close().await.unwrap();
    let e = Engine::open(&t.path().join("sr"), io()).unwrap();
    let vol = e.open_volume(v.uuid).unwrap();
    let head = read_all(vol).await;
    assert_eq!(&head[0][..], &first[..]);
    for c in 1..N {
        assert_eq!(
            &head[c as usize][..],
            &expect(c, true)[..],
            "head after reopen, cluster {c}"
        );
    }
    assert!(e.check().unwrap().ok());
}

/// The head table (`snapshot/src/headmap.rs`) answers head lookups without the lookup cache: every read below
/// first fills it (a read of a full entry at the head's epoch), then the cluster changes, and the next read must
/// see the change, while older views keep reading what they saw.
#[tokio::test]
async fn head_table_follows_discards_rewrites_and_snapshots() {
    let t = tempfile::tempdir().unwrap();
    let e = sr(t.path(), None).await;
    let v = e.create_vdi("v", 4 * CS).await.unwrap();
    let vol = e.open_volume(v.uuid).unwrap();
    let read = |vol: std::sync::Arc<shale_snapshot::volume::Volume>| async move {
        vol.read(0, IoBuf::zeroed(CS as usize))
            .await
            .unwrap()
            .to_vec()
    };
    let whole = |seed| pattern(CS as usize, seed);
    // A head-owned cluster, tabled, then discarded (nothing beneath: its entry is deleted).
    vol.write(0, whole(1), WriteFlags::default()).await.unwrap();
    assert!(read(vol.clone()).await == whole(1).to_vec(), "written");
    vol.discard(0, CS).await.unwrap();
    assert!(read(vol.clone()).await.iter().all(|&b| b == 0), "discarded");
    // Written again, tabled, snapshotted, then rewritten (redirect) and zeroed (a zero entry over the snapshot's).
    vol.write(0, whole(2), WriteFlags::default()).await.unwrap();
    assert!(read(vol.clone()).await == whole(2).to_vec(), "rewritten");
    let s1 = e.snapshot(v.uuid, "s1").await.unwrap();
    let snap1 = e.open_volume(s1.uuid).unwrap();
    assert!(read(snap1.clone()).await == whole(2).to_vec(), "snapshot");
    vol.write(0, whole(3), WriteFlags::default()).await.unwrap();
    assert!(read(vol.clone()).await == whole(3).to_vec(), "redirected");
    assert_eq!(
        read(snap1.clone()).await,
        whole(2).to_vec(),
        "snapshot after the head's rewrite"
    );
    let s2 = e.snapshot(v.uuid, "s2").await.unwrap();
    vol.write_zeroes(0, CS, false, WriteFlags::default())
        .await
        .unwrap();
    assert!(
        read(vol.clone()).await.iter().all(|&b| b == 0),
        "zeroed head"
    );
    // A clone reads through the parent's views while the parent's head has newer (tabled) entries.
    let c2 = e.clone_snapshot(s2.uuid, "c2").await.unwrap();
    let clone = e.open_volume(c2.uuid).unwrap();
    assert!(
        read(clone.clone()).await == whole(3).to_vec(),
        "clone of s2"
    );
    assert!(read(snap1.clone()).await == whole(2).to_vec(), "s1 still");
    // Partial rewrite after another snapshot: the head reads the new 4 KiB over the old rest.
    vol.write(0, whole(4), WriteFlags::default()).await.unwrap();
    assert!(read(vol.clone()).await == whole(4).to_vec(), "after zeroes");
    let _s3 = e.snapshot(v.uuid, "s3").await.unwrap();
    vol.write(4096, pattern(4096, 5), WriteFlags::default())
        .await
        .unwrap();
    let mut want = whole(4).to_vec();
    want[4096..8192].copy_from_slice(&pattern(4096, 5));
    assert!(read(vol.clone()).await == want, "partial over full");
    assert_eq!(
        read(clone.clone()).await,
        whole(3).to_vec(),
        "clone unchanged"
    );
    // Destroying a snapshot and collecting garbage leaves the tabled head entries right.
    drop(snap1);
    e.destroy(s1.uuid).await.unwrap();
    e.gc_now().await.unwrap();
    assert!(read(vol.clone()).await == want, "after GC");
    assert!(e.check().unwrap().ok());
}

#[tokio::test]
async fn snapshot_with_clones_is_hidden_until_they_go() {
    let t = tempfile::tempdir().unwrap();
    let e = sr(t.path(), None).await;
    let v = e.create_vdi("v", 4 * CS).await.unwrap();
    let vol = e.open_volume(v.uuid).unwrap();
    vol.write(0, pattern(CS as usize, 9), WriteFlags::default())
        .await
        .unwrap();
    drop(vol);
    let s = e.snapshot(v.uuid, "s").await.unwrap();
    let c = e.clone_snapshot(s.uuid, "c").await.unwrap();
    assert_eq!(e.info(s.uuid).unwrap().clones, vec![c.uuid]);
    e.destroy(s.uuid).await.unwrap();
    let hidden = e.info(s.uuid).unwrap();
    assert!(hidden.hidden);
    assert!(
        matches!(e.lookup("s"), Err(EngineError::NotFound(_))),
        "hidden snapshots release their name"
    );
    // The clone still reads through it, even after the original VDI is gone.
    e.destroy(v.uuid).await.unwrap();
    e.gc_now().await.unwrap();
    assert_eq!(
        e.digest(c.uuid).await.unwrap(),
        shale_snapshot::digest::digest_bytes(&{
            let mut d = pattern(CS as usize, 9).to_vec();
            d.resize(4 * CS as usize, 0);
            d
        })
    );
    e.destroy(c.uuid).await.unwrap();
    e.gc_now().await.unwrap();
    e.gc_now().await.unwrap();
    assert!(
        e.info(s.uuid).is_err(),
        "hidden parent released with its last clone"
    );
    assert!(e.list().is_empty());
    assert_eq!(e.sr_info().allocated_bytes, 0);
    assert!(e.check().unwrap().ok());
}

#[tokio::test]
async fn full_sr_fails_writes_cleanly_and_recovers() {
    let t = tempfile::tempdir().unwrap();
    let e = sr(t.path(), Some(8 * CS)).await;
    let a = e.create_vdi("a", 64 * CS).await.unwrap();
    let b = e.create_vdi("b", 64 * CS).await.unwrap();
    let va = e.open_volume(a.uuid).unwrap();
    for i in 0..6 {
        va.write(i * CS, pattern(CS as usize, i as u8), WriteFlags::default())
            .await
            .unwrap();
    }
    let vb = e.open_volume(b.uuid).unwrap();
    vb.write(0, pattern(CS as usize, 50), WriteFlags::default())
        .await
        .unwrap();
    vb.write(CS, pattern(CS as usize, 51), WriteFlags::default())
        .await
        .unwrap();
    let err = vb
        .write(2 * CS, pattern(4096, 52), WriteFlags::default())
        .await
        .unwrap_err();
    assert!(matches!(err, BlockError::NoSpace), "{err:?}");
    assert_eq!(err.errno(), 28);
    // Overwriting owned clusters still works when full.
    vb.write(0, pattern(4096, 53), WriteFlags::default())
        .await
        .unwrap();
    let digest_b = e.digest(b.uuid).await.unwrap();
    assert!(e.check().unwrap().ok());
    drop(va);
    e.destroy(a.uuid).await.unwrap();
    assert_eq!(e.gc_now().await.unwrap(), 6 * CS);
    vb.write(2 * CS, pattern(4096, 52), WriteFlags::default())
        .await
        .unwrap();
    assert_ne!(e.digest(b.uuid).await.unwrap(), digest_b);
    assert!(e.check().unwrap().ok());
}

#[tokio::test]
async fn errors_are_clear() {
    let t = tempfile::tempdir().unwrap();
    let e = sr(t.path(), None).await;
    let v = e.create_vdi("v", CS).await.unwrap();
    assert!(matches!(
        e.create_vdi("v", CS).await,
        Err(EngineError::NameTaken(_))
    ));
    assert!(matches!(
        e.create_vdi("a/b", CS).await,
        Err(EngineError::InvalidName(_))
    ));
    assert!(matches!(
        e.create_vdi("", CS).await,
        Err(EngineError::InvalidName(_))
    ));
    assert!(matches!(
        e.create_vdi("odd", 1000).await,
        Err(EngineError::InvalidSize(..))
    ));
    assert!(matches!(
        e.create_vdi("zero", 0).await,
        Err(EngineError::InvalidSize(..))
    ));
    assert!(matches!(
        e.resize(v.uuid, 512, false).await,
        Err(EngineError::ShrinkRefused(..))
    ));
    assert!(matches!(
        e.clone_snapshot(v.uuid, "x").await,
        Err(EngineError::WrongKind(..))
    ));
    let vol = e.open_volume(v.uuid).unwrap();
    assert!(matches!(
        e.destroy(v.uuid).await,
        Err(EngineError::InUse(_))
    ));
    assert!(matches!(
        vol.read(CS, IoBuf::zeroed(512)).await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.read(1, IoBuf::zeroed(512)).await,
        Err(BlockError::Misaligned { .. })
    ));
    assert!(matches!(
        vol.write(CS - 512, pattern(1024, 0), WriteFlags::default())
            .await,
        Err(BlockError::OutOfRange { .. })
    ));
    // Growing works online: the open handle sees the new size.
    e.resize(v.uuid, 2 * CS, false).await.unwrap();
    assert_eq!(vol.size(), 2 * CS);
    vol.write(CS, pattern(512, 1), WriteFlags::default())
        .await
        .unwrap();
    let dir = e.dir().to_path_buf();
    assert!(matches!(
        Engine::open(&dir, io()),
        Err(EngineError::Locked(_))
    ));
    assert!(matches!(
        Engine::create(&dir, SrConfig::default(), io()),
        Err(EngineError::AlreadyExists(_))
    ));
    assert!(matches!(
        Engine::create(
            &t.path().join("bad"),
            SrConfig {
                cluster_size: 3000,
                capacity: None
            },
            io()
        ),
        Err(EngineError::InvalidClusterSize(_))
    ));
    assert!(matches!(
        Engine::open(&t.path().join("none"), io()),
        Err(EngineError::NoSr(_))
    ));
}

#[tokio::test]
async fn data_survives_reopen_and_reads_do_not_depend_on_snapshot_count() {
    let t = tempfile::tempdir().unwrap();
    let e = sr(t.path(), None).await;
    let v = e.create_vdi("v", 8 * CS).await.unwrap();
    let mut snaps = Vec::new();
    {
        let vol = e.open_volume(v.uuid).unwrap();
        for i in 0..50u8 {
            vol.write(
                u64::from(i % 8) * CS + 512 * u64::from(i),
                pattern(512, i),
                WriteFlags::default(),
            )
            .await
            .unwrap();
            snaps.push(e.snapshot(v.uuid, &format!("s{i}")).await.unwrap().uuid);
        }
        vol.flush().await.unwrap();
    }
    let before: Vec<String> = futures::future::join_all(snaps.iter().map(|s| e.digest(*s)))
        .await
        .into_iter()
        .map(|d| d.unwrap())
        .collect();
    let dir = e.dir().to_path_buf();
    e.close().await.unwrap();
    let e = Engine::open(&dir, io()).unwrap();
    for (s, d) in snaps.iter().zip(before) {
        assert_eq!(e.digest(*s).await.unwrap(), d);
    }
    assert!(e.check().unwrap().ok());
}

/// After a snapshot, a write smaller than a cluster redirects only the sub-clusters it touches (rounded out to
/// sub-cluster boundaries with the bytes beneath); the rest of the cluster reads through to the snapshot's data.
/// Later writes widen the partial entry or make it whole; a write over a partial entry a snapshot sees copies the
/// whole cluster up (so a read never needs more than two entries); and once the snapshots are gone GC folds what
/// is still partial and frees the clusters beneath. Every view reads
/// the same bytes throughout, and the space ends where it started.
#[tokio::test]
async fn small_writes_after_a_snapshot_are_partial_and_folded_when_it_goes() {
    let t = tempfile::tempdir().unwrap();
    let e = sr(t.path(), None).await;
    let v = e.create_vdi("v", 4 * CS).await.unwrap();
    let vol = e.open_volume(v.uuid).unwrap();
    let mut model = vec![0u8; 4 * CS as usize];
    let write = |model: &mut Vec<u8>, off: u64, buf: &IoBuf| {
        model[off as usize..off as usize + buf.len()].copy_from_slice(buf);
    };
    let read_all = |dev: std::sync::Arc<shale_snapshot::Volume>| async move {
        dev.read(0, IoBuf::zeroed(4 * CS as usize))
            .await
            .unwrap()
            .to_vec()
    };
    let partial = |e: &Engine| {
        let rep = e.check().unwrap();
        assert!(rep.ok(), "{:?}", rep.problems);
        rep.partial_entries
    };
    for (c, seed) in [(0u64, 1u8), (1, 2), (2, 3), (3, 11)] {
        let p = pattern(CS as usize, seed);
        vol.write(c * CS, p.clone(), WriteFlags::default())
            .await
            .unwrap();
        write(&mut model, c * CS, &p);
    }
    let at_snap = model.clone();
    let s = e.snapshot(v.uuid, "s").await.unwrap();
    // Aligned 4 KiB, an unaligned 512 bytes inside one 2 KiB sub-cluster, and a write across a cluster boundary.
    for (off, len, seed) in [
        (4096u64, 4096usize, 4u8),
        (CS + 2560, 512, 5),
        (3 * CS - 1024, 2048, 6),
    ] {
        let p = pattern(len, seed);
        vol.write(off, p.clone(), WriteFlags::default())
            .await
            .unwrap();
        write(&mut model, off, &p);
    }
    assert_eq!(e.sr_info().allocated_bytes, 8 * CS);
    assert_eq!(partial(&e), 4, "no copy-up for the first small writes");
    let sv = e.open_volume(s.uuid).unwrap();
    assert!(
        read_all(vol.clone()).await == model,
        "head after partial writes"
    );
    assert!(read_all(sv.clone()).await == at_snap, "snapshot unchanged");
    // Sector-sized reads straddling sub-clusters of different layers.
    for off in [
        2048u64,
        3584,
        4096 - 512,
        CS + 2048,
        3 * CS - 1536,
        3 * CS + 512,
    ] {
        let got = vol.read(off, IoBuf::zeroed(1536)).await.unwrap();
        assert!(
            got[..] == model[off as usize..off as usize + 1536],
            "read at {off}"
        );
    }
    // Writing inside what the partial entry holds stays in place; touching new sub-clusters widens it (deferred
    // to the next flush, or at once with FUA), and covering the rest makes it whole.
    let p = pattern(1024, 8);
    vol.write(5120, p.clone(), WriteFlags::default())
        .await
        .unwrap();
    write(&mut model, 5120, &p);
    for (off, len, seed, flags) in [
        (CS + 40960, 4096usize, 9u8, WriteFlags::default()),
        (CS + 16384, 8192, 12, WriteFlags::FUA),
    ] {
        let p = pattern(len, seed);
        vol.write(off, p.clone(), flags).await.unwrap();
        write(&mut model, off, &p);
        assert!(
            read_all(vol.clone()).await == model,
            "after widening at {off}"
        );
    }
    assert_eq!(partial(&e), 4);
    vol.flush().await.unwrap();
    assert!(read_all(vol.clone()).await == model, "after flush");
    let p = pattern(CS as usize, 13);
    vol.write(CS, p.clone(), WriteFlags::default())
        .await
        .unwrap();
    write(&mut model, CS, &p);
    assert_eq!(partial(&e), 3, "second cluster whole");
    assert_eq!(e.sr_info().allocated_bytes, 8 * CS);
    // A second snapshot sees the first cluster's partial entry: the next write there makes a partial entry on
    // it that holds its sub-clusters too (one new cluster; the rest still reads through to the full entry).
    let at_s2 = model.clone();
    let s2 = e.snapshot(v.uuid, "s2").await.unwrap();
    let p = pattern(4096, 10);
    vol.write(32768, p.clone(), WriteFlags::default())
        .await
        .unwrap();
    write(&mut model, 32768, &p);
    assert_eq!(e.sr_info().allocated_bytes, 9 * CS);
    assert_eq!(
        partial(&e),
        4,
        "a partial entry on the partial entry s2 sees"
    );
    let sv2 = e.open_volume(s2.uuid).unwrap();
    assert!(read_all(vol.clone()).await == model, "head, three layers");
    assert!(read_all(sv2.clone()).await == at_s2, "second snapshot");
    assert!(read_all(sv.clone()).await == at_snap, "first snapshot");
    assert!(e.check().unwrap().ok(), "{:?}", e.check().unwrap());
    // A third snapshot sees both partial entries: a write there now copies the cluster up whole (reads stay at
    // three lookups at most).
    let at_s3 = model.clone();
    let s3 = e.snapshot(v.uuid, "s3").await.unwrap();
    let p = pattern(1024, 11);
    vol.write(40960 + 512, p.clone(), WriteFlags::default())
        .await
        .unwrap();
    write(&mut model, 40960 + 512, &p);
    assert_eq!(e.sr_info().allocated_bytes, 10 * CS);
    assert_eq!(partial(&e), 4, "a full copy over the two partial entries");
    assert!(read_all(vol.clone()).await == model, "head after copy-up");
    let sv3 = e.open_volume(s3.uuid).unwrap();
    assert!(read_all(sv3.clone()).await == at_s3, "third snapshot");
    drop(sv3);
    e.destroy(s3.uuid).await.unwrap();
    e.gc_now().await.unwrap();
    assert_eq!(
        e.sr_info().allocated_bytes,
        9 * CS,
        "the copied-over entry only s3 saw"
    );
    // Once s2 goes, the cluster's entry s2 saw is hidden by the head's full copy: garbage.
    drop(sv2);
    e.destroy(s2.uuid).await.unwrap();
    e.gc_now().await.unwrap();
    assert_eq!(e.sr_info().allocated_bytes, 8 * CS);
    assert_eq!(partial(&e), 2, "clusters 2 and 3");
    assert!(read_all(vol.clone()).await == model, "head after s2 went");
    assert!(
        read_all(sv.clone()).await == at_snap,
        "first snapshot after s2 went"
    );
    // A partial head entry over a full one, caught by a snapshot, written again (new sub-clusters): a partial
    // entry on it holding its sub-clusters too. When that snapshot goes, nothing reads the middle entry any more
    // (the head's holds all of it) and GC drops it.
    let s4 = e.snapshot(v.uuid, "s4").await.unwrap();
    let p = pattern(4096, 14);
    vol.write(2 * CS + 8192, p.clone(), WriteFlags::default())
        .await
        .unwrap();
    write(&mut model, 2 * CS + 8192, &p);
    assert_eq!(e.sr_info().allocated_bytes, 9 * CS);
    assert_eq!(partial(&e), 3);
    assert!(
        read_all(vol.clone()).await == model,
        "head, three layers in cluster 2"
    );
    e.destroy(s4.uuid).await.unwrap();
    e.gc_now().await.unwrap();
    assert_eq!(
        e.sr_info().allocated_bytes,
        8 * CS,
        "the partial entry only s4 saw is dropped"
    );
    assert_eq!(partial(&e), 2);
    assert!(read_all(vol.clone()).await == model, "head after s4 went");
    assert!(
        read_all(sv.clone()).await == at_snap,
        "first snapshot after s4 went"
    );
    drop(sv);
    e.destroy(s.uuid).await.unwrap();
    e.gc_now().await.unwrap();
    assert_eq!(
        e.sr_info().allocated_bytes,
        4 * CS,
        "clusters beneath freed"
    );
    assert!(
        read_all(vol.clone()).await == model,
        "head after GC folded it"
    );
    assert_eq!(partial(&e), 0, "folded");
    drop(vol);
    e.close().await.unwrap();
    let e = Engine::open(&t.path().join("sr"), io()).unwrap();
    let vol = e.open_volume(v.uuid).unwrap();
    assert!(read_all(vol).await == model, "after reopen");
    assert!(e.check().unwrap().ok());
}

/// Small writes after a snapshot racing flushes (which commit pending sub-cluster widenings) and reads: once a
/// write is acknowledged, every later read of its block returns it, whatever commit happens in between; after a
/// reopen everything is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn widenings_committed_by_concurrent_flushes_never_hide_acknowledged_writes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const BLOCK: u64 = 4096;
    const CLUSTERS: u64 = 256;
    const BLOCKS: u64 = CLUSTERS * CS / BLOCK;
    let t = tempfile::tempdir().unwrap();
    let e = sr(t.path(), None).await;
    let v = e.create_vdi("v", CLUSTERS * CS).await.unwrap();
    let vol = e.open_volume(v.uuid).unwrap();
    let old = |b: u64| pattern(BLOCK as usize, (b % 251) as u8);
    let new = |b: u64| pattern(BLOCK as usize, (b % 251) as u8 ^ 0x5a);
    for c in 0..CLUSTERS {
        let mut buf = Vec::with_capacity(CS as usize);
        for b in c * CS / BLOCK..(c + 1) * CS / BLOCK {
            buf.extend_from_slice(&old(b));
        }
        vol.write(c * CS, IoBuf::from_slice(&buf), WriteFlags::default())
            .await
            .unwrap();
    }
    e.snapshot(v.uuid, "s").await.unwrap();
    // Every block written once, in a scattered order, by 4 writers; a block's flag is set once its write is acked.
    let acked: Arc<Vec<AtomicBool>> =
        Arc::new((0..BLOCKS).map(|_| AtomicBool::new(false)).collect());
    let done = Arc::new(AtomicBool::new(false));
    let order: Vec<u64> = (0..BLOCKS).map(|i| (i * 37 + 11) % BLOCKS).collect();
    let mut tasks = Vec::new();
    for w in 0..4usize {
        let (vol, acked) = (vol.clone(), acked.clone());
        let mine: Vec<u64> = order.iter().copied().skip(w).step_by(4).collect();
        tasks.push(tokio::spawn(async move {
            for b in mine {
                vol.write(b * BLOCK, new(b), WriteFlags::default())
                    .await
                    .unwrap();
                acked[b as usize].store(true, Ordering::Release);
            }
        }));
    }
    let flusher = {
        let (vol, done) = (vol.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Acquire) {
                vol.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let readers: Vec<_> = (0..2u64)
        .map(|r| {
            let (vol, acked, done) = (vol.clone(), acked.clone(), done.clone());
            tokio::spawn(async move {
                let mut b = r;
                while !done.load(Ordering::Acquire) {
                    b = (b * 7 + 3) % BLOCKS;
                    let was_acked = acked[b as usize].load(Ordering::Acquire);
                    let got = vol
                        .read(b * BLOCK, IoBuf::zeroed(BLOCK as usize))
                        .await
                        .unwrap();
                    if was_acked {
                        assert!(
                            got[..] == new(b)[..],
                            "block {b} lost its acknowledged write"
                        );
                    } else {
                        assert!(
                            got[..] == new(b)[..] || got[..] == old(b)[..],
                            "block {b} holds neither its old nor its new data"
                        );
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    done.store(true, Ordering::Release);
    flusher.await.unwrap();
    for r in readers {
        r.await.unwrap();
    }
    let rep = e.check().unwrap();
    assert!(rep.ok(), "{:?}", rep.problems);
    drop(vol);
    e.close().await.unwrap();
    let e = Engine::open(&t.path().join("sr"), io()).unwrap();
    let vol = e.open_volume(v.uuid).unwrap();
    let all = vol
        .read(0, IoBuf::zeroed((CLUSTERS * CS) as usize))
        .await
        .unwrap();
    for b in 0..BLOCKS {
        let at = (b * BLOCK) as usize;
        assert!(
            all[at..at + BLOCK as usize] == new(b)[..],
            "block {b} after reopen"
        );
    }
}

/// A GC pass decides which entries are dead from the volume's views (its snapshots' epochs and the head's). A
/// snapshot taken while a pass runs moves the head to a new epoch; the head's entries at that epoch must never look
/// dead to the pass. (They did: found by a soak run of `tools/fio/nbd-stress.fio` with snapshots taken and destroyed
/// every few seconds. The pass kept the views it read when it began, in which the new head epoch did not exist, and
/// its later batches deleted the head's new entries and freed their clusters: the head read stale data or zeroes,
/// and `sr check` found clusters both free and mapped.) Each batch now reads the views under the volume's barrier,
/// which a snapshot takes exclusively.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_running_across_a_snapshot_keeps_the_heads_new_entries() {
    // Three GC batches of 4096 entries, so the snapshot below lands while the pass is still running.
    const N: u64 = 3 * 4096;
    for round in 0..2u8 {
        let t = tempfile::tempdir().unwrap();
        let e = small_sr(&t.path().join("sr"));
        let v = e.create_vdi("v", N * SMALL).await.unwrap();
        let vol = e.open_volume(v.uuid).unwrap();
        let fill = |seed: u8| {
            let vol = &vol;
            async move {
                for off in (0..N * SMALL).step_by(1 << 20) {
                    vol.write(off, pattern(1 << 20, seed), WriteFlags::default())
                        .await
                        .unwrap();
                }
            }
        };
        fill(1).await;
        let s1 = e.snapshot(v.uuid, "s1").await.unwrap();
        fill(2).await;
        // Every entry at s1's epoch is now garbage.
        e.destroy(s1.uuid).await.unwrap();
        let gc = tokio::spawn({
            let e = e.clone();
            async move { e.gc_now().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        let s2 = e.snapshot(v.uuid, "s2").await.unwrap();
        // New head entries in the range the pass's last batch covers.
        let tail = 2 * 4096 * SMALL;
        for off in (tail..N * SMALL).step_by(1 << 20) {
            vol.write(off, pattern(1 << 20, 3 + round), WriteFlags::default())
                .await
                .unwrap();
        }
        gc.await.unwrap().unwrap();
        e.gc_now().await.unwrap();
        vol.flush().await.unwrap();
        for off in (0..N * SMALL).step_by(1 << 20) {
            let want = if off < tail { 2 } else { 3 + round };
            let got = vol.read(off, IoBuf::zeroed(1 << 20)).await.unwrap();
            assert!(
                got[..] == pattern(1 << 20, want)[..],
                "round {round}: head at {off} does not read its last write"
            );
        }
        let snap = e.open_volume(s2.uuid).unwrap();
        for off in (0..N * SMALL).step_by(1 << 20) {
            let got = snap.read(off, IoBuf::zeroed(1 << 20)).await.unwrap();
            assert!(
                got[..] == pattern(1 << 20, 2)[..],
                "round {round}: s2 at {off}"
            );
        }
        let report = e.check().unwrap();
        assert!(report.ok(), "round {round}: {report:?}");
    }
}

/// Writers, snapshots, destroys and GC all at once, each in its own task (what the NBD soak does, in process and
/// with small clusters so every GC pass runs several batches): every writer's region reads back exactly as its own model says, after the
/// run and after a reopen; every snapshot digests the same two rounds after it was taken as when it was taken; and
/// `sr check` is clean once the SR is quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_snapshots_and_gc_lose_nothing() {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const WRITERS: u64 = 4;
    const REGION: u64 = 16 << 20;
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("sr");
    let e = small_sr(&dir);
    let v = e.create_vdi("v", WRITERS * REGION).await.unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let vol = e.open_volume(v.uuid).unwrap();
        writers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w);
            let mut model = vec![0u8; REGION as usize];
            let base = w * REGION;
            for i in 0..5000u32 {
                // Mostly small writes (sub-cluster and partial-entry paths), some of up to 1 MiB: those leave
                // thousands of entries behind each snapshot, so GC passes run several batches.
                let len = if rng.random_ratio(1, 4) {
                    rng.random_range(1..=256u64) * SMALL
                } else {
                    rng.random_range(1..=24u64) * 512
                };
                let off = rng.random_range(0..(REGION - len) / 512) * 512;
                if rng.random_ratio(1, 10) {
                    vol.write_zeroes(base + off, len, true, WriteFlags::default())
                        .await
                        .unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                } else {
                    let mut data = vec![0u8; len as usize];
                    rng.fill(&mut data[..]);
                    vol.write(base + off, IoBuf::from_slice(&data), WriteFlags::default())
                        .await
                        .unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                if i % 50 == 49 {
                    vol.flush().await.unwrap();
                }
            }
            vol.flush().await.unwrap();
            model
        }));
    }
    let snapshotter = tokio::spawn({
        let e = e.clone();
        let done = done.clone();
        async move {
            let mut taken: Vec<(uuid::Uuid, String)> = Vec::new();
            let mut n = 0;
            while !done.load(Ordering::Acquire) {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                n += 1;
                let s = e.snapshot(v.uuid, &format!("s{n}")).await.unwrap();
                taken.push((s.uuid, e.digest(s.uuid).await.unwrap()));
                if let Some((old, want)) = taken.len().checked_sub(3).map(|i| &taken[i]) {
                    assert_eq!(
                        &e.digest(*old).await.unwrap(),
                        want,
                        "snapshot {n} - 2 changed"
                    );
                    e.destroy(*old).await.unwrap();
                }
            }
            n
        }
    });
    // GC in its own task, so passes overlap snapshots and writes.
    let collector = tokio::spawn({
        let e = e.clone();
        let done = done.clone();
        async move {
            while !done.load(Ordering::Acquire) {
                e.gc_now().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    });
    let mut models = Vec::new();
    for w in writers {
        models.push(w.await.unwrap());
    }
    done.store(true, Ordering::Release);
    let rounds = snapshotter.await.unwrap();
    collector.await.unwrap();
    assert!(rounds >= 3, "only {rounds} snapshots were taken");
    e.gc_now().await.unwrap();
    let verify = |e: Engine, models: Vec<Vec<u8>>| async move {
        let vol = e.open_volume(v.uuid).unwrap();
        for (w, model) in models.iter().enumerate() {
            let got = vol
                .read(w as u64 * REGION, IoBuf::zeroed(REGION as usize))
                .await
                .unwrap();
            if let Some(i) = (0..REGION as usize).find(|&i| got[i] != model[i]) {
                panic!("writer {w}'s region differs first at byte {i}");
            }
        }
        let report = e.check().unwrap();
        assert!(report.ok(), "{report:?}");
    };
    verify(e, models.clone()).await;
    let e = Engine::open(&dir, io()).unwrap();
    verify(e, models).await;
}

/// `sr check` on a live SR: allocating writes from many tasks (their reservations commit out of order, so the
/// committed high-water mark passes clusters whose entries are not committed yet) never show as leaks or any
/// other problem, and the SR is still clean once quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_of_a_live_sr_reports_no_writes_in_flight_as_leaks() {
    let t = tempfile::tempdir().unwrap();
    let e = small_sr(t.path());
    let v = e.create_vdi("v", 64 << 20).await.unwrap();
    let vol = std::sync::Arc::new(e.open_volume(v.uuid).unwrap());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let (vol, stop) = (vol.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut x = w.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let block = x % ((64 << 20) / SMALL);
                vol.write(
                    block * SMALL,
                    pattern(SMALL as usize, w as u8),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut checks = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        let rep = e.check().unwrap();
        assert!(rep.ok(), "live check #{checks}: {:?}", rep.problems);
        checks += 1;
        tokio::task::yield_now().await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut writes = 0;
    for w in writers {
        writes += w.await.unwrap();
    }
    assert!(
        writes > 1000 && checks > 3,
        "{writes} writes, {checks} checks"
    );
    let rep = e.check().unwrap();
    assert!(rep.ok(), "quiet check: {:?}", rep.problems);
    assert_eq!(rep.mapped_clusters * SMALL, e.sr_info().allocated_bytes);
}

/// Every byte where `to` differs from `from` lies inside one of `changes`' extents.
async fn assert_changes_cover(e: &Engine, from: uuid::Uuid, to: uuid::Uuid) -> Vec<(u64, u64)> {
    let ch = e.changes(from, to).unwrap();
    let (a, b) = (e.open_volume(from).unwrap(), e.open_volume(to).unwrap());
    let size = ch.size.min(a.size());
    let old = a.read(0, IoBuf::zeroed(size as usize)).await.unwrap();
    let new = b.read(0, IoBuf::zeroed(size as usize)).await.unwrap();
    for (i, (x, y)) in old.as_slice().iter().zip(new.as_slice()).enumerate() {
        let i = i as u64;
        if x != y {
            assert!(
                ch.extents.iter().any(|&(o, l)| o <= i && i < o + l),
                "byte {i} differs but is in no extent of {:?}",
                ch.extents
            );
        }
    }
    assert_eq!(ch.granularity, CS);
    ch.extents
}

#[tokio::test]
async fn changed_blocks_since_a_snapshot() {
    let t = tempfile::tempdir().unwrap();
    let e = sr(t.path(), None).await;
    let v = e.create_vdi("d", 20 * CS).await.unwrap();
    let vol = e.open_volume(v.uuid).unwrap();
    vol.write(0, pattern(5 * CS as usize, 1), WriteFlags::default())
        .await
        .unwrap();
    let s1 = e.snapshot(v.uuid, "s1").await.unwrap();
    assert_eq!(assert_changes_cover(&e, s1.uuid, v.uuid).await, vec![]);

    // A partial write, a discard, a never-written cluster; zeroing a hole changes nothing.
    vol.write(2 * CS + 512, pattern(4096, 2), WriteFlags::default())
        .await
        .unwrap();
    vol.discard(3 * CS, CS).await.unwrap();
    vol.write(7 * CS, pattern(CS as usize, 3), WriteFlags::default())
        .await
        .unwrap();
    vol.write_zeroes(12 * CS, CS, false, WriteFlags::default())
        .await
        .unwrap();
    let since_s1 = vec![(2 * CS, 2 * CS), (7 * CS, CS)];
    assert_eq!(assert_changes_cover(&e, s1.uuid, v.uuid).await, since_s1);

    // A second snapshot: s1 -> s2 keeps that answer; s2 -> head sees only what came after s2.
    let s2 = e.snapshot(v.uuid, "s2").await.unwrap();
    vol.write(CS, pattern(512, 4), WriteFlags::default())
        .await
        .unwrap();
    // Cluster 7 again: s2 sees it, so this redirects once more.
    vol.write(7 * CS, pattern(4096, 5), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(assert_changes_cover(&e, s1.uuid, s2.uuid).await, since_s1);
    assert_eq!(
        assert_changes_cover(&e, s2.uuid, v.uuid).await,
        vec![(CS, CS), (7 * CS, CS)]
    );
    assert_eq!(
        assert_changes_cover(&e, s1.uuid, v.uuid).await,
        vec![(CS, 3 * CS), (7 * CS, CS)]
    );
    // The same snapshot on both sides: nothing.
    assert_eq!(e.changes(s2.uuid, s2.uuid).unwrap().extents, vec![]);

    // Growing adds space that `from` never had.
    e.resize(v.uuid, 30 * CS, false).await.unwrap();
    let grown = e.changes(s2.uuid, v.uuid).unwrap();
    assert_eq!(grown.size, 30 * CS);
    assert_eq!(
        grown.extents,
        vec![(CS, CS), (7 * CS, CS), (20 * CS, 10 * CS)]
    );
    assert_eq!(grown.changed_bytes(), 12 * CS);

    // Pairs without a shared history the map answers from are refused, clearly.
    let err = e.changes(s2.uuid, s1.uuid).unwrap_err();
    assert!(matches!(err, EngineError::NotComparable(_)), "{err}");
    assert!(err.to_string().contains("taken before"), "{err}");
    assert!(matches!(
        e.changes(v.uuid, s1.uuid),
        Err(EngineError::WrongKind(..))
    ));

    // A clone of s1: what it wrote itself.
    let c = e.clone_snapshot(s1.uuid, "c").await.unwrap();
    let cvol = e.open_volume(c.uuid).unwrap();
    assert_eq!(assert_changes_cover(&e, s1.uuid, c.uuid).await, vec![]);
    cvol.write(5 * CS + 4096, pattern(4096, 6), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(
        assert_changes_cover(&e, s1.uuid, c.uuid).await,
        vec![(5 * CS, CS)]
    );
    let err = e.changes(s2.uuid, c.uuid).unwrap_err();
    assert!(matches!(err, EngineError::NotComparable(_)), "{err}");

    // Reverted to s1: nothing changed since s1 until the VDI is written again; s2 no longer compares.
    drop(vol);
    e.revert(v.uuid, s1.uuid).await.unwrap();
    assert_eq!(assert_changes_cover(&e, s1.uuid, v.uuid).await, vec![]);
    let vol = e.open_volume(v.uuid).unwrap();
    vol.write(4 * CS, pattern(4096, 7), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(
        assert_changes_cover(&e, s1.uuid, v.uuid).await,
        vec![(4 * CS, CS)]
    );
    assert!(matches!(
        e.changes(s2.uuid, v.uuid),
        Err(EngineError::NotComparable(_))
    ));
}
