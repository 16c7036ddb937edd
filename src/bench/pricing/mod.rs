//! `dvmd bench pricing`: how well the estimator prices real jobs.
//!
//! The prompt set the project ships (`prompts.txt`: questions, summaries, lists, code,
//! creative, long and short) runs through the embedded model one prompt at a time, as the
//! daemon would price and run it: each is estimated, "paid" its p90 (the invoice the relay door
//! would issue), and then generated without a budget, so the true length is known. The first
//! half warms the estimator up; the held-out second half is measured:
//!
//! - p90 coverage: the share whose true cost is at or under the p90 quoted (target 90% +/- 5%);
//! - the mean up-front payment (the amount asked, calibrated to fund 96% of jobs in full)
//!   against the worst-case quote (what customers pay less up front);
//! - refunds: what the paid amount returned after the exact charge;
//! - truncation: jobs whose true length exceeded what their payment covered (the daemon stops
//!   those at their budget; target under 5%).
//!
//! The estimator learns from every job as the daemon does (a truncated job teaches the length
//! it would have been stopped at, and counts as not covered).

use std::path::PathBuf;
use std::time::Instant;

use super::BenchError;
use crate::infer::llama::{LlamaBackend, LlamaConfig};
use crate::infer::{self, Backend, ChatMessage, GenerateRequest, Sampling, Usage};
use crate::pricing::{self, Estimator, Outcome, RateCard};

/// The prompt set: `<category>\t<prompt>` per line, `#` comments.
const PROMPTS: &str = include_str!("prompts.txt");
/// The model name the estimator files its history under.
const MODEL: &str = "bench";

/// The shipped prompts, as (category, prompt).
pub fn prompts() -> Vec<(&'static str, &'static str)> {
    PROMPTS
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split_once('\t'))
        .collect()
}

/// Totals over the held-out half.
#[derive(Debug, Default)]
struct HeldOut {
    jobs: u32,
    covered: u32,
    truncated: u32,
    paid_msat: u64,
    cap_msat: u64,
    refunded_msat: u64,
    confidence: u64,
}

/// Run the prompt set (the first `limit` of it, when given) through the model at `path` with
/// `max_tokens` per job, at the default rate card.
pub async fn run(path: PathBuf, max_tokens: u32, limit: Option<usize>) -> Result<(), BenchError> {
    let mut prompts = prompts();
    prompts.truncate(limit.unwrap_or(usize::MAX));
    // Every core: nothing else runs beside the model here.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let config = LlamaConfig {
        model_path: path.clone(),
        threads: Some(threads),
        context_tokens: 2048,
    };
    let backend = tokio::task::spawn_blocking(move || LlamaBackend::load(&config)).await??;
    let card = RateCard::default();
    let warm_up = prompts.len() / 2;
    println!(
        "bench pricing: {} prompts ({warm_up} warm-up, {} held out), max_tokens {max_tokens}, model {} ({threads} threads), rate card {card:?}",
        prompts.len(),
        prompts.len() - warm_up,
        path.display()
    );

    let mut estimator = Estimator::default();
    let mut held = HeldOut::default();
    let mut generated = 0u64;
    let started = Instant::now();
    for (i, (_, prompt)) in prompts.iter().enumerate() {
        let request = GenerateRequest {
            continue_from: None,
            model: None,
            messages: vec![ChatMessage::user(*prompt)],
            sampling: Sampling {
                seed: Some(i as u32),
                ..Sampling::default()
            },
        };
        let prompt_tokens = match backend.count_prompt_tokens(&request).await? {
            Some(n) => n,
            None => pricing::estimate_prompt_tokens(prompt.len()),
        };
        let estimate = estimator.estimate(&card, MODEL, 5050, prompt_tokens, max_tokens);
        let paid = estimate.ask(None).due_msat;
        let budget = card.completion_tokens_within(paid, prompt_tokens);
        let (_, usage, _) = infer::collect(backend.generate(request, max_tokens).await?).await?;
        generated += u64::from(usage.completion_tokens);
        let truncated = usage.completion_tokens > budget;
        let run = Usage {
            prompt_tokens,
            completion_tokens: usage.completion_tokens.min(budget),
        };
        let charged = card.charge(run).min(paid);
        estimator.observe(
            MODEL,
            5050,
            &Outcome {
                estimate,
                completion_tokens: run.completion_tokens,
                cost_msat: card.charge(run),
                truncated,
                funds_msat: paid,
            },
        );
        if i >= warm_up {
            let true_cost = card.charge(Usage {
                prompt_tokens,
                completion_tokens: usage.completion_tokens,
            });
            held.jobs += 1;
            held.covered += u32::from(true_cost <= estimate.p90_msat);
            held.truncated += u32::from(truncated);
            held.paid_msat += paid;
            held.cap_msat += estimate.cap_msat;
            held.refunded_msat += paid - charged;
            held.confidence += u64::from(estimate.confidence);
        }
        if (i + 1) % 100 == 0 {
            println!(
                "  {:>5} prompts, {:.0} s, {generated} tokens generated",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }

    let jobs = f64::from(held.jobs.max(1));
    let share = |n: u32| 100.0 * f64::from(n) / jobs;
    let coverage = estimator.coverage(MODEL, 5050);
    println!("held out ({} jobs):", held.jobs);
    println!(
        "  p90 coverage                : {:5.1}% (target 90 +/- 5)",
        share(held.covered)
    );
    println!(
        "  truncated at their budget   : {:5.1}% ({} jobs; target under 5%)",
        share(held.truncated),
        held.truncated
    );
    println!(
        "  paid up front, mean         : {:>8.0} msat against a worst-case quote of {:.0} msat ({:.0}% less)",
        held.paid_msat as f64 / jobs,
        held.cap_msat as f64 / jobs,
        100.0 * (1.0 - held.paid_msat as f64 / held.cap_msat.max(1) as f64)
    );
    println!(
        "  returned after the charge   : {:>8.0} msat per job ({} msat in all)",
        held.refunded_msat as f64 / jobs,
        held.refunded_msat
    );
    println!(
        "  confidence, mean            : {:>8.0}",
        held.confidence as f64 / jobs
    );
    println!(
        "  calibrated percentiles      : p90 read at {:.3}, the amount asked at {:.3} (p90 coverage average {:.3} over {} calibrating jobs)",
        coverage.percentile, coverage.funded_percentile, coverage.coverage, coverage.jobs
    );
    println!(
        "  time                        : {:.0} s, {generated} tokens generated",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_prompt_set_has_a_thousand_prompts_of_every_category() {
        let prompts = super::prompts();
        assert!(prompts.len() >= 1_000, "{}", prompts.len());
        for category in [
            "question", "summary", "list", "code", "creative", "long", "short",
        ] {
            assert!(
                prompts.iter().filter(|(c, _)| *c == category).count() >= 10,
                "{category}"
            );
        }
    }
}
