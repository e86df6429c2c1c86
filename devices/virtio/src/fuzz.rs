//! Fuzzing scaffolding shared by the virtio device crates' fuzz entry points: guest memory and
//! a queue built from the input bytes, so that each device's harness (`virtio_blk::fuzz`,
//! `virtio_net::fuzz`, `virtio_rng::fuzz`) runs the real processing on exactly the layout below.
//! The transport harnesses beside the transports: [`crate::pci::fuzz_virtio_pci`] and
//! [`crate::pci::fuzz_pci_config`]; the MMIO transport's is `virtio_blk::fuzz::mmio_transport`
//! (it needs a device behind it).
//!
//! Queue inputs: the first 4 bytes set up the queue (`[size, next_avail, next_used, flags]`, size
//! `1 << (b % 5)` entries, flags bit 0: `VIRTIO_F_EVENT_IDX`, bits 1-2: device options), the rest
//! is guest memory: two regions `[0, 0x4000)` and `[0x5000, 0x8000)` with a hole between them,
//! descriptor table at 0, available ring at 0x200, used ring at 0x400. Everything else in memory,
//! including every descriptor, comes from the input.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The guest memory regions of a queue input: (base, length).
pub const REGIONS: [(u64, usize); 2] = [(0, 0x4000), (0x5000, 0x3000)];
/// Where the descriptor table lies.
pub const DESC_TABLE: u64 = 0;
/// Where the available ring lies.
pub const AVAIL_RING: u64 = 0x200;
/// Where the used ring lies.
pub const USED_RING: u64 = 0x400;

/// Runs `serve` on `queue` as a worker that polls its rings does ([`crate::poll`]) when
/// `polled`: the driver asked not to notify first, and the drain leaving it so.
pub fn serve_polled<R>(
    polled: bool,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    serve: impl FnOnce(&mut Queue) -> R,
) -> R {
    if polled {
        crate::events::quiet(queue, mem);
    }
    crate::queue::serving(polled, || serve(queue))
}

/// Guest memory with `bytes` copied over its regions in order.
pub fn memory(bytes: &[u8]) -> Option<GuestMemoryMmap> {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(base, len)| (GuestAddress(base), len))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).ok()?;
    let mut rest = bytes;
    for (base, len) in REGIONS {
        let n = rest.len().min(len);
        mem.write_slice(&rest[..n], GuestAddress(base)).ok()?;
        rest = &rest[n..];
    }
    Some(mem)
}

/// Splits the input into the queue set-up, its flags and guest memory.
pub fn queue_and_memory(input: &[u8]) -> Option<(Queue, u8, GuestMemoryMmap)> {
    let (&[size, next_avail, next_used, flags], rest) = input.split_first_chunk::<4>()?;
    let mut queue = Queue::new(16).ok()?;
    queue.try_set_size(1 << (size % 5)).ok()?;
    queue.set_next_avail(u16::from(next_avail));
    queue.set_next_used(u16::from(next_used));
    queue.set_event_idx(flags & 1 != 0);
    queue
        .try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .ok()?;
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .ok()?;
    queue
        .try_set_used_ring_address(GuestAddress(USED_RING))
        .ok()?;
    queue.set_ready(true);
    Some((queue, flags, memory(rest)?))
}

/// A split-ring descriptor as the guest writes it: address, length, flags, next.
pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    d
}

/// The next number of a xorshift64 sequence: deterministic noise for tests and soak runs.
pub fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Deterministic garbage of `len` bytes, for "survives anything" tests.
pub fn garbage(len: usize, seed: &mut u64) -> Vec<u8> {
    (0..len).map(|_| xorshift(seed) as u8).collect()
}

/// How many inputs a soak test runs: `VIRTIO_SOAK=<iterations>`, 20,000 by default.
pub fn soak_iterations() -> u64 {
    std::env::var("VIRTIO_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// A structured random queue input for soak runs: plausible descriptor tables, rings and
/// request headers with edge values. Returns the input and the guest memory part alone.
pub fn structured_queue_input(next: &mut impl FnMut() -> u64) -> (Vec<u8>, Vec<u8>) {
    let mut mem = vec![0u8; 0x7000];
    let pick = |r: u64, options: &[u64]| options[(r % options.len() as u64) as usize];
    for i in 0..24u64 {
        let r = next();
        let addr = pick(
            r,
            &[
                0x800 + (r >> 8) % 0x3000,
                0x3ff0 + (r >> 8) % 0x20,
                0x4ff8,
                0x7ff0,
                0x1000,
                u64::MAX - 8,
                (r >> 8) % 0x8000,
            ],
        );
        let r = next();
        let len = pick(r, &[0, 1, 12, 15, 16, 17, 511, 512, 513, 4096, 0x3000]) as u32
            ^ if r.is_multiple_of(17) {
                (r >> 32) as u32
            } else {
                0
            };
        let flags = (next() % 8) as u16;
        let nxt = (next() % 20) as u16;
        let at = (16 * i) as usize;
        mem[at..at + 16].copy_from_slice(&desc(addr, len, flags, nxt));
    }
    let r = next();
    let idx = pick(r, &[0, 1, 2, 3, 5, 16, 17, (r >> 8) & 0xffff]) as u16;
    mem[0x202..0x204].copy_from_slice(&idx.to_le_bytes());
    for i in 0..16usize {
        mem[0x204 + 2 * i] = (next() % 20) as u8;
    }
    // Request headers and payloads scattered over the data area.
    for _ in 0..16 {
        let at = (0x800 + (next() % 0x3000) as usize) & !7;
        let r = next();
        let kind = pick(r, &[0, 1, 4, 8, 11, 13, 99]) as u32;
        let sector = pick(next(), &[0, 1, 15, 16, 17, u64::MAX, 1 << 55]);
        mem[at..at + 4].copy_from_slice(&kind.to_le_bytes());
        mem[at + 8..at + 16].copy_from_slice(&sector.to_le_bytes());
        let count = pick(next(), &[0, 1, 2, 16, 1 << 16, u32::MAX as u64]) as u32;
        let flags = pick(next(), &[0, 1, 2, 3]) as u32;
        if at + 32 <= mem.len() {
            mem[at + 16..at + 24].copy_from_slice(&sector.to_le_bytes());
            mem[at + 24..at + 28].copy_from_slice(&count.to_le_bytes());
            mem[at + 28..at + 32].copy_from_slice(&flags.to_le_bytes());
        }
    }
    let head = [
        next() as u8,
        next() as u8 % 4,
        next() as u8 % 4,
        next() as u8,
    ];
    let mut input = head.to_vec();
    input.extend(&mem);
    (input, mem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_inputs_lay_out_the_rings_and_memory() {
        let mut input = vec![4, 1, 2, 1];
        let mut mem = vec![0u8; 0x4800];
        mem[0x200] = 0xaa;
        mem[0x4000] = 0xbb;
        input.extend(&mem);
        let (queue, flags, guest) = queue_and_memory(&input).unwrap();
        assert_eq!(
            (queue.size(), queue.next_avail(), queue.next_used()),
            (16, 1, 2)
        );
        assert_eq!(flags, 1);
        let byte: u8 = guest.read_obj(GuestAddress(AVAIL_RING)).unwrap();
        assert_eq!(byte, 0xaa);
        // The byte past the first region lands at the start of the second.
        let byte: u8 = guest.read_obj(GuestAddress(0x5000)).unwrap();
        assert_eq!(byte, 0xbb);
        assert!(queue_and_memory(&[1, 2, 3]).is_none());
    }
}
