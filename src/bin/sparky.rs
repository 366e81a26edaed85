//! `sparky`: the admin CLI. All logic lives in `sparky::cli`.

use std::process::ExitCode;

use clap::Parser;
use sparky::cli::Cli;
use sparky::config::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match sparky::cli::run(cli, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sparky: {}", sparky::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
