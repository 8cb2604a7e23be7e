//! Background work: the publish-job worker pool (fed by a bounded crossbeam channel) and the
//! sweeper that applies retention policies, purges retired versions whose grace has passed,
//! aborts expired upload sessions and collects unreferenced blobs.

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

/// Starts `n` publish workers that run each job received on `rx` to its end. A job that
/// succeeds is followed by its image's retention policy, whose retirements get `retire_grace`.
pub fn start_workers(
    store: Arc<Store>,
    rx: Receiver<Uuid>,
    n: usize,
    retire_grace: Duration,
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
                    if run_job(&store, id, &stop) {
                        apply_retention(&store, id, retire_grace);
                    }
                }
            })
            .expect("spawning a publish worker");
        handles.push(h);
    }
    handles
}

/// Runs a job's steps in sequence until it succeeds, fails or the server stops. Each step
/// boundary is a safe stopping point: an unfinished job resumes at the next start. Returns
/// whether this run published the version (its `finalize_publish` step succeeded).
pub fn run_job(store: &Store, id: Uuid, stop: &AtomicBool) -> bool {
    let mut published = false;
    loop {
        if stop.load(Ordering::SeqCst) {
            return published;
        }
        let step = match store.claim_next_step(id) {
            Ok(NextStep::Run(step)) => step,
            Ok(NextStep::Done) => return published,
            Err(e) => {
                log::error(&format!("publish job {id}: claiming a step failed: {e}"));
                return published;
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
            Ok(()) => {
                published |= step == StepName::FinalizePublish;
                log::event("info", 1, "publish step succeeded", &fields);
            }
            Err(e) if stop.load(Ordering::SeqCst) => {
                log::event(
                    "info",
                    1,
                    &format!("publish step interrupted by shutdown: {e}"),
                    &fields,
                );
                return published;
            }
            Err(e) => {
                log::event("warn", 0, &format!("publish step failed: {e}"), &fields);
                if let Err(e2) = store.step_failed(id, step, &e.detail) {
                    log::error(&format!("publish job {id}: recording failure failed: {e2}"));
                }
                return published;
            }
        }
    }
}

/// Applies the retention policy of a job's image right after the job published its version.
/// A failure is logged, never charged to the job: the version is published either way, and
/// the next sweep applies the policy again.
fn apply_retention(store: &Store, job: Uuid, grace: Duration) {
    if let Err(e) = store.apply_retention_after_publish(job, grace) {
        log::error(&format!(
            "publish job {job}: applying the retention policy failed: {e}"
        ));
    }
}

/// Every `interval`: applies retention policies, purges retired versions whose grace has
/// passed, aborts expired upload sessions and deletes unreferenced blobs, in that order, so
/// bytes a purge releases are collected in the same sweep.
pub fn start_sweeper(
    store: Arc<Store>,
    interval: Duration,
    retire_grace: Duration,
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
                // Retirements are logged one by one as they happen.
                if let Err(e) = store.apply_all_retention(now, retire_grace) {
                    log::error(&format!("applying retention policies failed: {e}"));
                }
                match store.purge_retired(now) {
                    Ok(0) => {}
                    Ok(n) => log::info(&format!(
                        "sweeper purged {n} retired versions whose grace period had passed"
                    )),
                    Err(e) => log::error(&format!("purging retired versions failed: {e}")),
                }
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
                            "storage error ({}): reopening the database in {}; {} bytes free \
                             on its filesystem, {} reserved",
                            crate::store::handle::last_fault(),
                            store.data_dir().display(),
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
