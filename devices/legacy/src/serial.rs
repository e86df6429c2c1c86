//! 16550A-compatible UART (COM1 at port 0x3f8, IRQ 4).
//!
//! The register model is `vm_superio::Serial` (registers as in the National Semiconductor
//! PC16550D datasheet, section 8); this module adapts it to the bus: an
//! [`EventFd`]-backed interrupt trigger, byte-wide accesses only, and errors from the output
//! or the eventfd logged (rate-limited) instead of returned, since a guest access cannot fail.

use std::io::{self, Write};

use vm_superio::serial::{Error as SerialError, NoEvents};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use bus::BusDevice;

/// Raises an edge-triggered interrupt by writing to an eventfd the VMM registered as a KVM
/// irqfd. A newtype, because `Trigger` and `EventFd` are both foreign.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A 16550A UART whose transmitted bytes go to `out`, flushed byte by byte so the console is
/// live.
pub struct Uart8250 {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl Uart8250 {
    /// COM1's port base.
    pub const PORT_BASE: u64 = 0x3f8;
    /// Number of ports from [`Self::PORT_BASE`].
    pub const PORT_LEN: u64 = 8;
    /// COM1's ISA interrupt line.
    pub const IRQ: u32 = 4;

    /// A UART writing the guest's output to `out` and raising its interrupt on `irq_evt`.
    pub fn new(out: Box<dyn Write + Send>, irq_evt: EventFd) -> Self {
        Self {
            serial: Serial::new(EventFdTrigger(irq_evt), out),
        }
    }

    /// Queues `bytes` as received data for the guest and returns how many were accepted. The
    /// receive FIFO is bounded, so this may accept fewer than offered (none when it is full, or
    /// while the guest has the UART in loopback mode); the caller retries the rest later.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let before = self.serial.fifo_capacity();
        // `vm_superio` reports a full FIFO as an error and an interrupt failure after the bytes
        // are already queued, so count what was accepted from the FIFO itself.
        if let Err(e) = self.serial.enqueue_raw_bytes(bytes) {
            if !matches!(e, SerialError::FullFifo) {
                self.log_error(&e);
            }
        }
        before.saturating_sub(self.serial.fifo_capacity())
    }

    /// Free space in the receive FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    fn log_error(&mut self, e: &SerialError<io::Error>) {
        bus::guest_log!("serial: {e}");
    }
}

impl BusDevice for Uart8250 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) if u64::from(offset) < Self::PORT_LEN => {
                *byte = self.serial.read(offset);
            }
            (_, data) => {
                log::debug!(
                    "serial: ignoring a {}-byte read at offset {offset}",
                    data.len()
                );
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), &[value]) if u64::from(offset) < Self::PORT_LEN => {
                if let Err(e) = self.serial.write(offset, value) {
                    self.log_error(&e);
                }
            }
            (_, data) => {
                log::debug!(
                    "serial: ignoring a {}-byte write at offset {offset}",
                    data.len()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;

    /// Records what was written and how often it was flushed.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            self.0.lock().unwrap().1 += 1;
            Ok(())
        }
    }

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn evt() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    /// Pending interrupt count on `evt`, 0 if none (reading resets it).
    fn irqs(evt: &EventFd) -> u64 {
        evt.read().unwrap_or(0)
    }

    fn read(uart: &mut Uart8250, offset: u64) -> u8 {
        let mut data = [0u8];
        uart.read(offset, &mut data);
        data[0]
    }

    #[test]
    fn transmitted_bytes_are_written_and_flushed() {
        let capture = Capture::default();
        let mut uart = Uart8250::new(Box::new(capture.clone()), evt());

        for &b in b"ok\n" {
            uart.write(THR, &[b]);
        }

        let (bytes, flushes) = capture.0.lock().unwrap().clone();
        assert_eq!(bytes, b"ok\n");
        assert_eq!(flushes, 3, "one flush per byte keeps the console live");
    }

    #[test]
    fn thr_empty_interrupt_is_raised_and_acknowledged_by_iir() {
        let irq = evt();
        let mut uart = Uart8250::new(Box::new(io::sink()), irq.try_clone().unwrap());

        // Enabling the THR-empty interrupt raises it at once: the THR is always empty.
        uart.write(IER, &[0x02]);
        assert_eq!(irqs(&irq), 1);
        // Still pending: a transmitted byte does not raise it again.
        uart.write(THR, b"x");
        assert_eq!(irqs(&irq), 0);
        // Reading IIR reports it (16550A FIFO bits set) and acknowledges it.
        assert_eq!(read(&mut uart, IIR), 0xc2);
        assert_eq!(read(&mut uart, IIR), 0xc1, "no interrupt pending");
        uart.write(THR, b"y");
        assert_eq!(irqs(&irq), 1);
    }

    #[test]
    fn input_is_bounded_by_the_fifo_and_read_in_order() {
        let irq = evt();
        let mut uart = Uart8250::new(Box::new(io::sink()), irq.try_clone().unwrap());
        uart.write(IER, &[0x01]); // received-data interrupt
        let capacity = uart.fifo_capacity();
        assert_eq!(capacity, 64);

        let input: Vec<u8> = (0..100).collect();
        assert_eq!(uart.enqueue_input(&input), 64);
        assert_eq!(uart.fifo_capacity(), 0);
        assert_eq!(
            uart.enqueue_input(&input[64..]),
            0,
            "a full FIFO takes nothing"
        );
        assert_eq!(irqs(&irq), 1);

        assert_eq!(read(&mut uart, LSR) & 0x01, 0x01, "data ready");
        let received: Vec<u8> = (0..64).map(|_| read(&mut uart, THR)).collect();
        assert_eq!(received, input[..64]);
        assert_eq!(read(&mut uart, LSR) & 0x01, 0, "drained");
        assert_eq!(uart.enqueue_input(&input[64..]), 36);
    }

    #[test]
    fn loopback_mode_accepts_no_host_input() {
        let mut uart = Uart8250::new(Box::new(io::sink()), evt());
        uart.write(MCR, &[0x10]);
        assert_eq!(uart.enqueue_input(b"abc"), 0);
        uart.write(THR, b"z");
        assert_eq!(read(&mut uart, THR), b'z', "looped back");
    }

    #[test]
    fn divisor_latch_is_readable_through_dlab() {
        let mut uart = Uart8250::new(Box::new(io::sink()), evt());
        uart.write(LCR, &[0x83]);
        uart.write(0, &[0x01]);
        uart.write(1, &[0x00]);
        assert_eq!(read(&mut uart, 0), 0x01);
        uart.write(LCR, &[0x03]);
        assert_eq!(read(&mut uart, LCR), 0x03);
    }

    #[test]
    fn wide_and_out_of_range_accesses_are_ignored() {
        let capture = Capture::default();
        let mut uart = Uart8250::new(Box::new(capture.clone()), evt());

        let mut wide = [0u8; 2];
        uart.read(LSR, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        let mut byte = [0u8];
        uart.read(8, &mut byte);
        assert_eq!(byte, [0xff]);
        uart.read(u64::MAX, &mut byte);
        assert_eq!(byte, [0xff]);
        uart.write(THR, b"ab");
        uart.write(0x100, b"c");
        uart.write(THR, &[]);

        assert!(capture.0.lock().unwrap().0.is_empty());
    }

    #[test]
    fn output_errors_do_not_stop_the_uart() {
        let irq = evt();
        let mut uart = Uart8250::new(Box::new(Broken), irq.try_clone().unwrap());
        uart.write(IER, &[0x02]);
        assert_eq!(read(&mut uart, IIR), 0xc2);

        uart.write(THR, b"x");

        // The byte is lost, but the guest still sees the transmitter ready and interrupting.
        assert_eq!(irqs(&irq), 2);
        assert_eq!(read(&mut uart, LSR) & 0x60, 0x60);
    }
}
