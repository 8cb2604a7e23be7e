//! The operator commands beside `serve`: `imgsrv backup`, `imgsrv check` and
//! `imgsrv compact`. Reports go to stdout, progress (on a terminal) and errors to stderr.
//!
//! `backup` creates `OUT.partial` and has it written: by the running server, which it hands
//! the file over the admin socket (`crate::admin`), or, with no server running, by opening the
//! database itself and running the same copy. The finished copy is durable before it is
//! renamed to `OUT`, so `OUT` never names a half-written copy. `check` and `compact` need the server stopped; they refuse clearly when
//! it is not.

use crate::admin;
use crate::cli::{BackupArgs, CheckArgs, CompactArgs};
// One size formatter for every command (`1.5 GiB`).
use crate::client::human_bytes as human;
use crate::config;
use crate::daemon::Failure;
use crate::store::DB_FILE;
use crate::store::backup::{self, Offline, OfflineError};
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn fail(message: String) -> Failure {
    Failure {
        message,
        exit_code: 1,
    }
}

/// A progress line on stderr, redrawn at most four times a second, only on a terminal.
struct Progress {
    label: &'static str,
    tty: bool,
    started: Instant,
    last: Option<Instant>,
}

impl Progress {
    fn new(label: &'static str) -> Progress {
        Progress {
            label,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            last: None,
        }
    }

    fn update(&mut self, done: u64, estimate: u64) {
        if !self.tty
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_millis(250))
        {
            return;
        }
        self.last = Some(Instant::now());
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let pct = if estimate > 0 {
            format!(
                " ({:.0}%)",
                (done as f64 / estimate as f64 * 100.0).min(99.0)
            )
        } else {
            String::new()
        };
        eprint!(
            "\r{}: {} of about {}{pct}, {:.0} MB/s   ",
            self.label,
            human(done),
            human(estimate.max(done)),
            done as f64 / secs / 1e6
        );
        let _ = std::io::stderr().flush();
    }

    fn finish(&self) {
        if self.tty && self.last.is_some() {
            eprintln!();
        }
    }
}

/// Refuses a command that needs the server stopped while one answers on the admin socket.
fn refuse_if_serving(dir: &Path, what: &str, hint: &str) -> Result<(), Failure> {
    if let Ok(Some(_)) = admin::connect(dir) {
        return Err(fail(format!(
            "a server is running on {} (its admin socket answers); {what} needs it stopped. {hint}",
            dir.display()
        )));
    }
    Ok(())
}

fn open_offline(dir: &Path, writable: bool, what: &str, hint: &str) -> Result<Offline, Failure> {
    Offline::open(&dir.join(DB_FILE), writable).map_err(|e| match e {
        OfflineError::InUse => fail(format!(
            "the database in {} is open in another process (a running imgsrv serve?); \
             {what} needs it stopped. {hint}",
            dir.display()
        )),
        OfflineError::Damaged(m) => fail(format!(
            "{m}; the file cannot be opened, so restore it from a backup"
        )),
        OfflineError::Other(m) => fail(m),
    })
}

/// Where the copy goes: `out` itself, or `out/imgsrv.redb` when `out` is a directory.
fn backup_target(out: &str) -> Result<PathBuf, Failure> {
    let mut path = PathBuf::from(out);
    if path.is_dir() {
        path = path.join(DB_FILE);
    }
    if path.exists() {
        return Err(fail(format!(
            "{} already exists; a backup never overwrites a file, so name a new one",
            path.display()
        )));
    }
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) if !p.is_dir() => Err(fail(format!(
            "the directory {} does not exist",
            p.display()
        ))),
        _ => Ok(path),
    }
}

/// `imgsrv backup --data-dir DIR OUT`.
pub fn backup(a: BackupArgs) -> Result<(), Failure> {
    let dir = config::data_dir(a.data_dir);
    let rate = match a.rate.as_deref() {
        None => None,
        Some(r) => match config::parse_size(r) {
            Some(n) if n > 0 => Some(n),
            _ => {
                return Err(Failure {
                    message: format!("--rate {r:?} is not a size a second such as 200MiB or 1GiB"),
                    exit_code: 2,
                });
            }
        },
    };
    let out = backup_target(&a.out)?;
    let mut tmp = out.clone().into_os_string();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    // Left by an interrupted backup to the same name.
    let _ = std::fs::remove_file(&tmp);
    let started = Instant::now();
    let mut progress = Progress::new("backup");
    let conn = admin::connect(&dir).map_err(|e| {
        fail(format!(
            "cannot reach the admin socket of {}: {e}",
            dir.display()
        ))
    })?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| fail(format!("cannot create {}: {e}", tmp.display())))?;
    let (source, result) = match conn {
        Some(conn) => (
            "the running server",
            admin::request_backup(conn, &file, rate, &mut |d, t| progress.update(d, t))
                .map_err(fail),
        ),
        None => (
            "the stopped database",
            from_file(&dir, file, rate, &mut progress),
        ),
    };
    progress.finish();
    let summary = match result.and_then(|s| publish(&tmp, &out).map(|_| s)) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    println!(
        "backup of {} ({source}) written to {}: {} rows, {} of data, a {} file, in {secs:.1} s ({:.0} MB/s)",
        dir.display(),
        out.display(),
        summary.rows,
        human(summary.bytes),
        human(size),
        size as f64 / secs.max(0.001) / 1e6
    );
    Ok(())
}

fn from_file(
    dir: &Path,
    file: File,
    rate: Option<u64>,
    progress: &mut Progress,
) -> Result<backup::Summary, Failure> {
    let hint = "If no server runs, another command may hold it; try again when it has finished.";
    let db = open_offline(dir, false, "a backup without the server", hint)?;
    let pace = backup::Pace {
        rate,
        progress: &mut |d, t| progress.update(d, t),
        stop: &|| false,
    };
    db.backup_into(file, pace).map_err(|e| fail(e.detail))
}

/// Makes the finished copy durable under its final name.
fn publish(tmp: &Path, out: &Path) -> Result<(), Failure> {
    let sync = |p: &Path| std::fs::File::open(p).and_then(|f| f.sync_all());
    sync(tmp).map_err(|e| fail(format!("syncing {}: {e}", tmp.display())))?;
    std::fs::rename(tmp, out).map_err(|e| fail(format!("renaming to {}: {e}", out.display())))?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    sync(parent).map_err(|e| fail(format!("syncing {}: {e}", parent.display())))
}

/// `imgsrv check --data-dir DIR`: exit 0 when clean, 1 with a report otherwise.
pub fn check(a: CheckArgs) -> Result<(), Failure> {
    let dir = config::data_dir(a.data_dir);
    let hint = format!(
        "Stop it, or check a copy: `imgsrv backup --data-dir {} COPY_DIR` then \
         `imgsrv check --data-dir COPY_DIR`.",
        dir.display()
    );
    refuse_if_serving(&dir, "check", &hint)?;
    let db = open_offline(&dir, false, "check", &hint)?;
    let started = Instant::now();
    let mut progress = Progress::new("check");
    let report = db
        .check(&mut |d, t| progress.update(d, t))
        .map_err(|e| fail(format!("cannot read the database: {e}")))?;
    progress.finish();
    println!(
        "checked {}: {} chunks ({}), {} blobs, {} images, {} versions, {} publish jobs in {:.1} s",
        dir.join(DB_FILE).display(),
        report.chunks,
        human(report.chunk_bytes),
        report.blobs,
        report.images,
        report.versions,
        report.jobs,
        started.elapsed().as_secs_f64()
    );
    if report.problems.is_empty() {
        println!("no problems found");
        return Ok(());
    }
    println!("{} problems found:", report.problems.len());
    for p in &report.problems {
        println!("- {p}");
    }
    Err(fail(format!(
        "{} problems found in {}",
        report.problems.len(),
        dir.join(DB_FILE).display()
    )))
}

/// `imgsrv compact --data-dir DIR`.
pub fn compact(a: CompactArgs) -> Result<(), Failure> {
    let dir = config::data_dir(a.data_dir);
    let hint = "Stop it first (compaction moves pages the server reads).";
    refuse_if_serving(&dir, "compaction", hint)?;
    let path = dir.join(DB_FILE);
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let db = open_offline(&dir, true, "compaction", hint)?;
    let before = size(&path);
    eprintln!("compacting {} ({})...", path.display(), human(before));
    let started = Instant::now();
    db.compact().map_err(|e| fail(e.detail))?;
    let after = size(&path);
    println!(
        "compacted {}: {} -> {}, {} returned to the filesystem, in {:.1} s",
        path.display(),
        human(before),
        human(after),
        human(before.saturating_sub(after)),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
