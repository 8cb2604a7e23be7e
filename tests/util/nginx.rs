//! nginx in front of the binary under test, for the cache tests: each one in its own temporary
//! prefix (configuration, logs, pid, temp files and caches), listening on free loopback ports,
//! stopped when dropped.

use super::{free_port, stop_daemon};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nginx {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// `127.0.0.1:PORT` of each listener, in the order `start` handed out the ports.
    pub addrs: Vec<String>,
}

impl Nginx {
    /// Starts nginx with `http(prefix, ports)` as the inside of its `http` block, `ports` being
    /// `listeners` free ports for its `listen` lines; it may write files the block includes into
    /// the prefix. The rest of the configuration is the same for every test: no daemon, one
    /// worker, every file under the prefix, and an access log of the request, the status, the
    /// upstream status and the cache status. Another process may take a port between the probe
    /// and nginx's bind, so a start that fails on a port in use is tried again with others.
    pub fn start(listeners: usize, http: impl Fn(&str, &[u16]) -> String) -> Nginx {
        // As root, the workers would switch to `nobody` and lose access to the temporary
        // directory; keep them as the current user.
        let user = if id("-u") == "0" {
            format!("user {} {};", id("-un"), id("-gn"))
        } else {
            String::new()
        };
        for _ in 0..10 {
            let dir = tempfile::tempdir().expect("tempdir");
            let d = dir.path().display().to_string();
            let ports: Vec<u16> = (0..listeners).map(|_| free_port()).collect();
            let inside = http(&d, &ports);
            let conf = format!(
                "daemon off;
{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 64; }}
http {{
    log_format cache '$request_uri $status $upstream_status $upstream_cache_status';
    access_log {d}/access.log cache;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{inside}
}}
"
            );
            std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
            let child = spawn(dir.path());
            let mut n = Nginx {
                dir,
                child: Some(child),
                addrs: ports.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
            };
            if n.wait_listening() {
                return n;
            }
            let log = n.log("error.log");
            assert!(log.contains("in use"), "nginx did not start:\n{log}");
        }
        panic!("nginx found no free ports");
    }

    /// Whether every listener accepts connections within ten seconds (false at once if nginx
    /// exits).
    fn wait_listening(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                return false;
            }
            let up = self
                .addrs
                .iter()
                .all(|a| std::net::TcpStream::connect(a.as_str()).is_ok());
            if up {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The prefix: a scratch directory the test may use too.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A log file in the prefix (`error.log`, `access.log`), empty if there is none yet.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// Asserts that nginx logged nothing worse than an error.
    pub fn assert_no_severe_errors(&self) {
        let log = self.log("error.log");
        assert!(
            !log.contains("[emerg]") && !log.contains("[alert]") && !log.contains("[crit]"),
            "{log}"
        );
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_daemon(child);
        }
    }
}

/// Starts nginx with `prefix/nginx.conf` as its configuration and the prefix as its working
/// directory (logs, pid and temp files stay in there).
fn spawn(prefix: &Path) -> Child {
    Command::new("nginx")
        .arg("-p")
        .arg(prefix)
        .arg("-c")
        .arg(prefix.join("nginx.conf"))
        .arg("-e")
        .arg(prefix.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning nginx")
}

fn id(flag: &str) -> String {
    let out = Command::new("id").arg(flag).output().expect("id");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
