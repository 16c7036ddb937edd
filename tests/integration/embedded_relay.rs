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
    let relay = EmbeddedRelay::bind_with("127.0.0.1:0".parse().expect("addr"), options)
        .await
        .expect("bind");
    let url = relay.url();
    let stop = CancellationToken::new();
    tokio::spawn(relay.run(stop.clone()));

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
