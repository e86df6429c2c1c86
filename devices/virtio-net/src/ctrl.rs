//! The control queue (virtio 1.2 section 5.1.6.5): commands from the driver, each one chain of
//! `struct virtio_net_ctrl { u8 class; u8 command; }`, the command's data, and one byte the
//! device writes back, `VIRTIO_NET_OK` or `VIRTIO_NET_ERR`.
//!
//! The device offers the control queue only with `VIRTIO_NET_F_MQ`, so the one command it
//! carries out is `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` (5.1.6.5.5); any other, and a malformed
//! one, is answered `VIRTIO_NET_ERR`.

use std::io::{Read, Write};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use virtio::queue::{drain_queue, Drained, ErrorLog, QueueError};

/// `VIRTIO_NET_CTRL_MQ`: the multiqueue class.
pub const CLASS_MQ: u8 = 4;
/// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`: how many queue pairs the driver uses, as a le16.
pub const MQ_VQ_PAIRS_SET: u8 = 0;
/// `VIRTIO_NET_OK`.
pub const OK: u8 = 0;
/// `VIRTIO_NET_ERR`.
pub const ERR: u8 = 1;

/// The most command data read: a command this device carries out has 2 bytes; the rest of a
/// longer one (a MAC table, which is refused) is not looked at.
const MAX_DATA: usize = 64;

/// A command as the driver sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtrlCommand {
    /// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`: use this many queue pairs.
    SetQueuePairs(u16),
    /// A command of a feature the device does not offer, or too short for its class.
    Other {
        /// `class`.
        class: u8,
        /// `command`.
        command: u8,
    },
}

impl CtrlCommand {
    /// The command in `header` with its `data`.
    pub fn parse(header: [u8; 2], data: &[u8]) -> Self {
        match (header, data) {
            ([CLASS_MQ, MQ_VQ_PAIRS_SET], [lo, hi, ..]) => {
                Self::SetQueuePairs(u16::from_le_bytes([*lo, *hi]))
            }
            ([class, command], _) => Self::Other { class, command },
        }
    }
}

/// Answers every command on the control queue: `execute` carries one out and says whether it
/// succeeded (`VIRTIO_NET_OK`) or not (`VIRTIO_NET_ERR`). A chain without the two header
/// bytes is answered `VIRTIO_NET_ERR`; one with no byte for the answer is returned unanswered,
/// with a log line. Each chain's used length is the one byte written, or 0.
pub fn process_ctrl(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    errors: &mut ErrorLog,
    mut execute: impl FnMut(CtrlCommand) -> bool,
) -> Result<Drained, QueueError> {
    drain_queue(queue, mem, |chain| {
        let mem = chain.memory();
        let mut command = [0u8; 2 + MAX_DATA];
        let got = chain.clone().reader(mem).ok().and_then(|mut reader| {
            let n = reader.available_bytes().min(command.len());
            reader.read_exact(&mut command[..n]).ok().map(|()| n)
        });
        let status = match got {
            Some(n) if n >= 2 => {
                let parsed = CtrlCommand::parse([command[0], command[1]], &command[2..n]);
                if execute(parsed) {
                    OK
                } else {
                    errors.warn(format_args!("refused control command {parsed:?}"));
                    ERR
                }
            }
            _ => {
                errors.warn(format_args!(
                    "a control command without its class and command"
                ));
                ERR
            }
        };
        match chain.clone().writer(mem) {
            Ok(mut writer) if writer.available_bytes() >= 1 => {
                if writer.write_all(&[status]).is_ok() {
                    1
                } else {
                    errors.warn(format_args!("cannot write a control command's status"));
                    0
                }
            }
            _ => {
                errors.warn(format_args!(
                    "a control command with no room for its status"
                ));
                0
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio::queue::testing::*;

    fn run(driver: &mut Driver, mem: &GuestMemoryMmap, seen: &mut Vec<CtrlCommand>) -> Drained {
        let mut queue = driver.queue();
        process_ctrl(&mut queue, mem, &mut ErrorLog::new("test"), |c| {
            seen.push(c);
            matches!(c, CtrlCommand::SetQueuePairs(1..=4))
        })
        .unwrap()
    }

    #[test]
    fn sets_queue_pairs_and_answers_ok() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 8);
        write_bytes(&mem, DATA, &[CLASS_MQ, MQ_VQ_PAIRS_SET]);
        write_bytes(&mem, DATA + 0x10, &3u16.to_le_bytes());
        write_bytes(&mem, DATA + 0x20, &[0xff]);
        let head = driver.add(&[r(DATA, 2), r(DATA + 0x10, 2), w(DATA + 0x20, 1)]);
        let mut seen = Vec::new();
        assert_eq!(run(&mut driver, &mem, &mut seen).completed, 1);
        assert_eq!(seen, [CtrlCommand::SetQueuePairs(3)]);
        assert_eq!(read_bytes(&mem, DATA + 0x20, 1), [OK]);
        assert_eq!(driver.used(0), (u32::from(head), 1));
    }

    #[test]
    fn refuses_what_it_cannot_do_and_survives_malformed_chains() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 8);
        // Too many pairs; a class the device does not offer (VIRTIO_NET_CTRL_RX, promiscuous);
        // the pair count cut short; no header at all.
        write_bytes(&mem, DATA, &[CLASS_MQ, MQ_VQ_PAIRS_SET, 9, 0]);
        write_bytes(&mem, DATA + 0x100, &[0, 0, 1]);
        write_bytes(&mem, DATA + 0x200, &[CLASS_MQ, MQ_VQ_PAIRS_SET, 2]);
        for (i, read) in [(0, 4), (1, 3), (2, 3), (3, 0)] {
            let at = DATA + 0x100 * i;
            let mut descs = vec![w(at + 0x80, 1)];
            if read > 0 {
                descs.insert(0, r(at, read));
            }
            driver.add(&descs);
        }
        // A command with nowhere to put its status.
        driver.add(&[r(DATA, 4)]);
        let mut seen = Vec::new();
        assert_eq!(run(&mut driver, &mem, &mut seen).completed, 5);
        assert_eq!(
            seen,
            [
                CtrlCommand::SetQueuePairs(9),
                CtrlCommand::Other {
                    class: 0,
                    command: 0
                },
                CtrlCommand::Other {
                    class: CLASS_MQ,
                    command: MQ_VQ_PAIRS_SET
                },
                CtrlCommand::SetQueuePairs(9),
            ]
        );
        for i in 0..4 {
            assert_eq!(read_bytes(&mem, DATA + 0x100 * i + 0x80, 1), [ERR], "{i}");
            assert_eq!(driver.used(i as u16).1, 1);
        }
        assert_eq!(driver.used(4).1, 0);
    }
}
