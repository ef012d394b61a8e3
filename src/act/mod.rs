/*!
Actuators: the only code that changes the host.

Every side effect goes through the small [`Actuator`] trait, with a real implementation
([`sysctl::SysctlActuator`]) and a recording one ([`recording::RecordingActuator`]) that
reads the live host but only records what it would write (dry-run, tests). Callers journal
a change before asking an actuator to make it (see [`crate::journal`]).

Only knobs in the [`Knob`] allowlist can be named, so no policy or input can make ctguard
write an arbitrary path.
*/

pub mod choose;
pub mod evict;
pub mod executor;
pub mod iptables;
pub mod nft;
pub mod notrack;
pub mod persist;
pub mod probe;
pub mod recording;
pub mod sysctl;

use crate::knob::Knob;
use std::io;
use std::path::PathBuf;

/// Reads and writes allowlisted conntrack knobs.
///
/// Contract:
/// - `read` returns the live value now; it never caches.
/// - `write` sets the value and reads it back; it returns `Ok` only when the kernel holds
///   exactly `value` afterwards.
/// - A write the environment forbids (non-initial network namespace, read-only `/sys`,
///   a container) is [`ActError::NotPermitted`], so the engine can try another stage;
///   every other failure is [`ActError::Failed`] or [`ActError::Verify`].
/// - Neither method loads kernel modules or touches anything but the knob's own file.
pub trait Actuator {
    fn read(&mut self, knob: Knob) -> Result<u64, ActError>;
    fn write(&mut self, knob: Knob, value: u64) -> Result<(), ActError>;
    /// Whether a write of `value` to `knob` would fail here before reaching the kernel's
    /// value checks (most often [`ActError::NotPermitted`]), found without writing: dry-run
    /// asks, so it rehearses the refusals enforce would meet.
    fn check_write(&mut self, _knob: Knob, _value: u64) -> Result<(), ActError> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActError {
    #[error("{knob}: not permitted here ({path}: {source})")]
    NotPermitted {
        knob: Knob,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{knob}: writing {value} to {path} failed: {source}")]
    Failed {
        knob: Knob,
        path: PathBuf,
        value: u64,
        #[source]
        source: io::Error,
    },
    #[error("{knob}: reading {path} failed: {detail}")]
    Read {
        knob: Knob,
        path: PathBuf,
        detail: String,
    },
    #[error("{knob}: wrote {wrote} to {path} but read back {read}")]
    Verify {
        knob: Knob,
        path: PathBuf,
        wrote: u64,
        read: u64,
    },
}

impl ActError {
    /// Whether the environment forbids this change (as opposed to a failure worth retrying).
    pub fn is_not_permitted(&self) -> bool {
        matches!(self, ActError::NotPermitted { .. })
    }
}

/// Errors that mean "this environment does not allow the write": permission (a non-initial
/// namespace answers EACCES for global knobs), read-only mounts, unsupported operations.
pub(crate) fn forbids(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EACCES | libc::EPERM | libc::EROFS | libc::EOPNOTSUPP)
    )
}
