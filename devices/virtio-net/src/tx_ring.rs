//! Frames to a tap sent many per system call: each frame one `IORING_OP_WRITEV` on an io_uring,
//! a batch of them submitted and reaped by one `io_uring_enter`.
//!
//! A tap's write runs the host's receive path for the frame in the writing thread and wakes
//! whoever takes it (a socket's reader, a bridge's other port), which on a busy host preempts
//! the writer on its way back to user space: with one `writev` per frame, the transmit worker
//! measured 35,000-40,000 such preemptions a second on a 2-core host. One `io_uring_enter`
//! for a batch returns to user space once, so the wake-ups of a batch cost one switch. tun
//! takes `IOCB_NOWAIT` writes (`FMODE_NOWAIT`), so io_uring runs them inline in the submitting
//! thread, in order, and no kernel worker thread is involved.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring, Probe};
use virtio::iovec::{map_buffers, IoVec};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::{SendError, MAX_TX_BUFFERS};

/// Frames staged for one submission.
pub const TX_BATCH: usize = 32;

/// Why a frame could not be staged: it goes out another way.
#[derive(Debug, PartialEq, Eq)]
pub enum NotStaged {
    /// A buffer is not in one region of guest memory (or not in it at all), or the frame has
    /// more buffers than a staged frame holds.
    Buffers,
    /// [`TX_BATCH`] frames are staged already.
    Full,
}

/// The ring and the frames staged on it.
pub struct TxRing {
    ring: IoUring,
    fd: RawFd,
    /// [`MAX_TX_BUFFERS`] iovecs per staged frame.
    iovecs: Vec<IoVec>,
    /// Each staged frame's iovec count and length.
    frames: Vec<(usize, usize)>,
}

impl TxRing {
    /// A ring for writes to `fd`, which must outlive it. Fails where the host has no io_uring,
    /// refuses it (a sysctl, a container's seccomp filter) or lacks `writev` on it.
    pub fn new(fd: RawFd) -> io::Result<Self> {
        let ring = IoUring::new(TX_BATCH as u32)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(opcode::Writev::CODE) {
            return Err(io::Error::other("the host's io_uring has no writev"));
        }
        Ok(Self {
            ring,
            fd,
            iovecs: vec![IoVec::default(); TX_BATCH * MAX_TX_BUFFERS],
            frames: Vec::with_capacity(TX_BATCH),
        })
    }

    /// Stages the frame made of the guest-memory `buffers`, in order.
    pub fn stage(
        &mut self,
        mem: &GuestMemoryMmap,
        buffers: &[(GuestAddress, u32)],
    ) -> Result<(), NotStaged> {
        let index = self.frames.len();
        if index == TX_BATCH {
            return Err(NotStaged::Full);
        }
        let slots = &mut self.iovecs[index * MAX_TX_BUFFERS..][..MAX_TX_BUFFERS];
        let total = map_buffers(mem, buffers, slots).ok_or(NotStaged::Buffers)?;
        self.frames.push((buffers.len(), total));
        Ok(())
    }

    /// Sends the staged frames, in order, and waits for every one: when it returns the kernel
    /// reads none of their buffers any more. `refused` hears of each frame the tap did not take
    /// whole. An error of io_uring itself is returned after the frames are given up (the ring
    /// must not be used again).
    pub fn send(&mut self, refused: &mut dyn FnMut(SendError)) -> io::Result<()> {
        let count = self.frames.len();
        if count == 0 {
            return Ok(());
        }
        for (index, &(iovecs, _)) in self.frames.iter().enumerate() {
            let first = &self.iovecs[index * MAX_TX_BUFFERS..][..iovecs];
            let write =
                opcode::Writev::new(types::Fd(self.fd), IoVec::as_raw(first), iovecs as u32)
                    .build()
                    .user_data(index as u64);
            // SAFETY: the iovecs point into mappings of guest memory that the caller keeps
            // mapped until this returns (`stage` took them from the memory of the chains being
            // served, which stays mapped while they are), and `self.iovecs` is neither moved nor
            // changed before every write completed below; the fd outlives the ring.
            if unsafe { self.ring.submission().push(&write) }.is_err() {
                // The ring holds TX_BATCH entries and every earlier batch was reaped whole.
                self.frames.clear();
                return Err(io::Error::other("the submission queue is full"));
            }
        }
        let mut done = 0;
        while done < count {
            if let Err(e) = self.ring.submit_and_wait(count - done) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.frames.clear();
                return Err(e);
            }
            for cqe in self.ring.completion() {
                done += 1;
                let want = usize::try_from(cqe.user_data())
                    .ok()
                    .and_then(|index| self.frames.get(index))
                    .map_or(0, |&(_, total)| total);
                match usize::try_from(cqe.result()) {
                    Ok(sent) if sent == want => {}
                    Ok(_) => refused(SendError::Backend(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the tap took part of a frame",
                    ))),
                    Err(_) => refused(SendError::Backend(io::Error::from_raw_os_error(
                        -cqe.result(),
                    ))),
                }
            }
        }
        self.frames.clear();
        Ok(())
    }
}

impl std::fmt::Debug for TxRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxRing")
            .field("fd", &self.fd)
            .field("staged", &self.frames.len())
            .finish()
    }
}
