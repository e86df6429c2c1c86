//! Fuzzing entry points for virtio-blk: [`blk_queue`] runs the request processing on a queue
//! built from the input (layout: `virtio::fuzz`), and [`mmio_transport`] plays register accesses
//! against a virtio-blk device behind the virtio-mmio transport on a bus. The cargo-fuzz targets
//! are one-line wrappers, and a saved crash input replays in a plain `#[test]`.
//!
//! Transport input: 8-byte records `[op, off_lo, off_hi, width, v0..v3]` until a record whose op
//! is 0xff; the bytes after it are guest memory as for the queue targets. `op & 3`: 0 read,
//! 1 write, 2 run one round of the device event loop, 3 write a value taken from the little
//! "driver" table below (so that the status sequence is reachable). The offset is 10 bits, so
//! accesses also fall past the 0x200-byte block.

use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;

use crate::{
    complete_queue, feature, plan_request, process_queue, Disk, DiskBackend, DiskOptions, IoEngine,
    MemDisk, Op, VirtioBlock,
};
use bus::Bus;
use virtio::events::DeviceEventLoop;
use virtio::fuzz::{memory, queue_and_memory, AVAIL_RING, DESC_TABLE, USED_RING};
use virtio::mmio::{VirtioMmioTransport, MMIO_LEN};
use virtio::queue::features;
use virtio::status;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryBackend;

/// Sectors of the in-memory disk.
const DISK_SECTORS: usize = 16;

fn disk_image() -> Vec<u8> {
    (0..DISK_SECTORS * 512).map(|i| (i / 512) as u8).collect()
}

/// virtio-blk request processing. Flags bit 1: read-only disk; bit 2: discard and write-zeroes
/// negotiated; bit 3: the disk is a file on io_uring, so well-formed reads, writes and
/// flushes take the asynchronous path, and every chain must still complete; bit 4: served as a
/// worker that polls the ring serves it (the driver's notifications off, and left off).
pub fn blk_queue(input: &[u8]) {
    let Some((mut queue, flags, mem)) = queue_and_memory(input) else {
        return;
    };
    let read_only = flags & 2 != 0;
    let options = DiskOptions {
        read_only,
        serial: "fuzz".into(),
        io_engine: IoEngine::Async,
    };
    if let Some((probe, _, _)) = queue_and_memory(input) {
        check_plans(probe, &mem, read_only);
    }
    let backend: Box<dyn DiskBackend> = if flags & 8 != 0 {
        match file_image() {
            Some(file) => Box::new(file),
            None => return,
        }
    } else {
        Box::new(MemDisk(disk_image()))
    };
    let Ok(mut disk) = Disk::new(backend, &options) else {
        return;
    };
    if flags & 4 != 0 {
        disk.ack_features(disk.features());
    }
    let (avail_before, used_before) = (queue.next_avail(), queue.next_used());
    // Bit 4: served as by a worker that polls the ring.
    let mut healthy = virtio::fuzz::serve_polled(flags & 16 != 0, &mut queue, &mem, |queue| {
        process_queue(queue, &mem, &mut disk)
    })
    .is_ok();
    // Every request handed to the kernel completes, with a used entry.
    while healthy && disk.in_flight() > 0 {
        disk.wait_for_completion();
        healthy = complete_queue(&mut queue, &mem, &mut disk).is_ok();
    }
    if healthy {
        // As many used entries as chains taken, whichever path served them.
        assert_eq!(
            queue.next_used().wrapping_sub(used_before),
            queue.next_avail().wrapping_sub(avail_before)
        );
    }
    assert_eq!(disk.sectors(), DISK_SECTORS as u64);
}

/// The disk image in a file of its own (unlinked at once), for the io_uring path.
fn file_image() -> Option<std::fs::File> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("vmmkit-blk-fuzz-{}-{n}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .ok()?;
    let _ = std::fs::remove_file(&path);
    file.write_all(&disk_image()).ok()?;
    Some(file)
}

/// What [`plan_request`] promises of every chain it accepts: buffers inside guest memory and
/// inside the chain, a whole number of sectors within the disk, the used length of the
/// synchronous path.
fn check_plans(mut probe: virtio_queue::Queue, mem: &GuestMemoryMmap, read_only: bool) {
    let Ok(chains) = probe.iter(mem) else {
        return;
    };
    for chain in chains.take(usize::from(crate::QUEUE_SIZE)) {
        let Some(plan) = plan_request(&chain, DISK_SECTORS as u64, read_only) else {
            continue;
        };
        assert_eq!(
            plan.len,
            plan.data.iter().map(|&(_, len)| len).sum::<usize>()
        );
        for &(addr, len) in &plan.data {
            assert!(mem.check_range(addr, len));
            let writable = plan.op == Op::Read;
            assert!(chain.clone().any(|d| d.is_write_only() == writable
                && d.addr() <= addr
                && addr.0 + len as u64 <= d.addr().0 + u64::from(d.len())));
        }
        assert!(mem.check_range(plan.status, 1));
        match plan.op {
            Op::Flush => assert_eq!((plan.len, plan.used), (0, 1)),
            Op::Read | Op::Write => {
                assert!(plan.len > 0 && plan.len % 512 == 0);
                assert!(plan.offset + plan.len as u64 <= DISK_SECTORS as u64 * 512);
                let used = if plan.op == Op::Read { plan.len + 1 } else { 1 };
                assert_eq!(plan.used as usize, used);
                assert!(!(read_only && plan.op == Op::Write));
            }
        }
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
    (feature::FLUSH | feature::DISCARD | feature::WRITE_ZEROES) as u32,
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
    use virtio::fuzz::{desc, garbage, soak_iterations, structured_queue_input, xorshift};
    use virtio::mmio::reg;
    use vm_memory::{Bytes, GuestAddress};

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
        let drained = process_queue(&mut queue, &mem, &mut disk).unwrap();
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

    #[test]
    fn survives_garbage() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in [0usize, 3, 4, 5, 64, 0x600, 0x4100, 0x8000] {
            let input = garbage(len, &mut seed);
            blk_queue(&input);
            mmio_transport(&input);
        }
    }

    /// Structured random inputs (see `virtio::fuzz::structured_queue_input`).
    /// `VIRTIO_SOAK=<iterations>` runs it longer.
    #[test]
    #[ignore = "a long soak; run with --ignored"]
    fn soak() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || xorshift(&mut seed);
        for _ in 0..soak_iterations() {
            let (input, mem) = structured_queue_input(&mut next);
            let pick = |r: u64, options: &[u64]| options[(r % options.len() as u64) as usize];
            blk_queue(&input);

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
