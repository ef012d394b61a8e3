//! `ctguard record` against the real kernel: a lab namespace whose table fills while it
//! records, and the trace replayed by `ctguard simulate`.

use crate::lab::{GlobalSysctl, LabNetns, run};
use ctguard::observe::KernelEvent;
use ctguard::simulate::trace::{TraceBody, parse_trace};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TESTS: &[(&str, fn())] = &[(
    "record_a_filling_namespace_then_simulate_it",
    record_a_filling_namespace_then_simulate_it,
)];

fn ctguard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ctguard"))
}

/// The background recorder, killed if the test fails before it exits.
struct Recording(Option<Child>);

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until the recorder has flushed its first lines (every source is open).
fn wait_until_started(trace: &Path, recording: &mut Recording) {
    let started = Instant::now();
    while std::fs::metadata(trace).map_or(true, |m| m.len() == 0) {
        let child = recording.0.as_mut().unwrap();
        if let Some(status) = child.try_wait().unwrap() {
            let out = recording.0.take().unwrap().wait_with_output().unwrap();
            panic!(
                "record exited early ({status}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "record wrote nothing within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn record_a_filling_namespace_then_simulate_it() {
    let _max = GlobalSysctl::set("nf_conntrack_max", 4096);
    let lab = LabNetns::new("record");
    let dir = tempfile::tempdir().unwrap();
    let trace_path = dir.path().join("fill.jsonl");
    let trace_arg = trace_path.to_str().unwrap();
    let child = ctguard()
        .args(["record", "--netns", &lab.name, "--duration", "4s"])
        .args(["--interval", "200ms", "--out", trace_arg])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ctguard record");
    let mut recording = Recording(Some(child));
    wait_until_started(&trace_path, &mut recording);

    lab.fill_table(2000);
    std::thread::sleep(Duration::from_secs(1));
    // The same flows again: those in the table are found, the rest dropped once more.
    lab.fill_table(2000);
    let out = recording.0.take().unwrap().wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "record failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("recorded ") && stdout.contains(trace_arg),
        "{stdout}"
    );

    let text = std::fs::read_to_string(&trace_path).unwrap();
    let trace = parse_trace(&text, trace_arg).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(trace.host.is_some(), "no host record:\n{text}");
    let samples: Vec<_> = trace
        .records
        .iter()
        .filter_map(|r| match &r.body {
            TraceBody::Sample(s) => Some(s),
            _ => None,
        })
        .collect();
    assert!(samples.len() >= 10, "{} samples:\n{text}", samples.len());
    assert!(
        samples.iter().any(|s| s.count == 4096 && s.max == 4096),
        "the full table was never sampled:\n{text}"
    );
    assert!(
        stdout.contains(&format!("recorded {} samples", samples.len())),
        "{stdout}"
    );
    for record in &trace.records {
        if let TraceBody::Event(KernelEvent::TableFull { netns: Some(inode) }) = record.body {
            assert_eq!(inode, lab.inode(), "another namespace's drop was kept");
        }
    }

    let replay = run(ctguard().args(["simulate", "--trace", trace_arg]));
    let timeline = String::from_utf8(replay.stdout).unwrap();
    assert!(
        timeline.contains("→ critical"),
        "the replay never reached critical:\n{timeline}"
    );
}
