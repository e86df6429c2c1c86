//! ACPI tables (ACPI 6.5, chapter 5 "ACPI Software Programming Model"), built with the
//! `acpi_tables` crate: RSDP, XSDT, FADT, FACS, MADT and a DSDT.
//!
//! They sit in the BIOS area at [`ACPI_START`]..[`ACPI_END`] (see [`crate::layout`]), which the
//! e820 map reserves, in this order, each aligned as the spec asks (8 bytes, 64 for the FACS):
//!
//! | table | what it says |
//! |---|---|
//! | RSDP (5.2.5) | at [`ACPI_START`], 16-byte aligned in `0xE0000..0xFFFFF` where Linux scans for it; also passed in `boot_params.hdr.acpi_rsdp_addr` and PVH's `rsdp_paddr` |
//! | XSDT (5.2.8) | the FADT and the MADT |
//! | FADT (5.2.9) | not hardware-reduced: a PM1a event block and control block on I/O ports, the SCI on ISA IRQ 9, the fixed-feature power button, no PM timer, no GPE block, no `SMI_CMD` (always in ACPI mode), no C2/C3 |
//! | FACS (5.2.10) | required beside a full (not hardware-reduced) FADT |
//! | MADT (5.2.12) | one local APIC per vCPU, the IOAPIC, the SCI's interrupt source override, LINT1 as NMI |
//! | DSDT (5.2.11.1) | the PCI host bridge (with `--transport pci`), COM1, the keyboard controller, `\_S5` |
//!
//! Why a full FADT rather than a hardware-reduced one (as Firecracker and Cloud Hypervisor use):
//! a hardware-reduced platform has no PM1 blocks and no fixed-feature power button, so the button
//! needs a Generic Event Device with an AML `_EVT` method and `Notify`, and soft-off needs the
//! sleep control register. PM1a is what every x86 kernel's ACPI core handles without running a
//! line of AML (the button is a fixed event read from `PM1_STS`), and AML interpretation is what
//! costs most where the guest kernel is emulated. The DSDT therefore holds data only: no method.
//!
//! ISA IRQs keep KVM's identity routing (GSI *n* is IOAPIC pin *n*, see [`crate::mptable`]): the
//! PIT's interrupt arrives on pin 0, so unlike QEMU (which routes it to pin 2) there is no IRQ 0
//! override. The SCI's override says level-triggered, active high: the spec's SCI is level and
//! shareable, and KVM's IOAPIC treats a raised line as asserted whatever the polarity, as the
//! MP table's PCI entries also say.

use acpi_tables::aml;
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{ACPI_END, ACPI_START, IOAPIC_START, LAPIC_START};
use crate::mptable::{PciIntxRoute, MAX_CPUS};
use crate::{Error, Result};

/// OEM ID in every table header.
pub const OEM_ID: [u8; 6] = *b"RUSTVM";
/// OEM table ID in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"VMMACPI ";
const OEM_REVISION: u32 = 1;

/// FADT `IAPC_BOOT_ARCH` (5.2.9.3): legacy ISA devices, an 8042 (without it Linux leaves the
/// i8042 alone, and `reboot=k` relies on it), no VGA.
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// FADT `P_LVL2_LAT` above 100 and `P_LVL3_LAT` above 1000: no C2 or C3 state.
const NO_C2_LATENCY: u16 = 101;
const NO_C3_LATENCY: u16 = 1001;

/// MADT header flag: the platform also has dual 8259 PICs (KVM's in-kernel PIC).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT revision (ACPI 5.0's layout; Linux reads the online-capable flag only from revision 5).
const MADT_REVISION: u8 = 3;
/// MADT structure types (table 5.21).
const MADT_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MPS INTI flags (table 5.26): active high (bits 1:0 = 01), level-triggered (bits 3:2 = 11).
const INTI_ACTIVE_HIGH_LEVEL: u16 = 0b01 | (0b11 << 2);
/// Local APIC NMI: every processor.
const ALL_PROCESSORS: u8 = 0xff;

/// FACS alignment (5.2.10: 64 bytes).
const FACS_ALIGN: u64 = 64;
/// Alignment of every other table.
const TABLE_ALIGN: u64 = 16;

/// The PM1a blocks of the platform's power-management device, as the FADT describes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PmBlock {
    /// `PM1a_EVT_BLK`: the status and enable registers.
    pub evt_port: u16,
    pub evt_len: u8,
    /// `PM1a_CNT_BLK`: the control register.
    pub cnt_port: u16,
    pub cnt_len: u8,
    /// ISA IRQ of the SCI.
    pub sci_irq: u8,
    /// The `SLP_TYP` value of S5, which `\_S5` announces.
    pub s5_slp_typ: u8,
}

/// A legacy ISA device the DSDT describes, with a PNP ID and a fixed name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IsaDevice<'a> {
    /// Four-character ACPI name, such as `COM1`.
    pub name: &'static str,
    /// EISA PNP ID, such as `PNP0501`.
    pub hid: &'static str,
    /// `(first port, number of ports)` ranges.
    pub ports: &'a [(u16, u8)],
    /// ISA IRQ (edge-triggered, active high).
    pub irq: u8,
}

/// The PCI host bridge of bus 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHostBridge<'a> {
    /// The configuration mechanism #1 ports (`0xcf8`, 8 ports).
    pub config_ports: (u16, u8),
    /// The 32-bit window the VMM places memory BARs in: `(start, size)`.
    pub mmio_window: (u64, u64),
    /// The devices' INTx lines, for `_PRT`.
    pub routes: &'a [PciIntxRoute],
}

/// What the tables describe.
#[derive(Debug, Clone, Copy)]
pub struct AcpiConfig<'a> {
    pub num_cpus: u8,
    /// The IOAPIC's ID (the MP table's, see [`crate::MpTable::ioapic_id`]).
    pub ioapic_id: u8,
    pub pm: PmBlock,
    pub isa_devices: &'a [IsaDevice<'a>],
    /// `None` when the guest has no PCI bus.
    pub pci: Option<PciHostBridge<'a>>,
}

/// One table placed in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedTable {
    pub signature: [u8; 4],
    pub addr: u64,
    pub bytes: Vec<u8>,
}

impl PlacedTable {
    /// End (exclusive) of the table.
    pub fn end(&self) -> u64 {
        self.addr + self.bytes.len() as u64
    }
}

/// The tables, ready to be written; [`AcpiTables::rsdp`] is what the boot protocols pass on.
#[derive(Debug, Clone)]
pub struct AcpiTables {
    pub tables: Vec<PlacedTable>,
}

impl AcpiTables {
    /// Address of the RSDP.
    pub fn rsdp(&self) -> GuestAddress {
        GuestAddress(ACPI_START)
    }

    /// Writes every table to guest memory.
    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<()> {
        for table in &self.tables {
            mem.write_slice(&table.bytes, GuestAddress(table.addr))
                .map_err(|e| Error::WriteGuestMemory("ACPI tables", e))?;
        }
        Ok(())
    }
}

fn to_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

fn align_up(addr: u64, align: u64) -> u64 {
    addr.div_ceil(align) * align
}

/// Hands out addresses in `ACPI_START..ACPI_END`.
struct Placer {
    next: u64,
}

impl Placer {
    fn place(&mut self, len: usize, align: u64) -> Result<u64> {
        let addr = align_up(self.next, align);
        let end = addr + len as u64;
        if end > ACPI_END {
            return Err(Error::AcpiTablesTooLarge {
                size: (end - ACPI_START) as usize,
                room: (ACPI_END - ACPI_START) as usize,
            });
        }
        self.next = end;
        Ok(addr)
    }
}

/// Builds every table for `config` and places them from [`ACPI_START`].
pub fn build(config: &AcpiConfig) -> Result<AcpiTables> {
    if config.num_cpus == 0 || config.num_cpus > MAX_CPUS {
        return Err(Error::InvalidCpuCount(config.num_cpus));
    }
    let dsdt = dsdt(config);
    let madt = madt(config);
    let facs = to_bytes(&FACS::new());

    let mut placer = Placer { next: ACPI_START };
    let rsdp_addr = placer.place(Rsdp::len(), TABLE_ALIGN)?;
    // Two entries: the FADT and the MADT.
    let xsdt_addr = placer.place(36 + 2 * 8, TABLE_ALIGN)?;
    let fadt_addr = placer.place(acpi_tables::fadt::FADT::len(), TABLE_ALIGN)?;
    let facs_addr = placer.place(facs.len(), FACS_ALIGN)?;
    let madt_addr = placer.place(madt.len(), TABLE_ALIGN)?;
    let dsdt_addr = placer.place(dsdt.len(), TABLE_ALIGN)?;

    let fadt = to_bytes(&fadt(config, facs_addr, dsdt_addr));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    let placed = |signature: &[u8; 4], addr: u64, bytes: Vec<u8>| PlacedTable {
        signature: *signature,
        addr,
        bytes,
    };
    Ok(AcpiTables {
        tables: vec![
            placed(b"RSD ", rsdp_addr, rsdp),
            placed(b"XSDT", xsdt_addr, to_bytes(&xsdt)),
            placed(b"FACP", fadt_addr, fadt),
            placed(b"FACS", facs_addr, facs),
            placed(b"APIC", madt_addr, madt),
            placed(b"DSDT", dsdt_addr, dsdt),
        ],
    })
}

/// The FADT. The 32-bit address fields only: everything lies below 1 MiB, and ACPICA derives the
/// 64-bit generic addresses from them, so the two can never disagree.
fn fadt(config: &AcpiConfig, facs_addr: u64, dsdt_addr: u64) -> acpi_tables::fadt::FADT {
    let pm = &config.pm;
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .preferred_pm_profile(PmProfile::EnterpriseServer)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        // No sleep button and no RTC wake: only the power button is a fixed feature (PWR_BUTTON
        // stays clear).
        .flag(Flags::SlpButton)
        .flag(Flags::FixRtc);
    fadt.firmware_ctrl = (facs_addr as u32).into();
    fadt.dsdt = (dsdt_addr as u32).into();
    fadt.sci_int = u16::from(pm.sci_irq).into();
    fadt.pm1a_evt_blk = u32::from(pm.evt_port).into();
    fadt.pm1_evt_len = pm.evt_len;
    fadt.pm1a_cnt_blk = u32::from(pm.cnt_port).into();
    fadt.pm1_cnt_len = pm.cnt_len;
    fadt.p_lvl2_lat = NO_C2_LATENCY.into();
    fadt.p_lvl3_lat = NO_C3_LATENCY.into();
    fadt.iapc_boot_arch = (IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT).into();
    fadt.finalize()
}

/// The MADT. The crate's MADT cannot set the PC-AT flag nor hold overrides or NMI entries, so it
/// is laid out on the crate's generic `Sdt`, with the crate's processor and IOAPIC structures.
fn madt(config: &AcpiConfig) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        44,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(36, LAPIC_START as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for cpu in 0..config.num_cpus {
        madt.append_slice(&to_bytes(&ProcessorLocalApic::new(
            cpu,
            cpu,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&to_bytes(&IoApic::new(
        config.ioapic_id,
        IOAPIC_START as u32,
        0,
    )));
    // Interrupt source override (5.2.12.5): ISA bus 0, the SCI's IRQ onto the same GSI.
    let mut iso = vec![MADT_INTERRUPT_OVERRIDE, 10, 0, config.pm.sci_irq];
    iso.extend_from_slice(&u32::from(config.pm.sci_irq).to_le_bytes());
    iso.extend_from_slice(&INTI_ACTIVE_HIGH_LEVEL.to_le_bytes());
    madt.append_slice(&iso);
    // Local APIC NMI (5.2.12.7) on LINT1 of every processor, as the MP table says.
    madt.append_slice(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 0, 1]);
    madt.as_slice().to_vec()
}

/// An ISA device: `_HID`, `_UID` and `_CRS` with its ports and IRQ.
fn isa_device_aml(device: &IsaDevice, uid: u8) -> Vec<u8> {
    let ports: Vec<aml::IO> = device
        .ports
        .iter()
        .map(|&(base, len)| aml::IO::new(base, base, 1, len))
        .collect();
    let irq = aml::Interrupt::new(true, true, false, false, u32::from(device.irq));
    let mut resources: Vec<&dyn Aml> = ports.iter().map(|p| p as &dyn Aml).collect();
    resources.push(&irq);
    let crs = aml::ResourceTemplate::new(resources);
    to_bytes(&aml::Device::new(
        device.name.into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new(device.hid)),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// PCI bus 0's host bridge (PCI Firmware Specification 3.3, 4.1.1): `_CRS` with bus 0, the
/// configuration ports, all other I/O ports and the BAR window, and `_PRT` with each device's
/// INTx line on its IOAPIC pin (a GSI, so the source is 0).
fn pci_host_bridge_aml(pci: &PciHostBridge) -> Vec<u8> {
    let (cfg_base, cfg_len) = pci.config_ports;
    let (mmio_start, mmio_size) = pci.mmio_window;
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cfg = aml::IO::new(cfg_base, cfg_base, 1, cfg_len);
    let io_below = aml::AddressSpace::new_io(0u16, cfg_base.saturating_sub(1), None);
    let io_above =
        aml::AddressSpace::new_io(cfg_base.saturating_add(u16::from(cfg_len)), 0xffff, None);
    // A 32-bit window: it lies in the MMIO hole below 4 GiB.
    let mmio_end = mmio_start.saturating_add(mmio_size.max(1) - 1);
    let mmio = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        u32::try_from(mmio_start).unwrap_or(u32::MAX),
        u32::try_from(mmio_end).unwrap_or(u32::MAX),
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cfg, &io_below, &io_above, &mmio]);

    struct PrtEntry {
        address: u32,
        pin: u8,
        gsi: u32,
    }
    let entries: Vec<PrtEntry> = pci
        .routes
        .iter()
        .map(|route| PrtEntry {
            // Device in the high word, any function (0xffff).
            address: (u32::from(route.device) << 16) | 0xffff,
            pin: route.pin.index(),
            gsi: u32::from(route.ioapic_pin),
        })
        .collect();
    let packages: Vec<aml::Package> = entries
        .iter()
        .map(|e| aml::Package::new(vec![&e.address, &e.pin, &aml::ZERO, &e.gsi]))
        .collect();
    let prt = aml::Package::new(packages.iter().map(|p| p as &dyn Aml).collect());

    to_bytes(&aml::Device::new(
        "PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
            &aml::Name::new("_PRT".into(), &prt),
        ],
    ))
}

/// The DSDT: devices under `\_SB`, and `\_S5` (7.4.2) with the PM block's S5 sleep type.
fn dsdt(config: &AcpiConfig) -> Vec<u8> {
    let mut devices: Vec<Vec<u8>> = config
        .isa_devices
        .iter()
        .enumerate()
        .map(|(i, d)| isa_device_aml(d, i as u8))
        .collect();
    if let Some(pci) = &config.pci {
        devices.push(pci_host_bridge_aml(pci));
    }
    let sb = aml::Scope::raw("\\_SB_".into(), devices.concat());
    let s5_typ = config.pm.s5_slp_typ;
    let s5 = aml::Name::new(
        "\\_S5_".into(),
        &aml::Package::new(vec![&s5_typ, &s5_typ, &aml::ZERO, &aml::ZERO]),
    );
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&sb);
    dsdt.append_slice(&to_bytes(&s5));
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootparams::{e820_entries, E820Kind};
    use crate::mptable::IntxPin;

    const PM: PmBlock = PmBlock {
        evt_port: 0x600,
        evt_len: 4,
        cnt_port: 0x604,
        cnt_len: 2,
        sci_irq: 9,
        s5_slp_typ: 5,
    };
    const COM1_PORTS: [(u16, u8); 1] = [(0x3f8, 8)];
    const ISA: [IsaDevice; 1] = [IsaDevice {
        name: "COM1",
        hid: "PNP0501",
        ports: &COM1_PORTS,
        irq: 4,
    }];
    const ROUTES: [PciIntxRoute; 2] = [
        PciIntxRoute {
            device: 1,
            pin: IntxPin::A,
            ioapic_pin: 16,
        },
        PciIntxRoute {
            device: 2,
            pin: IntxPin::A,
            ioapic_pin: 17,
        },
    ];

    fn config(num_cpus: u8, pci: bool) -> AcpiConfig<'static> {
        AcpiConfig {
            num_cpus,
            ioapic_id: num_cpus,
            pm: PM,
            isa_devices: &ISA,
            pci: pci.then_some(PciHostBridge {
                config_ports: (0xcf8, 8),
                mmio_window: (0xc000_0000, 0x1000_0000),
                routes: &ROUTES,
            }),
        }
    }

    fn table<'a>(tables: &'a AcpiTables, signature: &[u8; 4]) -> &'a PlacedTable {
        tables
            .tables
            .iter()
            .find(|t| &t.signature == signature)
            .unwrap_or_else(|| panic!("no {} table", String::from_utf8_lossy(signature)))
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    /// The MADT's structures as (type, bytes).
    fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            let len = usize::from(madt[at + 1]);
            assert!(len >= 2, "a zero-length MADT entry at {at}");
            entries.push((madt[at], madt[at..at + len].to_vec()));
            at += len;
        }
        assert_eq!(at, madt.len(), "the last MADT entry runs past the table");
        entries
    }

    #[test]
    fn every_table_has_its_signature_length_and_checksum() {
        let tables = build(&config(2, true)).unwrap();
        for t in &tables.tables {
            match &t.signature {
                b"RSD " => {
                    assert_eq!(&t.bytes[..8], b"RSD PTR ");
                    assert_eq!(sum(&t.bytes[..20]), 0, "RSDP v1 checksum");
                    assert_eq!(sum(&t.bytes), 0, "RSDP extended checksum");
                    assert_eq!(u32_at(&t.bytes, 20) as usize, t.bytes.len());
                    assert_eq!(t.bytes[15], 2, "revision 2 has the XSDT address");
                }
                b"FACS" => {
                    assert_eq!(&t.bytes[..4], b"FACS");
                    assert_eq!(u32_at(&t.bytes, 4), 64);
                    assert_eq!(t.addr % 64, 0, "the FACS is 64-byte aligned");
                }
                signature => {
                    assert_eq!(&t.bytes[..4], signature);
                    assert_eq!(u32_at(&t.bytes, 4) as usize, t.bytes.len(), "length field");
                    assert_eq!(
                        sum(&t.bytes),
                        0,
                        "{} checksum",
                        String::from_utf8_lossy(signature)
                    );
                    assert_eq!(&t.bytes[10..16], &OEM_ID);
                }
            }
        }
    }

    #[test]
    fn the_pointers_chain_rsdp_to_xsdt_to_fadt_to_dsdt_and_facs() {
        let tables = build(&config(1, false)).unwrap();
        assert_eq!(tables.rsdp().0, table(&tables, b"RSD ").addr);
        assert_eq!(tables.rsdp().0 % 16, 0, "Linux scans 16-byte boundaries");
        let xsdt = table(&tables, b"XSDT");
        assert_eq!(u64_at(&table(&tables, b"RSD ").bytes, 24), xsdt.addr);
        let entries: Vec<u64> = (36..xsdt.bytes.len())
            .step_by(8)
            .map(|at| u64_at(&xsdt.bytes, at))
            .collect();
        assert_eq!(
            entries,
            [table(&tables, b"FACP").addr, table(&tables, b"APIC").addr]
        );
        let fadt = &table(&tables, b"FACP").bytes;
        assert_eq!(u32_at(fadt, 36) as u64, table(&tables, b"FACS").addr);
        assert_eq!(u32_at(fadt, 40) as u64, table(&tables, b"DSDT").addr);
    }

    #[test]
    fn the_fadt_describes_the_pm_block_sci_and_power_button() {
        let tables = build(&config(1, false)).unwrap();
        let fadt = &table(&tables, b"FACP").bytes;
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 9, "SCI_INT");
        assert_eq!(u32_at(fadt, 48), 0, "no SMI_CMD: always in ACPI mode");
        assert_eq!(u32_at(fadt, 56), 0x600, "PM1a_EVT_BLK");
        assert_eq!(u32_at(fadt, 64), 0x604, "PM1a_CNT_BLK");
        assert_eq!((fadt[88], fadt[89]), (4, 2), "PM1_EVT_LEN, PM1_CNT_LEN");
        assert_eq!(u32_at(fadt, 76), 0, "no PM timer");
        let flags = u32_at(fadt, 112);
        assert_eq!(flags & (1 << 4), 0, "the power button is a fixed feature");
        assert_eq!(flags & (1 << 20), 0, "not hardware-reduced");
        assert_ne!(flags & (1 << 5), 0, "no fixed sleep button");
        let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_ne!(boot_arch & IAPC_8042, 0);
    }

    #[test]
    fn the_madt_has_one_local_apic_per_vcpu_the_ioapic_and_the_sci_override() {
        for num_cpus in [1u8, 2, 7, MAX_CPUS] {
            let tables = build(&config(num_cpus, true)).unwrap();
            let madt = &table(&tables, b"APIC").bytes;
            assert_eq!(u32_at(madt, 36), 0xfee0_0000);
            let entries = madt_entries(madt);
            let lapics: Vec<&Vec<u8>> = entries
                .iter()
                .filter(|(kind, _)| *kind == 0)
                .map(|(_, e)| e)
                .collect();
            assert_eq!(lapics.len(), usize::from(num_cpus));
            for (i, lapic) in lapics.iter().enumerate() {
                assert_eq!(lapic[2] as usize, i, "processor UID");
                assert_eq!(lapic[3] as usize, i, "APIC ID");
                assert_eq!(u32_at(lapic, 4), 1, "enabled");
            }
            let ioapics: Vec<&Vec<u8>> = entries
                .iter()
                .filter(|(kind, _)| *kind == 1)
                .map(|(_, e)| e)
                .collect();
            assert_eq!(ioapics.len(), 1);
            assert_eq!(ioapics[0][2], num_cpus, "IOAPIC ID after the vCPUs'");
            assert_eq!(u32_at(ioapics[0], 4), 0xfec0_0000);
            assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");
            let overrides: Vec<&Vec<u8>> = entries
                .iter()
                .filter(|(kind, _)| *kind == 2)
                .map(|(_, e)| e)
                .collect();
            assert_eq!(
                overrides.len(),
                1,
                "only the SCI's: ISA IRQ 0 stays on pin 0"
            );
            assert_eq!(overrides[0][3], 9);
            assert_eq!(u32_at(overrides[0], 4), 9);
            assert_eq!(u16::from_le_bytes([overrides[0][8], overrides[0][9]]), 0x0d);
        }
    }

    /// Whether `needle` occurs in `haystack`.
    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn the_dsdt_holds_s5_com1_and_the_pci_bridge_only_with_pci() {
        let with = build(&config(1, true)).unwrap();
        let dsdt = &table(&with, b"DSDT").bytes;
        // Name(\_S5_, Package(4) {5, 5, 0, 0}): NameOp, root, name, PackageOp, length, count.
        assert!(contains(
            dsdt,
            b"\x08\\_S5_\x12\x08\x04\x0a\x05\x0a\x05\x00\x00"
        ));
        assert!(contains(dsdt, b"COM1"));
        // COM1's I/O descriptor: 0x3f8..0x3f8, alignment 1, 8 ports.
        assert!(contains(dsdt, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]));
        assert!(contains(dsdt, b"PCI0"));
        assert!(contains(dsdt, b"_PRT"));
        // The configuration ports and the BAR window's DWord memory descriptor bounds.
        assert!(contains(dsdt, &[0x47, 1, 0xf8, 0xc, 0xf8, 0xc, 1, 8]));
        assert!(contains(
            dsdt,
            &[0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0xff, 0xff, 0xcf]
        ));
        // _PRT entry of device 2: address 0x0002ffff, pin 0, source 0, GSI 17.
        assert!(contains(
            dsdt,
            &[0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 2, 0, 0x00, 0x00, 0x0a, 17]
        ));

        let without = build(&config(1, false)).unwrap();
        let dsdt = &table(&without, b"DSDT").bytes;
        assert!(!contains(dsdt, b"PCI0"));
        assert!(contains(dsdt, b"COM1"));
    }

    #[test]
    fn the_tables_do_not_overlap_and_lie_in_reserved_e820_space() {
        let e820 = e820_entries(&[(0, 512 << 20)]).unwrap();
        for num_cpus in [1u8, MAX_CPUS] {
            let tables = build(&config(num_cpus, true)).unwrap();
            let mut ranges: Vec<(u64, u64)> =
                tables.tables.iter().map(|t| (t.addr, t.end())).collect();
            ranges.sort_unstable();
            for w in ranges.windows(2) {
                assert!(w[0].1 <= w[1].0, "{:x?} overlaps {:x?}", w[0], w[1]);
            }
            for t in &tables.tables {
                assert!(t.addr >= ACPI_START && t.end() <= ACPI_END);
                assert!(
                    e820.iter().any(|e| e.kind == E820Kind::Reserved
                        && e.addr <= t.addr
                        && t.end() <= e.addr + e.size),
                    "{} at {:#x} is not in reserved e820 space",
                    String::from_utf8_lossy(&t.signature),
                    t.addr
                );
            }
        }
    }

    #[test]
    fn bad_cpu_counts_are_refused() {
        assert!(matches!(
            build(&config(0, false)),
            Err(Error::InvalidCpuCount(0))
        ));
        assert!(build(&config(255, false)).is_err());
    }

    #[test]
    fn the_tables_reach_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let tables = build(&config(2, true)).unwrap();
        tables.write(&mem).unwrap();
        let mut signature = [0u8; 8];
        mem.read_slice(&mut signature, tables.rsdp()).unwrap();
        assert_eq!(&signature, b"RSD PTR ");
        let dsdt = table(&tables, b"DSDT");
        let mut back = vec![0u8; dsdt.bytes.len()];
        mem.read_slice(&mut back, GuestAddress(dsdt.addr)).unwrap();
        assert_eq!(back, dsdt.bytes);
    }
}
