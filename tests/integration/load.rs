//! Under load: 50 customers, each with its own key and websocket, run 20 paid jobs each back to
//! back through the embedded relay, the dev wallet and the OpenAI-compatible stub. Every job is
//! delivered once and charged once, the ledger balances, and `/healthz` answers throughout.
//!
//! And 20 customers spending their credit at once, two jobs racing for each balance, until it
//! runs out and jobs pay the difference: nothing overdrawn, every balance accounted for.
//!
//! The daemon runs as a child process, so a wedged daemon cannot stall this test's own runtime:
//! past the deadline the test kills it and fails with the state of every job.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dvmd::bench::stub::StubServer;
use dvmd::customer::{self, Customer, Reply};
use dvmd::job::JobState;
use dvmd::nip90::JobStatus;
use nostr_sdk::{EventId, PublicKey};

use crate::harness::{self, DaemonProcess};

const CUSTOMERS: usize = 50;
const JOBS_PER_CUSTOMER: usize = 20;
/// Far beyond what the run needs (seconds at this size); reaching it means the daemon stalled.
const DEADLINE: Duration = Duration::from_secs(300);
/// One reply slower than this means a stall, not load.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// What a customer saw of each of its jobs, for the dump when the deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    Posted,
    Invoiced,
    Paid,
    Result,
}

type Progress = Arc<Mutex<BTreeMap<EventId, Seen>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_customers_run_twenty_paid_jobs_each_with_nothing_lost() {
    let (stub, data, daemon) = stub_daemon().await;
    let service = PublicKey::from_hex(&daemon.pubkey).expect("pubkey");
    let progress: Progress = Arc::default();

    let health = tokio::spawn(poll_health(daemon.http_url.clone()));
    let mut customers = Vec::with_capacity(CUSTOMERS);
    for _ in 0..CUSTOMERS {
        let customer = Customer::connect(&daemon.relay_url).await.expect("connect");
        let (http, progress) = (daemon.http_url.clone(), progress.clone());
        customers.push(tokio::spawn(run_customer(
            customer, service, http, progress,
        )));
    }
    let all = futures::future::join_all(customers);
    let results = match tokio::time::timeout(DEADLINE, all).await {
        Ok(results) => results,
        Err(_) => {
            health.abort();
            daemon.kill();
            panic!("{}", dump(&progress, data.path()));
        }
    };
    let mut delivered: HashMap<EventId, HashSet<EventId>> = HashMap::new();
    for result in results {
        match result.expect("customer task") {
            Ok(seen) => {
                for (job, result) in seen {
                    delivered.entry(job).or_default().insert(result);
                }
            }
            Err(why) => {
                health.abort();
                daemon.kill();
                panic!("a customer failed: {why}\n{}", dump(&progress, data.path()));
            }
        }
    }
    // The prober only returns if `/healthz` failed; otherwise it is still polling.
    if health.is_finished() {
        let why = health.await;
        panic!("/healthz stopped answering during the run: {why:?}");
    }
    health.abort();
    // The daemon binary's allocator says what is live, beside what is resident.
    let metrics = harness::metrics(&daemon.http_url).await;
    let gauge = |name: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&format!("dvmd_allocator_{name}_bytes ")))
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("dvmd_allocator_{name}_bytes in {metrics}"))
    };
    assert!(gauge("allocated") > 0 && gauge("allocated") <= gauge("active"));
    assert!(gauge("resident") >= gauge("active"));
    assert!(
        metrics.lines().any(|line| line == "dvmd_panics_total 0"),
        "no task panicked under load"
    );
    daemon.terminate();
    stub.stop().await;

    assert_eq!(delivered.len(), CUSTOMERS * JOBS_PER_CUSTOMER);
    for (job, results) in &delivered {
        assert_eq!(results.len(), 1, "job {job} got {} results", results.len());
    }
    let store = harness::open_store(data.path());
    let jobs = harness::jobs(&store);
    assert_eq!(jobs.len(), CUSTOMERS * JOBS_PER_CUSTOMER);
    for job in &jobs {
        assert_eq!(
            job.state,
            JobState::Settled,
            "job {} is {:?}",
            job.id,
            job.state
        );
        assert!(job
            .charge_msat
            .is_some_and(|c| c > 0 && c <= job.funds_msat()));
    }
    let totals = harness::ledger_ok(&store);
    let charged: u64 = jobs.iter().filter_map(|j| j.charge_msat).sum();
    let paid: u64 = jobs.iter().map(|j| j.paid_msat).sum();
    assert_eq!(totals.payment_in_msat, paid, "every payment booked once");
    assert_eq!(totals.charge_msat, charged, "every job charged once");
}

/// The daemon binary with 8 workers on the OpenAI-compatible stub (answers at once).
async fn stub_daemon() -> (StubServer, tempfile::TempDir, DaemonProcess) {
    let stub = StubServer::start().await.expect("stub server");
    let data = harness::data_dir();
    let config = format!(
        // Fifty customers who have not paid before, all at once: more than the requests all new
        // keys share by default.
        "[service]\nworkers = 8\n[trust]\nnew_requests_per_minute = 100000\n[infer]\nbackend = \"openai\"\n[infer.openai]\nbase_url = \"{}\"\nmodel = \"stub\"\n",
        stub.base_url()
    );
    let daemon = DaemonProcess::spawn(
        data.path(),
        harness::free_port(),
        harness::free_port(),
        &config,
    );
    (stub, data, daemon)
}

/// Post, pay and read `JOBS_PER_CUSTOMER` jobs one after another; returns (job, result id).
async fn run_customer(
    mut customer: Customer,
    service: PublicKey,
    http: String,
    progress: Progress,
) -> Result<Vec<(EventId, EventId)>, String> {
    let mut seen = Vec::with_capacity(JOBS_PER_CUSTOMER);
    for i in 0..JOBS_PER_CUSTOMER {
        let request = customer
            .post(customer::text_request(
                &format!("load job {i}: say hello"),
                // Every job paid by its own invoice: the change of one never pays the next.
                &[("max_tokens", "16"), ("pay_from_credit", "false")],
                Some(1_000_000),
                Some(service),
            ))
            .await
            .map_err(|e| e.to_string())?;
        let mark = |state| {
            progress
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(request.id, state);
        };
        mark(Seen::Posted);
        let bolt11 = match customer
            .wait_for(&request.id, REPLY_TIMEOUT, |r| {
                matches!(
                    r,
                    Reply::Feedback {
                        status: Some(JobStatus::PaymentRequired | JobStatus::Error),
                        ..
                    }
                )
            })
            .await
            .map_err(|e| e.to_string())?
        {
            Reply::Feedback {
                status: Some(JobStatus::PaymentRequired),
                amount: Some(amount),
                ..
            } => amount.bolt11.ok_or("payment-required without an invoice")?,
            other => {
                return Err(format!(
                    "job {}: expected an invoice, got {other:?}",
                    request.id
                ))
            }
        };
        mark(Seen::Invoiced);
        harness::dev_pay(&http, &bolt11).await;
        mark(Seen::Paid);
        let result = match customer
            .wait_for(&request.id, REPLY_TIMEOUT, |r| {
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
            .map_err(|e| e.to_string())?
        {
            Reply::Result(result) => result,
            other => {
                return Err(format!(
                    "job {}: expected a result, got {other:?}",
                    request.id
                ))
            }
        };
        mark(Seen::Result);
        seen.push((request.id, result.id));
    }
    customer.shutdown().await;
    Ok(seen)
}

/// Ask `/healthz` every 200 ms until aborted; returns (an error) only if it stops answering.
async fn poll_health(http: String) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .map_err(|e| e.to_string())?;
    loop {
        let response = client
            .get(format!("{http}/healthz"))
            .send()
            .await
            .map_err(|e| format!("/healthz: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("/healthz answered {}", response.status()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where every job stands, as the customers saw it and as the store has it.
fn dump(progress: &Progress, data: &std::path::Path) -> String {
    let progress = progress.lock().unwrap_or_else(|e| e.into_inner());
    let mut by_seen: BTreeMap<Seen, usize> = BTreeMap::new();
    for seen in progress.values() {
        *by_seen.entry(*seen).or_default() += 1;
    }
    let mut out = format!("load run stalled; customers saw: {by_seen:?}\n");
    let store = harness::open_store(data);
    let mut by_state: BTreeMap<String, Vec<EventId>> = BTreeMap::new();
    for job in harness::jobs(&store) {
        by_state
            .entry(format!("{:?}", job.state))
            .or_default()
            .push(job.id.as_event_id());
    }
    for (state, ids) in by_state {
        let sample: Vec<String> = ids.iter().take(5).map(|id| id.to_hex()).collect();
        out.push_str(&format!("  {state}: {} jobs, e.g. {sample:?}\n", ids.len()));
    }
    out
}

const CREDIT_CUSTOMERS: usize = 20;
const CREDIT_JOBS: usize = 10;
/// Credit for a few jobs each (a job costs about 1.2 sat here): it runs out mid-way, so jobs
/// after that reserve what is left and pay the difference.
const TOP_UP_MSAT: u64 = 4_000;

/// How a credit customer's job was paid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PaidBy {
    Credit,
    Invoice,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_customers_spend_their_credit_at_once_and_nothing_is_overdrawn() {
    let (stub, data, daemon) = stub_daemon().await;
    let service = PublicKey::from_hex(&daemon.pubkey).expect("pubkey");
    let mut customers = Vec::with_capacity(CREDIT_CUSTOMERS);
    for _ in 0..CREDIT_CUSTOMERS {
        let customer = Customer::connect(&daemon.relay_url).await.expect("connect");
        let (http, relay) = (daemon.http_url.clone(), daemon.relay_url.clone());
        customers.push(tokio::spawn(async move {
            harness::zap_top_up(&http, &relay, customer.keys(), service, TOP_UP_MSAT).await;
            run_credit_customer(customer, service, http).await
        }));
    }
    let all = futures::future::join_all(customers);
    let results = match tokio::time::timeout(DEADLINE, all).await {
        Ok(results) => results,
        Err(_) => {
            daemon.kill();
            panic!("the credit customers stalled");
        }
    };
    let mut by = HashMap::new();
    for result in results {
        match result.expect("customer task") {
            Ok(seen) => by.extend(seen),
            Err(why) => {
                daemon.kill();
                panic!("a customer failed: {why}");
            }
        }
    }
    daemon.terminate();
    stub.stop().await;

    let from_credit = by.values().filter(|b| **b == PaidBy::Credit).count();
    let invoiced = by.len() - from_credit;
    assert!(
        from_credit > 0 && invoiced > 0,
        "{from_credit} from credit, {invoiced} invoiced"
    );
    let store = harness::open_store(data.path());
    let jobs = harness::jobs(&store);
    assert_eq!(jobs.len(), CREDIT_CUSTOMERS * CREDIT_JOBS);
    let mut accounts: HashMap<PublicKey, (u64, u64)> = HashMap::new();
    for job in &jobs {
        assert_eq!(job.state, JobState::Settled, "job {}", job.id);
        assert_eq!(job.held_msat, 0);
        assert_eq!(
            by.get(&job.id.as_event_id()) == Some(&PaidBy::Credit),
            job.paid_msat == 0,
            "job {}: paid {} credit {}",
            job.id,
            job.paid_msat,
            job.credit_msat
        );
        let account = accounts
            .entry(job.customer.npub().expect("a relay customer"))
            .or_default();
        account.0 += job.paid_msat;
        account.1 += job.charge_msat.expect("charged");
    }
    let totals = harness::ledger_ok(&store);
    assert_eq!(totals.held_msat, 0);
    for (customer, (paid, charged)) in accounts {
        assert_eq!(
            harness::balance(&store, &customer),
            TOP_UP_MSAT + paid - charged,
            "{customer}: top-up + payments - charges"
        );
    }
}

/// Post `CREDIT_JOBS` targeted jobs two at a time (the pair races for one balance), paying an
/// invoice when credit does not cover one; returns how each was paid.
async fn run_credit_customer(
    mut customer: Customer,
    service: PublicKey,
    http: String,
) -> Result<Vec<(EventId, PaidBy)>, String> {
    let mut seen = Vec::with_capacity(CREDIT_JOBS);
    for pair in 0..CREDIT_JOBS / 2 {
        let mut posted = Vec::with_capacity(2);
        for i in 0..2 {
            let request = customer
                .post(customer::text_request(
                    &format!("credit job {pair}.{i}: say hello"),
                    &[("max_tokens", "16")],
                    None,
                    Some(service),
                ))
                .await
                .map_err(|e| e.to_string())?;
            posted.push(request.id);
        }
        for id in posted {
            let first = customer
                .wait_for(&id, REPLY_TIMEOUT, |r| matches!(r, Reply::Feedback { .. }))
                .await
                .map_err(|e| e.to_string())?;
            let paid_by = match first {
                Reply::Feedback {
                    status: Some(JobStatus::Processing),
                    ..
                } => PaidBy::Credit,
                Reply::Feedback {
                    status: Some(JobStatus::PaymentRequired),
                    amount: Some(amount),
                    ..
                } => {
                    let bolt11 = amount.bolt11.ok_or("payment-required without an invoice")?;
                    harness::dev_pay(&http, &bolt11).await;
                    PaidBy::Invoice
                }
                other => return Err(format!("job {id}: unexpected {other:?}")),
            };
            match customer
                .wait_for(&id, REPLY_TIMEOUT, |r| {
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
                .map_err(|e| e.to_string())?
            {
                Reply::Result(_) => seen.push((id, paid_by)),
                other => return Err(format!("job {id}: expected a result, got {other:?}")),
            }
        }
    }
    customer.shutdown().await;
    Ok(seen)
}
