/*!
Observation sources: everything ctguard learns about the kernel comes through here.

Each source is split in two: a pure parser that turns bytes into typed values (tested on
bytes captured from real kernels, kept under `tests/fixtures/`), and a thin reader that
fetches those bytes. Readers never load kernel modules and never write anything.

- [`sysctl`]: `nf_conntrack_count`, `_max`, `_buckets` and the timeouts (legacy
  `ip_conntrack_*` paths as a fallback), read by `pread` on files kept open.
- [`stat`]: `/proc/net/stat/nf_conntrack`, per-CPU hex rows summed by column *name*.
- [`ctnetlink`]: the same counters over ctnetlink.
- [`table`]: what fills the table (a streamed ctnetlink dump) and which hot ports
  NOTRACK could safely take out of it.
- [`kmsg`]: `/dev/kmsg` records and their classification into [`KernelEvent`]s;
  [`kmsg_follower`] is the async reader.
- [`memory`]: MemTotal, the conntrack entry size, and the RAM ceilings derived from them.
- [`activity`]: whether connection tracking is active at all.
- [`modules`]: which kernel modules are in, so nothing ctguard does loads one.
*/

pub mod activity;
pub mod ctnetlink;
pub mod kmsg;
pub mod kmsg_follower;
pub mod memory;
pub mod modules;
pub mod sampler;
pub mod stat;
pub mod sysctl;
pub mod table;

use crate::knob::TimeoutKnob;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One reading of the conntrack table's pressure, as the engine consumes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ConntrackSample {
    /// Entries in the table now (`nf_conntrack_count`, per namespace).
    pub count: u64,
    /// The table limit (`nf_conntrack_max`, global).
    pub max: u64,
    /// Hash buckets (`nf_conntrack_buckets`), when readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets: Option<u64>,
    /// Timeouts in seconds, by knob; knobs this kernel lacks are absent.
    #[serde(default)]
    pub timeouts: BTreeMap<TimeoutKnob, u64>,
    /// Kernel counters summed over CPUs, when readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<ConntrackStats>,
}

impl ConntrackSample {
    /// count / max; 0 when max is 0 (no table).
    pub fn ratio(&self) -> f64 {
        if self.max == 0 {
            0.0
        } else {
            self.count as f64 / self.max as f64
        }
    }
}

/// The kernel's conntrack counters, summed over CPUs. Counters a kernel does not report
/// are 0; they only ever grow (until reboot), so the engine works on their increases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ConntrackStats {
    pub found: u64,
    pub invalid: u64,
    pub ignore: u64,
    pub insert: u64,
    pub insert_failed: u64,
    pub drop: u64,
    pub early_drop: u64,
    pub icmp_error: u64,
    pub search_restart: u64,
    pub clash_resolve: u64,
}

/// Something the kernel said in its log that matters to conntrack pressure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KernelEvent {
    /// `nf_conntrack: table full, dropping packet` in any of its formats. `netns` is the
    /// namespace inode when the kernel names it (6.x: `table full in netns N`).
    TableFull {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<u64>,
    },
    /// `nf_conntrack: expectation table full`.
    ExpectationTableFull,
    /// `__ratelimit: N callbacks suppressed` / `net_ratelimit: N callbacks suppressed`:
    /// N messages (possibly table-full ones) that were not printed.
    CallbacksSuppressed { limiter: String, count: u64 },
    /// `possible SYN flooding on port N` (often seen beside a full table, seed 003).
    SynFlood { port: u16 },
    /// The kmsg buffer overwrote records before ctguard read them (EPIPE).
    RecordsLost { count: u64 },
}

/// Why a source could not produce a value: always names the file (or channel) and what
/// was expected, so an operator can see what is wrong without reading code.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: expected {expected}, found {found:?}")]
    Format {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{channel}: {message}")]
    Netlink { channel: String, message: String },
}

impl ObserveError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ObserveError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn format(
        path: impl Into<PathBuf>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Self {
        ObserveError::Format {
            path: path.into(),
            expected: expected.into(),
            found: found.into(),
        }
    }
}
