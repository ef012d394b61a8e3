//! The allowlist of conntrack knobs ctguard may read and change.
//!
//! Every sysctl that ctguard touches is named here and nowhere else: a policy can only
//! refer to a [`Knob`], never to a path, so no configuration can make ctguard write an
//! arbitrary file. Each knob knows its modern name under `/proc/sys/net/netfilter/` and,
//! where one existed, its name on kernels before 2.6.20 (`ip_conntrack_*`).

use serde::{Deserialize, Serialize};
use std::fmt;

/// A per-protocol state timeout (seconds) of the conntrack table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeoutKnob {
    Established,
    TimeWait,
    CloseWait,
    FinWait,
    SynRecv,
    SynSent,
    LastAck,
    Close,
    MaxRetrans,
    Unacknowledged,
    Udp,
    UdpStream,
    Generic,
    Icmp,
    Icmpv6,
}

impl TimeoutKnob {
    /// Every timeout knob, in a stable order (reports list them this way).
    pub const ALL: [TimeoutKnob; 15] = [
        TimeoutKnob::Established,
        TimeoutKnob::TimeWait,
        TimeoutKnob::CloseWait,
        TimeoutKnob::FinWait,
        TimeoutKnob::SynRecv,
        TimeoutKnob::SynSent,
        TimeoutKnob::LastAck,
        TimeoutKnob::Close,
        TimeoutKnob::MaxRetrans,
        TimeoutKnob::Unacknowledged,
        TimeoutKnob::Udp,
        TimeoutKnob::UdpStream,
        TimeoutKnob::Generic,
        TimeoutKnob::Icmp,
        TimeoutKnob::Icmpv6,
    ];

    /// The short name used in policies, JSON and reports (`established`, `udp_stream`, …).
    pub fn name(self) -> &'static str {
        match self {
            TimeoutKnob::Established => "established",
            TimeoutKnob::TimeWait => "time_wait",
            TimeoutKnob::CloseWait => "close_wait",
            TimeoutKnob::FinWait => "fin_wait",
            TimeoutKnob::SynRecv => "syn_recv",
            TimeoutKnob::SynSent => "syn_sent",
            TimeoutKnob::LastAck => "last_ack",
            TimeoutKnob::Close => "close",
            TimeoutKnob::MaxRetrans => "max_retrans",
            TimeoutKnob::Unacknowledged => "unacknowledged",
            TimeoutKnob::Udp => "udp",
            TimeoutKnob::UdpStream => "udp_stream",
            TimeoutKnob::Generic => "generic",
            TimeoutKnob::Icmp => "icmp",
            TimeoutKnob::Icmpv6 => "icmpv6",
        }
    }

    /// The file name under `/proc/sys/net/netfilter/` on kernels since 2.6.20.
    pub fn sysctl_file(self) -> &'static str {
        match self {
            TimeoutKnob::Established => "nf_conntrack_tcp_timeout_established",
            TimeoutKnob::TimeWait => "nf_conntrack_tcp_timeout_time_wait",
            TimeoutKnob::CloseWait => "nf_conntrack_tcp_timeout_close_wait",
            TimeoutKnob::FinWait => "nf_conntrack_tcp_timeout_fin_wait",
            TimeoutKnob::SynRecv => "nf_conntrack_tcp_timeout_syn_recv",
            TimeoutKnob::SynSent => "nf_conntrack_tcp_timeout_syn_sent",
            TimeoutKnob::LastAck => "nf_conntrack_tcp_timeout_last_ack",
            TimeoutKnob::Close => "nf_conntrack_tcp_timeout_close",
            TimeoutKnob::MaxRetrans => "nf_conntrack_tcp_timeout_max_retrans",
            TimeoutKnob::Unacknowledged => "nf_conntrack_tcp_timeout_unacknowledged",
            TimeoutKnob::Udp => "nf_conntrack_udp_timeout",
            TimeoutKnob::UdpStream => "nf_conntrack_udp_timeout_stream",
            TimeoutKnob::Generic => "nf_conntrack_generic_timeout",
            TimeoutKnob::Icmp => "nf_conntrack_icmp_timeout",
            TimeoutKnob::Icmpv6 => "nf_conntrack_icmpv6_timeout",
        }
    }

    /// The file name under `/proc/sys/net/ipv4/netfilter/` on kernels before 2.6.20, if the
    /// knob existed then.
    pub fn legacy_sysctl_file(self) -> Option<&'static str> {
        Some(match self {
            TimeoutKnob::Established => "ip_conntrack_tcp_timeout_established",
            TimeoutKnob::TimeWait => "ip_conntrack_tcp_timeout_time_wait",
            TimeoutKnob::CloseWait => "ip_conntrack_tcp_timeout_close_wait",
            TimeoutKnob::FinWait => "ip_conntrack_tcp_timeout_fin_wait",
            TimeoutKnob::SynRecv => "ip_conntrack_tcp_timeout_syn_recv",
            TimeoutKnob::SynSent => "ip_conntrack_tcp_timeout_syn_sent",
            TimeoutKnob::LastAck => "ip_conntrack_tcp_timeout_last_ack",
            TimeoutKnob::Close => "ip_conntrack_tcp_timeout_close",
            TimeoutKnob::MaxRetrans => "ip_conntrack_tcp_timeout_max_retrans",
            TimeoutKnob::Udp => "ip_conntrack_udp_timeout",
            TimeoutKnob::UdpStream => "ip_conntrack_udp_timeout_stream",
            TimeoutKnob::Generic => "ip_conntrack_generic_timeout",
            TimeoutKnob::Icmp => "ip_conntrack_icmp_timeout",
            TimeoutKnob::Unacknowledged | TimeoutKnob::Icmpv6 => return None,
        })
    }

    /// Parses a policy/JSON name back into the knob.
    pub fn from_name(name: &str) -> Option<TimeoutKnob> {
        TimeoutKnob::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// A conntrack setting ctguard may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Knob {
    /// `nf_conntrack_max`: the table's entry limit (global, initial namespace only).
    Max,
    /// `nf_conntrack_buckets` / the module's `hashsize` parameter (global).
    Buckets,
    /// A state timeout (per network namespace).
    Timeout(TimeoutKnob),
}

impl Knob {
    /// Whether the kernel keeps one value for all network namespaces. Global knobs can only
    /// be written from the initial namespace.
    pub fn is_global(self) -> bool {
        matches!(self, Knob::Max | Knob::Buckets)
    }

    /// The value the kernel will hold after `requested` is written: the hash table is
    /// allocated in whole pages, so bucket counts round up to a multiple of
    /// `page_size / pointer size` (512 with 4 KiB pages on 64-bit); the rest are exact.
    pub fn kernel_value(self, requested: u64) -> u64 {
        match self {
            Knob::Buckets => {
                // SAFETY: sysconf has no preconditions.
                let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
                let per_page = u64::try_from(page).unwrap_or(4096) / (usize::BITS as u64 / 8);
                requested.div_ceil(per_page.max(1)) * per_page.max(1)
            }
            _ => requested,
        }
    }

    /// The file name under `/proc/sys/net/netfilter/`.
    pub fn sysctl_file(self) -> &'static str {
        match self {
            Knob::Max => "nf_conntrack_max",
            Knob::Buckets => "nf_conntrack_buckets",
            Knob::Timeout(t) => t.sysctl_file(),
        }
    }
}

impl fmt::Display for Knob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "net.netfilter.{}", self.sysctl_file())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for k in TimeoutKnob::ALL {
            assert_eq!(TimeoutKnob::from_name(k.name()), Some(k));
            assert!(
                seen.insert(k.sysctl_file()),
                "duplicate file {}",
                k.sysctl_file()
            );
        }
    }

    #[test]
    fn bucket_counts_round_up_to_whole_pages() {
        let granule = Knob::Buckets.kernel_value(1);
        assert!(granule >= 1 && granule.is_power_of_two(), "{granule}");
        assert_eq!(Knob::Buckets.kernel_value(granule * 3), granule * 3);
        assert_eq!(Knob::Buckets.kernel_value(granule * 3 + 1), granule * 4);
        assert_eq!(Knob::Max.kernel_value(12345), 12345);
    }

    #[test]
    fn display_is_the_sysctl_name() {
        assert_eq!(Knob::Max.to_string(), "net.netfilter.nf_conntrack_max");
        assert_eq!(
            Knob::Timeout(TimeoutKnob::Established).to_string(),
            "net.netfilter.nf_conntrack_tcp_timeout_established"
        );
    }
}
