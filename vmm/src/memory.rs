//! Guest RAM: one memfd, mapped into the VMM and registered with KVM.
//!
//! RAM is a memfd rather than anonymous memory so that it can later be shared with another process (a migration
//! sender, a vhost-user backend) or re-mapped by a destination VMM; the VMM's own accesses go through vm-memory's
//! bounds-checked volatile accessors, so a guest-provided address can never reach host memory outside the mapping.
//!
//! RAM above [`layout::MMIO_GAP_START`] is relocated above 4 GiB so the 32-bit MMIO hole stays free for devices.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{Result, VmmError};
use crate::layout;

/// The guest memory type every part of the VMM uses.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Guest RAM and the memfd behind it.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    memfd: File,
    size: u64,
}

/// The (guest address, length) RAM ranges for `size` bytes of RAM, around the MMIO hole.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= layout::MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![
            (0, layout::MMIO_GAP_START),
            (layout::HIGH_RAM_START, size - layout::MMIO_GAP_START),
        ]
    }
}

fn memfd_create(name: &str) -> Result<File> {
    let cname =
        CString::new(name).map_err(|_| VmmError::InvalidConfig(format!("bad VM name {name:?}")))?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call; memfd_create does not keep it.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(VmmError::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create, is valid, and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

impl GuestRam {
    /// Create `size` bytes of RAM (a multiple of 4 KiB) backed by a fresh memfd named after the VM.
    pub fn new(name: &str, size: u64) -> Result<Self> {
        if size < 16 << 20 || !size.is_multiple_of(4096) {
            return Err(VmmError::InvalidConfig(format!(
                "memory must be a multiple of 4 KiB and at least 16 MiB, got {size} bytes"
            )));
        }
        let memfd = memfd_create(&format!("shale-vm-{name}"))?;
        memfd.set_len(size)?;
        let mut ranges = Vec::new();
        let mut file_off = 0u64;
        for (start, len) in ram_ranges(size) {
            let len_usize =
                usize::try_from(len).map_err(|_| VmmError::Memory("memory too large".into()))?;
            ranges.push((
                GuestAddress(start),
                len_usize,
                Some(FileOffset::new(memfd.try_clone()?, file_off)),
            ));
            file_off += len;
        }
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges)
            .map_err(|e| VmmError::Memory(e.to_string()))?;
        Ok(GuestRam { mem, memfd, size })
    }

    /// The bounds-checked view of guest memory (cheap to clone: regions are shared).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The memfd behind guest RAM, for sharing it with another process.
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Register every RAM region with the VM as a KVM memory slot.
    pub fn register(&self, vm: &VmFd) -> Result<()> {
        for (slot, region) in self.mem.iter().enumerate() {
            let host = self
                .mem
                .get_host_address(region.start_addr())
                .map_err(|e| VmmError::Memory(e.to_string()))?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region maps `memory_size` bytes at `userspace_addr` and stays mapped for the life of
            // the VM: `GuestRam` owns the mapping and is dropped only after every vCPU thread and the VM fd.
            unsafe { vm.set_user_memory_region(desc) }
                .map_err(VmmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }
}
