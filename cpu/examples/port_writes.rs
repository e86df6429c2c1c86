//! Runs a 19-byte 64-bit guest on one vCPU thread and prints every port write it makes.
//!
//! `cargo run -p vmmkit-cpu --example port_writes` (needs `/dev/kvm`). The guest writes "ok\n" to
//! COM1's data port, then writes port 0xf4, which this example's [`VmOps`] takes as "stop". It
//! shows the three crates together: `memory` maps and registers guest RAM, `arch` creates the
//! irqchip and puts the vCPU in long mode, and `cpu` runs it on its own thread.

use std::sync::{Arc, Mutex};

use cpu::{Vcpu, VmOps};
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Where the guest's code goes (the usual kernel load address).
const ENTRY: u64 = 0x10_0000;
/// The port the guest writes to say it is done.
const DONE_PORT: u16 = 0xf4;

/// 64-bit code: `out 0x3f8, 'o'`, `out 0x3f8, 'k'`, `out 0x3f8, '\n'`, `out 0xf4, al`, `hlt`.
const GUEST: [u8; 19] = [
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'o', 0xee, // mov al, 'o'; out dx, al
    0xb0, b'k', 0xee, // mov al, 'k'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0x66, 0xba, 0xf4, 0x00, // mov dx, 0xf4
    0xee, // out dx, al
    0xf4, // hlt
];

/// The VMM's side of every access that leaves the vCPU: print port writes, stop at `DONE_PORT`.
struct PrintPorts {
    writes: Mutex<Vec<(u16, Vec<u8>)>>,
    done: EventFd,
}

impl VmOps for PrintPorts {
    fn pio_read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        println!("port {port:#06x} <- {data:02x?}");
        self.writes.lock().unwrap().push((port, data.to_vec()));
        if port == DONE_PORT {
            self.done.write(1).expect("eventfd write");
        }
    }
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm()?;
    let hole = memory::MmioHole {
        start: arch::layout::MMIO_HOLE_START,
        end: arch::layout::MMIO_HOLE_END,
    };
    let mem = memory::create_guest_memory(64 << 20, hole)?;
    mem.write_slice(&GUEST, GuestAddress(ENTRY))?;
    // Memory slots before the irqchip: afterwards each slot change waits for an SRCU grace period.
    memory::register_slots(&vm, &mem, kvm.get_nr_memslots())?;
    arch::platform::create_platform(&vm)?;

    let fd = vm.create_vcpu(0)?;
    arch::configure_vcpu(
        &arch::supported_cpuid(&kvm)?,
        &fd,
        &mem,
        &arch::VcpuBootConfig {
            cpu_id: 0,
            num_cpus: 1,
            entry: ENTRY,
            mode: arch::BootMode::Linux64 {
                zero_page: arch::layout::ZERO_PAGE_START,
            },
        },
    )?;

    let ops = Arc::new(PrintPorts {
        writes: Mutex::new(Vec::new()),
        done: EventFd::new(0)?,
    });
    let vcpu_exited = EventFd::new(EFD_NONBLOCK)?;
    let handle = Vcpu::new(0, fd, ops.clone()).start(vcpu_exited.try_clone()?)?;
    // Blocks until the guest writes DONE_PORT.
    ops.done.read()?;
    handle.stop()?;
    let report = handle.join();
    let console: Vec<u8> = ops
        .writes
        .lock()
        .unwrap()
        .iter()
        .filter(|(port, _)| *port == 0x3f8)
        .flat_map(|(_, data)| data.clone())
        .collect();
    println!(
        "the guest wrote {:?} to COM1 in {} exits",
        String::from_utf8_lossy(&console),
        report.exits
    );
    Ok(())
}
