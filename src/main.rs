//! Thin entry point: parse flags, run, turn failures into an exit code.

use imgsrv::cli::{Cli, Command};
use imgsrv::config::Config;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli: Cli = argh::from_env();
    if cli.version {
        println!("imgsrv {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let Some(Command::Serve(args)) = cli.command else {
        eprintln!("imgsrv: no command given; try `imgsrv serve` or `imgsrv --help`");
        return ExitCode::from(2);
    };
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("imgsrv: {e}");
            return ExitCode::from(2);
        }
    };
    match imgsrv::daemon::serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            imgsrv::log::error(&e);
            ExitCode::FAILURE
        }
    }
}
