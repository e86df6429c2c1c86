//! Boot page tables for 4-level paging (Intel SDM Vol. 3A, 4.5 "4-Level Paging and 5-Level
//! Paging").
//!
//! The 64-bit boot protocol needs the kernel image, the zero page and the command line identity
//! mapped. We map the whole first 4 GiB with 2 MiB pages: one PML4 entry, four PDPT entries and four
//! page directories of 512 entries each (see [`crate::layout`]). The kernel replaces these tables
//! early in `startup_64`.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{PDE_START, PDE_TABLES, PDPTE_START, PML4_START};
use crate::{Error, Result};

const PAGE_SIZE: usize = 0x1000;
const ENTRIES_PER_TABLE: u64 = 512;
const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
/// Page-size bit: a page-directory entry maps a 2 MiB page instead of pointing at a page table.
const HUGE_PAGE: u64 = 1 << 7;
const HUGE_PAGE_SHIFT: u32 = 21;

/// The PML4, the PDPT and the page directories, contiguous from [`PML4_START`].
pub fn identity_map_tables() -> Vec<u8> {
    let mut entries = vec![0u64; ((2 + PDE_TABLES) * ENTRIES_PER_TABLE) as usize];
    // PML4[0] -> PDPT; it covers the first 512 GiB.
    entries[0] = PDPTE_START | PRESENT | WRITABLE;
    // PDPT[i] -> page directory i, each covering 1 GiB.
    for i in 0..PDE_TABLES {
        entries[512 + i as usize] = (PDE_START + i * PAGE_SIZE as u64) | PRESENT | WRITABLE;
    }
    // PD entries: 2048 pages of 2 MiB, mapping 0..4 GiB onto itself.
    let pd = &mut entries[1024..];
    for (n, entry) in pd.iter_mut().enumerate() {
        *entry = ((n as u64) << HUGE_PAGE_SHIFT) | PRESENT | WRITABLE | HUGE_PAGE;
    }
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Writes the identity-mapping page tables; CR3 must then hold [`PML4_START`].
pub fn setup_identity_map(mem: &GuestMemoryMmap) -> Result<()> {
    mem.write_slice(&identity_map_tables(), GuestAddress(PML4_START))
        .map_err(|e| Error::WriteGuestMemory("page tables", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tables: &[u8], addr: u64) -> u64 {
        let at = (addr - PML4_START) as usize;
        u64::from_le_bytes(tables[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn tables_fill_six_pages() {
        assert_eq!(identity_map_tables().len(), 6 * PAGE_SIZE);
    }

    #[test]
    fn pml4_and_pdpt_point_down() {
        let t = identity_map_tables();
        assert_eq!(entry(&t, 0x9000), 0xa003);
        assert_eq!(entry(&t, 0x9008), 0);
        assert_eq!(entry(&t, 0xa000), 0xb003);
        assert_eq!(entry(&t, 0xa008), 0xc003);
        assert_eq!(entry(&t, 0xa010), 0xd003);
        assert_eq!(entry(&t, 0xa018), 0xe003);
        assert_eq!(entry(&t, 0xa020), 0);
    }

    #[test]
    fn directories_map_4_gib_with_2_mib_pages() {
        let t = identity_map_tables();
        assert_eq!(entry(&t, 0xb000), 0x83);
        assert_eq!(entry(&t, 0xb008), 0x20_0083);
        // Entry 512 (first of the second directory) maps 1 GiB.
        assert_eq!(entry(&t, 0xc000), 0x4000_0083);
        // The last entry maps 4 GiB - 2 MiB.
        assert_eq!(entry(&t, 0xeff8), 0xffe0_0083);
    }

    /// Walks the tables in software for a few addresses, as the MMU would.
    #[test]
    fn walk_translates_to_the_same_address() {
        let t = identity_map_tables();
        for va in [0u64, 0x7000, 0x100_0000, 0x2_0000, 0xbfff_ffff, 0xfee0_0000] {
            let pml4e = entry(&t, PML4_START + ((va >> 39) & 0x1ff) * 8);
            let pdpte = entry(&t, (pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8);
            let pde = entry(&t, (pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8);
            assert_eq!(pde & HUGE_PAGE, HUGE_PAGE);
            let pa = (pde & 0x000f_ffff_ffe0_0000) | (va & 0x1f_ffff);
            assert_eq!(pa, va);
        }
    }

    #[test]
    fn writes_tables() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        setup_identity_map(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        let last: u64 = mem.read_obj(GuestAddress(0xeff8)).unwrap();
        assert_eq!((pml4, last), (0xa003, 0xffe0_0083));
    }
}
