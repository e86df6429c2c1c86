//! Segment descriptors and the boot GDT (Intel SDM Vol. 3A, 3.4.5 "Segment Descriptors" and 8.2.3
//! "TSS Descriptor in 64-bit Mode").
//!
//! The Linux 64-bit boot protocol wants flat code and data descriptors at selectors `__BOOT_CS`
//! (0x10) and `__BOOT_DS` (0x18), so the boot GDT is: null, null, code, data, then the 16-byte TSS
//! descriptor at 0x20 that KVM (on Intel) needs TR to point at. Linux loads its own GDT within a few
//! instructions; this one only has to be valid until then.
//!
//! A PVH boot (Xen `docs/misc/pvh.pandoc`, "x86/HVM direct boot ABI") starts in 32-bit protected
//! mode instead: CS a 32-bit flat execute/read segment, DS/ES/SS flat read/write, TR a 32-bit busy
//! TSS with base 0 and limit 0x67. [`pvh_gdt`] keeps the same slots and selectors (code 0x10,
//! data 0x18, TSS 0x20) with those descriptors, so the one table at [`GDT_START`] serves either
//! protocol and the segment registers always match what is in guest memory.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{GDT_ENTRIES, GDT_START, IDT_START};
use crate::{Error, Result};

/// Flags of a 64-bit code segment: G=1, L=1; present, DPL 0, code, execute/read, accessed.
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Flags of a flat data segment: G=1, D/B=1; present, DPL 0, data, read/write, accessed.
pub const DATA_FLAGS: u16 = 0xc093;
/// Flags of a TSS: G=1; present, DPL 0, system, 64-bit busy TSS.
pub const TSS_FLAGS: u16 = 0x808b;

/// Flags of a 32-bit code segment: G=1, D/B=1; present, DPL 0, code, execute/read, accessed.
pub const CODE32_FLAGS: u16 = 0xc09b;
/// Flags of a 32-bit busy TSS: byte-granular; present, DPL 0, system, type 0xb.
pub const TSS32_FLAGS: u16 = 0x008b;
/// Limit of the PVH entry's TSS: 0x67, the 104 bytes of a 32-bit TSS, as the PVH ABI asks.
pub const TSS32_LIMIT: u32 = 0x67;

/// Index of the code descriptor (selector 0x10, Linux `__BOOT_CS`).
pub const CODE_INDEX: u8 = 2;
/// Index of the data descriptor (selector 0x18, Linux `__BOOT_DS`).
pub const DATA_INDEX: u8 = 3;
/// Index of the TSS descriptor (selector 0x20); the descriptor takes two entries in long mode.
pub const TSS_INDEX: u8 = 4;

/// Encodes a segment descriptor from its 16 flag bits (`G D/B L AVL` in bits 15:12, the access byte
/// in bits 7:0), 32-bit base and 20-bit limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Decodes descriptor `entry` at GDT index `table_index` into KVM's segment-register form.
///
/// The limit is returned in bytes, as KVM expects: with G set, the 20-bit limit counts 4 KiB pages.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = bit(55);
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT, indexed as described in the module documentation.
pub fn boot_gdt() -> [u64; GDT_ENTRIES] {
    [
        0,
        0,
        gdt_entry(CODE64_FLAGS, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        // Low half of the TSS descriptor; the high half (base bits 63:32) is zero.
        gdt_entry(TSS_FLAGS, 0, 0xfffff),
        0,
    ]
}

/// The GDT for a PVH entry: the same slots as [`boot_gdt`], with a 32-bit code segment and a
/// 32-bit TSS. Entry 5 (the high half of a long-mode TSS descriptor) stays null.
pub fn pvh_gdt() -> [u64; GDT_ENTRIES] {
    [
        0,
        0,
        gdt_entry(CODE32_FLAGS, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS32_FLAGS, 0, TSS32_LIMIT),
        0,
    ]
}

/// The code, data and TSS segments of `gdt` as KVM segment registers.
pub fn segments_of(gdt: &[u64; GDT_ENTRIES]) -> (kvm_segment, kvm_segment, kvm_segment) {
    let seg = |i: u8| kvm_segment_from_gdt(gdt[usize::from(i)], i);
    (seg(CODE_INDEX), seg(DATA_INDEX), seg(TSS_INDEX))
}

/// The boot code, data and TSS segments as KVM segment registers.
pub fn boot_segments() -> (kvm_segment, kvm_segment, kvm_segment) {
    segments_of(&boot_gdt())
}

/// Writes the boot GDT at [`GDT_START`] and an empty (all-zero) IDT at [`IDT_START`].
pub fn write_gdt_and_idt(mem: &GuestMemoryMmap) -> Result<()> {
    write_gdt_and_idt_of(mem, &boot_gdt())
}

/// Writes `gdt` at [`GDT_START`] and an empty (all-zero) IDT at [`IDT_START`].
pub fn write_gdt_and_idt_of(mem: &GuestMemoryMmap, gdt: &[u64; GDT_ENTRIES]) -> Result<()> {
    let gdt: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&gdt, GuestAddress(GDT_START))
        .map_err(|e| Error::WriteGuestMemory("boot GDT", e))?;
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(|e| Error::WriteGuestMemory("boot IDT", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_flat_boot_descriptors() {
        assert_eq!(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA_FLAGS, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(TSS_FLAGS, 0, 0xfffff), 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn encodes_base_and_limit_bits() {
        // Base 0x12345678 splits into bits 63:56 (0x12) and 39:16 (0x345678); limit 0xabcde into
        // bits 51:48 (0xa) and 15:0 (0xbcde); the flags 0x4093 land in 55:52 and 47:40.
        assert_eq!(
            gdt_entry(0x4093, 0x1234_5678, 0xabcde),
            0x124a_9334_5678_bcde
        );
    }

    #[test]
    fn decodes_code_segment() {
        let seg = kvm_segment_from_gdt(0x00af_9b00_0000_ffff, 2);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.selector, 0x10);
        assert_eq!(seg.type_, 0xb);
        assert_eq!((seg.present, seg.dpl, seg.s), (1, 0, 1));
        assert_eq!((seg.l, seg.db, seg.g, seg.avl), (1, 0, 1, 0));
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn decodes_byte_granular_segment_with_base() {
        let seg = kvm_segment_from_gdt(0x124a_9334_5678_bcde, 7);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.selector, 0x38);
        assert_eq!((seg.type_, seg.s, seg.present), (3, 1, 1));
        assert_eq!((seg.db, seg.l, seg.g), (1, 0, 0));
    }

    #[test]
    fn null_descriptor_is_unusable() {
        let seg = kvm_segment_from_gdt(0, 0);
        assert_eq!((seg.present, seg.unusable), (0, 1));
    }

    #[test]
    fn boot_selectors_match_the_boot_protocol() {
        let (code, data, tss) = boot_segments();
        assert_eq!(
            (code.selector, data.selector, tss.selector),
            (0x10, 0x18, 0x20)
        );
        assert_eq!((code.l, code.type_), (1, 0xb));
        assert_eq!((data.db, data.type_, data.limit), (1, 3, 0xffff_ffff));
        assert_eq!((tss.s, tss.type_), (0, 0xb));
        assert_eq!(boot_gdt()[5], 0);
    }

    #[test]
    fn pvh_descriptors_are_32_bit_flat() {
        let (code, data, tss) = segments_of(&pvh_gdt());
        assert_eq!(pvh_gdt()[2], 0x00cf_9b00_0000_ffff);
        assert_eq!(pvh_gdt()[4], 0x0000_8b00_0000_0067);
        assert_eq!(
            (code.selector, code.base, code.limit),
            (0x10, 0, 0xffff_ffff)
        );
        assert_eq!(
            (code.type_, code.db, code.l, code.g, code.s),
            (0xb, 1, 0, 1, 1)
        );
        assert_eq!((data.selector, data.type_, data.db), (0x18, 3, 1));
        assert_eq!((data.base, data.limit), (0, 0xffff_ffff));
        assert_eq!((tss.selector, tss.base, tss.limit), (0x20, 0, 0x67));
        assert_eq!((tss.type_, tss.s, tss.present, tss.g), (0xb, 0, 1, 0));
    }

    #[test]
    fn writes_gdt_and_idt() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        write_gdt_and_idt(&mem).unwrap();
        let code: u64 = mem.read_obj(GuestAddress(GDT_START + 0x10)).unwrap();
        let data: u64 = mem.read_obj(GuestAddress(GDT_START + 0x18)).unwrap();
        let idt: u64 = mem.read_obj(GuestAddress(IDT_START)).unwrap();
        assert_eq!(code, 0x00af_9b00_0000_ffff);
        assert_eq!(data, 0x00cf_9300_0000_ffff);
        assert_eq!(idt, 0);
    }
}
