//! Pricing: the operator's rate card, the estimate quoted before a job runs, and the exact
//! charge after it ran. Pure.
//!
//! The cap ([`RateCard::quote`]) assumes the whole `max_tokens` budget is used; the
//! [`estimator`] learns what jobs really generate and quotes a p50 and a p90 below it. The
//! charge uses the exact usage the backend reported, never more than the job was paid.

pub mod estimator;
pub mod receipt;

use serde::{Deserialize, Serialize};

pub use estimator::{Ask, Estimate, Estimator, Outcome};
pub use receipt::{Finish, Receipt};

use crate::infer::Usage;

/// Prices in msat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateCard {
    /// Flat fee per job.
    pub base_fee_msat: u64,
    /// Per 1000 prompt tokens.
    pub prompt_msat_per_1k_tokens: u64,
    /// Per 1000 completion tokens.
    pub completion_msat_per_1k_tokens: u64,
}

impl Default for RateCard {
    fn default() -> Self {
        Self {
            base_fee_msat: 1_000,
            prompt_msat_per_1k_tokens: 2_000,
            completion_msat_per_1k_tokens: 10_000,
        }
    }
}

impl RateCard {
    /// The price of a job with `prompt_tokens` that may generate up to `max_tokens`.
    pub fn quote(&self, prompt_tokens: u32, max_tokens: u32) -> u64 {
        self.charge(Usage {
            prompt_tokens,
            completion_tokens: max_tokens,
        })
    }

    /// The price of exactly `usage`.
    pub fn charge(&self, usage: Usage) -> u64 {
        self.base_fee_msat
            .saturating_add(per_1k(usage.prompt_tokens, self.prompt_msat_per_1k_tokens))
            .saturating_add(per_1k(
                usage.completion_tokens,
                self.completion_msat_per_1k_tokens,
            ))
    }
}

impl RateCard {
    /// A rate card from the hardware's cost: each token costs the share of an hour it takes.
    /// `cost_msat_per_hour` is what the machine costs the operator (margin included);
    /// `prompt_secs` and `completion_secs` are measured seconds per token. Rounded up.
    pub fn from_hardware(
        base_fee_msat: u64,
        cost_msat_per_hour: u64,
        prompt_secs: f64,
        completion_secs: f64,
    ) -> Self {
        let per_1k = |secs: f64| {
            let msat = cost_msat_per_hour as f64 * secs.max(0.0) * 1000.0 / 3600.0;
            if msat.is_finite() {
                // Up, but not over a float's last bit (10.000000000000002 is 10).
                (msat - 1e-6).ceil().clamp(0.0, u64::MAX as f64) as u64
            } else {
                u64::MAX
            }
        };
        Self {
            base_fee_msat,
            prompt_msat_per_1k_tokens: per_1k(prompt_secs),
            completion_msat_per_1k_tokens: per_1k(completion_secs),
        }
    }

    /// The most completion tokens `funds_msat` pays for after the base fee and `prompt_tokens`
    /// (so `charge` of them never exceeds the funds); `u32::MAX` when completion is free.
    pub fn completion_tokens_within(&self, funds_msat: u64, prompt_tokens: u32) -> u32 {
        let fixed = self.quote(prompt_tokens, 0);
        let Some(left) = funds_msat.checked_sub(fixed) else {
            return 0;
        };
        if self.completion_msat_per_1k_tokens == 0 {
            return u32::MAX;
        }
        let tokens = u128::from(left) * 1000 / u128::from(self.completion_msat_per_1k_tokens);
        u32::try_from(tokens).unwrap_or(u32::MAX)
    }
}

/// `tokens * rate / 1000`, rounded up so a job is never charged less than its tokens cost.
fn per_1k(tokens: u32, msat_per_1k: u64) -> u64 {
    u64::from(tokens).saturating_mul(msat_per_1k).div_ceil(1000)
}

/// A conservative prompt token count for backends that cannot tokenize before running: about
/// one token per 3 bytes plus room for the chat template. Overestimating only means a larger
/// remainder returned to the customer.
pub fn estimate_prompt_tokens(prompt_bytes: usize) -> u32 {
    u32::try_from(prompt_bytes.div_ceil(3).saturating_add(32)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CARD: RateCard = RateCard {
        base_fee_msat: 1_000,
        prompt_msat_per_1k_tokens: 2_000,
        completion_msat_per_1k_tokens: 10_000,
    };

    #[test]
    fn quote_is_base_plus_tokens() {
        assert_eq!(CARD.quote(0, 0), 1_000);
        assert_eq!(CARD.quote(1_000, 1_000), 1_000 + 2_000 + 10_000);
        // 1 prompt token costs 2 msat, 1 completion token 10 msat.
        assert_eq!(CARD.quote(1, 1), 1_000 + 2 + 10);
    }

    #[test]
    fn fractions_round_up() {
        let card = RateCard {
            base_fee_msat: 0,
            prompt_msat_per_1k_tokens: 1,
            completion_msat_per_1k_tokens: 0,
        };
        assert_eq!(card.quote(1, 0), 1);
        assert_eq!(card.quote(1000, 0), 1);
        assert_eq!(card.quote(1001, 0), 2);
    }

    #[test]
    fn charge_never_exceeds_quote_for_the_same_prompt() {
        for completion in 0..=300 {
            let charge = CARD.charge(Usage {
                prompt_tokens: 57,
                completion_tokens: completion,
            });
            assert!(charge <= CARD.quote(57, 300));
        }
    }

    #[test]
    fn completion_within_funds_never_costs_more_than_the_funds() {
        for funds in [0, 999, 1_000, 1_113, 1_114, 5_000, 123_457] {
            let tokens = CARD.completion_tokens_within(funds, 57);
            if funds < CARD.quote(57, 0) {
                assert_eq!(tokens, 0);
                continue;
            }
            assert!(CARD.quote(57, tokens) <= funds, "{funds}: {tokens}");
            assert!(
                CARD.quote(57, tokens + 1) > funds,
                "{funds}: {tokens} is not the most"
            );
        }
        let free = RateCard {
            completion_msat_per_1k_tokens: 0,
            ..CARD
        };
        assert_eq!(free.completion_tokens_within(5_000, 57), u32::MAX);
    }

    #[test]
    fn a_hardware_hour_priced_by_the_second() {
        // 36,000 msat an hour is 10 msat a second; 20 ms a completion token is 0.2 msat,
        // 200 msat per 1000; 1 ms a prompt token, 10 msat per 1000.
        let card = RateCard::from_hardware(500, 36_000, 0.001, 0.020);
        assert_eq!(card.base_fee_msat, 500);
        assert_eq!(card.prompt_msat_per_1k_tokens, 10);
        assert_eq!(card.completion_msat_per_1k_tokens, 200);
        // A fraction of a msat per 1000 tokens rounds up; nonsense measurements price nothing.
        let odd = RateCard::from_hardware(0, 3_600, 0.0011, f64::NAN);
        assert_eq!(odd.prompt_msat_per_1k_tokens, 2);
        assert_eq!(odd.completion_msat_per_1k_tokens, 0);
    }

    #[test]
    fn saturates_instead_of_overflowing() {
        let card = RateCard {
            base_fee_msat: u64::MAX,
            prompt_msat_per_1k_tokens: u64::MAX,
            completion_msat_per_1k_tokens: u64::MAX,
        };
        assert_eq!(card.quote(u32::MAX, u32::MAX), u64::MAX);
    }

    #[test]
    fn estimate_overestimates_english() {
        let prompt = "The quick brown fox jumps over the lazy dog.";
        assert!(estimate_prompt_tokens(prompt.len()) >= 10 + 20);
    }
}
