//! The admin socket: a Unix socket in the data directory (`imgsrv-admin.sock`) through which
//! operator commands reach the running server. Today it serves one request, `backup`, which
//! streams a consistent dump of the database from one read transaction
//! (`store::backup`), so a backup never stops the server, never delays a download and never
//! holds a write lock.
//!
//! Who may connect: the socket file is made mode 0600 inside the data directory (0700 when
//! imgsrv created it), and each connection's peer credentials are checked as well: only the
//! server's own user and root are served, whatever the directory's permissions.

use crate::log;
use crate::store::Store;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The socket's name inside the data directory.
pub const ADMIN_SOCKET: &str = "imgsrv-admin.sock";

/// The request line that asks for a backup stream.
pub const BACKUP_REQUEST: &str = "backup v1\n";

/// The path of the admin socket of a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(ADMIN_SOCKET)
}

/// A Unix socket address is limited to about 100 bytes. A longer path is reached through the
/// data directory's file descriptor (`/proc/self/fd/N/imgsrv-admin.sock`), which works for
/// `bind` and `connect` alike on Linux; the returned directory handle must stay open meanwhile.
fn address(path: &Path) -> std::io::Result<(PathBuf, Option<std::fs::File>)> {
    if path.as_os_str().len() < 100 {
        return Ok((path.to_path_buf(), None));
    }
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?;
    let name = path.file_name().unwrap_or_default();
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    Ok((short, Some(dir)))
}

/// Connects to a data directory's admin socket. `Ok(None)` means no server answers there (no
/// socket, or a stale one left by a killed server).
pub fn connect(data_dir: &Path) -> std::io::Result<Option<UnixStream>> {
    let (addr, _dir) = address(&socket_path(data_dir))?;
    match UnixStream::connect(&addr) {
        Ok(s) => Ok(Some(s)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The running admin socket.
pub struct AdminServer {
    path: PathBuf,
    thread: JoinHandle<()>,
}

/// Connections being served, so that a shutdown can cut them off instead of waiting for a
/// slow reader.
type Open = Arc<Mutex<Vec<(UnixStream, JoinHandle<()>)>>>;

impl AdminServer {
    /// Binds the admin socket (replacing a stale one: the database lock, taken before this,
    /// already proves no other server uses this directory) and serves it until `stop`.
    pub fn start(
        data_dir: &Path,
        store: Arc<Store>,
        stop: Arc<AtomicBool>,
    ) -> Result<AdminServer, String> {
        let path = socket_path(data_dir);
        let (addr, _dir) = address(&path).map_err(|e| {
            format!(
                "cannot reach the data directory {}: {e}",
                data_dir.display()
            )
        })?;
        let _ = std::fs::remove_file(&addr);
        let listener = UnixListener::bind(&addr)
            .map_err(|e| format!("cannot create the admin socket {}: {e}", path.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&addr, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("cannot restrict the admin socket {}: {e}", path.display()))?;
        }
        // Polled, so that the thread notices a shutdown within a tenth of a second.
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("admin socket: {e}"))?;
        let busy = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || {
                let open: Open = Arc::default();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            accept(conn, &store, &stop, &busy, &open);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        Err(e) => {
                            log::warn(&format!("admin socket: accept failed: {e}"));
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                    open.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .retain(|(_, h)| !h.is_finished());
                }
                // Cut off backups still streaming (their client reports the shutdown) and wait
                // for their threads, which hold read transactions on the store.
                let conns = std::mem::take(&mut *open.lock().unwrap_or_else(|p| p.into_inner()));
                for (conn, handle) in conns {
                    let _ = conn.shutdown(std::net::Shutdown::Both);
                    let _ = handle.join();
                }
            })
            .map_err(|e| format!("cannot start the admin socket thread: {e}"))?;
        Ok(AdminServer { path, thread })
    }

    /// Waits for the admin thread (after `stop` was set) and removes the socket file.
    pub fn stop(self) {
        let _ = self.thread.join();
        if let Ok((addr, _dir)) = address(&self.path) {
            let _ = std::fs::remove_file(addr);
        }
    }
}

/// Whether the connecting process runs as this server's user (or as root).
fn trusted(conn: &UnixStream) -> bool {
    match rustix::net::sockopt::socket_peercred(conn) {
        Ok(cred) => {
            let peer = cred.uid.as_raw();
            peer == 0 || peer == rustix::process::geteuid().as_raw()
        }
        Err(_) => false,
    }
}

fn accept(
    conn: UnixStream,
    store: &Arc<Store>,
    stop: &Arc<AtomicBool>,
    busy: &Arc<AtomicBool>,
    open: &Open,
) {
    let _ = conn.set_nonblocking(false);
    if !trusted(&conn) {
        log::warn("admin socket: refused a connection from another user");
        return;
    }
    let Ok(handle_conn) = conn.try_clone() else {
        return;
    };
    let (store, stop, busy) = (store.clone(), stop.clone(), busy.clone());
    let spawned = std::thread::Builder::new()
        .name("admin-conn".into())
        .spawn(move || serve(conn, &store, &stop, &busy));
    match spawned {
        Ok(h) => open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((handle_conn, h)),
        Err(e) => log::warn(&format!("admin socket: cannot start a thread: {e}")),
    }
}

/// Writes an error frame of the dump stream (`store::backup`), which the client reports.
fn refuse(conn: &mut UnixStream, msg: &str) {
    let mut frame = vec![b'X'];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(msg.as_bytes());
    let _ = conn.write_all(&frame);
}

fn serve(mut conn: UnixStream, store: &Store, stop: &AtomicBool, busy: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    // A client that stops reading must not hold its read transaction (and with it every page
    // freed meanwhile) for long.
    let _ = conn.set_write_timeout(Some(Duration::from_secs(60)));
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&conn, 4 << 20);
    let mut line = String::new();
    let read = BufReader::new(&conn).take(256).read_line(&mut line);
    if read.is_err() || line != BACKUP_REQUEST {
        refuse(
            &mut conn,
            &format!("unknown admin request {:?}", line.trim()),
        );
        return;
    }
    if busy.swap(true, Ordering::SeqCst) {
        refuse(
            &mut conn,
            "another backup is running; try again when it has finished",
        );
        return;
    }
    let started = std::time::Instant::now();
    log::info("backup requested on the admin socket: streaming a snapshot of the database");
    let result = {
        let mut out = BufWriter::with_capacity(crate::store::backup::STREAM_BUFFER, &conn);
        store.dump(&mut out, &|| stop.load(Ordering::SeqCst))
    };
    busy.store(false, Ordering::SeqCst);
    match result {
        Ok(s) => log::event(
            "info",
            1,
            "backup streamed",
            &[
                ("rows", s.rows.to_string()),
                ("bytes", s.bytes.to_string()),
                ("seconds", format!("{:.1}", started.elapsed().as_secs_f64())),
            ],
        ),
        Err(e) => log::warn(&format!("backup stream ended early: {e}")),
    }
}
