//! The store writer: one thread applies every write in the order it arrives and makes them
//! durable in group commits.
//!
//! Why one thread: sled 0.34 deadlocks when flushes run beside transactions on other threads
//! (upstream #1308, #1412; dvmd froze at 10 concurrent customers). Here nothing but this thread
//! writes or flushes. It takes every command waiting in its queue (up to [`MAX_GROUP`]), runs
//! them in order in one sled transaction (each write still keeps or drops its own changes, see
//! `tx::Overlay`), answers the writes that only needed to be applied, then runs one blocking
//! `flush` (one `fdatasync`) for the whole group and answers the writes that waited for
//! durability. N concurrent jobs share one transaction and one sync instead of paying for
//! their own: sled 0.34 writes and syncs its log twice for every transaction, however small.
//!
//! A sled error, a failed flush or a panicking write stops the writer for good: every waiting
//! and later write gets [`StoreError::WriterFailed`], and [`Status::failed`] fires so the daemon
//! reports it (`/healthz` 503) and exits non-zero. A store that cannot persist must not go on
//! taking payments.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{StoreError, Trees};
use crate::metrics::Histogram;

/// Most commands applied before a flush: bounds how long the first write of a group waits.
pub(super) const MAX_GROUP: usize = 1024;
/// Writes that did not ask for durability are flushed at the latest this long after they were
/// applied (sled's own background flusher is off: it takes the same lock).
pub(super) const IDLE_FLUSH: Duration = Duration::from_millis(500);
/// Longest the writer spends at a time rewriting pages out of fragmented segments (sled's
/// segment cleaning, which only its background flusher would do otherwise): after each group,
/// and again and again while it is idle and there is more to clean.
pub(super) const CLEAN_BUDGET: Duration = Duration::from_millis(1);
/// Room in the writer's queue; callers wait (asynchronously) when it is full.
pub(super) const QUEUE_CAPACITY: usize = 4096;

/// Group size buckets (writes per fsync).
const GROUP_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Hands a write's answer to its caller once the writer knows whether it is durable.
pub(super) type Deliver = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// One caller's write, as the writer runs it inside its group's sled transaction.
pub(super) trait Change: Send {
    /// Run the change. `Ok(true)`: keep its changes; `Ok(false)`: it refused (its changes are
    /// dropped, its refusal is its answer); `Err`: sled failed (the group fails) or asked to
    /// run the group again.
    fn run(
        &mut self,
        tx: &super::Tx<'_>,
    ) -> Result<bool, sled::transaction::ConflictableTransactionError<std::convert::Infallible>>;
    /// Answer the caller once the group committed (and, if it asked, is durable) or failed.
    fn answer(self: Box<Self>, done: Result<(), StoreError>);
}

/// A write for the writer thread.
pub(super) struct Write {
    pub(super) change: Box<dyn Change>,
    /// Answer only after the flush that covers it.
    pub(super) durable: bool,
    pub(super) enqueued: Instant,
}

/// What the writer thread takes.
pub(super) enum Command {
    Write(Write),
    /// Answer once everything applied before it is durable.
    Sync {
        reply: oneshot::Sender<Result<(), StoreError>>,
        enqueued: Instant,
    },
    /// Fail at the next flush, as if the disk had (fault tests).
    Fault(String),
    /// Flush and stop.
    Close(Option<oneshot::Sender<Result<(), StoreError>>>),
}

/// The writer's health and figures, shared with every [`super::Store`] handle.
#[derive(Default)]
pub(super) struct Status {
    failure: OnceLock<String>,
    failed: CancellationToken,
    /// Fires when the writer thread has returned, closed or failed.
    stopped: CancellationToken,
    pub(super) stats: Stats,
}

impl Status {
    /// Why the writer stopped, if it failed.
    pub(super) fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// Resolves when the writer has failed.
    pub(super) fn failed(&self) -> &CancellationToken {
        &self.failed
    }

    /// Resolves when the writer thread has returned (closed or failed). A command still in
    /// its queue then is never answered: callers wait for their answer or this, whichever
    /// comes first.
    pub(super) fn stopped(&self) -> &CancellationToken {
        &self.stopped
    }

    fn fail(&self, reason: String) {
        tracing::error!(reason = %reason, "store writer failed; no further writes are accepted");
        let _ = self.failure.set(reason);
        self.failed.cancel();
    }

    /// The error a caller gets once the writer is gone (its answer was dropped, or the queue
    /// closed). Waits for the writer to have returned, so a failure is always reported as one.
    pub(super) async fn gone(&self) -> StoreError {
        self.stopped.cancelled().await;
        match self.failure() {
            Some(reason) => StoreError::WriterFailed(reason.to_owned()),
            None => StoreError::Closed,
        }
    }
}

/// Store writer figures for `/metrics`.
pub(super) struct Stats {
    /// Enqueue to durable, for writes that waited for durability.
    pub(super) commit: Histogram,
    /// Duration of each flush (the fsync).
    pub(super) flush: Histogram,
    /// Commands applied per flush.
    pub(super) group: Histogram,
    pub(super) writes: AtomicU64,
    /// sled transactions: one a group of writes.
    pub(super) transactions: AtomicU64,
    pub(super) flushes: AtomicU64,
    /// Pages rewritten out of fragmented segments, so that their space is reused.
    pub(super) cleaned_pages: AtomicU64,
    /// The store's files on disk, bytes, as read after a flush (at most every
    /// [`DISK_READ_EVERY`]).
    pub(super) disk_bytes: AtomicU64,
}

/// How often the writer reads the store's size on disk (a stat of its files, after a flush).
const DISK_READ_EVERY: Duration = Duration::from_secs(1);

impl Default for Stats {
    fn default() -> Self {
        Self {
            commit: Histogram::default(),
            flush: Histogram::default(),
            group: Histogram::with_buckets(GROUP_BUCKETS),
            writes: AtomicU64::new(0),
            transactions: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            cleaned_pages: AtomicU64::new(0),
            disk_bytes: AtomicU64::new(0),
        }
    }
}

/// Start the writer thread over `trees`.
pub(super) fn spawn(
    trees: Arc<Trees>,
    queue: flume::Receiver<Command>,
    status: Arc<Status>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("dvmd-store-writer".into())
        .spawn(move || {
            run(&trees, &queue, &status);
            status.stopped.cancel();
        })
}

fn run(trees: &Trees, queue: &flume::Receiver<Command>, status: &Status) {
    let mut writer = Writer {
        trees,
        status,
        pending: Vec::new(),
        waiting: Vec::new(),
        dirty_since: None,
        fault: None,
        group: 0,
        last_flush: Duration::ZERO,
        last_group_waiters: 0,
        disk_read_at: None,
        cleaning: true,
    };
    loop {
        let first = if writer.cleaning {
            // Segments to clean and nothing to write: clean a slice, then look again (a write
            // applied but not flushed is still flushed within IDLE_FLUSH).
            match queue.try_recv() {
                Ok(command) => Some(command),
                Err(flume::TryRecvError::Disconnected) => Some(Command::Close(None)),
                Err(flume::TryRecvError::Empty) => {
                    if let Err(reason) = writer.clean() {
                        return writer.stop(reason);
                    }
                    if writer.stale() {
                        None
                    } else {
                        continue;
                    }
                }
            }
        } else {
            writer.next_command(queue)
        };
        writer.group = 0;
        let mut close = None;
        let mut next = first;
        let mut gather_until: Option<Instant> = None;
        'group: loop {
            // Everything queued now joins this group.
            while let Some(command) = next.take() {
                match writer.take(command) {
                    Taken::Go => {}
                    Taken::Close(reply) => {
                        close = Some(reply);
                        break 'group;
                    }
                }
                if writer.group >= MAX_GROUP {
                    break 'group;
                }
                next = queue.try_recv().ok();
            }
            // Under concurrent load, wait a little for the writes the jobs in flight are about
            // to send: one fsync then covers them too. The window is a fraction of what the
            // last flush took, so it never costs more than the flush it saves, and a lone
            // customer (groups of one) never waits at all.
            if !writer.wants_durability() {
                break;
            }
            let until = *gather_until.get_or_insert_with(|| {
                Instant::now() + gathering_window(writer.last_flush, writer.last_group_waiters)
            });
            match queue.recv_deadline(until) {
                Ok(command) => next = Some(command),
                Err(_) => break,
            }
        }
        // The group's writes, in one sled transaction.
        if let Err(reason) = writer.commit_group() {
            if let Some(Some(reply)) = close {
                let _ = reply.send(Err(StoreError::WriterFailed(reason.clone())));
            }
            return writer.stop(reason);
        }
        let stale = writer.stale();
        let must_flush =
            !writer.waiting.is_empty() || close.is_some() || stale || writer.fault.is_some();
        if must_flush && (writer.dirty_since.is_some() || writer.fault.is_some()) {
            if let Err(reason) = writer.flush() {
                if let Some(Some(reply)) = close {
                    let _ = reply.send(Err(StoreError::WriterFailed(reason.clone())));
                }
                return writer.stop(reason);
            }
        }
        writer.answer_waiting();
        if let Some(reply) = close {
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
            return;
        }
        if let Err(reason) = writer.clean() {
            return writer.stop(reason);
        }
    }
}

/// Longest a group waits for more writes before its flush.
const MAX_GATHERING: Duration = Duration::from_micros(500);

/// How long to wait for more writes before flushing, given how long the last flush took and
/// how many durable writes it covered.
fn gathering_window(last_flush: Duration, last_group_waiters: usize) -> Duration {
    if last_group_waiters < 2 {
        return Duration::ZERO;
    }
    (last_flush / 2).min(MAX_GATHERING)
}

/// The writer thread's state between commands.
struct Writer<'a> {
    trees: &'a Trees,
    status: &'a Status,
    /// Writes taken into this group, not yet run: they run together in one sled transaction
    /// when the group closes.
    pending: Vec<Write>,
    /// Durable writes and syncs applied, waiting for the next flush.
    waiting: Vec<(Deliver, Instant)>,
    /// When the oldest write not yet flushed was applied.
    dirty_since: Option<Instant>,
    fault: Option<String>,
    /// Writes taken into this group.
    group: usize,
    last_flush: Duration,
    last_group_waiters: usize,
    /// When the size on disk was last read.
    disk_read_at: Option<Instant>,
    /// The last segment cleaning made progress: there may be more to clean.
    cleaning: bool,
}

enum Taken {
    Go,
    Close(Option<oneshot::Sender<Result<(), StoreError>>>),
}

impl Writer<'_> {
    /// Wait for the next command: at most until the writes applied but not flushed are due
    /// (`None` then).
    fn next_command(&self, queue: &flume::Receiver<Command>) -> Option<Command> {
        match self.dirty_since {
            Some(since) => match queue.recv_timeout(IDLE_FLUSH.saturating_sub(since.elapsed())) {
                Ok(command) => Some(command),
                Err(flume::RecvTimeoutError::Timeout) => None,
                Err(flume::RecvTimeoutError::Disconnected) => Some(Command::Close(None)),
            },
            None => Some(queue.recv().unwrap_or(Command::Close(None))),
        }
    }

    /// Writes applied but not flushed are due for their idle flush.
    fn stale(&self) -> bool {
        self.dirty_since
            .is_some_and(|since| since.elapsed() >= IDLE_FLUSH)
    }

    /// Rewrite pages out of fragmented segments for up to [`CLEAN_BUDGET`]. Without this sled
    /// never reuses a segment (only its background flusher, which is off, would clean them):
    /// the log grew by 15 KB a free job and 53 KB a paid one, and sled's accounting of it in
    /// memory with it. The rewrites are flushed with the next group, or within IDLE_FLUSH.
    fn clean(&mut self) -> Result<(), String> {
        if self.fault.is_some() {
            self.cleaning = false;
            return Ok(());
        }
        let pages = self
            .trees
            .db
            .clean_segments(CLEAN_BUDGET)
            .map_err(|e| format!("segment cleaning failed: {e}"))?;
        self.cleaning = pages > 0;
        if pages > 0 {
            self.dirty_since.get_or_insert_with(Instant::now);
            self.status
                .stats
                .cleaned_pages
                .fetch_add(pages as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Someone in this group waits for a flush.
    fn wants_durability(&self) -> bool {
        !self.waiting.is_empty() || self.pending.iter().any(|write| write.durable)
    }

    /// Run the group's writes in one sled transaction, then answer those that only needed to
    /// be applied; the durable ones wait for the flush. A sled error or a panicking write
    /// fails every write of the group, and the writer.
    fn commit_group(&mut self) -> Result<(), String> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut writes = std::mem::take(&mut self.pending);
        let trees = self.trees;
        let committed =
            std::panic::catch_unwind(AssertUnwindSafe(|| trees.transact_group(&mut writes)));
        let failure = match committed {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("write failed: {e}")),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Some(format!("a store write panicked: {what}"))
            }
        };
        if let Some(reason) = failure {
            // Answered by `stop`, once the failure is recorded: a caller that reads
            // `failure()` after its answer always finds it.
            self.pending = writes;
            return Err(reason);
        }
        let stats = &self.status.stats;
        stats
            .writes
            .fetch_add(writes.len() as u64, Ordering::Relaxed);
        stats.transactions.fetch_add(1, Ordering::Relaxed);
        self.dirty_since.get_or_insert_with(Instant::now);
        for Write {
            change,
            durable,
            enqueued,
        } in writes
        {
            if durable {
                self.waiting
                    .push((Box::new(move |done| change.answer(done)), enqueued));
            } else {
                change.answer(Ok(()));
            }
        }
        Ok(())
    }

    fn take(&mut self, command: Command) -> Taken {
        match command {
            Command::Write(write) => {
                self.group += 1;
                self.pending.push(write);
            }
            Command::Sync { reply, enqueued } => {
                if self.dirty_since.is_none() && self.pending.is_empty() && self.fault.is_none() {
                    let _ = reply.send(Ok(()));
                } else {
                    let deliver: Deliver = Box::new(move |done| {
                        let _ = reply.send(done);
                    });
                    self.waiting.push((deliver, enqueued));
                }
            }
            Command::Fault(reason) => self.fault = Some(reason),
            Command::Close(reply) => return Taken::Close(reply),
        }
        Taken::Go
    }

    /// One fsync for everything applied so far.
    fn flush(&mut self) -> Result<(), String> {
        let started = Instant::now();
        match &self.fault {
            Some(reason) => return Err(format!("injected fault: {reason}")),
            None => {
                self.trees
                    .db
                    .flush()
                    .map_err(|e| format!("flush failed: {e}"))?;
            }
        }
        self.last_flush = started.elapsed();
        self.last_group_waiters = self.waiting.len();
        let stats = &self.status.stats;
        stats.flush.observe(self.last_flush);
        stats.flushes.fetch_add(1, Ordering::Relaxed);
        stats.group.observe_value(self.group as f64);
        self.dirty_since = None;
        if self
            .disk_read_at
            .is_none_or(|at| at.elapsed() >= DISK_READ_EVERY)
        {
            if let Ok(bytes) = self.trees.db.size_on_disk() {
                stats.disk_bytes.store(bytes, Ordering::Relaxed);
            }
            self.disk_read_at = Some(Instant::now());
        }
        Ok(())
    }

    /// Answer the writes the last flush made durable.
    fn answer_waiting(&mut self) {
        for (deliver, enqueued) in self.waiting.drain(..) {
            self.status.stats.commit.observe(enqueued.elapsed());
            deliver(Ok(()));
        }
    }

    fn stop(self, reason: String) {
        stop(self.status, reason.clone(), self.waiting);
        for write in self.pending {
            write
                .change
                .answer(Err(StoreError::WriterFailed(reason.clone())));
        }
    }
}

/// Fail for good: answer everyone waiting, then return (dropping the queue, so every command
/// still in it, and every later one, sees the writer gone).
fn stop(status: &Status, reason: String, waiting: Vec<(Deliver, Instant)>) {
    status.fail(reason.clone());
    for (deliver, _) in waiting {
        deliver(Err(StoreError::WriterFailed(reason.clone())));
    }
}
