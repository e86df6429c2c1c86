//! The crate's test doubles, for its unit tests, the fuzz entry points and other crates' tests
//! (built with `cfg(test)` or the `fuzzing` feature, never into a production build):
//! [`RecordingMsiController`], an MSI-X controller that records routes and messages.

use std::io;

use crate::MsiInterruptController;

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
