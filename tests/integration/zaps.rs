//! NIP-57 zaps in: the LNURL endpoint, a zap that pays for a job, receipts after our wallet
//! confirms, and zaps that must be refused.

use std::sync::Arc;
use std::time::Duration;

use bitcoin::hashes::{sha256, Hash};
use dvmd::customer::{self, Customer, Reply};
use dvmd::infer::instant::InstantBackend;
use dvmd::job::JobState;
use dvmd::nip57;
use dvmd::nip90::JobStatus;
use dvmd::wallet::bolt11;
use nostr_sdk::{Filter, Keys, Kind};

use crate::harness::{self, callback, zap_request, REPLY_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zap_pays_for_a_job_and_gets_a_receipt() {
    let data = harness::data_dir();
    let backend = Arc::new(InstantBackend::new("zapped answer"));
    let daemon = harness::start(harness::dev_config(data.path(), |_| {}), Some(backend)).await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");

    // The Lightning address announces zap support with our key.
    let pay: serde_json::Value =
        reqwest::get(format!("{}/.well-known/lnurlp/dvmd", ready.http_url))
            .await
            .expect("lnurlp")
            .json()
            .await
            .expect("json");
    assert_eq!(pay["allowsNostr"], true);
    assert_eq!(pay["nostrPubkey"], ready.pubkey.to_hex());
    assert_eq!(pay["tag"], "payRequest");

    let request = alice
        .post(customer::text_request(
            "Hello",
            &[("max_tokens", "8")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    let feedback = match alice
        .wait_for(&request.id, REPLY_TIMEOUT, |r| {
            matches!(r, Reply::Feedback { .. })
        })
        .await
        .expect("feedback")
    {
        Reply::Feedback {
            status: Some(JobStatus::PaymentRequired),
            amount: Some(a),
            event,
            ..
        } => (event.id, a.msat, a.bolt11.expect("bolt11")),
        other => panic!("expected payment-required, got {other:?}"),
    };
    let (feedback_id, quote, original_bolt11) = feedback;

    // Refusals: below the quote, a forged signature, a zap for someone else.
    let short = zap_request(
        alice.keys(),
        ready.pubkey,
        Some(feedback_id),
        quote - 1,
        &ready.relay_url,
    );
    let (status, body) = callback(&ready.http_url, quote - 1, &short).await;
    assert_eq!(status, 400);
    assert!(
        body["reason"]
            .as_str()
            .expect("reason")
            .contains("zap at least"),
        "{body}"
    );
    let forged = zap_request(
        alice.keys(),
        ready.pubkey,
        Some(feedback_id),
        quote,
        &ready.relay_url,
    )
    .replace("zap for the job", "zap for the jab");
    assert_eq!(callback(&ready.http_url, quote, &forged).await.0, 400);
    let elsewhere = zap_request(
        alice.keys(),
        Keys::generate().public_key(),
        Some(feedback_id),
        quote,
        &ready.relay_url,
    );
    assert_eq!(callback(&ready.http_url, quote, &elsewhere).await.0, 400);

    // The zap of the payment-required feedback, with the quote: its invoice commits to the
    // exact zap request.
    let zap = zap_request(
        alice.keys(),
        ready.pubkey,
        Some(feedback_id),
        quote,
        &ready.relay_url,
    );
    let (status, body) = callback(&ready.http_url, quote, &zap).await;
    assert_eq!(status, 200, "{body}");
    let pr = body["pr"].as_str().expect("pr").to_owned();
    let info = bolt11::decode(&pr).expect("invoice");
    assert_eq!(info.amount_msat, Some(quote));
    assert_eq!(
        info.description_hash,
        Some(sha256::Hash::hash(zap.as_bytes()).to_byte_array())
    );

    // No receipt before payment.
    let receipts = Filter::new().kind(Kind::from(9735)).author(ready.pubkey);
    let before = alice
        .client()
        .fetch_events(receipts.clone(), Duration::from_secs(2))
        .await
        .expect("fetch");
    assert!(before.is_empty());

    harness::dev_pay(&ready.http_url, &pr).await;
    let result = harness::result(&mut alice, &request.id).await;
    assert_eq!(result.content, "zapped answer");

    // The receipt is ours, valid under appendix F with us as the provider.
    let mut receipt = None;
    for _ in 0..100 {
        let found = alice
            .client()
            .fetch_events(receipts.clone(), Duration::from_secs(2))
            .await
            .expect("fetch");
        if let Some(event) = found.into_iter().next() {
            receipt = Some(event);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let receipt = receipt.expect("a zap receipt");
    let valid =
        nip57::validate_receipt(&receipt, &ready.pubkey, &ready.pubkey).expect("valid receipt");
    assert_eq!(valid.amount_msat, quote);
    assert_eq!(valid.request.target, Some(feedback_id));

    // An independent client (npm nostr-tools) finds it with its own filters: by the recipient
    // (`#p`, how zap counters find zaps) and by the zapped event (`#e`).
    for filter in [
        serde_json::json!({"kinds": [9735], "#p": [ready.pubkey.to_hex()]}),
        serde_json::json!({"kinds": [9735], "#e": [feedback_id.to_hex()]}),
    ] {
        let found = harness::nostr_tools_query(&ready.relay_url, &filter);
        assert_eq!(found.len(), 1, "{filter}: {found:?}");
        assert_eq!(found[0]["event"]["id"], receipt.id.to_hex(), "{filter}");
        assert_eq!(found[0]["zap"]["request_error"], serde_json::Value::Null);
        let sats = found[0]["zap"]["sats"].as_f64().expect("an amount");
        assert_eq!((sats * 1000.0).round() as u64, quote, "{filter}");
    }

    // The job is paid; a zap for it now is refused, and paying the original invoice as well
    // credits the customer instead of running the job again.
    let again = zap_request(
        alice.keys(),
        ready.pubkey,
        Some(request.id),
        quote,
        &ready.relay_url,
    );
    assert_eq!(callback(&ready.http_url, quote, &again).await.0, 400);
    harness::dev_pay(&ready.http_url, &original_bolt11).await;
    daemon.pipeline().reconcile_once().await;

    // A zap of something else tops up the sender's credit.
    let tip = zap_request(alice.keys(), ready.pubkey, None, 5_000, &ready.relay_url);
    let (status, body) = callback(&ready.http_url, 5_000, &tip).await;
    assert_eq!(status, 200, "{body}");
    harness::dev_pay(&ready.http_url, body["pr"].as_str().expect("pr")).await;
    daemon.pipeline().reconcile_once().await;

    let job =
        harness::wait_for_state(daemon.pipeline().book(), &request.id, JobState::Settled).await;
    assert_eq!(job.paid_msat, quote);
    alice.shutdown().await;
    daemon.stop().await;
    let store = harness::open_store(data.path());
    let totals = harness::ledger_ok(&store);
    assert_eq!(
        totals.payment_in_msat,
        quote + quote + 5_000,
        "zap, late original, top-up"
    );
    let charged = job.charge_msat.expect("charged");
    assert_eq!(
        harness::balance(&store, &request.pubkey),
        quote - charged + quote + 5_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zap_from_someone_else_pays_for_the_job_and_keeps_the_change() {
    let data = harness::data_dir();
    let backend = Arc::new(InstantBackend::new("paid by a friend"));
    let daemon = harness::start(harness::dev_config(data.path(), |_| {}), Some(backend)).await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let bob = Keys::generate();
    let request = alice
        .post(customer::text_request(
            "Hello",
            &[("max_tokens", "8")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    let (quote, _) = harness::invoice(&mut alice, &request.id).await;

    // Bob zaps Alice's request with the quote: the job runs for Alice, on Bob's money.
    let zap = zap_request(
        &bob,
        ready.pubkey,
        Some(request.id),
        quote,
        &ready.relay_url,
    );
    let (status, body) = callback(&ready.http_url, quote, &zap).await;
    assert_eq!(status, 200, "{body}");
    harness::dev_pay(&ready.http_url, body["pr"].as_str().expect("pr")).await;
    let result = harness::result(&mut alice, &request.id).await;
    assert_eq!(result.content, "paid by a friend");
    let job =
        harness::wait_for_state(daemon.pipeline().book(), &request.id, JobState::Settled).await;
    assert_eq!(job.payer(), bob.public_key());
    alice.shutdown().await;
    daemon.stop().await;

    // Bob paid, so Bob is charged and keeps the change; Alice's account is untouched.
    let store = harness::open_store(data.path());
    let totals = harness::ledger_ok(&store);
    assert_eq!(totals.payment_in_msat, quote);
    let charged = job.charge_msat.expect("charged");
    assert!(charged > 0 && charged <= quote);
    assert_eq!(harness::balance(&store, &bob.public_key()), quote - charged);
    assert_eq!(harness::balance(&store, &request.pubkey), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_callback_issues_a_bounded_number_of_invoices() {
    let data = harness::data_dir();
    let config = harness::dev_config(data.path(), |file| {
        file.lnurl.max_invoices_per_minute = 3;
    });
    let daemon = harness::start(config, Some(Arc::new(InstantBackend::new("-")))).await;
    let http = daemon.ready().http_url.clone();
    let mut issued = 0;
    let mut refused = 0;
    for _ in 0..6 {
        let response = reqwest::get(format!("{http}/lnurlp/dvmd/callback?amount=1000"))
            .await
            .expect("callback");
        match response.status().as_u16() {
            200 => issued += 1,
            429 => {
                let body: serde_json::Value = response.json().await.expect("json");
                assert_eq!(body["status"], "ERROR", "{body}");
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    // A burst of 3, then one more every 20 s.
    assert!((3..=4).contains(&issued), "issued {issued}");
    assert_eq!(issued + refused, 6);
    daemon.stop().await;
}

/// A zap's receipt is owed from the write that books it until it is out. A crash in between
/// (or relays that refused every attempt) leaves it owed, and the next start publishes it,
/// dated when the zap was booked: a receipt that did go out before the crash goes out again
/// as the same event, so an independent client counts the zap once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zap_receipt_owed_at_a_crash_goes_out_on_the_next_start_as_the_same_event() {
    use dvmd::store::Tree;

    let data = harness::data_dir();
    let start = || async {
        let backend = Arc::new(InstantBackend::new("-"));
        harness::start(harness::dev_config(data.path(), |_| {}), Some(backend)).await
    };
    let daemon = start().await;
    let ready = daemon.ready().clone();
    let alice = Keys::generate();
    harness::zap_top_up(
        &ready.http_url,
        &ready.relay_url,
        &alice,
        ready.pubkey,
        21_000,
    )
    .await;
    let filter = serde_json::json!({"kinds": [9735], "#P": [alice.public_key().to_hex()]});
    let mut found = Vec::new();
    for _ in 0..250 {
        found = harness::nostr_tools_query(&ready.relay_url, &filter);
        if !found.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(found.len(), 1, "{found:?}");
    let receipt = found[0]["event"].clone();
    let booked_at = receipt["created_at"].as_u64().expect("created_at");
    let hash = bolt11::decode(
        receipt["tags"]
            .as_array()
            .expect("tags")
            .iter()
            .find(|tag| tag[0] == "bolt11")
            .and_then(|tag| tag[1].as_str())
            .expect("a bolt11 tag"),
    )
    .expect("bolt11")
    .payment_hash;
    daemon.stop().await;

    // What a crash after the publish and before its record leaves: the receipt still owed.
    let mut key = b"zap_receipt:".to_vec();
    key.extend_from_slice(&hash.0);
    async fn owed(store: &dvmd::store::Store, key: &[u8]) -> Option<Vec<u8>> {
        let key = key.to_vec();
        store
            .read(move |r| r.get_raw(Tree::Meta, &key))
            .await
            .expect("read")
    }
    {
        let store = harness::open_store(data.path());
        assert_eq!(
            owed(&store, &key).await,
            None,
            "recorded out once published"
        );
        let (key, value) = (key.clone(), booked_at.to_be_bytes());
        store
            .apply(move |tx| {
                tx.put_raw(Tree::Meta, &key, &value)?;
                Ok::<_, dvmd::store::TxError<dvmd::store::StoreError>>(())
            })
            .await
            .expect("write");
    }

    let daemon = start().await;
    let relay = daemon.ready().relay_url.clone();
    let mut again = Vec::new();
    for _ in 0..250 {
        again = harness::nostr_tools_query(&relay, &filter);
        if !again.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(
        again[0]["event"]["id"], receipt["id"],
        "the same event again"
    );
    daemon.stop().await;
    let store = harness::open_store(data.path());
    assert_eq!(
        owed(&store, &key).await,
        None,
        "recorded out after the restart"
    );
    assert_eq!(
        harness::ledger_ok(&store).payment_in_msat,
        21_000,
        "booked once"
    );
}

/// A zap booked while every relay is down gets its receipt once one comes back, without a
/// restart: the receipt is retried for as long as the daemon runs, as a result is (it was
/// given five tries over about three seconds, then left for the next start). The receipt is
/// found by an independent client's own filter on the relay the zap request named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zap_booked_while_the_relays_are_down_gets_its_receipt_when_they_come_back() {
    use dvmd::config::{Config, FileConfig, Overrides, RelayEntry, RelaysFile};
    use dvmd::relay::EmbeddedRelay;
    use tokio_util::sync::CancellationToken;

    let port = harness::free_port();
    let address: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let url = format!("ws://{address}");
    let data = harness::data_dir();
    dvmd::identity::init(data.path()).expect("init");
    let mut file = FileConfig::default();
    file.wallet.reconcile_interval_secs = 1;
    let relays = RelaysFile {
        relay: vec![RelayEntry {
            url: url.clone(),
            read: true,
            write: true,
        }],
    };
    let overrides = Overrides {
        data_dir: Some(data.path().to_owned()),
        http_listen: Some("127.0.0.1:0".into()),
        ..Overrides::default()
    };
    let config = Config::build(file, relays, overrides).expect("config");
    let daemon = harness::start(config, Some(Arc::new(InstantBackend::new("-")))).await;
    let ready = daemon.ready().clone();

    // Nothing listens on the relay's port yet.
    let alice = Keys::generate();
    let zap = zap_request(&alice, ready.pubkey, None, 21_000, &url);
    let (status, body) = callback(&ready.http_url, 21_000, &zap).await;
    assert_eq!(status, 200, "{body}");
    let bolt11 = body["pr"].as_str().expect("pr");
    daemon
        .dev_wallet()
        .expect("dev wallet")
        .settle(bolt11)
        .await
        .expect("pay");
    let store = daemon.pipeline().book().store();
    for _ in 0..250 {
        if harness::balance(store, &alice.public_key()) == 21_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(harness::balance(store, &alice.public_key()), 21_000);
    // Longer than the five tries the receipt used to get.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let relay = EmbeddedRelay::bind(address).await.expect("bind");
    let cancel = CancellationToken::new();
    tokio::spawn(relay.run(cancel.child_token()));
    let filter = serde_json::json!({"kinds": [9735], "#P": [alice.public_key().to_hex()]});
    let mut found = Vec::new();
    for _ in 0..90 {
        found = harness::nostr_tools_query(&url, &filter);
        if !found.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        found.len(),
        1,
        "one receipt, on the relay the zap named: {found:?}"
    );
    let receipt = &found[0]["event"];
    assert_eq!(receipt["pubkey"], ready.pubkey.to_hex());
    let bolt11_tag = receipt["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .find(|tag| tag[0] == "bolt11")
        .and_then(|tag| tag[1].as_str());
    assert_eq!(bolt11_tag, Some(bolt11));
    for _ in 0..250 {
        if owed_receipts(store).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(owed_receipts(store).await, 0, "recorded out");
    assert_eq!(harness::ledger_ok(store).payment_in_msat, 21_000);
    daemon.stop().await;
    cancel.cancel();
}

/// Zap receipts still owed, as the store records them.
async fn owed_receipts(store: &dvmd::store::Store) -> usize {
    store
        .read(|r| {
            Ok::<_, dvmd::store::StoreError>(
                r.keys_with_prefix_rev(dvmd::store::Tree::Meta, b"zap_receipt:")
                    .count(),
            )
        })
        .await
        .expect("read")
}

/// A zap of a job paid in time, whose news was lost (the daemon died before its wallet settled
/// it, and its lookup is deferred), pays the job when the daemon comes back after the job's
/// own invoice expired: the job's zaps are looked up before it is expired. (Before, the job
/// expired, the customer was told to post again, and the zap was credited.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_zapped_while_the_daemon_was_down_runs_after_its_invoice_expired() {
    use harness::DaemonProcess;
    let data = harness::data_dir();
    let (relay_port, http_port) = (harness::free_port(), harness::free_port());
    let config = "[pricing]\ninvoice_expiry_secs = 60\n";
    let first = DaemonProcess::spawn(data.path(), relay_port, http_port, config);
    let us = nostr_sdk::PublicKey::from_hex(&first.pubkey).expect("pubkey");
    let keys = Keys::generate();
    let mut bob = Customer::connect_with(&first.relay_url, keys.clone())
        .await
        .expect("connect");
    let request = bob
        .post(customer::text_request(
            "Say hi.",
            &[("max_tokens", "8")],
            None,
            Some(us),
        ))
        .await
        .expect("post");
    let (quote, bolt11) = harness::invoice(&mut bob, &request.id).await;
    let zap = zap_request(&keys, us, Some(request.id), quote, &first.relay_url);
    let (status, body) = callback(&first.http_url, quote, &zap).await;
    assert_eq!(status, 200, "{body}");
    let zap_invoice = body["pr"].as_str().expect("pr").to_owned();
    first.kill();
    bob.shutdown().await;
    harness::settle_unheard(data.path(), &zap_invoice).await;
    // Back after the job's own invoice expired unpaid (the dev wallet says so at once).
    let expires_at = bolt11::decode(&bolt11).expect("bolt11").expires_at;
    while nostr_sdk::Timestamp::now().as_secs() <= expires_at + 1 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let second = DaemonProcess::spawn(data.path(), relay_port, http_port, config);
    let mut bob = Customer::connect_with(&second.relay_url, keys)
        .await
        .expect("reconnect");
    harness::result(&mut bob, &request.id).await;
    second.terminate();
    bob.shutdown().await;
    let store = harness::open_store(data.path());
    harness::ledger_ok(&store);
    let job = harness::jobs(&store)
        .into_iter()
        .find(|job| job.id == request.id.into())
        .expect("the job");
    assert_eq!((job.state, job.paid_msat), (JobState::Settled, quote));
}
