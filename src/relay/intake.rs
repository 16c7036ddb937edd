//! Intake: job requests from the relay pool into the pipeline.
//!
//! Every event is verified here (id and signature) before anything else looks at it. The loop
//! only screens and hands off, so it keeps up with the pool; when the pipeline is full it waits,
//! and the pool buffers. Any gap it can detect (the pool's buffer overflowed, or a read relay
//! reconnected, for instance after closing our connection because we read too slowly) is
//! closed by fetching the requests since just before the newest one handled; the job book
//! drops the duplicates.

use nostr_sdk::{Kind, RelayPoolNotification, RelayUrl, Timestamp};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::Relays;
use crate::job::Pipeline;
use crate::metrics::Dropped;
use crate::nip57;
use crate::nip90::Verified;

/// How far before the newest request handled a catch-up starts: `created_at` is set by each
/// customer's clock, so events arrive somewhat out of order.
const CATCH_UP_SLACK_SECS: u64 = 60;

/// Subscribe to `kinds` (and to their cancellations) and feed verified events to `pipeline`
/// until `cancel` fires.
pub async fn run(
    relays: Relays,
    pipeline: Pipeline,
    kinds: Vec<u16>,
    max_age_secs: u64,
    cancel: CancellationToken,
) {
    let mut notifications = relays.notifications();
    let mut reconnected = relays.watch_reconnections(cancel.child_token()).await;
    let since = Timestamp::from_secs(Timestamp::now().as_secs().saturating_sub(max_age_secs));
    if let Err(e) = relays.subscribe_requests(&kinds, since).await {
        tracing::error!(error = %e, "cannot subscribe to job requests");
    }
    if let Err(e) = relays.subscribe_cancellations(&kinds, since).await {
        tracing::error!(error = %e, "cannot subscribe to cancellations");
    }
    let provider = pipeline.zap_provider();
    if let Some(provider) = provider {
        if let Err(e) = relays
            .subscribe_receipts(&provider, &pipeline.pubkey(), since)
            .await
        {
            tracing::error!(error = %e, "cannot subscribe to zap receipts");
        }
    }
    // The newest request handled: a catch-up starts a little before it.
    let mut newest = since;
    loop {
        let notification = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(relay) = reconnected.recv() => {
                tracing::info!(%relay, "read relay reconnected; fetching what we may have missed");
                catch_up(&relays, &pipeline, &kinds, Some(relay), newest, max_age_secs).await;
                continue;
            }
            n = notifications.recv() => n,
        };
        match notification {
            Ok(RelayPoolNotification::Event {
                relay_url, event, ..
            }) => {
                pipeline.metrics().event_received();
                match Verified::check(*event) {
                    Ok(receipt) if receipt.event().kind.as_u16() == nip57::ZAP_RECEIPT_KIND => {
                        if provider.is_some() {
                            pipeline.handle_receipt(receipt).await;
                        }
                    }
                    Ok(deletion) if deletion.event().kind == Kind::EventDeletion => {
                        pipeline.handle_cancellation(deletion).await
                    }
                    Ok(verified) => {
                        newest = newest.max(verified.event().created_at);
                        pipeline.handle(verified, Some(relay_url.as_str())).await
                    }
                    Err(_) => pipeline.metrics().dropped(Dropped::BadSignature),
                }
            }
            Ok(RelayPoolNotification::Shutdown) => break,
            Ok(_) => {}
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "intake fell behind the relay pool; fetching recent requests again"
                );
                pipeline.metrics().intake_lagged(missed);
                catch_up(&relays, &pipeline, &kinds, None, newest, max_age_secs).await;
            }
            Err(RecvError::Closed) => break,
        }
    }
}

/// Fetch the requests since a little before `newest` (never older than `max_age_secs`) from
/// `relay`, or from every read relay, and hand them to the pipeline.
async fn catch_up(
    relays: &Relays,
    pipeline: &Pipeline,
    kinds: &[u16],
    relay: Option<RelayUrl>,
    newest: Timestamp,
    max_age_secs: u64,
) {
    let oldest = Timestamp::now().as_secs().saturating_sub(max_age_secs);
    let since = Timestamp::from_secs(
        newest
            .as_secs()
            .saturating_sub(CATCH_UP_SLACK_SECS)
            .max(oldest),
    );
    match relays.fetch_requests(kinds, since, relay.as_ref()).await {
        Ok(events) => {
            tracing::info!(fetched = events.len(), since = since.as_secs(), "caught up");
            for event in events {
                if let Ok(verified) = Verified::check(event) {
                    pipeline.handle(verified, None).await;
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "catch-up fetch failed"),
    }
}
