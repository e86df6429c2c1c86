//! The crate's test doubles, for its unit tests, the fuzz entry points and other crates' tests
//! (built with `cfg(test)` or the `fuzzing` feature, never into a production build):
//!
//! - [`MemDisk`]: a virtio-blk backend held in memory;
//! - [`RecordingMsiController`]: an MSI-X controller that records routes and messages.

use std::io;

use crate::pci::MsiInterruptController;
use crate::virtio::block::DiskBackend;

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

/// An MSI-X controller that records what it was asked to do.
#[derive(Debug, Default)]
pub struct RecordingMsiController {
    /// Every `update_route` call: (vector, addr, data, masked).
    pub routes: std::sync::Mutex<Vec<(u16, u64, u32, bool)>>,
    /// Every triggered vector, in order.
    pub triggered: std::sync::Mutex<Vec<u16>>,
}

impl MsiInterruptController for RecordingMsiController {
    fn update_route(&self, vector: u16, addr: u64, data: u32, masked: bool) -> io::Result<()> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded, so a long fuzz run does not grow without limit.
        if routes.len() >= 4096 {
            routes.clear();
        }
        routes.push((vector, addr, data, masked));
        Ok(())
    }

    fn trigger(&self, vector: u16) -> io::Result<()> {
        let mut triggered = self.triggered.lock().unwrap_or_else(|e| e.into_inner());
        if triggered.len() >= 4096 {
            triggered.clear();
        }
        triggered.push(vector);
        Ok(())
    }
}
