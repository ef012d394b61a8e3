//! `ctguard status` against the real kernel: a full lab namespace, and the host itself.

use crate::lab::{GlobalSysctl, LabNetns, read_global, run};
use ctguard::observe::stat::StatSource;
use std::process::Command;

pub const TESTS: &[(&str, fn())] = &[
    (
        "status_json_reports_a_full_namespace",
        json_reports_a_full_namespace,
    ),
    ("status_human_report_on_the_host", human_report_on_the_host),
    (
        "stat_source_rereads_its_open_file",
        stat_source_rereads_its_open_file,
    ),
];

fn ctguard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ctguard"))
}

fn json_reports_a_full_namespace() {
    let _max = GlobalSysctl::set("nf_conntrack_max", 4096);
    let lab = LabNetns::new("status");
    lab.fill_table(2000);
    let out = run(ctguard().args(["status", "--json", "--netns", &lab.name]));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(report["count"], 4096, "{report:#}");
    assert_eq!(report["max"], 4096, "{report:#}");
    assert_eq!(report["ratio"], 1.0, "{report:#}");
    assert_eq!(report["netns"]["inode"], lab.inode());
    let stats = &report["stats"];
    let dropped = stats["drop"].as_u64().unwrap() + stats["early_drop"].as_u64().unwrap();
    assert!(dropped > 0, "a full table must drop or evict: {stats}");
    assert_eq!(report["errors"], serde_json::json!([]), "{report:#}");
}

fn human_report_on_the_host() {
    let out = run(ctguard().arg("status"));
    let text = String::from_utf8(out.stdout).unwrap();
    let max = read_global("nf_conntrack_max");
    assert!(text.contains(&format!(" / {max} max")), "{text}");
    assert!(text.contains("established"), "{text}");
}

/// The stat file opened once inside a namespace keeps showing that namespace's counters
/// when re-read with pread: what a polling daemon relies on.
fn stat_source_rereads_its_open_file() {
    let _max = GlobalSysctl::set("nf_conntrack_max", 4096);
    let lab = LabNetns::new("stat");
    let mut source = ctguard::netns::run_in(&lab.path, StatSource::open_current_netns)
        .unwrap()
        .unwrap();
    let before = source.read().unwrap();
    lab.fill_table(2000);
    let after = source.read().unwrap();
    assert!(
        after.drop + after.early_drop > before.drop + before.early_drop,
        "before {before:?}, after {after:?}"
    );
}
