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

/// Decodes one exit and performs the device access it stands for. A port I/O exit is one access
/// of all its data; see [`handle_exit_sized`] for string I/O.
pub fn handle_exit(exit: VcpuExit<'_>, ops: &dyn VmOps) -> ExitAction {
    handle_exit_sized(exit, None, ops)
}

/// [`handle_exit`], with the element size of a port I/O exit (`kvm_run.io.size`: 1, 2 or 4).
///
/// For string I/O (`rep ins`/`rep outs` and their word and doubleword forms) KVM reports one exit
/// whose data holds `io.count` elements (Documentation/virt/kvm/api.rst, `KVM_EXIT_IO`). The
/// hardware makes one port access per element, so the bus sees `count` accesses of `size` bytes
/// each, in order: a `rep insb` from a UART register reads the register each time, rather than
/// one oversized read that no device answers.
pub fn handle_exit_sized(
    exit: VcpuExit<'_>,
    io_size: Option<usize>,
    ops: &dyn VmOps,
) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            for element in data.chunks_mut(element_size(io_size, data.len())) {
                ops.pio_read(port, element);
            }
            ExitAction::Resume
        }
        VcpuExit::IoOut(port, data) => {
            for element in data.chunks(element_size(io_size, data.len())) {
                ops.pio_write(port, element);
            }
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

/// The size of one port access in `len` bytes of exit data: `size` when it is a port access width
/// (1, 2 or 4), otherwise the whole data as one access.
fn element_size(size: Option<usize>, len: usize) -> usize {
    match size {
        Some(size @ (1 | 2 | 4)) if size < len => size,
        _ => len.max(1),
    }
}

/// An exit described by plain bytes, as a fuzzer or a replayed crash input produces it.
///
/// Byte 0 picks the kind (port in/out, MMIO read/write), bytes 1..9 the address, byte 9 the
/// access size (bits 2:0, 1..=8) and the element size of string port I/O (bits 5:4: none, 1, 2
/// or 4 bytes), and the bytes after that are the data of a write. The exit then goes through
/// [`handle_exit_sized`], exactly as one from `KVM_RUN` would.
pub fn fuzz_exit(bytes: &[u8], ops: &dyn VmOps) -> ExitAction {
    let kind = bytes.first().copied().unwrap_or(0);
    let mut addr = [0u8; 8];
    for (dst, src) in addr.iter_mut().zip(bytes.iter().skip(1)) {
        *dst = *src;
    }
    let addr = u64::from_le_bytes(addr);
    let size_byte = bytes.get(9).copied().unwrap_or(1);
    let size = usize::from(size_byte % 8) + 1;
    let element = [None, Some(1), Some(2), Some(4)][usize::from((size_byte >> 4) & 3)];
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
    handle_exit_sized(exit, element, ops)
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
    fn string_input_reads_the_port_once_per_element() {
        let ops = Recorder::default();
        // rep insb, count 4: four one-byte reads, each answered by the port.
        let mut data = [0u8; 4];
        assert_eq!(
            handle_exit_sized(VcpuExit::IoIn(0x3ff, &mut data), Some(1), &ops),
            ExitAction::Resume
        );
        assert_eq!(data, [0xab; 4]);
        // rep insw, count 2.
        let mut data = [0u8; 4];
        handle_exit_sized(VcpuExit::IoIn(0x1f0, &mut data), Some(2), &ops);
        assert_eq!(
            ops.log.lock().unwrap().as_slice(),
            [
                "in 0x3ff 1",
                "in 0x3ff 1",
                "in 0x3ff 1",
                "in 0x3ff 1",
                "in 0x1f0 2",
                "in 0x1f0 2"
            ]
        );
    }

    #[test]
    fn string_output_writes_each_element_in_order() {
        let ops = Recorder::default();
        handle_exit_sized(VcpuExit::IoOut(0x3f8, b"abc"), Some(1), &ops);
        handle_exit_sized(
            VcpuExit::IoOut(0xcfc, &[1, 2, 3, 4, 5, 6, 7, 8]),
            Some(4),
            &ops,
        );
        assert_eq!(
            ops.log.lock().unwrap().as_slice(),
            [
                "out 0x3f8 [97]",
                "out 0x3f8 [98]",
                "out 0x3f8 [99]",
                "out 0xcfc [1, 2, 3, 4]",
                "out 0xcfc [5, 6, 7, 8]"
            ]
        );
    }

    #[test]
    fn single_port_accesses_stay_whole() {
        let ops = Recorder::default();
        // outl: one element of 4 bytes; an unknown size or one that is no port width is one
        // access of the whole data, as is MMIO whatever the size.
        handle_exit_sized(VcpuExit::IoOut(0xcf8, &[0, 0, 0, 0x80]), Some(4), &ops);
        handle_exit_sized(VcpuExit::IoOut(0x80, &[1, 2]), None, &ops);
        handle_exit_sized(VcpuExit::IoOut(0x80, &[1, 2, 3]), Some(3), &ops);
        handle_exit_sized(VcpuExit::IoOut(0x80, &[]), Some(1), &ops);
        handle_exit_sized(VcpuExit::MmioWrite(0x1000, &[1, 2]), Some(1), &ops);
        assert_eq!(
            ops.log.lock().unwrap().as_slice(),
            [
                "out 0xcf8 [0, 0, 0, 128]",
                "out 0x80 [1, 2]",
                "out 0x80 [1, 2, 3]",
                "wr 0x1000 [1, 2]"
            ]
        );
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
        // Port write of 4 bytes (size byte 3) as string I/O of 2-byte elements (bits 5:4 = 2).
        let bytes = [1, 0xf0, 0x01, 0, 0, 0, 0, 0, 0, 0x23, 1, 2, 3, 4];
        fuzz_exit(&bytes, &ops);
        assert_eq!(
            ops.log.lock().unwrap()[1..],
            ["out 0x1f0 [1, 2]", "out 0x1f0 [3, 4]"]
        );
        // Short and empty inputs are still valid exits.
        assert_eq!(fuzz_exit(&[], &ops), ExitAction::Resume);
        assert_eq!(fuzz_exit(&[1], &ops), ExitAction::Resume);
    }
}
