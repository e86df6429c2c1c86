//! Fuzzing entry point for virtio-net: [`net_queue`] runs the receive and transmit processing,
//! or the control queue's, on a queue built from the input (layout: `virtio::fuzz`) against a
//! loopback backend. The cargo-fuzz target is a one-line wrapper, and a saved crash input
//! replays in a plain `#[test]`.

use virtio_queue::Queue;

use crate::ctrl::{process_ctrl, CtrlCommand};
use crate::{process_rx, process_tx, Loopback, RxState, MAX_FRAME};
use virtio::fuzz::queue_and_memory;
use virtio::queue::ErrorLog;

/// virtio-net: the queue as a receive queue (flags bit 1: mergeable buffers) fed a runt, a
/// small, a full-size and a jumbo frame, then as a transmit queue (flags bit 2: transmit
/// first; bit 4: a backend that stages frames), then as a receive queue again; or (flags bit
/// 3) as the control queue of a device with two queue pairs.
pub fn net_queue(input: &[u8]) {
    let Some((mut queue, flags, mem)) = queue_and_memory(input) else {
        return;
    };
    if flags & 8 != 0 {
        let mut errors = ErrorLog::new("fuzz");
        let _ = process_ctrl(&mut queue, &mem, &mut errors, |command| {
            matches!(command, CtrlCommand::SetQueuePairs(1..=2))
        });
        return;
    }
    // Flags bit 4: a backend that stages frames, as a tap on io_uring does.
    let mut backend = Loopback {
        staging: if flags & 16 != 0 { 3 } else { 0 },
        ..Loopback::default()
    };
    for len in [5usize, 60, 1526, 9012] {
        backend
            .incoming
            .push_back((0..len).map(|i| i as u8).collect());
    }
    let mut rx = RxState::new(flags & 2 != 0);
    let mut errors = ErrorLog::new("fuzz");
    let mut tx_buf = Vec::new();
    let mut receive = |queue: &mut Queue, backend: &mut Loopback| {
        let _ = process_rx(queue, &mem, backend, &mut rx, &mut errors);
    };
    if flags & 4 != 0 {
        let _ = process_tx(
            &mut queue,
            &mem,
            &mut backend,
            &mut tx_buf,
            &mut ErrorLog::new("fuzz"),
        );
        receive(&mut queue, &mut backend);
    } else {
        receive(&mut queue, &mut backend);
        let _ = process_tx(
            &mut queue,
            &mem,
            &mut backend,
            &mut tx_buf,
            &mut ErrorLog::new("fuzz"),
        );
    }
    // Once more: a frame that waited for buffers (with mergeable buffers, holding the chains of
    // its head) goes on with what the queue has now.
    receive(&mut queue, &mut backend);
    for frame in &backend.sent {
        assert!(frame.len() <= MAX_FRAME);
    }
    // Every chain went back to the driver after its frame was sent, never before.
    assert!(backend.staged.is_empty(), "a staged frame was never sent");
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio::fuzz::{
        desc, garbage, soak_iterations, structured_queue_input, xorshift, USED_RING,
    };
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn net_queue_receives_into_a_well_formed_buffer() {
        let mut mem = vec![0u8; 0x3000];
        mem[0..16].copy_from_slice(&desc(0x1000, 2048, 2, 0));
        mem[0x202] = 1;
        let mut input = vec![4, 0, 0, 2];
        input.extend(&mem);
        net_queue(&input);

        // The same run by hand: the runt is dropped, the 60-byte frame fills the buffer.
        let (mut queue, _, mem) = queue_and_memory(&input).unwrap();
        let mut backend = Loopback::default();
        backend.incoming.push_back(vec![7; 5]);
        backend.incoming.push_back(vec![7; 60]);
        let out = process_rx(
            &mut queue,
            &mem,
            &mut backend,
            &mut RxState::new(true),
            &mut ErrorLog::new("test"),
        )
        .unwrap();
        assert_eq!((out.delivered, out.dropped), (1, 1));
        let used_len: u32 = mem.read_obj(GuestAddress(USED_RING + 8)).unwrap();
        assert_eq!(used_len, 60);
    }

    /// Flags bit 3: the queue as a control queue, with a well-formed
    /// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 2` that gets its `VIRTIO_NET_OK`.
    #[test]
    fn net_queue_answers_a_control_command() {
        let mut mem = vec![0u8; 0x3000];
        mem[0..16].copy_from_slice(&desc(0x1000, 4, 1, 1));
        mem[16..32].copy_from_slice(&desc(0x1010, 1, 2, 0));
        mem[0x202] = 1;
        mem[0x1000..0x1004].copy_from_slice(&[4, 0, 2, 0]);
        mem[0x1010] = 0xff;
        let mut input = vec![4, 0, 0, 8];
        input.extend(&mem);
        net_queue(&input);

        let (mut queue, _, mem) = queue_and_memory(&input).unwrap();
        let mut seen = Vec::new();
        process_ctrl(&mut queue, &mem, &mut ErrorLog::new("test"), |c| {
            seen.push(c);
            true
        })
        .unwrap();
        assert_eq!(seen, [CtrlCommand::SetQueuePairs(2)]);
        let status: u8 = mem.read_obj(GuestAddress(0x1010)).unwrap();
        assert_eq!(status, crate::ctrl::OK);
    }

    #[test]
    fn survives_garbage() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in [0usize, 3, 4, 5, 64, 0x600, 0x4100, 0x8000] {
            let input = garbage(len, &mut seed);
            net_queue(&input);
        }
    }

    /// Structured random inputs (see `virtio::fuzz::structured_queue_input`).
    /// `VIRTIO_SOAK=<iterations>` runs it longer.
    #[test]
    #[ignore = "a long soak; run with --ignored"]
    fn soak() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || xorshift(&mut seed);
        for _ in 0..soak_iterations() {
            net_queue(&structured_queue_input(&mut next).0);
        }
    }
}
