//! An HTTP job on a real pipeline and store, its caller gone at the worst moment, or there
//! and reading nothing.

use std::sync::Arc;
use std::time::Duration;

use nostr_sdk::Keys;
use tokio_util::sync::CancellationToken;

use super::HttpPayer;
use crate::config::{Config, FileConfig, Overrides, RelaysFile};
use crate::infer::instant::InstantBackend;
use crate::job::book::tests::{balance, top_up};
use crate::job::pipeline::{WorkItem, RUN_QUEUE_CAPACITY};
use crate::job::{Book, Door, JobState, Pipeline};
use crate::ledger::Account;
use crate::metrics::Metrics;
use crate::nip90::{InputType, JobInput, TextGeneration};
use crate::relay::{Outbox, Relays};
use crate::store::Store;
use crate::wallet::dev::DevWallet;

/// A dev pipeline on a temporary store, and the queue its workers would read (no worker
/// runs: the test reads the queue itself).
pub(crate) async fn pipeline() -> (Pipeline, crate::job::WorkQueue) {
    pipeline_on(Arc::new(InstantBackend::new("hello"))).await
}

/// [`pipeline`], generating with `backend`.
async fn pipeline_on(backend: Arc<dyn crate::infer::Backend>) -> (Pipeline, crate::job::WorkQueue) {
    let store = Store::temporary().expect("store");
    let keys = Keys::generate();
    let relays = Relays::connect(&keys, &[], Default::default())
        .await
        .expect("relays");
    let overrides = Overrides {
        dev: true,
        ..Overrides::default()
    };
    let config =
        Config::build(FileConfig::default(), RelaysFile::default(), overrides).expect("config");
    let trust = crate::trust::Trust::load(store.clone(), config.jobs.trust, 0)
        .await
        .expect("trust");
    Pipeline::new(
        config.jobs,
        keys,
        Book::new(store.clone()),
        Arc::new(DevWallet::open(store).await.expect("wallet")),
        backend,
        Outbox::new(relays, CancellationToken::new()),
        Arc::new(Metrics::default()),
        Arc::new(trust),
    )
}

/// A client that disconnects while its call waits for room in the run queue drops the
/// handler's future. The job it opened (stored `Running`, its quote held) still reaches a
/// worker, opening and queueing running in a task the handler only waits for; the worker
/// finds its answer's receiver gone and ends it with nothing charged and the hold released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_opened_for_a_caller_that_went_away_still_reaches_a_worker() {
    let (pipeline, queue) = pipeline().await;
    let alice = Account::from(Keys::generate().public_key());
    top_up(pipeline.book(), alice, 1, 10_000_000).await;
    let limits = &pipeline.inner.config.limits;
    let prompt = JobInput {
        value: "say hello".to_owned(),
        input_type: InputType::Text,
        relay: None,
        marker: None,
    };
    let params = [("max_tokens".to_owned(), "8".to_owned())];
    let generation = || TextGeneration::from_parts(std::slice::from_ref(&prompt), &params, limits);
    // The run queue is full: the next job waits for room.
    let filler = {
        let priced = pipeline
            .price_http(5050, generation().expect("reads"), None)
            .await
            .expect("priced");
        crate::job::Job::http(None, alice, Door::HttpJob, 5050, &priced, 1)
    };
    for _ in 0..RUN_QUEUE_CAPACITY {
        pipeline
            .queue(WorkItem {
                job: Box::new(filler.clone()),
                paid_at: None,
                announced: None,
                live: None,
            })
            .await;
    }
    let priced = pipeline
        .price_http(5050, generation().expect("reads"), None)
        .await
        .expect("priced");
    let payer = HttpPayer {
        account: alice,
        charge: None,
    };
    let (live, answer) = super::live_channel(8);
    let call = pipeline.start_http(None, payer, Door::HttpChat, 5050, priced, true, Some(live));
    // The caller goes away while the call waits, and its answer with it.
    let gone = tokio::time::timeout(Duration::from_millis(300), call).await;
    assert!(gone.is_err(), "the queue had no room: {gone:?}");
    drop(answer);

    let mut queue = queue.lock().await;
    for _ in 0..RUN_QUEUE_CAPACITY {
        let item = queue.recv().await.expect("a filler");
        assert_eq!(item.job.id, filler.id);
    }
    let opened = tokio::time::timeout(Duration::from_secs(10), queue.recv())
        .await
        .expect("the opened job is queued after its caller went away")
        .expect("an item");
    assert_eq!(opened.job.state, JobState::Running);
    let stored = pipeline
        .book()
        .get(&opened.job.id)
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(stored.state, JobState::Running);
    assert_eq!(
        balance(pipeline.book(), alice).await,
        10_000_000 - stored.held_msat
    );

    // Its worker finds nobody to answer: nothing is generated, nothing charged.
    let id = opened.job.id;
    pipeline.run_direct(opened).await;
    let ended = pipeline
        .book()
        .get(&id)
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(
        (ended.state, ended.charge_msat, ended.result),
        (JobState::Settled, Some(0), None)
    );
    assert_eq!(
        ended.reason.as_deref(),
        Some("the client left before the answer began")
    );
    assert_eq!(balance(pipeline.book(), alice).await, 10_000_000);
}

/// A backend that says its answer a word at a time, each word a token.
struct WordByWord(u32);

#[async_trait::async_trait]
impl crate::infer::Backend for WordByWord {
    fn name(&self) -> &str {
        "word-by-word"
    }

    async fn count_prompt_tokens(
        &self,
        _: &crate::infer::GenerateRequest,
    ) -> Result<Option<u32>, crate::infer::InferError> {
        Ok(Some(4))
    }

    async fn generate(
        &self,
        _: crate::infer::GenerateRequest,
        max_tokens: u32,
    ) -> Result<crate::infer::GenerateStream, crate::infer::InferError> {
        use crate::infer::{FinishReason, GenerateEvent, Usage};
        let words = self.0.min(max_tokens);
        let pieces = (0..words).map(|n| Ok(GenerateEvent::Text(format!(" w{n}"))));
        let done = GenerateEvent::Done {
            usage: Usage {
                prompt_tokens: 4,
                completion_tokens: words,
            },
            finish: FinishReason::Stop,
        };
        Ok(Box::pin(futures::stream::iter(
            pieces.chain(std::iter::once(Ok(done))),
        )))
    }
}

/// A streaming client that keeps its connection open and reads nothing does not hold the
/// worker: the whole answer is queued for it, charged as generated, and the worker is free.
/// (With a queue of 256 pieces that the worker waited on, it waited until the job timed out,
/// failed it with nothing charged, and every other job waited behind it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_does_not_hold_the_worker_and_pays_for_what_it_asked() {
    const WORDS: u32 = 600;
    let (pipeline, queue) = pipeline_on(Arc::new(WordByWord(WORDS))).await;
    let alice = Account::from(Keys::generate().public_key());
    top_up(pipeline.book(), alice, 1, 100_000_000).await;
    let prompt = JobInput {
        value: "count".to_owned(),
        input_type: InputType::Text,
        relay: None,
        marker: None,
    };
    let params = [("max_tokens".to_owned(), WORDS.to_string())];
    let limits = &pipeline.inner.config.limits;
    let generation =
        TextGeneration::from_parts(std::slice::from_ref(&prompt), &params, limits).expect("reads");
    let (live, mut answer) = super::live_channel(generation.max_tokens);
    let priced = pipeline
        .price_http(5050, generation, None)
        .await
        .expect("priced");
    let payer = HttpPayer {
        account: alice,
        charge: None,
    };
    let opened = pipeline
        .start_http(None, payer, Door::HttpChat, 5050, priced, true, Some(live))
        .await
        .expect("opens");
    let item = queue.lock().await.recv().await.expect("queued");

    // The worker runs the job while its client reads nothing.
    tokio::time::timeout(Duration::from_secs(20), pipeline.run_direct(item))
        .await
        .expect("the worker is not held by a client that does not read");
    let ended = pipeline
        .book()
        .get(&opened.id)
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(ended.state, JobState::Settled);
    let usage = ended.usage.expect("usage");
    assert_eq!(usage.completion_tokens, WORDS);
    let charge = ended.charge_msat.expect("charged");
    assert_eq!(
        charge,
        pipeline.inner.config.rate_card.charge(usage),
        "charged for the whole answer"
    );
    assert_eq!(balance(pipeline.book(), alice).await, 100_000_000 - charge);

    // All of it waits for the client, in order, and then the end.
    for n in 0..WORDS {
        match answer.recv().await {
            Some(super::LiveEvent::Text(piece)) => assert_eq!(piece, format!(" w{n}")),
            other => panic!("piece {n}: {other:?}"),
        }
    }
    assert!(matches!(
        answer.recv().await,
        Some(super::LiveEvent::Done(_))
    ));
}
