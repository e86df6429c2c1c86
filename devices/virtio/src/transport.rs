//! The transport core both virtio transports call (virtio 1.2 sections 2.1, 2.2, 3.1 and 4).
//!
//! virtio-pci ([`super::pci`]) and virtio-mmio ([`super::mmio`]) only decode registers; what
//! the registers mean is here, once:
//!
//! - the device status state machine: the driver initialization sequence of 3.1.1 as one table
//!   (`STEPS`), checked by [`next_status`]; a status write may carry several next steps at
//!   once, taken in order (Linux writes one at a time, firmware drivers sometimes more);
//! - feature negotiation (2.2): the device's features less what the transports cannot carry
//!   ([`UNSUPPORTED_FEATURES`]), FEATURES_OK refused for unoffered bits or without
//!   `VIRTIO_F_VERSION_1`;
//! - queue configuration: each queue's registers as the driver wrote them, writable while the
//!   queue is not enabled and the device not running, checked when the driver sets DRIVER_OK;
//! - activation: every queue goes to the device at its index, those the driver did not
//!   enable not ready (the device leaves them alone);
//! - reset, and DEVICE_NEEDS_RESET (2.1.2): set when the device cannot start or cannot be reset,
//!   or when the device reports a broken queue through [`VirtioInterrupt::set_needs_reset`];
//!   the driver hears of it through a configuration-change interrupt and recovers by a reset.
//!
//! Both transports hold the device as `Arc<Mutex<dyn VirtioDevice>>`, shared with the event
//! loop that serves its queues.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_config::{
    VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_NOTIF_CONFIG_DATA, VIRTIO_F_RING_PACKED,
    VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use super::{ActiveQueue, InterruptKind, VirtioDevice, VirtioInterrupt};
use bus::guest_log;

/// Features a device may offer that neither transport implements, hidden from the driver:
/// packed rings (the queues are `virtio_queue::Queue`, split only), notification data and
/// per-queue reset (section 6).
pub const UNSUPPORTED_FEATURES: u64 = 1 << VIRTIO_F_RING_PACKED
    | 1 << VIRTIO_F_NOTIFICATION_DATA
    | 1 << VIRTIO_F_NOTIF_CONFIG_DATA
    | 1 << VIRTIO_F_RING_RESET;

/// The largest queue size a split virtqueue may have (2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Every initialization stage bit.
const ALL_STAGES: u8 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

/// What the device does when the driver adds a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Nothing beyond recording the bit.
    Record,
    /// Check the driver's features and tell the device (2.2, 3.1.1 step 5).
    AcceptFeatures,
    /// Hand the queues to the device (3.1.1 step 8).
    Activate,
}

/// The driver initialization sequence (3.1.1) as one table: from each status, the one bit the
/// driver may add next, and what adding it makes the device do.
const STEPS: [(u8, u8, Action); 4] = [
    (0, ACKNOWLEDGE, Action::Record),
    (ACKNOWLEDGE, DRIVER, Action::Record),
    (ACKNOWLEDGE | DRIVER, FEATURES_OK, Action::AcceptFeatures),
    (
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
        DRIVER_OK,
        Action::Activate,
    ),
];

/// The outcome of one step of a driver's write to the status register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusChange {
    /// Writing 0: reset the device.
    Reset,
    /// A step of the initialization sequence, to this status.
    Set(u8),
    /// FEATURES_OK was asked for; the transport sets it only if it accepts the features.
    FeaturesOk(u8),
    /// DRIVER_OK: activate the device, then set this status.
    DriverOk(u8),
    /// The driver gave up (FAILED); keep the other bits.
    Failed(u8),
    /// Not a step the spec allows from the current status: ignore it.
    Invalid,
}

/// Checks one step of a status write against the table `STEPS`: each step adds exactly one bit, in
/// order ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK; 0 resets; FAILED may be added at any
/// time; rewriting the current value changes nothing. `current` and `written` exclude
/// DEVICE_NEEDS_RESET, which only the device sets.
pub fn next_status(current: u8, written: u8) -> StatusChange {
    if written == 0 {
        return StatusChange::Reset;
    }
    if written == current {
        return StatusChange::Set(current);
    }
    if written & FAILED != 0 && written & !FAILED == current & !FAILED {
        return StatusChange::Failed(written);
    }
    if current & FAILED != 0 {
        return StatusChange::Invalid;
    }
    match STEPS
        .iter()
        .find(|&&(from, bit, _)| from == current && written == from | bit)
    {
        Some(&(_, _, Action::AcceptFeatures)) => StatusChange::FeaturesOk(written),
        Some(&(_, _, Action::Activate)) => StatusChange::DriverOk(written),
        Some(_) => StatusChange::Set(written),
        None => StatusChange::Invalid,
    }
}

/// The steps of [`STEPS`] that take `current` to `wanted`, in order, if `wanted` is reachable.
fn steps_to(current: u8, wanted: u8) -> Option<Vec<(u8, Action)>> {
    let mut at = current;
    let mut steps = Vec::new();
    while at != wanted {
        let &(_, bit, action) = STEPS
            .iter()
            .find(|&&(from, bit, _)| from == at && wanted & bit != 0)?;
        at |= bit;
        steps.push((at, action));
    }
    Some(steps)
}

/// Errors setting up the core for a device.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The device asked for a queue size virtio does not allow.
    #[error("queue {index} of the device has invalid maximum size {size}")]
    QueueSize {
        /// The queue.
        index: usize,
        /// Its maximum size.
        size: u16,
    },
    /// A queue notification eventfd could not be created.
    #[error("cannot create a queue notification eventfd")]
    EventFd(#[source] io::Error),
}

/// One queue's registers as the driver programs them; checked and turned into a
/// `virtio_queue::Queue` at DRIVER_OK, so that reads return what was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// The device's maximum.
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// Whether the driver enabled the queue (`queue_enable`, `QueueReady`).
    pub ready: bool,
    /// Descriptor area, driver area, device area.
    pub addresses: [u64; 3],
}

impl QueueConfig {
    /// A queue after reset: maximum size, disabled, at address 0.
    pub fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            addresses: [0; 3],
        }
    }

    /// Builds the queue the driver programmed, or says why it is unusable.
    fn build(&self, event_idx: bool, mem: &GuestMemoryMmap) -> Result<Queue, String> {
        let [desc, driver, device] = self.addresses;
        let mut queue = Queue::new(self.max_size).map_err(|e| format!("cannot exist: {e}"))?;
        queue
            .try_set_size(self.size)
            .map_err(|e| format!("has size {}: {e}", self.size))?;
        queue
            .try_set_desc_table_address(GuestAddress(desc))
            .and_then(|()| queue.try_set_avail_ring_address(GuestAddress(driver)))
            .and_then(|()| queue.try_set_used_ring_address(GuestAddress(device)))
            .map_err(|e| format!("is misaligned: {e}"))?;
        queue.set_ready(true);
        queue.set_event_idx(event_idx);
        if !queue.is_valid(mem) {
            return Err("lies outside guest memory".to_string());
        }
        Ok(queue)
    }
}

/// The interrupt a device gets at activation: the transport's, plus the activation's
/// DEVICE_NEEDS_RESET flag, which the core reads into the status register.
struct DeviceInterrupt {
    transport: Arc<dyn VirtioInterrupt>,
    needs_reset: Arc<AtomicBool>,
}

impl VirtioInterrupt for DeviceInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        self.transport.trigger(kind)
    }

    fn set_needs_reset(&self) -> io::Result<()> {
        if self.needs_reset.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.transport.trigger(InterruptKind::Config)
    }
}

/// Status, features and queues of one device, whichever transport decodes the registers.
pub struct TransportCore {
    /// Names the transport in log lines ("virtio-pci", "virtio-mmio").
    name: &'static str,
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    device_type: u32,
    offered: u64,
    queues: Vec<QueueConfig>,
    notify: Vec<EventFd>,
    status: u8,
    /// Set by the running device through its [`DeviceInterrupt`]; replaced at each activation.
    device_needs_reset: Arc<AtomicBool>,
    activated: bool,
    /// `device_feature_select`, `driver_feature_select`.
    pub device_feature_select: u32,
    /// `driver_feature_select`.
    pub driver_feature_select: u32,
    driver_features: u64,
    /// The queue the queue registers refer to.
    pub queue_select: u32,
}

impl TransportCore {
    /// The core for `device`, whose queues live in `mem` and which interrupts through
    /// `interrupt`; checks the device's queue sizes and makes one notification eventfd per
    /// queue.
    pub fn new(
        name: &'static str,
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<Self, CoreError> {
        let (device_type, features, max_sizes) = {
            let d = lock(&device);
            (d.device_type(), d.features(), d.queue_max_sizes())
        };
        if let Some((index, &size)) = max_sizes
            .iter()
            .enumerate()
            .find(|(_, size)| !size.is_power_of_two() || **size > MAX_QUEUE_SIZE)
        {
            return Err(CoreError::QueueSize { index, size });
        }
        let notify = max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(CoreError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            name,
            device,
            mem,
            interrupt,
            device_type,
            offered: features & !UNSUPPORTED_FEATURES,
            queues: max_sizes.into_iter().map(QueueConfig::new).collect(),
            notify,
            status: 0,
            device_needs_reset: Arc::new(AtomicBool::new(false)),
            activated: false,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
        })
    }

    /// The device, locked.
    pub fn device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        lock(&self.device)
    }

    /// The device as shared with the event loop.
    pub fn shared_device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The virtio device ID.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The device status register, DEVICE_NEEDS_RESET from the running device included.
    pub fn status(&self) -> u8 {
        let device = if self.device_needs_reset.load(Ordering::SeqCst) {
            DEVICE_NEEDS_RESET
        } else {
            0
        };
        self.status | device
    }

    /// Whether the device runs with its queues.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The queue notification eventfds, by queue index.
    pub fn notify_events(&self) -> &[EventFd] {
        &self.notify
    }

    /// The number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The features offered to the driver: the device's, less [`UNSUPPORTED_FEATURES`].
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// The features the driver wrote so far.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The 32 bits of the offered features `device_feature_select` shows.
    pub fn device_features_page(&self) -> u32 {
        feature_page(self.offered, self.device_feature_select)
    }

    /// The 32 bits of the driver's features `driver_feature_select` shows.
    pub fn driver_features_page(&self) -> u32 {
        feature_page(self.driver_features, self.driver_feature_select)
    }

    /// A driver write of the features page `driver_feature_select` shows. Features are fixed
    /// once FEATURES_OK is set (3.1.1); no feature bits exist above 63.
    pub fn write_driver_features(&mut self, value: u32) {
        if self.status & FEATURES_OK != 0 {
            guest_log!(
                "{}: ignoring a driver features write after FEATURES_OK",
                self.name
            );
            return;
        }
        let value = u64::from(value);
        match self.driver_feature_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
            _ if value != 0 => guest_log!("{}: ignoring feature bits above 63", self.name),
            _ => {}
        }
    }

    /// The selected queue, if it exists.
    pub fn selected_queue(&self) -> Option<&QueueConfig> {
        usize::try_from(self.queue_select)
            .ok()
            .and_then(|i| self.queues.get(i))
    }

    /// The selected queue, if the driver may still program it: it exists, is not enabled, and
    /// the device is not running.
    pub fn writable_queue(&mut self) -> Option<&mut QueueConfig> {
        let running = self.status & DRIVER_OK != 0;
        let select = self.queue_select;
        let queue = usize::try_from(select)
            .ok()
            .and_then(|i| self.queues.get_mut(i));
        match queue {
            Some(q) if !q.ready && !running => Some(q),
            _ => {
                guest_log!(
                    "{}: ignoring a write to queue {select}, which is absent, enabled or running",
                    self.name
                );
                None
            }
        }
    }

    /// Disables the selected queue before DRIVER_OK (virtio-mmio allows it; virtio-pci does
    /// not, 4.1.4.3.2). Returns whether it was allowed.
    pub fn disable_queue(&mut self) -> bool {
        if self.status & DRIVER_OK != 0 {
            return false;
        }
        let Some(q) = usize::try_from(self.queue_select)
            .ok()
            .and_then(|i| self.queues.get_mut(i))
        else {
            return false;
        };
        q.ready = false;
        true
    }

    /// A driver write of the device status (2.1, 3.1.1): 0 resets; FAILED is always taken;
    /// otherwise the driver may add the next stages of `STEPS` in order, while neither
    /// FAILED nor DEVICE_NEEDS_RESET is set. Returns true if the write reset the device (the
    /// transport then clears its own registers).
    pub fn write_status(&mut self, value: u8) -> bool {
        if value == 0 {
            return self.reset();
        }
        let value = value & !DEVICE_NEEDS_RESET;
        if value & FAILED != 0 && self.status & FAILED == 0 {
            guest_log!(
                "{}: the driver failed device type {} (status {value:#x})",
                self.name,
                self.device_type
            );
            self.status |= FAILED;
        }
        let current = self.status & ALL_STAGES;
        let wanted = value & ALL_STAGES;
        if wanted == current && value & !(ALL_STAGES | FAILED) == 0 {
            return false;
        }
        let stopped = self.status() & (FAILED | DEVICE_NEEDS_RESET) != 0;
        let steps = steps_to(current, wanted)
            .filter(|_| !stopped && value & !(ALL_STAGES | FAILED) == 0 && wanted != current);
        let Some(steps) = steps else {
            guest_log!(
                "{}: ignoring device status {value:#x} after {:#x}",
                self.name,
                self.status()
            );
            return false;
        };
        for (next, action) in steps {
            match action {
                Action::Record => {}
                // The driver reads FEATURES_OK back, sees it clear and gives up (3.1.1).
                Action::AcceptFeatures if !self.accept_features() => return false,
                Action::AcceptFeatures => {}
                Action::Activate => {
                    self.status = next | (self.status & !ALL_STAGES);
                    self.activate();
                    continue;
                }
            }
            self.status = next | (self.status & !ALL_STAGES);
        }
        false
    }

    /// Accepts the driver's features if the device offered them all and they include
    /// VIRTIO_F_VERSION_1, which a modern device requires (6.1).
    fn accept_features(&mut self) -> bool {
        let unoffered = self.driver_features & !self.offered;
        let version_1 = self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
        if unoffered != 0 || !version_1 {
            guest_log!(
                "{}: device type {} refuses driver features {:#x} (offered {:#x})",
                self.name,
                self.device_type,
                self.driver_features,
                self.offered
            );
            return false;
        }
        let accepted = self.driver_features;
        self.device().ack_features(accepted);
        true
    }

    /// DRIVER_OK: hands every queue to the device, in index order, as the driver left it.
    ///
    /// A queue the driver did not enable comes not ready (`Queue::ready()` is false) and the
    /// device leaves it alone: a driver need not enable queues it does not use (a multiqueue
    /// network driver using fewer pairs than offered still enables the control queue after
    /// them, 5.1.2), and the device sees each queue at its own index.
    fn activate(&mut self) {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut active = Vec::with_capacity(self.queues.len());
        for (index, config) in self.queues.iter().enumerate() {
            let queue = if config.ready {
                config.build(event_idx, &self.mem)
            } else {
                Queue::new(config.max_size).map_err(|e| format!("cannot exist: {e}"))
            };
            let queue = match queue {
                Ok(queue) => queue,
                Err(reason) => return self.needs_reset(&format!("queue {index} {reason}")),
            };
            let notify = match self.notify[index].try_clone() {
                Ok(notify) => notify,
                Err(e) => return self.needs_reset(&format!("queue {index} has no eventfd: {e}")),
            };
            active.push(ActiveQueue { queue, notify });
        }
        self.device_needs_reset = Arc::new(AtomicBool::new(false));
        let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(DeviceInterrupt {
            transport: self.interrupt.clone(),
            needs_reset: self.device_needs_reset.clone(),
        });
        let mem = self.mem.clone();
        let result = self.device().activate(mem, interrupt, active);
        match result {
            Ok(()) => self.activated = true,
            Err(e) => self.needs_reset(&format!("the device did not start: {e}")),
        }
    }

    /// Puts the device in DEVICE_NEEDS_RESET and, if the driver is running it, tells it with
    /// a configuration change interrupt (2.1.2).
    fn needs_reset(&mut self, reason: &str) {
        guest_log!(
            "{}: device type {} needs reset: {reason}",
            self.name,
            self.device_type
        );
        self.status |= DEVICE_NEEDS_RESET;
        if self.status & DRIVER_OK != 0 {
            if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
                guest_log!("{}: cannot signal the configuration change: {e}", self.name);
            }
        }
    }

    /// Device reset (2.4): back to the state after power-on. A device that cannot be reset is
    /// left running with DEVICE_NEEDS_RESET. Returns whether the reset happened.
    pub fn reset(&mut self) -> bool {
        if (self.status != 0 || self.activated) && !self.device().reset() {
            log::error!(
                "{}: device type {} cannot be reset",
                self.name,
                self.device_type
            );
            self.status |= DEVICE_NEEDS_RESET;
            return false;
        }
        self.status = 0;
        self.activated = false;
        self.device_needs_reset = Arc::new(AtomicBool::new(false));
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        true
    }

    /// A driver notification without an ioeventfd: forwards it to queue `index`'s eventfd.
    /// Returns false if there is no such queue.
    pub fn notify_queue(&self, index: u64) -> bool {
        let Some(evt) = usize::try_from(index).ok().and_then(|i| self.notify.get(i)) else {
            return false;
        };
        if let Err(e) = evt.write(1) {
            guest_log!("{}: cannot signal queue {index}: {e}", self.name);
        }
        true
    }
}

/// Page `select` (0 or 1) of a 64-bit feature word; later pages read 0.
pub fn feature_page(features: u64, select: u32) -> u32 {
    match select {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

/// Locks the device, recovering from a poisoned mutex (the event loop may have panicked while
/// holding it); the guest keeps running with the state the device was left in.
pub fn lock(device: &Mutex<dyn VirtioDevice>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|poisoned| {
        log::error!("a virtio device panicked earlier; using its state as it was left");
        device.clear_poison();
        poisoned.into_inner()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::features;
    use crate::ActivateError;

    const A: u8 = ACKNOWLEDGE;
    const D: u8 = DRIVER;
    const F: u8 = FEATURES_OK;
    const OK: u8 = DRIVER_OK;
    const OFFERED: u64 = features::VERSION_1 | 1 << 9;

    /// What the fake device saw.
    #[derive(Default)]
    struct Record {
        acked: Option<u64>,
        /// Per activation, each queue's size and descriptor table, `None` if not enabled.
        activations: Vec<Vec<Option<(u16, u64)>>>,
        interrupt: Option<Arc<dyn VirtioInterrupt>>,
        resets: usize,
    }

    struct Fake {
        record: Arc<Mutex<Record>>,
        fail_activation: bool,
        can_reset: bool,
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 16, 16]
        }
        fn features(&self) -> u64 {
            OFFERED | 1 << VIRTIO_F_RING_PACKED | 1 << VIRTIO_F_RING_RESET
        }
        fn ack_features(&mut self, features: u64) {
            self.record.lock().unwrap().acked = Some(features);
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            interrupt: Arc<dyn VirtioInterrupt>,
            queues: Vec<ActiveQueue>,
        ) -> Result<(), ActivateError> {
            if self.fail_activation {
                return Err(ActivateError::Backend("no backend".into()));
            }
            let mut record = self.record.lock().unwrap();
            let seen = queues
                .iter()
                .map(|q| {
                    q.queue
                        .ready()
                        .then(|| (q.queue.size(), q.queue.desc_table()))
                })
                .collect();
            record.activations.push(seen);
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

    /// The interrupts the core raised.
    #[derive(Default)]
    struct Interrupts(Mutex<Vec<InterruptKind>>);

    impl VirtioInterrupt for Interrupts {
        fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
            self.0.lock().unwrap().push(kind);
            Ok(())
        }
    }

    struct Harness {
        core: TransportCore,
        record: Arc<Mutex<Record>>,
        raised: Arc<Interrupts>,
    }

    fn harness_with(fail_activation: bool, can_reset: bool) -> Harness {
        let record = Arc::new(Mutex::new(Record::default()));
        let device = Arc::new(Mutex::new(Fake {
            record: record.clone(),
            fail_activation,
            can_reset,
        }));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let raised = Arc::new(Interrupts::default());
        let core = TransportCore::new("test", device, mem, raised.clone()).unwrap();
        Harness {
            core,
            record,
            raised,
        }
    }

    fn harness() -> Harness {
        harness_with(false, true)
    }

    fn write_features(core: &mut TransportCore, features: u64) {
        core.driver_feature_select = 0;
        core.write_driver_features(features as u32);
        core.driver_feature_select = 1;
        core.write_driver_features((features >> 32) as u32);
    }

    fn setup_queue(core: &mut TransportCore, index: u32, base: u64) {
        core.queue_select = index;
        let q = core.writable_queue().unwrap();
        q.size = 8;
        q.addresses = [base, base + 0x1000, base + 0x2000];
        q.ready = true;
    }

    /// Negotiates, enables the queues at `bases` (index, base), and sets DRIVER_OK.
    fn bring_up(core: &mut TransportCore, bases: &[(u32, u64)]) {
        write_features(core, OFFERED);
        core.write_status(A | D | F);
        for &(index, base) in bases {
            setup_queue(core, index, base);
        }
        core.write_status(A | D | F | OK);
    }

    #[test]
    fn status_transition_table() {
        use StatusChange::*;
        const A: u8 = ACKNOWLEDGE;
        const D: u8 = DRIVER;
        const F: u8 = FEATURES_OK;
        const OK: u8 = DRIVER_OK;
        let cases = [
            (0, A, Set(A)),
            (A, A | D, Set(A | D)),
            (A | D, A | D | F, FeaturesOk(A | D | F)),
            (A | D | F, A | D | F | OK, DriverOk(A | D | F | OK)),
            (A | D | F | OK, 0, Reset),
            (A | D, A | D, Set(A | D)),
            (A | D, A | D | FAILED, Failed(A | D | FAILED)),
            (0, FAILED, Failed(FAILED)),
            // Skipping a step, dropping a bit, or moving on after FAILED.
            (0, A | D, Invalid),
            (A, A | D | F, Invalid),
            (A | D, A | D | OK, Invalid),
            (A | D | F, A | F, Invalid),
            (A | D | F | OK, A | D | F, Invalid),
            (A | FAILED, A | D | FAILED, Invalid),
            (0, 0x10, Invalid),
        ];
        for (from, to, want) in cases {
            assert_eq!(next_status(from, to), want, "{from:#x} -> {to:#x}");
        }
    }

    #[test]
    fn several_stages_in_one_write_are_taken_in_order_and_a_skip_is_refused() {
        let mut h = harness();
        h.core.write_status(D);
        assert_eq!(h.core.status(), 0);
        h.core.write_status(A | F);
        assert_eq!(h.core.status(), 0);
        write_features(&mut h.core, OFFERED);
        h.core.write_status(A | D | F);
        assert_eq!(h.core.status(), A | D | F);
        assert_eq!(h.record.lock().unwrap().acked, Some(OFFERED));
        // Reserved bits make the write invalid.
        h.core.write_status(A | D | F | 0x10);
        assert_eq!(h.core.status(), A | D | F);
        // Dropping a bit is not a reset.
        h.core.write_status(A);
        assert_eq!(h.core.status(), A | D | F);
    }

    #[test]
    fn unsupported_features_are_hidden_and_refused() {
        let mut h = harness();
        assert_eq!(h.core.offered_features(), OFFERED);
        h.core.device_feature_select = 0;
        assert_eq!(h.core.device_features_page(), 1 << 9);
        h.core.device_feature_select = 1;
        assert_eq!(h.core.device_features_page(), 1);
        h.core.write_status(A | D);
        for refused in [
            OFFERED | 1 << VIRTIO_F_RING_PACKED,
            OFFERED | 1 << 3,
            1 << 9,
        ] {
            write_features(&mut h.core, refused);
            h.core.write_status(A | D | F);
            assert_eq!(h.core.status(), A | D, "{refused:#x}");
        }
        assert_eq!(h.record.lock().unwrap().acked, None);
        write_features(&mut h.core, features::VERSION_1);
        h.core.write_status(A | D | F);
        assert_eq!(h.core.status(), A | D | F);
        // Fixed from now on.
        write_features(&mut h.core, OFFERED);
        assert_eq!(h.core.driver_features(), features::VERSION_1);
    }

    #[test]
    fn activation_passes_every_queue_those_not_enabled_not_ready() {
        let mut h = harness();
        bring_up(&mut h.core, &[(0, 0x1_0000), (2, 0x3_0000)]);
        assert!(h.core.is_activated());
        assert_eq!(h.core.status(), A | D | F | OK);
        assert_eq!(
            h.record.lock().unwrap().activations,
            [vec![Some((8, 0x1_0000)), None, Some((8, 0x3_0000))]]
        );
        // Queues are fixed while the device runs.
        h.core.queue_select = 1;
        assert!(h.core.writable_queue().is_none());
        assert!(!h.core.disable_queue());
    }

    #[test]
    fn a_bad_queue_or_a_failed_start_sets_needs_reset_and_interrupts() {
        let mut h = harness();
        bring_up(&mut h.core, &[(0, 0xf_f000)]);
        assert!(!h.core.is_activated());
        assert_eq!(h.core.status(), A | D | F | OK | DEVICE_NEEDS_RESET);
        assert_eq!(*h.raised.0.lock().unwrap(), [InterruptKind::Config]);

        let mut h = harness_with(true, true);
        bring_up(&mut h.core, &[(0, 0x1_0000)]);
        assert_eq!(h.core.status(), A | D | F | OK | DEVICE_NEEDS_RESET);
        // Only a reset clears it.
        h.core.write_status(A | D | F | OK);
        assert_eq!(h.core.status(), A | D | F | OK | DEVICE_NEEDS_RESET);
        assert!(h.core.write_status(0));
        assert_eq!(h.core.status(), 0);
    }

    #[test]
    fn a_device_reporting_a_broken_queue_gets_needs_reset_until_the_driver_resets_it() {
        let mut h = harness();
        bring_up(&mut h.core, &[(0, 0x1_0000)]);
        let interrupt = h.record.lock().unwrap().interrupt.clone().unwrap();
        interrupt.set_needs_reset().unwrap();
        interrupt.set_needs_reset().unwrap();
        assert_eq!(h.core.status(), A | D | F | OK | DEVICE_NEEDS_RESET);
        // One configuration-change notification, however often the device reports it.
        assert_eq!(*h.raised.0.lock().unwrap(), [InterruptKind::Config]);
        // The driver echoing the status back changes nothing; FAILED is kept.
        h.core
            .write_status(A | D | F | OK | DEVICE_NEEDS_RESET | FAILED);
        assert_eq!(
            h.core.status(),
            A | D | F | OK | DEVICE_NEEDS_RESET | FAILED
        );

        assert!(h.core.write_status(0));
        assert_eq!(h.core.status(), 0);
        assert_eq!(h.record.lock().unwrap().resets, 1);
        // A late report from the old activation does not reach the new one.
        bring_up(&mut h.core, &[(0, 0x1_0000)]);
        interrupt.set_needs_reset().unwrap();
        assert_eq!(h.core.status(), A | D | F | OK);
        assert_eq!(h.record.lock().unwrap().activations.len(), 2);
    }

    #[test]
    fn reset_returns_to_power_on_and_a_device_that_cannot_reset_needs_reset() {
        let mut h = harness();
        // A fresh device is not bothered.
        assert!(h.core.write_status(0));
        assert_eq!(h.record.lock().unwrap().resets, 0);
        bring_up(&mut h.core, &[(0, 0x1_0000)]);
        h.core.device_feature_select = 1;
        assert!(h.core.write_status(0));
        assert_eq!(h.core.device_feature_select, 0);
        assert_eq!(h.core.driver_features(), 0);
        assert_eq!(h.core.selected_queue(), Some(&QueueConfig::new(16)));

        let mut h = harness_with(false, false);
        bring_up(&mut h.core, &[(0, 0x1_0000)]);
        assert!(!h.core.write_status(0));
        assert_eq!(h.core.status(), A | D | F | OK | DEVICE_NEEDS_RESET);
        assert!(h.core.is_activated());
    }

    #[test]
    fn notifications_reach_the_queue_eventfd() {
        let h = harness();
        assert!(h.core.notify_queue(2));
        assert!(!h.core.notify_queue(3));
        assert!(!h.core.notify_queue(u64::MAX));
        assert_eq!(h.core.notify_events()[2].read().unwrap(), 1);
        assert!(h.core.notify_events()[0].read().is_err());
    }

    #[test]
    fn devices_with_bad_queue_sizes_are_refused() {
        struct Bad;
        impl VirtioDevice for Bad {
            fn device_type(&self) -> u32 {
                4
            }
            fn queue_max_sizes(&self) -> Vec<u16> {
                vec![16, 0]
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
        let err = TransportCore::new(
            "test",
            Arc::new(Mutex::new(Bad)),
            mem,
            Arc::new(Interrupts::default()),
        )
        .err()
        .unwrap();
        assert!(matches!(err, CoreError::QueueSize { index: 1, size: 0 }));
    }
}
