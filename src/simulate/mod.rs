//! Simulation: the engine on a virtual clock, against a synthetic world or a recorded trace.
//!
//! - [`run_scenario`] drives the engine with a built-in [`Scenario`] on a [`World`] that
//!   reacts to what the engine decides (a raised max lowers the ratio, shorter timeouts
//!   let the count fall, NOTRACK removes a port's share). Samples are taken at the poll
//!   interval the engine asks for.
//! - [`replay_trace`] feeds a recorded [`trace::Trace`]; the recording cannot react, so
//!   decisions are only reported (and answered `Applied`, or `NotPermitted` for global
//!   knobs when simulating a non-initial namespace).
//!
//! Both return a [`Timeline`]: one row per decision, outcome, level change and incident
//! boundary. Everything is deterministic: the same inputs give the same timeline.

pub mod scenario;
pub mod trace;
pub mod world;

pub use scenario::Scenario;
pub use world::World;

use crate::engine::{Action, Decision, DecisionId, Engine, IncidentId, Input, Outcome};
use crate::knob::Knob;
use crate::observe::ConntrackSample;
use crate::observe::memory::HostMemory;
use crate::policy::{Level, Policy, StageKind};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;
use trace::{Trace, TraceBody};

/// How to simulate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimOptions {
    /// Refuse global knobs (max, buckets) as a non-initial network namespace does.
    pub non_initial_netns: bool,
}

/// What happened at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    Level {
        from: Level,
        to: Level,
    },
    IncidentOpened {
        id: IncidentId,
    },
    IncidentClosed {
        id: IncidentId,
    },
    Decision {
        id: DecisionId,
        stage: StageKind,
        action: Action,
        reason: String,
    },
    Outcome {
        id: DecisionId,
        outcome: String,
    },
}

/// One timeline row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub t_ms: u64,
    pub count: u64,
    pub max: u64,
    pub ratio: f64,
    pub level: Level,
    pub event: Event,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Timeline {
    pub rows: Vec<Row>,
    /// Every sample the engine saw, `(t_ms, count, max)`: rows come only with events, a
    /// chart of the table needs the quiet stretches too. Not part of the printed timeline.
    #[serde(skip)]
    pub samples: Vec<(u64, u64, u64)>,
}

impl Timeline {
    /// The human-readable timeline, one row a line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:>8}  {:>17}  {:>5}  {:<8}  event",
            "time", "count/max", "ratio", "level"
        );
        for row in &self.rows {
            let _ = writeln!(
                out,
                "{:>8}  {:>17}  {:>5.2}  {:<8}  {}",
                clock(row.t_ms),
                format!("{}/{}", row.count, row.max),
                row.ratio,
                row.level.name(),
                describe(&row.event)
            );
        }
        out
    }

    /// JSON lines, one row each.
    pub fn to_json_lines(&self) -> String {
        self.rows
            .iter()
            .map(|r| serde_json::to_string(r).expect("timeline rows serialize") + "\n")
            .collect()
    }

    /// The decisions in order (for tests and summaries).
    pub fn decisions(&self) -> impl Iterator<Item = (&Row, &Action, StageKind)> {
        self.rows.iter().filter_map(|r| match &r.event {
            Event::Decision { action, stage, .. } => Some((r, action, *stage)),
            _ => None,
        })
    }
}

/// `h:mm:ss`.
fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn describe(event: &Event) -> String {
    match event {
        Event::Level { from, to } => format!("level {} → {}", from.name(), to.name()),
        Event::IncidentOpened { id } => format!("{id} opened"),
        Event::IncidentClosed { id } => format!("{id} closed"),
        Event::Decision {
            id,
            stage,
            action,
            reason,
        } => {
            let verb = match action {
                Action::DryRun(_) => "would",
                Action::Revert(_) | Action::Untrack { .. } => "rollback",
                _ => "do",
            };
            format!("{id} {verb} {}: {reason}", stage.name())
        }
        Event::Outcome { id, outcome } => format!("{id} {outcome}"),
    }
}

/// Feeds the engine and records the timeline; shared by scenarios and trace replay.
struct Recorder {
    engine: Engine,
    timeline: Timeline,
    level: Level,
    incident: Option<IncidentId>,
    /// The table as last sampled, for the row columns.
    count: u64,
    max: u64,
}

impl Recorder {
    fn new(policy: Policy, host: HostMemory) -> Self {
        Recorder {
            engine: Engine::new(policy, host),
            timeline: Timeline::default(),
            level: Level::Normal,
            incident: None,
            count: 0,
            max: 0,
        }
    }

    /// The table as sampled at `t`: the row columns from now on, and a chart point.
    fn sampled(&mut self, t: Duration, sample: &ConntrackSample) {
        self.count = sample.count;
        self.max = sample.max;
        self.timeline
            .samples
            .push((millis(t), sample.count, sample.max));
    }

    fn push(&mut self, t: Duration, event: Event) {
        let ratio = if self.max == 0 {
            0.0
        } else {
            self.count as f64 / self.max as f64
        };
        self.timeline.rows.push(Row {
            t_ms: millis(t),
            count: self.count,
            max: self.max,
            ratio,
            level: self.level,
            event,
        });
    }

    /// Records level/incident changes, then carries out `decisions` (and any that their
    /// outcomes bring) with `carry_out`.
    fn handle(
        &mut self,
        t: Duration,
        decisions: Vec<Decision>,
        carry_out: &mut dyn FnMut(&Action) -> Outcome,
    ) {
        self.note_state(t);
        let mut queue = std::collections::VecDeque::from(decisions);
        while let Some(d) = queue.pop_front() {
            self.push(
                t,
                Event::Decision {
                    id: d.id,
                    stage: d.stage,
                    action: d.action.clone(),
                    reason: d.reason.clone(),
                },
            );
            if d.action.is_dry_run() {
                continue;
            }
            let outcome = carry_out(&d.action);
            self.push(
                t,
                Event::Outcome {
                    id: d.id,
                    outcome: match &outcome {
                        Outcome::Applied => "applied".to_string(),
                        Outcome::NotPermitted(why) => format!("not permitted: {why}"),
                        Outcome::Failed(why) => format!("failed: {why}"),
                    },
                },
            );
            queue.extend(self.engine.outcome(t, d.id, outcome));
            self.note_state(t);
        }
    }

    fn note_state(&mut self, t: Duration) {
        let state = self.engine.state();
        if state.level != self.level {
            let from = self.level;
            self.level = state.level;
            self.push(
                t,
                Event::Level {
                    from,
                    to: state.level,
                },
            );
        }
        let incident = state.incident.map(|i| i.id);
        if incident != self.incident {
            if let Some(id) = self.incident {
                self.push(t, Event::IncidentClosed { id });
            }
            if let Some(id) = incident {
                self.push(t, Event::IncidentOpened { id });
            }
            self.incident = incident;
        }
    }
}

fn millis(t: Duration) -> u64 {
    u64::try_from(t.as_millis()).unwrap_or(u64::MAX)
}

/// Runs a built-in scenario; the world starts with the kernel's defaults on a 4 GiB host.
pub fn run_scenario(policy: Policy, scenario: Scenario, options: SimOptions) -> Timeline {
    let mut world = World::kernel_defaults();
    world.non_initial_netns = options.non_initial_netns;
    let mut rec = Recorder::new(policy, trace::default_host());
    let mut t = Duration::ZERO;
    let mut last_analysis: Option<Duration> = None;
    let analysis_every = Duration::from_secs(30);
    while t <= scenario.duration() {
        let load = scenario.load(t);
        let dt = rec.engine.state().poll_interval;
        world.advance(dt, &load);
        let sample = world.sample();
        rec.sampled(t, &sample);
        let decisions = rec.engine.observe(t, Input::Sample(sample));
        rec.handle(t, decisions, &mut |a| world.carry_out(a));
        // A table analysis, as the daemon runs one when NOTRACK could use it.
        if rec.engine.state().wants_hot_ports
            && last_analysis.is_none_or(|l| t.saturating_sub(l) >= analysis_every)
        {
            last_analysis = Some(t);
            let count = world.count;
            let ports = load
                .ports
                .iter()
                .filter(|(p, _)| !world.notracked.contains(p))
                .map(|&(p, share)| crate::engine::PortLoad {
                    proto: p.proto,
                    port: p.port,
                    entries: (count * share) as u64,
                    nat_or_forwarded: false,
                })
                .collect();
            let decisions = rec.engine.observe(t, Input::HotPorts(ports));
            rec.handle(t, decisions, &mut |a| world.carry_out(a));
        }
        t += rec.engine.state().poll_interval;
    }
    let decisions = rec.engine.shutdown(t);
    rec.handle(t, decisions, &mut |a| world.carry_out(a));
    rec.timeline
}
/// The knob values a replay lays over recorded samples: the recording cannot react to
/// decisions, but the settings it reports would have followed them.
struct ReplayKnobs {
    overlay: BTreeMap<Knob, u64>,
    non_initial_netns: bool,
}

impl ReplayKnobs {
    fn carry_out(&mut self, action: &Action) -> Outcome {
        match action {
            Action::Apply(changes) | Action::Revert(changes) => {
                if self.non_initial_netns && changes.iter().any(|c| c.knob.is_global()) {
                    return Outcome::NotPermitted(
                        "EACCES: global knob outside the initial network namespace".into(),
                    );
                }
                self.overlay.extend(changes.iter().map(|c| (c.knob, c.to)));
                Outcome::Applied
            }
            _ => Outcome::Applied,
        }
    }

    fn apply_to(&self, recorded: &ConntrackSample) -> ConntrackSample {
        let mut s = recorded.clone();
        for (&knob, &value) in &self.overlay {
            match knob {
                Knob::Max => s.max = value,
                Knob::Buckets => s.buckets = Some(value),
                Knob::Timeout(t) => {
                    s.timeouts.insert(t, value);
                }
            }
        }
        s
    }
}

/// Replays a recorded trace. The recorded counts cannot react to decisions, but the knob
/// values do: every applied change is laid over the later samples (max, buckets,
/// timeouts), as the kernel would report them. Decisions are answered `Applied`, or
/// `NotPermitted` for global knobs with `non_initial_netns`.
pub fn replay_trace(policy: Policy, trace: &Trace, options: SimOptions) -> Timeline {
    let host = trace.host.unwrap_or_else(trace::default_host);
    let mut rec = Recorder::new(policy, host);
    let mut knobs = ReplayKnobs {
        overlay: BTreeMap::new(),
        non_initial_netns: options.non_initial_netns,
    };
    let mut end = Duration::ZERO;
    for record in &trace.records {
        end = record.t;
        let input = match &record.body {
            TraceBody::Sample(recorded) => {
                let s = knobs.apply_to(recorded);
                rec.sampled(record.t, &s);
                Input::Sample(s)
            }
            TraceBody::Event(e) => Input::Kernel(e.clone()),
            TraceBody::HotPorts(p) => Input::HotPorts(p.clone()),
            TraceBody::Host(_) => continue,
        };
        let decisions = rec.engine.observe(record.t, input);
        rec.handle(record.t, decisions, &mut |a| knobs.carry_out(a));
    }
    let decisions = rec.engine.shutdown(end);
    rec.handle(end, decisions, &mut |a| knobs.carry_out(a));
    rec.timeline
}

/// A one-line summary: decisions per stage, and whether everything was rolled back.
pub fn summary(policy: &Policy, timeline: &Timeline) -> String {
    let mut per_stage = std::collections::BTreeMap::<StageKind, (usize, usize)>::new();
    for (_, action, stage) in timeline.decisions() {
        let entry = per_stage.entry(stage).or_default();
        match action {
            Action::Revert(_) | Action::Untrack { .. } => entry.1 += 1,
            Action::DryRun(inner)
                if matches!(**inner, Action::Revert(_) | Action::Untrack { .. }) =>
            {
                entry.1 += 1
            }
            _ => entry.0 += 1,
        }
    }
    let parts: Vec<String> = per_stage
        .iter()
        .map(|(s, (fired, reverted))| format!("{} fired {fired}, rolled back {reverted}", s.name()))
        .collect();
    format!(
        "mode {}; {}",
        policy.mode.name(),
        if parts.is_empty() {
            "no decisions".to_string()
        } else {
            parts.join("; ")
        }
    )
}
