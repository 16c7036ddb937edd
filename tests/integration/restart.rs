//! Kill -9 the daemon binary at the worst moments; every job completes exactly once.

use std::collections::HashSet;
use std::time::Duration;

use dvmd::customer::{self, Customer, Reply};
use dvmd::job::JobState;
use dvmd::nip90::JobStatus;
use nostr_sdk::{Event, EventId, Keys, PublicKey};

use crate::harness::{self, DaemonProcess, REPLY_TIMEOUT};

/// Collect the distinct result event ids seen for `job`: wait up to `first` for one, then
/// until `quiet` passes without another.
async fn result_ids(
    customer: &mut Customer,
    job: &EventId,
    first: Duration,
    quiet: Duration,
) -> HashSet<EventId> {
    let mut ids = HashSet::new();
    let mut wait = first;
    while let Ok(reply) = customer
        .wait_for(job, wait, |r| matches!(r, Reply::Result(_)))
        .await
    {
        wait = quiet;
        if let Reply::Result(event) = reply {
            ids.insert(event.id);
        }
    }
    ids
}

fn service(daemon: &DaemonProcess) -> PublicKey {
    PublicKey::from_hex(&daemon.pubkey).expect("pubkey")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_awaiting_payment_then_paid_after_restart() {
    let data = harness::data_dir();
    let (relay_port, http_port) = (harness::free_port(), harness::free_port());
    let keys = Keys::generate();

    let first = DaemonProcess::spawn(data.path(), relay_port, http_port, "");
    let mut alice = Customer::connect_with(&first.relay_url, keys.clone())
        .await
        .expect("connect");
    let request: Event = alice
        .post(customer::text_request(
            "Say hello.",
            &[("max_tokens", "16")],
            None,
            Some(service(&first)),
        ))
        .await
        .expect("post");
    let (quote, bolt11) = harness::invoice(&mut alice, &request.id).await;
    first.kill();
    alice.shutdown().await;

    // The embedded relay died with the daemon; the job lives on in the store.
    let second = DaemonProcess::spawn(data.path(), relay_port, http_port, "");
    let mut alice = Customer::connect_with(&second.relay_url, keys.clone())
        .await
        .expect("reconnect");
    harness::dev_pay(&second.http_url, &bolt11).await;
    let results = result_ids(
        &mut alice,
        &request.id,
        REPLY_TIMEOUT,
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(results.len(), 1, "exactly one result after the restart");
    second.terminate();
    alice.shutdown().await;

    {
        let store = harness::open_store(data.path());
        let jobs = harness::jobs(&store);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].state, JobState::Settled);
        assert_eq!(jobs[0].paid_msat, quote);
        let totals = harness::ledger_ok(&store);
        assert_eq!(totals.payment_in_msat, quote, "paid once");
    }

    // A delivered job is never rerun: a third start leaves it alone, and a duplicate of the
    // request gets the stored result again (the same event).
    let third = DaemonProcess::spawn(data.path(), relay_port, http_port, "");
    let mut alice = Customer::connect_with(&third.relay_url, keys)
        .await
        .expect("reconnect");
    alice.send(&request).await.expect("resend");
    let replayed = result_ids(
        &mut alice,
        &request.id,
        Duration::from_secs(10),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(
        replayed, results,
        "the duplicate gets the stored result, not a new run"
    );
    third.terminate();
    alice.shutdown().await;
    let store = harness::open_store(data.path());
    assert_eq!(harness::ledger_ok(&store).payment_in_msat, quote);
    assert_eq!(harness::jobs(&store)[0].state, JobState::Settled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_payment_runs_the_job_exactly_once() {
    let data = harness::data_dir();
    let (relay_port, http_port) = (harness::free_port(), harness::free_port());
    let keys = Keys::generate();

    let first = DaemonProcess::spawn(data.path(), relay_port, http_port, "");
    let mut alice = Customer::connect_with(&first.relay_url, keys.clone())
        .await
        .expect("connect");
    let request = alice
        .post(customer::text_request(
            "Count from one to two hundred in words, separated by commas.",
            &[("max_tokens", "300"), ("temperature", "0")],
            None,
            Some(service(&first)),
        ))
        .await
        .expect("post");
    let (quote, bolt11) = harness::invoice(&mut alice, &request.id).await;
    harness::dev_pay(&first.http_url, &bolt11).await;
    // The payment is booked (Paid) before /dev/pay's hint is acted on; kill while the job is
    // Paid or Running, as soon as it says it started.
    let _ = alice
        .wait_for(&request.id, Duration::from_secs(5), |r| {
            matches!(
                r,
                Reply::Feedback {
                    status: Some(JobStatus::Processing),
                    ..
                }
            )
        })
        .await;
    first.kill();
    let mut seen = result_ids(
        &mut alice,
        &request.id,
        Duration::from_millis(200),
        Duration::from_millis(200),
    )
    .await;
    alice.shutdown().await;

    let second = DaemonProcess::spawn(data.path(), relay_port, http_port, "");
    let mut alice = Customer::connect_with(&second.relay_url, keys)
        .await
        .expect("reconnect");
    seen.extend(
        result_ids(
            &mut alice,
            &request.id,
            REPLY_TIMEOUT,
            Duration::from_secs(1),
        )
        .await,
    );
    assert_eq!(
        seen.len(),
        1,
        "one result across the crash, never two runs: {seen:?}"
    );
    second.terminate();
    alice.shutdown().await;

    let store = harness::open_store(data.path());
    let jobs = harness::jobs(&store);
    assert_eq!(jobs[0].state, JobState::Settled);
    let totals = harness::ledger_ok(&store);
    assert_eq!(totals.payment_in_msat, quote, "paid once");
    assert_eq!(totals.charge_msat + totals.balances_msat, quote);
}
