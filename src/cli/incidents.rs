//! `ctguard incidents`: the incidents the daemon recorded under `STATE_DIR/incidents`, as a
//! list, or one of them as a story, a JSON record or a timeline picture (SVG).

use crate::incident::{self, IncidentDir, IncidentRecord, What};
use anyhow::Context;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `--state-dir` and `--json` are global here, so that they may come before or after
/// `show` (`ctguard incidents --state-dir DIR show ID` as well as `… show ID --state-dir DIR`).
#[derive(Debug, clap::Args)]
pub struct IncidentsArgs {
    /// Where the journal and incident records live.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        default_value = "/var/lib/ctguard"
    )]
    pub state_dir: PathBuf,
    /// Machine-readable output (with `show`: the record as JSON instead of the story).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Option<IncidentsCommand>,
}

#[derive(Debug, clap::Subcommand)]
pub enum IncidentsCommand {
    /// Tell one incident: what happened, what ctguard did and why.
    Show(ShowArgs),
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The incident id (or a unique prefix of it, or `latest`).
    pub id: String,
    /// Also draw the timeline picture into this SVG file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
}

/// One line of the list, as JSON.
#[derive(Debug, Serialize)]
struct Summary<'a> {
    id: &'a str,
    mode: &'a str,
    opened: String,
    /// `null` while open.
    closed: Option<String>,
    status: &'static str,
    peak_ratio: f64,
    peak_count: u64,
    peak_max: u64,
    drops: u64,
    stages: &'a [String],
    outcome: String,
    decisions: Vec<DecisionSummary<'a>>,
}

#[derive(Debug, Serialize)]
struct DecisionSummary<'a> {
    id: u64,
    stage: &'a str,
    verb: &'a str,
    dry_run: bool,
    what: &'a str,
    /// `applied`, `not_permitted`, `failed`; `null` when none was recorded (dry-run).
    result: Option<&'a str>,
}

fn summary(record: &IncidentRecord) -> Summary<'_> {
    let decisions = record
        .timeline
        .iter()
        .filter_map(|e| match &e.what {
            What::Decision {
                id,
                stage,
                verb,
                dry_run,
                what,
                ..
            } => Some(DecisionSummary {
                id: *id,
                stage,
                verb,
                dry_run: *dry_run,
                what,
                result: record.timeline.iter().find_map(|o| match &o.what {
                    What::Outcome { id: of, result, .. } if of == id => Some(result.as_str()),
                    _ => None,
                }),
            }),
            _ => None,
        })
        .collect();
    Summary {
        id: &record.id,
        mode: &record.mode,
        opened: incident::date_time(record.opened_unix_ms),
        closed: record.closed_unix_ms.map(incident::date_time),
        status: match (record.closed_unix_ms, &record.interrupted) {
            (_, Some(_)) => "interrupted",
            (Some(_), None) => "closed",
            (None, None) => "open",
        },
        peak_ratio: record.peak.ratio,
        peak_count: record.peak.count,
        peak_max: record.peak.max,
        drops: record.drops,
        stages: &record.stages,
        outcome: record.outcome_summary(),
        decisions,
    }
}

pub fn run(args: IncidentsArgs) -> anyhow::Result<ExitCode> {
    super::existing_state_dir(&args.state_dir)?;
    match args.command {
        Some(IncidentsCommand::Show(show)) => run_show(&args.state_dir, args.json, show),
        None => list(&args.state_dir, args.json),
    }
}

fn list(state_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let dir = IncidentDir::under_state_dir(state_dir);
    let records = dir.load_all()?;
    if json {
        let summaries: Vec<Summary> = records.iter().map(summary).collect();
        println!("{}", serde_json::to_string_pretty(&summaries)?);
        return Ok(ExitCode::SUCCESS);
    }
    if records.is_empty() {
        println!("no incidents recorded in {}", dir.path().display());
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<26} {:<23} {:<20} {:>5} {:>9}  {:<34} outcome",
        "id", "opened", "closed", "peak", "drops", "stages"
    );
    for r in &records {
        println!(
            "{:<26} {:<23} {:<20} {:>4.0}% {:>9}  {:<34} {}",
            r.id,
            incident::date_time(r.opened_unix_ms),
            r.status_label(),
            r.peak.ratio * 100.0,
            r.drops,
            if r.stages.is_empty() {
                "-".to_string()
            } else {
                r.stages.join(", ")
            },
            r.outcome_summary()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_show(state_dir: &Path, json: bool, args: ShowArgs) -> anyhow::Result<ExitCode> {
    let dir = IncidentDir::under_state_dir(state_dir);
    let record = dir.find(&args.id)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        print!("{}", incident::narrative(&record));
    }
    if let Some(path) = &args.svg {
        let svg = crate::svg::render(&incident::chart(&record));
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("timeline picture written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
