//! Shared helpers for the NBD end-to-end tests: sparse backing files, a running server, external tools.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use shale_block::file::FileDevice;
use shale_block::nbd::{Export, Listener, NbdServer, ServerConfig};
use shale_block::uring::{IoEngine, IoEngineConfig};
use shale_block::BlockDevice;

/// A served export with its backing file and both listeners.
pub struct Served {
    pub dir: tempfile::TempDir,
    pub server: NbdServer,
    pub tcp: Listener,
    pub unix: Listener,
    pub engine: IoEngine,
}

impl Served {
    pub fn tcp_uri(&self, export: &str) -> String {
        self.tcp.uri(export)
    }
    pub fn unix_uri(&self, export: &str) -> String {
        self.unix.uri(export)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// Create a sparse file `name` of `size` bytes in the test directory and export it.
    pub fn export_file(&self, name: &str, size: u64, read_only: bool) -> Arc<FileDevice> {
        let path = self.path(&format!("{name}.raw"));
        if !path.exists() {
            sparse_file(&path, size);
        }
        let dev = Arc::new(
            FileDevice::open(&path, read_only, self.engine.clone()).expect("open FileDevice"),
        );
        let export = Export::new(name, dev.clone() as Arc<dyn BlockDevice>)
            .with_description(format!("test export {name}"))
            .read_only(read_only);
        self.server.add_export(export).expect("add export");
        dev
    }
}

pub fn sparse_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create backing file");
    f.set_len(size).expect("size backing file");
}

/// Start a server with TCP (ephemeral loopback port) and Unix listeners in a fresh temp dir.
pub async fn serve() -> Served {
    serve_with(ServerConfig::default()).await
}

pub async fn serve_with(config: ServerConfig) -> Served {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = IoEngine::new(IoEngineConfig::default()).expect("io engine");
    let server = NbdServer::new(config);
    let tcp = server.listen_tcp("127.0.0.1:0").await.expect("listen tcp");
    let unix = server
        .listen_unix(dir.path().join("nbd.sock"))
        .await
        .expect("listen unix");
    Served {
        dir,
        server,
        tcp,
        unix,
        engine,
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// True if `tool` runs; otherwise prints why the test is skipped.
pub fn have(tool: &str) -> bool {
    let ok = std::process::Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP: `{tool}` is not installed (install qemu-utils, libnbd-bin, fio to run this test)");
    }
    ok
}

/// Run a command to completion (async, so the in-process server keeps serving), returning its output.
pub async fn run(program: &str, args: &[&str]) -> Output {
    let out = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("failed to run {program}: {e}"));
    out
}

/// Run a command and require success; returns stdout.
pub async fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args).await;
    if !out.status.success() {
        panic!(
            "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The interpreter that can `import nbd` (libnbd's Python bindings), for nbdsh scripts. `nbdsh` itself runs
/// `python3 -m nbd`, which fails when a different python3 is first on PATH.
pub fn nbd_python() -> Option<String> {
    for py in ["python3", "/usr/bin/python3"] {
        let ok = std::process::Command::new(py)
            .args(["-c", "import nbd"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Some(py.to_string());
        }
    }
    eprintln!("SKIP: libnbd Python bindings (nbdsh) are not installed");
    None
}

/// Deterministic pattern for `len` bytes at `offset`, distinct per 512-byte block.
pub fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let pos = offset + i as u64;
            ((pos / 512) as u8)
                .wrapping_mul(31)
                .wrapping_add((pos % 512) as u8)
                .wrapping_add(seed)
                | 1
        })
        .collect()
}
