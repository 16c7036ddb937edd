//! Intake: job requests from the relay pool into the pipeline.
//!
//! Every event is verified here (id and signature) before anything else looks at it. The loop
//! only screens and hands off, so it keeps up with the pool; if it still falls behind, it
//! catches up by fetching recent requests again (the job book drops the duplicates).

use nostr_sdk::{Kind, RelayPoolNotification, Timestamp};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::Relays;
use crate::job::Pipeline;
use crate::metrics::Dropped;
use crate::nip57;
use crate::nip90::Verified;

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
    loop {
        let notification = tokio::select! {
            _ = cancel.cancelled() => break,
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
                            pipeline.handle_receipt(receipt);
                        }
                    }
                    Ok(deletion) if deletion.event().kind == Kind::EventDeletion => {
                        pipeline.handle_cancellation(&deletion)
                    }
                    Ok(verified) => pipeline.handle(verified, Some(relay_url.as_str())),
                    Err(_) => pipeline.metrics().dropped(Dropped::BadSignature),
                }
            }
            Ok(RelayPoolNotification::Shutdown) => break,
            Ok(_) => {}
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "intake fell behind; fetching recent requests again");
                let since =
                    Timestamp::from_secs(Timestamp::now().as_secs().saturating_sub(max_age_secs));
                match relays.fetch_requests(&kinds, since).await {
                    Ok(events) => {
                        for event in events {
                            if let Ok(verified) = Verified::check(event) {
                                pipeline.handle(verified, None);
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "catch-up fetch failed"),
                }
            }
            Err(RecvError::Closed) => break,
        }
    }
}
