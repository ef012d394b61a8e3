//! Benchmark: `ctguard top`'s streamed dump + aggregation against the shell pipelines
//! admins use, on the same lab table in the same run, and its peak memory at a million
//! entries.
//!
//! Root only (without root it prints one line and exits 0). It makes a lab namespace with
//! the kernel tests' own helpers (`tests/kernel/lab.rs`: lo up, an nftables `ct state`
//! rule so tracking is active), raises the global `nf_conntrack_max` (restored on drop,
//! panics included) and fills the table with `ctguard::loadgen::fill_udp`. The lab's UDP
//! timeout is raised so entries outlive the run. Then, with 262,144 entries (each figure
//! the median of 5 runs, wall time with the user and system CPU time of that run):
//! - ours: open a `TableReader` inside the namespace, dump, aggregate;
//! - the kernel alone: the same ctnetlink dump received and framed but not parsed, the
//!   floor for any reader of one dump (the kernel formats the dump inside `recvmsg`);
//! - `conntrack -L | awk (dport) | sort | uniq -c | sort -rn` inside the namespace;
//! - `cat /proc/net/nf_conntrack | wc -l` inside the namespace;
//! - the `ctguard top --netns … --json` process, wall and peak RSS.
//!
//! Then it fills the table to 1,000,000 entries and reports the `ctguard top` process's
//! wall time and peak RSS (`ru_maxrss` from `wait4`). Targets: ≤ 0.25 s at 262,144 entries
//! and ≤ 16 MiB peak RSS at 1,000,000.

#[path = "../tests/kernel/lab.rs"]
mod lab;

use ctguard::observe::ctnetlink::NetlinkSocket;
use ctguard::observe::table::{DumpReplies, TableReader, table_dump_request};
use lab::{GlobalSysctl, LabNetns};
use std::fmt;
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

    let ours = median(Who::Ourselves, || {
        let table = ctguard::netns::run_in(&lab.path, || {
            TableReader::open().and_then(|mut reader| reader.read(10))
        })
        .unwrap()
        .expect("table dump");
        assert_eq!(table.total, SMALL, "entries in our dump");
    });
    let kernel_alone = median(Who::Ourselves, || {
        let entries = ctguard::netns::run_in(&lab.path, bare_dump)
            .unwrap()
            .expect("bare dump");
        assert_eq!(entries, SMALL, "entries in the bare dump");
    });
    let conntrack_tool = median(Who::Children, || {
        shell_in(
            &lab,
            "conntrack -L 2>/dev/null \
             | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^dport=/) {print $1, $i; break}}' \
             | sort | uniq -c | sort -rn > /dev/null",
        )
    });
    let cat_proc = median(Who::Children, || {
        shell_in(&lab, "cat /proc/net/nf_conntrack | wc -l > /dev/null")
    });
    let mut cli_rss = 0;
    let cli = median(Who::Children, || {
        cli_rss = cli_rss.max(top_process(&lab, SMALL));
    });
    println!(
        "table_dump: dump+aggregate {ours} (median of {RUNS}; target ≤ 0.250 s) | \
         kernel alone (same dump, not parsed) {kernel_alone} | \
         conntrack -L|awk|sort|uniq -c|sort -rn {conntrack_tool} ({:.1}x ours) | \
         cat /proc/net/nf_conntrack|wc -l {cat_proc} ({:.1}x ours)",
        conntrack_tool.wall / ours.wall,
        cat_proc.wall / ours.wall,
    );
    println!(
        "table_dump: ctguard top --netns --json process at {SMALL}: {cli}, peak RSS {:.1} MiB",
        cli_rss as f64 / 1024.0
    );

    fill(&lab, SMALL, LARGE - SMALL);
    let mut rss = 0;
    let large = measure(Who::Children, || rss = top_process(&lab, LARGE));
    println!(
        "table_dump: ctguard top --netns --json process at {LARGE}: {large}, peak RSS {:.1} MiB \
         (target ≤ 16 MiB)",
        rss as f64 / 1024.0
    );
}

/// One ctnetlink table dump of the calling thread's namespace, received and framed but
/// not parsed; returns the number of entries.
fn bare_dump() -> Result<u64, String> {
    let mut socket = NetlinkSocket::open_ctnetlink().map_err(|e| e.to_string())?;
    let sequence_number = socket.send(table_dump_request)?;
    let mut replies = DumpReplies::new(sequence_number);
    let mut room = vec![0; 64 * 1024];
    let mut entries = 0;
    while !replies.finished() {
        let size = socket.receive_into(&mut room).map_err(|e| e.to_string())?;
        replies.feed(&room[..size], |_| {
            entries += 1;
            Ok(())
        })?;
    }
    Ok(entries)
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

/// Whose CPU time a measurement counts: this process's (all its threads), or that of the
/// child processes it waited for.
#[derive(Clone, Copy)]
enum Who {
    Ourselves,
    Children,
}

/// Wall time and the CPU time spent in user space and in the kernel, in seconds.
#[derive(Clone, Copy)]
struct Sample {
    wall: f64,
    user: f64,
    system: f64,
}

impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.3} s (user {:.3} s, sys {:.3} s)",
            self.wall, self.user, self.system
        )
    }
}

/// CPU seconds so far (user, system) of `who`.
fn cpu_times(who: Who) -> (f64, f64) {
    let target = match who {
        Who::Ourselves => libc::RUSAGE_SELF,
        Who::Children => libc::RUSAGE_CHILDREN,
    };
    // SAFETY: rusage is plain data the kernel fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to our own rusage.
    let rc = unsafe { libc::getrusage(target, &mut usage) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (seconds(usage.ru_utime), seconds(usage.ru_stime))
}

/// Times one run of `run`.
fn measure(who: Who, run: impl FnOnce()) -> Sample {
    let (user, system) = cpu_times(who);
    let start = Instant::now();
    run();
    let wall = start.elapsed().as_secs_f64();
    let (user_after, system_after) = cpu_times(who);
    Sample {
        wall,
        user: user_after - user,
        system: system_after - system,
    }
}

/// The run of median wall time among `RUNS` runs.
fn median(who: Who, mut run: impl FnMut()) -> Sample {
    let mut samples: Vec<Sample> = (0..RUNS).map(|_| measure(who, &mut run)).collect();
    samples.sort_by(|a, b| a.wall.total_cmp(&b.wall));
    samples[RUNS / 2]
}

/// Runs a shell pipeline inside the lab.
fn shell_in(lab: &LabNetns, script: &str) {
    lab::run(&mut lab.exec(&["sh", "-c", script]));
}

/// Runs `ctguard top --netns LAB --json` and returns its peak RSS (KiB), checking that it
/// saw `expected` entries.
// The child is reaped by wait4, which Child cannot see.
#[allow(clippy::zombie_processes)]
fn top_process(lab: &LabNetns, expected: u64) -> i64 {
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
    assert_eq!(waited, pid, "wait4: {}", std::io::Error::last_os_error());
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "ctguard top failed (wait status {status:#x}): {errors}"
    );
    let report: serde_json::Value = serde_json::from_str(&output).expect("top --json");
    assert_eq!(report["total"], expected, "{output}");
    usage.ru_maxrss
}
