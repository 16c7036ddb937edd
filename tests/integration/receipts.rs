//! Zap receipts from an external Lightning address provider (NIP-57 appendix F), and every
//! forged or replayed receipt that must start no work and pay nothing twice.

use std::sync::Arc;

use dvmd::config::{Config, FileConfig, Overrides, RelayEntry, RelaysFile};
use dvmd::customer::{self, Customer};
use dvmd::infer::instant::InstantBackend;
use dvmd::job::zap::ReceiptOutcome;
use dvmd::job::JobState;
use dvmd::nip57;
use dvmd::nip90::Verified;
use dvmd::relay::EmbeddedRelay;
use dvmd::store::Store;
use dvmd::wallet::dev::DevWallet;
use dvmd::wallet::{InvoiceDescription, InvoiceRequest, Wallet};
use nostr_sdk::{
    Event, EventBuilder, EventId, JsonUtil, Keys, Kind, PublicKey, Tag, TagKind, Timestamp,
};
use tokio_util::sync::CancellationToken;

use crate::harness;

/// The provider's side: its own wallet and its `nostrPubkey`.
struct Provider {
    keys: Keys,
    wallet: DevWallet,
}

impl Provider {
    async fn new() -> Self {
        Self {
            keys: Keys::generate(),
            wallet: DevWallet::open(Store::temporary().expect("store"))
                .await
                .expect("wallet"),
        }
    }

    /// A zap request from `sender` for `target`, and the provider's invoice for it.
    async fn zap(
        &self,
        sender: &Keys,
        to: PublicKey,
        target: EventId,
        msat: u64,
    ) -> (String, String) {
        let zap = EventBuilder::new(Kind::from(9734), "")
            .tags([
                Tag::public_key(to),
                Tag::event(target),
                Tag::custom(TagKind::custom("amount"), [msat.to_string()]),
                Tag::custom(TagKind::custom("relays"), ["ws://127.0.0.1:1"]),
            ])
            .sign_with_keys(sender)
            .expect("sign")
            .as_json();
        let invoice = self
            .wallet
            .create_invoice(InvoiceRequest {
                amount_msat: msat,
                description: InvoiceDescription::Hashed(zap.clone()),
                expiry_secs: 600,
            })
            .await
            .expect("invoice");
        (zap, invoice.bolt11)
    }

    /// A receipt for (`zap`, `bolt11`), signed by `signer`.
    fn receipt(&self, signer: &Keys, zap: &str, bolt11: &str, at: u64) -> Verified {
        let request = nip57::parse_zap_request_unchecked_amount(zap).expect("zap request");
        let event: Event = nip57::receipt(&request, bolt11, None, Timestamp::from_secs(at))
            .sign_with_keys(signer)
            .expect("sign");
        Verified::check(event).expect("well-formed")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_receipts_pay_once_and_forgeries_pay_nothing() {
    let provider = Provider::new().await;
    let data = harness::data_dir();
    let provider_hex = provider.keys.public_key().to_hex();
    let config = harness::dev_config(data.path(), |file| {
        file.zaps.provider_pubkey = Some(provider_hex.clone());
    });
    // Bob zapped the operator's npub through the provider before dvmd trusted it: a tip.
    let bob = Keys::generate();
    let (service, _) = dvmd::identity::init(data.path()).expect("identity");
    let (tip, tip_bolt11) = provider
        .zap(&bob, service.public_key(), EventId::all_zeros(), 21_000)
        .await;
    // Invoices are stamped in whole seconds.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let daemon = harness::start(
        config,
        Some(Arc::new(InstantBackend::new("paid by a receipt"))),
    )
    .await;
    let ready = daemon.ready().clone();
    let pipeline = daemon.pipeline().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let job1 = alice
        .post(customer::text_request(
            "one",
            &[("max_tokens", "8")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    let (quote1, _) = harness::invoice(&mut alice, &job1.id).await;
    let job2 = alice
        .post(customer::text_request(
            "two",
            &[("max_tokens", "8")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    let (quote2, _) = harness::invoice(&mut alice, &job2.id).await;
    let now = Timestamp::now().as_secs();

    // A relay that kept the old receipt sends it: it credits nobody.
    let old_tip = provider.receipt(&provider.keys, &tip, &tip_bolt11, now);
    assert!(
        matches!(pipeline.accept_provider_receipt(&old_tip).await, ReceiptOutcome::Refused(ref why) if why.contains("before this service trusted")),
        "a zap paid before the provider was trusted"
    );
    assert_eq!(
        harness::balance(daemon.pipeline().book().store(), &bob.public_key()),
        0
    );

    // Forgeries: none starts work, none books money.
    let (zap, bolt11) = provider
        .zap(alice.keys(), ready.pubkey, job1.id, quote1)
        .await;
    let not_the_provider = provider.receipt(&Keys::generate(), &zap, &bolt11, now);
    assert!(matches!(
        pipeline.accept_provider_receipt(&not_the_provider).await,
        ReceiptOutcome::Refused(_)
    ));
    let (other_zap, _) = provider
        .zap(alice.keys(), ready.pubkey, job1.id, quote1)
        .await;
    let wrong_hash = provider.receipt(&provider.keys, &other_zap, &bolt11, now);
    assert!(
        matches!(pipeline.accept_provider_receipt(&wrong_hash).await, ReceiptOutcome::Refused(ref why) if why.contains("description hash")),
        "a description hash that does not match"
    );
    let (short_zap, _) = provider
        .zap(alice.keys(), ready.pubkey, job1.id, quote1)
        .await;
    let short_invoice = provider
        .wallet
        .create_invoice(InvoiceRequest {
            amount_msat: quote1 - 1,
            description: InvoiceDescription::Hashed(short_zap.clone()),
            expiry_secs: 600,
        })
        .await
        .expect("invoice");
    let short = provider.receipt(&provider.keys, &short_zap, &short_invoice.bolt11, now);
    assert!(
        matches!(pipeline.accept_provider_receipt(&short).await, ReceiptOutcome::Refused(ref why) if why.contains("amount")),
        "an invoice below the zap's amount"
    );
    let for_someone_else = provider
        .zap(alice.keys(), Keys::generate().public_key(), job1.id, quote1)
        .await;
    let elsewhere = provider.receipt(
        &provider.keys,
        &for_someone_else.0,
        &for_someone_else.1,
        now,
    );
    assert!(matches!(
        pipeline.accept_provider_receipt(&elsewhere).await,
        ReceiptOutcome::Refused(_)
    ));
    for job in [&job1, &job2] {
        let state = pipeline
            .book()
            .get(&job.id.into())
            .await
            .expect("read")
            .expect("job")
            .state;
        assert_eq!(state, JobState::AwaitingPayment);
    }
    assert_eq!(
        harness::ledger_ok(pipeline.book().store()).payment_in_msat,
        0
    );

    // The real receipt, published by the provider to the relay: intake picks it up, the job runs.
    let real = provider.receipt(&provider.keys, &zap, &bolt11, now);
    alice.send(real.event()).await.expect("publish receipt");
    let result = harness::result(&mut alice, &job1.id).await;
    assert_eq!(result.content, "paid by a receipt");

    // Replays: the same receipt, a re-signed copy, and the same payment offered for job 2.
    assert_eq!(
        pipeline.accept_provider_receipt(&real).await,
        ReceiptOutcome::Replayed
    );
    let resigned = provider.receipt(&provider.keys, &zap, &bolt11, now + 1);
    assert_eq!(
        pipeline.accept_provider_receipt(&resigned).await,
        ReceiptOutcome::Replayed
    );
    let (zap2, _) = provider
        .zap(alice.keys(), ready.pubkey, job2.id, quote2)
        .await;
    let same_payment_for_job2 = provider.receipt(&provider.keys, &zap2, &bolt11, now);
    assert!(matches!(
        pipeline
            .accept_provider_receipt(&same_payment_for_job2)
            .await,
        ReceiptOutcome::Refused(_) | ReceiptOutcome::Replayed
    ));
    assert_eq!(
        pipeline
            .book()
            .get(&job2.id.into())
            .await
            .expect("read")
            .expect("job")
            .state,
        JobState::AwaitingPayment,
        "one payment never pays two jobs"
    );

    // A genuine receipt for less than job 2's quote starts no work; the provider did receive
    // that money, so it is credited to the sender rather than lost.
    let (low_zap, low_bolt11) = provider
        .zap(alice.keys(), ready.pubkey, job2.id, quote2 - 1_000)
        .await;
    let low = provider.receipt(&provider.keys, &low_zap, &low_bolt11, now);
    assert_eq!(
        pipeline.accept_provider_receipt(&low).await,
        ReceiptOutcome::Credited
    );
    assert_eq!(
        pipeline
            .book()
            .get(&job2.id.into())
            .await
            .expect("read")
            .expect("job")
            .state,
        JobState::AwaitingPayment,
        "a short payment runs nothing"
    );

    harness::wait_for_state(pipeline.book(), &job1.id, JobState::Settled).await;
    drop(pipeline);
    alice.shutdown().await;
    daemon.stop().await;
    let totals = harness::ledger_ok(&harness::open_store(data.path()));
    assert_eq!(
        totals.payment_in_msat,
        quote1 + quote2 - 1_000,
        "each payment booked once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_trusted_provider_receipts_are_ignored() {
    let provider = Provider::new().await;
    let data = harness::data_dir();
    let daemon = harness::start(
        harness::dev_config(data.path(), |_| {}),
        Some(Arc::new(InstantBackend::new("never"))),
    )
    .await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let job = alice
        .post(customer::text_request(
            "one",
            &[("max_tokens", "8")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    let (quote, _) = harness::invoice(&mut alice, &job.id).await;
    // A perfectly formed receipt for an invoice we never issued: our own LNURL payments are
    // confirmed only by our wallet, so this is nothing.
    let (zap, bolt11) = provider
        .zap(alice.keys(), ready.pubkey, job.id, quote)
        .await;
    let receipt = provider.receipt(&provider.keys, &zap, &bolt11, Timestamp::now().as_secs());
    alice.send(receipt.event()).await.expect("publish");
    assert!(matches!(
        daemon.pipeline().accept_provider_receipt(&receipt).await,
        ReceiptOutcome::Refused(_)
    ));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let state = daemon
        .pipeline()
        .book()
        .get(&job.id.into())
        .await
        .expect("read")
        .expect("job")
        .state;
    assert_eq!(state, JobState::AwaitingPayment);
    alice.shutdown().await;
    daemon.stop().await;
    assert_eq!(
        harness::ledger_ok(&harness::open_store(data.path())).payment_in_msat,
        0
    );
}

/// A daemon on `relay_url` (its only read and write relay, which outlives it) in `data`,
/// trusting `provider`'s receipts and serving requests at most `max_age` seconds old.
async fn daemon_on(
    data: &std::path::Path,
    relay_url: &str,
    provider: &PublicKey,
    max_age: u64,
) -> dvmd::daemon::Daemon {
    let mut file = FileConfig::default();
    file.wallet.reconcile_interval_secs = 1;
    file.service.max_request_age_secs = max_age;
    file.zaps.provider_pubkey = Some(provider.to_hex());
    let relays = RelaysFile {
        relay: vec![RelayEntry {
            url: relay_url.to_owned(),
            read: true,
            write: true,
        }],
    };
    let config = Config::build(
        file,
        relays,
        Overrides {
            dev: false,
            data_dir: Some(data.to_owned()),
            http_listen: Some("127.0.0.1:0".into()),
            ..Overrides::default()
        },
    )
    .expect("config");
    harness::start(
        config,
        Some(Arc::new(InstantBackend::new("paid while we were away"))),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_published_while_dvmd_was_down_is_booked_once() {
    let provider = Provider::new().await;
    let cancel = CancellationToken::new();
    let relay = EmbeddedRelay::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let relay_url = relay.url();
    tokio::spawn(relay.run(cancel.child_token()));
    let data = harness::data_dir();
    dvmd::identity::init(data.path()).expect("init");
    const MAX_AGE: u64 = 2;

    let daemon = daemon_on(
        data.path(),
        &relay_url,
        &provider.keys.public_key(),
        MAX_AGE,
    )
    .await;
    let us = daemon.ready().pubkey;
    let mut alice = Customer::connect(&relay_url).await.expect("connect");
    let job = alice
        .post(customer::text_request(
            "one",
            &[("max_tokens", "8")],
            None,
            Some(us),
        ))
        .await
        .expect("post");
    let (quote, _) = harness::invoice(&mut alice, &job.id).await;
    daemon.stop().await;

    // Paid through the provider while dvmd is down, for longer than requests are served.
    let (zap, bolt11) = provider.zap(alice.keys(), us, job.id, quote).await;
    let receipt = provider.receipt(&provider.keys, &zap, &bolt11, Timestamp::now().as_secs());
    alice.send(receipt.event()).await.expect("publish");
    tokio::time::sleep(std::time::Duration::from_secs(MAX_AGE + 2)).await;

    // Back up: the receipt is found from the checkpoint and pays the job.
    let daemon = daemon_on(
        data.path(),
        &relay_url,
        &provider.keys.public_key(),
        MAX_AGE,
    )
    .await;
    let result = harness::result(&mut alice, &job.id).await;
    assert_eq!(result.content, "paid while we were away");
    harness::wait_for_state(daemon.pipeline().book(), &job.id, JobState::Settled).await;
    daemon.stop().await;

    // Once more: found again, booked nothing twice.
    let daemon = daemon_on(
        data.path(),
        &relay_url,
        &provider.keys.public_key(),
        MAX_AGE,
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    daemon.stop().await;
    alice.shutdown().await;
    cancel.cancel();
    let totals = harness::ledger_ok(&harness::open_store(data.path()));
    assert_eq!(totals.payment_in_msat, quote, "booked once");
    assert_eq!(totals.held_msat, 0);
}

/// A store that followed a provider's receipts before dvmd recorded when it first trusted
/// the provider (an upgrade): a zap invoiced before the upgrade and paid after it still
/// credits its sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zap_invoiced_before_an_upgrade_still_counts() {
    let provider = Provider::new().await;
    let data = harness::data_dir();
    let (service, _) = dvmd::identity::init(data.path()).expect("identity");
    {
        let book = dvmd::job::Book::new(harness::open_store(data.path()));
        let now = Timestamp::now().as_secs();
        book.advance_checkpoint(dvmd::job::checkpoint::Stream::Receipts, now)
            .await
            .expect("an old install's checkpoint");
    }
    let carol = Keys::generate();
    let (zap, bolt11) = provider
        .zap(&carol, service.public_key(), EventId::all_zeros(), 21_000)
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let provider_hex = provider.keys.public_key().to_hex();
    let config = harness::dev_config(data.path(), |file| {
        file.zaps.provider_pubkey = Some(provider_hex.clone());
    });
    let daemon = harness::start(config, None).await;
    let receipt = provider.receipt(&provider.keys, &zap, &bolt11, Timestamp::now().as_secs());
    let outcome = daemon.pipeline().accept_provider_receipt(&receipt).await;
    assert!(matches!(outcome, ReceiptOutcome::Credited), "{outcome:?}");
    assert_eq!(
        harness::balance(daemon.pipeline().book().store(), &carol.public_key()),
        21_000
    );
    daemon.stop().await;
}
