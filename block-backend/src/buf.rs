//! Page-aligned, owned I/O buffers.
//!
//! `O_DIRECT` needs the memory of every request aligned to the device's logical block size, and io_uring needs
//! the memory to stay put until the kernel completes the request, even if the caller's future is dropped. An
//! owned [`IoBuf`] satisfies both: it is allocated at [`ALIGN`] and moved into the engine for the life of the
//! request, then handed back.
//!
//! # Recycling
//! Freed buffers of up to [`POOL_MAX_BUF`] go to a small per-thread pool (power-of-two size classes) instead of
//! back to the allocator. Large aligned allocations come straight from `mmap`, so without the pool every 1 MiB
//! NBD request paid for 256 page faults, their zeroing and an `munmap` with its TLB flush: about 40 % of the
//! server's CPU on 1 MiB sequential reads. Pool memory is always initialised (it was zeroed when first
//! allocated), so handing it out again is sound; [`IoBuf::zeroed`] clears it again, and
//! [`IoBuf::for_overwrite`] skips that for callers that overwrite every byte anyway.
//!
//! A caller that got a buffer from [`IoBuf::zeroed`] and knows which bytes it wrote can hand it back with
//! [`IoBuf::recycle_zeroed`]: only those bytes are cleared, and the buffer waits in a second list of the pool for
//! the next `zeroed` of its class, which then skips clearing it. The native engine's redirect-on-write pads every
//! first small write after a snapshot to a whole zero-filled cluster; clearing 64 KiB for each was 8 % of the NBD
//! server's CPU in that phase, clearing the 4 KiB it wrote is 1/16 of that.

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::fmt;
use std::ptr::NonNull;

/// Alignment of every [`IoBuf`]: one page, enough for any logical block size `O_DIRECT` asks for.
pub const ALIGN: usize = 4096;

/// Largest buffer capacity the per-thread pool keeps.
pub const POOL_MAX_BUF: usize = 4 << 20;
/// Bytes of free buffers one thread's pool keeps per size class (but always at least [`POOL_MIN_PER_CLASS`]).
const POOL_CLASS_BYTES: usize = 8 << 20;
/// Free buffers kept per size class even when that exceeds [`POOL_CLASS_BYTES`] (a queue depth's worth of 4 MiB
/// requests).
const POOL_MIN_PER_CLASS: usize = 8;
/// Size classes: 4 KiB << i for i in 0..CLASSES, up to POOL_MAX_BUF.
const CLASSES: usize = (POOL_MAX_BUF / ALIGN).trailing_zeros() as usize + 1;

/// One thread's free buffers, by size class.
struct Pool {
    /// Buffers with unspecified (initialised) contents.
    free: [Vec<NonNull<u8>>; CLASSES],
    /// Buffers known to be zero over their whole capacity ([`IoBuf::recycle_zeroed`]).
    clean: [Vec<NonNull<u8>>; CLASSES],
}

impl Pool {
    fn class(cap: usize) -> Option<usize> {
        (cap.is_power_of_two() && (ALIGN..=POOL_MAX_BUF).contains(&cap))
            .then(|| (cap / ALIGN).trailing_zeros() as usize)
    }

    fn limit(class: usize) -> usize {
        (POOL_CLASS_BYTES / (ALIGN << class)).max(POOL_MIN_PER_CLASS)
    }

    /// Put an allocation of `cap` bytes in this thread's pool (its all-zero list when `clean`), if its class is
    /// pooled and the list has room. True when the pool took ownership of it.
    fn keep(ptr: NonNull<u8>, cap: usize, clean: bool) -> bool {
        let Some(class) = Pool::class(cap) else {
            return false;
        };
        POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            let list = if clean {
                &mut p.clean[class]
            } else {
                &mut p.free[class]
            };
            let room = list.len() < Pool::limit(class);
            if room {
                list.push(ptr);
            }
            room
        })
        .unwrap_or(false)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (class, list) in self
            .free
            .iter_mut()
            .enumerate()
            .chain(self.clean.iter_mut().enumerate())
        {
            for ptr in list.drain(..) {
                // SAFETY: every pooled pointer was allocated by `IoBuf` with the layout of its class's capacity,
                // and the pool owns it exclusively.
                unsafe { alloc::dealloc(ptr.as_ptr(), IoBuf::layout(ALIGN << class)) }
            }
        }
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool {
        free: Default::default(),
        clean: Default::default(),
    });
}

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
    /// A zero-filled buffer of `len` bytes (the capacity is rounded up to [`ALIGN`], and to a power of two for
    /// buffers the pool recycles).
    pub fn zeroed(len: usize) -> Self {
        if let Some(b) = Self::take_clean(len) {
            return b;
        }
        let (mut b, fresh) = Self::take(len);
        if !fresh {
            // Recycled memory holds earlier contents; clear all of it, so bytes revealed by `set_len` are zero
            // too. (A fresh allocation is already zero: touching it here would only fault its pages in early.)
            b.zero_from(0);
        }
        b
    }

    /// A buffer from this thread's list of all-zero buffers, if it has one of `len`'s class.
    fn take_clean(len: usize) -> Option<Self> {
        let cap = (len.div_ceil(ALIGN).max(1) * ALIGN).next_power_of_two();
        let class = Pool::class(cap)?;
        let ptr = POOL
            .try_with(|p| p.borrow_mut().clean[class].pop())
            .ok()
            .flatten()?;
        Some(IoBuf { ptr, len, cap })
    }

    /// Hand back a buffer obtained from [`IoBuf::zeroed`] in which only the bytes `dirty` were written since:
    /// they are cleared, and the buffer is kept for a later [`IoBuf::zeroed`] of its size class, which then
    /// need not clear it (see the module docs). Any other byte written since (through `as_mut_slice` after a
    /// `set_len`, a device read into it) would reappear in that later buffer: callers that cannot bound what
    /// was written just drop the buffer.
    pub fn recycle_zeroed(self, dirty: std::ops::Range<usize>) {
        let end = dirty.end.min(self.cap);
        let start = dirty.start.min(end);
        // SAFETY: ptr is valid for `cap` bytes, [start, end) lies within them, and we own the buffer.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(start), 0, end - start) };
        #[cfg(test)]
        assert!(
            // SAFETY: ptr is valid for `cap` initialised bytes and we own the buffer.
            unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.cap) }
                .iter()
                .all(|&b| b == 0),
            "recycle_zeroed: bytes outside {dirty:?} were written"
        );
        if Pool::keep(self.ptr, self.cap, true) {
            // The clean list owns the allocation now.
            std::mem::forget(self);
        }
    }

    /// Zero bytes [from, cap) of the allocation.
    fn zero_from(&mut self, from: usize) {
        let from = from.min(self.cap);
        // SAFETY: ptr is valid for `cap` bytes, [from, cap) lies within them, and `&mut self` means we own the
        // buffer exclusively.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(from), 0, self.cap - from) };
    }

    /// A buffer of `len` bytes whose contents are unspecified (zero, or whatever an earlier user of the memory
    /// wrote), for callers that overwrite all of it: socket reads of a write payload, device reads that fill the
    /// whole buffer. Never exposes another process's memory; within the process, use [`IoBuf::zeroed`] wherever
    /// bytes might reach a client without being written first.
    pub fn for_overwrite(len: usize) -> Self {
        Self::take(len).0
    }

    /// A recycled buffer for `len` bytes if this thread's pool has one (false), else a fresh zeroed one (true).
    fn take(len: usize) -> (Self, bool) {
        let cap = len.div_ceil(ALIGN).max(1) * ALIGN;
        if cap <= POOL_MAX_BUF {
            let cap = cap.next_power_of_two();
            if let Some(class) = Pool::class(cap) {
                let reused = POOL
                    .try_with(|p| p.borrow_mut().free[class].pop())
                    .ok()
                    .flatten();
                if let Some(ptr) = reused {
                    return (IoBuf { ptr, len, cap }, false);
                }
            }
            return (Self::alloc(len, cap), true);
        }
        (Self::alloc(len, cap), true)
    }

    /// A fresh zeroed allocation of `cap` bytes.
    fn alloc(len: usize, cap: usize) -> Self {
        let layout = Self::layout(cap);
        // SAFETY: `layout` has a non-zero size (cap >= ALIGN) and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuf { ptr, len, cap }
    }

    /// A buffer holding a copy of `data` (bytes past it, which `set_len` may reveal, are zero as in
    /// [`IoBuf::zeroed`]). Only the tail is cleared: zeroing the whole buffer before the copy wrote every byte
    /// twice on the per-request paths that split a write.
    pub fn from_slice(data: &[u8]) -> Self {
        let (mut b, fresh) = Self::take(data.len());
        if !fresh {
            b.zero_from(data.len());
        }
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

    /// Change the length within the capacity; new bytes keep whatever the buffer held (zero if never written
    /// since [`IoBuf::zeroed`]; unspecified for [`IoBuf::for_overwrite`] buffers).
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
        if Pool::keep(self.ptr, self.cap, false) {
            return;
        }
        // SAFETY: ptr was allocated in `alloc` with exactly this layout and is freed once (it did not go to the
        // pool).
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

    /// Recycled buffers come back zeroed from `zeroed` (over their whole capacity), keep their alignment, and
    /// `for_overwrite` may reuse the memory without clearing it.
    #[test]
    fn recycled_buffers() {
        for len in [4096, 5000, 64 << 10, 1 << 20] {
            let mut a = IoBuf::zeroed(len);
            a.as_mut_slice().fill(0xAB);
            let p = a.as_ptr();
            drop(a);
            let mut b = IoBuf::zeroed(len);
            assert_eq!(b.as_ptr(), p, "same thread, same class: reused");
            assert!(b.iter().all(|&x| x == 0));
            let cap = b.capacity();
            b.set_len(cap);
            assert!(b.iter().all(|&x| x == 0), "the whole capacity is cleared");
            b.as_mut_slice().fill(0xCD);
            drop(b);
            let c = IoBuf::for_overwrite(len);
            assert_eq!(c.as_ptr() as usize % ALIGN, 0);
            assert_eq!(c.len(), len);
        }
        // Larger than the pool keeps: freed to the allocator, still correct.
        let big = IoBuf::zeroed(POOL_MAX_BUF + 1);
        assert!(big.iter().all(|&x| x == 0));
    }

    /// The pool is bounded per class: freeing many buffers keeps at most the limit.
    #[test]
    fn pool_is_bounded() {
        let bufs: Vec<IoBuf> = (0..64).map(|_| IoBuf::zeroed(1 << 20)).collect();
        drop(bufs);
        let kept = POOL.with(|p| p.borrow().free[Pool::class(1 << 20).unwrap_or(0)].len());
        assert_eq!(kept, Pool::limit(Pool::class(1 << 20).unwrap_or(0)));
    }

    /// A buffer handed back with `recycle_zeroed` is cleared where it was written and is what the next `zeroed`
    /// of its class returns, all zero (also past `len`, which `set_len` may reveal); a dirty `for_overwrite`
    /// buffer of the same class never goes to that list.
    #[test]
    fn recycle_zeroed_keeps_buffers_clean() {
        let mut b = IoBuf::zeroed(65536);
        b.as_mut_slice()[4096..8192].fill(0x5A);
        let p = b.as_ptr();
        b.recycle_zeroed(4096..8192);
        let mut dirty = IoBuf::for_overwrite(65536);
        dirty.as_mut_slice().fill(0xFF);
        drop(dirty);
        let mut again = IoBuf::zeroed(40000);
        assert_eq!(again.as_ptr(), p, "the clean buffer is reused first");
        again.set_len(again.capacity());
        assert!(again.as_slice().iter().all(|&x| x == 0));
        // Bounded like the rest of the pool.
        let class = Pool::class(65536).unwrap_or(0);
        let bufs: Vec<IoBuf> = (0..Pool::limit(class) + 5)
            .map(|_| IoBuf::zeroed(65536))
            .collect();
        for b in bufs {
            b.recycle_zeroed(0..0);
        }
        assert_eq!(
            POOL.with(|p| p.borrow().clean[class].len()),
            Pool::limit(class)
        );
    }

    #[test]
    fn from_slice_of_a_recycled_buffer_has_a_zero_tail() {
        // Dirty a pooled buffer, recycle it, and check a shorter copy leaves nothing of it past the copy.
        let mut b = IoBuf::for_overwrite(4096);
        b.as_mut_slice().fill(0xAB);
        drop(b);
        let mut c = IoBuf::from_slice(&[1u8; 100]);
        assert_eq!(&c[..], &[1u8; 100][..]);
        c.set_len(4096);
        assert!(c[100..].iter().all(|&x| x == 0));
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
