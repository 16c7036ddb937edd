//! The relays dvmd talks to: a nostr-sdk `Client` with our nodelay transport, the operator's
//! relays by role, and reply relays that requests name in their `relays` tag.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use nostr_sdk::prelude::{MemoryDatabase, MemoryDatabaseOptions, RelayNotification};
use nostr_sdk::{
    Alphabet, Client, ClientOptions, Event, EventId, Filter, Keys, Kind, RelayOptions,
    RelayPoolNotification, RelayPoolOptions, RelayStatus, RelayUrl, SingleLetterTag,
    SubscriptionId, Timestamp,
};
use tokio::sync::{broadcast, mpsc, Mutex};
use tokio_util::sync::CancellationToken;

use super::guard::{RelayGuard, ReplyRelayPolicy};
use super::transport::NoDelayTransport;
use super::RelayError;

/// At most this many relays learned from requests are in the pool at once, so customers cannot
/// make the daemon hold an unbounded number of connections.
pub const MAX_REPLY_RELAYS_IN_POOL: usize = 64;
/// A relay learned from a request is dropped from the pool (and its connection closed) once
/// nothing was sent to it for this long: the connection serves the job that named it, and the
/// places under [`MAX_REPLY_RELAYS_IN_POOL`] go back to later requests.
pub const REPLY_RELAY_IDLE: Duration = Duration::from_secs(60);

/// Room for bursts between the pool and the intake loop; intake only screens (the store work
/// runs in tasks), so it drains this quickly. An overflow is detected and caught up. Every slot
/// keeps the last notification written to it (an event with its tags) until it is overwritten,
/// so this ring is resident memory: 65,536 slots cost about 24 MB that grew in over the first
/// ~10,000 jobs, and 500 customers at full speed never lag 4,096.
const NOTIFICATION_CHANNEL_SIZE: usize = 4_096;
/// Event ids the client remembers as seen, so the same event from several relays (or a
/// catch-up that overlaps the live subscription) reaches intake once. nostr-sdk's default is
/// 35,000, a cache that grew in for the first 35,000 jobs (about 50 bytes an id); duplicates
/// are short-lived, and one that comes later is still recognised by the book's durable dedupe.
const SEEN_IDS: usize = 4_096;
/// Events asked for per page of a catch-up fetch (relays cap what one query returns).
const FETCH_PAGE: usize = 500;
/// Most events one catch-up fetches.
const MAX_CATCH_UP: usize = 100_000;
/// First reconnection attempt after a relay drops us (nostr-sdk's default is 10 s, plus
/// jitter; it backs off on its own when the relay stays away). A DVM missing requests for ten
/// seconds after every blip loses customers.
const RECONNECT_AFTER: Duration = Duration::from_secs(3);

/// Connecting a reply relay before its first send, and catch-up fetches, give up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One configured relay and what dvmd uses it for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayRole {
    /// ws:// or wss:// URL.
    pub url: String,
    /// Read job requests from it.
    pub read: bool,
    /// Publish feedback and results to it.
    pub write: bool,
}

/// The relay pool.
#[derive(Clone)]
pub struct Relays {
    client: Client,
    read: Arc<Vec<RelayUrl>>,
    write: Arc<Vec<RelayUrl>>,
    /// Relays learned from requests, with when something was last sent to each.
    reply: Arc<Mutex<HashMap<RelayUrl, std::time::Instant>>>,
    /// Which reply relays may be reached (checked again by the transport at connect time).
    guard: Arc<RelayGuard>,
}

/// Job requests of `kinds`.
pub fn requests_filter(kinds: &[u16]) -> Filter {
    Filter::new().kinds(kinds.iter().map(|k| Kind::from(*k)))
}

/// NIP-09 deletions (kind 5) that name one of `kinds` in a `k` tag: how customers cancel job
/// requests (NIP-90).
pub fn cancellations_filter(kinds: &[u16]) -> Filter {
    Filter::new().kind(Kind::EventDeletion).custom_tags(
        SingleLetterTag::lowercase(Alphabet::K),
        kinds.iter().map(|k| k.to_string()),
    )
}

/// Zap receipts for `us` signed by `provider` (an external Lightning address).
pub fn receipts_filter(provider: &nostr_sdk::PublicKey, us: &nostr_sdk::PublicKey) -> Filter {
    Filter::new()
        .kind(Kind::from(crate::nip57::ZAP_RECEIPT_KIND))
        .author(*provider)
        .pubkey(*us)
}

impl Relays {
    /// Add the configured relays and start connecting (in the background: an unreachable relay
    /// does not stop the daemon, the pool keeps retrying).
    /// Relays that requests name are reached only as `reply` allows (see [`super::guard`]).
    pub async fn connect(
        keys: &Keys,
        roles: &[RelayRole],
        reply: ReplyRelayPolicy,
    ) -> Result<Self, RelayError> {
        let guard = RelayGuard::new(roles.iter().map(|r| r.url.as_str()), reply);
        crate::signatures::install();
        let client =
            Client::builder()
                .signer(keys.clone())
                .database(MemoryDatabase::with_opts(MemoryDatabaseOptions {
                    events: false,
                    max_events: Some(SEEN_IDS),
                }))
                .websocket_transport(NoDelayTransport::guarded(guard.clone()))
                .opts(ClientOptions::new().automatic_authentication(true).pool(
                    RelayPoolOptions::new().notification_channel_size(NOTIFICATION_CHANNEL_SIZE),
                ))
                .build();
        let (mut read, mut write) = (Vec::new(), Vec::new());
        for role in roles {
            let url = RelayUrl::parse(&role.url)
                .map_err(|e| RelayError::Pool(format!("{}: {e}", role.url)))?;
            let opts = RelayOptions::new()
                .read(role.read)
                .write(role.write)
                .retry_interval(RECONNECT_AFTER);
            client
                .pool()
                .add_relay(url.clone(), opts)
                .await
                .map_err(|e| RelayError::Pool(e.to_string()))?;
            if role.read {
                read.push(url.clone());
            }
            if role.write {
                write.push(url);
            }
        }
        client.connect().await;
        Ok(Self {
            client,
            read: Arc::new(read),
            write: Arc::new(write),
            reply: Arc::new(Mutex::new(HashMap::new())),
            guard: Arc::new(guard),
        })
    }

    /// Wait until every configured relay is connected, or `timeout` passes.
    pub async fn wait_connected(&self, timeout: Duration) {
        let _ = self.client.try_connect(timeout).await;
    }

    /// The underlying client (examples and benchmarks publish through it).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Subscribe to `filter` since `since` on every read relay; relays not connected yet get it
    /// on connect.
    pub async fn subscribe(
        &self,
        filter: Filter,
        since: Timestamp,
    ) -> Result<SubscriptionId, RelayError> {
        let filter = filter.since(since);
        let output = self
            .client
            .subscribe(filter, None)
            .await
            .map_err(|e| RelayError::Pool(e.to_string()))?;
        for (url, why) in &output.failed {
            tracing::warn!(relay = %url, error = %why, "subscription not sent yet; the pool resends it on connect");
        }
        Ok(output.val)
    }

    /// Fetch stored events matching `filter` since `since` from `relay`, or from every read
    /// relay (catch-up after a gap or downtime). Pages backwards with `until`, so a relay's cap
    /// on one query's answer (often 500) does not cut the catch-up short.
    pub async fn fetch(
        &self,
        filter: &Filter,
        since: Timestamp,
        relay: Option<&RelayUrl>,
    ) -> Result<Vec<Event>, RelayError> {
        let mut fetched = Vec::new();
        let mut seen: HashSet<EventId> = HashSet::new();
        let mut until: Option<Timestamp> = None;
        loop {
            let mut filter = filter.clone().since(since).limit(FETCH_PAGE);
            if let Some(until) = until {
                filter = filter.until(until);
            }
            let page = match relay {
                Some(url) => {
                    self.client
                        .fetch_events_from([url.clone()], filter, CONNECT_TIMEOUT)
                        .await
                }
                None => self.client.fetch_events(filter, CONNECT_TIMEOUT).await,
            }
            .map_err(|e| RelayError::Pool(e.to_string()))?;
            let full = page.len() >= FETCH_PAGE;
            let mut oldest: Option<Timestamp> = None;
            let mut fresh = 0usize;
            for event in page {
                oldest = Some(oldest.map_or(event.created_at, |o| o.min(event.created_at)));
                if seen.insert(event.id) {
                    fresh += 1;
                    fetched.push(event);
                }
            }
            // `until` is inclusive: the next page repeats the oldest second, and ends the
            // paging once it brings nothing new.
            if !full || fresh == 0 {
                break;
            }
            if fetched.len() >= MAX_CATCH_UP {
                tracing::warn!(fetched = fetched.len(), "catch-up stopped at its cap");
                break;
            }
            until = oldest;
        }
        Ok(fetched)
    }

    /// Relays that reconnected (after any disconnection) among the read relays, until
    /// `cancel` fires: each may have dropped events meant for us while it was away, or closed
    /// our connection because we fell behind.
    pub async fn watch_reconnections(&self, cancel: CancellationToken) -> mpsc::Receiver<RelayUrl> {
        let (tx, rx) = mpsc::channel(16);
        for url in self.read.iter() {
            let Ok(relay) = self.client.relay(url).await else {
                continue;
            };
            let (tx, url, cancel) = (tx.clone(), url.clone(), cancel.clone());
            let mut notifications = relay.notifications();
            tokio::spawn(async move {
                let mut was_down = false;
                loop {
                    let notification = tokio::select! {
                        _ = cancel.cancelled() => break,
                        n = notifications.recv() => n,
                    };
                    match notification {
                        Ok(RelayNotification::RelayStatus { status }) => match status {
                            RelayStatus::Connected if was_down => {
                                was_down = false;
                                if tx.send(url.clone()).await.is_err() {
                                    break;
                                }
                            }
                            RelayStatus::Disconnected | RelayStatus::Terminated => was_down = true,
                            _ => {}
                        },
                        Ok(RelayNotification::Shutdown)
                        | Err(broadcast::error::RecvError::Closed) => break,
                        _ => {}
                    }
                }
            });
        }
        rx
    }

    /// Events and relay messages as they arrive.
    pub fn notifications(&self) -> broadcast::Receiver<RelayPoolNotification> {
        self.client.notifications()
    }

    /// Send `event` once to our write relays plus `reply_relays`. Returns the first relay that
    /// acknowledged it with `OK`; an error if none did.
    ///
    /// The sends run side by side. The call returns at the first acknowledgement and the others
    /// finish in the background, so one slow or silent relay (the pool waits up to 10 s for an
    /// `OK`) never holds up a customer who reads from a healthy one.
    /// Relays in `skip` (given up for this event) are left out.
    pub async fn send(
        &self,
        event: &Event,
        reply_relays: &[String],
        skip: &HashSet<RelayUrl>,
    ) -> Result<RelayUrl, RelayError> {
        let mut targets: HashSet<RelayUrl> = self.write.iter().cloned().collect();
        for raw in reply_relays {
            if let Some(url) = self.reply_relay(raw).await {
                targets.insert(url);
            }
        }
        targets.retain(|url| !skip.contains(url));
        // Ours: a relay in this process (the embedded one) checks it by its hash alone.
        crate::signatures::remember_signed(event);
        if targets.is_empty() {
            return Err(RelayError::NotAccepted {
                event: event.id.to_hex(),
                reasons: "no write relays left to try".to_owned(),
                refused: Vec::new(),
            });
        }
        // Polled in place (no task hop on the common path); what is left after the first `OK`
        // moves to a background task.
        let mut sends = FuturesUnordered::new();
        let mut failed = Vec::new();
        let mut refused = Vec::new();
        for url in targets {
            let relay = match self.client.relay(&url).await {
                Ok(relay) => relay,
                Err(e) => {
                    failed.push(format!("{url}: {e}"));
                    continue;
                }
            };
            let event = event.clone();
            sends.push(async move {
                if matches!(
                    relay.status(),
                    RelayStatus::Initialized | RelayStatus::Terminated
                ) {
                    // A reply relay added for this request, or one whose first connect failed
                    // (the pool does not retry those): connect before sending, so the event is
                    // not lost to a cold socket.
                    let _ = relay.try_connect(CONNECT_TIMEOUT).await;
                }
                let sent = relay.send_event(&event).await;
                (url, sent)
            });
        }
        while let Some((url, sent)) = sends.next().await {
            match sent {
                Ok(_) => {
                    if !sends.is_empty() {
                        let id = event.id;
                        tokio::spawn(async move {
                            while let Some((url, sent)) = sends.next().await {
                                if let Err(e) = sent {
                                    tracing::debug!(relay = %url, event = %id, error = %e, "relay did not accept the event");
                                }
                            }
                        });
                    }
                    return Ok(url);
                }
                Err(e) => {
                    failed.push(format!("{url}: {e}"));
                    if let nostr_sdk::pool::relay::Error::RelayMessage(message) = e {
                        refused.push((url, message));
                    }
                }
            }
        }
        Err(RelayError::NotAccepted {
            event: event.id.to_hex(),
            reasons: failed.join("; "),
            refused,
        })
    }

    /// Our write relays (from `relays.toml`, or the embedded relay).
    pub fn write_relays(&self) -> &[RelayUrl] {
        &self.write
    }

    /// Make sure a customer-named relay is in the pool (write only), within the cap.
    async fn reply_relay(&self, raw: &str) -> Option<RelayUrl> {
        let url = RelayUrl::parse(raw).ok()?;
        if self.write.contains(&url) {
            return Some(url);
        }
        let mut reply = self.reply.lock().await;
        if let Some(used) = reply.get_mut(&url) {
            *used = std::time::Instant::now();
            return Some(url);
        }
        // Refused before it takes a place in the pool: a denied host or a private address
        // literal (a name is checked on its resolved addresses when the transport dials it).
        if let Ok(parsed) = nostr_sdk::Url::parse(url.as_str()) {
            if let Err(e) = self.guard.precheck(parsed.host_str().unwrap_or_default()) {
                tracing::info!(relay = %url, error = %e, "not publishing to a reply relay");
                return None;
            }
        }
        if reply.len() >= MAX_REPLY_RELAYS_IN_POOL {
            tracing::debug!(relay = %url, "reply relay cap reached; not adding");
            return None;
        }
        let opts = RelayOptions::new().read(false).write(true);
        if let Err(e) = self.client.pool().add_relay(url.clone(), opts).await {
            tracing::debug!(relay = %url, error = %e, "cannot add reply relay");
            return None;
        }
        reply.insert(url.clone(), std::time::Instant::now());
        Some(url)
    }

    /// Drop from the pool (closing their connections) the relays learned from requests that
    /// nothing was sent to for `idle`; returns them.
    pub async fn release_idle_reply_relays(&self, idle: Duration) -> Vec<RelayUrl> {
        let mut reply = self.reply.lock().await;
        let idle: Vec<RelayUrl> = reply
            .iter()
            .filter(|(_, used)| used.elapsed() >= idle)
            .map(|(url, _)| url.clone())
            .collect();
        for url in &idle {
            reply.remove(url);
            if let Err(e) = self.client.pool().force_remove_relay(url.clone()).await {
                tracing::debug!(relay = %url, error = %e, "reply relay already gone");
            }
        }
        idle
    }

    /// Relays learned from requests now in the pool.
    pub async fn reply_relays_in_pool(&self) -> usize {
        self.reply.lock().await.len()
    }

    /// Every [`REPLY_RELAY_IDLE`] / 2 until `cancel` fires: release idle reply relays.
    pub async fn release_reply_relays(self, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(REPLY_RELAY_IDLE / 2) => {}
            }
            let released = self.release_idle_reply_relays(REPLY_RELAY_IDLE).await;
            if !released.is_empty() {
                tracing::debug!(relays = released.len(), "idle reply relays released");
            }
        }
    }

    /// Disconnect every relay.
    pub async fn shutdown(&self) {
        self.client.shutdown().await;
    }
}
