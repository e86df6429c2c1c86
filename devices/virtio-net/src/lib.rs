//! virtio-net over a tap: virtio 1.2 section 5.1.
//!
//! One queue pair, `receiveq1` (0) and `transmitq1` (1), or with `VIRTIO_NET_F_MQ` (5.1.6.5.5)
//! up to [`MAX_QUEUE_PAIRS`] and the control queue after them ([`ctrl`]), each pair on a
//! multi-queue tap's queue of its own and served on a worker thread of its own
//! ([`NetQueuePair`]). Every
//! frame on either queue starts with the 12-byte `struct virtio_net_hdr_v1` (5.1.6), which is
//! also what the tap exchanges with us ([`crate::tap`]), so frames move through unchanged except
//! for `num_buffers`, which the device fills on receive.
//!
//! Offered: the MAC address and link status in configuration space (5.1.4, the link is always
//! up), mergeable receive buffers (`VIRTIO_NET_F_MRG_RXBUF`, 5.1.6.3.2), and checksum and TSO
//! offloads both ways. What the tap may hand us is set with `TUNSETOFFLOAD` from what the
//! driver accepted (`GUEST_CSUM`, `GUEST_TSO4/6`, `GUEST_ECN`), so the guest never receives a
//! frame it did not agree to.
//!
//! Receiving is driven by the tap's readability (edge-triggered: we read until `EAGAIN`), or by
//! a timer while frames stream in, and by the driver adding receive buffers; a frame that finds
//! no buffer waits in the device, the tap unwatched, until the driver adds some (with
//! notifications re-enabled, 2.7.10). [`moderation`] says when the worker polls and why. A
//! frame larger than the
//! buffers the driver gave without `MRG_RXBUF` is dropped and the buffer returned empty.
//!
//! A received frame is read from the tap straight into the next receive chain (one `readv`:
//! the chain's buffers, then the device's own buffer for what does not fit them, which with
//! `MRG_RXBUF` goes on into more chains), so the kernel's copy is the only one. With
//! `MRG_RXBUF` the read also takes the chains after the first, until they hold as much as the
//! last frame did, and gives back those the frame leaves empty: a stream of 64 KiB (GSO) frames
//! in 1.5–4 KiB buffers is read with no copy of ours either. A frame merged
//! over several chains has its used elements published with one index update (5.1.6.4: the
//! driver takes `num_buffers` elements as soon as it sees the first).
//!
//! [`process_rx`] and [`process_tx`] are plain functions over a queue, guest memory and a
//! [`NetBackend`] (a [`Tap`](crate::tap::Tap), or [`Loopback`] in tests and fuzzing).

#![warn(missing_docs)]

pub mod ctrl;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod moderation;
pub mod tap;
pub mod tx_ring;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::timerfd::TimerFd;

use crate::moderation::{RxModeration, RxWake, Watch, RX_POLL_PERIOD};
use crate::tap::{offload, VNET_HDR_LEN};
use virtio::events::{DeviceRuntime, Dispatch, FIRST_DEVICE_TOKEN};
use virtio::queue::{
    checked_head, drain_queue_staged, features, read_config, Chain, Drained, ErrorLog, QueueError,
    StagedChains,
};
use virtio::{device_type, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Receive queue index.
pub const RX: usize = 0;
/// Transmit queue index.
pub const TX: usize = 1;
/// The largest frame with its header: a 64 KiB (GSO) IP packet behind an Ethernet header with
/// a VLAN tag, and the virtio-net header.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 18 + 65535;
/// Event data of the backend's file descriptor.
pub const BACKEND_TOKEN: u32 = FIRST_DEVICE_TOKEN;
/// Event data of a queue pair's receive polling timer ([`moderation`]).
pub const RX_TIMER_TOKEN: u32 = FIRST_DEVICE_TOKEN - 1;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS: usize = 10;

/// Feature bits of the network device (5.1.3).
pub mod feature {
    /// `VIRTIO_NET_F_CSUM`: the device takes frames with a partial checksum for it (the tap)
    /// to complete.
    pub const CSUM: u64 = 1 << 0;
    /// `VIRTIO_NET_F_GUEST_CSUM`: the driver takes received frames with a partial checksum.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// `VIRTIO_NET_F_MAC`: the configuration space holds the MAC address (5.1.4).
    pub const MAC: u64 = 1 << 5;
    /// `VIRTIO_NET_F_GUEST_TSO4`: the driver takes received TCP/IPv4 segments larger than the
    /// MTU.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// `VIRTIO_NET_F_GUEST_TSO6`: the same for TCP/IPv6.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// `VIRTIO_NET_F_GUEST_ECN`: received large segments may carry ECN.
    pub const GUEST_ECN: u64 = 1 << 9;
    /// `VIRTIO_NET_F_HOST_TSO4`: the device takes TCP/IPv4 segments larger than the MTU to
    /// send.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// `VIRTIO_NET_F_HOST_TSO6`: the same for TCP/IPv6.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// `VIRTIO_NET_F_HOST_ECN`: large segments to send may carry ECN.
    pub const HOST_ECN: u64 = 1 << 13;
    /// `VIRTIO_NET_F_MRG_RXBUF`: a received frame may span several receive buffers, their
    /// count in the header's `num_buffers` (5.1.6.3.2).
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// `VIRTIO_NET_F_STATUS`: the configuration space holds the link status (5.1.4).
    pub const STATUS: u64 = 1 << 16;
    /// `VIRTIO_NET_F_CTRL_VQ`: the device has a control queue (5.1.6.5).
    pub const CTRL_VQ: u64 = 1 << 17;
    /// `VIRTIO_NET_F_MQ`: several receive/transmit queue pairs, steered by the device
    /// (5.1.6.5.5); the configuration space holds their number.
    pub const MQ: u64 = 1 << 22;
}

/// `VIRTIO_NET_S_LINK_UP` in the status field.
pub const LINK_UP: u16 = 1;

/// Where frames come from and go to. Each read and write is one whole frame, header included.
pub trait NetBackend: Send {
    /// Reads the next frame into `buf`; `ErrorKind::WouldBlock` when there is none.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Reads the next frame into the guest-memory `buffers`, in order, and what of it does not
    /// fit them into `overflow`, from its start; returns the frame's length. Each buffer lies
    /// in one region of `mem` (the caller checked). The default reads the frame into
    /// `overflow` and copies its head out; a tap reads into guest memory directly.
    fn read_frame_into(
        &mut self,
        mem: &GuestMemoryMmap,
        buffers: &[(GuestAddress, u32)],
        overflow: &mut [u8],
    ) -> io::Result<usize> {
        let n = self.read_frame(overflow)?;
        let mut at = 0;
        for &(addr, len) in buffers {
            let take = (n - at).min(len as usize);
            mem.write_slice(&overflow[at..at + take], addr)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            at += take;
        }
        overflow.copy_within(at..n, 0);
        Ok(n)
    }
    /// Sends one frame.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Sends one frame made of the guest-memory `buffers`, in order. The default gathers them
    /// into `scratch` and calls [`write_frame`](Self::write_frame); a tap hands them to the
    /// kernel where they are.
    fn write_frame_from(
        &mut self,
        mem: &GuestMemoryMmap,
        buffers: &[(GuestAddress, u32)],
        scratch: &mut Vec<u8>,
    ) -> Result<(), SendError> {
        gather_frame(mem, buffers.iter().copied(), scratch)?;
        Ok(self.write_frame(scratch)?)
    }
    /// How many frames [`stage_frame_from`](Self::stage_frame_from) holds before
    /// [`send_staged`](Self::send_staged) must send them: 1 for a backend that sends each
    /// frame at once.
    fn staging_capacity(&self) -> usize {
        1
    }
    /// Takes the frame made of the guest-memory `buffers` to send with the next
    /// [`send_staged`](Self::send_staged), after the frames staged before it; `refused` hears
    /// of those when they must go out first. The default sends the frame at once.
    fn stage_frame_from(
        &mut self,
        mem: &GuestMemoryMmap,
        buffers: &[(GuestAddress, u32)],
        scratch: &mut Vec<u8>,
        refused: &mut dyn FnMut(SendError),
    ) -> Result<(), SendError> {
        let _ = refused;
        self.write_frame_from(mem, buffers, scratch)
    }
    /// Sends the frames staged, in order: when it returns, none of their buffers is read any
    /// more. `refused` hears of each frame that did not go out.
    fn send_staged(&mut self, refused: &mut dyn FnMut(SendError)) {
        let _ = refused;
    }
    /// Attaches (`true`) or detaches this queue of a multi-queue backend: a detached queue gets
    /// no frames, and the backend serves the flows it had on the others. Backends with one
    /// queue ignore it.
    fn set_enabled(&mut self, enabled: bool) -> io::Result<()> {
        let _ = enabled;
        Ok(())
    }
    /// Sets the `TUNSETOFFLOAD` flags (see [`crate::tap::offload`]).
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
    /// The descriptor to watch for incoming frames, if any.
    fn raw_fd(&self) -> Option<RawFd>;
}

/// Why a frame to send did not go out: the guest's fault or the backend's.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// A buffer of the frame is not in guest memory.
    #[error("a buffer is outside guest memory")]
    Buffer,
    /// The backend refused the frame.
    #[error("the backend refused it: {0}")]
    Backend(#[from] io::Error),
}

/// Copies the guest-memory `buffers` of a frame into `scratch`, one after the other.
pub(crate) fn gather_frame(
    mem: &GuestMemoryMmap,
    buffers: impl IntoIterator<Item = (GuestAddress, u32)>,
    scratch: &mut Vec<u8>,
) -> Result<(), SendError> {
    scratch.clear();
    for (addr, len) in buffers {
        let start = scratch.len();
        scratch.resize(start + len as usize, 0);
        mem.read_slice(&mut scratch[start..], addr)
            .map_err(|_| SendError::Buffer)?;
    }
    Ok(())
}

/// A backend in memory, for tests and fuzzing: frames queued in `incoming` are received by the
/// guest, frames the guest sends land in `sent`.
#[derive(Debug, Default)]
pub struct Loopback {
    /// Frames waiting to be received.
    pub incoming: VecDeque<Vec<u8>>,
    /// Frames sent by the guest.
    pub sent: Vec<Vec<u8>>,
    /// The last offload flags set.
    pub offload: Option<u32>,
    /// Whether the queue was detached ([`NetBackend::set_enabled`]).
    pub detached: bool,
    /// How many frames to send it stages before they must be sent (0: it sends each at once),
    /// as a tap on io_uring does.
    pub staging: usize,
    /// Frames staged and not sent yet.
    pub staged: Vec<Vec<u8>>,
}

impl NetBackend for Loopback {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self.incoming.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        // Like a datagram socket: a frame longer than the buffer is cut.
        (&frame[..]).read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.sent.push(frame.to_vec());
        Ok(())
    }

    fn staging_capacity(&self) -> usize {
        self.staging.max(1)
    }

    fn stage_frame_from(
        &mut self,
        mem: &GuestMemoryMmap,
        buffers: &[(GuestAddress, u32)],
        scratch: &mut Vec<u8>,
        refused: &mut dyn FnMut(SendError),
    ) -> Result<(), SendError> {
        if self.staged.len() >= self.staging {
            self.send_staged(refused);
            return self.write_frame_from(mem, buffers, scratch);
        }
        gather_frame(mem, buffers.iter().copied(), scratch)?;
        self.staged.push(scratch.clone());
        Ok(())
    }

    fn send_staged(&mut self, _refused: &mut dyn FnMut(SendError)) {
        self.sent.append(&mut self.staged);
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.offload = Some(flags);
        Ok(())
    }

    fn set_enabled(&mut self, enabled: bool) -> io::Result<()> {
        self.detached = !enabled;
        Ok(())
    }

    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

/// The most buffers of one frame to send that are handed to the backend as a list; a longer
/// chain (which no driver builds: Linux uses at most 19) is copied into one buffer first.
pub const MAX_TX_BUFFERS: usize = 32;

/// Sends every frame on the transmit queue. Frames shorter than the header, longer than
/// [`MAX_FRAME`] or outside guest memory are dropped; all chains are returned with length 0
/// (the device writes nothing). A frame goes to the backend as the list of its buffers
/// ([`NetBackend::stage_frame_from`]: a tap takes them straight from guest memory, up to
/// [`tx_ring::TX_BATCH`] frames per system call), or copied into `buf` when its chain has more
/// than [`MAX_TX_BUFFERS`] of them; a chain goes back to the driver once its frame was sent.
pub fn process_tx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    backend: &mut dyn NetBackend,
    buf: &mut Vec<u8>,
    errors: &mut ErrorLog,
) -> Result<Drained, QueueError> {
    let batch = backend.staging_capacity();
    drain_queue_staged(
        queue,
        mem,
        batch,
        &mut TxStaging {
            backend,
            buf,
            errors,
        },
    )
}

/// The transmit queue's chains staged as frames on the backend: a chain goes back to the
/// driver once the backend has sent its frame.
struct TxStaging<'a> {
    backend: &'a mut dyn NetBackend,
    buf: &'a mut Vec<u8>,
    errors: &'a mut ErrorLog,
}

impl StagedChains for TxStaging<'_> {
    fn stage(&mut self, chain: Chain<'_>) -> u32 {
        let mem = chain.memory();
        let mut buffers = [(GuestAddress(0), 0u32); MAX_TX_BUFFERS];
        let mut count = 0;
        let mut len = 0usize;
        for desc in chain.clone().readable() {
            if let Some(slot) = buffers.get_mut(count) {
                *slot = (desc.addr(), desc.len());
            }
            count += 1;
            len = len.saturating_add(desc.len() as usize);
        }
        if !(VNET_HDR_LEN..=MAX_FRAME).contains(&len) {
            self.errors
                .warn(format_args!("dropped a frame to send of {len} bytes"));
            return 0;
        }
        let errors = &mut *self.errors;
        let mut refused = |e: SendError| errors.warn(format_args!("dropped a frame to send: {e}"));
        let sent = match buffers.get(..count) {
            Some(buffers) => self
                .backend
                .stage_frame_from(mem, buffers, self.buf, &mut refused),
            None => {
                // More buffers than a frame to stage holds: gathered and sent after the
                // frames staged before it.
                self.backend.send_staged(&mut refused);
                let all = chain.clone().readable().map(|d| (d.addr(), d.len()));
                gather_frame(mem, all, self.buf)
                    .and_then(|()| self.backend.write_frame(self.buf).map_err(SendError::from))
            }
        };
        if let Err(e) = sent {
            refused(e);
        }
        0
    }

    fn flush(&mut self) {
        let errors = &mut *self.errors;
        self.backend
            .send_staged(&mut |e| errors.warn(format_args!("dropped a frame to send: {e}")));
    }
}

/// The receive side's state between rounds: a frame read from the backend that is still
/// waiting for guest buffers, and whether buffers may be merged.
pub struct RxState {
    /// A frame read whole, or the rest of one whose head is in the chains of `used`.
    frame: Vec<u8>,
    /// The bytes at the start of `frame` still to be placed (0: no frame waits).
    pending: usize,
    mergeable: bool,
    /// The used elements of the frame being placed: with mergeable buffers, the chains that
    /// hold its head while the rest waits for more.
    used: Vec<(u16, u32)>,
    /// Where the frame's `num_buffers` is when its head is in the first chain of `used`.
    num_buffers: GuestAddress,
    /// The chains taken for the rest of a frame.
    taken: Taken,
    /// The length of the last frame read straight into guest buffers: with mergeable buffers,
    /// the next read takes chains ahead until they hold this much.
    expect: usize,
    /// Where [`read_next`] lists the buffers and chains of a direct read: kept here rather
    /// than on its stack, which it would otherwise fill with zeros for every frame.
    direct: Box<DirectRead>,
}

/// The buffers of one direct read and the chains they come from.
struct DirectRead {
    buffers: [(GuestAddress, u32); MAX_RX_BUFFERS],
    chains: [RxChain; MAX_RX_BUFFERS],
}

impl Default for RxState {
    fn default() -> Self {
        Self {
            frame: vec![0; MAX_FRAME],
            pending: 0,
            mergeable: false,
            used: Vec::new(),
            num_buffers: GuestAddress(0),
            taken: Taken::default(),
            expect: 0,
            direct: Box::new(DirectRead {
                buffers: [(GuestAddress(0), 0); MAX_RX_BUFFERS],
                chains: [RxChain::default(); MAX_RX_BUFFERS],
            }),
        }
    }
}

impl RxState {
    /// State for a driver that did (`true`) or did not negotiate `VIRTIO_NET_F_MRG_RXBUF`.
    pub fn new(mergeable: bool) -> Self {
        Self {
            mergeable,
            ..Self::default()
        }
    }

    /// Whether a frame waits for guest buffers.
    pub fn has_pending(&self) -> bool {
        self.pending > 0
    }

    /// Drops a waiting frame (the device was reset, and with it the queue that held the chains
    /// of the frame's head).
    pub fn clear(&mut self) {
        self.pending = 0;
        self.used.clear();
        self.expect = 0;
    }

    /// The length of the waiting frame, header included.
    fn waiting_len(&self) -> usize {
        let head: usize = self.used.iter().map(|&(_, len)| len as usize).sum();
        head + self.pending
    }
}

/// What one [`process_rx`] round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RxOutcome {
    /// Frames handed to the guest.
    pub delivered: usize,
    /// Frames dropped (too short, or too large for the guest's buffer).
    pub dropped: usize,
    /// Whether the driver wants an interrupt.
    pub notify: bool,
}

enum Delivery {
    Done,
    /// The frame was dropped; `returned` tells whether a buffer went back to the driver.
    Dropped {
        returned: bool,
    },
    NoBuffers,
}

/// Chains taken from the receive queue for the rest of one frame: each chain's head and where
/// its buffers end in `buffers`, or `None` when one of them is outside guest memory (the chain
/// then takes nothing and goes back with a used length of 0).
#[derive(Debug, Default)]
struct Taken {
    chains: Vec<(u16, Option<usize>)>,
    buffers: Vec<(GuestAddress, u32)>,
}

/// Mergeable buffers (5.1.6.3.2): takes chains until they hold `need` bytes. `popped` chains
/// were taken for the frame already (a whole queue that cannot hold it never will: then the
/// frame is dropped). On `NoBuffers` or `Dropped` the chains taken here are given back.
fn take_chains(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    need: usize,
    mut popped: usize,
    taken: &mut Taken,
) -> Result<Option<Delivery>, QueueError> {
    let mut capacity = 0usize;
    taken.chains.clear();
    taken.buffers.clear();
    let size = queue.size();
    // One pass over the available ring (its index read once) for all the chains taken.
    let mut available = queue.iter(mem)?;
    while capacity < need {
        let full = popped >= usize::from(size);
        let chain = if full { None } else { available.next() };
        let Some(chain) = chain else {
            for _ in 0..taken.chains.len() {
                available.go_to_previous_position();
            }
            taken.chains.clear();
            return Ok(Some(if full {
                Delivery::Dropped { returned: false }
            } else {
                Delivery::NoBuffers
            }));
        };
        popped += 1;
        let head = checked_head(chain.head_index(), size)?;
        let start = taken.buffers.len();
        match writable_buffers(chain, mem, |buffer| {
            taken.buffers.push(buffer);
            true
        }) {
            Some(bytes) => {
                capacity += bytes;
                taken.chains.push((head, Some(taken.buffers.len())));
            }
            None => {
                taken.buffers.truncate(start);
                taken.chains.push((head, None));
            }
        }
    }
    Ok(None)
}

/// Writes `data` across the `taken` chains in order and records each chain's used length.
fn write_across(mem: &GuestMemoryMmap, taken: &Taken, mut data: &[u8], used: &mut Vec<(u16, u32)>) {
    let mut start = 0;
    for &(head, end) in &taken.chains {
        let mut n = 0;
        if let Some(end) = end {
            for &(addr, len) in &taken.buffers[start..end] {
                let take = data.len().min(len as usize);
                // take_chains found the buffer in guest memory, which does not change.
                if data.is_empty() || mem.write_slice(&data[..take], addr).is_err() {
                    break;
                }
                data = &data[take..];
                n += take;
            }
            start = end;
        }
        used.push((head, n as u32));
    }
}

/// Puts a frame's used elements on the used ring and makes them visible to the driver at once.
///
/// A driver that sees the first element of a merged frame reads `num_buffers` from its header
/// and takes the other elements right away: Linux drops the frame ("rx error: buffers
/// missing") if they are not there yet. virtio-queue's `add_used` publishes the used index per
/// element, so the elements but the last are written here and `add_used` writes the last and
/// stores the index that covers them all, with release ordering. The queue then counts one
/// element where there were several: [`needs_interrupt`] counts from where the round began.
fn publish_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    entries: &[(u16, u32)],
) -> Result<(), QueueError> {
    let Some((&(last_head, last_len), rest)) = entries.split_last() else {
        return Ok(());
    };
    let size = queue.size();
    for &(head, _) in entries {
        checked_head(head, size)?;
    }
    let start = queue.next_used();
    if !rest.is_empty() {
        // The used ring: flags, idx, then `size` elements of (id, len), le32 each (2.7.8).
        let ring = GuestAddress(queue.used_ring())
            .checked_add(4)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let element = |head: u16, len: u32| (u64::from(len) << 32 | u64::from(head)).to_le();
        match mem.get_slice(ring, usize::from(size) * 8) {
            Ok(elements) => {
                for (i, &(head, len)) in rest.iter().enumerate() {
                    let slot = usize::from(start.wrapping_add(i as u16) % size);
                    elements
                        .write_obj(element(head, len), slot * 8)
                        .map_err(|e| virtio_queue::Error::GuestMemory(e.into()))?;
                }
            }
            // A ring across two regions of guest memory: an element at a time.
            Err(_) => {
                for (i, &(head, len)) in rest.iter().enumerate() {
                    let slot = u64::from(start.wrapping_add(i as u16) % size);
                    mem.write_obj(element(head, len), ring.unchecked_add(slot * 8))
                        .map_err(virtio_queue::Error::GuestMemory)?;
                }
            }
        }
    }
    queue.set_next_used(start.wrapping_add(rest.len() as u16));
    queue.add_used(mem, last_head, last_len)?;
    Ok(())
}

/// Whether the driver wants an interrupt for the used elements added since the used index was
/// `old` (2.7.10): with `VIRTIO_F_EVENT_IDX`, when `used_event` is among them. Counted here and
/// not by the queue, which [`publish_used`] tells of one element per frame.
fn needs_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap, old: u16) -> Result<bool, QueueError> {
    // Also orders the used ring's writes before the read of `used_event`, and resets the
    // queue's own count.
    let without_event_idx = virtio::queue::needs_interrupt(queue, mem)?;
    if !queue.event_idx_enabled() {
        return Ok(without_event_idx);
    }
    // `used_event` follows the available ring's `size` entries (2.7.6).
    let used_event = GuestAddress(queue.avail_ring())
        .checked_add(4 + 2 * u64::from(queue.size()))
        .ok_or(virtio_queue::Error::AddressOverflow)?;
    let used_event = u16::from_le(
        mem.load(used_event, Ordering::Relaxed)
            .map_err(virtio_queue::Error::GuestMemory)?,
    );
    let new = queue.next_used();
    Ok(new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old))
}

/// Places the frame waiting in `rx` into the guest's receive buffers: the whole frame, or with
/// mergeable buffers the rest of one whose head holds chains already.
fn deliver(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    rx: &mut RxState,
) -> Result<Delivery, QueueError> {
    let frame = &mut rx.frame[..rx.pending];
    if !rx.mergeable {
        loop {
            let Some(chain) = queue.iter(mem)?.next() else {
                return Ok(Delivery::NoBuffers);
            };
            let head = checked_head(chain.head_index(), queue.size())?;
            let Ok(mut writer) = chain.clone().writer(mem) else {
                queue.add_used(mem, head, 0)?;
                continue;
            };
            if writer.available_bytes() < frame.len() {
                queue.add_used(mem, head, 0)?;
                return Ok(Delivery::Dropped { returned: true });
            }
            frame[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&1u16.to_le_bytes());
            let len = match writer.write_all(frame) {
                Ok(()) => frame.len() as u32,
                Err(_) => 0,
            };
            queue.add_used(mem, head, len)?;
            return Ok(Delivery::Done);
        }
    }
    let held = rx.used.len();
    if let Some(outcome) = take_chains(queue, mem, frame.len(), held, &mut rx.taken)? {
        if let Delivery::Dropped { .. } = outcome {
            // The chains of the frame's head go back with it.
            give_back(queue, held);
            rx.used.clear();
        }
        return Ok(outcome);
    }
    // At most a queue's worth of buffers, so this fits.
    let count = u16::try_from(held + rx.taken.chains.len()).unwrap_or(u16::MAX);
    if held == 0 {
        frame[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&count.to_le_bytes());
    } else {
        mem.write_obj(count.to_le(), rx.num_buffers)
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    write_across(mem, &rx.taken, frame, &mut rx.used);
    publish_used(queue, mem, &rx.used)?;
    rx.used.clear();
    Ok(Delivery::Done)
}

/// The most guest buffers one frame is read straight into: the first receive chain's and, with
/// mergeable buffers, those of the chains taken ahead for it (a 64 KiB frame in Linux's 1.5 to
/// 4 KiB mergeable buffers takes 16 to 43). A first chain with more (Linux's big-packet chains
/// have 19) still fits; one with more than this takes the frame through `RxState::frame`.
pub const MAX_RX_BUFFERS: usize = 64;

/// A receive chain taken for a direct read: its head and how many bytes its buffers hold.
#[derive(Debug, Default, Clone, Copy)]
struct RxChain {
    head: u16,
    capacity: usize,
}

/// What [`read_next`] did with the next frame.
enum NextFrame {
    /// The frame (or what the backend returned) is in `RxState::frame`, this many bytes.
    Frame(usize),
    /// The frame's head is in the chains of `RxState::used` and this many bytes of its rest
    /// are in `RxState::frame`, for more chains.
    Rest(usize),
    /// The frame went straight into the guest's buffers and is on the used ring.
    Placed,
    /// The frame did not fit the buffers and was dropped; `returned`: a buffer went back.
    TooBig { len: usize, returned: bool },
    /// The backend failed (`WouldBlock`: it has no frame).
    Failed(io::Error),
}

/// Hands the writable buffers of `chain` (empty ones skipped) to `push` in order, each checked
/// to lie in one region of guest memory; returns the bytes they hold, or `None` when one does
/// not or `push` takes no more.
fn writable_buffers(
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    mut push: impl FnMut((GuestAddress, u32)) -> bool,
) -> Option<usize> {
    let mut bytes = 0;
    for desc in chain.writable() {
        if desc.len() == 0 {
            continue;
        }
        mem.get_slice(desc.addr(), desc.len() as usize).ok()?;
        if !push((desc.addr(), desc.len())) {
            return None;
        }
        bytes += desc.len() as usize;
    }
    Some(bytes)
}

/// Gives the last `chains` chains taken from the queue back to the driver.
fn give_back(queue: &mut Queue, chains: usize) {
    for _ in 0..chains {
        queue.go_to_previous_position();
    }
}

/// Reads the next frame from the backend, straight into the guest's receive buffers where it
/// can: the next chain's, and with mergeable buffers those of the chains after it, taken ahead
/// until they hold as much as the last frame read (a stream of large frames then needs no copy
/// of ours; the chains the frame does not fill go back to the driver). A chain is read into
/// when its buffers each lie in one region of guest memory, the first chain's first holds the
/// header, and the read has at most [`MAX_RX_BUFFERS`]. Whatever of the frame does not fit goes
/// to `rx.frame`; with mergeable buffers it then goes on into more chains, which the frame
/// waits for if there are none yet, its head keeping the chains it is in. Otherwise, and when
/// the queue has no chain for it, the frame is read into `rx.frame` for [`deliver`].
fn read_next(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    backend: &mut dyn NetBackend,
    rx: &mut RxState,
) -> Result<NextFrame, QueueError> {
    let DirectRead { buffers, chains } = &mut *rx.direct;
    let (mut taken, mut count, mut capacity) = (0, 0, 0);
    let size = queue.size();
    // One pass over the available ring (its index read once) for all the chains taken.
    let mut available = queue.iter(mem)?;
    while taken == 0 || (rx.mergeable && capacity < rx.expect && taken < chains.len()) {
        let Some(chain) = available.next() else {
            break;
        };
        let head = checked_head(chain.head_index(), size)?;
        let mut end = count;
        let pushed = writable_buffers(chain, mem, |buffer| match buffers.get_mut(end) {
            Some(slot) => {
                *slot = buffer;
                end += 1;
                true
            }
            None => false,
        });
        match pushed {
            // A chain with buffers, the first one's first big enough for the header.
            Some(bytes) if end > count && (taken > 0 || buffers[0].1 as usize >= VNET_HDR_LEN) => {
                chains[taken] = RxChain {
                    head,
                    capacity: bytes,
                };
                taken += 1;
                count = end;
                capacity += bytes;
            }
            _ => {
                available.go_to_previous_position();
                break;
            }
        }
    }
    if taken == 0 {
        return Ok(match backend.read_frame(&mut rx.frame) {
            Ok(n) => NextFrame::Frame(n),
            Err(e) => NextFrame::Failed(e),
        });
    }
    let n = match backend.read_frame_into(mem, &buffers[..count], &mut rx.frame) {
        Ok(n) if n >= VNET_HDR_LEN => n.min(capacity + rx.frame.len()),
        other => {
            // No frame, or a runt (dropped by the caller): the chains stay the driver's.
            give_back(queue, taken);
            return Ok(match other {
                Ok(n) => NextFrame::Frame(n),
                Err(e) => NextFrame::Failed(e),
            });
        }
    };
    rx.expect = n;
    rx.num_buffers = GuestAddress(buffers[0].0 .0 + NUM_BUFFERS as u64);
    // The chains the frame fills, each with the bytes it got; the others go back.
    rx.used.clear();
    let mut placed = 0;
    for chain in &chains[..taken] {
        if placed == n {
            break;
        }
        let len = (n - placed).min(chain.capacity);
        rx.used.push((chain.head, len as u32));
        placed += len;
    }
    give_back(queue, taken - rx.used.len());
    if n <= capacity {
        let count = u16::try_from(rx.used.len()).unwrap_or(u16::MAX);
        mem.write_obj(count.to_le(), rx.num_buffers)
            .map_err(virtio_queue::Error::GuestMemory)?;
        publish_used(queue, mem, &rx.used)?;
        rx.used.clear();
        return Ok(NextFrame::Placed);
    }
    if !rx.mergeable {
        rx.used.clear();
        queue.add_used(mem, chains[0].head, 0)?;
        return Ok(NextFrame::TooBig {
            len: n,
            returned: true,
        });
    }
    // The rest of the frame is at the start of `rx.frame`, for more chains.
    Ok(NextFrame::Rest(n - capacity))
}

/// Retries of a frame that found too few buffers while the driver keeps adding some.
const MAX_IDLE_ROUNDS: u32 = 64;

/// Asks the driver to notify us when it adds receive buffers, counting from the ones already
/// available (which may be too few for the frame at hand, so they stay un-popped). Returns true
/// if buffers were added meanwhile.
///
/// `enable_notification` would ask for a notification at `next_avail`, which is behind the
/// buffers we gave back, and with `VIRTIO_F_EVENT_IDX` the driver would then never notify; so
/// `next_avail` is moved to the available index for the call.
fn wait_for_buffers(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
    let seen = queue.avail_idx(mem, Ordering::Acquire)?.0;
    let next = queue.next_avail();
    queue.set_next_avail(seen);
    let more = queue.enable_notification(mem);
    queue.set_next_avail(next);
    Ok(more?)
}

/// Moves frames from the backend into the receive queue until the backend has none or the
/// guest has no buffers left (then notifications are re-enabled so the driver tells us when it
/// adds some, and the frame at hand waits in `rx`). Frames go straight from the backend into
/// the guest's buffers where the buffers allow it ([`NetBackend::read_frame_into`]).
///
/// While the guest has buffers the device does not need to hear of new ones: the next frame
/// looks at the available ring anyway. So notifications stay off until the buffers run out
/// (5.1.6.3: the driver adds buffers without knowing when frames come); a driver that keeps
/// the queue stocked would otherwise notify on almost every buffer it adds back.
pub fn process_rx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    backend: &mut dyn NetBackend,
    rx: &mut RxState,
    errors: &mut ErrorLog,
) -> Result<RxOutcome, QueueError> {
    queue.disable_notification(mem)?;
    let first_used = queue.next_used();
    let mut out = RxOutcome::default();
    let mut used = false;
    let mut idle_rounds = 0;
    loop {
        if rx.pending == 0 {
            match read_next(queue, mem, backend, rx)? {
                NextFrame::Placed => {
                    out.delivered += 1;
                    used = true;
                    idle_rounds = 0;
                    continue;
                }
                NextFrame::TooBig { len, returned } => {
                    errors.warn(format_args!(
                        "dropped a received frame of {len} bytes: the guest's buffers are smaller"
                    ));
                    out.dropped += 1;
                    used |= returned;
                    idle_rounds = 0;
                    continue;
                }
                NextFrame::Frame(n) if n >= VNET_HDR_LEN => rx.pending = n,
                NextFrame::Rest(rest) => rx.pending = rest,
                NextFrame::Frame(0) => break,
                NextFrame::Frame(n) => {
                    errors.warn(format_args!("dropped a received frame of {n} bytes"));
                    out.dropped += 1;
                    continue;
                }
                NextFrame::Failed(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                NextFrame::Failed(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                NextFrame::Failed(e) => {
                    errors.warn(format_args!("reading a frame failed: {e}"));
                    break;
                }
            }
        }
        let len = rx.waiting_len();
        match deliver(queue, mem, rx)? {
            Delivery::Done => {
                rx.pending = 0;
                out.delivered += 1;
                used = true;
                idle_rounds = 0;
            }
            Delivery::Dropped { returned } => {
                errors.warn(format_args!(
                    "dropped a received frame of {len} bytes: the guest's buffers are smaller"
                ));
                rx.pending = 0;
                out.dropped += 1;
                used |= returned;
                idle_rounds = 0;
            }
            Delivery::NoBuffers => {
                if !wait_for_buffers(queue, mem)? {
                    break;
                }
                // Buffers arrived while we looked: try again, but not forever.
                idle_rounds += 1;
                if idle_rounds > MAX_IDLE_ROUNDS {
                    return Err(QueueError::Stalled);
                }
            }
        }
    }
    out.notify = used && needs_interrupt(queue, mem, first_used)?;
    Ok(out)
}

/// The largest number of queue pairs a device takes (`--net tap=NAME,queues=N`): each is a tap
/// queue, two MSI-X vectors and a worker thread.
pub const MAX_QUEUE_PAIRS: usize = 16;

/// One receive queue and one transmit queue with the tap queue behind them, served on a worker
/// of its own (the device's first pair shares the device's worker).
pub struct NetQueuePair {
    /// The pair's number: its queues are `2 * index` and `2 * index + 1`.
    index: u16,
    backend: Box<dyn NetBackend>,
    runtime: DeviceRuntime,
    rx: RxState,
    tx_buf: Vec<u8>,
    /// Whether the tap is registered with the worker's epoll (while the pair runs).
    backend_watched: bool,
    moderation: RxModeration,
    /// Polls the tap while frames stream in ([`moderation`]); one-shot, edge-triggered.
    rx_timer: TimerFd,
    /// What is armed now: the tap's readability (when registered) and the timer.
    watching: Watch,
    /// Whether the driver uses the pair (5.1.6.5.5: only the first until it sets more); a
    /// pair not in use has its tap queue detached and is not served.
    enabled: bool,
    errors: ErrorLog,
}

impl NetQueuePair {
    fn new(index: u16, backend: Box<dyn NetBackend>, errors: ErrorLog) -> io::Result<Self> {
        Ok(Self {
            index,
            backend,
            runtime: DeviceRuntime::new()?,
            rx: RxState::default(),
            tx_buf: Vec::new(),
            backend_watched: false,
            moderation: RxModeration::default(),
            rx_timer: TimerFd::new()?,
            watching: Watch {
                tap: true,
                timer: false,
            },
            enabled: index == 0,
            errors,
        })
    }

    /// Turns the pair on or off for the driver: its tap queue is attached or detached first
    /// (a detached one gets no frames: the tap sends their flows to the queues in use), then
    /// the pair's worker is woken to watch the tap, or not, and serve the queues.
    fn set_enabled(&mut self, enabled: bool) -> io::Result<()> {
        self.backend.set_enabled(enabled)?;
        if enabled != self.enabled {
            self.enabled = enabled;
            self.runtime.wake()?;
        }
        Ok(())
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
        acked: u64,
    ) -> Result<(), ActivateError> {
        self.rx = RxState::new(acked & feature::MRG_RXBUF != 0);
        let first = self.index.saturating_mul(2);
        self.runtime
            .activate_at(first, mem, interrupt, queues, 2, acked)
    }

    /// Whether the driver enabled both of the pair's queues (a driver may leave the pairs it
    /// does not use disabled, and must not then ask for them).
    fn queues_ready(&mut self) -> bool {
        self.runtime
            .active()
            .is_some_and(|active| active.queues.iter().all(|queue| queue.ready()))
    }

    fn reset(&mut self) {
        if self.runtime.is_active() {
            self.runtime.reset();
        }
        self.rx.clear();
    }

    fn watch_backend(&mut self, ops: &mut EventOps, watch: bool) {
        let Some(fd) = self.backend.raw_fd() else {
            return;
        };
        if watch == self.backend_watched {
            return;
        }
        let result = if watch {
            ops.add(Events::with_data_raw(fd, BACKEND_TOKEN, tap_events(true)))
        } else {
            ops.remove(Events::empty_raw(fd))
        };
        match result {
            Ok(()) => {
                self.backend_watched = watch;
                // Registered with its readability on.
                self.watching.tap = true;
            }
            Err(e) => bus::guest_log!("virtio-net: cannot (un)watch the backend: {e}"),
        }
    }

    /// Starts the receive side over from the tap's events, the timer disarmed: the pair
    /// started, stopped, or was turned on or off.
    fn restart_receive(&mut self, ops: &mut EventOps) {
        self.moderation.reset(Instant::now());
        self.apply_watch(ops, RxWake::Buffers, self.moderation.watch());
    }

    /// Arms what `watch` asks for after a receive round woken by `wake`: the tap's readability
    /// on or off (it stays registered), the polling timer for one more period.
    fn apply_watch(&mut self, ops: &mut EventOps, wake: RxWake, watch: Watch) {
        if watch.tap != self.watching.tap && self.backend_watched {
            if let Some(fd) = self.backend.raw_fd() {
                let events = Events::with_data_raw(fd, BACKEND_TOKEN, tap_events(watch.tap));
                if let Err(e) = ops.modify(events) {
                    bus::guest_log!("virtio-net: cannot change what wakes the receive side: {e}");
                }
            }
        }
        // The timer is one-shot: armed again after each of its rounds, or when polling starts.
        if watch.timer && (wake == RxWake::Timer || !self.watching.timer) {
            if let Err(e) = self.rx_timer.reset(RX_POLL_PERIOD, None) {
                bus::guest_log!("virtio-net: cannot arm the receive polling timer: {e}");
            }
        } else if !watch.timer && self.watching.timer {
            self.disarm_rx_timer();
        }
        self.watching = watch;
    }

    fn disarm_rx_timer(&mut self) {
        if let Err(e) = self.rx_timer.clear() {
            bus::guest_log!("virtio-net: cannot disarm the receive polling timer: {e}");
        }
    }

    /// A receive round woken by `wake`, then what wakes the next one ([`moderation`]).
    fn receive(&mut self, ops: &mut EventOps, wake: RxWake) {
        let delivered = self.process_rx();
        let frame_waits = self.rx.has_pending();
        let watch = self
            .moderation
            .after_round(wake, delivered, frame_waits, Instant::now());
        self.apply_watch(ops, wake, watch);
    }

    /// Moves what the tap has into the receive queue; returns the frames delivered.
    fn process_rx(&mut self) -> usize {
        let (backend, rx) = (&mut self.backend, &mut self.rx);
        let mut delivered = 0;
        if let Some(active) = self.runtime.active() {
            active.run_queue(RX, &mut self.errors, |queue, mem, errors| {
                let out = process_rx(queue, mem, &mut **backend, rx, errors)?;
                delivered = out.delivered;
                Ok(out.notify)
            });
        }
        delivered
    }

    fn process_tx(&mut self) {
        let (backend, buf) = (&mut self.backend, &mut self.tx_buf);
        if let Some(active) = self.runtime.active() {
            active.run_queue(TX, &mut self.errors, |queue, mem, errors| {
                Ok(process_tx(queue, mem, &mut **backend, buf, errors)?.report(errors))
            });
        }
    }
}

impl MutEventSubscriber for NetQueuePair {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let dispatch = self.runtime.dispatch(&events, ops);
        if !self.enabled {
            // The tap queue is detached (reading it fails) and the driver does not use the
            // queues: nothing to serve until it turns the pair on.
            self.watch_backend(ops, false);
            self.restart_receive(ops);
            return;
        }
        match dispatch {
            Dispatch::Control { active: true } => {
                self.watch_backend(ops, true);
                self.restart_receive(ops);
                self.receive(ops, RxWake::Buffers);
                self.process_tx();
            }
            Dispatch::Control { active: false } => {
                self.watch_backend(ops, false);
                self.restart_receive(ops);
                self.rx.clear();
            }
            Dispatch::Device(BACKEND_TOKEN) => self.receive(ops, RxWake::Tap),
            // A stale expiry (the timer was disarmed since) finds the pair not polling.
            Dispatch::Device(RX_TIMER_TOKEN) if self.watching.timer => {
                self.receive(ops, RxWake::Timer)
            }
            Dispatch::Queue(RX) => self.receive(ops, RxWake::Buffers),
            Dispatch::Queue(TX) => self.process_tx(),
            Dispatch::Queue(_) | Dispatch::Device(_) | Dispatch::Nothing => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.runtime.init(ops);
        // Edge-triggered: each expiry is one event, and the timer is armed again (which clears
        // its count) rather than read.
        let timer = Events::with_data(
            &self.rx_timer,
            RX_TIMER_TOKEN,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        );
        if let Err(e) = ops.add(timer) {
            bus::guest_log!("virtio-net: cannot watch the receive polling timer: {e}");
        }
    }
}

/// The tap's events: readability, or none while the receive side does not want to hear of it.
/// Edge-triggered: a round reads until `EAGAIN`, and turning readability back on reports a tap
/// that already has frames.
fn tap_events(readable: bool) -> EventSet {
    if readable {
        EventSet::IN | EventSet::EDGE_TRIGGERED
    } else {
        EventSet::EDGE_TRIGGERED
    }
}

/// The network device: configuration space, features and the control queue; the data moves in
/// its [`NetQueuePair`]s, each an event-loop subscriber of its own
/// ([`queue_pairs`](Self::queue_pairs)).
pub struct VirtioNet {
    config: [u8; 10],
    acked: u64,
    pairs: Vec<Arc<Mutex<NetQueuePair>>>,
    /// The control queue's runtime (a device with more than one pair).
    control: DeviceRuntime,
    errors: ErrorLog,
}

impl VirtioNet {
    /// A network device on `backend` (usually a [`Tap`](crate::tap::Tap)) with the MAC address
    /// `mac`: one queue pair.
    pub fn new(backend: Box<dyn NetBackend>, mac: [u8; 6]) -> io::Result<Self> {
        Self::with_queue_pairs(vec![backend], mac)
    }

    /// A device with one queue pair per backend (the queues of a multi-queue tap), at most
    /// [`MAX_QUEUE_PAIRS`]. With more than one it offers `VIRTIO_NET_F_MQ` and a control
    /// queue; until the driver sets the number of pairs it uses, only the first has its
    /// backend attached.
    pub fn with_queue_pairs(backends: Vec<Box<dyn NetBackend>>, mac: [u8; 6]) -> io::Result<Self> {
        let count = backends.len();
        if !(1..=MAX_QUEUE_PAIRS).contains(&count) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a network device has 1 to {MAX_QUEUE_PAIRS} queue pairs, not {count}"),
            ));
        }
        let errors = ErrorLog::new("virtio-net");
        let mut pairs = Vec::with_capacity(count);
        for (index, backend) in backends.into_iter().enumerate() {
            let mut pair_errors = ErrorLog::new("virtio-net");
            pair_errors.metrics = errors.metrics.clone();
            let mut pair = NetQueuePair::new(index as u16, backend, pair_errors)?;
            pair.set_enabled(index == 0)?;
            pairs.push(Arc::new(Mutex::new(pair)));
        }
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        config[8..].copy_from_slice(&(count as u16).to_le_bytes());
        Ok(Self {
            config,
            acked: 0,
            pairs,
            control: DeviceRuntime::new()?,
            errors,
        })
    }

    /// The queue pairs, each to be added to an event loop: the first beside the device itself,
    /// each other on a worker of its own, so that pairs never wait on each other.
    pub fn queue_pairs(&self) -> Vec<Arc<Mutex<NetQueuePair>>> {
        self.pairs.clone()
    }

    fn multiqueue(&self) -> bool {
        self.pairs.len() > 1
    }

    /// The pairs the driver may use: all with `VIRTIO_NET_F_MQ`, else the first.
    fn negotiated_pairs(&self) -> usize {
        if self.acked & feature::MQ != 0 {
            self.pairs.len()
        } else {
            1
        }
    }

    /// The offloads the tap may use: those the driver accepted (TSO needs checksum offload).
    pub fn tap_offload(acked: u64) -> u32 {
        if acked & feature::GUEST_CSUM == 0 {
            return 0;
        }
        let mut flags = offload::CSUM;
        if acked & feature::GUEST_TSO4 != 0 {
            flags |= offload::TSO4;
        }
        if acked & feature::GUEST_TSO6 != 0 {
            flags |= offload::TSO6;
        }
        if acked & feature::GUEST_ECN != 0 {
            flags |= offload::TSO_ECN;
        }
        flags
    }

    /// Runs `f` on pair `index`, whatever a panic elsewhere left of its lock.
    fn with_pair<R>(&self, index: usize, f: impl FnOnce(&mut NetQueuePair) -> R) -> Option<R> {
        self.pairs.get(index).map(|pair| f(&mut lock(pair)))
    }

    /// Serves the control queue: the driver's `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`, from 1 to the
    /// pairs it may use.
    fn process_ctrl(&mut self) {
        let negotiated = self.negotiated_pairs();
        let pairs = &self.pairs;
        let Some(active) = self.control.active() else {
            return;
        };
        active.run_queue(0, &mut self.errors, |queue, mem, errors| {
            Ok(
                ctrl::process_ctrl(queue, mem, errors, |command| match command {
                    ctrl::CtrlCommand::SetQueuePairs(n) => {
                        let n = usize::from(n);
                        (1..=negotiated).contains(&n)
                            && pairs[..n].iter().all(|pair| lock(pair).queues_ready())
                            && use_pairs(pairs, n)
                    }
                    ctrl::CtrlCommand::Other { .. } => false,
                })?
                .report(errors),
            )
        });
    }
}

/// A pair's lock, whatever a panic elsewhere left of it.
fn lock(pair: &Mutex<NetQueuePair>) -> std::sync::MutexGuard<'_, NetQueuePair> {
    pair.lock().unwrap_or_else(|e| e.into_inner())
}

/// Puts the first `count` pairs in use and the others out of it, those first, so that no frame
/// is queued past `count` once the driver's command completes (5.1.6.5.5). Returns whether
/// every pair followed.
fn use_pairs(pairs: &[Arc<Mutex<NetQueuePair>>], count: usize) -> bool {
    let mut ok = true;
    for (index, pair) in pairs
        .iter()
        .enumerate()
        .skip(count)
        .chain(pairs.iter().enumerate().take(count))
    {
        if let Err(e) = lock(pair).set_enabled(index < count) {
            bus::guest_log!("virtio-net: cannot turn queue pair {index} on or off: {e}");
            ok = false;
        }
    }
    ok
}

impl VirtioDevice for VirtioNet {
    fn metrics(&self) -> Option<Arc<bus::metrics::DeviceMetrics>> {
        Some(self.errors.metrics.clone())
    }

    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let control = usize::from(self.multiqueue());
        vec![QUEUE_SIZE; 2 * self.pairs.len() + control]
    }

    fn features(&self) -> u64 {
        use feature::*;
        let multiqueue = if self.multiqueue() { CTRL_VQ | MQ } else { 0 };
        features::COMMON
            | CSUM
            | GUEST_CSUM
            | MAC
            | GUEST_TSO4
            | GUEST_TSO6
            | GUEST_ECN
            | HOST_TSO4
            | HOST_TSO6
            | HOST_ECN
            | MRG_RXBUF
            | STATUS
            | multiqueue
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let len = if self.multiqueue() { 10 } else { 8 };
        read_config(&self.config[..len], offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is read-only for a modern driver without VIRTIO_NET_F_CTRL_MAC_ADDR.
        log::debug!(
            "virtio-net: ignored a configuration write of {} bytes at {offset:#x}",
            data.len()
        );
    }

    /// The queues are receiveq1, transmitq1, ..., receiveqN, transmitqN, then the control
    /// queue (5.1.2), N the pairs the driver may use: all with `VIRTIO_NET_F_MQ`, else one
    /// (the transport hands over every queue the device has; those past N's are not used).
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let pairs = self.negotiated_pairs();
        let control = usize::from(self.acked & feature::CTRL_VQ != 0);
        let want = 2 * pairs + control;
        if queues.len() < want {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want,
            });
        }
        // The offloads only narrow what the tap hands us (one setting for all its queues, made
        // through the first, which is never detached); if the tap refuses, frames come without
        // them, which every driver accepts.
        let offload = Self::tap_offload(self.acked);
        if let Some(Err(e)) = self.with_pair(0, |pair| pair.backend.set_offload(offload)) {
            bus::guest_log!("virtio-net: cannot set the tap's offloads: {e}");
        }
        let mut queues = queues.into_iter();
        for index in 0..pairs {
            let pair_queues: Vec<ActiveQueue> = queues.by_ref().take(2).collect();
            let acked = self.acked;
            let interrupt = interrupt.clone();
            let mem = mem.clone();
            self.with_pair(index, |pair| {
                pair.activate(mem, interrupt, pair_queues, acked)
            })
            .unwrap_or(Ok(()))?;
        }
        if !use_pairs(&self.pairs, 1) {
            return Err(ActivateError::Backend(
                "cannot detach the tap's other queues".into(),
            ));
        }
        let control_queue: Vec<ActiveQueue> = queues.take(control).collect();
        if !control_queue.is_empty() {
            let first = (2 * pairs) as u16;
            self.control
                .activate_at(first, mem, interrupt, control_queue, 1, self.acked)?;
        }
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if self.control.is_active() {
            self.control.reset();
        }
        for index in 0..self.pairs.len() {
            self.with_pair(index, NetQueuePair::reset);
        }
        // Back to the first pair only, as after power-on.
        if !use_pairs(&self.pairs, 1) {
            bus::guest_log!("virtio-net: cannot detach the tap's other queues at reset");
        }
        self.acked = 0;
        true
    }
}

impl MutEventSubscriber for VirtioNet {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.control.dispatch(&events, ops) {
            Dispatch::Control { active: true } | Dispatch::Queue(0) => self.process_ctrl(),
            _ => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.control.init(ops);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use virtio::events::DeviceEventLoop;
    use virtio::queue::testing::*;
    use virtio::InterruptKind;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// A frame: a header with `flags` then `payload_len` bytes counting from 1.
    fn frame(flags: u8, payload_len: usize) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f[0] = flags;
        f.extend((1..=payload_len).map(|i| i as u8));
        f
    }

    fn errors() -> ErrorLog {
        ErrorLog::new("test")
    }

    /// Sends what the transmit queue holds.
    fn send_all(queue: &mut Queue, mem: &GuestMemoryMmap, backend: &mut Loopback) -> Drained {
        process_tx(queue, mem, backend, &mut Vec::new(), &mut errors()).unwrap()
    }

    #[test]
    fn tx_sends_header_and_payload_gathered_from_descriptors() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        let f = frame(1, 60);
        write_bytes(&mem, DATA, &f[..VNET_HDR_LEN]);
        write_bytes(&mem, DATA + 0x100, &f[VNET_HDR_LEN..]);
        let head = driver.add(&[r(DATA, 12), r(DATA + 0x100, 60)]);
        let mut backend = Loopback::default();

        let drained = send_all(&mut queue, &mem, &mut backend);

        assert_eq!(drained.completed, 1);
        assert_eq!(backend.sent, [f]);
        assert_eq!(driver.used(0), (u32::from(head), 0));
    }

    #[test]
    fn tx_gathers_a_chain_longer_than_the_buffer_list() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 64);
        let mut queue = driver.queue();
        // The header, then 40 buffers of 4 bytes each, a chain past MAX_TX_BUFFERS.
        let f = frame(0, 160);
        write_bytes(&mem, DATA, &f[..VNET_HDR_LEN]);
        let mut descs = vec![r(DATA, VNET_HDR_LEN as u32)];
        for (i, piece) in f[VNET_HDR_LEN..].chunks(4).enumerate() {
            let at = DATA + 0x100 + 0x10 * i as u64;
            write_bytes(&mem, at, piece);
            descs.push(r(at, 4));
        }
        assert!(descs.len() > MAX_TX_BUFFERS);
        let head = driver.add(&descs);
        let mut backend = Loopback::default();

        let drained = send_all(&mut queue, &mem, &mut backend);

        assert_eq!(drained.completed, 1);
        assert_eq!(backend.sent, [f]);
        assert_eq!(driver.used(0), (u32::from(head), 0));
    }

    /// A backend that stages frames gets them all, in order, each chain going back once its
    /// frame was sent: a chain with too many buffers to stage waits for those staged before.
    #[test]
    fn tx_stages_frames_and_returns_each_chain_after_its_frame_went_out() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 64);
        let mut queue = driver.queue();
        let mut frames = Vec::new();
        for i in 0..9u64 {
            let f = frame(i as u8, 40 + i as usize);
            let at = DATA + 0x1000 * i;
            if i == 4 {
                // The header, then one buffer per byte: more than MAX_TX_BUFFERS.
                write_bytes(&mem, at, &f);
                let mut descs = vec![r(at, VNET_HDR_LEN as u32)];
                descs.extend((VNET_HDR_LEN..f.len()).map(|o| r(at + o as u64, 1)));
                assert!(descs.len() > MAX_TX_BUFFERS);
                driver.add(&descs);
            } else {
                write_bytes(&mem, at, &f);
                driver.add(&[r(at, f.len() as u32)]);
            }
            frames.push(f);
        }
        let mut backend = Loopback {
            staging: 3,
            ..Loopback::default()
        };

        let drained = send_all(&mut queue, &mem, &mut backend);

        assert_eq!(drained.completed, 9);
        assert_eq!(driver.used_idx(), 9);
        assert!(backend.staged.is_empty(), "a staged frame was never sent");
        assert_eq!(backend.sent, frames);
    }

    #[test]
    fn tx_drops_short_huge_and_unmapped_frames() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        driver.add(&[r(DATA, 11)]);
        driver.add(&[r(DATA, 0x8000), r(DATA, 0x8000), r(DATA, 0x8000)]);
        driver.add(&[r(MEM_SIZE - 6, 12)]);
        driver.add(&[w(DATA, 64)]);
        let mut backend = Loopback::default();

        let drained = send_all(&mut queue, &mem, &mut backend);

        assert_eq!(drained.completed, 4);
        assert!(backend.sent.is_empty());
    }

    #[test]
    fn rx_without_mergeable_buffers_sets_num_buffers_to_one() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        let head = driver.add(&[w(DATA, 1526)]);
        let mut backend = Loopback::default();
        let f = frame(0, 100);
        backend.incoming.push_back(f.clone());
        let mut rx = RxState::new(false);

        let out = process_rx(&mut queue, &mem, &mut backend, &mut rx, &mut errors()).unwrap();

        assert_eq!(
            out,
            RxOutcome {
                delivered: 1,
                dropped: 0,
                notify: true
            }
        );
        assert_eq!(driver.used(0), (u32::from(head), 112));
        let mut want = f;
        want[10] = 1;
        assert_eq!(read_bytes(&mem, DATA, 112), want);
    }

    #[test]
    fn rx_merges_buffers_and_counts_them() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        let a = driver.add(&[w(DATA, 64)]);
        let b = driver.add(&[w(DATA + 0x1000, 64)]);
        driver.add(&[w(DATA + 0x2000, 64)]);
        let mut backend = Loopback::default();
        let f = frame(0, 100); // 112 bytes: two buffers
        backend.incoming.push_back(f.clone());
        let mut rx = RxState::new(true);

        let out = process_rx(&mut queue, &mem, &mut backend, &mut rx, &mut errors()).unwrap();

        assert_eq!(out.delivered, 1);
        assert_eq!(driver.used_idx(), 2);
        assert_eq!(driver.used(0), (u32::from(a), 64));
        assert_eq!(driver.used(1), (u32::from(b), 48));
        let mut want = f;
        want[10] = 2;
        assert_eq!(read_bytes(&mem, DATA, 64), want[..64]);
        assert_eq!(read_bytes(&mem, DATA + 0x1000, 48), want[64..]);
        // The third buffer is still the guest's.
        assert_eq!(queue.next_avail(), 2);
    }

    #[test]
    fn rx_waits_for_buffers_and_resumes_when_the_driver_adds_them() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        let mut backend = Loopback::default();
        backend.incoming.push_back(frame(0, 100));
        backend.incoming.push_back(frame(0, 10));
        let mut rx = RxState::new(true);
        // One 64-byte buffer is not enough for 112 bytes: it keeps the frame's head, which
        // waits for more.
        driver.add(&[w(DATA, 64)]);

        let out = process_rx(&mut queue, &mem, &mut backend, &mut rx, &mut errors()).unwrap();

        assert_eq!(out.delivered, 0);
        assert!(rx.has_pending());
        assert_eq!(driver.used_idx(), 0);
        assert_eq!(queue.next_avail(), 1);
        assert_eq!(
            backend.incoming.len(),
            1,
            "the second frame was not read yet"
        );

        driver.add(&[w(DATA + 0x1000, 4096)]);
        let out = process_rx(&mut queue, &mem, &mut backend, &mut rx, &mut errors()).unwrap();

        assert_eq!(out.delivered, 1);
        assert!(rx.has_pending(), "the second frame now waits");
        assert_eq!(driver.used_idx(), 2);
    }

    /// A head outside the descriptor table stops the queue (the device then needs a reset)
    /// wherever receive meets it: the first chain of a frame, with or without mergeable
    /// buffers, or a chain taken for the rest of a frame that waits.
    #[test]
    fn rx_stops_at_a_head_outside_the_queue() {
        let cases: [(bool, &[u32]); 3] = [(true, &[]), (false, &[]), (true, &[64])];
        for (mergeable, before) in cases {
            let mem = memory();
            let mut driver = Driver::new(&mem, 16);
            let mut queue = driver.queue();
            for &len in before {
                driver.add(&[w(DATA, len)]);
            }
            driver.publish(16);
            let mut backend = Loopback::default();
            backend.incoming.push_back(frame(0, 100));
            let mut rx = RxState::new(mergeable);

            let out = process_rx(&mut queue, &mem, &mut backend, &mut rx, &mut errors());

            assert!(
                matches!(out, Err(QueueError::HeadOutOfRange { head: 16, size: 16 })),
                "mergeable {mergeable}, chains before {before:?}: {out:?}"
            );
            assert_eq!(driver.used_idx(), 0);
        }
    }

    #[test]
    fn tx_stops_at_a_head_outside_the_queue() {
        let mem = memory();
        let driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        driver.publish(16);
        let mut backend = Loopback::default();

        let out = process_tx(
            &mut queue,
            &mem,
            &mut backend,
            &mut Vec::new(),
            &mut errors(),
        );

        assert!(matches!(
            out,
            Err(QueueError::HeadOutOfRange { head: 16, size: 16 })
        ));
        assert!(backend.sent.is_empty());
    }

    /// The frame read straight into the first buffer waits whole, its head copied back out of
    /// that buffer, which goes back to the driver; it arrives intact once buffers are added.
    #[test]
    fn rx_a_frame_waiting_for_buffers_arrives_whole() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        let mut backend = Loopback::default();
        let f = frame(0, 100);
        backend.incoming.push_back(f.clone());
        let mut rx = RxState::new(true);
        let a = driver.add(&[w(DATA, 64)]);

        process_rx(&mut queue, &mem, &mut backend, &mut rx, &mut errors()).unwrap();
        // The frame's head stays in the first buffer, which the device keeps meanwhile.
        assert_eq!(queue.next_avail(), 1);
        assert_eq!(driver.used_idx(), 0);
        let b = driver.add(&[w(DATA + 0x1000, 4096)]);
        let out = process_rx(&mut queue, &mem, &mut backend, &mut rx, &mut errors()).unwrap();

        assert_eq!(out.delivered, 1);
        assert_eq!(driver.used(0), (u32::from(a), 64));
        assert_eq!(driver.used(1), (u32::from(b), 48));
        let mut want = f;
        want[10] = 2;
        assert_eq!(read_bytes(&mem, DATA, 64), want[..64]);
        assert_eq!(read_bytes(&mem, DATA + 0x1000, 48), want[64..]);
    }

    /// A merged frame's used elements appear with one index update, across the ring's end,
    /// and each counts for the driver's `used_event`.
    #[test]
    fn rx_publishes_a_merged_frame_at_once_and_counts_it_for_event_idx() {
        for (used_event, interrupt) in [(14, true), (16, true), (17, false)] {
            let mem = memory();
            let mut driver = Driver::new(&mem, 16);
            let mut queue = driver.queue();
            queue.set_event_idx(true);
            driver.set_avail_idx(14);
            queue.set_next_avail(14);
            queue.set_next_used(14);
            driver.set_used_event(used_event);
            for i in 0..3 {
                driver.add(&[w(DATA + i * 0x1000, 64)]);
            }
            let mut backend = Loopback::default();
            let f = frame(0, 138); // 150 bytes: three buffers
            backend.incoming.push_back(f.clone());
            let mut rx = RxState::new(true);

            let out = process_rx(&mut queue, &mem, &mut backend, &mut rx, &mut errors()).unwrap();

            assert_eq!(out.delivered, 1);
            assert_eq!(driver.used_idx(), 17);
            assert_eq!(
                [driver.used(14), driver.used(15), driver.used(16)],
                [(0, 64), (1, 64), (2, 22)]
            );
            assert_eq!(out.notify, interrupt, "used_event {used_event}");
            let mut want = f;
            want[10] = 3;
            assert_eq!(read_bytes(&mem, DATA + 0x2000, 22), want[128..]);
        }
    }

    /// A driver polling the used index from another thread, as Linux's NAPI poll does while
    /// the device works, never sees part of a merged frame: every index it reads ends a frame.
    #[test]
    fn rx_a_polling_driver_never_sees_part_of_a_merged_frame() {
        use std::sync::atomic::{AtomicBool, AtomicU16};
        let mem = memory();
        let stop = AtomicBool::new(false);
        let torn = AtomicU16::new(0);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let idx: u16 = mem
                        .load(GuestAddress(USED_RING + 2), Ordering::Acquire)
                        .unwrap();
                    if !u16::from_le(idx).is_multiple_of(3) {
                        torn.store(u16::from_le(idx), Ordering::Relaxed);
                    }
                }
            });
            let mut driver = Driver::new(&mem, 256);
            let mut queue = driver.queue();
            let mut backend = Loopback::default();
            let mut rx = RxState::new(true);
            // 40 rounds of 80 frames of 150 bytes, each in three 64-byte buffers.
            for _ in 0..40 {
                for i in 0..240 {
                    driver.add(&[w(DATA + i * 0x40, 64)]);
                }
                backend.incoming.extend((0..80).map(|_| frame(0, 138)));
                let out =
                    process_rx(&mut queue, &mem, &mut backend, &mut rx, &mut errors()).unwrap();
                assert_eq!(out.delivered, 80);
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert_eq!(
            torn.load(Ordering::Relaxed),
            0,
            "a used index inside a frame"
        );
    }

    /// Chains the frame cannot be read into directly (more buffers than one read takes, or a
    /// header split across two buffers) take it through the device's own buffer, unchanged.
    /// A loopback that records how many guest buffers each read was handed.
    #[derive(Default)]
    struct CountingLoopback {
        inner: Loopback,
        reads: Vec<usize>,
    }

    impl NetBackend for CountingLoopback {
        fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.inner.read_frame(buf)
        }
        fn read_frame_into(
            &mut self,
            mem: &GuestMemoryMmap,
            buffers: &[(GuestAddress, u32)],
            overflow: &mut [u8],
        ) -> io::Result<usize> {
            let n = self.inner.read_frame_into(mem, buffers, overflow)?;
            self.reads.push(buffers.len());
            Ok(n)
        }
        fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
            self.inner.write_frame(frame)
        }
        fn set_offload(&mut self, flags: u32) -> io::Result<()> {
            self.inner.set_offload(flags)
        }
        fn raw_fd(&self) -> Option<RawFd> {
            None
        }
    }

    /// The frame in the used elements `from..from + count`, each buffer `stride` apart from
    /// `DATA`, as the driver reads it.
    fn merged_frame(driver: &Driver, mem: &GuestMemoryMmap, from: u16, count: u16) -> Vec<u8> {
        let mut out = Vec::new();
        for i in from..from + count {
            let (id, len) = driver.used(i);
            out.extend(read_bytes(mem, DATA + u64::from(id) * 0x1000, len as usize));
        }
        out
    }

    #[test]
    fn rx_a_stream_of_large_frames_is_read_into_chains_taken_ahead() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 32);
        let mut queue = driver.queue();
        for i in 0..32u64 {
            driver.add(&[w(DATA + i * 0x1000, 256)]);
        }
        let mut backend = CountingLoopback::default();
        let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(i, 600)).collect(); // 612 bytes each
        let small = frame(9, 100);
        backend.inner.incoming.extend(frames.iter().cloned());
        backend.inner.incoming.push_back(small.clone());
        backend.inner.incoming.push_back(small.clone());
        let mut rx = RxState::new(true);

        let out = process_rx(&mut queue, &mem, &mut backend, &mut rx, &mut errors()).unwrap();

        assert_eq!(out.delivered, 5);
        // The first frame finds one chain read into (the rest through the device's buffer);
        // the next two find the three chains the first took; the small frame after them the
        // three too, of which it fills one, and the last small frame one.
        assert_eq!(backend.reads, [1, 3, 3, 3, 1]);
        for (k, f) in frames.iter().enumerate() {
            let mut want = f.clone();
            want[NUM_BUFFERS] = 3;
            assert_eq!(
                merged_frame(&driver, &mem, 3 * k as u16, 3),
                want,
                "frame {k}"
            );
        }
        let mut want = small;
        want[NUM_BUFFERS] = 1;
        assert_eq!(merged_frame(&driver, &mem, 9, 1), want);
        assert_eq!(merged_frame(&driver, &mem, 10, 1), want);
        // The chains taken ahead and not filled went back: every chain is used in order.
        assert_eq!(driver.used_idx(), 11);
        for i in 0..11u16 {
            assert_eq!(driver.used(i).0, u32::from(i));
        }
        assert_eq!(queue.next_avail(), 11);
    }

    #[test]
    fn rx_a_frame_that_must_wait_keeps_the_chains_of_its_head() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 32);
        let mut queue = driver.queue();
        for i in 0..4u64 {
            driver.add(&[w(DATA + i * 0x1000, 256)]);
        }
        let mut backend = CountingLoopback::default();
        let first = frame(1, 600);
        let second = frame(2, 1000); // 1,012 bytes: four chains of 256 are too few
        backend.inner.incoming.push_back(first.clone());
        backend.inner.incoming.push_back(second.clone());
        let mut rx = RxState::new(true);

        let out = process_rx(&mut queue, &mem, &mut backend, &mut rx, &mut errors()).unwrap();
        assert_eq!(out.delivered, 1);
        assert_eq!(backend.reads, [1, 1]);
        // The second frame was read into the last chain and the device's buffer (the look-ahead
        // found one chain), and waits for more with its head in that chain.
        assert!(rx.has_pending());
        assert_eq!(queue.next_avail(), 4);
        assert_eq!(driver.used_idx(), 3);
        for i in 4..8u64 {
            driver.add(&[w(DATA + i * 0x1000, 256)]);
        }
        let out = process_rx(&mut queue, &mem, &mut backend, &mut rx, &mut errors()).unwrap();

        assert_eq!(out.delivered, 1);
        let mut want = first;
        want[NUM_BUFFERS] = 3;
        assert_eq!(merged_frame(&driver, &mem, 0, 3), want);
        let mut want = second;
        want[NUM_BUFFERS] = 4;
        assert_eq!(merged_frame(&driver, &mem, 3, 4), want);
        assert_eq!(driver.used_idx(), 7);
    }

    #[test]
    fn rx_chains_with_many_buffers_or_a_split_header_get_the_whole_frame() {
        let many: Vec<Desc> = (0..40).map(|i| w(DATA + i * 0x100, 16)).collect();
        let split = vec![w(DATA, 4), w(DATA + 0x100, 200)];
        for (chain, layout) in [(many, "40 buffers of 16 bytes"), (split, "4 + 200 bytes")] {
            let mem = memory();
            let mut driver = Driver::new(&mem, 64);
            let mut queue = driver.queue();
            let head = driver.add(&chain);
            let mut backend = Loopback::default();
            let f = frame(0, 150);
            backend.incoming.push_back(f.clone());
            let mut rx = RxState::new(false);

            let out = process_rx(&mut queue, &mem, &mut backend, &mut rx, &mut errors()).unwrap();

            assert_eq!(out.delivered, 1, "{layout}");
            assert_eq!(driver.used(0), (u32::from(head), 162), "{layout}");
            let mut got = Vec::new();
            for d in &chain {
                got.extend(read_bytes(&mem, d.addr, d.len as usize));
            }
            let mut want = f;
            want[10] = 1;
            assert_eq!(got[..162], want[..], "{layout}");
        }
    }

    #[test]
    fn rx_waiting_with_event_idx_asks_for_a_notification_past_the_available_buffers() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        queue.set_event_idx(true);
        driver.add(&[w(DATA, 64)]);
        let mut backend = Loopback::default();
        backend.incoming.push_back(frame(0, 100));
        let mut rx = RxState::new(true);

        process_rx(&mut queue, &mem, &mut backend, &mut rx, &mut errors()).unwrap();

        // One buffer is available and holds the frame's head; the driver must notify when it
        // adds the next, i.e. when its index passes 1.
        assert_eq!(queue.next_avail(), 1);
        assert_eq!(driver.avail_event(), 1);
    }

    #[test]
    fn rx_drops_a_frame_no_whole_queue_can_hold() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 2);
        let mut queue = driver.queue();
        driver.add(&[w(DATA, 16)]);
        driver.add(&[w(DATA + 0x1000, 16)]);
        let mut backend = Loopback::default();
        backend.incoming.push_back(frame(0, 100));
        backend.incoming.push_back(frame(0, 4));
        let mut rx = RxState::new(true);

        let out = process_rx(&mut queue, &mem, &mut backend, &mut rx, &mut errors()).unwrap();

        // The 112-byte frame is dropped without using a buffer; the 16-byte one fits.
        assert_eq!(out.dropped, 1);
        assert_eq!(out.delivered, 1);
        assert_eq!(driver.used_idx(), 1);
        assert_eq!(driver.used(0), (0, 16));
    }

    #[test]
    fn rx_drops_a_frame_too_big_for_a_single_buffer() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        driver.add(&[w(DATA, 64)]);
        driver.add(&[w(DATA + 0x1000, 64)]);
        let mut backend = Loopback::default();
        backend.incoming.push_back(frame(0, 100));
        backend.incoming.push_back(frame(0, 20));
        let mut rx = RxState::new(false);

        let out = process_rx(&mut queue, &mem, &mut backend, &mut rx, &mut errors()).unwrap();

        assert_eq!(
            out,
            RxOutcome {
                delivered: 1,
                dropped: 1,
                notify: true
            }
        );
        assert_eq!(driver.used(0).1, 0);
        assert_eq!(driver.used(1).1, 32);
    }

    #[test]
    fn rx_returns_unmapped_buffers_empty_and_uses_the_next() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        driver.add(&[w(MEM_SIZE + 0x1000, 2048)]);
        driver.add(&[w(DATA, 2048)]);
        let mut backend = Loopback::default();
        backend.incoming.push_back(frame(0, 50));
        let mut rx = RxState::new(false);

        let out = process_rx(&mut queue, &mem, &mut backend, &mut rx, &mut errors()).unwrap();

        assert_eq!(out.delivered, 1);
        assert_eq!(driver.used(0), (0, 0));
        assert_eq!(driver.used(1), (1, 62));
    }

    #[test]
    fn rx_drops_runt_frames() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        driver.add(&[w(DATA, 2048)]);
        let mut backend = Loopback::default();
        backend.incoming.push_back(vec![0; 5]);
        let mut rx = RxState::new(false);

        let out = process_rx(&mut queue, &mem, &mut backend, &mut rx, &mut errors()).unwrap();

        assert_eq!(out.dropped, 1);
        assert_eq!(driver.used_idx(), 0);
    }

    #[test]
    fn offloads_follow_the_guest_features() {
        use feature::*;
        assert_eq!(
            VirtioNet::tap_offload(GUEST_TSO4),
            0,
            "TSO needs checksum offload"
        );
        assert_eq!(VirtioNet::tap_offload(GUEST_CSUM), offload::CSUM);
        assert_eq!(
            VirtioNet::tap_offload(GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN),
            offload::CSUM | offload::TSO4 | offload::TSO6 | offload::TSO_ECN
        );
    }

    #[test]
    fn config_space_has_the_mac_and_link_up() {
        let net = VirtioNet::new(Box::new(Loopback::default()), [2, 0, 0, 0, 0, 7]).unwrap();
        let mut data = [0u8; 8];
        net.read_config(0, &mut data);
        assert_eq!(data, [2, 0, 0, 0, 0, 7, 1, 0]);
        assert_eq!(net.device_type(), 1);
        assert_eq!(net.queue_max_sizes(), [256, 256]);
        assert_ne!(net.features() & feature::MRG_RXBUF, 0);
    }

    struct Interrupts(Mutex<Vec<InterruptKind>>);
    impl VirtioInterrupt for Interrupts {
        fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
            self.0.lock().unwrap().push(kind);
            Ok(())
        }
    }

    /// A backend shared with the test, with a real eventfd standing in for the tap's fd: the
    /// test writes it when it queues frames, and like a tap's it stops being readable once the
    /// device has read every frame.
    #[derive(Clone)]
    struct SharedLoop(Arc<Mutex<Loopback>>, Arc<EventFd>);
    impl NetBackend for SharedLoop {
        fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let read = self.0.lock().unwrap().read_frame(buf);
            if read.is_err() {
                let _ = self.1.read();
            }
            read
        }
        fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
            self.0.lock().unwrap().write_frame(frame)
        }
        fn set_offload(&mut self, flags: u32) -> io::Result<()> {
            self.0.lock().unwrap().set_offload(flags)
        }
        fn set_enabled(&mut self, enabled: bool) -> io::Result<()> {
            self.0.lock().unwrap().set_enabled(enabled)
        }
        fn raw_fd(&self) -> Option<RawFd> {
            Some(std::os::fd::AsRawFd::as_raw_fd(&*self.1))
        }
    }

    /// A one-pair device on a new [`SharedLoop`], subscribed to a new event loop with its pair.
    fn device_in_event_loop() -> (DeviceEventLoop, SharedLoop, Arc<Mutex<VirtioNet>>) {
        let backend = SharedLoop(
            Arc::new(Mutex::new(Loopback::default())),
            Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        );
        let net = Arc::new(Mutex::new(
            VirtioNet::new(Box::new(backend.clone()), [2, 0, 0, 0, 0, 1]).unwrap(),
        ));
        let mut event_loop = DeviceEventLoop::new().unwrap();
        event_loop.add_subscriber(net.clone());
        for pair in net.lock().unwrap().queue_pairs() {
            event_loop.add_subscriber(pair);
        }
        (event_loop, backend, net)
    }

    #[test]
    fn device_moves_frames_both_ways_from_the_event_loop() {
        let mem = memory();
        let mut rxq = Driver::new(&mem, 16);
        let (mut event_loop, backend, net) = device_in_event_loop();
        let rx_notify = EventFd::new(EFD_NONBLOCK).unwrap();
        let tx_notify = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupts = Arc::new(Interrupts(Mutex::new(Vec::new())));
        // The transmit queue lives higher up in memory than the receive queue's rings.
        let mut txq = virtio_queue::Queue::new(16).unwrap();
        txq.try_set_desc_table_address(vm_memory::GuestAddress(0xc000))
            .unwrap();
        txq.try_set_avail_ring_address(vm_memory::GuestAddress(0xd000))
            .unwrap();
        txq.try_set_used_ring_address(vm_memory::GuestAddress(0xe000))
            .unwrap();
        txq.set_ready(true);
        {
            let mut net = net.lock().unwrap();
            net.ack_features(features::VERSION_1 | feature::GUEST_CSUM | feature::MRG_RXBUF);
            net.activate(
                mem.clone(),
                interrupts.clone(),
                vec![
                    ActiveQueue {
                        queue: rxq.queue(),
                        notify: rx_notify.try_clone().unwrap(),
                    },
                    ActiveQueue {
                        queue: txq,
                        notify: tx_notify.try_clone().unwrap(),
                    },
                ],
            )
            .unwrap();
        }
        assert_eq!(backend.0.lock().unwrap().offload, Some(offload::CSUM));
        event_loop.run_once(1000).unwrap();

        // A frame arrives on the "tap".
        rxq.add(&[w(DATA, 2048)]);
        backend.0.lock().unwrap().incoming.push_back(frame(0, 30));
        backend.1.write(1).unwrap();
        event_loop.run_once(1000).unwrap();
        assert_eq!(rxq.used(0), (0, 42));
        assert_eq!(*interrupts.0.lock().unwrap(), [InterruptKind::Queue(0)]);

        // The guest sends one: descriptor at 0xc000, available ring at 0xd000.
        let f = frame(0, 20);
        write_bytes(&mem, DATA + 0x4000, &f);
        let raw = virtio_queue::desc::RawDescriptor::from(
            virtio_queue::desc::split::Descriptor::new(DATA + 0x4000, 32, 0, 0),
        );
        vm_memory::Bytes::write_obj(&mem, raw, vm_memory::GuestAddress(0xc000)).unwrap();
        write_bytes(&mem, 0xd004, &0u16.to_le_bytes());
        write_bytes(&mem, 0xd002, &1u16.to_le_bytes());
        tx_notify.write(1).unwrap();
        event_loop.run_once(1000).unwrap();

        assert_eq!(backend.0.lock().unwrap().sent, [f]);
        assert_eq!(read_bytes(&mem, 0xe002, 2), [1, 0]);
    }

    /// A one-pair device on a [`SharedLoop`] in an event loop, activated with `rx_size`
    /// receive entries (none posted) and an empty transmit queue; returns the loop, the backend,
    /// the receive queue's driver and its notification eventfd.
    fn running_device(
        mem: &GuestMemoryMmap,
        rx_size: u16,
    ) -> (DeviceEventLoop, SharedLoop, Driver<'_>, EventFd) {
        let (mut event_loop, backend, net) = device_in_event_loop();
        let rxq = Driver::new(mem, rx_size);
        let txq = Driver::at(mem, 16, 0xc000);
        let rx_notify = EventFd::new(EFD_NONBLOCK).unwrap();
        {
            let mut net = net.lock().unwrap();
            net.ack_features(features::VERSION_1 | feature::MRG_RXBUF);
            let queues = vec![
                ActiveQueue {
                    queue: rxq.queue(),
                    notify: rx_notify.try_clone().unwrap(),
                },
                ActiveQueue {
                    queue: txq.queue(),
                    notify: EventFd::new(EFD_NONBLOCK).unwrap(),
                },
            ];
            let interrupts = Arc::new(Interrupts(Mutex::new(Vec::new())));
            net.activate(mem.clone(), interrupts, queues).unwrap();
        }
        // The pair's worker takes the activation: it watches the tap from now on.
        assert_eq!(event_loop.run_once(1000).unwrap(), 1);
        (event_loop, backend, rxq, rx_notify)
    }

    impl SharedLoop {
        /// Queues `count` frames, and makes the "tap" readable if `signal`.
        fn arrive(&self, count: usize, signal: bool) {
            let mut lo = self.0.lock().unwrap();
            lo.incoming.extend((0..count).map(|_| frame(0, 30)));
            if signal {
                self.1.write(1).unwrap();
            }
        }
    }

    /// A frame that finds no receive buffer waits with the tap unwatched: more frames coming in
    /// wake nobody until the driver's notification of new buffers, which delivers them all.
    #[test]
    fn frames_waiting_for_buffers_wake_the_worker_only_when_the_driver_adds_some() {
        let mem = memory();
        let (mut event_loop, backend, mut rxq, rx_notify) = running_device(&mem, 16);
        backend.arrive(1, true);
        assert_eq!(event_loop.run_once(1000).unwrap(), 1);
        assert_eq!(rxq.used_idx(), 0);
        // The tap is readable again, and nothing wakes.
        backend.arrive(2, true);
        assert_eq!(event_loop.run_once(50).unwrap(), 0);
        for _ in 0..3 {
            rxq.add(&[w(DATA, 2048)]);
        }
        rx_notify.write(1).unwrap();
        assert_eq!(event_loop.run_once(1000).unwrap(), 1);
        assert_eq!(rxq.used_idx(), 3);
        // The tap's readability is watched again.
        backend.arrive(1, false);
        assert_eq!(event_loop.run_once(50).unwrap(), 0);
        rxq.add(&[w(DATA, 2048)]);
        backend.1.write(1).unwrap();
        assert_eq!(event_loop.run_once(1000).unwrap(), 1);
        assert_eq!(rxq.used_idx(), 4);
    }

    /// A burst turns polling on: frames that come without the tap waking anyone are read on
    /// the timer, within a period. A quiet period turns it off: then the tap wakes the worker
    /// and nothing else does.
    #[test]
    fn a_stream_of_frames_is_read_on_the_polling_timer_until_it_thins_out() {
        let mem = memory();
        let (mut event_loop, backend, mut rxq, _rx_notify) = running_device(&mem, 64);
        for _ in 0..64 {
            rxq.add(&[w(DATA, 2048)]);
        }
        backend.arrive(moderation::RX_POLL_ENTER, true);
        assert_eq!(event_loop.run_once(1000).unwrap(), 1);
        assert_eq!(usize::from(rxq.used_idx()), moderation::RX_POLL_ENTER);
        // Polling: these are read on the timer though the tap says nothing.
        let quiet = moderation::RX_POLL_EXIT - 1;
        backend.arrive(quiet, false);
        assert_eq!(event_loop.run_once(1000).unwrap(), 1);
        assert_eq!(
            usize::from(rxq.used_idx()),
            moderation::RX_POLL_ENTER + quiet
        );
        // That period was quiet: back to the tap's events, and no timer.
        backend.arrive(1, false);
        assert_eq!(event_loop.run_once(50).unwrap(), 0);
        backend.1.write(1).unwrap();
        assert_eq!(event_loop.run_once(1000).unwrap(), 1);
        assert_eq!(
            usize::from(rxq.used_idx()),
            moderation::RX_POLL_ENTER + quiet + 1
        );
    }

    /// A device with two queue pairs, each on a loopback backend the test keeps a handle to.
    fn two_pair_device() -> (Vec<SharedLoop>, VirtioNet) {
        let backends: Vec<SharedLoop> = (0..2)
            .map(|_| {
                SharedLoop(
                    Arc::new(Mutex::new(Loopback::default())),
                    Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                )
            })
            .collect();
        let boxed = backends
            .iter()
            .map(|b| Box::new(b.clone()) as Box<dyn NetBackend>)
            .collect();
        let net = VirtioNet::with_queue_pairs(boxed, [2, 0, 0, 0, 0, 9]).unwrap();
        (backends, net)
    }

    /// Two pairs on two workers (event loops the test runs): until the driver sets two pairs
    /// on the control queue the second pair's tap queue is detached and a frame there waits;
    /// then the second pair delivers it with its own queue's interrupt; back to one pair, the
    /// queue is detached again; more pairs than the device has are refused.
    #[test]
    fn multiqueue_device_uses_the_pairs_the_driver_sets() {
        let mem = memory();
        let (backends, net) = two_pair_device();
        assert_eq!(net.queue_max_sizes().len(), 5);
        let mq = feature::MQ | feature::CTRL_VQ;
        assert_eq!(net.features() & mq, mq);
        let mut config = [0u8; 2];
        net.read_config(8, &mut config);
        assert_eq!(u16::from_le_bytes(config), 2, "max_virtqueue_pairs");
        assert!(backends[1].0.lock().unwrap().detached);
        assert!(!backends[0].0.lock().unwrap().detached);

        let pairs = net.queue_pairs();
        let net = Arc::new(Mutex::new(net));
        let mut first = DeviceEventLoop::new().unwrap();
        first.add_subscriber(net.clone());
        first.add_subscriber(pairs[0].clone());
        let mut second = DeviceEventLoop::new().unwrap();
        second.add_subscriber(pairs[1].clone());

        let mut drivers: Vec<Driver> = (0..5)
            .map(|i| Driver::at(&mem, 16, 0x2_0000 + 0xc000 * i))
            .collect();
        let notify: Vec<EventFd> = (0..5)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let interrupts = Arc::new(Interrupts(Mutex::new(Vec::new())));
        {
            let mut net = net.lock().unwrap();
            net.ack_features(features::VERSION_1 | feature::MRG_RXBUF | mq);
            let queues = drivers
                .iter()
                .zip(&notify)
                .map(|(d, n)| ActiveQueue {
                    queue: d.queue(),
                    notify: n.try_clone().unwrap(),
                })
                .collect();
            net.activate(mem.clone(), interrupts.clone(), queues)
                .unwrap();
        }
        first.run_once(1000).unwrap();
        second.run_once(1000).unwrap();

        // A frame on the second tap queue waits: the pair is not in use.
        drivers[2].add(&[w(DATA, 2048)]);
        backends[1]
            .0
            .lock()
            .unwrap()
            .incoming
            .push_back(frame(0, 30));
        backends[1].1.write(1).unwrap();
        assert_eq!(second.run_once(50).unwrap(), 0);
        assert_eq!(drivers[2].used_idx(), 0);

        // VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 2, then 3 (refused), then 1.
        let mut control = drivers.pop().unwrap();
        let mut command = |pairs: u16, at: u64, event_loop: &mut DeviceEventLoop| {
            write_bytes(&mem, at, &[ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET]);
            write_bytes(&mem, at + 2, &pairs.to_le_bytes());
            control.add(&[r(at, 4), w(at + 0x10, 1)]);
            notify[4].write(1).unwrap();
            event_loop.run_once(1000).unwrap();
            read_bytes(&mem, at + 0x10, 1)[0]
        };
        assert_eq!(command(2, DATA + 0x1000, &mut first), ctrl::OK);
        assert!(!backends[1].0.lock().unwrap().detached);
        assert!(interrupts
            .0
            .lock()
            .unwrap()
            .contains(&InterruptKind::Queue(4)));
        second.run_once(1000).unwrap();
        assert_eq!(drivers[2].used(0), (0, 42));
        assert!(interrupts
            .0
            .lock()
            .unwrap()
            .contains(&InterruptKind::Queue(2)));

        assert_eq!(command(3, DATA + 0x1100, &mut first), ctrl::ERR);
        assert!(!backends[1].0.lock().unwrap().detached);
        assert_eq!(command(1, DATA + 0x1200, &mut first), ctrl::OK);
        assert!(backends[1].0.lock().unwrap().detached);

        // A reset leaves the first pair only.
        assert!(net.lock().unwrap().reset());
        assert!(backends[1].0.lock().unwrap().detached);
        assert!(!backends[0].0.lock().unwrap().detached);
    }

    /// The transport hands over every queue; a driver may leave the pairs it does not use
    /// disabled (not ready) and still use the control queue after them, and must not then ask
    /// for those pairs. Without `VIRTIO_NET_F_MQ` the control queue is queue 2 (5.1.2).
    #[test]
    fn a_driver_may_leave_the_pairs_it_does_not_use_disabled() {
        for with_mq in [true, false] {
            let mem = memory();
            let (backends, net) = two_pair_device();
            let pairs = net.queue_pairs();
            let net = Arc::new(Mutex::new(net));
            let mut event_loop = DeviceEventLoop::new().unwrap();
            event_loop.add_subscriber(net.clone());
            event_loop.add_subscriber(pairs[0].clone());
            event_loop.add_subscriber(pairs[1].clone());

            // With MQ: pair 0 and the control queue (4) enabled, pair 1 not. Without: pair 0
            // and the control queue, which is then queue 2.
            let control_index = if with_mq { 4 } else { 2 };
            let drivers: Vec<Driver> = (0..5)
                .map(|i| Driver::at(&mem, 16, 0x2_0000 + 0xc000 * i))
                .collect();
            let notify: Vec<EventFd> = (0..5)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect();
            {
                let mut net = net.lock().unwrap();
                let mut acked = features::VERSION_1 | feature::CTRL_VQ;
                if with_mq {
                    acked |= feature::MQ;
                }
                net.ack_features(acked);
                let queues = drivers
                    .iter()
                    .zip(&notify)
                    .enumerate()
                    .map(|(i, (d, n))| ActiveQueue {
                        queue: if i < 2 || i == control_index {
                            d.queue()
                        } else {
                            Queue::new(16).unwrap()
                        },
                        notify: n.try_clone().unwrap(),
                    })
                    .collect();
                net.activate(
                    mem.clone(),
                    Arc::new(Interrupts(Mutex::new(Vec::new()))),
                    queues,
                )
                .unwrap();
            }
            event_loop.run_once(1000).unwrap();

            let mut control = drivers.into_iter().nth(control_index).unwrap();
            let mut command = |pairs: u16, at: u64| {
                write_bytes(&mem, at, &[ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET]);
                write_bytes(&mem, at + 2, &pairs.to_le_bytes());
                control.add(&[r(at, 4), w(at + 0x10, 1)]);
                notify[control_index].write(1).unwrap();
                event_loop.run_once(1000).unwrap();
                (read_bytes(&mem, at + 0x10, 1)[0], control.used_idx())
            };
            // Pair 1 is not enabled (or MQ not negotiated): refused, its tap queue stays off.
            assert_eq!(command(2, DATA + 0x1000), (ctrl::ERR, 1));
            assert!(backends[1].0.lock().unwrap().detached);
            // One pair: what the driver set up, answered on the queue it made the control queue.
            assert_eq!(command(1, DATA + 0x1100), (ctrl::OK, 2));
        }
    }
}
