//! Uploading a local file while it is hashed (`imgsrv push`): the digest is given at complete
//! (docs/api.md, decision 18), so the first part leaves at once instead of after a whole pass
//! over the file.
//!
//! A session is begun without a digest and the parts go up in order, one at a time by default,
//! so that the server carries the blob's sha256 from each part to the next and `complete` has
//! nothing left to hash. Meanwhile a second thread hashes the file (a second read, from the
//! page cache) at the lowest scheduling priority; on an idle core hashing is about three times
//! faster than loopback upload. When the digest is known, the server is asked whether it
//! already holds that blob (a session begun with the digest answers `ready` at once); if it
//! does, no further part is sent and the late session is aborted. Otherwise `complete` gives
//! the digest, and the server checks the assembled bytes against it.
//!
//! Resuming works as for digest-first uploads (`upload`), except that the state file is named
//! by what is known before hashing: the server, the file's canonical path, size, modification
//! and change times, inode, and the part size. The digest is written into it once known. A
//! file that changed since the interrupted run is caught twice over: its new digest differs
//! from the stored one, and failing that, `complete` finds that the assembled bytes do not
//! match; either way the upload starts over with a new session.
//!
//! Files of at most [`HASH_FIRST_MAX`] bytes, and files this client has pushed to the same
//! server before (a record under `known/` in the state directory, keyed like the state file),
//! are hashed first and uploaded digest-first instead: the server answers a known blob at
//! begin, so nothing is sent. The record only says that hashing first is worth it; the digest
//! used is always the one just computed.

use super::upload::{
    self, BlobRef, Job, Options, Outcome, Restart, Resumable, Source, State, load_state, save_state,
};
use super::{Api, ClientError, Result};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Files up to this size are hashed before anything is sent: it takes milliseconds.
pub const HASH_FIRST_MAX: u64 = 8 * 1024 * 1024;

/// What became of one file.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub blob: BlobRef,
    /// The server already had the blob.
    pub present: bool,
    /// Bytes this run sent (some may have gone before the digest showed the blob was there).
    pub sent: u64,
}

/// sha256 and size of a file, read in 1 MiB blocks (never the whole file in memory).
pub fn hash_file(path: &Path) -> Result<BlobRef> {
    hash_file_until(path, &AtomicBool::new(false))
}

/// [`hash_file`], giving up when `quit` is set.
fn hash_file_until(path: &Path, quit: &AtomicBool) -> Result<BlobRef> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| ClientError::usage(format!("cannot open {}: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    // Small enough to stay in the CPU's cache between the read that fills it and the hash that
    // reads it; large enough that the read calls are few.
    let mut buf = vec![0u8; 256 << 10];
    let mut size = 0u64;
    loop {
        if quit.load(Ordering::Relaxed) {
            return Err(ClientError::failed("hashing stopped"));
        }
        let n = f
            .read(&mut buf)
            .map_err(|e| ClientError::failed(format!("reading {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let digest: [u8; 32] = hasher.finalize().into();
    Ok(BlobRef {
        digest: crate::digest::Digest::from(digest).to_string(),
        size,
    })
}

/// Lowers the calling thread to the least scheduling priority (nice 19), so that the hash
/// runs on CPU time nobody else wants. The parts leave at the pace of the server, and on a
/// machine with few cores (a CI runner pushing to a server on the same host, as in
/// scripts/bench) hashing at full priority takes CPU from the server's ingest, which must hash
/// the same bytes anyway: measured on 2 cores, push was 8 % faster with this. The hash is
/// still needed (it is checked at `complete`); if it is behind when the last part has gone,
/// it runs alone and at full speed. A failure to lower the priority changes only the speed.
fn hash_in_spare_time() {
    // On Linux, setpriority(PRIO_PROCESS) given a thread id sets that one thread's nice value.
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19);
}

/// Part bytes straight from the file.
pub struct FileSource {
    pub path: PathBuf,
}

impl Source for FileSource {
    fn open(&self, offset: u64, _len: u64) -> Result<Box<dyn Read + Send + '_>> {
        let mut f = std::fs::File::open(&self.path).map_err(|e| {
            ClientError::failed(format!("cannot open {}: {e}", self.path.display()))
        })?;
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| ClientError::failed(format!("seeking {}: {e}", self.path.display())))?;
        // Unbuffered: the HTTP client reads straight into its 128 KiB output buffer, and a
        // buffer here would only add a copy of every byte.
        Ok(Box::new(f))
    }
}

/// What names a file before it is hashed: its canonical path, size, modification and change
/// times and inode. Writing to the file changes its change time, so a changed file gets a new
/// identity (and a resumed session is never matched with other bytes by mistake; `complete`
/// would catch that anyway).
struct FileId {
    size: u64,
    key: String,
}

impl FileId {
    fn of(path: &Path) -> Result<FileId> {
        use std::os::unix::fs::MetadataExt;
        let canonical = std::fs::canonicalize(path)
            .map_err(|e| ClientError::usage(format!("cannot read {}: {e}", path.display())))?;
        let m = std::fs::metadata(&canonical)
            .map_err(|e| ClientError::usage(format!("cannot read {}: {e}", path.display())))?;
        Ok(FileId {
            size: m.len(),
            key: format!(
                "{}\n{}\n{}.{:09}\n{}.{:09}\n{}:{}",
                canonical.display(),
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                m.dev(),
                m.ino()
            ),
        })
    }
}

/// The record that this file was pushed to this server before (see the module docs).
fn known_path(api: &Api, opts: &Options, id: &FileId) -> PathBuf {
    upload::state_file(
        &opts.state_dir.join("known"),
        &format!("known\n{}\n{}", api.base(), id.key),
    )
}

fn remember(api: &Api, opts: &Options, id: &FileId, blob: &BlobRef) {
    let body = serde_json::json!({"digest": blob.digest, "size": blob.size});
    // Only a hint: failing to write it costs the next run a late upload, nothing more.
    let _ = upload::write_atomically(&known_path(api, opts, id), body.to_string().as_bytes());
}

/// The file's digest, computed by a thread of its own and awaited by others.
struct Hashing {
    slot: Mutex<Option<Result<BlobRef>>>,
    done: Condvar,
}

impl Hashing {
    fn new() -> Hashing {
        Hashing {
            slot: Mutex::new(None),
            done: Condvar::new(),
        }
    }

    fn set(&self, r: Result<BlobRef>) {
        *self.slot.lock().unwrap() = Some(r);
        self.done.notify_all();
    }

    fn wait(&self) -> Result<BlobRef> {
        let mut slot = self.slot.lock().unwrap();
        loop {
            if let Some(r) = slot.as_ref() {
                return r.clone();
            }
            slot = self.done.wait(slot).unwrap();
        }
    }

    /// The result, or `None` once `stop` is set before it is there.
    fn wait_unless(&self, stop: &AtomicBool) -> Option<Result<BlobRef>> {
        let mut slot = self.slot.lock().unwrap();
        loop {
            if let Some(r) = slot.as_ref() {
                return Some(r.clone());
            }
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            slot = self
                .done
                .wait_timeout(slot, Duration::from_millis(50))
                .unwrap()
                .0;
        }
    }
}

/// Makes the file's bytes present on the server and returns its digest: hashing while sending
/// (see the module docs), or hashing first for a small or already pushed file.
pub fn ensure_file(
    api: &Api,
    path: &Path,
    name: &str,
    media_type: Option<&str>,
    opts: &Options,
) -> Result<Pushed> {
    let id = FileId::of(path)?;
    let source = FileSource {
        path: path.to_path_buf(),
    };
    let job = Job {
        api,
        name,
        media_type,
        source: &source,
        opts,
    };
    if id.size <= HASH_FIRST_MAX || known_path(api, opts, &id).exists() {
        let blob = hash_file(path)?;
        let pushed = digest_first(&job, &blob)?;
        remember(api, opts, &id, &pushed.blob);
        return Ok(pushed);
    }
    let hashing = Hashing::new();
    let quit = AtomicBool::new(false);
    let state_path = upload::state_file(
        &opts.state_dir,
        &format!("late\n{}\n{}\n{}", api.base(), id.key, opts.part_size),
    );
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            hash_in_spare_time();
            hashing.set(hash_file_until(path, &quit))
        });
        let r = late(&job, &id, &state_path, &hashing);
        // An error before the hash is done need not wait for it.
        quit.store(true, Ordering::Relaxed);
        r
    })?;
    remember(api, opts, &id, &result.blob);
    Ok(result)
}

fn digest_first(job: &Job, blob: &BlobRef) -> Result<Pushed> {
    let outcome = upload::ensure_blob(job, blob)?;
    Ok(Pushed {
        blob: blob.clone(),
        present: outcome == Outcome::Present,
        sent: match outcome {
            Outcome::Uploaded { bytes } => bytes,
            Outcome::Present => 0,
        },
    })
}

/// The late upload, started over once with a fresh session when the first is unusable.
fn late(job: &Job, id: &FileId, state_path: &Path, hashing: &Hashing) -> Result<Pushed> {
    let name = job.name;
    for attempt in 0..2 {
        match try_late(job, id, state_path, hashing) {
            Err(Restart(why)) if attempt == 0 => {
                eprintln!("{name}: {why}; starting a new upload session");
                let _ = std::fs::remove_file(state_path);
            }
            Err(Restart(why)) => return Err(ClientError::failed(format!("{name}: {why}"))),
            Ok(Attempt::Done(r)) => return r,
            Ok(Attempt::Unsupported) => {
                // A server from before decision 18 wants the digest at begin.
                let blob = hashing.wait()?;
                return digest_first(job, &blob);
            }
        }
    }
    unreachable!("the loop returns")
}

enum Attempt {
    Done(Result<Pushed>),
    /// The server refused a session without a digest.
    Unsupported,
}

/// What the digest, once known, showed while the parts were going up.
enum Verdict {
    /// The server holds the blob already.
    Present(BlobRef),
    /// The file is not the one whose digest the state file recorded.
    Changed,
    /// The file could not be hashed.
    Unreadable(ClientError),
}

fn try_late(
    job: &Job,
    id: &FileId,
    path: &Path,
    hashing: &Hashing,
) -> std::result::Result<Attempt, Restart> {
    let (api, name, media_type, opts) = (job.api, job.name, job.media_type, job.opts);
    let done = |r: Result<Pushed>| Ok(Attempt::Done(r));
    let mut state = load_state(path).filter(|s| {
        s.server == api.base()
            && s.file == id.key
            && s.size == id.size
            && s.part_size == opts.part_size
    });
    let mut resumed = false;
    if let Some(s) = &state {
        match upload::check_session(api, &s.upload_id) {
            Err(e) => return done(Err(e)),
            Ok(Resumable::Ready(session)) => {
                // The interrupted run completed it after all: it is this file's blob if the
                // digests agree.
                let blob = match hashing.wait() {
                    Ok(b) => b,
                    Err(e) => return done(Err(e)),
                };
                let _ = std::fs::remove_file(path);
                if session["expected_digest"] == blob.digest.as_str() {
                    return done(Ok(Pushed {
                        blob,
                        present: true,
                        sent: 0,
                    }));
                }
                state = None;
            }
            Ok(Resumable::Open) => resumed = true,
            Ok(Resumable::Gone) => state = None,
        }
    }
    let state = match state {
        Some(s) => s,
        None => {
            let mut body =
                serde_json::json!({"expected_size_bytes": id.size, "filename_hint": name});
            if let Some(m) = media_type {
                body["media_type_hint"] = serde_json::json!(m);
            }
            let r = match api.send("POST", "/v1/uploads", Some(&body)) {
                Ok(r) => r,
                Err(e) => return done(Err(e)),
            };
            if r.status == 400 {
                return Ok(Attempt::Unsupported);
            }
            let begun = match r.expect(&format!("{name}: beginning the upload"), &[201]) {
                Ok(v) => v,
                Err(e) => return done(Err(e)),
            };
            let s = State {
                server: api.base().to_string(),
                digest: String::new(),
                size: id.size,
                part_size: opts.part_size,
                upload_id: begun["id"].as_str().unwrap_or_default().to_string(),
                parts: BTreeMap::new(),
                file: id.key.clone(),
            };
            if let Err(e) = save_state(path, &s) {
                return done(Err(e));
            }
            s
        }
    };

    let progress = upload::start_progress(name, &state);
    let shared = Mutex::new(state);
    let cancel = AtomicBool::new(false);
    let sending_done = AtomicBool::new(false);
    let verdict: Mutex<Option<Verdict>> = Mutex::new(None);
    let sent = std::thread::scope(|scope| {
        // The digest's first use: is the blob there already, and is this the file whose
        // digest the state file holds?
        scope.spawn(|| {
            let Some(hashed) = hashing.wait_unless(&sending_done) else {
                return;
            };
            let blob = match hashed {
                Ok(b) => b,
                Err(e) => {
                    *verdict.lock().unwrap() = Some(Verdict::Unreadable(e));
                    cancel.store(true, Ordering::Relaxed);
                    return;
                }
            };
            {
                let mut s = shared.lock().unwrap();
                if !s.digest.is_empty() && s.digest != blob.digest {
                    *verdict.lock().unwrap() = Some(Verdict::Changed);
                    cancel.store(true, Ordering::Relaxed);
                    return;
                }
                s.digest = blob.digest.clone();
                // Only a record for a later run: the parts' own saves write it too.
                let _ = save_state(path, &s);
            }
            // Once every part is sent, `complete` deduplicates by itself.
            if sending_done.load(Ordering::Relaxed) {
                return;
            }
            match upload::begin(api, name, blob.size, Some(&blob.digest), media_type) {
                Ok(v) if v["state"] == "ready" => {
                    *verdict.lock().unwrap() = Some(Verdict::Present(blob));
                    cancel.store(true, Ordering::Relaxed);
                }
                // Not there: the probe's own session is not needed.
                Ok(v) => upload::abort(api, v["id"].as_str().unwrap_or_default()),
                // Only a shortcut: `complete` decides.
                Err(_) => {}
            }
        });
        let r = upload::send_parts(job, path, &shared, &progress, &cancel);
        sending_done.store(true, Ordering::Relaxed);
        r
    });
    let mut state = shared.into_inner().unwrap();
    let sent_now = progress.counter().load(Ordering::Relaxed);
    match verdict.into_inner().unwrap() {
        Some(Verdict::Present(blob)) => {
            upload::abort(api, &state.upload_id);
            let _ = std::fs::remove_file(path);
            progress.finish("already on the server, the rest not sent");
            return done(Ok(Pushed {
                blob,
                present: true,
                sent: sent_now,
            }));
        }
        Some(Verdict::Changed) => {
            upload::abort(api, &state.upload_id);
            return Err(Restart(
                "the file changed since the interrupted run".to_string(),
            ));
        }
        // The session stays for a later run.
        Some(Verdict::Unreadable(e)) => return done(Err(e)),
        None => {}
    }
    if let Err(e) = sent? {
        return done(Err(e));
    }

    let blob = match hashing.wait() {
        Ok(b) => b,
        Err(e) => return done(Err(e)),
    };
    if blob.size != state.size || (!state.digest.is_empty() && state.digest != blob.digest) {
        upload::abort(api, &state.upload_id);
        return Err(Restart("the file changed while it was pushed".to_string()));
    }
    state.digest = blob.digest.clone();
    if let Err(e) = save_state(path, &state) {
        return done(Err(e));
    }
    let session = match upload::complete(api, name, &state, Some(&blob.digest))? {
        Ok(v) => v,
        Err(e) => return done(Err(e)),
    };
    let _ = std::fs::remove_file(path);
    if session["state"] != "ready" {
        progress.finish("failed");
        if resumed {
            // Parts from the interrupted run may hold other bytes than the file has now.
            return Err(Restart(format!(
                "the server did not verify the resumed upload ({})",
                session["failure_message"]
                    .as_str()
                    .unwrap_or("no reason given")
            )));
        }
        return done(Err(upload::not_verified(name, &session)));
    }
    if session["expected_digest"] != blob.digest.as_str() {
        return done(Err(ClientError::failed(format!(
            "{name}: the server completed the upload as {}, not {}",
            session["expected_digest"], blob.digest
        ))));
    }
    progress.finish("verified by the server");
    done(Ok(Pushed {
        blob,
        present: false,
        sent: sent_now,
    }))
}
