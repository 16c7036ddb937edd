//! The invoices we issued and the payments booked against them: the other half of the job
//! book. A payment hash pays for one thing once: its record is consumed in the same
//! transaction as the ledger entry and the job's move to `Paid`.

use super::id::JobId;
use crate::ledger::Account;
use serde::{Deserialize, Serialize};

use super::book::{abort, find_job, now, put_job, stored_job, Book, BookError};
use super::holds::post;
use super::record::Job;
use super::state::JobState;
use crate::ledger::{self, Entry, EntryKind};
use crate::store::{be_u64, job_zap_key, open_payment_key, Tree, Tx, TxError, TxFailure};
use crate::wallet::{Invoice, PaymentHash};

/// An invoice we issued and what it pays for. A payment hash pays for one thing once: the
/// `consumed` flag flips in the same transaction as the job becomes `Paid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRecord {
    /// The job this invoice pays for; `None` for a top-up of the account's credit.
    pub job: Option<JobId>,
    /// The account credited with the payment (the job's customer, or the zap's sender).
    pub account: Account,
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
    /// `late_lookup_days` past expiry. Only a successful lookup closes a record, so an
    /// outage of the wallet or of dvmd itself never makes a payment unfindable.
    #[serde(default)]
    pub closed: bool,
    /// Not looked up by the reconciler before this time (unix seconds): the backoff for
    /// invoices past expiry. 0: every pass.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub next_lookup_at: u64,
    /// A zap of a job awaiting its continuation: the continuation invoice this payment
    /// stands in for. It pays the continuation only while the job still waits on that
    /// invoice; later it is credited like any payment of a job that moved on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continues: Option<PaymentHash>,
}

impl PaymentRecord {
    /// The record of `invoice`, just issued: to be booked to `account` (and `job`, if it pays
    /// one) once our wallet confirms it.
    pub fn issued(
        job: Option<JobId>,
        account: Account,
        invoice: &Invoice,
        zap_request: Option<String>,
    ) -> Self {
        Self {
            job,
            account,
            amount_msat: invoice.amount_msat,
            expires_at: invoice.expires_at,
            bolt11: invoice.bolt11.clone(),
            zap_request,
            consumed: false,
            closed: false,
            next_lookup_at: 0,
            continues: None,
        }
    }
}

impl PaymentRecord {
    /// Whether only a credential spends this payment: an L402 or HTTP `Payment` challenge's
    /// invoice, paid into its own token account. Presenting the credential (which holds the
    /// preimage) makes us look the payment up, so the reconciler need not: it looks such an
    /// invoice up once, [`CHALLENGE_LATE_SECS`] past its expiry, for the books, and closes it
    /// then if unpaid. Anyone can ask for a challenge, so an invoice looked up on every pass
    /// and for `late_lookup_days` after would let them buy wallet calls by the thousand.
    pub fn spent_by_credential(&self) -> bool {
        matches!(self.account, Account::Token(_))
            && self.job.is_none()
            && self.zap_request.is_none()
    }
}

/// How long past its expiry a challenge's invoice is looked up (once), and closed if unpaid;
/// an HTLC accepted just before the expiry has settled by then. A payment that still lands
/// later is booked when its hint arrives or its credential is presented.
pub const CHALLENGE_LATE_SECS: u64 = 60;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Inside a transaction: `hash`, stored as `record`, is open: the reconciler looks it up from
/// `record.next_lookup_at`.
pub(super) fn index_open(
    tx: &Tx<'_>,
    hash: &PaymentHash,
    record: &PaymentRecord,
) -> Result<(), TxFailure> {
    let key = open_payment_key(record.next_lookup_at, &hash.0);
    tx.put_raw(Tree::OpenPayments, &key, &[])
}

/// Inside a transaction: `hash`, stored as `record` until now, is no longer open.
pub(super) fn unindex_open(
    tx: &Tx<'_>,
    hash: &PaymentHash,
    record: &PaymentRecord,
) -> Result<(), TxFailure> {
    let key = open_payment_key(record.next_lookup_at, &hash.0);
    tx.remove(Tree::OpenPayments, &key)
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
        account: Account,
        /// The job the invoice was for, if any.
        job: Option<JobId>,
    },
    /// Less than the invoice asked: credited to the customer, the job keeps waiting.
    Underpaid(Box<Job>),
    /// Already booked; nothing changed.
    AlreadyConsumed,
    /// Not a payment hash we issued.
    Unknown,
}

/// Inside a transaction: store the consumed `record`, credit its account, and move its job to
/// `Paid` if the job is waiting and the payment covers the quote.
fn book_consumed(
    tx: &Tx<'_>,
    hash: &PaymentHash,
    record: &PaymentRecord,
    paid_msat: u64,
    at: u64,
) -> Result<PaymentOutcome, TxError<BookError>> {
    let outcome = book_payment(tx, hash, record, paid_msat, at)?;
    // What the account owes for jobs run before they were paid is repaid first, from what is
    // left once the paid job (if any) holds its part. A zap of a job's whole quote gives the
    // job's customer back the credit it reserved: that repays the customer's debt too.
    super::settle::repay_owed_in(tx, &record.account, record.job, at)?;
    if let PaymentOutcome::Paid(job) = &outcome {
        if job.customer != record.account {
            super::settle::repay_owed_in(tx, &job.customer, Some(job.id), at)?;
        }
    }
    Ok(outcome)
}

/// [`book_consumed`] before any debt is repaid.
fn book_payment(
    tx: &Tx<'_>,
    hash: &PaymentHash,
    record: &PaymentRecord,
    paid_msat: u64,
    at: u64,
) -> Result<PaymentOutcome, TxError<BookError>> {
    tx.put(Tree::Payments, &hash.0, record)?;
    let entry = Entry {
        kind: EntryKind::PaymentIn,
        account: record.account,
        msat: paid_msat,
        job: record.job,
        payment_hash: Some(hash.to_hex()),
        at,
    };
    ledger::post(tx, &entry).map_err(|e| e.map_abort(BookError::Ledger))?;
    let credited = PaymentOutcome::Credited {
        account: record.account,
        job: record.job,
    };
    let Some(id) = record.job else {
        return Ok(credited);
    };
    // A job that ended unpaid may have been pruned since: its late payment is credited all
    // the same.
    let Some(mut job) = find_job(tx, &id)? else {
        return Ok(credited);
    };
    if job.continues_on(hash) || record.continues.is_some_and(|c| job.continues_on(&c)) {
        return continue_paid(tx, job, record, paid_msat, at);
    }
    if job.state != JobState::AwaitingPayment {
        return Ok(credited);
    }
    // The invoice may ask only for what the reserved credit does not cover.
    let quote = job.quote_msat.unwrap_or(0);
    if paid_msat < record.amount_msat || paid_msat.saturating_add(job.credit_msat) < quote {
        return Ok(PaymentOutcome::Underpaid(Box::new(job)));
    }
    job.transition(JobState::Paid, at).map_err(abort)?;
    if paid_msat >= quote && job.credit_msat > 0 {
        // Paid in full (someone zapped the whole quote): the reserved credit is not needed.
        post(
            tx,
            EntryKind::Release,
            job.customer,
            job.credit_msat,
            &job,
            at,
        )?;
        job.held_msat -= job.credit_msat.min(job.held_msat);
        job.credit_msat = 0;
    }
    job.paid_msat = paid_msat;
    job.payer = (record.account != job.customer).then_some(record.account);
    // Held for the job from now on, so no other job can spend it before this one settles.
    post(tx, EntryKind::Reserve, record.account, paid_msat, &job, at)?;
    job.held_msat += paid_msat;
    put_job(tx, &job)?;
    Ok(PaymentOutcome::Paid(Box::new(job)))
}

/// Inside a transaction: the continuation of `job` was paid: `AwaitingContinuation -> Paid`,
/// the payment added to what it holds (so it runs on to its `max_tokens`), unless it is short.
fn continue_paid(
    tx: &Tx<'_>,
    mut job: Job,
    record: &PaymentRecord,
    paid_msat: u64,
    at: u64,
) -> Result<PaymentOutcome, TxError<BookError>> {
    if paid_msat < record.amount_msat {
        return Ok(PaymentOutcome::Underpaid(Box::new(job)));
    }
    job.transition(JobState::Paid, at).map_err(abort)?;
    job.paid_msat += paid_msat;
    post(tx, EntryKind::Reserve, record.account, paid_msat, &job, at)?;
    job.held_msat += paid_msat;
    put_job(tx, &job)?;
    Ok(PaymentOutcome::Paid(Box::new(job)))
}

/// The payment an index key names by its last 32 bytes ([`Tree::OpenPayments`],
/// [`Tree::JobZaps`]), if its record is still open.
fn open_record(
    r: &crate::store::Reader<'_>,
    key: &[u8],
) -> Result<Option<(PaymentHash, PaymentRecord)>, crate::store::StoreError> {
    let tail = key.len().saturating_sub(32);
    let Ok(hash) = <[u8; 32]>::try_from(&key[tail..]) else {
        return Ok(None);
    };
    Ok(r.get::<PaymentRecord>(Tree::Payments, &hash)?
        .filter(|record| !record.consumed && !record.closed)
        .map(|record| (PaymentHash(hash), record)))
}

/// `meta` keys of zaps booked whose receipt is owed: this prefix, then the payment hash.
const ZAP_RECEIPT_PREFIX: &[u8] = b"zap_receipt:";

fn zap_receipt_key(hash: &PaymentHash) -> Vec<u8> {
    let mut key = ZAP_RECEIPT_PREFIX.to_vec();
    key.extend_from_slice(&hash.0);
    key
}

impl Book {
    /// Record another invoice we issued (a zap for a job, or a top-up), durably. Only after
    /// this returns may the invoice be handed out. A job-bound invoice is refused unless the
    /// job is waiting for payment (for a zap that [`PaymentRecord::continues`], for that
    /// continuation); a reused hash is refused.
    pub async fn register_invoice(
        &self,
        hash: &PaymentHash,
        record: PaymentRecord,
    ) -> Result<(), BookError> {
        let hash = *hash;
        self.store()
            .commit(move |tx| {
                if let Some(id) = record.job {
                    let job = stored_job(tx, &id)?;
                    let waiting = match record.continues {
                        Some(continuation) => job.continues_on(&continuation),
                        None => job.state == JobState::AwaitingPayment,
                    };
                    if !waiting {
                        return Err(abort(BookError::NotAwaitingPayment(id, job.state)));
                    }
                }
                if tx.contains(Tree::Payments, &hash.0)? {
                    return Err(abort(BookError::PaymentHashReused(hash)));
                }
                tx.put(Tree::Payments, &hash.0, &record)?;
                if !record.consumed && !record.closed {
                    index_open(tx, &hash, &record)?;
                }
                if let (Some(job), Some(_)) = (record.job, &record.zap_request) {
                    tx.put_raw(Tree::JobZaps, &job_zap_key(job.as_bytes(), &hash.0), &[])?;
                }
                Ok(())
            })
            .await
    }

    /// The record of a payment hash we issued.
    pub async fn payment(&self, hash: &PaymentHash) -> Result<Option<PaymentRecord>, BookError> {
        let hash = *hash;
        self.store()
            .read(move |r| Ok(r.get(Tree::Payments, &hash.0)?))
            .await
    }

    /// Every payment hash issued and neither consumed nor closed, expired ones included: some
    /// wallets (LNbits) still accept an expired invoice, and that money must be credited, not
    /// lost. Reads the whole `open_payments` index: for the admin and tests; a reconcile pass
    /// reads only what is due ([`Book::due_payments`]).
    pub async fn open_payments(&self) -> Result<Vec<(PaymentHash, PaymentRecord)>, BookError> {
        self.store()
            .read(|r| {
                let mut open = Vec::new();
                for key in r.keys(Tree::OpenPayments) {
                    if let Some(found) = open_record(r, &key?)? {
                        open.push(found);
                    }
                }
                Ok(open)
            })
            .await
    }

    /// The open payments due a lookup at `now`: every one whose invoice has not expired (a
    /// customer may be paying it right now), then at most `late` of those past expiry, the
    /// longest due first, so a pass asks the wallet a bounded number of times however many
    /// invoices went unpaid, and the rest wait their turn. An invoice is deferred only once it
    /// has expired, so every unexpired one is here (the open-invoice slots are recounted from
    /// them); an expired one not looked up since it was issued is due since its expiry.
    ///
    /// With `challenges_until`, also every challenge's invoice due by then, which its credential
    /// or a hint would otherwise book (see [`PaymentRecord::spent_by_credential`]): for a pass
    /// after hints may have been lost.
    pub async fn due_payments(
        &self,
        now: u64,
        late: usize,
        challenges_until: Option<u64>,
    ) -> Result<Vec<(PaymentHash, PaymentRecord)>, BookError> {
        self.store()
            .read(move |r| {
                let mut due = Vec::new();
                let mut overdue: Vec<(u64, PaymentHash, PaymentRecord)> = Vec::new();
                // Not looked up since issued (due 0): the unexpired, and those expired since.
                let deferred = open_payment_key(1, &[0; 32]);
                for key in r.keys_in(Tree::OpenPayments, ..deferred) {
                    let Some((hash, record)) = open_record(r, &key?)? else {
                        continue;
                    };
                    if record.expires_at < now {
                        overdue.push((record.expires_at, hash, record));
                    } else {
                        due.push((hash, record));
                    }
                }
                // Deferred, in the order they fall due: no more than `late` can be taken.
                let last = open_payment_key(now, &[0xff; 32]);
                for key in r.keys_in(Tree::OpenPayments, deferred..=last).take(late) {
                    let key = key?;
                    let at = key.get(..8).and_then(be_u64).unwrap_or(0);
                    if let Some((hash, record)) = open_record(r, &key)? {
                        overdue.push((at, hash, record));
                    }
                }
                overdue.sort_unstable_by_key(|(at, hash, _)| (*at, hash.0));
                due.extend(
                    overdue
                        .into_iter()
                        .take(late)
                        .map(|(_, hash, record)| (hash, record)),
                );
                if let Some(until) = challenges_until {
                    use std::ops::Bound::{Excluded, Included};
                    let until = open_payment_key(until, &[0xff; 32]);
                    for key in r.keys_in(Tree::OpenPayments, (Excluded(last), Included(until))) {
                        match open_record(r, &key?)? {
                            Some(found) if found.1.spent_by_credential() => due.push(found),
                            _ => {}
                        }
                    }
                }
                Ok(due)
            })
            .await
    }

    /// The zap invoices of `job` still open.
    pub async fn open_zaps_of(
        &self,
        job: &JobId,
    ) -> Result<Vec<(PaymentHash, PaymentRecord)>, BookError> {
        let job = *job;
        self.store()
            .read(move |r| {
                let mut open = Vec::new();
                for key in r.keys_with_prefix_rev(Tree::JobZaps, job.as_bytes()) {
                    open.extend(open_record(r, &key?)?);
                }
                Ok(open)
            })
            .await
    }

    /// Do not look `hash` up in a reconcile pass before `at` (unix seconds).
    pub async fn defer_lookup(&self, hash: &PaymentHash, at: u64) -> Result<(), BookError> {
        let hash = *hash;
        self.store()
            .apply(move |tx| {
                if let Some(mut record) = tx.get::<PaymentRecord>(Tree::Payments, &hash.0)? {
                    if record.consumed || record.closed {
                        return Ok(());
                    }
                    unindex_open(tx, &hash, &record)?;
                    record.next_lookup_at = at;
                    index_open(tx, &hash, &record)?;
                    tx.put(Tree::Payments, &hash.0, &record)?;
                }
                Ok(())
            })
            .await
    }

    /// Stop looking up `hash`: the wallet has just said it is not paid, and it expired more than
    /// `late_lookup_secs` ago. A consumed record is left as it is. Returns whether the record
    /// was closed.
    pub async fn close_payment(
        &self,
        hash: &PaymentHash,
        late_lookup_secs: u64,
    ) -> Result<bool, BookError> {
        let (hash, horizon) = (*hash, now().saturating_sub(late_lookup_secs));
        self.store()
            .apply(move |tx| {
                let Some(mut record) = tx.get::<PaymentRecord>(Tree::Payments, &hash.0)? else {
                    return Ok(false);
                };
                if record.consumed || record.closed || record.expires_at >= horizon {
                    return Ok(false);
                }
                unindex_open(tx, &hash, &record)?;
                record.closed = true;
                tx.put(Tree::Payments, &hash.0, &record)?;
                Ok(true)
            })
            .await
    }

    /// Book a payment our wallet confirmed: consume the hash, credit the customer, and move the
    /// job `AwaitingPayment -> Paid`, all in one transaction.
    ///
    /// Applied, not awaited durable, on purpose: the payment is already durable in the wallet,
    /// and the next side effect that depends on this booking (the result, or the `error` that
    /// credits the customer, settled by [`Book::settle`]) commits first; `processing` is only a
    /// courtesy. The store writer applies writes in order and each flush covers everything
    /// applied before it, so that commit makes this booking durable too; a crash before it
    /// leaves the hash unconsumed, and the reconciler books the same payment again, once. This
    /// keeps an fsync off the path from payment to result.
    pub async fn confirm_payment(
        &self,
        hash: &PaymentHash,
        paid_msat: u64,
    ) -> Result<PaymentOutcome, BookError> {
        let (hash, at) = (*hash, now());
        self.store()
            .apply(move |tx| {
                let Some(mut record) = tx.get::<PaymentRecord>(Tree::Payments, &hash.0)? else {
                    return Ok(PaymentOutcome::Unknown);
                };
                if record.consumed {
                    return Ok(PaymentOutcome::AlreadyConsumed);
                }
                unindex_open(tx, &hash, &record)?;
                record.consumed = true;
                if record.zap_request.is_some() {
                    // Its receipt is owed from this write on (see `zap_receipts_due`).
                    tx.put_raw(Tree::Meta, &zap_receipt_key(&hash), &at.to_be_bytes())?;
                }
                book_consumed(tx, &hash, &record, paid_msat, at)
            })
            .await
    }

    /// The zaps booked whose receipt is not out yet: (payment hash, when it was booked, unix
    /// seconds, the receipt's `created_at`). A zap's booking records that its receipt is owed,
    /// in the same write; publishing it clears that ([`Book::zap_receipt_published`]). A crash
    /// between the two, or relays that refused every attempt, leave it here, and the next start
    /// publishes it: the same event (same `created_at`, so the same id) if it did go out.
    pub async fn zap_receipts_due(&self) -> Result<Vec<(PaymentHash, u64)>, BookError> {
        self.store()
            .read(|r| {
                let mut due = Vec::new();
                for key in r.keys_with_prefix_rev(Tree::Meta, ZAP_RECEIPT_PREFIX) {
                    let key = key?;
                    let Some(hash) = key.get(ZAP_RECEIPT_PREFIX.len()..) else {
                        continue;
                    };
                    let (Ok(hash), Some(at)) = (
                        <[u8; 32]>::try_from(hash),
                        r.get_raw(Tree::Meta, &key)?.as_deref().and_then(be_u64),
                    ) else {
                        continue;
                    };
                    due.push((PaymentHash(hash), at));
                }
                Ok(due)
            })
            .await
    }

    /// When the zap of `hash` was booked, if its receipt is still owed.
    pub async fn zap_receipt_due(&self, hash: &PaymentHash) -> Result<Option<u64>, BookError> {
        let key = zap_receipt_key(hash);
        self.store()
            .read(move |r| Ok(r.get_raw(Tree::Meta, &key)?.as_deref().and_then(be_u64)))
            .await
    }

    /// The receipt of the zap of `hash` is out.
    pub async fn zap_receipt_published(&self, hash: &PaymentHash) -> Result<(), BookError> {
        let key = zap_receipt_key(hash);
        self.store()
            .apply(move |tx| Ok::<_, TxError<BookError>>(tx.remove(Tree::Meta, &key)?))
            .await
    }

    /// Book a payment proven by a zap receipt from the trusted external provider (we never
    /// issued its invoice): record its payment hash as consumed, so the same receipt, or the
    /// same payment offered for another job, books nothing; credit the sender; and, when it
    /// pays a job waiting for at least this much, move the job to `Paid`. One durable
    /// transaction.
    pub async fn confirm_external(
        &self,
        hash: &PaymentHash,
        record: PaymentRecord,
        paid_msat: u64,
    ) -> Result<PaymentOutcome, BookError> {
        let (hash, at) = (*hash, now());
        let record = PaymentRecord {
            consumed: true,
            ..record
        };
        self.store()
            .commit(move |tx| {
                if tx.contains(Tree::Payments, &hash.0)? {
                    return Ok(PaymentOutcome::AlreadyConsumed);
                }
                book_consumed(tx, &hash, &record, paid_msat, at)
            })
            .await
    }
}
