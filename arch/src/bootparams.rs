//! The zero page (`struct boot_params`) and its e820 memory map, per the Linux boot protocol
//! (`Documentation/arch/x86/boot.rst`, "The Real-Mode Kernel Header" and "Details of Header
//! Fields"; `Documentation/arch/x86/zero-page.rst`).
//!
//! The e820 map lists RAM below 640 KiB minus the EBDA, reserves the legacy area
//! `0x9fc00..0x100000` (EBDA with the MP table, VGA window, option ROMs, BIOS), then RAM from 1 MiB
//! up to the MMIO hole and RAM above 4 GiB. The hole itself is simply absent, which is how Linux finds
//! the gap where PCI BARs go.
//!
//! Loader flags: `KEEP_SEGMENTS` is not set. It only ever affected the 32-bit entry point and has been
//! obsolete since Linux 5.8; our GDT already has the selectors the 64-bit entry wants. Neither
//! Firecracker nor crosvm sets it.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{EBDA_START, HIMEM_START, ZERO_PAGE_START};
use crate::{Error, Result};

/// Entries the zero page's e820 table holds.
pub const E820_MAX_ENTRIES: usize = linux_loader::loader::bootparam::E820_MAX_ENTRIES_ZEROPAGE;

/// `boot_flag`: the 0xAA55 boot-sector signature.
pub const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header`: "HdrS".
pub const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: 0xff, "undefined" boot loader.
pub const KERNEL_LOADER_OTHER: u8 = 0xff;
/// `kernel_alignment` when the kernel gave no header: 16 MiB, the usual `CONFIG_PHYSICAL_ALIGN`.
pub const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// First boot protocol version whose header carries `cmdline_size`.
const PROTOCOL_CMDLINE_SIZE: u16 = 0x0206;

/// e820 address range types (ACPI 6.5, 15.3 "Address Range Types").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

/// One e820 address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

impl E820Entry {
    fn new(addr: u64, end: u64, kind: E820Kind) -> Self {
        Self {
            addr,
            size: end - addr,
            kind,
        }
    }

    fn end(&self) -> u64 {
        self.addr + self.size
    }
}

impl From<E820Entry> for boot_e820_entry {
    fn from(e: E820Entry) -> Self {
        boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        }
    }
}

/// The `(start, length)` of each RAM region of `mem`, the input of [`e820_entries`].
pub fn ram_regions(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

/// The e820 map for guest RAM given as `(start, length)` regions.
///
/// RAM overlapping the legacy area `0x9fc00..0x100000` is cut out of it; the area is always listed
/// as reserved. Adjacent RAM regions merge. Fails on regions that overlap or wrap, and on maps
/// longer than the zero page's [`E820_MAX_ENTRIES`].
pub fn e820_entries(ram: &[(u64, u64)]) -> Result<Vec<E820Entry>> {
    let mut regions = Vec::with_capacity(ram.len());
    for &(start, len) in ram.iter().filter(|(_, len)| *len > 0) {
        let end = start
            .checked_add(len)
            .ok_or(Error::RamRegionOverflow { start, len })?;
        regions.push((start, end));
    }
    regions.sort_unstable();
    if let Some(w) = regions.windows(2).find(|w| w[1].0 < w[0].1) {
        return Err(Error::RamRegionsOverlap(w[1].0));
    }

    let mut map: Vec<E820Entry> = Vec::new();
    let mut push = |entry: E820Entry| match map.last_mut() {
        Some(last) if last.kind == entry.kind && last.end() == entry.addr => {
            last.size += entry.size;
        }
        _ => map.push(entry),
    };
    let mut legacy_done = false;
    for (start, end) in regions {
        if start < EBDA_START {
            push(E820Entry::new(start, end.min(EBDA_START), E820Kind::Ram));
        }
        if !legacy_done && end > EBDA_START {
            push(E820Entry::new(EBDA_START, HIMEM_START, E820Kind::Reserved));
            legacy_done = true;
        }
        if end > HIMEM_START {
            push(E820Entry::new(start.max(HIMEM_START), end, E820Kind::Ram));
        }
    }
    if !legacy_done {
        // Only RAM below the EBDA (or none): the legacy area still is not RAM.
        push(E820Entry::new(EBDA_START, HIMEM_START, E820Kind::Reserved));
    }

    if map.len() > E820_MAX_ENTRIES {
        return Err(Error::TooManyE820Entries(map.len()));
    }
    Ok(map)
}

/// An initramfs already in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdRange {
    pub addr: GuestAddress,
    pub size: u64,
}

/// What the zero page tells the kernel.
#[derive(Debug, Clone, Copy)]
pub struct BootParamsConfig<'a> {
    /// The header the loader read from a bzImage (`KernelLoaderResult::setup_header`); `None` for
    /// an ELF `vmlinux`, which has none.
    pub setup_header: Option<setup_header>,
    /// Address of the NUL-terminated command line.
    pub cmdline_addr: GuestAddress,
    /// Size of the command line in bytes, counting its terminating NUL.
    pub cmdline_size: usize,
    pub initrd: Option<InitrdRange>,
    pub e820: &'a [E820Entry],
    /// The ACPI RSDP (`acpi_rsdp_addr`, zero-page offset 0x70); the kernel also scans for it.
    pub acpi_rsdp: Option<GuestAddress>,
}

/// Builds the zero page from `config`.
pub fn build_boot_params(config: &BootParamsConfig) -> Result<boot_params> {
    if config.e820.len() > E820_MAX_ENTRIES {
        return Err(Error::TooManyE820Entries(config.e820.len()));
    }
    let cmdline_len = config
        .cmdline_size
        .checked_sub(1)
        .ok_or(Error::EmptyCmdline)?;

    let mut params = boot_params::default();
    match config.setup_header {
        Some(header) => {
            // `cmdline_size` is the kernel's own limit (without the NUL) from protocol 2.06 on;
            // older kernels accept 255 bytes.
            let max = if header.version >= PROTOCOL_CMDLINE_SIZE {
                header.cmdline_size
            } else {
                255
            };
            if cmdline_len > max as usize {
                return Err(Error::CmdlineTooLong {
                    len: cmdline_len,
                    max,
                });
            }
            params.hdr = header;
        }
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            params.hdr.cmdline_size = cmdline_len as u32;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    if let Some(rsdp) = config.acpi_rsdp {
        params.acpi_rsdp_addr = rsdp.0;
    }

    let cmdline = config.cmdline_addr.0;
    params.hdr.cmd_line_ptr = cmdline as u32;
    params.ext_cmd_line_ptr = (cmdline >> 32) as u32;

    if let Some(initrd) = config.initrd {
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.ext_ramdisk_image = (initrd.addr.0 >> 32) as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
        params.ext_ramdisk_size = (initrd.size >> 32) as u32;
    }

    let mut table = [boot_e820_entry::default(); E820_MAX_ENTRIES];
    for (slot, entry) in table.iter_mut().zip(config.e820) {
        *slot = (*entry).into();
    }
    params.e820_table = table;
    params.e820_entries = config.e820.len() as u8;
    Ok(params)
}

/// Builds the zero page and writes it at [`ZERO_PAGE_START`].
pub fn write_boot_params(mem: &GuestMemoryMmap, config: &BootParamsConfig) -> Result<()> {
    let params = build_boot_params(config)?;
    let boot = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&boot, mem).map_err(Error::WriteBootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{ByteValued, Bytes};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn ram(addr: u64, end: u64) -> E820Entry {
        E820Entry::new(addr, end, E820Kind::Ram)
    }

    fn legacy() -> E820Entry {
        E820Entry::new(0x9_fc00, 0x10_0000, E820Kind::Reserved)
    }

    #[test]
    fn low_memory_only() {
        assert_eq!(
            e820_entries(&[(0, 512 * MIB)]).unwrap(),
            vec![ram(0, 0x9_fc00), legacy(), ram(MIB, 512 * MIB)]
        );
    }

    #[test]
    fn low_and_high_memory_skip_the_hole() {
        let map = e820_entries(&[(4 * GIB, 3 * GIB), (0, 3 * GIB)]).unwrap();
        assert_eq!(
            map,
            vec![
                ram(0, 0x9_fc00),
                legacy(),
                ram(MIB, 0xc000_0000),
                ram(0x1_0000_0000, 0x1_c000_0000)
            ]
        );
        assert_eq!(map[2].size, 0xbff0_0000);
    }

    #[test]
    fn adjacent_regions_merge_and_empty_ones_vanish() {
        let map = e820_entries(&[(0, GIB), (GIB, GIB), (5 * GIB, 0)]).unwrap();
        assert_eq!(map, vec![ram(0, 0x9_fc00), legacy(), ram(MIB, 2 * GIB)]);
    }

    #[test]
    fn tiny_memory_still_reserves_the_legacy_area() {
        assert_eq!(
            e820_entries(&[(0, 0x8_0000)]).unwrap(),
            vec![ram(0, 0x8_0000), legacy()]
        );
        assert_eq!(e820_entries(&[]).unwrap(), vec![legacy()]);
    }

    #[test]
    fn rejects_overlap_and_wrap() {
        assert!(matches!(
            e820_entries(&[(0, 2 * GIB), (GIB, GIB)]),
            Err(Error::RamRegionsOverlap(a)) if a == GIB
        ));
        assert!(matches!(
            e820_entries(&[(u64::MAX - 10, 20)]),
            Err(Error::RamRegionOverflow { .. })
        ));
    }

    #[test]
    fn at_most_128_entries() {
        // Disjoint 1 MiB regions above 4 GiB, one MiB apart: each is its own entry, and the low
        // map adds the legacy reservation.
        let regions =
            |n: u64| -> Vec<(u64, u64)> { (0..n).map(|i| (4 * GIB + 2 * i * MIB, MIB)).collect() };
        assert_eq!(e820_entries(&regions(127)).unwrap().len(), 128);
        assert!(matches!(
            e820_entries(&regions(128)),
            Err(Error::TooManyE820Entries(129))
        ));
    }

    fn config<'a>(e820: &'a [E820Entry]) -> BootParamsConfig<'a> {
        BootParamsConfig {
            setup_header: None,
            cmdline_addr: GuestAddress(0x2_0000),
            cmdline_size: 12,
            initrd: None,
            e820,
            acpi_rsdp: None,
        }
    }

    #[test]
    fn zero_page_without_kernel_header() {
        let e820 = e820_entries(&[(0, 256 * MIB)]).unwrap();
        let params = build_boot_params(&config(&e820)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.kernel_alignment }, 0x100_0000);
        assert_eq!({ hdr.cmd_line_ptr }, 0x2_0000);
        assert_eq!({ hdr.cmdline_size }, 11);
        assert_eq!({ hdr.loadflags }, 0);
        assert_eq!({ hdr.ramdisk_image }, 0);
        assert_eq!(params.e820_entries, 3);
        let third = params.e820_table[2];
        assert_eq!(
            ({ third.addr }, { third.size }, { third.r#type }),
            (MIB, 255 * MIB, 1)
        );
        let second = params.e820_table[1];
        assert_eq!({ second.r#type }, 2);
        // The fields land where the protocol puts them in the 4 KiB page.
        let bytes = params.as_slice();
        assert_eq!(bytes.len(), 4096);
        assert_eq!(&bytes[0x202..0x206], b"HdrS");
        assert_eq!(bytes[0x1e8], 3);
        assert_eq!(bytes[0x210], 0xff);
        assert_eq!(&bytes[0x228..0x22c], &0x2_0000u32.to_le_bytes());
    }

    #[test]
    fn the_rsdp_goes_at_offset_0x70_of_the_zero_page() {
        let e820 = e820_entries(&[(0, 256 * MIB)]).unwrap();
        let without = build_boot_params(&config(&e820)).unwrap();
        assert_eq!(&without.as_slice()[0x70..0x78], &[0; 8]);
        let with = build_boot_params(&BootParamsConfig {
            acpi_rsdp: Some(GuestAddress(0xe_4000)),
            ..config(&e820)
        })
        .unwrap();
        assert_eq!(&with.as_slice()[0x70..0x78], &0xe_4000u64.to_le_bytes());
    }

    #[test]
    fn zero_page_keeps_bzimage_header() {
        let header = setup_header {
            setup_sects: 27,
            boot_flag: 0xaa55,
            header: 0x5372_6448,
            version: 0x020f,
            loadflags: 1,
            code32_start: 0x10_0000,
            kernel_alignment: 0x20_0000,
            cmdline_size: 2047,
            init_size: 0x200_0000,
            ..Default::default()
        };
        let e820 = [ram(0, 0x9_fc00)];
        let cfg = BootParamsConfig {
            setup_header: Some(header),
            ..config(&e820)
        };
        let params = build_boot_params(&cfg).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.setup_sects }, 27);
        assert_eq!({ hdr.loadflags }, 1);
        assert_eq!({ hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ hdr.init_size }, 0x200_0000);
        assert_eq!(
            { hdr.cmdline_size },
            2047,
            "the kernel's limit is not ours to change"
        );
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, 0x2_0000);

        let too_long = BootParamsConfig {
            cmdline_size: 2049,
            ..cfg
        };
        assert!(matches!(
            build_boot_params(&too_long),
            Err(Error::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        ));
        let old_kernel = BootParamsConfig {
            setup_header: Some(setup_header {
                version: 0x0205,
                ..header
            }),
            cmdline_size: 257,
            ..cfg
        };
        assert!(matches!(
            build_boot_params(&old_kernel),
            Err(Error::CmdlineTooLong { len: 256, max: 255 })
        ));
    }

    #[test]
    fn initrd_and_cmdline_above_4_gib_use_ext_fields() {
        let e820 = [ram(0, 0x9_fc00)];
        let cfg = BootParamsConfig {
            cmdline_addr: GuestAddress(0x1_2345_6000),
            initrd: Some(InitrdRange {
                addr: GuestAddress(0x2_8000_0000),
                size: 0x1_0000_1000,
            }),
            ..config(&e820)
        };
        let params = build_boot_params(&cfg).unwrap();
        assert_eq!({ params.hdr.cmd_line_ptr }, 0x2345_6000);
        assert_eq!({ params.ext_cmd_line_ptr }, 1);
        assert_eq!({ params.hdr.ramdisk_image }, 0x8000_0000);
        assert_eq!({ params.ext_ramdisk_image }, 2);
        assert_eq!({ params.hdr.ramdisk_size }, 0x1000);
        assert_eq!({ params.ext_ramdisk_size }, 1);
    }

    #[test]
    fn rejects_empty_cmdline_and_long_maps() {
        let e820 = vec![ram(0, 0x1000); 129];
        assert!(matches!(
            build_boot_params(&config(&e820)),
            Err(Error::TooManyE820Entries(129))
        ));
        let cfg = BootParamsConfig {
            cmdline_size: 0,
            ..config(&e820[..1])
        };
        assert!(matches!(build_boot_params(&cfg), Err(Error::EmptyCmdline)));
    }

    #[test]
    fn writes_zero_page() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap();
        let e820 = e820_entries(&ram_regions(&mem)).unwrap();
        assert_eq!(e820, vec![ram(0, 0x9_fc00), legacy()]);
        write_boot_params(&mem, &config(&e820)).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(0x7000 + 0x202)).unwrap();
        assert_eq!(magic, 0x5372_6448);
        let entries: u8 = mem.read_obj(GuestAddress(0x7000 + 0x1e8)).unwrap();
        assert_eq!(entries, 2);

        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x7800)]).unwrap();
        assert!(matches!(
            write_boot_params(&small, &config(&e820)),
            Err(Error::WriteBootParams(_))
        ));
    }
}
