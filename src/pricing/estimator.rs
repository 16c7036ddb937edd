//! The estimator: what a job will cost, as a p50 and a p90 with a confidence, before it runs.
//! Pure: the pipeline feeds it finished jobs and persists it.
//!
//! **What is learned.** Prompts are counted before a job runs, so the only unknown is the
//! completion length. It is learned per (model, job kind, prompt-length bucket) as a histogram
//! of completion tokens with log-spaced bins (exact up to 16 tokens, then 8 bins per doubling,
//! so a bin is at most 9% wide), and per (model, kind) over all prompt lengths. A quantile is
//! read as the upper edge of the bin it falls in, which never under-reads. When a histogram
//! holds [`DECAY_AT`] jobs every bin is halved, so old history fades and the state stays small.
//!
//! **Priors.** With no history the p50 is half of `max_tokens` and the p90 is `max_tokens`
//! itself (the worst case): a new service asks for the cap until it has learned. History is
//! blended in with weight `n / (n + PRIOR_WEIGHT)` for `n` jobs behind it; a prompt-length
//! bucket with fewer than [`MIN_BUCKET_HISTORY`] jobs borrows the kind's whole history.
//!
//! **Calibration.** The figure quoted as "p90" is the histogram's quantile at a percentile
//! the estimator moves to hold 90% coverage (the share of jobs whose cost came out at or under
//! it): each job covered lowers it by `STEP * 0.1`, each job not covered raises it by
//! `STEP * 0.9` (adaptive conformal inference: in the long run exactly 10% are missed whatever
//! the lengths do). A job stopped at its budget counts as not covered. Only jobs quoted from
//! history move it, so the cautious priors do not drag it down. Coverage itself is tracked as
//! an exponential moving average for the metrics and the benchmark.
//!
//! **What is asked.** Paying exactly the p90 would stop one job in ten at its budget. So the
//! amount asked up front is read at a second calibrated percentile, moved the same way to fund
//! [`FUNDED_COVERAGE`] of jobs in full (under 5% stop at their budget); it is never under the
//! p90, and what a job does not use comes back.
//!
//! **Confidence** (0-100) is `100 * n / (n + 20) * p50 / p90`: low where history is thin (few
//! jobs behind the estimate) or where lengths vary widely (the p90 far above the p50).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::RateCard;

/// Bins counted exactly (completion lengths 0..16).
const EXACT: u32 = 16;
/// Log-spaced bins per doubling above [`EXACT`].
const BINS_PER_DOUBLING: f64 = 8.0;
/// A histogram holding this many jobs halves every bin.
pub const DECAY_AT: u32 = 2_000;
/// Weight of the prior, in jobs.
pub const PRIOR_WEIGHT: f64 = 10.0;
/// Jobs a prompt-length bucket needs before it is used on its own.
pub const MIN_BUCKET_HISTORY: u32 = 30;
/// Jobs behind an estimate before it moves the calibration.
pub const MIN_CALIBRATING_HISTORY: u32 = 30;
/// The coverage the quoted p90 is held at.
pub const TARGET_COVERAGE: f64 = 0.90;
/// The share of jobs the amount asked up front pays for in full.
pub const FUNDED_COVERAGE: f64 = 0.96;
/// How far one job moves the quoted percentile.
const STEP: f64 = 0.01;
/// The range the quoted percentile moves in.
const PERCENTILE_RANGE: (f64, f64) = (0.50, 0.995);
/// Weight of the latest job in the coverage average.
const COVERAGE_EMA: f64 = 0.02;

/// The estimate for one job, as quoted (and stored with the job).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Estimate {
    /// Prompt tokens counted for the quote.
    pub prompt_tokens: u32,
    /// The completion budget asked for.
    pub max_tokens: u32,
    /// Median cost, msat.
    pub p50_msat: u64,
    /// The cost the estimator expects 90% of such jobs to stay at or under, msat.
    pub p90_msat: u64,
    /// The worst case (every token of `max_tokens` generated), msat.
    pub cap_msat: u64,
    /// What is asked up front: enough for [`FUNDED_COVERAGE`] of such jobs, at least the p90
    /// (0 in records from before it existed: the p90 is asked).
    #[serde(default)]
    pub funded_msat: u64,
    /// The least the job can cost (the prompt and one completion token), msat.
    pub floor_msat: u64,
    /// How sure the estimate is, 0-100.
    pub confidence: u8,
    /// The histogram percentile read for the p90 after calibration, per mille.
    pub percentile_permille: u16,
    /// Jobs of history behind the estimate.
    pub history: u32,
}

/// What a job is asked for, from its estimate and the customer's bid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    /// What it must be funded with before it runs, msat.
    pub due_msat: u64,
    /// The most it may hold (credit is reserved up to this), msat.
    pub limit_msat: u64,
}

impl Estimate {
    /// The ask for a customer who bid `bid_msat`: funded with [`Estimate::funded_msat`] (at
    /// least the p90), holding up to the cap, neither above the bid. A bid under that is asked
    /// for in whole sats, rounded down (wallets that work in sats round invoices up), unless
    /// that would not pay for one token.
    pub fn ask(&self, bid_msat: Option<u64>) -> Ask {
        let bid = bid_msat.unwrap_or(u64::MAX);
        let funded = self.funded_msat.max(self.p90_msat);
        let due_msat = if bid < funded {
            Some(bid / 1000 * 1000)
                .filter(|whole| *whole >= self.floor_msat)
                .unwrap_or(bid)
        } else {
            funded
        };
        Ask {
            due_msat,
            limit_msat: self.cap_msat.min(bid),
        }
    }
}

/// A completion-length histogram.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Histogram {
    /// Jobs per bin (trailing empty bins are not stored).
    bins: Vec<u32>,
    /// Sum of `bins`.
    total: u32,
}

impl Histogram {
    fn add(&mut self, tokens: u32) {
        let bin = bin_of(tokens);
        if self.bins.len() <= bin {
            self.bins.resize(bin + 1, 0);
        }
        self.bins[bin] = self.bins[bin].saturating_add(1);
        self.total = self.total.saturating_add(1);
        if self.total >= DECAY_AT {
            for count in &mut self.bins {
                *count /= 2;
            }
            self.total = self.bins.iter().sum();
        }
    }

    /// The completion length at `percentile` (0-1), read as the upper edge of its bin.
    fn quantile(&self, percentile: f64) -> Option<u32> {
        if self.total == 0 {
            return None;
        }
        let wanted = ((percentile * f64::from(self.total)).ceil() as u32).clamp(1, self.total);
        let mut seen = 0u32;
        for (bin, count) in self.bins.iter().enumerate() {
            seen += count;
            if seen >= wanted {
                return Some(upper_edge(bin));
            }
        }
        self.bins.len().checked_sub(1).map(upper_edge)
    }
}

/// The bin of a completion length.
fn bin_of(tokens: u32) -> usize {
    if tokens < EXACT {
        return tokens as usize;
    }
    let steps = (f64::from(tokens) / f64::from(EXACT)).log2() * BINS_PER_DOUBLING;
    EXACT as usize + steps.floor() as usize
}

/// The largest length in `bin`.
fn upper_edge(bin: usize) -> u32 {
    if bin < EXACT as usize - 1 {
        return bin as u32;
    }
    // The first length of the next bin, found from the formula and corrected for rounding;
    // the last bin ends at `u32::MAX`.
    let bin_of_wide = |tokens: u64| u32::try_from(tokens).map_or(usize::MAX, bin_of);
    let next = bin + 1;
    let steps = (next - EXACT as usize) as f64 / BINS_PER_DOUBLING;
    let mut first = (f64::from(EXACT) * steps.exp2()).ceil().min(1e12) as u64;
    while first > u64::from(EXACT) && bin_of_wide(first - 1) >= next {
        first -= 1;
    }
    while bin_of_wide(first) < next {
        first += 1;
    }
    u32::try_from(first - 1).unwrap_or(u32::MAX)
}

/// The prompt-length bucket: one per doubling from 32 tokens.
fn prompt_bucket(prompt_tokens: u32) -> u32 {
    (32 - prompt_tokens.max(1).leading_zeros()).saturating_sub(5)
}

/// The calibration of one (model, kind).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Calibration {
    /// The percentile read for the quoted p90.
    percentile: f64,
    /// The percentile read for the amount asked.
    #[serde(default = "funded_default")]
    funded_percentile: f64,
    /// Moving average of coverage.
    coverage: f64,
    /// Jobs that moved it.
    jobs: u64,
}

fn funded_default() -> f64 {
    FUNDED_COVERAGE
}

impl Default for Calibration {
    fn default() -> Self {
        Self {
            percentile: TARGET_COVERAGE,
            funded_percentile: FUNDED_COVERAGE,
            coverage: TARGET_COVERAGE,
            jobs: 0,
        }
    }
}

/// What the estimator learns from one finished job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Its estimate, as quoted.
    pub estimate: Estimate,
    /// Completion tokens generated.
    pub completion_tokens: u32,
    /// What it cost at the rate card, msat (before any cap by what was paid).
    pub cost_msat: u64,
    /// It stopped at its budget (what was paid) before it was done.
    pub truncated: bool,
    /// What it was funded with, msat.
    pub funds_msat: u64,
}

/// Coverage figures for one (model, kind).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coverage {
    /// Moving average of the share of jobs at or under their p90.
    pub coverage: f64,
    /// The percentile quoted as p90.
    pub percentile: f64,
    /// The percentile read for the amount asked up front.
    pub funded_percentile: f64,
    /// Jobs that moved the calibration.
    pub jobs: u64,
}

/// Everything learned, for every (model, kind). Serializable to persist it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Estimator {
    /// Completion lengths by `model/kind/bucket` and by `model/kind` (all prompt lengths).
    lengths: BTreeMap<String, Histogram>,
    /// Calibration by `model/kind`.
    calibration: BTreeMap<String, Calibration>,
}

fn series(model: &str, kind: u16) -> String {
    format!("{model}/{kind}")
}

fn bucket_series(model: &str, kind: u16, prompt_tokens: u32) -> String {
    format!("{model}/{kind}/{}", prompt_bucket(prompt_tokens))
}

impl Estimator {
    /// The estimate for a job of `kind` on `model` with `prompt_tokens` that may generate up to
    /// `max_tokens`, at `card`.
    pub fn estimate(
        &self,
        card: &RateCard,
        model: &str,
        kind: u16,
        prompt_tokens: u32,
        max_tokens: u32,
    ) -> Estimate {
        let series_key = series(model, kind);
        let (percentile, funded_percentile) = self
            .calibration
            .get(&series_key)
            .map_or((TARGET_COVERAGE, FUNDED_COVERAGE), |c| {
                (c.percentile, c.funded_percentile)
            });
        let bucket = self
            .lengths
            .get(&bucket_series(model, kind, prompt_tokens))
            .filter(|h| h.total >= MIN_BUCKET_HISTORY);
        let history = bucket.or_else(|| self.lengths.get(&series_key));
        let n = history.map_or(0, |h| h.total);
        let weight = f64::from(n) / (f64::from(n) + PRIOR_WEIGHT);
        let blend = |learned: Option<u32>, prior: u32| -> u32 {
            let learned = learned.unwrap_or(prior).min(max_tokens);
            let mixed = weight * f64::from(learned) + (1.0 - weight) * f64::from(prior);
            (mixed.ceil() as u32).min(max_tokens)
        };
        let p50_tokens = blend(
            history.and_then(|h| h.quantile(0.5)),
            max_tokens.div_ceil(2),
        );
        let p90_tokens =
            blend(history.and_then(|h| h.quantile(percentile)), max_tokens).max(p50_tokens);
        let funded_tokens = blend(
            history.and_then(|h| h.quantile(funded_percentile)),
            max_tokens,
        )
        .max(p90_tokens);
        let p50_msat = card.quote(prompt_tokens, p50_tokens);
        let p90_msat = card.quote(prompt_tokens, p90_tokens);
        let spread = if p90_msat == 0 {
            1.0
        } else {
            p50_msat as f64 / p90_msat as f64
        };
        let thin = f64::from(n) / (f64::from(n) + 20.0);
        Estimate {
            prompt_tokens,
            max_tokens,
            p50_msat,
            p90_msat,
            cap_msat: card.quote(prompt_tokens, max_tokens),
            funded_msat: card.quote(prompt_tokens, funded_tokens),
            floor_msat: card.quote(prompt_tokens, max_tokens.min(1)),
            confidence: (100.0 * thin * spread).round().clamp(0.0, 100.0) as u8,
            percentile_permille: (percentile * 1000.0).round() as u16,
            history: n,
        }
    }

    /// Learn from a finished job of `kind` on `model`.
    pub fn observe(&mut self, model: &str, kind: u16, outcome: &Outcome) {
        let estimate = &outcome.estimate;
        let series_key = series(model, kind);
        // A job stopped short of its p90 because it was funded with less (a low bid) says
        // nothing about the p90: its length is unknown.
        let censored = outcome.truncated && outcome.funds_msat < estimate.p90_msat;
        if estimate.history >= MIN_CALIBRATING_HISTORY && !censored {
            let covered = !outcome.truncated && outcome.cost_msat <= estimate.p90_msat;
            let calibration = self.calibration.entry(series_key.clone()).or_default();
            let (low, high) = PERCENTILE_RANGE;
            let hit = if covered { 1.0 } else { 0.0 };
            calibration.percentile =
                (calibration.percentile + STEP * (TARGET_COVERAGE - hit)).clamp(low, high);
            calibration.coverage += COVERAGE_EMA * (hit - calibration.coverage);
            calibration.jobs += 1;
        }
        let funded = estimate.funded_msat.max(estimate.p90_msat);
        let short_funded = outcome.truncated && outcome.funds_msat < funded;
        if estimate.history >= MIN_CALIBRATING_HISTORY && !short_funded {
            let paid_for = !outcome.truncated && outcome.cost_msat <= funded;
            let calibration = self.calibration.entry(series_key.clone()).or_default();
            let hit = if paid_for { 1.0 } else { 0.0 };
            calibration.funded_percentile = (calibration.funded_percentile
                + STEP * (FUNDED_COVERAGE - hit))
                .clamp(PERCENTILE_RANGE.0, 0.999);
        }
        // A job stopped at its budget would have gone on: its length is at least this, and
        // counting it as the length keeps the histogram's upper tail honest enough.
        let tokens = outcome.completion_tokens;
        self.lengths.entry(series_key).or_default().add(tokens);
        self.lengths
            .entry(bucket_series(model, kind, estimate.prompt_tokens))
            .or_default()
            .add(tokens);
    }

    /// Coverage so far for `kind` on `model`.
    pub fn coverage(&self, model: &str, kind: u16) -> Coverage {
        let calibration = self
            .calibration
            .get(&series(model, kind))
            .cloned()
            .unwrap_or_default();
        Coverage {
            coverage: calibration.coverage,
            percentile: calibration.percentile,
            funded_percentile: calibration.funded_percentile,
            jobs: calibration.jobs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CARD: RateCard = RateCard {
        base_fee_msat: 1_000,
        prompt_msat_per_1k_tokens: 2_000,
        completion_msat_per_1k_tokens: 10_000,
    };

    fn outcome(estimate: Estimate, completion_tokens: u32) -> Outcome {
        Outcome {
            estimate,
            completion_tokens,
            cost_msat: CARD.charge(crate::infer::Usage {
                prompt_tokens: estimate.prompt_tokens,
                completion_tokens,
            }),
            truncated: false,
            funds_msat: estimate.p90_msat,
        }
    }

    /// A deterministic spread of lengths: 10% of jobs run long.
    fn length(i: u32) -> u32 {
        if i % 10 == 9 {
            300 + (i * 7) % 100
        } else {
            40 + (i * 13) % 60
        }
    }

    #[test]
    fn the_ask_is_the_p90_within_the_bid_in_whole_sats() {
        let estimate = Estimate {
            p50_msat: 2_000,
            p90_msat: 5_000,
            cap_msat: 11_000,
            floor_msat: 1_100,
            ..Estimate::default()
        };
        let ask = |bid| estimate.ask(bid);
        assert_eq!(
            ask(None),
            Ask {
                due_msat: 5_000,
                limit_msat: 11_000
            }
        );
        assert_eq!(
            ask(Some(20_000)),
            Ask {
                due_msat: 5_000,
                limit_msat: 11_000
            }
        );
        assert_eq!(
            ask(Some(7_000)),
            Ask {
                due_msat: 5_000,
                limit_msat: 7_000
            }
        );
        assert_eq!(
            ask(Some(4_321)),
            Ask {
                due_msat: 4_000,
                limit_msat: 4_321
            }
        );
        // Rounding down would not pay for a token: the bid as it is.
        assert_eq!(
            ask(Some(1_500)),
            Ask {
                due_msat: 1_500,
                limit_msat: 1_500
            }
        );
    }

    #[test]
    fn bins_cover_every_length_once_and_in_order() {
        let mut last_bin = 0;
        for tokens in 0..100_000u32 {
            let bin = bin_of(tokens);
            assert!(bin == last_bin || bin == last_bin + 1, "{tokens}");
            assert!(upper_edge(bin) >= tokens, "{tokens} above its bin's edge");
            if bin > 0 {
                assert!(upper_edge(bin - 1) < tokens, "{tokens} in two bins");
            }
            last_bin = bin;
        }
        // At most 9% wide above the exact range.
        assert!(upper_edge(bin_of(1_000)) <= 1_090);
        assert_eq!(bin_of(u32::MAX), bin_of(u32::MAX - 1));
        assert_eq!(upper_edge(bin_of(u32::MAX)), u32::MAX);
    }

    #[test]
    fn prompt_buckets_double() {
        assert_eq!(prompt_bucket(0), 0);
        assert_eq!(prompt_bucket(31), 0);
        assert_eq!(prompt_bucket(32), 1);
        assert_eq!(prompt_bucket(63), 1);
        assert_eq!(prompt_bucket(64), 2);
        assert_eq!(prompt_bucket(u32::MAX), 27);
    }

    #[test]
    fn with_no_history_the_p90_is_the_cap_and_confidence_is_zero() {
        let estimate = Estimator::default().estimate(&CARD, "m", 5050, 50, 400);
        assert_eq!(estimate.cap_msat, CARD.quote(50, 400));
        assert_eq!(estimate.p90_msat, estimate.cap_msat);
        assert_eq!(estimate.funded_msat, estimate.cap_msat);
        assert_eq!(estimate.p50_msat, CARD.quote(50, 200));
        assert_eq!(estimate.confidence, 0);
        assert_eq!(estimate.history, 0);
    }

    #[test]
    fn learns_lengths_and_grows_confident() {
        let mut estimator = Estimator::default();
        for i in 0..1_000 {
            let estimate = estimator.estimate(&CARD, "m", 5050, 50, 1_000);
            estimator.observe("m", 5050, &outcome(estimate, length(i)));
        }
        let estimate = estimator.estimate(&CARD, "m", 5050, 50, 1_000);
        let tokens = |msat: u64| (msat - CARD.quote(50, 0)) / 10;
        // Lengths 40..100 nine times in ten: the median is within them, the p90 near 100.
        assert!(
            (40..=110).contains(&tokens(estimate.p50_msat)),
            "{estimate:?}"
        );
        assert!(
            (90..=450).contains(&tokens(estimate.p90_msat)),
            "{estimate:?}"
        );
        assert!(estimate.p90_msat < estimate.cap_msat / 2, "{estimate:?}");
        assert!(estimate.confidence > 20, "{estimate:?}");
        // Another model or kind has learned nothing.
        let other = estimator.estimate(&CARD, "other", 5050, 50, 1_000);
        assert_eq!(other.p90_msat, other.cap_msat);
    }

    #[test]
    fn calibration_holds_coverage_near_ninety_percent() {
        let mut estimator = Estimator::default();
        let (mut covered, mut funded_in_full, mut counted) = (0u32, 0u32, 0u32);
        for i in 0..6_000u32 {
            let estimate = estimator.estimate(&CARD, "m", 5050, 50, 1_000);
            let mut done = outcome(estimate, length(i.wrapping_mul(2_654_435_761) >> 7));
            done.funds_msat = estimate.ask(None).due_msat;
            done.truncated = done.cost_msat > done.funds_msat;
            if i >= 3_000 {
                counted += 1;
                covered += u32::from(done.cost_msat <= estimate.p90_msat);
                funded_in_full += u32::from(!done.truncated);
            }
            estimator.observe("m", 5050, &done);
        }
        let share = f64::from(covered) / f64::from(counted);
        assert!((0.85..=0.95).contains(&share), "held-out coverage {share}");
        let funded = f64::from(funded_in_full) / f64::from(counted);
        assert!(funded >= 0.95, "held-out jobs funded in full {funded}");
        let coverage = estimator.coverage("m", 5050);
        assert!((0.8..=1.0).contains(&coverage.coverage), "{coverage:?}");
        assert!(coverage.jobs > 5_000);
    }

    #[test]
    fn a_job_cut_short_by_a_low_bid_does_not_move_the_calibration() {
        let mut estimator = Estimator::default();
        for i in 0..100 {
            let estimate = estimator.estimate(&CARD, "m", 5050, 50, 1_000);
            estimator.observe("m", 5050, &outcome(estimate, length(i)));
        }
        let before = estimator.coverage("m", 5050);
        let estimate = estimator.estimate(&CARD, "m", 5050, 50, 1_000);
        let mut low_bid = outcome(estimate, 3);
        (low_bid.truncated, low_bid.funds_msat) = (true, estimate.floor_msat + 20);
        estimator.observe("m", 5050, &low_bid);
        assert_eq!(estimator.coverage("m", 5050), before);
        // Funded with the p90 and still stopped: a miss.
        let mut cut = outcome(estimate, 90);
        cut.truncated = true;
        estimator.observe("m", 5050, &cut);
        assert!(estimator.coverage("m", 5050).percentile > before.percentile);
    }

    #[test]
    fn a_thin_bucket_borrows_the_kinds_history() {
        let mut estimator = Estimator::default();
        for i in 0..200 {
            let estimate = estimator.estimate(&CARD, "m", 5050, 50, 1_000);
            estimator.observe("m", 5050, &outcome(estimate, length(i)));
        }
        let long_prompt = estimator.estimate(&CARD, "m", 5050, 3_000, 1_000);
        assert_eq!(long_prompt.history, 200);
        assert!(long_prompt.p90_msat < long_prompt.cap_msat);
    }

    #[test]
    fn history_decays_and_survives_serialization() {
        let mut estimator = Estimator::default();
        for i in 0..(DECAY_AT * 3) {
            let estimate = estimator.estimate(&CARD, "m", 5050, 50, 1_000);
            estimator.observe("m", 5050, &outcome(estimate, length(i)));
        }
        let histogram = &estimator.lengths["m/5050"];
        assert!(histogram.total < DECAY_AT);
        assert_eq!(histogram.total, histogram.bins.iter().sum::<u32>());
        let json = serde_json::to_string(&estimator).expect("serializes");
        let back: Estimator = serde_json::from_str(&json).expect("deserializes");
        // Histograms exactly; percentiles to the last bit of a float's text form.
        assert_eq!(back.lengths, estimator.lengths);
        for max_tokens in [64, 300, 1_000] {
            assert_eq!(
                back.estimate(&CARD, "m", 5050, 50, max_tokens),
                estimator.estimate(&CARD, "m", 5050, 50, max_tokens)
            );
        }
        assert!(json.len() < 4_096, "{} bytes", json.len());
    }

    #[test]
    fn estimates_never_exceed_the_cap_or_fall_below_the_prompt() {
        let mut estimator = Estimator::default();
        for i in 0..500 {
            let estimate = estimator.estimate(&CARD, "m", 5050, 50, 4_000);
            estimator.observe("m", 5050, &outcome(estimate, length(i) * 10));
        }
        for max_tokens in [0, 1, 16, 64, 100, 4_000] {
            let estimate = estimator.estimate(&CARD, "m", 5050, 50, max_tokens);
            assert!(estimate.p50_msat <= estimate.p90_msat);
            assert!(estimate.p90_msat <= estimate.cap_msat, "{estimate:?}");
            assert!(estimate.p50_msat >= CARD.quote(50, 0));
        }
    }
}
