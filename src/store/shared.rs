//! Verified chunks shared between downloads of one blob that run together.
//!
//! Downloads of a popular image tend to run side by side (a fleet booting from one image, a CI
//! matrix pulling the same disk), and each would otherwise read every chunk from the database
//! itself: redb zero-fills a fresh page, copies the chunk into it from the kernel's page cache,
//! and the download checks it against its stored checksum. That is about 40 % of a download's
//! CPU here. With this cache, downloads of a blob read and check each chunk once between them
//! and send it from the same memory. A download that asks for a chunk another one is reading
//! waits for that read instead of starting its own.
//!
//! A chunk is kept only while another download of the same blob has yet to reach it (or the
//! same download needs it again further on, as with the zeros of a raw disk image), and
//! released when the last of them takes it: a lone download of a blob without repeats keeps
//! nothing and reuses one buffer that stays in the CPU's cache (keeping the last 64 chunks it
//! read, never to ask for them again, took it from 0.51-0.54 to 0.67 CPU s/GiB), and nothing
//! is held once the downloads are over. [`LIMIT`] bounds
//! what downloads far apart can hold; beyond it the oldest chunks go, and a download that
//! needed one reads it again.
//!
//! An entry cannot go stale. It is keyed by the chunk's content address and holds only bytes
//! that passed the check, in memory of its own (redb's page, which nothing writes to once it is
//! read), so no later write, deleted blob or reopened database makes it wrong.

use redb::AccessGuard;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Chunks downloads read from the database, and chunks they took from another download's read
/// (exported as metrics: their ratio is how much concurrent downloads share).
pub static CHUNKS_READ: AtomicU64 = AtomicU64::new(0);
pub static CHUNKS_SHARED: AtomicU64 = AtomicU64::new(0);

/// A chunk's verified bytes: redb's guard over the page it was read from, shared.
pub type Chunk = Arc<AccessGuard<'static, &'static [u8]>>;

/// Bytes of chunks kept at most: 64 chunks, so downloads that drift up to 64 MiB apart still
/// share their reads (with 16, four clients started together drifted further apart and shared
/// about a third of their chunks, against two thirds with 64).
pub const LIMIT: usize = 64 * 1024 * 1024;

/// The smallest amount an entry is counted as: a small chunk's guard holds a whole page.
const MIN_ENTRY_BYTES: usize = 4096;

/// Where a chunk is, or is being read, for every download that wants it.
type Slot = Mutex<Option<Chunk>>;

pub struct SharedChunks {
    /// Bytes of chunks kept at most; 0 turns sharing off.
    limit: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Every chunk kept or being read, by key.
    slots: HashMap<[u8; 32], Arc<Slot>>,
    /// The kept chunks, oldest first.
    kept: VecDeque<Kept>,
    bytes: usize,
    /// The downloads running, by blob.
    readers: HashMap<[u8; 32], Readers>,
}

/// The downloads of one blob.
struct Readers {
    /// The chunk index each has reached.
    at: Vec<Arc<AtomicUsize>>,
    /// For each entry of the blob's chunk list, whether the same chunk comes again later:
    /// worked out once for all of them (with 1,000 downloads of one blob, each working it out
    /// for itself left about 80 MiB more in the threads' allocator heaps). A blob deleted and
    /// uploaded again with other parts while an old download runs gets the old answer, which
    /// only decides what is kept, never which bytes are sent.
    again: Arc<Vec<bool>>,
}

struct Kept {
    key: [u8; 32],
    /// The blob whose downloads it is kept for.
    blob: [u8; 32],
    bytes: usize,
}

impl Inner {
    /// Whether a download of `blob` other than `me` has yet to take chunk `index`.
    fn someone_behind(&self, blob: &[u8; 32], me: &Arc<AtomicUsize>, index: usize) -> bool {
        self.readers.get(blob).is_some_and(|r| {
            r.at.iter()
                .any(|p| !Arc::ptr_eq(p, me) && p.load(Ordering::Relaxed) <= index)
        })
    }

    /// Stops keeping the chunk `key` if `slot` is where it is kept (or being read).
    fn release(&mut self, key: &[u8; 32], slot: &Arc<Slot>) {
        if !self.slots.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            return;
        }
        self.slots.remove(key);
        if let Some(i) = self.kept.iter().position(|k| &k.key == key) {
            let k = self.kept.remove(i).expect("position is in range");
            self.bytes -= k.bytes;
        }
    }

    /// Counts a filled slot among the kept chunks and drops the oldest beyond `limit`.
    fn keep(&mut self, kept: Kept, slot: &Arc<Slot>, limit: usize) {
        match self.slots.get(&kept.key) {
            Some(s) if Arc::ptr_eq(s, slot) => {}
            // Its slot was dropped while it was being read (a failed read of the same chunk
            // removed it); it is kept from here on.
            None => {
                self.slots.insert(kept.key, slot.clone());
            }
            // Another slot holds the key: that one is kept; this one lives on only with the
            // downloads holding it.
            Some(_) => return,
        }
        self.bytes += kept.bytes;
        self.kept.push_back(kept);
        while self.bytes > limit {
            let Some(old) = self.kept.pop_front() else {
                break;
            };
            self.slots.remove(&old.key);
            self.bytes -= old.bytes;
        }
    }
}

/// A running download of one blob, for as long as it is held: it tells the others which chunks
/// it has yet to take.
pub struct Seat<'a> {
    shared: &'a SharedChunks,
    blob: [u8; 32],
    /// The index of the first chunk it has yet to take.
    at: Arc<AtomicUsize>,
    again: Arc<Vec<bool>>,
}

impl Drop for Seat<'_> {
    fn drop(&mut self) {
        let mut inner = lock(&self.shared.inner);
        let Some(readers) = inner.readers.get_mut(&self.blob) else {
            return;
        };
        readers.at.retain(|p| !Arc::ptr_eq(p, &self.at));
        if readers.at.is_empty() {
            // The last download of the blob is over: what was kept for it goes.
            inner.readers.remove(&self.blob);
            let (gone, stay) = std::mem::take(&mut inner.kept)
                .into_iter()
                .partition::<VecDeque<_>, _>(|k| k.blob == self.blob);
            inner.kept = stay;
            for k in gone {
                inner.slots.remove(&k.key);
                inner.bytes -= k.bytes;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here leaves a half-updated state behind a panic, so a poisoned lock is usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SharedChunks {
    pub fn new(limit: usize) -> SharedChunks {
        SharedChunks {
            limit,
            inner: Mutex::default(),
        }
    }

    /// Registers a download of `blob` starting at chunk `at`. `again` works out, for each entry
    /// of the blob's chunk list, whether its chunk comes again later; it runs only when no other
    /// download of the blob is registered.
    pub fn seat(&self, blob: &[u8; 32], at: usize, again: impl FnOnce() -> Vec<bool>) -> Seat<'_> {
        let at = Arc::new(AtomicUsize::new(at));
        let known = lock(&self.inner).readers.get(blob).map(|r| r.again.clone());
        let again = known.unwrap_or_else(|| Arc::new(again()));
        let mut inner = lock(&self.inner);
        let readers = inner.readers.entry(*blob).or_insert_with(|| Readers {
            at: Vec::new(),
            again,
        });
        readers.at.push(at.clone());
        Seat {
            shared: self,
            blob: *blob,
            at,
            again: readers.again.clone(),
        }
    }

    /// Chunk `index` of the seat's blob, whose key is `key`: kept by another download, or else
    /// from `read`, which must return it checked. A chunk the blob repeats later (such as the
    /// zeros of a raw disk image) is kept for this download too. While one download reads a
    /// chunk, others asking for it wait for that read. A failed read is not remembered: the
    /// next download reads again and reports its own failure.
    pub fn get_or_read<E>(
        &self,
        seat: &Seat<'_>,
        index: usize,
        key: &[u8; 32],
        read: impl FnOnce() -> Result<Chunk, E>,
    ) -> Result<Chunk, E> {
        if self.limit == 0 {
            return read();
        }
        let again = seat.again.get(index).copied().unwrap_or(false);
        seat.at.store(index, Ordering::Relaxed);
        let slot = lock(&self.inner).slots.entry(*key).or_default().clone();
        let mut held = lock(&slot);
        if let Some(chunk) = &*held {
            let chunk = chunk.clone();
            drop(held);
            seat.at.store(index + 1, Ordering::Relaxed);
            CHUNKS_SHARED.fetch_add(1, Ordering::Relaxed);
            let mut inner = lock(&self.inner);
            if !again && !inner.someone_behind(&seat.blob, &seat.at, index) {
                inner.release(key, &slot);
            }
            return Ok(chunk);
        }
        CHUNKS_READ.fetch_add(1, Ordering::Relaxed);
        let result = read();
        if let Ok(chunk) = &result {
            *held = Some(chunk.clone());
            seat.at.store(index + 1, Ordering::Relaxed);
        }
        drop(held);
        let mut inner = lock(&self.inner);
        match &result {
            Ok(chunk) if again || inner.someone_behind(&seat.blob, &seat.at, index) => {
                let kept = Kept {
                    key: *key,
                    blob: seat.blob,
                    bytes: chunk.value().len().max(MIN_ENTRY_BYTES),
                };
                inner.keep(kept, &slot, self.limit);
            }
            // Nobody else needs it (or it failed): downloads already waiting on the slot get
            // it from there, and it goes with the last of them.
            _ => inner.release(key, &slot),
        }
        result
    }

    /// Bytes of chunks kept now.
    #[cfg(test)]
    fn held(&self) -> usize {
        lock(&self.inner).bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, ReadOnlyTable, ReadableDatabase, TableDefinition};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    const T: TableDefinition<u8, &[u8]> = TableDefinition::new("t");
    const BLOB: [u8; 32] = [9; 32];

    /// A database holding chunk `[k; len]` under each key `k`, read through a counter. Chunk `k`
    /// goes by the cache key `[k; 32]`. Fields drop in order: the table before its database.
    struct Chunks {
        table: ReadOnlyTable<u8, &'static [u8]>,
        _db: Database,
        _dir: tempfile::TempDir,
        reads: AtomicUsize,
    }

    impl Chunks {
        fn new(keys: &[u8], len: usize) -> Chunks {
            let dir = tempfile::tempdir().unwrap();
            let db = Database::create(dir.path().join("db")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(T).unwrap();
                for &k in keys {
                    t.insert(k, vec![k; len].as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
            Chunks {
                table: db.begin_read().unwrap().open_table(T).unwrap(),
                _db: db,
                _dir: dir,
                reads: AtomicUsize::new(0),
            }
        }

        /// Reads chunk `k` from the database, counting the read.
        fn read(&self, k: u8) -> Result<Chunk, String> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            Ok(Arc::new(self.table.get(k).unwrap().unwrap()))
        }

        /// `get_or_read` of chunk `k` at position `index` for `seat`.
        fn get(&self, shared: &SharedChunks, seat: &Seat<'_>, index: usize, k: u8) -> Chunk {
            shared
                .get_or_read(seat, index, &[k; 32], || self.read(k))
                .unwrap()
        }

        fn reads(&self) -> usize {
            self.reads.load(Ordering::SeqCst)
        }
    }

    /// Two downloads of `BLOB`, both at its start.
    fn two_seats(shared: &SharedChunks) -> (Seat<'_>, Seat<'_>) {
        (
            shared.seat(&BLOB, 0, Vec::new),
            shared.seat(&BLOB, 0, Vec::new),
        )
    }

    #[test]
    fn a_lone_download_keeps_nothing() {
        let c = Chunks::new(&[1, 2], 10_000);
        let shared = SharedChunks::new(1 << 20);
        let seat = shared.seat(&BLOB, 0, Vec::new);
        assert_eq!(c.get(&shared, &seat, 0, 1).value(), &[1u8; 10_000][..]);
        c.get(&shared, &seat, 1, 2);
        c.get(&shared, &seat, 2, 1);
        assert_eq!(c.reads(), 3);
        assert_eq!(shared.held(), 0);
    }

    #[test]
    fn a_chunk_a_lone_download_needs_again_is_kept_for_it() {
        let c = Chunks::new(&[0, 1], 10_000);
        let shared = SharedChunks::new(1 << 20);
        // The chunk list 0, 1, 0, 0: chunk 0 is needed again after indexes 0 and 2.
        let seat = shared.seat(&BLOB, 0, || vec![true, false, true, false]);
        for (index, k) in [(0, 0), (1, 1), (2, 0), (3, 0)] {
            assert_eq!(c.get(&shared, &seat, index, k).value()[0], k);
        }
        assert_eq!(c.reads(), 2);
        assert_eq!(shared.held(), 0, "its last use released it");
    }

    #[test]
    fn a_chunk_is_kept_until_the_last_download_behind_takes_it() {
        let c = Chunks::new(&[1, 2], 10_000);
        let shared = SharedChunks::new(1 << 20);
        let (lead, follow) = two_seats(&shared);
        c.get(&shared, &lead, 0, 1);
        c.get(&shared, &lead, 1, 2);
        assert_eq!(shared.held(), 20_000);
        assert_eq!(c.get(&shared, &follow, 0, 1).value()[0], 1);
        assert_eq!(
            shared.held(),
            10_000,
            "chunk 1 went with the last download needing it"
        );
        assert_eq!(c.get(&shared, &follow, 1, 2).value()[0], 2);
        assert_eq!(shared.held(), 0);
        assert_eq!(c.reads(), 2);
    }

    #[test]
    fn what_was_kept_for_a_blob_goes_with_its_last_download() {
        let c = Chunks::new(&[1, 2], 10_000);
        let shared = SharedChunks::new(1 << 20);
        let other = shared.seat(&[8; 32], 0, Vec::new);
        let (lead, follow) = two_seats(&shared);
        c.get(&shared, &lead, 0, 1);
        assert_eq!(shared.held(), 10_000);
        // A download of another blob is not behind this one's: what it reads is not kept.
        c.get(&shared, &other, 0, 2);
        assert_eq!(shared.held(), 10_000);
        drop(lead);
        assert_eq!(shared.held(), 10_000, "follow has yet to take chunk 1");
        drop(follow);
        assert_eq!(shared.held(), 0);
        assert!(lock(&shared.inner).slots.is_empty());
    }

    #[test]
    fn downloads_asking_together_wait_for_one_read() {
        let c = Chunks::new(&[7], 10_000);
        let shared = SharedChunks::new(1 << 20);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let seat = shared.seat(&BLOB, 0, Vec::new);
                    let chunk = shared
                        .get_or_read(&seat, 0, &[7; 32], || {
                            // Slow enough that every other thread arrives during the read.
                            std::thread::sleep(Duration::from_millis(200));
                            c.read(7)
                        })
                        .unwrap();
                    assert_eq!(chunk.value()[0], 7);
                });
            }
        });
        assert_eq!(c.reads(), 1);
    }

    #[test]
    fn a_failed_read_is_not_remembered() {
        let c = Chunks::new(&[2], 100);
        let shared = SharedChunks::new(1 << 20);
        let (lead, _follow) = two_seats(&shared);
        let failed: Result<Chunk, String> =
            shared.get_or_read(&lead, 0, &[2; 32], || Err("damaged".to_string()));
        assert_eq!(failed.err().as_deref(), Some("damaged"));
        assert_eq!(shared.held(), 0);
        assert_eq!(c.get(&shared, &lead, 0, 2).value(), &[2u8; 100][..]);
        assert_eq!(c.reads(), 1);
    }

    #[test]
    fn the_oldest_chunks_go_beyond_the_limit() {
        let c = Chunks::new(&[1, 2, 3], 10_000);
        let shared = SharedChunks::new(25_000);
        let (lead, follow) = two_seats(&shared);
        for k in 1..=3 {
            c.get(&shared, &lead, k as usize - 1, k);
        }
        assert_eq!(
            shared.held(),
            20_000,
            "chunk 1 was dropped to stay under 25,000 bytes"
        );
        assert_eq!(c.get(&shared, &follow, 0, 1).value()[0], 1);
        assert_eq!(c.reads(), 4, "1 had to be read again");
        c.get(&shared, &follow, 1, 2);
        c.get(&shared, &follow, 2, 3);
        assert_eq!(c.reads(), 4, "2 and 3 were still held");
    }

    #[test]
    fn a_zero_limit_reads_every_time() {
        let c = Chunks::new(&[4], 100);
        let shared = SharedChunks::new(0);
        let (lead, follow) = two_seats(&shared);
        c.get(&shared, &lead, 0, 4);
        c.get(&shared, &follow, 0, 4);
        assert_eq!(c.reads(), 2);
        assert_eq!(shared.held(), 0);
    }

    #[test]
    fn a_finished_download_leaves_no_seat() {
        let shared = SharedChunks::new(1 << 20);
        drop((
            shared.seat(&BLOB, 0, Vec::new),
            shared.seat(&BLOB, 3, Vec::new),
        ));
        assert!(lock(&shared.inner).readers.is_empty());
    }
}
