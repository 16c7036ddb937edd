//! The HTTP `Payment` scheme's `session` intent on the `/v1` doors ([`crate::job::sessions`]
//! keeps the sessions; [`crate::mpp`] reads and writes the wire).
//!
//! A session credential may come on any paid call (`POST /v1/chat/completions`, `POST
//! /v1/jobs`), as the draft has it:
//! - `open` and `bearer` pay the call from the session ([`account`]); the answer carries a
//!   `Payment-Receipt` whose `reference` is the session id.
//! - `topUp` and `close` are answered here, whatever the body ([`action`]): `200
//!   {"status":"ok"}`, or `200 {"status":"closed","refundSats","refundStatus"}` (and
//!   `refundMsat`, every msat the refund paid) with the close's receipt. No call runs.
//!
//! A refused credential gets 402 with the draft's problem type and a fresh challenge (for the
//! call, or for a call of the default size when refusing a `topUp` or `close`).

use std::net::IpAddr;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::api::{parts, ApiConfig, OpenAiError};
use super::l402::{refuse_payment, Caller, Who};
use super::open::add_receipt;
use super::HttpState;
use crate::job::tokens::PaymentRefusal;
use crate::job::Pipeline;
use crate::ledger::Account;
use crate::mpp::{self, Action, Credential, Refusal};
use crate::wallet::PaymentHash;

/// A call paid from a session: its account, the session id, and the receipt the answer carries.
pub(super) struct SessionPays {
    pub(super) account: Account,
    pub(super) session: PaymentHash,
    pub(super) receipt: String,
}

/// The account an `open` or `bearer` credential pays a call quoted `quote_msat` from, or the
/// refusal with a fresh challenge for the call. `None`: the credential is not one of those.
pub(super) async fn account(
    api: &ApiConfig,
    pipeline: &Pipeline,
    client: IpAddr,
    credential: &Credential,
    quote_msat: u64,
) -> Option<Result<SessionPays, OpenAiError>> {
    let paid = match &credential.action {
        Action::Open { return_invoice } => pipeline
            .open_session(credential, return_invoice)
            .await
            .map(|account| (account, credential.payment_hash())),
        Action::Bearer { session } => bearer_checked(api, pipeline, credential, session)
            .await
            .map(|account| (account, *session)),
        Action::Charge | Action::TopUp { .. } | Action::Close { .. } => return None,
    };
    Some(match paid {
        Ok((account, session)) => Ok(SessionPays {
            account,
            session,
            receipt: mpp::session_receipt(&session, unix_now(), None),
        }),
        Err(PaymentRefusal::Book(e)) => Err(OpenAiError::unavailable("store", &e)),
        Err(PaymentRefusal::Credential(e)) => {
            Err(refuse_payment(api, pipeline, client, &e, Some(quote_msat)).await)
        }
    })
}

async fn bearer_checked(
    api: &ApiConfig,
    pipeline: &Pipeline,
    credential: &Credential,
    session: &PaymentHash,
) -> Result<Account, PaymentRefusal> {
    bound(api, pipeline, credential)?;
    pipeline.session_account(session, credential).await
}

/// A `bearer` or `close` credential echoes a challenge this service bound (its id is our HMAC
/// of the rest); it need not be unused or unexpired, as the draft's verification steps say.
fn bound(api: &ApiConfig, pipeline: &Pipeline, credential: &Credential) -> Result<(), Refusal> {
    if !pipeline.offers_sessions() {
        // Say why there are no sessions before anything else.
        return Ok(());
    }
    if credential.challenge.intent != mpp::INTENT_SESSION
        || !credential.challenge.is_bound_by(api.l402.payment_key())
    {
        return Err(Refusal::UnknownChallenge);
    }
    Ok(())
}

/// Answer a `topUp` or `close` credential; `None` for any other caller (the call goes on).
pub(super) async fn action(
    state: &HttpState,
    caller: &Caller,
) -> Option<Result<Response, OpenAiError>> {
    let Who::Payment(credential) = &caller.who else {
        return None;
    };
    let (api, pipeline) = match parts(state) {
        Ok(parts) => parts,
        Err(e) => return Some(Err(e)),
    };
    let answered = match &credential.action {
        Action::TopUp { session } => top_up(pipeline, credential, session).await,
        Action::Close { session } => close(api, pipeline, credential, session).await,
        _ => return None,
    };
    Some(match answered {
        Ok(response) => Ok(response),
        Err(PaymentRefusal::Book(e)) => Err(OpenAiError::unavailable("store", &e)),
        Err(PaymentRefusal::Credential(e)) => {
            // A fresh challenge, as the draft requires of every refusal: for a call of the
            // default size (no call is priced here: a topUp or close needs no valid body).
            let config = &pipeline.inner.config;
            let quote = config.rate_card.quote(0, config.limits.default_max_tokens);
            Err(refuse_payment(api, pipeline, caller.client, &e, Some(quote)).await)
        }
    })
}

async fn top_up(
    pipeline: &Pipeline,
    credential: &Credential,
    session: &PaymentHash,
) -> Result<Response, PaymentRefusal> {
    let record = pipeline.top_up_session(session, credential).await?;
    let body = json!({
        "status": "ok",
        "sessionId": session.to_string(),
        "depositedMsat": record.deposited_msat,
    });
    let mut response = (StatusCode::OK, Json(body)).into_response();
    add_receipt(
        &mut response,
        Some(&mpp::session_receipt(session, unix_now(), None)),
    );
    Ok(response)
}

async fn close(
    api: &ApiConfig,
    pipeline: &Pipeline,
    credential: &Credential,
    session: &PaymentHash,
) -> Result<Response, PaymentRefusal> {
    bound(api, pipeline, credential)?;
    let report = pipeline.close_session(session, credential).await?;
    let sats = mpp::spent_sats(report.refund_msat);
    let status = report.refund.answer();
    let body = json!({
        "status": "closed",
        "refundSats": sats,
        "refundMsat": report.refund_msat,
        "refundStatus": status,
        "refundPayout": report.refund.recorded(),
    });
    let mut response = (StatusCode::OK, Json(body)).into_response();
    let receipt = mpp::session_receipt(session, unix_now(), Some((sats, status)));
    add_receipt(&mut response, Some(&receipt));
    Ok(response)
}

fn unix_now() -> u64 {
    crate::job::pipeline::unix_now()
}
