//! The Prometheus text exposition of [`Metrics`]: every counter, gauge and histogram, and the
//! allocator's own figures.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use super::{Dropped, Metrics, PANICS};
use crate::job::JobState;

impl Metrics {
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
