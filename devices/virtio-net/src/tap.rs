//! A host tap interface as the backend of virtio-net (Linux `Documentation/networking/tuntap.rst`).
//!
//! The VMM names an existing tap (created and bridged by the host's network set-up, e.g.
//! `ip tuntap add dev tap0 mode tap`); we attach to it with `TUNSETIFF` as `IFF_TAP |
//! IFF_NO_PI | IFF_VNET_HDR`, so every frame carries a virtio-net header, and set that header to
//! the 12 bytes of `struct virtio_net_hdr_v1` so frames move between tap and guest unchanged.
//! We never create an interface: `TUNSETIFF` on a missing name would create a private one that
//! nobody bridged, and the guest would have a link to nowhere.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::{NetBackend, SendError};

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
}
use ioctl_nr::{TUNSETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ};

const IFF_TAP: i16 = 0x0002;
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
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing tap interface `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
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
            file,
            name: name.into(),
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
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut iov = [empty; crate::MAX_TX_BUFFERS];
        let mut total = 0usize;
        for (i, &(addr, len)) in buffers.iter().enumerate() {
            let (Ok(slice), Some(entry)) = (mem.get_slice(addr, len as usize), iov.get_mut(i))
            else {
                // A buffer across two memory regions (or outside them), or more buffers than
                // the array holds: rare enough for the copy, which also tells which it was.
                crate::gather_frame(mem, buffers.iter().copied(), scratch)?;
                return Ok(self.write_frame(scratch)?);
            };
            *entry = libc::iovec {
                iov_base: slice.ptr_guard().as_ptr() as *mut libc::c_void,
                iov_len: slice.len(),
            };
            total += slice.len();
        }
        // SAFETY: every iovec points into a mapping of guest memory that `mem` keeps mapped
        // for the call (the slice's pointer guard only carries the address for plain mmap'ed
        // regions); writev only reads the memory, and the first `buffers.len()` entries of
        // `iov` are set.
        let n = unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                iov.as_ptr(),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux() {
        assert_eq!(TUNSETIFF(), 0x4004_54ca);
        assert_eq!(TUNSETOFFLOAD(), 0x4004_54d0);
        assert_eq!(TUNSETVNETHDRSZ(), 0x4004_54d8);
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

    /// With the tap up and addressed, a datagram the host sends to a neighbour on its subnet
    /// makes it ask for that neighbour's MAC: the ARP request arrives behind the 12-byte
    /// virtio-net header, broadcast, with its EtherType right after the two MAC addresses.
    #[test]
    fn reads_frames_behind_a_12_byte_header() {
        in_private_netns(|| {
            ip(&["tuntap", "add", "dev", "vmmtap0", "mode", "tap"]);
            let mut tap = Tap::open("vmmtap0").unwrap();
            ip(&["addr", "add", "10.213.0.1/24", "dev", "vmmtap0"]);
            ip(&["link", "set", "vmmtap0", "up"]);
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
            ip(&["tuntap", "add", "dev", "vmmtap0", "mode", "tap"]);
            let mut tap = Tap::open("vmmtap0").unwrap();
            ip(&["addr", "add", "10.213.0.1/24", "dev", "vmmtap0"]);
            ip(&["link", "set", "vmmtap0", "up"]);
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
}
