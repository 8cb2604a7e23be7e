//! A private Incus daemon for the tests that need one (`incus image copy`, `incus launch`):
//! `incusd` from the `incus` package with its own INCUS_DIR, a `dir` storage pool, a default
//! profile with a root disk and no network. It is stopped the way an operator would stop it
//! (`incus admin shutdown`, then waiting for the process), and whatever it left mounted under
//! its directory is unmounted before the directory is removed, so runs leave nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const INCUSD: &str = "/usr/libexec/incus/incusd";

/// One daemon at a time: two daemons on one host would compete for host-wide resources
/// (cgroups, AppArmor profiles, the kernel's view of mounts) and the tests that use them are
/// slow enough that running them one after the other costs little.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

pub struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    _turn: MutexGuard<'static, ()>,
}

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// A precondition this machine lacks: fatal in CI, a loud skip elsewhere.
fn unavailable(what: &str) {
    if in_ci() {
        panic!("incusd test: {what} (CI=true requires it)");
    }
    eprintln!("\n!!!!!!!! SKIPPING an incusd test: {what} (CI=true would fail) !!!!!!!!\n");
}

impl Daemon {
    /// Starts a daemon and sets up its pool and profile. `None` (after a loud message) where
    /// `incusd` is not installed or cannot start, outside CI.
    pub fn start() -> Option<Daemon> {
        if !Path::new(INCUSD).exists() {
            unavailable("incusd (package incus) is not installed");
            return None;
        }
        let turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let dir = tempfile::tempdir().unwrap();
        // Container root file systems live below INCUS_DIR; the container's (mapped) root must
        // be able to traverse it.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .unwrap();
        let mut d = Daemon {
            dir,
            child: None,
            _turn: turn,
        };
        if !d.spawn() {
            unavailable(&format!(
                "incusd did not become ready; its log:\n{}",
                d.log()
            ));
            return None;
        }
        for args in [
            &["storage", "create", "default", "dir"][..],
            &[
                "profile",
                "device",
                "add",
                "default",
                "root",
                "disk",
                "path=/",
                "pool=default",
            ][..],
        ] {
            let (ok, _, err) = d.incus(args);
            assert!(ok, "incus {args:?}: {err}");
        }
        Some(d)
    }

    /// Starts `incusd` on this directory and waits until it answers.
    fn spawn(&mut self) -> bool {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("incusd.log"))
            .unwrap();
        let child = Command::new(INCUSD)
            .args(["--group", "root"])
            .env("INCUS_DIR", self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning incusd");
        self.child = Some(child);
        self.incus(&["admin", "waitready", "--timeout", "60"]).0
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("incusd.log")).unwrap_or_default()
    }

    /// Runs `incus ARGS` against this daemon with no client configuration; returns (success,
    /// stdout, stderr).
    pub fn incus(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("incus")
            .args(args)
            .env("INCUS_DIR", self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("running incus");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Every mount point at or below `root`, deepest first.
    fn mounts_below(root: &Path) -> Vec<PathBuf> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut out: Vec<PathBuf> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            // mountinfo escapes spaces and the like as octal; temp dirs have none.
            .map(PathBuf::from)
            .filter(|p| p.starts_with(root))
            .collect();
        out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        out.dedup();
        out
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Instances first, forcibly: their clean stop is not what is under test.
        if let (true, list, _) = self.incus(&["list", "--format", "csv", "--columns", "n"]) {
            for name in list.lines().filter(|l| !l.is_empty()) {
                let _ = self.incus(&["delete", "--force", name]);
            }
        }
        let _ = self.incus(&["admin", "shutdown", "--timeout", "60"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => {
                    eprintln!("incusd did not exit after `incus admin shutdown`; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        for m in Self::mounts_below(self.dir.path()) {
            let ok = Command::new("umount")
                .arg(&m)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&m).status();
            }
        }
    }

    /// Stops the daemon now and checks that it left no mount behind.
    pub fn shutdown(mut self) {
        self.stop();
        let left = Self::mounts_below(self.dir.path());
        assert!(left.is_empty(), "mounts left behind: {left:?}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}
