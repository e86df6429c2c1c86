//! Virtio devices from the command line, on the transport the user chose, wired to KVM.
//!
//! The devices (the `virtio-blk`, `virtio-net` and `virtio-rng` crates, each behind the cargo
//! feature of its name), their transports (the `virtio` crate) and the PCI root bus (the `pci`
//! crate) know nothing of KVM; this module opens the backends (disk images, taps, getrandom), puts
//! each device on virtio-pci (a PCI root bus on the conf1 ports, BARs on the MMIO bus that follow
//! the guest's BAR moves, MSI-X through `KVM_SIGNAL_MSI`, INTx through a resample irqfd on IOAPIC
//! pins 16..23) or virtio-mmio (a 4 KiB window each, an edge-triggered ISA IRQ
//! and a `virtio_mmio.device=` kernel parameter), registers the queue notifications as
//! ioeventfds, and hands every device to the event loop that serves its queues.

#[cfg(feature = "virtio-blk")]
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arch::mptable::{IntxPin, PciIntxRoute};
use bus::{Bus, BusDevice};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use pci::{BarMmio, MsiInterruptController, PciDevice, PciRootBus};
use virtio::events::{DeviceEventLoop, SharedSubscriber};
use virtio::mmio::{cmdline_entry, VirtioMmioTransport};
use virtio::pci::{IntxLine, VirtioPciTransport};
use virtio::VirtioDevice;
#[cfg(feature = "virtio-blk")]
use virtio_blk::{DiskOptions, IoEngine, VirtioBlock};
#[cfg(feature = "virtio-net")]
use virtio_net::{tap::Tap, VirtioNet};
#[cfg(feature = "virtio-rng")]
use virtio_rng::{Getrandom, VirtioRng};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{DiskConfig, NetConfig, Transport, VmConfig};
use crate::msi_routing::{GsiRouter, IrqfdMsi};
use crate::pci_bars::{BarIoEvent, BarMover};

use arch::layout::{
    PCI_INTX_IOAPIC_PINS, PCI_MMIO_SIZE, PCI_MMIO_START, VIRTIO_MMIO_IRQS, VIRTIO_MMIO_START,
    VIRTIO_MMIO_STRIDE,
};

/// Errors attaching virtio devices; most are the user's to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open disk image {path} {mode}: {source}")]
    OpenDisk {
        path: PathBuf,
        mode: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[cfg(feature = "virtio-blk")]
    #[error("disk image {path}: {source}")]
    Disk {
        path: PathBuf,
        #[source]
        source: virtio_blk::BlockError,
    },
    #[error("disk image {path} is in use by another VMM (or process) that holds a {held} lock on it (flock); each writable image takes one VMM, read-only images may be shared")]
    DiskLocked { path: PathBuf, held: &'static str },
    #[error("cannot lock disk image {path}: {source}")]
    LockDisk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {0} is given twice")]
    DuplicateDisk(PathBuf),
    #[cfg(feature = "virtio-net")]
    #[error("--net tap={name}: {source}")]
    Tap {
        name: String,
        #[source]
        source: virtio_net::tap::TapError,
    },
    #[error("tap {0} is given twice")]
    DuplicateTap(String),
    #[error("too many virtio devices: at most {0} fit the transport")]
    TooMany(usize),
    #[error("{option} asks for {device}, which this vmm was built without (cargo feature `{device}` of the vmm crate)")]
    NotBuiltIn {
        device: &'static str,
        option: &'static str,
    },
    #[error("cannot set up a virtio device: {0}")]
    Device(String),
    #[error("{0}")]
    NotADisk(#[from] crate::config::ConfigError),
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot create an event descriptor: {0}")]
    EventFd(#[source] std::io::Error),
}

impl Error {
    /// Whether the user's input caused it (exit status 2).
    pub fn is_user_input(&self) -> bool {
        matches!(
            self,
            Error::OpenDisk { .. }
                | Error::NotADisk(_)
                | Error::DiskLocked { .. }
                | Error::LockDisk { .. }
                | Error::DuplicateDisk(_)
                | Error::DuplicateTap(_)
                | Error::TooMany(_)
                | Error::NotBuiltIn { .. }
        ) || self.is_backend_input()
    }

    /// Whether a device's backend refused the user's file or tap.
    fn is_backend_input(&self) -> bool {
        match self {
            #[cfg(feature = "virtio-blk")]
            Error::Disk { .. } => true,
            #[cfg(feature = "virtio-net")]
            Error::Tap { .. } => true,
            _ => false,
        }
    }
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

fn device_error(e: impl std::fmt::Display) -> Error {
    Error::Device(e.to_string())
}

/// A device ready for a transport: the same object is the transport's device and an event-loop
/// subscriber.
struct Attached {
    device: Arc<Mutex<dyn VirtioDevice>>,
    subscriber: SharedSubscriber,
    /// Subscribers of the device's queues served apart from the device: the first beside it on
    /// its worker, each other on a worker of its own (a network device's queue pairs).
    queue_subscribers: Vec<SharedSubscriber>,
    /// The name the embedding program gave a device it added (see [`crate::plug`]); built-in
    /// devices are named after their type.
    name: Option<String>,
    /// A device whose queues its worker polls, and for how long at most (a disk's `poll_us`).
    poller: Option<(virtio::poll::SharedPoller, std::time::Duration)>,
}

#[cfg(any(feature = "virtio-blk", feature = "virtio-net", feature = "virtio-rng"))]
fn shared<D>(device: D) -> Attached
where
    D: VirtioDevice + event_manager::MutEventSubscriber + Send + 'static,
{
    shared_arc(Arc::new(Mutex::new(device)))
}

#[cfg(any(feature = "virtio-blk", feature = "virtio-net", feature = "virtio-rng"))]
fn shared_arc<D>(device: Arc<Mutex<D>>) -> Attached
where
    D: VirtioDevice + event_manager::MutEventSubscriber + Send + 'static,
{
    Attached {
        device: device.clone(),
        subscriber: device,
        queue_subscribers: Vec::new(),
        name: None,
        poller: None,
    }
}

impl Attached {
    /// The device's own worker: an event loop that serves only this device, so that a device
    /// the guest keeps busy never delays another.
    /// Its thread is named after the device (`virtio-blk0`); `helpers` are served on it too
    /// (the INTx resampler of a virtio-pci function). Queues served apart (a network device's
    /// second and later queue pairs) get a worker each, `virtio-net0-q1` and on.
    fn worker(
        self,
        name: &str,
        helpers: Vec<SharedSubscriber>,
        setup: &mut VirtioSetup,
    ) -> Result<(), Error> {
        let mut worker = DeviceEventLoop::new()
            .map_err(device_error)?
            .with_name(name);
        if let Some((poller, max)) = self.poller {
            worker = worker.with_polling(max);
            worker.add_poller(poller);
        }
        worker.add_subscriber(self.subscriber);
        let mut queues = self.queue_subscribers.into_iter();
        for helper in queues.next().into_iter().chain(helpers) {
            worker.add_subscriber(helper);
        }
        setup.workers.push(worker);
        for (index, queue) in queues.enumerate() {
            let mut worker = DeviceEventLoop::new()
                .map_err(device_error)?
                .with_name(format!("{name}-q{}", index + 1));
            worker.add_subscriber(queue);
            setup.workers.push(worker);
        }
        Ok(())
    }
}

#[cfg(feature = "virtio-blk")]
fn open_disk(disk: &DiskConfig, index: usize) -> Result<Attached, Error> {
    let mode = if disk.read_only {
        "for reading"
    } else {
        "for reading and writing (add readonly=on for a read-only disk)"
    };
    // Anything but a regular file or a block device is refused before `open` (a FIFO would block).
    crate::config::open_checked(&disk.path, "disk image", true, !disk.read_only)?;
    let file = OpenOptions::new()
        .read(true)
        .write(!disk.read_only)
        .open(&disk.path)
        .map_err(|source| Error::OpenDisk {
            path: disk.path.clone(),
            mode,
            source,
        })?;
    lock_image(&file, disk)?;
    let options = DiskOptions {
        read_only: disk.read_only,
        serial: disk
            .serial
            .clone()
            .unwrap_or_else(|| format!("vmm-disk-{index}")),
        io_engine: match disk.io_engine {
            crate::config::DiskIoEngine::Async => IoEngine::Async,
            crate::config::DiskIoEngine::Sync => IoEngine::Sync,
        },
    };
    let block = VirtioBlock::new(file, &options).map_err(|source| Error::Disk {
        path: disk.path.clone(),
        source,
    })?;
    let block = Arc::new(Mutex::new(block));
    let mut attached = shared_arc(block.clone());
    attached.poller = Some((block, disk.poll));
    Ok(attached)
}

#[cfg(not(feature = "virtio-blk"))]
fn open_disk(_: &DiskConfig, _: usize) -> Result<Attached, Error> {
    Err(Error::NotBuiltIn {
        device: "virtio-blk",
        option: "--disk",
    })
}

/// Locks an image as QEMU does (flock(2), on the inode, so every path and hard link to it counts):
/// shared for a read-only disk, exclusive for a writable one, so that two VMMs never write one
/// image and no VMM writes an image another reads. The lock lives as long as the open file.
#[cfg(feature = "virtio-blk")]
fn lock_image(file: &std::fs::File, disk: &DiskConfig) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    let (operation, held) = if disk.read_only {
        (libc::LOCK_SH, "write")
    } else {
        (libc::LOCK_EX, "read or write")
    };
    // SAFETY: flock on a descriptor we own; it touches no memory.
    if unsafe { libc::flock(file.as_raw_fd(), operation | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let source = std::io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(Error::DiskLocked {
            path: disk.path.clone(),
            held,
        });
    }
    Err(Error::LockDisk {
        path: disk.path.clone(),
        source,
    })
}

#[cfg(feature = "virtio-net")]
fn open_net(net: &NetConfig) -> Result<Attached, Error> {
    let taps = Tap::open_queues(&net.tap, net.queues).map_err(|source| Error::Tap {
        name: net.tap.clone(),
        source,
    })?;
    let mac = net.mac.unwrap_or_else(|| default_mac(&net.tap));
    let backends = taps
        .into_iter()
        .map(|tap| Box::new(tap) as Box<dyn virtio_net::NetBackend>)
        .collect();
    let device = VirtioNet::with_queue_pairs(backends, mac).map_err(device_error)?;
    let pairs = device.queue_pairs();
    let mut attached = shared(device);
    attached.queue_subscribers = pairs
        .into_iter()
        .map(|pair| pair as SharedSubscriber)
        .collect();
    Ok(attached)
}

#[cfg(not(feature = "virtio-net"))]
fn open_net(_: &NetConfig) -> Result<Attached, Error> {
    Err(Error::NotBuiltIn {
        device: "virtio-net",
        option: "--net",
    })
}

/// A stable, locally administered MAC derived from the tap's name (QEMU's 52:54:00 prefix).
pub fn default_mac(tap: &str) -> [u8; 6] {
    // FNV-1a: stable across runs and builds, unlike the std hasher.
    let hash = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let b = hash.to_le_bytes();
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

/// Opens every device the user asked for, in a stable order: disks, nets, rng.
fn open_devices(config: &VmConfig) -> Result<Vec<Attached>, Error> {
    let mut devices = Vec::new();
    let mut seen_disks: Vec<PathBuf> = Vec::new();
    for (index, disk) in config.disks.iter().enumerate() {
        let canonical = std::fs::canonicalize(&disk.path).unwrap_or_else(|_| disk.path.clone());
        if seen_disks.contains(&canonical) {
            return Err(Error::DuplicateDisk(disk.path.clone()));
        }
        seen_disks.push(canonical);
        devices.push(open_disk(disk, index)?);
    }
    let mut seen_taps: Vec<&str> = Vec::new();
    for net in &config.nets {
        if seen_taps.contains(&net.tap.as_str()) {
            return Err(Error::DuplicateTap(net.tap.clone()));
        }
        seen_taps.push(&net.tap);
        devices.push(open_net(net)?);
    }
    if config.rng {
        devices.push(open_rng()?);
    }
    Ok(devices)
}

#[cfg(feature = "virtio-rng")]
fn open_rng() -> Result<Attached, Error> {
    let rng = VirtioRng::new(Box::new(Getrandom)).map_err(device_error)?;
    Ok(shared(rng))
}

#[cfg(not(feature = "virtio-rng"))]
fn open_rng() -> Result<Attached, Error> {
    Err(Error::NotBuiltIn {
        device: "virtio-rng",
        option: "--rng",
    })
}

/// What the rest of the VM needs from the attached devices.
pub struct VirtioSetup {
    /// One event loop per device serving its queues, each on a thread of its own; started with
    /// the vCPUs.
    pub workers: Vec<DeviceEventLoop>,
    /// Kernel parameters the transport needs (virtio-mmio device list).
    pub cmdline: Vec<String>,
    /// PCI INTx routes for the MP table (virtio-pci), empty for virtio-mmio.
    pub pci_routes: Vec<PciIntxRoute>,
    /// Whether a PCI bus exists (and so belongs in the MP table).
    pub pci: bool,
    /// Each device, named and placed, with its counters (for the start-up line and metrics).
    pub devices: Vec<DeviceSummary>,
}

/// One attached device as the start-up line and the metrics name it.
pub struct DeviceSummary {
    /// `virtio-blk0`, `virtio-net0`, `virtio-rng0`...
    pub name: String,
    /// Where it sits: PCI slot and INTx pin, or MMIO window and IRQ.
    pub placement: String,
    pub metrics: Option<Arc<bus::metrics::DeviceMetrics>>,
}

/// Names a device after its type, numbered per type in attach order.
fn name_device(device: &Arc<Mutex<dyn VirtioDevice>>, seen: &[DeviceSummary]) -> String {
    let device = device.lock().unwrap_or_else(|e| e.into_inner());
    let kind = match device.device_type() {
        virtio::device_type::BLOCK => "virtio-blk",
        virtio::device_type::NET => "virtio-net",
        virtio::device_type::RNG => "virtio-rng",
        _ => "virtio",
    };
    let n = seen.iter().filter(|d| d.name.starts_with(kind)).count();
    format!("{kind}{n}")
}

/// Opens the devices `config` asks for and attaches them on its transport.
pub fn attach(
    config: &VmConfig,
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    pio: &mut Bus,
    mmio: &Arc<Bus>,
    plugged: Vec<crate::plug::PluggedVirtio>,
) -> Result<VirtioSetup, crate::Error> {
    let mut devices = open_devices(config)?;
    devices.extend(plugged.into_iter().map(|p| Attached {
        device: p.device,
        subscriber: p.subscriber,
        queue_subscribers: Vec::new(),
        name: Some(p.name),
        poller: None,
    }));
    let mut setup = VirtioSetup {
        workers: Vec::new(),
        cmdline: Vec::new(),
        pci_routes: Vec::new(),
        pci: config.transport == Transport::Pci,
        devices: Vec::new(),
    };
    match config.transport {
        Transport::Pci => attach_pci(devices, vm, mem, pio, mmio, &mut setup)?,
        Transport::Mmio => attach_mmio(devices, vm, mem, mmio, &mut setup)?,
    }
    Ok(setup)
}

fn attach_pci(
    devices: Vec<Attached>,
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    pio: &mut Bus,
    mmio: &Arc<Bus>,
    setup: &mut VirtioSetup,
) -> Result<(), crate::Error> {
    let max = PCI_INTX_IOAPIC_PINS.len();
    if devices.len() > max {
        return Err(Error::TooMany(max).into());
    }
    let mut root = PciRootBus::new(PCI_MMIO_START, PCI_MMIO_SIZE).map_err(device_error)?;
    let mut mover = BarMover::new(Box::new(vm.clone()), mmio.clone(), bar_reserved(mem));
    // One routing table for the VM's MSI-X vectors; every vector gets its GSI and irqfd here,
    // before the seccomp filters.
    let router = Arc::new(GsiRouter::new(Box::new(vm.clone())));
    for (index, attached) in devices.into_iter().enumerate() {
        let pin = PCI_INTX_IOAPIC_PINS.start() + index as u8;
        let name = attached
            .name
            .clone()
            .unwrap_or_else(|| name_device(&attached.device, &setup.devices));
        let metrics = attached
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .metrics();
        // INTx is level-triggered: the line stays up until the guest's EOI, and then the
        // resampler raises it again while the function is still pending.
        let intx = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        let resample = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_irqfd_with_resample(&intx, &resample, u32::from(pin))
            .map_err(kvm("a PCI INTx irqfd with its resample eventfd"))?;
        let queues = attached
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue_max_sizes()
            .len();
        let vectors = virtio::pci::msix_vectors(u16::try_from(queues).unwrap_or(u16::MAX));
        let msi: Arc<dyn MsiInterruptController> = Arc::new(IrqfdMsi::new(router.clone(), vectors));
        let transport = VirtioPciTransport::new(
            attached.device.clone(),
            mem.clone(),
            Some(msi),
            Some(IntxLine {
                irq: pin,
                evt: intx,
            }),
        )
        .map_err(device_error)?;
        let resampler: Vec<SharedSubscriber> = transport
            .intx_resampler(resample)
            .map(|r| Arc::new(Mutex::new(r)) as SharedSubscriber)
            .into_iter()
            .collect();
        let transport = Arc::new(Mutex::new(transport));
        let as_pci: Arc<Mutex<dyn PciDevice>> = transport.clone();
        let (slot, bars) = root.add_device(as_pci.clone()).map_err(device_error)?;
        let notify: Vec<(u64, EventFd)> = transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ioeventfds()
            .into_iter()
            .map(|(addr, fd)| Ok((addr, fd.try_clone().map_err(Error::EventFd)?)))
            .collect::<Result<_, Error>>()?;
        for (addr, fd) in &notify {
            vm.register_ioevent(fd, &IoEventAddress::Mmio(*addr), NoDatamatch)
                .map_err(kvm("a virtio-pci queue ioeventfd"))?;
        }
        let mut notify = notify;
        for bar in &bars {
            let bar_mmio: Arc<Mutex<dyn BusDevice>> =
                Arc::new(Mutex::new(BarMmio::new(as_pci.clone(), bar.index)));
            mmio.insert(bar_mmio.clone(), bar.addr, bar.size)?;
            let (inside, rest) = notify
                .into_iter()
                .partition(|(addr, _)| (bar.addr..bar.addr + bar.size).contains(addr));
            notify = rest;
            let ioevents = inside
                .into_iter()
                .map(|(addr, fd)| BarIoEvent {
                    offset: addr - bar.addr,
                    fd,
                })
                .collect();
            mover.add_bar(slot, bar, bar_mmio, ioevents);
        }
        setup.pci_routes.push(PciIntxRoute {
            device: slot,
            pin: IntxPin::A,
            ioapic_pin: pin,
        });
        attached.worker(&name, resampler, setup)?;
        let bar_list: Vec<String> = bars
            .iter()
            .map(|bar| format!("BAR{} {:#x}+{:#x}", bar.index, bar.addr, bar.size))
            .collect();
        let placement = format!(
            "PCI 00:{slot:02x}.0 ({}), INTx IOAPIC pin {pin}, MSI-X",
            bar_list.join(", ")
        );
        log::info!("{name}: virtio-pci device at {placement}");
        setup.devices.push(DeviceSummary {
            name,
            placement,
            metrics,
        });
    }
    root.set_bar_move_handler(Box::new(move |slot, bar_move| mover.apply(slot, bar_move)));
    pio.insert(
        Arc::new(Mutex::new(root)),
        PciRootBus::PORT_BASE,
        PciRootBus::PORT_LEN,
    )?;
    Ok(())
}

/// What a BAR must not cover: guest RAM, and the IOAPIC and LAPIC pages that KVM serves before
/// any bus is asked.
fn bar_reserved(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let mut reserved: Vec<(u64, u64)> = mem
        .iter()
        .map(|region| {
            let start = region.start_addr().0;
            (start, start + region.len())
        })
        .collect();
    reserved.push((
        arch::layout::IOAPIC_START,
        arch::layout::IOAPIC_START + arch::layout::IOAPIC_SIZE,
    ));
    reserved.push((
        arch::layout::LAPIC_START,
        arch::layout::LAPIC_START + arch::layout::LAPIC_SIZE,
    ));
    reserved
}

fn attach_mmio(
    devices: Vec<Attached>,
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    mmio: &Bus,
    setup: &mut VirtioSetup,
) -> Result<(), crate::Error> {
    if devices.len() > VIRTIO_MMIO_IRQS.len() {
        return Err(Error::TooMany(VIRTIO_MMIO_IRQS.len()).into());
    }
    for (index, attached) in devices.into_iter().enumerate() {
        let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_STRIDE;
        let irq = VIRTIO_MMIO_IRQS[index];
        let name = attached
            .name
            .clone()
            .unwrap_or_else(|| name_device(&attached.device, &setup.devices));
        let metrics = attached
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .metrics();
        let transport =
            VirtioMmioTransport::new(mem.clone(), attached.device.clone()).map_err(device_error)?;
        vm.register_irqfd(transport.irq_event(), irq)
            .map_err(kvm("a virtio-mmio irqfd"))?;
        for (offset, queue, fd) in transport.queue_notify_events() {
            vm.register_ioevent(fd, &IoEventAddress::Mmio(base + offset), queue)
                .map_err(kvm("a virtio-mmio queue ioeventfd"))?;
        }
        mmio.insert(
            Arc::new(Mutex::new(transport)),
            base,
            virtio::mmio::MMIO_LEN,
        )?;
        setup.cmdline.push(cmdline_entry(base, irq));
        attached.worker(&name, Vec::new(), setup)?;
        let placement = format!("MMIO {base:#x}+{VIRTIO_MMIO_STRIDE:#x}, IRQ {irq}");
        log::info!("{name}: virtio-mmio device at {placement}");
        setup.devices.push(DeviceSummary {
            name,
            placement,
            metrics,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_macs_are_stable_and_local() {
        let a = default_mac("tap0");
        assert_eq!(a, default_mac("tap0"));
        assert_ne!(a, default_mac("tap1"));
        assert_eq!(&a[..3], &[0x52, 0x54, 0x00]);
    }
}
