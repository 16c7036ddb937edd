//! Intake: job requests, cancellations and zap receipts from the relay pool into the pipeline.
//!
//! Every event is verified here (id and signature) before anything else looks at it. The loop
//! only screens and hands off, so it keeps up with the pool; when the pipeline is full it waits,
//! and the pool buffers. Any gap it can detect (the pool's buffer overflowed, or a read relay
//! reconnected, for instance after closing our connection because we read too slowly) is
//! closed by fetching again since just before the newest event handled; the job book drops the
//! duplicates and a payment hash books once.
//!
//! Requests older than `max_request_age_secs` are not served, so they are fetched no further
//! back. Cancellations and receipts must not be lost to downtime: they resume from a persisted
//! checkpoint ([`Stream`]), however long dvmd was stopped.

use nostr_sdk::{Event, Filter, Kind, RelayPoolNotification, RelayUrl, Timestamp};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::pool::{cancellations_filter, receipts_filter, requests_filter};
use super::Relays;
use crate::job::checkpoint::Stream;
use crate::job::Pipeline;
use crate::metrics::Dropped;
use crate::nip57;
use crate::nip90::Verified;

/// How far before the newest event handled a catch-up starts: `created_at` is set by each
/// customer's (or provider's) clock, so events arrive somewhat out of order.
const CATCH_UP_SLACK_SECS: u64 = 60;

/// How far before a persisted checkpoint a start looks: the checkpoint advances when an event
/// is handed to the pipeline, a little before it is booked, and clocks disagree.
const CHECKPOINT_MARGIN_SECS: u64 = 15 * 60;

/// One subscription intake follows, with where a catch-up of it starts.
struct Feed {
    filter: Filter,
    /// The checkpointed stream, if it resumes across restarts.
    stream: Option<Stream>,
    /// The newest `created_at` handled.
    newest: Timestamp,
}

impl Feed {
    /// Where a catch-up after a gap starts.
    fn catch_up_since(&self, oldest: Timestamp) -> Timestamp {
        let since = self.newest.as_secs().saturating_sub(CATCH_UP_SLACK_SECS);
        Timestamp::from_secs(since.max(oldest.as_secs()))
    }
}

/// Subscribe to `kinds`, their cancellations and (with a trusted provider) our zap receipts,
/// and feed verified events to `pipeline` until `cancel` fires.
pub async fn run(
    relays: Relays,
    pipeline: Pipeline,
    kinds: Vec<u16>,
    max_age_secs: u64,
    cancel: CancellationToken,
) {
    let mut notifications = relays.notifications();
    let mut reconnected = relays.watch_reconnections(cancel.child_token()).await;
    let oldest_request =
        || Timestamp::from_secs(Timestamp::now().as_secs().saturating_sub(max_age_secs));

    let mut requests = Feed {
        filter: requests_filter(&kinds),
        stream: None,
        newest: oldest_request(),
    };
    let mut deletions = resume(&pipeline, cancellations_filter(&kinds), Stream::Deletions).await;
    let mut receipts = match pipeline.zap_provider() {
        Some(provider) => Some(
            resume(
                &pipeline,
                receipts_filter(&provider, &pipeline.pubkey()),
                Stream::Receipts,
            )
            .await,
        ),
        None => None,
    };
    for feed in [Some(&requests), Some(&deletions), receipts.as_ref()]
        .into_iter()
        .flatten()
    {
        if let Err(e) = relays.subscribe(feed.filter.clone(), feed.newest).await {
            tracing::error!(error = %e, filter = ?feed.filter, "cannot subscribe");
        }
    }
    // What was published while we were away, beyond what a subscription's first answer holds.
    for feed in [&mut deletions].into_iter().chain(receipts.as_mut()) {
        let since = feed.newest;
        catch_up(&relays, &pipeline, feed, None, since).await;
    }

    loop {
        let notification = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(relay) = reconnected.recv() => {
                tracing::info!(%relay, "read relay reconnected; fetching what we may have missed");
                for feed in [&mut requests, &mut deletions].into_iter().chain(receipts.as_mut()) {
                    let since = feed.catch_up_since(gap_floor(feed, oldest_request()));
                    catch_up(&relays, &pipeline, feed, Some(relay.clone()), since).await;
                }
                continue;
            }
            n = notifications.recv() => n,
        };
        match notification {
            Ok(RelayPoolNotification::Event {
                relay_url, event, ..
            }) => {
                pipeline.metrics().event_received();
                let Ok(verified) = Verified::check(*event) else {
                    pipeline.metrics().dropped(Dropped::BadSignature);
                    continue;
                };
                let kind = verified.event().kind;
                let feed = if kind.as_u16() == nip57::ZAP_RECEIPT_KIND {
                    match receipts.as_mut() {
                        Some(feed) => feed,
                        None => continue,
                    }
                } else if kind == Kind::EventDeletion {
                    &mut deletions
                } else {
                    &mut requests
                };
                handled(&pipeline, feed, verified.event()).await;
                dispatch(&pipeline, verified, Some(relay_url.as_str())).await;
            }
            Ok(RelayPoolNotification::Shutdown) => break,
            Ok(_) => {}
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "intake fell behind the relay pool; fetching again");
                pipeline.metrics().intake_lagged(missed);
                for feed in [&mut requests, &mut deletions]
                    .into_iter()
                    .chain(receipts.as_mut())
                {
                    let since = feed.catch_up_since(gap_floor(feed, oldest_request()));
                    catch_up(&relays, &pipeline, feed, None, since).await;
                }
            }
            Err(RecvError::Closed) => break,
        }
    }
}

/// The oldest a catch-up after a gap may look: requests past their age are not served;
/// checkpointed streams look back as far as their checkpoint allows.
fn gap_floor(feed: &Feed, oldest_request: Timestamp) -> Timestamp {
    match feed.stream {
        Some(_) => Timestamp::from_secs(0),
        None => oldest_request,
    }
}

/// A checkpointed feed, starting a margin before its checkpoint. The first start records
/// "now" as the checkpoint, so a later start finds what was published while it was down.
async fn resume(pipeline: &Pipeline, filter: Filter, stream: Stream) -> Feed {
    let book = pipeline.book();
    let now = Timestamp::now().as_secs();
    let checkpoint = match book.checkpoint(stream).await {
        Ok(Some(at)) => at,
        Ok(None) => {
            if let Err(e) = book.advance_checkpoint(stream, now).await {
                tracing::warn!(error = %e, ?stream, "cannot record a checkpoint");
            }
            now
        }
        Err(e) => {
            tracing::warn!(error = %e, ?stream, "cannot read a checkpoint; starting from now");
            now
        }
    };
    let since = checkpoint.saturating_sub(CHECKPOINT_MARGIN_SECS);
    tracing::info!(?stream, since, "resuming from the checkpoint");
    Feed {
        filter,
        stream: Some(stream),
        newest: Timestamp::from_secs(since),
    }
}

/// Note that `event` of `feed` is being handled. A checkpoint never moves past now (a
/// `created_at` in the future would make the next start skip what comes before it), and the
/// receipts checkpoint moves only for receipts signed by the trusted provider (a relay may
/// send anything; the subscription's author filter binds only honest relays).
async fn handled(pipeline: &Pipeline, feed: &mut Feed, event: &Event) {
    let at = event.created_at.min(Timestamp::now());
    if at <= feed.newest {
        return;
    }
    if feed.stream == Some(Stream::Receipts) && Some(event.pubkey) != pipeline.zap_provider() {
        return;
    }
    feed.newest = at;
    if let Some(stream) = feed.stream {
        let at = at.as_secs();
        if let Err(e) = pipeline.book().advance_checkpoint(stream, at).await {
            tracing::warn!(error = %e, ?stream, "cannot advance a checkpoint");
        }
    }
}

/// Hand a verified event to the pipeline by its kind.
async fn dispatch(pipeline: &Pipeline, verified: Verified, source: Option<&str>) {
    let kind = verified.event().kind;
    if kind.as_u16() == nip57::ZAP_RECEIPT_KIND {
        if pipeline.zap_provider().is_some() {
            pipeline.handle_receipt(verified).await;
        }
    } else if kind == Kind::EventDeletion {
        pipeline.handle_cancellation(verified).await
    } else {
        pipeline.handle(verified, source).await
    }
}

/// Fetch what `feed` matches since `since` from `relay`, or from every read relay, and hand it
/// to the pipeline.
async fn catch_up(
    relays: &Relays,
    pipeline: &Pipeline,
    feed: &mut Feed,
    relay: Option<RelayUrl>,
    since: Timestamp,
) {
    match relays.fetch(&feed.filter, since, relay.as_ref()).await {
        Ok(mut events) => {
            tracing::info!(fetched = events.len(), since = since.as_secs(), stream = ?feed.stream, "caught up");
            events.sort_by_key(|event| event.created_at);
            for event in events {
                if let Ok(verified) = Verified::check(event) {
                    handled(pipeline, feed, verified.event()).await;
                    dispatch(pipeline, verified, None).await;
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "catch-up fetch failed"),
    }
}
