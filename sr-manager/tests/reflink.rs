//! The `reflink` SR type on a real XFS (`reflink=1`) filesystem, mounted from a loop device: create, write,
//! snapshot, overwrite, clone, digest, revert, resize, destroy, check; and the clear refusal on a filesystem
//! without reflinks (tmpfs). Needs root, `mkfs.xfs` and loop devices; prints SKIP and passes when those are
//! unavailable, so it runs everywhere and really tests where CI provides them.

use std::path::{Path, PathBuf};
use std::process::Command;

use shale_block::uring::{IoEngine, IoEngineConfig};
use shale_block::{BlockDevice, IoBuf, WriteFlags};
use shale_sr::reflink::ReflinkDriver;
use shale_sr::{SrCreateOptions, SrDriver, SrError, VdiKind};

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
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let image = dir.path().join("xfs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(512 * MIB))
            .map_err(|e| e.to_string())?;
        let img = image.to_string_lossy().into_owned();
        run("mkfs.xfs", &["-q", "-m", "reflink=1", &img])?;
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
    assert_eq!(read(sdev.as_ref(), 3 * MIB, MIB as usize).await, old);
    assert!(sdev
        .write(0, IoBuf::from_slice(&old[..4096]), WriteFlags::default())
        .await
        .is_err());
    drop(sdev);

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
