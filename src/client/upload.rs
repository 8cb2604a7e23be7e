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

/// One upload and what every step of it is given: the server, the name it goes by (in
/// messages and as the session's filename hint), its media type, where its bytes come from, and
/// how to send them.
pub struct Job<'a> {
    pub api: &'a Api,
    pub name: &'a str,
    pub media_type: Option<&'a str>,
    pub source: &'a dyn Source,
    pub opts: &'a Options,
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
pub(super) struct State {
    pub(super) server: String,
    /// The blob's digest; empty while a session begun without one (`late`) waits for it.
    pub(super) digest: String,
    pub(super) size: u64,
    pub(super) part_size: u64,
    pub(super) upload_id: String,
    /// Acknowledged parts: number -> (etag, size).
    pub(super) parts: BTreeMap<u32, (String, u64)>,
    /// For a session begun without a digest: the file it uploads (see `late::FileId`); empty
    /// for a session begun with one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(super) file: String,
}

/// A state file in `dir` named by a hash of `key`.
pub(super) fn state_file(dir: &Path, key: &str) -> PathBuf {
    let hash = Sha256::digest(key.as_bytes());
    dir.join(format!("{}.json", crate::digest::hex(&hash[..16])))
}

fn state_path(api: &Api, blob: &BlobRef, opts: &Options) -> PathBuf {
    state_file(
        &opts.state_dir,
        &format!("{}\n{}\n{}", api.base(), blob.digest, opts.part_size),
    )
}

pub(super) fn load_state(path: &Path) -> Option<State> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes the state atomically (temporary file, then rename), so a kill never leaves half a
/// file behind.
pub(super) fn save_state(path: &Path, state: &State) -> Result<()> {
    let body = serde_json::to_vec(state).expect("state serializes");
    write_atomically(path, &body)
}

/// Writes `body` to `path` through a temporary file and a rename, creating the directory.
pub(super) fn write_atomically(path: &Path, body: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| {
        ClientError::failed(format!(
            "cannot create state directory {}: {e}",
            dir.display()
        ))
    })?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, body)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| ClientError::failed(format!("cannot write {}: {e}", path.display())))
}

pub(super) fn part_count(size: u64, part_size: u64) -> u32 {
    size.div_ceil(part_size).max(1) as u32
}

fn part_range(n: u32, size: u64, part_size: u64) -> (u64, u64) {
    let offset = (n as u64 - 1) * part_size;
    (offset, part_size.min(size - offset))
}

/// Makes `blob` present on the server: skipped when the server has it, else uploaded (resuming
/// a session from an earlier run when one is still open) and completed, which makes the server
/// verify the whole blob against its digest.
pub fn ensure_blob(job: &Job, blob: &BlobRef) -> Result<Outcome> {
    let path = state_path(job.api, blob, job.opts);
    let name = job.name;
    // A session the server lost (expired, swept, a restore from backup) is noticed at a part or
    // at complete; the upload then starts over once with a fresh session.
    for attempt in 0..2 {
        match try_upload(job, blob, &path) {
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
pub(super) struct Restart(pub(super) String);

fn try_upload(
    job: &Job,
    blob: &BlobRef,
    path: &Path,
) -> std::result::Result<Result<Outcome>, Restart> {
    let (api, name, media_type, opts) = (job.api, job.name, job.media_type, job.opts);
    let mut state = match load_state(path) {
        Some(s)
            if s.server == api.base()
                && s.digest == blob.digest
                && s.size == blob.size
                && s.part_size == opts.part_size
                && s.file.is_empty() =>
        {
            Some(s)
        }
        _ => None,
    };
    if let Some(s) = &state {
        match check_session(api, &s.upload_id) {
            Err(e) => return Ok(Err(e)),
            Ok(Resumable::Ready(_)) => {
                let _ = std::fs::remove_file(path);
                return Ok(Ok(Outcome::Present));
            }
            Ok(Resumable::Open) => {}
            Ok(Resumable::Gone) => state = None,
        }
    }
    let state = match state {
        Some(s) => s,
        None => {
            let begun = match begin(api, name, blob.size, Some(&blob.digest), media_type) {
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
                file: String::new(),
            };
            if let Err(e) = save_state(path, &s) {
                return Ok(Err(e));
            }
            s
        }
    };

    let progress = start_progress(name, &state);
    let state = Mutex::new(state);
    let sent = send_parts(job, path, &state, &progress, &AtomicBool::new(false))?;
    let sent = match sent {
        Ok(()) => progress.counter().load(Ordering::Relaxed),
        Err(e) => return Ok(Err(e)),
    };
    let state = state.into_inner().unwrap();
    let done = match complete(api, name, &state, None)? {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    let _ = std::fs::remove_file(path);
    if done["state"] != "ready" {
        progress.finish("failed");
        return Ok(Err(not_verified(name, &done)));
    }
    progress.finish("verified by the server");
    Ok(Ok(Outcome::Uploaded { bytes: sent }))
}

/// What `GET /v1/uploads/{id}` says about a session named by a state file.
pub(super) enum Resumable {
    /// Complete and verified: the answer (its `expected_digest` names the blob).
    Ready(Value),
    /// Still takes parts, for a while yet.
    Open,
    /// Expired, about to, aborted, failed or unknown: start a new session.
    Gone,
}

pub(super) fn check_session(api: &Api, upload_id: &str) -> Result<Resumable> {
    let r = api.get(&format!("/v1/uploads/{}", seg(upload_id)))?;
    let st = r.json["state"].as_str().unwrap_or("");
    let expires = r.json["expires_at"].as_str().and_then(|t| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
    });
    // Keep a margin: a session about to expire would fail at complete.
    let alive =
        expires.is_some_and(|t| t > time::OffsetDateTime::now_utc() + Duration::from_secs(300));
    Ok(match (r.status, st) {
        (200, "ready") => Resumable::Ready(r.json),
        (200, "created" | "uploading") if alive => Resumable::Open,
        _ => Resumable::Gone,
    })
}

/// `POST /v1/uploads`: the answer (200 `ready` or 201). Without `digest` the session takes it
/// at complete (docs/api.md, decision 18).
pub(super) fn begin(
    api: &Api,
    name: &str,
    size: u64,
    digest: Option<&str>,
    media_type: Option<&str>,
) -> Result<Value> {
    let mut body = json!({"expected_size_bytes": size, "filename_hint": name});
    if let Some(d) = digest {
        body["expected_digest"] = json!(d);
    }
    if let Some(m) = media_type {
        body["media_type_hint"] = json!(m);
    }
    api.send("POST", "/v1/uploads", Some(&body))
        .and_then(|r| r.expect(&format!("{name}: beginning the upload"), &[200, 201]))
}

/// Aborts a session this run no longer needs; a failure only leaves it for the sweeper.
pub(super) fn abort(api: &Api, upload_id: &str) {
    let _ = api.send(
        "POST",
        &format!("/v1/uploads/{}/abort", seg(upload_id)),
        None,
    );
}

/// The progress report of the parts `state` does not hold yet.
pub(super) fn start_progress(name: &str, state: &State) -> Progress {
    let n_parts = part_count(state.size, state.part_size);
    let already: u64 = state.parts.values().map(|p| p.1).sum();
    Progress::start(name, state.size, already, n_parts as usize)
}

/// Completes the session with the acknowledged parts, giving `digest` when the session was
/// begun without one. The answer is the session (`ready` or `failed`); a session the server
/// no longer completes (412, 404) is a restart.
pub(super) fn complete(
    api: &Api,
    name: &str,
    state: &State,
    digest: Option<&str>,
) -> std::result::Result<Result<Value>, Restart> {
    let parts: Vec<Value> = state
        .parts
        .iter()
        .map(|(n, (etag, size))| json!({"number": n, "etag": etag, "size_bytes": size}))
        .collect();
    let mut body = json!({ "parts": parts });
    if let Some(d) = digest {
        body["digest"] = json!(d);
    }
    let r = match api.send(
        "POST",
        &format!("/v1/uploads/{}/complete", seg(&state.upload_id)),
        Some(&body),
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
    Ok(r.expect(&format!("{name}: completing the upload"), &[200]))
}

pub(super) fn not_verified(name: &str, session: &Value) -> ClientError {
    ClientError::failed(format!(
        "{name}: the server did not verify the upload: {}",
        session["failure_message"]
            .as_str()
            .unwrap_or("no reason given")
    ))
}

/// Sends the parts `state` does not hold yet, in order, with `opts.parallel` workers; each
/// acknowledged part is recorded in the state file before the next is taken. Setting `cancel`
/// stops the workers from taking further parts (parts in flight finish); it is set here too
/// when a part fails.
pub(super) fn send_parts(
    job: &Job,
    path: &Path,
    shared: &Mutex<State>,
    progress: &Progress,
    cancel: &AtomicBool,
) -> std::result::Result<Result<()>, Restart> {
    let (upload_id, size, todo) = {
        let s = shared.lock().unwrap();
        let todo: Vec<u32> = (1..=part_count(s.size, s.part_size))
            .filter(|n| !s.parts.contains_key(n))
            .collect();
        (s.upload_id.clone(), s.size, todo)
    };
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<std::result::Result<ClientError, Restart>>> = Mutex::new(None);
    let (api, source, opts) = (job.api, job.source, job.opts);
    let workers = opts.parallel.clamp(1, todo.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                while !cancel.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&n) = todo.get(i) else { break };
                    match send_part(api, size, source, opts, &upload_id, n, progress) {
                        Ok(etag) => {
                            let mut s = shared.lock().unwrap();
                            let (_, len) = part_range(n, size, opts.part_size);
                            s.parts.insert(n, (etag, len));
                            if let Err(e) = save_state(path, &s) {
                                *failure.lock().unwrap() = Some(Ok(e));
                                cancel.store(true, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            failure.lock().unwrap().get_or_insert(e);
                            cancel.store(true, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
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
    size: u64,
    source: &dyn Source,
    opts: &Options,
    upload_id: &str,
    n: u32,
    progress: &Progress,
) -> std::result::Result<String, std::result::Result<ClientError, Restart>> {
    let (offset, len) = part_range(n, size, opts.part_size);
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
