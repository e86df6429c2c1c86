//! `struct iovec` (readv(2), writev(2), io_uring's vectored operations) for guest buffers that a
//! device keeps between two system calls: devices move between threads, which a raw pointer
//! would forbid.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// One iovec, laid out as `struct iovec` (checked below), in a type that is `Send`: a host
/// address (in a mapping of guest memory) and a length.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoVec {
    /// The host address of the buffer's first byte.
    pub base: usize,
    /// The buffer's length in bytes.
    pub len: usize,
}

const _: () = assert!(
    std::mem::size_of::<IoVec>() == std::mem::size_of::<libc::iovec>()
        && std::mem::align_of::<IoVec>() == std::mem::align_of::<libc::iovec>()
);

impl IoVec {
    /// `iovecs` as the `struct iovec` array a system call takes.
    pub fn as_raw(iovecs: &[IoVec]) -> *const libc::iovec {
        iovecs.as_ptr().cast()
    }
}

/// Fills the start of `out` with the iovecs of the guest-memory `buffers`, in order, and
/// returns the bytes they hold; `None` when a buffer is not all in one region of guest memory
/// or `out` is too short for them (the caller then copies, or refuses the buffers).
pub fn map_buffers(
    mem: &GuestMemoryMmap,
    buffers: &[(GuestAddress, u32)],
    out: &mut [IoVec],
) -> Option<usize> {
    let slots = out.get_mut(..buffers.len())?;
    let mut total = 0usize;
    for (slot, &(addr, len)) in slots.iter_mut().zip(buffers) {
        let slice = mem.get_slice(addr, len as usize).ok()?;
        *slot = IoVec {
            base: slice.ptr_guard_mut().as_ptr() as usize,
            len: slice.len(),
        };
        total += slice.len();
    }
    Some(total)
}
