//! ELF vmlinux: the checks made before linux-loader copies it into guest memory.
//!
//! System V gABI, "ELF Header" and "Program Header" (field offsets of the 64-bit structures), and
//! the AMD64 psABI for `EM_X86_64`. linux-loader's `Elf` loader trusts the program headers (it
//! checks neither that a segment fits in guest RAM nor where the entry lies), so every PT_LOAD is
//! checked here first: inside the image, at or above 1 MiB, inside guest RAM, and the entry point
//! inside a loaded segment. The kernel's x86-64 vmlinux has physical load addresses in `p_paddr`
//! and a physical `e_entry` (startup_64), which is what we enter in 64-bit mode.
//!
//! A kernel built with `CONFIG_PVH` also has a PT_NOTE with a `XEN_ELFNOTE_PHYS32_ENTRY` note
//! (type 18, name "Xen"; Xen `xen/include/public/elfnote.h`) holding the 32-bit physical address
//! of its PVH entry. linux-loader finds it; we check that it, too, lies inside a loaded segment.

use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::{Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};

use crate::{Error, Result};

/// The ELF magic, `\x7fELF`.
pub(crate) const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
/// Everything below 1 MiB belongs to the zero page, command line, page tables and BIOS areas.
pub(crate) const HIMEM_START: u64 = 0x10_0000;

const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
/// A vmlinux has about five program headers; this bounds what a hostile header can make us read.
const MAX_PHNUM: u16 = 128;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

/// One PT_LOAD segment, already checked against the image and guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// What the checks learned about a vmlinux.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ElfLayout {
    /// Physical entry point (`e_entry`).
    pub entry: u64,
    /// First byte after the highest segment.
    pub end: u64,
    segments: Vec<Segment>,
}

/// A vmlinux placed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LoadedElf {
    pub entry: u64,
    pub end: u64,
    /// The PVH entry from the Xen ELF note, if the kernel has one.
    pub pvh_entry: Option<GuestAddress>,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    let mut v = [0; 2];
    if let Some(s) = b.get(off..off + 2) {
        v.copy_from_slice(s);
    }
    u16::from_le_bytes(v)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut v = [0; 4];
    if let Some(s) = b.get(off..off + 4) {
        v.copy_from_slice(s);
    }
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut v = [0; 8];
    if let Some(s) = b.get(off..off + 8) {
        v.copy_from_slice(s);
    }
    u64::from_le_bytes(v)
}

/// Whether `[offset, offset + len)` lies inside an image of `image_len` bytes.
fn in_image(offset: u64, len: u64, image_len: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= image_len)
}

/// Checks a vmlinux of `image_len` bytes against guest memory without writing anything.
pub(crate) fn inspect<M, R>(mem: &M, image: &mut R, image_len: u64) -> Result<ElfLayout>
where
    M: GuestMemoryBackend,
    R: Read + Seek,
{
    if image_len < EHDR_LEN as u64 {
        return Err(Error::InvalidElf("it is shorter than an ELF header"));
    }
    let mut ehdr = [0u8; EHDR_LEN];
    image.rewind().map_err(Error::ReadKernel)?;
    image.read_exact(&mut ehdr).map_err(Error::ReadKernel)?;
    if ehdr[..4] != ELF_MAGIC {
        return Err(Error::InvalidElf("it has no ELF signature"));
    }
    if ehdr[4] != ELFCLASS64 || ehdr[5] != ELFDATA2LSB || u16_at(&ehdr, 18) != EM_X86_64 {
        return Err(Error::InvalidElf("it is not a 64-bit x86 ELF file"));
    }
    if u16_at(&ehdr, 16) != ET_EXEC {
        return Err(Error::InvalidElf("it is not an executable"));
    }
    let entry = u64_at(&ehdr, 24);
    let phoff = u64_at(&ehdr, 32);
    let phentsize = u16_at(&ehdr, 54);
    let phnum = u16_at(&ehdr, 56);
    if usize::from(phentsize) != PHDR_LEN {
        return Err(Error::InvalidElf("its program header size is not 56"));
    }
    if phnum == 0 || phnum > MAX_PHNUM {
        return Err(Error::InvalidElf("its program header count is 0 or absurd"));
    }
    let table_len = usize::from(phnum) * PHDR_LEN;
    if phoff < EHDR_LEN as u64 || !in_image(phoff, table_len as u64, image_len) {
        return Err(Error::InvalidElf(
            "its program headers lie outside the file",
        ));
    }
    let mut table = vec![0u8; table_len];
    image
        .seek(SeekFrom::Start(phoff))
        .map_err(Error::ReadKernel)?;
    image.read_exact(&mut table).map_err(Error::ReadKernel)?;

    let mut segments = Vec::new();
    let mut end = 0u64;
    for phdr in table.chunks_exact(PHDR_LEN) {
        let p_type = u32_at(phdr, 0);
        let offset = u64_at(phdr, 8);
        let paddr = u64_at(phdr, 24);
        let filesz = u64_at(phdr, 32);
        let memsz = u64_at(phdr, 40);
        match p_type {
            PT_NOTE if !in_image(offset, filesz, image_len) => {
                return Err(Error::InvalidElf("a note segment lies outside the file"));
            }
            PT_LOAD if memsz > 0 || filesz > 0 => {
                if filesz > memsz {
                    return Err(Error::InvalidElf(
                        "a segment is larger in the file than in memory",
                    ));
                }
                if !in_image(offset, filesz, image_len) {
                    return Err(Error::InvalidElf("a segment lies outside the file"));
                }
                if paddr < HIMEM_START {
                    return Err(Error::SegmentBelow1M { addr: paddr });
                }
                let seg_end = paddr.checked_add(memsz);
                let fits = seg_end.is_some()
                    && usize::try_from(memsz)
                        .is_ok_and(|len| mem.check_range(GuestAddress(paddr), len));
                match seg_end {
                    Some(seg_end) if fits => end = end.max(seg_end),
                    _ => {
                        return Err(Error::KernelOutsideRam {
                            addr: paddr,
                            size: memsz,
                        })
                    }
                }
                segments.push(Segment {
                    paddr,
                    filesz,
                    memsz,
                });
            }
            _ => {}
        }
    }
    if !segments.iter().any(|s| s.filesz > 0) {
        return Err(Error::InvalidElf("it has no loadable segment"));
    }
    let layout = ElfLayout {
        entry,
        end,
        segments,
    };
    if !layout.loads(entry) {
        return Err(Error::InvalidElf(
            "its entry point is outside its loaded segments",
        ));
    }
    Ok(layout)
}

impl ElfLayout {
    /// Whether `addr` holds a byte from the file (inside a segment, below its BSS): an entry point
    /// must, or the vCPU would start in zeroes.
    fn loads(&self, addr: u64) -> bool {
        self.segments
            .iter()
            .any(|s| addr >= s.paddr && addr - s.paddr < s.filesz)
    }
}

/// Checks a vmlinux, copies its segments to their physical addresses and zeroes their BSS.
pub(crate) fn load<M, R>(mem: &M, image: &mut R, image_len: u64) -> Result<LoadedElf>
where
    M: GuestMemoryBackend,
    R: Read + ReadVolatile + Seek,
{
    let layout = inspect(mem, image, image_len)?;
    let result =
        Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START))).map_err(Error::Loader)?;
    for seg in &layout.segments {
        // inspect() checked paddr + memsz fits in RAM, so neither sum overflows.
        zero(mem, seg.paddr + seg.filesz, seg.memsz - seg.filesz)?;
    }
    let pvh_entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => {
            if !layout.loads(addr.0) {
                return Err(Error::PvhEntryOutsideKernel { addr: addr.0 });
            }
            Some(addr)
        }
        _ => None,
    };
    Ok(LoadedElf {
        entry: layout.entry,
        end: layout.end,
        pvh_entry,
    })
}

/// Zeroes `[addr, addr + len)`: a segment's BSS must not keep what an earlier boot left there.
/// The buffer of zeroes is no larger than the BSS: most segments have none, and a 64 KiB buffer
/// taken from the heap is 64 KiB more resident memory at start.
fn zero<M: GuestMemoryBackend>(mem: &M, addr: u64, len: u64) -> Result<()> {
    const CHUNK: usize = 64 * 1024;
    if len == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; (CHUNK as u64).min(len) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        let at = addr + done;
        mem.write_slice(&zeros[..n], GuestAddress(at))
            .map_err(|source| Error::GuestMemory { addr: at, source })?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{elf_image, guest_mem, Seg};
    use std::io::Cursor;

    fn inspect_bytes(mem_mib: u64, image: &[u8]) -> Result<ElfLayout> {
        let mem = guest_mem(mem_mib);
        inspect(&mem, &mut Cursor::new(image), image.len() as u64)
    }

    #[test]
    fn a_bss_larger_than_the_zero_buffer_is_zeroed_to_its_end_and_no_further() {
        // Arrange: 0x10 file bytes, then a BSS of two zero buffers and a bit, on dirty memory.
        let bss = 2 * 64 * 1024 + 0x123;
        let image = elf_image(
            0x20_0000,
            &[Seg {
                paddr: 0x20_0000,
                data: &[0x90; 0x10],
                memsz: 0x10 + bss as u64,
            }],
        );
        let mem = guest_mem(8);
        mem.write_slice(&vec![0xff; bss + 0x1000], GuestAddress(0x20_0000))
            .unwrap();

        // Act
        load(&mem, &mut Cursor::new(&image), image.len() as u64).unwrap();

        // Assert
        let mut back = vec![0u8; bss];
        mem.read_slice(&mut back, GuestAddress(0x20_0010)).unwrap();
        assert!(back.iter().all(|&b| b == 0), "BSS not zeroed");
        let after = GuestAddress(0x20_0010 + bss as u64);
        assert_eq!(mem.read_obj::<u8>(after).unwrap(), 0xff);
    }

    #[test]
    fn loads_segments_at_their_physical_addresses_and_zeroes_bss() {
        // Arrange: one segment with 0x100 file bytes and 0x2000 memory bytes; dirty memory first.
        let code: Vec<u8> = (0..0x100u32).map(|i| i as u8).collect();
        let image = elf_image(
            0x20_0010,
            &[Seg {
                paddr: 0x20_0000,
                data: &code,
                memsz: 0x2000,
            }],
        );
        let mem = guest_mem(8);
        mem.write_slice(&[0xff; 0x3000], GuestAddress(0x20_0000))
            .unwrap();

        // Act
        let loaded = load(&mem, &mut Cursor::new(&image), image.len() as u64).unwrap();

        // Assert
        assert_eq!(loaded.entry, 0x20_0010);
        assert_eq!(loaded.end, 0x20_2000);
        assert_eq!(loaded.pvh_entry, None);
        let mut back = vec![0u8; 0x2000];
        mem.read_slice(&mut back, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&back[..0x100], &code[..]);
        assert!(back[0x100..].iter().all(|&b| b == 0), "BSS not zeroed");
        // The byte after memsz is untouched.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20_2000)).unwrap(), 0xff);
    }

    #[test]
    fn kernel_end_is_the_highest_segment_end() {
        let image = elf_image(
            0x20_0000,
            &[
                Seg {
                    paddr: 0x20_0000,
                    data: &[0x90; 16],
                    memsz: 16,
                },
                Seg {
                    paddr: 0x40_0000,
                    data: &[1; 8],
                    memsz: 0x1000,
                },
            ],
        );
        assert_eq!(inspect_bytes(8, &image).unwrap().end, 0x40_1000);
    }

    #[test]
    fn segment_below_1_mib_is_refused() {
        let image = elf_image(
            0x9_0000,
            &[Seg {
                paddr: 0x9_0000,
                data: &[0x90; 16],
                memsz: 16,
            }],
        );
        assert!(matches!(
            inspect_bytes(8, &image),
            Err(Error::SegmentBelow1M { addr: 0x9_0000 })
        ));
    }

    #[test]
    fn segment_past_guest_ram_is_refused() {
        // 8 MiB of RAM; the BSS runs past its end.
        let image = elf_image(
            0x70_0000,
            &[Seg {
                paddr: 0x70_0000,
                data: &[0x90; 16],
                memsz: 0x20_0000,
            }],
        );
        assert!(matches!(
            inspect_bytes(8, &image),
            Err(Error::KernelOutsideRam {
                addr: 0x70_0000,
                size: 0x20_0000
            })
        ));
    }

    #[test]
    fn segment_address_that_overflows_is_refused() {
        let image = elf_image(
            u64::MAX - 4,
            &[Seg {
                paddr: u64::MAX - 8,
                data: &[0x90; 16],
                memsz: 16,
            }],
        );
        assert!(matches!(
            inspect_bytes(8, &image),
            Err(Error::KernelOutsideRam { .. })
        ));
    }

    #[test]
    fn entry_outside_every_segment_is_refused() {
        // A vmlinux whose entry is virtual (0xffffffff81000000) instead of physical.
        let image = elf_image(
            0xffff_ffff_8100_0000,
            &[Seg {
                paddr: 0x20_0000,
                data: &[0x90; 16],
                memsz: 16,
            }],
        );
        assert!(matches!(
            inspect_bytes(8, &image),
            Err(Error::InvalidElf(_))
        ));
    }

    #[test]
    fn a_32_bit_elf_is_refused() {
        let mut image = elf_image(
            0x20_0000,
            &[Seg {
                paddr: 0x20_0000,
                data: &[0x90; 16],
                memsz: 16,
            }],
        );
        image[4] = 1; // ELFCLASS32
        assert!(matches!(
            inspect_bytes(8, &image),
            Err(Error::InvalidElf(_))
        ));
    }

    #[test]
    fn truncated_segment_data_is_refused() {
        let image = elf_image(
            0x20_0000,
            &[Seg {
                paddr: 0x20_0000,
                data: &[0x90; 256],
                memsz: 256,
            }],
        );
        let cut = &image[..image.len() - 1];
        assert!(matches!(inspect_bytes(8, cut), Err(Error::InvalidElf(_))));
    }

    #[test]
    fn program_headers_past_the_end_are_refused() {
        let mut image = elf_image(
            0x20_0000,
            &[Seg {
                paddr: 0x20_0000,
                data: &[0x90; 16],
                memsz: 16,
            }],
        );
        image[32..40].copy_from_slice(&(u64::MAX - 10).to_le_bytes()); // e_phoff
        assert!(matches!(
            inspect_bytes(8, &image),
            Err(Error::InvalidElf(_))
        ));
    }
}
