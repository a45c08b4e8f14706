//! A VM: KVM objects, guest RAM, devices, vCPU threads, and its lifecycle.
//!
//! Lifecycle: [`Vm::new`] builds everything and loads the guest (state *created*); [`Vm::start`] spawns one
//! thread per vCPU plus a supervisor; the VM runs until the guest exits (debug-exit port, i8042 reset, triple
//! fault), fails, or [`Vm::stop`] is called. The first reason wins and is the VM's [`VmExit`]; the supervisor
//! then kicks every vCPU out of `KVM_RUN` (a real-time signal), joins the threads and publishes the exit, which
//! [`Vm::wait`] returns. Disk workers are stopped when the `Vm` is dropped.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use parking_lot::{Condvar, Mutex};
use shale_block::BlockDevice;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot::{self, BootSource};
use crate::console::Console;
use crate::cpu::{self, CpuidPolicy};
use crate::error::{Result, VmmError};
use crate::layout;
use crate::legacy::{PioAction, PioBus};
use crate::memory::{GuestMemoryMmap, GuestRam};
use crate::virtio::blk::{BlkStats, BlkStatsSnapshot, Block};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::Interrupt;

/// One guest disk.
#[derive(Clone)]
pub struct Disk {
    /// The volume (a Shale VDI, a raw file, a remote NBD volume...).
    pub device: Arc<dyn BlockDevice>,
    /// Refuse guest writes (snapshots, shared images). A device that is itself read-only is always read-only.
    pub read_only: bool,
    /// Serial string the guest reads with GET_ID (`/sys/block/vdX/serial`); at most 20 bytes are used.
    pub serial: String,
}

impl Disk {
    /// A disk with an empty serial.
    pub fn new(device: Arc<dyn BlockDevice>, read_only: bool) -> Self {
        Disk {
            device,
            read_only,
            serial: String::new(),
        }
    }
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("info", &self.device.info())
            .field("read_only", &self.read_only)
            .field("serial", &self.serial)
            .finish()
    }
}

/// Everything needed to build a VM.
pub struct VmConfig {
    /// VM name (used for the memfd and thread names).
    pub name: String,
    /// RAM in bytes (multiple of 4 KiB, at least 16 MiB).
    pub memory: u64,
    /// Number of vCPUs (1..=32).
    pub vcpus: u8,
    /// Disks, exposed as virtio-mmio virtio-blk devices in this order (`vda`, `vdb`, ...).
    pub disks: Vec<Disk>,
    /// What to boot.
    pub boot: BootSource,
    /// CPU feature policy.
    pub cpuid: CpuidPolicy,
    /// Copy console output here as it arrives (it is always kept in [`Vm::console`] too).
    pub console_tee: Option<Box<dyn Write + Send>>,
    /// Runtime for the disk workers; when `None` the VM creates a one-thread runtime of its own. The daemon
    /// passes its runtime so disk I/O shares its io_uring engine threads and timers.
    pub runtime: Option<tokio::runtime::Handle>,
    /// Describe the vCPUs, IOAPIC and disks to Linux in ACPI tables (the only way distribution kernels find
    /// virtio-mmio disks; see [`crate::acpi`]). When off, the disks go on the command line as
    /// `virtio_mmio.device=` entries instead, for kernels built without ACPI (both at once would make kernels
    /// that understand both register every disk twice).
    pub acpi: bool,
}

impl VmConfig {
    /// A config with defaults: 1 vCPU, no disks, default CPUID policy, no console tee, own runtime.
    pub fn new(name: impl Into<String>, memory: u64, boot: BootSource) -> Self {
        VmConfig {
            name: name.into(),
            memory,
            vcpus: 1,
            disks: Vec::new(),
            boot,
            cpuid: CpuidPolicy::default(),
            console_tee: None,
            runtime: None,
            acpi: true,
        }
    }
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("name", &self.name)
            .field("memory", &self.memory)
            .field("vcpus", &self.vcpus)
            .field("disks", &self.disks)
            .field("boot", &self.boot)
            .finish()
    }
}

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote this code to the debug-exit port ([`layout::DEBUG_EXIT_PORT`]).
    GuestExit(u32),
    /// The guest asked for a reset (i8042 reset line, or KVM system reset event). Shale does not reboot in
    /// place; the daemon decides whether to start the VM again.
    Reset,
    /// The guest asked to power off (KVM system shutdown event).
    PowerOff,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// [`Vm::stop`] was called.
    Stopped,
    /// KVM reported an error we cannot continue from (entry failure, internal error, unexpected exit).
    Failed(String),
}

/// The VM's lifecycle state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    /// Built, not started.
    Created,
    /// vCPUs running.
    Running,
    /// Stopped, with the reason.
    Exited(VmExit),
}

/// Counters of vCPU exits that reached the VMM (exits handled inside KVM, such as ioeventfd writes, are not
/// seen here).
#[derive(Debug, Default)]
struct ExitCounters {
    pio: AtomicU64,
    mmio: AtomicU64,
    other: AtomicU64,
}

/// A snapshot of the VM's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmStats {
    /// Port-I/O exits handled by the VMM (serial, debug port, ...).
    pub pio_exits: u64,
    /// MMIO exits handled by the VMM (virtio-mmio register accesses other than queue notifications).
    pub mmio_exits: u64,
    /// Other exits returned to the VMM (signals, ...).
    pub other_exits: u64,
    /// Per-disk counters, in disk order.
    pub disks: Vec<BlkStatsSnapshot>,
}

struct Shared {
    name: String,
    pio: PioBus,
    mmio: Vec<Mutex<MmioTransport>>,
    stop: AtomicBool,
    exit: Mutex<Option<VmExit>>,
    /// Signalled when `exit` is set (the supervisor waits on it).
    exit_cond: Condvar,
    state: Mutex<VmState>,
    /// Signalled when `state` changes (`Vm::wait` waits on it).
    state_cond: Condvar,
    exits: ExitCounters,
}

impl Shared {
    /// Record why the VM stops (the first reason wins) and ask every vCPU to stop.
    fn finish(&self, why: VmExit) {
        let mut e = self.exit.lock();
        if e.is_none() {
            tracing::info!(vm = %self.name, exit = ?why, "VM stopping");
            *e = Some(why);
        }
        self.stop.store(true, Ordering::SeqCst);
        drop(e);
        self.exit_cond.notify_all();
    }

    fn mmio_index(addr: u64) -> Option<(usize, u64)> {
        let off = addr.checked_sub(layout::VIRTIO_MMIO_BASE)?;
        let idx = usize::try_from(off / layout::VIRTIO_MMIO_SIZE).ok()?;
        Some((idx, off % layout::VIRTIO_MMIO_SIZE))
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match Self::mmio_index(addr).and_then(|(i, off)| Some((self.mmio.get(i)?, off))) {
            Some((t, off)) => t.lock().read(off, data),
            None => {
                tracing::trace!(addr, "read from unmapped MMIO");
                data.fill(0xff);
            }
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        match Self::mmio_index(addr).and_then(|(i, off)| Some((self.mmio.get(i)?, off))) {
            Some((t, off)) => t.lock().write(off, data),
            None => tracing::trace!(addr, "write to unmapped MMIO ignored"),
        }
    }
}

/// Signal used to kick vCPU threads out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN() + 1
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), noop_handler) {
            result = Err(VmmError::Io(std::io::Error::from_raw_os_error(e.errno())));
        }
    });
    result
}

/// A virtual machine.
pub struct Vm {
    shared: Arc<Shared>,
    vcpus: Mutex<Vec<VcpuFd>>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
    console: Arc<Console>,
    disk_stats: Vec<Arc<BlkStats>>,
    runtime: Option<tokio::runtime::Runtime>,
    // Dropped last: the VM fd and guest RAM must outlive every vCPU thread and disk worker.
    _vm: VmFd,
    _kvm: Kvm,
    ram: GuestRam,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.shared.name)
            .field("state", &*self.shared.state.lock())
            .finish()
    }
}

impl Vm {
    /// Build a VM from `config`: KVM VM with in-kernel irqchip and PIT, guest RAM, serial console, one
    /// virtio-mmio virtio-blk device per disk, and the guest image loaded. Nothing runs until [`Vm::start`].
    pub fn new(config: VmConfig) -> Result<Self> {
        let VmConfig {
            name,
            memory,
            vcpus,
            disks,
            boot: source,
            cpuid: policy,
            console_tee,
            runtime,
            acpi,
        } = config;
        if vcpus == 0 || vcpus > 32 {
            return Err(VmmError::InvalidConfig(format!(
                "vcpus must be 1..=32, got {vcpus}"
            )));
        }
        if disks.len() > layout::MAX_VIRTIO_DEVICES {
            return Err(VmmError::InvalidConfig(format!(
                "at most {} disks",
                layout::MAX_VIRTIO_DEVICES
            )));
        }
        install_kick_handler()?;
        let kvm = Kvm::new().map_err(VmmError::KvmUnavailable)?;
        let vm = kvm.create_vm().map_err(VmmError::kvm("KVM_CREATE_VM"))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(VmmError::kvm("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(VmmError::kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(VmmError::kvm("KVM_CREATE_PIT2"))?;

        let ram = GuestRam::new(&name, memory)?;
        ram.register(&vm)?;
        let mem = ram.memory().clone();

        let console = Console::new(console_tee);
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)
            .map_err(VmmError::kvm("KVM_IRQFD (serial)"))?;
        let pio = PioBus::new(console.clone(), serial_irq)?;

        let (own_runtime, handle) = match runtime {
            Some(h) => (None, h),
            None => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name(format!("vm-{name}-io"))
                    .enable_all()
                    .build()?;
                let h = rt.handle().clone();
                (Some(rt), h)
            }
        };

        let mut transports = Vec::new();
        let mut disk_stats = Vec::new();
        let mut virtio_cmdline = String::new();
        let mut mmio_devices = Vec::new();
        for (i, disk) in disks.iter().enumerate() {
            let base = layout::VIRTIO_MMIO_BASE + i as u64 * layout::VIRTIO_MMIO_SIZE;
            let gsi = layout::VIRTIO_IRQ_BASE + i as u32;
            let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
            vm.register_irqfd(&irqfd, gsi)
                .map_err(VmmError::kvm("KVM_IRQFD (virtio)"))?;
            let notifier = EventFd::new(libc::EFD_NONBLOCK)?;
            vm.register_ioevent(
                &notifier,
                &IoEventAddress::Mmio(base + crate::virtio::mmio::reg::QUEUE_NOTIFY),
                0u32,
            )
            .map_err(VmmError::kvm("KVM_IOEVENTFD"))?;
            let block = Block::new(
                disk.device.clone(),
                disk.read_only,
                &disk.serial,
                handle.clone(),
            );
            disk_stats.push(block.stats());
            let t = MmioTransport::new(
                Box::new(block),
                mem.clone(),
                Arc::new(Interrupt::new(irqfd)),
                vec![notifier],
            )
            .map_err(VmmError::InvalidConfig)?;
            transports.push(Mutex::new(t));
            virtio_cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
            mmio_devices.push(crate::acpi::MmioDevice {
                base,
                size: layout::VIRTIO_MMIO_SIZE,
                gsi,
            });
        }

        boot::write_boot_tables(&mem)?;
        let ioapic_id = boot::write_mptable(&mem, vcpus)?;
        let rsdp = if acpi {
            Some(crate::acpi::write(&mem, vcpus, ioapic_id, &mmio_devices)?)
        } else {
            None
        };
        let entry = match &source {
            BootSource::FlatBinary(path) => boot::load_flat(&mem, path, memory)?,
            BootSource::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                let mut cmd = cmdline.trim().to_string();
                if !cmd.split_whitespace().any(|w| w.starts_with("console=")) {
                    cmd.push_str(" console=ttyS0");
                }
                if !acpi {
                    cmd.push_str(&virtio_cmdline);
                }
                boot::load_linux(&mem, memory, kernel, initrd.as_deref(), cmd.trim(), rsdp)?
            }
        };

        let mut vcpu_fds = Vec::new();
        for id in 0..vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(VmmError::kvm("KVM_CREATE_VCPU"))?;
            cpu::setup_common(&kvm, &vcpu, id, vcpus, policy)?;
            if id == 0 {
                cpu::setup_long_mode(&vcpu, entry.rip, entry.rsp, entry.rsi, entry.rdi)?;
            }
            vcpu_fds.push(vcpu);
        }

        let shared = Arc::new(Shared {
            name,
            pio,
            mmio: transports,
            stop: AtomicBool::new(false),
            exit: Mutex::new(None),
            exit_cond: Condvar::new(),
            state: Mutex::new(VmState::Created),
            state_cond: Condvar::new(),
            exits: ExitCounters::default(),
        });
        Ok(Vm {
            shared,
            vcpus: Mutex::new(vcpu_fds),
            supervisor: Mutex::new(None),
            console,
            disk_stats,
            runtime: own_runtime,
            _vm: vm,
            _kvm: kvm,
            ram,
        })
    }

    /// Build, start, and wait for the VM to stop (`shale vm run` in the foreground).
    pub fn run(config: VmConfig) -> Result<VmExit> {
        let vm = Vm::new(config)?;
        vm.start()?;
        Ok(vm.wait())
    }

    /// Start the vCPU threads. Takes `&self` so a daemon can keep VMs in an `Arc` and start, stop and watch
    /// them from different tasks.
    pub fn start(&self) -> Result<()> {
        let mut vcpus = self.vcpus.lock();
        if vcpus.is_empty() || *self.shared.state.lock() != VmState::Created {
            return Err(VmmError::State("VM was already started or stopped"));
        }
        let mut threads = Vec::new();
        let mut spawn_error = None;
        for (id, vcpu) in vcpus.drain(..).enumerate() {
            let shared = self.shared.clone();
            match std::thread::Builder::new()
                .name(format!("vm-{}-vcpu{id}", self.shared.name))
                .spawn(move || vcpu_loop(vcpu, id, shared))
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // Stop what started; the supervisor below still joins it and publishes the failure.
                    self.shared
                        .finish(VmExit::Failed(format!("starting vCPU {id}: {e}")));
                    spawn_error = Some(e);
                    break;
                }
            }
        }
        *self.shared.state.lock() = VmState::Running;
        let shared = self.shared.clone();
        *self.supervisor.lock() = Some(
            std::thread::Builder::new()
                .name(format!("vm-{}-sup", self.shared.name))
                .spawn(move || supervise(threads, shared))?,
        );
        match spawn_error {
            Some(e) => Err(VmmError::Io(e)),
            None => Ok(()),
        }
    }

    /// Ask the VM to stop (non-blocking); [`Vm::wait`] returns once every vCPU has left the guest. The exit
    /// reason is [`VmExit::Stopped`] unless the guest had already stopped for another reason.
    pub fn stop(&self) {
        {
            let mut st = self.shared.state.lock();
            if *st == VmState::Created {
                *st = VmState::Exited(VmExit::Stopped);
                self.shared.state_cond.notify_all();
                return;
            }
        }
        self.shared.finish(VmExit::Stopped);
    }

    /// Block until the VM has stopped and return why.
    pub fn wait(&self) -> VmExit {
        let mut st = self.shared.state.lock();
        loop {
            if let VmState::Exited(e) = &*st {
                return e.clone();
            }
            self.shared.state_cond.wait(&mut st);
        }
    }

    /// Like [`Vm::wait`], giving up after `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.state.lock();
        loop {
            if let VmState::Exited(e) = &*st {
                return Some(e.clone());
            }
            if self
                .shared
                .state_cond
                .wait_until(&mut st, deadline)
                .timed_out()
            {
                return None;
            }
        }
    }

    /// Current lifecycle state.
    pub fn state(&self) -> VmState {
        self.shared.state.lock().clone()
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The serial console (output buffer, waiting for text).
    pub fn console(&self) -> Arc<Console> {
        self.console.clone()
    }

    /// Type into the serial console; returns how many bytes the UART accepted.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        self.shared.pio.serial_input(bytes)
    }

    /// Guest memory (tests, debugging, migration).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        self.ram.memory()
    }

    /// The memfd backing guest RAM.
    pub fn memfd(&self) -> &std::fs::File {
        self.ram.memfd()
    }

    /// Exit and per-disk counters.
    pub fn stats(&self) -> VmStats {
        let e = &self.shared.exits;
        VmStats {
            pio_exits: e.pio.load(Ordering::Relaxed),
            mmio_exits: e.mmio.load(Ordering::Relaxed),
            other_exits: e.other.load(Ordering::Relaxed),
            disks: self.disk_stats.iter().map(|s| s.snapshot()).collect(),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(s) = self.supervisor.lock().take() {
            self.shared.finish(VmExit::Stopped);
            let _ = s.join();
        }
        // Reset every device so disk workers stop before the runtime goes away.
        for t in &self.shared.mmio {
            t.lock().reset();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Wait for a stop request, kick the vCPUs out of the guest until they have all left, join them, publish.
fn supervise(threads: Vec<JoinHandle<()>>, shared: Arc<Shared>) {
    {
        let mut e = shared.exit.lock();
        while e.is_none() {
            shared.exit_cond.wait(&mut e);
        }
    }
    let sig = kick_signal();
    while threads.iter().any(|t| !t.is_finished()) {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            // An unjoined thread's pthread_t stays valid, so signalling is sound even if it just finished.
            if let Err(e) = t.kill(sig) {
                tracing::debug!(error = %e, "kicking a vCPU failed");
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for t in threads {
        let _ = t.join();
    }
    let exit = shared.exit.lock().clone().unwrap_or(VmExit::Stopped);
    *shared.state.lock() = VmState::Exited(exit);
    shared.state_cond.notify_all();
}

fn vcpu_loop(mut vcpu: VcpuFd, id: usize, shared: Arc<Shared>) {
    let why = loop {
        if shared.stop.load(Ordering::SeqCst) {
            break None;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                shared.exits.pio.fetch_add(1, Ordering::Relaxed);
                match shared.pio.write(port, data) {
                    PioAction::None => {}
                    PioAction::Reset => break Some(VmExit::Reset),
                    PioAction::Exit(code) => break Some(VmExit::GuestExit(code)),
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                shared.exits.pio.fetch_add(1, Ordering::Relaxed);
                shared.pio.read(port, data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                shared.exits.mmio.fetch_add(1, Ordering::Relaxed);
                shared.mmio_read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                shared.exits.mmio.fetch_add(1, Ordering::Relaxed);
                shared.mmio_write(addr, data);
            }
            Ok(VcpuExit::Shutdown) => break Some(VmExit::TripleFault),
            Ok(VcpuExit::SystemEvent(type_, _)) => {
                break Some(match type_ {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                    other => VmExit::Failed(format!("KVM system event {other}")),
                })
            }
            Ok(VcpuExit::Hlt) => {
                break Some(VmExit::Failed(
                    "vCPU halted without an in-kernel irqchip".into(),
                ))
            }
            Ok(VcpuExit::Intr) => {
                shared.exits.other.fetch_add(1, Ordering::Relaxed);
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                break Some(VmExit::Failed(format!(
                    "KVM entry failed: reason {reason:#x} on cpu {cpu}"
                )))
            }
            Ok(VcpuExit::InternalError) => {
                let regs = vcpu
                    .get_regs()
                    .map(|r| format!("rip={:#x}", r.rip))
                    .unwrap_or_default();
                break Some(VmExit::Failed(format!(
                    "KVM internal error on vCPU {id} ({regs})"
                )));
            }
            Ok(other) => {
                break Some(VmExit::Failed(format!(
                    "unexpected exit on vCPU {id}: {other:?}"
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                shared.exits.other.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => break Some(VmExit::Failed(format!("KVM_RUN on vCPU {id}: {e}"))),
        }
    };
    if let Some(why) = why {
        shared.finish(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon keeps VMs in shared maps and moves them across tasks.
    #[test]
    fn vm_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Vm>();
        fn check_send<T: Send>() {}
        check_send::<VmConfig>();
    }
}
