//! Trust tiers: what dvmd knows of a customer from how they paid, and what it lets them do.
//!
//! Every npub has a [`Tier`], worked out from its [`Standing`] (persisted in the store's
//! `trust` tree, updated in the same transaction that settles a job it paid for) and the
//! operator's setting, if any:
//! - `blocked` (the operator's word only): its job requests are dropped before anything is
//!   stored, quoted or invoiced, and the HTTP doors refuse it new jobs (it can still see and
//!   withdraw its balance: money is never stranded);
//! - `new`: every key dvmd has not been paid by; it may have to show proof of work
//!   (`[trust] new_min_pow`, NIP-13), and all new keys together share one request bucket
//!   (`[trust] new_requests_per_minute`), so a flood of fresh keys cannot take the capacity
//!   that customers who paid before rely on;
//! - `known`, then `trusted`: promoted by msat paid, jobs settled and time since the first
//!   payment ([`Thresholds`]);
//! - `allowlisted`: the operator's word only; never demoted by history.
//!
//! The tier is a pure function of the standing, the thresholds and the time ([`Standing::tier`]),
//! so changing a threshold in `dvmd.toml` re-tiers everyone on the next start. Each change of
//! tier is published as a NIP-32 label ([`labels`]), and the label it supersedes is deleted.
//! The rules are written down for customers in `nips/dvmd-trust.md`.

pub mod labels;
mod registry;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use registry::{
    close_pay_after_in, debt_cleared_in, open_pay_after_in, settled_in, Refusal, TierChange, Trust,
    TrustError,
};

/// What dvmd lets an npub do (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Dropped before any work (the operator's setting).
    Blocked,
    /// Not paid us yet (or not enough): proof of work may be asked, a shared request bucket.
    New,
    /// Paid for a few jobs.
    Known,
    /// Paid for many jobs over a while.
    Trusted,
    /// The operator's allowlist.
    Allowlisted,
}

impl Tier {
    /// Every tier, lowest first.
    pub const ALL: [Tier; 5] = [
        Self::Blocked,
        Self::New,
        Self::Known,
        Self::Trusted,
        Self::Allowlisted,
    ];

    /// The name in config, the API, the CLI and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Blocked => "blocked",
            Self::New => "new",
            Self::Known => "known",
            Self::Trusted => "trusted",
            Self::Allowlisted => "allowlisted",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Tier {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|tier| tier.as_str() == s)
            .ok_or_else(|| {
                format!("`{s}` is not a tier (blocked, new, known, trusted, allowlisted)")
            })
    }
}

/// When history promotes an npub (`[trust]` in `dvmd.toml`). Each tier needs all three.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// `known`: msat paid (charged for settled jobs), at least.
    pub known_paid_msat: u64,
    /// `known`: jobs settled with a charge, at least.
    pub known_jobs: u64,
    /// `trusted`: msat paid, at least.
    pub trusted_paid_msat: u64,
    /// `trusted`: jobs settled with a charge, at least.
    pub trusted_jobs: u64,
    /// `trusted`: seconds since the first payment, at least.
    pub trusted_age_secs: u64,
    /// A debt (a pay-after job's charge) unpaid this long after it was made demotes to `new`
    /// until it is paid.
    pub debt_deadline_secs: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            known_paid_msat: 10_000,
            known_jobs: 3,
            trusted_paid_msat: 1_000_000,
            trusted_jobs: 50,
            trusted_age_secs: 7 * 24 * 60 * 60,
            debt_deadline_secs: 24 * 60 * 60,
        }
    }
}

/// The tier label last published for an npub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedLabel {
    /// The label event's id, hex (deleted when superseded).
    pub id: String,
    /// The tier it states.
    pub tier: Tier,
    /// Its `created_at`: the next label of the npub is dated after it, so labels of one npub
    /// never share an id (a relay refuses an id it deleted) and the newest is the latest.
    #[serde(default)]
    pub created_at: u64,
}

/// What dvmd has seen of one npub (the `trust` tree, keyed by the npub's 32 bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Standing {
    /// Unix seconds of the first settled job it paid for.
    pub first_paid_at: Option<u64>,
    /// msat charged for settled jobs it paid for.
    pub paid_msat: u64,
    /// Settled jobs with a charge.
    pub settled_jobs: u64,
    /// What its pay-after jobs now running may still owe (their limits), msat: counted
    /// against its credit beside what it owes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pay_after_open_msat: u64,
    /// Since when it has owed something for jobs run before they were paid (the oldest debt
    /// not yet repaid); `None` when it owes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owed_since: Option<u64>,
    /// The operator's setting, which overrides history (`dvmd trust set`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<Tier>,
    /// The tier label last published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<PublishedLabel>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Standing {
    /// Count a settled job that charged `msat`, at `at`.
    pub fn settled(&mut self, msat: u64, at: u64) {
        if msat == 0 {
            return;
        }
        self.first_paid_at.get_or_insert(at);
        self.paid_msat = self.paid_msat.saturating_add(msat);
        self.settled_jobs += 1;
    }

    /// The tier at `now`.
    pub fn tier(&self, thresholds: &Thresholds, now: u64) -> Tier {
        if let Some(tier) = self.operator {
            return tier;
        }
        if self
            .owed_since
            .is_some_and(|since| now >= since.saturating_add(thresholds.debt_deadline_secs))
        {
            // A debt past its deadline: no more credit until it is paid.
            return Tier::New;
        }
        let age = self
            .first_paid_at
            .map_or(0, |first| now.saturating_sub(first));
        if self.paid_msat >= thresholds.trusted_paid_msat
            && self.settled_jobs >= thresholds.trusted_jobs
            && age >= thresholds.trusted_age_secs
        {
            Tier::Trusted
        } else if self.paid_msat >= thresholds.known_paid_msat
            && self.settled_jobs >= thresholds.known_jobs
        {
            Tier::Known
        } else {
            Tier::New
        }
    }
}

/// The `[trust]` policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustPolicy {
    /// When history promotes.
    pub thresholds: Thresholds,
    /// NIP-13 difficulty (leading zero bits of the request id) a `new` npub's job request
    /// must have; 0 asks none.
    pub new_min_pow: u8,
    /// Job requests all `new` npubs together may post a minute (burst and refill).
    pub new_requests_per_minute: u32,
    /// What a `trusted` npub may owe at once for jobs run before they are paid (pay-after,
    /// only for requests that name us); 0 turns pay-after off.
    pub trusted_credit_msat: u64,
    /// Unpaid invoices the service holds at most when a `new` npub asks for one (the rest of
    /// `[service] max_open_invoices` is kept for npubs that have paid before).
    pub new_max_open_invoices: u32,
    /// Publish NIP-32 labels for tier changes.
    pub publish_labels: bool,
    /// Publish a NIP-32 label of each relay job's outcome.
    pub publish_job_labels: bool,
    /// Allowlisted npubs' jobs run free.
    pub allowlisted_free: bool,
}

impl Default for TrustPolicy {
    fn default() -> Self {
        Self {
            thresholds: Thresholds::default(),
            new_min_pow: 0,
            new_requests_per_minute: 600,
            trusted_credit_msat: 100_000,
            new_max_open_invoices: 1_500,
            publish_labels: true,
            publish_job_labels: true,
            allowlisted_free: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 24 * 60 * 60;

    #[test]
    fn history_promotes_through_every_threshold_and_the_operator_overrides_it() {
        let t = Thresholds::default();
        let mut standing = Standing::default();
        assert_eq!(standing.tier(&t, 0), Tier::New);
        standing.settled(0, 5);
        assert_eq!(standing.first_paid_at, None, "a free job is no payment");
        for _ in 0..2 {
            standing.settled(5_000, 100);
        }
        assert_eq!(standing.tier(&t, 100), Tier::New, "two jobs: not yet");
        standing.settled(5_000, 200);
        assert_eq!(standing.tier(&t, 200), Tier::Known);
        assert_eq!(standing.first_paid_at, Some(100));
        for _ in 0..47 {
            standing.settled(25_000, 300);
        }
        assert_eq!(standing.settled_jobs, 50);
        assert!(standing.paid_msat >= t.trusted_paid_msat);
        assert_eq!(
            standing.tier(&t, 100 + 7 * DAY - 1),
            Tier::Known,
            "too young"
        );
        assert_eq!(standing.tier(&t, 100 + 7 * DAY), Tier::Trusted);
        standing.operator = Some(Tier::Blocked);
        assert_eq!(standing.tier(&t, 100 + 7 * DAY), Tier::Blocked);
        standing.operator = None;
        standing.owed_since = Some(100 + 7 * DAY);
        assert_eq!(
            standing.tier(&t, 100 + 8 * DAY - 1),
            Tier::Trusted,
            "owes, not late"
        );
        assert_eq!(
            standing.tier(&t, 100 + 8 * DAY),
            Tier::New,
            "a debt past its deadline"
        );
        standing.operator = Some(Tier::Allowlisted);
        assert_eq!(Standing::default().tier(&t, 0), Tier::New);
        assert_eq!(standing.tier(&t, 0), Tier::Allowlisted);
    }

    #[test]
    fn tiers_read_back_from_their_names() {
        for tier in Tier::ALL {
            assert_eq!(tier.as_str().parse::<Tier>(), Ok(tier));
            assert_eq!(
                serde_json::to_string(&tier).expect("json"),
                format!("\"{tier}\"")
            );
        }
        assert!("gold".parse::<Tier>().is_err());
    }
}
