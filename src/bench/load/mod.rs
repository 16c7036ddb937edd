//! `dvmd bench load`: many customers at once against a daemon, with the daemon's own CPU, RSS
//! and `/healthz` latency measured beside throughput and latency.
//!
//! By default it starts the daemon as a child process (`dvmd run --dev`: embedded relay, dev
//! wallet) with the `openai` backend on the in-repo stub ([`super::stub`]), so the figures are
//! the daemon's alone. `--relay`/`--http` drive a daemon that is already running instead.
//!
//! Each customer has its own key and websocket and is a lean client of its own (a `REQ` for
//! replies `#p`-tagged to it, `EVENT`s for requests): the load generator shares the machine
//! with the daemon, so it spends as little as it can. Closed loop: every customer posts its next
//! request when the last one's result arrives. Open loop (`--rate`): requests are offered at a
//! fixed total rate whatever the answers do.
//!
//! `DVMD_BENCH_EXTRA_CONFIG` is appended to the started daemon's `dvmd.toml`, to measure other
//! settings (`[store] cache_capacity_mib`, `[embedded_relay] max_events`, ...), and
//! `DVMD_BENCH_WRAPPER` is put in front of its command line (`heaptrack`, `perf record -g --`).

mod customers;
mod flood;
mod target;

use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nostr_sdk::PublicKey;

use super::BenchError;
use customers::LoadCustomer;
use target::{attach, cpu_seconds, rss_bytes, start_daemon, Rss};

/// How often `/healthz` is probed during the run.
const HEALTH_EVERY: Duration = Duration::from_millis(100);
/// Jobs at which RSS is sampled: the memory target compares 2,000 and 20,000; the marks between
/// show when warm-up ends, and the later ones (on a long run) whether growth levels off, as
/// caches that are full do, or goes on.
const RSS_MARKS: [usize; 7] = [2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000];

/// What to run (`dvmd bench load` flags).
#[derive(Debug, Clone, clap::Args)]
pub struct LoadOptions {
    /// Customers, each with its own key and websocket.
    #[arg(long, default_value_t = 10)]
    pub customers: usize,
    /// Jobs in all.
    #[arg(long, default_value_t = 2_000)]
    pub jobs: usize,
    /// Pay each job through the dev wallet (default prices); otherwise jobs are free.
    #[arg(long)]
    pub paid: bool,
    /// Open loop: offer this many requests per second in total.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Drive the daemon already running behind this relay URL (needs --http).
    #[arg(long, requires = "http")]
    pub relay: Option<String>,
    /// That daemon's HTTP URL (for /dev/pay, /healthz, /metrics).
    #[arg(long, requires = "relay")]
    pub http: Option<String>,
    /// Workers of the daemon the bench starts.
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Also flood it: this many fresh keys post one job request each (each far under its own
    /// limit) while the customers run; the customers are made `known` first, and the daemon
    /// keeps the default `[trust]` limits for new keys (the bench's own daemon only).
    #[arg(long, default_value_t = 0, conflicts_with = "relay")]
    pub flood: usize,
    /// Flood requests offered a second.
    #[arg(long, default_value_t = 200.0)]
    pub flood_rate: f64,
}

/// Run the load and print the figures.
pub async fn run(options: LoadOptions) -> Result<(), BenchError> {
    if options.customers == 0 || options.jobs == 0 {
        return Err("--customers and --jobs must be at least 1".into());
    }
    let target = match (&options.relay, &options.http) {
        (Some(relay), Some(http)) => attach(relay, http).await?,
        (None, None) => start_daemon(&options).await?,
        _ => return Err("--relay and --http go together".into()),
    };
    let pid = target.child.as_ref().map(Child::id);
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?;

    let mut customers = Vec::with_capacity(options.customers);
    for _ in 0..options.customers {
        customers.push(Arc::new(LoadCustomer::connect(&target.relay).await?));
    }
    if options.flood > 0 {
        for customer in &customers {
            target.make_known(&http, &customer.public_key()).await?;
        }
    }
    // Every customer's subscription is live before the first request.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mode = match options.rate {
        Some(rate) => format!("open loop at {rate} requests/s"),
        None => "closed loop".to_owned(),
    };
    println!(
        "bench load: {} customers, {} jobs, {mode}, {} ({})",
        options.customers,
        options.jobs,
        if options.paid {
            "paid through the dev wallet"
        } else {
            "free"
        },
        match pid {
            Some(pid) => format!(
                "daemon pid {pid}: embedded relay, dev wallet, stub backend, {} workers",
                options.workers
            ),
            None => format!("daemon at {}", target.relay),
        }
    );

    let record = Arc::new(Record::default());
    let stop_health = tokio_util::sync::CancellationToken::new();
    let health = tokio::spawn(probe_health(
        http.clone(),
        target.http.clone(),
        stop_health.clone(),
    ));
    let metrics_url = format!("{}/metrics", target.http);
    let sampler = pid.map(|pid| tokio::spawn(sample_rss(pid, record.clone(), metrics_url)));
    let cpu_before = pid.and_then(cpu_seconds);
    let generator_before = cpu_seconds(std::process::id());
    let flood = if options.flood > 0 {
        let events = flood::sign(options.flood, target.service)?;
        Some(tokio::spawn(flood::offer(
            target.relay.clone(),
            events,
            options.flood_rate,
        )))
    } else {
        None
    };
    let started = Instant::now();
    let job = Arc::new(JobSpec {
        service: target.service,
        paid: options.paid,
        http: http.clone(),
        pay_url: format!("{}/dev/pay", target.http),
    });
    match options.rate {
        None => closed_loop(&customers, options.jobs, &job, &record).await,
        Some(rate) => open_loop(&customers, options.jobs, rate, &job, &record).await,
    }
    let wall = started.elapsed();
    let flood = match flood {
        Some(task) => Some(task.await??),
        None => None,
    };
    let spent = |after: Option<f64>, before: Option<f64>| Some(after? - before?);
    let cpu = Cpu {
        daemon: spent(pid.and_then(cpu_seconds), cpu_before),
        generator: spent(cpu_seconds(std::process::id()), generator_before),
    };
    stop_health.cancel();
    let health = health.await.ok();
    if let Some(sampler) = sampler {
        // Stopped before the marks it missed are filled in below (it could otherwise record
        // one of them too, and the mark would be printed twice).
        sampler.abort();
        let _ = sampler.await;
    }
    if let Some(pid) = pid {
        // Marks reached in the last sampling interval.
        let done = record.completed.load(Ordering::Relaxed) + record.lost.load(Ordering::Relaxed);
        let rss = rss_bytes(pid).unwrap_or_default();
        let missed: Vec<usize> = {
            let mut marks = record.rss_at.lock().unwrap_or_else(|e| e.into_inner());
            let missed: Vec<usize> = RSS_MARKS
                .into_iter()
                .filter(|mark| done >= *mark && !marks.iter().any(|(m, _)| m == mark))
                .collect();
            marks.extend(missed.iter().map(|mark| (*mark, rss)));
            missed
        };
        for mark in missed {
            let gauges = allocator_gauges(&http, &format!("{}/metrics", target.http)).await;
            record
                .allocator_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((mark, gauges));
        }
    }
    let metrics = http
        .get(format!("{}/metrics", target.http))
        .send()
        .await
        .ok()
        .map(|r| r.text());
    let metrics = match metrics {
        Some(text) => text.await.unwrap_or_default(),
        None => String::new(),
    };
    report(&options, &record, wall, cpu, pid, health, &metrics);
    if let Some(flood) = flood {
        flood::report(&options, &record, flood, &metrics);
    }
    if let Some(bytes) = target.store_bytes() {
        let done = record.completed.load(Ordering::Relaxed).max(1);
        println!(
            "  store on disk                : {:>8.1} MB ({:.1} KB per job)",
            bytes as f64 / (1024.0 * 1024.0),
            bytes as f64 / 1024.0 / done as f64
        );
    }
    for customer in &customers {
        customer.close();
    }
    drop(target);
    Ok(())
}

/// How each job is posted and paid.
struct JobSpec {
    service: PublicKey,
    paid: bool,
    http: reqwest::Client,
    pay_url: String,
}

/// What the run saw.
#[derive(Default)]
struct Record {
    latencies: Mutex<Vec<Duration>>,
    completed: AtomicUsize,
    lost: AtomicUsize,
    refused: AtomicUsize,
    rss_at: Mutex<Vec<(usize, Rss)>>,
    rss_max: std::sync::atomic::AtomicU64,
    /// The allocator's gauges at each RSS mark.
    allocator_at: Mutex<Vec<(usize, Gauges)>>,
}

/// Gauges by name: (name, bytes).
type Gauges = Vec<(String, u64)>;

/// The daemon's `dvmd_allocator_*_bytes` gauges, by name (empty if it has none).
async fn allocator_gauges(http: &reqwest::Client, url: &str) -> Gauges {
    let Ok(response) = http.get(url).send().await else {
        return Vec::new();
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter_map(|line| line.strip_prefix("dvmd_allocator_"))
        .filter_map(|line| {
            let (name, value) = line.split_once(' ')?;
            Some((
                name.trim_end_matches("_bytes").to_owned(),
                value.parse().ok()?,
            ))
        })
        .collect()
}

async fn closed_loop(
    customers: &[Arc<LoadCustomer>],
    jobs: usize,
    spec: &JobSpec,
    record: &Record,
) {
    let next = AtomicUsize::new(0);
    let runs = customers.iter().map(|customer| async {
        loop {
            let n = next.fetch_add(1, Ordering::Relaxed);
            if n >= jobs {
                break;
            }
            customer.run_job(n, spec, record).await;
        }
    });
    futures::future::join_all(runs).await;
}

async fn open_loop(
    customers: &[Arc<LoadCustomer>],
    jobs: usize,
    rate: f64,
    spec: &Arc<JobSpec>,
    record: &Arc<Record>,
) {
    let every = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let start = tokio::time::Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for n in 0..jobs {
        tokio::time::sleep_until(start + every.mul_f64(n as f64)).await;
        let (customer, spec, record) = (
            customers[n % customers.len()].clone(),
            spec.clone(),
            record.clone(),
        );
        running.spawn(async move { customer.run_job(n, &spec, &record).await });
    }
    while running.join_next().await.is_some() {}
}

/// `/healthz` latencies until `stop` fires, and how many probes failed.
async fn probe_health(
    http: reqwest::Client,
    base: String,
    stop: tokio_util::sync::CancellationToken,
) -> (Vec<Duration>, usize) {
    let (mut latencies, mut failed) = (Vec::new(), 0);
    while !stop.is_cancelled() {
        let started = Instant::now();
        match http.get(format!("{base}/healthz")).send().await {
            Ok(r) if r.status().is_success() => latencies.push(started.elapsed()),
            _ => failed += 1,
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(HEALTH_EVERY) => {}
        }
    }
    (latencies, failed)
}

/// Sample the daemon's RSS as jobs complete, and at each mark also what its allocator says
/// (`dvmd_allocator_*` on `/metrics`).
async fn sample_rss(pid: u32, record: Arc<Record>, metrics_url: String) {
    let http = reqwest::Client::new();
    let mut marks = RSS_MARKS.iter().peekable();
    loop {
        let done = record.completed.load(Ordering::Relaxed) + record.lost.load(Ordering::Relaxed);
        if let Some(rss) = rss_bytes(pid) {
            record.rss_max.fetch_max(rss.total, Ordering::Relaxed);
            while let Some(mark) = marks.peek() {
                if done < **mark {
                    break;
                }
                record
                    .rss_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((**mark, rss));
                let allocator = allocator_gauges(&http, &metrics_url).await;
                record
                    .allocator_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((**mark, allocator));
                marks.next();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CPU seconds spent during the run.
struct Cpu {
    /// By the daemon (when the bench started it).
    daemon: Option<f64>,
    /// By this process: the load generator (and the stub backend, when it runs here).
    generator: Option<f64>,
}

fn report(
    options: &LoadOptions,
    record: &Record,
    wall: Duration,
    cpu: Cpu,
    pid: Option<u32>,
    health: Option<(Vec<Duration>, usize)>,
    metrics: &str,
) {
    let completed = record.completed.load(Ordering::Relaxed);
    let lost = record.lost.load(Ordering::Relaxed);
    let refused = record.refused.load(Ordering::Relaxed);
    println!("  jobs completed               : {completed} of {} (lost {lost}, refused with an error {refused})", options.jobs);
    println!(
        "  throughput                   : {:>8.0} jobs/s over {:.1} s",
        completed as f64 / wall.as_secs_f64(),
        wall.as_secs_f64()
    );
    let mut latencies = record
        .latencies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    super::report("request -> result", &mut latencies);
    let per_job = |seconds: f64| {
        format!(
            "{:>8.2} cores ({:.2} ms per job)",
            seconds / wall.as_secs_f64(),
            1e3 * seconds / completed.max(1) as f64
        )
    };
    if let Some(daemon) = cpu.daemon {
        println!("  daemon CPU                   : {}", per_job(daemon));
    }
    if let Some(generator) = cpu.generator {
        println!("  load generator CPU           : {}", per_job(generator));
    }
    if let Some(pid) = pid {
        let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
        let marks = record
            .rss_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let first = marks.first().map(|(_, rss)| rss.total as f64);
        let marks: Vec<String> = marks
            .iter()
            .enumerate()
            .map(|(i, (job, rss))| {
                let change = match first {
                    Some(first) if i > 0 && first > 0.0 => {
                        format!(" ({:+.1}%)", 100.0 * (rss.total as f64 - first) / first)
                    }
                    _ => String::new(),
                };
                format!(
                    "  at job {job:<10}             : {:.1} MB{change}: anonymous {:.1}, file {:.1}",
                    mb(rss.total),
                    mb(rss.anon),
                    mb(rss.file)
                )
            })
            .collect();
        println!(
            "  daemon RSS                   : max {:.1} MB, end {:.1} MB",
            mb(record.rss_max.load(Ordering::Relaxed)),
            mb(rss_bytes(pid).unwrap_or_default().total)
        );
        for mark in marks {
            println!("{mark}");
        }
        let allocator = record
            .allocator_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (job, gauges) in allocator.iter().filter(|(_, g)| !g.is_empty()) {
            let gauges: Vec<String> = gauges
                .iter()
                .map(|(name, bytes)| format!("{name} {:.1}", mb(*bytes)))
                .collect();
            println!("  allocator at job {job:<11} : {} MB", gauges.join(", "));
        }
    }
    if let Some((mut health, failed)) = health {
        let probes = health.len();
        super::report("/healthz during the run", &mut health);
        println!("  /healthz probes              : {probes} answered, {failed} failed");
    }
    for (name, label) in [
        ("dvmd_store_writes_total", "store writes"),
        ("dvmd_store_transactions_total", "store transactions"),
        ("dvmd_store_flushes_total", "store flushes (fsyncs)"),
        ("dvmd_store_cleaned_pages_total", "store pages cleaned"),
        (
            "dvmd_embedded_relay_lagging_closed_total",
            "relay readers closed",
        ),
        ("dvmd_intake_lagged_events_total", "intake events lagged"),
    ] {
        if let Some(value) = metric(metrics, name) {
            println!("  {label:<29}: {value:>8.0}");
        }
    }
    if let (Some(writes), Some(flushes)) = (
        metric(metrics, "dvmd_store_writes_total"),
        metric(metrics, "dvmd_store_flushes_total"),
    ) {
        println!(
            "  writes per fsync             : {:>8.1}",
            writes / flushes.max(1.0)
        );
    }
    for (name, label) in [
        ("dvmd_store_commit_seconds", "durable commit, mean"),
        ("dvmd_store_flush_seconds", "flush (fsync), mean"),
    ] {
        if let (Some(sum), Some(count)) = (
            metric(metrics, &format!("{name}_sum")),
            metric(metrics, &format!("{name}_count")),
        ) {
            println!("  {label:<29}: {:>8.2} ms", 1e3 * sum / count.max(1.0));
        }
    }
}

/// The value of an unlabelled metric in a Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}
