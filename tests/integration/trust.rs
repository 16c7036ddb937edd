//! Trust tiers on a real daemon: promotion from real paid jobs, labels read back by an
//! independent client (npm nostr-tools), the operator's block on both doors, proof of work
//! for new keys, and a flood of fresh keys that cannot take a known customer's capacity.

use std::sync::Arc;
use std::time::Duration;

use dvmd::customer::{self, Customer, Reply};
use dvmd::infer::instant::InstantBackend;
use dvmd::job::JobState;
use dvmd::trust::Tier;
use nostr_sdk::{Keys, PublicKey, ToBech32};
use serde_json::{json, Value};

use crate::harness::{self, REPLY_TIMEOUT};

/// Post a job as `customer`, pay it through the dev wallet, wait for its result; the request's
/// id and the result's.
async fn paid_job(
    customer: &mut Customer,
    http: &str,
    prompt: &str,
) -> (nostr_sdk::EventId, nostr_sdk::EventId) {
    let request = customer
        .post(customer::text_request(
            prompt,
            &[("max_tokens", "4")],
            None,
            None,
        ))
        .await
        .expect("post");
    let (_, bolt11) = harness::invoice(customer, &request.id).await;
    harness::dev_pay(http, &bolt11).await;
    let result = customer
        .wait_for(&request.id, REPLY_TIMEOUT, |r| {
            matches!(r, Reply::Result(_))
        })
        .await
        .expect("result");
    let Reply::Result(result) = result else {
        unreachable!("waited for a result")
    };
    (request.id, result.id)
}

/// The job outcome labels of `npub` by `service` that nostr-tools reads: (outcome, target
/// event, payment hash), sorted.
pub fn job_labels(
    relay: &str,
    service: &PublicKey,
    npub: &PublicKey,
) -> Vec<(String, String, Option<String>)> {
    let filter = json!({
        "kinds": [1985],
        "authors": [service.to_hex()],
        "#L": ["dvmd.job"],
        "#p": [npub.to_hex()],
    });
    let tag = |tags: &Vec<Value>, name: &str| {
        tags.iter()
            .find(|t| t[0] == name)
            .and_then(|t| t[1].as_str().map(str::to_owned))
    };
    let mut labels: Vec<_> = harness::nostr_tools_query(relay, &filter)
        .iter()
        .filter_map(|line| {
            let tags = line["event"]["tags"].as_array()?;
            Some((tag(tags, "l")?, tag(tags, "e")?, tag(tags, "payment_hash")))
        })
        .collect();
    labels.sort();
    labels
}

/// The tier labels of `npub` by `service` that nostr-tools reads from the relay.
fn tier_labels(relay: &str, service: &PublicKey, npub: &PublicKey) -> Vec<String> {
    let filter = json!({
        "kinds": [1985],
        "authors": [service.to_hex()],
        "#L": ["dvmd.trust"],
        "#p": [npub.to_hex()],
    });
    harness::nostr_tools_query(relay, &filter)
        .iter()
        .filter_map(|line| {
            let tags = line["event"]["tags"].as_array()?;
            tags.iter()
                .find(|t| t[0] == "l" && t[2] == "dvmd.trust")
                .and_then(|t| t[1].as_str().map(str::to_owned))
        })
        .collect()
}

/// Wait until nostr-tools sees exactly `expected` as `npub`'s labels.
async fn wait_for_labels(relay: &str, service: &PublicKey, npub: &PublicKey, expected: &[&str]) {
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen = tier_labels(relay, service, npub);
        if seen == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("labels of {npub}: {seen:?}, expected {expected:?}");
}

async fn wait_for_tier(daemon: &dvmd::daemon::Daemon, npub: &PublicKey, tier: Tier) {
    for _ in 0..100 {
        if daemon.pipeline().trust().tier(npub) == tier {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{npub} never became {tier}");
}

/// A daemon on `config` with the instant backend answering `text`, and a customer the operator
/// put in `tier`.
async fn daemon_with(
    data: &tempfile::TempDir,
    edit: impl FnOnce(&mut dvmd::config::FileConfig),
    text: &str,
    tier: Option<Tier>,
) -> (dvmd::daemon::Daemon, Customer) {
    let backend = Arc::new(InstantBackend::new(text));
    let daemon = harness::start(harness::dev_config(data.path(), edit), Some(backend)).await;
    let customer = Customer::connect(&daemon.ready().relay_url)
        .await
        .expect("connect");
    daemon
        .pipeline()
        .trust()
        .set(&customer.keys().public_key(), tier, 0)
        .await
        .expect("tier");
    (daemon, customer)
}

/// `POST /v1/chat/completions` ("hi", whole) signed by `keys`.
async fn chat(http: &str, keys: &Keys) -> reqwest::Response {
    let url = format!("{http}/v1/chat/completions");
    let model = harness::served_model(http).await;
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    reqwest::Client::new()
        .post(&url)
        .header(
            "authorization",
            harness::nip98_with_nonce(keys, &url, "post", Some(&body)),
        )
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("chat")
}

/// `GET /v1/account` signed by `keys`.
async fn account_of(http: &str, keys: &Keys) -> Value {
    let url = format!("{http}/v1/account");
    reqwest::Client::new()
        .get(&url)
        .header(
            "authorization",
            harness::nip98_with_nonce(keys, &url, "get", None),
        )
        .send()
        .await
        .expect("account")
        .json()
        .await
        .expect("json")
}

async fn dropped(http: &str, reason: &str) -> u64 {
    let metrics = reqwest::get(format!("{http}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let prefix = format!("dvmd_events_dropped_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

async fn wait_for_dropped(http: &str, reason: &str, count: u64) {
    for _ in 0..100 {
        if dropped(http, reason).await == count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "dropped {reason}: {}, expected {count}",
        dropped(http, reason).await
    );
}

async fn admin(daemon_data: &std::path::Path, http: &str, body: Option<Value>) -> Value {
    let token = std::fs::read_to_string(daemon_data.join(dvmd::identity::ADMIN_TOKEN_FILE))
        .expect("admin token");
    let client = reqwest::Client::new();
    let request = match body {
        Some(body) => client.post(format!("{http}/admin/trust")).json(&body),
        None => client.get(format!("{http}/admin/trust")),
    };
    let response = request
        .bearer_auth(token.trim())
        .send()
        .await
        .expect("admin");
    assert!(response.status().is_success(), "{}", response.status());
    response.json().await.expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paying_promotes_labels_follow_and_a_blocked_npub_is_refused_on_both_doors() {
    let data = harness::data_dir();
    let backend = Arc::new(InstantBackend::new("thanks for paying"));
    let config = harness::dev_config(data.path(), |file| {
        file.trust.known_min_paid_msat = 1;
        file.trust.known_min_jobs = 2;
    });
    let daemon = harness::start(config, Some(backend)).await;
    let ready = daemon.ready().clone();
    let (relay, http, service) = (
        ready.relay_url.clone(),
        ready.http_url.clone(),
        ready.pubkey,
    );
    let mut alice = Customer::connect(&relay).await.expect("connect");
    let npub = alice.keys().public_key();

    let (first, first_result) = paid_job(&mut alice, &http, "one").await;
    harness::wait_for_state(daemon.pipeline().book(), &first, JobState::Settled).await;
    assert_eq!(
        daemon.pipeline().trust().tier(&npub),
        Tier::New,
        "one job: not yet"
    );
    let (second, second_result) = paid_job(&mut alice, &http, "two").await;
    let first_job =
        harness::wait_for_state(daemon.pipeline().book(), &first, JobState::Settled).await;
    let second_job =
        harness::wait_for_state(daemon.pipeline().book(), &second, JobState::Settled).await;
    wait_for_tier(&daemon, &npub, Tier::Known).await;
    wait_for_labels(&relay, &service, &npub, &["known"]).await;
    // Each job's outcome is labelled too, on its result, with its payment hash as evidence.
    let hash = |job: dvmd::job::Job| Some(job.invoice.expect("invoice").payment_hash.to_string());
    let mut expected = vec![
        ("paid".to_owned(), first_result.to_hex(), hash(first_job)),
        ("paid".to_owned(), second_result.to_hex(), hash(second_job)),
    ];
    expected.sort();
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen = job_labels(&relay, &service, &npub);
        if seen.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, expected);

    // Her account says so.
    let account = account_of(&http, alice.keys()).await;
    assert_eq!(account["tier"], "known", "{account}");
    let shown = admin(data.path(), &http, None).await;
    assert_eq!(shown["data"][0]["tier"], "known", "{shown}");
    assert_eq!(shown["data"][0]["settled_jobs"], 2, "{shown}");

    // The operator blocks her: the label is replaced (the old one deleted), her requests are
    // dropped before anything is stored, and the HTTP doors refuse her new jobs.
    let set = admin(
        data.path(),
        &http,
        Some(json!({"npub": npub.to_bech32().expect("npub"), "tier": "blocked"})),
    )
    .await;
    assert_eq!(set["tier"], "blocked", "{set}");
    wait_for_labels(&relay, &service, &npub, &["blocked"]).await;
    let jobs_before = harness::jobs(daemon.pipeline().book().store()).len();
    alice
        .post(customer::text_request(
            "three",
            &[("max_tokens", "4")],
            None,
            None,
        ))
        .await
        .expect("post");
    wait_for_dropped(&http, "blocked", 1).await;
    assert_eq!(
        harness::jobs(daemon.pipeline().book().store()).len(),
        jobs_before,
        "nothing stored"
    );
    let refused = chat(&http, alice.keys()).await;
    assert_eq!(refused.status(), 403);
    let refused: Value = refused.json().await.expect("json");
    assert_eq!(refused["error"]["code"], "blocked", "{refused}");

    // Back to what her history says.
    admin(
        data.path(),
        &http,
        Some(json!({"npub": npub.to_hex(), "tier": "auto"})),
    )
    .await;
    wait_for_labels(&relay, &service, &npub, &["known"]).await;
    alice.shutdown().await;
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_keys_show_proof_of_work_as_announced() {
    const POW: u8 = 12;
    let data = harness::data_dir();
    let backend = Arc::new(InstantBackend::new("worked for it"));
    let config = harness::dev_config(data.path(), |file| file.trust.new_min_pow = POW);
    let daemon = harness::start(config, Some(backend)).await;
    let ready = daemon.ready().clone();
    let (relay, http) = (ready.relay_url.clone(), ready.http_url.clone());

    let announced = harness::nostr_tools_query(
        &relay,
        &json!({"kinds": [31990], "authors": [ready.pubkey.to_hex()]}),
    );
    let tags = &announced.first().expect("announcement")["event"]["tags"];
    assert!(
        tags.as_array()
            .expect("tags")
            .contains(&json!(["pow", POW.to_string()])),
        "{tags}"
    );

    let mut bob = Customer::connect(&relay).await.expect("connect");
    let lazy = loop {
        let event = customer::text_request("no work", &[("max_tokens", "4")], None, None)
            .sign_with_keys(bob.keys())
            .expect("sign");
        if !event.id.check_pow(POW) {
            break event;
        }
    };
    bob.send(&lazy).await.expect("send");
    wait_for_dropped(&http, "no_proof_of_work", 1).await;

    let worked = bob
        .post(customer::text_request("some work", &[("max_tokens", "4")], None, None).pow(POW))
        .await
        .expect("post");
    assert!(worked.id.check_pow(POW));
    let (asked, _) = harness::invoice(&mut bob, &worked.id).await;
    assert!(asked > 0);
    bob.shutdown().await;
    daemon.stop().await;
}

/// 2,000 fresh keys, one request each (each far under its own limit), against a bucket of 50 a
/// minute for all new keys: 50 are served, the rest cost nothing, and a known customer's job
/// in the middle of it completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_fresh_keys_leaves_a_known_customer_served() {
    const FRESH: usize = 2_000;
    const NEW_PER_MINUTE: u32 = 50;
    let data = harness::data_dir();
    let backend = Arc::new(InstantBackend::new("still here"));
    let config = harness::dev_config(data.path(), |file| {
        file.trust.new_requests_per_minute = NEW_PER_MINUTE;
    });
    let daemon = harness::start(config, Some(backend)).await;
    let ready = daemon.ready().clone();
    let (relay, http) = (ready.relay_url.clone(), ready.http_url.clone());
    let mut carol = Customer::connect(&relay).await.expect("connect");
    daemon
        .pipeline()
        .trust()
        .set(&carol.keys().public_key(), Some(Tier::Known), 0)
        .await
        .expect("known");

    let flooder = Customer::connect(&relay).await.expect("connect");
    let flood: Vec<_> = (0..FRESH)
        .map(|i| {
            customer::text_request(&format!("fresh {i}"), &[("max_tokens", "4")], None, None)
                .sign_with_keys(&Keys::generate())
                .expect("sign")
        })
        .collect();
    let started = std::time::Instant::now();
    for event in &flood[..FRESH / 2] {
        flooder.send(event).await.expect("send");
    }
    let (id, _) = paid_job(&mut carol, &http, "mine").await;
    for event in &flood[FRESH / 2..] {
        flooder.send(event).await.expect("send");
    }
    // Every fresh request is either dropped at intake or stored (admitted in a task).
    let store = daemon.pipeline().book().store();
    let carol_account = dvmd::ledger::Account::from(carol.keys().public_key());
    let stored = || {
        harness::jobs(store)
            .iter()
            .filter(|j| j.customer != carol_account)
            .count() as u64
    };
    let mut seen = (0, 0);
    for _ in 0..300 {
        seen = (dropped(&http, "new_keys_busy").await, stored());
        if seen.0 + seen.1 == FRESH as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (refused, admitted) = seen;
    assert_eq!(refused + admitted, FRESH as u64, "{seen:?}");
    // The bucket's burst, and what it refilled (50 a minute) while the flood came in.
    let refilled =
        (started.elapsed().as_secs_f64() * f64::from(NEW_PER_MINUTE) / 60.0).ceil() as u64;
    assert!(
        (u64::from(NEW_PER_MINUTE)..=u64::from(NEW_PER_MINUTE) + refilled).contains(&admitted),
        "only the new keys' bucket was stored and invoiced: {admitted} (refilled {refilled})"
    );
    let jobs = harness::jobs(store);
    assert!(jobs.iter().any(|j| j.id == id.into()));
    flooder.shutdown().await;
    carol.shutdown().await;
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}

/// The service holds at most `max_open_invoices` unpaid invoices, and fresh keys fill only their
/// share of it: a known customer still gets an invoice when they are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_keys_fill_only_their_share_of_the_services_unpaid_invoices() {
    let data = harness::data_dir();
    let backend = Arc::new(InstantBackend::new("unused"));
    let config = harness::dev_config(data.path(), |file| {
        file.service.max_open_invoices = 3;
        file.trust.new_max_open_invoices = 2;
    });
    let daemon = harness::start(config, Some(backend)).await;
    let ready = daemon.ready().clone();
    let ask = |prompt: &str| customer::text_request(prompt, &[("max_tokens", "4")], None, None);
    let mut fresh = Vec::new();
    for i in 0..3 {
        let mut key = Customer::connect(&ready.relay_url).await.expect("connect");
        let request = key.post(ask(&format!("fresh {i}"))).await.expect("post");
        if i < 2 {
            harness::invoice(&mut key, &request.id).await;
        } else {
            let info = harness::error_info(&mut key, &request.id).await;
            assert!(info.contains("too many unpaid invoices"), "{info}");
        }
        fresh.push(key);
    }
    let mut dave = Customer::connect(&ready.relay_url).await.expect("connect");
    daemon
        .pipeline()
        .trust()
        .set(&dave.keys().public_key(), Some(Tier::Known), 0)
        .await
        .expect("known");
    let request = dave.post(ask("known")).await.expect("post");
    harness::invoice(&mut dave, &request.id).await;
    let again = dave.post(ask("known again")).await.expect("post");
    let info = harness::error_info(&mut dave, &again.id).await;
    assert!(
        info.contains("too many unpaid invoices"),
        "the service's cap: {info}"
    );
    for key in fresh {
        key.shutdown().await;
    }
    dave.shutdown().await;
    daemon.stop().await;
}

/// An allowlisted npub's jobs run free on both doors: no invoice, no charge, nothing held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlisted_npubs_run_free_on_both_doors() {
    let data = harness::data_dir();
    let (daemon, mut erin) =
        daemon_with(&data, |_| {}, "on the house", Some(Tier::Allowlisted)).await;
    let ready = daemon.ready().clone();
    let request = erin
        .post(customer::text_request(
            "hello",
            &[("max_tokens", "4")],
            None,
            None,
        ))
        .await
        .expect("post");
    let result = erin
        .wait_for(&request.id, REPLY_TIMEOUT, |r| {
            matches!(
                r,
                Reply::Result(_)
                    | Reply::Feedback {
                        status: Some(dvmd::nip90::JobStatus::PaymentRequired),
                        ..
                    }
            )
        })
        .await
        .expect("answer");
    assert!(matches!(result, Reply::Result(_)), "no invoice: {result:?}");
    let job =
        harness::wait_for_state(daemon.pipeline().book(), &request.id, JobState::Settled).await;
    assert_eq!((job.paid_msat, job.charge_msat), (0, Some(0)));

    // Over HTTP, with no balance at all.
    let answer = chat(&ready.http_url, erin.keys()).await;
    assert_eq!(answer.status(), 200);
    let answer: Value = answer.json().await.expect("json");
    assert_eq!(answer["dvmd"]["receipt"]["charged_msat"], 0, "{answer}");
    erin.shutdown().await;
    daemon.stop().await;
    let totals = harness::ledger_ok(&harness::open_store(data.path()));
    assert_eq!((totals.payment_in_msat, totals.charge_msat), (0, 0));
}

/// The result of `request` and the first `payment-required` after it, as `customer` sees them.
async fn result_then_invoice(
    customer: &mut Customer,
    request: &nostr_sdk::EventId,
) -> (nostr_sdk::Event, String) {
    let first = customer
        .wait_for(request, REPLY_TIMEOUT, |r| {
            matches!(
                r,
                Reply::Result(_)
                    | Reply::Feedback {
                        status: Some(dvmd::nip90::JobStatus::PaymentRequired),
                        ..
                    }
            )
        })
        .await
        .expect("answer");
    let Reply::Result(result) = first else {
        panic!("asked to pay before the result: {first:?}")
    };
    let amount = result
        .tags
        .iter()
        .find(|t| t.as_slice().first().is_some_and(|n| n == "amount"))
        .map(|t| t.as_slice().to_vec())
        .expect("amount tag");
    let bolt11 = amount
        .get(2)
        .cloned()
        .expect("the result carries an invoice");
    let (asked, shown) = harness::invoice(customer, request).await;
    assert_eq!(
        shown, bolt11,
        "payment-required repeats the result's invoice"
    );
    assert_eq!(asked.to_string(), amount[1]);
    (*result, bolt11)
}

async fn owed(daemon: &dvmd::daemon::Daemon, npub: PublicKey) -> u64 {
    let account = dvmd::ledger::Account::from(npub);
    daemon
        .pipeline()
        .book()
        .store()
        .read(move |r| dvmd::ledger::owed(r, &account))
        .await
        .expect("owed")
}

/// A trusted npub's request that names us runs first; the result carries the invoice for its
/// exact usage, the charge is a receivable in the ledger, and paying it clears the debt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_npub_pays_after_and_the_debt_clears() {
    let data = harness::data_dir();
    let (daemon, mut frank) = daemon_with(&data, |_| {}, "now pay me", Some(Tier::Trusted)).await;
    let ready = daemon.ready().clone();
    let npub = frank.keys().public_key();
    let request = frank
        .post(customer::text_request(
            "hello",
            &[("max_tokens", "4")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    let (_, bolt11) = result_then_invoice(&mut frank, &request.id).await;
    // nostr-tools finds the result by its own filter, and its invoice decodes (with
    // @getalby/lightning-tools) to the amount the tag names.
    let found = harness::nostr_tools_query(
        &ready.relay_url,
        &serde_json::json!({"kinds": [6050], "#e": [request.id.to_hex()], "#p": [npub.to_hex()]}),
    );
    assert_eq!(found.len(), 1, "{found:?}");
    let invoice = &found[0]["invoice"];
    assert_eq!(invoice["bolt11_msat"], invoice["msat"], "{invoice}");
    let hash = dvmd::wallet::bolt11::decode(&bolt11)
        .expect("bolt11")
        .payment_hash;
    assert_eq!(invoice["payment_hash"], hash.to_hex());
    let book = daemon.pipeline().book();
    let job = harness::wait_for_state(book, &request.id, JobState::Settled).await;
    let charge = job.charge_msat.expect("charged");
    assert!(charge > 0 && job.pay_after && job.paid_msat == 0, "{job:?}");
    assert_eq!(owed(&daemon, npub).await, charge);
    let account = account_of(&ready.http_url, frank.keys()).await;
    assert_eq!(account["owed_msat"], charge, "{account}");
    assert_eq!(account["tier"], "trusted", "{account}");
    let totals = harness::ledger_ok(book.store());
    assert_eq!(
        (
            totals.receivable_msat,
            totals.charge_msat,
            totals.payment_in_msat
        ),
        (charge, charge, 0)
    );

    harness::dev_pay(&ready.http_url, &bolt11).await;
    for _ in 0..100 {
        if owed(&daemon, npub).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(owed(&daemon, npub).await, 0, "the payment repaid the debt");
    let totals = harness::ledger_ok(book.store());
    assert_eq!(
        (
            totals.receivable_msat,
            totals.payment_in_msat,
            totals.balances_msat
        ),
        (0, charge, 0)
    );
    assert_eq!(
        daemon
            .pipeline()
            .trust()
            .standing(&npub)
            .await
            .expect("standing")
            .owed_since,
        None
    );

    // Over HTTP, with an empty balance: answered, and told what it owes and how to pay it.
    let answer = chat(&ready.http_url, frank.keys()).await;
    assert_eq!(answer.status(), 200);
    let answer: Value = answer.json().await.expect("json");
    let owes = &answer["dvmd"]["pay_after"];
    let owed_msat = owes["owed_msat"].as_u64().expect("owed");
    assert!(owed_msat > 0, "{answer}");
    assert_eq!(answer["dvmd"]["receipt"]["paid_msat"], 0, "{answer}");
    for _ in 0..100 {
        if owed(&daemon, npub).await == owed_msat {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(owed(&daemon, npub).await, owed_msat, "settled as a debt");
    harness::dev_pay(&ready.http_url, owes["bolt11"].as_str().expect("bolt11")).await;
    for _ in 0..100 {
        if owed(&daemon, npub).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(owed(&daemon, npub).await, 0, "paid");
    harness::ledger_ok(book.store());

    // With a balance that covers the quote, the job is paid from it, not run on a debt.
    harness::http_top_up(&daemon, frank.keys(), 50_000).await;
    let covered = frank
        .post(customer::text_request(
            "covered",
            &[("max_tokens", "4")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    frank
        .wait_for(&covered.id, REPLY_TIMEOUT, |r| {
            matches!(r, Reply::Result(_))
        })
        .await
        .expect("result");
    let job = harness::wait_for_state(book, &covered.id, JobState::Settled).await;
    assert!(!job.pay_after && job.credit_msat > 0, "{job:?}");
    assert_eq!(owed(&daemon, npub).await, 0);
    frank.shutdown().await;
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}

/// A debt left unpaid past its deadline makes the npub `new` (labelled so): its next request
/// is invoiced first. A request that does not name us, or one past the credit, never runs
/// before it is paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaid_debt_past_its_deadline_demotes_and_ends_pay_after() {
    let data = harness::data_dir();
    let edit = |file: &mut dvmd::config::FileConfig| {
        file.trust.debt_deadline_secs = 1;
        // Room for one small job's limit, not two.
        file.trust.trusted_credit_msat = 2_000;
        // Trusted by history as soon as there is any (the tier stays the history's, so the
        // debt can demote it; the operator's word would outrank the debt).
        file.trust.known_min_jobs = 0;
        file.trust.known_min_paid_msat = 0;
        file.trust.trusted_min_jobs = 0;
        file.trust.trusted_min_paid_msat = 0;
        file.trust.trusted_min_age_days = 0;
    };
    // No operator's word (`None`), but a standing: history decides.
    let (daemon, mut gina) = daemon_with(&data, edit, "owed", None).await;
    let ready = daemon.ready().clone();
    let (relay, service) = (ready.relay_url.clone(), ready.pubkey);
    let npub = gina.keys().public_key();
    assert_eq!(daemon.pipeline().trust().tier(&npub), Tier::Trusted);
    daemon.pipeline().publish_unlabelled().await;
    wait_for_labels(&relay, &service, &npub, &["trusted"]).await;
    let ask = |prompt: &str, to: Option<PublicKey>| {
        customer::text_request(prompt, &[("max_tokens", "4")], None, to)
    };

    // Untargeted: every service sees it, so it is invoiced even for a trusted npub.
    let open = gina.post(ask("anyone", None)).await.expect("post");
    harness::invoice(&mut gina, &open.id).await;
    // Named: runs first.
    let first = gina.post(ask("first", Some(service))).await.expect("post");
    result_then_invoice(&mut gina, &first.id).await;
    harness::wait_for_state(daemon.pipeline().book(), &first.id, JobState::Settled).await;
    assert!(owed(&daemon, npub).await > 0);
    // The credit has no room for another: invoiced first.
    let full = gina.post(ask("full", Some(service))).await.expect("post");
    harness::invoice(&mut gina, &full.id).await;

    // Past the deadline, unpaid: `new` again, labelled so, and invoiced first.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    daemon.pipeline().publish_unlabelled().await;
    assert_eq!(daemon.pipeline().trust().tier(&npub), Tier::New);
    wait_for_labels(&relay, &service, &npub, &["new"]).await;
    gina.shutdown().await;
    daemon.stop().await;
    let totals = harness::ledger_ok(&harness::open_store(data.path()));
    assert!(
        totals.receivable_msat > 0,
        "the debt is still owed: {totals:?}"
    );
}

/// `dvmd trust set|show`: through the running daemon's admin door, and on the store once it is
/// stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trust_command_goes_through_the_daemon_and_works_on_a_stopped_one() {
    let data = harness::data_dir();
    let daemon = harness::start(
        harness::dev_config(data.path(), |_| {}),
        Some(Arc::new(InstantBackend::new("unused"))),
    )
    .await;
    let npub = Keys::generate().public_key();
    let bech32 = npub.to_bech32().expect("npub");
    let dir = data.path().to_owned();
    let dvmd = move |args: Vec<String>| {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_dvmd"))
                .arg("trust")
                .args(&args)
                .arg("--data-dir")
                .arg(&dir)
                .output()
                .expect("run dvmd");
            assert!(out.status.success(), "{out:?}");
            serde_json::from_slice::<Value>(&out.stdout).expect("json")
        })
    };
    let set = dvmd(vec!["set".into(), bech32.clone(), "blocked".into()])
        .await
        .expect("join");
    assert_eq!(set["tier"], "blocked", "{set}");
    assert_eq!(
        daemon.pipeline().trust().tier(&npub),
        Tier::Blocked,
        "the running daemon took it"
    );
    let shown = dvmd(vec!["show".into()]).await.expect("join");
    assert_eq!(shown["data"][0]["npub"], bech32.as_str(), "{shown}");
    assert_eq!(shown["data"][0]["set_by_operator"], "blocked", "{shown}");
    daemon.stop().await;

    // Stopped: on the store.
    let set = dvmd(vec!["set".into(), npub.to_hex(), "auto".into()])
        .await
        .expect("join");
    assert_eq!(
        (set["tier"].as_str(), set["set_by_operator"].is_null()),
        (Some("new"), true)
    );
    let shown = dvmd(vec!["show".into(), bech32]).await.expect("join");
    assert_eq!(shown["data"][0]["tier"], "new", "{shown}");
    let again = harness::start(
        harness::dev_config(data.path(), |_| {}),
        Some(Arc::new(InstantBackend::new("unused"))),
    )
    .await;
    assert_eq!(again.pipeline().trust().tier(&npub), Tier::New);
    again.stop().await;
}
