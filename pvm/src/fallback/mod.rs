//! Carrying out, in the VMM, instructions that KVM's instruction emulator gives up on.
//!
//! On `KVM_EXIT_INTERNAL_ERROR` with suberror `KVM_INTERNAL_ERROR_EMULATION`
//! (`Documentation/virt/kvm/api.rst`, "KVM_EXIT_INTERNAL_ERROR" and 7.27
//! "KVM_CAP_EXIT_ON_EMULATION_FAILURE"), RIP still points at the instruction. The fallback takes
//! its bytes from the exit (or reads them through the guest's page tables), decodes them with
//! iced-x86 in the vCPU's mode, carries the instruction out on the vCPU state
//! ([`guest::GuestCpu`]), advances RIP or injects the exception the instruction raises, and
//! lets the run loop re-enter `KVM_RUN`. The instructions are listed in [`insns::TABLE`]. Memory
//! operands go through the guest's own page tables ([`paging`]), with the CPU's access checks.
//!
//! What the fallback cannot carry out faults in the guest as the hardware would fault an
//! instruction it cannot run: #UD for an instruction it lacks or that does not decode, or whose
//! operand is not guest RAM (a device page, which only KVM's emulator could reach), #PF for
//! instruction bytes it cannot fetch. At CPL 3 always; at CPL 0-2 when the guest's IDT has a gate
//! for the vector, so that the guest kernel can handle it. Only a ring-0 failure the guest could
//! not handle, a KVM error, or an internal error other than an emulation failure stops the VM.
//!
//! Not modelled: segment limit checks outside 64-bit mode, single-step traps (RFLAGS.TF), the
//! interrupt shadow, and x87 last-instruction pointers (the control instructions handled here do
//! not update them anyway).

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod guest;
pub mod paging;

mod exec;
mod insns;

#[cfg(test)]
mod kvm_tests;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;

use iced_x86::{Decoder, DecoderError, DecoderOptions, Formatter, Instruction, IntelFormatter};
use kvm_bindings::{
    kvm_enable_cap, kvm_run, KVM_CAP_EXIT_ON_EMULATION_FAILURE, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use exec::{Abort, Completion, Exception, Exec, GP_VECTOR, PF_VECTOR, UD_VECTOR};
use guest::{Access, GuestCpu, KvmGuest};
use paging::{Paging, Translation, PF_PRESENT};

/// Longest x86 instruction.
const MAX_INSN_LEN: usize = 15;

/// Asks KVM to exit to the VMM on every emulation failure, with the instruction bytes, instead of
/// queueing a #UD for the guest (`KVM_CAP_EXIT_ON_EMULATION_FAILURE`). Returns whether KVM agreed.
pub fn enable_exit_on_emulation_failure(vm: &VmFd) -> bool {
    let cap = KVM_CAP_EXIT_ON_EMULATION_FAILURE;
    if vm.check_extension_raw(cap.into()) <= 0 {
        log::debug!("KVM does not offer KVM_CAP_EXIT_ON_EMULATION_FAILURE");
        return false;
    }
    let mut enable = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    enable.args[0] = 1;
    match vm.enable_cap(&enable) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("cannot enable KVM_CAP_EXIT_ON_EMULATION_FAILURE: {e}");
            false
        }
    }
}

/// The `internal` part of `kvm_run` after `KVM_EXIT_INTERNAL_ERROR`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InternalErrorExit {
    pub suberror: u32,
    /// Valid words of `data`.
    pub ndata: u32,
    pub data: [u64; 16],
}

impl InternalErrorExit {
    /// Copies the exit information out of `run`.
    pub fn from_run(run: &kvm_run) -> Self {
        // SAFETY: reading a union field of the `kvm_run` mapping: `internal` is plain integers,
        // valid for any bit pattern, and lies within the union, so the read is sound whatever
        // exit KVM reported (the caller only interprets it after KVM_EXIT_INTERNAL_ERROR).
        let internal = unsafe { run.__bindgen_anon_1.internal };
        InternalErrorExit {
            suberror: internal.suberror,
            ndata: internal.ndata,
            data: internal.data,
        }
    }

    /// Whether KVM's emulator failed on an instruction.
    pub fn is_emulation_failure(&self) -> bool {
        self.suberror == KVM_INTERNAL_ERROR_EMULATION
    }

    /// The instruction bytes KVM reported: `data[0]` is `flags`, `data[1..3]` hold `insn_size`
    /// and `insn_bytes[15]` (`struct kvm_run`, `emulation_failure`). Empty when absent.
    pub fn insn_bytes(&self) -> Vec<u8> {
        if !self.is_emulation_failure() || self.ndata < 3 {
            return Vec::new();
        }
        if self.data[0] & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) == 0 {
            return Vec::new();
        }
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&self.data[1].to_le_bytes());
        raw[8..].copy_from_slice(&self.data[2].to_le_bytes());
        let len = usize::from(raw[0]).min(MAX_INSN_LEN);
        raw[1..1 + len].to_vec()
    }

    /// An emulation failure carrying `bytes` (for tests and replaying logged failures).
    pub fn emulation_failure(bytes: &[u8]) -> Self {
        let mut exit = InternalErrorExit {
            suberror: KVM_INTERNAL_ERROR_EMULATION,
            ndata: 8,
            ..Default::default()
        };
        let len = bytes.len().min(MAX_INSN_LEN);
        exit.data[0] = KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES.into();
        let mut raw = [0x90u8; 16];
        raw[0] = len as u8;
        raw[1..1 + len].copy_from_slice(&bytes[..len]);
        exit.data[1] = u64::from_le_bytes(raw[..8].try_into().unwrap_or_default());
        exit.data[2] = u64::from_le_bytes(raw[8..].try_into().unwrap_or_default());
        exit
    }
}

/// Why the fallback could not carry out an instruction (the context is in [`FallbackError`]).
#[derive(Debug, thiserror::Error)]
pub enum FallbackErrorKind {
    #[error("KVM reported internal error suberror {0}, which is not an emulation failure")]
    NotEmulation(u32),
    #[error("the bytes do not decode as an x86 instruction")]
    Undecodable,
    #[error(
        "the instruction bytes cannot be read: its linear address {addr:#x} {}",
        fetch_fault(*.error_code)
    )]
    Unfetchable { addr: u64, error_code: u32 },
    #[error("the fallback does not handle this instruction")]
    NoHandler,
    #[error("the fallback does not handle {0}")]
    Unsupported(&'static str),
    #[error("{what} failed")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest-physical address {gpa:#x} is not guest RAM")]
    GuestMemory {
        gpa: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

fn fetch_fault(error_code: u32) -> &'static str {
    if error_code & PF_PRESENT == 0 {
        "is not mapped"
    } else {
        "may not be fetched from"
    }
}

impl FallbackErrorKind {
    /// The exception the guest gets instead, as the CPU would raise it for an instruction it
    /// cannot run; `None` for failures of KVM or the VMM, which no guest handler can mend.
    fn fault(&self) -> Option<Exception> {
        match self {
            FallbackErrorKind::NotEmulation(_) | FallbackErrorKind::Ioctl { .. } => None,
            FallbackErrorKind::Undecodable
            | FallbackErrorKind::NoHandler
            | FallbackErrorKind::Unsupported(_)
            | FallbackErrorKind::GuestMemory { .. } => Some(Exception::new(UD_VECTOR)),
            FallbackErrorKind::Unfetchable { addr, error_code } => {
                Some(Exception::page_fault_code(*addr, *error_code))
            }
        }
    }
}

/// An instruction the fallback could not carry out, with what is known of it: RIP, its bytes and
/// their disassembly (Intel syntax).
#[derive(Debug)]
pub struct FallbackError {
    pub rip: Option<u64>,
    pub bytes: Vec<u8>,
    pub disasm: Option<String>,
    pub kind: FallbackErrorKind,
}

impl fmt::Display for FallbackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.disasm {
            Some(disasm) => write!(f, "cannot emulate `{disasm}`")?,
            None => write!(f, "cannot emulate the instruction")?,
        }
        if self.bytes.is_empty() {
            write!(f, " (bytes unknown)")?;
        } else {
            write!(f, " ({})", hex(&self.bytes))?;
        }
        match self.rip {
            Some(rip) => write!(f, " at RIP {rip:#x}")?,
            None => write!(f, " at an unknown RIP")?,
        }
        write!(f, ": {}", self.kind)
    }
}

impl std::error::Error for FallbackError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.kind)
    }
}

/// `0f ae 54 24 04`.
fn hex(bytes: &[u8]) -> String {
    let parts: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(" ")
}

fn disassemble(insn: &Instruction) -> String {
    let mut formatter = IntelFormatter::new();
    formatter
        .options_mut()
        .set_space_after_operand_separator(true);
    let mut text = String::new();
    formatter.format(insn, &mut text);
    text
}

/// Decodes one instruction at `rip`; `None` when the bytes are not a whole valid instruction.
fn decode(bytes: &[u8], bitness: u32, rip: u64) -> Option<Instruction> {
    let mut decoder = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    (!insn.is_invalid() && decoder.last_error() == DecoderError::None).then_some(insn)
}

/// How many failures the fallback turns into guest faults with a warning each; later ones are
/// logged at debug level, so that a guest cannot fill the host's log.
const FAULT_WARNINGS: u32 = 8;

/// The per-vCPU fallback: counters, and what it learned of the vCPU.
#[derive(Debug, Default)]
pub struct InsnFallback {
    counts: BTreeMap<&'static str, u64>,
    mxcsr_mask: Option<u32>,
    faults_raised: u32,
}

impl InsnFallback {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many times each instruction was carried out, by mnemonic.
    pub fn counts(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.counts.iter().map(|(name, count)| (*name, *count))
    }

    /// Handles `KVM_EXIT_INTERNAL_ERROR` on `vcpu`. `Ok` means the vCPU may re-enter `KVM_RUN`:
    /// the instruction was carried out, or the exception it raises is injected.
    pub fn handle_internal_error(
        &mut self,
        vcpu: &mut VcpuFd,
        mem: &GuestMemoryMmap,
    ) -> Result<(), FallbackError> {
        let exit = InternalErrorExit::from_run(vcpu.get_kvm_run());
        self.handle(&mut KvmGuest::new(vcpu, mem), &exit)
    }

    /// [`Self::handle_internal_error`] on any [`GuestCpu`].
    pub fn handle(
        &mut self,
        cpu: &mut dyn GuestCpu,
        exit: &InternalErrorExit,
    ) -> Result<(), FallbackError> {
        let mut known = Known {
            rip: None,
            bytes: exit.insn_bytes(),
            insn: None,
        };
        match self.carry_out(cpu, exit, &mut known) {
            Ok(()) => Ok(()),
            Err(kind) => match kind.fault() {
                Some(exception) => self.raise_instead(cpu, exception, known.error(kind)),
                None => Err(known.error(kind)),
            },
        }
    }

    /// Raises `exception` in the guest for the instruction `error` describes, where the guest
    /// can take it (see the module documentation); otherwise returns `error`.
    fn raise_instead(
        &mut self,
        cpu: &mut dyn GuestCpu,
        exception: Exception,
        error: FallbackError,
    ) -> Result<(), FallbackError> {
        let raised = (|| -> Result<Option<u8>, FallbackErrorKind> {
            let regs = cpu.regs()?;
            let mut sregs = cpu.sregs()?;
            let paging = Paging::of(&regs, &sregs);
            if paging.cpl != 3 && !idt_delivers(cpu, &sregs, exception.vector)? {
                return Ok(None);
            }
            let mut events = cpu.vcpu_events()?;
            deliver(cpu, &mut sregs, &mut events, exception)?;
            Ok(Some(paging.cpl))
        })();
        let Ok(Some(cpl)) = raised else {
            return Err(error);
        };
        let name = match exception.vector {
            UD_VECTOR => "#UD raised",
            PF_VECTOR => "#PF raised",
            GP_VECTOR => "#GP raised",
            _ => "fault raised",
        };
        let count = self.counts.entry(name).or_insert(0);
        *count = count.saturating_add(1);
        self.faults_raised = self.faults_raised.saturating_add(1);
        let (vector, limit) = (exception.vector, FAULT_WARNINGS);
        if self.faults_raised <= limit {
            log::warn!("{error}; the guest gets vector {vector} at CPL {cpl} instead");
            if self.faults_raised == limit {
                log::warn!("further such faults of this vCPU are logged at debug level");
            }
        } else {
            log::debug!("{error}; the guest gets vector {vector} at CPL {cpl} instead");
        }
        Ok(())
    }

    /// Decodes and carries out the instruction, filling `known` as it learns more.
    fn carry_out(
        &mut self,
        cpu: &mut dyn GuestCpu,
        exit: &InternalErrorExit,
        known: &mut Known,
    ) -> Result<(), FallbackErrorKind> {
        let regs = cpu.regs()?;
        known.rip = Some(regs.rip);
        if !exit.is_emulation_failure() {
            return Err(FallbackErrorKind::NotEmulation(exit.suberror));
        }
        let sregs = cpu.sregs()?;
        let bitness = exec::bitness(&sregs, regs.rflags);
        let insn = match decode(&known.bytes, bitness, regs.rip) {
            Some(insn) => insn,
            None => {
                let linear = if bitness == 64 {
                    regs.rip
                } else {
                    sregs.cs.base.wrapping_add(regs.rip) & 0xffff_ffff
                };
                let (bytes, fault) = fetch(cpu, linear, &Paging::of(&regs, &sregs))?;
                known.bytes = bytes;
                match (decode(&known.bytes, bitness, regs.rip), fault) {
                    (Some(insn), _) => insn,
                    (None, Some(fault)) => return Err(fault),
                    (None, None) => return Err(FallbackErrorKind::Undecodable),
                }
            }
        };
        known.bytes.truncate(insn.len());
        known.insn = Some(insn);
        let entry = insns::lookup(insn.code()).ok_or(FallbackErrorKind::NoHandler)?;

        // Without KVM_CAP_EXIT_ON_EMULATION_FAILURE, KVM queues a #UD along with the exit.
        let mut events = cpu.vcpu_events()?;
        let stale_ud = (events.exception.injected != 0 || events.exception.pending != 0)
            && events.exception.nr == UD_VECTOR;
        if stale_ud {
            events.exception = Default::default();
        }

        let mut exec = Exec::new(cpu, regs, sregs, &mut self.mxcsr_mask);
        let raised = match (entry.run)(&mut exec, &insn) {
            Ok(completion) => {
                exec.regs.rip = match bitness {
                    64 => insn.next_ip(),
                    32 => insn.next_ip() & 0xffff_ffff,
                    _ => insn.next_ip() & 0xffff,
                };
                commit(&mut exec)?;
                match completion {
                    Completion::Next => None,
                    Completion::NextThenRaise(exception) => Some(exception),
                }
            }
            Err(Abort::Raise(exception)) => Some(exception),
            Err(Abort::Fail(kind)) => return Err(kind),
        };
        match raised {
            Some(exception) => inject(&mut exec, &mut events, exception)?,
            None if stale_ud => exec.cpu.set_vcpu_events(&events)?,
            None => {}
        }

        let count = self.counts.entry(entry.name).or_insert(0);
        *count = count.saturating_add(1);
        if *count == 1 {
            log::info!(
                "carrying out `{}` ({}) at RIP {:#x} for KVM's emulator (first {})",
                disassemble(&insn),
                hex(&known.bytes),
                regs.rip,
                entry.name
            );
        }
        if let Some(exception) = raised {
            log::debug!(
                "{} at RIP {:#x} raises vector {}",
                entry.name,
                regs.rip,
                exception.vector
            );
        }
        Ok(())
    }
}

/// What is known of the instruction being handled, for the error message.
struct Known {
    rip: Option<u64>,
    bytes: Vec<u8>,
    insn: Option<Instruction>,
}

impl Known {
    fn error(&self, kind: FallbackErrorKind) -> FallbackError {
        FallbackError {
            rip: self.rip,
            bytes: self.bytes.clone(),
            disasm: self.insn.as_ref().map(disassemble),
            kind,
        }
    }
}

/// Reads up to 15 instruction bytes at linear `addr`, stopping at the first page that may not be
/// fetched from; returns the bytes and that page's fault, if the walk met one.
fn fetch(
    cpu: &mut dyn GuestCpu,
    addr: u64,
    paging: &Paging,
) -> Result<(Vec<u8>, Option<FallbackErrorKind>), FallbackErrorKind> {
    let mut bytes = Vec::with_capacity(MAX_INSN_LEN);
    let mut fault = None;
    for (linear, chunk) in exec::page_chunks(addr, MAX_INSN_LEN) {
        let gpa = match cpu.translate(linear, Access::Fetch, paging)? {
            Translation::Mapped(gpa) => gpa,
            Translation::Fault(error_code) => {
                fault = Some(FallbackErrorKind::Unfetchable {
                    addr: linear,
                    error_code,
                });
                break;
            }
        };
        let start = bytes.len();
        bytes.resize(start + chunk, 0);
        cpu.read_phys(gpa, &mut bytes[start..])?;
    }
    if bytes.is_empty() {
        return Err(fault.unwrap_or(FallbackErrorKind::Undecodable));
    }
    Ok((bytes, fault))
}

/// Whether the guest's IDT has a present interrupt or trap gate for `vector` (Intel SDM vol. 3A,
/// 6.10 "Interrupt Descriptor Table", 6.14.1 "64-Bit Mode IDT"); in real mode, whether the IVT
/// reaches it. The gate is read through the guest's page tables as a supervisor access.
fn idt_delivers(
    cpu: &mut dyn GuestCpu,
    sregs: &kvm_bindings::kvm_sregs,
    vector: u8,
) -> Result<bool, FallbackErrorKind> {
    let vector = u64::from(vector);
    if sregs.cr0 & exec::CR0_PE == 0 {
        return Ok(vector * 4 + 3 <= u64::from(sregs.idt.limit));
    }
    let long = sregs.efer & (1 << 10) != 0;
    let gate_size = if long { 16 } else { 8 };
    if vector * gate_size + gate_size - 1 > u64::from(sregs.idt.limit) {
        return Ok(false);
    }
    let mut linear = sregs.idt.base.wrapping_add(vector * gate_size + 4);
    if !long {
        linear &= 0xffff_ffff;
    }
    let supervisor = Paging {
        cpl: 0,
        ac: true,
        ..Paging::of(&kvm_bindings::kvm_regs::default(), sregs)
    };
    let Translation::Mapped(gpa) = cpu.translate(linear, Access::Read, &supervisor)? else {
        return Ok(false);
    };
    let mut high = [0u8; 4];
    if cpu.read_phys(gpa, &mut high).is_err() {
        return Ok(false);
    }
    let high = u32::from_le_bytes(high);
    let present = high & (1 << 15) != 0;
    let kind = (high >> 8) & 0xf;
    let gate = if long {
        matches!(kind, 0xe | 0xf)
    } else {
        matches!(kind, 0x5 | 0x6 | 0x7 | 0xe | 0xf)
    };
    Ok(present && gate)
}

/// Writes back what the instruction changed.
fn commit(exec: &mut Exec<'_>) -> Result<(), FallbackErrorKind> {
    exec.cpu.set_regs(&exec.regs)?;
    if let Some(fpu) = exec.dirty_fpu() {
        let fpu = *fpu;
        exec.cpu.set_fpu(&fpu)?;
    }
    Ok(())
}

/// Delivers `exception` on the next entry (`KVM_SET_VCPU_EVENTS`), with CR2 for a #PF.
fn inject(
    exec: &mut Exec<'_>,
    events: &mut kvm_bindings::kvm_vcpu_events,
    exception: Exception,
) -> Result<(), FallbackErrorKind> {
    deliver(exec.cpu, &mut exec.sregs, events, exception)
}

/// [`inject`] on a vCPU whose system registers are `sregs`.
fn deliver(
    cpu: &mut dyn GuestCpu,
    sregs: &mut kvm_bindings::kvm_sregs,
    events: &mut kvm_bindings::kvm_vcpu_events,
    exception: Exception,
) -> Result<(), FallbackErrorKind> {
    if let Some(cr2) = exception.cr2 {
        sregs.cr2 = cr2;
        cpu.set_sregs(sregs)?;
    }
    events.exception.injected = 1;
    events.exception.pending = 0;
    events.exception.nr = exception.vector;
    events.exception.has_error_code = u8::from(exception.error_code.is_some());
    events.exception.error_code = exception.error_code.unwrap_or(0);
    cpu.set_vcpu_events(events)
}
