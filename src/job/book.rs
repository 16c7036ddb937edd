//! The job book: job records in sled and the transactions that move a job and its money
//! together.
//!
//! Each money-moving method is one sled transaction over the trees it touches (jobs, payments,
//! accounts, entries) followed by a flush, so a crash leaves either all of it or none of it,
//! and the caller acts only after the method returns.

use std::time::{SystemTime, UNIX_EPOCH};

use nostr_sdk::{EventId, PublicKey};
use serde::{Deserialize, Serialize};
use sled::transaction::{
    ConflictableTransactionError as TxError, TransactionError, TransactionalTree,
};
use sled::Transactional;

use super::record::{Job, JobInvoice};
use super::state::{IllegalTransition, JobState};
use crate::ledger::{self, Entry, EntryKind, LedgerError};
use crate::store::{self, Store, StoreError};
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
    NoJob(EventId),
    /// The job is not waiting for a payment.
    #[error("job {0} is {1:?}, not waiting for payment")]
    NotAwaitingPayment(EventId, JobState),
    /// The wallet issued a payment hash we already hold: refused, or one payment would pay twice.
    #[error("payment hash {0} was already issued")]
    PaymentHashReused(PaymentHash),
}

impl From<sled::Error> for BookError {
    fn from(e: sled::Error) -> Self {
        Self::Store(StoreError::Sled(e))
    }
}

/// An invoice we issued and what it pays for. A payment hash pays for one thing once: the
/// `consumed` flag flips in the same transaction as the job becomes `Paid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRecord {
    /// The job this invoice pays for; `None` for a top-up of the account's credit.
    pub job: Option<EventId>,
    /// The account credited with the payment (the job's customer, or the zap's sender).
    pub account: PublicKey,
    /// Amount asked, msat.
    pub amount_msat: u64,
    /// When the invoice expires (unix seconds).
    pub expires_at: u64,
    /// The invoice (for zap receipts).
    pub bolt11: String,
    /// The zap request this invoice answers, exactly as received: a receipt is published once
    /// the wallet confirms payment.
    pub zap_request: Option<String>,
    /// Whether a confirmed payment was already booked.
    pub consumed: bool,
    /// Whether the reconciler stopped looking: the wallet said "not paid" after
    /// [`LATE_PAYMENT_GRACE_SECS`] past expiry. Only a successful lookup closes a record, so an
    /// outage of the wallet or of dvmd itself never makes a payment unfindable.
    #[serde(default)]
    pub closed: bool,
}

/// How long after expiry an unpaid invoice is still looked up.
pub const LATE_PAYMENT_GRACE_SECS: u64 = 24 * 60 * 60;

/// Result of inserting a newly received job.
#[derive(Debug)]
pub enum Admission {
    /// First sighting: the job is now `Received`.
    New,
    /// Seen before (another relay, a restart): the stored job.
    Duplicate(Box<Job>),
}

/// What a confirmed payment did.
#[derive(Debug, PartialEq)]
pub enum PaymentOutcome {
    /// The job is now `Paid` and may run.
    Paid(Box<Job>),
    /// Credited to the account: a top-up, or a payment for a job that had already ended
    /// (expired, cancelled, or paid by another invoice).
    Credited {
        /// The account credited.
        account: PublicKey,
        /// The job the invoice was for, if any.
        job: Option<EventId>,
    },
    /// Less than the invoice asked: credited to the customer, the job keeps waiting.
    Underpaid(Box<Job>),
    /// Already booked; nothing changed.
    AlreadyConsumed,
    /// Not a payment hash we issued.
    Unknown,
}

/// The job book over a [`Store`].
#[derive(Clone)]
pub struct Book {
    store: Store,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn abort<E: Into<BookError>>(e: E) -> TxError<BookError> {
    TxError::Abort(e.into())
}

fn unwrap_tx(e: TransactionError<BookError>) -> BookError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => BookError::from(e),
    }
}

fn ledger_err(e: TxError<LedgerError>) -> TxError<BookError> {
    match e {
        TxError::Abort(e) => TxError::Abort(BookError::Ledger(e)),
        TxError::Conflict => TxError::Conflict,
        TxError::Storage(e) => TxError::Storage(e),
    }
}

/// Inside a transaction: store the consumed `record`, credit its account, and move its job to
/// `Paid` if the job is waiting and the payment covers the quote.
#[allow(clippy::too_many_arguments)]
fn book_consumed(
    jobs: &TransactionalTree,
    payments: &TransactionalTree,
    accounts: &TransactionalTree,
    entries: &TransactionalTree,
    hash: &PaymentHash,
    record: &PaymentRecord,
    paid_msat: u64,
    seq: u64,
    at: u64,
) -> Result<PaymentOutcome, TxError<BookError>> {
    payments.insert(&hash.0, store::encode("payments", record).map_err(abort)?)?;
    let entry = Entry {
        kind: EntryKind::PaymentIn,
        account: record.account,
        msat: paid_msat,
        job: record.job,
        payment_hash: Some(hash.to_hex()),
        at,
    };
    ledger::post(accounts, entries, seq, &entry).map_err(ledger_err)?;
    let credited = PaymentOutcome::Credited {
        account: record.account,
        job: record.job,
    };
    let Some(id) = record.job else {
        return Ok(credited);
    };
    let raw = jobs
        .get(id.as_bytes())?
        .ok_or_else(|| abort(BookError::NoJob(id)))?;
    let mut job: Job = store::decode("jobs", &raw).map_err(abort)?;
    if job.state != JobState::AwaitingPayment {
        return Ok(credited);
    }
    if paid_msat < record.amount_msat || job.quote_msat.is_some_and(|q| paid_msat < q) {
        return Ok(PaymentOutcome::Underpaid(Box::new(job)));
    }
    job.transition(JobState::Paid, at).map_err(abort)?;
    job.paid_msat = paid_msat;
    job.payer = (record.account != job.customer).then_some(record.account);
    jobs.insert(id.as_bytes(), store::encode("jobs", &job).map_err(abort)?)?;
    Ok(PaymentOutcome::Paid(Box::new(job)))
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
    pub fn admit(&self, job: &Job) -> Result<Admission, BookError> {
        let raw = store::encode("jobs", job)?;
        match self.store.jobs.compare_and_swap(
            job.id.as_bytes(),
            None as Option<&[u8]>,
            Some(raw),
        )? {
            Ok(()) => Ok(Admission::New),
            Err(existing) => match existing.current {
                Some(raw) => Ok(Admission::Duplicate(Box::new(store::decode("jobs", &raw)?))),
                None => Ok(Admission::New),
            },
        }
    }

    /// The job stored under `id`.
    pub fn get(&self, id: &EventId) -> Result<Option<Job>, BookError> {
        match self.store.jobs.get(id.as_bytes())? {
            Some(raw) => Ok(Some(store::decode("jobs", &raw)?)),
            None => Ok(None),
        }
    }

    /// Apply `change` to job `id` atomically and return the new record. `change` may be rerun
    /// on conflict, so it must only modify the job it is given.
    pub fn update<F>(&self, id: &EventId, change: F) -> Result<Job, BookError>
    where
        F: Fn(&mut Job, u64) -> Result<(), BookError>,
    {
        let at = now();
        self.store
            .jobs
            .transaction(|jobs| {
                let raw = jobs
                    .get(id.as_bytes())?
                    .ok_or_else(|| abort(BookError::NoJob(*id)))?;
                let mut job: Job = store::decode("jobs", &raw).map_err(abort)?;
                change(&mut job, at).map_err(TxError::Abort)?;
                jobs.insert(id.as_bytes(), store::encode("jobs", &job).map_err(abort)?)?;
                Ok(job)
            })
            .map_err(unwrap_tx)
    }

    /// Move job `id` to `next` and let `change` fill in fields. Not flushed: the transitions
    /// that allow a money-moving side effect have their own methods, which flush.
    pub fn transition<F>(&self, id: &EventId, next: JobState, change: F) -> Result<Job, BookError>
    where
        F: Fn(&mut Job),
    {
        self.update(id, |job, at| {
            job.transition(next, at)?;
            change(job);
            Ok(())
        })
    }

    /// `Quoted -> AwaitingPayment`: record the invoice, the signed feedback that shows it, and
    /// index its payment hash, then flush. Only after this returns may the invoice be shown.
    pub async fn await_payment(
        &self,
        id: &EventId,
        invoice: JobInvoice,
        feedback: &nostr_sdk::Event,
    ) -> Result<Job, BookError> {
        use nostr_sdk::JsonUtil;
        let at = now();
        let feedback_json = feedback.as_json();
        let store = &self.store;
        let job = (
            &store.jobs,
            &store.payments,
            &store.feedback,
            &store.open_payments,
        )
            .transaction(|(jobs, payments, links, open)| {
                let raw = jobs
                    .get(id.as_bytes())?
                    .ok_or_else(|| abort(BookError::NoJob(*id)))?;
                let mut job: Job = store::decode("jobs", &raw).map_err(abort)?;
                job.transition(JobState::AwaitingPayment, at)
                    .map_err(abort)?;
                job.invoice = Some(invoice.clone());
                job.last_feedback = Some(feedback_json.clone());
                links.insert(feedback.id.as_bytes(), id.as_bytes())?;
                let record = PaymentRecord {
                    job: Some(*id),
                    account: job.customer,
                    amount_msat: invoice.amount_msat,
                    expires_at: invoice.expires_at,
                    bolt11: invoice.bolt11.clone(),
                    zap_request: None,
                    consumed: false,
                    closed: false,
                };
                if payments.get(invoice.payment_hash.0)?.is_some() {
                    // A wallet reusing a payment hash would let one payment pay twice.
                    return Err(abort(BookError::PaymentHashReused(invoice.payment_hash)));
                }
                payments.insert(
                    &invoice.payment_hash.0,
                    store::encode("payments", &record).map_err(abort)?,
                )?;
                open.insert(&invoice.payment_hash.0, &[] as &[u8])?;
                jobs.insert(id.as_bytes(), store::encode("jobs", &job).map_err(abort)?)?;
                Ok(job)
            })
            .map_err(unwrap_tx)?;
        self.store.flush().await?;
        Ok(job)
    }

    /// Record another invoice we issued (a zap for a job, or a top-up), then flush. Only after
    /// this returns may the invoice be handed out. A job-bound invoice is refused unless the
    /// job is waiting for payment; a reused hash is refused.
    pub async fn register_invoice(
        &self,
        hash: &PaymentHash,
        record: PaymentRecord,
    ) -> Result<(), BookError> {
        (
            &self.store.jobs,
            &self.store.payments,
            &self.store.open_payments,
        )
            .transaction(|(jobs, payments, open)| {
                if let Some(id) = record.job {
                    let raw = jobs
                        .get(id.as_bytes())?
                        .ok_or_else(|| abort(BookError::NoJob(id)))?;
                    let job: Job = store::decode("jobs", &raw).map_err(abort)?;
                    if job.state != JobState::AwaitingPayment {
                        return Err(abort(BookError::NotAwaitingPayment(id, job.state)));
                    }
                }
                if payments.get(hash.0)?.is_some() {
                    return Err(abort(BookError::PaymentHashReused(*hash)));
                }
                payments.insert(&hash.0, store::encode("payments", &record).map_err(abort)?)?;
                if !record.consumed && !record.closed {
                    open.insert(&hash.0, &[] as &[u8])?;
                }
                Ok(())
            })
            .map_err(unwrap_tx)?;
        self.store.flush().await?;
        Ok(())
    }

    /// The job a feedback event of ours answers.
    pub fn job_of_feedback(&self, feedback: &EventId) -> Result<Option<EventId>, BookError> {
        Ok(self
            .store
            .feedback
            .get(feedback.as_bytes())?
            .and_then(|raw| EventId::from_slice(&raw).ok()))
    }

    /// The record of a payment hash we issued.
    pub fn payment(&self, hash: &PaymentHash) -> Result<Option<PaymentRecord>, BookError> {
        match self.store.payments.get(hash.0)? {
            Some(raw) => Ok(Some(store::decode("payments", &raw)?)),
            None => Ok(None),
        }
    }

    /// Payment hashes issued and neither consumed nor closed (for the reconciler), expired ones
    /// included: some wallets (LNbits) still accept an expired invoice, and that money must be
    /// credited, not lost. Read from the `open_payments` index.
    pub fn open_payments(&self) -> Result<Vec<(PaymentHash, PaymentRecord)>, BookError> {
        let mut open = Vec::new();
        for item in self.store.open_payments.iter() {
            let (key, _) = item?;
            let Ok(bytes) = <[u8; 32]>::try_from(key.as_ref()) else {
                continue;
            };
            let Some(raw) = self.store.payments.get(bytes)? else {
                continue;
            };
            let record: PaymentRecord = store::decode("payments", &raw)?;
            if !record.consumed && !record.closed {
                open.push((PaymentHash(bytes), record));
            }
        }
        Ok(open)
    }

    /// Stop looking up `hash`: the wallet has just said it is not paid, and it expired more than
    /// [`LATE_PAYMENT_GRACE_SECS`] ago. A consumed record is left as it is. Returns whether the
    /// record was closed.
    pub fn close_payment(&self, hash: &PaymentHash) -> Result<bool, BookError> {
        let horizon = now().saturating_sub(LATE_PAYMENT_GRACE_SECS);
        (&self.store.payments, &self.store.open_payments)
            .transaction(|(payments, open)| {
                let Some(raw) = payments.get(hash.0)? else {
                    return Ok(false);
                };
                let mut record: PaymentRecord = store::decode("payments", &raw).map_err(abort)?;
                if record.consumed || record.closed || record.expires_at >= horizon {
                    return Ok(false);
                }
                record.closed = true;
                payments.insert(&hash.0, store::encode("payments", &record).map_err(abort)?)?;
                open.remove(&hash.0)?;
                Ok(true)
            })
            .map_err(unwrap_tx)
    }

    /// Book a payment our wallet confirmed: consume the hash, credit the customer, and move the
    /// job `AwaitingPayment -> Paid`, all in one transaction.
    ///
    /// Not flushed here, on purpose: the payment is already durable in the wallet, and the next
    /// side effect that depends on this booking (the result, or the `error` that credits the
    /// customer, settled by [`Book::settle`]) flushes first; `processing` is only a courtesy.
    /// sled's log is sequential, so that flush makes this transaction durable too; a crash
    /// before it leaves the hash unconsumed, and the reconciler books the same payment again,
    /// once. This keeps an fsync off the path from payment to result.
    pub async fn confirm_payment(
        &self,
        hash: &PaymentHash,
        paid_msat: u64,
    ) -> Result<PaymentOutcome, BookError> {
        let at = now();
        let seq = self.store.next_id()?;
        let store = &self.store;
        let outcome = (
            &store.jobs,
            &store.payments,
            &store.accounts,
            &store.entries,
            &store.open_payments,
        )
            .transaction(|(jobs, payments, accounts, entries, open)| {
                let Some(raw) = payments.get(hash.0)? else {
                    return Ok(PaymentOutcome::Unknown);
                };
                let mut record: PaymentRecord = store::decode("payments", &raw).map_err(abort)?;
                if record.consumed {
                    return Ok(PaymentOutcome::AlreadyConsumed);
                }
                record.consumed = true;
                open.remove(&hash.0)?;
                book_consumed(
                    jobs, payments, accounts, entries, hash, &record, paid_msat, seq, at,
                )
            })
            .map_err(unwrap_tx)?;
        Ok(outcome)
    }

    /// Book a payment proven by a zap receipt from the trusted external provider (we never
    /// issued its invoice): record its payment hash as consumed, so the same receipt, or the
    /// same payment offered for another job, books nothing; credit the sender; and, when it
    /// pays a job waiting for at least this much, move the job to `Paid`. One transaction.
    pub async fn confirm_external(
        &self,
        hash: &PaymentHash,
        record: PaymentRecord,
        paid_msat: u64,
    ) -> Result<PaymentOutcome, BookError> {
        let at = now();
        let seq = self.store.next_id()?;
        let store = &self.store;
        let outcome = (
            &store.jobs,
            &store.payments,
            &store.accounts,
            &store.entries,
        )
            .transaction(|(jobs, payments, accounts, entries)| {
                if payments.get(hash.0)?.is_some() {
                    return Ok(PaymentOutcome::AlreadyConsumed);
                }
                let record = PaymentRecord {
                    consumed: true,
                    ..record.clone()
                };
                book_consumed(
                    jobs, payments, accounts, entries, hash, &record, paid_msat, seq, at,
                )
            })
            .map_err(unwrap_tx)?;
        self.store.flush().await?;
        Ok(outcome)
    }

    /// `Delivered | Failed -> Settled`: charge what the job cost (at most what was paid) and
    /// leave the rest on the payer's balance (the customer's, unless someone else zapped the
    /// job), in one transaction; then flush.
    pub async fn settle(&self, id: &EventId, charge_msat: u64) -> Result<Job, BookError> {
        let at = now();
        let charge_seq = self.store.next_id()?;
        let refund_seq = self.store.next_id()?;
        let store = &self.store;
        let job = (&store.jobs, &store.accounts, &store.entries)
            .transaction(|(jobs, accounts, entries)| {
                let raw = jobs
                    .get(id.as_bytes())?
                    .ok_or_else(|| abort(BookError::NoJob(*id)))?;
                let mut job: Job = store::decode("jobs", &raw).map_err(abort)?;
                job.transition(JobState::Settled, at).map_err(abort)?;
                let charge = charge_msat.min(job.paid_msat);
                job.charge_msat = Some(charge);
                let mut entry = Entry {
                    kind: EntryKind::Charge,
                    account: job.payer(),
                    msat: charge,
                    job: Some(job.id),
                    payment_hash: None,
                    at,
                };
                if charge > 0 {
                    ledger::post(accounts, entries, charge_seq, &entry).map_err(ledger_err)?;
                }
                let refund = job.paid_msat - charge;
                if refund > 0 {
                    entry.kind = EntryKind::RefundCredit;
                    entry.msat = refund;
                    ledger::post(accounts, entries, refund_seq, &entry).map_err(ledger_err)?;
                }
                jobs.insert(id.as_bytes(), store::encode("jobs", &job).map_err(abort)?)?;
                Ok(job)
            })
            .map_err(unwrap_tx)?;
        self.store.flush().await?;
        Ok(job)
    }

    /// Every job not in a terminal state (for recovery on start).
    pub fn unfinished(&self) -> Result<Vec<Job>, BookError> {
        let mut jobs = Vec::new();
        for item in self.store.jobs.iter() {
            let (_, raw) = item?;
            let job: Job = store::decode("jobs", &raw)?;
            if !job.state.is_terminal() {
                jobs.push(job);
            }
        }
        Ok(jobs)
    }

    /// Every job (for `dvmd jobs` and tests), oldest first.
    pub fn all(&self) -> Result<Vec<Job>, BookError> {
        let mut jobs = Vec::new();
        for item in self.store.jobs.iter() {
            let (_, raw) = item?;
            jobs.push(store::decode::<Job>("jobs", &raw)?);
        }
        jobs.sort_by_key(|job| job.received_at);
        Ok(jobs)
    }
}

#[cfg(test)]
mod tests {
    use nostr_sdk::{EventBuilder, Keys, Kind};

    use super::*;

    fn book() -> Book {
        Book::new(Store::temporary().expect("store"))
    }

    fn quoted_job(book: &Book, quote: u64) -> Job {
        let request = EventBuilder::new(Kind::from(5050), "")
            .sign_with_keys(&Keys::generate())
            .expect("sign");
        let job = Job::received(&request, vec![], now());
        assert!(matches!(book.admit(&job).expect("admit"), Admission::New));
        book.transition(&job.id, JobState::Quoted, |j| j.quote_msat = Some(quote))
            .expect("quoted")
    }

    fn feedback() -> nostr_sdk::Event {
        EventBuilder::new(Kind::from(7000), "")
            .sign_with_keys(&Keys::generate())
            .expect("sign")
    }

    fn invoice(hash: u8, msat: u64) -> JobInvoice {
        JobInvoice {
            bolt11: format!("lnbcrt-test-{hash}"),
            payment_hash: PaymentHash([hash; 32]),
            amount_msat: msat,
            expires_at: now() + 600,
        }
    }

    #[tokio::test]
    async fn old_unpaid_invoices_stay_open_until_a_lookup_closes_them() {
        let book = book();
        let record = |expires_at| PaymentRecord {
            job: None,
            account: Keys::generate().public_key(),
            amount_msat: 1_000,
            expires_at,
            bolt11: String::new(),
            zap_request: None,
            consumed: false,
            closed: false,
        };
        let long_ago = now() - LATE_PAYMENT_GRACE_SECS - 60;
        let (old, recent) = (PaymentHash([1; 32]), PaymentHash([2; 32]));
        book.register_invoice(&old, record(long_ago))
            .await
            .expect("old");
        book.register_invoice(&recent, record(now() - 60))
            .await
            .expect("recent");
        // However long dvmd or the wallet was away, both are still looked up.
        let open: Vec<_> = book
            .open_payments()
            .expect("open")
            .into_iter()
            .map(|(hash, _)| hash)
            .collect();
        assert!(open.contains(&old) && open.contains(&recent));
        // A lookup that says "unpaid" closes only the one past the grace period.
        assert!(book.close_payment(&old).expect("close"));
        assert!(!book.close_payment(&recent).expect("close"));
        let open: Vec<_> = book
            .open_payments()
            .expect("open")
            .into_iter()
            .map(|(hash, _)| hash)
            .collect();
        assert_eq!(open, vec![recent]);
        // A consumed record is never closed.
        let paid = PaymentHash([3; 32]);
        book.register_invoice(&paid, record(long_ago))
            .await
            .expect("paid");
        book.confirm_payment(&paid, 1_000).await.expect("booked");
        assert!(
            book.open_payments()
                .expect("open")
                .iter()
                .all(|(hash, _)| *hash != paid),
            "a booked payment leaves the open index"
        );
        assert!(!book.close_payment(&paid).expect("close"));
        assert!(book.payment(&paid).expect("read").expect("record").consumed);
    }

    #[tokio::test]
    async fn duplicates_are_admitted_once() {
        let book = book();
        let job = quoted_job(&book, 1_000);
        match book
            .admit(&Job {
                state: JobState::Received,
                ..job.clone()
            })
            .expect("admit")
        {
            Admission::Duplicate(stored) => assert_eq!(stored.state, JobState::Quoted),
            Admission::New => panic!("a second sighting must not be new"),
        }
    }

    #[tokio::test]
    async fn a_payment_hash_pays_once() {
        let book = book();
        let job = quoted_job(&book, 5_000);
        book.await_payment(&job.id, invoice(1, 5_000), &feedback())
            .await
            .expect("await");
        let hash = PaymentHash([1; 32]);
        assert!(matches!(
            book.confirm_payment(&hash, 5_000).await.expect("confirm"),
            PaymentOutcome::Paid(_)
        ));
        // A second hint, a replay, the reconciler racing the hint: all book nothing.
        assert_eq!(
            book.confirm_payment(&hash, 5_000).await.expect("confirm"),
            PaymentOutcome::AlreadyConsumed
        );
        assert_eq!(
            book.confirm_payment(&PaymentHash([9; 32]), 5_000)
                .await
                .expect("confirm"),
            PaymentOutcome::Unknown
        );
        let totals = ledger::check(book.store()).expect("ledger");
        assert_eq!(totals.payment_in_msat, 5_000);
        assert_eq!(
            book.get(&job.id).expect("get").expect("job").state,
            JobState::Paid
        );
    }

    #[tokio::test]
    async fn one_invoice_cannot_be_attached_to_two_jobs() {
        let book = book();
        let first = quoted_job(&book, 1_000);
        let second = quoted_job(&book, 1_000);
        book.await_payment(&first.id, invoice(2, 1_000), &feedback())
            .await
            .expect("first");
        let err = book
            .await_payment(&second.id, invoice(2, 1_000), &feedback())
            .await;
        assert!(
            matches!(err, Err(BookError::PaymentHashReused(_))),
            "{err:?}"
        );
        assert_eq!(
            book.get(&second.id).expect("get").expect("job").state,
            JobState::Quoted
        );
        assert_eq!(
            book.payment(&PaymentHash([2; 32]))
                .expect("get")
                .expect("record")
                .job,
            Some(first.id)
        );
    }

    #[tokio::test]
    async fn late_and_short_payments_are_credited_not_lost() {
        let book = book();
        let late = quoted_job(&book, 1_000);
        book.await_payment(&late.id, invoice(3, 1_000), &feedback())
            .await
            .expect("await");
        book.transition(&late.id, JobState::Expired, |_| {})
            .expect("expire");
        assert!(matches!(
            book.confirm_payment(&PaymentHash([3; 32]), 1_000)
                .await
                .expect("confirm"),
            PaymentOutcome::Credited { job: Some(_), .. }
        ));
        assert_eq!(
            book.get(&late.id).expect("get").expect("job").state,
            JobState::Expired
        );

        let short = quoted_job(&book, 2_000);
        book.await_payment(&short.id, invoice(4, 2_000), &feedback())
            .await
            .expect("await");
        assert!(matches!(
            book.confirm_payment(&PaymentHash([4; 32]), 1_500)
                .await
                .expect("confirm"),
            PaymentOutcome::Underpaid(_)
        ));
        assert_eq!(
            book.get(&short.id).expect("get").expect("job").state,
            JobState::AwaitingPayment
        );

        let customer_balance = ledger::balance(book.store(), &late.customer).expect("balance");
        assert_eq!(customer_balance, 1_000);
        let totals = ledger::check(book.store()).expect("ledger");
        assert_eq!(totals.payment_in_msat, 2_500);
        assert_eq!(totals.balances_msat, 2_500);
    }

    #[tokio::test]
    async fn settling_charges_at_most_what_was_paid() {
        let book = book();
        let job = quoted_job(&book, 3_000);
        book.await_payment(&job.id, invoice(5, 3_000), &feedback())
            .await
            .expect("await");
        book.confirm_payment(&PaymentHash([5; 32]), 3_000)
            .await
            .expect("confirm");
        // Settling before the job ran is refused by the transition table.
        assert!(matches!(
            book.settle(&job.id, 1).await,
            Err(BookError::Transition(_))
        ));
        book.transition(&job.id, JobState::Running, |_| {})
            .expect("run");
        book.transition(&job.id, JobState::Delivered, |_| {})
            .expect("deliver");
        let settled = book.settle(&job.id, 9_999).await.expect("settle");
        assert_eq!(settled.charge_msat, Some(3_000));
        // A second settlement of the same job is refused: it is terminal.
        assert!(book.settle(&job.id, 1).await.is_err());
        let totals = ledger::check(book.store()).expect("ledger");
        assert_eq!(totals.charge_msat, 3_000);
        assert_eq!(totals.balances_msat, 0);
    }

    #[tokio::test]
    async fn a_failed_job_leaves_the_payment_as_credit() {
        let book = book();
        let job = quoted_job(&book, 4_000);
        book.await_payment(&job.id, invoice(6, 4_000), &feedback())
            .await
            .expect("await");
        book.confirm_payment(&PaymentHash([6; 32]), 4_000)
            .await
            .expect("confirm");
        book.transition(&job.id, JobState::Running, |_| {})
            .expect("run");
        book.transition(&job.id, JobState::Failed, |_| {})
            .expect("fail");
        book.settle(&job.id, 0).await.expect("settle");
        assert_eq!(
            ledger::balance(book.store(), &job.customer).expect("balance"),
            4_000
        );
        let totals = ledger::check(book.store()).expect("ledger");
        assert_eq!(totals.refund_credit_msat, 4_000);
        assert_eq!(totals.charge_msat, 0);
    }
}
