//! Persistent state in sled, owned by one writer thread that commits in groups.
//!
//! Nothing outside this module names sled. Writes are closures over a [`Tx`] that the writer
//! thread (`writer`) runs in the order they arrive, a group of them in one sled transaction
//! (each keeps or drops its own changes):
//! - [`Store::apply`] answers once the write is applied (it becomes durable with the next
//!   flush, at most `writer::IDLE_FLUSH` later);
//! - [`Store::commit`] answers once the flush covering it is done: use it before any side
//!   effect the write allows (showing an invoice, publishing a result, paying out);
//! - [`Store::sync`] answers once everything applied so far is durable.
//!
//! Reads ([`Store::read`]) run on a few reader threads of their own (`readers`), never on a
//! tokio worker: sled's reads take a process-wide lock that queues behind a waiting transaction.
//!
//! Every record is JSON (small, inspectable with `dvmd jobs`); keys are raw bytes (32-byte event
//! ids and payment hashes, 8-byte big-endian sequence numbers).

mod group;
mod migrate;
mod readers;
mod tx;
mod writer;

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

pub use tx::{Reader, Tx, TxError, TxFailure};
use writer::{Command, Status, Write};

/// The schema this build reads and writes. Bump with a migration when a record changes shape.
/// 2: the `open_payments` index (built from `payments` when a version 1 store is opened).
/// 3: ledger sequence numbers from a counter in `meta`, written in the entry's own transaction
///    (was sled's id generator, which fsyncs on its own outside the writer).
/// 4: holds (`reserve`/`release` entries, a job's `credit_msat`/`held_msat`). Nothing on disk
///    is rewritten (jobs paid before hold nothing and settle as they did); the bump keeps an
///    older build from reading entries it does not know.
/// 5: `account_entries`, the index of ledger entries by account (`GET /v1/account` reads an
///    account's history without scanning the ledger); built from the entries on upgrade.
/// 6: HTTP jobs and L402 tokens: a job's `door` and `result`, token accounts (`l402:<hash>`,
///    33-byte keys), the `l402_tokens` tree. Nothing is rewritten; the bump keeps an older build
///    from reading accounts and jobs it does not know.
/// 7: `payouts`, `account_settings` and the payout entry kinds.
/// 8: `mpp_challenges`, the HTTP `Payment` challenges by id. Nothing is rewritten.
/// 9: jobs keyed by time (`received_at ‖ id`, see [`job_key`]) with the `job_keys` index by
///    id: every job record is moved to its new key on upgrade.
/// 10: `trust`, each npub's standing (what it paid, the operator's setting, its last label),
///    and `receivables` with the `debt` and `debt_repaid` entry kinds (pay-after). Nothing is
///    rewritten.
/// 11: `open_payments` keyed by when each is next due a lookup ([`open_payment_key`]), so a
///    reconcile pass reads what is due, not every invoice still open; `job_zaps`, the zap
///    invoices of each job. Both rebuilt from `payments` on upgrade.
pub const SCHEMA_VERSION: u64 = 11;

const META_SCHEMA_KEY: &[u8] = b"schema_version";
/// The counter behind ledger entry keys.
pub const ENTRY_SEQUENCE: &[u8] = b"entry_sequence";

/// sled's page cache size when the configuration names none (sled's own default is 1 GiB).
pub const DEFAULT_CACHE_CAPACITY_BYTES: u64 = 16 * 1024 * 1024;

/// The trees dvmd keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tree {
    /// Job records by [`job_key`]: the time the job was received, then its id. Jobs arrive in
    /// time order, so writes and lookups touch the tail of the tree and sled keeps only that
    /// tail in memory (keyed by the random id alone, every leaf was touched in turn and stayed
    /// resident: memory grew with the number of jobs ever seen).
    Jobs = 0,
    /// Index of [`Tree::Jobs`] by job id: id (32 bytes) to `received_at` (8, big endian),
    /// written with the job's first record. Small, so random ids cost little here.
    JobKeys,
    /// Invoices we issued, by payment hash: which job each pays, and whether it was consumed.
    Payments,
    /// Index of the payment hashes the reconciler still looks up (neither consumed nor closed),
    /// by when each is next due ([`open_payment_key`]), kept in the same transactions as
    /// `payments`: a pass reads what is due, not every invoice open (or ever issued).
    OpenPayments,
    /// Index of zap invoices by the job they pay: key `job id (32) || payment hash (32)`, empty
    /// value, written with the zap's record. A job that expires asks only its own zaps whether
    /// one paid it.
    JobZaps,
    /// Ledger balances by account.
    Accounts,
    /// Ledger entries by sequence number.
    Entries,
    /// Index of ledger entries by account: key `account key (32 bytes for an npub, 33 for a
    /// token) || sequence (8, big endian)`, empty value; written in the entry's transaction.
    AccountEntries,
    /// The dev wallet's invoices and preimages.
    DevWallet,
    /// Our feedback event ids to the job they answer (zaps of a feedback pay its job).
    Feedback,
    /// L402 tokens minted, by payment hash: the token id and what it was issued for.
    L402Tokens,
    /// Payouts (money sent to customers), by the payment hash of the invoice paid.
    Payouts,
    /// Customers' settings (automatic payout), by account key.
    AccountSettings,
    /// HTTP `Payment` (MPP) challenges by id: the payment hash each sells, and whether a
    /// credential has used it (a challenge is accepted once).
    MppChallenges,
    /// Each npub's standing (`trust::Standing`), by its 32 bytes.
    Trust,
    /// What each account owes for jobs run before they were paid (8 bytes, big endian), by
    /// account key; no record when it owes nothing.
    Receivables,
    /// HTTP `Payment` sessions by id (the deposit's payment hash): the return invoice, what was
    /// deposited, and how it closed (`job::sessions::SessionRecord`).
    Sessions,
    /// Schema version, keys, counters and checkpoints; the NIP-98 auth event of each signed
    /// withdrawal (`nip98:` and its 32 bytes: one signature pays out once); and each zap whose
    /// receipt is owed (`zap_receipt:` and its payment hash, to when it was booked).
    Meta,
}

impl Tree {
    /// Every tree, in index order.
    pub const ALL: [Tree; 18] = [
        Self::Jobs,
        Self::JobKeys,
        Self::Payments,
        Self::OpenPayments,
        Self::JobZaps,
        Self::Accounts,
        Self::Entries,
        Self::AccountEntries,
        Self::DevWallet,
        Self::Feedback,
        Self::L402Tokens,
        Self::Payouts,
        Self::AccountSettings,
        Self::MppChallenges,
        Self::Trust,
        Self::Receivables,
        Self::Sessions,
        Self::Meta,
    ];

    /// The sled tree name (also used in error messages).
    pub fn name(self) -> &'static str {
        match self {
            Self::Jobs => "jobs",
            Self::JobKeys => "job_keys",
            Self::Payments => "payments",
            Self::OpenPayments => "open_payments",
            Self::JobZaps => "job_zaps",
            Self::Accounts => "accounts",
            Self::Entries => "entries",
            Self::AccountEntries => "account_entries",
            Self::DevWallet => "dev_wallet",
            Self::Feedback => "feedback",
            Self::L402Tokens => "l402_tokens",
            Self::Payouts => "payouts",
            Self::AccountSettings => "account_settings",
            Self::MppChallenges => "mpp_challenges",
            Self::Trust => "trust",
            Self::Receivables => "receivables",
            Self::Sessions => "sessions",
            Self::Meta => "meta",
        }
    }
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (IO, corruption).
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// A record could not be (de)serialized.
    #[error("store: bad record in {tree}: {source}")]
    Codec {
        /// The tree holding the record.
        tree: &'static str,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// The data directory was written by another schema version.
    #[error("store: schema version {found} on disk, this build reads {SCHEMA_VERSION}")]
    Schema {
        /// The version found on disk.
        found: u64,
    },
    /// The data directory is locked by another process.
    #[error("store: {0} is in use by another dvmd process (stop the daemon first)")]
    Locked(String),
    /// The writer thread failed; nothing more can be written.
    #[error("store writer failed: {0}")]
    WriterFailed(String),
    /// The store was closed.
    #[error("store: closed")]
    Closed,
    /// A read could not run.
    #[error("store: read task failed: {0}")]
    Read(String),
    /// The writer or a reader thread could not be started.
    #[error("store: cannot start its threads: {0}")]
    Thread(std::io::Error),
}

/// How to open the store.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// sled's page cache, bytes.
    pub cache_capacity_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            cache_capacity_bytes: DEFAULT_CACHE_CAPACITY_BYTES,
        }
    }
}

/// The sled database and its trees, indexed by [`Tree`].
pub(crate) struct Trees {
    db: sled::Db,
    trees: Vec<sled::Tree>,
}

impl Trees {
    fn open(db: sled::Db) -> Result<Self, StoreError> {
        let trees = Tree::ALL
            .iter()
            .map(|tree| db.open_tree(tree.name()))
            .collect::<Result<_, _>>()?;
        Ok(Self { db, trees })
    }

    fn reader(&self) -> Reader<'_> {
        Reader { trees: &self.trees }
    }
}

struct Shared {
    trees: Arc<Trees>,
    queue: flume::Sender<Command>,
    readers: flume::Sender<readers::Read>,
    status: Arc<Status>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Flush and stop the writer, so the database (and its file lock) is released when the
        // last handle goes. After `Store::close` this returns at once.
        let _ = self.queue.send(Command::Close(None));
        if let Some(writer) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = writer.join();
        }
    }
}

/// The store: a handle to the trees and their writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

impl Store {
    /// Open (or create) the store in `dir` with default options.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, StoreOptions::default())
    }

    /// Open (or create) the store in `dir`. Blocking: run it before the runtime serves, or on
    /// a blocking thread.
    pub fn open_with(dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(options.cache_capacity_bytes)
            // Our writer flushes; sled's background flusher would take the same lock.
            .flush_every_ms(None)
            .open()
            .map_err(|e| match e {
                // sled reports a held file lock as an IO error mentioning the lock.
                sled::Error::Io(io) if io.to_string().contains("lock") => {
                    StoreError::Locked(dir.display().to_string())
                }
                other => StoreError::Sled(other),
            })?;
        Self::start(db)
    }

    /// A throwaway store in a temporary directory (tests and benchmarks).
    pub fn temporary() -> Result<Self, StoreError> {
        Self::start(
            sled::Config::new()
                .temporary(true)
                .flush_every_ms(None)
                .cache_capacity(DEFAULT_CACHE_CAPACITY_BYTES)
                .open()?,
        )
    }

    fn start(db: sled::Db) -> Result<Self, StoreError> {
        let trees = Trees::open(db)?;
        migrate::migrate(&trees)?;
        let trees = Arc::new(trees);
        let readers = readers::spawn(&trees, readers::count()).map_err(StoreError::Thread)?;
        let status = Arc::new(Status::default());
        let (queue, commands) = flume::bounded(writer::QUEUE_CAPACITY);
        let thread =
            writer::spawn(trees.clone(), commands, status.clone()).map_err(StoreError::Thread)?;
        Ok(Self {
            shared: Arc::new(Shared {
                trees,
                queue,
                readers,
                status,
                writer: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Apply `change` on the writer thread; answers once it is applied (durable with the next
    /// group commit). `change` may run more than once (sled retries on conflict), so it must
    /// only describe the change.
    pub async fn apply<R, E, F>(&self, change: F) -> Result<R, E>
    where
        F: Fn(&Tx<'_>) -> Result<R, TxError<E>> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.write(change, false).await
    }

    /// Apply `change` and answer once the flush that covers it is done: the change is durable
    /// before the caller acts on it.
    pub async fn commit<R, E, F>(&self, change: F) -> Result<R, E>
    where
        F: Fn(&Tx<'_>) -> Result<R, TxError<E>> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.write(change, true).await
    }

    async fn write<R, E, F>(&self, change: F, durable: bool) -> Result<R, E>
    where
        F: Fn(&Tx<'_>) -> Result<R, TxError<E>> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<Result<R, E>>();
        let change = Box::new(group::Pending::new(change, reply));
        let write = Write {
            change,
            durable,
            enqueued: Instant::now(),
        };
        if self
            .shared
            .queue
            .send_async(Command::Write(write))
            .await
            .is_err()
        {
            return Err(E::from(self.shared.status.gone().await));
        }
        match self.answer(answer).await {
            Some(answer) => answer,
            None => Err(E::from(self.shared.status.gone().await)),
        }
    }

    /// Answer once everything applied so far is durable. Call before acting on writes made
    /// with [`Store::apply`].
    pub async fn sync(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Sync {
            reply,
            enqueued: Instant::now(),
        };
        if self.shared.queue.send_async(command).await.is_err() {
            return Err(self.shared.status.gone().await);
        }
        match self.answer(answer).await {
            Some(answer) => answer,
            None => Err(self.shared.status.gone().await),
        }
    }

    /// The writer's answer, or `None` once the writer stopped without giving one (the command
    /// was still queued, or its answer was dropped by a failing write).
    async fn answer<T>(&self, mut answer: oneshot::Receiver<T>) -> Option<T> {
        tokio::select! {
            biased;
            answered = &mut answer => answered.ok(),
            _ = self.shared.status.stopped().cancelled() => answer.try_recv().ok(),
        }
    }

    /// Flush what is applied and stop the writer; later writes get [`StoreError::Closed`].
    pub async fn close(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        if self
            .shared
            .queue
            .send_async(Command::Close(Some(reply)))
            .await
            .is_err()
        {
            return match self.shared.status.failure() {
                Some(reason) => Err(StoreError::WriterFailed(reason.to_owned())),
                None => Ok(()),
            };
        }
        match self.answer(answer).await {
            Some(answer) => answer,
            None => Err(self.shared.status.gone().await),
        }
    }

    /// Run `read` on a reader thread (never on a tokio worker); waits (async) while the
    /// readers' queue is full.
    pub async fn read<R, E, F>(&self, read: F) -> Result<R, E>
    where
        F: FnOnce(&Reader<'_>) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let task: readers::Read = Box::new(move |reader| {
            let _ = reply.send(read(reader));
        });
        if self.shared.readers.send_async(task).await.is_err() {
            return Err(E::from(StoreError::Read(
                "the reader threads stopped".into(),
            )));
        }
        answer
            .await
            .map_err(|_| E::from(StoreError::Read("the read panicked".into())))?
    }

    /// Run `read` on this thread: for command-line tools and threads that may block.
    pub fn read_blocking<R, E>(
        &self,
        read: impl FnOnce(&Reader<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        read(&self.shared.trees.reader())
    }

    /// Why the writer failed, if it did (`/healthz` reports it).
    pub fn failure(&self) -> Option<String> {
        self.shared.status.failure().map(str::to_owned)
    }

    /// Resolves with the reason when the writer fails.
    pub async fn failed(&self) -> String {
        self.shared.status.failed().cancelled().await;
        self.failure().unwrap_or_default()
    }

    /// Make the writer fail at its next flush, as a disk that stopped taking writes would
    /// (fault tests: every waiting and later write must get an error, never hang).
    pub fn inject_fault(&self, reason: &str) {
        let _ = self
            .shared
            .queue
            .try_send(Command::Fault(reason.to_owned()));
    }

    /// Append the writer's figures in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        let stats = &self.shared.status.stats;
        let _ = writeln!(
            out,
            "# HELP dvmd_store_queue_depth Writes waiting for the store writer.\n# TYPE dvmd_store_queue_depth gauge\ndvmd_store_queue_depth {}",
            self.shared.queue.len()
        );
        let _ = writeln!(
            out,
            "# HELP dvmd_store_read_queue_depth Reads waiting for a reader thread.\n# TYPE dvmd_store_read_queue_depth gauge\ndvmd_store_read_queue_depth {}",
            self.shared.readers.len()
        );
        let _ = writeln!(
            out,
            "# HELP dvmd_store_writes_total Writes applied by the store writer.\n# TYPE dvmd_store_writes_total counter\ndvmd_store_writes_total {}",
            stats.writes.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP dvmd_store_transactions_total sled transactions: one per group of writes.\n# TYPE dvmd_store_transactions_total counter\ndvmd_store_transactions_total {}",
            stats.transactions.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP dvmd_store_flushes_total Group commits (one fdatasync each).\n# TYPE dvmd_store_flushes_total counter\ndvmd_store_flushes_total {}",
            stats.flushes.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP dvmd_store_cleaned_pages_total Pages the store writer rewrote out of fragmented segments, so that their space is reused.\n# TYPE dvmd_store_cleaned_pages_total counter\ndvmd_store_cleaned_pages_total {}",
            stats.cleaned_pages.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP dvmd_store_disk_bytes The store's files on disk (read after a flush, at most every second).\n# TYPE dvmd_store_disk_bytes gauge\ndvmd_store_disk_bytes {}",
            stats.disk_bytes.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP dvmd_store_up 1 while the store writer accepts writes.\n# TYPE dvmd_store_up gauge\ndvmd_store_up {}",
            u8::from(self.shared.status.failure().is_none())
        );
        stats.commit.render(
            out,
            "dvmd_store_commit_seconds",
            "From a durable write being queued to the flush that covers it.",
        );
        stats.flush.render(
            out,
            "dvmd_store_flush_seconds",
            "Duration of one group commit flush.",
        );
        stats.group.render(
            out,
            "dvmd_store_group_size",
            "Writes made durable by one flush.",
        );
    }
}

/// Serialize a record for `tree`.
pub fn encode<T: Serialize>(tree: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Codec { tree, source })
}

/// Deserialize a record read from `tree`.
pub fn decode<T: DeserializeOwned>(tree: &'static str, raw: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(|source| StoreError::Codec { tree, source })
}

/// Read a big-endian u64 (sequence numbers, versions, balances).
pub fn be_u64(raw: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(raw.try_into().ok()?))
}

/// The [`Tree::Jobs`] key of the job `id` received at `received_at` (unix seconds): 8 bytes big
/// endian, then the 32-byte id.
pub fn job_key(received_at: u64, id: &[u8; 32]) -> [u8; 40] {
    time_key(received_at, id)
}

/// The [`Tree::OpenPayments`] key of the payment hash `hash` next due a lookup at `due` (unix
/// seconds; 0: every pass): 8 bytes big endian, then the hash. In due order, so a pass reads
/// the keys up to now and stops.
pub fn open_payment_key(due: u64, hash: &[u8; 32]) -> [u8; 40] {
    time_key(due, hash)
}

fn time_key(at: u64, id: &[u8; 32]) -> [u8; 40] {
    let mut key = [0u8; 40];
    key[..8].copy_from_slice(&at.to_be_bytes());
    key[8..].copy_from_slice(id);
    key
}

/// The [`Tree::JobZaps`] key of the zap invoice `hash` of the job `job`.
pub fn job_zap_key(job: &[u8; 32], hash: &[u8; 32]) -> [u8; 64] {
    let mut key = [0u8; 64];
    key[..32].copy_from_slice(job);
    key[32..].copy_from_slice(hash);
    key
}

/// The [`Tree::AccountEntries`] key of the entry numbered `seq` (its `entries` key, 8 bytes
/// big endian) on the account whose store key is `account`.
pub fn account_entry_key(account: &[u8], seq: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(account.len() + seq.len());
    key.extend_from_slice(account);
    key.extend_from_slice(seq);
    key
}

#[cfg(test)]
mod tests;
