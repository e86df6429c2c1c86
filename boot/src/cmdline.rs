//! Writing the kernel command line.
//!
//! Linux `Documentation/arch/x86/boot.rst`, `cmd_line_ptr` and `cmdline_size`: a NUL-terminated
//! string anywhere below 4 GiB; `cmdline_size` is its maximum length without the NUL.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::{Error, Result};

/// Writes `cmdline` and its terminating NUL at `addr`.
///
/// `max_len` is the longest command line accepted, not counting the NUL (as `cmdline_size` in
/// the setup header; see [`crate::LoadedKernel::max_cmdline_len`]).
pub fn load_cmdline<M: GuestMemoryBackend>(
    mem: &M,
    addr: GuestAddress,
    cmdline: &str,
    max_len: usize,
) -> Result<()> {
    let bytes = cmdline.as_bytes();
    if bytes.len() > max_len {
        return Err(Error::CmdlineTooLong {
            len: bytes.len(),
            max: max_len,
        });
    }
    if bytes.contains(&0) {
        return Err(Error::CmdlineNul);
    }
    let mut with_nul = Vec::with_capacity(bytes.len() + 1);
    with_nul.extend_from_slice(bytes);
    with_nul.push(0);
    mem.write_slice(&with_nul, addr)
        .map_err(|source| Error::GuestMemory {
            addr: addr.0,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::guest_mem;

    #[test]
    fn writes_the_string_and_a_nul() {
        let mem = guest_mem(1);
        mem.write_slice(&[0xff; 32], GuestAddress(0x2_0000))
            .unwrap();
        load_cmdline(&mem, GuestAddress(0x2_0000), "console=ttyS0", 2047).unwrap();
        let mut back = [0u8; 15];
        mem.read_slice(&mut back, GuestAddress(0x2_0000)).unwrap();
        assert_eq!(&back, b"console=ttyS0\0\xff");
    }

    #[test]
    fn max_len_excludes_the_nul() {
        let mem = guest_mem(1);
        assert!(load_cmdline(&mem, GuestAddress(0x2_0000), "abcd", 4).is_ok());
        let err = load_cmdline(&mem, GuestAddress(0x2_0000), "abcde", 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the kernel command line is 5 bytes long; this kernel accepts at most 4"
        );
    }

    #[test]
    fn embedded_nul_is_refused() {
        let mem = guest_mem(1);
        assert!(matches!(
            load_cmdline(&mem, GuestAddress(0x2_0000), "a\0b", 100),
            Err(Error::CmdlineNul)
        ));
    }

    #[test]
    fn outside_guest_memory_is_an_error() {
        let mem = guest_mem(1);
        // The NUL would land one byte past the end of RAM.
        let end = GuestAddress((1 << 20) - 3);
        assert!(matches!(
            load_cmdline(&mem, end, "abc", 100),
            Err(Error::GuestMemory { .. })
        ));
        assert!(load_cmdline(&mem, end, "ab", 100).is_ok());
    }
}
