//! The NOTRACK stage of `ctguard run` on the real kernel: hot local ports found from the
//! live table are exempted in ctguard's own nftables table (never a NAT'd port), the count
//! stops growing, the kernel expires the exemptions by itself when ctguard is gone, and a
//! service that a stateful filter breaks once untracked is restored at once.

use crate::lab::{Daemon, GlobalSysctl, LabNetns, run, tcp_flows_to, udp_flows, wait_until};
use ctguard::act::nft::NftBackend;
use ctguard::act::notrack::{PortKey, Proto};
use ctguard::act::probe::TcpProbe;
use ctguard::netns::run_in;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const TESTS: &[(&str, fn())] = &[
    (
        "daemon_notracks_hot_local_ports_never_nat_and_the_kernel_expires_them",
        notracks_hot_ports,
    ),
    (
        "daemon_reverts_notrack_when_the_probe_fails",
        probe_failure_reverts,
    ),
];

fn policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/daemon/notrack-lab.toml")
}

fn start(lab: &LabNetns, state: &Path) -> Daemon {
    let policy = policy();
    let daemon = Daemon::run(
        &[
            "--netns",
            &lab.name,
            "--policy",
            policy.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ],
        state.join("log"),
    );
    assert!(daemon.wait_for_log("ctguard starting", Duration::from_secs(5)));
    daemon
}

fn notracked(lab: &LabNetns) -> Vec<PortKey> {
    NftBackend::new(Some(lab.path.clone()))
        .list_ports()
        .unwrap()
        .into_iter()
        .map(|p| p.target)
        .collect()
}

fn listing(lab: &LabNetns, table: &[&str]) -> String {
    let mut argv = vec!["nft", "list", "table"];
    argv.extend_from_slice(table);
    String::from_utf8(run(&mut lab.exec(&argv)).stdout).unwrap()
}

fn notracks_hot_ports() {
    let _max = GlobalSysctl::set("nf_conntrack_max", 8192);
    let lab = LabNetns::new("nt");
    lab.nft(
        "table ip nat {\n chain out {\n type nat hook output priority -100;\n udp dport 9999 dnat to 127.0.0.1:7777\n }\n}\n",
    );
    let lab_rules = listing(&lab, &["inet", "lab"]);
    let nat_rules = listing(&lab, &["ip", "nat"]);
    let state = tempfile::tempdir().unwrap();
    let mut daemon = start(&lab, state.path());

    let (listener, _connections) = run_in(&lab.path, || {
        udp_flows(20_000, 3000, 5353);
        udp_flows(30_000, 400, 9999);
        let listener = TcpListener::bind(("127.0.0.1", 8080)).unwrap();
        let flows = tcp_flows_to(&listener, 1000);
        (listener, flows)
    })
    .unwrap();
    let dns = PortKey {
        proto: Proto::Udp,
        port: 5353,
    };
    let web = PortKey {
        proto: Proto::Tcp,
        port: 8080,
    };
    assert!(
        wait_until(Duration::from_secs(20), || {
            let ports = notracked(&lab);
            ports.contains(&dns) && ports.contains(&web)
        }),
        "hot ports not exempted: {:?}\n{}",
        notracked(&lab),
        daemon.log()
    );
    let ports = notracked(&lab);
    assert!(
        ports.iter().all(|p| p.port != 9999 && p.port != 7777),
        "a NAT'd port was exempted: {ports:?}"
    );

    // New flows to the exempted ports are not tracked: the count stops growing.
    let before = lab.sysctl("nf_conntrack_count");
    let _more = run_in(&lab.path, || {
        udp_flows(40_000, 500, 5353);
        tcp_flows_to(&listener, 100)
    })
    .unwrap();
    let after = lab.sysctl("nf_conntrack_count");
    assert!(after <= before + 2, "count grew from {before} to {after}");

    // ctguard dies: the kernel expires the exemptions by itself (4 s here).
    daemon.signal(libc::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(10), || notracked(&lab).is_empty()),
        "exemptions did not expire: {:?}",
        notracked(&lab)
    );

    // Rollback settles the journal and removes ctguard's table; nothing else is touched.
    let out = run(Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .args(["rollback", "--all", "--state-dir"])
        .arg(state.path()));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("NOTRACK table removed"), "{said}");
    assert!(
        NftBackend::new(Some(lab.path.clone()))
            .table()
            .unwrap()
            .is_none()
    );
    assert_eq!(listing(&lab, &["inet", "lab"]), lab_rules);
    assert_eq!(listing(&lab, &["ip", "nat"]), nat_rules);
}

fn probe_failure_reverts() {
    let _max = GlobalSysctl::set("nf_conntrack_max", 2048);
    let lab = LabNetns::new("ntprobe");
    // A stateful filter like seed 000's: untracked packets to the service are dropped.
    lab.nft(
        "table inet lab2 {\n chain in {\n type filter hook input priority 0;\n tcp dport 8080 ct state untracked drop\n }\n}\n",
    );
    let state = tempfile::tempdir().unwrap();
    let mut daemon = start(&lab, state.path());
    // The service keeps listening (and answering the probe) throughout.
    let _service = run_in(&lab.path, || {
        let listener = TcpListener::bind(("127.0.0.1", 8080)).unwrap();
        let flows = tcp_flows_to(&listener, 1000);
        (listener, flows)
    })
    .unwrap();
    assert!(
        daemon.wait_for_log("stopped answering", Duration::from_secs(30)),
        "{}",
        daemon.log()
    );
    assert!(daemon.signal(libc::SIGTERM).success());

    let journal: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.path().join("journal.json")).unwrap()).unwrap();
    let reverted = journal["notrack"].as_array().unwrap().iter().any(|e| {
        e["change"]["port"] == 8080
            && e["state"] == "reverted"
            && e["note"]
                .as_str()
                .unwrap_or("")
                .contains("stopped answering")
    });
    assert!(reverted, "{journal:#}");
    assert!(notracked(&lab).is_empty());
    assert!(
        TcpProbe::loopback(Some(lab.path.clone()), 8080)
            .answers()
            .unwrap()
    );
}
