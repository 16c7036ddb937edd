//! A minimal NIP-90 customer: post a request, follow its feedback, pay, read the result.
//!
//! The daemon never uses this; the example customer, the benchmarks and the tests do, so that
//! they all speak to dvmd exactly as a client on a relay would.

use std::collections::VecDeque;
use std::time::Duration;

use nostr_sdk::{
    Alphabet, Client, Event, EventBuilder, EventId, Filter, Keys, Kind, PublicKey,
    RelayPoolNotification, SingleLetterTag, Tag, Timestamp,
};
use tokio::sync::broadcast;

use crate::nip90::{JobStatus, PaymentAmount, FEEDBACK_KIND};
use crate::relay::transport::NoDelayTransport;

/// Replies about other jobs kept for a later `next_reply`; the oldest go first.
const MAX_STASHED: usize = 256;

/// Errors a customer sees.
#[derive(Debug, thiserror::Error)]
pub enum CustomerError {
    /// The relay client failed.
    #[error("relay: {0}")]
    Relay(String),
    /// Nothing arrived in time.
    #[error("timed out waiting for job {0}")]
    Timeout(EventId),
    /// The event could not be signed.
    #[error("sign: {0}")]
    Sign(String),
}

/// What the service said about a job.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A kind 7000 feedback.
    Feedback {
        /// The status (either spelling accepted).
        status: Option<JobStatus>,
        /// The status info text.
        info: String,
        /// The `amount` tag.
        amount: Option<PaymentAmount>,
        /// The event.
        event: Box<Event>,
    },
    /// A result event (kind 6000-6999).
    Result(Box<Event>),
}

/// A customer connected to one relay.
pub struct Customer {
    client: Client,
    keys: Keys,
    notifications: broadcast::Receiver<RelayPoolNotification>,
    stash: VecDeque<Event>,
}

/// A kind 5050 request for `prompt` with `params`, an optional bid and target service.
pub fn text_request(
    prompt: &str,
    params: &[(&str, &str)],
    bid_msat: Option<u64>,
    service: Option<PublicKey>,
) -> EventBuilder {
    let mut tags = vec![Tag::custom(
        nostr_sdk::TagKind::custom("i"),
        [prompt, "text"],
    )];
    for (name, value) in params {
        tags.push(Tag::custom(
            nostr_sdk::TagKind::custom("param"),
            [*name, *value],
        ));
    }
    if let Some(bid) = bid_msat {
        tags.push(Tag::custom(
            nostr_sdk::TagKind::custom("bid"),
            [bid.to_string()],
        ));
    }
    if let Some(service) = service {
        tags.push(Tag::public_key(service));
    }
    EventBuilder::new(Kind::from(crate::nip90::KIND_TEXT_GENERATION), "").tags(tags)
}

impl Customer {
    /// Connect to `relay_url` with fresh keys and subscribe to replies addressed to them.
    pub async fn connect(relay_url: &str) -> Result<Self, CustomerError> {
        Self::connect_with(relay_url, Keys::generate()).await
    }

    /// Connect with the given keys.
    pub async fn connect_with(relay_url: &str, keys: Keys) -> Result<Self, CustomerError> {
        crate::signatures::install();
        let client = Client::builder()
            .signer(keys.clone())
            .websocket_transport(NoDelayTransport::default())
            .build();
        client
            .add_relay(relay_url)
            .await
            .map_err(|e| CustomerError::Relay(e.to_string()))?;
        client
            .try_connect_relay(relay_url, Duration::from_secs(10))
            .await
            .map_err(|e| CustomerError::Relay(e.to_string()))?;
        let notifications = client.notifications();
        let kinds = [Kind::from(FEEDBACK_KIND)]
            .into_iter()
            .chain((6000..=6999).map(Kind::from));
        let filter = Filter::new()
            .kinds(kinds)
            .custom_tag(
                SingleLetterTag::lowercase(Alphabet::P),
                keys.public_key().to_hex(),
            )
            .since(Timestamp::from_secs(
                Timestamp::now().as_secs().saturating_sub(60),
            ));
        client
            .subscribe(filter, None)
            .await
            .map_err(|e| CustomerError::Relay(e.to_string()))?;
        Ok(Self {
            client,
            keys,
            notifications,
            stash: VecDeque::new(),
        })
    }

    /// The customer's keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The relay client (to publish other events, such as forged ones in tests).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Sign `request` and publish it; returns the signed event once the relay accepted it.
    pub async fn post(&self, request: EventBuilder) -> Result<Event, CustomerError> {
        let event = request
            .sign_with_keys(&self.keys)
            .map_err(|e| CustomerError::Sign(e.to_string()))?;
        self.send(&event).await?;
        Ok(event)
    }

    /// Publish an already signed event.
    pub async fn send(&self, event: &Event) -> Result<(), CustomerError> {
        let output = self
            .client
            .send_event(event)
            .await
            .map_err(|e| CustomerError::Relay(e.to_string()))?;
        if output.success.is_empty() {
            return Err(CustomerError::Relay(format!(
                "not accepted: {:?}",
                output.failed
            )));
        }
        Ok(())
    }

    /// The next reply about `job`, waiting at most `timeout`.
    pub async fn next_reply(
        &mut self,
        job: &EventId,
        timeout: Duration,
    ) -> Result<Reply, CustomerError> {
        let job_hex = job.to_hex();
        if let Some(pos) = self.stash.iter().position(|e| refers_to(e, &job_hex)) {
            if let Some(event) = self.stash.remove(pos).filter(|e| e.verify().is_ok()) {
                return Ok(reply(event));
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let received = tokio::time::timeout_at(deadline, self.notifications.recv())
                .await
                .map_err(|_| CustomerError::Timeout(*job))?;
            let event = match received {
                Ok(RelayPoolNotification::Event { event, .. }) => *event,
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(CustomerError::Relay("client closed".into()))
                }
            };
            // Verified here, not only by the sdk: its cache skips events whose id it has seen.
            if refers_to(&event, &job_hex) {
                if event.verify().is_ok() {
                    return Ok(reply(event));
                }
                continue;
            }
            if self.stash.len() == MAX_STASHED {
                self.stash.pop_front();
            }
            self.stash.push_back(event);
        }
    }

    /// Wait for the reply about `job` that satisfies `want`, skipping others.
    pub async fn wait_for<F>(
        &mut self,
        job: &EventId,
        timeout: Duration,
        mut want: F,
    ) -> Result<Reply, CustomerError>
    where
        F: FnMut(&Reply) -> bool,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let reply = self.next_reply(job, left).await?;
            if want(&reply) {
                return Ok(reply);
            }
        }
    }

    /// Disconnect.
    pub async fn shutdown(self) {
        self.client.shutdown().await;
    }
}

fn refers_to(event: &Event, job_hex: &str) -> bool {
    event
        .tags
        .iter()
        .any(|t| matches!(t.as_slice(), [name, id, ..] if name == "e" && id == job_hex))
}

fn reply(event: Event) -> Reply {
    if event.kind.as_u16() != FEEDBACK_KIND {
        return Reply::Result(Box::new(event));
    }
    let mut status = None;
    let mut info = String::new();
    let mut amount = None;
    for tag in event.tags.iter() {
        match tag.as_slice() {
            [name, s, rest @ ..] if name == "status" => {
                status = JobStatus::parse(s);
                info = rest.first().cloned().unwrap_or_default();
            }
            [name, msat, rest @ ..] if name == "amount" => {
                amount = msat.parse().ok().map(|msat| PaymentAmount {
                    msat,
                    bolt11: rest.first().cloned(),
                });
            }
            _ => {}
        }
    }
    Reply::Feedback {
        status,
        info,
        amount,
        event: Box::new(event),
    }
}
