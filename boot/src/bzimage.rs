//! The bzImage setup header: parsing and the checks a 64-bit boot loader must make.
//!
//! Linux `Documentation/arch/x86/boot.rst`: "The Real-Mode Kernel Header" (field offsets and the
//! protocol version each field appeared in), "Loading The Rest of The Kernel" (the protected-mode
//! part starts at `(setup_sects + 1) * 512`, with 0 meaning 4) and "64-bit Boot Protocol" (the
//! 64-bit entry is 0x200 past the load address). The payload fields follow
//! `arch/x86/boot/compressed/mkpiggy.c`: `payload_offset` is relative to the start of the
//! protected-mode part and the payload's last 4 bytes hold its decompressed size.

use std::ops::Range;

use linux_loader::loader::bootparam::setup_header;
use vm_memory::ByteValued;

use crate::{Error, Result};

/// Offset of the setup header in the image (boot.rst, "The Real-Mode Kernel Header").
pub(crate) const HEADER_OFFSET: usize = 0x1f1;
/// How many bytes of the image `parse` needs to see: through the end of the 2.15 header.
pub(crate) const PROBE_LEN: usize = HEADER_OFFSET + std::mem::size_of::<setup_header>();

/// "HdrS" at 0x202.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// The boot sector signature at 0x1fe.
const BOOT_FLAG: u16 = 0xaa55;
/// `cmdline_size` appeared in 2.06; older kernels are not worth the special cases.
const MIN_VERSION: u16 = 0x0206;
/// `payload_offset` / `payload_length` appeared in 2.08.
const PAYLOAD_VERSION: u16 = 0x0208;
/// `pref_address` / `init_size` appeared in 2.10.
const PREF_ADDRESS_VERSION: u16 = 0x020a;
/// `xloadflags` appeared in 2.12.
const XLOADFLAGS_VERSION: u16 = 0x020c;
/// loadflags bit 0: the protected-mode code is loaded at 0x100000 (a bzImage, not a zImage).
const LOADED_HIGH: u8 = 0x01;
/// xloadflags bit 0: the kernel has the legacy 64-bit entry point at 0x200.
const XLF_KERNEL_64: u16 = 0x01;
/// Where boot.rst says the protected-mode kernel goes when nothing better is known.
pub(crate) const DEFAULT_LOAD_ADDR: u64 = 0x10_0000;
/// Offset of the 64-bit entry (`startup_64` of the compressed kernel) from the load address.
pub(crate) const ENTRY_64_OFFSET: u64 = 0x200;

/// A parsed and checked bzImage header.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BzImage {
    pub header: setup_header,
    /// Offset of the protected-mode part in the image.
    pub setup_size: u64,
    /// Length of the whole image file.
    pub image_len: u64,
}

impl BzImage {
    /// Parses the first `PROBE_LEN` bytes of an image of `image_len` bytes.
    ///
    /// Returns `Ok(None)` when the bytes carry no bzImage signature at all, and an error when
    /// they do but the kernel cannot be booted by a 64-bit loader.
    pub(crate) fn parse(prefix: &[u8], image_len: u64) -> Result<Option<BzImage>> {
        let Some(raw) = prefix.get(HEADER_OFFSET..PROBE_LEN) else {
            return Ok(None);
        };
        let mut header = setup_header::default();
        header.as_mut_slice().copy_from_slice(raw);
        if header.header != HDRS_MAGIC || header.boot_flag != BOOT_FLAG {
            return Ok(None);
        }

        let version = header.version;
        if version < MIN_VERSION {
            return Err(Error::OldBootProtocol {
                major: (version >> 8) as u8,
                minor: (version & 0xff) as u8,
            });
        }
        if header.loadflags & LOADED_HIGH == 0 {
            return Err(Error::InvalidBzImage(
                "it is a zImage, which loads below 1 MiB",
            ));
        }
        if version >= XLOADFLAGS_VERSION && header.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(Error::InvalidBzImage(
                "it is a 32-bit kernel (no 64-bit entry point)",
            ));
        }

        let sects = match header.setup_sects {
            0 => 4,
            n => u64::from(n),
        };
        // At most 256 sectors, so no overflow.
        let setup_size = (sects + 1) * 512;
        if setup_size >= image_len {
            return Err(Error::InvalidBzImage(
                "the image ends inside its real-mode setup code",
            ));
        }
        Ok(Some(BzImage {
            header,
            setup_size,
            image_len,
        }))
    }

    pub(crate) fn version(&self) -> u16 {
        self.header.version
    }

    /// Length of the protected-mode part (everything after the setup code).
    pub(crate) fn protected_mode_len(&self) -> u64 {
        // `parse` checked setup_size < image_len.
        self.image_len - self.setup_size
    }

    /// Where the compressed payload lies in the image, when the header says (protocol >= 2.08).
    pub(crate) fn payload_range(&self) -> Result<Option<Range<u64>>> {
        if self.version() < PAYLOAD_VERSION || self.header.payload_length == 0 {
            return Ok(None);
        }
        let start = self
            .setup_size
            .checked_add(u64::from(self.header.payload_offset));
        let end = start.and_then(|s| s.checked_add(u64::from(self.header.payload_length)));
        match (start, end) {
            (Some(start), Some(end)) if end <= self.image_len => Ok(Some(start..end)),
            _ => Err(Error::InvalidBzImage(
                "its compressed payload lies past the end of the image",
            )),
        }
    }

    /// Memory the kernel's own decompressor needs from the load address (protocol >= 2.10).
    pub(crate) fn init_size(&self) -> u64 {
        if self.version() >= PREF_ADDRESS_VERSION {
            u64::from(self.header.init_size)
        } else {
            0
        }
    }

    fn is_relocatable(&self) -> bool {
        self.header.relocatable_kernel != 0
    }

    /// The load address for in-guest decompression: `pref_address` when the header has one,
    /// else 1 MiB, aligned up to `kernel_alignment` when the kernel is relocatable.
    ///
    /// Loading at `pref_address` (CONFIG_PHYSICAL_START, 16 MiB on distribution kernels) lets the
    /// decompressor run in place instead of first moving itself there.
    pub(crate) fn guest_load_address(&self) -> Result<u64> {
        let pref = self.header.pref_address;
        let mut addr = if self.version() >= PREF_ADDRESS_VERSION && pref != 0 {
            pref
        } else {
            DEFAULT_LOAD_ADDR
        };
        let align = u64::from(self.header.kernel_alignment);
        if self.is_relocatable() && align.is_power_of_two() {
            addr = addr
                .checked_next_multiple_of(align)
                .ok_or(Error::InvalidBzImage("its load address overflows"))?;
        }
        if addr < DEFAULT_LOAD_ADDR {
            return Err(Error::InvalidBzImage(
                "it asks to be loaded below 1 MiB, where the boot data goes",
            ));
        }
        Ok(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{bzimage, BzOpts};

    fn parse(image: &[u8]) -> Result<Option<BzImage>> {
        BzImage::parse(&image[..PROBE_LEN.min(image.len())], image.len() as u64)
    }

    #[test]
    fn header_offsets_match_the_boot_protocol() {
        // The struct must span 0x1f1..0x26c: the 2.15 header ends with kernel_info_offset at 0x268.
        assert_eq!(PROBE_LEN, 0x26c);
    }

    #[test]
    fn parses_a_header_and_locates_the_payload() {
        let image = bzimage(b"PAYLOAD!", &BzOpts::default());
        let bz = parse(&image).unwrap().unwrap();
        assert_eq!(bz.setup_size, 5 * 512); // setup_sects = 4
        assert_eq!(bz.version(), 0x020f);
        let range = bz.payload_range().unwrap().unwrap();
        assert_eq!(
            &image[range.start as usize..range.end as usize],
            b"PAYLOAD!"
        );
    }

    #[test]
    fn setup_sects_zero_means_four() {
        let image = bzimage(
            b"P",
            &BzOpts {
                setup_sects: 0,
                ..BzOpts::default()
            },
        );
        assert_eq!(parse(&image).unwrap().unwrap().setup_size, 5 * 512);
    }

    #[test]
    fn random_bytes_are_not_a_bzimage() {
        assert!(parse(&[0x55; 0x400]).unwrap().is_none());
        assert!(parse(&[0; 16]).unwrap().is_none());
    }

    #[test]
    fn old_protocol_is_refused_with_its_version() {
        let image = bzimage(
            b"P",
            &BzOpts {
                version: 0x0205,
                ..BzOpts::default()
            },
        );
        let err = parse(&image).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the bzImage uses boot protocol 2.05; at least 2.06 is required"
        );
    }

    #[test]
    fn a_32_bit_kernel_is_refused() {
        let image = bzimage(
            b"P",
            &BzOpts {
                xloadflags: 0,
                ..BzOpts::default()
            },
        );
        assert!(matches!(parse(&image), Err(Error::InvalidBzImage(_))));
    }

    #[test]
    fn payload_past_the_end_is_refused() {
        let mut image = bzimage(b"PAYLOAD!", &BzOpts::default());
        // payload_length at 0x24c: claim far more than the image holds.
        image[0x24c..0x250].copy_from_slice(&0x1000_0000u32.to_le_bytes());
        let bz = parse(&image).unwrap().unwrap();
        assert!(matches!(bz.payload_range(), Err(Error::InvalidBzImage(_))));
    }

    #[test]
    fn load_address_is_pref_address_aligned_up_to_kernel_alignment() {
        let image = bzimage(
            b"P",
            &BzOpts {
                pref_address: 0x110_0000,
                kernel_alignment: 0x20_0000,
                ..BzOpts::default()
            },
        );
        let bz = parse(&image).unwrap().unwrap();
        assert_eq!(bz.guest_load_address().unwrap(), 0x120_0000);
    }

    #[test]
    fn non_relocatable_kernel_loads_exactly_at_pref_address() {
        let image = bzimage(
            b"P",
            &BzOpts {
                pref_address: 0x110_0000,
                relocatable: false,
                ..BzOpts::default()
            },
        );
        let bz = parse(&image).unwrap().unwrap();
        assert_eq!(bz.guest_load_address().unwrap(), 0x110_0000);
    }

    #[test]
    fn load_address_below_1_mib_is_refused() {
        let image = bzimage(
            b"P",
            &BzOpts {
                pref_address: 0x8_0000,
                relocatable: false,
                ..BzOpts::default()
            },
        );
        let bz = parse(&image).unwrap().unwrap();
        assert!(bz.guest_load_address().is_err());
    }
}
