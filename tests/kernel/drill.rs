//! `ctguard drill` on the real kernel: with `--allow-global` it helps (fewer drops than
//! without ctguard), times the daemon and rolls back exactly; without it the global knobs
//! are never written and the raise shows as simulated.

use crate::lab::{GlobalSysctl, read_global};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub const TESTS: &[(&str, fn())] = &[
    (
        "drill_with_global_knobs_helps_and_rolls_back_exactly",
        with_global_knobs,
    ),
    (
        "drill_without_global_knobs_never_writes_them",
        without_global_knobs,
    ),
];

/// A descriptor of the host lock's open file, which this harness holds: the drill locks
/// the same open file and so does not wait for us (a fresh open would deadlock).
struct InheritedLock(i32);

impl InheritedLock {
    fn find() -> Option<InheritedLock> {
        let held = std::fs::read_dir("/proc/self/fd").ok()?.find_map(|entry| {
            let entry = entry.ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            (target == std::path::Path::new(ctguard::drill::HOST_LOCK))
                .then(|| entry.file_name().to_str()?.parse::<i32>().ok())
                .flatten()
        })?;
        // SAFETY: dup gives a descriptor without close-on-exec, so the child inherits it.
        let copy = unsafe { libc::dup(held) };
        (copy >= 0).then_some(InheritedLock(copy))
    }
}

impl Drop for InheritedLock {
    fn drop(&mut self) {
        // SAFETY: our own duplicate.
        unsafe { libc::close(self.0) };
    }
}

fn drill(args: &[&str]) -> (Output, serde_json::Value) {
    let lock = InheritedLock::find();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ctguard"));
    cmd.args(["drill", "--json"]).args(args);
    if let Some(lock) = &lock {
        cmd.env(ctguard::drill::HOST_LOCK_FD_ENV, lock.0.to_string());
    }
    let out = cmd.output().expect("run ctguard drill");
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "drill report is not JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, report)
}

fn with_global_knobs() {
    let max_before = read_global("nf_conntrack_max");
    let buckets_before = read_global("nf_conntrack_buckets");
    let (out, report) = drill(&["--allow-global"]);
    assert!(
        out.status.success(),
        "{report:#}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["global_allowed"], true);
    assert_eq!(report["scenario"], "udp-flood");
    assert_eq!(report["rollback_exact"], true, "{report:#}");
    let with = report["drops_with"].as_u64().unwrap();
    let without = report["drops_without"].as_u64().unwrap();
    assert!(with < without, "drops with {with}, without {without}");
    assert!(
        report["first_signal_to_change_ms"].is_number(),
        "{report:#}"
    );
    let changes = report["changes"].as_array().unwrap();
    assert!(
        changes
            .iter()
            .any(|c| c["knob"] == "net.netfilter.nf_conntrack_max" && c["stage"] == "raise_limits"),
        "{report:#}"
    );
    assert!(report["simulated"].as_array().unwrap().is_empty());
    assert_eq!(read_global("nf_conntrack_max"), max_before);
    assert_eq!(read_global("nf_conntrack_buckets"), buckets_before);
}

fn without_global_knobs() {
    // A small host max so the drill can fill the table without touching it.
    let _max = GlobalSysctl::set("nf_conntrack_max", 4096);
    let buckets = read_global("nf_conntrack_buckets");
    let done = AtomicBool::new(false);
    let (out, report, seen) = std::thread::scope(|scope| {
        // Watches the global knobs all through the drill, not only before and after.
        let watcher = scope.spawn(|| {
            let mut seen = std::collections::BTreeSet::new();
            while !done.load(Ordering::Relaxed) {
                seen.insert((
                    read_global("nf_conntrack_max"),
                    read_global("nf_conntrack_buckets"),
                ));
                std::thread::sleep(Duration::from_millis(1));
            }
            seen
        });
        let (out, report) = drill(&[]);
        done.store(true, Ordering::Relaxed);
        (out, report, watcher.join().unwrap())
    });
    assert!(
        out.status.success(),
        "{report:#}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        seen,
        [(4096, buckets)].into(),
        "global knobs changed during the drill"
    );
    assert_eq!(report["global_allowed"], false);
    assert_eq!(report["table_max"], 4096);
    assert_eq!(report["rollback_exact"], true, "{report:#}");
    let simulated = report["simulated"].as_array().unwrap();
    assert!(
        simulated
            .iter()
            .any(|s| s["stage"] == "raise_limits" && s["knob"] == "net.netfilter.nf_conntrack_max"),
        "{report:#}"
    );
    let changes = report["changes"].as_array().unwrap();
    assert!(!changes.is_empty(), "{report:#}");
    assert!(
        changes.iter().all(|c| c["stage"] != "raise_limits"),
        "{report:#}"
    );
}
