//! The 256-byte configuration space of a PCI function with a type 0 header (PCI Local Bus
//! Specification 3.0, section 6.1 and 6.2), its memory BARs (6.2.5.1) and its capability list
//! (6.7).
//!
//! Every byte has a write mask: the guest changes only the bits a real function would let it
//! change, so BAR sizing (write all-ones, read back the size mask) falls out of the masks
//! without a special case. What needs more than a mask (a BAR changing address, the MSI-X
//! enable bit) is reported to the owner after the write.

use super::{BarMove, PciBarRange, PciError};

/// Size of the configuration space reachable through configuration mechanism #1.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Number of 32-bit registers in the configuration space.
pub const NUM_REGS: usize = CONFIG_SPACE_SIZE / 4;
/// Number of BARs in a type 0 header.
pub const NUM_BARS: usize = 6;

/// Offsets of the type 0 header fields (section 6.1, figure 6-1).
pub mod offset {
    /// Vendor ID (16 bits): who made the function; 0xffff reads mean no function.
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID (16 bits), chosen by the vendor.
    pub const DEVICE_ID: usize = 0x02;
    /// Command register (16 bits, section 6.2.2): decode enables, bus mastering, INTx disable.
    pub const COMMAND: usize = 0x04;
    /// Status register (16 bits, section 6.2.3): interrupt status, capability list present.
    pub const STATUS: usize = 0x06;
    /// Revision ID (8 bits).
    pub const REVISION_ID: usize = 0x08;
    /// Programming interface, the low byte of the class code (section 6.2.1).
    pub const PROG_IF: usize = 0x09;
    /// Sub-class, the middle byte of the class code.
    pub const SUBCLASS: usize = 0x0a;
    /// Base class, the high byte of the class code.
    pub const CLASS: usize = 0x0b;
    /// Cache line size (8 bits); kept, not acted on.
    pub const CACHE_LINE_SIZE: usize = 0x0c;
    /// Latency timer (8 bits); kept, not acted on.
    pub const LATENCY_TIMER: usize = 0x0d;
    /// Header type (8 bits): 0 for an endpoint's type 0 header, bit 7 for multi-function.
    pub const HEADER_TYPE: usize = 0x0e;
    /// The first of the six Base Address Registers, 4 bytes each (section 6.2.5.1).
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID (16 bits, section 6.2.4).
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// Subsystem ID (16 bits, section 6.2.4); virtio puts the device ID here for legacy drivers.
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// Capabilities pointer (8 bits, section 6.7): offset of the first capability.
    pub const CAPABILITIES_POINTER: usize = 0x34;
    /// Interrupt line (8 bits, section 6.2.4): the IRQ the firmware or OS routed INTx to.
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// Interrupt pin (8 bits, section 6.2.4): 0 for none, 1..=4 for INTA#..INTD#.
    pub const INTERRUPT_PIN: usize = 0x3d;
    /// First byte after the header, where the capability list starts.
    pub const FIRST_CAPABILITY: usize = 0x40;
}

/// Command register bits (section 6.2.2).
pub mod command {
    /// Decode the function's I/O space BARs.
    pub const IO_SPACE: u16 = 1 << 0;
    /// Decode the function's memory BARs: while it is clear, BAR accesses read as all ones.
    pub const MEMORY_SPACE: u16 = 1 << 1;
    /// Let the function master the bus: DMA, and MSI/MSI-X messages (section 6.8).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// Report parity errors; kept, not acted on.
    pub const PARITY_ERROR_RESPONSE: u16 = 1 << 6;
    /// Report system errors on SERR#; kept, not acted on.
    pub const SERR_ENABLE: u16 = 1 << 8;
    /// Keep the function from asserting its INTx pin.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// Status register bits (section 6.2.3).
pub mod status {
    /// The function's INTx interrupt is pending (whether or not INTx is disabled).
    pub const INTERRUPT: u16 = 1 << 3;
    /// The capabilities pointer at 0x34 is valid (section 6.7).
    pub const CAPABILITIES_LIST: u16 = 1 << 4;
}

/// The command bits a guest may change: we model I/O and memory decode, bus mastering, the two
/// error-reporting enables (kept, not acted on) and INTx disable.
const COMMAND_WRITABLE: u16 = command::IO_SPACE
    | command::MEMORY_SPACE
    | command::BUS_MASTER
    | command::PARITY_ERROR_RESPONSE
    | command::SERR_ENABLE
    | command::INTX_DISABLE;

/// Memory BAR type field, bits 2:1 (section 6.2.5.1).
const BAR_MEM64: u32 = 0b10 << 1;
/// Memory BAR prefetchable bit.
const BAR_PREFETCHABLE: u32 = 1 << 3;
/// Low bits of a memory BAR that hold flags rather than address.
const BAR_MEM_FLAGS: u32 = 0xf;

/// The identity of a function, written into its header once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHeader {
    /// Vendor ID (section 6.2.1).
    pub vendor_id: u16,
    /// Device ID (section 6.2.1).
    pub device_id: u16,
    /// Revision ID (section 6.2.1).
    pub revision_id: u8,
    /// Base class, subclass and programming interface (section 6.2.1, appendix D).
    pub class: u8,
    /// Sub-class within [`class`](Self::class).
    pub subclass: u8,
    /// Register-level programming interface within the sub-class.
    pub prog_if: u8,
    /// Subsystem vendor ID (section 6.2.4).
    pub subsystem_vendor_id: u16,
    /// Subsystem ID (section 6.2.4).
    pub subsystem_id: u16,
    /// 0 for none, 1..=4 for INTA#..INTD#.
    pub interrupt_pin: u8,
    /// What the Interrupt Line register reads before the guest writes it.
    pub interrupt_line: u8,
}

/// The address space a memory BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// Anywhere below 4 GiB; one register.
    Memory32,
    /// Anywhere in the 64-bit space; two registers (the BAR and the next one).
    Memory64,
}

/// A memory BAR a device asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciBar {
    /// Power of two, at least 16 bytes (at most 2 GiB for [`BarKind::Memory32`]).
    pub size: u64,
    /// 32- or 64-bit decode.
    pub kind: BarKind,
    /// The prefetchable bit (section 6.2.5.1): reads have no side effects, so a bridge may
    /// merge and prefetch them.
    pub prefetchable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BarSlot {
    Unused,
    Memory {
        bar: PciBar,
        /// Where the VMM has the BAR mapped: the address last reported.
        mapped: u64,
    },
    /// The upper half of the 64-bit BAR in the slot below.
    Upper,
}

/// A type 0 configuration space.
#[derive(Debug, Clone)]
pub struct PciConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
    bars: [BarSlot; NUM_BARS],
    /// Offset of the last capability, whose next pointer a new one links from.
    last_capability: Option<usize>,
    /// Where the next capability goes.
    next_capability: usize,
}

impl PciConfigSpace {
    /// A header with `header`'s identity, no BARs and no capabilities; command and status read
    /// zero.
    pub fn new(header: &PciHeader) -> Self {
        let mut space = Self {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            bars: [BarSlot::Unused; NUM_BARS],
            last_capability: None,
            next_capability: offset::FIRST_CAPABILITY,
        };
        space.put_u16(offset::VENDOR_ID, header.vendor_id);
        space.put_u16(offset::DEVICE_ID, header.device_id);
        space.bytes[offset::REVISION_ID] = header.revision_id;
        space.bytes[offset::PROG_IF] = header.prog_if;
        space.bytes[offset::SUBCLASS] = header.subclass;
        space.bytes[offset::CLASS] = header.class;
        space.put_u16(offset::SUBSYSTEM_VENDOR_ID, header.subsystem_vendor_id);
        space.put_u16(offset::SUBSYSTEM_ID, header.subsystem_id);
        space.bytes[offset::INTERRUPT_LINE] = header.interrupt_line;
        space.bytes[offset::INTERRUPT_PIN] = header.interrupt_pin;

        let [cmd_lo, cmd_hi] = COMMAND_WRITABLE.to_le_bytes();
        space.writable[offset::COMMAND] = cmd_lo;
        space.writable[offset::COMMAND + 1] = cmd_hi;
        // Cache line size and latency timer are plain storage for the guest.
        space.writable[offset::CACHE_LINE_SIZE] = 0xff;
        space.writable[offset::LATENCY_TIMER] = 0xff;
        space.writable[offset::INTERRUPT_LINE] = 0xff;
        space
    }

    /// Declares BAR `index`; its address reads zero until [`set_bar_address`] places it.
    ///
    /// [`set_bar_address`]: Self::set_bar_address
    pub fn add_bar(&mut self, index: usize, bar: PciBar) -> Result<(), PciError> {
        let regs = match bar.kind {
            BarKind::Memory32 => 1,
            BarKind::Memory64 => 2,
        };
        if index + regs > NUM_BARS {
            return Err(PciError::InvalidBarIndex(index));
        }
        if self.bars[index..index + regs]
            .iter()
            .any(|slot| *slot != BarSlot::Unused)
        {
            return Err(PciError::BarInUse(index));
        }
        let max = match bar.kind {
            BarKind::Memory32 => 1 << 31,
            BarKind::Memory64 => 1 << 63,
        };
        if !bar.size.is_power_of_two() || bar.size < 16 || bar.size > max {
            return Err(PciError::InvalidBarSize(bar.size));
        }

        let mut flags = 0;
        if bar.kind == BarKind::Memory64 {
            flags |= BAR_MEM64;
            self.bars[index + 1] = BarSlot::Upper;
        }
        if bar.prefetchable {
            flags |= BAR_PREFETCHABLE;
        }
        self.bars[index] = BarSlot::Memory { bar, mapped: 0 };

        let mask = !(bar.size - 1);
        let reg = bar_offset(index);
        self.put_u32(reg, flags);
        self.put_mask_u32(reg, (mask as u32) & !BAR_MEM_FLAGS);
        if bar.kind == BarKind::Memory64 {
            self.put_u32(reg + 4, 0);
            self.put_mask_u32(reg + 4, (mask >> 32) as u32);
        }
        Ok(())
    }

    /// Places BAR `index` at `addr` (the VMM's allocation, before the guest runs).
    pub fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        let Some(BarSlot::Memory { bar, mapped }) = self.bars.get_mut(index) else {
            return Err(PciError::InvalidBarIndex(index));
        };
        let fits = match bar.kind {
            BarKind::Memory32 => addr.checked_add(bar.size).is_some_and(|end| end <= 1 << 32),
            BarKind::Memory64 => addr.checked_add(bar.size - 1).is_some(),
        };
        if addr & (bar.size - 1) != 0 || !fits {
            return Err(PciError::InvalidBarAddress { index, addr });
        }
        *mapped = addr;
        let is64 = bar.kind == BarKind::Memory64;
        let reg = bar_offset(index);
        let flags = self.get_u32(reg) & BAR_MEM_FLAGS;
        self.put_u32(reg, addr as u32 | flags);
        if is64 {
            self.put_u32(reg + 4, (addr >> 32) as u32);
        }
        Ok(())
    }

    /// Where BAR `index` is mapped, if it exists.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        match self.bars.get(index) {
            Some(BarSlot::Memory { mapped, .. }) => Some(*mapped),
            _ => None,
        }
    }

    /// The BARs and where they are mapped.
    pub fn bars(&self) -> Vec<PciBarRange> {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| match slot {
                BarSlot::Memory { bar, mapped } => Some(PciBarRange {
                    index: index as u8,
                    addr: *mapped,
                    size: bar.size,
                    kind: bar.kind,
                }),
                _ => None,
            })
            .collect()
    }

    /// Appends a capability with ID `id` whose bytes after the ID and next pointer are `body`,
    /// all read-only; returns its offset. Sets the capabilities-list status bit.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<usize, PciError> {
        let at = self.next_capability;
        let end = at
            .checked_add(2 + body.len())
            .filter(|&end| end <= CONFIG_SPACE_SIZE)
            .ok_or(PciError::CapabilityFull)?;
        self.bytes[at] = id;
        self.bytes[at + 1] = 0;
        self.bytes[at + 2..end].copy_from_slice(body);
        match self.last_capability {
            Some(last) => self.bytes[last + 1] = at as u8,
            None => self.bytes[offset::CAPABILITIES_POINTER] = at as u8,
        }
        let status = self.get_u16(offset::STATUS) | status::CAPABILITIES_LIST;
        self.put_u16(offset::STATUS, status);
        self.last_capability = Some(at);
        // Capabilities start on dword boundaries (section 6.7).
        self.next_capability = end.next_multiple_of(4);
        Ok(at)
    }

    /// Lets the guest change the bits of `mask` at `offset` onward (bytes past the end are
    /// ignored).
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        for (i, &m) in mask.iter().enumerate() {
            if let Some(w) = self.writable.get_mut(offset + i) {
                *w = m;
            }
        }
    }

    /// Register `reg` (0..64); all-ones past the end.
    pub fn read_reg(&self, reg: usize) -> u32 {
        if reg >= NUM_REGS {
            return u32::MAX;
        }
        self.get_u32(reg * 4)
    }

    /// Reads `data.len()` bytes at `offset`, all-ones past the end.
    pub fn read_bytes(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.bytes.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    /// Stores device-owned bytes (status bits, capability contents), bypassing the write masks.
    pub fn write_raw(&mut self, offset: usize, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            if let Some(b) = self.bytes.get_mut(offset + i) {
                *b = byte;
            }
        }
    }

    /// A guest write of `data` at byte `offset` of register `reg`, through the write masks.
    /// Returns the move of a BAR the write changed. Writes that do not fit in the register are
    /// ignored.
    pub fn write(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
        let start = reg
            .checked_mul(4)?
            .checked_add(usize::try_from(offset).ok()?)?;
        let end = start.checked_add(data.len())?;
        if reg >= NUM_REGS || offset >= 4 || end > (reg + 1) * 4 {
            return None;
        }
        for (i, &byte) in data.iter().enumerate() {
            let w = self.writable[start + i];
            let b = &mut self.bytes[start + i];
            *b = (*b & !w) | (byte & w);
        }
        let bar_regs = offset::BAR0..offset::BAR0 + 4 * NUM_BARS;
        if bar_regs.contains(&start) {
            self.bar_moved((start - offset::BAR0) / 4)
        } else {
            None
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.get_u16(offset::COMMAND)
    }

    /// After a write to BAR register `reg`: the move of the BAR it belongs to, unless the BAR
    /// is being sized (its address bits all ones) or did not move.
    fn bar_moved(&mut self, reg: usize) -> Option<BarMove> {
        let index = match self.bars.get(reg)? {
            BarSlot::Upper => reg.checked_sub(1)?,
            _ => reg,
        };
        let BarSlot::Memory { bar, mapped } = self.bars[index] else {
            return None;
        };
        let mask = !(bar.size - 1);
        let lo = self.get_u32(bar_offset(index)) & !BAR_MEM_FLAGS;
        let mask_lo = mask as u32 & !BAR_MEM_FLAGS;
        let mut sizing = mask_lo != 0 && lo == mask_lo;
        let mut addr = u64::from(lo);
        if bar.kind == BarKind::Memory64 {
            let hi = self.get_u32(bar_offset(index) + 4);
            sizing |= hi == (mask >> 32) as u32;
            addr |= u64::from(hi) << 32;
        }
        if sizing || addr == mapped {
            return None;
        }
        self.bars[index] = BarSlot::Memory { bar, mapped: addr };
        Some(BarMove {
            bar: index as u8,
            old: mapped,
            new: addr,
            size: bar.size,
        })
    }

    fn get_u16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    fn get_u32(&self, at: usize) -> u32 {
        let mut b = [0; 4];
        b.copy_from_slice(&self.bytes[at..at + 4]);
        u32::from_le_bytes(b)
    }

    fn put_u16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put_u32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn put_mask_u32(&mut self, at: usize, v: u32) {
        self.writable[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
}

fn bar_offset(index: usize) -> usize {
    offset::BAR0 + 4 * index
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision_id: 1,
            class: 0x01,
            subclass: 0x80,
            prog_if: 0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1042,
            interrupt_pin: 1,
            interrupt_line: 10,
        }
    }

    fn bar(size: u64, kind: BarKind) -> PciBar {
        PciBar {
            size,
            kind,
            prefetchable: false,
        }
    }

    #[test]
    fn header_fields_read_back_little_endian() {
        let space = PciConfigSpace::new(&header());
        assert_eq!(space.read_reg(0), 0x1042_1af4);
        // Class 01, subclass 80, prog-if 00, revision 01.
        assert_eq!(space.read_reg(2), 0x0180_0001);
        assert_eq!(space.read_reg(11), 0x1042_1af4);
        // Pin A, line 10.
        assert_eq!(space.read_reg(15), 0x0000_010a);
        // No capabilities: status bit 4 clear, pointer 0.
        assert_eq!(space.read_reg(1), 0);
        assert_eq!(space.read_reg(13), 0);
        assert_eq!(space.read_reg(64), u32::MAX);
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let mut space = PciConfigSpace::new(&header());
        space.write(0, 0, &[0; 4]);
        space.write(2, 0, &[0xff; 4]);
        space.write(15, 1, &[7]);
        assert_eq!(space.read_reg(0), 0x1042_1af4);
        assert_eq!(space.read_reg(2), 0x0180_0001);
        assert_eq!(space.read_reg(15), 0x0000_010a);
    }

    #[test]
    fn command_keeps_only_modelled_bits() {
        let mut space = PciConfigSpace::new(&header());
        space.write(1, 0, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(space.command(), 0x0547);
        // The status half is read-only.
        assert_eq!(space.read_reg(1), 0x0000_0547);
        space.write(1, 0, &[0x02]);
        assert_eq!(space.command(), 0x0502);
    }

    #[test]
    fn interrupt_line_is_writable_by_byte() {
        let mut space = PciConfigSpace::new(&header());
        space.write(15, 0, &[11]);
        assert_eq!(space.read_reg(15), 0x0000_010b);
    }

    #[test]
    fn writes_straddling_a_register_are_ignored() {
        let mut space = PciConfigSpace::new(&header());
        assert_eq!(space.write(15, 3, &[1, 2]), None);
        assert_eq!(space.write(15, 4, &[1]), None);
        assert_eq!(space.write(64, 0, &[1]), None);
        assert_eq!(space.write(usize::MAX, 0, &[1]), None);
        assert_eq!(space.read_reg(15), 0x0000_010a);
    }

    #[test]
    fn bar32_sizing_reads_the_size_mask_and_reports_no_move() {
        let mut space = PciConfigSpace::new(&header());
        space.add_bar(0, bar(0x8000, BarKind::Memory32)).unwrap();
        space.set_bar_address(0, 0xc000_0000).unwrap();
        assert_eq!(space.read_reg(4), 0xc000_0000);

        assert_eq!(space.write(4, 0, &[0xff; 4]), None);
        assert_eq!(space.read_reg(4), 0xffff_8000);
        assert_eq!(space.write(4, 0, &0xc000_0000u32.to_le_bytes()), None);
        assert_eq!(space.read_reg(4), 0xc000_0000);
        assert_eq!(space.bar_address(0), Some(0xc000_0000));
    }

    #[test]
    fn bar32_move_is_reported_once() {
        let mut space = PciConfigSpace::new(&header());
        space.add_bar(1, bar(0x1000, BarKind::Memory32)).unwrap();
        space.set_bar_address(1, 0xc000_0000).unwrap();

        // Unaligned low bits are dropped by the mask.
        let mv = space.write(5, 0, &0xd000_1234u32.to_le_bytes());
        assert_eq!(
            mv,
            Some(BarMove {
                bar: 1,
                old: 0xc000_0000,
                new: 0xd000_1000,
                size: 0x1000
            })
        );
        assert_eq!(space.read_reg(5), 0xd000_1000);
        assert_eq!(space.write(5, 0, &0xd000_1000u32.to_le_bytes()), None);
        assert_eq!(space.bars()[0].addr, 0xd000_1000);
    }

    #[test]
    fn bar64_sizing_and_move() {
        let mut space = PciConfigSpace::new(&header());
        space
            .add_bar(
                2,
                PciBar {
                    size: 0x4000,
                    kind: BarKind::Memory64,
                    prefetchable: true,
                },
            )
            .unwrap();
        space.set_bar_address(2, 0x1_0000_0000).unwrap();
        // Type 64-bit (0b100), prefetchable (0b1000).
        assert_eq!(space.read_reg(6), 0x0000_000c);
        assert_eq!(space.read_reg(7), 0x0000_0001);

        // Linux sizes low then high, then restores low then high.
        assert_eq!(space.write(6, 0, &[0xff; 4]), None);
        assert_eq!(space.read_reg(6), 0xffff_c00c);
        assert_eq!(space.write(7, 0, &[0xff; 4]), None);
        assert_eq!(space.read_reg(7), 0xffff_ffff);
        assert_eq!(space.write(6, 0, &0x0000_000cu32.to_le_bytes()), None);
        assert_eq!(space.write(7, 0, &1u32.to_le_bytes()), None);

        // A real move of the high half alone.
        assert_eq!(
            space.write(7, 0, &2u32.to_le_bytes()),
            Some(BarMove {
                bar: 2,
                old: 0x1_0000_0000,
                new: 0x2_0000_0000,
                size: 0x4000
            })
        );
        let ranges = space.bars();
        assert_eq!(ranges.len(), 1);
        assert_eq!(ranges[0].index, 2);
        assert_eq!(ranges[0].addr, 0x2_0000_0000);
    }

    #[test]
    fn add_bar_validates() {
        let mut space = PciConfigSpace::new(&header());
        assert!(matches!(
            space.add_bar(6, bar(0x1000, BarKind::Memory32)),
            Err(PciError::InvalidBarIndex(6))
        ));
        assert!(matches!(
            space.add_bar(5, bar(0x1000, BarKind::Memory64)),
            Err(PciError::InvalidBarIndex(5))
        ));
        assert!(matches!(
            space.add_bar(0, bar(0x1800, BarKind::Memory32)),
            Err(PciError::InvalidBarSize(0x1800))
        ));
        assert!(matches!(
            space.add_bar(0, bar(8, BarKind::Memory32)),
            Err(PciError::InvalidBarSize(8))
        ));
        space.add_bar(0, bar(0x1000, BarKind::Memory64)).unwrap();
        assert!(matches!(
            space.add_bar(1, bar(0x1000, BarKind::Memory32)),
            Err(PciError::BarInUse(1))
        ));
        assert!(matches!(
            space.set_bar_address(0, 0xc000_0800),
            Err(PciError::InvalidBarAddress { .. })
        ));
        assert!(matches!(
            space.set_bar_address(1, 0xc000_0000),
            Err(PciError::InvalidBarIndex(1))
        ));
        let mut space = PciConfigSpace::new(&header());
        space.add_bar(0, bar(0x1000, BarKind::Memory32)).unwrap();
        assert!(matches!(
            space.set_bar_address(0, 0xffff_f000 + 0x1000),
            Err(PciError::InvalidBarAddress { .. })
        ));
        space.set_bar_address(0, 0xffff_f000).unwrap();
    }

    #[test]
    fn unused_bars_and_rom_read_zero_after_sizing() {
        let mut space = PciConfigSpace::new(&header());
        // BARs 0-5, then the expansion ROM (register 12).
        for reg in (4..10).chain([12]) {
            space.write(reg, 0, &[0xff; 4]);
            assert_eq!(space.read_reg(reg), 0, "register {reg}");
        }
    }

    #[test]
    fn capability_chain_links_in_order() {
        let mut space = PciConfigSpace::new(&header());
        assert_eq!(space.add_capability(0x09, &[14, 1, 2, 3]).unwrap(), 0x40);
        assert_eq!(space.add_capability(0x11, &[0; 10]).unwrap(), 0x48);
        assert_eq!(
            space.read_reg(1) >> 16,
            u32::from(status::CAPABILITIES_LIST)
        );
        assert_eq!(space.read_reg(13), 0x40);
        // ID 9, next 0x48, then the body.
        assert_eq!(space.read_reg(0x40 / 4), 0x010e_4809);
        assert_eq!(space.read_reg(0x48 / 4) & 0xffff, 0x0011);
        // Read-only unless made writable.
        space.write(0x40 / 4, 2, &[0xaa]);
        assert_eq!(space.read_reg(0x40 / 4), 0x010e_4809);
        space.set_writable(0x42, &[0xff]);
        space.write(0x40 / 4, 2, &[0xaa]);
        assert_eq!(space.read_reg(0x40 / 4), 0x01aa_4809);
    }

    #[test]
    fn capability_overflow_is_an_error() {
        let mut space = PciConfigSpace::new(&header());
        space.add_capability(0x09, &[0; 190]).unwrap();
        assert!(matches!(
            space.add_capability(0x09, &[0; 64]),
            Err(PciError::CapabilityFull)
        ));
    }
}
