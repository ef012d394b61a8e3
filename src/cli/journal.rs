//! `ctguard journal`: what ctguard changed on this host, and what is still in force.

use super::StateDir;
use crate::journal::Journal;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct JournalArgs {
    #[command(flatten)]
    pub state: StateDir,
    /// Only changes that may still be in force.
    #[arg(long)]
    pub in_force: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: JournalArgs) -> anyhow::Result<ExitCode> {
    super::existing_state_dir(&args.state.state_dir)?;
    let journal = Journal::open(&args.state.state_dir)?;
    let entries: Vec<_> = journal
        .entries()
        .iter()
        .filter(|e| !args.in_force || e.may_be_in_force())
        .collect();
    let notrack: Vec<_> = journal
        .notrack_entries()
        .iter()
        .filter(|e| !args.in_force || e.may_be_in_force())
        .collect();
    if args.json {
        let all = serde_json::json!({ "changes": entries, "notrack": notrack });
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    if entries.is_empty() && notrack.is_empty() {
        println!("no changes recorded in {}", journal.path().display());
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>5}  {:<11} {:<16} {:>9}  {:<48} {:>10} → {:<10} namespace",
        "id", "recorded", "stage", "state", "knob", "original", "new"
    );
    for e in entries {
        let recorded = date(e.recorded_at);
        let state = e.state.name();
        println!(
            "{:>5}  {:<11} {:<16} {:>9}  {:<48} {:>10} → {:<10} {}",
            e.id,
            recorded,
            e.stage,
            state,
            e.knob.to_string(),
            e.original,
            e.new,
            e.netns
                .as_deref()
                .map_or("(own)".into(), |p| p.display().to_string()),
        );
        if let Some(note) = &e.note {
            println!("       note: {note}");
        }
    }
    for e in notrack {
        println!(
            "{:>5}  {:<11} {:<16} {:>9}  NOTRACK {:<40} for {} s   {}",
            e.id,
            date(e.recorded_at),
            e.stage,
            e.state.name(),
            e.change.target().to_string(),
            e.change.timeout_secs,
            e.netns
                .as_deref()
                .map_or("(own)".into(), |p| p.display().to_string()),
        );
        if let Some(note) = &e.note {
            println!("       note: {note}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The day part of a Unix time, `2026-11-22`.
fn date(unix: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix);
    humantime::format_rfc3339_seconds(time).to_string()[..10].to_string()
}
