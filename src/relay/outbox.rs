//! The outbox: publish an event until at least one relay acknowledges it, with backoff.
//!
//! Callers persist the signed event first, so a publish cut short by a restart is retried from
//! the store with the same event id (relays treat the repeat as a duplicate, not a new event).

use std::time::Duration;

use nostr_sdk::{Event, RelayUrl};
use tokio_util::sync::CancellationToken;

use super::{RelayError, Relays};

const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// How hard to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Until a relay acks or the daemon stops (results, invoices).
    UntilAcked,
    /// At most this many attempts (courtesy feedback such as `processing`).
    Attempts(u32),
}

/// Publishes with retries.
#[derive(Clone)]
pub struct Outbox {
    relays: Relays,
    cancel: CancellationToken,
}

impl Outbox {
    /// An outbox over `relays` that gives up when `cancel` fires.
    pub fn new(relays: Relays, cancel: CancellationToken) -> Self {
        Self { relays, cancel }
    }

    /// Publish `event` to our write relays and `reply_relays`; retry with exponential backoff
    /// until one relay accepts it, as `persistence` allows.
    pub async fn publish(
        &self,
        event: &Event,
        reply_relays: &[String],
        persistence: Persistence,
    ) -> Result<RelayUrl, RelayError> {
        let mut delay = FIRST_RETRY;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let error = match self.relays.send(event, reply_relays).await {
                Ok(acked) => return Ok(acked),
                Err(e) => e,
            };
            let give_up = match persistence {
                Persistence::UntilAcked => false,
                Persistence::Attempts(max) => attempt >= max,
            };
            if give_up {
                return Err(error);
            }
            tracing::warn!(event = %event.id, kind = event.kind.as_u16(), attempt, error = %error, retry_in_ms = delay.as_millis() as u64, "publish failed; retrying");
            tokio::select! {
                _ = self.cancel.cancelled() => return Err(error),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(MAX_RETRY);
        }
    }
}
