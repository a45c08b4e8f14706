//! The VMM's error enum: what went wrong creating or running a VM, in terms an operator can act on.

use std::io;

/// Result alias for the VMM.
pub type Result<T, E = VmmError> = std::result::Result<T, E>;

/// Why a VM could not be created, booted or run.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// `/dev/kvm` is missing or unusable (no permission, no KVM module).
    #[error("KVM is not available: {0}")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed while setting up or running the VM.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The operation that failed.
        what: &'static str,
        /// The errno from the kernel.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The requested configuration cannot be built (memory size, too many disks, bad command line...).
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    /// Guest memory could not be created or mapped.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The kernel, initrd or flat binary could not be loaded into guest memory.
    #[error("loading the guest image: {0}")]
    Load(String),
    /// A host I/O error (memfd, eventfd, threads, image files).
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The VM was already started, or has already stopped.
    #[error("VM is in the wrong state: {0}")]
    State(&'static str),
}

impl VmmError {
    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
        move |source| VmmError::Kvm { what, source }
    }
}
