//! Background work: the publish-job worker pool (fed by a bounded crossbeam channel) and the
//! sweeper that aborts expired upload sessions and collects unreferenced blobs.

use crate::clock::Timestamp;
use crate::log;
use crate::model::StepName;
use crate::store::Store;
use crate::store::jobs::NextStep;
use crossbeam_channel::Receiver;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use uuid::Uuid;

/// Starts `n` publish workers that run each job received on `rx` to its end.
pub fn start_workers(
    store: Arc<Store>,
    rx: Receiver<Uuid>,
    n: usize,
    stop: Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    let mut handles = Vec::new();
    for i in 0..n.max(1) {
        let store = store.clone();
        let rx = rx.clone();
        let stop = stop.clone();
        let h = std::thread::Builder::new()
            .name(format!("publish-{i}"))
            .spawn(move || {
                for id in rx.iter() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    run_job(&store, id, &stop);
                }
            })
            .expect("spawning a publish worker");
        handles.push(h);
    }
    handles
}

/// Runs a job's steps in sequence until it succeeds, fails or the server stops. Each step
/// boundary is a safe stopping point: an unfinished job resumes at the next start.
pub fn run_job(store: &Store, id: Uuid, stop: &AtomicBool) {
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let step = match store.claim_next_step(id) {
            Ok(NextStep::Run(step)) => step,
            Ok(NextStep::Done) => return,
            Err(e) => {
                log::error(&format!("publish job {id}: claiming a step failed: {e}"));
                return;
            }
        };
        let started = std::time::Instant::now();
        let outcome = match step {
            StepName::ValidateCatalog => store
                .validate_for_publish(id)
                .and_then(|_| store.step_succeeded(id, step)),
            StepName::IncusIndex => store
                .index_for_incus(id, &|| stop.load(Ordering::SeqCst))
                .and_then(|_| store.step_succeeded(id, step)),
            StepName::FinalizePublish => store.finalize_publish(id),
        };
        let fields = [
            ("job_id", id.to_string()),
            ("step", step.to_string()),
            (
                "duration_ms",
                format!("{:.1}", started.elapsed().as_secs_f64() * 1000.0),
            ),
        ];
        match outcome {
            Ok(()) => log::event("info", 1, "publish step succeeded", &fields),
            Err(e) if stop.load(Ordering::SeqCst) => {
                log::event(
                    "info",
                    1,
                    &format!("publish step interrupted by shutdown: {e}"),
                    &fields,
                );
                return;
            }
            Err(e) => {
                log::event("warn", 0, &format!("publish step failed: {e}"), &fields);
                if let Err(e2) = store.step_failed(id, step, &e.detail) {
                    log::error(&format!("publish job {id}: recording failure failed: {e2}"));
                }
                return;
            }
        }
    }
}

/// Every `interval`, aborts expired upload sessions and deletes unreferenced blobs.
pub fn start_sweeper(
    store: Arc<Store>,
    interval: Duration,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("sweeper".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                // Sleep in short slices so that a shutdown does not wait a whole interval.
                let wake = std::time::Instant::now() + interval;
                while std::time::Instant::now() < wake && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100).min(interval));
                }
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let now = Timestamp::now();
                match store.sweep_expired_uploads(now) {
                    Ok(0) => {}
                    Ok(n) => log::info(&format!("sweeper aborted {n} expired upload sessions")),
                    Err(e) => log::error(&format!("sweeping uploads failed: {e}")),
                }
                match store.collect_garbage(now) {
                    Ok(0) => {}
                    Ok(n) => log::info(&format!("garbage collection deleted {n} blobs")),
                    Err(e) => log::error(&format!("garbage collection failed: {e}")),
                }
            }
        })
        .expect("spawning the sweeper")
}

/// Watches the store's health: reopens the database within a tick of an I/O error (redb
/// refuses everything after one until it is reopened), leaves read-only mode once space is
/// back, and keeps the headroom file in place. Logs the cause with the data directory's free
/// space when the store stops being writable.
pub fn start_doctor(store: Arc<Store>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    use crate::store::Health;
    std::thread::Builder::new()
        .name("storage-doctor".into())
        .spawn(move || {
            let mut tick = 0u64;
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
                tick += 1;
                let read_only = store.health() == Health::ReadOnly;
                // A read-only store tries a writable open every 2 s once the filesystem has
                // room beyond the reserve again (a reopen cuts the downloads in flight short).
                let space_back = read_only
                    && tick.is_multiple_of(40)
                    && store.filesystem_free() >= store.reserve_bytes() + (4 << 20);
                if crate::store::handle::needs_reopen() || space_back {
                    let free = store.filesystem_free();
                    if !read_only {
                        log::error(&format!(
                            "storage error: reopening the database ({} bytes free on the data \
                             filesystem, {} reserved)",
                            free,
                            store.reserve_bytes()
                        ));
                    }
                    let started = std::time::Instant::now();
                    let health = store.recover();
                    if health == Health::Writable {
                        log::info(&format!(
                            "storage recovered in {:.1} ms",
                            started.elapsed().as_secs_f64() * 1000.0
                        ));
                    }
                }
                if tick.is_multiple_of(20) {
                    store.maintain_headroom();
                }
            }
        })
        .expect("spawning the storage doctor")
}
