//! Benchmark: `ctguard top`'s streamed dump + aggregation against the shell pipelines
//! admins use, on the same lab table in the same run, and its peak memory at a million
//! entries.
//!
//! Root only (without root it prints one line and exits 0). It makes a lab namespace with
//! the kernel tests' own helpers (`tests/kernel/lab.rs`: lo up, an nftables `ct state`
//! rule so tracking is active), raises the global `nf_conntrack_max` (restored on drop,
//! panics included) and fills the table with `ctguard::loadgen::fill_udp`. The lab's UDP
//! timeout is raised so entries outlive the run. Then, with 262,144 entries:
//! - ours: open a `TableReader` inside the namespace, dump, aggregate (median of 5);
//! - `conntrack -L | awk (dport) | sort | uniq -c | sort -rn` inside the namespace;
//! - `cat /proc/net/nf_conntrack | wc -l` inside the namespace;
//! - the `ctguard top --netns … --json` process, wall and peak RSS.
//!
//! Then it fills the table to 1,000,000 entries and reports the `ctguard top` process's
//! wall time and peak RSS (`ru_maxrss` from `wait4`). Targets: ≤ 0.25 s at 262,144 entries
//! and ≤ 16 MiB peak RSS at 1,000,000.

#[path = "../tests/kernel/lab.rs"]
mod lab;

use ctguard::observe::table::TableReader;
use lab::{GlobalSysctl, LabNetns};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SMALL: u64 = 262_144;
const LARGE: u64 = 1_000_000;
const RUNS: usize = 5;

fn main() {
    if let Some(why) = lab::unavailable_reason() {
        println!("table_dump benchmark skipped: {why}");
        return;
    }
    let _lock = lab::lock_host();
    // Declared before the lab so the namespace (and its million entries) goes first.
    let _max = (lab::read_global("nf_conntrack_max") < LARGE + 1024)
        .then(|| GlobalSysctl::set("nf_conntrack_max", LARGE + 1024));
    let lab = LabNetns::new("bench");
    ctguard::netns::run_in(&lab.path, || {
        std::fs::write("/proc/sys/net/netfilter/nf_conntrack_udp_timeout", "3600")
    })
    .unwrap()
    .expect("raising the lab's UDP timeout");

    fill(&lab, 0, SMALL);
    println!("table_dump: {SMALL} UDP entries in {}", lab.name);

    let ours = median(|| {
        let start = Instant::now();
        let table = ctguard::netns::run_in(&lab.path, || {
            TableReader::open().and_then(|mut reader| reader.read(10))
        })
        .unwrap()
        .expect("table dump");
        let elapsed = start.elapsed();
        assert_eq!(table.total, SMALL, "entries in our dump");
        elapsed
    });
    let conntrack_tool = median(|| {
        shell_in(
            &lab,
            "conntrack -L 2>/dev/null \
             | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^dport=/) {print $1, $i; break}}' \
             | sort | uniq -c | sort -rn > /dev/null",
        )
    });
    let cat_proc = median(|| shell_in(&lab, "cat /proc/net/nf_conntrack | wc -l > /dev/null"));
    let mut cli_rss = 0;
    let cli = median(|| {
        let (elapsed, rss) = top_process(&lab, SMALL);
        cli_rss = cli_rss.max(rss);
        elapsed
    });
    let seconds = |d: Duration| d.as_secs_f64();
    println!(
        "table_dump: dump+aggregate {:.3} s (median of {RUNS}; target ≤ 0.250 s) | \
         conntrack -L|awk|sort|uniq -c|sort -rn {:.3} s ({:.1}x ours) | \
         cat /proc/net/nf_conntrack|wc -l {:.3} s ({:.1}x ours)",
        seconds(ours),
        seconds(conntrack_tool),
        seconds(conntrack_tool) / seconds(ours),
        seconds(cat_proc),
        seconds(cat_proc) / seconds(ours),
    );
    println!(
        "table_dump: ctguard top --netns --json process at {SMALL}: {:.3} s, peak RSS {:.1} MiB",
        seconds(cli),
        cli_rss as f64 / 1024.0
    );

    fill(&lab, SMALL, LARGE - SMALL);
    let (elapsed, rss) = top_process(&lab, LARGE);
    println!(
        "table_dump: ctguard top --netns --json process at {LARGE}: {:.3} s, peak RSS {:.1} MiB \
         (target ≤ 16 MiB)",
        seconds(elapsed),
        rss as f64 / 1024.0
    );
}

/// Sends `count` new flows in the lab and checks that each made an entry.
fn fill(lab: &LabNetns, first_flow: u64, count: u64) {
    let before = lab.sysctl("nf_conntrack_count");
    let deadline = Instant::now() + Duration::from_secs(120);
    let report = ctguard::netns::run_in(&lab.path, || {
        ctguard::loadgen::fill_udp(first_flow, count, deadline)
    })
    .unwrap()
    .expect("loadgen");
    let after = lab.sysctl("nf_conntrack_count");
    assert_eq!(
        after - before,
        count,
        "entries made by {count} flows ({report:?})"
    );
}

/// The median of `RUNS` timings.
fn median(mut run: impl FnMut() -> Duration) -> Duration {
    let mut times: Vec<Duration> = (0..RUNS).map(|_| run()).collect();
    times.sort();
    times[RUNS / 2]
}

/// Runs a shell pipeline inside the lab and times it.
fn shell_in(lab: &LabNetns, script: &str) -> Duration {
    let start = Instant::now();
    lab::run(&mut lab.exec(&["sh", "-c", script]));
    start.elapsed()
}

/// Runs `ctguard top --netns LAB --json` and returns its wall time and peak RSS (KiB),
/// checking that it saw `expected` entries.
// The child is reaped by wait4, which Child cannot see.
#[allow(clippy::zombie_processes)]
fn top_process(lab: &LabNetns, expected: u64) -> (Duration, i64) {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .args(["top", "--netns", &lab.name, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ctguard top");
    let mut output = String::new();
    let mut errors = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut output)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut errors)
        .unwrap();
    // wait4 rather than Child::wait: it reports this child's own peak RSS.
    let mut status = 0;
    // SAFETY: rusage is plain data the kernel fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    // SAFETY: waits for our own child, with valid pointers.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let elapsed = start.elapsed();
    assert_eq!(waited, pid, "wait4: {}", std::io::Error::last_os_error());
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "ctguard top failed (wait status {status:#x}): {errors}"
    );
    let report: serde_json::Value = serde_json::from_str(&output).expect("top --json");
    assert_eq!(report["total"], expected, "{output}");
    (elapsed, usage.ru_maxrss)
}
