//! Builders of small synthetic kernel images for the unit tests.

use std::io::Write;

use linux_loader::loader::bootparam::setup_header;
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap};

use crate::bzimage::HEADER_OFFSET;
use crate::decompress::Compression;
use crate::{BootProtocol, KernelFormat, LoadedKernel};

/// Guest RAM from address 0.
pub fn guest_mem(mib: u64) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (mib << 20) as usize)]).unwrap()
}

/// A kernel whose header says nothing but where it ends and its `initrd_addr_max`.
pub fn kernel_at(kernel_end: u64, initrd_addr_max: u32) -> LoadedKernel {
    let hdr = setup_header {
        initrd_addr_max,
        cmdline_size: 2047,
        ..Default::default()
    };
    LoadedKernel {
        entry: GuestAddress(0x100_0000),
        protocol: BootProtocol::Linux64,
        setup_header: Some(hdr),
        kernel_end: GuestAddress(kernel_end),
        format: KernelFormat::Elf,
        pvh_entry: None,
    }
}

/// One PT_LOAD segment of a synthetic vmlinux.
pub struct Seg<'a> {
    pub paddr: u64,
    pub data: &'a [u8],
    pub memsz: u64,
}

/// A 64-bit x86 ELF executable with one PT_LOAD per segment, data after the headers.
pub fn elf_image(entry: u64, segs: &[Seg]) -> Vec<u8> {
    elf_image_with_notes(entry, segs, &[])
}

/// A note of `n_type` named `name` (NUL added) carrying `desc`, padded as ELF notes are.
pub fn elf_note(name: &str, n_type: u32, desc: &[u8]) -> Vec<u8> {
    let pad = |v: &mut Vec<u8>| v.resize(v.len().next_multiple_of(4), 0);
    let mut note = Vec::new();
    note.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
    note.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    note.extend_from_slice(&n_type.to_le_bytes());
    note.extend_from_slice(name.as_bytes());
    note.push(0);
    pad(&mut note);
    note.extend_from_slice(desc);
    pad(&mut note);
    note
}

/// The `XEN_ELFNOTE_PHYS32_ENTRY` note (type 18, "Xen") with a PVH entry point, as Linux's
/// `arch/x86/platform/pvh/head.S` emits it.
pub fn pvh_note(entry: u32) -> Vec<u8> {
    elf_note("Xen", 18, &entry.to_le_bytes())
}

/// [`elf_image`] with a PT_NOTE segment holding `notes` when they are not empty.
pub fn elf_image_with_notes(entry: u64, segs: &[Seg], notes: &[u8]) -> Vec<u8> {
    let phnum = segs.len() + usize::from(!notes.is_empty());
    let phoff = 64u64;
    let data_start = phoff + 56 * phnum as u64;
    let mut out = Vec::new();
    // e_ident
    out.extend_from_slice(b"\x7fELF");
    out.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, SysV
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    out.extend_from_slice(&1u32.to_le_bytes()); // e_version
    out.extend_from_slice(&entry.to_le_bytes());
    out.extend_from_slice(&phoff.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    out.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    out.extend_from_slice(&(phnum as u16).to_le_bytes());
    out.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    assert_eq!(out.len(), 64);
    let mut offset = data_start;
    for seg in segs {
        out.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        out.extend_from_slice(&7u32.to_le_bytes()); // RWX
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&(0xffff_ffff_8000_0000u64 | seg.paddr).to_le_bytes()); // vaddr
        out.extend_from_slice(&seg.paddr.to_le_bytes());
        out.extend_from_slice(&(seg.data.len() as u64).to_le_bytes());
        out.extend_from_slice(&seg.memsz.to_le_bytes());
        out.extend_from_slice(&0x20_0000u64.to_le_bytes());
        offset += seg.data.len() as u64;
    }
    if !notes.is_empty() {
        out.extend_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        out.extend_from_slice(&4u32.to_le_bytes()); // R
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes()); // vaddr
        out.extend_from_slice(&0u64.to_le_bytes()); // paddr
        out.extend_from_slice(&(notes.len() as u64).to_le_bytes());
        out.extend_from_slice(&(notes.len() as u64).to_le_bytes());
        out.extend_from_slice(&4u64.to_le_bytes());
    }
    for seg in segs {
        out.extend_from_slice(seg.data);
    }
    out.extend_from_slice(notes);
    out
}

/// A tiny vmlinux: 0x300 bytes of code at 16 MiB (entry at its start) and 64 KiB of BSS.
pub fn tiny_vmlinux() -> Vec<u8> {
    tiny_vmlinux_with_notes(&[])
}

/// [`tiny_vmlinux`] with a note segment, e.g. [`pvh_note`]`(0x100_0100)`.
pub fn tiny_vmlinux_with_notes(notes: &[u8]) -> Vec<u8> {
    let code: Vec<u8> = (0..0x300u32).map(|i| (i * 7 % 256) as u8).collect();
    // Trailing bytes stand in for the relocation table the kernel appends after the ELF.
    let mut image = elf_image_with_notes(
        0x100_0000,
        &[Seg {
            paddr: 0x100_0000,
            data: &code,
            memsz: 0x1_0000,
        }],
        notes,
    );
    image.extend_from_slice(&[0xee; 64]);
    image
}

/// Setup-header fields a test may want to vary.
pub struct BzOpts {
    pub setup_sects: u8,
    pub version: u16,
    pub xloadflags: u16,
    pub relocatable: bool,
    pub kernel_alignment: u32,
    pub pref_address: u64,
    pub init_size: u32,
    pub initrd_addr_max: u32,
    pub cmdline_size: u32,
}

impl Default for BzOpts {
    /// Values as in Debian's 6.1 kernel, scaled to small test memories where it matters.
    fn default() -> Self {
        BzOpts {
            setup_sects: 4,
            version: 0x020f,
            xloadflags: 0x7f,
            relocatable: true,
            kernel_alignment: 0x20_0000,
            pref_address: 0x100_0000,
            init_size: 0x40_0000,
            initrd_addr_max: 0x7fff_ffff,
            cmdline_size: 2047,
        }
    }
}

/// Offset of the payload inside the protected-mode part (after a stand-in decompressor stub).
pub const PAYLOAD_OFFSET: u32 = 0x300;

/// A bzImage whose protected-mode part is a 0x300-byte stub, then `payload`, then 0x100 bytes.
pub fn bzimage(payload: &[u8], o: &BzOpts) -> Vec<u8> {
    let sects = if o.setup_sects == 0 {
        4
    } else {
        usize::from(o.setup_sects)
    };
    let setup_size = (sects + 1) * 512;
    let hdr = setup_header {
        setup_sects: o.setup_sects,
        boot_flag: 0xaa55,
        header: 0x5372_6448,
        version: o.version,
        loadflags: 0x01,
        code32_start: 0x10_0000,
        initrd_addr_max: o.initrd_addr_max,
        kernel_alignment: o.kernel_alignment,
        relocatable_kernel: u8::from(o.relocatable),
        min_alignment: 21,
        xloadflags: o.xloadflags,
        cmdline_size: o.cmdline_size,
        payload_offset: PAYLOAD_OFFSET,
        payload_length: payload.len() as u32,
        pref_address: o.pref_address,
        init_size: o.init_size,
        ..Default::default()
    };
    let mut image = vec![0u8; setup_size];
    image[HEADER_OFFSET..HEADER_OFFSET + hdr.as_slice().len()].copy_from_slice(hdr.as_slice());
    image.extend((0..PAYLOAD_OFFSET).map(|i| (i % 256) as u8));
    image.extend_from_slice(payload);
    image.extend_from_slice(&[0xcc; 0x100]);
    image
}

/// Compresses like the kernel build does, including the 4-byte size trailer where it adds one.
pub fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
    let mut out = match c {
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            // gzip's own trailer ends with ISIZE, which serves as the size; no extra trailer.
            return e.finish().unwrap();
        }
        Compression::Bzip2 => {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Xz => {
            // As scripts/xz_wrap.sh: x86 BCJ then LZMA2, CRC32 check (small dictionary here).
            let mut opts = liblzma::stream::LzmaOptions::new_preset(1).unwrap();
            opts.dict_size(1 << 20);
            let mut filters = liblzma::stream::Filters::new();
            filters.x86().lzma2(&opts);
            let stream = liblzma::stream::Stream::new_stream_encoder(
                &filters,
                liblzma::stream::Check::Crc32,
            )
            .unwrap();
            let mut e = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Lzma => {
            let opts = liblzma::stream::LzmaOptions::new_preset(1).unwrap();
            let stream = liblzma::stream::Stream::new_lzma_encoder(&opts).unwrap();
            let mut e = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => {
            ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
        }
        Compression::Lz4 => {
            // `lz4 -l`: magic, then (length, block) pairs of at most 8 MiB of input each.
            let mut out = vec![0x02, 0x21, 0x4c, 0x18];
            for chunk in data.chunks(8 << 20) {
                let block = lz4_flex::block::compress(chunk);
                out.extend_from_slice(&(block.len() as u32).to_le_bytes());
                out.extend_from_slice(&block);
            }
            out
        }
        Compression::Lzo => {
            let mut out = b"\x89LZO\0\r\n\x1a\n".to_vec();
            out.extend_from_slice(data);
            out
        }
    };
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}
