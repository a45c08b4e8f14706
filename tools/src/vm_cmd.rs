//! `shale vm ...`: VMs on the embedded KVM VMM.
//!
//! Every command but `run` is a client of the daemon's `ShaleVm` service (`sr-manager/proto/vm.proto`): the
//! daemon owns the VM, its VDIs and its console. `shale vm run` is the foreground variant and needs no daemon:
//! it runs one VM in this process with raw files as disks (`--disk-file`), prints the console as it arrives and
//! exits with the guest's exit status. It deliberately does not open SRs itself: the daemon holds an exclusive
//! lock on them, and VDIs are reached through the daemon (`shale vm create --disk VDI`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use shale_block::file::FileDevice;
use shale_block::uring::{IoEngine, IoEngineConfig};
use shale_sr::proto::{self, shale_vm_client::ShaleVmClient};
use shale_sr::size::format_size;
use shale_vmm::{BootSource, CpuidPolicy, Disk, Vm, VmConfig, VmExit};
use tonic::transport::Channel;
use tonic::Status;

use crate::cli::parse_size_arg;

/// `shale vm ...`.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Record a VM definition in the daemon (does not start it).
    Create(CreateArgs),
    /// Start a VM: the daemon opens its VDIs and runs it.
    Start {
        /// VM name.
        name: String,
    },
    /// Stop a running VM (pulls the plug) and close its VDIs.
    Stop {
        /// VM name.
        name: String,
    },
    /// List VMs.
    List,
    /// Show a VM in detail.
    Show {
        /// VM name.
        name: String,
    },
    /// Print the VM's serial console output since its last start.
    Console {
        /// VM name.
        name: String,
        /// Keep printing new output until the VM stops.
        #[arg(long, short)]
        follow: bool,
    },
    /// Delete a VM definition (its VDIs are kept).
    Destroy {
        /// VM name.
        name: String,
        /// Stop the VM first if it is running.
        #[arg(long)]
        force: bool,
    },
    /// Run a VM in the foreground, without the daemon, with raw files as disks; exits with the guest's status.
    Run(RunArgs),
}

/// What to boot: a Linux kernel or a flat binary.
#[derive(Debug, Args)]
#[group(required = true, multiple = false, id = "boot")]
pub struct BootArgs {
    /// Linux kernel (vmlinux ELF or bzImage).
    #[arg(long, value_name = "FILE", group = "boot")]
    kernel: Option<PathBuf>,
    /// Raw 64-bit flat binary, loaded and entered at 1 MiB (test guests).
    #[arg(long, value_name = "FILE", group = "boot")]
    flat: Option<PathBuf>,
}

/// Shared VM shape options.
#[derive(Debug, Args)]
pub struct ShapeArgs {
    /// Guest RAM (e.g. 512M; multiple of 4K, at least 16M).
    #[arg(long, value_parser = parse_size_arg, default_value = "512M", value_name = "SIZE")]
    memory: u64,
    /// Number of vCPUs (1..=32).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=32))]
    vcpus: u32,
    #[command(flatten)]
    boot: BootArgs,
    /// Initial ramdisk (with --kernel).
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line (with --kernel).
    #[arg(long, default_value = "console=ttyS0", requires = "kernel")]
    cmdline: String,
    /// Describe the disks to the kernel on its command line (`virtio_mmio.device=`) instead of ACPI tables
    /// (with --kernel; for kernels with VIRTIO_MMIO_CMDLINE_DEVICES and no ACPI).
    #[arg(long, requires = "kernel")]
    no_acpi: bool,
}

/// `shale vm create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Host-unique VM name.
    #[arg(long)]
    name: String,
    #[command(flatten)]
    shape: ShapeArgs,
    /// A disk: VDI or snapshot (UUID, NAME or SR/NAME), `,ro` for read-only; repeat for vdb, vdc...
    /// Snapshots are always attached read-only.
    #[arg(long = "disk", value_name = "VDI[,ro]", value_parser = parse_disk)]
    disks: Vec<(String, bool)>,
}

/// `shale vm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    shape: ShapeArgs,
    /// A raw disk image file, `,ro` for read-only; repeat for vdb, vdc...
    #[arg(long = "disk-file", value_name = "PATH[,ro]", value_parser = parse_disk)]
    disks: Vec<(String, bool)>,
    /// Stop the VM after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
}

/// `VDI[,ro]` / `PATH[,ro]`.
fn parse_disk(s: &str) -> Result<(String, bool), String> {
    let (what, ro) = match s.rsplit_once(',') {
        Some((w, "ro")) => (w, true),
        Some((w, "rw")) => (w, false),
        Some((_, opt)) => return Err(format!("unknown disk option '{opt}' (use ,ro)")),
        None => (s, false),
    };
    if what.trim().is_empty() {
        return Err("empty disk".into());
    }
    Ok((what.trim().to_string(), ro))
}

fn absolute(p: &Path) -> Result<PathBuf> {
    crate::paths::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))
}

/// The daemon's VM client on `socket`.
struct Ctx {
    client: ShaleVmClient<Channel>,
    socket: PathBuf,
    json: bool,
}

impl Ctx {
    fn status(&self, s: Status) -> anyhow::Error {
        if s.message().contains("transport") || s.code() == tonic::Code::Unimplemented {
            return anyhow!(
                "shale daemon at {}: {} (is it too old for `shale vm`?)",
                self.socket.display(),
                s.message()
            );
        }
        anyhow!("{}", s.message())
    }

    fn print<T: Serialize>(&self, v: &T, text: impl FnOnce(&T) -> String) -> Result<()> {
        let mut out = std::io::stdout().lock();
        if self.json {
            serde_json::to_writer_pretty(&mut out, v)?;
            writeln!(out)?;
        } else {
            write!(out, "{}", text(v))?;
        }
        Ok(())
    }
}

/// Run one `shale vm` command; returns the exit status.
pub async fn run(socket: Option<PathBuf>, json: bool, cmd: VmCommand) -> Result<u8> {
    if let VmCommand::Run(a) = cmd {
        return run_foreground(a).await;
    }
    let socket = socket.unwrap_or_else(crate::paths::default_socket);
    let channel = shale_sr::client::channel(&socket).await?;
    let mut ctx = Ctx {
        client: ShaleVmClient::new(channel),
        socket,
        json,
    };
    match cmd {
        VmCommand::Create(a) => {
            let boot = boot_proto(&a.shape)?;
            let req = proto::VmCreateRequest {
                name: a.name,
                memory: a.shape.memory,
                vcpus: a.shape.vcpus,
                disks: a
                    .disks
                    .into_iter()
                    .map(|(vdi, read_only)| proto::VmDiskSpec { vdi, read_only })
                    .collect(),
                boot: Some(boot),
            };
            let vm = ctx.client.vm_create(req).await.map_err(|s| ctx.status(s))?;
            ctx.print(&vm.into_inner(), |v| format!("created VM {}\n", v.name))?;
        }
        VmCommand::Start { name } => {
            let vm = ctx
                .client
                .vm_start(proto::VmRef { vm: name })
                .await
                .map_err(|s| ctx.status(s))?;
            ctx.print(&vm.into_inner(), |v| format!("started VM {}\n", v.name))?;
        }
        VmCommand::Stop { name } => {
            let vm = ctx
                .client
                .vm_stop(proto::VmStopRequest { vm: name })
                .await
                .map_err(|s| ctx.status(s))?;
            ctx.print(&vm.into_inner(), |v| format!("stopped VM {}\n", v.name))?;
        }
        VmCommand::List => {
            let list = ctx
                .client
                .vm_list(proto::VmListRequest {})
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            ctx.print(&list.vms, |vms| list_table(vms))?;
        }
        VmCommand::Show { name } => {
            let vm = ctx
                .client
                .vm_show(proto::VmRef { vm: name })
                .await
                .map_err(|s| ctx.status(s))?;
            ctx.print(&vm.into_inner(), show_text)?;
        }
        VmCommand::Destroy { name, force } => {
            let r = ctx
                .client
                .vm_destroy(proto::VmDestroyRequest { vm: name, force })
                .await
                .map_err(|s| ctx.status(s))?;
            ctx.print(&r.into_inner(), |r| format!("destroyed VM {}\n", r.name))?;
        }
        VmCommand::Console { name, follow } => console(&mut ctx, name, follow).await?,
        VmCommand::Run(_) => unreachable!("handled above"),
    }
    Ok(0)
}

/// Options that only mean something for a Linux kernel. (clap's `requires` does not see through the flattened
/// boot group, so this is checked here.)
fn check_linux_only(s: &ShapeArgs) -> Result<()> {
    if s.boot.kernel.is_none() {
        if s.initrd.is_some() {
            bail!("--initrd needs --kernel");
        }
        if s.no_acpi {
            bail!("--no-acpi needs --kernel (flat binaries get no ACPI tables)");
        }
    }
    Ok(())
}

fn boot_proto(s: &ShapeArgs) -> Result<proto::VmBoot> {
    check_linux_only(s)?;
    if let Some(k) = &s.boot.kernel {
        Ok(proto::VmBoot {
            kind: "linux".into(),
            image: absolute(k)?.display().to_string(),
            initrd: s
                .initrd
                .as_deref()
                .map(absolute)
                .transpose()?
                .map(|p| p.display().to_string()),
            cmdline: s.cmdline.clone(),
            no_acpi: s.no_acpi,
        })
    } else if let Some(f) = &s.boot.flat {
        Ok(proto::VmBoot {
            kind: "flat".into(),
            image: absolute(f)?.display().to_string(),
            initrd: None,
            cmdline: String::new(),
            no_acpi: false,
        })
    } else {
        bail!("give --kernel FILE or --flat FILE")
    }
}

async fn console(ctx: &mut Ctx, name: String, follow: bool) -> Result<()> {
    let mut offset = 0;
    let mut all = Vec::new();
    loop {
        let r = ctx
            .client
            .vm_console(proto::VmConsoleRequest {
                vm: name.clone(),
                offset,
            })
            .await
            .map_err(|s| ctx.status(s))?
            .into_inner();
        let got = !r.data.is_empty();
        offset = r.next_offset;
        if ctx.json {
            all.extend_from_slice(&r.data);
        } else {
            let mut out = std::io::stdout().lock();
            out.write_all(&r.data)?;
            out.flush()?;
        }
        if got {
            continue; // more may be waiting (replies are chunked)
        }
        if !follow || !r.running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if ctx.json {
        let v = serde_json::json!({ "vm": name, "console": String::from_utf8_lossy(&all) });
        ctx.print(&v, |_| String::new())?;
    }
    Ok(())
}

fn list_table(vms: &[proto::Vm]) -> String {
    let mut s = format!(
        "{:<20} {:<9} {:>8} {:>5} {:>5}  {}\n",
        "NAME", "STATE", "MEMORY", "VCPUS", "DISKS", "LAST EXIT"
    );
    for v in vms {
        s += &format!(
            "{:<20} {:<9} {:>8} {:>5} {:>5}  {}\n",
            v.name,
            v.state,
            format_size(v.memory),
            v.vcpus,
            v.disks.len(),
            exit_text(v)
        );
    }
    s
}

fn exit_text(v: &proto::Vm) -> String {
    match v.exit_code {
        Some(c) => format!("{} {c}", v.last_exit),
        None => v.last_exit.clone(),
    }
}

fn show_text(v: &proto::Vm) -> String {
    let mut s = format!(
        "name:      {}\nstate:     {}\nmemory:    {}\nvcpus:     {}\n",
        v.name,
        v.state,
        format_size(v.memory),
        v.vcpus
    );
    if let Some(b) = &v.boot {
        s += &format!("boot:      {} {}\n", b.kind, b.image);
        if let Some(i) = &b.initrd {
            s += &format!("initrd:    {i}\n");
        }
        if !b.cmdline.is_empty() {
            s += &format!("cmdline:   {}\n", b.cmdline);
        }
        if b.no_acpi {
            s += "acpi:      off (disks on the command line)\n";
        }
    }
    for (i, d) in v.disks.iter().enumerate() {
        let dev = format!("vd{}", (b'a' + i as u8) as char);
        s += &format!(
            "disk {dev}:  {} ({}){}\n",
            d.vdi_name,
            d.vdi_uuid,
            if d.read_only { " read-only" } else { "" }
        );
    }
    if !v.last_exit.is_empty() {
        s += &format!("last exit: {}\n", exit_text(v));
    }
    s += &format!("console:   {} bytes\n", v.console_bytes);
    if let Some(st) = &v.stats {
        s += &format!(
            "exits:     pio {} mmio {} other {}\n",
            st.pio_exits, st.mmio_exits, st.other_exits
        );
        for (i, d) in st.disks.iter().enumerate() {
            s += &format!(
                "io vd{}:    {} requests, {} read, {} written, {} invalid, {} failed\n",
                (b'a' + i as u8) as char,
                d.requests,
                format_size(d.bytes_read),
                format_size(d.bytes_written),
                d.invalid,
                d.failed
            );
        }
    }
    s
}

/// Writes console output to stdout as it arrives.
struct StdoutTee;

impl Write for StdoutTee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// `shale vm run`: one VM in this process. Exit status: the guest's exit code (debug-exit port), 0 for a guest
/// power-off or reset, 124 on `--timeout`, 130 on Ctrl-C, 1 (with an error) when the VM fails.
async fn run_foreground(a: RunArgs) -> Result<u8> {
    let s = &a.shape;
    if s.memory < (16 << 20) || !s.memory.is_multiple_of(4096) {
        bail!(
            "invalid memory size {}: must be a multiple of 4K and at least 16M",
            format_size(s.memory)
        );
    }
    check_linux_only(s)?;
    let boot = match (&s.boot.kernel, &s.boot.flat) {
        (Some(k), _) => BootSource::Linux {
            kernel: existing("kernel", k)?,
            initrd: s
                .initrd
                .as_deref()
                .map(|p| existing("initrd", p))
                .transpose()?,
            cmdline: s.cmdline.clone(),
        },
        (None, Some(f)) => BootSource::FlatBinary(existing("flat image", f)?),
        (None, None) => bail!("give --kernel FILE or --flat FILE"),
    };
    let engine = IoEngine::new(IoEngineConfig::default()).context("cannot start the I/O engine")?;
    let vcpus = u8::try_from(s.vcpus).context("invalid vCPU count")?;
    let mut cfg = VmConfig::new("run", s.memory, boot);
    cfg.vcpus = vcpus;
    cfg.acpi = !s.no_acpi;
    cfg.cpuid = CpuidPolicy::for_host();
    cfg.console_tee = Some(Box::new(StdoutTee));
    // One I/O thread serves the disks (its own io_uring ring, no cross-thread handoff per request); it lives until
    // this function returns, after the VM has stopped.
    let io = shale_block::IoThreads::new("shale-vm-io", 1).ok();
    cfg.runtime = Some(
        io.as_ref()
            .map(|t| t.handle())
            .unwrap_or_else(tokio::runtime::Handle::current),
    );
    for (path, ro) in &a.disks {
        let p = existing("disk file", Path::new(path))?;
        let dev = FileDevice::open(&p, *ro, engine.clone())
            .with_context(|| format!("cannot open disk file {}", p.display()))?;
        cfg.disks.push(Disk {
            device: Arc::new(dev),
            read_only: *ro,
            serial: p
                .file_name()
                .map(|n| n.to_string_lossy().chars().take(20).collect())
                .unwrap_or_default(),
        });
    }
    let vm = tokio::task::spawn_blocking(move || Vm::new(cfg).map(Arc::new))
        .await
        .context("VM build task")?
        .context("cannot create the VM")?;
    vm.start().context("cannot start the VM")?;
    let mut waiter = {
        let vm = vm.clone();
        tokio::task::spawn_blocking(move || vm.wait())
    };
    let timeout = async {
        match a.timeout {
            Some(t) => tokio::time::sleep(Duration::from_secs(t)).await,
            None => std::future::pending().await,
        }
    };
    let mut forced = None;
    let exit = tokio::select! {
        r = &mut waiter => r,
        _ = timeout => { forced = Some(124); vm.stop(); (&mut waiter).await }
        _ = tokio::signal::ctrl_c() => { forced = Some(130); vm.stop(); (&mut waiter).await }
    }
    .context("VM wait task")?;
    let code = match (&exit, forced) {
        (VmExit::Stopped, Some(c)) => {
            eprintln!(
                "shale: VM stopped ({})",
                if c == 124 { "timeout" } else { "interrupted" }
            );
            c
        }
        (VmExit::GuestExit(c), _) => u8::try_from(*c).unwrap_or(255),
        (VmExit::PowerOff | VmExit::Reset | VmExit::Stopped, _) => 0,
        (VmExit::TripleFault, _) => bail!("the guest triple-faulted"),
        (VmExit::Failed(r), _) => bail!("the VM failed: {r}"),
    };
    Ok(code)
}

fn existing(what: &str, p: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let abs = absolute(p)?;
    match std::fs::metadata(&abs) {
        Ok(m) if m.is_file() || m.file_type().is_block_device() => Ok(abs),
        Ok(_) => bail!("{what} {} is not a regular file", abs.display()),
        Err(e) => bail!("{what} {}: {}", abs.display(), io_short(&e)),
    }
}

fn io_short(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
