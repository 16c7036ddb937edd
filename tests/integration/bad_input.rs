//! Requests that must be refused with a reason, or ignored, and never take money.

use std::sync::Arc;

use dvmd::customer::{self, Customer, Reply};
use dvmd::infer::instant::InstantBackend;
use dvmd::job::JobState;
use dvmd::nip90::JobStatus;
use nostr_sdk::{EventBuilder, Keys, Kind, Tag};

use crate::harness::{self, REPLY_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bid_below_the_least_a_job_can_cost_is_refused_and_a_lower_bid_is_asked_for() {
    let data = harness::data_dir();
    let daemon = harness::start(harness::dev_config(data.path(), |_| {}), None).await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");

    let request = alice
        .post(customer::text_request(
            "Hello",
            &[("max_tokens", "100")],
            Some(1),
            None,
        ))
        .await
        .expect("post");
    let info = harness::error_info(&mut alice, &request.id).await;
    // The base fee of 1000, the prompt and one completion token at 10 msat.
    assert!(
        info.contains("bid 1 msat is below the least this job can cost"),
        "{info}"
    );
    let floor: u64 = info
        .split("can cost, ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .expect("the least cost is named");
    assert!((1_010..1_200).contains(&floor), "{info}");

    // A bid over that but under the p90 (with no history, the cap: over 2000) is taken, and
    // the invoice asks for the bid: the job will stop where it runs out.
    let low = alice
        .post(customer::text_request(
            "Hello",
            &[("max_tokens", "100")],
            Some(1_500),
            None,
        ))
        .await
        .expect("post");
    let (asked, _) = harness::invoice(&mut alice, &low.id).await;
    assert_eq!(asked, 1_500);

    let job = daemon
        .pipeline()
        .book()
        .get(&request.id.into())
        .await
        .expect("read")
        .expect("job");
    assert_eq!(job.state, JobState::Rejected);
    assert!(job.invoice.is_none(), "no invoice for a refused job");
    alice.shutdown().await;
    daemon.stop().await;
    let totals = harness::ledger_ok(&harness::open_store(data.path()));
    assert_eq!(totals.payment_in_msat, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_foreign_requests() {
    let data = harness::data_dir();
    let config = harness::dev_config(data.path(), |file| {
        file.service.max_request_bytes = 16_384;
        file.service.max_result_bytes = 24_576;
    });
    let backend = Arc::new(InstantBackend::new("unused"));
    let daemon = harness::start(config, Some(backend)).await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let text_job = |tags: Vec<Vec<String>>| {
        EventBuilder::new(Kind::from(5050), "")
            .tags(tags.into_iter().map(|t| Tag::parse(t).expect("tag")))
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    let cases: Vec<(Vec<Vec<String>>, &str)> = vec![
        (
            vec![s(&["i", "https://example.com/a.txt", "url"])],
            "input type `url` is not supported",
        ),
        (
            vec![
                s(&["i", "hi", "text"]),
                s(&["param", "max_tokens", "1000000000"]),
            ],
            "outside 1..=1024",
        ),
        (
            vec![s(&["i", "hi", "text"]), s(&["bid", "a lot"])],
            "malformed `bid` tag",
        ),
        (vec![s(&["i", "hi"])], "no input type"),
        (vec![s(&["param", "max_tokens", "5"])], "no `i` input"),
        // Refused before any invoice: what could not be delivered after payment.
        (
            vec![s(&["i", "hi", "text"]), s(&["param", "model", "gpt-4"])],
            "model `gpt-4` is not served here",
        ),
        (
            // 1,500 prompt tokens (the instant backend counts 4 bytes each) + 1,000 > 2,048.
            vec![
                s(&["i", &"word ".repeat(1_200), "text"]),
                s(&["param", "max_tokens", "1000"]),
            ],
            "exceed the model's context window of 2048 tokens",
        ),
        (
            // The embedded request and the echoed input (12 kB each): above 24,576 bytes.
            vec![
                s(&["i", &"word ".repeat(2_400), "text"]),
                s(&["param", "max_tokens", "100"]),
            ],
            "above the 24576 bytes relays accept",
        ),
        (
            vec![
                s(&["i", "hi", "text"]),
                s(&["param", "pay_from_credit", "maybe"]),
            ],
            "param `pay_from_credit`",
        ),
        (
            vec![s(&["i", "hi", "text"]), s(&["encrypted"])],
            "encrypted requests are not supported",
        ),
    ];
    for (tags, why) in cases {
        let request = alice.post(text_job(tags)).await.expect("post");
        let info = harness::error_info(&mut alice, &request.id).await;
        assert!(info.contains(why), "expected `{why}` in `{info}`");
        let job = daemon
            .pipeline()
            .book()
            .get(&request.id.into())
            .await
            .expect("read")
            .expect("job");
        assert_eq!(job.state, JobState::Rejected);
        assert!(job.invoice.is_none());
    }

    // A request above max_request_bytes is answered but never stored: big events cannot fill
    // the disk.
    let big = alice
        .post(text_job(vec![s(&["i", &"x".repeat(17_000), "text"])]))
        .await
        .expect("post");
    let info = harness::error_info(&mut alice, &big.id).await;
    assert!(info.contains("at most 16384"), "{info}");
    assert!(daemon
        .pipeline()
        .book()
        .get(&big.id.into())
        .await
        .expect("read")
        .is_none());

    // A request for another service is not ours: no job, no feedback. Post it, then a valid
    // request; intake handles events in order, so once the second is answered the first was
    // seen and ignored.
    let other = Keys::generate().public_key();
    let foreign = alice
        .post(customer::text_request(
            "not for you",
            &[],
            None,
            Some(other),
        ))
        .await
        .expect("post");
    let ours = alice
        .post(customer::text_request(
            "for you",
            &[("max_tokens", "4")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    let reply = alice
        .wait_for(&ours.id, REPLY_TIMEOUT, |r| {
            matches!(r, Reply::Feedback { .. })
        })
        .await
        .expect("feedback");
    assert!(matches!(
        reply,
        Reply::Feedback {
            status: Some(JobStatus::PaymentRequired),
            ..
        }
    ));
    assert!(daemon
        .pipeline()
        .book()
        .get(&foreign.id.into())
        .await
        .expect("read")
        .is_none());
    assert!(
        alice
            .next_reply(&foreign.id, std::time::Duration::from_millis(200))
            .await
            .is_err(),
        "no reply to a request for another service"
    );

    // Requests older than max_request_age_secs are ignored the same way (relays replay old
    // events on every subscription; NIP-40 expiry is covered by the unit tests, since relays
    // and the sdk already drop expired events before intake sees them).
    let stale = alice
        .post(
            customer::text_request("stale", &[("max_tokens", "4")], None, None).custom_created_at(
                nostr_sdk::Timestamp::from_secs(nostr_sdk::Timestamp::now().as_secs() - 3_600),
            ),
        )
        .await
        .expect("post");
    let marker = alice
        .post(customer::text_request(
            "marker",
            &[("max_tokens", "4")],
            None,
            None,
        ))
        .await
        .expect("post");
    alice
        .wait_for(&marker.id, REPLY_TIMEOUT, |r| {
            matches!(r, Reply::Feedback { .. })
        })
        .await
        .expect("feedback");
    assert!(daemon
        .pipeline()
        .book()
        .get(&stale.id.into())
        .await
        .expect("read")
        .is_none());

    alice.shutdown().await;
    daemon.stop().await;
    let totals = harness::ledger_ok(&harness::open_store(data.path()));
    assert_eq!(totals.payment_in_msat, 0, "no money taken for refused jobs");
}

/// One key posting far over its request bucket: what is over is dropped before anything is
/// stored, quoted or invoiced (no wallet call, no disk write, no reply), and another customer
/// is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_key_is_dropped_before_it_costs_anything() {
    const LIMIT: usize = 20;
    const FLOOD: usize = 120;
    let data = harness::data_dir();
    let backend = Arc::new(InstantBackend::new("still serving"));
    let config = harness::dev_config(data.path(), |file| {
        file.service.requests_per_npub_per_minute = LIMIT as u32;
    });
    let daemon = harness::start(config, Some(backend)).await;
    let ready = daemon.ready().clone();
    let flooder = Customer::connect(&ready.relay_url).await.expect("connect");
    let mut flooder_key = None;
    let started = std::time::Instant::now();
    for i in 0..FLOOD {
        let posted = flooder
            .post(customer::text_request(
                &format!("flood {i}"),
                &[("max_tokens", "4")],
                None,
                None,
            ))
            .await
            .expect("post");
        flooder_key = Some(posted.pubkey);
    }
    // Someone else, right after: quoted and served.
    let mut bob = Customer::connect(&ready.relay_url).await.expect("connect");
    let request = bob
        .post(customer::text_request(
            "Hello",
            &[("max_tokens", "4")],
            None,
            None,
        ))
        .await
        .expect("post");
    let (_, bolt11) = harness::invoice(&mut bob, &request.id).await;
    harness::dev_pay(&ready.http_url, &bolt11).await;
    bob.wait_for(&request.id, REPLY_TIMEOUT, |r| {
        matches!(r, Reply::Result(_))
    })
    .await
    .expect("served during the flood");

    // Each flood request is either dropped at intake or stored (admitted in a task); the bucket
    // lets through its burst and what it refilled (LIMIT a minute) while the flood came in.
    let refilled = (started.elapsed().as_secs_f64() * LIMIT as f64 / 60.0).ceil() as usize;
    let store = daemon.pipeline().book().store();
    let flooder_account = dvmd::ledger::Account::from(flooder_key.expect("posted"));
    let mut seen = (0, 0);
    for _ in 0..100 {
        let metrics = harness::metrics(&ready.http_url).await;
        let dropped: usize = metrics
            .lines()
            .find_map(|l| l.strip_prefix("dvmd_events_dropped_total{reason=\"rate_limited\"} "))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let stored = harness::jobs(store)
            .iter()
            .filter(|job| job.customer == flooder_account)
            .count();
        seen = (dropped, stored);
        if dropped + stored == FLOOD {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (dropped, stored) = seen;
    assert_eq!(dropped + stored, FLOOD, "{seen:?}");
    assert!(
        (LIMIT..=LIMIT + refilled).contains(&stored),
        "only the bucket's worth was stored (and invoiced): {stored} (refilled {refilled})"
    );
    flooder.shutdown().await;
    bob.shutdown().await;
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}

/// A key that asks and never pays holds at most `max_open_invoices_per_npub` invoices: the
/// next request gets an `error` and costs no wallet call; paying one frees a place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpaid_invoices_are_capped_per_npub_and_paying_frees_a_place() {
    const CAP: usize = 3;
    let data = harness::data_dir();
    let backend = Arc::new(InstantBackend::new("paid at last"));
    let config = harness::dev_config(data.path(), |file| {
        file.service.max_open_invoices_per_npub = CAP as u32;
    });
    let daemon = harness::start(config, Some(backend)).await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let mut invoices = Vec::new();
    for i in 0..CAP {
        let request = alice
            .post(customer::text_request(
                &format!("ask {i}"),
                &[("max_tokens", "4")],
                None,
                None,
            ))
            .await
            .expect("post");
        invoices.push((
            request.id,
            harness::invoice(&mut alice, &request.id).await.1,
        ));
    }
    let over = alice
        .post(customer::text_request(
            "one too many",
            &[("max_tokens", "4")],
            None,
            None,
        ))
        .await
        .expect("post");
    let info = harness::error_info(&mut alice, &over.id).await;
    assert!(info.contains("3 unpaid invoices"), "{info}");
    let store = daemon.pipeline().book().store();
    let open = daemon
        .pipeline()
        .book()
        .open_payments()
        .await
        .expect("open");
    assert_eq!(open.len(), CAP, "no invoice for the refused request");

    // Paying one frees a place.
    let (paid, bolt11) = &invoices[0];
    harness::dev_pay(&ready.http_url, bolt11).await;
    alice
        .wait_for(paid, REPLY_TIMEOUT, |r| matches!(r, Reply::Result(_)))
        .await
        .expect("the paid job runs");
    let again = alice
        .post(customer::text_request(
            "now there is room",
            &[("max_tokens", "4")],
            None,
            None,
        ))
        .await
        .expect("post");
    harness::invoice(&mut alice, &again.id).await;
    assert_eq!(
        harness::jobs(store)
            .iter()
            .filter(|j| j.state == JobState::Rejected)
            .count(),
        1
    );
    alice.shutdown().await;
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}
