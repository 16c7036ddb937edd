//! NIP-90 cancellation: a customer's kind 5 deletion naming its own job requests.

use super::id::JobId;
use super::pipeline::{Pipeline, FEEDBACK_ATTEMPTS};
use super::state::JobState;
use crate::nip90::{self, JobStatus, Verified};

impl Pipeline {
    /// A customer's kind 5 deletion naming its own job requests (NIP-90 cancellation). A job
    /// not yet paid (being quoted, or awaiting payment) becomes `Cancelled` and gets an `error`
    /// feedback saying so, which is also what a duplicate of the request is shown from then
    /// on. A paid job runs anyway: the customer paid for it; one awaiting its continuation ends
    /// with the text so far as its result. A payment that arrives after the
    /// cancellation is credited to the payer, like any late payment. Deletions signed by anyone
    /// else are ignored.
    pub async fn handle_cancellation(&self, deletion: Verified) {
        let pipeline = self.clone();
        self.spawn_intake(async move { pipeline.apply_cancellation(&deletion).await })
            .await;
    }

    /// [`Pipeline::handle_cancellation`], done before it returns.
    pub async fn apply_cancellation(&self, deletion: &Verified) {
        let deletion = deletion.event();
        for id in deletion.tags.event_ids() {
            self.cancel(&JobId::from(*id), &deletion.pubkey).await;
        }
    }

    /// Cancel job `id` at the request of `by`, if it is theirs and not paid yet.
    async fn cancel(&self, id: &JobId, by: &nostr_sdk::PublicKey) {
        let job = match self.inner.book.get(id).await {
            Ok(Some(job)) => job,
            Ok(None) => return,
            Err(e) => return tracing::error!(job = %id, error = %e, "cannot read job"),
        };
        if job.customer != *by {
            return tracing::debug!(job = %id, %by, "cancellation by someone else ignored");
        }
        if job.state == JobState::AwaitingContinuation {
            // Stopped at its budget and asking for more: the text so far is the result.
            return self.give_up_continuation(id, None, "cancelled").await;
        }
        if !job.state.can_become(JobState::Cancelled) {
            return tracing::info!(job = %id, state = ?job.state, "cancellation too late; the job goes on");
        }
        // Durable before the customer is told: from then on a payment is credited, not run.
        let cancelled = self
            .inner
            .book
            .transition_durably(id, JobState::Cancelled, |job| {
                job.reason = Some("cancelled by the customer".to_owned());
            })
            .await;
        let job = match cancelled {
            Ok(job) => job,
            // A payment confirmed in between wins: the job runs.
            Err(e) => return tracing::info!(job = %id, error = %e, "not cancelled"),
        };
        self.inner.metrics.entered(JobState::Cancelled);
        tracing::info!(job = %id, "job cancelled by the customer");
        let Ok(request) = job.request_event() else {
            return;
        };
        let feedback = nip90::feedback(
            &request,
            JobStatus::Error,
            "cancelled at your request; nothing was charged, and a payment made now is credited to your account",
            None,
        );
        self.send_feedback(&job, feedback, FEEDBACK_ATTEMPTS).await;
    }
}
