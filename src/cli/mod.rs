/*!
The command line: each subcommand is a thin driver in its own file.

`main` only parses arguments and maps the result to an exit code; everything a
subcommand does lives in its module here.
*/

pub mod check;
pub mod drill;
pub mod generate;
pub mod incidents;
pub mod journal;
pub mod record;
pub mod rollback;
pub mod run;
pub mod simulate;
pub mod status;
pub mod top;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// ctguard keeps Linux connection tracking from overflowing.
#[derive(Debug, Parser)]
#[command(name = "ctguard", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the guard: watch conntrack pressure and respond per policy.
    Run(run::RunArgs),
    /// Show conntrack pressure on this host (or in a namespace) now.
    Status(status::StatusArgs),
    /// Validate policy files and show the effective values for this host.
    Check(check::CheckArgs),
    /// Run the decision engine on a recorded trace or a built-in scenario.
    Simulate(simulate::SimulateArgs),
    /// Record a live trace of samples and kernel events for later simulation.
    Record(record::RecordArgs),
    /// List the changes ctguard made (from the write-ahead journal).
    Journal(journal::JournalArgs),
    /// Restore original values of changes still in force.
    Rollback(rollback::RollbackArgs),
    /// Show what fills the conntrack table now, and which ports NOTRACK could take out.
    ///
    /// Eligibility follows the `notrack_hot_ports` stage of `--policy FILE`; without one,
    /// built-in rules (ports with at least 10% of the table, never 22, at most 4).
    Top(top::TopArgs),
    /// Stage a conntrack incident in scratch namespaces, with and without ctguard.
    Drill(drill::DrillArgs),
    /// Write man pages or shell completions (for packaging).
    #[command(hide = true)]
    Generate(generate::GenerateArgs),
    /// List the incidents ctguard recorded, or tell one (text, JSON, SVG timeline).
    Incidents(incidents::IncidentsArgs),
}

/// `--state-dir`, shared by every command that reads or writes the journal.
#[derive(Debug, Clone, clap::Args)]
pub struct StateDir {
    /// Where the journal and incident records live.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/ctguard")]
    pub state_dir: std::path::PathBuf,
}

/// Fails unless `dir` is a state directory that exists: the commands that only read one
/// never create it, and a mistyped `--state-dir` must not read as an empty history.
pub fn existing_state_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    anyhow::bail!(
        "{}: no such state directory (nothing recorded there yet, or --state-dir is not the one `ctguard run` uses)",
        dir.display()
    )
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    init_logging(cli.log_format);
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Status(args) => status::run(args),
        Command::Check(args) => check::run(args),
        Command::Simulate(args) => simulate::run(args),
        Command::Record(args) => record::run(args),
        Command::Journal(args) => journal::run(args),
        Command::Rollback(args) => rollback::run(args),
        Command::Top(args) => top::run(args),
        Command::Drill(args) => drill::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Incidents(args) => incidents::run(args),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CTGUARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second init (tests calling `run` twice) is harmless: keep the first subscriber.
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
