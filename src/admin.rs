//! The admin socket: a Unix socket in the data directory (`imgsrv-admin.sock`) through which
//! operator commands reach the running server. Today it serves one request, `backup`: the
//! client creates the new file and passes its descriptor along with the request (`SCM_RIGHTS`),
//! and the server writes a consistent copy of the database into it from one read transaction
//! (`store::backup`), so a backup never stops the server, never delays a download and never
//! holds a write lock. The server needs no write access to the backup's directory (its
//! systemd sandbox gives it none), and the bytes never cross the socket: only progress does.
//!
//! The protocol, both ends of which live here: the request line [`BACKUP_REQUEST`] with the
//! descriptor, then frames from the server, integers big-endian: `'P' | u64 done | u64 total`
//! (progress, a few a second), and finally `'Z' | u32 tables | u64 rows | u64 bytes` (the copy
//! is complete and durable) or `'X' | u32 length | message` (it failed, and why).
//!
//! Who may connect: the socket file is made mode 0600 inside the data directory (0700 when
//! imgsrv created it), and each connection's peer credentials are checked as well: only the
//! server's own user and root are served, whatever the directory's permissions.

use crate::log;
use crate::store::Store;
use crate::store::backup::{Pace, Summary};
use std::fs::File;
use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The socket's name inside the data directory.
pub const ADMIN_SOCKET: &str = "imgsrv-admin.sock";

/// The request that asks for a backup, sent with the descriptor of the file to write:
/// `backup v2\n`, or `backup v2 rate=BYTES\n` for a backup held to that many bytes a second.
/// (Version 1 streamed the copy over the socket instead; this server refuses it by name.)
pub fn backup_request(rate: Option<u64>) -> String {
    match rate {
        Some(r) => format!("backup v2 rate={r}\n"),
        None => "backup v2\n".to_string(),
    }
}

/// The rate a backup request asks for (`Ok(None)`: no limit), or `Err` if it is not one.
fn parse_backup_request(line: &str) -> Result<Option<u64>, ()> {
    match line
        .strip_suffix('\n')
        .and_then(|l| l.strip_prefix("backup v2"))
    {
        Some("") => Ok(None),
        Some(rest) => match rest.strip_prefix(" rate=").map(str::parse::<u64>) {
            Some(Ok(r)) if r > 0 => Ok(Some(r)),
            _ => Err(()),
        },
        None => Err(()),
    }
}

/// How often the server reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// How long a shutdown lets running backups end on their own, with their client told why,
/// before it cuts their connections.
const LAST_WORD: Duration = Duration::from_secs(2);

/// What the server answers a backup request with.
#[derive(Debug)]
pub enum Reply {
    Progress { done: u64, total: u64 },
    Done(Summary),
    Failed(String),
}

impl Reply {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Reply::Progress { done, total } => {
                b.push(b'P');
                b.extend_from_slice(&done.to_be_bytes());
                b.extend_from_slice(&total.to_be_bytes());
            }
            Reply::Done(s) => {
                b.push(b'Z');
                b.extend_from_slice(&s.tables.to_be_bytes());
                b.extend_from_slice(&s.rows.to_be_bytes());
                b.extend_from_slice(&s.bytes.to_be_bytes());
            }
            Reply::Failed(msg) => {
                let msg = &msg.as_bytes()[..msg.len().min(64 * 1024)];
                b.push(b'X');
                b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                b.extend_from_slice(msg);
            }
        }
        b
    }

    /// Reads one frame.
    pub fn read(r: &mut impl Read) -> std::io::Result<Reply> {
        fn u64(r: &mut impl Read) -> std::io::Result<u64> {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            Ok(u64::from_be_bytes(b))
        }
        fn u32(r: &mut impl Read) -> std::io::Result<u32> {
            let mut b = [0u8; 4];
            r.read_exact(&mut b)?;
            Ok(u32::from_be_bytes(b))
        }
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag)?;
        match tag[0] {
            b'P' => Ok(Reply::Progress {
                done: u64(r)?,
                total: u64(r)?,
            }),
            b'Z' => Ok(Reply::Done(Summary {
                tables: u32(r)?,
                rows: u64(r)?,
                bytes: u64(r)?,
            })),
            b'X' => {
                let mut msg = vec![0u8; (u32(r)? as usize).min(64 * 1024)];
                r.read_exact(&mut msg)?;
                Ok(Reply::Failed(String::from_utf8_lossy(&msg).into_owned()))
            }
            t => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("an unknown reply {t:#x} (is the server another imgsrv version?)"),
            )),
        }
    }
}

/// The client's side: asks the server behind `conn` to write a backup into `file` (new and
/// empty), reporting progress, until the copy is durable. Errors are operator-readable.
pub fn request_backup(
    conn: UnixStream,
    file: &File,
    rate: Option<u64>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Summary, String> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [file.as_fd()];
    control.push(SendAncillaryMessage::ScmRights(&fds));
    let line = backup_request(rate);
    let request = [std::io::IoSlice::new(line.as_bytes())];
    sendmsg(&conn, &request, &mut control, SendFlags::empty())
        .map_err(|e| format!("asking the server for a backup: {e}"))?;
    let mut conn = std::io::BufReader::new(conn);
    loop {
        match Reply::read(&mut conn) {
            Ok(Reply::Progress { done, total }) => progress(done, total),
            Ok(Reply::Done(summary)) => return Ok(summary),
            Ok(Reply::Failed(msg)) => return Err(format!("the server refused: {msg}")),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(
                    "the server closed the connection before the backup was finished \
                            (did it stop?)"
                        .into(),
                );
            }
            Err(e) => return Err(format!("reading the server's answer: {e}")),
        }
    }
}

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
                // A running backup sees the stop within a tenth of a second and tells its
                // client why it ends; it gets `LAST_WORD` to do so. Only a connection still
                // busy after that (a client that stopped reading, so the write blocks) is cut
                // off: cutting first would race the message and leave the client guessing.
                // Their threads hold read transactions on the store, so they are joined.
                let conns = std::mem::take(&mut *open.lock().unwrap_or_else(|p| p.into_inner()));
                let deadline = std::time::Instant::now() + LAST_WORD;
                for (conn, handle) in conns {
                    while !handle.is_finished() && std::time::Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if !handle.is_finished() {
                        let _ = conn.shutdown(std::net::Shutdown::Both);
                    }
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

fn reply(mut conn: &UnixStream, r: &Reply) -> std::io::Result<()> {
    conn.write_all(&r.encode())
}

/// Reads the request line and the descriptor that comes with it.
fn receive_request(conn: &UnixStream) -> Result<(String, Option<File>), String> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut line = Vec::new();
    let mut file = None;
    // The line arrives in one piece in practice; the loop only guards against a split.
    while !line.ends_with(b"\n") && line.len() < 256 {
        let mut buf = [0u8; 256];
        let got = recvmsg(
            conn,
            &mut [std::io::IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(|e| format!("reading the request: {e}"))?;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = message {
                for fd in fds {
                    file.get_or_insert(File::from(fd));
                }
            }
        }
        if got.bytes == 0 {
            break;
        }
        line.extend_from_slice(&buf[..got.bytes]);
    }
    Ok((String::from_utf8_lossy(&line).into_owned(), file))
}

fn serve(conn: UnixStream, store: &Store, stop: &AtomicBool, busy: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    // A client that stops reading its progress must not keep a read transaction (and with it
    // every page freed meanwhile) for long.
    let _ = conn.set_write_timeout(Some(Duration::from_secs(60)));
    let (line, file) = match receive_request(&conn) {
        Ok(r) => r,
        Err(e) => {
            log::warn(&format!("admin socket: {e}"));
            return;
        }
    };
    let Ok(rate) = parse_backup_request(&line) else {
        let _ = reply(
            &conn,
            &Reply::Failed(format!(
                "unknown admin request {:?}; use the imgsrv binary of the running server",
                line.trim()
            )),
        );
        return;
    };
    let Some(file) = file else {
        let _ = reply(
            &conn,
            &Reply::Failed("the backup request came without a file to write".into()),
        );
        return;
    };
    if busy.swap(true, Ordering::SeqCst) {
        let _ = reply(
            &conn,
            &Reply::Failed("another backup is running; try again when it has finished".into()),
        );
        return;
    }
    let started = std::time::Instant::now();
    log::info(&match rate {
        Some(r) => format!(
            "backup requested on the admin socket: copying a snapshot of the database at up to {r} bytes a second"
        ),
        None => "backup requested on the admin socket: copying a snapshot of the database".into(),
    });
    // The client is told where the copy stands; a client that has gone away (killed, say)
    // makes the next report fail, which ends the copy.
    let gone = AtomicBool::new(false);
    let mut last = std::time::Instant::now();
    let _ = reply(&conn, &Reply::Progress { done: 0, total: 0 });
    let result = store.backup_into(
        file,
        Pace {
            rate,
            progress: &mut |done, total| {
                if last.elapsed() >= PROGRESS_EVERY {
                    last = std::time::Instant::now();
                    if reply(&conn, &Reply::Progress { done, total }).is_err() {
                        gone.store(true, Ordering::SeqCst);
                    }
                }
            },
            stop: &|| stop.load(Ordering::SeqCst) || gone.load(Ordering::SeqCst),
        },
    );
    busy.store(false, Ordering::SeqCst);
    match result {
        Ok(s) => {
            let _ = reply(&conn, &Reply::Done(s));
            log::event(
                "info",
                1,
                "backup written",
                &[
                    ("rows", s.rows.to_string()),
                    ("bytes", s.bytes.to_string()),
                    ("seconds", format!("{:.1}", started.elapsed().as_secs_f64())),
                ],
            )
        }
        Err(e) => {
            let why = if gone.load(Ordering::SeqCst) {
                "the client went away".to_string()
            } else {
                e.detail.clone()
            };
            let _ = reply(&conn, &Reply::Failed(e.detail));
            log::warn(&format!("backup not finished: {why}"));
        }
    }
}
