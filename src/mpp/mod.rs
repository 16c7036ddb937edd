//! The HTTP `Payment` authentication scheme (IETF draft-httpauth-payment, "MPP") with its
//! Lightning method, `charge` and `session` intents (tempoxyz/mpp-specs
//! `specs/methods/lightning/`). Pure: no IO.
//!
//! - Challenge: `WWW-Authenticate: Payment id="…", realm="…", method="lightning",
//!   intent="charge", request="…", expires="…"`, where `request` is base64url (no padding) of
//!   the JCS (RFC 8785) JSON `{"amount":"<sats>","currency":"sat","description":…,
//!   "methodDetails":{"invoice":…,"network":…,"paymentHash":…}}`.
//! - Credential: `Authorization: Payment <base64url JSON>`: `{"challenge": <the challenge's
//!   auth-params echoed>, "payload": {"preimage": "<64 lowercase hex>"}}`.
//! - Receipt: `Payment-Receipt: <base64url JCS JSON>` `{"challengeId", "method", "reference"
//!   (the payment hash, never the preimage), "status": "success", "timestamp"}`.
//!
//! - Session (`draft-lightning-session-00`): the challenge's request is `{"amount": "1",
//!   "currency": "sat", "depositAmount", "depositInvoice", "description", "idleTimeout",
//!   "paymentHash", "unitType"}`; a credential's payload names an `action`: `open` (`preimage`,
//!   `returnInvoice`), `bearer` and `close` (`sessionId`, `preimage`), `topUp` (`sessionId`,
//!   `topUpPreimage`). The receipt's `reference` is the session id (the deposit's payment
//!   hash); a close's also carries `refundSats` and `refundStatus`.
//!
//! The `id` binds the challenge (the draft's recommended HMAC-SHA256 over `realm|method|intent|
//! request|expires|digest|opaque`); dvmd also stores each challenge by `id`, so it can be
//! consumed once ([`crate::job::tokens`]).
//!
//! The module by concept: challenges and their binding here; what a client sends
//! ([`credential`]: parsing and refusals); what we answer ([`receipt`]); and the JCS and RFC 3339
//! encodings both use ([`encoding`]).

mod credential;
mod encoding;
mod receipt;
#[cfg(test)]
mod tests;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bitcoin::hashes::{sha256, Hash, HashEngine, Hmac, HmacEngine};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use credential::{parse_authorization, Action, Credential, Refusal};
pub use encoding::{jcs, rfc3339};
pub use receipt::{receipt, session_receipt, spent_sats};

use crate::wallet::PaymentHash;

/// The method this service offers.
pub const METHOD: &str = "lightning";
/// One call paid by one invoice.
pub const INTENT_CHARGE: &str = "charge";
/// A prepaid deposit spent call by call, topped up, and refunded on close.
pub const INTENT_SESSION: &str = "session";

/// A `charge` challenge, as sent and as stored (a credential must echo it exactly).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// The binding: base64url HMAC-SHA256 of the other parameters.
    pub id: String,
    /// The protection space (the host of `[http] public_url`, or `dvmd`).
    pub realm: String,
    /// `lightning`.
    pub method: String,
    /// `charge`.
    pub intent: String,
    /// base64url of the JCS request JSON.
    pub request: String,
    /// RFC 3339, UTC: when the invoice expires.
    pub expires: String,
}

/// What a `charge` asks for.
#[derive(Debug, Clone)]
pub struct Charge<'a> {
    /// The invoice amount, whole sats (the invoice is issued in whole sats).
    pub amount_sats: u64,
    /// The invoice's memo.
    pub description: &'a str,
    /// The BOLT11 invoice (authoritative).
    pub invoice: &'a str,
    /// Its payment hash.
    pub payment_hash: &'a PaymentHash,
    /// The network its prefix names ([`network_of`]).
    pub network: &'static str,
}

/// What a `session` challenge offers.
#[derive(Debug, Clone)]
pub struct SessionOffer<'a> {
    /// The deposit invoice amount, whole sats.
    pub deposit_sats: u64,
    /// The deposit invoice.
    pub invoice: &'a str,
    /// Its payment hash (the session id, once opened).
    pub payment_hash: &'a PaymentHash,
    /// What is sold.
    pub description: &'a str,
    /// The server's idle timeout, seconds.
    pub idle_timeout_secs: u64,
    /// What one unit (1 sat) buys.
    pub unit_type: &'a str,
}

impl Challenge {
    /// Mint the `session` challenge for `offer`, bound by `key`, expiring at `expires_at` (unix
    /// seconds). The unit is one sat (`amount` `"1"`): dvmd meters tokens in msat at its rate
    /// card, and counts whole sats only where the draft does (see [`spent_sats`]).
    pub fn session(key: &[u8], realm: &str, offer: &SessionOffer<'_>, expires_at: u64) -> Self {
        let request = json!({
            "amount": "1",
            "currency": "sat",
            "depositAmount": offer.deposit_sats.to_string(),
            "depositInvoice": offer.invoice,
            "description": offer.description,
            "idleTimeout": offer.idle_timeout_secs.to_string(),
            "paymentHash": offer.payment_hash.to_string(),
            "unitType": offer.unit_type,
        });
        Self::bound(key, realm, INTENT_SESSION, &request, expires_at)
    }

    fn bound(key: &[u8], realm: &str, intent: &str, request: &Value, expires_at: u64) -> Self {
        let request = URL_SAFE_NO_PAD.encode(jcs(request));
        let expires = rfc3339(expires_at);
        let id = bind(key, realm, METHOD, intent, &request, &expires);
        Self {
            id,
            realm: realm.to_owned(),
            method: METHOD.to_owned(),
            intent: intent.to_owned(),
            request,
            expires,
        }
    }

    /// Whether `key` bound this challenge (its id is the HMAC of the rest): true only for a
    /// challenge this service issued, unaltered.
    pub fn is_bound_by(&self, key: &[u8]) -> bool {
        let id = bind(
            key,
            &self.realm,
            &self.method,
            &self.intent,
            &self.request,
            &self.expires,
        );
        // Both are public values (the id is sent in the clear); no secret leaks by timing.
        id == self.id
    }

    /// Mint the challenge for `charge`, bound by `key`, expiring at `expires_at` (unix seconds).
    pub fn charge(key: &[u8], realm: &str, charge: &Charge<'_>, expires_at: u64) -> Self {
        let request = json!({
            "amount": charge.amount_sats.to_string(),
            "currency": "sat",
            "description": charge.description,
            "methodDetails": {
                "invoice": charge.invoice,
                "network": charge.network,
                "paymentHash": charge.payment_hash.to_string(),
            },
        });
        Self::bound(key, realm, INTENT_CHARGE, &request, expires_at)
    }

    /// The `WWW-Authenticate` value.
    pub fn header(&self) -> String {
        format!(
            "Payment id={}, realm={}, method={}, intent={}, request={}, expires={}",
            quoted(&self.id),
            quoted(&self.realm),
            quoted(&self.method),
            quoted(&self.intent),
            quoted(&self.request),
            quoted(&self.expires),
        )
    }
}

/// The draft's recommended binding: base64url(HMAC-SHA256(key, realm|method|intent|request|
/// expires|digest|opaque)), absent parameters empty (dvmd sends no `digest` or `opaque`).
pub fn bind(
    key: &[u8],
    realm: &str,
    method: &str,
    intent: &str,
    request: &str,
    expires: &str,
) -> String {
    let input = [realm, method, intent, request, expires, "", ""].join("|");
    let mut engine = HmacEngine::<sha256::Hash>::new(key);
    engine.input(input.as_bytes());
    URL_SAFE_NO_PAD.encode(Hmac::<sha256::Hash>::from_engine(engine).to_byte_array())
}

/// The network a BOLT11 invoice's prefix names, as the Lightning method spells it; `None` for a
/// network it cannot name (testnet, simnet): no `Payment` challenge is offered for those.
pub fn network_of(bolt11: &str) -> Option<&'static str> {
    let lower = bolt11.to_ascii_lowercase();
    let prefixes = [
        ("lnbcrt", Some("regtest")),
        ("lntbs", Some("signet")),
        ("lntb", None),
        ("lnsb", None),
        ("lnbc", Some("mainnet")),
    ];
    prefixes
        .iter()
        .find(|(prefix, _)| lower.starts_with(prefix))
        .and_then(|(_, network)| *network)
}

/// An RFC 9110 quoted-string.
fn quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}
