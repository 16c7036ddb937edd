//! The job book: job records in sled and the transactions that move a job and its money
//! together.
//!
//! Each money-moving method is one sled transaction over the trees it touches (jobs, payments,
//! accounts, entries) followed by a flush, so a crash leaves either all of it or none of it,
//! and the caller acts only after the method returns.

use std::time::{SystemTime, UNIX_EPOCH};

use nostr_sdk::EventId;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError as TxError, TransactionError};
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
    /// The job this invoice pays for.
    pub job: EventId,
    /// Amount asked, msat.
    pub amount_msat: u64,
    /// Whether a confirmed payment was already booked.
    pub consumed: bool,
}

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
    /// The payment arrived after the job ended (expired, cancelled): credited to the customer.
    Credited(Box<Job>),
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

    /// `Quoted -> AwaitingPayment`: record the invoice and index its payment hash, then flush.
    /// Only after this returns may the invoice be shown to the customer.
    pub async fn await_payment(&self, id: &EventId, invoice: JobInvoice) -> Result<Job, BookError> {
        let at = now();
        let record = PaymentRecord {
            job: *id,
            amount_msat: invoice.amount_msat,
            consumed: false,
        };
        let job = (&self.store.jobs, &self.store.payments)
            .transaction(|(jobs, payments)| {
                let raw = jobs
                    .get(id.as_bytes())?
                    .ok_or_else(|| abort(BookError::NoJob(*id)))?;
                let mut job: Job = store::decode("jobs", &raw).map_err(abort)?;
                job.transition(JobState::AwaitingPayment, at)
                    .map_err(abort)?;
                job.invoice = Some(invoice.clone());
                if payments.get(invoice.payment_hash.0)?.is_some() {
                    // A wallet reusing a payment hash would let one payment pay twice.
                    return Err(abort(BookError::PaymentHashReused(invoice.payment_hash)));
                }
                payments.insert(
                    &invoice.payment_hash.0,
                    store::encode("payments", &record).map_err(abort)?,
                )?;
                jobs.insert(id.as_bytes(), store::encode("jobs", &job).map_err(abort)?)?;
                Ok(job)
            })
            .map_err(unwrap_tx)?;
        self.store.flush().await?;
        Ok(job)
    }

    /// The record of a payment hash we issued.
    pub fn payment(&self, hash: &PaymentHash) -> Result<Option<PaymentRecord>, BookError> {
        match self.store.payments.get(hash.0)? {
            Some(raw) => Ok(Some(store::decode("payments", &raw)?)),
            None => Ok(None),
        }
    }

    /// Payment hashes issued and not yet consumed (for the reconciler).
    pub fn open_payments(&self) -> Result<Vec<(PaymentHash, PaymentRecord)>, BookError> {
        let mut open = Vec::new();
        for item in self.store.payments.iter() {
            let (key, raw) = item?;
            let record: PaymentRecord = store::decode("payments", &raw)?;
            if record.consumed {
                continue;
            }
            if let Ok(bytes) = <[u8; 32]>::try_from(key.as_ref()) {
                open.push((PaymentHash(bytes), record));
            }
        }
        Ok(open)
    }

    /// Book a payment our wallet confirmed: consume the hash, credit the customer, and move the
    /// job `AwaitingPayment -> Paid`, all in one transaction; then flush.
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
        )
            .transaction(|(jobs, payments, accounts, entries)| {
                let Some(raw) = payments.get(hash.0)? else {
                    return Ok(PaymentOutcome::Unknown);
                };
                let mut record: PaymentRecord = store::decode("payments", &raw).map_err(abort)?;
                if record.consumed {
                    return Ok(PaymentOutcome::AlreadyConsumed);
                }
                let raw = jobs
                    .get(record.job.as_bytes())?
                    .ok_or_else(|| abort(BookError::NoJob(record.job)))?;
                let mut job: Job = store::decode("jobs", &raw).map_err(abort)?;
                record.consumed = true;
                payments.insert(&hash.0, store::encode("payments", &record).map_err(abort)?)?;
                let entry = Entry {
                    kind: EntryKind::PaymentIn,
                    account: job.customer,
                    msat: paid_msat,
                    job: Some(job.id),
                    payment_hash: Some(hash.to_hex()),
                    at,
                };
                ledger::post(accounts, entries, seq, &entry).map_err(ledger_err)?;
                let outcome = if job.state != JobState::AwaitingPayment {
                    PaymentOutcome::Credited(Box::new(job.clone()))
                } else if paid_msat < record.amount_msat {
                    PaymentOutcome::Underpaid(Box::new(job.clone()))
                } else {
                    job.transition(JobState::Paid, at).map_err(abort)?;
                    job.paid_msat = paid_msat;
                    PaymentOutcome::Paid(Box::new(job.clone()))
                };
                jobs.insert(
                    record.job.as_bytes(),
                    store::encode("jobs", &job).map_err(abort)?,
                )?;
                Ok(outcome)
            })
            .map_err(unwrap_tx)?;
        self.store.flush().await?;
        Ok(outcome)
    }

    /// `Delivered | Failed -> Settled`: charge what the job cost (at most what was paid) and
    /// leave the rest on the customer's balance, in one transaction; then flush.
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
                    account: job.customer,
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
