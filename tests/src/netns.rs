//! Network namespaces for the network tests: the VMM and a tap live in a namespace the test
//! creates, so no packet the guest sends can leave it.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::process::Command;

use nix::sched::{setns, CloneFlags};

/// A network namespace holding a tap with the host's address: the VMM runs inside it, so no
/// packet the guest sends leaves it. Deleting the namespace (on drop) deletes the tap.
pub struct NetNs {
    name: String,
    tap: String,
}

/// The largest MTU of a tap: 65,535 bytes less its Ethernet header (Linux's `tun` driver).
pub const TAP_MAX_MTU: u32 = 65_521;

/// Runs `ip args`, asserting that it succeeded (the test command runs as root).
fn ip(args: &[&str]) {
    let out = Command::new("ip")
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

impl NetNs {
    /// The namespace's name, for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tap device inside it.
    pub fn tap(&self) -> &str {
        &self.tap
    }

    /// Creates namespace `name` with loopback up and tap `tap` addressed `host_ip`/24.
    pub fn new(name: &str, tap: &str, host_ip: Ipv4Addr) -> NetNs {
        Self::with_tap(name, tap, host_ip, &[])
    }

    /// [`new`](Self::new) with a multi-queue tap (`--net tap=NAME,queues=N`).
    pub fn new_multi_queue(name: &str, tap: &str, host_ip: Ipv4Addr) -> NetNs {
        Self::with_tap(name, tap, host_ip, &["multi_queue"])
    }

    fn with_tap(name: &str, tap: &str, host_ip: Ipv4Addr, tap_flags: &[&str]) -> NetNs {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        let netns = NetNs {
            name: name.to_string(),
            tap: tap.to_string(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"]);
        let mut add = vec!["-n", name, "tuntap", "add", "dev", tap, "mode", "tap"];
        add.extend_from_slice(tap_flags);
        ip(&add);
        ip(&[
            "-n",
            name,
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            tap,
        ]);
        ip(&["-n", name, "link", "set", tap, "up"]);
        netns
    }

    /// Runs `f` on a thread that joined the namespace, and returns what it made: a socket stays in
    /// the namespace it was made in, whichever thread uses it afterwards.
    pub fn inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns into the test's namespace");
            f()
        })
        .join()
        .unwrap()
    }

    /// Sets the tap's MTU: [`TAP_MAX_MTU`] lets the host send the largest frames a tap passes.
    pub fn set_mtu(&self, mtu: u32) {
        ip(&[
            "-n",
            &self.name,
            "link",
            "set",
            &self.tap,
            "mtu",
            &mtu.to_string(),
        ]);
    }

    /// `count` TCP listeners on `ip`, inside the namespace.
    pub fn listeners(&self, ip: Ipv4Addr, count: usize) -> Vec<TcpListener> {
        self.inside(move || {
            (0..count)
                .map(|_| TcpListener::bind(SocketAddrV4::new(ip, 0)).unwrap())
                .collect()
        })
    }

    /// A counter of the tap's statistics (`rx_packets`: frames the VMM wrote into the tap), read
    /// from the namespace's sysfs (`ip netns exec` mounts its own).
    pub fn tap_counter(&self, counter: &str) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat"])
            .arg(format!("/sys/class/net/{}/statistics/{counter}", self.tap))
            .output()
            .expect("ip netns exec cat");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("tap counter {counter}: {out:?}"))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
