//! The shortest end-to-end path: publish an image and download it byte-identical.

use crate::util::*;

#[test]
fn publish_and_download_round_trip() {
    let s = Server::start();
    let w = s.writer_token();
    let disk = bytes(3 * CHUNK_SIZE + 17, 1);
    let meta = bytes(1000, 2);
    let m = s.publish_image(&w, "debian-bookworm", "12.5.0", &disk, &meta);
    assert_eq!(
        m.manifest["version"]["state"], "published",
        "{}",
        m.manifest
    );
    let aid = m.artifact_id.as_str();
    let r = s.get(&format!(
        "/v1/images/debian-bookworm/versions/12.5.0/artifacts/{aid}/download"
    ));
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), disk.len());
    assert!(r.body == disk, "downloaded bytes differ");
    assert_eq!(
        r.header("ETag"),
        Some(format!("\"{}\"", sha256_digest(&disk)).as_str())
    );
}
