//! `ctguard top` on a real lab table: a hot UDP port, a hot TCP port and a DNAT'd port,
//! each with a known number of flows, read by the built binary with `--netns`.

use crate::lab::{LabNetns, run, tcp_flows, udp_flows};
use ctguard::netns::run_in;
use serde_json::Value;
use std::process::Command;

pub const TESTS: &[(&str, fn())] = &[
    (
        "table_top_shows_hot_ports_and_refuses_nat",
        top_shows_hot_ports_and_refuses_nat,
    ),
    (
        "table_top_refuses_a_port_snat_replies_arrive_on",
        top_refuses_a_port_snat_replies_arrive_on,
    ),
];

const UDP_FLOWS: u16 = 3000;
const TCP_FLOWS: u16 = 1000;
const NAT_FLOWS: u16 = 400;

fn top_json(lab: &LabNetns, extra: &[&str]) -> Value {
    let out = run(Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .args(["top", "--netns", &lab.name, "--json"])
        .args(extra));
    serde_json::from_slice(&out.stdout).expect("top --json prints one JSON object")
}

fn top_shows_hot_ports_and_refuses_nat() {
    let lab = LabNetns::new("table");
    lab.nft(
        "table ip nat {\n chain out {\n type nat hook output priority -100;\n udp dport 9999 dnat to 127.0.0.1:7777\n }\n}\n",
    );
    let _connections = run_in(&lab.path, || {
        udp_flows(20_000, UDP_FLOWS, 5353);
        udp_flows(30_000, NAT_FLOWS, 9999);
        tcp_flows(TCP_FLOWS)
    })
    .unwrap();

    let report = top_json(&lab, &[]);
    println!("{report}");
    let total = u64::from(UDP_FLOWS + TCP_FLOWS + NAT_FLOWS);
    assert_eq!(report["total"], total);
    assert_eq!(lab.sysctl("nf_conntrack_count"), total);
    let ports = report["ports"].as_array().unwrap();
    let row = |i: usize| {
        let p = &ports[i];
        (
            p["proto"].as_str().unwrap().to_string(),
            p["port"].as_u64().unwrap(),
            p["entries"].as_u64().unwrap(),
            p["eligible"].as_bool().unwrap(),
        )
    };
    assert_eq!(row(0), ("udp".into(), 5353, u64::from(UDP_FLOWS), true));
    assert_eq!(row(1), ("tcp".into(), 8080, u64::from(TCP_FLOWS), true));
    assert_eq!(row(2), ("udp".into(), 9999, u64::from(NAT_FLOWS), false));
    let reason = ports[2]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("{NAT_FLOWS} flows are NAT'd")),
        "{reason}"
    );
    assert_eq!(ports.len(), 3, "no other port has entries");
    let established = report["tcp_states"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["state"] == "ESTABLISHED")
        .expect("ESTABLISHED in tcp_states");
    assert_eq!(established["entries"], u64::from(TCP_FLOWS));

    compare_with_conntrack_tool(&lab, ports);

    // Judged by a policy's rules instead: web-server.toml allows only 80 and 443.
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/policies/web-server.toml");
    let judged = top_json(&lab, &["--policy", policy]);
    assert_eq!(judged["eligibility"]["source"], policy);
    assert_eq!(judged["eligibility"]["allow"], serde_json::json!([80, 443]));
    let hot = &judged["ports"][0];
    assert_eq!(
        (&hot["port"], &hot["eligible"]),
        (&5353.into(), &false.into())
    );
    assert_eq!(hot["reason"], "port 5353/udp: not on the allow list");
}

/// A hot local port that one SNAT'd flow's replies are addressed to: NOTRACK there would
/// untrack those replies before they are translated back, so the port is refused.
fn top_refuses_a_port_snat_replies_arrive_on() {
    let lab = LabNetns::new("tablesnat");
    lab.nft(
        "table ip nat {\n chain post {\n type nat hook postrouting priority 100;\n udp dport 9998 snat to 127.0.0.1:5353\n }\n}\n",
    );
    run_in(&lab.path, || {
        udp_flows(20_000, UDP_FLOWS, 5353);
        udp_flows(31_000, 1, 9998);
    })
    .unwrap();

    let report = top_json(&lab, &[]);
    println!("{report}");
    let hot = report["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["proto"] == "udp" && p["port"] == 5353)
        .expect("5353/udp in ports");
    assert_eq!(hot["entries"], u64::from(UDP_FLOWS));
    assert_eq!(hot["eligible"], false, "{hot}");
    let reason = hot["reason"].as_str().unwrap();
    assert!(reason.contains("1 flow is NAT'd"), "{reason}");
}

/// `conntrack -L` lists the same table as text; its per-port counts must match.
fn compare_with_conntrack_tool(lab: &LabNetns, ports: &[Value]) {
    let tool_works = lab
        .exec(&["conntrack", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !tool_works {
        println!("conntrack is not installed: skipping the conntrack -L comparison");
        return;
    }
    let out = run(&mut lab.exec(&["conntrack", "-L"]));
    let text = String::from_utf8_lossy(&out.stdout);
    for port in ports {
        let proto = port["proto"].as_str().unwrap();
        let dport = format!("dport={}", port["port"]);
        let listed = text
            .lines()
            .filter(|line| {
                line.starts_with(proto)
                    && line.split_whitespace().find(|w| w.starts_with("dport=")) == Some(&dport)
            })
            .count();
        assert_eq!(port["entries"], listed as u64, "{proto} {dport}");
    }
}
