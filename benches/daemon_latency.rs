//! Benchmark: how fast the daemon answers the kernel, and what it costs at rest.
//!
//! Root only (without root it prints one line and exits 0). Holds the host-wide lab lock
//! throughout and hands it to the drills it runs (`CTGUARD_HOST_LOCK_FD`).
//!
//! - Latency: `CTGUARD_BENCH_RUNS` (default 20) drills with `--allow-global` and no
//!   baseline (`ctguard::drill::run`: a scratch namespace, the real `ctguard run`, a UDP
//!   burst that overfills a table of 8192): the time from the kernel's first table-full
//!   signal (the `/dev/kmsg` record, or the drop counter if it comes first) to the first
//!   changed sysctl, seen by a 1 ms watcher. Median and worst; targets ≤ 20 ms and
//!   ≤ 100 ms. Between drills it waits out the kernel's message rate limit
//!   (`net.core.message_cost`) so that each drill's table-full record is printed.
//! - Idle cost: `ctguard run` on an empty lab namespace with the default policy polling
//!   every second, for `CTGUARD_BENCH_IDLE_SECS` (default 60): CPU time from
//!   `/proc/PID/stat` (utime + stime) scaled to CPU seconds per hour, and VmRSS/VmHWM.

#[path = "../tests/kernel/lab.rs"]
mod lab;

use ctguard::drill::{DrillOptions, HOST_LOCK_FD_ENV, Scenario};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

fn main() {
    if let Some(why) = lab::unavailable_reason() {
        println!("daemon_latency benchmark skipped: {why}");
        return;
    }
    let lock = lab::lock_host();
    // SAFETY: set before any thread is started.
    unsafe { std::env::set_var(HOST_LOCK_FD_ENV, lock.as_raw_fd().to_string()) };
    latency(env_number("CTGUARD_BENCH_RUNS", 20) as usize);
    idle_cost(env_number("CTGUARD_BENCH_IDLE_SECS", 60));
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn latency(runs: usize) {
    let options = DrillOptions {
        policy: None,
        scenario: Scenario::UdpFlood,
        allow_global: true,
        keep_going: true,
        baseline: false,
        exe: env!("CARGO_BIN_EXE_ctguard").into(),
    };
    let cost = std::fs::read_to_string("/proc/sys/net/core/message_cost")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(5);
    let mut latencies = Vec::new();
    for run in 1..=runs {
        std::thread::sleep(Duration::from_secs(cost) + Duration::from_millis(500));
        let report = ctguard::drill::run(&options).expect("drill");
        assert!(report.rollback_exact, "{}", report.human());
        let by = match (report.first_table_full_ms, report.first_drop_counter_ms) {
            (Some(kmsg), Some(counter)) if kmsg <= counter => "kmsg",
            (Some(_), None) => "kmsg",
            (_, Some(_)) => "drop counter",
            _ => "nothing",
        };
        println!(
            "daemon_latency: run {run}/{runs}: signal ({by}) → change {} ms; \
             table-full record at {:?} ms, drop counter at {:?} ms, change at {:?} ms; \
             daemon log: kernel event → change {:?} ms",
            report
                .first_signal_to_change_ms
                .map_or("–".into(), |v| format!("{v:.1}")),
            report.first_table_full_ms,
            report.first_drop_counter_ms,
            report.first_change_ms,
            report.daemon_kernel_event_to_change_ms,
        );
        if let Some(ms) = report.first_signal_to_change_ms {
            latencies.push(ms);
        }
    }
    latencies.sort_by(f64::total_cmp);
    let Some(&worst) = latencies.last() else {
        println!("daemon_latency: no run produced a signal and a change");
        return;
    };
    println!(
        "daemon_latency: first kernel signal → first change: median {:.1} ms, worst {worst:.1} ms \
         over {} runs (targets ≤ 20 ms, ≤ 100 ms)",
        latencies[latencies.len() / 2],
        latencies.len()
    );
}

fn idle_cost(seconds: u64) {
    let lab = lab::LabNetns::new("idle");
    let state = tempfile::tempdir().unwrap();
    let policy = state.path().join("policy.toml");
    let default = include_str!("../policies/default.toml");
    assert!(default.contains("at_rest = \"5s\""));
    std::fs::write(
        &policy,
        default.replace("at_rest = \"5s\"", "at_rest = \"1s\""),
    )
    .unwrap();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .args(["run", "--netns", &lab.name, "--policy"])
        .arg(&policy)
        .arg("--state-dir")
        .arg(state.path().join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ctguard run");
    let pid = daemon.id();
    // Start-up (policy, journal, first sample) is not idle cost.
    std::thread::sleep(Duration::from_secs(2));
    let start = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(seconds));
    let ticks = cpu_ticks(pid) - start;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_seconds = ticks as f64 / per_second;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map_or("?".to_string(), |l| l[name.len()..].trim().to_string())
    };
    println!(
        "daemon_latency: idle at 1 s polling for {seconds} s: {cpu_seconds:.2} CPU s \
         ({:.1} CPU s per hour), VmRSS {}, VmHWM {}",
        cpu_seconds / seconds as f64 * 3600.0,
        field("VmRSS:"),
        field("VmHWM:"),
    );
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at its closing ')'.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}
