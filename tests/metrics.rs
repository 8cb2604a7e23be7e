//! The Prometheus endpoint: scraped after a real workload, its counters must reflect it.

use crate::util::*;
use std::time::{Duration, Instant};

/// Reads one sample value (exact series text before the value).
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("series {series} missing in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn metrics_reflect_a_workload() {
    let s = Server::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let addr = metrics_addr(&s);
    let w = s.writer_token();
    // Two blobs sharing their first two chunks: stored chunks < logical bytes.
    let mut a = bytes(3 * CHUNK_SIZE, 7);
    let b = {
        let mut b = a.clone();
        b.truncate(2 * CHUNK_SIZE);
        b.extend_from_slice(&bytes(CHUNK_SIZE, 8));
        b
    };
    let meta = bytes(500, 9);
    s.publish_image(&w, "metrics-img", "1.0", &a, &meta);
    s.upload(&w, &b);
    // An aborted session and a 404.
    let begin = s.call(
        "POST",
        "/v1/uploads",
        &w,
        &serde_json::json!({"expected_digest": sha256_digest(b"x"), "expected_size_bytes": 1}),
    );
    let id = begin.json()["id"].as_str().unwrap().to_string();
    assert_eq!(
        s.call(
            "POST",
            &format!("/v1/uploads/{id}/abort"),
            &w,
            &serde_json::Value::Null
        )
        .status,
        200
    );
    assert_eq!(s.get("/v1/images/nope").status, 404);
    let digest = sha256_digest(&a);
    let dl = s.get(&format!("/v1/blobs/{digest}"));
    assert_eq!(dl.body.len(), a.len());

    // A request is counted just after its response is written, so the last download may not
    // be counted yet when its bytes have arrived: scrape until it is (5 s at most).
    let deadline = Instant::now() + Duration::from_secs(5);
    let r = loop {
        let r = raw_request(&addr, "GET", "/metrics", &[], None);
        let counted = r.text().lines().any(|l| {
            l.starts_with(r#"imgsrv_http_requests_total{route="/v1/blobs/{digest}",method="GET",status="200"}"#)
        });
        if counted || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(r.status, 200);
    assert!(r.header("Content-Type").unwrap().starts_with("text/plain"));
    let text = r.text();
    assert_eq!(
        sample(
            &text,
            r#"imgsrv_http_requests_total{route="/v1/images/{name}",method="GET",status="404"}"#
        ),
        1.0
    );
    assert!(
        sample(
            &text,
            r#"imgsrv_http_requests_total{route="/v1/uploads/{upload_id}/parts/{part_number}",method="PUT",status="200"}"#
        ) >= 3.0
    );
    assert!(
        sample(
            &text,
            r#"imgsrv_http_response_body_bytes_total{route="/v1/blobs/{digest}"}"#
        ) >= a.len() as f64
    );
    assert!(
        sample(
            &text,
            r#"imgsrv_http_request_body_bytes_total{route="/v1/uploads/{upload_id}/parts/{part_number}"}"#
        ) >= (a.len() + b.len()) as f64
    );
    assert_eq!(
        sample(&text, r#"imgsrv_upload_sessions{state="aborted"}"#),
        1.0
    );
    assert!(sample(&text, r#"imgsrv_upload_sessions{state="ready"}"#) >= 3.0);
    assert_eq!(
        sample(&text, r#"imgsrv_publish_jobs{state="succeeded"}"#),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"imgsrv_publish_job_steps{step="incus_index",state="succeeded"}"#
        ),
        1.0
    );
    assert_eq!(sample(&text, "imgsrv_blobs"), 3.0);
    let logical = (a.len() + b.len() + meta.len()) as f64;
    assert_eq!(sample(&text, "imgsrv_blob_bytes"), logical);
    // a's three chunks, b's one distinct chunk, meta's one chunk.
    assert_eq!(sample(&text, "imgsrv_chunks"), 5.0);
    assert_eq!(
        sample(&text, "imgsrv_chunk_bytes"),
        (4 * CHUNK_SIZE + meta.len()) as f64
    );
    assert!(sample(&text, "imgsrv_dedup_ratio") > 1.0);
    assert_eq!(
        sample(&text, "imgsrv_chunk_verification_failures_total"),
        0.0
    );
    // Labels are route templates: no raw ids or digests leak into series names.
    assert!(!text.contains(&digest[7..]), "raw digest in metrics");
    assert!(!text.contains(&id), "raw upload id in metrics");
    a.clear();
    // Anything but /metrics is a 404 on the metrics listener.
    assert_eq!(raw_request(&addr, "GET", "/", &[], None).status, 404);
}

/// Reads the metrics page and returns two counters.
fn chunk_counters(addr: &str) -> (f64, f64) {
    let text = raw_request(addr, "GET", "/metrics", &[], None).text();
    (
        sample(&text, "imgsrv_download_chunks_read_total"),
        sample(&text, "imgsrv_download_chunks_shared_total"),
    )
}

#[test]
fn downloads_of_one_blob_running_together_read_each_chunk_once() {
    use std::io::{Read, Write};
    let s = Server::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let addr = metrics_addr(&s);
    let w = s.writer_token();
    const N: usize = 40;
    let data = bytes(N * CHUNK_SIZE, 21);
    let path = format!("/v1/blobs/{}", s.upload(&w, &data));

    // A download that takes its first bytes and then stalls, so that it stays behind...
    let mut slow = std::net::TcpStream::connect(&s.addr).unwrap();
    write!(
        slow,
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        s.addr
    )
    .unwrap();
    let mut raw = vec![0u8; 64 * 1024];
    slow.read_exact(&mut raw).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // ...while a second one runs through the whole blob: the chunks it reads past the stalled
    // one are kept for it.
    let fast = s.get(&path);
    assert_eq!(fast.status, 200);
    assert!(fast.body == data, "the second download's bytes differ");
    slow.read_to_end(&mut raw).unwrap();
    let slow = parse_response(&raw, false);
    assert_eq!(slow.status, 200);
    assert!(slow.body == data, "the stalled download's bytes differ");

    let (read, shared) = chunk_counters(&addr);
    assert_eq!(
        read + shared,
        2.0 * N as f64,
        "each download took each chunk once"
    );
    assert!(
        shared >= (N / 2) as f64,
        "only {shared} of {N} chunks were shared"
    );

    // Nothing stays kept once the downloads are over: a lone download reads every chunk.
    let lone = s.get(&path);
    assert!(lone.body == data, "the lone download's bytes differ");
    assert_eq!(chunk_counters(&addr), (read + N as f64, shared));
}

#[test]
fn a_download_reads_a_chunk_its_blob_repeats_once() {
    let s = Server::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let addr = metrics_addr(&s);
    let w = s.writer_token();
    // Like a raw disk image: two chunks of data among eight chunks of zeros.
    let zeros = vec![0u8; CHUNK_SIZE];
    let mut data = bytes(CHUNK_SIZE, 31);
    for _ in 0..5 {
        data.extend_from_slice(&zeros);
    }
    data.extend_from_slice(&bytes(CHUNK_SIZE, 32));
    for _ in 0..3 {
        data.extend_from_slice(&zeros);
    }
    let path = format!("/v1/blobs/{}", s.upload(&w, &data));
    let r = s.get(&path);
    assert_eq!(r.status, 200);
    assert!(r.body == data, "the download's bytes differ");
    assert_eq!(
        chunk_counters(&addr),
        (3.0, 7.0),
        "3 distinct chunks read, 7 repeats"
    );
    // Nothing stays kept: the next download reads the same three again.
    let r = s.get_with(&path, &[("Range", "bytes=0-")]);
    assert!(r.body == data, "the second download's bytes differ");
    assert_eq!(chunk_counters(&addr), (6.0, 14.0));
}
