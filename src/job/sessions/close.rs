//! How a session ends: a `close` action, or idling out on the reconciler's pass. The close is
//! recorded first (nothing reserves from a closed session, [`crate::job::Book::open_on_credit`]),
//! then the rest is refunded once; a refund a restart cut short is tried once on the first pass.

use std::sync::atomic::Ordering;

use super::{refuse, Closed, SessionRecord};
use crate::job::book::BookError;
use crate::job::pipeline::{unix_now, Pipeline};
use crate::job::tokens::PaymentRefusal;
use crate::ledger::{self, Account};
use crate::mpp::{self, Refusal};
use crate::store::{Tree, TxError};
use crate::wallet::{bolt11, PaymentHash};

/// A closed session's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReport {
    /// What was refunded (or tried), msat.
    pub refund_msat: u64,
    /// How the refund went.
    pub refund: Refund,
}

/// How a session's refund went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refund {
    /// Our wallet says it arrived.
    Succeeded,
    /// It was refused or failed: the rest stays on the session's account.
    Failed,
    /// Nothing to refund (nothing left above the most routing fee).
    Skipped,
    /// The wallet did not say yet: the payout stays in flight and is looked up until it does.
    InFlight,
}

impl Refund {
    /// The draft's `refundStatus` (`succeeded`, `failed`, `skipped`): a refund not confirmed
    /// is not `succeeded`.
    pub fn answer(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed | Self::InFlight => "failed",
            Self::Skipped => "skipped",
        }
    }

    /// As the session record keeps it (`in_flight` too).
    pub fn recorded(self) -> &'static str {
        match self {
            Self::InFlight => "in_flight",
            other => other.answer(),
        }
    }

    /// As the session record keeps it; `pending` (the refund is being tried) is not known yet.
    fn from_recorded(recorded: &str) -> Self {
        match recorded {
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "skipped" => Self::Skipped,
            _ => Self::InFlight,
        }
    }
}

/// Who ends a session.
enum Closer {
    /// A `close` credential, by its challenge's id.
    Client(String),
    /// The idle pass.
    Idle,
    /// The idle pass, because the return invoice is about to expire: a refund is paid to it
    /// while it still can be.
    Expiring,
}

impl Closer {
    fn by(&self) -> &'static str {
        match self {
            Self::Client(_) => "client",
            Self::Idle => "idle",
            Self::Expiring => "return_invoice_expiring",
        }
    }
}

impl Pipeline {
    /// How long before its return invoice expires a session is closed (on the reconcile pass,
    /// between calls), so its refund is paid while the invoice can take it: two passes and
    /// 30 s for the payment. A session cannot open on a return invoice that expires sooner.
    pub(crate) fn refund_margin_secs(&self) -> u64 {
        2 * self.inner.config.reconcile_interval_secs.max(1) + 30
    }

    /// `close`: mark the session closed, then refund its balance to the return invoice. The
    /// same credential again (same challenge id) pays nothing and answers as the first did,
    /// with the refund as it stands now (the draft's idempotency).
    ///
    /// The close and its refund run in a task of their own: a client that disconnects drops
    /// the handler awaiting this, and a refund cut off between the close's write and the
    /// payout's booking would never be tried again in this process's life.
    pub async fn close_session(
        &self,
        session: &PaymentHash,
        credential: &mpp::Credential,
    ) -> Result<CloseReport, PaymentRefusal> {
        self.sessions_on()?;
        let record = self.proved_record(session, credential).await?;
        if record.closed.is_some() {
            return self.closed_again(&record, &credential.challenge.id).await;
        }
        let (pipeline, session) = (self.clone(), *session);
        let closer = Closer::Client(credential.challenge.id.clone());
        tokio::spawn(async move { pipeline.end_session(&session, closer).await })
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    /// A `close` for a session already closed: the answer it got, if it is the credential that
    /// closed it; refused otherwise (the draft: no action on a closed session).
    async fn closed_again(
        &self,
        record: &SessionRecord,
        challenge: &str,
    ) -> Result<CloseReport, PaymentRefusal> {
        let Some(closed) = record
            .closed
            .as_ref()
            .filter(|c| c.challenge.as_deref() == Some(challenge))
        else {
            return Err(Refusal::SessionClosed.into());
        };
        let mut refund = Refund::from_recorded(&closed.refund_status);
        if refund == Refund::InFlight {
            // The payout's own record says how it went since.
            refund = self.refund_payout(&record.return_invoice).await;
        }
        Ok(CloseReport {
            refund_msat: closed.refund_msat,
            refund,
        })
    }

    /// How the refund payout to `return_invoice` stands, as our book has it.
    async fn refund_payout(&self, return_invoice: &str) -> Refund {
        use crate::job::payouts::PayoutState;
        let Ok(info) = bolt11::decode(return_invoice) else {
            return Refund::Failed;
        };
        match self.inner.book.payout(&info.payment_hash).await {
            Ok(Some(payout)) => match payout.state {
                PayoutState::Paid { .. } => Refund::Succeeded,
                PayoutState::Failed => Refund::Failed,
                PayoutState::Pending => Refund::InFlight,
            },
            _ => Refund::InFlight,
        }
    }

    /// Mark `session` closed (durably, before any refund is tried: nothing reserves from a
    /// session once this write is done, [`super::book::Book::open_on_credit`]), then pay its
    /// balance less the most routing fee to its return invoice, once.
    async fn end_session(
        &self,
        session: &PaymentHash,
        closer: Closer,
    ) -> Result<CloseReport, PaymentRefusal> {
        let (hash, now, by) = (*session, unix_now(), closer.by());
        let challenge = match closer {
            Closer::Client(id) => Some(id),
            Closer::Idle | Closer::Expiring => None,
        };
        let fee = self.inner.config.payout_fee;
        let (closed, first) = self
            .inner
            .book
            .store()
            .commit(move |tx| {
                let Some(mut record) = tx.get::<SessionRecord>(Tree::Sessions, &hash.0)? else {
                    return refuse(Refusal::SessionNotFound);
                };
                if let Some(closed) = &record.closed {
                    // A close that raced this one: the same credential gets the first's answer.
                    return match (&closed.challenge, &challenge) {
                        (Some(a), Some(b)) if a == b => Ok((record, false)),
                        _ => refuse(Refusal::SessionClosed),
                    };
                }
                let balance = ledger::balance_in(tx, &Account::Token(hash))?;
                let refund = refund_within(balance, fee);
                record.closed = Some(Closed {
                    at: now,
                    by: by.to_owned(),
                    refund_msat: refund,
                    refund_status: if refund == 0 { "skipped" } else { "pending" }.to_owned(),
                    challenge: challenge.clone(),
                });
                tx.put(Tree::Sessions, &hash.0, &record)?;
                Ok((record, true))
            })
            .await?;
        if !first {
            let challenge = closed
                .closed
                .as_ref()
                .and_then(|c| c.challenge.clone())
                .unwrap_or_default();
            return self.closed_again(&closed, &challenge).await;
        }
        let live = &self.inner.sessions;
        if let Ok(mut active) = live.active.lock() {
            active.remove(session);
        }
        if let Ok(mut candidates) = live.candidates.lock() {
            candidates.remove(session);
        }
        // A stream waiting for a top-up learns at once that none can come.
        live.topped_up.notify_waiters();
        let refund = closed.closed.as_ref().map_or(0, |c| c.refund_msat);
        let status = self.refund(&hash, &closed.return_invoice, refund).await;
        self.inner.metrics.session_closed(by, status.answer());
        tracing::info!(session = %hash, by, refund_msat = refund, refund_status = status.recorded(), "http payment session closed");
        Ok(CloseReport {
            refund_msat: refund,
            refund: status,
        })
    }

    /// Pay `refund_msat` from `session` to its return invoice (one attempt) and record how it
    /// went.
    async fn refund(
        &self,
        session: &PaymentHash,
        return_invoice: &str,
        refund_msat: u64,
    ) -> Refund {
        let hash = *session;
        let status = if refund_msat == 0 {
            Refund::Skipped
        } else {
            match self
                .payer()
                .refund_to(Account::Token(hash), return_invoice, refund_msat)
                .await
            {
                Ok(payout) => match payout.state {
                    crate::job::payouts::PayoutState::Paid { .. } => Refund::Succeeded,
                    crate::job::payouts::PayoutState::Failed => {
                        tracing::warn!(session = %hash, refund_msat, note = ?payout.note, "session refund failed; the rest stays on the session's account");
                        Refund::Failed
                    }
                    crate::job::payouts::PayoutState::Pending => {
                        tracing::warn!(session = %hash, refund_msat, note = ?payout.note, "session refund not confirmed; its payout is looked up until our wallet says");
                        Refund::InFlight
                    }
                },
                Err(e) => {
                    tracing::warn!(session = %hash, refund_msat, error = %e, "session refund refused; the rest stays on the session's account");
                    Refund::Failed
                }
            }
        };
        let recorded = self
            .inner
            .book
            .store()
            .commit(move |tx| {
                if let Some(mut record) = tx.get::<SessionRecord>(Tree::Sessions, &hash.0)? {
                    if let Some(closed) = record.closed.as_mut() {
                        status.recorded().clone_into(&mut closed.refund_status);
                    }
                    tx.put(Tree::Sessions, &hash.0, &record)?;
                }
                Ok::<_, TxError<BookError>>(())
            })
            .await;
        if let Err(e) = recorded {
            tracing::error!(session = %hash, error = %e, "cannot record the refund's outcome");
        }
        status
    }

    /// Close every open session idle for `session_idle_secs` (a reconcile pass): no call
    /// running, and no call, open or top-up for that long; and, between its calls, one whose
    /// return invoice expires within [`Pipeline::refund_margin_secs`]. The first pass reads every session
    /// (and tries once more the refund of one closed just before a restart); later ones look
    /// only at sessions that may be open.
    pub async fn close_idle_sessions(&self) {
        let live = &self.inner.sessions;
        if !live.scanned.swap(true, Ordering::SeqCst) {
            self.first_pass().await;
        }
        let candidates: Vec<PaymentHash> = live
            .candidates
            .lock()
            .map(|c| c.iter().copied().collect())
            .unwrap_or_default();
        let (idle, now, started) = (
            self.inner.config.session_idle_secs,
            unix_now(),
            self.inner.started_at,
        );
        for hash in candidates {
            let record = match self.session(&hash).await {
                Ok(Some(record)) if record.closed.is_none() => record,
                Ok(_) => {
                    if let Ok(mut c) = live.candidates.lock() {
                        c.remove(&hash);
                    }
                    continue;
                }
                Err(e) => return tracing::error!(error = %e, "cannot read sessions"),
            };
            let running = live
                .calls
                .lock()
                .map(|calls| calls.contains_key(&hash))
                .unwrap_or(true);
            let seen = live
                .active
                .lock()
                .ok()
                .and_then(|active| active.get(&hash).copied());
            // The clock of a session no call touched since this process started starts with it.
            let last = seen.unwrap_or(0).max(record.touched_at).max(started);
            let expiring = bolt11::decode(&record.return_invoice)
                .is_ok_and(|info| info.expires_at <= now + self.refund_margin_secs());
            let closer = match (running, expiring) {
                (true, _) => continue,
                (false, true) => Closer::Expiring,
                (false, false) if now.saturating_sub(last) >= idle => Closer::Idle,
                (false, false) => continue,
            };
            if let Err(e) = self.end_session(&hash, closer).await {
                tracing::warn!(session = %hash, error = %e, "cannot close idle session");
            }
        }
    }

    /// Read every session once: the open ones become candidates for the idle pass, and a
    /// refund a restart cut short (closed before this process started, its refund never
    /// booked) is tried once.
    async fn first_pass(&self) {
        let all = self
            .inner
            .book
            .store()
            .read(|r| {
                let mut all = Vec::new();
                for item in r.scan_raw(Tree::Sessions) {
                    let (key, raw) = item?;
                    let (Ok(hash), Ok(record)) = (
                        <[u8; 32]>::try_from(key.as_ref()),
                        serde_json::from_slice::<SessionRecord>(&raw),
                    ) else {
                        continue;
                    };
                    all.push((PaymentHash(hash), record));
                }
                Ok::<_, BookError>(all)
            })
            .await;
        let all = match all {
            Ok(all) => all,
            Err(e) => return tracing::error!(error = %e, "cannot read sessions"),
        };
        for (hash, record) in all {
            match &record.closed {
                None => {
                    if let Ok(mut c) = self.inner.sessions.candidates.lock() {
                        c.insert(hash);
                    }
                }
                Some(closed)
                    if closed.refund_status == "pending" && closed.at < self.inner.started_at =>
                {
                    self.resume_refund(&hash, &record).await;
                }
                Some(_) => {}
            }
        }
    }

    /// A session closed before a restart whose refund's outcome was not recorded: the payout
    /// as booked says it, or (none booked) the refund is tried now, with what the session has.
    async fn resume_refund(&self, hash: &PaymentHash, record: &SessionRecord) {
        let booked = match bolt11::decode(&record.return_invoice) {
            Ok(info) => self
                .inner
                .book
                .payout(&info.payment_hash)
                .await
                .ok()
                .flatten(),
            Err(_) => None,
        };
        if booked.is_some() {
            // Booked before the restart: the payout reconciler settles it; its record says how.
            return;
        }
        let balance = self.balance_of(Account::Token(*hash)).await.unwrap_or(0);
        let refund = refund_within(balance, self.inner.config.payout_fee);
        tracing::info!(session = %hash, refund_msat = refund, "a session closed before the restart: its refund is tried now");
        self.refund(hash, &record.return_invoice, refund).await;
    }
}

/// What a refund of `balance_msat` pays: the balance less the most routing fee it may cost.
fn refund_within(balance_msat: u64, fee: crate::job::payouts::PayoutFee) -> u64 {
    // The fee is a function of the amount: the largest amount that fits with its own fee.
    let fits = |amount: u64| amount.saturating_add(fee.max_for(amount)) <= balance_msat;
    let after_base = u128::from(balance_msat.saturating_sub(fee.base_msat));
    let mut amount =
        u64::try_from(after_base * 1_000_000 / (1_000_000 + u128::from(fee.ppm))).unwrap_or(0);
    while fits(amount + 1) {
        amount += 1;
    }
    while amount > 0 && !fits(amount) {
        amount -= 1;
    }
    amount
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::payouts::PayoutFee;

    #[test]
    fn a_refund_and_its_most_fee_fit_the_balance() {
        let fee = PayoutFee {
            base_msat: 1_000,
            ppm: 5_000,
        };
        for balance in [0, 999, 1_000, 1_005, 21_000, 1_000_000] {
            let amount = refund_within(balance, fee);
            assert!(
                amount == 0 || amount + fee.max_for(amount) <= balance,
                "{balance}"
            );
            assert!(
                amount + 1 + fee.max_for(amount + 1) > balance,
                "{balance}: the largest that fits"
            );
        }
        let free = PayoutFee {
            base_msat: 0,
            ppm: 0,
        };
        assert_eq!(refund_within(12_345, free), 12_345, "every msat");
    }
}
