//! Prometheus metrics: a fixed set of counters and histograms, rendered in the text format.
//!
//! Hand-rolled on atomics: the set is small and known, and recording sits on the intake and
//! settlement paths, where a lock or a registry lookup per event would show.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::job::JobState;

/// Panics in this process since it started (see [`count_panics`]).
static PANICS: AtomicU64 = AtomicU64::new(0);

/// Count every panic in the process and log it at `error`, then print it as before. A panic
/// in a task ends only that task (tokio logs it to stderr and serves on), so the daemon would
/// go on with whatever that task was doing left undone; `dvmd_panics_total` and the log line
/// are how an operator learns of it. Installed once, by `dvmd run`.
pub fn count_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::Relaxed);
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        tracing::error!(thread, panic = %info, "a panic stopped a task; please report it");
        default(info);
    }));
}

/// Why an incoming event was not made into a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Id or signature did not verify.
    BadSignature,
    /// Not a kind we serve.
    WrongKind,
    /// Addressed to other services.
    NotForUs,
    /// Expired or older than the maximum age.
    Stale,
    /// Already seen.
    Duplicate,
    /// Larger than `max_request_bytes` (answered, not stored).
    TooLarge,
    /// Over its npub's `requests_per_npub_per_minute` (not answered, not stored).
    RateLimited,
    /// From an npub the operator blocked.
    Blocked,
    /// From a `new` npub, with less proof of work than `[trust] new_min_pow`.
    NoProofOfWork,
    /// From a `new` npub when all new npubs together used `[trust] new_requests_per_minute`.
    NewKeysBusy,
}

impl Dropped {
    const ALL: [Dropped; 10] = [
        Self::BadSignature,
        Self::WrongKind,
        Self::NotForUs,
        Self::Stale,
        Self::Duplicate,
        Self::TooLarge,
        Self::RateLimited,
        Self::Blocked,
        Self::NoProofOfWork,
        Self::NewKeysBusy,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::BadSignature => "bad_signature",
            Self::WrongKind => "wrong_kind",
            Self::NotForUs => "not_for_us",
            Self::Stale => "stale",
            Self::Duplicate => "duplicate",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::Blocked => "blocked",
            Self::NoProofOfWork => "no_proof_of_work",
            Self::NewKeysBusy => "new_keys_busy",
        }
    }
}

/// Latency buckets in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

/// A cumulative histogram with fixed bucket bounds.
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    /// Sum of the observations, in millionths (microseconds for latencies).
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    /// Latency buckets from 1 ms to 30 s.
    fn default() -> Self {
        Self::with_buckets(LATENCY_BUCKETS)
    }
}

impl Histogram {
    /// A histogram over `bounds` (ascending upper bounds; `+Inf` is implied).
    pub fn with_buckets(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Record one duration (rendered in seconds).
    pub fn observe(&self, elapsed: Duration) {
        self.observe_value(elapsed.as_secs_f64());
    }

    /// Record one value in the histogram's unit.
    pub fn observe_value(&self, value: f64) {
        for (bound, bucket) in self.bounds.iter().zip(self.buckets.iter()) {
            if value <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((value * 1e6) as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Append the histogram in the Prometheus text format.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, bucket) in self.bounds.iter().zip(self.buckets.iter()) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Every metric dvmd exports.
#[derive(Default)]
pub struct Metrics {
    events_received: AtomicU64,
    dropped: [AtomicU64; Dropped::ALL.len()],
    transitions: [AtomicU64; JobState::ALL.len()],
    payments_confirmed: AtomicU64,
    msat_received: AtomicU64,
    credit_jobs: AtomicU64,
    msat_credit_reserved: AtomicU64,
    msat_charged: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    publish_failures: AtomicU64,
    settlement_hints: AtomicU64,
    webhooks_refused: AtomicU64,
    wallet_lookups: AtomicU64,
    /// Wallet-confirmed payment to `processing` feedback sent.
    pub settlement_to_processing: Histogram,
    /// Request received to `payment-required` feedback acknowledged.
    pub request_to_invoice: Histogram,
    /// Model time per job.
    pub inference: Histogram,
    /// Time intake waited for room among the in-flight intake tasks (only waits are recorded).
    pub intake_wait: Histogram,
    /// Time spent waiting for room in the full run queue (only waits are recorded).
    pub run_queue_wait: Histogram,
    /// Time a worker waited for room among the jobs being finished (only waits are recorded).
    pub finishing_wait: Histogram,
    run_queue_depth: AtomicI64,
    intake_lagged: AtomicU64,
    /// HTTP jobs opened, by door: `/v1/chat/completions`, `/v1/jobs`.
    http_jobs: [AtomicU64; 2],
    /// 402 answers that minted an invoice, by kind: an L402 challenge, an npub's top-up.
    challenges: [AtomicU64; 2],
    /// Jobs the estimator learned from, and of those the ones stopped at their budget.
    estimated_jobs: AtomicU64,
    truncated_jobs: AtomicU64,
    /// Jobs awaiting their continuation that ended with the text so far (unpaid or cancelled).
    continuations_given_up: AtomicU64,
    /// HTTP `Payment` sessions closed, by refund outcome: succeeded, failed, skipped.
    sessions_closed: [AtomicU64; 3],
    /// Moving average of p90 coverage, in millionths.
    coverage_ppm: AtomicU64,
    /// Payouts pending after the last reconcile pass, and those of them stuck.
    payouts_pending: AtomicU64,
    payouts_stuck: AtomicU64,
}

/// What a 402 sold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// An L402 token (macaroon and invoice).
    L402,
    /// A top-up for an npub whose balance was short (NIP-98).
    TopUp,
}

impl Metrics {
    /// An event arrived from a relay.
    pub fn event_received(&self) {
        self.events_received.fetch_add(1, Ordering::Relaxed);
    }

    /// An event was not made into a job.
    pub fn dropped(&self, why: Dropped) {
        if let Some(i) = Dropped::ALL.iter().position(|d| *d == why) {
            self.dropped[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A job entered `state`.
    pub fn entered(&self, state: JobState) {
        if let Some(i) = JobState::ALL.iter().position(|s| *s == state) {
            self.transitions[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Our wallet confirmed a payment of `msat`.
    pub fn payment_confirmed(&self, msat: u64) {
        self.payments_confirmed.fetch_add(1, Ordering::Relaxed);
        self.msat_received.fetch_add(msat, Ordering::Relaxed);
    }

    /// A job was paid from credit: `msat` reserved.
    pub fn paid_from_credit(&self, msat: u64) {
        self.credit_jobs.fetch_add(1, Ordering::Relaxed);
        self.msat_credit_reserved.fetch_add(msat, Ordering::Relaxed);
    }

    /// A job was charged `msat` for `prompt` + `completion` tokens.
    pub fn charged(&self, msat: u64, prompt: u32, completion: u32) {
        self.msat_charged.fetch_add(msat, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(u64::from(prompt), Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(u64::from(completion), Ordering::Relaxed);
    }

    /// The wallet hinted that a payment hash may be paid.
    pub fn settlement_hint(&self) {
        self.settlement_hints.fetch_add(1, Ordering::Relaxed);
    }

    /// A wallet webhook came without the right key; how many have, this one included.
    pub fn webhook_refused(&self) -> u64 {
        self.webhooks_refused.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Wallet webhooks refused so far.
    pub fn webhooks_refused(&self) -> u64 {
        self.webhooks_refused.load(Ordering::Relaxed)
    }

    /// Settlement hints received so far.
    pub fn settlement_hints(&self) -> u64 {
        self.settlement_hints.load(Ordering::Relaxed)
    }

    /// dvmd asked its wallet whether an invoice is paid.
    pub fn wallet_lookup(&self) {
        self.wallet_lookups.fetch_add(1, Ordering::Relaxed);
    }

    /// Wallet lookups so far.
    pub fn wallet_lookups(&self) -> u64 {
        self.wallet_lookups.load(Ordering::Relaxed)
    }

    /// Intake fell `missed` events behind the relay pool (they are fetched again).
    pub fn intake_lagged(&self, missed: u64) {
        self.intake_lagged.fetch_add(missed, Ordering::Relaxed);
    }

    /// What the last reconcile pass left of the payouts: still pending, and stuck (past their
    /// invoice's expiry with a wallet that cannot say what became of them).
    pub fn payouts(&self, pending: u64, stuck: u64) {
        self.payouts_pending.store(pending, Ordering::Relaxed);
        self.payouts_stuck.store(stuck, Ordering::Relaxed);
    }

    /// Jobs were added to (+) or taken from (-) the run queue.
    pub fn run_queue_changed(&self, delta: i64) {
        self.run_queue_depth.fetch_add(delta, Ordering::Relaxed);
    }

    /// An HTTP job was opened on its account (`chat`: a chat completion; else `/v1/jobs`).
    pub fn http_job_opened(&self, chat: bool) {
        self.http_jobs[usize::from(!chat)].fetch_add(1, Ordering::Relaxed);
    }

    /// The estimator learned from a job (stopped at its budget when `truncated`); its p90
    /// coverage is now `coverage`.
    pub fn estimated(&self, coverage: f64, truncated: bool) {
        self.estimated_jobs.fetch_add(1, Ordering::Relaxed);
        if truncated {
            self.truncated_jobs.fetch_add(1, Ordering::Relaxed);
        }
        let ppm = (coverage.clamp(0.0, 1.0) * 1e6).round() as u64;
        self.coverage_ppm.store(ppm, Ordering::Relaxed);
    }

    /// A job awaiting its continuation ended with the text so far.
    pub fn continuation_given_up(&self) {
        self.continuations_given_up.fetch_add(1, Ordering::Relaxed);
    }

    /// An HTTP `Payment` session closed (`by` a client or idle) with its refund's outcome.
    pub fn session_closed(&self, _by: &str, refund_status: &str) {
        let slot = match refund_status {
            "succeeded" => 0,
            "failed" => 1,
            _ => 2,
        };
        self.sessions_closed[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// A 402 minted an invoice.
    pub fn challenged(&self, kind: Challenge) {
        self.challenges[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A publish gave up without any relay accepting.
    pub fn publish_failed(&self) {
        self.publish_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        counter(
            &mut out,
            "dvmd_panics_total",
            "Panics in the daemon since it started (each stopped a task; the log says where).",
            PANICS.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "dvmd_events_received_total",
            "Job request events received from relays.",
            self.events_received.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP dvmd_events_dropped_total Events not made into jobs, by reason.\n# TYPE dvmd_events_dropped_total counter"
        );
        for (why, n) in Dropped::ALL.iter().zip(&self.dropped) {
            let _ = writeln!(
                out,
                "dvmd_events_dropped_total{{reason=\"{}\"}} {}",
                why.label(),
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP dvmd_job_transitions_total Jobs entering each state.\n# TYPE dvmd_job_transitions_total counter"
        );
        for (state, n) in JobState::ALL.iter().zip(&self.transitions) {
            let _ = writeln!(
                out,
                "dvmd_job_transitions_total{{state=\"{}\"}} {}",
                state.as_str(),
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP dvmd_http_jobs_opened_total HTTP jobs opened on an account, by door.\n# TYPE dvmd_http_jobs_opened_total counter"
        );
        for (door, n) in ["http_chat", "http_job"].iter().zip(&self.http_jobs) {
            let _ = writeln!(
                out,
                "dvmd_http_jobs_opened_total{{door=\"{door}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP dvmd_payment_challenges_total 402 answers that minted an invoice, by kind.\n# TYPE dvmd_payment_challenges_total counter"
        );
        for (kind, n) in ["l402", "top_up"].iter().zip(&self.challenges) {
            let _ = writeln!(
                out,
                "dvmd_payment_challenges_total{{kind=\"{kind}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        counter(
            &mut out,
            "dvmd_estimated_jobs_total",
            "Jobs run on an estimate (the estimator learned from them).",
            self.estimated_jobs.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "dvmd_jobs_truncated_at_budget_total",
            "Jobs stopped at the completion tokens their payment covered, before they were done.",
            self.truncated_jobs.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "dvmd_continuations_given_up_total",
            "Jobs that stopped at their budget, asked for their continuation and ended with the text so far (unpaid in time, or cancelled).",
            self.continuations_given_up.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP dvmd_sessions_closed_total HTTP Payment sessions closed (by the client or idle), by what became of the refund of their rest.\n# TYPE dvmd_sessions_closed_total counter"
        );
        for (i, refund) in ["succeeded", "failed", "skipped"].iter().enumerate() {
            let _ = writeln!(
                out,
                "dvmd_sessions_closed_total{{refund=\"{refund}\"}} {}",
                self.sessions_closed[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP dvmd_estimate_p90_coverage Moving average of the share of jobs that cost at or under their quoted p90.\n# TYPE dvmd_estimate_p90_coverage gauge\ndvmd_estimate_p90_coverage {:.4}",
            self.coverage_ppm.load(Ordering::Relaxed) as f64 / 1e6
        );
        counter(
            &mut out,
            "dvmd_payments_confirmed_total",
            "Payments confirmed by our wallet.",
            self.payments_confirmed.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "dvmd_received_msat_total",
            "Msat received in confirmed payments.",
            self.msat_received.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "dvmd_credit_jobs_total",
            "Jobs whose whole quote was reserved from the customer's credit.",
            self.credit_jobs.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "dvmd_credit_reserved_msat_total",
            "Msat reserved from credit by jobs paid from credit.",
            self.msat_credit_reserved.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "dvmd_charged_msat_total",
            "Msat charged for completed jobs.",
            self.msat_charged.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "dvmd_prompt_tokens_total",
            "Prompt tokens processed.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "dvmd_completion_tokens_total",
            "Completion tokens generated.",
            self.completion_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "dvmd_publish_failures_total",
            "Events no relay accepted after all retries.",
            self.publish_failures.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "dvmd_settlement_hints_total",
            "Settlement hints from the wallet (webhooks, websockets); each is checked by lookup.",
            self.settlement_hints.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "dvmd_webhooks_refused_total",
            "Posts to /hooks/wallet without the key dvmd gave the wallet; refused, no hint.",
            self.webhooks_refused.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "dvmd_wallet_lookups_total",
            "Invoice lookups in the wallet (hints for one hash are coalesced).",
            self.wallet_lookups.load(Ordering::Relaxed),
        );
        self.settlement_to_processing.render(
            &mut out,
            "dvmd_settlement_to_processing_seconds",
            "From wallet-confirmed payment to processing feedback.",
        );
        self.request_to_invoice.render(
            &mut out,
            "dvmd_request_to_invoice_seconds",
            "From request received to payment-required acknowledged by a relay.",
        );
        self.inference
            .render(&mut out, "dvmd_inference_seconds", "Model time per job.");
        counter(
            &mut out,
            "dvmd_intake_lagged_events_total",
            "Events intake fell behind the relay pool by (each gap is fetched again).",
            self.intake_lagged.load(Ordering::Relaxed),
        );
        self.intake_wait.render(
            &mut out,
            "dvmd_intake_wait_seconds",
            "Time intake waited for room among in-flight requests (backpressure; waits only).",
        );
        self.run_queue_wait.render(
            &mut out,
            "dvmd_run_queue_wait_seconds",
            "Time spent waiting for room in the full run queue (backpressure; waits only).",
        );
        self.finishing_wait.render(
            &mut out,
            "dvmd_finishing_wait_seconds",
            "Time a worker waited for room among jobs whose results are being stored and delivered (backpressure; waits only).",
        );
        let _ = writeln!(
            out,
            "# HELP dvmd_run_queue_depth Paid jobs waiting for a worker.\n# TYPE dvmd_run_queue_depth gauge\ndvmd_run_queue_depth {}",
            self.run_queue_depth.load(Ordering::Relaxed).max(0)
        );
        let _ = writeln!(
            out,
            "# HELP dvmd_payouts_pending Payouts still pending after the last reconcile pass.\n# TYPE dvmd_payouts_pending gauge\ndvmd_payouts_pending {}\n# HELP dvmd_payouts_stuck Pending payouts past their invoice's expiry whose wallet cannot say what became of them (the operator's to resolve).\n# TYPE dvmd_payouts_stuck gauge\ndvmd_payouts_stuck {}",
            self.payouts_pending.load(Ordering::Relaxed),
            self.payouts_stuck.load(Ordering::Relaxed)
        );
        allocator(&mut out);
        out
    }
}

/// The allocator's own view of the process's memory (jemalloc's `stats.*`, the daemon's global
/// allocator): what is live (`allocated`), the pages holding it (`active`), jemalloc's
/// bookkeeping (`metadata`), and what is resident. RSS growth with `allocated` flat is
/// fragmentation, not a structure that grows. Nothing is written where jemalloc is not the
/// allocator (its counters are zero: the test binaries).
fn allocator(out: &mut String) {
    use tikv_jemalloc_ctl::{epoch, stats};
    if epoch::advance().is_err() {
        return;
    }
    let read = [
        (
            "allocated",
            stats::allocated::read(),
            "Bytes the process has allocated and not freed.",
        ),
        (
            "active",
            stats::active::read(),
            "Bytes in the allocator's pages that hold live allocations.",
        ),
        (
            "metadata",
            stats::metadata::read(),
            "Bytes of the allocator's own bookkeeping.",
        ),
        (
            "resident",
            stats::resident::read(),
            "Bytes the allocator holds in physical memory.",
        ),
        (
            "retained",
            stats::retained::read(),
            "Bytes of virtual memory the allocator keeps for reuse, not returned to the system.",
        ),
    ];
    if !matches!(read[0].1, Ok(allocated) if allocated > 0) {
        return;
    }
    for (name, value, help) in read {
        if let Ok(value) = value {
            let _ = writeln!(
                out,
                "# HELP dvmd_allocator_{name}_bytes {help}\n# TYPE dvmd_allocator_{name}_bytes gauge\ndvmd_allocator_{name}_bytes {value}"
            );
        }
    }
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_any_thread_is_counted() {
        super::count_panics();
        let rendered = || Metrics::default().render();
        let before = super::PANICS.load(Ordering::Relaxed);
        let died = std::thread::Builder::new()
            .name("a task that dies".to_owned())
            .spawn(|| panic!("on purpose"))
            .expect("spawn")
            .join();
        assert!(died.is_err());
        let counted = rendered()
            .lines()
            .find_map(|line| line.strip_prefix("dvmd_panics_total ")?.parse::<u64>().ok())
            .expect("dvmd_panics_total");
        assert!(counted > before, "{counted} after {before}");
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.event_received();
        m.dropped(Dropped::Stale);
        m.entered(JobState::Paid);
        m.payment_confirmed(21_000);
        m.settlement_to_processing.observe(Duration::from_millis(3));
        m.http_job_opened(true);
        m.challenged(Challenge::L402);
        m.challenged(Challenge::L402);
        let text = m.render();
        assert!(text.contains("dvmd_http_jobs_opened_total{door=\"http_chat\"} 1\n"));
        assert!(text.contains("dvmd_http_jobs_opened_total{door=\"http_job\"} 0\n"));
        assert!(text.contains("dvmd_payment_challenges_total{kind=\"l402\"} 2\n"));
        assert!(text.contains("dvmd_events_received_total 1\n"));
        assert!(text.contains("dvmd_events_dropped_total{reason=\"stale\"} 1\n"));
        assert!(text.contains("dvmd_job_transitions_total{state=\"paid\"} 1\n"));
        assert!(text.contains("dvmd_received_msat_total 21000\n"));
        assert!(text.contains("dvmd_settlement_to_processing_seconds_bucket{le=\"0.002\"} 0\n"));
        assert!(text.contains("dvmd_settlement_to_processing_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("dvmd_settlement_to_processing_seconds_count 1\n"));
    }
}
