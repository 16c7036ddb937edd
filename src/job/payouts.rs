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
//! [`EXPIRED_UNKNOWN_GRACE_SECS`]) and our wallet still knows no payment to its hash, nothing
//! was sent and nothing can be any more, so it is failed and the credit restored. Without it a
//! payout the wallet refused before sending (no route, no balance) would hold the customer's
//! money for ever.
//!
//! [`Wallet::lookup_payment`]: crate::wallet::Wallet::lookup_payment

use serde::{Deserialize, Serialize};

use super::book::{Book, BookError};
use super::pipeline::{unix_now, Pipeline};
use crate::ledger::{self, Account, Entry, EntryKind};
use crate::store::{Tree, Tx, TxError};
use crate::wallet::{bolt11, lnurl, OutgoingStatus, PaymentHash, WalletError};

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
    /// The store failed.
    #[error(transparent)]
    Book(#[from] BookError),
}

impl From<crate::store::StoreError> for PayoutRefusal {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Book(BookError::Store(e))
    }
}

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
                payout.updated_at = at;
                tx.put(Tree::Payouts, &hash.0, &payout)?;
                Ok(payout)
            })
            .await
    }

    /// Note what the wallet said of a payout that stays pending.
    async fn note_payout(&self, hash: &PaymentHash, note: String) -> Result<(), BookError> {
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

/// What pays out: the book, the wallet and the payout settings. The daemon's pipeline has one
/// ([`Pipeline::payer`]); `dvmd account withdraw` builds one on the store when the daemon is
/// stopped.
#[derive(Clone)]
pub struct Payer {
    /// The book the payouts are booked in.
    pub book: Book,
    /// The wallet that pays.
    pub wallet: std::sync::Arc<dyn crate::wallet::Wallet>,
    /// The most routing fee a payout may cost.
    pub fee: PayoutFee,
    /// Let Lightning-address hosts on loopback through over plain HTTP (tests).
    pub allow_loopback_http: bool,
}

impl Pipeline {
    /// The pipeline's payer.
    pub fn payer(&self) -> Payer {
        let inner = &self.inner;
        Payer {
            book: inner.book.clone(),
            wallet: inner.wallet.clone(),
            fee: inner.config.payout_fee,
            allow_loopback_http: inner.config.payout_lnurl_allow_loopback_http,
        }
    }

    /// See [`Payer::withdraw`].
    pub async fn withdraw(&self, account: Account, bolt11: &str) -> Result<Payout, PayoutRefusal> {
        self.payer().withdraw(account, bolt11).await
    }

    /// See [`Payer::withdraw_to_address`].
    pub async fn withdraw_to_address(
        &self,
        account: Account,
        address: &str,
        amount_msat: Option<u64>,
    ) -> Result<Payout, PayoutRefusal> {
        self.payer()
            .withdraw_to_address(account, address, amount_msat)
            .await
    }

    /// See [`Payer::reconcile`].
    pub async fn reconcile_payouts(&self) {
        self.payer().reconcile().await
    }
}

/// Where a payout goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A BOLT11 invoice with an amount.
    Bolt11(String),
    /// A Lightning address, and how much (default: the whole balance less the most fee).
    Address {
        /// `name@host`.
        address: String,
        /// Whole sats, in msat.
        amount_msat: Option<u64>,
    },
}

impl Payer {
    /// Pay out to `target` from `account`.
    pub async fn pay_out(&self, account: Account, target: Target) -> Result<Payout, PayoutRefusal> {
        match target {
            Target::Bolt11(bolt11) => self.withdraw(account, &bolt11).await,
            Target::Address {
                address,
                amount_msat,
            } => {
                self.withdraw_to_address(account, &address, amount_msat)
                    .await
            }
        }
    }

    /// Pay `bolt11` from `account`'s balance: book it pending, then ask the wallet. Returns the
    /// payout as it stands when the wallet answered (paid, failed, or still pending; a pending
    /// one is looked up until it ends).
    pub async fn withdraw(&self, account: Account, bolt11: &str) -> Result<Payout, PayoutRefusal> {
        self.pay_invoice(account, bolt11, None).await
    }

    /// Pay `amount_msat` from `account` to `bolt11`, an invoice that names no amount (an HTTP
    /// `Payment` session's return invoice), the same two phases as [`Payer::withdraw`]; the
    /// wallet must be able to ([`Wallet::pays_amountless`]).
    ///
    /// [`Wallet::pays_amountless`]: crate::wallet::Wallet::pays_amountless
    pub async fn refund_to(
        &self,
        account: Account,
        bolt11: &str,
        amount_msat: u64,
    ) -> Result<Payout, PayoutRefusal> {
        if amount_msat == 0 {
            return Err(PayoutRefusal::Invoice("nothing to refund".to_owned()));
        }
        self.pay_invoice(account, bolt11, Some(amount_msat)).await
    }

    /// Pay `bolt11`: the amount it names, or `chosen_msat` when it names none (and only then).
    async fn pay_invoice(
        &self,
        account: Account,
        bolt11: &str,
        chosen_msat: Option<u64>,
    ) -> Result<Payout, PayoutRefusal> {
        let bolt11 = bolt11.trim();
        let info = bolt11::decode(bolt11).map_err(|e| PayoutRefusal::Invoice(e.to_string()))?;
        let named = info.amount_msat.filter(|a| *a > 0);
        let amount_msat = match (named, chosen_msat) {
            (Some(amount), None) => amount,
            (None, Some(amount)) => amount,
            (None, None) => {
                return Err(PayoutRefusal::Invoice(
                    "the invoice names no amount".to_owned(),
                ))
            }
            (Some(_), Some(_)) => {
                return Err(PayoutRefusal::Invoice(
                    "a refund goes to an invoice that names no amount".to_owned(),
                ))
            }
        };
        let now = unix_now();
        if info.expires_at <= now + 10 {
            return Err(PayoutRefusal::Invoice("the invoice has expired".to_owned()));
        }
        let payout = Payout {
            account,
            bolt11: bolt11.to_owned(),
            payment_hash: info.payment_hash,
            amount_msat,
            max_fee_msat: self.fee.max_for(amount_msat),
            expires_at: info.expires_at,
            state: PayoutState::Pending,
            note: None,
            created_at: now,
            updated_at: now,
        };
        self.send(payout, chosen_msat.is_some()).await
    }

    /// Book `payout` pending, then ask the wallet to pay it (with its amount, when the invoice
    /// names none), and book what became of it.
    async fn send(&self, payout: Payout, amountless: bool) -> Result<Payout, PayoutRefusal> {
        let (account, amount_msat) = (payout.account, payout.amount_msat);
        let payout = self.book.begin_payout(payout).await?;
        tracing::info!(account = %account, payment_hash = %payout.payment_hash, amount_msat, max_fee_msat = payout.max_fee_msat, amountless, "payout pending; paying");
        let paid = if amountless {
            self.wallet
                .pay_amountless(&payout.bolt11, amount_msat, payout.max_fee_msat)
                .await
        } else {
            self.wallet.pay(&payout.bolt11, payout.max_fee_msat).await
        };
        let ended = match paid {
            // The preimage is the proof; the fee is what the wallet says it spent.
            Ok(sent) if preimage_matches(&sent.preimage, &payout.payment_hash) => {
                self.book
                    .finish_payout(
                        &payout.payment_hash,
                        PayoutState::Paid {
                            fee_msat: sent.fee_msat,
                        },
                    )
                    .await
            }
            Ok(_) => {
                let why = "the wallet answered with a preimage that is not this invoice's";
                self.look_up_payout(&payout, Some(why.to_owned())).await
            }
            Err(e) if e.declined() => self.look_up_declined(&payout, &e).await,
            Err(e) => self.look_up_payout(&payout, Some(pay_error(&e))).await,
        };
        Ok(ended?)
    }

    /// Pay out to a Lightning address: `amount_msat`, or the whole balance less the most fee,
    /// in whole sats rounded down (the rest stays as credit). The invoice comes from the host
    /// the address names, fetched as [`lnurl::Reach::Customer`] allows, and must ask exactly
    /// that amount and commit to the address's metadata.
    pub async fn withdraw_to_address(
        &self,
        account: Account,
        address: &str,
        amount_msat: Option<u64>,
    ) -> Result<Payout, PayoutRefusal> {
        let amount = match amount_msat {
            Some(amount) => amount,
            None => {
                let balance = self
                    .book
                    .store()
                    .read(move |r| Ok::<_, BookError>(ledger::balance(r, &account)?))
                    .await?;
                let fee = self.fee.max_for(balance);
                balance.saturating_sub(fee) / 1000 * 1000
            }
        };
        if amount < 1000 || amount % 1000 != 0 {
            return Err(PayoutRefusal::Invoice(format!(
                "a payout to an address is whole sats, at least 1 sat, not {amount} msat"
            )));
        }
        let reach = lnurl::Reach::Customer {
            allow_loopback_http: self.allow_loopback_http,
        };
        let bolt11 = lnurl::invoice_for_address(&reach, address, amount)
            .await
            .map_err(|e| PayoutRefusal::Invoice(format!("{address}: {e}")))?;
        self.withdraw(account, &bolt11).await
    }

    /// A payout the wallet declined (it said it sent nothing, and will not): failed at once
    /// unless the wallet knows a payment to its hash after all.
    async fn look_up_declined(
        &self,
        payout: &Payout,
        e: &crate::wallet::WalletError,
    ) -> Result<Payout, BookError> {
        let hash = &payout.payment_hash;
        match self.wallet.lookup_payment(hash).await {
            Ok(OutgoingStatus::Unknown | OutgoingStatus::Failed) => {
                tracing::warn!(payment_hash = %hash, reason = %e, "payout declined by the wallet; the amount is back on the balance");
                self.book
                    .note_payout(hash, format!("declined: {e}"))
                    .await?;
                self.book.finish_payout(hash, PayoutState::Failed).await
            }
            _ => self.look_up_payout(payout, Some(pay_error(e))).await,
        }
    }

    /// Ask the wallet what became of a pending payout and book what it says; `said` is what
    /// the wallet answered before (kept as a note when it stays pending).
    async fn look_up_payout(
        &self,
        payout: &Payout,
        said: Option<String>,
    ) -> Result<Payout, BookError> {
        let book = &self.book;
        let hash = &payout.payment_hash;
        let state = match self.wallet.lookup_payment(hash).await {
            Ok(OutgoingStatus::Succeeded { fee_msat }) => PayoutState::Paid { fee_msat },
            Ok(OutgoingStatus::Failed) => PayoutState::Failed,
            Ok(OutgoingStatus::Unknown)
                if unix_now() > payout.expires_at + EXPIRED_UNKNOWN_GRACE_SECS =>
            {
                PayoutState::Failed
            }
            Ok(status) => {
                let note = match said {
                    Some(said) => format!("{said}; the wallet says {status:?}"),
                    None => format!("the wallet says {status:?}"),
                };
                book.note_payout(hash, note).await?;
                return Ok(book.payout(hash).await?.unwrap_or_else(|| payout.clone()));
            }
            Err(e) => {
                let note = format!("lookup failed: {}", pay_error(&e));
                book.note_payout(hash, note).await?;
                return Ok(book.payout(hash).await?.unwrap_or_else(|| payout.clone()));
            }
        };
        let ended = book.finish_payout(hash, state).await?;
        match ended.state {
            PayoutState::Paid { fee_msat } => {
                tracing::info!(payment_hash = %hash, fee_msat, "payout arrived")
            }
            PayoutState::Failed => {
                tracing::warn!(payment_hash = %hash, "payout failed; the amount is back on the balance")
            }
            PayoutState::Pending => {}
        }
        Ok(ended)
    }

    /// Look up every pending payout once (on start, and on each reconcile pass).
    pub async fn reconcile(&self) {
        let pending = match self.book.pending_payouts().await {
            Ok(pending) => pending,
            Err(e) => return tracing::error!(error = %e, "cannot read pending payouts"),
        };
        for payout in pending {
            if let Err(e) = self.look_up_payout(&payout, None).await {
                tracing::error!(payment_hash = %payout.payment_hash, error = %e, "cannot book a payout's outcome");
            }
        }
    }
}

fn preimage_matches(preimage: &[u8; 32], hash: &PaymentHash) -> bool {
    use bitcoin::hashes::{sha256, Hash};
    sha256::Hash::hash(preimage).to_byte_array() == hash.0
}

/// A wallet error as a note, with no internals a customer should not see.
fn pay_error(e: &WalletError) -> String {
    match e {
        WalletError::InsufficientBalance { .. } => "the service's wallet is short".to_owned(),
        WalletError::InvalidInvoice(why) => format!("the invoice was refused: {why}"),
        _ => format!(
            "the wallet did not confirm it ({})",
            crate::incident::Incident::log("paying out", e)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::book::tests::{balance, book, top_up, totals};
    use nostr_sdk::Keys;

    fn payout(account: Account, hash: u8, amount_msat: u64, max_fee_msat: u64) -> Payout {
        Payout {
            account,
            bolt11: "lnbcrt...".to_owned(),
            payment_hash: PaymentHash([hash; 32]),
            amount_msat,
            max_fee_msat,
            expires_at: u64::MAX,
            state: PayoutState::Pending,
            note: None,
            created_at: 1,
            updated_at: 1,
        }
    }

    #[tokio::test]
    async fn a_payout_holds_amount_and_fee_then_returns_the_unused_fee() {
        let (book, alice) = (book(), Account::from(Keys::generate().public_key()));
        top_up(&book, alice, 1, 10_000).await;
        book.begin_payout(payout(alice, 9, 6_000, 1_000))
            .await
            .expect("begins");
        assert_eq!(balance(&book, alice).await, 3_000);
        assert_eq!(totals(&book).await.in_flight_msat, 7_000);
        // A wallet that spent more than allowed: the customer pays the most allowed.
        let paid = book
            .finish_payout(&PaymentHash([9; 32]), PayoutState::Paid { fee_msat: 5_000 })
            .await
            .expect("paid");
        assert_eq!(paid.state, PayoutState::Paid { fee_msat: 1_000 });
        let totals = totals(&book).await;
        assert_eq!((totals.in_flight_msat, totals.routing_fee_msat), (0, 1_000));
        assert_eq!(balance(&book, alice).await, 3_000);
        // The answer twice: nothing moves again, a later "failed" included.
        for state in [PayoutState::Paid { fee_msat: 0 }, PayoutState::Failed] {
            let again = book
                .finish_payout(&PaymentHash([9; 32]), state)
                .await
                .expect("again");
            assert_eq!(again.state, PayoutState::Paid { fee_msat: 1_000 });
        }
        assert_eq!(balance(&book, alice).await, 3_000);
        assert_eq!(totals.payout_msat, 6_000);
    }

    #[tokio::test]
    async fn a_failed_payout_gives_it_all_back_and_a_hash_pays_once() {
        let (book, alice) = (book(), Account::from(Keys::generate().public_key()));
        top_up(&book, alice, 1, 10_000).await;
        book.begin_payout(payout(alice, 9, 6_000, 1_000))
            .await
            .expect("begins");
        book.finish_payout(&PaymentHash([9; 32]), PayoutState::Failed)
            .await
            .expect("failed");
        assert_eq!(balance(&book, alice).await, 10_000);
        let again = book.begin_payout(payout(alice, 9, 1_000, 0)).await;
        assert!(matches!(again, Err(PayoutRefusal::Hash(_))), "{again:?}");
        // Our own invoice (the top-up's hash) is never paid out.
        let own = book.begin_payout(payout(alice, 1, 1_000, 0)).await;
        assert!(matches!(own, Err(PayoutRefusal::Hash(_))), "{own:?}");
        // Amount plus the most fee must be on the balance.
        let short = book.begin_payout(payout(alice, 7, 9_500, 600)).await;
        assert!(
            matches!(short, Err(PayoutRefusal::Balance { .. })),
            "{short:?}"
        );
        assert_eq!(balance(&book, alice).await, 10_000);
        assert_eq!(totals(&book).await.in_flight_msat, 0);
    }

    #[test]
    fn the_most_fee_is_base_plus_ppm() {
        let fee = PayoutFee {
            base_msat: 10_000,
            ppm: 5_000,
        };
        assert_eq!(fee.max_for(0), 10_000);
        assert_eq!(fee.max_for(1_000_000), 15_000);
        assert_eq!(fee.max_for(u64::MAX), 10_000 + u64::MAX / 200);
    }
}
