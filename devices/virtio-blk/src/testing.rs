//! The crate's test double, for its unit tests, the fuzz entry points, the example and other
//! crates' tests (built with `cfg(test)` or the `fuzzing` feature, never into a production
//! build): [`MemDisk`], a virtio-blk backend held in memory.

use std::io;

use crate::DiskBackend;

/// A disk held in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemDisk(pub Vec<u8>);

impl MemDisk {
    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start.checked_add(len).ok_or(io::ErrorKind::UnexpectedEof)?;
        if end > self.0.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(start..end)
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let range = self.range(offset, len)?;
        self.0[range].fill(0);
        Ok(())
    }
}

impl DiskBackend for MemDisk {
    fn size(&mut self) -> io::Result<u64> {
        Ok(self.0.len() as u64)
    }

    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let range = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.0[range]);
        Ok(())
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let range = self.range(offset, buf.len())?;
        self.0[range].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len)
    }

    fn zero_range(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len)
    }
}
