//! A bounded load generator that fills a conntrack table with UDP flows on loopback.
//!
//! Each datagram goes from one socket to a distinct (127.x.y.z, port) pair, so each one
//! makes a new conntrack entry. Only loopback addresses are ever targeted, and the caller
//! is expected to run it inside a scratch network namespace (see [`crate::netns::run_in`]);
//! it stops after `max_datagrams` or at `deadline`, whichever comes first.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Instant;

/// What a run of [`fill_udp`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadReport {
    /// Datagrams the kernel accepted.
    pub sent: u64,
    /// Sends that failed (with a full table, the kernel drops on output: EPERM).
    pub failed: u64,
}

/// The loopback destination of the `n`th flow: ports 1024..=65023 on 127.1.0.1, then the
/// next address, so flows never repeat within 16 million datagrams.
pub fn flow_target(n: u64) -> SocketAddrV4 {
    const PORTS: u64 = 64_000;
    let port = 1024 + (n % PORTS) as u16;
    let host = (n / PORTS) as u32 + 1;
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 0)) + (host & 0x00fe_ffff));
    SocketAddrV4::new(ip, port)
}

/// Sends up to `max_datagrams` UDP datagrams to distinct loopback flows, starting at flow
/// number `first_flow`, until `deadline`.
pub fn fill_udp(first_flow: u64, max_datagrams: u64, deadline: Instant) -> io::Result<LoadReport> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let mut report = LoadReport { sent: 0, failed: 0 };
    for n in first_flow..first_flow.saturating_add(max_datagrams) {
        if n % 1024 == 0 && Instant::now() >= deadline {
            break;
        }
        match socket.send_to(b"ctguard", flow_target(n)) {
            Ok(_) => report.sent += 1,
            Err(_) => report.failed += 1,
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_loopback_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for n in (0..300_000).step_by(7) {
            let t = flow_target(n);
            assert!(t.ip().is_loopback(), "{t}");
            assert!(seen.insert(t), "repeated {t}");
        }
        assert!(flow_target(u32::MAX as u64 * 64).ip().is_loopback());
    }
}
