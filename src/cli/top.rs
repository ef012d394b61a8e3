//! `ctguard top`: what fills the conntrack table now, and which hot ports a NOTRACK rule
//! could safely take out of it (and why the others cannot).
//!
//! The table is dumped over ctnetlink and aggregated as it streams
//! ([`crate::observe::table`]); with `--netns` the sockets are opened inside that
//! namespace. Eligibility follows the `notrack_hot_ports` stage of `--policy FILE`, or
//! without one (or a policy without the stage) the defaults of [`NotrackEligibility`]
//! (10% share, port 22 denied, at most 4 ports).
//!
//! JSON (`--json`, one object):
//! - `total`: entries in the table; `netns`: the `--netns` argument or `null`;
//!   `dump_interrupted`: the kernel flagged the dump as inconsistent on every attempt.
//! - `ports`: the `--limit` busiest (protocol, destination port) pairs, busiest first, each
//!   `{proto, port, entries, share, local_entries, forwarded_entries, nat_entries,
//!   eligible, reason}` (`proto` is `tcp`, `udp`, …; `share` is entries/total).
//! - `port_count`: how many ports have entries (`ports` may be cut by `--limit`).
//! - `tcp_states`: `[{state, entries}]`, commonest first.
//! - `top_sources`: `[{address, entries, overcount}]`, the `--limit` busiest source
//!   addresses (`entries` may exceed the truth by `overcount` on very diverse tables).
//! - `eligibility`: the rules applied, `{source, min_share, allow, deny, max_ports}`;
//!   `source` is the policy file or `built-in`, `allow` is `null` when any port may be.

use crate::netns;
use crate::observe::table::notrack::{
    NotrackEligibility, PortVerdict, notrack_eligibility, percent,
};
use crate::observe::table::{PortUsage, TableBreakdown, TableReader};
use anyhow::Context;
use serde_json::json;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Look inside a network namespace: a name under /run/netns, or a path such as
    /// /proc/PID/ns/net.
    #[arg(long, value_name = "NAME|PATH")]
    pub netns: Option<String>,
    /// Print JSON instead of the report.
    #[arg(long)]
    pub json: bool,
    /// How many ports and sources to show.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub limit: usize,
    /// Judge eligibility by this policy's `notrack_hot_ports` stage (allow and deny lists,
    /// share, max ports) instead of the built-in rules.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
}

/// The eligibility rules applied and where they come from.
struct Rules {
    source: String,
    eligibility: NotrackEligibility,
}

impl Rules {
    fn for_args(args: &TopArgs) -> anyhow::Result<Rules> {
        let built_in = || Rules {
            source: "built-in".into(),
            eligibility: NotrackEligibility::default(),
        };
        let Some(path) = &args.policy else {
            return Ok(built_in());
        };
        let policy = crate::policy::Policy::read(Some(path))?;
        Ok(match &policy.stages.notrack_hot_ports {
            Some(stage) => Rules {
                source: policy.source.clone(),
                eligibility: stage.into(),
            },
            None => Rules {
                source: format!(
                    "built-in ({} has no notrack_hot_ports stage)",
                    policy.source
                ),
                ..built_in()
            },
        })
    }
}

pub fn run(args: TopArgs) -> anyhow::Result<ExitCode> {
    // A bad policy is refused before the (slower) table read.
    let rules = Rules::for_args(&args)?;
    let open = || TableReader::open().context("opening the conntrack table");
    let mut reader = match &args.netns {
        Some(name) => netns::run_in(&netns::resolve(name), open)
            .with_context(|| format!("entering network namespace {name}"))??,
        None => open()?,
    };
    let table = reader
        .read(args.limit)
        .context("reading the conntrack table")?;
    let verdicts: Vec<PortVerdict> = notrack_eligibility(&table, &rules.eligibility)
        .take(args.limit)
        .collect();
    let output = if args.json {
        json_report(&args, &table, &verdicts, &rules).to_string() + "\n"
    } else {
        text_report(&args, &table, &verdicts, &rules)
    };
    std::io::stdout().write_all(output.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn json_report(
    args: &TopArgs,
    table: &TableBreakdown,
    verdicts: &[PortVerdict],
    rules: &Rules,
) -> serde_json::Value {
    let ports: Vec<_> = table
        .ports
        .iter()
        .zip(verdicts)
        .take(args.limit)
        .map(|(usage, verdict)| {
            json!({
                "proto": usage.proto,
                "port": usage.port,
                "entries": usage.entries,
                "share": verdict.share,
                "local_entries": usage.local_entries,
                "forwarded_entries": usage.forwarded_entries,
                "nat_entries": usage.nat_entries,
                "eligible": verdict.eligible,
                "reason": verdict.reason,
            })
        })
        .collect();
    json!({
        "total": table.total,
        "netns": args.netns,
        "dump_interrupted": table.dump_interrupted,
        "ports": ports,
        "port_count": table.ports.len(),
        "tcp_states": table.tcp_states,
        "top_sources": table.top_sources,
        "eligibility": {
            "source": rules.source,
            "min_share": rules.eligibility.min_share,
            "allow": rules.eligibility.allow,
            "deny": rules.eligibility.deny,
            "max_ports": rules.eligibility.max_ports,
        },
    })
}

fn text_report(
    args: &TopArgs,
    table: &TableBreakdown,
    verdicts: &[PortVerdict],
    rules: &Rules,
) -> String {
    let mut out = String::new();
    let place = args
        .netns
        .as_deref()
        .map_or(String::new(), |ns| format!(" in netns {ns}"));
    let _ = writeln!(out, "conntrack table{place}: {} entries", table.total);
    if table.dump_interrupted {
        let _ = writeln!(
            out,
            "warning: the table changed while it was read; counts may be slightly off"
        );
    }
    let shown: Vec<(&PortUsage, &PortVerdict)> =
        table.ports.iter().zip(verdicts).take(args.limit).collect();
    if shown.is_empty() {
        let _ = writeln!(out, "\nno TCP/UDP entries");
    } else {
        let _ = writeln!(
            out,
            "\n{:>11}  {:>9}  {:>6}  {:>9}  {:>9}  {:>9}",
            "port", "entries", "share", "local", "NAT'd", "forwarded"
        );
        for (usage, verdict) in &shown {
            let _ = writeln!(
                out,
                "{:>11}  {:>9}  {:>6}  {:>9}  {:>9}  {:>9}",
                format!("{}/{}", usage.port, usage.proto),
                usage.entries,
                percent(verdict.share),
                usage.local_entries,
                usage.nat_entries,
                usage.forwarded_entries
            );
        }
        if table.ports.len() > shown.len() {
            let _ = writeln!(
                out,
                "({} more ports; --limit to see more)",
                table.ports.len() - shown.len()
            );
        }
    }
    if !table.tcp_states.is_empty() {
        let states: Vec<String> = table
            .tcp_states
            .iter()
            .map(|s| format!("{} {}", s.state, s.entries))
            .collect();
        let _ = writeln!(out, "\nTCP states: {}", states.join(", "));
    }
    if !table.top_sources.is_empty() {
        let _ = writeln!(out, "\ntop sources:");
        for source in &table.top_sources {
            let bound = if source.overcount > 0 {
                format!(" (at most {} over)", source.overcount)
            } else {
                String::new()
            };
            let _ = writeln!(out, "  {:>39}  {}{bound}", source.address, source.entries);
        }
    }
    let _ = writeln!(out, "\n{}:", rules_heading(rules));
    let eligible: Vec<&&PortVerdict> = shown
        .iter()
        .map(|(_, v)| v)
        .filter(|v| v.eligible)
        .collect();
    if eligible.is_empty() {
        let _ = writeln!(out, "  no port is eligible");
    }
    for (_, verdict) in &shown {
        let mark = if verdict.eligible { "eligible" } else { "no" };
        let _ = writeln!(out, "  {mark:>8}  {}", verdict.reason);
    }
    out
}

/// The NOTRACK heading names the rules applied and where they come from.
fn rules_heading(rules: &Rules) -> String {
    let ports = |list: &[u16]| {
        let list: Vec<String> = list.iter().map(ToString::to_string).collect();
        list.join(", ")
    };
    let e = &rules.eligibility;
    let mut heading = format!(
        "NOTRACK ({} rules: ports with ≥ {} of the table",
        rules.source,
        percent(e.min_share)
    );
    match &e.allow {
        Some(allow) if allow.is_empty() => heading.push_str(", none allowed"),
        Some(allow) => {
            let _ = write!(heading, ", only {}", ports(allow));
        }
        None => {}
    }
    if !e.deny.is_empty() {
        let _ = write!(heading, ", never {}", ports(&e.deny));
    }
    let _ = write!(heading, ", at most {})", e.max_ports);
    heading
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(policy: Option<&str>) -> TopArgs {
        TopArgs {
            netns: None,
            json: false,
            limit: 10,
            policy: policy.map(|p| format!("{}/policies/{p}", env!("CARGO_MANIFEST_DIR")).into()),
        }
    }

    #[test]
    fn the_notrack_heading_names_the_rules_applied() {
        let heading = |policy| rules_heading(&Rules::for_args(&args(policy)).unwrap());
        assert_eq!(
            heading(None),
            "NOTRACK (built-in rules: ports with ≥ 10% of the table, never 22, at most 4)"
        );
        let web = heading(Some("web-server.toml"));
        assert!(
            web.contains("policies/web-server.toml rules: ports with ≥ 20% of the table, only 80, 443, never 22, 53, at most 2)"),
            "{web}"
        );
        let default = heading(Some("default.toml"));
        assert!(
            default.contains(", none allowed, never 22, 53, at most 2)"),
            "{default}"
        );
    }
}
