//! Fire drills for faults: each test breaks one thing under a running `ctguard` and checks
//! that the host ends in a known state and that nothing is lost from the journal.
//!
//! - a crash between journaling and writing, and between writing and marking (the
//!   `CTGUARD_FAULT` test hook in the executor aborts the process there);
//! - `hashsize`/`nf_conntrack_buckets` read-only in a mount namespace (EROFS): "not
//!   permitted", the engine moves on (the EACCES of a non-initial network namespace is
//!   `daemon_inside_a_namespace_moves_on_to_timeouts` in `daemon.rs`);
//! - no `nft` binary: NOTRACK is unavailable, the sysctl stages still work;
//! - a full or read-only state directory: nothing changes unjournaled, and the log says why;
//! - a corrupt journal: watch and report only; a policy replaced by garbage: old one stays;
//! - a storm of 100,000 kernel log records while `ctguard top` dumps the table: the
//!   table-full message after it is still seen within seconds. This writes the records to
//!   the host's kernel log (`/dev/kmsg`, prefix `ctguard-storm:`), pushing older messages
//!   out of the ring buffer: it is done once per run;
//! - the capabilities documented in the README's "Privileges" are enough, and without
//!   CAP_SYS_ADMIN, `--netns` fails with a message that says so.
//!
//! Wall-clock jumps are not tested here (never change the host clock): the engine only
//! sees monotonic time, see `tests/engine_clock.rs`.

use crate::lab::{
    Daemon, GlobalSysctl, LabNetns, fast_policy, policy_with, read_global, state_args, wait_until,
};
use ctguard::journal::{Intent, Journal};
use ctguard::knob::{Knob, TimeoutKnob};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub const TESTS: &[(&str, fn())] = &[
    (
        "fault_crash_after_journal_is_settled_failed_and_rolled_back",
        crash_after_journal,
    ),
    (
        "fault_crash_after_write_is_adopted_and_rolled_back",
        crash_after_write,
    ),
    (
        "fault_read_only_hashsize_is_not_permitted_and_the_engine_moves_on",
        read_only_hashsize,
    ),
    (
        "fault_no_nft_binary_leaves_notrack_unavailable_and_sysctls_working",
        no_nft_binary,
    ),
    ("fault_full_state_dir_changes_nothing", full_state_dir),
    (
        "fault_unsettled_journal_on_a_read_only_state_dir_still_watches",
        unsettled_journal_on_read_only_state_dir,
    ),
    (
        "fault_read_only_state_dir_changes_nothing",
        read_only_state_dir,
    ),
    ("fault_corrupt_journal_watches_only", corrupt_journal),
    ("fault_garbage_policy_keeps_the_old_one", garbage_policy),
    (
        "fault_failing_kernel_log_does_not_stop_polling",
        failing_kernel_log,
    ),
    ("fault_kmsg_storm_does_not_delay_detection", kmsg_storm),
    (
        "fault_documented_capabilities_are_enough",
        documented_capabilities,
    ),
    (
        "fault_without_cap_sys_admin_netns_fails_clearly",
        without_cap_sys_admin,
    ),
];

const UDP: &str = "nf_conntrack_udp_timeout";

fn journal_entries(state: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(state.join("journal.json")).unwrap_or_default();
    if text.is_empty() {
        return Vec::new();
    }
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    doc["entries"].as_array().cloned().unwrap_or_default()
}

fn rollback_all(state: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .args(["rollback", "--all", "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "rollback failed: {text}");
    text
}

/// Lets the flows of a filled lab table expire (its UDP timeout was made short before
/// the snapshot) so a restart finds no pressure and a rollback may lower max again.
fn drain(lab: &LabNetns) {
    assert!(
        // Seen to take up to a minute after a crash mid-fill, though the flows' timeout is
        // seconds (the kernel's collection of expired entries lags here).
        wait_until(Duration::from_secs(120), || {
            lab.collect_expired();
            lab.sysctl("nf_conntrack_count") < 100
        }),
        "the lab table did not drain: {} entries, udp timeout {}, first entries:\n{}",
        lab.sysctl("nf_conntrack_count"),
        lab.sysctl(UDP),
        table_head(lab)
    );
}

/// The first lines of the lab's table, for failure messages.
fn table_head(lab: &LabNetns) -> String {
    let table = ctguard::netns::run_in(&lab.path, || std::fs::read("/proc/net/nf_conntrack"))
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&table)
        .lines()
        .take(5)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A crash at `fault`, a restart that must settle the interrupted entry as `settled`,
/// and a rollback that must restore every value exactly.
fn crash_at(fault: &str, settled: &str, note: &str) {
    let _globals = crate::lab::small_table();
    let lab = LabNetns::with_udp_timeout("crash", 3);
    let state = tempfile::tempdir().unwrap();
    let before = lab.snapshot();
    // Recovery takes an hour, so only the restart and the command undo anything.
    let policy = policy_with(
        state.path(),
        &[("recover_for = \"1s\"", "recover_for = \"1h\"")],
    );
    let args = state_args(&lab, &policy, state.path());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ctguard"));
    cmd.arg("run").args(&args).env("CTGUARD_FAULT", fault);
    let mut first = Daemon::start(&mut cmd, state.path().join("log1"));
    first.assert_started();
    lab.fill_table(2000);
    let status = first
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no crash:\n{}", first.log()));
    assert!(!status.success(), "{status:?}");
    let entries = journal_entries(state.path());
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["state"], "intended", "{entries:?}");
    let id = entries[0]["id"].clone();

    drain(&lab);
    let mut second = Daemon::run(&args, state.path().join("log2"));
    second.assert_started();
    assert!(
        wait_until(Duration::from_secs(5), || {
            journal_entries(state.path())
                .iter()
                .any(|e| e["id"] == id && e["state"] == settled)
        }),
        "entry {id} not settled {settled}: {:?}\n{}",
        journal_entries(state.path()),
        second.log()
    );
    let entry = journal_entries(state.path())
        .into_iter()
        .find(|e| e["id"] == id)
        .unwrap();
    assert!(
        entry["note"].as_str().unwrap_or("").contains(note),
        "{entry}"
    );
    second.signal(libc::SIGKILL);

    rollback_all(state.path());
    assert_eq!(lab.snapshot(), before);
    assert!(
        journal_entries(state.path())
            .iter()
            .all(|e| e["state"] != "applied" && e["state"] != "intended"),
        "{:?}",
        journal_entries(state.path())
    );
}

fn crash_after_journal() {
    crash_at(
        "crash-after-journal",
        "failed",
        "interrupted before the write",
    );
}

fn crash_after_write() {
    crash_at(
        "crash-after-write",
        "applied",
        "interrupted after the write",
    );
}

/// Runs `ctguard run ARGS` inside a new mount namespace after `setup` (a shell script).
fn run_in_mount_ns(setup: &str, env: &[(&str, &str)], args: &[&str], log: &Path) -> Daemon {
    let script = format!("set -e\n{setup}\nexec \"$@\"");
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ])
    .arg(env!("CARGO_BIN_EXE_ctguard"))
    .arg("run")
    .args(args)
    .envs(env.iter().copied());
    Daemon::start(&mut cmd, log.to_path_buf())
}

/// A read-only bind mount of `path` onto itself.
fn bind_ro(path: &str) -> String {
    format!("mount --bind {path} {path}\nmount -o remount,bind,ro {path}")
}

fn read_only_hashsize() {
    let _max = GlobalSysctl::set("nf_conntrack_max", 4096);
    // Few buckets, so raising max also wants more of them.
    let _buckets = GlobalSysctl::set("nf_conntrack_buckets", 1024);
    let lab = LabNetns::with_udp_timeout("rosys", 3);
    let state = tempfile::tempdir().unwrap();
    let before = lab.snapshot();
    let policy = fast_policy();
    let setup = [
        bind_ro("/sys/module/nf_conntrack/parameters"),
        bind_ro("/proc/sys/net/netfilter/nf_conntrack_buckets"),
    ]
    .join("\n");
    let mut daemon = run_in_mount_ns(
        &setup,
        &[],
        &state_args(&lab, &policy, state.path()),
        &state.path().join("log"),
    );
    daemon.assert_started();
    lab.fill_table(2000);
    assert!(
        wait_until(Duration::from_secs(10), || lab.sysctl(UDP) < before[UDP]),
        "timeouts not shortened:\n{}",
        daemon.log()
    );
    let log = daemon.log();
    assert!(log.contains("not permitted here"), "{log}");
    assert!(log.contains("Read-only file system"), "{log}");
    assert_eq!(read_global("nf_conntrack_buckets"), 1024);
    drain(&lab);
    assert!(daemon.signal(libc::SIGTERM).success());
    assert_eq!(lab.snapshot(), before);
}

fn no_nft_binary() {
    use ctguard::act::notrack::NotrackBackend;
    let _globals = crate::lab::small_table();
    let lab = LabNetns::with_udp_timeout("nonft", 3);
    let state = tempfile::tempdir().unwrap();
    let before = lab.snapshot();

    // The NOTRACK backend, as ctguard would make it with `nft` nowhere on PATH.
    let saved_path = std::env::var_os("PATH");
    // SAFETY: kernel tests run one at a time on the harness thread; no other thread reads
    // the environment while PATH is empty.
    unsafe { std::env::set_var("PATH", "") };
    let mut backend = ctguard::act::nft::NftBackend::new(Some(lab.path.clone()));
    let installed = backend.install();
    // SAFETY: as above.
    unsafe { std::env::set_var("PATH", saved_path.unwrap_or_default()) };
    let err = installed.expect_err("install without nft");
    assert!(err.is_unavailable(), "{err}");
    assert!(err.to_string().contains("nft"), "{err}");

    // The daemon without nft on its PATH still raises limits and shortens timeouts.
    let policy = fast_policy();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ctguard"));
    cmd.arg("run")
        .args(state_args(&lab, &policy, state.path()))
        .env("PATH", "");
    let mut daemon = Daemon::start(&mut cmd, state.path().join("log"));
    daemon.assert_started();
    lab.fill_table(2000);
    assert!(
        wait_until(Duration::from_secs(10), || read_global("nf_conntrack_max")
            > 4096
            && lab.sysctl(UDP) < before[UDP]),
        "{}",
        daemon.log()
    );
    drain(&lab);
    assert!(daemon.signal(libc::SIGTERM).success());
    assert_eq!(lab.snapshot(), before);
}

/// The daemon with its state directory on a tmpfs that `setup` breaks: the table fills,
/// nothing may change, and the log must say the change could not be journaled.
fn unjournaled(tag: &str, break_it: &str, why: &str) {
    let _globals = crate::lab::small_table();
    let lab = LabNetns::with_udp_timeout(tag, 3);
    let scratch = tempfile::tempdir().unwrap();
    let state = scratch.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let before = lab.snapshot();
    let policy = fast_policy();
    let dir = state.to_str().unwrap();
    let setup = format!(
        "mount -t tmpfs -o size=64k,mode=0700 ctguard-test {dir}\n{}",
        break_it.replace("{dir}", dir)
    );
    let mut daemon = run_in_mount_ns(
        &setup,
        &[],
        &state_args(&lab, &policy, &state),
        &scratch.path().join("log"),
    );
    daemon.assert_started();
    lab.fill_table(2000);
    assert!(
        daemon.wait_for_log("could not be journaled", Duration::from_secs(10)),
        "{}",
        daemon.log()
    );
    // Give the engine time to try every stage.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(lab.snapshot(), before, "{}", daemon.log());
    let log = daemon.log();
    assert!(log.contains(why), "{log}");
    assert!(daemon.signal(libc::SIGTERM).success());
    assert_eq!(lab.snapshot(), before);
}

/// A previous run's journal entry left to settle (a crash between journaling and writing)
/// on a state directory that has turned read-only: the daemon cannot settle it, and
/// watches and reports anyway instead of exiting.
fn unsettled_journal_on_read_only_state_dir() {
    let _globals = crate::lab::small_table();
    let lab = LabNetns::with_udp_timeout("unsettled", 3);
    let scratch = tempfile::tempdir().unwrap();
    let state = scratch.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let previous = scratch.path().join("previous");
    let mut journal = Journal::open(&previous).unwrap();
    journal
        .record(
            Intent {
                knob: Knob::Timeout(TimeoutKnob::Udp),
                original: lab.sysctl(UDP),
                new: 1,
                stage: "shorten_timeouts".into(),
                incident: 1,
                netns: Some(lab.path.clone()),
                supersedes: None,
            },
            0,
        )
        .unwrap();
    let before = lab.snapshot();
    let policy = fast_policy();
    let dir = state.to_str().unwrap();
    let setup = format!(
        "mount -t tmpfs -o size=64k,mode=0700 ctguard-test {dir}\n\
         cp {} {dir}/journal.json\n\
         mount -o remount,ro {dir}",
        previous.join(ctguard::journal::FILE_NAME).display()
    );
    let mut daemon = run_in_mount_ns(
        &setup,
        &[],
        &state_args(&lab, &policy, &state),
        &scratch.path().join("log"),
    );
    daemon.assert_started();
    assert!(
        daemon.wait_for_log(
            "cannot settle the previous run's changes: watching and reporting only",
            Duration::from_secs(10)
        ),
        "{}",
        daemon.log()
    );
    // It still watches: the full table opens an incident (whose record cannot be written
    // here either).
    let opened = "could not write the incident record";
    assert!(!daemon.log().contains(opened), "{}", daemon.log());
    lab.fill_table(2000);
    assert!(
        daemon.wait_for_log(opened, Duration::from_secs(10)),
        "the full table was not seen:\n{}",
        daemon.log()
    );
    assert!(daemon.signal(libc::SIGTERM).success());
    assert_eq!(lab.snapshot(), before);
}

fn full_state_dir() {
    unjournaled(
        "full",
        "dd if=/dev/zero of={dir}/fill bs=4k 2>/dev/null || true",
        "No space left on device",
    );
}

fn read_only_state_dir() {
    unjournaled(
        "rostate",
        "mount -o remount,ro {dir}",
        "Read-only file system",
    );
}

fn corrupt_journal() {
    let _globals = crate::lab::small_table();
    let lab = LabNetns::with_udp_timeout("corrupt", 3);
    let state = tempfile::tempdir().unwrap();
    let journal = state.path().join("journal.json");
    let garbage = b"{\"version\": 1, \"next_id\": 3, \"entries\": [{\"id\": 1, \"kn";
    std::fs::write(&journal, garbage).unwrap();
    let before = lab.snapshot();
    let policy = fast_policy();
    let mut daemon = Daemon::run(
        &state_args(&lab, &policy, state.path()),
        state.path().join("log"),
    );
    assert!(
        daemon.wait_for_log("journal unusable", Duration::from_secs(5)),
        "{}",
        daemon.log()
    );
    lab.fill_table(2000);
    // Full table, several polls: the engine would have acted by now.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(lab.snapshot(), before, "{}", daemon.log());
    assert!(daemon.log().contains("watching and reporting only"));
    assert!(daemon.signal(libc::SIGTERM).success());
    assert_eq!(
        std::fs::read(&journal).unwrap(),
        garbage,
        "journal rewritten"
    );
}

fn garbage_policy() {
    let _globals = crate::lab::small_table();
    let lab = LabNetns::with_udp_timeout("garbage", 3);
    let state = tempfile::tempdir().unwrap();
    let before = lab.snapshot();
    let policy = policy_with(state.path(), &[]);
    let mut daemon = Daemon::run(
        &state_args(&lab, &policy, state.path()),
        state.path().join("log"),
    );
    daemon.assert_started();
    // Replaced the way config managers do it: a new file renamed over the old one.
    let next = state.path().join("policy.toml.new");
    std::fs::write(&next, b"mode = \"enforce\"\n[levels.act\nat = \xff\x00").unwrap();
    std::fs::rename(&next, &policy).unwrap();
    assert!(
        daemon.wait_for_log("new policy refused", Duration::from_secs(5)),
        "{}",
        daemon.log()
    );
    assert!(daemon.log().contains("the old one stays in force"));
    // The old policy still acts.
    lab.fill_table(2000);
    assert!(
        wait_until(Duration::from_secs(10), || read_global("nf_conntrack_max")
            > 4096),
        "{}",
        daemon.log()
    );
    drain(&lab);
    assert!(daemon.signal(libc::SIGTERM).success());
    assert_eq!(lab.snapshot(), before);
}

/// A kernel log that fails at every read (here a file at its end, as `/dev/kmsg`): the
/// daemon retries it with growing pauses, warns once, and must still poll at its own
/// interval.
fn failing_kernel_log() {
    let _globals = crate::lab::small_table();
    let lab = LabNetns::with_udp_timeout("nokmsg", 3);
    let state = tempfile::tempdir().unwrap();
    let before = lab.snapshot();
    let policy = policy_with(state.path(), &[("at_rest = \"200ms\"", "at_rest = \"3s\"")]);
    let mut daemon = run_in_mount_ns(
        "mount --bind /proc/sys/kernel/hostname /dev/kmsg",
        &[],
        &state_args(&lab, &policy, state.path()),
        &state.path().join("log"),
    );
    daemon.assert_started();
    assert!(
        daemon.wait_for_log("kernel log read failed", Duration::from_secs(5)),
        "{}",
        daemon.log()
    );
    lab.fill_table(2000);
    assert!(
        wait_until(Duration::from_secs(15), || read_global("nf_conntrack_max")
            > 4096),
        "the full table was not acted on:\n{}",
        daemon.log()
    );
    drain(&lab);
    assert!(daemon.signal(libc::SIGTERM).success());
    assert_eq!(lab.snapshot(), before);
    // A log that keeps failing warns once, not at every retry.
    let log = daemon.log();
    assert_eq!(log.matches("kernel log read failed").count(), 1, "{log}");
}

/// How many records the storm writes to the kernel log.
const STORM_RECORDS: u32 = 100_000;
/// How long detection may take after the storm (the follower reads records in batches
/// and classifies each in microseconds; a few seconds is generous).
const DETECTION_LIMIT: Duration = Duration::from_secs(5);

fn kmsg_storm() {
    let _max = GlobalSysctl::set("nf_conntrack_max", 4096);
    let lab = LabNetns::with_udp_timeout("storm", 3);
    let state = tempfile::tempdir().unwrap();
    // Observe only: this test is about seeing, not acting.
    let policy = policy_with(
        state.path(),
        &[("mode = \"enforce\"", "mode = \"observe\"")],
    );
    let mut daemon = Daemon::run(
        &state_args(&lab, &policy, state.path()),
        state.path().join("log"),
    );
    daemon.assert_started();
    // Half a table, so `ctguard top` has something to dump.
    ctguard::netns::run_in(&lab.path, || {
        ctguard::loadgen::fill_udp(0, 2000, Instant::now() + Duration::from_secs(5))
    })
    .unwrap()
    .unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dumps = {
        let stop = stop.clone();
        let name = lab.name.clone();
        std::thread::spawn(move || {
            let mut runs = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = Command::new(env!("CARGO_BIN_EXE_ctguard"))
                    .args(["top", "--netns", &name])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                runs += 1;
            }
            runs
        })
    };

    let storm_started = Instant::now();
    for i in 0..STORM_RECORDS {
        // One write is one record. Writers are rate limited per open file (10 records
        // per 5 s unless printk_devkmsg=on, a host setting left alone), so each record
        // gets its own open.
        let mut kmsg = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/kmsg")
            .unwrap();
        kmsg.write_all(format!("ctguard-storm: {i}\n").as_bytes())
            .unwrap();
    }
    let storm = storm_started.elapsed();

    // The kernel's table-full message is rate limited (net_ratelimit: 10 per 5 s, shared
    // with earlier tests' drops): let any earlier burst window pass first.
    let quiet = Duration::from_secs(5).saturating_sub(storm_started.elapsed());
    std::thread::sleep(quiet);
    let filled = Instant::now();
    lab.fill_table(200);
    let seen = wait_until(DETECTION_LIMIT + Duration::from_secs(5), || {
        daemon.log().contains("TableFull")
    });
    let latency = filled.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = dumps.join().unwrap();
    eprintln!(
        "storm of {STORM_RECORDS} records took {storm:?}; table full seen {latency:?} after \
         the fill began; {runs} table dumps ran meanwhile"
    );
    assert!(seen, "table full never seen:\n{}", daemon.log());
    assert!(latency < DETECTION_LIMIT, "seen only after {latency:?}");
    assert!(runs > 0);
    assert!(daemon.signal(libc::SIGTERM).success());
}

/// `ctguard run` in the lab under `setpriv` with the given bounding set (root's other
/// capabilities dropped, nothing inheritable, no new privileges).
fn run_with_capabilities(bounding: &str, lab: &LabNetns, policy: &Path, state: &Path) -> Daemon {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--bounding-set=-all,{bounding}"),
        "--inh-caps=-all",
        "--no-new-privs",
        "--",
        env!("CARGO_BIN_EXE_ctguard"),
        "run",
    ])
    .args(state_args(lab, policy, state));
    Daemon::start(&mut cmd, state.join("log"))
}

fn documented_capabilities() {
    let _globals = crate::lab::small_table();
    let lab = LabNetns::with_udp_timeout("caps", 3);
    let state = tempfile::tempdir().unwrap();
    let before = lab.snapshot();
    let policy = fast_policy();
    let mut daemon =
        run_with_capabilities("+net_admin,+syslog,+sys_admin", &lab, &policy, state.path());
    daemon.assert_started();
    lab.fill_table(2000);
    assert!(
        wait_until(Duration::from_secs(10), || read_global("nf_conntrack_max")
            > 4096
            && lab.sysctl(UDP) < before[UDP]),
        "{}",
        daemon.log()
    );
    assert!(!daemon.log().contains("kernel log unavailable"));
    drain(&lab);
    assert!(daemon.signal(libc::SIGTERM).success());
    assert_eq!(lab.snapshot(), before);
}

fn without_cap_sys_admin() {
    let lab = LabNetns::with_udp_timeout("nocap", 3);
    let state = tempfile::tempdir().unwrap();
    let policy = fast_policy();
    let mut daemon = run_with_capabilities("+net_admin,+syslog", &lab, &policy, state.path());
    let status = daemon
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running:\n{}", daemon.log()));
    assert!(!status.success());
    let log = daemon.log();
    assert!(log.contains(&lab.name), "{log}");
    assert!(log.contains("Operation not permitted"), "{log}");
}
