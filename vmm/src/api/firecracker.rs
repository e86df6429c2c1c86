//! The bodies of Firecracker's API and configuration file, and what they mean for this VMM.
//!
//! Field names, optionality and defaults follow Firecracker's swagger definition
//! (`src/firecracker/src/api_server/swagger/firecracker.yaml`: `BootSource`, `MachineConfiguration`,
//! `Drive`, `NetworkInterface`, `EntropyDevice`, `InstanceActionInfo`, `Vm`, `InstanceInfo`, and
//! the configuration file's `boot-source`, `machine-config`, ... keys). Unknown fields are refused,
//! as Firecracker's `deny_unknown_fields` does. Fields this VMM cannot honour (rate limiters, SMT,
//! dirty-page tracking, CPU templates, huge pages, vhost-user, the async I/O engine) parse, and are
//! refused with a fault message that names them, unless they ask for the default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{parse_mac, DiskConfig, DiskIoEngine, NetConfig, Transport, VmConfig};

/// Firecracker's limit on vCPUs per microVM.
pub const MAX_VCPUS: u8 = 32;

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// `PUT /machine-config`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    #[serde(default = "no_huge_pages")]
    pub huge_pages: String,
}

fn no_huge_pages() -> String {
    "None".to_string()
}

/// `PATCH /machine-config`: only the given fields change.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    pub vcpu_count: Option<u8>,
    pub mem_size_mib: Option<u64>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub cpu_template: Option<String>,
    pub huge_pages: Option<String>,
}

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<Value>,
}

/// `PUT /entropy`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<Value>,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VmState {
    Paused,
    Resumed,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateUpdate {
    pub state: VmState,
}

/// `GET /`.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceInfo {
    pub id: String,
    pub state: &'static str,
    pub vmm_version: &'static str,
    pub app_name: &'static str,
}

/// Firecracker's JSON configuration file (`--config-file`). The keys of devices this VMM does
/// not have are accepted when null, so that files written for Firecracker need no editing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfig>,
    #[serde(default)]
    pub drives: Vec<Drive>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(default)]
    pub entropy: Option<Entropy>,
    #[serde(default)]
    pub balloon: Option<Value>,
    #[serde(default)]
    pub vsock: Option<Value>,
    #[serde(default)]
    pub logger: Option<Value>,
    #[serde(default)]
    pub metrics: Option<Value>,
    #[serde(rename = "mmds-config", default)]
    pub mmds_config: Option<Value>,
    #[serde(rename = "cpu-config", default)]
    pub cpu_config: Option<Value>,
}

/// A fault: the `fault_message` of a 400 answer, or a configuration file's one-line error.
pub type Fault = String;

fn refuse_unless(ok: bool, what: &str) -> Result<(), Fault> {
    if ok {
        Ok(())
    } else {
        Err(format!("{what} is not supported by this VMM."))
    }
}

impl MachineConfig {
    /// Firecracker's rules plus what this VMM cannot do.
    pub fn validate(&self) -> Result<(), Fault> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS {
            return Err(format!(
                "The vCPU number is invalid! It must be between 1 and {MAX_VCPUS}."
            ));
        }
        if self.mem_size_mib == 0 {
            return Err("The memory size (MiB) is invalid.".to_string());
        }
        refuse_unless(!self.smt, "Simultaneous multithreading (smt: true)")?;
        refuse_unless(
            !self.track_dirty_pages,
            "Dirty page tracking (track_dirty_pages: true)",
        )?;
        refuse_unless(
            matches!(self.cpu_template.as_deref(), None | Some("None")),
            "A CPU template (cpu_template)",
        )?;
        refuse_unless(self.huge_pages == "None", "Huge pages (huge_pages)")?;
        Ok(())
    }

    fn apply(&self, update: &MachineConfigUpdate) -> MachineConfig {
        MachineConfig {
            vcpu_count: update.vcpu_count.unwrap_or(self.vcpu_count),
            mem_size_mib: update.mem_size_mib.unwrap_or(self.mem_size_mib),
            smt: update.smt.unwrap_or(self.smt),
            track_dirty_pages: update.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            cpu_template: update
                .cpu_template
                .clone()
                .or_else(|| self.cpu_template.clone()),
            huge_pages: update
                .huge_pages
                .clone()
                .unwrap_or_else(|| self.huge_pages.clone()),
        }
    }
}

/// A file the guest will read (or write): it must exist and be a regular file or a block device.
fn check_file(what: &str, path: &str) -> Result<(), Fault> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("The {what} {path:?} cannot be opened: {e}."))?;
    if meta.is_dir() {
        return Err(format!("The {what} {path:?} is a directory."));
    }
    Ok(())
}

impl BootSource {
    pub fn validate(&self) -> Result<(), Fault> {
        check_file("kernel file", &self.kernel_image_path)?;
        if let Some(initrd) = &self.initrd_path {
            check_file("initrd file", initrd)?;
        }
        Ok(())
    }
}

/// Firecracker's rule for resource IDs in paths.
pub fn check_id(id: &str) -> Result<(), Fault> {
    if id.is_empty() {
        return Err("The ID cannot be empty.".to_string());
    }
    if !id.chars().all(|c| c == '_' || c.is_ascii_alphanumeric()) {
        return Err(
            "API Resource IDs can only contain alphanumeric characters and underscores."
                .to_string(),
        );
    }
    Ok(())
}

impl Drive {
    pub fn validate(&self) -> Result<(), Fault> {
        check_id(&self.drive_id)?;
        refuse_unless(self.socket.is_none(), "A vhost-user drive (socket)")?;
        refuse_unless(
            self.rate_limiter.as_ref().is_none_or(Value::is_null),
            "A drive rate limiter (rate_limiter)",
        )?;
        if let Some(engine) = &self.io_engine {
            if !matches!(engine.as_str(), "Sync" | "Async") {
                return Err(format!(
                    "Invalid io_engine {engine:?}: expected Sync or Async."
                ));
            }
        }
        // Firecracker's "Unsafe" ignores the guest's flushes; this VMM always honours them,
        // which "Writeback" asks for and "Unsafe" does not forbid.
        if let Some(cache) = &self.cache_type {
            if cache != "Unsafe" && cache != "Writeback" {
                return Err(format!(
                    "Invalid cache_type {cache:?}: expected Unsafe or Writeback."
                ));
            }
        }
        let path = self
            .path_on_host
            .as_deref()
            .ok_or("A drive needs path_on_host.")?;
        check_file("drive file", path)?;
        let read_only = self.is_read_only.unwrap_or(false);
        std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| format!("Unable to open the drive file {path:?}: {e}."))?;
        Ok(())
    }
}

impl NetworkInterface {
    pub fn validate(&self) -> Result<(), Fault> {
        check_id(&self.iface_id)?;
        if self.host_dev_name.is_empty() || self.host_dev_name.len() >= libc::IFNAMSIZ {
            return Err(format!(
                "Invalid host_dev_name {:?}: a tap name of 1 to {} bytes.",
                self.host_dev_name,
                libc::IFNAMSIZ - 1
            ));
        }
        if let Some(mac) = &self.guest_mac {
            parse_mac(mac).map_err(|e| format!("Invalid guest_mac: {e}."))?;
        }
        refuse_unless(
            self.rx_rate_limiter.as_ref().is_none_or(Value::is_null)
                && self.tx_rate_limiter.as_ref().is_none_or(Value::is_null),
            "A network rate limiter",
        )
    }
}

impl Entropy {
    pub fn validate(&self) -> Result<(), Fault> {
        refuse_unless(
            self.rate_limiter.as_ref().is_none_or(Value::is_null),
            "An entropy rate limiter (rate_limiter)",
        )
    }
}

/// The pre-boot resources the API and the configuration file describe.
#[derive(Debug, Clone)]
pub struct VmResources {
    pub boot_source: Option<BootSource>,
    pub machine: MachineConfig,
    /// By drive id; the order of insertion is the guest's vda, vdb, ... with the root first.
    pub drives: Vec<Drive>,
    pub nets: Vec<NetworkInterface>,
    pub entropy: Option<Entropy>,
}

impl VmResources {
    /// Resources seeded from the command line's vCPU count and memory size.
    pub fn from_cli(config: &VmConfig) -> Self {
        VmResources {
            boot_source: None,
            machine: MachineConfig {
                vcpu_count: u8::try_from(config.cpus).unwrap_or(1),
                mem_size_mib: config.memory >> 20,
                smt: false,
                track_dirty_pages: false,
                cpu_template: None,
                huge_pages: no_huge_pages(),
            },
            drives: Vec::new(),
            nets: Vec::new(),
            entropy: None,
        }
    }

    /// What `GET /vm/config` shows for a VM started from the command line (`--kernel`): its
    /// kernel, initramfs, command line, vCPUs, memory, disks, taps and entropy device.
    pub fn from_running_cli(config: &VmConfig) -> Self {
        let mut resources = Self::from_cli(config);
        resources.boot_source = config.kernel.as_ref().map(|kernel| BootSource {
            kernel_image_path: kernel.display().to_string(),
            boot_args: config.cmdline.clone(),
            initrd_path: config.initramfs.as_ref().map(|p| p.display().to_string()),
        });
        resources.drives = config
            .disks
            .iter()
            .enumerate()
            .map(|(i, disk)| Drive {
                drive_id: disk.serial.clone().unwrap_or_else(|| format!("disk{i}")),
                path_on_host: Some(disk.path.display().to_string()),
                is_root_device: false,
                is_read_only: Some(disk.read_only),
                partuuid: None,
                cache_type: None,
                io_engine: Some(disk.io_engine.api_name().to_string()),
                rate_limiter: None,
                socket: None,
            })
            .collect();
        resources.nets = config
            .nets
            .iter()
            .enumerate()
            .map(|(i, net)| NetworkInterface {
                iface_id: format!("net{i}"),
                host_dev_name: net.tap.clone(),
                guest_mac: net.mac.map(|m| {
                    m.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                }),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
            .collect();
        resources.entropy = config.rng.then(Entropy::default);
        resources
    }

    pub fn set_boot_source(&mut self, boot: BootSource) -> Result<(), Fault> {
        boot.validate()?;
        self.boot_source = Some(boot);
        Ok(())
    }

    pub fn set_machine_config(&mut self, machine: MachineConfig) -> Result<(), Fault> {
        machine.validate()?;
        self.machine = machine;
        Ok(())
    }

    pub fn update_machine_config(&mut self, update: &MachineConfigUpdate) -> Result<(), Fault> {
        self.set_machine_config(self.machine.apply(update))
    }

    /// Inserts or replaces a drive; a second root device is refused, as by Firecracker.
    pub fn set_drive(&mut self, drive: Drive) -> Result<(), Fault> {
        drive.validate()?;
        if drive.is_root_device
            && self
                .drives
                .iter()
                .any(|d| d.is_root_device && d.drive_id != drive.drive_id)
        {
            return Err("A root block device already exists!".to_string());
        }
        match self
            .drives
            .iter_mut()
            .find(|d| d.drive_id == drive.drive_id)
        {
            Some(slot) => *slot = drive,
            None => self.drives.push(drive),
        }
        Ok(())
    }

    pub fn set_net(&mut self, net: NetworkInterface) -> Result<(), Fault> {
        net.validate()?;
        if self
            .nets
            .iter()
            .any(|n| n.host_dev_name == net.host_dev_name && n.iface_id != net.iface_id)
        {
            return Err(format!(
                "The host device name {:?} is already in use by another interface.",
                net.host_dev_name
            ));
        }
        match self.nets.iter_mut().find(|n| n.iface_id == net.iface_id) {
            Some(slot) => *slot = net,
            None => self.nets.push(net),
        }
        Ok(())
    }

    pub fn set_entropy(&mut self, entropy: Entropy) -> Result<(), Fault> {
        entropy.validate()?;
        self.entropy = Some(entropy);
        Ok(())
    }

    /// Resources from a configuration file, each part checked as its API request would be.
    pub fn from_file(file: ConfigFile, base: &VmConfig) -> Result<Self, Fault> {
        for (key, value) in [
            ("balloon", &file.balloon),
            ("vsock", &file.vsock),
            ("logger", &file.logger),
            ("metrics", &file.metrics),
            ("mmds-config", &file.mmds_config),
            ("cpu-config", &file.cpu_config),
        ] {
            refuse_unless(value.as_ref().is_none_or(Value::is_null), key)?;
        }
        let mut resources = VmResources::from_cli(base);
        resources.set_boot_source(file.boot_source)?;
        if let Some(machine) = file.machine_config {
            resources.set_machine_config(machine)?;
        }
        for drive in file.drives {
            let id = drive.drive_id.clone();
            resources
                .set_drive(drive)
                .map_err(|e| format!("drive {id:?}: {e}"))?;
        }
        for net in file.network_interfaces {
            let id = net.iface_id.clone();
            resources
                .set_net(net)
                .map_err(|e| format!("network interface {id:?}: {e}"))?;
        }
        if let Some(entropy) = file.entropy {
            resources.set_entropy(entropy)?;
        }
        Ok(resources)
    }

    /// The drives in the guest's order: the root device first (vda), as Firecracker attaches it.
    fn ordered_drives(&self) -> Vec<&Drive> {
        let mut drives: Vec<&Drive> = self.drives.iter().filter(|d| d.is_root_device).collect();
        drives.extend(self.drives.iter().filter(|d| !d.is_root_device));
        drives
    }

    /// The VM configuration these resources describe, on top of the command line's other options
    /// (CPU features, transport, log level, ...).
    pub fn to_vm_config(&self, base: &VmConfig) -> Result<VmConfig, Fault> {
        let boot = self
            .boot_source
            .as_ref()
            .ok_or("Cannot start microvm without kernel configuration.")?;
        let mut cmdline = boot
            .boot_args
            .clone()
            .unwrap_or_else(|| base.base_cmdline().to_string());
        // As Firecracker: the root device is vda, or the partition named by its partuuid.
        if let Some(root) = self.drives.iter().find(|d| d.is_root_device) {
            let mode = if root.is_read_only.unwrap_or(false) {
                "ro"
            } else {
                "rw"
            };
            match &root.partuuid {
                Some(uuid) => cmdline.push_str(&format!(" root=PARTUUID={uuid} {mode}")),
                None => cmdline.push_str(&format!(" root=/dev/vda {mode}")),
            }
        }
        let mut config = base.clone();
        config.kernel = Some(PathBuf::from(&boot.kernel_image_path));
        config.initramfs = boot.initrd_path.as_ref().map(PathBuf::from);
        config.cmdline = Some(cmdline);
        config.cpus = u32::from(self.machine.vcpu_count);
        config.memory = self
            .machine
            .mem_size_mib
            .checked_mul(1 << 20)
            .ok_or("The memory size (MiB) is invalid.")?;
        config.disks = self
            .ordered_drives()
            .into_iter()
            .map(|d| DiskConfig {
                path: PathBuf::from(d.path_on_host.as_deref().unwrap_or_default()),
                read_only: d.is_read_only.unwrap_or(false),
                // The guest reads the drive id as the disk's serial, as under Firecracker.
                serial: Some(d.drive_id.clone()),
                // Unset: this VMM's default, io_uring (Firecracker's default is Sync).
                io_engine: d
                    .io_engine
                    .as_deref()
                    .and_then(DiskIoEngine::parse)
                    .unwrap_or_default(),
                poll: crate::config::DEFAULT_DISK_POLL,
            })
            .collect();
        config.nets = self
            .nets
            .iter()
            .map(|n| {
                Ok(NetConfig {
                    tap: n.host_dev_name.clone(),
                    mac: n.guest_mac.as_deref().map(parse_mac).transpose()?,
                    queues: 1,
                })
            })
            .collect::<Result<_, String>>()?;
        config.rng = self.entropy.is_some();
        Ok(config)
    }

    /// `GET /vm/config`: the whole configuration, in the configuration file's shape.
    pub fn full_config(&self) -> Value {
        let mut map = BTreeMap::new();
        map.insert(
            "boot-source",
            serde_json::to_value(&self.boot_source).unwrap_or(Value::Null),
        );
        map.insert(
            "machine-config",
            serde_json::to_value(&self.machine).unwrap_or(Value::Null),
        );
        let drives: Vec<Value> = self
            .ordered_drives()
            .into_iter()
            .map(|d| {
                let mut d = d.clone();
                d.is_read_only = Some(d.is_read_only.unwrap_or(false));
                serde_json::to_value(d).unwrap_or(Value::Null)
            })
            .collect();
        map.insert("drives", Value::Array(drives));
        map.insert(
            "network-interfaces",
            serde_json::to_value(&self.nets).unwrap_or(Value::Null),
        );
        map.insert(
            "entropy",
            serde_json::to_value(&self.entropy).unwrap_or(Value::Null),
        );
        for absent in ["balloon", "vsock", "logger", "metrics", "mmds-config"] {
            map.insert(absent, Value::Null);
        }
        serde_json::to_value(map).unwrap_or(Value::Null)
    }
}

/// Reads a configuration file and merges it with the command line. The file describes the guest
/// (kernel, initrd, boot arguments, vCPUs, memory, drives, interfaces, entropy); the command line
/// may add only what the file cannot say. `explicit` lists the command-line options the user
/// gave; one the file also decides is a conflict.
pub fn load_config_file(
    path: &Path,
    base: &VmConfig,
    explicit: &[&str],
) -> Result<(VmResources, VmConfig), Fault> {
    const DECIDED_BY_FILE: [(&str, &str); 8] = [
        ("kernel", "boot-source"),
        ("initramfs", "boot-source"),
        ("cmdline", "boot-source"),
        ("cpus", "machine-config"),
        ("memory", "machine-config"),
        ("disks", "drives"),
        ("nets", "network-interfaces"),
        ("rng", "entropy"),
    ];
    for (option, key) in DECIDED_BY_FILE {
        if explicit.contains(&option) {
            let flag = match option {
                "disks" => "disk",
                "nets" => "net",
                other => other,
            };
            return Err(format!(
                "--{flag} conflicts with --config-file, whose {key:?} decides it"
            ));
        }
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the configuration file {}: {e}", path.display()))?;
    let file: ConfigFile = serde_json::from_str(&text)
        .map_err(|e| format!("the configuration file {}: {e}", path.display()))?;
    let mut base = base.clone();
    // Firecracker's devices are virtio-mmio, and its guests' boot arguments often say pci=off.
    if !explicit.contains(&"transport") {
        base.transport = Transport::Mmio;
    }
    let resources = VmResources::from_file(file, &base)
        .map_err(|e| format!("the configuration file {}: {e}", path.display()))?;
    let config = resources
        .to_vm_config(&base)
        .map_err(|e| format!("the configuration file {}: {e}", path.display()))?;
    Ok((resources, config))
}
