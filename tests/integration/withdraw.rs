//! Payouts from customers' accounts (`POST /v1/account/withdraw`) on real LNbits: a withdraw
//! that arrives, a hash paid once, a balance that does not cover it; and the faults, injected
//! next to the real wallet: a pay call that errors after the payment went out (it stays pending
//! and is paid once), the daemon stopping between the booking and the wallet's answer (found
//! paid on the next start, debited once), a payment the wallet says failed (credit restored).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dvmd::daemon::{Daemon, Parts};
use dvmd::job::payouts::PayoutState;
use dvmd::ledger::Account;
use dvmd::wallet::{
    Invoice, InvoiceRequest, OutgoingStatus, PaymentHash, PaymentSent, PaymentStatus, Wallet,
    WalletError,
};
use nostr_sdk::{Keys, ToBech32};
use serde_json::Value;

use crate::harness;
use crate::lnbits::{Lnbits, LnbitsAccount};

/// How the wallet misbehaves.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// `pay` sends the payment, then answers an error; the first two lookups fail too.
    ErrorsAfterSending,
    /// `pay` sends the payment and never answers.
    HangsAfterSending,
    /// `pay` sends nothing and errors; the lookup says the payment failed.
    Fails,
    /// The first `pay` goes through; the second is sent and never answered (the daemon dies
    /// while its wallet pays).
    SecondPayHangs,
}

struct FaultWallet {
    inner: Arc<dyn Wallet>,
    fault: Fault,
    lookups: AtomicU32,
    pays: AtomicU32,
}

#[async_trait::async_trait]
impl Wallet for FaultWallet {
    fn name(&self) -> &'static str {
        "faulty"
    }
    fn unknown_means_unsent(&self) -> bool {
        self.inner.unknown_means_unsent()
    }
    async fn create_invoice(&self, request: InvoiceRequest) -> Result<Invoice, WalletError> {
        self.inner.create_invoice(request).await
    }
    async fn lookup(&self, hash: &PaymentHash) -> Result<PaymentStatus, WalletError> {
        self.inner.lookup(hash).await
    }
    async fn pay(&self, bolt11: &str, max_fee_msat: u64) -> Result<PaymentSent, WalletError> {
        match self.fault {
            Fault::ErrorsAfterSending => {
                self.inner.pay(bolt11, max_fee_msat).await?;
                Err(WalletError::Unavailable("connection reset".into()))
            }
            Fault::HangsAfterSending => {
                self.inner.pay(bolt11, max_fee_msat).await?;
                std::future::pending().await
            }
            Fault::Fails => Err(WalletError::Unavailable("no route".into())),
            Fault::SecondPayHangs => {
                let sent = self.inner.pay(bolt11, max_fee_msat).await?;
                if self.pays.fetch_add(1, Ordering::SeqCst) == 1 {
                    std::future::pending::<()>().await;
                }
                Ok(sent)
            }
        }
    }
    async fn lookup_payment(&self, hash: &PaymentHash) -> Result<OutgoingStatus, WalletError> {
        let n = self.lookups.fetch_add(1, Ordering::SeqCst);
        match self.fault {
            Fault::ErrorsAfterSending if n < 2 => Err(WalletError::Unavailable("timed out".into())),
            Fault::Fails => Ok(OutgoingStatus::Failed),
            _ => self.inner.lookup_payment(hash).await,
        }
    }
    async fn balance(&self) -> Result<u64, WalletError> {
        self.inner.balance().await
    }
    fn settlements(&self) -> tokio::sync::broadcast::Receiver<PaymentHash> {
        self.inner.settlements()
    }
}

/// A daemon on `lnbits` paying from `service` (admin key), its wallet wrapped in `fault`.
async fn daemon(
    data: &std::path::Path,
    lnbits: &Lnbits,
    service: &LnbitsAccount,
    fault: Option<Fault>,
) -> Daemon {
    daemon_with(data, lnbits, service, fault, |_| {}).await
}

async fn daemon_with(
    data: &std::path::Path,
    lnbits: &Lnbits,
    service: &LnbitsAccount,
    fault: Option<Fault>,
    edit: impl FnOnce(&mut dvmd::config::FileConfig),
) -> Daemon {
    let config = lnbits_config(data, lnbits, service, edit);
    let parts = Parts {
        backend: Some(Arc::new(dvmd::infer::instant::InstantBackend::new("-"))),
        wrap_wallet: fault.map(|fault| {
            Arc::new(move |inner| {
                Arc::new(FaultWallet {
                    inner,
                    fault,
                    lookups: AtomicU32::new(0),
                    pays: AtomicU32::new(0),
                }) as Arc<dyn Wallet>
            }) as dvmd::daemon::WalletWrap
        }),
    };
    Daemon::start(config, parts).await.expect("daemon starts")
}

/// A dev daemon's config on the service's LNbits wallet (its keys in files in `data`).
pub(crate) fn lnbits_config(
    data: &std::path::Path,
    lnbits: &Lnbits,
    service: &LnbitsAccount,
    edit: impl FnOnce(&mut dvmd::config::FileConfig),
) -> dvmd::config::Config {
    lnbits_config_at(data, "127.0.0.1:0", lnbits, service, edit)
}

/// The same with the HTTP door on `http_listen` (a restart that keeps its signed URLs).
fn lnbits_config_at(
    data: &std::path::Path,
    http_listen: &str,
    lnbits: &Lnbits,
    service: &LnbitsAccount,
    edit: impl FnOnce(&mut dvmd::config::FileConfig),
) -> dvmd::config::Config {
    let (inkey, adminkey) = (data.join("lnbits.inkey"), data.join("lnbits.adminkey"));
    std::fs::write(&inkey, &service.inkey).expect("write key");
    std::fs::write(&adminkey, &service.adminkey).expect("write key");
    harness::dev_config_at(data, http_listen, |file| {
        file.wallet.backend = "lnbits".into();
        file.wallet.lnbits.url = lnbits.url.clone();
        file.wallet.lnbits.invoice_key_env = None;
        file.wallet.lnbits.invoice_key_file = Some(inkey);
        file.wallet.lnbits.admin_key_env = None;
        file.wallet.lnbits.admin_key_file = Some(adminkey);
        edit(file);
    })
}

/// LNbits with the service's wallet and a customer's, funded with 1,000 sats.
pub(crate) async fn bank() -> (Lnbits, LnbitsAccount, LnbitsAccount) {
    let lnbits = Lnbits::start().await;
    let (service, customer) = (
        lnbits.create_wallet("dvmd").await,
        lnbits.create_wallet("customer").await,
    );
    lnbits.fund(&customer, 1_000).await;
    (lnbits, service, customer)
}

/// Credit `keys`' account with `sats` paid from the customer's LNbits wallet.
async fn top_up(daemon: &Daemon, lnbits: &Lnbits, payer: &LnbitsAccount, keys: &Keys, sats: u64) {
    let url = format!("{}/v1/account/topup", daemon.ready().http_url);
    let body = format!(r#"{{"amount_msat":{}}}"#, sats * 1000);
    let (status, topup) = post(&url, keys, &body).await;
    assert_eq!(status, 200, "{topup}");
    lnbits
        .pay(payer, topup["bolt11"].as_str().expect("bolt11"))
        .await;
    let hash = PaymentHash::try_from(topup["payment_hash"].as_str().expect("hash").to_owned())
        .expect("hash");
    harness::wait_for_booking(daemon.pipeline().book(), &hash).await;
}

async fn post(url: &str, keys: &Keys, body: &str) -> (u16, Value) {
    let header = harness::nip98_with_nonce(keys, url, "POST", Some(body));
    let response = reqwest::Client::new()
        .post(url)
        .header("Authorization", header)
        .header("Content-Type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("POST");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

async fn withdraw(daemon: &Daemon, keys: &Keys, bolt11: &str) -> (u16, Value) {
    let url = format!("{}/v1/account/withdraw", daemon.ready().http_url);
    post(&url, keys, &format!(r#"{{"bolt11":"{bolt11}"}}"#)).await
}

pub(crate) async fn invoice(lnbits: &Lnbits, wallet: &LnbitsAccount, sats: u64) -> String {
    let invoice = lnbits
        .create_invoice_json(
            wallet,
            serde_json::json!({"out": false, "amount": sats, "memo": "withdraw"}),
        )
        .await;
    invoice["bolt11"]
        .as_str()
        .or_else(|| invoice["payment_request"].as_str())
        .expect("bolt11")
        .to_owned()
}

/// Wait until the payout of `hash` is no longer pending.
async fn ended(daemon: &Daemon, hash: &str) -> PayoutState {
    let hash = PaymentHash::try_from(hash.to_owned()).expect("hash");
    for _ in 0..300 {
        let payout = daemon
            .pipeline()
            .book()
            .payout(&hash)
            .await
            .expect("read")
            .expect("payout");
        if payout.state != PayoutState::Pending {
            return payout.state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("payout {hash} still pending");
}

fn account_of(keys: &Keys) -> Account {
    keys.public_key().into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdraw_arrives_once_and_only_from_what_the_balance_holds() {
    let (lnbits, service, customer) = bank().await;
    let data = harness::data_dir();
    let daemon = daemon(data.path(), &lnbits, &service, None).await;
    let alice = Keys::generate();
    top_up(&daemon, &lnbits, &customer, &alice, 100).await;
    let before = lnbits.balance_msat(&customer).await;

    let bolt11 = invoice(&lnbits, &customer, 40).await;
    let (status, payout) = withdraw(&daemon, &alice, &bolt11).await;
    assert_eq!(status, 200, "{payout}");
    assert_eq!(payout["state"], "paid", "{payout}");
    let fee = payout["fee_msat"].as_u64().expect("fee");
    assert!(fee <= payout["max_fee_msat"].as_u64().expect("max fee"));
    assert_eq!(lnbits.balance_msat(&customer).await, before + 40_000);

    // The same invoice again: a payment hash pays once.
    let (status, again) = withdraw(&daemon, &alice, &bolt11).await;
    assert_eq!(status, 400, "{again}");
    assert!(again["error"]["message"]
        .as_str()
        .expect("message")
        .contains("paid out before"));
    // More than the balance holds (with the most fee): 402, nothing moves.
    let big = invoice(&lnbits, &customer, 59).await;
    let (status, short) = withdraw(&daemon, &alice, &big).await;
    assert_eq!(status, 402, "{short}");
    // An invoice of this service's own: refused.
    let url = format!("{}/v1/account/topup", daemon.ready().http_url);
    let (_, own) = post(&url, &alice, r#"{"amount_msat":1000}"#).await;
    let (status, _) = withdraw(&daemon, &alice, own["bolt11"].as_str().expect("bolt11")).await;
    assert_eq!(status, 400);
    assert_eq!(lnbits.balance_msat(&customer).await, before + 40_000);

    // The account shows the two phases; the balance is what is left.
    let url = format!("{}/v1/account", daemon.ready().http_url);
    let header = harness::nostr_tools_nip98(&alice, &url, "get", None);
    let shown: Value = reqwest::Client::new()
        .get(&url)
        .header("Authorization", header)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    let kinds: Vec<&str> = shown["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"payout_pending") && kinds.contains(&"payout"),
        "{shown}"
    );
    assert_eq!(shown["balance_msat"], 100_000 - 40_000 - fee, "{shown}");
    daemon.stop().await;
    {
        let store = harness::open_store(data.path());
        let totals = harness::ledger_ok(&store);
        assert_eq!((totals.payout_msat, totals.in_flight_msat), (40_000, 0));
        assert_eq!(
            harness::account_balance(&store, &account_of(&alice)),
            100_000 - 40_000 - fee
        );
    }

    // The operator's view: `dvmd ledger show` lists the account's entries, `dvmd ledger check`
    // passes; an entry that moves money behind the balance's back fails it, saying where.
    let dvmd = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dvmd"))
            .args(args)
            .arg("--config")
            .arg(data.path().join("none.toml"))
            .arg("--data-dir")
            .arg(data.path())
            .output()
            .expect("run dvmd")
    };
    let npub = alice.public_key().to_hex();
    let shown = dvmd(&["ledger", "show", "--account", &npub]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{shown:?}");
    for kind in [
        "payment_in",
        "payout_pending",
        "payout ",
        "payout_fee_returned",
    ] {
        assert!(text.contains(kind), "{kind} in:\n{text}");
    }
    assert!(dvmd(&["ledger", "check"]).status.success());
    {
        let store = harness::open_store(data.path());
        store
            .commit(move |tx| {
                let stray = dvmd::ledger::Entry {
                    kind: dvmd::ledger::EntryKind::PaymentIn,
                    account: account_of(&Keys::generate()),
                    msat: 1,
                    job: None,
                    payment_hash: None,
                    at: 0,
                };
                tx.put(dvmd::store::Tree::Entries, &u64::MAX.to_be_bytes(), &stray)?;
                Ok::<_, dvmd::store::TxError<dvmd::store::StoreError>>(())
            })
            .await
            .expect("write");
        store.close().await.expect("close");
    }
    let broken = dvmd(&["ledger", "check"]);
    assert!(!broken.status.success());
    let said = String::from_utf8_lossy(&broken.stderr);
    assert!(said.contains("ledger invariant violated"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pay_call_that_errors_after_sending_stays_pending_and_is_paid_once() {
    let (lnbits, service, customer) = bank().await;
    let data = harness::data_dir();
    let daemon = daemon(
        data.path(),
        &lnbits,
        &service,
        Some(Fault::ErrorsAfterSending),
    )
    .await;
    let alice = Keys::generate();
    top_up(&daemon, &lnbits, &customer, &alice, 100).await;
    let before = lnbits.balance_msat(&customer).await;

    let bolt11 = invoice(&lnbits, &customer, 30).await;
    let (status, payout) = withdraw(&daemon, &alice, &bolt11).await;
    assert_eq!(status, 200, "{payout}");
    assert_eq!(
        payout["state"], "pending",
        "an error is not an answer: {payout}"
    );
    // The note says the wallet has not answered (its words stay in the operator's log).
    assert!(payout["note"]
        .as_str()
        .expect("note")
        .contains("lookup failed"));
    // The reconciler asks again (every second here) and books what the wallet then says.
    let state = ended(&daemon, payout["payment_hash"].as_str().expect("hash")).await;
    assert!(matches!(state, PayoutState::Paid { .. }), "{state:?}");
    assert_eq!(
        lnbits.balance_msat(&customer).await,
        before + 30_000,
        "paid once"
    );
    daemon.stop().await;
    let store = harness::open_store(data.path());
    let totals = harness::ledger_ok(&store);
    assert_eq!((totals.payout_msat, totals.in_flight_msat), (30_000, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_between_booking_and_the_wallets_answer_is_settled_on_the_next_start() {
    let (lnbits, service, customer) = bank().await;
    let data = harness::data_dir();
    let first = daemon(
        data.path(),
        &lnbits,
        &service,
        Some(Fault::HangsAfterSending),
    )
    .await;
    let alice = Keys::generate();
    top_up(&first, &lnbits, &customer, &alice, 100).await;
    let before = lnbits.balance_msat(&customer).await;

    // The wallet sends and never answers; the daemon goes away with the payout booked pending
    // and nothing after it, as a kill -9 would leave it on disk.
    let bolt11 = invoice(&lnbits, &customer, 25).await;
    let pipeline = first.pipeline().clone();
    let account = account_of(&alice);
    let paying = tokio::spawn(async move { pipeline.withdraw(account, &bolt11).await });
    for _ in 0..200 {
        if lnbits.balance_msat(&customer).await > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        lnbits.balance_msat(&customer).await,
        before + 25_000,
        "sent"
    );
    paying.abort();
    let pending = first
        .pipeline()
        .book()
        .pending_payouts()
        .await
        .expect("read");
    assert_eq!(pending.len(), 1);
    let hash = pending[0].payment_hash.to_string();
    first.stop().await;
    assert_eq!(
        harness::ledger_ok(&harness::open_store(data.path())).in_flight_msat,
        25_000 + pending[0].max_fee_msat
    );

    // The next start looks it up (it never pays it again) and books it paid.
    let second = daemon(data.path(), &lnbits, &service, None).await;
    let state = ended(&second, &hash).await;
    assert!(matches!(state, PayoutState::Paid { .. }), "{state:?}");
    assert_eq!(
        lnbits.balance_msat(&customer).await,
        before + 25_000,
        "paid once"
    );
    second.stop().await;
    let store = harness::open_store(data.path());
    let totals = harness::ledger_ok(&store);
    assert_eq!((totals.payout_msat, totals.in_flight_msat), (25_000, 0));
    let fee = match state {
        PayoutState::Paid { fee_msat } => fee_msat,
        _ => unreachable!(),
    };
    assert_eq!(
        harness::account_balance(&store, &account_of(&alice)),
        100_000 - 25_000 - fee,
        "debited once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payout_the_wallet_says_failed_gives_the_credit_back() {
    let (lnbits, service, customer) = bank().await;
    let data = harness::data_dir();
    let daemon = daemon(data.path(), &lnbits, &service, Some(Fault::Fails)).await;
    let alice = Keys::generate();
    top_up(&daemon, &lnbits, &customer, &alice, 50).await;
    let before = lnbits.balance_msat(&customer).await;

    let bolt11 = invoice(&lnbits, &customer, 20).await;
    let (status, payout) = withdraw(&daemon, &alice, &bolt11).await;
    assert_eq!(status, 200, "{payout}");
    assert_eq!(payout["state"], "failed", "{payout}");
    assert_eq!(lnbits.balance_msat(&customer).await, before);
    daemon.stop().await;
    let store = harness::open_store(data.path());
    let totals = harness::ledger_ok(&store);
    assert_eq!((totals.payout_msat, totals.in_flight_msat), (0, 0));
    assert_eq!(
        harness::account_balance(&store, &account_of(&alice)),
        50_000,
        "all of it back"
    );
}

/// LNbits with the service's wallet, a customer's funded with 1,000 sats, and B: another dvmd
/// with a Lightning address (`dvmd@host`) on a third wallet.
struct AddressBank {
    lnbits: Lnbits,
    service: LnbitsAccount,
    customer: LnbitsAccount,
    other: LnbitsAccount,
    b: Daemon,
    address: String,
    _data_b: tempfile::TempDir,
}

async fn address_bank() -> AddressBank {
    let lnbits = Lnbits::start().await;
    let (service, customer, other) = (
        lnbits.create_wallet("dvmd").await,
        lnbits.create_wallet("customer").await,
        lnbits.create_wallet("dvmd-b").await,
    );
    lnbits.fund(&customer, 1_000).await;
    let data_b = harness::data_dir();
    let b = crate::payouts::daemon_b(data_b.path(), &lnbits, &other).await;
    let address = format!("dvmd@{}", b.ready().http_url.trim_start_matches("http://"));
    AddressBank {
        lnbits,
        service,
        customer,
        other,
        b,
        address,
        _data_b: data_b,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdraw_to_a_lightning_address_of_another_dvmd_and_private_hosts_refused() {
    let AddressBank {
        lnbits,
        service,
        customer,
        other,
        b,
        address,
        _data_b,
    } = address_bank().await;

    // A, with the tests-only setting that lets a loopback LNURL host through.
    let data = harness::data_dir();
    let a = daemon_with(data.path(), &lnbits, &service, None, |file| {
        file.wallet.payout_lnurl_allow_loopback_http = true
    })
    .await;
    let alice = Keys::generate();
    top_up(&a, &lnbits, &customer, &alice, 100).await;
    let url = format!("{}/v1/account/withdraw", a.ready().http_url);
    let before = lnbits.balance_msat(&other).await;
    let body = format!(r#"{{"lightning_address":"{address}","amount_msat":30000}}"#);
    let (status, payout) = post(&url, &alice, &body).await;
    assert_eq!(status, 200, "{payout}");
    assert_eq!(payout["state"], "paid", "{payout}");
    assert_eq!(lnbits.balance_msat(&other).await, before + 30_000);

    // Without an amount: the whole balance less the most fee, in whole sats.
    let body = format!(r#"{{"lightning_address":"{address}"}}"#);
    let (status, rest) = post(&url, &alice, &body).await;
    assert_eq!(status, 200, "{rest}");
    let sent = rest["amount_msat"].as_u64().expect("amount");
    assert_eq!(sent % 1000, 0);
    assert!(sent + rest["max_fee_msat"].as_u64().expect("fee") <= 70_000);
    a.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));

    // Without the setting, the same loopback host is refused, as is any private address.
    let data = harness::data_dir();
    let strict = daemon(data.path(), &lnbits, &service, None).await;
    top_up(&strict, &lnbits, &customer, &alice, 50).await;
    let url = format!("{}/v1/account/withdraw", strict.ready().http_url);
    for target in [address.as_str(), "alice@10.0.0.1", "alice@169.254.169.254"] {
        let body = format!(r#"{{"lightning_address":"{target}","amount_msat":10000}}"#);
        let (status, refused) = post(&url, &alice, &body).await;
        assert_eq!(status, 400, "{target}: {refused}");
    }
    strict.stop().await;
    let store = harness::open_store(data.path());
    assert_eq!(harness::ledger_ok(&store).in_flight_msat, 0);
    assert_eq!(
        harness::account_balance(&store, &account_of(&alice)),
        50_000
    );
    b.stop().await;
}

/// One signed withdrawal pays out once, across a restart too: the restart empties the NIP-98
/// replay cache while the auth event is still inside its window, and a Lightning address
/// gives a fresh invoice (a fresh payment hash) each time, so only the recorded signature
/// stops the same signed request from paying out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_withdrawal_sent_again_after_a_restart_pays_nothing() {
    let AddressBank {
        lnbits,
        service,
        customer,
        other,
        b,
        address,
        _data_b,
    } = address_bank().await;

    let data = harness::data_dir();
    let listen = format!("127.0.0.1:{}", harness::free_port());
    let start = || {
        let config = lnbits_config_at(data.path(), &listen, &lnbits, &service, |file| {
            file.wallet.payout_lnurl_allow_loopback_http = true;
        });
        let parts = Parts {
            backend: Some(Arc::new(dvmd::infer::instant::InstantBackend::new("-"))),
            ..Parts::default()
        };
        Daemon::start(config, parts)
    };
    let a = start().await.expect("daemon starts");
    let alice = Keys::generate();
    top_up(&a, &lnbits, &customer, &alice, 100).await;
    let url = format!("{}/v1/account/withdraw", a.ready().http_url);
    let body = format!(r#"{{"lightning_address":"{address}","amount_msat":30000}}"#);
    let header = harness::nip98_with_nonce(&alice, &url, "POST", Some(&body));
    let send = |header: String| {
        reqwest::Client::new()
            .post(&url)
            .header("Authorization", header)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
    };
    let paid = send(header.clone()).await.expect("POST");
    assert_eq!(paid.status(), 200);
    let received = lnbits.balance_msat(&other).await;
    a.stop().await;

    let a = start().await.expect("daemon starts again");
    let again = send(header).await.expect("POST");
    assert_eq!(again.status(), 409);
    let again: Value = again.json().await.expect("json");
    assert_eq!(again["error"]["code"], "already_ran", "{again}");
    assert_eq!(
        lnbits.balance_msat(&other).await,
        received,
        "nothing left again"
    );
    let store = a.pipeline().book().store();
    assert_eq!(
        harness::account_balance(store, &account_of(&alice)),
        100_000 - 30_000 - harness::ledger_ok(store).routing_fee_msat,
        "debited once"
    );
    // A new signature withdraws as before.
    let header = harness::nip98_with_nonce(&alice, &url, "POST", Some(&body));
    assert_eq!(send(header).await.expect("POST").status(), 200);
    a.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_withdraws_for_a_customer_through_the_daemon_or_the_store() {
    let (lnbits, service, customer) = bank().await;
    let data = harness::data_dir();
    let daemon = daemon(data.path(), &lnbits, &service, None).await;
    let alice = Keys::generate();
    top_up(&daemon, &lnbits, &customer, &alice, 100).await;
    let before = lnbits.balance_msat(&customer).await;

    // The same LNbits wallet in a dvmd.toml for the command (keys from the environment).
    let config = data.path().join("dvmd.toml");
    std::fs::write(
        &config,
        format!(
            "[wallet]\nbackend = \"lnbits\"\n[wallet.lnbits]\nurl = \"{}\"\nadmin_key_env = \"LNBITS_ADMIN_KEY\"\n",
            lnbits.url
        ),
    )
    .expect("write config");
    let npub = alice.public_key().to_bech32().expect("npub");
    let withdraw = |bolt11: String| {
        let (config, data, service) = (config.clone(), data.path().to_owned(), service.clone());
        let npub = npub.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_dvmd"))
                .args([
                    "account",
                    "withdraw",
                    "--account",
                    &npub,
                    "--bolt11",
                    &bolt11,
                ])
                .arg("--config")
                .arg(&config)
                .arg("--data-dir")
                .arg(&data)
                .env("LNBITS_INVOICE_KEY", &service.inkey)
                .env("LNBITS_ADMIN_KEY", &service.adminkey)
                .output()
                .expect("run dvmd")
        })
    };

    // The daemon runs (its store is locked): through its loopback admin endpoint.
    let first = withdraw(invoice(&lnbits, &customer, 20).await)
        .await
        .expect("join");
    assert!(first.status.success(), "{first:?}");
    let answer: Value = serde_json::from_slice(&first.stdout).expect("json");
    assert_eq!(answer["state"], "paid", "{answer}");
    assert_eq!(lnbits.balance_msat(&customer).await, before + 20_000);
    // Without the data directory's token the admin door is shut.
    let url = format!("{}/admin/withdraw", daemon.ready().http_url);
    let forbidden = reqwest::Client::new()
        .post(&url)
        .bearer_auth("guess")
        .body("{}")
        .send()
        .await
        .expect("POST");
    assert_eq!(forbidden.status(), 403);
    daemon.stop().await;

    // Stopped: the command opens the store and pays with the configured wallet itself.
    let second = withdraw(invoice(&lnbits, &customer, 15).await)
        .await
        .expect("join");
    assert!(second.status.success(), "{second:?}");
    let answer: Value = serde_json::from_slice(&second.stdout).expect("json");
    assert_eq!(answer["state"], "paid", "{answer}");
    assert_eq!(lnbits.balance_msat(&customer).await, before + 35_000);
    let store = harness::open_store(data.path());
    let totals = harness::ledger_ok(&store);
    assert_eq!((totals.payout_msat, totals.in_flight_msat), (35_000, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_goes_home_to_the_profiles_address_after_the_idle_period_and_top_ups_stay() {
    let lnbits = Lnbits::start().await;
    let (service, customer, other) = (
        lnbits.create_wallet("dvmd").await,
        lnbits.create_wallet("customer").await,
        lnbits.create_wallet("home").await,
    );
    lnbits.fund(&customer, 1_000).await;
    let data_b = harness::data_dir();
    let home = crate::payouts::daemon_b(data_b.path(), &lnbits, &other).await;
    let address = format!(
        "dvmd@{}",
        home.ready().http_url.trim_start_matches("http://")
    );
    let data = harness::data_dir();
    let a = daemon_with(
        data.path(),
        &lnbits,
        &service,
        Some(Fault::SecondPayHangs),
        |file| file.wallet.payout_lnurl_allow_loopback_http = true,
    )
    .await;
    let ready = a.ready().clone();
    let mut alice = dvmd::customer::Customer::connect(&ready.relay_url)
        .await
        .expect("connect");
    let keys = alice.keys().clone();

    // Alice opts in, names her address in her profile, and tops up credit (which stays).
    let url = format!("{}/v1/account/settings", ready.http_url);
    let (status, settings) = post(&url, &keys, r#"{"auto_payout":true}"#).await;
    assert_eq!(status, 200, "{settings}");
    assert_eq!(settings["auto_payout"], true);
    alice
        .post(nostr_sdk::EventBuilder::metadata(
            &nostr_sdk::Metadata::new().name("alice").lud16(&address),
        ))
        .await
        .expect("profile");
    top_up(&a, &lnbits, &customer, &keys, 50).await;

    // A job paid by invoice (not from credit) uses little of its quote: the change is owed.
    let mut paid_job = async || {
        let job = alice
            .post(dvmd::customer::text_request(
                "Say hi.",
                &[("max_tokens", "300")],
                None,
                None,
            ))
            .await
            .expect("post");
        let (_, bolt11) = harness::invoice(&mut alice, &job.id).await;
        lnbits.pay(&customer, &bolt11).await;
        let book = a.pipeline().book();
        let settled = harness::wait_for_state(book, &job.id, dvmd::job::JobState::Settled).await;
        let change = settled.paid_msat - settled.charge_msat.expect("charged");
        assert!(change >= 2_000, "a change worth sending: {settled:?}");
        change
    };
    let change = paid_job().await;

    let policy = dvmd::job::auto_payout::AutoPayoutPolicy {
        idle_days: 7,
        min_msat: 1_000,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let day = 24 * 60 * 60;
    assert_eq!(
        a.pipeline().auto_payouts(policy, now).await,
        0,
        "not idle yet"
    );
    let before = lnbits.balance_msat(&other).await;
    assert_eq!(a.pipeline().auto_payouts(policy, now + 8 * day).await, 1);
    let sent = change / 1000 * 1000;
    assert_eq!(
        lnbits.balance_msat(&other).await,
        before + sent,
        "the change, in whole sats"
    );
    // Counted: the next sweep sends nothing more, and the top-up is still Alice's.
    assert_eq!(a.pipeline().auto_payouts(policy, now + 9 * day).await, 0);

    // A second change, and a sweep that stops while the wallet pays it (the daemon died): the
    // change was counted before the payout was booked, so a later sweep does not send it
    // again out of the top-up.
    let second = paid_job().await;
    let cut = tokio::time::timeout(
        Duration::from_secs(5),
        a.pipeline().auto_payouts(policy, now + 17 * day),
    )
    .await;
    assert!(cut.is_err(), "the wallet never answered");
    assert_eq!(
        a.pipeline().auto_payouts(policy, now + 26 * day).await,
        0,
        "counted once"
    );
    // The second payout went out; the reconcile pass finds it paid.
    a.pipeline().reconcile_payouts().await;
    let second_sent = second / 1000 * 1000;
    assert_eq!(
        lnbits.balance_msat(&other).await,
        before + sent + second_sent
    );
    alice.shutdown().await;
    a.stop().await;
    let store = harness::open_store(data.path());
    let totals = harness::ledger_ok(&store);
    assert_eq!(
        (totals.payout_msat, totals.in_flight_msat),
        (sent + second_sent, 0)
    );
    assert_eq!(
        harness::account_balance(&store, &account_of(&keys)),
        50_000 + change + second - sent - second_sent - totals.routing_fee_msat
    );
    home.stop().await;
}

/// A loopback proxy in front of LNbits that forwards everything, except that an outgoing
/// payment (`POST /api/v1/payments` with `"out": true`) is forwarded and then never answered:
/// the payment goes out, and the daemon never hears so.
async fn swallowing_proxy(lnbits_url: String) -> String {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, Method, StatusCode, Uri};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let http = reqwest::Client::new();
    let forward = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
        let (http, lnbits_url) = (http.clone(), lnbits_url.clone());
        async move {
            let mut request = http.request(
                reqwest::Method::from_bytes(method.as_str().as_bytes()).expect("method"),
                format!(
                    "{lnbits_url}{}",
                    uri.path_and_query().map_or("/", |p| p.as_str())
                ),
            );
            for name in ["x-api-key", "content-type"] {
                if let Some(value) = headers.get(name).and_then(|v| v.to_str().ok()) {
                    request = request.header(name, value);
                }
            }
            let outgoing = method == Method::POST
                && uri.path() == "/api/v1/payments"
                && serde_json::from_slice::<Value>(&body).is_ok_and(|b| b["out"] == true);
            let response = request.body(body).send().await.expect("LNbits");
            if outgoing {
                std::future::pending::<()>().await;
            }
            let status = StatusCode::from_u16(response.status().as_u16()).expect("status");
            (status, response.bytes().await.expect("body"))
        }
    };
    let app = axum::Router::new().fallback(forward);
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_the_booking_and_the_wallets_answer_pays_once_and_debits_once() {
    let (lnbits, service, customer) = bank().await;
    let data = harness::data_dir();
    std::fs::write(data.path().join("inkey"), &service.inkey).expect("key");
    std::fs::write(data.path().join("adminkey"), &service.adminkey).expect("key");
    let config = |url: &str| {
        format!(
            "backend = \"lnbits\"\n[wallet.lnbits]\nurl = \"{url}\"\nwebsocket = false\ninvoice_key_env = \"NONE_SET\"\ninvoice_key_file = \"{}\"\nadmin_key_file = \"{}\"\n",
            data.path().join("inkey").display(),
            data.path().join("adminkey").display()
        )
    };
    let proxy = swallowing_proxy(lnbits.url.clone()).await;
    let (relay_port, http_port) = (harness::free_port(), harness::free_port());
    let first = harness::DaemonProcess::spawn(data.path(), relay_port, http_port, &config(&proxy));
    let http = first.http_url.clone();
    let alice = Keys::generate();

    // 100 sats of credit, paid from the customer's LNbits wallet.
    let (status, topup) = post(
        &format!("{http}/v1/account/topup"),
        &alice,
        r#"{"amount_msat":100000}"#,
    )
    .await;
    assert_eq!(status, 200, "{topup}");
    lnbits
        .pay(&customer, topup["bolt11"].as_str().expect("bolt11"))
        .await;
    let balance = |http: String| {
        let alice = alice.clone();
        async move {
            let url = format!("{http}/v1/account");
            let header = harness::nip98_with_nonce(&alice, &url, "GET", None);
            let shown: Value = reqwest::Client::new()
                .get(&url)
                .header("Authorization", header)
                .send()
                .await
                .expect("GET")
                .json()
                .await
                .expect("json");
            shown
        }
    };
    for _ in 0..200 {
        if balance(http.clone()).await["balance_msat"] == 100_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(balance(http.clone()).await["balance_msat"], 100_000);

    // The withdrawal goes out through LNbits; its answer never comes back; kill -9.
    let before = lnbits.balance_msat(&customer).await;
    let bolt11 = invoice(&lnbits, &customer, 25).await;
    let waiting = {
        let (url, alice) = (format!("{http}/v1/account/withdraw"), alice.clone());
        tokio::spawn(
            async move { post(&url, &alice, &format!(r#"{{"bolt11":"{bolt11}"}}"#)).await },
        )
    };
    for _ in 0..200 {
        if lnbits.balance_msat(&customer).await > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        lnbits.balance_msat(&customer).await,
        before + 25_000,
        "sent"
    );
    // The call's task first: it would panic on the connection the kill drops.
    waiting.abort();
    first.kill();
    {
        let store = harness::open_store(data.path());
        let totals = harness::ledger_ok(&store);
        assert!(
            totals.in_flight_msat >= 25_000,
            "booked before the wallet was called"
        );
    }

    // Restarted on LNbits directly: the payout is looked up, found paid, booked once.
    let second =
        harness::DaemonProcess::spawn(data.path(), relay_port, http_port, &config(&lnbits.url));
    let mut shown = Value::Null;
    for _ in 0..200 {
        shown = balance(second.http_url.clone()).await;
        let kinds: Vec<&str> = shown["entries"]
            .as_array()
            .map(|e| e.iter().filter_map(|e| e["kind"].as_str()).collect())
            .unwrap_or_default();
        if kinds.contains(&"payout") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.terminate();
    assert_eq!(
        lnbits.balance_msat(&customer).await,
        before + 25_000,
        "paid once"
    );
    let store = harness::open_store(data.path());
    let totals = harness::ledger_ok(&store);
    assert_eq!(
        (totals.payout_msat, totals.in_flight_msat),
        (25_000, 0),
        "{shown}"
    );
    assert_eq!(
        harness::account_balance(&store, &account_of(&alice)),
        100_000 - 25_000 - totals.routing_fee_msat,
        "debited once"
    );
}
