/*!
Incident records: the story of one incident, kept as JSON under `STATE_DIR/incidents/`.

An incident opens when the engine opens one (the first level above normal) and closes
when the engine closes it (pressure gone and every change rolled back). The
[`IncidentRecorder`] follows the daemon's hooks (samples, kernel messages, decisions,
outcomes, notes) and keeps an [`IncidentRecord`]: a header (times, peak, drops, stages)
and a timeline of entries. The hooks only change the record in memory; the daemon writes
it with [`IncidentRecorder::flush`] once it has acted on what it saw, because each atomic
rewrite costs two fsyncs, and on a busy disk those took hundreds of milliseconds that
stood between a kernel signal and the first change. A crash leaves a usable record (at
most one turn of the daemon, or a few seconds of samples, behind).

Bounded by design: samples are kept while under pressure and once per 10 s at rest; past
[`MAX_SAMPLES`] every other sample is dropped (its packet drops carried to the next one);
repeated kernel messages are folded into one entry; past [`MAX_EVENTS`] other entries are
only counted; while records cannot be written, at most [`MAX_UNSAVED_CLOSED`] closed ones
wait in memory.

Ids are unique across restarts (the engine counts incidents from 1 per process): the
opening time in UTC plus the engine's number, e.g. `2026-11-22T03-16-12Z-1`.

[`narrative`] tells a record in plain words; [`chart`] maps it to the timeline picture
of [`crate::svg`].
*/

use crate::engine::levels::lost_between;
use crate::engine::{Action, Decision, DecisionId, EngineState, Outcome, knob_label};
use crate::observe::{ConntrackSample, ConntrackStats, KernelEvent};
use crate::policy::Level;
use crate::svg::{Chart, ChartPoint, DropMark, Marker, MarkerKind};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::warn;

/// The on-disk format version.
const FORMAT_VERSION: u32 = 1;
/// Samples kept per record before the timeline is thinned.
pub const MAX_SAMPLES: usize = 1500;
/// Other entries kept per record; later ones are only counted.
pub const MAX_EVENTS: usize = 2000;
/// At rest (level normal, e.g. waiting to roll back), one sample per this interval.
const AT_REST_EVERY: Duration = Duration::from_secs(10);
/// Samples kept from before the incident, to show the ramp-up.
const CONTEXT_SAMPLES: usize = 20;
/// Samples alone rewrite the file at most this often (everything else at once).
const SAMPLE_WRITE_EVERY: Duration = Duration::from_secs(5);
/// Closed records kept while they cannot be written; past this the oldest is dropped.
pub const MAX_UNSAVED_CLOSED: usize = 8;
/// Identical kernel messages closer than this are one entry.
const KERNEL_FOLD: Duration = Duration::from_secs(10);

/// One incident, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncidentRecord {
    pub version: u32,
    /// Unique across restarts: `2026-11-22T03-16-12Z-1`.
    pub id: String,
    /// The engine's number for it (restarts at 1 with every process).
    pub engine_incident: u64,
    /// The policy mode: `enforce`, `dry-run` or `observe`.
    pub mode: String,
    /// The protected namespace, when not ctguard's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    pub opened_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_unix_ms: Option<u64>,
    /// Why the record ended without the engine closing the incident.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<String>,
    /// The fullest sample of the incident.
    pub peak: Peak,
    /// Packets the kernel dropped (drop + insert_failed increases) during the incident.
    pub drops: u64,
    /// Stages that changed something (or would have, in dry-run), in first-use order.
    pub stages: Vec<String>,
    /// Entries left out to keep the file bounded.
    #[serde(default)]
    pub omitted: u64,
    pub timeline: Vec<Entry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Peak {
    pub at_unix_ms: u64,
    pub count: u64,
    pub max: u64,
    pub ratio: f64,
}

/// One timeline entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub at_unix_ms: u64,
    #[serde(flatten)]
    pub what: What,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum What {
    Sample {
        count: u64,
        max: u64,
        level: String,
        /// Packets dropped since the previous sample kept.
        #[serde(default)]
        drops: u64,
    },
    Level {
        from: String,
        to: String,
    },
    Kernel {
        event: KernelEvent,
        /// How many such messages this entry stands for.
        repeated: u64,
        last_unix_ms: u64,
    },
    Decision {
        id: u64,
        stage: String,
        /// `apply`, `rollback`, `notrack`, `untrack` or `evict`.
        verb: String,
        dry_run: bool,
        /// What it does, e.g. `max 4096 → 5768, buckets 1024 → 1442`.
        what: String,
        reason: String,
    },
    Outcome {
        id: u64,
        /// `applied`, `not_permitted` or `failed`.
        result: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// Anything else worth telling: probe results, drift, stop.
    Note {
        text: String,
    },
}

impl IncidentRecord {
    pub fn is_open(&self) -> bool {
        self.closed_unix_ms.is_none() && self.interrupted.is_none()
    }

    /// Decisions with an outcome of `result` (`applied`, `not_permitted`, `failed`).
    fn outcomes(&self, result: &str) -> usize {
        self.timeline
            .iter()
            .filter(|e| matches!(&e.what, What::Outcome { result: r, .. } if r == result))
            .count()
    }

    fn decisions(&self) -> impl Iterator<Item = (&Entry, u64, &str, &str, bool)> {
        self.timeline.iter().filter_map(|e| match &e.what {
            What::Decision {
                id,
                stage,
                verb,
                dry_run,
                ..
            } => Some((e, *id, stage.as_str(), verb.as_str(), *dry_run)),
            _ => None,
        })
    }

    fn outcome_of(&self, decision: u64) -> Option<(&Entry, &str, Option<&str>)> {
        self.timeline.iter().find_map(|e| match &e.what {
            What::Outcome { id, result, detail } if *id == decision => {
                Some((e, result.as_str(), detail.as_deref()))
            }
            _ => None,
        })
    }

    /// `3 applied, 1 not permitted, 0 failed; all rolled back` and the like.
    pub fn outcome_summary(&self) -> String {
        let would = self.decisions().filter(|d| d.4).count();
        let mut parts = Vec::new();
        if would > 0 {
            parts.push(format!("{would} would (dry-run)"));
        }
        let applied = self.outcomes("applied");
        let refused = self.outcomes("not_permitted");
        let failed = self.outcomes("failed");
        if applied + refused + failed > 0 || would == 0 {
            parts.push(format!(
                "{applied} applied, {refused} not permitted, {failed} failed"
            ));
        }
        let rollbacks = self
            .decisions()
            .filter(|d| d.3 == "rollback" || d.3 == "untrack")
            .count();
        if rollbacks > 0 {
            let plural = if rollbacks == 1 { "" } else { "s" };
            parts.push(format!("{rollbacks} rollback step{plural}"));
        }
        parts.join("; ")
    }

    /// `03:17:24` / `open` / `interrupted`.
    pub fn status_label(&self) -> String {
        match (self.closed_unix_ms, &self.interrupted) {
            (Some(t), None) => clock(t),
            (Some(t), Some(_)) => format!("{} (stopped)", clock(t)),
            (None, Some(_)) => "interrupted".into(),
            (None, None) => "open".into(),
        }
    }
}

/// Where incident records are stored: one `<id>.json` each (mode 0600, dir 0700).
#[derive(Debug, Clone)]
pub struct IncidentDir {
    path: PathBuf,
}

impl IncidentDir {
    pub fn new(path: impl Into<PathBuf>) -> IncidentDir {
        IncidentDir { path: path.into() }
    }

    /// `STATE_DIR/incidents`.
    pub fn under_state_dir(state_dir: &Path) -> IncidentDir {
        IncidentDir::new(state_dir.join("incidents"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file_name(id: &str) -> String {
        format!("{id}.json")
    }

    fn exists(&self, id: &str) -> bool {
        self.path.join(Self::file_name(id)).exists()
    }

    /// Writes a record atomically.
    pub fn save(&self, record: &IncidentRecord) -> io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.path)?;
        let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        crate::journal::write_atomically(&self.path, &Self::file_name(&record.id), &bytes)
    }

    /// Every record, oldest first. A missing directory is no records; a file that cannot
    /// be read or parsed is an error naming it.
    pub fn load_all(&self) -> Result<Vec<IncidentRecord>, IncidentError> {
        let dir = match std::fs::read_dir(&self.path) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(IncidentError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let mut records = Vec::new();
        for entry in dir {
            let path = entry
                .map_err(|source| IncidentError::Io {
                    path: self.path.clone(),
                    source,
                })?
                .path();
            // Skips the temporary files of atomic writes (`.<id>.json.tmp`).
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            records.push(load(&path)?);
        }
        records.sort_by(|a, b| (a.opened_unix_ms, &a.id).cmp(&(b.opened_unix_ms, &b.id)));
        Ok(records)
    }

    /// The record with this id, or the only one whose id starts with it; `latest` for the
    /// most recently opened.
    pub fn find(&self, wanted: &str) -> Result<IncidentRecord, IncidentError> {
        let mut all = self.load_all()?;
        if wanted == "latest" {
            return all.pop().ok_or_else(|| IncidentError::NotFound {
                dir: self.path.clone(),
                id: wanted.into(),
            });
        }
        if let Some(i) = all.iter().position(|r| r.id == wanted) {
            return Ok(all.swap_remove(i));
        }
        let mut matching: Vec<IncidentRecord> = all
            .into_iter()
            .filter(|r| r.id.starts_with(wanted))
            .collect();
        match matching.len() {
            1 => Ok(matching.remove(0)),
            0 => Err(IncidentError::NotFound {
                dir: self.path.clone(),
                id: wanted.into(),
            }),
            _ => Err(IncidentError::Ambiguous {
                id: wanted.into(),
                matches: matching.into_iter().map(|r| r.id).collect(),
            }),
        }
    }
}

fn load(path: &Path) -> Result<IncidentRecord, IncidentError> {
    let bytes = std::fs::read(path).map_err(|source| IncidentError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| IncidentError::Format {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum IncidentError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: expected an incident record (JSON): {detail}")]
    Format { path: PathBuf, detail: String },
    #[error("no incident {id:?} in {dir}")]
    NotFound { dir: PathBuf, id: String },
    #[error("{id:?} matches several incidents: {}", matches.join(", "))]
    Ambiguous { id: String, matches: Vec<String> },
}

/// Follows the daemon and keeps the record of the open incident on disk.
///
/// `now` is the daemon's monotonic time; `wall_start` is the wall-clock time at which
/// `now` was zero, so entries carry real times. Nothing reaches the disk until
/// [`IncidentRecorder::flush`] (or [`IncidentRecorder::on_stop`]). Write failures are logged
/// (once until a write succeeds again) and never stop the daemon.
#[derive(Debug)]
pub struct IncidentRecorder {
    dir: IncidentDir,
    wall_start: SystemTime,
    netns: Option<String>,
    open: Option<Open>,
    /// Recent samples while no incident is open, to show what led up to one.
    context: VecDeque<Entry>,
    last_stats: Option<ConntrackStats>,
    /// Records closed but not written yet (kept until a write succeeds, the newest
    /// [`MAX_UNSAVED_CLOSED`] at most).
    closed: Vec<IncidentRecord>,
    write_failing: bool,
}

/// What the open record holds that is not on disk yet. Samples alone are written at most
/// every [`SAMPLE_WRITE_EVERY`]; anything else at the next flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Unsaved {
    Nothing,
    Samples,
    Events,
}

#[derive(Debug)]
struct Open {
    record: IncidentRecord,
    engine_incident: u64,
    level: Level,
    last_sample_kept: Option<Duration>,
    last_sample_max: u64,
    /// Drops since the last kept sample.
    drops_pending: u64,
    last_write: Option<Duration>,
    unsaved: Unsaved,
}

impl Open {
    fn changed(&mut self, what: Unsaved) {
        self.unsaved = self.unsaved.max(what);
    }
}

impl IncidentRecorder {
    /// A recorder writing to `dir`. Records a previous process left open (it crashed or
    /// was killed) are marked interrupted.
    /// A recorder whose records are stamped from the wall clock read now. Records name
    /// real times for people; the engine itself only ever sees monotonic time.
    pub fn starting_now(dir: IncidentDir, netns: Option<&Path>) -> Self {
        IncidentRecorder::new(dir, SystemTime::now(), netns)
    }

    pub fn new(dir: IncidentDir, wall_start: SystemTime, netns: Option<&Path>) -> Self {
        let recorder = IncidentRecorder {
            dir,
            wall_start,
            netns: netns.map(|p| p.display().to_string()),
            open: None,
            context: VecDeque::new(),
            last_stats: None,
            closed: Vec::new(),
            write_failing: false,
        };
        recorder.mark_left_open();
        recorder
    }

    fn mark_left_open(&self) {
        let Ok(records) = self.dir.load_all() else {
            return;
        };
        for mut record in records.into_iter().filter(IncidentRecord::is_open) {
            record.interrupted = Some("ctguard exited before the incident closed".into());
            if let Err(e) = self.dir.save(&record) {
                warn!(error = %e, id = record.id, "could not mark an incident record interrupted");
            }
        }
    }

    /// The id of the incident being recorded.
    pub fn open_id(&self) -> Option<&str> {
        self.open.as_ref().map(|o| o.record.id.as_str())
    }

    fn unix_ms(&self, now: Duration) -> u64 {
        let t = self.wall_start + now;
        u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis())
            .unwrap_or(u64::MAX)
    }

    /// After the engine has seen a sample.
    pub fn on_sample(&mut self, now: Duration, sample: &ConntrackSample, state: &EngineState) {
        let drops = lost_between(self.last_stats.as_ref(), sample.stats.as_ref());
        self.last_stats = sample.stats;
        self.follow(now, state);
        let at = self.unix_ms(now);
        let entry = |drops| Entry {
            at_unix_ms: at,
            what: What::Sample {
                count: sample.count,
                max: sample.max,
                level: state.level.name().into(),
                drops,
            },
        };
        let Some(open) = self.open.as_mut() else {
            self.context.push_back(entry(drops));
            if self.context.len() > CONTEXT_SAMPLES {
                self.context.pop_front();
            }
            return;
        };
        let record = &mut open.record;
        record.drops = record.drops.saturating_add(drops);
        if sample.ratio() > record.peak.ratio {
            record.peak = Peak {
                at_unix_ms: at,
                count: sample.count,
                max: sample.max,
                ratio: sample.ratio(),
            };
        }
        open.drops_pending = open.drops_pending.saturating_add(drops);
        let keep = state.level > Level::Normal
            || open.drops_pending > 0
            || sample.max != open.last_sample_max
            || open
                .last_sample_kept
                .is_none_or(|t| now.saturating_sub(t) >= AT_REST_EVERY);
        if keep {
            record.timeline.push(entry(open.drops_pending));
            open.drops_pending = 0;
            open.last_sample_kept = Some(now);
            open.last_sample_max = sample.max;
            thin_samples(&mut record.timeline);
            open.changed(Unsaved::Samples);
        }
    }

    /// After the engine has seen a kernel message.
    pub fn on_kernel(&mut self, now: Duration, event: &KernelEvent, state: &EngineState) {
        self.follow(now, state);
        let at = self.unix_ms(now);
        let Some(open) = self.open.as_mut() else {
            return;
        };
        let folded = open
            .record
            .timeline
            .iter_mut()
            .rev()
            .find_map(|e| match &mut e.what {
                What::Kernel {
                    event: previous,
                    repeated,
                    last_unix_ms,
                } if std::mem::discriminant(previous) == std::mem::discriminant(event)
                    && at.saturating_sub(*last_unix_ms) < KERNEL_FOLD.as_millis() as u64 =>
                {
                    Some((previous, repeated, last_unix_ms))
                }
                _ => None,
            });
        match folded {
            Some((previous, repeated, last)) => {
                *repeated += 1;
                *last = at;
                if let (
                    KernelEvent::CallbacksSuppressed { count: total, .. },
                    KernelEvent::CallbacksSuppressed { count, .. },
                ) = (previous, event)
                {
                    *total = total.saturating_add(*count);
                }
            }
            None => push_event(
                &mut open.record,
                Entry {
                    at_unix_ms: at,
                    what: What::Kernel {
                        event: event.clone(),
                        repeated: 1,
                        last_unix_ms: at,
                    },
                },
            ),
        }
        open.changed(Unsaved::Events);
    }

    /// Before a decision is carried out.
    pub fn on_decision(&mut self, now: Duration, decision: &Decision) {
        let at = self.unix_ms(now);
        let Some(open) = self.open.as_mut() else {
            return;
        };
        let (action, dry_run) = match &decision.action {
            Action::DryRun(inner) => (&**inner, true),
            action => (action, false),
        };
        let (verb, what) = describe_action(action);
        push_event(
            &mut open.record,
            Entry {
                at_unix_ms: at,
                what: What::Decision {
                    id: decision.id.0,
                    stage: decision.stage.name().into(),
                    verb: verb.into(),
                    dry_run,
                    what,
                    reason: decision.reason.clone(),
                },
            },
        );
        if dry_run && !matches!(verb, "rollback" | "untrack") {
            note_stage(&mut open.record, decision.stage.name());
        }
        open.changed(Unsaved::Events);
    }

    /// After the engine has been told a decision's outcome (`state` is the engine's state
    /// after that: the incident may have closed).
    pub fn on_outcome(
        &mut self,
        now: Duration,
        id: DecisionId,
        outcome: &Outcome,
        state: &EngineState,
    ) {
        let at = self.unix_ms(now);
        if let Some(open) = self.open.as_mut() {
            let (result, detail) = match outcome {
                Outcome::Applied => ("applied", None),
                Outcome::NotPermitted(why) => ("not_permitted", Some(why.clone())),
                Outcome::Failed(why) => ("failed", Some(why.clone())),
            };
            let stage_applied = open
                .record
                .decisions()
                .find(|d| d.1 == id.0 && !matches!(d.3, "rollback" | "untrack"))
                .map(|d| d.2.to_string())
                .filter(|_| result == "applied");
            if let Some(stage) = stage_applied {
                note_stage(&mut open.record, &stage);
            }
            push_event(
                &mut open.record,
                Entry {
                    at_unix_ms: at,
                    what: What::Outcome {
                        id: id.0,
                        result: result.into(),
                        detail,
                    },
                },
            );
            open.changed(Unsaved::Events);
        }
        self.follow(now, state);
    }

    /// Anything else worth keeping with the open incident (probe results, drift).
    pub fn note(&mut self, now: Duration, text: impl Into<String>) {
        let at = self.unix_ms(now);
        if let Some(open) = self.open.as_mut() {
            push_event(
                &mut open.record,
                Entry {
                    at_unix_ms: at,
                    what: What::Note { text: text.into() },
                },
            );
            open.changed(Unsaved::Events);
        }
    }

    /// ctguard is stopping: the open incident's record ends here, and everything is
    /// written.
    pub fn on_stop(&mut self, now: Duration) {
        let at = self.unix_ms(now);
        if let Some(mut open) = self.open.take() {
            open.record.closed_unix_ms = Some(at);
            open.record.interrupted = Some("ctguard stopped".into());
            self.closed.push(open.record);
        }
        self.flush(now);
    }

    /// Opens, closes or switches the record to follow the engine's incident.
    fn follow(&mut self, now: Duration, state: &EngineState) {
        let current = state.incident.map(|i| i.id.0);
        if self.open.as_ref().map(|o| o.engine_incident) != current {
            if let Some(mut open) = self.open.take() {
                open.record.closed_unix_ms = Some(self.unix_ms(now));
                self.closed.push(open.record);
            }
            if let Some(number) = current {
                self.open_record(now, number, state);
            }
        }
        let at = self.unix_ms(now);
        if let Some(open) = self.open.as_mut()
            && open.level != state.level
        {
            push_event(
                &mut open.record,
                Entry {
                    at_unix_ms: at,
                    what: What::Level {
                        from: open.level.name().into(),
                        to: state.level.name().into(),
                    },
                },
            );
            open.level = state.level;
            open.changed(Unsaved::Events);
        }
    }

    fn open_record(&mut self, now: Duration, number: u64, state: &EngineState) {
        let opened = self.unix_ms(now);
        let base = format!("{}-{number}", file_safe_time(opened));
        // A restart within the same second would reuse the id: keep both records.
        let id = (1..)
            .map(|n| match n {
                1 => base.clone(),
                n => format!("{base}.{n}"),
            })
            .find(|id| !self.dir.exists(id))
            .expect("an unused id");
        let timeline: Vec<Entry> = self.context.drain(..).collect();
        self.open = Some(Open {
            record: IncidentRecord {
                version: FORMAT_VERSION,
                id,
                engine_incident: number,
                mode: state.mode.name().into(),
                netns: self.netns.clone(),
                opened_unix_ms: opened,
                closed_unix_ms: None,
                interrupted: None,
                peak: Peak::default(),
                drops: 0,
                stages: Vec::new(),
                omitted: 0,
                timeline,
            },
            engine_incident: number,
            level: Level::Normal,
            last_sample_kept: None,
            last_sample_max: 0,
            drops_pending: 0,
            last_write: None,
            unsaved: Unsaved::Events,
        });
    }

    /// Writes what changed since the last flush: records that closed, and the open record
    /// (when only samples changed, at most every `SAMPLE_WRITE_EVERY`). The daemon calls
    /// this after acting, never between a signal and its reaction.
    pub fn flush(&mut self, now: Duration) {
        let failing = &mut self.write_failing;
        self.closed
            .retain(|record| !save_logged(&self.dir, failing, record));
        let excess = self.closed.len().saturating_sub(MAX_UNSAVED_CLOSED);
        for record in self.closed.drain(..excess) {
            warn!(dir = %self.dir.path().display(), id = record.id,
                "incident record dropped unwritten: too many closed ones are waiting for a write");
        }
        let Some(open) = self.open.as_mut() else {
            return;
        };
        let due = match open.unsaved {
            Unsaved::Nothing => false,
            Unsaved::Samples => open
                .last_write
                .is_none_or(|t| now.saturating_sub(t) >= SAMPLE_WRITE_EVERY),
            Unsaved::Events => true,
        };
        if due && save_logged(&self.dir, failing, &open.record) {
            open.unsaved = Unsaved::Nothing;
            open.last_write = Some(now);
        }
    }
}

/// Writes one record; says whether it was written. A failure is logged once until a
/// write succeeds again (`failing` remembers).
fn save_logged(dir: &IncidentDir, failing: &mut bool, record: &IncidentRecord) -> bool {
    match dir.save(record) {
        Ok(()) => {
            *failing = false;
            true
        }
        Err(e) => {
            if !*failing {
                warn!(error = %e, dir = %dir.path().display(), id = record.id,
                    "could not write the incident record; will keep trying");
            }
            *failing = true;
            false
        }
    }
}

fn note_stage(record: &mut IncidentRecord, stage: &str) {
    if !record.stages.iter().any(|s| s == stage) {
        record.stages.push(stage.to_string());
    }
}

fn push_event(record: &mut IncidentRecord, entry: Entry) {
    let events = record
        .timeline
        .iter()
        .filter(|e| !matches!(e.what, What::Sample { .. }))
        .count();
    if events >= MAX_EVENTS {
        record.omitted += 1;
    } else {
        record.timeline.push(entry);
    }
}

/// Past [`MAX_SAMPLES`], drops every other sample (the newest always stays), carrying
/// its packet drops to the next sample kept so the total is unchanged.
fn thin_samples(timeline: &mut Vec<Entry>) {
    let samples = timeline
        .iter()
        .filter(|e| matches!(e.what, What::Sample { .. }))
        .count();
    if samples <= MAX_SAMPLES {
        return;
    }
    let mut nth = 0;
    let mut carried = 0u64;
    let mut kept = Vec::with_capacity(timeline.len());
    for mut entry in std::mem::take(timeline) {
        if let What::Sample { drops, .. } = &mut entry.what {
            nth += 1;
            if nth % 2 == 1 && nth < samples {
                carried = carried.saturating_add(*drops);
                continue;
            }
            *drops = drops.saturating_add(std::mem::take(&mut carried));
        }
        kept.push(entry);
    }
    *timeline = kept;
}

/// What an action does, as (verb, description).
fn describe_action(action: &Action) -> (&'static str, String) {
    let changes = |c: &[crate::engine::Change]| {
        c.iter()
            .map(|c| format!("{} {} → {}", knob_label(c.knob), c.from, c.to))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ports = |p: &[crate::engine::PortKey]| {
        p.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match action {
        Action::Apply(c) => ("apply", changes(c)),
        Action::Revert(c) => ("rollback", changes(c)),
        Action::Notrack { ports: p, expiry } => (
            "notrack",
            format!("untrack {} for {}", ports(p), span(*expiry)),
        ),
        Action::Untrack { ports: p } => ("untrack", format!("track {} again", ports(p))),
        Action::Evict {
            states,
            min_age,
            batch,
        } => (
            "evict",
            format!(
                "evict up to {batch} entries in {} older than {}",
                states
                    .iter()
                    .map(|s| format!("{s:?}").to_lowercase())
                    .collect::<Vec<_>>()
                    .join("/"),
                span(*min_age)
            ),
        ),
        Action::DryRun(inner) => describe_action(inner),
    }
}

/// `2026-11-22T03-16-12Z`: RFC 3339 in UTC, with dashes for colons (file names).
fn file_safe_time(unix_ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms))
        .to_string()
        .replace(':', "-")
}

/// `2026-11-22 03:16:12 UTC`.
pub fn date_time(unix_ms: u64) -> String {
    let s =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string();
    format!("{} {} UTC", &s[..10], &s[11..19])
}

/// `03:16:12` (UTC).
pub fn clock(unix_ms: u64) -> String {
    let s =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string();
    s[11..19].to_string()
}

/// `1m 12s`, `45s`, `2h 3m`, `350ms`.
pub fn span(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..60 => format!("{s}s"),
        60..3600 if s.is_multiple_of(60) => format!("{}m", s / 60),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        _ if s % 3600 / 60 == 0 => format!("{}h", s / 3600),
        _ => format!("{}h {}m", s / 3600, s % 3600 / 60),
    }
}

fn percent(count: u64, max: u64) -> String {
    if max == 0 {
        "—".into()
    } else {
        format!("{:.0} %", count as f64 * 100.0 / max as f64)
    }
}

fn kernel_words(event: &KernelEvent, repeated: u64) -> String {
    let times = if repeated > 1 {
        format!(" (×{repeated})")
    } else {
        String::new()
    };
    match event {
        KernelEvent::TableFull { .. } => format!("kernel: table full, dropping packets{times}"),
        KernelEvent::ExpectationTableFull => format!("kernel: expectation table full{times}"),
        KernelEvent::CallbacksSuppressed { count, .. } => {
            format!("kernel: {count} more messages suppressed by its rate limit")
        }
        KernelEvent::SynFlood { port } => {
            format!("kernel: possible SYN flood on port {port}{times}")
        }
        KernelEvent::RecordsLost { count } => {
            format!("kernel log overran: {count} records lost before ctguard read them")
        }
    }
}

/// The record told in plain words, one moment a line (times UTC).
pub fn narrative(record: &IncidentRecord) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "incident {} — {} mode{}, opened {}",
        record.id,
        record.mode,
        record
            .netns
            .as_ref()
            .map(|n| format!(", netns {n}"))
            .unwrap_or_default(),
        date_time(record.opened_unix_ms)
    );
    let line = |out: &mut String, at: u64, text: &str| {
        let _ = writeln!(out, "{}  {text}", clock(at));
    };
    let mut opened_told = false;
    let mut peak_told = false;
    // A run of samples with drops is told as one line when it ends (kernel messages
    // about the same drops do not split it).
    let mut drop_run: Option<(u64, u64, u64)> = None;
    let flush_drops = |out: &mut String, run: &mut Option<(u64, u64, u64)>| {
        if let Some((from, to, n)) = run.take() {
            let when = if clock(from) == clock(to) {
                clock(from)
            } else {
                format!("{}–{}", clock(from), clock(to))
            };
            let _ = writeln!(out, "{when}  {n} packets dropped");
        }
    };
    for entry in &record.timeline {
        let at = entry.at_unix_ms;
        if at < record.opened_unix_ms {
            continue;
        }
        if let What::Sample { drops, .. } = &entry.what {
            if *drops > 0 {
                let run = drop_run.get_or_insert((at, at, 0));
                run.1 = at;
                run.2 = run.2.saturating_add(*drops);
            } else {
                flush_drops(&mut out, &mut drop_run);
            }
        } else if !matches!(entry.what, What::Outcome { .. } | What::Kernel { .. }) {
            flush_drops(&mut out, &mut drop_run);
        }
        match &entry.what {
            What::Sample {
                count, max, level, ..
            } => {
                if !opened_told {
                    opened_told = true;
                    line(
                        &mut out,
                        at,
                        &format!(
                            "opened: table at {} of max ({count} of {max}), level {level}",
                            percent(*count, *max)
                        ),
                    );
                } else if !peak_told && at == record.peak.at_unix_ms && *count == record.peak.count
                {
                    line(
                        &mut out,
                        at,
                        &format!("peak: {} of max ({count} of {max})", percent(*count, *max)),
                    );
                }
                if at == record.peak.at_unix_ms {
                    peak_told = true;
                }
            }
            // The opening line already says the level.
            What::Level { from, .. } if from == "normal" && at == record.opened_unix_ms => {}
            What::Level { from, to } if to == "normal" => {
                line(&mut out, at, &format!("recovered: level {from} → normal"))
            }
            What::Level { from, to } => line(&mut out, at, &format!("level {from} → {to}")),
            What::Kernel {
                event, repeated, ..
            } => line(&mut out, at, &kernel_words(event, *repeated)),
            What::Decision {
                id,
                stage,
                verb,
                dry_run,
                what,
                reason,
            } => {
                let doing = match (verb.as_str(), dry_run) {
                    ("rollback" | "untrack", false) => "roll back",
                    ("rollback" | "untrack", true) => "would roll back",
                    (_, false) => "→",
                    (_, true) => "would",
                };
                let result = match record.outcome_of(*id) {
                    Some((o, result, detail)) => {
                        let words = match (result, detail) {
                            ("applied", _) => "applied".to_string(),
                            ("not_permitted", Some(d)) => format!("NOT PERMITTED ({d})"),
                            ("failed", Some(d)) => format!("FAILED ({d})"),
                            (r, _) => r.replace('_', " "),
                        };
                        if clock(o.at_unix_ms) == clock(at) {
                            format!(" — {words}")
                        } else {
                            format!(" — {words} at {}", clock(o.at_unix_ms))
                        }
                    }
                    None if *dry_run => " — nothing changed (dry-run)".into(),
                    None => " — no outcome recorded".into(),
                };
                line(
                    &mut out,
                    at,
                    &format!("d{id} {doing} {what} ({stage}){result}"),
                );
                let _ = writeln!(out, "          because {reason}");
            }
            What::Outcome { .. } => {}
            What::Note { text } => line(&mut out, at, text),
        }
    }
    flush_drops(&mut out, &mut drop_run);
    match (record.closed_unix_ms, &record.interrupted) {
        (Some(closed), None) => line(
            &mut out,
            closed,
            &format!(
                "closed after {}",
                span(Duration::from_millis(
                    closed.saturating_sub(record.opened_unix_ms)
                ))
            ),
        ),
        (Some(closed), Some(why)) => line(&mut out, closed, &format!("record ends: {why}")),
        (None, Some(why)) => {
            let _ = writeln!(out, "record ends: {why}");
        }
        (None, None) => {
            let _ = writeln!(out, "still open");
        }
    }
    let _ = writeln!(
        out,
        "summary: peak {} of max ({} of {}), {} packets dropped, stages: {}; {}{}",
        percent(record.peak.count, record.peak.max),
        record.peak.count,
        record.peak.max,
        record.drops,
        if record.stages.is_empty() {
            "none".to_string()
        } else {
            record.stages.join(", ")
        },
        record.outcome_summary(),
        if record.omitted > 0 {
            format!(" ({} entries left out to bound the record)", record.omitted)
        } else {
            String::new()
        }
    );
    out
}

/// The record as a timeline picture.
pub fn chart(record: &IncidentRecord) -> Chart {
    let origin = record.timeline.first().map_or(record.opened_unix_ms, |e| {
        e.at_unix_ms.min(record.opened_unix_ms)
    });
    let t = |at: u64| at.saturating_sub(origin);
    let mut chart = Chart {
        title: format!("incident {} ({})", record.id, record.mode),
        wall_start_unix_ms: Some(origin),
        points: Vec::new(),
        drops: Vec::new(),
        markers: Vec::new(),
    };
    for entry in &record.timeline {
        match &entry.what {
            What::Sample {
                count, max, drops, ..
            } => {
                chart.points.push(ChartPoint {
                    t_ms: t(entry.at_unix_ms),
                    count: *count,
                    max: *max,
                });
                if *drops > 0 {
                    chart.drops.push(DropMark {
                        t_ms: t(entry.at_unix_ms),
                        packets: *drops,
                    });
                }
            }
            // A dry-run decision is drawn where the real one would have been.
            What::Decision {
                id, stage, verb, ..
            } => {
                let result = record.outcome_of(*id).map(|o| o.1);
                let rollback = matches!(verb.as_str(), "rollback" | "untrack");
                let kind = match (result, rollback) {
                    (Some("not_permitted"), _) => MarkerKind::Refused,
                    (Some("failed"), _) => MarkerKind::Failed,
                    (_, true) => MarkerKind::Rollback,
                    (_, false) => MarkerKind::Stage,
                };
                chart.markers.push(Marker {
                    t_ms: t(entry.at_unix_ms),
                    stage: stage.clone(),
                    kind,
                });
            }
            _ => {}
        }
    }
    chart
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Change, IncidentId, IncidentInfo};
    use crate::knob::Knob;
    use crate::policy::{Mode, StageKind};
    use std::os::unix::fs::PermissionsExt;

    /// 2026-11-22T03:16:02Z.
    const START: u64 = 1_795_317_362;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn state(level: Level, incident: Option<u64>) -> EngineState {
        EngineState {
            mode: Mode::Enforce,
            level,
            ratio: 0.0,
            incident: incident.map(|n| IncidentInfo {
                id: IncidentId(n),
                opened_at: Duration::ZERO,
            }),
            active_stages: Vec::new(),
            applied: Vec::new(),
            notracked: Vec::new(),
            unavailable: Vec::new(),
            pending: Vec::new(),
            poll_interval: secs(1),
            wants_hot_ports: false,
        }
    }

    fn sample(count: u64, max: u64, drop: u64) -> ConntrackSample {
        ConntrackSample {
            count,
            max,
            stats: Some(ConntrackStats {
                drop,
                ..ConntrackStats::default()
            }),
            ..ConntrackSample::default()
        }
    }

    fn recorder(dir: &Path) -> IncidentRecorder {
        IncidentRecorder::new(IncidentDir::new(dir), UNIX_EPOCH + secs(START), None)
    }

    fn raise(id: u64, from: u64, to: u64, revert: bool) -> Decision {
        let changes = vec![Change {
            knob: Knob::Max,
            from,
            to,
        }];
        Decision {
            id: DecisionId(id),
            stage: StageKind::RaiseLimits,
            action: if revert {
                Action::Revert(changes)
            } else {
                Action::Apply(changes)
            },
            reason: format!("ratio {:.2}", from as f64 / 4096.0),
        }
    }

    /// A whole incident: quiet, breach with drops, raise, recover, roll back, close.
    fn record_incident(dir: &Path) -> IncidentRecord {
        let mut rec = recorder(dir);
        let quiet = state(Level::Normal, None);
        rec.on_sample(secs(0), &sample(1000, 4096, 0), &quiet);
        rec.on_sample(secs(5), &sample(2000, 4096, 0), &quiet);
        assert!(rec.open_id().is_none());
        let critical = state(Level::Critical, Some(1));
        rec.on_sample(secs(10), &sample(3850, 4096, 89), &critical);
        rec.on_kernel(secs(10), &KernelEvent::TableFull { netns: None }, &critical);
        rec.on_kernel(secs(11), &KernelEvent::TableFull { netns: None }, &critical);
        rec.on_decision(secs(11), &raise(1, 4096, 5768, false));
        rec.on_outcome(secs(11), DecisionId(1), &Outcome::Applied, &critical);
        rec.on_sample(secs(12), &sample(5600, 5768, 89), &critical);
        let calm = state(Level::Normal, Some(1));
        rec.on_sample(secs(40), &sample(1200, 5768, 89), &calm);
        rec.on_decision(secs(80), &raise(2, 5768, 4096, true));
        rec.on_outcome(secs(82), DecisionId(2), &Outcome::Applied, &quiet);
        assert!(rec.open_id().is_none(), "closed with the engine's incident");
        rec.flush(secs(82));
        let mut all = IncidentDir::new(dir).load_all().unwrap();
        assert_eq!(all.len(), 1);
        all.remove(0)
    }

    #[test]
    fn records_an_incident_from_breach_to_close() {
        let dir = tempfile::tempdir().unwrap();
        let record = record_incident(dir.path());
        assert_eq!(record.id, "2026-11-22T03-16-12Z-1");
        assert_eq!(record.opened_unix_ms, (START + 10) * 1000);
        assert_eq!(record.closed_unix_ms, Some((START + 82) * 1000));
        assert_eq!(record.drops, 89);
        assert_eq!((record.peak.count, record.peak.max), (5600, 5768));
        assert_eq!(record.stages, ["raise_limits"]);
        let samples = record
            .timeline
            .iter()
            .filter(|e| matches!(e.what, What::Sample { .. }))
            .count();
        assert_eq!(samples, 5, "two context samples and three of the incident");
        let kernel: Vec<u64> = record
            .timeline
            .iter()
            .filter_map(|e| match e.what {
                What::Kernel { repeated, .. } => Some(repeated),
                _ => None,
            })
            .collect();
        assert_eq!(kernel, [2], "repeated messages are folded");
        assert_eq!(
            record.outcome_summary(),
            "2 applied, 0 not permitted, 0 failed; 1 rollback step"
        );
        let file = dir.path().join(format!("{}.json", record.id));
        let mode = std::fs::metadata(file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_crash_leaves_a_usable_record_marked_interrupted_on_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = recorder(dir.path());
        let critical = state(Level::Critical, Some(1));
        rec.on_sample(secs(1), &sample(4000, 4096, 0), &critical);
        rec.on_decision(secs(1), &raise(1, 4096, 5768, false));
        // The daemon flushes after each turn; the crash comes after that.
        rec.flush(secs(1));
        drop(rec);
        let left = IncidentDir::new(dir.path()).find("latest").unwrap();
        assert!(left.is_open());
        assert!(matches!(
            left.timeline.last().unwrap().what,
            What::Decision { .. }
        ));
        // A new process numbers its incidents from 1 again, at the same second.
        let mut again = recorder(dir.path());
        let reopened = IncidentDir::new(dir.path()).find(&left.id).unwrap();
        assert!(reopened.interrupted.is_some());
        assert_eq!(reopened.status_label(), "interrupted");
        again.on_sample(secs(1), &sample(4000, 4096, 0), &critical);
        assert_eq!(again.open_id(), Some("2026-11-22T03-16-03Z-1.2"));
    }

    #[test]
    fn hooks_leave_the_disk_alone_until_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = recorder(dir.path());
        let critical = state(Level::Critical, Some(1));
        rec.on_sample(secs(1), &sample(4096, 4096, 3), &critical);
        rec.on_kernel(secs(1), &KernelEvent::TableFull { netns: None }, &critical);
        rec.on_decision(secs(1), &raise(1, 4096, 5768, false));
        rec.on_outcome(secs(1), DecisionId(1), &Outcome::Applied, &critical);
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 0, "written before the daemon acted");
        rec.flush(secs(1));
        let written = IncidentDir::new(dir.path()).find("latest").unwrap();
        assert_eq!(
            written.outcome_summary(),
            "1 applied, 0 not permitted, 0 failed"
        );
        // A sample alone waits for SAMPLE_WRITE_EVERY; anything else goes at the next flush.
        rec.on_sample(secs(2), &sample(5000, 5768, 3), &critical);
        rec.flush(secs(2));
        let unchanged = IncidentDir::new(dir.path()).find("latest").unwrap();
        assert_eq!(unchanged, written);
        rec.flush(secs(1) + SAMPLE_WRITE_EVERY);
        let later = IncidentDir::new(dir.path()).find("latest").unwrap();
        let last_count = later.timeline.iter().rev().find_map(|e| match e.what {
            What::Sample { count, .. } => Some(count),
            _ => None,
        });
        assert_eq!(last_count, Some(5000));
    }

    #[test]
    fn records_that_cannot_be_written_are_kept_in_bounds() {
        let scratch = tempfile::tempdir().unwrap();
        // A directory that can never be made (its parent is a file), even as root.
        let blocker = scratch.path().join("file");
        std::fs::write(&blocker, b"").unwrap();
        let mut rec = recorder(&blocker.join("incidents"));
        let quiet = state(Level::Normal, None);
        for n in 1..=(MAX_UNSAVED_CLOSED as u64 + 20) {
            let t = secs(n * 100);
            rec.on_sample(t, &sample(4000, 4096, 0), &state(Level::Critical, Some(n)));
            rec.on_sample(t + secs(50), &sample(1000, 4096, 0), &quiet);
            rec.flush(t + secs(50));
        }
        assert_eq!(rec.closed.len(), MAX_UNSAVED_CLOSED);
        let newest = rec.closed.last().unwrap();
        assert_eq!(newest.engine_incident, MAX_UNSAVED_CLOSED as u64 + 20);
    }

    #[test]
    fn long_incidents_stay_bounded_and_keep_every_drop() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = recorder(dir.path());
        let critical = state(Level::Critical, Some(1));
        for i in 0..5 * MAX_SAMPLES as u64 {
            rec.on_sample(
                Duration::from_millis(100 * i),
                &sample(4096, 4096, i),
                &critical,
            );
        }
        rec.on_stop(secs(10_000));
        let record = IncidentDir::new(dir.path()).find("2026").unwrap();
        let samples: Vec<u64> = record
            .timeline
            .iter()
            .filter_map(|e| match e.what {
                What::Sample { drops, .. } => Some(drops),
                _ => None,
            })
            .collect();
        assert!(samples.len() <= MAX_SAMPLES, "{} samples", samples.len());
        let total = 5 * MAX_SAMPLES as u64 - 1;
        assert_eq!(samples.iter().sum::<u64>(), total);
        assert_eq!(record.drops, total);
        assert_eq!(record.interrupted.as_deref(), Some("ctguard stopped"));
    }

    #[test]
    fn narrative_tells_the_story_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let text = narrative(&record_incident(dir.path()));
        let expected = [
            "03:16:12  opened: table at 94 % of max (3850 of 4096), level critical",
            "03:16:12  kernel: table full, dropping packets (×2)",
            "03:16:12  89 packets dropped",
            "03:16:13  d1 → max 4096 → 5768 (raise_limits) — applied",
            "because ratio 1.00",
            "03:16:14  peak: 97 % of max (5600 of 5768)",
            "03:16:42  recovered: level critical → normal",
            "03:17:22  d2 roll back max 5768 → 4096 (raise_limits) — applied at 03:17:24",
            "03:17:24  closed after 1m 12s",
            "summary: peak 97 % of max (5600 of 5768), 89 packets dropped, stages: raise_limits",
        ];
        let mut from = 0;
        for line in expected {
            let at = text[from..]
                .find(line)
                .unwrap_or_else(|| panic!("{line:?} missing or out of order in:\n{text}"));
            from += at + line.len();
        }
    }

    #[test]
    fn chart_marks_stages_rollbacks_and_drops() {
        let dir = tempfile::tempdir().unwrap();
        let chart = chart(&record_incident(dir.path()));
        assert_eq!(chart.points.len(), 5);
        assert_eq!(
            chart.points[0].t_ms, 0,
            "starts at the first context sample"
        );
        assert_eq!(
            chart.drops,
            [DropMark {
                t_ms: 10_000,
                packets: 89
            }]
        );
        let kinds: Vec<MarkerKind> = chart.markers.iter().map(|m| m.kind).collect();
        assert_eq!(kinds, [MarkerKind::Stage, MarkerKind::Rollback]);
    }

    #[test]
    fn spans_read_naturally() {
        assert_eq!(span(Duration::from_millis(350)), "350ms");
        assert_eq!(span(secs(45)), "45s");
        assert_eq!(span(secs(72)), "1m 12s");
        assert_eq!(span(secs(120)), "2m");
        assert_eq!(span(secs(7380)), "2h 3m");
    }
}
