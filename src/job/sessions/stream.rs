//! A session's stream that ran dry: it says so (`payment-need-topup`) and waits for a top-up
//! to reserve more for it, or ends (`session-timeout`). The worker's side of
//! [`crate::job::direct`]'s generation loop.

use std::time::{Duration, Instant};

use crate::infer::Usage;
use crate::job::book::BookError;
use crate::job::direct::{tell, LiveEvent, LiveSink, TopUpWait};
use crate::job::pipeline::Pipeline;
use crate::job::record::Job;

impl Pipeline {
    /// Tell the stream the session ran dry, and wait `session_topup_wait_secs` for its balance
    /// to pay for at least one more token: then reserve up to what the rest of `max_tokens`
    /// costs and return the job holding it. `None` when the client left, or no top-up came
    /// (the stream is told `session-timeout`).
    pub(crate) async fn await_top_up(
        &self,
        job: &Job,
        session: crate::wallet::PaymentHash,
        max_tokens: u32,
        usage: Usage,
        live: Option<&LiveSink>,
    ) -> Option<Job> {
        let inner = &self.inner;
        let card = inner.config.rate_card;
        let funds = job.funds_msat();
        let whole = card.quote(usage.prompt_tokens, max_tokens);
        let want = whole.saturating_sub(funds);
        let next = Usage {
            completion_tokens: usage.completion_tokens + 1,
            ..usage
        };
        let min = card.charge(next).saturating_sub(funds).max(1);
        let spent_msat = match (
            self.session(&session).await,
            self.balance_of(job.customer).await,
        ) {
            (Ok(Some(record)), Ok(balance)) => record
                .deposited_msat
                .saturating_sub(balance)
                .saturating_sub(funds)
                .saturating_add(card.charge(usage)),
            _ => 0,
        };
        let wait = TopUpWait {
            session,
            spent_sats: crate::mpp::spent_sats(spent_msat),
            required_sats: want.div_ceil(1000),
        };
        tracing::info!(job = %job.id, session = %session, completion_tokens = usage.completion_tokens, want_msat = want, "session stream ran dry; waiting for a top-up");
        if let Some(live) = live {
            if !tell(live, LiveEvent::NeedTopUp(wait)).await {
                return None;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(inner.config.session_topup_wait_secs);
        loop {
            match inner.book.add_hold(&job.id, want, min, session).await {
                Ok(Some(job)) => {
                    tracing::info!(job = %job.id, session = %session, held_msat = job.held_msat, "session topped up; the stream goes on");
                    return Some(job);
                }
                Ok(None) => {}
                Err(BookError::SessionClosed(_)) => {
                    tracing::info!(job = %job.id, session = %session, "the session closed while its stream waited; the answer ends with what it said");
                    break;
                }
                Err(e) => {
                    tracing::error!(job = %job.id, error = %e, "cannot reserve a top-up");
                    return None;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || live.is_some_and(|live| live.is_closed()) {
                break;
            }
            // A stream waiting on its session keeps it from idling out.
            self.touch(&session);
            // Woken by a top-up; looked at again each second in case the wake-up was missed.
            self.topped_up_or(left.min(Duration::from_secs(1))).await;
        }
        tracing::info!(job = %job.id, session = %session, "no top-up in time; the answer ends with what it said");
        if let Some(live) = live {
            tell(live, LiveEvent::SessionTimeout(wait)).await;
        }
        None
    }
}
