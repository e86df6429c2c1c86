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
use std::path::Path;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_iow_nr;

use super::net::NetBackend;

/// `IFNAMSIZ`, including the terminating NUL.
const IFNAMSIZ: usize = 16;
const TUNTAP: u32 = 0x54;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, ::std::os::raw::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, ::std::os::raw::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, ::std::os::raw::c_int);

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

/// `TUNSETOFFLOAD` flags: what the tap may hand us (checksum-less and segmentation-offloaded
/// frames), set from what the guest driver accepts.
pub mod offload {
    pub const CSUM: u32 = 0x01;
    pub const TSO4: u32 = 0x02;
    pub const TSO6: u32 = 0x04;
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
        if !Path::new("/sys/class/net").join(name).exists() {
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

    /// Attaches to a real tap named by `VMM_TEST_TAP` (e.g. after `ip tuntap add dev
    /// vmmtap0 mode tap`), and sets offloads.
    #[test]
    #[ignore = "needs a tap interface named in VMM_TEST_TAP"]
    fn attaches_to_a_real_tap() {
        let name = std::env::var("VMM_TEST_TAP").unwrap();
        let mut tap = Tap::open(&name).unwrap();
        tap.set_offload(offload::CSUM | offload::TSO4 | offload::TSO6)
            .unwrap();
        let mut buf = [0u8; 128];
        // Nothing queued on a fresh (down) tap: the read does not block.
        let err = tap.read_frame(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(tap.raw_fd().is_some());
    }

    /// With the tap in `VMM_TEST_TAP` up and the host sending to it (e.g. `ip addr add
    /// 10.213.0.1/24 dev vmmtap0; ip link set vmmtap0 up`, then a UDP datagram to 10.213.0.2
    /// every 200 ms), frames arrive behind a 12-byte header: the host's ARP request has its
    /// EtherType right after the two MAC addresses.
    #[test]
    #[ignore = "needs a tap interface named in VMM_TEST_TAP, up, with host traffic"]
    fn reads_frames_behind_a_12_byte_header() {
        let name = std::env::var("VMM_TEST_TAP").unwrap();
        let mut tap = Tap::open(&name).unwrap();
        let mut buf = [0u8; 2048];
        for _ in 0..300 {
            match tap.read_frame(&mut buf) {
                Ok(n) => {
                    let ethertype = [buf[VNET_HDR_LEN + 12], buf[VNET_HDR_LEN + 13]];
                    if ethertype == [0x08, 0x06] {
                        assert!(n >= VNET_HDR_LEN + 42);
                        assert_eq!(&buf[VNET_HDR_LEN..VNET_HDR_LEN + 6], [0xff; 6]);
                        return;
                    }
                }
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("no ARP request from the host");
    }
}
