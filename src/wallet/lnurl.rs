//! LNURL-pay client (LUD-06, LUD-16): turn a Lightning address into an invoice, checked before
//! anything is paid. Used for the operator's payouts (`dvmd wallet pay name@host`) and for
//! customers' withdrawals to an address they name.
//!
//! A customer's address names a host the daemon then fetches from: [`Reach::Customer`] fetches
//! only over HTTPS, never from a private, loopback, link-local or otherwise non-public address
//! (checked on the resolved addresses, and the connection pinned to the address checked, so a
//! second DNS answer cannot move it), follows no redirect, and caps the time and the bytes read.
//! Loopback over plain HTTP is allowed only by an explicit setting, for tests.

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

/// Whom an LNURL fetch trusts.
#[derive(Debug, Clone)]
pub enum Reach {
    /// The operator's own command: any host, loopback and `.onion` over plain HTTP.
    Operator(reqwest::Client),
    /// A host a customer named: public addresses over HTTPS only (loopback over HTTP too when
    /// `allow_loopback_http`, for tests).
    Customer {
        /// Let loopback hosts through, over plain HTTP.
        allow_loopback_http: bool,
    },
}

/// Longest a customer-named LNURL host may take for one request.
const CUSTOMER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Most bytes read from a customer-named LNURL host per answer.
const CUSTOMER_MAX_BYTES: usize = 64 * 1024;

impl Reach {
    /// GET `url` and parse its JSON.
    async fn get_json(&self, url: &str) -> Result<serde_json::Value, WalletError> {
        match self {
            Self::Operator(http) => http
                .get(url)
                .send()
                .await
                .map_err(|e| WalletError::Unavailable(format!("lnurl {url}: {}", e.without_url())))?
                .json()
                .await
                .map_err(refused),
            Self::Customer {
                allow_loopback_http,
            } => guarded_get_json(url, *allow_loopback_http).await,
        }
    }

    fn plain_http_for(&self, host: &str) -> bool {
        match self {
            Self::Operator(_) => operator_plain_http(host),
            Self::Customer {
                allow_loopback_http,
            } => *allow_loopback_http && is_loopback_host(host),
        }
    }
}

fn is_loopback_host(host: &str) -> bool {
    host.starts_with("127.0.0.1") || host.starts_with("localhost")
}

/// The operator's rule: loopback (tests) and `.onion` (Tor) over plain HTTP.
fn operator_plain_http(host: &str) -> bool {
    is_loopback_host(host) || host.ends_with(".onion")
}

/// Whether `ip` is a public unicast address (not private, loopback, link-local, shared,
/// documentation, benchmarking, multicast, reserved or unspecified).
pub fn is_public(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (18..20).contains(&b))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first == 0x2001 && v6.segments()[1] == 0x0db8))
        }
    }
}

/// GET `url` from a host a customer named, under the rules of [`Reach::Customer`].
async fn guarded_get_json(
    url: &str,
    allow_loopback_http: bool,
) -> Result<serde_json::Value, WalletError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| refused(format!("bad URL {url}: {e}")))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| refused(format!("no host in {url}")))?
        .to_owned();
    let port = parsed
        .port_or_known_default()
        .ok_or_else(|| refused(format!("no port for {url}")))?;
    let lookup = tokio::net::lookup_host((host.trim_matches(['[', ']']), port));
    let addrs: Vec<std::net::SocketAddr> = tokio::time::timeout(CUSTOMER_TIMEOUT, lookup)
        .await
        .map_err(|_| WalletError::Unavailable(format!("lnurl: resolving {host} timed out")))?
        .map_err(|e| WalletError::Unavailable(format!("lnurl: cannot resolve {host}: {e}")))?
        .collect();
    let allowed = |ip: std::net::IpAddr| is_public(ip) || (allow_loopback_http && ip.is_loopback());
    let Some(addr) = addrs.first().copied() else {
        return Err(refused(format!("{host} has no address")));
    };
    if let Some(bad) = addrs.iter().find(|a| !allowed(a.ip())) {
        return Err(refused(format!(
            "{host} resolves to {}, which is not a public address",
            bad.ip()
        )));
    }
    let all_loopback = addrs.iter().all(|a| a.ip().is_loopback());
    if parsed.scheme() != "https" && !(parsed.scheme() == "http" && all_loopback) {
        return Err(refused(format!("{url} is not https")));
    }
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(CUSTOMER_TIMEOUT)
        .resolve(&host, addr)
        .build()
        .map_err(|e| WalletError::Unavailable(e.to_string()))?;
    let mut response = http
        .get(parsed)
        .send()
        .await
        .map_err(|e| WalletError::Unavailable(format!("lnurl {host}: {}", e.without_url())))?;
    if !response.status().is_success() {
        return Err(refused(format!("{host} answered {}", response.status())));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| WalletError::Unavailable(format!("lnurl {host}: {}", e.without_url())))?
    {
        if body.len() + chunk.len() > CUSTOMER_MAX_BYTES {
            return Err(refused(format!(
                "{host} answered more than {CUSTOMER_MAX_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(refused)
}

/// The URL a Lightning address resolves to (LUD-16). Loopback and `.onion` hosts use plain
/// HTTP (tests, Tor), every other host HTTPS.
pub fn address_url(address: &str) -> Result<String, WalletError> {
    address_url_with(address, operator_plain_http)
}

/// The URL `address` resolves to for `reach`.
fn address_url_for(address: &str, reach: &Reach) -> Result<String, WalletError> {
    address_url_with(address, |host| reach.plain_http_for(host))
}

fn address_url_with(
    address: &str,
    plain_http: impl Fn(&str) -> bool,
) -> Result<String, WalletError> {
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
    let scheme = if plain_http(host) { "http" } else { "https" };
    Ok(format!("{scheme}://{host}/.well-known/lnurlp/{name}"))
}

fn refused(e: impl std::fmt::Display) -> WalletError {
    WalletError::Refused(format!("lnurl: {e}"))
}

/// Resolve `address` and fetch an invoice for `amount_msat` as `reach` allows, checking that it
/// asks for exactly that amount and commits to the service's metadata.
pub async fn invoice_for_address(
    reach: &Reach,
    address: &str,
    amount_msat: u64,
) -> Result<String, WalletError> {
    let url = address_url_for(address, reach)?;
    let pay: PayRequest = serde_json::from_value(reach.get_json(&url).await?).map_err(refused)?;
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
    let answer = reach.get_json(&callback).await?;
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
        invoice_for_address(&Reach::Operator(http), target, amount).await?
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
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "2001:db8::1",
        ] {
            assert!(!is_public(private.parse().expect("ip")), "{private}");
        }
        for public in ["1.1.1.1", "93.184.216.34", "2606:4700::1111"] {
            assert!(is_public(public.parse().expect("ip")), "{public}");
        }
    }

    #[tokio::test]
    async fn a_customer_named_private_host_is_never_fetched() {
        let strict = Reach::Customer {
            allow_loopback_http: false,
        };
        for address in ["alice@127.0.0.1:9", "alice@10.0.0.1", "alice@localhost:9"] {
            let refused = invoice_for_address(&strict, address, 1_000).await;
            assert!(
                matches!(&refused, Err(WalletError::Refused(why)) if why.contains("not a public address") || why.contains("not https")),
                "{address}: {refused:?}"
            );
        }
        // Loopback only with the test setting, and private addresses never.
        let tests = Reach::Customer {
            allow_loopback_http: true,
        };
        let refused = invoice_for_address(&tests, "alice@192.168.0.1", 1_000).await;
        assert!(
            matches!(&refused, Err(WalletError::Refused(why)) if why.contains("not a public address")),
            "{refused:?}"
        );
    }

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
