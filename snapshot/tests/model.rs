//! Model-based property test: random writes, zeroes, snapshots, clones, reverts, resizes, destroys, GC runs and
//! engine reopens, checked byte for byte against a plain in-memory model of every VDI and snapshot, with
//! `sr check` after every step.

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use shale_block::uring::{IoEngine, IoEngineConfig};
use shale_block::{BlockDevice, BlockError, IoBuf, WriteFlags};
use shale_snapshot::{Engine, EngineError, ObjectKind, SrConfig};

const SECTOR: u64 = 512;

#[derive(Debug, Clone)]
enum Op {
    Write {
        obj: usize,
        off: u16,
        len: u8,
        byte: u8,
        fua: bool,
    },
    Zero {
        obj: usize,
        off: u16,
        len: u8,
    },
    Snapshot {
        obj: usize,
    },
    Clone {
        obj: usize,
    },
    Revert {
        obj: usize,
        snap: usize,
    },
    Destroy {
        obj: usize,
    },
    Resize {
        obj: usize,
        sectors: u16,
        allow_shrink: bool,
    },
    Flush,
    Gc,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (any::<usize>(), 0u16..80, 1u8..40, any::<u8>(), any::<bool>())
            .prop_map(|(obj, off, len, byte, fua)| Op::Write { obj, off, len, byte, fua }),
        2 => (any::<usize>(), 0u16..80, 1u8..40).prop_map(|(obj, off, len)| Op::Zero { obj, off, len }),
        2 => any::<usize>().prop_map(|obj| Op::Snapshot { obj }),
        1 => any::<usize>().prop_map(|obj| Op::Clone { obj }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(obj, snap)| Op::Revert { obj, snap }),
        1 => any::<usize>().prop_map(|obj| Op::Destroy { obj }),
        1 => (any::<usize>(), 1u16..100, any::<bool>())
            .prop_map(|(obj, sectors, allow_shrink)| Op::Resize { obj, sectors, allow_shrink }),
        1 => Just(Op::Flush),
        1 => Just(Op::Gc),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Clone)]
struct MObj {
    name: String,
    uuid: uuid::Uuid,
    kind: ObjectKind,
    data: Vec<u8>,
    snapshot_of: Option<uuid::Uuid>,
}

struct Harness {
    dir: tempfile::TempDir,
    io: IoEngine,
    engine: Option<Engine>,
    objs: Vec<MObj>,
    next: usize,
}

impl Harness {
    async fn new(cluster_size: u32) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let io = IoEngine::new(IoEngineConfig::default()).unwrap();
        let engine = Engine::create(
            &dir.path().join("sr"),
            SrConfig {
                cluster_size,
                capacity: None,
            },
            io.clone(),
        )
        .unwrap();
        let info = engine.create_vdi("base", 64 * SECTOR).await.unwrap();
        let objs = vec![MObj {
            name: "base".into(),
            uuid: info.uuid,
            kind: ObjectKind::Vdi,
            data: vec![0; 64 * SECTOR as usize],
            snapshot_of: None,
        }];
        Harness {
            dir,
            io,
            engine: Some(engine),
            objs,
            next: 0,
        }
    }

    fn engine(&self) -> &Engine {
        self.engine.as_ref().unwrap()
    }

    fn pick(&self, i: usize, kind: Option<ObjectKind>) -> Option<usize> {
        let c: Vec<usize> = (0..self.objs.len())
            .filter(|&j| kind.is_none_or(|k| self.objs[j].kind == k))
            .collect();
        (!c.is_empty()).then(|| c[i % c.len()])
    }

    fn name(&mut self) -> String {
        self.next += 1;
        format!("o{}", self.next)
    }

    async fn reopen(&mut self) {
        let e = self.engine.take().unwrap();
        e.close().await.unwrap();
        self.engine = Some(Engine::open(&self.dir.path().join("sr"), self.io.clone()).unwrap());
    }

    async fn apply(&mut self, op: Op) {
        match op {
            Op::Write {
                obj,
                off,
                len,
                byte,
                fua,
            } => {
                let Some(i) = self.pick(obj, None) else {
                    return;
                };
                let (o, n) = (u64::from(off) * SECTOR, u64::from(len) * SECTOR);
                let vol = self.engine().open_volume(self.objs[i].uuid).unwrap();
                let data: Vec<u8> = (0..n).map(|k| byte.wrapping_add((k / 512) as u8)).collect();
                let r = vol
                    .write(o, IoBuf::from_slice(&data), WriteFlags { fua })
                    .await;
                let m = &mut self.objs[i];
                match (m.kind, o + n <= m.data.len() as u64) {
                    (ObjectKind::Snapshot, _) => {
                        assert!(matches!(r, Err(BlockError::ReadOnly)), "{r:?}")
                    }
                    (_, false) => assert!(matches!(r, Err(BlockError::OutOfRange { .. })), "{r:?}"),
                    (_, true) => {
                        r.unwrap();
                        m.data[o as usize..(o + n) as usize].copy_from_slice(&data);
                    }
                }
            }
            Op::Zero { obj, off, len } => {
                let Some(i) = self.pick(obj, Some(ObjectKind::Vdi)) else {
                    return;
                };
                let (o, n) = (u64::from(off) * SECTOR, u64::from(len) * SECTOR);
                let vol = self.engine().open_volume(self.objs[i].uuid).unwrap();
                let r = vol.discard(o, n).await;
                let m = &mut self.objs[i];
                if o + n <= m.data.len() as u64 {
                    r.unwrap();
                    m.data[o as usize..(o + n) as usize].fill(0);
                } else {
                    assert!(matches!(r, Err(BlockError::OutOfRange { .. })), "{r:?}");
                }
            }
            Op::Snapshot { obj } => {
                let Some(i) = self.pick(obj, Some(ObjectKind::Vdi)) else {
                    return;
                };
                let name = self.name();
                let info = self
                    .engine()
                    .snapshot(self.objs[i].uuid, &name)
                    .await
                    .unwrap();
                assert_eq!(info.kind, ObjectKind::Snapshot);
                let m = MObj {
                    name,
                    uuid: info.uuid,
                    kind: ObjectKind::Snapshot,
                    data: self.objs[i].data.clone(),
                    snapshot_of: Some(self.objs[i].uuid),
                };
                self.objs.push(m);
            }
            Op::Clone { obj } => {
                let Some(i) = self.pick(obj, Some(ObjectKind::Snapshot)) else {
                    return;
                };
                let name = self.name();
                let info = self
                    .engine()
                    .clone_snapshot(self.objs[i].uuid, &name)
                    .await
                    .unwrap();
                assert_eq!(info.parent, Some(self.objs[i].uuid));
                let m = MObj {
                    name,
                    uuid: info.uuid,
                    kind: ObjectKind::Vdi,
                    data: self.objs[i].data.clone(),
                    snapshot_of: None,
                };
                self.objs.push(m);
            }
            Op::Revert { obj, snap } => {
                let Some(i) = self.pick(obj, Some(ObjectKind::Vdi)) else {
                    return;
                };
                let vdi = self.objs[i].uuid;
                let snaps: Vec<usize> = (0..self.objs.len())
                    .filter(|&j| self.objs[j].snapshot_of == Some(vdi))
                    .collect();
                if snaps.is_empty() {
                    // Reverting to someone else's snapshot is refused.
                    if let Some(j) = self.pick(snap, Some(ObjectKind::Snapshot)) {
                        let r = self.engine().revert(vdi, self.objs[j].uuid).await;
                        assert!(matches!(r, Err(EngineError::NotSnapshotOf(..))), "{r:?}");
                    }
                    return;
                }
                let j = snaps[snap % snaps.len()];
                self.engine().revert(vdi, self.objs[j].uuid).await.unwrap();
                self.objs[i].data = self.objs[j].data.clone();
            }
            Op::Destroy { obj } => {
                if self.objs.len() <= 1 {
                    return;
                }
                let i = obj % self.objs.len();
                self.engine().destroy(self.objs[i].uuid).await.unwrap();
                self.objs.remove(i);
            }
            Op::Resize {
                obj,
                sectors,
                allow_shrink,
            } => {
                let Some(i) = self.pick(obj, Some(ObjectKind::Vdi)) else {
                    return;
                };
                let new = u64::from(sectors) * SECTOR;
                let old = self.objs[i].data.len() as u64;
                let r = self
                    .engine()
                    .resize(self.objs[i].uuid, new, allow_shrink)
                    .await;
                if new < old && !allow_shrink {
                    assert!(matches!(r, Err(EngineError::ShrinkRefused(..))), "{r:?}");
                } else {
                    assert_eq!(r.unwrap().size, new);
                    self.objs[i].data.resize(new as usize, 0);
                }
            }
            Op::Flush => {
                let vol = self.engine().open_volume(self.objs[0].uuid).unwrap();
                if self.objs[0].kind == ObjectKind::Vdi {
                    vol.flush().await.unwrap();
                }
            }
            Op::Gc => {
                self.engine().gc_now().await.unwrap();
            }
            Op::Reopen => self.reopen().await,
        }
    }

    async fn verify(&self, ctx: &str) {
        let e = self.engine();
        for m in &self.objs {
            let info = e.info(m.uuid).unwrap();
            assert_eq!(info.name, m.name);
            assert_eq!(info.size, m.data.len() as u64, "{ctx}: size of {}", m.name);
            let vol = e.open_volume(m.uuid).unwrap();
            let got = vol.read(0, IoBuf::zeroed(m.data.len())).await.unwrap();
            if got.as_slice() != m.data.as_slice() {
                let first = got.iter().zip(&m.data).position(|(a, b)| a != b).unwrap();
                panic!(
                    "{ctx}: content of {} ({:?}) differs first at byte {first}: got {} want {}",
                    m.name, m.kind, got[first], m.data[first]
                );
            }
            // block_status must never claim a hole where data is.
            let ext = vol.block_status(0, m.data.len() as u64).await.unwrap();
            for x in ext {
                if x.kind != shale_block::ExtentKind::Data {
                    let s = &m.data[x.offset as usize..(x.offset + x.length) as usize];
                    assert!(
                        s.iter().all(|&b| b == 0),
                        "{ctx}: {} reports a hole over data at {}",
                        m.name,
                        x.offset
                    );
                }
            }
            assert_eq!(
                e.digest(m.uuid).await.unwrap(),
                shale_snapshot::digest::digest_bytes(&m.data),
                "{ctx}: digest of {}",
                m.name
            );
        }
        let rep = e.check().unwrap();
        assert!(rep.ok(), "{ctx}: sr check: {:?}", rep.problems);
    }
}

fn run(ops: Vec<Op>, cluster_size: u32) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let mut h = Harness::new(cluster_size).await;
        for (n, op) in ops.into_iter().enumerate() {
            let ctx = format!("step {n} {op:?}");
            h.apply(op).await;
            h.verify(&ctx).await;
        }
        // Whatever happened, after GC and a reopen everything still reads the same and space is accounted for.
        h.engine().gc_now().await.unwrap();
        h.reopen().await;
        h.verify("final reopen").await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model_4k_clusters(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, 4096);
    }

    #[test]
    fn engine_matches_model_8k_clusters(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, 8192);
    }
}

#[allow(dead_code)]
fn _unused(_: &Path, _: Arc<()>) {}
