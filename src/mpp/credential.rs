//! What a client sends: the `Authorization: Payment` credential, parsed, and why one is refused.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bitcoin::hashes::{sha256, Hash};
use serde::Deserialize;

use super::{Challenge, INTENT_CHARGE, INTENT_SESSION, METHOD};
use crate::wallet::PaymentHash;

/// The base of the draft's problem types (RFC 9457 `type`).
const PROBLEMS: &str = "https://paymentauth.org/problems/";
/// The longest credential read, in characters (the draft asks servers to take at least 4 KB).
const MAX_CREDENTIAL_CHARS: usize = 16 * 1024;

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

    /// What the echoed challenge sold, in msat, for a `charge` credential: its request's
    /// `amount` (whole sats). As echoed, not yet checked against the challenge issued: use it
    /// only where a larger figure cannot buy more than the stored challenge allows.
    pub fn charge_msat(&self) -> Option<u64> {
        use base64::Engine;
        if self.action != Action::Charge {
            return None;
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&self.challenge.request)
            .ok()?;
        let request: serde_json::Value = serde_json::from_slice(&raw).ok()?;
        let sats: u64 = request["amount"].as_str()?.parse().ok()?;
        sats.checked_mul(1000)
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
