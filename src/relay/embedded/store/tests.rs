use nostr_sdk::{EventBuilder, Keys, Tag, TagKind};

use super::*;

fn event(keys: &Keys, kind: u16, at: u64, tags: Vec<Tag>) -> Event {
    EventBuilder::new(Kind::from(kind), format!("at {at}"))
        .tags(tags)
        .custom_created_at(Timestamp::from_secs(at))
        .sign_with_keys(keys)
        .expect("sign")
}

fn save(store: &Store, event: &Event) -> Saved {
    store.save(event, &event.as_json())
}

fn ids(found: &[Arc<Stored>]) -> Vec<EventId> {
    found.iter().map(|s| s.id).collect()
}

#[test]
fn newest_first_within_the_limit_and_as_sent() {
    let store = Store::new(100);
    let keys = Keys::generate();
    let events: Vec<Event> = (1..=5).map(|at| event(&keys, 1, at, vec![])).collect();
    for e in &events {
        assert_eq!(save(&store, e), Saved::Stored);
    }
    assert_eq!(save(&store, &events[2]), Saved::Duplicate);

    let found = store.query(&Filter::new(), 3);
    assert_eq!(ids(&found), vec![events[4].id, events[3].id, events[2].id]);
    let back = Event::from_json(&*found[0].json).expect("stored JSON parses");
    assert_eq!(back, events[4]);

    let window = Filter::new()
        .since(Timestamp::from_secs(2))
        .until(Timestamp::from_secs(3));
    assert_eq!(
        ids(&store.query(&window, 10)),
        vec![events[2].id, events[1].id]
    );
    assert_eq!(store.count(&window), 2);
    let reversed = Filter::new()
        .since(Timestamp::from_secs(4))
        .until(Timestamp::from_secs(2));
    assert!(store.query(&reversed, 10).is_empty(), "since after until");

    let by_id = Filter::new().ids([events[0].id, events[3].id]);
    assert_eq!(
        ids(&store.query(&by_id, 10)),
        vec![events[3].id, events[0].id]
    );
}

/// The stored form answers every filter as nostr's own `Filter::match_event` does on the
/// parsed event.
#[test]
fn filters_match_as_nostr_matches_them() {
    let store = Store::new(100);
    let (alice, bob) = (Keys::generate(), Keys::generate());
    let request = event(&alice, 5050, 10, vec![Tag::public_key(bob.public_key())]);
    let events = vec![
        request.clone(),
        event(
            &bob,
            7000,
            11,
            vec![Tag::event(request.id), Tag::public_key(alice.public_key())],
        ),
        event(
            &bob,
            6050,
            12,
            vec![
                Tag::event(request.id),
                Tag::public_key(alice.public_key()),
                Tag::custom(TagKind::custom("request"), [request.as_json()]),
            ],
        ),
        event(&bob, 1985, 13, vec![Tag::hashtag("dvm")]),
        // The same value under another letter must not match a `#p` filter.
        event(&bob, 1, 14, vec![Tag::event(request.id)]),
    ];
    for e in &events {
        assert_eq!(save(&store, e), Saved::Stored);
    }
    let p_alice = SingleLetterTag::lowercase(nostr_sdk::Alphabet::P);
    let filters = vec![
        Filter::new(),
        Filter::new().kinds([Kind::from(7000), Kind::from(6050)]),
        Filter::new().author(bob.public_key()),
        Filter::new().pubkey(alice.public_key()),
        Filter::new().pubkey(bob.public_key()),
        Filter::new().event(request.id),
        Filter::new()
            .event(request.id)
            .pubkey(alice.public_key())
            .kind(Kind::from(6050)),
        Filter::new().custom_tag(p_alice, request.id.to_hex()),
        Filter::new().hashtag("dvm"),
        Filter::new().hashtag("other"),
        Filter::new().custom_tags(p_alice, Vec::<String>::new()),
        Filter::new().search("AT 1"),
        Filter::new().search("at 12"),
        Filter::new().since(Timestamp::from_secs(12)),
        Filter::new().until(Timestamp::from_secs(11)),
        Filter::new().ids([request.id]).author(bob.public_key()),
    ];
    for filter in &filters {
        let expected: Vec<EventId> = events
            .iter()
            .rev()
            .filter(|e| filter.match_event(e, MatchEventOptions::new()))
            .map(|e| e.id)
            .collect();
        assert_eq!(
            ids(&store.query(filter, 100)),
            expected,
            "filter {}",
            filter.as_json()
        );
        assert_eq!(store.count(filter), expected.len());
    }
}

#[test]
fn the_oldest_go_first_when_full() {
    let store = Store::new(3);
    let keys = Keys::generate();
    let events: Vec<Event> = (1..=5).map(|at| event(&keys, 1, at, vec![])).collect();
    for e in &events {
        save(&store, e);
    }
    assert_eq!(store.len(), 3);
    assert_eq!(
        ids(&store.query(&Filter::new(), 10)),
        vec![events[4].id, events[3].id, events[2].id]
    );
    let inner = store.read();
    assert_eq!(inner.by_id.len(), 3, "the id index shrinks with the store");
}

#[test]
fn replaceable_and_addressable_events_keep_their_newest_version() {
    let store = Store::new(100);
    let keys = Keys::generate();
    let old = event(&keys, 0, 10, vec![]);
    let new = event(&keys, 0, 20, vec![]);
    assert_eq!(save(&store, &old), Saved::Stored);
    assert_eq!(save(&store, &new), Saved::Stored);
    assert_eq!(save(&store, &old), Saved::Replaced, "the older one is gone");
    let profiles = Filter::new().kind(Kind::Metadata);
    assert_eq!(ids(&store.query(&profiles, 10)), vec![new.id]);

    // On a tie the lowest id stays.
    let (a, b) = (
        event(&keys, 0, 30, vec![Tag::hashtag("a")]),
        event(&keys, 0, 30, vec![Tag::hashtag("b")]),
    );
    let (low, high) = if a.id < b.id { (a, b) } else { (b, a) };
    assert_eq!(save(&store, &high), Saved::Stored);
    assert_eq!(save(&store, &low), Saved::Stored);
    assert_eq!(save(&store, &high), Saved::Replaced);
    assert_eq!(ids(&store.query(&profiles, 10)), vec![low.id]);

    // Addressable: one version per `d`.
    let d = |v: &str| vec![Tag::identifier(v)];
    let x1 = event(&keys, 31990, 10, d("x"));
    let y1 = event(&keys, 31990, 11, d("y"));
    let x2 = event(&keys, 31990, 12, d("x"));
    for e in [&x1, &y1, &x2] {
        assert_eq!(save(&store, e), Saved::Stored);
    }
    let announcements = Filter::new().kind(Kind::from(31990));
    assert_eq!(ids(&store.query(&announcements, 10)), vec![x2.id, y1.id]);
    assert_eq!(store.read().latest.len(), 3, "kind 0, x and y");
}

#[test]
fn an_author_deletes_their_events_and_no_one_else_can() {
    let store = Store::new(100);
    let (alice, mallory) = (Keys::generate(), Keys::generate());
    let request = event(&alice, 5050, 10, vec![]);
    assert_eq!(save(&store, &request), Saved::Stored);

    let forged = event(&mallory, 5, 11, vec![Tag::event(request.id)]);
    assert_eq!(save(&store, &forged), Saved::InvalidDelete);
    assert_eq!(store.query(&Filter::new().id(request.id), 1).len(), 1);

    let deletion = event(&alice, 5, 11, vec![Tag::event(request.id)]);
    assert_eq!(save(&store, &deletion), Saved::Stored);
    assert!(store.query(&Filter::new().id(request.id), 1).is_empty());
    assert_eq!(
        save(&store, &request),
        Saved::Deleted,
        "refused if it comes again"
    );

    // A deletion of an event not seen yet holds only against its author.
    let later = event(&alice, 5050, 12, vec![]);
    let premature = event(&mallory, 5, 12, vec![Tag::event(later.id)]);
    assert_eq!(save(&store, &premature), Saved::Stored);
    assert_eq!(save(&store, &later), Saved::Stored);

    // Addresses: deleted up to the deletion's time.
    let old = event(&alice, 31990, 20, vec![Tag::identifier("x")]);
    assert_eq!(save(&store, &old), Saved::Stored);
    let coordinate = Coordinate::new(Kind::from(31990), alice.public_key()).identifier("x");
    let by_address = event(
        &alice,
        5,
        21,
        vec![Tag::coordinate(coordinate.clone(), None)],
    );
    assert_eq!(save(&store, &by_address), Saved::Stored);
    assert!(store.query(&Filter::new().id(old.id), 1).is_empty());
    let older = event(&alice, 31990, 21, vec![Tag::identifier("x")]);
    assert_eq!(save(&store, &older), Saved::Deleted);
    let newer = event(&alice, 31990, 22, vec![Tag::identifier("x")]);
    assert_eq!(save(&store, &newer), Saved::Stored);
    let theirs = event(&mallory, 5, 23, vec![Tag::coordinate(coordinate, None)]);
    assert_eq!(save(&store, &theirs), Saved::InvalidDelete);

    // Tags with relay hints nostr cannot read as URLs name their event and address all the
    // same.
    let hinted = |name: &str, value: String| {
        Tag::parse([name.to_owned(), value, "relay.example.com".to_owned()]).expect("tag")
    };
    let note = event(&alice, 1, 30, vec![]);
    let profile = event(&alice, 30_023, 30, vec![Tag::identifier("y")]);
    assert_eq!(save(&store, &note), Saved::Stored);
    assert_eq!(save(&store, &profile), Saved::Stored);
    let address = format!("30023:{}:y", alice.public_key().to_hex());
    let deletion = event(
        &alice,
        5,
        31,
        vec![hinted("e", note.id.to_hex()), hinted("a", address)],
    );
    assert_eq!(save(&store, &deletion), Saved::Stored);
    assert!(store.query(&Filter::new().id(note.id), 1).is_empty());
    assert!(store.query(&Filter::new().id(profile.id), 1).is_empty());
}

#[test]
fn what_deletions_leave_behind_is_bounded() {
    let store = Store::new(4);
    let keys = Keys::generate();
    for at in 0..20 {
        let target = event(&keys, 1, at, vec![]);
        save(&store, &target);
        let coordinate =
            Coordinate::new(Kind::from(30000), keys.public_key()).identifier(at.to_string());
        let deletion = event(
            &keys,
            5,
            at,
            vec![Tag::event(target.id), Tag::coordinate(coordinate, None)],
        );
        save(&store, &deletion);
    }
    let inner = store.read();
    assert!(inner.deleted.len() <= 4 && inner.deleted_order.len() <= 4);
    assert!(inner.deleted_addresses.len() <= 4 && inner.deleted_addresses_order.len() <= 4);
    assert!(inner.by_time.len() <= 4 && inner.by_id.len() <= 4);
}

#[test]
fn expired_events_are_refused_and_not_served() {
    let store = Store::new(100);
    let keys = Keys::generate();
    let now = Timestamp::now().as_secs();
    let gone = event(
        &keys,
        1,
        now - 10,
        vec![Tag::expiration(Timestamp::from_secs(now - 1))],
    );
    assert_eq!(save(&store, &gone), Saved::Expired);
    let soon = event(
        &keys,
        1,
        now - 10,
        vec![Tag::expiration(Timestamp::from_secs(now + 1))],
    );
    assert_eq!(save(&store, &soon), Saved::Stored);
    assert_eq!(store.query(&Filter::new(), 10).len(), 1);
    let later = Timestamp::from_secs(now + 2);
    assert!(
        store.query_at(&Filter::new(), 10, later).is_empty(),
        "not served once expired"
    );
}

/// NIP-01: newest first, and among events of one second the lowest id first, which is also
/// the one a limit keeps.
#[test]
fn events_of_one_second_come_lowest_id_first() {
    let store = Store::new(100);
    let keys = Keys::generate();
    let mut same: Vec<Event> = (0..4)
        .map(|n| event(&keys, 1, 50, vec![Tag::hashtag(n.to_string())]))
        .collect();
    let (before, after) = (event(&keys, 1, 49, vec![]), event(&keys, 1, 51, vec![]));
    for e in same.iter().chain([&before, &after]) {
        save(&store, e);
    }
    same.sort_by_key(|e| e.id);
    let mut expected = vec![after.id];
    expected.extend(same.iter().map(|e| e.id));
    expected.push(before.id);
    assert_eq!(ids(&store.query(&Filter::new(), 10)), expected);
    let second = Filter::new()
        .since(Timestamp::from_secs(50))
        .until(Timestamp::from_secs(50));
    assert_eq!(ids(&store.query(&second, 1)), vec![same[0].id]);
    let by_id = Filter::new().ids(same.iter().rev().map(|e| e.id));
    assert_eq!(
        ids(&store.query(&by_id, 10)),
        same.iter().map(|e| e.id).collect::<Vec<_>>()
    );
}

/// A full store lets the oldest regular event go before any profile or announcement, however
/// old: a DVM publishes those once per start, and clients look for it by them.
#[test]
fn a_full_store_keeps_replaceable_and_addressable_events() {
    let store = Store::new(4);
    let keys = Keys::generate();
    let profile = event(&keys, 0, 1, vec![]);
    let announcement = event(&keys, 31990, 2, vec![Tag::identifier("dvmd")]);
    save(&store, &profile);
    save(&store, &announcement);
    let traffic: Vec<Event> = (3..=20).map(|at| event(&keys, 7000, at, vec![])).collect();
    for e in &traffic {
        assert_eq!(save(&store, e), Saved::Stored);
    }
    assert_eq!(store.len(), 4);
    assert_eq!(
        ids(&store.query(&Filter::new(), 10)),
        vec![traffic[17].id, traffic[16].id, announcement.id, profile.id]
    );
    // A store of replaceables only still holds `max_events`: the oldest goes.
    let full = Store::new(2);
    let profiles: Vec<Event> = (1..=3)
        .map(|at| event(&Keys::generate(), 0, at, vec![]))
        .collect();
    for e in &profiles {
        save(&full, e);
    }
    assert_eq!(
        ids(&full.query(&Filter::new(), 10)),
        vec![profiles[2].id, profiles[1].id]
    );
    assert_eq!(full.read().latest.len(), 2);
}

/// Kind 41 (NIP-28 channel metadata) is a regular event: one per channel, all kept.
#[test]
fn only_nip01_kinds_are_replaceable() {
    let store = Store::new(100);
    let keys = Keys::generate();
    let channels: Vec<Event> = ["a", "b"]
        .iter()
        .map(|c| event(&keys, 41, 10, vec![Tag::hashtag(*c)]))
        .collect();
    for e in &channels {
        assert_eq!(save(&store, e), Saved::Stored);
    }
    assert_eq!(
        store.query(&Filter::new().kind(Kind::from(41)), 10).len(),
        2
    );
    for (kind, replaceable) in [
        (0, true),
        (3, true),
        (10_002, true),
        (30_023, true),
        (1, false),
        (41, false),
        (20_000, false),
    ] {
        let e = event(&keys, kind, 1, vec![]);
        assert_eq!(address_of(&e).is_some(), replaceable, "kind {kind}");
    }
}
