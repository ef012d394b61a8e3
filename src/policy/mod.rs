//! Policies: what ctguard may do, when, and how far.
//!
//! A policy file goes through two steps, like ripgrep's low-level and high-level arguments:
//! [`raw`] mirrors the TOML exactly (unknown keys rejected, every value keeping its span),
//! and [`Policy::from_toml`] validates it into the typed [`Policy`] the engine uses: ratios
//! as `f64` in (0, 1], [`Duration`]s, [`TimeoutKnob`]s, and no value left unchecked. Every
//! error names `file:line:col` and what was expected there.
//!
//! The shipped policies live in `policies/*.toml`, each commented knob by knob;
//! `policies/default.toml` is compiled in as [`Policy::embedded_default`].

pub mod raw;

pub use raw::EvictState;

use crate::knob::TimeoutKnob;
use crate::observe::memory::HostMemory;
use raw::{DurationValue, RatioValue, RawPolicy, RawTrigger};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::time::Duration;
use toml::Spanned;

/// The text of `policies/default.toml`, the policy used when none is given.
pub const DEFAULT_POLICY_TOML: &str = include_str!("../../policies/default.toml");

/// What ctguard does with its decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Decisions are carried out.
    Enforce,
    /// Decisions are reported as what ctguard *would* do; nothing is changed.
    DryRun,
    /// Pressure levels and incidents are tracked and reported; no stage is ever planned.
    Observe,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::DryRun => "dry-run",
            Mode::Observe => "observe",
        }
    }
}

/// How much pressure the table is under, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Normal,
    Warn,
    Act,
    Critical,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Normal => "normal",
            Level::Warn => "warn",
            Level::Act => "act",
            Level::Critical => "critical",
        }
    }
}

/// One pressure level with hysteresis: entered when the ratio has stayed at or above `at`
/// for `sustain` (dips that stay at or above `clear_below` do not restart that clock),
/// left when the ratio falls below `clear_below`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Threshold {
    pub at: f64,
    pub clear_below: f64,
    pub sustain: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Levels {
    pub warn: Threshold,
    pub act: Threshold,
    pub critical: Threshold,
}

impl Levels {
    /// The levels above normal with their thresholds, lowest first.
    pub fn iter(&self) -> [(Level, &Threshold); 3] {
        [
            (Level::Warn, &self.warn),
            (Level::Act, &self.act),
            (Level::Critical, &self.critical),
        ]
    }

    /// The threshold of a level above normal.
    pub fn threshold(&self, level: Level) -> Option<&Threshold> {
        match level {
            Level::Normal => None,
            Level::Warn => Some(&self.warn),
            Level::Act => Some(&self.act),
            Level::Critical => Some(&self.critical),
        }
    }
}

/// The slowest sampling a policy may ask for at rest. Sampling is the only watch where
/// `/dev/kmsg` is unreadable (no `CAP_SYSLOG`, or a rate-limited message), and a busy table
/// fills in seconds; polling every few minutes is already nearly blind.
const POLL_AT_REST_MAX: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Poll {
    pub at_rest: Duration,
    pub under_pressure: Duration,
}

/// At most `max_changes` changes (knob writes, ports, evictions) in any `window`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateLimit {
    pub max_changes: u32,
    pub window: Duration,
}

/// Exponential back-off: `base`, `2 × base`, `4 × base`, … never more than `max`.
/// A stage *flaps* when it fires again within `flap_window` of being rolled back.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    pub flap_window: Duration,
}

impl Backoff {
    /// The delay after the `n`th consecutive failure or flap (`n = 0`: none).
    pub fn delay(&self, n: u32) -> Duration {
        if n == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(n - 1).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// The stages, in escalation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    RaiseLimits,
    ShortenTimeouts,
    NotrackHotPorts,
    Evict,
}

impl StageKind {
    pub const ALL: [StageKind; 4] = [
        StageKind::RaiseLimits,
        StageKind::ShortenTimeouts,
        StageKind::NotrackHotPorts,
        StageKind::Evict,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StageKind::RaiseLimits => "raise_limits",
            StageKind::ShortenTimeouts => "shorten_timeouts",
            StageKind::NotrackHotPorts => "notrack_hot_ports",
            StageKind::Evict => "evict",
        }
    }

    /// Parses [`StageKind::name`] back (e.g. from a journal entry).
    pub fn from_name(name: &str) -> Option<StageKind> {
        StageKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// What every stage has.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageCommon {
    pub enabled: bool,
    /// The level at which the stage may fire.
    pub trigger: Level,
    /// The least time between two firings of the stage.
    pub cooldown: Duration,
}

/// Stage 1: raise `nf_conntrack_max` (and the hash table with it) within a RAM budget.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RaiseLimits {
    pub common: StageCommon,
    /// New max is at least `headroom × count`…
    pub headroom: f64,
    /// …and at least `min_step × current max`.
    pub min_step: f64,
    /// Budget as a share of MemTotal; with `ram_bytes` too, the smaller budget wins.
    pub ram_share: Option<f64>,
    pub ram_bytes: Option<u64>,
    pub absolute_cap: Option<u64>,
    /// Buckets = max / divisor (the kernel's default sizing uses 4 to 8).
    pub buckets_divisor: u64,
    /// The least time between two changes of the hash table size: a resize rehashes
    /// every entry under a lock.
    pub bucket_change_interval: Duration,
}

/// The limits [`RaiseLimits`] implies on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Ceiling {
    pub budget_bytes: u64,
    /// Entries (with their share of hash buckets) that fit in the budget.
    pub ram_entries: u64,
    /// The highest max the stage will ever set: `ram_entries`, lowered to `absolute_cap`.
    pub max: u64,
}

impl RaiseLimits {
    pub fn ceiling(&self, host: &HostMemory) -> Ceiling {
        let by_share = self
            .ram_share
            .map(|share| (host.mem_total_bytes as f64 * share) as u64);
        // Validation guarantees at least one of the two budgets.
        let budget_bytes = [by_share, self.ram_bytes]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(0);
        let ram_entries = host.entries_within(budget_bytes, self.buckets_divisor);
        let max = self
            .absolute_cap
            .map_or(ram_entries, |cap| cap.min(ram_entries));
        Ceiling {
            budget_bytes,
            ram_entries,
            max,
        }
    }
}

/// How far one timeout may be shortened, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TimeoutTarget {
    /// The first shortening sets the timeout to this (if it is longer).
    pub target: u64,
    /// Later shortenings halve it, never below this.
    pub floor: u64,
}

/// Stage 2: shorten state timeouts so entries leave the table sooner. Never lengthens one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShortenTimeouts {
    pub common: StageCommon,
    pub timeouts: BTreeMap<TimeoutKnob, TimeoutTarget>,
}

/// Stage 3: stop tracking a port that fills much of the table (never NATed or forwarded
/// traffic: NOTRACK would break it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NotrackHotPorts {
    pub common: StageCommon,
    /// A port is hot when it holds at least this share of the table's entries.
    pub min_share: f64,
    /// Only these ports may be untracked (empty: none).
    pub allow: BTreeSet<u16>,
    /// Never these ports, whatever `allow` says.
    pub deny: BTreeSet<u16>,
    pub max_ports: u32,
    /// The NOTRACK rule expires on its own after this (kernel set-element timeout).
    pub expiry: Duration,
    /// iptables fallback only: also ACCEPT the port's UNTRACKED packets at the top of the
    /// filter table's INPUT chain, for filters that let in only ESTABLISHED/NEW.
    pub accept_untracked: bool,
}

/// Stage 4 (opt-in): delete entries in cheap-to-lose states.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evict {
    pub common: StageCommon,
    pub states: BTreeSet<EvictState>,
    /// Only entries at least this old.
    pub min_age: Duration,
    /// At most this many entries per firing.
    pub batch: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stages {
    pub raise_limits: RaiseLimits,
    pub shorten_timeouts: ShortenTimeouts,
    /// `None` when the policy has no such table (the stage is off).
    pub notrack_hot_ports: Option<NotrackHotPorts>,
    pub evict: Option<Evict>,
}

impl Stages {
    /// The common settings of a stage, if the policy configures it.
    pub fn common(&self, kind: StageKind) -> Option<&StageCommon> {
        match kind {
            StageKind::RaiseLimits => Some(&self.raise_limits.common),
            StageKind::ShortenTimeouts => Some(&self.shorten_timeouts.common),
            StageKind::NotrackHotPorts => self.notrack_hot_ports.as_ref().map(|s| &s.common),
            StageKind::Evict => self.evict.as_ref().map(|s| &s.common),
        }
    }

    /// The settings of a stage that is configured and enabled.
    pub fn enabled(&self, kind: StageKind) -> Option<&StageCommon> {
        self.common(kind).filter(|c| c.enabled)
    }
}

/// When and how changes are undone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rollback {
    /// Roll back once the ratio *as it would be without ctguard's raised max* has stayed
    /// below this for `recover_for`.
    pub recover_below: f64,
    pub recover_for: Duration,
    /// Wait this long between rolling back one stage and the next.
    pub pause: Duration,
    /// Undo every change when ctguard exits.
    pub rollback_on_exit: bool,
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    /// Where the policy came from (file name, or `<embedded default>`).
    pub source: String,
    pub mode: Mode,
    pub poll: Poll,
    pub levels: Levels,
    pub rate_limit: RateLimit,
    pub backoff: Backoff,
    pub stages: Stages,
    pub rollback: Rollback,
    /// Also write applied values where the boot process reads them
    /// (`/etc/sysctl.d/`, `/etc/modprobe.d/`), and remove them again on rollback.
    pub persist: bool,
}

/// A policy that could not be used: `file:line:col: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}:{line}:{column}: {message}")]
pub struct PolicyError {
    pub source_name: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl Policy {
    /// The built-in default policy (`policies/default.toml`).
    pub fn embedded_default() -> Policy {
        Policy::from_toml(DEFAULT_POLICY_TOML, "<embedded default>")
            .expect("policies/default.toml is valid (checked by tests)")
    }

    /// Reads and validates a policy file; the embedded default without one.
    pub fn read(path: Option<&std::path::Path>) -> anyhow::Result<Policy> {
        use anyhow::Context;
        let Some(path) = path else {
            return Ok(Policy::embedded_default());
        };
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).with_context(|| format!("{name}: cannot read"))?;
        Ok(Policy::from_toml(&text, &name)?)
    }

    /// Parses and validates a policy. `source_name` is used in errors and reports.
    pub fn from_toml(text: &str, source_name: &str) -> Result<Policy, PolicyError> {
        let cx = Context { text, source_name };
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            // toml's messages may span lines (a caret diagram); keep the first line that
            // says something and fold the rest so one error stays on one line.
            let message = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            cx.error(&span, message)
        })?;
        cx.validate(raw)
    }

    /// The level at which the first enabled stage may fire (`None` when none is enabled).
    pub fn lowest_trigger(&self) -> Option<Level> {
        StageKind::ALL
            .iter()
            .filter_map(|&k| self.stages.enabled(k).map(|c| c.trigger))
            .min()
    }
}

struct Context<'a> {
    text: &'a str,
    source_name: &'a str,
}

impl Context<'_> {
    fn error(&self, span: &Range<usize>, message: impl Into<String>) -> PolicyError {
        let (line, column) = line_column(self.text, span.start);
        PolicyError {
            source_name: self.source_name.to_string(),
            line,
            column,
            message: message.into(),
        }
    }

    fn ratio(&self, value: &Spanned<RatioValue>, what: &str) -> Result<f64, PolicyError> {
        let v = value.get_ref().0;
        if v.is_finite() && v > 0.0 && v <= 1.0 {
            Ok(v)
        } else {
            Err(self.error(
                &value.span(),
                format!("expected {what} in (0, 1] (or \"1%\"..\"100%\"), found {v}"),
            ))
        }
    }

    fn positive(
        &self,
        value: &Spanned<DurationValue>,
        what: &str,
    ) -> Result<Duration, PolicyError> {
        let d = value.get_ref().0;
        if d.is_zero() {
            Err(self.error(
                &value.span(),
                format!("expected {what} longer than 0s, found 0s"),
            ))
        } else {
            Ok(d)
        }
    }

    fn stage_common(
        &self,
        enabled: bool,
        trigger: RawTrigger,
        cooldown: &Spanned<DurationValue>,
    ) -> Result<StageCommon, PolicyError> {
        Ok(StageCommon {
            enabled,
            trigger: match trigger {
                RawTrigger::Warn => Level::Warn,
                RawTrigger::Act => Level::Act,
                RawTrigger::Critical => Level::Critical,
            },
            cooldown: self.positive(cooldown, "a cooldown")?,
        })
    }

    fn threshold(&self, raw: &raw::RawLevel, name: &str) -> Result<Threshold, PolicyError> {
        let at = self.ratio(&raw.at, &format!("levels.{name}.at"))?;
        let clear_below = self.ratio(&raw.clear_below, &format!("levels.{name}.clear_below"))?;
        if clear_below >= at {
            return Err(self.error(
                &raw.clear_below.span(),
                format!(
                    "expected levels.{name}.clear_below below levels.{name}.at ({at}) so the level has hysteresis, found {clear_below}"
                ),
            ));
        }
        Ok(Threshold {
            at,
            clear_below,
            sustain: raw.sustain.get_ref().0,
        })
    }

    fn validate(&self, raw: RawPolicy) -> Result<Policy, PolicyError> {
        let mode = match *raw.mode.get_ref() {
            raw::RawMode::Enforce => Mode::Enforce,
            raw::RawMode::DryRun => Mode::DryRun,
            raw::RawMode::Observe => Mode::Observe,
        };

        let poll = Poll {
            at_rest: self.positive(&raw.poll.at_rest, "poll.at_rest")?,
            under_pressure: self.positive(&raw.poll.under_pressure, "poll.under_pressure")?,
        };
        if poll.at_rest > POLL_AT_REST_MAX {
            return Err(self.error(
                &raw.poll.at_rest.span(),
                format!(
                    "expected poll.at_rest at most {} (a table fills in seconds, and kernel messages are not always readable), found {}",
                    humantime::format_duration(POLL_AT_REST_MAX),
                    humantime::format_duration(poll.at_rest)
                ),
            ));
        }
        if poll.under_pressure > poll.at_rest {
            return Err(self.error(
                &raw.poll.under_pressure.span(),
                format!(
                    "expected poll.under_pressure no longer than poll.at_rest ({}), found {}",
                    humantime::format_duration(poll.at_rest),
                    humantime::format_duration(poll.under_pressure)
                ),
            ));
        }

        let levels = Levels {
            warn: self.threshold(&raw.levels.warn, "warn")?,
            act: self.threshold(&raw.levels.act, "act")?,
            critical: self.threshold(&raw.levels.critical, "critical")?,
        };
        let ordered = [
            ("warn", &levels.warn, &raw.levels.warn),
            ("act", &levels.act, &raw.levels.act),
            ("critical", &levels.critical, &raw.levels.critical),
        ];
        for pair in ordered.windows(2) {
            let (low_name, low, _) = pair[0];
            let (high_name, high, high_raw) = pair[1];
            if high.at <= low.at {
                return Err(self.error(
                    &high_raw.at.span(),
                    format!(
                        "expected levels.{high_name}.at above levels.{low_name}.at ({}), found {}",
                        low.at, high.at
                    ),
                ));
            }
            if high.clear_below <= low.clear_below {
                return Err(self.error(
                    &high_raw.clear_below.span(),
                    format!(
                        "expected levels.{high_name}.clear_below above levels.{low_name}.clear_below ({}), found {}",
                        low.clear_below, high.clear_below
                    ),
                ));
            }
        }

        let max_changes = *raw.rate_limit.max_changes.get_ref();
        if max_changes == 0 {
            return Err(self.error(
                &raw.rate_limit.max_changes.span(),
                "expected rate_limit.max_changes of at least 1, found 0",
            ));
        }
        let rate_limit = RateLimit {
            max_changes,
            window: self.positive(&raw.rate_limit.window, "rate_limit.window")?,
        };

        let backoff = Backoff {
            base: self.positive(&raw.backoff.base, "backoff.base")?,
            max: self.positive(&raw.backoff.max, "backoff.max")?,
            flap_window: self.positive(&raw.backoff.flap_window, "backoff.flap_window")?,
        };
        if backoff.max < backoff.base {
            return Err(self.error(
                &raw.backoff.max.span(),
                format!(
                    "expected backoff.max of at least backoff.base ({}), found {}",
                    humantime::format_duration(backoff.base),
                    humantime::format_duration(backoff.max)
                ),
            ));
        }

        let stages = Stages {
            raise_limits: self.raise_limits(&raw.stages.raise_limits)?,
            shorten_timeouts: self.shorten_timeouts(&raw.stages.shorten_timeouts)?,
            notrack_hot_ports: raw
                .stages
                .notrack_hot_ports
                .as_ref()
                .map(|s| self.notrack(s))
                .transpose()?,
            evict: raw
                .stages
                .evict
                .as_ref()
                .map(|s| self.evict(s))
                .transpose()?,
        };

        let rollback = Rollback {
            recover_below: self.ratio(&raw.rollback.recover_below, "rollback.recover_below")?,
            recover_for: self.positive(&raw.rollback.recover_for, "rollback.recover_for")?,
            pause: raw.rollback.pause.get_ref().0,
            rollback_on_exit: raw.rollback.rollback_on_exit,
        };

        let policy = Policy {
            source: self.source_name.to_string(),
            mode,
            poll,
            levels,
            rate_limit,
            backoff,
            stages,
            rollback,
            persist: raw.persist,
        };
        // Rolling back while the ratio is still above the clear level of a stage's trigger
        // would undo the stage only to fire it again: flapping by construction.
        if let Some(trigger) = policy.lowest_trigger() {
            let clear = policy
                .levels
                .threshold(trigger)
                .map_or(1.0, |t| t.clear_below);
            if policy.rollback.recover_below > clear {
                return Err(self.error(
                    &raw.rollback.recover_below.span(),
                    format!(
                        "expected rollback.recover_below at most levels.{}.clear_below ({clear}) since a stage triggers at {}, found {}",
                        trigger.name(),
                        trigger.name(),
                        policy.rollback.recover_below
                    ),
                ));
            }
        }
        Ok(policy)
    }

    fn raise_limits(&self, s: &Spanned<raw::RawRaiseLimits>) -> Result<RaiseLimits, PolicyError> {
        let raw = s.get_ref();
        let common = self.stage_common(raw.enabled, raw.trigger, &raw.cooldown)?;
        let factor = |v: &Spanned<f64>, name: &str| {
            let f = *v.get_ref();
            if f.is_finite() && f > 1.0 && f <= 16.0 {
                Ok(f)
            } else {
                Err(self.error(
                    &v.span(),
                    format!(
                        "expected stages.raise_limits.{name} above 1 (and at most 16) so a raise adds room, found {f}"
                    ),
                ))
            }
        };
        let headroom = factor(&raw.headroom, "headroom")?;
        let min_step = factor(&raw.min_step, "min_step")?;
        let ram_share = match &raw.ram_share {
            Some(share) => {
                let v = self.ratio(share, "stages.raise_limits.ram_share")?;
                if v > 0.5 {
                    return Err(self.error(
                        &share.span(),
                        format!(
                            "expected stages.raise_limits.ram_share of at most 50% of MemTotal, found {}%",
                            v * 100.0
                        ),
                    ));
                }
                Some(v)
            }
            None => None,
        };
        let ram_bytes = match &raw.ram_bytes {
            Some(bytes) if bytes.get_ref().0 == 0 => {
                return Err(self.error(
                    &bytes.span(),
                    "expected stages.raise_limits.ram_bytes above 0",
                ));
            }
            Some(bytes) => Some(bytes.get_ref().0),
            None => None,
        };
        if ram_share.is_none() && ram_bytes.is_none() {
            return Err(self.error(
                &s.span(),
                "expected stages.raise_limits to set ram_share and/or ram_bytes (the RAM budget the table may use)",
            ));
        }
        let absolute_cap = match &raw.absolute_cap {
            Some(cap) if *cap.get_ref() == 0 => {
                return Err(self.error(
                    &cap.span(),
                    "expected stages.raise_limits.absolute_cap above 0",
                ));
            }
            Some(cap) => Some(*cap.get_ref()),
            None => None,
        };
        let buckets_divisor = *raw.buckets_divisor.get_ref();
        if !(1..=16).contains(&buckets_divisor) {
            return Err(self.error(
                &raw.buckets_divisor.span(),
                format!(
                    "expected stages.raise_limits.buckets_divisor in 1..=16 (entries per hash bucket), found {buckets_divisor}"
                ),
            ));
        }
        Ok(RaiseLimits {
            common,
            headroom,
            min_step,
            ram_share,
            ram_bytes,
            absolute_cap,
            buckets_divisor,
            bucket_change_interval: raw.bucket_change_interval.get_ref().0,
        })
    }

    fn shorten_timeouts(
        &self,
        s: &Spanned<raw::RawShortenTimeouts>,
    ) -> Result<ShortenTimeouts, PolicyError> {
        let raw = s.get_ref();
        let common = self.stage_common(raw.enabled, raw.trigger, &raw.cooldown)?;
        if common.enabled && raw.timeouts.is_empty() {
            return Err(self.error(
                &s.span(),
                "expected at least one entry in stages.shorten_timeouts.timeouts when the stage is enabled",
            ));
        }
        let mut timeouts = BTreeMap::new();
        for (knob, spanned) in &raw.timeouts {
            let t = spanned.get_ref();
            let name = knob.name();
            let whole_seconds = |v: &Spanned<DurationValue>, key: &str| {
                let d = v.get_ref().0;
                if d.is_zero() || d.subsec_nanos() != 0 {
                    Err(self.error(
                        &v.span(),
                        format!(
                            "expected timeouts.{name}.{key} as a whole number of seconds above 0 (the sysctl is in seconds), found {}",
                            humantime::format_duration(d)
                        ),
                    ))
                } else {
                    Ok(d.as_secs())
                }
            };
            let target = whole_seconds(&t.target, "target")?;
            let floor = whole_seconds(&t.floor, "floor")?;
            if floor > target {
                return Err(self.error(
                    &t.floor.span(),
                    format!(
                        "expected timeouts.{name}.floor at most its target ({target}s), found {floor}s"
                    ),
                ));
            }
            timeouts.insert(*knob, TimeoutTarget { target, floor });
        }
        Ok(ShortenTimeouts { common, timeouts })
    }

    fn notrack(&self, s: &Spanned<raw::RawNotrack>) -> Result<NotrackHotPorts, PolicyError> {
        let raw = s.get_ref();
        let common = self.stage_common(raw.enabled, raw.trigger, &raw.cooldown)?;
        let min_share = self.ratio(&raw.min_share, "stages.notrack_hot_ports.min_share")?;
        let ports = |list: &Option<Spanned<Vec<u16>>>, key: &str| {
            let mut set = BTreeSet::new();
            if let Some(list) = list {
                for &port in list.get_ref() {
                    if port == 0 {
                        return Err(self.error(
                            &list.span(),
                            format!("expected ports 1..=65535 in stages.notrack_hot_ports.{key}, found 0"),
                        ));
                    }
                    set.insert(port);
                }
            }
            Ok(set)
        };
        let allow = ports(&raw.allow, "allow")?;
        let deny = ports(&raw.deny, "deny")?;
        if let Some(port) = allow.intersection(&deny).next() {
            let span = raw.deny.as_ref().map_or_else(|| s.span(), |d| d.span());
            return Err(self.error(
                &span,
                format!("expected allow and deny lists without common ports, found {port} in both"),
            ));
        }
        if common.enabled && allow.is_empty() {
            return Err(self.error(
                &raw.allow.as_ref().map_or_else(|| s.span(), |a| a.span()),
                "expected a non-empty stages.notrack_hot_ports.allow list when the stage is enabled (only listed ports are ever untracked)",
            ));
        }
        let max_ports = *raw.max_ports.get_ref();
        if max_ports == 0 {
            return Err(self.error(
                &raw.max_ports.span(),
                "expected stages.notrack_hot_ports.max_ports of at least 1",
            ));
        }
        Ok(NotrackHotPorts {
            common,
            min_share,
            allow,
            deny,
            max_ports,
            expiry: self.positive(&raw.expiry, "stages.notrack_hot_ports.expiry")?,
            accept_untracked: raw.accept_untracked,
        })
    }

    fn evict(&self, s: &Spanned<raw::RawEvict>) -> Result<Evict, PolicyError> {
        let raw = s.get_ref();
        let common = self.stage_common(raw.enabled, raw.trigger, &raw.cooldown)?;
        let states: BTreeSet<EvictState> = raw.states.get_ref().iter().copied().collect();
        if states.is_empty() {
            return Err(self.error(
                &raw.states.span(),
                "expected at least one state in stages.evict.states",
            ));
        }
        let batch = *raw.batch.get_ref();
        if batch == 0 {
            return Err(self.error(
                &raw.batch.span(),
                "expected stages.evict.batch of at least 1",
            ));
        }
        Ok(Evict {
            common,
            states,
            min_age: raw.min_age.get_ref().0,
            batch,
        })
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    // Spans always fall on char boundaries; stepping back keeps a bad one from panicking.
    let offset = (0..=offset)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..offset].chars().count() + 1;
    (line, column)
}

fn fmt_duration(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

impl fmt::Display for Policy {
    /// The effective policy, one setting a line, in the file's own vocabulary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "mode = {}", self.mode.name())?;
        writeln!(
            f,
            "poll: every {} at rest, every {} under pressure",
            fmt_duration(self.poll.at_rest),
            fmt_duration(self.poll.under_pressure)
        )?;
        for (level, t) in self.levels.iter() {
            writeln!(
                f,
                "level {:<8} at {:.2}, clears below {:.2}, sustained {}",
                level.name(),
                t.at,
                t.clear_below,
                fmt_duration(t.sustain)
            )?;
        }
        writeln!(
            f,
            "level critical also on any drop / insert_failed increase or table-full kernel message"
        )?;
        writeln!(
            f,
            "rate limit: {} changes per {}; back-off {} doubling to {}, flapping within {}",
            self.rate_limit.max_changes,
            fmt_duration(self.rate_limit.window),
            fmt_duration(self.backoff.base),
            fmt_duration(self.backoff.max),
            fmt_duration(self.backoff.flap_window)
        )?;
        for kind in StageKind::ALL {
            let Some(common) = self.stages.common(kind) else {
                writeln!(f, "stage {}: not configured (off)", kind.name())?;
                continue;
            };
            write!(f, "stage {}: ", kind.name())?;
            if !common.enabled {
                writeln!(f, "disabled")?;
                continue;
            }
            write!(
                f,
                "at {}, cooldown {}; ",
                common.trigger.name(),
                fmt_duration(common.cooldown)
            )?;
            match kind {
                StageKind::RaiseLimits => {
                    let s = &self.stages.raise_limits;
                    write!(
                        f,
                        "max = max({}×count, {}×max), buckets = max/{} (changed at most every {})",
                        s.headroom,
                        s.min_step,
                        s.buckets_divisor,
                        fmt_duration(s.bucket_change_interval)
                    )?;
                    if let Some(share) = s.ram_share {
                        write!(f, ", RAM share {}%", share * 100.0)?;
                    }
                    if let Some(bytes) = s.ram_bytes {
                        write!(f, ", RAM bytes {bytes}")?;
                    }
                    if let Some(cap) = s.absolute_cap {
                        write!(f, ", cap {cap}")?;
                    }
                    writeln!(f)?;
                }
                StageKind::ShortenTimeouts => {
                    let list: Vec<String> = self
                        .stages
                        .shorten_timeouts
                        .timeouts
                        .iter()
                        .map(|(k, t)| format!("{} → {}s (floor {}s)", k.name(), t.target, t.floor))
                        .collect();
                    writeln!(f, "{}", list.join(", "))?;
                }
                StageKind::NotrackHotPorts => {
                    if let Some(s) = &self.stages.notrack_hot_ports {
                        writeln!(
                            f,
                            "ports holding ≥ {:.0}% of the table, allow {:?}, deny {:?}, at most {}, expiring after {}{}",
                            s.min_share * 100.0,
                            s.allow,
                            s.deny,
                            s.max_ports,
                            fmt_duration(s.expiry),
                            if s.accept_untracked {
                                ", UNTRACKED accepted (iptables)"
                            } else {
                                ""
                            }
                        )?;
                    }
                }
                StageKind::Evict => {
                    if let Some(s) = &self.stages.evict {
                        let states: Vec<&str> = s.states.iter().map(|s| s.name()).collect();
                        writeln!(
                            f,
                            "states {}, older than {}, batches of {}",
                            states.join(","),
                            fmt_duration(s.min_age),
                            s.batch
                        )?;
                    }
                }
            }
        }
        writeln!(
            f,
            "rollback: once count/original max < {:.2} for {}, one stage at a time, {} apart; on exit: {}",
            self.rollback.recover_below,
            fmt_duration(self.rollback.recover_for),
            fmt_duration(self.rollback.pause),
            if self.rollback.rollback_on_exit {
                "roll back"
            } else {
                "keep changes"
            }
        )?;
        writeln!(
            f,
            "persist across reboots: {}",
            if self.persist {
                "yes (/etc/sysctl.d/90-ctguard.conf, /etc/modprobe.d/ctguard.conf)"
            } else {
                "no"
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_characters() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        // 'é' is two bytes: the '=' after "bé " is the 4th character.
        assert_eq!(line_column(text, 10), (2, 4));
        assert_eq!(line_column(text, 999), (3, 1));
    }

    #[test]
    fn embedded_default_is_valid() {
        let p = Policy::embedded_default();
        assert_eq!(p.mode, Mode::Enforce);
        assert!(p.levels.warn.at < p.levels.act.at);
    }

    #[test]
    fn backoff_doubles_up_to_max() {
        let b = Backoff {
            base: Duration::from_secs(10),
            max: Duration::from_secs(60),
            flap_window: Duration::from_secs(600),
        };
        let delays: Vec<u64> = (0..6).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(delays, [0, 10, 20, 40, 60, 60]);
        assert_eq!(b.delay(200), Duration::from_secs(60));
    }
}
