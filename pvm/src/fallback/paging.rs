//! The guest's own page tables, walked as the CPU walks them, so that the fallback's accesses fault
//! where the guest's would: present, user/supervisor, write (with CR0.WP), execute-disable
//! (EFER.NXE), SMEP, and SMAP (CR4.SMAP, unless RFLAGS.AC allows the access). Intel SDM vol. 3A,
//! 4.5 "4-Level Paging and 5-Level Paging", 4.4 "PAE Paging", 4.3 "32-Bit Paging", 4.6 "Access
//! Rights" and 4.7 "Page-Fault Exceptions".
//!
//! `KVM_TRANSLATE` is no substitute: it walks without an access type and (as of Linux 6.1)
//! reports every page writeable, so a write through it ignores read-only and supervisor pages.
//!
//! Not modelled: protection keys, and the accessed and dirty bits, which the fallback does not set
//! (setting them safely would need atomic updates of the guest's page tables).

use kvm_bindings::{kvm_regs, kvm_sregs};

use super::guest::Access;
use super::FallbackErrorKind;

const CR0_PG: u64 = 1 << 31;
const CR0_WP: u64 = 1 << 16;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const CR4_SMEP: u64 = 1 << 20;
const CR4_SMAP: u64 = 1 << 21;
const EFER_NXE: u64 = 1 << 11;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_AC: u64 = 1 << 18;
const RFLAGS_VM: u64 = 1 << 17;
const CR0_PE: u64 = 1;

const PTE_P: u64 = 1;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;
const PTE_XD: u64 = 1 << 63;
/// Bits 51:12 of a PAE or 4/5-level entry: the next table or the page.
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Bits of the #PF error code (SDM vol. 3A, 4.7).
pub const PF_PRESENT: u32 = 1;
pub const PF_WRITE: u32 = 1 << 1;
pub const PF_USER: u32 = 1 << 2;
pub const PF_RESERVED: u32 = 1 << 3;
pub const PF_FETCH: u32 = 1 << 4;

/// What a walk needs of the vCPU's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Paging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// The current privilege level: 3 makes every access a user access.
    pub cpl: u8,
    /// RFLAGS.AC, which lets supervisor data accesses reach user pages under SMAP.
    pub ac: bool,
}

impl Paging {
    /// The paging state of a vCPU.
    pub fn of(regs: &kvm_regs, sregs: &kvm_sregs) -> Self {
        let cpl = if sregs.cr0 & CR0_PE == 0 {
            0
        } else if regs.rflags & RFLAGS_VM != 0 {
            3
        } else {
            (sregs.cs.selector & 3) as u8
        };
        Paging {
            cr0: sregs.cr0,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
            cpl,
            ac: regs.rflags & RFLAGS_AC != 0,
        }
    }

    fn user(&self) -> bool {
        self.cpl == 3
    }

    /// The #PF error code bits every fault of `access` carries.
    fn access_code(&self, access: Access) -> u32 {
        let mut code = 0;
        if access == Access::Write {
            code |= PF_WRITE;
        }
        if self.user() {
            code |= PF_USER;
        }
        // The I/D bit is reported only where fetches can fault on their own.
        if access == Access::Fetch && (self.efer & EFER_NXE != 0 || self.cr4 & CR4_SMEP != 0) {
            code |= PF_FETCH;
        }
        code
    }
}

/// Where a linear address leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    /// The access may go ahead, to this guest-physical address.
    Mapped(u64),
    /// The access faults: #PF with this error code.
    Fault(u32),
}

/// One level of a walk: where its table is, how many bits of the address index it, and how big
/// its entries are.
struct Level {
    shift: u32,
    index_bits: u32,
    /// Whether an entry here may map a page (PS): PDPTE (1 GiB), PDE (2 or 4 MiB).
    may_map: bool,
}

/// Translates linear `gva` for `access` by walking the page tables `read_entry` reads (one entry
/// of `size` bytes, little-endian, at a guest-physical address).
pub fn translate(
    paging: &Paging,
    gva: u64,
    access: Access,
    read_entry: &mut dyn FnMut(u64, usize) -> Result<u64, FallbackErrorKind>,
) -> Result<Translation, FallbackErrorKind> {
    if paging.cr0 & CR0_PG == 0 {
        return Ok(Translation::Mapped(gva));
    }
    let long = paging.efer & EFER_LMA != 0;
    let pae = paging.cr4 & CR4_PAE != 0;
    let nxe = paging.efer & EFER_NXE != 0 && (long || pae);
    let code = paging.access_code(access);
    let not_present = Ok(Translation::Fault(code));
    let reserved = Ok(Translation::Fault(code | PF_PRESENT | PF_RESERVED));

    let pt = |shift| Level {
        shift,
        index_bits: 9,
        may_map: false,
    };
    let dir = |shift| Level {
        shift,
        index_bits: 9,
        may_map: true,
    };
    let (levels, entry_size, mut table): (Vec<Level>, usize, u64) = if long {
        let mut levels = Vec::with_capacity(5);
        if paging.cr4 & CR4_LA57 != 0 {
            levels.push(pt(48));
        }
        levels.extend([pt(39), dir(30), dir(21), pt(12)]);
        (levels, 8, paging.cr3 & PTE_ADDR)
    } else if pae {
        // The four PDPTEs sit at CR3 bits 31:5; they have no access rights of their own.
        let gva = gva & 0xffff_ffff;
        let pdpte = read_entry((paging.cr3 & 0xffff_ffe0) + ((gva >> 30) & 3) * 8, 8)?;
        if pdpte & PTE_P == 0 {
            return not_present;
        }
        if pdpte & 0x1e6 != 0 || pdpte & PTE_XD != 0 {
            return reserved;
        }
        (vec![dir(21), pt(12)], 8, pdpte & PTE_ADDR)
    } else {
        let levels = vec![
            Level {
                shift: 22,
                index_bits: 10,
                may_map: paging.cr4 & CR4_PSE != 0,
            },
            Level {
                shift: 12,
                index_bits: 10,
                may_map: false,
            },
        ];
        (levels, 4, paging.cr3 & 0xffff_f000)
    };

    let (mut user, mut writable, mut executable) = (true, true, true);
    let mut page = None;
    for level in &levels {
        let index = (gva >> level.shift) & ((1 << level.index_bits) - 1);
        let entry = read_entry(table + index * entry_size as u64, entry_size)?;
        if entry & PTE_P == 0 {
            return not_present;
        }
        if entry_size == 8 && entry & PTE_XD != 0 && !nxe {
            return reserved;
        }
        user &= entry & PTE_US != 0;
        writable &= entry & PTE_RW != 0;
        executable &= !(nxe && entry & PTE_XD != 0);
        let leaf = level.shift == 12 || (level.may_map && entry & PTE_PS != 0);
        if level.shift > 12 && !level.may_map && entry & PTE_PS != 0 && long {
            // PS in a PML4E or PML5E is reserved.
            return reserved;
        }
        if leaf {
            let size_mask = (1u64 << level.shift) - 1;
            let base = if entry_size == 4 {
                if level.shift == 22 {
                    // A 4 MiB page: bits 31:22, and bits 39:32 from entry bits 20:13.
                    (entry & 0xffc0_0000) | ((entry >> 13) & 0xff) << 32
                } else {
                    entry & 0xffff_f000
                }
            } else {
                if level.shift > 12 && entry & (size_mask & !0x1fff) != 0 {
                    // Bits between the PAT bit (12) and the page size are reserved.
                    return reserved;
                }
                entry & PTE_ADDR & !size_mask
            };
            page = Some(base | (gva & size_mask));
            break;
        }
        table = if entry_size == 4 {
            entry & 0xffff_f000
        } else {
            entry & PTE_ADDR
        };
    }
    let Some(gpa) = page else {
        return not_present;
    };

    let protection = Ok(Translation::Fault(code | PF_PRESENT));
    let wp = paging.cr0 & CR0_WP != 0;
    match access {
        Access::Fetch => {
            if (paging.user() && !user)
                || !executable
                || (!paging.user() && user && paging.cr4 & CR4_SMEP != 0)
            {
                return protection;
            }
        }
        Access::Read | Access::Write => {
            if paging.user() && !user {
                return protection;
            }
            if access == Access::Write && !writable && (paging.user() || wp) {
                return protection;
            }
            if !paging.user() && user && paging.cr4 & CR4_SMAP != 0 && !paging.ac {
                return protection;
            }
        }
    }
    Ok(Translation::Mapped(gpa))
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;

    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PT: u64 = 0x4000;
    const PAGE: u64 = 0x8000;
    /// Mapped by PML4[0] -> PDPT[0] -> PD[2] -> PT[1].
    const GVA: u64 = 0x40_1000;
    const URW: u64 = PTE_P | PTE_RW | PTE_US;

    /// Hand-built 4-level tables mapping [`GVA`] to [`PAGE`], with `leaf` as the PTE's flags.
    fn tables(leaf: u64) -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let set = |table: u64, index: u64, entry: u64| {
            mem.write_obj(entry, GuestAddress(table + index * 8))
                .unwrap()
        };
        set(PML4, 0, PDPT | URW);
        set(PDPT, 0, PD | URW);
        set(PD, 2, PT | URW);
        set(PT, 1, PAGE | leaf);
        mem
    }

    fn long_mode(cpl: u8) -> Paging {
        Paging {
            cr0: CR0_PE | CR0_PG | CR0_WP,
            cr3: PML4,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
            cpl,
            ac: false,
        }
    }

    fn walk(mem: &GuestMemoryMmap, paging: &Paging, gva: u64, access: Access) -> Translation {
        translate(paging, gva, access, &mut |gpa, size| {
            let mut entry = [0u8; 8];
            mem.read_slice(&mut entry[..size], GuestAddress(gpa))
                .map_err(|source| FallbackErrorKind::GuestMemory { gpa, source })?;
            Ok(u64::from_le_bytes(entry))
        })
        .unwrap()
    }

    #[test]
    fn a_user_page_maps_for_every_access() {
        let mem = tables(URW);
        for access in [Access::Read, Access::Write, Access::Fetch] {
            for cpl in [0, 3] {
                assert_eq!(
                    walk(&mem, &long_mode(cpl), GVA + 0x123, access),
                    Translation::Mapped(PAGE + 0x123),
                    "{access:?} at CPL {cpl}"
                );
            }
        }
    }

    #[test]
    fn missing_entries_are_not_present_faults() {
        let mem = tables(URW);
        // PT[2] is empty; so is PD[3].
        assert_eq!(
            walk(&mem, &long_mode(3), GVA + 0x1000, Access::Write),
            Translation::Fault(PF_WRITE | PF_USER)
        );
        assert_eq!(
            walk(&mem, &long_mode(0), 0x60_0000, Access::Read),
            Translation::Fault(0)
        );
        let mem = tables(URW & !PTE_P);
        assert_eq!(
            walk(&mem, &long_mode(0), GVA, Access::Read),
            Translation::Fault(0)
        );
    }

    #[test]
    fn read_only_pages_fault_on_writes_as_cr0_wp_says() {
        let mem = tables(PTE_P | PTE_US);
        let mut paging = long_mode(0);
        assert_eq!(
            walk(&mem, &paging, GVA, Access::Write),
            Translation::Fault(PF_PRESENT | PF_WRITE)
        );
        assert_eq!(
            walk(&mem, &paging, GVA, Access::Read),
            Translation::Mapped(PAGE)
        );
        // Without WP the kernel may write; user code still may not.
        paging.cr0 &= !CR0_WP;
        assert_eq!(
            walk(&mem, &paging, GVA, Access::Write),
            Translation::Mapped(PAGE)
        );
        paging.cpl = 3;
        assert_eq!(
            walk(&mem, &paging, GVA, Access::Write),
            Translation::Fault(PF_PRESENT | PF_WRITE | PF_USER)
        );
    }

    #[test]
    fn supervisor_pages_fault_for_user_code_at_any_level() {
        let mem = tables(PTE_P | PTE_RW);
        assert_eq!(
            walk(&mem, &long_mode(3), GVA, Access::Read),
            Translation::Fault(PF_PRESENT | PF_USER)
        );
        assert_eq!(
            walk(&mem, &long_mode(0), GVA, Access::Write),
            Translation::Mapped(PAGE)
        );
        // User bit on the PTE, but not on the PDPTE: still a supervisor page.
        let mem = tables(URW);
        mem.write_obj(PD | PTE_P | PTE_RW, GuestAddress(PDPT))
            .unwrap();
        assert_eq!(
            walk(&mem, &long_mode(3), GVA, Access::Fetch),
            Translation::Fault(PF_PRESENT | PF_USER)
        );
    }

    #[test]
    fn execute_disable_needs_efer_nxe() {
        let mem = tables(URW | PTE_XD);
        let mut paging = long_mode(3);
        // XD without NXE is a reserved bit.
        assert_eq!(
            walk(&mem, &paging, GVA, Access::Read),
            Translation::Fault(PF_PRESENT | PF_USER | PF_RESERVED)
        );
        paging.efer |= EFER_NXE;
        assert_eq!(
            walk(&mem, &paging, GVA, Access::Read),
            Translation::Mapped(PAGE)
        );
        assert_eq!(
            walk(&mem, &paging, GVA, Access::Fetch),
            Translation::Fault(PF_PRESENT | PF_USER | PF_FETCH)
        );
    }

    #[test]
    fn smap_and_smep_keep_the_kernel_off_user_pages() {
        let mem = tables(URW);
        let mut paging = long_mode(0);
        paging.cr4 |= CR4_SMAP | CR4_SMEP;
        assert_eq!(
            walk(&mem, &paging, GVA, Access::Write),
            Translation::Fault(PF_PRESENT | PF_WRITE)
        );
        assert_eq!(
            walk(&mem, &paging, GVA, Access::Fetch),
            Translation::Fault(PF_PRESENT | PF_FETCH)
        );
        // STAC (RFLAGS.AC) opens user pages to data accesses, not to fetches.
        paging.ac = true;
        assert_eq!(
            walk(&mem, &paging, GVA, Access::Read),
            Translation::Mapped(PAGE)
        );
        assert_eq!(
            walk(&mem, &paging, GVA, Access::Fetch),
            Translation::Fault(PF_PRESENT | PF_FETCH)
        );
        // User code is not affected.
        assert_eq!(
            walk(&mem, &long_mode(3), GVA, Access::Write),
            Translation::Mapped(PAGE)
        );
    }

    #[test]
    fn large_pages_and_their_reserved_bits() {
        let mem = tables(URW);
        // PD[3]: a 2 MiB page at 6 MiB; PDPT[1]: a 1 GiB page at 2 GiB.
        mem.write_obj(0x60_0000 | URW | PTE_PS, GuestAddress(PD + 3 * 8))
            .unwrap();
        mem.write_obj(0x8000_0000 | URW | PTE_PS, GuestAddress(PDPT + 8))
            .unwrap();
        let paging = long_mode(0);
        assert_eq!(
            walk(&mem, &paging, 0x7f_fff8, Access::Read),
            Translation::Mapped(0x7f_fff8)
        );
        assert_eq!(
            walk(&mem, &paging, 0x4123_4567, Access::Write),
            Translation::Mapped(0x8123_4567)
        );
        // Bit 13 of a 2 MiB page's address is reserved.
        mem.write_obj(0x60_2000 | URW | PTE_PS, GuestAddress(PD + 3 * 8))
            .unwrap();
        assert_eq!(
            walk(&mem, &paging, 0x60_0000, Access::Read),
            Translation::Fault(PF_PRESENT | PF_RESERVED)
        );
        // PS in a PML4 entry is reserved.
        mem.write_obj(PDPT | URW | PTE_PS, GuestAddress(PML4))
            .unwrap();
        assert_eq!(
            walk(&mem, &paging, GVA, Access::Read),
            Translation::Fault(PF_PRESENT | PF_RESERVED)
        );
    }

    #[test]
    fn five_level_tables_add_a_level_above() {
        let mem = tables(URW);
        // PML5 at 0x5000, entry 0 -> the PML4.
        mem.write_obj(PML4 | URW, GuestAddress(0x5000)).unwrap();
        let paging = Paging {
            cr3: 0x5000,
            cr4: CR4_PAE | CR4_LA57,
            ..long_mode(3)
        };
        assert_eq!(
            walk(&mem, &paging, GVA, Access::Read),
            Translation::Mapped(PAGE)
        );
    }

    #[test]
    fn legacy_modes() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        // Paging off: linear is physical.
        let off = Paging::default();
        assert_eq!(
            walk(&mem, &off, 0x1234, Access::Write),
            Translation::Mapped(0x1234)
        );
        // 32-bit paging: PD at 0x1000, PDE 1 -> PT at 0x2000, PTE 3 -> 0x9000 read-only user;
        // PDE 2 a 4 MiB page at 12 MiB (CR4.PSE).
        mem.write_obj(0x2000u32 | 7, GuestAddress(0x1000 + 4))
            .unwrap();
        mem.write_obj(0x9000u32 | 5, GuestAddress(0x2000 + 3 * 4))
            .unwrap();
        mem.write_obj(0xc0_0000u32 | 0x87, GuestAddress(0x1000 + 2 * 4))
            .unwrap();
        let legacy = Paging {
            cr0: CR0_PE | CR0_PG | CR0_WP,
            cr3: 0x1000,
            cr4: CR4_PSE,
            cpl: 3,
            ..Paging::default()
        };
        assert_eq!(
            walk(&mem, &legacy, 0x40_3abc, Access::Read),
            Translation::Mapped(0x9abc)
        );
        assert_eq!(
            walk(&mem, &legacy, 0x40_3abc, Access::Write),
            Translation::Fault(PF_PRESENT | PF_WRITE | PF_USER)
        );
        assert_eq!(
            walk(&mem, &legacy, 0x81_2345, Access::Read),
            Translation::Mapped(0xc1_2345)
        );
        // PAE: PDPTEs at CR3, PDPTE 0 -> PD at 0x3000, PDE 0 a 2 MiB page at 2 MiB.
        mem.write_obj(0x3000u64 | 1, GuestAddress(0x4000)).unwrap();
        mem.write_obj(0x20_0000u64 | 0x87, GuestAddress(0x3000))
            .unwrap();
        let pae = Paging {
            cr3: 0x4000,
            cr4: CR4_PAE,
            ..legacy
        };
        assert_eq!(
            walk(&mem, &pae, 0x1_2345, Access::Write),
            Translation::Mapped(0x21_2345)
        );
        assert_eq!(
            walk(&mem, &pae, 0x4000_0000, Access::Read),
            Translation::Fault(PF_USER)
        );
    }

    #[test]
    fn tables_outside_ram_are_an_error_not_a_panic() {
        let mem = tables(URW);
        let paging = Paging {
            cr3: 0x7fff_f000,
            ..long_mode(0)
        };
        let result = translate(&paging, GVA, Access::Read, &mut |gpa, _| {
            mem.read_obj::<u64>(GuestAddress(gpa))
                .map_err(|source| FallbackErrorKind::GuestMemory { gpa, source })
        });
        assert!(matches!(
            result,
            Err(FallbackErrorKind::GuestMemory {
                gpa: 0x7fff_f000,
                ..
            })
        ));
    }
}
