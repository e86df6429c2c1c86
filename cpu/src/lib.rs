//! The vCPU: one thread each running the `KVM_RUN` loop, exit decoding kept apart from device
//! dispatch (the [`VmOps`] trait), a signal-based kick, and a fallback for instructions that the
//! host's KVM emulator cannot run (the `pvm` module; it matters on hosts without VMX/SVM).

pub mod exit;
pub mod pvm;
pub mod vcpu;

pub use exit::{fuzz_exit, handle_exit, ExitAction, VcpuStop, VmOps};
pub use vcpu::{Error, Vcpu, VcpuHandle, VcpuReport};
