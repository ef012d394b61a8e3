use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`ctguard journal | head`) instead of failing on a write to a closed pipe.
    // SAFETY: setting a signal disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = ctguard::cli::Cli::parse();
    match ctguard::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ctguard: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
