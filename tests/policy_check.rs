//! `ctguard check` on the shipped policies (all valid) and on the broken fixtures under
//! `tests/fixtures/policy/` (each rejected with its `file:line:col: expected …`).

use std::path::Path;
use std::process::{Command, Output};

fn check(files: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .arg("check")
        .args(files)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run ctguard check")
}

#[test]
fn shipped_policies_are_valid() {
    let mut files: Vec<String> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .map(|p| format!("policies/{}", p.file_name().unwrap().to_string_lossy()))
            .collect();
    files.sort();
    assert!(
        files.len() >= 4,
        "expected the four shipped policies, found {files:?}"
    );
    let refs: Vec<&str> = files.iter().map(String::as_str).collect();
    let out = check(&refs);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in &files {
        assert!(
            stdout.contains(&format!("{f}: valid")),
            "{f} not reported valid:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("raise_limits never sets max above"),
        "{stdout}"
    );
}

#[test]
fn no_file_checks_the_embedded_default() {
    let out = check(&[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("<embedded default>: valid"));
}

#[test]
fn broken_policies_point_at_the_mistake() {
    // (fixture, line:col, what the message must say)
    let cases = [
        (
            "act-below-warn",
            "33:6",
            "expected levels.act.at above levels.warn.at (0.7), found 0.6",
        ),
        ("bad-duration", "17:11", "expected a duration like \"10s\""),
        (
            "bad-mode",
            "13:8",
            "unknown variant `yolo`, expected one of `enforce`, `dry-run`, `observe`",
        ),
        (
            "buckets-divisor-out-of-range",
            "79:19",
            "expected stages.raise_limits.buckets_divisor in 1..=16",
        ),
        (
            "clear-above-level",
            "39:15",
            "expected levels.critical.clear_below below levels.critical.at (0.95)",
        ),
        (
            "floor-above-target",
            "100:33",
            "expected timeouts.udp.floor at most its target (15s), found 20s",
        ),
        (
            "headroom-not-above-one",
            "68:12",
            "expected stages.raise_limits.headroom above 1",
        ),
        (
            "poll-too-slow",
            "23:11",
            "expected poll.at_rest at most 5m (a table fills in seconds",
        ),
        (
            "ratio-out-of-range",
            "112:13",
            "expected stages.notrack_hot_ports.min_share in (0, 1]",
        ),
        (
            "recover-above-clear",
            "138:17",
            "expected rollback.recover_below at most levels.act.clear_below (0.8)",
        ),
        ("syntax-error", "134:10", "expected `]`"),
        (
            "unknown-key",
            "69:1",
            "unknown field `headrom`, expected one of",
        ),
        (
            "unknown-timeout",
            "102:1",
            "unknown variant `genric`, expected one of `established`",
        ),
        (
            "wrong-type",
            "45:15",
            "invalid type: string \"sixteen\", expected u32",
        ),
        (
            "zero-cooldown",
            "66:12",
            "expected a cooldown longer than 0s",
        ),
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/policy");
    let on_disk = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "toml")
        })
        .count();
    assert_eq!(
        on_disk,
        cases.len(),
        "every fixture needs an expectation here"
    );
    for (name, position, expected) in cases {
        let file = format!("tests/fixtures/policy/{name}.toml");
        let out = check(&[&file]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        let prefix = format!("{file}:{position}: ");
        assert!(
            stderr.starts_with(&prefix),
            "{name}: expected {prefix}…, got {stderr}"
        );
        assert!(
            stderr.contains(expected),
            "{name}: expected {expected:?} in {stderr}"
        );
        assert_eq!(
            stderr.lines().count(),
            1,
            "{name}: one line per error: {stderr}"
        );
    }
}

#[test]
fn one_bad_file_fails_the_run_but_the_good_ones_are_still_reported() {
    let out = check(&[
        "policies/default.toml",
        "tests/fixtures/policy/bad-mode.toml",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("policies/default.toml: valid"));
}

#[test]
fn an_untrusted_file_is_valid_but_the_warning_says_run_would_refuse_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/default.toml"),
        &path,
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = check(&[path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: `ctguard run` would refuse this file: "),
        "{stderr}"
    );
    assert!(stderr.contains("chmod go-w"), "{stderr}");
}
