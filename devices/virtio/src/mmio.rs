//! The virtio-mmio transport, version 2 (modern) only: virtio 1.2 section 4.2.
//!
//! A 0x200-byte register block (4.2.2): control registers below 0x100, the device's
//! configuration space from 0x100. A stock Linux kernel finds it from the kernel command line
//! ([`cmdline_entry`], `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).
//!
//! Status, features, queues, activation and reset are the [`TransportCore`]'s (shared with
//! virtio-pci); this module decodes the registers. Writes the current status does not allow are
//! ignored with a rate-limited log line ([`guest_log!`](bus::guest_log)), as are accesses of
//! the wrong size or alignment (4.2.2.2 allows only aligned 32-bit accesses to the control
//! registers), which read as all ones. Queue registers take effect between FEATURES_OK and
//! DRIVER_OK and are checked as they are written (size a power of two up to QueueNumMax, ring
//! alignment); clearing QueueReady is allowed before DRIVER_OK.
//!
//! Notifications: the VMM registers each queue's eventfd as a KVM ioeventfd on the QueueNotify
//! register with the queue index as datamatch ([`VirtioMmioTransport::queue_notify_events`]);
//! without one, a QueueNotify write reaches [`BusDevice::write`] and is forwarded to the same
//! eventfd. Interrupts: InterruptStatus bits plus one eventfd the VMM registers as an irqfd
//! ([`MmioInterrupt`]).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::status::{ACKNOWLEDGE, DRIVER, FEATURES_OK};
use super::transport::{CoreError, TransportCore};
use super::{InterruptKind, VirtioDevice, VirtioInterrupt};
use bus::guest_log;
use bus::BusDevice;

/// Size of the register block.
pub const MMIO_LEN: u64 = 0x200;

/// Register offsets (4.2.2).
pub mod reg {
    /// R: 0x74726976, "virt" ([`MAGIC`](super::MAGIC)).
    pub const MAGIC_VALUE: u64 = 0x000;
    /// R: the layout version, 2 for the modern one ([`VERSION`](super::VERSION)).
    pub const VERSION: u64 = 0x004;
    /// R: the virtio device ID (section 5); 0 would mean no device.
    pub const DEVICE_ID: u64 = 0x008;
    /// R: the subsystem vendor ID ([`VENDOR`](super::VENDOR)).
    pub const VENDOR_ID: u64 = 0x00c;
    /// R: 32 bits of the device's features, the page chosen by `DeviceFeaturesSel`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// W: which 32 bits of the device features `DeviceFeatures` shows.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// W: 32 bits of the features the driver accepts, the page chosen by `DriverFeaturesSel`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// W: which 32 bits of the driver features `DriverFeatures` writes.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// W: the queue the queue registers below refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// R: the largest size of the selected queue; 0 if it does not exist.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// W: the size the driver chose for the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// RW: the selected queue is set up (write 1) or deleted (write 0).
    pub const QUEUE_READY: u64 = 0x044;
    /// W: the driver notifies the queue whose index it writes (section 2.9).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// R: why the interrupt was raised ([`INT_VRING`](super::INT_VRING),
    /// [`INT_CONFIG`](super::INT_CONFIG)).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// W: the interrupt status bits the driver has handled.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// RW: the device status ([`status`](crate::status), section 2.1); writing 0 resets.
    pub const STATUS: u64 = 0x070;
    /// W: low 32 bits of the selected queue's descriptor table address.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// W: high 32 bits of the descriptor table address.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// W: low 32 bits of the driver (available) ring address.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// W: high 32 bits of the driver ring address.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// W: low 32 bits of the device (used) ring address.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// W: high 32 bits of the device ring address.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// W: selects a shared memory region; there are none, so writes are ignored.
    pub const SHM_SEL: u64 = 0x0ac;
    /// R: low 32 bits of the selected region's length; all ones, for no region.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// R: high 32 bits of the region's length; all ones.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// R: low 32 bits of the region's address; all ones.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// R: high 32 bits of the region's address; all ones.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// RW: per-queue reset (`VIRTIO_F_RING_RESET`, not offered): reads as 0.
    pub const QUEUE_RESET: u64 = 0x0c0;
    /// R: changes whenever the configuration space changes, so the driver can read it
    /// consistently (section 2.5.1).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// The device-specific configuration space starts here.
    pub const CONFIG: u64 = 0x100;
}

/// "virt" in little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// The modern register layout.
pub const VERSION: u32 = 2;
/// Our vendor ID; the driver does not look at it.
pub const VENDOR: u32 = 0;

/// InterruptStatus bit: the device used a buffer in at least one queue.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the device configuration changed.
pub const INT_CONFIG: u32 = 2;

/// The `virtio_mmio.device=` kernel parameter that makes Linux probe a transport at `base`
/// with interrupt `irq` (drivers/virtio/virtio_mmio.c, `<size>@<base>:<irq>`).
pub fn cmdline_entry(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device={MMIO_LEN}@{base:#x}:{irq}")
}

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd for the virtio-mmio transport")]
    EventFd(#[source] std::io::Error),
    /// The device asked for a queue size virtio does not allow (0, not a power of two, or more
    /// than 32768).
    #[error("queue {index} of the device has invalid maximum size {size}")]
    QueueSize {
        /// The queue.
        index: usize,
        /// Its maximum size.
        size: u16,
    },
}

/// The transport's interrupt state, shared with the device after activation: InterruptStatus
/// and ConfigGeneration, and the eventfd the VMM registers as an irqfd.
pub struct MmioInterrupt {
    status: AtomicU32,
    generation: AtomicU32,
    irq: EventFd,
}

impl MmioInterrupt {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            generation: AtomicU32::new(0),
            irq: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The ConfigGeneration register.
    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The eventfd to register as a KVM irqfd on the transport's interrupt line.
    pub fn irq_event(&self) -> &EventFd {
        &self.irq
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        let bit = match kind {
            InterruptKind::Config => {
                // The driver re-reads the configuration when the generation moved (4.2.2.1).
                self.generation.fetch_add(1, Ordering::SeqCst);
                INT_CONFIG
            }
            InterruptKind::Queue(_) => INT_VRING,
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq.write(1)
    }
}

pub use super::transport::{next_status, StatusChange};

/// Status in which the driver sets up queues (after FEATURES_OK, before DRIVER_OK).
const QUEUE_SETUP: u8 = ACKNOWLEDGE | DRIVER | FEATURES_OK;

impl From<CoreError> for MmioError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::QueueSize { index, size } => Self::QueueSize { index, size },
            CoreError::EventFd(e) => Self::EventFd(e),
        }
    }
}

/// A virtio device on the MMIO bus: the register decoder over the [`TransportCore`].
pub struct VirtioMmioTransport {
    core: TransportCore,
    interrupt: Arc<MmioInterrupt>,
}

impl VirtioMmioTransport {
    /// Wraps `device`, whose queues will live in `mem`.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, MmioError> {
        let interrupt = Arc::new(MmioInterrupt::new().map_err(MmioError::EventFd)?);
        let core = TransportCore::new("virtio-mmio", device, mem, interrupt.clone())?;
        Ok(Self { core, interrupt })
    }

    /// For each queue: the offset of QueueNotify in the register block, the queue index the
    /// driver writes there (the ioeventfd's datamatch, 4 bytes) and the eventfd to signal.
    pub fn queue_notify_events(&self) -> Vec<(u64, u32, &EventFd)> {
        self.core
            .notify_events()
            .iter()
            .enumerate()
            .map(|(i, fd)| (reg::QUEUE_NOTIFY, i as u32, fd))
            .collect()
    }

    /// The eventfd to register as a KVM irqfd.
    pub fn irq_event(&self) -> &EventFd {
        self.interrupt.irq_event()
    }

    /// The interrupt state, as handed to the device at activation.
    pub fn interrupt(&self) -> Arc<MmioInterrupt> {
        Arc::clone(&self.interrupt)
    }

    /// The Status register.
    pub fn status(&self) -> u8 {
        self.core.status()
    }

    fn log_bad_access(&self, what: &str, offset: u64, len: usize) {
        guest_log!(
            "virtio-mmio (device type {}): {what} of {len} bytes at offset {offset:#x} ignored",
            self.core.device_type()
        );
    }

    fn log_refused(&self, what: &str, value: u32) {
        guest_log!(
            "virtio-mmio (device type {}): {what} ({value:#x}) refused in status {:#x}",
            self.core.device_type(),
            self.core.status()
        );
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        let queue = self.core.selected_queue().copied();
        match offset {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.core.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => self.core.device_features_page(),
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => u32::from(self.core.status()),
            // No shared memory regions: a length of -1 (4.2.2).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::QUEUE_RESET => 0,
            reg::CONFIG_GENERATION => self.interrupt.generation(),
            _ => {
                self.log_bad_access("read of a write-only or unknown register", offset, 4);
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.core.device_feature_select = value,
            reg::DRIVER_FEATURES_SEL => self.core.driver_feature_select = value,
            reg::DRIVER_FEATURES => self.core.write_driver_features(value),
            reg::QUEUE_SEL => self.core.queue_select = value,
            reg::QUEUE_NUM
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH
            | reg::QUEUE_READY => self.write_queue_register(offset, value),
            reg::QUEUE_NOTIFY => {
                if !self.core.notify_queue(u64::from(value)) {
                    self.log_refused("a notification of a queue that does not exist", value);
                }
            }
            reg::INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
            }
            reg::STATUS => self.write_status(value),
            reg::SHM_SEL => {}
            _ => self.log_bad_access("write of a read-only or unknown register", offset, 4),
        }
    }

    /// Queue registers take effect between FEATURES_OK and DRIVER_OK (4.2.3.2), on a queue not
    /// yet ready; QueueNum and the addresses are checked as they are written, so a bad value
    /// leaves the previous one. Clearing QueueReady is allowed before DRIVER_OK (Linux does it
    /// when it deletes a queue).
    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if offset == reg::QUEUE_READY && value == 0 {
            if !self.core.disable_queue() {
                self.log_refused("clearing QueueReady", value);
            }
            return;
        }
        if self.core.status() != QUEUE_SETUP {
            return self.log_refused("a queue register write", value);
        }
        let Some(queue) = self.core.writable_queue() else {
            return;
        };
        let field = |index: usize, high: bool| {
            let old = queue.addresses[index];
            let new = if high {
                (old & 0xffff_ffff) | (u64::from(value) << 32)
            } else {
                (old & !0xffff_ffff) | u64::from(value)
            };
            (index, new)
        };
        let address = match offset {
            reg::QUEUE_DESC_LOW => Some(field(0, false)),
            reg::QUEUE_DESC_HIGH => Some(field(0, true)),
            reg::QUEUE_DRIVER_LOW => Some(field(1, false)),
            reg::QUEUE_DRIVER_HIGH => Some(field(1, true)),
            reg::QUEUE_DEVICE_LOW => Some(field(2, false)),
            reg::QUEUE_DEVICE_HIGH => Some(field(2, true)),
            _ => None,
        };
        let ok = match (offset, address) {
            (_, Some((index, addr))) => {
                // Descriptors 16-byte aligned, the driver area 2, the device area 4 (2.7).
                let ok = addr % [16, 2, 4][index] == 0;
                if ok {
                    queue.addresses[index] = addr;
                }
                ok
            }
            (reg::QUEUE_NUM, None) => match u16::try_from(value) {
                Ok(size) if size.is_power_of_two() && size <= queue.max_size => {
                    queue.size = size;
                    true
                }
                _ => false,
            },
            (reg::QUEUE_READY, None) if value == 1 => {
                queue.ready = true;
                true
            }
            _ => false,
        };
        if !ok {
            self.log_refused("an invalid queue size, alignment or ready value", value);
        }
    }

    fn write_status(&mut self, value: u32) {
        let Ok(written) = u8::try_from(value) else {
            return self.log_refused("a Status write with reserved bits", value);
        };
        if self.core.write_status(written) {
            // Reset: InterruptStatus reads 0 again (4.2.2.1).
            self.interrupt.status.store(0, Ordering::SeqCst);
        }
    }

    /// Configuration space: 8-, 16-, 32- and 64-bit naturally aligned accesses (4.2.2.2).
    fn config_access_ok(offset: u64, len: usize) -> bool {
        matches!(len, 1 | 2 | 4 | 8) && offset.is_multiple_of(len as u64)
    }
}

impl BusDevice for VirtioMmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            if Self::config_access_ok(offset, data.len()) {
                self.core.device().read_config(offset - reg::CONFIG, data);
            } else {
                data.fill(0xff);
                self.log_bad_access("configuration read", offset, data.len());
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0xff);
            return self.log_bad_access("unaligned or non-32-bit read", offset, data.len());
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if Self::config_access_ok(offset, data.len()) {
                self.core.device().write_config(offset - reg::CONFIG, data);
            } else {
                self.log_bad_access("configuration write", offset, data.len());
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return self.log_bad_access("non-32-bit write", offset, data.len());
        };
        if !offset.is_multiple_of(4) {
            return self.log_bad_access("unaligned write", offset, data.len());
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::features;
    use crate::status::{DEVICE_NEEDS_RESET, DRIVER_OK, FAILED};
    use crate::{ActivateError, ActiveQueue};
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    /// A device that records what the transport does to it.
    #[derive(Default)]
    struct Recorder {
        acked: Option<u64>,
        activated: Option<Vec<(u16, u64, u64, u64)>>,
        interrupt: Option<Arc<dyn VirtioInterrupt>>,
        notify: Vec<EventFd>,
        resets: usize,
        config: [u8; 8],
        fail_activation: bool,
    }

    impl VirtioDevice for Recorder {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 8]
        }
        fn features(&self) -> u64 {
            features::VERSION_1 | 1 << 9
        }
        fn ack_features(&mut self, features: u64) {
            self.acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::queue::read_config(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = self.config.get_mut(offset as usize + i) {
                    *slot = *b;
                }
            }
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            interrupt: Arc<dyn VirtioInterrupt>,
            queues: Vec<ActiveQueue>,
        ) -> Result<(), ActivateError> {
            if self.fail_activation {
                return Err(ActivateError::Backend("no backend".into()));
            }
            self.activated = Some(
                queues
                    .iter()
                    .filter(|q| q.queue.ready())
                    .map(|q| {
                        (
                            q.queue.size(),
                            q.queue.desc_table(),
                            q.queue.avail_ring(),
                            q.queue.used_ring(),
                        )
                    })
                    .collect(),
            );
            self.notify = queues.into_iter().map(|q| q.notify).collect();
            self.interrupt = Some(interrupt);
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            self.activated = None;
            true
        }
    }

    fn setup(device: Recorder) -> (Arc<Mutex<Recorder>>, VirtioMmioTransport) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let device = Arc::new(Mutex::new(device));
        let transport = VirtioMmioTransport::new(mem, device.clone()).unwrap();
        (device, transport)
    }

    fn rd(t: &mut VirtioMmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn wr(t: &mut VirtioMmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// Negotiates `driver_features` as Linux does; returns the status read back.
    fn negotiate(t: &mut VirtioMmioTransport, driver_features: u64) -> u32 {
        wr(t, reg::STATUS, 0);
        wr(t, reg::STATUS, u32::from(ACKNOWLEDGE));
        wr(t, reg::STATUS, u32::from(ACKNOWLEDGE | DRIVER));
        wr(t, reg::DRIVER_FEATURES_SEL, 1);
        wr(t, reg::DRIVER_FEATURES, (driver_features >> 32) as u32);
        wr(t, reg::DRIVER_FEATURES_SEL, 0);
        wr(t, reg::DRIVER_FEATURES, driver_features as u32);
        wr(
            t,
            reg::STATUS,
            u32::from(ACKNOWLEDGE | DRIVER | FEATURES_OK),
        );
        rd(t, reg::STATUS)
    }

    fn setup_queue(t: &mut VirtioMmioTransport, index: u32, size: u32, base: u64) {
        wr(t, reg::QUEUE_SEL, index);
        assert_eq!(rd(t, reg::QUEUE_READY), 0);
        wr(t, reg::QUEUE_NUM, size);
        wr(t, reg::QUEUE_DESC_LOW, base as u32);
        wr(t, reg::QUEUE_DESC_HIGH, (base >> 32) as u32);
        wr(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        wr(t, reg::QUEUE_DRIVER_HIGH, 0);
        wr(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        wr(t, reg::QUEUE_DEVICE_HIGH, 0);
        wr(t, reg::QUEUE_READY, 1);
    }

    const ALL_OK: u8 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

    #[test]
    fn identification_registers() {
        let (_, mut t) = setup(Recorder::default());
        assert_eq!(rd(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), 2);
        assert_eq!(rd(&mut t, reg::VENDOR_ID), 0);
        assert_eq!(rd(&mut t, reg::SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn device_features_by_selector() {
        let (_, mut t) = setup(Recorder::default());
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1 << 9);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0);
    }

    #[test]
    fn full_initialization_activates_with_the_ready_queues() {
        let (dev, mut t) = setup(Recorder::default());
        let status = negotiate(&mut t, features::VERSION_1 | 1 << 9);
        assert_eq!(status, u32::from(ACKNOWLEDGE | DRIVER | FEATURES_OK));
        assert_eq!(
            dev.lock().unwrap().acked,
            Some(features::VERSION_1 | 1 << 9)
        );
        wr(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 16);
        wr(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 8);
        wr(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0, "no queue 2");
        setup_queue(&mut t, 0, 8, 0x1_0000);
        setup_queue(&mut t, 1, 4, 0x2_0000);

        wr(&mut t, reg::STATUS, u32::from(ALL_OK));

        assert_eq!(rd(&mut t, reg::STATUS), u32::from(ALL_OK));
        assert_eq!(
            dev.lock().unwrap().activated,
            Some(vec![
                (8, 0x1_0000, 0x1_1000, 0x1_2000),
                (4, 0x2_0000, 0x2_1000, 0x2_2000)
            ])
        );
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
    }

    #[test]
    fn features_not_offered_are_refused() {
        let (dev, mut t) = setup(Recorder::default());
        let status = negotiate(&mut t, features::VERSION_1 | 1 << 3);
        assert_eq!(status, u32::from(ACKNOWLEDGE | DRIVER));
        assert_eq!(dev.lock().unwrap().acked, None);
    }

    #[test]
    fn a_legacy_driver_without_version_1_is_refused() {
        let (_, mut t) = setup(Recorder::default());
        assert_eq!(negotiate(&mut t, 1 << 9), u32::from(ACKNOWLEDGE | DRIVER));
    }

    #[test]
    fn invalid_status_write_is_ignored() {
        let (_, mut t) = setup(Recorder::default());
        // DRIVER without ACKNOWLEDGE skips a stage. (Several stages in order in one write,
        // such as ACKNOWLEDGE | DRIVER from 0, are taken since the transports share one core.)
        wr(&mut t, reg::STATUS, u32::from(DRIVER));
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        wr(&mut t, reg::STATUS, 0x100 | u32::from(ACKNOWLEDGE));
        assert_eq!(rd(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn queue_registers_are_ignored_outside_queue_setup() {
        let (dev, mut t) = setup(Recorder::default());
        // Before FEATURES_OK.
        wr(&mut t, reg::STATUS, u32::from(ACKNOWLEDGE));
        wr(&mut t, reg::QUEUE_NUM, 4);
        wr(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);

        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 8, 0x1_0000);
        // A ready queue cannot be changed.
        wr(&mut t, reg::QUEUE_NUM, 4);
        wr(&mut t, reg::STATUS, u32::from(ALL_OK));
        // Nor can any queue after DRIVER_OK.
        wr(&mut t, reg::QUEUE_SEL, 1);
        wr(&mut t, reg::QUEUE_READY, 1);
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_READY, 0);

        assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
        assert_eq!(
            dev.lock().unwrap().activated,
            Some(vec![(8, 0x1_0000, 0x1_1000, 0x1_2000)])
        );
    }

    #[test]
    fn invalid_queue_size_and_alignment_are_refused() {
        let (dev, mut t) = setup(Recorder::default());
        negotiate(&mut t, features::VERSION_1);
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_NUM, 8);
        wr(&mut t, reg::QUEUE_NUM, 12); // not a power of two
        wr(&mut t, reg::QUEUE_NUM, 32); // above the maximum of 16
        wr(&mut t, reg::QUEUE_NUM, 0x1_0008); // wider than 16 bits
        wr(&mut t, reg::QUEUE_DESC_LOW, 0x1_0000);
        wr(&mut t, reg::QUEUE_DESC_LOW, 0x1_0008); // descriptors need 16-byte alignment
        wr(&mut t, reg::QUEUE_DRIVER_LOW, 0x1_1000);
        wr(&mut t, reg::QUEUE_DEVICE_LOW, 0x1_2000);
        wr(&mut t, reg::QUEUE_DEVICE_LOW, 0x1_2002); // used ring needs 4-byte alignment
        wr(&mut t, reg::QUEUE_READY, 2);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        wr(&mut t, reg::QUEUE_READY, 1);
        wr(&mut t, reg::STATUS, u32::from(ALL_OK));

        assert_eq!(
            dev.lock().unwrap().activated,
            Some(vec![(8, 0x1_0000, 0x1_1000, 0x1_2000)])
        );
    }

    #[test]
    fn queue_outside_memory_fails_activation_with_needs_reset() {
        let (dev, mut t) = setup(Recorder::default());
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 16, 0x10_0000 - 0x100);

        wr(&mut t, reg::STATUS, u32::from(ALL_OK));

        assert_eq!(
            rd(&mut t, reg::STATUS),
            u32::from(ALL_OK | DEVICE_NEEDS_RESET)
        );
        assert_eq!(dev.lock().unwrap().activated, None);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
        assert_eq!(rd(&mut t, reg::CONFIG_GENERATION), 1);
        assert_eq!(t.irq_event().read().unwrap(), 1);

        // The driver echoes NEEDS_RESET back; only a reset clears it.
        wr(
            &mut t,
            reg::STATUS,
            u32::from(ALL_OK | DEVICE_NEEDS_RESET | FAILED),
        );
        assert_eq!(
            rd(&mut t, reg::STATUS),
            u32::from(ALL_OK | DEVICE_NEEDS_RESET | FAILED)
        );
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn device_refusing_activation_gets_needs_reset() {
        let (_, mut t) = setup(Recorder {
            fail_activation: true,
            ..Default::default()
        });
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 8, 0x1_0000);
        wr(&mut t, reg::STATUS, u32::from(ALL_OK));
        assert_eq!(
            rd(&mut t, reg::STATUS),
            u32::from(ALL_OK | DEVICE_NEEDS_RESET)
        );
    }

    #[test]
    fn reset_clears_queues_interrupts_and_features() {
        let (dev, mut t) = setup(Recorder::default());
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 8, 0x1_0000);
        wr(&mut t, reg::STATUS, u32::from(ALL_OK));
        let interrupt = dev.lock().unwrap().interrupt.clone().unwrap();
        interrupt.trigger(InterruptKind::Queue(0)).unwrap();
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
        let resets = dev.lock().unwrap().resets;

        wr(&mut t, reg::STATUS, 0);

        assert_eq!(dev.lock().unwrap().resets, resets + 1);
        assert_eq!(dev.lock().unwrap().activated, None);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
        wr(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        // Features must be negotiated again: the old ones are gone.
        wr(&mut t, reg::STATUS, u32::from(ACKNOWLEDGE));
        wr(&mut t, reg::STATUS, u32::from(ACKNOWLEDGE | DRIVER));
        wr(
            &mut t,
            reg::STATUS,
            u32::from(ACKNOWLEDGE | DRIVER | FEATURES_OK),
        );
        assert_eq!(rd(&mut t, reg::STATUS), u32::from(ACKNOWLEDGE | DRIVER));
    }

    #[test]
    fn a_broken_queue_reported_by_the_device_sets_needs_reset_and_interrupt_status_bit_1() {
        let (dev, mut t) = setup(Recorder::default());
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 8, 0x1_0000);
        wr(&mut t, reg::STATUS, u32::from(ALL_OK));
        let interrupt = dev.lock().unwrap().interrupt.clone().unwrap();
        interrupt.set_needs_reset().unwrap();
        assert_eq!(
            rd(&mut t, reg::STATUS),
            u32::from(ALL_OK | DEVICE_NEEDS_RESET)
        );
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
        assert_eq!(t.irq_event().read().unwrap(), 1);
        // The driver's reset recovers the device.
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 8, 0x1_0000);
        wr(&mut t, reg::STATUS, u32::from(ALL_OK));
        assert_eq!(rd(&mut t, reg::STATUS), u32::from(ALL_OK));
    }

    #[test]
    fn hammering_registers_logs_a_bounded_amount() {
        let (_, mut t) = setup(Recorder::default());
        let bytes = bus::ratelimit::capture::logged_bytes(|| {
            for i in 0..100_000u32 {
                // An unknown register, a bad size, a notification of no queue, and a
                // FEATURES_OK retry with unoffered features.
                wr(&mut t, 0x0f8, i);
                t.write(reg::STATUS, &[1]);
                wr(&mut t, reg::QUEUE_NOTIFY, 7);
                negotiate(&mut t, features::VERSION_1 | 1 << 3);
            }
        });
        assert!(bytes < 8 * 1024, "{bytes} bytes logged");
        assert_eq!(rd(&mut t, reg::STATUS), u32::from(ACKNOWLEDGE | DRIVER));
    }

    #[test]
    fn interrupt_status_and_ack() {
        let (_, mut t) = setup(Recorder::default());
        let interrupt = t.interrupt();
        interrupt.trigger(InterruptKind::Queue(1)).unwrap();
        interrupt.trigger(InterruptKind::Config).unwrap();
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
        assert_eq!(rd(&mut t, reg::CONFIG_GENERATION), 1);
        assert_eq!(t.irq_event().read().unwrap(), 2);

        wr(&mut t, reg::INTERRUPT_ACK, INT_VRING);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
        wr(&mut t, reg::INTERRUPT_ACK, INT_CONFIG);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn queue_notify_write_signals_the_queue_eventfd() {
        let (_, mut t) = setup(Recorder::default());
        let events = t.queue_notify_events();
        assert_eq!(events.len(), 2);
        assert_eq!((events[0].0, events[0].1), (0x50, 0));
        assert_eq!((events[1].0, events[1].1), (0x50, 1));
        let q1 = events[1].2.try_clone().unwrap();

        wr(&mut t, reg::QUEUE_NOTIFY, 1);
        wr(&mut t, reg::QUEUE_NOTIFY, 7); // no such queue: ignored

        assert_eq!(q1.read().unwrap(), 1);
        assert!(
            t.core.notify_events()[0].read().is_err(),
            "queue 0 was not notified"
        );
    }

    #[test]
    fn activated_device_shares_the_notify_eventfds() {
        let (dev, mut t) = setup(Recorder::default());
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 8, 0x1_0000);
        wr(&mut t, reg::STATUS, u32::from(ALL_OK));

        wr(&mut t, reg::QUEUE_NOTIFY, 0);

        assert_eq!(dev.lock().unwrap().notify[0].read().unwrap(), 1);
    }

    #[test]
    fn wrong_size_or_alignment_reads_all_ones_and_writes_are_dropped() {
        let (_, mut t) = setup(Recorder::default());
        let mut two = [0u8; 2];
        t.read(reg::MAGIC_VALUE, &mut two);
        assert_eq!(two, [0xff; 2]);
        let mut four = [0u8; 4];
        t.read(reg::MAGIC_VALUE + 2, &mut four);
        assert_eq!(four, [0xff; 4]);
        let mut eight = [0u8; 8];
        t.read(reg::MAGIC_VALUE, &mut eight);
        assert_eq!(eight, [0xff; 8]);

        t.write(reg::STATUS, &[ACKNOWLEDGE]);
        t.write(reg::STATUS + 2, &[1, 0, 0, 0]);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn write_only_registers_read_zero() {
        let (_, mut t) = setup(Recorder::default());
        wr(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_SEL), 0);
        assert_eq!(rd(&mut t, reg::QUEUE_NOTIFY), 0);
        assert_eq!(rd(&mut t, 0x0f8), 0);
    }

    #[test]
    fn config_space_accesses() {
        let (dev, mut t) = setup(Recorder {
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            ..Default::default()
        });
        let mut b = [0u8; 1];
        t.read(reg::CONFIG + 3, &mut b);
        assert_eq!(b, [4]);
        let mut w = [0u8; 2];
        t.read(reg::CONFIG + 2, &mut w);
        assert_eq!(w, [3, 4]);
        let mut q = [0u8; 8];
        t.read(reg::CONFIG, &mut q);
        assert_eq!(q, [1, 2, 3, 4, 5, 6, 7, 8]);
        // Past the device's configuration: zero.
        let mut d = [0xaau8; 4];
        t.read(reg::CONFIG + 0xfc, &mut d);
        assert_eq!(d, [0; 4]);
        // Misaligned: all ones, and a misaligned write is dropped.
        t.read(reg::CONFIG + 1, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        t.write(reg::CONFIG + 1, &[9, 9]);
        t.write(reg::CONFIG + 4, &[9]);
        assert_eq!(dev.lock().unwrap().config, [1, 2, 3, 4, 9, 6, 7, 8]);
    }

    #[test]
    fn cmdline_entry_format() {
        assert_eq!(
            cmdline_entry(0xd000_0000, 5),
            "virtio_mmio.device=512@0xd0000000:5"
        );
    }

    #[test]
    fn invalid_device_queue_size_is_an_error() {
        struct Bad;
        impl VirtioDevice for Bad {
            fn device_type(&self) -> u32 {
                4
            }
            fn queue_max_sizes(&self) -> Vec<u16> {
                vec![100]
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
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = VirtioMmioTransport::new(mem, Arc::new(Mutex::new(Bad)))
            .err()
            .unwrap();
        assert!(matches!(
            err,
            MmioError::QueueSize {
                index: 0,
                size: 100
            }
        ));
    }
}
