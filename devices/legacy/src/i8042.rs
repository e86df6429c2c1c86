//! i8042 keyboard controller at ports 0x60 (data) and 0x64 (status/command), with no keyboard
//! or mouse attached, and PC/AT port B (0x61) beside it.
//!
//! Commands and bits as in the IBM PC/AT Technical Reference ("Keyboard Controller"), checked
//! against what Linux's `drivers/input/serio/i8042.c` sends while probing:
//!
//! - self-test (0xAA) answers 0x55, the keyboard interface test (0xAB) answers 0, the command
//!   byte reads (0x20) and writes (0x60) back, and 0xAD/0xAE and 0xA7/0xA8 toggle its disable
//!   bits, so the controller probes without errors;
//! - there is no mouse: the AUX loopback command (0xD3) is not implemented, so its data byte
//!   goes to the keyboard, and the AUX interface test (0xA9) reports a stuck clock line. Linux's
//!   `i8042_check_aux` then gives up on the AUX port at once, rather than after its 250 ms AUX
//!   interrupt test;
//! - there is no keyboard: every byte sent to it is answered with 0xFE (resend), which makes
//!   Linux's `atkbd_probe` fail its two commands without waiting for their timeouts (when the
//!   optional IRQ 1 is wired; without it, each command waits for its timeout);
//! - command 0xFE (pulse the reset line), any 0xF0..0xFF pulse that includes bit 0, or clearing
//!   bit 0 of the output port through 0xD1, resets the CPU: the device signals the VMM's reset
//!   eventfd.
//!
//! Port B (0x61): bits 0..3 (timer 2 gate, speaker, parity and channel check enables) are
//! stored; bit 4, the DRAM refresh toggle, flips on every read so calibration loops that wait
//! for it move on; bit 5, timer 2's output, reads as the gate bit, since there is no timer 2
//! here (KVM's in-kernel PIT claims this port when it exists).

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use bus::BusDevice;

const DATA: u64 = 0;
const PORT_B: u64 = 1;
const COMMAND: u64 = 4;

/// Status register bits.
const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
/// The last write went to the command port.
const STATUS_CMD: u8 = 0x08;
/// Keyboard not inhibited by the key lock; Linux warns "Keylock active" when clear.
const STATUS_UNLOCKED: u8 = 0x10;

/// Command byte (internal RAM byte 0) bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;
/// What PC firmware leaves: keyboard interrupt on, POST passed, AUX off, scancode translation.
const CTR_DEFAULT: u8 = CTR_KBD_INT | CTR_SYS | CTR_AUX_DISABLE | CTR_TRANSLATE;

/// Output port bit 0 is the CPU reset line (active low); bit 1 gates A20.
const OUTPUT_PORT_RESET: u8 = 0x01;
const OUTPUT_PORT_DEFAULT: u8 = 0x03;

const CMD_READ_RAM: u8 = 0x20;
const CMD_READ_RAM_LAST: u8 = 0x3f;
const CMD_WRITE_RAM: u8 = 0x60;
const CMD_WRITE_RAM_LAST: u8 = 0x7f;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_FIRST: u8 = 0xf0;

const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_OK: u8 = 0x00;
/// Interface test result "clock line stuck high": no device can be attached.
const INTERFACE_CLOCK_STUCK_HIGH: u8 = 0x02;
/// Keyboard reply asking for the last byte again; what the controller reports when no
/// keyboard answers.
const KBD_RESEND: u8 = 0xfe;

/// Depth of the output buffer (Linux's i8042 driver flushes at most 16 bytes).
const OUTPUT_DEPTH: usize = 16;

/// Make codes of Ctrl, Alt and Delete in scan code set 2.
pub const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

/// Port B bits 0..3 are writable.
const PORT_B_WRITABLE: u8 = 0x0f;
const PORT_B_TIMER2_GATE: u8 = 0x01;
const PORT_B_REFRESH: u8 = 0x10;
const PORT_B_TIMER2_OUT: u8 = 0x20;

/// The i8042 keyboard controller, with no devices behind it.
pub struct I8042 {
    reset_evt: EventFd,
    kbd_irq: Option<EventFd>,
    /// Internal RAM; byte 0 is the command byte.
    ram: [u8; 32],
    output_port: u8,
    /// A command written to 0x64 that takes its parameter from the next write to 0x60.
    pending: Option<u8>,
    /// Bytes waiting to be read from 0x60.
    output: VecDeque<u8>,
    last_write_was_command: bool,
    port_b: u8,
    refresh: bool,
}

impl I8042 {
    /// Data port; the status/command port is at `PORT_BASE + 4`.
    pub const PORT_BASE: u64 = 0x60;
    /// Number of ports from [`Self::PORT_BASE`] (0x61, port B, included; 0x62/0x63 unclaimed).
    pub const PORT_LEN: u64 = 5;
    /// The keyboard's ISA interrupt line.
    pub const KBD_IRQ: u32 = 1;

    /// A controller that signals `reset_evt` when the guest resets the CPU through it, and
    /// raises `kbd_irq`, if given, for keyboard data.
    pub fn new(reset_evt: EventFd, kbd_irq: Option<EventFd>) -> Self {
        let mut ram = [0u8; 32];
        ram[0] = CTR_DEFAULT;
        Self {
            reset_evt,
            kbd_irq,
            ram,
            output_port: OUTPUT_PORT_DEFAULT,
            pending: None,
            output: VecDeque::with_capacity(OUTPUT_DEPTH),
            last_write_was_command: false,
            port_b: 0,
            refresh: false,
        }
    }

    fn ctr(&self) -> u8 {
        self.ram[0]
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_UNLOCKED;
        if !self.output.is_empty() {
            status |= STATUS_OBF;
        }
        if self.ctr() & CTR_SYS != 0 {
            status |= STATUS_SYS;
        }
        if self.last_write_was_command {
            status |= STATUS_CMD;
        }
        status
    }

    fn raise_kbd_irq(&mut self) {
        if self.ctr() & CTR_KBD_INT == 0 {
            return;
        }
        if let Some(Err(e)) = self.kbd_irq.as_ref().map(|irq| irq.write(1)) {
            bus::guest_log!("i8042: cannot raise the keyboard interrupt: {e}");
        }
    }

    /// Answers a controller command: its reply replaces whatever was waiting.
    fn reply(&mut self, byte: u8) {
        self.output.clear();
        self.output.push_back(byte);
    }

    /// Queues a byte as coming from the keyboard.
    fn keyboard_byte(&mut self, byte: u8) {
        if self.output.len() < OUTPUT_DEPTH {
            self.output.push_back(byte);
        } else {
            log::debug!("i8042: output buffer full, dropping {byte:#04x}");
        }
        self.raise_kbd_irq();
    }

    /// Presses Ctrl-Alt-Del on the (otherwise absent) keyboard: the make codes of Ctrl, Alt and
    /// Delete in scan code set 2 (Ctrl 0x14, Alt 0x11, Delete 0xE0 0x71), as Firecracker's
    /// `SendCtrlAltDel` injects them, with one keyboard interrupt per byte.
    pub fn press_ctrl_alt_del(&mut self) {
        for byte in CTRL_ALT_DEL {
            self.keyboard_byte(byte);
        }
    }

    fn reset_cpu(&mut self) {
        log::info!("i8042: the guest reset the CPU");
        if let Err(e) = self.reset_evt.write(1) {
            log::error!("i8042: cannot signal the reset: {e}");
        }
    }

    fn command(&mut self, cmd: u8) {
        self.pending = None;
        match cmd {
            CMD_READ_RAM..=CMD_READ_RAM_LAST => self.reply(self.ram[usize::from(cmd & 0x1f)]),
            CMD_WRITE_RAM..=CMD_WRITE_RAM_LAST
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_BUFFER
            | CMD_WRITE_AUX => self.pending = Some(cmd),
            CMD_AUX_DISABLE => self.ram[0] |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.ram[0] &= !CTR_AUX_DISABLE,
            CMD_AUX_TEST => self.reply(INTERFACE_CLOCK_STUCK_HIGH),
            CMD_SELF_TEST => {
                self.ram[0] |= CTR_SYS;
                self.reply(SELF_TEST_OK);
            }
            CMD_KBD_TEST => self.reply(INTERFACE_OK),
            CMD_KBD_DISABLE => self.ram[0] |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.ram[0] &= !CTR_KBD_DISABLE,
            CMD_READ_OUTPUT_PORT => self.reply(self.output_port),
            // Pulse the output lines whose bit is clear; bit 0 is the reset line.
            CMD_PULSE_FIRST..=0xff => {
                if cmd & OUTPUT_PORT_RESET == 0 {
                    self.reset_cpu();
                }
            }
            _ => log::debug!("i8042: ignoring unsupported command {cmd:#04x}"),
        }
    }

    fn data(&mut self, byte: u8) {
        match self.pending.take() {
            Some(cmd @ CMD_WRITE_RAM..=CMD_WRITE_RAM_LAST) => {
                self.ram[usize::from(cmd & 0x1f)] = byte;
                // Enabling the interrupt with keyboard data waiting raises it.
                if cmd == CMD_WRITE_RAM && !self.output.is_empty() {
                    self.raise_kbd_irq();
                }
            }
            Some(CMD_WRITE_OUTPUT_PORT) => {
                self.output_port = byte;
                if byte & OUTPUT_PORT_RESET == 0 {
                    self.reset_cpu();
                }
            }
            Some(CMD_WRITE_KBD_BUFFER) => self.keyboard_byte(byte),
            Some(_) => log::debug!("i8042: no mouse for byte {byte:#04x}"),
            // A byte for the keyboard, which is not there.
            None => self.keyboard_byte(KBD_RESEND),
        }
    }

    fn read_port_b(&mut self) -> u8 {
        self.refresh = !self.refresh;
        let mut value = self.port_b;
        if self.refresh {
            value |= PORT_B_REFRESH;
        }
        if self.port_b & PORT_B_TIMER2_GATE != 0 {
            value |= PORT_B_TIMER2_OUT;
        }
        value
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data) {
            (DATA, [byte]) => {
                *byte = self.output.pop_front().unwrap_or(0);
                if !self.output.is_empty() {
                    self.raise_kbd_irq();
                }
            }
            (PORT_B, [byte]) => *byte = self.read_port_b(),
            (COMMAND, [byte]) => *byte = self.status(),
            (_, data) => {
                log::debug!(
                    "i8042: ignoring a {}-byte read at offset {offset}",
                    data.len()
                );
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (DATA, &[byte]) => {
                self.last_write_was_command = false;
                self.data(byte);
            }
            (PORT_B, &[byte]) => self.port_b = byte & PORT_B_WRITABLE,
            (COMMAND, &[cmd]) => {
                self.last_write_was_command = true;
                self.command(cmd);
            }
            (_, data) => {
                log::debug!(
                    "i8042: ignoring a {}-byte write at offset {offset}",
                    data.len()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rig {
        dev: I8042,
        reset: EventFd,
        irq: EventFd,
    }

    fn evt() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    fn rig() -> Rig {
        let (reset, irq) = (evt(), evt());
        let dev = I8042::new(reset.try_clone().unwrap(), Some(irq.try_clone().unwrap()));
        Rig { dev, reset, irq }
    }

    /// Pending count on `evt`, 0 if none (reading resets it).
    fn count(evt: &EventFd) -> u64 {
        evt.read().unwrap_or(0)
    }

    impl Rig {
        fn inb(&mut self, offset: u64) -> u8 {
            let mut data = [0u8];
            self.dev.read(offset, &mut data);
            data[0]
        }

        fn outb(&mut self, offset: u64, value: u8) {
            self.dev.write(offset, &[value]);
        }

        /// Runs a controller command the way Linux's `__i8042_command` does: command, then
        /// parameters, then one read per expected reply byte while OBF is set.
        fn command(&mut self, cmd: u8, params: &[u8], replies: usize) -> Vec<u8> {
            assert_eq!(self.inb(COMMAND) & 0x02, 0, "input buffer empty");
            self.outb(COMMAND, cmd);
            for &p in params {
                self.outb(DATA, p);
            }
            (0..replies)
                .map(|_| {
                    assert_ne!(self.inb(COMMAND) & STATUS_OBF, 0, "reply to {cmd:#x}");
                    self.inb(DATA)
                })
                .collect()
        }
    }

    #[test]
    fn initial_status_and_command_byte() {
        let mut r = rig();
        assert_eq!(r.inb(COMMAND), STATUS_UNLOCKED | STATUS_SYS);
        assert_eq!(r.command(CMD_READ_RAM, &[], 1), [0x65]);
        assert_eq!(
            r.inb(COMMAND),
            STATUS_UNLOCKED | STATUS_SYS | STATUS_CMD,
            "reply consumed, last write was a command"
        );
    }

    #[test]
    fn linux_probe_sequence_succeeds_without_aux() {
        let mut r = rig();
        // i8042_controller_selftest
        assert_eq!(r.command(CMD_SELF_TEST, &[], 1), [SELF_TEST_OK]);
        // i8042_controller_init: two equal CTR reads, then write it back without KBDINT.
        let ctr = r.command(CMD_READ_RAM, &[], 1)[0];
        assert_eq!(r.command(CMD_READ_RAM, &[], 1), [ctr]);
        let ctr = (ctr | CTR_KBD_DISABLE) & !CTR_KBD_INT;
        r.command(CMD_WRITE_RAM, &[ctr], 0);
        assert_eq!(r.inb(COMMAND) & STATUS_OBF, 0, "nothing to flush");
        // i8042_check_aux: the AUX loop's byte comes back without AUXDATA, then the AUX test
        // reports a fault, so Linux drops the AUX port.
        assert_eq!(r.command(0xd3, &[0x5a], 1), [KBD_RESEND]);
        assert_eq!(r.inb(COMMAND) & 0x20, 0);
        assert_eq!(
            r.command(CMD_AUX_TEST, &[], 1),
            [INTERFACE_CLOCK_STUCK_HIGH]
        );
        // i8042_setup_kbd / i8042_enable_kbd_port
        let ctr = (ctr & !CTR_KBD_DISABLE) | CTR_KBD_INT;
        r.command(CMD_WRITE_RAM, &[ctr], 0);
        assert_eq!(r.command(CMD_READ_RAM, &[], 1), [ctr]);
        assert_eq!(
            count(&r.irq),
            0,
            "controller replies raise no keyboard interrupt"
        );
    }

    #[test]
    fn interface_tests_and_enable_bits() {
        let mut r = rig();
        assert_eq!(r.command(CMD_KBD_TEST, &[], 1), [INTERFACE_OK]);
        r.command(CMD_KBD_DISABLE, &[], 0);
        assert_eq!(
            r.command(CMD_READ_RAM, &[], 1)[0] & CTR_KBD_DISABLE,
            CTR_KBD_DISABLE
        );
        r.command(CMD_KBD_ENABLE, &[], 0);
        assert_eq!(r.command(CMD_READ_RAM, &[], 1)[0] & CTR_KBD_DISABLE, 0);
        // i8042_toggle_aux reads the CTR back after each.
        r.command(CMD_AUX_ENABLE, &[], 0);
        assert_eq!(r.command(CMD_READ_RAM, &[], 1)[0] & CTR_AUX_DISABLE, 0);
        r.command(CMD_AUX_DISABLE, &[], 0);
        assert_eq!(
            r.command(CMD_READ_RAM, &[], 1)[0] & CTR_AUX_DISABLE,
            CTR_AUX_DISABLE
        );
    }

    #[test]
    fn internal_ram_and_output_port_read_back() {
        let mut r = rig();
        r.command(0x65, &[0xab], 0);
        assert_eq!(r.command(0x25, &[], 1), [0xab]);
        assert_eq!(
            r.command(CMD_READ_OUTPUT_PORT, &[], 1),
            [OUTPUT_PORT_DEFAULT]
        );
        r.command(CMD_WRITE_OUTPUT_PORT, &[0xdd], 0);
        assert_eq!(r.command(CMD_READ_OUTPUT_PORT, &[], 1), [0xdd]);
        assert_eq!(count(&r.reset), 0, "bit 0 stayed set");
    }

    #[test]
    fn keyboard_bytes_are_answered_with_resend_and_interrupt() {
        let mut r = rig();
        // atkbd_probe: GETID, then SETLEDS.
        r.outb(DATA, 0xf2);
        assert_eq!(count(&r.irq), 1);
        assert_eq!(r.inb(COMMAND) & STATUS_OBF, STATUS_OBF);
        assert_eq!(r.inb(DATA), KBD_RESEND);
        assert_eq!(r.inb(COMMAND) & STATUS_OBF, 0);
        assert_eq!(r.inb(DATA), 0, "empty buffer reads 0");

        // With the keyboard interrupt off, no interrupt; turning it on with data waiting
        // raises it.
        r.command(CMD_WRITE_RAM, &[CTR_DEFAULT & !CTR_KBD_INT], 0);
        r.outb(DATA, 0xed);
        assert_eq!(count(&r.irq), 0);
        r.command(CMD_WRITE_RAM, &[CTR_DEFAULT], 0);
        assert_eq!(count(&r.irq), 1);
        assert_eq!(r.inb(DATA), KBD_RESEND);
    }

    #[test]
    fn queued_keyboard_bytes_raise_one_interrupt_per_byte() {
        let mut r = rig();
        r.command(CMD_WRITE_KBD_BUFFER, &[0x1c], 0);
        r.command(CMD_WRITE_KBD_BUFFER, &[0x9c], 0);
        assert_eq!(count(&r.irq), 2);
        assert_eq!(r.inb(DATA), 0x1c);
        assert_eq!(count(&r.irq), 1, "more data waiting");
        assert_eq!(r.inb(DATA), 0x9c);
        assert_eq!(count(&r.irq), 0);
    }

    #[test]
    fn output_buffer_is_bounded_and_replies_replace_it() {
        let mut r = rig();
        for _ in 0..40 {
            r.outb(DATA, 0xf4);
        }
        let mut drained = 0;
        while r.inb(COMMAND) & STATUS_OBF != 0 {
            r.inb(DATA);
            drained += 1;
        }
        assert_eq!(drained, OUTPUT_DEPTH);

        r.outb(DATA, 0xf4);
        assert_eq!(r.command(CMD_SELF_TEST, &[], 1), [SELF_TEST_OK]);
        assert_eq!(r.inb(COMMAND) & STATUS_OBF, 0);
    }

    #[test]
    fn reset_paths_signal_the_reset_eventfd() {
        let mut r = rig();
        r.outb(COMMAND, 0xfe);
        assert_eq!(count(&r.reset), 1);
        r.outb(COMMAND, 0xff);
        assert_eq!(count(&r.reset), 0, "0xff pulses no line");
        r.outb(COMMAND, 0xf0);
        assert_eq!(count(&r.reset), 1);
        r.command(CMD_WRITE_OUTPUT_PORT, &[0x02], 0);
        assert_eq!(count(&r.reset), 1);
    }

    #[test]
    fn works_without_a_keyboard_interrupt() {
        let reset = evt();
        let mut dev = I8042::new(reset.try_clone().unwrap(), None);
        dev.write(DATA, &[0xf2]);
        let mut data = [0u8];
        dev.read(DATA, &mut data);
        assert_eq!(data, [KBD_RESEND]);
    }

    #[test]
    fn port_b_toggles_refresh_and_keeps_low_bits() {
        let mut r = rig();
        let reads: Vec<u8> = (0..4).map(|_| r.inb(PORT_B) & PORT_B_REFRESH).collect();
        assert_eq!(reads, [0x10, 0x00, 0x10, 0x00]);

        r.outb(PORT_B, 0xff);
        let value = r.inb(PORT_B);
        assert_eq!(value & 0x0f, 0x0f, "gate, speaker and check enables stored");
        assert_eq!(
            value & PORT_B_TIMER2_OUT,
            PORT_B_TIMER2_OUT,
            "follows the gate"
        );
        r.outb(PORT_B, 0x02);
        assert_eq!(r.inb(PORT_B) & (0x0f | PORT_B_TIMER2_OUT), 0x02);
    }

    #[test]
    fn odd_accesses_read_all_ones_and_change_nothing() {
        let mut r = rig();
        assert_eq!(r.inb(2), 0xff);
        assert_eq!(r.inb(3), 0xff);
        let mut wide = [0u8; 2];
        r.dev.read(COMMAND, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        r.dev.write(COMMAND, &[0xfe, 0xfe]);
        r.dev.write(3, &[0xfe]);
        r.dev.write(u64::MAX, &[0xfe]);
        assert_eq!(count(&r.reset), 0);
        assert_eq!(r.inb(COMMAND), STATUS_UNLOCKED | STATUS_SYS);
    }
}
