//! HTTP `Payment` sessions (the Lightning method's `session` intent, [`crate::mpp`]): a
//! deposit spent call by call, topped up, and refunded on close.
//!
//! A session is the account of its deposit's payment hash ([`Account::Token`]), the one the
//! L402 and `charge` credentials of the same 402 pay into: the deposit is the 402's invoice,
//! booked there like any L402 payment, and the session id is its hash. The `sessions` tree keeps
//! what the draft asks a server to keep ([`SessionRecord`]); the money is in the ledger only.
//!
//! - **open** (the deposit's challenge, used once; its preimage; a `returnInvoice` that names no
//!   amount): stored in one durable write with the challenge marked used, then the call runs.
//! - **bearer** (`sessionId`, the deposit's preimage): the call runs on the session's balance.
//!   A call is opened with what the balance has (at least the base fee, its prompt and one
//!   token), up to its quote; a stream that runs dry asks for a top-up and waits
//!   ([`Pipeline::await_top_up`]).
//! - **topUp** (another 402's challenge, used once, and its preimage): what that payment left on
//!   its own account moves to the session's (`transfer_out`, `transfer_in`), in the write that
//!   marks the challenge used; waiting streams wake. The same credential again answers the same
//!   `{"status":"ok"}` and moves nothing.
//! - **close** (`sessionId`, the deposit's preimage), or no call, top-up or close for
//!   `session_idle_secs`: the session is marked closed (durably, before anything is paid), then
//!   its balance, less the most routing fee, is paid to the return invoice as a two-phase payout
//!   ([`super::payouts::Payer::refund_to`]); one attempt. What a refund could not pay (and the
//!   change of a call still running) stays on the account: the L402 credential of the deposit's
//!   402 spends and withdraws it.
//!
//! Units: the draft counts whole sats per unit. dvmd's unit is one sat's worth of tokens at its
//! rate card (`amount` `"1"`); the ledger meters exact msat, the sats the draft reports are
//! rounded down (in the customer's favour), and a refund pays every msat left.
//!
//! Offered only when the wallet can pay an invoice that names no amount
//! ([`crate::wallet::Wallet::pays_amountless`]: the dev wallet and NWC, not LNbits); otherwise a
//! session credential is refused with that reason.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::book::BookError;
use super::pipeline::{unix_now, Pipeline};
use super::tokens::{PaymentChallengeRecord, PaymentRefusal};
use crate::ledger::{self, Account, Entry, EntryKind};
use crate::mpp::{self, Refusal};
use crate::store::{Tree, Tx, TxError};
use crate::wallet::{bolt11, PaymentHash};

/// A session, as the book keeps it (keyed by its id, the deposit's payment hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Where the rest goes on close: a BOLT11 invoice that names no amount.
    pub return_invoice: String,
    /// The deposit and every top-up, msat.
    pub deposited_msat: u64,
    /// Unix seconds.
    pub opened_at: u64,
    /// The last open, top-up or close, unix seconds (calls are tracked in memory).
    pub touched_at: u64,
    /// Set once, when it closes.
    pub closed: Option<Closed>,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closed {
    /// Unix seconds.
    pub at: u64,
    /// `client` (a close action) or `idle`.
    pub by: String,
    /// What the refund tried to pay, msat (0: nothing was left).
    pub refund_msat: u64,
    /// `pending` from the close until the refund is tried, then `succeeded`, `failed`,
    /// `skipped`, or `in_flight` (the payout is looked up until our wallet says).
    pub refund_status: String,
}

/// Sessions' activity and top-ups, in memory.
#[derive(Default)]
pub struct Live {
    /// The last call on each session this process saw, unix seconds.
    active: Mutex<HashMap<PaymentHash, u64>>,
    /// Calls running on each session now: a session is not idle while one runs.
    calls: Mutex<HashMap<PaymentHash, usize>>,
    /// Sessions that may be open (opened since start, or found open by the first pass): what
    /// the idle pass looks at, instead of every session ever opened.
    candidates: Mutex<HashSet<PaymentHash>>,
    /// The first idle pass has read the store.
    scanned: AtomicBool,
    /// Woken by every top-up: a stream that ran dry looks at its balance again.
    topped_up: Notify,
}

/// A call running on a session (see [`Pipeline::session_call`]); dropping it ends the call.
pub struct SessionCall {
    pipeline: Pipeline,
    session: PaymentHash,
}

impl Drop for SessionCall {
    fn drop(&mut self) {
        if let Ok(mut calls) = self.pipeline.inner.sessions.calls.lock() {
            if let Some(n) = calls.get_mut(&self.session) {
                *n -= 1;
                if *n == 0 {
                    calls.remove(&self.session);
                }
            }
        }
        self.pipeline.touch(&self.session);
    }
}

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
}

impl From<crate::store::StoreError> for PaymentRefusal {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Book(BookError::Store(e))
    }
}

fn refuse<T>(refusal: Refusal) -> Result<T, TxError<PaymentRefusal>> {
    Err(TxError::Abort(PaymentRefusal::Credential(refusal)))
}

fn post(
    tx: &Tx<'_>,
    kind: EntryKind,
    account: Account,
    msat: u64,
    hash: &PaymentHash,
    at: u64,
) -> Result<(), TxError<PaymentRefusal>> {
    let entry = Entry {
        kind,
        account,
        msat,
        job: None,
        payment_hash: Some(hash.to_hex()),
        at,
    };
    ledger::post(tx, &entry)
        .map_err(|e| e.map_abort(|e| PaymentRefusal::Book(BookError::Ledger(e))))
}

impl Pipeline {
    /// Whether sessions are offered: the wallet can refund to an invoice that names no amount.
    pub fn offers_sessions(&self) -> bool {
        self.inner.wallet.pays_amountless()
    }

    fn sessions_on(&self) -> Result<(), Refusal> {
        if self.offers_sessions() {
            return Ok(());
        }
        Err(Refusal::SessionsOff(format!(
            "this service offers no sessions: its wallet ({}) cannot pay the return invoice, which names no amount; use intent `charge` or L402",
            self.inner.wallet.name()
        )))
    }

    /// A stored `session` challenge, checked: issued here, echoed exactly, not used, not
    /// expired, and `credential`'s preimage pays it and our wallet has seen that.
    async fn paid_session_challenge(
        &self,
        credential: &mpp::Credential,
    ) -> Result<PaymentChallengeRecord, PaymentRefusal> {
        let book = &self.inner.book;
        let stored = book
            .payment_challenge(&credential.challenge.id)
            .await?
            .ok_or(Refusal::UnknownChallenge)?;
        if stored.challenge != credential.challenge
            || stored.challenge.intent != mpp::INTENT_SESSION
        {
            return Err(Refusal::UnknownChallenge.into());
        }
        if credential.payment_hash() != stored.payment_hash {
            return Err(Refusal::InvalidPreimage.into());
        }
        if stored.used_at.is_none() && unix_now() >= stored.expires_at {
            return Err(Refusal::ChallengeExpired(stored.challenge.expires).into());
        }
        if !self.payment_booked(&stored.payment_hash).await? {
            return Err(Refusal::Unpaid.into());
        }
        Ok(stored)
    }

    /// `open`: the deposit's challenge, paid, opens the session; its account pays the call.
    pub async fn open_session(
        &self,
        credential: &mpp::Credential,
        return_invoice: &str,
    ) -> Result<Account, PaymentRefusal> {
        self.sessions_on()?;
        let stored = self.paid_session_challenge(credential).await?;
        if stored.used_at.is_some() {
            return Err(Refusal::UnknownChallenge.into());
        }
        check_return_invoice(&stored, return_invoice)?;
        let hash = stored.payment_hash;
        let (id, now) = (credential.challenge.id.clone(), unix_now());
        let return_invoice = return_invoice.trim().to_owned();
        let deposited = self
            .inner
            .book
            .store()
            .commit(move |tx| {
                let Some(mut challenge) =
                    tx.get::<PaymentChallengeRecord>(Tree::MppChallenges, id.as_bytes())?
                else {
                    return refuse(Refusal::UnknownChallenge);
                };
                if challenge.used_at.is_some() || tx.contains(Tree::Sessions, &hash.0)? {
                    return refuse(Refusal::UnknownChallenge);
                }
                challenge.used_at = Some(now);
                tx.put(Tree::MppChallenges, id.as_bytes(), &challenge)?;
                let deposited = ledger::balance_in(tx, &Account::Token(hash))?;
                if deposited < 1000 {
                    // The draft's step 6: at least one unit (1 sat) to spend.
                    return refuse(Refusal::InsufficientBalance(format!(
                        "this deposit has {deposited} msat left; a session needs at least 1 sat"
                    )));
                }
                let record = SessionRecord {
                    return_invoice: return_invoice.clone(),
                    deposited_msat: deposited,
                    opened_at: now,
                    touched_at: now,
                    closed: None,
                };
                tx.put(Tree::Sessions, &hash.0, &record)?;
                Ok(deposited)
            })
            .await?;
        self.touch(&hash);
        if let Ok(mut candidates) = self.inner.sessions.candidates.lock() {
            candidates.insert(hash);
        }
        tracing::info!(session = %hash, deposited_msat = deposited, "http payment session opened");
        Ok(Account::Token(hash))
    }

    /// `bearer`: the open session `session`, proved by its deposit's `preimage`, pays the call.
    /// (The door checks that the echoed challenge is one it bound.)
    pub async fn session_account(
        &self,
        session: &PaymentHash,
        credential: &mpp::Credential,
    ) -> Result<Account, PaymentRefusal> {
        self.sessions_on()?;
        let record = self.open_record(session, credential).await?;
        drop(record);
        self.touch(session);
        Ok(Account::Token(*session))
    }

    async fn open_record(
        &self,
        session: &PaymentHash,
        credential: &mpp::Credential,
    ) -> Result<SessionRecord, PaymentRefusal> {
        let record = self
            .session(session)
            .await?
            .ok_or(Refusal::SessionNotFound)?;
        if credential.payment_hash() != *session {
            return Err(Refusal::InvalidPreimage.into());
        }
        if record.closed.is_some() {
            return Err(Refusal::SessionClosed.into());
        }
        Ok(record)
    }

    /// `topUp`: what the paid challenge's payment left moves to `session`'s balance, once;
    /// the same credential again changes nothing and answers the same. Returns the session.
    pub async fn top_up_session(
        &self,
        session: &PaymentHash,
        credential: &mpp::Credential,
    ) -> Result<SessionRecord, PaymentRefusal> {
        self.sessions_on()?;
        let stored = self.paid_session_challenge(credential).await?;
        let top_up = stored.payment_hash;
        if top_up == *session {
            return Err(Refusal::Malformed("a session is not its own top-up".to_owned()).into());
        }
        let (id, now, session) = (credential.challenge.id.clone(), unix_now(), *session);
        let (record, moved) = self
            .inner
            .book
            .store()
            .commit(move |tx| {
                let Some(mut record) = tx.get::<SessionRecord>(Tree::Sessions, &session.0)? else {
                    return refuse(Refusal::SessionNotFound);
                };
                let Some(mut challenge) =
                    tx.get::<PaymentChallengeRecord>(Tree::MppChallenges, id.as_bytes())?
                else {
                    return refuse(Refusal::UnknownChallenge);
                };
                if challenge.used_at.is_some() {
                    // The draft's idempotency: the same top-up again answers as it did.
                    return match challenge.topped_up {
                        Some(of) if of == session => Ok((record, 0)),
                        _ => refuse(Refusal::UnknownChallenge),
                    };
                }
                if record.closed.is_some() {
                    return refuse(Refusal::SessionClosed);
                }
                let from = Account::Token(top_up);
                let msat = ledger::balance_in(tx, &from)?;
                if msat == 0 {
                    return refuse(Refusal::InsufficientBalance(
                        "this top-up's payment was spent already".to_owned(),
                    ));
                }
                challenge.used_at = Some(now);
                challenge.topped_up = Some(session);
                tx.put(Tree::MppChallenges, id.as_bytes(), &challenge)?;
                post(tx, EntryKind::TransferOut, from, msat, &top_up, now)?;
                post(
                    tx,
                    EntryKind::TransferIn,
                    Account::Token(session),
                    msat,
                    &top_up,
                    now,
                )?;
                record.deposited_msat += msat;
                record.touched_at = now;
                tx.put(Tree::Sessions, &session.0, &record)?;
                Ok((record, msat))
            })
            .await?;
        if moved > 0 {
            self.touch(&session);
            self.inner.sessions.topped_up.notify_waiters();
            tracing::info!(session = %session, top_up = %top_up, msat = moved, "http payment session topped up");
        }
        Ok(record)
    }

    /// `close`: mark the session closed, then refund its balance to the return invoice.
    pub async fn close_session(
        &self,
        session: &PaymentHash,
        credential: &mpp::Credential,
    ) -> Result<CloseReport, PaymentRefusal> {
        self.sessions_on()?;
        self.open_record(session, credential).await?;
        self.end_session(session, "client").await
    }

    /// Mark `session` closed (durably, before any refund is tried: nothing reserves from a
    /// session once this write is done, [`super::book::Book::open_on_credit`]), then pay its
    /// balance less the most routing fee to its return invoice, once.
    async fn end_session(
        &self,
        session: &PaymentHash,
        by: &'static str,
    ) -> Result<CloseReport, PaymentRefusal> {
        let (hash, now) = (*session, unix_now());
        let fee = self.inner.config.payout_fee;
        let closed = self
            .inner
            .book
            .store()
            .commit(move |tx| {
                let Some(mut record) = tx.get::<SessionRecord>(Tree::Sessions, &hash.0)? else {
                    return refuse(Refusal::SessionNotFound);
                };
                if record.closed.is_some() {
                    return refuse(Refusal::SessionClosed);
                }
                let balance = ledger::balance_in(tx, &Account::Token(hash))?;
                let refund = refund_within(balance, fee);
                record.closed = Some(Closed {
                    at: now,
                    by: by.to_owned(),
                    refund_msat: refund,
                    refund_status: if refund == 0 { "skipped" } else { "pending" }.to_owned(),
                });
                tx.put(Tree::Sessions, &hash.0, &record)?;
                Ok(record)
            })
            .await?;
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
                    super::payouts::PayoutState::Paid { .. } => Refund::Succeeded,
                    super::payouts::PayoutState::Failed => {
                        tracing::warn!(session = %hash, refund_msat, note = ?payout.note, "session refund failed; the rest stays on the session's account");
                        Refund::Failed
                    }
                    super::payouts::PayoutState::Pending => {
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
    /// running, and no call, open or top-up for that long. The first pass reads every session
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
            if running || now.saturating_sub(last) < idle {
                continue;
            }
            if let Err(e) = self.end_session(&hash, "idle").await {
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

    /// The session `id`.
    pub async fn session(&self, id: &PaymentHash) -> Result<Option<SessionRecord>, BookError> {
        let id = *id;
        self.inner
            .book
            .store()
            .read(move |r| Ok(r.get(Tree::Sessions, &id.0)?))
            .await
    }

    /// A call on `session` starts: the session is not idle until the returned guard drops.
    pub(crate) fn session_call(&self, session: PaymentHash) -> SessionCall {
        if let Ok(mut calls) = self.inner.sessions.calls.lock() {
            *calls.entry(session).or_default() += 1;
        }
        self.touch(&session);
        SessionCall {
            pipeline: self.clone(),
            session,
        }
    }

    /// `session` is in use now (a call on it started, waits or ended): its idle clock restarts.
    pub(crate) fn touch(&self, session: &PaymentHash) {
        if let Ok(mut active) = self.inner.sessions.active.lock() {
            active.insert(*session, unix_now());
        }
    }

    /// Wait until a top-up may have landed, or `wait` passed.
    pub(crate) async fn topped_up_or(&self, wait: Duration) {
        let _ = tokio::time::timeout(wait, self.inner.sessions.topped_up.notified()).await;
    }
}

/// What a refund of `balance_msat` pays: the balance less the most routing fee it may cost.
fn refund_within(balance_msat: u64, fee: super::payouts::PayoutFee) -> u64 {
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

/// The draft's step 7: the return invoice is BOLT11, names no amount (or zero), is on the
/// deposit's network, and has not expired.
fn check_return_invoice(stored: &PaymentChallengeRecord, bolt11_text: &str) -> Result<(), Refusal> {
    let invalid = |why: &str| Refusal::InvalidReturnInvoice(why.to_owned());
    let info =
        bolt11::decode(bolt11_text).map_err(|e| Refusal::InvalidReturnInvoice(e.to_string()))?;
    if info.amount_msat.is_some_and(|a| a > 0) {
        return Err(invalid(
            "it names an amount; the refund's amount is set at close",
        ));
    }
    let network = mpp::network_of(bolt11_text);
    if network.is_none() || network != mpp::network_of(&stored.deposit_invoice()) {
        return Err(invalid("it is not on the deposit invoice's network"));
    }
    if info.expires_at <= unix_now() {
        return Err(invalid("it has expired"));
    }
    Ok(())
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
