//! The embedded relay's stored events: each kept as the JSON it is sent as, with the few fields
//! a filter looks at, in time order, at most `max_events` of them.
//!
//! Why not nostr-database's `MemoryDatabase` (which this replaced): it keeps every event parsed,
//! with each tag's own allocations, a cache of every tag parsed again, and four indexes, about
//! 2.5 KB an event under `dvmd bench load` (25 MB of the daemon's 78 MB at the default 10,000
//! events). And two of its sets are not bounded by `max_events`: the ids of every event ever
//! deleted or replaced, and an entry per author ever seen. Here an event costs its JSON and about
//! 200 bytes (its place in time order is kept twice for an event a full store lets go first);
//! everything else is bounded too (see [`Store::save`]); and an event found by a `REQ` goes out
//! as stored, without serialising it again.
//!
//! Tag filters (`#e`, `#p`, ...) are checked against a keyed hash of each single-letter tag's
//! value: the key is random per process, so nobody can make values collide on purpose, and a
//! chance collision (2^-64) only sends a subscriber one event its client drops. `search`
//! (NIP-50) parses the stored event again, as it is rare.

use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, RwLock};

use nostr_sdk::prelude::{Coordinate, MatchEventOptions};
use nostr_sdk::{Event, EventId, Filter, JsonUtil, Kind, PublicKey, SingleLetterTag, Timestamp};

/// One stored event.
pub(super) struct Stored {
    /// The event, as JSON.
    pub(super) json: Box<str>,
    pub(super) id: EventId,
    pubkey: PublicKey,
    created_at: Timestamp,
    kind: Kind,
    /// The address of a replaceable or addressable event (NIP-01).
    address: Option<Box<Coordinate>>,
    /// NIP-40: not served after this.
    expiration: Option<Timestamp>,
    /// Each single-letter tag with a value: its letter and the keyed hash of its value.
    tags: Box<[(SingleLetterTag, u64)]>,
}

/// What became of an event handed to [`Store::save`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Saved {
    /// Stored (or, when it is older than everything in a full store, passed on live only).
    Stored,
    Duplicate,
    /// Its author deleted it (NIP-09), or the address it replaces.
    Deleted,
    Expired,
    /// A newer version of this replaceable or addressable event is stored.
    Replaced,
    /// A deletion naming someone else's event or address.
    InvalidDelete,
}

/// The stored events (see the module docs).
pub(super) struct Store {
    inner: RwLock<Inner>,
    max_events: usize,
    hasher: RandomState,
}

/// Where an event sits in time order: oldest first, and among events of one second the highest
/// id first, so that read backwards it is NIP-01's order (newest first, then the lowest id).
type TimeKey = (Timestamp, Reverse<EventId>);

fn time_key(at: Timestamp, id: EventId) -> TimeKey {
    (at, Reverse(id))
}

#[derive(Default)]
struct Inner {
    /// Every stored event, oldest first (see [`TimeKey`]).
    by_time: BTreeMap<TimeKey, Arc<Stored>>,
    /// The stored events that are not replaceable or addressable, oldest first: the ones a
    /// full store lets go first, so a service's profile and NIP-89 announcement, published
    /// once per start, outlive the traffic that follows them.
    regular: BTreeSet<TimeKey>,
    /// Where each stored event is in `by_time`.
    by_id: HashMap<EventId, Timestamp>,
    /// The stored version of each replaceable or addressable event (identifier empty for a
    /// replaceable one): only events in the store.
    latest: HashMap<Coordinate, (Timestamp, EventId)>,
    /// Events deleted by their author (NIP-09), refused if they come again: at most
    /// `max_events`, oldest deletion first out.
    deleted: HashMap<EventId, PublicKey>,
    deleted_order: VecDeque<EventId>,
    /// Addresses deleted up to a time (NIP-09 `a` tags): bounded the same way.
    deleted_addresses: HashMap<Coordinate, Timestamp>,
    deleted_addresses_order: VecDeque<Coordinate>,
}

impl Store {
    pub(super) fn new(max_events: usize) -> Self {
        Self {
            inner: RwLock::new(Inner::default()),
            max_events: max_events.max(1),
            hasher: RandomState::new(),
        }
    }

    /// Store `event` (already verified; not ephemeral), sent to clients as `json`.
    ///
    /// Replaceable and addressable events keep only their newest version (NIP-01; the lowest
    /// id on a tie). A deletion (kind 5) removes the events and addresses it names, when every
    /// one is its author's, and older ones are refused if they come again. When the store holds
    /// `max_events`, the oldest event that is not replaceable or addressable goes (the oldest
    /// of all if every one is).
    pub(super) fn save(&self, event: &Event, json: &str) -> Saved {
        let now = Timestamp::now();
        let mut inner = self.write();
        if inner.by_id.contains_key(&event.id) {
            return Saved::Duplicate;
        }
        if inner.deleted.get(&event.id) == Some(&event.pubkey) {
            return Saved::Deleted;
        }
        if event.is_expired_at(&now) {
            return Saved::Expired;
        }
        let address = address_of(event);
        if let Some(address) = &address {
            if inner
                .deleted_addresses
                .get(address)
                .is_some_and(|until| event.created_at <= *until)
            {
                return Saved::Deleted;
            }
            if let Some(&(at, id)) = inner.latest.get(address) {
                let newer = event.created_at > at || event.created_at == at && event.id < id;
                if !newer {
                    return Saved::Replaced;
                }
                inner.remove(at, id);
            }
        }
        if event.kind == Kind::EventDeletion && !inner.delete(event, self.max_events) {
            return Saved::InvalidDelete;
        }

        if let Some(address) = &address {
            inner
                .latest
                .insert(address.clone(), (event.created_at, event.id));
        }
        let stored = Arc::new(Stored {
            json: json.into(),
            id: event.id,
            pubkey: event.pubkey,
            created_at: event.created_at,
            kind: event.kind,
            address: address.map(Box::new),
            expiration: event.tags.expiration().copied(),
            tags: event
                .tags
                .iter()
                .filter_map(|tag| {
                    let letter = tag.single_letter_tag()?;
                    Some((letter, self.hash(letter, tag.content()?)))
                })
                .collect(),
        });
        let key = time_key(event.created_at, event.id);
        if stored.address.is_none() {
            inner.regular.insert(key);
        }
        inner.by_time.insert(key, stored);
        inner.by_id.insert(event.id, event.created_at);
        while inner.by_time.len() > self.max_events {
            let oldest = inner
                .regular
                .first()
                .or_else(|| inner.by_time.keys().next());
            let Some(&(at, Reverse(id))) = oldest else {
                break;
            };
            inner.remove(at, id);
        }
        Saved::Stored
    }

    /// The newest stored events matching `filter`, at most `limit`, newest first.
    pub(super) fn query(&self, filter: &Filter, limit: usize) -> Vec<Arc<Stored>> {
        self.query_at(filter, limit, Timestamp::now())
    }

    /// [`Store::query`] as of `now` (for expirations).
    fn query_at(&self, filter: &Filter, limit: usize, now: Timestamp) -> Vec<Arc<Stored>> {
        let tags = self.hashed(filter);
        let inner = self.read();
        let matching = |stored: &&Arc<Stored>| matches(filter, &tags, stored, now);
        if let Some(ids) = filter.ids.as_ref().filter(|ids| !ids.is_empty()) {
            let mut found: Vec<Arc<Stored>> = ids
                .iter()
                .filter_map(|id| inner.get(id))
                .filter(matching)
                .cloned()
                .collect();
            found.sort_by_key(|s| Reverse(time_key(s.created_at, s.id)));
            found.truncate(limit);
            return found;
        }
        inner
            .range(filter)
            .rev()
            .filter(matching)
            .take(limit)
            .cloned()
            .collect()
    }

    /// How many stored events match `filter` (NIP-45).
    pub(super) fn count(&self, filter: &Filter) -> usize {
        let tags = self.hashed(filter);
        let now = Timestamp::now();
        let inner = self.read();
        inner
            .range(filter)
            .filter(|stored| matches(filter, &tags, stored, now))
            .count()
    }

    /// Events stored now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.read().by_time.len()
    }

    fn hash(&self, letter: SingleLetterTag, value: &str) -> u64 {
        self.hasher.hash_one((letter, value))
    }

    /// The filter's tag conditions as hashes: for each letter, the hashes of its values.
    fn hashed(&self, filter: &Filter) -> Vec<(SingleLetterTag, Vec<u64>)> {
        filter
            .generic_tags
            .iter()
            .map(|(letter, values)| {
                let hashes = values.iter().map(|v| self.hash(*letter, v)).collect();
                (*letter, hashes)
            })
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn get(&self, id: &EventId) -> Option<&Arc<Stored>> {
        let at = self.by_id.get(id)?;
        self.by_time.get(&time_key(*at, *id))
    }

    /// The stored events within the filter's `since` and `until`, oldest first.
    fn range(&self, filter: &Filter) -> impl DoubleEndedIterator<Item = &Arc<Stored>> {
        let since = filter.since.unwrap_or(Timestamp::from_secs(0));
        let until = filter.until.unwrap_or(Timestamp::from_secs(u64::MAX));
        // `BTreeMap::range` panics on a reversed range: an empty one stands in for it.
        let until = until.max(since);
        let empty = filter.since > filter.until && filter.until.is_some();
        let low = time_key(since, EventId::from_byte_array([0xff; 32]));
        let high = time_key(until, EventId::from_byte_array([0; 32]));
        self.by_time
            .range(low..=high)
            .filter(move |_| !empty)
            .map(|(_, stored)| stored)
    }

    fn remove(&mut self, at: Timestamp, id: EventId) {
        let Some(stored) = self.by_time.remove(&time_key(at, id)) else {
            return;
        };
        self.regular.remove(&time_key(at, id));
        self.by_id.remove(&id);
        if let Some(address) = &stored.address {
            if self.latest.get(address.as_ref()) == Some(&(at, id)) {
                self.latest.remove(address.as_ref());
            }
        }
    }

    /// Carry out the NIP-09 deletion `event`: `false` (and nothing changed) if it names an
    /// event or address that is not its author's.
    fn delete(&mut self, event: &Event, max: usize) -> bool {
        let author = event.pubkey;
        // Each `e` and `a` tag's value as written: nostr's `event_ids()` and `coordinates()`
        // skip a tag whose relay hint or marker it cannot read.
        let value = |name: &'static str| {
            event
                .tags
                .iter()
                .filter_map(move |tag| match tag.as_slice() {
                    [n, value, ..] if n == name => Some(value.as_str()),
                    _ => None,
                })
        };
        let ids: Vec<EventId> = value("e")
            .filter_map(|id| EventId::from_hex(id).ok())
            .collect();
        let addresses: Vec<Coordinate> = value("a")
            .filter_map(|a| Coordinate::from_kpi_format(a).ok())
            .collect();
        let foreign_event = ids
            .iter()
            .any(|id| self.get(id).is_some_and(|stored| stored.pubkey != author));
        if foreign_event || addresses.iter().any(|a| a.public_key != author) {
            return false;
        }
        for id in ids {
            if let Some(&at) = self.by_id.get(&id) {
                if at <= event.created_at {
                    self.remove(at, id);
                }
            }
            if self.deleted.insert(id, author).is_none() {
                self.deleted_order.push_back(id);
                if self.deleted_order.len() > max {
                    if let Some(old) = self.deleted_order.pop_front() {
                        self.deleted.remove(&old);
                    }
                }
            }
        }
        for address in addresses {
            if let Some(&(at, id)) = self.latest.get(&address) {
                if at <= event.created_at {
                    self.remove(at, id);
                }
            }
            match self.deleted_addresses.get_mut(&address) {
                Some(until) => *until = (*until).max(event.created_at),
                None => {
                    self.deleted_addresses
                        .insert(address.clone(), event.created_at);
                    self.deleted_addresses_order.push_back(address);
                    if self.deleted_addresses_order.len() > max {
                        if let Some(old) = self.deleted_addresses_order.pop_front() {
                            self.deleted_addresses.remove(&old);
                        }
                    }
                }
            }
        }
        true
    }
}

/// The address a replaceable (identifier empty) or addressable event is kept under: NIP-01's
/// kinds 0, 3 and 10000-19999, and 30000-39999 (nostr's `Kind::is_replaceable` also counts
/// NIP-28's kind 41, whose versions for different channels are different events).
fn address_of(event: &Event) -> Option<Coordinate> {
    let kind = event.kind.as_u16();
    if matches!(kind, 0 | 3 | 10_000..=19_999) {
        Some(Coordinate::new(event.kind, event.pubkey))
    } else if (30_000..=39_999).contains(&kind) {
        let identifier = event.tags.identifier().unwrap_or_default();
        Some(Coordinate::new(event.kind, event.pubkey).identifier(identifier))
    } else {
        None
    }
}

/// No set, an empty set, or one holding `value` (nostr's reading of a filter's lists).
fn within<T: Ord>(set: Option<&BTreeSet<T>>, value: &T) -> bool {
    set.is_none_or(|set| set.is_empty() || set.contains(value))
}

/// NIP-01 filter semantics, as nostr's `Filter::match_event`, on the stored form.
fn matches(
    filter: &Filter,
    tags: &[(SingleLetterTag, Vec<u64>)],
    stored: &Stored,
    now: Timestamp,
) -> bool {
    within(filter.ids.as_ref(), &stored.id)
        && within(filter.authors.as_ref(), &stored.pubkey)
        && within(filter.kinds.as_ref(), &stored.kind)
        && filter.since.is_none_or(|t| stored.created_at >= t)
        && filter.until.is_none_or(|t| stored.created_at <= t)
        && stored.expiration.is_none_or(|t| t >= now)
        && tags.iter().all(|(letter, hashes)| {
            stored
                .tags
                .iter()
                .any(|(l, h)| l == letter && hashes.contains(h))
        })
        && (filter.search.is_none()
            || Event::from_json(&*stored.json)
                .is_ok_and(|event| filter.match_event(&event, MatchEventOptions::new())))
}

#[cfg(test)]
mod tests;
