//! A store writer that fails is loud: the write that hit it and every later one return an
//! error, nothing is paid or shown on the strength of a write that was not made durable,
//! `/healthz` answers 503 with the reason, and the daemon stops with an error (`dvmd run` exits
//! non-zero). The fault is injected at our writer; everything else is real.

use std::sync::Arc;
use std::time::Duration;

use dvmd::customer::{self, Customer};
use dvmd::daemon::DaemonError;
use dvmd::infer::instant::InstantBackend;
use dvmd::store::StoreError;

use crate::harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_store_writer_fails_writes_reports_503_and_stops_the_daemon() {
    let data = harness::data_dir();
    let backend = Arc::new(InstantBackend::new("hello"));
    let daemon = harness::start(harness::dev_config(data.path(), |_| {}), Some(backend)).await;
    let ready = daemon.ready().clone();
    let http = reqwest::Client::new();
    let health = http
        .get(format!("{}/healthz", ready.http_url))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);

    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let request = alice
        .post(customer::text_request(
            "Say hello.",
            &[("max_tokens", "8")],
            Some(1_000_000),
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    let (_, bolt11) = harness::invoice(&mut alice, &request.id).await;

    let store = daemon.pipeline().book().store().clone();
    store.inject_fault("disk full (injected)");
    let synced = tokio::time::timeout(Duration::from_secs(30), store.sync())
        .await
        .expect("a write after the fault answers, never hangs");
    assert!(
        matches!(&synced, Err(StoreError::WriterFailed(why)) if why.contains("disk full")),
        "{synced:?}"
    );

    // Paying now cannot be recorded, so it is refused: nothing is taken that is not booked.
    let paid = http
        .post(format!("{}/dev/pay", ready.http_url))
        .json(&serde_json::json!({ "bolt11": bolt11 }))
        .send()
        .await
        .expect("dev pay answers");
    assert_eq!(paid.status(), 503, "{:?}", paid.text().await);

    let health = http
        .get(format!("{}/healthz", ready.http_url))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 503);
    let body: serde_json::Value = health.json().await.expect("json");
    assert_eq!(body["status"], "store_failed");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("disk full")),
        "{body}"
    );

    alice.shutdown().await;
    // The daemon notices by itself and stops with the error `dvmd run` exits non-zero on.
    let stopped = tokio::time::timeout(
        Duration::from_secs(60),
        daemon.run_until(std::future::pending()),
    )
    .await
    .expect("the daemon stops on its own");
    assert!(
        matches!(&stopped, Err(DaemonError::StoreFailed(why)) if why.contains("disk full")),
        "{stopped:?}"
    );
}
