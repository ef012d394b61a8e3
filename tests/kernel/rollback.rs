//! `ctguard rollback` on the real kernel: changes journaled by one process (which then
//! "crashes") are restored exactly by another; drifted values are left alone.

use crate::lab::{GlobalSysctl, LabNetns, read_global};
use ctguard::act::executor::{ChangeRequest, Executor};
use ctguard::act::sysctl::{Roots, SysctlActuator};
use ctguard::journal::{EntryState, Intent, Journal};
use ctguard::knob::{Knob, TimeoutKnob};
use std::process::Command;

pub const TESTS: &[(&str, fn())] = &[
    (
        "rollback_restores_a_crashed_runs_changes_exactly",
        restores_after_crash,
    ),
    (
        "rollback_goes_on_past_a_namespace_that_is_gone",
        namespace_gone,
    ),
];

const EST: Knob = Knob::Timeout(TimeoutKnob::Established);
const UDP: Knob = Knob::Timeout(TimeoutKnob::Udp);

fn request(knob: Knob, expected: u64, to: u64, stage: &str) -> ChangeRequest {
    ChangeRequest {
        knob,
        expected,
        to,
        stage: stage.into(),
        incident: 1,
    }
}

fn restores_after_crash() {
    let max = read_global("nf_conntrack_max");
    let _guard = GlobalSysctl::set("nf_conntrack_max", max);
    let lab = LabNetns::new("rb");
    let state = tempfile::tempdir().unwrap();
    let est = lab.sysctl(EST.sysctl_file());
    let udp = lab.sysctl(UDP.sysctl_file());

    let mut exec = Executor::new(
        SysctlActuator::new(Roots::default(), Some(lab.path.clone())),
        Journal::open(state.path()).unwrap(),
        Some(lab.path.clone()),
    );
    exec.apply(&request(Knob::Max, max, max + 8192, "raise_limits"), 0)
        .unwrap();
    exec.apply(&request(EST, est, 600, "shorten_timeouts"), 0)
        .unwrap();
    exec.apply(&request(UDP, udp, udp / 2, "shorten_timeouts"), 0)
        .unwrap();
    drop(exec); // the "crash": nothing is undone in-process

    // Someone resets the UDP timeout by hand: rollback must not clobber it.
    let udp_path = format!("/proc/sys/net/netfilter/{}", UDP.sysctl_file());
    ctguard::netns::run_in(&lab.path, || std::fs::write(&udp_path, "45"))
        .unwrap()
        .unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .args(["rollback", "--all", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "drift must be reported: {stdout}");
    assert!(stdout.contains("left alone"), "{stdout}");
    assert_eq!(read_global("nf_conntrack_max"), max);
    assert_eq!(lab.sysctl(EST.sysctl_file()), est);
    assert_eq!(lab.sysctl(UDP.sysctl_file()), 45);

    let journal = Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .args(["journal", "--in-force", "--json", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    let in_force: serde_json::Value = serde_json::from_slice(&journal.stdout).unwrap();
    assert_eq!(
        in_force["changes"].as_array().unwrap().len(),
        1,
        "only the drifted UDP change"
    );
}

/// A namespace deleted since its changes were made fails its own group only: the other
/// namespaces are still rolled back, and the command exits non-zero naming the gone one.
fn namespace_gone() {
    let lab = LabNetns::new("rb-kept");
    let state = tempfile::tempdir().unwrap();
    let udp = lab.sysctl(UDP.sysctl_file());
    let mut exec = Executor::new(
        SysctlActuator::new(Roots::default(), Some(lab.path.clone())),
        Journal::open(state.path()).unwrap(),
        Some(lab.path.clone()),
    );
    exec.apply(&request(UDP, udp, udp / 2, "shorten_timeouts"), 0)
        .unwrap();
    let mut journal = exec.into_journal();
    // The newest change, so its group comes first.
    let gone = lab.path.with_file_name(format!("{}-gone", lab.name));
    let id = journal
        .record(
            Intent {
                knob: UDP,
                original: 30,
                new: 10,
                stage: "shorten_timeouts".into(),
                incident: 1,
                netns: Some(gone.clone()),
                supersedes: None,
            },
            0,
        )
        .unwrap();
    journal.mark(id, EntryState::Applied, None).unwrap();
    drop(journal);

    let out = Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .args(["rollback", "--all", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{output}");
    assert!(output.contains(&gone.display().to_string()), "{output}");
    assert_eq!(lab.sysctl(UDP.sysctl_file()), udp, "{output}");
}
