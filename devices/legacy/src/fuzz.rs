//! Fuzzing entry points: each builds one legacy device on a [`Bus`] at its real ports and plays
//! a byte stream of guest accesses against it. The cargo-fuzz targets are one-line wrappers, and
//! a saved crash input replays in a plain `#[test]`.
//!
//! The stream is a sequence of 4-byte records `[op, offset, v0, v1]` (a trailing partial record
//! is ignored):
//!
//! - `op & 3`: 0 = read, 1 or 3 = write, 2 = a device-specific event (host input for the UART,
//!   the clock moving on for the RTC);
//! - `(op >> 2) & 7` picks the access width: 1, 1, 1, 1, 2, 4, 8 or 0 bytes;
//! - `offset` is a signed byte added to the device's base, so accesses also land just outside
//!   the device and straddle its ends;
//! - a write's data repeats `v0, v1`; an event's argument is `v0, v1`.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::{AcpiPm, CmosRtc, ManualClock, Uart8250, I8042};
use bus::{Bus, BusDevice};

const WIDTHS: [usize; 8] = [1, 1, 1, 1, 2, 4, 8, 0];

/// 2026-11-23 15:50:15.9 UTC: starts close to a second boundary and the update window.
const FUZZ_EPOCH: Duration = Duration::new(1_795_449_015, 900_000_000);

/// Plays `input` against `device` placed at `base`; `event` handles op 2.
fn play<D: BusDevice + 'static>(
    device: D,
    base: u64,
    len: u64,
    input: &[u8],
    mut event: impl FnMut(&mut D, [u8; 2]),
) {
    let device = Arc::new(Mutex::new(device));
    let bus = Bus::new();
    if bus.insert(device.clone(), base, len).is_err() {
        return;
    }
    for record in input.chunks_exact(4) {
        let &[op, offset, v0, v1] = record else {
            continue;
        };
        let addr = base.wrapping_add_signed(i64::from(offset as i8));
        let width = WIDTHS[usize::from((op >> 2) & 7)];
        match op & 3 {
            0 => {
                let mut data = [0u8; 8];
                let claimed = bus.read(addr, &mut data[..width]);
                assert!(claimed || data[..width].iter().all(|&b| b == 0xff));
            }
            2 => event(
                &mut device.lock().unwrap_or_else(|e| e.into_inner()),
                [v0, v1],
            ),
            _ => {
                bus.write(addr, &[v0, v1, v0, v1, v0, v1, v0, v1][..width]);
            }
        }
    }
}

fn eventfd() -> Option<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK).ok()
}

/// The 8250 UART at 0x3f8; events queue `[v0, v1]` as host input.
pub fn fuzz_serial(input: &[u8]) {
    let Some(irq) = eventfd() else { return };
    let uart = Uart8250::new(Box::new(io::sink()), irq);
    play(
        uart,
        Uart8250::PORT_BASE,
        Uart8250::PORT_LEN,
        input,
        |uart, bytes| {
            let capacity = uart.fifo_capacity();
            let accepted = uart.enqueue_input(&bytes);
            assert!(accepted <= capacity.min(2));
        },
    );
}

/// The CMOS RTC at 0x70 on a manual clock; events move the clock on by `(v0 | v1 << 8)`
/// times 997 µs (up to about 65 s, rarely a whole number of seconds).
pub fn fuzz_cmos(input: &[u8]) {
    let clock = ManualClock::new(FUZZ_EPOCH);
    let rtc = CmosRtc::with_clock(1 << 30, 1 << 30, Box::new(clock.clone()));
    play(
        rtc,
        CmosRtc::PORT_BASE,
        CmosRtc::PORT_LEN,
        input,
        |_, arg| {
            clock.advance(Duration::from_micros(997) * u32::from(u16::from_le_bytes(arg)));
        },
    );
}

/// The i8042 at 0x60 with a keyboard interrupt; events do nothing.
pub fn fuzz_i8042(input: &[u8]) {
    let (Some(reset), Some(irq)) = (eventfd(), eventfd()) else {
        return;
    };
    let i8042 = I8042::new(reset, Some(irq));
    play(i8042, I8042::PORT_BASE, I8042::PORT_LEN, input, |_, _| {});
}

/// The ACPI PM1a blocks at 0x600; events press the power button.
pub fn fuzz_acpi_pm(input: &[u8]) {
    let (Some(sci), Some(power_off)) = (eventfd(), eventfd()) else {
        return;
    };
    let pm = AcpiPm::new(sci, power_off);
    play(pm, AcpiPm::PORT_BASE, AcpiPm::PORT_LEN, input, |pm, _| {
        pm.press_power_button();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (64-bit LCG, high bytes).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (state >> 56) as u8
            })
            .collect()
    }

    /// Noise restricted to in-range byte accesses, which reach deeper device state.
    fn focused_noise(len: usize, seed: u64, ports: u8) -> Vec<u8> {
        let mut input = noise(len, seed);
        for record in input.chunks_exact_mut(4) {
            record[0] &= 0x03;
            record[1] %= ports;
        }
        input
    }

    #[test]
    fn devices_survive_random_streams() {
        for seed in 0..4 {
            fuzz_serial(&noise(64 << 10, seed));
            fuzz_serial(&focused_noise(64 << 10, seed, 8));
            fuzz_cmos(&noise(64 << 10, seed));
            fuzz_cmos(&focused_noise(64 << 10, seed, 2));
            fuzz_i8042(&noise(64 << 10, seed));
            fuzz_i8042(&focused_noise(64 << 10, seed, 5));
            fuzz_acpi_pm(&noise(64 << 10, seed));
            fuzz_acpi_pm(&focused_noise(64 << 10, seed, 6));
        }
    }

    #[test]
    fn short_and_empty_inputs() {
        for input in [&[][..], &[1], &[1, 0, 0x80]] {
            fuzz_serial(input);
            fuzz_cmos(input);
            fuzz_i8042(input);
            fuzz_acpi_pm(input);
        }
    }

    #[test]
    fn cmos_set_mode_with_garbage_and_clock_jumps() {
        // Index B, SET | binary, then every time register written 0xff, SET cleared, with the
        // clock advanced at full stride in between.
        let mut input = vec![1, 0, 0x0b, 0, 1, 1, 0x84, 0];
        for index in [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32] {
            input.extend([1, 0, index, 0, 1, 1, 0xff, 0, 2, 0, 0xff, 0xff]);
        }
        input.extend([1, 0, 0x0b, 0, 1, 1, 0x02, 0]);
        for index in 0..0x80 {
            input.extend([1, 0, index, 0, 0, 1, 0, 0, 2, 0, 0xff, 0xff]);
        }
        fuzz_cmos(&input);
    }
}
