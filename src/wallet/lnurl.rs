//! LNURL-pay client (LUD-06, LUD-16): turn a Lightning address into an invoice, checked before
//! anything is paid. Used for payouts (`dvmd wallet pay name@host`).

use bitcoin::hashes::{sha256, Hash};
use serde::Deserialize;

use super::{bolt11, Wallet, WalletError};

/// A `payRequest` as served at `/.well-known/lnurlp/<name>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PayRequest {
    /// Where to ask for the invoice.
    pub callback: String,
    /// Smallest amount, msat.
    pub min_sendable: u64,
    /// Largest amount, msat.
    pub max_sendable: u64,
    /// The metadata string the invoice's description hash commits to.
    pub metadata: String,
    /// Must be `payRequest`.
    pub tag: String,
}

/// The URL a Lightning address resolves to (LUD-16). Loopback and `.onion` hosts use plain
/// HTTP (tests, Tor), every other host HTTPS.
pub fn address_url(address: &str) -> Result<String, WalletError> {
    let (name, host) = address
        .trim()
        .split_once('@')
        .ok_or_else(|| WalletError::Refused(format!("`{address}` is not a name@host address")))?;
    let valid_name = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.+".contains(c));
    if !valid_name || host.is_empty() || host.contains('/') {
        return Err(WalletError::Refused(format!(
            "`{address}` is not a valid Lightning address"
        )));
    }
    let plain =
        host.starts_with("127.0.0.1") || host.starts_with("localhost") || host.ends_with(".onion");
    let scheme = if plain { "http" } else { "https" };
    Ok(format!("{scheme}://{host}/.well-known/lnurlp/{name}"))
}

fn refused(e: impl std::fmt::Display) -> WalletError {
    WalletError::Refused(format!("lnurl: {e}"))
}

/// Resolve `address` and fetch an invoice for `amount_msat`, checking that it asks for exactly
/// that amount and commits to the service's metadata.
pub async fn invoice_for_address(
    http: &reqwest::Client,
    address: &str,
    amount_msat: u64,
) -> Result<String, WalletError> {
    let url = address_url(address)?;
    let pay: PayRequest = http
        .get(&url)
        .send()
        .await
        .map_err(|e| WalletError::Unavailable(format!("lnurl {url}: {}", e.without_url())))?
        .json()
        .await
        .map_err(refused)?;
    if pay.tag != "payRequest" {
        return Err(refused(format!("{url} is not a payRequest")));
    }
    if amount_msat < pay.min_sendable || amount_msat > pay.max_sendable {
        return Err(refused(format!(
            "{address} takes {}..={} msat, not {amount_msat}",
            pay.min_sendable, pay.max_sendable
        )));
    }
    let separator = if pay.callback.contains('?') { '&' } else { '?' };
    let callback = format!("{}{separator}amount={amount_msat}", pay.callback);
    let answer: serde_json::Value = http
        .get(&callback)
        .send()
        .await
        .map_err(|e| WalletError::Unavailable(format!("lnurl callback: {}", e.without_url())))?
        .json()
        .await
        .map_err(refused)?;
    if answer["status"] == "ERROR" {
        return Err(refused(
            answer["reason"].as_str().unwrap_or("the service refused"),
        ));
    }
    let pr = answer["pr"]
        .as_str()
        .ok_or_else(|| refused("the callback returned no invoice"))?
        .to_owned();
    let info = bolt11::decode(&pr)?;
    if info.amount_msat != Some(amount_msat) {
        return Err(refused(format!(
            "the invoice asks {:?} msat, not {amount_msat}",
            info.amount_msat
        )));
    }
    if info.description_hash != Some(sha256::Hash::hash(pay.metadata.as_bytes()).to_byte_array()) {
        return Err(refused(
            "the invoice does not commit to the address's metadata",
        ));
    }
    Ok(pr)
}

/// Pay `target` (a BOLT11 invoice, or a Lightning address with `amount_msat`) from `wallet`,
/// spending at most `max_fee_msat` on fees.
pub async fn pay(
    wallet: &dyn Wallet,
    target: &str,
    amount_msat: Option<u64>,
    max_fee_msat: u64,
) -> Result<super::PaymentSent, WalletError> {
    let bolt11 = if target.contains('@') {
        let amount = amount_msat
            .ok_or_else(|| WalletError::Refused("paying an address needs an amount".to_owned()))?;
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| WalletError::Unavailable(e.to_string()))?;
        invoice_for_address(&http, target, amount).await?
    } else {
        let info = bolt11::decode(target)?;
        if let (Some(asked), Some(wanted)) = (info.amount_msat, amount_msat) {
            if asked != wanted {
                return Err(WalletError::Refused(format!(
                    "the invoice asks {asked} msat, not {wanted}"
                )));
            }
        }
        target.trim().to_owned()
    };
    wallet.pay(&bolt11, max_fee_msat).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lightning_addresses_resolve() {
        assert_eq!(
            address_url("alice@example.com").expect("valid"),
            "https://example.com/.well-known/lnurlp/alice"
        );
        assert_eq!(
            address_url("dvmd@127.0.0.1:8080").expect("valid"),
            "http://127.0.0.1:8080/.well-known/lnurlp/dvmd"
        );
        for bad in [
            "alice",
            "@example.com",
            "Alice@example.com",
            "a@",
            "a@b/c",
            "a b@c",
        ] {
            assert!(address_url(bad).is_err(), "{bad}");
        }
    }
}
