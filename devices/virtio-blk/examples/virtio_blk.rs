//! A virtio-blk device serving one read request without KVM: the example plays the driver,
//! building a split virtqueue by hand in a `GuestMemoryMmap`, and runs the device's event loop on
//! its own thread, as a VMM would.
//!
//! ```text
//! cargo run -p vmmkit-virtio-blk --example virtio_blk
//! ```
//!
//! It writes a 1 MiB image whose sector N starts with "sector N", activates the device with one
//! queue, puts a `VIRTIO_BLK_T_IN` request for sector 3 on the queue (header, 512-byte buffer,
//! status byte: virtio 1.2 section 5.2.6), notifies the queue's eventfd as KVM would on the
//! driver's notify write, waits for the used-ring interrupt, and prints what came back.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio::events::DeviceEventLoop;
use virtio::{ActiveQueue, InterruptKind, VirtioDevice, VirtioInterrupt};
use virtio_blk::{DiskOptions, VirtioBlock};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Where the driver put its queue and buffers in guest memory.
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
const HEADER: u64 = 0x4000;
const DATA: u64 = 0x5000;
const STATUS: u64 = 0x6000;
const QUEUE_SIZE: u16 = 16;

/// Split-ring descriptor flags (virtio 1.2 section 2.7.5).
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Request type and status (section 5.2.6).
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// The interrupt line: a channel the example waits on, where a VMM would write an irqfd.
struct Interrupt(Mutex<std::sync::mpsc::Sender<InterruptKind>>);

impl VirtioInterrupt for Interrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        let _ = self.0.lock().unwrap().send(kind);
        Ok(())
    }
}

fn descriptor(mem: &GuestMemoryMmap, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = GuestAddress(DESC_TABLE + u64::from(index) * 16);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&addr.to_le_bytes());
    bytes[8..12].copy_from_slice(&len.to_le_bytes());
    bytes[12..14].copy_from_slice(&flags.to_le_bytes());
    bytes[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&bytes, at)
        .expect("the descriptor table is in guest memory");
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The disk image.
    let path = std::env::temp_dir().join(format!("virtio-blk-example-{}.img", std::process::id()));
    let mut image = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    for sector in 0..2048u64 {
        let mut block = [0u8; 512];
        let label = format!("sector {sector}");
        block[..label.len()].copy_from_slice(label.as_bytes());
        image.write_all(&block)?;
    }
    let device = VirtioBlock::new(image.try_clone()?, &DiskOptions::default())?;
    std::fs::remove_file(&path)?;
    let blk = Arc::new(Mutex::new(device));
    {
        let blk = blk.lock().unwrap();
        println!(
            "virtio-blk: device type {}, {} queue(s), features {:#x}",
            blk.device_type(),
            blk.queue_max_sizes().len(),
            blk.features()
        );
    }

    // What a transport does when the driver sets FEATURES_OK and then DRIVER_OK.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
    blk.lock().unwrap().ack_features(VIRTIO_F_VERSION_1);
    let mut queue = Queue::new(QUEUE_SIZE)?;
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    let notify = EventFd::new(EFD_NONBLOCK)?;
    let kick = notify.try_clone()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let mut event_loop = DeviceEventLoop::new()?.with_name("virtio-blk0");
    event_loop.add_subscriber(blk.clone());
    blk.lock().unwrap().activate(
        mem.clone(),
        Arc::new(Interrupt(Mutex::new(tx))),
        vec![ActiveQueue { queue, notify }],
    )?;
    let running = event_loop.start()?;

    // The driver's request: read sector 3.
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    header[8..].copy_from_slice(&3u64.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HEADER))?;
    mem.write_obj(0xffu8, GuestAddress(STATUS))?;
    descriptor(&mem, 0, HEADER, 16, VIRTQ_DESC_F_NEXT, 1);
    descriptor(
        &mem,
        1,
        DATA,
        512,
        VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
        2,
    );
    descriptor(&mem, 2, STATUS, 1, VIRTQ_DESC_F_WRITE, 0);
    // avail ring: flags, idx, ring[0] = head 0.
    mem.write_obj(0u16, GuestAddress(AVAIL_RING + 4))?;
    mem.write_obj(1u16, GuestAddress(AVAIL_RING + 2))?;
    kick.write(1)?;

    let kind = rx.recv_timeout(Duration::from_secs(5))?;
    let used_idx: u16 = mem.read_obj(GuestAddress(USED_RING + 2))?;
    let used_len: u32 = mem.read_obj(GuestAddress(USED_RING + 8))?;
    let status: u8 = mem.read_obj(GuestAddress(STATUS))?;
    let mut data = [0u8; 512];
    mem.read_slice(&mut data, GuestAddress(DATA))?;
    let text = String::from_utf8_lossy(&data[..data.iter().position(|&b| b == 0).unwrap_or(0)]);
    println!("interrupt: {kind:?}");
    println!("used ring: idx {used_idx}, {used_len} bytes written");
    println!(
        "status: {} ({status})",
        if status == VIRTIO_BLK_S_OK {
            "OK"
        } else {
            "error"
        }
    );
    println!("data: {text:?}");
    running.stop()?;
    if status != VIRTIO_BLK_S_OK || text != "sector 3" {
        return Err("the device did not return sector 3".into());
    }
    Ok(())
}
