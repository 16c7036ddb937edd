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
use crate::trust::{labels, PublishedLabel, TierChange};

/// Attempts to publish a label (retried with backoff, like feedback).
const LABEL_ATTEMPTS: u32 = 5;

impl Pipeline {
    /// After a settlement: if it charged an npub, work out its tier again, in the background.
    pub(super) fn note_settlement(&self, job: &Job) {
        let (Some(npub), true) = (job.payer().npub(), job.charge_msat.unwrap_or(0) > 0) else {
            return;
        };
        let pipeline = self.clone();
        self.inner.tasks.spawn(async move {
            pipeline.retier(&npub).await;
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

    /// Publish every tier label that is not out yet (on start).
    pub async fn publish_unlabelled(&self) {
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
        let Some(label) = self.sign(change.npub, builder) else {
            return;
        };
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
        if let Some(deletion) = self.sign(change.npub, labels::deletion(&old, created_at)) {
            if let Err(e) = inner.outbox.publish(&deletion, &[], LABEL_ATTEMPTS).await {
                tracing::warn!(npub = %change.npub, label = %old, error = %e, "superseded tier label not deleted");
            }
        }
    }
}
