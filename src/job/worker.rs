//! The worker pool: run paid jobs on the model, publish the result, settle the ledger.
//!
//! Workers are the only place inference runs, so intake and settlement never wait on the model.
//! The result event is signed and persisted before it is published; a restart re-publishes the
//! same event instead of running the model again.

use std::time::{Duration, Instant};

use nostr_sdk::{Event, JsonUtil};
use tokio_util::sync::CancellationToken;

use super::pipeline::{Pipeline, WorkItem, WorkQueue, FEEDBACK_ATTEMPTS};
use super::record::Job;
use super::state::JobState;
use crate::incident::Incident;
use crate::infer::{self, InferError, Usage};
use crate::nip90::{self, JobRequest, JobStatus, PaymentAmount, TextGeneration};
use crate::pricing::Finish;
use crate::relay::outbox::Undelivered;

/// How long an answer waits for the `processing` feedback to go out first.
const PROCESSING_BEFORE_ANSWER: Duration = Duration::from_secs(2);

/// The `processing` feedback in flight. Answers (result or `error`) wait for it, so the customer
/// never sees them out of order, even from a backend that answers at once.
struct Announcement(Option<tokio::task::JoinHandle<()>>);

impl Announcement {
    async fn wait(&mut self) {
        if let Some(task) = self.0.take() {
            let _ = tokio::time::timeout(PROCESSING_BEFORE_ANSWER, task).await;
        }
    }
}

impl Pipeline {
    /// Run `config.workers` workers over `queue` until `cancel` fires.
    pub async fn run_workers(self, queue: WorkQueue, cancel: CancellationToken) {
        let workers = self.inner.config.workers.max(1);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let pipeline = self.clone();
            let queue = queue.clone();
            let cancel = cancel.clone();
            set.spawn(async move {
                loop {
                    let item = {
                        let mut rx = queue.lock().await;
                        tokio::select! {
                            _ = cancel.cancelled() => None,
                            item = rx.recv() => item,
                        }
                    };
                    let Some(item) = item else { break };
                    pipeline.inner.metrics.run_queue_changed(-1);
                    tokio::select! {
                        // A job cut short stays `Running` and resumes on restart.
                        _ = cancel.cancelled() => break,
                        _ = pipeline.run(item) => {}
                    }
                }
            });
        }
        while set.join_next().await.is_some() {}
    }

    /// Take one job as far as it can go from its stored state.
    async fn run(&self, item: WorkItem) {
        let inner = &self.inner;
        if item.job.door.is_http() {
            return self.run_direct(item).await;
        }
        let job = *item.job;
        let free = job.state == JobState::Quoted && job.quote_msat == Some(0);
        match job.state {
            JobState::Paid | JobState::Running => {}
            JobState::Quoted if free => {}
            // Given up with the text so far as its result: deliver it (or, its request lost,
            // fail it below).
            JobState::AwaitingContinuation
                if job.result_event.is_some() || job.request_event().is_err() => {}
            JobState::Delivered | JobState::Failed => {
                return self.settle(&job, job.charge_msat.unwrap_or(0)).await
            }
            _ => return tracing::debug!(job = %job.id, state = ?job.state, "nothing to run"),
        }
        let event = match job.request_event() {
            Ok(event) => event,
            Err(e) => {
                let incident = Incident::log("stored request", &e);
                let reason = format!("this service lost the request ({incident})");
                let job = if matches!(
                    job.state,
                    JobState::Running | JobState::AwaitingContinuation
                ) {
                    job
                } else {
                    match self.start(&job, None).await {
                        Some(job) => job,
                        None => return,
                    }
                };
                // Failed and settled: what it holds goes back to the payer.
                return self.fail(&job, None, reason).await;
            }
        };
        if let Some(result) = job
            .result_event
            .as_deref()
            .and_then(|json| Event::from_json(json).ok())
        {
            return self.deliver(job, event, result);
        }

        // `processing` goes out beside the model. It is a courtesy, not a claim about money:
        // the payment booking becomes durable with the result, before the result is shown. A
        // crash before that leaves the payment hash unconsumed on disk, and the reconciler
        // books it again, once. It is stored with `Running` (one write) and published in a task.
        let (job, processing) = match item.announced {
            // Started by whoever queued it (a job paid from credit), `processing` stored.
            Some(processing) if job.state == JobState::Running => (job, *processing),
            _ => {
                let info = if job.result.is_some() {
                    "continuing from the text so far"
                } else {
                    "generating"
                };
                let processing = nip90::feedback(&event, JobStatus::Processing, info, None);
                let processing = self.sign(processing);
                let job = if job.state == JobState::Running {
                    // Resumed after a restart: say it again.
                    let json = crate::event_json::to_json(&processing);
                    let stored = inner.book.update(&job, move |stored, _| {
                        stored.last_feedback = Some(json.clone());
                        Ok(())
                    });
                    match stored.await {
                        Ok(job) => job,
                        Err(e) => {
                            return tracing::error!(job = %job.id, error = %e, "cannot resume job")
                        }
                    }
                } else {
                    match self.start(&job, Some(&processing)).await {
                        Some(job) => job,
                        None => return,
                    }
                };
                (job, processing)
            }
        };
        let pipeline = self.clone();
        let announced = job.clone();
        let processing = inner.tasks.spawn(async move {
            if pipeline
                .publish_feedback(&announced, &processing, FEEDBACK_ATTEMPTS)
                .await
            {
                if let Some(paid_at) = item.paid_at {
                    pipeline
                        .inner
                        .metrics
                        .settlement_to_processing
                        .observe(paid_at.elapsed());
                }
            }
        });
        let processing = Announcement(Some(processing));

        let started = Instant::now();
        let generated = self.generate(&job, &event).await;
        inner.metrics.inference.observe(started.elapsed());
        // The model is free. Storing and delivering what it said waits on the disk and the
        // relays, not on it, so that goes on in a task of its own and this worker takes the
        // next job: under load many jobs then share each group commit.
        let Some(room) = self.finishing_room().await else {
            return;
        };
        let pipeline = self.clone();
        inner.tasks.spawn(async move {
            pipeline.finish(job, event, generated, processing).await;
            drop(room);
        });
    }

    /// Room among the jobs being finished (see [`super::pipeline::FINISHING_TASKS`]). `None`
    /// only if the semaphore were closed, which nothing does. A worker cancelled at shutdown
    /// while it waits here drops what the model said: the job stays `Running`, with no result
    /// stored, and runs again on restart.
    async fn finishing_room(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let room = self.inner.finishing.clone();
        match room.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(tokio::sync::TryAcquireError::Closed) => None,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                let started = Instant::now();
                let permit = room.acquire_owned().await.ok();
                self.inner.metrics.finishing_wait.observe(started.elapsed());
                permit
            }
        }
    }

    /// What the model said becomes the result (or the job fails with the reason it did not).
    async fn finish(
        &self,
        job: Job,
        event: Event,
        generated: Result<(String, Usage, Finish), String>,
        processing: Announcement,
    ) {
        match generated {
            Ok((text, usage, finish)) => {
                self.complete(&job, &event, text, usage, finish, processing)
                    .await
            }
            Err(reason) => {
                let mut processing = processing;
                processing.wait().await;
                if job.result.is_some() {
                    // Its continuation failed: the text so far was shown and is charged for
                    // as generated; the continuation's payment comes back as credit.
                    tracing::warn!(job = %job.id, reason = %reason, "continuation failed; the text so far is the result");
                    return self
                        .end_with_text_so_far(&job, &event, "continuation failed")
                        .await;
                }
                self.fail(&job, Some(&event), reason).await
            }
        }
    }

    /// `Paid | Quoted(free) -> Running`, storing the `processing` feedback about to be sent.
    async fn start(&self, job: &Job, processing: Option<&Event>) -> Option<Job> {
        let feedback = processing.map(crate::event_json::to_json);
        let started = self
            .inner
            .book
            .transition(job, JobState::Running, move |job| {
                if let Some(json) = &feedback {
                    job.last_feedback = Some(json.clone());
                }
            })
            .await;
        match started {
            Ok(job) => {
                self.inner.metrics.entered(JobState::Running);
                Some(job)
            }
            Err(e) => {
                tracing::error!(job = %job.id, error = %e, "cannot start job");
                None
            }
        }
    }

    /// Run the model for `job`, held to the completion tokens its funds pay for. A job paid
    /// for its continuation goes on from the text it said so far; the text and usage returned
    /// are the whole job's (its prompt counted once: the re-read is the service's).
    async fn generate(&self, job: &Job, event: &Event) -> Result<(String, Usage, Finish), String> {
        let inner = &self.inner;
        let request = JobRequest::parse(event).ok_or("not a job request")?;
        let mut generation = TextGeneration::from_request(&request, &inner.config.limits)
            .map_err(|e| e.to_string())?;
        let timeout = Duration::from_secs(inner.config.job_timeout_secs);
        let budget = job.budget_tokens(&inner.config.rate_card);
        let said = job.usage.zip(job.result.clone());
        let done = said
            .as_ref()
            .map_or(0, |(usage, _)| usage.completion_tokens);
        let max_tokens = budget
            .map_or(generation.max_tokens, |b| b.min(generation.max_tokens))
            .saturating_sub(done);
        generation.request.continue_from = said.as_ref().map(|(_, text)| text.clone());
        let run = async {
            let stream = inner
                .backend
                .generate(generation.request, max_tokens)
                .await?;
            infer::collect(stream).await
        };
        let (text, usage, finish) = if max_tokens == 0 {
            (String::new(), Usage::default(), infer::FinishReason::Length)
        } else {
            within(timeout, run).await?
        };
        let (text, usage) = match said {
            Some((before, mut said)) => {
                said.push_str(&text);
                let usage = Usage {
                    prompt_tokens: before.prompt_tokens,
                    completion_tokens: before.completion_tokens + usage.completion_tokens,
                };
                (said, usage)
            }
            None => (text, usage),
        };
        Ok((
            text,
            usage,
            Finish::of(finish, usage.completion_tokens, budget),
        ))
    }

    /// Price the exact usage, persist the signed result with its receipt, then deliver it.
    async fn complete(
        &self,
        job: &Job,
        event: &Event,
        text: String,
        usage: Usage,
        finish: Finish,
        mut processing: Announcement,
    ) {
        let inner = &self.inner;
        if finish == Finish::Budget && self.may_continue(job, event) {
            processing.wait().await;
            if self.offer_continuation(job, event, &text, usage).await {
                return;
            }
        }
        let receipt = job.receipt_for(inner.config.rate_card, usage, finish);
        let charge = receipt.charged_msat;
        let invoice = if job.pay_after && charge > 0 {
            self.invoice_pay_after(job, charge).await
        } else {
            None
        };
        // Only a pay-after job asks to be paid for its result; a prepaid one says what it was
        // charged in its receipt (an `amount` there would ask its customer to pay again).
        let ask = (job.pay_after && charge > 0).then(|| PaymentAmount {
            msat: invoice
                .as_ref()
                .map_or(charge, |invoice| invoice.amount_msat),
            bolt11: invoice.as_ref().map(|invoice| invoice.bolt11.clone()),
        });
        let result = self.sign(nip90::result(event, &text, Some(&receipt), ask.as_ref()));
        let json = crate::event_json::to_json(&result);
        // One group commit makes the payment booking, `Running` and the result durable
        // together, before the result is shown.
        let stored = inner
            .book
            .update_durably(job, move |stored, _| {
                // The receipt travels in the signed result; the record keeps only the usage.
                stored.result_event = Some(json.clone());
                stored.result = None;
                stored.usage = Some(usage);
                stored.charge_msat = Some(charge);
                if invoice.is_some() {
                    stored.invoice = invoice.clone();
                }
                Ok(())
            })
            .await;
        let job = match stored {
            Ok(job) => job,
            Err(e) => return tracing::error!(job = %job.id, error = %e, "cannot store result"),
        };
        self.learn(&job, usage, finish == Finish::Budget);
        processing.wait().await;
        tracing::info!(job = %job.id, prompt_tokens = usage.prompt_tokens, completion_tokens = usage.completion_tokens, charge_msat = charge, finish = finish.as_str(), "job generated");
        self.deliver(job, event.clone(), result);
    }

    /// Deliver the stored result in a task of its own, so the worker moves on to the next job
    /// at once however long the relays take.
    pub(super) fn deliver(&self, job: Job, event: Event, result: Event) {
        let pipeline = self.clone();
        self.inner.tasks.spawn(async move {
            pipeline.publish_result(&job, &event, &result).await;
        });
    }

    /// Publish the stored result until a relay acks it; then `Delivered`, the `success`
    /// feedback and the settlement in one write, and `success` goes out. If every write relay
    /// refuses it (`OK false`, [`JobConfig::result_refusals`] times each), the job fails and
    /// the payment is credited.
    ///
    /// The settling write is applied, not awaited durable: the charge was made durable with
    /// the result (before it was shown), and a crash before the next group commit leaves the
    /// job `Running` with its result, so recovery publishes the same result again and settles
    /// it the same way.
    ///
    /// [`JobConfig::result_refusals`]: super::JobConfig::result_refusals
    async fn publish_result(&self, job: &Job, event: &Event, result: &Event) {
        let inner = &self.inner;
        let delivered = inner
            .outbox
            .deliver(result, &job.reply_relays, inner.config.result_refusals)
            .await;
        match delivered {
            Ok(_) => {}
            Err(Undelivered::Refused(refusals)) => {
                let said: Vec<String> = refusals
                    .iter()
                    .map(|(relay, message)| format!("{relay}: {message}"))
                    .collect();
                tracing::warn!(job = %job.id, refusals = %said.join("; "), "every write relay refused the result");
                inner.metrics.publish_failed();
                let reason = "the relays refused to store the result".to_owned();
                return self.fail(job, Some(event), reason).await;
            }
            // The job stays Running with its result stored, and recovery publishes it on the
            // next start.
            Err(Undelivered::Stopped) => {
                return tracing::info!(job = %job.id, "result not delivered yet; resumes on restart")
            }
        }
        // No `amount` tag: on feedback it asks to be paid, and `success` asks nothing (a
        // pay-after job's `payment-required` follows it).
        let charge = job.charge_msat.unwrap_or(0);
        let info = format!("result published; charged {charge} msat");
        let success = nip90::feedback(event, JobStatus::Success, &info, None);
        let success = self.sign(success);
        let feedback = Some(crate::event_json::to_json(&success));
        let settled = match inner.book.settle_delivered(job, charge, feedback).await {
            Ok(settled) => settled,
            Err(e) => return tracing::error!(job = %job.id, error = %e, "cannot record delivery"),
        };
        inner.metrics.entered(JobState::Delivered);
        self.settled(&settled);
        self.publish_feedback(&settled, &success, FEEDBACK_ATTEMPTS)
            .await;
        if settled.pay_after {
            self.ask_after(&settled, event).await;
        }
    }

    /// `Running -> Failed`, settle with no charge (everything paid stays with the customer as
    /// credit, and reserved credit is released, flushed), then say why: the `error` names the
    /// credit, so it goes out after it.
    pub(super) async fn fail(&self, job: &Job, event: Option<&Event>, reason: String) {
        let inner = &self.inner;
        tracing::warn!(job = %job.id, reason = %reason, paid_msat = job.paid_msat, credit_msat = job.credit_msat, payer = %job.payer(), "job failed; the payment is credited to the payer");
        let recorded = reason.clone();
        let failed = inner
            .book
            .transition(job, JobState::Failed, move |job| {
                job.reason = Some(recorded.clone());
                job.charge_msat = Some(0);
            })
            .await;
        let job = match failed {
            Ok(job) => job,
            Err(e) => return tracing::error!(job = %job.id, error = %e, "cannot record failure"),
        };
        inner.metrics.entered(JobState::Failed);
        self.settle(&job, 0).await;
        if let Some(event) = event {
            let info = if job.paid_msat == 0 {
                format!(
                    "{reason}; nothing was charged, and the {} msat reserved from your credit are yours to spend again",
                    job.credit_msat
                )
            } else if job.payer() == job.customer {
                format!(
                    "{reason}; the {} msat you paid are credited to your account",
                    job.funds_msat()
                )
            } else {
                let payer = job.payer();
                let payer = payer.to_human();
                format!(
                    "{reason}; the {} msat paid are credited to the account of {payer}, who paid",
                    job.paid_msat
                )
            };
            let feedback = nip90::feedback(event, JobStatus::Error, &info, None);
            self.send_feedback(&job, feedback, FEEDBACK_ATTEMPTS).await;
        }
    }

    /// Book the charge and the remainder (a failed job, or one delivered before a restart).
    pub(super) async fn settle(&self, job: &Job, charge_msat: u64) {
        match self.inner.book.settle(job, charge_msat).await {
            Ok(job) => self.settled(&job),
            Err(e) => tracing::error!(job = %job.id, error = %e, "cannot settle job"),
        }
    }

    pub(super) fn settled(&self, job: &Job) {
        let metrics = &self.inner.metrics;
        metrics.entered(JobState::Settled);
        let usage = job.usage.unwrap_or_default();
        let charged = job.charge_msat.unwrap_or(0);
        metrics.charged(charged, usage.prompt_tokens, usage.completion_tokens);
        // A pay-after job had no funds: it owes its charge, and has no change.
        let change = job.funds_msat().saturating_sub(charged);
        tracing::info!(job = %job.id, paid_msat = job.paid_msat, charge_msat = charged, credit_msat = job.credit_msat, change_msat = change, pay_after = job.pay_after, "job settled");
        self.note_settlement(job);
    }
}

/// Run a generation for at most `timeout`; what went wrong, as the customer is told it.
pub(super) async fn within<T>(
    timeout: Duration,
    run: impl std::future::Future<Output = Result<T, InferError>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(InferError::Timeout(secs))) => Err(format!("inference took longer than {secs} s")),
        // Backend errors name URLs and carry upstream bodies: the log gets them.
        Ok(Err(e)) => Err(format!(
            "the model failed ({})",
            Incident::log("inference", &e)
        )),
        Err(_) => Err(format!(
            "inference took longer than {} s",
            timeout.as_secs()
        )),
    }
}
