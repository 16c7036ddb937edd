//! The job state machine: one enum and the one table of legal transitions.
//!
//! Every state change goes through [`JobState::check_transition`], and the new state is
//! persisted before the side effect it allows (publish an invoice, start the model, charge).

use serde::{Deserialize, Serialize};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobState {
    /// Verified, deduplicated, not yet judged.
    Received,
    /// Refused before any money moved (bad input, bid too low, no invoice); terminal.
    Rejected,
    /// Priced; about to ask for payment (or run, for credit and free jobs).
    Quoted,
    /// Invoice issued, waiting for our wallet to confirm payment.
    AwaitingPayment,
    /// Payment confirmed by our wallet; queued for a worker.
    Paid,
    /// A worker is generating (or publishing a result it generated).
    Running,
    /// A relay job stopped at what its funds paid for before it was done: the text so far was
    /// shown (`partial`) with an invoice for the rest (`payment-required`), and no worker holds
    /// it. Paid, it runs on from the text so far; given up (unpaid in time, or cancelled), its
    /// text so far is the result, delivered and charged as generated.
    AwaitingContinuation,
    /// The result was acknowledged by at least one relay.
    Delivered,
    /// The job could not be completed after payment; the customer is owed.
    Failed,
    /// The ledger is settled: charge booked, remainder credited; terminal.
    Settled,
    /// The invoice expired unpaid; terminal.
    Expired,
    /// The customer cancelled before paying (kind 5); terminal.
    Cancelled,
}

/// A transition the table does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal job transition {from:?} -> {to:?}")]
pub struct IllegalTransition {
    /// The current state.
    pub from: JobState,
    /// The refused next state.
    pub to: JobState,
}

impl JobState {
    /// Every state, for exhaustive tests and metrics.
    pub const ALL: [JobState; 12] = [
        Self::Received,
        Self::Rejected,
        Self::Quoted,
        Self::AwaitingPayment,
        Self::Paid,
        Self::Running,
        Self::AwaitingContinuation,
        Self::Delivered,
        Self::Failed,
        Self::Settled,
        Self::Expired,
        Self::Cancelled,
    ];

    /// The transition table. `Quoted -> Rejected` covers a wallet that cannot issue an invoice:
    /// nothing was paid, so the job ends like any other refusal. A customer may cancel any job
    /// not yet paid, including one still being quoted. A job awaiting its continuation runs again
    /// only through `Paid` (its continuation confirmed by our wallet); given up, it goes straight
    /// to delivering what it has.
    pub fn can_become(self, next: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, next),
            (Received, Rejected)
                | (Received, Quoted)
                | (Received, Cancelled)
                | (Quoted, AwaitingPayment)
                | (Quoted, Running)
                | (Quoted, Rejected)
                | (Quoted, Cancelled)
                | (AwaitingPayment, Paid)
                | (AwaitingPayment, Expired)
                | (AwaitingPayment, Cancelled)
                | (Paid, Running)
                | (Running, Delivered)
                | (Running, Failed)
                | (Running, AwaitingContinuation)
                | (AwaitingContinuation, Paid)
                | (AwaitingContinuation, Delivered)
                | (AwaitingContinuation, Failed)
                | (Delivered, Settled)
                | (Failed, Settled)
        )
    }

    /// `Ok` if `self -> next` is legal.
    pub fn check_transition(self, next: JobState) -> Result<(), IllegalTransition> {
        if self.can_become(next) {
            Ok(())
        } else {
            Err(IllegalTransition {
                from: self,
                to: next,
            })
        }
    }

    /// No transition leaves a terminal state.
    pub fn is_terminal(self) -> bool {
        Self::ALL.iter().all(|next| !self.can_become(*next))
    }

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::Rejected => "rejected",
            Self::Quoted => "quoted",
            Self::AwaitingPayment => "awaiting_payment",
            Self::Paid => "paid",
            Self::Running => "running",
            Self::AwaitingContinuation => "awaiting_continuation",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Settled => "settled",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::JobState::*;
    use super::*;

    const LEGAL: [(JobState, JobState); 19] = [
        (Received, Rejected),
        (Received, Quoted),
        (Received, Cancelled),
        (Quoted, AwaitingPayment),
        (Quoted, Running),
        (Quoted, Rejected),
        (Quoted, Cancelled),
        (AwaitingPayment, Paid),
        (AwaitingPayment, Expired),
        (AwaitingPayment, Cancelled),
        (Paid, Running),
        (Running, Delivered),
        (Running, Failed),
        (Running, AwaitingContinuation),
        (AwaitingContinuation, Paid),
        (AwaitingContinuation, Delivered),
        (AwaitingContinuation, Failed),
        (Delivered, Settled),
        (Failed, Settled),
    ];

    #[test]
    fn exactly_the_table_is_legal() {
        for from in JobState::ALL {
            for to in JobState::ALL {
                let legal = LEGAL.contains(&(from, to));
                assert_eq!(from.can_become(to), legal, "{from:?} -> {to:?}");
                assert_eq!(from.check_transition(to).is_ok(), legal);
                if !legal {
                    assert_eq!(
                        from.check_transition(to),
                        Err(IllegalTransition { from, to })
                    );
                }
            }
        }
    }

    #[test]
    fn terminal_states() {
        let terminal: Vec<_> = JobState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(terminal, vec![Rejected, Settled, Expired, Cancelled]);
    }

    #[test]
    fn money_never_skips_payment() {
        // Work may start only from Paid (wallet-confirmed) or Quoted (credit, pay-after, free).
        for from in JobState::ALL {
            if from.can_become(Running) {
                assert!(matches!(from, Paid | Quoted), "{from:?} -> Running");
            }
        }
        assert!(!AwaitingPayment.can_become(Running));
        assert!(!AwaitingContinuation.can_become(Running));
        assert!(!Settled.can_become(Running));
        assert!(!Delivered.can_become(Running));
    }
}
