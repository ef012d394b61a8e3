/*!
The write-ahead journal: every change ctguard makes to the host is recorded here *before*
it is made, so it can always be undone to its exact original value — after recovery, on
command, and after a crash.

The journal is one small JSON document under the state directory, rewritten atomically on
every transition (temporary file, fsync, rename, fsync of the directory; mode 0600). An
entry goes `Intended → Applied | Failed`, and later `Applied → Reverted`. An entry left
`Intended` by a crash may or may not have reached the kernel; the executor's `reconcile`
decides from the live value.

That is also why `Intended → Applied` alone may wait ([`Journal::mark_applied_later`]): it
rides on the next durable write, or on [`Journal::sync`], which the daemon calls once it
has acted. A crash before then leaves `Intended`, settled at start like any interrupted
change; every other transition is durable before the call returns. Each durable write costs
two fsyncs, which on a busy disk took tens of milliseconds: one per change instead of two
keeps them from piling up in front of the next change.

A journal that cannot be read or parsed is never overwritten: [`Journal::open`] fails with
[`JournalError::Corrupt`], and the daemon then watches and reports without acting.

Only one process at a time may write a state directory's journal: the daemon and
`ctguard rollback` open it with [`Journal::open_exclusive`], which holds a lock on the
directory for as long as the journal lives. Each writes the whole journal from its own
copy in memory, so two at once would undo each other's records.
*/

use crate::act::notrack::{BackendKind, NotrackChange};
use crate::knob::Knob;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tracing::debug;

/// The journal's file name inside the state directory.
pub const FILE_NAME: &str = "journal.json";
/// The on-disk format version this build reads and writes.
const FORMAT_VERSION: u32 = 1;

/// Identifies one entry.
pub type EntryId = u64;

/// Where an entry is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryState {
    /// Recorded; the write may or may not have happened (a crash leaves it here).
    Intended,
    /// The new value was written and read back.
    Applied,
    /// The write failed or was refused; the host kept its original value.
    Failed,
    /// The original value was restored.
    Reverted,
    /// A later entry for the same knob took over (it carries this entry's original).
    Superseded,
    /// Someone else set the knob to another value; ctguard leaves it to them.
    Abandoned,
}

/// One change to one knob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub id: EntryId,
    pub knob: Knob,
    /// The live value read just before the change: what rollback restores.
    pub original: u64,
    /// The value ctguard set.
    pub new: u64,
    /// The policy stage that made the change (`raise_limits`, …).
    pub stage: String,
    /// The incident the change belongs to.
    pub incident: u64,
    /// The network namespace being protected (`None`: ctguard's own). Its timeouts were
    /// changed; global knobs are shared by all namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// When the entry was recorded, seconds since the Unix epoch.
    pub recorded_at: u64,
    pub state: EntryState,
    /// During a stepwise revert (timeouts come back in steps), or a change taking over an
    /// earlier entry: the value before the step or change being made, so a crash before
    /// its write is recognised as ctguard's own value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stepping_from: Option<u64>,
    /// Why it failed, or a note from reconciliation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl EntryState {
    pub fn name(self) -> &'static str {
        match self {
            EntryState::Intended => "intended",
            EntryState::Applied => "applied",
            EntryState::Failed => "failed",
            EntryState::Reverted => "reverted",
            EntryState::Superseded => "superseded",
            EntryState::Abandoned => "abandoned",
        }
    }
}

impl JournalEntry {
    /// Whether the change may still be in force on the host (and so needs a rollback).
    pub fn may_be_in_force(&self) -> bool {
        matches!(self.state, EntryState::Intended | EntryState::Applied)
    }
}

/// What a change's live value says about it, on start or before a rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LiveState {
    /// The live value is the one ctguard set.
    InForce,
    /// The live value is the original: the change never landed or was undone by someone.
    Original,
    /// The live value is neither: someone (or a firewall restart) changed it.
    Drifted { live: u64 },
}

impl LiveState {
    pub fn of(entry: &JournalEntry, live: u64) -> LiveState {
        if live == entry.new || entry.stepping_from == Some(live) {
            LiveState::InForce
        } else if live == entry.original {
            LiveState::Original
        } else {
            LiveState::Drifted { live }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path}: the journal is corrupt ({detail}); ctguard will not act until it is fixed: \
         inspect it, restore values by hand if needed, then move it aside"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "{path}: in use by another ctguard (`ctguard run` or `ctguard rollback`); stop it first"
    )]
    Locked { path: PathBuf },
    #[error("journal entry {0} does not exist")]
    NoSuchEntry(EntryId),
    #[error(
        "journal entry {id} is {state}, not intended: only an intended entry waits for its applied mark"
    )]
    NotIntended { id: EntryId, state: &'static str },
}

/// One NOTRACK exemption ctguard added (an nftables set element or an iptables rule).
/// Undone by removing `change.target()`; nftables also expires it by itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotrackEntry {
    pub id: EntryId,
    pub change: NotrackChange,
    /// The backend that made it, and so the one that undoes it.
    #[serde(default)]
    pub backend: BackendKind,
    pub stage: String,
    pub incident: u64,
    /// The network namespace whose ruleset holds it (`None`: ctguard's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    pub recorded_at: u64,
    pub state: EntryState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl NotrackEntry {
    pub fn may_be_in_force(&self) -> bool {
        matches!(self.state, EntryState::Intended | EntryState::Applied)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    next_id: EntryId,
    entries: Vec<JournalEntry>,
    #[serde(default)]
    notrack: Vec<NotrackEntry>,
}

/// The journal of one state directory.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    state: OnDisk,
    /// Whether `state` holds marks not on disk yet (see [`Journal::mark_applied_later`]).
    unsynced: bool,
    /// The state directory, locked by [`Journal::open_exclusive`].
    _lock: Option<File>,
}

/// A change about to be made, as the caller describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub knob: Knob,
    pub original: u64,
    pub new: u64,
    pub stage: String,
    pub incident: u64,
    pub netns: Option<PathBuf>,
    /// An entry for the same knob that this change takes over from (it is marked
    /// [`EntryState::Superseded`] in the same write; its value is this entry's
    /// `stepping_from` until the write lands).
    pub supersedes: Option<EntryId>,
}

impl Journal {
    /// Opens (creating if needed, mode 0700) the state directory and reads its journal.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        create_state_dir(dir)?;
        let path = dir.join(FILE_NAME);
        let on_disk = match fs::read(&path) {
            Ok(bytes) => parse(&path, &bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => OnDisk {
                version: FORMAT_VERSION,
                next_id: 1,
                entries: Vec::new(),
                notrack: Vec::new(),
            },
            Err(source) => return Err(JournalError::Io { path, source }),
        };
        Ok(Journal {
            dir: dir.to_path_buf(),
            state: on_disk,
            unsynced: false,
            _lock: None,
        })
    }

    /// Opens the journal to write it, as [`Journal::open`], holding the state directory's
    /// lock until the journal is dropped; fails with [`JournalError::Locked`] while another
    /// process holds it.
    pub fn open_exclusive(dir: &Path) -> Result<Journal, JournalError> {
        create_state_dir(dir)?;
        let io_error = |source| JournalError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let lock = File::open(dir).map_err(io_error)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(JournalError::Locked {
                    path: dir.to_path_buf(),
                });
            }
            Err(fs::TryLockError::Error(source)) => return Err(io_error(source)),
        }
        // Read under the lock: the other process may have written until it let go.
        let mut journal = Journal::open(dir)?;
        journal._lock = Some(lock);
        Ok(journal)
    }

    /// The journal file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    pub fn entries(&self) -> &[JournalEntry] {
        &self.state.entries
    }

    pub fn entry(&self, id: EntryId) -> Option<&JournalEntry> {
        self.state.entries.iter().find(|e| e.id == id)
    }

    /// Changes that may still be in force, newest first: the order to roll them back in.
    pub fn in_force_newest_first(&self) -> Vec<&JournalEntry> {
        self.state
            .entries
            .iter()
            .rev()
            .filter(|e| e.may_be_in_force())
            .collect()
    }

    /// Records a change before it is made, durably. Only once this returns may the caller
    /// write to the host.
    pub fn record(&mut self, intent: Intent, now_unix: u64) -> Result<EntryId, JournalError> {
        let id = self.state.next_id;
        let mut next = self.snapshot();
        next.next_id = id + 1;
        let mut stepping_from = None;
        if let Some(old) = intent.supersedes {
            let old = next
                .entries
                .iter_mut()
                .find(|e| e.id == old)
                .ok_or(JournalError::NoSuchEntry(old))?;
            old.state = EntryState::Superseded;
            stepping_from = Some(old.new);
        }
        next.entries.push(JournalEntry {
            id,
            knob: intent.knob,
            original: intent.original,
            new: intent.new,
            stage: intent.stage,
            incident: intent.incident,
            netns: intent.netns,
            recorded_at: now_unix,
            state: EntryState::Intended,
            stepping_from,
            note: None,
        });
        self.commit(next)?;
        Ok(id)
    }

    /// Moves an entry to `state`, durably, with an optional note.
    pub fn mark(
        &mut self,
        id: EntryId,
        state: EntryState,
        note: Option<String>,
    ) -> Result<(), JournalError> {
        self.update(id, |entry| {
            entry.state = state;
            if note.is_some() {
                entry.note = note;
            }
        })
    }

    /// Marks an `Intended` entry `Applied` in memory; the next durable write carries it
    /// (any other transition, or [`Journal::sync`]). Safe to lose in a crash: an entry left
    /// `Intended` is settled at start from the live value, as one interrupted after its
    /// write. Only this transition may wait; an entry in another state is an error.
    pub fn mark_applied_later(&mut self, id: EntryId) -> Result<(), JournalError> {
        let entry = self
            .state
            .entries
            .iter_mut()
            .find(|e| e.id == id)
            .ok_or(JournalError::NoSuchEntry(id))?;
        if entry.state != EntryState::Intended {
            return Err(JournalError::NotIntended {
                id,
                state: entry.state.name(),
            });
        }
        entry.state = EntryState::Applied;
        entry.stepping_from = None;
        self.unsynced = true;
        Ok(())
    }

    /// Writes marks that are only in memory, durably; nothing when there are none.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        if self.unsynced {
            self.commit(self.snapshot())?;
        }
        Ok(())
    }

    /// Whether every mark is on disk.
    pub fn is_synced(&self) -> bool {
        !self.unsynced
    }

    /// Records, before it is made, a step of a stepwise revert: the knob goes from the
    /// entry's current `new` to `to` (between `new` and the original).
    pub fn begin_step(&mut self, id: EntryId, to: u64) -> Result<(), JournalError> {
        self.update(id, |entry| {
            entry.stepping_from = Some(entry.new);
            entry.new = to;
        })
    }

    /// Settles a step: `landed` when the host now holds the step's value, else the value
    /// before the step is put back as the entry's `new`.
    pub fn end_step(&mut self, id: EntryId, landed: bool) -> Result<(), JournalError> {
        self.update(id, |entry| {
            if let Some(before) = entry.stepping_from.take()
                && !landed
            {
                entry.new = before;
            }
        })
    }

    fn update(
        &mut self,
        id: EntryId,
        change: impl FnOnce(&mut JournalEntry),
    ) -> Result<(), JournalError> {
        let mut next = self.snapshot();
        let entry = next
            .entries
            .iter_mut()
            .find(|e| e.id == id)
            .ok_or(JournalError::NoSuchEntry(id))?;
        change(entry);
        self.commit(next)
    }

    pub fn notrack_entries(&self) -> &[NotrackEntry] {
        &self.state.notrack
    }

    /// NOTRACK exemptions that may still be in force, newest first.
    pub fn notrack_in_force(&self) -> Vec<&NotrackEntry> {
        self.state
            .notrack
            .iter()
            .rev()
            .filter(|e| e.may_be_in_force())
            .collect()
    }

    /// Records a NOTRACK exemption before it is added. A renewal of a port already
    /// exempted in that namespace takes over its entry (marked superseded in the same write).
    pub fn record_notrack(
        &mut self,
        change: NotrackChange,
        backend: BackendKind,
        stage: &str,
        incident: u64,
        netns: Option<&Path>,
        now_unix: u64,
    ) -> Result<EntryId, JournalError> {
        let id = self.state.next_id;
        let mut next = self.snapshot();
        next.next_id = id + 1;
        for old in next.notrack.iter_mut().filter(|e| {
            e.may_be_in_force()
                && e.change.target() == change.target()
                && e.netns.as_deref() == netns
        }) {
            old.state = EntryState::Superseded;
        }
        next.notrack.push(NotrackEntry {
            id,
            change,
            backend,
            stage: stage.to_string(),
            incident,
            netns: netns.map(Path::to_path_buf),
            recorded_at: now_unix,
            state: EntryState::Intended,
            note: None,
        });
        self.commit(next)?;
        Ok(id)
    }

    /// Moves a NOTRACK entry to `state`, durably.
    pub fn mark_notrack(
        &mut self,
        id: EntryId,
        state: EntryState,
        note: Option<String>,
    ) -> Result<(), JournalError> {
        let mut next = self.snapshot();
        let entry = next
            .notrack
            .iter_mut()
            .find(|e| e.id == id)
            .ok_or(JournalError::NoSuchEntry(id))?;
        entry.state = state;
        if note.is_some() {
            entry.note = note;
        }
        self.commit(next)
    }

    /// The entry that may still hold `knob` changed in namespace `netns`, if any.
    pub fn in_force_for(&self, knob: Knob, netns: Option<&Path>) -> Option<&JournalEntry> {
        self.state
            .entries
            .iter()
            .rev()
            .find(|e| e.knob == knob && e.netns.as_deref() == netns && e.may_be_in_force())
    }

    fn snapshot(&self) -> OnDisk {
        self.state.clone()
    }

    /// Writes `next` to disk and only then adopts it in memory, so memory never runs ahead
    /// of what a crash would leave behind (but for [`Journal::mark_applied_later`], whose
    /// marks `next` carries).
    fn commit(&mut self, next: OnDisk) -> Result<(), JournalError> {
        let bytes = serde_json::to_vec_pretty(&next).expect("journal serialises");
        write_atomically(&self.dir, FILE_NAME, &bytes).map_err(|source| JournalError::Io {
            path: self.path(),
            source,
        })?;
        self.state = next;
        self.unsynced = false;
        Ok(())
    }
}

fn parse(path: &Path, bytes: &[u8]) -> Result<OnDisk, JournalError> {
    let corrupt = |detail: String| JournalError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    let on_disk: OnDisk = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if on_disk.version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {} (this ctguard reads {FORMAT_VERSION})",
            on_disk.version
        )));
    }
    // Recording a change takes next_id and stores next_id + 1.
    if on_disk.next_id == EntryId::MAX {
        return Err(corrupt(format!(
            "next_id {} leaves no id for the next change",
            on_disk.next_id
        )));
    }
    let ids = on_disk.entries.iter().map(|e| e.id);
    if let Some(max_id) = ids.chain(on_disk.notrack.iter().map(|e| e.id)).max()
        && max_id >= on_disk.next_id
    {
        return Err(corrupt(format!(
            "entry id {max_id} is not below next_id {}",
            on_disk.next_id
        )));
    }
    Ok(on_disk)
}

/// Replaces `dir/name` with `bytes` so that a crash leaves either the old or the new file,
/// never a mix: temporary file, fsync, rename over, fsync of the directory. Mode 0600.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let started = Instant::now();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    let written = started.elapsed();
    file.sync_all()?;
    let file_synced = started.elapsed();
    drop(file);
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()?;
    // Each fsync may wait on a shared disk: the split shows where a slow change went.
    debug!(
        file = %dir.join(name).display(),
        bytes = bytes.len(),
        write_us = written.as_micros() as u64,
        file_fsync_us = (file_synced - written).as_micros() as u64,
        rename_dir_fsync_us = (started.elapsed() - file_synced).as_micros() as u64,
        "atomic write"
    );
    Ok(())
}

/// Creates the state directory (and its parents) if it is missing, private to its owner.
fn create_state_dir(dir: &Path) -> Result<(), JournalError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| JournalError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Removes `dir/name` (if it is there) so that a crash cannot bring it back: unlink, then
/// fsync of the directory.
pub fn remove_durably(dir: &Path, name: &str) -> io::Result<()> {
    let started = Instant::now();
    match fs::remove_file(dir.join(name)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        removed => removed?,
    }
    File::open(dir)?.sync_all()?;
    debug!(
        file = %dir.join(name).display(),
        dir_fsync_us = started.elapsed().as_micros() as u64,
        "durable removal"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::knob::TimeoutKnob;
    use std::os::unix::fs::PermissionsExt;

    fn intent(knob: Knob, original: u64, new: u64) -> Intent {
        Intent {
            knob,
            original,
            new,
            stage: "raise_limits".into(),
            incident: 7,
            netns: None,
            supersedes: None,
        }
    }

    #[test]
    fn records_survive_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let a = j.record(intent(Knob::Max, 65536, 131072), 100).unwrap();
        let b = j
            .record(
                intent(Knob::Timeout(TimeoutKnob::Established), 432000, 3600),
                101,
            )
            .unwrap();
        j.mark(a, EntryState::Applied, None).unwrap();
        drop(j);

        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.entry(a).unwrap().state, EntryState::Applied);
        assert_eq!(j.entry(b).unwrap().state, EntryState::Intended);
        let order: Vec<_> = j.in_force_newest_first().iter().map(|e| e.id).collect();
        assert_eq!(order, vec![b, a]);
        let mode = fs::metadata(j.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn ids_keep_growing_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let a = j.record(intent(Knob::Max, 1, 2), 0).unwrap();
        drop(j);
        let mut j = Journal::open(dir.path()).unwrap();
        let b = j.record(intent(Knob::Max, 2, 3), 0).unwrap();
        assert!(b > a);
    }

    #[test]
    fn corrupt_journal_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        fs::write(&path, b"{\"version\":1,\"next_id\":").unwrap();
        let err = Journal::open(dir.path()).unwrap_err();
        assert!(matches!(err, JournalError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("journal.json"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"{\"version\":1,\"next_id\":");
    }

    #[test]
    fn inconsistent_ids_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.record(intent(Knob::Max, 1, 2), 0).unwrap();
        let text = fs::read_to_string(j.path()).unwrap();
        fs::write(j.path(), text.replace("\"next_id\": 2", "\"next_id\": 1")).unwrap();
        assert!(matches!(
            Journal::open(dir.path()),
            Err(JournalError::Corrupt { .. })
        ));
    }

    #[test]
    fn live_state_tells_in_force_original_and_drift() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let id = j.record(intent(Knob::Max, 100, 200), 0).unwrap();
        let e = j.entry(id).unwrap();
        assert_eq!(LiveState::of(e, 200), LiveState::InForce);
        assert_eq!(LiveState::of(e, 100), LiveState::Original);
        assert_eq!(LiveState::of(e, 150), LiveState::Drifted { live: 150 });
    }

    #[test]
    fn an_interrupted_step_is_still_ctguards_value() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let est = Knob::Timeout(TimeoutKnob::Established);
        let id = j.record(intent(est, 3600, 600), 0).unwrap();
        j.begin_step(id, 1200).unwrap();
        let e = Journal::open(dir.path())
            .unwrap()
            .entry(id)
            .cloned()
            .unwrap();
        assert_eq!(LiveState::of(&e, 600), LiveState::InForce);
        assert_eq!(LiveState::of(&e, 1200), LiveState::InForce);
        j.end_step(id, false).unwrap();
        assert_eq!(j.entry(id).unwrap().new, 600);
        j.begin_step(id, 1200).unwrap();
        j.end_step(id, true).unwrap();
        assert_eq!(j.entry(id).unwrap().new, 1200);
        assert_eq!(j.entry(id).unwrap().stepping_from, None);
        assert_eq!(j.in_force_for(est, None).unwrap().id, id);
    }

    #[test]
    fn notrack_entries_are_journaled_and_renewals_supersede() {
        use crate::act::notrack::Proto;
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let knob = j.record(intent(Knob::Max, 1, 2), 0).unwrap();
        let change =
            NotrackChange::new(Proto::Tcp, 443, std::time::Duration::from_secs(60)).unwrap();
        let first = j
            .record_notrack(
                change,
                BackendKind::Nftables,
                "notrack_hot_ports",
                1,
                None,
                0,
            )
            .unwrap();
        j.mark_notrack(first, EntryState::Applied, None).unwrap();
        let renewal = j
            .record_notrack(
                change,
                BackendKind::Nftables,
                "notrack_hot_ports",
                1,
                None,
                30,
            )
            .unwrap();
        assert!(knob < first && first < renewal);
        let j = Journal::open(dir.path()).unwrap();
        let in_force: Vec<_> = j.notrack_in_force().iter().map(|e| e.id).collect();
        assert_eq!(in_force, vec![renewal]);
        assert_eq!(j.notrack_entries()[0].state, EntryState::Superseded);
        assert_eq!(
            j.in_force_newest_first().len(),
            1,
            "knob entries unaffected"
        );
    }

    #[test]
    fn an_applied_mark_waits_for_the_next_write_or_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let a = j.record(intent(Knob::Max, 1, 2), 0).unwrap();
        j.mark_applied_later(a).unwrap();
        assert_eq!(j.entry(a).unwrap().state, EntryState::Applied);
        assert!(!j.is_synced());
        let on_disk = |id| Journal::open(dir.path()).unwrap().entry(id).unwrap().state;
        assert_eq!(
            on_disk(a),
            EntryState::Intended,
            "a crash here leaves intended"
        );
        // The next record carries it.
        let b = j
            .record(
                intent(Knob::Timeout(TimeoutKnob::Established), 432000, 3600),
                0,
            )
            .unwrap();
        assert!(j.is_synced());
        assert_eq!(on_disk(a), EntryState::Applied);
        j.mark_applied_later(b).unwrap();
        j.sync().unwrap();
        assert_eq!(on_disk(b), EntryState::Applied);
        assert!(j.is_synced());
        // Only an intended entry may be marked so.
        let err = j.mark_applied_later(b).unwrap_err();
        assert!(
            err.to_string().contains("is applied, not intended"),
            "{err}"
        );
    }

    #[test]
    fn only_one_process_at_a_time_writes_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut first = Journal::open_exclusive(&state).unwrap();
        first.record(intent(Knob::Max, 1, 2), 0).unwrap();
        let err = Journal::open_exclusive(&state).unwrap_err();
        assert!(matches!(err, JournalError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("state: in use"), "{err}");
        // Reading is always allowed (`ctguard journal`).
        assert_eq!(Journal::open(&state).unwrap().entries().len(), 1);
        drop(first);
        let second = Journal::open_exclusive(&state).unwrap();
        assert_eq!(second.entries().len(), 1);
    }

    #[test]
    fn a_failed_write_leaves_memory_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        // Point the journal at a directory that no longer exists: the write must fail
        // and the in-memory journal must not pretend the entry was recorded.
        j.dir = dir.path().join("gone");
        assert!(j.record(intent(Knob::Max, 1, 2), 0).is_err());
        assert!(j.entries().is_empty());
    }
}
