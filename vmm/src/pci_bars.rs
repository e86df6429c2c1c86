//! Carrying out the guest's PCI BAR moves.
//!
//! An OS may place a device's memory BARs somewhere other than where the VMM put them (Linux
//! with `pci=realloc`, hot-plug, a firmware-less guest that assigns resources itself). A BAR
//! decodes wherever its register says (PCI Local Bus 3.0, section 6.2.5.1), so each move takes the
//! BAR's range off the MMIO bus, re-registers the queue-notify ioeventfds that live inside it, and
//! puts it back at the new address. A BAR moved onto guest RAM, the IOAPIC or LAPIC page, or another
//! device stops decoding (reads of it return all ones, as on a bus where nobody answers) until
//! the guest moves it somewhere free; nothing the guest writes can make one device shadow another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bus::{Bus, BusDevice};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use pci::{BarMove, PciBarRange};
use vmm_sys_util::eventfd::EventFd;

/// A queue-notify ioeventfd inside a BAR, at `offset` from the BAR's base.
pub struct BarIoEvent {
    /// Offset of the notify address inside the BAR.
    pub offset: u64,
    /// The transport's eventfd (a duplicate of it: KVM knows an ioeventfd by its file).
    pub fd: EventFd,
}

/// One memory BAR the guest may move.
struct MovableBar {
    device: Arc<Mutex<dyn BusDevice>>,
    size: u64,
    /// Where the BAR decodes now; None while the guest has put it where it cannot decode.
    at: Option<u64>,
    ioevents: Vec<BarIoEvent>,
}

/// What KVM must do when an ioeventfd moves; a trait so that the move logic is testable without
/// a VM.
pub trait IoEventRegistry: Send {
    /// Starts signalling `fd` on writes to `addr`.
    fn register(&self, fd: &EventFd, addr: u64) -> std::io::Result<()>;
    /// Stops signalling `fd` on writes to `addr`.
    fn unregister(&self, fd: &EventFd, addr: u64) -> std::io::Result<()>;
}

impl IoEventRegistry for Arc<VmFd> {
    fn register(&self, fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
    fn unregister(&self, fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// The BARs of every PCI device and where they decode, kept in step with the guest's writes.
pub struct BarMover {
    ioevents: Box<dyn IoEventRegistry>,
    mmio: Arc<Bus>,
    /// `[start, end)` ranges no BAR may cover: guest RAM and the in-kernel IOAPIC and LAPIC.
    reserved: Vec<(u64, u64)>,
    bars: HashMap<(u8, u8), MovableBar>,
    /// Moves so far: the guest decides how many there are, so only the 1st, 2nd, 4th, 8th, ...
    /// is logged.
    moves: u64,
}

impl BarMover {
    /// A mover for BARs on `mmio`; `reserved` lists the `[start, end)` ranges a BAR must not
    /// cover.
    pub fn new(
        ioevents: Box<dyn IoEventRegistry>,
        mmio: Arc<Bus>,
        reserved: Vec<(u64, u64)>,
    ) -> Self {
        Self {
            ioevents,
            mmio,
            reserved,
            bars: HashMap::new(),
            moves: 0,
        }
    }

    /// Records BAR `bar` of the device in `slot`, already on the bus at `bar.addr` as `device`,
    /// with the ioeventfds inside it.
    pub fn add_bar(
        &mut self,
        slot: u8,
        bar: &PciBarRange,
        device: Arc<Mutex<dyn BusDevice>>,
        ioevents: Vec<BarIoEvent>,
    ) {
        self.bars.insert(
            (slot, bar.index),
            MovableBar {
                device,
                size: bar.size,
                at: Some(bar.addr),
                ioevents,
            },
        );
    }

    /// Where BAR `bar` of `slot` decodes now.
    pub fn address(&self, slot: u8, bar: u8) -> Option<u64> {
        self.bars.get(&(slot, bar)).and_then(|b| b.at)
    }

    /// Carries out the guest's move of a BAR of the device in `slot`.
    pub fn apply(&mut self, slot: u8, bar_move: &BarMove) {
        let Some(bar) = self.bars.get_mut(&(slot, bar_move.bar)) else {
            return;
        };
        self.moves = self.moves.saturating_add(1);
        let logged = self.moves.is_power_of_two().then_some(self.moves);
        if let Some(old) = bar.at.take() {
            for ev in &bar.ioevents {
                if let Err(e) = self.ioevents.unregister(&ev.fd, old + ev.offset) {
                    log::warn!(
                        "cannot remove a queue notification at {:#x}: {e}",
                        old + ev.offset
                    );
                }
            }
            self.mmio.remove(old);
        }
        let new = bar_move.new;
        let fits = new.checked_add(bar.size).is_some_and(|end| {
            new.checked_rem(bar.size) == Some(0) && !overlaps(&self.reserved, new, end)
        });
        let placed = fits && self.mmio.insert(bar.device.clone(), new, bar.size).is_ok();
        if !placed {
            if let Some(n) = logged {
                log::warn!(
                    "PCI device {slot} BAR {} at {new:#x} would overlap RAM or another device, or \
                     is not aligned to its size: it stops decoding until the guest moves it \
                     elsewhere (BAR move {n})",
                    bar_move.bar,
                );
            }
            return;
        }
        let mut registered = true;
        for ev in &bar.ioevents {
            if let Err(e) = self.ioevents.register(&ev.fd, new + ev.offset) {
                log::warn!(
                    "cannot add a queue notification at {:#x}: {e}",
                    new + ev.offset
                );
                registered = false;
            }
        }
        bar.at = Some(new);
        if let Some(n) = logged {
            log::info!(
                "PCI device {slot} BAR {} moved from {:#x} to {new:#x}{} (BAR move {n})",
                bar_move.bar,
                bar_move.old,
                if registered {
                    ""
                } else {
                    " without some of its queue notifications"
                },
            );
        }
    }
}

/// Whether `[start, end)` overlaps any of `ranges`.
fn overlaps(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    ranges.iter().any(|&(s, e)| start < e && s < end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps the set of (eventfd, address) registrations as KVM would.
    #[derive(Clone, Default)]
    struct Registry(Arc<Mutex<Vec<u64>>>);

    impl IoEventRegistry for Registry {
        fn register(&self, _fd: &EventFd, addr: u64) -> std::io::Result<()> {
            let mut regs = self.0.lock().unwrap();
            if regs.contains(&addr) {
                return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
            }
            regs.push(addr);
            Ok(())
        }
        fn unregister(&self, _fd: &EventFd, addr: u64) -> std::io::Result<()> {
            let mut regs = self.0.lock().unwrap();
            let at = regs
                .iter()
                .position(|&a| a == addr)
                .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))?;
            regs.remove(at);
            Ok(())
        }
    }

    /// Answers every read with 0x5a.
    struct Bar;
    impl BusDevice for Bar {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0x5a);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    const RAM_END: u64 = 0xc000_0000;

    fn mover() -> (BarMover, Arc<Bus>, Registry) {
        let bus = Arc::new(Bus::new());
        let registry = Registry::default();
        let mut mover = BarMover::new(
            Box::new(registry.clone()),
            bus.clone(),
            vec![(0, RAM_END), (0xfec0_0000, 0xfec0_1000)],
        );
        let device: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Bar));
        bus.insert(device.clone(), 0xc000_0000, 0x8000).unwrap();
        let other: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Bar));
        bus.insert(other, 0xc001_0000, 0x8000).unwrap();
        let bar = PciBarRange {
            index: 0,
            addr: 0xc000_0000,
            size: 0x8000,
            kind: pci::BarKind::Memory64,
        };
        let fd = EventFd::new(0).unwrap();
        registry.register(&fd, 0xc000_3000).unwrap();
        let ioevents = vec![BarIoEvent { offset: 0x3000, fd }];
        mover.add_bar(1, &bar, device, ioevents);
        (mover, bus, registry)
    }

    fn moved(old: u64, new: u64) -> BarMove {
        BarMove {
            bar: 0,
            old,
            new,
            size: 0x8000,
        }
    }

    fn reads(bus: &Bus, addr: u64) -> bool {
        let mut data = [0u8; 4];
        bus.read(addr, &mut data) && data == [0x5a; 4]
    }

    #[test]
    fn a_moved_bar_decodes_and_notifies_at_its_new_address_only() {
        let (mut mover, bus, registry) = mover();
        mover.apply(1, &moved(0xc000_0000, 0xe000_0000));
        assert_eq!(mover.address(1, 0), Some(0xe000_0000));
        assert!(reads(&bus, 0xe000_0004));
        assert!(!reads(&bus, 0xc000_0004));
        assert_eq!(*registry.0.lock().unwrap(), vec![0xe000_3000]);
    }

    #[test]
    fn a_bar_moved_onto_ram_another_device_or_unaligned_stops_decoding_until_moved_again() {
        for bad in [
            0x1000_0000,
            0xc001_0000,
            0xc001_4000,
            0xe000_1000,
            0xfec0_0000,
        ] {
            let (mut mover, bus, registry) = mover();
            mover.apply(1, &moved(0xc000_0000, bad));
            assert_eq!(mover.address(1, 0), None, "{bad:#x}");
            assert!(!reads(&bus, 0xc000_0004), "{bad:#x}");
            assert!(registry.0.lock().unwrap().is_empty(), "{bad:#x}");
            // The other device still answers at its own address.
            assert!(reads(&bus, 0xc001_0004));

            mover.apply(1, &moved(bad, 0xd800_0000));
            assert_eq!(mover.address(1, 0), Some(0xd800_0000));
            assert!(reads(&bus, 0xd800_0000));
            assert_eq!(*registry.0.lock().unwrap(), vec![0xd800_3000]);
        }
    }

    #[test]
    fn a_bar_that_would_wrap_stops_decoding() {
        let (mut mover, bus, _) = mover();
        // Aligned, but its end would be 2^64.
        mover.apply(1, &moved(0xc000_0000, u64::MAX - 0x7fff));
        assert_eq!(mover.address(1, 0), None);
        assert!(!reads(&bus, 0xc000_0000));
    }

    #[test]
    fn moves_of_unknown_bars_are_ignored() {
        let (mut mover, bus, _) = mover();
        mover.apply(7, &moved(0xc000_0000, 0xe000_0000));
        let mut other = moved(0xc000_0000, 0xe000_0000);
        other.bar = 2;
        mover.apply(1, &other);
        assert!(reads(&bus, 0xc000_0000));
        assert_eq!(mover.address(1, 0), Some(0xc000_0000));
    }
}
