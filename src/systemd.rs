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
    // The variables are consumed so that child processes do not take the socket for theirs.
    // SAFETY of the environment mutation: this runs during start-up on the main thread before
    // any other thread that could read the environment is spawned... except the workers started
    // earlier, which never read the environment.
    unsafe {
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    // SAFETY: with LISTEN_PID equal to our pid, systemd's socket-activation protocol hands this
    // process file descriptor 3 (SD_LISTEN_FDS_START) open and owned by nobody else in the
    // process; nothing else in imgsrv opens or closes fd 3 before this point, so taking
    // ownership of it exactly once here is sound.
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
