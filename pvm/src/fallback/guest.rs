//! The vCPU state and guest memory the fallback works on, behind a trait so that every
//! instruction can be tested against a fake CPU without KVM.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xsave};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::paging::{self, Paging, Translation};
use super::FallbackErrorKind;

/// XCR0 with only x87 and SSE state enabled.
pub const XCR0_X87_SSE: u64 = 0x3;
/// The MXCSR_MASK to assume when the FXSAVE image holds 0 (Intel SDM vol. 1, 11.6.6).
pub const DEFAULT_MXCSR_MASK: u32 = 0xffbf;

/// The kind of access a linear address is translated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Fetch,
}

/// What the fallback needs from a vCPU and its guest's memory.
pub trait GuestCpu {
    fn regs(&mut self) -> Result<kvm_regs, FallbackErrorKind>;
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), FallbackErrorKind>;
    fn sregs(&mut self) -> Result<kvm_sregs, FallbackErrorKind>;
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), FallbackErrorKind>;
    fn fpu(&mut self) -> Result<kvm_fpu, FallbackErrorKind>;
    fn set_fpu(&mut self, fpu: &kvm_fpu) -> Result<(), FallbackErrorKind>;
    fn vcpu_events(&mut self) -> Result<kvm_vcpu_events, FallbackErrorKind>;
    fn set_vcpu_events(&mut self, events: &kvm_vcpu_events) -> Result<(), FallbackErrorKind>;
    /// The guest's XCR0.
    fn xcr0(&mut self) -> Result<u64, FallbackErrorKind>;
    /// The MXCSR bits the guest may set (MXCSR_MASK of its FXSAVE image).
    fn mxcsr_mask(&mut self) -> Result<u32, FallbackErrorKind>;
    /// Where linear address `gva` leads for `access` under `paging`: by default, a walk of the
    /// guest's own page tables in its memory, as the CPU does it ([`paging::translate`]).
    fn translate(
        &mut self,
        gva: u64,
        access: Access,
        paging: &Paging,
    ) -> Result<Translation, FallbackErrorKind> {
        paging::translate(paging, gva, access, &mut |gpa, size| {
            let mut entry = [0u8; 8];
            let bytes = entry.get_mut(..size).unwrap_or_default();
            self.read_phys(gpa, bytes)?;
            Ok(u64::from_le_bytes(entry))
        })
    }
    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), FallbackErrorKind>;
    fn write_phys(&mut self, gpa: u64, buf: &[u8]) -> Result<(), FallbackErrorKind>;
}

/// A KVM vCPU and its guest's RAM.
///
/// The x87/SSE state goes through `KVM_GET/SET_XSAVE` rather than `KVM_GET/SET_FPU`: the latter
/// ignore MXCSR altogether (Linux `kvm_arch_vcpu_ioctl_set_fpu` copies every FXSAVE field but
/// that one), and they leave XSTATE_BV alone, so state written while a component is marked as in
/// its initial configuration would be dropped on the next XRSTOR.
pub struct KvmGuest<'a> {
    vcpu: &'a VcpuFd,
    mem: &'a GuestMemoryMmap,
    /// The XSAVE image last read, reused to write the state back.
    xsave: Option<Box<kvm_xsave>>,
}

impl<'a> KvmGuest<'a> {
    pub fn new(vcpu: &'a VcpuFd, mem: &'a GuestMemoryMmap) -> Self {
        KvmGuest {
            vcpu,
            mem,
            xsave: None,
        }
    }

    fn xsave(&mut self) -> Result<&mut kvm_xsave, FallbackErrorKind> {
        let xsave = match self.xsave.take() {
            Some(xsave) => xsave,
            None => Box::new(self.vcpu.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?),
        };
        Ok(self.xsave.insert(xsave))
    }
}

/// Reads the vCPU's x87/SSE state, MXCSR included, through `KVM_GET_XSAVE` (see [`KvmGuest`]
/// for why not `KVM_GET_FPU`).
pub fn read_fpu(vcpu: &VcpuFd) -> Result<kvm_fpu, kvm_ioctls::Error> {
    Ok(fpu_from_xsave(&vcpu.get_xsave()?))
}

/// Writes the vCPU's x87/SSE state, MXCSR included, through `KVM_SET_XSAVE`.
pub fn write_fpu(vcpu: &VcpuFd, fpu: &kvm_fpu) -> Result<(), kvm_ioctls::Error> {
    let mut xsave = Box::new(vcpu.get_xsave()?);
    fpu_into_xsave(fpu, &mut xsave);
    set_xsave(vcpu, &xsave)
}

/// `KVM_SET_XSAVE` of an image that `KVM_GET_XSAVE` produced on the same vCPU.
fn set_xsave(vcpu: &VcpuFd, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: KVM_SET_XSAVE reads the vCPU's XSAVE size (`guest_fpu.uabi_size`) from the pointer.
    // `xsave` was filled by KVM_GET_XSAVE on this vCPU, which KVM refuses when that size exceeds
    // `sizeof(struct kvm_xsave)` (Linux x86.c, `case KVM_GET_XSAVE`), so the kernel reads within
    // the struct.
    unsafe { vcpu.set_xsave(xsave) }
}

/// Byte offsets in the legacy region of an XSAVE image (Intel SDM vol. 1, table 10-2 "Format of
/// an FXSAVE area", 64-bit layout) and of XSTATE_BV in its header (13.4.2).
mod fxsave {
    pub const FCW: usize = 0;
    pub const FSW: usize = 2;
    pub const FTW: usize = 4;
    pub const FOP: usize = 6;
    pub const FIP: usize = 8;
    pub const FDP: usize = 16;
    pub const MXCSR: usize = 24;
    pub const MXCSR_MASK: usize = 28;
    pub const ST: usize = 32;
    pub const XMM: usize = 160;
    /// The legacy region plus the XSAVE header.
    pub const LEN: usize = 576;
    pub const XSTATE_BV: usize = 512;
    /// XSTATE_BV bits of the x87 and SSE components.
    pub const X87_SSE: u64 = 0x3;
}

/// The first [`fxsave::LEN`] bytes of an XSAVE image.
fn image_bytes(xsave: &kvm_xsave) -> [u8; fxsave::LEN] {
    let mut bytes = [0; fxsave::LEN];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(xsave.region.iter()) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    bytes
}

fn set_image_bytes(xsave: &mut kvm_xsave, bytes: &[u8; fxsave::LEN]) {
    for (word, chunk) in xsave.region.iter_mut().zip(bytes.chunks_exact(4)) {
        *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
}

fn field<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

/// The x87/SSE state of an XSAVE image, as `kvm_fpu`.
pub fn fpu_from_xsave(xsave: &kvm_xsave) -> kvm_fpu {
    let b = image_bytes(xsave);
    let mut fpu = kvm_fpu {
        fcw: u16::from_le_bytes(field(&b, fxsave::FCW)),
        fsw: u16::from_le_bytes(field(&b, fxsave::FSW)),
        ftwx: b[fxsave::FTW],
        last_opcode: u16::from_le_bytes(field(&b, fxsave::FOP)),
        last_ip: u64::from_le_bytes(field(&b, fxsave::FIP)),
        last_dp: u64::from_le_bytes(field(&b, fxsave::FDP)),
        mxcsr: u32::from_le_bytes(field(&b, fxsave::MXCSR)),
        ..Default::default()
    };
    for (i, st) in fpu.fpr.iter_mut().enumerate() {
        *st = field(&b, fxsave::ST + 16 * i);
    }
    for (i, xmm) in fpu.xmm.iter_mut().enumerate() {
        *xmm = field(&b, fxsave::XMM + 16 * i);
    }
    fpu
}

/// Writes `fpu` into an XSAVE image and marks x87 and SSE state as present in XSTATE_BV.
pub fn fpu_into_xsave(fpu: &kvm_fpu, xsave: &mut kvm_xsave) {
    let mut b = image_bytes(xsave);
    b[fxsave::FCW..fxsave::FCW + 2].copy_from_slice(&fpu.fcw.to_le_bytes());
    b[fxsave::FSW..fxsave::FSW + 2].copy_from_slice(&fpu.fsw.to_le_bytes());
    b[fxsave::FTW] = fpu.ftwx;
    b[fxsave::FOP..fxsave::FOP + 2].copy_from_slice(&fpu.last_opcode.to_le_bytes());
    b[fxsave::FIP..fxsave::FIP + 8].copy_from_slice(&fpu.last_ip.to_le_bytes());
    b[fxsave::FDP..fxsave::FDP + 8].copy_from_slice(&fpu.last_dp.to_le_bytes());
    b[fxsave::MXCSR..fxsave::MXCSR + 4].copy_from_slice(&fpu.mxcsr.to_le_bytes());
    for (i, st) in fpu.fpr.iter().enumerate() {
        let at = fxsave::ST + 16 * i;
        b[at..at + 16].copy_from_slice(st);
    }
    for (i, xmm) in fpu.xmm.iter().enumerate() {
        let at = fxsave::XMM + 16 * i;
        b[at..at + 16].copy_from_slice(xmm);
    }
    let bv = u64::from_le_bytes(field(&b, fxsave::XSTATE_BV)) | fxsave::X87_SSE;
    b[fxsave::XSTATE_BV..fxsave::XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
    set_image_bytes(xsave, &b);
}

fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> FallbackErrorKind {
    move |source| FallbackErrorKind::Ioctl { what, source }
}

impl GuestCpu for KvmGuest<'_> {
    fn regs(&mut self) -> Result<kvm_regs, FallbackErrorKind> {
        self.vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))
    }

    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), FallbackErrorKind> {
        self.vcpu.set_regs(regs).map_err(ioctl("KVM_SET_REGS"))
    }

    fn sregs(&mut self) -> Result<kvm_sregs, FallbackErrorKind> {
        self.vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))
    }

    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), FallbackErrorKind> {
        self.vcpu.set_sregs(sregs).map_err(ioctl("KVM_SET_SREGS"))
    }

    fn fpu(&mut self) -> Result<kvm_fpu, FallbackErrorKind> {
        Ok(fpu_from_xsave(self.xsave()?))
    }

    fn set_fpu(&mut self, fpu: &kvm_fpu) -> Result<(), FallbackErrorKind> {
        let vcpu = self.vcpu;
        let xsave = self.xsave()?;
        fpu_into_xsave(fpu, xsave);
        set_xsave(vcpu, xsave).map_err(ioctl("KVM_SET_XSAVE"))
    }

    fn vcpu_events(&mut self) -> Result<kvm_vcpu_events, FallbackErrorKind> {
        self.vcpu
            .get_vcpu_events()
            .map_err(ioctl("KVM_GET_VCPU_EVENTS"))
    }

    fn set_vcpu_events(&mut self, events: &kvm_vcpu_events) -> Result<(), FallbackErrorKind> {
        self.vcpu
            .set_vcpu_events(events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))
    }

    fn xcr0(&mut self) -> Result<u64, FallbackErrorKind> {
        let xcrs = self.vcpu.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
        let count = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
        Ok(xcrs.xcrs[..count]
            .iter()
            .find(|x| x.xcr == 0)
            .map_or(XCR0_X87_SSE, |x| x.value))
    }

    fn mxcsr_mask(&mut self) -> Result<u32, FallbackErrorKind> {
        let bytes = image_bytes(self.xsave()?);
        Ok(
            match u32::from_le_bytes(field(&bytes, fxsave::MXCSR_MASK)) {
                0 => DEFAULT_MXCSR_MASK,
                mask => mask,
            },
        )
    }

    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), FallbackErrorKind> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|source| FallbackErrorKind::GuestMemory { gpa, source })
    }

    fn write_phys(&mut self, gpa: u64, buf: &[u8]) -> Result<(), FallbackErrorKind> {
        self.mem
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|source| FallbackErrorKind::GuestMemory { gpa, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fpu_fields_sit_at_their_fxsave_offsets() {
        let mut fpu = kvm_fpu {
            fcw: 0x037f,
            fsw: 0x3800,
            ftwx: 0x80,
            last_opcode: 0x7ff,
            last_ip: 0x1122_3344_5566_7788,
            last_dp: 0x99aa_bbcc_ddee_ff00,
            mxcsr: 0x9fc0,
            ..Default::default()
        };
        fpu.fpr[7] = [7; 16];
        fpu.xmm[0] = [0xa0; 16];
        fpu.xmm[15] = [0xaf; 16];
        let mut xsave = kvm_xsave::default();
        xsave.region[7] = 0xffff; // MXCSR_MASK, kept
        xsave.region[130] = 0x1234; // XCOMP_BV low word, kept
        fpu_into_xsave(&fpu, &mut xsave);

        let r = &xsave.region;
        assert_eq!(r[0], 0x3800_037f); // FCW, FSW
        assert_eq!(r[1], 0x07ff_0080); // FTW, reserved, FOP
        assert_eq!((r[2], r[3]), (0x5566_7788, 0x1122_3344)); // FIP
        assert_eq!((r[4], r[5]), (0xddee_ff00, 0x99aa_bbcc)); // FDP
        assert_eq!(r[6], 0x9fc0); // MXCSR
        assert_eq!(r[7], 0xffff);
        assert_eq!(r[8 + 7 * 4], 0x0707_0707); // ST7 at byte 144
        assert_eq!(r[40], 0xa0a0_a0a0); // XMM0 at byte 160
        assert_eq!(r[40 + 15 * 4 + 3], 0xafaf_afaf); // end of XMM15 at byte 416
        assert_eq!(r[128], 0x3); // XSTATE_BV has x87 and SSE
        assert_eq!(r[130], 0x1234);
        assert_eq!(fpu_from_xsave(&xsave), fpu);
    }
}
