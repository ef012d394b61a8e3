//! Engine behaviours that need a specific sequence: an operator's own change wins over
//! rollback, and a failed change is retried only after its cooldown plus back-off.

use ctguard::engine::{Action, DecisionId, Engine, Input, Outcome};
use ctguard::knob::Knob;
use ctguard::observe::ConntrackSample;
use ctguard::policy::Policy;
use ctguard::simulate::trace::default_host;
use std::time::Duration;

fn sample(count: u64, max: u64) -> Input {
    Input::Sample(ConntrackSample {
        count,
        max,
        ..Default::default()
    })
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Default policy: act at 0.85 sustained 10s; raise cooldown 30s; back-off base 5m.
fn engine() -> Engine {
    Engine::new(Policy::embedded_default(), default_host())
}

/// Holds the table at 0.877 full for act's 10 s sustain: the one decision, a raise of max,
/// and the max it raises to.
fn raise_max(e: &mut Engine) -> (DecisionId, u64) {
    e.observe(secs(0), sample(230_000, 262_144));
    let d = e.observe(secs(10), sample(230_000, 262_144));
    match &d[..] {
        [first] => match &first.action {
            Action::Apply(c) if c[0].knob == Knob::Max => (first.id, c[0].to),
            other => panic!("expected a raise of max, got {other:?}"),
        },
        other => panic!("expected one decision, got {other:?}"),
    }
}

#[test]
fn a_max_the_operator_changed_is_left_as_set() {
    let mut e = engine();
    assert!(e.observe(secs(0), sample(230_000, 262_144)).is_empty());
    let d = e.observe(secs(10), sample(230_000, 262_144));
    assert!(
        matches!(&d[0].action, Action::Apply(c) if c[0].knob == Knob::Max),
        "{d:?}"
    );
    let raised = match &d[0].action {
        Action::Apply(c) => c[0].to,
        _ => unreachable!(),
    };
    assert!(e.outcome(secs(10), d[0].id, Outcome::Applied).is_empty());
    // The kernel shows ctguard's value, then an operator sets their own.
    assert!(e.observe(secs(11), sample(230_000, raised)).is_empty());
    let mut decisions = Vec::new();
    for t in (12..2000).step_by(5) {
        decisions.extend(e.observe(secs(t), sample(1_000, 1_000_000)));
    }
    assert!(
        decisions.is_empty(),
        "reverted an operator's max: {decisions:?}"
    );
    assert!(e.state().applied.is_empty());
    assert!(e.state().incident.is_none());
}

#[test]
fn a_failed_change_waits_for_cooldown_plus_backoff() {
    let mut e = engine();
    e.observe(secs(0), sample(230_000, 262_144));
    let d = e.observe(secs(10), sample(230_000, 262_144));
    assert_eq!(d.len(), 1);
    assert!(
        e.outcome(secs(10), d[0].id, Outcome::Failed("EIO".into()))
            .is_empty()
    );
    // Cooldown 30s + back-off 5m: nothing before 5m40s (the level stays at act).
    for t in 11..340 {
        let d = e.observe(secs(t), sample(230_000, 262_144));
        assert!(d.is_empty(), "retried at {t}s: {d:?}");
    }
    let retry = e.observe(secs(340), sample(230_000, 262_144));
    assert_eq!(retry.len(), 1, "no retry after the back-off");
    assert_eq!(retry[0].stage, d[0].stage);
}

#[test]
fn notrack_is_renewed_at_half_its_lifetime_while_pressure_lasts() {
    use ctguard::engine::{PortLoad, Proto};
    let text = std::fs::read_to_string("policies/web-server.toml").unwrap();
    let policy = Policy::from_toml(&text, "web-server.toml").unwrap();
    let expiry = policy.stages.notrack_hot_ports.as_ref().unwrap().expiry;
    let mut e = Engine::new(policy, default_host());
    let hot = vec![PortLoad {
        proto: Proto::Tcp,
        port: 443,
        entries: 200_000,
        nat_or_forwarded: false,
    }];
    e.observe(secs(0), Input::HotPorts(hot.clone()));
    // Every other stage is refused here, so NOTRACK comes at once.
    let mut pending = e.observe(secs(0), sample(262_144, 262_144));
    let mut notracked_at = None;
    while let Some(d) = pending.pop() {
        let outcome = if matches!(d.action, Action::Notrack { .. }) {
            notracked_at = Some(secs(0));
            Outcome::Applied
        } else {
            Outcome::NotPermitted("not in this test".into())
        };
        pending.extend(e.outcome(secs(0), d.id, outcome));
    }
    assert!(notracked_at.is_some(), "{:?}", e.state());

    // Pressure persists: a renewal comes once half the lifetime has passed, not before.
    let half = expiry / 2;
    let early = e.observe(half - secs(5), sample(262_144, 262_144));
    assert!(
        !early.iter().any(|d| d.reason.contains("renew")),
        "{early:?}"
    );
    let renewal = e.observe(half, sample(262_144, 262_144));
    assert!(
        matches!(&renewal[..], [d] if d.reason.contains("renew NOTRACK tcp/443")),
        "{renewal:?}"
    );
    assert!(e.outcome(half, renewal[0].id, Outcome::Applied).is_empty());
    assert_eq!(e.state().notracked.len(), 1);
}

/// After a restart, an exemption the previous run made still counts against `max_ports`.
#[test]
fn an_adopted_notrack_counts_against_max_ports() {
    use ctguard::engine::{PortKey, PortLoad, Proto};
    let text = std::fs::read_to_string("policies/web-server.toml").unwrap();
    let mut policy = Policy::from_toml(&text, "web-server.toml").unwrap();
    policy.stages.notrack_hot_ports.as_mut().unwrap().max_ports = 1;
    let mut e = Engine::new(policy, default_host());
    let web = PortKey {
        proto: Proto::Tcp,
        port: 80,
    };
    e.adopt_notrack(secs(0), web, secs(600));
    let hot = vec![PortLoad {
        proto: Proto::Tcp,
        port: 443,
        entries: 200_000,
        nat_or_forwarded: false,
    }];
    e.observe(secs(0), Input::HotPorts(hot));
    let mut pending = e.observe(secs(0), sample(262_144, 262_144));
    while let Some(d) = pending.pop() {
        assert!(
            !matches!(&d.action, Action::Notrack { ports, .. } if !ports.contains(&web)),
            "a second port beyond max_ports 1: {d:?}"
        );
        pending.extend(e.outcome(secs(0), d.id, Outcome::NotPermitted("not here".into())));
    }
    assert_eq!(e.state().notracked, [web]);
}

/// An outcome can arrive after the stage's cooldown (a slow journal fsync on a busy disk)
/// and before the next sample: the engine must plan from the value it set, not from the
/// sample taken before the write, or the executor refuses the change as stale.
#[test]
fn a_late_outcome_plans_the_next_change_from_the_value_set() {
    let mut e = engine();
    let (id, raised) = raise_max(&mut e);
    // Reported 31 s later, past the 30 s cooldown; no sample in between.
    let next = e.outcome(secs(41), id, Outcome::Applied);
    let Some(Action::Apply(changes)) = next.first().map(|d| &d.action) else {
        panic!("expected the raise to continue at once, got {next:?}");
    };
    let max = changes.iter().find(|c| c.knob == Knob::Max);
    assert_eq!(max.map(|c| c.from), Some(raised), "{next:?}");
}

/// A reload to dry-run while a real change is in force: the rollback must not merely
/// pretend to restore it (and forget it, leaving it in force past `rollback_on_exit`).
#[test]
fn a_real_change_is_restored_after_a_reload_to_dry_run() {
    use ctguard::policy::Mode;
    let mut e = engine();
    let (id, raised) = raise_max(&mut e);
    assert!(e.outcome(secs(10), id, Outcome::Applied).is_empty());
    let mut dry = Policy::embedded_default();
    dry.mode = Mode::DryRun;
    e.replace_policy(dry);
    let mut reverted = None;
    for t in (11..2000).step_by(5) {
        for d in e.observe(secs(t), sample(1_000, raised)) {
            match &d.action {
                Action::Revert(c) if c.iter().any(|c| c.knob == Knob::Max) => {
                    reverted = Some(d.clone());
                    e.outcome(secs(t), d.id, Outcome::Applied);
                }
                other => panic!("a real change pretended away: {other:?}"),
            }
        }
        if reverted.is_some() {
            break;
        }
    }
    assert!(reverted.is_some(), "max never restored: {:?}", e.state());
    assert!(e.state().applied.is_empty(), "{:?}", e.state());
}

/// A disabled stage does not act: its NOTRACK exemptions still in force (here adopted
/// from a previous run) are left to expire, not renewed while pressure lasts.
#[test]
fn a_disabled_notrack_stage_does_not_renew_its_exemptions() {
    use ctguard::engine::{PortKey, Proto};
    let policy = Policy::embedded_default();
    assert!(
        !policy
            .stages
            .notrack_hot_ports
            .as_ref()
            .unwrap()
            .common
            .enabled
    );
    let mut e = Engine::new(policy, default_host());
    let web = PortKey {
        proto: Proto::Tcp,
        port: 443,
    };
    e.adopt_notrack(secs(0), web, secs(60));
    let mut pending = e.observe(secs(50), sample(262_144, 262_144));
    while let Some(d) = pending.pop() {
        assert!(
            !matches!(d.action, Action::Notrack { .. }),
            "a disabled stage renewed NOTRACK: {d:?}"
        );
        pending.extend(e.outcome(secs(50), d.id, Outcome::NotPermitted("not here".into())));
    }
}

/// Cooldown is the least time between two firings, also when an incident closed between.
#[test]
fn cooldown_holds_across_a_short_incident() {
    let mut p = Policy::embedded_default();
    p.stages.raise_limits.common.cooldown = secs(600);
    p.rollback.recover_for = secs(5);
    p.rollback.pause = secs(0);
    p.stages.shorten_timeouts.common.enabled = false;
    let mut e = Engine::new(p, default_host());
    let mut max = 262_144;
    let mut fired = Vec::new();
    for t in (0..400).step_by(1) {
        let count = if (t / 50) % 2 == 0 { 250_000 } else { 1_000 };
        let mut pending = e.observe(secs(t), sample(count, max));
        while let Some(d) = pending.pop() {
            match &d.action {
                Action::Apply(c) => {
                    fired.push(t);
                    max = c.iter().find(|c| c.knob == Knob::Max).map_or(max, |c| c.to);
                }
                Action::Revert(c) => {
                    max = c.iter().find(|c| c.knob == Knob::Max).map_or(max, |c| c.to);
                }
                _ => {}
            }
            pending.extend(e.outcome(secs(t), d.id, Outcome::Applied));
        }
    }
    assert!(!fired.is_empty(), "never fired");
    for w in fired.windows(2) {
        assert!(w[1] - w[0] >= 600, "fired at {fired:?}");
    }
}

/// After a reload that raises a level's `at`, the level is reached only once the new
/// threshold has been reached, not kept from the old one.
#[test]
fn a_reload_raising_a_threshold_does_not_keep_a_level_never_reached() {
    use ctguard::policy::Level;
    let mut e = engine();
    e.observe(secs(0), sample(230_000, 262_144)); // 0.877
    e.observe(secs(10), sample(230_000, 262_144));
    let mut p = Policy::embedded_default();
    p.levels.act.at = 0.92;
    p.levels.act.clear_below = 0.86;
    p.levels.critical.at = 0.97;
    p.levels.critical.clear_below = 0.93;
    e.replace_policy(p);
    e.observe(secs(20), sample(230_000, 262_144));
    // 0.877 is inside the new act band (0.86..0.92) but never reached 0.92.
    assert!(e.state().level < Level::Act, "{:?}", e.state());
}

#[test]
fn drops_across_a_sample_without_counters_still_count() {
    use ctguard::observe::ConntrackStats;
    use ctguard::policy::Level;
    let with_drops = |drop| {
        Input::Sample(ConntrackSample {
            count: 100,
            max: 1000,
            stats: Some(ConntrackStats {
                drop,
                ..Default::default()
            }),
            ..Default::default()
        })
    };
    let mut e = engine();
    e.observe(secs(0), with_drops(5));
    // /proc/net/stat could not be read once…
    e.observe(secs(1), sample(100, 1000));
    assert_eq!(e.state().level, Level::Normal);
    // …and the drops that happened meanwhile show at the next reading.
    e.observe(secs(2), with_drops(9));
    assert_eq!(e.state().level, Level::Critical);
}

/// Someone resets max (a firewall restart) right after ctguard raised it, before any
/// sample showed the raised value: the samples after the write show the reset, and the
/// next raise must start from it, or the executor refuses every raise as stale.
#[test]
fn a_reset_before_the_first_sample_after_a_raise_is_planned_from() {
    let mut e = engine();
    let (id, _) = raise_max(&mut e);
    assert!(e.outcome(secs(10), id, Outcome::Applied).is_empty());
    // Every sample after the write shows the original again, the table still as full.
    let mut next = Vec::new();
    for t in 11..=45 {
        next = e.observe(secs(t), sample(262_000, 262_144));
        if !next.is_empty() {
            break;
        }
    }
    let max = next.iter().find_map(|d| match &d.action {
        Action::Apply(c) => c.iter().find(|c| c.knob == Knob::Max),
        _ => None,
    });
    assert_eq!(max.map(|c| c.from), Some(262_144), "{next:?}");
}
