//! Builds the boot tables a guest's kernel reads (the MP table, the zero page with its e820 map,
//! and the ACPI tables) into guest memory, then reads them back from guest memory and prints them
//! as the kernel would find them.
//!
//! `cargo run -p vmmkit-arch --example boot_tables [CPUS]` (default 2). No VM and no `/dev/kvm`
//! are involved: the tables are plain bytes in a `GuestMemoryMmap`. The guest gets a PCI bus with
//! two devices' INTA# lines routed to IOAPIC pins 16 and 17, the ISA devices a PC has (COM1, the
//! i8042), and an ACPI PM1a block at the ports the `vmmkit-legacy` crate's `AcpiPm` uses.

use arch::acpi::{AcpiConfig, IsaDevice, PciHostBridge, PmBlock};
use arch::layout::{CMDLINE_START, MPTABLE_START, PCI_MMIO_SIZE, PCI_MMIO_START, ZERO_PAGE_START};
use arch::{BootParamsConfig, IntxPin, MpTable, PciIntxRoute};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM for the example.
const RAM_SIZE: usize = 256 << 20;
/// Zero page offsets (Linux `Documentation/arch/x86/zero-page.rst`).
const ZP_ACPI_RSDP_ADDR: u64 = 0x070;
const ZP_E820_ENTRIES: u64 = 0x1e8;
const ZP_E820_TABLE: u64 = 0x2d0;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("boot_tables: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let num_cpus: u8 = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .map_err(|_| format!("the vCPU count must be a number from 1 to 254, not {arg:?}"))?,
        None => 2,
    };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM_SIZE)])?;

    // MP table: vCPUs, the IOAPIC, ISA IRQs on pins 0-15 and two PCI devices' INTA#.
    let routes = [
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
    let mptable = MpTable::new(num_cpus)?.with_pci_bus(&routes)?;
    mptable.write(&mem)?;
    print_mptable(&mem)?;

    // ACPI tables, which the zero page points at.
    let isa_devices = [
        IsaDevice {
            name: "COM1",
            hid: "PNP0501",
            ports: &[(0x3f8, 8)],
            irq: 4,
        },
        IsaDevice {
            name: "PS2K",
            hid: "PNP0303",
            ports: &[(0x60, 1), (0x64, 1)],
            irq: 1,
        },
    ];
    let acpi = arch::acpi::build(&AcpiConfig {
        num_cpus,
        ioapic_id: mptable.ioapic_id(),
        pm: PmBlock {
            evt_port: 0x600,
            evt_len: 4,
            cnt_port: 0x604,
            cnt_len: 2,
            sci_irq: 9,
            s5_slp_typ: 5,
        },
        isa_devices: &isa_devices,
        pci: Some(PciHostBridge {
            config_ports: (0xcf8, 8),
            mmio_window: (PCI_MMIO_START, PCI_MMIO_SIZE),
            routes: &routes,
        }),
    })?;
    acpi.write(&mem)?;

    // The zero page, with the e820 map of this guest's RAM.
    let e820 = arch::e820_entries(&arch::ram_regions(&mem))?;
    let cmdline = b"console=ttyS0\0";
    mem.write_slice(cmdline, GuestAddress(CMDLINE_START))?;
    arch::write_boot_params(
        &mem,
        &BootParamsConfig {
            setup_header: None,
            cmdline_addr: GuestAddress(CMDLINE_START),
            cmdline_size: cmdline.len(),
            initrd: None,
            e820: &e820,
            acpi_rsdp: Some(acpi.rsdp()),
        },
    )?;
    print_zero_page(&mem)?;
    print_acpi(&mem, &acpi)?;
    Ok(())
}

/// Walks the MP table from its floating pointer (MP spec 1.4, 4.1 to 4.3).
fn print_mptable(mem: &GuestMemoryMmap) -> Result<(), Box<dyn std::error::Error>> {
    let fp = GuestAddress(MPTABLE_START);
    let signature: [u8; 4] = mem.read_obj(fp)?;
    let table: u32 = mem.read_obj(GuestAddress(MPTABLE_START + 4))?;
    println!(
        "MP floating pointer at {:#x} ({}), configuration table at {table:#x}",
        fp.0,
        String::from_utf8_lossy(&signature)
    );
    let base = u64::from(table);
    let length: u16 = mem.read_obj(GuestAddress(base + 4))?;
    let entries: u16 = mem.read_obj(GuestAddress(base + 34))?;
    let lapic: u32 = mem.read_obj(GuestAddress(base + 36))?;
    println!("  {length} bytes, {entries} entries, local APICs at {lapic:#x}");
    let mut at = base + 44;
    for _ in 0..entries {
        let mut entry = [0u8; 20];
        mem.read_slice(&mut entry[..8], GuestAddress(at))?;
        match entry[0] {
            0 => {
                mem.read_slice(&mut entry, GuestAddress(at))?;
                let bsp = if entry[3] & 2 != 0 { ", boot CPU" } else { "" };
                println!("  processor  APIC ID {}{bsp}", entry[1]);
                at += 20;
                continue;
            }
            1 => println!(
                "  bus        {} {}",
                entry[1],
                String::from_utf8_lossy(&entry[2..8]).trim_end()
            ),
            2 => println!(
                "  IOAPIC     ID {} at {:#x}",
                entry[1],
                u32::from_le_bytes(entry[4..8].try_into()?)
            ),
            3 => println!(
                "  I/O int    bus {} IRQ {:#04x} -> IOAPIC {} pin {}",
                entry[4], entry[5], entry[6], entry[7]
            ),
            4 => {
                // Interrupt types (MP spec 1.4, table 4-8).
                let kind = match entry[1] {
                    0 => "INT",
                    1 => "NMI",
                    2 => "SMI",
                    _ => "ExtINT",
                };
                println!(
                    "  local int  {kind} -> LINT{} of every local APIC",
                    entry[7]
                );
            }
            other => return Err(format!("unknown MP table entry type {other}").into()),
        }
        at += 8;
    }
    Ok(())
}

/// The e820 map and the RSDP as the kernel reads them from the zero page.
fn print_zero_page(mem: &GuestMemoryMmap) -> Result<(), Box<dyn std::error::Error>> {
    let rsdp: u64 = mem.read_obj(GuestAddress(ZERO_PAGE_START + ZP_ACPI_RSDP_ADDR))?;
    let count: u8 = mem.read_obj(GuestAddress(ZERO_PAGE_START + ZP_E820_ENTRIES))?;
    println!("zero page at {ZERO_PAGE_START:#x}: acpi_rsdp_addr {rsdp:#x}, {count} e820 entries");
    for i in 0..u64::from(count) {
        let entry = GuestAddress(ZERO_PAGE_START + ZP_E820_TABLE + i * 20);
        let addr: u64 = mem.read_obj(entry)?;
        let size: u64 = mem.read_obj(GuestAddress(entry.0 + 8))?;
        let kind: u32 = mem.read_obj(GuestAddress(entry.0 + 16))?;
        let kind = match kind {
            1 => "RAM",
            2 => "reserved",
            _ => "other",
        };
        println!("  e820 {addr:#012x}..{:#012x} {kind}", addr + size);
    }
    Ok(())
}

/// Each ACPI table's header as it sits in guest memory, and whether its checksum holds.
fn print_acpi(
    mem: &GuestMemoryMmap,
    acpi: &arch::acpi::AcpiTables,
) -> Result<(), Box<dyn std::error::Error>> {
    println!("ACPI tables, RSDP at {:#x}", acpi.rsdp().0);
    for table in &acpi.tables {
        let mut bytes = vec![0u8; table.bytes.len()];
        mem.read_slice(&mut bytes, GuestAddress(table.addr))?;
        // The RSDP's checksum covers its first 20 bytes (ACPI 6.5, 5.2.5.3); the FACS has none.
        let summed = match &table.signature {
            b"RSD " => &bytes[..20],
            b"FACS" => &[][..],
            _ => &bytes[..],
        };
        let sum = summed.iter().fold(0u8, |sum, b| sum.wrapping_add(*b));
        println!(
            "  {} at {:#x}, {} bytes, checksum {}",
            String::from_utf8_lossy(&table.signature),
            table.addr,
            bytes.len(),
            if sum == 0 { "ok" } else { "BAD" }
        );
    }
    Ok(())
}
