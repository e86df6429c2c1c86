//! Composes the `arch`, `memory`, `boot`, `cpu` and device crates (`bus`, `legacy`, `pci`,
//! `virtio`, `virtio-blk`, `virtio-net`, `virtio-rng`) into a running virtual machine.
//!
//! [`Vmm::build`] is the whole recipe, in the order KVM and the guest need it: the VM, guest memory,
//! kernel and initramfs beside the CPU feature probe, then the memory slots and the platform
//! (irqchip, PIT, TSS) before any vCPU, the legacy devices, the command line, the boot tables, and
//! last the vCPUs. [`Vmm::run`] starts the vCPUs and serves the console until the guest ends.

pub mod api;
pub mod config;
pub mod console;
pub mod console_io;
pub mod control;
pub mod fuzz;
pub mod legacy_ports;
pub mod metrics;
pub mod msi_routing;
pub mod pci_bars;
pub mod plug;
pub mod power;
pub mod seccomp;
pub mod status;
pub mod terminal;
pub mod virtio_devices;

mod kvm_pvm;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use bus::Bus;
use cpu::{Vcpu, VcpuStop, VmOps};
use legacy::{CmosRtc, DebugPort, Uart8250, I8042};

pub use config::{ConfigError, VmConfig};
pub use control::VmControl;

/// Where guest RAM must leave room for the IOAPIC, the LAPIC and PCI BARs.
const MMIO_HOLE: memory::MmioHole = memory::MmioHole {
    start: arch::layout::MMIO_HOLE_START,
    end: arch::layout::MMIO_HOLE_END,
};

/// How often vCPUs that made no exits are checked for a halt with interrupts disabled.
const HALT_PROBE_PERIOD: Duration = Duration::from_secs(1);

use arch::layout::{COM1_IRQ, KEYBOARD_IRQ};

/// Everything that can stop the VMM, each with the exit status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{0}")]
    Memory(#[from] memory::Error),
    #[error("{0}")]
    Boot(#[from] boot::Error),
    #[error("{0}")]
    Arch(#[from] arch::Error),
    #[error("{0}")]
    Vcpu(#[from] cpu::Error),
    #[cfg(feature = "pvm")]
    #[error("{0}")]
    Syscall(#[from] pvm::SyscallError),
    #[error("{0}")]
    Virtio(#[from] virtio_devices::Error),
    #[error("cannot set up the device bus: {0}")]
    Bus(#[from] bus::BusError),
    #[error("{0}")]
    Console(#[from] console::Error),
    #[error("{0}")]
    Serial(#[from] console_io::Error),
    #[error("{0}")]
    Metrics(#[from] metrics::Error),
    #[error("{0}")]
    Api(#[from] api::Error),
    #[error("cannot create an event descriptor: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("{0}")]
    Seccomp(#[from] seccomp::Error),
    #[error("{0}")]
    GuestFailed(String),
    #[error("{}", signalled_message(*signal, *timeout))]
    Signalled {
        signal: u32,
        /// How long the guest had to power off after the power button, if it was pressed.
        timeout: Option<Duration>,
    },
}

fn signalled_message(signal: u32, timeout: Option<Duration>) -> String {
    match timeout {
        Some(t) => format!(
            "the guest did not power off within {t:?} of signal {signal} and its power button; stopped it"
        ),
        None => format!("stopped the guest on signal {signal}"),
    }
}

impl Error {
    /// Exit status for this error: 2 for bad user input, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_)
            | Error::Memory(memory::Error::TooSmall(_))
            | Error::Memory(memory::Error::MoreThanHost(..))
            | Error::Memory(memory::Error::Unaligned(_)) => 2,
            Error::Boot(e) if e.is_user_input() => 2,
            Error::Virtio(e) if e.is_user_input() => 2,
            Error::Serial(e) if e.is_user_input() => 2,
            Error::Metrics(_) => 2,
            Error::Api(e) if e.is_user_input() => 2,
            // As a process killed by the signal would end.
            Error::Signalled { signal, .. } => 128 + *signal as i32,
            _ => 1,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Port-I/O and MMIO buses, the VMM's answer to every guest access that leaves a vCPU.
pub struct Buses {
    pub pio: Bus,
    /// Shared with the PCI BAR mover, which changes it while the guest runs.
    pub mmio: Arc<Bus>,
}

impl VmOps for Buses {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if !self.pio.read(u64::from(port), data) {
            log::trace!("read of unclaimed port {port:#x}");
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if !self.pio.write(u64::from(port), data) {
            log::trace!("write to unclaimed port {port:#x}");
        }
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) {
            log::debug!("read of unclaimed MMIO address {addr:#x}");
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.mmio.write(addr, data) {
            log::debug!("write to unclaimed MMIO address {addr:#x}");
        }
    }
}

/// A VM that is built and ready to run.
pub struct Vmm {
    // Kept alive: the VM's fd and memory must outlive the vCPUs.
    _kvm: Kvm,
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    vcpus: Vec<Vcpu>,
    device_workers: Vec<virtio::events::DeviceEventLoop>,
    serial: Arc<Mutex<Uart8250>>,
    console_input: console_io::ConsoleInput,
    console_stats: Arc<console_io::ConsoleStats>,
    console_stdio: bool,
    _console_peer: Option<File>,
    metrics: Option<metrics::Metrics>,
    metrics_interval: Duration,
    vcpu_metrics: Vec<Arc<cpu::VcpuMetrics>>,
    i8042: Arc<Mutex<I8042>>,
    reset_evt: EventFd,
    power: Option<power::Power>,
    shutdown_timeout: Duration,
    started: Instant,
    seccomp: seccomp::Mode,
}

/// The files the user named, opened and checked before any VM exists.
struct Inputs {
    kernel: File,
    initramfs: Option<File>,
}

fn open_inputs(config: &VmConfig) -> Result<Inputs> {
    let kernel_path = config.kernel.clone().unwrap_or_default();
    let checked = config::open_checked(&kernel_path, "the kernel", false, false)?;
    let mut kernel = match checked {
        Some(file) => file,
        None => File::open(&kernel_path).map_err(|source| ConfigError::KernelUnreadable {
            path: kernel_path.clone(),
            source,
        })?,
    };
    boot::identify_kernel(&mut kernel)?;
    kernel
        .seek(SeekFrom::Start(0))
        .map_err(|source| ConfigError::KernelUnreadable {
            path: kernel_path.clone(),
            source,
        })?;
    let initramfs = match &config.initramfs {
        Some(path) => match config::open_checked(path, "the initramfs", false, false)? {
            Some(file) => Some(file),
            None => Some(
                File::open(path).map_err(|source| ConfigError::InitramfsUnreadable {
                    path: path.clone(),
                    source,
                })?,
            ),
        },
        None => None,
    };
    Ok(Inputs { kernel, initramfs })
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// The device workers' start: their seccomp filter.
fn worker_start(mode: seccomp::Mode) -> virtio::events::WorkerStart {
    std::sync::Arc::new(move |_name: &str| {
        seccomp::confine(seccomp::ThreadKind::DeviceWorker, mode).map_err(|e| e.to_string())
    })
}

/// What runs first on a thread: where it confines itself. An error ends the thread.
pub type ThreadStart = Box<dyn FnOnce() -> std::result::Result<(), String> + Send>;

/// The start of a helper thread of the main thread (metrics, status line): the main thread's
/// filter.
fn main_kind_start(mode: seccomp::Mode) -> ThreadStart {
    Box::new(move || seccomp::confine(seccomp::ThreadKind::Main, mode).map_err(|e| e.to_string()))
}

/// Sets the PIT's lost-tick policy ([`arch::platform::discard_lost_pit_ticks`]) on a short-lived
/// thread of the main thread's kind, while the vCPUs start: the ioctl waits for an SRCU grace
/// period in the host kernel (16 ms on kvm-pvm, most of the start-up time when it ran first), and
/// no guest programs the PIT within its first milliseconds. The thread is not joined: it ends by
/// itself after the ioctl, and a guest that stops at once does not wait for it.
fn discard_lost_pit_ticks_aside(vm: Arc<VmFd>, mode: seccomp::Mode) {
    let start = main_kind_start(mode);
    let for_thread = vm.clone();
    let spawned = std::thread::Builder::new()
        .name("pit-policy".into())
        .spawn(move || {
            let vm = for_thread;
            if let Err(e) = start() {
                log::error!("{e}");
                return;
            }
            if let Err(e) = arch::platform::discard_lost_pit_ticks(&vm) {
                log::warn!("{e}; the PIT re-injects the ticks a slow guest misses");
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the PIT policy thread ({e}); setting it here");
        if let Err(e) = arch::platform::discard_lost_pit_ticks(&vm) {
            log::warn!("{e}; the PIT re-injects the ticks a slow guest misses");
        }
    }
}

/// A vCPU's start: its seccomp filter, then the wait for the main thread's.
fn vcpu_start(mode: seccomp::Mode, gate: &seccomp::StartGate) -> cpu::ThreadStart {
    let gate = gate.clone();
    Box::new(move || {
        seccomp::confine(seccomp::ThreadKind::Vcpu, mode).map_err(|e| e.to_string())?;
        if gate.wait() {
            Ok(())
        } else {
            Err("the VMM did not start".into())
        }
    })
}

/// What [`Vmm::build`] prepares beside the CPU feature probe: nothing here changes the VM in a way
/// that makes KVM wait for an SRCU grace period (see [`attach_memory_and_platform`]).
struct Prepared {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    supported_cpuid: kvm_bindings::CpuId,
    kernel: boot::LoadedKernel,
    initramfs: Option<boot::Initramfs>,
}

/// Creates the VM and its guest RAM (not yet registered with KVM), fetches the supported CPUID
/// once for every vCPU, and loads the kernel and initramfs into guest memory.
fn prepare(kvm: &Kvm, config: &VmConfig, inputs: &mut Inputs) -> Result<Prepared> {
    let decompress = boot::Decompress::from(config.kernel_decompress);
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("creating a VM"))?);
    let mem = memory::create_guest_memory(config.memory, MMIO_HOLE)?;
    let supported_cpuid = arch::supported_cpuid(kvm)?;
    let kernel = boot::load_kernel(
        &mem,
        &mut inputs.kernel,
        &boot::KernelOptions {
            decompress,
            protocol: config.boot_protocol.into(),
        },
    )?;
    log::info!(
        "booting through {} at {:#x}",
        kernel.protocol.name(),
        kernel.entry.0
    );
    let initramfs = match inputs.initramfs.as_mut() {
        Some(file) => Some(boot::load_initramfs(
            &mem,
            file,
            &kernel,
            memory::low_ram_end(&mem),
        )?),
        None => None,
    };
    Ok(Prepared {
        vm,
        mem,
        supported_cpuid,
        kernel,
        initramfs,
    })
}

/// Registers guest RAM as memory slots, then creates the platform devices (irqchip, PIT and TSS,
/// which must exist before any vCPU).
///
/// Order matters for set-up time. Once a VM has an in-kernel irqchip, the next memory slot change
/// or MSR filter waits for an SRCU grace period in the host kernel: 5 to 19 ms measured on
/// kvm-pvm, against 0.1 ms before the irqchip exists. So the MSR filter of the syscall trampoline
/// (installed by [`kvm_pvm::set_up`]) and the slots go in first.
fn attach_memory_and_platform(kvm: &Kvm, vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    memory::register_slots(vm, mem, kvm.get_nr_memslots())?;
    arch::platform::create_platform(vm)?;
    Ok(())
}

/// Says loudly when the user turned the seccomp filters off or to logging only.
fn warn_unconfined(mode: seccomp::Mode) {
    match mode {
        seccomp::Mode::On => {}
        seccomp::Mode::Off => log::warn!(
            "--seccomp off: NO seccomp filters; a guest that takes over a VMM thread reaches \
             every system call this user may make. For debugging only."
        ),
        seccomp::Mode::Log => log::warn!(
            "--seccomp log: the seccomp filters only log what they would refuse (dmesg); \
             nothing is enforced. For debugging only."
        ),
    }
}

/// Build phase 1: the user's input, checked and opened before any VM exists.
struct UserInput {
    policy: kvm_pvm::Policy,
    files: Inputs,
    metrics_file: Option<File>,
    console: console_io::ConsoleBackend,
}

/// Checks sizes and counts, opens the kernel, initramfs, metrics file and console.
fn check_user_input(config: &VmConfig, started: Instant) -> Result<UserInput> {
    memory::validate_size(config.memory)?;
    config.check_cpus(usize::MAX)?;
    let policy = kvm_pvm::policy(config.cpu_features.name())?;
    let files = open_inputs(config)?;
    let metrics_file = config
        .metrics_file
        .as_deref()
        .map(metrics::open_file)
        .transpose()?;
    let console = console_io::open(&config.serial, started)?;
    Ok(UserInput {
        policy,
        files,
        metrics_file,
        console,
    })
}

/// The console's host side, kept for the run.
struct Console {
    input: console_io::ConsoleInput,
    stats: Arc<console_io::ConsoleStats>,
    stdio: bool,
    description: String,
    pty_peer: Option<File>,
}

/// Build phase 3: the legacy devices and what the run keeps of them.
struct Legacy {
    /// The port bus, with the legacy devices on it.
    pio: Bus,
    serial: Arc<Mutex<Uart8250>>,
    i8042: Arc<Mutex<I8042>>,
    reset_evt: EventFd,
    power: Option<power::Power>,
    console: Console,
}

/// Puts the 8250 on COM1, the i8042, the CMOS RTC, the debug port, the embedding program's port
/// devices and (with ACPI) the PM1a block on the port bus, their interrupts on irqfds.
fn attach_legacy_devices(
    vm: &VmFd,
    config: &VmConfig,
    console: console_io::ConsoleBackend,
    extra: &plug::ExtraDevices,
    started: Instant,
) -> Result<Legacy> {
    let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(kvm_err("the serial port's irqfd"))?;
    let kbd_irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&kbd_irq, KEYBOARD_IRQ)
        .map_err(kvm_err("the keyboard controller's irqfd"))?;
    let console_io::ConsoleBackend {
        output,
        input,
        stats,
        stdio,
        description,
        pty_peer,
    } = console;
    let serial = Arc::new(Mutex::new(Uart8250::new(Box::new(output), serial_irq)));
    let i8042 = Arc::new(Mutex::new(I8042::new(
        reset_evt.try_clone().map_err(Error::EventFd)?,
        Some(kbd_irq),
    )));
    let below_4g = config.memory.min(MMIO_HOLE.start);
    let cmos = CmosRtc::new(below_4g, config.memory - below_4g);
    let mut pio =
        legacy_ports::port_bus(serial.clone(), i8042.clone(), cmos, DebugPort::new(started))?;
    extra.attach_ports(&pio)?;
    let power = config
        .acpi
        .is_on()
        .then(|| power::attach_pm(vm, &mut pio))
        .transpose()?;
    Ok(Legacy {
        pio,
        serial,
        i8042,
        reset_evt,
        power,
        console: Console {
            input,
            stats,
            stdio,
            description,
            pty_peer,
        },
    })
}

/// What build phase 5 writes into guest memory.
struct BootTables<'a> {
    config: &'a VmConfig,
    mem: &'a GuestMemoryMmap,
    kernel: &'a boot::LoadedKernel,
    initramfs: Option<&'a boot::Initramfs>,
    cmdline: &'a str,
    num_cpus: u8,
    virtio: &'a virtio_devices::VirtioSetup,
}

/// Build phase 5: the command line, e820, the ACPI tables, the boot protocol's own block (zero
/// page or PVH start info) and the MP table. Returns how the vCPUs enter the kernel.
fn write_boot_tables(t: &BootTables<'_>) -> Result<arch::BootMode> {
    boot::load_cmdline(
        t.mem,
        GuestAddress(arch::layout::CMDLINE_START),
        t.cmdline,
        t.kernel
            .max_cmdline_len()
            .min(arch::layout::CMDLINE_MAX_SIZE - 1),
    )?;
    log::info!("kernel command line: {}", t.cmdline);
    let ram: Vec<(u64, u64)> = memory::ram_ranges(t.config.memory, MMIO_HOLE)
        .into_iter()
        .map(|(start, len)| (start.0, len))
        .collect();
    let e820 = arch::bootparams::e820_entries(&ram)?;
    let initrd = t.initramfs.map(|i| arch::bootparams::InitrdRange {
        addr: i.addr,
        size: i.size,
    });
    let acpi = t
        .config
        .acpi
        .is_on()
        .then(|| power::write_acpi_tables(t.mem, t.num_cpus, Some(t.virtio)))
        .transpose()?;
    let acpi_rsdp = acpi.as_ref().map(|tables| tables.rsdp());
    let boot_mode = match t.kernel.protocol {
        boot::BootProtocol::Linux64 => {
            arch::bootparams::write_boot_params(
                t.mem,
                &arch::bootparams::BootParamsConfig {
                    setup_header: t.kernel.setup_header,
                    cmdline_addr: GuestAddress(arch::layout::CMDLINE_START),
                    cmdline_size: t.cmdline.len() + 1,
                    initrd,
                    e820: &e820,
                    acpi_rsdp,
                },
            )?;
            arch::BootMode::Linux64 {
                zero_page: arch::layout::ZERO_PAGE_START,
            }
        }
        boot::BootProtocol::Pvh => {
            let start_info = arch::pvh::write_start_info(
                t.mem,
                &arch::pvh::PvhConfig {
                    cmdline_addr: GuestAddress(arch::layout::CMDLINE_START),
                    initrd,
                    e820: &e820,
                    acpi_rsdp,
                },
            )?;
            arch::BootMode::Pvh {
                start_info: start_info.0,
            }
        }
    };
    let mut mptable = arch::mptable::MpTable::new(t.num_cpus)?;
    if t.virtio.pci {
        mptable = mptable.with_pci_bus(&t.virtio.pci_routes)?;
    }
    mptable.write(t.mem)?;
    Ok(boot_mode)
}

/// Build phase 6: one vCPU per `cpu_id`, each set up by `configure` (registers, CPUID, MSRs,
/// FPU, LAPIC), which also returns the vCPU's exit hook.
fn create_vcpus(
    vm: &VmFd,
    num_cpus: u8,
    buses: Arc<dyn VmOps>,
    mut configure: impl FnMut(u8, &kvm_ioctls::VcpuFd) -> Result<Option<Box<dyn cpu::ExitHook>>>,
) -> Result<Vec<Vcpu>> {
    let mut vcpus = Vec::with_capacity(usize::from(num_cpus));
    for cpu_id in 0..num_cpus {
        let fd = vm
            .create_vcpu(u64::from(cpu_id))
            .map_err(kvm_err("creating a vCPU"))?;
        let hook = configure(cpu_id, &fd)?;
        vcpus.push(Vcpu::new(usize::from(cpu_id), fd, buses.clone()).with_exit_hook(hook));
    }
    Ok(vcpus)
}

/// What the start-up line reports.
struct StartupFacts<'a> {
    config: &'a VmConfig,
    protocol: &'static str,
    entry: u64,
    num_cpus: u8,
    console: &'a str,
    virtio: &'a [virtio_devices::DeviceSummary],
    transport: &'static str,
    elapsed: Duration,
}

/// The info line that says what was built: kernel and protocol, vCPUs, memory, the console, and
/// every device with its address and interrupt.
fn startup_line(facts: &StartupFacts<'_>) -> String {
    let config = facts.config;
    let mut devices = legacy_ports::describe(facts.console);
    if config.acpi.is_on() {
        devices.push(format!(
            "ACPI PM at port {:#x} SCI IRQ {}",
            legacy::AcpiPm::PORT_BASE,
            legacy::AcpiPm::SCI_IRQ
        ));
    }
    for device in facts.virtio {
        devices.push(format!(
            "{} ({}) at {}",
            device.name, facts.transport, device.placement
        ));
    }
    format!(
        "VM built in {:?}: kernel {} ({}, entry {:#x}){}, {} vCPU{}, {} MiB, ACPI {}; devices: {}",
        facts.elapsed,
        config
            .kernel
            .as_deref()
            .unwrap_or_else(|| std::path::Path::new("-"))
            .display(),
        facts.protocol,
        facts.entry,
        config
            .initramfs
            .as_ref()
            .map(|p| format!(", initramfs {}", p.display()))
            .unwrap_or_default(),
        facts.num_cpus,
        if facts.num_cpus == 1 { "" } else { "s" },
        config.memory >> 20,
        if config.acpi.is_on() { "on" } else { "off" },
        devices.join("; ")
    )
}

impl Vmm {
    /// The metrics file's writer, when `--metrics-file` was given: the API's `FlushMetrics`
    /// calls [`metrics::Metrics::flush`] on it.
    pub fn metrics(&self) -> Option<metrics::Metrics> {
        self.metrics.clone()
    }

    /// Writes a metrics line now, if there is a metrics file.
    pub fn flush_metrics(&self) -> std::io::Result<()> {
        self.metrics
            .as_ref()
            .map_or(Ok(()), metrics::Metrics::flush)
    }

    /// Builds the VM described by `config`.
    pub fn build(config: &VmConfig) -> Result<Vmm> {
        Self::build_with(config, plug::ExtraDevices::default())
    }

    /// Builds the VM described by `config` with the devices of `extra` added: the way a program
    /// attaches devices written outside this workspace (see [`plug`]).
    pub fn build_with(config: &VmConfig, mut extra: plug::ExtraDevices) -> Result<Vmm> {
        let started = Instant::now();
        warn_unconfined(config.seccomp);
        // 1. The user's input: cheap checks first, so that mistakes cost no VM.
        let UserInput {
            policy,
            mut files,
            metrics_file,
            console,
        } = check_user_input(config, started)?;
        let kvm = Kvm::new().map_err(Error::KvmOpen)?;
        let num_cpus = config.check_cpus(kvm.get_max_vcpus())?;

        // 2. Memory, the kernel and the platform (irqchip, PIT). What the host's KVM cannot run is hidden through the kernel
        // command line. The probe runs in a scratch VM of its own, on its own thread, beside the
        // work that needs neither its answer nor a change to this VM that KVM serialises (see
        // `attach_memory_and_platform`): creating the VM and guest memory, and loading the kernel
        // and initramfs, whose host-side decompression hides the probe entirely on Linux boots.
        // Where KVM emulates the guest kernel, its `syscall` needs the VMM's help to reach ring
        // 0: that MSR filter goes in before the irqchip exists.
        let (host, prepared) = kvm_pvm::set_up(&kvm, policy, || prepare(&kvm, config, &mut files))?;
        let Prepared {
            vm,
            mem,
            supported_cpuid,
            kernel,
            initramfs,
        } = prepared;
        attach_memory_and_platform(&kvm, &vm, &mem)?;

        // 3. Legacy devices on the port bus. 4. Virtio devices on the transport the user chose.
        let legacy = attach_legacy_devices(&vm, config, console, &extra, started)?;
        let mut pio = legacy.pio;
        let mmio = Arc::new(Bus::new());
        let virtio = virtio_devices::attach(
            config,
            &vm,
            &mem,
            &mut pio,
            &mmio,
            std::mem::take(&mut extra.virtio),
        )?;
        let buses: Arc<dyn VmOps> = Arc::new(Buses { pio, mmio });

        // 5. The command line and boot tables.
        let mut cmdline = config.base_cmdline();
        for part in host.cmdline_switches().iter().chain(&virtio.cmdline) {
            cmdline.push(' ');
            cmdline.push_str(part);
        }
        let boot_mode = write_boot_tables(&BootTables {
            config,
            mem: &mem,
            kernel: &kernel,
            initramfs: initramfs.as_ref(),
            cmdline: &cmdline,
            num_cpus,
            virtio: &virtio,
        })?;

        // 6. The vCPUs, ready to run.
        let vcpus = create_vcpus(&vm, num_cpus, buses, |cpu_id, fd| {
            arch::configure_vcpu(
                &supported_cpuid,
                fd,
                &mem,
                &arch::VcpuBootConfig {
                    cpu_id,
                    num_cpus,
                    entry: kernel.entry.0,
                    mode: boot_mode,
                },
            )?;
            Ok(host.exit_hook(&mem))
        })?;

        // 7. Metrics and the start-up line.
        let vcpu_metrics: Vec<_> = vcpus.iter().map(Vcpu::metrics).collect();
        let Console {
            input: console_input,
            stats: console_stats,
            stdio: console_stdio,
            description: console_description,
            pty_peer: console_peer,
        } = legacy.console;
        let metrics = metrics_file.map(|file| {
            metrics::Metrics::new(
                file,
                metrics::Sources {
                    started,
                    vcpus: vcpu_metrics.clone(),
                    devices: virtio
                        .devices
                        .iter()
                        .filter_map(|d| Some((d.name.clone(), d.metrics.clone()?)))
                        .collect(),
                    console: console_stats.clone(),
                },
            )
        });
        log::info!(
            "{}",
            startup_line(&StartupFacts {
                config,
                protocol: kernel.protocol.name(),
                entry: kernel.entry.0,
                num_cpus,
                console: &console_description,
                virtio: &virtio.devices,
                transport: if virtio.pci {
                    "virtio-pci"
                } else {
                    "virtio-mmio"
                },
                elapsed: started.elapsed(),
            })
        );
        Ok(Vmm {
            _kvm: kvm,
            vm,
            mem,
            vcpus,
            device_workers: virtio.workers,
            serial: legacy.serial,
            console_input,
            console_stats,
            console_stdio,
            _console_peer: console_peer,
            metrics,
            metrics_interval: config.metrics_interval,
            vcpu_metrics,
            i8042: legacy.i8042,
            reset_evt: legacy.reset_evt,
            power: legacy.power,
            shutdown_timeout: config.shutdown_timeout,
            started,
            seccomp: config.seccomp,
        })
    }

    /// Runs the guest until it ends. Returns Ok when it ended normally (reset, power-off, panic with
    /// `panic=1`), an error naming the vCPU and the exit when KVM failed.
    pub fn run(self) -> Result<()> {
        self.run_with(&VmControl::new())
    }

    /// [`Vmm::run`], with the vCPUs reachable through `control` (pause, resume, Ctrl-Alt-Del)
    /// while the guest runs.
    pub fn run_with(self, control: &VmControl) -> Result<()> {
        let Vmm {
            _kvm,
            vm,
            mem,
            vcpus,
            device_workers,
            serial,
            console_input,
            console_stats,
            console_stdio,
            _console_peer,
            metrics,
            metrics_interval,
            vcpu_metrics,
            i8042,
            reset_evt,
            power,
            shutdown_timeout,
            started,
            seccomp,
        } = self;
        let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        // First, so that every thread started below inherits the blocked termination signals
        // and only the console loop sees them.
        let mut console =
            console::Console::new(serial, console_input, console_stdio, &reset_evt, &exit_evt)?;
        if let Some(power) = &power {
            console.watch_power_off(&power.off_evt)?;
        }
        let mut shutdown = power::Shutdown::new(shutdown_timeout);
        // Each thread confines itself before it touches anything the guest controls, the vCPUs
        // wait at the gate until this thread is confined too (see `seccomp`).
        let gate = seccomp::StartGate::default();
        let device_io = device_workers
            .into_iter()
            .map(|worker| worker.start_with(worker_start(seccomp)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| virtio_devices::Error::Device(e.to_string()))?;
        // Threads of the main thread's kind, each confining itself first.
        let flusher = match &metrics {
            Some(m) => Some(
                metrics::Flusher::start(m.clone(), metrics_interval, main_kind_start(seccomp))
                    .map_err(Error::EventFd)?,
            ),
            None => None,
        };
        let status_line = {
            let vcpu_metrics = vcpu_metrics.clone();
            status::StatusLine::start(
                started,
                console_stats.clone(),
                move || status::Sample {
                    vcpus_running: vcpu_metrics.iter().filter(|m| m.is_running()).count(),
                    vcpus: vcpu_metrics.len(),
                    exits: vcpu_metrics.iter().map(|m| m.total()).sum(),
                },
                main_kind_start(seccomp),
            )
        };
        let mut handles = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let evt = exit_evt.try_clone().map_err(Error::EventFd)?;
            handles.push(
                vcpu.with_thread_start(vcpu_start(seccomp, &gate))
                    .start(evt)?,
            );
        }
        discard_lost_pit_ticks_aside(vm.clone(), seccomp);
        let confined = seccomp::confine(seccomp::ThreadKind::Main, seccomp);
        gate.open(confined.is_ok());
        if let Err(e) = confined {
            log::error!("{e}");
            for handle in handles {
                handle.join();
            }
            drop(device_io);
            return Err(e.into());
        }
        log::info!("first KVM_RUN after {:?}", started.elapsed());
        control.set_metrics(metrics.clone());
        control.attach(
            handles,
            vm.clone(),
            i8042,
            power.as_ref().map(power::Power::button),
        );
        // A vCPU that makes no exits for a tick is probed for `cli; hlt`.
        console.set_tick(HALT_PROBE_PERIOD);
        let mut last_exits: Vec<u64> = vcpu_metrics.iter().map(|m| m.total()).collect();
        let why = loop {
            match console.serve()? {
                console::EndReason::Tick => {
                    if device_io.iter().any(|worker| worker.is_finished()) {
                        break console::EndReason::DeviceWorkerDied;
                    }
                    if control.failure().is_some() {
                        break console::EndReason::ApiFailed;
                    }
                    if vcpu_metrics.iter().all(|m| m.is_halted_for_good()) {
                        break console::EndReason::GuestHalted;
                    }
                    let mut quiet = Vec::new();
                    for (index, (metrics, last)) in
                        vcpu_metrics.iter().zip(&mut last_exits).enumerate()
                    {
                        let now = metrics.total();
                        if now == *last && metrics.is_running() {
                            quiet.push(index);
                        }
                        *last = now;
                    }
                    // A paused vCPU is quiet by request.
                    if !quiet.is_empty() && !control.is_paused() {
                        control.for_each_vcpu(|handle| {
                            if quiet.contains(&handle.index()) {
                                handle.probe()
                            } else {
                                Ok(())
                            }
                        });
                    }
                }
                // A dump request would let a paused vCPU run: not while paused.
                console::EndReason::DumpRequested if !control.is_paused() => {
                    control.for_each_vcpu(|handle| handle.dump_state());
                }
                console::EndReason::Signal(signal) => {
                    match shutdown.on_signal(signal, power.as_ref()) {
                        power::SignalAction::WaitUntil(deadline) => {
                            console.set_deadline(Some(deadline))
                        }
                        power::SignalAction::Stop => break console::EndReason::Signal(signal),
                    }
                }
                console::EndReason::DumpRequested => {}
                end => break end,
            }
        };
        if why == console::EndReason::GuestHalted {
            log::warn!(
                "every vCPU halted with interrupts disabled and nothing can wake them: the guest \
                 stopped itself"
            );
        } else {
            log::info!("stopping the VM: {why}");
        }
        control.for_each_vcpu(|handle| handle.stop());
        drop(status_line);
        let mut failure = None;
        let mut emulated = Vec::new();
        for handle in control.detach() {
            let report = handle.join();
            if report.stop == VcpuStop::Halted {
                log::warn!(
                    "vCPU {} halted with interrupts disabled and nothing can wake it: the guest \
                     stopped itself",
                    report.index
                );
            }
            if !report.emulated.is_empty() {
                emulated.push((report.index, report.emulated.clone()));
            }
            log::debug!(
                "vCPU {} ended after {} exits: {:?}",
                report.index,
                report.exits,
                report.stop
            );
            if !report.emulated.is_empty() {
                log::debug!(
                    "vCPU {}: instructions run by the fallback emulator: {:?}",
                    report.index,
                    report.emulated
                );
            }
            if let VcpuStop::Failed(msg) = report.stop {
                failure.get_or_insert(msg);
            }
        }
        if let Some(message) = control.failure() {
            failure.get_or_insert(message);
        }
        if why == console::EndReason::DeviceWorkerDied {
            failure.get_or_insert_with(|| {
                "a virtio device thread ended while the guest ran; stopped the VM".to_string()
            });
        }
        for worker in device_io {
            if let Err(e) = worker.stop() {
                failure.get_or_insert_with(|| format!("a virtio device thread failed: {e}"));
            }
        }
        drop(flusher);
        if let Some(m) = &metrics {
            if let Err(e) = m.flush_final(&emulated) {
                log::warn!("cannot write metrics: {e}");
            }
        }
        drop(vm);
        drop(mem);
        match (failure, shutdown.outcome(why)) {
            (Some(msg), _) => Err(Error::GuestFailed(msg)),
            (None, Some(stopped)) => Err(stopped),
            (None, None) => Ok(()),
        }
    }
}
