//! Continuation instead of truncation: a relay job that reaches what it was paid for before it
//! is done is not cut off.
//!
//! A job pays its quote (enough for most such jobs), so some run out before they are done. Such
//! a job goes `Running -> AwaitingContinuation`, with the text so far, its usage and an invoice
//! for the rest of its `max_tokens` stored in one commit; then the customer sees a `partial`
//! feedback with the text so far and a `payment-required` with the invoice. No worker waits:
//! the job holds its payment and nothing else.
//! - Paid (our wallet confirms the hash, `invoices::continue_paid`): `-> Paid`, the payment added
//!   to what it holds, and a worker runs it on from the text so far (the prompt is re-read with
//!   the text so far at its end: the service pays for that re-read; the customer pays for the
//!   prompt once and for every completion token once).
//! - Not paid within `[pricing] continuation_wait_secs` (the invoice's lifetime; the reconciler
//!   gives it up when our wallet calls the invoice unpaid after that), paid short, or cancelled
//!   by the customer: the text so far is the result (`finish` `budget`), charged as generated,
//!   delivered and settled like any result. A payment that arrives later is credited.
//! - Paid, but the continued run fails on the model: the same result (the text so far was
//!   shown, so it is charged), and the continuation's payment comes back as credit.
//!
//! Offered only where asking for more is what the customer would want: a relay job paid by the
//! customer (not zapped by someone else, not run on pay-after credit) whose request sets no
//! `bid` (a bid is the most they pay: their job ends at it, as before).

use nostr_sdk::{Event, JsonUtil, Timestamp};

use super::book::BookError;
use super::id::JobId;
use super::pipeline::{Pipeline, FEEDBACK_ATTEMPTS};
use super::record::{Door, Job, JobInvoice};
use super::state::JobState;
use crate::incident::Incident;
use crate::infer::Usage;
use crate::nip90::{self, JobRequest, JobStatus, PaymentAmount};
use crate::pricing::Finish;
use crate::wallet::{InvoiceDescription, InvoiceRequest, PaymentHash};

impl Pipeline {
    /// Whether `job`, stopped at its budget, may ask for its continuation (see the module).
    pub(super) fn may_continue(&self, job: &Job, event: &Event) -> bool {
        self.inner.config.continuation_wait_secs > 0
            && job.door == Door::Relay
            && !job.pay_after
            && job.payer.is_none()
            && job.quote_msat.is_some_and(|quote| quote > 0)
            && job.estimate.is_some()
            && JobRequest::parse(event).is_some_and(|request| request.bid_msat.is_none())
    }

    /// Ask for the rest of `job`, which stopped at its budget having said `said` (`usage` so
    /// far): invoice what running on to its `max_tokens` costs beyond what it holds, store it
    /// with the text so far (`AwaitingContinuation`), then show both. `false` if it could not
    /// be asked (no invoice slot, the wallet or the store refused): the caller then delivers
    /// the text so far as the result.
    pub(super) async fn offer_continuation(
        &self,
        job: &Job,
        event: &Event,
        said: &str,
        usage: Usage,
    ) -> bool {
        let inner = &self.inner;
        let Some(estimate) = job.estimate else {
            return false;
        };
        let card = inner.config.rate_card;
        let whole = card.charge(Usage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: estimate.max_tokens,
        });
        let due = whole.saturating_sub(job.funds_msat());
        if due == 0 || self.take_invoice_slot(&job.payer()).is_err() {
            return false;
        }
        let wait = inner.config.continuation_wait_secs;
        let request = InvoiceRequest {
            amount_msat: due,
            description: InvoiceDescription::Memo(format!(
                "dvmd job {} continued",
                &job.id.to_hex()[..16]
            )),
            expiry_secs: wait,
        };
        let invoice = match inner.wallet.create_invoice(request).await {
            Ok(invoice) => JobInvoice {
                bolt11: invoice.bolt11,
                payment_hash: invoice.payment_hash,
                amount_msat: invoice.amount_msat,
                expires_at: invoice.expires_at,
            },
            Err(e) => {
                self.release_invoice_slot(&job.payer());
                Incident::log("issuing a continuation invoice", &e);
                return false;
            }
        };
        let left = estimate.max_tokens - usage.completion_tokens;
        let amount = PaymentAmount {
            msat: invoice.amount_msat,
            bolt11: Some(invoice.bolt11.clone()),
        };
        let info = format!(
            "pay {} msat within {wait} s to continue for up to {left} more tokens (the text so far is in the partial feedback); unpaid, the text so far is the result, charged as generated; what is not used is credited back",
            invoice.amount_msat
        );
        let asked = nip90::feedback(event, JobStatus::PaymentRequired, &info, Some(&amount));
        let asked = self.sign(asked);
        // Dated a second before the invoice, so a client that shows the latest status of a
        // job shows the invoice.
        let before = Timestamp::from(asked.created_at.as_secs().saturating_sub(1));
        let partial = self.sign(partial(event, said, usage, left).custom_created_at(before));
        let stored =
            inner
                .book
                .await_continuation(job, said.to_owned(), usage, invoice.clone(), &asked);
        let job = match stored.await {
            Ok(job) => job,
            Err(e) => {
                self.release_invoice_slot(&job.payer());
                tracing::error!(job = %job.id, error = %e, "cannot record the continuation invoice");
                return false;
            }
        };
        inner.metrics.entered(JobState::AwaitingContinuation);
        tracing::info!(job = %job.id, completion_tokens = usage.completion_tokens, msat = invoice.amount_msat, payment_hash = %invoice.payment_hash, "budget reached before the end; continuation offered");
        // Published in a task: the worker moves on at once.
        let pipeline = self.clone();
        inner.tasks.spawn(async move {
            pipeline
                .publish_feedback(&job, &partial, FEEDBACK_ATTEMPTS)
                .await;
            pipeline
                .publish_feedback(&job, &asked, FEEDBACK_ATTEMPTS)
                .await;
        });
        true
    }

    /// Deliver the text so far of job `id` as its result (`finish` `budget`), charged as
    /// generated, if it still awaits its continuation (on the invoice `hash`, if given, and no
    /// zap standing in for that invoice was paid: see [`Pipeline::zap_may_have_paid`]): the
    /// result is signed and stored (durably, before it is shown), then delivered and settled
    /// like any result.
    pub(super) async fn give_up_continuation(
        &self,
        id: &JobId,
        hash: Option<&PaymentHash>,
        why: &str,
    ) {
        let job = match self.inner.book.get(id).await {
            Ok(Some(job))
                if job.state == JobState::AwaitingContinuation
                    && job.result_event.is_none()
                    && hash.is_none_or(|hash| job.continues_on(hash)) =>
            {
                job
            }
            Ok(_) => return,
            Err(e) => return tracing::error!(job = %id, error = %e, "cannot read job"),
        };
        if let Some(hash) = hash {
            // Boxed: booking a zap can give up a continuation in turn (an underpaid one).
            if Box::pin(self.zap_may_have_paid(id, hash)).await {
                return;
            }
        }
        let Ok(event) = job.request_event() else {
            let reason = "this service lost the request".to_owned();
            return self.fail(&job, None, reason).await;
        };
        self.end_with_text_so_far(&job, &event, why).await;
    }

    /// End `job` (awaiting its continuation, or running it) with the text it said before its
    /// budget ran out as the result, charged as generated: used when its continuation is given
    /// up, and when the continued run fails (the text so far was shown and is charged for; the
    /// continuation's payment comes back as credit). Nothing happens if the job moved on
    /// meanwhile (paid, or given up already).
    pub(super) async fn end_with_text_so_far(&self, job: &Job, event: &Event, why: &str) {
        let inner = &self.inner;
        let said = job.result.clone().unwrap_or_default();
        let usage = job.usage.unwrap_or_default();
        let receipt = job.receipt_for(inner.config.rate_card, usage, Finish::Budget);
        let charge = receipt.charged_msat;
        let result = self.sign(nip90::result(event, &said, Some(&receipt), None));
        let json = crate::event_json::to_json(&result);
        let (state, waited) = (job.state, job.continuation.clone());
        let stored = inner.book.update_durably(job, move |stored, _| {
            // Paid meanwhile (or its continuation stopped at its budget again): it goes on.
            if stored.state != state
                || stored.result_event.is_some()
                || stored.continuation != waited
            {
                return Err(BookError::NotAwaitingPayment(stored.id, stored.state));
            }
            stored.result_event = Some(json.clone());
            stored.charge_msat = Some(charge);
            stored.result = None;
            Ok(())
        });
        let job = match stored.await {
            Ok(job) => job,
            Err(e) => {
                return tracing::info!(job = %job.id, error = %e, "not ended with the text so far")
            }
        };
        tracing::info!(job = %job.id, why, completion_tokens = usage.completion_tokens, charge_msat = charge, "the text so far is the result");
        inner.metrics.continuation_given_up();
        self.learn(&job, usage, true);
        self.deliver(job, event.clone(), result);
    }

    /// Show the text so far of `job`, awaiting its continuation, again (after a restart: the
    /// `partial` feedback may never have gone out; it is signed anew, the text is the same).
    pub(super) async fn show_partial(&self, job: &Job, event: &Event) {
        let (Some(said), Some(usage), Some(estimate)) = (&job.result, job.usage, job.estimate)
        else {
            return;
        };
        let left = estimate.max_tokens.saturating_sub(usage.completion_tokens);
        // Dated before the stored invoice it is shown with, as when it was first shown.
        let asked_at = job
            .last_feedback
            .as_deref()
            .and_then(|json| Event::from_json(json).ok())
            .map_or(Timestamp::now(), |asked| asked.created_at);
        let before = Timestamp::from(asked_at.as_secs().saturating_sub(1));
        let partial = partial(event, said, usage, left).custom_created_at(before);
        let partial = self.sign(partial);
        self.publish_feedback(job, &partial, FEEDBACK_ATTEMPTS)
            .await;
    }
}

/// The `partial` feedback of a job that said `said` (`usage` so far) and may say `left` more
/// tokens.
fn partial(event: &Event, said: &str, usage: Usage, left: u32) -> crate::signatures::Draft {
    nip90::partial(
        event,
        said,
        &format!(
            "stopped at the {} tokens paid for; {left} more may follow",
            usage.completion_tokens
        ),
    )
}
