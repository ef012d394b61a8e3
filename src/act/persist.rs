//! Opt-in persistence (`persist = true`): the values ctguard has in force are also written
//! where the boot process reads them, as admins do by hand (seed 001): sysctls to
//! `/etc/sysctl.d/90-ctguard.conf`, the hash size to `/etc/modprobe.d/ctguard.conf`.
//!
//! The files are derived from the journal — exactly the changes still in force, each at
//! the value ctguard set — and rewritten atomically after every change, so a rollback
//! removes its lines and a full rollback removes the files (durably: a power loss must not
//! bring one back). They are also synced once the daemon's start has settled the previous
//! run's changes, so after a crash they agree with the journal again before any reboot.
//! Only ctguard's own namespace is persisted (plus the global knobs): another namespace's
//! timeouts must not be applied to the host at boot.

use crate::journal::{Journal, remove_durably, write_atomically};
use crate::knob::Knob;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

const SYSCTL_DIR: &str = "etc/sysctl.d";
const SYSCTL_FILE: &str = "90-ctguard.conf";
const MODPROBE_DIR: &str = "etc/modprobe.d";
const MODPROBE_FILE: &str = "ctguard.conf";

const HEADER: &str = "# Written by ctguard (persist = true) from its journal; removed on rollback.\n\
                      # Do not edit: ctguard rewrites this file.\n";

/// The persisted files under a root (`/` on a host; a tempdir in tests).
#[derive(Debug, Clone)]
pub struct Persistence {
    root: PathBuf,
}

impl Persistence {
    pub fn new(root: impl Into<PathBuf>) -> Persistence {
        Persistence { root: root.into() }
    }

    pub fn sysctl_path(&self) -> PathBuf {
        self.root.join(SYSCTL_DIR).join(SYSCTL_FILE)
    }

    pub fn modprobe_path(&self) -> PathBuf {
        self.root.join(MODPROBE_DIR).join(MODPROBE_FILE)
    }

    /// Whether ctguard has files here (then they must follow the journal even when the
    /// policy no longer persists).
    pub fn has_files(&self) -> bool {
        self.sysctl_path().exists() || self.modprobe_path().exists()
    }

    /// Makes the files hold the journal's changes in force (`enabled`), or removes them.
    pub fn sync(&self, journal: &Journal, enabled: bool) -> io::Result<()> {
        let values = if enabled {
            in_force_values(journal)
        } else {
            BTreeMap::new()
        };
        let (sysctl, modprobe) = render(&values);
        self.put(SYSCTL_DIR, SYSCTL_FILE, sysctl)?;
        self.put(MODPROBE_DIR, MODPROBE_FILE, modprobe)
    }

    fn put(&self, dir: &str, name: &str, text: Option<String>) -> io::Result<()> {
        let dir = self.root.join(dir);
        let annotate = |e: io::Error, path: &Path| {
            io::Error::new(e.kind(), format!("{}: {e}", path.display()))
        };
        match text {
            Some(text) => {
                std::fs::create_dir_all(&dir).map_err(|e| annotate(e, &dir))?;
                write_atomically(&dir, name, text.as_bytes()).map_err(|e| annotate(e, &dir))
            }
            None => remove_durably(&dir, name).map_err(|e| annotate(e, &dir)),
        }
    }
}

/// The value ctguard set for each knob still in force that may be persisted.
fn in_force_values(journal: &Journal) -> BTreeMap<Knob, u64> {
    let mut values = BTreeMap::new();
    // Oldest first, so the newest entry for a knob wins.
    for e in journal.in_force_newest_first().into_iter().rev() {
        if e.knob.is_global() || e.netns.is_none() {
            values.insert(e.knob, e.new);
        }
    }
    values
}

/// The two files' contents; `None` for a file with nothing to say.
pub fn render(values: &BTreeMap<Knob, u64>) -> (Option<String>, Option<String>) {
    let sysctl: String = values
        .iter()
        .filter(|(k, _)| **k != Knob::Buckets)
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect();
    let modprobe = values
        .get(&Knob::Buckets)
        .map(|b| format!("{HEADER}options nf_conntrack hashsize={b}\n"));
    let sysctl = (!sysctl.is_empty()).then(|| format!("{HEADER}{sysctl}"));
    (sysctl, modprobe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{EntryState, Intent};
    use crate::knob::TimeoutKnob;

    fn intent(knob: Knob, new: u64, netns: Option<&str>) -> Intent {
        Intent {
            knob,
            original: 1,
            new,
            stage: "raise_limits".into(),
            incident: 1,
            netns: netns.map(PathBuf::from),
            supersedes: None,
        }
    }

    #[test]
    fn files_follow_the_journal_and_go_away_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(&dir.path().join("state")).unwrap();
        let est = Knob::Timeout(TimeoutKnob::Established);
        let max = journal.record(intent(Knob::Max, 393216, None), 0).unwrap();
        journal.mark(max, EntryState::Applied, None).unwrap();
        let buckets = journal
            .record(intent(Knob::Buckets, 98304, None), 0)
            .unwrap();
        journal.mark(buckets, EntryState::Applied, None).unwrap();
        let own = journal.record(intent(est, 3600, None), 0).unwrap();
        journal.mark(own, EntryState::Applied, None).unwrap();
        // Another namespace's timeout must not reach the host's boot configuration.
        let other = journal
            .record(
                intent(Knob::Timeout(TimeoutKnob::Udp), 10, Some("/run/netns/x")),
                0,
            )
            .unwrap();
        journal.mark(other, EntryState::Applied, None).unwrap();

        let persist = Persistence::new(dir.path());
        persist.sync(&journal, true).unwrap();
        let sysctl = std::fs::read_to_string(persist.sysctl_path()).unwrap();
        assert!(
            sysctl.contains("net.netfilter.nf_conntrack_max = 393216\n"),
            "{sysctl}"
        );
        assert!(sysctl.contains("net.netfilter.nf_conntrack_tcp_timeout_established = 3600\n"));
        assert!(!sysctl.contains("udp"), "{sysctl}");
        let modprobe = std::fs::read_to_string(persist.modprobe_path()).unwrap();
        assert!(
            modprobe.ends_with("options nf_conntrack hashsize=98304\n"),
            "{modprobe}"
        );

        for id in [max, buckets, own, other] {
            journal.mark(id, EntryState::Reverted, None).unwrap();
        }
        persist.sync(&journal, true).unwrap();
        assert!(!persist.has_files());
    }

    /// Collects what a subscriber writes, to see the debug events of file operations.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_removed_file_is_made_durable_with_a_directory_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(&dir.path().join("state")).unwrap();
        let id = journal.record(intent(Knob::Max, 5000, None), 0).unwrap();
        journal.mark(id, EntryState::Applied, None).unwrap();
        let persist = Persistence::new(dir.path());
        persist.sync(&journal, true).unwrap();
        journal.mark(id, EntryState::Reverted, None).unwrap();

        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || persist.sync(&journal, true)).unwrap();
        assert!(!persist.has_files());
        // Without the directory's fsync a power loss can bring the file back, and with it
        // ctguard's old value at boot.
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let removal = log
            .lines()
            .find(|l| l.contains("durable removal"))
            .unwrap_or_else(|| panic!("no durable removal: {log}"));
        assert!(
            removal.contains(&persist.sysctl_path().display().to_string()),
            "{removal}"
        );
        assert!(removal.contains("dir_fsync_us"), "{removal}");
    }

    #[test]
    fn turning_persistence_off_removes_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(&dir.path().join("state")).unwrap();
        let id = journal.record(intent(Knob::Max, 5000, None), 0).unwrap();
        journal.mark(id, EntryState::Applied, None).unwrap();
        let persist = Persistence::new(dir.path());
        persist.sync(&journal, true).unwrap();
        assert!(persist.has_files());
        persist.sync(&journal, false).unwrap();
        assert!(!persist.has_files());
    }
}
