//! Resumable, parallel blob uploads, shared by `push` (bytes from a file) and `mirror` (bytes
//! from another server).
//!
//! A blob goes up as fixed-size parts, several at once. After each acknowledged part the
//! session id and every acknowledged part's etag are written to a small state file, so a run
//! that was killed or lost its network resumes: the next run confirms with
//! `GET /v1/uploads/{id}` that the session still takes parts and sends only the parts the
//! server has not acknowledged.
//!
//! The state file lives in the user's state directory (`$XDG_STATE_HOME/imgsrv/uploads`), not
//! next to the files: build outputs are often on read-only or shared paths, and a mirror has no
//! files at all. It is named by a hash of the server URL, the blob digest and the part size:
//! an upload session is not tied to an image or version, so a file pushed again under another
//! version name (or mirrored for another version) resumes the same session.

use super::progress::{Counting, Progress};
use super::{Api, ClientError, Kind, Result, seg};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// A blob to make present on the server.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlobRef {
    pub digest: String,
    pub size: u64,
}

/// Where a blob's bytes come from: any byte range on demand, so that parts can be sent in
/// parallel and resent after a failure.
pub trait Source: Sync {
    /// A reader of exactly `len` bytes starting at `offset`. Parts are not checked one by one
    /// (a part's etag is opaque): `complete` checks the whole blob against its sha256, on the
    /// server, before it becomes usable.
    fn open(&self, offset: u64, len: u64) -> Result<Box<dyn Read + Send + '_>>;
}

/// How to upload.
#[derive(Debug, Clone)]
pub struct Options {
    pub part_size: u64,
    pub parallel: usize,
    pub state_dir: PathBuf,
}

/// What happened to one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The server already had it: nothing was sent.
    Present,
    /// Sent now; `bytes` is what this run sent (less than the size when resumed).
    Uploaded { bytes: u64 },
}

#[derive(Serialize, Deserialize, Default)]
struct State {
    server: String,
    digest: String,
    size: u64,
    part_size: u64,
    upload_id: String,
    /// Acknowledged parts: number -> (etag, size).
    parts: BTreeMap<u32, (String, u64)>,
}

fn state_path(api: &Api, blob: &BlobRef, opts: &Options) -> PathBuf {
    let key = format!("{}\n{}\n{}", api.base(), blob.digest, opts.part_size);
    let hash = Sha256::digest(key.as_bytes());
    let name: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
    opts.state_dir.join(format!("{name}.json"))
}

fn load_state(path: &Path) -> Option<State> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes the state atomically (temporary file, then rename), so a kill never leaves half a
/// file behind.
fn save_state(path: &Path, state: &State) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| {
        ClientError::failed(format!(
            "cannot create state directory {}: {e}",
            dir.display()
        ))
    })?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let body = serde_json::to_vec(state).expect("state serializes");
    std::fs::write(&tmp, body)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| ClientError::failed(format!("cannot write {}: {e}", path.display())))
}

fn part_count(size: u64, part_size: u64) -> u32 {
    size.div_ceil(part_size).max(1) as u32
}

fn part_range(n: u32, size: u64, part_size: u64) -> (u64, u64) {
    let offset = (n as u64 - 1) * part_size;
    (offset, part_size.min(size - offset))
}

/// Makes `blob` present on the server: skipped when the server has it, else uploaded (resuming
/// a session from an earlier run when one is still open) and completed, which makes the server
/// verify the whole blob against its digest.
pub fn ensure_blob(
    api: &Api,
    blob: &BlobRef,
    name: &str,
    media_type: Option<&str>,
    source: &dyn Source,
    opts: &Options,
) -> Result<Outcome> {
    let path = state_path(api, blob, opts);
    // A session the server lost (expired, swept, a restore from backup) is noticed at a part or
    // at complete; the upload then starts over once with a fresh session.
    for attempt in 0..2 {
        match try_upload(api, blob, name, media_type, source, opts, &path) {
            Err(Restart(why)) if attempt == 0 => {
                eprintln!("{name}: {why}; starting a new upload session");
                let _ = std::fs::remove_file(&path);
            }
            Err(Restart(why)) => return Err(ClientError::failed(format!("{name}: {why}"))),
            Ok(r) => return r,
        }
    }
    unreachable!("the loop returns")
}

/// The session is unusable; start again with a new one.
struct Restart(String);

fn try_upload(
    api: &Api,
    blob: &BlobRef,
    name: &str,
    media_type: Option<&str>,
    source: &dyn Source,
    opts: &Options,
    path: &Path,
) -> std::result::Result<Result<Outcome>, Restart> {
    let mut state = match load_state(path) {
        Some(s)
            if s.server == api.base()
                && s.digest == blob.digest
                && s.size == blob.size
                && s.part_size == opts.part_size =>
        {
            Some(s)
        }
        _ => None,
    };
    if let Some(s) = &state {
        let r = match api.get(&format!("/v1/uploads/{}", seg(&s.upload_id))) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let st = r.json["state"].as_str().unwrap_or("");
        let expires = r.json["expires_at"].as_str().and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        });
        // Keep a margin: a session about to expire would fail at complete.
        let alive =
            expires.is_some_and(|t| t > time::OffsetDateTime::now_utc() + Duration::from_secs(300));
        match (r.status, st) {
            (200, "ready") => {
                let _ = std::fs::remove_file(path);
                return Ok(Ok(Outcome::Present));
            }
            (200, "created" | "uploading") if alive => {}
            _ => state = None,
        }
    }
    let mut state = match state {
        Some(s) => s,
        None => {
            let mut body = json!({"expected_digest": blob.digest, "expected_size_bytes": blob.size,
                                  "filename_hint": name});
            if let Some(m) = media_type {
                body["media_type_hint"] = json!(m);
            }
            let begun = match api
                .send("POST", "/v1/uploads", Some(&body))
                .and_then(|r| r.expect(&format!("{name}: beginning the upload"), &[200, 201]))
            {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            };
            if begun["state"] == "ready" {
                let _ = std::fs::remove_file(path);
                return Ok(Ok(Outcome::Present));
            }
            let s = State {
                server: api.base().to_string(),
                digest: blob.digest.clone(),
                size: blob.size,
                part_size: opts.part_size,
                upload_id: begun["id"].as_str().unwrap_or_default().to_string(),
                parts: BTreeMap::new(),
            };
            if let Err(e) = save_state(path, &s) {
                return Ok(Err(e));
            }
            s
        }
    };

    let n_parts = part_count(blob.size, opts.part_size);
    let todo: Vec<u32> = (1..=n_parts)
        .filter(|n| !state.parts.contains_key(n))
        .collect();
    let already: u64 = state.parts.values().map(|p| p.1).sum();
    let progress = Progress::start(name, blob.size, already, n_parts as usize);
    let sent = send_parts(api, blob, source, opts, path, &mut state, &todo, &progress)?;
    let sent = match sent {
        Ok(()) => progress.counter().load(Ordering::Relaxed),
        Err(e) => return Ok(Err(e)),
    };

    let parts: Vec<Value> = state
        .parts
        .iter()
        .map(|(n, (etag, size))| json!({"number": n, "etag": etag, "size_bytes": size}))
        .collect();
    let r = match api.send(
        "POST",
        &format!("/v1/uploads/{}/complete", seg(&state.upload_id)),
        Some(&json!({ "parts": parts })),
    ) {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    if r.status == 412 || r.status == 404 {
        return Err(Restart(format!(
            "the server refused to complete the upload ({})",
            r.detail()
        )));
    }
    let done = match r.expect(&format!("{name}: completing the upload"), &[200]) {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    let _ = std::fs::remove_file(path);
    if done["state"] != "ready" {
        progress.finish("failed");
        return Ok(Err(ClientError::failed(format!(
            "{name}: the server did not verify the upload: {}",
            done["failure_message"]
                .as_str()
                .unwrap_or("no reason given")
        ))));
    }
    progress.finish("verified by the server");
    Ok(Ok(Outcome::Uploaded { bytes: sent }))
}

/// Sends the parts in `todo` with `opts.parallel` workers; each acknowledged part is recorded
/// in the state file before the next is taken.
#[allow(clippy::too_many_arguments)]
fn send_parts(
    api: &Api,
    blob: &BlobRef,
    source: &dyn Source,
    opts: &Options,
    path: &Path,
    state: &mut State,
    todo: &[u32],
    progress: &Progress,
) -> std::result::Result<Result<()>, Restart> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let shared = Mutex::new(std::mem::take(state));
    let failure: Mutex<Option<std::result::Result<ClientError, Restart>>> = Mutex::new(None);
    let upload_id = shared.lock().unwrap().upload_id.clone();
    let workers = opts.parallel.clamp(1, todo.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&n) = todo.get(i) else { break };
                    match send_part(api, blob, source, opts, &upload_id, n, progress) {
                        Ok(etag) => {
                            let mut s = shared.lock().unwrap();
                            let (_, len) = part_range(n, blob.size, opts.part_size);
                            s.parts.insert(n, (etag, len));
                            if let Err(e) = save_state(path, &s) {
                                *failure.lock().unwrap() = Some(Ok(e));
                                stop.store(true, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            failure.lock().unwrap().get_or_insert(e);
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    *state = shared.into_inner().unwrap();
    match failure.into_inner().unwrap() {
        None => Ok(Ok(())),
        Some(Ok(e)) => Ok(Err(e)),
        Some(Err(restart)) => Err(restart),
    }
}

/// Sends one part, retrying what may be passing trouble (a dropped connection, a restarting
/// server) a few times. Returns the server's etag.
fn send_part(
    api: &Api,
    blob: &BlobRef,
    source: &dyn Source,
    opts: &Options,
    upload_id: &str,
    n: u32,
    progress: &Progress,
) -> std::result::Result<String, std::result::Result<ClientError, Restart>> {
    let (offset, len) = part_range(n, blob.size, opts.part_size);
    let path = format!("/v1/uploads/{}/parts/{n}", seg(upload_id));
    let mut delay = Duration::from_millis(500);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = source.open(offset, len).and_then(|reader| {
            let counted = Counting {
                inner: reader.take(len),
                counter: progress.counter(),
            };
            api.put_stream(&path, len, counted)
        });
        let transient = match result {
            Ok(r) if r.status == 200 => {
                let etag = r.json["etag"].as_str().unwrap_or_default().to_string();
                return Ok(etag);
            }
            Ok(r) if r.status == 412 || r.status == 404 => {
                return Err(Err(Restart(format!(
                    "the upload session no longer takes parts ({})",
                    r.detail()
                ))));
            }
            Ok(r) if matches!(r.status, 408 | 429 | 500 | 502 | 503 | 504) => {
                ClientError::failed(format!("part {n}: {} {}", r.status, r.detail()))
            }
            Ok(r) => {
                return Err(Ok(super::status_error(
                    &format!("uploading part {n}"),
                    r.status,
                    &r.detail(),
                )));
            }
            Err(e) if e.kind == Kind::Unreachable => e,
            Err(e) => return Err(Ok(e)),
        };
        if attempt >= 4 {
            return Err(Ok(transient));
        }
        eprintln!("{transient}; retrying in {:.1} s", delay.as_secs_f64());
        std::thread::sleep(delay);
        delay *= 3;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_blob() {
        assert_eq!(part_count(0, 64), 1);
        assert_eq!(part_range(1, 0, 64), (0, 0));
        assert_eq!(part_count(64, 64), 1);
        assert_eq!(part_count(65, 64), 2);
        assert_eq!(part_range(2, 65, 64), (64, 1));
        assert_eq!(part_range(3, 200, 64), (128, 64));
        assert_eq!(part_range(4, 200, 64), (192, 8));
    }
}
