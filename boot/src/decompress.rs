//! Host-side decompression of a bzImage's payload.
//!
//! The payload is `vmlinux.bin` (the stripped ELF vmlinux, followed by its relocation table when
//! the kernel is relocatable) compressed as `arch/x86/boot/compressed/Makefile` chose, with its
//! decompressed size appended as 4 little-endian bytes (`size_append` in `scripts/Makefile.lib`;
//! for gzip the gzip trailer's ISIZE plays that role). The magics are those of the kernel's own
//! table in `lib/decompress.c`.
//!
//! Why here and not in the guest: on our hosts the guest kernel's early code runs under an
//! instruction emulator about 2,500 times slower than native, so the kernel's own decompressor
//! would take minutes where the host takes about a second.
//!
//! Crates: xz and lzma use `liblzma` (the reference implementation; the kernel's xz payload uses
//! the x86 BCJ filter, which most pure-Rust decoders lack); gzip `flate2` on its Rust backend;
//! zstd `ruzstd`; lz4 `lz4_flex`'s block decoder under the legacy frame parsed here; bzip2 the
//! `bzip2` crate on its Rust port. LZO has no well-kept decoder and falls back to the guest.
//! Every decoder is bounded: output by the caller's limit, working memory by a memory limit.

use std::io::{self, Read};

use crate::{Error, Result};

/// Memory liblzma may use; the kernel's xz dictionary is 32 MiB and `lzma -9` uses 64 MiB.
const LZMA_MEMLIMIT: u64 = 256 << 20;
/// The zstd window we accept; the kernel's `zstd -22 --ultra` uses 128 MiB at most.
const ZSTD_MAX_WINDOW: u64 = 128 << 20;
/// The legacy LZ4 frame cuts its input into blocks of at most this many bytes.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// The legacy LZ4 frame's magic, which may also start a concatenated frame.
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;

/// The compressions a bzImage payload can use, told apart by their magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Compression {
    Gzip,
    Bzip2,
    Lzma,
    Xz,
    Lzo,
    Lz4,
    Zstd,
}

impl Compression {
    /// Recognises a payload by its first bytes (`compressed_formats` in `lib/decompress.c`).
    pub(crate) fn detect(payload: &[u8]) -> Option<Compression> {
        const MAGICS: [(&[u8], Compression); 8] = [
            (&[0x1f, 0x8b], Compression::Gzip),
            (&[0x1f, 0x9e], Compression::Gzip),
            (b"BZh", Compression::Bzip2),
            (&[0x5d, 0x00, 0x00], Compression::Lzma),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], Compression::Xz),
            (&[0x89, b'L', b'Z', b'O'], Compression::Lzo),
            (&[0x02, 0x21, 0x4c, 0x18], Compression::Lz4),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
        ];
        MAGICS
            .iter()
            .find(|(magic, _)| payload.starts_with(magic))
            .map(|&(_, c)| c)
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Bzip2 => "bzip2",
            Compression::Lzma => "lzma",
            Compression::Xz => "xz",
            Compression::Lzo => "lzo",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }

    /// Whether this host can decompress the format.
    pub(crate) fn host_supported(self) -> bool {
        self != Compression::Lzo
    }
}

/// The decompressed size the kernel build appended to the payload, used only to size the output
/// buffer up front (it is untrusted, so the caller's limit caps it).
fn size_hint(payload: &[u8]) -> usize {
    payload
        .len()
        .checked_sub(4)
        .and_then(|at| payload.get(at..))
        .and_then(|tail| <[u8; 4]>::try_from(tail).ok())
        .map_or(0, |b| u32::from_le_bytes(b) as usize)
}

/// Decompresses `payload` (in format `c`) into at most `limit` bytes.
pub(crate) fn decompress(c: Compression, payload: &[u8], limit: usize) -> Result<Vec<u8>> {
    let corrupt = |source: io::Error| Error::CorruptPayload {
        format: c.name(),
        source,
    };
    let hint = size_hint(payload).min(limit);
    let out = match c {
        Compression::Gzip => read_limited(flate2::read::GzDecoder::new(payload), limit, hint),
        Compression::Bzip2 => read_limited(bzip2::read::BzDecoder::new(payload), limit, hint),
        Compression::Xz => {
            let stream = liblzma::stream::Stream::new_stream_decoder(LZMA_MEMLIMIT, 0)
                .map_err(|e| corrupt(e.into()))?;
            read_limited(
                liblzma::read::XzDecoder::new_stream(payload, stream),
                limit,
                hint,
            )
        }
        Compression::Lzma => {
            let stream = liblzma::stream::Stream::new_lzma_decoder(LZMA_MEMLIMIT)
                .map_err(|e| corrupt(e.into()))?;
            read_limited(
                liblzma::read::XzDecoder::new_stream(payload, stream),
                limit,
                hint,
            )
        }
        Compression::Zstd => {
            let decoder = ruzstd::decoding::StreamingDecoder::new_with_max_window_size(
                payload,
                ZSTD_MAX_WINDOW,
            )
            .map_err(|e| corrupt(io::Error::new(io::ErrorKind::InvalidData, e)))?;
            read_limited(decoder, limit, hint)
        }
        Compression::Lz4 => lz4_legacy(payload, limit, hint),
        Compression::Lzo => Err(Outcome::Corrupt(io::Error::new(
            io::ErrorKind::Unsupported,
            "no LZO decoder on the host",
        ))),
    };
    match out {
        Ok(out) => Ok(out),
        Err(Outcome::Corrupt(e)) => Err(corrupt(e)),
        Err(Outcome::TooLarge) => Err(Error::PayloadTooLarge {
            format: c.name(),
            limit_mib: (limit >> 20) as u64,
        }),
    }
}

/// Why a decoder stopped early.
enum Outcome {
    Corrupt(io::Error),
    TooLarge,
}

/// Reads a decoder to its end, failing once it produces more than `limit` bytes.
fn read_limited(
    reader: impl Read,
    limit: usize,
    hint: usize,
) -> std::result::Result<Vec<u8>, Outcome> {
    let mut out = Vec::with_capacity(hint);
    let cap = (limit as u64).saturating_add(1);
    reader
        .take(cap)
        .read_to_end(&mut out)
        .map_err(Outcome::Corrupt)?;
    if out.len() > limit {
        return Err(Outcome::TooLarge);
    }
    Ok(out)
}

/// Decodes the legacy LZ4 frame that `lz4 -l` writes and the kernel's `lib/decompress_unlz4.c`
/// reads: the magic, then blocks each led by their 4-byte compressed length, each decoding to at
/// most 8 MiB. The kernel's 4-byte size trailer is too short to be a block and ends the loop.
fn lz4_legacy(payload: &[u8], limit: usize, hint: usize) -> std::result::Result<Vec<u8>, Outcome> {
    let bad = |what: &str| Outcome::Corrupt(io::Error::new(io::ErrorKind::InvalidData, what));
    let mut rest = payload.get(4..).ok_or_else(|| bad("truncated LZ4 magic"))?;
    let mut out = Vec::with_capacity(hint);
    // Zeroed allocations come straight from the OS, so this costs no memset; the decoder
    // touches only the bytes it writes.
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    while rest.len() > 4 {
        let (len_bytes, tail) = rest.split_at(4);
        let mut word = [0u8; 4];
        word.copy_from_slice(len_bytes);
        let chunk_len = u32::from_le_bytes(word);
        if chunk_len == LZ4_LEGACY_MAGIC {
            rest = tail;
            continue;
        }
        let chunk_len = chunk_len as usize;
        let Some(chunk) = tail.get(..chunk_len) else {
            return Err(bad("an LZ4 block runs past the end of the payload"));
        };
        let n = lz4_flex::block::decompress_into(chunk, &mut block)
            .map_err(|e| Outcome::Corrupt(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        if out.len().saturating_add(n) > limit {
            return Err(Outcome::TooLarge);
        }
        out.extend_from_slice(&block[..n]);
        rest = &tail[chunk_len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::compress;

    /// Something compressible but not trivially so.
    fn sample() -> Vec<u8> {
        (0..200_000u32)
            .flat_map(|i| (i / 7).to_le_bytes())
            .collect()
    }

    #[test]
    fn detects_every_kernel_magic() {
        assert_eq!(
            Compression::detect(&[0x1f, 0x8b, 8]),
            Some(Compression::Gzip)
        );
        assert_eq!(Compression::detect(b"BZh91AY"), Some(Compression::Bzip2));
        assert_eq!(
            Compression::detect(&[0x5d, 0, 0, 0x80, 0]),
            Some(Compression::Lzma)
        );
        assert_eq!(
            Compression::detect(&[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0, 0, 1]),
            Some(Compression::Xz)
        );
        assert_eq!(Compression::detect(b"\x89LZO\0"), Some(Compression::Lzo));
        assert_eq!(
            Compression::detect(&[0x02, 0x21, 0x4c, 0x18]),
            Some(Compression::Lz4)
        );
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd]),
            Some(Compression::Zstd)
        );
        assert_eq!(Compression::detect(b"\x7fELF"), None);
        assert_eq!(Compression::detect(&[]), None);
    }

    #[test]
    fn round_trips_every_supported_format_with_the_size_trailer() {
        let data = sample();
        for c in [
            Compression::Gzip,
            Compression::Bzip2,
            Compression::Lzma,
            Compression::Xz,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let payload = compress(c, &data);
            assert_eq!(Compression::detect(&payload), Some(c));
            let out =
                decompress(c, &payload, 64 << 20).unwrap_or_else(|e| panic!("{}: {e}", c.name()));
            assert!(out == data, "{} round trip differs", c.name());
        }
    }

    #[test]
    fn output_over_the_limit_is_refused() {
        let data = sample();
        for c in [
            Compression::Gzip,
            Compression::Xz,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let payload = compress(c, &data);
            let err = decompress(c, &payload, data.len() - 1).unwrap_err();
            assert!(
                matches!(err, Error::PayloadTooLarge { .. }),
                "{}: {err}",
                c.name()
            );
            // Exactly the limit is fine.
            assert_eq!(
                decompress(c, &payload, data.len()).unwrap().len(),
                data.len()
            );
        }
    }

    #[test]
    fn corrupt_payloads_are_errors() {
        let data = sample();
        for c in [
            Compression::Gzip,
            Compression::Bzip2,
            Compression::Lzma,
            Compression::Xz,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let mut payload = compress(c, &data);
            // Damage the middle of the compressed stream.
            let mid = payload.len() / 2;
            for b in &mut payload[mid..mid + 16] {
                *b ^= 0x5a;
            }
            match decompress(c, &payload, 64 << 20) {
                Err(Error::CorruptPayload { format, .. }) => assert_eq!(format, c.name()),
                Ok(out) => assert!(out != data, "{}: damage went unnoticed", c.name()),
                Err(e) => panic!("{}: unexpected {e}", c.name()),
            }
            // Truncation too.
            let cut = &payload[..payload.len() / 3];
            assert!(decompress(c, cut, 64 << 20).is_err(), "{}", c.name());
        }
    }

    #[test]
    fn lz4_block_longer_than_the_payload_is_an_error() {
        let mut payload = vec![0x02, 0x21, 0x4c, 0x18];
        payload.extend_from_slice(&1000u32.to_le_bytes());
        payload.extend_from_slice(&[0; 10]);
        assert!(matches!(
            decompress(Compression::Lz4, &payload, 1 << 20),
            Err(Error::CorruptPayload { .. })
        ));
    }

    #[test]
    fn size_hint_reads_the_trailer() {
        assert_eq!(size_hint(&[9, 9, 0x10, 0x20, 0, 0]), 0x2010);
        assert_eq!(size_hint(&[1, 2]), 0);
    }
}
