//! The store's reader threads: a fixed few, fed by one bounded queue ([`super::Store::read`]).
//!
//! Reads must not run on a tokio worker (sled's reads take a process-wide lock that queues
//! behind a waiting transaction). They used to run on tokio's blocking pool, which starts a
//! thread for every read that finds none idle (up to 512) and keeps each for 10 s: under
//! `dvmd bench load --customers 100 --paid` it held about 25 threads, and the daemon's RSS at
//! job 20,000 was 140-154 MB. With three reader threads it was 87 MB, at the same throughput
//! (each thread keeps its own allocator cache and its own bag of pages sled retired, freed only
//! when the bag fills). Reads are short and CPU-bound, so more threads than cores buy nothing.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};

use super::{Reader, Trees};

/// A read, boxed: it answers its caller itself (see `Store::read`).
pub(super) type Read = Box<dyn FnOnce(&Reader<'_>) + Send>;

/// Reads waiting for a thread; a caller beyond it waits (async) for room.
pub(super) const QUEUE_CAPACITY: usize = 4_096;

/// How many reader threads: one per core, at least 2 (a long read never holds up every other)
/// and at most 8.
pub(super) fn count() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 8)
}

/// Start `count` reader threads over `trees`; they stop when the returned sender and its clones
/// are gone. The threads hold the trees weakly, so the database closes with the last `Store`.
pub(super) fn spawn(trees: &Arc<Trees>, count: usize) -> std::io::Result<flume::Sender<Read>> {
    let (sender, queue) = flume::bounded::<Read>(QUEUE_CAPACITY);
    for i in 0..count {
        let trees = Arc::downgrade(trees);
        let queue = queue.clone();
        std::thread::Builder::new()
            .name(format!("dvmd-read-{i}"))
            .spawn(move || serve(&trees, &queue))?;
    }
    Ok(sender)
}

fn serve(trees: &Weak<Trees>, queue: &flume::Receiver<Read>) {
    while let Ok(read) = queue.recv() {
        let Some(trees) = trees.upgrade() else {
            return;
        };
        // A read that panics drops its answer (the caller gets `StoreError::Read`); the thread
        // serves on.
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| read(&trees.reader())));
    }
}
