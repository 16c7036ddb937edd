//! The embedded relay never drops an event silently: a reader that falls behind is told and
//! closed (and counted), and finds what it missed by subscribing again; memory is bounded.

use std::time::Duration;

use dvmd::relay::{EmbeddedRelay, EmbeddedRelayOptions};
use futures::{SinkExt, StreamExt};
use nostr_sdk::{
    ClientMessage, EventBuilder, Filter, JsonUtil, Keys, Kind, RelayMessage, SubscriptionId,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(url: &str) -> Socket {
    tokio_tungstenite::connect_async(url)
        .await
        .expect("connect")
        .0
}

async fn send(socket: &mut Socket, message: ClientMessage<'_>) {
    socket
        .send(Message::Text(message.as_json().into()))
        .await
        .expect("send");
}

/// Read until `want` matches a relay message, or the connection ends (`None`).
async fn read_until(
    socket: &mut Socket,
    mut want: impl FnMut(&RelayMessage<'static>) -> bool,
) -> Option<RelayMessage<'static>> {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("the relay answers");
        match next {
            Some(Ok(Message::Text(text))) => {
                let message = RelayMessage::from_json(text.as_str()).expect("relay message");
                if want(&message) {
                    return Some(message);
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

/// A relay with `options` started on loopback: its URL, and what stops it.
async fn relay_with(options: EmbeddedRelayOptions) -> (String, CancellationToken) {
    let relay = EmbeddedRelay::bind_with("127.0.0.1:0".parse().expect("addr"), options)
        .await
        .expect("bind");
    let url = relay.url();
    let stop = CancellationToken::new();
    tokio::spawn(relay.run(stop.clone()));
    (url, stop)
}

async fn relay() -> (String, CancellationToken) {
    relay_with(EmbeddedRelayOptions::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_falls_behind_is_closed_and_recovers_everything_by_resubscribing() {
    let options = EmbeddedRelayOptions {
        live_queue: 16,
        ..EmbeddedRelayOptions::default()
    };
    let relay = EmbeddedRelay::bind_with("127.0.0.1:0".parse().expect("addr"), options)
        .await
        .expect("bind");
    let (url, stats) = (relay.url(), relay.stats());
    let stop = CancellationToken::new();
    tokio::spawn(relay.run(stop.clone()));

    // A reader subscribes to everything, then stops reading.
    let mut slow = connect(&url).await;
    let everything = || Filter::new().kind(Kind::TextNote);
    send(
        &mut slow,
        ClientMessage::req(SubscriptionId::new("all"), vec![everything()]),
    )
    .await;
    read_until(&mut slow, |m| {
        matches!(m, RelayMessage::EndOfStoredEvents(_))
    })
    .await
    .expect("EOSE");

    // A writer publishes until the slow reader's socket and queue are full.
    let author = Keys::generate();
    let mut writer = connect(&url).await;
    let padding = "x".repeat(16 * 1024);
    let mut published = Vec::new();
    while stats.lagging_closed() == 0 {
        assert!(published.len() < 20_000, "the slow reader was never closed");
        let event = EventBuilder::text_note(format!("{} {padding}", published.len()))
            .sign_with_keys(&author)
            .expect("sign");
        send(&mut writer, ClientMessage::event(event.clone())).await;
        read_until(&mut writer, |m| matches!(m, RelayMessage::Ok { event_id, status: true, .. } if *event_id == event.id))
            .await
            .expect("OK");
        published.push(event.id);
    }
    assert_eq!(stats.lagging_closed(), 1);

    // The reader is told why before the connection closes.
    let notice = read_until(&mut slow, |m| matches!(m, RelayMessage::Notice(_))).await;
    assert!(
        matches!(&notice, Some(RelayMessage::Notice(text)) if text.contains("fell too far behind")),
        "{notice:?}"
    );
    assert!(
        read_until(&mut slow, |_| false).await.is_none(),
        "then closed"
    );

    // Subscribing again returns every stored event: nothing was lost, only delayed.
    let mut again = connect(&url).await;
    let all = Filter::new().kind(Kind::TextNote).limit(published.len());
    send(
        &mut again,
        ClientMessage::req(SubscriptionId::new("again"), vec![all]),
    )
    .await;
    let mut seen = std::collections::HashSet::new();
    read_until(&mut again, |m| match m {
        RelayMessage::Event { event, .. } => {
            seen.insert(event.id);
            false
        }
        RelayMessage::EndOfStoredEvents(_) => true,
        _ => false,
    })
    .await
    .expect("EOSE");
    assert!(
        published.iter().all(|id| seen.contains(id)),
        "{} of {} events found again",
        seen.len(),
        published.len()
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_events_are_bounded_and_the_oldest_go_first() {
    let options = EmbeddedRelayOptions {
        max_events: 50,
        ..EmbeddedRelayOptions::default()
    };
    let (url, stop) = relay_with(options).await;

    let author = Keys::generate();
    let mut socket = connect(&url).await;
    let mut published = Vec::new();
    for i in 0..120u64 {
        let event = EventBuilder::text_note(format!("note {i}"))
            .custom_created_at(nostr_sdk::Timestamp::from_secs(1_700_000_000 + i))
            .sign_with_keys(&author)
            .expect("sign");
        send(&mut socket, ClientMessage::event(event.clone())).await;
        read_until(&mut socket, |m| matches!(m, RelayMessage::Ok { .. }))
            .await
            .expect("OK");
        published.push(event.id);
    }
    let filter = Filter::new().kind(Kind::TextNote).limit(1_000);
    send(
        &mut socket,
        ClientMessage::req(SubscriptionId::new("s"), vec![filter]),
    )
    .await;
    let mut kept = Vec::new();
    read_until(&mut socket, |m| match m {
        RelayMessage::Event { event, .. } => {
            kept.push(event.id);
            false
        }
        _ => matches!(m, RelayMessage::EndOfStoredEvents(_)),
    })
    .await
    .expect("EOSE");
    assert_eq!(kept.len(), 50, "at most max_events are kept");
    assert!(
        published[70..].iter().all(|id| kept.contains(id)),
        "the newest are kept"
    );
    stop.cancel();
}

async fn send_text(socket: &mut Socket, text: String) {
    socket.send(Message::Text(text.into())).await.expect("send");
}

/// NIP-01: a `REQ` the relay cannot read is answered `CLOSED` with its subscription id, and
/// an `EVENT` `OK false` with its id, so a client stops waiting for `EOSE` or `OK`; an expired
/// ephemeral event is refused like a stored one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_relay_cannot_take_is_answered_as_nip01_says() {
    let (url, stop) = relay().await;
    let mut socket = connect(&url).await;
    send_text(
        &mut socket,
        r#"["REQ","unreadable",{"since":"yesterday"}]"#.into(),
    )
    .await;
    let closed = read_until(&mut socket, |_| true).await.expect("an answer");
    let RelayMessage::Closed {
        subscription_id,
        message,
    } = closed
    else {
        panic!("expected CLOSED, got {closed:?}")
    };
    assert_eq!(subscription_id.to_string(), "unreadable");
    assert!(message.starts_with("invalid:"), "{message}");

    // Too many filters to run at once (each one a query under the store's lock): refused,
    // and the subscription a REQ before opened under the same id ends with it.
    let notes = nostr_sdk::Filter::new().kind(Kind::from(1));
    send(
        &mut socket,
        ClientMessage::req(nostr_sdk::SubscriptionId::new("many"), vec![notes]),
    )
    .await;
    read_until(&mut socket, |m| {
        matches!(m, RelayMessage::EndOfStoredEvents(_))
    })
    .await
    .expect("EOSE");
    let many = vec![nostr_sdk::Filter::new().limit(5000); 21];
    send(
        &mut socket,
        ClientMessage::req(nostr_sdk::SubscriptionId::new("many"), many),
    )
    .await;
    let closed = read_until(&mut socket, |_| true).await.expect("an answer");
    assert!(
        matches!(&closed, RelayMessage::Closed { subscription_id, message } if subscription_id.to_string() == "many" && message.contains("at most 20 in one REQ")),
        "{closed:?}"
    );
    let note = EventBuilder::text_note("after the refusal")
        .sign_with_keys(&Keys::generate())
        .expect("sign");
    send(&mut socket, ClientMessage::event(note)).await;
    let mut heard = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_millis(500),
        read_until(&mut socket, |m| {
            heard.push(m.clone());
            false
        }),
    )
    .await;
    assert!(
        !heard
            .iter()
            .any(|m| matches!(m, RelayMessage::Event { .. })),
        "the refused subscription's id sends nothing: {heard:?}"
    );

    let id = "ab".repeat(32);
    send_text(
        &mut socket,
        format!(r#"["EVENT",{{"id":"{id}","kind":1}}]"#),
    )
    .await;
    let ok = read_until(&mut socket, |_| true).await.expect("an answer");
    let RelayMessage::Ok {
        event_id,
        status,
        message,
    } = ok
    else {
        panic!("expected OK, got {ok:?}")
    };
    assert_eq!((event_id.to_hex(), status), (id, false));
    assert!(message.starts_with("invalid:"), "{message}");

    let expired = EventBuilder::new(Kind::from(20_001), "gone")
        .tags([nostr_sdk::Tag::expiration(nostr_sdk::Timestamp::from_secs(
            1_000,
        ))])
        .sign_with_keys(&Keys::generate())
        .expect("sign");
    send(&mut socket, ClientMessage::event(expired)).await;
    let ok = read_until(&mut socket, |_| true).await.expect("an answer");
    assert!(
        matches!(&ok, RelayMessage::Ok { status: false, message, .. } if message.contains("expired")),
        "{ok:?}"
    );
    stop.cancel();
}

/// A subscriber waiting on `#p` gets an event live whatever relay hint its `p` tag carries
/// (one nostr cannot read as a URL included), as a filter compares the tag's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p_tag_with_any_relay_hint_reaches_its_subscriber() {
    let (url, stop) = relay().await;
    let customer = Keys::generate();
    let mut listener = connect(&url).await;
    let filter = Filter::new().pubkey(customer.public_key());
    send(
        &mut listener,
        ClientMessage::req(SubscriptionId::new("mine"), vec![filter]),
    )
    .await;
    read_until(&mut listener, |m| {
        matches!(m, RelayMessage::EndOfStoredEvents(_))
    })
    .await
    .expect("EOSE");
    let tag = nostr_sdk::Tag::parse([
        "p".to_owned(),
        customer.public_key().to_hex(),
        "relay.example.com".to_owned(),
    ])
    .expect("tag");
    let event = EventBuilder::new(Kind::from(7000), "for you")
        .tags([tag])
        .sign_with_keys(&Keys::generate())
        .expect("sign");
    let mut publisher = connect(&url).await;
    send(&mut publisher, ClientMessage::event(event.clone())).await;
    read_until(&mut publisher, |m| {
        matches!(m, RelayMessage::Ok { status: true, .. })
    })
    .await
    .expect("stored");
    let got = read_until(&mut listener, |m| matches!(m, RelayMessage::Event { .. }))
        .await
        .expect("the event, live");
    let RelayMessage::Event { event: got, .. } = got else {
        unreachable!()
    };
    assert_eq!(got.id, event.id);
    stop.cancel();
}

/// Subscriptions made while events pour in get each matching event once: as stored or live,
/// never both (NIP-01 clients need not drop repeats).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_made_while_events_arrive_gets_each_once() {
    let (url, stop) = relay().await;
    let author = Keys::generate();
    let events: Vec<nostr_sdk::Event> = (0..3_000)
        .map(|i| {
            EventBuilder::text_note(format!("note {i}"))
                .sign_with_keys(&author)
                .expect("sign")
        })
        .collect();
    let mut publisher = connect(&url).await;
    let flood = tokio::spawn(async move {
        for event in events {
            send(&mut publisher, ClientMessage::event(event)).await;
        }
        let mut oks = 0;
        read_until(&mut publisher, |m| {
            oks += usize::from(matches!(m, RelayMessage::Ok { .. }));
            oks == 3_000
        })
        .await
        .expect("every OK");
    });
    let mut listener = connect(&url).await;
    let mut seen = std::collections::HashMap::new();
    let mut count = |m: &RelayMessage<'static>| {
        if let RelayMessage::Event {
            subscription_id,
            event,
        } = m
        {
            *seen
                .entry((subscription_id.to_string(), event.id))
                .or_insert(0) += 1;
        }
    };
    // One subscription after another, each closed at its EOSE, while the flood goes on.
    for i in 0..200 {
        let sub = SubscriptionId::new(format!("s{i}"));
        let filter = Filter::new().kind(Kind::TextNote).limit(5);
        send(&mut listener, ClientMessage::req(sub.clone(), vec![filter])).await;
        read_until(&mut listener, |m| {
            count(m);
            matches!(m, RelayMessage::EndOfStoredEvents(id) if **id == sub)
        })
        .await
        .expect("EOSE");
        send(&mut listener, ClientMessage::close(sub)).await;
    }
    flood.await.expect("flood");
    // Everything sent is read: a last subscription's EOSE comes after it.
    send(
        &mut listener,
        ClientMessage::req(SubscriptionId::new("last"), vec![Filter::new().limit(0)]),
    )
    .await;
    read_until(&mut listener, |m| {
        count(m);
        matches!(m, RelayMessage::EndOfStoredEvents(id) if id.to_string() == "last")
    })
    .await
    .expect("EOSE of the last");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(seen.len() >= 1_000, "{}", seen.len());
    assert!(
        twice.is_empty(),
        "{} events came twice: {twice:?}",
        twice.len()
    );
    stop.cancel();
}

/// A `REQ` that reuses a subscription id replaces it: events the old filters matched that
/// were still queued for a slow reader are not sent under that id after the new `EOSE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_subscription_sends_nothing_of_its_old_filters() {
    let options = EmbeddedRelayOptions {
        live_queue: 100_000,
        ..EmbeddedRelayOptions::default()
    };
    let (url, stop) = relay_with(options).await;
    let sub = SubscriptionId::new("s");
    let mut listener = connect(&url).await;
    let notes = Filter::new().kind(Kind::TextNote).limit(0);
    send(&mut listener, ClientMessage::req(sub.clone(), vec![notes])).await;
    read_until(&mut listener, |m| {
        matches!(m, RelayMessage::EndOfStoredEvents(_))
    })
    .await
    .expect("EOSE");
    // The listener reads nothing while 12 MB of notes are published: more than the socket
    // holds, so most wait in the relay's queue for it.
    let author = Keys::generate();
    let mut publisher = connect(&url).await;
    let body = "x".repeat(4_000);
    for i in 0..3_000 {
        let note = EventBuilder::text_note(format!("{i} {body}"))
            .sign_with_keys(&author)
            .expect("sign");
        send(&mut publisher, ClientMessage::event(note)).await;
    }
    let mut oks = 0;
    read_until(&mut publisher, |m| {
        oks += usize::from(matches!(m, RelayMessage::Ok { .. }));
        oks == 3_000
    })
    .await
    .expect("every OK");
    // Now `s` asks for kind 7000 only.
    let feedback = Filter::new().kind(Kind::from(7000)).limit(0);
    send(
        &mut listener,
        ClientMessage::req(sub.clone(), vec![feedback]),
    )
    .await;
    let (mut before, mut eose) = (0, false);
    let mut after = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(2), listener.next()).await;
        let Ok(Some(Ok(Message::Text(text)))) = next else {
            break;
        };
        match RelayMessage::from_json(text.as_str()).expect("relay message") {
            RelayMessage::EndOfStoredEvents(_) => eose = true,
            RelayMessage::Event { event, .. } if eose => after.push(event.kind),
            RelayMessage::Event { .. } => before += 1,
            _ => {}
        }
    }
    assert!(eose, "EOSE of the new REQ");
    assert!(
        before < 3_000,
        "the reader was behind: {before} notes came first"
    );
    assert!(
        after.is_empty(),
        "{} notes came after the new EOSE under the replaced id",
        after.len()
    );
    stop.cancel();
}
