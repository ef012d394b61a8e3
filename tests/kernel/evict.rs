//! Eviction on a real lab table: dead entries (unreplied UDP, TCP in TIME_WAIT) go in
//! batches of the requested size; assured ESTABLISHED connections and NAT'd flows stay;
//! an entry whose tuple was reused after selection is not hit.

use crate::lab::{LabNetns, run, tcp_flows, tcp_flows_to, udp_flows, wait_until};
use ctguard::act::evict::{Criteria, EvictReport, Evictor};
use ctguard::netns::run_in;
use ctguard::observe::table::TableReader;
use ctguard::policy::EvictState;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

pub const TESTS: &[(&str, fn())] = &[
    (
        "evict_deletes_dead_entries_in_batches_and_spares_established",
        deletes_dead_entries_in_batches_and_spares_established,
    ),
    ("evict_spares_a_reused_tuple", spares_a_reused_tuple),
];

const UDP_FLOWS: u16 = 2000;
const NAT_FLOWS: u16 = 50;
const TIME_WAIT_FLOWS: u16 = 200;
const ESTABLISHED_FLOWS: u16 = 100;

/// Long per-namespace timeouts, so nothing expires on its own while the test runs.
fn slow_expiry(lab: &LabNetns) {
    run_in(&lab.path, || {
        for file in [
            "nf_conntrack_udp_timeout",
            "nf_conntrack_tcp_timeout_time_wait",
        ] {
            let path = format!("/proc/sys/net/netfilter/{file}");
            std::fs::write(&path, "600").unwrap_or_else(|e| panic!("{path}: {e}"));
        }
    })
    .unwrap();
}

/// Entries per TCP state name, from the table analysis.
fn tcp_state(lab: &LabNetns, state: &str) -> u64 {
    let table = run_in(&lab.path, || TableReader::open().unwrap().read(0).unwrap()).unwrap();
    table
        .tcp_states
        .iter()
        .find(|s| s.state == state)
        .map_or(0, |s| s.entries)
}

fn dead(min_age_secs: u64) -> Criteria {
    Criteria {
        states: vec![EvictState::Unreplied, EvictState::TimeWait],
        min_age: Duration::from_secs(min_age_secs),
    }
}

fn deletes_dead_entries_in_batches_and_spares_established() {
    let lab = LabNetns::new("evict");
    slow_expiry(&lab);
    lab.nft(
        "table ip nat {\n chain out {\n type nat hook output priority -100;\n udp dport 9999 dnat to 127.0.0.1:7777\n }\n}\n",
    );
    let mut established = run_in(&lab.path, || {
        udp_flows(20_000, UDP_FLOWS, 5353);
        udp_flows(30_000, NAT_FLOWS, 9999);
        // Closed client first, then the server: both FINs seen, the entry sits in TIME_WAIT.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 8081)).unwrap();
        for (client, mut server) in tcp_flows_to(&listener, TIME_WAIT_FLOWS) {
            drop(client);
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).unwrap();
        }
        tcp_flows(ESTABLISHED_FLOWS)
    })
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || tcp_state(&lab, "TIME_WAIT")
            == u64::from(TIME_WAIT_FLOWS)),
        "expected {TIME_WAIT_FLOWS} entries in TIME_WAIT, found {}",
        tcp_state(&lab, "TIME_WAIT")
    );
    let live = u64::from(NAT_FLOWS + ESTABLISHED_FLOWS);
    let dead_entries = u64::from(UDP_FLOWS + TIME_WAIT_FLOWS);
    let total = live + dead_entries;
    assert_eq!(lab.sysctl("nf_conntrack_count"), total);

    let mut evictor = Evictor::open_in(Some(&lab.path)).unwrap();
    // Everything is about a second old: nothing is a minute idle yet.
    let young = evictor.evict(&dead(60), 1000).unwrap();
    println!("min_age 60s: {young}");
    let expected = EvictReport {
        examined: total,
        too_young: dead_entries,
        skipped_nat: u64::from(NAT_FLOWS),
        skipped_assured: u64::from(ESTABLISHED_FLOWS),
        ..EvictReport::default()
    };
    assert_eq!(young, expected);

    let mut left = dead_entries;
    for batch_number in 1.. {
        let started = Instant::now();
        let report = evictor.evict(&dead(0), 1000).unwrap();
        println!("round {batch_number} ({:?}): {report}", started.elapsed());
        let expected = EvictReport {
            examined: live + left,
            matched: left,
            skipped_nat: u64::from(NAT_FLOWS),
            skipped_assured: u64::from(ESTABLISHED_FLOWS),
            deleted: left.min(1000),
            ..EvictReport::default()
        };
        assert_eq!(report, expected);
        left -= report.deleted;
        assert_eq!(lab.sysctl("nf_conntrack_count"), live + left);
        if report.deleted == 0 {
            break;
        }
    }
    assert_eq!(left, 0);

    assert_eq!(tcp_state(&lab, "ESTABLISHED"), u64::from(ESTABLISHED_FLOWS));
    compare_with_conntrack_tool(&lab);
    // The spared connections still carry data.
    for (client, server) in &mut established {
        client.write_all(b"still here").unwrap();
        let mut echo = [0u8; 10];
        server.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"still here");
    }
}

/// `conntrack -L` sees the same survivors.
fn compare_with_conntrack_tool(lab: &LabNetns) {
    let tool_works = lab
        .exec(&["conntrack", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !tool_works {
        println!("conntrack is not installed: skipping the conntrack -L comparison");
        return;
    }
    let list = |args: &[&str]| {
        let mut argv = vec!["conntrack", "-L"];
        argv.extend(args);
        let out = run(&mut lab.exec(&argv));
        String::from_utf8_lossy(&out.stdout).lines().count() as u64
    };
    assert_eq!(
        list(&["-p", "tcp", "--state", "ESTABLISHED"]),
        u64::from(ESTABLISHED_FLOWS)
    );
    assert_eq!(list(&["-p", "tcp", "--state", "TIME_WAIT"]), 0);
    assert_eq!(list(&["-p", "udp"]), u64::from(NAT_FLOWS));
}

/// A victim whose tuple a new entry took since the selection is left alone, even when
/// the kernel gives the new entry the old one's id (it hashes the entry's address, and
/// the freed slot is often reused at once).
fn spares_a_reused_tuple() {
    let lab = LabNetns::new("evict-id");
    slow_expiry(&lab);
    let socket = run_in(&lab.path, || {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 40001)).unwrap();
        socket.send_to(b"one", (Ipv4Addr::LOCALHOST, 5353)).unwrap();
        socket
    })
    .unwrap();
    let mut evictor = Evictor::open_in(Some(&lab.path)).unwrap();
    let mut selection = evictor.select(&dead(2), 10).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || {
            selection = evictor.select(&dead(2), 10).unwrap();
            selection.victims.len() == 1
        }),
        "the flow never reached 2 s of age: {}",
        selection.report
    );
    assert_eq!(
        lab.sysctl("nf_conntrack_count"),
        1,
        "selecting deletes nothing"
    );

    let first = evictor.delete(selection.clone()).unwrap();
    assert_eq!((first.deleted, first.already_gone), (1, 0));
    assert_eq!(lab.sysctl("nf_conntrack_count"), 0);
    let gone = evictor.delete(selection.clone()).unwrap();
    assert_eq!((gone.deleted, gone.already_gone), (0, 1));

    // The same tuple again: a new, young entry, which the old selection must miss.
    socket.send_to(b"two", (Ipv4Addr::LOCALHOST, 5353)).unwrap();
    assert_eq!(lab.sysctl("nf_conntrack_count"), 1);
    let reborn = evictor.select(&dead(0), 10).unwrap();
    println!(
        "old id {}, new id {} (same slot reused: {})",
        selection.victims[0].id,
        reborn.victims[0].id,
        selection.victims[0].id == reborn.victims[0].id
    );
    let again = evictor.delete(selection).unwrap();
    assert_eq!(
        (again.deleted, again.already_gone, again.revived),
        (0, 0, 1)
    );
    assert_eq!(lab.sysctl("nf_conntrack_count"), 1);
}
