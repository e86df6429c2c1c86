//! MSI-X delivery through KVM's GSI routing table and irqfds (the KVM API's `KVM_SET_GSI_ROUTING`
//! and `KVM_IRQFD`, Documentation/virt/kvm/api.rst 4.52 and 4.75).
//!
//! Each MSI-X vector of a virtio-pci function gets a GSI of its own above the IOAPIC's 24 pins
//! and an eventfd that KVM injects from: a device worker raises an interrupt with one eventfd
//! write, and KVM delivers it without a round trip through the VMM (`KVM_SIGNAL_MSI` stays as
//! the fallback for a vector whose route could not be installed).
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table (and waits for the readers of the old one), so
//! the table changes only when a vector the guest has unmasked points somewhere new. A masked vector cannot fire (the MSI-X capability keeps its
//! pending bit instead), so it keeps whatever route it had until it is unmasked.
//!
//! The table always starts with the routes `KVM_CREATE_IRQCHIP` installs (GSI 0-15 to both PICs
//! and the IOAPIC, 16-23 to the IOAPIC alone), which the legacy devices' and INTx irqfds use.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_irq_routing_msi, kvm_msi, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use pci::MsiInterruptController;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Pins of KVM's in-kernel IOAPIC; MSI routes take the GSIs after them.
const IOAPIC_PINS: u32 = 24;
/// Pins of the two 8259 PICs together.
const PIC_PINS: u32 = 16;
/// GSIs handed to MSI-X vectors at most: far more than the virtio-pci functions a VM can have
/// need, and far below KVM's 4,096 routes.
const MAX_MSI_ROUTES: u32 = 1024;

/// What the routing needs from KVM; a trait so that the table logic is tested without a VM.
pub trait GsiRoutingBackend: Send + Sync {
    /// Replaces KVM's routing table with `entries`.
    fn set_gsi_routing(&self, routes: &[Route]) -> io::Result<()>;
    /// Makes a write to `fd` raise `gsi`.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    /// Sends one MSI message directly.
    fn signal_msi(&self, addr: u64, data: u32) -> io::Result<()>;
}

fn errno(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

impl GsiRoutingBackend for VmFd {
    fn set_gsi_routing(&self, routes: &[Route]) -> io::Result<()> {
        let entries: Vec<kvm_irq_routing_entry> = routes.iter().map(|r| r.to_kvm()).collect();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e:?}")))?;
        VmFd::set_gsi_routing(self, &table).map_err(errno)
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        VmFd::register_irqfd(self, fd, gsi).map_err(errno)
    }

    fn signal_msi(&self, addr: u64, data: u32) -> io::Result<()> {
        let msi = kvm_msi {
            address_lo: addr as u32,
            address_hi: (addr >> 32) as u32,
            data,
            ..Default::default()
        };
        VmFd::signal_msi(self, msi).map(|_| ()).map_err(errno)
    }
}

impl<T: GsiRoutingBackend + ?Sized> GsiRoutingBackend for Arc<T> {
    fn set_gsi_routing(&self, routes: &[Route]) -> io::Result<()> {
        (**self).set_gsi_routing(routes)
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        (**self).register_irqfd(fd, gsi)
    }

    fn signal_msi(&self, addr: u64, data: u32) -> io::Result<()> {
        (**self).signal_msi(addr, data)
    }
}

/// One entry of KVM's GSI routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `gsi` raises pin `pin` of IRQ chip `chip` (`KVM_IRQCHIP_*`).
    Irqchip { gsi: u32, chip: u32, pin: u32 },
    /// `gsi` sends the MSI message `data` to `addr`.
    Msi { gsi: u32, addr: u64, data: u32 },
}

impl Route {
    /// The entry as `KVM_SET_GSI_ROUTING` takes it.
    pub fn to_kvm(self) -> kvm_irq_routing_entry {
        let mut entry = kvm_irq_routing_entry::default();
        match self {
            Route::Irqchip { gsi, chip, pin } => {
                entry.gsi = gsi;
                entry.type_ = KVM_IRQ_ROUTING_IRQCHIP;
                entry.u.irqchip = kvm_irq_routing_irqchip { irqchip: chip, pin };
            }
            Route::Msi { gsi, addr, data } => {
                entry.gsi = gsi;
                entry.type_ = KVM_IRQ_ROUTING_MSI;
                entry.u.msi = kvm_irq_routing_msi {
                    address_lo: addr as u32,
                    address_hi: (addr >> 32) as u32,
                    data,
                    ..Default::default()
                };
            }
        }
        entry
    }
}

/// The routes `KVM_CREATE_IRQCHIP` installs on x86 (arch/x86/kvm/irq_comm.c, `default_routing`):
/// GSI n to IOAPIC pin n for the 24 pins, and GSI 0-15 also to the PIC that owns line n.
pub fn default_irqchip_routes() -> Vec<Route> {
    let mut routes = Vec::with_capacity((IOAPIC_PINS + PIC_PINS) as usize);
    for gsi in 0..IOAPIC_PINS {
        routes.push(Route::Irqchip {
            gsi,
            chip: KVM_IRQCHIP_IOAPIC,
            pin: gsi,
        });
        if gsi < PIC_PINS {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(Route::Irqchip {
                gsi,
                chip,
                pin: gsi % 8,
            });
        }
    }
    routes
}

/// The VM's GSI routing table: the IRQ-chip routes plus one MSI route per vector in use.
pub struct GsiRouter {
    backend: Box<dyn GsiRoutingBackend>,
    state: Mutex<RouterState>,
}

struct RouterState {
    /// GSI -> (address, data) of each MSI route installed.
    msi: BTreeMap<u32, (u64, u32)>,
    next_gsi: u32,
    /// Tables pushed to KVM, for the metrics and the tests.
    pushes: u64,
}

impl GsiRouter {
    /// A router that has not changed KVM's table yet.
    pub fn new(backend: Box<dyn GsiRoutingBackend>) -> Self {
        Self {
            backend,
            state: Mutex::new(RouterState {
                msi: BTreeMap::new(),
                next_gsi: IOAPIC_PINS,
                pushes: 0,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A GSI of its own for an MSI vector, with an eventfd KVM raises it from; an error when the
    /// GSIs for MSI routes are used up or KVM refuses the irqfd (the vector then uses
    /// `KVM_SIGNAL_MSI`).
    fn new_irqfd(&self) -> io::Result<(u32, EventFd)> {
        let gsi = {
            let mut state = self.state();
            if state.next_gsi >= IOAPIC_PINS + MAX_MSI_ROUTES {
                return Err(io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    "every GSI for MSI routes is taken",
                ));
            }
            state.next_gsi += 1;
            state.next_gsi - 1
        };
        let fd = EventFd::new(EFD_NONBLOCK)?;
        self.backend.register_irqfd(&fd, gsi)?;
        Ok((gsi, fd))
    }

    /// Points `gsi` at `addr`/`data` and gives KVM the new table.
    fn route(&self, gsi: u32, addr: u64, data: u32) -> io::Result<()> {
        let mut state = self.state();
        if state.msi.get(&gsi) == Some(&(addr, data)) {
            return Ok(());
        }
        let mut routes = default_irqchip_routes();
        routes.extend(
            state
                .msi
                .iter()
                .filter(|(g, _)| **g != gsi)
                .map(|(&gsi, &(addr, data))| Route::Msi { gsi, addr, data }),
        );
        routes.push(Route::Msi { gsi, addr, data });
        self.backend.set_gsi_routing(&routes)?;
        state.msi.insert(gsi, (addr, data));
        state.pushes += 1;
        Ok(())
    }

    /// How many times the table went to KVM.
    pub fn pushes(&self) -> u64 {
        self.state().pushes
    }

    fn signal_msi(&self, addr: u64, data: u32) -> io::Result<()> {
        self.backend.signal_msi(addr, data)
    }
}

/// One MSI-X vector: its irqfd (if it got one) and its message.
struct Vector {
    irqfd: Option<(u32, EventFd)>,
    route: Mutex<VectorRoute>,
}

#[derive(Default, Clone, Copy)]
struct VectorRoute {
    /// The message the guest last wrote.
    wanted: Option<(u64, u32)>,
    /// The message KVM's route for this vector's GSI sends.
    installed: Option<(u64, u32)>,
}

/// The MSI-X vectors of one virtio-pci function, delivered through irqfds on the VM's
/// [`GsiRouter`].
pub struct IrqfdMsi {
    router: Arc<GsiRouter>,
    vectors: Vec<Vector>,
}

impl IrqfdMsi {
    /// `vectors` vectors, each with a GSI and a registered irqfd: made before the VMM's seccomp
    /// filters are in place, so that a running guest only ever changes routes. A vector KVM
    /// gives no irqfd falls back to `KVM_SIGNAL_MSI`, with one warning.
    pub fn new(router: Arc<GsiRouter>, vectors: u16) -> Self {
        let mut failed = None;
        let vectors = (0..vectors)
            .map(|_| Vector {
                irqfd: router.new_irqfd().map_err(|e| failed = Some(e)).ok(),
                route: Mutex::new(VectorRoute::default()),
            })
            .collect();
        if let Some(e) = failed {
            log::warn!("MSI-X: no irqfd for some vectors ({e}); they are sent with KVM_SIGNAL_MSI");
        }
        Self { router, vectors }
    }

    fn vector(&self, vector: u16) -> io::Result<&Vector> {
        self.vectors.get(usize::from(vector)).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("MSI-X vector {vector} is past the function's table"),
            )
        })
    }
}

impl MsiInterruptController for IrqfdMsi {
    fn update_route(&self, vector: u16, addr: u64, data: u32, masked: bool) -> io::Result<()> {
        let v = self.vector(vector)?;
        let mut route = v.route.lock().unwrap_or_else(|e| e.into_inner());
        route.wanted = Some((addr, data));
        if masked || route.installed == route.wanted {
            return Ok(());
        }
        if let Some((gsi, _)) = &v.irqfd {
            self.router.route(*gsi, addr, data)?;
            route.installed = Some((addr, data));
        }
        Ok(())
    }

    fn trigger(&self, vector: u16) -> io::Result<()> {
        let v = self.vector(vector)?;
        let route = *v.route.lock().unwrap_or_else(|e| e.into_inner());
        match (&v.irqfd, route.wanted) {
            (Some((_, fd)), Some(_)) if route.installed == route.wanted => fd.write(1),
            (_, Some((addr, data))) => self.router.signal_msi(addr, data),
            (_, None) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what the router asks of KVM; `fail_routing` makes table pushes fail.
    #[derive(Default)]
    struct FakeKvm {
        tables: Mutex<Vec<Vec<Route>>>,
        irqfds: Mutex<Vec<u32>>,
        msis: Mutex<Vec<(u64, u32)>>,
        fail_routing: std::sync::atomic::AtomicBool,
    }

    impl GsiRoutingBackend for FakeKvm {
        fn set_gsi_routing(&self, routes: &[Route]) -> io::Result<()> {
            if self.fail_routing.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(io::Error::from_raw_os_error(libc::ENOMEM));
            }
            self.tables.lock().unwrap().push(routes.to_vec());
            Ok(())
        }

        fn register_irqfd(&self, _fd: &EventFd, gsi: u32) -> io::Result<()> {
            self.irqfds.lock().unwrap().push(gsi);
            Ok(())
        }

        fn signal_msi(&self, addr: u64, data: u32) -> io::Result<()> {
            self.msis.lock().unwrap().push((addr, data));
            Ok(())
        }
    }

    fn router() -> (Arc<FakeKvm>, Arc<GsiRouter>) {
        let kvm = Arc::new(FakeKvm::default());
        let router = Arc::new(GsiRouter::new(Box::new(kvm.clone())));
        (kvm, router)
    }

    const APIC: u64 = 0xfee0_0000;

    #[test]
    fn routes_become_kvm_entries() {
        let msi = Route::Msi {
            gsi: 30,
            addr: 0x1_fee0_1000,
            data: 0x4041,
        }
        .to_kvm();
        assert_eq!((msi.gsi, msi.type_), (30, KVM_IRQ_ROUTING_MSI));
        let chip = Route::Irqchip {
            gsi: 9,
            chip: KVM_IRQCHIP_IOAPIC,
            pin: 9,
        }
        .to_kvm();
        assert_eq!((chip.gsi, chip.type_), (9, KVM_IRQ_ROUTING_IRQCHIP));
        assert_eq!((msi.flags, chip.flags), (0, 0));
    }

    #[test]
    fn default_routes_are_kvms() {
        let routes = default_irqchip_routes();
        assert_eq!(routes.len(), 40);
        let ioapic: Vec<_> = routes
            .iter()
            .filter_map(|r| match *r {
                Route::Irqchip { gsi, chip, pin } if chip == KVM_IRQCHIP_IOAPIC => Some((gsi, pin)),
                _ => None,
            })
            .collect();
        assert_eq!(ioapic, (0..24).map(|g| (g, g)).collect::<Vec<_>>());
        let pic: Vec<_> = routes
            .iter()
            .filter_map(|r| match *r {
                Route::Irqchip { gsi, chip, pin } if chip != KVM_IRQCHIP_IOAPIC => {
                    Some((gsi, chip, pin))
                }
                _ => None,
            })
            .collect();
        let expected: Vec<_> = (0..16)
            .map(|g| {
                let chip = if g < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                (g, chip, g % 8)
            })
            .collect();
        assert_eq!(pic, expected);
    }

    #[test]
    fn each_vector_gets_its_own_gsi_and_irqfd_above_the_ioapic() {
        let (kvm, router) = router();
        let _a = IrqfdMsi::new(router.clone(), 3);
        let _b = IrqfdMsi::new(router.clone(), 2);
        assert_eq!(*kvm.irqfds.lock().unwrap(), [24, 25, 26, 27, 28]);
        assert!(kvm.tables.lock().unwrap().is_empty(), "no route yet");
    }

    #[test]
    fn the_table_changes_only_when_an_unmasked_vector_points_somewhere_new() {
        let (kvm, router) = router();
        let msi = IrqfdMsi::new(router.clone(), 2);
        // Linux writes the message while the vector is masked, then unmasks it.
        msi.update_route(1, APIC, 0x41, true).unwrap();
        assert_eq!(router.pushes(), 0);
        msi.update_route(1, APIC, 0x41, false).unwrap();
        assert_eq!(router.pushes(), 1);
        let table = kvm.tables.lock().unwrap()[0].clone();
        assert_eq!(table[..40], default_irqchip_routes()[..]);
        assert_eq!(
            table[40..],
            [Route::Msi {
                gsi: 25,
                addr: APIC,
                data: 0x41
            }]
        );
        // Mask and unmask with the same message: nothing to tell KVM.
        msi.update_route(1, APIC, 0x41, true).unwrap();
        msi.update_route(1, APIC, 0x41, false).unwrap();
        assert_eq!(router.pushes(), 1);
        // A new affinity: the route moves, and the other vector's joins it.
        msi.update_route(1, APIC | 0x1000, 0x42, false).unwrap();
        msi.update_route(0, APIC, 0x30, false).unwrap();
        assert_eq!(router.pushes(), 3);
        let table = kvm.tables.lock().unwrap().last().unwrap().clone();
        assert_eq!(
            table[40..],
            [
                Route::Msi {
                    gsi: 25,
                    addr: APIC | 0x1000,
                    data: 0x42
                },
                Route::Msi {
                    gsi: 24,
                    addr: APIC,
                    data: 0x30
                }
            ]
        );
    }

    #[test]
    fn a_routed_vector_fires_its_irqfd_and_an_unrouted_one_signals_the_message() {
        let (kvm, router) = router();
        let msi = IrqfdMsi::new(router.clone(), 2);
        // Never programmed: nothing to send.
        msi.trigger(0).unwrap();
        msi.update_route(0, APIC, 0x30, false).unwrap();
        msi.trigger(0).unwrap();
        msi.trigger(0).unwrap();
        assert_eq!(msi.vectors[0].irqfd.as_ref().unwrap().1.read().unwrap(), 2);
        assert!(kvm.msis.lock().unwrap().is_empty());
        // KVM refuses the new table: the vector's message goes by KVM_SIGNAL_MSI instead.
        kvm.fail_routing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(msi.update_route(1, APIC, 0x31, false).is_err());
        msi.trigger(1).unwrap();
        assert_eq!(*kvm.msis.lock().unwrap(), [(APIC, 0x31)]);
        assert!(msi.trigger(2).is_err(), "past the table");
    }

    #[test]
    fn gsis_run_out_into_signal_msi() {
        let (kvm, router) = router();
        let _all = IrqfdMsi::new(router.clone(), MAX_MSI_ROUTES as u16);
        let late = IrqfdMsi::new(router.clone(), 1);
        assert!(late.vectors[0].irqfd.is_none());
        late.update_route(0, APIC, 0x50, false).unwrap();
        late.trigger(0).unwrap();
        assert_eq!(*kvm.msis.lock().unwrap(), [(APIC, 0x50)]);
    }
}
