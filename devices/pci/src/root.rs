//! The root bus: configuration mechanism #1 (PCI Local Bus Specification 3.0, section
//! 3.2.2.3.2), a host bridge at 00:00.0, and BAR allocation from the VMM's PCI MMIO window.
//!
//! Port 0xcf8 is the CONFIG_ADDRESS register (dword accesses only: enable bit 31, bus 23:16,
//! device 15:11, function 10:8, register 7:2); ports 0xcfc..0xcff are the CONFIG_DATA window
//! onto the addressed register, in byte, word or dword accesses that stay inside it. Only
//! function 0 of each slot on bus 0 exists; everything else reads all-ones, as an empty slot
//! does on real hardware, which is how Linux's bus scan tells it is empty.

use std::sync::{Arc, Mutex};

use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use super::config::{PciConfigSpace, PciHeader};
use super::{lock, BarMove, PciBarRange, PciDevice, PciError, SLOTS};
use bus::BusDevice;

/// Host bridge vendor: Intel.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
/// Host bridge device: the ID Cloud Hypervisor also uses for its virtual host bridge, which
/// no Linux quirk matches.
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;

const CONFIG_ENABLE: u32 = 1 << 31;
/// The CONFIG_ADDRESS bits that hold state: enable, bus, device, function, register. Bits
/// 30:24 and 1:0 are reserved and read zero.
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;
/// Offset of CONFIG_DATA from CONFIG_ADDRESS.
const DATA_OFFSET: u64 = 4;

/// Called with the slot and the move when the guest reprograms a BAR.
pub type BarMoveHandler = Box<dyn FnMut(u8, &BarMove) + Send>;

/// PCI bus 0 behind configuration mechanism #1.
pub struct PciRootBus {
    /// CONFIG_ADDRESS as the guest last wrote it (masked).
    address: u32,
    /// Slot 0 holds the host bridge.
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
    allocator: AddressAllocator,
    on_bar_move: Option<BarMoveHandler>,
}

impl PciRootBus {
    /// CONFIG_ADDRESS port.
    pub const PORT_BASE: u64 = 0xcf8;
    /// CONFIG_ADDRESS and CONFIG_DATA together.
    pub const PORT_LEN: u64 = 8;

    /// A bus with only the host bridge, allocating BARs from `[mmio_base, mmio_base +
    /// mmio_size)`.
    pub fn new(mmio_base: u64, mmio_size: u64) -> Result<Self, PciError> {
        let allocator =
            AddressAllocator::new(mmio_base, mmio_size).map_err(|source| PciError::Window {
                base: mmio_base,
                size: mmio_size,
                source,
            })?;
        let mut slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())));
        Ok(Self {
            address: 0,
            slots,
            allocator,
            on_bar_move: None,
        })
    }

    /// Puts `device` in the first free slot, places its BARs in the MMIO window (each aligned
    /// to its size), and returns the slot and the BARs as placed.
    pub fn add_device(
        &mut self,
        device: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<(u8, Vec<PciBarRange>), PciError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::BusFull)?;
        let mut bars = lock(&device).bars();
        // Largest first keeps the window unfragmented.
        bars.sort_by_key(|bar| std::cmp::Reverse(bar.size));
        let mut placed: Vec<RangeInclusive> = Vec::new();
        let result = self.place_bars(&device, &mut bars, &mut placed);
        if let Err(e) = result {
            for range in &placed {
                // The range was just allocated, so freeing it cannot fail.
                let _ = self.allocator.free(range);
            }
            return Err(e);
        }
        bars.sort_by_key(|bar| bar.index);
        self.slots[slot] = Some(device);
        Ok((slot as u8, bars))
    }

    fn place_bars(
        &mut self,
        device: &Mutex<dyn PciDevice>,
        bars: &mut [PciBarRange],
        placed: &mut Vec<RangeInclusive>,
    ) -> Result<(), PciError> {
        for bar in bars.iter_mut() {
            let range = self
                .allocator
                .allocate(bar.size, bar.size, AllocPolicy::FirstMatch)
                .map_err(|source| PciError::OutOfSpace {
                    index: bar.index,
                    size: bar.size,
                    source,
                })?;
            placed.push(range);
            lock(device).set_bar_address(bar.index, range.start())?;
            bar.addr = range.start();
        }
        Ok(())
    }

    /// The device in `slot`, the host bridge in slot 0.
    pub fn device(&self, slot: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        self.slots.get(usize::from(slot))?.clone()
    }

    /// Sets what to do when the guest moves a BAR. Without a handler, moves are logged and
    /// the BAR stays where the VMM mapped it.
    pub fn set_bar_move_handler(&mut self, handler: BarMoveHandler) {
        self.on_bar_move = Some(handler);
    }

    /// The slot and register CONFIG_ADDRESS selects, if it is enabled and names function 0
    /// of a slot on bus 0.
    fn selected(&self) -> Option<(u8, usize)> {
        let a = self.address;
        let bus = (a >> 16) & 0xff;
        let slot = ((a >> 11) & 0x1f) as u8;
        let function = (a >> 8) & 7;
        let reg = ((a >> 2) & 0x3f) as usize;
        (a & CONFIG_ENABLE != 0 && bus == 0 && function == 0).then_some((slot, reg))
    }

    fn read_data(&mut self, byte: usize, data: &mut [u8]) {
        let value = self
            .selected()
            .and_then(|(slot, reg)| {
                Some(lock(self.slots[usize::from(slot)].as_ref()?).read_config_register(reg))
            })
            .unwrap_or(u32::MAX);
        data.copy_from_slice(&value.to_le_bytes()[byte..byte + data.len()]);
    }

    fn write_data(&mut self, byte: usize, data: &[u8]) {
        let Some((slot, reg)) = self.selected() else {
            return;
        };
        let Some(device) = self.slots[usize::from(slot)].as_ref() else {
            return;
        };
        // The device lock is released before the handler runs.
        let moved = lock(device).write_config_register(reg, byte as u64, data);
        let Some(moved) = moved else { return };
        match self.on_bar_move.as_mut() {
            Some(handler) => handler(slot, &moved),
            None => bus::guest_log!(
                "PCI: the guest moved BAR {} of slot {slot} from {:#x} to {:#x}, which nothing \
                 handles",
                moved.bar,
                moved.old,
                moved.new
            ),
        }
    }

    fn log_bad_access(&mut self, what: &str, offset: u64, len: usize) {
        bus::guest_log!(
            "PCI: ignoring a {len}-byte {what} at port {:#x}",
            Self::PORT_BASE + offset
        );
    }
}

impl BusDevice for PciRootBus {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (DATA_OFFSET..=7, len) if (offset - DATA_OFFSET) as usize + len <= 4 && len > 0 => {
                self.read_data((offset - DATA_OFFSET) as usize, data)
            }
            (_, len) => {
                self.log_bad_access("read", offset, len);
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, &[a, b, c, d]) => {
                self.address = u32::from_le_bytes([a, b, c, d]) & CONFIG_ADDRESS_MASK;
            }
            (DATA_OFFSET..=7, _)
                if (offset - DATA_OFFSET) as usize + data.len() <= 4 && !data.is_empty() =>
            {
                self.write_data((offset - DATA_OFFSET) as usize, data)
            }
            // Linux's probe writes a byte to 0xcfb (the mechanism #2 enable on old chipsets)
            // and its reboot may write 0xcf9 (a chipset reset register): expected, so quiet.
            (0..DATA_OFFSET, _) => {
                log::debug!(
                    "PCI: ignoring a {}-byte write at port {:#x}",
                    data.len(),
                    Self::PORT_BASE + offset
                )
            }
            _ => self.log_bad_access("write", offset, data.len()),
        }
    }
}

impl std::fmt::Debug for PciRootBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let occupied: Vec<usize> = (0..self.slots.len())
            .filter(|&s| self.slots[s].is_some())
            .collect();
        f.debug_struct("PciRootBus")
            .field("address", &format_args!("{:#x}", self.address))
            .field("slots", &occupied)
            .finish()
    }
}

/// The host bridge at 00:00.0: Linux's mechanism #1 sanity check looks for a host bridge or
/// an Intel device on bus 0.
struct HostBridge {
    config: PciConfigSpace,
}

impl HostBridge {
    fn new() -> Self {
        Self {
            config: PciConfigSpace::new(&PciHeader {
                vendor_id: HOST_BRIDGE_VENDOR_ID,
                device_id: HOST_BRIDGE_DEVICE_ID,
                revision_id: 0,
                class: 0x06,
                subclass: 0x00,
                prog_if: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
                interrupt_pin: 0,
                interrupt_line: 0,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
        self.config.write(reg, offset, data)
    }

    fn bars(&self) -> Vec<PciBarRange> {
        Vec::new()
    }

    fn set_bar_address(&mut self, index: u8, _addr: u64) -> Result<(), PciError> {
        Err(PciError::InvalidBarIndex(usize::from(index)))
    }

    fn read_bar(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write_bar(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
}

/// One BAR of a PCI device as a [`BusDevice`], to insert on the MMIO bus at the BAR's address
/// with the BAR's size.
pub struct BarMmio {
    device: Arc<Mutex<dyn PciDevice>>,
    bar: u8,
}

impl BarMmio {
    /// The MMIO face of BAR `bar` of `device`: accesses become [`PciDevice::read_bar`] and
    /// [`PciDevice::write_bar`] under the device's lock.
    pub fn new(device: Arc<Mutex<dyn PciDevice>>, bar: u8) -> Self {
        Self { device, bar }
    }
}

impl BusDevice for BarMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).read_bar(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).write_bar(self.bar, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BarKind, PciBar};

    /// A device with one 32-bit BAR that records BAR accesses.
    struct Probe {
        config: PciConfigSpace,
        last_bar_write: Option<(u8, u64, Vec<u8>)>,
    }

    impl Probe {
        fn new(bar_size: u64) -> Self {
            let mut config = PciConfigSpace::new(&PciHeader {
                vendor_id: 0x1234,
                device_id: 0x5678,
                revision_id: 2,
                class: 0xff,
                subclass: 0,
                prog_if: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
                interrupt_pin: 1,
                interrupt_line: 0,
            });
            config
                .add_bar(
                    0,
                    PciBar {
                        size: bar_size,
                        kind: BarKind::Memory32,
                        prefetchable: false,
                    },
                )
                .unwrap();
            Self {
                config,
                last_bar_write: None,
            }
        }
    }

    impl PciDevice for Probe {
        fn read_config_register(&mut self, reg: usize) -> u32 {
            self.config.read_reg(reg)
        }
        fn write_config_register(
            &mut self,
            reg: usize,
            offset: u64,
            data: &[u8],
        ) -> Option<BarMove> {
            self.config.write(reg, offset, data)
        }
        fn bars(&self) -> Vec<PciBarRange> {
            self.config.bars()
        }
        fn set_bar_address(&mut self, index: u8, addr: u64) -> Result<(), PciError> {
            self.config.set_bar_address(usize::from(index), addr)
        }
        fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
            data.fill(bar.wrapping_add(offset as u8));
        }
        fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
            self.last_bar_write = Some((bar, offset, data.to_vec()));
        }
    }

    fn conf1(bus: u32, slot: u32, function: u32, reg: u32) -> [u8; 4] {
        (CONFIG_ENABLE | bus << 16 | slot << 11 | function << 8 | reg << 2).to_le_bytes()
    }

    fn read(root: &mut PciRootBus, offset: u64, len: usize) -> u32 {
        let mut data = [0u8; 4];
        root.read(offset, &mut data[..len]);
        u32::from_le_bytes(data)
    }

    fn read_config(root: &mut PciRootBus, slot: u32, reg: u32) -> u32 {
        root.write(0, &conf1(0, slot, 0, reg));
        read(root, 4, 4)
    }

    #[test]
    fn config_address_reads_back_masked() {
        let mut root = PciRootBus::new(0xc000_0000, 0x1000_0000).unwrap();
        // Linux's mechanism #1 probe.
        root.write(0, &0x8000_0000u32.to_le_bytes());
        assert_eq!(read(&mut root, 0, 4), 0x8000_0000);
        root.write(0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(read(&mut root, 0, 4), 0x80ff_fffc);
        // Byte and word accesses to CONFIG_ADDRESS are not latched.
        root.write(3, &[0x01]);
        root.write(0, &[0, 0]);
        assert_eq!(read(&mut root, 0, 4), 0x80ff_fffc);
        let mut byte = [0u8; 1];
        root.read(0, &mut byte);
        assert_eq!(byte, [0xff]);
    }

    #[test]
    fn host_bridge_identity() {
        let mut root = PciRootBus::new(0xc000_0000, 0x1000_0000).unwrap();
        assert_eq!(read_config(&mut root, 0, 0), 0x0d57_8086);
        assert_eq!(read_config(&mut root, 0, 2) >> 8, 0x06_0000);
        // Header type 0, single function.
        assert_eq!(read_config(&mut root, 0, 3), 0);
    }

    #[test]
    fn empty_slots_functions_and_buses_read_all_ones() {
        let mut root = PciRootBus::new(0xc000_0000, 0x1000_0000).unwrap();
        assert_eq!(read_config(&mut root, 1, 0), u32::MAX);
        assert_eq!(read_config(&mut root, 31, 0), u32::MAX);
        root.write(0, &conf1(0, 0, 1, 0));
        assert_eq!(read(&mut root, 4, 4), u32::MAX);
        root.write(0, &conf1(1, 0, 0, 0));
        assert_eq!(read(&mut root, 4, 4), u32::MAX);
        // Enable bit clear.
        root.write(0, &0u32.to_le_bytes());
        assert_eq!(read(&mut root, 4, 4), u32::MAX);
    }

    #[test]
    fn data_port_byte_and_word_accesses() {
        let mut root = PciRootBus::new(0xc000_0000, 0x1000_0000).unwrap();
        root.write(0, &conf1(0, 0, 0, 0));
        assert_eq!(read(&mut root, 4, 1), 0x86);
        assert_eq!(read(&mut root, 5, 1), 0x80);
        assert_eq!(read(&mut root, 6, 2), 0x0d57);
        assert_eq!(read(&mut root, 7, 1), 0x0d);
        // Straddling the end of CONFIG_DATA.
        assert_eq!(read(&mut root, 6, 4), u32::MAX);
        assert_eq!(read(&mut root, 7, 2), 0xffff);
        // Linux reads the word at 0x0a (class) through port 0xcfe.
        root.write(0, &conf1(0, 0, 0, 2));
        assert_eq!(read(&mut root, 6, 2), 0x0600);
    }

    #[test]
    fn add_device_places_bars_aligned_and_fills_slots_in_order() {
        let mut root = PciRootBus::new(0xc000_1000, 0x10_0000).unwrap();
        let first = Arc::new(Mutex::new(Probe::new(0x8000)));
        let (slot, bars) = root.add_device(first.clone()).unwrap();
        assert_eq!(slot, 1);
        assert_eq!(bars.len(), 1);
        assert_eq!(bars[0].addr, 0xc000_8000);
        assert_eq!(bars[0].size, 0x8000);
        assert_eq!(read_config(&mut root, 1, 4), 0xc000_8000);
        assert_eq!(read_config(&mut root, 1, 0), 0x5678_1234);

        let (slot, bars) = root
            .add_device(Arc::new(Mutex::new(Probe::new(0x1000))))
            .unwrap();
        assert_eq!(slot, 2);
        assert_eq!(bars[0].addr, 0xc000_1000);
    }

    #[test]
    fn add_device_fails_when_window_or_bus_is_full() {
        let mut root = PciRootBus::new(0xc000_0000, 0x8000).unwrap();
        root.add_device(Arc::new(Mutex::new(Probe::new(0x8000))))
            .unwrap();
        assert!(matches!(
            root.add_device(Arc::new(Mutex::new(Probe::new(0x1000)))),
            Err(PciError::OutOfSpace { .. })
        ));
        let mut root = PciRootBus::new(0xc000_0000, 0x100_0000).unwrap();
        for _ in 1..SLOTS {
            root.add_device(Arc::new(Mutex::new(Probe::new(0x10))))
                .unwrap();
        }
        assert!(matches!(
            root.add_device(Arc::new(Mutex::new(Probe::new(0x10)))),
            Err(PciError::BusFull)
        ));
    }

    #[test]
    fn bar_sizing_through_the_ports() {
        let mut root = PciRootBus::new(0xc000_0000, 0x10_0000).unwrap();
        root.add_device(Arc::new(Mutex::new(Probe::new(0x4000))))
            .unwrap();
        root.write(0, &conf1(0, 1, 0, 4));
        root.write(4, &[0xff; 4]);
        assert_eq!(read(&mut root, 4, 4), 0xffff_c000);
        root.write(4, &0xc000_0000u32.to_le_bytes());
        assert_eq!(read(&mut root, 4, 4), 0xc000_0000);
    }

    #[test]
    fn bar_move_reaches_the_handler_with_the_device_unlocked() {
        let mut root = PciRootBus::new(0xc000_0000, 0x10_0000).unwrap();
        let device = Arc::new(Mutex::new(Probe::new(0x1000)));
        root.add_device(device.clone()).unwrap();
        let moves = Arc::new(Mutex::new(Vec::new()));
        let seen = moves.clone();
        let dev = device.clone();
        root.set_bar_move_handler(Box::new(move |slot, mv| {
            // Would deadlock if the root bus still held the device.
            let bars = dev.try_lock().unwrap().bars();
            seen.lock().unwrap().push((slot, *mv, bars[0].addr));
        }));

        root.write(0, &conf1(0, 1, 0, 4));
        root.write(4, &[0xff; 4]);
        root.write(4, &0xc000_0000u32.to_le_bytes());
        assert!(moves.lock().unwrap().is_empty());
        root.write(6, &[0x10, 0xd0]);
        let expected = BarMove {
            bar: 0,
            old: 0xc000_0000,
            new: 0xd010_0000,
            size: 0x1000,
        };
        assert_eq!(*moves.lock().unwrap(), [(1, expected, 0xd010_0000)]);
    }

    #[test]
    fn bar_mmio_forwards_with_the_bar_index() {
        let device = Arc::new(Mutex::new(Probe::new(0x1000)));
        let mut mmio = BarMmio::new(device.clone(), 3);
        let mut data = [0u8; 2];
        mmio.read(0x10, &mut data);
        assert_eq!(data, [0x13, 0x13]);
        mmio.write(0x20, &[7]);
        assert_eq!(
            device.lock().unwrap().last_bar_write,
            Some((3, 0x20, vec![7]))
        );
    }
}
