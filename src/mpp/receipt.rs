//! What we answer: the `Payment-Receipt` of a charge or a session, and the draft's whole-sat
//! count of spending.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::json;

use super::{jcs, rfc3339, METHOD};
use crate::wallet::PaymentHash;

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
