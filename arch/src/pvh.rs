//! The PVH boot information: `struct hvm_start_info` with its module list and memory map.
//!
//! The structures are Xen's `xen/include/public/arch-x86/hvm/start_info.h` (version 1, the one
//! with the memory map); the entry state that goes with them is in Xen's `docs/misc/pvh.pandoc`
//! ("x86/HVM direct boot ABI", see [`crate::regs::pvh_sregs`]). A Linux kernel built with
//! `CONFIG_PVH` enters at the address of its `XEN_ELFNOTE_PHYS32_ENTRY` note, copies this structure
//! and builds its own zero page from it (`arch/x86/platform/pvh/enlighten.c`,
//! `init_pvh_bootparams`): the memory map becomes its e820 table, the first module its initrd,
//! `cmdline_paddr` its command line. Without a memory map (version 0, or no entries) a Linux that
//! is not running on Xen stops with `BUG()`, so the map is always given.
//!
//! Everything lives in the page at [`PVH_INFO_START`] (see [`crate::layout`]): the structure, then
//! the module list, then the memory map. `rsdp_paddr` points at the ACPI tables' RSDP when the
//! guest has them (see [`crate::acpi`]); when it is 0, Linux finds the MP table at
//! [`crate::layout::MPTABLE_START`] as it does after the 64-bit boot protocol.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::bootparams::{E820Entry, InitrdRange, E820_MAX_ENTRIES};
use crate::layout::{PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START};
use crate::{Error, Result};

/// `hvm_start_info.magic`: "xEn3" with the high bit of each byte cleared.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// `hvm_start_info.version`: 1, the first version with `memmap_paddr` and `memmap_entries`.
pub const START_INFO_VERSION: u32 = 1;

// The layout reserves 0x40 bytes for the structure and 32 per module; check the bindings agree.
const _: () = assert!(std::mem::size_of::<hvm_start_info>() <= 0x40);
const _: () = assert!(std::mem::size_of::<hvm_modlist_entry>() == 32);
const _: () = assert!(std::mem::size_of::<hvm_memmap_table_entry>() == 24);

/// What the PVH boot information tells the kernel.
#[derive(Debug, Clone, Copy)]
pub struct PvhConfig<'a> {
    /// Address of the NUL-terminated command line.
    pub cmdline_addr: GuestAddress,
    /// The initramfs, passed as the only module.
    pub initrd: Option<InitrdRange>,
    /// The guest's memory map, the same one the zero page would carry.
    pub e820: &'a [E820Entry],
    /// The ACPI RSDP, if the guest has ACPI tables.
    pub acpi_rsdp: Option<GuestAddress>,
}

/// The PVH boot information as plain data, before it is written to guest memory.
#[derive(Debug, Clone)]
pub struct StartInfo {
    pub start_info: hvm_start_info,
    pub modules: Vec<hvm_modlist_entry>,
    pub memmap: Vec<hvm_memmap_table_entry>,
}

/// Builds `hvm_start_info`, the module list and the memory map for `config`, with the addresses of
/// [`crate::layout`].
pub fn build_start_info(config: &PvhConfig) -> Result<StartInfo> {
    if config.e820.len() > E820_MAX_ENTRIES {
        return Err(Error::TooManyE820Entries(config.e820.len()));
    }
    // The PVH memory map types are the e820 ones (start_info.h, XEN_HVM_MEMMAP_TYPE_*).
    let memmap: Vec<hvm_memmap_table_entry> = config
        .e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = config
        .initrd
        .iter()
        .map(|initrd| hvm_modlist_entry {
            paddr: initrd.addr.0,
            size: initrd.size,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START
        },
        cmdline_paddr: config.cmdline_addr.0,
        rsdp_paddr: config.acpi_rsdp.map_or(0, |rsdp| rsdp.0),
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    Ok(StartInfo {
        start_info,
        modules,
        memmap,
    })
}

/// Writes the PVH boot information for `config` to guest memory and returns the address of
/// `hvm_start_info`, which the boot vCPU gets in EBX.
pub fn write_start_info(mem: &GuestMemoryMmap, config: &PvhConfig) -> Result<GuestAddress> {
    let info = build_start_info(config)?;
    let at = GuestAddress(PVH_INFO_START);
    let mut params = BootParams::new(&info.start_info, at);
    params.set_sections(&info.memmap, GuestAddress(PVH_MEMMAP_START));
    if !info.modules.is_empty() {
        params.set_modules(&info.modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(Error::WriteStartInfo)?;
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootparams::{e820_entries, E820Kind};
    use vm_memory::Bytes;

    fn e820_for(ram: &[(u64, u64)]) -> Vec<E820Entry> {
        e820_entries(ram).unwrap()
    }

    #[test]
    fn start_info_carries_magic_version_cmdline_and_no_rsdp() {
        let e820 = e820_for(&[(0, 128 << 20)]);
        let info = build_start_info(&PvhConfig {
            cmdline_addr: GuestAddress(0x2_0000),
            initrd: None,
            e820: &e820,
            acpi_rsdp: None,
        })
        .unwrap();
        let si = info.start_info;
        assert_eq!(si.magic, 0x336e_c578);
        assert_eq!(si.version, 1);
        assert_eq!(si.flags, 0);
        assert_eq!(si.cmdline_paddr, 0x2_0000);
        assert_eq!(si.rsdp_paddr, 0);
        assert_eq!((si.nr_modules, si.modlist_paddr), (0, 0));
        assert!(info.modules.is_empty());
    }

    #[test]
    fn memmap_matches_the_e820_map() {
        // RAM on both sides of the MMIO hole: the e820 map has four entries.
        let e820 = e820_for(&[(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(e820.len(), 4);
        let info = build_start_info(&PvhConfig {
            cmdline_addr: GuestAddress(0x2_0000),
            initrd: None,
            e820: &e820,
            acpi_rsdp: None,
        })
        .unwrap();
        assert_eq!(info.start_info.memmap_paddr, PVH_MEMMAP_START);
        assert_eq!(info.start_info.memmap_entries, 4);
        let got: Vec<(u64, u64, u32)> = info
            .memmap
            .iter()
            .map(|m| (m.addr, m.size, m.type_))
            .collect();
        let want: Vec<(u64, u64, u32)> = e820
            .iter()
            .map(|e| (e.addr, e.size, e.kind as u32))
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            got[1],
            (0x9_fc00, 0x10_0000 - 0x9_fc00, 2),
            "legacy area reserved"
        );
        assert_eq!(E820Kind::Ram as u32, 1);
    }

    #[test]
    fn start_info_carries_the_rsdp_when_there_are_acpi_tables() {
        let e820 = e820_for(&[(0, 128 << 20)]);
        let info = build_start_info(&PvhConfig {
            cmdline_addr: GuestAddress(0x2_0000),
            initrd: None,
            e820: &e820,
            acpi_rsdp: Some(GuestAddress(0xe_4000)),
        })
        .unwrap();
        assert_eq!(info.start_info.rsdp_paddr, 0xe_4000);
    }

    #[test]
    fn the_initramfs_is_the_only_module() {
        let e820 = e820_for(&[(0, 64 << 20)]);
        let info = build_start_info(&PvhConfig {
            cmdline_addr: GuestAddress(0x2_0000),
            initrd: Some(InitrdRange {
                addr: GuestAddress(0x300_0000),
                size: 0x12_3456,
            }),
            e820: &e820,
            acpi_rsdp: None,
        })
        .unwrap();
        assert_eq!(info.start_info.nr_modules, 1);
        assert_eq!(info.start_info.modlist_paddr, PVH_MODLIST_START);
        let m = info.modules[0];
        assert_eq!(
            (m.paddr, m.size, m.cmdline_paddr),
            (0x300_0000, 0x12_3456, 0)
        );
    }

    #[test]
    fn too_long_a_memory_map_is_refused() {
        let e820 = vec![
            E820Entry {
                addr: 0,
                size: 0x1000,
                kind: E820Kind::Ram,
            };
            E820_MAX_ENTRIES + 1
        ];
        let err = build_start_info(&PvhConfig {
            cmdline_addr: GuestAddress(0x2_0000),
            initrd: None,
            e820: &e820,
            acpi_rsdp: None,
        })
        .unwrap_err();
        assert!(matches!(err, Error::TooManyE820Entries(129)), "{err}");
    }

    #[test]
    fn writes_everything_in_the_pvh_page() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let e820 = e820_for(&[(0, 64 << 20)]);
        let at = write_start_info(
            &mem,
            &PvhConfig {
                cmdline_addr: GuestAddress(0x2_0000),
                initrd: Some(InitrdRange {
                    addr: GuestAddress(0x200_0000),
                    size: 0x1000,
                }),
                e820: &e820,
                acpi_rsdp: None,
            },
        )
        .unwrap();
        assert_eq!(at, GuestAddress(0x6000));
        let si: hvm_start_info = mem.read_obj(at).unwrap();
        assert_eq!(si.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(si.memmap_entries, 3);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x200_0000, 0x1000));
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(si.memmap_paddr + 2 * 24))
            .unwrap();
        assert_eq!(
            (last.addr, last.size, last.type_),
            (0x10_0000, (64 << 20) - 0x10_0000, 1)
        );
    }
}
