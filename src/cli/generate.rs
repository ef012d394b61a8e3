//! `ctguard generate` (hidden): writes the man pages and shell completions that packages
//! ship, from the same clap definitions the binary parses with, so they never go stale.
//! `packaging/build-assets.sh` runs it into `target/assets/`.

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    pub what: Asset,
}

#[derive(Debug, clap::Subcommand)]
pub enum Asset {
    /// Man pages in section 8 (system administration): ctguard.8 and one per subcommand.
    Man {
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
    /// The completion script for one shell (bash: ctguard.bash, zsh: _ctguard, fish: ctguard.fish).
    Completions {
        shell: Shell,
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
}

pub fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    match args.what {
        Asset::Man { out_dir } => {
            let mut cmd = super::Cli::command().disable_help_subcommand(true);
            cmd.build();
            write_man_pages(&cmd, &out_dir)?;
        }
        Asset::Completions { shell, out_dir } => {
            let mut cmd = super::Cli::command();
            let path = clap_complete::generate_to(shell, &mut cmd, "ctguard", &out_dir)
                .with_context(|| format!("writing {shell} completions to {}", out_dir.display()))?;
            println!("{}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the page of `cmd` and of each visible subcommand, recursively.
fn write_man_pages(cmd: &clap::Command, out_dir: &Path) -> anyhow::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man_pages(sub, out_dir)?;
    }
    let path = clap_mangen::Man::new(cmd.clone())
        .section("8")
        .manual("System Administration")
        .generate_to(out_dir)
        .with_context(|| {
            format!(
                "writing the man page of {} to {}",
                cmd.get_name(),
                out_dir.display()
            )
        })?;
    println!("{}", path.display());
    Ok(())
}
