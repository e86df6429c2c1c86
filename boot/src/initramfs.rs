//! Placing the initramfs in guest memory.
//!
//! Linux `Documentation/arch/x86/boot.rst`, "Loading The Rest of The Kernel" and the
//! `initrd_addr_max` field: the initrd should go as high as possible, page-aligned, with its last
//! byte at or below `initrd_addr_max`. Going high keeps it out of the way of the kernel's early
//! allocations; the kernel's own memory (up to `kernel_end`) must stay below it.

use std::io::{Read, Seek, SeekFrom};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::reader::VolatileReader;
use crate::{Error, LoadedKernel, Result};

/// The initramfs is page-aligned (boot.rst recommends it; the kernel frees it by pages).
const PAGE_SIZE: u64 = 4096;

/// Where the initramfs landed; goes into the zero page's `ramdisk_image` / `ramdisk_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Initramfs {
    /// Guest-physical address of the first byte (page-aligned).
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// Places the initramfs page-aligned as high as possible below min(initrd_addr_max, end of low
/// RAM), above `kernel.kernel_end`; errors when it does not fit.
///
/// `low_ram_end` is the exclusive end of the RAM below the 32-bit MMIO hole.
pub fn load_initramfs<M: GuestMemoryBackend>(
    mem: &M,
    image: &mut (impl Read + Seek),
    kernel: &LoadedKernel,
    low_ram_end: u64,
) -> Result<Initramfs> {
    let size = image.seek(SeekFrom::End(0)).map_err(Error::ReadInitramfs)?;
    image.rewind().map_err(Error::ReadInitramfs)?;
    if size == 0 {
        return Err(Error::EmptyInitramfs);
    }
    // initrd_addr_max is inclusive; make it an exclusive end.
    let limit = kernel.initrd_addr_max().saturating_add(1).min(low_ram_end);
    let kernel_end = kernel.kernel_end.0;
    let floor = kernel_end.checked_next_multiple_of(PAGE_SIZE);
    let addr = limit
        .checked_sub(size)
        .map(|a| a - a % PAGE_SIZE)
        .filter(|&a| floor.is_some_and(|floor| a >= floor));
    let too_large = || Error::InitramfsTooLarge {
        size_mib: size.div_ceil(1 << 20),
        limit,
        kernel_end,
    };
    let addr = addr.ok_or_else(too_large)?;
    let len = usize::try_from(size).map_err(|_| too_large())?;
    if !mem.check_range(GuestAddress(addr), len) {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut VolatileReader::new(image), len)
        .map_err(|source| Error::GuestMemory { addr, source })?;
    log::info!(
        "initramfs: {size} bytes at {addr:#x} (limit {limit:#x}, kernel ends at {kernel_end:#x})"
    );
    Ok(Initramfs {
        addr: GuestAddress(addr),
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{guest_mem, kernel_at};
    use std::io::Cursor;

    const MIB: u64 = 1 << 20;

    #[test]
    fn goes_page_aligned_to_the_top_of_low_ram() {
        // Arrange: 64 MiB of RAM, kernel up to 3 MiB, no initrd_addr_max of note.
        let mem = guest_mem(64);
        let kernel = kernel_at(3 * MIB, 0xffff_ffff);
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();

        // Act
        let placed = load_initramfs(&mem, &mut Cursor::new(&data), &kernel, 64 * MIB).unwrap();

        // Assert: 64 MiB - 5000 rounded down to a page = 0x3ffe000.
        assert_eq!(
            placed,
            Initramfs {
                addr: GuestAddress(0x3ffe000),
                size: 5000
            }
        );
        let mut back = vec![0u8; 5000];
        mem.read_slice(&mut back, placed.addr).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn respects_initrd_addr_max() {
        let mem = guest_mem(64);
        // Last usable byte 32 MiB - 1.
        let kernel = kernel_at(3 * MIB, 0x1ff_ffff);
        let placed =
            load_initramfs(&mem, &mut Cursor::new(vec![7u8; 8192]), &kernel, 64 * MIB).unwrap();
        assert_eq!(placed.addr, GuestAddress(0x200_0000 - 8192));
    }

    #[test]
    fn respects_the_low_ram_end() {
        let mem = guest_mem(64);
        let kernel = kernel_at(3 * MIB, 0xffff_ffff);
        let placed =
            load_initramfs(&mem, &mut Cursor::new(vec![7u8; 4097]), &kernel, 48 * MIB).unwrap();
        assert_eq!(placed.addr, GuestAddress(48 * MIB - 8192));
    }

    #[test]
    fn fits_exactly_between_kernel_end_and_limit() {
        let mem = guest_mem(64);
        // Kernel ends at an unaligned 10 MiB + 1, so the first free page is 10 MiB + 4 KiB.
        let kernel = kernel_at(10 * MIB + 1, 0xffff_ffff);
        let size = 16 * MIB - 10 * MIB - 4096;
        let placed = load_initramfs(
            &mem,
            &mut Cursor::new(vec![1u8; size as usize]),
            &kernel,
            16 * MIB,
        )
        .unwrap();
        assert_eq!(placed.addr, GuestAddress(10 * MIB + 4096));
        // One byte more does not fit.
        let err = load_initramfs(
            &mem,
            &mut Cursor::new(vec![1u8; size as usize + 1]),
            &kernel,
            16 * MIB,
        )
        .unwrap_err();
        assert!(matches!(err, Error::InitramfsTooLarge { .. }));
    }

    #[test]
    fn too_large_says_how_large_and_where() {
        let mem = guest_mem(16);
        let kernel = kernel_at(8 * MIB, 0xffff_ffff);
        let err = load_initramfs(
            &mem,
            &mut Cursor::new(vec![0u8; (9 * MIB) as usize]),
            &kernel,
            16 * MIB,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the initramfs (9 MiB) does not fit below 0x1000000 and above the kernel's end at 0x800000"
        );
    }

    #[test]
    fn larger_than_the_limit_itself_is_refused_without_underflow() {
        let mem = guest_mem(16);
        let kernel = kernel_at(2 * MIB, 0xffff);
        let err = load_initramfs(
            &mem,
            &mut Cursor::new(vec![0u8; 100_000]),
            &kernel,
            16 * MIB,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            Error::InitramfsTooLarge { limit: 0x10000, .. }
        ));
    }

    #[test]
    fn empty_initramfs_is_refused() {
        let mem = guest_mem(16);
        let kernel = kernel_at(2 * MIB, 0xffff_ffff);
        assert!(matches!(
            load_initramfs(&mem, &mut Cursor::new(Vec::<u8>::new()), &kernel, 16 * MIB),
            Err(Error::EmptyInitramfs)
        ));
    }

    #[test]
    fn low_ram_end_beyond_guest_memory_is_an_error_not_a_crash() {
        // The caller claims 64 MiB of low RAM but the VM has only 16.
        let mem = guest_mem(16);
        let kernel = kernel_at(2 * MIB, 0xffff_ffff);
        assert!(matches!(
            load_initramfs(&mem, &mut Cursor::new(vec![1u8; 4096]), &kernel, 64 * MIB),
            Err(Error::InitramfsTooLarge { .. })
        ));
    }
}
