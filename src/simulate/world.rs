//! A synthetic conntrack table that reacts to the engine's decisions.
//!
//! The model is deliberately simple and deterministic:
//! - the load *offers* a number of entries: what the table would hold with the kernel's
//!   default timeouts and no limit, split across timeout classes and destination ports;
//! - an entry's lifetime scales with its class's timeout, but only partly (live flows stay
//!   whatever the timeout): a class holds `offered × (0.2 + 0.8 × timeout / default)`;
//! - untracked ports' share of the load is gone from the table;
//! - the table fills up to its max at once and drains towards the target with a 20 s time
//!   constant; whatever does not fit is dropped (the `drop` counter grows by the excess,
//!   per second).

use crate::engine::{Action, Change, PortKey};
use crate::knob::{Knob, TimeoutKnob};
use crate::observe::{ConntrackSample, ConntrackStats};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// The offered load at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Load {
    /// Entries the load would hold with default timeouts and no limit.
    pub entries: f64,
    /// Share of entries per timeout class (sums to 1).
    pub classes: Vec<(TimeoutKnob, f64)>,
    /// Share of entries per destination port (the rest is spread thin).
    pub ports: Vec<(PortKey, f64)>,
}

impl Load {
    /// The same mix with a different size.
    pub fn with_entries(self, entries: f64) -> Load {
        Load { entries, ..self }
    }
}

/// The simulated table.
#[derive(Debug, Clone, PartialEq)]
pub struct World {
    pub count: f64,
    pub max: u64,
    pub buckets: u64,
    pub timeouts: BTreeMap<TimeoutKnob, u64>,
    defaults: BTreeMap<TimeoutKnob, u64>,
    pub stats: ConntrackStats,
    pub notracked: BTreeSet<PortKey>,
    /// Global knobs (max, buckets) are read-only, as in a non-initial network namespace.
    pub non_initial_netns: bool,
}

/// Drain time constant: entries past their timeout leave over tens of seconds.
const DRAIN_SECONDS: f64 = 20.0;

impl World {
    /// A table with this lab kernel's defaults: max 262144, 65536 buckets, default timeouts.
    pub fn kernel_defaults() -> World {
        let timeouts: BTreeMap<TimeoutKnob, u64> = [
            (TimeoutKnob::Established, 432_000),
            (TimeoutKnob::TimeWait, 120),
            (TimeoutKnob::CloseWait, 60),
            (TimeoutKnob::FinWait, 120),
            (TimeoutKnob::SynRecv, 60),
            (TimeoutKnob::SynSent, 120),
            (TimeoutKnob::LastAck, 30),
            (TimeoutKnob::Close, 10),
            (TimeoutKnob::MaxRetrans, 300),
            (TimeoutKnob::Unacknowledged, 300),
            (TimeoutKnob::Udp, 30),
            (TimeoutKnob::UdpStream, 120),
            (TimeoutKnob::Generic, 600),
            (TimeoutKnob::Icmp, 30),
            (TimeoutKnob::Icmpv6, 30),
        ]
        .into();
        World {
            count: 0.0,
            max: 262_144,
            buckets: 65_536,
            defaults: timeouts.clone(),
            timeouts,
            stats: ConntrackStats::default(),
            notracked: BTreeSet::new(),
            non_initial_netns: false,
        }
    }

    pub fn sample(&self) -> ConntrackSample {
        ConntrackSample {
            count: self.count.round() as u64,
            max: self.max,
            buckets: Some(self.buckets),
            timeouts: self.timeouts.clone(),
            stats: Some(self.stats),
        }
    }

    /// Entries the load holds at the current timeouts and NOTRACK rules.
    pub fn target(&self, load: &Load) -> f64 {
        let lifetime: f64 = load
            .classes
            .iter()
            .map(|&(knob, share)| {
                let now = self.timeouts.get(&knob).copied().unwrap_or(1) as f64;
                let default = self.defaults.get(&knob).copied().unwrap_or(1).max(1) as f64;
                share * (0.2 + 0.8 * (now / default).min(1.0))
            })
            .sum();
        let untracked: f64 = load
            .ports
            .iter()
            .filter(|(port, _)| self.notracked.contains(port))
            .map(|&(_, share)| share)
            .sum();
        load.entries * lifetime * (1.0 - untracked).max(0.0)
    }

    /// Moves the table `dt` forward under `load`.
    pub fn advance(&mut self, dt: Duration, load: &Load) {
        let target = self.target(load);
        let max = self.max as f64;
        if target > self.count {
            // New flows arrive fast: the table fills at once, up to its max.
            self.count = target.min(max.max(self.count));
        } else {
            let keep = (-dt.as_secs_f64() / DRAIN_SECONDS).exp();
            self.count = target + (self.count - target) * keep;
        }
        if target > max {
            let lost = ((target - max) * dt.as_secs_f64()).ceil() as u64;
            self.stats.drop += lost;
            self.stats.insert_failed += lost / 10;
        }
    }

    /// Carries out an action the way the kernel would (dry-run actions change nothing).
    pub fn carry_out(&mut self, action: &Action) -> crate::engine::Outcome {
        use crate::engine::Outcome;
        match action {
            Action::Apply(changes) | Action::Revert(changes) => {
                if self.non_initial_netns && changes.iter().any(|c| c.knob.is_global()) {
                    return Outcome::NotPermitted(
                        "EACCES: nf_conntrack_max and buckets are read-only outside the initial network namespace".into(),
                    );
                }
                for &Change { knob, to, .. } in changes {
                    match knob {
                        Knob::Max => self.max = to,
                        Knob::Buckets => self.buckets = to,
                        Knob::Timeout(t) => {
                            self.timeouts.insert(t, to);
                        }
                    }
                }
            }
            Action::Notrack { ports, .. } => self.notracked.extend(ports.iter().copied()),
            Action::Untrack { ports } => {
                for p in ports {
                    self.notracked.remove(p);
                }
            }
            Action::Evict { batch, .. } => {
                self.count -= (f64::from(*batch)).min(self.count * 0.3);
            }
            Action::DryRun(_) => {}
        }
        Outcome::Applied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(entries: f64) -> Load {
        Load {
            entries,
            classes: vec![(TimeoutKnob::Established, 0.5), (TimeoutKnob::Udp, 0.5)],
            ports: vec![],
        }
    }

    #[test]
    fn fills_to_max_with_drops_and_drains_after_shortening() {
        let mut w = World::kernel_defaults();
        w.advance(Duration::from_secs(1), &load(300_000.0));
        assert_eq!(w.count, 262_144.0);
        assert!(w.stats.drop > 0);
        w.carry_out(&Action::Apply(vec![Change {
            knob: Knob::Timeout(TimeoutKnob::Udp),
            from: 30,
            to: 3,
        }]));
        for _ in 0..120 {
            w.advance(Duration::from_secs(1), &load(300_000.0));
        }
        // udp half now holds 0.2 + 0.8 × 0.1 = 0.28 of its share.
        let expected = 300_000.0 * (0.5 + 0.5 * 0.28);
        assert!((w.count - expected).abs() < 1_000.0, "{}", w.count);
    }

    #[test]
    fn global_knobs_are_refused_outside_the_initial_namespace() {
        let mut w = World::kernel_defaults();
        w.non_initial_netns = true;
        let raise = Action::Apply(vec![Change {
            knob: Knob::Max,
            from: 262_144,
            to: 400_000,
        }]);
        assert!(matches!(
            w.carry_out(&raise),
            crate::engine::Outcome::NotPermitted(_)
        ));
        assert_eq!(w.max, 262_144);
    }
}
