//! One client connection to the embedded relay: NIP-01 `EVENT`, `REQ`, `CLOSE` (and NIP-45
//! `COUNT`) in, `OK`, `EVENT`, `EOSE`, `CLOSED`, `NOTICE` out.
//!
//! Two bounded queues feed the socket: answers to this client's own messages (the reader waits
//! for room, so a client that does not read only slows itself) and live events from other
//! clients (never waited for: when full, the client has fallen behind and is closed).

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use nostr_sdk::{ClientMessage, Event, EventId, Filter, JsonUtil, RelayMessage, SubscriptionId};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::store::Saved;
use super::{event_message, Shared};

/// Answers queued for one client.
const ANSWER_QUEUE: usize = 1024;
/// Most messages written to a socket at once.
const WRITE_BATCH: usize = 64;
/// Most filters in one `REQ` (strfry's default): each runs against the store under the lock
/// that orders stored and live events, and collects up to `max_limit` events, so a `REQ` of
/// thousands of filters held every writer and could gather gigabytes.
pub(super) const MAX_FILTERS: usize = 20;

/// Serve one upgraded websocket until it closes, falls behind, or the relay stops.
pub(super) async fn serve(
    shared: Arc<Shared>,
    socket: WebSocketStream<TcpStream>,
    stop: CancellationToken,
) {
    let (mut sink, mut incoming) = socket.split();
    let (answers, mut answer_queue) = mpsc::channel::<String>(ANSWER_QUEUE);
    let (live, mut live_queue) =
        mpsc::channel::<super::subscriptions::Live>(shared.options.live_queue);
    let lagging = CancellationToken::new();
    let id = shared.subscriptions.connect(live, lagging.clone());
    let session = Session {
        shared: shared.clone(),
        id,
        answers,
    };

    let current = |instance| shared.subscriptions.is_current(id, instance);
    let writer = async {
        loop {
            let text = tokio::select! {
                biased;
                answer = answer_queue.recv() => answer,
                event = live_queue.recv() => match event {
                    Some((instance, text)) if current(instance) => Some(text),
                    Some(_) => continue,
                    None => None,
                },
                _ = lagging.cancelled() => {
                    let notice = RelayMessage::notice(
                        "error: you fell too far behind; reconnect and subscribe again with `since`",
                    );
                    let _ = sink.send(Message::Text(notice.as_json().into())).await;
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code: CloseCode::Again,
                            reason: "reader too slow".into(),
                        })))
                        .await;
                    break;
                }
            };
            let Some(text) = text else { break };
            if write_queued(&mut sink, text, &mut answer_queue, &mut live_queue, current)
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let reader = async {
        while let Some(Ok(message)) = incoming.next().await {
            match message {
                Message::Text(text) => {
                    if session.handle(text.as_str()).await.is_err() {
                        break;
                    }
                }
                Message::Binary(_) => {
                    let _ = session
                        .answer(RelayMessage::notice(
                            "error: binary messages are not supported",
                        ))
                        .await;
                }
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
        _ = stop.cancelled() => {}
    }
    shared.subscriptions.disconnect(id);
}

/// Write `first` and whatever else is queued already (up to [`WRITE_BATCH`] messages, answers
/// first), then flush once: under load a connection has many messages waiting, and each write
/// is a syscall here and a wake-up for the reader. A live event whose subscription instance is
/// no longer `current` (closed, or replaced by a `REQ` with its id) is dropped.
async fn write_queued<S>(
    sink: &mut S,
    first: String,
    answers: &mut mpsc::Receiver<String>,
    live: &mut mpsc::Receiver<super::subscriptions::Live>,
    current: impl Fn(u64) -> bool,
) -> Result<(), S::Error>
where
    S: futures::Sink<Message> + Unpin,
{
    sink.feed(Message::Text(first.into())).await?;
    let mut written = 1;
    while written < WRITE_BATCH {
        let text = match answers.try_recv() {
            Ok(text) => text,
            Err(_) => match live.try_recv() {
                Ok((instance, text)) if current(instance) => text,
                Ok(_) => continue,
                Err(_) => break,
            },
        };
        sink.feed(Message::Text(text.into())).await?;
        written += 1;
    }
    sink.flush().await
}

/// An `EVENT` message read straight into its event, or `None` for any other message (or a
/// malformed one, which [`ClientMessage::from_json`] then answers). `from_json` reads every
/// message into a `serde_json::Value` first and copies the event out of it; `EVENT` is most of
/// what a relay reads.
fn read_event_message(text: &str) -> Option<Event> {
    let (verb, event) = serde_json::from_str::<(String, Event)>(text).ok()?;
    (verb == "EVENT").then_some(event)
}

/// The answer to a message nostr cannot read: NIP-01's `CLOSED` for a `REQ` and `OK false` for
/// an `EVENT` (when its subscription id or event id can be read), so the client stops waiting
/// for `EOSE` or `OK`; a `NOTICE` otherwise.
fn refusal(text: &str, why: &str) -> RelayMessage<'static> {
    let why = format!("invalid: cannot read this message: {why}");
    let value: Option<serde_json::Value> = serde_json::from_str(text).ok();
    let parts = value.as_ref().and_then(|v| v.as_array());
    match parts.map(Vec::as_slice) {
        Some([verb, id, ..]) if verb == "REQ" => match id.as_str() {
            Some(id) => RelayMessage::Closed {
                subscription_id: Cow::Owned(SubscriptionId::new(id)),
                message: Cow::Owned(why),
            },
            None => RelayMessage::notice(why),
        },
        Some([verb, event, ..]) if verb == "EVENT" => {
            match event["id"]
                .as_str()
                .and_then(|id| EventId::from_hex(id).ok())
            {
                Some(event_id) => RelayMessage::Ok {
                    event_id,
                    status: false,
                    message: Cow::Owned(why),
                },
                None => RelayMessage::notice(why),
            }
        }
        _ => RelayMessage::notice(why),
    }
}

struct Session {
    shared: Arc<Shared>,
    id: super::subscriptions::ConnectionId,
    answers: mpsc::Sender<String>,
}

/// The client went away.
struct Gone;

impl Session {
    async fn answer(&self, message: RelayMessage<'_>) -> Result<(), Gone> {
        self.answers.send(message.as_json()).await.map_err(|_| Gone)
    }

    async fn handle(&self, text: &str) -> Result<(), Gone> {
        if let Some(event) = read_event_message(text) {
            return self.event(event, text.len()).await;
        }
        let message = match ClientMessage::from_json(text) {
            Ok(message) => message,
            Err(e) => return self.answer(refusal(text, &e.to_string())).await,
        };
        match message {
            ClientMessage::Event(event) => self.event(event.into_owned(), text.len()).await,
            ClientMessage::Req {
                subscription_id,
                filters,
            } => {
                let filters = filters.into_iter().map(Cow::into_owned).collect();
                self.req(subscription_id.into_owned(), filters).await
            }
            ClientMessage::Count {
                subscription_id,
                filter,
            } => {
                let count = self.shared.store.count(&filter);
                self.answer(RelayMessage::Count {
                    subscription_id,
                    count,
                })
                .await
            }
            ClientMessage::Close(subscription_id) => {
                self.shared
                    .subscriptions
                    .unsubscribe(self.id, &subscription_id);
                Ok(())
            }
            _ => {
                self.answer(RelayMessage::notice(
                    "unsupported: this relay speaks NIP-01 EVENT, REQ, CLOSE and COUNT",
                ))
                .await
            }
        }
    }

    /// An `EVENT` message of `size` bytes.
    async fn event(&self, event: Event, size: usize) -> Result<(), Gone> {
        let ok = |status: bool, message: &str| RelayMessage::Ok {
            event_id: event.id,
            status,
            message: Cow::Owned(message.to_owned()),
        };
        let limit = self.shared.options.max_event_bytes;
        if size > limit {
            let why = format!(
                "invalid: event too large ({size} bytes; this relay accepts at most {limit})"
            );
            return self.answer(ok(false, &why)).await;
        }
        // Once per process: an event we signed, or one verified before, costs a hash.
        if !crate::signatures::verify(&event) {
            return self
                .answer(ok(false, "invalid: bad event id or signature"))
                .await;
        }
        let json = crate::event_json::to_json(&event);
        if event.kind.is_ephemeral() {
            if event.is_expired() {
                return self
                    .answer(ok(false, "invalid: this event has expired"))
                    .await;
            }
            self.shared.subscriptions.publish(&event, &json);
            return self.answer(ok(true, "")).await;
        }
        let saved = {
            let _order = self.shared.order.read().unwrap_or_else(|e| e.into_inner());
            let saved = self.shared.store.save(&event, &json);
            if saved == Saved::Stored {
                self.shared.subscriptions.publish(&event, &json);
            }
            saved
        };
        let answer = match saved {
            Saved::Stored => {
                self.shared.events.fetch_add(1, Ordering::Relaxed);
                ok(true, "")
            }
            Saved::Duplicate => ok(true, "duplicate: already have this event"),
            Saved::Deleted => ok(false, "blocked: this event is deleted"),
            Saved::Expired => ok(false, "invalid: this event has expired"),
            Saved::Replaced => ok(false, "duplicate: a newer version is stored"),
            Saved::InvalidDelete => ok(
                false,
                "invalid: a deletion may only name its author's events",
            ),
        };
        self.answer(answer).await
    }

    async fn req(&self, subscription_id: SubscriptionId, filters: Vec<Filter>) -> Result<(), Gone> {
        if filters.len() > MAX_FILTERS {
            let count = filters.len();
            // `CLOSED` ends the subscription under this id, one a `REQ` before opened too.
            self.shared
                .subscriptions
                .unsubscribe(self.id, &subscription_id);
            return self
                .answer(RelayMessage::Closed {
                    subscription_id: Cow::Owned(subscription_id),
                    message: Cow::Owned(format!(
                        "invalid: {count} filters; this relay takes at most {MAX_FILTERS} in one REQ"
                    )),
                })
                .await;
        }
        let options = &self.shared.options;
        let limit = |filter: &Filter| {
            filter
                .limit
                .unwrap_or(options.default_limit)
                .min(options.max_limit)
        };
        // Live and stored at one point in the order of stored events (`Shared::order`): an
        // event stored before it is found here, one stored after goes out live.
        let stored = {
            let _order = self.shared.order.write().unwrap_or_else(|e| e.into_inner());
            self.shared
                .subscriptions
                .subscribe(
                    self.id,
                    subscription_id.clone(),
                    filters.clone(),
                    options.max_subscriptions,
                )
                .then(|| {
                    filters
                        .iter()
                        .map(|filter| self.shared.store.query(filter, limit(filter)))
                        .collect::<Vec<_>>()
                })
        };
        let Some(stored) = stored else {
            return self
                .answer(RelayMessage::Closed {
                    subscription_id: Cow::Owned(subscription_id),
                    message: Cow::Owned(format!(
                        "rate-limited: at most {} subscriptions per connection",
                        options.max_subscriptions
                    )),
                })
                .await;
        };
        let mut sent: HashSet<EventId> = HashSet::new();
        for found in stored {
            for stored in found {
                if sent.insert(stored.id) {
                    self.answers
                        .send(event_message(&subscription_id, &stored.json))
                        .await
                        .map_err(|_| Gone)?;
                }
            }
        }
        self.answer(RelayMessage::EndOfStoredEvents(Cow::Owned(subscription_id)))
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// A sink that records what it was given and how often it was flushed.
    #[derive(Default)]
    struct Recording {
        sent: Vec<String>,
        flushes: usize,
    }

    impl futures::Sink<Message> for Recording {
        type Error = std::convert::Infallible;

        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            self.sent.push(item.into_text().expect("text").to_string());
            Ok(())
        }

        fn poll_flush(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn an_event_message_reads_as_nostr_reads_it() {
        let keys = nostr_sdk::Keys::generate();
        let event = nostr_sdk::EventBuilder::text_note("a \"quoted\" note \u{2028}")
            .sign_with_keys(&keys)
            .expect("signs");
        let text = ClientMessage::event(event.clone()).as_json();
        assert_eq!(read_event_message(&text), Some(event.clone()));
        let spaced = format!("[ \"EVENT\" , {} ]", event.as_json());
        assert_eq!(read_event_message(&spaced), Some(event.clone()));

        // Anything else is left to nostr's reader.
        let req = ClientMessage::req(SubscriptionId::new("s"), vec![Filter::new()]).as_json();
        assert_eq!(read_event_message(&req), None);
        let other_verb = format!("[\"COUNT\",{}]", event.as_json());
        assert_eq!(read_event_message(&other_verb), None);
        let extra = format!("[\"EVENT\",{},1]", event.as_json());
        assert_eq!(read_event_message(&extra), None);
        assert_eq!(read_event_message("[\"EVENT\"]"), None);
        assert_eq!(read_event_message("not json"), None);
    }

    #[tokio::test]
    async fn what_is_queued_goes_out_in_one_flush_answers_first_and_a_batch_is_bounded() {
        let (answer_tx, mut answers) = mpsc::channel(256);
        let (live_tx, mut live) = mpsc::channel(256);
        for n in 0..3 {
            answer_tx.try_send(format!("answer {n}")).expect("room");
        }
        for n in 0..100 {
            live_tx.try_send((1, format!("event {n}"))).expect("room");
            // Queued for a subscription closed (or replaced) since: never sent.
            live_tx.try_send((2, format!("stale {n}"))).expect("room");
        }
        let current = |instance| instance == 1;
        let mut sink = Recording::default();
        write_queued(&mut sink, "first".into(), &mut answers, &mut live, current)
            .await
            .expect("writes");
        assert_eq!(sink.flushes, 1);
        assert_eq!(sink.sent.len(), WRITE_BATCH);
        assert_eq!(
            sink.sent[..4],
            ["first", "answer 0", "answer 1", "answer 2"]
        );
        assert_eq!(sink.sent[4], "event 0");
        assert_eq!(
            sink.sent[WRITE_BATCH - 1],
            format!("event {}", WRITE_BATCH - 5)
        );

        // The rest waits for the next batch, in order, and nothing is lost.
        let next = std::iter::from_fn(|| live.try_recv().ok())
            .find_map(|(instance, text)| current(instance).then_some(text))
            .expect("queued");
        write_queued(&mut sink, next, &mut answers, &mut live, current)
            .await
            .expect("writes");
        assert_eq!(sink.flushes, 2);
        let events: Vec<&String> = sink
            .sent
            .iter()
            .filter(|s| s.starts_with("event"))
            .collect();
        assert_eq!(events.len(), 100);
        assert!(sink.sent.iter().all(|s| !s.starts_with("stale")));
        assert!(events
            .iter()
            .enumerate()
            .all(|(n, text)| **text == format!("event {n}")));
    }
}
