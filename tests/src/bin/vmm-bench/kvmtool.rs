//! kvmtool as a peer of the tiny-guest rows, where `--kvmtool` names its `lkvm` binary. kvmtool
//! loads no PVH ELF, so it runs the same code as a real-mode flat binary
//! (`integration_tests::tiny_flat_guest`), with its default devices off (`--nodefaults`, no
//! network): 128 MiB, one vCPU, the serial console on stdio; the guest's i8042 reset ends it
//! with status 0. Its device rows would need a bench guest it can load; it has none.
//!
//! kvmtool reads CPUID for VMX or SVM before it opens `/dev/kvm` and stops without them, which a
//! kvm-pvm host has neither of: there it runs only as a build with that check
//! (`kvm__arch_cpu_supports_vm` in `x86/kvm.c`) removed.

use std::path::Path;
use std::process::Command;

pub const ABSENT: &str = "no kvmtool (--kvmtool, KVMTOOL or lkvm on PATH)";

/// `lkvm run` on the flat guest. kvmtool keeps a control socket per guest in `$HOME/.lkvm/`,
/// so `home` (the bench's own directory) stands in for the user's home.
pub fn command(lkvm: &Path, guest: &Path, home: &Path) -> Command {
    let mut command = Command::new(lkvm);
    command
        .args(["run", "-k"])
        .arg(guest)
        .args(["-m", "128", "-c", "1", "--nodefaults", "-n", "mode=none"])
        .env("HOME", home);
    command
}
