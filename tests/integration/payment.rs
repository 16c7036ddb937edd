//! Payments: a hint is not a payment, and a job that fails after payment owes the customer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dvmd::customer::{self, Customer, Reply};
use dvmd::daemon::{Daemon, Parts};
use dvmd::infer::instant::InstantBackend;
use dvmd::infer::{Backend, GenerateRequest, GenerateStream, InferError};
use dvmd::job::JobState;
use dvmd::nip90::JobStatus;
use dvmd::wallet::{
    Invoice, InvoiceRequest, PaymentHash, PaymentSent, PaymentStatus, Wallet, WalletError,
};

use crate::harness::{self, REPLY_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_hints_without_payment_move_nothing() {
    let data = harness::data_dir();
    let backend = Arc::new(InstantBackend::new("never sent"));
    let daemon = harness::start(harness::dev_config(data.path(), |_| {}), Some(backend)).await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let request = alice
        .post(customer::text_request(
            "Hello",
            &[("max_tokens", "4")],
            None,
            None,
        ))
        .await
        .expect("post");
    let (_, bolt11) = harness::invoice(&mut alice, &request.id).await;
    let job = daemon
        .pipeline()
        .book()
        .get(&request.id.into())
        .await
        .expect("read")
        .expect("job");
    let hash = job.invoice.expect("invoice").payment_hash;

    // Hints for the unpaid invoice and for a hash we never issued, as a forged webhook or
    // websocket push would deliver them: the wallet says "not paid", so nothing moves.
    daemon.pipeline().check_payment(&hash).await;
    daemon
        .pipeline()
        .check_payment(&PaymentHash([0xab; 32]))
        .await;
    daemon.pipeline().reconcile_once().await;
    let job = daemon
        .pipeline()
        .book()
        .get(&request.id.into())
        .await
        .expect("read")
        .expect("job");
    assert_eq!(job.state, JobState::AwaitingPayment);
    assert!(alice
        .wait_for(&request.id, Duration::from_millis(300), |r| matches!(
            r,
            Reply::Result(_)
        ))
        .await
        .is_err());

    // Paying it once works; paying it again is refused by the wallet and books nothing.
    harness::dev_pay(&ready.http_url, &bolt11).await;
    // The answers come in order: `processing` before the result, even from an instant backend.
    match alice
        .next_reply(&request.id, REPLY_TIMEOUT)
        .await
        .expect("reply")
    {
        Reply::Feedback {
            status: Some(JobStatus::Processing),
            ..
        } => {}
        other => panic!("expected processing first, got {other:?}"),
    }
    harness::result(&mut alice, &request.id).await;
    let again = reqwest::Client::new()
        .post(format!("{}/dev/pay", ready.http_url))
        .json(&serde_json::json!({ "bolt11": bolt11 }))
        .send()
        .await
        .expect("POST");
    assert_eq!(again.status(), 422, "an invoice is paid once");
    daemon.pipeline().check_payment(&hash).await;
    alice.shutdown().await;
    daemon.stop().await;
    let totals = harness::ledger_ok(&harness::open_store(data.path()));
    assert_eq!(totals.payment_in_msat, job.quote_msat.expect("quote"));
}

/// A backend that fails every generation: the fault injected next to the real backends.
struct BrokenBackend;

#[async_trait::async_trait]
impl Backend for BrokenBackend {
    fn name(&self) -> &str {
        "broken"
    }
    async fn count_prompt_tokens(&self, _: &GenerateRequest) -> Result<Option<u32>, InferError> {
        Ok(Some(10))
    }
    async fn generate(&self, _: GenerateRequest, _: u32) -> Result<GenerateStream, InferError> {
        Err(InferError::Backend("GPU on fire".into()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_after_payment_is_reported_and_credited() {
    let data = harness::data_dir();
    let daemon = harness::start(
        harness::dev_config(data.path(), |_| {}),
        Some(Arc::new(BrokenBackend)),
    )
    .await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let request = alice
        .post(customer::text_request(
            "Hello",
            &[("max_tokens", "4")],
            None,
            None,
        ))
        .await
        .expect("post");
    let (quote, bolt11) = harness::invoice(&mut alice, &request.id).await;
    harness::dev_pay(&ready.http_url, &bolt11).await;
    let info = match alice
        .wait_for(&request.id, REPLY_TIMEOUT, |r| {
            matches!(
                r,
                Reply::Feedback {
                    status: Some(JobStatus::Error),
                    ..
                } | Reply::Result(_)
            )
        })
        .await
        .expect("error feedback")
    {
        Reply::Feedback { info, .. } => info,
        Reply::Result(_) => panic!("a broken backend cannot produce a result"),
    };
    // The backend's words go to the log, the customer gets a reference to them.
    assert!(info.starts_with("the model failed (ref "), "{info}");
    assert!(!info.contains("GPU on fire"), "{info}");
    assert!(
        info.contains(&format!("{quote} msat you paid are credited")),
        "{info}"
    );
    alice.shutdown().await;
    daemon.stop().await;

    let store = harness::open_store(data.path());
    let job = &harness::jobs(&store)[0];
    assert_eq!(job.state, JobState::Settled);
    assert_eq!(job.charge_msat, Some(0));
    let totals = harness::ledger_ok(&store);
    assert_eq!(
        totals.balances_msat, quote,
        "the customer is owed everything paid"
    );
    assert_eq!(harness::balance(&store, &request.pubkey), quote);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_cancels_before_paying_and_a_late_payment_is_credited() {
    let data = harness::data_dir();
    let backend = Arc::new(InstantBackend::new("Only the job nobody cancelled runs."));
    let daemon = harness::start(harness::dev_config(data.path(), |_| {}), Some(backend)).await;
    let ready = daemon.ready().clone();
    let book = daemon.pipeline().book().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let mut jobs = Vec::new();
    for prompt in ["first", "second"] {
        let request = alice
            .post(customer::text_request(
                prompt,
                &[("max_tokens", "4")],
                None,
                None,
            ))
            .await
            .expect("post");
        let (_, bolt11) = harness::invoice(&mut alice, &request.id).await;
        jobs.push((request, bolt11));
    }
    let (kept, kept_bolt11) = &jobs[0];
    let (cancelled, cancelled_bolt11) = &jobs[1];

    // Mallory's deletion of the first job is ignored. The embedded relay refuses to store a
    // deletion of someone else's event, but other relays pass them on, so it goes straight to
    // the pipeline, as intake would hand it over.
    let mallory = nostr_sdk::Keys::generate();
    assert!(alice
        .send(&harness::cancellation(kept, &mallory))
        .await
        .is_err());
    let forged =
        dvmd::nip90::Verified::check(harness::cancellation(kept, &mallory)).expect("signed");
    daemon.pipeline().apply_cancellation(&forged).await;
    assert_eq!(
        book.get(&kept.id.into())
            .await
            .expect("read")
            .expect("job")
            .state,
        JobState::AwaitingPayment,
        "only the customer can cancel a job"
    );
    // Alice's deletion of the second job, through the relay, cancels it.
    alice
        .send(&harness::cancellation(cancelled, alice.keys()))
        .await
        .expect("send");
    harness::wait_for_state(&book, &cancelled.id, JobState::Cancelled).await;
    let info = harness::error_info(&mut alice, &cancelled.id).await;
    assert!(info.contains("cancelled"), "{info}");

    // Paying the cancelled job's invoice anyway runs nothing and credits Alice.
    let hash = book
        .get(&cancelled.id.into())
        .await
        .expect("read")
        .expect("job")
        .invoice
        .expect("invoice")
        .payment_hash;
    harness::dev_pay(&ready.http_url, cancelled_bolt11).await;
    harness::wait_for_booking(&book, &hash).await;
    assert!(
        book.payment(&hash)
            .await
            .expect("read")
            .expect("record")
            .consumed
    );
    assert_eq!(
        book.get(&cancelled.id.into())
            .await
            .expect("read")
            .expect("job")
            .state,
        JobState::Cancelled
    );

    // The job Mallory tried to cancel runs when paid.
    harness::dev_pay(&ready.http_url, kept_bolt11).await;
    harness::result(&mut alice, &kept.id).await;
    harness::wait_for_state(&book, &kept.id, JobState::Settled).await;
    assert!(alice
        .wait_for(&cancelled.id, Duration::from_millis(300), |r| matches!(
            r,
            Reply::Result(_)
        ))
        .await
        .is_err());

    let cancelled_quote = book
        .get(&cancelled.id.into())
        .await
        .expect("read")
        .expect("job")
        .quote_msat
        .expect("quote");
    alice.shutdown().await;
    daemon.stop().await;
    drop(book);
    let store = harness::open_store(data.path());
    let totals = harness::ledger_ok(&store);
    let charged = totals.charge_msat;
    assert!(
        totals.balances_msat >= cancelled_quote,
        "the late payment is Alice's credit: {totals:?}"
    );
    assert_eq!(
        totals.balances_msat + charged,
        totals.payment_in_msat,
        "{totals:?}"
    );
}

/// The instant backend, but quoting takes a while (a slow tokenizer, a remote server): the
/// window in which a customer may cancel before any invoice exists.
struct SlowQuote(InstantBackend);

#[async_trait::async_trait]
impl Backend for SlowQuote {
    fn name(&self) -> &str {
        "slow-quote"
    }
    async fn count_prompt_tokens(
        &self,
        request: &GenerateRequest,
    ) -> Result<Option<u32>, InferError> {
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        self.0.count_prompt_tokens(request).await
    }
    async fn generate(
        &self,
        request: GenerateRequest,
        max_tokens: u32,
    ) -> Result<GenerateStream, InferError> {
        self.0.generate(request, max_tokens).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_while_being_quoted_never_shows_an_invoice() {
    let data = harness::data_dir();
    let backend = Arc::new(SlowQuote(InstantBackend::new("never")));
    let daemon = harness::start(harness::dev_config(data.path(), |_| {}), Some(backend)).await;
    let ready = daemon.ready().clone();
    let book = daemon.pipeline().book().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let request = alice
        .post(customer::text_request(
            "Hello",
            &[("max_tokens", "4")],
            None,
            None,
        ))
        .await
        .expect("post");
    harness::wait_for_state(&book, &request.id, JobState::Received).await;
    alice
        .send(&harness::cancellation(&request, alice.keys()))
        .await
        .expect("send");
    harness::wait_for_state(&book, &request.id, JobState::Cancelled).await;
    let info = harness::error_info(&mut alice, &request.id).await;
    assert!(info.contains("cancelled"), "{info}");
    // The quote finishes after the cancellation: no invoice is recorded or shown.
    assert!(alice
        .wait_for(&request.id, Duration::from_millis(2_500), |r| matches!(
            r,
            Reply::Feedback {
                status: Some(JobStatus::PaymentRequired),
                ..
            }
        ))
        .await
        .is_err());
    let job = book
        .get(&request.id.into())
        .await
        .expect("read")
        .expect("job");
    assert_eq!(job.state, JobState::Cancelled);
    assert!(job.invoice.is_none());
    alice.shutdown().await;
    daemon.stop().await;
}

/// A fault injected into the real dev wallet.
enum Fault {
    /// Its invoices say they expire within a second, and every lookup answers "unknown" while
    /// the flag is set: a wallet that lost track of an invoice it issued.
    Forgets(Arc<AtomicBool>),
    /// Every invoice after the first is the first one again: a wallet that reuses a payment
    /// hash, which the book refuses.
    Echoes(tokio::sync::Mutex<Option<Invoice>>),
}

/// The dev wallet with a [`Fault`].
struct FaultWallet {
    inner: Arc<dyn Wallet>,
    fault: Fault,
}

impl FaultWallet {
    /// `Parts` whose wallet is the configured one with the fault `make` builds.
    fn parts(make: impl Fn() -> Fault + Send + Sync + 'static) -> Parts {
        Parts {
            backend: Some(Arc::new(InstantBackend::new("never run"))),
            wrap_wallet: Some(Arc::new(move |inner| {
                Arc::new(FaultWallet {
                    inner,
                    fault: make(),
                }) as Arc<dyn Wallet>
            })),
        }
    }
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
        match &self.fault {
            Fault::Forgets(_) => {
                let mut invoice = self.inner.create_invoice(request).await?;
                invoice.expires_at = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock")
                    .as_secs()
                    + 1;
                Ok(invoice)
            }
            Fault::Echoes(first) => {
                let mut first = first.lock().await;
                if let Some(invoice) = first.as_ref() {
                    return Ok(invoice.clone());
                }
                let invoice = self.inner.create_invoice(request).await?;
                *first = Some(invoice.clone());
                Ok(invoice)
            }
        }
    }

    async fn lookup(&self, hash: &PaymentHash) -> Result<PaymentStatus, WalletError> {
        if let Fault::Forgets(forget) = &self.fault {
            if forget.load(Ordering::SeqCst) {
                return Ok(PaymentStatus::Unknown);
            }
        }
        self.inner.lookup(hash).await
    }

    async fn pay(&self, bolt11: &str, max_fee_msat: u64) -> Result<PaymentSent, WalletError> {
        self.inner.pay(bolt11, max_fee_msat).await
    }
    async fn lookup_payment(
        &self,
        hash: &PaymentHash,
    ) -> Result<dvmd::wallet::OutgoingStatus, WalletError> {
        self.inner.lookup_payment(hash).await
    }

    async fn balance(&self) -> Result<u64, WalletError> {
        self.inner.balance().await
    }

    fn settlements(&self) -> tokio::sync::broadcast::Receiver<PaymentHash> {
        self.inner.settlements()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invoice_the_wallet_forgot_expires_the_job_and_a_late_payment_is_credited() {
    let data = harness::data_dir();
    let config = harness::dev_config(data.path(), |file| {
        file.wallet.unpaid_grace_secs = 1;
    });
    let forget = Arc::new(AtomicBool::new(true));
    let wrap_forget = forget.clone();
    let daemon = Daemon::start(
        config,
        FaultWallet::parts(move || Fault::Forgets(wrap_forget.clone())),
    )
    .await
    .expect("daemon");
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let request = alice
        .post(customer::text_request(
            "Hello",
            &[("max_tokens", "4")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    let (quote, bolt11) = harness::invoice(&mut alice, &request.id).await;

    // The wallet calls it unknown past its expiry and the grace: the job ends, and says so.
    let info = harness::error_info(&mut alice, &request.id).await;
    assert!(info.contains("the invoice expired unpaid"), "{info}");
    let book = daemon.pipeline().book();
    let job = harness::wait_for_state(book, &request.id, JobState::Expired).await;
    let hash = job.invoice.expect("invoice").payment_hash;
    // Labelled `unpaid` on the request, with the payment hash, as nostr-tools reads it.
    let mut labels = Vec::new();
    for _ in 0..50 {
        labels =
            crate::trust::job_labels(&ready.relay_url, &ready.pubkey, &alice.keys().public_key());
        if !labels.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        labels,
        vec![(
            "unpaid".to_owned(),
            request.id.to_hex(),
            Some(hash.to_string())
        )]
    );
    // ... but the payment hash is still looked up.
    let record = book.payment(&hash).await.expect("read").expect("record");
    assert!(!record.consumed && !record.closed, "{record:?}");
    assert!(book
        .open_payments()
        .await
        .expect("open")
        .iter()
        .any(|(open, _)| *open == hash));

    // Paid late, once the wallet finds it again: credited to the customer, the job not run.
    forget.store(false, Ordering::SeqCst);
    harness::dev_pay(&ready.http_url, &bolt11).await;
    harness::wait_for_booking(book, &hash).await;
    assert_eq!(
        book.get(&request.id.into())
            .await
            .expect("read")
            .expect("job")
            .state,
        JobState::Expired
    );
    alice.shutdown().await;
    daemon.stop().await;
    let store = harness::open_store(data.path());
    let totals = harness::ledger_ok(&store);
    assert_eq!(
        totals.payment_in_msat, quote,
        "the late payment is booked once"
    );
    assert_eq!(harness::balance(&store, &request.pubkey), quote);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invoice_that_cannot_be_recorded_gives_the_reserved_credit_back() {
    let data = harness::data_dir();
    let daemon = Daemon::start(
        harness::dev_config(data.path(), |_| {}),
        FaultWallet::parts(|| Fault::Echoes(tokio::sync::Mutex::new(None))),
    )
    .await
    .expect("daemon");
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let me = alice.keys().public_key();
    // The wallet's one invoice: a top-up of 1 sat, paid, so alice has credit.
    let zap = harness::zap_request(alice.keys(), ready.pubkey, None, 1_000, &ready.relay_url);
    let (status, body) = harness::callback(&ready.http_url, 1_000, &zap).await;
    assert_eq!(status, 200, "{body}");
    harness::dev_pay(&ready.http_url, body["pr"].as_str().expect("pr")).await;
    let book = daemon.pipeline().book();
    for _ in 0..250 {
        let balance = book
            .store()
            .read(move |r| dvmd::ledger::balance(r, &me.into()))
            .await
            .expect("balance");
        if balance == 1_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A job the credit covers in part: 1 sat is reserved, and the invoice for the rest comes
    // back with the hash already used, which the book refuses.
    let request = alice
        .post(customer::text_request(
            "Hello",
            &[("max_tokens", "64")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    let info = harness::error_info(&mut alice, &request.id).await;
    assert!(
        info.contains("cannot issue an invoice right now (ref "),
        "{info}"
    );
    let job = harness::wait_for_state(book, &request.id, JobState::Rejected).await;
    assert_eq!((job.credit_msat, job.held_msat), (0, 0));
    alice.shutdown().await;
    daemon.stop().await;
    let store = harness::open_store(data.path());
    let totals = harness::ledger_ok(&store);
    assert_eq!(totals.held_msat, 0);
    assert_eq!(
        harness::balance(&store, &me),
        1_000,
        "the credit is spendable again"
    );
}

/// The real dev wallet with every lookup held 100 ms (the fault: a slow wallet), counting how
/// many are in flight at once.
struct SlowLookups {
    inner: std::sync::Arc<dyn dvmd::wallet::Wallet>,
    in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    most: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl dvmd::wallet::Wallet for SlowLookups {
    fn name(&self) -> &'static str {
        "slow-lookups"
    }
    fn unknown_means_unsent(&self) -> bool {
        self.inner.unknown_means_unsent()
    }
    async fn create_invoice(
        &self,
        request: dvmd::wallet::InvoiceRequest,
    ) -> Result<dvmd::wallet::Invoice, dvmd::wallet::WalletError> {
        self.inner.create_invoice(request).await
    }
    async fn lookup(
        &self,
        hash: &dvmd::wallet::PaymentHash,
    ) -> Result<dvmd::wallet::PaymentStatus, dvmd::wallet::WalletError> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.in_flight.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        self.in_flight.fetch_sub(1, SeqCst);
        self.inner.lookup(hash).await
    }
    async fn pay(
        &self,
        bolt11: &str,
        max_fee_msat: u64,
    ) -> Result<dvmd::wallet::PaymentSent, dvmd::wallet::WalletError> {
        self.inner.pay(bolt11, max_fee_msat).await
    }
    async fn lookup_payment(
        &self,
        hash: &dvmd::wallet::PaymentHash,
    ) -> Result<dvmd::wallet::OutgoingStatus, dvmd::wallet::WalletError> {
        self.inner.lookup_payment(hash).await
    }
    async fn balance(&self) -> Result<u64, dvmd::wallet::WalletError> {
        self.inner.balance().await
    }
    fn settlements(&self) -> tokio::sync::broadcast::Receiver<dvmd::wallet::PaymentHash> {
        self.inner.settlements()
    }
    async fn follow(&self, cancel: tokio_util::sync::CancellationToken) {
        self.inner.follow(cancel).await
    }
}

/// A reconcile pass over many open invoices keeps a few lookups in flight, never more than
/// its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_pass_looks_up_a_few_invoices_at_a_time() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    const OPEN: usize = 24;
    let data = harness::data_dir();
    let in_flight = std::sync::Arc::new(AtomicUsize::new(0));
    let most = std::sync::Arc::new(AtomicUsize::new(0));
    let (counted, seen) = (in_flight.clone(), most.clone());
    let config = harness::dev_config(data.path(), |file| {
        // Only the passes this test runs.
        file.wallet.reconcile_interval_secs = 3600;
    });
    let daemon = dvmd::daemon::Daemon::start(
        config,
        dvmd::daemon::Parts {
            backend: Some(std::sync::Arc::new(
                dvmd::infer::instant::InstantBackend::new("unused"),
            )),
            wrap_wallet: Some(std::sync::Arc::new(move |inner| {
                std::sync::Arc::new(SlowLookups {
                    inner,
                    in_flight: counted.clone(),
                    most: seen.clone(),
                }) as std::sync::Arc<dyn dvmd::wallet::Wallet>
            })),
        },
    )
    .await
    .expect("daemon starts");
    let ready = daemon.ready().clone();
    // Two customers, twelve unpaid invoices each (under the per-npub cap).
    for _ in 0..2 {
        let mut customer = Customer::connect(&ready.relay_url).await.expect("connect");
        for i in 0..OPEN / 2 {
            let request = customer
                .post(customer::text_request(
                    &format!("ask {i}"),
                    &[("max_tokens", "4")],
                    None,
                    None,
                ))
                .await
                .expect("post");
            harness::invoice(&mut customer, &request.id).await;
        }
        customer.shutdown().await;
    }
    // Let the start-up pass finish before measuring.
    while in_flight.load(SeqCst) > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    most.store(0, SeqCst);
    daemon.pipeline().reconcile_once().await;
    let bound = dvmd::job::payment::RECONCILE_LOOKUPS_IN_FLIGHT;
    let most = most.load(SeqCst);
    // More than one at a time (one by one, a pass over many invoices waits on each in turn),
    // never more than the bound.
    assert!(
        (2..=bound).contains(&most),
        "{most} lookups in flight at most, bound {bound}"
    );
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}
