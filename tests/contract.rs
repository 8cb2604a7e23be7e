//! The contract against the running server: schemathesis generates requests from
//! `openapi/v1.yaml` (valid and invalid ones, then stateful sequences that follow the ids the
//! answers return) and checks every answer against the document: no server error, a documented
//! status, the documented media type, a body matching its schema and the documented headers.

use crate::util::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Test cases per operation and phase: about 4500 cases over the 49 operations, about a minute
/// against the debug build on a two-core machine.
const MAX_EXAMPLES: &str = "60";
/// A fixed seed, so that a run that fails fails again the same way; `SCHEMATHESIS_SEED`
/// explores others.
const DEFAULT_SEED: &str = "20261201";
/// A hung run fails instead of holding CI.
const RUN_LIMIT: Duration = Duration::from_secs(600);

/// The checks that must hold for every answer. Left out: `positive_data_acceptance` and
/// `negative_data_rejection`, which judge whether a request should have been accepted from the
/// schema alone. The contract decodes an absent member as its zero value and then validates
/// it, and refuses by state (412) or by rules a schema cannot express (a part listed twice), so
/// both would report correct answers as failures.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
response_schema_conformance,response_headers_conformance,use_after_free,\
ensure_resource_availability,ignored_auth,missing_required_header,unsupported_method,\
allow_header_conformance";

#[test]
fn schemathesis_finds_no_contract_violation() {
    if !require_tool("schemathesis") {
        return;
    }
    let s = Server::start();
    // Both roles, so that the auth operations are exercised beyond their 403.
    let w = s.token_with_roles(&["content-writer", "auth-manager"]);
    // A published version under the names the document's examples use, so that manifests,
    // downloads (with their media types, ranges and conditional answers) and aliases are
    // exercised with real data, not only as 404s.
    let disk = bytes(200_000, 7);
    let manifest = s.publish_image(&w, "debian-bookworm", "12.5.0", &disk, b"metadata");
    let artifact = &manifest.manifest["artifacts"][0];
    let artifact_id = artifact["artifact"]["id"].as_str().unwrap();
    let attachment_id = artifact["attachments"][0]["id"].as_str().unwrap();
    s.put_alias(&w, "debian-bookworm", "stable", "12.5.0");

    let dir = tempfile::tempdir().unwrap();
    // The ids of the seeded downloads, for those operations only: elsewhere every parameter
    // is generated.
    let download = |ops: &[&str], params: String| {
        format!(
            "[[operations]]\ninclude-operation-id = [{}]\nparameters = {{ {params} }}\n\n",
            ops.iter()
                .map(|o| format!("\"{o}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let config = [
        download(
            &[
                "downloadArtifact",
                "headArtifactDownload",
                "downloadArtifactFile",
                "headArtifactFile",
            ],
            format!(
                "\"path.name\" = \"debian-bookworm\", \"path.version\" = \"12.5.0\", \
                 \"path.artifact_id\" = \"{artifact_id}\", \"path.filename\" = \"disk.qcow2\""
            ),
        ),
        download(
            &[
                "downloadAttachment",
                "headAttachmentDownload",
                "downloadAttachmentFile",
                "headAttachmentFile",
            ],
            format!(
                "\"path.name\" = \"debian-bookworm\", \"path.version\" = \"12.5.0\", \
                 \"path.artifact_id\" = \"{artifact_id}\", \
                 \"path.attachment_id\" = \"{attachment_id}\", \
                 \"path.filename\" = \"incus.tar.xz\""
            ),
        ),
        download(
            &["getBlob", "headBlob"],
            format!("\"path.digest\" = \"{}\"", sha256_digest(&disk)),
        ),
    ]
    .concat();
    let config_path = dir.path().join("schemathesis.toml");
    std::fs::write(&config_path, config).unwrap();
    let log_path = dir.path().join("schemathesis.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let seed = std::env::var("SCHEMATHESIS_SEED").unwrap_or_else(|_| DEFAULT_SEED.into());
    let started = Instant::now();
    let mut child = Command::new("schemathesis")
        // Its example database and any report stay in the temporary directory.
        .current_dir(dir.path())
        .arg("--config-file")
        .arg(&config_path)
        .args([
            "run",
            concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/v1.yaml"),
        ])
        .args(["--url", &s.url("")])
        .args(["--header", &format!("Authorization: Bearer {w}")])
        .args(["--checks", CHECKS])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--seed", &seed])
        .args(["--workers", "1"])
        .args(["--request-timeout", "30"])
        .args(["--generation-database", "none"])
        .args(["--no-color", "--output-sanitize", "false"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("running schemathesis");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let took = started.elapsed();
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    match status {
        None => panic!("schemathesis did not finish within {RUN_LIMIT:?}:\n{output}"),
        Some(st) if !st.success() => panic!(
            "schemathesis found contract violations ({st}, seed {seed}); each failure ends \
             with a curl command that reproduces it:\n{output}"
        ),
        Some(_) => {}
    }
    // The run must really have tested: a summary with thousands of generated cases.
    let generated: u64 = output
        .lines()
        .find_map(|l| l.trim().split_once(" generated, ")?.0.parse().ok())
        .unwrap_or_else(|| panic!("no test-case count in the output:\n{output}"));
    assert!(generated >= 1000, "only {generated} cases:\n{output}");
    // The seeded downloads were really served, so their media types and headers were checked.
    let log = s.log_text();
    for (route, status) in [
        (
            "/v1/images/{name}/versions/{version}/artifacts/{artifact_id}/download",
            200,
        ),
        (
            "/v1/images/{name}/versions/{version}/artifacts/{artifact_id}/download",
            206,
        ),
        ("/v1/blobs/{digest}", 200),
    ] {
        assert!(
            log.lines().any(|l| l.contains(&format!("route={route} "))
                && l.contains(&format!("status={status} "))),
            "no {status} answer on {route} in the server log"
        );
    }
    assert!(!log.contains("panicked"), "a handler panicked:\n{log}");
    eprintln!("schemathesis: {generated} cases in {took:?} (seed {seed})");
}
