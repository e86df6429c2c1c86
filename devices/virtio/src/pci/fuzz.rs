//! Fuzzing entry points for the PCI root bus and the virtio PCI transport, for cargo-fuzz
//! targets that are one-line wrappers and for replaying their findings in plain tests.
//!
//! Both play a stream of 6-byte records `[op, at, v0, v1, v2, v3]` (a trailing partial
//! record is ignored) against a virtio device with two queues behind a
//! [`VirtioPciTransport`] with MSI-X and INTx.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{IntxLine, VirtioPciTransport, BAR_SIZE};
use crate::{
    device_type, ActivateError, ActiveQueue, InterruptKind, VirtioDevice, VirtioInterrupt,
};
use bus::Bus;
use pci::testing::RecordingMsiController;
use pci::{PciDevice, PciRootBus};

/// Locks, recovering from a poisoned mutex (a fuzz run continues with the state as it was left).
fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const WIDTHS: [usize; 4] = [1, 2, 4, 8];

/// The interrupt the device was handed at activation, for device-side events.
type SharedInterrupt = Arc<Mutex<Option<Arc<dyn VirtioInterrupt>>>>;

/// A block-like device with two queues and 16 bytes of configuration; it refuses to start
/// with no queues so that the transport's failure path is reachable.
struct FuzzDevice {
    config: [u8; 16],
    interrupt: SharedInterrupt,
}

impl VirtioDevice for FuzzDevice {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16, 8]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX | 1
    }

    fn ack_features(&mut self, features: u64) {
        assert_eq!(features & !self.features(), 0, "unoffered features acked");
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *byte = at.and_then(|at| self.config.get(at)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(b) = at.and_then(|at| self.config.get_mut(at)) {
                *b = byte;
            }
        }
    }

    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        assert!(queues.len() <= 2);
        if queues.is_empty() {
            return Err(ActivateError::QueueCount { got: 0, want: 1 });
        }
        *lock(&self.interrupt) = Some(interrupt);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        *lock(&self.interrupt) = None;
        true
    }
}

/// The transport under test, with its interrupt handle and device-side interrupt slot.
fn transport() -> Option<(VirtioPciTransport, SharedInterrupt)> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).ok()?;
    let intx = EventFd::new(libc::EFD_NONBLOCK).ok()?;
    let interrupt: SharedInterrupt = Arc::new(Mutex::new(None));
    let device = FuzzDevice {
        config: [0; 16],
        interrupt: interrupt.clone(),
    };
    let transport = VirtioPciTransport::new(
        Arc::new(Mutex::new(device)),
        mem,
        Some(Arc::new(RecordingMsiController::default())),
        Some(IntxLine { irq: 5, evt: intx }),
    )
    .ok()?;
    Some((transport, interrupt))
}

/// A device-side event: the device raises its configuration or a queue interrupt.
fn device_event(interrupt: &SharedInterrupt, arg: u8) {
    let handle = lock(interrupt).clone();
    if let Some(handle) = handle {
        let kind = match arg % 3 {
            0 => InterruptKind::Config,
            n => InterruptKind::Queue(u16::from(n - 1)),
        };
        // Delivery failures (a full eventfd) are the device's to log.
        let _ = handle.trigger(kind);
    }
}

/// Configuration mechanism #1 accesses against a root bus holding the virtio function in slot
/// 1, on a port bus at 0xcf8.
///
/// - `op & 1`: 0 = read, 1 = write; `(op >> 1) & 3` picks 1, 2, 4 or 8 bytes;
/// - `op & 0x08`: instead, write CONFIG_ADDRESS as enabled, slot `v0 % 4`, register `v1 % 64`;
/// - `op == 0xff`: instead, a device-side interrupt (`v0` picks which);
/// - the port is `0xcf7 + at % 10`, so accesses also land just outside the ports.
pub fn fuzz_pci_config(input: &[u8]) {
    let Some((transport, interrupt)) = transport() else {
        return;
    };
    let Ok(mut root) = PciRootBus::new(0xc000_0000, 0x100_0000) else {
        return;
    };
    let transport = Arc::new(Mutex::new(transport));
    if root.add_device(transport.clone()).is_err() {
        return;
    }
    root.set_bar_move_handler(Box::new(|_, mv| {
        assert_eq!(mv.new % mv.size, 0, "BAR moved to an unaligned address");
        assert_ne!(mv.old, mv.new);
    }));
    let bus = Bus::new();
    if bus
        .insert(
            Arc::new(Mutex::new(root)),
            PciRootBus::PORT_BASE,
            PciRootBus::PORT_LEN,
        )
        .is_err()
    {
        return;
    }
    for record in input.chunks_exact(6) {
        let &[op, at, v0, v1, v2, v3] = record else {
            continue;
        };
        if op == 0xff {
            device_event(&interrupt, v0);
            continue;
        }
        if op & 0x08 != 0 {
            let address = 1u32 << 31 | u32::from(v0 % 4) << 11 | u32::from(v1 % 64) << 2;
            bus.write(PciRootBus::PORT_BASE, &address.to_le_bytes());
            continue;
        }
        let port = PciRootBus::PORT_BASE - 1 + u64::from(at % 10);
        let width = WIDTHS[usize::from((op >> 1) & 3)];
        if op & 1 == 0 {
            let mut data = [0u8; 8];
            let claimed = bus.read(port, &mut data[..width]);
            assert!(claimed || data[..width].iter().all(|&b| b == 0xff));
        } else {
            bus.write(port, &[v0, v1, v2, v3, v0, v1, v2, v3][..width]);
        }
    }
}

/// Register accesses against the transport directly, with memory decode on at the start.
///
/// - `op & 1`: 0 = read, 1 = write; `(op >> 1) & 3` picks 1, 2, 4 or 8 bytes;
/// - `(op >> 3) & 7` picks the target and how `at` is used: 0 common configuration
///   (`at % 0x40`), 1 ISR (`at % 4`), 2 device configuration (`at`), 3 notifications
///   (`at % 16`), 4 MSI-X table (`at % 0x40`), 5 PBA (`at % 16`), 6 configuration space
///   (register `at % 64`, byte `op >> 6`), 7 anywhere in BAR 0 (`at | v3 << 8`);
/// - `op == 0xff`: instead, a device-side interrupt (`v0` picks which).
pub fn fuzz_virtio_pci(input: &[u8]) {
    play_virtio(input);
}

/// [`fuzz_virtio_pci`], returning the transport as the stream left it.
fn play_virtio(input: &[u8]) -> Option<(VirtioPciTransport, SharedInterrupt)> {
    let (mut transport, interrupt) = transport()?;
    // Memory decode on, as the guest's PCI core leaves it.
    transport.write_config_register(1, 0, &[0x06, 0x00]);
    for record in input.chunks_exact(6) {
        let &[op, at, v0, v1, v2, v3] = record else {
            continue;
        };
        if op == 0xff {
            device_event(&interrupt, v0);
            continue;
        }
        let width = WIDTHS[usize::from((op >> 1) & 3)];
        let data = &[v0, v1, v2, v3, v0, v1, v2, v3][..width];
        let at = u64::from(at);
        let offset = match (op >> 3) & 7 {
            0 => at % 0x40,
            1 => 0x1000 + at % 4,
            2 => 0x2000 + at,
            3 => 0x3000 + at % 16,
            4 => 0x4000 + at % 0x40,
            5 => 0x5000 + at % 16,
            6 => {
                let reg = (at % 64) as usize;
                let byte = u64::from(op >> 6);
                if op & 1 == 0 {
                    let _ = transport.read_config_register(reg);
                } else {
                    let _ = transport.write_config_register(reg, byte, &data[..width.min(4)]);
                }
                continue;
            }
            _ => (at | u64::from(v3) << 8) % BAR_SIZE,
        };
        if op & 1 == 0 {
            let mut buf = [0u8; 8];
            transport.read_bar(0, offset, &mut buf[..width]);
        } else {
            transport.write_bar(0, offset, data);
        }
    }
    Some((transport, interrupt))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (64-bit LCG, high bytes).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (state >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn pci_survives_random_streams() {
        for seed in 0..4 {
            fuzz_pci_config(&noise(48 << 10, seed));
            fuzz_virtio_pci(&noise(48 << 10, seed));
        }
    }

    #[test]
    fn short_and_empty_inputs() {
        for input in [&[][..], &[1], &[0xff, 0, 0, 0, 0]] {
            fuzz_pci_config(input);
            fuzz_virtio_pci(input);
        }
    }

    /// A driver's whole bring-up through the fuzz encoding, ending with the device started
    /// and interrupting, so the stream format reaches deep state.
    #[test]
    fn virtio_stream_reaches_activation() {
        // (op, at, value): writes of 1 (op 1), 2 (op 3) or 4 (op 5) bytes to the common
        // configuration.
        let mut input = Vec::new();
        let mut write = |op: u8, at: u8, value: u32| {
            let [v0, v1, v2, v3] = value.to_le_bytes();
            input.extend([op, at, v0, v1, v2, v3]);
        };
        write(1, 0x14, 1);
        write(1, 0x14, 3);
        write(5, 0x08, 1);
        write(5, 0x0c, 1);
        write(1, 0x14, 0xb);
        write(5, 0x20, 0x1000);
        write(5, 0x28, 0x2000);
        write(5, 0x30, 0x3000);
        write(3, 0x1c, 1);
        write(1, 0x14, 0xf);
        input.extend([0xff, 0, 0, 0, 0, 0]);
        input.extend([0xff, 1, 0, 0, 0, 0]);
        let (transport, interrupt) = play_virtio(&input).unwrap();
        assert!(transport.is_activated());
        assert_eq!(transport.device_status(), 0xf);
        assert!(lock(&interrupt).is_some());
    }
}
