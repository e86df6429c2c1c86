//! Composes the `arch`, `memory`, `boot`, `cpu` and `devices` crates into a running virtual machine.
//!
//! [`Vmm::build`] is the whole recipe, in the order KVM and the guest need it: the VM, guest memory,
//! kernel and initramfs beside the CPU feature probe, then the memory slots and the platform
//! (irqchip, PIT, TSS) before any vCPU, the legacy devices, the command line, the boot tables, and
//! last the vCPUs. [`Vmm::run`] starts the vCPUs and serves the console until the guest ends.

pub mod config;
pub mod console;
pub mod fuzz;
pub mod power;
pub mod seccomp;
pub mod terminal;
pub mod virtio;

mod kvm_pvm;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use cpu::{Vcpu, VcpuStop, VmOps};
use devices::bus::Bus;
use devices::legacy::{CmosRtc, DebugPort, Uart8250, I8042};

pub use config::{ConfigError, VmConfig};

/// Where guest RAM must leave room for the IOAPIC, the LAPIC and PCI BARs.
const MMIO_HOLE: memory::MmioHole = memory::MmioHole {
    start: arch::layout::MMIO_HOLE_START,
    end: arch::layout::MMIO_HOLE_END,
};

/// ISA interrupt lines of the legacy devices.
const COM1_IRQ: u32 = 4;
const KEYBOARD_IRQ: u32 = 1;

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
    Virtio(#[from] virtio::Error),
    #[error("cannot set up the device bus: {0}")]
    Bus(#[from] devices::bus::BusError),
    #[error("{0}")]
    Console(#[from] console::Error),
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
    pub mmio: Bus,
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
    event_loop: devices::virtio::events::DeviceEventLoop,
    serial: Arc<Mutex<Uart8250>>,
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
    let mut kernel =
        File::open(&config.kernel).map_err(|source| ConfigError::KernelUnreadable {
            path: config.kernel.clone(),
            source,
        })?;
    boot::identify_kernel(&mut kernel)?;
    kernel
        .seek(SeekFrom::Start(0))
        .map_err(|source| ConfigError::KernelUnreadable {
            path: config.kernel.clone(),
            source,
        })?;
    let initramfs = match &config.initramfs {
        Some(path) => {
            Some(
                File::open(path).map_err(|source| ConfigError::InitramfsUnreadable {
                    path: path.clone(),
                    source,
                })?,
            )
        }
        None => None,
    };
    Ok(Inputs { kernel, initramfs })
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// The device workers' start: their seccomp filter.
fn worker_start(mode: seccomp::Mode) -> devices::virtio::events::WorkerStart {
    std::sync::Arc::new(move |_name: &str| {
        seccomp::confine(seccomp::ThreadKind::DeviceWorker, mode).map_err(|e| e.to_string())
    })
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
fn prepare(
    kvm: &Kvm,
    config: &VmConfig,
    inputs: &mut Inputs,
    decompress: boot::Decompress,
) -> Result<Prepared> {
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("creating a VM"))?);
    let mem = memory::create_guest_memory(config.memory, MMIO_HOLE)?;
    let supported_cpuid = arch::supported_cpuid(kvm)?;
    let kernel = boot::load_kernel(
        &mem,
        &mut inputs.kernel,
        &boot::KernelOptions {
            decompress,
            protocol: config.boot_protocol,
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

impl Vmm {
    /// Builds the VM described by `config`.
    pub fn build(config: &VmConfig) -> Result<Vmm> {
        let started = Instant::now();
        match config.seccomp {
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
        // Cheap checks of the user's input first, so that mistakes cost no VM.
        memory::validate_size(config.memory)?;
        config.check_cpus(usize::MAX)?;
        let policy = kvm_pvm::policy(&config.cpu_features)?;
        let decompress = match config.kernel_decompress.as_str() {
            "host" => boot::Decompress::Host,
            "guest" => boot::Decompress::Guest,
            other => return Err(ConfigError::KernelDecompress(other.to_string()).into()),
        };
        let mut inputs = open_inputs(config)?;
        let kvm = Kvm::new().map_err(Error::KvmOpen)?;
        let num_cpus = config.check_cpus(kvm.get_max_vcpus())?;

        // What the host's KVM cannot run is hidden through the kernel command line. The probe
        // runs in a scratch VM of its own, on its own thread, beside the work that needs neither
        // its answer nor a change to this VM that KVM serialises (see `attach_memory_and_platform`):
        // creating the VM and guest memory, and loading the kernel and initramfs, whose host-side
        // decompression hides the probe entirely on Linux boots. Where KVM emulates the guest
        // kernel, its `syscall` needs the VMM's help to reach ring 0: that MSR filter goes in
        // before the irqchip exists.
        let (host, prepared) = kvm_pvm::set_up(&kvm, policy, || {
            prepare(&kvm, config, &mut inputs, decompress)
        })?;
        let Prepared {
            vm,
            mem,
            supported_cpuid,
            kernel,
            initramfs,
        } = prepared;
        let mut cmdline = config.base_cmdline().to_string();
        for switch in host.cmdline_switches() {
            cmdline.push(' ');
            cmdline.push_str(switch);
        }
        attach_memory_and_platform(&kvm, &vm, &mem)?;

        // Legacy devices.
        let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("the serial port's irqfd"))?;
        let kbd_irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_irqfd(&kbd_irq, KEYBOARD_IRQ)
            .map_err(kvm_err("the keyboard controller's irqfd"))?;
        let serial = Arc::new(Mutex::new(Uart8250::new(
            Box::new(std::io::stdout()),
            serial_irq,
        )));
        let i8042 = I8042::new(
            reset_evt.try_clone().map_err(Error::EventFd)?,
            Some(kbd_irq),
        );
        let below_4g = config.memory.min(MMIO_HOLE.start);
        let cmos = CmosRtc::new(below_4g, config.memory - below_4g);
        let mut pio = Bus::new();
        pio.insert(serial.clone(), 0x3f8, 8)?;
        pio.insert(Arc::new(Mutex::new(i8042)), 0x60, 5)?;
        pio.insert(Arc::new(Mutex::new(cmos)), 0x70, 2)?;
        pio.insert(Arc::new(Mutex::new(DebugPort::new(started))), 0x80, 1)?;
        let power = config
            .acpi
            .then(|| power::attach_pm(&vm, &mut pio))
            .transpose()?;
        let mut mmio = Bus::new();

        // Virtio devices, on the transport the user chose.
        let virtio = virtio::attach(config, &vm, &mem, &mut pio, &mut mmio)?;
        for entry in &virtio.cmdline {
            cmdline.push(' ');
            cmdline.push_str(entry);
        }
        let buses: Arc<dyn VmOps> = Arc::new(Buses { pio, mmio });

        // Command line.
        boot::load_cmdline(
            &mem,
            GuestAddress(arch::layout::CMDLINE_START),
            &cmdline,
            kernel
                .max_cmdline_len()
                .min(arch::layout::CMDLINE_MAX_SIZE - 1),
        )?;
        log::info!("kernel command line: {cmdline}");

        // Boot tables.
        let ram: Vec<(u64, u64)> = memory::ram_ranges(config.memory, MMIO_HOLE)
            .into_iter()
            .map(|(start, len)| (start.0, len))
            .collect();
        let e820 = arch::bootparams::e820_entries(&ram)?;
        let initrd = initramfs.as_ref().map(|i| arch::bootparams::InitrdRange {
            addr: i.addr,
            size: i.size,
        });
        let acpi = config
            .acpi
            .then(|| power::write_acpi_tables(&mem, num_cpus, Some(&virtio)))
            .transpose()?;
        let acpi_rsdp = acpi.as_ref().map(|tables| tables.rsdp());
        let boot_mode = match kernel.protocol {
            boot::BootProtocol::Linux64 => {
                arch::bootparams::write_boot_params(
                    &mem,
                    &arch::bootparams::BootParamsConfig {
                        setup_header: kernel.setup_header,
                        cmdline_addr: GuestAddress(arch::layout::CMDLINE_START),
                        cmdline_size: cmdline.len() + 1,
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
                    &mem,
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
        let mut mptable = arch::mptable::MpTable::new(num_cpus)?;
        if virtio.pci {
            mptable = mptable.with_pci_bus(&virtio.pci_routes)?;
        }
        mptable.write(&mem)?;

        // vCPUs.
        let mut vcpus = Vec::with_capacity(usize::from(num_cpus));
        for cpu_id in 0..num_cpus {
            let fd = vm
                .create_vcpu(u64::from(cpu_id))
                .map_err(kvm_err("creating a vCPU"))?;
            arch::configure_vcpu(
                &supported_cpuid,
                &fd,
                &mem,
                &arch::VcpuBootConfig {
                    cpu_id,
                    num_cpus,
                    entry: kernel.entry.0,
                    mode: boot_mode,
                },
            )?;
            vcpus.push(
                Vcpu::new(usize::from(cpu_id), fd, buses.clone())
                    .with_exit_hook(host.exit_hook(&mem)),
            );
        }
        log::info!(
            "VM built in {:?}: {} vCPUs, {} MiB",
            started.elapsed(),
            num_cpus,
            config.memory >> 20
        );
        Ok(Vmm {
            _kvm: kvm,
            vm,
            mem,
            vcpus,
            event_loop: virtio.event_loop,
            serial,
            reset_evt,
            power,
            shutdown_timeout: config.shutdown_timeout,
            started,
            seccomp: config.seccomp,
        })
    }

    /// Runs the guest until it ends. Returns Ok when it ended normally (reset, power-off, panic with
    /// `panic=1`), an error naming the vCPU and the exit when KVM failed.
    pub fn run(self) -> Result<()> {
        let Vmm {
            _kvm,
            vm,
            mem,
            vcpus,
            event_loop,
            serial,
            reset_evt,
            power,
            shutdown_timeout,
            started,
            seccomp,
        } = self;
        let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        // First, so that every thread started below inherits the blocked termination signals
        // and only the console loop sees them.
        let mut console = console::Console::new(serial, &reset_evt, &exit_evt)?;
        if let Some(power) = &power {
            console.watch_power_off(&power.off_evt)?;
        }
        let mut shutdown = power::Shutdown::new(shutdown_timeout);
        // Each thread confines itself before it touches anything the guest controls, the vCPUs
        // wait at the gate until this thread is confined too (see `seccomp`).
        let gate = seccomp::StartGate::default();
        let device_io = event_loop
            .start_with(worker_start(seccomp))
            .map_err(|e| virtio::Error::Device(e.to_string()))?;
        let mut handles = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let evt = exit_evt.try_clone().map_err(Error::EventFd)?;
            handles.push(
                vcpu.with_thread_start(vcpu_start(seccomp, &gate))
                    .start(evt)?,
            );
        }
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
        let why = loop {
            match console.serve()? {
                console::EndReason::DumpRequested => {
                    for handle in &handles {
                        if let Err(e) = handle.dump_state() {
                            log::warn!("{e}");
                        }
                    }
                }
                console::EndReason::Signal(signal) => {
                    match shutdown.on_signal(signal, power.as_ref()) {
                        power::SignalAction::WaitUntil(deadline) => {
                            console.set_deadline(Some(deadline))
                        }
                        power::SignalAction::Stop => break console::EndReason::Signal(signal),
                    }
                }
                end => break end,
            }
        };
        log::info!("stopping the VM: {why}");
        for handle in &handles {
            if let Err(e) = handle.stop() {
                log::warn!("{e}");
            }
        }
        let mut failure = None;
        for handle in handles {
            let report = handle.join();
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
        if let Err(e) = device_io.stop() {
            log::warn!("{e}");
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
