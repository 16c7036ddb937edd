//! A full paid job on embedded defaults: relay, dev wallet and the real model.

use dvmd::customer::{self, Customer, Reply};
use dvmd::job::JobState;
use dvmd::nip90::JobStatus;
use nostr_sdk::{Event, JsonUtil};

use crate::harness::{self, REPLY_TIMEOUT};

fn tag<'a>(event: &'a Event, name: &str) -> Option<&'a [String]> {
    event
        .tags
        .iter()
        .map(|t| t.as_slice())
        .find(|t| t.first().is_some_and(|n| n == name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_job_runs_the_real_model_and_charges_exact_usage() {
    let data = harness::data_dir();
    let daemon = harness::start(harness::dev_config(data.path(), |_| {}), None).await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");

    let request = alice
        .post(customer::text_request(
            "Name one planet of the solar system.",
            &[("max_tokens", "24"), ("temperature", "0"), ("seed", "1")],
            Some(10_000_000),
            Some(ready.pubkey),
        ))
        .await
        .expect("post");

    let reply = alice
        .wait_for(&request.id, REPLY_TIMEOUT, |r| {
            matches!(r, Reply::Feedback { .. })
        })
        .await
        .expect("feedback");
    let Reply::Feedback {
        status,
        amount,
        event,
        ..
    } = reply
    else {
        unreachable!()
    };
    assert_eq!(
        status,
        Some(JobStatus::PaymentRequired),
        "{:?}",
        event.as_json()
    );
    assert_eq!(event.pubkey, ready.pubkey);
    let amount = amount.expect("amount tag");
    let bolt11 = amount.bolt11.clone().expect("invoice in amount tag");
    assert!(
        bolt11.starts_with("lnbcrt"),
        "dev invoices use the regtest prefix: {bolt11}"
    );
    let quote = amount.msat;

    harness::dev_pay(&ready.http_url, &bolt11).await;

    let result = harness::result(&mut alice, &request.id).await;
    assert_eq!(result.kind.as_u16(), 6050);
    assert_eq!(result.pubkey, ready.pubkey);
    result.verify().expect("result is signed by the service");
    assert!(
        !result.content.trim().is_empty(),
        "the model said something"
    );
    let embedded = tag(&result, "request").expect("request tag")[1].clone();
    assert_eq!(Event::from_json(embedded).expect("request json"), request);
    assert_eq!(tag(&result, "e").expect("e tag")[1], request.id.to_hex());
    assert_eq!(
        tag(&result, "p").expect("p tag")[1],
        alice.keys().public_key().to_hex()
    );
    assert_eq!(
        tag(&result, "i").expect("i tag")[1],
        "Name one planet of the solar system."
    );
    let charged: u64 = tag(&result, "charged").expect("charged tag")[1]
        .parse()
        .expect("msat");
    assert!(
        charged > 0 && charged <= quote,
        "charged {charged} of quote {quote}"
    );

    let success = alice
        .wait_for(&request.id, REPLY_TIMEOUT, |r| {
            matches!(
                r,
                Reply::Feedback {
                    status: Some(JobStatus::Success),
                    ..
                }
            )
        })
        .await;
    assert!(success.is_ok(), "success feedback after the result");

    // The book agrees with what the customer saw, and the ledger balances.
    let job = daemon
        .pipeline()
        .book()
        .get(&request.id.into())
        .await
        .expect("read")
        .expect("job");
    let usage = job.usage.expect("usage recorded");
    assert!(usage.completion_tokens >= 1 && usage.completion_tokens <= 24);
    assert_eq!(job.paid_msat, quote);
    assert_eq!(job.charge_msat, Some(charged));
    harness::wait_for_state(daemon.pipeline().book(), &request.id, JobState::Settled).await;
    alice.shutdown().await;
    daemon.stop().await;

    let store = harness::open_store(data.path());
    let totals = harness::ledger_ok(&store);
    assert_eq!(totals.payment_in_msat, quote);
    assert_eq!(totals.charge_msat, charged);
    assert_eq!(
        totals.balances_msat,
        quote - charged,
        "the unused part stays with the customer"
    );
}
