//! Device I/O on one event-loop thread (event-manager 0.4).
//!
//! Every device is an event-manager subscriber shared with its transport as
//! `Arc<Mutex<Device>>`. The VMM adds each device to a [`DeviceEventLoop`] of its own before the
//! guest starts and then starts it: one worker thread per device waits on that device's
//! eventfds, so a busy device never stalls another.
//!
//! Activation and reset happen on a vCPU thread (the driver writes the status register), but the
//! queue eventfds must be added to, or removed from, the event loop's epoll set on the loop's
//! own thread. So each device keeps a [`DeviceRuntime`] with a control eventfd that is
//! registered once, at startup (the pattern of Firecracker's "activate" eventfd): activation
//! and reset only record what the loop should watch and kick the control eventfd; the loop then
//! swaps the registrations in [`DeviceRuntime::dispatch`]. Registered queue eventfds are the
//! runtime's own duplicates, so they stay open until the loop has removed them from epoll.
//!
//! How a VMM puts a device on a transport and starts its worker: the example in the
//! `vmmkit-virtio-blk` crate's documentation.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::poll::{PolledQueues, Pollers, SharedPoller};
use super::queue::{features, ErrorLog, QueueError, Served};
use super::{ActivateError, ActiveQueue, InterruptKind, VirtioInterrupt};

/// Errors of the device event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// The epoll instance could not be created.
    #[error("cannot create the event manager")]
    Manager(#[source] event_manager::Error),
    /// The stop eventfd could not be created or signalled.
    #[error("cannot use the stop eventfd of the event loop")]
    StopEvent(#[source] io::Error),
    /// The thread could not be spawned.
    #[error("cannot spawn the device event-loop thread")]
    Spawn(#[source] io::Error),
    /// The thread panicked.
    #[error("the device event-loop thread panicked")]
    Panicked,
}

/// A subscriber as the loop holds it: shared with the transport that activates it.
pub type SharedSubscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Wraps a shared subscriber so that a mutex poisoned by a panic on a vCPU thread is logged and
/// recovered instead of taking the event loop down (event-manager's own `Mutex` impl unwraps).
struct Shared(SharedSubscriber);

impl Shared {
    fn with<R>(&self, f: impl FnOnce(&mut (dyn MutEventSubscriber + Send)) -> R) -> R {
        let mut guard = self.0.lock().unwrap_or_else(|poisoned| {
            log::error!("a virtio device panicked earlier; using its state as it was left");
            self.0.clear_poison();
            poisoned.into_inner()
        });
        f(&mut *guard)
    }
}

impl MutEventSubscriber for Shared {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.with(|s| s.process(events, ops));
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.with(|s| s.init(ops));
    }
}

/// Ends the loop when its eventfd fires.
struct Stopper {
    event: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for Stopper {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.event.read();
        self.stopped.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.event, EventSet::IN)) {
            log::error!("cannot watch the stop eventfd of the device event loop: {e}");
        }
    }
}

/// Runs first on every device worker thread, given the thread's name, before it serves any
/// queue: where a VMM confines the thread (a seccomp filter). On an error the worker ends at once.
pub type WorkerStart = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The device event loop before it runs: add the devices, then [`start`](Self::start) it.
pub struct DeviceEventLoop {
    manager: EventManager<Shared>,
    stop: EventFd,
    stopped: Arc<AtomicBool>,
    name: String,
    pollers: Pollers,
}

impl DeviceEventLoop {
    /// An empty event loop.
    pub fn new() -> Result<Self, EventLoopError> {
        let mut manager = EventManager::new().map_err(EventLoopError::Manager)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::StopEvent)?;
        let stopped = Arc::new(AtomicBool::new(false));
        let stopper = Stopper {
            event: stop.try_clone().map_err(EventLoopError::StopEvent)?,
            stopped: Arc::clone(&stopped),
        };
        manager.add_subscriber(Shared(Arc::new(Mutex::new(stopper))));
        Ok(Self {
            manager,
            stop,
            stopped,
            name: "virtio-io".into(),
            pollers: Pollers::new(Duration::ZERO),
        })
    }

    /// Names the loop's thread (`virtio-io` by default), as `ps -L` and the logs show it. A VMM
    /// that gives each device a loop of its own names each after its device.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Adds a device (or any subscriber); its `init` runs now, on the caller's thread.
    pub fn add_subscriber(&mut self, subscriber: SharedSubscriber) {
        self.manager.add_subscriber(Shared(subscriber));
    }

    /// Lets the loop poll the available rings of the devices added with
    /// [`add_polled`](Self::add_polled) for up to `max` after each wake-up (see
    /// [`crate::poll`]); zero, the default, never polls.
    pub fn with_polling(mut self, max: Duration) -> Self {
        self.pollers.set_max(max);
        self
    }

    /// Adds a device whose rings the loop polls (when [`with_polling`](Self::with_polling)
    /// allows it), as well as dispatching its events.
    pub fn add_polled<T>(&mut self, device: Arc<Mutex<T>>)
    where
        T: MutEventSubscriber + PolledQueues + Send + 'static,
    {
        self.add_poller(device.clone());
        self.add_subscriber(device);
    }

    /// Polls `device`'s rings, a device added with [`add_subscriber`](Self::add_subscriber)
    /// as well.
    pub fn add_poller(&mut self, device: SharedPoller) {
        self.pollers.add(device);
    }

    /// Runs one round on the caller's thread, waiting at most `timeout_ms` (-1: forever);
    /// returns how many events were dispatched. For tests and for VMMs that drive the loop
    /// themselves.
    pub fn run_once(&mut self, timeout_ms: i32) -> Result<usize, EventLoopError> {
        self.manager
            .run_with_timeout(timeout_ms)
            .map_err(EventLoopError::Manager)
    }

    /// Spawns the thread that runs the loop until [`RunningEventLoop::stop`].
    pub fn start(self) -> Result<RunningEventLoop, EventLoopError> {
        self.start_with(Arc::new(|_| Ok(())))
    }

    /// Like [`start`](Self::start), running `thread_start` first on the new thread (see
    /// [`WorkerStart`]).
    pub fn start_with(self, thread_start: WorkerStart) -> Result<RunningEventLoop, EventLoopError> {
        let Self {
            mut manager,
            stop,
            stopped,
            name,
            mut pollers,
        } = self;
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                if let Err(e) = thread_start("virtio-io") {
                    log::error!("the device event loop cannot start: {e}");
                    return;
                }
                let stop = || stopped.load(Ordering::SeqCst);
                while !stop() {
                    // `run` returns Ok(0) when a signal interrupts the wait.
                    let polled = manager.run().and_then(|_| {
                        pollers.poll(&stop, &mut || manager.run_with_timeout(0).map(|n| n > 0))
                    });
                    if let Err(e) = polled {
                        log::error!("the device event loop stopped: {e}");
                        break;
                    }
                }
            })
            .map_err(EventLoopError::Spawn)?;
        Ok(RunningEventLoop {
            stop,
            thread: Some(thread),
        })
    }
}

/// The device event loop running on its thread; stops (and joins) on [`stop`](Self::stop) or
/// when dropped.
pub struct RunningEventLoop {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl RunningEventLoop {
    /// Whether the thread has ended without being asked to (an error or a panic): the VMM then
    /// stops the VM rather than run on with dead I/O.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the loop after the events at hand and waits for the thread to end.
    pub fn stop(mut self) -> Result<(), EventLoopError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), EventLoopError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.stop.write(1).map_err(EventLoopError::StopEvent)?;
        thread.join().map_err(|_| EventLoopError::Panicked)
    }
}

impl Drop for RunningEventLoop {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            log::error!("{e}");
        }
    }
}

/// Event data of a device's control eventfd; queue eventfds use their queue index, and devices
/// number their other eventfds downwards from [`FIRST_DEVICE_TOKEN`].
pub const CONTROL_TOKEN: u32 = u32::MAX;
/// The highest event data a device may use for its own eventfds (a tap, a timer).
pub const FIRST_DEVICE_TOKEN: u32 = u32::MAX - 1;

/// What the driver set up: handed over by the transport at activation.
pub struct Activated {
    /// Guest memory the queues live in.
    pub mem: GuestMemoryMmap,
    /// Where used-buffer and configuration-change interrupts go.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The queues, in index order.
    pub queues: Vec<virtio_queue::Queue>,
    /// The device's index of `queues[0]`: the runtime of a device's queue pair, or of its
    /// control queue, holds a slice of the device's queues, and interrupts name the real one.
    first: u16,
    /// Queues found broken: no longer served until the driver resets the device.
    broken: Vec<bool>,
    /// The queues' notification eventfds, signalled again when a wake-up's budget ran out.
    notify: Vec<EventFd>,
    /// The worker polls the rings ([`crate::poll`]): a queue served meanwhile goes back to
    /// no notifications as soon as its work returns.
    polling: bool,
}

impl Activated {
    /// Runs `work` on queue `index` and raises the queue's interrupt if `work` says the driver
    /// wants one. A broken queue (rings that cannot be read, an available index more than a
    /// queue's worth ahead) is logged (rate-limited) and left alone until the next reset, and
    /// the driver is told: DEVICE_NEEDS_RESET and a configuration-change notification (2.1.2).
    ///
    /// If `work` left chains for later ([`Served::more`]), the queue's eventfd is signalled
    /// again: the loop serves the other ready devices first, then comes back to this queue.
    pub fn run_queue<F, R>(&mut self, index: usize, errors: &mut ErrorLog, work: F)
    where
        F: FnOnce(
            &mut virtio_queue::Queue,
            &GuestMemoryMmap,
            &mut ErrorLog,
        ) -> Result<R, QueueError>,
        R: Into<Served>,
    {
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        // A queue the driver did not enable is not served (its rings may be anywhere).
        if !queue.ready() || self.broken.get(index).copied().unwrap_or(false) {
            return;
        }
        // While the worker polls, the drain leaves the driver's notifications off.
        let served =
            super::queue::serving(self.polling, || work(queue, &self.mem, errors)).map(Into::into);
        // Queue indexes fit u16: transports refuse more than 65535 queues.
        let number = self.first.saturating_add(index as u16);
        if let Ok(Served { more: true, .. }) = served {
            if let Some(Err(e)) = self.notify.get(index).map(|fd| fd.write(1)) {
                errors.warn(format_args!("cannot re-arm queue {number}: {e}"));
            }
        }
        match served.map(|s| s.notify) {
            Ok(true) => {
                let kind = InterruptKind::Queue(number);
                bus::metrics::DeviceMetrics::add(&errors.metrics.interrupts, 1);
                if let Err(e) = self.interrupt.trigger(kind) {
                    errors.warn(format_args!(
                        "cannot raise the interrupt of queue {number}: {e}"
                    ));
                }
            }
            Ok(false) => {}
            Err(e) => {
                errors.warn(format_args!(
                    "queue {number}: {e}; the device needs a reset"
                ));
                if let Some(broken) = self.broken.get_mut(index) {
                    *broken = true;
                }
                if let Err(e) = self.interrupt.set_needs_reset() {
                    errors.warn(format_args!("cannot signal the device reset request: {e}"));
                }
            }
        }
    }
}

impl Activated {
    /// The queues the device serves: enabled by the driver and not found broken.
    fn served(&mut self) -> impl Iterator<Item = (&mut virtio_queue::Queue, &EventFd)> {
        self.queues
            .iter_mut()
            .zip(&self.broken)
            .zip(&self.notify)
            .filter(|((queue, broken), _)| queue.ready() && !**broken)
            .map(|((queue, _), notify)| (queue, notify))
    }

    /// Asks the driver not to notify the served queues while the worker polls their rings
    /// ([`crate::poll`]): with VIRTIO_F_EVENT_IDX an `avail_event` one behind the device's
    /// position, which the driver's index has passed already and crosses again only after a
    /// whole turn of the 16-bit index (2.7.10); otherwise VIRTQ_USED_F_NO_NOTIFY (2.7.7). A
    /// ring that cannot be written is left to the next serve, which reports it.
    fn quiet_notifications(&mut self) {
        self.polling = true;
        let mem = self.mem.clone();
        for (queue, _) in self.served() {
            quiet(queue, &mem);
        }
    }

    /// Signals the eventfd of every served queue whose driver made chains available since
    /// the device last looked; returns whether there was one.
    fn kick_available(&mut self) -> bool {
        let mem = self.mem.clone();
        let mut found = false;
        for (queue, notify) in self.served() {
            if super::queue::has_available(queue, &mem).unwrap_or(false) {
                found = true;
                let _ = notify.write(1);
            }
        }
        found
    }

    /// Turns the driver's notifications back on after a poll; a queue the driver added to
    /// meanwhile gets its eventfd signalled, so that the loop serves it.
    fn resume_notifications(&mut self) {
        self.polling = false;
        let mem = self.mem.clone();
        for (queue, notify) in self.served() {
            if queue.enable_notification(&mem).unwrap_or(false) {
                let _ = notify.write(1);
            }
        }
    }
}

/// Asks the driver not to notify `queue`: see [`Activated::quiet_notifications`].
pub(crate) fn quiet(queue: &mut virtio_queue::Queue, mem: &GuestMemoryMmap) {
    if queue.event_idx_enabled() {
        let at = queue
            .used_ring()
            .checked_add(4 + 8 * u64::from(queue.size()))
            .map(vm_memory::GuestAddress);
        let behind = queue.next_avail().wrapping_sub(1).to_le();
        if let Some(at) = at {
            let _ = vm_memory::Bytes::store(mem, behind, at, Ordering::Release);
        }
    } else {
        let _ = queue.disable_notification(mem);
    }
}

/// What [`DeviceRuntime::dispatch`] made of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// The control eventfd: registrations were brought up to date; `active` tells whether the
    /// device now runs (so it may start work that does not wait for a queue, such as reading a
    /// tap).
    Control {
        /// Whether the device is activated.
        active: bool,
    },
    /// The driver notified this queue (already acknowledged) and the device is active.
    Queue(usize),
    /// An eventfd the device registered itself, with its event data.
    Device(u32),
    /// Nothing for the device to do (a notification that arrived after a reset).
    Nothing,
}

/// The run-time half of a device: activation state and its eventfd registrations in the loop.
pub struct DeviceRuntime {
    control: EventFd,
    active: Option<Activated>,
    /// Queue eventfds to register at the next control event (`Some(vec![])`: unregister all).
    pending: Option<Vec<EventFd>>,
    /// Queue eventfds registered in the loop, by queue index.
    watched: Vec<EventFd>,
}

impl DeviceRuntime {
    /// A runtime for a device not yet activated.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            control: EventFd::new(EFD_NONBLOCK)?,
            active: None,
            pending: None,
            watched: Vec::new(),
        })
    }

    /// Registers the control eventfd; call from the device's `MutEventSubscriber::init`.
    pub fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.control,
            CONTROL_TOKEN,
            EventSet::IN,
        )) {
            log::error!("cannot watch a virtio device's control eventfd: {e}");
        }
    }

    /// Takes over the queues the transport negotiated; `queue_count` is how many the device
    /// needs and `acked` the features the driver accepted (for `VIRTIO_F_EVENT_IDX`).
    pub fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
        queue_count: usize,
        acked: u64,
    ) -> Result<(), ActivateError> {
        self.activate_at(0, mem, interrupt, queues, queue_count, acked)
    }

    /// [`activate`](Self::activate) for a runtime that serves part of a device's queues, the
    /// first of them the device's queue `first` (a virtio-net queue pair on a worker of its
    /// own): the loop still numbers them from 0, interrupts carry the device's numbers.
    pub fn activate_at(
        &mut self,
        first: u16,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
        queue_count: usize,
        acked: u64,
    ) -> Result<(), ActivateError> {
        if queues.len() != queue_count {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: queue_count,
            });
        }
        let event_idx = acked & features::RING_EVENT_IDX != 0;
        let mut fds = Vec::with_capacity(queues.len());
        let mut rings = Vec::with_capacity(queues.len());
        let mut rearm = Vec::with_capacity(queues.len());
        for ActiveQueue { mut queue, notify } in queues {
            virtio_queue::QueueT::set_event_idx(&mut queue, event_idx);
            rings.push(queue);
            rearm.push(notify.try_clone().map_err(|e| {
                ActivateError::Backend(format!("cannot duplicate a queue eventfd: {e}"))
            })?);
            fds.push(notify);
        }
        self.control
            .write(1)
            .map_err(|e| ActivateError::Backend(format!("cannot wake the event loop: {e}")))?;
        self.active = Some(Activated {
            mem,
            interrupt,
            broken: vec![false; rings.len()],
            notify: rearm,
            queues: rings,
            first,
            polling: false,
        });
        self.pending = Some(fds);
        Ok(())
    }

    /// Forgets the queues; the loop stops watching them at its next round.
    pub fn reset(&mut self) {
        self.active = None;
        self.pending = Some(Vec::new());
        if let Err(e) = self.control.write(1) {
            log::error!("cannot wake the event loop to stop watching a reset device: {e}");
        }
    }

    /// Wakes the loop with a [`Dispatch::Control`] for this device: another thread changed
    /// something the device's own thread must act on (a virtio-net queue pair the driver turned
    /// on or off).
    pub fn wake(&self) -> io::Result<()> {
        self.control.write(1)
    }

    /// The activation state, if the device runs.
    pub fn active(&mut self) -> Option<&mut Activated> {
        self.active.as_mut()
    }

    /// Whether the device runs.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// See [`crate::poll`]: asks the driver not to notify while the worker polls.
    pub fn quiet_notifications(&mut self) {
        if let Some(active) = &mut self.active {
            active.quiet_notifications();
        }
    }

    /// See [`crate::poll`]: signals the queues the driver added to; whether there was one.
    pub fn kick_available(&mut self) -> bool {
        self.active.as_mut().is_some_and(Activated::kick_available)
    }

    /// See [`crate::poll`]: the driver's notifications back on at the end of a poll.
    pub fn resume_notifications(&mut self) {
        if let Some(active) = &mut self.active {
            active.resume_notifications();
        }
    }

    /// Handles an event of this device; call first thing in `MutEventSubscriber::process`.
    pub fn dispatch(&mut self, events: &Events, ops: &mut EventOps) -> Dispatch {
        match events.data() {
            CONTROL_TOKEN => {
                let _ = self.control.read();
                self.sync_registrations(ops);
                Dispatch::Control {
                    active: self.active.is_some(),
                }
            }
            data => match usize::try_from(data).ok().and_then(|i| self.watched.get(i)) {
                Some(fd) => {
                    // A non-blocking read: EAGAIN only means another round already took it.
                    let _ = fd.read();
                    let i = data as usize;
                    if self
                        .active
                        .as_ref()
                        .is_some_and(|a| a.queues.get(i).is_some_and(|q| q.ready()))
                    {
                        Dispatch::Queue(i)
                    } else {
                        Dispatch::Nothing
                    }
                }
                None => Dispatch::Device(data),
            },
        }
    }

    fn sync_registrations(&mut self, ops: &mut EventOps) {
        let Some(next) = self.pending.take() else {
            return;
        };
        for fd in self.watched.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&fd)) {
                log::error!("cannot stop watching a virtio queue eventfd: {e}");
            }
        }
        for (i, fd) in next.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(fd, i as u32, EventSet::IN)) {
                bus::guest_log!(
                    "cannot watch the eventfd of queue {i} (fd {}): {e}",
                    fd.as_raw_fd()
                );
            }
        }
        self.watched = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[test]
    fn a_running_loop_is_not_finished_until_stopped() {
        let running = DeviceEventLoop::new().unwrap().start().unwrap();
        assert!(!running.is_finished());
        running.stop().unwrap();
    }

    struct NoInterrupt;
    impl VirtioInterrupt for NoInterrupt {
        fn trigger(&self, _kind: InterruptKind) -> io::Result<()> {
            Ok(())
        }
    }

    /// Counts what the runtime dispatches to it.
    struct Probe {
        runtime: DeviceRuntime,
        seen: Vec<Dispatch>,
    }

    impl MutEventSubscriber for Probe {
        fn process(&mut self, events: Events, ops: &mut EventOps) {
            let d = self.runtime.dispatch(&events, ops);
            self.seen.push(d);
        }
        fn init(&mut self, ops: &mut EventOps) {
            self.runtime.init(ops);
        }
    }

    /// A queue as a driver enabled it (the rings at 0).
    fn queue() -> virtio_queue::Queue {
        let mut queue = <virtio_queue::Queue as virtio_queue::QueueT>::new(16).unwrap();
        queue.set_ready(true);
        queue
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 0x1000)]).unwrap()
    }

    #[test]
    fn activation_registers_queue_eventfds_in_the_loop_and_reset_removes_them() {
        let mut event_loop = DeviceEventLoop::new().unwrap();
        let probe = Arc::new(Mutex::new(Probe {
            runtime: DeviceRuntime::new().unwrap(),
            seen: Vec::new(),
        }));
        event_loop.add_subscriber(probe.clone());
        let notify = EventFd::new(EFD_NONBLOCK).unwrap();

        // Activation on "a vCPU thread" only kicks the control eventfd.
        probe
            .lock()
            .unwrap()
            .runtime
            .activate(
                mem(),
                Arc::new(NoInterrupt),
                vec![ActiveQueue {
                    queue: queue(),
                    notify: notify.try_clone().unwrap(),
                }],
                1,
                features::RING_EVENT_IDX,
            )
            .unwrap();
        assert_eq!(event_loop.run_once(1000).unwrap(), 1);
        assert_eq!(
            probe.lock().unwrap().seen,
            [Dispatch::Control { active: true }]
        );
        assert!(virtio_queue::QueueT::event_idx_enabled(
            &probe.lock().unwrap().runtime.active().unwrap().queues[0]
        ));

        // A notification is now seen by the loop, as queue 0.
        notify.write(1).unwrap();
        assert_eq!(event_loop.run_once(1000).unwrap(), 1);
        assert_eq!(probe.lock().unwrap().seen[1], Dispatch::Queue(0));

        // After a reset the loop stops watching: a notification wakes nobody.
        probe.lock().unwrap().runtime.reset();
        assert_eq!(event_loop.run_once(1000).unwrap(), 1);
        assert_eq!(
            probe.lock().unwrap().seen[2],
            Dispatch::Control { active: false }
        );
        notify.write(1).unwrap();
        assert_eq!(event_loop.run_once(50).unwrap(), 0);
    }

    /// A queue the driver did not enable: its notifications dispatch nothing and it is never
    /// served, while the enabled one after it is.
    #[test]
    fn a_queue_not_enabled_is_not_served() {
        let mut event_loop = DeviceEventLoop::new().unwrap();
        let probe = Arc::new(Mutex::new(Probe {
            runtime: DeviceRuntime::new().unwrap(),
            seen: Vec::new(),
        }));
        event_loop.add_subscriber(probe.clone());
        let notify: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let disabled = <virtio_queue::Queue as virtio_queue::QueueT>::new(16).unwrap();
        let queues = vec![
            ActiveQueue {
                queue: disabled,
                notify: notify[0].try_clone().unwrap(),
            },
            ActiveQueue {
                queue: queue(),
                notify: notify[1].try_clone().unwrap(),
            },
        ];
        probe
            .lock()
            .unwrap()
            .runtime
            .activate(mem(), Arc::new(NoInterrupt), queues, 2, 0)
            .unwrap();
        event_loop.run_once(1000).unwrap();
        for fd in &notify {
            fd.write(1).unwrap();
            event_loop.run_once(1000).unwrap();
        }
        assert_eq!(
            probe.lock().unwrap().seen[1..],
            [Dispatch::Nothing, Dispatch::Queue(1)]
        );
        let mut errors = ErrorLog::new("probe");
        let mut served = Vec::new();
        let mut probe = probe.lock().unwrap();
        let active = probe.runtime.active().unwrap();
        for index in 0..2 {
            active.run_queue(index, &mut errors, |_, _, _| {
                served.push(index);
                Ok(false)
            });
        }
        assert_eq!(served, [1]);
    }

    /// Puts every chain of its queue on the used ring at once.
    struct Echo {
        runtime: DeviceRuntime,
        errors: ErrorLog,
    }

    impl MutEventSubscriber for Echo {
        fn process(&mut self, events: Events, ops: &mut EventOps) {
            if let Dispatch::Queue(i) = self.runtime.dispatch(&events, ops) {
                if let Some(active) = self.runtime.active() {
                    active.run_queue(i, &mut self.errors, |queue, mem, _| {
                        crate::queue::drain_queue(queue, mem, |_| 0).map(|d| d.notify)
                    });
                }
            }
        }

        fn init(&mut self, ops: &mut EventOps) {
            self.runtime.init(ops);
        }
    }

    impl PolledQueues for Echo {
        fn runtime(&mut self) -> &mut DeviceRuntime {
            &mut self.runtime
        }
    }

    /// A poll after a wake-up, on the test's thread: the driver, asked not to notify, adds a
    /// chain without notifying, and the worker serves it all the same; after the poll the
    /// driver's notifications are back on.
    fn a_polled_queue_is_served_without_notifications(event_idx: bool) {
        use crate::queue::testing::{memory, w, Driver, DATA};
        let mem = memory();
        let mut driver = Driver::new(&mem, 16);
        let notify = EventFd::new(EFD_NONBLOCK).unwrap();
        let echo = Arc::new(Mutex::new(Echo {
            runtime: DeviceRuntime::new().unwrap(),
            errors: ErrorLog::new("echo"),
        }));
        let mut event_loop = DeviceEventLoop::new()
            .unwrap()
            .with_polling(Duration::from_millis(20));
        event_loop.add_polled(echo.clone());
        let acked = if event_idx {
            features::RING_EVENT_IDX
        } else {
            0
        };
        let queue = ActiveQueue {
            queue: driver.queue(),
            notify: notify.try_clone().unwrap(),
        };
        echo.lock()
            .unwrap()
            .runtime
            .activate(mem.clone(), Arc::new(NoInterrupt), vec![queue], 1, acked)
            .unwrap();
        event_loop.run_once(1000).unwrap();
        // The driver's test before it notifies one more chain (2.7.10, 2.7.7).
        let wants_notification = |driver: &Driver<'_>| {
            if event_idx {
                let (old, avail_event) = (driver.avail_idx(), driver.avail_event());
                let new = old.wrapping_add(1);
                new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old)
            } else {
                driver.used_flags() & 1 == 0
            }
        };

        driver.add(&[w(DATA, 16)]);
        notify.write(1).unwrap();
        event_loop.run_once(1000).unwrap();
        assert_eq!(driver.used_idx(), 1);
        assert!(wants_notification(&driver), "a worker that does not poll");

        let DeviceEventLoop {
            manager, pollers, ..
        } = &mut event_loop;
        let mut added_quietly = false;
        pollers
            .poll(&|| false, &mut || {
                if !added_quietly && !wants_notification(&driver) {
                    driver.add(&[w(DATA, 16)]);
                    added_quietly = true;
                }
                manager.run_with_timeout(0).map(|n| n > 0)
            })
            .unwrap();
        assert!(added_quietly, "the driver was never asked not to notify");
        // Served by the poll, or kicked by its end when it stopped early (a busy CPU).
        event_loop.run_once(0).unwrap();
        assert_eq!(
            driver.used_idx(),
            2,
            "the chain added quietly was not served"
        );
        assert!(
            wants_notification(&driver),
            "notifications are off after the poll"
        );
    }

    #[test]
    fn a_polled_queue_is_served_without_notifications_without_event_idx() {
        a_polled_queue_is_served_without_notifications(false);
    }

    #[test]
    fn a_polled_queue_is_served_without_notifications_with_event_idx() {
        a_polled_queue_is_served_without_notifications(true);
    }

    #[test]
    fn activation_with_the_wrong_queue_count_fails() {
        let mut runtime = DeviceRuntime::new().unwrap();
        let err = runtime
            .activate(mem(), Arc::new(NoInterrupt), Vec::new(), 1, 0)
            .unwrap_err();
        assert!(matches!(err, ActivateError::QueueCount { got: 0, want: 1 }));
        assert!(!runtime.is_active());
    }

    /// Counts its eventfd's events.
    struct Counter {
        event: EventFd,
        count: Arc<AtomicUsize>,
    }

    impl MutEventSubscriber for Counter {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.event.read();
            self.count.fetch_add(1, Ordering::SeqCst);
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.event, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn running_loop_dispatches_on_its_thread_and_stops() {
        let mut event_loop = DeviceEventLoop::new().unwrap();
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        event_loop.add_subscriber(Arc::new(Mutex::new(Counter {
            event: event.try_clone().unwrap(),
            count: count.clone(),
        })));
        let running = event_loop.start().unwrap();

        event.write(1).unwrap();
        for _ in 0..200 {
            if count.load(Ordering::SeqCst) == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);

        running.stop().unwrap();
    }
}
