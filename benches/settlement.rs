//! Settlement benchmarks against a real LNbits (FakeWallet): from the customer's payment to the
//! `processing` feedback, with LNbits websocket hints confirmed by lookup; and invoices created
//! per second. Prints figures; `make bench` runs it (`DVMD_LNBITS` from `.ci/lnbits.sh`).

#[path = "../tests/integration/lnbits.rs"]
mod lnbits;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dvmd::config::{Config, FileConfig, Overrides, RelaysFile};
use dvmd::customer::{self, Customer, Reply};
use dvmd::daemon::{Daemon, Parts};
use dvmd::infer::instant::InstantBackend;
use dvmd::nip90::JobStatus;
use dvmd::wallet::lnbits::{LnbitsConfig, LnbitsWallet};
use dvmd::wallet::secret::Secret;
use dvmd::wallet::{InvoiceDescription, InvoiceRequest, Wallet};
use lnbits::Lnbits;

const JOBS: usize = 100;
const INVOICES: usize = 300;
const TIMEOUT: Duration = Duration::from_secs(30);

fn report(label: &str, samples: &mut [Duration]) {
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3;
    println!(
        "  {label:<34}: p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary too, with test
    // arguments, and must not start a benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        println!("settlement: a benchmark; run it with `cargo bench --bench settlement`");
        return;
    }
    let lnbits = Lnbits::start().await;
    let service = lnbits.create_wallet("dvmd").await;
    let customer = lnbits.create_wallet("customer").await;
    lnbits.fund(&customer, 10_000_000).await;

    // Invoices per second, sequential and 8 at a time.
    let wallet = Arc::new(
        LnbitsWallet::new(LnbitsConfig {
            url: lnbits.url.clone(),
            invoice_key: Secret::new(service.inkey.clone(), "bench"),
            admin_key: None,
            webhook_url: None,
            websocket: false,
        })
        .expect("wallet"),
    );
    let request = || InvoiceRequest {
        amount_msat: 21_000,
        description: InvoiceDescription::Memo("bench".into()),
        expiry_secs: 600,
    };
    let started = Instant::now();
    for _ in 0..INVOICES {
        wallet.create_invoice(request()).await.expect("invoice");
    }
    let sequential = INVOICES as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let wallet = wallet.clone();
        set.spawn(async move {
            for _ in (worker..INVOICES).step_by(8) {
                wallet.create_invoice(request()).await.expect("invoice");
            }
        });
    }
    while set.join_next().await.is_some() {}
    let concurrent = INVOICES as f64 / started.elapsed().as_secs_f64();
    println!("bench settlement: LNbits 1.6.2 FakeWallet on loopback");
    println!("  invoices created                  : {sequential:.0}/s sequential, {concurrent:.0}/s with 8 in flight");

    // Payment -> processing, with LNbits websocket hints.
    let data = tempfile::tempdir().expect("tempdir");
    let key = data.path().join("inkey");
    std::fs::write(&key, &service.inkey).expect("key");
    let mut file = FileConfig::default();
    file.wallet.backend = "lnbits".into();
    file.wallet.reconcile_interval_secs = 3600;
    file.wallet.lnbits.url = lnbits.url.clone();
    file.wallet.lnbits.invoice_key_env = None;
    file.wallet.lnbits.invoice_key_file = Some(key);
    let config = Config::build(
        file,
        RelaysFile::default(),
        Overrides {
            dev: true,
            data_dir: Some(data.path().to_owned()),
            relay_listen: Some("127.0.0.1:0".into()),
            http_listen: Some("127.0.0.1:0".into()),
            model_path: None,
        },
    )
    .expect("config");
    let backend = Arc::new(InstantBackend::new("bench"));
    let daemon = Daemon::start(
        config,
        Parts {
            backend: Some(backend),
            ..Parts::default()
        },
    )
    .await
    .expect("daemon");
    let mut alice = Customer::connect(&daemon.ready().relay_url)
        .await
        .expect("connect");
    let service_key = daemon.ready().pubkey;
    let (mut to_processing, mut pay_call) = (Vec::new(), Vec::new());
    for i in 0..JOBS {
        let request = alice
            .post(customer::text_request(
                &format!("job {i}"),
                &[("max_tokens", "4")],
                None,
                Some(service_key),
            ))
            .await
            .expect("post");
        let bolt11 = match alice
            .wait_for(&request.id, TIMEOUT, |r| {
                matches!(
                    r,
                    Reply::Feedback {
                        status: Some(JobStatus::PaymentRequired),
                        ..
                    }
                )
            })
            .await
            .expect("payment-required")
        {
            Reply::Feedback {
                amount: Some(a), ..
            } => a.bolt11.expect("bolt11"),
            other => panic!("{other:?}"),
        };
        let t0 = Instant::now();
        lnbits.pay(&customer, &bolt11).await;
        let t1 = Instant::now();
        alice
            .wait_for(&request.id, TIMEOUT, |r| {
                matches!(
                    r,
                    Reply::Feedback {
                        status: Some(JobStatus::Processing),
                        ..
                    }
                )
            })
            .await
            .expect("processing");
        to_processing.push(t0.elapsed());
        pay_call.push(t1 - t0);
        alice
            .wait_for(&request.id, TIMEOUT, |r| matches!(r, Reply::Result(_)))
            .await
            .expect("result");
    }
    report("customer pay call (LNbits)", &mut pay_call);
    report("pay call start -> processing", &mut to_processing);
    println!("  (nostrdvm polls its wallet once a second: ~500 ms on average, 1000 ms worst)");
    alice.shutdown().await;
    daemon.stop().await;
}
