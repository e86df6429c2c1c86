//! Fuzzing entry point for virtio-rng: [`rng_queue`] runs the request processing on a queue
//! built from the input (layout: `virtio::fuzz`). The cargo-fuzz target is a one-line wrapper,
//! and a saved crash input replays in a plain `#[test]`.

use std::io::{self, Read};

use crate::process_queue;
use virtio::fuzz::queue_and_memory;
use virtio::queue::ErrorLog;

/// Yields 0, 1, 2, ... so that runs are reproducible.
struct Counting(u8);

impl Read for Counting {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        for b in buf.iter_mut() {
            *b = self.0;
            self.0 = self.0.wrapping_add(1);
        }
        Ok(buf.len())
    }
}

/// virtio-rng request processing.
pub fn rng_queue(input: &[u8]) {
    let Some((mut queue, _, mem)) = queue_and_memory(input) else {
        return;
    };
    let _ = process_queue(
        &mut queue,
        &mem,
        &mut Counting(0),
        &mut ErrorLog::new("fuzz"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio::fuzz::{garbage, soak_iterations, structured_queue_input, xorshift};

    #[test]
    fn survives_garbage() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in [0usize, 3, 4, 5, 64, 0x600, 0x4100, 0x8000] {
            let input = garbage(len, &mut seed);
            rng_queue(&input);
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
            rng_queue(&structured_queue_input(&mut next).0);
        }
    }
}
