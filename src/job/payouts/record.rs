//! The payout record in the book: phase 1 books it pending with its ledger entry, phase 2
//! settles it on what the wallet says, in one store write each.

use super::{Payout, PayoutRefusal, PayoutState};
use crate::job::book::{Book, BookError};
use crate::job::pipeline::unix_now;
use crate::job::settle::repay_owed_in;
use crate::ledger::{self, Entry, EntryKind};
use crate::store::{Tree, Tx, TxError};
use crate::wallet::PaymentHash;

fn abort(refusal: PayoutRefusal) -> TxError<PayoutRefusal> {
    TxError::Abort(refusal)
}

fn entry(kind: EntryKind, payout: &Payout, msat: u64, at: u64) -> Entry {
    Entry {
        kind,
        account: payout.account,
        msat,
        job: None,
        payment_hash: Some(payout.payment_hash.to_hex()),
        at,
    }
}

fn post<E>(tx: &Tx<'_>, entry: &Entry) -> Result<(), TxError<E>>
where
    E: From<BookError>,
{
    ledger::post(tx, entry).map_err(|e| e.map_abort(|e| E::from(BookError::Ledger(e))))
}

impl Book {
    /// Record that the signed request `auth` (its NIP-98 auth event) asks for a payout,
    /// durably, before the payout is booked; [`PayoutRefusal::Signed`] if it asked before.
    ///
    /// The HTTP door's replay cache is in memory, and a restart empties it while the event is
    /// still inside its window: without this, the same signed withdrawal to a Lightning address
    /// (a fresh invoice, so a fresh payment hash, each time) would pay out again. A crash
    /// between this and the booking leaves the signature used and nothing paid: the caller
    /// signs again. One key of 38 bytes a signed withdrawal, kept.
    pub async fn claim_payout_signature(&self, auth: [u8; 32]) -> Result<(), PayoutRefusal> {
        let mut key = b"nip98:".to_vec();
        key.extend_from_slice(&auth);
        let at = unix_now();
        self.store()
            .commit(move |tx| {
                if tx.contains(Tree::Meta, &key)? {
                    return Err(abort(PayoutRefusal::Signed));
                }
                tx.put_raw(Tree::Meta, &key, &at.to_be_bytes())?;
                Ok(())
            })
            .await
    }

    /// Phase 1: book `payout` pending (its amount and most fee off the balance) with its
    /// record, durably, before the wallet is called.
    pub async fn begin_payout(&self, payout: Payout) -> Result<Payout, PayoutRefusal> {
        self.store()
            .commit(move |tx| {
                let hash = payout.payment_hash.0;
                if tx.contains(Tree::Payouts, &hash)? {
                    return Err(abort(PayoutRefusal::Hash(
                        "this invoice was paid out before; a payment hash is paid once".to_owned(),
                    )));
                }
                if tx.contains(Tree::Payments, &hash)? {
                    return Err(abort(PayoutRefusal::Hash(
                        "this is an invoice of this service; it cannot pay itself".to_owned(),
                    )));
                }
                // What the account owes is repaid first: a balance never pays out money its
                // account owes for jobs run before they were paid.
                repay_owed_in(tx, &payout.account, None, payout.created_at)
                    .map_err(|e| e.map_abort(PayoutRefusal::Book))?;
                let total = payout.amount_msat.saturating_add(payout.max_fee_msat);
                let balance = ledger::balance_in(tx, &payout.account)?;
                if balance < total {
                    return Err(abort(PayoutRefusal::Balance {
                        balance_msat: balance,
                        amount_msat: payout.amount_msat,
                        max_fee_msat: payout.max_fee_msat,
                    }));
                }
                post(
                    tx,
                    &entry(EntryKind::PayoutPending, &payout, total, payout.created_at),
                )?;
                tx.put(Tree::Payouts, &hash, &payout)?;
                Ok(payout.clone())
            })
            .await
    }

    /// Phase 2: what the wallet said of a pending payout, booked. A payout no longer pending
    /// is returned as it is (the answer came twice).
    pub async fn finish_payout(
        &self,
        hash: &PaymentHash,
        state: PayoutState,
    ) -> Result<Payout, BookError> {
        let (hash, at) = (*hash, unix_now());
        self.store()
            .commit(move |tx| {
                let mut payout: Payout = tx
                    .get(Tree::Payouts, &hash.0)?
                    .ok_or_else(|| abort_book(BookError::Missing(format!("payout {hash}"))))?;
                if payout.state != PayoutState::Pending {
                    return Ok(payout);
                }
                match state {
                    PayoutState::Pending => return Ok(payout),
                    PayoutState::Paid { fee_msat } => {
                        // A wallet that spent more fee than allowed: the customer pays the most
                        // allowed, the operator the rest.
                        let fee = fee_msat.min(payout.max_fee_msat);
                        post(
                            tx,
                            &entry(EntryKind::Payout, &payout, payout.amount_msat, at),
                        )?;
                        if fee > 0 {
                            post(tx, &entry(EntryKind::RoutingFee, &payout, fee, at))?;
                        }
                        let unused = payout.max_fee_msat - fee;
                        if unused > 0 {
                            post(
                                tx,
                                &entry(EntryKind::PayoutFeeReturned, &payout, unused, at),
                            )?;
                        }
                        payout.state = PayoutState::Paid { fee_msat: fee };
                        payout.note = None;
                    }
                    PayoutState::Failed => {
                        let total = payout.amount_msat + payout.max_fee_msat;
                        post(tx, &entry(EntryKind::PayoutFailed, &payout, total, at))?;
                        // The last thing the wallet said stays: it says why.
                        payout.state = PayoutState::Failed;
                    }
                }
                // What came back (a failed payout, fee not spent) repays any debt.
                repay_owed_in(tx, &payout.account, None, at)?;
                payout.updated_at = at;
                tx.put(Tree::Payouts, &hash.0, &payout)?;
                Ok(payout)
            })
            .await
    }

    /// Note what the wallet said of a payout that stays pending.
    pub(super) async fn note_payout(
        &self,
        hash: &PaymentHash,
        note: String,
    ) -> Result<(), BookError> {
        let (hash, at) = (*hash, unix_now());
        self.store()
            .apply(move |tx| {
                let Some(mut payout) = tx.get::<Payout>(Tree::Payouts, &hash.0)? else {
                    return Ok(());
                };
                if payout.state == PayoutState::Pending {
                    payout.note = Some(note.clone());
                    payout.updated_at = at;
                    tx.put(Tree::Payouts, &hash.0, &payout)?;
                }
                Ok::<_, TxError<BookError>>(())
            })
            .await
    }

    /// Every payout still pending.
    pub async fn pending_payouts(&self) -> Result<Vec<Payout>, BookError> {
        self.store()
            .read(|r| {
                let mut pending = Vec::new();
                for item in r.scan::<Payout>(Tree::Payouts) {
                    let (_, payout) = item?;
                    if payout.state == PayoutState::Pending {
                        pending.push(payout);
                    }
                }
                Ok(pending)
            })
            .await
    }

    /// A payout by hash.
    pub async fn payout(&self, hash: &PaymentHash) -> Result<Option<Payout>, BookError> {
        let hash = *hash;
        self.store()
            .read(move |r| Ok(r.get(Tree::Payouts, &hash.0)?))
            .await
    }
}

fn abort_book(e: BookError) -> TxError<BookError> {
    TxError::Abort(e)
}
