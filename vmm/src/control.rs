//! Control of a running VM from outside its main loop: pause, resume, the power button.
//!
//! The main loop ([`crate::Vmm::run_with`]) puts the vCPU handles here once the vCPUs run; the
//! API thread pauses and resumes them through it. Pausing parks every vCPU outside `KVM_RUN`
//! (each thread calls `KVM_KVMCLOCK_CTRL` before it parks) and then reads the VM's kvmclock with
//! `KVM_GET_CLOCK`; resuming writes it back with `KVM_SET_CLOCK` before any vCPU runs, so a
//! kvmclock guest's clock stands still while it is paused instead of jumping by the paused time
//! (QEMU does the same on `stop`/`cont`). The TSC itself keeps counting: a guest that reads the
//! TSC directly (clocksource=tsc) still sees the pause.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use kvm_bindings::kvm_clock_data;
use kvm_ioctls::VmFd;

use cpu::VcpuHandle;
use legacy::I8042;

use crate::power::PowerButton;

/// Errors pausing or resuming.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the VM is not running")]
    NotRunning,
    #[error("cannot pause vCPU {0}")]
    Pause(usize, #[source] cpu::Error),
}

#[derive(Default)]
struct Inner {
    vcpus: Vec<VcpuHandle>,
    vm: Option<Arc<VmFd>>,
    i8042: Option<Arc<Mutex<I8042>>>,
    button: Option<PowerButton>,
    /// Whether the vCPUs were attached once (the VM started).
    started: bool,
    /// `Some` while paused: the kvmclock read at pause time, if KVM gave it.
    paused: Option<Option<kvm_clock_data>>,
    /// The `--metrics-file` writer, for the API's FlushMetrics.
    metrics: Option<crate::metrics::Metrics>,
    /// Why a thread outside the main loop needs the VMM stopped (an API connection thread that
    /// could not install its seccomp filter); the first reason is kept.
    failure: Option<String>,
}

/// The VM's vCPUs and the devices the host may poke at, shared by the main loop and the API.
#[derive(Default)]
pub struct VmControl {
    inner: Mutex<Inner>,
    attached: Condvar,
}

impl VmControl {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by the main loop once the vCPUs run.
    pub(crate) fn attach(
        &self,
        vcpus: Vec<VcpuHandle>,
        vm: Arc<VmFd>,
        i8042: Arc<Mutex<I8042>>,
        button: Option<PowerButton>,
    ) {
        let mut inner = self.lock();
        inner.vcpus = vcpus;
        inner.vm = Some(vm);
        inner.i8042 = Some(i8042);
        inner.button = button;
        inner.started = true;
        self.attached.notify_all();
    }

    /// Waits until the main loop has attached the vCPUs (or `timeout` passed); returns whether
    /// it has.
    pub fn wait_started(&self, timeout: Duration) -> bool {
        let inner = self.lock();
        let (inner, _) = self
            .attached
            .wait_timeout_while(inner, timeout, |inner| !inner.started)
            .unwrap_or_else(|e| e.into_inner());
        inner.started
    }

    /// Takes the vCPU handles back to join them; the VM is no longer controllable afterwards.
    pub(crate) fn detach(&self) -> Vec<VcpuHandle> {
        let mut inner = self.lock();
        inner.vm = None;
        inner.i8042 = None;
        inner.button = None;
        inner.paused = None;
        std::mem::take(&mut inner.vcpus)
    }

    /// Runs `f` on every vCPU handle (stop, register dump).
    pub(crate) fn for_each_vcpu(&self, f: impl Fn(&VcpuHandle) -> Result<(), cpu::Error>) {
        let inner = self.lock();
        for handle in &inner.vcpus {
            if let Err(e) = f(handle) {
                log::warn!("{e}");
            }
        }
    }

    /// Called by the main loop when the VM writes metrics.
    pub(crate) fn set_metrics(&self, metrics: Option<crate::metrics::Metrics>) {
        self.lock().metrics = metrics;
    }

    /// Writes a metrics line now. Ok(false) when there is no metrics file.
    pub fn flush_metrics(&self) -> std::io::Result<bool> {
        match &self.lock().metrics {
            Some(metrics) => metrics.flush().map(|()| true),
            None => Ok(false),
        }
    }

    /// Asks the main thread to stop the VMM with `message` as its error (it looks every tick,
    /// and every 100 ms while it waits for `InstanceStart`).
    pub fn fail(&self, message: String) {
        self.lock().failure.get_or_insert(message);
    }

    /// The reason given to [`fail`](Self::fail), if any.
    pub fn failure(&self) -> Option<String> {
        self.lock().failure.clone()
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.lock().paused.is_some()
    }

    /// Stops every vCPU at its next exit and waits until all are parked. Pausing a paused VM
    /// does nothing.
    pub fn pause(&self) -> Result<(), ControlError> {
        let mut inner = self.lock();
        let Some(vm) = inner.vm.clone() else {
            return Err(ControlError::NotRunning);
        };
        if inner.paused.is_some() {
            return Ok(());
        }
        for handle in &inner.vcpus {
            if let Err(e) = handle.pause() {
                // Undo what was paused, so the VM is not left half-stopped.
                for h in &inner.vcpus {
                    h.resume();
                }
                return Err(ControlError::Pause(handle.index(), e));
            }
        }
        let clock = match vm.get_clock() {
            Ok(clock) => Some(clock),
            Err(e) => {
                log::warn!("KVM_GET_CLOCK failed, the guest's clock will jump on resume: {e}");
                None
            }
        };
        inner.paused = Some(clock);
        log::info!("VM paused");
        Ok(())
    }

    /// Lets the vCPUs run again, with the kvmclock where it was at pause time. Resuming a
    /// running VM does nothing.
    pub fn resume(&self) -> Result<(), ControlError> {
        let mut inner = self.lock();
        let Some(vm) = inner.vm.clone() else {
            return Err(ControlError::NotRunning);
        };
        let Some(clock) = inner.paused.take() else {
            return Ok(());
        };
        if let Some(clock) = clock {
            // Only the clock value is restored: the flags KVM_GET_CLOCK reports (TSC_STABLE,
            // HOST_TSC) are not inputs of KVM_SET_CLOCK.
            let restore = kvm_clock_data {
                clock: clock.clock,
                ..Default::default()
            };
            if let Err(e) = vm.set_clock(&restore) {
                log::warn!("KVM_SET_CLOCK failed, the guest's clock jumps by the paused time: {e}");
            }
        }
        for handle in &inner.vcpus {
            handle.resume();
        }
        log::info!("VM resumed");
        Ok(())
    }

    /// Firecracker's `SendCtrlAltDel`: presses the ACPI power button, which a guest with ACPI
    /// turns into its orderly shutdown (Linux's `button` driver signals init, as Ctrl-Alt-Del on
    /// a keyboard would). A VM without ACPI (`--acpi off`) gets the i8042 Ctrl-Alt-Del scan codes
    /// instead, as Firecracker sends them.
    pub fn ctrl_alt_del(&self) -> Result<(), ControlError> {
        let inner = self.lock();
        if inner.vm.is_none() {
            return Err(ControlError::NotRunning);
        }
        if let Some(button) = &inner.button {
            if !button.press() {
                log::info!("the guest has not enabled its power button event yet");
            }
            return Ok(());
        }
        let i8042 = inner.i8042.as_ref().ok_or(ControlError::NotRunning)?;
        i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .press_ctrl_alt_del();
        Ok(())
    }
}
