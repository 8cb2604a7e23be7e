//! Thin entry point: parse flags, run, turn failures into an exit code.

use imgsrv::cli::{Cli, Command};
use imgsrv::config::Config;
use std::process::ExitCode;

// musl's malloc serialises threads on one lock and returns memory eagerly: under this server's
// many threads and chunk-sized (1 MiB) buffers it cut a redb-backed download from 1.9 to 0.7 GB/s.
// mimalloc restores glibc-level speed; glibc builds keep the system allocator.
#[cfg(target_env = "musl")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
