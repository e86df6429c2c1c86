//! Reads, writes and flushes through `io_uring` (io_uring(7)): many requests in flight per
//! disk, submitted in one system call per wake-up and completed in batches.
//!
//! A request takes this path only when [`plan_request`] finds it well formed: `T_IN`, `T_OUT`
//! or `T_FLUSH` with a whole number of sectors inside the disk, buffers inside guest memory and
//! a status byte. Everything else (other request types, malformed or out-of-range requests, a
//! read-only disk's writes) goes through the synchronous path, so it gets exactly the errors and
//! log lines it always got.
//!
//! A read or write is one `readv`/`writev` on iovecs that point straight into guest memory (no
//! bounce buffer); its slot keeps the iovec array and a handle on the guest memory mapping until
//! the kernel posts the completion. A write that finds nothing in flight is instead one
//! `pwritev` on the worker's thread, from the same iovecs: buffered writes on ext4 cannot be
//! done without blocking, so io_uring would hand it to an io-wq worker and back. A flush is an
//! `fsync` (`IORING_FSYNC_DATASYNC`) submitted like any other request: it covers every write
//! the driver has seen complete, as a flush must
//! (virtio 1.2 section 5.2.6; Linux sends its flush only after the writes it covers have
//! completed), because a write completes to the driver only once the kernel has finished it. It
//! is not drained (`IOSQE_IO_DRAIN` would hold every request behind it, and the flush behind
//! every request before it, until the fsync returns: reads stalled for the length of a disk
//! flush; the bench's `mixed` test measured half the reads with it). A short transfer
//! is resubmitted for the rest. Completions arrive on an eventfd registered with the ring, which
//! the device worker watches; the status byte and the used entry are written then.
//!
//! A device reset waits for the requests in flight (the device must not touch guest memory
//! after a reset, 2.4), up to [`RESET_WAIT`]; a completion that arrives later still frees its
//! slot but is not reported to the driver.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring, Probe};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{request, status, Disk, MAX_DESCRIPTORS, MAX_REQUEST_BYTES, QUEUE_SIZE, SECTOR_SIZE};
use virtio::iovec::IoVec;
use virtio::queue::{Chain, ErrorLog};

/// How long a reset waits for the requests in flight.
pub const RESET_WAIT: Duration = Duration::from_secs(30);
/// `IOV_MAX`: the most iovecs one `readv`/`writev` takes.
const IOV_MAX: usize = 1024;
/// The largest iovec array kept for reuse when its request finishes.
const SPARE_IOVECS_CAPACITY: usize = 64;

/// What a planned request asks of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `T_IN`: read into the data buffers.
    Read,
    /// `T_OUT`: write the data buffers.
    Write,
    /// `T_FLUSH`: make the completed writes durable.
    Flush,
}

/// A well-formed request, ready to hand to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The operation.
    pub op: Op,
    /// Byte offset in the image (0 for a flush).
    pub offset: u64,
    /// The data buffers in guest memory, in order; empty for a flush.
    pub data: Vec<(GuestAddress, usize)>,
    /// The bytes the data buffers hold together.
    pub len: usize,
    /// Where the status byte goes: the last device-writable byte of the chain.
    pub status: GuestAddress,
    /// The used length once the request succeeds: the bytes written into the chain.
    pub used: u32,
}

/// Buffers in guest memory: (address, length) pairs.
type Buffers = Vec<(GuestAddress, usize)>;

/// The non-empty buffers of `chain`, device-readable and device-writable, as (address,
/// length) pairs in chain order, from one walk of the chain. `None` past [`MAX_DESCRIPTORS`].
fn buffers(chain: &Chain<'_>) -> Option<(Buffers, Buffers)> {
    // A read is usually header | data, status; a write header, data | status.
    let (mut readable, mut writable) = (Vec::with_capacity(4), Vec::with_capacity(4));
    for (i, desc) in chain.clone().enumerate() {
        if i >= MAX_DESCRIPTORS {
            return None;
        }
        if desc.len() == 0 {
            continue;
        }
        let side = if desc.is_write_only() {
            &mut writable
        } else {
            &mut readable
        };
        side.push((desc.addr(), desc.len() as usize));
    }
    Some((readable, writable))
}

/// Keeps the first `n` bytes of `buffers`, in place; `false` if they hold fewer.
fn truncate(buffers: &mut Buffers, mut n: usize) -> bool {
    let mut keep = 0;
    for (_, len) in buffers.iter_mut() {
        if n == 0 {
            break;
        }
        *len = (*len).min(n);
        n -= *len;
        keep += 1;
    }
    buffers.truncate(keep);
    n == 0
}

/// Drops the first `n` bytes of `buffers`, in place.
fn skip(buffers: &mut Buffers, mut n: usize) {
    let whole = buffers
        .iter()
        .take_while(|&&(_, len)| {
            let whole = n >= len;
            if whole {
                n -= len;
            }
            whole
        })
        .count();
    buffers.drain(..whole);
    if let Some((addr, len)) = buffers.first_mut().filter(|_| n > 0) {
        // `n < len` and `addr + len` lies in guest memory (checked by the caller): no overflow.
        *addr = GuestAddress(addr.0 + n as u64);
        *len -= n;
    }
}

/// Decides whether `chain` can go to the kernel as it is, and how: see the module
/// documentation. `None` sends it down the synchronous path, which handles (and reports) every
/// case this one leaves out. Reads only the 16-byte header from guest memory.
pub fn plan_request(chain: &Chain<'_>, sectors: u64, read_only: bool) -> Option<Plan> {
    let mem = chain.memory();
    let (readable, writable) = buffers(chain)?;
    let total = readable
        .iter()
        .chain(&writable)
        .try_fold(0usize, |sum, &(_, len)| sum.checked_add(len))?;
    if total > MAX_REQUEST_BYTES {
        return None;
    }
    // Every buffer must lie in guest memory (the synchronous path answers IOERR otherwise).
    for &(addr, len) in readable.iter().chain(&writable) {
        if !in_guest(mem, addr, len) {
            return None;
        }
    }
    let mut header = [0u8; 16];
    let mut at = 0;
    for &(addr, len) in &readable {
        if at == header.len() {
            break;
        }
        let part = len.min(header.len() - at);
        read_guest(mem, addr, &mut header[at..at + part])?;
        at += part;
    }
    if at < header.len() {
        return None;
    }
    let (kind, sector) = crate::parse_header(&header);
    let writable_len: usize = writable.iter().map(|&(_, len)| len).sum();
    let &(last, last_len) = writable.last()?;
    let status = GuestAddress(last.0 + last_len as u64 - 1);
    // The data buffers are the writable ones but the status byte, or the readable ones after
    // the header.
    let (op, data) = match kind {
        request::IN => {
            let mut data = writable;
            truncate(&mut data, writable_len - 1).then_some((Op::Read, data))?
        }
        request::OUT if !read_only => {
            let mut data = readable;
            skip(&mut data, header.len());
            (Op::Write, data)
        }
        request::FLUSH => (Op::Flush, Vec::new()),
        _ => return None,
    };
    let len: usize = data.iter().map(|&(_, len)| len).sum();
    let offset = if op == Op::Flush {
        0
    } else {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len as u64)?;
        if len == 0 || !(len as u64).is_multiple_of(SECTOR_SIZE) || end > sectors * SECTOR_SIZE {
            return None;
        }
        offset
    };
    let used = if op == Op::Read { len + 1 } else { 1 };
    Some(Plan {
        op,
        offset,
        data,
        len,
        status,
        used: u32::try_from(used).ok()?,
    })
}

/// Fills `out` with the iovecs of `data` in guest memory (a buffer that spans two memory regions
/// becomes two); `false` if a buffer is not all guest memory or there are too many.
fn fill_iovecs(
    mem: &GuestMemoryMmap,
    data: &[(GuestAddress, usize)],
    out: &mut Vec<IoVec>,
) -> bool {
    out.clear();
    for &(addr, len) in data {
        if let Ok(slice) = mem.get_slice(addr, len) {
            out.push(IoVec {
                base: slice.ptr_guard_mut().as_ptr() as usize,
                len,
            });
            continue;
        }
        for slice in mem.get_slices(addr, len) {
            let Ok(slice) = slice else {
                return false;
            };
            out.push(IoVec {
                base: slice.ptr_guard_mut().as_ptr() as usize,
                len: slice.len(),
            });
        }
    }
    out.len() <= IOV_MAX
}

/// Whether `a` and `b` map the same guest memory: the same regions at the same host
/// addresses. While one of them is alive its mappings are, so no other mapping can sit at
/// those addresses: equal regions are the same mmaps.
fn same_mapping(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> bool {
    let host = |r: &vm_memory::GuestRegionMmap| r.get_host_address(MemoryRegionAddress(0)).ok();
    a.num_regions() == b.num_regions()
        && a.iter().zip(b.iter()).all(|(x, y)| {
            x.start_addr() == y.start_addr() && x.len() == y.len() && host(x) == host(y)
        })
}

// Guest memory on the request path. vm-memory's `Bytes` methods walk a slice iterator on every
// access, which costs more than the few bytes of a header or a status move; a range inside one
// region (every buffer but one that straddles two regions) goes through that region's slice, the
// rest through the region-crossing methods.

/// Whether `len` bytes at `addr` are all guest memory.
fn in_guest(mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) -> bool {
    mem.get_slice(addr, len).is_ok() || mem.check_range(addr, len)
}

/// Fills `buf` from guest memory at `addr`; `None` if the range is not all guest memory.
fn read_guest(mem: &GuestMemoryMmap, addr: GuestAddress, buf: &mut [u8]) -> Option<()> {
    match mem.get_slice(addr, buf.len()) {
        Ok(slice) => (slice.copy_to(buf) == buf.len()).then_some(()),
        Err(_) => mem.read_slice(buf, addr).ok(),
    }
}

/// Writes one byte of guest memory at an address already checked to be guest memory (one
/// outside it is left alone).
fn write_guest_byte(mem: &GuestMemoryMmap, addr: GuestAddress, value: u8) {
    if let Ok(slice) = mem.get_slice(addr, 1) {
        slice.copy_from(&[value]);
    }
}

/// Ends a request: writes its status byte at `at` (checked against `mem` when the request was
/// planned) and returns its used length, `used` when it succeeded and the status byte alone
/// when it failed.
fn report(mem: &GuestMemoryMmap, at: GuestAddress, used: u32, status: u8) -> u32 {
    write_guest_byte(mem, at, status);
    if status == status::OK {
        used
    } else {
        1
    }
}

/// Drops the first `n` bytes of `iovecs` (after a short transfer).
fn advance(iovecs: &mut Vec<IoVec>, mut n: usize) {
    let whole = iovecs.iter().take_while(|v| {
        let done = v.len <= n;
        if done {
            n -= v.len;
        }
        done
    });
    let whole = whole.count();
    iovecs.drain(..whole);
    if let Some(first) = iovecs.first_mut() {
        first.base += n;
        first.len -= n;
    }
}

/// Writes the `len` bytes `iovecs` point at to `fd` at `offset`, the rest again after a short
/// write. The iovecs must point into guest memory that the caller keeps mapped.
fn pwrite_all(
    fd: RawFd,
    iovecs: &mut Vec<IoVec>,
    mut offset: u64,
    mut len: usize,
) -> io::Result<()> {
    while len > 0 {
        let at = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the iovecs point into guest memory the caller's `mem` keeps mapped for the
        // call (at most IOV_MAX of them, checked when they were built); pwritev only reads
        // them and the buffers.
        let n =
            unsafe { libc::pwritev(fd, IoVec::as_raw(iovecs), iovecs.len() as libc::c_int, at) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let n = (n as usize).min(len);
        len -= n;
        offset += n as u64;
        advance(iovecs, n);
    }
    Ok(())
}

/// A request the kernel holds.
struct InFlight {
    generation: u32,
    head: u16,
    op: Op,
    offset: u64,
    /// Bytes still to transfer.
    remaining: usize,
    iovecs: Vec<IoVec>,
    status: GuestAddress,
    used: u32,
    /// Keeps the guest memory the iovecs point into mapped until the completion.
    mem: Arc<GuestMemoryMmap>,
}

/// A request the kernel finished, for the driver: its chain's head, status and used length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completed {
    /// The chain's head index.
    pub head: u16,
    /// The status byte written.
    pub status: u8,
    /// The used length.
    pub used: u32,
}

/// The ring of one disk and the requests in flight on it.
pub struct UringEngine {
    ring: IoUring,
    completions: EventFd,
    /// The image. Not registered with the ring as a fixed file: the ring would then hold the
    /// file open until the kernel tears it down, after the process is gone, and with it the
    /// image's lock, refusing a VMM started right after this one.
    fd: RawFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<u16>,
    /// Bumped by a reset: completions of an older generation are not reported.
    generation: u32,
    /// Entries pushed since the last `io_uring_enter`.
    unsubmitted: usize,
    cqes: Vec<(u64, i32)>,
    /// The guest memory of the latest request, shared by the requests on it: a request takes
    /// a reference instead of a copy of the region list.
    mem: Option<Arc<GuestMemoryMmap>>,
    /// Iovec arrays of finished requests, for the next ones.
    spare_iovecs: Vec<Vec<IoVec>>,
}

impl UringEngine {
    /// A ring of [`QUEUE_SIZE`] entries on `fd` (which must outlive the engine), with its
    /// completion eventfd. Fails where the host has no io_uring, refuses it (a sysctl, a
    /// container's seccomp filter) or lacks `readv`, `writev` or `fsync` on it.
    pub fn new(fd: RawFd) -> io::Result<Self> {
        let ring = IoUring::builder().build(u32::from(QUEUE_SIZE))?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (name, code) in [
            ("read", opcode::Read::CODE),
            ("write", opcode::Write::CODE),
            ("readv", opcode::Readv::CODE),
            ("writev", opcode::Writev::CODE),
            ("fsync", opcode::Fsync::CODE),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::other(format!(
                    "the host's io_uring has no {name}"
                )));
            }
        }
        let completions = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(completions.as_raw_fd())?;
        Ok(Self {
            ring,
            completions,
            fd,
            slots: (0..QUEUE_SIZE).map(|_| None).collect(),
            free: (0..QUEUE_SIZE).rev().collect(),
            generation: 0,
            unsubmitted: 0,
            cqes: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            mem: None,
            spare_iovecs: Vec::new(),
        })
    }

    /// The eventfd the kernel signals when completions are ready.
    pub fn completion_event(&self) -> &EventFd {
        &self.completions
    }

    /// How many more requests can be in flight.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Requests the kernel holds.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues `plan` for chain `head`; it reaches the kernel at the next [`Self::submit`].
    /// Fails, with nothing queued, when no slot is free or the buffers cannot be mapped.
    pub fn start(&mut self, mem: &GuestMemoryMmap, head: u16, plan: Plan) -> io::Result<()> {
        let Some(slot) = self.free.pop() else {
            return Err(io::Error::other("every slot is in flight"));
        };
        let mut iovecs = self.spare_iovecs.pop().unwrap_or_default();
        if !fill_iovecs(mem, &plan.data, &mut iovecs) {
            self.spare_iovecs.push(iovecs);
            self.free.push(slot);
            return Err(io::Error::other("the buffers cannot be mapped"));
        }
        let mem = match &self.mem {
            Some(shared) if same_mapping(shared, mem) => shared.clone(),
            _ => self.mem.insert(Arc::new(mem.clone())).clone(),
        };
        self.slots[usize::from(slot)] = Some(InFlight {
            generation: self.generation,
            head,
            op: plan.op,
            offset: plan.offset,
            remaining: plan.len,
            iovecs,
            status: plan.status,
            used: plan.used,
            mem,
        });
        if let Err(e) = self.push(slot) {
            self.slots[usize::from(slot)] = None;
            self.free.push(slot);
            return Err(e);
        }
        Ok(())
    }

    /// Puts the entry of `slot` on the submission queue.
    fn push(&mut self, slot: u16) -> io::Result<()> {
        let Some(req) = self.slots[usize::from(slot)].as_ref() else {
            return Err(io::Error::other("an empty slot"));
        };
        let fd = types::Fd(self.fd);
        let iov = IoVec::as_raw(&req.iovecs);
        // At most IOV_MAX entries (checked when the iovecs were built).
        let count = req.iovecs.len() as u32;
        // One buffer (most 4 KiB requests): the plain read or write, which imports no iovec.
        // A buffer holds at most MAX_REQUEST_BYTES, so its length fits u32.
        let single = match req.iovecs.as_slice() {
            [one] => Some((one.base as *mut u8, one.len as u32)),
            _ => None,
        };
        let entry = match (req.op, single) {
            (Op::Read, Some((buf, len))) => {
                opcode::Read::new(fd, buf, len).offset(req.offset).build()
            }
            (Op::Write, Some((buf, len))) => {
                opcode::Write::new(fd, buf, len).offset(req.offset).build()
            }
            (Op::Read, None) => opcode::Readv::new(fd, iov, count)
                .offset(req.offset)
                .build(),
            (Op::Write, None) => opcode::Writev::new(fd, iov, count)
                .offset(req.offset)
                .build(),
            (Op::Flush, _) => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(u64::from(slot));
        // SAFETY: the entry points at the slot's iovec array and, through it (or directly, for
        // a single buffer), into guest memory. Both stay put until the kernel posts this
        // entry's completion: the slot owns the array (not resized while in flight) and a
        // handle on the guest memory mapping, and a slot is emptied only when its completion
        // has been reaped (`reap`, or `Drop` and `reset`, which wait for the completions). The
        // image's descriptor is the disk's, which drops this engine before closing it.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("the submission queue is full"))?;
        self.unsubmitted += 1;
        Ok(())
    }

    /// Hands the queued entries to the kernel (one `io_uring_enter`).
    pub fn submit(&mut self, errors: &mut ErrorLog) {
        if self.unsubmitted == 0 {
            return;
        }
        match self.ring.submit() {
            Ok(_) => self.unsubmitted = 0,
            Err(e) => errors.warn(format_args!("cannot submit to io_uring: {e}")),
        }
    }

    /// Acknowledges the completion eventfd (before reaping, so that a completion posted
    /// meanwhile wakes the worker again).
    pub fn clear_event(&self) {
        let _ = self.completions.read();
    }

    /// Stops the completion eventfd: the worker is about to reap by itself.
    pub fn quiet(&mut self) {
        self.ring.completion().disable_eventfd();
    }

    /// Restarts the completion eventfd, and signals it if completions arrived while it was
    /// stopped (they raised nothing).
    pub fn arm(&mut self, errors: &mut ErrorLog) {
        let mut completion = self.ring.completion();
        completion.enable_eventfd();
        completion.sync();
        if !completion.is_empty() {
            if let Err(e) = self.completions.write(1) {
                errors.warn(format_args!("cannot signal the io_uring completions: {e}"));
            }
        }
    }

    /// Takes the completions the kernel posted: for each finished request, writes its status
    /// byte and calls `done`; resubmits short transfers.
    pub fn reap(&mut self, errors: &mut ErrorLog, mut done: impl FnMut(Completed)) {
        loop {
            self.cqes.clear();
            self.cqes
                .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            if self.cqes.is_empty() {
                break;
            }
            for i in 0..self.cqes.len() {
                let (user_data, result) = self.cqes[i];
                if let Some(completed) = self.finish(user_data, result, errors) {
                    done(completed);
                }
            }
        }
        self.submit(errors);
    }

    /// One completion: `Some` when its request is finished and still wanted.
    fn finish(&mut self, user_data: u64, result: i32, errors: &mut ErrorLog) -> Option<Completed> {
        let slot = u16::try_from(user_data).ok()?;
        let req = self.slots.get_mut(usize::from(slot))?.as_mut()?;
        // `None`: a short transfer, whose rest goes to the kernel again.
        let status = if result < 0 {
            let e = io::Error::from_raw_os_error(-result);
            let what = match req.op {
                Op::Read => "reading",
                Op::Write => "writing",
                Op::Flush => "flushing",
            };
            errors.warn(format_args!(
                "{what} the image at {:#x} failed: {e}",
                req.offset
            ));
            Some(status::IOERR)
        } else if req.op == Op::Flush || result as usize >= req.remaining {
            Some(status::OK)
        } else if result == 0 {
            errors.warn(format_args!(
                "the image ended at {:#x}, inside the disk",
                req.offset
            ));
            Some(status::IOERR)
        } else {
            let n = result as usize;
            req.remaining -= n;
            req.offset += n as u64;
            advance(&mut req.iovecs, n);
            None
        };
        let status = match status {
            Some(status) => status,
            None if self.push(slot).is_ok() => return None,
            None => {
                errors.warn(format_args!("cannot resubmit the rest of a short transfer"));
                status::IOERR
            }
        };
        let req = self.slots[usize::from(slot)].take()?;
        self.free.push(slot);
        self.keep_iovecs(req.iovecs);
        if req.generation != self.generation {
            return None;
        }
        Some(Completed {
            head: req.head,
            status,
            used: report(&req.mem, req.status, req.used, status),
        })
    }

    /// Keeps a finished request's iovec array for a later one, unless it grew large (a chain of
    /// many buffers): the spares stay within a few KiB per slot.
    fn keep_iovecs(&mut self, mut iovecs: Vec<IoVec>) {
        if iovecs.capacity() <= SPARE_IOVECS_CAPACITY {
            iovecs.clear();
            self.spare_iovecs.push(iovecs);
        }
    }

    /// Writes the data of `plan` (a write) now, with `pwritev` straight from guest memory;
    /// `None` when its buffers take more iovecs than one call.
    pub fn write_now(&mut self, mem: &GuestMemoryMmap, plan: &Plan) -> Option<io::Result<()>> {
        let mut iovecs = self.spare_iovecs.pop().unwrap_or_default();
        let result = fill_iovecs(mem, &plan.data, &mut iovecs)
            .then(|| pwrite_all(self.fd, &mut iovecs, plan.offset, plan.len));
        self.keep_iovecs(iovecs);
        result
    }

    /// Waits (up to `limit`) until the kernel holds no request; completions are dropped.
    /// `false` if some were still in flight at the limit.
    pub fn wait_idle(&mut self, limit: Duration, errors: &mut ErrorLog) -> bool {
        let deadline = Instant::now() + limit;
        // Nothing reaped from here on goes to the driver.
        self.generation = self.generation.wrapping_add(1);
        loop {
            self.reap(errors, |_| {});
            if self.in_flight() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.wait_for_completion();
        }
    }

    /// Blocks until a completion is posted, or 100 ms pass.
    pub fn wait_for_completion(&mut self) {
        let timeout = types::Timespec::new().nsec(100_000_000);
        let args = types::SubmitArgs::new().timespec(&timeout);
        // ETIME and EINTR only end the wait early.
        let _ = self.ring.submitter().submit_with_args(1, &args);
    }

    /// Drops every request in flight after waiting for it, for a device reset.
    pub fn reset(&mut self, errors: &mut ErrorLog) {
        if !self.wait_idle(RESET_WAIT, errors) {
            errors.warn(format_args!(
                "{} requests still in flight after a reset; their results are dropped",
                self.in_flight()
            ));
        }
        // The requests still in flight hold their own reference on their memory.
        self.mem = None;
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The iovecs and guest memory of the requests in flight must outlive them.
        let mut errors = ErrorLog::new("virtio-blk");
        self.wait_idle(RESET_WAIT, &mut errors);
    }
}

/// Where [`Disk::start`] sent a request.
pub(crate) enum Started {
    /// To the ring: it completes later, from [`Disk::reap`].
    Ring,
    /// Done on the worker's thread, with this used length (its status byte written).
    Done(u32),
    /// Nowhere: the synchronous path must handle it.
    Synchronous,
}

impl Disk {
    /// Starts `chain` on the ring when it can go there. A write that finds the ring idle is
    /// done at once on this thread instead, with `pwritev` from guest memory: ext4 takes no
    /// non-blocking buffered write, so on the ring it would go to an io-wq worker and back
    /// (buffered writes to one file run one at a time there anyway). With requests in flight
    /// it goes to the ring, so that the reads beside it are not held up. A flush always goes to
    /// the ring: done here it would hold every request behind it for the length of a disk
    /// flush (the bench's `mixed` reads on virtio-pci fell to 0.72x when it did).
    pub(crate) fn start(&mut self, chain: &Chain<'_>) -> Started {
        let (sectors, read_only) = (self.sectors, self.read_only);
        let Some(engine) = self.uring.as_mut() else {
            return Started::Synchronous;
        };
        let Some(plan) = plan_request(chain, sectors, read_only) else {
            return Started::Synchronous;
        };
        if plan.op == Op::Write && engine.in_flight() == 0 {
            let mem = chain.memory();
            let status = match engine.write_now(mem, &plan) {
                Some(Ok(())) => status::OK,
                Some(Err(e)) => {
                    self.errors.warn(format_args!(
                        "writing the image at {:#x} failed: {e}",
                        plan.offset
                    ));
                    status::IOERR
                }
                // More buffers than one pwritev takes.
                None => return Started::Synchronous,
            };
            return Started::Done(report(mem, plan.status, plan.used, status));
        }
        match engine.start(chain.memory(), chain.head_index(), plan) {
            Ok(()) => Started::Ring,
            Err(e) => {
                self.errors
                    .warn(format_args!("a request goes the synchronous way: {e}"));
                Started::Synchronous
            }
        }
    }

    /// Completions of the ring put on `queue`'s used ring; returns how many, and their used
    /// bytes.
    pub(crate) fn reap(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<(usize, u64), virtio_queue::Error> {
        let Some(engine) = self.uring.as_mut() else {
            return Ok((0, 0));
        };
        let errors = &mut self.errors;
        let mut result = Ok(());
        let (mut count, mut bytes) = (0, 0u64);
        engine.reap(errors, |c| {
            if result.is_ok() {
                result = queue.add_used(mem, c.head, c.used);
                count += 1;
                bytes += u64::from(c.used);
            }
        });
        result.map(|()| (count, bytes))
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Read, Seek, SeekFrom, Write};

    use super::*;
    use crate::tests::header;
    use crate::{complete_queue, process_queue, DiskOptions, IoEngine};
    use virtio::queue::testing::*;

    const SECTORS: u64 = 64;
    const HDR: u64 = DATA;
    const STATUS: u64 = DATA + 0x100;
    const BUF: u64 = DATA + 0x1000;
    const BUF2: u64 = DATA + 0x4000;

    /// An unlinked image file whose sector `i` holds the byte `i`.
    fn image() -> File {
        let path = std::env::temp_dir().join(format!(
            "vmmkit-blk-uring-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        let bytes: Vec<u8> = (0..SECTORS * SECTOR_SIZE)
            .map(|i| (i / SECTOR_SIZE) as u8)
            .collect();
        file.write_all(&bytes).unwrap();
        file
    }

    fn contents(file: &mut File) -> Vec<u8> {
        let mut out = Vec::new();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_end(&mut out).unwrap();
        out
    }

    fn disk(engine: IoEngine, read_only: bool) -> (File, Disk) {
        let file = image();
        let backend = Box::new(file.try_clone().unwrap());
        let options = DiskOptions {
            read_only,
            serial: "uring".into(),
            io_engine: engine,
        };
        let mut disk = Disk::new(backend, &options).unwrap();
        disk.ack_features(disk.features());
        if engine == IoEngine::Async {
            assert_eq!(
                disk.io_engine(),
                IoEngine::Async,
                "this host's io_uring is unavailable (see the log): these tests need it"
            );
        }
        (file, disk)
    }

    /// The head and plan of the first chain on `queue`, taken off it.
    fn first_plan(queue: &mut Queue, mem: &GuestMemoryMmap) -> (u16, Plan) {
        let chain = virtio_queue::QueueOwnedT::iter(queue, mem)
            .unwrap()
            .next()
            .unwrap();
        (
            chain.head_index(),
            plan_request(&chain, SECTORS, false).unwrap(),
        )
    }

    /// Serves the queue until nothing is in flight; returns the used entries.
    fn settle(
        driver: &Driver<'_>,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        disk: &mut Disk,
    ) -> Vec<(u32, u32)> {
        process_queue(queue, mem, disk).unwrap();
        complete_queue(queue, mem, disk).unwrap();
        while disk.in_flight() > 0 {
            disk.wait_for_completion();
            complete_queue(queue, mem, disk).unwrap();
        }
        (0..driver.used_idx()).map(|i| driver.used(i)).collect()
    }

    /// One request on a fresh disk: (status byte, used length, guest data, image afterwards).
    fn outcome(engine: IoEngine, hdr: &[u8], descs: &[Desc]) -> (u8, u32, Vec<u8>, Vec<u8>) {
        let (mut file, mut disk) = disk(engine, false);
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        write_bytes(&mem, HDR, hdr);
        write_bytes(&mem, STATUS, &[0xee]);
        write_bytes(&mem, BUF, &[0xcc; 0x3000]);
        write_bytes(&mem, BUF2, &[0x77; 0x1000]);
        driver.add(descs);
        let used = settle(&driver, &mut queue, &mem, &mut disk);
        assert_eq!(used.len(), 1, "{engine:?}: one used entry");
        assert_eq!(disk.in_flight(), 0);
        let status_at = descs
            .iter()
            .rev()
            .find(|d| d.writable && d.len > 0)
            .map(|d| d.addr + u64::from(d.len) - 1)
            .unwrap();
        (
            read_bytes(&mem, status_at, 1)[0],
            used[0].1,
            read_bytes(&mem, BUF, 0x3000),
            contents(&mut file),
        )
    }

    #[test]
    fn every_request_ends_as_it_does_on_the_synchronous_path() {
        use crate::request::*;
        let cases: Vec<(&str, Vec<u8>, Vec<Desc>)> = vec![
            (
                "read split over two buffers",
                header(IN, 3),
                vec![r(HDR, 16), w(BUF, 512), w(BUF + 0x1000, 512), w(STATUS, 1)],
            ),
            (
                "header split in two",
                header(IN, 7),
                vec![r(HDR, 8), r(HDR + 8, 8), w(BUF, 1024), w(STATUS, 1)],
            ),
            (
                "data and status in one buffer",
                header(IN, 9),
                vec![r(HDR, 16), w(BUF, 513)],
            ),
            (
                "write",
                header(OUT, 5),
                vec![r(HDR, 16), r(BUF2, 1024), w(STATUS, 1)],
            ),
            (
                "write with its data in the header's buffer",
                header(OUT, 6),
                vec![r(HDR, 16 + 512), w(STATUS, 1)],
            ),
            ("flush", header(FLUSH, 0), vec![r(HDR, 16), w(STATUS, 1)]),
            (
                "read past the end",
                header(IN, SECTORS - 1),
                vec![r(HDR, 16), w(BUF, 1024), w(STATUS, 1)],
            ),
            (
                "read of part of a sector",
                header(IN, 0),
                vec![r(HDR, 16), w(BUF, 100), w(STATUS, 1)],
            ),
            (
                "sector number that overflows",
                header(OUT, u64::MAX / 256),
                vec![r(HDR, 16), r(BUF2, 512), w(STATUS, 1)],
            ),
            (
                "read into memory outside the guest",
                header(IN, 0),
                vec![r(HDR, 16), w(MEM_SIZE - 256, 512), w(STATUS, 1)],
            ),
            (
                "short header",
                header(IN, 0)[..12].to_vec(),
                vec![r(HDR, 12), w(BUF, 512), w(STATUS, 1)],
            ),
            (
                "get id",
                header(GET_ID, 0),
                vec![r(HDR, 16), w(BUF, 20), w(STATUS, 1)],
            ),
            (
                "unknown type",
                header(99, 0),
                vec![r(HDR, 16), w(STATUS, 1)],
            ),
        ];
        for (name, hdr, descs) in cases {
            let sync = outcome(IoEngine::Sync, &hdr, &descs);
            let ring = outcome(IoEngine::Async, &hdr, &descs);
            assert_eq!(
                (sync.0, sync.1),
                (ring.0, ring.1),
                "{name}: (status, used length)"
            );
            assert!(sync.2 == ring.2, "{name}: the guest's buffers differ");
            assert!(sync.3 == ring.3, "{name}: the images differ");
        }
    }

    #[test]
    fn well_formed_requests_go_to_the_ring() {
        let (_file, mut disk) = disk(IoEngine::Async, false);
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        write_bytes(&mem, HDR, &header(crate::request::IN, 2));
        driver.add(&[r(HDR, 16), w(BUF, 512), w(STATUS, 1)]);
        let drained = process_queue(&mut queue, &mem, &mut disk).unwrap();
        assert_eq!(drained.deferred, 1);
        let used = settle(&driver, &mut queue, &mem, &mut disk);
        assert_eq!(used.len(), 1);
        assert_eq!(read_bytes(&mem, BUF, 512), vec![2; 512]);
        assert_eq!(read_bytes(&mem, STATUS, 1), [status::OK]);
    }

    #[test]
    fn thirty_two_reads_in_flight_all_complete() {
        let (_file, mut disk) = disk(IoEngine::Async, false);
        let mem = memory();
        let mut driver = Driver::new(&mem, 128);
        let mut queue = driver.queue();
        for i in 0..32u64 {
            let hdr = DATA + 0x20 * i;
            write_bytes(&mem, hdr, &header(crate::request::IN, i));
            driver.add(&[r(hdr, 16), w(BUF + 0x200 * i, 512), w(STATUS + i, 1)]);
        }
        let drained = process_queue(&mut queue, &mem, &mut disk).unwrap();
        assert_eq!(drained.deferred, 32);
        let used = settle(&driver, &mut queue, &mem, &mut disk);
        assert_eq!(used.len(), 32);
        for i in 0..32u64 {
            assert_eq!(read_bytes(&mem, BUF + 0x200 * i, 512), vec![i as u8; 512]);
            assert_eq!(read_bytes(&mem, STATUS + i, 1), [status::OK]);
        }
    }

    /// A flush covers the writes the driver saw complete (the driver sends it after them, as
    /// Linux does); a read submitted with it completes with the image's data.
    #[test]
    fn a_flush_after_writes_finds_them_in_the_image() {
        let (mut file, mut disk) = disk(IoEngine::Async, false);
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        write_bytes(&mem, BUF2, &[0xab; 1024]);
        write_bytes(&mem, HDR, &header(crate::request::OUT, 10));
        write_bytes(&mem, HDR + 0x20, &header(crate::request::OUT, 20));
        write_bytes(&mem, HDR + 0x40, &header(crate::request::FLUSH, 0));
        write_bytes(&mem, HDR + 0x60, &header(crate::request::IN, 3));
        driver.add(&[r(HDR, 16), r(BUF2, 512), w(STATUS, 1)]);
        driver.add(&[r(HDR + 0x20, 16), r(BUF2 + 512, 512), w(STATUS + 1, 1)]);
        assert_eq!(settle(&driver, &mut queue, &mem, &mut disk).len(), 2);
        driver.add(&[r(HDR + 0x40, 16), w(STATUS + 2, 1)]);
        driver.add(&[r(HDR + 0x60, 16), w(BUF, 512), w(STATUS + 3, 1)]);
        let used = settle(&driver, &mut queue, &mem, &mut disk);
        assert_eq!(used.len(), 4);
        assert_eq!(read_bytes(&mem, STATUS + 3, 1), [status::OK]);
        assert_eq!(read_bytes(&mem, BUF, 512), [3; 512]);
        assert_eq!(read_bytes(&mem, STATUS, 3), [status::OK; 3]);
        let image = contents(&mut file);
        assert_eq!(image[10 * 512..11 * 512], [0xab; 512]);
        assert_eq!(image[20 * 512..21 * 512], [0xab; 512]);
    }

    /// A write that finds the ring idle is done on the worker's thread, straight from its
    /// buffers: it is on the used ring and in the image when `process_queue` returns. One that
    /// comes behind a read in flight goes to the ring, so that it does not hold the read up.
    #[test]
    fn a_write_on_an_idle_ring_is_done_at_once_and_one_behind_a_read_goes_to_the_ring() {
        use crate::request::{IN, OUT};
        let (mut file, mut disk) = disk(IoEngine::Async, false);
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        write_bytes(&mem, BUF2, &[0x5a; 1024]);
        write_bytes(&mem, HDR, &header(OUT, 12));
        driver.add(&[r(HDR, 16), r(BUF2, 512), r(BUF2 + 512, 512), w(STATUS, 1)]);
        let drained = process_queue(&mut queue, &mem, &mut disk).unwrap();
        assert_eq!((drained.completed, drained.deferred), (1, 0));
        assert_eq!(disk.in_flight(), 0);
        assert_eq!(driver.used(0), (0, 1));
        assert_eq!(read_bytes(&mem, STATUS, 1), [status::OK]);
        assert_eq!(contents(&mut file)[12 * 512..14 * 512], [0x5a; 1024]);

        write_bytes(&mem, HDR + 0x20, &header(IN, 1));
        write_bytes(&mem, HDR + 0x40, &header(OUT, 30));
        driver.add(&[r(HDR + 0x20, 16), w(BUF, 512), w(STATUS + 1, 1)]);
        driver.add(&[r(HDR + 0x40, 16), r(BUF2, 512), w(STATUS + 2, 1)]);
        let drained = process_queue(&mut queue, &mem, &mut disk).unwrap();
        assert_eq!(drained.deferred, 2);
        assert_eq!(settle(&driver, &mut queue, &mem, &mut disk).len(), 3);
        assert_eq!(read_bytes(&mem, BUF, 512), [1; 512]);
        assert_eq!(read_bytes(&mem, STATUS + 1, 2), [status::OK; 2]);
        assert_eq!(contents(&mut file)[30 * 512..31 * 512], [0x5a; 512]);
    }

    #[test]
    fn requests_on_one_memory_share_it_and_a_new_memory_is_kept_apart() {
        let (_file, mut disk) = disk(IoEngine::Async, false);
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        write_bytes(&mem, HDR, &header(crate::request::IN, 1));
        driver.add(&[r(HDR, 16), w(BUF, 513)]);
        let (head, plan) = first_plan(&mut queue, &mem);
        // The same regions, mapped again elsewhere: another memory.
        let other = memory();
        let engine = disk.uring.as_mut().unwrap();
        for m in [&mem, &mem, &other, &other] {
            engine.start(m, head, plan.clone()).unwrap();
        }
        let held: Vec<_> = engine
            .slots
            .iter()
            .flatten()
            .map(|req| Arc::clone(&req.mem))
            .collect();
        assert_eq!(held.len(), 4);
        assert!(Arc::ptr_eq(&held[0], &held[1]));
        assert!(Arc::ptr_eq(&held[2], &held[3]));
        assert!(!Arc::ptr_eq(&held[0], &held[2]));
        assert!(same_mapping(&held[0], &mem) && same_mapping(&held[2], &other));
        assert!(!same_mapping(&mem, &other));
        engine.submit(&mut ErrorLog::new("virtio-blk"));
        disk.reset_in_flight();
        assert_eq!(disk.in_flight(), 0);
        // Every request finished: its iovec array waits for the next one.
        assert_eq!(disk.uring.as_ref().unwrap().spare_iovecs.len(), 4);
    }

    #[test]
    fn a_reset_waits_for_the_requests_in_flight_and_reports_none() {
        let (_file, mut disk) = disk(IoEngine::Async, false);
        let mem = memory();
        let mut driver = Driver::new(&mem, 64);
        let mut queue = driver.queue();
        write_bytes(&mem, HDR, &header(crate::request::IN, 1));
        driver.add(&[r(HDR, 16), w(BUF, 513)]);
        let (head, plan) = first_plan(&mut queue, &mem);
        // Sixteen reads handed to the kernel and not reaped: in flight when the reset comes.
        let engine = disk.uring.as_mut().unwrap();
        for _ in 0..16 {
            engine.start(&mem, head, plan.clone()).unwrap();
        }
        engine.submit(&mut ErrorLog::new("virtio-blk"));
        assert_eq!(disk.in_flight(), 16);
        disk.reset_in_flight();
        assert_eq!(disk.in_flight(), 0);
        let after = complete_queue(&mut queue, &mem, &mut disk).unwrap();
        assert_eq!(after.completed, 0);
        assert_eq!(driver.used_idx(), 0);
    }

    #[test]
    fn a_full_ring_waits_for_a_free_slot() {
        let (_file, mut disk) = disk(IoEngine::Async, false);
        let mem = memory();
        let mut driver = Driver::new(&mem, 256);
        let mut queue = driver.queue();
        write_bytes(&mem, HDR, &header(crate::request::IN, 1));
        let head = driver.add(&[r(HDR, 16), w(BUF, 513)]);
        let (_, plan) = first_plan(&mut queue, &mem);
        // Every slot taken (by requests not yet submitted, as at the end of a busy wake-up).
        let engine = disk.uring.as_mut().unwrap();
        let free = engine.free_slots();
        assert_eq!(free, usize::from(QUEUE_SIZE));
        for _ in 0..free {
            engine.start(&mem, head, plan.clone()).unwrap();
        }
        // The driver posts the chain again: it waits for a slot, and the queue is not re-armed.
        driver.publish(head);
        let drained = process_queue(&mut queue, &mem, &mut disk).unwrap();
        assert_eq!((drained.deferred, drained.more), (0, false));
        assert!(disk.blocked);
        // Once completions free slots, the waiting chain is served too.
        disk.uring
            .as_mut()
            .unwrap()
            .submit(&mut ErrorLog::new("virtio-blk"));
        let used = settle(&driver, &mut queue, &mem, &mut disk);
        assert_eq!(used.len(), free + 1);
        assert!(!disk.blocked);
    }

    #[test]
    fn plans_follow_the_request_layout() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        write_bytes(&mem, HDR, &header(crate::request::OUT, 4));
        driver.add(&[r(HDR, 16 + 512), r(BUF2, 512), w(STATUS, 4)]);
        let chain = virtio_queue::QueueOwnedT::iter(&mut queue, &mem)
            .unwrap()
            .next()
            .unwrap();
        let plan = plan_request(&chain, SECTORS, false).unwrap();
        assert_eq!(plan.op, Op::Write);
        assert_eq!(plan.offset, 4 * 512);
        assert_eq!(
            plan.data,
            [(GuestAddress(HDR + 16), 512), (GuestAddress(BUF2), 512)]
        );
        assert_eq!(
            (plan.len, plan.status, plan.used),
            (1024, GuestAddress(STATUS + 3), 1)
        );
        // A read-only disk's writes stay on the synchronous path (which fails them).
        assert_eq!(plan_request(&chain, SECTORS, true), None);
        // A read whose header is split in two and whose status byte ends its last data buffer.
        write_bytes(&mem, HDR, &header(crate::request::IN, 2));
        driver.add(&[r(HDR, 8), r(HDR + 8, 8), w(BUF, 512), w(BUF2, 513)]);
        let chain = virtio_queue::QueueOwnedT::iter(&mut queue, &mem)
            .unwrap()
            .next()
            .unwrap();
        let plan = plan_request(&chain, SECTORS, false).unwrap();
        assert_eq!((plan.op, plan.offset), (Op::Read, 2 * 512));
        assert_eq!(
            plan.data,
            [(GuestAddress(BUF), 512), (GuestAddress(BUF2), 512)]
        );
        assert_eq!(
            (plan.len, plan.status, plan.used),
            (1024, GuestAddress(BUF2 + 512), 1025)
        );
        // A header cut short: the synchronous path answers it.
        driver.add(&[r(HDR, 8), w(BUF, 512), w(STATUS, 1)]);
        let chain = virtio_queue::QueueOwnedT::iter(&mut queue, &mem)
            .unwrap()
            .next()
            .unwrap();
        assert_eq!(plan_request(&chain, SECTORS, false), None);
    }

    #[test]
    fn a_short_transfer_continues_where_it_stopped() {
        let mut iovecs = vec![
            IoVec {
                base: 0x1000,
                len: 512,
            },
            IoVec {
                base: 0x3000,
                len: 512,
            },
            IoVec {
                base: 0x5000,
                len: 1024,
            },
        ];
        advance(&mut iovecs, 700);
        assert_eq!(
            iovecs.iter().map(|v| (v.base, v.len)).collect::<Vec<_>>(),
            [(0x3000 + 188, 324), (0x5000, 1024)]
        );
        advance(&mut iovecs, 324);
        assert_eq!(
            iovecs.iter().map(|v| (v.base, v.len)).collect::<Vec<_>>(),
            [(0x5000, 1024)]
        );
    }
}
