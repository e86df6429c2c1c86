//! Lays out guest RAM around the 32-bit MMIO hole, maps it, and prints the regions and the KVM
//! memory slots they become.
//!
//! `cargo run -p vmmkit-memory --example layout [SIZE_MIB]` (default 4096, which puts 3 GiB below
//! the hole and 1 GiB above 4 GiB). The mapping is `MAP_NORESERVE`, so even a large guest costs
//! the host nothing until it is touched. With `/dev/kvm` the regions are also registered as memory
//! slots in a fresh VM; without it the example says so and stops after the layout.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// The x86 32-bit MMIO hole (IOAPIC, LAPIC, PCI BARs): 3 GiB to 4 GiB, as `vmmkit-arch`'s layout
/// defines it.
const HOLE: memory::MmioHole = memory::MmioHole {
    start: 0xc000_0000,
    end: 0x1_0000_0000,
};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("layout: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let size_mib: u64 = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .map_err(|_| format!("the size must be a number of MiB, not {arg:?}"))?,
        None => 4096,
    };
    let size = size_mib << 20;
    println!(
        "guest RAM: {size_mib} MiB, MMIO hole {:#x}..{:#x}",
        HOLE.start, HOLE.end
    );
    for (start, len) in memory::ram_ranges(size, HOLE) {
        println!(
            "range     {:#012x}..{:#012x} ({} MiB)",
            start.0,
            start.0 + len,
            len >> 20
        );
    }

    let mem = memory::create_guest_memory(size, HOLE)?;
    for (slot, region) in mem.iter().enumerate() {
        println!(
            "region    {:#012x}..{:#012x} at host {:p} -> slot {slot}",
            region.start_addr().0,
            region.start_addr().0 + region.len(),
            region.as_ptr(),
        );
    }
    println!("low RAM ends at {:#x}", memory::low_ram_end(&mem));

    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            println!("no /dev/kvm ({e}): slots not registered");
            return Ok(());
        }
    };
    let vm = kvm.create_vm()?;
    memory::register_slots(&vm, &mem, kvm.get_nr_memslots())?;
    println!(
        "registered {} of KVM's {} memory slots",
        mem.num_regions(),
        kvm.get_nr_memslots()
    );
    Ok(())
}
