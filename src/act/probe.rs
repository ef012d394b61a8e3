/*!
The health probe around a NOTRACK change: does a local TCP service still answer?

A firewall that drops untracked packets (`ct state untracked drop`, or an iptables INPUT
chain whose `-m state` accept list lacks `UNTRACKED` before a final REJECT, as in the
seeds' example) turns a NOTRACK into an outage for that port. So the caller probes the
port just before and just after the change and reverts at once when it answered before
and not after ([`ProbeResult::broke_service`]).

The probe connects from inside the target namespace to the address the port's listener
is bound to, found in the namespace's socket tables ([`TcpProbe::service`]): a service
bound only to `192.0.2.10:80` or `[::1]:80` is probed there, a wildcard one over loopback.
That traffic stays on `lo`, so it passes the same `input` filters as remote clients only
when those filters do not exempt `lo`; the probe catches what it can see, and a probe that
did not answer before proves nothing.
*/

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;
use tracing::warn;

/// Long enough for a loopback handshake, shorter than the first SYN retransmission (1 s),
/// so a dropped SYN reads as "no answer".
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

/// What the probe saw around one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeResult {
    pub answered_before: bool,
    pub answered_after: bool,
}

impl ProbeResult {
    /// The change cut off a service that was answering: revert it now.
    pub fn broke_service(&self) -> bool {
        self.answered_before && !self.answered_after
    }
}

/// Probes one TCP address in one network namespace.
#[derive(Debug, Clone)]
pub struct TcpProbe {
    /// `None`: ctguard's own namespace.
    pub netns: Option<PathBuf>,
    pub addr: SocketAddr,
    pub timeout: Duration,
}

impl TcpProbe {
    /// A probe of `127.0.0.1:port` with the default timeout.
    pub fn loopback(netns: Option<PathBuf>, port: u16) -> TcpProbe {
        TcpProbe {
            netns,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// A probe of the address `port`'s TCP listener is bound to in `netns` (see
    /// [`probe_address`]); of `127.0.0.1:port` when none listens or the socket tables
    /// cannot be read (logged).
    pub fn service(netns: Option<PathBuf>, port: u16) -> TcpProbe {
        let read = || -> io::Result<Vec<SocketAddr>> {
            let mut all = Vec::new();
            for path in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
                match File::open(path) {
                    Ok(file) => all.extend(listeners(BufReader::new(file), path)?),
                    // No IPv6 in this kernel (ipv6.disable=1): no IPv6 listeners.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io::Error::new(e.kind(), format!("{path}: {e}"))),
                }
            }
            Ok(all)
        };
        let listening = match &netns {
            Some(ns) => crate::netns::run_in(ns, read).and_then(|r| r),
            None => read(),
        }
        .unwrap_or_else(|e| {
            warn!(port, error = %e, "cannot read the socket tables; probing 127.0.0.1");
            Vec::new()
        });
        TcpProbe {
            addr: probe_address(&listening, port),
            ..TcpProbe::loopback(netns, port)
        }
    }

    /// Whether a listener accepted a connection within the timeout. A refusal, a timeout
    /// or an unreachable address is `Ok(false)`; `Err` only when the namespace cannot be
    /// entered.
    pub fn answers(&self) -> io::Result<bool> {
        let connect = || TcpStream::connect_timeout(&self.addr, self.timeout).is_ok();
        match &self.netns {
            Some(ns) => crate::netns::run_in(ns, connect),
            None => Ok(connect()),
        }
    }

    /// Probes, makes `change`, probes again. When the first probe cannot run, the change is
    /// not made (`Err`); when the second cannot, the change was made and
    /// [`Around::probe`] holds the error, so the caller always learns what happened.
    pub fn around<T, E>(&self, change: impl FnOnce() -> Result<T, E>) -> io::Result<Around<T, E>> {
        let answered_before = self.answers()?;
        let outcome = change();
        let answered_after = self.answers();
        Ok(Around {
            outcome,
            probe: answered_after.map(|answered_after| ProbeResult {
                answered_before,
                answered_after,
            }),
        })
    }
}

/// The address to probe `port` at, given the TCP listening sockets: one the listener is
/// bound to (IPv4 first; a wildcard one stands for loopback of its family), or
/// `127.0.0.1:port` when nothing listens on `port`.
pub fn probe_address(listening: &[SocketAddr], port: u16) -> SocketAddr {
    let mut candidates: Vec<IpAddr> = listening
        .iter()
        .filter(|a| a.port() == port)
        .map(|a| match a.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        })
        .collect();
    candidates.sort_by_key(|ip| (ip.is_ipv6(), !ip.is_loopback()));
    SocketAddr::new(
        candidates
            .first()
            .copied()
            .unwrap_or(Ipv4Addr::LOCALHOST.into()),
        port,
    )
}

/// The listening sockets' local addresses in a socket table (`/proc/net/tcp` or `tcp6`).
/// The kernel lists listening sockets first, so reading stops at the first other state
/// (a busy server's established connections would be megabytes). `file` names the table
/// in errors.
pub fn listeners(table: impl BufRead, file: &str) -> io::Result<Vec<SocketAddr>> {
    let mut found = Vec::new();
    for (n, line) in table.lines().enumerate().skip(1) {
        let line = line?;
        let invalid = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{file}:{}: expected {what}, found {line:?}", n + 1),
            )
        };
        let fields: Vec<&str> = line.split_whitespace().take(4).collect();
        let [_, local, _, state] = fields[..] else {
            return Err(invalid("\"sl local_address rem_address st …\""));
        };
        // TCP_LISTEN is 10.
        if state != "0A" {
            break;
        }
        found.push(socket_address(local).ok_or_else(|| {
            invalid("a local address as hex ADDRESS:PORT (8 or 32 hex digits, then 4)")
        })?);
    }
    Ok(found)
}

/// One `ADDRESS:PORT` of a socket table: the address is the raw network-order bytes
/// printed as native-endian 32-bit words (`%08X` each), the port a plain hex number.
fn socket_address(text: &str) -> Option<SocketAddr> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    if !address.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let words = |n: usize| -> Option<Vec<[u8; 4]>> {
        (address.len() == 8 * n).then_some(())?;
        (0..n)
            .map(|i| {
                u32::from_str_radix(&address[8 * i..8 * (i + 1)], 16)
                    .ok()
                    .map(u32::to_ne_bytes)
            })
            .collect()
    };
    let ip = if let Some(w) = words(1) {
        IpAddr::V4(Ipv4Addr::from(w[0]))
    } else {
        let w = words(4)?;
        let bytes: [u8; 16] = w.concat().try_into().ok()?;
        IpAddr::V6(Ipv6Addr::from(bytes))
    };
    Some(SocketAddr::new(ip, port))
}

/// A change made between two probes.
#[derive(Debug)]
pub struct Around<T, E> {
    /// What the change returned.
    pub outcome: Result<T, E>,
    /// What the probes saw (an error if the second one could not run).
    pub probe: io::Result<ProbeResult>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn only_answered_then_silent_is_broken() {
        let r = |answered_before, answered_after| ProbeResult {
            answered_before,
            answered_after,
        };
        assert!(r(true, false).broke_service());
        assert!(!r(true, true).broke_service());
        assert!(!r(false, false).broke_service());
        assert!(!r(false, true).broke_service());
    }

    #[test]
    fn around_sees_a_listener_go_away() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let probe = TcpProbe::loopback(None, listener.local_addr().unwrap().port());
        let around = probe
            .around(|| -> Result<(), io::Error> {
                drop(listener);
                Ok(())
            })
            .unwrap();
        around.outcome.unwrap();
        assert!(around.probe.unwrap().broke_service());
    }

    fn fixture(name: &str) -> String {
        let path = format!("{}/tests/fixtures/proc/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn listeners_are_read_from_the_kernels_socket_tables() {
        let mut all = listeners(fixture("net_tcp_6.18.txt").as_bytes(), "tcp").unwrap();
        all.extend(listeners(fixture("net_tcp6_6.18.txt").as_bytes(), "tcp6").unwrap());
        let expected: Vec<SocketAddr> = [
            "192.0.2.10:8080",
            "127.0.0.1:5432",
            "0.0.0.0:22",
            "[::1]:6379",
            "[2001:db8::10]:8443",
            "[::]:22",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        // The established connections after them are not listeners.
        assert_eq!(all, expected);

        let probed = |port| probe_address(&all, port).to_string();
        assert_eq!(probed(8080), "192.0.2.10:8080");
        assert_eq!(probed(6379), "[::1]:6379");
        assert_eq!(probed(8443), "[2001:db8::10]:8443");
        // Wildcards: over loopback, IPv4 first.
        assert_eq!(probed(22), "127.0.0.1:22");
        assert_eq!(probed(80), "127.0.0.1:80");
    }

    #[test]
    fn a_malformed_socket_table_names_the_file_and_line() {
        let header = "  sl  local_address rem_address   st\n";
        for line in [
            "   0: 0100007G:1538 00000000:0000 0A",
            "   0: 0100007F 00000000:0000 0A",
            "   0: 0100007F:15380 00000000:0000 0A",
            "   0: 0100007F00:1538 00000000:0000 0A",
            "   0: 0100007F:1538",
            "   0: +100007F:1538 00000000:0000 0A",
        ] {
            let text = format!("{header}{line}\n");
            let err = listeners(text.as_bytes(), "/proc/net/tcp").unwrap_err();
            assert!(
                err.to_string().starts_with("/proc/net/tcp:2: expected "),
                "{err}"
            );
        }
    }

    #[test]
    fn a_missing_namespace_is_an_error_not_a_silent_port() {
        let probe = TcpProbe {
            netns: Some(PathBuf::from("/nonexistent/netns")),
            ..TcpProbe::loopback(None, 1)
        };
        let err = probe.answers().unwrap_err();
        assert!(err.to_string().contains("/nonexistent/netns"), "{err}");
    }
}
