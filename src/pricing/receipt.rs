//! The usage receipt: what a job generated, at which rates, what it was paid, charged and
//! returned. Pure. It goes out inside the signed result event on relays (as tags, see
//! `nips/dvmd-5050.md`) and in the `dvmd` object of an HTTP answer, so a customer can check
//! the charge against the rate card without trusting anything else we say.

use serde::{Deserialize, Serialize};

use super::RateCard;
use crate::infer::{FinishReason, Usage};

/// Why generation stopped, as the receipt says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// The model ended its answer.
    Stop,
    /// The request's `max_tokens` ran out.
    Length,
    /// What was paid ran out first: the job stopped at the completion tokens it covered.
    Budget,
    /// The client went away; the completion tokens generated until then were charged.
    Left,
}

impl Finish {
    /// How a generation that stopped for `finish` after `completion_tokens` ended, when it was
    /// held to `budget` completion tokens (what was paid) below what it asked for.
    pub fn of(finish: FinishReason, completion_tokens: u32, budget: Option<u32>) -> Self {
        match finish {
            FinishReason::Stop => Self::Stop,
            FinishReason::Length if budget.is_some_and(|b| completion_tokens >= b) => Self::Budget,
            FinishReason::Length => Self::Length,
        }
    }

    /// The receipt's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Budget => "budget",
            Self::Left => "left",
        }
    }
}

/// What a job generated and what that cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Exact token counts.
    pub prompt_tokens: u32,
    /// Completion tokens generated.
    pub completion_tokens: u32,
    /// The rate card it was charged at.
    pub rates: RateCard,
    /// What the job was funded with (payment plus reserved credit), msat.
    pub paid_msat: u64,
    /// `rates` applied to the token counts, never more than `paid_msat`.
    pub charged_msat: u64,
    /// `paid_msat - charged_msat`: credited back to the payer.
    pub returned_msat: u64,
    /// Why generation stopped.
    pub finish: Finish,
}

impl Receipt {
    /// The receipt of a pay-after job held to `limit_msat`: charged for `usage` (at most the
    /// limit), nothing paid yet, nothing returned (the charge is owed).
    pub fn owed(rates: RateCard, usage: Usage, limit_msat: u64, finish: Finish) -> Self {
        Self {
            paid_msat: 0,
            returned_msat: 0,
            ..Self::new(rates, usage, limit_msat, finish)
        }
    }

    /// The receipt for `usage` at `rates` of a job funded with `paid_msat`.
    pub fn new(rates: RateCard, usage: Usage, paid_msat: u64, finish: Finish) -> Self {
        let charged_msat = rates.charge(usage).min(paid_msat);
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            rates,
            paid_msat,
            charged_msat,
            returned_msat: paid_msat - charged_msat,
            finish,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_length_stop_at_the_budget_is_the_budget() {
        assert_eq!(
            Finish::of(FinishReason::Length, 40, Some(40)),
            Finish::Budget
        );
        assert_eq!(Finish::of(FinishReason::Length, 40, None), Finish::Length);
        assert_eq!(
            Finish::of(FinishReason::Length, 40, Some(90)),
            Finish::Length
        );
        assert_eq!(Finish::of(FinishReason::Stop, 40, Some(40)), Finish::Stop);
    }

    #[test]
    fn charges_the_tokens_at_the_rates_and_returns_the_rest() {
        let rates = RateCard::default();
        let usage = Usage {
            prompt_tokens: 57,
            completion_tokens: 120,
        };
        let receipt = Receipt::new(rates, usage, 10_000, Finish::Stop);
        assert_eq!(receipt.charged_msat, 1_000 + 114 + 1_200);
        assert_eq!(receipt.returned_msat, 10_000 - 2_314);
        // Never more than was paid.
        let short = Receipt::new(rates, usage, 2_000, Finish::Budget);
        assert_eq!((short.charged_msat, short.returned_msat), (2_000, 0));
    }
}
