//! virtio-blk on a raw disk image: virtio 1.2 section 5.2.
//!
//! One request queue. A request (5.2.6) is a 16-byte device-readable header (type, reserved,
//! sector), then the data (device-readable for writes, device-writable for reads), then one
//! device-writable status byte; any split of that layout across descriptors is accepted (2.6.4).
//!
//! Supported: `VIRTIO_BLK_T_IN`, `T_OUT`, `T_FLUSH` (fdatasync: a completed flush means the data
//! is on the host's disk), `T_GET_ID` (a 20-byte serial), `T_DISCARD` and `T_WRITE_ZEROES`
//! (one segment per request; `fallocate` hole punching and zeroing, falling back to writing
//! zeroes where the host file system cannot). A read-only disk offers `VIRTIO_BLK_F_RO` and
//! fails every write with `VIRTIO_BLK_S_IOERR` without touching the image (5.2.6.1).
//!
//! Every request is checked against the capacity (sector arithmetic overflow or a range past
//! the end is `IOERR`) and data is moved through a bounded bounce buffer, so a guest asking
//! for gigabytes costs no host memory. On a file, well-formed reads, writes and flushes go
//! through io_uring instead, many in flight, straight into guest memory ([`uring`]); the rest
//! stays on this synchronous path, which gives every error. Request processing is the plain function
//! [`process_queue`] over a queue, guest memory and a [`Disk`] (a [`DiskBackend`]: the image
//! file, or `MemDisk` in tests and fuzzing, feature `fuzzing`).
//!
//! How a VMM puts a disk on virtio-mmio and starts its worker thread (the KVM side in comments):
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//!
//! use virtio::events::DeviceEventLoop;
//! use virtio::mmio::{cmdline_entry, VirtioMmioTransport, MMIO_LEN};
//! use virtio_blk::{DiskOptions, VirtioBlock};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 256 << 20)])?;
//! let mut mmio_bus = bus::Bus::new();
//! let (base, gsi) = (0xd000_0000, 5);
//!
//! let image = std::fs::OpenOptions::new().read(true).write(true).open("disk.img")?;
//! let blk = Arc::new(Mutex::new(VirtioBlock::new(image, &DiskOptions::default())?));
//! let transport = VirtioMmioTransport::new(mem, blk.clone())?;
//! // vm.register_irqfd(transport.irq_event(), gsi);
//! // for (offset, queue, fd) in transport.queue_notify_events() {
//! //     vm.register_ioevent(fd, &IoEventAddress::Mmio(base + offset), queue);
//! // }
//! let cmdline_part = cmdline_entry(base, gsi);
//! mmio_bus.insert(Arc::new(Mutex::new(transport)), base, MMIO_LEN)?;
//!
//! let mut event_loop = DeviceEventLoop::new()?;
//! event_loop.add_subscriber(blk);
//! let running = event_loop.start()?;
//! // ... run the vCPUs ...
//! running.stop()?;
//! # let _ = cmdline_part;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, Reader, Writer};
use vm_memory::{Address, Bytes, GuestMemoryMmap};
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use virtio::events::FIRST_DEVICE_TOKEN;
use virtio::events::{DeviceRuntime, Dispatch};
use virtio::queue::{
    drain_queue_deferring, features, read_config, Budget, Chain, Drained, ErrorLog, QueueError,
    WAKEUP_BUDGET,
};
use virtio::{device_type, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt};

/// The sector size of the virtio-blk protocol, whatever the host's.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of the `GET_ID` serial number.
pub const SERIAL_LEN: usize = 20;
/// Largest discard, in sectors (512 MiB; Linux splits larger ones).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 20;
/// Largest write-zeroes, in sectors (32 MiB, bounded because it may fall back to writing).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 16;
/// Discard granularity hint: 4 KiB, the block size of the usual host file systems.
pub const DISCARD_ALIGNMENT_SECTORS: u32 = 8;
/// Bytes of the configuration space we fill (up to `write_zeroes_may_unmap`, 5.2.4).
pub const CONFIG_LEN: usize = 60;
/// Bounce buffer between guest memory and the image.
const CHUNK: usize = 128 * 1024;
/// Most descriptors in one request: the advertised `seg_max` data segments plus the header
/// and the status (5.2.4). Indirect tables could carry more.
pub const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;
/// Largest request, in bytes of buffers: 32 MiB, well above what Linux sends (its default
/// `max_sectors_kb` is at most 4 MiB). A larger request is answered IOERR without touching the
/// image, so a chain of huge buffers aliased onto one page cannot hold the device thread.
pub const MAX_REQUEST_BYTES: usize = 32 << 20;

/// Feature bits of the block device (5.2.3).
pub mod feature {
    /// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` in the configuration space bounds the data segments
    /// of one request.
    pub const SEG_MAX: u64 = 1 << 2;
    /// `VIRTIO_BLK_F_RO`: the disk is read-only; writes fail (5.2.6.1).
    pub const RO: u64 = 1 << 5;
    /// `VIRTIO_BLK_F_BLK_SIZE`: `blk_size` in the configuration space gives the block size
    /// the driver should use.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// `VIRTIO_BLK_F_FLUSH`: the device takes `VIRTIO_BLK_T_FLUSH` requests.
    pub const FLUSH: u64 = 1 << 9;
    /// `VIRTIO_BLK_F_DISCARD`: the device takes `VIRTIO_BLK_T_DISCARD` requests, within the
    /// discard limits of its configuration space.
    pub const DISCARD: u64 = 1 << 13;
    /// `VIRTIO_BLK_F_WRITE_ZEROES`: the device takes `VIRTIO_BLK_T_WRITE_ZEROES` requests.
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Request types (5.2.6).
pub mod request {
    /// `VIRTIO_BLK_T_IN`: read sectors into the device-writable buffers.
    pub const IN: u32 = 0;
    /// `VIRTIO_BLK_T_OUT`: write the device-readable buffers to sectors.
    pub const OUT: u32 = 1;
    /// `VIRTIO_BLK_T_FLUSH`: make every completed write durable (fdatasync).
    pub const FLUSH: u32 = 4;
    /// `VIRTIO_BLK_T_GET_ID`: the 20-byte serial number, NUL-padded.
    pub const GET_ID: u32 = 8;
    /// `VIRTIO_BLK_T_DISCARD`: the ranges' contents may be dropped.
    pub const DISCARD: u32 = 11;
    /// `VIRTIO_BLK_T_WRITE_ZEROES`: the ranges read as zeroes afterwards.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Request status values (5.2.6).
pub mod status {
    /// `VIRTIO_BLK_S_OK`: the request succeeded.
    pub const OK: u8 = 0;
    /// `VIRTIO_BLK_S_IOERR`: the request failed (out of range, read-only disk, host I/O error,
    /// malformed request).
    pub const IOERR: u8 = 1;
    /// `VIRTIO_BLK_S_UNSUPP`: the device does not take this request type, or this form of it
    /// (several discard segments, unknown flags).
    pub const UNSUPP: u8 = 2;
}

/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`: the device may deallocate the zeroed range.
const FLAG_UNMAP: u32 = 1;

/// Storage behind a block device. Offsets and lengths are in bytes and already checked against
/// the capacity.
pub trait DiskBackend: Send {
    /// The size of the image in bytes.
    fn size(&mut self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; reading past the end is an error.
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Deallocates the range; later reads return zeroes. `ErrorKind::Unsupported` when the
    /// storage cannot.
    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Zeroes the range without writing it. `ErrorKind::Unsupported` when the storage cannot.
    fn zero_range(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// The file descriptor reads and writes can go to through io_uring, if the storage is a
    /// file; `None` keeps every request on the synchronous methods above.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

/// `EOPNOTSUPP` (the file system has no such fallocate mode) as `ErrorKind::Unsupported`.
fn fallocate_result(result: Result<(), vmm_sys_util::errno::Error>) -> io::Result<()> {
    result.map_err(|e| match e.errno() {
        libc::EOPNOTSUPP | libc::ENOSYS => io::Error::from(io::ErrorKind::Unsupported),
        errno => io::Error::from_raw_os_error(errno),
    })
}

impl DiskBackend for File {
    fn size(&mut self) -> io::Result<u64> {
        // Seeking works for block devices too, whose metadata length is 0.
        self.seek(SeekFrom::End(0))
    }

    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sync_data()
    }

    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
        fallocate_result(fallocate(self, FallocateMode::PunchHole, true, offset, len))
    }

    fn zero_range(&mut self, offset: u64, len: u64) -> io::Result<()> {
        fallocate_result(fallocate(self, FallocateMode::ZeroRange, true, offset, len))
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

pub mod uring;
pub use uring::{plan_request, Op, Plan};

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
#[cfg(any(test, feature = "fuzzing"))]
pub mod testing;
/// A disk held in memory (the crate's test double, [`crate::testing`]).
#[cfg(any(test, feature = "fuzzing"))]
pub use crate::testing::MemDisk;

/// Errors building a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image's size could not be read.
    #[error("cannot read the size of the disk image")]
    Size(#[source] io::Error),
    /// The image is not a whole number of sectors.
    #[error("the disk image is {0} bytes, not a multiple of 512")]
    UnalignedSize(u64),
    /// The serial number does not fit the 20 bytes of `GET_ID`.
    #[error("the serial number is {0} bytes long, more than 20")]
    SerialTooLong(usize),
    /// The device's eventfd could not be created.
    #[error("cannot create the block device's eventfd")]
    EventFd(#[source] io::Error),
}

/// How reads, writes and flushes reach the image (Firecracker's drive `io_engine`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring ([`uring`]), many requests in flight; the synchronous path where the host has
    /// no usable io_uring (said once in the log) or the backend is not a file.
    #[default]
    Async,
    /// One request at a time with positional reads and writes on the worker thread.
    Sync,
}

/// How the VMM wants the disk presented.
#[derive(Debug, Clone, Default)]
pub struct DiskOptions {
    /// Offer `VIRTIO_BLK_F_RO` and refuse every write (the VMM opens the image read-only).
    pub read_only: bool,
    /// The `GET_ID` serial number, at most 20 bytes.
    pub serial: String,
    /// The I/O engine asked for.
    pub io_engine: IoEngine,
}

/// A disk as the request processing sees it: the backend, its geometry and what the driver
/// negotiated.
pub struct Disk {
    /// The ring, when the disk runs on io_uring. First, so that it is dropped (after waiting
    /// for its requests in flight) before the backend closes the image it reads and writes.
    uring: Option<uring::UringEngine>,
    backend: Box<dyn DiskBackend>,
    sectors: u64,
    read_only: bool,
    serial: [u8; SERIAL_LEN],
    discard: bool,
    write_zeroes: bool,
    buf: Vec<u8>,
    errors: ErrorLog,
    /// Every ring slot was taken when the queue last had chains: serve it again when a
    /// completion frees one.
    blocked: bool,
}

impl Disk {
    /// Checks the backend's size and the options.
    pub fn new(
        mut backend: Box<dyn DiskBackend>,
        options: &DiskOptions,
    ) -> Result<Self, BlockError> {
        let size = backend.size().map_err(BlockError::Size)?;
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::UnalignedSize(size));
        }
        let id = options.serial.as_bytes();
        if id.len() > SERIAL_LEN {
            return Err(BlockError::SerialTooLong(id.len()));
        }
        let mut serial = [0u8; SERIAL_LEN];
        serial[..id.len()].copy_from_slice(id);
        let uring = match (options.io_engine, backend.raw_fd()) {
            (IoEngine::Async, Some(fd)) => {
                match uring::UringEngine::new(fd) {
                    Ok(engine) => {
                        log::info!("virtio-blk: io_uring, up to {QUEUE_SIZE} requests in flight");
                        Some(engine)
                    }
                    Err(e) => {
                        log::warn!("virtio-blk: io_uring is unavailable ({e}); the disk uses synchronous I/O");
                        None
                    }
                }
            }
            _ => None,
        };
        Ok(Self {
            backend,
            sectors: size / SECTOR_SIZE,
            read_only: options.read_only,
            serial,
            discard: false,
            write_zeroes: false,
            buf: Vec::new(),
            errors: ErrorLog::new("virtio-blk"),
            uring,
            blocked: false,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// The engine the disk runs on: [`IoEngine::Sync`] when io_uring was asked for but is
    /// unavailable.
    pub fn io_engine(&self) -> IoEngine {
        if self.uring.is_some() {
            IoEngine::Async
        } else {
            IoEngine::Sync
        }
    }

    /// Requests the kernel holds for this disk.
    pub fn in_flight(&self) -> usize {
        self.uring.as_ref().map_or(0, uring::UringEngine::in_flight)
    }

    /// Blocks until the ring posts a completion (or a short while passes): for tests and
    /// fuzzing, which have no event loop.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn wait_for_completion(&mut self) {
        if let Some(engine) = self.uring.as_mut() {
            engine.wait_for_completion();
        }
    }

    /// Stops the ring's eventfd while the worker serves the queue itself: completions it
    /// reaps on the way need no wake-up.
    fn quiet(&mut self) {
        if let Some(engine) = self.uring.as_mut() {
            engine.quiet();
        }
    }

    /// Turns the ring's eventfd back on before the worker waits again.
    fn arm(&mut self) {
        if let Some(engine) = self.uring.as_mut() {
            engine.arm(&mut self.errors);
        }
    }

    /// Drops the requests in flight after waiting for them (a device reset).
    fn reset_in_flight(&mut self) {
        self.blocked = false;
        if let Some(engine) = self.uring.as_mut() {
            engine.reset(&mut self.errors);
        }
    }

    /// The features this disk offers.
    pub fn features(&self) -> u64 {
        let common = features::COMMON | feature::SEG_MAX | feature::BLK_SIZE | feature::FLUSH;
        if self.read_only {
            common | feature::RO
        } else {
            common | feature::DISCARD | feature::WRITE_ZEROES
        }
    }

    /// Records what the driver accepted: discard and write-zeroes requests are served only
    /// when negotiated.
    pub fn ack_features(&mut self, acked: u64) {
        self.discard = acked & feature::DISCARD != 0;
        self.write_zeroes = acked & feature::WRITE_ZEROES != 0;
    }

    /// The configuration space (5.2.4), little endian.
    pub fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            c[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &self.sectors.to_le_bytes());
        // seg_max: a chain also holds the header and the status.
        put(12, &u32::from(QUEUE_SIZE - 2).to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        put(34, &1u16.to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &1u32.to_le_bytes());
        put(44, &DISCARD_ALIGNMENT_SECTORS.to_le_bytes());
        put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        put(52, &1u32.to_le_bytes());
        put(56, &[1]);
        c
    }

    /// Handles one request and returns the bytes written into its device-writable buffers.
    fn handle(&mut self, chain: Chain<'_>) -> u32 {
        let mem = chain.memory();
        let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.clone().writer(mem))
        {
            (Ok(r), Ok(w)) => (r, w),
            (Err(e), _) | (_, Err(e)) => {
                self.errors.warn(format_args!("a request is unusable: {e}"));
                return status_only(&chain, status::IOERR);
            }
        };
        let writable = writer.available_bytes();
        if writable == 0 {
            self.errors
                .warn(format_args!("a request has no device-writable status byte"));
            return 0;
        }
        // The status is the last writable byte; the writable bytes before it are the data.
        let Ok(mut status_writer) = writer.split_at(writable - 1) else {
            return 0;
        };
        let descriptors = chain.clone().count();
        let bytes = reader.available_bytes().saturating_add(writable);
        let status = if descriptors > MAX_DESCRIPTORS || bytes > MAX_REQUEST_BYTES {
            self.errors.warn(format_args!(
                "a request of {descriptors} descriptors and {bytes} bytes exceeds seg_max \
                 {} or {MAX_REQUEST_BYTES} bytes",
                MAX_DESCRIPTORS - 2
            ));
            status::IOERR
        } else {
            self.execute(&mut reader, &mut writer)
        };
        if status_writer.write_all(&[status]).is_err() {
            return 0;
        }
        u32::try_from(writer.bytes_written() + 1).unwrap_or(u32::MAX)
    }

    fn execute(&mut self, reader: &mut Reader<'_>, writer: &mut Writer<'_>) -> u8 {
        let mut header = [0u8; 16];
        if reader.read_exact(&mut header).is_err() {
            self.errors
                .warn(format_args!("a request is shorter than its 16-byte header"));
            return status::IOERR;
        }
        let (kind, sector) = parse_header(&header);
        match kind {
            request::IN => self.read(sector, writer),
            request::OUT => self.write(sector, reader),
            request::FLUSH => self.flush(),
            request::GET_ID => {
                let n = writer.available_bytes().min(SERIAL_LEN);
                match writer.write_all(&self.serial[..n]) {
                    Ok(()) => status::OK,
                    Err(_) => status::IOERR,
                }
            }
            request::DISCARD if self.discard => self.discard_or_zero(reader, false),
            request::WRITE_ZEROES if self.write_zeroes => self.discard_or_zero(reader, true),
            _ => status::UNSUPP,
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they lie within the disk.
    fn byte_range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        (end <= self.sectors * SECTOR_SIZE).then_some(offset)
    }

    /// Checks a data transfer of `len` bytes at `sector`: whole sectors, within the disk.
    fn transfer_offset(&mut self, what: &str, sector: u64, len: usize) -> Option<u64> {
        let checked = (len as u64)
            .is_multiple_of(SECTOR_SIZE)
            .then(|| self.byte_range(sector, len as u64))
            .flatten();
        if checked.is_none() {
            self.errors.warn(format_args!(
                "a {what} of {len} bytes at sector {sector} is not whole sectors within the \
                 {} sectors of the disk",
                self.sectors
            ));
        }
        checked
    }

    fn read(&mut self, sector: u64, writer: &mut Writer<'_>) -> u8 {
        let len = writer.available_bytes();
        let Some(mut offset) = self.transfer_offset("read", sector, len) else {
            return status::IOERR;
        };
        self.buf.resize(CHUNK, 0);
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            let chunk = &mut self.buf[..n];
            if let Err(e) = self.backend.read_exact_at(chunk, offset) {
                self.errors
                    .warn(format_args!("reading the image at {offset:#x} failed: {e}"));
                return status::IOERR;
            }
            if writer.write_all(chunk).is_err() {
                return status::IOERR;
            }
            left -= n;
            offset += n as u64;
        }
        status::OK
    }

    fn write(&mut self, sector: u64, reader: &mut Reader<'_>) -> u8 {
        if self.read_only {
            return status::IOERR;
        }
        let len = reader.available_bytes();
        let Some(mut offset) = self.transfer_offset("write", sector, len) else {
            return status::IOERR;
        };
        self.buf.resize(CHUNK, 0);
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            let chunk = &mut self.buf[..n];
            if reader.read_exact(chunk).is_err() {
                return status::IOERR;
            }
            if let Err(e) = self.backend.write_all_at(chunk, offset) {
                self.errors
                    .warn(format_args!("writing the image at {offset:#x} failed: {e}"));
                return status::IOERR;
            }
            left -= n;
            offset += n as u64;
        }
        status::OK
    }

    fn flush(&mut self) -> u8 {
        match self.backend.flush() {
            Ok(()) => status::OK,
            Err(e) => {
                self.errors
                    .warn(format_args!("flushing the image failed: {e}"));
                status::IOERR
            }
        }
    }

    /// `T_DISCARD` and `T_WRITE_ZEROES` (5.2.6.2): one 16-byte segment (sector, sector count,
    /// flags).
    fn discard_or_zero(&mut self, reader: &mut Reader<'_>, zero: bool) -> u8 {
        if self.read_only {
            return status::IOERR;
        }
        let len = reader.available_bytes();
        if len == 0 || !len.is_multiple_of(16) {
            self.errors.warn(format_args!(
                "a discard or write-zeroes payload of {len} bytes"
            ));
            return status::IOERR;
        }
        // We advertise max_discard_seg = max_write_zeroes_seg = 1.
        if len > 16 {
            return status::UNSUPP;
        }
        let mut segment = [0u8; 16];
        if reader.read_exact(&mut segment).is_err() {
            return status::IOERR;
        }
        let (sector, count, flags) = parse_segment(&segment);
        // Unknown flags, or unmap on a discard, are unsupported (5.2.6.2).
        if flags & !FLAG_UNMAP != 0 || (!zero && flags != 0) {
            return status::UNSUPP;
        }
        let max = if zero {
            MAX_WRITE_ZEROES_SECTORS
        } else {
            MAX_DISCARD_SECTORS
        };
        let bytes = u64::from(count) * SECTOR_SIZE;
        let range = (count <= max)
            .then(|| self.byte_range(sector, bytes))
            .flatten();
        let Some(offset) = range else {
            self.errors.warn(format_args!(
                "a discard or write-zeroes of {count} sectors at sector {sector} is out of range"
            ));
            return status::IOERR;
        };
        let result = if zero {
            self.write_zeroes(offset, bytes, flags & FLAG_UNMAP != 0)
        } else {
            // Discarding is a hint: storage that cannot punch holes keeps the data.
            match self.backend.punch_hole(offset, bytes) {
                Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
                other => other,
            }
        };
        match result {
            Ok(()) => status::OK,
            Err(e) => {
                self.errors.warn(format_args!(
                    "discarding or zeroing at {offset:#x} failed: {e}"
                ));
                status::IOERR
            }
        }
    }

    /// Zeroes the range by the cheapest means the storage has: a hole (if allowed), a zeroed
    /// extent, or writing zeroes.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            match self.backend.punch_hole(offset, len) {
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
                other => return other,
            }
        }
        match self.backend.zero_range(offset, len) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
            other => return other,
        }
        self.buf.clear();
        self.buf.resize(CHUNK, 0);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            self.backend.write_all_at(&self.buf[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

fn parse_header(header: &[u8; 16]) -> (u32, u64) {
    let [t0, t1, t2, t3, _, _, _, _, s @ ..] = *header;
    (u32::from_le_bytes([t0, t1, t2, t3]), u64::from_le_bytes(s))
}

fn parse_segment(segment: &[u8; 16]) -> (u64, u32, u32) {
    let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = *segment;
    (
        u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
        u32::from_le_bytes([n0, n1, n2, n3]),
        u32::from_le_bytes([f0, f1, f2, f3]),
    )
}

/// Completes a request whose buffers cannot all be used (one lies outside guest RAM or wraps
/// around the address space) with `status` when its status byte still can be: the last byte of
/// its last device-writable descriptor (5.2.6). Returns the used length: 1 with the status
/// written, 0 without.
fn status_only(chain: &Chain<'_>, status: u8) -> u32 {
    let mem = chain.memory();
    let last = chain
        .clone()
        .filter(|desc| desc.is_write_only() && desc.len() > 0)
        .last();
    let Some(at) = last.and_then(|desc| desc.addr().checked_add(u64::from(desc.len()) - 1)) else {
        return 0;
    };
    u32::from(mem.write_obj(status, at).is_ok())
}

/// Serves the requests on the queue, up to a wake-up's budget. Malformed requests complete
/// with `IOERR` when they have a status byte, and with nothing written when they do not. On
/// io_uring, well-formed reads, writes and flushes go to the kernel [`SUBMIT_BATCH`] chains per
/// submission, and what the kernel finished meanwhile (reads the page cache holds usually are
/// by the time the submission returns) goes on the used ring after each one, so the driver can
/// post more while the device works; the rest complete later ([`complete_queue`]). Everything
/// else, and every request on the synchronous engine, completes here.
pub fn process_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    disk: &mut Disk,
) -> Result<Drained, QueueError> {
    if disk.uring.is_none() {
        return drain_queue_deferring(queue, mem, WAKEUP_BUDGET, |chain| Some(disk.handle(chain)));
    }
    let rounds = WAKEUP_BUDGET.chains.div_ceil(SUBMIT_BATCH);
    let mut total = Drained::default();
    for _ in 0..rounds {
        let free = disk.uring.as_ref().map_or(0, |e| e.free_slots());
        if free == 0 {
            // Coming back before a completion frees a slot would find none again.
            disk.blocked = true;
            total.more = false;
            break;
        }
        let budget = Budget {
            chains: SUBMIT_BATCH.min(free),
            bytes: WAKEUP_BUDGET.bytes / rounds as u64,
        };
        let drained =
            drain_queue_deferring(queue, mem, budget, |chain| match disk.start(&chain) {
                uring::Started::Ring => None,
                uring::Started::Done(used) => Some(used),
                uring::Started::Synchronous => Some(disk.handle(chain)),
            })?;
        if let Some(engine) = disk.uring.as_mut() {
            engine.submit(&mut disk.errors);
        }
        let done = reaped(queue, mem, disk)?;
        total = total.and(drained).and(done);
        total.more = drained.more;
        if !drained.more {
            break;
        }
    }
    Ok(total)
}

/// Chains handed to io_uring per submission: few enough that completions reach the driver
/// while the device is still taking requests, enough to save most system calls.
pub const SUBMIT_BATCH: usize = 8;

/// The completions the ring holds, put on the used ring.
fn reaped(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    disk: &mut Disk,
) -> Result<Drained, QueueError> {
    let (completed, bytes) = disk.reap(queue, mem)?;
    Ok(Drained {
        completed,
        bytes,
        notify: completed > 0 && virtio::queue::needs_interrupt(queue, mem)?,
        ..Drained::default()
    })
}

/// Puts the requests the kernel finished on the used ring, then serves the queue again if it
/// was waiting for a free slot. Returns what a wake-up did, as [`process_queue`] does.
pub fn complete_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    disk: &mut Disk,
) -> Result<Drained, QueueError> {
    let drained = reaped(queue, mem, disk)?;
    if disk.blocked && disk.uring.as_ref().is_some_and(|e| e.free_slots() > 0) {
        disk.blocked = false;
        return Ok(drained.and(process_queue(queue, mem, disk)?));
    }
    Ok(drained)
}

/// The block device.
pub struct VirtioBlock {
    disk: Disk,
    config: [u8; CONFIG_LEN],
    acked: u64,
    runtime: DeviceRuntime,
    errors: ErrorLog,
}

impl VirtioBlock {
    /// A block device on an image file the VMM opened (read-only when `options.read_only`).
    pub fn new(image: File, options: &DiskOptions) -> Result<Self, BlockError> {
        Self::with_backend(Box::new(image), options)
    }

    /// A block device on any backend.
    pub fn with_backend(
        backend: Box<dyn DiskBackend>,
        options: &DiskOptions,
    ) -> Result<Self, BlockError> {
        let disk = Disk::new(backend, options)?;
        Ok(Self {
            config: disk.config(),
            disk,
            acked: 0,
            runtime: DeviceRuntime::new().map_err(BlockError::EventFd)?,
            errors: ErrorLog::new("virtio-blk"),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.disk.sectors()
    }

    /// The driver notified the queue.
    fn process(&mut self) {
        let disk = &mut self.disk;
        if let Some(active) = self.runtime.active() {
            disk.quiet();
            active.run_queue(0, &mut self.errors, |queue, mem, errors| {
                Ok(process_queue(queue, mem, disk)?.report(errors))
            });
            disk.arm();
        }
    }

    /// The ring posted completions.
    fn complete(&mut self) {
        let disk = &mut self.disk;
        let Some(engine) = disk.uring.as_mut() else {
            return;
        };
        engine.clear_event();
        match self.runtime.active() {
            Some(active) => {
                disk.quiet();
                active.run_queue(0, &mut self.errors, |queue, mem, errors| {
                    Ok(complete_queue(queue, mem, disk)?.report(errors))
                });
                disk.arm();
            }
            // After a reset: the slots are freed, nothing goes to the driver.
            None => engine.reap(&mut self.errors, |_| {}),
        }
    }

    /// The engine this disk runs on.
    pub fn io_engine(&self) -> IoEngine {
        self.disk.io_engine()
    }
}

/// Event data of the io_uring completion eventfd in the worker's loop.
const COMPLETION_TOKEN: u32 = FIRST_DEVICE_TOKEN;

impl VirtioDevice for VirtioBlock {
    fn metrics(&self) -> Option<Arc<bus::metrics::DeviceMetrics>> {
        Some(self.errors.metrics.clone())
    }

    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.disk.features()
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
        self.disk.ack_features(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // `writeback` is writable only with VIRTIO_BLK_F_CONFIG_WCE, which we do not offer.
        log::debug!(
            "virtio-blk: ignored a configuration write of {} bytes at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        self.runtime.activate(mem, interrupt, queues, 1, self.acked)
    }

    fn reset(&mut self) -> bool {
        self.disk.reset_in_flight();
        self.runtime.reset();
        self.acked = 0;
        self.disk.ack_features(0);
        true
    }
}

impl MutEventSubscriber for VirtioBlock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.runtime.dispatch(&events, ops) {
            Dispatch::Queue(_) | Dispatch::Control { active: true } => self.process(),
            Dispatch::Device(COMPLETION_TOKEN) => self.complete(),
            Dispatch::Control { active: false } | Dispatch::Device(_) | Dispatch::Nothing => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.runtime.init(ops);
        if let Some(engine) = &self.disk.uring {
            let watch =
                Events::with_data(engine.completion_event(), COMPLETION_TOKEN, EventSet::IN);
            if let Err(e) = ops.add(watch) {
                log::error!("virtio-blk: cannot watch the io_uring completions: {e}");
            }
        }
    }
}

/// The worker may poll the request queue between notifications (see [`virtio::poll`]), except
/// while requests are in flight on the io_uring: the driver waits on the device then.
impl virtio::poll::PolledQueues for VirtioBlock {
    fn runtime(&mut self) -> &mut DeviceRuntime {
        &mut self.runtime
    }

    fn waiting(&self) -> bool {
        self.disk.in_flight() > 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use virtio::queue::testing::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    const SECTORS: u64 = 64;
    const HDR: u64 = DATA;
    const BUF: u64 = DATA + 0x1000;
    const STATUS: u64 = DATA + 0x100;

    /// A shared in-memory disk, so tests can look at it after the device has it.
    #[derive(Clone)]
    struct SharedDisk(Arc<Mutex<MemDisk>>, Arc<Mutex<Vec<&'static str>>>);

    impl SharedDisk {
        fn new() -> Self {
            let bytes = (0..SECTORS * SECTOR_SIZE)
                .map(|i| (i / SECTOR_SIZE) as u8)
                .collect();
            Self(
                Arc::new(Mutex::new(MemDisk(bytes))),
                Arc::new(Mutex::new(Vec::new())),
            )
        }
        fn bytes(&self, offset: usize, len: usize) -> Vec<u8> {
            self.0.lock().unwrap().0[offset..offset + len].to_vec()
        }
        fn calls(&self) -> Vec<&'static str> {
            self.1.lock().unwrap().clone()
        }
    }

    impl DiskBackend for SharedDisk {
        fn size(&mut self) -> io::Result<u64> {
            self.0.lock().unwrap().size()
        }
        fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.0.lock().unwrap().read_exact_at(buf, offset)
        }
        fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.1.lock().unwrap().push("write");
            self.0.lock().unwrap().write_all_at(buf, offset)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.1.lock().unwrap().push("flush");
            Ok(())
        }
        fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
            self.1.lock().unwrap().push("punch");
            self.0.lock().unwrap().punch_hole(offset, len)
        }
        fn zero_range(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
            // Like a file system without FALLOC_FL_ZERO_RANGE.
            self.1.lock().unwrap().push("zero_range");
            Err(io::ErrorKind::Unsupported.into())
        }
    }

    fn disk(options: DiskOptions) -> (SharedDisk, Disk) {
        let shared = SharedDisk::new();
        let mut disk = Disk::new(Box::new(shared.clone()), &options).unwrap();
        disk.ack_features(disk.features());
        (shared, disk)
    }

    /// A request header (5.2.6): type, reserved, sector.
    pub(crate) fn header(kind: u32, sector: u64) -> Vec<u8> {
        let mut h = kind.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        h
    }

    fn segment(sector: u64, count: u32, flags: u32) -> Vec<u8> {
        let mut s = sector.to_le_bytes().to_vec();
        s.extend_from_slice(&count.to_le_bytes());
        s.extend_from_slice(&flags.to_le_bytes());
        s
    }

    /// Runs one request made of `descs` (the header is written at HDR) and returns
    /// (status byte at STATUS, used length).
    fn run(disk: &mut Disk, hdr: &[u8], descs: &[Desc]) -> (u8, u32) {
        let mem = memory();
        run_in(&mem, disk, hdr, descs)
    }

    fn run_in(mem: &GuestMemoryMmap, disk: &mut Disk, hdr: &[u8], descs: &[Desc]) -> (u8, u32) {
        let mut driver = Driver::new(mem, 16);
        let mut queue = driver.queue();
        write_bytes(mem, HDR, hdr);
        write_bytes(mem, STATUS, &[0xee]);
        driver.add(descs);
        let mut drained = process_queue(&mut queue, mem, disk).unwrap();
        // A disk on a file runs on io_uring: wait for its completions.
        while disk.in_flight() > 0 {
            disk.wait_for_completion();
            drained = drained.and(complete_queue(&mut queue, mem, disk).unwrap());
        }
        assert_eq!(drained.completed, 1);
        assert_eq!(driver.used_idx(), 1);
        (read_bytes(mem, STATUS, 1)[0], driver.used(0).1)
    }

    #[test]
    fn construction_checks_size_and_serial() {
        let e = Disk::new(Box::new(MemDisk(vec![0; 1000])), &DiskOptions::default())
            .err()
            .unwrap();
        assert!(matches!(e, BlockError::UnalignedSize(1000)));
        let long = DiskOptions {
            serial: "x".repeat(21),
            ..Default::default()
        };
        let e = Disk::new(Box::new(MemDisk(vec![0; 512])), &long)
            .err()
            .unwrap();
        assert!(matches!(e, BlockError::SerialTooLong(21)));
    }

    #[test]
    fn features_and_config_space() {
        let (_, rw) = disk(DiskOptions::default());
        assert_eq!(
            rw.features(),
            1 << 32 | 1 << 28 | 1 << 29 | 1 << 2 | 1 << 6 | 1 << 9 | 1 << 13 | 1 << 14
        );
        let (_, ro) = disk(DiskOptions {
            read_only: true,
            ..Default::default()
        });
        assert_eq!(
            ro.features(),
            1 << 32 | 1 << 28 | 1 << 29 | 1 << 2 | 1 << 6 | 1 << 9 | 1 << 5
        );

        let c = rw.config();
        assert_eq!(c[0..8], 64u64.to_le_bytes());
        assert_eq!(c[12..16], 254u32.to_le_bytes());
        assert_eq!(c[20..24], 512u32.to_le_bytes());
        assert_eq!(c[36..40], (1u32 << 20).to_le_bytes());
        assert_eq!(c[40..44], 1u32.to_le_bytes());
        assert_eq!(c[48..52], (1u32 << 16).to_le_bytes());
        assert_eq!(c[52..56], 1u32.to_le_bytes());
        assert_eq!(c[56], 1);
    }

    #[test]
    fn a_buffer_outside_ram_gets_ioerr_in_the_status_byte() {
        let (_, mut disk) = disk(DiskOptions::default());
        let mem = memory();
        let end = MEM_SIZE;
        for data in [w(end, 512), w(end - 256, 512), w(u64::MAX - 100, 512)] {
            let (status, used) = run_in(
                &mem,
                &mut disk,
                &header(request::IN, 0),
                &[r(HDR, 16), data, w(STATUS, 1)],
            );
            assert_eq!((status, used), (status::IOERR, 1));
        }
        // Without a usable status byte nothing is written.
        let (status, used) = run_in(
            &mem,
            &mut disk,
            &header(request::IN, 0),
            &[r(HDR, 16), w(BUF, 512), w(end, 1)],
        );
        assert_eq!((status, used), (0xee, 0));
    }

    #[test]
    fn read_returns_the_sectors_and_ok() {
        let (_, mut disk) = disk(DiskOptions::default());
        let mem = memory();
        let (status, used) = run_in(
            &mem,
            &mut disk,
            &header(request::IN, 3),
            &[r(HDR, 16), w(BUF, 1024), w(STATUS, 1)],
        );
        assert_eq!((status, used), (status::OK, 1025));
        assert_eq!(
            read_bytes(&mem, BUF, 1024),
            [[3u8; 512], [4u8; 512]].concat()
        );
    }

    #[test]
    fn read_with_header_data_and_status_in_one_odd_split() {
        // Header split over two descriptors; data and status share the last one.
        let (_, mut disk) = disk(DiskOptions::default());
        let mem = memory();
        write_bytes(&mem, HDR + 0x800, &header(request::IN, 1)[10..]);
        let (_, used) = run_in(
            &mem,
            &mut disk,
            &header(request::IN, 1)[..10],
            &[r(HDR, 10), r(HDR + 0x800, 6), w(BUF, 513)],
        );
        assert_eq!(used, 513);
        assert_eq!(
            read_bytes(&mem, BUF, 513),
            [vec![1u8; 512], vec![0]].concat()
        );
    }

    #[test]
    fn write_stores_the_sectors() {
        let (shared, mut disk) = disk(DiskOptions::default());
        let mem = memory();
        write_bytes(&mem, BUF, &[0x5a; 512]);
        let (status, used) = run_in(
            &mem,
            &mut disk,
            &header(request::OUT, 63),
            &[r(HDR, 16), r(BUF, 512), w(STATUS, 1)],
        );
        assert_eq!((status, used), (status::OK, 1));
        assert_eq!(shared.bytes(63 * 512, 512), [0x5a; 512]);
    }

    #[test]
    fn read_only_disk_refuses_writes_without_touching_the_image() {
        let (shared, mut disk) = disk(DiskOptions {
            read_only: true,
            ..Default::default()
        });
        let (status, _) = run(
            &mut disk,
            &header(request::OUT, 0),
            &[r(HDR, 16), r(BUF, 512), w(STATUS, 1)],
        );
        assert_eq!(status, status::IOERR);
        let (status, _) = run(
            &mut disk,
            &header(request::WRITE_ZEROES, 0),
            &[r(HDR, 16), r(BUF, 16), w(STATUS, 1)],
        );
        assert_ne!(status, status::OK);
        assert_eq!(shared.bytes(0, 512), [0; 512]);
        assert!(shared.calls().is_empty());
    }

    #[test]
    fn requests_past_the_end_or_overflowing_are_ioerr() {
        let (_, mut disk) = disk(DiskOptions::default());
        for (kind, sector) in [
            (request::IN, 63),                  // the second sector is past the end
            (request::IN, 64),                  // starts at the end
            (request::OUT, u64::MAX / 512 + 1), // sector * 512 overflows
            (request::IN, u64::MAX),
        ] {
            let data = if kind == request::IN {
                w(BUF, 1024)
            } else {
                r(BUF, 1024)
            };
            let (status, _) = run(
                &mut disk,
                &header(kind, sector),
                &[r(HDR, 16), data, w(STATUS, 1)],
            );
            assert_eq!(status, status::IOERR, "type {kind} sector {sector}");
        }
    }

    #[test]
    fn partial_sector_transfers_are_ioerr() {
        let (shared, mut disk) = disk(DiskOptions::default());
        let (status, _) = run(
            &mut disk,
            &header(request::IN, 0),
            &[r(HDR, 16), w(BUF, 100), w(STATUS, 1)],
        );
        assert_eq!(status, status::IOERR);
        let (status, _) = run(
            &mut disk,
            &header(request::OUT, 0),
            &[r(HDR, 16), r(BUF, 513), w(STATUS, 1)],
        );
        assert_eq!(status, status::IOERR);
        assert!(shared.calls().is_empty());
    }

    #[test]
    fn flush_reaches_the_backend() {
        let (shared, mut disk) = disk(DiskOptions::default());
        let (status, used) = run(
            &mut disk,
            &header(request::FLUSH, 0),
            &[r(HDR, 16), w(STATUS, 1)],
        );
        assert_eq!((status, used), (status::OK, 1));
        assert_eq!(shared.calls(), ["flush"]);
    }

    #[test]
    fn get_id_returns_the_serial() {
        let (_, mut disk) = disk(DiskOptions {
            serial: "disk-0".into(),
            ..Default::default()
        });
        let mem = memory();
        write_bytes(&mem, BUF, &[0xff; 20]);
        let (status, used) = run_in(
            &mem,
            &mut disk,
            &header(request::GET_ID, 0),
            &[r(HDR, 16), w(BUF, 20), w(STATUS, 1)],
        );
        assert_eq!((status, used), (status::OK, 21));
        assert_eq!(
            read_bytes(&mem, BUF, 20),
            b"disk-0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
        );
    }

    #[test]
    fn unknown_or_unnegotiated_types_are_unsupp() {
        let (_, mut disk) = disk(DiskOptions::default());
        let (status, _) = run(&mut disk, &header(99, 0), &[r(HDR, 16), w(STATUS, 1)]);
        assert_eq!(status, status::UNSUPP);
        disk.ack_features(features::VERSION_1);
        let (status, _) = run(
            &mut disk,
            &header(request::DISCARD, 0),
            &[r(HDR, 16), r(BUF, 16), w(STATUS, 1)],
        );
        assert_eq!(status, status::UNSUPP);
    }

    #[test]
    fn discard_punches_a_hole() {
        let (shared, mut disk) = disk(DiskOptions::default());
        let mem = memory();
        write_bytes(&mem, BUF, &segment(2, 3, 0));
        let (status, _) = run_in(
            &mem,
            &mut disk,
            &header(request::DISCARD, 0),
            &[r(HDR, 16), r(BUF, 16), w(STATUS, 1)],
        );
        assert_eq!(status, status::OK);
        assert_eq!(shared.bytes(512, 512), [1; 512]);
        assert_eq!(shared.bytes(2 * 512, 3 * 512), vec![0; 3 * 512]);
        assert_eq!(shared.bytes(5 * 512, 512), [5; 512]);
    }

    #[test]
    fn write_zeroes_falls_back_to_writing() {
        let (shared, mut disk) = disk(DiskOptions::default());
        let mem = memory();
        write_bytes(&mem, BUF, &segment(10, 2, 0));
        let (status, _) = run_in(
            &mem,
            &mut disk,
            &header(request::WRITE_ZEROES, 0),
            &[r(HDR, 16), r(BUF, 16), w(STATUS, 1)],
        );
        assert_eq!(status, status::OK);
        assert_eq!(shared.calls(), ["zero_range", "write"]);
        assert_eq!(shared.bytes(10 * 512, 1024), vec![0; 1024]);
        assert_eq!(shared.bytes(12 * 512, 1), [12]);
    }

    #[test]
    fn write_zeroes_with_unmap_punches() {
        let (shared, mut disk) = disk(DiskOptions::default());
        let mem = memory();
        write_bytes(&mem, BUF, &segment(10, 2, FLAG_UNMAP));
        let (status, _) = run_in(
            &mem,
            &mut disk,
            &header(request::WRITE_ZEROES, 0),
            &[r(HDR, 16), r(BUF, 16), w(STATUS, 1)],
        );
        assert_eq!(status, status::OK);
        assert_eq!(shared.calls(), ["punch"]);
        assert_eq!(shared.bytes(10 * 512, 1024), vec![0; 1024]);
    }

    #[test]
    fn malformed_discard_segments() {
        let (shared, mut disk) = disk(DiskOptions::default());
        let cases: [(u32, Vec<u8>, u8); 6] = [
            // Unmap on a discard; an unknown flag.
            (request::DISCARD, segment(0, 1, FLAG_UNMAP), status::UNSUPP),
            (request::WRITE_ZEROES, segment(0, 1, 2), status::UNSUPP),
            // Two segments; a payload that is not whole segments.
            (
                request::DISCARD,
                [segment(0, 1, 0), segment(1, 1, 0)].concat(),
                status::UNSUPP,
            ),
            (
                request::DISCARD,
                segment(0, 1, 0)[..12].to_vec(),
                status::IOERR,
            ),
            // Past the end; more than the maximum.
            (request::DISCARD, segment(63, 2, 0), status::IOERR),
            (
                request::WRITE_ZEROES,
                segment(0, MAX_WRITE_ZEROES_SECTORS + 1, 0),
                status::IOERR,
            ),
        ];
        for (kind, payload, want) in cases {
            let mem = memory();
            write_bytes(&mem, BUF, &payload);
            let (status, _) = run_in(
                &mem,
                &mut disk,
                &header(kind, 0),
                &[r(HDR, 16), r(BUF, payload.len() as u32), w(STATUS, 1)],
            );
            assert_eq!(status, want, "type {kind} payload {payload:?}");
        }
        assert!(shared.calls().is_empty());
    }

    #[test]
    fn header_too_short_is_ioerr() {
        let (_, mut disk) = disk(DiskOptions::default());
        let (status, used) = run(
            &mut disk,
            &header(request::IN, 0)[..8],
            &[r(HDR, 8), w(STATUS, 1)],
        );
        assert_eq!((status, used), (status::IOERR, 1));
    }

    #[test]
    fn header_in_a_writable_descriptor_is_ioerr() {
        // Wrong direction: the driver made the header device-writable.
        let (_, mut disk) = disk(DiskOptions::default());
        let mem = memory();
        let (status, _) = run_in(
            &mem,
            &mut disk,
            &header(request::OUT, 0),
            &[w(HDR, 16), w(STATUS, 1)],
        );
        assert_eq!(status, status::IOERR);
        // The header bytes were data for the device to write, not a request it ran.
        assert_eq!(read_bytes(&mem, HDR, 1), [request::OUT as u8]);
    }

    #[test]
    fn request_without_a_status_byte_is_returned_empty() {
        let (shared, mut disk) = disk(DiskOptions::default());
        let (_, used) = run(
            &mut disk,
            &header(request::OUT, 0),
            &[r(HDR, 16), r(BUF, 512)],
        );
        assert_eq!(used, 0);
        assert!(shared.calls().is_empty());
    }

    #[test]
    fn buffers_outside_memory_get_ioerr_without_touching_the_disk() {
        let (shared, mut disk) = disk(DiskOptions::default());
        let (status, used) = run(
            &mut disk,
            &header(request::IN, 0),
            &[r(HDR, 16), w(MEM_SIZE - 256, 512), w(STATUS, 1)],
        );
        assert_eq!((status, used), (status::IOERR, 1));
        let (status, used) = run(
            &mut disk,
            &header(request::OUT, 0),
            &[r(HDR, 16), r(u64::MAX - 100, 512), w(STATUS, 1)],
        );
        assert_eq!((status, used), (status::IOERR, 1));
        assert!(shared.calls().is_empty());
    }

    #[test]
    fn a_descriptor_loop_is_cut_and_answered() {
        use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        let (_, mut disk) = disk(DiskOptions::default());
        let mem = memory();
        let driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        write_bytes(&mem, HDR, &header(request::IN, 0));
        driver.write_desc(0, HDR, 16, VRING_DESC_F_NEXT as u16, 1);
        driver.write_desc(
            1,
            BUF,
            512,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            1,
        );
        driver.publish(0);

        process_queue(&mut queue, &mem, &mut disk).unwrap();

        // The chain is cut after 16 descriptors: the header and 15 views of the same 512-byte
        // buffer. The 7679 bytes before the status byte are not whole sectors, so IOERR, and
        // the status lands in the last byte of the looping buffer.
        assert_eq!(driver.used_idx(), 1);
        assert_eq!(driver.used(0), (0, 1));
        assert_eq!(read_bytes(&mem, BUF + 511, 1), [status::IOERR]);
    }

    /// Records what the device asks of its transport.
    #[derive(Default)]
    struct Signals {
        queue: std::sync::atomic::AtomicUsize,
        needs_reset: std::sync::atomic::AtomicUsize,
    }

    impl VirtioInterrupt for Signals {
        fn trigger(&self, _: virtio::InterruptKind) -> io::Result<()> {
            self.queue.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        fn set_needs_reset(&self) -> io::Result<()> {
            self.needs_reset
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn an_avail_index_far_ahead_asks_for_a_reset_and_the_reset_brings_the_disk_back() {
        use std::sync::atomic::Ordering::SeqCst;
        let mem = memory();
        let mut blk =
            VirtioBlock::with_backend(Box::new(MemDisk(vec![7; 4096])), &DiskOptions::default())
                .unwrap();
        let signals = Arc::new(Signals::default());
        let activate = |blk: &mut VirtioBlock, driver: &Driver<'_>| {
            let queue = ActiveQueue {
                queue: driver.queue(),
                notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            };
            blk.activate(mem.clone(), signals.clone(), vec![queue])
                .unwrap();
        };
        let driver = Driver::new(&mem, 16);
        activate(&mut blk, &driver);
        // 21 buffers announced on a ring of 16.
        driver.set_avail_idx(16 + 5);
        blk.process();
        assert_eq!(signals.needs_reset.load(SeqCst), 1);
        assert_eq!(driver.used_idx(), 0);
        // The queue is no longer served, even once the index looks sane again.
        driver.set_avail_idx(0);
        let mut driver = Driver::new(&mem, 16);
        write_bytes(&mem, HDR, &header(request::IN, 1));
        driver.add(&[r(HDR, 16), w(BUF, 512), w(STATUS, 1)]);
        blk.process();
        assert_eq!(driver.used_idx(), 0);
        assert_eq!(signals.needs_reset.load(SeqCst), 1);

        // The driver resets the device and sets the queue up again: the request is served.
        assert!(blk.reset());
        activate(&mut blk, &driver);
        blk.process();
        assert_eq!(driver.used_idx(), 1);
        assert_eq!(read_bytes(&mem, STATUS, 1), [status::OK]);
        assert_eq!(read_bytes(&mem, BUF, 4), [7; 4]);
        assert_eq!(signals.needs_reset.load(SeqCst), 1);
        assert_eq!(signals.queue.load(SeqCst), 1);
    }

    #[test]
    fn a_request_larger_than_the_cap_is_ioerr_without_reading_the_image() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mut disk = Disk::new(
            Box::new(MemDisk(vec![7; 40 << 20])),
            &DiskOptions::default(),
        )
        .unwrap();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        write_bytes(&mem, HDR, &header(request::IN, 0));
        // 12 writable views of the same 3 MiB: 36 MiB of "buffers", 1 byte more for status.
        let mut descs = vec![r(HDR, 16)];
        descs.extend(std::iter::repeat_n(w(0x10_0000, 3 << 20), 12));
        descs.push(w(STATUS, 1));
        driver.add(&descs);
        process_queue(&mut queue, &mem, &mut disk).unwrap();
        assert_eq!(driver.used_idx(), 1);
        assert_eq!(driver.used(0).1, 1);
        assert_eq!(read_bytes(&mem, STATUS, 1), [status::IOERR]);
        assert_eq!(read_bytes(&mem, 0x10_0000, 4), [0; 4]);
    }

    #[test]
    fn huge_aliased_chains_are_served_a_budget_per_wakeup_and_the_queue_is_rearmed() {
        use std::sync::atomic::Ordering::SeqCst;
        let mem = memory();
        let mut blk =
            VirtioBlock::with_backend(Box::new(MemDisk(vec![7; 4096])), &DiskOptions::default())
                .unwrap();
        let driver = Driver::new(&mem, 16);
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let signals = Arc::new(Signals::default());
        let queue = ActiveQueue {
            queue: driver.queue(),
            notify: notify.try_clone().unwrap(),
        };
        blk.activate(mem.clone(), signals.clone(), vec![queue])
            .unwrap();
        // One chain of all 16 descriptors, each 960 KiB over the same pages (15 MiB), posted
        // 16 times.
        for i in 0..16u16 {
            let flags = if i < 15 {
                VRING_DESC_F_NEXT
            } else {
                VRING_DESC_F_WRITE
            };
            driver.write_desc(i, DATA, 0xf_0000, flags as u16, i + 1);
        }
        for _ in 0..16 {
            driver.publish(0);
        }

        blk.process();
        // 64 MiB per wake-up: five chains, then the queue's eventfd is signalled again so the
        // loop comes back after the other devices.
        assert_eq!(driver.used_idx(), 5);
        assert_eq!(notify.read().unwrap(), 1);
        blk.process();
        blk.process();
        assert_eq!(driver.used_idx(), 15);
        assert_eq!(notify.read().unwrap(), 2);
        blk.process();
        assert_eq!(driver.used_idx(), 16);
        assert!(notify.read().is_err(), "nothing left: not re-armed");
        assert_eq!(signals.needs_reset.load(SeqCst), 0);
    }

    #[test]
    fn a_real_file_round_trip_with_hole_punching() {
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.set_len(8 * 512).unwrap();
        FileExt::write_all_at(&file, &[7u8; 4096], 0).unwrap();
        let mut disk =
            Disk::new(Box::new(file.try_clone().unwrap()), &DiskOptions::default()).unwrap();
        disk.ack_features(disk.features());
        assert_eq!(disk.sectors(), 8);

        let mem = memory();
        write_bytes(&mem, BUF, &segment(0, 8, FLAG_UNMAP));
        let (status, _) = run_in(
            &mem,
            &mut disk,
            &header(request::WRITE_ZEROES, 0),
            &[r(HDR, 16), r(BUF, 16), w(STATUS, 1)],
        );
        assert_eq!(status, status::OK);
        let mut back = [1u8; 4096];
        FileExt::read_exact_at(&file, &mut back, 0).unwrap();
        assert_eq!(back, [0u8; 4096]);

        write_bytes(&mem, BUF, &[9u8; 512]);
        let (status, _) = run_in(
            &mem,
            &mut disk,
            &header(request::OUT, 7),
            &[r(HDR, 16), r(BUF, 512), w(STATUS, 1)],
        );
        assert_eq!(status, status::OK);
        let (status, _) = run(
            &mut disk,
            &header(request::FLUSH, 0),
            &[r(HDR, 16), w(STATUS, 1)],
        );
        assert_eq!(status, status::OK);
        let mut sector = [0u8; 512];
        FileExt::read_exact_at(&file, &mut sector, 7 * 512).unwrap();
        assert_eq!(sector, [9u8; 512]);
    }
}
