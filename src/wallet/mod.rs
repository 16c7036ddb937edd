//! Lightning wallets behind one [`Wallet`] trait: the embedded dev wallet, LNbits (API v1) and
//! Nostr Wallet Connect; `lnurl` pays Lightning addresses, `bolt11` reads invoices.
//!
//! A wallet's settlement stream carries hints only. Nothing moves on a hint: the pipeline asks
//! [`Wallet::lookup`] for the payment hash and acts on that answer.

pub mod bolt11;
pub mod dev;
pub mod lnbits;
pub mod lnurl;
pub mod nwc;
pub mod secret;

use std::fmt;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// A payment hash (sha256 of the preimage).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PaymentHash(pub [u8; 32]);

impl PaymentHash {
    /// Parse 64 hex characters.
    pub fn from_hex(s: &str) -> Result<Self, WalletError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes)
            .map_err(|_| WalletError::InvalidInvoice(format!("`{s}` is not a payment hash")))?;
        Ok(Self(bytes))
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for PaymentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PaymentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PaymentHash({})", self.to_hex())
    }
}

impl TryFrom<String> for PaymentHash {
    type Error = WalletError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::from_hex(&s)
    }
}

impl From<PaymentHash> for String {
    fn from(hash: PaymentHash) -> Self {
        hash.to_hex()
    }
}

/// What an invoice commits to in its description field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvoiceDescription {
    /// A short memo shown by the payer's wallet.
    Memo(String),
    /// A longer text the invoice commits to by its sha256 (NIP-57 zap requests, LNURL
    /// metadata). Backends hash these exact bytes; some (LNbits) take the text, not the hash.
    Hashed(String),
}

/// An invoice to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceRequest {
    /// Amount in msat; backends that work in whole sats round up.
    pub amount_msat: u64,
    /// Description or its hash.
    pub description: InvoiceDescription,
    /// Seconds until it expires.
    pub expiry_secs: u64,
}

/// An invoice the wallet issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    /// BOLT11 string.
    pub bolt11: String,
    /// Its payment hash.
    pub payment_hash: PaymentHash,
    /// The amount it asks for, in msat (after any rounding to whole sats).
    pub amount_msat: u64,
    /// Unix seconds after which it cannot be paid.
    pub expires_at: u64,
}

/// What the wallet knows of a payment hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    /// Issued, not paid, not expired.
    Pending,
    /// Paid; the amount actually received in msat.
    Paid {
        /// Received amount in msat.
        amount_msat: u64,
    },
    /// Expired unpaid.
    Expired,
    /// The wallet never issued it (or forgot it).
    Unknown,
}

/// What the wallet knows of a payment it was asked to send, by payment hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutgoingStatus {
    /// It arrived; the routing fee it cost, msat.
    Succeeded {
        /// Routing fee, msat.
        fee_msat: u64,
    },
    /// It failed for good: no money left, and none will.
    Failed,
    /// In flight: it may still succeed or fail.
    Pending,
    /// The wallet has no payment to that hash (never sent, or forgotten). Not proof that none
    /// was sent: a payout keeps being looked up.
    Unknown,
}

/// An outgoing payment that succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentSent {
    /// The preimage proving payment.
    pub preimage: [u8; 32],
    /// Routing fee paid, msat.
    pub fee_msat: u64,
}

/// Errors of a wallet backend. Never carries secrets (keys, connection strings).
#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    /// The backend cannot be reached or failed; try again later.
    #[error("wallet unavailable: {0}")]
    Unavailable(String),
    /// The invoice cannot be parsed or is not usable.
    #[error("invalid invoice: {0}")]
    InvalidInvoice(String),
    /// Not enough funds.
    #[error("insufficient balance: have {balance_msat} msat, need {needed_msat} msat")]
    InsufficientBalance {
        /// Spendable balance.
        balance_msat: u64,
        /// What the payment needs.
        needed_msat: u64,
    },
    /// The backend refused the operation.
    #[error("wallet refused: {0}")]
    Refused(String),
    /// The wallet answered that it will not make this payment (not implemented, not allowed,
    /// over a quota): it sent nothing. A payout it declines and knows nothing of is failed at
    /// once, not looked up until its invoice expires.
    #[error("wallet declined: {0}")]
    Declined(String),
    /// The wallet answered, positively, that it has no record of this payment hash: LNbits'
    /// "Payment does not exist.", NWC's `NOT_FOUND`. Only this reads as "nothing was sent"; a
    /// 404 from anything else on the way (a proxy, a moved path) is an error, so a payout it
    /// answered stays pending rather than failed and paid again.
    #[error("wallet has no such payment: {0}")]
    NotFound(String),
    /// The store behind the wallet failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl WalletError {
    /// Whether the wallet said it sent nothing and will not: declined, short of balance
    /// before it tried, or an invoice it could not read (ours or the backend's decoder).
    pub fn declined(&self) -> bool {
        matches!(
            self,
            Self::Declined(_) | Self::InsufficientBalance { .. } | Self::InvalidInvoice(_)
        )
    }
}

/// A Lightning wallet. One conformance suite (tests/) runs against every backend.
#[async_trait::async_trait]
pub trait Wallet: Send + Sync + 'static {
    /// A short name for logs and metrics (`dev`, `lnbits`, `nwc`).
    fn name(&self) -> &'static str;

    /// Issue an invoice.
    async fn create_invoice(&self, request: InvoiceRequest) -> Result<Invoice, WalletError>;

    /// Ask the wallet itself whether `payment_hash` was paid: the only answer money moves on.
    async fn lookup(&self, payment_hash: &PaymentHash) -> Result<PaymentStatus, WalletError>;

    /// Pay a BOLT11 invoice, spending at most `max_fee_msat` on routing. An error does not
    /// mean nothing was sent: ask [`Wallet::lookup_payment`].
    async fn pay(&self, bolt11: &str, max_fee_msat: u64) -> Result<PaymentSent, WalletError>;

    /// Whether it can pay an invoice that names no amount ([`Wallet::pay_amountless`]): the
    /// HTTP `Payment` session intent refunds to one, and is offered only when this holds.
    fn pays_amountless(&self) -> bool {
        false
    }

    /// Pay `amount_msat` to a BOLT11 invoice that names no amount, spending at most
    /// `max_fee_msat` on routing. As with [`Wallet::pay`], an error does not mean nothing was
    /// sent. Wallets that cannot ([`Wallet::pays_amountless`] false) refuse.
    async fn pay_amountless(
        &self,
        _bolt11: &str,
        _amount_msat: u64,
        _max_fee_msat: u64,
    ) -> Result<PaymentSent, WalletError> {
        Err(WalletError::Declined(format!(
            "the {} wallet cannot pay an invoice that names no amount",
            self.name()
        )))
    }

    /// Whether [`Wallet::lookup_payment`] answering [`OutgoingStatus::Unknown`] means the
    /// wallet never began a payment to that hash, as where it records an outgoing payment
    /// before it sends one (LNbits, the dev wallet). Only then is a payout whose invoice
    /// expired (an hour ago, [`crate::job::payouts::EXPIRED_UNKNOWN_GRACE_SECS`]) and unknown
    /// to the wallet failed and its amount given back. Elsewhere (NIP-47 does not say whether
    /// a wallet service finds its outgoing payments, nor while they are in flight), a payout it
    /// was asked to send, and never said it declined, stays pending and is counted stuck: the
    /// payee's node can hold the payment and settle it long after the invoice expired.
    fn unknown_means_unsent(&self) -> bool {
        false
    }

    /// Ask the wallet what became of a payment it was asked to send to `payment_hash`: the
    /// only answer a payout's money moves on.
    async fn lookup_payment(
        &self,
        payment_hash: &PaymentHash,
    ) -> Result<OutgoingStatus, WalletError>;

    /// Spendable balance in msat.
    async fn balance(&self) -> Result<u64, WalletError>;

    /// Hints that a payment hash may have been paid. Lossy: a lagging receiver misses hints,
    /// so the pipeline also reconciles open invoices by lookup.
    fn settlements(&self) -> broadcast::Receiver<PaymentHash>;

    /// Turn a body posted to dvmd's `/hooks/wallet` into a settlement hint (and publish it).
    /// The body is untrusted. Backends without webhooks ignore it.
    fn webhook_hint(&self, _body: &[u8]) -> Option<PaymentHash> {
        None
    }

    /// Follow the backend's push channel (a websocket, relay notifications) until `cancel`
    /// fires, publishing settlement hints. Backends without one return at once.
    async fn follow(&self, _cancel: CancellationToken) {}
}

/// Open the configured wallet. The dev wallet lives in `store`; the others are remote.
/// Returns the dev wallet too, when it is the one, for `/dev/pay`.
pub async fn open(
    choice: &crate::config::WalletChoice,
    store: &crate::store::Store,
) -> Result<
    (
        std::sync::Arc<dyn Wallet>,
        Option<std::sync::Arc<dev::DevWallet>>,
    ),
    WalletError,
> {
    use std::sync::Arc;

    use crate::config::WalletChoice;
    Ok(match choice {
        WalletChoice::Dev => {
            let dev = Arc::new(dev::DevWallet::open(store.clone()).await?);
            tracing::warn!(
                "using the dev wallet: regtest invoices, simulated settlement, not money"
            );
            (dev.clone(), Some(dev))
        }
        WalletChoice::Lnbits(config) => {
            tracing::info!(url = %config.url, "using the LNbits wallet");
            (Arc::new(lnbits::LnbitsWallet::new(config.clone())?), None)
        }
        WalletChoice::Nwc(config) => {
            tracing::info!("using a Nostr Wallet Connect wallet");
            (
                Arc::new(nwc::NwcWallet::connect(config.clone()).await?),
                None,
            )
        }
    })
}
