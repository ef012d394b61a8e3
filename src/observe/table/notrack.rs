//! Which hot ports a NOTRACK rule could safely take out of the table, and why the others
//! cannot: a pure decision over a [`TableBreakdown`], with a reason a person can read for
//! every port.
//!
//! A port is offered only when NOTRACK would both help and break nothing: not denied (and
//! allowed, when an allow list is given), no flow to it NAT'd (untracked packets skip
//! NAT, so translated flows would break) or forwarded (stateful forwarding rules would no
//! longer match their replies), some flows terminating on this host, and those flows
//! holding at least `min_share` of the table. The hottest `max_ports` such ports are
//! eligible. The share counted is that of the flows that terminate here, since those are
//! the entries a NOTRACK rule for a local service removes.

use super::{PortUsage, Protocol, TableBreakdown};
use crate::policy::NotrackHotPorts;
use serde::Serialize;

/// What the caller (a policy) allows.
#[derive(Debug, Clone, PartialEq)]
pub struct NotrackEligibility {
    /// The least share of the table (0.0–1.0) a port must hold to be worth a rule.
    pub min_share: f64,
    /// Only these ports may be offered (a policy's allow list); `None`: any port.
    pub allow: Option<Vec<u16>>,
    /// Never offered, whatever their share.
    pub deny: Vec<u16>,
    /// At most this many ports are offered, hottest first.
    pub max_ports: usize,
}

impl From<&NotrackHotPorts> for NotrackEligibility {
    /// The rules a policy's `notrack_hot_ports` stage applies (its allow list is required:
    /// an empty one offers no port).
    fn from(stage: &NotrackHotPorts) -> Self {
        NotrackEligibility {
            min_share: stage.min_share,
            allow: Some(stage.allow.iter().copied().collect()),
            deny: stage.deny.iter().copied().collect(),
            max_ports: stage.max_ports as usize,
        }
    }
}

impl Default for NotrackEligibility {
    /// 10% of the table, ssh (22) denied so an operator never loses the way in, 4 ports.
    fn default() -> Self {
        NotrackEligibility {
            min_share: 0.10,
            allow: None,
            deny: vec![22],
            max_ports: 4,
        }
    }
}

/// The decision for one port.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PortVerdict {
    pub proto: Protocol,
    pub port: u16,
    pub entries: u64,
    /// `entries` / table total.
    pub share: f64,
    pub eligible: bool,
    pub reason: String,
}

/// A verdict for each port of `table`, in the table's order (busiest first). Lazy: a
/// port's verdict depends only on the ports before it, so a caller showing the top N takes
/// N and no more reasons are written.
pub fn notrack_eligibility<'a>(
    table: &'a TableBreakdown,
    rules: &'a NotrackEligibility,
) -> impl Iterator<Item = PortVerdict> + 'a {
    let share_of = move |entries: u64| {
        if table.total == 0 {
            0.0
        } else {
            entries as f64 / table.total as f64
        }
    };
    let mut offered = 0;
    table.ports.iter().map(move |usage| {
        let share = share_of(usage.entries);
        let local_share = share_of(usage.local_entries);
        let refusal = refusal(usage, local_share, rules).or_else(|| {
            (offered >= rules.max_ports).then(|| {
                Refusal::Traffic(format!(
                    "but {} hotter port{} already take max_ports {}",
                    offered,
                    if offered == 1 { "" } else { "s" },
                    rules.max_ports
                ))
            })
        });
        let name = format!("port {}/{}", usage.port, usage.proto);
        let (eligible, reason) = match refusal {
            Some(Refusal::Listed(why)) => (false, format!("{name}: {why}")),
            Some(Refusal::Traffic(why)) => (
                false,
                format!("{name}: {} of the table, {why}", percent(share)),
            ),
            None => {
                offered += 1;
                let local = if usage.local_entries == usage.entries {
                    "all terminating here".to_string()
                } else {
                    format!("{} terminating here", percent(local_share))
                };
                (
                    true,
                    format!(
                        "{name}: {} of the table, {local}, none NAT'd or forwarded",
                        percent(share)
                    ),
                )
            }
        };
        PortVerdict {
            proto: usage.proto,
            port: usage.port,
            entries: usage.entries,
            share,
            eligible,
            reason,
        }
    })
}

/// Why a port is not offered.
enum Refusal {
    /// The lists decide, whatever the traffic.
    Listed(&'static str),
    /// The port's traffic decides; read after its share of the table.
    Traffic(String),
}

/// Why `usage` may not be offered, whatever the other ports; `None` when it may.
fn refusal(usage: &PortUsage, local_share: f64, rules: &NotrackEligibility) -> Option<Refusal> {
    if rules.deny.contains(&usage.port) {
        return Some(Refusal::Listed("on the deny list"));
    }
    if let Some(allow) = &rules.allow
        && !allow.contains(&usage.port)
    {
        return Some(Refusal::Listed("not on the allow list"));
    }
    let why = if usage.nat_entries > 0 {
        format!("but {} NAT'd", flows(usage.nat_entries))
    } else if usage.forwarded_entries > 0 {
        format!(
            "but {} forwarded through this host",
            flows(usage.forwarded_entries)
        )
    } else if !usage.terminates_locally {
        "but no flow terminates on this host (all are outgoing)".into()
    } else if local_share < rules.min_share {
        format!("below the {} share", percent(rules.min_share))
    } else {
        return None;
    };
    Some(Refusal::Traffic(why))
}

/// "1 flow is" / "40 flows are".
fn flows(count: u64) -> String {
    if count == 1 {
        "1 flow is".into()
    } else {
        format!("{count} flows are")
    }
}

/// A share as a percentage: "12%", "3.1%".
pub fn percent(share: f64) -> String {
    let value = share * 100.0;
    if (value - value.round()).abs() < 0.05 {
        format!("{value:.0}%")
    } else {
        format!("{value:.1}%")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(proto: Protocol, port: u16, entries: u64) -> PortUsage {
        PortUsage {
            proto,
            port,
            entries,
            local_entries: entries,
            forwarded_entries: 0,
            nat_entries: 0,
            nat_or_forwarded: false,
            terminates_locally: entries > 0,
        }
    }

    fn table(ports: Vec<PortUsage>, total: u64) -> TableBreakdown {
        TableBreakdown {
            total,
            ports,
            tcp_states: Vec::new(),
            top_sources: Vec::new(),
            dump_interrupted: false,
        }
    }

    fn verdicts(ports: Vec<PortUsage>, total: u64, rules: &NotrackEligibility) -> Vec<PortVerdict> {
        notrack_eligibility(&table(ports, total), rules).collect()
    }

    #[test]
    fn hot_local_port_is_eligible() {
        let v = verdicts(
            vec![port(Protocol::UDP, 5353, 450)],
            1000,
            &NotrackEligibility::default(),
        );
        assert!(v[0].eligible, "{v:?}");
        assert_eq!(v[0].share, 0.45);
        assert_eq!(
            v[0].reason,
            "port 5353/udp: 45% of the table, all terminating here, none NAT'd or forwarded"
        );
    }

    #[test]
    fn nat_names_the_count_and_beats_the_share() {
        let mut dns = port(Protocol::UDP, 53, 120);
        dns.nat_entries = 40;
        dns.nat_or_forwarded = true;
        let v = verdicts(vec![dns], 1000, &NotrackEligibility::default());
        assert!(!v[0].eligible);
        assert_eq!(
            v[0].reason,
            "port 53/udp: 12% of the table, but 40 flows are NAT'd"
        );
    }

    #[test]
    fn forwarded_and_outgoing_flows_are_refused() {
        let mut routed = port(Protocol::TCP, 443, 300);
        routed.local_entries = 0;
        routed.forwarded_entries = 1;
        routed.terminates_locally = false;
        let mut outgoing = port(Protocol::TCP, 80, 200);
        outgoing.local_entries = 0;
        outgoing.terminates_locally = false;
        let v = verdicts(vec![routed, outgoing], 1000, &NotrackEligibility::default());
        assert_eq!(
            v[0].reason,
            "port 443/tcp: 30% of the table, but 1 flow is forwarded through this host"
        );
        assert_eq!(
            v[1].reason,
            "port 80/tcp: 20% of the table, but no flow terminates on this host (all are outgoing)"
        );
        assert!(v.iter().all(|v| !v.eligible));
    }

    #[test]
    fn deny_allow_and_share() {
        let rules = NotrackEligibility {
            min_share: 0.05,
            allow: Some(vec![8080, 22, 9000]),
            deny: vec![22],
            max_ports: 4,
        };
        let ports = vec![
            port(Protocol::TCP, 22, 500),
            port(Protocol::TCP, 443, 300),
            port(Protocol::TCP, 8080, 150),
            port(Protocol::UDP, 9000, 31),
        ];
        let v = verdicts(ports, 1000, &rules);
        assert_eq!(v[0].reason, "port 22/tcp: on the deny list");
        assert_eq!(v[1].reason, "port 443/tcp: not on the allow list");
        assert!(v[2].eligible, "{:?}", v[2]);
        assert_eq!(
            v[3].reason,
            "port 9000/udp: 3.1% of the table, below the 5% share"
        );
        assert!(!v[3].eligible);
    }

    #[test]
    fn share_counts_only_flows_that_terminate_here() {
        let mut mixed = port(Protocol::UDP, 53, 300);
        mixed.local_entries = 50;
        let v = verdicts(vec![mixed.clone()], 1000, &NotrackEligibility::default());
        assert_eq!(
            v[0].reason,
            "port 53/udp: 30% of the table, below the 10% share"
        );
        mixed.local_entries = 150;
        let v = verdicts(vec![mixed], 1000, &NotrackEligibility::default());
        assert!(v[0].eligible);
        assert!(
            v[0].reason.contains("15% terminating here"),
            "{}",
            v[0].reason
        );
    }

    #[test]
    fn max_ports_keeps_the_hottest() {
        let rules = NotrackEligibility {
            max_ports: 2,
            ..NotrackEligibility::default()
        };
        let ports = (0..4)
            .map(|i| port(Protocol::UDP, 7000 + i, 200 - u64::from(i)))
            .collect();
        let v = verdicts(ports, 1000, &rules);
        let eligible: Vec<u16> = v.iter().filter(|v| v.eligible).map(|v| v.port).collect();
        assert_eq!(eligible, [7000, 7001]);
        assert_eq!(
            v[2].reason,
            "port 7002/udp: 19.8% of the table, but 2 hotter ports already take max_ports 2"
        );
    }

    #[test]
    fn empty_table_offers_nothing() {
        let v = verdicts(vec![], 0, &NotrackEligibility::default());
        assert!(v.is_empty());
        let zero_total = verdicts(
            vec![port(Protocol::UDP, 1, 0)],
            0,
            &NotrackEligibility::default(),
        );
        assert!(!zero_total[0].eligible);
    }
}
