//! Page-aligned, owned I/O buffers.
//!
//! `O_DIRECT` needs the memory of every request aligned to the device's logical block size, and io_uring needs
//! the memory to stay put until the kernel completes the request, even if the caller's future is dropped. An
//! owned [`IoBuf`] satisfies both: it is allocated at [`ALIGN`] and moved into the engine for the life of the
//! request, then handed back.

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;

/// Alignment of every [`IoBuf`]: one page, enough for any logical block size `O_DIRECT` asks for.
pub const ALIGN: usize = 4096;

/// An owned, zero-initialised, page-aligned byte buffer with a fixed length.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: `IoBuf` uniquely owns its allocation (like `Vec<u8>`), so moving it across threads is sound.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only allow reads of initialised memory.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes (the capacity is rounded up to [`ALIGN`]).
    pub fn zeroed(len: usize) -> Self {
        let cap = len.div_ceil(ALIGN).max(1) * ALIGN;
        let layout = Self::layout(cap);
        // SAFETY: `layout` has a non-zero size (cap >= ALIGN) and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuf { ptr, len, cap }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    fn layout(cap: usize) -> Layout {
        // The size is a non-zero multiple of ALIGN and ALIGN is a power of two, so this cannot fail unless the
        // size overflows isize, which alloc would refuse anyway.
        Layout::from_size_align(cap, ALIGN)
            .unwrap_or_else(|_| panic!("IoBuf of {cap} bytes is too large"))
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Allocated capacity (a multiple of [`ALIGN`]); [`IoBuf::set_len`] may grow up to it.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Change the length within the capacity; new bytes keep whatever the buffer held (zero if never written).
    ///
    /// # Panics
    /// If `len` exceeds the capacity: a programming error, never caused by input.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "IoBuf::set_len({len}) beyond capacity {}",
            self.cap
        );
        self.len = len;
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for `cap >= len` initialised bytes (alloc_zeroed) and we hold `&self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for `cap >= len` initialised bytes and we hold `&mut self`, so no aliasing.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for handing to the kernel; valid until the buffer is dropped.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Raw mutable pointer for handing to the kernel; valid until the buffer is dropped.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated in `zeroed` with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

impl Clone for IoBuf {
    fn clone(&self) -> Self {
        Self::from_slice(self.as_slice())
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len).finish()
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 511, 4096, 4097, 1 << 20] {
            let b = IoBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            assert!(b.capacity() >= len && b.capacity().is_multiple_of(ALIGN));
        }
    }

    #[test]
    fn from_slice_and_resize() {
        let mut b = IoBuf::from_slice(b"hello");
        assert_eq!(&b[..], b"hello");
        b.set_len(3);
        assert_eq!(&b[..], b"hel");
        b.set_len(5);
        assert_eq!(&b[..], b"hello");
        let c = b.clone();
        assert_eq!(&c[..], b"hello");
    }
}
