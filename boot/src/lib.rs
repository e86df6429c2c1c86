//! Loads a Linux kernel, its initramfs and its command line into guest memory.
//!
//! Implements the boot loader's side of two x86 boot protocols, chosen per image
//! ([`LoadedKernel::protocol`]):
//! - the Linux 64-bit boot protocol (`Documentation/arch/x86/boot.rst`, "64-bit Boot Protocol"):
//!   the kernel is entered in 64-bit mode at [`LoadedKernel::entry`] with RSI pointing at a zero
//!   page, which the `arch` crate builds from [`LoadedKernel::setup_header`];
//! - PVH (Xen `docs/misc/pvh.pandoc`), for an ELF `vmlinux` that carries the
//!   `XEN_ELFNOTE_PHYS32_ENTRY` note (Linux with `CONFIG_PVH`): entered in 32-bit protected mode
//!   at the note's address with EBX pointing at `hvm_start_info` (`arch::pvh`). It skips the
//!   64-bit protocol's zero page and page tables, and is what QEMU, Firecracker and Cloud
//!   Hypervisor use for such kernels. [`ProtocolChoice::Linux64`] keeps the 64-bit entry.
//!
//! Two image formats are accepted:
//! - an ELF `vmlinux`, loaded at its physical addresses (`src/elf.rs`), through PVH when it has the
//!   note and the 64-bit protocol otherwise;
//! - a bzImage (`src/bzimage.rs`), either with its compressed payload
//!   decompressed here on the host ([`Decompress::Host`], the default: see
//!   `src/decompress.rs` for why) or loaded whole for the kernel's own
//!   decompressor ([`Decompress::Guest`]); always through the 64-bit protocol, with the setup
//!   header the image carries (its inner vmlinux may have a PVH note, which is only reported).
//!
//! Every byte of an image is untrusted (a fuzz target feeds arbitrary bytes to [`load_kernel`]):
//! lengths and offsets are checked, allocations are bounded and no input panics.

#![warn(missing_docs)]

mod bzimage;
mod cmdline;
mod decompress;
mod elf;
mod initramfs;
mod reader;
#[cfg(test)]
mod testutil;

use std::io::{self, Cursor, Read, Seek, SeekFrom};
use std::time::Instant;

use linux_loader::loader::{BzImage as BzImageLoader, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub use cmdline::load_cmdline;
pub use initramfs::{load_initramfs, Initramfs};
pub use linux_loader::loader::bootparam::setup_header;

use bzimage::{BzImage, ENTRY_64_OFFSET, PROBE_LEN};
use decompress::Compression;
use elf::ELF_MAGIC;
use reader::VolatileReader;

/// The most a payload may decompress to (a distribution vmlinux is about 65 MiB).
pub const MAX_DECOMPRESSED_SIZE: usize = 512 << 20;
/// The largest compressed payload we read into host memory (Debian's is 8 MiB).
const MAX_PAYLOAD_SIZE: u64 = 256 << 20;
/// x86 `COMMAND_LINE_SIZE` (2048) without the NUL: the limit of a kernel with no setup header.
const ELF_CMDLINE_MAX: usize = 2047;
/// Where a kernel without a setup header can take the initramfs from: `ramdisk_image` is 32-bit.
const ELF_INITRD_ADDR_MAX: u64 = 0xffff_ffff;

/// Errors from loading a kernel, initramfs or command line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or seeking the kernel image failed.
    #[error("cannot read the kernel image")]
    ReadKernel(#[source] io::Error),
    /// The image starts with neither the ELF magic nor a bzImage setup header.
    #[error("the kernel image is not a bzImage or ELF vmlinux")]
    NotAKernel,
    /// The bzImage's boot protocol is older than 2.06 (no `cmdline_size`).
    #[error("the bzImage uses boot protocol {major}.{minor:02}; at least 2.06 is required")]
    OldBootProtocol {
        /// Major version.
        major: u8,
        /// Minor version.
        minor: u8,
    },
    /// The bzImage's header is inconsistent; says which field.
    #[error("the bzImage cannot be booted: {0}")]
    InvalidBzImage(&'static str),
    /// The ELF headers are inconsistent; says which.
    #[error("the ELF kernel cannot be booted: {0}")]
    InvalidElf(&'static str),
    /// The `XEN_ELFNOTE_PHYS32_ENTRY` address is not inside a loaded segment.
    #[error("the ELF kernel's PVH entry point {addr:#x} is outside its loaded segments")]
    PvhEntryOutsideKernel {
        /// The note's entry address.
        addr: u64,
    },
    /// A segment would overwrite the boot data below 1 MiB.
    #[error("the kernel has a segment at {addr:#x}, below 1 MiB where the boot data goes")]
    SegmentBelow1M {
        /// The segment's physical address.
        addr: u64,
    },
    /// The kernel does not fit in the guest's RAM.
    #[error(
        "the kernel needs guest RAM from {addr:#x} to {:#x}, which the VM does not have",
        .addr.saturating_add(*.size)
    )]
    KernelOutsideRam {
        /// Where the kernel would start.
        addr: u64,
        /// How many bytes it needs from there.
        size: u64,
    },
    /// The bzImage's compressed payload does not decompress.
    #[error("the {format}-compressed kernel payload is corrupt")]
    CorruptPayload {
        /// The compression (`gzip`, `xz`, ...).
        format: &'static str,
        /// The decompressor's error.
        #[source]
        source: io::Error,
    },
    /// The payload decompresses to more than the limit.
    #[error("the {format}-compressed kernel payload decompresses to more than {limit_mib} MiB (the limit, or the guest's RAM)")]
    PayloadTooLarge {
        /// The compression.
        format: &'static str,
        /// The limit: [`MAX_DECOMPRESSED_SIZE`] or the guest's RAM, in MiB.
        limit_mib: u64,
    },
    /// The decompressed payload is not an ELF vmlinux.
    #[error("the bzImage's decompressed payload is not an ELF vmlinux")]
    PayloadNotElf,
    /// linux-loader refused the image (in-guest decompression).
    #[error("linux-loader could not place the kernel in guest memory")]
    Loader(#[source] linux_loader::loader::Error),
    /// Writing the image to guest memory failed.
    #[error("cannot write to guest memory at {addr:#x}")]
    GuestMemory {
        /// The guest-physical address written.
        addr: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Reading or seeking the initramfs failed.
    #[error("cannot read the initramfs")]
    ReadInitramfs(#[source] io::Error),
    /// The initramfs file has no bytes.
    #[error("the initramfs is empty")]
    EmptyInitramfs,
    /// No page-aligned place between the kernel's end and the limit holds the initramfs.
    #[error("the initramfs ({size_mib} MiB) does not fit below {limit:#x} and above the kernel's end at {kernel_end:#x}")]
    InitramfsTooLarge {
        /// Size of the initramfs, in MiB (rounded up).
        size_mib: u64,
        /// Exclusive end of where it may go: `initrd_addr_max` or the end of low RAM.
        limit: u64,
        /// The kernel's end, the lowest it may start.
        kernel_end: u64,
    },
    /// The command line is longer than the kernel's `cmdline_size`.
    #[error("the kernel command line is {len} bytes long; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// The command line's length without the NUL.
        len: usize,
        /// The kernel's `cmdline_size`.
        max: usize,
    },
    /// The command line has a NUL inside it.
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
}

impl Error {
    /// Whether the user can fix this by choosing another file, more memory or a shorter command
    /// line (the VMM exits with status 2), rather than a host or internal failure.
    pub fn is_user_input(&self) -> bool {
        match self {
            Error::NotAKernel
            | Error::OldBootProtocol { .. }
            | Error::InvalidBzImage(_)
            | Error::InvalidElf(_)
            | Error::PvhEntryOutsideKernel { .. }
            | Error::SegmentBelow1M { .. }
            | Error::KernelOutsideRam { .. }
            | Error::CorruptPayload { .. }
            | Error::PayloadTooLarge { .. }
            | Error::PayloadNotElf
            | Error::EmptyInitramfs
            | Error::InitramfsTooLarge { .. }
            | Error::CmdlineTooLong { .. }
            | Error::CmdlineNul => true,
            Error::ReadKernel(_)
            | Error::Loader(_)
            | Error::GuestMemory { .. }
            | Error::ReadInitramfs(_) => false,
        }
    }
}

/// Result of this crate's functions.
pub type Result<T> = std::result::Result<T, Error>;

/// How the vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// 64-bit entry (`startup_64`), paging on, RSI = zero page (boot.rst "64-bit Boot Protocol").
    Linux64,
    /// 32-bit PVH entry from the Xen ELF note, paging off, EBX = `hvm_start_info`
    /// (Xen `docs/misc/pvh.pandoc`).
    Pvh,
}

impl BootProtocol {
    /// How the VMM's log names the protocol.
    pub fn name(self) -> &'static str {
        match self {
            BootProtocol::Linux64 => "the 64-bit Linux boot protocol",
            BootProtocol::Pvh => "PVH",
        }
    }
}

/// Which boot protocol to use for an ELF vmlinux that offers PVH.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProtocolChoice {
    /// PVH when the ELF has the `XEN_ELFNOTE_PHYS32_ENTRY` note, the 64-bit protocol otherwise
    /// (and always for a bzImage).
    #[default]
    Auto,
    /// The 64-bit protocol even when the ELF offers PVH: to test that entry, or for a kernel whose
    /// PVH path is broken.
    Linux64,
}

/// Who decompresses a bzImage's payload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Decompress {
    /// This process, before the guest starts: seconds instead of minutes under emulation.
    #[default]
    Host,
    /// The kernel's own decompressor, in the guest.
    Guest,
}

/// Choices for [`load_kernel`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOptions {
    /// Who decompresses a bzImage's payload.
    pub decompress: Decompress,
    /// Which protocol an ELF with a PVH note is entered through.
    pub protocol: ProtocolChoice,
}

/// The kind of kernel image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// A bzImage.
    BzImage {
        /// Its payload is (or, from [`identify_kernel`], can be) decompressed on the host; false
        /// when the kernel decompresses itself.
        decompressed_on_host: bool,
    },
    /// An ELF vmlinux.
    Elf,
}

/// A kernel placed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadedKernel {
    /// Where the boot vCPU starts, in the mode [`LoadedKernel::protocol`] says: `startup_64` (or
    /// the bzImage's 64-bit entry) for [`BootProtocol::Linux64`], the PVH note's address for
    /// [`BootProtocol::Pvh`].
    pub entry: GuestAddress,
    /// How the boot vCPU enters the kernel.
    pub protocol: BootProtocol,
    /// The bzImage's setup header, to be copied into the zero page (None for an ELF).
    pub setup_header: Option<setup_header>,
    /// First byte after the loaded kernel image (initramfs goes above this). For in-guest
    /// decompression this covers `init_size`, the room the decompressor works in.
    pub kernel_end: GuestAddress,
    /// What kind of image was loaded.
    pub format: KernelFormat,
    /// The PVH entry point from the vmlinux's Xen ELF note, whether or not it is used.
    pub pvh_entry: Option<GuestAddress>,
}

impl LoadedKernel {
    /// The longest command line this kernel accepts, without the NUL (`cmdline_size`).
    pub fn max_cmdline_len(&self) -> usize {
        match &self.setup_header {
            Some(hdr) => usize::try_from(hdr.cmdline_size).unwrap_or(usize::MAX),
            None => ELF_CMDLINE_MAX,
        }
    }

    /// The highest address the initramfs may occupy, inclusive (`initrd_addr_max`).
    pub fn initrd_addr_max(&self) -> u64 {
        match &self.setup_header {
            Some(hdr) => u64::from(hdr.initrd_addr_max),
            None => ELF_INITRD_ADDR_MAX,
        }
    }
}

/// What the first bytes of an image say it is.
enum Probe {
    Elf { len: u64 },
    BzImage(BzImage),
}

fn probe<R: Read + Seek>(image: &mut R) -> Result<Probe> {
    let len = image.seek(SeekFrom::End(0)).map_err(Error::ReadKernel)?;
    image.rewind().map_err(Error::ReadKernel)?;
    let mut prefix = [0u8; PROBE_LEN];
    let want = usize::try_from(len).map_or(PROBE_LEN, |len| len.min(PROBE_LEN));
    image
        .read_exact(&mut prefix[..want])
        .map_err(Error::ReadKernel)?;
    if prefix[..want].starts_with(&ELF_MAGIC) {
        return Ok(Probe::Elf { len });
    }
    BzImage::parse(&prefix[..want], len)?
        .map(Probe::BzImage)
        .ok_or(Error::NotAKernel)
}

/// The payload's compression, when the host can decompress it.
fn host_compression<R: Read + Seek>(image: &mut R, bz: &BzImage) -> Result<Option<Compression>> {
    let Some(range) = bz.payload_range()? else {
        return Ok(None);
    };
    let mut magic = [0u8; 8];
    let want = (range.end - range.start).min(magic.len() as u64) as usize;
    image
        .seek(SeekFrom::Start(range.start))
        .map_err(Error::ReadKernel)?;
    image
        .read_exact(&mut magic[..want])
        .map_err(Error::ReadKernel)?;
    Ok(Compression::detect(&magic[..want]).filter(|c| c.host_supported()))
}

/// Cheap check used for the "not a kernel" user error before any VM exists.
pub fn identify_kernel(image: &mut (impl Read + Seek)) -> Result<KernelFormat> {
    match probe(image)? {
        Probe::Elf { .. } => Ok(KernelFormat::Elf),
        Probe::BzImage(bz) => Ok(KernelFormat::BzImage {
            decompressed_on_host: host_compression(image, &bz)?.is_some(),
        }),
    }
}

/// Loads a bzImage or ELF vmlinux into guest memory.
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    image: &mut (impl Read + Seek),
    opts: &KernelOptions,
) -> Result<LoadedKernel> {
    let mut image = VolatileReader::new(image);
    match probe(&mut image)? {
        Probe::Elf { len } => {
            let elf = elf::load(mem, &mut image, len)?;
            log::info!(
                "ELF kernel: entry {:#x}, PVH entry {}, ends at {:#x}",
                elf.entry,
                elf.pvh_entry
                    .map_or("none".to_string(), |a| format!("{:#x}", a.0)),
                elf.end
            );
            let (protocol, entry) = match (opts.protocol, elf.pvh_entry) {
                (ProtocolChoice::Auto, Some(pvh)) => (BootProtocol::Pvh, pvh),
                _ => (BootProtocol::Linux64, GuestAddress(elf.entry)),
            };
            Ok(LoadedKernel {
                entry,
                protocol,
                setup_header: None,
                kernel_end: GuestAddress(elf.end),
                format: KernelFormat::Elf,
                pvh_entry: elf.pvh_entry,
            })
        }
        Probe::BzImage(bz) => match opts.decompress {
            Decompress::Host => load_bzimage_on_host(mem, &mut image, &bz),
            Decompress::Guest => load_bzimage_for_guest(mem, &mut image, &bz),
        },
    }
}

/// Total guest RAM, the bound on what a payload may decompress to.
fn guest_ram_size<M: GuestMemoryBackend>(mem: &M) -> u64 {
    mem.iter().fold(0u64, |sum, r| sum.saturating_add(r.len()))
}

/// Decompresses the payload here and loads the vmlinux inside it at its physical addresses.
/// Falls back to in-guest decompression when the payload's format is unknown to the host.
fn load_bzimage_on_host<M, R>(
    mem: &M,
    image: &mut VolatileReader<'_, R>,
    bz: &BzImage,
) -> Result<LoadedKernel>
where
    M: GuestMemoryBackend,
    R: Read + Seek,
{
    let compression = host_compression(image, bz)?;
    let (Some(compression), Some(range)) = (compression, bz.payload_range()?) else {
        log::warn!(
            "the host cannot decompress this bzImage's payload (boot protocol {:#x}); the kernel will decompress itself, which is slow under emulation",
            bz.version()
        );
        return load_bzimage_for_guest(mem, image, bz);
    };
    let payload_len = range.end - range.start;
    if payload_len > MAX_PAYLOAD_SIZE {
        return Err(Error::InvalidBzImage(
            "its compressed payload is larger than 256 MiB",
        ));
    }
    let mut payload = vec![0u8; payload_len as usize];
    image
        .seek(SeekFrom::Start(range.start))
        .map_err(Error::ReadKernel)?;
    image.read_exact(&mut payload).map_err(Error::ReadKernel)?;

    let limit = usize::try_from(guest_ram_size(mem))
        .unwrap_or(usize::MAX)
        .min(MAX_DECOMPRESSED_SIZE);
    let started = Instant::now();
    let vmlinux = decompress::decompress(compression, &payload, limit)?;
    log::info!(
        "decompressed the {} kernel payload on the host: {} -> {} bytes in {:?}",
        compression.name(),
        payload.len(),
        vmlinux.len(),
        started.elapsed()
    );
    drop(payload);
    if !vmlinux.starts_with(&ELF_MAGIC) {
        return Err(Error::PayloadNotElf);
    }
    let elf = elf::load(mem, &mut Cursor::new(&vmlinux[..]), vmlinux.len() as u64)?;
    log::info!(
        "bzImage kernel (host-decompressed): entry {:#x}, ends at {:#x}",
        elf.entry,
        elf.end
    );
    Ok(LoadedKernel {
        entry: GuestAddress(elf.entry),
        protocol: BootProtocol::Linux64,
        setup_header: Some(bz.header),
        kernel_end: GuestAddress(elf.end),
        format: KernelFormat::BzImage {
            decompressed_on_host: true,
        },
        pvh_entry: elf.pvh_entry,
    })
}

/// Loads the protected-mode part whole, for the kernel's own decompressor, entered at its
/// 64-bit entry 0x200 past the load address.
fn load_bzimage_for_guest<M, R>(
    mem: &M,
    image: &mut VolatileReader<'_, R>,
    bz: &BzImage,
) -> Result<LoadedKernel>
where
    M: GuestMemoryBackend,
    R: Read + Seek,
{
    let addr = bz.guest_load_address()?;
    // The decompressor works in place, in up to init_size bytes from the load address.
    let need = bz.protected_mode_len().max(bz.init_size());
    let end = addr.checked_add(need);
    let fits = end.is_some()
        && usize::try_from(need).is_ok_and(|n| mem.check_range(GuestAddress(addr), n));
    let (true, Some(end)) = (fits, end) else {
        return Err(Error::KernelOutsideRam { addr, size: need });
    };
    let result =
        BzImageLoader::load(mem, Some(GuestAddress(addr)), image, None).map_err(Error::Loader)?;
    log::info!(
        "bzImage kernel (decompresses itself): loaded at {addr:#x}, entry {:#x}, needs up to {end:#x}",
        addr + ENTRY_64_OFFSET
    );
    Ok(LoadedKernel {
        entry: GuestAddress(addr + ENTRY_64_OFFSET),
        protocol: BootProtocol::Linux64,
        // linux-loader's copy has code32_start set to where the kernel now is.
        setup_header: result.setup_header.or(Some(bz.header)),
        kernel_end: GuestAddress(end),
        format: KernelFormat::BzImage {
            decompressed_on_host: false,
        },
        pvh_entry: None,
    })
}

#[cfg(test)]
mod tests;
