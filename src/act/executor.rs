/*!
The executor carries out changes on the host in the one safe order: re-read the live value,
journal the change (durably), write it, read it back, mark the journal. The "applied" mark
rides on the next journal write or [`Executor::sync_journal`] (a crash before then leaves
the entry "intended", which [`Executor::reconcile`] settles from the live value), so each
change costs one durable journal write, not two. It also undoes changes from the journal
(rollback) and reconciles the journal with the host after a restart.

It holds the last line of defence for the rules ctguard must never break, whatever the
engine decided: never lower `nf_conntrack_max` below the entries in use, never shrink the
hash table, never act on a value that changed since the decision, never act unjournaled.
*/

use super::notrack::{BackendKind, NotrackBackend, NotrackChange, NotrackError, PortKey};
use super::{ActError, Actuator};
use crate::journal::{EntryId, EntryState, Intent, Journal, JournalEntry, JournalError, LiveState};
use crate::knob::Knob;
use crate::observe::modules::KernelModules;
use std::path::PathBuf;
use std::time::Duration;
use tracing::debug;

/// A change the engine decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRequest {
    pub knob: Knob,
    /// The live value the decision was based on.
    pub expected: u64,
    pub to: u64,
    pub stage: String,
    pub incident: u64,
}

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The journal could not record the change, so it was not made.
    #[error("change not made because it could not be journaled: {0}")]
    Journal(#[from] JournalError),
    #[error("{knob} is {live} now, not {expected} as decided; not changed")]
    Stale {
        knob: Knob,
        expected: u64,
        live: u64,
    },
    #[error("{knob}: refusing {to}: {why}")]
    Unsafe { knob: Knob, to: u64, why: String },
    #[error(transparent)]
    Act(#[from] ActError),
    #[error(transparent)]
    Notrack(#[from] NotrackError),
}

impl ExecError {
    /// Whether the environment forbids the change (the engine tries another stage).
    pub fn is_not_permitted(&self) -> bool {
        match self {
            ExecError::Act(e) => e.is_not_permitted(),
            ExecError::Notrack(e) => e.is_unavailable(),
            _ => false,
        }
    }
}

/// What a revert found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reverted {
    /// The original value was written back.
    Restored { entry: EntryId, knob: Knob, to: u64 },
    /// Part of the way back (a step of a stepwise revert).
    Stepped { entry: EntryId, knob: Knob, to: u64 },
    /// The host already had the original value (the change never landed, or was undone).
    AlreadyOriginal { entry: EntryId, knob: Knob },
    /// Someone else changed the value since; it was left alone.
    LeftDrifted {
        entry: EntryId,
        knob: Knob,
        live: u64,
    },
    /// Restoring would lower max below the entries in use; kept for a later try.
    Deferred {
        entry: EntryId,
        knob: Knob,
        why: String,
    },
}

/// Makes and undoes journaled changes through an actuator.
pub struct Executor<A> {
    actuator: A,
    /// The kind of backend new NOTRACK exemptions are made with, or why there is none.
    notrack: Result<BackendKind, String>,
    /// The NOTRACK backends opened so far: the one above, and those of other kinds opened
    /// to undo exemptions they made (journaled before a restart, or by `rollback`).
    notrack_backends: Vec<Box<dyn NotrackBackend + Send>>,
    journal: Journal,
    /// The namespace being protected, recorded with every change: its timeouts are the
    /// ones changed, and its entry count is what a lower max must still hold.
    netns: Option<PathBuf>,
    now_unix: fn() -> u64,
    /// Test hook, see [`CrashPoint`].
    crash_at: Option<CrashPoint>,
}

/// Test hook for the fault tests (`tests/kernel/faults.rs`): `CTGUARD_FAULT=crash-after-journal`
/// or `crash-after-write` makes the process abort (as a SIGKILL would end it) right after
/// journaling a change, or right after writing it but before marking it applied. Read once
/// when an executor is made; any other value is ignored. Not for production use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    AfterJournal,
    AfterWrite,
}

impl CrashPoint {
    fn from_env() -> Option<CrashPoint> {
        match std::env::var("CTGUARD_FAULT").ok()?.as_str() {
            "crash-after-journal" => Some(CrashPoint::AfterJournal),
            "crash-after-write" => Some(CrashPoint::AfterWrite),
            _ => None,
        }
    }
}

fn system_now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl<A: Actuator> Executor<A> {
    pub fn new(actuator: A, journal: Journal, netns: Option<PathBuf>) -> Self {
        Executor {
            actuator,
            notrack: Err("no NOTRACK backend is configured".into()),
            notrack_backends: Vec::new(),
            journal,
            netns,
            now_unix: system_now_unix,
            crash_at: CrashPoint::from_env(),
        }
    }

    fn crash_if(&self, point: CrashPoint) {
        if self.crash_at == Some(point) {
            eprintln!("CTGUARD_FAULT: aborting at {point:?}");
            std::process::abort();
        }
    }

    /// Adds the backend NOTRACK exemptions are made with.
    pub fn with_notrack(mut self, backend: Box<dyn NotrackBackend + Send>) -> Self {
        self.notrack = Ok(backend.kind());
        self.notrack_backends.retain(|b| b.kind() != backend.kind());
        self.notrack_backends.push(backend);
        self
    }

    /// Makes no new NOTRACK exemptions, for this reason (said by each attempt); backends
    /// are still opened to undo journaled ones.
    pub fn without_notrack(mut self, why: String) -> Self {
        self.notrack = Err(why);
        self
    }

    /// The backend for exemptions of `kind`, opened on first use. A rehearsal stands in
    /// for every kind, so a dry run never reaches a real backend.
    fn backend_for(
        &mut self,
        kind: BackendKind,
    ) -> Result<&mut (dyn NotrackBackend + Send), ExecError> {
        let index = match self
            .notrack_backends
            .iter()
            .position(|b| b.kind() == kind || b.is_rehearsal())
        {
            Some(index) => index,
            None => {
                let modules =
                    KernelModules::read_host().map_err(|e| NotrackError::Unavailable {
                        backend: kind.name(),
                        why: e.to_string(),
                    })?;
                let backend = super::choose::open(kind, self.netns.clone(), &modules)?;
                self.notrack_backends.push(backend);
                self.notrack_backends.len() - 1
            }
        };
        Ok(self.notrack_backends[index].as_mut())
    }

    /// The kind new exemptions are made with.
    fn notrack_kind(&self) -> Result<BackendKind, ExecError> {
        self.notrack.clone().map_err(|why| {
            NotrackError::Unavailable {
                backend: "none",
                why,
            }
            .into()
        })
    }

    /// Exempts a port from tracking: the backend's table is ensured, the exemption is
    /// journaled (with the backend's kind), then added. A renewal of an exempted port
    /// restarts its expiry.
    pub fn notrack(
        &mut self,
        change: NotrackChange,
        stage: &str,
        incident: u64,
    ) -> Result<EntryId, ExecError> {
        let kind = self.notrack_kind()?;
        self.backend_for(kind)?.install()?;
        let id = self.journal.record_notrack(
            change,
            kind,
            stage,
            incident,
            self.netns.as_deref(),
            (self.now_unix)(),
        )?;
        match self.backend_for(kind)?.apply(&[change]) {
            Ok(()) => {
                self.journal.mark_notrack(id, EntryState::Applied, None)?;
                Ok(id)
            }
            Err(e) => {
                self.journal
                    .mark_notrack(id, EntryState::Failed, Some(e.to_string()))?;
                Err(e.into())
            }
        }
    }

    /// Removes a journaled exemption with the kind of backend that made it (gone already,
    /// e.g. expired, is fine) and marks it.
    pub fn untrack(&mut self, id: EntryId, note: Option<String>) -> Result<(), ExecError> {
        let entry = self
            .journal
            .notrack_entries()
            .iter()
            .find(|e| e.id == id)
            .ok_or(JournalError::NoSuchEntry(id))?;
        let (kind, target) = (entry.backend, entry.change.target());
        self.backend_for(kind)?.remove(&[target])?;
        Ok(self.journal.mark_notrack(id, EntryState::Reverted, note)?)
    }

    /// Removes this namespace's exemptions whose expiry has passed without a renewal, for
    /// backends the kernel does not expire by itself (iptables), as the kernel would have.
    /// Each result says what became of one.
    pub fn expire_notrack(&mut self) -> Vec<(EntryId, Result<(), ExecError>)> {
        let now = (self.now_unix)();
        let due: Vec<EntryId> = self
            .journal
            .notrack_in_force()
            .into_iter()
            .filter(|e| {
                e.netns == self.netns
                    && !e.backend.expires_by_itself()
                    && e.recorded_at + u64::from(e.change.timeout_secs) <= now
            })
            .map(|e| e.id)
            .collect();
        due.into_iter()
            .map(|id| {
                let note = "expired without a renewal".to_string();
                (id, self.untrack(id, Some(note)))
            })
            .collect()
    }

    /// This namespace's exemptions that may still be in force, with the time left before
    /// their expiry (after a restart: a previous run's, which still count).
    pub fn notrack_left(&self) -> Vec<(PortKey, Duration)> {
        let now = (self.now_unix)();
        self.journal
            .notrack_in_force()
            .into_iter()
            .filter(|e| e.netns == self.netns)
            .filter_map(|e| {
                let expires = e.recorded_at + u64::from(e.change.timeout_secs);
                let left = expires.checked_sub(now).filter(|&left| left > 0)?;
                Some((e.change.target(), Duration::from_secs(left)))
            })
            .collect()
    }

    /// Removes each NOTRACK backend's own table once no exemption it made in this
    /// namespace is in force any more; says whether a table was removed.
    pub fn uninstall_notrack_if_unused(&mut self) -> Result<bool, ExecError> {
        let netns = self.netns.clone();
        let ours: Vec<_> = self
            .journal
            .notrack_entries()
            .iter()
            .filter(|e| e.netns == netns)
            .collect();
        let mut kinds: Vec<BackendKind> = ours.iter().map(|e| e.backend).collect();
        kinds.sort_by_key(|k| k.name());
        kinds.dedup();
        kinds.retain(|&kind| {
            !ours
                .iter()
                .any(|e| e.backend == kind && e.may_be_in_force())
        });
        let mut removed = false;
        for &kind in &kinds {
            removed |= self.backend_for(kind)?.uninstall()?;
        }
        Ok(removed)
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Writes the journal's marks that are only in memory (see [`Executor::apply`]).
    pub fn sync_journal(&mut self) -> Result<(), ExecError> {
        Ok(self.journal.sync()?)
    }

    /// The namespace this executor protects.
    pub fn netns(&self) -> Option<&std::path::Path> {
        self.netns.as_deref()
    }

    /// Records a state reached outside `apply`/`revert` (e.g. settled at start).
    pub fn journal_mark(
        &mut self,
        id: EntryId,
        state: EntryState,
        note: &str,
    ) -> Result<(), ExecError> {
        Ok(self.journal.mark(id, state, Some(note.to_string()))?)
    }

    pub fn actuator(&mut self) -> &mut A {
        &mut self.actuator
    }

    /// Makes one change: re-read, check, journal, write, verify, mark (in memory until the
    /// next journal write or [`Executor::sync_journal`]). `in_use` is the table's current
    /// entry count (for the max floor).
    ///
    /// A knob ctguard already changed (and someone may have reset since) keeps its first
    /// original: the new entry takes over the old one, so rollback restores the value from
    /// before ctguard ever touched it.
    pub fn apply(&mut self, req: &ChangeRequest, in_use: u64) -> Result<EntryId, ExecError> {
        let knob = req.knob;
        let to = knob.kernel_value(req.to);
        let live = self.actuator.read(knob)?;
        if live != req.expected && live != knob.kernel_value(req.expected) {
            return Err(ExecError::Stale {
                knob,
                expected: req.expected,
                live,
            });
        }
        check_safe(knob, live, to, in_use)?;
        let earlier = self.journal.in_force_for(knob, self.netns.as_deref());
        let (original, supersedes) = match earlier {
            Some(e) => (e.original, Some(e.id)),
            None => (live, None),
        };
        let id = self.journal.record(
            Intent {
                knob,
                original,
                new: to,
                stage: req.stage.clone(),
                incident: req.incident,
                netns: self.netns.clone(),
                supersedes,
            },
            (self.now_unix)(),
        )?;
        debug!(entry = id, %knob, to, "journaled as intended; writing");
        self.crash_if(CrashPoint::AfterJournal);
        let req = &ChangeRequest { to, ..req.clone() };
        match self.actuator.write(req.knob, req.to) {
            Ok(()) => {
                debug!(entry = id, %knob, to, "written and read back");
                self.crash_if(CrashPoint::AfterWrite);
                self.journal.mark_applied_later(id)?;
                Ok(id)
            }
            Err(e) => {
                // A failed write may still have changed the value (a verify mismatch):
                // record what the host holds so rollback knows.
                let note = match self.actuator.read(req.knob) {
                    Ok(now) if now != live => format!("{e}; host now holds {now}"),
                    _ => e.to_string(),
                };
                let state = match self.actuator.read(req.knob) {
                    // A change taking over an earlier one: the host keeps ctguard's earlier
                    // value, which this entry now carries back to the original.
                    Ok(now) if now == live && supersedes.is_some() => {
                        self.journal.end_step(id, false)?;
                        EntryState::Applied
                    }
                    Ok(now) if now == live => EntryState::Failed,
                    _ => EntryState::Applied,
                };
                self.journal.mark(id, state, Some(note))?;
                Err(e.into())
            }
        }
    }

    /// Moves a journaled change part of the way back (timeouts return in steps): from the
    /// entry's value to `to`, journaled first like every change. A step to the original
    /// is a full [`Executor::revert`].
    pub fn step_back(&mut self, id: EntryId, to: u64, in_use: u64) -> Result<Reverted, ExecError> {
        let entry = self
            .journal
            .entry(id)
            .cloned()
            .ok_or(JournalError::NoSuchEntry(id))?;
        if to == entry.original {
            return self.revert(id, in_use);
        }
        let live = self.actuator.read(entry.knob)?;
        if let LiveState::Drifted { live } = LiveState::of(&entry, live) {
            return Ok(Reverted::LeftDrifted {
                entry: id,
                knob: entry.knob,
                live,
            });
        }
        self.journal.begin_step(id, to)?;
        let written = self.actuator.write(entry.knob, to);
        let landed = match &written {
            Ok(()) => true,
            Err(_) => self.actuator.read(entry.knob).is_ok_and(|v| v == to),
        };
        self.journal.end_step(id, landed)?;
        written?;
        Ok(Reverted::Stepped {
            entry: id,
            knob: entry.knob,
            to,
        })
    }

    /// Marks a change that someone else overrode as theirs: ctguard will not touch the
    /// knob again for it.
    pub fn abandon(&mut self, id: EntryId, live: u64) -> Result<(), ExecError> {
        let note = format!("set to {live} by someone else; left as they set it");
        Ok(self.journal.mark(id, EntryState::Abandoned, Some(note))?)
    }

    /// Undoes one journaled change if it is still in force; leaves drifted values alone.
    pub fn revert(&mut self, id: EntryId, in_use: u64) -> Result<Reverted, ExecError> {
        let entry = self
            .journal
            .entry(id)
            .cloned()
            .ok_or(JournalError::NoSuchEntry(id))?;
        let live = self.actuator.read(entry.knob)?;
        match LiveState::of(&entry, live) {
            LiveState::Original => {
                self.journal.mark(
                    id,
                    EntryState::Reverted,
                    Some("host already held the original value".into()),
                )?;
                Ok(Reverted::AlreadyOriginal {
                    entry: id,
                    knob: entry.knob,
                })
            }
            LiveState::Drifted { live } => Ok(Reverted::LeftDrifted {
                entry: id,
                knob: entry.knob,
                live,
            }),
            LiveState::InForce => {
                if entry.knob == Knob::Max && entry.original < in_use {
                    return Ok(Reverted::Deferred {
                        entry: id,
                        knob: entry.knob,
                        why: format!(
                            "restoring max {} would be below the {in_use} entries in use",
                            entry.original
                        ),
                    });
                }
                self.actuator.write(entry.knob, entry.original)?;
                self.journal.mark(id, EntryState::Reverted, None)?;
                Ok(Reverted::Restored {
                    entry: id,
                    knob: entry.knob,
                    to: entry.original,
                })
            }
        }
    }

    /// Compares every change of this executor's namespace that may be in force with the
    /// host, after a restart: changes still in force are kept (adopted), interrupted ones
    /// settled from the live value. Other namespaces' changes cannot be read from here: they
    /// are left to the daemon of that namespace or `ctguard rollback`.
    pub fn reconcile(&mut self) -> Result<Vec<(JournalEntry, LiveState)>, ExecError> {
        let pending: Vec<JournalEntry> = self
            .journal
            .in_force_newest_first()
            .into_iter()
            .filter(|e| e.netns == self.netns)
            .cloned()
            .collect();
        let mut report = Vec::with_capacity(pending.len());
        for mut entry in pending {
            let live = self.actuator.read(entry.knob)?;
            let state = LiveState::of(&entry, live);
            match (entry.state, state) {
                // A crash between journal and write: the write never happened.
                (EntryState::Intended, LiveState::Original) => self.journal.mark(
                    entry.id,
                    EntryState::Failed,
                    Some("interrupted before the write; host kept the original".into()),
                )?,
                // The same, for a change taking over an earlier one: the host kept
                // ctguard's earlier value, which this entry carries back to the original.
                (EntryState::Intended, LiveState::InForce) if live != entry.new => {
                    self.journal.end_step(entry.id, false)?;
                    self.journal.mark(
                        entry.id,
                        EntryState::Applied,
                        Some(
                            "interrupted before the write; host kept ctguard's earlier value"
                                .into(),
                        ),
                    )?;
                    (entry.new, entry.stepping_from) = (live, None);
                }
                (EntryState::Intended, LiveState::InForce) => {
                    if entry.stepping_from.is_some() {
                        self.journal.end_step(entry.id, true)?;
                    }
                    self.journal.mark(
                        entry.id,
                        EntryState::Applied,
                        Some("interrupted after the write; adopted".into()),
                    )?
                }
                _ => {}
            }
            report.push((entry, state));
        }
        Ok(report)
    }

    /// Gives the journal back (to hand it to the executor of another namespace).
    pub fn into_journal(self) -> Journal {
        self.journal
    }
}

/// The rules no decision may break.
fn check_safe(knob: Knob, live: u64, to: u64, in_use: u64) -> Result<(), ExecError> {
    let unsafe_because = |why: String| Err(ExecError::Unsafe { knob, to, why });
    match knob {
        Knob::Max if to < in_use => unsafe_because(format!("below the {in_use} entries in use")),
        Knob::Max if to < live => unsafe_because(format!("lower than the live max {live}")),
        Knob::Buckets if to < live => {
            unsafe_because(format!("would shrink the hash table from {live}"))
        }
        _ if to == 0 => unsafe_because("zero disables the knob".into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::recording::RecordingActuator;
    use crate::act::sysctl::{Roots, SysctlActuator};
    use crate::knob::TimeoutKnob;
    use std::path::Path;

    const EST: Knob = Knob::Timeout(TimeoutKnob::Established);

    struct Fixture {
        dir: tempfile::TempDir,
        state: PathBuf,
        nf: PathBuf,
    }

    fn fixture() -> (Fixture, Executor<SysctlActuator>) {
        let dir = tempfile::tempdir().unwrap();
        let nf = dir.path().join("proc/net/netfilter");
        std::fs::create_dir_all(&nf).unwrap();
        std::fs::write(nf.join("nf_conntrack_max"), "1000\n").unwrap();
        std::fs::write(nf.join("nf_conntrack_buckets"), "1024\n").unwrap();
        std::fs::write(nf.join(EST.sysctl_file()), "432000\n").unwrap();
        let state = dir.path().join("state");
        let exec = Executor::new(sysctls(dir.path()), Journal::open(&state).unwrap(), None);
        (Fixture { dir, state, nf }, exec)
    }

    /// An actuator on the fake `proc/sys` under `root`.
    fn sysctls(root: &Path) -> SysctlActuator {
        SysctlActuator::new(
            Roots {
                proc_sys: root.join("proc"),
                module_params: root.join("none"),
            },
            None,
        )
    }

    fn req(knob: Knob, expected: u64, to: u64) -> ChangeRequest {
        ChangeRequest {
            knob,
            expected,
            to,
            stage: "raise_limits".into(),
            incident: 1,
        }
    }

    fn live(f: &Fixture, knob: Knob) -> u64 {
        std::fs::read_to_string(f.nf.join(knob.sysctl_file()))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn apply_then_revert_restores_exactly() {
        let (f, mut exec) = fixture();
        let a = exec.apply(&req(Knob::Max, 1000, 4000), 990).unwrap();
        let b = exec.apply(&req(EST, 432000, 3600), 990).unwrap();
        assert_eq!(live(&f, Knob::Max), 4000);
        assert_eq!(exec.journal().entry(a).unwrap().state, EntryState::Applied);
        assert!(matches!(
            exec.revert(b, 990).unwrap(),
            Reverted::Restored { .. }
        ));
        assert!(matches!(
            exec.revert(a, 990).unwrap(),
            Reverted::Restored { .. }
        ));
        assert_eq!(live(&f, Knob::Max), 1000);
        assert_eq!(live(&f, EST), 432000);
        assert!(exec.journal().in_force_newest_first().is_empty());
    }

    #[test]
    fn an_applied_change_is_intended_on_disk_until_the_journal_syncs() {
        let (f, mut exec) = fixture();
        let id = exec.apply(&req(Knob::Max, 1000, 4000), 0).unwrap();
        assert_eq!(live(&f, Knob::Max), 4000);
        assert_eq!(exec.journal().entry(id).unwrap().state, EntryState::Applied);
        let on_disk = || Journal::open(&f.state).unwrap().entry(id).unwrap().state;
        assert_eq!(on_disk(), EntryState::Intended);
        // A crash now: a restart settles it from the live value, as one interrupted after
        // its write.
        let mut restarted = Executor::new(
            sysctls(f.dir.path()),
            Journal::open(&f.state).unwrap(),
            None,
        );
        restarted.reconcile().unwrap();
        assert_eq!(on_disk(), EntryState::Applied);
        exec.sync_journal().unwrap();
        assert!(exec.journal().is_synced());
        assert_eq!(on_disk(), EntryState::Applied);
    }

    #[test]
    fn refuses_unsafe_and_stale_changes_without_journaling() {
        let (_f, mut exec) = fixture();
        let below_use = exec.apply(&req(Knob::Max, 1000, 1500), 2000).unwrap_err();
        assert!(matches!(below_use, ExecError::Unsafe { .. }), "{below_use}");
        let shrink = exec.apply(&req(Knob::Buckets, 1024, 512), 0).unwrap_err();
        assert!(matches!(shrink, ExecError::Unsafe { .. }), "{shrink}");
        let stale = exec.apply(&req(Knob::Max, 999, 5000), 0).unwrap_err();
        assert!(
            matches!(stale, ExecError::Stale { live: 1000, .. }),
            "{stale}"
        );
        assert!(exec.journal().entries().is_empty());
    }

    #[test]
    fn revert_leaves_drift_alone_and_defers_below_use() {
        let (f, mut exec) = fixture();
        let a = exec.apply(&req(Knob::Max, 1000, 4000), 500).unwrap();
        assert!(matches!(
            exec.revert(a, 3000).unwrap(),
            Reverted::Deferred { .. }
        ));
        std::fs::write(f.nf.join("nf_conntrack_max"), "2500\n").unwrap();
        assert_eq!(
            exec.revert(a, 0).unwrap(),
            Reverted::LeftDrifted {
                entry: a,
                knob: Knob::Max,
                live: 2500
            }
        );
        assert_eq!(live(&f, Knob::Max), 2500);
        assert!(exec.journal().entry(a).unwrap().may_be_in_force());
    }

    #[test]
    fn journal_failure_means_no_write() {
        let (f, mut exec) = fixture();
        std::fs::remove_dir_all(&f.state).unwrap();
        std::fs::write(&f.state, b"not a directory").unwrap();
        let err = exec.apply(&req(Knob::Max, 1000, 4000), 0).unwrap_err();
        assert!(matches!(err, ExecError::Journal(_)), "{err}");
        assert_eq!(live(&f, Knob::Max), 1000);
    }

    #[test]
    fn reconcile_settles_interrupted_entries() {
        let (f, mut exec) = fixture();
        // Simulate crashes: one intent whose write never happened, one that did.
        let mut journal = Journal::open(&f.state).unwrap();
        let never = journal
            .record(
                Intent {
                    knob: EST,
                    original: 432000,
                    new: 600,
                    stage: "shorten_timeouts".into(),
                    incident: 1,
                    netns: None,
                    supersedes: None,
                },
                0,
            )
            .unwrap();
        let landed = journal
            .record(
                Intent {
                    knob: Knob::Max,
                    original: 1000,
                    new: 3000,
                    stage: "raise_limits".into(),
                    incident: 1,
                    netns: None,
                    supersedes: None,
                },
                0,
            )
            .unwrap();
        std::fs::write(f.nf.join("nf_conntrack_max"), "3000\n").unwrap();
        exec.journal = journal;
        let report = exec.reconcile().unwrap();
        assert_eq!(report.len(), 2);
        assert_eq!(
            exec.journal().entry(never).unwrap().state,
            EntryState::Failed
        );
        assert_eq!(
            exec.journal().entry(landed).unwrap().state,
            EntryState::Applied
        );
    }

    #[test]
    fn reconcile_leaves_other_namespaces_entries_alone() {
        let (f, mut exec) = fixture();
        // Another run (`--netns`) was interrupted after its write: this executor reads its
        // own namespace, where the timeout is still the original.
        let mut journal = Journal::open(&f.state).unwrap();
        let other = journal
            .record(
                Intent {
                    knob: EST,
                    original: 432000,
                    new: 600,
                    stage: "shorten_timeouts".into(),
                    incident: 1,
                    netns: Some(PathBuf::from("/run/netns/other")),
                    supersedes: None,
                },
                0,
            )
            .unwrap();
        exec.journal = journal;
        let report = exec.reconcile().unwrap();
        assert!(report.is_empty(), "{report:?}");
        assert_eq!(
            exec.journal().entry(other).unwrap().state,
            EntryState::Intended
        );
    }

    #[test]
    fn a_reapply_after_drift_keeps_the_first_original() {
        let (f, mut exec) = fixture();
        let first = exec.apply(&req(Knob::Max, 1000, 4000), 0).unwrap();
        // Someone resets max by hand; the engine raises again from the live value.
        std::fs::write(f.nf.join("nf_conntrack_max"), "1000\n").unwrap();
        let second = exec.apply(&req(Knob::Max, 1000, 6000), 0).unwrap();
        assert_eq!(
            exec.journal().entry(first).unwrap().state,
            EntryState::Superseded
        );
        assert_eq!(exec.journal().entry(second).unwrap().original, 1000);
        exec.revert(second, 0).unwrap();
        assert_eq!(live(&f, Knob::Max), 1000);
    }

    /// Fails every write while `fail` is set (the host keeps its value).
    struct FailingWrites {
        inner: SysctlActuator,
        fail: bool,
    }

    impl Actuator for FailingWrites {
        fn read(&mut self, knob: Knob) -> Result<u64, ActError> {
            self.inner.read(knob)
        }

        fn write(&mut self, knob: Knob, value: u64) -> Result<(), ActError> {
            if self.fail {
                return Err(ActError::Failed {
                    knob,
                    path: PathBuf::from(knob.sysctl_file()),
                    value,
                    source: std::io::Error::from_raw_os_error(libc::ENOMEM),
                });
            }
            self.inner.write(knob, value)
        }
    }

    #[test]
    fn a_failed_takeover_leaves_the_earlier_change_to_roll_back() {
        let (f, exec) = fixture();
        let Executor { journal, .. } = exec;
        let actuator = FailingWrites {
            inner: sysctls(f.dir.path()),
            fail: false,
        };
        let mut exec = Executor::new(actuator, journal, None);
        exec.apply(&req(Knob::Max, 1000, 4000), 0).unwrap();
        exec.actuator().fail = true;
        let err = exec.apply(&req(Knob::Max, 4000, 6000), 0).unwrap_err();
        assert!(matches!(err, ExecError::Act(_)), "{err}");
        assert_eq!(live(&f, Knob::Max), 4000);
        // ctguard's 4000 is still in force, and rolls back to the value before ctguard.
        let entry = exec
            .journal()
            .in_force_for(Knob::Max, None)
            .cloned()
            .unwrap();
        assert_eq!((entry.original, entry.new), (1000, 4000));
        exec.actuator().fail = false;
        assert!(matches!(
            exec.revert(entry.id, 0).unwrap(),
            Reverted::Restored { to: 1000, .. }
        ));
        assert_eq!(live(&f, Knob::Max), 1000);
    }

    #[test]
    fn a_takeover_interrupted_before_its_write_is_still_ctguards_value() {
        let (f, mut exec) = fixture();
        let first = exec.apply(&req(Knob::Max, 1000, 4000), 0).unwrap();
        exec.sync_journal().unwrap();
        // A crash between journaling the next raise and writing it: the host keeps 4000.
        let mut journal = Journal::open(&f.state).unwrap();
        let second = journal
            .record(
                Intent {
                    knob: Knob::Max,
                    original: 1000,
                    new: 6000,
                    stage: "raise_limits".into(),
                    incident: 1,
                    netns: None,
                    supersedes: Some(first),
                },
                0,
            )
            .unwrap();
        drop(journal);

        // `ctguard rollback` straight after the crash restores the original.
        let mut rollback = Executor::new(
            sysctls(f.dir.path()),
            Journal::open(&f.state).unwrap(),
            None,
        );
        let snapshot = std::fs::read(f.state.join(crate::journal::FILE_NAME)).unwrap();
        assert_eq!(
            rollback.revert(second, 0).unwrap(),
            Reverted::Restored {
                entry: second,
                knob: Knob::Max,
                to: 1000
            }
        );
        assert_eq!(live(&f, Knob::Max), 1000);

        // A restart instead adopts ctguard's 4000, carried by the new entry.
        std::fs::write(f.nf.join("nf_conntrack_max"), "4000\n").unwrap();
        std::fs::write(f.state.join(crate::journal::FILE_NAME), snapshot).unwrap();
        let mut restarted = Executor::new(
            sysctls(f.dir.path()),
            Journal::open(&f.state).unwrap(),
            None,
        );
        let report = restarted.reconcile().unwrap();
        assert_eq!(report.len(), 1);
        assert_eq!(report[0].1, LiveState::InForce);
        assert_eq!((report[0].0.original, report[0].0.new), (1000, 4000));
        let on_disk = Journal::open(&f.state)
            .unwrap()
            .entry(second)
            .cloned()
            .unwrap();
        assert_eq!(on_disk.state, EntryState::Applied);
        assert_eq!((on_disk.new, on_disk.stepping_from), (4000, None));
        restarted.revert(second, 0).unwrap();
        assert_eq!(live(&f, Knob::Max), 1000);
    }

    #[test]
    fn stepwise_revert_ends_at_the_original() {
        let (f, mut exec) = fixture();
        let id = exec.apply(&req(EST, 432000, 600), 0).unwrap();
        assert!(matches!(
            exec.step_back(id, 1200, 0).unwrap(),
            Reverted::Stepped { to: 1200, .. }
        ));
        assert_eq!(live(&f, EST), 1200);
        assert!(matches!(
            exec.step_back(id, 432000, 0).unwrap(),
            Reverted::Restored { .. }
        ));
        assert_eq!(live(&f, EST), 432000);
    }

    #[test]
    fn notrack_is_journaled_then_made_and_undone() {
        use crate::act::notrack::Proto;
        use crate::act::recording::RecordingNotrack;
        let (_f, exec) = fixture();
        let mut exec = exec.with_notrack(Box::new(RecordingNotrack::default()));
        let change =
            NotrackChange::new(Proto::Udp, 5353, std::time::Duration::from_secs(30)).unwrap();
        let id = exec.notrack(change, "notrack_hot_ports", 1).unwrap();
        assert_eq!(exec.journal().notrack_in_force()[0].id, id);
        exec.untrack(id, None).unwrap();
        assert!(exec.journal().notrack_in_force().is_empty());
    }

    #[test]
    fn iptables_exemptions_are_removed_when_their_expiry_passes() {
        use crate::act::notrack::Proto;
        use crate::act::recording::RecordingNotrack;
        let (_f, exec) = fixture();
        let mut exec = exec.with_notrack(Box::new(RecordingNotrack::rehearsing(
            BackendKind::Iptables,
        )));
        exec.now_unix = || 1_000;
        let change =
            NotrackChange::new(Proto::Udp, 5353, std::time::Duration::from_secs(30)).unwrap();
        let id = exec.notrack(change, "notrack_hot_ports", 1).unwrap();
        assert_eq!(
            exec.journal().notrack_in_force()[0].backend,
            BackendKind::Iptables
        );
        exec.now_unix = || 1_029;
        assert!(exec.expire_notrack().is_empty(), "not due yet");
        exec.now_unix = || 1_030;
        let expired = exec.expire_notrack();
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].0, id);
        assert!(expired[0].1.is_ok());
        let entry = &exec.journal().notrack_entries()[0];
        assert_eq!(entry.state, EntryState::Reverted);
        assert_eq!(entry.note.as_deref(), Some("expired without a renewal"));
    }

    #[test]
    fn nftables_exemptions_are_left_to_the_kernel_to_expire() {
        use crate::act::notrack::Proto;
        use crate::act::recording::RecordingNotrack;
        let (_f, exec) = fixture();
        let mut exec = exec.with_notrack(Box::new(RecordingNotrack::default()));
        exec.now_unix = || 1_000;
        let change =
            NotrackChange::new(Proto::Udp, 5353, std::time::Duration::from_secs(30)).unwrap();
        exec.notrack(change, "notrack_hot_ports", 1).unwrap();
        exec.now_unix = || 9_999;
        assert!(exec.expire_notrack().is_empty());
        assert_eq!(exec.journal().notrack_in_force().len(), 1);
    }

    #[test]
    fn notrack_without_a_backend_is_not_permitted() {
        use crate::act::notrack::Proto;
        let (_f, mut exec) = fixture();
        let change =
            NotrackChange::new(Proto::Tcp, 80, std::time::Duration::from_secs(30)).unwrap();
        let err = exec.notrack(change, "notrack_hot_ports", 1).unwrap_err();
        assert!(err.is_not_permitted(), "{err}");
        assert!(exec.journal().notrack_entries().is_empty());
    }

    #[test]
    fn dry_run_journals_nothing_on_the_host() {
        let (f, exec) = fixture();
        let Executor {
            actuator, journal, ..
        } = exec;
        let mut dry = Executor::new(RecordingActuator::new(actuator), journal, None);
        dry.apply(&req(Knob::Max, 1000, 4000), 0).unwrap();
        assert_eq!(live(&f, Knob::Max), 1000);
        assert_eq!(dry.actuator().writes().len(), 1);
    }
}
