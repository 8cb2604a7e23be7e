//! Prometheus metrics on a separate listener (`--metrics-listen`, loopback by default).
//!
//! Request metrics are kept in memory and labelled by route template (never the raw path), so
//! label sets stay bounded. Storage metrics are read from the database at scrape time.

use crate::frontdoor::Stats as DoorStats;
use crate::frontdoor::head;
use crate::store::Store;
use crate::store::blobs::VERIFY_FAILURES;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// Upper bounds of the request duration histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0,
];

#[derive(Default, Clone)]
struct RequestSeries {
    count: u64,
    duration_sum: f64,
    buckets: [u64; BUCKETS.len()],
}

#[derive(Default)]
struct Registry {
    requests: BTreeMap<(&'static str, String, u16), RequestSeries>,
    bytes_sent: BTreeMap<&'static str, u64>,
    bytes_received: BTreeMap<&'static str, u64>,
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(Mutex::default)
}

/// Records one finished request.
pub fn record_request(
    route: &'static str,
    method: &str,
    status: u16,
    duration: Duration,
    received: u64,
    sent: u64,
) {
    let Ok(mut r) = registry().lock() else { return };
    let secs = duration.as_secs_f64();
    let s = r
        .requests
        .entry((route, method.to_string(), status))
        .or_default();
    s.count += 1;
    s.duration_sum += secs;
    for (i, le) in BUCKETS.iter().enumerate() {
        if secs <= *le {
            s.buckets[i] += 1;
        }
    }
    *r.bytes_sent.entry(route).or_default() += sent;
    *r.bytes_received.entry(route).or_default() += received;
}

/// Versions retired since start, by cause: `request` (a `DELETE`) or `policy` (retention).
/// Both series are always present so that rate queries start from zero.
fn render_retirements(w: &mut String) {
    use crate::store::retire::{RETIRED_BY_POLICY, RETIRED_BY_REQUEST};
    let _ = writeln!(
        w,
        "# HELP imgsrv_versions_retired_total Published versions retired, by cause (request or policy).\n# TYPE imgsrv_versions_retired_total counter"
    );
    for (reason, n) in [
        ("policy", &RETIRED_BY_POLICY),
        ("request", &RETIRED_BY_REQUEST),
    ] {
        let _ = writeln!(
            w,
            "imgsrv_versions_retired_total{{reason=\"{reason}\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
}

/// The background scrub (`scrub.rs`): progress of the pass under way, the last completed
/// pass, what was verified and the damage found.
fn render_scrub(w: &mut String) {
    use crate::scrub::*;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    for (name, kind, help, v) in [
        (
            "imgsrv_scrub_chunks_verified_total",
            "counter",
            "Stored chunks whose sha256 the scrub verified.",
            load(&CHUNKS_VERIFIED),
        ),
        (
            "imgsrv_scrub_bytes_verified_total",
            "counter",
            "Bytes of stored chunks the scrub verified.",
            load(&BYTES_VERIFIED),
        ),
        (
            "imgsrv_scrub_damaged_chunks_total",
            "counter",
            "Damaged chunks the scrub found (a chunk still damaged counts again each pass).",
            load(&DAMAGED_FOUND),
        ),
        (
            "imgsrv_scrub_passes_total",
            "counter",
            "Full scrub passes completed since start.",
            load(&PASSES),
        ),
        (
            "imgsrv_scrub_last_pass_damaged_chunks",
            "gauge",
            "Damaged chunks found by the last completed pass.",
            load(&LAST_PASS_DAMAGED),
        ),
        (
            "imgsrv_scrub_last_pass_completed_timestamp_seconds",
            "gauge",
            "When the last full scrub pass ended (unix time; 0 if never).",
            load(&LAST_PASS_END),
        ),
    ] {
        let _ = writeln!(w, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    let _ = writeln!(
        w,
        "# HELP imgsrv_scrub_progress_ratio Progress of the scrub pass under way (0 between passes).\n# TYPE imgsrv_scrub_progress_ratio gauge\nimgsrv_scrub_progress_ratio {}",
        load(&PROGRESS_PPM) as f64 / 1e6
    );
}

/// Renders every metric in the Prometheus text format.
pub fn render(store: &Store, door: &DoorStats) -> String {
    let mut out = String::new();
    let w = &mut out;
    {
        let r = registry().lock().map(|r| {
            (
                r.requests.clone(),
                r.bytes_sent.clone(),
                r.bytes_received.clone(),
            )
        });
        if let Ok((requests, sent, received)) = r {
            let _ = writeln!(
                w,
                "# HELP imgsrv_http_requests_total HTTP requests by route template, method and status."
            );
            let _ = writeln!(w, "# TYPE imgsrv_http_requests_total counter");
            for ((route, method, status), s) in &requests {
                let _ = writeln!(
                    w,
                    "imgsrv_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {}",
                    s.count
                );
            }
            let _ = writeln!(
                w,
                "# HELP imgsrv_http_request_duration_seconds Time to answer a request, including the body."
            );
            let _ = writeln!(w, "# TYPE imgsrv_http_request_duration_seconds histogram");
            let mut by_route: BTreeMap<&str, RequestSeries> = BTreeMap::new();
            for ((route, _, _), s) in &requests {
                let e = by_route.entry(route).or_default();
                e.count += s.count;
                e.duration_sum += s.duration_sum;
                for i in 0..BUCKETS.len() {
                    e.buckets[i] += s.buckets[i];
                }
            }
            for (route, s) in &by_route {
                for (i, le) in BUCKETS.iter().enumerate() {
                    let _ = writeln!(
                        w,
                        "imgsrv_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{le}\"}} {}",
                        s.buckets[i]
                    );
                }
                let _ = writeln!(
                    w,
                    "imgsrv_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                    s.count
                );
                let _ = writeln!(
                    w,
                    "imgsrv_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                    s.duration_sum
                );
                let _ = writeln!(
                    w,
                    "imgsrv_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                    s.count
                );
            }
            let _ = writeln!(
                w,
                "# HELP imgsrv_http_response_body_bytes_total Body bytes sent, by route template."
            );
            let _ = writeln!(w, "# TYPE imgsrv_http_response_body_bytes_total counter");
            for (route, n) in &sent {
                let _ = writeln!(
                    w,
                    "imgsrv_http_response_body_bytes_total{{route=\"{route}\"}} {n}"
                );
            }
            let _ = writeln!(
                w,
                "# HELP imgsrv_http_request_body_bytes_total Body bytes received, by route template."
            );
            let _ = writeln!(w, "# TYPE imgsrv_http_request_body_bytes_total counter");
            for (route, n) in &received {
                let _ = writeln!(
                    w,
                    "imgsrv_http_request_body_bytes_total{{route=\"{route}\"}} {n}"
                );
            }
        }
    }
    let gauge = |w: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(w, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    };
    let counter = |w: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(w, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    };
    gauge(
        w,
        "imgsrv_connections_active",
        "Client connections being served by the front door.",
        door.active.load(Ordering::Relaxed) as u64,
    );
    counter(
        w,
        "imgsrv_connections_accepted_total",
        "Client connections accepted.",
        door.accepted.load(Ordering::Relaxed) as u64,
    );
    counter(
        w,
        "imgsrv_connections_rejected_total",
        "Connections answered 503 at the connection limit.",
        door.rejected_busy.load(Ordering::Relaxed) as u64,
    );
    counter(
        w,
        "imgsrv_accept_errors_total",
        "Failed accept() calls (retried).",
        door.accept_errors.load(Ordering::Relaxed) as u64,
    );
    counter(
        w,
        "imgsrv_chunk_verification_failures_total",
        "Stored chunks that failed their check while being served.",
        VERIFY_FAILURES.load(Ordering::Relaxed),
    );
    counter(
        w,
        "imgsrv_download_chunks_read_total",
        "Chunks that downloads read from the database and checked.",
        crate::store::shared::CHUNKS_READ.load(Ordering::Relaxed),
    );
    counter(
        w,
        "imgsrv_download_chunks_shared_total",
        "Chunks that downloads took from another download's read instead of reading them again.",
        crate::store::shared::CHUNKS_SHARED.load(Ordering::Relaxed),
    );
    counter(
        w,
        "imgsrv_upload_complete_rehashed_bytes_total",
        "Bytes that completing an upload read back and hashed because their part did not continue the blob's sha256 (parts sent out of order or replaced).",
        crate::store::uploads::COMPLETE_REHASHED_BYTES.load(Ordering::Relaxed),
    );
    {
        use crate::store::handle::{DAMAGE_ERRORS, IO_ERRORS, NO_SPACE_ERRORS, RECOVERIES};
        let _ = writeln!(
            w,
            "# HELP imgsrv_storage_errors_total Storage failures by kind: no_space (the disk was full), io (another I/O error), damaged (a damaged page or record was met).\n# TYPE imgsrv_storage_errors_total counter"
        );
        for (kind, n) in [
            ("no_space", &NO_SPACE_ERRORS),
            ("io", &IO_ERRORS),
            ("damaged", &DAMAGE_ERRORS),
        ] {
            let _ = writeln!(
                w,
                "imgsrv_storage_errors_total{{kind=\"{kind}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        counter(
            w,
            "imgsrv_storage_recoveries_total",
            "Times the database was reopened after an I/O error or to leave read-only mode.",
            RECOVERIES.load(Ordering::Relaxed),
        );
    }
    gauge(
        w,
        "imgsrv_storage_state",
        "0: reads and writes work, 1: read-only (the disk was full at open), 2: recovering.",
        store.health() as u64,
    );
    gauge(
        w,
        "imgsrv_data_filesystem_free_bytes",
        "Bytes free on the data directory's filesystem.",
        store.filesystem_free(),
    );
    gauge(
        w,
        "imgsrv_data_reserve_bytes",
        "Bytes that writes must leave free on the data filesystem (--disk-reserve).",
        store.reserve_bytes(),
    );
    gauge(
        w,
        "imgsrv_database_file_bytes",
        "Size of the database file.",
        store.file_bytes(),
    );
    render_retirements(w);
    render_scrub(w);
    match store.stats() {
        Ok(s) => {
            let _ = writeln!(
                w,
                "# HELP imgsrv_upload_sessions Upload sessions by state.\n# TYPE imgsrv_upload_sessions gauge"
            );
            for state in [
                "created",
                "uploading",
                "completed",
                "ingesting",
                "ready",
                "failed",
                "aborted",
            ] {
                let _ = writeln!(
                    w,
                    "imgsrv_upload_sessions{{state=\"{state}\"}} {}",
                    s.uploads_by_state.get(state).copied().unwrap_or(0)
                );
            }
            let _ = writeln!(
                w,
                "# HELP imgsrv_publish_jobs Publish jobs by state.\n# TYPE imgsrv_publish_jobs gauge"
            );
            for state in ["queued", "running", "succeeded", "failed"] {
                let _ = writeln!(
                    w,
                    "imgsrv_publish_jobs{{state=\"{state}\"}} {}",
                    s.jobs_by_state.get(state).copied().unwrap_or(0)
                );
            }
            let _ = writeln!(
                w,
                "# HELP imgsrv_publish_job_steps Publish job steps by name and state.\n# TYPE imgsrv_publish_job_steps gauge"
            );
            for ((name, state), n) in &s.steps_by_state {
                let _ = writeln!(
                    w,
                    "imgsrv_publish_job_steps{{step=\"{name}\",state=\"{state}\"}} {n}"
                );
            }
            gauge(w, "imgsrv_blobs", "Trusted blobs stored.", s.blobs);
            gauge(
                w,
                "imgsrv_blob_bytes",
                "Sum of blob sizes (logical bytes, before deduplication).",
                s.blob_bytes,
            );
            gauge(
                w,
                "imgsrv_database_live_bytes",
                "Bytes of live data in the database file (the stored chunks); the file size minus this is about what `imgsrv compact` would return.",
                s.chunk_bytes,
            );
            gauge(w, "imgsrv_chunks", "Distinct chunks stored.", s.chunks);
            gauge(
                w,
                "imgsrv_chunk_bytes",
                "Bytes of distinct chunks stored (physical, after deduplication).",
                s.chunk_bytes,
            );
            let ratio = if s.chunk_bytes == 0 {
                1.0
            } else {
                s.blob_bytes as f64 / s.chunk_bytes as f64
            };
            let _ = writeln!(
                w,
                "# HELP imgsrv_dedup_ratio Logical blob bytes per stored chunk byte.\n# TYPE imgsrv_dedup_ratio gauge\nimgsrv_dedup_ratio {ratio}"
            );
            gauge(
                w,
                "imgsrv_catalog_generation",
                "Catalog generation (changes when published content or aliases change).",
                s.generation,
            );
        }
        Err(e) => {
            crate::log::error(&format!("metrics: reading store statistics failed: {e}"));
        }
    }
    out
}

/// Serves `GET /metrics` on `listener`, one connection at a time with short timeouts: the
/// endpoint is for a local scraper, not the public. It holds the store weakly so that a
/// shutdown can close the database while this thread still waits for scrapers.
pub fn serve(listener: TcpListener, store: Weak<Store>, door: Arc<DoorStats>) {
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut sock) = conn else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                let _ = sock.set_write_timeout(Some(Duration::from_secs(5)));
                let mut buf = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(5);
                let tcp = match sock.try_clone() {
                    Ok(t) => t,
                    Err(_) => continue,
                };
                let mut set = |d: Duration| tcp.set_read_timeout(Some(d.max(Duration::from_millis(1))));
                let Ok(n) = head::read_head(&mut sock, &mut buf, 8192, deadline, Duration::from_secs(5), &mut set, &|| false) else {
                    continue;
                };
                let target = head::parse(&buf[..n - 4]).map(|h| (h.method, h.target));
                let (status, ctype, body) = match target {
                    Ok((m, t)) if (m == "GET" || m == "HEAD") && t.split('?').next() == Some("/metrics") => {
                        let body = match (m == "GET", store.upgrade()) {
                            (true, Some(store)) => render(&store, &door),
                            _ => String::new(),
                        };
                        (200, "text/plain; version=0.0.4; charset=utf-8", body)
                    }
                    _ => (404, "text/plain; charset=utf-8", "404 page not found\n".to_string()),
                };
                let _ = write!(
                    sock,
                    "HTTP/1.1 {status} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    crate::http::reason(status),
                    body.len()
                );
            }
        })
        .expect("spawning the metrics thread");
}
