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
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
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
            imgsrv::log::error(&e.message);
            ExitCode::from(e.exit_code)
        }
    }
}

/// Parses the command line. `-h` is taken for `--help`; help exits 0, a usage error exits 2
/// (argh's own `from_env` exits 1 for both kinds of mistakes alike).
fn parse_args() -> Result<Cli, ExitCode> {
    let args: Vec<String> = std::env::args().collect();
    let args: Vec<&str> = args
        .iter()
        .map(|a| if a == "-h" { "--help" } else { a.as_str() })
        .collect();
    let cmd = std::path::Path::new(args.first().copied().unwrap_or("imgsrv"))
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("imgsrv");
    match <Cli as argh::FromArgs>::from_args(&[cmd], args.get(1..).unwrap_or(&[])) {
        Ok(cli) => Ok(cli),
        Err(early) => match early.status {
            Ok(()) => {
                println!("{}", early.output);
                Err(ExitCode::SUCCESS)
            }
            Err(()) => {
                eprintln!("{}", early.output);
                Err(ExitCode::from(2))
            }
        },
    }
}
