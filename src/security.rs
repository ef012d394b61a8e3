/*!
Ownership and permission checks on what ctguard trusts, in the spirit of sshd's
`StrictModes`: the policy decides what is written to the kernel, and the journal decides
what a rollback writes back, so neither may be editable by anyone but root.

A path is trusted when it, and every directory above it up to `/`, is
- owned by root (or by the user ctguard runs as, so an unprivileged dry run of one's own
  policy still works), and
- not writable by group or others, except a directory with the sticky bit (like `/tmp`):
  there others may add entries but cannot rename or delete root's.

Symbolic links are followed: both the path as given and the path it resolves to are
checked, directories above included. A state directory that does not exist yet is
checked from its nearest existing ancestor (ctguard creates it mode 0700).

There is no switch to turn this off: the fix is always a `chown`/`chmod`, which the error
spells out. [`check_policy_file`] and [`check_state_dir`] refuse; `ctguard check` only
prints the findings as warnings.
*/

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What is being checked, for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    PolicyFile,
    StateDir,
    /// The journal file inside the state directory.
    Journal,
    /// A directory above one of the others.
    Ancestor,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::PolicyFile => "policy file",
            Role::StateDir => "state directory",
            Role::Journal => "journal",
            Role::Ancestor => "directory",
        }
    }
}

/// The parts of a file's metadata the rules look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub uid: u32,
    /// Permission bits with the sticky bit (`st_mode & 0o7777`).
    pub mode: u32,
    pub is_dir: bool,
}

impl Meta {
    pub fn of(metadata: &std::fs::Metadata) -> Meta {
        Meta {
            uid: metadata.uid(),
            mode: metadata.mode() & 0o7777,
            is_dir: metadata.is_dir(),
        }
    }
}

/// What is wrong with one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Owned by someone other than root or ctguard's own user.
    Owner,
    /// Writable by its group or by everyone (and not a sticky directory).
    Writable,
}

/// One path that cannot be trusted, with what it takes to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub path: PathBuf,
    pub role: Role,
    pub meta: Meta,
    pub problem: Problem,
    /// The owner's user name, when it could be looked up.
    pub owner_name: Option<String>,
    /// What the finding protects (the policy file or state directory being checked).
    pub protecting: PathBuf,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let owner = match &self.owner_name {
            Some(name) => format!("{} ({name})", self.meta.uid),
            None => self.meta.uid.to_string(),
        };
        let what = if self.role == Role::Ancestor {
            format!("directory above {}", self.protecting.display())
        } else {
            self.role.name().to_string()
        };
        let path = self.path.display();
        let (why, fix) = match self.problem {
            Problem::Owner => (
                "is not owned by root".to_string(),
                format!("chown root {path}"),
            ),
            Problem::Writable => {
                let who = match (self.meta.mode & 0o020 != 0, self.meta.mode & 0o002 != 0) {
                    (true, true) => "its group and everyone",
                    (true, false) => "its group",
                    _ => "everyone",
                };
                (
                    format!("is writable by {who}"),
                    format!("chmod go-w {path}"),
                )
            }
        };
        write!(
            f,
            "{path} ({what}, mode {:04o}, owner uid {owner}) {why}, so anyone who can \
             write it could make ctguard write arbitrary values to the kernel; fix: {fix}",
            self.meta.mode
        )
    }
}

/// Refused because of one or more findings.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("refusing to use {}: {}", .protecting.display(), join(.findings))]
    Untrusted {
        protecting: PathBuf,
        findings: Vec<Finding>,
    },
    #[error("{}: cannot check ownership and mode: {source}", .path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn join(findings: &[Finding]) -> String {
    findings
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The rules for one path, given its metadata and the user ctguard runs as.
pub fn problems(meta: Meta, euid: u32) -> Vec<Problem> {
    let mut found = Vec::new();
    if meta.uid != 0 && meta.uid != euid {
        found.push(Problem::Owner);
    }
    let sticky_dir = meta.is_dir && meta.mode & 0o1000 != 0;
    if meta.mode & 0o022 != 0 && !sticky_dir {
        found.push(Problem::Writable);
    }
    found
}

/// Every path whose metadata decides whether `path` can be trusted: the path itself as
/// given and as resolved, and every directory above each, outermost last. Pure: the
/// resolved path comes from the caller.
pub fn paths_to_check(given: &Path, resolved: Option<&Path>) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = Vec::new();
    for start in std::iter::once(given).chain(resolved) {
        for p in start.ancestors() {
            if p.as_os_str().is_empty() {
                continue;
            }
            if !all.iter().any(|seen| seen == p) {
                all.push(p.to_path_buf());
            }
        }
    }
    all
}

/// Checks the policy file and the directories above it.
pub fn check_policy_file(path: &Path) -> Result<(), SecurityError> {
    findings_for(path, Role::PolicyFile).and_then(|f| refuse_if_any(path, f))
}

/// Checks the state directory (if it exists; else the nearest existing directory above
/// it), the journal in it (if any), and the directories above.
pub fn check_state_dir(dir: &Path) -> Result<(), SecurityError> {
    let mut findings = findings_for(dir, Role::StateDir)?;
    let journal = dir.join(crate::journal::FILE_NAME);
    if journal.exists() {
        findings.extend(
            findings_for(&journal, Role::Journal)?
                .into_iter()
                .filter(|f| f.role == Role::Journal),
        );
    }
    refuse_if_any(dir, findings)
}

/// Findings for `path` as warnings (`ctguard check`): never fails, an unreadable path is
/// itself a warning.
pub fn warnings_for_policy_file(path: &Path) -> Vec<String> {
    match findings_for(path, Role::PolicyFile) {
        Ok(findings) => findings.iter().map(ToString::to_string).collect(),
        Err(e) => vec![e.to_string()],
    }
}

fn refuse_if_any(protecting: &Path, findings: Vec<Finding>) -> Result<(), SecurityError> {
    if findings.is_empty() {
        Ok(())
    } else {
        Err(SecurityError::Untrusted {
            protecting: protecting.to_path_buf(),
            findings,
        })
    }
}

/// Reads the metadata of every path that matters for `path` and applies the rules.
fn findings_for(path: &Path, role: Role) -> Result<Vec<Finding>, SecurityError> {
    let unreadable = |path: &Path, source| SecurityError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let absolute = std::path::absolute(path).map_err(|e| unreadable(path, e))?;
    // A state directory may not exist yet: its nearest existing ancestor decides.
    let existing = absolute
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let resolved = existing
        .canonicalize()
        .map_err(|e| unreadable(existing, e))?;
    let euid = nix::unistd::geteuid().as_raw();
    let mut findings = Vec::new();
    for p in paths_to_check(existing, Some(&resolved)) {
        let meta = Meta::of(&std::fs::metadata(&p).map_err(|e| unreadable(&p, e))?);
        let is_target = p == absolute || p == resolved && existing == absolute;
        for problem in problems(meta, euid) {
            findings.push(Finding {
                path: p.clone(),
                role: if is_target { role } else { Role::Ancestor },
                meta,
                problem,
                owner_name: nix::unistd::User::from_uid(meta.uid.into())
                    .ok()
                    .flatten()
                    .map(|u| u.name),
                protecting: absolute.clone(),
            });
        }
    }
    Ok(findings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn meta(uid: u32, mode: u32, is_dir: bool) -> Meta {
        Meta { uid, mode, is_dir }
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn rules_on_metadata() {
        assert!(problems(meta(0, 0o644, false), 0).is_empty());
        assert!(problems(meta(1000, 0o600, false), 1000).is_empty());
        assert_eq!(problems(meta(1000, 0o644, false), 0), vec![Problem::Owner]);
        assert_eq!(problems(meta(0, 0o664, false), 0), vec![Problem::Writable]);
        assert_eq!(problems(meta(0, 0o646, false), 0), vec![Problem::Writable]);
        assert!(problems(meta(0, 0o1777, true), 0).is_empty(), "like /tmp");
        assert_eq!(
            problems(meta(0, 0o1666, false), 0),
            vec![Problem::Writable],
            "sticky means nothing on a file"
        );
        assert_eq!(
            problems(meta(7, 0o777, true), 0),
            vec![Problem::Owner, Problem::Writable]
        );
    }

    #[test]
    fn paths_to_check_cover_both_spellings_up_to_root() {
        let all = paths_to_check(
            Path::new("/etc/ctguard/policy.toml"),
            Some(Path::new("/srv/conf/policy.toml")),
        );
        let all: Vec<&str> = all.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(
            all,
            [
                "/etc/ctguard/policy.toml",
                "/etc/ctguard",
                "/etc",
                "/",
                "/srv/conf/policy.toml",
                "/srv/conf",
                "/srv"
            ]
        );
    }

    #[test]
    fn message_names_path_mode_owner_and_fix() {
        let finding = Finding {
            path: "/etc/ctguard/policy.toml".into(),
            role: Role::PolicyFile,
            meta: meta(0, 0o666, false),
            problem: Problem::Writable,
            owner_name: Some("root".into()),
            protecting: "/etc/ctguard/policy.toml".into(),
        };
        let text = finding.to_string();
        for part in [
            "/etc/ctguard/policy.toml",
            "policy file",
            "mode 0666",
            "owner uid 0 (root)",
            "writable by its group and everyone",
            "chmod go-w /etc/ctguard/policy.toml",
        ] {
            assert!(text.contains(part), "{part} missing: {text}");
        }
    }

    // Tempdirs live under /tmp (sticky, world-writable: allowed) and are mode 0700.
    #[test]
    fn a_private_policy_file_is_trusted_and_a_writable_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, "mode = \"observe\"\n").unwrap();
        chmod(&policy, 0o644);
        check_policy_file(&policy).unwrap();
        assert!(warnings_for_policy_file(&policy).is_empty());

        chmod(&policy, 0o664);
        let err = check_policy_file(&policy).unwrap_err().to_string();
        assert!(err.contains("mode 0664"), "{err}");
        assert!(
            err.contains(&format!("chmod go-w {}", policy.display())),
            "{err}"
        );
        assert_eq!(warnings_for_policy_file(&policy).len(), 1);
    }

    #[test]
    fn a_writable_directory_above_the_policy_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf");
        std::fs::create_dir(&conf).unwrap();
        let policy = conf.join("policy.toml");
        std::fs::write(&policy, "").unwrap();
        chmod(&policy, 0o600);
        chmod(&conf, 0o777);
        let err = check_policy_file(&policy).unwrap_err().to_string();
        assert!(
            err.contains(&format!("chmod go-w {}", conf.display())),
            "{err}"
        );
        assert!(err.contains("directory above"), "{err}");
        // The same directory with the sticky bit, like /tmp, is fine.
        chmod(&conf, 0o1777);
        check_policy_file(&policy).unwrap();
    }

    #[test]
    fn a_symlink_is_checked_where_it_points() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        let real = open.join("policy.toml");
        std::fs::write(&real, "").unwrap();
        chmod(&real, 0o644);
        chmod(&open, 0o775);
        let link = dir.path().join("policy.toml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = check_policy_file(&link).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{} (directory above", open.display())),
            "{err}"
        );
    }

    #[test]
    fn state_dir_journal_and_missing_dir() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        // Not there yet: the tempdir above decides, and it is private.
        check_state_dir(&state).unwrap();
        std::fs::create_dir(&state).unwrap();
        chmod(&state, 0o770);
        let err = check_state_dir(&state).unwrap_err().to_string();
        assert!(err.contains("state directory, mode 0770"), "{err}");
        chmod(&state, 0o700);
        let journal = state.join(crate::journal::FILE_NAME);
        std::fs::write(&journal, "{}").unwrap();
        chmod(&journal, 0o622);
        let err = check_state_dir(&state).unwrap_err().to_string();
        assert!(err.contains("journal, mode 0622"), "{err}");
        chmod(&journal, 0o600);
        check_state_dir(&state).unwrap();
    }

    #[test]
    fn a_file_owned_by_another_user_is_refused_by_root() {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, "").unwrap();
        chmod(&policy, 0o644);
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&policy, Some(65534), None).unwrap();
            let err = check_policy_file(&policy).unwrap_err().to_string();
            assert!(err.contains("is not owned by root"), "{err}");
            assert!(
                err.contains(&format!("chown root {}", policy.display())),
                "{err}"
            );
        } else {
            // Not root: one's own file is trusted (for unprivileged dry runs).
            check_policy_file(&policy).unwrap();
        }
    }
}
