//! One load-generating customer: a key, a websocket, and the replies routed to the job that
//! waits for them. Lean on purpose: it shares the machine with the daemon it measures.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use nostr_sdk::{Event, EventId, Filter, JsonUtil, Keys, Kind, SubscriptionId, Timestamp};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::{JobSpec, Record};
use crate::bench::BenchError;
use crate::customer;
use crate::nip90::{JobStatus, FEEDBACK_KIND, KIND_TEXT_GENERATION};

/// A job not answered in this long is counted lost.
const JOB_DEADLINE: Duration = Duration::from_secs(60);

/// A customer: one key, one websocket, replies routed to the job waiting for them.
pub(super) struct LoadCustomer {
    keys: Keys,
    outgoing: mpsc::UnboundedSender<String>,
    waiting: Arc<Mutex<HashMap<EventId, mpsc::UnboundedSender<Reply>>>>,
    reader: tokio::task::JoinHandle<()>,
}

enum Reply {
    Accepted(bool, String),
    Event(ReplyEvent),
}

/// What a customer reads of an event that answers its job: the kind and the tags (the job it
/// answers, its status, the invoice). The id, pubkey, signature and content are skipped
/// unparsed: the generator does not check the daemon's events (the integration tests do, with
/// independent clients), and decoding them in full (hex, and a curve point for the pubkey) was
/// CPU taken from the daemon this bench measures.
#[derive(Debug, PartialEq, serde::Deserialize)]
struct ReplyEvent {
    kind: u16,
    tags: Vec<Vec<String>>,
}

impl ReplyEvent {
    /// The first tag named `name`, whole.
    fn tag(&self, name: &str) -> Option<&[String]> {
        self.tags
            .iter()
            .find(|tag| tag.first().is_some_and(|n| n == name))
            .map(Vec::as_slice)
    }
}

/// `["EVENT", event]`, nostr's `ClientMessage::event` (whose `as_json` goes through a
/// `serde_json::Value`), with the event written by [`crate::event_json`].
fn event_message(event: &Event) -> String {
    format!("[\"EVENT\",{}]", crate::event_json::to_json(event))
}

/// An `OK` (routed by the request's id) or an `EVENT` (routed by its first `e` tag), read
/// straight into its parts; `None` for anything else. nostr's `RelayMessage::from_json` reads a
/// message into a `serde_json::Value` first and copies the event out of it: CPU taken from the
/// daemon this bench measures.
fn read_reply(text: &str) -> Option<(EventId, Reply)> {
    if let Ok((verb, _, event)) = serde_json::from_str::<(String, String, ReplyEvent)>(text) {
        let job = EventId::from_hex(event.tag("e")?.get(1)?).ok()?;
        return (verb == "EVENT").then_some((job, Reply::Event(event)));
    }
    let (verb, id, accepted, message) =
        serde_json::from_str::<(String, EventId, bool, String)>(text).ok()?;
    (verb == "OK").then_some((id, Reply::Accepted(accepted, message)))
}

impl LoadCustomer {
    pub(super) async fn connect(relay: &str) -> Result<Self, BenchError> {
        let url = nostr_sdk::Url::parse(relay)?;
        let host = url.host_str().ok_or("relay URL has no host")?.to_owned();
        let port = url.port_or_known_default().ok_or("relay URL has no port")?;
        let tcp = TcpStream::connect((host.as_str(), port)).await?;
        tcp.set_nodelay(true)?;
        let config = crate::relay::transport::websocket_config();
        let (socket, _) =
            tokio_tungstenite::client_async_with_config(relay, tcp, Some(config)).await?;
        let (mut sink, mut stream) = socket.split();
        let keys = Keys::generate();
        let filter = Filter::new()
            .kinds([
                Kind::from(FEEDBACK_KIND),
                Kind::from(KIND_TEXT_GENERATION + 1000),
            ])
            .pubkey(keys.public_key())
            .since(Timestamp::from_secs(
                Timestamp::now().as_secs().saturating_sub(10),
            ));
        let req = nostr_sdk::ClientMessage::req(SubscriptionId::new("replies"), vec![filter]);
        sink.send(Message::Text(req.as_json().into())).await?;
        let (outgoing, mut queue) = mpsc::unbounded_channel::<String>();
        let waiting: Arc<Mutex<HashMap<EventId, mpsc::UnboundedSender<Reply>>>> = Arc::default();
        let routes = waiting.clone();
        let reader = tokio::spawn(async move {
            let writer = async {
                while let Some(text) = queue.recv().await {
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
            };
            let reader = async {
                while let Some(Ok(message)) = stream.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    let Some((job, reply)) = read_reply(text.as_str()) else {
                        continue;
                    };
                    let route = routes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&job)
                        .cloned();
                    if let Some(route) = route {
                        let _ = route.send(reply);
                    }
                }
            };
            tokio::select! {
                _ = writer => {}
                _ = reader => {}
            }
        });
        Ok(Self {
            keys,
            outgoing,
            waiting,
            reader,
        })
    }

    /// Post job `n`, pay it if asked, wait for its result.
    pub(super) async fn run_job(&self, n: usize, spec: &JobSpec, record: &Record) {
        let request = crate::signatures::sign(
            customer::text_request(
                &format!("load job {n}: say hello"),
                // With --paid, each job pays its own invoice (the change of one never pays the
                // next).
                &[("max_tokens", "16"), ("pay_from_credit", "false")],
                Some(1_000_000),
                Some(spec.service),
            ),
            &self.keys,
        );
        let (route, mut replies) = mpsc::unbounded_channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(request.id, route);
        let started = Instant::now();
        let sent = self.outgoing.send(event_message(&request));
        let outcome = match sent {
            Ok(()) => self.follow(&mut replies, spec).await,
            Err(_) => Outcome::Lost,
        };
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&request.id);
        match outcome {
            Outcome::Result => {
                record
                    .latencies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(started.elapsed());
                record.completed.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Refused => {
                record.refused.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Lost => {
                record.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    async fn follow(
        &self,
        replies: &mut mpsc::UnboundedReceiver<Reply>,
        spec: &JobSpec,
    ) -> Outcome {
        let deadline = tokio::time::Instant::now() + JOB_DEADLINE;
        loop {
            let reply = match tokio::time::timeout_at(deadline, replies.recv()).await {
                Ok(Some(reply)) => reply,
                _ => return Outcome::Lost,
            };
            let event = match reply {
                Reply::Accepted(false, why) => {
                    tracing::warn!(reason = %why, "the relay refused a request");
                    return Outcome::Lost;
                }
                Reply::Accepted(true, _) => continue,
                Reply::Event(event) => event,
            };
            if event.kind != FEEDBACK_KIND {
                return Outcome::Result;
            }
            let status = event
                .tag("status")
                .and_then(|tag| JobStatus::parse(tag.get(1)?));
            match status {
                Some(JobStatus::Error) => return Outcome::Refused,
                Some(JobStatus::PaymentRequired) if spec.paid => {
                    let bolt11 = event.tag("amount").and_then(|tag| tag.get(2).cloned());
                    let Some(bolt11) = bolt11 else {
                        return Outcome::Lost;
                    };
                    let paid = spec
                        .http
                        .post(&spec.pay_url)
                        .json(&serde_json::json!({ "bolt11": bolt11 }))
                        .send()
                        .await;
                    if !paid.is_ok_and(|r| r.status().is_success()) {
                        return Outcome::Lost;
                    }
                }
                _ => {}
            }
        }
    }

    /// The customer's key.
    pub(super) fn public_key(&self) -> nostr_sdk::PublicKey {
        self.keys.public_key()
    }

    pub(super) fn close(&self) {
        self.reader.abort();
    }
}

enum Outcome {
    Result,
    Refused,
    Lost,
}

#[cfg(test)]
mod tests {
    use nostr_sdk::{EventBuilder, RelayMessage, Tag};

    use super::*;

    #[test]
    fn replies_read_as_nostr_writes_them() {
        let keys = Keys::generate();
        let request = EventBuilder::text_note("request")
            .sign_with_keys(&keys)
            .expect("signs");
        let result = EventBuilder::new(Kind::from(6050), "a \"quoted\" answer")
            .tag(Tag::event(request.id))
            .sign_with_keys(&keys)
            .expect("signs");
        let sub = SubscriptionId::new("replies");

        let event = RelayMessage::event(sub.clone(), result.clone()).as_json();
        match read_reply(&event) {
            Some((job, Reply::Event(read))) => {
                assert_eq!(job, request.id);
                let tags: Vec<Vec<String>> =
                    result.tags.iter().map(|t| t.clone().to_vec()).collect();
                assert_eq!(read, ReplyEvent { kind: 6050, tags });
            }
            _ => panic!("an EVENT routed by its e tag"),
        }
        let ok = RelayMessage::ok(request.id, false, "blocked: no").as_json();
        match read_reply(&ok) {
            Some((job, Reply::Accepted(false, why))) => {
                assert_eq!(job, request.id);
                assert_eq!(why, "blocked: no");
            }
            _ => panic!("an OK routed by its id"),
        }
        let value = |json: &str| serde_json::from_str::<serde_json::Value>(json).expect("json");
        assert_eq!(
            value(&event_message(&request)),
            value(&nostr_sdk::ClientMessage::event(request.clone()).as_json())
        );
        // Not routable, or not for a job.
        assert!(read_reply(&RelayMessage::event(sub.clone(), request).as_json()).is_none());
        assert!(read_reply(&RelayMessage::eose(sub).as_json()).is_none());
        assert!(read_reply(&RelayMessage::notice("hello").as_json()).is_none());
    }
}
