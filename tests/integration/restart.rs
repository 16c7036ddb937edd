//! Kill -9 the daemon binary at the worst moments, one job at a time and under load, on the relay
//! door (paid by invoice, or from credit) and the `/v1/jobs` door: every job completes exactly
//! once, is paid once, and the ledger balances.

use std::collections::HashSet;
use std::time::Duration;

use dvmd::customer::{self, Customer, Reply};
use dvmd::job::JobState;
use dvmd::nip90::JobStatus;
use nostr_sdk::{Event, EventId, JsonUtil, Keys, PublicKey};

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

/// Customers of the kill -9 run under load, and the paid jobs each posts in all.
const CRASH_CUSTOMERS: usize = 20;
const CRASH_JOBS: usize = 10;
/// Kill -9 when the customers have seen this many results in all: the other jobs are then at
/// every step (posted, invoiced, paid, running, delivered, settling).
const KILL_AT_RESULTS: [usize; 4] = [30, 70, 110, 150];
/// One wait longer than this in the last run means a job the restart left behind.
const CRASH_STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// The whole run; reaching it means the daemon stalled.
const CRASH_DEADLINE: Duration = Duration::from_secs(240);

/// One job of the run, as its customer knows it: tracked before it is sent, so a kill never
/// hides a job from the checks.
struct Tracked {
    request: Event,
    /// The distinct result events seen for it.
    results: HashSet<EventId>,
    /// A pay-after job's invoice (its result's `amount` tag), paid once the result is in.
    owed: Option<String>,
}

type Tracks = std::sync::Arc<std::sync::Mutex<Vec<Tracked>>>;

/// Twenty customers post, pay and read paid jobs back to back while the daemon is killed -9
/// four times mid-run and started again on the same store. After each restart every customer
/// asks again about each job it has no result for (a duplicate request gets the stored status),
/// pays what it is asked to (the dev wallet refuses an invoice paid twice), and goes on. In the
/// end every job ran once (the result its customer saw is the one stored), was paid once and
/// charged once, and the ledger balances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_four_times_under_load_every_job_is_delivered_and_paid_once() {
    crash_under_load(Paying::Invoices).await;
}

/// The same with credit: each customer tops up by zap first, so jobs reserve credit, then run
/// out of it mid-way and pay the difference by invoice, across the kills. Nothing reserved is
/// left held, and every balance is its top-up plus its payments less its charges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_four_times_while_spending_credit_nothing_is_overdrawn_or_left_held() {
    crash_under_load(Paying::Credit).await;
}

/// The same for trusted npubs: jobs run before they are paid, each customer pays the invoice
/// its result carries, and in the end (each invoice paid again, which the wallet refuses if it
/// was) nobody owes anything and every repayment was booked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_four_times_while_trusted_npubs_pay_after_every_debt_is_booked_once() {
    crash_under_load(Paying::After).await;
}

/// `dvmd trust set <npub> <tier>` on the daemon running on `data`.
fn trust(data: &std::path::Path, npub: &PublicKey, tier: &str) {
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_dvmd"))
        .args(["trust", "set", &npub.to_hex(), tier, "--config"])
        .arg(data.join("dvmd.toml"))
        .arg("--data-dir")
        .arg(data)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("dvmd trust set");
    assert!(status.success(), "dvmd trust set: {status}");
}

/// Each customer's keys and the pay-after invoices (`owed`) of its jobs.
fn owed_by<T>(
    customers: &[(Keys, std::sync::Arc<std::sync::Mutex<Vec<T>>>)],
    owed: impl Fn(&T) -> Option<String>,
) -> Vec<(Keys, Vec<String>)> {
    customers
        .iter()
        .map(|(keys, tracks)| {
            let tracks = tracks.lock().unwrap_or_else(|e| e.into_inner());
            (keys.clone(), tracks.iter().filter_map(&owed).collect())
        })
        .collect()
}

/// Pay every pay-after invoice a customer saw (again: the wallet refuses one paid before), then
/// wait until no customer owes anything.
async fn repay_everything(http_url: &str, customers: Vec<(Keys, Vec<String>)>) {
    for (keys, owed) in customers {
        for bolt11 in owed {
            try_dev_pay(http_url, &bolt11).await.expect("repay");
        }
        let url = format!("{http_url}/v1/account");
        for attempt in 0.. {
            let header = harness::nip98_with_nonce(&keys, &url, "get", None);
            let (status, account) = http_call(reqwest::Method::GET, &url, header, None)
                .await
                .expect("GET /v1/account");
            assert_eq!(status, 200, "{account}");
            if account["owed_msat"] == 0 {
                break;
            }
            assert!(
                attempt < 500,
                "still owed after every invoice was paid: {account}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The same paying by zaps (NIP-57, through our LNURL callback): every zap receipt goes out,
/// and a zap of a job that a first zap paid before a kill is credited to its sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_four_times_while_customers_zap_every_zap_is_booked_once_and_receipted() {
    crash_under_load(Paying::Zaps).await;
}

/// How the customers of a kill -9 run pay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Paying {
    /// Every job by its own invoice.
    Invoices,
    /// From credit topped up by zap, then invoices for what it does not cover.
    Credit,
    /// Trusted npubs: jobs run first and are paid after (the invoice comes with the result),
    /// within the trusted credit.
    After,
    /// A NIP-57 zap of each `payment-required` feedback (our LNURL callback, then the wallet).
    Zaps,
}

/// Credit a customer tops up with under [`Paying::Credit`]: a few jobs' worth (a job costs
/// about 1.2 sat here).
const CRASH_TOP_UP_MSAT: u64 = 4_000;

async fn crash_under_load(paying: Paying) {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    let stub = dvmd::bench::stub::StubServer::start()
        .await
        .expect("stub server");
    let data = harness::data_dir();
    let (relay_port, http_port) = (harness::free_port(), harness::free_port());
    let config = stub_config(&stub);
    let customers: Vec<(Keys, Tracks)> = (0..CRASH_CUSTOMERS)
        .map(|_| (Keys::generate(), Tracks::default()))
        .collect();
    let seen = Arc::new(AtomicUsize::new(0));
    let started = tokio::time::Instant::now();

    for run in 0..=KILL_AT_RESULTS.len() {
        let daemon = DaemonProcess::spawn(data.path(), relay_port, http_port, &config);
        if run == 0 && paying == Paying::Credit {
            for (keys, _) in &customers {
                let (http, relay) = (&daemon.http_url, &daemon.relay_url);
                harness::zap_top_up(http, relay, keys, service(&daemon), CRASH_TOP_UP_MSAT).await;
            }
        }
        if run == 0 && paying == Paying::After {
            for (keys, _) in &customers {
                trust(data.path(), &keys.public_key(), "trusted");
            }
        }
        let stop = CancellationToken::new();
        let tasks: Vec<_> = customers
            .iter()
            .map(|(keys, tracks)| {
                tokio::spawn(crash_customer(
                    CrashCustomer {
                        relay_url: daemon.relay_url.clone(),
                        http_url: daemon.http_url.clone(),
                        keys: keys.clone(),
                        service: service(&daemon),
                        paying,
                    },
                    tracks.clone(),
                    seen.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        let dump = || crash_dump(&customers);
        let Some(&kill_at) = KILL_AT_RESULTS.get(run) else {
            // The last run: everything finishes.
            finish(tasks, started + CRASH_DEADLINE, dump).await;
            if paying == Paying::After {
                let owed = owed_by(&customers, |t| t.owed.clone());
                repay_everything(&daemon.http_url, owed).await;
            }
            daemon.terminate();
            break;
        };
        let deadline = started + CRASH_DEADLINE;
        kill_when(daemon, &seen, kill_at, deadline, dump, stop, tasks).await;
    }
    if paying == Paying::Zaps {
        // One more start publishes any receipt still owed (one in flight at the last stop).
        let daemon = DaemonProcess::spawn(data.path(), relay_port, http_port, &config);
        tokio::time::sleep(Duration::from_millis(500)).await;
        daemon.terminate();
    }
    stub.stop().await;

    let store = harness::open_store(data.path());
    let stored: std::collections::HashMap<EventId, dvmd::job::Job> = harness::jobs(&store)
        .into_iter()
        .map(|job| (job.id.as_event_id(), job))
        .collect();
    let tracked: Vec<(EventId, HashSet<EventId>)> = customers
        .iter()
        .flat_map(|(_, tracks)| {
            let tracks = tracks.lock().unwrap_or_else(|e| e.into_inner());
            tracks
                .iter()
                .map(|t| (t.request.id, t.results.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(tracked.len(), CRASH_CUSTOMERS * CRASH_JOBS);
    assert_eq!(stored.len(), tracked.len(), "one stored job per request");
    let mut accounts: std::collections::HashMap<PublicKey, (u64, u64)> = Default::default();
    for (request, results) in &tracked {
        let job = stored.get(request).expect("every request stored");
        assert_eq!(job.state, JobState::Settled, "job {request}: {job:?}");
        let result = job
            .result_event
            .as_deref()
            .map(|json| Event::from_json(json).expect("stored result").id);
        assert_eq!(
            results.iter().copied().collect::<Vec<_>>(),
            result.into_iter().collect::<Vec<_>>(),
            "job {request}: the customer saw exactly the one result stored"
        );
        let quote = job.quote_msat.expect("quoted");
        let charge = job.charge_msat.expect("charged");
        let invoiced = job
            .invoice
            .as_ref()
            .map_or(0, |invoice| invoice.amount_msat);
        let account = accounts
            .entry(job.customer.npub().expect("a relay customer"))
            .or_default();
        if job.pay_after {
            // Run first: its invoice is for exactly its charge, and the payment went to the
            // account (repaying the debt), not to the job.
            assert_eq!(paying, Paying::After);
            assert_eq!(
                (job.paid_msat, invoiced),
                (0, charge),
                "job {request}: {job:?}"
            );
            account.0 += charge;
        } else {
            // Paid once: its invoice (for what credit did not cover), not twice, not another.
            assert_eq!(job.paid_msat, invoiced, "job {request}: {job:?}");
            if invoiced > 0 {
                assert_eq!(job.funds_msat(), quote, "job {request}: {job:?}");
            } else {
                // From credit alone: up to its limit, what it does not use released.
                assert!(job.credit_msat >= quote && job.credit_msat <= job.limit_msat());
            }
            account.0 += job.paid_msat;
        }
        assert_eq!(job.held_msat, 0, "job {request} holds nothing once settled");
        assert!(charge > 0 && charge <= quote);
        account.1 += charge;
    }
    let totals = harness::ledger_ok(&store);
    let repaid: u64 = stored
        .values()
        .filter(|j| j.pay_after)
        .filter_map(|j| j.charge_msat)
        .sum();
    let paid = stored.values().map(|j| j.paid_msat).sum::<u64>() + repaid;
    let charged: u64 = stored.values().filter_map(|j| j.charge_msat).sum();
    let top_ups = match paying {
        Paying::Invoices | Paying::After | Paying::Zaps => 0,
        Paying::Credit => CRASH_TOP_UP_MSAT,
    };
    // Beyond the jobs' payments and the top-ups: only zaps, of a job a first zap paid before a
    // kill (its booking came after the restart), which are credited to their sender.
    let extra = totals
        .payment_in_msat
        .checked_sub(paid + top_ups * CRASH_CUSTOMERS as u64)
        .expect("every job's payment booked");
    if paying != Paying::Zaps {
        assert_eq!(extra, 0, "every payment booked once");
    }
    assert_eq!(totals.charge_msat, charged, "every job charged once");
    assert_eq!(totals.held_msat, 0);
    assert_eq!(totals.receivable_msat, 0, "every debt repaid, once");
    let mut credited = 0;
    for (customer, (paid, charged)) in accounts {
        let balance = harness::balance(&store, &customer);
        let expected = top_ups + paid - charged;
        assert!(
            balance >= expected,
            "{customer}: {balance} < top-up + payments - charges"
        );
        credited += balance - expected;
    }
    assert_eq!(
        credited, extra,
        "a late zap is credited to its sender, not lost"
    );
    if paying == Paying::Zaps {
        let owed = store
            .read(|r| {
                let owed = r.keys_with_prefix_rev(dvmd::store::Tree::Meta, b"zap_receipt:");
                Ok::<_, dvmd::store::StoreError>(owed.count())
            })
            .await
            .expect("read");
        assert_eq!(owed, 0, "every zap's receipt went out");
    }
    if paying == Paying::After {
        let after = stored.values().filter(|j| j.pay_after).count();
        assert!(after > 0, "no job ran before it was paid");
    }
    if paying == Paying::Credit {
        let from_credit = stored.values().filter(|j| j.credit_msat > 0).count();
        let invoiced = stored.values().filter(|j| j.paid_msat > 0).count();
        assert!(
            from_credit > 0 && invoiced > 0,
            "{from_credit} jobs spent credit, {invoiced} paid an invoice"
        );
    }
}

/// Who a customer of the kill -9 run is, and where it finds the daemon this time.
struct CrashCustomer {
    relay_url: String,
    http_url: String,
    keys: Keys,
    service: PublicKey,
    paying: Paying,
}

/// One customer of the kill -9 run, until its jobs are done or `stop`: first the jobs it has no
/// result for (sent again), then new ones. Returns why it stopped short, if it did.
async fn crash_customer(
    who: CrashCustomer,
    tracks: Tracks,
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let mut customer = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        connected = Customer::connect_with(&who.relay_url, who.keys.clone()) => {
            connected.map_err(|e| format!("connect: {e}"))?
        }
    };
    let work = async {
        loop {
            let unfinished = tracks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .position(|t| t.results.is_empty());
            let (index, request) = match unfinished {
                Some(index) => {
                    let request = tracks.lock().unwrap_or_else(|e| e.into_inner())[index]
                        .request
                        .clone();
                    (index, request)
                }
                None => {
                    let mut tracks = tracks.lock().unwrap_or_else(|e| e.into_inner());
                    if tracks.len() == CRASH_JOBS {
                        return Ok(());
                    }
                    let params: &[(&str, &str)] = match who.paying {
                        // Every job by its own invoice: the change of one never pays the next.
                        Paying::Invoices | Paying::Zaps => {
                            &[("max_tokens", "16"), ("pay_from_credit", "false")]
                        }
                        Paying::Credit | Paying::After => &[("max_tokens", "16")],
                    };
                    let request = dvmd::signatures::sign(
                        customer::text_request(
                            &format!("crash job {}: say hello", tracks.len()),
                            params,
                            Some(1_000_000),
                            Some(who.service),
                        ),
                        &who.keys,
                    );
                    tracks.push(Tracked {
                        request: request.clone(),
                        results: HashSet::new(),
                        owed: None,
                    });
                    (tracks.len() - 1, request)
                }
            };
            let (result, owed) = follow_paid_job(&mut customer, &who, &request).await?;
            {
                let mut tracks = tracks.lock().unwrap_or_else(|e| e.into_inner());
                tracks[index].results.insert(result);
                tracks[index].owed = owed.clone();
            }
            if let Some(owed) = owed {
                // Run first, paid after: its invoice came with the result.
                try_dev_pay(&who.http_url, &owed).await?;
            }
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    };
    let outcome = tokio::select! {
        _ = stop.cancelled() => Ok(()),
        outcome = work => outcome,
    };
    customer.shutdown().await;
    outcome
}

/// Send `request` (again, after a restart) and see it through: pay each invoice it is asked
/// to (one already paid is refused by the wallet, and the daemon books the first payment), or
/// zap the `payment-required` feedback, until its result comes. Returns the result's id, and
/// the invoice its `amount` tag carries (a pay-after job's).
async fn follow_paid_job(
    customer: &mut Customer,
    who: &CrashCustomer,
    request: &Event,
) -> Result<(EventId, Option<String>), String> {
    let http_url = &who.http_url;
    customer
        .send(request)
        .await
        .map_err(|e| format!("send {}: {e}", request.id))?;
    loop {
        let reply = customer
            .wait_for(&request.id, CRASH_STEP_TIMEOUT, |r| {
                matches!(
                    r,
                    Reply::Result(_)
                        | Reply::Feedback {
                            status: Some(JobStatus::PaymentRequired | JobStatus::Error),
                            ..
                        }
                )
            })
            .await
            .map_err(|e| format!("job {}: {e}", request.id))?;
        match reply {
            Reply::Result(result) => {
                let owed = result.tags.iter().find_map(|tag| match tag.as_slice() {
                    [name, _, bolt11, ..] if name == "amount" => Some(bolt11.clone()),
                    _ => None,
                });
                return Ok((result.id, owed));
            }
            Reply::Feedback {
                status: Some(JobStatus::PaymentRequired),
                amount: Some(amount),
                event,
                ..
            } if who.paying == Paying::Zaps => {
                // A zap of the feedback, for the quote. A second zap for a job paid meanwhile
                // (its first zap booked after a kill) is refused, or credited if it was paid.
                let zap = harness::zap_request(
                    &who.keys,
                    who.service,
                    Some(event.id),
                    amount.msat,
                    &who.relay_url,
                );
                let url = format!("{http_url}/lnurlp/dvmd/callback");
                let answer = reqwest::Client::new()
                    .get(url)
                    .query(&[("amount", amount.msat.to_string()), ("nostr", zap)])
                    .send()
                    .await
                    .map_err(|e| format!("LNURL callback: {e}"))?;
                if answer.status().is_server_error() {
                    return Err(format!("LNURL callback answered {}", answer.status()));
                }
                let body: serde_json::Value = answer.json().await.unwrap_or_default();
                if let Some(pr) = body["pr"].as_str() {
                    try_dev_pay(http_url, pr).await?;
                }
            }
            Reply::Feedback {
                status: Some(JobStatus::PaymentRequired),
                amount: Some(amount),
                ..
            } => {
                let bolt11 = amount.bolt11.ok_or("payment-required without an invoice")?;
                try_dev_pay(http_url, &bolt11).await?;
            }
            other => return Err(format!("job {}: {other:?}", request.id)),
        }
    }
}

/// The config of a kill -9 run's daemon: 8 workers on the OpenAI-compatible stub (answers at
/// once), and room for many new keys at once.
fn stub_config(stub: &dvmd::bench::stub::StubServer) -> String {
    format!(
        "[service]\nworkers = 8\n[trust]\nnew_requests_per_minute = 100000\n[infer]\nbackend = \"openai\"\n[infer.openai]\nbase_url = \"{}\"\nmodel = \"stub\"\n",
        stub.base_url()
    )
}

/// The customers of a kill -9 run's last run: all finish by `deadline`, or the test fails with
/// `dump`.
async fn finish(
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
    deadline: tokio::time::Instant,
    dump: impl Fn() -> String,
) {
    let all = futures::future::join_all(tasks);
    let outcomes = tokio::time::timeout_at(deadline, all)
        .await
        .unwrap_or_else(|_| panic!("the run stalled: {}", dump()));
    for outcome in outcomes {
        if let Err(why) = outcome.expect("customer task") {
            panic!("{why}\n{}", dump());
        }
    }
}

/// Kill -9 `daemon` once `progress` reaches `at` (by `deadline`, or the test fails with
/// `dump`), then stop its customers: their errors are expected, the daemon died under them.
async fn kill_when(
    daemon: DaemonProcess,
    progress: &std::sync::atomic::AtomicUsize,
    at: usize,
    deadline: tokio::time::Instant,
    dump: impl Fn() -> String,
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
) {
    while progress.load(std::sync::atomic::Ordering::Relaxed) < at {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress to {at}: {}",
            dump()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    daemon.kill();
    stop.cancel();
    for task in tasks {
        let _ = task.await.expect("customer task");
    }
}

/// Pay `bolt11` through `/dev/pay`. A 4xx is an invoice paid before (before a kill, or one
/// asked for again): the wallet refuses it, and the first payment is what gets booked.
async fn try_dev_pay(http_url: &str, bolt11: &str) -> Result<(), String> {
    let paid = reqwest::Client::new()
        .post(format!("{http_url}/dev/pay"))
        .json(&serde_json::json!({ "bolt11": bolt11 }))
        .send()
        .await
        .map_err(|e| format!("/dev/pay: {e}"))?;
    if paid.status().is_server_error() {
        return Err(format!("/dev/pay answered {}", paid.status()));
    }
    Ok(())
}

/// What the customers saw, for a failure.
fn crash_dump(customers: &[(Keys, Tracks)]) -> String {
    let (mut done, mut open) = (0, Vec::new());
    for (_, tracks) in customers {
        for t in tracks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if t.results.is_empty() {
                open.push(t.request.id.to_hex());
            } else {
                done += 1;
            }
        }
    }
    format!("{done} jobs with a result; without one: {open:?}")
}

/// Customers of the kill -9 run on the `/v1/jobs` door, and the jobs each completes.
const HTTP_CRASH_CUSTOMERS: usize = 10;
const HTTP_CRASH_JOBS: usize = 10;
/// Kill -9 when this many jobs have settled in all.
const HTTP_KILL_AT_SETTLED: [usize; 3] = [15, 40, 65];
/// Each HTTP customer's credit (a job reserves about 1.2 sat here, up to its limit).
const HTTP_CRASH_TOP_UP_MSAT: u64 = 100_000;

/// A signed `/v1/jobs` call and what became of it.
struct HttpTracked {
    /// The NIP-98 auth event's id: the job's id, known before the call is sent.
    id: EventId,
    /// `Some(true)` settled, `Some(false)` never stored (its call died with the daemon).
    settled: Option<bool>,
    /// A pay-after job's invoice (`pay_after.bolt11` of the settled job), paid when seen.
    owed: Option<String>,
}

/// The `/v1/jobs` door under kill -9: ten npubs with credit create jobs back to back (each
/// polled with `GET /v1/jobs/{id}` until it settles) while the daemon is killed three times.
/// A call whose answer died with the daemon is looked up by its job id, which is its auth
/// event's (known before the call is sent): stored, it is polled on; never stored, a new call
/// is signed. In the end every stored job is one the customers signed, settled once, nothing
/// is held, and every balance is its top-up less its charges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_jobs_killed_three_times_under_load_settle_once_and_are_found_by_their_signature() {
    http_jobs_under_kills(false).await;
}

/// The same for trusted npubs with no balance: each `/v1/jobs` job runs first, its settled view
/// names the invoice for what it owes, and the customer pays it. In the end (each invoice paid
/// again, which the wallet refuses if it was) nobody owes anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_pay_after_jobs_killed_three_times_under_load_are_owed_and_repaid_once() {
    http_jobs_under_kills(true).await;
}

async fn http_jobs_under_kills(pay_after: bool) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use tokio_util::sync::CancellationToken;

    let stub = dvmd::bench::stub::StubServer::start()
        .await
        .expect("stub server");
    let data = harness::data_dir();
    let (relay_port, http_port) = (harness::free_port(), harness::free_port());
    let config = stub_config(&stub);
    let customers: Vec<(Keys, Arc<Mutex<Vec<HttpTracked>>>)> = (0..HTTP_CRASH_CUSTOMERS)
        .map(|_| (Keys::generate(), Arc::default()))
        .collect();
    let settled = Arc::new(AtomicUsize::new(0));
    let started = tokio::time::Instant::now();

    for run in 0..=HTTP_KILL_AT_SETTLED.len() {
        let daemon = DaemonProcess::spawn(data.path(), relay_port, http_port, &config);
        if run == 0 {
            for (keys, _) in &customers {
                if pay_after {
                    trust(data.path(), &keys.public_key(), "trusted");
                } else {
                    let (http, relay) = (&daemon.http_url, &daemon.relay_url);
                    let service = service(&daemon);
                    harness::zap_top_up(http, relay, keys, service, HTTP_CRASH_TOP_UP_MSAT).await;
                }
            }
        }
        let stop = CancellationToken::new();
        let tasks: Vec<_> = customers
            .iter()
            .map(|(keys, tracks)| {
                let (http, keys, tracks) = (daemon.http_url.clone(), keys.clone(), tracks.clone());
                let (settled, stop) = (settled.clone(), stop.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => Ok(()),
                        done = http_crash_customer(&http, &keys, &tracks, &settled) => done,
                    }
                })
            })
            .collect();
        let dump = || format!("{} jobs settled", settled.load(Ordering::Relaxed));
        let Some(&kill_at) = HTTP_KILL_AT_SETTLED.get(run) else {
            finish(tasks, started + CRASH_DEADLINE, dump).await;
            if pay_after {
                let owed = owed_by(&customers, |t| t.owed.clone());
                repay_everything(&daemon.http_url, owed).await;
            }
            daemon.terminate();
            break;
        };
        let deadline = started + CRASH_DEADLINE;
        kill_when(daemon, &settled, kill_at, deadline, dump, stop, tasks).await;
    }
    stub.stop().await;

    let store = harness::open_store(data.path());
    let stored: std::collections::HashMap<EventId, dvmd::job::Job> = harness::jobs(&store)
        .into_iter()
        .filter(|job| job.door.is_http())
        .map(|job| (job.id.as_event_id(), job))
        .collect();
    let mut balances: std::collections::HashMap<PublicKey, u64> = Default::default();
    let mut signed = 0;
    for (keys, tracks) in &customers {
        let tracks = tracks.lock().unwrap_or_else(|e| e.into_inner());
        let done = tracks.iter().filter(|t| t.settled == Some(true)).count();
        assert_eq!(done, HTTP_CRASH_JOBS);
        signed += tracks.len();
        let (mut charged, mut repaid) = (0, 0);
        for t in tracks.iter() {
            match (t.settled, stored.get(&t.id)) {
                (Some(true), Some(job)) => {
                    assert_eq!(job.state, JobState::Settled, "{job:?}");
                    assert_eq!(job.held_msat, 0);
                    let charge = job.charge_msat.expect("charged");
                    assert!(charge > 0);
                    assert_eq!(job.pay_after, pay_after, "{job:?}");
                    if job.pay_after {
                        // Nothing reserved; the payment of its invoice repaid the charge.
                        assert_eq!(job.funds_msat(), 0, "{job:?}");
                        repaid += charge;
                    } else {
                        assert!(charge <= job.funds_msat());
                    }
                    charged += charge;
                }
                (Some(false), None) => {}
                (what, job) => panic!("job {}: customer saw {what:?}, stored {job:?}", t.id),
            }
        }
        let top_up = if pay_after { 0 } else { HTTP_CRASH_TOP_UP_MSAT };
        balances.insert(keys.public_key(), top_up + repaid - charged);
    }
    assert!(
        stored.len() <= signed,
        "every stored job is one a customer signed"
    );
    let totals = harness::ledger_ok(&store);
    assert_eq!(totals.held_msat, 0);
    assert_eq!(totals.receivable_msat, 0, "every debt repaid, once");
    for (customer, balance) in balances {
        assert_eq!(harness::balance(&store, &customer), balance, "{customer}");
    }
}

/// One `/v1/jobs` customer: first what it does not know the end of (looked up by id), then new
/// jobs, until `HTTP_CRASH_JOBS` have settled.
async fn http_crash_customer(
    http: &str,
    keys: &Keys,
    tracks: &std::sync::Mutex<Vec<HttpTracked>>,
    settled: &std::sync::atomic::AtomicUsize,
) -> Result<(), String> {
    let url = format!("{http}/v1/jobs");
    let body = job_request();
    loop {
        let open = tracks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .position(|t| t.settled.is_none());
        let index = match open {
            Some(index) => index,
            None => {
                let header = harness::nip98_with_nonce(keys, &url, "post", Some(&body));
                let index = {
                    let mut tracks = tracks.lock().unwrap_or_else(|e| e.into_inner());
                    let done = tracks.iter().filter(|t| t.settled == Some(true)).count();
                    if done == HTTP_CRASH_JOBS {
                        return Ok(());
                    }
                    tracks.push(HttpTracked {
                        id: auth_event_id(&header),
                        settled: None,
                        owed: None,
                    });
                    tracks.len() - 1
                };
                let created = http_call(reqwest::Method::POST, &url, header, Some(&body)).await?;
                if created.0 != 202 {
                    return Err(format!(
                        "POST /v1/jobs answered {}: {}",
                        created.0, created.1
                    ));
                }
                index
            }
        };
        let id = tracks.lock().unwrap_or_else(|e| e.into_inner())[index].id;
        // Poll it (the first look after a restart also says whether it was ever stored).
        let job_url = format!("{url}/{id}");
        let sign = || harness::nip98_with_nonce(keys, &job_url, "get", None);
        let end = match poll_job(&job_url, sign).await? {
            None => false,
            Some(shown) => {
                if let Some(bolt11) = shown["pay_after"]["bolt11"].as_str() {
                    // Run first: pay what it owes now.
                    tracks.lock().unwrap_or_else(|e| e.into_inner())[index].owed =
                        Some(bolt11.to_owned());
                    try_dev_pay(http, bolt11).await?;
                }
                true
            }
        };
        tracks.lock().unwrap_or_else(|e| e.into_inner())[index].settled = Some(end);
        if end {
            settled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The `/v1/jobs` request every HTTP customer of these runs sends.
fn job_request() -> String {
    serde_json::json!({
        "kind": 5050,
        "inputs": [{ "value": "Say hello." }],
        "params": { "max_tokens": 16 },
    })
    .to_string()
}

/// Poll `GET job_url` (with the `Authorization` value `auth` makes) until the job settles:
/// `Some(shown)`, or `None` when it was never stored (404). A failed job, or any other answer,
/// is an error (a failed job's starts with "job ").
async fn poll_job(
    job_url: &str,
    auth: impl Fn() -> String,
) -> Result<Option<serde_json::Value>, String> {
    loop {
        let (status, shown) = http_call(reqwest::Method::GET, job_url, auth(), None).await?;
        match (status, shown["state"].as_str()) {
            (404, _) => return Ok(None),
            (200, Some("settled")) => return Ok(Some(shown)),
            (200, Some("failed")) => return Err(format!("job {job_url} failed: {shown}")),
            (200, _) => tokio::time::sleep(Duration::from_millis(5)).await,
            _ => return Err(format!("GET {job_url}: {status} {shown}")),
        }
    }
}

/// The id of the NIP-98 event in an `Authorization: Nostr <base64>` value.
fn auth_event_id(header: &str) -> EventId {
    use base64::Engine;
    let json = base64::engine::general_purpose::STANDARD
        .decode(header.trim_start_matches("Nostr "))
        .expect("base64");
    Event::from_json(json).expect("auth event").id
}

/// One HTTP call: (status, JSON body); an error when the daemon is not there.
async fn http_call(
    method: reqwest::Method,
    url: &str,
    header: String,
    body: Option<&str>,
) -> Result<(u16, serde_json::Value), String> {
    let mut request = reqwest::Client::new()
        .request(method, url)
        .header("Authorization", header);
    if let Some(body) = body {
        request = request
            .header("Content-Type", "application/json")
            .body(body.to_owned());
    }
    let response = request.send().await.map_err(|e| format!("{url}: {e}"))?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or_default()))
}

/// One call paid by an HTTP `Payment` `charge` credential, as its customer tracks it.
struct PaidCall {
    /// Its `Idempotency-Key`.
    key: String,
    /// The 402's invoice, payment hash and amount.
    bolt11: String,
    hash: dvmd::wallet::PaymentHash,
    amount_msat: u64,
    /// The challenge's parameters (what the credential echoes).
    challenge: std::collections::HashMap<String, String>,
    /// The credential, once the invoice is paid; `None` with `lost` when the answer of the
    /// payment died with the daemon (the preimage never reached the customer).
    credential: Option<String>,
    lost: bool,
    /// Settled, as `GET /v1/jobs/{id}` showed it.
    settled: bool,
}

impl PaidCall {
    /// The job its credential and key open: the account is the payment hash's.
    fn job(&self) -> EventId {
        let account = dvmd::ledger::Account::Token(self.hash);
        dvmd::job::JobId::idempotent(&account.key(), &self.key).as_event_id()
    }

    fn done(&self) -> bool {
        self.settled || self.lost
    }
}

const PAID_CRASH_CUSTOMERS: usize = 10;
const PAID_CRASH_JOBS: usize = 8;
const PAID_KILL_AT_SETTLED: [usize; 3] = [10, 30, 50];
/// Credentials sent again that found the job they opened before a kill (409).
static FOUND_AGAIN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Answers a paying customer did not expect (not a daemon that went away), for the dump.
static UNEXPECTED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// `why`, noted in [`UNEXPECTED`] (a customer task's error is dropped when its daemon is
/// killed under it).
fn unexpected(why: String) -> String {
    UNEXPECTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(why.clone());
    why
}

/// The `/v1/jobs` door paid call by call with HTTP `Payment` `charge` credentials, under kill
/// -9: ten customers each get a 402, pay its invoice through the dev wallet and send the
/// credential with an `Idempotency-Key`, then poll the job, while the daemon is killed three
/// times. A call whose answer died is sent again, the same credential with the same key: it
/// opens the job if the first did not (its challenge still unused), or gets 409 naming it. In
/// the end every paid credential ran exactly one job, settled once, and what the job did not
/// cost is on the payment hash's account; a payment whose answer died before the customer saw
/// the preimage ran nothing and its whole amount is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_credentials_under_kills_each_pay_for_one_job_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use tokio_util::sync::CancellationToken;

    let stub = dvmd::bench::stub::StubServer::start()
        .await
        .expect("stub server");
    let data = harness::data_dir();
    let (relay_port, http_port) = (harness::free_port(), harness::free_port());
    let config = format!(
        "{}[http]\nmax_challenges_per_minute = 100000\nmax_challenges_per_ip_per_minute = 100000\n",
        stub_config(&stub)
    );
    let customers: Vec<Arc<Mutex<Vec<PaidCall>>>> =
        (0..PAID_CRASH_CUSTOMERS).map(|_| Arc::default()).collect();
    let settled = Arc::new(AtomicUsize::new(0));
    let started = tokio::time::Instant::now();
    for run in 0..=PAID_KILL_AT_SETTLED.len() {
        let daemon = DaemonProcess::spawn(data.path(), relay_port, http_port, &config);
        let stop = CancellationToken::new();
        let tasks: Vec<_> = customers
            .iter()
            .map(|calls| {
                let (http, calls) = (daemon.http_url.clone(), calls.clone());
                let (settled, stop) = (settled.clone(), stop.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => Ok(()),
                        done = paying_customer(&http, &calls, &settled) => done,
                    }
                })
            })
            .collect();
        let dump = || {
            let odd = UNEXPECTED.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let settled = settled.load(Ordering::Relaxed);
            format!("{settled} jobs settled; unexpected answers: {odd:?}")
        };
        let Some(&kill_at) = PAID_KILL_AT_SETTLED.get(run) else {
            finish(tasks, started + CRASH_DEADLINE, dump).await;
            daemon.terminate();
            break;
        };
        kill_when(
            daemon,
            &settled,
            kill_at,
            started + CRASH_DEADLINE,
            dump,
            stop,
            tasks,
        )
        .await;
    }
    stub.stop().await;

    let store = harness::open_store(data.path());
    let stored: std::collections::HashMap<EventId, dvmd::job::Job> = harness::jobs(&store)
        .into_iter()
        .map(|job| (job.id.as_event_id(), job))
        .collect();
    let (mut ran, mut lost) = (0, 0);
    for calls in &customers {
        for call in calls.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let account = dvmd::ledger::Account::Token(call.hash);
            let left = harness::account_balance(&store, &account);
            let jobs: Vec<_> = stored.values().filter(|j| j.customer == account).collect();
            if call.lost {
                assert!(jobs.is_empty(), "a payment nobody presented ran {jobs:?}");
                assert_eq!(left, call.amount_msat, "all of it kept for its payer");
                lost += 1;
                continue;
            }
            assert!(call.settled, "every presented credential ends settled");
            assert_eq!(jobs.len(), 1, "one job a payment: {jobs:?}");
            let job = jobs[0];
            assert_eq!(job.id.as_event_id(), call.job(), "named by its key");
            assert_eq!(
                (job.state, job.held_msat),
                (JobState::Settled, 0),
                "{job:?}"
            );
            let charge = job.charge_msat.expect("charged");
            assert!(charge > 0 && charge <= call.amount_msat, "{job:?}");
            assert_eq!(
                left,
                call.amount_msat - charge,
                "the change stays on its account"
            );
            ran += 1;
        }
    }
    assert_eq!(ran, PAID_CRASH_CUSTOMERS * PAID_CRASH_JOBS);
    assert_eq!(stored.len(), ran, "no job beside the paid ones");
    let totals = harness::ledger_ok(&store);
    assert_eq!(totals.held_msat, 0);
    let odd = UNEXPECTED.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(odd.is_empty(), "unexpected answers: {odd:?}");
    let again = FOUND_AGAIN.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{ran} paid calls ran once each ({again} sent again found their job); {lost} payments whose answer died kept whole");
}

/// One `Payment` customer: finish the call it has open (challenge, payment, credential, poll),
/// then start new ones, until `PAID_CRASH_JOBS` have settled.
async fn paying_customer(
    http: &str,
    calls: &std::sync::Mutex<Vec<PaidCall>>,
    settled: &std::sync::atomic::AtomicUsize,
) -> Result<(), String> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let url = format!("{http}/v1/jobs");
    let body = job_request();
    let lock = || calls.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let open = lock().iter().position(|call| !call.done());
        let index = match open {
            Some(index) => index,
            None if lock().iter().filter(|c| c.settled).count() == PAID_CRASH_JOBS => return Ok(()),
            None => {
                let response = reqwest::Client::new()
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .map_err(|e| format!("{url}: {e}"))?;
                if response.status() != 402 {
                    let status = response.status();
                    return Err(unexpected(format!("a call with no credential: {status}")));
                }
                let header = response
                    .headers()
                    .get_all("www-authenticate")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find(|v| v.starts_with("Payment "))
                    .map(str::to_owned)
                    .ok_or("no Payment challenge")?;
                let offer: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
                let hash = offer["l402"]["payment_hash"].as_str().unwrap_or_default();
                let hash = dvmd::wallet::PaymentHash::from_hex(hash).map_err(|e| e.to_string())?;
                let mut calls = lock();
                let n = calls.len();
                calls.push(PaidCall {
                    key: format!("call-{n}"),
                    bolt11: offer["l402"]["invoice"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    hash,
                    amount_msat: offer["l402"]["amount_msat"].as_u64().unwrap_or_default(),
                    challenge: harness::payment_auth_params(&header),
                    credential: None,
                    lost: false,
                    settled: false,
                });
                calls.len() - 1
            }
        };
        let (bolt11, credential, key, job) = {
            let calls = lock();
            let call = &calls[index];
            (
                call.bolt11.clone(),
                call.credential.clone(),
                call.key.clone(),
                call.job(),
            )
        };
        let credential = match credential {
            Some(credential) => credential,
            None => {
                let paid = reqwest::Client::new()
                    .post(format!("{http}/dev/pay"))
                    .json(&serde_json::json!({ "bolt11": bolt11 }))
                    .send()
                    .await
                    .map_err(|e| format!("/dev/pay: {e}"))?;
                if paid.status().is_client_error() {
                    // Paid before a kill, its answer lost: the preimage never arrived.
                    lock()[index].lost = true;
                    continue;
                }
                let paid: serde_json::Value = paid.json().await.map_err(|e| e.to_string())?;
                let preimage = paid["preimage"].as_str().ok_or("no preimage")?;
                let mut calls = lock();
                let call = &mut calls[index];
                let mut echo = serde_json::Map::new();
                for name in ["id", "realm", "method", "intent", "request", "expires"] {
                    echo.insert(name.into(), call.challenge[name].clone().into());
                }
                let wire =
                    serde_json::json!({ "challenge": echo, "payload": { "preimage": preimage } });
                let credential = format!("Payment {}", URL_SAFE_NO_PAD.encode(wire.to_string()));
                call.credential = Some(credential.clone());
                credential
            }
        };
        // Sent until it opens the job (202) or finds the job it opened (409).
        let created = reqwest::Client::new()
            .post(&url)
            .header("Authorization", &credential)
            .header("Idempotency-Key", &key)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = created.status().as_u16();
        if status == 409 {
            FOUND_AGAIN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if status != 202 && status != 409 {
            let said = created.text().await.unwrap_or_default();
            return Err(unexpected(format!(
                "POST /v1/jobs with a credential answered {status}: {said}"
            )));
        }
        let job_url = format!("{url}/{job}");
        match poll_job(&job_url, || credential.clone()).await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(unexpected(format!("{job_url}: 404 after 202 or 409"))),
            Err(why) if why.starts_with("job ") => return Err(unexpected(why)),
            Err(why) => return Err(why),
        }
        lock()[index].settled = true;
        settled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}
