//! Guest RAM for a KVM guest.
//!
//! RAM is laid out around an MMIO hole (on x86 the 32-bit hole below 4 GiB, where the IOAPIC, the
//! LAPIC and PCI BARs live; the platform crate says where it is): RAM runs from 0 up to the start of
//! the hole and the rest continues at its end. Each range
//! is an anonymous `mmap` (`MAP_NORESERVE`, so untouched guest pages cost the host nothing) owned by a
//! [`GuestMemoryMmap`], and is registered with KVM as one memory slot.

#![warn(missing_docs)]

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Where RAM must not be: `start..end` in guest-physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioHole {
    /// First guest-physical address of the hole.
    pub start: u64,
    /// First guest-physical address above the hole (exclusive end).
    pub end: u64,
}
/// The smallest guest we build: enough for the zero page, page tables and a minimal kernel.
pub const MIN_MEMORY: u64 = 16 << 20;

/// Errors building guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest memory of {0} bytes is too small: at least {min} MiB are needed", min = MIN_MEMORY >> 20)]
    /// Fewer bytes than [`MIN_MEMORY`].
    TooSmall(u64),
    #[error("guest memory of {size} MiB is more than this host has ({host} MiB)", size = .0 >> 20, host = .1 >> 20)]
    /// More bytes (first) than the host's RAM (second).
    MoreThanHost(u64, u64),
    #[error("guest memory of {0} bytes is not a multiple of 4 KiB")]
    /// A size that is not a whole number of 4 KiB pages.
    Unaligned(u64),
    #[error("cannot keep guest memory out of core dumps (madvise): {0}")]
    /// madvise(MADV_DONTDUMP) on guest RAM failed.
    DontDump(#[source] std::io::Error),
    #[error("cannot map guest memory: {0}")]
    /// The anonymous mapping of a RAM range failed.
    Mmap(#[source] vm_memory::mmap::FromRangesError),
    #[error("KVM refused memory slot {slot}: {source}")]
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    SetSlot {
        /// The slot number.
        slot: u32,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory needs {need} KVM memory slots but KVM offers {have}")]
    /// The layout has more regions than KVM has memory slots.
    TooManySlots {
        /// Regions in the layout.
        need: usize,
        /// Slots KVM offers (`KVM_CAP_NR_MEMSLOTS`).
        have: usize,
    },
}

/// Result of this crate's functions.
pub type Result<T> = std::result::Result<T, Error>;

/// The guest-physical RAM ranges for `size` bytes of RAM, split around `hole`.
pub fn ram_ranges(size: u64, hole: MmioHole) -> Vec<(GuestAddress, u64)> {
    let low = size.min(hole.start);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(hole.end), size - low));
    }
    ranges
}

/// Total RAM of the host, which bounds what a guest may ask for.
pub fn host_memory() -> u64 {
    // SAFETY: sysconf only reads system configuration; it has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if pages <= 0 || page_size <= 0 {
        return u64::MAX;
    }
    (pages as u64).saturating_mul(page_size as u64)
}

/// Checks a requested RAM size against what a guest needs and the host has.
pub fn validate_size(size: u64) -> Result<()> {
    if size < MIN_MEMORY {
        return Err(Error::TooSmall(size));
    }
    if !size.is_multiple_of(4096) {
        return Err(Error::Unaligned(size));
    }
    let host = host_memory();
    if size > host {
        return Err(Error::MoreThanHost(size, host));
    }
    Ok(())
}

/// Maps `size` bytes of guest RAM laid out by [`ram_ranges`].
pub fn create_guest_memory(size: u64, hole: MmioHole) -> Result<GuestMemoryMmap> {
    validate_size(size)?;
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size, hole)
        .into_iter()
        .map(|(start, len)| (start, len as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(Error::Mmap)?;
    exclude_from_core_dumps(&mem)?;
    Ok(mem)
}

/// Marks every region `MADV_DONTDUMP` (madvise(2)), so that a core dump of the VMM (a crash, a
/// seccomp kill) does not carry the guest's RAM: its secrets, and gigabytes of dump.
pub fn exclude_from_core_dumps(mem: &GuestMemoryMmap) -> Result<()> {
    for region in mem.iter() {
        // SAFETY: the range is exactly one mapping that `mem` owns; MADV_DONTDUMP changes only
        // whether it is dumped, never its contents or protection.
        let ret = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_DONTDUMP,
            )
        };
        if ret != 0 {
            return Err(Error::DontDump(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Registers every region of `mem` as a KVM memory slot, numbered from 0.
pub fn register_slots(vm: &VmFd, mem: &GuestMemoryMmap, max_slots: usize) -> Result<()> {
    if mem.num_regions() > max_slots {
        return Err(Error::TooManySlots {
            need: mem.num_regions(),
            have: max_slots,
        });
    }
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = region.as_ptr() as u64;
        let slot_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host,
        };
        // SAFETY: the region is a live mapping of exactly `memory_size` bytes owned by `mem`, which the
        // caller keeps alive for as long as the VM exists (the VMM holds both until exit).
        unsafe { vm.set_user_memory_region(slot_region) }
            .map_err(|source| Error::SetSlot { slot, source })?;
    }
    Ok(())
}

/// The end of the RAM that starts at address 0 (where boot data such as the initramfs may go).
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.find_region(GuestAddress(0))
        .map(|r| r.start_addr().0 + r.len())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `VmFlags` line of the mapping that holds `addr`, from /proc/self/smaps. The kernel
    /// merges adjacent mappings with the same flags (two regions, or a region and another
    /// test's memory), so the region need not start its own.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let holds = |line: &str| {
            let range = line.split_whitespace().next().unwrap_or("");
            let Some((start, end)) = range.split_once('-') else {
                return false;
            };
            match (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) {
                (Ok(start), Ok(end)) => start <= addr && addr < end,
                _ => false,
            }
        };
        let mut lines = smaps.lines().skip_while(|l| !holds(l));
        lines.next().expect("the region is mapped");
        lines
            .find(|l| l.starts_with("VmFlags:"))
            .expect("smaps lists VmFlags")
            .to_string()
    }

    #[test]
    fn guest_memory_is_left_out_of_core_dumps() {
        let hole = MmioHole {
            start: 48 << 20,
            end: 64 << 20,
        };
        let mem = create_guest_memory(MIN_MEMORY.max(64 << 20), hole).unwrap();
        assert!(mem.num_regions() >= 1);
        for region in mem.iter() {
            let flags = vm_flags(region.as_ptr() as usize);
            assert!(
                flags.split_whitespace().any(|f| f == "dd"),
                "region at {:#x}: {flags}",
                region.start_addr().0
            );
        }
    }

    const HOLE: MmioHole = MmioHole {
        start: 0xc000_0000,
        end: 1 << 32,
    };

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(
            ram_ranges(512 << 20, HOLE),
            vec![(GuestAddress(0), 512 << 20)]
        );
    }

    #[test]
    fn memory_up_to_the_hole_is_one_range() {
        assert_eq!(
            ram_ranges(HOLE.start, HOLE),
            vec![(GuestAddress(0), HOLE.start)]
        );
    }

    #[test]
    fn large_memory_continues_above_4g() {
        let six_g = 6u64 << 30;
        assert_eq!(
            ram_ranges(six_g, HOLE),
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 3 << 30)]
        );
    }

    #[test]
    fn rejects_tiny_unaligned_and_huge_sizes() {
        assert!(matches!(validate_size(1 << 20), Err(Error::TooSmall(_))));
        assert!(matches!(
            validate_size((64 << 20) + 1),
            Err(Error::Unaligned(_))
        ));
        assert!(matches!(
            validate_size(1 << 60),
            Err(Error::MoreThanHost(_, _))
        ));
        assert!(validate_size(64 << 20).is_ok());
    }

    #[test]
    fn maps_six_gib_with_a_hole() {
        let mem = create_guest_memory(6 << 30, HOLE).unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert_eq!(low_ram_end(&mem), HOLE.start);
        assert!(mem.find_region(GuestAddress(HOLE.start)).is_none());
        assert!(mem.find_region(GuestAddress(HOLE.end)).is_some());
        assert_eq!(mem.last_addr(), GuestAddress((7 << 30) - 1));
    }
}
