//! The background scrub: re-verifies every stored chunk's sha256 once per `--scrub-interval`,
//! reading at most `--scrub-rate` bytes per second, so that damage to chunks nobody downloads
//! (old versions, rarely used files) is found while a good copy of the file may still exist.
//!
//! Each damaged chunk is logged at error level with the blobs and versions that contain it;
//! uploading the true bytes of any of those blobs again repairs the stored copy
//! (`store::chunks::acquire` replaces a damaged one). Progress, passes, chunks verified and
//! damage found are exported as `imgsrv_scrub_*` metrics.

use crate::clock::Timestamp;
use crate::digest::Digest;
use crate::digest::hex;
use crate::log;
use crate::store::Store;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Chunks and bytes verified since start.
pub static CHUNKS_VERIFIED: AtomicU64 = AtomicU64::new(0);
pub static BYTES_VERIFIED: AtomicU64 = AtomicU64::new(0);
/// Damaged chunks found since start (a chunk still damaged is counted again each pass).
pub static DAMAGED_FOUND: AtomicU64 = AtomicU64::new(0);
/// Full passes completed since start.
pub static PASSES: AtomicU64 = AtomicU64::new(0);
/// When the last full pass ended (unix seconds; 0 if none is recorded).
pub static LAST_PASS_END: AtomicU64 = AtomicU64::new(0);
/// Damaged chunks found by the last completed pass.
pub static LAST_PASS_DAMAGED: AtomicU64 = AtomicU64::new(0);
/// Progress of the pass under way, in millionths (0 between passes).
pub static PROGRESS_PPM: AtomicU64 = AtomicU64::new(0);

/// Settings of the scrub.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Time from the end of one pass to the start of the next.
    pub interval: Duration,
    /// Bytes read per second; 0 disables the scrub.
    pub rate: u64,
}

/// Starts the scrub thread, unless the rate is 0.
pub fn start(
    store: Arc<Store>,
    settings: Settings,
    stop: Arc<AtomicBool>,
) -> Option<JoinHandle<()>> {
    if settings.rate == 0 {
        log::info("scrub disabled (--scrub-rate 0)");
        return None;
    }
    let h = std::thread::Builder::new()
        .name("scrub".into())
        .spawn(move || run(&store, settings, &stop))
        .expect("spawning the scrub thread");
    Some(h)
}

/// Sleeps until `until` in short slices; returns false if the server is stopping.
fn sleep_until(until: Instant, stop: &AtomicBool) -> bool {
    crate::pace::sleep_until(until, &mut || !stop.load(Ordering::SeqCst))
}

fn run(store: &Store, settings: Settings, stop: &AtomicBool) {
    let started = Instant::now();
    loop {
        // The next pass is due one interval after the last one ended (recorded in the
        // database, so restarts neither repeat nor postpone it); a database never scrubbed
        // gets its first pass a minute after start, once start-up work has settled.
        let last = store.last_scrub_pass().ok().flatten();
        if let Some(t) = last {
            LAST_PASS_END.store(t.unix_seconds().max(0) as u64, Ordering::Relaxed);
        }
        let wait = match last {
            Some(t) => {
                let due = t.unix_seconds() + settings.interval.as_secs() as i64;
                Duration::from_secs((due - Timestamp::now().unix_seconds()).max(0) as u64)
            }
            None => settings
                .interval
                .min(Duration::from_secs(60))
                .saturating_sub(started.elapsed()),
        };
        if !sleep_until(Instant::now() + wait, stop) {
            return;
        }
        if !pass(store, settings.rate, stop) {
            return;
        }
    }
}

/// One full pass. Returns false if the server is stopping.
fn pass(store: &Store, rate: u64, stop: &AtomicBool) -> bool {
    let total = store.chunk_bytes().unwrap_or(0).max(1);
    let began = Instant::now();
    // Batches of about a tenth of a second's worth of reading keep each read transaction short.
    let batch_bytes = (rate / 10).clamp(1 << 20, 64 << 20);
    let (mut after, mut chunks, mut bytes, mut damaged) = (None, 0u64, 0u64, 0u64);
    let mut failures = 0;
    log::info("scrub pass started");
    loop {
        let batch = match store.scrub_batch(after, batch_bytes, Duration::from_millis(200)) {
            Ok(b) => b,
            // The store may be recovering from an I/O error or briefly unavailable: try the
            // same place again shortly. A place that keeps failing is a damaged page the scrub
            // cannot read past: it is reported as damage, and the pass ends there (`imgsrv
            // check` on a backup tells the rest).
            Err(e) if failures < 3 => {
                failures += 1;
                log::warn(&format!("scrub paused: {e}"));
                if !sleep_until(Instant::now() + Duration::from_secs(5), stop) {
                    return false;
                }
                continue;
            }
            Err(e) => {
                damaged += 1;
                DAMAGED_FOUND.fetch_add(1, Ordering::Relaxed);
                log::error(&format!(
                    "scrub pass abandoned after {} of {} bytes: {e}",
                    bytes, total
                ));
                break;
            }
        };
        failures = 0;
        chunks += batch.chunks;
        bytes += batch.bytes;
        CHUNKS_VERIFIED.fetch_add(batch.chunks, Ordering::Relaxed);
        BYTES_VERIFIED.fetch_add(batch.bytes, Ordering::Relaxed);
        for d in &batch.damaged {
            damaged += 1;
            DAMAGED_FOUND.fetch_add(1, Ordering::Relaxed);
            report(d);
        }
        PROGRESS_PPM.store(
            (bytes.min(total) as u128 * 1_000_000 / total as u128) as u64,
            Ordering::Relaxed,
        );
        after = batch.last;
        if after.is_none() {
            break;
        }
        // Pace to the rate: the bytes read so far may take this long at the most.
        if !sleep_until(crate::pace::due(began, bytes, rate), stop) {
            return false;
        }
    }
    let now = Timestamp::now();
    if let Err(e) = store.record_scrub_pass(now) {
        log::warn(&format!("cannot record the end of the scrub pass: {e}"));
    }
    PASSES.fetch_add(1, Ordering::Relaxed);
    LAST_PASS_END.store(now.unix_seconds().max(0) as u64, Ordering::Relaxed);
    LAST_PASS_DAMAGED.store(damaged, Ordering::Relaxed);
    PROGRESS_PPM.store(0, Ordering::Relaxed);
    log::event(
        if damaged > 0 { "error" } else { "info" },
        if damaged > 0 { 0 } else { 1 },
        "scrub pass completed",
        &[
            ("chunks", chunks.to_string()),
            ("bytes", bytes.to_string()),
            ("damaged", damaged.to_string()),
            ("seconds", format!("{:.1}", began.elapsed().as_secs_f64())),
        ],
    );
    true
}

fn report(d: &crate::store::scrub::Damage) {
    let blobs: Vec<String> = d
        .users
        .iter()
        .map(|(b, _)| Digest::from(*b).to_string())
        .collect();
    let mut versions: Vec<String> = d.users.iter().flat_map(|(_, v)| v.clone()).collect();
    versions.sort();
    versions.dedup();
    log::event(
        "error",
        0,
        "scrub found a damaged chunk; upload the true bytes of one of its blobs again to repair it",
        &[
            ("chunk", hex(&d.chunk)),
            ("bytes", d.len.to_string()),
            ("problem", d.what.to_string()),
            (
                "blobs",
                if blobs.is_empty() {
                    "none".into()
                } else {
                    blobs.join(",")
                },
            ),
            (
                "versions",
                if versions.is_empty() {
                    "none".into()
                } else {
                    versions.join(", ")
                },
            ),
        ],
    );
}
