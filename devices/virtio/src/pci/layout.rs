//! Where everything of a virtio PCI function is (virtio 1.2 section 4.1.2 and 4.1.4): its
//! identity, BAR 0's structures and the vendor capabilities that point at them.

use super::VirtioPciError;
use crate::{device_type, VirtioDevice};
use pci::{
    BarKind, Msix, PciBar, PciConfigSpace, PciError, PciHeader, MSIX_CAPABILITY_ID,
    MSIX_CONTROL_WRITABLE,
};

use super::interrupts::IntxLine;

/// PCI vendor ID of every virtio device (4.1.2).
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// A modern device's PCI device ID is this plus its virtio device ID (4.1.2).
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// The BAR holding every virtio structure and the MSI-X table.
pub const BAR_INDEX: u8 = 0;
/// Size of [`BAR_INDEX`].
pub const BAR_SIZE: u64 = 0x8000;
/// BAR 0 offset of the common configuration structure.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Length of the common configuration structure (through `queue_device`, 4.1.4.3).
pub const COMMON_CFG_LEN: u64 = 0x38;
/// BAR 0 offset of the ISR status byte.
pub const ISR_CFG_OFFSET: u64 = 0x1000;
/// BAR 0 offset of the device-specific configuration.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Length advertised for the device-specific configuration.
pub const DEVICE_CFG_LEN: u64 = 0x1000;
/// BAR 0 offset of the notification area.
pub const NOTIFY_CFG_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// BAR 0 offset of the MSI-X table.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// BAR 0 offset of the MSI-X pending bit array.
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Most queues a device may have: one MSI-X vector each plus one for configuration changes
/// fill the 4 KiB table region.
pub const MAX_QUEUES: usize = 255;
/// "No MSI-X vector" for `msix_config` and `queue_msix_vector` (4.1.5.1.2).
pub const NO_VECTOR: u16 = 0xffff;

/// Each structure's region in BAR 0.
pub(super) const REGION_LEN: u64 = 0x1000;

/// Vendor-specific capability ID, which every virtio capability uses.
pub(super) const VENDOR_CAPABILITY_ID: u8 = 0x09;
/// `cfg_type` values (4.1.4).
pub(super) const CAP_COMMON_CFG: u8 = 1;
pub(super) const CAP_NOTIFY_CFG: u8 = 2;
pub(super) const CAP_ISR_CFG: u8 = 3;
pub(super) const CAP_DEVICE_CFG: u8 = 4;
pub(super) const CAP_PCI_CFG: u8 = 5;
/// Offsets inside `struct virtio_pci_cap` (from the capability ID byte).
pub(super) const CAP_BAR: usize = 4;
pub(super) const CAP_OFFSET: usize = 8;
pub(super) const CAP_LENGTH: usize = 12;
/// `pci_cfg_data` inside `struct virtio_pci_cfg_cap`.
pub(super) const CAP_PCI_CFG_DATA: usize = 16;

/// Which structure of BAR 0 an access falls in, with the offset inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Region {
    Common(u64),
    Isr(u64),
    Device(u64),
    Notify(u64),
    MsixTable(u64),
    MsixPba(u64),
}

impl Region {
    /// The region holding all of `[offset, offset + len)`.
    pub(super) fn of(offset: u64, len: usize) -> Option<Self> {
        let base = offset - offset % REGION_LEN;
        let inner = offset - base;
        if inner.checked_add(len as u64)? > REGION_LEN {
            return None;
        }
        match base {
            COMMON_CFG_OFFSET => Some(Self::Common(inner)),
            ISR_CFG_OFFSET => Some(Self::Isr(inner)),
            DEVICE_CFG_OFFSET => Some(Self::Device(inner)),
            NOTIFY_CFG_OFFSET => Some(Self::Notify(inner)),
            MSIX_TABLE_OFFSET => Some(Self::MsixTable(inner)),
            MSIX_PBA_OFFSET => Some(Self::MsixPba(inner)),
            _ => None,
        }
    }
}

/// The device's PCI device ID and queue sizes, if the transport can carry it.
pub(super) fn check_device(device: &dyn VirtioDevice) -> Result<(u16, Vec<u16>), VirtioPciError> {
    let max_sizes = device.queue_max_sizes();
    if max_sizes.len() > MAX_QUEUES {
        return Err(VirtioPciError::TooManyQueues(max_sizes.len()));
    }
    let kind = device.device_type();
    // Modern device IDs run from 0x1040 to 0x107f (4.1.2).
    let device_id = u16::try_from(kind)
        .ok()
        .filter(|&kind| kind <= 0x3f)
        .map(|kind| VIRTIO_PCI_DEVICE_ID_BASE + kind)
        .ok_or(VirtioPciError::InvalidDeviceType(kind))?;
    Ok((device_id, max_sizes))
}

/// The function's identity: the class by device type (Linux matches on the IDs, but `lspci`
/// and firmware look at the class), INTA# if it has a legacy line.
pub(super) fn header(kind: u32, device_id: u16, intx: Option<&IntxLine>) -> PciHeader {
    let (class, subclass) = match kind {
        device_type::NET => (0x02, 0x00),
        device_type::BLOCK => (0x01, 0x80),
        _ => (0xff, 0x00),
    };
    PciHeader {
        vendor_id: VIRTIO_PCI_VENDOR_ID,
        device_id,
        revision_id: 1,
        class,
        subclass,
        prog_if: 0,
        subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
        subsystem_id: device_id,
        interrupt_pin: u8::from(intx.is_some()),
        interrupt_line: intx.map_or(0, |line| line.irq),
    }
}

/// The configuration space with BAR 0 and the capability list, and where the capabilities
/// the transport intercepts are.
pub(super) struct Layout {
    pub(super) config: PciConfigSpace,
    pub(super) pci_cfg_cap: usize,
    pub(super) msix_cap: Option<usize>,
}

impl Layout {
    pub(super) fn new(
        header: &PciHeader,
        num_queues: u16,
        msix: Option<&Msix>,
    ) -> Result<Self, PciError> {
        let mut config = PciConfigSpace::new(header);
        config.add_bar(
            usize::from(BAR_INDEX),
            PciBar {
                size: BAR_SIZE,
                kind: BarKind::Memory32,
                prefetchable: false,
            },
        )?;
        // Linux rejects a notification capability shorter than 2 bytes, even with no queues.
        let notify_len = u32::from(num_queues.max(1)) * NOTIFY_OFF_MULTIPLIER;
        let multiplier = NOTIFY_OFF_MULTIPLIER.to_le_bytes();
        let structures: [(u8, u64, u64, &[u8]); 4] = [
            (CAP_COMMON_CFG, COMMON_CFG_OFFSET, COMMON_CFG_LEN, &[]),
            (CAP_ISR_CFG, ISR_CFG_OFFSET, 1, &[]),
            (CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN, &[]),
            (
                CAP_NOTIFY_CFG,
                NOTIFY_CFG_OFFSET,
                u64::from(notify_len),
                &multiplier,
            ),
        ];
        for (cfg_type, offset, length, extra) in structures {
            let body = virtio_cap(cfg_type, offset as u32, length as u32, extra);
            config.add_capability(VENDOR_CAPABILITY_ID, &body)?;
        }
        let pci_cfg_cap = config.add_capability(
            VENDOR_CAPABILITY_ID,
            &virtio_cap(CAP_PCI_CFG, 0, 0, &[0; 4]),
        )?;
        // The driver picks the BAR, offset and length of each access (4.1.4.9).
        config.set_writable(pci_cfg_cap + CAP_BAR, &[0xff]);
        config.set_writable(pci_cfg_cap + CAP_OFFSET, &[0xff; 8]);
        let msix_cap = match msix {
            Some(msix) => {
                let body = msix.capability_body(
                    BAR_INDEX,
                    MSIX_TABLE_OFFSET as u32,
                    BAR_INDEX,
                    MSIX_PBA_OFFSET as u32,
                );
                let at = config.add_capability(MSIX_CAPABILITY_ID, &body)?;
                config.set_writable(at + 2, &MSIX_CONTROL_WRITABLE);
                Some(at)
            }
            None => None,
        };
        Ok(Self {
            config,
            pci_cfg_cap,
            msix_cap,
        })
    }
}

/// The body of a `struct virtio_pci_cap` after its ID and next pointer, plus `extra` bytes
/// (`notify_off_multiplier`, `pci_cfg_data`).
fn virtio_cap(cfg_type: u8, offset: u32, length: u32, extra: &[u8]) -> Vec<u8> {
    // cap_len counts the ID and next pointer too.
    let cap_len = (16 + extra.len()) as u8;
    let mut body = vec![cap_len, cfg_type, BAR_INDEX, 0, 0, 0];
    body.extend_from_slice(&offset.to_le_bytes());
    body.extend_from_slice(&length.to_le_bytes());
    body.extend_from_slice(extra);
    body
}
