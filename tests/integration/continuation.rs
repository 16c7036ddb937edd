//! Continuation instead of truncation, on embedded defaults (relay, dev wallet, the real
//! model): a job that reaches what it paid for before it is done shows the text so far in a
//! `partial` feedback and asks for the rest with a `payment-required`. Paid, it goes on from
//! the text so far and is charged every token once; left unpaid, the text so far is its result,
//! charged as generated, and a payment made after that is credited. The ledger invariant holds
//! after each, and an independent client (npm nostr-tools) finds the `partial` feedback by its
//! own filter.

use dvmd::customer::{self, Customer, Reply};
use dvmd::daemon::Daemon;
use dvmd::job::{Job, JobState};
use dvmd::nip90::JobStatus;
use nostr_sdk::{Event, EventId, PublicKey};
use serde_json::json;

use crate::harness::{self, REPLY_TIMEOUT};

/// How long a continuation waits for its payment in these tests, seconds.
const WAIT_SECS: u64 = 15;

/// The value at `at` of the first tag named `name`.
fn tag(event: &Event, name: &str, at: usize) -> String {
    event
        .tags
        .iter()
        .map(|t| t.as_slice())
        .find(|t| t.first().is_some_and(|n| n == name))
        .and_then(|t| t.get(at).cloned())
        .unwrap_or_else(|| panic!("no {name}[{at}] in {event:?}"))
}

fn number(event: &Event, name: &str, at: usize) -> u64 {
    tag(event, name, at).parse().expect("a number")
}

/// Teach the estimator of the daemon at `relay_url` and `http_url` that such jobs are short:
/// six answers of a few tokens (at most `max_tokens`) bring the quote (enough for most such
/// jobs) well under what a long answer costs.
async fn teach_short_answers(relay_url: &str, http_url: &str, us: PublicKey, max_tokens: &str) {
    let mut teacher = Customer::connect(relay_url).await.expect("connect");
    for seed in 0..6 {
        let request = customer::text_request(
            "Name one planet of the solar system.",
            &[
                ("max_tokens", max_tokens),
                ("temperature", "0"),
                ("seed", &seed.to_string()),
            ],
            None,
            Some(us),
        );
        let job = teacher.post(request).await.expect("post");
        let (_, bolt11) = harness::invoice(&mut teacher, &job.id).await;
        harness::dev_pay(http_url, &bolt11).await;
        harness::result(&mut teacher, &job.id).await;
    }
    teacher.shutdown().await;
}

/// A long story for `us`, with no bid.
fn story(us: PublicKey, seed: u32) -> nostr_sdk::EventBuilder {
    customer::text_request(
        "Write a long story about a dragon who learns to bake bread.",
        &[
            ("max_tokens", "200"),
            ("temperature", "0"),
            ("seed", &seed.to_string()),
        ],
        None,
        Some(us),
    )
}

/// A long story, asked of us with no bid, paid as quoted; returns the request and what was
/// paid.
async fn paid_story(daemon: &Daemon, customer: &mut Customer, seed: u32) -> (Event, u64) {
    let ready = daemon.ready();
    let request = story(ready.pubkey, seed);
    let job = customer.post(request).await.expect("post");
    let (paid, bolt11) = harness::invoice(customer, &job.id).await;
    harness::dev_pay(&ready.http_url, &bolt11).await;
    (job, paid)
}

/// The `partial` feedback about `job` (its content: the text so far) and the
/// `payment-required` that asks for the rest, in either order (a relay returns stored events
/// newest first): (text so far, msat, bolt11).
async fn asked_to_continue(customer: &mut Customer, job: &EventId) -> (String, u64, String) {
    let (mut said, mut asked) = (None, None);
    while said.is_none() || asked.is_none() {
        let reply = customer
            .wait_for(job, REPLY_TIMEOUT, |r| {
                matches!(
                    r,
                    Reply::Result(_)
                        | Reply::Feedback {
                            status: Some(
                                JobStatus::Partial | JobStatus::PaymentRequired | JobStatus::Error
                            ),
                            ..
                        }
                )
            })
            .await
            .expect("partial and payment-required");
        match reply {
            Reply::Feedback {
                status: Some(JobStatus::Partial),
                event,
                ..
            } => said = Some(event.content.clone()),
            Reply::Feedback {
                status: Some(JobStatus::PaymentRequired),
                amount: Some(amount),
                ..
            } => asked = Some((amount.msat, amount.bolt11.expect("bolt11"))),
            other => panic!("expected partial and payment-required, got {other:?}"),
        }
    }
    let (Some(said), Some((msat, bolt11))) = (said, asked) else {
        unreachable!()
    };
    (said, msat, bolt11)
}

async fn job(daemon: &Daemon, id: &EventId) -> Job {
    daemon
        .pipeline()
        .book()
        .get(&(*id).into())
        .await
        .expect("read")
        .expect("job")
}

/// `dvmd ledger check` on the running daemon's store.
async fn ledger_check(daemon: &Daemon) {
    daemon
        .pipeline()
        .book()
        .store()
        .read(dvmd::job::audit)
        .await
        .expect("the ledger invariant holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_out_of_budget_asks_for_the_rest_and_goes_on_when_paid_or_ends_with_what_it_has() {
    let data = harness::data_dir();
    let config = harness::dev_config(data.path(), |file| {
        file.pricing.continuation_wait_secs = WAIT_SECS;
    });
    let daemon = harness::start(config, None).await;
    let ready = daemon.ready().clone();
    teach_short_answers(&ready.relay_url, &ready.http_url, ready.pubkey, "200").await;

    // Three stories run out of what they paid (all quoted before any ran on): the text so
    // far, and an invoice for the rest.
    let mut bob = Customer::connect(&ready.relay_url).await.expect("connect");
    let mut carol = Customer::connect(&ready.relay_url).await.expect("connect");
    let mut dave = Customer::connect(&ready.relay_url).await.expect("connect");
    let (story, first) = paid_story(&daemon, &mut bob, 1).await;
    let (tale, carol_paid) = paid_story(&daemon, &mut carol, 2).await;
    let (saga, dave_paid) = paid_story(&daemon, &mut dave, 3).await;
    let story = story.id;
    let (so_far, more, bolt11) = asked_to_continue(&mut bob, &story).await;
    assert!(!so_far.is_empty());
    let waiting = job(&daemon, &story).await;
    assert_eq!(waiting.state, JobState::AwaitingContinuation);
    let said = waiting.usage.expect("usage so far");
    assert!(said.completion_tokens < 200, "{said:?}");
    assert_eq!(waiting.held_msat, first, "the first payment stays held");
    // The rest is priced for the rest of max_tokens: with what the job holds, it pays for all
    // 200 (a wallet that works in whole sats rounds up).
    let card = dvmd::pricing::RateCard::default();
    let whole = card.charge(dvmd::infer::Usage {
        prompt_tokens: said.prompt_tokens,
        completion_tokens: 200,
    });
    assert!(
        (whole - first..whole - first + 1000).contains(&more),
        "{more} for {whole} - {first}"
    );
    ledger_check(&daemon).await;

    // Carol cancels instead (kind 5), first, well within her invoice's life (it was issued when
    // her story ran out, as Bob's was): the text so far is her result at once, charged as
    // generated, and paying the rest after that is credited to her, not run.
    let (carol_said, carol_more, carol_bolt11) = asked_to_continue(&mut carol, &tale.id).await;
    carol
        .send(&harness::cancellation(&tale, carol.keys()))
        .await
        .expect("cancel");
    let carol_charged =
        ends_with_what_it_has(&daemon, &mut carol, &tale.id, &carol_said, carol_paid).await;
    harness::dev_pay(&ready.http_url, &carol_bolt11).await;
    let hash = dvmd::wallet::bolt11::decode(&carol_bolt11)
        .expect("bolt11")
        .payment_hash;
    harness::wait_for_booking(daemon.pipeline().book(), &hash).await;
    let after = job(&daemon, &tale.id).await;
    assert_eq!(
        after.state,
        JobState::Settled,
        "a late payment runs nothing"
    );
    ledger_check(&daemon).await;
    let carol_owns = carol_paid - carol_charged + carol_more;

    // Bob pays: it goes on from the text so far, and every token is charged once.
    harness::dev_pay(&ready.http_url, &bolt11).await;
    // nostr-tools finds the partial feedback by its own filter, with the text so far.
    let feedback = harness::nostr_tools_query(
        &ready.relay_url,
        &json!({"kinds": [7000], "#e": [story.to_hex()], "#p": [bob.keys().public_key().to_hex()]}),
    );
    let partial = feedback
        .iter()
        .map(|f| &f["event"])
        .find(|e| e["tags"][0][1] == "partial")
        .unwrap_or_else(|| panic!("no partial feedback in {feedback:?}"));
    assert_eq!(partial["content"], so_far.as_str());
    // And the payment-required after it, whose invoice decodes to what its amount tag says.
    let asked = feedback
        .iter()
        .filter(|f| f["event"]["tags"][0][1] == "payment-required")
        .find(|f| f["invoice"]["bolt11_msat"] == more)
        .unwrap_or_else(|| panic!("no payment-required for {more} msat in {feedback:?}"));
    assert_eq!(asked["invoice"]["msat"], more);
    // Dated after the partial: a client showing a job's latest status shows the invoice.
    assert!(
        partial["created_at"].as_u64() < asked["event"]["created_at"].as_u64(),
        "{partial} {asked}"
    );
    let result = harness::result(&mut bob, &story).await;
    assert!(
        result.content.starts_with(&so_far) && result.content.len() > so_far.len(),
        "{so_far:?} then {:?}",
        result.content
    );
    assert_ne!(tag(&result, "finish", 1), "budget");
    let (prompt, completion) = (number(&result, "usage", 1), number(&result, "usage", 2));
    assert_eq!(
        prompt,
        u64::from(said.prompt_tokens),
        "the prompt is paid once"
    );
    assert!(completion > u64::from(said.completion_tokens));
    let (paid, charged, returned) = (
        number(&result, "paid", 1),
        number(&result, "charged", 1),
        number(&result, "returned", 1),
    );
    assert_eq!(paid, first + more);
    let usage = dvmd::infer::Usage {
        prompt_tokens: prompt as u32,
        completion_tokens: completion as u32,
    };
    assert_eq!(charged, card.charge(usage));
    assert_eq!(returned, paid - charged);
    let settled =
        harness::wait_for_state(daemon.pipeline().book(), &story, JobState::Settled).await;
    assert_eq!(settled.charge_msat, Some(charged));
    ledger_check(&daemon).await;

    // Dave does not pay for the rest: after the wait, the text so far is his result.
    let (so_far, _, _) = asked_to_continue(&mut dave, &saga.id).await;
    let charged = ends_with_what_it_has(&daemon, &mut dave, &saga.id, &so_far, dave_paid).await;
    ledger_check(&daemon).await;
    let dave_owns = dave_paid - charged;

    let metrics = harness::metrics(&ready.http_url).await;
    assert!(
        metrics.contains("dvmd_continuations_given_up_total 2\n"),
        "{metrics}"
    );
    let (carol_key, dave_key) = (carol.keys().public_key(), dave.keys().public_key());
    for customer in [bob, carol, dave] {
        customer.shutdown().await;
    }
    daemon.stop().await;
    let store = harness::open_store(data.path());
    harness::ledger_ok(&store);
    assert_eq!(harness::balance(&store, &carol_key), carol_owns);
    assert_eq!(harness::balance(&store, &dave_key), dave_owns);
}

/// NIP-90 clients pay a `payment-required` by zapping it. A continuation's is paid that way
/// too, by whoever paid for the job and with at least what it asks; the job goes on, the zap
/// gets its receipt, and the continuation's own invoice, paid as well, is credited, not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_is_paid_by_a_zap_of_its_payment_required() {
    let data = harness::data_dir();
    let config = harness::dev_config(data.path(), |file| {
        file.pricing.continuation_wait_secs = WAIT_SECS * 4;
        // 100 msat a token, so that the rest costs more than LNURL's least zap (1 sat).
        file.pricing.completion_msat_per_1k_tokens = 100_000;
    });
    let daemon = harness::start(config, None).await;
    let ready = daemon.ready().clone();
    teach_short_answers(&ready.relay_url, &ready.http_url, ready.pubkey, "200").await;
    let mut bob = Customer::connect(&ready.relay_url).await.expect("connect");
    let (story, first) = paid_story(&daemon, &mut bob, 1).await;
    let (so_far, more, bolt11) = asked_to_continue(&mut bob, &story.id).await;
    // The feedback to zap, as nostr-tools finds it.
    let feedback = harness::nostr_tools_query(
        &ready.relay_url,
        &json!({"kinds": [7000], "#e": [story.id.to_hex()]}),
    );
    let asked = feedback
        .iter()
        .find(|f| f["event"]["tags"].to_string().contains(&bolt11))
        .unwrap_or_else(|| panic!("no payment-required with {bolt11} in {feedback:?}"));
    let asked = EventId::from_hex(asked["event"]["id"].as_str().expect("id")).expect("id");

    // Someone else's zap, and Bob's for less than it asks, are refused before any invoice.
    let zap = |keys: &nostr_sdk::Keys, msat| {
        harness::zap_request(keys, ready.pubkey, Some(asked), msat, &ready.relay_url)
    };
    let stranger = nostr_sdk::Keys::generate();
    let (status, body) = harness::callback(&ready.http_url, more, &zap(&stranger, more)).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("whoever paid"), "{body}");
    let (status, body) =
        harness::callback(&ready.http_url, more - 1, &zap(bob.keys(), more - 1)).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("zap at least"), "{body}");

    // Bob's zap of what it asks pays for the rest: the story goes on from the text so far.
    let (status, body) = harness::callback(&ready.http_url, more, &zap(bob.keys(), more)).await;
    assert_eq!(status, 200, "{body}");
    let zap_invoice = body["pr"].as_str().expect("pr").to_owned();
    harness::dev_pay(&ready.http_url, &zap_invoice).await;
    let result = harness::result(&mut bob, &story.id).await;
    assert!(
        result.content.starts_with(&so_far) && result.content.len() > so_far.len(),
        "{so_far:?} then {:?}",
        result.content
    );
    assert_eq!(number(&result, "paid", 1), first + more);
    let charged = number(&result, "charged", 1);
    let settled =
        harness::wait_for_state(daemon.pipeline().book(), &story.id, JobState::Settled).await;
    assert_eq!(settled.charge_msat, Some(charged));
    assert_eq!(settled.paid_msat, first + more);

    // The zap's receipt, as nostr-tools finds it by the zapped feedback.
    let mut receipts = Vec::new();
    for _ in 0..100 {
        receipts = harness::nostr_tools_query(
            &ready.relay_url,
            &json!({"kinds": [9735], "#e": [asked.to_hex()]}),
        );
        if !receipts.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(receipts.len(), 1, "{receipts:?}");
    assert_eq!(receipts[0]["zap"]["request_error"], serde_json::Value::Null);

    // The continuation's own invoice, paid as well, runs nothing: it is Bob's credit.
    harness::dev_pay(&ready.http_url, &bolt11).await;
    let hash = dvmd::wallet::bolt11::decode(&bolt11)
        .expect("bolt11")
        .payment_hash;
    harness::wait_for_booking(daemon.pipeline().book(), &hash).await;
    assert_eq!(job(&daemon, &story.id).await.state, JobState::Settled);
    ledger_check(&daemon).await;
    let bob_key = bob.keys().public_key();
    bob.shutdown().await;
    daemon.stop().await;
    let store = harness::open_store(data.path());
    harness::ledger_ok(&store);
    assert_eq!(
        harness::balance(&store, &bob_key),
        first + more + more - charged
    );
}

/// The result of `job`, given up with the text so far (`said`): `finish` `budget`, charged as
/// generated within what was `paid`, settled. Returns the charge.
async fn ends_with_what_it_has(
    daemon: &Daemon,
    customer: &mut Customer,
    job: &EventId,
    said: &str,
    paid: u64,
) -> u64 {
    let result = harness::result(customer, job).await;
    assert_eq!(result.content, said);
    assert_eq!(tag(&result, "finish", 1), "budget");
    let charged = number(&result, "charged", 1);
    let usage = dvmd::infer::Usage {
        prompt_tokens: number(&result, "usage", 1) as u32,
        completion_tokens: number(&result, "usage", 2) as u32,
    };
    assert_eq!(
        charged,
        dvmd::pricing::RateCard::default().charge(usage).min(paid)
    );
    assert_eq!(number(&result, "paid", 1), paid);
    let settled = harness::wait_for_state(daemon.pipeline().book(), job, JobState::Settled).await;
    assert_eq!(settled.charge_msat, Some(charged));
    charged
}

/// After the daemon on `data` stopped: `request`'s job settled once, paid `paid` in all, and
/// what it did not use is its customer's; the ledger invariant holds.
fn ran_on_once(data: &std::path::Path, request: &Event, paid: u64) {
    let store = harness::open_store(data);
    harness::ledger_ok(&store);
    let job = harness::jobs(&store)
        .into_iter()
        .find(|job| job.id == request.id.into())
        .expect("the job");
    assert_eq!(job.state, JobState::Settled);
    assert_eq!(job.paid_msat, paid);
    assert_eq!(
        harness::balance(&store, &request.pubkey),
        paid - job.charge_msat.expect("charged")
    );
}

/// A daemon process and Bob's story, paid as quoted, stopped at its budget and asking for
/// the rest.
struct AtBudget {
    daemon: harness::DaemonProcess,
    bob: Customer,
    keys: nostr_sdk::Keys,
    us: PublicKey,
    request: Event,
    first_paid: u64,
    so_far: String,
    more: u64,
    /// The continuation's invoice.
    bolt11: String,
}

/// A daemon process on `data` with `config`, taught that such stories are short, then Bob's
/// story: paid, stopped at its budget, asking for the rest.
async fn story_at_its_budget(
    data: &std::path::Path,
    relay_port: u16,
    http_port: u16,
    config: &str,
) -> AtBudget {
    let keys = nostr_sdk::Keys::generate();
    let daemon = harness::DaemonProcess::spawn(data, relay_port, http_port, config);
    let us = PublicKey::from_hex(&daemon.pubkey).expect("pubkey");
    teach_short_answers(&daemon.relay_url, &daemon.http_url, us, "200").await;
    let mut bob = Customer::connect_with(&daemon.relay_url, keys.clone())
        .await
        .expect("connect");
    let request = bob.post(story(us, 1)).await.expect("post");
    let (first_paid, bolt11) = harness::invoice(&mut bob, &request.id).await;
    harness::dev_pay(&daemon.http_url, &bolt11).await;
    let (so_far, more, bolt11) = asked_to_continue(&mut bob, &request.id).await;
    AtBudget {
        daemon,
        bob,
        keys,
        us,
        request,
        first_paid,
        so_far,
        more,
        bolt11,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_awaiting_its_continuation_survives_a_kill_and_runs_on_when_paid_after() {
    use harness::DaemonProcess;
    let data = harness::data_dir();
    let (relay_port, http_port) = (harness::free_port(), harness::free_port());
    let config = "[pricing]\ncontinuation_wait_secs = 600\n";
    let AtBudget {
        daemon: first,
        bob,
        keys,
        request,
        first_paid,
        so_far,
        more,
        bolt11,
        ..
    } = story_at_its_budget(data.path(), relay_port, http_port, config).await;
    first.kill();
    bob.shutdown().await;

    // The embedded relay died with the daemon; the job, its text so far and its invoice live
    // on in the store. Paid after the restart, it runs on from the text so far, once.
    let second = DaemonProcess::spawn(data.path(), relay_port, http_port, config);
    let mut bob = Customer::connect_with(&second.relay_url, keys)
        .await
        .expect("reconnect");
    // Shown again: the text so far and the same invoice.
    let (again, asked_again, shown) = asked_to_continue(&mut bob, &request.id).await;
    assert_eq!(
        (again, asked_again, &shown),
        (so_far.clone(), more, &bolt11)
    );
    harness::dev_pay(&second.http_url, &bolt11).await;
    let result = harness::result(&mut bob, &request.id).await;
    assert!(
        result.content.starts_with(&so_far) && result.content.len() > so_far.len(),
        "{so_far:?} then {:?}",
        result.content
    );
    assert_eq!(number(&result, "paid", 1), first_paid + more);
    second.terminate();
    bob.shutdown().await;

    ran_on_once(data.path(), &request, first_paid + more);
}

/// A zap paid in time for a continuation whose news the daemon missed (it was down, and its
/// passes put off looking the zap up) is found when the continuation's own invoice is seen to
/// have expired unpaid: the job runs on rather than end with the text so far and credit the
/// zap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_zapped_while_the_daemon_was_down_runs_on_after_its_invoice_expired() {
    use harness::DaemonProcess;
    let data = harness::data_dir();
    let (relay_port, http_port) = (harness::free_port(), harness::free_port());
    let config = "[pricing]\ncontinuation_wait_secs = 15\ncompletion_msat_per_1k_tokens = 100000\n";
    let AtBudget {
        daemon: first,
        bob,
        keys,
        us,
        request,
        first_paid,
        so_far,
        more,
        bolt11: continuation,
    } = story_at_its_budget(data.path(), relay_port, http_port, config).await;
    // Bob zaps the request for what the continuation asks; the daemon dies before the wallet
    // settles it, so it never hears of the payment.
    let zap = harness::zap_request(&keys, us, Some(request.id), more, &first.relay_url);
    let (status, body) = harness::callback(&first.http_url, more, &zap).await;
    assert_eq!(status, 200, "{body}");
    let zap_invoice = body["pr"].as_str().expect("pr").to_owned();
    first.kill();
    bob.shutdown().await;
    // And the reconcile passes will not look the zap up for an hour: only a give-up that
    // looks for zaps standing in for the continuation finds it paid in time.
    harness::settle_unheard(data.path(), &zap_invoice).await;
    // Back after the continuation's invoice expired unpaid.
    let expires_at = dvmd::wallet::bolt11::decode(&continuation)
        .expect("bolt11")
        .expires_at;
    while nostr_sdk::Timestamp::now().as_secs() <= expires_at + 1 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let second = DaemonProcess::spawn(data.path(), relay_port, http_port, config);
    let mut bob = Customer::connect_with(&second.relay_url, keys)
        .await
        .expect("reconnect");
    let result = harness::result(&mut bob, &request.id).await;
    assert!(
        result.content.starts_with(&so_far) && result.content.len() > so_far.len(),
        "{so_far:?} then {:?}",
        result.content
    );
    assert_eq!(number(&result, "paid", 1), first_paid + more);
    // The zap booked this way gets its receipt, as nostr-tools finds it.
    let mut receipts = Vec::new();
    for _ in 0..100 {
        receipts = harness::nostr_tools_query(
            &second.relay_url,
            &json!({"kinds": [9735], "#e": [request.id.to_hex()]}),
        );
        if !receipts.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(receipts.len(), 1, "{receipts:?}");
    second.terminate();
    bob.shutdown().await;

    ran_on_once(data.path(), &request, first_paid + more);
}

/// A backend that answers at once, 120 words (tokens) long.
fn long_answer() -> dvmd::infer::instant::InstantBackend {
    let words: Vec<String> = (0..120).map(|i| format!("w{i}")).collect();
    dvmd::infer::instant::InstantBackend::new(words.join(" "))
}

/// What one customer of the concurrent test did after being asked to continue.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Then {
    Pay,
    Cancel,
    /// Cancel and pay at once: either may win, and no money may be lost or counted twice.
    Race,
}

/// Twelve customers at once, each asked to continue: some pay, some cancel, some do both at
/// the same moment. Every job ends once, with one result; what each customer paid is either
/// charged or on their account, to the msat; the ledger invariant holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_continuations_paid_cancelled_or_both_lose_nothing() {
    use std::sync::Arc;
    let data = harness::data_dir();
    let config = harness::dev_config(data.path(), |file| {
        file.pricing.continuation_wait_secs = 60;
        file.service.workers = 2;
    });
    let backend = Arc::new(long_answer());
    let daemon = Arc::new(harness::start(config, Some(backend)).await);
    let ready = daemon.ready().clone();

    // Short answers first (max_tokens 4), so a request for 100 is quoted for far fewer.
    teach_short_answers(&ready.relay_url, &ready.http_url, ready.pubkey, "4").await;

    let plans = [Then::Pay, Then::Cancel, Then::Race];
    let runs = (0..12).map(|i| {
        let daemon = daemon.clone();
        let then = plans[i % 3];
        async move {
            let ready = daemon.ready().clone();
            let mut customer = Customer::connect(&ready.relay_url).await.expect("connect");
            let request = customer::text_request(
                "Name one planet of the solar system.",
                &[("max_tokens", "100"), ("seed", &(100 + i).to_string())],
                None,
                Some(ready.pubkey),
            );
            let request = customer.post(request).await.expect("post");
            let (first, bolt11) = harness::invoice(&mut customer, &request.id).await;
            harness::dev_pay(&ready.http_url, &bolt11).await;
            let (so_far, more, bolt11) = asked_to_continue(&mut customer, &request.id).await;
            let cancel = harness::cancellation(&request, customer.keys());
            match then {
                Then::Pay => {
                    harness::dev_pay(&ready.http_url, &bolt11).await;
                }
                Then::Cancel => customer.send(&cancel).await.expect("cancel"),
                Then::Race => {
                    let (sent, _) = tokio::join!(
                        customer.send(&cancel),
                        harness::dev_pay(&ready.http_url, &bolt11)
                    );
                    sent.expect("cancel");
                }
            }
            let result = harness::result(&mut customer, &request.id).await;
            assert!(result.content.starts_with(&so_far), "{result:?}");
            let paid_in = first + if then == Then::Cancel { 0 } else { more };
            let key = customer.keys().public_key();
            customer.shutdown().await;
            (then, request.id, key, paid_in, result)
        }
    });
    let outcomes = futures::future::join_all(runs).await;

    for (then, id, key, paid_in, result) in &outcomes {
        let job = harness::wait_for_state(daemon.pipeline().book(), id, JobState::Settled).await;
        let charged = number(result, "charged", 1);
        assert_eq!(job.charge_msat, Some(charged));
        let finish = tag(result, "finish", 1);
        match then {
            Then::Pay => assert_ne!(finish, "budget", "{result:?}"),
            Then::Cancel => assert_eq!(finish, "budget", "{result:?}"),
            Then::Race => {}
        }
        // Every msat the customer paid is charged or theirs: a continuation paid after the
        // cancellation won is credited, and its booking may land a moment after the result.
        let account = dvmd::ledger::Account::from(*key);
        let mut balance = 0;
        for _ in 0..250 {
            balance = daemon
                .pipeline()
                .book()
                .store()
                .read(move |r| dvmd::ledger::balance(r, &account))
                .await
                .expect("balance");
            if balance + charged == *paid_in {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(balance + charged, *paid_in, "{then:?} {job:?}");
    }
    ledger_check(&daemon).await;
    let daemon = Arc::into_inner(daemon).expect("the only handle");
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}

/// The instant backend, with a fault injected: it fails every continuation.
struct FailsToContinue(dvmd::infer::instant::InstantBackend);

#[async_trait::async_trait]
impl dvmd::infer::Backend for FailsToContinue {
    fn name(&self) -> &str {
        "fails-to-continue"
    }

    async fn count_prompt_tokens(
        &self,
        request: &dvmd::infer::GenerateRequest,
    ) -> Result<Option<u32>, dvmd::infer::InferError> {
        self.0.count_prompt_tokens(request).await
    }

    async fn generate(
        &self,
        request: dvmd::infer::GenerateRequest,
        max_tokens: u32,
    ) -> Result<dvmd::infer::GenerateStream, dvmd::infer::InferError> {
        if request.continue_from.is_some() {
            return Err(dvmd::infer::InferError::Backend("injected".to_owned()));
        }
        self.0.generate(request, max_tokens).await
    }
}

/// A continuation that was paid but fails on the model ends with the text so far, charged as
/// generated (it was shown), and the continuation's payment is the customer's again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_continuation_that_fails_ends_with_the_text_so_far_and_credits_the_payment() {
    use std::sync::Arc;
    let data = harness::data_dir();
    let config = harness::dev_config(data.path(), |file| {
        file.pricing.continuation_wait_secs = 60;
    });
    let backend = Arc::new(FailsToContinue(long_answer()));
    let daemon = harness::start(config, Some(backend)).await;
    let ready = daemon.ready().clone();
    teach_short_answers(&ready.relay_url, &ready.http_url, ready.pubkey, "4").await;
    let mut bob = Customer::connect(&ready.relay_url).await.expect("connect");
    let request = customer::text_request(
        "Name one planet of the solar system.",
        &[("max_tokens", "100"), ("seed", "99")],
        None,
        Some(ready.pubkey),
    );
    let request = bob.post(request).await.expect("post");
    let (first, bolt11) = harness::invoice(&mut bob, &request.id).await;
    harness::dev_pay(&ready.http_url, &bolt11).await;
    let (so_far, more, bolt11) = asked_to_continue(&mut bob, &request.id).await;
    harness::dev_pay(&ready.http_url, &bolt11).await;
    let charged =
        ends_with_what_it_has(&daemon, &mut bob, &request.id, &so_far, first + more).await;
    assert!(
        charged <= first,
        "charged {charged} of the first {first} msat"
    );
    ledger_check(&daemon).await;
    let bob_key = bob.keys().public_key();
    bob.shutdown().await;
    daemon.stop().await;
    let store = harness::open_store(data.path());
    harness::ledger_ok(&store);
    assert_eq!(harness::balance(&store, &bob_key), first + more - charged);
}
