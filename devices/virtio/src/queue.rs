//! Helpers shared by the devices for split virtqueues (virtio 1.2 section 2.7).
//!
//! [`drain_queue`] is the one loop every device runs over its queues: it pops each available
//! descriptor chain, hands it to the device, puts it on the used ring with the length the device
//! wrote, and decides whether the driver wants an interrupt (2.7.7 and 2.7.10: used-buffer
//! notification suppression, with or without `VIRTIO_F_EVENT_IDX`). It re-enables driver
//! notifications before returning and checks the ring once more, so a buffer the driver adds
//! while notifications were off is never left behind.
//!
//! Everything in the rings is written by the guest, so nothing here trusts an index or an
//! address: `virtio_queue` bounds descriptor chains by the queue size (loops end), refuses
//! addresses outside guest memory, and reports an available index more than a queue's worth
//! ahead as an error.

use std::fmt;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use bus::metrics::DeviceMetrics;
use bus::ratelimit::{self, RateLimit};

/// Feature bits that concern the transport and the rings (section 6), offered by every device
/// of this crate.
pub mod features {
    /// `VIRTIO_RING_F_INDIRECT_DESC`: the driver may use indirect descriptor tables (2.7.5.3).
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// `VIRTIO_RING_F_EVENT_IDX`: `used_event` / `avail_event` suppression (2.7.7, 2.7.10).
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// `VIRTIO_F_VERSION_1`: a modern (non-legacy) device.
    pub const VERSION_1: u64 = 1 << 32;
    /// What every device here offers besides its own bits.
    pub const COMMON: u64 = VERSION_1 | RING_INDIRECT_DESC | RING_EVENT_IDX;
}

/// A descriptor chain over the guest memory the device was activated with.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Why a queue could not be processed any further. The driver broke the ring; the device stops
/// using the queue until it is reset.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The rings could not be read or written.
    #[error("the virtqueue rings are broken")]
    Ring(#[from] virtio_queue::Error),
    /// The available index says chains are pending but the ring entries cannot be read.
    #[error("the available ring reports buffers that cannot be read")]
    Stalled,
    /// The available ring names a chain head outside the descriptor table: no used entry can
    /// return it, so the driver and the device no longer agree on the ring (2.1.2).
    #[error("the available ring names descriptor {head}, outside a queue of {size}")]
    HeadOutOfRange {
        /// The head index the driver posted.
        head: u16,
        /// The queue's size.
        size: u16,
    },
}

/// `head` if it names a descriptor of a queue of `size`. virtio-queue's iterator hands a head
/// the driver posted outside the descriptor table out as a chain with no descriptors; no used
/// entry can return it, so every device stops at it rather than serving or answering it.
pub fn checked_head(head: u16, size: u16) -> Result<u16, QueueError> {
    if head < size {
        Ok(head)
    } else {
        Err(QueueError::HeadOutOfRange { head, size })
    }
}

/// What one pass of [`drain_queue`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Chains put on the used ring.
    pub completed: usize,
    /// Whether the driver wants a used-buffer notification for what was completed.
    pub notify: bool,
    /// Bytes written into the completed chains (the sum of their used lengths).
    pub bytes: u64,
    /// The wake-up's [`Budget`] ran out with chains still available: the device must come
    /// back for them (notifications stay off until it does).
    pub more: bool,
    /// Chains the device kept to complete later ([`drain_queue_deferring`]): not yet on the
    /// used ring, so not in `completed` or `bytes`.
    pub deferred: usize,
}

impl Drained {
    /// Both passes of one wake-up, `self` then `later`.
    pub fn and(self, later: Drained) -> Drained {
        Drained {
            completed: self.completed + later.completed,
            notify: self.notify || later.notify,
            bytes: self.bytes + later.bytes,
            more: self.more || later.more,
            deferred: self.deferred + later.deferred,
        }
    }

    /// Counts what was served, logs chains that had to be skipped and says what the event
    /// loop should do next.
    pub fn report(self, errors: &mut ErrorLog) -> Served {
        DeviceMetrics::add(&errors.metrics.requests, self.completed as u64);
        DeviceMetrics::add(&errors.metrics.bytes, self.bytes);
        Served {
            notify: self.notify,
            more: self.more,
        }
    }
}

/// What serving a queue once asks of the event loop.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Raise the queue's used-buffer interrupt.
    pub notify: bool,
    /// Chains are left: serve the queue again after the other devices had their turn.
    pub more: bool,
}

impl From<bool> for Served {
    fn from(notify: bool) -> Self {
        Self {
            notify,
            more: false,
        }
    }
}

/// How much one wake-up may do on one queue before the device yields to the others, so that a
/// guest that keeps a queue full (or posts chains of huge buffers aliased onto one page)
/// cannot hold the device thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Chains handled.
    pub chains: usize,
    /// Bytes the handled chains' descriptors cover.
    pub bytes: u64,
}

/// The budget of [`drain_queue`]: a ring's worth of chains or 64 MiB of buffers.
pub const WAKEUP_BUDGET: Budget = Budget {
    chains: 256,
    bytes: 64 << 20,
};

/// Whether the driver wants a used-buffer notification for the chains added to the used ring
/// since the last call (2.7.7, 2.7.10): virtio-queue's answer, which follows `used_event` when
/// VIRTIO_F_EVENT_IDX was negotiated, and otherwise none while the driver's available ring
/// carries VRING_AVAIL_F_NO_INTERRUPT (a polling driver), which virtio-queue does not look at.
pub fn needs_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
    // Also orders the used ring's writes before the reads below.
    let wanted = queue.needs_notification(mem)?;
    if !wanted || queue.event_idx_enabled() {
        return Ok(wanted);
    }
    let flags: u16 = vm_memory::Bytes::load(
        mem,
        vm_memory::GuestAddress(queue.avail_ring()),
        std::sync::atomic::Ordering::Acquire,
    )
    .map_err(virtio_queue::Error::GuestMemory)?;
    Ok(u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
}

/// Whether the driver made chains available that the device has not taken yet.
pub fn has_available(queue: &Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
    let avail = queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire)?;
    Ok(avail.0 != queue.next_avail())
}

/// The available ring's flag by which a driver without VIRTIO_F_EVENT_IDX asks for no
/// used-buffer notifications (2.7.7).
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

thread_local! {
    /// Set while a worker that polls its rings ([`crate::poll`]) serves a queue: the drain
    /// then leaves the driver's notifications off, where it would turn them back on.
    static POLLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `work` (which serves a queue) with [`POLLED`] set to `polled`.
pub(crate) fn serving<R>(polled: bool, work: impl FnOnce() -> R) -> R {
    let was = POLLED.replace(polled);
    let result = work();
    POLLED.set(was);
    result
}

/// The bytes the descriptors of `chain` cover (indirect tables followed), saturating.
pub fn chain_bytes(chain: &Chain<'_>) -> u64 {
    chain
        .clone()
        .fold(0u64, |sum, desc| sum.saturating_add(u64::from(desc.len())))
}

/// Processes the chains available on `queue`, up to [`WAKEUP_BUDGET`]: `handle` consumes a
/// chain and returns how many bytes it wrote into the chain's device-writable buffers, which
/// becomes the used length.
pub fn drain_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    handle: F,
) -> Result<Drained, QueueError>
where
    F: FnMut(Chain<'_>) -> u32,
{
    drain_queue_within(queue, mem, WAKEUP_BUDGET, handle)
}

/// [`drain_queue`] with an explicit budget. When the budget runs out with chains left, the
/// drain returns with [`Drained::more`] set and driver notifications still off.
pub fn drain_queue_within<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    budget: Budget,
    mut handle: F,
) -> Result<Drained, QueueError>
where
    F: FnMut(Chain<'_>) -> u32,
{
    drain_queue_deferring(queue, mem, budget, |chain| Some(handle(chain)))
}

/// [`drain_queue_within`] for a device that may finish a chain later (asynchronous I/O):
/// `handle` returns the used length of a chain it completed at once, or `None` for a chain it
/// kept; the device puts that one on the used ring itself when its work completes, with
/// `add_used` and its own notification decision.
pub fn drain_queue_deferring<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    budget: Budget,
    handle: F,
) -> Result<Drained, QueueError>
where
    F: FnMut(Chain<'_>) -> Option<u32>,
{
    drain(queue, mem, budget, &mut AtOnce(handle), 1)
}

/// The most chains [`drain_queue_staged`] stages between two flushes.
pub const MAX_STAGED: usize = 64;

/// A device that sends what it takes in batches, one system call for many chains (a tap
/// written through io_uring): see [`drain_queue_staged`].
pub trait StagedChains {
    /// Takes `chain`'s work, to be done by the next [`flush`](Self::flush) at the latest;
    /// returns its used length.
    fn stage(&mut self, chain: Chain<'_>) -> u32;
    /// Does the work of every chain staged since the last flush; when it returns, no buffer of
    /// theirs is read or written any more.
    fn flush(&mut self);
}

/// [`drain_queue`] for a device that stages chains: up to `batch` (at most [`MAX_STAGED`])
/// chains are staged, then flushed, and only then put on the used ring, where the driver may
/// reuse their buffers. A ring that runs empty, a budget that runs out and a broken ring flush
/// what was staged before.
pub fn drain_queue_staged(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    batch: usize,
    device: &mut impl StagedChains,
) -> Result<Drained, QueueError> {
    drain(queue, mem, WAKEUP_BUDGET, &mut Staging(device), batch)
}

/// How [`drain`] hands a chain to the device.
trait Handler {
    /// The chain's used length, or `None` for a chain the device completes later.
    fn handle(&mut self, chain: Chain<'_>) -> Option<u32>;
    /// Finishes what the handled chains' used lengths promise.
    fn flush(&mut self) {}
}

/// A device that completes each chain as it takes it, or defers it.
struct AtOnce<F>(F);

impl<F: FnMut(Chain<'_>) -> Option<u32>> Handler for AtOnce<F> {
    fn handle(&mut self, chain: Chain<'_>) -> Option<u32> {
        (self.0)(chain)
    }
}

/// A [`StagedChains`] device.
struct Staging<'a, S>(&'a mut S);

impl<S: StagedChains> Handler for Staging<'_, S> {
    fn handle(&mut self, chain: Chain<'_>) -> Option<u32> {
        Some(self.0.stage(chain))
    }

    fn flush(&mut self) {
        self.0.flush();
    }
}

/// Chains handled but not yet on the used ring: their heads and used lengths.
struct Pending {
    entries: [(u16, u32); MAX_STAGED],
    len: usize,
    batch: usize,
}

impl Pending {
    fn push(&mut self, head: u16, used: u32) {
        self.entries[self.len] = (head, used);
        self.len += 1;
    }

    fn full(&self) -> bool {
        self.len >= self.batch
    }

    /// Flushes the device, then puts the pending chains on the used ring.
    fn settle(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        handler: &mut impl Handler,
        drained: &mut Drained,
    ) -> Result<(), QueueError> {
        if self.len == 0 {
            return Ok(());
        }
        handler.flush();
        let entries = &self.entries[..self.len];
        self.len = 0;
        for &(head, len) in entries {
            queue.add_used(mem, head, len)?;
            drained.completed += 1;
            drained.bytes += u64::from(len);
        }
        Ok(())
    }
}

fn drain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    budget: Budget,
    handler: &mut impl Handler,
    batch: usize,
) -> Result<Drained, QueueError> {
    let mut drained = Drained::default();
    let mut pending = Pending {
        entries: [(0, 0); MAX_STAGED],
        len: 0,
        batch: batch.clamp(1, MAX_STAGED),
    };
    match drain_rounds(queue, mem, budget, handler, &mut pending, &mut drained) {
        Ok(()) => Ok(drained),
        Err(e) => {
            // The chains handled before the ring broke are served (their used entries are
            // valid); nothing after them is.
            let _ = pending.settle(queue, mem, handler, &mut drained);
            Err(e)
        }
    }
}

fn drain_rounds(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    budget: Budget,
    handler: &mut impl Handler,
    pending: &mut Pending,
    drained: &mut Drained,
) -> Result<(), QueueError> {
    let mut round = 0u32;
    let (mut chains, mut bytes) = (0usize, 0u64);
    loop {
        queue.disable_notification(mem)?;
        let mut progressed = false;
        loop {
            if chains >= budget.chains || bytes >= budget.bytes {
                pending.settle(queue, mem, handler, drained)?;
                // Come back for the rest once the other devices had their turn.
                drained.more = has_available(queue, mem)?;
                if drained.more {
                    drained.notify = drained.completed > 0 && needs_interrupt(queue, mem)?;
                    return Ok(());
                }
                break;
            }
            let chain = queue.iter(mem)?.next();
            let Some(chain) = chain else { break };
            progressed = true;
            chains += 1;
            let head = checked_head(chain.head_index(), queue.size())?;
            bytes = bytes.saturating_add(chain_bytes(&chain));
            match handler.handle(chain) {
                Some(len) => {
                    pending.push(head, len);
                    if pending.full() {
                        pending.settle(queue, mem, handler, drained)?;
                    }
                }
                None => drained.deferred += 1,
            }
        }
        pending.settle(queue, mem, handler, drained)?;
        // The driver may have added buffers after the last look but before notifications were
        // back on; `enable_notification` reports that, and we go round again. While the worker
        // polls the ring, notifications stay off and only the look is needed.
        let more = if POLLED.get() {
            has_available(queue, mem)?
        } else {
            queue.enable_notification(mem)?
        };
        if !more {
            break;
        }
        // After the first round, a pending index with nothing readable means the ring entries
        // cannot be read at all: stop rather than spin.
        if !progressed && round > 0 {
            return Err(QueueError::Stalled);
        }
        round = round.saturating_add(1);
    }
    drained.notify = drained.completed > 0 && needs_interrupt(queue, mem)?;
    Ok(())
}

/// Copies the bytes of a configuration space at `offset` into `data`; bytes past the end of
/// `config` (or an offset past it) read as zero.
pub fn read_config(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// Rate-limited warnings for failures a guest can cause on every request: a token bucket per
/// device ([`bus::ratelimit`]), with the count of lines dropped logged with the next one.
#[derive(Debug)]
pub struct ErrorLog {
    device: &'static str,
    limiter: RateLimit,
    /// The device's counters, carried here because every queue pass gets this log.
    pub metrics: Arc<DeviceMetrics>,
}

impl ErrorLog {
    /// A log whose lines start with `device`.
    pub fn new(device: &'static str) -> Self {
        Self {
            device,
            limiter: RateLimit::new(),
            metrics: Arc::default(),
        }
    }

    /// Counts one failure and logs it if the bucket allows.
    pub fn warn(&mut self, what: fmt::Arguments<'_>) {
        DeviceMetrics::add(&self.metrics.errors, 1);
        match ratelimit::admit(&self.limiter) {
            Some(0) => log::warn!("{}: {what}", self.device),
            Some(n) => log::warn!("{}: {what} ({n} similar messages suppressed)", self.device),
            None => {}
        }
    }
}

/// Driver-side test harness: guest memory, a split queue laid out by hand, and readers for the
/// used ring. (`virtio_queue::mock::MockSplitQueue` 0.18 places its used ring over the end of
/// the available ring, so `used_event` and used entries overwrite each other; its descriptor
/// layout is what we use.) For this crate's and the device crates' tests (`fuzzing` feature).
#[cfg(any(test, feature = "fuzzing"))]
pub mod testing {
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// Guest memory size in tests: 1 MiB from address 0.
    pub const MEM_SIZE: u64 = 0x10_0000;
    /// Where test buffers start, above the rings.
    pub const DATA: u64 = 0x1_0000;
    /// Where [`Driver`] puts the descriptor table (16 bytes per entry, section 2.7.5).
    pub const DESC_TABLE: u64 = 0x0;
    /// Where [`Driver`] puts the available (driver) ring (section 2.7.6).
    pub const AVAIL_RING: u64 = 0x4000;
    /// Where [`Driver`] puts the used (device) ring (section 2.7.8).
    pub const USED_RING: u64 = 0x8000;

    /// [`MEM_SIZE`] bytes of guest memory at address 0, all zeroes.
    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    /// One descriptor as the driver would write it: readable unless `writable`.
    #[derive(Clone, Copy, Debug)]
    pub struct Desc {
        /// Guest-physical address of the buffer.
        pub addr: u64,
        /// Length of the buffer in bytes.
        pub len: u32,
        /// `VIRTQ_DESC_F_WRITE`: the device writes the buffer rather than reads it.
        pub writable: bool,
    }

    /// A device-readable descriptor of `len` bytes at `addr`.
    pub fn r(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            writable: false,
        }
    }

    /// A device-writable descriptor of `len` bytes at `addr`.
    pub fn w(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            writable: true,
        }
    }

    /// A driver-side queue of `size` entries.
    pub struct Driver<'a> {
        mem: &'a GuestMemoryMmap,
        size: u16,
        next_desc: u16,
        /// Added to every ring address: several queues in one memory.
        base: u64,
    }

    impl<'a> Driver<'a> {
        /// A queue of `size` entries at [`DESC_TABLE`], [`AVAIL_RING`] and [`USED_RING`] in
        /// `mem`, with the rings zeroed as a driver leaves them before use.
        pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
            Self::at(mem, size, 0)
        }

        /// A queue like [`new`](Self::new)'s with its rings `base` bytes higher (past
        /// [`DATA`], and 0xc000 apart, for a device with several queues).
        pub fn at(mem: &'a GuestMemoryMmap, size: u16, base: u64) -> Self {
            // Clean rings: flags, indexes and event fields all zero.
            mem.write_slice(&vec![0u8; 0xc000], GuestAddress(base))
                .unwrap();
            Self {
                mem,
                size,
                next_desc: 0,
                base,
            }
        }

        /// The device-side queue, ready, as the transport would hand it over.
        pub fn queue(&self) -> Queue {
            let mut q = Queue::new(self.size).unwrap();
            q.try_set_desc_table_address(GuestAddress(self.base + DESC_TABLE))
                .unwrap();
            q.try_set_avail_ring_address(GuestAddress(self.base + AVAIL_RING))
                .unwrap();
            q.try_set_used_ring_address(GuestAddress(self.base + USED_RING))
                .unwrap();
            q.set_ready(true);
            q
        }

        /// Publishes one chain of `descs` linked in order; returns its head index.
        pub fn add(&mut self, descs: &[Desc]) -> u16 {
            let head = self.next_desc;
            for (i, d) in descs.iter().enumerate() {
                let index = (head + i as u16) % self.size;
                let mut flags = if d.writable { VRING_DESC_F_WRITE } else { 0 };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT;
                }
                let next = (index + 1) % self.size;
                self.write_desc(index, d.addr, d.len, flags as u16, next);
            }
            self.next_desc = (head + descs.len() as u16) % self.size;
            self.publish(head);
            head
        }

        /// Writes a raw descriptor at `index` without touching the available ring.
        pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let raw = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
            let at = self.base + DESC_TABLE + 16 * u64::from(index);
            self.mem.write_obj(raw, GuestAddress(at)).unwrap();
        }

        /// Puts `head` on the available ring.
        pub fn publish(&self, head: u16) {
            let idx = self.avail_idx();
            let slot = u64::from(idx % self.size);
            self.put_u16(self.base + AVAIL_RING + 4 + 2 * slot, head);
            self.set_avail_idx(idx.wrapping_add(1));
        }

        /// The available ring's `idx`: where the driver will put its next chain.
        pub fn avail_idx(&self) -> u16 {
            self.get_u16(self.base + AVAIL_RING + 2)
        }

        /// Sets the available ring's `idx`, as a driver publishing (or a hostile one
        /// rewinding) its chains would.
        pub fn set_avail_idx(&self, idx: u16) {
            self.put_u16(self.base + AVAIL_RING + 2, idx);
        }

        /// The driver's `used_event` (after the available ring entries).
        pub fn set_used_event(&self, value: u16) {
            self.put_u16(self.base + AVAIL_RING + 4 + 2 * u64::from(self.size), value);
        }

        /// The device's `avail_event` (after the used ring entries).
        pub fn avail_event(&self) -> u16 {
            self.get_u16(self.base + USED_RING + 4 + 8 * u64::from(self.size))
        }

        /// The used ring's flags (bit 0: the device does not want notifications).
        pub fn used_flags(&self) -> u16 {
            self.get_u16(self.base + USED_RING)
        }

        /// The used ring's index.
        pub fn used_idx(&self) -> u16 {
            self.get_u16(self.base + USED_RING + 2)
        }

        /// Used element `i` as (id, len).
        pub fn used(&self, i: u16) -> (u32, u32) {
            let at = self.base + USED_RING + 4 + 8 * u64::from(i % self.size);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            (u32::from_le(id), u32::from_le(len))
        }

        fn get_u16(&self, at: u64) -> u16 {
            u16::from_le(self.mem.read_obj(GuestAddress(at)).unwrap())
        }

        fn put_u16(&self, at: u64, value: u16) {
            self.mem.write_obj(value.to_le(), GuestAddress(at)).unwrap();
        }
    }

    /// `len` bytes of `mem` at `addr`.
    pub fn read_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Writes `data` into `mem` at `addr`.
    pub fn write_bytes(mem: &GuestMemoryMmap, addr: u64, data: &[u8]) {
        mem.write_slice(data, GuestAddress(addr)).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::testing::*;
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    /// Writes `0xab` over each chain's writable bytes and returns how many.
    fn fill(chain: Chain<'_>) -> u32 {
        let mem = chain.memory();
        let Ok(mut writer) = chain.clone().writer(mem) else {
            return 0;
        };
        let n = writer.available_bytes();
        writer.write_all(&vec![0xab; n]).unwrap();
        n as u32
    }

    #[test]
    fn a_deferred_chain_stays_off_the_used_ring_until_the_device_completes_it() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        let kept = driver.add(&[w(DATA, 8)]);
        let now = driver.add(&[w(DATA + 0x100, 4)]);

        let drained = drain_queue_deferring(&mut queue, &mem, WAKEUP_BUDGET, |chain| {
            (chain.head_index() != kept).then_some(4)
        })
        .unwrap();

        assert_eq!(
            (drained.completed, drained.deferred, drained.bytes),
            (1, 1, 4)
        );
        assert_eq!(driver.used_idx(), 1);
        assert_eq!(driver.used(0), (u32::from(now), 4));
        // The device finishes the kept chain later, as an asynchronous completion does.
        queue.add_used(&mem, kept, 8).unwrap();
        assert_eq!(driver.used_idx(), 2);
        assert_eq!(driver.used(1), (u32::from(kept), 8));
    }

    #[test]
    fn drain_completes_every_chain_in_order_with_its_length() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        let a = driver.add(&[w(DATA, 8)]);
        let b = driver.add(&[r(DATA + 0x100, 4), w(DATA + 0x200, 16), w(DATA + 0x300, 4)]);

        let drained = drain_queue(&mut queue, &mem, fill).unwrap();

        assert_eq!(
            drained,
            Drained {
                completed: 2,
                notify: true,
                bytes: 28,
                more: false,
                deferred: 0,
            }
        );
        assert_eq!(driver.used_idx(), 2);
        assert_eq!(driver.used(0), (u32::from(a), 8));
        assert_eq!(driver.used(1), (u32::from(b), 20));
        assert_eq!(read_bytes(&mem, DATA + 0x200, 2), [0xab, 0xab]);
        // The readable buffer was not touched.
        assert_eq!(read_bytes(&mem, DATA + 0x100, 1), [0]);
    }

    #[test]
    fn drain_suppresses_driver_notifications_only_while_working() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        driver.add(&[w(DATA, 4)]);
        let mut flags_seen = Vec::new();

        drain_queue(&mut queue, &mem, |_| {
            flags_seen.push(driver.used_flags());
            0
        })
        .unwrap();

        // VRING_USED_F_NO_NOTIFY while the chain was handled, cleared afterwards.
        assert_eq!(flags_seen, [1]);
        assert_eq!(driver.used_flags(), 0);
    }

    /// Without VIRTIO_F_EVENT_IDX a driver that sets VRING_AVAIL_F_NO_INTERRUPT (a polling
    /// driver) gets no used-buffer notification; one that clears it gets one per wake-up.
    /// With the feature, `used_event` decides and the flag is ignored (2.7.10).
    #[test]
    fn a_driver_asking_for_no_interrupts_gets_none() {
        let mem = memory();
        for (event_idx, no_interrupt, wanted) in [
            (false, false, true),
            (false, true, false),
            (true, true, true),
        ] {
            let mut driver = Driver::new(&mem, 16);
            let mut queue = driver.queue();
            queue.set_event_idx(event_idx);
            let flags = if no_interrupt {
                VRING_AVAIL_F_NO_INTERRUPT
            } else {
                0
            };
            write_bytes(&mem, AVAIL_RING, &flags.to_le_bytes());
            driver.add(&[w(DATA, 4)]);
            let drained = drain_queue(&mut queue, &mem, |_| 0).unwrap();
            assert_eq!(drained.completed, 1);
            assert_eq!(
                drained.notify, wanted,
                "event_idx {event_idx}, NO_INTERRUPT {no_interrupt}"
            );
        }
    }

    #[test]
    fn drain_with_nothing_available_asks_for_no_interrupt() {
        let mem = memory();
        let driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();

        let drained = drain_queue(&mut queue, &mem, fill).unwrap();

        assert_eq!(drained, Drained::default());
        assert_eq!(driver.used_idx(), 0);
    }

    /// A staging device: records, at each chain it stages and each flush, how many used
    /// entries the driver can see.
    struct Recorder<'a> {
        driver: &'a Driver<'a>,
        staged: Vec<u16>,
        flushes: Vec<(usize, u16)>,
    }

    impl<'a> Recorder<'a> {
        fn new(driver: &'a Driver<'a>) -> Self {
            Self {
                driver,
                staged: Vec::new(),
                flushes: Vec::new(),
            }
        }
    }

    impl StagedChains for Recorder<'_> {
        fn stage(&mut self, chain: Chain<'_>) -> u32 {
            self.staged.push(self.driver.used_idx());
            chain_bytes(&chain) as u32
        }

        fn flush(&mut self) {
            self.flushes
                .push((self.staged.len(), self.driver.used_idx()));
        }
    }

    #[test]
    fn staged_chains_go_back_only_after_their_flush() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        let heads: Vec<u16> = (0..7)
            .map(|i| driver.add(&[w(DATA + 0x100 * i, 4)]))
            .collect();
        let mut device = Recorder::new(&driver);

        let drained = drain_queue_staged(&mut queue, &mem, 3, &mut device).unwrap();

        // Three, three, then the one left when the ring ran empty; nothing was on the used
        // ring before the flush of its batch.
        assert_eq!(device.flushes, [(3, 0), (6, 3), (7, 6)]);
        assert_eq!(device.staged, [0, 0, 0, 3, 3, 3, 6]);
        assert_eq!(drained.completed, 7);
        assert_eq!(driver.used_idx(), 7);
        for (i, &head) in heads.iter().enumerate() {
            assert_eq!(driver.used(i as u16), (u32::from(head), 4));
        }
    }

    #[test]
    fn staged_chains_before_a_broken_ring_are_flushed_and_served() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        let ok = driver.add(&[w(DATA, 4)]);
        driver.publish(16);
        driver.add(&[w(DATA, 4)]);
        let mut device = Recorder::new(&driver);

        let err = drain_queue_staged(&mut queue, &mem, 8, &mut device).unwrap_err();

        assert!(matches!(
            err,
            QueueError::HeadOutOfRange { head: 16, size: 16 }
        ));
        assert_eq!(device.flushes, [(1, 0)]);
        assert_eq!(driver.used_idx(), 1);
        assert_eq!(driver.used(0), (u32::from(ok), 4));
    }

    #[test]
    fn drain_stops_at_a_head_outside_the_queue() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        let ok = driver.add(&[w(DATA, 4)]);
        driver.publish(16);
        driver.add(&[w(DATA, 4)]);

        let err = drain_queue(&mut queue, &mem, fill).unwrap_err();

        // The chain before the bad head is served; nothing after it is.
        assert!(matches!(
            err,
            QueueError::HeadOutOfRange { head: 16, size: 16 }
        ));
        assert_eq!(driver.used_idx(), 1);
        assert_eq!(driver.used(0), (u32::from(ok), 4));
    }

    #[test]
    fn drain_ends_a_descriptor_loop() {
        let mem = memory();
        let driver = Driver::new(&mem, 8);
        let mut queue = driver.queue();
        // 0 -> 1 -> 0 -> ...: every descriptor writable, 4 bytes each.
        let flags = (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16;
        driver.write_desc(0, DATA, 4, flags, 1);
        driver.write_desc(1, DATA + 4, 4, flags, 0);
        driver.publish(0);

        let drained = drain_queue(&mut queue, &mem, fill).unwrap();

        // The chain is cut after a queue's worth (8) of descriptors.
        assert_eq!(drained.completed, 1);
        assert_eq!(driver.used(0), (0, 32));
    }

    #[test]
    fn drain_rejects_an_available_index_too_far_ahead() {
        let mem = memory();
        let driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        driver.set_avail_idx(17);

        let err = drain_queue(&mut queue, &mem, fill).unwrap_err();

        assert!(matches!(
            err,
            QueueError::Ring(virtio_queue::Error::InvalidAvailRingIndex)
        ));
        assert_eq!(driver.used_idx(), 0);
    }

    #[test]
    fn drain_with_event_idx_interrupts_only_when_used_event_is_passed() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        queue.set_event_idx(true);
        driver.set_used_event(5);
        driver.add(&[w(DATA, 4)]);

        // Used index moves 0 -> 1: the driver asked for an interrupt only after entry 5.
        assert!(!drain_queue(&mut queue, &mem, fill).unwrap().notify);

        driver.set_used_event(1);
        driver.add(&[w(DATA, 4)]);
        // 1 -> 2 passes used_event 1.
        assert!(drain_queue(&mut queue, &mem, fill).unwrap().notify);
        // With event idx the device publishes where it wants the next notification: avail_event
        // holds next_avail = 2.
        assert_eq!(driver.avail_event(), 2);
    }

    #[test]
    fn read_config_zero_fills_past_the_end() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];

        read_config(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config(&config, 9, &mut data);
        assert_eq!(data, [0; 4]);
        read_config(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn a_drain_stops_at_the_budget_and_says_there_is_more() {
        let mem = memory();
        let driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        // Three descriptors of 512 KiB over the same page range, posted ten times.
        for i in 0..3u16 {
            let flags = if i < 2 { 1 } else { 0 };
            driver.write_desc(i, DATA, 0x8_0000, flags, i + 1);
        }
        for _ in 0..10 {
            driver.publish(0);
        }
        let budget = Budget {
            chains: 100,
            bytes: 4 << 20,
        };
        let mut handled = 0;
        let drained = drain_queue_within(&mut queue, &mem, budget, |_| {
            handled += 1;
            0
        })
        .unwrap();
        // 1.5 MiB a chain: the third reaches the 4 MiB budget.
        assert_eq!((handled, drained.completed, drained.more), (3, 3, true));
        let budget = Budget {
            chains: 4,
            bytes: u64::MAX,
        };
        let drained = drain_queue_within(&mut queue, &mem, budget, |_| 0).unwrap();
        assert_eq!((drained.completed, drained.more), (4, true));
        let drained = drain_queue_within(&mut queue, &mem, budget, |_| 0).unwrap();
        assert_eq!((drained.completed, drained.more), (3, false));
        assert_eq!(driver.used_idx(), 10);
    }
}
