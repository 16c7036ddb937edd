//! Unit tests of the store's writer: group commit, durability, failures, cleaning. Reads are
//! in `reads.rs`, migrations in `migrations.rs`. Compiled only under `#[cfg(test)]` (see
//! `store/mod.rs`).

mod migrations;
mod reads;

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;

/// A domain error for the tests.
#[derive(Debug, thiserror::Error)]
enum TestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("refused")]
    Refused,
}

async fn put(store: &Store, key: u8, value: u64) -> Result<(), TestError> {
    store
        .commit(move |tx| Ok(tx.put(Tree::Meta, &[key], &value)?))
        .await
}

async fn get(store: &Store, key: u8) -> Option<u64> {
    store
        .read(move |r| r.get::<u64>(Tree::Meta, &[key]))
        .await
        .expect("read")
}

/// sled transactions the writer has run.
fn transactions(store: &Store) -> u64 {
    store
        .shared
        .status
        .stats
        .transactions
        .load(Ordering::Relaxed)
}

/// Queue `change` as a commit, in a task of its own.
fn spawn_commit<R, F>(store: &Store, change: F) -> tokio::task::JoinHandle<Result<R, TestError>>
where
    F: Fn(&Tx<'_>) -> Result<R, TxError<TestError>> + Send + 'static,
    R: Send + 'static,
{
    let store = store.clone();
    tokio::spawn(async move { store.commit(change).await })
}

/// Start a write that holds the writer inside its group's transaction until `release` is
/// sent; returns once it runs, with the write's task.
async fn hold_writer(
    store: &Store,
) -> (
    tokio::task::JoinHandle<Result<(), StoreError>>,
    std::sync::mpsc::Sender<()>,
) {
    let (started, first_started) = std::sync::mpsc::channel::<()>();
    let (release, hold) = std::sync::mpsc::channel::<()>();
    let hold = Arc::new(Mutex::new(hold));
    let first = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .commit(move |tx| {
                    let _ = started.send(());
                    let _ = hold.lock().map(|h| h.recv_timeout(Duration::from_secs(30)));
                    Ok::<_, TxError<StoreError>>(tx.put(Tree::Meta, b"first", &0u64)?)
                })
                .await
        })
    };
    tokio::task::spawn_blocking(move || first_started.recv_timeout(Duration::from_secs(30)))
        .await
        .expect("join")
        .expect("the first write is being applied");
    (first, release)
}

#[tokio::test]
async fn a_commit_is_readable_and_an_abort_writes_nothing() {
    let store = Store::temporary().expect("store");
    put(&store, 1, 7).await.expect("commit");
    assert_eq!(get(&store, 1).await, Some(7));
    let refused: Result<(), TestError> = store
        .commit(|tx| {
            tx.put(Tree::Meta, &[2], &9u64)?;
            Err(TxError::Abort(TestError::Refused))
        })
        .await;
    assert!(matches!(refused, Err(TestError::Refused)));
    assert_eq!(get(&store, 2).await, None, "the aborted write left nothing");
}

/// Writes that share a group's sled transaction still stand alone: one that refuses leaves
/// nothing, the ones around it keep theirs, and each sees exactly the writes before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_in_a_group_leaves_nothing_and_the_others_stand() {
    let store = Store::temporary().expect("store");
    // Hold the writer inside a first group while the next group queues.
    let (first, release) = hold_writer(&store).await;
    let kept = spawn_commit(&store, |tx| Ok(tx.put(Tree::Meta, &[10], &1u64)?));
    while store.shared.queue.is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let refused = spawn_commit(&store, |tx| {
        tx.put(Tree::Meta, &[11], &2u64)?;
        tx.remove(Tree::Meta, &[10])?;
        let own = tx.get::<u64>(Tree::Meta, &[11])?;
        let gone = tx.contains(Tree::Meta, &[10])?;
        assert_eq!(
            (own, gone),
            (Some(2), false),
            "a write sees its own changes"
        );
        Err::<(), _>(TxError::Abort(TestError::Refused))
    });
    while store.shared.queue.len() < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let after = spawn_commit(&store, |tx| {
        let seen = (
            tx.get::<u64>(Tree::Meta, &[10])?,
            tx.get::<u64>(Tree::Meta, &[11])?,
        );
        tx.put(Tree::Meta, &[12], &3u64)?;
        Ok(seen)
    });
    while store.shared.queue.len() < 3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    release.send(()).expect("release");
    first.await.expect("join").expect("first");
    kept.await.expect("join").expect("kept");
    assert!(matches!(
        refused.await.expect("join"),
        Err(TestError::Refused)
    ));
    assert_eq!(
        after.await.expect("join").expect("after"),
        (Some(1), None),
        "the write after the refused one saw the kept write and nothing of the refused one"
    );
    assert_eq!(
        (
            get(&store, 10).await,
            get(&store, 11).await,
            get(&store, 12).await
        ),
        (Some(1), None, Some(3))
    );
    assert_eq!(
        transactions(&store),
        2,
        "the three queued writes shared one sled transaction"
    );
}

/// `Store::open` on a directory another handle just let go of (a closed store, or a database
/// [`migrations`] wrote raw). sled's IO threads hold the database, and the directory's lock,
/// for a moment after its last handle is dropped; a process that exited has let go of it, but a
/// test that opens it again at once can find it `Locked`.
fn open_when_released(path: &std::path::Path) -> Result<Store, StoreError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Store::open(path) {
            Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            opened => return opened,
        }
    }
}

/// The largest group the writer takes ([`writer::MAX_GROUP`] writes of a few KB, megabytes in
/// one sled transaction, over many log segments) commits whole, and survives a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_group_commits_in_one_transaction_and_survives_a_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("store");
    let (first, release) = hold_writer(&store).await;
    let writes = writer::MAX_GROUP + 100;
    let record = "x".repeat(4000);
    let mut queued = Vec::new();
    for i in 0..writes {
        let record = record.clone();
        queued.push(spawn_commit(&store, move |tx| {
            Ok(tx.put(Tree::Meta, format!("big-{i}").as_bytes(), &record)?)
        }));
    }
    while store.shared.queue.len() < writes {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    release.send(()).expect("release");
    first.await.expect("join").expect("first");
    for write in queued {
        write.await.expect("join").expect("commit");
    }
    assert_eq!(
        transactions(&store),
        3,
        "the held write, then MAX_GROUP writes, then the rest"
    );
    store.close().await.expect("close");
    drop(store);
    let store = open_when_released(dir.path()).expect("reopen");
    let found = store
        .read(move |r| -> Result<usize, StoreError> {
            Ok((0..writes)
                .map(|i| r.get::<String>(Tree::Meta, format!("big-{i}").as_bytes()))
                .filter(|got| matches!(got, Ok(Some(value)) if value.len() == 4000))
                .count())
        })
        .await
        .expect("read");
    assert_eq!(
        found, writes,
        "every write of the large groups is there after a reopen"
    );
}

#[tokio::test]
async fn sequences_count_up_inside_their_transaction() {
    let store = Store::temporary().expect("store");
    let mut seen = Vec::new();
    for _ in 0..3 {
        let n: u64 = store
            .apply(|tx| Ok::<_, TxError<StoreError>>(tx.next_sequence(ENTRY_SEQUENCE)?))
            .await
            .expect("sequence");
        seen.push(n);
    }
    // A rolled-back write takes no number.
    let _: Result<(), TestError> = store
        .apply(|tx| {
            tx.next_sequence(ENTRY_SEQUENCE)?;
            Err(TxError::Abort(TestError::Refused))
        })
        .await;
    let next: u64 = store
        .apply(|tx| Ok::<_, TxError<StoreError>>(tx.next_sequence(ENTRY_SEQUENCE)?))
        .await
        .expect("sequence");
    seen.push(next);
    assert_eq!(seen, vec![0, 1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_flush_covers_every_write_queued_while_the_writer_was_busy() {
    let store = Store::temporary().expect("store");
    // The first write holds the writer (inside its group's transaction) until 50 more commits
    // are queued behind it.
    let (first, release) = hold_writer(&store).await;
    let mut rest = Vec::new();
    for i in 0..50u8 {
        let store = store.clone();
        rest.push(tokio::spawn(
            async move { put(&store, i, u64::from(i)).await },
        ));
    }
    while store.shared.queue.len() < 50 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    release.send(()).expect("release");
    first.await.expect("join").expect("first commit");
    for write in rest {
        write.await.expect("join").expect("commit");
    }
    let stats = &store.shared.status.stats;
    assert_eq!(stats.writes.load(Ordering::Relaxed), 51);
    assert_eq!(
        (
            stats.transactions.load(Ordering::Relaxed),
            stats.flushes.load(Ordering::Relaxed)
        ),
        (2, 2),
        "the 50 writes queued while the first one ran form the next group: one sled \
         transaction and one fsync for all 50"
    );
}

#[tokio::test]
async fn applied_writes_become_durable_with_the_next_sync() {
    let store = Store::temporary().expect("store");
    store
        .apply(|tx| Ok::<_, TxError<StoreError>>(tx.put(Tree::Meta, &[3], &1u64)?))
        .await
        .expect("apply");
    assert_eq!(store.shared.status.stats.flushes.load(Ordering::Relaxed), 0);
    store.sync().await.expect("sync");
    assert_eq!(store.shared.status.stats.flushes.load(Ordering::Relaxed), 1);
    let mut metrics = String::new();
    store.render_metrics(&mut metrics);
    let disk: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("dvmd_store_disk_bytes "))
        .expect("the gauge")
        .parse()
        .expect("bytes");
    assert!(
        disk > 0,
        "the flush read the store's size on disk: {metrics}"
    );
    // Nothing new: a sync costs no flush.
    store.sync().await.expect("sync");
    assert_eq!(store.shared.status.stats.flushes.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_failed_writer_fails_every_write_and_says_why() {
    let store = Store::temporary().expect("store");
    put(&store, 1, 1).await.expect("healthy");
    store.inject_fault("disk gone");
    let pending = put(&store, 2, 2).await;
    assert!(
        matches!(&pending, Err(TestError::Store(StoreError::WriterFailed(why))) if why.contains("disk gone")),
        "{pending:?}"
    );
    let later = put(&store, 3, 3).await;
    assert!(
        matches!(&later, Err(TestError::Store(StoreError::WriterFailed(_)))),
        "{later:?}"
    );
    assert!(matches!(
        store.sync().await,
        Err(StoreError::WriterFailed(_))
    ));
    let reason = tokio::time::timeout(Duration::from_secs(10), store.failed())
        .await
        .expect("failure is signalled");
    assert!(reason.contains("disk gone"), "{reason}");
    assert_eq!(store.failure().as_deref(), Some(reason.as_str()));
    // Reads still work: the operator can inspect what is on disk.
    assert_eq!(get(&store, 1).await, Some(1));
}

#[tokio::test]
async fn a_panicking_write_stops_the_writer_loudly() {
    let store = Store::temporary().expect("store");
    let panicked: Result<(), TestError> = store
        .commit(|_| -> Result<(), TxError<TestError>> { panic!("bug in a write") })
        .await;
    assert!(
        matches!(
            &panicked,
            Err(TestError::Store(StoreError::WriterFailed(_)))
        ),
        "{panicked:?}"
    );
    assert!(store
        .failure()
        .is_some_and(|why| why.contains("bug in a write")));
    assert!(put(&store, 1, 1).await.is_err());
}

#[tokio::test]
async fn closing_flushes_and_later_writes_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    store
        .apply(|tx| Ok::<_, TxError<StoreError>>(tx.put(Tree::Meta, &[4], &4u64)?))
        .await
        .expect("apply");
    store.close().await.expect("close");
    assert!(matches!(
        put(&store, 5, 5).await,
        Err(TestError::Store(StoreError::Closed))
    ));
    drop(store);
    let reopened = open_when_released(dir.path()).expect("reopen");
    assert_eq!(get(&reopened, 4).await, Some(4));
}

/// sled reuses a segment of its log only once the pages still in it are rewritten elsewhere,
/// which only its background flusher (off here) would do. The writer does it: overwriting the
/// same keys again and again must not grow the log with every write.
#[tokio::test]
async fn overwritten_pages_are_cleaned_and_the_log_stays_bounded() {
    let store = Store::temporary().expect("store");
    const ROUNDS: usize = 1_000;
    const KEYS: u8 = 16;
    const VALUE: usize = 2048;
    let written = ROUNDS * usize::from(KEYS) * VALUE;
    for round in 0..ROUNDS {
        let value = vec![round as u8; VALUE];
        store
            .apply(move |tx| {
                for key in 0..KEYS {
                    tx.put_raw(Tree::Meta, &[0xEE, key], &value)?;
                }
                Ok::<_, TxError<StoreError>>(())
            })
            .await
            .expect("write");
        if round % 50 == 0 {
            store.sync().await.expect("sync");
        }
    }
    store.sync().await.expect("sync");
    let cleaned = store
        .shared
        .status
        .stats
        .cleaned_pages
        .load(Ordering::Relaxed);
    let on_disk = store.shared.trees.db.size_on_disk().expect("size") as usize;
    assert!(
        cleaned > 0,
        "no page was rewritten out of a fragmented segment"
    );
    assert!(
        on_disk < written / 4,
        "{on_disk} bytes on disk after writing {written} bytes to {} live keys of {VALUE} bytes",
        KEYS
    );
}
