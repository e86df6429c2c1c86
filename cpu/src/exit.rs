//! Decoding of `KVM_RUN` exits into device accesses and vCPU decisions.
//!
//! The decoder knows nothing of devices: port and MMIO accesses go to a [`VmOps`] implementation
//! that the VMM provides (its buses). Keeping this a free function over a `VcpuExit` makes it
//! testable and fuzzable without KVM (see `fuzz_exit`).

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::VcpuExit;

/// Guest accesses that leave the vCPU: what the VMM's buses answer.
pub trait VmOps: Send + Sync {
    /// An `in` instruction: fill `data` (1, 2 or 4 bytes, or more for string I/O).
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// An `out` instruction.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// A load from an address no memory slot backs.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// A store to an address no memory slot backs.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// Why a vCPU stopped running the guest for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked for a reset (or triple-faulted): the VM ends normally.
    Reset,
    /// The guest powered off.
    PowerOff,
    /// The guest crashed (a paravirtual crash event).
    Crash,
    /// The VMM asked the vCPU to stop.
    Requested,
    /// KVM could not run the guest: the message names the exit.
    Failed(String),
}

impl VcpuStop {
    /// Whether this stop is a normal end of the VM (exit status 0 for the VMM).
    pub fn is_clean(&self) -> bool {
        !matches!(self, VcpuStop::Failed(_))
    }
}

/// What the run loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Resume,
    /// The run was interrupted (a kick): check for a stop or pause request, then resume.
    Interrupted,
    /// KVM's emulator failed on an instruction: the fallback emulator gets a go.
    EmulationFailure,
    /// Leave the run loop.
    Stop(VcpuStop),
}

/// Decodes one exit and performs the device access it stands for.
pub fn handle_exit(exit: VcpuExit<'_>, ops: &dyn VmOps) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            ops.pio_read(port, data);
            ExitAction::Resume
        }
        VcpuExit::IoOut(port, data) => {
            ops.pio_write(port, data);
            ExitAction::Resume
        }
        VcpuExit::MmioRead(addr, data) => {
            ops.mmio_read(addr, data);
            ExitAction::Resume
        }
        VcpuExit::MmioWrite(addr, data) => {
            ops.mmio_write(addr, data);
            ExitAction::Resume
        }
        VcpuExit::Intr => ExitAction::Interrupted,
        // With the in-kernel irqchip KVM handles HLT itself; an exit here means the guest halted with
        // nothing left that could wake it.
        VcpuExit::Hlt => ExitAction::Stop(VcpuStop::PowerOff),
        // A triple fault: on a PC this resets the machine, which for us ends the VM.
        VcpuExit::Shutdown => ExitAction::Stop(VcpuStop::Reset),
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_RESET => ExitAction::Stop(VcpuStop::Reset),
            KVM_SYSTEM_EVENT_SHUTDOWN => ExitAction::Stop(VcpuStop::PowerOff),
            KVM_SYSTEM_EVENT_CRASH => ExitAction::Stop(VcpuStop::Crash),
            other => ExitAction::Stop(VcpuStop::Failed(format!(
                "unknown KVM system event {other}"
            ))),
        },
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Stop(VcpuStop::Failed(format!(
            "KVM could not enter the guest (hardware entry failure reason {reason:#x} on host cpu {cpu})"
        ))),
        VcpuExit::InternalError => ExitAction::EmulationFailure,
        // Spurious exits that need nothing from us.
        VcpuExit::IrqWindowOpen | VcpuExit::IoapicEoi(_) => ExitAction::Resume,
        other => ExitAction::Stop(VcpuStop::Failed(format!(
            "unexpected KVM exit {other:?}"
        ))),
    }
}

/// An exit described by plain bytes, as a fuzzer or a replayed crash input produces it.
///
/// Byte 0 picks the kind (port in/out, MMIO read/write), bytes 1..9 the address, byte 9 the
/// access size (1..=8; the rest are mapped into that range), and the bytes after that are the data
/// of a write. The exit then goes through [`handle_exit`], exactly as one from `KVM_RUN` would.
pub fn fuzz_exit(bytes: &[u8], ops: &dyn VmOps) -> ExitAction {
    let kind = bytes.first().copied().unwrap_or(0);
    let mut addr = [0u8; 8];
    for (dst, src) in addr.iter_mut().zip(bytes.iter().skip(1)) {
        *dst = *src;
    }
    let addr = u64::from_le_bytes(addr);
    let size = usize::from(bytes.get(9).copied().unwrap_or(1) % 8) + 1;
    let mut data = [0u8; 8];
    for (dst, src) in data.iter_mut().zip(bytes.iter().skip(10)) {
        *dst = *src;
    }
    let data = &mut data[..size];
    let exit = match kind % 4 {
        0 => VcpuExit::IoIn(addr as u16, data),
        1 => VcpuExit::IoOut(addr as u16, data),
        2 => VcpuExit::MmioRead(addr, data),
        _ => VcpuExit::MmioWrite(addr, data),
    };
    handle_exit(exit, ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        log: Mutex<Vec<String>>,
    }

    impl VmOps for Recorder {
        fn pio_read(&self, port: u16, data: &mut [u8]) {
            data.fill(0xab);
            self.log
                .lock()
                .unwrap()
                .push(format!("in {port:#x} {}", data.len()));
        }
        fn pio_write(&self, port: u16, data: &[u8]) {
            self.log
                .lock()
                .unwrap()
                .push(format!("out {port:#x} {data:?}"));
        }
        fn mmio_read(&self, addr: u64, data: &mut [u8]) {
            data.fill(0xcd);
            self.log
                .lock()
                .unwrap()
                .push(format!("rd {addr:#x} {}", data.len()));
        }
        fn mmio_write(&self, addr: u64, data: &[u8]) {
            self.log
                .lock()
                .unwrap()
                .push(format!("wr {addr:#x} {data:?}"));
        }
    }

    #[test]
    fn port_reads_are_answered_by_the_bus() {
        let ops = Recorder::default();
        let mut data = [0u8; 2];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x71, &mut data), &ops),
            ExitAction::Resume
        );
        assert_eq!(data, [0xab, 0xab]);
        assert_eq!(ops.log.lock().unwrap().as_slice(), ["in 0x71 2"]);
    }

    #[test]
    fn port_and_mmio_writes_reach_the_bus() {
        let ops = Recorder::default();
        handle_exit(VcpuExit::IoOut(0x3f8, b"A"), &ops);
        handle_exit(VcpuExit::MmioWrite(0xd000_0000, &[1, 2, 3, 4]), &ops);
        let mut data = [0u8; 8];
        handle_exit(VcpuExit::MmioRead(0xfeb0_0000, &mut data), &ops);
        assert_eq!(data, [0xcd; 8]);
        assert_eq!(
            ops.log.lock().unwrap().as_slice(),
            [
                "out 0x3f8 [65]",
                "wr 0xd0000000 [1, 2, 3, 4]",
                "rd 0xfeb00000 8"
            ]
        );
    }

    #[test]
    fn guest_ending_exits_stop_cleanly() {
        let ops = Recorder::default();
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &ops),
            ExitAction::Stop(VcpuStop::Reset)
        );
        assert_eq!(
            handle_exit(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[]), &ops),
            ExitAction::Stop(VcpuStop::PowerOff)
        );
        assert_eq!(
            handle_exit(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]), &ops),
            ExitAction::Stop(VcpuStop::Reset)
        );
        assert!(VcpuStop::Reset.is_clean());
    }

    #[test]
    fn kvm_failures_stop_with_a_message() {
        let ops = Recorder::default();
        match handle_exit(VcpuExit::FailEntry(0x21, 1), &ops) {
            ExitAction::Stop(stop @ VcpuStop::Failed(_)) => {
                assert!(!stop.is_clean());
                assert!(format!("{stop:?}").contains("0x21"));
            }
            other => panic!("unexpected action {other:?}"),
        }
        assert_eq!(
            handle_exit(VcpuExit::InternalError, &ops),
            ExitAction::EmulationFailure
        );
        assert!(matches!(
            handle_exit(VcpuExit::Exception, &ops),
            ExitAction::Stop(VcpuStop::Failed(_))
        ));
    }

    #[test]
    fn interrupted_runs_are_reported() {
        assert_eq!(
            handle_exit(VcpuExit::Intr, &Recorder::default()),
            ExitAction::Interrupted
        );
    }

    #[test]
    fn fuzz_bytes_decode_to_bounded_accesses() {
        let ops = Recorder::default();
        // kind 3 = MMIO write, address 0x1000, size byte 3 -> 4 bytes.
        let bytes = [3, 0x00, 0x10, 0, 0, 0, 0, 0, 0, 3, 9, 8, 7, 6, 5];
        assert_eq!(fuzz_exit(&bytes, &ops), ExitAction::Resume);
        assert_eq!(
            ops.log.lock().unwrap().as_slice(),
            ["wr 0x1000 [9, 8, 7, 6]"]
        );
        // Short and empty inputs are still valid exits.
        assert_eq!(fuzz_exit(&[], &ops), ExitAction::Resume);
        assert_eq!(fuzz_exit(&[1], &ops), ExitAction::Resume);
    }
}
