//! The NOTRACK stage of `ctguard run` on the real kernel: hot local ports found from the
//! live table are exempted in ctguard's own nftables table (never a NAT'd port), the count
//! stops growing, the kernel expires the exemptions by itself when ctguard is gone, and a
//! service that a stateful filter breaks once untracked is restored at once. Where the
//! kernel has no nf_tables (played with a fixture of the kernel's module lists), the same
//! happens through legacy iptables rules, which ctguard removes itself when they expire.

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
    (
        "daemon_counts_a_previous_runs_notrack_against_max_ports",
        restart_keeps_max_ports,
    ),
    (
        "daemon_falls_back_to_legacy_iptables_where_nf_tables_is_missing",
        iptables_fallback,
    ),
];

fn policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/daemon/notrack-lab.toml")
}

fn start(lab: &LabNetns, state: &Path) -> Daemon {
    start_with(lab, state, &policy())
}

fn start_with(lab: &LabNetns, state: &Path, policy: &Path) -> Daemon {
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
    daemon.assert_started();
    daemon
}

/// A run killed with an exemption in force, then a new hot port after the restart: the
/// exemption still counts against `max_ports` (1 here), so no second port is added.
fn restart_keeps_max_ports() {
    let _max = GlobalSysctl::set("nf_conntrack_max", 8192);
    let lab = LabNetns::new("ntmax");
    let state = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(policy())
        .unwrap()
        .replace("max_ports = 4", "max_ports = 1")
        .replace("expiry = \"4s\"", "expiry = \"60s\"")
        .replace("allow = [5353,", "allow = [5353, 5354,");
    let policy = state.path().join("policy.toml");
    std::fs::write(&policy, text).unwrap();
    let dns = PortKey {
        proto: Proto::Udp,
        port: 5353,
    };

    let mut daemon = start_with(&lab, state.path(), &policy);
    run_in(&lab.path, || udp_flows(20_000, 3400, 5353)).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || notracked(&lab) == [dns]),
        "hot port not exempted: {:?}\n{}",
        notracked(&lab),
        daemon.log()
    );
    daemon.signal(libc::SIGKILL);

    // Another port gets hotter while 5353 is still exempted.
    run_in(&lab.path, || udp_flows(30_000, 4600, 5354)).unwrap();
    let daemon = start_with(&lab, state.path(), &policy);
    let too_many = wait_until(Duration::from_secs(10), || notracked(&lab).len() > 1);
    assert!(
        !too_many,
        "more than max_ports exempted: {:?}\n{}",
        notracked(&lab),
        daemon.log()
    );
    assert_eq!(notracked(&lab), [dns]);
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

    // The health probe's result is kept with the incident.
    let incidents = state.path().join("incidents");
    let probe_noted = || {
        std::fs::read_dir(&incidents).is_ok_and(|dir| {
            dir.flatten().any(|f| {
                std::fs::read_to_string(f.path()).is_ok_and(|t| {
                    t.contains(
                        "probe: tcp/8080 answered a local connect to 127.0.0.1:8080 before and after NOTRACK",
                    )
                })
            })
        })
    };
    assert!(
        wait_until(Duration::from_secs(10), probe_noted),
        "no probe result in the incident record\n{}",
        daemon.log()
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
    // The service keeps listening (and answering the probe) throughout. It listens on
    // one address only, not 127.0.0.1: the probe finds it in the socket table.
    let _service = run_in(&lab.path, || {
        let listener = TcpListener::bind(("127.0.0.2", 8080)).unwrap();
        let flows = tcp_flows_to(&listener, 1000);
        (listener, flows)
    })
    .unwrap();
    assert!(
        daemon.wait_for_log(
            "stopped answering at 127.0.0.2:8080",
            Duration::from_secs(30)
        ),
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
    let probe = TcpProbe::service(Some(lab.path.clone()), 8080);
    assert_eq!(probe.addr.to_string(), "127.0.0.2:8080");
    assert!(probe.answers().unwrap());
}

/// Module lists of a kernel whose nf_tables is installed but not loaded: ctguard must not
/// load it, so it falls back to iptables.
fn kernel_without_nf_tables(dir: &Path) -> PathBuf {
    let root = dir.join("kernel");
    std::fs::create_dir_all(root.join("proc/sys/kernel")).unwrap();
    std::fs::create_dir_all(root.join("lib/modules/fixture")).unwrap();
    std::fs::write(root.join("proc/sys/kernel/osrelease"), "fixture\n").unwrap();
    std::fs::write(root.join("proc/modules"), "").unwrap();
    std::fs::write(
        root.join("lib/modules/fixture/modules.dep"),
        "kernel/net/netfilter/nf_tables.ko:\nkernel/net/netfilter/nft_ct.ko: kernel/net/netfilter/nf_tables.ko\n",
    )
    .unwrap();
    root
}

fn iptables_fallback() {
    let _max = GlobalSysctl::set("nf_conntrack_max", 8192);
    let lab = LabNetns::new("ntlegacy");
    if crate::notrack::legacy_backend(&lab, true).is_none() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let policy = state.path().join("policy.toml");
    let text = std::fs::read_to_string(self::policy()).unwrap();
    std::fs::write(
        &policy,
        text.replace(
            "expiry = \"4s\"",
            "expiry = \"4s\"\naccept_untracked = true",
        ),
    )
    .unwrap();
    let modules = kernel_without_nf_tables(state.path());
    let ctguard = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ctguard"));
        cmd.env("CTGUARD_MODULES_ROOT", &modules);
        cmd
    };
    let mut daemon = Daemon::start(
        ctguard()
            .arg("run")
            .args(crate::lab::state_args(&lab, &policy, state.path())),
        state.path().join("log"),
    );
    assert!(
        daemon.wait_for_log("iptables fallback", Duration::from_secs(5)),
        "{}",
        daemon.log()
    );
    let rules = |table| crate::notrack::tagged_rules(&lab, table);
    let flood = |first: u16| run_in(&lab.path, || udp_flows(first, 4000, 5353)).unwrap();

    // A hot UDP port: exempted with legacy rules in both families, plus the accept rules.
    flood(20_000);
    assert!(
        wait_until(Duration::from_secs(20), || rules("raw") == [3, 3]),
        "no NOTRACK rules: {:?}\n{}",
        rules("raw"),
        daemon.log()
    );
    assert_eq!(rules("filter"), [1, 1], "UNTRACKED accept rules");
    let before = lab.sysctl("nf_conntrack_count");
    run_in(&lab.path, || udp_flows(40_000, 500, 5353)).unwrap();
    let after = lab.sysctl("nf_conntrack_count");
    assert!(after <= before + 2, "count grew from {before} to {after}");
    // nftables was never touched.
    assert!(
        !run(&mut lab.exec(&["nft", "list", "tables"]))
            .stdout
            .windows(7)
            .any(|w| w == b"ctguard")
    );

    // The flood ends: ctguard removes the rules itself (on recovery, or once the 4 s expiry
    // passes without a renewal; iptables cannot expire them).
    assert!(
        wait_until(Duration::from_secs(60), || rules("raw") == [0, 0]),
        "rules not removed after expiry: {:?}\n{}",
        rules("raw"),
        daemon.log()
    );
    assert_eq!(rules("filter"), [0, 0]);
    assert!(
        daemon
            .log()
            .contains("NOTRACK expired without a renewal: removed")
    );

    // Again, and ctguard dies: the rules stay (nothing expires them) until rollback.
    flood(50_000);
    assert!(
        wait_until(Duration::from_secs(20), || rules("raw") == [3, 3]),
        "no NOTRACK rules the second time\n{}",
        daemon.log()
    );
    daemon.signal(libc::SIGKILL);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        rules("raw"),
        [3, 3],
        "iptables rules cannot expire by themselves"
    );
    let out = run(ctguard()
        .args(["rollback", "--all", "--state-dir"])
        .arg(state.path()));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("NOTRACK removed"), "{said}");
    assert_eq!(rules("raw"), [0, 0], "{said}");
    assert_eq!(rules("filter"), [0, 0], "{said}");
}
