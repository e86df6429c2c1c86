//! MC146818 CMOS real-time clock and CMOS RAM at ports 0x70 (index) and 0x71 (data).
//!
//! Registers as in the Motorola MC146818A datasheet ("Address Map", "Time, Calendar and Alarm
//! Locations", "Register A" to "Register D"), with the PC/AT CMOS layout for the memory-size
//! bytes (0x34/0x35: RAM from 16 MiB to 4 GiB, 0x5b..0x5d: RAM above 4 GiB, both in 64 KiB
//! units, as SeaBIOS and QEMU use them) and the century byte at 0x32.
//!
//! The time is not counted by the device: every read derives it from an injected [`Clock`]
//! plus an offset the guest sets through the SET bit of register B, so the guest's clock
//! advances with the host's and `date -s; hwclock -w` in the guest sticks. Binary vs BCD and
//! 12 vs 24 hour encodings follow register B. The update-in-progress bit of register A is
//! reported during the last 244 µs of each second, so readers that wait for it to clear (Linux's
//! `mc146818_get_time`) read a consistent time and never spin.
//!
//! Not modelled: the periodic, alarm and update-ended interrupts (there is no IRQ 8 line); the
//! update-ended flag of register C is set lazily when read after a second boundary, and the
//! day-of-week register is derived from the date rather than counted on its own.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::calendar::DateTime;
use bus::BusDevice;

/// A source of wall-clock time.
pub trait Clock: Send {
    /// Time since the UNIX epoch, UTC.
    fn now(&self) -> Duration;
}

/// The host's system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostClock;

impl Clock for HostClock {
    fn now(&self) -> Duration {
        // A host clock set before 1970 reads as the epoch.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// A clock that only moves when told to, for tests and fuzzing. Clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<Mutex<Duration>>);

impl ManualClock {
    /// A clock reading `now` since the epoch.
    pub fn new(now: Duration) -> Self {
        Self(Arc::new(Mutex::new(now)))
    }

    /// Sets the time.
    pub fn set(&self, now: Duration) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }

    /// Moves the time forward by `by`, saturating.
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now = now.saturating_add(by);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

const INDEX_PORT: u64 = 0;
const DATA_PORT: u64 = 1;
/// Bit 7 of the index is the NMI-disable gate on PCs, not part of the index.
const INDEX_MASK: u8 = 0x7f;
const RAM_LEN: usize = 128;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;
/// The registers that hold the time; they read as the clock's time unless SET is held.
const TIME_REGISTERS: [u8; 8] = [SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY];
const EXT_MEM_LOW: usize = 0x34;
const HIGH_MEM: usize = 0x5b;

/// Register A: update in progress (read-only).
const A_UIP: u8 = 0x80;
/// Register A: time-base divider bits, and the value that runs the clock from 32.768 kHz.
const A_DIVIDER_MASK: u8 = 0x70;
const A_DIVIDER_32KHZ: u8 = 0x20;
/// 32.768 kHz time base, 1024 Hz periodic rate: what PC firmware leaves.
const A_DEFAULT: u8 = 0x26;
/// Register B: updates inhibited while the guest sets the time.
const B_SET: u8 = 0x80;
/// Register B: interrupt enables (periodic, alarm, update-ended), same bit positions as their
/// flags in register C.
const B_IRQ_ENABLES: u8 = 0x70;
const B_UIE: u8 = 0x10;
/// Register B: binary rather than BCD data mode.
const B_DM_BINARY: u8 = 0x04;
/// Register B: 24-hour rather than 12-hour mode. Linux's rtc-cmos refuses 12-hour mode.
const B_24H: u8 = 0x02;
/// Register C: some enabled interrupt flag is set.
const C_IRQF: u8 = 0x80;
/// Register C: update-ended flag.
const C_UF: u8 = 0x10;
/// Register D: valid RAM and time (the battery is good).
const D_VRT: u8 = 0x80;
/// 12-hour mode: PM flag in the hours byte.
const HOUR_PM: u8 = 0x80;

const NANOS_PER_SEC: i128 = 1_000_000_000;
/// The update cycle takes 244 µs (datasheet: "update cycle"); UIP is set for that long before
/// the second changes.
const UIP_WINDOW_NANOS: u32 = 244_000;

/// A binary value (< 100) in the data mode of register B.
fn encode(value: u32, reg_b: u8) -> u8 {
    let value = (value % 100) as u8;
    if reg_b & B_DM_BINARY != 0 {
        value
    } else {
        ((value / 10) << 4) | (value % 10)
    }
}

/// The value of a time byte in the data mode of register B; `None` for a bad BCD digit.
fn decode(byte: u8, reg_b: u8) -> Option<u32> {
    if reg_b & B_DM_BINARY != 0 {
        return Some(u32::from(byte));
    }
    let (tens, ones) = (byte >> 4, byte & 0x0f);
    (tens < 10 && ones < 10).then(|| u32::from(tens * 10 + ones))
}

fn encode_hour(hour: u32, reg_b: u8) -> u8 {
    if reg_b & B_24H != 0 {
        return encode(hour, reg_b);
    }
    let pm = if hour >= 12 { HOUR_PM } else { 0 };
    let hour12 = match hour % 12 {
        0 => 12,
        h => h,
    };
    encode(hour12, reg_b) | pm
}

fn decode_hour(byte: u8, reg_b: u8) -> Option<u32> {
    if reg_b & B_24H != 0 {
        return decode(byte, reg_b);
    }
    let hour12 = decode(byte & !HOUR_PM, reg_b).filter(|h| (1..=12).contains(h))?;
    let pm = if byte & HOUR_PM != 0 { 12 } else { 0 };
    Some(hour12 % 12 + pm)
}

/// The CMOS RTC and its 128 bytes of battery-backed RAM.
pub struct CmosRtc {
    index: u8,
    ram: [u8; RAM_LEN],
    clock: Box<dyn Clock>,
    /// Guest time minus clock time, in nanoseconds.
    offset_nanos: i128,
    /// Whether the guest wrote the century byte while setting the time; if not, the century is
    /// inferred from the two-digit year the way Linux reads it (below 70 is 20xx).
    century_written: bool,
    /// The guest second of the last read of register C, for its update-ended flag.
    last_c_read_second: i64,
}

impl CmosRtc {
    /// Index port; the data port follows it.
    pub const PORT_BASE: u64 = 0x70;
    /// Number of ports from [`Self::PORT_BASE`].
    pub const PORT_LEN: u64 = 2;
    /// The RTC's ISA interrupt line (not raised by this model).
    pub const IRQ: u32 = 8;

    /// An RTC on the host's clock. `mem_below_4g` is the guest RAM below 4 GiB in bytes (all of
    /// it, from address 0), `mem_above_4g` the RAM above 4 GiB.
    pub fn new(mem_below_4g: u64, mem_above_4g: u64) -> Self {
        Self::with_clock(mem_below_4g, mem_above_4g, Box::new(HostClock))
    }

    /// An RTC reading its time from `clock`; see [`Self::new`] for the memory sizes.
    pub fn with_clock(mem_below_4g: u64, mem_above_4g: u64, clock: Box<dyn Clock>) -> Self {
        const KIB_64: u64 = 64 << 10;
        let mut ram = [0u8; RAM_LEN];
        ram[usize::from(REG_A)] = A_DEFAULT;
        ram[usize::from(REG_B)] = B_24H;
        ram[usize::from(REG_D)] = D_VRT;

        let ext_mem = (mem_below_4g.saturating_sub(16 << 20) / KIB_64).min(0xffff);
        ram[EXT_MEM_LOW..EXT_MEM_LOW + 2].copy_from_slice(&ext_mem.to_le_bytes()[..2]);
        let high_mem = (mem_above_4g / KIB_64).min(0xff_ffff);
        ram[HIGH_MEM..HIGH_MEM + 3].copy_from_slice(&high_mem.to_le_bytes()[..3]);

        let mut rtc = Self {
            index: 0,
            ram,
            clock,
            offset_nanos: 0,
            century_written: false,
            last_c_read_second: 0,
        };
        rtc.last_c_read_second = rtc.now().0;
        rtc
    }

    fn reg(&self, index: u8) -> u8 {
        self.ram[usize::from(index & INDEX_MASK)]
    }

    fn set_reg(&mut self, index: u8, value: u8) {
        self.ram[usize::from(index & INDEX_MASK)] = value;
    }

    /// The clock's time in nanoseconds since the epoch (at most about 1.8e28, far inside
    /// `i128`).
    fn clock_nanos(&self) -> i128 {
        i128::try_from(self.clock.now().as_nanos()).unwrap_or(i128::MAX)
    }

    /// The guest's time: whole seconds since the epoch and nanoseconds into that second.
    fn now(&self) -> (i64, u32) {
        let nanos = self.clock_nanos().saturating_add(self.offset_nanos);
        let secs = nanos.div_euclid(NANOS_PER_SEC);
        let secs = i64::try_from(secs).unwrap_or(if secs < 0 { i64::MIN } else { i64::MAX });
        // In 0..1e9, so it fits.
        let subsec = nanos.rem_euclid(NANOS_PER_SEC) as u32;
        (secs, subsec)
    }

    /// A time or calendar register of `date`, encoded per `reg_b`.
    fn time_register(index: u8, date: &DateTime, reg_b: u8) -> u8 {
        match index {
            SECONDS => encode(date.second, reg_b),
            MINUTES => encode(date.minute, reg_b),
            HOURS => encode_hour(date.hour, reg_b),
            WEEKDAY => encode(date.weekday + 1, reg_b),
            DAY => encode(date.day, reg_b),
            MONTH => encode(date.month, reg_b),
            YEAR => encode(date.year.rem_euclid(100) as u32, reg_b),
            CENTURY => encode(date.year.div_euclid(100).rem_euclid(100) as u32, reg_b),
            _ => 0,
        }
    }

    /// Copies the current time into the time registers, which then hold still (SET mode).
    fn freeze_time(&mut self, reg_b: u8) {
        let date = DateTime::from_unix(self.now().0);
        for index in TIME_REGISTERS {
            self.set_reg(index, Self::time_register(index, &date, reg_b));
        }
    }

    /// The time held in the time registers, encoded per `reg_b`, in seconds since the epoch;
    /// `None` if a field is out of range.
    fn held_time(&self, reg_b: u8) -> Option<i64> {
        let field = |index| decode(self.reg(index), reg_b);
        let year = field(YEAR).filter(|y| *y < 100)?;
        let century = if self.century_written {
            field(CENTURY).filter(|c| *c < 100)?
        } else if year < 70 {
            20
        } else {
            19
        };
        DateTime {
            year: i64::from(century * 100 + year),
            month: field(MONTH)?,
            day: field(DAY)?,
            hour: decode_hour(self.reg(HOURS), reg_b)?,
            minute: field(MINUTES)?,
            second: field(SECONDS)?,
            weekday: 0,
        }
        .to_unix()
    }

    /// Makes the time held in the time registers (encoded per `reg_b`) the guest's time, from
    /// this instant; an invalid time is logged and the clock keeps its old time.
    fn commit_time(&mut self, reg_b: u8) {
        match self.held_time(reg_b) {
            Some(secs) => {
                self.offset_nanos = i128::from(secs) * NANOS_PER_SEC - self.clock_nanos();
            }
            None => {
                bus::guest_log!(
                    "cmos: the guest set an invalid time {:02x?} (register B {reg_b:#04x}); \
                         keeping the old time",
                    [YEAR, MONTH, DAY, HOURS, MINUTES, SECONDS, CENTURY].map(|i| self.reg(i)),
                );
            }
        }
    }

    fn write_reg_b(&mut self, value: u8) {
        let old = self.reg(REG_B);
        // Setting SET also clears UIE (datasheet, register B).
        let new = if value & B_SET != 0 {
            value & !B_UIE
        } else {
            value
        };
        match (old & B_SET != 0, new & B_SET != 0) {
            (false, true) => {
                self.freeze_time(new);
                self.century_written = false;
            }
            // As on the chip, the bytes held in the registers count on in the mode now set: they
            // read back unchanged even if this write also changed the data mode.
            (true, false) => self.commit_time(new),
            _ => {}
        }
        self.set_reg(REG_B, new);
    }

    fn read_register(&mut self, index: u8) -> u8 {
        let reg_b = self.reg(REG_B);
        let running = reg_b & B_SET == 0;
        match index {
            _ if running && TIME_REGISTERS.contains(&index) => {
                Self::time_register(index, &DateTime::from_unix(self.now().0), reg_b)
            }
            REG_A => {
                let (_, subsec) = self.now();
                let counting = self.reg(REG_A) & A_DIVIDER_MASK == A_DIVIDER_32KHZ;
                let updating = running && counting && subsec >= 1_000_000_000 - UIP_WINDOW_NANOS;
                (self.reg(REG_A) & !A_UIP) | (if updating { A_UIP } else { 0 })
            }
            REG_C => {
                let (second, _) = self.now();
                let mut flags = 0;
                if running && second != self.last_c_read_second {
                    flags |= C_UF;
                }
                self.last_c_read_second = second;
                if flags & reg_b & B_IRQ_ENABLES != 0 {
                    flags |= C_IRQF;
                }
                flags
            }
            REG_D => D_VRT,
            _ => self.reg(index),
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        let reg_b = self.reg(REG_B);
        match index {
            REG_A => self.set_reg(REG_A, value & !A_UIP),
            REG_B => self.write_reg_b(value),
            REG_C | REG_D => log::debug!("cmos: ignoring a write to read-only register {index:#x}"),
            _ if TIME_REGISTERS.contains(&index) => {
                if reg_b & B_SET != 0 {
                    self.set_reg(index, value);
                    self.century_written |= index == CENTURY;
                } else {
                    // Writing one field of a running clock sets just that field.
                    self.freeze_time(reg_b);
                    self.set_reg(index, value);
                    self.century_written = index == CENTURY;
                    self.commit_time(reg_b);
                }
            }
            // Alarms, status and plain CMOS RAM.
            _ => self.set_reg(index, value),
        }
    }
}

impl BusDevice for CmosRtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data) {
            (DATA_PORT, [byte]) => *byte = self.read_register(self.index),
            // The index port is write-only.
            (INDEX_PORT, [byte]) => *byte = 0xff,
            (_, data) => {
                log::debug!(
                    "cmos: ignoring a {}-byte read at offset {offset}",
                    data.len()
                );
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (INDEX_PORT, &[index]) => self.index = index & INDEX_MASK,
            (DATA_PORT, &[value]) => self.write_register(self.index, value),
            (_, data) => {
                log::debug!(
                    "cmos: ignoring a {}-byte write at offset {offset}",
                    data.len()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-23 15:50:15 UTC, a Monday.
    const NOV_23_2026: u64 = 1_795_449_015;
    /// 2026-11-23 00:30:00 UTC.
    const NOV_23_2026_0030: u64 = 1_795_393_800;
    /// 2024-02-29 12:00:00 UTC, a Thursday.
    const LEAP_DAY_2024: u64 = 1_709_208_000;
    /// 1999-12-31 23:59:59 UTC, a Friday.
    const NYE_1999: u64 = 946_684_799;
    /// 2030-06-15 08:09:10 UTC, a Saturday.
    const JUNE_15_2030: u64 = 1_907_741_350;

    const ALARM_SECONDS: u8 = 0x01;
    const ALARM_MINUTES: u8 = 0x03;
    const ALARM_HOURS: u8 = 0x05;

    fn rtc_at(secs: u64, nanos: u32) -> (CmosRtc, ManualClock) {
        let clock = ManualClock::new(Duration::new(secs, nanos));
        let rtc = CmosRtc::with_clock(128 << 20, 0, Box::new(clock.clone()));
        (rtc, clock)
    }

    fn read_reg(rtc: &mut CmosRtc, index: u8) -> u8 {
        rtc.write(INDEX_PORT, &[index]);
        let mut data = [0u8];
        rtc.read(DATA_PORT, &mut data);
        data[0]
    }

    fn write_reg(rtc: &mut CmosRtc, index: u8, value: u8) {
        rtc.write(INDEX_PORT, &[index]);
        rtc.write(DATA_PORT, &[value]);
    }

    fn time_regs(rtc: &mut CmosRtc) -> [u8; 8] {
        TIME_REGISTERS.map(|index| read_reg(rtc, index))
    }

    #[test]
    fn defaults_are_bcd_24h_with_valid_ram() {
        let (mut rtc, _) = rtc_at(NOV_23_2026, 0);
        assert_eq!(read_reg(&mut rtc, REG_A), 0x26);
        assert_eq!(read_reg(&mut rtc, REG_B), 0x02);
        assert_eq!(read_reg(&mut rtc, REG_C), 0x00);
        assert_eq!(read_reg(&mut rtc, REG_D), 0x80);
    }

    #[test]
    fn bcd_time_of_a_known_date() {
        let (mut rtc, _) = rtc_at(NOV_23_2026, 500_000_000);
        // sec, min, hour, weekday (Monday = 2), day, month, year, century
        assert_eq!(
            time_regs(&mut rtc),
            [0x15, 0x50, 0x15, 0x02, 0x23, 0x11, 0x26, 0x20]
        );
    }

    #[test]
    fn binary_time_of_a_known_date() {
        let (mut rtc, _) = rtc_at(NOV_23_2026, 0);
        write_reg(&mut rtc, REG_B, B_24H | B_DM_BINARY);
        assert_eq!(time_regs(&mut rtc), [15, 50, 15, 2, 23, 11, 26, 20]);
    }

    #[test]
    fn twelve_hour_mode_in_bcd_and_binary() {
        let (mut rtc, clock) = rtc_at(NOV_23_2026, 0);
        write_reg(&mut rtc, REG_B, 0x00);
        assert_eq!(read_reg(&mut rtc, HOURS), 0x83, "15h is 3 PM");
        write_reg(&mut rtc, REG_B, B_DM_BINARY);
        assert_eq!(read_reg(&mut rtc, HOURS), 0x83);

        clock.set(Duration::from_secs(NOV_23_2026_0030));
        assert_eq!(read_reg(&mut rtc, HOURS), 12, "00:30 is 12 AM");
        write_reg(&mut rtc, REG_B, 0x00);
        assert_eq!(read_reg(&mut rtc, HOURS), 0x12);

        clock.set(Duration::from_secs(NOV_23_2026_0030 + 12 * 3600));
        assert_eq!(read_reg(&mut rtc, HOURS), 0x92, "12:30 is 12 PM");
    }

    #[test]
    fn leap_day() {
        let (mut rtc, _) = rtc_at(LEAP_DAY_2024, 0);
        assert_eq!(
            time_regs(&mut rtc),
            [0x00, 0x00, 0x12, 0x05, 0x29, 0x02, 0x24, 0x20]
        );
    }

    #[test]
    fn century_rolls_over_with_the_clock() {
        let (mut rtc, clock) = rtc_at(NYE_1999, 0);
        assert_eq!(
            time_regs(&mut rtc),
            [0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19]
        );
        clock.advance(Duration::from_secs(1));
        // Saturday 2000-01-01 00:00:00.
        assert_eq!(
            time_regs(&mut rtc),
            [0x00, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20]
        );
    }

    #[test]
    fn uip_is_set_only_in_the_last_244_us_of_a_second() {
        let (mut rtc, clock) = rtc_at(NOV_23_2026, 999_755_999);
        assert_eq!(read_reg(&mut rtc, REG_A), 0x26);
        clock.set(Duration::new(NOV_23_2026, 999_756_000));
        assert_eq!(read_reg(&mut rtc, REG_A), 0xa6);
        clock.set(Duration::new(NOV_23_2026, 999_999_999));
        assert_eq!(read_reg(&mut rtc, REG_A), 0xa6);
        clock.set(Duration::new(NOV_23_2026 + 1, 0));
        assert_eq!(read_reg(&mut rtc, REG_A), 0x26);

        // Not while the guest holds SET, nor with the divider stopped.
        clock.set(Duration::new(NOV_23_2026, 999_900_000));
        write_reg(&mut rtc, REG_B, B_SET | B_24H);
        assert_eq!(read_reg(&mut rtc, REG_A), 0x26);
        write_reg(&mut rtc, REG_B, B_24H);
        write_reg(&mut rtc, REG_A, 0x76);
        assert_eq!(read_reg(&mut rtc, REG_A), 0x76);
    }

    #[test]
    fn register_a_uip_is_read_only() {
        let (mut rtc, _) = rtc_at(NOV_23_2026, 0);
        write_reg(&mut rtc, REG_A, 0xa6);
        assert_eq!(read_reg(&mut rtc, REG_A), 0x26);
    }

    #[test]
    fn register_c_reports_update_ended_once_and_clears_on_read() {
        let (mut rtc, clock) = rtc_at(NOV_23_2026, 0);
        assert_eq!(read_reg(&mut rtc, REG_C), 0x00, "no second has passed");
        clock.advance(Duration::from_millis(1500));
        assert_eq!(read_reg(&mut rtc, REG_C), C_UF);
        assert_eq!(read_reg(&mut rtc, REG_C), 0x00, "cleared by the read");

        // With the update interrupt enabled, IRQF is set too.
        write_reg(&mut rtc, REG_B, B_24H | B_UIE);
        clock.advance(Duration::from_secs(1));
        assert_eq!(read_reg(&mut rtc, REG_C), C_IRQF | C_UF);
        assert_eq!(read_reg(&mut rtc, REG_C), 0x00);

        write_reg(&mut rtc, REG_C, 0xff);
        assert_eq!(read_reg(&mut rtc, REG_C), 0x00, "read-only");
    }

    /// Sets the time the way Linux's `mc146818_set_time` does: SET, the fields, SET cleared.
    fn set_time(rtc: &mut CmosRtc, reg_b: u8, fields: &[(u8, u8)]) {
        write_reg(rtc, REG_B, reg_b | B_SET);
        for &(index, value) in fields {
            write_reg(rtc, index, value);
        }
        write_reg(rtc, REG_B, reg_b);
    }

    #[test]
    fn guest_set_time_holds_while_set_and_then_advances() {
        let (mut rtc, clock) = rtc_at(NOV_23_2026, 250_000_000);
        write_reg(&mut rtc, REG_B, B_SET | B_24H);
        // While SET is held the registers hold still and take the guest's values.
        clock.advance(Duration::from_secs(3));
        assert_eq!(read_reg(&mut rtc, SECONDS), 0x15);
        for (index, value) in [
            (YEAR, 0x30),
            (MONTH, 0x06),
            (DAY, 0x15),
            (HOURS, 0x08),
            (MINUTES, 0x09),
            (SECONDS, 0x10),
        ] {
            write_reg(&mut rtc, index, value);
        }
        assert_eq!(read_reg(&mut rtc, YEAR), 0x30);
        write_reg(&mut rtc, REG_B, B_24H);

        // 2030-06-15 08:09:10, a Saturday, century inferred.
        assert_eq!(
            time_regs(&mut rtc),
            [0x10, 0x09, 0x08, 0x07, 0x15, 0x06, 0x30, 0x20]
        );
        clock.advance(Duration::from_millis(5_999));
        assert_eq!(read_reg(&mut rtc, SECONDS), 0x15);
        assert_eq!(
            rtc.now(),
            (JUNE_15_2030 as i64 + 5, 999_000_000),
            "the second starts when SET is cleared"
        );
    }

    #[test]
    fn guest_set_time_in_binary_12h_with_century() {
        let (mut rtc, _) = rtc_at(NOV_23_2026, 0);
        let reg_b = B_DM_BINARY;
        set_time(
            &mut rtc,
            reg_b,
            &[
                (CENTURY, 19),
                (YEAR, 99),
                (MONTH, 12),
                (DAY, 31),
                (HOURS, 11 | HOUR_PM),
                (MINUTES, 59),
                (SECONDS, 59),
            ],
        );
        assert_eq!(rtc.now().0, NYE_1999 as i64);
        assert_eq!(
            time_regs(&mut rtc),
            [59, 59, 11 | HOUR_PM, 6, 31, 12, 99, 19]
        );
    }

    #[test]
    fn held_bytes_count_on_in_the_mode_set_with_clearing_set() {
        let (mut rtc, _) = rtc_at(NOV_23_2026, 0);
        // Binary values written while register B still says BCD (10 = 0x0a is no BCD digit)...
        write_reg(&mut rtc, REG_B, B_SET | B_24H);
        for (index, value) in [(YEAR, 27), (MONTH, 3), (DAY, 5), (HOURS, 10), (MINUTES, 20)] {
            write_reg(&mut rtc, index, value);
        }
        write_reg(&mut rtc, SECONDS, 33);
        // ...then SET cleared together with the switch to binary: 2027-03-05 10:20:33.
        write_reg(&mut rtc, REG_B, B_24H | B_DM_BINARY);
        assert_eq!(rtc.now().0, 1_804_242_033);
        assert_eq!(time_regs(&mut rtc), [33, 20, 10, 6, 5, 3, 27, 20]);
    }

    #[test]
    fn two_digit_year_without_century_is_read_as_linux_does() {
        let (mut rtc, _) = rtc_at(NOV_23_2026, 0);
        set_time(&mut rtc, B_24H, &[(YEAR, 0x99), (MONTH, 0x12), (DAY, 0x31)]);
        assert_eq!(read_reg(&mut rtc, CENTURY), 0x19);
        set_time(&mut rtc, B_24H, &[(YEAR, 0x69)]);
        assert_eq!(read_reg(&mut rtc, CENTURY), 0x20);
    }

    #[test]
    fn invalid_guest_time_keeps_the_old_time() {
        let (mut rtc, _) = rtc_at(NOV_23_2026, 0);
        let before = time_regs(&mut rtc);
        set_time(&mut rtc, B_24H, &[(MONTH, 0x13)]);
        assert_eq!(time_regs(&mut rtc), before);
        set_time(&mut rtc, B_24H, &[(SECONDS, 0x5a)]);
        assert_eq!(time_regs(&mut rtc), before, "bad BCD digit");
        set_time(&mut rtc, B_24H, &[(YEAR, 0x23), (MONTH, 0x02), (DAY, 0x29)]);
        assert_eq!(time_regs(&mut rtc), before, "2023 has no leap day");
        set_time(&mut rtc, 0, &[(HOURS, 0x13)]);
        write_reg(&mut rtc, REG_B, B_24H);
        assert_eq!(time_regs(&mut rtc), before, "13 o'clock in 12-hour mode");
    }

    #[test]
    fn writing_a_field_of_the_running_clock_sets_that_field() {
        let (mut rtc, _) = rtc_at(NOV_23_2026, 0);
        write_reg(&mut rtc, MINUTES, 0x05);
        assert_eq!(
            time_regs(&mut rtc),
            [0x15, 0x05, 0x15, 0x02, 0x23, 0x11, 0x26, 0x20]
        );
    }

    #[test]
    fn alarms_and_plain_ram_are_stored() {
        let (mut rtc, _) = rtc_at(NOV_23_2026, 0);
        for (index, value) in [
            (ALARM_SECONDS, 0x30),
            (ALARM_MINUTES, 0x45),
            (ALARM_HOURS, 0xc0),
        ] {
            write_reg(&mut rtc, index, value);
            assert_eq!(read_reg(&mut rtc, index), value);
        }
        write_reg(&mut rtc, 0x40, 0xab);
        assert_eq!(read_reg(&mut rtc, 0x40), 0xab);
        write_reg(&mut rtc, REG_D, 0x00);
        assert_eq!(read_reg(&mut rtc, REG_D), 0x80, "read-only");
    }

    #[test]
    fn index_bit_7_is_the_nmi_gate_and_is_ignored() {
        let (mut rtc, _) = rtc_at(NOV_23_2026, 0);
        assert_eq!(read_reg(&mut rtc, 0x80 | REG_D), 0x80);
        assert_eq!(read_reg(&mut rtc, 0x80 | SECONDS), 0x15);
        write_reg(&mut rtc, 0xff, 0x5a);
        assert_eq!(read_reg(&mut rtc, 0x7f), 0x5a);
    }

    #[test]
    fn odd_accesses_read_all_ones_and_change_nothing() {
        let (mut rtc, _) = rtc_at(NOV_23_2026, 0);
        rtc.write(INDEX_PORT, &[SECONDS]);
        let mut byte = [0u8];
        rtc.read(INDEX_PORT, &mut byte);
        assert_eq!(byte, [0xff], "the index port is write-only");
        rtc.read(2, &mut byte);
        assert_eq!(byte, [0xff]);
        let mut wide = [0u8; 2];
        rtc.read(DATA_PORT, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        rtc.write(INDEX_PORT, &[REG_B, 0]);
        rtc.write(DATA_PORT, &[0x00, 0x00]);
        rtc.write(u64::MAX, &[0x00]);
        assert_eq!(read_reg(&mut rtc, REG_B), 0x02);
    }

    #[test]
    fn memory_size_registers() {
        let clock = || Box::new(ManualClock::new(Duration::ZERO));
        // 1 GiB below 4 GiB: (1024 - 16) MiB / 64 KiB = 0x3f00; 3 GiB above: 0xc000.
        let mut rtc = CmosRtc::with_clock(1 << 30, 3 << 30, clock());
        let regs = [0x34, 0x35, 0x5b, 0x5c, 0x5d].map(|i| read_reg(&mut rtc, i));
        assert_eq!(regs, [0x00, 0x3f, 0x00, 0xc0, 0x00]);

        let mut small = CmosRtc::with_clock(8 << 20, 0, clock());
        let regs = [0x34, 0x35, 0x5b, 0x5c, 0x5d].map(|i| read_reg(&mut small, i));
        assert_eq!(regs, [0; 5]);

        let mut huge = CmosRtc::with_clock(u64::MAX, u64::MAX, clock());
        let regs = [0x34, 0x35, 0x5b, 0x5c, 0x5d].map(|i| read_reg(&mut huge, i));
        assert_eq!(regs, [0xff; 5]);
    }

    #[test]
    fn extreme_clocks_do_not_panic() {
        for now in [
            Duration::ZERO,
            Duration::MAX,
            Duration::from_secs(u64::MAX / 2),
        ] {
            let mut rtc = CmosRtc::with_clock(0, 0, Box::new(ManualClock::new(now)));
            for index in 0..=0x7f {
                read_reg(&mut rtc, index);
            }
            set_time(&mut rtc, B_24H, &[(CENTURY, 0x99), (YEAR, 0x99)]);
            read_reg(&mut rtc, YEAR);
        }
    }

    #[test]
    fn host_clock_is_after_2020() {
        let mut rtc = CmosRtc::new(0, 0);
        let century = read_reg(&mut rtc, CENTURY);
        let year = read_reg(&mut rtc, YEAR);
        assert!(century >= 0x20 && year >= 0x20, "{century:#x}{year:02x}");
    }
}
