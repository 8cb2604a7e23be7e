//! Request and job logs: one line per request and per publish step, as text or JSON, and no
//! secret ever in them.

use crate::util::*;
use serde_json::Value;

#[test]
fn json_logs_have_one_line_per_request_and_step_and_no_secrets() {
    let s = Server::start_with(&["--log-format", "json"]);
    let w = s.writer_token();
    s.publish_image(&w, "logged", "1.0", &bytes(1000, 1), &bytes(100, 2));
    let r = s.request(
        "GET",
        "/v1/images/logged",
        &[("X-Request-ID", "trace-me-123")],
        b"",
    );
    assert_eq!(r.status, 200);
    // The line is written just after the response; give the log reader a moment.
    let text = wait_for_log(&s, "trace-me-123");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let req = lines
        .iter()
        .find(|l| l["msg"] == "request" && l["request_id"] == "trace-me-123")
        .unwrap_or_else(|| panic!("no request line for trace-me-123 in:\n{text}"));
    assert_eq!(req["method"], "GET");
    assert_eq!(req["route"], "/v1/images/{name}");
    assert_eq!(req["status"], "200");
    assert!(req["bytes"].as_str().unwrap().parse::<u64>().unwrap() > 0);
    assert!(req["duration_ms"].as_str().unwrap().parse::<f64>().is_ok());
    assert!(req["ts"].as_str().unwrap().ends_with('Z'));
    for step in ["validate_catalog", "incus_index", "finalize_publish"] {
        assert!(
            lines
                .iter()
                .any(|l| l["step"] == step && l["job_id"].is_string()),
            "no log line for step {step}"
        );
    }
    // Neither the bootstrap token nor the writer token (nor their secret halves) is logged.
    for token in [s.bootstrap_token(), w.clone()] {
        let secret = token.rsplit('_').next().unwrap();
        assert!(!text.contains(secret), "a token secret appears in the log");
    }
}

#[test]
fn text_logs_name_route_status_and_request_id() {
    let s = Server::start();
    let r = s.request(
        "GET",
        "/v1/images/missing",
        &[("X-Request-ID", "abc-42")],
        b"",
    );
    assert_eq!(r.status, 404);
    let text = wait_for_log(&s, "request_id=abc-42");
    let line = text
        .lines()
        .find(|l| l.contains("request_id=abc-42"))
        .unwrap_or_else(|| panic!("no line for abc-42 in:\n{text}"));
    for field in [
        "method=GET",
        "route=/v1/images/{name}",
        "status=404",
        "bytes=",
        "duration_ms=",
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
}

/// The log once it contains `needle` (5 s at most).
fn wait_for_log(s: &Server, needle: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = s.log_text();
        if text.contains(needle) || std::time::Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
