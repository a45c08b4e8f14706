//! Harness for Shale's end-to-end tests: real `shale` processes, real sockets, throwaway state directories.
//!
//! - [`shale_bin`] finds the `shale` binary: `$SHALE_BIN` if set, else it runs `cargo build -p shale` into the
//!   same target directory and profile as the running test (a no-op when up to date), so `cargo test -p
//!   shale-tests` never runs a stale binary.
//! - [`Daemon`] starts `shale serve --state-dir DIR --socket DIR/s.sock`, waits until it answers, runs CLI
//!   commands against it ([`Daemon::shale`]), stops it with SIGTERM ([`Daemon::stop`]), and kills it (printing
//!   its log) if a test panics.
//!   Its NBD server listens on `STATE_DIR/nbd.sock` and an ephemeral loopback TCP port (see `shale vdi
//!   export` for the URIs), so parallel tests and a real daemon on port 10809 never collide.
//! - [`have`] says whether an external client (qemu-img, nbdinfo, fio...) is installed, so tests can skip.
//! - [`Out`] is a finished CLI command with assertion helpers that print the whole output on failure.

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `tests` package's directory for the current run (cargo and nextest set `CARGO_MANIFEST_DIR` when they run
/// a test), falling back to the build's: a test binary built from another checkout that shares the target
/// directory (CI's clones, hooks) would otherwise build and read files there.
pub fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Path of the `shale` binary, built on first use.
pub fn shale_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("SHALE_BIN").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        // The test executable lives in TARGET/PROFILE/deps/.
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test exe in TARGET/PROFILE/deps");
        let target_dir = profile_dir.parent().expect("target dir");
        let profile = profile_dir
            .file_name()
            .and_then(OsStr::to_str)
            .unwrap_or("debug");
        let manifest = manifest_dir();
        let workspace = manifest.parent().expect("workspace root");
        let cargo = std::env::var_os("CARGO")
            .unwrap_or_else(|| option_env!("CARGO").unwrap_or("cargo").into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace)
            .args([
                "build",
                "--quiet",
                "-p",
                "shale",
                "--bin",
                "shale",
                "--target-dir",
            ])
            .arg(target_dir);
        match profile {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let status = cmd.status().expect("run cargo build -p shale");
        assert!(status.success(), "cargo build -p shale failed");
        let bin = profile_dir.join("shale");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
    .clone()
}

/// A finished CLI command.
#[derive(Debug)]
pub struct Out {
    /// The command line, for messages.
    pub cmd: String,
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Out {
    /// Assert success; returns self for chaining.
    #[track_caller]
    pub fn ok(&self) -> &Out {
        assert_eq!(
            self.code, 0,
            "`{}` failed:\nstdout: {}\nstderr: {}",
            self.cmd, self.stdout, self.stderr
        );
        self
    }

    /// Assert failure with a one-line `error: ...` message containing every `needle` (case-insensitive).
    #[track_caller]
    pub fn fails_with(&self, needles: &[&str]) -> &Out {
        assert_ne!(
            self.code, 0,
            "`{}` should have failed:\nstdout: {}",
            self.cmd, self.stdout
        );
        let err = self.stderr.trim();
        let lower = err.to_lowercase();
        for n in needles {
            assert!(
                lower.contains(&n.to_lowercase()),
                "`{}`: expected '{n}' in the error, got:\n{err}",
                self.cmd
            );
        }
        self
    }

    /// Assert the error is one line (the CLI contract for bad input).
    #[track_caller]
    pub fn one_line_error(&self) -> &Out {
        let lines: Vec<_> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "`{}`: expected a one-line error, got:\n{}",
            self.cmd,
            self.stderr
        );
        assert!(
            lines[0].starts_with("error: "),
            "`{}`: {}",
            self.cmd,
            lines[0]
        );
        self
    }

    /// Parse stdout as JSON.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!("`{}`: stdout is not JSON ({e}):\n{}", self.cmd, self.stdout)
        })
    }
}

/// Run `shale ARGS` with `socket` and return its result.
pub fn run_shale<I, S>(socket: &Path, args: I) -> Out
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let cmd = format!(
        "shale {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = Command::new(shale_bin())
        .arg("--socket")
        .arg(socket)
        .args(&args)
        .env_remove("SHALE_SOCKET")
        .env_remove("SHALE_STATE_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    Out {
        cmd,
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A `shale serve` process with its own state directory.
pub struct Daemon {
    child: Option<Child>,
    /// The daemon's state directory.
    pub state_dir: PathBuf,
    /// The daemon's socket.
    pub socket: PathBuf,
    /// Where its stderr (the tracing log) goes.
    pub log: PathBuf,
}

impl Daemon {
    /// Spawn `shale serve` on `state_dir` (socket `state_dir/s.sock`) without waiting for it.
    pub fn spawn(state_dir: &Path) -> Daemon {
        Daemon::spawn_with(state_dir, &[])
    }

    /// [`Daemon::spawn`] with more `shale serve` flags (`--nbd-io-threads 3`).
    pub fn spawn_with(state_dir: &Path, serve_args: &[&str]) -> Daemon {
        std::fs::create_dir_all(state_dir).expect("create state dir");
        let socket = state_dir.join("s.sock");
        let log = state_dir.with_extension(format!("log.{}", std::process::id()));
        let child = Command::new(shale_bin())
            .args(["serve", "--state-dir"])
            .arg(state_dir)
            .arg("--socket")
            .arg(&socket)
            // An ephemeral NBD port: tests run in parallel and a real daemon may own 10809.
            .args(["--nbd-listen", "127.0.0.1:0"])
            .args(serve_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("daemon log"))
            .spawn()
            .expect("spawn shale serve");
        Daemon {
            child: Some(child),
            state_dir: state_dir.to_path_buf(),
            socket,
            log,
        }
    }

    /// Start a daemon and wait until it answers (up to 60 s).
    pub fn start(state_dir: &Path) -> Daemon {
        Daemon::start_with(state_dir, &[])
    }

    /// [`Daemon::start`] with more `shale serve` flags.
    pub fn start_with(state_dir: &Path, serve_args: &[&str]) -> Daemon {
        let mut d = Daemon::spawn_with(state_dir, serve_args);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("daemon exited early ({st}):\n{}", d.log_text());
            }
            if d.socket.exists() && run_shale(&d.socket, ["sr", "list"]).code == 0 {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready after 60 s:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Run `shale ARGS` against this daemon.
    pub fn shale<I, S>(&self, args: I) -> Out
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_shale(&self.socket, args)
    }

    /// Create a small `thin` SR named `name` at `path` with a capacity and 64 KiB clusters: the setting of the
    /// tests that fill an SR.
    #[track_caller]
    pub fn create_small_sr(&self, name: &str, path: &Path, capacity: &str) {
        let path = path.display().to_string();
        self.shale([
            "sr",
            "create",
            "--name",
            name,
            "--path",
            &path,
            "--capacity",
            capacity,
            "--cluster-size",
            "64K",
        ])
        .ok();
    }

    /// The blake3 content digest of a VDI or snapshot (`shale vdi digest`): compares whole disks cheaply.
    pub fn digest(&self, vdi: &str) -> String {
        let v = self.shale(["--json", "vdi", "digest", vdi]).ok().json();
        v["digest"].as_str().expect("digest field").to_string()
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Wait (up to `timeout`) for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send a signal to the daemon.
    pub fn signal(&self, sig: i32) {
        let pid = self.pid() as libc::pid_t;
        if pid > 0 {
            // SAFETY: kill(2) takes plain integers; `pid` is our own child, not yet reaped.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    /// Stop with SIGTERM and wait (up to 30 s); returns the exit status.
    #[track_caller]
    pub fn stop(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_exit(Duration::from_secs(30)) {
            Some(st) => st,
            None => panic!(
                "daemon did not stop within 30 s of SIGTERM:\n{}",
                self.log_text()
            ),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- daemon log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// Whether `tool` is on `PATH`. Tests that need a missing client print `SKIP: ...` and pass (CI installs
/// qemu-utils, libnbd-bin and fio, so nothing is skipped there).
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        eprintln!("SKIP: {tool} is not installed");
    }
    found
}

/// The `extents` of a `vdi diff --json` reply as (offset, length).
pub fn diff_extents(diff: &serde_json::Value) -> Vec<(u64, u64)> {
    diff["extents"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["offset"].as_u64().unwrap_or(0),
                        e["length"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
