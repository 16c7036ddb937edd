//! Settlement: a job's hold is released and the exact usage charged (the payment first, then
//! the credit), the change left on the balances it came from; a pay-after job's charge is lent
//! and repaid as far as the balance goes. And the one repayment path: money that comes back
//! onto a balance repays what its account owes first.

use super::book::{abort, now, put_job, stored_job, Book, BookError, JobRef};
use super::holds::post;
use super::id::JobId;
use super::record::Job;
use super::state::JobState;
use crate::ledger::{self, Account, EntryKind};
use crate::store::{Tx, TxError};

impl Book {
    /// `Delivered | Failed -> Settled`: charge what the job cost (at most what was paid) and
    /// leave the rest on the payer's balance (the customer's, unless someone else zapped the
    /// job), in one durable transaction.
    pub async fn settle(&self, job: impl Into<JobRef>, charge_msat: u64) -> Result<Job, BookError> {
        let (lookup, at) = (job.into(), now());
        self.store()
            .commit(move |tx| {
                let mut job = stored_job(tx, lookup)?;
                settle_in(tx, &mut job, charge_msat, at)?;
                Ok(job)
            })
            .await
    }

    /// `Running -> Delivered -> Settled` once a relay acked the stored result, with the
    /// `success` feedback about to be published stored as the latest: one write. Applied, not
    /// awaited durable: the result and its charge were committed before the result was shown,
    /// and a crash before this is durable leaves the job `Running` with that result, which
    /// recovery delivers and settles again the same way.
    pub async fn settle_delivered(
        &self,
        job: impl Into<JobRef>,
        charge_msat: u64,
        feedback: Option<String>,
    ) -> Result<Job, BookError> {
        let (lookup, at) = (job.into(), now());
        self.store()
            .apply(move |tx| {
                let mut job = stored_job(tx, lookup)?;
                job.transition(JobState::Delivered, at).map_err(abort)?;
                if let Some(json) = &feedback {
                    job.last_feedback = Some(json.clone());
                }
                settle_in(tx, &mut job, charge_msat, at)?;
                Ok(job)
            })
            .await
    }
}

/// Inside a transaction: repay what `account` owes (for jobs run before they were paid) from
/// its balance, as far as it goes; when that clears the debt, its npub's tier says so. Called
/// wherever money comes back onto a balance (a payment, a job's change, a payout that failed
/// or spent less fee) and before any leaves it (a payout), so a balance never pays out what
/// its account owes. Returns what is still owed.
pub(super) fn repay_owed_in(
    tx: &Tx<'_>,
    account: &Account,
    job: Option<JobId>,
    at: u64,
) -> Result<u64, TxError<BookError>> {
    let (repaid, owed) =
        ledger::repay_in(tx, account, job, at).map_err(|e| e.map_abort(BookError::Ledger))?;
    if repaid > 0 && owed == 0 {
        if let Some(npub) = account.npub() {
            crate::trust::debt_cleared_in(tx, &npub)?;
        }
    }
    Ok(owed)
}

/// Inside a transaction: `-> Settled`. The charge (at most the job's funds) is taken from the
/// payment first and then from the reserved credit; the holds are released and the change is
/// left on the balances it came from, then the job is stored.
fn settle_in(
    tx: &Tx<'_>,
    job: &mut Job,
    charge_msat: u64,
    at: u64,
) -> Result<(), TxError<BookError>> {
    job.transition(JobState::Settled, at).map_err(abort)?;
    if job.pay_after {
        return settle_pay_after(tx, job, charge_msat, at);
    }
    let mut charge = charge_msat.min(job.funds_msat());
    // Records from before holds (schema 3) hold nothing: their payment is on the payer's
    // balance, where credit jobs may have spent some of it since. Charge no more than is
    // there, so the settlement goes through: the customer never pays twice.
    let payment_held = job.held_msat.saturating_sub(job.credit_msat);
    if payment_held == 0 && job.paid_msat > 0 {
        charge = charge.min(ledger::balance_in(tx, &job.payer())?);
    }
    job.charge_msat = Some(charge);
    let from_payment = charge.min(job.paid_msat);
    let from_credit = charge - from_payment;
    let mut payment = (
        job.payer(),
        payment_held,
        from_payment,
        job.paid_msat - from_payment,
    );
    let credit = (
        job.customer,
        job.credit_msat.min(job.held_msat),
        from_credit,
        job.credit_msat - from_credit,
    );
    let moves = if payment.0 == credit.0 {
        payment.1 += credit.1;
        payment.2 += credit.2;
        payment.3 += credit.3;
        vec![payment]
    } else {
        vec![payment, credit]
    };
    for (account, held, charged, change) in moves {
        post(tx, EntryKind::Release, account, held, job, at)?;
        post(tx, EntryKind::Charge, account, charged, job, at)?;
        post(tx, EntryKind::RefundCredit, account, change, job, at)?;
    }
    job.held_msat = 0;
    // What it paid counts towards the payer's tier, in the same write.
    if let Some(npub) = job.payer().npub() {
        crate::trust::settled_in(tx, &npub, charge, at)?;
    }
    // The change repays what its account owes, if anything.
    repay_owed_in(tx, &job.payer(), Some(job.id), at)?;
    if job.customer != job.payer() {
        repay_owed_in(tx, &job.customer, Some(job.id), at)?;
    }
    put_job(tx, &*job)?;
    Ok(())
}

/// Inside a transaction: settle a pay-after job (it held nothing): its charge, at most its
/// limit, is lent to the customer's balance and taken (`debt`, `charge`), what the balance
/// holds repays it at once (a payment of the result's invoice may have come first), and the
/// rest is owed, from now.
fn settle_pay_after(
    tx: &Tx<'_>,
    job: &mut Job,
    charge_msat: u64,
    at: u64,
) -> Result<(), TxError<BookError>> {
    let charge = charge_msat.min(job.limit_msat());
    job.charge_msat = Some(charge);
    post(tx, EntryKind::Debt, job.customer, charge, job, at)?;
    post(tx, EntryKind::Charge, job.customer, charge, job, at)?;
    let (_, owed) = ledger::repay_in(tx, &job.customer, Some(job.id), at)
        .map_err(|e| e.map_abort(BookError::Ledger))?;
    if let Some(npub) = job.customer.npub() {
        crate::trust::close_pay_after_in(tx, &npub, job.limit_msat(), owed > 0, at)?;
        if owed == 0 {
            crate::trust::debt_cleared_in(tx, &npub)?;
        }
    }
    put_job(tx, &*job)?;
    Ok(())
}
