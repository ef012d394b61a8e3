//! Engine behaviours that need a specific sequence: an operator's own change wins over
//! rollback, and a failed change is retried only after its cooldown plus back-off.

use ctguard::engine::{Action, Engine, Input, Outcome};
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
    e.observe(secs(0), sample(230_000, 262_144));
    let d = e.observe(secs(10), sample(230_000, 262_144));
    let raised = match &d[..] {
        [first] => match &first.action {
            Action::Apply(c) if c[0].knob == Knob::Max => c[0].to,
            other => panic!("expected a raise of max, got {other:?}"),
        },
        other => panic!("expected one decision, got {other:?}"),
    };
    // Reported 31 s later, past the 30 s cooldown; no sample in between.
    let next = e.outcome(secs(41), d[0].id, Outcome::Applied);
    let Some(Action::Apply(changes)) = next.first().map(|d| &d.action) else {
        panic!("expected the raise to continue at once, got {next:?}");
    };
    let max = changes.iter().find(|c| c.knob == Knob::Max);
    assert_eq!(max.map(|c| c.from), Some(raised), "{next:?}");
}

/// Someone resets max (a firewall restart) right after ctguard raised it, before any
/// sample showed the raised value: the samples after the write show the reset, and the
/// next raise must start from it, or the executor refuses every raise as stale.
#[test]
fn a_reset_before_the_first_sample_after_a_raise_is_planned_from() {
    let mut e = engine();
    e.observe(secs(0), sample(230_000, 262_144));
    let d = e.observe(secs(10), sample(230_000, 262_144));
    assert!(
        matches!(&d[0].action, Action::Apply(c) if c[0].knob == Knob::Max),
        "{d:?}"
    );
    assert!(e.outcome(secs(10), d[0].id, Outcome::Applied).is_empty());
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
