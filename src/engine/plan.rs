//! What each stage would change, from the policy and the table as it is now. Pure
//! functions: the engine decides *whether* a stage fires, these decide *what* it does.

use super::{Change, PortKey, PortLoad};
use crate::knob::{Knob, TimeoutKnob};
use crate::observe::memory::HostMemory;
use crate::policy::{Ceiling, NotrackHotPorts, RaiseLimits, ShortenTimeouts};
use std::collections::BTreeMap;

/// What `raise_limits` would do.
#[derive(Debug, Clone, PartialEq)]
pub struct RaisePlan {
    /// Max first (it is what relieves pressure), then buckets.
    pub changes: Vec<Change>,
    pub ceiling: Ceiling,
}

impl RaisePlan {
    /// One line for reasons and `ctguard check`, e.g.
    /// `raise max 262144 → 393216, buckets 65536 → 98304 (RAM cap 2097152)`.
    pub fn describe(&self) -> String {
        if self.changes.is_empty() {
            return format!("nothing to raise (ceiling {})", self.ceiling.max);
        }
        let parts: Vec<String> = self.changes.iter().map(Change::describe).collect();
        format!("raise {} (RAM cap {})", parts.join(", "), self.ceiling.max)
    }
}

/// `new max = max(headroom × count, min_step × max)`, lowered to the ceiling; never below
/// the count, never a decrease. Buckets follow as `max / divisor` (with max no higher than
/// the ceiling, so buckets stay in the budget even where an admin set max above it), only
/// ever grown, and only when `buckets_may_change` (the hash-resize rate limit).
pub fn plan_raise(
    policy: &RaiseLimits,
    host: &HostMemory,
    count: u64,
    max: u64,
    buckets: Option<u64>,
    buckets_may_change: bool,
) -> RaisePlan {
    let ceiling = policy.ceiling(host);
    let wanted = scale(count, policy.headroom).max(scale(max, policy.min_step));
    let new_max = wanted.min(ceiling.max);
    let mut changes = Vec::new();
    let effective_max = if new_max > max && new_max >= count {
        changes.push(Change {
            knob: Knob::Max,
            from: max,
            to: new_max,
        });
        new_max
    } else {
        max
    };
    if let Some(buckets) = buckets {
        let wanted_buckets = effective_max.min(ceiling.max) / policy.buckets_divisor;
        if buckets_may_change && wanted_buckets > buckets {
            changes.push(Change {
                knob: Knob::Buckets,
                from: buckets,
                to: wanted_buckets,
            });
        }
    }
    RaisePlan { changes, ceiling }
}

/// `value × factor`, rounded up, saturating.
fn scale(value: u64, factor: f64) -> u64 {
    let scaled = (value as f64 * factor).ceil();
    if scaled >= u64::MAX as f64 {
        u64::MAX
    } else {
        scaled as u64
    }
}

/// The timeouts `shorten_timeouts` would change. `current` holds the values in force;
/// `shortened_before` says which ctguard has already shortened in this incident. The first
/// shortening goes to the target if the timeout is longer; after that (or if it is already
/// at or below the target) it halves; never below the floor, never a lengthening.
pub fn plan_shorten(
    policy: &ShortenTimeouts,
    current: &BTreeMap<TimeoutKnob, u64>,
    shortened_before: impl Fn(TimeoutKnob) -> bool,
) -> Vec<Change> {
    policy
        .timeouts
        .iter()
        .filter_map(|(&knob, t)| {
            let now = *current.get(&knob)?;
            let proposed = if now > t.target && !shortened_before(knob) {
                t.target
            } else {
                now / 2
            };
            let to = proposed.max(t.floor);
            (to < now).then_some(Change {
                knob: Knob::Timeout(knob),
                from: now,
                to,
            })
        })
        .collect()
}

/// Ports `notrack_hot_ports` would untrack: allowed, not denied, never NATed or forwarded,
/// holding at least `min_share` of `count`, not already untracked; biggest first, up to
/// `max_ports` in force at once.
pub fn plan_notrack<V>(
    policy: &NotrackHotPorts,
    hot_ports: &[PortLoad],
    count: u64,
    untracked: &BTreeMap<PortKey, V>,
) -> Vec<(PortKey, u64)> {
    let room = (policy.max_ports as usize).saturating_sub(untracked.len());
    let mut eligible: Vec<(PortKey, u64)> = hot_ports
        .iter()
        .filter(|p| {
            !untracked.contains_key(&p.key())
                && !p.nat_or_forwarded
                && policy.allow.contains(&p.port)
                && !policy.deny.contains(&p.port)
                && count > 0
                && p.entries as f64 / count as f64 >= policy.min_share
        })
        .map(|p| (p.key(), p.entries))
        .collect();
    eligible.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    eligible.dedup_by(|a, b| a.0 == b.0);
    eligible.truncate(room);
    eligible
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Proto;
    use crate::observe::memory::EntrySizeSource;
    use crate::policy::Policy;

    fn host() -> HostMemory {
        HostMemory {
            mem_total_bytes: 4 << 30,
            entry_bytes: 256,
            entry_bytes_source: EntrySizeSource::Slabinfo,
            pointer_bits: 64,
        }
    }

    #[test]
    fn raise_takes_the_larger_step_within_the_ceiling() {
        let p = Policy::embedded_default().stages.raise_limits;
        let plan = plan_raise(&p, &host(), 240_000, 262_144, Some(65_536), true);
        // 1.5 × 240000 = 360000 > 1.25 × 262144 = 327680.
        assert_eq!(plan.changes[0].to, 360_000);
        assert_eq!(plan.changes[1].to, 90_000);
        // 5% of 4 GiB ≈ 214.7 MB → ≈ 832k entries: the ceiling stops a raise from 800k.
        let capped = plan_raise(&p, &host(), 800_000, 800_000, None, true);
        assert_eq!(capped.changes[0].to, capped.ceiling.max);
        let none = plan_raise(&p, &host(), 10, capped.ceiling.max, None, true);
        assert!(none.changes.is_empty(), "{}", none.describe());
    }

    #[test]
    fn buckets_stay_in_the_budget_when_max_is_already_above_it() {
        let p = Policy::embedded_default().stages.raise_limits;
        let ceiling = p.ceiling(&host()).max;
        // An admin set max to twice the ceiling; buckets are still small.
        let plan = plan_raise(&p, &host(), 10, 2 * ceiling, Some(1024), true);
        assert_eq!(
            plan.changes,
            [Change {
                knob: Knob::Buckets,
                from: 1024,
                to: ceiling / p.buckets_divisor
            }],
            "{}",
            plan.describe()
        );
    }

    #[test]
    fn shorten_goes_to_target_then_halves_to_the_floor() {
        let p = Policy::embedded_default().stages.shorten_timeouts;
        let current = BTreeMap::from([(TimeoutKnob::Established, 432_000), (TimeoutKnob::Udp, 10)]);
        let first = plan_shorten(&p, &current, |_| false);
        assert_eq!(
            first,
            [
                Change {
                    knob: Knob::Timeout(TimeoutKnob::Established),
                    from: 432_000,
                    to: 3_600
                },
                Change {
                    knob: Knob::Timeout(TimeoutKnob::Udp),
                    from: 10,
                    to: 5
                },
            ]
        );
        let at_floor = BTreeMap::from([(TimeoutKnob::Established, 600)]);
        assert!(plan_shorten(&p, &at_floor, |_| true).is_empty());
    }

    #[test]
    fn notrack_respects_lists_and_nat() {
        let mut p = Policy::embedded_default().stages.notrack_hot_ports.unwrap();
        p.allow = [80, 443].into();
        let load = |port, entries, nat| PortLoad {
            proto: Proto::Tcp,
            port,
            entries,
            nat_or_forwarded: nat,
        };
        let ports = [
            load(22, 500, false),
            load(443, 300, false),
            load(80, 400, true),
        ];
        let plan = plan_notrack(&p, &ports, 1000, &BTreeMap::<PortKey, ()>::new());
        assert_eq!(
            plan,
            [(
                PortKey {
                    proto: Proto::Tcp,
                    port: 443
                },
                300
            )]
        );
    }

    #[test]
    fn notrack_fills_the_room_left_with_ports_not_yet_untracked() {
        let mut p = Policy::embedded_default().stages.notrack_hot_ports.unwrap();
        p.allow = [80, 443, 8080].into();
        p.max_ports = 2;
        let load = |port, entries| PortLoad {
            proto: Proto::Tcp,
            port,
            entries,
            nat_or_forwarded: false,
        };
        let key = |port| PortKey {
            proto: Proto::Tcp,
            port,
        };
        let ports = [load(80, 500), load(443, 300), load(8080, 200)];
        // 80 is untracked already and still the hottest: it must not take the one free slot.
        let untracked = BTreeMap::from([(key(80), ())]);
        assert_eq!(
            plan_notrack(&p, &ports, 1000, &untracked),
            [(key(443), 300)]
        );
        let full = BTreeMap::from([(key(80), ()), (key(22), ())]);
        assert!(plan_notrack(&p, &ports, 1000, &full).is_empty());
    }
}
