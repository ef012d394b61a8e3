//! `ctguard run`: the daemon, with the embedded default policy unless `--policy` is given.

use super::StateDir;
use crate::daemon::{self, Options};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Policy file (TOML); the embedded default when absent.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Decide and log what would be done; change nothing on the host.
    #[arg(long)]
    pub dry_run: bool,
    /// Watch and protect another network namespace (a name under /run/netns, or a path).
    #[arg(long, value_name = "NAME|PATH")]
    pub netns: Option<String>,
    #[command(flatten)]
    pub state: StateDir,
    /// Root under which `persist = true` writes etc/sysctl.d and etc/modprobe.d (tests).
    #[arg(long, value_name = "DIR", default_value = "/", hide = true)]
    pub persist_root: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics. Loopback by default: the endpoint
    /// has no authentication, so any other address must be given here explicitly.
    #[arg(long, value_name = "ADDR", default_value = crate::metrics::DEFAULT_LISTEN)]
    pub metrics_listen: std::net::SocketAddr,
    /// Serve no metrics endpoint.
    #[arg(long, conflicts_with = "metrics_listen")]
    pub no_metrics: bool,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    daemon::run(Options {
        policy: args.policy,
        dry_run: args.dry_run,
        netns: args.netns.as_deref().map(crate::netns::resolve),
        state_dir: args.state.state_dir,
        persist_root: args.persist_root,
        metrics_listen: (!args.no_metrics).then_some(args.metrics_listen),
    })?;
    Ok(ExitCode::SUCCESS)
}
