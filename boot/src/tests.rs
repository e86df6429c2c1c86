//! Tests of the public entry points on synthetic images, and on the host's own kernel when it
//! has one.

use std::io::Cursor;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::decompress::Compression;
use crate::testutil::{
    bzimage, compress, elf_note, guest_mem, pvh_note, tiny_vmlinux, tiny_vmlinux_with_notes,
    BzOpts, PAYLOAD_OFFSET,
};

const HOST: KernelOptions = KernelOptions {
    decompress: Decompress::Host,
    protocol: ProtocolChoice::Auto,
};
const GUEST: KernelOptions = KernelOptions {
    decompress: Decompress::Guest,
    protocol: ProtocolChoice::Auto,
};
const LINUX64: KernelOptions = KernelOptions {
    decompress: Decompress::Host,
    protocol: ProtocolChoice::Linux64,
};

fn identify(image: &[u8]) -> Result<KernelFormat> {
    identify_kernel(&mut Cursor::new(image))
}

fn load(mem_mib: u64, image: &[u8], opts: &KernelOptions) -> Result<LoadedKernel> {
    load_kernel(&guest_mem(mem_mib), &mut Cursor::new(image), opts)
}

#[test]
fn identifies_elf_and_bzimages() {
    assert_eq!(identify(&tiny_vmlinux()).unwrap(), KernelFormat::Elf);
    let xz = bzimage(
        &compress(Compression::Xz, &tiny_vmlinux()),
        &BzOpts::default(),
    );
    assert_eq!(
        identify(&xz).unwrap(),
        KernelFormat::BzImage {
            decompressed_on_host: true
        }
    );
    let lzo = bzimage(
        &compress(Compression::Lzo, &tiny_vmlinux()),
        &BzOpts::default(),
    );
    assert_eq!(
        identify(&lzo).unwrap(),
        KernelFormat::BzImage {
            decompressed_on_host: false
        }
    );
    // Protocol 2.07 has no payload fields, so only the kernel can find its payload.
    let old = bzimage(
        &compress(Compression::Xz, &tiny_vmlinux()),
        &BzOpts {
            version: 0x0207,
            ..BzOpts::default()
        },
    );
    assert_eq!(
        identify(&old).unwrap(),
        KernelFormat::BzImage {
            decompressed_on_host: false
        }
    );
}

#[test]
fn anything_else_is_not_a_kernel() {
    for junk in [&b""[..], b"\x7fEL", b"#!/bin/sh\necho hi\n", &[0u8; 4096]] {
        let err = identify(junk).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the kernel image is not a bzImage or ELF vmlinux"
        );
    }
}

#[test]
fn bad_images_are_user_errors_and_io_failures_are_not() {
    assert!(identify(b"plain text").unwrap_err().is_user_input());
    let err = load(16, &tiny_vmlinux(), &HOST).unwrap_err();
    assert!(err.is_user_input(), "too little RAM for the kernel: {err}");
    let io = Error::ReadKernel(std::io::Error::other("disk on fire"));
    assert!(!io.is_user_input());
}

#[test]
fn loads_an_elf_vmlinux() {
    let mem = guest_mem(32);
    let k = load_kernel(&mem, &mut Cursor::new(tiny_vmlinux()), &HOST).unwrap();
    assert_eq!(k.entry, GuestAddress(0x100_0000));
    assert_eq!(k.kernel_end, GuestAddress(0x101_0000));
    assert_eq!(k.format, KernelFormat::Elf);
    assert_eq!(k.protocol, BootProtocol::Linux64);
    assert!(k.setup_header.is_none());
    assert_eq!(k.max_cmdline_len(), 2047);
    assert_eq!(k.initrd_addr_max(), 0xffff_ffff);
    // The code byte at entry + 1 is 7 (the builder's pattern i * 7).
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x100_0001)).unwrap(), 7);
}

#[test]
fn an_elf_with_the_pvh_note_boots_through_pvh() {
    // Arrange: the notes a Linux vmlinux has before Xen's (build ID, Linux version).
    let mut notes = elf_note("GNU", 3, &[0xab; 20]);
    notes.extend(elf_note("Linux", 6, &[0]));
    notes.extend(pvh_note(0x100_0100));
    let mem = guest_mem(32);

    // Act
    let k = load_kernel(
        &mem,
        &mut Cursor::new(tiny_vmlinux_with_notes(&notes)),
        &HOST,
    )
    .unwrap();

    // Assert
    assert_eq!(k.protocol, BootProtocol::Pvh);
    assert_eq!(k.entry, GuestAddress(0x100_0100));
    assert_eq!(k.pvh_entry, Some(GuestAddress(0x100_0100)));
    assert_eq!(k.format, KernelFormat::Elf);
    assert_eq!(k.kernel_end, GuestAddress(0x101_0000));
}

#[test]
fn linux64_keeps_the_64_bit_entry_of_a_pvh_capable_elf() {
    let image = tiny_vmlinux_with_notes(&pvh_note(0x100_0100));
    let k = load(32, &image, &LINUX64).unwrap();
    assert_eq!(k.protocol, BootProtocol::Linux64);
    assert_eq!(k.entry, GuestAddress(0x100_0000));
    assert_eq!(
        k.pvh_entry,
        Some(GuestAddress(0x100_0100)),
        "still reported"
    );
}

#[test]
fn an_elf_with_other_notes_only_boots_through_the_64_bit_protocol() {
    let image = tiny_vmlinux_with_notes(&elf_note("GNU", 3, &[1; 20]));
    let k = load(32, &image, &HOST).unwrap();
    assert_eq!((k.protocol, k.pvh_entry), (BootProtocol::Linux64, None));
    assert_eq!(k.entry, GuestAddress(0x100_0000));
}

#[test]
fn a_pvh_entry_outside_the_kernel_is_refused() {
    // 0x100_0400 is past the 0x300 bytes of code, in the BSS.
    let image = tiny_vmlinux_with_notes(&pvh_note(0x100_0400));
    let err = load(32, &image, &HOST).unwrap_err();
    assert!(
        matches!(err, Error::PvhEntryOutsideKernel { addr: 0x100_0400 }),
        "{err}"
    );
    assert!(err.is_user_input());
}

#[test]
fn a_bzimage_boots_through_its_setup_header_even_with_a_pvh_note() {
    let vmlinux = tiny_vmlinux_with_notes(&pvh_note(0x100_0100));
    let image = bzimage(&compress(Compression::Gzip, &vmlinux), &BzOpts::default());
    let k = load(32, &image, &HOST).unwrap();
    assert_eq!(k.protocol, BootProtocol::Linux64);
    assert_eq!(k.entry, GuestAddress(0x100_0000));
    assert!(k.setup_header.is_some());
    assert_eq!(k.pvh_entry, Some(GuestAddress(0x100_0100)));
}

#[test]
fn host_decompresses_every_supported_payload() {
    let vmlinux = tiny_vmlinux();
    for c in [
        Compression::Gzip,
        Compression::Bzip2,
        Compression::Lzma,
        Compression::Xz,
        Compression::Lz4,
        Compression::Zstd,
    ] {
        // Arrange
        let image = bzimage(&compress(c, &vmlinux), &BzOpts::default());
        let mem = guest_mem(32);

        // Act
        let k = load_kernel(&mem, &mut Cursor::new(&image), &HOST)
            .unwrap_or_else(|e| panic!("{}: {e}", c.name()));

        // Assert: the ELF's entry and extent, and the header kept for the zero page.
        assert_eq!(k.entry, GuestAddress(0x100_0000), "{}", c.name());
        assert_eq!(k.kernel_end, GuestAddress(0x101_0000), "{}", c.name());
        assert_eq!(
            k.format,
            KernelFormat::BzImage {
                decompressed_on_host: true
            }
        );
        let hdr = k.setup_header.unwrap();
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!(k.max_cmdline_len(), 2047);
        assert_eq!(k.initrd_addr_max(), 0x7fff_ffff);
        let mut code = [0u8; 4];
        mem.read_slice(&mut code, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(code, [0, 7, 14, 21], "{}", c.name());
    }
}

#[test]
fn guest_decompression_loads_the_protected_mode_part_at_pref_address() {
    // Arrange
    let image = bzimage(
        &compress(Compression::Xz, &tiny_vmlinux()),
        &BzOpts::default(),
    );
    let setup_size = 5 * 512;
    let mem = guest_mem(32);

    // Act
    let k = load_kernel(&mem, &mut Cursor::new(&image), &GUEST).unwrap();

    // Assert: entry is startup_64 of the compressed kernel, 0x200 in; room for init_size.
    assert_eq!(k.entry, GuestAddress(0x100_0200));
    assert_eq!(k.kernel_end, GuestAddress(0x100_0000 + 0x40_0000));
    assert_eq!(
        k.format,
        KernelFormat::BzImage {
            decompressed_on_host: false
        }
    );
    assert_eq!({ k.setup_header.unwrap().code32_start }, 0x100_0000);
    let mut back = vec![0u8; image.len() - setup_size];
    mem.read_slice(&mut back, GuestAddress(0x100_0000)).unwrap();
    assert_eq!(back, &image[setup_size..]);
}

#[test]
fn lzo_payload_falls_back_to_the_guest() {
    let image = bzimage(
        &compress(Compression::Lzo, &tiny_vmlinux()),
        &BzOpts::default(),
    );
    let k = load(32, &image, &HOST).unwrap();
    assert_eq!(k.entry, GuestAddress(0x100_0200));
    assert_eq!(
        k.format,
        KernelFormat::BzImage {
            decompressed_on_host: false
        }
    );
}

#[test]
fn protocol_2_07_falls_back_and_loads_at_1_mib_aligned_to_kernel_alignment() {
    // Before 2.10 there is no pref_address or init_size: 1 MiB rounded up to 2 MiB.
    let image = bzimage(
        &compress(Compression::Xz, &tiny_vmlinux()),
        &BzOpts {
            version: 0x0207,
            ..BzOpts::default()
        },
    );
    let k = load(32, &image, &HOST).unwrap();
    assert_eq!(k.entry, GuestAddress(0x20_0200));
    assert_eq!(
        k.kernel_end,
        GuestAddress(0x20_0000 + (image.len() - 5 * 512) as u64)
    );
}

#[test]
fn guest_decompression_needs_init_size_of_ram() {
    // 16 MiB of RAM and a kernel that wants 16 MiB + 4 MiB.
    let image = bzimage(
        &compress(Compression::Xz, &tiny_vmlinux()),
        &BzOpts::default(),
    );
    let err = load(16, &image, &GUEST).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the kernel needs guest RAM from 0x1000000 to 0x1400000, which the VM does not have"
    );
    assert!(matches!(
        err,
        Error::KernelOutsideRam {
            addr: 0x100_0000,
            size: 0x40_0000
        }
    ));
}

#[test]
fn corrupt_payload_is_an_error() {
    let mut payload = compress(Compression::Xz, &tiny_vmlinux());
    let mid = payload.len() / 2;
    payload[mid] ^= 0xff;
    let image = bzimage(&payload, &BzOpts::default());
    let err = load(32, &image, &HOST).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the xz-compressed kernel payload is corrupt"
    );
}

#[test]
fn payload_that_is_not_elf_is_an_error() {
    let image = bzimage(
        &compress(Compression::Gzip, b"not a kernel at all"),
        &BzOpts::default(),
    );
    assert!(matches!(load(32, &image, &HOST), Err(Error::PayloadNotElf)));
}

#[test]
fn payload_larger_than_guest_ram_is_refused() {
    // 9 MiB of zeros compress to almost nothing; the guest has 8 MiB.
    let bomb = compress(Compression::Xz, &vec![0u8; 9 << 20]);
    let image = bzimage(&bomb, &BzOpts::default());
    let err = load(8, &image, &HOST).unwrap_err();
    assert!(
        matches!(err, Error::PayloadTooLarge { limit_mib: 8, .. }),
        "{err}"
    );
}

#[test]
fn decompressed_kernel_outside_ram_is_refused() {
    // The vmlinux wants 16 MiB + 64 KiB, the guest has 16 MiB.
    let image = bzimage(
        &compress(Compression::Gzip, &tiny_vmlinux()),
        &BzOpts::default(),
    );
    assert!(matches!(
        load(16, &image, &HOST),
        Err(Error::KernelOutsideRam {
            addr: 0x100_0000,
            ..
        })
    ));
}

#[test]
fn payload_offset_past_the_image_is_refused() {
    let mut image = bzimage(
        &compress(Compression::Xz, &tiny_vmlinux()),
        &BzOpts::default(),
    );
    // payload_offset at 0x248.
    image[0x248..0x24c].copy_from_slice(&(PAYLOAD_OFFSET + 0x10_0000).to_le_bytes());
    assert!(matches!(
        load(32, &image, &HOST),
        Err(Error::InvalidBzImage(_))
    ));
}

/// A small xorshift generator, so the mutation test is the same on every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn mutated_images_never_panic() {
    // A poor man's fuzzer over the same entry point as the `kernel_loader` fuzz target: flip
    // bytes in the headers and payloads of valid images and truncate them.
    let vmlinux = tiny_vmlinux();
    let seeds = [
        vmlinux.clone(),
        bzimage(&compress(Compression::Xz, &vmlinux), &BzOpts::default()),
        bzimage(&compress(Compression::Zstd, &vmlinux), &BzOpts::default()),
        bzimage(&compress(Compression::Lz4, &vmlinux), &BzOpts::default()),
        bzimage(&compress(Compression::Gzip, &vmlinux), &BzOpts::default()),
    ];
    let mem = guest_mem(32);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut loaded = 0;
    for round in 0..1500 {
        let mut image = seeds[round % seeds.len()].clone();
        for _ in 0..1 + rng.below(4) {
            // Mostly the headers, where the lengths and offsets are.
            let at = if rng.below(2) == 0 {
                rng.below(image.len().min(0x300))
            } else {
                rng.below(image.len())
            };
            image[at] = rng.next() as u8;
        }
        if rng.below(8) == 0 {
            image.truncate(rng.below(image.len()));
        }
        let opts = if rng.below(4) == 0 { &GUEST } else { &HOST };
        let _ = identify_kernel(&mut Cursor::new(&image));
        if load_kernel(&mem, &mut Cursor::new(&image), opts).is_ok() {
            loaded += 1;
        }
    }
    // Many mutations hit bytes nobody checks; the valid majority must still load.
    assert!(loaded > 300, "only {loaded} mutated images loaded");
}

/// The host's own distribution kernel, when there is one (Debian installs one in /boot).
fn host_kernel() -> Option<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    found.pop()
}

#[test]
fn host_kernel_decompresses_on_the_host_to_its_elf_entry() {
    let Some(path) = host_kernel() else {
        eprintln!("skipped: no /boot/vmlinuz-* on this machine");
        return;
    };
    // Arrange
    let bytes = std::fs::read(&path).unwrap();
    let mem = guest_mem(256);

    // Act
    let started = Instant::now();
    let k = load_kernel(&mem, &mut Cursor::new(&bytes), &HOST).unwrap();
    let elapsed = started.elapsed();

    // Assert: a distribution kernel's startup_64 is the start of its text, at
    // CONFIG_PHYSICAL_START, which the header also gives as pref_address.
    let hdr = k.setup_header.unwrap();
    eprintln!(
        "{}: host decompression and load took {elapsed:?}; entry {:#x}, kernel_end {:#x}, protocol {:#x}, PVH entry {:?}",
        path.display(),
        k.entry.0,
        k.kernel_end.0,
        { hdr.version },
        k.pvh_entry
    );
    assert_eq!(
        k.format,
        KernelFormat::BzImage {
            decompressed_on_host: true
        }
    );
    assert_eq!(k.entry.0, { hdr.pref_address });
    assert!(k.kernel_end.0 > k.entry.0 + (16 << 20));

    // The bytes at the entry are the vmlinux's first segment, decompressed independently.
    let bz = bzimage::BzImage::parse(&bytes[..PROBE_LEN], bytes.len() as u64)
        .unwrap()
        .unwrap();
    let range = bz.payload_range().unwrap().unwrap();
    let payload = &bytes[range.start as usize..range.end as usize];
    let vmlinux = decompress::decompress(
        Compression::detect(payload).unwrap(),
        payload,
        MAX_DECOMPRESSED_SIZE,
    )
    .unwrap();
    let mem2 = guest_mem(256);
    let layout = elf::inspect(&mem2, &mut Cursor::new(&vmlinux), vmlinux.len() as u64).unwrap();
    assert_eq!(layout.entry, k.entry.0);
    // First PT_LOAD's file offset, from its program header at e_phoff.
    let phoff = u64::from_le_bytes(vmlinux[32..40].try_into().unwrap()) as usize;
    let p_offset = u64::from_le_bytes(vmlinux[phoff + 8..phoff + 16].try_into().unwrap()) as usize;
    let mut code = [0u8; 4096];
    mem.read_slice(&mut code, k.entry).unwrap();
    assert_eq!(&code[..], &vmlinux[p_offset..p_offset + 4096]);
}

#[test]
fn host_kernel_loads_for_guest_decompression_at_pref_address() {
    let Some(path) = host_kernel() else {
        eprintln!("skipped: no /boot/vmlinuz-* on this machine");
        return;
    };
    let bytes = std::fs::read(&path).unwrap();
    let k = load(256, &bytes, &GUEST).unwrap();
    let hdr = k.setup_header.unwrap();
    assert_eq!(k.entry.0, { hdr.pref_address } + 0x200);
    assert_eq!(
        k.kernel_end.0,
        { hdr.pref_address } + u64::from(hdr.init_size)
    );
}
