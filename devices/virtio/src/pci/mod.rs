//! The virtio PCI transport, modern devices only (Virtual I/O Device (VIRTIO) Version 1.2,
//! section 4.1), with MSI-X (PCI Local Bus Specification 3.0, section 6.8.2) or INTx.
//!
//! The function is 1af4:1040+type, revision 1 (4.1.2), with one 32-bit memory BAR (BAR 0,
//! [`BAR_SIZE`] bytes) holding every structure its vendor capabilities point at (4.1.4):
//!
//! | BAR 0 offset | structure                                              |
//! |--------------|--------------------------------------------------------|
//! | `0x0000`     | common configuration (4.1.4.3)                         |
//! | `0x1000`     | ISR status, read-to-clear (4.1.4.5)                    |
//! | `0x2000`     | device-specific configuration (4.1.4.6)                |
//! | `0x3000`     | notifications: queue `n` at `4 * n` (4.1.4.4)          |
//! | `0x4000`     | MSI-X table: one vector per queue, plus configuration  |
//! | `0x5000`     | MSI-X pending bit array                                |
//!
//! plus the `VIRTIO_PCI_CAP_PCI_CFG` window (4.1.4.9) for drivers that reach BAR 0 through
//! configuration space. Status, features, queues, activation and reset are the
//! [`TransportCore`]'s; this module decodes BAR 0 and configuration space:
//!
//! - `layout`: the function's identity, BAR 0's regions and the capability list;
//! - `common`: the common configuration structure;
//! - `interrupts`: MSI-X vectors, the ISR and INTx. Interrupts go out as MSI-X messages
//!   through the VMM's [`MsiInterruptController`] once the guest enables MSI-X, and as INTx (an
//!   ISR bit plus an `EventFd` the VMM registers as an irqfd) before that.
//!
//! Guest accesses never fail: a wrong-sized or misaligned access reads all-ones and writes
//! nothing, with a rate-limited log, and a device that cannot start is put in
//! DEVICE_NEEDS_RESET (2.1.2).

mod common;
#[cfg(any(test, feature = "fuzzing"))]
mod fuzz;
mod interrupts;
mod layout;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::transport::{CoreError, TransportCore};
use super::VirtioDevice;
use bus::guest_log;
use pci::{command, BarMove, MsiInterruptController, Msix, PciBarRange, PciDevice, PciError};

#[cfg(any(test, feature = "fuzzing"))]
pub use fuzz::{fuzz_pci_config, fuzz_virtio_pci};
use interrupts::{Interrupts, Vectors};
pub use interrupts::{IntxLine, IntxResampler};
use layout::{
    check_device, header, Layout, Region, CAP_BAR, CAP_LENGTH, CAP_OFFSET, CAP_PCI_CFG_DATA,
};
pub use layout::{
    BAR_INDEX, BAR_SIZE, COMMON_CFG_LEN, COMMON_CFG_OFFSET, DEVICE_CFG_LEN, DEVICE_CFG_OFFSET,
    ISR_CFG_OFFSET, MAX_QUEUES, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, NOTIFY_CFG_OFFSET,
    NOTIFY_OFF_MULTIPLIER, NO_VECTOR, VIRTIO_PCI_DEVICE_ID_BASE, VIRTIO_PCI_VENDOR_ID,
};

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// The device asks for more queues than one MSI-X table (a vector per queue plus one for
    /// configuration changes) and the notification region hold.
    #[error("the device has {0} queues, more than the transport's 255")]
    TooManyQueues(usize),
    /// A queue's maximum size is not a power of two of at most 32768 (section 2.7).
    #[error("queue {index} has maximum size {size}, not a power of two in 1..=32768")]
    InvalidQueueSize {
        /// The queue.
        index: usize,
        /// The size the device gave.
        size: u16,
    },
    /// The device type has no modern PCI device ID: 0x1040 + type must stay within 0x107f
    /// (section 4.1.2).
    #[error("virtio device type {0} has no modern PCI device ID")]
    InvalidDeviceType(u32),
    /// A queue's notification eventfd could not be created.
    #[error("cannot create a queue notification eventfd")]
    EventFd(#[source] io::Error),
    /// The configuration space refused a BAR or capability (a bug in the layout, not the
    /// guest's doing).
    #[error("cannot lay out the PCI function")]
    Pci(#[from] PciError),
}

impl From<CoreError> for VirtioPciError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::QueueSize { index, size } => Self::InvalidQueueSize { index, size },
            CoreError::EventFd(e) => Self::EventFd(e),
        }
    }
}

/// A virtio device behind a PCI function.
pub struct VirtioPciTransport {
    config: pci::PciConfigSpace,
    core: TransportCore,
    interrupts: Arc<Interrupts>,
    /// Offset of the MSI-X capability, if the function has one.
    msix_cap: Option<usize>,
    /// Offset of the `VIRTIO_PCI_CAP_PCI_CFG` capability.
    pci_cfg_cap: usize,
}

/// MSI-X vectors of a function whose device has `num_queues` queues: one per queue and one for
/// configuration changes.
pub fn msix_vectors(num_queues: u16) -> u16 {
    num_queues.saturating_add(1)
}

impl VirtioPciTransport {
    /// Puts `device` behind a PCI function. With `msi`, the function has an MSI-X capability
    /// with one vector per queue plus one; with `intx`, it has INTA#. A function with neither
    /// never interrupts its driver.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        msi: Option<Arc<dyn MsiInterruptController>>,
        intx: Option<IntxLine>,
    ) -> Result<Self, VirtioPciError> {
        let (kind, device_id, num_queues) = {
            let d = super::transport::lock(&device);
            let (device_id, max_sizes) = check_device(&*d)?;
            (d.device_type(), device_id, max_sizes.len() as u16)
        };
        let msix = msi
            .map(|controller| Msix::new(msix_vectors(num_queues), controller))
            .transpose()?;
        let header = header(kind, device_id, intx.as_ref());
        let layout = Layout::new(&header, num_queues, msix.as_ref())?;
        let interrupts = Arc::new(Interrupts {
            isr: AtomicU8::new(0),
            config_generation: AtomicU8::new(0),
            intx: intx.map(|line| line.evt),
            intx_disabled: AtomicBool::new(false),
            vectors: Mutex::new(Vectors {
                msix,
                config: NO_VECTOR,
                queues: vec![NO_VECTOR; usize::from(num_queues)],
            }),
        });
        let core = TransportCore::new("virtio-pci", device, mem, interrupts.clone())?;
        Ok(Self {
            config: layout.config,
            core,
            interrupts,
            msix_cap: layout.msix_cap,
            pci_cfg_cap: layout.pci_cfg_cap,
        })
    }

    /// Each queue's notification address (at BAR 0's current address) and the eventfd the
    /// VMM should register there as an ioeventfd (any length, no datamatch). Without it, a
    /// notification still reaches the eventfd through an MMIO exit.
    pub fn ioeventfds(&self) -> Vec<(u64, &EventFd)> {
        let base = self.config.bar_address(usize::from(BAR_INDEX)).unwrap_or(0) + NOTIFY_CFG_OFFSET;
        self.core
            .notify_events()
            .iter()
            .enumerate()
            .map(|(i, evt)| (base + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER), evt))
            .collect()
    }

    /// The device status register.
    pub fn device_status(&self) -> u8 {
        self.core.status()
    }

    /// The subscriber that keeps INTx level-triggered (see [`IntxResampler`]), for a function
    /// with an INTx line whose irqfd the VMM registered with `resample` as its resample eventfd.
    pub fn intx_resampler(&self, resample: EventFd) -> Option<IntxResampler> {
        self.interrupts.intx.as_ref()?;
        Some(IntxResampler::new(self.interrupts.clone(), resample))
    }

    /// Whether the device has been started with its queues.
    pub fn is_activated(&self) -> bool {
        self.core.is_activated()
    }

    /// The device behind the transport, as shared with the event loop.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        self.core.shared_device()
    }

    /// A BAR 0 read, also reached through the `VIRTIO_PCI_CAP_PCI_CFG` window.
    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        match Region::of(offset, data.len()) {
            Some(Region::Common(at)) => self.read_common(at, data),
            Some(Region::Isr(0)) if data.len() == 1 => {
                // Reading clears it (4.1.4.5.1).
                data[0] = self.interrupts.isr.swap(0, Ordering::SeqCst);
            }
            Some(Region::Device(at)) => self.core.device().read_config(at, data),
            // Notifications are write-only.
            Some(Region::Notify(_)) => data.fill(0),
            Some(Region::MsixTable(at)) => match self.interrupts.vectors().msix.as_mut() {
                Some(msix) => msix.read_table(at, data),
                None => data.fill(0xff),
            },
            Some(Region::MsixPba(at)) => match self.interrupts.vectors().msix.as_mut() {
                Some(msix) => msix.read_pba(at, data),
                None => data.fill(0xff),
            },
            _ => {
                self.log_bad_access("read", offset, data.len());
                data.fill(0xff);
            }
        }
    }

    /// A BAR 0 write, also reached through the `VIRTIO_PCI_CAP_PCI_CFG` window.
    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match Region::of(offset, data.len()) {
            Some(Region::Common(at)) => self.write_common(at, data),
            Some(Region::Device(at)) => self.core.device().write_config(at, data),
            Some(Region::Notify(at)) => self.notify(at, data.len()),
            Some(Region::MsixTable(at)) => {
                if let Some(msix) = self.interrupts.vectors().msix.as_mut() {
                    msix.write_table(at, data);
                }
            }
            // The ISR and the PBA are read-only.
            _ => self.log_bad_access("write", offset, data.len()),
        }
    }

    /// A driver notification without an ioeventfd: forward it to the queue's eventfd.
    fn notify(&mut self, at: u64, len: usize) {
        let aligned = at.is_multiple_of(u64::from(NOTIFY_OFF_MULTIPLIER)) && matches!(len, 2 | 4);
        if !aligned
            || !self
                .core
                .notify_queue(at / u64::from(NOTIFY_OFF_MULTIPLIER))
        {
            self.log_bad_access("notification", NOTIFY_CFG_OFFSET + at, len);
        }
    }

    /// A driver write of device_status: the core's state machine, then, on reset, the
    /// transport's own registers (4.1.4.3.2): vectors and the ISR; MSI-X itself belongs to the
    /// PCI function.
    fn set_status(&mut self, value: u8) {
        if self.core.write_status(value) {
            let mut vectors = self.interrupts.vectors();
            vectors.config = NO_VECTOR;
            vectors.queues.fill(NO_VECTOR);
            drop(vectors);
            self.interrupts.isr.store(0, Ordering::SeqCst);
        }
    }

    /// A read of `pci_cfg_data`: the access the `VIRTIO_PCI_CAP_PCI_CFG` fields describe.
    fn pci_cfg_read(&mut self) -> u32 {
        let mut data = [0u8; 4];
        if let Some(len) = self.pci_cfg_access() {
            let offset = self.pci_cfg_field(CAP_OFFSET);
            self.bar_read(u64::from(offset), &mut data[..len]);
        }
        u32::from_le_bytes(data)
    }

    /// A write of `pci_cfg_data`: must cover the whole access the capability describes.
    fn pci_cfg_write(&mut self, byte: u64, data: &[u8]) {
        match self.pci_cfg_access() {
            Some(len) if byte == 0 && data.len() >= len => {
                let offset = self.pci_cfg_field(CAP_OFFSET);
                self.bar_write(u64::from(offset), &data[..len]);
            }
            _ => self.log_bad_access("pci_cfg_data write", byte, data.len()),
        }
    }

    /// The length of the access the `VIRTIO_PCI_CAP_PCI_CFG` fields describe, if valid: BAR
    /// 0, length 1, 2 or 4, offset aligned to it (4.1.4.9.1).
    fn pci_cfg_access(&mut self) -> Option<usize> {
        let mut bar = [0u8];
        self.config.read_bytes(self.pci_cfg_cap + CAP_BAR, &mut bar);
        let offset = self.pci_cfg_field(CAP_OFFSET);
        let len = self.pci_cfg_field(CAP_LENGTH);
        if bar[0] == BAR_INDEX && matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len) {
            Some(len as usize)
        } else {
            self.log_bad_access("pci_cfg access", u64::from(offset), len as usize);
            None
        }
    }

    fn pci_cfg_field(&self, field: usize) -> u32 {
        let mut bytes = [0u8; 4];
        self.config.read_bytes(self.pci_cfg_cap + field, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    fn log_bad_access(&self, what: &str, offset: u64, len: usize) {
        guest_log!("virtio-pci: ignoring a {len}-byte {what} at {offset:#x}");
    }
}

impl PciDevice for VirtioPciTransport {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        if reg.checked_mul(4) == Some(self.pci_cfg_cap + CAP_PCI_CFG_DATA) {
            return self.pci_cfg_read();
        }
        let mut value = self.config.read_reg(reg);
        // Status bit 3 reflects a pending INTx (section 6.2.3).
        if reg == 1 && self.interrupts.intx_pending() {
            value |= u32::from(pci::status::INTERRUPT) << 16;
        }
        value
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
        if reg.checked_mul(4) == Some(self.pci_cfg_cap + CAP_PCI_CFG_DATA) {
            self.pci_cfg_write(offset, data);
            return None;
        }
        let moved = self.config.write(reg, offset, data);
        if reg == 1 {
            let disabled = self.config.command() & command::INTX_DISABLE != 0;
            let was_disabled = self
                .interrupts
                .intx_disabled
                .swap(disabled, Ordering::SeqCst);
            // A pending interrupt the driver let through again is raised now (PCI 3.0 6.2.2).
            if was_disabled && !disabled {
                if let Err(e) = self.interrupts.reassert_intx() {
                    guest_log!("virtio-pci: cannot raise INTx: {e}");
                }
            }
        }
        if let Some(cap) = self.msix_cap.filter(|&cap| reg == cap / 4) {
            let mut control = [0u8; 2];
            self.config.read_bytes(cap + 2, &mut control);
            if let Some(msix) = self.interrupts.vectors().msix.as_mut() {
                msix.set_control(u16::from_le_bytes(control));
            }
        }
        moved
    }

    fn bars(&self) -> Vec<PciBarRange> {
        self.config.bars()
    }

    fn set_bar_address(&mut self, index: u8, addr: u64) -> Result<(), PciError> {
        self.config.set_bar_address(usize::from(index), addr)
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar != BAR_INDEX || self.config.command() & command::MEMORY_SPACE == 0 {
            self.log_bad_access("read with memory decode off", offset, data.len());
            data.fill(0xff);
            return;
        }
        self.bar_read(offset, data);
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != BAR_INDEX || self.config.command() & command::MEMORY_SPACE == 0 {
            self.log_bad_access("write with memory decode off", offset, data.len());
            return;
        }
        self.bar_write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::common::offsets as common;
    use super::interrupts::ISR_CONFIG;
    use super::layout::{CAP_COMMON_CFG, CAP_DEVICE_CFG, CAP_ISR_CFG, CAP_NOTIFY_CFG, CAP_PCI_CFG};
    use super::*;
    use crate::{device_type, status, ActivateError, ActiveQueue, InterruptKind, VirtioInterrupt};
    use bus::BusDevice;
    use pci::testing::RecordingMsiController;
    use pci::{PciRootBus, MSIX_CAPABILITY_ID};
    use virtio_bindings::virtio_config::{
        VIRTIO_F_RING_PACKED, VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1,
    };
    use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    const NET_FEATURE_MAC: u64 = 1 << 5;
    const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX | NET_FEATURE_MAC;

    /// A queue at activation: (size, desc, avail, used, event_idx).
    type SeenQueue = (u16, u64, u64, u64, bool);

    /// What the fake device saw.
    #[derive(Default)]
    struct Record {
        acked: Option<u64>,
        /// Per activation, each queue as the device saw it.
        activations: Vec<Vec<SeenQueue>>,
        notifiers: Vec<EventFd>,
        resets: u32,
        interrupt: Option<Arc<dyn VirtioInterrupt>>,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    struct FakeDevice {
        record: Arc<Mutex<Record>>,
        fail_activate: bool,
        can_reset: bool,
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            device_type::NET
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![256, 128]
        }
        fn features(&self) -> u64 {
            // Plus packed rings and queue reset, which the transport hides.
            FEATURES | 1 << VIRTIO_F_RING_PACKED | 1 << VIRTIO_F_RING_RESET
        }
        fn ack_features(&mut self, features: u64) {
            self.record.lock().unwrap().acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = 0x50 + offset as u8 + i as u8;
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.record
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            interrupt: Arc<dyn VirtioInterrupt>,
            queues: Vec<ActiveQueue>,
        ) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::Backend("no tap".to_string()));
            }
            let mut record = self.record.lock().unwrap();
            // The enabled queues; every queue's eventfd.
            let seen = queues
                .iter()
                .filter(|q| q.queue.ready())
                .map(|q| {
                    let queue = &q.queue;
                    (
                        queue.size(),
                        queue.desc_table(),
                        queue.avail_ring(),
                        queue.used_ring(),
                        queue.event_idx_enabled(),
                    )
                })
                .collect();
            record.activations.push(seen);
            record.notifiers = queues.into_iter().map(|q| q.notify).collect();
            record.interrupt = Some(interrupt);
            Ok(())
        }
        fn reset(&mut self) -> bool {
            let mut record = self.record.lock().unwrap();
            record.resets += 1;
            record.interrupt = None;
            self.can_reset
        }
    }

    struct Harness {
        t: VirtioPciTransport,
        record: Arc<Mutex<Record>>,
        msi: Arc<RecordingMsiController>,
        intx: EventFd,
    }

    fn harness_with(fail_activate: bool, can_reset: bool, msi: bool) -> Harness {
        let record = Arc::new(Mutex::new(Record::default()));
        let device = FakeDevice {
            record: record.clone(),
            fail_activate,
            can_reset,
        };
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let controller = Arc::new(RecordingMsiController::default());
        let intx = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = VirtioPciTransport::new(
            Arc::new(Mutex::new(device)),
            mem,
            msi.then(|| controller.clone() as Arc<dyn MsiInterruptController>),
            Some(IntxLine {
                irq: 10,
                evt: intx.try_clone().unwrap(),
            }),
        )
        .unwrap();
        t.set_bar_address(0, 0xc000_8000).unwrap();
        // Memory decode on, as the guest's PCI core does before the driver runs.
        t.write_config_register(1, 0, &[0x02, 0x00]);
        Harness {
            t,
            record,
            msi: controller,
            intx,
        }
    }

    fn harness() -> Harness {
        harness_with(false, true, true)
    }

    fn write(t: &mut VirtioPciTransport, offset: u64, value: u64, len: usize) {
        t.write_bar(0, offset, &value.to_le_bytes()[..len]);
    }

    fn read(t: &mut VirtioPciTransport, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        t.read_bar(0, offset, &mut data[..len]);
        u64::from_le_bytes(data)
    }

    fn set_status(t: &mut VirtioPciTransport, status: u8) {
        write(t, common::DEVICE_STATUS, u64::from(status), 1);
    }

    fn status(t: &mut VirtioPciTransport) -> u8 {
        read(t, common::DEVICE_STATUS, 1) as u8
    }

    /// Writes the driver features page by page, as Linux does.
    fn write_features(t: &mut VirtioPciTransport, features: u64) {
        write(t, common::DRIVER_FEATURE_SELECT, 0, 4);
        write(t, common::DRIVER_FEATURE, features & 0xffff_ffff, 4);
        write(t, common::DRIVER_FEATURE_SELECT, 1, 4);
        write(t, common::DRIVER_FEATURE, features >> 32, 4);
    }

    /// Programs and enables queue `index` at `base` (descriptors, then driver and device
    /// areas 4 KiB apart), with `size` entries, dword halves as Linux writes them.
    fn setup_queue(t: &mut VirtioPciTransport, index: u16, size: u16, base: u64) {
        write(t, common::QUEUE_SELECT, u64::from(index), 2);
        write(t, common::QUEUE_SIZE, u64::from(size), 2);
        for (field, addr) in [base, base + 0x1000, base + 0x2000].into_iter().enumerate() {
            let at = common::QUEUE_ADDRESSES + 8 * field as u64;
            write(t, at, addr & 0xffff_ffff, 4);
            write(t, at + 4, addr >> 32, 4);
        }
        write(t, common::QUEUE_ENABLE, 1, 2);
    }

    /// The driver initialization of section 3.1.1 up to FEATURES_OK.
    fn negotiate(t: &mut VirtioPciTransport) {
        set_status(t, status::ACKNOWLEDGE);
        set_status(t, status::ACKNOWLEDGE | status::DRIVER);
        write_features(t, FEATURES);
        set_status(
            t,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn bring_up(t: &mut VirtioPciTransport) {
        negotiate(t);
        setup_queue(t, 0, 256, 0x1_0000);
        setup_queue(t, 1, 64, 0x2_0000);
        set_status(t, 0xf);
    }

    /// Walks the capability list: (offset, ID, bytes of the capability).
    fn capabilities(t: &mut VirtioPciTransport) -> Vec<(usize, u8, Vec<u8>)> {
        let mut space = Vec::new();
        for reg in 0..64 {
            space.extend(t.read_config_register(reg).to_le_bytes());
        }
        let mut caps = Vec::new();
        let mut at = usize::from(space[0x34]);
        while at != 0 {
            caps.push((at, space[at], space[at..(at + 24).min(256)].to_vec()));
            at = usize::from(space[at + 1]);
            assert!(caps.len() < 48, "capability loop");
        }
        caps
    }

    fn le32(bytes: &[u8]) -> u32 {
        u32::from_le_bytes(bytes[..4].try_into().unwrap())
    }

    #[test]
    fn config_space_identifies_a_modern_virtio_net_function() {
        let mut h = harness();
        // Device 0x1041 = 0x1040 + net (1), vendor 0x1af4.
        assert_eq!(h.t.read_config_register(0), 0x1041_1af4);
        // Status: capabilities list; command: memory space.
        assert_eq!(h.t.read_config_register(1), 0x0010_0002);
        // Class 02 (network) 00, prog-if 00, revision 1.
        assert_eq!(h.t.read_config_register(2), 0x0200_0001);
        assert_eq!(h.t.read_config_register(3), 0);
        // BAR0: 32-bit non-prefetchable memory at its address.
        assert_eq!(h.t.read_config_register(4), 0xc000_8000);
        assert_eq!(h.t.read_config_register(11), 0x1041_1af4);
        // INTA#, line 10.
        assert_eq!(h.t.read_config_register(15), 0x0000_010a);
    }

    #[test]
    fn capability_chain_describes_every_structure() {
        let mut h = harness();
        let caps = capabilities(&mut h.t);
        let vendor: Vec<_> = caps.iter().filter(|c| c.1 == 0x09).collect();
        // (cfg_type, bar, offset, length, cap_len) for each virtio capability, in order.
        let seen: Vec<_> = vendor
            .iter()
            .map(|(_, _, b)| (b[3], b[4], le32(&b[8..]), le32(&b[12..]), b[2]))
            .collect();
        assert_eq!(
            seen,
            [
                (CAP_COMMON_CFG, 0, 0x0000, 0x38, 16),
                (CAP_ISR_CFG, 0, 0x1000, 1, 16),
                (CAP_DEVICE_CFG, 0, 0x2000, 0x1000, 16),
                (CAP_NOTIFY_CFG, 0, 0x3000, 8, 20),
                (CAP_PCI_CFG, 0, 0, 0, 20),
            ]
        );
        let notify = &vendor[3].2;
        assert_eq!(le32(&notify[16..]), 4, "notify_off_multiplier");

        let (_, id, msix) = caps.last().unwrap();
        assert_eq!(*id, MSIX_CAPABILITY_ID);
        // Table size 3 (encoded 2), disabled; table at BAR0 0x4000, PBA at BAR0 0x5000.
        assert_eq!(u16::from_le_bytes([msix[2], msix[3]]), 2);
        assert_eq!(le32(&msix[4..]), 0x4000);
        assert_eq!(le32(&msix[8..]), 0x5000);
        // Dword-aligned, inside the device-specific area.
        assert!(caps.iter().all(|(at, _, _)| at % 4 == 0 && *at >= 0x40));
    }

    #[test]
    fn without_msi_there_is_no_msix_capability() {
        let mut h = harness_with(false, true, false);
        let caps = capabilities(&mut h.t);
        assert_eq!(caps.len(), 5);
        assert!(caps.iter().all(|c| c.1 == 0x09));
        // Vectors cannot be assigned.
        write(&mut h.t, common::CONFIG_MSIX_VECTOR, 0, 2);
        assert_eq!(read(&mut h.t, common::CONFIG_MSIX_VECTOR, 2), 0xffff);
        // MSI-X regions are unclaimed.
        assert_eq!(read(&mut h.t, MSIX_TABLE_OFFSET, 4), 0xffff_ffff);
    }

    #[test]
    fn bar0_sizing_reads_the_size_and_restores() {
        let mut h = harness();
        assert_eq!(h.t.write_config_register(4, 0, &[0xff; 4]), None);
        assert_eq!(h.t.read_config_register(4), 0xffff_8000);
        assert_eq!(
            h.t.write_config_register(4, 0, &0xc000_8000u32.to_le_bytes()),
            None
        );
        assert_eq!(h.t.read_config_register(4), 0xc000_8000);
        let moved =
            h.t.write_config_register(4, 0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(
            moved,
            Some(BarMove {
                bar: 0,
                old: 0xc000_8000,
                new: 0xd000_0000,
                size: BAR_SIZE
            })
        );
        assert_eq!(h.t.ioeventfds()[1].0, 0xd000_3004);
    }

    #[test]
    fn common_config_reads_decode_each_field() {
        let mut h = harness();
        let t = &mut h.t;
        assert_eq!(
            read(t, common::DEVICE_FEATURE, 4),
            NET_FEATURE_MAC | 1 << 29
        );
        write(t, common::DEVICE_FEATURE_SELECT, 1, 4);
        assert_eq!(read(t, common::DEVICE_FEATURE_SELECT, 4), 1);
        assert_eq!(read(t, common::DEVICE_FEATURE, 4), 1);
        write(t, common::DEVICE_FEATURE_SELECT, 2, 4);
        assert_eq!(read(t, common::DEVICE_FEATURE, 4), 0);
        assert_eq!(read(t, common::NUM_QUEUES, 2), 2);
        assert_eq!(read(t, common::CONFIG_MSIX_VECTOR, 2), 0xffff);
        assert_eq!(read(t, common::DEVICE_STATUS, 1), 0);
        assert_eq!(read(t, common::CONFIG_GENERATION, 1), 0);

        write(t, common::QUEUE_SELECT, 1, 2);
        assert_eq!(read(t, common::QUEUE_SELECT, 2), 1);
        assert_eq!(read(t, common::QUEUE_SIZE, 2), 128);
        assert_eq!(read(t, common::QUEUE_MSIX_VECTOR, 2), 0xffff);
        assert_eq!(read(t, common::QUEUE_ENABLE, 2), 0);
        assert_eq!(read(t, common::QUEUE_NOTIFY_OFF, 2), 1);

        // A queue that does not exist reads size 0.
        write(t, common::QUEUE_SELECT, 2, 2);
        assert_eq!(read(t, common::QUEUE_SIZE, 2), 0);
        assert_eq!(read(t, common::QUEUE_NOTIFY_OFF, 2), 0);
    }

    #[test]
    fn queue_addresses_read_back_by_half_and_whole() {
        let mut h = harness();
        let t = &mut h.t;
        write(t, common::QUEUE_SELECT, 0, 2);
        write(t, 0x20, 0x1234_5000, 4);
        write(t, 0x24, 0x1, 4);
        write(t, 0x28, 0x0000_0002_0000_0000, 8);
        write(t, 0x30, 0xabcd_0000, 4);
        assert_eq!(read(t, 0x20, 8), 0x1_1234_5000);
        assert_eq!(read(t, 0x24, 4), 1);
        assert_eq!(read(t, 0x28, 4), 0);
        assert_eq!(read(t, 0x2c, 4), 2);
        assert_eq!(read(t, 0x30, 8), 0xabcd_0000);
        // Replacing one half keeps the other.
        write(t, 0x20, 0x6000, 4);
        assert_eq!(read(t, 0x20, 8), 0x1_0000_6000);
    }

    #[test]
    fn wrong_sized_and_misaligned_accesses_read_all_ones_and_write_nothing() {
        let mut h = harness();
        let t = &mut h.t;
        assert_eq!(read(t, common::NUM_QUEUES, 4), 0xffff_ffff);
        assert_eq!(read(t, common::DEVICE_STATUS, 2), 0xffff);
        assert_eq!(read(t, common::DEVICE_FEATURE, 2), 0xffff);
        assert_eq!(read(t, 0x22, 4), 0xffff_ffff);
        assert_eq!(read(t, 0x24, 8), u64::MAX);
        assert_eq!(read(t, 0x38, 2), 0xffff);
        assert_eq!(read(t, ISR_CFG_OFFSET, 4), 0xffff_ffff);
        assert_eq!(read(t, ISR_CFG_OFFSET + 1, 1), 0xff);
        // Unused space in the BAR and accesses straddling two regions.
        assert_eq!(read(t, 0x6000, 4), 0xffff_ffff);
        assert_eq!(read(t, 0x0ffe, 4), 0xffff_ffff);
        assert_eq!(read(t, u64::MAX - 1, 2), 0xffff);

        write(t, common::QUEUE_SELECT, 1, 4);
        write(t, common::DEVICE_STATUS, 1, 2);
        write(t, 0x22, 0x5000, 4);
        assert_eq!(read(t, common::QUEUE_SELECT, 2), 0);
        assert_eq!(read(t, common::DEVICE_STATUS, 1), 0);
        assert_eq!(read(t, 0x20, 8), 0);
    }

    #[test]
    fn status_follows_the_initialization_order() {
        let mut h = harness();
        let t = &mut h.t;
        // DRIVER before ACKNOWLEDGE, and FEATURES_OK early, are ignored.
        set_status(t, status::DRIVER);
        assert_eq!(status(t), 0);
        set_status(t, status::ACKNOWLEDGE);
        set_status(t, status::ACKNOWLEDGE | status::FEATURES_OK);
        assert_eq!(status(t), status::ACKNOWLEDGE);
        set_status(t, status::ACKNOWLEDGE | status::DRIVER);
        assert_eq!(status(t), 3);
        // Clearing a bit other than by reset is ignored.
        set_status(t, status::ACKNOWLEDGE);
        assert_eq!(status(t), 3);
        // FAILED sticks and stops progress.
        set_status(t, 3 | status::FAILED);
        assert_eq!(status(t), 0x83);
        write_features(t, FEATURES);
        set_status(t, 0xb);
        assert_eq!(status(t), 0x83);
        assert_eq!(h.record.lock().unwrap().acked, None);
    }

    #[test]
    fn several_stages_in_one_write_are_taken_in_order() {
        let mut h = harness();
        write_features(&mut h.t, FEATURES);
        set_status(&mut h.t, 0xb);
        assert_eq!(status(&mut h.t), 0xb);
        assert_eq!(h.record.lock().unwrap().acked, Some(FEATURES));
    }

    #[test]
    fn features_ok_requires_offered_features_and_version_1() {
        let mut h = harness();
        let t = &mut h.t;
        set_status(t, 1);
        set_status(t, 3);
        // Bit 6 is not offered; queue reset is offered by the device but hidden.
        write_features(t, FEATURES | 1 << 6);
        set_status(t, 0xb);
        assert_eq!(status(t), 3);
        write_features(t, FEATURES | 1 << VIRTIO_F_RING_RESET);
        set_status(t, 0xb);
        assert_eq!(status(t), 3);
        // No VERSION_1: a legacy driver.
        write_features(t, NET_FEATURE_MAC);
        set_status(t, 0xb);
        assert_eq!(status(t), 3);
        assert_eq!(h.record.lock().unwrap().acked, None);

        write_features(t, 1 << VIRTIO_F_VERSION_1);
        set_status(t, 0xb);
        assert_eq!(status(t), 0xb);
        assert_eq!(
            h.record.lock().unwrap().acked,
            Some(1 << VIRTIO_F_VERSION_1)
        );
        write(t, common::DRIVER_FEATURE_SELECT, 1, 4);
        assert_eq!(read(t, common::DRIVER_FEATURE, 4), 1);
        // Fixed after FEATURES_OK.
        write(t, common::DRIVER_FEATURE, 0, 4);
        assert_eq!(read(t, common::DRIVER_FEATURE, 4), 1);
    }

    #[test]
    fn driver_ok_activates_with_the_programmed_queues() {
        let mut h = harness();
        bring_up(&mut h.t);
        assert_eq!(status(&mut h.t), 0xf);
        assert!(h.t.is_activated());
        let record = h.record.lock().unwrap();
        assert_eq!(
            record.activations,
            [vec![
                (256, 0x1_0000, 0x1_1000, 0x1_2000, true),
                (64, 0x2_0000, 0x2_1000, 0x2_2000, true),
            ]]
        );
        assert!(record.interrupt.is_some());
    }

    #[test]
    fn queues_cannot_change_once_enabled_or_running() {
        let mut h = harness();
        negotiate(&mut h.t);
        setup_queue(&mut h.t, 0, 256, 0x1_0000);
        write(&mut h.t, common::QUEUE_SIZE, 16, 2);
        write(&mut h.t, 0x20, 0x8000, 4);
        // Disabling is not allowed either.
        write(&mut h.t, common::QUEUE_ENABLE, 0, 2);
        assert_eq!(read(&mut h.t, common::QUEUE_SIZE, 2), 256);
        assert_eq!(read(&mut h.t, 0x20, 8), 0x1_0000);
        assert_eq!(read(&mut h.t, common::QUEUE_ENABLE, 2), 1);

        set_status(&mut h.t, 0xf);
        write(&mut h.t, common::QUEUE_SELECT, 1, 2);
        write(&mut h.t, common::QUEUE_SIZE, 16, 2);
        assert_eq!(read(&mut h.t, common::QUEUE_SIZE, 2), 128);
        // Only queue 0 was enabled: the device gets one queue.
        assert_eq!(h.record.lock().unwrap().activations[0].len(), 1);
    }

    #[test]
    fn a_queue_past_a_gap_is_passed_at_its_index() {
        let mut h = harness();
        negotiate(&mut h.t);
        setup_queue(&mut h.t, 1, 128, 0x2_0000);
        set_status(&mut h.t, 0xf);
        assert!(h.t.is_activated());
        let record = h.record.lock().unwrap();
        assert_eq!(
            record.activations,
            [vec![(128, 0x2_0000, 0x2_1000, 0x2_2000, true)]]
        );
        assert_eq!(record.notifiers.len(), 2);
    }

    #[test]
    fn bad_queue_puts_the_device_in_needs_reset() {
        let mut h = harness();
        negotiate(&mut h.t);
        // Past the end of the 1 MiB of guest memory.
        setup_queue(&mut h.t, 0, 256, 0xf_f000);
        set_status(&mut h.t, 0xf);
        assert!(!h.t.is_activated());
        assert_eq!(status(&mut h.t), 0xf | status::DEVICE_NEEDS_RESET);
        // The driver hears of it through a configuration interrupt (INTx: MSI-X is off).
        assert_eq!(read(&mut h.t, ISR_CFG_OFFSET, 1), u64::from(ISR_CONFIG));

        let mut h = harness();
        negotiate(&mut h.t);
        // A size that is not a power of two.
        setup_queue(&mut h.t, 0, 100, 0x1_0000);
        set_status(&mut h.t, 0xf);
        assert_eq!(status(&mut h.t), 0xf | status::DEVICE_NEEDS_RESET);
        assert!(h.record.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn failed_activation_puts_the_device_in_needs_reset() {
        let mut h = harness_with(true, true, true);
        bring_up(&mut h.t);
        assert!(!h.t.is_activated());
        assert_eq!(status(&mut h.t), 0x4f);
        // Later status writes do not retry; a reset does.
        set_status(&mut h.t, 0xf);
        assert_eq!(status(&mut h.t), 0x4f);
        set_status(&mut h.t, 0);
        assert_eq!(status(&mut h.t), 0);
    }

    #[test]
    fn reset_returns_every_register_to_its_initial_value() {
        let mut h = harness();
        enable_msix(&mut h.t);
        write(&mut h.t, common::CONFIG_MSIX_VECTOR, 2, 2);
        bring_up(&mut h.t);
        write(&mut h.t, common::QUEUE_MSIX_VECTOR, 1, 2);
        set_status(&mut h.t, 0);

        let t = &mut h.t;
        assert!(!t.is_activated());
        assert_eq!(status(t), 0);
        assert_eq!(read(t, common::QUEUE_SELECT, 2), 0);
        assert_eq!(read(t, common::CONFIG_MSIX_VECTOR, 2), 0xffff);
        write(t, common::DRIVER_FEATURE_SELECT, 0, 4);
        assert_eq!(read(t, common::DRIVER_FEATURE, 4), 0);
        for q in 0..2 {
            write(t, common::QUEUE_SELECT, q, 2);
            assert_eq!(read(t, common::QUEUE_ENABLE, 2), 0);
            assert_eq!(read(t, common::QUEUE_MSIX_VECTOR, 2), 0xffff);
            assert_eq!(read(t, 0x20, 8), 0);
            assert_eq!(read(t, 0x28, 8), 0);
            assert_eq!(read(t, 0x30, 8), 0);
        }
        write(t, common::QUEUE_SELECT, 0, 2);
        assert_eq!(read(t, common::QUEUE_SIZE, 2), 256);
        let record = h.record.lock().unwrap();
        assert_eq!(record.resets, 1);
        assert!(record.interrupt.is_none());
        drop(record);

        // And the device comes up again.
        bring_up(&mut h.t);
        assert_eq!(h.record.lock().unwrap().activations.len(), 2);
    }

    #[test]
    fn a_broken_queue_reported_by_the_device_sends_the_config_vector() {
        let mut h = harness();
        enable_msix(&mut h.t);
        write(&mut h.t, common::CONFIG_MSIX_VECTOR, 0, 2);
        bring_up(&mut h.t);
        let interrupt = h.record.lock().unwrap().interrupt.clone().unwrap();
        interrupt.set_needs_reset().unwrap();
        assert_eq!(status(&mut h.t), 0xf | status::DEVICE_NEEDS_RESET);
        assert_eq!(*h.msi.triggered.lock().unwrap(), [0]);
        // The driver's reset recovers the device.
        set_status(&mut h.t, 0);
        assert_eq!(status(&mut h.t), 0);
        bring_up(&mut h.t);
        assert_eq!(status(&mut h.t), 0xf);
        assert_eq!(h.record.lock().unwrap().activations.len(), 2);
    }

    #[test]
    fn reset_of_a_device_that_cannot_reset_sets_needs_reset() {
        let mut h = harness_with(false, false, true);
        bring_up(&mut h.t);
        set_status(&mut h.t, 0);
        assert_eq!(status(&mut h.t), 0x4f);
        assert!(h.t.is_activated());
    }

    #[test]
    fn reset_of_a_fresh_device_does_not_call_the_device() {
        let mut h = harness();
        set_status(&mut h.t, 0);
        assert_eq!(h.record.lock().unwrap().resets, 0);
    }

    #[test]
    fn device_config_is_forwarded_with_its_offset() {
        let mut h = harness();
        assert_eq!(read(&mut h.t, DEVICE_CFG_OFFSET + 2, 2), 0x5352);
        write(&mut h.t, DEVICE_CFG_OFFSET + 6, 0x0102, 2);
        assert_eq!(
            h.record.lock().unwrap().config_writes,
            [(6, vec![0x02, 0x01])]
        );
    }

    #[test]
    fn notify_without_ioeventfd_signals_the_queue() {
        let mut h = harness();
        bring_up(&mut h.t);
        let ioevents: Vec<u64> = h.t.ioeventfds().iter().map(|(addr, _)| *addr).collect();
        assert_eq!(ioevents, [0xc000_b000, 0xc000_b004]);

        write(&mut h.t, NOTIFY_CFG_OFFSET + 4, 1, 2);
        let record = h.record.lock().unwrap();
        assert_eq!(record.notifiers[1].read().unwrap(), 1);
        assert!(
            record.notifiers[0].read().is_err(),
            "queue 0 was not notified"
        );
        drop(record);
        // Past the last queue, misaligned or byte-wide: ignored.
        write(&mut h.t, NOTIFY_CFG_OFFSET + 8, 2, 2);
        write(&mut h.t, NOTIFY_CFG_OFFSET + 2, 0, 2);
        write(&mut h.t, NOTIFY_CFG_OFFSET, 0, 1);
        let record = h.record.lock().unwrap();
        assert!(record.notifiers[0].read().is_err());
        assert!(record.notifiers[1].read().is_err());
    }

    #[test]
    fn hammering_bar_and_config_registers_logs_a_bounded_amount() {
        let mut h = harness();
        let bytes = bus::ratelimit::capture::logged_bytes(|| {
            for i in 0..100_000u64 {
                // Unclaimed BAR space, a misaligned notification, a read-only region, and a
                // FEATURES_OK retry with unoffered features.
                write(&mut h.t, 0x6000 + (i % 0x1000), i, 4);
                write(&mut h.t, NOTIFY_CFG_OFFSET + 2, 0, 2);
                write(&mut h.t, ISR_CFG_OFFSET, 0, 1);
                set_status(&mut h.t, 3);
                write_features(&mut h.t, FEATURES | 1 << 6);
                set_status(&mut h.t, 0xb);
            }
        });
        assert!(bytes < 8 * 1024, "{bytes} bytes logged");
        assert_eq!(status(&mut h.t), 3);
    }

    #[test]
    fn memory_decode_off_hides_the_bar() {
        let mut h = harness();
        h.t.write_config_register(1, 0, &[0, 0]);
        assert_eq!(read(&mut h.t, common::NUM_QUEUES, 2), 0xffff);
        write(&mut h.t, common::DEVICE_STATUS, 1, 1);
        h.t.write_config_register(1, 0, &[2, 0]);
        assert_eq!(read(&mut h.t, common::DEVICE_STATUS, 1), 0);
        // Other BARs do not exist.
        let mut data = [0u8; 2];
        h.t.read_bar(1, 0x12, &mut data);
        assert_eq!(data, [0xff, 0xff]);
    }

    #[test]
    fn intx_raises_the_line_and_the_isr_clears_on_read() {
        let mut h = harness();
        bring_up(&mut h.t);
        let interrupt = h.record.lock().unwrap().interrupt.clone().unwrap();

        interrupt.trigger(InterruptKind::Queue(0)).unwrap();
        assert_eq!(h.intx.read().unwrap(), 1);
        // Status bit 3: interrupt pending.
        assert_eq!(h.t.read_config_register(1) >> 16, 0x18);
        interrupt.trigger(InterruptKind::Config).unwrap();
        assert_eq!(read(&mut h.t, common::CONFIG_GENERATION, 1), 1);
        assert_eq!(read(&mut h.t, ISR_CFG_OFFSET, 1), 3);
        assert_eq!(read(&mut h.t, ISR_CFG_OFFSET, 1), 0);
        assert_eq!(h.t.read_config_register(1) >> 16, 0x10);

        // INTx disabled in the command register: the ISR still records it, the line stays.
        h.intx.read().unwrap();
        h.t.write_config_register(1, 1, &[0x04]);
        interrupt.trigger(InterruptKind::Queue(1)).unwrap();
        assert!(h.intx.read().is_err());
        assert_eq!(read(&mut h.t, ISR_CFG_OFFSET, 1), 1);
        assert!(h.msi.triggered.lock().unwrap().is_empty());
    }

    /// The EOI of a still-pending function raises INTx again; once the driver read the ISR it
    /// does not; re-enabling INTx in the command register raises a pending one.
    #[test]
    fn intx_is_raised_again_after_eoi_while_the_isr_is_set() {
        let mut h = harness();
        bring_up(&mut h.t);
        let interrupt = h.record.lock().unwrap().interrupt.clone().unwrap();
        let resample = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let resampler = h.t.intx_resampler(resample.try_clone().unwrap()).unwrap();

        interrupt.trigger(InterruptKind::Queue(0)).unwrap();
        assert_eq!(h.intx.read().unwrap(), 1);
        // The guest's EOI before it read the ISR (KVM signals the resample eventfd).
        resample.write(1).unwrap();
        resampler.resample().unwrap();
        assert_eq!(
            h.intx.read().unwrap(),
            1,
            "a pending function raises INTx again"
        );
        assert!(
            resample.read().is_err(),
            "the resampler consumed its eventfd"
        );

        assert_eq!(read(&mut h.t, ISR_CFG_OFFSET, 1), 1);
        resample.write(1).unwrap();
        resampler.resample().unwrap();
        assert!(h.intx.read().is_err(), "nothing pending after the ISR read");

        // INTx disabled while the device interrupts: nothing on the line, and the EOI of
        // another function's interrupt on a shared pin raises nothing either.
        h.t.write_config_register(1, 1, &[0x04]);
        interrupt.trigger(InterruptKind::Queue(0)).unwrap();
        resampler.resample().unwrap();
        assert!(h.intx.read().is_err());
        // Let through again: the pending interrupt goes out at once.
        h.t.write_config_register(1, 1, &[0x00]);
        assert_eq!(h.intx.read().unwrap(), 1);

        // A function without an INTx line has no resampler.
        let no_intx = VirtioPciTransport::new(
            Arc::new(Mutex::new(FakeDevice {
                record: Arc::default(),
                fail_activate: false,
                can_reset: true,
            })),
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap(),
            None,
            None,
        )
        .unwrap();
        assert!(no_intx
            .intx_resampler(EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .is_none());
    }

    /// Enables MSI-X through the capability and unmasks every vector, routing vector `n` to
    /// data `0x40 + n`.
    fn enable_msix(t: &mut VirtioPciTransport) {
        let cap = t.msix_cap.unwrap();
        t.write_config_register(cap / 4, 3, &[0x80]);
        for vector in 0..3u64 {
            write(t, MSIX_TABLE_OFFSET + 16 * vector, 0xfee0_0000, 4);
            write(t, MSIX_TABLE_OFFSET + 16 * vector + 8, 0x40 + vector, 4);
            write(t, MSIX_TABLE_OFFSET + 16 * vector + 12, 0, 4);
        }
    }

    #[test]
    fn msix_vectors_route_queue_and_config_interrupts() {
        let mut h = harness();
        enable_msix(&mut h.t);
        assert_eq!(
            h.msi.routes.lock().unwrap().last(),
            Some(&(2, 0xfee0_0000, 0x42, false))
        );
        // Vector 3 does not exist: the driver reads NO_VECTOR back.
        write(&mut h.t, common::CONFIG_MSIX_VECTOR, 3, 2);
        assert_eq!(read(&mut h.t, common::CONFIG_MSIX_VECTOR, 2), 0xffff);
        write(&mut h.t, common::CONFIG_MSIX_VECTOR, 0, 2);
        assert_eq!(read(&mut h.t, common::CONFIG_MSIX_VECTOR, 2), 0);
        negotiate(&mut h.t);
        setup_queue(&mut h.t, 0, 256, 0x1_0000);
        write(&mut h.t, common::QUEUE_MSIX_VECTOR, 1, 2);
        setup_queue(&mut h.t, 1, 64, 0x2_0000);
        write(&mut h.t, common::QUEUE_MSIX_VECTOR, 2, 2);
        assert_eq!(read(&mut h.t, common::QUEUE_MSIX_VECTOR, 2), 2);
        set_status(&mut h.t, 0xf);
        let interrupt = h.record.lock().unwrap().interrupt.clone().unwrap();

        interrupt.trigger(InterruptKind::Queue(1)).unwrap();
        interrupt.trigger(InterruptKind::Queue(0)).unwrap();
        interrupt.trigger(InterruptKind::Config).unwrap();
        assert_eq!(*h.msi.triggered.lock().unwrap(), [2, 1, 0]);
        // No INTx with MSI-X on; only the configuration bit reaches the ISR (4.1.4.5.1), and
        // the PCI status does not show an INTx.
        assert!(h.intx.read().is_err());
        assert_eq!(h.t.read_config_register(1) >> 16, 0x10);
        assert_eq!(read(&mut h.t, ISR_CFG_OFFSET, 1), u64::from(ISR_CONFIG));

        // A queue with NO_VECTOR does not interrupt at all.
        write(&mut h.t, common::QUEUE_SELECT, 0, 2);
        write(&mut h.t, common::QUEUE_MSIX_VECTOR, 0xffff, 2);
        interrupt.trigger(InterruptKind::Queue(0)).unwrap();
        assert_eq!(h.msi.triggered.lock().unwrap().len(), 3);
        assert!(h.intx.read().is_err());
    }

    #[test]
    fn masked_msix_vector_pends_until_unmasked() {
        let mut h = harness();
        enable_msix(&mut h.t);
        bring_up(&mut h.t);
        write(&mut h.t, common::QUEUE_SELECT, 1, 2);
        write(&mut h.t, common::QUEUE_MSIX_VECTOR, 2, 2);
        let interrupt = h.record.lock().unwrap().interrupt.clone().unwrap();

        write(&mut h.t, MSIX_TABLE_OFFSET + 0x2c, 1, 4);
        interrupt.trigger(InterruptKind::Queue(1)).unwrap();
        assert!(h.msi.triggered.lock().unwrap().is_empty());
        assert_eq!(read(&mut h.t, MSIX_PBA_OFFSET, 8), 0b100);

        write(&mut h.t, MSIX_TABLE_OFFSET + 0x2c, 0, 4);
        assert_eq!(*h.msi.triggered.lock().unwrap(), [2]);
        assert_eq!(read(&mut h.t, MSIX_PBA_OFFSET, 8), 0);
        // The PBA is read-only.
        write(&mut h.t, MSIX_PBA_OFFSET, 0xff, 8);
        assert_eq!(read(&mut h.t, MSIX_PBA_OFFSET, 8), 0);

        // Function mask through the capability holds it too.
        let cap = h.t.msix_cap.unwrap();
        h.t.write_config_register(cap / 4, 3, &[0xc0]);
        interrupt.trigger(InterruptKind::Queue(1)).unwrap();
        assert_eq!(h.msi.triggered.lock().unwrap().len(), 1);
        h.t.write_config_register(cap / 4, 3, &[0x80]);
        assert_eq!(*h.msi.triggered.lock().unwrap(), [2, 2]);
        // Only enable and function mask are writable in message control.
        assert_eq!(h.t.read_config_register(cap / 4) >> 16, 0x8002);
    }

    #[test]
    fn pci_cfg_window_reaches_bar0() {
        let mut h = harness();
        let cap = h.t.pci_cfg_cap;
        // bar 0, offset 0x12 (num_queues), length 2.
        h.t.write_config_register((cap + CAP_BAR) / 4, 0, &[0]);
        h.t.write_config_register((cap + CAP_OFFSET) / 4, 0, &0x12u32.to_le_bytes());
        h.t.write_config_register((cap + CAP_LENGTH) / 4, 0, &2u32.to_le_bytes());
        assert_eq!(h.t.read_config_register((cap + CAP_PCI_CFG_DATA) / 4), 2);

        // Write queue_select through the window.
        h.t.write_config_register((cap + CAP_OFFSET) / 4, 0, &0x16u32.to_le_bytes());
        h.t.write_config_register((cap + CAP_PCI_CFG_DATA) / 4, 0, &[1, 0]);
        assert_eq!(read(&mut h.t, common::QUEUE_SELECT, 2), 1);

        // Works with memory decode off, which is what it is for.
        h.t.write_config_register(1, 0, &[0, 0]);
        assert_eq!(h.t.read_config_register((cap + CAP_PCI_CFG_DATA) / 4), 1);

        // A misaligned offset or a bad length reads 0 and writes nothing.
        h.t.write_config_register((cap + CAP_OFFSET) / 4, 0, &0x17u32.to_le_bytes());
        assert_eq!(h.t.read_config_register((cap + CAP_PCI_CFG_DATA) / 4), 0);
        h.t.write_config_register((cap + CAP_OFFSET) / 4, 0, &0x16u32.to_le_bytes());
        h.t.write_config_register((cap + CAP_LENGTH) / 4, 0, &3u32.to_le_bytes());
        h.t.write_config_register((cap + CAP_PCI_CFG_DATA) / 4, 0, &[0, 0, 0, 0]);
        assert_eq!(h.t.read_config_register((cap + CAP_PCI_CFG_DATA) / 4), 0);
        h.t.write_config_register((cap + CAP_LENGTH) / 4, 0, &2u32.to_le_bytes());
        assert_eq!(h.t.read_config_register((cap + CAP_PCI_CFG_DATA) / 4), 1);
    }

    #[test]
    fn constructor_rejects_bad_devices() {
        struct Bad(u32, Vec<u16>);
        impl VirtioDevice for Bad {
            fn device_type(&self) -> u32 {
                self.0
            }
            fn queue_max_sizes(&self) -> Vec<u16> {
                self.1.to_vec()
            }
            fn features(&self) -> u64 {
                0
            }
            fn ack_features(&mut self, _: u64) {}
            fn read_config(&self, _: u64, _: &mut [u8]) {}
            fn write_config(&mut self, _: u64, _: &[u8]) {}
            fn activate(
                &mut self,
                _: GuestMemoryMmap,
                _: Arc<dyn VirtioInterrupt>,
                _: Vec<ActiveQueue>,
            ) -> Result<(), ActivateError> {
                Ok(())
            }
            fn reset(&mut self) -> bool {
                true
            }
        }
        let mem = || GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let new = |bad: Bad| VirtioPciTransport::new(Arc::new(Mutex::new(bad)), mem(), None, None);
        assert!(matches!(
            new(Bad(4, vec![16; 256])),
            Err(VirtioPciError::TooManyQueues(256))
        ));
        assert!(matches!(
            new(Bad(4, vec![16, 24])),
            Err(VirtioPciError::InvalidQueueSize { index: 1, size: 24 })
        ));
        assert!(matches!(
            new(Bad(0x40, vec![16])),
            Err(VirtioPciError::InvalidDeviceType(0x40))
        ));
        // An rng: class "other", no interrupt pin.
        let mut t = new(Bad(4, vec![16])).unwrap();
        assert_eq!(t.read_config_register(0), 0x1044_1af4);
        assert_eq!(t.read_config_register(2) >> 8, 0xff_0000);
        assert_eq!(t.read_config_register(15), 0);

        // No queues: the notification capability still has room for Linux's 2-byte check.
        let mut t = new(Bad(4, vec![])).unwrap();
        let caps = capabilities(&mut t);
        let notify = caps
            .iter()
            .find(|c| c.1 == 0x09 && c.2[3] == CAP_NOTIFY_CFG);
        assert_eq!(le32(&notify.unwrap().2[12..]), 4);
    }

    #[test]
    fn root_bus_finds_the_function_in_slot_1() {
        let h = harness();
        let mut root = PciRootBus::new(0xc000_0000, 0x100_0000).unwrap();
        let transport = Arc::new(Mutex::new(h.t));
        let (slot, bars) = root.add_device(transport.clone()).unwrap();
        assert_eq!(slot, 1);
        assert_eq!(bars.len(), 1);
        assert_eq!((bars[0].addr, bars[0].size), (0xc000_0000, BAR_SIZE));

        let conf1 = |reg: u32| (1u32 << 31 | 1 << 11 | reg << 2).to_le_bytes();
        let mut data = [0u8; 4];
        root.write(0, &conf1(0));
        root.read(4, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x1041_1af4);
        // Capabilities pointer through a byte read at 0xcfc.
        root.write(0, &conf1(0x34 / 4));
        let mut byte = [0u8];
        root.read(4, &mut byte);
        assert_eq!(byte, [0x40]);
        // The ioeventfds follow the allocated BAR.
        assert_eq!(transport.lock().unwrap().ioeventfds()[0].0, 0xc000_3000);
    }
}
