//! Seccomp filters, one per kind of VMM thread, so that a guest that takes over a thread reaches
//! only the system calls that thread needs (seccomp(2), `SECCOMP_SET_MODE_FILTER`; the programs
//! are compiled by the `seccompiler` crate).
//!
//! Each thread installs its own filter when it starts, before it handles anything the guest
//! controls: the device worker before it serves a queue, each vCPU before its first `KVM_RUN`,
//! and the main thread once every other thread runs. The vCPUs wait at a [`StartGate`] until the
//! main thread's filter is in, so no guest instruction runs in an unconfined process. The control
//! API's threads (`--api-sock`) confine themselves before they read from its socket: the accept
//! thread when it starts, and each connection thread, which starts under the accept thread's
//! filter (filters are inherited and stack), narrows it to its own list before its first request.
//!
//! A call outside a thread's list returns `SECCOMP_RET_TRAP`: the kernel skips the call and sends
//! SIGSYS, whose handler writes one line naming the thread and the system call to stderr and then
//! ends the process by SIGSYS itself (the default action: killed, core dumped where enabled, with
//! guest memory left out of the dump by `MADV_DONTDUMP`). `SECCOMP_RET_KILL_PROCESS` would end the
//! process as surely but silently; the trap costs nothing until the filter is broken.
//! Only ioctls are filtered by argument (by request number); every other call by number alone.
//! `--seccomp off` installs nothing, for debugging, and says so at warning level.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors of building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the seccomp filter of the {0} thread: {1}")]
    Build(&'static str, #[source] seccompiler::BackendError),
    #[error("cannot compile the seccomp filter of the {0} thread: {1}")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter of the {0} thread: {1}")]
    Install(&'static str, #[source] seccompiler::Error),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
}

/// The kinds of VMM thread, each with its own list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: builds the VM (with `--api-sock`, carrying out the API's pre-boot changes
    /// first), then serves the console (stdin, the signalfd, the reset, exit and power-off events)
    /// and stops everything at the end.
    Main,
    /// A vCPU thread: `KVM_RUN`, the exits' device emulation and the kvm-pvm fallback.
    Vcpu,
    /// A device worker: virtio queues, the disk images, taps, the entropy source.
    DeviceWorker,
    /// The control API's accept thread (`api`): accepts connections on its Unix socket and starts
    /// a thread for each. Those threads start under this filter, so its list holds theirs.
    Api,
    /// A control API connection thread (`api-conn`): reads and parses requests, answers them, and
    /// hands everything that opens host files or builds the VM to the main thread.
    ApiConnection,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::DeviceWorker,
        ThreadKind::Api,
        ThreadKind::ApiConnection,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::DeviceWorker => "device worker",
            ThreadKind::Api => "API",
            ThreadKind::ApiConnection => "API connection",
        }
    }

    /// The system calls this kind of thread may make.
    pub fn allowed(self) -> Vec<Allowed> {
        let lists: &[&[Allowed]] = match self {
            ThreadKind::Main => &[MAIN],
            ThreadKind::Vcpu => &[VCPU],
            ThreadKind::DeviceWorker => &[DEVICE_WORKER],
            ThreadKind::Api => &[API_CONNECTION, API],
            ThreadKind::ApiConnection => &[API_CONNECTION],
        };
        let mut list: Vec<Allowed> = EVERY_THREAD.to_vec();
        for extra in lists {
            list.extend_from_slice(extra);
        }
        list
    }
}

/// One entry of a thread's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// A system call, with any arguments.
    Call(i64),
    /// `ioctl` with one of these request numbers.
    Ioctls(&'static [u64]),
    /// A system call whose argument `index` is one of `values` (as `fcntl`'s command).
    Args(i64, u8, &'static [u64]),
}

use Allowed::{Args, Call, Ioctls};

/// `fcntl` commands: the debug check that a dropped descriptor is open, duplicating an eventfd
/// when a device is activated.
const FCNTL_CMDS: &[u64] = &[
    libc::F_GETFD as u64,
    libc::F_GETFL as u64,
    libc::F_DUPFD_CLOEXEC as u64,
];

/// Request numbers of the KVM and terminal ioctls the threads make after start-up
/// (linux/kvm.h, asm-generic/ioctls.h).
pub mod ioctl {
    use kvm_bindings::*;
    use std::mem::size_of;

    /// `_IOC` of asm-generic/ioctl.h: direction, size, type and number.
    const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | ((KVMIO as u64) << 8) | nr
    }
    const fn io(nr: u64) -> u64 {
        ioc(0, nr, 0)
    }
    const fn iow<T>(nr: u64) -> u64 {
        ioc(1, nr, size_of::<T>())
    }
    const fn ior<T>(nr: u64) -> u64 {
        ioc(2, nr, size_of::<T>())
    }
    const fn iowr<T>(nr: u64) -> u64 {
        ioc(3, nr, size_of::<T>())
    }

    pub const KVM_RUN: u64 = io(0x80);
    pub const KVM_GET_REGS: u64 = ior::<kvm_regs>(0x81);
    pub const KVM_SET_REGS: u64 = iow::<kvm_regs>(0x82);
    pub const KVM_GET_SREGS: u64 = ior::<kvm_sregs>(0x83);
    pub const KVM_SET_SREGS: u64 = iow::<kvm_sregs>(0x84);
    pub const KVM_TRANSLATE: u64 = iowr::<kvm_translation>(0x85);
    pub const KVM_GET_MSRS: u64 = iowr::<kvm_msrs>(0x88);
    pub const KVM_SET_MSRS: u64 = iow::<kvm_msrs>(0x89);
    pub const KVM_GET_FPU: u64 = ior::<kvm_fpu>(0x8c);
    pub const KVM_SET_FPU: u64 = iow::<kvm_fpu>(0x8d);
    pub const KVM_GET_VCPU_EVENTS: u64 = ior::<kvm_vcpu_events>(0x9f);
    pub const KVM_SET_VCPU_EVENTS: u64 = iow::<kvm_vcpu_events>(0xa0);
    pub const KVM_GET_XSAVE: u64 = ior::<kvm_xsave>(0xa4);
    pub const KVM_SET_XSAVE: u64 = iow::<kvm_xsave>(0xa5);
    pub const KVM_GET_XCRS: u64 = ior::<kvm_xcrs>(0xa6);
    pub const KVM_SET_XCRS: u64 = iow::<kvm_xcrs>(0xa7);
    pub const KVM_SIGNAL_MSI: u64 = iow::<kvm_msi>(0xa5);
    pub const KVM_SET_GSI_ROUTING: u64 = iow::<kvm_irq_routing>(0x6a);
    pub const KVM_IOEVENTFD: u64 = iow::<kvm_ioeventfd>(0x79);
    pub const KVM_IRQ_LINE: u64 = iow::<kvm_irq_level>(0x61);
    pub const KVM_GET_TSC_KHZ: u64 = io(0xa3);
    pub const KVM_GET_MP_STATE: u64 = ior::<kvm_mp_state>(0x98);
    pub const KVM_KVMCLOCK_CTRL: u64 = io(0xad);
    pub const KVM_REINJECT_CONTROL: u64 = io(0x71);
    pub const KVM_SET_CLOCK: u64 = iow::<kvm_clock_data>(0x7b);
    pub const KVM_GET_CLOCK: u64 = ior::<kvm_clock_data>(0x7c);
    /// linux/if_tun.h: `_IOW('T', 208, unsigned int)`.
    pub const TUNSETOFFLOAD: u64 = (1 << 30) | (4 << 16) | ((b'T' as u64) << 8) | 208;
    /// linux/if_tun.h: `_IOW('T', 217, int)`.
    pub const TUNSETQUEUE: u64 = (1 << 30) | (4 << 16) | ((b'T' as u64) << 8) | 217;

    /// tcgetattr (isatty asks it too).
    pub const TCGETS: u64 = 0x5401;
    /// tcsetattr(TCSANOW): the terminal put back at exit.
    pub const TCSETS: u64 = 0x5402;
    /// `set_nonblocking` on a socket.
    pub const FIONBIO: u64 = 0x5421;
}

/// Every thread: memory allocation, locks, logging to stderr, thread exit, and what the SIGSYS
/// handler itself needs to report and end the process.
const EVERY_THREAD: &[Allowed] = &[
    // The allocator: new arenas and large blocks, and giving them back.
    Call(libc::SYS_brk),
    Call(libc::SYS_mmap),
    Call(libc::SYS_munmap),
    Call(libc::SYS_mremap),
    Call(libc::SYS_mprotect),
    Call(libc::SYS_madvise),
    // Mutexes, condition variables, channels, joins.
    Call(libc::SYS_futex),
    Call(libc::SYS_sched_yield),
    // Log lines (stderr) and the guest's serial output (stdout).
    Call(libc::SYS_write),
    // Time stamps of log lines and timeouts, where the vDSO falls back to the kernel.
    Call(libc::SYS_clock_gettime),
    Call(libc::SYS_nanosleep),
    Call(libc::SYS_clock_nanosleep),
    // A HashMap's first random keys on a thread.
    Call(libc::SYS_getrandom),
    // Dropping descriptors (and, in debug builds, the check that they were open).
    Call(libc::SYS_close),
    Args(libc::SYS_fcntl, 1, FCNTL_CMDS),
    // Signal returns (the vCPU kick, SIGSYS) and the thread's end.
    Call(libc::SYS_rt_sigreturn),
    Call(libc::SYS_rt_sigprocmask),
    Call(libc::SYS_sigaltstack),
    Call(libc::SYS_exit),
    Call(libc::SYS_exit_group),
    Call(libc::SYS_restart_syscall),
    // Ending the process by a signal: the SIGSYS handler, abort() after a panic; tgkill also
    // kicks a vCPU out of KVM_RUN.
    Call(libc::SYS_rt_sigaction),
    Call(libc::SYS_getpid),
    Call(libc::SYS_gettid),
    Call(libc::SYS_tgkill),
];

/// The vCPU threads.
const VCPU: &[Allowed] = &[
    Ioctls(&[
        // KVM_RUN and the register access of exit handling, register dumps (SIGUSR1) and the
        // kvm-pvm fallback emulator (translating guest addresses, injecting faults).
        ioctl::KVM_RUN,
        ioctl::KVM_GET_REGS,
        ioctl::KVM_SET_REGS,
        ioctl::KVM_GET_SREGS,
        ioctl::KVM_SET_SREGS,
        ioctl::KVM_TRANSLATE,
        ioctl::KVM_GET_MSRS,
        ioctl::KVM_SET_MSRS,
        ioctl::KVM_GET_FPU,
        ioctl::KVM_SET_FPU,
        ioctl::KVM_GET_VCPU_EVENTS,
        ioctl::KVM_SET_VCPU_EVENTS,
        ioctl::KVM_GET_XSAVE,
        ioctl::KVM_SET_XSAVE,
        ioctl::KVM_GET_XCRS,
        ioctl::KVM_SET_XCRS,
        // MSI-X messages raised from a register write (a configuration change), and the routes
        // of vectors the guest unmasks (their irqfds exist before the filter).
        ioctl::KVM_SIGNAL_MSI,
        ioctl::KVM_SET_GSI_ROUTING,
        // Notification addresses that follow a BAR the guest moves.
        ioctl::KVM_IOEVENTFD,
        ioctl::KVM_IRQ_LINE,
        // The kvm-pvm layer's TSC frequency, asked lazily.
        ioctl::KVM_GET_TSC_KHZ,
        // The `cli; hlt` probe: whether the vCPU sits in HLT.
        ioctl::KVM_GET_MP_STATE,
        // Pausing (the API): tell a kvmclock guest the host stopped it.
        ioctl::KVM_KVMCLOCK_CTRL,
        // A virtio-net driver's DRIVER_OK: the tap's offloads follow the features it took;
        // DRIVER_OK and reset detach a multi-queue tap's queues but the first.
        ioctl::TUNSETOFFLOAD,
        ioctl::TUNSETQUEUE,
    ]),
    // Interrupt eventfds raised by device emulation on the vCPU (serial, i8042, ACPI SCI) and
    // the eventfds that tell the main thread the guest reset or powered off.
    Call(libc::SYS_read),
    // Where a device's register access reaches its backend: a disk's size, a flush when its
    // cache mode changes, and a disk's reset, which waits for its io_uring requests in flight.
    Call(libc::SYS_lseek),
    Call(libc::SYS_fdatasync),
    Call(libc::SYS_io_uring_enter),
    // The UART's output to a `--serial socket=` client.
    Call(libc::SYS_sendto),
];

/// The device worker threads.
const DEVICE_WORKER: &[Allowed] = &[
    Ioctls(&[ioctl::KVM_SIGNAL_MSI, ioctl::KVM_IRQ_LINE]),
    // The event loop: epoll, and the eventfds of notifications, interrupts and the stop request,
    // and the entropy device's source (getrandom, for every thread).
    Call(libc::SYS_epoll_wait),
    Call(libc::SYS_epoll_pwait),
    Call(libc::SYS_epoll_ctl),
    Call(libc::SYS_read),
    // Disk images: positional and vectored reads and writes, flushes, discards and zeroes.
    Call(libc::SYS_pread64),
    Call(libc::SYS_pwrite64),
    Call(libc::SYS_preadv),
    Call(libc::SYS_pwritev),
    Call(libc::SYS_preadv2),
    Call(libc::SYS_pwritev2),
    Call(libc::SYS_lseek),
    Call(libc::SYS_fdatasync),
    Call(libc::SYS_fallocate),
    // Disks on io_uring: submitting and waiting (the rings were set up before the filter);
    // frames to a tap, many per submission (its ring was set up when the tap was opened).
    Call(libc::SYS_io_uring_enter),
    // Taps: frames in and out (`read` above and `write` for every thread), the offloads when a
    // device is activated or reset from here, and a multi-queue tap's queues attached and
    // detached as the driver sets the queue pairs it uses (the control queue).
    Call(libc::SYS_readv),
    Call(libc::SYS_writev),
    Ioctls(&[ioctl::TUNSETOFFLOAD, ioctl::TUNSETQUEUE]),
    // A tap's receive polling timer, armed and disarmed as frames stream in and stop.
    Call(libc::SYS_timerfd_settime),
];

/// The main thread after set-up: the console loop and the stop sequence.
const MAIN: &[Allowed] = &[
    // Restoring the terminal at exit.
    Ioctls(&[ioctl::TCGETS, ioctl::TCSETS, ioctl::FIONBIO]),
    // The PIT's lost-tick policy, set once the vCPUs run (it waits for a host grace period).
    Ioctls(&[ioctl::KVM_REINJECT_CONTROL]),
    // The console loop: stdin, the signalfd, the reset, exit and power-off eventfds.
    Call(libc::SYS_epoll_wait),
    Call(libc::SYS_epoll_pwait),
    Call(libc::SYS_epoll_ctl),
    Call(libc::SYS_read),
    // Stopping the vCPUs: pthread_kill (tgkill, on every list) kicks each out of KVM_RUN.
    // `--serial socket=`: the console loop accepts one client at a time, and sends and hangs up
    // on it; the socket file goes at exit, as does the API's.
    Call(libc::SYS_accept4),
    Call(libc::SYS_accept),
    Call(libc::SYS_recvfrom),
    Call(libc::SYS_sendto),
    Call(libc::SYS_shutdown),
    Call(libc::SYS_unlink),
    Call(libc::SYS_unlinkat),
    // The status line and the metrics file, threads started from this one: the sleep between
    // two updates, and the file's flush.
    Call(libc::SYS_ppoll),
    Call(libc::SYS_poll),
    Call(libc::SYS_fsync),
    Call(libc::SYS_fdatasync),
    // Dropping a disk on io_uring at the end waits for its requests still in flight.
    Call(libc::SYS_io_uring_enter),
];

/// An API connection thread: one client's requests. Pre-boot changes (which stat and open the
/// files they name) and `InstanceStart` run on the main thread (see `api`), so this thread opens
/// nothing and touches KVM only to pause and resume.
const API_CONNECTION: &[Allowed] = &[
    // Requests in (`recv`), answers out (`send` with MSG_NOSIGNAL); `write` (every thread) also
    // carries FlushMetrics' line and SendCtrlAltDel's interrupt eventfd, `tgkill` the pause's kick.
    Call(libc::SYS_recvfrom),
    Call(libc::SYS_sendto),
    // PATCH /vm: the kvmclock is read at pause and written back at resume.
    Ioctls(&[ioctl::KVM_GET_CLOCK, ioctl::KVM_SET_CLOCK]),
];

/// `prctl` options: a new thread's name, and the no-new-privileges bit a filter needs.
const PRCTL_OPTIONS: &[u64] = &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64];
/// `setsockopt` options: a connection's read and write timeouts.
const SOCKET_TIMEOUTS: &[u64] = &[libc::SO_RCVTIMEO as u64, libc::SO_SNDTIMEO as u64];

/// The API's accept thread, beyond [`API_CONNECTION`] (its connection threads start under this
/// filter, and a filter that stacks on it can only take calls away).
const API: &[Allowed] = &[
    // Clients, each with its timeouts set before its thread starts; too many get a 503 (`sendto`).
    Call(libc::SYS_accept4),
    Args(libc::SYS_setsockopt, 2, SOCKET_TIMEOUTS),
    // Starting a connection thread (glibc 2.34 and later create threads with clone3), and what
    // the new thread does before its own filter is in: glibc's robust futex list and rseq area,
    // Rust's stack guard (pthread_getattr_np asks the affinity) and thread name, and then
    // installing its filter (seccomp can only ever remove calls).
    Call(libc::SYS_clone3),
    Call(libc::SYS_set_robust_list),
    Call(libc::SYS_rseq),
    Call(libc::SYS_sched_getaffinity),
    Args(libc::SYS_prctl, 0, PRCTL_OPTIONS),
    Args(
        libc::SYS_seccomp,
        0,
        &[libc::SECCOMP_SET_MODE_FILTER as u64],
    ),
];

/// What `--seccomp` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Filters; a call outside a thread's list ends the VMM.
    On,
    /// No filters (debugging).
    Off,
    /// Filters that only have the kernel log a call outside a thread's list (dmesg, audit record
    /// type 1326 `SECCOMP`), to find what a new code path needs.
    Log,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "on" => Ok(Mode::On),
            "off" => Ok(Mode::Off),
            "log" => Ok(Mode::Log),
            other => Err(format!("{other:?}: expected on, off or log")),
        }
    }
}

/// The BPF program of `kind`'s list: allowed calls pass, anything else traps (SIGSYS).
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, Error> {
    build(kind, SeccompAction::Trap)
}

fn build(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, Error> {
    let name = kind.name();
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for entry in kind.allowed() {
        match entry {
            Call(nr) => {
                rules.entry(nr).or_default();
            }
            Ioctls(values) | Args(_, _, values) => {
                let (nr, index) = match entry {
                    Args(nr, index, _) => (nr, index),
                    _ => (libc::SYS_ioctl, 1),
                };
                let arg_rules = rules.entry(nr).or_default();
                for &value in values {
                    let condition = SeccompCondition::new(
                        index,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        value,
                    )
                    .map_err(|e| Error::Build(name, e))?;
                    arg_rules.push(
                        SeccompRule::new(vec![condition]).map_err(|e| Error::Build(name, e))?,
                    );
                }
            }
        }
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| Error::Build(name, e))?;
    filter.try_into().map_err(|e| Error::Compile(name, e))
}

thread_local! {
    /// The kind whose filter confines this thread, for the SIGSYS handler's message.
    static CONFINED: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Installs `kind`'s filter on the calling thread as `mode` asks (and the SIGSYS handler, once
/// per process). A thread keeps its filter for life, and threads it spawns inherit it.
pub fn confine(kind: ThreadKind, mode: Mode) -> Result<(), Error> {
    let program = match mode {
        Mode::Off => return Ok(()),
        Mode::On => {
            install_sigsys_handler()?;
            filter(kind)?
        }
        Mode::Log => build(kind, SeccompAction::Log)?,
    };
    fix_malloc_arenas();
    CONFINED.with(|c| c.set(Some(kind)));
    seccompiler::apply_filter(&program).map_err(|e| Error::Install(kind.name(), e))
}

/// Sets glibc's limit on malloc arenas to the value glibc would pick itself, 8 per online CPU,
/// once per process and before the first filter goes in. Left unset, glibc counts the CPUs the
/// first time the process needs a ninth arena, by opening /sys/devices/system/cpu/online on
/// whichever thread allocates then: a burst of API connections made a connection thread do that
/// under the API filter.
fn fix_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    {
        static ARENAS: Once = Once::new();
        ARENAS.call_once(|| {
            // SAFETY: sysconf only reads the CPU count; mallopt only sets malloc's arena limit,
            // which glibc reads under its own lock.
            unsafe {
                let cpus = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).clamp(1, 1 << 20);
                libc::mallopt(libc::M_ARENA_MAX, 8 * cpus as libc::c_int);
            }
        });
    }
}

static HANDLER: Once = Once::new();
static HANDLER_ERROR: AtomicI32 = AtomicI32::new(0);

fn install_sigsys_handler() -> Result<(), Error> {
    HANDLER.call_once(|| {
        // SAFETY: sigaction is plain data, filled in before use; the handler only makes
        // async-signal-safe calls.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigsys as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
                let error = std::io::Error::last_os_error();
                HANDLER_ERROR.store(
                    error.raw_os_error().unwrap_or(libc::EINVAL),
                    Ordering::SeqCst,
                );
            }
        }
    });
    let error = HANDLER_ERROR.load(Ordering::SeqCst);
    if error != 0 {
        return Err(Error::Handler(std::io::Error::from_raw_os_error(error)));
    }
    Ok(())
}

/// The SIGSYS handler: one line on stderr, then the process ends by SIGSYS.
extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // siginfo's SIGSYS fields (asm-generic/siginfo.h): after si_signo, si_errno, si_code and
    // padding come _call_addr (a pointer), then _syscall (an int).
    // SAFETY: the kernel hands the handler a valid siginfo_t, which is 128 bytes long.
    let syscall = unsafe { *(info as *const u8).add(24).cast::<i32>() };
    // A thread that has not installed its own filter yet runs under the one it inherited (an API
    // connection thread at its start).
    let kind = CONFINED
        .with(|c| c.get())
        .map_or("newly started", ThreadKind::name);
    let article = match kind.as_bytes().first() {
        Some(b'A' | b'E' | b'I' | b'O' | b'U' | b'a' | b'e' | b'i' | b'o' | b'u') => "an ",
        _ => "a ",
    };
    let mut line = [0u8; 192];
    let mut len = 0;
    for part in [
        b"vmm: the seccomp filter of ".as_slice(),
        article.as_bytes(),
        kind.as_bytes(),
        b" thread stopped the VMM at system call ",
    ] {
        len += copy_into(&mut line[len..], part);
    }
    len += write_decimal(&mut line[len..], syscall);
    len += copy_into(
        &mut line[len..],
        b", which that thread never makes (see the README's seccomp lists; --seccomp off to debug)\n",
    );
    // SAFETY: write, signal, and raise are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.as_ptr().cast(), len);
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        let mut unblock: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut unblock);
        libc::sigaddset(&mut unblock, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &unblock, std::ptr::null_mut());
        libc::raise(libc::SIGSYS);
        // Not reached: SIGSYS's default action ends the process.
        libc::_exit(128 + libc::SIGSYS);
    }
}

fn copy_into(to: &mut [u8], from: &[u8]) -> usize {
    let n = from.len().min(to.len());
    to[..n].copy_from_slice(&from[..n]);
    n
}

fn write_decimal(to: &mut [u8], value: i32) -> usize {
    let mut digits = [0u8; 12];
    let mut n = 0;
    let mut v = i64::from(value).unsigned_abs();
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let mut len = 0;
    if value < 0 {
        len += copy_into(to, b"-");
    }
    while n > 0 && len < to.len() {
        n -= 1;
        to[len] = digits[n];
        len += 1;
    }
    len
}

/// Holds the vCPU threads, already confined, until the main thread's filter is in too.
#[derive(Clone, Default)]
pub struct StartGate {
    state: Arc<(Mutex<Option<bool>>, Condvar)>,
}

impl StartGate {
    /// Lets the waiting threads go on (`go`) or give up (`!go`, the VM is not starting).
    pub fn open(&self, go: bool) {
        let (lock, cvar) = &*self.state;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(go);
        cvar.notify_all();
    }

    /// Waits for [`open`](Self::open); true when the thread may start the guest.
    pub fn wait(&self) -> bool {
        let (lock, cvar) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(go) = *state {
                return go;
            }
            state = cvar.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    /// Set in the child process that [`a_call_outside_the_list_kills_the_process`] starts.
    const CHILD: &str = "VMM_SECCOMP_TEST_CHILD";

    #[test]
    fn every_kind_compiles() {
        for kind in ThreadKind::ALL {
            let program = filter(kind).unwrap();
            assert!(
                program.len() > 10,
                "{kind:?}: {} instructions",
                program.len()
            );
        }
    }

    #[test]
    fn ioctl_numbers_are_linuxs() {
        assert_eq!(ioctl::KVM_RUN, 0xae80);
        assert_eq!(ioctl::KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(ioctl::KVM_SET_SREGS, 0x4138_ae84);
        assert_eq!(ioctl::KVM_TRANSLATE, 0xc018_ae85);
        assert_eq!(ioctl::KVM_SET_VCPU_EVENTS, 0x4040_aea0);
        assert_eq!(ioctl::KVM_SIGNAL_MSI, 0x4020_aea5);
        assert_eq!(ioctl::KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(ioctl::KVM_GET_TSC_KHZ, 0xaea3);
        assert_eq!(ioctl::TUNSETOFFLOAD, 0x4004_54d0);
        assert_eq!(ioctl::TUNSETQUEUE, 0x4004_54d9);
        assert_eq!(ioctl::KVM_SET_CLOCK, 0x4030_ae7b);
        assert_eq!(ioctl::KVM_GET_CLOCK, 0x8030_ae7c);
    }

    /// Filters stack: a connection thread starts under the accept thread's filter, which must
    /// therefore allow everything the connection's own list does.
    #[test]
    fn the_api_list_holds_the_connection_list() {
        let api = ThreadKind::Api.allowed();
        for entry in ThreadKind::ApiConnection.allowed() {
            assert!(api.contains(&entry), "{entry:?} is not on the API list");
        }
    }

    /// Runs in the child only: a vCPU-confined thread makes calls on its list, then `getppid`,
    /// which no VMM thread makes.
    #[test]
    fn child_confined_thread_calls_outside_its_list() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        std::thread::spawn(|| {
            confine(ThreadKind::Vcpu, Mode::On).unwrap();
            eprintln!("confined");
            // SAFETY: getppid has no arguments and no effect.
            let parent = unsafe { libc::getppid() };
            eprintln!("still running after getppid: {parent}");
        })
        .join()
        .unwrap();
        std::process::exit(0);
    }

    /// Runs in the child only: an API accept thread, confined, starts a connection thread that
    /// narrows the inherited filter to its own list and then opens a file, which it never does.
    #[test]
    fn child_api_connection_thread_opens_a_file() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        std::thread::spawn(|| {
            confine(ThreadKind::Api, Mode::On).unwrap();
            std::thread::Builder::new()
                .name("api-conn".into())
                .spawn(|| {
                    confine(ThreadKind::ApiConnection, Mode::On).unwrap();
                    eprintln!("confined");
                    let file = std::fs::File::open("/dev/null");
                    eprintln!("still running after open: {file:?}");
                })
                .unwrap()
                .join()
                .unwrap();
        })
        .join()
        .unwrap();
        std::process::exit(0);
    }

    /// Runs in the child only: an API accept thread, confined, starts a burst of threads that
    /// are alive and allocating at once, as a burst of connections does: enough for glibc to
    /// want a ninth malloc arena, which must not make it open a file under the filter.
    #[test]
    fn child_api_thread_starts_a_burst_of_threads() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        std::thread::spawn(|| {
            confine(ThreadKind::Api, Mode::On).unwrap();
            let all = Arc::new(std::sync::Barrier::new(33));
            let threads: Vec<_> = (0..32)
                .map(|i| {
                    let all = all.clone();
                    std::thread::spawn(move || {
                        let held = vec![i as u8; 4096];
                        all.wait();
                        held.len()
                    })
                })
                .collect();
            all.wait();
            for thread in threads {
                assert_eq!(thread.join().unwrap(), 4096);
            }
            eprintln!("burst served");
        })
        .join()
        .unwrap();
        std::process::exit(0);
    }

    #[test]
    fn a_burst_of_api_connection_threads_stays_within_the_filter() {
        let (status, stderr) = run_child("child_api_thread_starts_a_burst_of_threads");
        assert!(status.success(), "{status:?}: {stderr}");
        assert!(stderr.contains("burst served"), "{stderr}");
    }

    /// Runs the child test `name`: its exit status and stderr.
    fn run_child(name: &str) -> (std::process::ExitStatus, String) {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &format!("seccomp::tests::{name}"),
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn assert_killed(name: &str, kind: &str, syscall: i64) {
        let (status, stderr) = run_child(name);
        assert!(stderr.contains("confined"), "{stderr}");
        assert!(!stderr.contains("still running"), "{stderr}");
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}: {stderr}");
        let expected = format!(
            "vmm: the seccomp filter of {kind} thread stopped the VMM at system call {syscall}, "
        );
        assert!(stderr.contains(&expected), "{stderr}");
    }

    #[test]
    fn a_call_outside_the_list_kills_the_process() {
        assert_killed(
            "child_confined_thread_calls_outside_its_list",
            "a vCPU",
            libc::SYS_getppid,
        );
    }

    /// The connection thread's own filter takes effect on top of the accept thread's (which
    /// lets it install that filter), and it opens no file.
    #[test]
    fn an_api_connection_thread_cannot_open_files() {
        assert_killed(
            "child_api_connection_thread_opens_a_file",
            "an API connection",
            libc::SYS_openat,
        );
    }

    #[test]
    fn the_gate_releases_every_waiter_with_the_same_answer() {
        let gate = StartGate::default();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let gate = gate.clone();
                std::thread::spawn(move || gate.wait())
            })
            .collect();
        gate.open(false);
        for waiter in waiters {
            assert!(!waiter.join().unwrap());
        }
    }
}
