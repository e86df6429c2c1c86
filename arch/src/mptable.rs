//! MP table: Intel MultiProcessor Specification 1.4, chapter 4 ("MP Configuration Table").
//!
//! The MP floating pointer (4.1) sits at [`MPTABLE_START`], in the BIOS ROM area (0xF0000-0xFFFFF),
//! one of the places the spec names and Linux scans (`arch/x86/kernel/mpparse.c`, `smp_scan_config`). The configuration table
//! (4.2) follows it directly: header, one processor entry per vCPU (4.3.1), the bus entries (4.3.2),
//! the IOAPIC (4.3.3), the I/O interrupt assignments (4.3.4) and the two local interrupt
//! assignments (4.3.5). Everything must end below [`MPTABLE_END`]; 64 KiB hold the 254 vCPUs an
//! 8-bit APIC ID allows, with room to spare for PCI routes.
//!
//! ISA IRQ *n* goes to IOAPIC pin *n*, not IRQ 0 to pin 2 as on real chipsets: KVM's default GSI
//! routing (`kvm_setup_default_irq_routing`) connects GSI *n* to IOAPIC pin *n* and the in-kernel PIT
//! raises GSI 0, so pin 0 is where the timer interrupt actually arrives. A firmware that wants the
//! PC wiring must install its own routing; Firecracker and crosvm use the same identity map.
//!
//! PCI INTx lines (bus 0) are described only when the VMM asks for them ([`MpTable::with_pci_bus`]).
//! The PCI bus then takes MP bus ID 0, because Linux matches a device's interrupt entry by its PCI
//! bus number, and ISA becomes bus 1, as SeaBIOS does. A PCI route to a pin below 16 replaces that
//! pin's ISA entry, so one pin never has two meanings.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{IOAPIC_START, LAPIC_START, MPTABLE_END, MPTABLE_START};
use crate::{Error, Result};

/// The most vCPUs xAPIC IDs allow: 0..=253, with 254 for the IOAPIC and 255 as broadcast.
pub const MAX_CPUS: u8 = 254;
/// Pins of KVM's in-kernel IOAPIC (`KVM_IOAPIC_NUM_PINS`).
pub const IOAPIC_PINS: u8 = 24;
/// Lowest IOAPIC pin a PCI route may use: 0, 1 and 2 are the timer, keyboard and cascade.
pub const FIRST_PCI_IOAPIC_PIN: u8 = 3;
/// Local APIC version reported for each processor (KVM's LAPIC version register).
pub const LAPIC_VERSION: u8 = 0x14;
/// IOAPIC version (KVM's IOAPIC version register).
pub const IOAPIC_VERSION: u8 = 0x11;

const ISA_IRQS: u8 = 16;
const FLOATING_POINTER_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;
const PROCESSOR_SIZE: usize = 20;
/// Bus, IOAPIC, I/O interrupt and local interrupt entries are all 8 bytes.
const SHORT_ENTRY_SIZE: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// CPU signature: family 6, model 0, stepping 0.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1:EDX features that matter to an MP table reader: FPU and on-chip APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const IOAPIC_USABLE: u8 = 1;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// "Conforms to the bus specification" for both polarity and trigger mode.
const INT_FLAGS_CONFORMING: u16 = 0;
/// Active high (bits 1:0 = 01), level-triggered (bits 3:2 = 11). PCI lines are level-triggered;
/// KVM's IOAPIC treats a raised line as asserted whatever the programmed polarity, so we describe
/// them as active high like SeaBIOS does for QEMU, rather than the PCI bus's native active low.
const INT_FLAGS_PCI: u16 = 0b01 | (0b11 << 2);
/// Destination "all local APICs".
const ALL_LAPICS: u8 = 0xff;

const BUS_TYPE_PCI: [u8; 6] = *b"PCI   ";
const BUS_TYPE_ISA: [u8; 6] = *b"ISA   ";
const OEM_ID: [u8; 8] = *b"RUSTVMM ";
const PRODUCT_ID: [u8; 12] = *b"KVM GUEST   ";

/// A PCI interrupt pin (the Interrupt Pin register holds 1..=4 for INTA#..INTD#).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IntxPin {
    A,
    B,
    C,
    D,
}

impl IntxPin {
    /// The pin for a PCI Interrupt Pin register value, `None` for 0 (no pin) and invalid values.
    pub fn from_config_register(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::A),
            2 => Some(Self::B),
            3 => Some(Self::C),
            4 => Some(Self::D),
            _ => None,
        }
    }

    /// 0 for INTA# .. 3 for INTD#, as the MP table and ACPI's `_PRT` encode it.
    pub(crate) fn index(self) -> u8 {
        match self {
            Self::A => 0,
            Self::B => 1,
            Self::C => 2,
            Self::D => 3,
        }
    }
}

/// One INTx line of a device on PCI bus 0, wired to an IOAPIC pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIntxRoute {
    /// PCI device number on bus 0 (0..=31).
    pub device: u8,
    pub pin: IntxPin,
    /// IOAPIC input pin ([`FIRST_PCI_IOAPIC_PIN`]..24); several lines may share one pin.
    pub ioapic_pin: u8,
}

impl PciIntxRoute {
    fn validate(&self) -> Result<()> {
        if self.device > 31 {
            return Err(Error::InvalidPciDevice(self.device));
        }
        if !(FIRST_PCI_IOAPIC_PIN..IOAPIC_PINS).contains(&self.ioapic_pin) {
            return Err(Error::InvalidIoapicPin(self.ioapic_pin));
        }
        Ok(())
    }

    /// Source bus IRQ for a PCI line: device number in bits 6:2, pin in bits 1:0 (MP spec D.3).
    fn source_irq(&self) -> u8 {
        (self.device << 2) | self.pin.index()
    }
}

/// The MP table for a guest: its vCPUs and, optionally, the INTx wiring of PCI bus 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpTable {
    num_cpus: u8,
    pci_routes: Option<Vec<PciIntxRoute>>,
}

impl MpTable {
    /// A table for `num_cpus` vCPUs with APIC IDs `0..num_cpus`, vCPU 0 the bootstrap processor.
    pub fn new(num_cpus: u8) -> Result<Self> {
        if num_cpus == 0 || num_cpus > MAX_CPUS {
            return Err(Error::InvalidCpuCount(num_cpus));
        }
        let table = Self {
            num_cpus,
            pci_routes: None,
        };
        table.check_room()?;
        Ok(table)
    }

    /// Adds PCI bus 0 and the IOAPIC pins of its devices' INTx lines.
    ///
    /// A route to a pin below 16 takes that pin away from the ISA bus (its ISA entry is left out);
    /// keep such routes off pins that emulated ISA devices use (4 for COM1, 8 for the RTC, ...).
    pub fn with_pci_bus(mut self, routes: &[PciIntxRoute]) -> Result<Self> {
        for (i, route) in routes.iter().enumerate() {
            route.validate()?;
            if routes[..i]
                .iter()
                .any(|r| r.device == route.device && r.pin == route.pin)
            {
                return Err(Error::DuplicatePciRoute {
                    device: route.device,
                    pin: route.pin,
                });
            }
        }
        self.pci_routes = Some(routes.to_vec());
        self.check_room()?;
        Ok(self)
    }

    /// The most vCPUs whose table fits, with `pci_routes` routes to pins 16 and up (`None`: no
    /// PCI bus).
    pub fn max_cpus(pci_routes: Option<usize>) -> u8 {
        let fixed = Self::size_for(0, pci_routes.map(|n| (n, 0)));
        let room = (MPTABLE_END - MPTABLE_START) as usize;
        let cpus = room.saturating_sub(fixed) / PROCESSOR_SIZE;
        cpus.min(usize::from(MAX_CPUS)) as u8
    }

    /// The IOAPIC's ID: the first one after the vCPUs' APIC IDs.
    pub fn ioapic_id(&self) -> u8 {
        self.num_cpus
    }

    /// Bytes the floating pointer and the configuration table take together.
    pub fn size(&self) -> usize {
        let pci = self
            .pci_routes
            .as_ref()
            .map(|routes| (routes.len(), self.isa_irqs_taken_by_pci()));
        Self::size_for(self.num_cpus, pci)
    }

    /// `pci`: (routes, ISA pins they take over).
    fn size_for(num_cpus: u8, pci: Option<(usize, usize)>) -> usize {
        let (buses, interrupts) = match pci {
            None => (1, usize::from(ISA_IRQS)),
            Some((routes, taken)) => (2, routes + usize::from(ISA_IRQS) - taken),
        };
        FLOATING_POINTER_SIZE
            + HEADER_SIZE
            + PROCESSOR_SIZE * usize::from(num_cpus)
            + SHORT_ENTRY_SIZE * (buses + 1 + interrupts + 2)
    }

    fn check_room(&self) -> Result<()> {
        let size = self.size();
        let room = (MPTABLE_END - MPTABLE_START) as usize;
        if size > room {
            return Err(Error::MpTableTooLarge { size, room });
        }
        Ok(())
    }

    /// Whether a PCI route claims IOAPIC pin `pin`.
    fn pin_taken_by_pci(&self, pin: u8) -> bool {
        self.pci_routes
            .iter()
            .flatten()
            .any(|route| route.ioapic_pin == pin)
    }

    fn isa_irqs_taken_by_pci(&self) -> usize {
        (0..ISA_IRQS)
            .filter(|&irq| self.pin_taken_by_pci(irq))
            .count()
    }

    /// The floating pointer followed by the configuration table, to be placed at
    /// [`MPTABLE_START`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let table_start = MPTABLE_START + FLOATING_POINTER_SIZE as u64;
        let mut out = floating_pointer(table_start as u32).to_vec();

        let mut entries = Vec::with_capacity(self.size());
        let mut count: u16 = 0;
        let mut push = |entry: &[u8]| {
            entries.extend_from_slice(entry);
            count += 1;
        };

        for apic_id in 0..self.num_cpus {
            push(&processor_entry(apic_id, apic_id == 0));
        }
        let (pci_bus, isa_bus) = match self.pci_routes {
            Some(_) => (Some(0), 1),
            None => (None, 0),
        };
        if let Some(bus) = pci_bus {
            push(&bus_entry(bus, BUS_TYPE_PCI));
        }
        push(&bus_entry(isa_bus, BUS_TYPE_ISA));
        let ioapic_id = self.ioapic_id();
        push(&ioapic_entry(ioapic_id));
        if let (Some(bus), Some(routes)) = (pci_bus, &self.pci_routes) {
            for route in routes {
                push(&interrupt_entry(
                    ENTRY_IO_INTERRUPT,
                    INT_TYPE_INT,
                    INT_FLAGS_PCI,
                    bus,
                    route.source_irq(),
                    ioapic_id,
                    route.ioapic_pin,
                ));
            }
        }
        for irq in (0..ISA_IRQS).filter(|&irq| !self.pin_taken_by_pci(irq)) {
            push(&interrupt_entry(
                ENTRY_IO_INTERRUPT,
                INT_TYPE_INT,
                INT_FLAGS_CONFORMING,
                isa_bus,
                irq,
                ioapic_id,
                irq,
            ));
        }
        // LINT0 of the bootstrap processor carries the 8259's ExtINT (virtual wire mode); LINT1 of
        // every processor carries NMI, as on PC hardware (MP spec 5.1).
        push(&interrupt_entry(
            ENTRY_LOCAL_INTERRUPT,
            INT_TYPE_EXTINT,
            INT_FLAGS_CONFORMING,
            isa_bus,
            0,
            0,
            0,
        ));
        push(&interrupt_entry(
            ENTRY_LOCAL_INTERRUPT,
            INT_TYPE_NMI,
            INT_FLAGS_CONFORMING,
            isa_bus,
            0,
            ALL_LAPICS,
            1,
        ));

        let length = (HEADER_SIZE + entries.len()) as u16;
        let mut table = header(length, count).to_vec();
        table.extend_from_slice(&entries);
        table[7] = checksum(&table);
        out.extend_from_slice(&table);
        out
    }

    /// Writes the table at [`MPTABLE_START`].
    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<()> {
        mem.write_slice(&self.to_bytes(), GuestAddress(MPTABLE_START))
            .map_err(|e| Error::WriteGuestMemory("MP table", e))
    }
}

/// The byte that makes `bytes` sum to zero (mod 256) once stored in its checksum field (which must
/// still be 0).
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// MP floating pointer structure (MP spec 4.1).
fn floating_pointer(table_addr: u32) -> [u8; FLOATING_POINTER_SIZE] {
    let mut fp = [0u8; FLOATING_POINTER_SIZE];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&table_addr.to_le_bytes());
    fp[8] = 1; // length in 16-byte paragraphs
    fp[9] = 4; // specification revision 1.4
               // fp[11] feature byte 1 = 0: a configuration table is present.
               // fp[12] bit 7 = 0: no IMCR, the PIC is in virtual wire mode.
    fp[10] = checksum(&fp);
    fp
}

/// Configuration table header (MP spec 4.2) with a zero checksum.
fn header(length: u16, entry_count: u16) -> [u8; HEADER_SIZE] {
    let mut h = [0u8; HEADER_SIZE];
    h[0..4].copy_from_slice(b"PCMP");
    h[4..6].copy_from_slice(&length.to_le_bytes());
    h[6] = 4; // specification revision 1.4
    h[8..16].copy_from_slice(&OEM_ID);
    h[16..28].copy_from_slice(&PRODUCT_ID);
    // 28..32 OEM table pointer and 32..34 its size: none.
    h[34..36].copy_from_slice(&entry_count.to_le_bytes());
    h[36..40].copy_from_slice(&(LAPIC_START as u32).to_le_bytes());
    // 40..44: no extended table.
    h
}

fn processor_entry(apic_id: u8, bootstrap: bool) -> [u8; PROCESSOR_SIZE] {
    let mut e = [0u8; PROCESSOR_SIZE];
    e[0] = ENTRY_PROCESSOR;
    e[1] = apic_id;
    e[2] = LAPIC_VERSION;
    e[3] = CPU_ENABLED | if bootstrap { CPU_BOOTSTRAP } else { 0 };
    e[4..8].copy_from_slice(&CPU_SIGNATURE.to_le_bytes());
    e[8..12].copy_from_slice(&CPU_FEATURES.to_le_bytes());
    e
}

fn bus_entry(id: u8, bus_type: [u8; 6]) -> [u8; SHORT_ENTRY_SIZE] {
    let mut e = [0u8; SHORT_ENTRY_SIZE];
    e[0] = ENTRY_BUS;
    e[1] = id;
    e[2..8].copy_from_slice(&bus_type);
    e
}

fn ioapic_entry(id: u8) -> [u8; SHORT_ENTRY_SIZE] {
    let mut e = [0u8; SHORT_ENTRY_SIZE];
    e[0] = ENTRY_IOAPIC;
    e[1] = id;
    e[2] = IOAPIC_VERSION;
    e[3] = IOAPIC_USABLE;
    e[4..8].copy_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    e
}

/// An I/O (type 3) or local (type 4) interrupt assignment; both share one layout.
fn interrupt_entry(
    kind: u8,
    int_type: u8,
    flags: u16,
    source_bus: u8,
    source_irq: u8,
    dest_id: u8,
    dest_pin: u8,
) -> [u8; SHORT_ENTRY_SIZE] {
    let mut e = [0u8; SHORT_ENTRY_SIZE];
    e[0] = kind;
    e[1] = int_type;
    e[2..4].copy_from_slice(&flags.to_le_bytes());
    e[4] = source_bus;
    e[5] = source_irq;
    e[6] = dest_id;
    e[7] = dest_pin;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoded configuration table entry: (type, bytes).
    fn entries(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let table = &bytes[FLOATING_POINTER_SIZE..];
        let length = u16::from_le_bytes([table[4], table[5]]) as usize;
        let mut out = Vec::new();
        let mut at = HEADER_SIZE;
        while at < length {
            let size = if table[at] == ENTRY_PROCESSOR {
                PROCESSOR_SIZE
            } else {
                SHORT_ENTRY_SIZE
            };
            out.push((table[at], table[at..at + size].to_vec()));
            at += size;
        }
        assert_eq!(at, length, "entries overrun the table length");
        out
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn of_type(bytes: &[u8], kind: u8) -> Vec<Vec<u8>> {
        entries(bytes)
            .into_iter()
            .filter(|(t, _)| *t == kind)
            .map(|(_, e)| e)
            .collect()
    }

    #[test]
    fn floating_pointer_points_at_table_and_sums_to_zero() {
        let bytes = MpTable::new(1).unwrap().to_bytes();
        let fp = &bytes[..16];
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(u32::from_le_bytes(fp[4..8].try_into().unwrap()), 0xf_0010);
        assert_eq!((fp[8], fp[9]), (1, 4));
        // "_MP_" + 0x10 + 0x00 + 0x0f + 1 + 4 = 0x17f, so the checksum is 0x100 - 0x7f.
        assert_eq!(fp[10], 0x81);
        assert_eq!(sum(fp), 0);
    }

    #[test]
    fn one_cpu_table_header_and_checksum() {
        let bytes = MpTable::new(1).unwrap().to_bytes();
        // 16 + 44 + 20 (cpu) + 8 (ISA bus) + 8 (IOAPIC) + 16 * 8 (ISA IRQs) + 2 * 8 (LINT) = 240.
        assert_eq!(bytes.len(), 240);
        assert_eq!(MpTable::new(1).unwrap().size(), 240);
        let table = &bytes[16..];
        assert_eq!(&table[0..4], b"PCMP");
        assert_eq!(u16::from_le_bytes([table[4], table[5]]), 224);
        assert_eq!(table[6], 4);
        assert_eq!(u16::from_le_bytes([table[34], table[35]]), 21);
        assert_eq!(
            u32::from_le_bytes(table[36..40].try_into().unwrap()),
            0xfee0_0000
        );
        assert_eq!(sum(table), 0);
    }

    #[test]
    fn processor_entries_for_many_cpus() {
        let bytes = MpTable::new(8).unwrap().to_bytes();
        let cpus = of_type(&bytes, ENTRY_PROCESSOR);
        assert_eq!(cpus.len(), 8);
        for (i, cpu) in cpus.iter().enumerate() {
            assert_eq!(cpu[1], i as u8, "APIC ID");
            assert_eq!(cpu[2], 0x14, "LAPIC version");
            assert_eq!(cpu[3], if i == 0 { 3 } else { 1 }, "flags");
        }
        assert_eq!(sum(&bytes[16..]), 0);
        let table = &bytes[16..];
        assert_eq!(
            u16::from_le_bytes([table[34], table[35]]),
            8 + 1 + 1 + 16 + 2
        );
    }

    #[test]
    fn ioapic_isa_irqs_and_lints() {
        let bytes = MpTable::new(4).unwrap().to_bytes();
        assert_eq!(of_type(&bytes, ENTRY_BUS), vec![b"\x01\x00ISA   ".to_vec()]);
        assert_eq!(
            of_type(&bytes, ENTRY_IOAPIC),
            vec![vec![2, 4, 0x11, 1, 0x00, 0x00, 0xc0, 0xfe]]
        );
        let irqs = of_type(&bytes, ENTRY_IO_INTERRUPT);
        assert_eq!(irqs.len(), 16);
        for (i, irq) in irqs.iter().enumerate() {
            let i = i as u8;
            assert_eq!(irq, &vec![3, 0, 0, 0, 0, i, 4, i]);
        }
        assert_eq!(
            of_type(&bytes, ENTRY_LOCAL_INTERRUPT),
            vec![
                vec![4, 3, 0, 0, 0, 0, 0, 0],
                vec![4, 1, 0, 0, 0, 0, 0xff, 1]
            ]
        );
    }

    #[test]
    fn rejects_zero_and_too_many_cpus() {
        assert!(matches!(MpTable::new(0), Err(Error::InvalidCpuCount(0))));
        assert!(matches!(
            MpTable::new(255),
            Err(Error::InvalidCpuCount(255))
        ));
    }

    #[test]
    fn largest_table_fits_in_the_bios_area() {
        // 240 bytes for one vCPU and 20 for each further one: 254 vCPUs take 5300 of 65536 bytes.
        let table = MpTable::new(254).unwrap();
        assert_eq!(table.size(), 240 + 253 * 20);
        assert!(MPTABLE_START + table.size() as u64 <= 0x10_0000);
        assert_eq!(MpTable::max_cpus(Some(8)), 254);
        assert!(matches!(
            MpTable::new(255),
            Err(Error::InvalidCpuCount(255))
        ));
    }

    #[test]
    fn pci_bus_routes() {
        let routes = [
            PciIntxRoute {
                device: 1,
                pin: IntxPin::A,
                ioapic_pin: 16,
            },
            PciIntxRoute {
                device: 2,
                pin: IntxPin::B,
                ioapic_pin: 10,
            },
        ];
        let table = MpTable::new(2).unwrap().with_pci_bus(&routes).unwrap();
        let bytes = table.to_bytes();
        assert_eq!(bytes.len(), table.size());
        assert_eq!(
            of_type(&bytes, ENTRY_BUS),
            vec![b"\x01\x00PCI   ".to_vec(), b"\x01\x01ISA   ".to_vec()]
        );
        let irqs = of_type(&bytes, ENTRY_IO_INTERRUPT);
        // Two PCI lines plus 15 ISA IRQs: ISA IRQ 10 gave its pin to the PCI device.
        assert_eq!(irqs.len(), 17);
        // Device 1 INTA#: source IRQ 1 << 2 | 0 = 4; device 2 INTB#: 2 << 2 | 1 = 9.
        assert_eq!(irqs[0], vec![3, 0, 0x0d, 0, 0, 4, 2, 16]);
        assert_eq!(irqs[1], vec![3, 0, 0x0d, 0, 0, 9, 2, 10]);
        assert!(irqs[2..].iter().all(|e| e[4] == 1 && e[7] != 10));
        assert!(of_type(&bytes, ENTRY_LOCAL_INTERRUPT)
            .iter()
            .all(|e| e[4] == 1));
        assert_eq!(sum(&bytes[16..]), 0);
    }

    #[test]
    fn rejects_bad_pci_routes() {
        let route = |device, pin, ioapic_pin| PciIntxRoute {
            device,
            pin,
            ioapic_pin,
        };
        let table = MpTable::new(1).unwrap();
        assert!(matches!(
            table.clone().with_pci_bus(&[route(32, IntxPin::A, 16)]),
            Err(Error::InvalidPciDevice(32))
        ));
        assert!(matches!(
            table.clone().with_pci_bus(&[route(1, IntxPin::A, 24)]),
            Err(Error::InvalidIoapicPin(24))
        ));
        assert!(matches!(
            table.clone().with_pci_bus(&[route(1, IntxPin::A, 2)]),
            Err(Error::InvalidIoapicPin(2))
        ));
        assert!(matches!(
            table
                .clone()
                .with_pci_bus(&[route(1, IntxPin::C, 16), route(1, IntxPin::C, 17)]),
            Err(Error::DuplicatePciRoute {
                device: 1,
                pin: IntxPin::C
            })
        ));
        // Different pins of one device, or one IOAPIC pin shared by two devices, are fine.
        assert!(table
            .with_pci_bus(&[
                route(1, IntxPin::A, 16),
                route(1, IntxPin::B, 16),
                route(2, IntxPin::A, 16)
            ])
            .is_ok());
    }

    #[test]
    fn pin_register_values() {
        assert_eq!(IntxPin::from_config_register(0), None);
        assert_eq!(IntxPin::from_config_register(1), Some(IntxPin::A));
        assert_eq!(IntxPin::from_config_register(4), Some(IntxPin::D));
        assert_eq!(IntxPin::from_config_register(5), None);
    }

    #[test]
    fn writes_to_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let table = MpTable::new(2).unwrap();
        table.write(&mem).unwrap();
        let mut back = vec![0u8; table.size()];
        mem.read_slice(&mut back, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(back, table.to_bytes());

        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9_f000)]).unwrap();
        assert!(matches!(
            table.write(&small),
            Err(Error::WriteGuestMemory(..))
        ));
    }
}
