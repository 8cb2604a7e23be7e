//! The front door: imgsrv owns its sockets. It accepts every client connection (TCP or a
//! socket passed by systemd, plain or TLS), enforces limits, answers what it rejects itself
//! (400, 408, 411, 413, 431, 503) and relays each well-formed request to tiny_http over a
//! private Unix socket, one backend connection per request. What crosses that hop, and which
//! bodies the front door moves itself instead (blob downloads, part uploads), is `hop`'s.
//!
//! Why: tiny_http 0.12 aborts the process when a declared body is dropped unread, has no header
//! size limit, no timeouts and unbounded threads, and stops accepting for good after one failed
//! `accept()` (docs/design.md). Here the declared body size is bounded before tiny_http sees it, the
//! number of connections (and so of threads and file descriptors) is bounded by configuration
//! and by the process's file-descriptor limit, and accept errors are waited out.

mod conn;
pub mod head;
pub mod tls;

use crate::log;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The limits the front door enforces. All are configurable.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    /// Time allowed for a whole request head (and TLS handshake) once it starts.
    pub header_timeout: Duration,
    /// Time a kept-alive connection may sit idle before its next request.
    pub idle_timeout: Duration,
    /// Time a body read or a response write may stall.
    pub io_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 4096,
            max_header_bytes: 64 * 1024,
            // The largest part (5 GiB) plus slack for JSON and rounding.
            max_body_bytes: 5 * 1024 * 1024 * 1024 + 1024 * 1024,
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(60),
        }
    }
}

/// File descriptors one relayed connection can hold at once: the client socket, our end of
/// the backend socket, and tiny_http's accepted socket plus its clone.
const FDS_PER_CONNECTION: usize = 4;
/// File descriptors kept free for the database, listeners, logging and a 503 reply. Under a
/// small limit only a quarter of it is kept, or a reserve larger than the limit would refuse
/// every connection for good.
const FD_RESERVE: usize = 64;

/// Live counters, exported as metrics.
#[derive(Default)]
pub struct Stats {
    pub active: AtomicUsize,
    pub accepted: AtomicUsize,
    pub rejected_busy: AtomicUsize,
    pub accept_errors: AtomicUsize,
}

pub struct FrontDoor {
    /// Blob bodies are streamed from here (the store); weak so that shutdown can close the
    /// database.
    pub blobs: std::sync::Weak<dyn crate::hop::BlobSource>,
    /// Which requests' bodies are withheld from the request server, by method and path: it
    /// answers them with a `receive` directive and the front door moves the body (see `hop`).
    /// The API decides which (`api::withholds_body`); the front door knows no route.
    pub withholds_body: fn(&str, &str) -> bool,
    pub limits: Limits,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Where the request server (tiny_http) listens: a Unix socket only this process (user)
    /// can reach.
    pub socket: PathBuf,
    pub stats: Arc<Stats>,
    pub stop: Arc<AtomicBool>,
}

impl FrontDoor {
    /// Waits until no connection is being served, or `timeout` passes. Returns how many are
    /// still open.
    pub fn drain(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.stats.active.load(Ordering::SeqCst);
            if n == 0 || Instant::now() >= deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// How many connections the current file-descriptor limit allows.
fn fd_budget(base_fds: usize) -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
        .min(1 << 30) as usize;
    soft.saturating_sub(base_fds + FD_RESERVE.min(soft / 4)) / FDS_PER_CONNECTION
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(32)
}

impl FrontDoor {
    /// Accepts connections until `stop` is set or the listener fails for good. The listener
    /// is polled in short slices so that a shutdown stops accepting promptly without touching
    /// the socket itself (under socket activation systemd keeps it for the next start).
    pub fn run(self: Arc<Self>, listener: TcpListener) -> Result<(), String> {
        let base_fds = open_fds();
        let mut last_error_log = Instant::now() - Duration::from_secs(60);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let mut fds = [rustix::event::PollFd::new(
                &listener,
                rustix::event::PollFlags::IN,
            )];
            let slice = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 250_000_000,
            };
            match rustix::event::poll(&mut fds, Some(&slice)) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(format!("waiting for connections failed: {e}")),
            }
            let (sock, _) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) => {
                    if self.stop.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    self.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    let transient = matches!(
                        e.raw_os_error(),
                        Some(23 | 24 | 103 | 105 | 12 | 4 | 11 | 71 | 110 | 111 | 113 | 1 | 92)
                    ) || matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::Interrupted
                            | std::io::ErrorKind::WouldBlock
                    );
                    if !transient {
                        return Err(format!("accepting connections failed: {e}"));
                    }
                    // Out of file descriptors or memory: wait for resources to come back
                    // instead of giving up the listener.
                    if last_error_log.elapsed() > Duration::from_secs(5) {
                        log::warn(&format!("accept failed, retrying: {e}"));
                        last_error_log = Instant::now();
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            let limit = self.limits.max_connections.min(fd_budget(base_fds));
            if self.stats.active.load(Ordering::SeqCst) >= limit {
                self.stats.rejected_busy.fetch_add(1, Ordering::Relaxed);
                reject_busy(sock, self.tls.is_some());
                continue;
            }
            self.stats.active.fetch_add(1, Ordering::SeqCst);
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("conn".into())
                // Part bodies are written into the store on this thread (redb write
                // transactions, sha256), which takes more stack than relaying; the stack is
                // reserved address space, and only the pages touched count as memory.
                .stack_size(1024 * 1024)
                .spawn(move || {
                    conn::serve(&me, sock);
                    me.stats.active.fetch_sub(1, Ordering::SeqCst);
                });
            if spawned.is_err() {
                self.stats.active.fetch_sub(1, Ordering::SeqCst);
                log::warn("cannot start a connection thread; connection dropped");
            }
        }
    }
}

/// Answers 503 on a connection over the limit without reading it, then closes. Over TLS a
/// plain-text answer would be garbage to the client, so the connection is just closed.
fn reject_busy(mut sock: TcpStream, tls: bool) {
    if !tls {
        let _ = sock.set_nonblocking(true);
        let _ = sock.write_all(&conn::simple_response(
            503,
            "server is at its connection limit; retry later",
            false,
        ));
    }
    let _ = sock.shutdown(std::net::Shutdown::Both);
}
