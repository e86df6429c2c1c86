//! The VMM's configuration: the command line, parsed and checked before any VM exists.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

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
    #[error("{what} {path} is {kind}, not {expected}")]
    WrongFileType {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
        expected: &'static str,
    },
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

/// The help text after the options: the default command line, the console, and the exit status
/// contract (kept in one place so that `--help` and the README say the same).
const AFTER_HELP: &str = concat!(
    "Default kernel command line (--cmdline replaces it, --append adds to it):\n  ",
    "console=ttyS0 reboot=k panic=1 quiet 8250.nr_uarts=1 i8042.noaux i8042.nomux nokaslr ",
    "tsc=reliable no_timer_check cryptomgr.notests random.trust_cpu=on\n\n",
    "Examples:\n  vmm --kernel vmlinuz --initramfs initramfs.cpio\n  ",
    "vmm --kernel vmlinux --cpus 4 --memory 2G --append \"init=/bin/sh\"\n  ",
    "vmm --kernel vmlinuz --serial socket=/tmp/console.sock   (then: socat -,raw,echo=0 UNIX-CONNECT:/tmp/console.sock)\n\n",
    "With --serial stdio (the default) the console is this terminal, in raw mode while the guest\n",
    "runs and restored on every exit; Ctrl-A x quits.\n\n",
    "Exit status:\n",
    "  0        the guest stopped itself: reboot, power-off, reset, the debug-exit port, a panic\n",
    "           with panic=1, or a halt with interrupts off (logged as such)\n",
    "  1        the VMM failed (a KVM error, a device or vCPU thread that died, an emulation\n",
    "           failure that stopped the VM)\n",
    "  2        bad arguments or unusable files, before the guest ran\n",
    "  128+N    ended by signal N (SIGTERM 143, SIGINT 130, SIGHUP 129) before the guest stopped;\n",
    "           a guest that powers off in time after SIGTERM/SIGINT pressed its power button: 0"
);

/// `vmm`: boots a Linux guest on KVM with a serial console on stdin/stdout.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "vmm",
    version,
    about = "Boot a Linux guest on KVM, with its serial console on this terminal.",
    after_help = AFTER_HELP
)]
pub struct VmConfig {
    /// Guest kernel: a bzImage (such as /boot/vmlinuz-*) or an ELF vmlinux. Not needed with
    /// --api-sock (the API's boot-source names it) or --config-file.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["api_sock", "config_file"])]
    pub kernel: Option<PathBuf>,

    /// Initial RAM filesystem (a cpio archive, optionally compressed) loaded beside the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// The whole kernel command line, replacing the default one (shown below).
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,

    /// Options added to the end of the kernel command line (the default one, or --cmdline's),
    /// e.g. --append "init=/bin/sh loglevel=7". Repeatable.
    #[arg(long, value_name = "STRING")]
    pub append: Vec<String>,

    /// Number of vCPUs, e.g. --cpus 4.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,

    /// Guest RAM: a number with an optional K, M or G suffix, no suffix meaning MiB, e.g. --memory 6G.
    #[arg(long, value_name = "SIZE", default_value = "512", value_parser = parse_size)]
    pub memory: u64,

    /// Which CPU features the guest may use: `host` (all), `safe` (hide what software-emulated KVM
    /// cannot run), or `auto` (probe the host's KVM and hide what fails).
    #[arg(long, value_enum, default_value_t = CpuFeatures::Auto)]
    pub cpu_features: CpuFeatures,

    /// Where a bzImage's compressed kernel is unpacked: `host` (by the VMM, much faster where KVM
    /// emulates the guest kernel) or `guest` (by the kernel's own decompressor).
    #[arg(long, value_enum, default_value_t = KernelDecompress::Host)]
    pub kernel_decompress: KernelDecompress,

    /// How to enter an ELF vmlinux: `auto` (through PVH when it has the PVH ELF note, else the
    /// 64-bit Linux boot protocol) or `linux64` (always the 64-bit protocol). A bzImage always
    /// boots through the 64-bit protocol.
    #[arg(long, value_enum, default_value_t = BootProtocol::Auto)]
    pub boot_protocol: BootProtocol,

    /// A raw disk image as a virtio-blk device, e.g. --disk path=disk.img,readonly=on,serial=data1.
    /// Repeatable; the guest sees vda, vdb, ... in the order given. io_engine=async (the
    /// default) runs its requests on io_uring, many at a time, where the host offers it;
    /// io_engine=sync one at a time with positional reads and writes. poll_us=N (default 50,
    /// 0 to 1000) lets the disk's thread watch the request queue for up to N microseconds after
    /// serving it, so that a guest's next request needs no VM exit to reach it.
    #[arg(long = "disk", value_name = "path=FILE[,readonly=on][,serial=ID][,io_engine=async|sync][,poll_us=N]", value_parser = parse_disk)]
    pub disks: Vec<DiskConfig>,

    /// A virtio-net device on an existing tap interface, e.g. --net tap=tap0,mac=52:54:00:12:34:56.
    /// Repeatable. queues=N (up to 16) gives it N receive/transmit queue pairs on a multi-queue
    /// tap (`ip tuntap add dev tap0 mode tap multi_queue`), each pair on a thread of its own.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC][,queues=N]", value_parser = parse_net)]
    pub nets: Vec<NetConfig>,

    /// A virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    pub rng: bool,

    /// The virtio transport: `pci` (found by any kernel with virtio_pci) or `mmio` (fewer exits;
    /// needs a kernel with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, the VMM adds the device list to
    /// the command line).
    #[arg(long, value_enum, default_value_t = Transport::Pci)]
    pub transport: Transport,

    /// Serve Firecracker's REST API (HTTP/1.1) on this Unix socket. Without --kernel or
    /// --config-file the VMM waits for the API to configure and start the VM.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,

    /// Start the VM described by this Firecracker JSON configuration file (boot-source,
    /// machine-config, drives, network-interfaces, entropy).
    #[arg(long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,

    /// ACPI tables and the ACPI power button (`on`), or only the MP table (`off`).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub acpi: OnOff,

    /// Seconds SIGTERM or SIGINT waits for the guest to power off after pressing its power
    /// button, before stopping it (status 128 + the signal).
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_seconds)]
    pub shutdown_timeout: std::time::Duration,

    /// Seccomp filters on every VMM thread (`on`: a system call outside a thread's list ends the
    /// VMM), none (`off`, for debugging only: a guest that takes over a VMM thread then reaches
    /// every system call this user may make), or filters that only log (`log`, to dmesg).
    #[arg(long, value_name = "on|off|log", default_value = "on")]
    pub seccomp: crate::seccomp::Mode,

    /// Where the guest's serial console goes, input and output: `stdio` (this terminal), `file=PATH`
    /// (output appended to PATH, no input), `socket=PATH` (a Unix socket to connect to, e.g. with
    /// `socat -,raw,echo=0 UNIX-CONNECT:PATH`; one client at a time, output is dropped while none is
    /// connected), `pty` (a new pseudo-terminal, its path printed on stderr) or `off`.
    #[arg(long, value_name = "stdio|file=PATH|socket=PATH|pty|off", default_value = "stdio", value_parser = crate::console_io::parse_serial)]
    pub serial: crate::console_io::SerialMode,

    /// Write the VMM's log to PATH (appended) instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// Write metrics to PATH (appended): one JSON object per line, every --metrics-interval
    /// seconds and at exit, with each vCPU's exits by reason and each device's counters.
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,

    /// Seconds between two lines of --metrics-file.
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = parse_positive_seconds)]
    pub metrics_interval: std::time::Duration,

    /// The VMM's own log level; RUST_LOG overrides it.
    #[arg(long, value_enum, default_value_t = LogLevel::Warn)]
    pub log_level: LogLevel,
}

/// A disk the user attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    pub serial: Option<String>,
    pub io_engine: DiskIoEngine,
    /// How long the disk's worker may poll the request queue after serving it (`poll_us=`).
    pub poll: std::time::Duration,
}

/// The default of `--disk`'s `poll_us=`: long enough for a driver that sends its next request
/// as soon as the last completes, short against the wake-up it saves on an idle CPU.
pub const DEFAULT_DISK_POLL: std::time::Duration = std::time::Duration::from_micros(50);

/// How a disk's requests reach its image (`io_engine=`, Firecracker's drive `io_engine`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DiskIoEngine {
    /// io_uring, many requests in flight; synchronous where the host has no usable io_uring.
    #[default]
    Async,
    /// One request at a time, positional reads and writes on the device's worker thread.
    Sync,
}

impl DiskIoEngine {
    /// The name Firecracker's API uses.
    pub fn api_name(self) -> &'static str {
        match self {
            DiskIoEngine::Async => "Async",
            DiskIoEngine::Sync => "Sync",
        }
    }

    /// `async` or `sync`, in any case (so Firecracker's `Async` and `Sync` too).
    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "async" => Some(DiskIoEngine::Async),
            "sync" => Some(DiskIoEngine::Sync),
            _ => None,
        }
    }
}

/// A network interface the user attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
    /// Receive/transmit queue pairs, each a queue of a multi-queue tap.
    pub queues: usize,
}

/// The most queue pairs of a network device (`virtio_net::MAX_QUEUE_PAIRS`; this crate parses
/// the option even where the device is not built in).
pub const MAX_NET_QUEUE_PAIRS: usize = 16;

/// The virtio transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Pci,
    Mmio,
}

/// A switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

impl OnOff {
    pub fn is_on(self) -> bool {
        self == OnOff::On
    }
}

/// `--cpu-features`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CpuFeatures {
    Host,
    Safe,
    Auto,
}

impl CpuFeatures {
    pub fn name(self) -> &'static str {
        match self {
            CpuFeatures::Host => "host",
            CpuFeatures::Safe => "safe",
            CpuFeatures::Auto => "auto",
        }
    }
}

/// `--kernel-decompress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KernelDecompress {
    Host,
    Guest,
}

impl From<KernelDecompress> for boot::Decompress {
    fn from(choice: KernelDecompress) -> Self {
        match choice {
            KernelDecompress::Host => boot::Decompress::Host,
            KernelDecompress::Guest => boot::Decompress::Guest,
        }
    }
}

/// `--boot-protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BootProtocol {
    Auto,
    Linux64,
}

impl From<BootProtocol> for boot::ProtocolChoice {
    fn from(choice: BootProtocol) -> Self {
        match choice {
            BootProtocol::Auto => boot::ProtocolChoice::Auto,
            BootProtocol::Linux64 => boot::ProtocolChoice::Linux64,
        }
    }
}

/// `--log-level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// Parses a whole number of seconds, such as `30`.
fn parse_positive_seconds(text: &str) -> Result<std::time::Duration, String> {
    match parse_seconds(text)? {
        d if d.is_zero() => Err("the interval must be at least 1 second".to_string()),
        d => Ok(d),
    }
}

fn parse_seconds(text: &str) -> Result<std::time::Duration, String> {
    text.parse::<u64>()
        .map(std::time::Duration::from_secs)
        .map_err(|_| format!("{text:?} is not a whole number of seconds"))
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

/// The longest `poll_us=`: a poll holds a CPU, and past a millisecond it saves nothing a
/// wake-up costs.
pub const MAX_DISK_POLL_US: u64 = 1000;

/// Parses `path=FILE[,readonly=on][,serial=ID][,io_engine=async|sync][,poll_us=N]`.
pub fn parse_disk(text: &str) -> Result<DiskConfig, String> {
    let mut disk = DiskConfig {
        path: PathBuf::new(),
        read_only: false,
        serial: None,
        io_engine: DiskIoEngine::default(),
        poll: DEFAULT_DISK_POLL,
    };
    let keys = ["path", "readonly", "serial", "io_engine", "poll_us"];
    for (key, value) in key_values(text, &keys)? {
        match key {
            "path" => disk.path = PathBuf::from(value),
            "readonly" => disk.read_only = on_off(key, value)?,
            "io_engine" => {
                disk.io_engine = DiskIoEngine::parse(value)
                    .ok_or_else(|| format!("io_engine={value}: expected async or sync"))?
            }
            "poll_us" => {
                let us = value
                    .parse::<u64>()
                    .ok()
                    .filter(|us| *us <= MAX_DISK_POLL_US)
                    .ok_or_else(|| {
                        format!("poll_us={value}: expected 0 to {MAX_DISK_POLL_US} microseconds")
                    })?;
                disk.poll = std::time::Duration::from_micros(us);
            }
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

/// Parses `tap=NAME[,mac=MAC][,queues=N]`.
pub fn parse_net(text: &str) -> Result<NetConfig, String> {
    let mut net = NetConfig {
        tap: String::new(),
        mac: None,
        queues: 1,
    };
    for (key, value) in key_values(text, &["tap", "mac", "queues"])? {
        match key {
            "tap" => net.tap = value.to_string(),
            "mac" => net.mac = Some(parse_mac(value)?),
            _ => {
                net.queues = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_NET_QUEUE_PAIRS).contains(n))
                    .ok_or_else(|| {
                        format!(
                            "queues={value}: a network device has 1 to {MAX_NET_QUEUE_PAIRS} \
                             queue pairs"
                        )
                    })?
            }
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

/// What a file is, in words, for an error line.
fn file_kind(file_type: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_file() {
        "a regular file"
    } else {
        "not a file"
    }
}

/// Opens `path` for reading when it is a regular file (or, with `block_ok`, a block device), and
/// refuses anything else with one line naming what it is. The type is checked before `open`, so
/// a FIFO never blocks us, and again on the open descriptor, so a swap in between is caught too.
pub fn open_checked(
    path: &std::path::Path,
    what: &'static str,
    block_ok: bool,
    write: bool,
) -> Result<Option<std::fs::File>, ConfigError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let expected = if block_ok {
        "a regular file or a block device"
    } else {
        "a regular file"
    };
    let check = |file_type: std::fs::FileType| {
        if file_type.is_file() || (block_ok && file_type.is_block_device()) {
            Ok(())
        } else {
            Err(ConfigError::WrongFileType {
                what,
                path: path.to_path_buf(),
                kind: file_kind(file_type),
                expected,
            })
        }
    };
    // A missing or unreadable file is left to the caller's own error.
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(None);
    };
    check(meta.file_type())?;
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    else {
        return Ok(None);
    };
    if let Ok(meta) = file.metadata() {
        check(meta.file_type())?;
    }
    Ok(Some(file))
}

impl VmConfig {
    /// The command line the guest gets, before hardware-specific switches are appended: the
    /// user's `--cmdline` or the default one, then every `--append`.
    pub fn base_cmdline(&self) -> String {
        let mut line = self
            .cmdline
            .as_deref()
            .unwrap_or(DEFAULT_CMDLINE)
            .to_string();
        for extra in self
            .append
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
        {
            line.push(' ');
            line.push_str(extra);
        }
        line
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
                serial: Some("abc".into()),
                io_engine: DiskIoEngine::Async,
                poll: DEFAULT_DISK_POLL,
            })
        );
        assert_eq!(
            parse_disk("path=a.img,poll_us=0").unwrap().poll,
            std::time::Duration::ZERO
        );
        assert_eq!(
            parse_disk("path=a.img,poll_us=200").unwrap().poll,
            std::time::Duration::from_micros(200)
        );
        assert!(parse_disk("path=a.img,poll_us=1001").is_err());
        assert!(parse_disk("path=a.img,poll_us=-1").is_err());
        assert_eq!(
            parse_disk("path=a.img,io_engine=sync").unwrap().io_engine,
            DiskIoEngine::Sync
        );
        assert!(parse_disk("path=a.img,io_engine=threads").is_err());
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
                mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
                queues: 1,
            })
        );
        assert_eq!(parse_net("tap=tap1").unwrap().mac, None);
        assert_eq!(parse_net("tap=tap1,queues=4").unwrap().queues, 4);
        for bad in ["0", "17", "two", "-1", ""] {
            let err = parse_net(&format!("tap=tap1,queues={bad}")).unwrap_err();
            assert!(err.contains("1 to 16 queue pairs"), "{bad}: {err}");
        }
        assert!(parse_mac("52:54:00:12:34").is_err());
        assert!(parse_mac("52:54:00:12:34:56:78").is_err());
        assert!(parse_mac("52:54:00:12:34:zz").is_err());
        assert!(parse_mac("01:00:5e:00:00:01").is_err());
        assert!(parse_net("mac=52:54:00:12:34:56").is_err());
    }

    #[test]
    fn boot_protocols_parse() {
        let config = VmConfig::parse_from(["vmm", "--kernel", "k", "--boot-protocol", "linux64"]);
        assert_eq!(config.boot_protocol, BootProtocol::Linux64);
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
        assert_eq!(config.cpu_features, CpuFeatures::Auto);
        assert_eq!(config.log_level, LogLevel::Warn);
        assert_eq!(config.kernel_decompress, KernelDecompress::Host);
        assert_eq!(config.transport, Transport::Pci);
        assert_eq!(config.boot_protocol, BootProtocol::Auto);
        assert!(config.disks.is_empty() && config.nets.is_empty() && !config.rng);
        assert!(config.acpi.is_on());
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
        assert!(!config.acpi.is_on());
        assert_eq!(config.shutdown_timeout, std::time::Duration::from_secs(5));
        assert!(VmConfig::try_parse_from(["vmm", "--kernel", "k", "--acpi", "maybe"]).is_err());
        assert!(
            VmConfig::try_parse_from(["vmm", "--kernel", "k", "--shutdown-timeout", "-1"]).is_err()
        );
    }

    #[test]
    fn append_adds_to_the_default_or_the_given_line() {
        let config = VmConfig::parse_from(["vmm", "--kernel", "k", "--append", "init=/bin/sh"]);
        assert_eq!(
            config.base_cmdline(),
            format!("{DEFAULT_CMDLINE} init=/bin/sh")
        );
        let config = VmConfig::parse_from([
            "vmm",
            "--kernel",
            "k",
            "--cmdline",
            "console=ttyS0",
            "--append",
            "a=1",
            "--append",
            "b",
        ]);
        assert_eq!(config.base_cmdline(), "console=ttyS0 a=1 b");
    }

    #[test]
    fn help_shows_the_default_command_line() {
        assert!(AFTER_HELP.contains(DEFAULT_CMDLINE));
    }

    #[test]
    fn unknown_enum_values_and_log_levels_are_refused() {
        for (option, value) in [
            ("--log-level", "verbose"),
            ("--cpu-features", "fast"),
            ("--kernel-decompress", "maybe"),
            ("--transport", "usb"),
        ] {
            assert!(
                VmConfig::try_parse_from(["vmm", "--kernel", "k", option, value]).is_err(),
                "{option} {value}"
            );
        }
        let config = VmConfig::parse_from(["vmm", "--kernel", "k", "--log-level", "debug"]);
        assert_eq!(config.log_level.filter(), log::LevelFilter::Debug);
    }

    #[test]
    fn only_regular_files_are_kernels() {
        let dir = std::env::temp_dir();
        match open_checked(&dir, "kernel", false, false) {
            Err(ConfigError::WrongFileType { kind, .. }) => assert_eq!(kind, "a directory"),
            other => panic!("{other:?}"),
        }
        match open_checked(std::path::Path::new("/dev/null"), "disk image", true, false) {
            Err(e) => assert!(e.to_string().contains("a character device"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(
            open_checked(std::path::Path::new("/nonexistent"), "kernel", false, false)
                .unwrap()
                .is_none()
        );
    }
}
