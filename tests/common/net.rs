//! Host-side networking for guest tests: TAP devices made for one test.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// Runs a host command, panicking with its output if it fails.
pub fn host(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?} failed:\n{text}");
    text
}

/// A TAP device made for one test, with the host's address on a /24 of its own; removed on
/// drop (also when the test fails).
pub struct HostTap {
    pub name: String,
    /// The /24 as its first three octets; the host is .1, the guest .2.
    pub net: [u8; 3],
}

impl HostTap {
    /// TAP number `n` of this test process, on 10.`n`.`pid % 250`.0/24.
    pub fn new(n: u8) -> Self {
        Self::make(n, false)
    }

    /// The same, multi-queue (`ip tuntap add ... multi_queue`): one whose queue a migrating
    /// VMM can detach for the destination to attach its own.
    pub fn multi_queue(n: u8) -> Self {
        Self::make(n, true)
    }

    fn make(n: u8, multi_queue: bool) -> Self {
        let pid = std::process::id();
        let name = format!("fvt{}n{n}", pid % 1000);
        let net = [10, n, (pid % 250) as u8];
        // A TAP left over from a killed run with the same pid.
        let _ = Command::new("ip")
            .args(["link", "del", &name])
            .stderr(Stdio::null())
            .status();
        let mut add = vec!["tuntap", "add", &name, "mode", "tap"];
        if multi_queue {
            add.push("multi_queue");
        }
        host("ip", &add);
        let tap = Self { name, net };
        host(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", tap.host_ip()),
                "dev",
                &tap.name,
            ],
        );
        host("ip", &["link", "set", &tap.name, "up"]);
        tap
    }

    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], 1)
    }

    pub fn guest_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], 2)
    }

    /// The guest commands that configure `dev` for this TAP's subnet.
    pub fn guest_setup(&self, dev: &str) -> String {
        format!(
            "ip addr add {}/24 dev {dev} && ip link set {dev} up",
            self.guest_ip()
        )
    }

    /// The --net value for this TAP.
    pub fn flag(&self) -> String {
        format!("tap={}", self.name)
    }

    /// A counter of the host side of the TAP (rx_packets: frames the guest sent).
    pub fn stat(&self, which: &str) -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{}/statistics/{which}", self.name))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        // Quiet: a test may have deleted it already.
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}
