//! ACPI fixed-hardware power management: the PM1a event and control blocks (ACPI 6.5, 4.8.2
//! "Fixed Hardware Registers", 4.8.3.1 "PM1 Event Grouping", 4.8.3.2 "PM1 Control Grouping").
//!
//! Six ports from [`AcpiPm::PORT_BASE`]: `PM1a_STS` (offset 0, write 1 to clear), `PM1a_EN`
//! (offset 2) and `PM1a_CNT` (offset 4), the addresses the FADT gives the guest. Two fixed
//! features are modelled:
//!
//! - the power button (4.8.2.2.1.1): [`AcpiPm::press_power_button`] sets `PWRBTN_STS` and, when
//!   the guest has set `PWRBTN_EN`, raises the SCI;
//! - soft-off (7.4.2 "\_Sx (System States)"): a write of `SLP_TYP` = [`AcpiPm::S5_SLP_TYP`] with
//!   `SLP_EN` set signals the power-off event, which ends the VMM as a reset does.
//!
//! The SCI is level-triggered by the spec (5.2.9 "Fixed ACPI Description Table", `SCI_INT`), and
//! the MADT says so (level, active high as KVM's IOAPIC sees it). It is signalled here as a pulse
//! on an eventfd, whenever `PM1a_STS & PM1a_EN` gains the power button bit (a press while enabled,
//! or an enable while a press is pending). A pulse on a level-triggered IOAPIC pin delivers one
//! interrupt, and one press needs one: the guest's handler clears `PWRBTN_STS` before it returns.
//! What a pulse cannot do is re-deliver a status the guest left set; for one fixed event that it
//! always acknowledges, that costs nothing, and it spares the VMM a resample eventfd and its thread.
//!
//! `SCI_EN` reads as 1: the FADT has no `SMI_CMD`, so the platform is always in ACPI mode.

use vmm_sys_util::eventfd::EventFd;

use bus::BusDevice;

/// `PM1_STS`/`PM1_EN` bit of the power button (ACPI 6.5, tables 4.16 and 4.17).
pub const PWRBTN: u16 = 1 << 8;
/// `PM1_STS.WAK_STS`: set when the system wakes; cleared by the guest before sleeping.
const WAK_STS: u16 = 1 << 15;
/// The `PM1_STS` bits this device can set.
const STS_IMPLEMENTED: u16 = PWRBTN | WAK_STS;
/// `PM1_EN` bits the guest may set: TMR_EN, GBL_EN, PWRBTN_EN, SLPBTN_EN, RTC_EN. Only the power
/// button's has an effect; the others read back as written, so the guest's read-modify-writes of
/// the register work.
const EN_WRITABLE: u16 = (1 << 0) | (1 << 5) | PWRBTN | (1 << 9) | (1 << 10);
/// `PM1_CNT.SCI_EN` (table 4.18): always 1.
const SCI_EN: u16 = 1 << 0;
/// `PM1_CNT.SLP_TYP`, bits 12:10.
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0b111 << SLP_TYP_SHIFT;
/// `PM1_CNT.SLP_EN`, write-only: start the transition to the sleep state in `SLP_TYP`.
const SLP_EN: u16 = 1 << 13;
/// `PM1_CNT` bits that read back: BM_RLD and SLP_TYP (GBL_RLS and SLP_EN are write-only).
const CNT_READBACK: u16 = (1 << 1) | SLP_TYP_MASK;

/// Register offsets from [`AcpiPm::PORT_BASE`].
const STS: usize = 0;
const EN: usize = 2;
const CNT: usize = 4;

/// The PM1a event and control blocks of an ACPI platform.
pub struct AcpiPm {
    sts: u16,
    en: u16,
    cnt: u16,
    sci: EventFd,
    power_off: EventFd,
}

impl AcpiPm {
    /// `PM1a_EVT_BLK`, followed by `PM1a_CNT_BLK` at [`Self::PM1A_CNT`]. The ICH9's PMBASE, where
    /// no legacy ISA device sits.
    pub const PORT_BASE: u64 = 0x600;
    /// Ports from [`Self::PORT_BASE`]: 4 for the event block, 2 for the control block.
    pub const PORT_LEN: u64 = 6;
    /// Bytes of `PM1a_EVT_BLK` (the FADT's `PM1_EVT_LEN`).
    pub const PM1_EVT_LEN: u8 = 4;
    /// `PM1a_CNT_BLK` (the FADT's `PM1a_CNT_BLK`).
    pub const PM1A_CNT: u64 = Self::PORT_BASE + CNT as u64;
    /// Bytes of `PM1a_CNT_BLK` (the FADT's `PM1_CNT_LEN`).
    pub const PM1_CNT_LEN: u8 = 2;
    /// The ISA IRQ of the SCI (the FADT's `SCI_INT`), as on PIIX4 and ICH chipsets.
    pub const SCI_IRQ: u32 = 9;
    /// The `SLP_TYP` value of S5 (soft-off), which the DSDT's `\_S5` package announces.
    pub const S5_SLP_TYP: u8 = 5;

    /// A PM block that raises the SCI on `sci` and signals `power_off` when the guest enters S5.
    pub fn new(sci: EventFd, power_off: EventFd) -> Self {
        Self {
            sts: 0,
            en: 0,
            cnt: 0,
            sci,
            power_off,
        }
    }

    /// Presses the power button: sets `PWRBTN_STS` and raises the SCI if the guest enabled the
    /// button. Returns whether the guest enabled it; a guest without ACPI never does, and then
    /// nothing reaches it.
    pub fn press_power_button(&mut self) -> bool {
        let before = self.pending();
        self.sts |= PWRBTN;
        self.raise_if_new(before);
        self.en & PWRBTN != 0
    }

    /// Status bits the guest enabled and has not acknowledged: the SCI's level.
    fn pending(&self) -> u16 {
        self.sts & self.en
    }

    fn raise_if_new(&mut self, before: u16) {
        if self.pending() & !before != 0 {
            if let Err(e) = self.sci.write(1) {
                bus::guest_log!("ACPI PM: cannot raise the SCI: {e}");
            }
        }
    }

    /// The six register bytes as the guest reads them.
    fn register_bytes(&self) -> [u8; 6] {
        let mut bytes = [0u8; 6];
        bytes[STS..STS + 2].copy_from_slice(&self.sts.to_le_bytes());
        bytes[EN..EN + 2].copy_from_slice(&self.en.to_le_bytes());
        let cnt = (self.cnt & CNT_READBACK) | SCI_EN;
        bytes[CNT..CNT + 2].copy_from_slice(&cnt.to_le_bytes());
        bytes
    }

    /// The part of a write of `data` at `offset` that lands in the 16-bit register at `reg`:
    /// (the written bits, the mask of bytes written).
    fn overlap(reg: usize, offset: usize, data: &[u8]) -> (u16, u16) {
        let (mut value, mut mask) = (0u16, 0u16);
        for (i, &byte) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i) else {
                break;
            };
            if (reg..reg + 2).contains(&at) {
                let shift = 8 * (at - reg) as u16;
                value |= u16::from(byte) << shift;
                mask |= 0xff << shift;
            }
        }
        (value, mask)
    }

    fn write_cnt(&mut self, value: u16, mask: u16) {
        if mask == 0 {
            return;
        }
        self.cnt = (self.cnt & !mask) | (value & mask & CNT_READBACK);
        if value & mask & SLP_EN != 0 {
            let slp_typ = ((self.cnt & SLP_TYP_MASK) >> SLP_TYP_SHIFT) as u8;
            if slp_typ == Self::S5_SLP_TYP {
                log::info!("ACPI PM: the guest entered S5 (soft-off)");
                if let Err(e) = self.power_off.write(1) {
                    log::warn!("ACPI PM: cannot signal the power-off: {e}");
                }
            } else {
                bus::guest_log!(
                    "ACPI PM: the guest asked for sleep type {slp_typ}, which this platform does \
                     not offer"
                );
            }
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let bytes = self.register_bytes();
        for (i, out) in data.iter_mut().enumerate() {
            *out = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| bytes.get(at))
                .copied()
                .unwrap_or(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(offset) = usize::try_from(offset) else {
            return;
        };
        let before = self.pending();
        // PM1_STS: write 1 to clear.
        let (value, mask) = Self::overlap(STS, offset, data);
        self.sts &= !(value & mask & STS_IMPLEMENTED);
        let (value, mask) = Self::overlap(EN, offset, data);
        self.en = (self.en & !mask) | (value & mask & EN_WRITABLE);
        let (value, mask) = Self::overlap(CNT, offset, data);
        self.write_cnt(value, mask);
        self.raise_if_new(before);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn evt() -> EventFd {
        EventFd::new(EFD_NONBLOCK).unwrap()
    }

    /// The device and clones of its SCI and power-off events.
    fn pm() -> (AcpiPm, EventFd, EventFd) {
        let (sci, off) = (evt(), evt());
        let pm = AcpiPm::new(sci.try_clone().unwrap(), off.try_clone().unwrap());
        (pm, sci, off)
    }

    fn fired(evt: &EventFd) -> bool {
        evt.read().is_ok()
    }

    fn read16(pm: &mut AcpiPm, offset: u64) -> u16 {
        let mut data = [0u8; 2];
        pm.read(offset, &mut data);
        u16::from_le_bytes(data)
    }

    #[test]
    fn a_press_without_pwrbtn_en_sets_status_only() {
        let (mut pm, sci, _) = pm();
        assert!(!pm.press_power_button());
        assert_eq!(read16(&mut pm, 0), PWRBTN);
        assert!(!fired(&sci));
        // Enabling the button while the press is pending raises the SCI then.
        pm.write(2, &PWRBTN.to_le_bytes());
        assert!(fired(&sci));
        assert_eq!(read16(&mut pm, 2), PWRBTN);
    }

    #[test]
    fn an_enabled_press_raises_the_sci_once_until_acknowledged() {
        let (mut pm, sci, _) = pm();
        pm.write(2, &PWRBTN.to_le_bytes());
        assert!(!fired(&sci), "enabling with nothing pending raises nothing");
        assert!(pm.press_power_button());
        assert!(fired(&sci));
        // A second press before the guest acknowledged the first changes no level.
        pm.press_power_button();
        assert!(!fired(&sci));
        // Write 1 to clear, in a byte write to the status register's high byte.
        pm.write(1, &[(PWRBTN >> 8) as u8]);
        assert_eq!(read16(&mut pm, 0), 0);
        pm.press_power_button();
        assert!(fired(&sci));
    }

    #[test]
    fn writing_zero_to_status_clears_nothing() {
        let (mut pm, _, _) = pm();
        pm.press_power_button();
        pm.write(0, &[0, 0]);
        assert_eq!(read16(&mut pm, 0), PWRBTN);
    }

    #[test]
    fn s5_with_slp_en_powers_off_and_other_states_do_not() {
        let (mut pm, _, off) = pm();
        let s5 = u16::from(AcpiPm::S5_SLP_TYP) << SLP_TYP_SHIFT;
        // Linux writes SLP_TYP first, then SLP_TYP | SLP_EN.
        pm.write(4, &s5.to_le_bytes());
        assert!(!fired(&off));
        assert_eq!(read16(&mut pm, 4), s5 | SCI_EN);
        pm.write(4, &(s5 | SLP_EN).to_le_bytes());
        assert!(fired(&off));
        assert_eq!(read16(&mut pm, 4) & SLP_EN, 0, "SLP_EN is write-only");

        let s3 = 3u16 << SLP_TYP_SHIFT;
        pm.write(4, &(s3 | SLP_EN).to_le_bytes());
        assert!(!fired(&off));
    }

    #[test]
    fn s5_by_a_byte_write_of_the_high_half() {
        let (mut pm, _, off) = pm();
        let high = ((u16::from(AcpiPm::S5_SLP_TYP) << SLP_TYP_SHIFT | SLP_EN) >> 8) as u8;
        pm.write(5, &[high]);
        assert!(fired(&off));
    }

    #[test]
    fn sci_en_always_reads_set() {
        let (mut pm, _, _) = pm();
        pm.write(4, &[0, 0]);
        assert_eq!(read16(&mut pm, 4), SCI_EN);
    }

    #[test]
    fn any_offset_and_width_is_safe() {
        let (mut pm, _, _) = pm();
        for offset in [0u64, 1, 3, 5, 6, 7, u64::MAX] {
            for len in [0usize, 1, 2, 4, 8] {
                let mut data = vec![0xa5; len];
                pm.read(offset, &mut data);
                pm.write(offset, &data);
            }
        }
        let mut wide = [0u8; 8];
        pm.read(4, &mut wide);
        assert_eq!(
            &wide[2..],
            &[0xff; 6],
            "bytes past the block read as all ones"
        );
    }

    #[test]
    fn a_dword_read_of_the_event_block_returns_status_and_enable() {
        let (mut pm, _, _) = pm();
        pm.write(2, &PWRBTN.to_le_bytes());
        pm.press_power_button();
        let mut data = [0u8; 4];
        pm.read(0, &mut data);
        assert_eq!(
            u32::from_le_bytes(data),
            u32::from(PWRBTN) | u32::from(PWRBTN) << 16
        );
    }
}
