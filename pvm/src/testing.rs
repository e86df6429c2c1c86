//! Test doubles: a fake vCPU for the instruction fallback's tests (64-bit ring 0 by default, with
//! 64 KiB of identity-mapped memory). Built for tests and with the `fuzzing` feature.

use std::collections::BTreeSet;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events};

use crate::fallback::guest::{Access, GuestCpu};
use crate::fallback::paging::{Paging, Translation, PF_FETCH, PF_PRESENT, PF_USER, PF_WRITE};
use crate::fallback::FallbackErrorKind;

pub const MEM_SIZE: usize = 0x10000;

pub struct FakeCpu {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    pub events: kvm_vcpu_events,
    pub xcr0: u64,
    pub mxcsr_mask: u32,
    pub mem: Vec<u8>,
    /// Pages (linear address >> 12) that translate only for reading.
    pub read_only: BTreeSet<u64>,
    /// Pages (linear address >> 12) that translate to guest-physical addresses past the fake
    /// RAM, as device (MMIO) pages do.
    pub unbacked: BTreeSet<u64>,
    /// How many times each setter ran.
    pub set_regs_calls: usize,
    pub set_fpu_calls: usize,
    pub set_events_calls: usize,
}

impl FakeCpu {
    /// Long mode, CR0.PE|MP|ET|NE|WP|PG, CR4.PAE|OSFXSR|OSXMMEXCPT|OSXSAVE, RIP 0x1000.
    pub fn new() -> Self {
        let code = kvm_segment {
            limit: 0xffff_ffff,
            selector: 8,
            type_: 11,
            present: 1,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: 0x10,
            type_: 3,
            db: 1,
            l: 0,
            ..code
        };
        let sregs = kvm_sregs {
            cs: code,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            cr0: 0x8001_0033,
            cr4: (1 << 5) | (1 << 9) | (1 << 10) | (1 << 18),
            efer: (1 << 8) | (1 << 10),
            ..Default::default()
        };
        FakeCpu {
            regs: kvm_regs {
                rip: 0x1000,
                rsp: 0x8000,
                rflags: 2,
                ..Default::default()
            },
            sregs,
            fpu: kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            },
            events: kvm_vcpu_events::default(),
            xcr0: 0x7,
            mxcsr_mask: 0xffff,
            mem: vec![0; MEM_SIZE],
            read_only: BTreeSet::new(),
            unbacked: BTreeSet::new(),
            set_regs_calls: 0,
            set_fpu_calls: 0,
            set_events_calls: 0,
        }
    }

    pub fn put(&mut self, addr: u64, bytes: &[u8]) {
        let start = addr as usize;
        self.mem[start..start + bytes.len()].copy_from_slice(bytes);
    }

    /// Puts an IDT of 256 64-bit gates at `base`, each an interrupt gate that is present when
    /// `present` says so.
    pub fn with_idt(mut self, base: u64, present: impl Fn(u8) -> bool) -> Self {
        self.sregs.idt.base = base;
        self.sregs.idt.limit = 256 * 16 - 1;
        for vector in 0..=255u8 {
            let flags: u32 = if present(vector) { 0x8e00 } else { 0x0e00 };
            self.put(base + u64::from(vector) * 16 + 4, &flags.to_le_bytes());
        }
        self
    }

    /// Runs at CPL 3 (64-bit user code and data selectors).
    pub fn in_ring3(mut self) -> Self {
        self.sregs.cs.selector = 0x33;
        self.sregs.cs.dpl = 3;
        self.sregs.ss.selector = 0x2b;
        self.sregs.ss.dpl = 3;
        self
    }

    pub fn get(&self, addr: u64, len: usize) -> &[u8] {
        let start = addr as usize;
        &self.mem[start..start + len]
    }
}

impl Default for FakeCpu {
    fn default() -> Self {
        Self::new()
    }
}

fn bad_gpa(gpa: u64) -> FallbackErrorKind {
    FallbackErrorKind::GuestMemory {
        gpa,
        source: vm_memory::GuestMemoryError::InvalidGuestAddress(vm_memory::GuestAddress(gpa)),
    }
}

impl GuestCpu for FakeCpu {
    fn regs(&mut self) -> Result<kvm_regs, FallbackErrorKind> {
        Ok(self.regs)
    }
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), FallbackErrorKind> {
        self.set_regs_calls += 1;
        self.regs = *regs;
        Ok(())
    }
    fn sregs(&mut self) -> Result<kvm_sregs, FallbackErrorKind> {
        Ok(self.sregs)
    }
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), FallbackErrorKind> {
        self.sregs = *sregs;
        Ok(())
    }
    fn fpu(&mut self) -> Result<kvm_fpu, FallbackErrorKind> {
        Ok(self.fpu)
    }
    fn set_fpu(&mut self, fpu: &kvm_fpu) -> Result<(), FallbackErrorKind> {
        self.set_fpu_calls += 1;
        self.fpu = *fpu;
        Ok(())
    }
    fn vcpu_events(&mut self) -> Result<kvm_vcpu_events, FallbackErrorKind> {
        Ok(self.events)
    }
    fn set_vcpu_events(&mut self, events: &kvm_vcpu_events) -> Result<(), FallbackErrorKind> {
        self.set_events_calls += 1;
        self.events = *events;
        Ok(())
    }
    fn xcr0(&mut self) -> Result<u64, FallbackErrorKind> {
        Ok(self.xcr0)
    }
    fn mxcsr_mask(&mut self) -> Result<u32, FallbackErrorKind> {
        Ok(self.mxcsr_mask)
    }
    /// Identity mapping of [`MEM_SIZE`] bytes, user-accessible and executable, writable but for
    /// the `read_only` pages.
    fn translate(
        &mut self,
        gva: u64,
        access: Access,
        paging: &Paging,
    ) -> Result<Translation, FallbackErrorKind> {
        let mut code = 0;
        if access == Access::Write {
            code |= PF_WRITE;
        }
        if paging.cpl == 3 {
            code |= PF_USER;
        }
        if access == Access::Fetch {
            code |= PF_FETCH;
        }
        if self.unbacked.contains(&(gva >> 12)) {
            return Ok(Translation::Mapped(MEM_SIZE as u64 + gva));
        }
        if gva >= MEM_SIZE as u64 {
            return Ok(Translation::Fault(code));
        }
        if access == Access::Write && self.read_only.contains(&(gva >> 12)) {
            return Ok(Translation::Fault(code | PF_PRESENT));
        }
        Ok(Translation::Mapped(gva))
    }
    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), FallbackErrorKind> {
        let start = usize::try_from(gpa).map_err(|_| bad_gpa(gpa))?;
        let src = self
            .mem
            .get(start..start + buf.len())
            .ok_or_else(|| bad_gpa(gpa))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_phys(&mut self, gpa: u64, buf: &[u8]) -> Result<(), FallbackErrorKind> {
        let start = usize::try_from(gpa).map_err(|_| bad_gpa(gpa))?;
        let dst = self
            .mem
            .get_mut(start..start + buf.len())
            .ok_or_else(|| bad_gpa(gpa))?;
        dst.copy_from_slice(buf);
        Ok(())
    }
}
