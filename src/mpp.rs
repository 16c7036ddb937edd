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

use std::fmt::Write as _;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bitcoin::hashes::{sha256, Hash, HashEngine, Hmac, HmacEngine};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::wallet::PaymentHash;

/// The method this service offers.
pub const METHOD: &str = "lightning";
/// One call paid by one invoice.
pub const INTENT_CHARGE: &str = "charge";
/// A prepaid deposit spent call by call, topped up, and refunded on close.
pub const INTENT_SESSION: &str = "session";
/// The base of the draft's problem types (RFC 9457 `type`).
const PROBLEMS: &str = "https://paymentauth.org/problems/";
/// The longest credential read, in characters (the draft asks servers to take at least 4 KB).
const MAX_CREDENTIAL_CHARS: usize = 16 * 1024;

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

/// A credential as presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// The challenge echoed.
    pub challenge: Challenge,
    /// The preimage presented (a `topUp`'s is the top-up invoice's).
    pub preimage: [u8; 32],
    /// What it asks for.
    pub action: Action,
}

/// What a credential asks for: a `charge`, or one of a `session`'s actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Pay this call with the challenge's invoice.
    Charge,
    /// Open a session on the paid deposit, refunding to `return_invoice` on close.
    Open {
        /// A BOLT11 invoice that names no amount.
        return_invoice: String,
    },
    /// Spend from an open session.
    Bearer {
        /// The session id (the deposit's payment hash).
        session: PaymentHash,
    },
    /// Add the paid top-up invoice of the echoed challenge to a session.
    TopUp {
        /// The session id.
        session: PaymentHash,
    },
    /// Close a session and refund what it has left.
    Close {
        /// The session id.
        session: PaymentHash,
    },
}

impl Credential {
    /// The payment hash the preimage pays.
    pub fn payment_hash(&self) -> PaymentHash {
        PaymentHash(sha256::Hash::hash(&self.preimage).to_byte_array())
    }
}

/// Why a credential is refused, with the draft's problem type for each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not base64url JSON of the credential's shape.
    #[error("malformed Payment credential: {0}")]
    Malformed(String),
    /// Another method or intent than `lightning` / `charge` or `session`.
    #[error("this service takes method `lightning` with intent `charge` or `session`, not `{0}`")]
    Unsupported(String),
    /// Sessions are not offered (the wallet cannot refund to an invoice that names no amount).
    #[error("{0}")]
    SessionsOff(String),
    /// No session has this id.
    #[error("no session has this id")]
    SessionNotFound,
    /// The session is closed.
    #[error("this session is closed")]
    SessionClosed,
    /// The session's balance does not cover the call.
    #[error("{0}")]
    InsufficientBalance(String),
    /// The `returnInvoice` is not a BOLT11 invoice without amount on the deposit's network.
    #[error("returnInvoice: {0}")]
    InvalidReturnInvoice(String),
    /// No challenge was issued with this id, it was already used, or the echo differs.
    #[error("this challenge was not issued here, or was already used")]
    UnknownChallenge,
    /// The challenge (and its invoice) expired.
    #[error("this challenge expired at {0}")]
    Expired(String),
    /// A `session` challenge expired (the session draft's own problem type).
    #[error("this challenge expired at {0}")]
    ChallengeExpired(String),
    /// sha256(preimage) is not the challenge's payment hash.
    #[error("SHA-256 of the preimage does not match the challenge's payment hash")]
    InvalidPreimage,
    /// The wallet has not seen the invoice paid.
    #[error("the challenge's invoice is not paid (our wallet has not seen it settle)")]
    Unpaid,
}

impl Refusal {
    /// The RFC 9457 `type` and `title`.
    pub fn problem(&self) -> (String, &'static str) {
        let (path, title) = match self {
            Self::Malformed(_) => ("lightning/malformed-credential", "Malformed Credential"),
            Self::Unsupported(_) | Self::SessionsOff(_) => {
                ("method-unsupported", "Method Unsupported")
            }
            Self::SessionNotFound => ("lightning/session-not-found", "Session Not Found"),
            Self::SessionClosed => ("lightning/session-closed", "Session Closed"),
            Self::InsufficientBalance(_) => {
                ("lightning/insufficient-balance", "Insufficient Balance")
            }
            Self::InvalidReturnInvoice(_) => {
                ("lightning/invalid-return-invoice", "Invalid Return Invoice")
            }
            Self::UnknownChallenge => ("lightning/unknown-challenge", "Unknown Challenge"),
            Self::Expired(_) => ("lightning/expired-invoice", "Expired Invoice"),
            Self::ChallengeExpired(_) => ("lightning/challenge-expired", "Challenge Expired"),
            Self::InvalidPreimage => ("lightning/invalid-preimage", "Invalid Preimage"),
            Self::Unpaid => ("verification-failed", "Verification Failed"),
        };
        (format!("{PROBLEMS}{path}"), title)
    }
}

#[derive(Deserialize)]
struct Wire {
    challenge: WireChallenge,
    payload: Payload,
}

#[derive(Deserialize)]
struct WireChallenge {
    id: String,
    realm: String,
    method: String,
    intent: String,
    request: String,
    #[serde(default)]
    expires: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Payload {
    preimage: Option<String>,
    action: Option<String>,
    return_invoice: Option<String>,
    session_id: Option<String>,
    top_up_preimage: Option<String>,
}

/// Read an `Authorization` value: `None` unless its scheme is `Payment`.
pub fn parse_authorization(value: &str) -> Option<Result<Credential, Refusal>> {
    let (scheme, token) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("payment") {
        return None;
    }
    Some(parse_token(token.trim()))
}

fn parse_token(token: &str) -> Result<Credential, Refusal> {
    let malformed = |why: &str| Refusal::Malformed(why.to_owned());
    if token.len() > MAX_CREDENTIAL_CHARS {
        return Err(malformed("longer than this service reads"));
    }
    let raw = URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| malformed("not base64url"))?;
    let wire: Wire = serde_json::from_slice(&raw)
        .map_err(|e| Refusal::Malformed(format!("not the credential's JSON: {e}")))?;
    let c = wire.challenge;
    let p = wire.payload;
    if c.method != METHOD || (c.intent != INTENT_CHARGE && c.intent != INTENT_SESSION) {
        return Err(Refusal::Unsupported(format!("{}/{}", c.method, c.intent)));
    }
    let session = |id: Option<String>| {
        let id = id.ok_or_else(|| malformed("payload.sessionId is missing"))?;
        let bytes = hex32(&id)
            .ok_or_else(|| malformed("payload.sessionId is not 64 lowercase hex digits"))?;
        Ok::<_, Refusal>(PaymentHash(bytes))
    };
    let (action, preimage, field) = if c.intent == INTENT_CHARGE {
        (Action::Charge, p.preimage, "preimage")
    } else {
        match p.action.as_deref() {
            Some("open") => {
                let return_invoice = p
                    .return_invoice
                    .ok_or_else(|| malformed("payload.returnInvoice is missing"))?;
                (Action::Open { return_invoice }, p.preimage, "preimage")
            }
            Some("bearer") => (
                Action::Bearer {
                    session: session(p.session_id)?,
                },
                p.preimage,
                "preimage",
            ),
            Some("topUp") => (
                Action::TopUp {
                    session: session(p.session_id)?,
                },
                p.top_up_preimage,
                "topUpPreimage",
            ),
            Some("close") => (
                Action::Close {
                    session: session(p.session_id)?,
                },
                p.preimage,
                "preimage",
            ),
            Some(other) => {
                return Err(Refusal::Malformed(format!(
                    "payload.action `{other}` is not open, bearer, topUp or close"
                )))
            }
            None => return Err(malformed("payload.action is missing")),
        }
    };
    let preimage =
        preimage.ok_or_else(|| Refusal::Malformed(format!("payload.{field} is missing")))?;
    let bytes = hex32(&preimage).ok_or_else(|| {
        Refusal::Malformed(format!("payload.{field} is not 64 lowercase hex digits"))
    })?;
    Ok(Credential {
        challenge: Challenge {
            id: c.id,
            realm: c.realm,
            method: c.method,
            intent: c.intent,
            request: c.request,
            expires: c.expires.unwrap_or_default(),
        },
        preimage: bytes,
        action,
    })
}

/// 32 bytes from 64 lowercase hex digits.
fn hex32(text: &str) -> Option<[u8; 32]> {
    let lower_hex = text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let mut bytes = [0u8; 32];
    (lower_hex && hex::decode_to_slice(text, &mut bytes).is_ok()).then_some(bytes)
}

/// The `Payment-Receipt` value for a charge paid by `payment_hash` under challenge `id`, at
/// `now` (unix seconds).
pub fn receipt(id: &str, payment_hash: &PaymentHash, now: u64) -> String {
    let receipt = json!({
        "challengeId": id,
        "method": METHOD,
        "reference": payment_hash.to_string(),
        "status": "success",
        "timestamp": rfc3339(now),
    });
    URL_SAFE_NO_PAD.encode(jcs(&receipt))
}

/// What a session's `Payment-Receipt` says: the session id as `reference`; a close also says
/// what it refunded (`refundSats`, `refundStatus`: `succeeded`, `failed` or `skipped`).
pub fn session_receipt(session: &PaymentHash, now: u64, refund: Option<(u64, &str)>) -> String {
    let mut receipt = json!({
        "method": METHOD,
        "reference": session.to_string(),
        "status": "success",
        "timestamp": rfc3339(now),
    });
    if let Some((sats, status)) = refund {
        receipt["refundSats"] = json!(sats);
        receipt["refundStatus"] = json!(status);
    }
    URL_SAFE_NO_PAD.encode(jcs(&receipt))
}

/// Whole sats as the draft counts a session's spending, from exact msat: rounded down, in the
/// customer's favour (the ledger keeps the msat; a refund pays them all).
pub fn spent_sats(msat: u64) -> u64 {
    msat / 1000
}

/// JSON in the JCS form (RFC 8785) for the values dvmd writes: object members sorted by their
/// names' UTF-16 code units, no whitespace, strings escaped as ECMAScript does (which is what
/// serde_json writes for strings), integers as written.
pub fn jcs(value: &Value) -> String {
    let mut out = String::new();
    write_jcs(value, &mut out);
    out
}

fn write_jcs(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut members: Vec<_> = map.iter().collect();
            members.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, (name, value)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(name.clone()).to_string());
                out.push(':');
                write_jcs(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_jcs(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
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

/// Unix seconds as RFC 3339 UTC (`2026-03-15T12:05:00Z`).
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::with_capacity(20);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// lightninglabs/aperture `mpp/testdata/vectors.json`: its HMAC binding vectors.
    #[test]
    fn binding_matches_aperture_vectors() {
        let key = b"mpp-test-vector-secret";
        assert_eq!(
            bind(
                key,
                "api.example.com",
                "lightning",
                "charge",
                "eyJhbW91bnQiOiIxMDAifQ",
                ""
            ),
            "_9D0WlPoPRltxAd6AdpQd6auVOOeQGJ_J8BkGeBE_bU"
        );
    }

    #[test]
    fn request_is_canonical_json() {
        // The draft's canonical example, member order and all.
        let value = json!({
            "methodDetails": {"paymentHash": "bc230847", "network": "mainnet", "invoice": "lnbc1u1pexample"},
            "description": "Weather report",
            "currency": "sat",
            "amount": "100",
        });
        assert_eq!(
            jcs(&value),
            r#"{"amount":"100","currency":"sat","description":"Weather report","methodDetails":{"invoice":"lnbc1u1pexample","network":"mainnet","paymentHash":"bc230847"}}"#
        );
        assert_eq!(
            URL_SAFE_NO_PAD.encode(jcs(&value)),
            "eyJhbW91bnQiOiIxMDAiLCJjdXJyZW5jeSI6InNhdCIsImRlc2NyaXB0aW9uIjoiV2VhdGhlciByZXBvcnQiLCJtZXRob2REZXRhaWxzIjp7Imludm9pY2UiOiJsbmJjMXUxcGV4YW1wbGUiLCJuZXR3b3JrIjoibWFpbm5ldCIsInBheW1lbnRIYXNoIjoiYmMyMzA4NDcifX0"
        );
        // UTF-16 order: U+FB01 sorts before U+1F600 (a surrogate pair), unlike by code point.
        let value = json!({"\u{1F600}": 1, "\u{FB01}": 2});
        assert_eq!(jcs(&value), "{\"\u{1F600}\":1,\"\u{FB01}\":2}");
    }

    #[test]
    fn a_challenge_round_trips_through_a_credential() {
        let hash = PaymentHash([7; 32]);
        let charge = Charge {
            amount_sats: 21,
            description: "dvmd L402 token",
            invoice: "lnbcrt210n1example",
            payment_hash: &hash,
            network: "regtest",
        };
        let challenge = Challenge::charge(b"key", "dvmd", &charge, 1_773_576_300);
        assert_eq!(challenge.expires, "2026-03-15T12:05:00Z");
        assert!(challenge.header().starts_with("Payment id=\""));
        let request: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(&challenge.request)
                .expect("base64url"),
        )
        .expect("json");
        assert_eq!(request["amount"], "21");
        assert_eq!(request["methodDetails"]["paymentHash"], hash.to_string());
        let preimage = [0xab_u8; 32];
        let wire = json!({
            "challenge": challenge,
            "payload": {"preimage": hex::encode(preimage)},
        });
        let header = format!("Payment {}", URL_SAFE_NO_PAD.encode(wire.to_string()));
        let credential = parse_authorization(&header)
            .expect("payment")
            .expect("parses");
        assert_eq!(credential.challenge, challenge);
        assert_eq!(credential.preimage, preimage);
        assert!(parse_authorization("L402 abc:def").is_none());
        // Upper-case hex, or a missing preimage, is malformed; another intent is unsupported.
        let upper = json!({"challenge": challenge, "payload": {"preimage": hex::encode(preimage).to_uppercase()}});
        let upper = format!("Payment {}", URL_SAFE_NO_PAD.encode(upper.to_string()));
        assert!(matches!(
            parse_authorization(&upper),
            Some(Err(Refusal::Malformed(_)))
        ));
        let mut other = challenge.clone();
        other.intent = "subscription".into();
        let other = json!({"challenge": other, "payload": {"preimage": hex::encode(preimage)}});
        let other = format!("Payment {}", URL_SAFE_NO_PAD.encode(other.to_string()));
        assert!(matches!(
            parse_authorization(&other),
            Some(Err(Refusal::Unsupported(_)))
        ));
    }

    fn session_header(challenge: &Challenge, payload: Value) -> String {
        let wire = json!({"challenge": challenge, "payload": payload});
        format!("Payment {}", URL_SAFE_NO_PAD.encode(wire.to_string()))
    }

    #[test]
    fn session_challenges_and_each_action_parse() {
        let hash = PaymentHash([9; 32]);
        let offer = SessionOffer {
            deposit_sats: 300,
            invoice: "lnbcrt3u1example",
            payment_hash: &hash,
            description: "dvmd session deposit",
            idle_timeout_secs: 300,
            unit_type: "sat of tokens",
        };
        let challenge = Challenge::session(b"key", "dvmd", &offer, 1_773_576_300);
        assert_eq!(challenge.intent, INTENT_SESSION);
        assert!(challenge.is_bound_by(b"key"));
        assert!(!challenge.is_bound_by(b"another key"));
        let mut altered = challenge.clone();
        altered.request.push('A');
        assert!(!altered.is_bound_by(b"key"), "the id binds the request");
        let raw = URL_SAFE_NO_PAD
            .decode(&challenge.request)
            .expect("base64url");
        assert_eq!(
            String::from_utf8(raw).expect("utf-8"),
            format!(
                r#"{{"amount":"1","currency":"sat","depositAmount":"300","depositInvoice":"lnbcrt3u1example","description":"dvmd session deposit","idleTimeout":"300","paymentHash":"{hash}","unitType":"sat of tokens"}}"#
            ),
            "JCS, members in order, every value a string"
        );
        let (preimage, session) = (hex::encode([1u8; 32]), hash.to_string());
        let parse = |payload: Value| {
            parse_authorization(&session_header(&challenge, payload)).expect("payment")
        };
        let open =
            parse(json!({"action": "open", "preimage": preimage, "returnInvoice": "lnbcrt1x"}))
                .expect("open");
        assert_eq!(
            open.action,
            Action::Open {
                return_invoice: "lnbcrt1x".into()
            }
        );
        assert_eq!(open.preimage, [1u8; 32]);
        let bearer = parse(json!({"action": "bearer", "sessionId": session, "preimage": preimage}))
            .expect("bearer");
        assert_eq!(bearer.action, Action::Bearer { session: hash });
        let top_up = parse(json!({"action": "topUp", "sessionId": session, "topUpPreimage": hex::encode([2u8; 32])})).expect("topUp");
        assert_eq!(
            (top_up.action, top_up.preimage),
            (Action::TopUp { session: hash }, [2u8; 32])
        );
        let close = parse(
            json!({"action": "close", "sessionId": session, "preimage": preimage, "unknown": 1}),
        )
        .expect("close, unknown fields ignored");
        assert_eq!(close.action, Action::Close { session: hash });
        for (payload, why) in [
            (json!({"preimage": preimage}), "payload.action is missing"),
            (
                json!({"action": "open", "preimage": preimage}),
                "payload.returnInvoice is missing",
            ),
            (
                json!({"action": "bearer", "preimage": preimage}),
                "payload.sessionId is missing",
            ),
            (
                json!({"action": "topUp", "sessionId": session, "preimage": preimage}),
                "payload.topUpPreimage is missing",
            ),
            (
                json!({"action": "close", "sessionId": "XY", "preimage": preimage}),
                "payload.sessionId is not 64 lowercase hex digits",
            ),
            (
                json!({"action": "pause", "preimage": preimage}),
                "payload.action `pause` is not open, bearer, topUp or close",
            ),
        ] {
            assert_eq!(parse(payload), Err(Refusal::Malformed(why.to_owned())));
        }
    }

    #[test]
    fn a_close_receipt_says_what_was_refunded() {
        let hash = PaymentHash([3; 32]);
        let raw = URL_SAFE_NO_PAD
            .decode(session_receipt(&hash, 0, Some((140, "succeeded"))))
            .expect("base64url");
        assert_eq!(
            String::from_utf8(raw).expect("utf-8"),
            format!(
                r#"{{"method":"lightning","reference":"{hash}","refundSats":140,"refundStatus":"succeeded","status":"success","timestamp":"1970-01-01T00:00:00Z"}}"#
            )
        );
        assert_eq!(
            spent_sats(1_999),
            1,
            "rounded down, in the customer's favour"
        );
    }

    #[test]
    fn networks_and_dates() {
        assert_eq!(network_of("lnbcrt1..."), Some("regtest"));
        assert_eq!(network_of("LNBC1..."), Some("mainnet"));
        assert_eq!(network_of("lntbs1..."), Some("signet"));
        assert_eq!(network_of("lntb1..."), None);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
    }
}
