//! The I/O bus of a virtual machine monitor, and what every device on it shares.
//!
//! - [`Bus`]: maps guest address ranges (port I/O or MMIO) to [`BusDevice`]s.
//! - [`ratelimit`]: [`guest_log!`], the rate-limited log line for anything a guest can cause.
//! - [`metrics`]: [`DeviceMetrics`](metrics::DeviceMetrics), the counters a device keeps for the
//!   VMM's metrics.
//!
//! Nothing here knows of KVM: a vCPU thread hands the bus the address and data of an exit.
//!
//! # The bus
//!
//! Modelled on the device bus described in crosvm's `ARCHITECTURE.md`: devices are looked up by
//! the greatest base address at or below the accessed address, each device sits behind its own
//! mutex so that vCPUs touching different devices never contend, and reads are zero-filled
//! before dispatch so that a device which fills less than the whole buffer returns zeroes rather
//! than stale bytes. An address no device claims reads as all ones, as an undriven ISA or PCI
//! bus does on real hardware.
//!
//! The bus is built before the vCPUs start and then shared (`Arc<Bus>`). Its map sits behind a
//! read-write lock because a guest may move a device at run time (a PCI BAR write): every access
//! takes the read lock just long enough to find the device, and releases it before the device's
//! own mutex is taken, so a move never waits on a slow device access and vice versa.

#![warn(missing_docs)]

pub mod metrics;
pub mod ratelimit;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A device on the port-I/O or MMIO bus. `offset` is relative to the base it was inserted at.
///
/// Every access comes from the guest: implementations must never panic on any offset or length
/// the bus lets through (any `offset < len` of the inserted range, any `data.len()` that fits).
pub trait BusDevice: Send {
    /// Fills `data` with the device's answer to a read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why [`Bus::insert`] rejected a range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty.
    #[error("the range at {base:#x} has zero length")]
    ZeroLength {
        /// Base of the rejected range.
        base: u64,
    },
    /// The range runs past the top of the address space.
    #[error("the range at {base:#x} with length {len:#x} runs past the end of the address space")]
    Wraps {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The range overlaps one already on the bus.
    #[error(
        "the range at {base:#x} with length {len:#x} overlaps the device at {existing_base:#x} \
         with length {existing_len:#x}"
    )]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Base of the range already on the bus.
        existing_base: u64,
        /// Length of the range already on the bus.
        existing_len: u64,
    },
}

/// One device's place on the bus.
struct BusRange {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Routes accesses to the device whose range contains them.
#[derive(Default)]
pub struct Bus {
    /// Keyed by base address; ranges never overlap.
    ranges: RwLock<BTreeMap<u64, BusRange>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    // A panic while the lock is held cannot leave the map half-changed (every change is one
    // BTreeMap call), so a poisoned lock is used as it is.
    fn map(&self) -> RwLockReadGuard<'_, BTreeMap<u64, BusRange>> {
        self.ranges.read().unwrap_or_else(|e| e.into_inner())
    }

    fn map_mut(&self) -> RwLockWriteGuard<'_, BTreeMap<u64, BusRange>> {
        self.ranges.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Places `dev` at `[base, base + len)`.
    ///
    /// Rejects len 0, ranges that wrap, and overlaps with an existing range. A range may end at
    /// the very top of the address space (its last byte is `u64::MAX`). Usable while the bus is
    /// shared, to move a device the guest relocated.
    pub fn insert(
        &self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let last = base
            .checked_add(len - 1)
            .ok_or(BusError::Wraps { base, len })?;
        let mut ranges = self.map_mut();
        // Ranges are disjoint, so if any range overlaps [base, last], the one with the greatest
        // base at or below `last` does.
        if let Some((&existing_base, existing)) = ranges.range(..=last).next_back() {
            // `existing.len >= 1` and did not wrap when it was inserted.
            let existing_last = existing_base + (existing.len - 1);
            if existing_last >= base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    existing_base,
                    existing_len: existing.len,
                });
            }
        }
        ranges.insert(base, BusRange { len, device: dev });
        Ok(())
    }

    /// Takes the range that starts at `base` off the bus: its device and length, or None if no
    /// range starts there.
    pub fn remove(&self, base: u64) -> Option<(Arc<Mutex<dyn BusDevice>>, u64)> {
        self.map_mut()
            .remove(&base)
            .map(|range| (range.device, range.len))
    }

    /// Finds the device whose range holds all of `[addr, addr + len)`, with the offset of `addr`
    /// inside that range.
    fn resolve(&self, addr: u64, len: usize) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let ranges = self.map();
        let (&base, range) = ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(u64::try_from(len).ok()?)?;
        (end <= range.len).then(|| (offset, range.device.clone()))
    }

    /// Reads `data.len()` bytes at `addr` from the device whose range contains
    /// `[addr, addr + data.len())`, and returns true.
    ///
    /// Reads of unclaimed addresses, accesses that straddle the end of a range and empty
    /// accesses fill `data` with 0xff and return false.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) if !data.is_empty() => {
                data.fill(0);
                lock_device(&device, addr).read(offset, data);
                true
            }
            _ => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes `data` at `addr` to the device whose range contains `[addr, addr + data.len())`,
    /// and returns true. Writes to unclaimed addresses, straddling writes and empty writes are
    /// dropped and return false.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) if !data.is_empty() => {
                lock_device(&device, addr).write(offset, data);
                true
            }
            _ => false,
        }
    }
}

/// Locks a device, recovering from a poisoned mutex: a device that panicked once must not take
/// every later vCPU access down with it. The poison is cleared so the error is logged once per
/// panic rather than once per access.
fn lock_device(
    device: &Mutex<dyn BusDevice>,
    addr: u64,
) -> MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|poisoned| {
        log::error!("the device at {addr:#x} panicked earlier; using its state as it was left");
        device.clear_poison();
        poisoned.into_inner()
    })
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.map()
                    .iter()
                    .map(|(base, range)| format!("{base:#x}+{:#x}", range.len)),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last access and answers reads with `offset + i` in byte `i`, up to `fill`
    /// bytes.
    #[derive(Default)]
    struct Probe {
        fill: usize,
        last_write: Option<(u64, Vec<u8>)>,
        last_read: Option<(u64, usize)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.last_read = Some((offset, data.len()));
            for (i, byte) in data.iter_mut().take(self.fill).enumerate() {
                *byte = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn probe(fill: usize) -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe {
            fill,
            ..Default::default()
        }))
    }

    #[test]
    fn insert_rejects_zero_length_wrap_and_overlap() {
        let bus = Bus::new();
        bus.insert(probe(0), 0x3f8, 8).unwrap();

        assert_eq!(
            bus.insert(probe(0), 0x100, 0),
            Err(BusError::ZeroLength { base: 0x100 })
        );
        assert_eq!(
            bus.insert(probe(0), u64::MAX, 2),
            Err(BusError::Wraps {
                base: u64::MAX,
                len: 2
            })
        );
        let overlap = |base, len| BusError::Overlap {
            base,
            len,
            existing_base: 0x3f8,
            existing_len: 8,
        };
        // Overlapping the start, the end, inside, and enclosing.
        assert_eq!(bus.insert(probe(0), 0x3f0, 9), Err(overlap(0x3f0, 9)));
        assert_eq!(bus.insert(probe(0), 0x3ff, 1), Err(overlap(0x3ff, 1)));
        assert_eq!(bus.insert(probe(0), 0x3fa, 2), Err(overlap(0x3fa, 2)));
        assert_eq!(
            bus.insert(probe(0), 0x300, 0x200),
            Err(overlap(0x300, 0x200))
        );
    }

    #[test]
    fn insert_accepts_adjacent_ranges_and_the_top_byte() {
        let bus = Bus::new();
        bus.insert(probe(0), 0x3f8, 8).unwrap();
        bus.insert(probe(0), 0x3f0, 8).unwrap();
        bus.insert(probe(0), 0x400, 1).unwrap();
        bus.insert(probe(0), u64::MAX, 1).unwrap();
        bus.insert(probe(0), u64::MAX - 0xf, 0x10 - 1).unwrap();
        assert_eq!(
            format!("{bus:?}"),
            "[\"0x3f0+0x8\", \"0x3f8+0x8\", \"0x400+0x1\", \"0xfffffffffffffff0+0xf\", \
             \"0xffffffffffffffff+0x1\"]"
        );
    }

    #[test]
    fn read_routes_with_offset_and_zero_fills() {
        let dev = probe(1);
        let bus = Bus::new();
        bus.insert(dev.clone(), 0x60, 5).unwrap();

        let mut data = [0xaa; 4];
        assert!(bus.read(0x61, &mut data));

        // The device filled one byte (its offset); the rest was zeroed by the bus.
        assert_eq!(data, [1, 0, 0, 0]);
        assert_eq!(dev.lock().unwrap().last_read, Some((1, 4)));
    }

    #[test]
    fn write_routes_with_offset() {
        let dev = probe(0);
        let bus = Bus::new();
        bus.insert(dev.clone(), 0xd000_0000, 0x1000).unwrap();

        assert!(bus.write(0xd000_0ffc, &[1, 2, 3, 4]));

        assert_eq!(
            dev.lock().unwrap().last_write,
            Some((0xffc, vec![1, 2, 3, 4]))
        );
    }

    #[test]
    fn unclaimed_and_straddling_accesses_read_all_ones() {
        let dev = probe(8);
        let bus = Bus::new();
        bus.insert(dev.clone(), 0x70, 2).unwrap();

        let mut data = [0u8; 2];
        assert!(!bus.read(0x6f, &mut data), "below the range");
        assert_eq!(data, [0xff, 0xff]);
        data = [0; 2];
        assert!(!bus.read(0x71, &mut data), "straddles the end");
        assert_eq!(data, [0xff, 0xff]);
        data = [0; 2];
        assert!(!bus.read(0x72, &mut data), "just past the end");
        assert_eq!(data, [0xff, 0xff]);
        let mut top = [0u8; 8];
        assert!(!bus.read(u64::MAX - 3, &mut top), "past the address space");
        assert_eq!(top, [0xff; 8]);

        assert!(!bus.write(0x71, &[1, 2]));
        assert!(!bus.write(0x72, &[1]));
        assert!(!bus.write(0x70, &[]));
        let dev = dev.lock().unwrap();
        assert_eq!(dev.last_write, None);
        assert_eq!(dev.last_read, None);
    }

    #[test]
    fn empty_bus_reads_all_ones() {
        let bus = Bus::new();
        let mut data = [0u8; 4];
        assert!(!bus.read(0, &mut data));
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn poisoned_device_is_recovered() {
        struct Panicky(u8);
        impl BusDevice for Panicky {
            fn read(&mut self, _offset: u64, data: &mut [u8]) {
                data[0] = self.0;
            }
            fn write(&mut self, _offset: u64, data: &[u8]) {
                self.0 = data[0];
                if self.0 == 0xee {
                    panic!("device bug");
                }
            }
        }
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Panicky(0))), 0x80, 1)
            .unwrap();
        let bus = Arc::new(bus);

        let worker = Arc::clone(&bus);
        let result = std::thread::spawn(move || worker.write(0x80, &[0xee])).join();
        assert!(result.is_err(), "the write panicked its thread");

        // Later accesses neither panic nor lose the state the device was left in.
        let mut data = [0u8];
        assert!(bus.read(0x80, &mut data));
        assert_eq!(data, [0xee]);
        assert!(bus.write(0x80, &[0x12]));
        assert!(bus.read(0x80, &mut data));
        assert_eq!(data, [0x12]);
    }

    #[test]
    fn a_shared_bus_moves_a_device() {
        let dev = probe(4);
        let bus = Arc::new(Bus::new());
        bus.insert(dev.clone(), 0x1000, 0x100).unwrap();
        let other = probe(4);
        bus.insert(other, 0x3000, 0x100).unwrap();

        let (moved, len) = bus.remove(0x1000).expect("the range at 0x1000");
        assert_eq!(len, 0x100);
        assert!(bus.remove(0x1000).is_none());
        let mut data = [0u8; 1];
        assert!(
            !bus.read(0x1000, &mut data),
            "nothing decodes the old range"
        );
        // A move onto another device is refused and leaves the device off the bus.
        assert!(matches!(
            bus.insert(moved.clone(), 0x2f80, 0x100),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(moved, 0x2000, 0x100).unwrap();
        assert!(bus.write(0x2004, &[9]));
        assert_eq!(dev.lock().unwrap().last_write, Some((4, vec![9])));
    }

    #[test]
    fn bus_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Bus>();
    }
}
