//! SRs on real filesystems mounted from loop devices. The `reflink` SR type on XFS (`reflink=1`): create, write,
//! snapshot, overwrite, clone, digest, revert, resize, destroy, check; and the clear refusal on a filesystem
//! without reflinks (tmpfs). A native thin SR without a capacity on a small ext4 that fills up: writes fail with
//! ENOSPC, nothing acknowledged is lost, the metadata keeps working in its headroom and does not reserve most of
//! a small filesystem; and when another writer takes that headroom too, a clear error, a degraded SR and a clean
//! recovery once space is freed. Needs
//! root, `mkfs.xfs`/`mkfs.ext4` and loop devices; prints SKIP and passes when those are unavailable, so it runs
//! everywhere and really tests where CI provides them.

use std::path::{Path, PathBuf};
use std::process::Command;

use shale_block::uring::{IoEngine, IoEngineConfig};
use shale_block::{BlockDevice, IoBuf, WriteFlags};
use shale_sr::reflink::ReflinkDriver;
use shale_sr::thin::ThinDriver;
use shale_sr::{Host, SrCreateOptions, SrDriver, SrError, VdiKind};

const MIB: u64 = 1 << 20;

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A filesystem mounted on a temporary directory; unmounted (and its loop device detached) on drop.
struct Mount {
    mnt: PathBuf,
    image: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Mount {
    /// A 512 MiB XFS with reflink=1 on a loop device.
    fn xfs() -> Result<Mount, String> {
        Self::looped(512 * MIB, "mkfs.xfs", &["-q", "-m", "reflink=1"])
    }

    /// A small ext4 on a loop device.
    fn ext4(size: u64) -> Result<Mount, String> {
        Self::looped(size, "mkfs.ext4", &["-q"])
    }

    /// A filesystem of `size` bytes made by `mkfs` on a loop device.
    fn looped(size: u64, mkfs: &str, args: &[&str]) -> Result<Mount, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let image = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .map_err(|e| e.to_string())?;
        let img = image.to_string_lossy().into_owned();
        let mut mkfs_args = args.to_vec();
        mkfs_args.push(&img);
        run(mkfs, &mkfs_args)?;
        run("mount", &["-o", "loop", &img, &mnt.to_string_lossy()])?;
        Ok(Mount {
            mnt,
            image: Some(image),
            _dir: dir,
        })
    }

    /// A tmpfs, which has no reflinks.
    fn tmpfs() -> Result<Mount, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                "size=16m",
                "tmpfs",
                &mnt.to_string_lossy(),
            ],
        )?;
        Ok(Mount {
            mnt,
            image: None,
            _dir: dir,
        })
    }

    fn path(&self) -> &Path {
        &self.mnt
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = run("umount", &[&self.mnt.to_string_lossy()]) {
            eprintln!("cleanup: {e}");
        }
        // `mount -o loop` sets autoclear, but detach explicitly in case it did not.
        if let Some(image) = &self.image {
            let out = Command::new("losetup")
                .args(["-j", &image.to_string_lossy()])
                .output();
            if let Ok(out) = out {
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    if let Some(dev) = line.split(':').next() {
                        let _ = run("losetup", &["-d", dev]);
                    }
                }
            }
        }
    }
}

/// A native thin SR named `small` (at `sr` in the mount) on a new ext4 of `size` bytes, or `None` after printing
/// SKIP for `test` where loop-mounted filesystems are unavailable.
async fn thin_sr_on_ext4(
    size: u64,
    test: &str,
) -> Option<(Mount, ThinDriver, std::sync::Arc<dyn shale_sr::AttachedSr>)> {
    let mount = match Mount::ext4(size) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIP {test}: cannot mount an ext4 loop filesystem ({e})");
            return None;
        }
    };
    let driver = ThinDriver::new(IoEngine::new(IoEngineConfig::default()).expect("io engine"));
    let sr = driver
        .create(
            "small",
            &mount.path().join("sr"),
            &SrCreateOptions::default(),
        )
        .await
        .expect("create SR");
    Some((mount, driver, sr))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

async fn read(dev: &dyn BlockDevice, off: u64, len: usize) -> Vec<u8> {
    dev.read(off, IoBuf::zeroed(len))
        .await
        .expect("read")
        .as_slice()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflink_sr_on_xfs() {
    let mount = match Mount::xfs() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIP reflink_sr_on_xfs: cannot mount an XFS loop filesystem ({e})");
            return;
        }
    };
    let io = IoEngine::new(IoEngineConfig::default()).expect("io engine");
    let driver = ReflinkDriver::new(io);
    assert!(driver.capabilities().offloaded_snapshots);
    let sr_path = mount.path().join("sr");
    let sr = driver
        .create("rl", &sr_path, &SrCreateOptions::default())
        .await
        .expect("create SR");
    assert!(sr_path.join("catalog.json").is_file());

    let vdi = sr.vdi_create("disk", 64 * MIB).await.expect("create VDI");
    assert_eq!(vdi.size, 64 * MIB);
    let e = sr.vdi_create("disk", MIB).await.unwrap_err();
    assert!(matches!(e, SrError::NameTaken(_)), "{e}");

    // Write through the BlockDevice.
    let old = pattern(1, MIB as usize);
    let dev = sr.open(vdi.uuid).expect("open");
    dev.write(3 * MIB, IoBuf::from_slice(&old), WriteFlags::default())
        .await
        .expect("write");
    dev.flush().await.expect("flush");

    let snap = sr.vdi_snapshot(vdi.uuid, "snap1").await.expect("snapshot");
    assert_eq!(snap.kind, VdiKind::Snapshot);
    assert!(snap.read_only);
    assert_eq!(snap.snapshot_of, Some(vdi.uuid));
    assert_eq!(sr.info(vdi.uuid).unwrap().snapshots, vec![snap.uuid]);

    // Overwrite the VDI; the snapshot keeps the old data.
    let new = pattern(7, MIB as usize);
    dev.write(3 * MIB, IoBuf::from_slice(&new), WriteFlags::FUA)
        .await
        .expect("overwrite");
    assert_eq!(read(dev.as_ref(), 3 * MIB, MIB as usize).await, new);
    let sdev = sr.open(snap.uuid).expect("open snapshot");
    assert!(sdev.read_only());
    assert_eq!(sr.open_objects(), ["disk", "snap1"]);
    assert_eq!(read(sdev.as_ref(), 3 * MIB, MIB as usize).await, old);
    assert!(sdev
        .write(0, IoBuf::from_slice(&old[..4096]), WriteFlags::default())
        .await
        .is_err());
    drop(sdev);
    assert_eq!(sr.open_objects(), ["disk"]);

    // Clone: same content as the snapshot, writable, independent.
    let clone = sr.vdi_clone(snap.uuid, "clone1").await.expect("clone");
    assert_eq!(clone.parent, Some(snap.uuid));
    assert_eq!(clone.kind, VdiKind::Vdi);
    let d_snap = sr.digest(snap.uuid).await.expect("digest snapshot");
    let d_clone = sr.digest(clone.uuid).await.expect("digest clone");
    assert_eq!(d_snap, d_clone);
    // Same definition as the native engine's digest.
    let mut expect = vec![0u8; 64 * MIB as usize];
    expect[3 * MIB as usize..4 * MIB as usize].copy_from_slice(&old);
    assert_eq!(d_snap, shale_snapshot::digest::digest_bytes(&expect));
    assert_ne!(sr.digest(vdi.uuid).await.unwrap(), d_snap);

    // Revert refuses while the VDI is open, then restores the snapshot's content.
    let e = sr.vdi_revert(vdi.uuid, snap.uuid).await.unwrap_err();
    assert!(matches!(e, SrError::FailedPrecondition(_)), "{e}");
    let e = sr.vdi_revert(clone.uuid, snap.uuid).await.unwrap_err();
    assert!(matches!(e, SrError::FailedPrecondition(_)), "{e}");
    drop(dev);
    sr.vdi_revert(vdi.uuid, snap.uuid).await.expect("revert");
    assert_eq!(sr.digest(vdi.uuid).await.unwrap(), d_snap);
    let dev = sr.open(vdi.uuid).expect("reopen");
    assert_eq!(read(dev.as_ref(), 3 * MIB, MIB as usize).await, old);
    drop(dev);

    // Resize: grow freely, shrink only with allow_shrink; snapshots cannot be resized.
    let grown = sr
        .vdi_resize(vdi.uuid, 128 * MIB, false)
        .await
        .expect("grow");
    assert_eq!(grown.size, 128 * MIB);
    assert_eq!(sr.open(vdi.uuid).unwrap().size(), 128 * MIB);
    let e = sr.vdi_resize(vdi.uuid, 32 * MIB, false).await.unwrap_err();
    assert!(matches!(e, SrError::FailedPrecondition(_)), "{e}");
    assert!(e.to_string().contains("--allow-shrink"), "{e}");
    let shrunk = sr
        .vdi_resize(vdi.uuid, 32 * MIB, true)
        .await
        .expect("shrink");
    assert_eq!(shrunk.size, 32 * MIB);
    assert!(sr.vdi_resize(snap.uuid, 128 * MIB, false).await.is_err());

    let report = sr.check().await.expect("check");
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.objects, 3);

    // Destroying a snapshot with clones is fine: reflinked files are independent.
    sr.vdi_destroy(snap.uuid).await.expect("destroy snapshot");
    assert_eq!(sr.info(clone.uuid).unwrap().parent, None);
    assert_eq!(sr.digest(clone.uuid).await.unwrap(), d_snap);
    sr.vdi_destroy(clone.uuid).await.expect("destroy clone");
    assert!(sr.lookup("clone1").is_err());
    assert_eq!(sr.gc().await.unwrap(), 0);

    // The catalogue survives detach/attach.
    sr.detach().await.expect("detach");
    let sr = driver.attach("rl", &sr_path).await.expect("attach");
    assert_eq!(sr.list().len(), 1);
    assert_eq!(sr.lookup("disk").unwrap().size, 32 * MIB);
    assert!(sr.check().await.unwrap().ok());
    sr.vdi_destroy(vdi.uuid).await.expect("destroy VDI");
    assert!(sr.list().is_empty());
    let files = std::fs::read_dir(sr_path.join("vdis")).unwrap().count();
    assert_eq!(files, 0);
    sr.detach().await.unwrap();
    driver.destroy(&sr_path).await.expect("destroy SR");
    assert!(!sr_path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflink_sr_refused_without_reflinks() {
    let mount = match Mount::tmpfs() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIP reflink_sr_refused_without_reflinks: cannot mount tmpfs ({e})");
            return;
        }
    };
    let io = IoEngine::new(IoEngineConfig::default()).expect("io engine");
    let driver = ReflinkDriver::new(io);
    let sr_path = mount.path().join("sr");
    let e = match driver
        .create("rl", &sr_path, &SrCreateOptions::default())
        .await
    {
        Ok(_) => panic!("reflink SR created on tmpfs"),
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(
        msg.contains("does not support reflinks (FICLONE)")
            && msg.contains("XFS with reflink=1 or btrfs")
            && msg.contains(&sr_path.display().to_string()),
        "{msg}"
    );
    assert!(
        !sr_path.exists(),
        "the directory we created is removed again"
    );
}

/// A native thin SR without a capacity on a 128 MiB ext4: VDI writes fill the filesystem and then fail with
/// ENOSPC (the device's `NoSpace`) while the metadata store still has its headroom (`shale_snapshot::space`), so
/// control operations go on working on the full filesystem for longer than RocksDB's WAL takes to roll over and
/// its memtable to flush. The SR keeps serving reads and writes into space it already owns, every flushed write
/// reads back after the SR is detached and attached again, and destroying a VDI makes room for new writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thin_sr_on_a_full_filesystem() {
    let Some((mount, driver, sr)) =
        thin_sr_on_ext4(128 * MIB, "thin_sr_on_a_full_filesystem").await
    else {
        return;
    };
    let sr_path = mount.path().join("sr");
    let other = sr.vdi_create("other", 64 * MIB).await.expect("create VDI");
    let vdi = sr.vdi_create("big", 256 * MIB).await.expect("create VDI");
    let dev = sr.open(vdi.uuid).expect("open");

    // Fill: 1 MiB writes, flushed every 4 MiB, until the filesystem refuses.
    let mut flushed = 0u64;
    let mut written = 0u64;
    let failure = loop {
        let chunk = pattern((written / MIB) as u8, MIB as usize);
        if let Err(e) = dev
            .write(written, IoBuf::from_slice(&chunk), WriteFlags::default())
            .await
        {
            break e;
        }
        written += MIB;
        if written.is_multiple_of(4 * MIB) {
            match dev.flush().await {
                Ok(()) => flushed = written,
                Err(e) => break e,
            }
        }
        assert!(written < 256 * MIB, "a 128 MiB filesystem took 256 MiB");
    };
    assert!(
        matches!(failure, shale_block::BlockError::NoSpace),
        "{failure}"
    );
    eprintln!(
        "{} MiB written, {} MiB flushed before ENOSPC",
        written / MIB,
        flushed / MIB
    );
    // About 106 MiB are free on the new filesystem; RocksDB's WAL takes 16 and the headroom 40.
    assert!(
        flushed >= 40 * MIB,
        "only {} MiB of data fit on a 128 MiB filesystem",
        flushed / MIB
    );

    // The metadata store still has room: 24 MiB of control operations, past its 16 MiB memtable and the WAL
    // behind it, all succeed.
    let wals = wal_files(&sr_path);
    let done = churn_metadata(sr.as_ref(), vdi.uuid, 24 * MIB).await;
    assert!(
        done.is_ok(),
        "metadata on a filesystem full of data: {done:?}"
    );
    assert_ne!(wal_files(&sr_path), wals, "the WAL did not roll over");
    assert!(sr.stats().metadata_error.is_none());

    // Still serving: reads, and a rewrite of space the VDI owns.
    assert_eq!(
        read(dev.as_ref(), 0, MIB as usize).await,
        pattern(0, MIB as usize)
    );
    let again = pattern(200, 4096);
    dev.write(MIB, IoBuf::from_slice(&again), WriteFlags::FUA)
        .await
        .expect("rewrite in place on a full filesystem");
    drop(dev);
    sr.detach().await.expect("detach");

    // Attached again: every flushed write is there, and the SR checks clean.
    let sr = driver.attach("small", &sr_path).await.expect("attach");
    let dev = sr.open(vdi.uuid).expect("open");
    for mib in 0..flushed / MIB {
        let got = read(dev.as_ref(), mib * MIB, MIB as usize).await;
        let mut want = pattern(mib as u8, MIB as usize);
        if mib == 1 {
            want[..4096].copy_from_slice(&again);
        }
        assert!(got == want, "MiB {mib} after reattach");
    }
    let report = sr.check().await.expect("check");
    assert!(report.problems.is_empty(), "{:?}", report.problems);

    // Room again once a VDI goes: the other one can now be written.
    drop(dev);
    sr.vdi_destroy(vdi.uuid).await.expect("destroy");
    sr.gc().await.expect("gc");
    let odev = sr.open(other.uuid).expect("open other");
    let data = pattern(9, 8 * MIB as usize);
    odev.write(0, IoBuf::from_slice(&data), WriteFlags::FUA)
        .await
        .expect("write after space was freed");
    assert_eq!(read(odev.as_ref(), 0, 8 * MIB as usize).await, data);
    drop(odev);
    sr.detach().await.expect("detach");
}

/// The metadata store's WAL files, by name.
fn wal_files(sr: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(sr.join("meta"))
        .expect("meta dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".log"))
        .collect();
    v.sort();
    v
}

/// Snapshot `vdi` and destroy the snapshot, over and over, until about `bytes` of metadata (WAL records, with
/// long names) were written or an operation fails. Returns the number of rounds done.
async fn churn_metadata(
    sr: &dyn shale_sr::AttachedSr,
    vdi: uuid::Uuid,
    bytes: u64,
) -> Result<u64, SrError> {
    // One round logs the snapshot's record and names twice (create, destroy): about 1 KiB with 120-byte names.
    let rounds = bytes / 1024;
    for i in 0..rounds {
        let name = format!("{i:0>120}");
        let snap = sr.vdi_snapshot(vdi, &name).await?;
        sr.vdi_destroy(snap.uuid).await?;
    }
    Ok(rounds)
}

/// Another writer fills the filesystem of a thin SR, past the headroom kept for metadata, until a RocksDB write
/// itself fails with ENOSPC: the operation gets a clear "full" error naming the way out, the SR reports itself
/// degraded, reads go on and writes fail with `NoSpace` (never a panic or a hang). Once the space is freed, the
/// host detaches and attaches the SR (refused while the VDI is open): every flushed write is there, it checks
/// clean, and it takes changes again, without restarting anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_write_on_a_full_filesystem() {
    let test = "metadata_write_on_a_full_filesystem";
    let mount = match Mount::ext4(128 * MIB) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIP {test}: cannot mount an ext4 loop filesystem ({e})");
            return;
        }
    };
    let state = tempfile::tempdir().expect("state dir");
    let io = IoEngine::new(IoEngineConfig::default()).expect("io engine");
    let host = Host::open(state.path(), vec![std::sync::Arc::new(ThinDriver::new(io))])
        .await
        .expect("host");
    host.sr_create(
        "small",
        "thin",
        &mount.path().join("sr"),
        &SrCreateOptions::default(),
    )
    .await
    .expect("create SR");
    host.vdi_create(Some("small"), "d", 64 * MIB)
        .await
        .expect("create VDI");
    let resolved = host.resolve("small/d", None).await.expect("resolve");
    let (sr, vdi) = (resolved.sr, resolved.vdi);
    let dev = sr.open(vdi.uuid).expect("open");
    let data = pattern(3, 8 * MIB as usize);
    dev.write(0, IoBuf::from_slice(&data), WriteFlags::default())
        .await
        .expect("write");
    dev.flush().await.expect("flush");

    // Someone else takes every free block.
    let filler = mount.path().join("filler");
    let fill = format!(
        "dd if=/dev/zero of={} bs=1M 2>/dev/null; dd if=/dev/zero of={}.tail bs=4k 2>/dev/null; true",
        filler.display(),
        filler.display()
    );
    run("sh", &["-c", &fill]).expect("fill the filesystem");

    // Control operations use up the WAL's preallocated 16 MiB, then one fails.
    let err = churn_metadata(sr.as_ref(), vdi.uuid, 64 * MIB)
        .await
        .expect_err("64 MiB of metadata fit on a full filesystem");
    assert!(matches!(err, SrError::NoSpace(..)), "{err:?}");
    assert!(err.to_string().contains("metadata store"), "{err}");
    assert!(err.to_string().contains("attach"), "{err}");
    let failed = sr
        .stats()
        .metadata_error
        .expect("the SR reports the failed write");
    assert!(failed.contains("No space left on device"), "{failed}");
    // Still serving: reads of flushed data; writes refused as full, whether they need metadata or not.
    assert_eq!(read(dev.as_ref(), 0, 8 * MIB as usize).await, data);
    // A new cluster, and a rewrite in place that cannot be made durable (of the bytes already there, since a
    // failed write may still have reached the disk): both report the full filesystem.
    for (offset, bytes) in [(32 * MIB, pattern(7, 4096)), (0, data[..4096].to_vec())] {
        let w = dev
            .write(offset, IoBuf::from_slice(&bytes), WriteFlags::FUA)
            .await;
        assert!(matches!(w, Err(shale_block::BlockError::NoSpace)), "{w:?}");
    }
    assert!(sr.vdi_create("more", MIB).await.is_err());

    // Space freed, the SR detached (not while the VDI is open) and attached again: flushed data intact, clean,
    // and taking changes.
    std::fs::remove_file(&filler).expect("remove filler");
    let busy = host
        .sr_detach("small")
        .await
        .expect_err("detach with d open");
    assert!(busy.to_string().contains("'d' is open"), "{busy}");
    drop(dev);
    let view = host
        .sr_detach("small")
        .await
        .expect("a degraded SR detaches");
    assert!(view.unavailable.is_some_and(|u| u.starts_with("detached")));
    assert!(matches!(sr.open(vdi.uuid), Err(SrError::SrUnavailable(..))));
    let view = host.sr_attach("small").await.expect("attach");
    assert!(view.unavailable.is_none());
    assert!(view.stats.expect("stats").metadata_error.is_none());
    let sr = host.resolve("small/d", None).await.expect("resolve").sr;
    let dev = sr.open(vdi.uuid).expect("open");
    assert_eq!(read(dev.as_ref(), 0, 8 * MIB as usize).await, data);
    let report = sr.check().await.expect("check");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let more = pattern(8, MIB as usize);
    dev.write(32 * MIB, IoBuf::from_slice(&more), WriteFlags::FUA)
        .await
        .expect("write after space was freed");
    assert_eq!(read(dev.as_ref(), 32 * MIB, MIB as usize).await, more);
    sr.vdi_snapshot(vdi.uuid, "after").await.expect("snapshot");
    drop(dev);
    host.shutdown().await;
}
