//! The embedded dev wallet: real BOLT11 invoices on the regtest prefix (`lnbcrt`), signed by a
//! dev node key kept in the store, with settlement simulated by `dvmd dev pay` / `POST /dev/pay`.
//!
//! Nothing here is money. The regtest prefix makes any invoice it issues unpayable on mainnet
//! and obvious to a human, which is why the daemon only offers this wallet in `--dev` mode or
//! when the operator names it explicitly.

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bitcoin::hashes::{sha256, Hash};
use bitcoin::secp256k1::{Secp256k1, SecretKey, SignOnly};
use lightning_invoice::{
    Bolt11Invoice, Currency, InvoiceBuilder, PaymentSecret, SignedRawBolt11Invoice,
};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{
    Invoice, InvoiceDescription, InvoiceRequest, OutgoingStatus, PaymentHash, PaymentSent,
    PaymentStatus, Wallet, WalletError,
};
use crate::store::{self, Store, Tree, TxError};

const NODE_KEY: &[u8] = b"dev_wallet_node_key";
const SPENT: &[u8] = b"dev_wallet_spent_msat";
const SETTLEMENT_HINTS: usize = 4096;
const MIN_FINAL_CLTV_EXPIRY_DELTA: u64 = 144;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DevInvoice {
    bolt11: String,
    preimage: String,
    amount_msat: u64,
    expires_at: u64,
    paid_at: Option<u64>,
    /// Paid by this wallet's own `pay` (an outgoing payment), not by `/dev/pay`.
    #[serde(default)]
    sent: bool,
}

/// The dev wallet.
pub struct DevWallet {
    store: Store,
    node_key: SecretKey,
    secp: Secp256k1<SignOnly>,
    hints: broadcast::Sender<PaymentHash>,
}

impl DevWallet {
    /// Open the dev wallet in `store`, creating its node key on first use.
    pub async fn open(store: Store) -> Result<Self, WalletError> {
        let fresh = SecretKey::new(&mut rand::thread_rng()).secret_bytes();
        let raw = store
            .commit(move |tx| {
                if let Some(existing) = tx.get_raw(Tree::Meta, NODE_KEY)? {
                    return Ok::<_, TxError<WalletError>>(existing);
                }
                tx.put_raw(Tree::Meta, NODE_KEY, &fresh)?;
                Ok(fresh.to_vec())
            })
            .await?;
        let node_key = SecretKey::from_slice(&raw)
            .map_err(|e| WalletError::Unavailable(format!("corrupt dev node key: {e}")))?;
        let (hints, _) = broadcast::channel(SETTLEMENT_HINTS);
        Ok(Self {
            store,
            node_key,
            secp: Secp256k1::signing_only(),
            hints,
        })
    }

    /// Simulate a customer paying `bolt11`, one of this wallet's own invoices. Returns the
    /// preimage. Paying twice, an expired invoice or a foreign invoice is refused.
    pub async fn settle(&self, bolt11: &str) -> Result<[u8; 32], WalletError> {
        self.mark_paid(bolt11, false, None).await
    }

    /// Mark `bolt11` paid, durably, before anyone is told it happened; with `spend`, also record
    /// that the money left this wallet (it paid its own invoice), in the same transaction. An
    /// invoice that names no amount is paid `chosen_msat` (and must be given one).
    ///
    /// The invoice must be one this wallet issued, character for character (BOLT11 ignores
    /// case). That says more than its signature, which only shows that some node signed it, so
    /// the signature is not checked: recovering its public key was the dearest step of a
    /// payment under `dvmd bench load --paid`.
    async fn mark_paid(
        &self,
        bolt11: &str,
        spend: bool,
        chosen_msat: Option<u64>,
    ) -> Result<[u8; 32], WalletError> {
        let presented = bolt11.trim().to_owned();
        let invoice = SignedRawBolt11Invoice::from_str(&presented)
            .map_err(|e| WalletError::InvalidInvoice(e.to_string()))?;
        let hash = invoice
            .raw_invoice()
            .payment_hash()
            .map(|hash| PaymentHash(hash.0.to_byte_array()))
            .ok_or_else(|| WalletError::InvalidInvoice("no payment hash".to_owned()))?;
        let now = unix_now();
        let record = self
            .store
            .commit(move |tx| {
                let record = tx.get::<DevInvoice>(Tree::DevWallet, &hash.0)?;
                let Some(mut record) =
                    record.filter(|record| record.bolt11.eq_ignore_ascii_case(&presented))
                else {
                    return Err(TxError::Abort(WalletError::Refused(
                        "not an invoice of this dev wallet".to_owned(),
                    )));
                };
                if record.paid_at.is_some() {
                    return Err(TxError::Abort(WalletError::Refused(
                        "invoice already paid".to_owned(),
                    )));
                }
                if record.expires_at <= now {
                    return Err(TxError::Abort(WalletError::Refused(
                        "invoice expired".to_owned(),
                    )));
                }
                match (record.amount_msat, chosen_msat) {
                    (0, Some(chosen)) if chosen > 0 => record.amount_msat = chosen,
                    (0, _) => {
                        return Err(TxError::Abort(WalletError::InvalidInvoice(
                            "the invoice names no amount; say how much to pay".to_owned(),
                        )))
                    }
                    (_, None) => {}
                    (_, Some(_)) => {
                        return Err(TxError::Abort(WalletError::InvalidInvoice(
                            "the invoice names its amount".to_owned(),
                        )))
                    }
                }
                record.paid_at = Some(now);
                record.sent = spend;
                tx.put(Tree::DevWallet, &hash.0, &record)?;
                if spend {
                    let spent = tx
                        .get_raw(Tree::Meta, SPENT)?
                        .and_then(|raw| store::be_u64(&raw))
                        .unwrap_or(0);
                    let spent = spent.saturating_add(record.amount_msat);
                    tx.put_raw(Tree::Meta, SPENT, &spent.to_be_bytes())?;
                }
                Ok(record)
            })
            .await?;
        let mut preimage = [0u8; 32];
        hex::decode_to_slice(&record.preimage, &mut preimage)
            .map_err(|e| WalletError::Unavailable(format!("corrupt preimage: {e}")))?;
        tracing::info!(payment_hash = %hash, msat = record.amount_msat, "dev wallet: invoice settled (simulated)");
        // No receiver just means nobody listens yet; the reconciler finds the payment later.
        let _ = self.hints.send(hash);
        Ok(preimage)
    }

    /// Issue an invoice for `amount_msat`, or one that names no amount (the payer chooses).
    async fn issue(
        &self,
        amount_msat: Option<u64>,
        description: InvoiceDescription,
        expiry_secs: u64,
    ) -> Result<Invoice, WalletError> {
        let mut preimage = [0u8; 32];
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut preimage);
        rand::thread_rng().fill_bytes(&mut secret);
        let payment_hash = sha256::Hash::hash(&preimage);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| WalletError::Unavailable(e.to_string()))?;
        let sign = |msg: &bitcoin::secp256k1::Message| {
            self.secp.sign_ecdsa_recoverable(msg, &self.node_key)
        };
        let builder = InvoiceBuilder::new(Currency::Regtest);
        let built = match description {
            InvoiceDescription::Memo(memo) => builder.description(memo),
            InvoiceDescription::Hashed(text) => {
                builder.description_hash(sha256::Hash::hash(text.as_bytes()))
            }
        };
        let built = built
            .payment_hash(payment_hash)
            .payment_secret(PaymentSecret(secret))
            .duration_since_epoch(now)
            .expiry_time(Duration::from_secs(expiry_secs))
            .min_final_cltv_expiry_delta(MIN_FINAL_CLTV_EXPIRY_DELTA);
        let invoice = match amount_msat {
            Some(msat) => built.amount_milli_satoshis(msat).build_signed(sign),
            None => built.build_signed(sign),
        }
        .map_err(|e| WalletError::Refused(format!("cannot build invoice: {e}")))?;

        let hash = PaymentHash(payment_hash.to_byte_array());
        let expires_at = now.as_secs().saturating_add(expiry_secs);
        let record = DevInvoice {
            bolt11: invoice.to_string(),
            preimage: hex::encode(preimage),
            amount_msat: amount_msat.unwrap_or(0),
            expires_at,
            paid_at: None,
            sent: false,
        };
        let stored = record.clone();
        self.store
            .apply(move |tx| {
                Ok::<_, TxError<WalletError>>(tx.put(Tree::DevWallet, &hash.0, &stored)?)
            })
            .await?;
        Ok(Invoice {
            bolt11: record.bolt11,
            payment_hash: hash,
            amount_msat: amount_msat.unwrap_or(0),
            expires_at,
        })
    }

    /// An invoice of this wallet that names no amount, for a test client's return invoice
    /// (HTTP `Payment` sessions refund to one); the dev wallet pays it with the amount asked.
    pub async fn amountless_invoice(
        &self,
        memo: &str,
        expiry_secs: u64,
    ) -> Result<Invoice, WalletError> {
        self.issue(None, InvoiceDescription::Memo(memo.to_owned()), expiry_secs)
            .await
    }

    /// Pay one of its own invoices (anything else would pretend money left the machine):
    /// `chosen_msat` for one that names no amount.
    async fn pay_own(
        &self,
        bolt11: &str,
        chosen_msat: Option<u64>,
    ) -> Result<PaymentSent, WalletError> {
        let invoice = Bolt11Invoice::from_str(bolt11.trim())
            .map_err(|e| WalletError::InvalidInvoice(e.to_string()))?;
        let hash = PaymentHash(invoice.payment_hash().to_byte_array());
        if self.record(&hash).await?.is_none() {
            return Err(WalletError::Refused(
                "the dev wallet pays only its own invoices".to_owned(),
            ));
        }
        let amount = invoice.amount_milli_satoshis().or(chosen_msat).unwrap_or(0);
        let balance = self.balance().await?;
        if balance < amount {
            return Err(WalletError::InsufficientBalance {
                balance_msat: balance,
                needed_msat: amount,
            });
        }
        // Money left (and, being our own invoice, came back): the spend is recorded with the
        // payment, so the balance nets to zero, as it would on a real node.
        let preimage = self.mark_paid(bolt11, true, chosen_msat).await?;
        Ok(PaymentSent {
            preimage,
            fee_msat: 0,
        })
    }

    async fn record(&self, hash: &PaymentHash) -> Result<Option<DevInvoice>, WalletError> {
        let hash = *hash;
        self.store
            .read(move |r| Ok(r.get(Tree::DevWallet, &hash.0)?))
            .await
    }
}

#[async_trait::async_trait]
impl Wallet for DevWallet {
    fn name(&self) -> &'static str {
        "dev"
    }

    /// The dev wallet's payouts are recorded when it is asked to pay.
    fn unknown_means_unsent(&self) -> bool {
        true
    }

    async fn create_invoice(&self, request: InvoiceRequest) -> Result<Invoice, WalletError> {
        if request.amount_msat == 0 {
            return Err(WalletError::Refused("amount must be positive".to_owned()));
        }
        self.issue(
            Some(request.amount_msat),
            request.description,
            request.expiry_secs,
        )
        .await
    }

    async fn lookup(&self, payment_hash: &PaymentHash) -> Result<PaymentStatus, WalletError> {
        Ok(match self.record(payment_hash).await? {
            None => PaymentStatus::Unknown,
            Some(DevInvoice {
                paid_at: Some(_),
                amount_msat,
                ..
            }) => PaymentStatus::Paid { amount_msat },
            Some(record) if record.expires_at <= unix_now() => PaymentStatus::Expired,
            Some(_) => PaymentStatus::Pending,
        })
    }

    async fn pay(&self, bolt11: &str, _max_fee_msat: u64) -> Result<PaymentSent, WalletError> {
        self.pay_own(bolt11, None).await
    }

    fn pays_amountless(&self) -> bool {
        true
    }

    async fn pay_amountless(
        &self,
        bolt11: &str,
        amount_msat: u64,
        _max_fee_msat: u64,
    ) -> Result<PaymentSent, WalletError> {
        self.pay_own(bolt11, Some(amount_msat)).await
    }

    async fn lookup_payment(&self, hash: &PaymentHash) -> Result<OutgoingStatus, WalletError> {
        // Simulated payments settle at once and route for free.
        Ok(match self.record(hash).await? {
            Some(record) if record.sent => OutgoingStatus::Succeeded { fee_msat: 0 },
            _ => OutgoingStatus::Unknown,
        })
    }

    async fn balance(&self) -> Result<u64, WalletError> {
        self.store
            .read(|r| {
                let mut received = 0u64;
                for item in r.scan::<DevInvoice>(Tree::DevWallet) {
                    let (_, record) = item?;
                    if record.paid_at.is_some() {
                        received = received.saturating_add(record.amount_msat);
                    }
                }
                let spent = r
                    .get_raw(Tree::Meta, SPENT)?
                    .and_then(|raw| store::be_u64(&raw))
                    .unwrap_or(0);
                Ok(received.saturating_sub(spent))
            })
            .await
    }

    fn settlements(&self) -> broadcast::Receiver<PaymentHash> {
        self.hints.subscribe()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn wallet() -> DevWallet {
        DevWallet::open(Store::temporary().expect("store"))
            .await
            .expect("wallet")
    }

    fn request(msat: u64) -> InvoiceRequest {
        InvoiceRequest {
            amount_msat: msat,
            description: InvoiceDescription::Memo("dvmd test".to_owned()),
            expiry_secs: 600,
        }
    }

    #[tokio::test]
    async fn issues_real_regtest_invoices() {
        let wallet = wallet().await;
        let invoice = wallet
            .create_invoice(request(21_000))
            .await
            .expect("invoice");
        assert!(
            invoice.bolt11.starts_with("lnbcrt210n1"),
            "{}",
            invoice.bolt11
        );
        let parsed = Bolt11Invoice::from_str(&invoice.bolt11).expect("valid BOLT11");
        assert_eq!(parsed.amount_milli_satoshis(), Some(21_000));
        assert_eq!(
            parsed.payment_hash().to_byte_array(),
            invoice.payment_hash.0
        );
        assert!(parsed.check_signature().is_ok());
        assert_eq!(
            wallet.lookup(&invoice.payment_hash).await.expect("lookup"),
            PaymentStatus::Pending
        );
    }

    #[tokio::test]
    async fn settles_once_and_hints() {
        let wallet = wallet().await;
        let mut hints = wallet.settlements();
        let invoice = wallet
            .create_invoice(request(5_000))
            .await
            .expect("invoice");
        let preimage = wallet.settle(&invoice.bolt11).await.expect("settle");
        assert_eq!(
            sha256::Hash::hash(&preimage).to_byte_array(),
            invoice.payment_hash.0
        );
        assert_eq!(hints.recv().await.expect("hint"), invoice.payment_hash);
        assert_eq!(
            wallet.lookup(&invoice.payment_hash).await.expect("lookup"),
            PaymentStatus::Paid { amount_msat: 5_000 }
        );
        assert!(matches!(
            wallet.settle(&invoice.bolt11).await,
            Err(WalletError::Refused(_))
        ));
        assert_eq!(wallet.balance().await.expect("balance"), 5_000);
    }

    #[tokio::test]
    async fn refuses_foreign_and_expired_invoices() {
        let wallet = wallet().await;
        let other = self::wallet().await;
        let foreign = other.create_invoice(request(1_000)).await.expect("invoice");
        assert!(matches!(
            wallet.settle(&foreign.bolt11).await,
            Err(WalletError::Refused(_))
        ));
        assert!(matches!(
            wallet.pay(&foreign.bolt11, 0).await,
            Err(WalletError::Refused(_))
        ));
        assert!(matches!(
            wallet.settle("lnbc1garbage").await,
            Err(WalletError::InvalidInvoice(_))
        ));

        // An invoice that carries the payment hash of one of ours, signed by another node, pays
        // nothing: ours is still open, and pays however it is cased.
        let ours = wallet
            .create_invoice(request(2_000))
            .await
            .expect("invoice");
        let forged = InvoiceBuilder::new(Currency::Regtest)
            .description("forged".to_owned())
            .payment_hash(sha256::Hash::from_byte_array(ours.payment_hash.0))
            .payment_secret(PaymentSecret([1; 32]))
            .current_timestamp()
            .min_final_cltv_expiry_delta(MIN_FINAL_CLTV_EXPIRY_DELTA)
            .amount_milli_satoshis(1)
            .build_signed(|msg| {
                let key = SecretKey::from_slice(&[3; 32]).expect("key");
                Secp256k1::new().sign_ecdsa_recoverable(msg, &key)
            })
            .expect("forged invoice");
        assert!(matches!(
            wallet.settle(&forged.to_string()).await,
            Err(WalletError::Refused(_))
        ));
        assert_eq!(
            wallet.lookup(&ours.payment_hash).await.expect("lookup"),
            PaymentStatus::Pending
        );
        wallet
            .settle(&ours.bolt11.to_uppercase())
            .await
            .expect("our invoice, upper-cased, pays");

        let mut expired = request(1_000);
        expired.expiry_secs = 0;
        let invoice = wallet.create_invoice(expired).await.expect("invoice");
        assert_eq!(
            wallet.lookup(&invoice.payment_hash).await.expect("lookup"),
            PaymentStatus::Expired
        );
        assert!(matches!(
            wallet.settle(&invoice.bolt11).await,
            Err(WalletError::Refused(_))
        ));
        let unknown = PaymentHash([7; 32]);
        assert_eq!(
            wallet.lookup(&unknown).await.expect("lookup"),
            PaymentStatus::Unknown
        );
    }

    #[tokio::test]
    async fn description_hash_invoices() {
        let wallet = wallet().await;
        let hash = sha256::Hash::hash(b"zap request").to_byte_array();
        let invoice = wallet
            .create_invoice(InvoiceRequest {
                amount_msat: 1_000,
                description: InvoiceDescription::Hashed("zap request".to_owned()),
                expiry_secs: 60,
            })
            .await
            .expect("invoice");
        let parsed = Bolt11Invoice::from_str(&invoice.bolt11).expect("valid");
        match parsed.description() {
            lightning_invoice::Bolt11InvoiceDescriptionRef::Hash(h) => {
                assert_eq!(h.0.to_byte_array(), hash)
            }
            other => panic!("expected a description hash, got {other:?}"),
        }
    }
}
