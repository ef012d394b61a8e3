//! `ctguard status` against the real kernel: a full lab namespace, and the host itself.

use crate::lab::{GlobalSysctl, LabNetns, read_global, run};
use ctguard::observe::stat::StatSource;
use ctguard::observe::sysctl::SysctlSource;
use std::process::Command;

pub const TESTS: &[(&str, fn())] = &[
    (
        "status_json_reports_a_full_namespace",
        json_reports_a_full_namespace,
    ),
    ("status_human_report_on_the_host", human_report_on_the_host),
    (
        "observe_sources_reread_their_open_files",
        sources_reread_their_open_files,
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

/// Files opened once inside a namespace keep showing that namespace's values when
/// re-read with pread (sysctl files and the seq_file stat file): what a polling daemon
/// relies on.
fn sources_reread_their_open_files() {
    let _max = GlobalSysctl::set("nf_conntrack_max", 4096);
    let lab = LabNetns::new("reread");
    let (sysctl, stat) = ctguard::netns::run_in(&lab.path, || {
        (
            SysctlSource::open_default(),
            StatSource::open_current_netns(),
        )
    })
    .unwrap();
    let (sysctl, mut stat) = (sysctl.unwrap(), stat.unwrap());
    let before = stat.read().unwrap();
    assert_eq!(
        sysctl.read().unwrap().count,
        0,
        "a fresh namespace tracks nothing"
    );
    let filled = lab.fill_table(2000);
    let sample = sysctl.read().unwrap();
    assert_eq!((sample.count, sample.max), (filled, 4096));
    let after = stat.read().unwrap();
    assert!(
        after.drop + after.early_drop > before.drop + before.early_drop,
        "before {before:?}, after {after:?}"
    );
}
