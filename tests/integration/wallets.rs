//! One conformance suite for `wallet::Wallet`, run against the dev wallet and LNbits, and the
//! LNbits scenarios: a paid job, forged hints, duplicate webhooks, LNbits going away.

use std::sync::Arc;
use std::time::Duration;

use bitcoin::hashes::{sha256, Hash};
use dvmd::customer;
use dvmd::job::JobState;
use dvmd::store::Store;
use dvmd::wallet::dev::DevWallet;
use dvmd::wallet::lnbits::{LnbitsConfig, LnbitsWallet};
use dvmd::wallet::secret::Secret;
use dvmd::wallet::{
    bolt11, InvoiceDescription, InvoiceRequest, OutgoingStatus, PaymentStatus, Wallet, WalletError,
};
use tokio_util::sync::CancellationToken;

use crate::harness;
use crate::lnbits::{Lnbits, LnbitsAccount};

const HINT_TIMEOUT: Duration = Duration::from_secs(15);

/// Percent-encode everything but unreserved characters (for a URL path segment).
fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The other side of the wallet under test: pays its invoices, and issues invoices for it.
#[async_trait::async_trait]
pub trait Counterparty: Send + Sync {
    async fn pay(&self, bolt11: &str);
    async fn invoice(&self, msat: u64) -> String;
}

fn memo(msat: u64, expiry_secs: u64) -> InvoiceRequest {
    InvoiceRequest {
        amount_msat: msat,
        description: InvoiceDescription::Memo("dvmd conformance".into()),
        expiry_secs,
    }
}

/// What every wallet backend must do.
pub async fn conformance(wallet: Arc<dyn Wallet>, other: &dyn Counterparty) {
    let cancel = CancellationToken::new();
    let follower = wallet.clone();
    let follow = tokio::spawn({
        let cancel = cancel.clone();
        async move { follower.follow(cancel).await }
    });
    let mut hints = wallet.settlements();

    // Create: a real invoice for at least the amount (whole-sat backends round up).
    let invoice = wallet
        .create_invoice(memo(21_500, 600))
        .await
        .expect("create");
    let info = bolt11::decode(&invoice.bolt11).expect("a BOLT11 invoice");
    assert_eq!(info.payment_hash, invoice.payment_hash);
    assert_eq!(info.amount_msat, Some(invoice.amount_msat));
    assert!(invoice.amount_msat >= 21_500 && invoice.amount_msat < 22_500);
    assert_eq!(
        wallet.lookup(&invoice.payment_hash).await.expect("lookup"),
        PaymentStatus::Pending
    );

    // Description hashes commit to the exact text.
    let zap = r#"{"kind":9734,"content":"exact bytes"}"#;
    let hashed = wallet
        .create_invoice(InvoiceRequest {
            amount_msat: 1_000,
            description: InvoiceDescription::Hashed(zap.into()),
            expiry_secs: 600,
        })
        .await
        .expect("create hashed");
    let hashed_info = bolt11::decode(&hashed.bolt11).expect("decode");
    assert_eq!(
        hashed_info.description_hash,
        Some(sha256::Hash::hash(zap.as_bytes()).to_byte_array())
    );

    // Settle: paid from outside, hinted, and confirmed by lookup (twice: lookups are stable).
    let before = wallet.balance().await.expect("balance");
    other.pay(&invoice.bolt11).await;
    let hinted = tokio::time::timeout(HINT_TIMEOUT, async {
        loop {
            if hints.recv().await.expect("hint stream") == invoice.payment_hash {
                break;
            }
        }
    })
    .await;
    assert!(hinted.is_ok(), "a settlement hint for the paid invoice");
    for _ in 0..2 {
        assert_eq!(
            wallet.lookup(&invoice.payment_hash).await.expect("lookup"),
            PaymentStatus::Paid {
                amount_msat: invoice.amount_msat
            }
        );
    }
    assert_eq!(
        wallet.balance().await.expect("balance"),
        before + invoice.amount_msat
    );

    // Unknown hashes and expired invoices.
    let unknown = dvmd::wallet::PaymentHash([0x5a; 32]);
    assert_eq!(
        wallet.lookup(&unknown).await.expect("lookup"),
        PaymentStatus::Unknown
    );
    let short = wallet.create_invoice(memo(1_000, 1)).await.expect("create");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        wallet.lookup(&short.payment_hash).await.expect("lookup"),
        PaymentStatus::Expired
    );

    // Pay: the preimage proves it, and the balance goes down.
    let before = wallet.balance().await.expect("balance");
    let target = other.invoice(2_000).await;
    let target_info = bolt11::decode(&target).expect("decode");
    let sent = wallet.pay(&target, 10_000).await.expect("pay");
    assert_eq!(
        sha256::Hash::hash(&sent.preimage).to_byte_array(),
        target_info.payment_hash.0
    );
    let after = wallet.balance().await.expect("balance");
    assert!(
        after <= before,
        "paying does not add money: {before} -> {after}"
    );
    // The wallet says what became of it: sent, within the fee allowed.
    match wallet
        .lookup_payment(&target_info.payment_hash)
        .await
        .expect("lookup_payment")
    {
        OutgoingStatus::Succeeded { fee_msat } => assert!(fee_msat <= 10_000),
        other => panic!("a payment just sent looks {other:?}"),
    }
    // A hash it never paid is unknown, not failed: nothing proves it was not sent elsewhere.
    // An invoice it issued itself is not an outgoing payment either.
    assert_eq!(
        wallet
            .lookup_payment(&dvmd::wallet::PaymentHash([7; 32]))
            .await
            .expect("lookup_payment"),
        OutgoingStatus::Unknown
    );
    let own = wallet
        .create_invoice(memo(1_000, 600))
        .await
        .expect("invoice");
    assert_eq!(
        wallet
            .lookup_payment(&own.payment_hash)
            .await
            .expect("lookup_payment"),
        OutgoingStatus::Unknown
    );

    // Insufficient balance is its own error, and moves nothing.
    let balance = wallet.balance().await.expect("balance");
    let huge = other.invoice(balance + 1_000_000).await;
    let err = wallet
        .pay(&huge, 0)
        .await
        .expect_err("cannot pay more than the balance");
    assert!(
        matches!(err, WalletError::InsufficientBalance { .. }),
        "{err}"
    );
    assert_eq!(wallet.balance().await.expect("balance"), balance);

    cancel.cancel();
    let _ = follow.await;
}

struct DevCounterparty(Arc<DevWallet>);

#[async_trait::async_trait]
impl Counterparty for DevCounterparty {
    async fn pay(&self, bolt11: &str) {
        self.0.settle(bolt11).await.expect("settle");
    }
    /// The dev wallet pays only its own invoices, so its counterparty hands it one of those.
    async fn invoice(&self, msat: u64) -> String {
        self.0
            .create_invoice(memo(msat, 600))
            .await
            .expect("invoice")
            .bolt11
    }
}

pub struct LnbitsCounterparty<'a> {
    pub lnbits: &'a Lnbits,
    pub account: LnbitsAccount,
}

#[async_trait::async_trait]
impl Counterparty for LnbitsCounterparty<'_> {
    async fn pay(&self, bolt11: &str) {
        self.lnbits.pay(&self.account, bolt11).await;
    }
    async fn invoice(&self, msat: u64) -> String {
        self.lnbits
            .create_invoice(&self.account, msat.div_ceil(1000), "counterparty")
            .await
            .0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_wallet_conforms() {
    let wallet = Arc::new(
        DevWallet::open(Store::temporary().expect("store"))
            .await
            .expect("wallet"),
    );
    conformance(wallet.clone(), &DevCounterparty(wallet)).await;
}

fn lnbits_config(
    lnbits: &Lnbits,
    account: &LnbitsAccount,
    webhook: Option<String>,
    websocket: bool,
) -> LnbitsConfig {
    LnbitsConfig {
        url: lnbits.url.clone(),
        invoice_key: Secret::new(account.inkey.clone(), "test"),
        admin_key: Some(Secret::new(account.adminkey.clone(), "test")),
        webhook_url: webhook,
        websocket,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lnbits_wallet_conforms() {
    let lnbits = Lnbits::start().await;
    let service = lnbits.create_wallet("dvmd").await;
    let customer = lnbits.create_wallet("customer").await;
    lnbits.fund(&service, 10).await;
    lnbits.fund(&customer, 100_000).await;
    let wallet =
        Arc::new(LnbitsWallet::new(lnbits_config(&lnbits, &service, None, true)).expect("wallet"));
    let counterparty = LnbitsCounterparty {
        lnbits: &lnbits,
        account: customer,
    };
    conformance(wallet.clone(), &counterparty).await;

    // "No such payment" is read only from LNbits' own answer. A payout's money comes back on
    // it once the invoice has expired, so anything else that looks like it must stay an error
    // (the payout stays pending) or a paid payout would be paid again.
    let bolt11 = counterparty.invoice(2_000).await;
    let hash = bolt11::decode(&bolt11).expect("decodes").payment_hash;
    wallet.pay(&bolt11, 10_000).await.expect("paid");
    let unknown = dvmd::wallet::PaymentHash([7; 32]);
    let config = || lnbits_config(&lnbits, &service, None, false);
    // A 404 that is not LNbits' (here FastAPI's, for a path that moved behind a proxy).
    let moved = LnbitsWallet::new(LnbitsConfig {
        url: format!("{}/moved", lnbits.url),
        ..config()
    })
    .expect("wallet");
    // A read key that is no longer this wallet's: LNbits finds the payment in some wallet
    // and answers without its details.
    let rotated = LnbitsWallet::new(LnbitsConfig {
        invoice_key: Secret::new("0".repeat(32), "test"),
        ..config()
    })
    .expect("wallet");
    for (what, wallet, hash) in [
        ("a moved path, paid", &moved, hash),
        ("a moved path, unknown", &moved, unknown),
        ("a rotated key, paid", &rotated, hash),
    ] {
        let seen = wallet.lookup_payment(&hash).await;
        assert!(
            matches!(
                seen,
                Err(WalletError::Unavailable(_) | WalletError::Refused(_))
            ),
            "{what}: {seen:?}"
        );
    }
    // Without an admin key nothing can be sent: declined, so a payout fails at once.
    let read_only = LnbitsWallet::new(LnbitsConfig {
        admin_key: None,
        ..config()
    })
    .expect("wallet");
    let refused = read_only
        .pay(&counterparty.invoice(1_000).await, 10_000)
        .await;
    assert!(
        refused.as_ref().is_err_and(WalletError::declined),
        "{refused:?}"
    );
}

/// A daemon (dev mode: embedded relay, instant backend) whose wallet is `lnbits`.
async fn daemon_on_lnbits(
    data: &std::path::Path,
    lnbits: &Lnbits,
    account: &LnbitsAccount,
    edit: impl FnOnce(&mut dvmd::config::FileConfig),
) -> dvmd::daemon::Daemon {
    daemon_on_lnbits_at(data, "127.0.0.1:0", lnbits, account, edit).await
}

/// [`daemon_on_lnbits`] with the HTTP door on `http_listen`.
async fn daemon_on_lnbits_at(
    data: &std::path::Path,
    http_listen: &str,
    lnbits: &Lnbits,
    account: &LnbitsAccount,
    edit: impl FnOnce(&mut dvmd::config::FileConfig),
) -> dvmd::daemon::Daemon {
    let key = data.join("lnbits.inkey");
    std::fs::write(&key, &account.inkey).expect("write key");
    let config = harness::dev_config_at(data, http_listen, |file| {
        file.wallet.backend = "lnbits".into();
        file.wallet.lnbits.url = lnbits.url.clone();
        file.wallet.lnbits.invoice_key_env = None;
        file.wallet.lnbits.invoice_key_file = Some(key);
        edit(file);
    });
    let backend = Arc::new(dvmd::infer::instant::InstantBackend::new(
        "paid through LNbits",
    ));
    harness::start(config, Some(backend)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_job_on_lnbits_with_forged_and_repeated_hints() {
    let lnbits = Lnbits::start().await;
    let service = lnbits.create_wallet("dvmd").await;
    let customer = lnbits.create_wallet("customer").await;
    lnbits.fund(&customer, 10_000).await;
    let data = harness::data_dir();
    // Hints come from the websocket only; webhooks are posted by hand below.
    let daemon = daemon_on_lnbits(data.path(), &lnbits, &service, |file| {
        file.wallet.reconcile_interval_secs = 3600;
    })
    .await;
    let ready = daemon.ready().clone();
    let (mut alice, request, quote, bolt11) = harness::hello_job(&ready.relay_url).await;
    assert!(bolt11.starts_with("lnbc"), "an LNbits invoice: {bolt11}");
    assert_eq!(quote % 1000, 0, "LNbits invoices are whole sats: {quote}");
    let hash = bolt11::decode(&bolt11).expect("decode").payment_hash;

    // Forged "paid" pushes: a webhook for the unpaid invoice and for an unknown hash, and a
    // message pushed into the LNbits websocket. A webhook without the key dvmd gives LNbits
    // with each invoice is refused before it becomes a hint; with it (as if LNbits itself
    // lied), each is only a hint.
    let http = reqwest::Client::new();
    let hints = || daemon.pipeline().metrics().settlement_hints();
    let hook = format!("{}/hooks/wallet", ready.http_url);
    let key = dvmd::identity::webhook_key(&dvmd::identity::load(data.path()).expect("keys"));
    let keyed = format!("{hook}?key={key}");
    let hints_before = hints();
    let forged = [
        serde_json::json!({ "payment_hash": hash.to_hex(), "status": "success", "paid": true }),
        serde_json::json!({ "payment_hash": "ab".repeat(32), "status": "success" }),
    ];
    for url in [hook.clone(), format!("{hook}?key={}", "0".repeat(32))] {
        let sent = http.post(&url).json(&forged[0]).send().await.expect("hook");
        assert_eq!(sent.status(), reqwest::StatusCode::UNAUTHORIZED, "{url}");
    }
    assert_eq!(daemon.pipeline().metrics().webhooks_refused(), 2);
    for body in &forged {
        let sent = http.post(&keyed).json(body).send().await.expect("hook");
        assert!(sent.status().is_success());
    }
    for _ in 0..100 {
        if hints() >= hints_before + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        hints(),
        hints_before + 2,
        "only the keyed webhooks became hints"
    );
    // LNbits lets anyone push any text to a wallet's websocket listeners, unauthenticated:
    // `GET /api/v1/ws/{item_id}/{data}`. Push a fake "paid" for our invoice.
    let push = serde_json::json!({ "wallet_balance": 999, "payment": { "payment_hash": hash.to_hex(), "status": "success", "amount": quote } });
    let url = format!(
        "{}/api/v1/ws/{}/{}",
        lnbits.url,
        service.inkey,
        urlencode(&push.to_string())
    );
    let pushed: serde_json::Value = http
        .get(url)
        .send()
        .await
        .expect("push")
        .json()
        .await
        .expect("json");
    assert_eq!(pushed["sent"], true, "{pushed}");
    for _ in 0..100 {
        if hints() >= hints_before + 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        hints() >= hints_before + 3,
        "the forged webhooks and the websocket push arrived as hints"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let job = daemon
        .pipeline()
        .book()
        .get(&request.id.into())
        .await
        .expect("read")
        .expect("job");
    assert_eq!(
        job.state,
        JobState::AwaitingPayment,
        "no forged hint moves a job"
    );
    assert_eq!(
        harness::ledger_ok(daemon.pipeline().book().store()).payment_in_msat,
        0
    );

    // A flood of forged webhooks for the open invoice: hints for one hash are coalesced, so
    // the flood does not become a flood of lookups against LNbits.
    let flood = 200;
    let (hints_before, lookups_before) = (hints(), daemon.pipeline().metrics().wallet_lookups());
    let body = serde_json::json!({ "payment_hash": hash.to_hex(), "status": "success" });
    futures::future::join_all((0..flood).map(|_| http.post(&keyed).json(&body).send())).await;
    for _ in 0..200 {
        if hints() >= hints_before + flood {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        hints() >= hints_before + flood,
        "every webhook arrived as a hint"
    );
    let mut lookups = daemon.pipeline().metrics().wallet_lookups();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = daemon.pipeline().metrics().wallet_lookups();
        if now == lookups {
            break;
        }
        lookups = now;
    }
    let looked_up = lookups - lookups_before;
    assert!(
        (1..=flood / 2).contains(&looked_up),
        "{flood} hints for one hash cost {looked_up} lookups"
    );

    // The real payment, from the customer's LNbits wallet: the websocket hint, confirmed by
    // lookup, runs the job.
    let paid = lnbits.pay(&customer, &bolt11).await;
    let result = harness::result(&mut alice, &request.id).await;
    assert_eq!(result.content, "paid through LNbits");

    // LNbits posts internal-payment webhooks twice, double-encoded: replay that, twice more.
    let replay = serde_json::to_string(&paid.to_string()).expect("double-encode");
    for _ in 0..2 {
        http.post(&keyed)
            .body(replay.clone())
            .send()
            .await
            .expect("hook");
    }
    daemon.pipeline().reconcile_once().await;
    let job =
        harness::wait_for_state(daemon.pipeline().book(), &request.id, JobState::Settled).await;
    assert_eq!(job.paid_msat, quote);
    alice.shutdown().await;
    // Its idle keep-alive connections would keep the HTTP handlers, and the store, open.
    drop(http);
    daemon.stop().await;
    let totals = harness::ledger_ok(&harness::open_store(data.path()));
    assert_eq!(totals.payment_in_msat, quote, "one payment, booked once");
    assert_eq!(
        lnbits.balance_msat(&service).await,
        quote,
        "the money is in the service's wallet"
    );
}

/// LNbits posts its webhook to the URL dvmd gave it, key included, and the job runs on that
/// hint alone: no websocket, and no reconcile pass until long after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lnbits_webhooks_reach_dvmd_with_their_key() {
    let lnbits = Lnbits::start().await;
    let service = lnbits.create_wallet("dvmd").await;
    let customer = lnbits.create_wallet("customer").await;
    lnbits.fund(&customer, 10_000).await;
    let data = harness::data_dir();
    let http_listen = format!("127.0.0.1:{}", harness::free_port());
    let webhook = format!("http://{http_listen}/hooks/wallet");
    let daemon = daemon_on_lnbits_at(data.path(), &http_listen, &lnbits, &service, |file| {
        file.wallet.lnbits.websocket = false;
        file.wallet.lnbits.webhook_url = Some(webhook);
        file.wallet.reconcile_interval_secs = 3600;
    })
    .await;
    let ready = daemon.ready().clone();
    let (mut alice, request, _, bolt11) = harness::hello_job(&ready.relay_url).await;
    lnbits.pay(&customer, &bolt11).await;
    let result = harness::result(&mut alice, &request.id).await;
    assert_eq!(result.content, "paid through LNbits");
    let metrics = daemon.pipeline().metrics();
    assert!(metrics.settlement_hints() >= 1, "the webhook was the hint");
    assert_eq!(metrics.webhooks_refused(), 0, "LNbits sent the key");
    alice.shutdown().await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lnbits_going_away_loses_nothing() {
    let mut lnbits = Lnbits::start().await;
    let service = lnbits.create_wallet("dvmd").await;
    let customer = lnbits.create_wallet("customer").await;
    lnbits.fund(&customer, 10_000).await;
    let data = harness::data_dir();
    // No push hints and no periodic lookups: the test drives the reconciler itself.
    let daemon = daemon_on_lnbits(data.path(), &lnbits, &service, |file| {
        file.wallet.reconcile_interval_secs = 3600;
        file.wallet.lnbits.websocket = false;
    })
    .await;
    let ready = daemon.ready().clone();
    let (mut alice, request, _, bolt11) = harness::hello_job(&ready.relay_url).await;
    lnbits.pay(&customer, &bolt11).await;

    // LNbits goes away before dvmd heard of the payment: lookups fail, the job waits.
    lnbits.stop().await;
    daemon.pipeline().reconcile_once().await;
    let job = daemon
        .pipeline()
        .book()
        .get(&request.id.into())
        .await
        .expect("read")
        .expect("job");
    assert_eq!(job.state, JobState::AwaitingPayment);

    // While it is down, a new request cannot get an invoice: refused, nothing charged.
    let second = alice
        .post(customer::text_request(
            "Again",
            &[("max_tokens", "8")],
            None,
            None,
        ))
        .await
        .expect("post");
    let info = harness::error_info(&mut alice, &second.id).await;
    assert!(info.contains("cannot issue an invoice"), "{info}");

    // Back again: the reconciler finds the payment, the job runs once.
    lnbits.restart().await;
    daemon.pipeline().reconcile_once().await;
    daemon.pipeline().reconcile_once().await;
    harness::result(&mut alice, &request.id).await;
    let job =
        harness::wait_for_state(daemon.pipeline().book(), &request.id, JobState::Settled).await;
    alice.shutdown().await;
    daemon.stop().await;
    let totals = harness::ledger_ok(&harness::open_store(data.path()));
    assert_eq!(totals.payment_in_msat, job.paid_msat, "paid once");
}
