//! Thin entry point: parse flags, run, turn failures into an exit code.

use imgsrv::cli::{Cli, Command};
use imgsrv::config::Config;
use std::process::ExitCode;

// musl's malloc takes one global lock and returns memory to the kernel eagerly: with this
// server's many threads and chunk-sized (1 MiB) buffers, the static build downloaded 30-35 %
// slower and spent a third more CPU per byte than with mimalloc (scripts/bench, README
// "Performance"). glibc builds keep the system allocator.
#[cfg(target_env = "musl")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli: Cli = argh::from_env();
    if cli.version {
        println!("imgsrv {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        Some(Command::Push(args)) => return client_exit(imgsrv::client::push::run(args)),
        Some(Command::Mirror(args)) => return client_exit(imgsrv::client::mirror::run(args)),
        None => {
            eprintln!("imgsrv: no command given; try `imgsrv serve` or `imgsrv --help`");
            return ExitCode::from(2);
        }
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
            imgsrv::log::error(&e.message);
            ExitCode::from(e.exit_code)
        }
    }
}

/// A client command's result as its exit code (README, "Exit codes").
fn client_exit(result: imgsrv::client::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imgsrv: error: {e}");
            ExitCode::from(e.kind.exit_code())
        }
    }
}
