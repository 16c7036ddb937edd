//! Jobs that come in through an HTTP door (`POST /v1/chat/completions`, `POST /v1/jobs`).
//!
//! They run on the same book, ledger, workers and rate card as relay jobs; only the way in and
//! the way out differ. An HTTP job comes in paid: it is priced like a relay job, and the write
//! that opens it reserves the whole quote from its account (an npub that signed with NIP-98, or
//! a paid L402 token), durably, before the first byte of an answer is sent. A call the balance
//! does not cover opens nothing. The workers run it, the exact usage is charged and the rest
//! released, as for a relay job.
//!
//! The way out is the job's [`Door`]. A chat completion's answer goes to the waiting response
//! through a [`LiveSink`], piece by piece; a client that goes away stops the generation, and the
//! job is charged for the completion tokens generated until then, not for its reservation. A
//! `/v1/jobs` job's result is stored for `GET /v1/jobs/{id}`.
//!
//! Durable before each answer: the reservation (with the job, `Running`) before the response
//! starts (a stream's first chunk, a 202; a whole response starts after the result's commit,
//! which covers it); the result, usage and charge before the answer ends (the last chunk of a
//! stream, or any byte of a whole response). Settlement follows the answer, applied, as a relay
//! job's follows its publication. On restart a `/v1/jobs` job resumes; a chat completion's
//! client is gone, so it fails and its hold is released.
//!
//! [`open`] prices and opens a call (what pays for it, why one does not open); this module
//! runs it and answers.

mod open;

pub use open::{HttpPayer, OpenError, Priced};

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::pipeline::{Pipeline, WorkItem};
use super::record::{Door, Job};
use super::state::JobState;
use crate::incident::Incident;
use crate::infer::{FinishReason, GenerateEvent, GenerateRequest, InferError, Usage};
use crate::pricing::Finish;

/// How long a worker waits for a client that has read nothing while its answer's queue is
/// full (see [`live_channel`]) before it takes the client for gone.
const LIVE_STALL: Duration = Duration::from_secs(30);

/// The queue between a worker and the response waiting for its answer: room for a whole
/// answer of `max_tokens` (each piece is at least one token; twice that, and a few more for
/// what is said around the pieces), so the worker never waits for its client. A client that
/// reads slowly, or keeps its connection open and reads nothing, held the worker until
/// `job_timeout_secs` failed the job with nothing charged, having read what it had: one such
/// connection stopped every job, and its answers cost nothing. The queue is bounded by the
/// answer (a few hundred KB at most), which was paid for; a client that never reads keeps its
/// answer queued until its connection closes (at most `[http] max_connections` at once).
pub fn live_channel(max_tokens: u32) -> (LiveSink, mpsc::Receiver<LiveEvent>) {
    let pieces = usize::try_from(max_tokens).unwrap_or(usize::MAX);
    mpsc::channel(pieces.saturating_mul(2).saturating_add(16))
}

/// Pass `event` to the response waiting on `live`, without waiting while there is room.
/// `false` when the client is gone, or read nothing for [`LIVE_STALL`] with its queue full
/// (which a backend sending no more pieces than tokens never causes).
pub(crate) async fn tell(live: &LiveSink, event: LiveEvent) -> bool {
    match live.try_send(event) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Closed(_)) => false,
        Err(mpsc::error::TrySendError::Full(event)) => {
            live.send_timeout(event, LIVE_STALL).await.is_ok()
        }
    }
}

/// An HTTP job's request as it will run, stored in [`Job::request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpRequest {
    /// What to generate.
    pub generation: GenerateRequest,
    /// Completion budget in tokens.
    pub max_tokens: u32,
    /// Prompt tokens as counted for the quote (what a client that leaves early is charged for
    /// the prompt).
    pub prompt_tokens: u32,
    /// The HTTP `Payment` session that pays (its id): the call opens with what the session
    /// has, and a stream that runs dry waits for a top-up ([`super::sessions`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<crate::wallet::PaymentHash>,
}

/// What the worker says to a waiting response.
#[derive(Debug)]
pub enum LiveEvent {
    /// A piece of the answer.
    Text(String),
    /// The answer is complete, and its charge is durable.
    Done(Box<Finished>),
    /// The job failed after it opened; nothing was charged and its hold was released.
    Failed(String),
    /// An HTTP `Payment` session's stream ran dry: it waits for a top-up.
    NeedTopUp(TopUpWait),
    /// No top-up came in time: the answer ends with what it said (a `Done` follows).
    SessionTimeout(TopUpWait),
}

/// A session stream waiting for a top-up, as the draft's `payment-need-topup` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopUpWait {
    /// The session id.
    pub session: crate::wallet::PaymentHash,
    /// Whole sats the session has spent, this call's tokens so far included (rounded down).
    pub spent_sats: u64,
    /// Whole sats that would let this call run to its `max_tokens` (rounded up).
    pub required_sats: u64,
}

/// A finished HTTP job.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The job with its result, usage and charge stored (settlement follows the answer).
    pub job: Job,
    /// Why generation stopped.
    pub finish: FinishReason,
}

/// The sending end a waiting response reads from.
pub type LiveSink = mpsc::Sender<LiveEvent>;

/// What a generation produced.
struct Generated {
    text: String,
    usage: Usage,
    /// `None` when the client went away first.
    finish: Option<FinishReason>,
}

impl Generated {
    /// This, then `more` continued from it: the prompt counted once.
    fn then(mut self, more: Generated) -> Self {
        self.text.push_str(&more.text);
        self.usage.completion_tokens += more.usage.completion_tokens;
        self.finish = more.finish;
        self
    }
}

impl Pipeline {
    /// Hand an opened HTTP job to the workers; its answer goes to `live` when a response waits
    /// for it. Waits while the run queue is full.
    pub async fn run_http(&self, job: Job, live: Option<LiveSink>) {
        self.queue(WorkItem {
            job: Box::new(job),
            paid_at: None,
            announced: None,
            live,
        })
        .await
    }

    /// The worker's part for an HTTP job: run it (or finish what a restart interrupted),
    /// store the result and charge, settle, and answer on its door.
    pub(crate) async fn run_direct(&self, item: WorkItem) {
        let job = *item.job;
        let live = item.live;
        match job.state {
            JobState::Running => {}
            JobState::Delivered | JobState::Failed => {
                return self.settle(&job, job.charge_msat.unwrap_or(0)).await
            }
            _ => return tracing::debug!(job = %job.id, state = ?job.state, "nothing to run"),
        }
        if job.door == Door::HttpChat && live.is_none() {
            // Recovered after a restart: the response it was for is gone.
            let reason = "the daemon restarted before the answer was written; nothing was charged";
            return self.fail_direct(&job, None, reason.to_owned()).await;
        }
        if job.result.is_some() {
            // Generated and charged before a restart: settle it as stored.
            return self.finish_direct(job, None, FinishReason::Stop).await;
        }
        let request: HttpRequest = match serde_json::from_str(&job.request) {
            Ok(request) => request,
            Err(e) => {
                let reason = format!(
                    "this service lost the request ({})",
                    Incident::log("stored http request", &e)
                );
                return self.fail_direct(&job, live.as_ref(), reason).await;
            }
        };
        if live.as_ref().is_some_and(|live| live.is_closed()) {
            // The client left before its answer began (it went away while the call waited for
            // a worker): nothing is generated for nobody, and nothing charged.
            let reason = "the client left before the answer began".to_owned();
            return self.fail_direct(&job, None, reason).await;
        }
        let started = Instant::now();
        let (job, generated, budget) = self.generate_paid(job, &request, live.as_ref()).await;
        self.inner.metrics.inference.observe(started.elapsed());
        let generated = match generated {
            Ok(generated) => generated,
            Err(reason) => return self.fail_direct(&job, live.as_ref(), reason).await,
        };
        let inner = &self.inner;
        let usage = generated.usage;
        let finish = generated.finish.map_or(Finish::Left, |finish| {
            Finish::of(finish, usage.completion_tokens, budget)
        });
        let receipt = job.receipt_for(inner.config.rate_card, usage, finish);
        let charge = receipt.charged_msat;
        let invoice = if job.pay_after && charge > 0 {
            self.invoice_pay_after(&job, charge).await
        } else {
            None
        };
        let left = generated.finish.is_none().then(|| {
            format!(
                "the client left after {} completion tokens; charged for those",
                usage.completion_tokens
            )
        });
        let text = generated.text;
        // Durable before the answer ends: the charge must survive whatever the client saw.
        let stored = inner
            .book
            .update_durably(&job, move |stored, _| {
                stored.result = Some(text.clone());
                stored.usage = Some(usage);
                stored.receipt = Some(receipt);
                stored.charge_msat = Some(charge);
                if invoice.is_some() {
                    stored.invoice = invoice.clone();
                }
                stored.reason.clone_from(&left);
                Ok(())
            })
            .await;
        let job = match stored {
            Ok(job) => job,
            Err(e) => {
                // Still `Running` with its hold: recovery fails or reruns it.
                let incident = Incident::log("storing an http result", &e);
                if let Some(live) = &live {
                    let reason = format!("this service cannot record the answer ({incident})");
                    tell(live, LiveEvent::Failed(reason)).await;
                }
                return;
            }
        };
        if finish != Finish::Left {
            self.learn(&job, usage, finish == Finish::Budget);
        }
        tracing::info!(job = %job.id, prompt_tokens = usage.prompt_tokens, completion_tokens = usage.completion_tokens, charge_msat = charge, finish = finish.as_str(), "http job generated");
        let finish = generated.finish.unwrap_or(FinishReason::Stop);
        self.finish_direct(job, live, finish).await;
    }

    /// The end of the answer for an HTTP job whose result and charge are durable, then
    /// `Running -> Delivered -> Settled` (applied), as a relay job's result is published
    /// before it settles. A crash before the settlement is durable leaves the job `Running`
    /// with its result: a `/v1/jobs` job then settles as stored, and a chat completion (its
    /// client gone, delivery unknown) fails with nothing charged.
    async fn finish_direct(&self, job: Job, live: Option<LiveSink>, finish: FinishReason) {
        let charge = job.charge_msat.unwrap_or(0);
        if let Some(live) = live {
            let finished = Finished {
                job: job.clone(),
                finish,
            };
            tell(&live, LiveEvent::Done(Box::new(finished))).await;
        }
        let settled = match self.inner.book.settle_delivered(&job, charge, None).await {
            Ok(settled) => settled,
            Err(e) => return tracing::error!(job = %job.id, error = %e, "cannot settle http job"),
        };
        self.inner.metrics.entered(JobState::Delivered);
        self.settled(&settled);
    }

    /// `Running -> Failed -> Settled` with no charge (the hold goes back to the account), then
    /// say why on the door.
    async fn fail_direct(&self, job: &Job, live: Option<&LiveSink>, reason: String) {
        tracing::warn!(job = %job.id, door = job.door.as_str(), reason = %reason, held_msat = job.held_msat, "http job failed; its hold is released");
        let recorded = reason.clone();
        let failed = self
            .inner
            .book
            .transition(job, JobState::Failed, move |job| {
                job.reason = Some(recorded.clone());
                job.charge_msat = Some(0);
            })
            .await;
        match failed {
            Ok(job) => {
                self.inner.metrics.entered(JobState::Failed);
                self.settle(&job, 0).await;
            }
            Err(e) => tracing::error!(job = %job.id, error = %e, "cannot record failure"),
        }
        if let Some(live) = live {
            let said = format!("{reason}; nothing was charged");
            tell(live, LiveEvent::Failed(said)).await;
        }
    }

    /// Generate what the job's funds pay for. A session's stream that runs dry before
    /// `max_tokens` asks for a top-up and, once one is reserved for it, goes on from the text so
    /// far (the prompt re-read is the service's: counted once). Returns the job as it stands
    /// (its hold may have grown), what was generated, and the completion tokens its final funds
    /// paid for. A later part that fails ends the answer with what was said.
    async fn generate_paid(
        &self,
        mut job: Job,
        request: &HttpRequest,
        live: Option<&LiveSink>,
    ) -> (Job, Result<Generated, String>, Option<u32>) {
        let card = self.inner.config.rate_card;
        let mut said: Option<Generated> = None;
        // A session is not idle while this runs.
        let _call = request.session.map(|session| self.session_call(session));
        let touch = |pipeline: &Self| {
            if let Some(session) = &request.session {
                pipeline.touch(session);
            }
        };
        loop {
            touch(self);
            let budget = job.budget_tokens(&card);
            let done = said.as_ref().map_or(0, |s| s.usage.completion_tokens);
            let mut part = request.clone();
            if let Some(before) = &said {
                part.generation.continue_from = Some(before.text.clone());
                part.max_tokens = request.max_tokens.saturating_sub(done);
            }
            let left = budget.map(|b| b.saturating_sub(done));
            let generated = match (self.generate_live(&part, left, live).await, said.take()) {
                (Ok(more), Some(before)) => before.then(more),
                (Ok(first), None) => first,
                (Err(reason), None) => return (job, Err(reason), budget),
                (Err(reason), Some(before)) => {
                    tracing::warn!(job = %job.id, reason = %reason, "a session call failed after its top-up; it ends with what it said");
                    let before = Generated {
                        finish: Some(FinishReason::Length),
                        ..before
                    };
                    return (job, Ok(before), budget);
                }
            };
            let ran_dry = generated.finish == Some(FinishReason::Length)
                && budget.is_some_and(|b| generated.usage.completion_tokens >= b)
                && generated.usage.completion_tokens < request.max_tokens;
            touch(self);
            let session = match request.session {
                Some(session) if ran_dry => session,
                _ => return (job, Ok(generated), budget),
            };
            job.usage = Some(generated.usage);
            match self
                .await_top_up(&job, session, request.max_tokens, generated.usage, live)
                .await
            {
                Some(mut topped) => {
                    topped.usage = Some(generated.usage);
                    job = topped;
                    said = Some(generated);
                }
                None => return (job, Ok(generated), budget),
            }
        }
    }

    /// Generate at most `budget` completion tokens (what the job's funds pay for) when that is
    /// set, passing each piece to `live` as it comes. A client that went away stops the
    /// generation (the stream is dropped), and the usage is the counted prompt and one token
    /// per piece generated: each piece is at least one token, so this never charges more than
    /// was generated.
    async fn generate_live(
        &self,
        request: &HttpRequest,
        budget: Option<u32>,
        live: Option<&LiveSink>,
    ) -> Result<Generated, String> {
        let max_tokens = budget.map_or(request.max_tokens, |b| b.min(request.max_tokens));
        let inner = &self.inner;
        let timeout = Duration::from_secs(inner.config.job_timeout_secs);
        let run = async {
            let mut stream = inner
                .backend
                .generate(request.generation.clone(), max_tokens)
                .await?;
            let mut text = String::new();
            let mut pieces = 0u32;
            while let Some(event) = stream.next().await {
                match event? {
                    GenerateEvent::Text(piece) => {
                        pieces = pieces.saturating_add(1);
                        text.push_str(&piece);
                        if let Some(live) = live {
                            if !tell(live, LiveEvent::Text(piece)).await {
                                let usage = Usage {
                                    prompt_tokens: request.prompt_tokens,
                                    completion_tokens: pieces,
                                };
                                return Ok(Generated {
                                    text,
                                    usage,
                                    finish: None,
                                });
                            }
                        }
                    }
                    GenerateEvent::Done { usage, finish } => {
                        return Ok(Generated {
                            text,
                            usage,
                            finish: Some(finish),
                        })
                    }
                }
            }
            Err(InferError::Backend(
                "generation stream ended without usage".to_owned(),
            ))
        };
        super::worker::within(timeout, run).await
    }
}

#[cfg(test)]
pub(crate) mod tests;
