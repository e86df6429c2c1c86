//! The VMM's configuration: the command line, parsed and checked before any VM exists.

use std::path::PathBuf;

use clap::Parser;

/// The kernel command line used when the user gives none: a serial console and a quiet, quick boot.
///
/// `reboot=k` makes the guest's `reboot` go through the i8042 reset line, which ends the VMM;
/// `panic=1` turns a guest panic into a reset. The rest trims boot work that costs exits or, where
/// the guest kernel is emulated, minutes: one UART instead of four, no PS/2 mouse probing, no
/// cryptographic self-tests, and no clock-source watchdog.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 quiet 8250.nr_uarts=1 \
i8042.noaux i8042.nomux nokaslr tsc=reliable no_timer_check cryptomgr.notests random.trust_cpu=on";

/// Errors in what the user asked for.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid memory size {0:?}: expected a number with an optional K, M or G suffix (no suffix means MiB)")]
    MemorySyntax(String),
    #[error("--cpus must be at least 1")]
    NoCpus,
    #[error("--cpus {asked} is more than this host's KVM allows ({max})")]
    TooManyCpus { asked: u32, max: usize },
    #[error("--cpus {0} is more than the 254 an x86 MP table can describe")]
    TooManyCpusForMpTable(u32),
    #[error("invalid --cpu-features {0:?}: expected host, safe or auto")]
    CpuFeatures(String),
    #[error("invalid --kernel-decompress {0:?}: expected host or guest")]
    KernelDecompress(String),
    #[error("cannot read the kernel {path}: {source}")]
    KernelUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the initramfs {path}: {source}")]
    InitramfsUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `vmm`: boots a Linux guest on KVM with a serial console on stdin/stdout.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "vmm",
    version,
    about = "Boot a Linux guest on KVM, with its serial console on this terminal.",
    after_help = "Examples:\n  vmm --kernel /boot/vmlinuz-6.1.0-56-amd64 --initramfs initramfs.cpio\n  \
vmm --kernel vmlinux --cpus 4 --memory 2G --cmdline \"console=ttyS0 reboot=k panic=1\"\n\n\
The guest's console is this terminal (in raw mode; it is restored on exit). The guest's `reboot`,\n\
a triple fault or a panic (with panic=1) ends the VMM with status 0; a KVM failure ends it with\n\
status 1; bad arguments with status 2."
)]
pub struct VmConfig {
    /// Guest kernel: a bzImage (such as /boot/vmlinuz-*) or an ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// Initial RAM filesystem (a cpio archive, optionally compressed) loaded beside the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// Kernel command line [default: a serial console on ttyS0 and a quick, quiet boot].
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,

    /// Number of vCPUs, e.g. --cpus 4.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,

    /// Guest RAM: a number with an optional K, M or G suffix, no suffix meaning MiB, e.g. --memory 6G.
    #[arg(long, value_name = "SIZE", default_value = "512", value_parser = parse_size)]
    pub memory: u64,

    /// Which CPU features the guest may use: `host` (all), `safe` (hide what software-emulated KVM
    /// cannot run), or `auto` (probe the host's KVM and hide what fails).
    #[arg(long, value_name = "host|safe|auto", default_value = "auto")]
    pub cpu_features: String,

    /// Where a bzImage's compressed kernel is unpacked: `host` (by the VMM, much faster where KVM
    /// emulates the guest kernel) or `guest` (by the kernel's own decompressor).
    #[arg(long, value_name = "host|guest", default_value = "host")]
    pub kernel_decompress: String,

    /// How to enter an ELF vmlinux: `auto` (through PVH when it has the PVH ELF note, else the
    /// 64-bit Linux boot protocol) or `linux64` (always the 64-bit protocol). A bzImage always
    /// boots through the 64-bit protocol.
    #[arg(long, value_name = "auto|linux64", default_value = "auto", value_parser = parse_boot_protocol)]
    pub boot_protocol: boot::ProtocolChoice,

    /// A raw disk image as a virtio-blk device, e.g. --disk path=disk.img,readonly=on,serial=data1.
    /// Repeatable; the guest sees vda, vdb, ... in the order given.
    #[arg(long = "disk", value_name = "path=FILE[,readonly=on][,serial=ID]", value_parser = parse_disk)]
    pub disks: Vec<DiskConfig>,

    /// A virtio-net device on an existing tap interface, e.g. --net tap=tap0,mac=52:54:00:12:34:56.
    /// Repeatable.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    pub nets: Vec<NetConfig>,

    /// A virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    pub rng: bool,

    /// The virtio transport: `pci` (found by any kernel with virtio_pci) or `mmio` (fewer exits;
    /// needs a kernel with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, the VMM adds the device list to
    /// the command line).
    #[arg(long, value_name = "pci|mmio", default_value = "pci", value_parser = parse_transport)]
    pub transport: Transport,

    /// ACPI tables and the ACPI power button (`on`), or only the MP table (`off`).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub acpi: bool,

    /// Seconds SIGTERM or SIGINT waits for the guest to power off after pressing its power
    /// button, before stopping it (status 128 + the signal).
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_seconds)]
    pub shutdown_timeout: std::time::Duration,

    /// Seccomp filters on every VMM thread (`on`: a system call outside a thread's list ends the
    /// VMM), none (`off`, for debugging only: a guest that takes over a VMM thread then reaches
    /// every system call this user may make), or filters that only log (`log`, to dmesg).
    #[arg(long, value_name = "on|off|log", default_value = "on")]
    pub seccomp: crate::seccomp::Mode,

    /// The VMM's own log level on stderr (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    pub log_level: String,
}

/// A disk the user attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    pub serial: Option<String>,
}

/// A network interface the user attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
}

/// The virtio transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Pci,
    Mmio,
}

fn parse_transport(text: &str) -> Result<Transport, String> {
    match text {
        "pci" => Ok(Transport::Pci),
        "mmio" => Ok(Transport::Mmio),
        other => Err(format!(
            "{other:?} is not a transport: expected pci or mmio"
        )),
    }
}

fn parse_on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("{other:?}: expected on or off")),
    }
}

/// Parses a whole number of seconds, such as `30`.
fn parse_seconds(text: &str) -> Result<std::time::Duration, String> {
    text.parse::<u64>()
        .map(std::time::Duration::from_secs)
        .map_err(|_| format!("{text:?} is not a whole number of seconds"))
}

fn parse_boot_protocol(text: &str) -> Result<boot::ProtocolChoice, String> {
    match text {
        "auto" => Ok(boot::ProtocolChoice::Auto),
        "linux64" => Ok(boot::ProtocolChoice::Linux64),
        other => Err(format!(
            "{other:?} is not a boot protocol: expected auto or linux64"
        )),
    }
}

/// Splits `key=value,key=value` into pairs, rejecting keys outside `allowed`.
fn key_values<'a>(text: &'a str, allowed: &[&str]) -> Result<Vec<(&'a str, &'a str)>, String> {
    text.split(',')
        .map(|part| {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not key=value"))?;
            if !allowed.contains(&key) {
                return Err(format!(
                    "unknown key {key:?} (expected {})",
                    allowed.join(", ")
                ));
            }
            Ok((key, value))
        })
        .collect()
}

fn on_off(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        other => Err(format!("{key}={other}: expected on or off")),
    }
}

/// Parses `path=FILE[,readonly=on][,serial=ID]`.
pub fn parse_disk(text: &str) -> Result<DiskConfig, String> {
    let mut disk = DiskConfig {
        path: PathBuf::new(),
        read_only: false,
        serial: None,
    };
    for (key, value) in key_values(text, &["path", "readonly", "serial"])? {
        match key {
            "path" => disk.path = PathBuf::from(value),
            "readonly" => disk.read_only = on_off(key, value)?,
            _ => disk.serial = Some(value.to_string()),
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err("a disk needs path=FILE".to_string());
    }
    Ok(disk)
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bad = || format!("{text:?} is not a MAC address like 52:54:00:12:34:56");
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "{text:?} is a multicast address; a NIC needs a unicast one"
        ));
    }
    Ok(mac)
}

/// Parses `tap=NAME[,mac=MAC]`.
pub fn parse_net(text: &str) -> Result<NetConfig, String> {
    let mut net = NetConfig {
        tap: String::new(),
        mac: None,
    };
    for (key, value) in key_values(text, &["tap", "mac"])? {
        match key {
            "tap" => net.tap = value.to_string(),
            _ => net.mac = Some(parse_mac(value)?),
        }
    }
    if net.tap.is_empty() {
        return Err("a network device needs tap=NAME".to_string());
    }
    Ok(net)
}

/// Parses a size such as `512`, `512M`, `6G` or `65536K` into bytes; no suffix means MiB.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let err = || ConfigError::MemorySyntax(text.to_string()).to_string();
    let trimmed = text.trim();
    let (digits, shift) = match trimmed.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                _ => return Err(err()),
            };
            (&trimmed[..i], shift)
        }
        _ => (trimmed, 20),
    };
    let value: u64 = digits.parse().map_err(|_| err())?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("memory size {text:?} is too large"))
}

impl VmConfig {
    /// The command line the guest gets, before hardware-specific switches are appended.
    pub fn base_cmdline(&self) -> &str {
        self.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE)
    }

    /// Checks the vCPU count against what an MP table and the host's KVM allow.
    pub fn check_cpus(&self, kvm_max: usize) -> Result<u8, ConfigError> {
        if self.cpus == 0 {
            return Err(ConfigError::NoCpus);
        }
        if self.cpus as usize > kvm_max {
            return Err(ConfigError::TooManyCpus {
                asked: self.cpus,
                max: kvm_max,
            });
        }
        u8::try_from(self.cpus)
            .ok()
            .filter(|n| *n <= 254)
            .ok_or(ConfigError::TooManyCpusForMpTable(self.cpus))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_default_to_mib() {
        assert_eq!(parse_size("512"), Ok(512 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("6G"), Ok(6 << 30));
        assert_eq!(parse_size("6g"), Ok(6 << 30));
        assert_eq!(parse_size("65536K"), Ok(64 << 20));
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn cpu_counts_are_checked() {
        let mut config = VmConfig::parse_from(["vmm", "--kernel", "k"]);
        assert_eq!(config.check_cpus(288).unwrap(), 1);
        config.cpus = 0;
        assert!(matches!(config.check_cpus(288), Err(ConfigError::NoCpus)));
        config.cpus = 300;
        assert!(matches!(
            config.check_cpus(288),
            Err(ConfigError::TooManyCpus { .. })
        ));
        config.cpus = 255;
        assert!(matches!(
            config.check_cpus(288),
            Err(ConfigError::TooManyCpusForMpTable(255))
        ));
    }

    #[test]
    fn disks_parse_with_their_options() {
        assert_eq!(
            parse_disk("path=/tmp/a.img,readonly=on,serial=abc"),
            Ok(DiskConfig {
                path: PathBuf::from("/tmp/a.img"),
                read_only: true,
                serial: Some("abc".into())
            })
        );
        assert!(!parse_disk("path=a.img").unwrap().read_only);
        assert!(parse_disk("readonly=on").is_err());
        assert!(parse_disk("path=a.img,readonly=maybe").is_err());
        assert!(parse_disk("path=a.img,cache=none").is_err());
        assert!(parse_disk("a.img").is_err());
    }

    #[test]
    fn nets_and_macs_parse() {
        assert_eq!(
            parse_net("tap=tap0,mac=52:54:00:12:34:56"),
            Ok(NetConfig {
                tap: "tap0".into(),
                mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
            })
        );
        assert_eq!(parse_net("tap=tap1").unwrap().mac, None);
        assert!(parse_mac("52:54:00:12:34").is_err());
        assert!(parse_mac("52:54:00:12:34:56:78").is_err());
        assert!(parse_mac("52:54:00:12:34:zz").is_err());
        assert!(parse_mac("01:00:5e:00:00:01").is_err());
        assert!(parse_net("mac=52:54:00:12:34:56").is_err());
    }

    #[test]
    fn boot_protocols_parse() {
        let config = VmConfig::parse_from(["vmm", "--kernel", "k", "--boot-protocol", "linux64"]);
        assert_eq!(config.boot_protocol, boot::ProtocolChoice::Linux64);
        assert!(
            VmConfig::try_parse_from(["vmm", "--kernel", "k", "--boot-protocol", "pvh"]).is_err()
        );
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let config = VmConfig::parse_from(["vmm", "--kernel", "k"]);
        assert_eq!(config.cpus, 1);
        assert_eq!(config.memory, 512 << 20);
        assert_eq!(config.base_cmdline(), DEFAULT_CMDLINE);
        assert_eq!(config.cpu_features, "auto");
        assert_eq!(config.transport, Transport::Pci);
        assert_eq!(config.boot_protocol, boot::ProtocolChoice::Auto);
        assert!(config.disks.is_empty() && config.nets.is_empty() && !config.rng);
        assert!(config.acpi);
        assert_eq!(config.shutdown_timeout, std::time::Duration::from_secs(30));
    }

    #[test]
    fn acpi_and_shutdown_timeout_parse() {
        let config = VmConfig::parse_from([
            "vmm",
            "--kernel",
            "k",
            "--acpi",
            "off",
            "--shutdown-timeout",
            "5",
        ]);
        assert!(!config.acpi);
        assert_eq!(config.shutdown_timeout, std::time::Duration::from_secs(5));
        assert!(VmConfig::try_parse_from(["vmm", "--kernel", "k", "--acpi", "maybe"]).is_err());
        assert!(
            VmConfig::try_parse_from(["vmm", "--kernel", "k", "--shutdown-timeout", "-1"]).is_err()
        );
    }
}
