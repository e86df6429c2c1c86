//! Loads a Linux kernel (bzImage or ELF vmlinux), and optionally an initramfs, into guest memory
//! and prints where everything went.
//!
//! `cargo run -p vmmkit-boot --example load_kernel [KERNEL [INITRAMFS]]`. The kernel defaults to
//! the project's small kernel as `scripts/guest-kit path microvm` caches it
//! (`$VMM_GUEST_CACHE/microvm/bzImage`, `/var/cache/vmm-guest-kit` by default). Guest memory is
//! 512 MiB of plain `GuestMemoryMmap`: no VM and no `/dev/kvm` are involved. A bzImage's payload
//! is decompressed here on the host, as the VMM does by default.

use std::fs::File;
use std::path::PathBuf;
use std::time::Instant;

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest RAM for the example.
const RAM_SIZE: usize = 512 << 20;
/// Where the command line goes (`vmmkit-arch`'s `layout::CMDLINE_START`).
const CMDLINE_START: u64 = 0x2_0000;
const CMDLINE: &str = "console=ttyS0 panic=-1";

fn default_kernel() -> PathBuf {
    let cache =
        std::env::var_os("VMM_GUEST_CACHE").unwrap_or_else(|| "/var/cache/vmm-guest-kit".into());
    PathBuf::from(cache).join("microvm/bzImage")
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load_kernel: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1);
    let kernel_path = args.next().map_or_else(default_kernel, PathBuf::from);
    let initramfs_path = args.next().map(PathBuf::from);

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM_SIZE)])?;
    let mut image = File::open(&kernel_path)
        .map_err(|e| format!("cannot open the kernel {}: {e}", kernel_path.display()))?;
    let started = Instant::now();
    let kernel = boot::load_kernel(&mem, &mut image, &boot::KernelOptions::default())?;
    println!(
        "kernel     {} ({:?}), loaded in {:?}",
        kernel_path.display(),
        kernel.format,
        started.elapsed()
    );
    println!("protocol   {}", kernel.protocol.name());
    println!("entry      {:#x}", kernel.entry.0);
    println!("kernel end {:#x}", kernel.kernel_end.0);
    match kernel.pvh_entry {
        Some(pvh) => println!("PVH note   {:#x}", pvh.0),
        None => println!("PVH note   none"),
    }
    if let Some(hdr) = kernel.setup_header {
        // Copy the packed fields out before formatting them.
        let (version, cmdline_size, initrd_addr_max) =
            (hdr.version, hdr.cmdline_size, hdr.initrd_addr_max);
        println!(
            "setup hdr  boot protocol {}.{:02}, cmdline_size {cmdline_size}, initrd_addr_max {initrd_addr_max:#x}",
            version >> 8,
            version & 0xff
        );
    }

    boot::load_cmdline(
        &mem,
        GuestAddress(CMDLINE_START),
        CMDLINE,
        kernel.max_cmdline_len(),
    )?;
    println!(
        "cmdline    {CMDLINE_START:#x}..{:#x} {CMDLINE:?}",
        CMDLINE_START + CMDLINE.len() as u64 + 1
    );

    if let Some(path) = initramfs_path {
        let mut file = File::open(&path)
            .map_err(|e| format!("cannot open the initramfs {}: {e}", path.display()))?;
        let initramfs = boot::load_initramfs(&mem, &mut file, &kernel, RAM_SIZE as u64)?;
        println!(
            "initramfs  {:#x}..{:#x} ({} bytes)",
            initramfs.addr.0,
            initramfs.addr.0 + initramfs.size,
            initramfs.size
        );
    }
    Ok(())
}
