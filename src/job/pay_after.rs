//! Pay-after: a `trusted` (or `allowlisted`) npub's job request that names this service runs
//! before it is paid, within a credit limit (`[trust] trusted_credit_msat`). Over HTTP, the
//! same npub's call that its balance does not cover opens the same way
//! ([`Book::open_pay_after_new`]), and its answer carries the invoice.
//!
//! - Start: `Quoted -> Running` with nothing held, in a write that checks what the npub owes,
//!   plus the limits of its pay-after jobs still running, plus this job's limit, against the
//!   credit, and counts this job's limit as open. Over the credit, the job is invoiced as usual.
//! - Run: held to its limit like any job (its "funds" are what it may owe).
//! - Result: its charge is invoiced (the payment record names the account, not the job, so the
//!   payment credits the account and repays the debt), the invoice goes in the result's `amount`
//!   tag, and the result is stored with it before it is shown.
//! - Settlement (`settle::settle_pay_after`): `debt` and `charge` of the exact usage; what the
//!   balance holds repays it at once; the rest is owed from now, and a `payment-required`
//!   feedback repeats the invoice.
//! - Repayment: any payment into the account repays what it owes first
//!   (`invoices::book_consumed`). A debt unpaid past `[trust] debt_deadline_secs` makes the
//!   npub `new` (no more credit, proof of work and invoices again) until it is paid.

use nostr_sdk::Event;

use super::book::{abort, stored_job, Book, BookError, JobRef};
use super::invoices::PaymentRecord;
use super::pipeline::Pipeline;
use super::record::{Job, JobInvoice};
use super::state::JobState;
use crate::incident::Incident;
use crate::ledger;
use crate::nip90::{self, JobRequest, JobStatus, Targeting};
use crate::trust::Tier;
use crate::wallet::{InvoiceDescription, InvoiceRequest};

impl Book {
    /// `Quoted -> Running` as a pay-after job (with `job`'s quote, if that is not stored yet:
    /// see [`super::record::Quote`]), if the npub's credit has room for its limit (see the
    /// module docs); `Ok(Err(job))` when it has not (nothing written; the job as quoted).
    pub async fn open_pay_after(
        &self,
        job: &Job,
        credit_msat: u64,
        processing: String,
    ) -> Result<Result<Job, Job>, BookError> {
        let (lookup, quote, at) = (JobRef::from(job), job.quote(), super::book::now());
        self.store()
            .commit(move |tx| {
                let mut job = stored_job(tx, lookup)?;
                job.take_quote(quote, at).map_err(abort)?;
                let Some(npub) = job.customer.npub() else {
                    return Ok(Err(job));
                };
                if job.state != JobState::Quoted {
                    return Err(abort(crate::job::IllegalTransition {
                        from: job.state,
                        to: JobState::Running,
                    }));
                }
                if job.held_msat > 0 {
                    // It reserved credit when it was first quoted (a restart asks again, and
                    // the npub may be trusted by now): it pays from that and its invoice the
                    // rest. A pay-after settlement takes no hold, so the credit would stay
                    // reserved for a job that ended.
                    return Ok(Err(job));
                }
                let owed = ledger::owed_in(tx, &job.customer)?;
                let limit = job.limit_msat();
                if !crate::trust::open_pay_after_in(tx, &npub, limit, owed, credit_msat)? {
                    return Ok(Err(job));
                }
                job.transition(JobState::Running, at).map_err(abort)?;
                job.pay_after = true;
                job.last_feedback = Some(processing.clone());
                super::book::put_job(tx, &job)?;
                Ok(Ok(job))
            })
            .await
    }
}

impl Book {
    /// Store a new HTTP job `Running` as a pay-after job, if `credit_msat` has room for its
    /// limit (see the module docs), durable before this returns when `durable`; otherwise
    /// `Ok(Err(balance))` with the account's balance, and nothing is stored.
    pub async fn open_pay_after_new(
        &self,
        job: Job,
        credit_msat: u64,
        durable: bool,
    ) -> Result<Result<Job, u64>, BookError> {
        let at = super::book::now();
        let write = move |tx: &crate::store::Tx<'_>| {
            let mut job = job.clone();
            if super::book::find_job(tx, &job.id)?.is_some() {
                return Err(abort(BookError::JobExists(job.id)));
            }
            let Some(npub) = job.customer.npub() else {
                return Ok(Err(ledger::balance_in(tx, &job.customer)?));
            };
            let owed = ledger::owed_in(tx, &job.customer)?;
            let limit = job.limit_msat();
            if !crate::trust::open_pay_after_in(tx, &npub, limit, owed, credit_msat)? {
                return Ok(Err(ledger::balance_in(tx, &job.customer)?));
            }
            job.transition(JobState::Quoted, at).map_err(abort)?;
            job.transition(JobState::Running, at).map_err(abort)?;
            job.pay_after = true;
            super::book::insert_job(tx, &job)?;
            Ok(Ok(job))
        };
        if durable {
            self.store().commit(write).await
        } else {
            self.store().apply(write).await
        }
    }
}

impl Pipeline {
    /// Whether an HTTP call of `account` short of balance may run before it is paid: pay-after
    /// is on and the account is a `trusted` or `allowlisted` npub (an HTTP call names us by
    /// being made to us).
    pub(super) fn may_pay_after_http(&self, account: &crate::ledger::Account) -> bool {
        let trust = &self.inner.trust;
        trust.policy().trusted_credit_msat > 0
            && account
                .npub()
                .is_some_and(|npub| matches!(trust.tier(&npub), Tier::Trusted | Tier::Allowlisted))
    }

    /// Whether `job` may run before it is paid: pay-after is on, its customer is `trusted` or
    /// `allowlisted`, and the request names this service.
    pub(super) fn may_pay_after(&self, job: &Job, event: &Event) -> bool {
        let trust = &self.inner.trust;
        if trust.policy().trusted_credit_msat == 0 {
            return false;
        }
        let Some(npub) = job.customer.npub() else {
            return false;
        };
        if !matches!(trust.tier(&npub), Tier::Trusted | Tier::Allowlisted) {
            return false;
        }
        JobRequest::parse(event).is_some_and(|request| {
            request.targeting(&self.inner.keys.public_key()) == Targeting::Us
        })
    }

    /// Whether the customer's balance covers `quote` (then the job is paid from credit, not
    /// run on a debt the same balance would repay at once).
    pub(super) async fn credit_covers(&self, job: &Job, quote: u64) -> bool {
        let account = job.customer;
        self.inner
            .book
            .store()
            .read(move |r| ledger::balance(r, &account))
            .await
            .is_ok_and(|balance| balance >= quote)
    }

    /// Start `job` as a pay-after job and queue it. Returns it back when its customer's credit
    /// has no room for it (it is invoiced instead), `None` when it started or ended meanwhile.
    pub(super) async fn start_pay_after(&self, job: Job, event: &Event) -> Option<Job> {
        let inner = &self.inner;
        let info = "running now; the result carries an invoice for what it used";
        let processing = self.sign(nip90::feedback(event, JobStatus::Processing, info, None));
        let credit = inner.trust.policy().trusted_credit_msat;
        match inner
            .book
            .open_pay_after(&job, credit, crate::event_json::to_json(&processing))
            .await
        {
            Ok(Ok(job)) => {
                inner.metrics.entered(JobState::Running);
                tracing::info!(job = %job.id, customer = %job.customer, limit_msat = job.limit_msat(), "job runs before it is paid");
                self.enqueue_announced(job, processing).await;
                None
            }
            Ok(Err(job)) => {
                tracing::info!(job = %job.id, customer = %job.customer, "credit full; invoicing first");
                Some(job)
            }
            Err(BookError::Transition(e)) => {
                tracing::info!(job = %job.id, error = %e, "pay-after not started");
                None
            }
            Err(e) => {
                tracing::error!(job = %job.id, error = %e, "cannot start pay-after job");
                None
            }
        }
    }

    /// The invoice for a pay-after job's charge, recorded (durably) on its customer's account
    /// before it is shown; `None` when the wallet cannot issue one now (the debt stands, and
    /// any payment into the account repays it).
    pub(super) async fn invoice_pay_after(
        &self,
        job: &Job,
        charge_msat: u64,
    ) -> Option<JobInvoice> {
        let inner = &self.inner;
        let request = InvoiceRequest {
            amount_msat: charge_msat,
            description: InvoiceDescription::Memo(format!(
                "dvmd job {} (delivered)",
                &job.id.to_hex()[..16]
            )),
            expiry_secs: inner.trust.policy().thresholds.debt_deadline_secs.max(600),
        };
        let invoice = match inner.wallet.create_invoice(request).await {
            Ok(invoice) => invoice,
            Err(e) => {
                let incident = Incident::log("invoicing a pay-after job", &e);
                tracing::warn!(job = %job.id, %incident, "no invoice for the result; the debt stands");
                return None;
            }
        };
        // On the account, not the job: the payment repays the account's debt.
        let record = PaymentRecord::issued(None, job.customer, &invoice, None);
        if let Err(e) = inner
            .book
            .register_invoice(&invoice.payment_hash, record)
            .await
        {
            tracing::error!(job = %job.id, error = %e, "cannot record the pay-after invoice");
            return None;
        }
        Some(JobInvoice {
            bolt11: invoice.bolt11,
            payment_hash: invoice.payment_hash,
            amount_msat: invoice.amount_msat,
            expires_at: invoice.expires_at,
        })
    }

    /// After a pay-after job settled: say what it owes with its invoice (`payment-required`).
    pub(super) async fn ask_after(&self, job: &Job, event: &Event) {
        let (Some(invoice), Some(charge)) = (&job.invoice, job.charge_msat) else {
            return;
        };
        let owed = self
            .inner
            .book
            .store()
            .read({
                let account = job.customer;
                move |r| ledger::owed(r, &account)
            })
            .await
            .unwrap_or(0);
        if owed == 0 || charge == 0 {
            return;
        }
        let amount = nip90::PaymentAmount {
            msat: invoice.amount_msat,
            bolt11: Some(invoice.bolt11.clone()),
        };
        let info = format!(
            "delivered; pay {} msat for it (you owe {owed} msat in all, due within {} s)",
            invoice.amount_msat,
            self.inner.trust.policy().thresholds.debt_deadline_secs
        );
        let feedback = nip90::feedback(event, JobStatus::PaymentRequired, &info, Some(&amount));
        let feedback = self.sign(feedback);
        self.publish_feedback(job, &feedback, super::pipeline::FEEDBACK_ATTEMPTS)
            .await;
    }
}
