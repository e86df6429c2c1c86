//! The common configuration structure of a virtio PCI function (virtio 1.2 section 4.1.4.3):
//! register decoding over the [`TransportCore`](crate::transport::TransportCore).

use std::sync::atomic::Ordering;

use super::interrupts::checked_vector;
use super::layout::NO_VECTOR;
use super::VirtioPciTransport;

/// Common configuration field offsets (4.1.4.3).
pub(super) mod offsets {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// `queue_desc`, `queue_driver`, `queue_device`: three 64-bit fields.
    pub const QUEUE_ADDRESSES: u64 = 0x20;
}

use offsets as common;

impl VirtioPciTransport {
    pub(super) fn read_common(&mut self, at: u64, data: &mut [u8]) {
        let queue = self.core.selected_queue().copied();
        let select = self.core.queue_select;
        let value = match (at, data.len()) {
            (common::DEVICE_FEATURE_SELECT, 4) => Some(u64::from(self.core.device_feature_select)),
            (common::DEVICE_FEATURE, 4) => Some(u64::from(self.core.device_features_page())),
            (common::DRIVER_FEATURE_SELECT, 4) => Some(u64::from(self.core.driver_feature_select)),
            (common::DRIVER_FEATURE, 4) => Some(u64::from(self.core.driver_features_page())),
            (common::CONFIG_MSIX_VECTOR, 2) => Some(u64::from(self.interrupts.vectors().config)),
            (common::NUM_QUEUES, 2) => Some(self.core.num_queues() as u64),
            (common::DEVICE_STATUS, 1) => Some(u64::from(self.core.status())),
            (common::CONFIG_GENERATION, 1) => Some(u64::from(
                self.interrupts.config_generation.load(Ordering::SeqCst),
            )),
            (common::QUEUE_SELECT, 2) => Some(u64::from(select)),
            // An unavailable queue reads size 0 (4.1.4.3).
            (common::QUEUE_SIZE, 2) => Some(queue.map_or(0, |q| u64::from(q.size))),
            (common::QUEUE_MSIX_VECTOR, 2) => Some(u64::from(
                self.interrupts
                    .vectors()
                    .queues
                    .get(select as usize)
                    .copied()
                    .unwrap_or(NO_VECTOR),
            )),
            (common::QUEUE_ENABLE, 2) => Some(queue.map_or(0, |q| u64::from(q.ready))),
            (common::QUEUE_NOTIFY_OFF, 2) => Some(queue.map_or(0, |_| u64::from(select))),
            (at, len) => address_field(at, len).map(|(field, shift, mask)| {
                queue.map_or(0, |q| (q.addresses[field] >> shift) & mask)
            }),
        };
        match value {
            Some(value) => data.copy_from_slice(&value.to_le_bytes()[..data.len()]),
            None => {
                self.log_bad_access("common configuration read", at, data.len());
                data.fill(0xff);
            }
        }
    }

    pub(super) fn write_common(&mut self, at: u64, data: &[u8]) {
        let mut raw = [0u8; 8];
        raw[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
        let value = u64::from_le_bytes(raw);
        match (at, data.len()) {
            (common::DEVICE_FEATURE_SELECT, 4) => self.core.device_feature_select = value as u32,
            (common::DRIVER_FEATURE_SELECT, 4) => self.core.driver_feature_select = value as u32,
            (common::DRIVER_FEATURE, 4) => self.core.write_driver_features(value as u32),
            (common::CONFIG_MSIX_VECTOR, 2) => {
                let mut vectors = self.interrupts.vectors();
                vectors.config = checked_vector(&vectors, value as u16);
            }
            (common::DEVICE_STATUS, 1) => self.set_status(value as u8),
            (common::QUEUE_SELECT, 2) => self.core.queue_select = value as u32,
            (common::QUEUE_SIZE, 2) => {
                if let Some(q) = self.core.writable_queue() {
                    q.size = value as u16;
                }
            }
            (common::QUEUE_MSIX_VECTOR, 2) => {
                let mut vectors = self.interrupts.vectors();
                let vector = checked_vector(&vectors, value as u16);
                if let Some(slot) = vectors.queues.get_mut(self.core.queue_select as usize) {
                    *slot = vector;
                }
            }
            (common::QUEUE_ENABLE, 2) => match (value, self.core.writable_queue()) {
                (1, Some(q)) => q.ready = true,
                // Only a reset disables a queue (4.1.4.3.2).
                _ => self.log_bad_access("queue_enable write", at, data.len()),
            },
            // Read-only fields.
            (common::DEVICE_FEATURE, 4)
            | (common::NUM_QUEUES, 2)
            | (common::CONFIG_GENERATION, 1)
            | (common::QUEUE_NOTIFY_OFF, 2) => {}
            (at, len) => match address_field(at, len) {
                Some((field, shift, mask)) => {
                    if let Some(q) = self.core.writable_queue() {
                        let old = q.addresses[field];
                        q.addresses[field] = (old & !(mask << shift)) | ((value & mask) << shift);
                    }
                }
                None => self.log_bad_access("common configuration write", at, len),
            },
        }
    }
}

/// The queue address field, bit shift and value mask an access of `len` bytes at `at`
/// touches: a whole field in one aligned qword, or either half in an aligned dword.
pub(super) fn address_field(at: u64, len: usize) -> Option<(usize, u64, u64)> {
    let inner = at.checked_sub(offsets::QUEUE_ADDRESSES)?;
    let field = usize::try_from(inner / 8).ok().filter(|&f| f < 3)?;
    match (len, inner % 8) {
        (8, 0) => Some((field, 0, u64::MAX)),
        (4, half @ (0 | 4)) => Some((field, half * 8, 0xffff_ffff)),
        _ => None,
    }
}
