//! `ctguard drill`: a fire drill on the real kernel, in scratch namespaces (see
//! [`crate::drill`]). Prints a short report, or the whole report as JSON with `--json`;
//! exits 1 when the drill did not pass (no change, inexact rollback, a problem).

use crate::drill::{self, DrillOptions, Scenario};
use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    /// Use this policy's stages and budgets (with the drill's timings laid over them);
    /// the embedded drill policy when absent.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// The load to stage.
    #[arg(long, value_enum, default_value_t = Scenario::UdpFlood)]
    pub scenario: Scenario,
    /// Let the drill lower nf_conntrack_max (restored afterwards) and the daemon raise
    /// the global knobs; without it they are never written and the raise is simulated.
    #[arg(long)]
    pub allow_global: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Record problems in the report and carry on, instead of stopping at the first.
    #[arg(long)]
    pub keep_going: bool,
}

pub fn run(args: DrillArgs) -> anyhow::Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    anyhow::ensure!(
        euid == 0,
        "a drill makes network namespaces and needs root (euid is {euid})"
    );
    drill::catch_interrupts()?;
    let options = DrillOptions {
        policy: args.policy,
        scenario: args.scenario,
        allow_global: args.allow_global,
        keep_going: args.keep_going,
        baseline: true,
        exe: std::env::current_exe().context("locating the ctguard binary")?,
    };
    let report = drill::run(&options).context("drill failed")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.human());
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
