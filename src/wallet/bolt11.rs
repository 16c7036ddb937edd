//! Reading the fields dvmd needs from a BOLT11 invoice. Pure.
//!
//! `lightning_invoice::Bolt11Invoice` refuses invoices without a feature field, which is what
//! LNbits' FakeWallet issues, so the fields are read from the signed raw invoice instead; the
//! signature is still checked (it must recover to a key).

use std::str::FromStr;

use bitcoin::hashes::Hash;
use lightning_invoice::SignedRawBolt11Invoice;

use super::{PaymentHash, WalletError};

/// Default BOLT11 expiry when the invoice has no `x` field.
const DEFAULT_EXPIRY_SECS: u64 = 3600;

/// What an invoice says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bolt11Info {
    /// The payment hash.
    pub payment_hash: PaymentHash,
    /// The amount, msat (`None` for amountless invoices).
    pub amount_msat: Option<u64>,
    /// The description hash (`h` field), if any.
    pub description_hash: Option<[u8; 32]>,
    /// The memo (`d` field), if any.
    pub description: Option<String>,
    /// Unix seconds when it was created.
    pub created_at: u64,
    /// Unix seconds when it expires.
    pub expires_at: u64,
    /// The fees its route hints (`r` fields) ask, hop by hop: `(base_msat, ppm)` per hop of
    /// each private route. The payee sets them, for channels it may own at both ends.
    pub route_hint_fees: Vec<Vec<(u32, u32)>>,
}

impl Bolt11Info {
    /// The most routing fee one of its route hints asks for carrying `amount_msat` (the
    /// hops' fees summed, each on the amount), or 0 without hints. A payer that takes the
    /// hint pays at least this, to whoever runs those channels.
    pub fn route_hint_fee_msat(&self, amount_msat: u64) -> u64 {
        self.route_hint_fees
            .iter()
            .map(|hops| {
                hops.iter()
                    .map(|&(base, ppm)| {
                        let proportional = u128::from(amount_msat) * u128::from(ppm) / 1_000_000;
                        u128::from(base) + proportional
                    })
                    .sum::<u128>()
            })
            .max()
            .map_or(0, |fee| u64::try_from(fee).unwrap_or(u64::MAX))
    }

    /// Whether every route hint asks at most `base_msat + ppm` in all, so that
    /// [`Bolt11Info::route_hint_fee_msat`] stays within that fee for any amount.
    pub fn route_hints_within(&self, base_msat: u64, ppm: u64) -> bool {
        self.route_hint_fees.iter().all(|hops| {
            let base: u64 = hops.iter().map(|&(base, _)| u64::from(base)).sum();
            let rate: u64 = hops.iter().map(|&(_, ppm)| u64::from(ppm)).sum();
            base <= base_msat && rate <= ppm
        })
    }
}

/// Decode `bolt11` and check its signature.
pub fn decode(bolt11: &str) -> Result<Bolt11Info, WalletError> {
    let invalid = |why: String| WalletError::InvalidInvoice(why);
    let signed = SignedRawBolt11Invoice::from_str(bolt11.trim())
        .map_err(|e| invalid(format!("not a BOLT11 invoice: {e}")))?;
    if signed.recover_payee_pub_key().is_err() {
        return Err(invalid("the invoice signature does not verify".to_owned()));
    }
    let raw = signed.raw_invoice();
    let payment_hash = raw
        .payment_hash()
        .map(|h| PaymentHash(h.0.to_byte_array()))
        .ok_or_else(|| invalid("the invoice has no payment hash".to_owned()))?;
    let created_at = raw.data.timestamp.as_unix_timestamp();
    let expiry = raw
        .expiry_time()
        .map(|e| e.as_seconds())
        .unwrap_or(DEFAULT_EXPIRY_SECS);
    Ok(Bolt11Info {
        payment_hash,
        // pico-BTC to msat: 1 msat = 10 pBTC.
        amount_msat: raw.amount_pico_btc().map(|p| p / 10),
        description_hash: raw.description_hash().map(|h| h.0.to_byte_array()),
        description: raw.description().map(|d| d.to_string()),
        created_at,
        expires_at: created_at.saturating_add(expiry),
        route_hint_fees: raw
            .private_routes()
            .iter()
            .map(|route| {
                route
                    .0
                    .iter()
                    .map(|hop| (hop.fees.base_msat, hop.fees.proportional_millionths))
                    .collect()
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::wallet::dev::DevWallet;
    use crate::wallet::{InvoiceDescription, InvoiceRequest, Wallet};

    #[tokio::test]
    async fn reads_our_own_invoices() {
        let wallet = DevWallet::open(Store::temporary().expect("store"))
            .await
            .expect("wallet");
        let invoice = wallet
            .create_invoice(InvoiceRequest {
                amount_msat: 21_500,
                description: InvoiceDescription::Hashed("metadata".to_owned()),
                expiry_secs: 120,
            })
            .await
            .expect("invoice");
        let info = decode(&invoice.bolt11).expect("decodes");
        assert_eq!(info.payment_hash, invoice.payment_hash);
        assert_eq!(info.amount_msat, Some(21_500));
        assert_eq!(
            info.description_hash,
            Some(bitcoin::hashes::sha256::Hash::hash(b"metadata").to_byte_array())
        );
        assert_eq!(info.expires_at, info.created_at + 120);
    }

    #[tokio::test]
    async fn rejects_garbage_and_tampering() {
        assert!(decode("lnbc1notaninvoice").is_err());
        assert!(decode("").is_err());
        let wallet = DevWallet::open(Store::temporary().expect("store"))
            .await
            .expect("wallet");
        let invoice = wallet
            .create_invoice(InvoiceRequest {
                amount_msat: 1_000,
                description: InvoiceDescription::Memo("x".to_owned()),
                expiry_secs: 60,
            })
            .await
            .expect("invoice");
        // Any changed character breaks the bech32 checksum.
        let mut chars: Vec<char> = invoice.bolt11.chars().collect();
        let i = chars.len() / 2;
        chars[i] = if chars[i] == 'q' { 'p' } else { 'q' };
        let tampered: String = chars.into_iter().collect();
        assert!(decode(&tampered).is_err());
    }
}
