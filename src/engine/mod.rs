//! The decision engine: one deterministic state machine, no I/O, no clock.
//!
//! Drivers (the daemon, dry-run, `simulate`, drills) feed it observations with a monotonic
//! `now` they supply, carry out the [`Decision`]s it returns, and report each decision's
//! [`Outcome`]. The same inputs always give the same decisions.
//!
//! How it decides:
//! - **Levels** ([`levels`]): the ratio count/max against the policy's warn, act and
//!   critical thresholds, with sustain and hysteresis. Any increase of the kernel's `drop`
//!   or `insert_failed` counters, or a table-full kernel message, is critical at once.
//! - **Incidents**: one opens at the first level above normal and closes once the level is
//!   normal again and every change has been rolled back.
//! - **Escalation**: stages are tried in order (raise limits, shorten timeouts, NOTRACK
//!   hot ports, evict); the first whose trigger level is reached, that is available, has
//!   something to do ([`plan`]) and is out of its cooldown fires. Below critical, a stage
//!   in its cooldown holds back the later ones (a measure gets time to work); at critical
//!   the engine escalates past it. A change the kernel refuses as not permitted makes the
//!   stage unavailable for the incident and the next stage is tried at once; a failure is
//!   retried after the cooldown plus exponential back-off.
//! - **Rate limit**: never more than `max_changes` in any `window`; bigger decisions are
//!   split.
//! - **Rollback**: once the ratio *against the original max* has stayed below
//!   `recover_below` for `recover_for` (plus back-off if the stage has been flapping), the
//!   most recently applied stage is reverted to the exact original values, then the next
//!   after `pause`. Pressure coming back stops the rollback; escalation resumes. A knob
//!   someone else changed meanwhile is left as they set it.
//! - **Modes**: in `observe` no stage is ever planned; in `dry-run` every decision is an
//!   [`Action::DryRun`] that the engine treats as done (no outcome expected), so its
//!   reports follow the same course an enforcing engine would. Real changes still in force
//!   from before a reload to either mode are rolled back for real.

pub mod levels;
pub mod plan;

pub use plan::{RaisePlan, plan_notrack, plan_raise, plan_shorten};

use crate::knob::{Knob, TimeoutKnob};
use crate::observe::memory::HostMemory;
use crate::observe::{ConntrackSample, ConntrackStats, KernelEvent};
use crate::policy::{EvictState, Level, Mode, Policy, StageKind};
pub use crate::port::{PortKey, Proto};
use levels::{LevelTracker, lost_between};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::Duration;

/// Identifies a decision so its outcome can be reported back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct DecisionId(pub u64);

impl fmt::Display for DecisionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "d{}", self.0)
    }
}

/// Identifies an incident: a sequence number, unique for the engine's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct IncidentId(pub u64);

impl fmt::Display for IncidentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "incident-{}", self.0)
    }
}

/// How many table entries one destination port holds, from a table analysis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortLoad {
    pub proto: Proto,
    pub port: u16,
    pub entries: u64,
    /// Any of these entries is NATed or forwarded (NOTRACK would break it).
    pub nat_or_forwarded: bool,
}

impl PortLoad {
    pub fn key(&self) -> PortKey {
        PortKey {
            proto: self.proto,
            port: self.port,
        }
    }
}

/// An observation.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Sample(ConntrackSample),
    Kernel(KernelEvent),
    HotPorts(Vec<PortLoad>),
}

/// One knob write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Change {
    pub knob: Knob,
    pub from: u64,
    pub to: u64,
}

impl Change {
    /// `max 262144 → 393216`.
    pub fn describe(&self) -> String {
        format!("{} {} → {}", knob_label(self.knob), self.from, self.to)
    }
}

/// The short name of a knob in reasons: `max`, `buckets`, `established`, …
pub fn knob_label(knob: Knob) -> &'static str {
    match knob {
        Knob::Max => "max",
        Knob::Buckets => "buckets",
        Knob::Timeout(t) => t.name(),
    }
}

/// What a decision asks the actuator to do.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Write these knobs, in order.
    Apply(Vec<Change>),
    /// Restore these knobs (`to` is the original value), in order.
    Revert(Vec<Change>),
    /// Add raw-table NOTRACK for these ports, expiring by itself after `expiry`.
    Notrack {
        ports: Vec<PortKey>,
        expiry: Duration,
    },
    /// Remove NOTRACK for these ports.
    Untrack { ports: Vec<PortKey> },
    /// Delete up to `batch` entries in these states, at least `min_age` old.
    Evict {
        states: Vec<EvictState>,
        min_age: Duration,
        batch: u32,
    },
    /// Dry-run: what would be done. Never carried out; no outcome is expected.
    DryRun(Box<Action>),
}

impl Action {
    /// How many changes this counts for in the rate limit.
    pub fn change_count(&self) -> u32 {
        let n = match self {
            Action::Apply(c) | Action::Revert(c) => c.len(),
            Action::Notrack { ports, .. } | Action::Untrack { ports } => ports.len(),
            Action::Evict { .. } => 1,
            Action::DryRun(inner) => return inner.change_count(),
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Keeps only the first `n` changes.
    fn truncate(&mut self, n: usize) {
        match self {
            Action::Apply(c) | Action::Revert(c) => c.truncate(n),
            Action::Notrack { ports, .. } | Action::Untrack { ports } => ports.truncate(n),
            Action::Evict { .. } => {}
            Action::DryRun(inner) => inner.truncate(n),
        }
    }

    /// Whether the action changes anything on the host when carried out.
    pub fn is_dry_run(&self) -> bool {
        matches!(self, Action::DryRun(_))
    }
}

/// One thing to do, with why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub id: DecisionId,
    pub stage: StageKind,
    pub action: Action,
    /// One line with the numbers, e.g. `ratio 0.91 ≥ act 0.85 for 10s: raise max …`.
    pub reason: String,
}

/// What happened when the actuator carried out a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Refused for lack of permission (EACCES in a non-initial netns, read-only /sys).
    NotPermitted(String),
    Failed(String),
}

/// A knob ctguard changed and has not yet restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AppliedChange {
    pub stage: StageKind,
    pub knob: Knob,
    pub original: u64,
    pub current: u64,
    /// Only pretended (dry-run).
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IncidentInfo {
    pub id: IncidentId,
    pub opened_at: Duration,
}

/// A snapshot for status and metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EngineState {
    pub mode: Mode,
    pub level: Level,
    /// count / max of the last sample.
    pub ratio: f64,
    pub incident: Option<IncidentInfo>,
    /// Stages with changes in force, in escalation order.
    pub active_stages: Vec<StageKind>,
    pub applied: Vec<AppliedChange>,
    pub notracked: Vec<PortKey>,
    /// Stages refused as not permitted in this incident, with the reason.
    pub unavailable: Vec<(StageKind, String)>,
    /// Decisions waiting for their outcome.
    pub pending: Vec<DecisionId>,
    /// How often the driver should sample now.
    pub poll_interval: Duration,
    /// Whether a table analysis (`Input::HotPorts`) would be used now.
    pub wants_hot_ports: bool,
}

#[derive(Debug, Clone, Default)]
struct StageState {
    // Per incident.
    retry_at: Option<Duration>,
    failures: u32,
    unavailable: Option<String>,
    /// Latest time a change of this stage took effect (orders the rollback).
    applied_at: Option<Duration>,
    // Across incidents: the cooldown is the least time between two firings, and flapping
    // is a stage coming back soon after its rollback.
    last_fired: Option<Duration>,
    rolled_back_at: Option<Duration>,
    flaps: u32,
}

impl StageState {
    fn reset_for_new_incident(&mut self) {
        *self = StageState {
            last_fired: self.last_fired,
            rolled_back_at: self.rolled_back_at,
            flaps: self.flaps,
            ..StageState::default()
        };
    }
}

#[derive(Debug, Clone, Copy)]
struct KnobRecord {
    stage: StageKind,
    original: u64,
    current: u64,
    dry_run: bool,
    /// A sample has been observed since `current` was set: the last sample was read before
    /// the write until then, after it since (the daemon samples and decides in turn), so a
    /// different value now means someone else changed the knob.
    confirmed: bool,
}

#[derive(Debug, Clone, Copy)]
struct NotrackRecord {
    expires_at: Duration,
    /// Entries the port held when it was untracked: what may come back on untracking.
    entries: u64,
    dry_run: bool,
}

#[derive(Debug, Clone)]
struct Pending {
    stage: StageKind,
    action: Action,
    rollback: bool,
}

/// The engine. See the module docs.
#[derive(Debug, Clone)]
pub struct Engine {
    policy: Policy,
    host: HostMemory,
    levels: LevelTracker,
    level: Level,
    last_sample: Option<ConntrackSample>,
    /// The latest drop counters read: the baseline for the next, across samples that
    /// could not read them (so drops in between are still counted).
    last_stats: Option<ConntrackStats>,
    /// Packets lost at the last sample (or table-full messages since), for reasons.
    last_loss: u64,
    hot_ports: Vec<PortLoad>,
    next_decision: u64,
    next_incident: u64,
    incident: Option<IncidentInfo>,
    stages: BTreeMap<StageKind, StageState>,
    knobs: BTreeMap<Knob, KnobRecord>,
    notracked: BTreeMap<PortKey, NotrackRecord>,
    pending: BTreeMap<DecisionId, Pending>,
    /// (time, changes) of every decision within the rate-limit window.
    recent_changes: VecDeque<(Duration, u32)>,
    last_bucket_change: Option<Duration>,
    recovered_since: Option<Duration>,
    last_rollback_step: Option<Duration>,
    rollback_failures: u32,
}

impl Engine {
    pub fn new(policy: Policy, host: HostMemory) -> Engine {
        Engine {
            policy,
            host,
            levels: LevelTracker::default(),
            level: Level::Normal,
            last_sample: None,
            last_stats: None,
            last_loss: 0,
            hot_ports: Vec::new(),
            next_decision: 1,
            next_incident: 1,
            incident: None,
            stages: StageKind::ALL
                .iter()
                .map(|&k| (k, StageState::default()))
                .collect(),
            knobs: BTreeMap::new(),
            notracked: BTreeMap::new(),
            pending: BTreeMap::new(),
            recent_changes: VecDeque::new(),
            last_bucket_change: None,
            recovered_since: None,
            last_rollback_step: None,
            rollback_failures: 0,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Feeds one observation at monotonic time `now`.
    pub fn observe(&mut self, now: Duration, input: Input) -> Vec<Decision> {
        match input {
            Input::Sample(sample) => {
                let lost = lost_between(self.last_stats.as_ref(), sample.stats.as_ref());
                if sample.stats.is_some() {
                    self.last_stats = sample.stats;
                }
                self.levels
                    .update(&self.policy.levels, now, sample.ratio(), lost > 0);
                self.last_loss = lost;
                for (&knob, r) in self.knobs.iter_mut() {
                    if !r.dry_run && observed_value(&sample, knob).is_some() {
                        r.confirmed = true;
                    }
                }
                self.last_sample = Some(sample);
            }
            Input::Kernel(KernelEvent::TableFull { .. }) => {
                self.levels.force_critical(now);
                self.last_loss = self.last_loss.saturating_add(1);
            }
            // Other kernel messages are context for humans, not pressure: an expectation
            // table or a SYN flood does not fill the conntrack table by itself.
            Input::Kernel(_) => {}
            Input::HotPorts(ports) => self.hot_ports = ports,
        }
        self.level = self.levels.level();
        self.step(now)
    }

    /// Takes over a change a previous run made (found in the journal after a restart): it
    /// is rolled back like the engine's own once pressure has gone. Opens an incident to
    /// hold it if none is open.
    pub fn adopt(
        &mut self,
        now: Duration,
        stage: StageKind,
        knob: Knob,
        original: u64,
        current: u64,
    ) {
        self.knobs.insert(
            knob,
            KnobRecord {
                stage,
                original,
                current,
                dry_run: false,
                confirmed: false,
            },
        );
        self.stage_mut(stage).applied_at = Some(now);
        self.hold_in_incident(now);
    }

    /// Takes over a NOTRACK exemption a previous run made, in force until `expires_at`: it
    /// counts against `max_ports` and is renewed or untracked like the engine's own. Opens
    /// an incident to hold it if none is open.
    pub fn adopt_notrack(&mut self, now: Duration, port: PortKey, expires_at: Duration) {
        self.notracked.insert(
            port,
            NotrackRecord {
                expires_at,
                entries: 0,
                dry_run: false,
            },
        );
        self.stage_mut(StageKind::NotrackHotPorts).applied_at = Some(now);
        self.hold_in_incident(now);
    }

    fn hold_in_incident(&mut self, now: Duration) {
        if self.incident.is_none() {
            self.incident = Some(IncidentInfo {
                id: IncidentId(self.next_incident),
                opened_at: now,
            });
            self.next_incident += 1;
        }
    }

    /// Reports what happened to a decision. Unknown ids are ignored.
    pub fn outcome(&mut self, now: Duration, id: DecisionId, outcome: Outcome) -> Vec<Decision> {
        let Some(pending) = self.pending.remove(&id) else {
            return Vec::new();
        };
        let cooldown = self
            .policy
            .stages
            .common(pending.stage)
            .map_or(Duration::ZERO, |c| c.cooldown);
        match (outcome, pending.rollback) {
            (Outcome::Applied, false) => {
                self.record_applied(now, pending.stage, &pending.action, false);
                self.stage_mut(pending.stage).failures = 0;
            }
            (Outcome::Applied, true) => {
                self.record_reverted(now, pending.stage, &pending.action);
                self.rollback_failures = 0;
            }
            (Outcome::NotPermitted(why), false) => {
                self.stage_mut(pending.stage).unavailable = Some(why);
            }
            // A revert the kernel will not allow cannot be retried: forget those changes.
            (Outcome::NotPermitted(_), true) => {
                self.record_reverted(now, pending.stage, &pending.action);
            }
            (Outcome::Failed(_), false) => {
                let backoff = self.policy.backoff.clone();
                let st = self.stage_mut(pending.stage);
                st.failures = st.failures.saturating_add(1);
                st.retry_at = Some(now + cooldown + backoff.delay(st.failures));
            }
            (Outcome::Failed(_), true) => {
                self.rollback_failures = self.rollback_failures.saturating_add(1);
                self.last_rollback_step = Some(now);
            }
        }
        self.step(now)
    }

    /// Replaces the policy (reload), keeping levels, incident and journal; a level whose
    /// threshold changed is judged afresh from the next sample. Pretended (dry-run) changes
    /// are dropped when the new mode is not dry-run: they never happened.
    pub fn replace_policy(&mut self, policy: Policy) {
        if policy.mode != Mode::DryRun {
            self.knobs.retain(|_, r| !r.dry_run);
            self.notracked.retain(|_, r| !r.dry_run);
        }
        self.levels.retune(&self.policy.levels, &policy.levels);
        self.level = self.levels.level();
        self.policy = policy;
    }

    /// What to do on exit: revert everything if the policy says so, most recent stage
    /// first, ignoring the rate limit and pauses (the agent is going away).
    pub fn shutdown(&mut self, _now: Duration) -> Vec<Decision> {
        if !self.policy.rollback.rollback_on_exit {
            return Vec::new();
        }
        let mut decisions = Vec::new();
        while let Some(stage) = self.stage_to_roll_back() {
            let actions = self.revert_actions(stage, true);
            self.forget_stage(stage);
            for (action, reason) in actions {
                decisions.push(self.decision(stage, action, format!("shutdown: {reason}")));
            }
        }
        decisions
    }

    pub fn state(&self) -> EngineState {
        let applied: Vec<AppliedChange> = self
            .knobs
            .iter()
            .map(|(&knob, r)| AppliedChange {
                stage: r.stage,
                knob,
                original: r.original,
                current: r.current,
                dry_run: r.dry_run,
            })
            .collect();
        let mut active_stages: Vec<StageKind> = applied.iter().map(|a| a.stage).collect();
        if !self.notracked.is_empty() {
            active_stages.push(StageKind::NotrackHotPorts);
        }
        active_stages.sort();
        active_stages.dedup();
        let under_pressure = self.incident.is_some() || self.level > Level::Normal;
        EngineState {
            mode: self.policy.mode,
            level: self.level,
            ratio: self.last_sample.as_ref().map_or(0.0, |s| s.ratio()),
            incident: self.incident,
            active_stages,
            applied,
            notracked: self.notracked.keys().copied().collect(),
            unavailable: self
                .stages
                .iter()
                .filter_map(|(&k, s)| s.unavailable.clone().map(|why| (k, why)))
                .collect(),
            pending: self.pending.keys().copied().collect(),
            poll_interval: if under_pressure {
                self.policy.poll.under_pressure
            } else {
                self.policy.poll.at_rest
            },
            wants_hot_ports: self.policy.mode != Mode::Observe
                && self
                    .policy
                    .stages
                    .enabled(StageKind::NotrackHotPorts)
                    .is_some_and(|c| self.level >= c.trigger),
        }
    }

    fn stage_mut(&mut self, kind: StageKind) -> &mut StageState {
        self.stages.entry(kind).or_default()
    }

    fn stage(&self, kind: StageKind) -> &StageState {
        &self.stages[&kind]
    }

    /// Everything that follows an observation or outcome.
    fn step(&mut self, now: Duration) -> Vec<Decision> {
        // The kernel removes expired NOTRACK elements by itself.
        self.notracked.retain(|_, r| r.expires_at > now);
        if self.incident.is_none() && self.level > Level::Normal {
            self.incident = Some(IncidentInfo {
                id: IncidentId(self.next_incident),
                opened_at: now,
            });
            self.next_incident += 1;
        }
        if !self.pending.is_empty() || self.last_sample.is_none() {
            return Vec::new();
        }
        self.track_recovery(now);
        let decision = if self.policy.mode == Mode::Observe {
            None
        } else {
            self.refresh_notrack(now).or_else(|| self.escalate(now))
        };
        let decision = decision.or_else(|| self.roll_back(now));
        if decision.is_none() {
            self.maybe_close_incident();
        }
        decision.into_iter().collect()
    }

    fn maybe_close_incident(&mut self) {
        if self.incident.is_some()
            && self.level == Level::Normal
            && self.knobs.is_empty()
            && self.notracked.is_empty()
            && self.pending.is_empty()
        {
            self.incident = None;
            for st in self.stages.values_mut() {
                st.reset_for_new_incident();
            }
            self.recovered_since = None;
            self.last_rollback_step = None;
            self.rollback_failures = 0;
        }
    }

    /// The max in force before ctguard raised it.
    fn original_max(&self, sample: &ConntrackSample) -> u64 {
        self.knobs
            .get(&Knob::Max)
            .map_or(sample.max, |r| r.original)
    }

    fn track_recovery(&mut self, now: Duration) {
        let Some(sample) = &self.last_sample else {
            return;
        };
        let Some(stage) = self.stage_to_roll_back() else {
            self.recovered_since = None;
            return;
        };
        let projected = self.rollback_projection(stage, sample);
        let calm =
            self.level < self.policy.lowest_trigger().unwrap_or(Level::Warn) && self.last_loss == 0;
        if calm && projected < self.policy.rollback.recover_below {
            self.recovered_since.get_or_insert(now);
        } else {
            self.recovered_since = None;
        }
    }

    /// The ratio at worst after the next rollback step of `stage`: against the original
    /// max for a raise; with the count scaled by the step's largest timeout increase for
    /// timeouts (entries live at most that much longer); with the untracked ports' entries
    /// back for NOTRACK.
    fn rollback_projection(&self, stage: StageKind, sample: &ConntrackSample) -> f64 {
        match stage {
            StageKind::RaiseLimits => ratio(sample.count, self.original_max(sample)),
            StageKind::ShortenTimeouts => {
                let growth = self
                    .knobs
                    .values()
                    .filter(|r| r.stage == stage && r.current > 0)
                    .map(|r| r.current.saturating_mul(2).min(r.original) as f64 / r.current as f64)
                    .fold(1.0, f64::max);
                ratio(sample.count, self.effective(Knob::Max, sample.max)) * growth
            }
            StageKind::NotrackHotPorts => {
                let back: u64 = self.notracked.values().map(|r| r.entries).sum();
                ratio(
                    sample.count.saturating_add(back),
                    self.effective(Knob::Max, sample.max),
                )
            }
            StageKind::Evict => ratio(sample.count, sample.max),
        }
    }

    /// `ratio 0.91 ≥ act 0.85 for 10s` or `247 packets lost`.
    fn pressure_summary(&self, now: Duration) -> String {
        let ratio = self.last_sample.as_ref().map_or(0.0, |s| s.ratio());
        if self.level == Level::Critical && self.last_loss > 0 {
            return format!(
                "ratio {ratio:.2}, {} packets lost (critical)",
                self.last_loss
            );
        }
        let (at, clear_below) = self
            .policy
            .levels
            .threshold(self.level)
            .map_or((0.0, 0.0), |t| (t.at, t.clear_below));
        // Whole seconds: sub-second precision is noise in a reason line.
        let held = humantime::format_duration(Duration::from_secs(
            self.levels.held(self.level, now).as_secs(),
        ));
        let level = self.level.name();
        if ratio >= at {
            format!("ratio {ratio:.2} ≥ {level} {at:.2} for {held}")
        } else {
            // Hysteresis: the level holds until the ratio falls below its clear mark.
            format!("ratio {ratio:.2}, {level} until below {clear_below:.2}, for {held}")
        }
    }

    fn rate_limit_room(&mut self, now: Duration) -> u32 {
        let window = self.policy.rate_limit.window;
        while self
            .recent_changes
            .front()
            .is_some_and(|&(t, _)| now.saturating_sub(t) >= window)
        {
            self.recent_changes.pop_front();
        }
        let used: u32 = self.recent_changes.iter().map(|&(_, n)| n).sum();
        self.policy.rate_limit.max_changes.saturating_sub(used)
    }

    /// While pressure lasts, NOTRACK exemptions are renewed before the kernel expires
    /// them (at half their lifetime). At rest, or with the stage disabled, they are left to
    /// expire: if ctguard dies, the kernel removes them by itself all the same.
    fn refresh_notrack(&mut self, now: Duration) -> Option<Decision> {
        self.policy.stages.enabled(StageKind::NotrackHotPorts)?;
        let expiry = self.policy.stages.notrack_hot_ports.as_ref()?.expiry;
        if self.level == Level::Normal {
            return None;
        }
        let mut due: Vec<PortKey> = self
            .notracked
            .iter()
            .filter(|(_, r)| !r.dry_run && r.expires_at.saturating_sub(now) <= expiry / 2)
            .map(|(&k, _)| k)
            .collect();
        let room = self.rate_limit_room(now) as usize;
        due.truncate(room);
        if due.is_empty() {
            return None;
        }
        let what: Vec<String> = due.iter().map(PortKey::to_string).collect();
        let reason = format!(
            "{}: renew NOTRACK {} for {}",
            self.pressure_summary(now),
            what.join(", "),
            humantime::format_duration(expiry)
        );
        let action = Action::Notrack { ports: due, expiry };
        Some(self.emit(now, StageKind::NotrackHotPorts, action, reason, false))
    }

    fn escalate(&mut self, now: Duration) -> Option<Decision> {
        let sample = self.last_sample.clone()?;
        for kind in StageKind::ALL {
            let Some(common) = self.policy.stages.enabled(kind).cloned() else {
                continue;
            };
            if self.level < common.trigger {
                continue;
            }
            let st = self.stage(kind);
            if st.unavailable.is_some() {
                continue;
            }
            let Some((mut action, what)) = self.plan_stage(kind, now, &sample) else {
                continue; // nothing left to do: try the next stage
            };
            let ready = st.last_fired.is_none_or(|t| now >= t + common.cooldown)
                && st.retry_at.is_none_or(|t| now >= t);
            if !ready {
                if self.level == Level::Critical {
                    continue;
                }
                return None;
            }
            let room = self.rate_limit_room(now);
            if room == 0 {
                return None;
            }
            action.truncate(room as usize);
            let reason = format!("{}: {what}", self.pressure_summary(now));
            let flap_window = self.policy.backoff.flap_window;
            let st = self.stage_mut(kind);
            st.last_fired = Some(now);
            if let Some(rolled_back) = st.rolled_back_at.take() {
                st.flaps = if now.saturating_sub(rolled_back) < flap_window {
                    st.flaps.saturating_add(1)
                } else {
                    0
                };
            }
            return Some(self.emit(now, kind, action, reason, false));
        }
        None
    }

    /// The value in force for a knob: what a dry run pretended to set; what ctguard set if
    /// no sample has shown it yet (the sample may predate the write, e.g. when a slow journal
    /// fsync let the cooldown pass before the outcome came); else the sample's.
    fn effective(&self, knob: Knob, observed: u64) -> u64 {
        match self.knobs.get(&knob) {
            Some(r) if r.dry_run || !r.confirmed => r.current,
            _ => observed,
        }
    }

    /// What a stage would do now, with a description; `None` when it has nothing to do.
    fn plan_stage(
        &self,
        kind: StageKind,
        now: Duration,
        sample: &ConntrackSample,
    ) -> Option<(Action, String)> {
        let stages = &self.policy.stages;
        match kind {
            StageKind::RaiseLimits => {
                let p = &stages.raise_limits;
                let buckets_may_change = self
                    .last_bucket_change
                    .is_none_or(|t| now.saturating_sub(t) >= p.bucket_change_interval);
                let plan = plan_raise(
                    p,
                    &self.host,
                    sample.count,
                    self.effective(Knob::Max, sample.max),
                    sample.buckets.map(|b| self.effective(Knob::Buckets, b)),
                    buckets_may_change,
                );
                (!plan.changes.is_empty())
                    .then(|| (Action::Apply(plan.changes.clone()), plan.describe()))
            }
            StageKind::ShortenTimeouts => {
                let current: BTreeMap<TimeoutKnob, u64> = sample
                    .timeouts
                    .iter()
                    .map(|(&k, &v)| (k, self.effective(Knob::Timeout(k), v)))
                    .collect();
                let changes = plan_shorten(&stages.shorten_timeouts, &current, |k| {
                    self.knobs.contains_key(&Knob::Timeout(k))
                });
                if changes.is_empty() {
                    return None;
                }
                let what = changes
                    .iter()
                    .map(Change::describe)
                    .collect::<Vec<_>>()
                    .join(", ");
                Some((Action::Apply(changes), format!("shorten {what}")))
            }
            StageKind::NotrackHotPorts => {
                let p = stages.notrack_hot_ports.as_ref()?;
                let ports = plan_notrack(p, &self.hot_ports, sample.count, &self.notracked);
                if ports.is_empty() {
                    return None;
                }
                let what = ports
                    .iter()
                    .map(|(k, n)| {
                        format!("{k} ({:.0}% of entries)", ratio(*n, sample.count) * 100.0)
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                Some((
                    Action::Notrack {
                        ports: ports.into_iter().map(|(k, _)| k).collect(),
                        expiry: p.expiry,
                    },
                    format!(
                        "notrack {what} for {}",
                        humantime::format_duration(p.expiry)
                    ),
                ))
            }
            StageKind::Evict => {
                let p = stages.evict.as_ref()?;
                let states: Vec<EvictState> = p.states.iter().copied().collect();
                let names: Vec<&str> = states.iter().map(|s| s.name()).collect();
                Some((
                    Action::Evict {
                        states,
                        min_age: p.min_age,
                        batch: p.batch,
                    },
                    format!(
                        "evict up to {} entries in {} older than {}",
                        p.batch,
                        names.join(","),
                        humantime::format_duration(p.min_age)
                    ),
                ))
            }
        }
    }

    /// Hands out a decision: in dry-run it is recorded as done at once, otherwise it waits
    /// for its outcome.
    fn emit(
        &mut self,
        now: Duration,
        stage: StageKind,
        action: Action,
        reason: String,
        rollback: bool,
    ) -> Decision {
        self.recent_changes.push_back((now, action.change_count()));
        // A rollback is pretended only for pretended changes: a real change still in force
        // after a reload to dry-run is restored for real, as in observe mode.
        if rollback && action.is_dry_run() {
            self.record_reverted(now, stage, &action);
            return self.decision(stage, action, reason);
        }
        if self.policy.mode == Mode::DryRun && !rollback {
            self.record_applied(now, stage, &action, true);
            return self.decision(stage, Action::DryRun(Box::new(action)), reason);
        }
        let decision = self.decision(stage, action.clone(), reason);
        self.pending.insert(
            decision.id,
            Pending {
                stage,
                action,
                rollback,
            },
        );
        decision
    }

    fn decision(&mut self, stage: StageKind, action: Action, reason: String) -> Decision {
        let id = DecisionId(self.next_decision);
        self.next_decision += 1;
        Decision {
            id,
            stage,
            action,
            reason,
        }
    }

    fn record_applied(&mut self, now: Duration, stage: StageKind, action: &Action, dry_run: bool) {
        match action {
            Action::Apply(changes) => {
                for c in changes {
                    let record = self.knobs.entry(c.knob).or_insert(KnobRecord {
                        stage,
                        original: c.from,
                        current: c.from,
                        dry_run,
                        confirmed: false,
                    });
                    record.current = c.to;
                    record.confirmed = false;
                    if c.knob == Knob::Buckets {
                        self.last_bucket_change = Some(now);
                    }
                }
            }
            Action::Notrack { ports, expiry } => {
                for &port in ports {
                    let entries = self
                        .hot_ports
                        .iter()
                        .filter(|p| p.key() == port)
                        .map(|p| p.entries)
                        .sum();
                    self.notracked.insert(
                        port,
                        NotrackRecord {
                            expires_at: now + *expiry,
                            entries,
                            dry_run,
                        },
                    );
                }
            }
            Action::Revert(_) | Action::Untrack { .. } | Action::Evict { .. } => {}
            Action::DryRun(inner) => return self.record_applied(now, stage, inner, true),
        }
        self.stage_mut(stage).applied_at = Some(now);
    }

    fn record_reverted(&mut self, now: Duration, stage: StageKind, action: &Action) {
        match action {
            Action::Revert(changes) => {
                for c in changes {
                    match self.knobs.get_mut(&c.knob) {
                        Some(r) if r.original != c.to => {
                            r.current = c.to;
                            r.confirmed = false;
                        }
                        _ => {
                            self.knobs.remove(&c.knob);
                        }
                    }
                    if c.knob == Knob::Buckets {
                        self.last_bucket_change = Some(now);
                    }
                }
            }
            Action::Untrack { ports } => {
                for port in ports {
                    self.notracked.remove(port);
                }
            }
            Action::DryRun(inner) => return self.record_reverted(now, stage, inner),
            Action::Apply(_) | Action::Notrack { .. } | Action::Evict { .. } => {}
        }
        self.last_rollback_step = Some(now);
        if !self.stage_has_changes(stage) {
            let st = self.stage_mut(stage);
            st.applied_at = None;
            st.rolled_back_at = Some(now);
        }
    }

    fn stage_has_changes(&self, stage: StageKind) -> bool {
        self.knobs.values().any(|r| r.stage == stage)
            || (stage == StageKind::NotrackHotPorts && !self.notracked.is_empty())
    }

    /// The stage with changes in force that was applied most recently.
    fn stage_to_roll_back(&self) -> Option<StageKind> {
        // On a tie the later stage wins (`max_by_key` keeps the last maximum): reverse
        // escalation order.
        StageKind::ALL
            .iter()
            .copied()
            .filter(|&k| self.stage_has_changes(k))
            .max_by_key(|&k| self.stage(k).applied_at)
    }

    fn forget_stage(&mut self, stage: StageKind) {
        self.knobs.retain(|_, r| r.stage != stage);
        if stage == StageKind::NotrackHotPorts {
            self.notracked.clear();
        }
    }

    /// The actions that restore a stage, real changes first (pretended ones wrapped as
    /// dry-run). Knobs someone else changed since are dropped from the journal and left
    /// alone: the operator's value wins over ctguard's memory.
    ///
    /// Timeouts come back in steps unless `full`: each step at most doubles them (capped
    /// at the original), because a longer timeout brings entries back and a step of two
    /// can be judged in advance (`rollback_projection`).
    fn revert_actions(&mut self, stage: StageKind, full: bool) -> Vec<(Action, String)> {
        let mut untouched = Vec::new();
        let mut groups: [(Vec<Change>, Vec<PortKey>); 2] = Default::default();
        let sample = self.last_sample.clone();
        for (&knob, r) in self.knobs.iter().rev().filter(|(_, r)| r.stage == stage) {
            let observed = sample.as_ref().and_then(|s| observed_value(s, knob));
            if r.confirmed && observed.is_some_and(|v| v != r.current) {
                untouched.push(knob);
                continue;
            }
            let to = match knob {
                Knob::Timeout(_) if !full => r.current.saturating_mul(2).min(r.original),
                _ => r.original,
            };
            groups[usize::from(r.dry_run)].0.push(Change {
                knob,
                from: r.current,
                to,
            });
        }
        if stage == StageKind::NotrackHotPorts {
            for (&port, r) in &self.notracked {
                groups[usize::from(r.dry_run)].1.push(port);
            }
        }
        let note = if untouched.is_empty() {
            String::new()
        } else {
            let names: Vec<&str> = untouched.iter().map(|&k| knob_label(k)).collect();
            for k in &untouched {
                self.knobs.remove(k);
            }
            format!(
                " ({} changed by someone else: left as set)",
                names.join(", ")
            )
        };
        let mut actions = Vec::new();
        for (dry_run, (changes, ports)) in groups.into_iter().enumerate() {
            let wrap = |a: Action| {
                if dry_run == 1 {
                    Action::DryRun(Box::new(a))
                } else {
                    a
                }
            };
            if !changes.is_empty() {
                let what: Vec<String> = changes.iter().map(Change::describe).collect();
                actions.push((
                    wrap(Action::Revert(changes)),
                    format!("revert {} {}{note}", stage.name(), what.join(", ")),
                ));
            }
            if !ports.is_empty() {
                let what: Vec<String> = ports.iter().map(PortKey::to_string).collect();
                actions.push((
                    wrap(Action::Untrack { ports }),
                    format!("untrack {}", what.join(", ")),
                ));
            }
        }
        actions
    }

    fn roll_back(&mut self, now: Duration) -> Option<Decision> {
        let since = self.recovered_since?;
        let stage = self.stage_to_roll_back()?;
        let hold =
            self.policy.rollback.recover_for + self.policy.backoff.delay(self.stage(stage).flaps);
        if now.saturating_sub(since) < hold {
            return None;
        }
        if let Some(last) = self.last_rollback_step {
            let wait =
                self.policy.rollback.pause + self.policy.backoff.delay(self.rollback_failures);
            if now.saturating_sub(last) < wait {
                return None;
            }
        }
        let room = self.rate_limit_room(now);
        if room == 0 {
            return None;
        }
        let sample = self.last_sample.clone()?;
        let projected = self.rollback_projection(stage, &sample);
        let (mut action, what) = self.revert_actions(stage, false).into_iter().next()?;
        action.truncate(room as usize);
        let reason = format!(
            "ratio after this step ≤ {projected:.2} < {:.2} for {}: {what}",
            self.policy.rollback.recover_below,
            humantime::format_duration(now.saturating_sub(since)),
        );
        Some(self.emit(now, stage, action, reason, true))
    }
}

/// A knob's value in a sample, where it can be compared exactly.
fn observed_value(sample: &ConntrackSample, knob: Knob) -> Option<u64> {
    match knob {
        Knob::Max => Some(sample.max),
        // The kernel rounds hash sizes up to whole pages: no exact comparison.
        Knob::Buckets => None,
        Knob::Timeout(t) => sample.timeouts.get(&t).copied(),
    }
}

fn ratio(count: u64, max: u64) -> f64 {
    if max == 0 {
        0.0
    } else {
        count as f64 / max as f64
    }
}
