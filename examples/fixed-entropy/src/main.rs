//! `vmm-fixed-entropy`: the `vmm` binary's options, plus a virtio entropy device that this crate
//! defines itself and attaches through [`vmm::plug::ExtraDevices`], without changing any file of
//! the VMM's workspace.
//!
//! The device answers every request with the bytes of [`PATTERN`], over and over: useless as
//! entropy and meant to be, so that a guest reading `/dev/hwrng` shows which device served it.
//! Run it as you would run `vmm`, without `--rng` (the guest would see two entropy devices):
//!
//! ```text
//! vmm-fixed-entropy --kernel bzImage --initramfs initramfs.cpio
//! (guest) # head -c 32 /dev/hwrng
//! ```

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio::events::{DeviceRuntime, Dispatch};
use virtio::queue::{drain_queue, features, ErrorLog};
use virtio::{device_type, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt};
use vm_memory::{Bytes, GuestMemoryMmap};

/// What every request gets, repeated.
pub const PATTERN: &[u8; 16] = b"fixed-entropy-0\n";

/// A virtio-rng device (virtio 1.2 section 5.4) whose "entropy" is [`PATTERN`].
pub struct FixedEntropy {
    /// Where in the pattern the next byte comes from.
    position: usize,
    acked: u64,
    runtime: DeviceRuntime,
    errors: ErrorLog,
}

impl FixedEntropy {
    /// A new device, not yet activated.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            position: 0,
            acked: 0,
            runtime: DeviceRuntime::new()?,
            errors: ErrorLog::new("fixed-entropy"),
        })
    }

    /// Fills every buffer the driver made available with the pattern.
    fn serve(&mut self) {
        let position = &mut self.position;
        if let Some(active) = self.runtime.active() {
            active.run_queue(0, &mut self.errors, |queue, mem, errors| {
                let drained = drain_queue(queue, mem, |chain| {
                    let mut written = 0u32;
                    // Every descriptor the device may write: up to 64 KiB per request.
                    for desc in chain.clone().filter(|d| d.is_write_only()) {
                        let len = desc.len().min(65536 - written);
                        let bytes: Vec<u8> = (0..len as usize)
                            .map(|i| PATTERN[(*position + i) % PATTERN.len()])
                            .collect();
                        if mem.write_slice(&bytes, desc.addr()).is_err() {
                            break;
                        }
                        *position = (*position + bytes.len()) % PATTERN.len();
                        written += len;
                    }
                    written
                })?;
                Ok(drained.report(errors))
            });
        }
    }
}

impl VirtioDevice for FixedEntropy {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![64]
    }
    fn features(&self) -> u64 {
        features::COMMON
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        self.runtime.activate(mem, interrupt, queues, 1, self.acked)
    }
    fn reset(&mut self) -> bool {
        self.runtime.reset();
        self.acked = 0;
        true
    }
}

impl MutEventSubscriber for FixedEntropy {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.runtime.dispatch(&events, ops) {
            Dispatch::Queue(_) | Dispatch::Control { active: true } => self.serve(),
            Dispatch::Control { active: false } | Dispatch::Device(_) | Dispatch::Nothing => {}
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        self.runtime.init(ops);
    }
}

fn main() -> ExitCode {
    let config = vmm::VmConfig::parse();
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or(config.log_level.filter().as_str()),
    )
    .init();
    let device = match FixedEntropy::new() {
        Ok(device) => device,
        Err(e) => {
            eprintln!("vmm-fixed-entropy: cannot create the device: {e}");
            return ExitCode::from(1);
        }
    };
    let extra = vmm::plug::ExtraDevices::new().virtio("fixed-entropy", device);
    match vmm::Vmm::build_with(&config, extra).and_then(vmm::Vmm::run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm-fixed-entropy: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
