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
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::exit::{handle_exit, ExitAction, VcpuStop, VmOps};
use crate::pvm::fallback::InsnFallback;
use crate::pvm::syscall::{self, SyscallState, SyscallTrampoline};

/// Errors starting or controlling a vCPU thread.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("cannot start the thread of vCPU {0}: {1}")]
    Spawn(usize, #[source] std::io::Error),
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
    pub index: usize,
    pub stop: VcpuStop,
    /// Instructions the fallback emulator carried out, by mnemonic.
    pub emulated: Vec<(String, u64)>,
    /// Number of exits this vCPU handled.
    pub exits: u64,
}

/// A configured vCPU, ready to run on its own thread.
pub struct Vcpu {
    index: usize,
    fd: VcpuFd,
    ops: Arc<dyn VmOps>,
    mem: GuestMemoryMmap,
    fallback: InsnFallback,
    trampoline: Option<SyscallTrampoline>,
    syscall: SyscallState,
}

/// What the loop does after an exit that needs the vCPU's own file descriptor.
enum Step {
    Action(ExitAction),
    LstarWrite(u64),
}

impl Vcpu {
    /// `fd` must be fully set up (registers, CPUID, MSRs) before the thread starts.
    pub fn new(index: usize, fd: VcpuFd, ops: Arc<dyn VmOps>, mem: GuestMemoryMmap) -> Self {
        Vcpu {
            index,
            fd,
            ops,
            mem,
            fallback: InsnFallback::new(),
            trampoline: None,
            syscall: SyscallState::default(),
        }
    }

    /// Routes this vCPU's system calls through `trampoline` (see [`crate::pvm::syscall`]).
    pub fn with_syscall_trampoline(mut self, trampoline: Option<SyscallTrampoline>) -> Self {
        self.trampoline = trampoline;
        self
    }

    /// Starts the vCPU thread. `exit_evt` is written once when the thread leaves its loop on its own
    /// (the guest ended or KVM failed), so the VMM can stop the others.
    pub fn start(self, exit_evt: EventFd) -> Result<VcpuHandle, Error> {
        install_kick_handler()?;
        let index = self.index;
        let control = Arc::new(Control::new());
        let thread_control = control.clone();
        let thread = thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let report = self.run_loop(&thread_control);
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

    fn lstar_write(&mut self, value: u64) -> ExitAction {
        let Some(trampoline) = self.trampoline else {
            return ExitAction::Resume;
        };
        match trampoline.on_lstar_write(&self.fd, &self.mem, value) {
            Ok(()) => {
                self.syscall.lstar = Some(value);
                ExitAction::Resume
            }
            Err(e) => ExitAction::Stop(VcpuStop::Failed(e.to_string())),
        }
    }

    /// KVM could not emulate an instruction: a system call through the trampoline, or an
    /// instruction for the fallback emulator.
    fn emulation_failure(&mut self) -> ExitAction {
        if self.trampoline.is_some() {
            match syscall::on_trampoline_exit(&self.fd, &mut self.syscall) {
                Ok(true) => return ExitAction::Resume,
                Ok(false) => {}
                Err(e) => return ExitAction::Stop(VcpuStop::Failed(e.to_string())),
            }
        }
        match self.fallback.handle_internal_error(&mut self.fd, &self.mem) {
            Ok(()) => ExitAction::Resume,
            Err(e) => ExitAction::Stop(VcpuStop::Failed(format!("KVM internal error: {e}"))),
        }
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

    fn run_loop(mut self, control: &Control) -> VcpuReport {
        KVM_RUN.with(|cell| cell.set(self.fd.get_kvm_run()));
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
            let trampoline = self.trampoline.is_some();
            let step = match self.fd.run() {
                Ok(VcpuExit::X86Wrmsr(exit)) if trampoline => {
                    exits += 1;
                    *exit.error = 0;
                    Step::LstarWrite(exit.data)
                }
                Ok(exit) => {
                    exits += 1;
                    Step::Action(handle_exit(exit, self.ops.as_ref()))
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    Step::Action(ExitAction::Interrupted)
                }
                Err(e) => Step::Action(ExitAction::Stop(VcpuStop::Failed(format!(
                    "KVM_RUN failed: {e}"
                )))),
            };
            let action = match step {
                Step::Action(action) => action,
                Step::LstarWrite(value) => self.lstar_write(value),
            };
            match action {
                ExitAction::Resume => {}
                ExitAction::Interrupted => self.fd.set_kvm_immediate_exit(0),
                ExitAction::EmulationFailure => {
                    if let ExitAction::Stop(stop) = self.emulation_failure() {
                        break stop;
                    }
                }
                ExitAction::Stop(stop) => break stop,
            }
        };
        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
        let stop = match stop {
            VcpuStop::Failed(msg) => VcpuStop::Failed(format!("vCPU {}: {msg}", self.index)),
            other => other,
        };
        VcpuReport {
            index: self.index,
            stop,
            emulated: self
                .fallback
                .counts()
                .map(|(name, count)| (name.to_string(), count))
                .collect(),
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
