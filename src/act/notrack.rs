/*!
NOTRACK: exempting a hot port's traffic from connection tracking, so a flood on that port
cannot fill the table.

This module holds what the backends share: the change a caller journals
([`NotrackChange`], undone by removing its [`PortKey`]), the [`NotrackBackend`] trait,
the error type, and the one way backends run their tool (inside the target network
namespace, input on stdin, never through a shell).

Two backends implement it: [`super::nft`] (nftables; elements carry a timeout, so the
kernel lifts a NOTRACK by itself if ctguard dies) and [`super::iptables`] (only where
nf_tables is missing; rules never expire, so ctguard removes them when their expiry passes
and on rollback). [`super::choose`] picks one for the host; the journal records which
[`BackendKind`] made each exemption, so it is undone by the same kind.

Which packets a NOTRACK covers, in both backends: traffic arriving for the port
(`prerouting`, destination port), a local server's replies (`output`, source port), and
local clients talking to the port over loopback (`output`, out via `lo`, destination port).
Loopback packets keep the conntrack entry they got on `output` when they come back in
through `prerouting`, so without the last rule a local client's packets would be tracked
while the server's replies are not: half-open entries that linger, and a local health
probe that cannot see what remote clients see.
*/

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use crate::port::{PortKey, Proto};

/// One NOTRACK change, small enough to journal before it is made: exempt `proto/port` for
/// `timeout_secs` from now (adding it, or restarting its timeout if present). Undone
/// exactly by removing [`NotrackChange::target`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NotrackChange {
    pub proto: Proto,
    pub port: u16,
    /// How long the kernel keeps the exemption without a refresh (nftables); iptables
    /// cannot expire rules and ignores it.
    pub timeout_secs: u32,
}

impl NotrackChange {
    /// A checked change: port 0 means nothing, and a zero timeout would make an nftables
    /// element permanent, which ctguard never wants. Sub-second timeouts round up.
    pub fn new(proto: Proto, port: u16, timeout: Duration) -> Result<Self, NotrackError> {
        let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
        let change = NotrackChange {
            proto,
            port,
            timeout_secs: u32::try_from(secs).map_err(|_| NotrackError::Invalid {
                what: format!("timeout for {proto}/{port}"),
                why: format!("{secs} s is more than {} s", u32::MAX),
            })?,
        };
        change.check()?;
        Ok(change)
    }

    /// The same change for each of `ports`.
    pub fn for_ports(
        proto: Proto,
        ports: &[u16],
        timeout: Duration,
    ) -> Result<Vec<Self>, NotrackError> {
        ports
            .iter()
            .map(|&port| NotrackChange::new(proto, port, timeout))
            .collect()
    }

    /// What to remove to undo this change.
    pub fn target(&self) -> PortKey {
        PortKey {
            proto: self.proto,
            port: self.port,
        }
    }

    /// Refuses values a deserialised (journaled, hand-edited) change might still carry.
    pub(crate) fn check(&self) -> Result<(), NotrackError> {
        let invalid = |why: &str| {
            Err(NotrackError::Invalid {
                what: format!("NOTRACK {}", self.target()),
                why: why.into(),
            })
        };
        if self.port == 0 {
            return invalid("port 0 is not a port");
        }
        if self.timeout_secs == 0 {
            return invalid("a zero timeout would never expire");
        }
        Ok(())
    }
}

/// A port that is NOTRACKed now, as read back from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotrackedPort {
    pub target: PortKey,
    /// The timeout the element was (last) added with; `None` for an element without one
    /// (not made by ctguard).
    pub timeout: Option<Duration>,
    /// Time left before the kernel removes it by itself.
    pub expires: Option<Duration>,
}

/// Which backend made an exemption (journaled with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Journals written before the kind was recorded only ever used nftables.
    #[default]
    Nftables,
    Iptables,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Nftables => "nftables",
            BackendKind::Iptables => "iptables",
        }
    }

    /// Whether the kernel lifts an exemption by itself when it is not refreshed (nftables
    /// element timeouts); iptables rules stay until ctguard removes them.
    pub fn expires_by_itself(self) -> bool {
        self == BackendKind::Nftables
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A way to NOTRACK ports in one network namespace.
///
/// Contract: `install` is idempotent and keeps ports already exempted; `apply` adds the
/// ports or restarts their timeout (a refresh is just `apply` again); `remove` is
/// idempotent (removing an absent port is fine). Each call is one transaction where the
/// backend allows it.
pub trait NotrackBackend {
    /// Which backend this is (or rehearses).
    fn kind(&self) -> BackendKind;
    /// Whether this backend only records what it is asked (dry-run): it then stands in for
    /// every kind, so a rehearsal never reaches a real backend.
    fn is_rehearsal(&self) -> bool {
        false
    }
    fn install(&mut self) -> Result<(), NotrackError>;
    fn apply(&mut self, changes: &[NotrackChange]) -> Result<(), NotrackError>;
    fn remove(&mut self, ports: &[PortKey]) -> Result<(), NotrackError>;
    /// Removes what `install` made, once no exemption is left (nftables: ctguard's own
    /// table, atomically), and says whether there was such a thing. Backends whose rules
    /// are removed one by one have nothing left.
    fn uninstall(&mut self) -> Result<bool, NotrackError> {
        Ok(false)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NotrackError {
    /// The tool or the kernel support is missing, or the environment forbids it: the
    /// NOTRACK stage reports itself unavailable, other stages still work.
    #[error("NOTRACK via {backend} is unavailable here: {why}")]
    Unavailable { backend: &'static str, why: String },
    #[error("`{command}` failed ({status}): {stderr}\ninput sent: {sent}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
        sent: String,
    },
    #[error("`{command}` printed something unexpected: {detail}")]
    Output { command: String, detail: String },
    #[error("running `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {why}")]
    Invalid { what: String, why: String },
}

impl NotrackError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, NotrackError::Unavailable { .. })
    }
}

/// How long a backend's tool may run. `nft` and `iptables-restore` answer in milliseconds;
/// one that hangs (a lock held, a stuck netlink socket) is killed at this limit, since the
/// daemon waits for it on its loop.
const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a backend's tool and returns its output, whatever its exit status; a tool still
/// running after [`TOOL_TIMEOUT`] is killed and that is the error.
///
/// With `netns`, the child is spawned from a thread that entered that namespace
/// ([`crate::netns::run_in`]): a child inherits its parent thread's namespaces, so the tool
/// acts on the target namespace without `ip netns exec` (which also needs a mount
/// namespace and `/etc/netns`) and without `unsafe` `pre_exec` code.
pub(crate) fn run_tool(
    backend: &'static str,
    netns: Option<&Path>,
    program: &Path,
    args: &[&str],
    stdin: &[u8],
) -> Result<Output, NotrackError> {
    run_tool_within(backend, netns, program, args, stdin, TOOL_TIMEOUT)
}

fn run_tool_within(
    backend: &'static str,
    netns: Option<&Path>,
    program: &Path,
    args: &[&str],
    stdin: &[u8],
    limit: Duration,
) -> Result<Output, NotrackError> {
    let command = describe(program, args);
    let spawn_and_wait = || -> io::Result<Output> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // The tools read all of stdin before writing much, so writing first cannot
        // deadlock on a full pipe.
        let written = child.stdin.take().expect("stdin is piped").write_all(stdin);
        let output = output_within(child, limit)?;
        match written {
            // A tool that exits early (bad arguments) closes stdin: its stderr says why.
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e),
            _ => Ok(output),
        }
    };
    let result = match netns {
        Some(ns) => crate::netns::run_in(ns, spawn_and_wait).and_then(|r| r),
        None => spawn_and_wait(),
    };
    result.map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound && netns.is_none_or(|ns| ns.exists()) {
            NotrackError::Unavailable {
                backend,
                why: format!("{} is not installed", program.display()),
            }
        } else {
            NotrackError::Spawn { command, source }
        }
    })
}

/// A child's exit status and output, or a `TimedOut` error once it ran past `limit` (it is
/// then killed). The output is read on threads of their own; a child whose output closed
/// is exiting, so its status is waited for only until the same limit.
fn output_within(mut child: Child, limit: Duration) -> io::Result<Output> {
    let deadline = Instant::now() + limit;
    let (done, finished) = std::sync::mpsc::channel();
    let stdout = read_to_end_on_a_thread(child.stdout.take(), done.clone());
    let stderr = read_to_end_on_a_thread(child.stderr.take(), done);
    let closed = (0..2).all(|_| {
        finished
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    });
    let status = loop {
        match child.try_wait()? {
            Some(status) if closed => break status,
            _ if !closed || Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no answer within {}; killed",
                        humantime::format_duration(limit)
                    ),
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    };
    let joined = |reader: std::thread::JoinHandle<Vec<u8>>| reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout: joined(stdout),
        stderr: joined(stderr),
    })
}

/// Reads a child's pipe to its end on a new thread, then says so on `done`.
fn read_to_end_on_a_thread<R: Read + Send + 'static>(
    pipe: Option<R>,
    done: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        let _ = done.send(());
        bytes
    })
}

/// A command line as a human would type it, for error messages.
pub(crate) fn describe(program: &Path, args: &[&str]) -> String {
    std::iter::once(program.display().to_string())
        .chain(args.iter().map(|a| a.to_string()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The exit status for messages: `exit 1`, or the signal that killed the tool.
pub(crate) fn status_text(output: &Output) -> String {
    match output.status.code() {
        Some(code) => format!("exit {code}"),
        None => output.status.to_string(),
    }
}

/// Finds a tool on `PATH` by name (the default program of each backend).
pub(crate) fn program(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_round_up_and_refuse_nonsense() {
        let c = NotrackChange::new(Proto::Udp, 5353, Duration::from_millis(2500)).unwrap();
        assert_eq!(c.timeout_secs, 3);
        assert_eq!(
            c.target(),
            PortKey {
                proto: Proto::Udp,
                port: 5353
            }
        );
        let zero_port = NotrackChange::new(Proto::Tcp, 0, Duration::from_secs(3)).unwrap_err();
        assert!(zero_port.to_string().contains("tcp/0"), "{zero_port}");
        let zero_timeout = NotrackChange::new(Proto::Tcp, 80, Duration::ZERO).unwrap_err();
        assert!(
            zero_timeout.to_string().contains("never expire"),
            "{zero_timeout}"
        );
    }

    #[test]
    fn a_change_journals_as_a_small_value_and_back() {
        let c = NotrackChange::new(Proto::Tcp, 8080, Duration::from_secs(30)).unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, r#"{"proto":"tcp","port":8080,"timeout_secs":30}"#);
        assert_eq!(serde_json::from_str::<NotrackChange>(&json).unwrap(), c);
    }

    #[test]
    fn a_missing_tool_is_unavailable() {
        let err = run_tool(
            "nftables",
            None,
            Path::new("/nonexistent/nft"),
            &["-j", "-f", "-"],
            b"{}",
        )
        .unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        assert!(err.to_string().contains("/nonexistent/nft"), "{err}");
    }

    #[test]
    fn a_tool_that_hangs_is_killed_at_the_limit() {
        let err = run_tool_within(
            "nftables",
            None,
            Path::new("/bin/sleep"),
            &["60"],
            b"",
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(!err.is_unavailable(), "{err}");
        assert!(err.to_string().contains("/bin/sleep 60"), "{err}");
        assert!(err.to_string().contains("killed"), "{err}");
    }

    #[test]
    fn a_tool_that_answers_in_time_gives_its_output() {
        let output = run_tool_within(
            "nftables",
            None,
            Path::new("/bin/cat"),
            &[],
            b"ruleset",
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(output.status.success());
        assert_eq!(output.stdout, b"ruleset");
    }

    #[test]
    fn a_missing_namespace_is_not_mistaken_for_a_missing_tool() {
        let err = run_tool(
            "nftables",
            Some(Path::new("/nonexistent/netns")),
            Path::new("/bin/true"),
            &[],
            b"",
        )
        .unwrap_err();
        assert!(!err.is_unavailable(), "{err}");
        assert!(err.to_string().contains("/nonexistent/netns"), "{err}");
    }
}
