//! Reads run on the store's few reader threads, never on a tokio worker, and a read that
//! panics is only that read's error.

use std::time::Duration;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_run_on_the_few_reader_threads_however_many_wait() {
    let store = Store::temporary().expect("store");
    put(&store, 1, 7).await.expect("commit");
    // 200 reads at once, each holding its thread a moment: on tokio's blocking pool this took
    // a thread per waiting read.
    let reads: Vec<_> = (0..200)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .read(|r| {
                        std::thread::sleep(Duration::from_millis(1));
                        let value = r.get::<u64>(Tree::Meta, &[1])?;
                        let thread = std::thread::current().name().map(str::to_owned);
                        Ok::<_, StoreError>((value, thread))
                    })
                    .await
            })
        })
        .collect();
    let mut threads = std::collections::HashSet::new();
    for read in reads {
        let (value, thread) = read.await.expect("join").expect("read");
        assert_eq!(value, Some(7));
        let thread = thread.expect("a named thread");
        assert!(thread.starts_with("dvmd-read-"), "read ran on {thread}");
        threads.insert(thread);
    }
    assert!(
        threads.len() <= readers::count(),
        "{} threads served the reads, for {} readers",
        threads.len(),
        readers::count()
    );
    let mut metrics = String::new();
    store.render_metrics(&mut metrics);
    assert!(
        metrics
            .lines()
            .any(|l| l == "dvmd_store_read_queue_depth 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_panics_is_an_error_and_the_readers_serve_on() {
    let store = Store::temporary().expect("store");
    put(&store, 1, 7).await.expect("commit");
    for _ in 0..readers::count() {
        let failed: Result<(), StoreError> = store
            .read(|_| -> Result<(), StoreError> { panic!("a read that panics (expected)") })
            .await;
        assert!(matches!(failed, Err(StoreError::Read(_))), "{failed:?}");
    }
    // Every reader thread has seen a panic by now, if they share the work at all.
    for _ in 0..2 * readers::count() {
        assert_eq!(get(&store, 1).await, Some(7));
    }
}
