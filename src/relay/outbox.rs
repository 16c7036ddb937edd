//! The outbox: publish an event until at least one relay acknowledges it, with backoff.
//!
//! Callers persist the signed event first, so a publish cut short by a restart is retried from
//! the store with the same event id (relays treat the repeat as a duplicate, not a new event).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use nostr_sdk::{Event, RelayUrl};
use tokio_util::sync::CancellationToken;

use super::{RelayError, Relays};

const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Why a result was not delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undelivered {
    /// Every write relay refused it (`OK false`) too often: (relay, its last message).
    Refused(Vec<(RelayUrl, String)>),
    /// The daemon is stopping; delivery resumes from the store on the next start.
    Stopped,
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

    /// The relays it publishes to (also read for profiles).
    pub fn relays(&self) -> &Relays {
        &self.relays
    }

    /// Deliver a result: publish `event` to our write relays and `reply_relays` until one
    /// accepts it. A relay that answers `OK false` `max_refusals` times is given up for this
    /// event; once every write relay is given up, the event is [`Undelivered::Refused`].
    /// Relays that cannot be reached are retried with backoff (up to 30 s apart) for as long
    /// as the daemon runs.
    pub async fn deliver(
        &self,
        event: &Event,
        reply_relays: &[String],
        max_refusals: u32,
    ) -> Result<RelayUrl, Undelivered> {
        let mut delay = FIRST_RETRY;
        let mut refusals: HashMap<RelayUrl, (u32, String)> = HashMap::new();
        let mut given_up: HashSet<RelayUrl> = HashSet::new();
        let write = self.relays.write_relays();
        loop {
            let error = match self.relays.send(event, reply_relays, &given_up).await {
                Ok(acked) => return Ok(acked),
                Err(e) => e,
            };
            if let RelayError::NotAccepted { refused, .. } = &error {
                for (url, message) in refused {
                    let seen = refusals.entry(url.clone()).or_insert((0, String::new()));
                    *seen = (seen.0 + 1, message.clone());
                    if seen.0 >= max_refusals.max(1) && given_up.insert(url.clone()) {
                        tracing::warn!(event = %event.id, relay = %url, refusals = seen.0, message = %message, "relay refuses the event; given up for it");
                    }
                }
            }
            if !write.is_empty() && write.iter().all(|url| given_up.contains(url)) {
                let mut refused: Vec<_> = refusals
                    .into_iter()
                    .map(|(url, (_, message))| (url, message))
                    .collect();
                refused.sort();
                return Err(Undelivered::Refused(refused));
            }
            tracing::warn!(event = %event.id, kind = event.kind.as_u16(), error = %error, retry_in_ms = delay.as_millis() as u64, "delivery failed; retrying");
            tokio::select! {
                _ = self.cancel.cancelled() => return Err(Undelivered::Stopped),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(MAX_RETRY);
        }
    }

    /// Publish `event` to our write relays and `reply_relays`; retry with exponential backoff
    /// until one relay accepts it, at most `attempts` times (feedback; results go through
    /// [`Outbox::deliver`]).
    pub async fn publish(
        &self,
        event: &Event,
        reply_relays: &[String],
        attempts: u32,
    ) -> Result<RelayUrl, RelayError> {
        let mut delay = FIRST_RETRY;
        let mut attempt = 0u32;
        let none = HashSet::new();
        loop {
            attempt += 1;
            let error = match self.relays.send(event, reply_relays, &none).await {
                Ok(acked) => return Ok(acked),
                Err(e) => e,
            };
            if attempt >= attempts {
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
