//! Clock jumps: the engine is immune because it never reads a clock. The daemon feeds it
//! `Instant::elapsed()` since start, which is CLOCK_MONOTONIC: `date -s`, NTP steps and
//! suspend-free VM migrations do not move it. So:
//! - the engine's decisions depend only on the time between inputs, not on where the
//!   timeline starts (a daemon started long ago, or just now);
//! - neither the engine nor the daemon reads the wall clock (checked in the sources; the
//!   journal's `recorded_at` is wall-clock time for people and is never compared).
//!
//! Wall-clock changes are not exercised on the host: tests never change the host clock.

use ctguard::engine::{Engine, Input, Outcome};
use ctguard::observe::ConntrackSample;
use ctguard::policy::Policy;
use ctguard::simulate::trace::default_host;
use proptest::prelude::*;
use std::time::Duration;

/// A fill, an incident and a recovery; each decision is applied. Returns what was
/// decided, at which offset from `start`.
fn run_incident(start: Duration) -> Vec<(Duration, String)> {
    let mut engine = Engine::new(Policy::embedded_default(), default_host());
    let mut max = 262_144;
    let mut log = Vec::new();
    let counts = (0..40)
        .map(|i| 200_000 + i * 2_000)
        .chain(std::iter::repeat_n(1_000, 400));
    for (step, count) in counts.enumerate() {
        let now = start + Duration::from_secs(5 * step as u64);
        let sample = Input::Sample(ConntrackSample {
            count,
            max,
            ..Default::default()
        });
        let mut pending = engine.observe(now, sample);
        while let Some(decision) = pending.pop() {
            if let ctguard::engine::Action::Apply(changes) = &decision.action {
                for c in changes {
                    if c.knob == ctguard::knob::Knob::Max {
                        max = c.to;
                    }
                }
            }
            log.push((now - start, format!("{:?}", decision.action)));
            pending.extend(engine.outcome(now, decision.id, Outcome::Applied));
        }
    }
    log
}

proptest! {
    #[test]
    fn decisions_do_not_depend_on_where_the_timeline_starts(
        start_secs in 0u64..(20 * 365 * 86_400),
    ) {
        let at_zero = run_incident(Duration::ZERO);
        prop_assert!(!at_zero.is_empty(), "the scenario decides nothing");
        prop_assert_eq!(run_incident(Duration::from_secs(start_secs)), at_zero);
    }
}

#[test]
fn engine_and_daemon_never_read_the_wall_clock() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.join("daemon.rs")];
    for entry in std::fs::read_dir(src.join("engine")).unwrap() {
        files.push(entry.unwrap().path());
    }
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for wall in ["SystemTime", "UNIX_EPOCH", "chrono", "time::now"] {
            assert!(
                !text.contains(wall),
                "{} uses {wall}: the engine must run on monotonic time",
                file.display()
            );
        }
    }
}
