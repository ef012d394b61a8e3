//! `ctguard run` against the real kernel, in scratch namespaces: an incident from the
//! first drop to the exact rollback; a crash and restart; drift; running inside a
//! namespace where global knobs are not permitted; the opt-in eviction stage.

use crate::lab::{
    Daemon, GlobalSysctl, LabNetns, fast_policy, policy_with, read_global, state_args, wait_until,
};
use std::process::Command;
use std::time::Duration;

pub const TESTS: &[(&str, fn())] = &[
    (
        "daemon_evicts_old_unreplied_entries_in_bounded_rounds",
        evicts_unreplied,
    ),
    (
        "daemon_escalates_stops_drops_and_rolls_back_exactly",
        incident_and_exact_rollback,
    ),
    (
        "daemon_killed_mid_incident_is_reconciled_and_rolled_back",
        crash_and_restart,
    ),
    ("daemon_acts_on_drift_only_during_an_incident", drift),
    (
        "daemon_start_brings_persisted_files_in_line_with_the_journal",
        persisted_at_start,
    ),
    (
        "daemon_inside_a_namespace_moves_on_to_timeouts",
        inside_namespace,
    ),
    (
        "daemon_dry_run_logs_would_change_and_changes_nothing",
        dry_run_says_would,
    ),
    (
        "daemon_started_in_dry_run_stays_so_on_a_reload_to_enforce",
        reload_to_enforce_stays_dry_run,
    ),
];

const UDP: &str = "nf_conntrack_udp_timeout";
const ESTABLISHED: &str = "nf_conntrack_tcp_timeout_established";

fn drops(lab: &LabNetns) -> u64 {
    let mut sampler = ctguard::observe::sampler::Sampler::open(Some(&lab.path)).unwrap();
    let stats = sampler.read().unwrap().stats.expect("stats");
    stats.drop + stats.early_drop + stats.insert_failed
}

/// Waits until expired entries are gone and the snapshot equals `before`.
fn wait_for_exact_restore(lab: &LabNetns, before: &std::collections::BTreeMap<String, u64>) {
    let restored = wait_until(Duration::from_secs(120), || {
        lab.collect_expired();
        lab.snapshot() == *before
    });
    assert!(
        restored,
        "not restored:\nbefore {before:?}\nnow    {:?}",
        lab.snapshot()
    );
}

fn incident_and_exact_rollback() {
    let _globals = crate::lab::small_table();
    let lab = LabNetns::with_udp_timeout("run", 5);
    let state = tempfile::tempdir().unwrap();
    let before = lab.snapshot();
    // With persist = true, applied values also go to boot-time files (under a scratch
    // root here), and leave them again on rollback.
    let policy = policy_with(
        state.path(),
        &[("mode = \"enforce\"", "mode = \"enforce\"\npersist = true")],
    );
    let root = state.path().join("root");
    let mut args = state_args(&lab, &policy, state.path());
    args.extend(["--persist-root", root.to_str().unwrap()]);
    let mut daemon = Daemon::run(&args, state.path().join("log"));
    let persisted = root.join("etc/sysctl.d/90-ctguard.conf");
    daemon.assert_started();

    lab.fill_table(2000);
    assert!(
        wait_until(Duration::from_secs(10), || read_global("nf_conntrack_max")
            > 4096
            && lab.sysctl(UDP) < before[UDP]),
        "max and the udp timeout were not changed:\n{}",
        daemon.log()
    );

    assert!(
        wait_until(Duration::from_secs(2), || std::fs::read_to_string(
            &persisted
        )
        .is_ok_and(|t| t.contains("net.netfilter.nf_conntrack_max = "))),
        "applied max not persisted"
    );

    // Once ctguard has made room, new flows are tracked instead of dropped.
    let settled = wait_until(Duration::from_secs(10), || {
        let count = lab.sysctl("nf_conntrack_count");
        read_global("nf_conntrack_max") >= count + 500
    });
    assert!(settled, "no headroom made:\n{}", daemon.log());
    let dropped_before = drops(&lab);
    let count_before = lab.sysctl("nf_conntrack_count");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    ctguard::netns::run_in(&lab.path, || {
        ctguard::loadgen::fill_udp(1_000_000, 300, deadline)
    })
    .unwrap()
    .unwrap();
    assert_eq!(drops(&lab), dropped_before, "drops after ctguard acted");
    assert!(lab.sysctl("nf_conntrack_count") > count_before);

    // The load is over: everything comes back, value for value.
    wait_for_exact_restore(&lab, &before);
    assert!(daemon.signal(libc::SIGTERM).success());
    assert_eq!(lab.snapshot(), before);
    assert!(
        !persisted.exists(),
        "persisted values outlived the rollback"
    );
    let journal = std::fs::read_to_string(state.path().join("journal.json")).unwrap();
    assert!(
        !journal.contains("\"applied\""),
        "changes left in force:\n{journal}"
    );
}

fn crash_and_restart() {
    let _globals = crate::lab::small_table();
    let lab = LabNetns::with_udp_timeout("crash", 5);
    let state = tempfile::tempdir().unwrap();
    let before = lab.snapshot();
    // Recovery takes an hour here, so only the crash and the command undo anything.
    let policy = policy_with(
        state.path(),
        &[("recover_for = \"1s\"", "recover_for = \"1h\"")],
    );
    let args = state_args(&lab, &policy, state.path());
    let mut first = Daemon::run(&args, state.path().join("log1"));
    first.assert_started();
    lab.fill_table(2000);
    assert!(
        wait_until(Duration::from_secs(10), || lab.sysctl(UDP) < before[UDP]),
        "{}",
        first.log()
    );
    first.signal(libc::SIGKILL);
    assert_ne!(lab.snapshot(), before, "the crash left changes in force");

    let mut second = Daemon::run(&args, state.path().join("log2"));
    assert!(
        second.wait_for_log("adopting a change still in force", Duration::from_secs(5)),
        "{}",
        second.log()
    );
    second.signal(libc::SIGKILL);

    // Rollback never lowers max below the entries in use: let the flows expire first.
    assert!(wait_until(Duration::from_secs(60), || {
        lab.collect_expired();
        lab.sysctl("nf_conntrack_count") < 4096
    }));
    let out = Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .args(["rollback", "--all", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lab.snapshot(), before);
}

/// A change the previous run left in the journal and the boot-time files, which the host no
/// longer holds: once the start has settled it, a reboot must not re-apply it.
fn persisted_at_start() {
    let _globals = crate::lab::small_table();
    let lab = LabNetns::new("persist-start");
    let state = tempfile::tempdir().unwrap();
    let policy = policy_with(
        state.path(),
        &[("mode = \"enforce\"", "mode = \"enforce\"\npersist = true")],
    );
    let root = state.path().join("root");
    let persistence = ctguard::act::persist::Persistence::new(&root);
    {
        let mut journal = ctguard::journal::Journal::open(state.path()).unwrap();
        let id = journal
            .record(
                ctguard::journal::Intent {
                    knob: ctguard::knob::Knob::Max,
                    original: 4096,
                    new: 8192,
                    stage: "raise_limits".into(),
                    incident: 1,
                    netns: Some(lab.path.clone()),
                    supersedes: None,
                },
                0,
            )
            .unwrap();
        journal
            .mark(id, ctguard::journal::EntryState::Applied, None)
            .unwrap();
        persistence.sync(&journal, true).unwrap();
    }
    assert!(persistence.has_files());
    // The host holds the original (4096): the start settles the entry as reverted.
    let mut args = state_args(&lab, &policy, state.path());
    args.extend(["--persist-root", root.to_str().unwrap()]);
    let mut daemon = Daemon::run(&args, state.path().join("log"));
    daemon.assert_started();
    assert!(
        wait_until(Duration::from_secs(5), || !persistence.has_files()),
        "the persisted max outlived its entry:\n{}\n{}",
        std::fs::read_to_string(persistence.sysctl_path()).unwrap_or_default(),
        daemon.log()
    );
    assert!(daemon.signal(libc::SIGTERM).success());
    assert_eq!(read_global("nf_conntrack_max"), 4096);
}

fn drift() {
    let _globals = crate::lab::small_table();
    let lab = LabNetns::with_udp_timeout("drift", 5);
    let state = tempfile::tempdir().unwrap();
    let before = lab.snapshot();
    let policy = policy_with(
        state.path(),
        &[("recover_for = \"1s\"", "recover_for = \"1h\"")],
    );
    let mut daemon = Daemon::run(
        &state_args(&lab, &policy, state.path()),
        state.path().join("log"),
    );
    daemon.assert_started();
    lab.fill_table(2000);
    assert!(
        wait_until(Duration::from_secs(10), || read_global("nf_conntrack_max")
            > 4096),
        "{}",
        daemon.log()
    );

    // During the incident someone resets max (as a firewall restart would): the table is
    // over the limit again and ctguard raises it again within a couple of polls.
    std::fs::write("/proc/sys/net/netfilter/nf_conntrack_max", "4096").unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || read_global("nf_conntrack_max")
            > 4096),
        "max not raised again after the reset:\n{}",
        daemon.log()
    );
    assert!(daemon.log().contains("drift during an incident"));

    // At rest (table mostly empty, changes still in force), a manual value is left alone.
    let at_rest = wait_until(Duration::from_secs(90), || {
        lab.collect_expired();
        lab.sysctl("nf_conntrack_count") * 4 < read_global("nf_conntrack_max")
    });
    assert!(
        at_rest,
        "count {} max {}:\n{}",
        lab.sysctl("nf_conntrack_count"),
        read_global("nf_conntrack_max"),
        daemon.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    let established = format!("/proc/sys/net/netfilter/{ESTABLISHED}");
    ctguard::netns::run_in(&lab.path, || std::fs::write(&established, "7777"))
        .unwrap()
        .unwrap();
    assert!(
        daemon.wait_for_log("leaving the manual value", Duration::from_secs(2)),
        "{}",
        daemon.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lab.sysctl(ESTABLISHED), 7777);

    // A clean stop rolls back what is still ctguard's, and leaves the manual value.
    assert!(daemon.signal(libc::SIGTERM).success());
    assert_eq!(lab.sysctl(ESTABLISHED), 7777);
    assert_eq!(read_global("nf_conntrack_max"), 4096);
    assert_eq!(lab.sysctl(UDP), before[UDP]);
}

fn inside_namespace() {
    let _max = GlobalSysctl::set("nf_conntrack_max", 4096);
    let lab = LabNetns::new("inside");
    let state = tempfile::tempdir().unwrap();
    let policy = fast_policy();
    let udp_before = lab.sysctl(UDP);
    let mut cmd = lab.exec(&[
        env!("CARGO_BIN_EXE_ctguard"),
        "run",
        "--policy",
        policy.to_str().unwrap(),
        "--state-dir",
        state.path().to_str().unwrap(),
    ]);
    let mut daemon = Daemon::start(&mut cmd, state.path().join("log"));
    daemon.assert_started();
    lab.fill_table(2000);
    assert!(
        wait_until(Duration::from_secs(10), || lab.sysctl(UDP) < udp_before),
        "timeouts not shortened:\n{}",
        daemon.log()
    );
    assert_eq!(read_global("nf_conntrack_max"), 4096);
    assert!(
        daemon.log().contains("not permitted here"),
        "{}",
        daemon.log()
    );
    assert!(daemon.signal(libc::SIGTERM).success());
    assert_eq!(lab.sysctl(UDP), udp_before);
}

/// Eviction alone (the other stages off): old unreplied UDP entries are deleted round by
/// round (each on the daemon's blocking thread) until the table is back under `act`;
/// nothing is journaled, since deleted entries cannot be put back.
fn evicts_unreplied() {
    let _max = GlobalSysctl::set("nf_conntrack_max", 4096);
    let lab = LabNetns::new("evictd");
    let state = tempfile::tempdir().unwrap();
    let policy = policy_with(
        state.path(),
        &[
            (
                "[stages.raise_limits]\nenabled = true",
                "[stages.raise_limits]\nenabled = false",
            ),
            (
                "[stages.shorten_timeouts]\nenabled = true",
                "[stages.shorten_timeouts]\nenabled = false",
            ),
            (
                "[rollback]",
                "[stages.evict]\nenabled = true\ntrigger = \"act\"\ncooldown = \"1s\"\n\
                 states = [\"unreplied\"]\nmin_age = \"1s\"\nbatch = 500\n\n[rollback]",
            ),
        ],
    );
    let mut daemon = Daemon::run(
        &state_args(&lab, &policy, state.path()),
        state.path().join("log"),
    );
    daemon.assert_started();
    // 3800 of 4096: above act (0.85); unreplied UDP lives 30 s by default.
    ctguard::netns::run_in(&lab.path, || crate::lab::udp_flows(20_000, 3800, 5353)).unwrap();
    let full = lab.sysctl("nf_conntrack_count");
    assert!(full >= 3700, "only {full} entries");
    assert!(
        wait_until(Duration::from_secs(20), || lab.sysctl("nf_conntrack_count")
            < 3276),
        "count still {}\n{}",
        lab.sysctl("nf_conntrack_count"),
        daemon.log()
    );
    // The count can drop before the daemon logs the round that dropped it.
    let rounds = || daemon.log().matches("eviction round").count();
    assert!(
        wait_until(Duration::from_secs(5), || rounds() >= 2),
        "bounded batches of 500 need several rounds:\n{}",
        daemon.log()
    );
    assert!(daemon.log().contains("deleted 500"), "{}", daemon.log());
    assert!(daemon.signal(libc::SIGTERM).success());
    let journal = std::fs::read_to_string(state.path().join("journal.json")).unwrap_or_default();
    assert!(
        !journal.contains("evict"),
        "eviction was journaled: {journal}"
    );
}

/// Levels low enough for a few hundred flows to reach act in a lab namespace, whose max
/// (the global one) then never needs touching.
const LEVELS_FOR_A_FEW_FLOWS: [(&str, &str); 3] = [
    (
        "at = 0.70\nclear_below = 0.65",
        "at = 0.0005\nclear_below = 0.0004",
    ),
    (
        "at = 0.85\nclear_below = 0.80",
        "at = 0.001\nclear_below = 0.0008",
    ),
    ("recover_below = 0.60", "recover_below = 0.0001"),
];

/// A thousand flows, enough for [`LEVELS_FOR_A_FEW_FLOWS`]: a dry-run daemon then says it
/// would change something.
fn flows_until_it_would_change(lab: &LabNetns, daemon: &Daemon) {
    ctguard::netns::run_in(&lab.path, || crate::lab::udp_flows(20_000, 1000, 5353)).unwrap();
    assert!(
        daemon.wait_for_log("would change", Duration::from_secs(10)),
        "{}",
        daemon.log()
    );
}

/// `--dry-run` logs each change it would make as "would change" (never "changed", which
/// an operator greps for real changes) and leaves every value as it was.
fn dry_run_says_would() {
    let lab = LabNetns::new("dryrun");
    let state = tempfile::tempdir().unwrap();
    let policy = policy_with(state.path(), &LEVELS_FOR_A_FEW_FLOWS);
    let before = lab.snapshot();
    let mut args = state_args(&lab, &policy, state.path());
    args.extend(["--dry-run", "--no-metrics"]);
    let mut daemon = Daemon::run(&args, state.path().join("log"));
    daemon.assert_started();
    flows_until_it_would_change(&lab, &daemon);
    assert!(daemon.signal(libc::SIGTERM).success());
    let log = daemon.log();
    assert!(!log.contains("daemon: changed "), "{log}");
    assert!(log.contains("would revert"), "{log}");
    assert_eq!(lab.snapshot(), before);
}

/// A policy that says dry-run opens no journal; reloading one that enforces keeps the
/// daemon in dry-run (it never acts unjournaled) and says so, instead of refusing every
/// change as it comes.
fn reload_to_enforce_stays_dry_run() {
    let lab = LabNetns::new("dryreload");
    let state = tempfile::tempdir().unwrap();
    let mut dry = LEVELS_FOR_A_FEW_FLOWS.to_vec();
    dry.push(("mode = \"enforce\"", "mode = \"dry-run\""));
    let policy = policy_with(state.path(), &dry);
    let before = lab.snapshot();
    let mut args = state_args(&lab, &policy, state.path());
    args.push("--no-metrics");
    let mut daemon = Daemon::run(&args, state.path().join("log"));
    daemon.assert_started();
    // Rewriting the file reloads it (as SIGHUP would).
    policy_with(state.path(), &LEVELS_FOR_A_FEW_FLOWS);
    assert!(
        daemon.wait_for_log(
            "staying in dry-run until a restart",
            Duration::from_secs(10)
        ),
        "{}",
        daemon.log()
    );
    flows_until_it_would_change(&lab, &daemon);
    assert!(daemon.signal(libc::SIGTERM).success());
    let log = daemon.log();
    assert!(!log.contains("no usable journal"), "{log}");
    assert_eq!(lab.snapshot(), before);
}
