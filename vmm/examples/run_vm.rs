//! Run a VM from files in the foreground, console on stdout: the shape of `shale vm run`.
//!
//! ```text
//! run_vm [--memory MiB] [--vcpus N] [--disk FILE[,ro]]... [--timeout SECS] [--hide-xsave|--emulation-safe|--host-cpuid]
//!        (--kernel FILE [--initrd FILE] [--cmdline STR] | --flat FILE)
//! ```
//! Disks are raw files served by shale-block's `FileDevice` on the io_uring engine. Exits with the guest's
//! debug-exit code, 0 after a reset/power-off, 124 on timeout and 1 on failure.

use std::sync::Arc;
use std::time::Duration;

use shale_block::file::FileDevice;
use shale_block::uring::{IoEngine, IoEngineConfig};
use shale_vmm::{BootSource, CpuidPolicy, Disk, Vm, VmConfig, VmExit};

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let mut args = std::env::args().skip(1);
    let mut memory = 256u64;
    let mut vcpus = 1u8;
    let mut disks = Vec::new();
    let (mut kernel, mut initrd, mut cmdline, mut flat) = (None, None, String::new(), None);
    let mut timeout = None;
    let mut cpuid = CpuidPolicy::default();
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--memory" => memory = val().parse().unwrap_or_else(|_| usage("bad --memory")),
            "--vcpus" => vcpus = val().parse().unwrap_or_else(|_| usage("bad --vcpus")),
            "--disk" => disks.push(val()),
            "--kernel" => kernel = Some(val()),
            "--initrd" => initrd = Some(val()),
            "--cmdline" => cmdline = val(),
            "--flat" => flat = Some(val()),
            "--timeout" => timeout = Some(val().parse().unwrap_or_else(|_| usage("bad --timeout"))),
            "--hide-xsave" => cpuid.hide_xsave = true,
            "--emulation-safe" => cpuid = CpuidPolicy::emulation_safe(),
            "--host-cpuid" => cpuid = CpuidPolicy::for_host(),
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    let boot = match (kernel, flat) {
        (Some(k), None) => BootSource::Linux {
            kernel: k.into(),
            initrd: initrd.map(Into::into),
            cmdline,
        },
        (None, Some(f)) => BootSource::FlatBinary(f.into()),
        _ => usage("give exactly one of --kernel or --flat"),
    };
    let engine = IoEngine::new(IoEngineConfig::default())
        .unwrap_or_else(|e| fail(&format!("io engine: {e}")));
    let mut cfg = VmConfig::new("run-vm", memory << 20, boot);
    cfg.vcpus = vcpus;
    cfg.cpuid = cpuid;
    cfg.console_tee = Some(Box::new(std::io::stdout()));
    for (i, spec) in disks.iter().enumerate() {
        let (path, ro) = match spec.strip_suffix(",ro") {
            Some(p) => (p, true),
            None => (spec.as_str(), false),
        };
        let dev = FileDevice::open(path, ro, engine.clone())
            .unwrap_or_else(|e| fail(&format!("{path}: {e}")));
        cfg.disks.push(Disk {
            device: Arc::new(dev),
            read_only: ro,
            serial: format!("disk{i}"),
        });
    }
    let vm = Vm::new(cfg).unwrap_or_else(|e| fail(&e.to_string()));
    vm.start().unwrap_or_else(|e| fail(&e.to_string()));
    let exit = match timeout {
        Some(secs) => vm
            .wait_timeout(Duration::from_secs(secs))
            .unwrap_or_else(|| {
                vm.stop();
                eprintln!("\nrun_vm: timeout after {secs}s");
                vm.wait()
            }),
        None => vm.wait(),
    };
    eprintln!("\nrun_vm: {exit:?}; {:?}", vm.stats());
    std::process::exit(match exit {
        VmExit::GuestExit(code) => code as i32,
        VmExit::Reset | VmExit::PowerOff => 0,
        VmExit::Stopped if timeout.is_some() => 124,
        _ => 1,
    });
}

fn usage(msg: &str) -> ! {
    eprintln!("run_vm: {msg}");
    eprintln!(
        "usage: run_vm [--memory MiB] [--vcpus N] [--disk FILE[,ro]]... [--timeout SECS] [--hide-xsave|--emulation-safe|--host-cpuid] \
         (--kernel FILE [--initrd FILE] [--cmdline STR] | --flat FILE)"
    );
    std::process::exit(2)
}

fn fail(msg: &str) -> ! {
    eprintln!("run_vm: {msg}");
    std::process::exit(1)
}
