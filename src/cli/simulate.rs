//! `ctguard simulate`: the decision engine on a virtual clock, against a built-in scenario
//! or a recorded trace, printing the timeline of levels, incidents and decisions
//! (`--svg FILE` also draws it, see [`crate::svg`]).

use crate::simulate::{self, Scenario, SimOptions, trace};
use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["trace", "scenario"]))]
pub struct SimulateArgs {
    /// Policy file; default: the embedded default policy.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// A recorded trace (JSON lines, see docs/trace-format.md).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// A built-in synthetic scenario.
    #[arg(long, value_enum, value_name = "NAME")]
    pub scenario: Option<Scenario>,
    /// Simulate a non-initial network namespace: max and buckets are refused (EACCES).
    #[arg(long)]
    pub non_initial_netns: bool,
    /// Print the timeline as JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also draw the timeline picture (table fill against max, stage markers) as SVG.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
}

pub fn run(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    let policy = crate::policy::Policy::read(args.policy.as_deref())?;
    let options = SimOptions {
        non_initial_netns: args.non_initial_netns,
    };
    let (title, timeline) = match (&args.trace, args.scenario) {
        (Some(path), _) => {
            let name = path.display().to_string();
            let text =
                std::fs::read_to_string(path).with_context(|| format!("{name}: cannot read"))?;
            let trace = trace::parse_trace(&text, &name)?;
            (
                format!(
                    "trace {name} (replayed: counts as recorded, knob values follow the decisions)"
                ),
                simulate::replay_trace(policy.clone(), &trace, options),
            )
        }
        (None, Some(scenario)) => (
            format!("scenario {}", scenario.name()),
            simulate::run_scenario(policy.clone(), scenario, options),
        ),
        (None, None) => anyhow::bail!("give --trace FILE or --scenario NAME"),
    };
    if let Some(path) = &args.svg {
        let chart =
            crate::svg::Chart::from_timeline(&timeline, format!("ctguard simulate: {title}"));
        std::fs::write(path, crate::svg::render(&chart))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        print!("{}", timeline.to_json_lines());
    } else {
        println!("{title}, policy {}", policy.source);
        print!("{}", timeline.render());
        println!("{}", simulate::summary(&policy, &timeline));
    }
    Ok(ExitCode::SUCCESS)
}
