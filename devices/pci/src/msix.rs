//! MSI-X (PCI Local Bus Specification 3.0, section 6.8.2): the capability's message control
//! register, the vector table and the pending bit array (PBA), and delivery through an
//! [`MsiInterruptController`] that the VMM implements with KVM (GSI routes and irqfds, or
//! `KVM_SIGNAL_MSI`), so that this crate never touches KVM.
//!
//! A vector fires only when MSI-X is enabled and neither the function nor the vector is
//! masked; a masked vector sets its pending bit instead and fires when it is unmasked
//! (section 6.8.2.9).

use std::io;
use std::sync::Arc;

use super::PciError;

/// Capability ID of MSI-X.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// The largest table the capability can describe.
pub const MAX_VECTORS: u16 = 2048;
/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;

const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_CONTROL_MASKED: u32 = 1;

/// Bytes of the message control register (capability offset 2) the guest may change: enable
/// and function mask.
pub const CONTROL_WRITABLE: [u8; 2] = [0, 0xc0];

/// How the VMM delivers one function's MSI-X messages. One controller per function; `vector`
/// is the index into that function's table.
pub trait MsiInterruptController: Send + Sync {
    /// Vector `vector` now sends `data` to `addr`. `masked` is true while it cannot fire
    /// (vector or function masked, or MSI-X disabled); [`trigger`](Self::trigger) is never
    /// called for it then, so a VMM may use the flag only to detach an irqfd.
    fn update_route(&self, vector: u16, addr: u64, data: u32, masked: bool) -> io::Result<()>;
    /// Sends vector `vector`'s message.
    fn trigger(&self, vector: u16) -> io::Result<()>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    addr: u64,
    data: u32,
    control: u32,
}

impl Entry {
    /// The state after reset: every vector masked (section 6.8.2.9).
    const RESET: Self = Self {
        addr: 0,
        data: 0,
        control: VECTOR_CONTROL_MASKED,
    };

    fn masked(&self) -> bool {
        self.control & VECTOR_CONTROL_MASKED != 0
    }
}

/// The MSI-X state of one function.
pub struct Msix {
    entries: Vec<Entry>,
    /// One bit per vector, 64 per qword as the guest reads them.
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    controller: Arc<dyn MsiInterruptController>,
}

impl Msix {
    /// A table of `vectors` entries (1..=2048), all masked, MSI-X disabled.
    pub fn new(
        vectors: u16,
        controller: Arc<dyn MsiInterruptController>,
    ) -> Result<Self, PciError> {
        if !(1..=MAX_VECTORS).contains(&vectors) {
            return Err(PciError::InvalidVectorCount(vectors));
        }
        Ok(Self {
            entries: vec![Entry::RESET; usize::from(vectors)],
            pending: vec![0; usize::from(vectors).div_ceil(64)],
            enabled: false,
            function_masked: false,
            controller,
        })
    }

    /// Number of vectors in the table.
    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Size of the table in bytes.
    pub fn table_len(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// Size of the PBA in bytes (whole qwords).
    pub fn pba_len(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// Whether the guest has enabled MSI-X (the function must not use INTx then).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The capability after its ID and next pointer: message control (table size - 1),
    /// table offset | BIR, PBA offset | BIR. Offsets must be 8-byte aligned and BIRs below 6.
    pub fn capability_body(
        &self,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> [u8; 10] {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(self.vectors() - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(table_bar & 7)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(pba_bar & 7)).to_le_bytes());
        body
    }

    /// Applies the enable and function-mask bits of the message control register after the
    /// guest wrote it; re-routes every vector if either changed and fires what became
    /// deliverable.
    pub fn set_control(&mut self, control: u16) {
        let enabled = control & CONTROL_ENABLE != 0;
        let function_masked = control & CONTROL_FUNCTION_MASK != 0;
        if enabled == self.enabled && function_masked == self.function_masked {
            return;
        }
        self.enabled = enabled;
        self.function_masked = function_masked;
        for vector in 0..self.vectors() {
            self.update_route(vector);
            self.fire_if_pending(vector);
        }
    }

    /// The guest reads the table: aligned dwords or qwords only, anything else reads all-ones.
    pub fn read_table(&mut self, offset: u64, data: &mut [u8]) {
        let Some((vector, field)) = self.table_access(offset, data.len()) else {
            data.fill(0xff);
            return;
        };
        let entry = self.entries[usize::from(vector)];
        let value = match (data.len(), field) {
            (8, 0) => entry.addr,
            (8, _) => u64::from(entry.data) | (u64::from(entry.control) << 32),
            (_, 0) => entry.addr & 0xffff_ffff,
            (_, 1) => entry.addr >> 32,
            (_, 2) => u64::from(entry.data),
            _ => u64::from(entry.control),
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    /// The guest writes the table: aligned dwords or qwords only, anything else is ignored.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((vector, field)) = self.table_access(offset, data.len()) else {
            return;
        };
        let mut raw = [0u8; 8];
        raw[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(raw);
        let entry = &mut self.entries[usize::from(vector)];
        let old = *entry;
        // Address bits 1:0 are reserved (dword alignment); vector control has only the mask
        // bit.
        match (data.len(), field) {
            (8, 0) => entry.addr = value & !3,
            (8, _) => {
                entry.data = value as u32;
                entry.control = (value >> 32) as u32 & VECTOR_CONTROL_MASKED;
            }
            (_, 0) => entry.addr = (entry.addr & !0xffff_ffff) | (value & 0xffff_fffc),
            (_, 1) => entry.addr = (entry.addr & 0xffff_ffff) | (value << 32),
            (_, 2) => entry.data = value as u32,
            _ => entry.control = value as u32 & VECTOR_CONTROL_MASKED,
        }
        if *entry != old {
            self.update_route(vector);
            self.fire_if_pending(vector);
        }
    }

    /// The guest reads the PBA: aligned dwords or qwords only, anything else reads all-ones.
    pub fn read_pba(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        let valid = matches!(len, 4 | 8)
            && offset.is_multiple_of(len)
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.pba_len());
        if !valid {
            self.log_bad_access("PBA read", offset, data.len());
            data.fill(0xff);
            return;
        }
        let qword = self.pending[(offset / 8) as usize];
        let shift = (offset % 8) * 8;
        data.copy_from_slice(&(qword >> shift).to_le_bytes()[..data.len()]);
    }

    /// Whether `vector` waits for its mask to clear.
    pub fn is_pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.pending
            .get(v / 64)
            .is_some_and(|q| q & (1 << (v % 64)) != 0)
    }

    /// Signals `vector`: sends its message, or marks it pending while it is masked. Does
    /// nothing while MSI-X is disabled (the caller uses INTx then).
    pub fn trigger(&mut self, vector: u16) -> io::Result<()> {
        let Some(entry) = self.entries.get(usize::from(vector)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("MSI-X vector {vector} is past the table"),
            ));
        };
        if !self.enabled {
            return Ok(());
        }
        if self.function_masked || entry.masked() {
            self.set_pending(vector, true);
            return Ok(());
        }
        self.controller.trigger(vector)
    }

    /// Clears all vectors and disables MSI-X (function reset).
    pub fn reset(&mut self) {
        let was_enabled = self.enabled;
        self.entries.fill(Entry::RESET);
        self.pending.fill(0);
        self.enabled = false;
        self.function_masked = false;
        if was_enabled {
            for vector in 0..self.vectors() {
                self.update_route(vector);
            }
        }
    }

    /// The vector and dword field (0..4) of a valid table access.
    fn table_access(&mut self, offset: u64, len: usize) -> Option<(u16, u64)> {
        let len64 = len as u64;
        let valid = matches!(len, 4 | 8)
            && offset.is_multiple_of(len64)
            && offset
                .checked_add(len64)
                .is_some_and(|end| end <= self.table_len());
        if !valid {
            self.log_bad_access("table access", offset, len);
            return None;
        }
        Some(((offset / ENTRY_SIZE) as u16, (offset % ENTRY_SIZE) / 4))
    }

    fn masked(&self, vector: u16) -> bool {
        !self.enabled || self.function_masked || self.entries[usize::from(vector)].masked()
    }

    fn update_route(&mut self, vector: u16) {
        let entry = self.entries[usize::from(vector)];
        let masked = self.masked(vector);
        if let Err(e) = self
            .controller
            .update_route(vector, entry.addr, entry.data, masked)
        {
            bus::guest_log!("MSI-X: cannot route vector {vector}: {e}");
        }
    }

    /// Sends a pending vector that is no longer masked (section 6.8.2.9).
    fn fire_if_pending(&mut self, vector: u16) {
        if self.masked(vector) || !self.is_pending(vector) {
            return;
        }
        self.set_pending(vector, false);
        if let Err(e) = self.controller.trigger(vector) {
            bus::guest_log!("MSI-X: cannot deliver pending vector {vector}: {e}");
        }
    }

    fn set_pending(&mut self, vector: u16, pending: bool) {
        let v = usize::from(vector);
        if let Some(q) = self.pending.get_mut(v / 64) {
            if pending {
                *q |= 1 << (v % 64);
            } else {
                *q &= !(1 << (v % 64));
            }
        }
    }

    fn log_bad_access(&mut self, what: &str, offset: u64, len: usize) {
        bus::guest_log!("MSI-X: ignoring {what} of {len} bytes at {offset:#x}");
    }
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("vectors", &self.entries.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::RecordingMsiController;

    fn msix(vectors: u16) -> (Msix, Arc<RecordingMsiController>) {
        let controller = Arc::new(RecordingMsiController::default());
        (Msix::new(vectors, controller.clone()).unwrap(), controller)
    }

    fn read32(msix: &mut Msix, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        msix.read_table(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn vector_count_is_checked() {
        let controller = Arc::new(RecordingMsiController::default());
        assert!(Msix::new(0, controller.clone()).is_err());
        assert!(Msix::new(2049, controller.clone()).is_err());
        assert_eq!(Msix::new(2048, controller).unwrap().pba_len(), 256);
    }

    #[test]
    fn capability_body_encodes_size_and_locations() {
        let (msix, _) = msix(3);
        assert_eq!(msix.table_len(), 48);
        assert_eq!(msix.pba_len(), 8);
        assert_eq!(
            msix.capability_body(0, 0x4000, 2, 0x800),
            [2, 0, 0x00, 0x40, 0, 0, 0x02, 0x08, 0, 0]
        );
    }

    #[test]
    fn entries_reset_masked_and_read_back_writes() {
        let (mut msix, controller) = msix(2);
        assert_eq!(read32(&mut msix, 0x0c), 1);
        assert_eq!(read32(&mut msix, 0x1c), 1);

        msix.write_table(0x10, &0xfee0_100fu32.to_le_bytes());
        msix.write_table(0x14, &0x1u32.to_le_bytes());
        msix.write_table(0x18, &0x4041u32.to_le_bytes());
        // Address bits 1:0 are reserved.
        assert_eq!(read32(&mut msix, 0x10), 0xfee0_100c);
        assert_eq!(read32(&mut msix, 0x14), 1);
        assert_eq!(read32(&mut msix, 0x18), 0x4041);
        let mut q = [0u8; 8];
        msix.read_table(0x10, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_100c);
        msix.read_table(0x18, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_0000_4041);

        // Disabled: every route is reported masked.
        let routes = controller.routes.lock().unwrap().clone();
        assert_eq!(
            routes,
            [
                (1, 0xfee0_100c, 0, true),
                (1, 0x1_fee0_100c, 0, true),
                (1, 0x1_fee0_100c, 0x4041, true)
            ]
        );
    }

    #[test]
    fn bad_table_accesses_read_all_ones_and_write_nothing() {
        let (mut msix, controller) = msix(1);
        let mut two = [0u8; 2];
        msix.read_table(0, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        let mut four = [0u8; 4];
        msix.read_table(2, &mut four);
        assert_eq!(four, [0xff; 4]);
        msix.read_table(16, &mut four);
        assert_eq!(four, [0xff; 4]);
        let mut eight = [0u8; 8];
        msix.read_table(4, &mut eight);
        assert_eq!(eight, [0xff; 8]);
        msix.read_table(u64::MAX - 3, &mut four);
        assert_eq!(four, [0xff; 4]);

        msix.write_table(0, &[1, 2]);
        msix.write_table(0x0c, &[0]);
        msix.write_table(16, &[0; 4]);
        assert_eq!(read32(&mut msix, 0), 0);
        assert_eq!(read32(&mut msix, 0x0c), 1);
        assert!(controller.routes.lock().unwrap().is_empty());
    }

    #[test]
    fn masked_vector_goes_pending_and_fires_on_unmask() {
        let (mut msix, controller) = msix(2);
        msix.set_control(CONTROL_ENABLE);
        msix.write_table(0x10, &0xfee0_0000u32.to_le_bytes());
        msix.write_table(0x18, &0x31u32.to_le_bytes());

        msix.trigger(1).unwrap();
        assert!(msix.is_pending(1));
        let mut pba = [0u8; 8];
        msix.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        assert!(controller.triggered.lock().unwrap().is_empty());

        msix.write_table(0x1c, &0u32.to_le_bytes());
        assert!(!msix.is_pending(1));
        assert_eq!(*controller.triggered.lock().unwrap(), [1]);
        assert_eq!(
            controller.routes.lock().unwrap().last(),
            Some(&(1, 0xfee0_0000, 0x31, false))
        );

        // Unmasked: straight through.
        msix.trigger(1).unwrap();
        assert_eq!(*controller.triggered.lock().unwrap(), [1, 1]);
    }

    #[test]
    fn function_mask_holds_every_vector() {
        let (mut msix, controller) = msix(2);
        msix.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        msix.write_table(0x0c, &0u32.to_le_bytes());
        msix.trigger(0).unwrap();
        assert!(msix.is_pending(0));
        assert!(controller.triggered.lock().unwrap().is_empty());

        msix.set_control(CONTROL_ENABLE);
        assert!(!msix.is_pending(0));
        assert_eq!(*controller.triggered.lock().unwrap(), [0]);
        // Both vectors re-routed on each control change; vector 1 stays masked.
        let routes = controller.routes.lock().unwrap().clone();
        assert_eq!(routes.last(), Some(&(1, 0, 0, true)));
        assert!(routes.contains(&(0, 0, 0, false)));
    }

    #[test]
    fn disabled_msix_neither_fires_nor_pends() {
        let (mut msix, controller) = msix(1);
        msix.write_table(0x0c, &0u32.to_le_bytes());
        msix.trigger(0).unwrap();
        assert!(!msix.is_pending(0));
        assert!(controller.triggered.lock().unwrap().is_empty());
        assert!(msix.trigger(1).is_err());
    }

    #[test]
    fn pba_reads_are_checked_and_writes_have_no_path() {
        let (mut msix, _) = msix(65);
        msix.set_control(CONTROL_ENABLE);
        msix.trigger(64).unwrap();
        let mut four = [0u8; 4];
        msix.read_pba(8, &mut four);
        assert_eq!(u32::from_le_bytes(four), 1);
        msix.read_pba(12, &mut four);
        assert_eq!(u32::from_le_bytes(four), 0);
        msix.read_pba(16, &mut four);
        assert_eq!(four, [0xff; 4]);
        let mut one = [0u8; 1];
        msix.read_pba(8, &mut one);
        assert_eq!(one, [0xff]);
    }

    #[test]
    fn reset_masks_and_disables() {
        let (mut msix, _) = msix(1);
        msix.set_control(CONTROL_ENABLE);
        msix.write_table(0, &0xfee0_0000u32.to_le_bytes());
        msix.write_table(0x0c, &0u32.to_le_bytes());
        msix.reset();
        assert!(!msix.enabled());
        assert_eq!(read32(&mut msix, 0), 0);
        assert_eq!(read32(&mut msix, 0x0c), 1);
    }
}
