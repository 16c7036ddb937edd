//! Who gets which event: the live subscriptions of every connection, indexed by `#p`.
//!
//! Most subscriptions on a DVM's relay are customers waiting for replies addressed to them
//! (`#p` = their key). Indexing those by the `p` values means an event is matched only against
//! the subscriptions it can concern, not against every connection: at 500 customers that is
//! the difference between a handful of filter checks per event and 500 (plus 500 task wakeups,
//! which is what a broadcast channel per connection costs).
//!
//! Delivery never waits: each connection has a bounded queue of live events, and a connection
//! whose queue is full has fallen behind. It is closed (and counted), so its client reconnects
//! and asks again with `since`, instead of silently missing events.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use nostr_sdk::prelude::MatchEventOptions;
use nostr_sdk::{Alphabet, Event, Filter, SingleLetterTag, SubscriptionId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A connection's number, for the registry.
pub(super) type ConnectionId = u64;

const P_TAG: SingleLetterTag = SingleLetterTag::lowercase(Alphabet::P);

/// A live event queued for a connection: the subscription instance it matched (see
/// [`Subscriptions::is_current`]) and the `EVENT` message.
pub(super) type Live = (u64, String);

struct Connection {
    live: mpsc::Sender<Live>,
    lagging: CancellationToken,
    /// Each subscription's filters and its instance: a number never used again, so that what
    /// was queued for a subscription since replaced (a `REQ` reusing its id) or closed is
    /// not sent under its id.
    subscriptions: HashMap<SubscriptionId, (Vec<Filter>, u64)>,
    current: HashSet<u64>,
}

/// The registry of live subscriptions.
#[derive(Default)]
pub(super) struct Subscriptions {
    inner: RwLock<Registry>,
    next_id: AtomicU64,
    next_instance: AtomicU64,
    /// Connections closed because they fell behind.
    pub(super) lagging_closed: AtomicU64,
}

#[derive(Default)]
struct Registry {
    connections: HashMap<ConnectionId, Connection>,
    /// Subscriptions whose every filter names `#p` values, by those values.
    by_p: HashMap<String, HashSet<(ConnectionId, SubscriptionId)>>,
    /// Every other subscription: checked against every event.
    unindexed: HashSet<(ConnectionId, SubscriptionId)>,
}

impl Registry {
    fn unindex(&mut self, key: &(ConnectionId, SubscriptionId), filters: &[Filter]) {
        match p_values(filters) {
            Some(values) => {
                for value in values {
                    if let Some(set) = self.by_p.get_mut(value) {
                        set.remove(key);
                        if set.is_empty() {
                            self.by_p.remove(value);
                        }
                    }
                }
            }
            None => {
                self.unindexed.remove(key);
            }
        }
    }
}

/// The `#p` values a subscription can match, if every filter restricts `#p`.
fn p_values(filters: &[Filter]) -> Option<Vec<&String>> {
    let mut values = Vec::new();
    for filter in filters {
        let set = filter
            .generic_tags
            .get(&P_TAG)
            .filter(|set| !set.is_empty())?;
        values.extend(set.iter());
    }
    (!filters.is_empty()).then_some(values)
}

impl Subscriptions {
    /// Register a connection whose live events go to `live`; `lagging` fires when it falls
    /// behind.
    pub(super) fn connect(
        &self,
        live: mpsc::Sender<Live>,
        lagging: CancellationToken,
    ) -> ConnectionId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let connection = Connection {
            live,
            lagging,
            subscriptions: HashMap::new(),
            current: HashSet::new(),
        };
        self.write().connections.insert(id, connection);
        id
    }

    /// Forget a connection and its subscriptions.
    pub(super) fn disconnect(&self, id: ConnectionId) {
        let mut registry = self.write();
        if let Some(connection) = registry.connections.remove(&id) {
            for (sub, (filters, _)) in connection.subscriptions {
                registry.unindex(&(id, sub), &filters);
            }
        }
    }

    /// Start (or replace) subscription `sub` of connection `id`. Returns `false` when the
    /// connection already holds `max` other subscriptions.
    pub(super) fn subscribe(
        &self,
        id: ConnectionId,
        sub: SubscriptionId,
        filters: Vec<Filter>,
        max: usize,
    ) -> bool {
        let mut registry = self.write();
        let Some(connection) = registry.connections.get_mut(&id) else {
            return false;
        };
        if connection.subscriptions.len() >= max && !connection.subscriptions.contains_key(&sub) {
            return false;
        }
        let instance = self.next_instance.fetch_add(1, Ordering::Relaxed);
        connection.current.insert(instance);
        let old = connection
            .subscriptions
            .insert(sub.clone(), (filters.clone(), instance));
        if let Some((_, old)) = &old {
            connection.current.remove(old);
        }
        let key = (id, sub);
        if let Some((old, _)) = old {
            registry.unindex(&key, &old);
        }
        match p_values(&filters) {
            Some(values) => {
                for value in values {
                    registry
                        .by_p
                        .entry(value.clone())
                        .or_default()
                        .insert(key.clone());
                }
            }
            None => {
                registry.unindexed.insert(key);
            }
        }
        true
    }

    /// End subscription `sub` of connection `id`.
    pub(super) fn unsubscribe(&self, id: ConnectionId, sub: &SubscriptionId) {
        let mut registry = self.write();
        let Some(connection) = registry.connections.get_mut(&id) else {
            return;
        };
        let Some((filters, instance)) = connection.subscriptions.remove(sub) else {
            return;
        };
        connection.current.remove(&instance);
        registry.unindex(&(id, sub.clone()), &filters);
    }

    /// Whether subscription instance `instance` of connection `id` is still open: a live
    /// event queued for one since closed or replaced is dropped, not sent.
    pub(super) fn is_current(&self, id: ConnectionId, instance: u64) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .connections
            .get(&id)
            .is_some_and(|c| c.current.contains(&instance))
    }

    /// Hand `event` to every subscription it matches, without waiting: a connection that has
    /// no room left is closed as lagging.
    /// `json` is the event serialised.
    pub(super) fn publish(&self, event: &Event, json: &str) {
        let registry = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut candidates: HashSet<&(ConnectionId, SubscriptionId)> =
            registry.unindexed.iter().collect();
        // Each `p` tag's value as written, as a filter compares it: nostr's parsed
        // `public_keys()` skips a tag whose relay hint it cannot read.
        let p_values = event
            .tags
            .iter()
            .filter(|tag| tag.single_letter_tag() == Some(P_TAG))
            .filter_map(|tag| tag.content());
        for p in p_values {
            if let Some(set) = registry.by_p.get(p) {
                candidates.extend(set.iter());
            }
        }
        let options = MatchEventOptions::new();
        for (id, sub) in candidates {
            let Some(connection) = registry.connections.get(id) else {
                continue;
            };
            let Some((filters, instance)) = connection.subscriptions.get(sub) else {
                continue;
            };
            if !filters.iter().any(|f| f.match_event(event, options)) {
                continue;
            }
            let text = super::event_message(sub, json);
            match connection.live.try_send((*instance, text)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if !connection.lagging.is_cancelled() {
                        self.lagging_closed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(connection = id, "embedded relay: a reader fell behind; closing its connection so it resubscribes");
                        connection.lagging.cancel();
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    /// Connections open now.
    pub(super) fn connections(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .connections
            .len()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use nostr_sdk::{EventBuilder, JsonUtil, Keys, Kind, Tag};

    use super::*;

    fn event_to(p: &Keys) -> Event {
        EventBuilder::new(Kind::from(7000), "")
            .tags([Tag::public_key(p.public_key())])
            .sign_with_keys(&Keys::generate())
            .expect("sign")
    }

    fn publish(subs: &Subscriptions, event: &Event) {
        subs.publish(event, &event.as_json());
    }

    #[tokio::test]
    async fn events_reach_matching_subscriptions_only() {
        let subs = Subscriptions::default();
        let (alice, bob) = (Keys::generate(), Keys::generate());
        let (tx_a, mut rx_a) = mpsc::channel(8);
        let (tx_all, mut rx_all) = mpsc::channel(8);
        let a = subs.connect(tx_a, CancellationToken::new());
        let all = subs.connect(tx_all, CancellationToken::new());
        assert!(subs.subscribe(
            a,
            SubscriptionId::new("mine"),
            vec![Filter::new().pubkey(alice.public_key())],
            4
        ));
        assert!(subs.subscribe(
            all,
            SubscriptionId::new("all"),
            vec![Filter::new().kind(Kind::from(7000))],
            4
        ));

        publish(&subs, &event_to(&bob));
        assert!(rx_a.try_recv().is_err(), "not addressed to alice");
        assert!(rx_all.try_recv().is_ok());

        let to_alice = event_to(&alice);
        publish(&subs, &to_alice);
        let (_, text) = rx_a.try_recv().expect("alice's event");
        assert!(text.contains(&to_alice.id.to_hex()) && text.contains("\"mine\""));
        assert!(rx_all.try_recv().is_ok());

        subs.unsubscribe(a, &SubscriptionId::new("mine"));
        publish(&subs, &event_to(&alice));
        assert!(rx_a.try_recv().is_err(), "unsubscribed");
        subs.disconnect(all);
        assert_eq!(subs.connections(), 1);
    }

    #[tokio::test]
    async fn a_reader_that_falls_behind_is_closed_and_counted() {
        let subs = Subscriptions::default();
        let alice = Keys::generate();
        let (tx, _rx) = mpsc::channel(2);
        let lagging = CancellationToken::new();
        let id = subs.connect(tx, lagging.clone());
        subs.subscribe(
            id,
            SubscriptionId::new("s"),
            vec![Filter::new().pubkey(alice.public_key())],
            4,
        );
        publish(&subs, &event_to(&alice));
        publish(&subs, &event_to(&alice));
        assert!(!lagging.is_cancelled());
        publish(&subs, &event_to(&alice));
        assert!(lagging.is_cancelled(), "the third event found no room");
        publish(&subs, &event_to(&alice));
        assert_eq!(
            subs.lagging_closed.load(Ordering::Relaxed),
            1,
            "counted once"
        );
    }

    #[tokio::test]
    async fn a_subscription_cap_holds() {
        let subs = Subscriptions::default();
        let (tx, _rx) = mpsc::channel(2);
        let id = subs.connect(tx, CancellationToken::new());
        assert!(subs.subscribe(id, SubscriptionId::new("1"), vec![Filter::new()], 1));
        assert!(
            subs.subscribe(id, SubscriptionId::new("1"), vec![Filter::new()], 1),
            "replacing is fine"
        );
        assert!(!subs.subscribe(id, SubscriptionId::new("2"), vec![Filter::new()], 1));
    }
}
