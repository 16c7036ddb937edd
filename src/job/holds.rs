//! What a job holds: credit it reserves, the payment it is paid with, and what pays for a call
//! opened on credit. The ledger holds a job's money from the moment it may run until it
//! settles ([`super::settle`]) or ends unpaid, so no other job can spend it.

use super::id::JobId;
use crate::ledger::Account;

use super::book::{abort, find_job, insert_job, now, put_job, stored_job, Book, BookError, JobRef};
use super::record::Job;
use super::state::{IllegalTransition, JobState};
use super::tokens::PaymentChallengeRecord;
use crate::ledger::{self, Entry, EntryKind, LedgerError};
use crate::store::{Tree, Tx, TxError};
use crate::wallet::PaymentHash;

impl Book {
    /// Reserve what the customer's credit can give towards a `Quoted` job's quote (up to the
    /// quote, less what it already reserved), in one transaction with the job (and its quote,
    /// if that is not stored yet: see [`super::record::Quote`]). When the credit
    /// covers the quote the job moves `Quoted -> Running` in the same write, storing
    /// `processing` (the feedback that says so) as its latest; otherwise it stays `Quoted`, and
    /// the invoice asks only for the rest ([`Book::await_payment`]).
    ///
    /// Applied, not awaited durable: nothing is shown before the result, whose commit covers
    /// this write. Transactions run one at a time on the store writer, so two jobs racing for
    /// one balance cannot both reserve it.
    pub async fn spend_credit(
        &self,
        job: &Job,
        processing: Option<String>,
    ) -> Result<Job, BookError> {
        let (lookup, quote, at) = (JobRef::from(job), job.quote(), now());
        self.store()
            .apply(move |tx| {
                let mut job = stored_job(tx, lookup)?;
                job.take_quote(quote, at).map_err(abort)?;
                if job.state != JobState::Quoted {
                    return Err(abort(IllegalTransition {
                        from: job.state,
                        to: JobState::Running,
                    }));
                }
                let quote = job.quote_msat.unwrap_or(0);
                // Up to the job's limit (its cap, within the bid): a job paid from credit
                // runs to its cap, and what it does not use is released when it settles.
                let needed = job.limit_msat().saturating_sub(job.credit_msat);
                let balance = ledger::balance_in(tx, &job.customer)?;
                let take = needed.min(balance);
                if take > 0 {
                    post(tx, EntryKind::Reserve, job.customer, take, &job, at)?;
                    job.credit_msat += take;
                    job.held_msat += take;
                }
                if job.credit_msat >= quote {
                    job.transition(JobState::Running, at).map_err(abort)?;
                    if let Some(json) = &processing {
                        job.last_feedback = Some(json.clone());
                    }
                }
                put_job(tx, &job)?;
                Ok(job)
            })
            .await
    }

    /// Store a new job (an HTTP job, `Received` with its quote) `Running`, with as much of its
    /// account's balance reserved as its limit allows (at least its quote), in one write,
    /// durable before this returns when `durable`. `Ok(Err(balance))` when the balance does not
    /// cover the quote: nothing is stored. Transactions run one at a time on the store writer,
    /// so two calls racing for one balance cannot both reserve it.
    ///
    /// A call paid from an HTTP `Payment` session opens only while the session is open,
    /// checked in the same write: nothing reserves from a session once its close is recorded
    /// (its refund is computed in that write). A call paid by a `charge` credential uses its
    /// challenge in the same write (see [`PaidBy::Charge`]).
    pub async fn open_on_credit(
        &self,
        job: Job,
        durable: bool,
        paid_by: PaidBy,
    ) -> Result<Result<Job, u64>, BookError> {
        let at = now();
        let write = move |tx: &Tx<'_>| {
            let mut job = job.clone();
            if find_job(tx, &job.id)?.is_some() {
                return Err(abort(BookError::JobExists(job.id)));
            }
            let charge = match &paid_by {
                PaidBy::Session(session) => {
                    session_open_in(tx, session)?;
                    None
                }
                PaidBy::Charge(challenge) => Some(unused_challenge_in(tx, challenge)?),
                PaidBy::Balance => None,
            };
            let quote = job.quote_msat.unwrap_or(0);
            let balance = ledger::balance_in(tx, &job.customer)?;
            if balance < quote {
                // Nothing written: the challenge stays unused.
                return Ok(Err(balance));
            }
            if let Some((id, mut challenge)) = charge {
                challenge.used_at = Some(at);
                tx.put(Tree::MppChallenges, id.as_bytes(), &challenge)?;
            }
            let take = balance.min(job.limit_msat().max(quote));
            job.transition(JobState::Quoted, at).map_err(abort)?;
            post(tx, EntryKind::Reserve, job.customer, take, &job, at)?;
            job.credit_msat = take;
            job.held_msat = take;
            job.transition(JobState::Running, at).map_err(abort)?;
            insert_job(tx, &job)?;
            Ok(Ok(job))
        };
        if durable {
            self.store().commit(write).await
        } else {
            self.store().apply(write).await
        }
    }

    /// Reserve more of its account's balance for a `Running` job (an HTTP `Payment` session's
    /// stream that ran dry and was topped up): up to `want_msat`, and only when the balance
    /// has at least `min_msat`. `None` (nothing written) when it has not.
    pub async fn add_hold(
        &self,
        id: &JobId,
        want_msat: u64,
        min_msat: u64,
        session: PaymentHash,
    ) -> Result<Option<Job>, BookError> {
        let (id, at) = (*id, now());
        self.store()
            .apply(move |tx| {
                let mut job = stored_job(tx, &id)?;
                if job.state != JobState::Running {
                    return Ok(None);
                }
                session_open_in(tx, &session)?;
                let take = want_msat.min(ledger::balance_in(tx, &job.customer)?);
                if take == 0 || take < min_msat {
                    return Ok(None);
                }
                post(tx, EntryKind::Reserve, job.customer, take, &job, at)?;
                job.credit_msat += take;
                job.held_msat += take;
                put_job(tx, &job)?;
                Ok(Some(job))
            })
            .await
    }
}

/// What pays for a call opened on credit, beyond the account's balance itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaidBy {
    /// The account's balance alone (an npub's, or an L402 token's).
    Balance,
    /// An open HTTP `Payment` session: the call opens only while it is open.
    Session(PaymentHash),
    /// An HTTP `Payment` `charge` credential (its challenge id), whose payment is booked onto
    /// the account: the challenge is marked used in the write that opens the call, so it pays
    /// for this call only, and a call that does not open (a shortfall, a job that exists, a
    /// crash before the write) leaves it unused for the call made again.
    Charge(String),
}

/// The HTTP `Payment` challenge `id`, unused; refused (`BookError::ChallengeUsed`) if it is
/// used already or unknown. The caller marks it used, in the same write.
fn unused_challenge_in<'a>(
    tx: &Tx<'_>,
    id: &'a str,
) -> Result<(&'a str, PaymentChallengeRecord), TxError<BookError>> {
    let used = || abort(BookError::ChallengeUsed(id.to_owned()));
    let record = tx
        .get::<PaymentChallengeRecord>(Tree::MppChallenges, id.as_bytes())?
        .ok_or_else(used)?;
    if record.used_at.is_some() {
        return Err(used());
    }
    Ok((id, record))
}

/// Refuse (`BookError::SessionClosed`) unless `session` is an open HTTP `Payment` session.
fn session_open_in(tx: &Tx<'_>, session: &PaymentHash) -> Result<(), TxError<BookError>> {
    match tx.get::<super::sessions::SessionRecord>(Tree::Sessions, &session.0)? {
        Some(record) if record.closed.is_none() => Ok(()),
        _ => Err(abort(BookError::SessionClosed(*session))),
    }
}

/// Inside a transaction: post a ledger entry of `msat` (if any) for `job`.
pub(super) fn post(
    tx: &Tx<'_>,
    kind: EntryKind,
    account: Account,
    msat: u64,
    job: &Job,
    at: u64,
) -> Result<(), TxError<BookError>> {
    if msat == 0 {
        return Ok(());
    }
    let entry = Entry {
        kind,
        account,
        msat,
        job: Some(job.id),
        payment_hash: None,
        at,
    };
    ledger::post(tx, &entry).map_err(|e| e.map_abort(BookError::Ledger))
}

/// Inside a transaction: give a job that ends unpaid back what it reserved from credit (a
/// payment is held only once the job is `Paid`, which never ends unpaid).
pub(super) fn release_unpaid(
    tx: &Tx<'_>,
    job: &mut Job,
    at: u64,
) -> Result<(), TxError<BookError>> {
    post(tx, EntryKind::Release, job.customer, job.held_msat, job, at)?;
    job.held_msat = 0;
    job.credit_msat = 0;
    Ok(())
}

/// The ledger invariant ([`ledger::check`]), and that every job's hold in the ledger is what
/// its record says it holds, and nothing for a job that ended: money is never left reserved
/// for a job that can no longer be charged.
pub fn audit(reader: &crate::store::Reader<'_>) -> Result<ledger::Totals, BookError> {
    let totals = ledger::check(reader)?;
    let mut holds = ledger::holds(reader)?;
    for item in reader.scan::<Job>(Tree::Jobs) {
        let (_, job) = item?;
        let held = holds.remove(&job.id).unwrap_or(0);
        let ended = job.state.is_terminal();
        if held != job.held_msat || (ended && held > 0) {
            return Err(LedgerError::Invariant(format!(
                "job {} ({:?}) holds {held} msat in the ledger; its record says {}",
                job.id, job.state, job.held_msat
            ))
            .into());
        }
    }
    if let Some((job, held)) = holds.into_iter().next() {
        return Err(LedgerError::Invariant(format!(
            "{held} msat are held for job {job}, which is not in the book"
        ))
        .into());
    }
    // What is in flight is exactly what the pending payouts booked.
    let mut pending = 0u64;
    for item in reader.scan::<super::payouts::Payout>(Tree::Payouts) {
        let (_, payout) = item?;
        if payout.state == super::payouts::PayoutState::Pending {
            pending = pending.saturating_add(payout.amount_msat + payout.max_fee_msat);
        }
    }
    if pending != totals.in_flight_msat {
        return Err(LedgerError::Invariant(format!(
            "pending payouts book {pending} msat; the ledger has {} msat in flight",
            totals.in_flight_msat
        ))
        .into());
    }
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use nostr_sdk::Keys;

    use super::*;
    use crate::job::book::tests::*;
    use crate::job::invoices::PaymentOutcome;
    use crate::wallet::PaymentHash;

    #[tokio::test]
    async fn a_job_paid_before_holds_settles_within_what_is_left() {
        // Schema 3: the payment is on the balance, the job holds nothing, and credit jobs may
        // have spent part of that balance since the upgrade.
        let (book, alice) = (book(), Keys::generate());
        let job = quoted_for(&book, &alice, 1_000).await;
        let (id, account) = (job.id, alice.public_key());
        book.store()
            .commit(move |tx| {
                let mut job = stored_job(tx, &id)?;
                job.state = JobState::Delivered;
                job.paid_msat = 1_000;
                put_job(tx, &job)?;
                post(tx, EntryKind::PaymentIn, account.into(), 1_000, &job, 0)?;
                post(tx, EntryKind::Charge, account.into(), 600, &job, 0)?;
                Ok::<_, TxError<BookError>>(())
            })
            .await
            .expect("legacy job");
        let settled = book.settle(&id, 800).await.expect("settles");
        assert_eq!(
            settled.charge_msat,
            Some(400),
            "no more than the balance left"
        );
        assert_eq!(balance(&book, account).await, 0);
        totals(&book).await;
    }

    #[tokio::test]
    async fn credit_pays_for_a_job_and_only_the_charge_leaves_it() {
        let (book, alice) = (book(), Keys::generate());
        top_up(&book, alice.public_key(), 1, 5_000).await;
        let job = quoted_for(&book, &alice, 2_000).await;
        let running = book
            .spend_credit(&job, Some("processing".into()))
            .await
            .expect("spend");
        assert_eq!(running.state, JobState::Running);
        assert_eq!((running.credit_msat, running.held_msat), (2_000, 2_000));
        assert_eq!(running.last_feedback.as_deref(), Some("processing"));
        assert_eq!(balance(&book, alice.public_key()).await, 3_000);
        assert_eq!(totals(&book).await.held_msat, 2_000);

        let settled = deliver(&book, &running, 1_200).await;
        assert_eq!(settled.charge_msat, Some(1_200));
        assert_eq!(balance(&book, alice.public_key()).await, 3_800);
        let totals = totals(&book).await;
        assert_eq!((totals.charge_msat, totals.held_msat), (1_200, 0));
    }

    #[tokio::test]
    async fn two_jobs_racing_for_one_balance_cannot_overdraw_it() {
        let (book, alice) = (book(), Keys::generate());
        top_up(&book, alice.public_key(), 1, 3_000).await;
        let first = quoted_for(&book, &alice, 2_000).await;
        let second = quoted_for(&book, &alice, 2_000).await;
        let (a, b) = tokio::join!(
            book.spend_credit(&first, None),
            book.spend_credit(&second, None)
        );
        let (a, b) = (a.expect("first"), b.expect("second"));
        let running = [&a, &b]
            .iter()
            .filter(|j| j.state == JobState::Running)
            .count();
        assert_eq!(running, 1, "only one is covered: {a:?} {b:?}");
        // The other reserved what was left and waits for an invoice for the rest.
        let waiting = if a.state == JobState::Running { &b } else { &a };
        assert_eq!(
            (waiting.state, waiting.credit_msat),
            (JobState::Quoted, 1_000)
        );
        assert_eq!(balance(&book, alice.public_key()).await, 0);
        assert_eq!(totals(&book).await.held_msat, 3_000);
    }

    #[tokio::test]
    async fn a_shortfall_invoice_pays_the_rest_and_the_charge_takes_the_payment_first() {
        let (book, alice) = (book(), Keys::generate());
        top_up(&book, alice.public_key(), 1, 300).await;
        let job = quoted_for(&book, &alice, 1_000).await;
        let job = book.spend_credit(&job, None).await.expect("spend");
        assert_eq!((job.state, job.credit_msat), (JobState::Quoted, 300));
        book.await_payment(&job, invoice(7, 700), &feedback())
            .await
            .expect("await");
        // The invoice asked for the difference: paying it pays the job.
        let outcome = book
            .confirm_payment(&PaymentHash([7; 32]), 700)
            .await
            .expect("confirm");
        let PaymentOutcome::Paid(job) = outcome else {
            panic!("not paid: {outcome:?}");
        };
        assert_eq!(
            (job.paid_msat, job.credit_msat, job.held_msat),
            (700, 300, 1_000)
        );
        let job = book
            .transition(&job.id, JobState::Running, |_| {})
            .await
            .expect("run");
        deliver(&book, &job, 900).await;
        // 700 from the payment, 200 from the credit: 100 of the credit is back.
        assert_eq!(balance(&book, alice.public_key()).await, 100);
        let totals = totals(&book).await;
        assert_eq!((totals.charge_msat, totals.held_msat), (900, 0));
    }

    #[tokio::test]
    async fn credit_reserved_by_a_job_that_ends_unpaid_is_released() {
        let (book, alice) = (book(), Keys::generate());
        top_up(&book, alice.public_key(), 1, 500).await;
        for (n, end) in [(2u8, JobState::Cancelled), (3, JobState::Expired)] {
            let job = quoted_for(&book, &alice, 1_000).await;
            book.spend_credit(&job, None).await.expect("spend");
            book.await_payment(&job, invoice(n, 500), &feedback())
                .await
                .expect("await");
            assert_eq!(balance(&book, alice.public_key()).await, 0);
            let ended = book
                .transition_durably(&job.id, end, |_| {})
                .await
                .expect("end");
            assert_eq!((ended.held_msat, ended.credit_msat), (0, 0));
            assert_eq!(balance(&book, alice.public_key()).await, 500, "{end:?}");
            assert_eq!(totals(&book).await.held_msat, 0);
        }
        // A job refused after reserving (the wallet could not invoice the rest) releases too.
        let job = quoted_for(&book, &alice, 1_000).await;
        book.spend_credit(&job, None).await.expect("spend");
        book.transition_durably(&job.id, JobState::Rejected, |_| {})
            .await
            .expect("reject");
        assert_eq!(balance(&book, alice.public_key()).await, 500);
    }

    #[tokio::test]
    async fn a_payment_of_the_whole_quote_releases_the_reserved_credit() {
        let (book, alice) = (book(), Keys::generate());
        top_up(&book, alice.public_key(), 1, 300).await;
        let job = quoted_for(&book, &alice, 1_000).await;
        book.spend_credit(&job, None).await.expect("spend");
        book.await_payment(&job, invoice(8, 700), &feedback())
            .await
            .expect("await");
        // Someone zaps the whole quote (a provider receipt for this job).
        let bob = Keys::generate().public_key();
        let record = record(Some(job.id), bob, 1_000);
        let outcome = book
            .confirm_external(&PaymentHash([9; 32]), record, 1_000)
            .await
            .expect("confirm");
        let PaymentOutcome::Paid(job) = outcome else {
            panic!("not paid: {outcome:?}");
        };
        assert_eq!((job.credit_msat, job.held_msat), (0, 1_000));
        assert_eq!(balance(&book, alice.public_key()).await, 300);
        let job = book
            .transition(&job.id, JobState::Running, |_| {})
            .await
            .expect("run");
        deliver(&book, &job, 600).await;
        assert_eq!(balance(&book, bob).await, 400, "the payer keeps the change");
        assert_eq!(totals(&book).await.held_msat, 0);
    }
}
