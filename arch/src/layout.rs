//! The guest's physical memory map (boot structures, RAM, the 32-bit MMIO hole) and its port and
//! interrupt map: where everything lives, in one place.
//!
//! Below 1 MiB (inside the first e820 RAM entry up to the command line; the rest in the reserved
//! legacy area `0x9_fc00..0x10_0000`):
//!
//! | range               | content                                                        |
//! |---------------------|----------------------------------------------------------------|
//! | `0x0500..0x0530`    | boot GDT (6 entries, see [`crate::gdt`])                       |
//! | `0x0530..0x0538`    | empty IDT                                                      |
//! | `0x6000..0x7000`    | PVH boot only: `hvm_start_info`, module list, memory map       |
//! | `0x7000..0x8000`    | zero page (`struct boot_params`), 64-bit boot protocol only    |
//! | `0x8000..0x8ff0`    | boot stack (grows down from `0x8ff0`)                          |
//! | `0x9000..0xf000`    | page tables: PML4, PDPT, four page directories                 |
//! | `0x2_0000..0x3_0000`| kernel command line (64 KiB at most)                           |
//! | `0xa_0000..0x10_0000`| legacy VGA / option ROM / BIOS area, reserved in e820         |
//! | `0xe_0000..0xe_4000`| VMM's own pages (kvm-pvm `syscall` trampoline)                 |
//! | `0xe_4000..0xf_0000`| ACPI tables, RSDP first (see [`crate::acpi`])                  |
//! | `0xf_0000..0x10_0000`| MP table (BIOS ROM area, where Linux scans for it)            |
//!
//! The page tables identity-map the first 4 GiB with 2 MiB pages: four page directories
//! (`0xb000..0xf000`) rather than 1 GiB pages, because 2 MiB pages need no CPUID feature
//! (1 GiB pages need `pdpe1gb`, which not every host passes through).
//!
//! Above 3 GiB: the MMIO hole `0xc000_0000..0x1_0000_0000` holds no RAM:
//!
//! | range                        | content                                              |
//! |------------------------------|------------------------------------------------------|
//! | `0xc000_0000..0xd000_0000`   | PCI memory BARs ([`PCI_MMIO_START`])                 |
//! | `0xd000_0000..0xd000_7000`   | virtio-mmio windows ([`VIRTIO_MMIO_START`])          |
//! | `0xfec0_0000`                | IOAPIC (in KVM)                                      |
//! | `0xfee0_0000`                | LAPIC (in KVM)                                       |
//! | `0xfffb_b000..0xfffc_0000`   | VMM's unbacked page, KVM's identity map page and TSS |
//!
//! RAM above the hole starts at 4 GiB. KVM's private pages (TSS and identity-map page) are used
//! by KVM on Intel hosts without unrestricted guest.

/// Boot GDT (null, null, code, data, TSS low, TSS high).
pub const GDT_START: u64 = 0x500;
/// Number of 8-byte entries in the boot GDT.
pub const GDT_ENTRIES: usize = 6;
/// Empty IDT, right after the GDT.
///
/// The brief placed it at 0x520, but the boot protocol wants the code and data selectors at 0x10 and
/// 0x18, which with a 16-byte long-mode TSS descriptor makes the GDT 48 bytes long.
pub const IDT_START: u64 = GDT_START + GDT_ENTRIES as u64 * 8;

/// PVH boot: `struct hvm_start_info`, whose address the kernel receives in EBX (see
/// [`crate::pvh`]). The module list and the memory map follow in the same page, so the whole PVH
/// boot information sits below the zero page, which a PVH boot does not use.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH boot: the `hvm_modlist_entry` array (one entry, the initramfs).
pub const PVH_MODLIST_START: u64 = PVH_INFO_START + 0x40;
/// Room for module list entries at [`PVH_MODLIST_START`] (32 bytes each).
pub const PVH_MODLIST_MAX: usize = 2;
/// PVH boot: the `hvm_memmap_table_entry` array, the e820 map in PVH's form.
pub const PVH_MEMMAP_START: u64 = PVH_INFO_START + 0x80;
/// End (exclusive) of the PVH boot information page.
pub const PVH_INFO_END: u64 = PVH_INFO_START + 0x1000;

/// The zero page: `struct boot_params`, whose address the kernel receives in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer (RSP and RBP); the kernel switches to its own stack almost at once.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Page-map level 4 table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories (one per GiB of the identity map).
pub const PDE_START: u64 = 0xb000;
/// Number of page directories, each mapping 1 GiB with 2 MiB pages.
pub const PDE_TABLES: u64 = 4;
/// Bytes identity-mapped by the boot page tables.
pub const IDENTITY_MAP_SIZE: u64 = PDE_TABLES << 30;

/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line (with its terminating NUL) that fits at [`CMDLINE_START`].
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;

/// Start of the Extended BIOS Data Area: the last KiB of the 640 KiB of base memory.
pub const EBDA_START: u64 = 0x9_fc00;
/// Four pages in the reserved BIOS area for the VMM's own use: on hosts whose KVM emulates the
/// guest kernel, the `syscall` trampoline's page tables and code (see the `pvm` crate's `syscall` module).
pub const VMM_RESERVED_START: u64 = 0xe_0000;
/// Size of [`VMM_RESERVED_START`]'s area.
pub const VMM_RESERVED_SIZE: u64 = 0x4000;
/// A guest-physical page that nothing backs, not even a device: the `syscall` trampoline maps it
/// so that a fetch from it exits to the VMM. Below the KVM identity-map page, above every BAR.
pub const VMM_UNBACKED_PAGE: u64 = 0xfffb_b000;

/// ACPI tables, the RSDP first: in the BIOS area that Linux scans for the RSDP
/// (`0xE0000..0xFFFFF`), after the VMM's own pages and before the MP table. 48 KiB; the tables for
/// 254 vCPUs take about 3.
pub const ACPI_START: u64 = VMM_RESERVED_START + VMM_RESERVED_SIZE;
/// End (exclusive) of the room for the ACPI tables.
pub const ACPI_END: u64 = MPTABLE_START;

/// MP floating pointer and configuration table: the BIOS ROM area, which Linux scans and which
/// leaves room for 254 vCPUs (the last KiB of base memory would hold only 40).
pub const MPTABLE_START: u64 = 0xf_0000;
/// End (exclusive) of the room for the MP table: the end of the BIOS ROM area.
pub const MPTABLE_END: u64 = 0x10_0000;

/// First byte above the legacy area; kernels load here.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole (3 GiB): RAM below 4 GiB stops here.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO hole; RAM continues here.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;

/// Window for 32-bit PCI memory BARs: the first 256 MiB of the hole.
pub const PCI_MMIO_START: u64 = MMIO_HOLE_START;
/// End (exclusive) of the PCI BAR window, where the virtio-mmio windows begin.
pub const PCI_MMIO_END: u64 = VIRTIO_MMIO_START;
/// Size of the PCI BAR window (256 MiB).
pub const PCI_MMIO_SIZE: u64 = PCI_MMIO_END - PCI_MMIO_START;

/// virtio-mmio devices: one window of [`VIRTIO_MMIO_STRIDE`] each from here, device `n` on ISA
/// IRQ [`VIRTIO_MMIO_IRQS`]`[n]`.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Distance between two virtio-mmio windows (one page; the register block is 0x200 bytes).
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// ISA IRQs of the virtio-mmio devices (edge-triggered), in device order: the lines a PC leaves
/// free of the PIT (0), keyboard (1), cascade (2), COM2 (3), COM1 (4), RTC (8), ACPI SCI (9),
/// mouse (12) and FPU (13). Also the most virtio-mmio devices a VM can have.
pub const VIRTIO_MMIO_IRQS: [u32; 7] = [5, 6, 7, 10, 11, 14, 15];
/// End (exclusive) of the virtio-mmio windows.
pub const VIRTIO_MMIO_END: u64 =
    VIRTIO_MMIO_START + VIRTIO_MMIO_IRQS.len() as u64 * VIRTIO_MMIO_STRIDE;

/// The port I/O map, and the ISA IRQ of each legacy device on it, as on a PC (the `vmmkit-legacy`
/// and `vmmkit-pci` crates give each device's ports as `PORT_BASE`/`PORT_LEN` of its type):
///
/// | ports           | device                          | IRQ                     |
/// |-----------------|---------------------------------|-------------------------|
/// | `0x60`, `0x64`  | i8042 keyboard controller       | [`KEYBOARD_IRQ`]        |
/// | `0x70..0x72`    | CMOS RTC                        | none (no RTC alarms)    |
/// | `0x80`          | POST debug port                 | none                    |
/// | `0x3f8..0x400`  | COM1, 8250 UART                 | [`COM1_IRQ`]            |
/// | `0x600..0x606`  | ACPI PM1a event and control     | SCI, 9                  |
/// | `0xcf8..0xd00`  | PCI configuration mechanism #1  | INTx on [`PCI_INTX_IOAPIC_PINS`] |
pub const COM1_IRQ: u32 = 4;
/// The i8042's keyboard interrupt line.
pub const KEYBOARD_IRQ: u32 = 1;
/// IOAPIC pins for PCI INTx lines, one per device slot: the pins above the 16 ISA lines.
pub const PCI_INTX_IOAPIC_PINS: std::ops::RangeInclusive<u8> = 16..=23;

/// IOAPIC registers (Linux `IO_APIC_DEFAULT_PHYS_BASE`).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// IOAPIC register window size.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Local APIC registers (Linux `APIC_DEFAULT_PHYS_BASE`).
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Local APIC register window size.
pub const LAPIC_SIZE: u64 = 0x1000;

/// KVM's identity-map page (`KVM_SET_IDENTITY_MAP_ADDR`), one page below the TSS.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
/// KVM's real-mode TSS (`KVM_SET_TSS_ADDR`), three pages.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
/// Size of KVM's TSS area.
pub const KVM_TSS_SIZE: u64 = 3 * 0x1000;

// The layout must not overlap; these fail the build if someone moves a table onto another.
const _: () = assert!(IDT_START + 8 <= PVH_INFO_START);
const _: () = assert!(PVH_MODLIST_START + PVH_MODLIST_MAX as u64 * 32 <= PVH_MEMMAP_START);
// The memory map holds as many entries as the zero page's e820 table, 24 bytes each.
const _: () =
    assert!(PVH_MEMMAP_START + crate::bootparams::E820_MAX_ENTRIES as u64 * 24 <= PVH_INFO_END);
const _: () = assert!(PVH_INFO_END <= ZERO_PAGE_START);
const _: () = assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK_POINTER);
const _: () = assert!(BOOT_STACK_POINTER < PML4_START);
const _: () = assert!(PML4_START + 0x1000 == PDPTE_START);
const _: () = assert!(PDPTE_START + 0x1000 == PDE_START);
const _: () = assert!(PDE_START + PDE_TABLES * 0x1000 <= CMDLINE_START);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
const _: () = assert!(MPTABLE_END <= HIMEM_START);
const _: () = assert!(VMM_RESERVED_START >= EBDA_START);
const _: () = assert!(VMM_RESERVED_START + VMM_RESERVED_SIZE <= ACPI_START);
const _: () =
    assert!(ACPI_START.is_multiple_of(16) && ACPI_START < ACPI_END && ACPI_END <= MPTABLE_START);
const _: () = assert!(IDENTITY_MAP_SIZE == MMIO_HOLE_END);
const _: () = assert!(VMM_UNBACKED_PAGE >= LAPIC_START + LAPIC_SIZE);
const _: () = assert!(VMM_UNBACKED_PAGE + 0x1000 <= KVM_IDENTITY_MAP_START);
const _: () = assert!(PCI_MMIO_END <= VIRTIO_MMIO_START && VIRTIO_MMIO_END <= IOAPIC_START);
const _: () = assert!(IOAPIC_START < LAPIC_START && LAPIC_START < KVM_IDENTITY_MAP_START);
const _: () = assert!(KVM_IDENTITY_MAP_START + 0x1000 == KVM_TSS_START);
const _: () = assert!(KVM_TSS_START + KVM_TSS_SIZE <= MMIO_HOLE_END);
