//! ctnetlink stats from a real, overfilled lab table: the socket is opened inside the
//! namespace and read from the test's own thread, and its counters agree with the
//! namespace's sysctl and with `conntrack -S`.

use crate::lab::{GlobalSysctl, LabNetns, read_global, run};
use ctguard::observe::ctnetlink::{CtnetlinkReading, CtnetlinkStats};

pub const TESTS: &[(&str, fn())] = &[("ctnetlink_reads_a_full_lab_table", reads_a_full_lab_table)];

/// Opens a ctnetlink source inside `lab` and reads it from the calling thread, twice:
/// nothing sends in the lab, so the second read on the same socket must agree.
fn read_in(lab: &LabNetns) -> CtnetlinkReading {
    let mut source = ctguard::netns::run_in(&lab.path, CtnetlinkStats::open)
        .unwrap()
        .unwrap_or_else(|e| panic!("open in {}: {e}", lab.name));
    let mut read = || {
        source
            .read()
            .unwrap_or_else(|e| panic!("read in {}: {e}", lab.name))
    };
    let first = read();
    assert_eq!(read(), first, "a second read on the same socket");
    first
}

fn reads_a_full_lab_table() {
    let _max = GlobalSysctl::set("nf_conntrack_max", 4096);
    let lab = LabNetns::new("ctnl");
    let idle = LabNetns::new("ctnl-idle");
    lab.fill_table(2000);

    let reading = read_in(&lab);
    println!("{reading:?}");
    assert_eq!(reading.global.max_entries, read_global("nf_conntrack_max"));
    assert_eq!(reading.global.entries, lab.sysctl("nf_conntrack_count"));
    assert_eq!(reading.global.entries, reading.global.max_entries);
    assert!(
        reading.total.drop + reading.total.early_drop > 0,
        "a full table must have dropped or evicted: {:?}",
        reading.total
    );
    assert!(!reading.per_cpu.is_empty());

    // The socket answers for its own namespace only.
    let other = read_in(&idle);
    assert_eq!(other.global.entries, 0);
    assert_eq!(other.total.drop + other.total.early_drop, 0);

    compare_with_conntrack_tool(&lab, &reading);
}

/// `conntrack -S` asks the kernel the same question through libnetfilter_conntrack;
/// nothing sends in the lab any more, so the counters must match exactly.
fn compare_with_conntrack_tool(lab: &LabNetns, reading: &CtnetlinkReading) {
    let tool_works = lab
        .exec(&["conntrack", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !tool_works {
        println!("conntrack is not installed: skipping the conntrack -S comparison");
        return;
    }
    let out = run(&mut lab.exec(&["conntrack", "-S"]));
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |line: &str, name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
            .parse()
            .unwrap()
    };
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("cpu=")).collect();
    assert_eq!(lines.len(), reading.per_cpu.len(), "{text}");
    for (line, cpu) in lines.iter().zip(&reading.per_cpu) {
        assert_eq!(field(line, "cpu"), u64::from(cpu.cpu), "{line}");
        assert_eq!(field(line, "drop"), cpu.counters.drop, "{line}");
        assert_eq!(field(line, "early_drop"), cpu.counters.early_drop, "{line}");
    }
    let tool_drop: u64 = lines.iter().map(|line| field(line, "drop")).sum();
    assert_eq!(tool_drop, reading.total.drop, "{text}");
}
