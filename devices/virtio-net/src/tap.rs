//! A host tap interface as the backend of virtio-net (Linux `Documentation/networking/tuntap.rst`).
//!
//! The VMM names an existing tap (created and bridged by the host's network set-up, e.g.
//! `ip tuntap add dev tap0 mode tap`); we attach to it with `TUNSETIFF` as `IFF_TAP |
//! IFF_NO_PI | IFF_VNET_HDR`, so every frame carries a virtio-net header, and set that header to
//! the 12 bytes of `struct virtio_net_hdr_v1` so frames move between tap and guest unchanged.
//! We never create an interface: `TUNSETIFF` on a missing name would create a private one that
//! nobody bridged, and the guest would have a link to nowhere.
//!
//! A multi-queue tap (`ip tuntap add ... multi_queue`) is attached once per queue pair of a
//! multi-queue virtio-net device, each file one tap queue. The kernel spreads received frames
//! over the attached queues by flow, so a queue the driver has not turned on is detached
//! (`TUNSETQUEUE`, [`NetBackend::set_enabled`]) and its flows go to the others.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::tx_ring::{TxRing, TX_BATCH};
use crate::{NetBackend, SendError};
use virtio::iovec::{map_buffers, IoVec};

/// `IFNAMSIZ`, including the terminating NUL.
const IFNAMSIZ: usize = 16;

/// The tun/tap ioctl request numbers (`linux/if_tun.h`), private to this module: the macro makes
/// each a `pub fn`, which is no part of this crate's interface.
mod ioctl_nr {
    use vmm_sys_util::ioctl_iow_nr;

    const TUNTAP: u32 = 0x54;
    ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, ::std::os::raw::c_int);
    ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, ::std::os::raw::c_uint);
    ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, ::std::os::raw::c_int);
    ioctl_iow_nr!(TUNSETQUEUE, TUNTAP, 217, ::std::os::raw::c_int);
}
use ioctl_nr::{TUNSETIFF, TUNSETOFFLOAD, TUNSETQUEUE, TUNSETVNETHDRSZ};

const IFF_TAP: i16 = 0x0002;
const IFF_ATTACH_QUEUE: i16 = 0x0200;
const IFF_DETACH_QUEUE: i16 = 0x0400;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

/// `TUNSETOFFLOAD` flags: what the tap may hand us (checksum-less and segmentation-offloaded
/// frames), set from what the guest driver accepts.
pub mod offload {
    /// `TUN_F_CSUM`: frames may come with a partial checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
    pub const CSUM: u32 = 0x01;
    /// `TUN_F_TSO4`: frames may be TCP over IPv4 segments larger than the MTU.
    pub const TSO4: u32 = 0x02;
    /// `TUN_F_TSO6`: frames may be TCP over IPv6 segments larger than the MTU.
    pub const TSO6: u32 = 0x04;
    /// `TUN_F_TSO_ECN`: large TCP segments may carry the ECN CWR flag.
    pub const TSO_ECN: u32 = 0x08;
}

/// Size of `struct virtio_net_hdr_v1` (virtio 1.2 section 5.1.6).
pub const VNET_HDR_LEN: usize = 12;

/// Errors opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("{0:?} is not a valid interface name (1 to 15 bytes, no '/')")]
    InvalidName(String),
    /// No interface has that name.
    #[error("there is no network interface named {0:?}; create the tap first")]
    NotFound(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// `TUNSETIFF` failed: the interface is not a tap, is busy, or we lack permission.
    #[error("cannot attach to tap {name:?} (is it a tap, not in use, and accessible?)")]
    Attach {
        /// The interface.
        name: String,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// More than one queue was asked of a tap created without `multi_queue`.
    #[error(
        "tap {0:?} has one queue; for more, create it with `ip tuntap add dev {0} mode tap multi_queue`"
    )]
    NotMultiQueue(String),
    /// `TUNSETVNETHDRSZ` failed.
    #[error("cannot set the virtio-net header size of tap {name:?}")]
    HeaderSize {
        /// The interface.
        name: String,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as `TUNSETIFF` reads it: the name and the flags, padded to 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

/// An open tap queue, non-blocking.
#[derive(Debug)]
pub struct Tap {
    /// Frames to send staged on io_uring, or why the host offers none (each frame is then one
    /// `writev`). Declared before `file`, whose descriptor it writes to, so that it is dropped
    /// first.
    tx: Result<TxRing, String>,
    file: File,
    name: String,
    multi_queue: bool,
    /// Whether the queue takes part in the tap's traffic (a multi-queue tap's queue may be
    /// detached).
    attached: bool,
    /// The iovecs of a receive `readv`, kept so that a frame does not zero 1 KiB of stack.
    rx_iovecs: Box<[IoVec; crate::MAX_RX_BUFFERS + 1]>,
}

/// Refuses what cannot be an interface name, and a name no interface has.
fn check_name(name: &str) -> Result<(), TapError> {
    let bytes = name.as_bytes();
    if bytes.is_empty()
        || bytes.len() >= IFNAMSIZ
        || bytes.contains(&b'/')
        || bytes.contains(&0)
        || name == "."
        || name == ".."
    {
        return Err(TapError::InvalidName(name.into()));
    }
    // Asked of the kernel for this process's network namespace; `/sys/class/net` shows the
    // namespace sysfs was mounted in, which `nsenter --net` does not change.
    if nix::net::if_::if_nametoindex(name).is_err() {
        return Err(TapError::NotFound(name.into()));
    }
    Ok(())
}

/// A `struct ifreq` with `name` (checked to fit) and `flags`.
fn if_req(name: &str, flags: i16) -> IfReq {
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    let len = name.len().min(IFNAMSIZ - 1);
    req.name[..len].copy_from_slice(&name.as_bytes()[..len]);
    req
}

impl Tap {
    /// Attaches to the existing tap interface `name`, a tap with one queue or with several
    /// (`multi_queue`; this file is then one of its queues).
    pub fn open(name: &str) -> Result<Self, TapError> {
        check_name(name)?;
        let tap = match Self::attach(name, false) {
            // A multi-queue tap refuses a single-queue attach with EINVAL.
            Err(TapError::Attach { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                Self::attach(name, true)
            }
            result => result,
        }?;
        tap.log_send_path();
        Ok(tap)
    }

    /// Attaches `count` queues of the existing multi-queue tap `name` (one file per queue of a
    /// multi-queue virtio-net device); one queue is [`open`](Self::open).
    pub fn open_queues(name: &str, count: usize) -> Result<Vec<Self>, TapError> {
        if count <= 1 {
            return Ok(vec![Self::open(name)?]);
        }
        check_name(name)?;
        let taps = (0..count)
            .map(|_| match Self::attach(name, true) {
                Err(TapError::Attach { source, .. })
                    if source.raw_os_error() == Some(libc::EINVAL) =>
                {
                    Err(TapError::NotMultiQueue(name.into()))
                }
                result => result,
            })
            .collect::<Result<Vec<_>, _>>()?;
        taps[0].log_send_path();
        Ok(taps)
    }

    /// One line at start: how frames go to the tap.
    fn log_send_path(&self) {
        match &self.tx {
            Ok(_) => log::info!(
                "virtio-net: {}: frames to the tap go out up to {TX_BATCH} per system call, on io_uring",
                self.name
            ),
            Err(e) => log::warn!(
                "virtio-net: {}: io_uring is unavailable ({e}); frames to the tap go out one per system call",
                self.name
            ),
        }
    }

    fn attach(name: &str, multi_queue: bool) -> Result<Self, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if multi_queue {
            flags |= IFF_MULTI_QUEUE;
        }
        let mut req = if_req(name, flags);
        // SAFETY: `file` is an open tun fd and `req` a valid, writable `struct ifreq` that
        // outlives the call; the kernel reads the name and flags and writes back the name.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) };
        if ret < 0 {
            return Err(TapError::Attach {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: `file` is an attached tap fd and `size` an int that outlives the call; the
        // kernel only reads it.
        let ret = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &size) };
        if ret < 0 {
            return Err(TapError::HeaderSize {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            tx: TxRing::new(file.as_raw_fd()).map_err(|e| e.to_string()),
            file,
            name: name.into(),
            multi_queue,
            attached: true,
            rx_iovecs: Box::new([IoVec::default(); crate::MAX_RX_BUFFERS + 1]),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    /// One `readv` into the guest's buffers, then `overflow`: the frame is copied once, by the
    /// kernel.
    fn read_frame_into(
        &mut self,
        mem: &GuestMemoryMmap,
        buffers: &[(GuestAddress, u32)],
        overflow: &mut [u8],
    ) -> io::Result<usize> {
        let iov = &mut *self.rx_iovecs;
        if map_buffers(mem, buffers, &mut iov[..crate::MAX_RX_BUFFERS]).is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a receive buffer outside guest memory, or more buffers than one read takes",
            ));
        }
        iov[buffers.len()] = IoVec {
            base: overflow.as_mut_ptr() as usize,
            len: overflow.len(),
        };
        // SAFETY: the first `buffers.len()` iovecs point into mappings of guest memory that
        // `mem` keeps mapped for the call (the slices' pointer guards only carry the address
        // for plain mmap'ed regions), the last one at `overflow`, which we borrow mutably;
        // readv writes at most each iovec's length into it.
        let n = unsafe {
            libc::readv(
                self.file.as_raw_fd(),
                IoVec::as_raw(iov),
                (buffers.len() + 1) as libc::c_int,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn staging_capacity(&self) -> usize {
        if self.tx.is_ok() {
            TX_BATCH
        } else {
            1
        }
    }

    /// Stages the frame on io_uring; a frame that cannot be staged goes out at once with one
    /// `writev`, after the frames staged before it.
    fn stage_frame_from(
        &mut self,
        mem: &GuestMemoryMmap,
        buffers: &[(GuestAddress, u32)],
        scratch: &mut Vec<u8>,
        refused: &mut dyn FnMut(SendError),
    ) -> Result<(), SendError> {
        if let Ok(tx) = &mut self.tx {
            if tx.stage(mem, buffers).is_ok() {
                return Ok(());
            }
            self.send_staged(refused);
        }
        self.write_frame_from(mem, buffers, scratch)
    }

    fn send_staged(&mut self, refused: &mut dyn FnMut(SendError)) {
        let Ok(tx) = &mut self.tx else {
            return;
        };
        if let Err(e) = tx.send(refused) {
            log::warn!(
                "virtio-net: {}: io_uring failed ({e}); frames to the tap go out one per system call from now on",
                self.name
            );
            self.tx = Err(e.to_string());
        }
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let n = self.file.write(frame)?;
        if n != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the tap took part of a frame",
            ));
        }
        Ok(())
    }

    /// One `writev`, straight from guest memory: no copy, and no allocation per frame.
    fn write_frame_from(
        &mut self,
        mem: &GuestMemoryMmap,
        buffers: &[(GuestAddress, u32)],
        scratch: &mut Vec<u8>,
    ) -> Result<(), SendError> {
        let mut iov = [IoVec::default(); crate::MAX_TX_BUFFERS];
        let Some(total) = map_buffers(mem, buffers, &mut iov) else {
            // A buffer across two memory regions (or outside them), or more buffers than the
            // array holds: rare enough for the copy, which also tells which it was.
            crate::gather_frame(mem, buffers.iter().copied(), scratch)?;
            return Ok(self.write_frame(scratch)?);
        };
        // SAFETY: every iovec points into a mapping of guest memory that `mem` keeps mapped
        // for the call (the slice's pointer guard only carries the address for plain mmap'ed
        // regions); writev only reads the memory, and the first `buffers.len()` entries of
        // `iov` are set.
        let n = unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                IoVec::as_raw(&iov),
                buffers.len() as libc::c_int,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error().into());
        }
        if n as usize != total {
            return Err(
                io::Error::new(io::ErrorKind::WriteZero, "the tap took part of a frame").into(),
            );
        }
        Ok(())
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        // SAFETY: `file` is an attached tap fd; TUNSETOFFLOAD takes its argument by value.
        let ret =
            unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD(), libc::c_ulong::from(flags)) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    /// Attaches or detaches this queue of a multi-queue tap (`TUNSETQUEUE`); a single-queue
    /// tap's one queue is always attached.
    fn set_enabled(&mut self, enabled: bool) -> io::Result<()> {
        if enabled == self.attached || !self.multi_queue {
            return Ok(());
        }
        let flags = if enabled {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        };
        let mut req = if_req(&self.name, flags);
        // SAFETY: `file` is a tap queue's fd and `req` a valid `struct ifreq` that outlives
        // the call; the kernel reads its flags.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, TUNSETQUEUE(), &mut req) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        self.attached = enabled;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux() {
        assert_eq!(TUNSETIFF(), 0x4004_54ca);
        assert_eq!(TUNSETOFFLOAD(), 0x4004_54d0);
        assert_eq!(TUNSETVNETHDRSZ(), 0x4004_54d8);
        assert_eq!(TUNSETQUEUE(), 0x4004_54d9);
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn invalid_names_are_refused() {
        for name in ["", "a/b", "..", "sixteen-chars-xx", "nul\0"] {
            assert!(
                matches!(Tap::open(name), Err(TapError::InvalidName(_))),
                "{name:?}"
            );
        }
    }

    #[test]
    fn a_missing_tap_is_a_clear_error() {
        let err = Tap::open("notap-xyz0").unwrap_err();
        assert!(matches!(err, TapError::NotFound(_)));
        assert_eq!(
            err.to_string(),
            "there is no network interface named \"notap-xyz0\"; create the tap first"
        );
    }

    /// Runs `f` on a thread of its own in a new, empty network namespace, so that the tap it
    /// creates is seen by nothing else and vanishes with the namespace. Needs root, as the
    /// test command runs.
    fn in_private_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| {
                        panic!(
                            "this test makes a tap in a network namespace of its own and \
                                 needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN): unshare: {e}"
                        )
                    });
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Runs `ip args` (iproute2) in the calling thread's network namespace.
    fn ip(args: &[&str]) {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("ip (iproute2)");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The tap `vmmtap0`, made, attached, at 10.213.0.1/24 and up (inside a private
    /// namespace).
    fn addressed_tap() -> Tap {
        ip(&["tuntap", "add", "dev", "vmmtap0", "mode", "tap"]);
        let tap = Tap::open("vmmtap0").unwrap();
        ip(&["addr", "add", "10.213.0.1/24", "dev", "vmmtap0"]);
        ip(&["link", "set", "vmmtap0", "up"]);
        tap
    }

    /// Attaches to a tap, sets offloads, finds nothing queued on it, and refuses a second
    /// attachment: a single-queue tap is busy while the first one holds it.
    #[test]
    fn attaches_to_a_tap_once() {
        in_private_netns(|| {
            ip(&["tuntap", "add", "dev", "vmmtap0", "mode", "tap"]);
            let mut tap = Tap::open("vmmtap0").unwrap();
            tap.set_offload(offload::CSUM | offload::TSO4 | offload::TSO6)
                .unwrap();
            let mut buf = [0u8; 128];
            let err = tap.read_frame(&mut buf).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
            assert!(tap.raw_fd().is_some());
            let busy = Tap::open("vmmtap0").unwrap_err();
            assert!(matches!(busy, TapError::Attach { .. }), "{busy:?}");
            // An interface that is not a tap is refused too.
            let lo = Tap::open("lo").unwrap_err();
            assert!(matches!(lo, TapError::Attach { .. }), "{lo:?}");
        });
    }

    /// A multi-queue tap takes one file per queue; a queue detaches and attaches again (each
    /// twice: both are idempotent, where the kernel refuses a second one). A tap with one queue
    /// refuses more with an error that says how to make one that takes them, and a multi-queue
    /// tap also takes a single-queue device.
    #[test]
    fn attaches_the_queues_of_a_multi_queue_tap() {
        in_private_netns(|| {
            ip(&["tuntap", "add", "dev", "vmmtap1", "mode", "tap"]);
            let err = Tap::open_queues("vmmtap1", 2).unwrap_err();
            assert!(matches!(err, TapError::NotMultiQueue(_)), "{err:?}");
            assert!(err.to_string().contains("multi_queue"), "{err}");

            ip(&[
                "tuntap",
                "add",
                "dev",
                "vmmtap0",
                "mode",
                "tap",
                "multi_queue",
            ]);
            let mut queues = Tap::open_queues("vmmtap0", 3).unwrap();
            assert_eq!(queues.len(), 3);
            let mut buf = [0u8; 64];
            for _ in 0..2 {
                queues[2].set_enabled(false).unwrap();
            }
            for _ in 0..2 {
                queues[2].set_enabled(true).unwrap();
            }
            let err = queues[2].read_frame(&mut buf).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
            queues[0].set_offload(offload::CSUM).unwrap();
            drop(queues);
            assert!(Tap::open("vmmtap0").is_ok());
        });
    }

    /// With the tap up and addressed, a datagram the host sends to a neighbour on its subnet
    /// makes it ask for that neighbour's MAC: the ARP request arrives behind the 12-byte
    /// virtio-net header, broadcast, with its EtherType right after the two MAC addresses.
    #[test]
    fn reads_frames_behind_a_12_byte_header() {
        in_private_netns(|| {
            let mut tap = addressed_tap();
            let socket = std::net::UdpSocket::bind("10.213.0.1:0").unwrap();
            let mut buf = [0u8; 2048];
            for attempt in 0..300 {
                if attempt % 20 == 0 {
                    // The first may go before the link is running; ARP retries on its own too.
                    let _ = socket.send_to(b"hello", "10.213.0.2:9");
                }
                match tap.read_frame(&mut buf) {
                    Ok(n) => {
                        let frame = &buf[VNET_HDR_LEN..n];
                        if frame.len() >= 42 && frame[12..14] == [0x08, 0x06] {
                            assert_eq!(frame[..6], [0xff; 6], "an ARP request is broadcast");
                            // Target protocol address: 10.213.0.2.
                            assert_eq!(frame[38..42], [10, 213, 0, 2]);
                            return;
                        }
                    }
                    Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            panic!("no ARP request for 10.213.0.2 came out of the tap in 3 s");
        });
    }

    /// A datagram the host sends to a neighbour comes out of the tap into the guest buffers
    /// given, in order, and what does not fit them into the overflow buffer.
    #[test]
    fn reads_a_frame_into_guest_buffers_and_the_rest_into_overflow() {
        use vm_memory::Bytes;
        in_private_netns(|| {
            let mut tap = addressed_tap();
            // A known neighbour: the datagram goes out at once, with no ARP request first.
            ip(&[
                "neigh",
                "add",
                "10.213.0.2",
                "lladdr",
                "52:54:00:00:00:02",
                "dev",
                "vmmtap0",
            ]);
            let socket = std::net::UdpSocket::bind("10.213.0.1:0").unwrap();
            let payload: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
            // The header alone, then 40 bytes: Ethernet, IP and most of the UDP header.
            let buffers = [(GuestAddress(0x1000), 12), (GuestAddress(0x3000), 40)];
            let mut overflow = [0u8; 2048];
            for attempt in 0..300 {
                if attempt % 20 == 0 {
                    socket.send_to(&payload, "10.213.0.2:9").unwrap();
                }
                let n = match tap.read_frame_into(&mem, &buffers, &mut overflow) {
                    Ok(n) => n,
                    Err(e) => {
                        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        continue;
                    }
                };
                let mut eth_ip = [0u8; 40];
                mem.read_slice(&mut eth_ip, GuestAddress(0x3000)).unwrap();
                // IPv4 carrying UDP; anything else (IPv6 neighbour discovery) is skipped.
                if eth_ip[12..14] != [0x08, 0x00] || eth_ip[23] != 17 {
                    continue;
                }
                assert_eq!(n, 12 + 14 + 20 + 8 + payload.len());
                assert_eq!(eth_ip[..6], [0x52, 0x54, 0, 0, 0, 2]);
                // The second buffer ends inside the UDP header (destination port at 36); the
                // overflow buffer holds the rest: the UDP checksum, then the payload.
                assert_eq!(eth_ip[36..38], 9u16.to_be_bytes());
                assert_eq!(&overflow[2..n - 52], &payload[..]);
                return;
            }
            panic!("no datagram for 10.213.0.2 came out of the tap in 3 s");
        });
    }

    /// A UDP datagram from 10.213.0.2:5009 to 10.213.0.1:5009 carrying `payload`, as the guest
    /// hands it over: header, then the Ethernet frame (broadcast destination).
    fn udp_frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend([0xff; 6]);
        f.extend([0x52, 0x54, 0, 0, 0, 2, 0x08, 0x00]);
        let ip_len = (20 + 8 + payload.len()) as u16;
        let mut ip = vec![0x45, 0];
        ip.extend(ip_len.to_be_bytes());
        ip.extend([0, 0, 0x40, 0, 64, 17, 0, 0, 10, 213, 0, 2, 10, 213, 0, 1]);
        let mut sum: u32 = ip
            .chunks(2)
            .map(|w| u32::from(w[0]) << 8 | u32::from(w[1]))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        f.extend(ip);
        f.extend(5009u16.to_be_bytes());
        f.extend(5009u16.to_be_bytes());
        f.extend((8 + payload.len() as u16).to_be_bytes());
        f.extend([0, 0]);
        f.extend(payload);
        f
    }

    #[test]
    fn writes_a_frame_from_scattered_guest_buffers() {
        use vm_memory::Bytes;
        in_private_netns(|| {
            let mut tap = addressed_tap();
            let socket = std::net::UdpSocket::bind("10.213.0.1:5009").unwrap();
            socket
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            // Two adjacent regions: a buffer across their boundary is gathered by copying.
            let mem = GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 0x10000),
                (GuestAddress(0x10000), 0x10000),
            ])
            .unwrap();
            let mut scratch = Vec::new();
            for (payload, cuts) in [
                (
                    &b"straight from three buffers"[..],
                    [0x1000, 0x3000, 0x8000],
                ),
                (
                    &b"one across two memory regions"[..],
                    [0x1000, 0xfff0, 0x12000],
                ),
            ] {
                let frame = udp_frame(payload);
                // Header alone; Ethernet and IP headers; the rest.
                let pieces = [
                    &frame[..VNET_HDR_LEN],
                    &frame[VNET_HDR_LEN..46],
                    &frame[46..],
                ];
                let buffers: Vec<(GuestAddress, u32)> = pieces
                    .iter()
                    .zip(cuts)
                    .map(|(piece, at)| {
                        mem.write_slice(piece, GuestAddress(at)).unwrap();
                        (GuestAddress(at), piece.len() as u32)
                    })
                    .collect();
                tap.write_frame_from(&mem, &buffers, &mut scratch).unwrap();
                let mut buf = [0u8; 256];
                let n = socket
                    .recv(&mut buf)
                    .expect("the datagram reached the host's socket");
                assert_eq!(&buf[..n], payload);
            }
            // A buffer outside guest memory is refused, not read, and said to be the guest's.
            let e = tap
                .write_frame_from(&mem, &[(GuestAddress(0x30000), 64)], &mut scratch)
                .unwrap_err();
            assert!(matches!(e, SendError::Buffer), "{e}");
        });
    }

    /// Frames staged on io_uring go out at `send_staged`, in order, and not before; a frame
    /// that cannot be staged (a buffer across two memory regions, a full batch) goes out at
    /// once after those staged before it, and one outside guest memory is refused.
    #[test]
    fn staged_frames_go_out_in_order_at_send() {
        use vm_memory::Bytes;
        in_private_netns(|| {
            let mut tap = addressed_tap();
            let socket = std::net::UdpSocket::bind("10.213.0.1:5009").unwrap();
            socket.set_nonblocking(true).unwrap();
            assert_eq!(
                tap.staging_capacity(),
                TX_BATCH,
                "this host offers no io_uring for the tap: {:?}",
                tap.tx.as_ref().err()
            );
            let mem = GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 0x10000),
                (GuestAddress(0x10000), 0x10000),
            ])
            .unwrap();
            // Each frame in a buffer of its own, 0x100 apart; frame 40 across the regions.
            let place = |i: u64, frame: &[u8]| {
                let at = if i == 40 { 0xfff0 } else { 0x1000 + 0x100 * i };
                mem.write_slice(frame, GuestAddress(at)).unwrap();
                [(GuestAddress(at), frame.len() as u32)]
            };
            let mut scratch = Vec::new();
            let mut refused = Vec::new();
            let mut stage = |tap: &mut Tap, i: u64, refused: &mut Vec<String>| {
                let buffers = place(i, &udp_frame(format!("frame {i}").as_bytes()));
                tap.stage_frame_from(&mem, &buffers, &mut scratch, &mut |e| {
                    refused.push(e.to_string())
                })
            };
            let received = |socket: &std::net::UdpSocket| {
                let mut got = Vec::new();
                let mut buf = [0u8; 256];
                for _ in 0..200 {
                    match socket.recv(&mut buf) {
                        Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock && !got.is_empty() => break,
                        Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                    }
                }
                got
            };
            let names = |range: std::ops::Range<u64>| -> Vec<String> {
                range.map(|i| format!("frame {i}")).collect()
            };

            for i in 0..3 {
                stage(&mut tap, i, &mut refused).unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            let mut buf = [0u8; 256];
            assert_eq!(
                socket.recv(&mut buf).unwrap_err().kind(),
                io::ErrorKind::WouldBlock,
                "a staged frame went out before send_staged"
            );
            tap.send_staged(&mut |e| refused.push(e.to_string()));
            assert_eq!(received(&socket), names(0..3));

            // A full batch is sent before the frame after it; that one goes out at once.
            for i in 3..3 + TX_BATCH as u64 + 1 {
                stage(&mut tap, i, &mut refused).unwrap();
            }
            assert_eq!(received(&socket), names(3..3 + TX_BATCH as u64 + 1));
            // A frame across two regions waits for the one staged before it, then goes.
            stage(&mut tap, 39, &mut refused).unwrap();
            stage(&mut tap, 40, &mut refused).unwrap();
            assert_eq!(received(&socket), names(39..41));
            // Outside guest memory: refused, after the frame staged before it went out.
            stage(&mut tap, 41, &mut refused).unwrap();
            let e = tap
                .stage_frame_from(
                    &mem,
                    &[(GuestAddress(0x30000), 64)],
                    &mut Vec::new(),
                    &mut |e| refused.push(e.to_string()),
                )
                .unwrap_err();
            assert!(matches!(e, SendError::Buffer), "{e}");
            assert_eq!(received(&socket), names(41..42));
            assert!(refused.is_empty(), "{refused:?}");
        });
    }

    /// Without io_uring (a host that has none, or a ring that failed) each staged frame goes
    /// out at once, as one `writev`.
    #[test]
    fn without_io_uring_frames_go_out_as_they_are_staged() {
        use vm_memory::Bytes;
        in_private_netns(|| {
            let mut tap = addressed_tap();
            tap.tx = Err("none in this test".into());
            let socket = std::net::UdpSocket::bind("10.213.0.1:5009").unwrap();
            socket
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            assert_eq!(tap.staging_capacity(), 1);
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
            let mut buf = [0u8; 256];
            for i in 0..3u64 {
                let frame = udp_frame(format!("frame {i}").as_bytes());
                let at = GuestAddress(0x1000 * (i + 1));
                mem.write_slice(&frame, at).unwrap();
                tap.stage_frame_from(
                    &mem,
                    &[(at, frame.len() as u32)],
                    &mut Vec::new(),
                    &mut |e| panic!("{e}"),
                )
                .unwrap();
                let n = socket.recv(&mut buf).expect("the frame went out at once");
                assert_eq!(&buf[..n], format!("frame {i}").as_bytes());
            }
            tap.send_staged(&mut |e| panic!("{e}"));
        });
    }
}
