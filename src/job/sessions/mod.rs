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
//!   The same credential again opens nothing: its call runs on the session, as `bearer`.
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
//!   ([`super::payouts::Payer::refund_to`]); one attempt. The same `close` again pays nothing
//!   and answers as the first did. What a refund could not pay (and the change of a call still
//!   running) stays on the account: the L402 credential of the deposit's 402 spends and
//!   withdraws it.
//!
//! Units: the draft counts whole sats per unit. dvmd's unit is one sat's worth of tokens at its
//! rate card (`amount` `"1"`); the ledger meters exact msat, the sats the draft reports are
//! rounded down (in the customer's favour), and a refund pays every msat left.
//!
//! Offered only when the wallet can pay an invoice that names no amount
//! ([`crate::wallet::Wallet::pays_amountless`]: the dev wallet and NWC, not LNbits); otherwise a
//! session credential is refused with that reason.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
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

mod close;
mod stream;

pub use close::{CloseReport, Refund};

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
    /// The id of the challenge whose `open` credential opened it: that credential sent again
    /// runs its call on the session instead of being refused (the draft's idempotency).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub opened_by: String,
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
    /// The id of the challenge whose `close` credential closed it (none when it idled out):
    /// that credential sent again gets the same answer, and nothing is paid twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<String>,
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
        // Booked before any refusal (see `Pipeline::payment_account`).
        let booked = self.payment_booked(&stored.payment_hash).await?;
        if stored.used_at.is_none() && unix_now() >= stored.expires_at {
            return Err(Refusal::ChallengeExpired(stored.challenge.expires).into());
        }
        if !booked {
            return Err(Refusal::Unpaid.into());
        }
        Ok(stored)
    }

    /// `open`: the deposit's challenge, paid, opens the session; its account pays the call.
    /// The same credential again (same challenge, same return invoice) opens nothing: its call
    /// runs on the session, as a `bearer` would, so a client that lost the first answer can
    /// retry (the draft's idempotency, keyed by the challenge id).
    pub async fn open_session(
        &self,
        credential: &mpp::Credential,
        return_invoice: &str,
    ) -> Result<Account, PaymentRefusal> {
        self.sessions_on()?;
        let stored = self.paid_session_challenge(credential).await?;
        check_return_invoice(
            &stored,
            return_invoice,
            unix_now() + self.refund_margin_secs(),
            self.inner.config.payout_fee,
        )?;
        let hash = stored.payment_hash;
        let (id, now) = (credential.challenge.id.clone(), unix_now());
        let return_invoice = return_invoice.trim().to_owned();
        let opened = self
            .inner
            .book
            .store()
            .commit(move |tx| {
                let Some(mut challenge) =
                    tx.get::<PaymentChallengeRecord>(Tree::MppChallenges, id.as_bytes())?
                else {
                    return refuse(Refusal::UnknownChallenge);
                };
                if let Some(record) = tx.get::<SessionRecord>(Tree::Sessions, &hash.0)? {
                    return if record.opened_by != id || record.return_invoice != return_invoice {
                        refuse(Refusal::UnknownChallenge)
                    } else if record.closed.is_some() {
                        refuse(Refusal::SessionClosed)
                    } else {
                        Ok(None)
                    };
                }
                if challenge.used_at.is_some() {
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
                    opened_by: id.clone(),
                };
                tx.put(Tree::Sessions, &hash.0, &record)?;
                Ok(Some(deposited))
            })
            .await?;
        self.touch(&hash);
        match opened {
            Some(deposited) => {
                if let Ok(mut candidates) = self.inner.sessions.candidates.lock() {
                    candidates.insert(hash);
                }
                tracing::info!(session = %hash, deposited_msat = deposited, "http payment session opened");
            }
            None => {
                tracing::info!(session = %hash, "the same open again: its call runs on the open session");
            }
        }
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

    /// The session `session`, open, proved by `credential`'s preimage.
    async fn open_record(
        &self,
        session: &PaymentHash,
        credential: &mpp::Credential,
    ) -> Result<SessionRecord, PaymentRefusal> {
        let record = self.proved_record(session, credential).await?;
        if record.closed.is_some() {
            return Err(Refusal::SessionClosed.into());
        }
        Ok(record)
    }

    /// The session `session`, open or closed, proved by `credential`'s preimage (the deposit's).
    async fn proved_record(
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

/// The draft's step 7: the return invoice is BOLT11, names no amount (or zero), is on the
/// deposit's network, and has not expired; here, also not before `refundable_until`, so there
/// is time to pay the refund to it (see [`Pipeline::refund_margin_secs`]).
fn check_return_invoice(
    stored: &PaymentChallengeRecord,
    bolt11_text: &str,
    refundable_until: u64,
    fee: crate::job::payouts::PayoutFee,
) -> Result<(), Refusal> {
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
    // The refund is a payout: one whose route hints ask more than its most fee is refused
    // (see `Payer::withdraw`), so a return invoice that could not take every refund is
    // refused now, while the deposit can still be taken back with the L402 credential.
    if !info.route_hints_within(fee.base_msat, fee.ppm) {
        return Err(Refusal::InvalidReturnInvoice(format!(
            "its route hints ask more routing fee than a refund may cost ({} msat + {} ppm)",
            fee.base_msat, fee.ppm
        )));
    }
    if info.expires_at <= refundable_until {
        return Err(Refusal::InvalidReturnInvoice(format!(
            "it expires within {} s, too soon to take the session's refund",
            refundable_until.saturating_sub(unix_now())
        )));
    }
    Ok(())
}
