/*!
The health probe around a NOTRACK change: does a local TCP service still answer?

A firewall that drops untracked packets (`ct state untracked drop`, or an iptables INPUT
chain whose `-m state` accept list lacks `UNTRACKED` before a final REJECT, as in the
seeds' example) turns a NOTRACK into an outage for that port. So the caller probes the
port just before and just after the change and reverts at once when it answered before
and not after ([`ProbeResult::broke_service`]).

The probe connects from inside the target namespace to a local address. Over loopback it
passes the same `input` filters as remote clients only when those filters do not exempt
`lo`; it catches what it can see, and a probe that did not answer before proves nothing.
*/

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

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
