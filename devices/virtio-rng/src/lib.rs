//! virtio-rng, the entropy device: virtio 1.2 section 5.4.
//!
//! One queue (`requestq`); the driver posts device-writable buffers and the device fills them
//! with random bytes from an injected source (the VMM passes [`Getrandom`]; tests pass a fixed
//! pattern). No feature bits of its own and no configuration space.

#![warn(missing_docs)]

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;

use std::io::{self, Read, Write};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use virtio::events::{DeviceRuntime, Dispatch};
use virtio::queue::{drain_queue, features, Chain, Drained, ErrorLog, QueueError};
use virtio::{device_type, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most bytes one request gets: Linux asks for at most a page at a time, and a cap keeps a
/// guest posting a 4 GiB buffer from holding the event loop.
pub const MAX_REQUEST: usize = 64 * 1024;

/// The host's entropy: the `getrandom(2)` system call (the kernel's CSPRNG, never blocking
/// once it is seeded at boot).
#[derive(Debug, Default, Clone, Copy)]
pub struct Getrandom;

impl Read for Getrandom {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which is valid
            // and exclusively borrowed for the duration of the call.
            let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// Fills the device-writable buffers of one request from `source`; returns the bytes written.
fn fill_request(chain: Chain<'_>, source: &mut dyn Read, buf: &mut [u8]) -> io::Result<u32> {
    let mem = chain.memory();
    let mut writer = chain
        .clone()
        .writer(mem)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut left = writer.available_bytes().min(MAX_REQUEST);
    while left > 0 {
        let n = left.min(buf.len());
        let chunk = &mut buf[..n];
        source.read_exact(chunk)?;
        writer.write_all(chunk)?;
        left -= chunk.len();
    }
    // At most MAX_REQUEST.
    Ok(writer.bytes_written() as u32)
}

/// Serves every request on the queue from `source`. A request that cannot be served (a buffer
/// outside guest memory, a failing source) is returned with nothing written.
pub fn process_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    source: &mut dyn Read,
    errors: &mut ErrorLog,
) -> Result<Drained, QueueError> {
    let mut buf = [0u8; 4096];
    drain_queue(queue, mem, |chain| {
        fill_request(chain, source, &mut buf).unwrap_or_else(|e| {
            errors.warn(format_args!("a request failed: {e}"));
            0
        })
    })
}

/// The entropy device.
pub struct VirtioRng {
    source: Box<dyn Read + Send>,
    acked: u64,
    runtime: DeviceRuntime,
    errors: ErrorLog,
}

impl VirtioRng {
    /// An entropy device reading from `source`.
    pub fn new(source: Box<dyn Read + Send>) -> io::Result<Self> {
        Ok(Self {
            source,
            acked: 0,
            runtime: DeviceRuntime::new()?,
            errors: ErrorLog::new("virtio-rng"),
        })
    }

    fn process(&mut self) {
        let source = &mut self.source;
        if let Some(active) = self.runtime.active() {
            active.run_queue(0, &mut self.errors, |queue, mem, errors| {
                Ok(process_queue(queue, mem, &mut **source, errors)?.report(errors))
            });
        }
    }
}

impl VirtioDevice for VirtioRng {
    fn metrics(&self) -> Option<Arc<bus::metrics::DeviceMetrics>> {
        Some(self.errors.metrics.clone())
    }

    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::COMMON
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        self.runtime.activate(mem, interrupt, queues, 1, self.acked)
    }

    fn reset(&mut self) -> bool {
        self.runtime.reset();
        self.acked = 0;
        true
    }
}

impl MutEventSubscriber for VirtioRng {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.runtime.dispatch(&events, ops) {
            Dispatch::Queue(_) | Dispatch::Control { active: true } => self.process(),
            Dispatch::Control { active: false } | Dispatch::Device(_) | Dispatch::Nothing => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.runtime.init(ops);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use virtio::events::DeviceEventLoop;
    use virtio::queue::testing::*;
    use virtio::InterruptKind;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Yields 0, 1, 2, ... (wrapping).
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

    struct Failing;
    impl Read for Failing {
        fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("no entropy"))
        }
    }

    #[test]
    fn fills_writable_buffers_across_descriptors() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        let head = driver.add(&[w(DATA, 3), w(DATA + 0x100, 2)]);

        let drained = process_queue(
            &mut queue,
            &mem,
            &mut Counting(0),
            &mut ErrorLog::new("test"),
        )
        .unwrap();

        assert_eq!(drained.completed, 1);
        assert!(drained.notify);
        assert_eq!(driver.used(0), (u32::from(head), 5));
        assert_eq!(read_bytes(&mem, DATA, 3), [0, 1, 2]);
        assert_eq!(read_bytes(&mem, DATA + 0x100, 2), [3, 4]);
    }

    #[test]
    fn readable_descriptors_are_not_written() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        write_bytes(&mem, DATA, &[0x55; 4]);
        driver.add(&[r(DATA, 4), w(DATA + 0x100, 2)]);

        process_queue(
            &mut queue,
            &mem,
            &mut Counting(7),
            &mut ErrorLog::new("test"),
        )
        .unwrap();

        assert_eq!(driver.used(0).1, 2);
        assert_eq!(read_bytes(&mem, DATA, 4), [0x55; 4]);
        assert_eq!(read_bytes(&mem, DATA + 0x100, 2), [7, 8]);
    }

    #[test]
    fn a_huge_request_is_capped() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        driver.add(&[w(DATA, 0x8_0000)]);

        process_queue(
            &mut queue,
            &mem,
            &mut Counting(0),
            &mut ErrorLog::new("test"),
        )
        .unwrap();

        assert_eq!(driver.used(0).1, MAX_REQUEST as u32);
    }

    #[test]
    fn malformed_requests_are_returned_empty() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        // Outside guest memory; straddling its end; readable only.
        driver.add(&[w(MEM_SIZE + 0x1000, 16)]);
        driver.add(&[w(MEM_SIZE - 8, 16)]);
        driver.add(&[r(DATA, 16)]);

        let drained = process_queue(
            &mut queue,
            &mem,
            &mut Counting(0),
            &mut ErrorLog::new("test"),
        )
        .unwrap();

        assert_eq!(drained.completed, 3);
        assert_eq!(driver.used_idx(), 3);
        assert_eq!(driver.used(0).1, 0);
        assert_eq!(driver.used(1).1, 0);
        assert_eq!(driver.used(2).1, 0);
        assert_eq!(read_bytes(&mem, MEM_SIZE - 8, 8), [0; 8]);
    }

    #[test]
    fn a_failing_source_returns_the_buffer_empty() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let mut queue = driver.queue();
        driver.add(&[w(DATA, 16)]);

        process_queue(&mut queue, &mem, &mut Failing, &mut ErrorLog::new("test")).unwrap();

        assert_eq!(driver.used(0).1, 0);
    }

    #[test]
    fn getrandom_fills_the_buffer() {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        Getrandom.read_exact(&mut a).unwrap();
        Getrandom.read_exact(&mut b).unwrap();
        assert_ne!(a, b);
    }

    struct CountInterrupts(Mutex<Vec<InterruptKind>>);
    impl VirtioInterrupt for CountInterrupts {
        fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
            self.0.lock().unwrap().push(kind);
            Ok(())
        }
    }

    #[test]
    fn device_serves_its_queue_from_the_event_loop() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let rng = Arc::new(Mutex::new(VirtioRng::new(Box::new(Counting(1))).unwrap()));
        let mut event_loop = DeviceEventLoop::new().unwrap();
        event_loop.add_subscriber(rng.clone());
        let notify = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupts = Arc::new(CountInterrupts(Mutex::new(Vec::new())));
        {
            let mut rng = rng.lock().unwrap();
            assert_eq!(rng.device_type(), 4);
            assert_eq!(rng.features(), 1 << 32 | 1 << 28 | 1 << 29);
            rng.ack_features(features::VERSION_1);
            rng.activate(
                mem.clone(),
                interrupts.clone(),
                vec![ActiveQueue {
                    queue: driver.queue(),
                    notify: notify.try_clone().unwrap(),
                }],
            )
            .unwrap();
        }
        event_loop.run_once(1000).unwrap();

        driver.add(&[w(DATA, 4)]);
        notify.write(1).unwrap();
        event_loop.run_once(1000).unwrap();

        assert_eq!(driver.used_idx(), 1);
        assert_eq!(read_bytes(&mem, DATA, 4), [1, 2, 3, 4]);
        assert_eq!(*interrupts.0.lock().unwrap(), [InterruptKind::Queue(0)]);

        // After a reset the device no longer touches the queue.
        assert!(rng.lock().unwrap().reset());
        event_loop.run_once(1000).unwrap();
        driver.add(&[w(DATA, 4)]);
        notify.write(1).unwrap();
        assert_eq!(event_loop.run_once(50).unwrap(), 0);
        assert_eq!(driver.used_idx(), 1);
    }

    /// The driver's side of many one-buffer requests through the virtio-mmio transport and the
    /// event loop, with EVENT_IDX, as Linux's virtio-rng makes them: every one is answered with
    /// an interrupt.
    #[test]
    fn sequential_requests_through_the_mmio_transport_each_get_an_interrupt() {
        use bus::BusDevice;
        use virtio::mmio::{reg, VirtioMmioTransport};
        let wr = |t: &mut VirtioMmioTransport, offset: u64, value: u32| {
            t.write(offset, &value.to_le_bytes())
        };
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let rng = Arc::new(Mutex::new(VirtioRng::new(Box::new(Counting(0))).unwrap()));
        let mut t = VirtioMmioTransport::new(mem.clone(), rng.clone()).unwrap();
        let mut event_loop = DeviceEventLoop::new().unwrap();
        event_loop.add_subscriber(rng.clone());
        let acked = features::VERSION_1 | features::RING_EVENT_IDX;
        wr(&mut t, reg::STATUS, 3);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, reg::DRIVER_FEATURES, acked as u32);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, (acked >> 32) as u32);
        wr(&mut t, reg::STATUS, 0xb);
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_NUM, 16);
        wr(&mut t, reg::QUEUE_DESC_LOW, DESC_TABLE as u32);
        wr(&mut t, reg::QUEUE_DRIVER_LOW, AVAIL_RING as u32);
        wr(&mut t, reg::QUEUE_DEVICE_LOW, USED_RING as u32);
        wr(&mut t, reg::QUEUE_READY, 1);
        wr(&mut t, reg::STATUS, 0xf);
        assert_eq!(t.status(), 0xf);
        event_loop.run_once(1000).unwrap();

        for i in 0..500u16 {
            // Interrupt me when entry i is used.
            driver.set_used_event(i);
            driver.add(&[w(DATA, 64)]);
            wr(&mut t, reg::QUEUE_NOTIFY, 0);
            event_loop.run_once(1000).unwrap();
            assert_eq!(driver.used_idx(), i + 1);
            assert_eq!(t.irq_event().read().unwrap(), 1, "request {i}");
            wr(&mut t, reg::INTERRUPT_ACK, 1);
        }
        assert_eq!(t.status(), 0xf);
    }
}
