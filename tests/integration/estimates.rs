//! Honest accounting on the relay door, on embedded defaults (relay, dev wallet, the real
//! model): the `payment-required` feedback shows the estimate, a job paid under its p90 stops
//! at its budget and is charged what it generated, the result carries a usage receipt that an
//! independent client (npm nostr-tools) can check against the rate card, and what the
//! estimator learned survives a restart.

use dvmd::customer::{self, Customer, Reply};
use dvmd::job::JobState;
use dvmd::nip90::JobStatus;
use nostr_sdk::{Event, EventId, PublicKey};
use serde_json::{json, Value};

use crate::harness::{self, REPLY_TIMEOUT};

/// The values of the first tag named `name`.
fn tag<'a>(event: &'a Event, name: &str) -> Option<&'a [String]> {
    event
        .tags
        .iter()
        .map(|t| t.as_slice())
        .find(|t| t.first().is_some_and(|n| n == name))
}

/// A number in the JSON tag `name` of an event as nostr-tools returned it.
fn tag_number(event: &Value, name: &str, at: usize) -> u64 {
    event["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .find(|t| t[0] == name)
        .and_then(|t| t[at].as_str())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}[{at}] in {event}"))
}

fn tag_text<'a>(event: &'a Value, name: &str) -> &'a str {
    event["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .find(|t| t[0] == name)
        .and_then(|t| t[1].as_str())
        .unwrap_or_else(|| panic!("no {name} in {event}"))
}

/// The status of a feedback event, if it is one.
fn status_of(event: &Value) -> Option<&str> {
    event["tags"]
        .as_array()?
        .iter()
        .find(|t| t[0] == "status")
        .and_then(|t| t[1].as_str())
}

/// The results and feedback about `job` that nostr-tools finds on `relay`, once its `success`
/// feedback is there (published just after the job settles).
async fn everything_about(relay: &str, job: &EventId) -> Vec<Value> {
    let filter = json!({"kinds": [6050, 7000], "#e": [job.to_hex()]});
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let found: Vec<Value> = harness::nostr_tools_query(relay, &filter)
            .into_iter()
            .map(|line| line["event"].clone())
            .collect();
        if found.iter().any(|e| status_of(e) == Some("success")) {
            return found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no success feedback: {found:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The `payment-required` feedback for `job`: the amount asked, its invoice and the
/// `estimate` tag (p50, p90, confidence, cap).
async fn payment_required(customer: &mut Customer, job: &EventId) -> (u64, String, [u64; 4]) {
    let reply = customer
        .wait_for(job, REPLY_TIMEOUT, |r| {
            matches!(
                r,
                Reply::Feedback {
                    status: Some(JobStatus::PaymentRequired),
                    ..
                }
            )
        })
        .await
        .expect("payment-required");
    let Reply::Feedback { amount, event, .. } = reply else {
        unreachable!()
    };
    let amount = amount.expect("amount");
    let estimate = tag(&event, "estimate").expect("estimate tag");
    let figure = |i: usize| estimate[i].parse::<u64>().expect("number");
    let info = &tag(&event, "status").expect("status")[2];
    assert!(info.contains("90% of such jobs within"), "{info}");
    (
        amount.msat,
        amount.bolt11.expect("bolt11"),
        [figure(1), figure(2), figure(3), figure(4)],
    )
}

fn story(bid: Option<u64>, us: PublicKey) -> nostr_sdk::EventBuilder {
    customer::text_request(
        "Write a long story about a dragon who learns to bake bread.",
        &[("max_tokens", "200"), ("temperature", "0"), ("seed", "7")],
        bid,
        Some(us),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_paid_under_its_p90_stops_at_its_budget_with_a_receipt_nostr_tools_can_check() {
    let data = harness::data_dir();
    let daemon = harness::start(harness::dev_config(data.path(), |_| {}), None).await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");

    // The least this request can cost, as a refused bid of 1 msat names it.
    let probe = alice
        .post(story(Some(1), ready.pubkey))
        .await
        .expect("post");
    let info = harness::error_info(&mut alice, &probe.id).await;
    let floor: u64 = info
        .split("can cost, ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{info}"));

    // A bid that pays for 8 completion tokens (10 msat each) of the 200 asked for.
    let bid = floor + 7 * 10;
    let request = alice
        .post(story(Some(bid), ready.pubkey))
        .await
        .expect("post");
    let (asked, bolt11, [p50, p90, confidence, cap]) =
        payment_required(&mut alice, &request.id).await;
    assert_eq!(asked, bid, "the bid, under the p90, is what is asked");
    // The estimate as nostr-tools finds it: on the `payment-required` feedback, by its filter.
    let feedback = harness::nostr_tools_query(
        &ready.relay_url,
        &json!({"kinds": [7000], "#e": [request.id.to_hex()]}),
    );
    let shown = feedback
        .iter()
        .map(|f| &f["event"])
        .find(|e| e["tags"].to_string().contains("\"estimate\""))
        .expect("payment-required with an estimate");
    assert_eq!(
        (1..=4)
            .map(|i| tag_number(shown, "estimate", i))
            .collect::<Vec<_>>(),
        [p50, p90, confidence, cap]
    );
    // No history yet: the p90 is the cap, and nobody is sure of anything.
    assert_eq!((p90, confidence), (cap, 0));
    assert!(p50 < p90 && p90 > bid);
    harness::dev_pay(&ready.http_url, &bolt11).await;
    harness::result(&mut alice, &request.id).await;
    let job =
        harness::wait_for_state(daemon.pipeline().book(), &request.id, JobState::Settled).await;

    // The result as nostr-tools reads it from the relay, by its own filter and signature check.
    let found = harness::nostr_tools_query(
        &ready.relay_url,
        &json!({"kinds": [6050], "#e": [request.id.to_hex()]}),
    );
    assert_eq!(found.len(), 1, "{found:?}");
    let result = &found[0]["event"];
    assert_eq!(result["pubkey"], ready.pubkey.to_hex());
    assert_eq!(tag_text(result, "finish"), "budget");
    let (prompt, completion) = (
        tag_number(result, "usage", 1),
        tag_number(result, "usage", 2),
    );
    let (base, prompt_rate, completion_rate) = (
        tag_number(result, "rates", 1),
        tag_number(result, "rates", 2),
        tag_number(result, "rates", 3),
    );
    let (paid, charged, returned) = (
        tag_number(result, "paid", 1),
        tag_number(result, "charged", 1),
        tag_number(result, "returned", 1),
    );
    assert_eq!(completion, 8, "stopped at the 8 tokens paid for: {result}");
    assert_eq!(paid, bid);
    // The charge is the rate card applied to the counts (rounded up per 1k), within what was
    // paid, and the rest is returned.
    let at = |tokens: u64, rate: u64| (tokens * rate).div_ceil(1000);
    assert_eq!(
        charged,
        (base + at(prompt, prompt_rate) + at(completion, completion_rate)).min(paid)
    );
    assert!(charged <= paid);
    assert_eq!(returned, paid - charged);

    // Everything published about the job, as nostr-tools finds it: only the `payment-required`
    // feedback asks to be paid (NIP-90's `amount`). The result and `success` of a prepaid job
    // ask nothing, so a client that pays what it is asked pays once.
    let published = everything_about(&ready.relay_url, &request.id).await;
    let asking: Vec<_> = published
        .iter()
        .filter(|e| {
            e["tags"]
                .as_array()
                .expect("tags")
                .iter()
                .any(|t| t[0] == "amount")
        })
        .map(|e| (e["kind"].as_u64(), status_of(e)))
        .collect();
    assert_eq!(
        asking,
        [(Some(7000), Some("payment-required"))],
        "{published:?}"
    );

    // The rates the receipt names are the ones the NIP-89 announcement publishes.
    let announced = harness::nostr_tools_query(
        &ready.relay_url,
        &json!({"kinds": [31990], "authors": [ready.pubkey.to_hex()]}),
    );
    assert_eq!(announced.len(), 1, "{announced:?}");
    let handler = &announced[0]["event"];
    assert_eq!(
        (
            tag_number(handler, "rates", 1),
            tag_number(handler, "rates", 2),
            tag_number(handler, "rates", 3)
        ),
        (base, prompt_rate, completion_rate)
    );
    assert!(!tag_text(handler, "model").is_empty());

    // The book and the ledger say the same: the change is the customer's credit.
    assert_eq!(job.charge_msat, Some(charged));
    let alice_key = alice.keys().public_key();
    alice.shutdown().await;
    let metrics = harness::metrics(&ready.http_url).await;
    assert!(
        metrics.contains("dvmd_jobs_truncated_at_budget_total 1\n"),
        "{metrics}"
    );
    daemon.stop().await;
    let store = harness::open_store(data.path());
    harness::ledger_ok(&store);
    assert_eq!(harness::balance(&store, &alice_key), returned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_estimator_learns_from_jobs_and_remembers_across_a_restart() {
    let data = harness::data_dir();
    let config = || harness::dev_config(data.path(), |_| {});
    let daemon = harness::start(config(), None).await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    // Each request its own seed, so no two share an event id.
    let request = |seed: u32, us: PublicKey| {
        customer::text_request(
            "Name one planet of the solar system.",
            &[
                ("max_tokens", "120"),
                ("temperature", "0"),
                ("seed", &seed.to_string()),
            ],
            None,
            Some(us),
        )
    };

    let mut completions = Vec::new();
    for seed in 0..6 {
        let job = alice.post(request(seed, ready.pubkey)).await.expect("post");
        let (_, bolt11, _) = payment_required(&mut alice, &job.id).await;
        harness::dev_pay(&ready.http_url, &bolt11).await;
        let settled =
            harness::wait_for_state(daemon.pipeline().book(), &job.id, JobState::Settled).await;
        completions.push(settled.usage.expect("usage").completion_tokens);
    }
    assert!(
        completions.iter().all(|c| *c < 100),
        "a planet's name is short: {completions:?}"
    );
    let job = alice.post(request(6, ready.pubkey)).await.expect("post");
    let (asked, _, [_, p90, confidence, cap]) = payment_required(&mut alice, &job.id).await;
    assert!(p90 < cap, "six short answers brought the p90 under the cap");
    assert!(confidence > 0);
    // The change of the six is Alice's credit, reserved first: the invoice asks the rest.
    let waiting = daemon
        .pipeline()
        .book()
        .get(&job.id.into())
        .await
        .expect("read")
        .expect("job");
    assert!(waiting.credit_msat > 0);
    // Asked: enough for 96% of such jobs, at least the p90, at most the cap.
    let due = asked + waiting.credit_msat;
    assert!((p90..=cap).contains(&due), "{due} of {p90}..={cap}");
    assert_eq!(Some(due), waiting.quote_msat);
    alice.shutdown().await;
    daemon.stop().await;

    let daemon = harness::start(config(), None).await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let again = alice.post(request(7, ready.pubkey)).await.expect("post");
    let (_, _, [_, p90_after, confidence_after, cap_after]) =
        payment_required(&mut alice, &again.id).await;
    assert_eq!(
        (p90_after, confidence_after, cap_after),
        (p90, confidence, cap),
        "the same estimate after a restart"
    );
    alice.shutdown().await;
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_rates_derived_from_the_hardware_cost_are_served_announced_and_charged() {
    let data = harness::data_dir();
    // 3,600,000 msat an hour: a millisecond of the model costs 1 msat.
    let daemon = harness::start(
        harness::dev_config(data.path(), |file| {
            file.pricing.hardware_cost_msat_per_hour = Some(3_600_000);
        }),
        None,
    )
    .await;
    let ready = daemon.ready().clone();
    let models: Value = reqwest::get(format!("{}/v1/models", ready.http_url))
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    let pricing = &models["data"][0]["pricing"];
    let completion = pricing["completion_msat_per_1k_tokens"]
        .as_u64()
        .expect("rate");
    let prompt = pricing["prompt_msat_per_1k_tokens"].as_u64().expect("rate");
    // Measured on this machine: both take a measurable time (the configured 10,000 and 2,000
    // are ignored).
    assert!(completion > 0 && prompt > 0, "{pricing}");
    assert_ne!((prompt, completion), (2_000, 10_000));

    // The announcement says the same, and a paid job is charged at those rates.
    let announced = harness::nostr_tools_query(
        &ready.relay_url,
        &json!({"kinds": [31990], "authors": [ready.pubkey.to_hex()]}),
    );
    let handler = &announced[0]["event"];
    assert_eq!(
        (
            tag_number(handler, "rates", 2),
            tag_number(handler, "rates", 3)
        ),
        (prompt, completion)
    );
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let request = alice
        .post(customer::text_request(
            "Name a colour.",
            &[("max_tokens", "16")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    let (_, bolt11, _) = payment_required(&mut alice, &request.id).await;
    harness::dev_pay(&ready.http_url, &bolt11).await;
    let result = harness::result(&mut alice, &request.id).await;
    assert_eq!(
        tag(&result, "rates").expect("rates")[2..],
        [prompt.to_string(), completion.to_string()]
    );
    alice.shutdown().await;
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}
