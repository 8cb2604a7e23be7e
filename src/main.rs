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

/// Tunes mimalloc for this server's pattern: uploads, downloads and backups each allocate and
/// free a page buffer per 1 MiB chunk. With mimalloc's defaults most of those buffers came
/// back from the kernel as fresh memory that it had to zero first, which was a fifth of a
/// backup's CPU time (perf): memory was handed back 10 ms after it was freed, and with
/// transparent huge pages each fault in a handed-back range zeroed a whole 2 MiB page. So
/// freed memory is kept for a second (an idle server still returns it) and the heap uses
/// ordinary pages.
#[cfg(target_env = "musl")]
fn tune_allocator() {
    // Positions in `mi_option_e` of the mimalloc.h that libmimalloc-sys builds (the crate
    // names no constants for them). mimalloc keeps these positions stable across releases:
    // options it drops are renamed `deprecated_*` in place, never removed.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;
    // SAFETY: `mi_option_set` stores a number in mimalloc's option table and dereferences no
    // pointer; it runs first thing in `main`, before any other thread exists, so nothing
    // reads the options concurrently, and mimalloc ignores an option number out of range.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000);
        libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0);
    }
}

#[cfg(not(target_env = "musl"))]
fn tune_allocator() {}

fn main() -> ExitCode {
    tune_allocator();
    let cli = match parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if cli.version {
        println!("imgsrv {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        Some(Command::Backup(a)) => return command("backup", imgsrv::ops::backup(a)),
        Some(Command::Check(a)) => return command("check", imgsrv::ops::check(a)),
        Some(Command::Compact(a)) => return command("compact", imgsrv::ops::compact(a)),
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

/// The exit of an operator command: its failure on stderr and its exit code.
fn command(name: &str, result: Result<(), imgsrv::daemon::Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imgsrv {name}: {}", e.message);
            ExitCode::from(e.exit_code)
        }
    }
}

/// Parses the command line like `argh::from_env`, except that a usage error exits with 2 (argh
/// would exit with 1, which the commands use for runtime failures).
fn parse() -> Result<Cli, ExitCode> {
    use argh::FromArgs;
    let args: Vec<String> = std::env::args().collect();
    let name = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("imgsrv")
        .to_string();
    // `-h` is taken for `--help`, which argh alone does not accept.
    let rest: Vec<&str> = args
        .iter()
        .skip(1)
        .map(|a| if a == "-h" { "--help" } else { a.as_str() })
        .collect();
    Cli::from_args(&[&name], &rest).map_err(|early| match early.status {
        Ok(()) => {
            println!("{}", early.output);
            ExitCode::SUCCESS
        }
        Err(()) => {
            eprintln!(
                "{}\nRun {name} --help for more information.",
                early.output.trim_end()
            );
            ExitCode::from(2)
        }
    })
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
