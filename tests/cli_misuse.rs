//! Misusing the command line prints usage help (or where to find it) on stderr and exits non-zero (clap's 2),
//! without touching anything; naming something that is not there (a namespace) fails (1)
//! with one clear line.

use std::process::Command;

/// Runs `ctguard ARGS` and returns (exit code, stderr).
fn ctguard(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.stdout.is_empty(), "{args:?} wrote to stdout");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_misuse(args: &[&str], says: &str) {
    let (code, stderr) = ctguard(args);
    assert_eq!(code, Some(2), "{args:?}: {stderr}");
    assert!(stderr.contains(says), "{args:?}: {stderr}");
    // Usage, or (for a bad value) clap's pointer to it.
    assert!(
        stderr.contains("Usage: ctguard") || stderr.contains("try '--help'"),
        "{args:?}: {stderr}"
    );
}

#[test]
fn unknown_subcommand() {
    assert_misuse(&["frobnicate"], "unrecognized subcommand 'frobnicate'");
}

#[test]
fn no_subcommand() {
    let (code, stderr) = ctguard(&[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("Commands:"), "{stderr}");
}

#[test]
fn missing_required_argument() {
    // rollback needs --all or --stage.
    assert_misuse(&["rollback"], "required");
    assert_misuse(
        &["run", "--policy"],
        "a value is required for '--policy <FILE>'",
    );
    // simulate needs one of --trace or --scenario, and says so (not just --trace).
    assert_misuse(&["simulate"], "<--trace <FILE>|--scenario <NAME>>");
    assert_misuse(
        &["simulate", "--scenario", "flood", "--trace", "t.jsonl"],
        "cannot be used with",
    );
}

#[test]
fn bad_duration() {
    assert_misuse(&["record", "--duration", "soon"], "invalid value 'soon'");
}

#[test]
fn unknown_flag() {
    assert_misuse(
        &["status", "--frobnicate"],
        "unexpected argument '--frobnicate'",
    );
}

#[test]
fn missing_namespace_is_named_once() {
    let state = tempfile::tempdir().unwrap();
    let state = state.path().to_str().unwrap();
    let missing = "/nonexistent/ctguard-test-netns";
    let out = "/nonexistent/trace.jsonl";
    for args in [
        &["status", "--netns", missing][..],
        &[
            "record",
            "--netns",
            missing,
            "--out",
            out,
            "--duration",
            "1s",
        ],
        &[
            "run",
            "--dry-run",
            "--no-metrics",
            "--state-dir",
            state,
            "--netns",
            missing,
        ],
    ] {
        let (code, stderr) = ctguard(args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        let says = format!("network namespace {missing}: No such file or directory");
        assert!(stderr.contains(&says), "{args:?}: {stderr}");
        assert_eq!(
            stderr.matches("No such file").count(),
            1,
            "{args:?}: {stderr}"
        );
    }
}

/// A mistyped state directory is an error, not an empty history, and is not created.
#[test]
fn reading_a_missing_state_dir_fails_and_creates_nothing() {
    let parent = tempfile::tempdir().unwrap();
    let missing = parent.path().join("typo");
    let missing = missing.to_str().unwrap();
    for args in [
        &["journal", "--state-dir", missing][..],
        &["journal", "--json", "--state-dir", missing],
        &["incidents", "--state-dir", missing],
        &["incidents", "show", "latest", "--state-dir", missing],
    ] {
        let (code, stderr) = ctguard(args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("{missing}: no such state directory")),
            "{args:?}: {stderr}"
        );
        assert!(!parent.path().join("typo").exists(), "{args:?} created it");
    }
}

#[test]
fn incidents_state_dir_before_or_after_show() {
    let state = tempfile::tempdir().unwrap();
    let state = state.path().to_str().unwrap();
    for args in [
        &["incidents", "--state-dir", state, "show", "latest"][..],
        &["incidents", "show", "latest", "--state-dir", state],
        &[
            "incidents",
            "--json",
            "--state-dir",
            state,
            "show",
            "latest",
        ],
    ] {
        let (code, stderr) = ctguard(args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        let says = format!("no incident \"latest\" in {state}/incidents");
        assert!(stderr.contains(&says), "{args:?}: {stderr}");
    }
}
