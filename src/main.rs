use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = ctguard::cli::Cli::parse();
    match ctguard::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ctguard: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
