//! Cloud Hypervisor as a peer of the tiny-guest and virtio-pci device rows, where
//! `--cloud-hypervisor` names a binary. It boots from its command line as ours does, with its
//! defaults otherwise (its seccomp filters on, a virtio-rng device); the serial port is the
//! console (`--serial tty --console off`). Its devices are virtio-pci only, with one queue pair
//! per network device unless asked, so it is a peer of the pci rows. It restarts its guest on an
//! i8042 reset, so its guests end with ACPI soft-off on its sleep control port instead
//! (`tiny_pvh_guest_acpi_off`; the bench guest's `stop` writes both), which ends it with status 0.

use std::path::Path;
use std::process::Command;

/// What the guest gets: its kernel (a PVH ELF), command line and memory, a disk, and a tap
/// with its queue pairs (more than one needs a multi-queue tap).
pub struct CloudHypervisorVm<'a> {
    pub kernel: &'a Path,
    pub cmdline: &'a str,
    pub mem_mib: u64,
    pub disk: Option<&'a Path>,
    pub tap: Option<(&'a str, usize)>,
}

impl CloudHypervisorVm<'_> {
    /// Its vCPUs: one, or as many as the tap's queue pairs, which Cloud Hypervisor requires
    /// (`Queue count must not exceed boot vCPUs`). The bench guest runs on the first; the others
    /// are application processors it never starts, which wait in `KVM_RUN` for an INIT.
    fn vcpus(&self) -> usize {
        self.tap.map_or(1, |(_, pairs)| pairs.max(1))
    }

    /// Cloud Hypervisor's arguments: one vCPU (see [`Self::vcpus`]); the disk read-write
    /// (io_uring where the host has it, its default) with flushes reaching the file; the tap
    /// opened by name.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--kernel".to_string(),
            self.kernel.display().to_string(),
            "--cpus".into(),
            format!("boot={}", self.vcpus()),
            "--memory".into(),
            format!("size={}M", self.mem_mib),
            "--serial".into(),
            "tty".into(),
            "--console".into(),
            "off".into(),
        ];
        if !self.cmdline.is_empty() {
            args.extend(["--cmdline".to_string(), self.cmdline.to_string()]);
        }
        if let Some(disk) = self.disk {
            args.extend(["--disk".to_string(), format!("path={}", disk.display())]);
        }
        if let Some((tap, pairs)) = self.tap {
            args.extend([
                "--net".to_string(),
                format!("tap={tap},num_queues={}", 2 * pairs),
            ]);
        }
        args
    }

    /// Cloud Hypervisor running this guest, through `wrapper` (`ip netns exec NS`) if given.
    pub fn command(&self, cloud_hypervisor: &Path, wrapper: &[&str]) -> Command {
        let mut command = crate::wrapped_command(cloud_hypervisor, wrapper);
        command.args(self.args());
        command
    }
}

/// The cell of a peer that was not given.
pub const ABSENT: &str = "no Cloud Hypervisor (--cloud-hypervisor, CLOUD_HYPERVISOR or PATH)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arguments_have_the_disk_and_tap_only_when_given() {
        let bare = CloudHypervisorVm {
            kernel: Path::new("/k.elf"),
            cmdline: "",
            mem_mib: 128,
            disk: None,
            tap: None,
        };
        let args = bare.args();
        assert!(args.windows(2).any(|w| w == ["--kernel", "/k.elf"]));
        assert!(args.windows(2).any(|w| w == ["--memory", "size=128M"]));
        assert!(args.windows(2).any(|w| w == ["--serial", "tty"]));
        assert!(args.windows(2).any(|w| w == ["--cpus", "boot=1"]));
        for absent in ["--cmdline", "--disk", "--net"] {
            assert!(!args.iter().any(|a| a == absent), "{absent} in {args:?}");
        }
        let full = CloudHypervisorVm {
            cmdline: "bench.secs=2",
            disk: Some(Path::new("/d.img")),
            tap: Some(("tap7", 2)),
            ..bare
        };
        let args = full.args();
        assert!(args.windows(2).any(|w| w == ["--cmdline", "bench.secs=2"]));
        assert!(args.windows(2).any(|w| w == ["--cpus", "boot=2"]));
        assert!(args.windows(2).any(|w| w == ["--disk", "path=/d.img"]));
        assert!(args
            .windows(2)
            .any(|w| w == ["--net", "tap=tap7,num_queues=4"]));
    }
}
