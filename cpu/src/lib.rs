//! The vCPU: one thread each running the `KVM_RUN` loop, exit decoding kept apart from device
//! dispatch (the [`VmOps`] trait), a signal-based kick, and an [`ExitHook`] through which a layer
//! for a particular kind of host (such as kvm-pvm) sees each exit before the decoder.

#![warn(missing_docs)]

pub mod exit;
pub mod hook;
pub mod metrics;
pub mod vcpu;

pub use exit::{fuzz_exit, handle_exit, handle_exit_sized, ExitAction, VcpuStop, VmOps};
pub use hook::{ExitHook, HookAction};
pub use metrics::VcpuMetrics;
pub use vcpu::{Error, ThreadStart, Vcpu, VcpuHandle, VcpuReport};
