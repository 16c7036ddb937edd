//! Payouts: money a customer's account sends out over Lightning (`POST /v1/account/withdraw`).
//!
//! Two-phase, so a payment hash pays once and money is never lost:
//!
//! 1. `payout_pending` is booked before the wallet is called, durably, in one write with the
//!    payout record (the exact BOLT11 and its payment hash): the amount plus the most routing
//!    fee allowed leave the balance and are *in flight*. A hash already paid out, or one this
//!    service issued itself, is refused.
//! 2. The wallet pays. Whatever `pay` answers, the money moves only on what our wallet's
//!    [`Wallet::lookup_payment`] (or a `pay` that returned the preimage) says:
//!    - succeeded: `payout` and `routing_fee` record what left, `payout_fee_returned` gives
//!      back the fee not used;
//!    - failed: `payout_failed` gives all of it back;
//!    - pending, unknown, an error, a timeout: it stays `payout_pending` and is looked up again
//!      on every reconcile pass and after a restart. Nothing ever pays the same hash again, and
//!      no new invoice is fetched for it (a new hash would pay twice).
//!
//! One exception to "unknown stays pending": once the invoice has expired (plus
//! [`EXPIRED_UNKNOWN_GRACE_SECS`]) and our wallet, one that records a payment before it sends
//! it ([`Wallet::unknown_means_unsent`]: LNbits, the dev wallet), still knows no payment to its
//! hash, nothing was sent and nothing can be any more, so it is failed and the credit restored.
//! Without it a payout the wallet refused before sending (no route, no balance) would hold the
//! customer's money for ever. With an NWC wallet such a payout stays pending and is counted
//! stuck for the operator: a service may not find an outgoing payment it holds in flight, and
//! the payee can settle a held payment long after its invoice expired.
//!
//! [`Wallet::lookup_payment`]: crate::wallet::Wallet::lookup_payment
//! [`Wallet::unknown_means_unsent`]: crate::wallet::Wallet::unknown_means_unsent
//!
//! By concept: the payout record and its ledger entries, booked in phase 1 and settled in
//! phase 2 ([`record`]); the wallet side, which pays, looks up and reconciles ([`payer`]).

mod payer;
mod record;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use super::book::BookError;
use crate::ledger::Account;
use crate::wallet::PaymentHash;

pub use payer::{Payer, Target};

/// After its invoice expired, how long a payout our wallet knows nothing of stays pending
/// before it is failed.
pub const EXPIRED_UNKNOWN_GRACE_SECS: u64 = 60 * 60;

/// The most routing fee a payout may cost: `base_msat + amount * ppm / 1e6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayoutFee {
    /// Flat part, msat.
    pub base_msat: u64,
    /// Parts per million of the amount.
    pub ppm: u64,
}

impl PayoutFee {
    /// The most fee for paying `amount_msat`.
    pub fn max_for(&self, amount_msat: u64) -> u64 {
        let proportional = u128::from(amount_msat) * u128::from(self.ppm) / 1_000_000;
        self.base_msat
            .saturating_add(u64::try_from(proportional).unwrap_or(u64::MAX))
    }
}

/// Where a payout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum PayoutState {
    /// Booked, in flight: the wallet was (or is about to be) asked to pay.
    Pending,
    /// Our wallet says it arrived.
    Paid {
        /// Routing fee charged, msat.
        fee_msat: u64,
    },
    /// Our wallet says it failed (or knew nothing of it long after the invoice expired).
    Failed,
}

/// One payout, by the payment hash of the invoice it pays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payout {
    /// Whose balance pays.
    pub account: Account,
    /// The invoice paid, exactly as sent to the wallet.
    pub bolt11: String,
    /// Its payment hash.
    pub payment_hash: PaymentHash,
    /// The invoice's amount, msat.
    pub amount_msat: u64,
    /// The most routing fee allowed, msat (held with the amount while in flight).
    pub max_fee_msat: u64,
    /// Unix seconds the invoice expires.
    pub expires_at: u64,
    /// Where it is.
    #[serde(flatten)]
    pub state: PayoutState,
    /// What the wallet said last, when that was not an answer.
    pub note: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub updated_at: u64,
}

/// Why a payout was not started.
#[derive(Debug, thiserror::Error)]
pub enum PayoutRefusal {
    /// The invoice is unusable (no amount, expired, not BOLT11).
    #[error("{0}")]
    Invoice(String),
    /// The balance does not cover the amount and the most fee.
    #[error("the balance of {balance_msat} msat does not cover {amount_msat} msat plus at most {max_fee_msat} msat of routing fee")]
    Balance {
        /// The spendable balance.
        balance_msat: u64,
        /// The invoice's amount.
        amount_msat: u64,
        /// The most fee.
        max_fee_msat: u64,
    },
    /// This hash was paid out before, or is an invoice of this service.
    #[error("{0}")]
    Hash(String),
    /// The signed request (its NIP-98 auth event) asked for a payout before.
    #[error("this signed request was used before (a restart does not make it new); sign a new one to withdraw again")]
    Signed,
    /// The store failed.
    #[error(transparent)]
    Book(#[from] BookError),
}

impl From<crate::store::StoreError> for PayoutRefusal {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Book(BookError::Store(e))
    }
}
