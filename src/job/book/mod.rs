//! The job book: job records in the store and the transactions that move a job and its money
//! together. The records of the invoices we issued, and the bookings of payments, are in
//! [`super::invoices`].
//!
//! Each money-moving method is one store transaction over the trees it touches (jobs,
//! payments, accounts, entries), so a crash leaves either all of it or none of it. Methods whose
//! change allows a side effect (showing an invoice, settling) commit it durably before they
//! return; the rest are applied and become durable with the next group commit.

use std::time::{SystemTime, UNIX_EPOCH};

use super::id::JobId;

use super::invoices::PaymentRecord;
use super::record::{Job, JobInvoice, Quote};
use super::state::{IllegalTransition, JobState};
use crate::ledger::LedgerError;
mod rows;

pub(crate) use rows::read_job;
pub use rows::JobRef;
pub(super) use rows::{find_job, insert_job, put_job};

use crate::store::{Store, StoreError, Tree, Tx, TxError};
use crate::wallet::PaymentHash;

/// Errors of the job book.
#[derive(Debug, thiserror::Error)]
pub enum BookError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The ledger refused.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The transition table refused.
    #[error(transparent)]
    Transition(#[from] IllegalTransition),
    /// No such job.
    #[error("no job {0}")]
    NoJob(JobId),
    /// A new job's id is taken.
    #[error("job {0} already exists")]
    JobExists(JobId),
    /// The job is not waiting for a payment.
    #[error("job {0} is {1:?}, not waiting for payment")]
    NotAwaitingPayment(JobId, JobState),
    /// The wallet issued a payment hash we already hold: refused, or one payment would pay twice.
    #[error("payment hash {0} was already issued")]
    PaymentHashReused(PaymentHash),
    /// A record that should be there is not.
    #[error("missing: {0}")]
    Missing(String),
    /// An HTTP `Payment` session is closed (or gone): nothing more is reserved from it.
    #[error("session {0} is closed")]
    SessionClosed(PaymentHash),
    /// An HTTP `Payment` `charge` challenge has paid for a call already (or is not ours).
    #[error("payment challenge {0} has paid for a call already")]
    ChallengeUsed(String),
}

/// Result of inserting a newly received job.
#[derive(Debug)]
pub enum Admission {
    /// First sighting: the job is now `Received`.
    New,
    /// Seen before (another relay, a restart): the stored job.
    Duplicate(Box<Job>),
}

/// The job book over a [`Store`].
#[derive(Clone)]
pub struct Book {
    store: Store,
}

pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(super) fn abort<E: Into<BookError>>(e: E) -> TxError<BookError> {
    TxError::Abort(e.into())
}

/// Inside a transaction: the job stored under `job`.
pub(super) fn stored_job(tx: &Tx<'_>, job: impl Into<JobRef>) -> Result<Job, TxError<BookError>> {
    let job = job.into();
    find_job(tx, job)?.ok_or_else(|| abort(BookError::NoJob(*job.id())))
}

impl Book {
    /// The book over `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// The store underneath.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Record a first sighting, or return the job already stored under that id.
    pub async fn admit(&self, job: &Job) -> Result<Admission, BookError> {
        let job = job.clone();
        self.store
            .apply(move |tx| {
                if let Some(existing) = find_job(tx, &job.id)? {
                    return Ok(Admission::Duplicate(Box::new(existing)));
                }
                insert_job(tx, &job)?;
                Ok(Admission::New)
            })
            .await
    }

    /// The job stored under `id`.
    pub async fn get(&self, id: &JobId) -> Result<Option<Job>, BookError> {
        let id = *id;
        self.store.read(move |r| Ok(read_job(r, &id)?)).await
    }

    /// Apply `change` to `job` atomically and return the new record. `change` may be rerun
    /// on conflict, so it must only modify the job it is given.
    pub async fn update<F>(&self, job: impl Into<JobRef>, change: F) -> Result<Job, BookError>
    where
        F: Fn(&mut Job, u64) -> Result<(), BookError> + Send + 'static,
    {
        self.change(job.into(), change, false).await
    }

    /// [`Book::update`], durable before it returns: for a change a side effect depends on.
    pub async fn update_durably<F>(
        &self,
        job: impl Into<JobRef>,
        change: F,
    ) -> Result<Job, BookError>
    where
        F: Fn(&mut Job, u64) -> Result<(), BookError> + Send + 'static,
    {
        self.change(job.into(), change, true).await
    }

    async fn change<F>(&self, job: JobRef, change: F, durable: bool) -> Result<Job, BookError>
    where
        F: Fn(&mut Job, u64) -> Result<(), BookError> + Send + 'static,
    {
        let (lookup, at) = (job, now());
        let write = move |tx: &Tx<'_>| {
            let mut job = stored_job(tx, lookup)?;
            change(&mut job, at).map_err(TxError::Abort)?;
            if job.state.is_terminal() && job.state != JobState::Settled {
                // Rejected, expired or cancelled: whatever credit it reserved is spendable again,
                // and repays first what its account owes.
                let released = job.held_msat;
                super::holds::release_unpaid(tx, &mut job, at)?;
                if released > 0 {
                    super::settle::repay_owed_in(tx, &job.customer, None, at)?;
                }
            }
            put_job(tx, &job)?;
            Ok(job)
        };
        if durable {
            self.store.commit(write).await
        } else {
            self.store.apply(write).await
        }
    }

    /// Move `job` to `next` and let `change` fill in fields. Applied, not awaited durable:
    /// the transitions that allow a money-moving side effect have their own methods, which
    /// commit.
    pub async fn transition<F>(
        &self,
        job: impl Into<JobRef>,
        next: JobState,
        change: F,
    ) -> Result<Job, BookError>
    where
        F: Fn(&mut Job) + Send + 'static,
    {
        self.change(job.into(), transition_to(next, change), false)
            .await
    }

    /// [`Book::transition`], durable before it returns (a refusal or an expiry the customer is
    /// about to be told of).
    pub async fn transition_durably<F>(
        &self,
        job: impl Into<JobRef>,
        next: JobState,
        change: F,
    ) -> Result<Job, BookError>
    where
        F: Fn(&mut Job) + Send + 'static,
    {
        self.change(job.into(), transition_to(next, change), true)
            .await
    }

    /// `Quoted -> AwaitingPayment`: record the invoice, the signed feedback that shows it, and
    /// index its payment hash, durably (with `job`'s quote, if that is not stored yet: see
    /// [`super::record::Quote`]). Only after this returns may the invoice be shown.
    pub async fn await_payment(
        &self,
        job: &Job,
        invoice: JobInvoice,
        feedback: &nostr_sdk::Event,
    ) -> Result<Job, BookError> {
        let shown = invoice.clone();
        self.wait_for(
            job.into(),
            job.quote(),
            JobState::AwaitingPayment,
            invoice,
            feedback,
            move |job| {
                job.invoice = Some(shown.clone());
            },
        )
        .await
    }

    /// `Running -> AwaitingContinuation`: a relay job stopped at its budget before it was done.
    /// Record the text so far, its usage, the invoice for the rest and the signed feedback that
    /// shows it, and index its payment hash, durably. Only after this returns may the invoice
    /// be shown. What the job holds stays held.
    pub async fn await_continuation(
        &self,
        job: impl Into<JobRef>,
        said: String,
        usage: crate::infer::Usage,
        invoice: JobInvoice,
        feedback: &nostr_sdk::Event,
    ) -> Result<Job, BookError> {
        let next = JobState::AwaitingContinuation;
        let shown = invoice.clone();
        self.wait_for(job.into(), None, next, invoice, feedback, move |job| {
            job.result = Some(said.clone());
            job.usage = Some(usage);
            job.continuation = Some(shown.clone());
        })
        .await
    }

    /// Move job `id` to `next`, a state that waits for `invoice` shown by `feedback`; let
    /// `change` fill in fields (where the invoice goes among them); record the feedback and
    /// the invoice's payment record, and index its hash as open; durably.
    async fn wait_for(
        &self,
        job: JobRef,
        quote: Option<Quote>,
        next: JobState,
        invoice: JobInvoice,
        feedback: &nostr_sdk::Event,
        change: impl Fn(&mut Job) + Send + 'static,
    ) -> Result<Job, BookError> {
        let (lookup, at) = (job, now());
        let (feedback_id, feedback_json) = (feedback.id, crate::event_json::to_json(feedback));
        self.store
            .commit(move |tx| {
                let mut job = stored_job(tx, lookup)?;
                job.take_quote(quote, at).map_err(abort)?;
                job.transition(next, at).map_err(abort)?;
                change(&mut job);
                if tx.contains(Tree::Payments, &invoice.payment_hash.0)? {
                    // A wallet reusing a payment hash would let one payment pay twice.
                    return Err(abort(BookError::PaymentHashReused(invoice.payment_hash)));
                }
                job.last_feedback = Some(feedback_json.clone());
                let record = PaymentRecord {
                    job: Some(job.id),
                    account: job.payer(),
                    amount_msat: invoice.amount_msat,
                    expires_at: invoice.expires_at,
                    bolt11: invoice.bolt11.clone(),
                    zap_request: None,
                    consumed: false,
                    closed: false,
                    next_lookup_at: 0,
                    continues: None,
                };
                tx.put_raw(Tree::Feedback, feedback_id.as_bytes(), job.id.as_bytes())?;
                tx.put(Tree::Payments, &invoice.payment_hash.0, &record)?;
                super::invoices::index_open(tx, &invoice.payment_hash, &record)?;
                put_job(tx, &job)?;
                Ok(job)
            })
            .await
    }

    /// The job a feedback event of ours answers.
    pub async fn job_of_feedback(
        &self,
        feedback: &nostr_sdk::EventId,
    ) -> Result<Option<JobId>, BookError> {
        let feedback = *feedback;
        self.store
            .read(move |r| {
                Ok(r.get_raw(Tree::Feedback, feedback.as_bytes())?
                    .and_then(|raw| JobId::from_slice(&raw)))
            })
            .await
    }

    /// Every job not in a terminal state (for recovery on start).
    pub async fn unfinished(&self) -> Result<Vec<Job>, BookError> {
        self.store
            .read(|r| {
                let mut jobs = Vec::new();
                for item in r.scan::<Job>(Tree::Jobs) {
                    let (_, job) = item?;
                    if !job.state.is_terminal() {
                        jobs.push(job);
                    }
                }
                Ok(jobs)
            })
            .await
    }

    /// Every job (for `dvmd jobs` and tests), oldest first (the key order).
    pub async fn all(&self) -> Result<Vec<Job>, BookError> {
        self.store.read(all_jobs).await
    }

    /// [`Book::all`] on this thread (command-line tools).
    pub fn all_blocking(&self) -> Result<Vec<Job>, BookError> {
        self.store.read_blocking(all_jobs)
    }
}

/// A change that moves a job to `next` (if the table allows it), then lets `change` fill in
/// fields.
fn transition_to(
    next: JobState,
    change: impl Fn(&mut Job) + Send + 'static,
) -> impl Fn(&mut Job, u64) -> Result<(), BookError> + Send + 'static {
    move |job, at| {
        job.transition(next, at)?;
        change(job);
        Ok(())
    }
}

fn all_jobs(reader: &crate::store::Reader<'_>) -> Result<Vec<Job>, BookError> {
    let mut jobs = Vec::new();
    for item in reader.scan::<Job>(Tree::Jobs) {
        jobs.push(item?.1);
    }
    Ok(jobs)
}

#[cfg(test)]
pub(crate) mod tests;
