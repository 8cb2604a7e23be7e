//! Start-up and wiring: the data directory, the store, the bootstrap token, background workers,
//! the request server (tiny_http on a private socket) and the front door on the network.

use crate::api::App;
use crate::config::Config;
use crate::frontdoor::{FrontDoor, Stats};
use crate::store::{DB_FILE, OpenError, Store};
use crate::{jobs, log, server};
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Why the server stopped with an error, and the exit code that tells it apart.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub exit_code: u8,
}

/// Exit code of a start refused because the database file is damaged.
pub const EXIT_DAMAGED: u8 = 3;

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure {
            message,
            exit_code: 1,
        }
    }
}

/// Runs the server until it fails; returns the failure.
pub fn serve(config: Config) -> Result<(), Failure> {
    // First, before anything opens a file descriptor: a socket passed by systemd is fd 3.
    let passed = crate::systemd::listen_fd()?;
    log::init(config.log_format, config.verbosity);
    raise_fd_limit();
    exit_on_foreign_panics();
    // A directory imgsrv creates is private to its user (0700): it holds the database (drafts
    // are not public) and the bootstrap token. An existing one keeps the operator's choice.
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
            .map_err(|e| {
                format!(
                    "cannot create data directory {}: {e}",
                    config.data_dir.display()
                )
            })?;
    }
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => Some(crate::frontdoor::tls::load(c, k)?),
        _ => None,
    };
    // Bind the sockets before opening the database: an address in use is reported at once,
    // without touching the data.
    let listener = listener(passed, &config.listen)?;
    let metrics_listener = match &config.metrics_listen {
        Some(m) => Some(TcpListener::bind(m).map_err(|e| {
            format!(
                "cannot listen for metrics on {m}: {e} (choose another address with \
                 --metrics-listen, or turn metrics off with --metrics-listen '')"
            )
        })?),
        None => None,
    };
    let db_path = config.data_dir.join(DB_FILE);
    let store = match Store::open(&db_path, config.cache_bytes, config.disk_reserve) {
        Ok(s) => Arc::new(s),
        Err(OpenError::Damaged(message)) => {
            return Err(Failure {
                message,
                exit_code: EXIT_DAMAGED,
            });
        }
        Err(OpenError::Other(message)) => return Err(message.into()),
    };
    log::info(&format!("database open at {}", db_path.display()));
    if let Err(e) = write_bootstrap_token(&store, &config) {
        // On a full disk the server still comes up to serve reads; the token is minted at
        // the next start with space.
        if store.can_write() {
            return Err(e.into());
        }
        log::warn(&format!("no bootstrap token: {e}"));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = crossbeam_channel::bounded(4096);
    let publishers = jobs::start_workers(
        store.clone(),
        rx,
        config.publish_workers,
        config.retire_grace,
        stop.clone(),
    );
    for id in store.unfinished_jobs().map_err(|e| e.to_string())? {
        log::info(&format!("resuming publish job {id}"));
        let _ = tx.try_send(id);
    }
    let sweeper = jobs::start_sweeper(
        store.clone(),
        config.sweep_interval,
        config.retire_grace,
        stop.clone(),
    );
    let doctor = jobs::start_doctor(store.clone(), stop.clone());
    let scrub = crate::scrub::start(store.clone(), config.scrub, stop.clone());
    let admin = crate::admin::AdminServer::start(&config.data_dir, store.clone(), stop.clone())?;

    let app = Arc::new(App {
        store: store.clone(),
        upload_ttl: config.upload_ttl,
        retire_grace: config.retire_grace,
        jobs: tx,
        ready: AtomicBool::new(false),
        streams_cache: std::sync::Mutex::new(None),
        page_cache: Default::default(),
        tls: tls.is_some(),
        public_url: config.public_url.clone(),
    });
    let socket = backend_socket_path(&config);
    let request_server = server::start(&socket, app.clone(), config.http_threads, stop.clone())?;

    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| config.listen.clone());
    let scheme = if tls.is_some() { "https" } else { "http" };
    // The front door knows the store only as where blob bodies come from.
    let weak_store: std::sync::Weak<crate::store::Store> = Arc::downgrade(&store);
    let blobs: std::sync::Weak<dyn crate::hop::BlobSource> = weak_store;
    let door = Arc::new(FrontDoor {
        blobs,
        withholds_body: crate::api::withholds_body,
        limits: config.limits.clone(),
        tls,
        socket: socket.clone(),
        stats: Arc::new(Stats::default()),
        stop: stop.clone(),
    });
    if let Some(l) = metrics_listener {
        let shown = l
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        crate::metrics::serve(l, Arc::downgrade(&store), door.stats.clone());
        log::info(&format!("metrics on http://{shown}/metrics"));
    }
    watch_signals(stop.clone())?;
    app.ready.store(true, Ordering::SeqCst);
    log::info(&format!("listening on {scheme}://{addr}"));
    crate::systemd::notify("READY=1");
    let result = door.clone().run(listener);

    // Graceful shutdown: stop accepting (done), let in-flight requests finish within the
    // bound, stop publish steps at their next safe point, then close the database.
    stop.store(true, Ordering::SeqCst);
    app.ready.store(false, Ordering::SeqCst);
    // A backup still streaming is cut off (its client says the server stopped) and the admin
    // socket file removed; the scrub stops at its next batch.
    admin.stop();
    if let Some(h) = scrub {
        let _ = h.join();
    }
    let open = door.drain(config.shutdown_timeout);
    if open > 0 {
        log::warn(&format!(
            "{open} connections still busy after {:?}; exiting without waiting for them",
            config.shutdown_timeout
        ));
        return result.map_err(Failure::from);
    }
    request_server.stop();
    drop(app);
    for h in publishers {
        let _ = h.join();
    }
    let _ = sweeper.join();
    let _ = doctor.join();
    let _ = std::fs::remove_file(&socket);
    match Arc::try_unwrap(store) {
        Ok(store) => {
            drop(store);
            log::info("database closed; stopped cleanly");
        }
        Err(store) => {
            store.close();
            log::warn(
                "database still in use at exit; closed it anyway (a straggling reader fails)",
            );
        }
    }
    result.map_err(Failure::from)
}

/// SIGTERM and SIGINT start a graceful shutdown; a second signal exits at once.
fn watch_signals(stop: Arc<AtomicBool>) -> Result<(), String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if stop.swap(true, Ordering::SeqCst) {
                    log::warn("second signal: exiting immediately");
                    std::process::exit(1);
                }
                crate::systemd::notify("STOPPING=1");
                log::info(&format!("signal {sig} received: shutting down gracefully"));
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}

/// Raises the soft file-descriptor limit to the hard one: each connection needs about four
/// descriptors, and the front door sizes its connection budget from the soft limit (systemd's
/// default soft limit of 1024 would otherwise cap imgsrv at about 240 connections).
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            log::warn(&format!("cannot raise the file-descriptor limit: {e}"));
        }
    }
}

/// Every thread imgsrv starts has a name; tiny_http's internal threads do not. A panic in one of
/// those (tiny_http unwraps when a socket cannot be cloned, e.g. out of descriptors) leaves the
/// request server unable to accept while the process looks alive, so exit and let systemd
/// restart instead. Panics in our own handlers are caught per request and unaffected.
fn exit_on_foreign_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // A panic inside redb on a damaged page is caught and reported as damage by the
        // store; printing it as a crash would only alarm.
        if crate::store::handle::panic_is_guarded() {
            return;
        }
        default(info);
        if std::thread::current().name().is_none() {
            log::error(&format!(
                "an internal request-server thread panicked ({info}); exiting for a restart"
            ));
            std::process::exit(70);
        }
    }));
}

/// tiny_http's private socket: in the data directory (whose permissions protect it) unless
/// that path is too long for a Unix socket address.
fn backend_socket_path(config: &Config) -> PathBuf {
    let p = config.data_dir.join("imgsrv.sock");
    if p.as_os_str().len() < 100 {
        p
    } else {
        std::env::temp_dir().join(format!("imgsrv-{}.sock", std::process::id()))
    }
}

/// The network listener: the socket passed by systemd (`LISTEN_FDS`), else a bound address.
fn listener(passed: Option<TcpListener>, listen: &str) -> Result<TcpListener, String> {
    if let Some(l) = passed {
        log::info("using the socket passed by systemd");
        return Ok(l);
    }
    TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))
}

/// Mints a bootstrap auth-manager token when no live one exists and writes it, mode 0600, to
/// `bootstrap-token` in the data directory. The token itself is never logged.
fn write_bootstrap_token(store: &Store, config: &Config) -> Result<(), String> {
    if store.has_live_auth_manager().map_err(|e| e.to_string())? {
        return Ok(());
    }
    let token = store.mint_bootstrap_token().map_err(|e| e.to_string())?;
    let path = config.data_dir.join("bootstrap-token");
    let tmp = config.data_dir.join("bootstrap-token.tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    writeln!(f, "{token}")
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    log::warn(&format!(
        "minted a bootstrap auth-manager token valid for 24h; it is in {}",
        path.display()
    ));
    Ok(())
}
