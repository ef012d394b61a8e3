//! A bounded load generator that fills a conntrack table with new flows on loopback.
//!
//! Two kinds of flow, each making one conntrack entry:
//! - UDP: one datagram from one socket to a distinct (127.x.y.z, port) pair;
//! - TCP: one connection from a distinct source address in 127.2.0.0/15 to a listener on
//!   127.0.0.1 that the generator runs itself, accepted and then reset (so no socket
//!   lingers in TIME_WAIT; the conntrack entry stays, as a closed flow's does).
//!
//! Only loopback addresses are ever used, and the caller is expected to run it inside a
//! scratch network namespace (see [`crate::netns::run_in`]). A [`Load`] is bounded in
//! count and time, may be paced (flows per second), and stops early when asked.

use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, getsockopt, listen, setsockopt, socket, sockopt,
};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Which kind of flow a load makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Udp,
    Tcp,
}

/// A bounded load: at most `flows` new flows, numbered from `first_flow`, until
/// `deadline`; the first `burst` as fast as the kernel takes them, the rest at `rate`
/// flows per second (`None`: all as fast as possible).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub protocol: Protocol,
    pub first_flow: u64,
    pub flows: u64,
    pub burst: u64,
    pub rate: Option<u64>,
    pub deadline: Instant,
}

/// What a run of a [`Load`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadReport {
    /// Flows the kernel accepted (datagrams sent, connections established).
    pub sent: u64,
    /// Flows that failed (with a full table, the kernel drops on output: a send fails
    /// with EPERM, a connection attempt times out).
    pub failed: u64,
    /// When the first flow was attempted.
    pub started: Instant,
    /// When the first flow failed.
    pub first_failure: Option<Instant>,
}

/// How long a TCP connection attempt may take before it counts as dropped. A loopback
/// handshake takes tens of microseconds; a dropped SYN would only be retried after 1 s.
const CONNECT_TIMEOUT_MS: u16 = 5;
/// How often (in flows) the clock, the pace and the stop flag are checked.
const CHECK_EVERY: u64 = 64;

/// The loopback destination of the `n`th UDP flow: ports 1024..=65023 on 127.1.0.1, then
/// the next address, so flows never repeat within 16 million datagrams.
pub fn flow_target(n: u64) -> SocketAddrV4 {
    const PORTS: u64 = 64_000;
    let port = 1024 + (n % PORTS) as u16;
    let host = (n / PORTS) as u32 + 1;
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 0)) + (host & 0x00fe_ffff));
    SocketAddrV4::new(ip, port)
}

/// The loopback source address of the `n`th TCP flow: 127.2.0.1 onwards, one address per
/// flow (so source ports never run out), wrapping within 127.2.0.0/15.
pub fn tcp_source(n: u64) -> Ipv4Addr {
    let offset = (n % 0x0001_fffe) as u32 + 1;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 2, 0, 0)) + offset)
}

/// Sends up to `max_datagrams` UDP datagrams to distinct loopback flows, starting at flow
/// number `first_flow`, as fast as possible until `deadline`.
pub fn fill_udp(first_flow: u64, max_datagrams: u64, deadline: Instant) -> io::Result<LoadReport> {
    let load = Load {
        protocol: Protocol::Udp,
        first_flow,
        flows: max_datagrams,
        burst: 0,
        rate: None,
        deadline,
    };
    run(&load, &AtomicBool::new(false))
}

/// Runs `load` in the calling thread's network namespace until it is done, its deadline
/// passes or `stop` is set.
pub fn run(load: &Load, stop: &AtomicBool) -> io::Result<LoadReport> {
    match load.protocol {
        Protocol::Udp => {
            let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
            drive(load, stop, |n| {
                socket.send_to(b"ctguard", flow_target(n)).map(drop)
            })
        }
        Protocol::Tcp => {
            let listener = Listener::open()?;
            let target = listener.address;
            let done = AtomicBool::new(false);
            std::thread::scope(|scope| {
                scope.spawn(|| listener.accept_until(&done));
                let report = drive(load, stop, |n| {
                    connect_from(tcp_source(n), target).and_then(reset)
                });
                done.store(true, Ordering::Relaxed);
                report
            })
        }
    }
}

/// Attempts flows `first_flow..first_flow + flows` with `attempt`, keeping the pace and
/// the bounds of `load`.
fn drive(
    load: &Load,
    stop: &AtomicBool,
    mut attempt: impl FnMut(u64) -> io::Result<()>,
) -> io::Result<LoadReport> {
    let started = Instant::now();
    let mut paced_since = started;
    let mut report = LoadReport {
        sent: 0,
        failed: 0,
        started,
        first_failure: None,
    };
    for i in 0..load.flows {
        if i % CHECK_EVERY == 0 {
            let now = Instant::now();
            if now >= load.deadline || stop.load(Ordering::Relaxed) {
                break;
            }
            if i < load.burst {
                paced_since = now;
            } else if let Some(due) = load
                .rate
                .and_then(|rate| due_at(paced_since, i - load.burst, rate))
                && due > now
            {
                std::thread::sleep(due - now);
            }
        }
        match attempt(load.first_flow.saturating_add(i)) {
            Ok(()) => report.sent += 1,
            Err(_) => {
                report.failed += 1;
                report.first_failure.get_or_insert_with(Instant::now);
            }
        }
    }
    Ok(report)
}

/// When flow number `i` is due at `rate` flows per second (`None` for a zero rate).
fn due_at(started: Instant, i: u64, rate: u64) -> Option<Instant> {
    let nanos = u128::from(i) * 1_000_000_000 / u128::from(rate.max(1));
    started.checked_add(Duration::from_nanos(u64::try_from(nanos).ok()?))
}

/// The TCP load's own listener on 127.0.0.1.
struct Listener {
    socket: TcpListener,
    address: SocketAddrV4,
}

impl Listener {
    fn open() -> io::Result<Listener> {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(&fd, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
        // A deep accept queue: the handshake completes in the kernel, and a queue that
        // overflows would drop SYNs that the table had room for.
        listen(&fd, Backlog::MAXCONN)?;
        let socket = TcpListener::from(fd);
        socket.set_nonblocking(true)?;
        let address = match socket.local_addr()? {
            std::net::SocketAddr::V4(v4) => v4,
            other => return Err(io::Error::other(format!("listener bound to {other}"))),
        };
        Ok(Listener { socket, address })
    }

    /// Accepts (and at once closes) connections until `done` is set.
    fn accept_until(&self, done: &AtomicBool) {
        while !done.load(Ordering::Relaxed) {
            match self.socket.accept() {
                Ok((stream, _)) => drop(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut ready = [PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
                    // Woken by a connection, or every 10 ms to look at `done`.
                    let _ = poll(&mut ready, 10u16);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }
}

/// Connects from `source` (any port) to `target`, giving up after [`CONNECT_TIMEOUT_MS`].
fn connect_from(source: Ipv4Addr, target: SocketAddrV4) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(&fd, SocketAddrV4::new(source, 0))?;
    match connect(&fd, target) {
        Ok(()) => return Ok(fd),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let mut writable = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
    if poll(&mut writable, CONNECT_TIMEOUT_MS)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connecting {source} → {target}"),
        ));
    }
    match getsockopt(&fd, sockopt::SocketError)? {
        0 => Ok(fd),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// `sockaddr_in` for an IPv4 address (nix's socket-address types need a feature this
/// crate does not enable; the C struct is small).
fn sockaddr_in(address: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: address.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*address.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn bind(fd: &OwnedFd, address: SocketAddrV4) -> io::Result<()> {
    with_address(fd, address, libc::bind)
}

fn connect(fd: &OwnedFd, address: SocketAddrV4) -> io::Result<()> {
    with_address(fd, address, libc::connect)
}

/// Calls `bind(2)` or `connect(2)` (same signature) with an IPv4 address.
fn with_address(
    fd: &OwnedFd,
    address: SocketAddrV4,
    call: unsafe extern "C" fn(libc::c_int, *const libc::sockaddr, libc::socklen_t) -> libc::c_int,
) -> io::Result<()> {
    let raw = sockaddr_in(address);
    // SAFETY: a valid socket and a sockaddr_in of the size passed.
    let rc = unsafe {
        call(
            fd.as_raw_fd(),
            (&raw as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Closes a connection with a reset, so the client socket does not linger in TIME_WAIT.
fn reset(fd: OwnedFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(&fd, sockopt::Linger, &linger)?;
    Ok(())
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

    #[test]
    fn tcp_sources_are_loopback_distinct_and_never_the_listener() {
        let mut seen = std::collections::HashSet::new();
        for n in 0..0x0001_fffe {
            let source = tcp_source(n);
            assert!(source.is_loopback(), "{source}");
            assert_ne!(source, Ipv4Addr::LOCALHOST);
            assert!(seen.insert(source), "repeated {source}");
        }
        assert_eq!(tcp_source(0x0001_fffe), tcp_source(0));
        assert!(tcp_source(u64::MAX).is_loopback());
    }

    #[test]
    fn pace_spreads_flows_over_time() {
        let start = Instant::now();
        assert_eq!(due_at(start, 0, 1000), Some(start));
        assert_eq!(
            due_at(start, 500, 1000),
            Some(start + Duration::from_millis(500))
        );
        assert_eq!(due_at(start, 3, 0), Some(start + Duration::from_secs(3)));
    }

    #[test]
    fn a_set_stop_flag_sends_nothing() {
        let load = Load {
            protocol: Protocol::Udp,
            first_flow: 0,
            flows: 1000,
            burst: 0,
            rate: None,
            deadline: Instant::now() + Duration::from_secs(5),
        };
        let report = run(&load, &AtomicBool::new(true)).unwrap();
        assert_eq!((report.sent, report.failed), (0, 0));
    }
}
