//! One thread per vCPU running the `KVM_RUN` loop, with a signal-based kick.
//!
//! A vCPU thread runs until the guest ends (reset, power-off, triple fault), KVM fails, or the VMM
//! asks it to stop. To reach a thread that sits inside `KVM_RUN`, the VMM sends it a real-time
//! signal whose handler sets `kvm_run.immediate_exit`: KVM then returns `EINTR` at once, even when
//! the signal landed just before the thread entered the guest, so a kick is never lost (see
//! Documentation/virt/kvm/api.rst, "immediate_exit").

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::{self, JoinHandle};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::exit::{handle_exit_sized, ExitAction, VcpuStop, VmOps};
use crate::hook::{ExitHook, HookAction};
use crate::metrics::VcpuMetrics;

/// Errors starting or controlling a vCPU thread.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `sigaction` for the kick signal failed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    /// The vCPU thread (index first) could not be spawned.
    #[error("cannot start the thread of vCPU {0}: {1}")]
    Spawn(usize, #[source] std::io::Error),
    /// Signalling the vCPU thread (index first) failed.
    #[error("cannot kick vCPU {0}: {1}")]
    Kick(usize, #[source] vmm_sys_util::errno::Error),
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run`, for the kick handler. Null on threads that run no vCPU.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own `kvm_run` mapping, set by `Vcpu::run_loop` while
        // the `VcpuFd` that owns the mapping is alive on this thread and cleared before it is dropped.
        // A volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

fn install_kick_handler() -> Result<(), Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick).map_err(Error::SignalHandler);
    });
    result
}

/// The element size of the port I/O exit KVM just reported (`kvm_run.io.size`: 1, 2 or 4 bytes);
/// the exit's data holds `io.count` elements of that size (string I/O, `rep ins`/`rep outs`).
/// `kvm_ioctls::VcpuExit` reports only the data, whose length alone cannot tell `outl` from a
/// 4-byte `rep outsb`.
fn io_element_size(run: *const kvm_run) -> Option<usize> {
    // SAFETY: `run` is this vCPU's `kvm_run` mapping, which the `VcpuFd` keeps mapped for as long
    // as the exit being decoded exists. The exit reason is KVM_EXIT_IO, so KVM filled the `io`
    // member of the union, whose fields are plain integers valid for any bit pattern. The byte
    // read lies in the fixed part of `kvm_run`, apart from the exit's data, which KVM places at
    // `io.data_offset` (a page further on, `KVM_PIO_PAGE_OFFSET`); the read is volatile because
    // the mapping is shared with the kernel.
    let size = unsafe { std::ptr::addr_of!((*run).__bindgen_anon_1.io.size).read_volatile() };
    (size != 0).then_some(usize::from(size))
}

/// What the VMM asks of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
    /// Log the registers once, then run on (for diagnosing a guest that seems stuck).
    Dump,
}

/// Shared between the VMM and one vCPU thread: the request and whether the thread is parked.
#[derive(Debug)]
struct Control {
    state: Mutex<(Request, bool)>,
    changed: Condvar,
}

impl Control {
    fn new() -> Self {
        Control {
            state: Mutex::new((Request::Run, false)),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Request, bool)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn request(&self) -> Request {
        self.lock().0
    }

    fn set_request(&self, request: Request) {
        self.lock().0 = request;
        self.changed.notify_all();
    }

    /// Clears a dump request, unless something else was asked meanwhile.
    fn finish_dump(&self) {
        let mut state = self.lock();
        if state.0 == Request::Dump {
            state.0 = Request::Run;
        }
    }

    /// Parks the calling vCPU thread while a pause is requested. Returns the request that ended it.
    fn park(&self) -> Request {
        let mut state = self.lock();
        state.1 = true;
        self.changed.notify_all();
        while state.0 == Request::Pause {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.1 = false;
        state.0
    }

    /// Waits until the vCPU thread is parked, or `finished` says it has ended.
    fn wait_parked(&self, finished: impl Fn() -> bool) {
        let mut state = self.lock();
        while !state.1 && !finished() {
            state = self
                .changed
                .wait_timeout(state, std::time::Duration::from_millis(10))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// What a vCPU thread reports when it ends.
#[derive(Debug)]
pub struct VcpuReport {
    /// The vCPU's index.
    pub index: usize,
    /// Why the thread ended.
    pub stop: VcpuStop,
    /// What the vCPU's exit hook carried out, by name (for kvm-pvm: instructions, by mnemonic).
    pub emulated: Vec<(String, u64)>,
    /// Number of exits this vCPU handled.
    pub exits: u64,
}

/// A configured vCPU, ready to run on its own thread.
pub struct Vcpu {
    index: usize,
    fd: VcpuFd,
    ops: Arc<dyn VmOps>,
    hook: Option<Box<dyn ExitHook>>,
    metrics: Arc<VcpuMetrics>,
    thread_start: Option<ThreadStart>,
}

/// Runs first on a vCPU's own thread, before its first `KVM_RUN`: where a VMM confines the thread
/// (a seccomp filter) and holds it until the rest of the VMM is ready. An error ends the thread
/// as [`VcpuStop::Failed`] without running the guest.
pub type ThreadStart = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// What the loop does after an exit: act, or let the exit hook finish it on the vCPU.
enum Step {
    Action(ExitAction),
    Hooked,
}

impl Vcpu {
    /// `fd` must be fully set up (registers, CPUID, MSRs) before the thread starts.
    pub fn new(index: usize, fd: VcpuFd, ops: Arc<dyn VmOps>) -> Self {
        Vcpu {
            index,
            fd,
            ops,
            hook: None,
            metrics: Arc::new(VcpuMetrics::default()),
            thread_start: None,
        }
    }

    /// This vCPU's exit counters, readable from any thread while it runs.
    pub fn metrics(&self) -> Arc<VcpuMetrics> {
        self.metrics.clone()
    }

    /// Runs `start` on the vCPU's thread before the guest (see [`ThreadStart`]).
    pub fn with_thread_start(mut self, start: ThreadStart) -> Self {
        self.thread_start = Some(start);
        self
    }

    /// Offers every exit to `hook` before the generic decoder (see [`crate::hook`]).
    pub fn with_exit_hook(mut self, hook: Option<Box<dyn ExitHook>>) -> Self {
        self.hook = hook;
        self
    }

    /// Starts the vCPU thread. `exit_evt` is written once when the thread leaves its loop on its own
    /// (the guest ended or KVM failed), so the VMM can stop the others.
    pub fn start(mut self, exit_evt: EventFd) -> Result<VcpuHandle, Error> {
        install_kick_handler()?;
        let index = self.index;
        let control = Arc::new(Control::new());
        let thread_control = control.clone();
        let thread = thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let report = match self.thread_start.take().map_or(Ok(()), |start| start()) {
                    Ok(()) => self.run_loop(&thread_control),
                    Err(e) => VcpuReport {
                        index,
                        stop: VcpuStop::Failed(format!("vCPU {index}: {e}")),
                        emulated: Vec::new(),
                        exits: 0,
                    },
                };
                if report.stop != VcpuStop::Requested {
                    if let Err(e) = exit_evt.write(1) {
                        log::error!("vCPU {index}: cannot signal its exit: {e}");
                    }
                }
                report
            })
            .map_err(|e| Error::Spawn(index, e))?;
        Ok(VcpuHandle {
            index,
            thread,
            control,
        })
    }

    fn log_state(&self, exits: u64) {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => log::warn!(
                "vCPU {}: rip {:#x} rsp {:#x} rflags {:#x} rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} \
                 rsi {:#x} rdi {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} cs {:#x}; \
                 {exits} exits so far",
                self.index,
                r.rip,
                r.rsp,
                r.rflags,
                r.rax,
                r.rbx,
                r.rcx,
                r.rdx,
                r.rsi,
                r.rdi,
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector
            ),
            (Err(e), _) | (_, Err(e)) => {
                log::warn!("vCPU {}: cannot read its registers: {e}", self.index)
            }
        }
    }

    /// Whether the vCPU sits in HLT with RFLAGS.IF clear (`cli; hlt`): the in-kernel irqchip
    /// keeps such a vCPU inside `KVM_RUN` for ever, so only a probe from outside can see it.
    fn halted_with_interrupts_off(&self) -> bool {
        const RFLAGS_IF: u64 = 1 << 9;
        let halted = self
            .fd
            .get_mp_state()
            .is_ok_and(|state| state.mp_state == kvm_bindings::KVM_MP_STATE_HALTED);
        halted && self.fd.get_regs().is_ok_and(|r| r.rflags & RFLAGS_IF == 0)
    }

    fn run_loop(mut self, control: &Control) -> VcpuReport {
        KVM_RUN.with(|cell| cell.set(self.fd.get_kvm_run()));
        self.metrics.set_running(true);
        let mut exits = 0u64;
        let stop = loop {
            match control.request() {
                Request::Run => {}
                Request::Stop => break VcpuStop::Requested,
                Request::Dump => {
                    self.log_state(exits);
                    control.finish_dump();
                }
                Request::Pause => {
                    // Tell a kvmclock guest that it was stopped by the host, so its soft-lockup
                    // watchdog does not fire over the paused time (api.rst, KVM_KVMCLOCK_CTRL).
                    // EINVAL means the guest has not enabled kvmclock: nothing to tell.
                    if let Err(e) = self.fd.kvmclock_ctrl() {
                        log::debug!("vCPU {}: KVM_KVMCLOCK_CTRL: {e}", self.index);
                    }
                    if control.park() == Request::Stop {
                        break VcpuStop::Requested;
                    }
                }
            }
            let run = self.fd.get_kvm_run() as *const kvm_run;
            let step = match self.fd.run() {
                Ok(mut exit) => {
                    exits += 1;
                    self.metrics.record(&exit);
                    self.metrics.set_halted(false);
                    let claimed = match self.hook.as_mut() {
                        Some(hook) => hook.on_exit(&mut exit),
                        None => HookAction::NotMine,
                    };
                    match claimed {
                        HookAction::NotMine => {
                            let size = match exit {
                                VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => io_element_size(run),
                                _ => None,
                            };
                            Step::Action(handle_exit_sized(exit, size, self.ops.as_ref()))
                        }
                        HookAction::Handled => Step::Action(ExitAction::Resume),
                        HookAction::NeedsVcpu => Step::Hooked,
                        HookAction::Stop(stop) => Step::Action(ExitAction::Stop(stop)),
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.metrics.record_interrupted();
                    Step::Action(ExitAction::Interrupted)
                }
                Err(e) => Step::Action(ExitAction::Stop(VcpuStop::Failed(format!(
                    "KVM_RUN failed: {e}"
                )))),
            };
            let action = match step {
                Step::Action(action) => action,
                Step::Hooked => match self.hook.as_mut().map(|hook| hook.with_vcpu(&mut self.fd)) {
                    Some(Err(stop)) => ExitAction::Stop(stop),
                    Some(Ok(())) | None => ExitAction::Resume,
                },
            };
            match action {
                ExitAction::Resume => {}
                ExitAction::Interrupted => {
                    self.fd.set_kvm_immediate_exit(0);
                    self.metrics.set_halted(self.halted_with_interrupts_off());
                }
                // No exit hook took it: nothing here can carry the instruction out.
                ExitAction::EmulationFailure => {
                    break VcpuStop::Failed(
                        "KVM internal error: its instruction emulator failed on an instruction \
                         and nothing in the VMM handles that"
                            .to_string(),
                    )
                }
                ExitAction::Stop(stop) => break stop,
            }
        };
        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
        self.metrics.set_running(false);
        let stop = match stop {
            VcpuStop::Failed(msg) => VcpuStop::Failed(format!("vCPU {}: {msg}", self.index)),
            other => other,
        };
        VcpuReport {
            index: self.index,
            stop,
            emulated: self.hook.as_ref().map(|h| h.counts()).unwrap_or_default(),
            exits,
        }
    }
}

/// The VMM's handle on a running vCPU thread.
pub struct VcpuHandle {
    index: usize,
    thread: JoinHandle<VcpuReport>,
    control: Arc<Control>,
}

impl VcpuHandle {
    /// The index of the vCPU this handle controls.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Interrupts `KVM_RUN` so the thread looks at its requests.
    fn kick(&self) -> Result<(), Error> {
        if self.thread.is_finished() {
            return Ok(());
        }
        self.thread
            .kill(kick_signal())
            .map_err(|e| Error::Kick(self.index, e))
    }

    /// Stops the vCPU at its next exit from the guest (at once if it is in `KVM_RUN`).
    pub fn stop(&self) -> Result<(), Error> {
        self.control.set_request(Request::Stop);
        self.kick()
    }

    /// Pauses the vCPU and waits until it is parked outside the guest.
    pub fn pause(&self) -> Result<(), Error> {
        self.control.set_request(Request::Pause);
        self.kick()?;
        self.control.wait_parked(|| self.thread.is_finished());
        Ok(())
    }

    /// Has the vCPU look, once out of `KVM_RUN`, whether it is halted with interrupts disabled;
    /// the answer shows in [`VcpuMetrics::is_halted_for_good`] shortly after.
    pub fn probe(&self) -> Result<(), Error> {
        self.kick()
    }

    /// Asks the vCPU to log its registers (at warn level) and run on.
    pub fn dump_state(&self) -> Result<(), Error> {
        self.control.set_request(Request::Dump);
        self.kick()
    }

    /// Lets a paused vCPU run the guest again.
    pub fn resume(&self) {
        self.control.set_request(Request::Run);
    }

    /// Waits for the thread to end and returns its report.
    pub fn join(self) -> VcpuReport {
        let index = self.index;
        self.thread.join().unwrap_or_else(|_| VcpuReport {
            index,
            stop: VcpuStop::Failed(format!("vCPU {index}: its thread panicked")),
            emulated: Vec::new(),
            exits: 0,
        })
    }
}
