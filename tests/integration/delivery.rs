//! Results the relays will not take: a relay that answers `OK false` (here the embedded relay's
//! 64 KiB event limit, strfry's default) is given up after `result_refusals` tries, the job fails
//! and the payment is credited, and the next job is not held up.

use std::sync::Arc;

use dvmd::customer::{self, Customer, Reply};
use dvmd::infer::instant::InstantBackend;
use dvmd::job::JobState;
use dvmd::nip90::JobStatus;
use nostr_sdk::{EventBuilder, Kind, Tag};

use crate::harness::{self, REPLY_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_every_relay_refuses_fails_the_job_and_credits_the_payment() {
    let data = harness::data_dir();
    let config = harness::dev_config(data.path(), |file| {
        // Let the quote through, so the relay's own limit is what refuses the result.
        file.service.max_result_bytes = 512 * 1024;
    });
    let backend = Arc::new(InstantBackend::new("a fine answer"));
    let daemon = harness::start(config, Some(backend)).await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let me = alice.keys().public_key();

    // A 61.5 kB request fits the relay; its result embeds it and echoes the 6 kB prompt: 68 kB.
    let big = EventBuilder::new(Kind::from(5050), "x".repeat(55_000)).tags([
        Tag::parse(["i", &"word ".repeat(1_200), "text"]).expect("tag"),
        Tag::parse(["param", "max_tokens", "16"]).expect("tag"),
        Tag::public_key(ready.pubkey),
    ]);
    let big = alice.post(big).await.expect("post");
    let (paid, bolt11) = harness::invoice(&mut alice, &big.id).await;
    harness::dev_pay(&ready.http_url, &bolt11).await;
    let info = match alice
        .wait_for(&big.id, REPLY_TIMEOUT, |r| {
            matches!(
                r,
                Reply::Result(_)
                    | Reply::Feedback {
                        status: Some(JobStatus::Error),
                        ..
                    }
            )
        })
        .await
        .expect("an answer")
    {
        Reply::Feedback { info, .. } => info,
        other => panic!("expected an error, got {other:?}"),
    };
    assert!(
        info.contains("the relays refused to store the result")
            && info.contains(&format!("the {paid} msat you paid are credited")),
        "{info}"
    );
    let failed =
        harness::wait_for_state(daemon.pipeline().book(), &big.id, JobState::Settled).await;
    assert_eq!(failed.charge_msat, Some(0));

    // The next job runs as usual: the refused one holds up nothing.
    let normal = alice
        .post(customer::text_request(
            "Say hi.",
            &[("max_tokens", "8"), ("pay_from_credit", "false")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    let (paid2, bolt11) = harness::invoice(&mut alice, &normal.id).await;
    harness::dev_pay(&ready.http_url, &bolt11).await;
    let result = harness::result(&mut alice, &normal.id).await;
    assert_eq!(result.content, "a fine answer");
    let normal =
        harness::wait_for_state(daemon.pipeline().book(), &normal.id, JobState::Settled).await;

    alice.shutdown().await;
    daemon.stop().await;
    let store = harness::open_store(data.path());
    let totals = harness::ledger_ok(&store);
    assert_eq!(totals.payment_in_msat, paid + paid2);
    assert_eq!(totals.held_msat, 0);
    assert_eq!(
        harness::balance(&store, &me),
        paid + paid2 - normal.charge_msat.expect("charged"),
        "the refused job's payment is credited in full"
    );
}
