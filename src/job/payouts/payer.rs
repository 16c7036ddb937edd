//! The wallet side of a payout: pay an invoice or a Lightning address, look up what the wallet
//! did, and reconcile payouts left pending.

use super::{Payout, PayoutFee, PayoutRefusal, PayoutState, EXPIRED_UNKNOWN_GRACE_SECS};
use crate::job::book::{Book, BookError};
use crate::job::pipeline::{unix_now, Pipeline};
use crate::ledger::{self, Account};
use crate::wallet::{bolt11, lnurl, OutgoingStatus, PaymentHash, WalletError};

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

    /// See [`Payer::reconcile`]; the payouts still pending, and those stuck, are the
    /// `dvmd_payouts_pending` and `dvmd_payouts_stuck` gauges.
    pub async fn reconcile_payouts(&self) {
        let (pending, stuck) = self.payer().reconcile().await;
        self.inner.metrics.payouts(pending, stuck);
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
        // The customer pays at most `max_fee_msat` of routing fee, and the service's wallet
        // enforces its own limit (LNbits its fee reserve; NWC none we can set): a fee above the
        // first is the operator's. Route hints are fees the payee sets, on channels it may run
        // at both ends, so a payout whose hint asks more than the customer would pay is refused.
        let max_fee_msat = self.fee.max_for(amount_msat);
        let hint_fee = info.route_hint_fee_msat(amount_msat);
        if hint_fee > max_fee_msat {
            return Err(PayoutRefusal::Invoice(format!(
                "the invoice's route hints ask {hint_fee} msat of routing fee; a payout of {amount_msat} msat pays at most {max_fee_msat} msat"
            )));
        }
        let payout = Payout {
            account,
            bolt11: bolt11.to_owned(),
            payment_hash: info.payment_hash,
            amount_msat,
            max_fee_msat,
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
                if self.wallet.unknown_means_unsent()
                    && past_paying(payout.expires_at, unix_now()) =>
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

    /// Look up every pending payout once (on start, and on each reconcile pass). Returns how
    /// many are still pending, and how many of those are stuck: past their invoice's expiry
    /// (and [`EXPIRED_UNKNOWN_GRACE_SECS`]) with a wallet that cannot say what became of them
    /// (its lookups fail, or it knows no payment to the hash but does not record one before
    /// sending: [`crate::wallet::Wallet::unknown_means_unsent`]), which only the operator can
    /// resolve.
    pub async fn reconcile(&self) -> (u64, u64) {
        let pending = match self.book.pending_payouts().await {
            Ok(pending) => pending,
            Err(e) => {
                tracing::error!(error = %e, "cannot read pending payouts");
                return (0, 0);
            }
        };
        let (mut still, mut stuck) = (0, 0);
        for payout in pending {
            let hash = payout.payment_hash;
            match self.look_up_payout(&payout, None).await {
                Ok(looked) if looked.state != PayoutState::Pending => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(payment_hash = %hash, error = %e, "cannot book a payout's outcome")
                }
            }
            still += 1;
            if past_paying(payout.expires_at, unix_now()) {
                stuck += 1;
                tracing::error!(payment_hash = %hash, account = %payout.account, amount_msat = payout.amount_msat, note = payout.note.as_deref().unwrap_or(""), "payout still pending long after its invoice expired: the wallet cannot say what became of it; check the wallet (its key, its URL) or the payment in it");
            }
        }
        (still, stuck)
    }
}

/// Whether an invoice expiring at `expires_at` can no longer be paid at `now`, with
/// [`EXPIRED_UNKNOWN_GRACE_SECS`] to spare. Saturating: an invoice may name an expiry near
/// 2^64 s, and a wrapped sum would fail at once a payout the wallet may still be sending.
fn past_paying(expires_at: u64, now: u64) -> bool {
    now > expires_at.saturating_add(EXPIRED_UNKNOWN_GRACE_SECS)
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
    use crate::job::book::tests::{balance, book, top_up};
    use crate::job::payouts::PayoutFee;
    use bitcoin::hashes::{sha256, Hash};
    use bitcoin::secp256k1::{PublicKey, Secp256k1, SecretKey};
    use lightning_invoice::{
        Currency, InvoiceBuilder, PaymentSecret, RouteHint, RouteHintHop, RoutingFees,
    };

    /// An invoice for `msat` from a node of its own, with one route hint through a channel
    /// asking `base_msat` plus `ppm`.
    fn invoice_with_hint(msat: u64, base_msat: u32, ppm: u32) -> String {
        let secp = Secp256k1::new();
        let key = SecretKey::from_slice(&[7; 32]).expect("key");
        let hop = RouteHintHop {
            src_node_id: PublicKey::from_secret_key(
                &secp,
                &SecretKey::from_slice(&[8; 32]).expect("key"),
            ),
            short_channel_id: 42,
            fees: RoutingFees {
                base_msat,
                proportional_millionths: ppm,
            },
            cltv_expiry_delta: 40,
            htlc_minimum_msat: None,
            htlc_maximum_msat: None,
        };
        InvoiceBuilder::new(Currency::Regtest)
            .description("home".to_owned())
            .payment_hash(sha256::Hash::hash(&[base_msat as u8; 32]))
            .payment_secret(PaymentSecret([1; 32]))
            .current_timestamp()
            .min_final_cltv_expiry_delta(144)
            .amount_milli_satoshis(msat)
            .private_route(RouteHint(vec![hop]))
            .build_signed(|msg| secp.sign_ecdsa_recoverable(msg, &key))
            .expect("invoice")
            .to_string()
    }

    /// A payee's route hint is a fee it sets, maybe for itself: a payout whose hint asks more
    /// than the customer pays (the most fee) is refused before anything is booked, rather
    /// than the wallet paying the rest out of the operator's pocket.
    #[tokio::test]
    async fn a_payout_whose_route_hint_asks_more_than_its_most_fee_is_refused() {
        let book = book();
        let alice = Account::from(nostr_sdk::Keys::generate().public_key());
        top_up(&book, alice, 1, 2_000_000).await;
        let payer = Payer {
            wallet: std::sync::Arc::new(
                crate::wallet::dev::DevWallet::open(book.store().clone())
                    .await
                    .expect("wallet"),
            ),
            book: book.clone(),
            fee: PayoutFee {
                base_msat: 10_000,
                ppm: 5_000,
            },
            allow_loopback_http: false,
        };
        // 1,000,000 msat may cost 15,000 msat of fee; the hint asks 10,000 + 1% = 20,000.
        let greedy = invoice_with_hint(1_000_000, 10_000, 10_000);
        let decoded = bolt11::decode(&greedy).expect("decodes");
        assert_eq!(decoded.route_hint_fee_msat(1_000_000), 20_000);
        let refused = payer.withdraw(alice, &greedy).await;
        assert!(
            matches!(&refused, Err(PayoutRefusal::Invoice(why)) if why.contains("route hints ask 20000 msat")),
            "{refused:?}"
        );
        assert_eq!(balance(&book, alice).await, 2_000_000, "nothing booked");
        assert_eq!(
            book.payout(&decoded.payment_hash).await.expect("read"),
            None
        );
        // A hint within the most fee is the wallet's to take or not.
        let fair = bolt11::decode(&invoice_with_hint(1_000_000, 1_000, 1_000)).expect("decodes");
        assert_eq!(fair.route_hint_fee_msat(1_000_000), 2_000);
        // Within the most fee for any amount (a session's return invoice, whose refund's
        // amount is set at close): base and rate each within.
        assert!(fair.route_hints_within(10_000, 5_000));
        assert!(!decoded.route_hints_within(10_000, 5_000));
        assert!(!fair.route_hints_within(999, 5_000));
    }

    #[test]
    fn an_invoice_is_past_paying_an_hour_after_it_expires_and_never_before() {
        assert!(!past_paying(1_000, 1_000 + EXPIRED_UNKNOWN_GRACE_SECS));
        assert!(past_paying(1_000, 1_001 + EXPIRED_UNKNOWN_GRACE_SECS));
        // An expiry near 2^64 (a BOLT11 `x` field may say so) never wraps into the past.
        for expires_at in [u64::MAX, u64::MAX - EXPIRED_UNKNOWN_GRACE_SECS + 1] {
            assert!(!past_paying(expires_at, unix_now()), "{expires_at}");
        }
    }
}

#[cfg(test)]
mod stuck {
    use super::*;
    use crate::job::book::tests::{balance, book, top_up};
    use crate::wallet::{Invoice, InvoiceRequest, PaymentSent, PaymentStatus, Wallet};

    /// A wallet that cannot answer (a rotated key, a moved URL): every call fails; or, with a
    /// status, one whose payment lookups answer it, and whose `Unknown` does not say that
    /// nothing was sent (an NWC service).
    struct Unhelpful(Option<OutgoingStatus>);

    #[async_trait::async_trait]
    impl Wallet for Unhelpful {
        fn name(&self) -> &'static str {
            "unreachable"
        }
        async fn create_invoice(&self, _: InvoiceRequest) -> Result<Invoice, WalletError> {
            Err(WalletError::Unavailable("unreachable".into()))
        }
        async fn lookup(&self, _: &PaymentHash) -> Result<PaymentStatus, WalletError> {
            Err(WalletError::Unavailable("unreachable".into()))
        }
        async fn pay(&self, _: &str, _: u64) -> Result<PaymentSent, WalletError> {
            Err(WalletError::Unavailable("unreachable".into()))
        }
        async fn lookup_payment(&self, _: &PaymentHash) -> Result<OutgoingStatus, WalletError> {
            self.0
                .ok_or_else(|| WalletError::Unavailable("unreachable".into()))
        }
        async fn balance(&self) -> Result<u64, WalletError> {
            Err(WalletError::Unavailable("unreachable".into()))
        }
        fn settlements(&self) -> tokio::sync::broadcast::Receiver<PaymentHash> {
            tokio::sync::broadcast::channel(1).1
        }
    }

    /// A payout whose invoice expired long ago, with a wallet that cannot say what became of
    /// it (its lookups fail, or it knows no payment to the hash but may not record one in
    /// flight), stays pending (it may have been paid) and is counted stuck for the operator;
    /// one a wallet that records every payment before sending knows nothing of is failed and
    /// its money given back.
    #[tokio::test]
    async fn a_payout_the_wallet_cannot_account_for_stays_pending_and_is_counted_stuck() {
        let book = book();
        let alice = Account::from(nostr_sdk::Keys::generate().public_key());
        top_up(&book, alice, 1, 10_000).await;
        let payout = Payout {
            account: alice,
            bolt11: "lnbcrt...".to_owned(),
            payment_hash: PaymentHash([9; 32]),
            amount_msat: 6_000,
            max_fee_msat: 1_000,
            expires_at: 1,
            state: PayoutState::Pending,
            note: None,
            created_at: 1,
            updated_at: 1,
        };
        book.begin_payout(payout).await.expect("begins");
        let payer = |wallet: std::sync::Arc<dyn crate::wallet::Wallet>| Payer {
            book: book.clone(),
            wallet,
            fee: PayoutFee {
                base_msat: 1_000,
                ppm: 0,
            },
            allow_loopback_http: false,
        };
        for wallet in [Unhelpful(None), Unhelpful(Some(OutgoingStatus::Unknown))] {
            assert_eq!(payer(std::sync::Arc::new(wallet)).reconcile().await, (1, 1));
            assert_eq!(balance(&book, alice).await, 3_000, "still in flight");
        }
        let dev = crate::wallet::dev::DevWallet::open(book.store().clone())
            .await
            .expect("wallet");
        assert_eq!(payer(std::sync::Arc::new(dev)).reconcile().await, (0, 0));
        assert_eq!(balance(&book, alice).await, 10_000, "given back");
    }
}
