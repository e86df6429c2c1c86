//! ACPI and a clean shutdown: the ACPI tables, the PM device with its power button, and what
//! SIGTERM and SIGINT do with them.
//!
//! With ACPI (`--acpi on`, the default) the guest finds its CPUs, IOAPIC, PCI host bridge, COM1
//! and keyboard controller in the tables [`arch::acpi`] builds, and the PM1a block of
//! [`AcpiPm`] at the ports the FADT names. Its `poweroff` writes S5 there, which ends the VMM with
//! status 0 as its `reboot` does.
//!
//! SIGTERM and SIGINT press the power button: a guest with ACPI and something listening to the
//! button (guest/init of the project's initramfs) shuts down cleanly and powers off, and the VMM
//! exits 0. One that has not powered off after `--shutdown-timeout` is stopped, and the VMM exits
//! 128 + the signal's number, as a process killed by it would. A second signal, SIGHUP, or any
//! signal without ACPI, stops the guest at once with that status.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use bus::Bus;
use legacy::{AcpiPm, Uart8250, I8042};
use pci::PciRootBus;

use crate::{kvm_err, Error, Result};

/// The PM device, kept by the VMM to press its power button.
pub struct Power {
    pm: Arc<Mutex<AcpiPm>>,
    /// Signalled when the guest enters S5.
    pub off_evt: EventFd,
}

impl Power {
    /// Presses the power button; returns whether the guest listens to it.
    pub fn press_power_button(&self) -> bool {
        self.button().press()
    }

    /// The power button alone, for the API thread's `SendCtrlAltDel`.
    pub fn button(&self) -> PowerButton {
        PowerButton(self.pm.clone())
    }
}

/// The ACPI power button of a running VM, shareable with other threads.
#[derive(Clone)]
pub struct PowerButton(Arc<Mutex<AcpiPm>>);

impl PowerButton {
    /// Presses the button; returns whether the guest listens to it (has enabled its event).
    pub fn press(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .press_power_button()
    }
}

/// Puts the ACPI PM block on the port bus, its SCI on an irqfd.
pub fn attach_pm(vm: &VmFd, pio: &mut Bus) -> Result<Power> {
    let sci = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&sci, AcpiPm::SCI_IRQ)
        .map_err(kvm_err("the ACPI SCI's irqfd"))?;
    let off_evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
    let pm = Arc::new(Mutex::new(AcpiPm::new(
        sci,
        off_evt.try_clone().map_err(Error::EventFd)?,
    )));
    pio.insert(pm.clone(), AcpiPm::PORT_BASE, AcpiPm::PORT_LEN)?;
    Ok(Power { pm, off_evt })
}

/// Builds the ACPI tables for `num_cpus` vCPUs and the devices the VMM attached, and writes them
/// to guest memory. Returns the tables (for the RSDP's address).
pub fn write_acpi_tables(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    pci: Option<&crate::virtio_devices::VirtioSetup>,
) -> Result<arch::acpi::AcpiTables> {
    const COM1_PORTS: [(u16, u8); 1] = [(Uart8250::PORT_BASE as u16, Uart8250::PORT_LEN as u8)];
    // The data port and the status/command port, each one byte.
    const KBD_PORTS: [(u16, u8); 2] = [
        (I8042::PORT_BASE as u16, 1),
        (I8042::PORT_BASE as u16 + 4, 1),
    ];
    let isa_devices = [
        arch::acpi::IsaDevice {
            name: "COM1",
            hid: "PNP0501",
            ports: &COM1_PORTS,
            irq: Uart8250::IRQ as u8,
        },
        arch::acpi::IsaDevice {
            name: "PS2K",
            hid: "PNP0303",
            ports: &KBD_PORTS,
            irq: I8042::KBD_IRQ as u8,
        },
    ];
    let tables = arch::acpi::build(&arch::acpi::AcpiConfig {
        num_cpus,
        ioapic_id: arch::MpTable::new(num_cpus)?.ioapic_id(),
        pm: arch::acpi::PmBlock {
            evt_port: AcpiPm::PORT_BASE as u16,
            evt_len: AcpiPm::PM1_EVT_LEN,
            cnt_port: AcpiPm::PM1A_CNT as u16,
            cnt_len: AcpiPm::PM1_CNT_LEN,
            sci_irq: AcpiPm::SCI_IRQ as u8,
            s5_slp_typ: AcpiPm::S5_SLP_TYP,
        },
        isa_devices: &isa_devices,
        pci: pci
            .filter(|setup| setup.pci)
            .map(|setup| arch::acpi::PciHostBridge {
                config_ports: (PciRootBus::PORT_BASE as u16, PciRootBus::PORT_LEN as u8),
                mmio_window: (arch::layout::PCI_MMIO_START, arch::layout::PCI_MMIO_SIZE),
                routes: &setup.pci_routes,
            }),
    })?;
    tables.write(mem)?;
    log::info!("ACPI tables written, RSDP at {:#x}", tables.rsdp().0);
    Ok(tables)
}

/// Where a signal-driven shutdown stands.
#[derive(Debug)]
pub struct Shutdown {
    timeout: Duration,
    /// The first termination signal and when the guest must be off by.
    pending: Option<(u32, Instant)>,
}

/// What to do with a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalAction {
    /// The power button was pressed: keep serving until the deadline.
    WaitUntil(Instant),
    /// Stop the guest now.
    Stop,
}

impl Shutdown {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            pending: None,
        }
    }

    /// Handles a termination signal: the first SIGTERM or SIGINT presses the power button (when
    /// there is one), everything else stops the guest.
    pub fn on_signal(&mut self, signal: u32, power: Option<&Power>) -> SignalAction {
        let graceful = signal == libc::SIGTERM as u32 || signal == libc::SIGINT as u32;
        match (self.pending, power) {
            (None, Some(power)) if graceful => {
                let listening = power.press_power_button();
                log::info!(
                    "signal {signal}: pressed the power button{}; waiting up to {:?} for the \
                     guest to power off",
                    if listening {
                        ""
                    } else {
                        " (the guest has not enabled it)"
                    },
                    self.timeout
                );
                let deadline = Instant::now() + self.timeout;
                self.pending = Some((signal, deadline));
                SignalAction::WaitUntil(deadline)
            }
            _ => {
                self.pending.get_or_insert((signal, Instant::now()));
                SignalAction::Stop
            }
        }
    }

    /// The error the VMM ends with when a signal, not the guest, stopped it: `None` when the
    /// guest ended by itself (reset, power-off, panic), even after a power-button press.
    pub fn outcome(&self, why: crate::console::EndReason) -> Option<Error> {
        use crate::console::EndReason;
        match why {
            EndReason::Signal(_) | EndReason::ShutdownTimedOut => {
                let (signal, _) = self.pending?;
                Some(Error::Signalled {
                    signal,
                    timeout: matches!(why, EndReason::ShutdownTimedOut).then_some(self.timeout),
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::EndReason;

    const TERM: u32 = libc::SIGTERM as u32;
    const INT: u32 = libc::SIGINT as u32;
    const HUP: u32 = libc::SIGHUP as u32;

    fn power() -> (Power, EventFd) {
        let sci = EventFd::new(EFD_NONBLOCK).unwrap();
        let off_evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let pm = AcpiPm::new(sci.try_clone().unwrap(), off_evt.try_clone().unwrap());
        (
            Power {
                pm: Arc::new(Mutex::new(pm)),
                off_evt,
            },
            sci,
        )
    }

    #[test]
    fn the_first_sigterm_presses_the_button_and_waits() {
        let (power, _) = power();
        let mut shutdown = Shutdown::new(Duration::from_secs(30));
        let before = Instant::now();
        match shutdown.on_signal(TERM, Some(&power)) {
            SignalAction::WaitUntil(deadline) => {
                assert!(deadline >= before + Duration::from_secs(30));
            }
            other => panic!("expected a wait, got {other:?}"),
        }
        // The guest powered off in time: a clean end.
        assert!(shutdown.outcome(EndReason::GuestPowerOff).is_none());
    }

    #[test]
    fn a_second_signal_stops_at_once_with_the_first_signals_status() {
        let (power, _) = power();
        let mut shutdown = Shutdown::new(Duration::from_secs(30));
        shutdown.on_signal(INT, Some(&power));
        assert_eq!(shutdown.on_signal(TERM, Some(&power)), SignalAction::Stop);
        let error = shutdown.outcome(EndReason::Signal(TERM)).unwrap();
        assert_eq!(error.exit_code(), 128 + libc::SIGINT);
    }

    #[test]
    fn the_timeout_gives_128_plus_the_signal() {
        let (power, _) = power();
        let mut shutdown = Shutdown::new(Duration::from_secs(1));
        shutdown.on_signal(TERM, Some(&power));
        let error = shutdown.outcome(EndReason::ShutdownTimedOut).unwrap();
        assert_eq!(error.exit_code(), 143);
        assert!(error.to_string().contains("did not power off within 1s"));
    }

    #[test]
    fn without_acpi_or_for_sighup_the_signal_stops_at_once() {
        let (power, _) = power();
        let mut shutdown = Shutdown::new(Duration::from_secs(30));
        assert_eq!(shutdown.on_signal(TERM, None), SignalAction::Stop);
        assert_eq!(
            shutdown
                .outcome(EndReason::Signal(TERM))
                .unwrap()
                .exit_code(),
            143
        );
        let mut shutdown = Shutdown::new(Duration::from_secs(30));
        assert_eq!(shutdown.on_signal(HUP, Some(&power)), SignalAction::Stop);
        assert_eq!(
            shutdown
                .outcome(EndReason::Signal(HUP))
                .unwrap()
                .exit_code(),
            129
        );
    }

    #[test]
    fn the_button_reaches_a_guest_that_enabled_it() {
        let (power, sci) = power();
        assert!(!power.press_power_button());
        assert!(
            sci.read().is_err(),
            "no SCI for a guest that did not enable the button"
        );
    }
}
