//! Firecracker as a peer of the tiny-guest and device rows, where `--firecracker` names a
//! binary. It runs from a configuration file (`--no-api --config-file`), so that it boots as
//! soon as it starts, as ours and QEMU do from their command lines; with its seccomp filters
//! off (`--no-seccomp`), as the API rows run it, since a build outside its own toolchain has
//! none. Firecracker has only virtio-mmio and one queue pair per network device, so it is a
//! peer of the mmio rows only. It lists its devices on the guest's command line as
//! `virtio_mmio.device=` entries, which the bench guest reads; the guest's i8042 reset ends it
//! with status 0.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

/// What the guest gets: its kernel (a PVH ELF), command line and memory, a disk and a tap.
pub struct FirecrackerVm<'a> {
    pub kernel: &'a Path,
    pub cmdline: &'a str,
    pub mem_mib: u64,
    pub disk: Option<&'a Path>,
    pub tap: Option<&'a str>,
}

impl FirecrackerVm<'_> {
    /// The configuration file's JSON: one vCPU; the disk read-write on io_uring (`Async`)
    /// with flushes reaching the file (`Writeback`, as ours and QEMU's do); the tap as
    /// `eth0`'s host side.
    pub fn config(&self) -> String {
        let drives: Vec<_> = self
            .disk
            .iter()
            .map(|path| {
                json!({
                    "drive_id": "bench",
                    "path_on_host": path,
                    "is_root_device": false,
                    "is_read_only": false,
                    "cache_type": "Writeback",
                    "io_engine": "Async",
                })
            })
            .collect();
        let nets: Vec<_> = self
            .tap
            .iter()
            .map(|tap| {
                json!({
                    "iface_id": "eth0",
                    "host_dev_name": tap,
                    "guest_mac": "02:00:00:00:00:01",
                })
            })
            .collect();
        json!({
            "boot-source": {
                "kernel_image_path": self.kernel,
                "boot_args": self.cmdline,
            },
            "drives": drives,
            "network-interfaces": nets,
            "machine-config": {"vcpu_count": 1, "mem_size_mib": self.mem_mib},
        })
        .to_string()
    }

    /// Writes the configuration as `dir/name.json`, once for all of a case's runs; `Err` says
    /// why it could not, for each run to report.
    pub fn write_config(&self, dir: &Path, name: &str) -> Result<PathBuf, String> {
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, self.config())
            .map_err(|e| format!("cannot write its configuration: {e}"))?;
        Ok(path)
    }
}

/// Firecracker booting from the configuration file `config`, run through `wrapper`
/// (`ip netns exec NS`) if given.
pub fn command(firecracker: &Path, config: &Path, wrapper: &[&str]) -> Command {
    let mut command = crate::wrapped_command(firecracker, wrapper);
    command
        .args([
            "--no-api",
            "--no-seccomp",
            "--level",
            "warning",
            "--config-file",
        ])
        .arg(config);
    command
}

/// The cell of a peer that was not given.
pub const ABSENT: &str = "no Firecracker (--firecracker, FIRECRACKER or PATH)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_has_the_disk_and_tap_only_when_given() {
        let kernel = Path::new("/k.elf");
        let bare = FirecrackerVm {
            kernel,
            cmdline: "bench.secs=2",
            mem_mib: 128,
            disk: None,
            tap: None,
        };
        let v: serde_json::Value = serde_json::from_str(&bare.config()).unwrap();
        assert_eq!(v["boot-source"]["kernel_image_path"], "/k.elf");
        assert_eq!(v["boot-source"]["boot_args"], "bench.secs=2");
        assert_eq!(v["machine-config"]["mem_size_mib"], 128);
        assert_eq!(v["drives"].as_array().unwrap().len(), 0);
        assert_eq!(v["network-interfaces"].as_array().unwrap().len(), 0);
        let full = FirecrackerVm {
            disk: Some(Path::new("/d.img")),
            tap: Some("tap7"),
            ..bare
        };
        let v: serde_json::Value = serde_json::from_str(&full.config()).unwrap();
        assert_eq!(v["drives"][0]["path_on_host"], "/d.img");
        assert_eq!(v["drives"][0]["cache_type"], "Writeback");
        assert_eq!(v["network-interfaces"][0]["host_dev_name"], "tap7");
    }
}
