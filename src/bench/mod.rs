//! `dvmd bench`: benchmarks that print figures. Nothing here asserts on time.

pub mod http;
pub mod load;
pub mod pricing;
pub mod stub;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nostr_sdk::{Event, Keys};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, FileConfig, Overrides, RelaysFile};
use crate::customer::{self, Customer, Reply};
use crate::daemon::{Daemon, Parts};
use crate::infer::instant::InstantBackend;
use crate::infer::llama::{LlamaBackend, LlamaConfig};
use crate::infer::{self, Backend, ChatMessage, GenerateRequest, Sampling};
use crate::job::{Book, Pipeline, Screening};
use crate::metrics::Metrics;
use crate::nip90::{JobStatus, Verified};
use crate::relay::{Outbox, Relays};
use crate::store::Store;
use crate::wallet::dev::DevWallet;

/// Errors of a benchmark run.
pub type BenchError = Box<dyn std::error::Error + Send + Sync>;

const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

fn requests(n: usize) -> Result<Vec<Event>, BenchError> {
    let customers: Vec<Keys> = (0..16).map(|_| Keys::generate()).collect();
    let mut events = Vec::with_capacity(n);
    for i in 0..n {
        let prompt = format!("Benchmark prompt number {i}: say hello.");
        let event = customer::text_request(&prompt, &[("max_tokens", "16")], Some(1_000_000), None)
            .sign_with_keys(&customers[i % customers.len()])?;
        events.push(event);
    }
    Ok(events)
}

/// Verified and deduplicated requests per second next to the raw signature check.
///
/// The two passes alternate over the same events in rounds, so drift in the machine's load
/// affects both alike; each event is verified once by each pass.
pub async fn intake(n: usize) -> Result<(), BenchError> {
    const ROUNDS: usize = 5;
    let events = requests(n)?;
    println!("bench intake: {n} signed kind 5050 requests, one core, {ROUNDS} alternating rounds");

    let store = Store::temporary()?;
    let keys = Keys::generate();
    let relays = Relays::connect(&keys, &[], Default::default()).await?;
    // The requests come from one key, far faster than its request bucket allows.
    let mut file = FileConfig::default();
    file.service.requests_per_npub_per_minute = u32::MAX;
    file.trust.new_requests_per_minute = u32::MAX;
    let config = Config::build(
        file,
        RelaysFile::default(),
        Overrides {
            dev: true,
            ..Overrides::default()
        },
    )?;
    let trust = crate::trust::Trust::load(store.clone(), config.jobs.trust, 0).await?;
    let (pipeline, _queue) = Pipeline::new(
        config.jobs,
        keys,
        Book::new(store.clone()),
        Arc::new(DevWallet::open(store).await?),
        Arc::new(InstantBackend::new("hello")),
        Outbox::new(relays, CancellationToken::new()),
        Arc::new(Metrics::default()),
        Arc::new(trust),
    );

    // Warm up both paths (allocator, the store's first pages) on events that are not measured.
    for event in requests(n / 10)? {
        event.verify()?;
        let verified = Verified::check(event)?;
        let request = pipeline
            .precheck(&verified)
            .map_err(|why| format!("{why:?}"))?;
        pipeline
            .admit(verified.event(), request, Some("ws://bench"))
            .await?;
    }

    let chunk = n.div_ceil(ROUNDS);
    let (mut raw_time, mut intake_time) = (Duration::ZERO, Duration::ZERO);
    let admitted = Arc::new(AtomicUsize::new(0));
    for round in events.chunks(chunk) {
        let started = Instant::now();
        for event in round {
            event.verify()?;
        }
        raw_time += started.elapsed();
        // Intake owns its events (they arrive from the pool by value); cloning is not timed.
        // As in the daemon, the loop verifies and prechecks; the dedup insert runs in tasks
        // on the other core, and the round ends when every insert is done.
        let owned: Vec<Event> = round.to_vec();
        let started = Instant::now();
        let inserts = tokio_util::task::TaskTracker::new();
        for event in owned {
            let verified = Verified::check(event)?;
            let request = pipeline
                .precheck(&verified)
                .map_err(|why| format!("{why:?}"))?;
            let pipeline = pipeline.clone();
            let admitted = admitted.clone();
            inserts.spawn(async move {
                if let Ok(Screening::New(..)) = pipeline
                    .admit(verified.event(), request, Some("ws://bench"))
                    .await
                {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        inserts.close();
        inserts.wait().await;
        intake_time += started.elapsed();
    }
    let admitted = admitted.load(Ordering::Relaxed);
    if admitted != n {
        return Err(format!("{admitted} of {n} distinct requests admitted").into());
    }
    let replays: Vec<Event> = events.iter().take(n / 10).cloned().collect();
    let replayed = replays.len();
    let started = Instant::now();
    for event in replays {
        let verified = Verified::check(event)?;
        let request = pipeline
            .precheck(&verified)
            .map_err(|why| format!("{why:?}"))?;
        if let Screening::New(..) = pipeline
            .admit(verified.event(), request, Some("ws://bench"))
            .await?
        {
            return Err("a replayed event was admitted twice".into());
        }
    }
    let dup_rate = replayed as f64 / started.elapsed().as_secs_f64();
    let raw = n as f64 / raw_time.as_secs_f64();
    let rate = n as f64 / intake_time.as_secs_f64();
    println!("  raw id+signature verification : {raw:>9.0} events/s");
    println!("  verify + screen + dedup insert: {rate:>9.0} events/s  ({admitted} admitted)");
    println!("  verify + screen, duplicates   : {dup_rate:>9.0} events/s  ({replayed} replays, none admitted)");
    println!(
        "  intake / raw                  : {:>9.1} %",
        100.0 * rate / raw
    );
    Ok(())
}

/// A dev daemon with the instant backend on loopback ports; `edit` adjusts its file config.
async fn bench_daemon(
    data: PathBuf,
    edit: impl FnOnce(&mut FileConfig),
) -> Result<Daemon, BenchError> {
    let mut file = FileConfig::default();
    // A bench customer posts back to back, far over a real customer's rate.
    file.service.requests_per_npub_per_minute = u32::MAX;
    file.trust.new_requests_per_minute = u32::MAX;
    edit(&mut file);
    let config = Config::build(
        file,
        RelaysFile::default(),
        Overrides {
            dev: true,
            data_dir: Some(data),
            relay_listen: Some("127.0.0.1:0".into()),
            http_listen: Some("127.0.0.1:0".into()),
            model_path: None,
        },
    )?;
    // The instant backend, unless the edit chose an OpenAI-compatible server (the stub).
    let backend: Option<Arc<dyn crate::infer::Backend>> = match config.backend {
        crate::config::BackendChoice::OpenAi(_) => None,
        _ => Some(Arc::new(InstantBackend::new(
            "Hello from the instant backend.",
        ))),
    };
    Ok(Daemon::start(
        config,
        Parts {
            backend,
            ..Parts::default()
        },
    )
    .await?)
}

/// Post `request` and wait for its result; returns the reply that ended the wait.
async fn until_result(customer: &mut Customer, request: &Event) -> Result<(), BenchError> {
    customer.send(request).await?;
    match customer
        .wait_for(&request.id, REPLY_TIMEOUT, |r| {
            matches!(
                r,
                Reply::Result(_)
                    | Reply::Feedback {
                        status: Some(JobStatus::PaymentRequired | JobStatus::Error),
                        ..
                    }
            )
        })
        .await?
    {
        Reply::Result(_) => Ok(()),
        other => Err(format!("expected a result, got {other:?}").into()),
    }
}

/// Request -> result over the loopback relay with an instant backend, three ways in one run,
/// alternating job by job so drift in the machine's load affects all alike: paid by invoice
/// (request -> payment-required -> pay -> result), paid from credit (no invoice), and free (a
/// second daemon with a zero rate card).
pub async fn roundtrip(jobs: usize) -> Result<(), BenchError> {
    let (paid_data, free_data) = (tempdir()?.join("paid"), tempdir()?.join("free"));
    let paid = bench_daemon(paid_data, |_| {}).await?;
    let free = bench_daemon(free_data, |file| {
        file.pricing.base_fee_msat = 0;
        file.pricing.prompt_msat_per_1k_tokens = 0;
        file.pricing.completion_msat_per_1k_tokens = 0;
    })
    .await?;
    let wallet = paid.dev_wallet().ok_or("dev wallet missing")?.clone();
    let keys = Keys::generate();
    let mut customer = Customer::connect_with(&paid.ready().relay_url, keys.clone()).await?;
    let mut free_customer = Customer::connect_with(&free.ready().relay_url, keys.clone()).await?;
    let (service, free_service) = (paid.ready().pubkey, free.ready().pubkey);
    let warmup = (jobs / 20).max(5);

    // Credit for every credit job: a zap of no particular event, paid through the dev wallet.
    let credit = (jobs + warmup) as u64 * 100_000;
    let zap = nostr_sdk::EventBuilder::new(nostr_sdk::Kind::from(9734), "credit for the bench")
        .tags([
            nostr_sdk::Tag::public_key(service),
            nostr_sdk::Tag::custom(nostr_sdk::TagKind::custom("amount"), [credit.to_string()]),
            nostr_sdk::Tag::custom(nostr_sdk::TagKind::custom("relays"), ["ws://127.0.0.1:1"]),
        ])
        .sign_with_keys(&keys)?;
    let invoice = paid
        .pipeline()
        .zap_invoice(&nostr_sdk::JsonUtil::as_json(&zap), credit)
        .await?;
    wallet.settle(&invoice.bolt11).await?;
    paid.pipeline().reconcile_once().await;

    let mut to_invoice = Vec::with_capacity(jobs);
    let mut pay_to_result = Vec::with_capacity(jobs);
    let mut invoiced = Vec::with_capacity(jobs);
    let mut from_credit = Vec::with_capacity(jobs);
    let mut free_jobs = Vec::with_capacity(jobs);
    for i in 0..jobs + warmup {
        let request = |kind: &str, service, extra: &[(&str, &str)]| {
            let mut params = vec![("max_tokens", "8")];
            params.extend_from_slice(extra);
            customer::text_request(
                &format!("roundtrip {kind} {i}"),
                &params,
                Some(1_000_000),
                Some(service),
            )
            .sign_with_keys(&keys)
        };

        // Paid by its own invoice.
        let event = request("invoice", service, &[("pay_from_credit", "false")])?;
        let t0 = Instant::now();
        customer.send(&event).await?;
        let bolt11 = match customer
            .wait_for(&event.id, REPLY_TIMEOUT, |r| {
                matches!(
                    r,
                    Reply::Feedback {
                        status: Some(JobStatus::PaymentRequired | JobStatus::Error),
                        ..
                    }
                )
            })
            .await?
        {
            Reply::Feedback {
                status: Some(JobStatus::PaymentRequired),
                amount: Some(amount),
                ..
            } => amount.bolt11.ok_or("no invoice")?,
            other => return Err(format!("unexpected reply {other:?}").into()),
        };
        let t1 = Instant::now();
        wallet.settle(&bolt11).await?;
        customer
            .wait_for(&event.id, REPLY_TIMEOUT, |r| matches!(r, Reply::Result(_)))
            .await?;
        let t2 = Instant::now();

        // Paid from credit.
        let event = request("credit", service, &[])?;
        let t3 = Instant::now();
        until_result(&mut customer, &event).await?;
        let credit_took = t3.elapsed();

        // Free, on the other daemon.
        let event = request("free", free_service, &[])?;
        let t4 = Instant::now();
        until_result(&mut free_customer, &event).await?;
        let free_took = t4.elapsed();

        if i >= warmup {
            to_invoice.push(t1 - t0);
            pay_to_result.push(t2 - t1);
            invoiced.push(t2 - t0);
            from_credit.push(credit_took);
            free_jobs.push(free_took);
        }
    }
    println!("bench roundtrip: {jobs} rounds of three sequential jobs over the embedded relay (instant backend, dev wallet, fsync on): paid by invoice, paid from credit, free");
    report("invoice: request -> invoice", &mut to_invoice);
    report("invoice: pay -> result", &mut pay_to_result);
    report("invoice: request -> result", &mut invoiced);
    report("credit: request -> result", &mut from_credit);
    report("free: request -> result", &mut free_jobs);
    let p50 = |samples: &[Duration]| samples[samples.len() / 2].as_secs_f64() * 1e3;
    println!(
        "  credit over free, p50        : {:+.2} ms",
        p50(&from_credit) - p50(&free_jobs)
    );
    let secs: f64 = invoiced.iter().map(Duration::as_secs_f64).sum();
    println!(
        "  throughput                   : {:>8.0} invoiced jobs/s sequential",
        jobs as f64 / secs
    );
    customer.shutdown().await;
    free_customer.shutdown().await;
    paid.stop().await;
    free.stop().await;
    let _ = std::fs::remove_dir_all(tempdir()?);
    Ok(())
}

const MODEL_BENCH_PROMPT: &str = "Explain, in plain words and in some detail, how a \
    Lightning Network payment travels from a payer to a payee through a route of channels, what \
    an invoice contains, why the payment hash and preimage matter, and what happens when a hop \
    along the route fails. Then say how a Nostr relay differs from a web server, and why \
    signatures on events let clients trust data that arrives through relays they do not \
    control. Keep the answer friendly and concrete, with one short example for each part.";

/// Prompt and generation tokens per second of the embedded model, and of `llama_server` (an
/// upstream llama-server binary) on the same GGUF and thread count when given.
pub async fn model(
    path: PathBuf,
    tokens: u32,
    runs: u32,
    llama_server: Option<PathBuf>,
) -> Result<(), BenchError> {
    let threads = crate::infer::llama::default_threads();
    let config = LlamaConfig {
        model_path: path.clone(),
        threads: Some(threads),
        context_tokens: 2048,
    };
    let started = Instant::now();
    let backend = tokio::task::spawn_blocking(move || LlamaBackend::load(&config)).await??;
    println!(
        "bench model: {} ({threads} threads, load {:.0} ms)",
        path.display(),
        started.elapsed().as_secs_f64() * 1e3
    );
    let request = GenerateRequest {
        continue_from: None,
        model: None,
        messages: vec![ChatMessage::user(MODEL_BENCH_PROMPT)],
        sampling: Sampling {
            temperature: Some(0.0),
            seed: Some(1),
            ..Sampling::default()
        },
    };
    for run in 1..=runs {
        // Prompt rate: a one-token generation is almost all prompt processing.
        let t = Instant::now();
        let (_, usage, _) = infer::collect(backend.generate(request.clone(), 1).await?).await?;
        let prompt_rate = f64::from(usage.prompt_tokens) / t.elapsed().as_secs_f64();
        let t = Instant::now();
        let (_, usage, _) =
            infer::collect(backend.generate(request.clone(), tokens).await?).await?;
        let total = t.elapsed().as_secs_f64();
        let prompt_secs = f64::from(usage.prompt_tokens) / prompt_rate;
        let gen_rate = f64::from(usage.completion_tokens) / (total - prompt_secs).max(1e-9);
        println!(
            "  dvmd llama   run {run}: prompt {} tok at {prompt_rate:>5.0} tok/s, generated {} tok at {gen_rate:>5.0} tok/s",
            usage.prompt_tokens, usage.completion_tokens
        );
    }
    drop(backend);
    if let Some(binary) = llama_server {
        llama_server_figures(&binary, &path, threads, tokens, runs).await?;
    }
    Ok(())
}

/// The same measurement on upstream llama-server, from the `timings` it reports.
async fn llama_server_figures(
    binary: &std::path::Path,
    model: &std::path::Path,
    threads: u32,
    tokens: u32,
    runs: u32,
) -> Result<(), BenchError> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = tokio::process::Command::new(binary)
        .arg("-m")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-t", &threads.to_string(), "-c", "2048", "-np", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http
        .get(format!("{base}/health"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > deadline {
            return Err("llama-server did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for run in 1..=runs {
        let body = serde_json::json!({
            "messages": [{"role": "user", "content": MODEL_BENCH_PROMPT}],
            "max_tokens": tokens,
            "temperature": 0.0,
            "seed": 1,
            // Every run processes the whole prompt, as dvmd does.
            "cache_prompt": false,
        });
        let reply: serde_json::Value = http
            .post(format!("{base}/v1/chat/completions"))
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        let t = &reply["timings"];
        println!(
            "  llama-server run {run}: prompt {} tok at {:>5.0} tok/s, generated {} tok at {:>5.0} tok/s",
            t["prompt_n"],
            t["prompt_per_second"].as_f64().unwrap_or(f64::NAN),
            t["predicted_n"],
            t["predicted_per_second"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let _ = child.kill().await;
    Ok(())
}

fn report(label: &str, samples: &mut [Duration]) {
    samples.sort();
    let pick = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples
            .get(i)
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(f64::NAN)
    };
    println!(
        "  {label:<29}: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        pick(0.5),
        pick(0.9),
        pick(0.99),
        pick(1.0)
    );
}

fn tempdir() -> Result<PathBuf, BenchError> {
    let dir = std::env::temp_dir().join(format!("dvmd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
