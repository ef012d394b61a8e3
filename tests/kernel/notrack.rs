//! The NOTRACK actuator on the real kernel, in lab namespaces only: timed nftables elements
//! keep matching traffic out of the table and expire by themselves, removal restores
//! tracking, the probe catches a filter that drops untracked packets, and nothing outside
//! `inet ctguard` changes (other tables in the namespace, the host's ruleset).

use crate::lab::{LabNetns, run};
use ctguard::act::iptables::IptablesBackend;
use ctguard::act::nft::NftBackend;
use ctguard::act::notrack::{NotrackBackend, NotrackChange, PortKey, Proto};
use ctguard::act::probe::TcpProbe;
use ctguard::observe::modules::KernelModules;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

pub const TESTS: &[(&str, fn())] = &[
    (
        "notrack_nft_keeps_traffic_untracked_until_the_kernel_expires_it",
        nft_untracks_then_expires,
    ),
    (
        "notrack_probe_catches_a_filter_that_drops_untracked",
        probe_catches_untracked_drop,
    ),
    (
        "notrack_nft_install_repairs_an_edited_table_keeping_its_ports",
        install_repairs_edited_table,
    ),
    (
        "notrack_nft_remove_is_fine_once_the_table_is_gone",
        remove_without_the_table,
    ),
    (
        "notrack_iptables_legacy_fallback_adds_and_removes_only_its_rules",
        iptables_fallback,
    ),
];

const HOT_UDP: u16 = 5353;
const HOT_TCP: u16 = 8080;
/// Ports that are never NOTRACKed: the same traffic there shows what tracking costs.
const COLD_UDP: u16 = 5354;
const COLD_TCP: u16 = 8081;
const FLOWS: u64 = 200;
const CONNECTIONS: u64 = 30;
/// Entries a run of notracked traffic may still leave (none are expected).
const SLACK: u64 = 2;

const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);

/// The host's own ruleset, listed (never changed) from the initial namespace.
fn host_ruleset() -> String {
    String::from_utf8(run(Command::new("nft").args(["list", "ruleset"])).stdout).unwrap()
}

fn listing(lab: &LabNetns, what: &[&str]) -> String {
    let mut argv = vec!["nft"];
    argv.extend(what);
    String::from_utf8(run(&mut lab.exec(&argv)).stdout).unwrap()
}

/// A server namespace and a client namespace joined by a veth pair, so traffic reaches the
/// server the way remote clients' does (through `prerouting`, not loopback).
struct Pair {
    server: LabNetns,
    client: LabNetns,
    /// Bound in the server namespace; kept open so handshakes complete.
    _listeners: Vec<TcpListener>,
    _udp: Vec<UdpSocket>,
}

impl Pair {
    fn new() -> Pair {
        let server = LabNetns::new("ntsrv");
        let client = LabNetns::new("ntcli");
        run(&mut client.exec(&[
            "ip",
            "link",
            "add",
            "ctg0",
            "type",
            "veth",
            "peer",
            "name",
            "ctg0",
            "netns",
            &server.name,
        ]));
        for (lab, ip) in [(&client, CLIENT_IP), (&server, SERVER_IP)] {
            run(&mut lab.exec(&["ip", "addr", "add", &format!("{ip}/30"), "dev", "ctg0"]));
            run(&mut lab.exec(&["ip", "link", "set", "ctg0", "up"]));
        }
        let (listeners, udp) = ctguard::netns::run_in(&server.path, || {
            let listeners: Vec<TcpListener> = [HOT_TCP, COLD_TCP]
                .into_iter()
                .map(|port| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap())
                .collect();
            let udp: Vec<UdpSocket> = [HOT_UDP, COLD_UDP]
                .into_iter()
                .map(|port| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap())
                .collect();
            (listeners, udp)
        })
        .unwrap();
        let pair = Pair {
            server,
            client,
            _listeners: listeners,
            _udp: udp,
        };
        // The veth link may take a moment to come up.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pair.connects(SERVER_IP, COLD_TCP) {
            assert!(Instant::now() < deadline, "veth link never came up");
            std::thread::sleep(Duration::from_millis(100));
        }
        pair
    }

    fn connects(&self, ip: Ipv4Addr, port: u16) -> bool {
        ctguard::netns::run_in(&self.client.path, || {
            TcpStream::connect_timeout(&SocketAddr::from((ip, port)), Duration::from_secs(1))
                .is_ok()
        })
        .unwrap()
    }

    /// Entries the server's table gains from `FLOWS` UDP flows (distinct source ports) and
    /// `CONNECTIONS` TCP connections, sent from `from` to `ip`.
    fn entries_from(&self, from: &LabNetns, ip: Ipv4Addr, udp: u16, tcp: u16) -> u64 {
        let before = self.server.sysctl("nf_conntrack_count");
        ctguard::netns::run_in(&from.path, || {
            for _ in 0..FLOWS {
                let socket = UdpSocket::bind((IpAddr::from(Ipv4Addr::UNSPECIFIED), 0)).unwrap();
                socket.send_to(b"ctguard", (ip, udp)).unwrap();
            }
            for _ in 0..CONNECTIONS {
                let addr = SocketAddr::from((ip, tcp));
                TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                    .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
            }
        })
        .unwrap();
        // Let the last datagrams land before counting.
        std::thread::sleep(Duration::from_millis(100));
        self.server
            .sysctl("nf_conntrack_count")
            .saturating_sub(before)
    }

    /// Remote traffic (over the veth) plus local traffic (over loopback in the server).
    fn entries(&self, udp: u16, tcp: u16) -> (u64, u64) {
        (
            self.entries_from(&self.client, SERVER_IP, udp, tcp),
            self.entries_from(&self.server, Ipv4Addr::LOCALHOST, udp, tcp),
        )
    }
}

fn assert_untracked((remote, local): (u64, u64), what: &str) {
    assert!(
        remote <= SLACK && local <= SLACK,
        "{what}: {remote} remote and {local} loopback entries; expected ~0"
    );
}

fn assert_tracked((remote, local): (u64, u64), what: &str) {
    // Ephemeral source ports repeat now and then (200 random picks), merging two flows.
    let flows = (FLOWS + CONNECTIONS) * 9 / 10;
    assert!(
        remote >= flows && local >= flows,
        "{what}: {remote} remote and {local} loopback entries; expected at least {flows} each"
    );
}

fn nft_untracks_then_expires() {
    let host_before = host_ruleset();
    let pair = Pair::new();
    let lab_before = listing(&pair.server, &["list", "table", "inet", "lab"]);
    let mut nft = NftBackend::new(Some(pair.server.path.clone()));
    nft.install().unwrap();
    nft.install().unwrap(); // idempotent: no duplicated rules
    let state = nft.table().unwrap().expect("table installed");
    assert_eq!(state.mismatch, None, "a second install changed the table");

    let timeout = Duration::from_secs(5);
    nft.add_ports(Proto::Udp, &[HOT_UDP], timeout).unwrap();
    nft.add_ports(Proto::Tcp, &[HOT_TCP], timeout).unwrap();
    let listed = nft.list_ports().unwrap();
    let names: Vec<String> = listed.iter().map(|p| p.target.to_string()).collect();
    assert_eq!(names, ["tcp/8080", "udp/5353"]);
    for port in &listed {
        assert_eq!(port.timeout, Some(timeout), "{port:?}");
        assert!(port.expires.unwrap() <= timeout, "{port:?}");
    }

    let (hot, cold) = (
        pair.entries(HOT_UDP, HOT_TCP),
        pair.entries(COLD_UDP, COLD_TCP),
    );
    eprintln!("entries (remote, loopback): notracked ports {hot:?}, other ports {cold:?}");
    assert_untracked(hot, "notracked ports");
    assert_tracked(cold, "other ports");

    // Nobody refreshes: the kernel lifts the NOTRACK by itself.
    let deadline = Instant::now() + timeout + Duration::from_secs(5);
    while !nft.list_ports().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "elements did not expire");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_tracked(pair.entries(HOT_UDP, HOT_TCP), "after expiry");

    // A refresh restarts the timeout of a port that is still there.
    nft.add_ports(Proto::Udp, &[HOT_UDP], Duration::from_secs(2))
        .unwrap();
    nft.add_ports(Proto::Udp, &[HOT_UDP], Duration::from_secs(60))
        .unwrap();
    let refreshed = nft.list_ports().unwrap();
    assert_eq!(refreshed.len(), 1);
    assert!(refreshed[0].expires.unwrap() > Duration::from_secs(50));

    nft.remove_ports(Proto::Udp, &[HOT_UDP]).unwrap();
    nft.remove_ports(Proto::Udp, &[HOT_UDP]).unwrap(); // already gone: fine
    assert!(nft.list_ports().unwrap().is_empty());

    nft.remove_table().unwrap();
    nft.remove_table().unwrap(); // already gone: fine
    let tables = listing(&pair.server, &["list", "tables"]);
    assert!(!tables.contains("ctguard"), "{tables}");
    assert_eq!(nft.table().unwrap(), None);
    assert_eq!(
        listing(&pair.server, &["list", "table", "inet", "lab"]),
        lab_before,
        "the lab's own table changed"
    );
    drop(pair);
    assert_eq!(host_ruleset(), host_before, "the host's ruleset changed");
}

fn install_repairs_edited_table() {
    let lab = LabNetns::new("ntfix");
    let mut nft = NftBackend::new(Some(lab.path.clone()));
    nft.install().unwrap();
    nft.add_ports(Proto::Tcp, &[HOT_TCP], Duration::from_secs(60))
        .unwrap();
    // Someone edits ctguard's table: one of its rules goes, another appears.
    run(&mut lab.exec(&["nft", "flush", "chain", "inet", "ctguard", "prerouting"]));
    run(&mut lab.exec(&["nft", "add", "rule", "inet", "ctguard", "output", "counter"]));
    let edited = nft.table().unwrap().unwrap();
    assert!(edited.mismatch.is_some(), "{edited:?}");

    nft.install().unwrap();
    let repaired = nft.table().unwrap().unwrap();
    assert_eq!(repaired.mismatch, None);
    assert_eq!(repaired.ports.len(), 1);
    let kept = repaired.ports[0];
    assert_eq!(kept.target.to_string(), "tcp/8080");
    assert!(kept.expires.unwrap() > Duration::from_secs(50), "{kept:?}");
}

/// A firewall restart (`flush ruleset`) or a reboot takes ctguard's table with it: removing
/// an exemption that is gone with it is fine, so the journal can still be settled.
fn remove_without_the_table() {
    let lab = LabNetns::new("ntgone");
    let mut nft = NftBackend::new(Some(lab.path.clone()));
    nft.install().unwrap();
    nft.add_ports(Proto::Tcp, &[HOT_TCP], Duration::from_secs(60))
        .unwrap();
    run(&mut lab.exec(&["nft", "flush", "ruleset"]));
    nft.remove_ports(Proto::Tcp, &[HOT_TCP]).unwrap();
    assert_eq!(nft.table().unwrap(), None, "removal made a table");
}

/// The filter from the brief: drops untracked packets to the port.
const DROP_UNTRACKED: &str = "table inet lab2 {\n chain in {\n type filter hook input priority 0;\n tcp dport 8080 ct state untracked drop\n }\n}\n";

fn probe_catches_untracked_drop() {
    let host_before = host_ruleset();
    let lab = LabNetns::new("ntprobe");
    lab.nft(DROP_UNTRACKED);
    let _listener = ctguard::netns::run_in(&lab.path, || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, HOT_TCP)).unwrap()
    })
    .unwrap();
    let mut nft = NftBackend::new(Some(lab.path.clone()));
    nft.install().unwrap();
    let probe = TcpProbe::loopback(Some(lab.path.clone()), HOT_TCP);

    let around = probe
        .around(|| nft.add_ports(Proto::Tcp, &[HOT_TCP], Duration::from_secs(30)))
        .unwrap();
    around.outcome.unwrap();
    let seen = around.probe.unwrap();
    assert!(
        seen.answered_before,
        "the service did not answer to begin with"
    );
    assert!(seen.broke_service(), "{seen:?}");

    // The caller's revert: removing the port brings the service back.
    nft.remove(&[PortKey {
        proto: Proto::Tcp,
        port: HOT_TCP,
    }])
    .unwrap();
    assert!(
        probe.answers().unwrap(),
        "removing the port did not restore it"
    );
    nft.remove_table().unwrap();
    drop(lab);
    assert_eq!(host_ruleset(), host_before, "the host's ruleset changed");
}

/// Counts ctguard's tagged rules in one table of the namespace, for each family's legacy
/// tables (`iptables-legacy-save`, `ip6tables-legacy-save`).
pub fn tagged_rules(lab: &LabNetns, table: &str) -> [usize; 2] {
    ["iptables-legacy-save", "ip6tables-legacy-save"].map(|save| {
        let out = run(&mut lab.exec(&[save, "-t", table])).stdout;
        String::from_utf8(out)
            .unwrap()
            .lines()
            .filter(|l| l.contains("--comment ctguard"))
            .count()
    })
}

/// The legacy iptables backend for a lab, when using it loads no module here; otherwise
/// the refusal must say which module it would have loaded.
pub fn legacy_backend(lab: &LabNetns, accept_untracked: bool) -> Option<IptablesBackend> {
    let modules = KernelModules::read_host().unwrap();
    match IptablesBackend::for_host(Some(lab.path.clone()), &modules, accept_untracked) {
        Ok(backend) => Some(backend),
        Err(e) => {
            assert!(e.to_string().contains("never loads modules"), "{e}");
            println!(
                "legacy iptables would load a module here ({e}); only the refusal was checked"
            );
            None
        }
    }
}

fn iptables_fallback() {
    let host_before = host_ruleset();
    let lab = LabNetns::new("ntipt");
    let _udp = ctguard::netns::run_in(&lab.path, || {
        UdpSocket::bind((Ipv4Addr::LOCALHOST, HOT_UDP)).unwrap()
    })
    .unwrap();
    let flows = |port: u16| {
        let before = lab.sysctl("nf_conntrack_count");
        ctguard::netns::run_in(&lab.path, || {
            for _ in 0..FLOWS {
                let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
                socket
                    .send_to(b"ctguard", (Ipv4Addr::LOCALHOST, port))
                    .unwrap();
            }
        })
        .unwrap();
        lab.sysctl("nf_conntrack_count").saturating_sub(before)
    };
    let Some(mut ipt) = legacy_backend(&lab, true) else {
        return;
    };
    ipt.install().unwrap();
    let change = NotrackChange::new(Proto::Udp, HOT_UDP, Duration::from_secs(3)).unwrap();
    ipt.apply(&[change]).unwrap();
    ipt.apply(&[change]).unwrap(); // a refresh must not duplicate the rules
    assert_eq!(tagged_rules(&lab, "raw"), [3, 3]);
    assert_eq!(
        tagged_rules(&lab, "filter"),
        [1, 1],
        "UNTRACKED accept rules"
    );
    let untracked = flows(HOT_UDP);
    assert!(untracked <= SLACK, "{untracked} entries while notracked");

    ipt.remove(&[change.target()]).unwrap();
    ipt.remove(&[change.target()]).unwrap(); // already gone: fine
    assert_eq!(tagged_rules(&lab, "raw"), [0, 0]);
    assert_eq!(tagged_rules(&lab, "filter"), [0, 0]);
    let tracked = flows(HOT_UDP);
    assert!(tracked >= FLOWS * 9 / 10, "{tracked} entries after removal");
    drop(lab);
    assert_eq!(host_ruleset(), host_before, "the host's ruleset changed");
}
