//! The same request seen through two relays runs once and is paid once; a relay that hangs
//! holds up nobody.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use nostr_sdk::{Tag, TagKind};

use dvmd::config::{Config, FileConfig, Overrides, RelayEntry, RelaysFile};
use dvmd::customer::{self, Customer, Reply};
use dvmd::infer::instant::InstantBackend;
use dvmd::job::JobState;
use dvmd::nip90::JobStatus;
use dvmd::relay::EmbeddedRelay;
use tokio_util::sync::CancellationToken;

use crate::harness::{self, REPLY_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_on_two_relays_runs_once() {
    let cancel = CancellationToken::new();
    let mut urls = Vec::new();
    for _ in 0..2 {
        let relay = EmbeddedRelay::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        urls.push(relay.url());
        tokio::spawn(relay.run(cancel.child_token()));
    }
    let data = harness::data_dir();
    dvmd::identity::init(data.path()).expect("init");
    let mut file = FileConfig::default();
    file.wallet.reconcile_interval_secs = 1;
    let relays = RelaysFile {
        relay: urls
            .iter()
            .map(|url| RelayEntry {
                url: url.clone(),
                read: true,
                write: true,
            })
            .collect(),
    };
    let config = Config::build(
        file,
        relays,
        Overrides {
            dev: false,
            data_dir: Some(data.path().to_owned()),
            http_listen: Some("127.0.0.1:0".into()),
            ..Overrides::default()
        },
    )
    .expect("config");
    let backend = Arc::new(InstantBackend::new("Mars is a planet."));
    let daemon = harness::start(config, Some(backend)).await;
    let service = daemon.ready().pubkey;

    let mut on_a = Customer::connect(&urls[0]).await.expect("connect a");
    let mut on_b = Customer::connect_with(&urls[1], on_a.keys().clone())
        .await
        .expect("connect b");
    let request =
        customer::text_request("Name a planet", &[("max_tokens", "8")], None, Some(service))
            .sign_with_keys(on_a.keys())
            .expect("sign");
    on_a.send(&request).await.expect("post on a");
    on_b.send(&request).await.expect("post on b");

    // Both relays carry the one payment-required feedback (the same event).
    let mut invoices = HashSet::new();
    for customer in [&mut on_a, &mut on_b] {
        match customer
            .wait_for(&request.id, REPLY_TIMEOUT, |r| {
                matches!(r, Reply::Feedback { .. })
            })
            .await
            .expect("feedback")
        {
            Reply::Feedback {
                status: Some(JobStatus::PaymentRequired),
                amount: Some(amount),
                event,
                ..
            } => {
                invoices.insert((event.id, amount.bolt11.expect("bolt11")));
            }
            other => panic!("expected payment-required, got {other:?}"),
        }
    }
    assert_eq!(
        invoices.len(),
        1,
        "one feedback event, one invoice: {invoices:?}"
    );
    let bolt11 = invoices.into_iter().next().expect("invoice").1;
    daemon
        .dev_wallet()
        .expect("dev wallet")
        .settle(&bolt11)
        .await
        .expect("pay");

    let mut results = HashSet::new();
    for customer in [&mut on_a, &mut on_b] {
        if let Reply::Result(event) = customer
            .wait_for(&request.id, REPLY_TIMEOUT, |r| {
                matches!(r, Reply::Result(_))
            })
            .await
            .expect("result")
        {
            results.insert(event.id);
        }
    }
    assert_eq!(results.len(), 1, "exactly one result event");
    // Sending the request again (as a relay replaying it after a reconnect would) changes
    // nothing: no second invoice, no second run.
    on_a.send(&request).await.ok();
    let extra = on_a
        .wait_for(&request.id, Duration::from_millis(500), |r| {
            matches!(r, Reply::Result(_))
        })
        .await;
    if let Ok(Reply::Result(event)) = extra {
        assert!(
            results.contains(&event.id),
            "a replayed result is the same event"
        );
    }

    let book = daemon.pipeline().book();
    assert_eq!(book.all().await.expect("jobs").len(), 1);
    for _ in 0..100 {
        if book
            .get(&request.id.into())
            .await
            .expect("read")
            .expect("job")
            .state
            == JobState::Settled
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        book.get(&request.id.into())
            .await
            .expect("read")
            .expect("job")
            .state,
        JobState::Settled
    );
    on_a.shutdown().await;
    on_b.shutdown().await;
    daemon.stop().await;
    cancel.cancel();
    let store = harness::open_store(data.path());
    let totals = harness::ledger_ok(&store);
    assert_eq!(
        totals.entries, 5,
        "payment_in, reserve, release, charge, refund_credit: {totals:?}"
    );
    assert_eq!(totals.held_msat, 0);
}

/// A relay that completes the websocket handshake and reads every message, but never answers:
/// the fault of a relay that hangs. Returns its URL and the ids of the events it was sent.
async fn silent_relay(cancel: CancellationToken) -> (String, Arc<Mutex<HashSet<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("ws://{}", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let events = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(_) => break,
                },
            };
            let events = events.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                loop {
                    let message = tokio::select! {
                        _ = cancel.cancelled() => break,
                        message = socket.next() => message,
                    };
                    let Some(Ok(message)) = message else { break };
                    let Ok(text) = message.to_text() else {
                        continue;
                    };
                    let Ok(serde_json::Value::Array(parts)) = serde_json::from_str(text) else {
                        continue;
                    };
                    if parts.first().and_then(|v| v.as_str()) == Some("EVENT") {
                        if let Some(id) = parts.get(1).and_then(|e| e["id"].as_str()) {
                            events.lock().expect("lock").insert(id.to_owned());
                        }
                    }
                }
            });
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_relay_does_not_hold_up_the_job() {
    let cancel = CancellationToken::new();
    let (silent, seen) = silent_relay(cancel.clone()).await;
    let data = harness::data_dir();
    let backend = Arc::new(InstantBackend::new("Still here."));
    // The silent relay is on loopback: reply relays on private addresses must be allowed.
    let config = harness::dev_config(data.path(), |file| file.reply_relays.allow_private = true);
    let daemon = harness::start(config, Some(backend)).await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    // The request names the silent relay for replies: every event goes there too, and it never
    // says `OK` (the pool would wait 10 s for each one).
    let request = alice
        .post(
            customer::text_request("Hello", &[("max_tokens", "4")], None, None).tag(Tag::custom(
                TagKind::custom("relays"),
                [ready.relay_url.clone(), silent.clone()],
            )),
        )
        .await
        .expect("post");
    let (_, bolt11) = harness::invoice(&mut alice, &request.id).await;
    harness::dev_pay(&ready.http_url, &bolt11).await;
    // Bounded well below the pool's 10 s `OK` timeout: the answers ride on the relay that
    // acknowledged them, without waiting for the silent one.
    let bound = Duration::from_secs(5);
    let result = alice
        .wait_for(&request.id, bound, |r| matches!(r, Reply::Result(_)))
        .await
        .expect("the result is not held up by the silent relay");
    alice
        .wait_for(&request.id, bound, |r| {
            matches!(
                r,
                Reply::Feedback {
                    status: Some(JobStatus::Success),
                    ..
                }
            )
        })
        .await
        .expect("success is not held up by the silent relay");
    let Reply::Result(result) = result else {
        unreachable!()
    };
    // The silent relay was still sent everything, in the background.
    for _ in 0..100 {
        if seen.lock().expect("lock").contains(&result.id.to_hex()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen.lock().expect("lock").contains(&result.id.to_hex()),
        "the reply relay named in the request gets the result too"
    );

    // Its connection serves the job that named it: once idle it is released from the pool,
    // and a later request that names it again gets it dialed again.
    let relays = daemon.pipeline().relays();
    assert_eq!(relays.reply_relays_in_pool().await, 1);
    assert!(
        relays
            .release_idle_reply_relays(dvmd::relay::REPLY_RELAY_IDLE)
            .await
            .is_empty(),
        "kept while in use"
    );
    // (Idle for "at least zero": the job's last answer went out a moment ago.)
    let released = relays.release_idle_reply_relays(Duration::ZERO).await;
    assert_eq!(
        released
            .iter()
            .map(|u| u.as_str_without_trailing_slash())
            .collect::<Vec<_>>(),
        vec![silent.as_str()]
    );
    assert_eq!(relays.reply_relays_in_pool().await, 0);
    let again = alice
        .post(
            customer::text_request("Again", &[("max_tokens", "4")], None, None).tag(Tag::custom(
                TagKind::custom("relays"),
                [ready.relay_url.clone(), silent.clone()],
            )),
        )
        .await
        .expect("post");
    let (_, bolt11) = harness::invoice(&mut alice, &again.id).await;
    harness::dev_pay(&ready.http_url, &bolt11).await;
    let Reply::Result(result) = alice
        .wait_for(&again.id, bound, |r| matches!(r, Reply::Result(_)))
        .await
        .expect("result")
    else {
        unreachable!()
    };
    for _ in 0..100 {
        if seen.lock().expect("lock").contains(&result.id.to_hex()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen.lock().expect("lock").contains(&result.id.to_hex()),
        "dialed again for the next request that names it"
    );
    alice.shutdown().await;
    daemon.stop().await;
    cancel.cancel();
    harness::ledger_ok(&harness::open_store(data.path()));
}

/// A TCP listener that counts the connections it accepts (and closes them).
async fn counting_listener(
    cancel: CancellationToken,
) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(_) => { counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst); }
                    Err(_) => break,
                },
            }
        }
    });
    (port, count)
}

/// Any key can name reply relays; by default dvmd never dials a private address for one:
/// not a loopback literal, not an IPv4-mapped one, not a name (`localhost`) that resolves to
/// loopback. The job is answered on our own relay all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_relays_on_private_addresses_are_never_dialed() {
    let cancel = CancellationToken::new();
    let (literal, literal_seen) = counting_listener(cancel.clone()).await;
    let (mapped, mapped_seen) = counting_listener(cancel.clone()).await;
    let (named, named_seen) = counting_listener(cancel.clone()).await;
    let data = harness::data_dir();
    let backend = Arc::new(InstantBackend::new("Answered where it should be."));
    let daemon = harness::start(harness::dev_config(data.path(), |_| {}), Some(backend)).await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let request = alice
        .post(
            customer::text_request("Hello", &[("max_tokens", "4")], None, None).tag(Tag::custom(
                TagKind::custom("relays"),
                [
                    format!("ws://127.0.0.1:{literal}"),
                    format!("ws://[::ffff:127.0.0.1]:{mapped}"),
                    format!("ws://localhost:{named}"),
                ],
            )),
        )
        .await
        .expect("post");
    let (_, bolt11) = harness::invoice(&mut alice, &request.id).await;
    harness::dev_pay(&ready.http_url, &bolt11).await;
    alice
        .wait_for(&request.id, REPLY_TIMEOUT, |r| {
            matches!(r, Reply::Result(_))
        })
        .await
        .expect("the result comes on our relay");
    // Give a dial every chance to happen.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dialed =
        |seen: &Arc<std::sync::atomic::AtomicUsize>| seen.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        (
            dialed(&literal_seen),
            dialed(&mapped_seen),
            dialed(&named_seen)
        ),
        (0, 0, 0),
        "no connection to a private address a customer named"
    );
    alice.shutdown().await;
    daemon.stop().await;
    cancel.cancel();
    harness::ledger_ok(&harness::open_store(data.path()));
}
