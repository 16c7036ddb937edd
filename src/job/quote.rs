//! Pricing a received job and getting it paid for: the quote (and every refusal of what could
//! not be delivered), then free jobs start, credit pays what it covers, and an invoice asks
//! for the rest.

use std::time::{Duration, Instant};

use nostr_sdk::Event;

use super::book::BookError;
use super::open_invoices::NoSlot;
use super::pipeline::Pipeline;
use super::record::{Job, JobInvoice};
use super::state::JobState;
use crate::incident::Incident;
use crate::nip90::{self, JobRequest, JobStatus, PaymentAmount, RequestError, TextGeneration};
use crate::pricing::{self, Estimate};
use crate::wallet::{InvoiceDescription, InvoiceRequest};

/// How long quoting may spend asking the backend to count prompt tokens.
const COUNT_TOKENS_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts for `payment-required`: about a minute of retries, well inside the invoice expiry.
const INVOICE_FEEDBACK_ATTEMPTS: u32 = 9;

impl Pipeline {
    /// Quote a received job and ask for payment, or refuse it with an `error` feedback.
    pub(crate) async fn process(&self, job: Job, event: Event, request: JobRequest) {
        let started = Instant::now();
        let estimate = match self.quote(&job, &event, &request).await {
            Ok(estimate) => estimate,
            Err(reason) => return self.reject(&job.id, &event, reason.to_string()).await,
        };
        if estimate.cap_msat == 0 || self.runs_free(&job.customer) {
            return self.start_free(job, &event).await;
        }
        // Quoted here, and stored with the write that follows (see `record::Quote`). A job
        // cancelled meanwhile is refused by that write.
        let mut job = job;
        if let Err(e) = job.transition(JobState::Quoted, super::book::now()) {
            return tracing::error!(job = %job.id, error = %e, "cannot quote");
        }
        job.price_with(estimate, request.bid_msat);
        self.inner.metrics.entered(JobState::Quoted);
        self.ask_payment(job, &event, Some(started)).await;
    }

    /// A free job: `Received -> Quoted -> Running` with its `processing` feedback in one
    /// write (no wallet, nothing to hold), then to the workers, which publish `processing`.
    async fn start_free(&self, job: Job, event: &Event) {
        let processing = nip90::feedback(event, JobStatus::Processing, "generating", None);
        let processing = self.sign(processing);
        let json = crate::event_json::to_json(&processing);
        let started = self
            .inner
            .book
            .update(&job, move |job, at| {
                job.transition(JobState::Quoted, at)?;
                job.quote_msat = Some(0);
                job.transition(JobState::Running, at)?;
                job.last_feedback = Some(json.clone());
                Ok(())
            })
            .await;
        match started {
            Ok(job) => {
                let metrics = &self.inner.metrics;
                metrics.entered(JobState::Quoted);
                metrics.entered(JobState::Running);
                self.enqueue_announced(job, processing).await;
            }
            // Cancelled by the customer while being quoted: nothing more to do.
            Err(BookError::Transition(e)) => {
                tracing::info!(job = %job.id, error = %e, "free job not started")
            }
            Err(e) => tracing::error!(job = %job.id, error = %e, "cannot start free job"),
        }
    }

    /// The estimate for `request`, or why it cannot run. Everything that would make a paid job
    /// undeliverable is refused here, before any invoice: a model we do not run, a prompt and
    /// budget that overflow the context window, a result larger than relays accept.
    async fn quote(
        &self,
        job: &Job,
        event: &Event,
        request: &JobRequest,
    ) -> Result<Estimate, RequestError> {
        let config = &self.inner.config;
        let generation = TextGeneration::from_request(request, &config.limits)?;
        request.may_pay_from_credit(&self.inner.keys.public_key())?;
        self.check_model(&generation)?;
        let bound = nip90::result_size_bound(event, &job.request, generation.max_tokens);
        if bound > config.max_result_bytes {
            return Err(RequestError::ResultTooLarge {
                bound,
                limit: config.max_result_bytes,
            });
        }
        let estimate = self.price(event.kind.as_u16(), &generation).await?;
        if let Some(bid) = request.bid_msat {
            check_bid(bid, &estimate)?;
        }
        Ok(estimate)
    }

    /// The model asked for, if any, must be the one served.
    fn check_model(&self, generation: &TextGeneration) -> Result<(), RequestError> {
        let served = &self.inner.config.model;
        match &generation.request.model {
            Some(asked) if asked != served => Err(RequestError::UnknownModel {
                asked: asked.clone(),
                served: served.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// The estimate for a validated generation of `kind`, whichever door it came in by: the
    /// model must be ours, and the prompt and its budget must fit the context.
    pub(crate) async fn price(
        &self,
        kind: u16,
        generation: &TextGeneration,
    ) -> Result<Estimate, RequestError> {
        let config = &self.inner.config;
        self.check_model(generation)?;
        let counted = tokio::time::timeout(
            COUNT_TOKENS_TIMEOUT,
            self.inner.backend.count_prompt_tokens(&generation.request),
        )
        .await;
        let prompt_tokens = match counted {
            Ok(Ok(Some(n))) => n,
            Ok(Ok(None)) | Err(_) => {
                let bytes = generation
                    .request
                    .messages
                    .iter()
                    .map(|m| m.content.len())
                    .sum();
                pricing::estimate_prompt_tokens(bytes)
            }
            Ok(Err(e)) => {
                return Err(RequestError::Unavailable(
                    Incident::log("counting prompt tokens", &e).to_string(),
                ))
            }
        };
        if u64::from(prompt_tokens) + u64::from(generation.max_tokens)
            > u64::from(config.context_tokens)
        {
            return Err(RequestError::ContextOverflow {
                prompt_tokens,
                max_tokens: generation.max_tokens,
                context_tokens: config.context_tokens,
            });
        }
        Ok(self.estimate(kind, prompt_tokens, generation.max_tokens))
    }

    /// Ask for payment of a `Quoted` job: run it on the customer's credit if that covers the
    /// quote and the request may spend it; otherwise issue an invoice for the rest, persist
    /// it, then show it to the customer.
    pub(crate) async fn ask_payment(&self, job: Job, event: &Event, started: Option<Instant>) {
        let inner = &self.inner;
        let Some(quote) = job.quote_msat else {
            return tracing::error!(job = %job.id, "quoted job without a quote");
        };
        if quote == 0 {
            // Nothing to pay, so no wallet. The workers start only a stored `Quoted` job, so
            // the quote is stored first (already stored for a job recovered `Quoted`).
            let quoted = job.quote();
            let stored = inner
                .book
                .update(&job, move |stored, at| Ok(stored.take_quote(quoted, at)?))
                .await;
            return match stored {
                Ok(job) if job.state == JobState::Quoted => self.enqueue(job, None).await,
                Ok(job) => tracing::info!(job = %job.id, state = ?job.state, "not started"),
                Err(e) => tracing::error!(job = %job.id, error = %e, "cannot record quote"),
            };
        }
        let job = if self.may_pay_after(&job, event) && !self.credit_covers(&job, quote).await {
            match self.start_pay_after(job, event).await {
                Some(job) => job,
                None => return,
            }
        } else {
            job
        };
        let may_spend = JobRequest::parse(event)
            .and_then(|request| request.may_pay_from_credit(&inner.keys.public_key()).ok())
            .unwrap_or(false);
        let job = if may_spend {
            match self.spend_credit(job, event, quote).await {
                Some(job) => job,
                None => return,
            }
        } else {
            job
        };
        let due = quote - job.credit_msat.min(quote);
        let request = InvoiceRequest {
            amount_msat: due,
            description: InvoiceDescription::Memo(format!("dvmd job {}", &job.id.to_hex()[..16])),
            expiry_secs: inner.config.invoice_expiry_secs,
        };
        let customer = job.customer;
        if let Err(full) = self.take_invoice_slot(&customer) {
            let reason = match full {
                NoSlot::Account(open) => format!(
                    "you have {open} unpaid invoices here; pay one or let them expire, then ask again; nothing was charged"
                ),
                NoSlot::Service => "this service has too many unpaid invoices open right now; try again in a few minutes; nothing was charged".to_owned(),
            };
            return self.reject(&job.id, event, reason).await;
        }
        // Released unless the invoice ends up recorded (and then when it is paid or closed).
        let mut slot = Slot {
            pipeline: self,
            account: customer,
            keep: false,
        };
        let invoice = match inner.wallet.create_invoice(request).await {
            Ok(invoice) => invoice,
            Err(e) => {
                let incident = Incident::log("issuing an invoice", &e);
                let reason = format!(
                    "this service cannot issue an invoice right now ({incident}); nothing was charged"
                );
                return self.reject(&job.id, event, reason).await;
            }
        };
        let invoice = JobInvoice {
            bolt11: invoice.bolt11,
            payment_hash: invoice.payment_hash,
            amount_msat: invoice.amount_msat,
            expires_at: invoice.expires_at,
        };
        // The feedback that shows the invoice is signed first and stored with it, so a restart
        // can always show the customer the same invoice again.
        let amount = PaymentAmount {
            msat: invoice.amount_msat,
            bolt11: Some(invoice.bolt11.clone()),
        };
        // The reserved amount is the customer's whole balance here, which stays private: the
        // text does not say it.
        let mut info = if job.credit_msat > 0 {
            format!(
                "pay {} msat to run this job (the rest is reserved from your credit)",
                amount.msat
            )
        } else {
            format!("pay {} msat to run this job", amount.msat)
        };
        if let Some(estimate) = &job.estimate {
            info = format!(
                "{info}; expected {} msat, 90% of such jobs within {} msat ({}% confidence), at most {} msat; what is not used is credited back",
                estimate.p50_msat, estimate.p90_msat, estimate.confidence, estimate.cap_msat
            );
        }
        let feedback = nip90::feedback(event, JobStatus::PaymentRequired, &info, Some(&amount))
            .tag_maybe(job.estimate.as_ref().map(nip90::estimate_tag));
        let feedback = self.sign(feedback);
        let stored = inner.book.await_payment(&job, invoice.clone(), &feedback);
        let job = match stored.await {
            Ok(job) => job,
            // Cancelled by the customer meanwhile: the invoice was never shown, and expires.
            Err(BookError::Transition(e)) => {
                return tracing::info!(job = %job.id, error = %e, "invoice not recorded")
            }
            // Refused rather than left `Quoted` (nothing would ever end it), which releases any
            // credit it reserved. If the store itself failed this fails too, and recovery asks
            // for payment again on the next start.
            Err(e) => {
                let incident = Incident::log("recording an invoice", &e);
                let reason = format!(
                    "this service cannot issue an invoice right now ({incident}); nothing was charged"
                );
                return self.reject(&job.id, event, reason).await;
            }
        };
        slot.keep = true;
        inner.metrics.entered(JobState::AwaitingPayment);
        tracing::info!(job = %job.id, msat = invoice.amount_msat, payment_hash = %invoice.payment_hash, "invoice issued");
        if self
            .publish_feedback(&job, &feedback, INVOICE_FEEDBACK_ATTEMPTS)
            .await
        {
            if let Some(started) = started {
                inner.metrics.request_to_invoice.observe(started.elapsed());
            }
        }
    }

    /// Reserve the customer's credit for `job`. Returns the job still to invoice (with what
    /// credit it reserved), or `None` when the credit covered it and it is queued to run, or
    /// when it ended meanwhile.
    async fn spend_credit(&self, job: Job, event: &Event, quote: u64) -> Option<Job> {
        let inner = &self.inner;
        let info = format!("paid from credit: {quote} msat reserved");
        let processing = self.sign(nip90::feedback(event, JobStatus::Processing, &info, None));
        let spent = inner
            .book
            .spend_credit(&job, Some(crate::event_json::to_json(&processing)))
            .await;
        match spent {
            Ok(job) if job.state == JobState::Running => {
                inner.metrics.entered(JobState::Running);
                inner.metrics.paid_from_credit(quote);
                tracing::info!(job = %job.id, msat = quote, "job paid from credit");
                self.enqueue_announced(job, processing).await;
                None
            }
            Ok(job) => Some(job),
            // Cancelled by the customer meanwhile.
            Err(BookError::Transition(e)) => {
                tracing::info!(job = %job.id, error = %e, "credit not reserved");
                None
            }
            Err(e) => {
                tracing::error!(job = %job.id, error = %e, "cannot reserve credit");
                None
            }
        }
    }
}

/// A bid that cannot pay for the prompt and one completion token is refused, saying what the
/// estimate counts. A bid under the p90 is taken: the job is asked for the bid, and generation
/// stops where the bid runs out.
pub(crate) fn check_bid(bid: u64, estimate: &Estimate) -> Result<(), RequestError> {
    if bid >= estimate.floor_msat {
        return Ok(());
    }
    Err(RequestError::BadParam {
        name: "bid".to_owned(),
        reason: format!(
            "bid {bid} msat is below the least this job can cost, {} msat ({} prompt tokens and one completion token; p50 {} msat, p90 {} msat, cap {} msat for up to {} completion tokens)",
            estimate.floor_msat,
            estimate.prompt_tokens,
            estimate.p50_msat,
            estimate.p90_msat,
            estimate.cap_msat,
            estimate.max_tokens
        ),
    })
}

/// An open-invoice slot taken for a job (see [`super::open_invoices`]): given back when dropped
/// unless the invoice was recorded.
struct Slot<'a> {
    pipeline: &'a Pipeline,
    account: crate::ledger::Account,
    keep: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.keep {
            self.pipeline.release_invoice_slot(&self.account);
        }
    }
}
