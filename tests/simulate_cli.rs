//! `ctguard simulate` end to end: the flood scenario escalates and fully rolls back, the
//! same way on every run; dry-run never applies; a non-initial namespace skips to the
//! per-namespace stages; a recorded trace replays.

use std::process::Command;

fn simulate(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .arg("simulate")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run ctguard simulate");
    assert!(
        out.status.success(),
        "simulate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[test]
fn flood_escalates_through_the_stages_and_rolls_back_identically_every_run() {
    let first = simulate(&["--scenario", "flood"]);
    let second = simulate(&["--scenario", "flood"]);
    assert_eq!(first, second, "simulation is not deterministic");
    let position = |needle: &str| {
        first
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} missing from:\n{first}"))
    };
    let raise = position("do raise_limits: ratio 1.00");
    let shorten = position("do shorten_timeouts:");
    let revert_timeouts = position("rollback shorten_timeouts:");
    let revert_max = position("rollback raise_limits:");
    let closed = position("incident-1 closed");
    assert!(raise < shorten && shorten < revert_timeouts);
    assert!(revert_timeouts < revert_max && revert_max < closed);
    assert!(
        first.contains("max 832358 → 262144"),
        "max not restored:\n{first}"
    );
    assert!(
        first.contains("established 230400 → 432000"),
        "timeout not restored:\n{first}"
    );
    assert!(
        !first.contains("shutdown:"),
        "rollback left work for shutdown:\n{first}"
    );
}

#[test]
fn json_timeline_is_one_object_per_line() {
    let out = simulate(&["--scenario", "recovery", "--json"]);
    let mut decisions = 0;
    for line in out.lines() {
        let row: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        assert!(row["t_ms"].is_u64() && row["level"].is_string(), "{row}");
        if row["event"]["kind"] == "decision" {
            decisions += 1;
            assert!(row["event"]["reason"].as_str().unwrap().contains("ratio"));
        }
    }
    assert!(decisions >= 2, "{out}");
}

#[test]
fn dry_run_only_reports() {
    let default = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/policies/default.toml"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dry-run.toml");
    std::fs::write(
        &path,
        default.replacen("mode = \"enforce\"", "mode = \"dry-run\"", 1),
    )
    .unwrap();
    let out = simulate(&["--scenario", "flood", "--policy", path.to_str().unwrap()]);
    assert!(out.contains("would raise_limits"), "{out}");
    assert!(
        !out.contains(" do ") && !out.contains("applied"),
        "dry-run applied something:\n{out}"
    );
}

#[test]
fn non_initial_namespace_skips_to_timeouts() {
    let out = simulate(&["--scenario", "flood", "--non-initial-netns"]);
    let refused = out.find("not permitted: EACCES").expect(&out);
    let shorten = out.find("do shorten_timeouts:").expect(&out);
    assert!(refused < shorten, "{out}");
    assert_eq!(
        out.matches("do raise_limits").count(),
        1,
        "retried an unavailable stage:\n{out}"
    );
}

#[test]
fn recorded_trace_replays() {
    let out = simulate(&["--trace", "tests/fixtures/traces/udp-fill.jsonl"]);
    assert!(
        out.contains("incident-1 opened") && out.contains("incident-1 closed"),
        "{out}"
    );
    assert!(out.contains("max 5850 → 4096"), "{out}");
}
