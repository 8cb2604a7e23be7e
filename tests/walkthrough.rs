//! The README's walk-through (`tests/walkthrough.sh`), run with bash, curl and jq against a
//! real server: what a user types must work as written.

use crate::util::*;
use std::process::Command;

#[test]
fn readme_walkthrough_script() {
    if !require_tool("curl") || !require_tool("jq") {
        return;
    }
    let s = Server::start();
    let token = s.writer_token();
    let dir = tempfile::tempdir().unwrap();
    // A disk that spans chunk boundaries and a small metadata tarball; the names have spaces
    // to keep the script's quoting honest.
    let disk = dir.path().join("my disk.qcow2");
    let meta = dir.path().join("my incus.tar.xz");
    std::fs::write(&disk, bytes(2 * CHUNK_SIZE + 4321, 201)).unwrap();
    std::fs::write(&meta, bytes(2048, 202)).unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/walkthrough.sh");
    let walk_through = || {
        Command::new("bash")
            .arg(script)
            .arg(&disk)
            .arg(&meta)
            .env("IMGSRV", format!("http://{}", s.addr))
            .env("TOKEN", &token)
            .current_dir(dir.path())
            .output()
            .expect("running bash")
    };
    let out = walk_through();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "walkthrough.sh failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- server log\n{}",
        out.status,
        s.log_text()
    );
    assert!(
        stdout.contains("walk-through OK"),
        "{stdout}\n--- stderr\n{stderr}"
    );

    // Run again: the blobs are on the server, so nothing is uploaded; creating the image again
    // is a conflict, and the script stops there with the server's own message.
    let parts_route = "route=/v1/uploads/{upload_id}/parts/{part_number} ";
    let parts_before = s.log_text().matches(parts_route).count();
    assert_eq!(parts_before, 2, "{}", s.log_text());
    let again = walk_through();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success(), "{stderr}");
    assert!(
        stderr.contains("imgsrv: {") && stderr.contains("catalog conflict"),
        "the server's problem document must be shown: {stderr}"
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        s.log_text().matches(parts_route).count(),
        parts_before,
        "a blob the server has was sent again"
    );

    // What the script published is what the API shows.
    let m = s.get("/v1/images/debian-bookworm/refs/latest").json();
    assert_eq!(m["version"]["version"], "12.5.0", "{m}");
    assert_eq!(
        m["artifacts"][0]["artifact"]["primary_blob_digest"],
        sha256_digest(&std::fs::read(&disk).unwrap()),
        "{m}"
    );
}

/// The README quotes the script's commands; a change to one without the other is caught here.
#[test]
fn readme_quotes_the_walkthrough_script() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let script = std::fs::read_to_string(format!("{root}/tests/walkthrough.sh")).unwrap();
    let lines: Vec<&str> = script.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("# api CURL-ARGS"))
        .unwrap();
    let end = lines
        .iter()
        .position(|l| l.starts_with("echo \"walk-through OK"))
        .unwrap();
    let mut missing = Vec::new();
    for line in &lines[start..end] {
        if line.trim().is_empty() || line.contains("== Consume") {
            continue;
        }
        if !readme.lines().any(|r| r == *line) {
            missing.push(*line);
        }
    }
    assert!(
        missing.is_empty(),
        "README.md does not quote these walkthrough.sh lines: {missing:#?}"
    );
}
