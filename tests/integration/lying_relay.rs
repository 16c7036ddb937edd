//! A relay that lies to our relay pool. nostr-relay-pool remembers the ids it verified so that
//! an event several relays send is verified once; as published (0.44.3), a remembered id vouched
//! for whatever content and signature came under it. dvmd's vendored copy
//! (`vendor/nostr-relay-pool/DVMD-PATCH.md`) accepts a remembered id only with the same
//! signature and content that hashes to it. Every dvmd process routes the pool's check through
//! `dvmd::signatures` (§3 there), so that is the check this test installs and holds to it.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use nostr_sdk::prelude::{MemoryDatabase, MemoryDatabaseOptions, RelayPoolNotification};
use nostr_sdk::{Client, Event, EventBuilder, Filter, JsonUtil, Keys, Kind};
use tokio_tungstenite::tungstenite::Message;

/// A relay that answers every `REQ` with `events` (raw JSON, sent as they are), then `EOSE`.
async fn scripted_relay(events: Vec<String>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("ws://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let events = events.clone();
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    let Ok(text) = message.to_text() else {
                        continue;
                    };
                    let Ok(serde_json::Value::Array(parts)) = serde_json::from_str(text) else {
                        continue;
                    };
                    if parts.first().and_then(|v| v.as_str()) != Some("REQ") {
                        continue;
                    }
                    let sub = parts[1].to_string();
                    for event in &events {
                        let frame = format!(r#"["EVENT",{sub},{event}]"#);
                        if socket.send(Message::text(frame)).await.is_err() {
                            return;
                        }
                    }
                    let eose = format!(r#"["EOSE",{sub}]"#);
                    if socket.send(Message::text(eose)).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// `event` as JSON with `field` replaced by `value`; the rest (id included) as it was.
fn altered(event: &Event, field: &str, value: &str) -> String {
    let mut json: serde_json::Value = serde_json::from_str(&event.as_json()).expect("json");
    json[field] = serde_json::Value::String(value.to_owned());
    json.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_id_never_vouches_for_other_content_or_another_signature() {
    dvmd::signatures::install();
    let keys = Keys::generate();
    let note = |text: &str| {
        EventBuilder::text_note(text)
            .sign_with_keys(&keys)
            .expect("sign")
    };
    let (a, b, c) = (note("a"), note("b"), note("c"));
    // `a` and `b` are genuine, so the pool verifies and remembers both. Then `a`'s id comes
    // again under `b`'s signature, and again with `a`'s signature over other content. `c` is
    // genuine and marks the end.
    let script = vec![
        a.as_json(),
        b.as_json(),
        altered(&a, "sig", &b.sig.to_string()),
        altered(&a, "content", "forged"),
        c.as_json(),
    ];
    let url = scripted_relay(script).await;
    // A seen-ids store of one id, so that the store has forgotten `a` by the time the forgeries
    // come, and only the verification cache stands between them and a notification.
    let client = Client::builder()
        .database(MemoryDatabase::with_opts(MemoryDatabaseOptions {
            events: false,
            max_events: Some(1),
        }))
        .build();
    client.add_relay(&url).await.expect("add relay");
    client.connect().await;
    let mut notifications = client.notifications();
    client
        .subscribe(Filter::new().kind(Kind::TextNote), None)
        .await
        .expect("subscribe");

    let mut delivered: Vec<Event> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !delivered.iter().any(|e| e.id == c.id) {
        let notification = tokio::time::timeout_at(deadline, notifications.recv())
            .await
            .expect("the genuine events arrive")
            .expect("notifications open");
        if let RelayPoolNotification::Event { event, .. } = notification {
            delivered.push(*event);
        }
    }
    client.shutdown().await;

    for event in &delivered {
        assert!(
            event.verify().is_ok(),
            "the pool delivered an event that does not verify: {}",
            event.as_json()
        );
    }
    let contents: Vec<&str> = delivered.iter().map(|e| e.content.as_str()).collect();
    assert_eq!(contents, ["a", "b", "c"]);
}
