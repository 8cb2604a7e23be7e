//! systemd integration without libsystemd: socket activation (`LISTEN_FDS`) and readiness
//! notification (`NOTIFY_SOCKET`).

use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd};

/// The first socket passed by systemd, if `LISTEN_PID` names this process.
pub fn listen_fd() -> Result<Option<TcpListener>, String> {
    let pid_matches = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count: usize = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if !pid_matches || count == 0 {
        return Ok(None);
    }
    // The variables are left in place: imgsrv starts no child processes that could mistake
    // the socket for theirs, and changing the environment of a multi-threaded process is unsound.
    //
    // Check that fd 3 is open and a socket before taking it, without touching it: its
    // /proc/self/fd link names the socket (a `stat`, which opens no descriptor).
    let link = std::fs::read_link("/proc/self/fd/3")
        .map_err(|e| format!("LISTEN_FDS is set but fd 3 is not open: {e}"))?;
    if !link.to_string_lossy().starts_with("socket:") {
        return Err(format!(
            "LISTEN_FDS is set but fd 3 is {}, not a socket",
            link.display()
        ));
    }
    // SAFETY: `serve` calls this before the process opens any file or socket, so the open
    // socket at fd 3 is the one systemd passed (LISTEN_PID names this process) and nothing
    // else in imgsrv refers to fd 3; taking ownership of it exactly once here is sound.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    let sock_type =
        rustix::net::sockopt::socket_type(&fd).map_err(|e| format!("LISTEN_FDS socket: {e}"))?;
    if sock_type != rustix::net::SocketType::STREAM {
        return Err("the socket passed by systemd is not a stream socket".into());
    }
    Ok(Some(TcpListener::from(fd)))
}

/// Sends a notification such as `READY=1` or `STOPPING=1` to systemd, if it asked for them.
pub fn notify(state: &str) {
    let Ok(path) = std::env::var("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let result = if let Some(abstract_name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = result {
        crate::log::warn(&format!("cannot notify systemd ({state}): {e}"));
    }
}
