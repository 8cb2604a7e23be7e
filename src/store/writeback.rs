//! Early writeback: a background thread that flushes a database file's dirty pages while
//! writing goes on, so that the next durable commit finds little left to write.
//!
//! Bulk writes (the chunks of a part upload through non-durable commits, the batches of a
//! backup through commits whose syncs are put off) go into the file without a sync, and the
//! kernel keeps them in its page cache: far below its
//! own writeback thresholds, it would write them all only at the next `fsync`, the durable
//! commit that ends the part or the backup, which then waits for every byte. Flushing in the
//! background as the data arrives overlaps that disk time with receiving the next bytes.
//! An early flush is harmless to redb's crash safety: the kernel may write any dirty page at
//! any time anyway, and redb's durability rests only on the order of its own syncs.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;

/// What to flush.
pub enum Target {
    /// An open file (a backup's new copy).
    File(File),
    /// The file at this path, opened for each flush: the server's database, which the storage
    /// doctor may close and reopen at any time.
    Path(PathBuf),
}

/// A flushing thread, woken by [`Flusher::kick`].
pub struct Flusher {
    kick: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    /// Starts the thread; `None` (or a thread that cannot start) flushes nothing.
    pub fn new(target: Option<Target>) -> Flusher {
        let idle = Flusher {
            kick: None,
            thread: None,
        };
        let Some(target) = target else {
            return idle;
        };
        // One pending request is enough: a flush that starts later covers every write before.
        let (tx, rx) = sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("writeback".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    // A failed flush only loses the head start: the durable commit syncs (and
                    // reports errors) as it always does.
                    let _ = match &target {
                        Target::File(f) => f.sync_data(),
                        Target::Path(p) => File::open(p).and_then(|f| f.sync_data()),
                    };
                }
            });
        match thread {
            Ok(t) => Flusher {
                kick: Some(tx),
                thread: Some(t),
            },
            Err(_) => idle,
        }
    }

    /// Asks for a flush, unless one is already waiting to start.
    pub fn kick(&self) {
        if let Some(tx) = &self.kick {
            let _ = tx.try_send(());
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.kick = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Kicks a [`Flusher`] each time another `every` bytes have been written.
pub struct Writeback {
    flusher: Flusher,
    written: AtomicU64,
    every: u64,
}

impl Writeback {
    pub fn new(target: Option<Target>, every: u64) -> Writeback {
        Writeback {
            flusher: Flusher::new(target),
            written: AtomicU64::new(0),
            every: every.max(1),
        }
    }

    /// Counts `n` bytes written non-durably.
    pub fn wrote(&self, n: u64) {
        let before = self.written.fetch_add(n, Ordering::Relaxed);
        if (before + n) / self.every != before / self.every {
            self.flusher.kick();
        }
    }
}
