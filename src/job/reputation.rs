//! What the pipeline tells the world about its customers: a NIP-32 label when an npub's tier
//! changes (see [`crate::trust`]), and the deletion of the label it supersedes.
//!
//! A tier is worked out again after every settlement that charged an npub, and after the
//! operator's `dvmd trust set`. The label is published first and recorded after, so a crash in
//! between publishes it again on the next start (a duplicate label, never a missing one); the
//! superseded label is deleted once the new one is out.

use nostr_sdk::JsonUtil;
use nostr_sdk::PublicKey;

use super::pipeline::{unix_now, Pipeline};
use super::record::Job;
use super::state::JobState;
use crate::trust::labels::Outcome;
use crate::trust::{labels, PublishedLabel, TierChange};

/// Attempts to publish a label (retried with backoff, like feedback).
const LABEL_ATTEMPTS: u32 = 5;

impl Pipeline {
    /// After a settlement: label the job's outcome, and if it charged an npub, work out its
    /// tier again, in the background.
    pub(super) fn note_settlement(&self, job: &Job) {
        self.label_job(job);
        let (Some(npub), true) = (job.payer().npub(), job.charge_msat.unwrap_or(0) > 0) else {
            return;
        };
        // A settlement only promotes: nothing to read for an npub at the top already (or held
        // where it is by the operator).
        if matches!(
            self.inner.trust.tier(&npub),
            crate::trust::Tier::Trusted
                | crate::trust::Tier::Allowlisted
                | crate::trust::Tier::Blocked
        ) {
            return;
        }
        let pipeline = self.clone();
        self.inner.tasks.spawn(async move {
            pipeline.retier(&npub).await;
        });
    }

    /// Publish the label of a relay job that ended (settled, or expired unpaid), in the
    /// background. HTTP jobs have no public events to label.
    pub(super) fn label_job(&self, job: &Job) {
        if !self.inner.trust.policy().publish_job_labels {
            return;
        }
        let (Some((outcome, target)), Some(customer)) = (outcome(job), job.customer.npub()) else {
            return;
        };
        let hash = job
            .invoice
            .as_ref()
            .map(|invoice| invoice.payment_hash.to_string());
        let evidence = match outcome {
            Outcome::Paid | Outcome::Refunded if job.paid_msat > 0 => hash,
            Outcome::Unpaid => hash,
            _ => None,
        };
        let builder = labels::job_label(outcome, &target, &customer, evidence.as_deref());
        let label = self.sign(builder);
        let pipeline = self.clone();
        let id = job.id;
        self.inner.tasks.spawn(async move {
            if let Err(e) = pipeline
                .inner
                .outbox
                .publish(&label, &[], LABEL_ATTEMPTS)
                .await
            {
                tracing::warn!(job = %id, error = %e, "job label not published");
            }
        });
    }

    /// Work out `npub`'s tier from its stored standing and label a change.
    pub(crate) async fn retier(&self, npub: &PublicKey) {
        match self.inner.trust.refresh(npub, unix_now()).await {
            Ok(Some(change)) => self.label(change).await,
            Ok(None) => {}
            Err(e) => tracing::error!(%npub, error = %e, "cannot work out the tier"),
        }
    }

    /// Work out every npub's tier again (time alone promotes: `trusted` needs an age) and
    /// publish every tier label that is not out yet. On start, and hourly.
    pub async fn publish_unlabelled(&self) {
        if let Err(e) = self.inner.trust.reload(unix_now()).await {
            return tracing::error!(error = %e, "cannot read the trust standings");
        }
        match self.inner.trust.unlabelled(unix_now()).await {
            Ok(changes) => {
                for change in changes {
                    self.label(change).await;
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the trust standings"),
        }
    }

    /// Publish the label of a tier change, record it, then delete the one it supersedes.
    pub(crate) async fn label(&self, change: TierChange) {
        let inner = &self.inner;
        tracing::info!(npub = %change.npub, tier = %change.tier, "tier changed");
        if !inner.trust.policy().publish_labels {
            return;
        }
        let after = change
            .superseded
            .as_ref()
            .map_or(0, |old| old.created_at + 1);
        let created_at = unix_now().max(after);
        let builder = labels::tier_label(&change.npub, change.tier, created_at);
        let label = self.sign(builder);
        if let Err(e) = inner.outbox.publish(&label, &[], LABEL_ATTEMPTS).await {
            return tracing::warn!(npub = %change.npub, error = %e, "tier label not published; it goes out on the next start");
        }
        let published = PublishedLabel {
            id: label.id.to_hex(),
            tier: change.tier,
            created_at,
        };
        if let Err(e) = inner.trust.labelled(&change.npub, published).await {
            return tracing::error!(npub = %change.npub, error = %e, "cannot record the tier label");
        }
        tracing::debug!(npub = %change.npub, label = %label.id, json = %label.as_json(), "tier label published");
        let Some(old) = change
            .superseded
            .and_then(|old| nostr_sdk::EventId::from_hex(&old.id).ok())
        else {
            return;
        };
        let deletion = self.sign(labels::deletion(&old, created_at));
        if let Err(e) = inner.outbox.publish(&deletion, &[], LABEL_ATTEMPTS).await {
            tracing::warn!(npub = %change.npub, label = %old, error = %e, "superseded tier label not deleted");
        }
    }
}

/// How a relay job ended and the event its label targets (the result, else the request), or
/// `None` for a job that has not ended, or ended in a way not labelled (rejected, cancelled),
/// or came in over HTTP.
fn outcome(job: &Job) -> Option<(Outcome, nostr_sdk::EventId)> {
    if job.door.is_http() {
        return None;
    }
    let request = nostr_sdk::EventId::from_slice(job.id.as_bytes()).ok()?;
    match job.state {
        JobState::Expired if job.invoice.is_some() => Some((Outcome::Unpaid, request)),
        // A failed job has a reason (it may have a stored result no relay took).
        JobState::Settled if job.reason.is_some() => {
            Some(if job.paid_msat > 0 || job.credit_msat > 0 {
                (Outcome::Refunded, request)
            } else {
                (Outcome::Failed, request)
            })
        }
        JobState::Settled => {
            let target = job
                .result_event
                .as_deref()
                .and_then(result_id)
                .unwrap_or(request);
            if job.charge_msat.unwrap_or(0) > 0 && !job.pay_after {
                Some((Outcome::Paid, target))
            } else {
                Some((Outcome::Delivered, target))
            }
        }
        _ => None,
    }
}

/// The id of a stored result event, read without parsing the rest (its content, and the
/// request it quotes). Stored results are events we signed and parsed before storing them.
fn result_id(json: &str) -> Option<nostr_sdk::EventId> {
    #[derive(serde::Deserialize)]
    struct Id {
        id: nostr_sdk::EventId,
    }
    serde_json::from_str::<Id>(json).ok().map(|event| event.id)
}

#[cfg(test)]
mod tests {
    use nostr_sdk::{EventBuilder, JsonUtil, Keys, Kind};

    use super::*;
    use crate::job::record::{Door, JobInvoice};
    use crate::wallet::PaymentHash;

    #[test]
    fn each_ending_has_its_outcome_and_target() {
        let keys = Keys::generate();
        let request = EventBuilder::new(Kind::from(5050), "")
            .sign_with_keys(&keys)
            .expect("sign");
        let result = EventBuilder::new(Kind::from(6050), "answer")
            .sign_with_keys(&keys)
            .expect("sign");
        let base = Job::received(&request, vec![], 1);
        let ended = |state, f: &dyn Fn(&mut Job)| {
            let mut job = Job {
                state,
                ..base.clone()
            };
            f(&mut job);
            outcome(&job)
        };
        let invoice = JobInvoice {
            bolt11: String::new(),
            payment_hash: PaymentHash([1; 32]),
            amount_msat: 5,
            expires_at: 0,
        };
        let delivered = |job: &mut Job| job.result_event = Some(result.as_json());
        assert_eq!(
            ended(JobState::Settled, &|j| {
                delivered(j);
                j.charge_msat = Some(5);
            }),
            Some((Outcome::Paid, result.id))
        );
        assert_eq!(
            ended(JobState::Settled, &|j| {
                delivered(j);
                j.charge_msat = Some(0);
            }),
            Some((Outcome::Delivered, result.id))
        );
        assert_eq!(
            ended(JobState::Settled, &|j| {
                delivered(j);
                j.reason = Some("no relay took it".into());
                j.paid_msat = 5;
            }),
            Some((Outcome::Refunded, request.id))
        );
        assert_eq!(
            ended(JobState::Settled, &|j| j.reason =
                Some("model failed".into())),
            Some((Outcome::Failed, request.id))
        );
        assert_eq!(
            ended(JobState::Expired, &|j| j.invoice = Some(invoice.clone())),
            Some((Outcome::Unpaid, request.id))
        );
        assert_eq!(ended(JobState::Expired, &|_| {}), None, "never asked");
        assert_eq!(ended(JobState::Rejected, &|_| {}), None);
        assert_eq!(ended(JobState::Running, &|_| {}), None);
        assert_eq!(
            ended(JobState::Settled, &|j| j.door = Door::HttpChat),
            None,
            "HTTP jobs are private"
        );
    }
}
