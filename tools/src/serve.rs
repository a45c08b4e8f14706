//! `shale serve`: the host daemon.
//!
//! Start-up order, each step failing with one clear line:
//! 1. create the state directory and take an exclusive `flock` on `STATE_DIR/shale.lock` (a second daemon on the
//!    same state directory is refused, naming the running one's pid); the lock dies with the process, so a crash
//!    never leaves a stale lock;
//! 2. start the io_uring engine and open the [`Host`] (attach every registered SR; on first start create the
//!    default `local` thin SR);
//! 3. start the NBD server ([`shale_sr::export`]: every VDI and snapshot, Unix socket and loopback TCP);
//! 4. bind the Unix socket (a leftover socket file from a crashed daemon is replaced; one a live daemon answers
//!    on is refused) and serve the gRPC API until SIGTERM/SIGINT;
//! 5. on signal: stop accepting, finish in-flight requests, drain NBD connections, detach every SR (engines close cleanly), remove the
//!    socket, release the lock.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use shale_block::uring::{IoEngine, IoEngineConfig};
use shale_sr::export::{NbdFrontend, NbdOptions};
use shale_sr::reflink::ReflinkDriver;
use shale_sr::service::ShaleService;
use shale_sr::thin::ThinDriver;
use shale_sr::{Host, SrDriver};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::UnixListenerStream;

/// Lock file inside the state directory.
const LOCK_NAME: &str = "shale.lock";

/// An exclusive lock on a state directory, held for the daemon's lifetime.
struct StateLock {
    _file: File,
}

impl StateLock {
    fn acquire(state_dir: &Path) -> Result<StateLock> {
        let path = state_dir.join(LOCK_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        // SAFETY: `file` owns a valid open descriptor for the duration of the call; flock takes no pointers.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                let who = if pid.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {pid})")
                };
                bail!(
                    "another shale daemon{who} is already running with state directory {}",
                    state_dir.display()
                );
            }
            return Err(err).with_context(|| format!("cannot lock {}", path.display()));
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_all()?;
        Ok(StateLock { _file: file })
    }
}

/// Bind the socket, replacing a stale socket file but never one a live daemon answers on.
async fn bind_socket(socket: &Path) -> Result<UnixListener> {
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            bail!(
                "socket {} is in use by another running daemon",
                socket.display()
            );
        }
        tracing::info!(socket = %socket.display(), "removing stale socket");
        fs::remove_file(socket)
            .with_context(|| format!("cannot remove stale socket {}", socket.display()))?;
    }
    if let Some(parent) = socket.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create socket directory {}", parent.display()))?;
    }
    UnixListener::bind(socket).with_context(|| format!("cannot listen on {}", socket.display()))
}

/// Resolves when SIGTERM or SIGINT arrives.
async fn shutdown_signal() {
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received, stopping"),
                _ = int.recv() => tracing::info!("SIGINT received, stopping"),
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

/// Run the daemon until a signal stops it.
pub async fn run(state_dir: PathBuf, socket: PathBuf, nbd: NbdOptions) -> Result<()> {
    fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create state directory {}", state_dir.display()))?;
    let state_dir = state_dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", state_dir.display()))?;
    let socket = crate::paths::absolute(&socket)?;
    let _lock = StateLock::acquire(&state_dir)?;

    let io = IoEngine::new(IoEngineConfig::default()).context("cannot start the I/O engine")?;
    let drivers: Vec<Arc<dyn SrDriver>> = vec![
        Arc::new(ThinDriver::new(io.clone())),
        Arc::new(ReflinkDriver::new(io)),
    ];
    let host = Arc::new(Host::open(&state_dir, drivers).await?);
    let vms = crate::vms::VmManager::open(host.clone())?;

    let listener = bind_socket(&socket).await?;
    let nbd = NbdFrontend::start(host.clone(), &nbd)
        .await
        .context("cannot start the NBD server")?;
    tracing::info!(
        state_dir = %state_dir.display(),
        socket = %socket.display(),
        pid = std::process::id(),
        "shale daemon ready"
    );
    let service = ShaleService::new(host.clone(), socket.clone()).with_nbd(nbd.clone());
    let served = tonic::transport::Server::builder()
        .add_service(service.into_server())
        .add_service(crate::vms::VmService::new(vms.clone()).into_server())
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown_signal())
        .await;

    // Running VMs hold their VDIs open; stop them before the SRs close.
    vms.shutdown().await;
    // NBD clients hold volumes open; drain them before the SRs close.
    nbd.shutdown().await;
    host.shutdown().await;
    if let Err(e) = fs::remove_file(&socket) {
        tracing::warn!(socket = %socket.display(), error = %e, "cannot remove socket");
    }
    served.context("gRPC server failed")?;
    tracing::info!("shale daemon stopped");
    Ok(())
}
