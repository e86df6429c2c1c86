//! An adapter that lets linux-loader read from any `Read + Seek`.
//!
//! linux-loader's loaders want `ReadVolatile` (vm-memory's volatile-safe `Read`), which only files,
//! sockets, byte slices and cursors implement. Our public API takes any `Read + Seek`, so this
//! wrapper bounces reads through a small heap buffer into the volatile guest slice.

use std::io::{self, Read, Seek, SeekFrom};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

/// Size of the bounce buffer: large enough that copying a 60 MiB kernel is not syscall-bound.
const BOUNCE_SIZE: usize = 256 * 1024;

/// Wraps a `Read + Seek` so that it is also `ReadVolatile`.
pub(crate) struct VolatileReader<'a, R> {
    inner: &'a mut R,
    bounce: Vec<u8>,
}

impl<'a, R> VolatileReader<'a, R> {
    pub(crate) fn new(inner: &'a mut R) -> Self {
        VolatileReader {
            inner,
            bounce: Vec::new(),
        }
    }
}

impl<R: Read> Read for VolatileReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<R: Seek> Seek for VolatileReader<'_, R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

impl<R: Read> ReadVolatile for VolatileReader<'_, R> {
    /// Fills as much of `buf` as the source has: vm-memory's `read_exact_volatile_from` calls
    /// this once per guest memory region and treats a short read as failure.
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        if self.bounce.is_empty() {
            self.bounce = vec![0; BOUNCE_SIZE];
        }
        let mut done = 0;
        while done < buf.len() {
            let want = (buf.len() - done).min(self.bounce.len());
            let n = match self.inner.read(&mut self.bounce[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(VolatileMemoryError::IOError(e)),
            };
            // `n <= want <= buf.len() - done`, so the chunk lands whole inside `buf`.
            buf.offset(done)?.copy_from(&self.bounce[..n]);
            done += n;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[test]
    fn copies_a_reader_into_guest_memory_across_bounce_chunks() {
        // Arrange: more data than one bounce buffer, with a pattern that shows misplaced chunks.
        let data: Vec<u8> = (0..BOUNCE_SIZE + 1000).map(|i| (i % 251) as u8).collect();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut src = Cursor::new(data.clone());
        let mut reader = VolatileReader::new(&mut src);

        // Act
        mem.read_exact_volatile_from(GuestAddress(0x1000), &mut reader, data.len())
            .unwrap();

        // Assert
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn short_source_is_an_error_not_a_panic() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut src = Cursor::new(vec![1u8; 10]);
        let mut reader = VolatileReader::new(&mut src);
        assert!(mem
            .read_exact_volatile_from(GuestAddress(0), &mut reader, 11)
            .is_err());
    }
}
