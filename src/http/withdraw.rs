//! `POST /v1/account/withdraw`: send an account's money out over Lightning.
//!
//! Authorized like the account it spends from: NIP-98 for an npub's account, or the L402
//! credential for a token's (so a token's leftover value can leave too). The body names a
//! BOLT11 invoice with an amount, `{"bolt11": "lnbc..."}`, or a Lightning address,
//! `{"lightning_address": "name@host", "amount_msat": N}` (whole sats; without an amount, the
//! whole balance less the most fee, rounded down to whole sats). The amount and the most routing fee
//! allowed leave the balance before the wallet is called (see `job::payouts`); the answer says
//! where the payout stands when the wallet answered: `paid` (with the fee), `failed` (all of it
//! back on the balance) or `pending` (in flight; it is looked up until it ends, and never paid
//! twice).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{parts, OpenAiError, ReadBody};
use super::l402::{caller, owner};
use super::HttpState;
use crate::job::payouts::{Payout, PayoutRefusal, PayoutState};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Withdraw {
    bolt11: Option<String>,
    lightning_address: Option<String>,
    amount_msat: Option<u64>,
}

pub(super) async fn withdraw(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Result<Json<Value>, OpenAiError> {
    let (api, pipeline) = parts(&state)?;
    let caller = caller(api, peer, &method, &uri, &headers, &body)?;
    let account = owner(api, pipeline, caller).await?;
    const EXPECTED: &str =
        r#"expected {"bolt11": "lnbc..."} or {"lightning_address": "name@host", "amount_msat": N}"#;
    let asked: Withdraw = serde_json::from_slice(&body)
        .map_err(|e| OpenAiError::invalid(format!("{EXPECTED}: {e}")))?;
    let paid = match (asked.bolt11, asked.lightning_address) {
        (Some(bolt11), None) if asked.amount_msat.is_none() => {
            pipeline.withdraw(account, &bolt11).await
        }
        (None, Some(address)) => {
            pipeline
                .withdraw_to_address(account, &address, asked.amount_msat)
                .await
        }
        _ => return Err(OpenAiError::invalid(EXPECTED)),
    };
    let payout = paid.map_err(|e| match e {
        PayoutRefusal::Book(e) => OpenAiError::unavailable("store", &e),
        PayoutRefusal::Balance { .. } => OpenAiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_quota",
            "insufficient_balance",
            e.to_string(),
        ),
        refused => OpenAiError::invalid(refused.to_string()),
    })?;
    Ok(Json(view(&payout)))
}

/// A payout as its owner sees it.
pub(super) fn view(payout: &Payout) -> Value {
    let (state, fee_msat) = match payout.state {
        PayoutState::Pending => ("pending", None),
        PayoutState::Paid { fee_msat } => ("paid", Some(fee_msat)),
        PayoutState::Failed => ("failed", None),
    };
    json!({
        "object": "payout",
        "state": state,
        "payment_hash": payout.payment_hash.to_string(),
        "amount_msat": payout.amount_msat,
        "max_fee_msat": payout.max_fee_msat,
        "fee_msat": fee_msat,
        "note": payout.note,
        "account": payout.account.to_string(),
        "created_at": payout.created_at,
        "updated_at": payout.updated_at,
    })
}
