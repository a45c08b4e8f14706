//! Daemon-managed VMs: the `ShaleVm` gRPC service (`sr-manager/proto/vm.proto`) on top of [`VmManager`].
//!
//! Why it lives here: the VMM (`shale-vmm`) and the SR manager (`shale-sr`) are siblings in the dependency
//! graph, and only the daemon (this crate) may depend on both. The manager:
//! - keeps VM *definitions* in `STATE_DIR/vms.json` (replaced atomically: temp file, fsync, rename, fsync dir),
//!   so they survive daemon restarts; VMs never start by themselves;
//! - records each disk by VDI UUID at create time (a snapshot is forced read-only), opens the VDIs with
//!   [`Host::open_volume`] when the VM starts and closes them once it has stopped, so while a VM runs the engine
//!   refuses to destroy or revert its VDIs (InUse);
//! - runs each VM's disk queue workers on one of the daemon's VM I/O threads ([`shale_block::IoThreads`]: a
//!   request's virtqueue pop, its volume I/O on the thread's own io_uring ring, and the completion all stay on
//!   that thread; the daemon's runtime if the threads cannot start) and watches the VM from a thread that cleans
//!   up whichever way it stops (guest exit, host stop, failure);
//! - tees the serial console to `STATE_DIR/vms/NAME.console` (truncated at each start), which `VmConsole` serves
//!   by offset, so the output of a VM that has stopped stays readable.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use shale_block::BlockDevice;
use shale_sr::proto::{self, shale_vm_server::ShaleVm};
use shale_sr::{Host, SrError, VdiKind};
use shale_vmm::{BootSource, CpuidPolicy, Disk, Vm, VmConfig, VmExit, VmState};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// File holding the VM definitions, inside the state directory.
const DEFS_FILE: &str = "vms.json";
/// Directory for console logs, inside the state directory.
const CONSOLE_DIR: &str = "vms";
/// Smallest and largest guest RAM accepted.
const MIN_MEMORY: u64 = 16 << 20;
const MAX_MEMORY: u64 = 1 << 40;
/// Most console bytes returned by one `VmConsole` call.
const CONSOLE_CHUNK: u64 = 1 << 20;
/// How long `VmStop` waits for the vCPUs to leave the guest and the disks to close.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// What can go wrong managing VMs; the message is the one line the CLI prints.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// No VM definition of that name.
    #[error("unknown VM '{0}' (see `shale vm list`)")]
    NotFound(String),
    /// The name is already used by another VM.
    #[error("a VM named '{0}' already exists")]
    NameTaken(String),
    /// Bad name, size, vCPU count, file...
    #[error("{0}")]
    InvalidArgument(String),
    /// The VM's state does not allow the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Resolving or opening a VDI failed.
    #[error(transparent)]
    Sr(#[from] SrError),
    /// The VMM could not build or start the VM.
    #[error("VM '{0}': {1}")]
    Vmm(String, String),
    /// Reading or writing the definitions or console files failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

impl From<VmError> for Status {
    fn from(e: VmError) -> Status {
        match e {
            VmError::NotFound(_) => Status::not_found(e.to_string()),
            VmError::NameTaken(_) => Status::already_exists(e.to_string()),
            VmError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
            VmError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
            VmError::Sr(s) => s.into(),
            VmError::Vmm(..) | VmError::Io(..) => Status::internal(e.to_string()),
        }
    }
}

type Result<T, E = VmError> = std::result::Result<T, E>;

/// One disk of a definition.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DiskDef {
    vdi_uuid: String,
    vdi_name: String,
    read_only: bool,
}

/// Boot source of a definition.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum BootDef {
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
        /// Disks on the command line instead of ACPI tables (absent in definitions from before the option).
        #[serde(default)]
        no_acpi: bool,
    },
    Flat {
        image: PathBuf,
    },
}

/// A persisted VM definition.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmDef {
    name: String,
    memory: u64,
    vcpus: u32,
    disks: Vec<DiskDef>,
    boot: BootDef,
    created: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct DefsFile {
    vms: Vec<VmDef>,
}

/// A VM that is running (or stopping).
struct Running {
    vm: Arc<Vm>,
    /// Becomes true once the watcher has dropped the VM and closed its disks.
    done: watch::Receiver<bool>,
}

/// A definition plus what this daemon knows about its runs.
struct Entry {
    def: VmDef,
    run: Option<Running>,
    /// A start is opening disks / building the VM.
    starting: bool,
    last_exit: Option<VmExit>,
    started: u64,
    last_stats: Option<shale_vmm::VmStats>,
}

/// Every VM of this host.
pub struct VmManager {
    host: Arc<Host>,
    state_dir: PathBuf,
    entries: Mutex<BTreeMap<String, Entry>>,
    me: Weak<VmManager>,
    /// I/O threads for the VMs' disk workers, started with the first VM.
    io: std::sync::OnceLock<Option<shale_block::IoThreads>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// VM names: 1-64 of `[A-Za-z0-9._-]`, not starting with `.` or `-` (they name files in the state directory).
fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(VmError::InvalidArgument(format!(
            "invalid VM name '{name}': use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        )))
    }
}

/// A definition's boot source from the request, checked: files exist, and Linux-only options come with a kernel
/// (the CLI refuses them too; other gRPC clients get the same answer).
fn boot_def(boot: proto::VmBoot) -> Result<BootDef> {
    match boot.kind.as_str() {
        "linux" => {
            let kernel = PathBuf::from(&boot.image);
            check_file("kernel", &kernel)?;
            let initrd = boot.initrd.filter(|s| !s.is_empty()).map(PathBuf::from);
            if let Some(i) = &initrd {
                check_file("initrd", i)?;
            }
            Ok(BootDef::Linux {
                kernel,
                initrd,
                cmdline: boot.cmdline,
                no_acpi: boot.no_acpi,
            })
        }
        "flat" => {
            if boot.no_acpi || boot.initrd.is_some_and(|s| !s.is_empty()) {
                return Err(VmError::InvalidArgument(
                    "initrd and no_acpi need a Linux kernel, not a flat binary".into(),
                ));
            }
            let image = PathBuf::from(&boot.image);
            check_file("flat image", &image)?;
            Ok(BootDef::Flat { image })
        }
        other => Err(VmError::InvalidArgument(format!(
            "unknown boot kind '{other}' (linux or flat)"
        ))),
    }
}

fn check_file(what: &str, path: &Path) -> Result<()> {
    if !path.is_absolute() {
        return Err(VmError::InvalidArgument(format!(
            "{what} path {} must be absolute",
            path.display()
        )));
    }
    match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(VmError::InvalidArgument(format!(
            "{what} {} is not a regular file",
            path.display()
        ))),
        Err(e) => Err(VmError::InvalidArgument(format!(
            "{what} {}: {}",
            path.display(),
            short_io(&e)
        ))),
    }
}

fn short_io(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Short wire form of an exit reason.
fn exit_str(e: &VmExit) -> String {
    match e {
        VmExit::GuestExit(_) => "guest-exit".into(),
        VmExit::Reset => "reset".into(),
        VmExit::PowerOff => "power-off".into(),
        VmExit::TripleFault => "triple-fault".into(),
        VmExit::Stopped => "stopped".into(),
        VmExit::Failed(r) => format!("failed: {r}"),
    }
}

fn stats_to_proto(s: &shale_vmm::VmStats) -> proto::VmStats {
    proto::VmStats {
        pio_exits: s.pio_exits,
        mmio_exits: s.mmio_exits,
        other_exits: s.other_exits,
        disks: s
            .disks
            .iter()
            .map(|d| proto::VmDiskStats {
                requests: d.requests,
                invalid: d.invalid,
                failed: d.failed,
                bytes_read: d.bytes_read,
                bytes_written: d.bytes_written,
                notifications: d.notifications,
                interrupts: d.interrupts,
            })
            .collect(),
    }
}

impl VmManager {
    /// Load the definitions of `host`'s state directory (none yet is fine; an unreadable file is an error, so a
    /// damaged file is never silently replaced by an empty one).
    pub fn open(host: Arc<Host>) -> Result<Arc<VmManager>> {
        let state_dir = host.state_dir().to_path_buf();
        let path = state_dir.join(DEFS_FILE);
        let defs = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<DefsFile>(&bytes).map_err(|e| {
                VmError::Io(
                    format!("VM definitions {}", path.display()),
                    std::io::Error::other(e),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => DefsFile::default(),
            Err(e) => return Err(VmError::Io(format!("VM definitions {}", path.display()), e)),
        };
        let entries = defs
            .vms
            .into_iter()
            .map(|def| {
                (
                    def.name.clone(),
                    Entry {
                        def,
                        run: None,
                        starting: false,
                        last_exit: None,
                        started: 0,
                        last_stats: None,
                    },
                )
            })
            .collect();
        Ok(Arc::new_cyclic(|me| VmManager {
            host,
            state_dir,
            entries: Mutex::new(entries),
            me: me.clone(),
            io: std::sync::OnceLock::new(),
        }))
    }

    /// Where a starting VM's disk workers run: the next VM I/O thread, or the daemon's runtime.
    fn disk_runtime(&self) -> tokio::runtime::Handle {
        let io = self.io.get_or_init(|| {
            match shale_block::IoThreads::new("shale-vm-io", shale_block::iothread::default_threads()) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start VM I/O threads; disk workers run on the daemon's runtime");
                    None
                }
            }
        });
        io.as_ref()
            .map(|t| t.handle())
            .unwrap_or_else(tokio::runtime::Handle::current)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn console_path(&self, name: &str) -> PathBuf {
        self.state_dir
            .join(CONSOLE_DIR)
            .join(format!("{name}.console"))
    }

    /// Write every definition atomically.
    fn persist(&self, entries: &BTreeMap<String, Entry>) -> Result<()> {
        let path = self.state_dir.join(DEFS_FILE);
        let ctx = || format!("cannot write VM definitions {}", path.display());
        let file = DefsFile {
            vms: entries.values().map(|e| e.def.clone()).collect(),
        };
        let json = serde_json::to_vec_pretty(&file)
            .map_err(|e| VmError::Io(ctx(), std::io::Error::other(e)))?;
        let tmp = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(&self.state_dir)?.sync_all()
        };
        write().map_err(|e| VmError::Io(ctx(), e))
    }

    fn view(&self, e: &Entry) -> proto::Vm {
        let d = &e.def;
        let (state, stats) = match &e.run {
            Some(r) => {
                let st = match r.vm.state() {
                    VmState::Exited(_) => "stopping",
                    _ => "running",
                };
                (st, Some(stats_to_proto(&r.vm.stats())))
            }
            None if e.starting => ("starting", None),
            None => ("stopped", e.last_stats.as_ref().map(stats_to_proto)),
        };
        let boot = match &d.boot {
            BootDef::Linux {
                kernel,
                initrd,
                cmdline,
                no_acpi,
            } => proto::VmBoot {
                kind: "linux".into(),
                image: kernel.display().to_string(),
                initrd: initrd.as_ref().map(|p| p.display().to_string()),
                cmdline: cmdline.clone(),
                no_acpi: *no_acpi,
            },
            BootDef::Flat { image } => proto::VmBoot {
                kind: "flat".into(),
                image: image.display().to_string(),
                initrd: None,
                cmdline: String::new(),
                no_acpi: false,
            },
        };
        let console_bytes = match &e.run {
            Some(r) => r.vm.console().total(),
            None => fs::metadata(self.console_path(&d.name))
                .map(|m| m.len())
                .unwrap_or(0),
        };
        proto::Vm {
            name: d.name.clone(),
            memory: d.memory,
            vcpus: d.vcpus,
            disks: d
                .disks
                .iter()
                .map(|k| proto::VmDisk {
                    vdi_uuid: k.vdi_uuid.clone(),
                    vdi_name: k.vdi_name.clone(),
                    read_only: k.read_only,
                })
                .collect(),
            boot: Some(boot),
            state: state.into(),
            last_exit: e.last_exit.as_ref().map(exit_str).unwrap_or_default(),
            exit_code: match e.last_exit {
                Some(VmExit::GuestExit(c)) => Some(c),
                _ => None,
            },
            created: d.created,
            started: e.started,
            console_bytes,
            stats,
        }
    }

    /// Validate and record a new definition.
    pub async fn create(&self, req: proto::VmCreateRequest) -> Result<proto::Vm> {
        let name = req.name.trim().to_string();
        validate_name(&name)?;
        if req.memory < MIN_MEMORY || req.memory > MAX_MEMORY || !req.memory.is_multiple_of(4096) {
            return Err(VmError::InvalidArgument(format!(
                "invalid memory size {} bytes: must be a multiple of 4K between 16M and 1T",
                req.memory
            )));
        }
        let vcpus = if req.vcpus == 0 { 1 } else { req.vcpus };
        if vcpus > 32 {
            return Err(VmError::InvalidArgument(format!(
                "invalid vCPU count {vcpus}: must be 1..=32"
            )));
        }
        if req.disks.len() > 8 {
            return Err(VmError::InvalidArgument(format!(
                "{} disks given; a VM has at most 8",
                req.disks.len()
            )));
        }
        let boot = req.boot.ok_or_else(|| {
            VmError::InvalidArgument("a boot source (--kernel or --flat) is required".into())
        })?;
        let boot = boot_def(boot)?;
        let mut disks = Vec::new();
        for spec in &req.disks {
            let r = spec.vdi.trim();
            if r.is_empty() {
                return Err(VmError::InvalidArgument("empty disk reference".into()));
            }
            let v = self.host.vdi_show(r).await?;
            if v.info.hidden {
                return Err(VmError::InvalidArgument(format!(
                    "'{r}' is a destroyed snapshot kept only for its clones"
                )));
            }
            let snapshot = v.info.kind == VdiKind::Snapshot;
            disks.push(DiskDef {
                vdi_uuid: v.info.uuid.to_string(),
                vdi_name: format!("{}/{}", v.sr_name, v.info.name),
                read_only: spec.read_only || snapshot || v.info.read_only,
            });
        }
        let def = VmDef {
            name: name.clone(),
            memory: req.memory,
            vcpus,
            disks,
            boot,
            created: now(),
        };
        let mut entries = self.lock();
        if entries.contains_key(&name) {
            return Err(VmError::NameTaken(name));
        }
        entries.insert(
            name.clone(),
            Entry {
                def,
                run: None,
                starting: false,
                last_exit: None,
                started: 0,
                last_stats: None,
            },
        );
        if let Err(e) = self.persist(&entries) {
            entries.remove(&name);
            return Err(e);
        }
        tracing::info!(vm = %name, "created VM definition");
        Ok(self.view(&entries[&name]))
    }

    /// Every VM.
    pub fn list(&self) -> Vec<proto::Vm> {
        let entries = self.lock();
        entries.values().map(|e| self.view(e)).collect()
    }

    /// One VM.
    pub fn show(&self, name: &str) -> Result<proto::Vm> {
        let entries = self.lock();
        let e = entries
            .get(name)
            .ok_or_else(|| VmError::NotFound(name.into()))?;
        Ok(self.view(e))
    }

    /// Open the disks, build the VM and start it; a watcher thread cleans up when it stops.
    pub async fn start(&self, name: &str) -> Result<proto::Vm> {
        let def = {
            let mut entries = self.lock();
            let e = entries
                .get_mut(name)
                .ok_or_else(|| VmError::NotFound(name.into()))?;
            if e.run.is_some() || e.starting {
                return Err(VmError::FailedPrecondition(format!(
                    "VM '{name}' is already running"
                )));
            }
            e.starting = true;
            e.def.clone()
        };
        let result = self.start_inner(&def).await;
        let mut entries = self.lock();
        let e = entries
            .get_mut(name)
            .ok_or_else(|| VmError::NotFound(name.into()))?;
        e.starting = false;
        let (vm, devices) = result?;
        // The watcher starts only once the run is recorded, so a guest that stops at once is still seen.
        let (tx, rx) = watch::channel(false);
        e.run = Some(Running {
            vm: vm.clone(),
            done: rx,
        });
        e.started = now();
        e.last_exit = None;
        e.last_stats = None;
        let me = self.me.clone();
        let watched = vm.clone();
        let owned = name.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("vm-{name}-watch"))
            .spawn(move || watch_vm(me, owned, watched, devices, tx));
        if let Err(err) = spawned {
            e.run = None;
            vm.stop();
            return Err(VmError::Vmm(
                name.into(),
                format!("cannot start watcher thread: {err}"),
            ));
        }
        tracing::info!(vm = %name, disks = e.def.disks.len(), "started VM");
        Ok(self.view(e))
    }

    async fn start_inner(&self, def: &VmDef) -> Result<(Arc<Vm>, Vec<Arc<dyn BlockDevice>>)> {
        let mut devices: Vec<Arc<dyn BlockDevice>> = Vec::new();
        let mut disks = Vec::new();
        for d in &def.disks {
            let (r, dev) = self.host.open_volume(&d.vdi_uuid).await?;
            let read_only = d.read_only || r.vdi.read_only || dev.read_only();
            let mut serial = d.vdi_uuid.replace('-', "");
            serial.truncate(20);
            disks.push(Disk {
                device: dev.clone(),
                read_only,
                serial,
            });
            devices.push(dev);
        }
        let (boot, acpi) = match &def.boot {
            BootDef::Linux {
                kernel,
                initrd,
                cmdline,
                no_acpi,
            } => (
                BootSource::Linux {
                    kernel: kernel.clone(),
                    initrd: initrd.clone(),
                    cmdline: cmdline.clone(),
                },
                !no_acpi,
            ),
            BootDef::Flat { image } => (BootSource::FlatBinary(image.clone()), true),
        };
        let console_path = self.console_path(&def.name);
        let io_err = |what: &str, e| VmError::Io(format!("{what} {}", console_path.display()), e);
        if let Some(dir) = console_path.parent() {
            fs::create_dir_all(dir)
                .map_err(|e| io_err("cannot create console directory for", e))?;
        }
        let tee = fs::File::create(&console_path).map_err(|e| io_err("cannot create", e))?;
        let vcpus = u8::try_from(def.vcpus)
            .map_err(|_| VmError::InvalidArgument(format!("invalid vCPU count {}", def.vcpus)))?;
        let mut cfg = VmConfig::new(def.name.clone(), def.memory, boot);
        cfg.vcpus = vcpus;
        cfg.acpi = acpi;
        cfg.disks = disks;
        cfg.cpuid = CpuidPolicy::for_host();
        cfg.console_tee = Some(Box::new(tee));
        cfg.runtime = Some(self.disk_runtime());
        let name = def.name.clone();
        let vm = tokio::task::spawn_blocking(move || -> Result<Arc<Vm>> {
            let vm = Vm::new(cfg).map_err(|e| VmError::Vmm(name.clone(), e.to_string()))?;
            vm.start()
                .map_err(|e| VmError::Vmm(name.clone(), e.to_string()))?;
            Ok(Arc::new(vm))
        })
        .await
        .map_err(|e| VmError::Vmm(def.name.clone(), format!("start task failed: {e}")))??;
        Ok((vm, devices))
    }

    /// Stop a running VM and wait until its disks are closed.
    pub async fn stop(&self, name: &str) -> Result<proto::Vm> {
        let (vm, mut done) = {
            let entries = self.lock();
            let e = entries
                .get(name)
                .ok_or_else(|| VmError::NotFound(name.into()))?;
            match &e.run {
                Some(r) => (r.vm.clone(), r.done.clone()),
                None => {
                    return Err(VmError::FailedPrecondition(format!(
                        "VM '{name}' is not running"
                    )))
                }
            }
        };
        vm.stop();
        drop(vm);
        let waited = tokio::time::timeout(STOP_TIMEOUT, done.wait_for(|d| *d)).await;
        if !matches!(waited, Ok(Ok(_))) {
            return Err(VmError::Vmm(
                name.into(),
                format!("did not stop within {} s", STOP_TIMEOUT.as_secs()),
            ));
        }
        tracing::info!(vm = %name, "stopped VM");
        self.show(name)
    }

    /// Delete a definition (stopping the VM first with `force`).
    pub async fn destroy(&self, name: &str, force: bool) -> Result<()> {
        let running = {
            let entries = self.lock();
            let e = entries
                .get(name)
                .ok_or_else(|| VmError::NotFound(name.into()))?;
            e.run.is_some() || e.starting
        };
        if running {
            if !force {
                return Err(VmError::FailedPrecondition(format!(
                    "VM '{name}' is running; stop it first or pass --force"
                )));
            }
            self.stop(name).await?;
        }
        let mut entries = self.lock();
        let Some(e) = entries.remove(name) else {
            return Err(VmError::NotFound(name.into()));
        };
        if e.run.is_some() || e.starting {
            entries.insert(name.into(), e);
            return Err(VmError::FailedPrecondition(format!(
                "VM '{name}' was started again meanwhile"
            )));
        }
        if let Err(err) = self.persist(&entries) {
            entries.insert(name.into(), e);
            return Err(err);
        }
        let _ = fs::remove_file(self.console_path(name));
        tracing::info!(vm = %name, "destroyed VM definition");
        Ok(())
    }

    /// Console output of the current or last run from `offset`.
    pub fn console(&self, name: &str, offset: u64) -> Result<proto::VmConsoleReply> {
        let running = {
            let entries = self.lock();
            let e = entries
                .get(name)
                .ok_or_else(|| VmError::NotFound(name.into()))?;
            e.run.is_some() || e.starting
        };
        let path = self.console_path(name);
        let mut data = Vec::new();
        match fs::File::open(&path) {
            Ok(mut f) => {
                let read = f
                    .seek(SeekFrom::Start(offset))
                    .and_then(|_| f.take(CONSOLE_CHUNK).read_to_end(&mut data));
                read.map_err(|e| VmError::Io(format!("console {}", path.display()), e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(VmError::Io(format!("console {}", path.display()), e)),
        }
        Ok(proto::VmConsoleReply {
            next_offset: offset + data.len() as u64,
            data,
            running,
        })
    }

    /// Stop every running VM (daemon shutdown), so their VDIs are closed before the SRs detach.
    pub async fn shutdown(&self) {
        let names: Vec<String> = {
            let entries = self.lock();
            entries
                .iter()
                .filter(|(_, e)| e.run.is_some())
                .map(|(n, _)| n.clone())
                .collect()
        };
        for n in names {
            if let Err(e) = self.stop(&n).await {
                tracing::warn!(vm = %n, error = %e, "cannot stop VM at shutdown");
            }
        }
    }

    /// Called by the watcher once the VM has stopped: record why and take the VM out of the entry.
    fn finished(&self, name: &str, vm: &Arc<Vm>, exit: VmExit) -> Option<Running> {
        let mut entries = self.lock();
        let e = entries.get_mut(name)?;
        if !e.run.as_ref().is_some_and(|r| Arc::ptr_eq(&r.vm, vm)) {
            return None;
        }
        e.last_stats = Some(vm.stats());
        e.last_exit = Some(exit);
        e.run.take()
    }
}

/// Watcher thread body: wait for the VM to stop, drop it, wait until the disk workers have let go of the
/// volumes, close them, then report `done` (what `VmStop` waits for).
fn watch_vm(
    me: Weak<VmManager>,
    name: String,
    vm: Arc<Vm>,
    devices: Vec<Arc<dyn BlockDevice>>,
    done: watch::Sender<bool>,
) {
    let exit = vm.wait();
    match &exit {
        VmExit::Failed(r) => tracing::warn!(vm = %name, reason = %r, "VM failed"),
        other => tracing::info!(vm = %name, exit = ?other, "VM stopped"),
    }
    let taken = me.upgrade().and_then(|m| m.finished(&name, &vm, exit));
    drop(taken);
    drop(vm);
    // The VM's disk workers run as tasks on a VM I/O thread; after the VM is dropped they finish
    // asynchronously. Wait until ours are the last references so "stopped" means "VDIs closed".
    let deadline = Instant::now() + Duration::from_secs(10);
    while devices.iter().any(|d| Arc::strong_count(d) > 1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if devices.iter().any(|d| Arc::strong_count(d) > 1) {
        tracing::warn!(vm = %name, "disk workers still hold volumes 10 s after the VM stopped");
    }
    drop(devices);
    let _ = done.send(true);
}

/// The `ShaleVm` gRPC service.
#[derive(Clone)]
pub struct VmService {
    vms: Arc<VmManager>,
}

impl VmService {
    /// Serve `vms`.
    pub fn new(vms: Arc<VmManager>) -> Self {
        VmService { vms }
    }

    /// The tonic server wrapper.
    pub fn into_server(self) -> proto::shale_vm_server::ShaleVmServer<VmService> {
        proto::shale_vm_server::ShaleVmServer::new(self)
    }
}

fn required(what: &str, s: &str) -> Result<String, Status> {
    let s = s.trim();
    if s.is_empty() {
        return Err(Status::invalid_argument(format!("{what} is required")));
    }
    Ok(s.to_string())
}

type Reply<T> = std::result::Result<Response<T>, Status>;

#[tonic::async_trait]
impl ShaleVm for VmService {
    async fn vm_create(&self, req: Request<proto::VmCreateRequest>) -> Reply<proto::Vm> {
        Ok(Response::new(self.vms.create(req.into_inner()).await?))
    }

    async fn vm_list(&self, _req: Request<proto::VmListRequest>) -> Reply<proto::VmListReply> {
        Ok(Response::new(proto::VmListReply {
            vms: self.vms.list(),
        }))
    }

    async fn vm_show(&self, req: Request<proto::VmRef>) -> Reply<proto::Vm> {
        let name = required("VM name", &req.into_inner().vm)?;
        Ok(Response::new(self.vms.show(&name)?))
    }

    async fn vm_start(&self, req: Request<proto::VmRef>) -> Reply<proto::Vm> {
        let name = required("VM name", &req.into_inner().vm)?;
        Ok(Response::new(self.vms.start(&name).await?))
    }

    async fn vm_stop(&self, req: Request<proto::VmStopRequest>) -> Reply<proto::Vm> {
        let name = required("VM name", &req.into_inner().vm)?;
        Ok(Response::new(self.vms.stop(&name).await?))
    }

    async fn vm_destroy(
        &self,
        req: Request<proto::VmDestroyRequest>,
    ) -> Reply<proto::VmDestroyReply> {
        let r = req.into_inner();
        let name = required("VM name", &r.vm)?;
        self.vms.destroy(&name, r.force).await?;
        Ok(Response::new(proto::VmDestroyReply { name }))
    }

    async fn vm_console(
        &self,
        req: Request<proto::VmConsoleRequest>,
    ) -> Reply<proto::VmConsoleReply> {
        let r = req.into_inner();
        let name = required("VM name", &r.vm)?;
        Ok(Response::new(self.vms.console(&name, r.offset)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(kind: &str, image: &Path, initrd: Option<&str>, no_acpi: bool) -> proto::VmBoot {
        proto::VmBoot {
            kind: kind.into(),
            image: image.display().to_string(),
            initrd: initrd.map(Into::into),
            cmdline: "console=ttyS0".into(),
            no_acpi,
        }
    }

    #[test]
    fn boot_sources_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("image");
        std::fs::write(&img, [0u8; 16]).unwrap();
        match boot_def(boot("linux", &img, None, true)).unwrap() {
            BootDef::Linux { no_acpi, .. } => assert!(no_acpi),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            boot_def(boot("flat", &img, None, false)).unwrap(),
            BootDef::Flat { .. }
        ));
        for bad in [
            boot("flat", &img, None, true),
            boot("flat", &img, Some("/x/initrd"), false),
            boot("linux", &dir.path().join("missing"), None, false),
            boot("elf", &img, None, false),
        ] {
            assert!(
                matches!(boot_def(bad.clone()), Err(VmError::InvalidArgument(_))),
                "{bad:?} accepted"
            );
        }
    }
}
