//! `ctguard check [FILE…]`: validate policies and show what they mean on this host.
//!
//! Each file is parsed and validated; an invalid one prints `file:line:col: expected …`
//! on stderr and makes the exit status 1. A valid one prints the effective policy and the
//! values it implies here: the RAM budget, the table ceiling, and what `raise_limits`
//! would set if it fired now.

use crate::engine::plan_raise;
use crate::knob::Knob;
use crate::observe::ObserveError;
use crate::observe::memory::HostMemory;
use crate::observe::sysctl;
use crate::policy::{Mode, Policy};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Policy files to validate; none: the embedded default policy.
    pub files: Vec<PathBuf>,
}

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let host = HostMemory::read();
    let table = read_table();
    let mut all_valid = true;
    if args.files.is_empty() {
        report(&Policy::embedded_default(), &host, &table);
    }
    for path in &args.files {
        // `ctguard run` would refuse an untrusted file; here it is only a warning, which
        // says so (the file is still reported valid).
        for warning in crate::security::warnings_for_policy_file(path) {
            eprintln!("warning: `ctguard run` would refuse this file: {warning}");
        }
        match Policy::read(Some(path)) {
            Ok(policy) => report(&policy, &host, &table),
            Err(err) => {
                eprintln!("{err:#}");
                all_valid = false;
            }
        }
    }
    Ok(if all_valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn report(
    policy: &Policy,
    host: &Result<HostMemory, ObserveError>,
    table: &Result<TableNow, ObserveError>,
) {
    println!("{}: valid", policy.source);
    for line in policy.to_string().lines() {
        println!("  {line}");
    }
    let host = match host {
        Ok(host) => host,
        Err(err) => {
            println!("  on this host: MemTotal unreadable ({err}); RAM ceiling unknown");
            println!();
            return;
        }
    };
    let raise = &policy.stages.raise_limits;
    let ceiling = raise.ceiling(host);
    println!(
        "  on this host: MemTotal {} bytes, {} bytes per entry ({:?}); classic ceiling {}",
        host.mem_total_bytes,
        host.entry_bytes,
        host.entry_bytes_source,
        host.classic_ceiling()
    );
    println!(
        "  RAM budget {} bytes → {} entries; raise_limits never sets max above {}",
        ceiling.budget_bytes, ceiling.ram_entries, ceiling.max
    );
    match table {
        Ok(t) => {
            let plan = plan_raise(raise, host, t.count, t.max, t.buckets, true);
            let carried_out = match policy.mode {
                Mode::Enforce => "",
                Mode::DryRun => " (dry-run: reported only)",
                Mode::Observe => " (observe: never planned)",
            };
            println!(
                "  table now: count {} / max {} (ratio {:.2}); raise_limits now: {}{carried_out}",
                t.count,
                t.max,
                if t.max == 0 {
                    0.0
                } else {
                    t.count as f64 / t.max as f64
                },
                plan.describe()
            );
        }
        Err(err) => {
            println!("  table now: unreadable ({err}; is connection tracking active?)")
        }
    }
    println!();
}

#[derive(Debug, Clone, Copy)]
struct TableNow {
    count: u64,
    max: u64,
    buckets: Option<u64>,
}

/// The table's count, max and buckets in this namespace, read once. Buckets are optional
/// (old kernels lack the sysctl); count and max are not.
fn read_table() -> Result<TableNow, ObserveError> {
    let root = Path::new(sysctl::DEFAULT_ROOT);
    Ok(TableNow {
        count: sysctl::read_count(root)?,
        max: sysctl::read_knob(root, Knob::Max)?,
        buckets: sysctl::read_knob(root, Knob::Buckets).ok(),
    })
}
