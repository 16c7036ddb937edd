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
//! twice). A NIP-98 signed withdrawal pays out once: its auth event is recorded before the
//! payout is booked, so the same signed request after a restart (which empties the replay
//! cache) gets 409 rather than a second payout to a Lightning address's fresh invoice.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{parts, OpenAiError, ReadBody};
use super::l402::{caller, owner, Who};
use super::HttpState;
use crate::job::payouts::{Payout, PayoutRefusal, PayoutState, Target};

/// A withdrawal as the API takes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Withdraw {
    /// A BOLT11 invoice with an amount.
    pub bolt11: Option<String>,
    /// Or a Lightning address...
    pub lightning_address: Option<String>,
    /// ...and whole sats, in msat (default: the whole balance less the most fee).
    pub amount_msat: Option<u64>,
    /// Only on `/admin/withdraw`: whose account pays (an npub or `l402:<hash>`).
    #[serde(default)]
    pub account: Option<String>,
}

const EXPECTED: &str =
    r#"expected {"bolt11": "lnbc..."} or {"lightning_address": "name@host", "amount_msat": N}"#;

impl Withdraw {
    /// Where it goes.
    pub fn target(self) -> Result<Target, String> {
        match (self.bolt11, self.lightning_address) {
            (Some(bolt11), None) if self.amount_msat.is_none() => Ok(Target::Bolt11(bolt11)),
            (None, Some(address)) => Ok(Target::Address {
                address,
                amount_msat: self.amount_msat,
            }),
            _ => Err(EXPECTED.to_owned()),
        }
    }
}

fn refused(e: PayoutRefusal) -> OpenAiError {
    match e {
        PayoutRefusal::Book(e) => OpenAiError::unavailable("store", &e),
        PayoutRefusal::Balance { .. } => OpenAiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_quota",
            "insufficient_balance",
            e.to_string(),
        ),
        PayoutRefusal::Signed => OpenAiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "already_ran",
            e.to_string(),
        ),
        refused => OpenAiError::invalid(refused.to_string()),
    }
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
    if matches!(&caller.who, Who::Token(credential) if credential.narrowed()) {
        return Err(OpenAiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "narrowed_token",
            "this token carries caveats its holder added: it pays for calls within them, and \
             what it holds is withdrawn with the token as it was sold"
                .to_owned(),
        ));
    }
    let signed = caller.signed;
    let account = owner(api, pipeline, caller).await?;
    let asked = parse(&body)?;
    if asked.account.is_some() {
        return Err(OpenAiError::invalid(
            "`account` is the signer's; only the operator's /admin/withdraw names one",
        ));
    }
    if let Some(auth) = signed {
        pipeline
            .book()
            .claim_payout_signature(auth.to_bytes())
            .await
            .map_err(refused)?;
    }
    let payout = pay_out(pipeline, account, asked).await?;
    Ok(Json(view(&payout)))
}

fn parse(body: &[u8]) -> Result<Withdraw, OpenAiError> {
    serde_json::from_slice(body).map_err(|e| OpenAiError::invalid(format!("{EXPECTED}: {e}")))
}

async fn pay_out(
    pipeline: &crate::job::Pipeline,
    account: crate::ledger::Account,
    asked: Withdraw,
) -> Result<Payout, OpenAiError> {
    let target = asked.target().map_err(OpenAiError::invalid)?;
    pipeline
        .payer()
        .pay_out(account, target)
        .await
        .map_err(refused)
}

/// `POST /admin/withdraw`: the operator pays out from a customer's account (`dvmd account
/// withdraw`). Answers only loopback connections that carry the data directory's admin token
/// (`Authorization: Bearer <admin.token>`).
pub(super) async fn admin_withdraw(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Result<Json<Value>, OpenAiError> {
    let (api, pipeline) = parts(&state)?;
    super::admin::check(api, peer, &headers)?;
    let asked = parse(&body)?;
    let account = asked
        .account
        .as_deref()
        .ok_or_else(|| OpenAiError::invalid("name the `account` that pays"))?
        .parse::<crate::ledger::Account>()
        .map_err(OpenAiError::invalid)?;
    let payout = pay_out(pipeline, account, asked).await?;
    tracing::info!(account = %account, payment_hash = %payout.payment_hash, "payout by the operator");
    Ok(Json(view(&payout)))
}

/// A payout as its owner sees it.
pub fn view(payout: &Payout) -> Value {
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
