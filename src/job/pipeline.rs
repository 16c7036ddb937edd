//! The front of the pipeline: screen a verified request, admit it (dedup), and hand it to
//! quoting and payment (`quote.rs`); publishing feedback; the run queue. Cancellations are in
//! `cancel.rs`.
//!
//! Screening in the intake loop is synchronous and cheap (parse, targeting, age); the dedup
//! insert, quoting and invoicing run in tracked tasks. Both queues are bounded: at most
//! [`INTAKE_TASKS`] requests are between intake and `AwaitingPayment` at once, and the run queue
//! holds [`RUN_QUEUE_CAPACITY`] jobs. When either is full the producer waits (intake stops
//! reading from the relays, which keep the events), so load slows intake down rather than
//! dropping anything; the time spent waiting is a metric.

use std::future::Future;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use nostr_sdk::{Event, JsonUtil, Keys, PublicKey, Timestamp};

use super::id::JobId;
use tokio::sync::{mpsc, Mutex, Semaphore, TryAcquireError};
use tokio_util::task::TaskTracker;

use super::book::{Admission, Book, BookError};
use super::record::Job;
use super::state::JobState;
use crate::infer::Backend;
use crate::metrics::{Dropped, Metrics};
use crate::nip90::{
    self, JobRequest, JobStatus, RequestError, Targeting, TextGenerationLimits, Verified,
};
use crate::pricing::RateCard;
use crate::relay::Outbox;
use crate::wallet::{PaymentHash, Wallet};

/// Attempts for courtesy feedback (`processing`, `success`, `error`).
pub(crate) const FEEDBACK_ATTEMPTS: u32 = 5;
/// Requests (and cancellations, receipts) being admitted, quoted and invoiced at once.
pub const INTAKE_TASKS: usize = 512;

/// Npubs whose request buckets are kept at once; beyond that, buckets that have refilled are
/// forgotten, and a new npub is dropped until there is room (see [`crate::limits::Buckets`]).
const MAX_RATE_LIMITED_NPUBS: usize = 100_000;
/// Paid jobs waiting for a worker.
pub const RUN_QUEUE_CAPACITY: usize = 1024;
/// Jobs the model is done with whose results are being stored and delivered at once. A worker
/// hands each finished job to a task and takes the next; when this many are still finishing,
/// it waits (the disk or the relays are behind the model).
pub const FINISHING_TASKS: usize = 256;

/// What the pipeline needs to know from the operator's configuration.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// Request kinds served.
    pub kinds: Vec<u16>,
    /// Prices.
    pub rate_card: RateCard,
    /// When set, the daemon derives the token rates from this hardware cost (msat per hour)
    /// and the seconds per token it measures at start.
    pub hardware_cost_msat_per_hour: Option<u64>,
    /// Kind 5050 limits.
    pub limits: TextGenerationLimits,
    /// Largest request event accepted, bytes of JSON.
    pub max_request_bytes: usize,
    /// Largest result event we may have to publish, bytes of JSON.
    pub max_result_bytes: usize,
    /// `OK false` answers from one relay after which it is given up for a result; once every
    /// write relay is given up the job fails and the payment is credited.
    pub result_refusals: u32,
    /// The backend's context window, tokens (prompt plus completion).
    pub context_tokens: u32,
    /// The model served: a request's `model` param must name it.
    pub model: String,
    /// Requests dated further than this from now are ignored, seconds.
    pub max_age_secs: u64,
    /// Trust tiers: thresholds, proof of work and the bucket of `new` npubs.
    pub trust: crate::trust::TrustPolicy,
    /// When the records of jobs that ended without money are removed (`None`: never).
    pub prune: Option<super::prune::PrunePolicy>,
    /// Job requests one npub may post a minute (burst and refill); more are dropped.
    pub requests_per_npub_per_minute: u32,
    /// Invoices one account may leave unpaid; a request beyond gets an `error`.
    pub max_open_invoices_per_npub: u32,
    /// Invoices all accounts together may leave unpaid (`new` npubs: see
    /// [`crate::trust::TrustPolicy::new_max_open_invoices`]).
    pub max_open_invoices: u32,
    /// Invoice lifetime, seconds.
    pub invoice_expiry_secs: u64,
    /// How long a relay job stopped at its budget waits for its continuation to be paid,
    /// seconds (the continuation invoice's lifetime); 0: it ends at its budget at once.
    pub continuation_wait_secs: u64,
    /// An HTTP `Payment` session idle this long is closed and refunded, seconds.
    pub session_idle_secs: u64,
    /// How long a session's stream that ran dry waits for a top-up, seconds.
    pub session_topup_wait_secs: u64,
    /// Concurrent jobs on the model.
    pub workers: usize,
    /// Longest a job may run on the model, seconds.
    pub job_timeout_secs: u64,
    /// How often open invoices are looked up in the wallet, seconds.
    pub reconcile_interval_secs: u64,
    /// How long after its expiry an invoice the wallet calls pending or unknown keeps its job
    /// waiting before the job expires, seconds.
    pub unpaid_grace_secs: u64,
    /// How long after its expiry an unpaid invoice is still looked up, seconds.
    pub late_lookup_secs: u64,
    /// The most routing fee a payout may cost.
    pub payout_fee: super::payouts::PayoutFee,
    /// Let withdrawals to a Lightning address fetch from loopback over plain HTTP (tests).
    pub payout_lnurl_allow_loopback_http: bool,
    /// Days of inactivity after which unclaimed credit lapses (`None`: never).
    pub credit_expiry_days: Option<u64>,
    /// When change and refunds go home to npubs that opted in.
    pub auto_payout: super::auto_payout::AutoPayoutPolicy,
    /// The `nostrPubkey` of an external Lightning address provider whose zap receipts are
    /// accepted as payment (after NIP-57 appendix F); `None` trusts no receipt.
    pub zap_provider: Option<nostr_sdk::PublicKey>,
}

/// A job ready for a worker, with when its payment was confirmed (for the latency metric).
#[derive(Debug, Clone)]
pub struct WorkItem {
    /// The job as the enqueuer last stored it (saves the worker a read). Every transition the
    /// worker makes is checked against the stored record, so a stale copy cannot do harm.
    pub job: Box<Job>,
    /// When our wallet confirmed the payment, if this run follows one.
    pub paid_at: Option<Instant>,
    /// The `processing` feedback stored with `Running` by whoever started the job (credit
    /// jobs start in the transaction that reserves their credit); the worker publishes it.
    pub announced: Option<Box<Event>>,
    /// The response waiting for an HTTP job's answer.
    pub live: Option<super::direct::LiveSink>,
}

/// The receiving end of the run queue, shared by the workers.
pub type WorkQueue = Arc<Mutex<mpsc::Receiver<WorkItem>>>;

/// The outcome of the dedup insert.
#[derive(Debug)]
pub enum Screening {
    /// A new job, now `Received`.
    New(Box<Job>, Box<JobRequest>),
    /// Seen before.
    Duplicate(Box<Job>),
    /// Larger than `max_request_bytes`: not stored (so big events cannot fill the disk), only
    /// answered.
    TooLarge(RequestError),
}

pub(crate) struct Inner {
    pub(crate) config: JobConfig,
    pub(crate) keys: Keys,
    pub(crate) book: Book,
    pub(crate) wallet: Arc<dyn Wallet>,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) outbox: Outbox,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) queue: mpsc::Sender<WorkItem>,
    /// Room for intake tasks (see [`INTAKE_TASKS`]).
    pub(crate) intake: Arc<Semaphore>,
    /// Room for jobs being finished (see [`FINISHING_TASKS`]).
    pub(crate) finishing: Arc<Semaphore>,
    /// Each npub's bucket of job requests (see [`Pipeline::precheck`]).
    pub(crate) per_npub: crate::limits::Buckets<PublicKey>,
    /// Every npub's tier (see [`crate::trust`]).
    pub(crate) trust: Arc<crate::trust::Trust>,
    /// Unpaid invoices per account (see [`super::open_invoices`]).
    pub(crate) open_invoices: super::open_invoices::OpenInvoices,
    pub(crate) tasks: TaskTracker,
    /// Payment hashes being looked up because of a hint, each with whether another hint came
    /// in meanwhile (then it is looked up once more). Hints for one hash never run in parallel.
    pub(crate) checking: std::sync::Mutex<std::collections::HashMap<PaymentHash, bool>>,
    /// A reconcile pass started because settlement hints lagged is running.
    pub(crate) lag_pass: std::sync::atomic::AtomicBool,
    /// What jobs cost, learned from the ones that ran (see [`super::estimates`]).
    pub(crate) estimator: std::sync::Mutex<super::estimates::Learned>,
    /// HTTP `Payment` sessions' activity and top-ups (see [`super::sessions`]).
    pub(crate) sessions: super::sessions::Live,
    /// When this process started, unix seconds.
    pub(crate) started_at: u64,
}

/// The job pipeline. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Pipeline {
    /// Build the pipeline; the returned queue feeds [`Pipeline::run_workers`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: JobConfig,
        keys: Keys,
        book: Book,
        wallet: Arc<dyn Wallet>,
        backend: Arc<dyn Backend>,
        outbox: Outbox,
        metrics: Arc<Metrics>,
        trust: Arc<crate::trust::Trust>,
    ) -> (Self, WorkQueue) {
        let (queue, rx) = mpsc::channel(RUN_QUEUE_CAPACITY);
        let per_npub = {
            let per_minute = f64::from(config.requests_per_npub_per_minute.max(1));
            crate::limits::Buckets::new(per_minute, per_minute / 60.0, MAX_RATE_LIMITED_NPUBS)
        };
        let inner = Inner {
            config,
            keys,
            book,
            wallet,
            backend,
            outbox,
            metrics,
            queue,
            intake: Arc::new(Semaphore::new(INTAKE_TASKS)),
            finishing: Arc::new(Semaphore::new(FINISHING_TASKS)),
            per_npub,
            trust,
            open_invoices: Default::default(),
            tasks: TaskTracker::new(),
            checking: std::sync::Mutex::default(),
            lag_pass: std::sync::atomic::AtomicBool::new(false),
            estimator: std::sync::Mutex::default(),
            sessions: Default::default(),
            started_at: unix_now(),
        };
        (
            Self {
                inner: Arc::new(inner),
            },
            Arc::new(Mutex::new(rx)),
        )
    }

    /// The job book.
    pub fn book(&self) -> &Book {
        &self.inner.book
    }

    /// The relay pool answers go out through.
    pub fn relays(&self) -> &crate::relay::Relays {
        self.inner.outbox.relays()
    }

    /// Every npub's tier.
    pub fn trust(&self) -> &crate::trust::Trust {
        &self.inner.trust
    }

    /// Whether `account`'s jobs run free: an allowlisted npub, when `[trust] allowlisted_free`.
    pub(crate) fn runs_free(&self, account: &crate::ledger::Account) -> bool {
        let trust = &self.inner.trust;
        trust.policy().allowlisted_free
            && account
                .npub()
                .is_some_and(|npub| trust.tier(&npub) == crate::trust::Tier::Allowlisted)
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Wait for every task the pipeline spawned (call after cancelling).
    pub async fn wait(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    /// The cheap checks, run in the intake loop itself: kind, targeting, age, the author's tier
    /// (blocked, or `new` without the proof of work asked), the npub's request bucket, and for
    /// a `new` npub the bucket all new npubs share (last: only requests we would serve count,
    /// and a key over its own limit takes nothing from the others). No IO.
    pub fn precheck(&self, event: &Verified) -> Result<JobRequest, Dropped> {
        let inner = &self.inner;
        let event = event.event();
        if !inner.config.kinds.contains(&event.kind.as_u16()) {
            return Err(Dropped::WrongKind);
        }
        let request = JobRequest::parse(event).ok_or(Dropped::WrongKind)?;
        if request.targeting(&inner.keys.public_key()) == Targeting::Others {
            return Err(Dropped::NotForUs);
        }
        if request.is_stale(Timestamp::now(), inner.config.max_age_secs) {
            return Err(Dropped::Stale);
        }
        let tier = inner.trust.screen(event).map_err(|refusal| match refusal {
            crate::trust::Refusal::Blocked => Dropped::Blocked,
            crate::trust::Refusal::Pow { .. } => Dropped::NoProofOfWork,
        })?;
        let now = Instant::now();
        if !inner.per_npub.try_take(event.pubkey, now) {
            return Err(Dropped::RateLimited);
        }
        if tier == crate::trust::Tier::New && !inner.trust.take_new_key_slot(now) {
            return Err(Dropped::NewKeysBusy);
        }
        Ok(request)
    }

    /// The persisted dedup: record a first sighting as a `Received` job, or return the job
    /// already stored under this id. Safe to race: one caller wins the insert.
    pub async fn admit(
        &self,
        event: &Event,
        request: JobRequest,
        source: Option<&str>,
    ) -> Result<Screening, BookError> {
        let mut reply_relays = request.relays.clone();
        if let Some(source) = source {
            if !reply_relays.iter().any(|r| r == source) {
                reply_relays.push(source.to_owned());
            }
        }
        let json = crate::event_json::to_json(event);
        let limit = self.inner.config.max_request_bytes;
        if json.len() > limit {
            let size = json.len();
            return Ok(Screening::TooLarge(RequestError::TooLarge { size, limit }));
        }
        let job = Job::received_as(event, json, reply_relays, unix_now());
        Ok(match self.inner.book.admit(&job).await? {
            Admission::New => Screening::New(Box::new(job), Box::new(request)),
            Admission::Duplicate(existing) => Screening::Duplicate(existing),
        })
    }

    /// Take a verified event from intake. The loop only runs [`Pipeline::precheck`]; the dedup
    /// insert, quoting and invoicing run in a task, so disk latency never holds up intake and
    /// the store work runs on another core while intake verifies the next event. Waits only
    /// when [`INTAKE_TASKS`] requests are already in flight.
    pub async fn handle(&self, event: Verified, source: Option<&str>) {
        let request = match self.precheck(&event) {
            Ok(request) => request,
            Err(why) => {
                self.inner.metrics.dropped(why);
                return tracing::debug!(event = %event.event().id, reason = ?why, "event dropped");
            }
        };
        let pipeline = self.clone();
        let source = source.map(str::to_owned);
        self.spawn_intake(async move {
            let event = event.into_event();
            let metrics = &pipeline.inner.metrics;
            match pipeline.admit(&event, request, source.as_deref()).await {
                Ok(Screening::New(job, request)) => {
                    metrics.entered(JobState::Received);
                    tracing::info!(job = %job.id, customer = %job.customer, kind = job.kind, "job received");
                    pipeline.process(*job, event, *request).await;
                }
                Ok(Screening::Duplicate(job)) => {
                    metrics.dropped(Dropped::Duplicate);
                    pipeline.replay(&job, source).await;
                }
                Ok(Screening::TooLarge(reason)) => {
                    metrics.dropped(Dropped::TooLarge);
                    tracing::info!(event = %event.id, reason = %reason, "request refused unstored");
                    pipeline.refuse_unstored(&event, source, &reason).await;
                }
                Err(e) => tracing::error!(event = %event.id, error = %e, "cannot record job"),
            }
        })
        .await;
    }

    /// Run `task` as an intake task once there is room (see [`INTAKE_TASKS`]).
    pub(crate) async fn spawn_intake<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let room = self.inner.intake.clone();
        let permit = match room.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return,
            Err(TryAcquireError::NoPermits) => {
                let started = Instant::now();
                let permit = room.acquire_owned().await;
                self.inner.metrics.intake_wait.observe(started.elapsed());
                match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                }
            }
        };
        self.inner.tasks.spawn(async move {
            task.await;
            drop(permit);
        });
    }

    /// Answer a request we do not store with an `error` feedback, once, on the relay it came
    /// from and its own reply relays.
    async fn refuse_unstored(&self, event: &Event, source: Option<String>, reason: &RequestError) {
        let feedback = self.sign(nip90::feedback(
            event,
            JobStatus::Error,
            &reason.to_string(),
            None,
        ));
        let relays: Vec<String> = source.into_iter().collect();
        if let Err(e) = self.inner.outbox.publish(&feedback, &relays, 1).await {
            tracing::debug!(event = %event.id, error = %e, "refusal not published");
        }
    }

    /// Refuse a job before any money moved: persist `Rejected`, then say why.
    pub(crate) async fn reject(&self, id: &JobId, event: &Event, reason: String) {
        tracing::info!(job = %id, reason = %reason, "job rejected");
        let recorded = reason.clone();
        // Durable before it is said: a restart must not quote a job we refused.
        let rejected = self
            .inner
            .book
            .transition_durably(id, JobState::Rejected, move |job| {
                job.reason = Some(recorded.clone());
            })
            .await;
        match rejected {
            Ok(job) => {
                self.inner.metrics.entered(JobState::Rejected);
                let feedback = nip90::feedback(event, JobStatus::Error, &reason, None);
                self.send_feedback(&job, feedback, FEEDBACK_ATTEMPTS).await;
            }
            Err(e) => tracing::error!(job = %id, error = %e, "cannot record rejection"),
        }
    }

    /// Sign an event with the service key.
    pub(crate) fn sign(&self, unsigned: impl crate::signatures::Unsigned) -> Event {
        crate::signatures::sign(unsigned, &self.inner.keys)
    }

    /// Sign a feedback event, store it as the job's latest (for duplicates), publish it.
    /// Returns the signed event if a relay accepted it.
    pub(crate) async fn send_feedback(
        &self,
        job: &Job,
        feedback: impl crate::signatures::Unsigned,
        attempts: u32,
    ) -> Option<Event> {
        let event = self.sign(feedback);
        // Stored first, so the latest stored is always the latest said, however long the
        // publishing takes (replayed to duplicates of the request).
        let json = crate::event_json::to_json(&event);
        let stored = self.inner.book.update(job, move |stored, _| {
            stored.last_feedback = Some(json.clone());
            Ok(())
        });
        if let Err(e) = stored.await {
            tracing::warn!(job = %job.id, error = %e, "cannot store feedback");
        }
        self.publish_feedback(job, &event, attempts)
            .await
            .then_some(event)
    }

    /// Publish a signed feedback event; `true` if a relay accepted it.
    pub(crate) async fn publish_feedback(&self, job: &Job, event: &Event, attempts: u32) -> bool {
        let inner = &self.inner;
        match inner
            .outbox
            .publish(event, &job.reply_relays, attempts)
            .await
        {
            Ok(_) => true,
            Err(e) => {
                inner.metrics.publish_failed();
                tracing::warn!(job = %job.id, error = %e, "feedback not published");
                false
            }
        }
    }

    /// Answer a duplicate request with what we already said: the stored feedback and result,
    /// the same signed events, so relays see them as duplicates too.
    async fn replay(&self, job: &Job, source: Option<String>) {
        let relays: Vec<String> = source.into_iter().collect();
        for json in [&job.last_feedback, &job.result_event]
            .into_iter()
            .flatten()
        {
            if let Ok(event) = Event::from_json(json) {
                let _ = self.inner.outbox.publish(&event, &relays, 1).await;
            }
        }
    }

    /// Queue a job for the workers; waits while the run queue is full.
    pub(crate) async fn enqueue(&self, job: Job, paid_at: Option<Instant>) {
        self.queue(WorkItem {
            job: Box::new(job),
            paid_at,
            announced: None,
            live: None,
        })
        .await
    }

    /// Queue a job already `Running` with its `processing` feedback stored; the worker
    /// publishes it.
    pub(crate) async fn enqueue_announced(&self, job: Job, processing: Event) {
        self.queue(WorkItem {
            job: Box::new(job),
            paid_at: None,
            announced: Some(Box::new(processing)),
            live: None,
        })
        .await
    }

    pub(super) async fn queue(&self, item: WorkItem) {
        let id = item.job.id;
        let sent = match self.inner.queue.try_send(item) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(item)) => {
                let started = Instant::now();
                let sent = self.inner.queue.send(item).await.map_err(drop);
                self.inner.metrics.run_queue_wait.observe(started.elapsed());
                sent
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        };
        match sent {
            Ok(()) => self.inner.metrics.run_queue_changed(1),
            Err(()) => tracing::warn!(job = %id, "workers stopped; the job resumes on restart"),
        }
    }
}
