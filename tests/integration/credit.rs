//! Credit pays for relay jobs: change from one job spent by the next without an invoice,
//! untargeted requests that keep their hands off it, two jobs racing for one balance, a
//! shortfall invoice for the difference, and a kill -9 between reserve and settle.

use std::sync::Arc;
use std::time::Duration;

use dvmd::customer::{self, Customer, Reply};
use dvmd::daemon::Daemon;
use dvmd::infer::instant::InstantBackend;
use dvmd::job::{Job, JobState};
use dvmd::ledger;
use dvmd::nip90::JobStatus;
use nostr_sdk::{EventId, Keys, PublicKey};

use crate::harness::{self, DaemonProcess, GatedBackend, REPLY_TIMEOUT};

/// The first feedback about `job`: (status, info, amount asked).
async fn first_feedback(
    customer: &mut Customer,
    job: &EventId,
) -> (Option<JobStatus>, String, Option<u64>) {
    match customer
        .wait_for(job, REPLY_TIMEOUT, |r| matches!(r, Reply::Feedback { .. }))
        .await
        .expect("feedback")
    {
        Reply::Feedback {
            status,
            info,
            amount,
            ..
        } => (status, info, amount.map(|a| a.msat)),
        _ => unreachable!(),
    }
}

/// The job's quote, reserved from credit: the first feedback must say so (never an invoice).
async fn paid_from_credit(customer: &mut Customer, job: &EventId) -> u64 {
    let (status, info, amount) = first_feedback(customer, job).await;
    assert_eq!(status, Some(JobStatus::Processing), "{info}");
    assert_eq!(amount, None, "no invoice for a job credit covers");
    info.strip_prefix("paid from credit: ")
        .and_then(|rest| rest.strip_suffix(" msat reserved"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected processing text {info:?}"))
}

async fn live_balance(daemon: &Daemon, account: PublicKey) -> u64 {
    daemon
        .pipeline()
        .book()
        .store()
        .read(move |r| ledger::balance(r, &account.into()))
        .await
        .expect("balance")
}

/// Wait until `account`'s balance is `msat` (a payment is booked shortly after `/dev/pay`).
async fn await_balance(daemon: &Daemon, account: PublicKey, msat: u64) {
    for _ in 0..250 {
        if live_balance(daemon, account).await == msat {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "balance of {account} stayed {} msat, expected {msat}",
        live_balance(daemon, account).await
    );
}

async fn settled(daemon: &Daemon, id: &EventId) -> Job {
    harness::wait_for_state(daemon.pipeline().book(), id, JobState::Settled).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_pays_the_next_job_and_untargeted_requests_leave_it_alone() {
    let data = harness::data_dir();
    let backend = Arc::new(InstantBackend::new("an answer from credit"));
    let daemon = harness::start(harness::dev_config(data.path(), |_| {}), Some(backend)).await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let me = alice.keys().public_key();

    // A first job with a generous max_tokens and a short answer leaves change.
    let first = alice
        .post(customer::text_request(
            "Say hi.",
            &[("max_tokens", "400")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    let (paid, bolt11) = harness::invoice(&mut alice, &first.id).await;
    harness::dev_pay(&ready.http_url, &bolt11).await;
    harness::result(&mut alice, &first.id).await;
    let first = settled(&daemon, &first.id).await;
    let change = paid - first.charge_msat.expect("charged");
    assert!(change > 0);
    await_balance(&daemon, me, change).await;

    // The next targeted job runs on that change: `processing` says so, no invoice.
    let second = alice
        .post(customer::text_request(
            "Say hi again.",
            &[("max_tokens", "8")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    let reserved = paid_from_credit(&mut alice, &second.id).await;
    let result = harness::result(&mut alice, &second.id).await;
    assert_eq!(result.content, "an answer from credit");
    let second = settled(&daemon, &second.id).await;
    assert_eq!(second.quote_msat, Some(reserved));
    assert_eq!((second.paid_msat, second.credit_msat), (0, reserved));
    let charge2 = second.charge_msat.expect("charged");
    assert!(charge2 <= reserved);
    await_balance(&daemon, me, change - charge2).await;
    // What the relay holds about the job, read by an independent client (npm nostr-tools):
    // `processing` and `success`, never a `payment-required`, and no event names the balance.
    let feedback = harness::nostr_tools_query(
        &ready.relay_url,
        &serde_json::json!({"kinds": [7000], "#e": [second.id.to_hex()]}),
    );
    let statuses: Vec<String> = feedback
        .iter()
        .filter_map(|line| {
            line["event"]["tags"].as_array()?.iter().find_map(|tag| {
                (tag[0] == "status").then(|| tag[1].as_str().unwrap_or_default().to_owned())
            })
        })
        .collect();
    assert!(statuses.contains(&"processing".to_owned()), "{statuses:?}");
    assert!(
        !statuses.contains(&"payment-required".to_owned()),
        "{statuses:?}"
    );
    let balance = (change - charge2).to_string();
    for line in &feedback {
        let event = &line["event"];
        // Words and amounts, not ids and signatures (hex may hold any digits).
        let mut said = vec![event["content"].to_string()];
        for tag in event["tags"].as_array().into_iter().flatten() {
            if tag[0] != "e" && tag[0] != "p" {
                said.push(tag.to_string());
            }
        }
        for text in said {
            assert!(!text.contains(&balance), "the balance is published: {text}");
        }
    }

    // An untargeted request goes to every DVM: it is invoiced in full, credit untouched.
    let open = alice
        .post(customer::text_request(
            "Say hi again.",
            &[("max_tokens", "8")],
            None,
            None,
        ))
        .await
        .expect("post");
    let (status, _, amount) = first_feedback(&mut alice, &open.id).await;
    assert_eq!(status, Some(JobStatus::PaymentRequired));
    assert_eq!(amount, Some(reserved), "the whole quote is asked");
    assert_eq!(live_balance(&daemon, me).await, change - charge2);

    // ... unless it asks to pay from credit.
    let asked = alice
        .post(customer::text_request(
            "Say hi again.",
            &[("max_tokens", "8"), ("pay_from_credit", "true")],
            None,
            None,
        ))
        .await
        .expect("post");
    paid_from_credit(&mut alice, &asked.id).await;
    harness::result(&mut alice, &asked.id).await;
    let asked = settled(&daemon, &asked.id).await;
    let charge4 = asked.charge_msat.expect("charged");

    alice.shutdown().await;
    daemon.stop().await;
    let store = harness::open_store(data.path());
    let totals = harness::ledger_ok(&store);
    assert_eq!(totals.payment_in_msat, paid, "one payment in all");
    assert_eq!(totals.held_msat, 0);
    assert_eq!(
        harness::balance(&store, &me),
        paid - first.charge_msat.expect("charged") - charge2 - charge4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_jobs_racing_for_one_balance_and_a_shortfall_invoice() {
    let data = harness::data_dir();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let backend = Arc::new(GatedBackend {
        inner: InstantBackend::new("raced"),
        gate: gate.clone(),
    });
    let daemon = harness::start(harness::dev_config(data.path(), |_| {}), Some(backend)).await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let me = alice.keys().public_key();
    let request = |seed: &str, service: Option<PublicKey>| {
        customer::text_request(
            "Tell me something.",
            &[("max_tokens", "400"), ("seed", seed)],
            None,
            service,
        )
    };

    // The quote, from an untargeted request (which spends no credit).
    let probe = alice.post(request("0", None)).await.expect("post");
    let (quote, _) = harness::invoice(&mut alice, &probe.id).await;
    // Credit for one job and a half, in whole sats (a zap of no particular event).
    let top_up = (quote * 3 / 2).div_ceil(1_000) * 1_000;
    assert!(top_up >= quote && top_up < 2 * quote, "{quote} {top_up}");
    harness::zap_top_up(
        &ready.http_url,
        &ready.relay_url,
        alice.keys(),
        ready.pubkey,
        top_up,
    )
    .await;
    await_balance(&daemon, me, top_up).await;

    // Two targeted jobs at once: the balance covers one, the other reserves what is left.
    let a = alice
        .post(request("1", Some(ready.pubkey)))
        .await
        .expect("post");
    let b = alice
        .post(request("2", Some(ready.pubkey)))
        .await
        .expect("post");
    let mut covered = Vec::new();
    let mut shortfall = None;
    for job in [&a, &b] {
        let (status, info, _) = first_feedback(&mut alice, &job.id).await;
        match status {
            Some(JobStatus::Processing) => {
                assert_eq!(info, format!("paid from credit: {quote} msat reserved"));
                covered.push(job.id);
            }
            Some(JobStatus::PaymentRequired) => shortfall = Some(job.id),
            other => panic!("unexpected {other:?}: {info}"),
        }
    }
    assert_eq!(covered.len(), 1, "exactly one is covered by the balance");
    let short = shortfall.expect("the other asks for the difference");
    let reserved = top_up - quote;
    let (due, bolt11) = {
        // The invoice is in the payment-required we already consumed: read it from the book.
        let job = daemon
            .pipeline()
            .book()
            .get(&short.into())
            .await
            .expect("read")
            .expect("job");
        assert_eq!(job.credit_msat, reserved);
        let invoice = job.invoice.expect("invoice");
        (invoice.amount_msat, invoice.bolt11)
    };
    assert_eq!(
        due,
        quote - reserved,
        "the invoice asks only for the difference"
    );
    harness::dev_pay(&ready.http_url, &bolt11).await;
    gate.add_permits(2);
    for job in [&a, &b] {
        harness::result(&mut alice, &job.id).await;
    }
    let mut charges = 0;
    for id in [a.id, b.id] {
        charges += settled(&daemon, &id).await.charge_msat.expect("charged");
    }

    alice.shutdown().await;
    daemon.stop().await;
    let store = harness::open_store(data.path());
    let totals = harness::ledger_ok(&store);
    assert_eq!(totals.payment_in_msat, top_up + due);
    assert_eq!(totals.held_msat, 0);
    assert_eq!(harness::balance(&store, &me), top_up + due - charges);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_reserve_and_settle_charges_once() {
    let data = harness::data_dir();
    let (relay_port, http_port) = (harness::free_port(), harness::free_port());
    let keys = Keys::generate();
    // Long enough on the real model to be killed mid-run; each request distinct.
    let long = |service: Option<PublicKey>, seed: usize| {
        customer::text_request(
            "Count from one to one thousand in words, separated by commas.",
            &[
                ("max_tokens", "1000"),
                ("temperature", "0"),
                ("seed", &seed.to_string()),
            ],
            None,
            service,
        )
    };

    let first = DaemonProcess::spawn(data.path(), relay_port, http_port, "");
    let service = PublicKey::from_hex(&first.pubkey).expect("pubkey");
    let mut alice = Customer::connect_with(&first.relay_url, keys.clone())
        .await
        .expect("connect");
    let probe = alice.post(long(None, 0)).await.expect("post");
    let (quote, _) = harness::invoice(&mut alice, &probe.id).await;
    let top_up = quote.div_ceil(1_000) * 1_000;
    harness::zap_top_up(&first.http_url, &first.relay_url, &keys, service, top_up).await;
    // Booked once the reconciler or the hint sees it; retry until credit covers the job.
    let mut job = None;
    for seed in 1..50 {
        let request = alice.post(long(Some(service), seed)).await.expect("post");
        let (status, _, _) = first_feedback(&mut alice, &request.id).await;
        if status == Some(JobStatus::Processing) {
            job = Some(request);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let job = job.expect("a job paid from credit");
    // Reserved and running. Past the store's idle flush (500 ms) the reservation is on disk
    // (like any applied write); kill -9 while the model is still generating.
    tokio::time::sleep(Duration::from_millis(800)).await;
    first.kill();
    alice.shutdown().await;

    let second = DaemonProcess::spawn(data.path(), relay_port, http_port, "");
    let mut alice = Customer::connect_with(&second.relay_url, keys.clone())
        .await
        .expect("reconnect");
    harness::result(&mut alice, &job.id).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    second.terminate();
    alice.shutdown().await;

    let store = harness::open_store(data.path());
    let jobs = harness::jobs(&store);
    let ran = jobs.iter().find(|j| j.id == job.id.into()).expect("job");
    assert_eq!(ran.state, JobState::Settled);
    assert_eq!((ran.paid_msat, ran.credit_msat), (0, quote));
    let totals = harness::ledger_ok(&store);
    assert_eq!(totals.payment_in_msat, top_up, "only the top-up came in");
    assert_eq!(totals.held_msat, 0, "nothing left reserved");
    assert_eq!(
        totals.charge_msat,
        ran.charge_msat.expect("charged"),
        "charged once"
    );
    assert_eq!(
        harness::balance(&store, &keys.public_key()),
        top_up - totals.charge_msat
    );
}
