//! Property tests of the decision engine over random valid policies and random observation
//! sequences: the safety invariants hold for every decision, runs are deterministic, and a
//! run on the synthetic world always ends with the original values restored.

use ctguard::engine::{Action, Decision, Engine, Input, Outcome, PortLoad, Proto};
use ctguard::knob::Knob;
use ctguard::observe::{ConntrackSample, ConntrackStats, KernelEvent};
use ctguard::policy::{Level, Mode, Policy};
use ctguard::simulate::trace::default_host;
use ctguard::simulate::world::{Load, World};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone)]
struct PolicyKnobs {
    mode: u8,
    warn_at: f64,
    gap: f64,
    hysteresis: f64,
    sustain: u64,
    max_changes: u32,
    window: u64,
    headroom: f64,
    min_step: f64,
    ram_share: f64,
    cap: Option<u64>,
    divisor: u64,
    bucket_interval: u64,
    cooldowns: [u64; 4],
    triggers: [u8; 4],
    notrack: bool,
    evict: bool,
    recover_share: f64,
    recover_for: u64,
    pause: u64,
    backoff_base: u64,
    backoff_max_factor: u32,
    under_pressure: u64,
}

fn policy_knobs() -> impl Strategy<Value = PolicyKnobs> {
    (
        (0u8..3, 0.4f64..0.7, 0.06f64..0.1, 0.01f64..0.05, 0u64..40),
        (
            1u32..24,
            1u64..120,
            1.05f64..3.0,
            1.05f64..2.0,
            0.001f64..0.5,
        ),
        (
            proptest::option::of(1u64..3_000_000),
            1u64..=16,
            0u64..1200,
            [1u64..120, 1u64..120, 1u64..120, 1u64..120],
        ),
        (
            [1u8..4, 1u8..4, 1u8..4, 1u8..4],
            any::<bool>(),
            any::<bool>(),
        ),
        (
            0.3f64..1.0,
            1u64..600,
            0u64..120,
            1u64..600,
            1u32..8,
            1u64..5,
        ),
    )
        .prop_map(
            |(
                (mode, warn_at, gap, hysteresis, sustain),
                (max_changes, window, headroom, min_step, ram_share),
                (cap, divisor, bucket_interval, cooldowns),
                (triggers, notrack, evict),
                (
                    recover_share,
                    recover_for,
                    pause,
                    backoff_base,
                    backoff_max_factor,
                    under_pressure,
                ),
            )| PolicyKnobs {
                mode,
                warn_at,
                gap,
                hysteresis,
                sustain,
                max_changes,
                window,
                headroom,
                min_step,
                ram_share,
                cap,
                divisor,
                bucket_interval,
                cooldowns,
                triggers,
                notrack,
                evict,
                recover_share,
                recover_for,
                pause,
                backoff_base,
                backoff_max_factor,
                under_pressure,
            },
        )
}

/// A valid policy from random knobs, built as TOML so it goes through validation.
fn build_policy(k: &PolicyKnobs) -> Policy {
    let mode = ["enforce", "dry-run", "observe"][k.mode as usize];
    let levels = [k.warn_at, k.warn_at + k.gap, k.warn_at + 2.0 * k.gap];
    let trigger = |i: usize| ["warn", "act", "critical"][k.triggers[i] as usize - 1];
    let lowest = k.triggers[..2]
        .iter()
        .chain(if k.notrack { &k.triggers[2..3] } else { &[] })
        .chain(if k.evict { &k.triggers[3..4] } else { &[] })
        .min()
        .copied()
        .unwrap();
    let recover_below = (levels[lowest as usize - 1] - k.hysteresis) * k.recover_share;
    let cap = k
        .cap
        .map_or(String::new(), |c| format!("absolute_cap = {c}"));
    let text = format!(
        r#"
mode = "{mode}"
[poll]
at_rest = "5s"
under_pressure = "{up}s"
[levels.warn]
at = {w}
clear_below = {wc}
sustain = "{s}s"
[levels.act]
at = {a}
clear_below = {ac}
sustain = "{s}s"
[levels.critical]
at = {c}
clear_below = {cc}
sustain = "0s"
[rate_limit]
max_changes = {mc}
window = "{win}s"
[backoff]
base = "{bb}s"
max = "{bm}s"
flap_window = "30m"
[stages.raise_limits]
enabled = true
trigger = "{t0}"
cooldown = "{c0}s"
headroom = {hr}
min_step = {ms}
ram_share = {rs}
{cap}
buckets_divisor = {div}
bucket_change_interval = "{bi}s"
[stages.shorten_timeouts]
enabled = true
trigger = "{t1}"
cooldown = "{c1}s"
[stages.shorten_timeouts.timeouts]
established = {{ target = "1h", floor = "10m" }}
time_wait = {{ target = "30s", floor = "10s" }}
syn_recv = {{ target = "30s", floor = "10s" }}
fin_wait = {{ target = "30s", floor = "10s" }}
udp = {{ target = "15s", floor = "5s" }}
[stages.notrack_hot_ports]
enabled = {nt}
trigger = "{t2}"
cooldown = "{c2}s"
min_share = 0.1
allow = [80, 443]
deny = [22]
max_ports = 2
expiry = "10m"
[stages.evict]
enabled = {ev}
trigger = "{t3}"
cooldown = "{c3}s"
states = ["time_wait"]
min_age = "10s"
batch = 5000
[rollback]
recover_below = {rb}
recover_for = "{rf}s"
pause = "{pa}s"
rollback_on_exit = true
"#,
        up = k.under_pressure,
        w = levels[0],
        wc = levels[0] - k.hysteresis,
        a = levels[1],
        ac = levels[1] - k.hysteresis,
        c = levels[2],
        cc = levels[2] - k.hysteresis,
        s = k.sustain,
        mc = k.max_changes,
        win = k.window,
        bb = k.backoff_base,
        bm = k.backoff_base * u64::from(k.backoff_max_factor),
        t0 = trigger(0),
        t1 = trigger(1),
        t2 = trigger(2),
        t3 = trigger(3),
        c0 = k.cooldowns[0],
        c1 = k.cooldowns[1],
        c2 = k.cooldowns[2],
        c3 = k.cooldowns[3],
        hr = k.headroom,
        ms = k.min_step,
        rs = k.ram_share,
        div = k.divisor,
        bi = k.bucket_interval,
        nt = k.notrack,
        ev = k.evict,
        rb = recover_below,
        rf = k.recover_for,
        pa = k.pause,
    );
    Policy::from_toml(&text, "generated").unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[derive(Debug, Clone)]
enum Step {
    Sample {
        dt: u64,
        count: u64,
        max: u64,
        buckets: Option<u64>,
        shorten: u64,
        drops: u64,
        reset: bool,
    },
    TableFull,
    HotPorts(u64),
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        6 => (1u64..30, 0u64..3_000_000, 1u64..3_000_000, proptest::option::of(1u64..1_000_000), 1u64..4, 0u64..3, any::<bool>())
            .prop_map(|(dt, count, max, buckets, shorten, drops, reset)| Step::Sample { dt, count, max, buckets, shorten, drops, reset: reset && drops == 0 }),
        1 => Just(Step::TableFull),
        1 => (0u64..1_000_000).prop_map(Step::HotPorts),
    ];
    proptest::collection::vec(step, 1..120)
}

/// Every decision with the sample the engine had seen when it was made.
struct Record {
    at: Duration,
    sample: ConntrackSample,
    decision: Decision,
}

fn outcome_for(code: u8) -> Outcome {
    match code % 8 {
        0 => Outcome::NotPermitted("EACCES".into()),
        1 => Outcome::Failed("EIO".into()),
        _ => Outcome::Applied,
    }
}

/// Feeds random raw observations; outcomes come from `codes`.
fn run_random(policy: &Policy, steps: &[Step], codes: &[u8]) -> Vec<Record> {
    let mut engine = Engine::new(policy.clone(), default_host());
    let defaults = World::kernel_defaults().sample().timeouts;
    let mut now = Duration::ZERO;
    let mut stats = ConntrackStats::default();
    let mut last = ConntrackSample::default();
    let mut records = Vec::new();
    let mut code = codes.iter().cycle();
    for step in steps {
        let input = match step {
            Step::Sample {
                dt,
                count,
                max,
                buckets,
                shorten,
                drops,
                reset,
            } => {
                now += Duration::from_secs(*dt);
                if *reset {
                    stats = ConntrackStats::default();
                }
                stats.drop += drops;
                last = ConntrackSample {
                    count: *count,
                    max: *max,
                    buckets: *buckets,
                    timeouts: defaults
                        .iter()
                        .map(|(&k, &v)| (k, (v / shorten).max(1)))
                        .collect(),
                    stats: Some(stats),
                };
                Input::Sample(last.clone())
            }
            Step::TableFull => Input::Kernel(KernelEvent::TableFull { netns: None }),
            Step::HotPorts(entries) => Input::HotPorts(vec![
                PortLoad {
                    proto: Proto::Tcp,
                    port: 443,
                    entries: *entries,
                    nat_or_forwarded: false,
                },
                PortLoad {
                    proto: Proto::Tcp,
                    port: 80,
                    entries: entries / 2,
                    nat_or_forwarded: true,
                },
            ]),
        };
        let mut queue: Vec<Decision> = engine.observe(now, input);
        while let Some(d) = queue.pop() {
            records.push(Record {
                at: now,
                sample: last.clone(),
                decision: d.clone(),
            });
            if !d.action.is_dry_run() {
                queue.extend(engine.outcome(now, d.id, outcome_for(*code.next().unwrap())));
            }
        }
    }
    records
}

fn check_invariants(policy: &Policy, records: &[Record], originals: &BTreeMap<Knob, u64>) {
    let ceiling = policy.stages.raise_limits.ceiling(&default_host());
    for r in records {
        let action = match &r.decision.action {
            Action::DryRun(inner) => {
                assert_eq!(policy.mode, Mode::DryRun, "dry-run action outside dry-run");
                inner.as_ref()
            }
            a => {
                assert_eq!(
                    policy.mode,
                    Mode::Enforce,
                    "{a:?} in mode {:?}",
                    policy.mode
                );
                a
            }
        };
        if let Action::Revert(changes) = action {
            for c in changes {
                if let Some(&orig) = originals.get(&c.knob) {
                    match c.knob {
                        // Timeouts come back in doubling steps, never past the original.
                        Knob::Timeout(_) => assert!(c.from < c.to && c.to <= orig, "{c:?}"),
                        _ => assert_eq!(c.to, orig, "{c:?} does not restore the original"),
                    }
                }
            }
        }
        if let Action::Apply(changes) = action {
            for c in changes {
                assert!(c.to > c.from || matches!(c.knob, Knob::Timeout(_)), "{c:?}");
                match c.knob {
                    Knob::Max => {
                        assert!(
                            c.to >= r.sample.count,
                            "max {c:?} below count {}",
                            r.sample.count
                        );
                        assert!(c.to <= ceiling.max, "max {c:?} above ceiling {ceiling:?}");
                    }
                    Knob::Buckets => assert!(c.to > c.from, "buckets shrunk: {c:?}"),
                    Knob::Timeout(t) => {
                        let target = policy.stages.shorten_timeouts.timeouts[&t];
                        assert!(c.to < c.from, "timeout not shortened: {c:?}");
                        assert!(c.to >= target.floor, "timeout below floor: {c:?}");
                        if let Some(&orig) = originals.get(&c.knob) {
                            assert!(c.to <= orig, "timeout above original: {c:?}");
                        }
                    }
                }
            }
        }
    }
    // Rate limit over every window ending at a decision.
    let window = policy.rate_limit.window;
    for (i, r) in records.iter().enumerate() {
        let used: u32 = records[..=i]
            .iter()
            .filter(|o| r.at.saturating_sub(o.at) < window)
            .map(|o| o.decision.action.change_count())
            .sum();
        assert!(
            used <= policy.rate_limit.max_changes,
            "{used} changes within {window:?} at {:?}, limit {}",
            r.at,
            policy.rate_limit.max_changes
        );
    }
}

fn world_load(entries_m: f64) -> Load {
    ctguard::simulate::Scenario::Flood
        .load(Duration::ZERO)
        .with_entries(entries_m * 262_144.0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_observations_keep_the_invariants_and_are_deterministic(
        knobs in policy_knobs(),
        steps in steps(),
        codes in proptest::collection::vec(any::<u8>(), 1..16),
    ) {
        let policy = build_policy(&knobs);
        let first = run_random(&policy, &steps, &codes);
        check_invariants(&policy, &first, &BTreeMap::new());
        if policy.mode == Mode::Observe {
            prop_assert!(first.is_empty(), "observe mode decided {:?}", first[0].decision);
        }
        let second = run_random(&policy, &steps, &codes);
        let a: Vec<&Decision> = first.iter().map(|r| &r.decision).collect();
        let b: Vec<&Decision> = second.iter().map(|r| &r.decision).collect();
        prop_assert_eq!(a, b);
    }

    #[test]
    fn world_runs_end_with_the_original_values(
        knobs in policy_knobs(),
        phases in proptest::collection::vec((0.0f64..8.0, 10u64..900), 1..6),
        failures in proptest::collection::vec(any::<bool>(), 1..8),
        stop_early in any::<bool>(),
    ) {
        let mut knobs = knobs;
        knobs.mode = 0; // enforce: the world must really change and come back
        let policy = build_policy(&knobs);
        let mut world = World::kernel_defaults();
        let original = world.clone();
        let originals: BTreeMap<Knob, u64> = original
            .sample()
            .timeouts
            .iter()
            .map(|(&k, &v)| (Knob::Timeout(k), v))
            .chain([(Knob::Max, original.max), (Knob::Buckets, original.buckets)])
            .collect();
        let mut engine = Engine::new(policy.clone(), default_host());
        let mut records = Vec::new();
        let mut now = Duration::ZERO;
        let mut fail = failures.iter().cycle();
        // The load phases, then six calm hours for a full rollback.
        let mut schedule: Vec<(f64, u64)> = phases.clone();
        if !stop_early {
            schedule.push((0.02, 6 * 3600));
        }
        for (entries_m, seconds) in schedule {
            let load = world_load(entries_m);
            let end = now + Duration::from_secs(seconds);
            while now < end {
                let dt = engine.state().poll_interval;
                world.advance(dt, &load);
                now += dt;
                let sample = world.sample();
                let mut queue = engine.observe(now, Input::Sample(sample.clone()));
                if engine.state().wants_hot_ports {
                    let ports = vec![PortLoad { proto: Proto::Tcp, port: 443, entries: (world.count * 0.45) as u64, nat_or_forwarded: false }];
                    queue.extend(engine.observe(now, Input::HotPorts(ports)));
                }
                while let Some(d) = queue.pop() {
                    records.push(Record { at: now, sample: sample.clone(), decision: d.clone() });
                    let outcome = if *fail.next().unwrap() && matches!(d.action, Action::Apply(_)) {
                        Outcome::Failed("EIO".into())
                    } else {
                        world.carry_out(&d.action)
                    };
                    queue.extend(engine.outcome(now, d.id, outcome));
                }
            }
        }
        check_invariants(&policy, &records, &originals);
        if stop_early {
            for d in engine.shutdown(now) {
                world.carry_out(&d.action);
            }
        }
        prop_assert_eq!(world.max, original.max);
        prop_assert_eq!(world.buckets, original.buckets);
        prop_assert_eq!(&world.timeouts, &original.timeouts);
        let state = engine.state();
        if !stop_early {
            prop_assert!(state.applied.is_empty(), "{:?}", state.applied);
            prop_assert!(state.notracked.is_empty());
            prop_assert_eq!(state.level, Level::Normal);
            prop_assert!(state.incident.is_none());
        }
    }
}
