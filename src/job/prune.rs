//! Pruning: the records of jobs that ended without money are removed after a retention period.
//!
//! A flood of requests that are refused or never paid would otherwise fill the disk with records
//! nobody needs. A job is pruned when all of these hold:
//! - it is `Rejected`, `Expired` or `Cancelled`, and no money ever touched it (nothing paid,
//!   reserved, held or charged, and no other payer);
//! - it ended (`updated_at`) at least the retention period ago;
//! - for a relay job, its request can no longer be admitted again: intake refuses requests
//!   whose `created_at` is more than `max_request_age_secs` away from now (in the past or in
//!   the future), so once that has passed a copy of the request is dropped as stale and needs
//!   no record to be recognised. The record itself is the tombstone until then, so a retention
//!   shorter than the request age keeps deduplication whole.
//!
//! The job's invoice record (`payments`) stays: a payment hash pays for one thing once, and a
//! late payment of a pruned job's invoice is credited to the account that asked for it, as a
//! late payment of any expired job is.
//!
//! Jobs are keyed by time, so a pass reads only the jobs received since the last pass's
//! checkpoint (the oldest job it could not decide yet), not the whole history.

use serde::Deserialize;

use super::book::{find_job, Book, BookError};
use super::id::JobId;
use super::record::Job;
use super::state::JobState;
use crate::store::{be_u64, job_key, Tree};

/// Where the next pass starts: the `received_at` of the oldest job not yet decided.
const PRUNE_FROM: &[u8] = b"prune_from";
/// Jobs removed per store write.
const BATCH: usize = 256;

/// When a job that ended without money may go.
#[derive(Debug, Clone, Copy)]
pub struct PrunePolicy {
    /// Seconds after it ended.
    pub retention_secs: u64,
    /// Intake's `max_request_age_secs`: how long a copy of a request can still be admitted.
    pub max_request_age_secs: u64,
}

/// What a pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Records read.
    pub scanned: usize,
    /// Records removed.
    pub removed: usize,
}

enum Verdict {
    /// Remove it now.
    Prune,
    /// Not yet (still open, or not ended long enough ago): the next pass must see it again.
    Later,
    /// Never (money touched it): later passes may start after it.
    Keep,
}

fn verdict(job: &Job, now: u64, policy: PrunePolicy) -> Verdict {
    let money = job.paid_msat > 0
        || job.credit_msat > 0
        || job.held_msat > 0
        || job.charge_msat.is_some_and(|c| c > 0)
        || job.payer.is_some();
    if money || job.state == JobState::Settled {
        return Verdict::Keep;
    }
    if !matches!(
        job.state,
        JobState::Rejected | JobState::Expired | JobState::Cancelled
    ) {
        return Verdict::Later;
    }
    if job.updated_at.saturating_add(policy.retention_secs) > now {
        return Verdict::Later;
    }
    if job.door.is_http() {
        // An HTTP job's id is random: nothing can arrive again under it.
        return Verdict::Prune;
    }
    #[derive(Deserialize)]
    struct Dated {
        created_at: u64,
    }
    match serde_json::from_str::<Dated>(&job.request) {
        Ok(request)
            if request
                .created_at
                .saturating_add(policy.max_request_age_secs)
                < now =>
        {
            Verdict::Prune
        }
        // Still admissible (or unreadable): kept, and seen again next pass.
        _ => Verdict::Later,
    }
}

impl Book {
    /// Remove the records of jobs that ended without money (see the module docs). Reads on a
    /// blocking thread, then removes in batches on the store writer, checking each job again
    /// in the write that removes it.
    pub async fn prune_unpaid(&self, now: u64, policy: PrunePolicy) -> Result<Pruned, BookError> {
        let until = now.saturating_sub(policy.retention_secs);
        let (candidates, scanned, next_from) = self
            .store()
            .read(move |r| {
                let from = r
                    .get_raw(Tree::Meta, PRUNE_FROM)?
                    .as_deref()
                    .and_then(be_u64)
                    .unwrap_or(0);
                let (mut candidates, mut scanned, mut first_later) = (Vec::new(), 0, None);
                // Jobs received after `until` ended after it too: none of them is due.
                let range = job_key(from, &[0; 32])..job_key(until.saturating_add(1), &[0; 32]);
                for item in r.scan_range::<Job, _>(Tree::Jobs, range) {
                    let (_, job) = item?;
                    scanned += 1;
                    match verdict(&job, now, policy) {
                        Verdict::Prune => candidates.push(job.id),
                        Verdict::Later => {
                            first_later.get_or_insert(job.received_at);
                        }
                        Verdict::Keep => {}
                    }
                }
                Ok::<_, BookError>((candidates, scanned, first_later.unwrap_or(until)))
            })
            .await?;
        let mut removed = 0;
        for batch in candidates.chunks(BATCH) {
            let batch: Vec<JobId> = batch.to_vec();
            removed += self
                .store()
                .apply(move |tx| {
                    let mut removed = 0;
                    for id in &batch {
                        let Some(job) = find_job(tx, id)? else {
                            continue;
                        };
                        if matches!(verdict(&job, now, policy), Verdict::Prune) {
                            tx.remove(Tree::Jobs, &job_key(job.received_at, id.as_bytes()))?;
                            tx.remove(Tree::JobKeys, id.as_bytes())?;
                            removed += 1;
                        }
                    }
                    Ok::<_, crate::store::TxError<BookError>>(removed)
                })
                .await?;
        }
        self.store()
            .apply(move |tx| {
                tx.put_raw(Tree::Meta, PRUNE_FROM, &next_from.to_be_bytes())?;
                Ok::<_, crate::store::TxError<BookError>>(())
            })
            .await?;
        Ok(Pruned { scanned, removed })
    }
}

#[cfg(test)]
mod tests {
    use nostr_sdk::{EventBuilder, Keys, Kind, Timestamp};

    use super::*;
    use crate::job::book::tests::{balance, book, feedback, invoice, quoted_for, top_up, totals};
    use crate::job::book::Admission;
    use crate::job::invoices::PaymentOutcome;
    use crate::wallet::PaymentHash;

    const DAY: u64 = 24 * 60 * 60;
    const POLICY: PrunePolicy = PrunePolicy {
        retention_secs: DAY,
        max_request_age_secs: 600,
    };

    /// A relay job received at `at` from a request dated `created_at`, moved to `state`.
    async fn ended(book: &Book, keys: &Keys, created_at: u64, at: u64, state: JobState) -> Job {
        let request = EventBuilder::new(Kind::from(5050), format!("{created_at} {at} {state:?}"))
            .custom_created_at(Timestamp::from_secs(created_at))
            .sign_with_keys(keys)
            .expect("sign");
        let job = Job::received(&request, vec![], at);
        assert!(matches!(
            book.admit(&job).await.expect("admit"),
            Admission::New
        ));
        book.update(&job.id, move |j, _| {
            j.state = state;
            j.updated_at = at;
            Ok(())
        })
        .await
        .expect("ended")
    }

    #[tokio::test]
    async fn jobs_that_ended_without_money_go_after_the_retention_and_the_request_age() {
        let (book, keys) = (book(), Keys::generate());
        let t = 1_000_000;
        let old = ended(&book, &keys, t, t, JobState::Rejected).await;
        let expired = ended(&book, &keys, t + 1, t + 1, JobState::Expired).await;
        // Ended long ago, but its request is dated far ahead: a copy could still be admitted
        // until then, so the record stays as the tombstone.
        let future = ended(&book, &keys, t + 3 * DAY, t + 2, JobState::Rejected).await;
        let recent = ended(&book, &keys, t + DAY, t + DAY, JobState::Cancelled).await;
        // A job that money touched stays whatever its state.
        top_up(&book, keys.public_key(), 1, 10_000).await;
        let quoted = quoted_for(&book, &keys, 1_000).await;
        let held = book.spend_credit(&quoted, None).await.expect("reserve");
        assert!(held.held_msat > 0);

        let now = t + DAY + 10;
        let pass = book.prune_unpaid(now, POLICY).await.expect("prune");
        assert_eq!(pass.removed, 2, "{pass:?}");
        for (job, kept) in [
            (&old, false),
            (&expired, false),
            (&future, true),
            (&recent, true),
            (&held, true),
        ] {
            let found = book.get(&job.id).await.expect("get");
            assert_eq!(found.is_some(), kept, "{:?}", job.state);
        }
        // A copy of a pruned request is new again only because intake drops it as stale first.
        let again = Job::received_as(
            &EventBuilder::new(Kind::from(5050), "")
                .sign_with_keys(&keys)
                .expect("sign"),
            old.request.clone(),
            vec![],
            now,
        );
        assert!(matches!(
            book.admit(&Job {
                id: old.id,
                ..again
            })
            .await
            .expect("admit"),
            Admission::New
        ));

        // The next pass starts at the first job it could not decide (the future-dated one).
        let later = book.prune_unpaid(t + 4 * DAY, POLICY).await.expect("prune");
        assert_eq!(
            later.removed, 2,
            "the future-dated and the recent one: {later:?}"
        );
        assert!(
            later.scanned <= 4,
            "the pruned ones are not read again: {later:?}"
        );
        totals(&book).await;
    }

    #[tokio::test]
    async fn a_late_payment_of_a_pruned_jobs_invoice_is_credited() {
        let (book, keys) = (book(), Keys::generate());
        let t = 1_000_000;
        let job = ended(&book, &keys, t, t, JobState::Received).await;
        book.update(&job.id, |j, _| {
            j.state = JobState::Quoted;
            j.quote_msat = Some(4_000);
            Ok(())
        })
        .await
        .expect("quoted");
        book.await_payment(&job, invoice(7, 4_000), &feedback())
            .await
            .expect("await");
        book.transition(&job.id, JobState::Expired, |j| j.updated_at = 1_000_000)
            .await
            .expect("expired");
        let pass = book.prune_unpaid(t + 2 * DAY, POLICY).await.expect("prune");
        assert_eq!(pass.removed, 1, "{pass:?}");
        assert!(book.get(&job.id).await.expect("get").is_none());

        let late = book
            .confirm_payment(&PaymentHash([7; 32]), 4_000)
            .await
            .expect("booked");
        assert!(
            matches!(late, PaymentOutcome::Credited { job: Some(id), .. } if id == job.id),
            "{late:?}"
        );
        assert_eq!(balance(&book, keys.public_key()).await, 4_000);
        assert!(matches!(
            book.confirm_payment(&PaymentHash([7; 32]), 4_000)
                .await
                .expect("again"),
            PaymentOutcome::AlreadyConsumed
        ));
        totals(&book).await;
    }
}
