//! Fuzzing entry points for the virtio code: each builds guest memory (and a queue, or a whole
//! transport) from the input bytes and runs the real processing with in-memory backends. The
//! cargo-fuzz targets are one-line wrappers, and a saved crash input replays in a plain `#[test]`.
//!
//! Queue targets ([`blk_queue`], [`rng_queue`], [`net_queue`]): the first 4 bytes set up the queue
//! (`[size, next_avail, next_used, flags]`, size `1 << (b % 5)` entries, flags bit 0:
//! `VIRTIO_F_EVENT_IDX`, bits 1-2: device options), the rest is guest memory: two regions
//! `[0, 0x4000)` and `[0x5000, 0x8000)` with a hole between them, descriptor table at 0,
//! available ring at 0x200, used ring at 0x400. Everything else in memory, including every
//! descriptor, comes from the input.
//!
//! Transport target ([`mmio_transport`]): 8-byte records `[op, off_lo, off_hi, width, v0..v3]`
//! played against a virtio-blk device behind the MMIO transport on a bus, until a record whose
//! op is 0xff; the bytes after it are guest memory as above. `op & 3`: 0 read, 1 write, 2 run
//! one round of the device event loop, 3 write a value taken from the little "driver" table
//! below (so that the status sequence is reachable). The offset is 10 bits, so accesses also
//! fall past the 0x200-byte block.

use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::block::{self, Disk, DiskOptions, MemDisk, VirtioBlock};
use super::events::DeviceEventLoop;
use super::mmio::{VirtioMmioTransport, MMIO_LEN};
use super::net::{self, Loopback, RxState};
use super::queue::{features, ErrorLog};
use super::{rng, status};
use crate::bus::Bus;

const REGIONS: [(u64, usize); 2] = [(0, 0x4000), (0x5000, 0x3000)];
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x200;
const USED_RING: u64 = 0x400;
/// Sectors of the in-memory disk.
const DISK_SECTORS: usize = 16;

/// Guest memory with `bytes` copied over its regions in order.
fn memory(bytes: &[u8]) -> Option<GuestMemoryMmap> {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(base, len)| (GuestAddress(base), len))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).ok()?;
    let mut rest = bytes;
    for (base, len) in REGIONS {
        let n = rest.len().min(len);
        mem.write_slice(&rest[..n], GuestAddress(base)).ok()?;
        rest = &rest[n..];
    }
    Some(mem)
}

/// Splits the input into the queue set-up, its flags and guest memory.
fn queue_and_memory(input: &[u8]) -> Option<(Queue, u8, GuestMemoryMmap)> {
    let (&[size, next_avail, next_used, flags], rest) = input.split_first_chunk::<4>()?;
    let mut queue = Queue::new(16).ok()?;
    queue.try_set_size(1 << (size % 5)).ok()?;
    queue.set_next_avail(u16::from(next_avail));
    queue.set_next_used(u16::from(next_used));
    queue.set_event_idx(flags & 1 != 0);
    queue
        .try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .ok()?;
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .ok()?;
    queue
        .try_set_used_ring_address(GuestAddress(USED_RING))
        .ok()?;
    queue.set_ready(true);
    Some((queue, flags, memory(rest)?))
}

fn disk_image() -> Vec<u8> {
    (0..DISK_SECTORS * 512).map(|i| (i / 512) as u8).collect()
}

/// virtio-blk request processing. Flags bit 1: read-only disk; bit 2: discard and write-zeroes
/// negotiated.
pub fn blk_queue(input: &[u8]) {
    let Some((mut queue, flags, mem)) = queue_and_memory(input) else {
        return;
    };
    let options = DiskOptions {
        read_only: flags & 2 != 0,
        serial: "fuzz".into(),
    };
    let Ok(mut disk) = Disk::new(Box::new(MemDisk(disk_image())), &options) else {
        return;
    };
    if flags & 4 != 0 {
        disk.ack_features(disk.features());
    }
    let _ = block::process_queue(&mut queue, &mem, &mut disk);
    assert_eq!(disk.sectors(), DISK_SECTORS as u64);
}

/// Yields 0, 1, 2, ... so that runs are reproducible.
struct Counting(u8);

impl Read for Counting {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        for b in buf.iter_mut() {
            *b = self.0;
            self.0 = self.0.wrapping_add(1);
        }
        Ok(buf.len())
    }
}

/// virtio-rng request processing.
pub fn rng_queue(input: &[u8]) {
    let Some((mut queue, _, mem)) = queue_and_memory(input) else {
        return;
    };
    let _ = rng::process_queue(
        &mut queue,
        &mem,
        &mut Counting(0),
        &mut ErrorLog::new("fuzz"),
    );
}

/// virtio-net: the queue as a receive queue (flags bit 1: mergeable buffers) fed a runt, a
/// small, a full-size and a jumbo frame, then as a transmit queue (flags bit 2: transmit
/// first).
pub fn net_queue(input: &[u8]) {
    let Some((mut queue, flags, mem)) = queue_and_memory(input) else {
        return;
    };
    let mut backend = Loopback::default();
    for len in [5usize, 60, 1526, 9012] {
        backend
            .incoming
            .push_back((0..len).map(|i| i as u8).collect());
    }
    let mut rx = RxState::new(flags & 2 != 0);
    let mut errors = ErrorLog::new("fuzz");
    let mut tx_buf = Vec::new();
    let mut receive = |queue: &mut Queue, backend: &mut Loopback| {
        let _ = net::process_rx(queue, &mem, backend, &mut rx, &mut errors);
    };
    if flags & 4 != 0 {
        let _ = net::process_tx(
            &mut queue,
            &mem,
            &mut backend,
            &mut tx_buf,
            &mut ErrorLog::new("fuzz"),
        );
        receive(&mut queue, &mut backend);
    } else {
        receive(&mut queue, &mut backend);
        let _ = net::process_tx(
            &mut queue,
            &mem,
            &mut backend,
            &mut tx_buf,
            &mut ErrorLog::new("fuzz"),
        );
    }
    for frame in &backend.sent {
        assert!(frame.len() <= net::MAX_FRAME);
    }
}

/// Values a driver writes, for op 3: the status steps, the features we offer, a queue layout
/// inside the fuzz memory, and queue numbers.
const DRIVER_VALUES: [u32; 16] = [
    0,
    status::ACKNOWLEDGE as u32,
    (status::ACKNOWLEDGE | status::DRIVER) as u32,
    (status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK) as u32,
    (status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK) as u32,
    status::FAILED as u32,
    (features::VERSION_1 >> 32) as u32,
    (block::feature::FLUSH | block::feature::DISCARD | block::feature::WRITE_ZEROES) as u32,
    DESC_TABLE as u32,
    AVAIL_RING as u32,
    USED_RING as u32,
    1,
    8,
    16,
    256,
    u32::MAX,
];

/// The virtio-mmio transport with a virtio-blk device behind it, driven by register accesses.
pub fn mmio_transport(input: &[u8]) {
    let _ = play_mmio(input);
}

/// Plays the input; returns the guest memory for tests to look at.
fn play_mmio(input: &[u8]) -> Option<GuestMemoryMmap> {
    const BASE: u64 = 0x1000_0000;
    let split = input
        .chunks(8)
        .position(|r| r.first() == Some(&0xff))
        .map_or(input.len(), |i| (i * 8 + 8).min(input.len()));
    let (records, mem_bytes) = input.split_at(split);
    let mem = memory(mem_bytes)?;
    let device =
        VirtioBlock::with_backend(Box::new(MemDisk(disk_image())), &DiskOptions::default()).ok()?;
    let device = Arc::new(Mutex::new(device));
    let transport = VirtioMmioTransport::new(mem.clone(), device.clone()).ok()?;
    let bus = Bus::new();
    bus.insert(Arc::new(Mutex::new(transport)), BASE, MMIO_LEN)
        .ok()?;
    let mut event_loop = DeviceEventLoop::new().ok()?;
    event_loop.add_subscriber(device);

    for record in records.chunks_exact(8) {
        let &[op, lo, hi, width, v0, v1, v2, v3] = record else {
            continue;
        };
        let addr = BASE + (u64::from(u16::from_le_bytes([lo, hi])) & 0x3ff);
        let width = [1usize, 2, 4, 8][usize::from(width & 3)];
        match op & 3 {
            0 => {
                let mut data = [0u8; 8];
                bus.read(addr, &mut data[..width]);
            }
            1 => {
                let bytes = [v0, v1, v2, v3, v0, v1, v2, v3];
                bus.write(addr, &bytes[..width]);
            }
            2 => {
                let _ = event_loop.run_once(0);
            }
            _ => {
                let value = DRIVER_VALUES[usize::from(v0 & 15)];
                bus.write(addr & !3, &value.to_le_bytes());
            }
        }
    }
    Some(mem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mmio::reg;

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        d
    }

    /// Memory with one blk read request of sector 2 at head 0; data at 0x1000, status at 0x2000.
    fn blk_read_memory() -> Vec<u8> {
        let mut mem = vec![0u8; 0x3000];
        mem[0..16].copy_from_slice(&desc(0x800, 16, 1, 1));
        mem[16..32].copy_from_slice(&desc(0x1000, 512, 3, 2));
        mem[32..48].copy_from_slice(&desc(0x2000, 1, 2, 0));
        // avail: flags, idx = 1, ring[0] = 0.
        mem[0x202] = 1;
        // header: IN, sector 2.
        mem[0x808] = 2;
        mem
    }

    #[test]
    fn blk_queue_serves_a_well_formed_request() {
        let mut input = vec![4, 0, 0, 0];
        input.extend(blk_read_memory());
        // Replays through the public entry point (no panic) and checks the same run here.
        blk_queue(&input);

        let (mut queue, _, mem) = queue_and_memory(&input).unwrap();
        let mut disk = Disk::new(Box::new(MemDisk(disk_image())), &DiskOptions::default()).unwrap();
        let drained = block::process_queue(&mut queue, &mem, &mut disk).unwrap();
        assert_eq!(drained.completed, 1);
        let mut data = [0u8; 512];
        mem.read_slice(&mut data, GuestAddress(0x1000)).unwrap();
        assert_eq!(data, [2u8; 512]);
        let status: u8 = mem.read_obj(GuestAddress(0x2000)).unwrap();
        assert_eq!(status, 0);
        let used_len: u32 = mem.read_obj(GuestAddress(USED_RING + 8)).unwrap();
        assert_eq!(used_len, 513);
    }

    #[test]
    fn net_queue_receives_into_a_well_formed_buffer() {
        let mut mem = vec![0u8; 0x3000];
        mem[0..16].copy_from_slice(&desc(0x1000, 2048, 2, 0));
        mem[0x202] = 1;
        let mut input = vec![4, 0, 0, 2];
        input.extend(&mem);
        net_queue(&input);

        // The same run by hand: the runt is dropped, the 60-byte frame fills the buffer.
        let (mut queue, _, mem) = queue_and_memory(&input).unwrap();
        let mut backend = Loopback::default();
        backend.incoming.push_back(vec![7; 5]);
        backend.incoming.push_back(vec![7; 60]);
        let out = net::process_rx(
            &mut queue,
            &mem,
            &mut backend,
            &mut RxState::new(true),
            &mut ErrorLog::new("test"),
        )
        .unwrap();
        assert_eq!((out.delivered, out.dropped), (1, 1));
        let used_len: u32 = mem.read_obj(GuestAddress(USED_RING + 8)).unwrap();
        assert_eq!(used_len, 60);
    }

    #[test]
    fn queue_targets_survive_garbage() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in [0usize, 3, 4, 5, 64, 0x600, 0x4100, 0x8000] {
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            blk_queue(&input);
            rng_queue(&input);
            net_queue(&input);
            mmio_transport(&input);
        }
    }

    #[test]
    fn mmio_stream_reaches_a_served_request() {
        // Drive the transport like Linux would, then run the event loop once.
        let mut records = Vec::new();
        let mut write = |offset: u64, value: u32| {
            records.push(1u8);
            records.extend_from_slice(&(offset as u16).to_le_bytes());
            records.push(2);
            records.extend_from_slice(&value.to_le_bytes());
        };
        write(reg::STATUS, 1);
        write(reg::STATUS, 3);
        write(reg::DRIVER_FEATURES_SEL, 1);
        write(reg::DRIVER_FEATURES, 1);
        write(reg::STATUS, 11);
        write(reg::QUEUE_SEL, 0);
        write(reg::QUEUE_NUM, 16);
        write(reg::QUEUE_DESC_LOW, DESC_TABLE as u32);
        write(reg::QUEUE_DRIVER_LOW, AVAIL_RING as u32);
        write(reg::QUEUE_DEVICE_LOW, USED_RING as u32);
        write(reg::QUEUE_READY, 1);
        write(reg::STATUS, 15);
        write(reg::QUEUE_NOTIFY, 0);
        records.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]);
        records.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]);
        records.extend_from_slice(&[0xff, 0, 0, 0, 0, 0, 0, 0]);
        let mut input = records;
        input.extend(blk_read_memory());

        let mem = play_mmio(&input).unwrap();

        let mut data = [0u8; 512];
        mem.read_slice(&mut data, GuestAddress(0x1000)).unwrap();
        assert_eq!(data, [2u8; 512]);
        let used_idx: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
        assert_eq!(used_idx, 1);
    }

    /// Structured random inputs for every target: plausible descriptor tables, rings and
    /// request headers with edge values. `VIRTIO_SOAK=<iterations>` runs it longer.
    #[test]
    #[ignore = "a long soak; run with --ignored"]
    fn soak() {
        let iterations: u64 = std::env::var("VIRTIO_SOAK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..iterations {
            let mut mem = vec![0u8; 0x7000];
            let pick = |r: u64, options: &[u64]| options[(r % options.len() as u64) as usize];
            for i in 0..24u64 {
                let r = next();
                let addr = pick(
                    r,
                    &[
                        0x800 + (r >> 8) % 0x3000,
                        0x3ff0 + (r >> 8) % 0x20,
                        0x4ff8,
                        0x7ff0,
                        0x1000,
                        u64::MAX - 8,
                        (r >> 8) % 0x8000,
                    ],
                );
                let r = next();
                let len = pick(r, &[0, 1, 12, 15, 16, 17, 511, 512, 513, 4096, 0x3000]) as u32
                    ^ if r % 17 == 0 { (r >> 32) as u32 } else { 0 };
                let flags = (next() % 8) as u16;
                let nxt = (next() % 20) as u16;
                let at = (16 * i) as usize;
                mem[at..at + 16].copy_from_slice(&desc(addr, len, flags, nxt));
            }
            let r = next();
            let idx = pick(r, &[0, 1, 2, 3, 5, 16, 17, (r >> 8) & 0xffff]) as u16;
            mem[0x202..0x204].copy_from_slice(&idx.to_le_bytes());
            for i in 0..16usize {
                mem[0x204 + 2 * i] = (next() % 20) as u8;
            }
            // Request headers and payloads scattered over the data area.
            for _ in 0..16 {
                let at = (0x800 + (next() % 0x3000) as usize) & !7;
                let r = next();
                let kind = pick(r, &[0, 1, 4, 8, 11, 13, 99]) as u32;
                let sector = pick(next(), &[0, 1, 15, 16, 17, u64::MAX, 1 << 55]);
                mem[at..at + 4].copy_from_slice(&kind.to_le_bytes());
                mem[at + 8..at + 16].copy_from_slice(&sector.to_le_bytes());
                let count = pick(next(), &[0, 1, 2, 16, 1 << 16, u32::MAX as u64]) as u32;
                let flags = pick(next(), &[0, 1, 2, 3]) as u32;
                if at + 32 <= mem.len() {
                    mem[at + 16..at + 24].copy_from_slice(&sector.to_le_bytes());
                    mem[at + 24..at + 28].copy_from_slice(&count.to_le_bytes());
                    mem[at + 28..at + 32].copy_from_slice(&flags.to_le_bytes());
                }
            }
            let head = [
                next() as u8,
                next() as u8 % 4,
                next() as u8 % 4,
                next() as u8,
            ];
            let mut input = head.to_vec();
            input.extend(&mem);
            blk_queue(&input);
            rng_queue(&input);
            net_queue(&input);

            // A register stream: mostly driver-table writes to the real registers.
            let mut records = Vec::new();
            for _ in 0..(next() % 48) {
                let r = next();
                let offset = pick(
                    r,
                    &[
                        0x70,
                        0x70,
                        0x70,
                        0x20,
                        0x24,
                        0x30,
                        0x38,
                        0x44,
                        0x50,
                        0x64,
                        0x80,
                        0x90,
                        0xa0,
                        0x100,
                        0x1fc,
                        (r >> 8) % 0x400,
                    ],
                ) as u16;
                let op = pick(next(), &[3, 3, 3, 1, 0, 2]) as u8;
                let width = (next() % 4) as u8 | if next() % 3 == 0 { 0 } else { 2 };
                records.push(op);
                records.extend_from_slice(&offset.to_le_bytes());
                records.push(width);
                records.extend_from_slice(&(next() as u32).to_le_bytes());
            }
            records.extend_from_slice(&[0xff; 8]);
            records.extend(&mem);
            mmio_transport(&records);
        }
    }
}
