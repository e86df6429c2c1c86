//! The POST diagnostic port, 0x80.
//!
//! Firmware writes progress ("POST") codes here, Linux writes it as an I/O delay, and a guest
//! patched for benchmarking writes markers (as Cloud Hypervisor measures kernel-start to
//! userspace with it). The device remembers the last code, which reads back, and when each
//! code value was first written relative to a start instant, so a benchmark can see when the
//! guest reached a marker.

use std::time::{Duration, Instant};

use bus::BusDevice;

/// Port 0x80: logs and timestamps the codes the guest writes.
#[derive(Debug)]
pub struct DebugPort {
    start: Instant,
    last: Option<u8>,
    first_write: [Option<Duration>; 256],
    writes: u64,
}

impl DebugPort {
    /// The port's address.
    pub const PORT_BASE: u64 = 0x80;
    /// Number of ports.
    pub const PORT_LEN: u64 = 1;

    /// A port whose timestamps count from `start` (typically the VMM's own start).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            last: None,
            first_write: [None; 256],
            writes: 0,
        }
    }

    /// The last code written, if any.
    pub fn last(&self) -> Option<u8> {
        self.last
    }

    /// When `code` was first written, since the start instant.
    pub fn first_write(&self, code: u8) -> Option<Duration> {
        self.first_write[usize::from(code)]
    }

    /// Every code written so far with the time of its first write, earliest first.
    pub fn markers(&self) -> Vec<(u8, Duration)> {
        let mut markers: Vec<(u8, Duration)> = (0..=u8::MAX)
            .filter_map(|code| Some((code, self.first_write(code)?)))
            .collect();
        markers.sort_by_key(|&(code, at)| (at, code));
        markers
    }

    /// Number of writes so far.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    fn record(&mut self, code: u8, at: Instant) {
        let since_start = at.saturating_duration_since(self.start);
        log::trace!("debug port: {code:#04x} at {since_start:?}");
        self.last = Some(code);
        self.writes = self.writes.saturating_add(1);
        self.first_write[usize::from(code)].get_or_insert(since_start);
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        match data {
            [byte] => *byte = self.last.unwrap_or(0xff),
            _ => data.fill(0xff),
        }
    }

    /// Records the low byte of a write of any width, so a marker written with `outw` is not
    /// lost.
    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&code) = data.first() {
            self.record(code, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_last_code_and_first_write_times() {
        let start = Instant::now();
        let mut port = DebugPort::new(start);
        assert_eq!(port.last(), None);
        assert!(port.markers().is_empty());

        port.record(0x10, start + Duration::from_millis(5));
        port.record(0x00, start + Duration::from_millis(7));
        port.record(0x10, start + Duration::from_millis(9));
        port.record(0x20, start + Duration::from_millis(7));

        assert_eq!(port.last(), Some(0x20));
        assert_eq!(port.writes(), 4);
        assert_eq!(port.first_write(0x10), Some(Duration::from_millis(5)));
        assert_eq!(port.first_write(0x30), None);
        assert_eq!(
            port.markers(),
            [
                (0x10, Duration::from_millis(5)),
                (0x00, Duration::from_millis(7)),
                (0x20, Duration::from_millis(7)),
            ]
        );
    }

    #[test]
    fn bus_accesses() {
        let start = Instant::now();
        let mut port = DebugPort::new(start);
        let mut data = [0u8];
        port.read(0, &mut data);
        assert_eq!(data, [0xff], "nothing written yet");

        port.write(0, &[0x42]);
        port.write(0, &[0x34, 0x12]);
        port.write(0, &[]);

        port.read(0, &mut data);
        assert_eq!(data, [0x34]);
        let mut wide = [0u8; 2];
        port.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        assert_eq!(port.writes(), 2);
        assert!(port.first_write(0x42).unwrap() <= start.elapsed());
    }

    #[test]
    fn writes_before_start_count_from_zero() {
        let start = Instant::now() + Duration::from_secs(60);
        let mut port = DebugPort::new(start);
        port.write(0, &[0x01]);
        assert_eq!(port.first_write(0x01), Some(Duration::ZERO));
    }
}
