//! Start-up and wiring: the data directory, the store, the bootstrap token, background workers
//! and the HTTP server.

use crate::api::App;
use crate::config::Config;
use crate::store::{DB_FILE, Store};
use crate::{jobs, log, server};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Runs the server until it fails; returns the failure.
pub fn serve(config: Config) -> Result<(), String> {
    log::init(config.log_format, config.verbosity);
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        format!(
            "cannot create data directory {}: {e}",
            config.data_dir.display()
        )
    })?;
    let db_path = config.data_dir.join(DB_FILE);
    let store = Arc::new(Store::open(&db_path, config.cache_bytes).map_err(|e| e.to_string())?);
    log::info(&format!("database open at {}", db_path.display()));
    write_bootstrap_token(&store, &config)?;

    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = crossbeam_channel::bounded(4096);
    jobs::start_workers(store.clone(), rx, config.publish_workers, stop.clone());
    for id in store.unfinished_jobs().map_err(|e| e.to_string())? {
        log::info(&format!("resuming publish job {id}"));
        let _ = tx.try_send(id);
    }
    jobs::start_sweeper(store.clone(), config.sweep_interval, stop.clone());

    let app = Arc::new(App {
        store,
        upload_ttl: config.upload_ttl,
        jobs: tx,
        ready: AtomicBool::new(false),
    });
    let (listener, addr) = server::bind(&config.listen)?;
    app.ready.store(true, Ordering::SeqCst);
    log::info(&format!("listening on http://{addr}"));
    server::run(listener, app, config.http_threads)
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
