//! Devices from outside the workspace: what a program that embeds the VMM adds to a VM beside
//! the devices its [`VmConfig`](crate::VmConfig) names.
//!
//! A virtio device implements [`virtio::VirtioDevice`] and event-manager's
//! `MutEventSubscriber` (serving its queues with [`virtio::events::DeviceRuntime`], as
//! the built-in devices do); it then sits on the VM's transport after the built-in virtio devices,
//! with a worker thread of its own. A legacy device implements [`bus::BusDevice`] and takes a
//! range of ports. Nothing in the workspace needs to change for either:
//!
//! ```no_run
//! # fn device() -> virtio_rng::VirtioRng { unimplemented!() }
//! use clap::Parser;
//! use vmm::{plug::ExtraDevices, VmConfig, Vmm};
//!
//! let config = VmConfig::parse();
//! let extra = ExtraDevices::new().virtio("my-device", device());
//! Vmm::build_with(&config, extra)?.run()?;
//! # Ok::<(), vmm::Error>(())
//! ```
//!
//! `examples/fixed-entropy` is a whole crate that does this.

use std::sync::{Arc, Mutex};

use bus::{Bus, BusDevice, BusError};
use event_manager::MutEventSubscriber;
use virtio::events::SharedSubscriber;
use virtio::VirtioDevice;

/// A virtio device added by the embedding program, with the name of its worker thread; made by
/// [`ExtraDevices::virtio`].
pub struct PluggedVirtio {
    pub(crate) name: String,
    pub(crate) device: Arc<Mutex<dyn VirtioDevice>>,
    pub(crate) subscriber: SharedSubscriber,
}

/// A port-I/O device added by the embedding program.
struct PluggedPorts {
    device: Arc<Mutex<dyn BusDevice>>,
    base: u16,
    len: u16,
}

/// Devices to add to a VM beside those of its configuration; see the [module](self) docs.
#[derive(Default)]
pub struct ExtraDevices {
    pub(crate) virtio: Vec<PluggedVirtio>,
    ports: Vec<PluggedPorts>,
}

impl ExtraDevices {
    /// No extra devices.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a virtio device on the VM's transport; `name` names its worker thread and its
    /// metrics (at most 15 characters show in `ps`).
    pub fn virtio<D>(mut self, name: &str, device: D) -> Self
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let device = Arc::new(Mutex::new(device));
        self.virtio.push(PluggedVirtio {
            name: name.to_string(),
            device: device.clone(),
            subscriber: device,
        });
        self
    }

    /// Adds a device on ports `base..base + len`; it must not overlap a built-in device's ports
    /// (see `arch::layout`).
    pub fn port_io<D>(mut self, device: D, base: u16, len: u16) -> Self
    where
        D: BusDevice + 'static,
    {
        self.ports.push(PluggedPorts {
            device: Arc::new(Mutex::new(device)),
            base,
            len,
        });
        self
    }

    /// Puts the port devices on `pio`.
    pub(crate) fn attach_ports(&self, pio: &Bus) -> Result<(), BusError> {
        for p in &self.ports {
            pio.insert(p.device.clone(), u64::from(p.base), u64::from(p.len))?;
        }
        Ok(())
    }
}
