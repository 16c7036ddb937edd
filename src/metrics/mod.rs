//! Prometheus metrics: a fixed set of counters and histograms, rendered in the text format.
//!
//! Hand-rolled on atomics: the set is small and known, and recording sits on the intake and
//! settlement paths, where a lock or a registry lookup per event would show.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::job::JobState;

mod histogram;
mod render;

pub use histogram::Histogram;

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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
