//! The caller's own account over `/v1` (NIP-98): `GET /v1/account` (balance, latest ledger
//! entries and the jobs they name, settings), `POST /v1/account/topup` (an invoice that credits
//! the npub, recorded before it is returned), `POST /v1/account/settings`, and the 402 with a
//! top-up invoice that a job's shortfall gets.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Json;
use nostr_sdk::{PublicKey, ToBech32};
use serde::Deserialize;
use serde_json::json;

use super::api::{authorized, parts, ApiConfig, OpenAiError, ReadBody};
use super::HttpState;
use crate::job::account::{check_top_up, TopUpRefusal};
use crate::job::Pipeline;
use crate::wallet::WalletError;

/// Entries `GET /v1/account` returns when the query names no `limit`, and the most it returns.
const DEFAULT_ENTRIES: usize = 50;
const MAX_ENTRIES: usize = 500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AccountQuery {
    limit: Option<usize>,
}

pub(super) async fn account(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    query: Result<Query<AccountQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, OpenAiError> {
    let (api, pipeline) = parts(&state)?;
    let who = authorized(api, peer, &method, &uri, &headers, &[])?.pubkey;
    let Query(query) = query.map_err(|e| OpenAiError::invalid(e.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_ENTRIES).min(MAX_ENTRIES);
    let view = pipeline
        .account(who.into(), limit)
        .await
        .map_err(|e| OpenAiError::unavailable("store", &e))?;
    Ok(Json(json!({
        "object": "account",
        "pubkey": who.to_hex(),
        "npub": who.to_bech32().unwrap_or_default(),
        "balance_msat": view.balance_msat,
        "tier": pipeline.trust().tier(&who),
        "owed_msat": view.owed_msat,
        "settings": pipeline
            .book()
            .settings(who.into())
            .await
            .map_err(|e| OpenAiError::unavailable("store", &e))?,
        "entries": view.entries,
        "jobs": view.jobs,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    auto_payout: bool,
}

/// `POST /v1/account/settings {"auto_payout": true|false}` (NIP-98): send change and refunds
/// home automatically to the `lud16` of the signer's kind 0 profile (see `job::auto_payout`).
pub(super) async fn settings(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Result<impl IntoResponse, OpenAiError> {
    let (api, pipeline) = parts(&state)?;
    let who = authorized(api, peer, &method, &uri, &headers, &body)?.pubkey;
    let Settings { auto_payout } = serde_json::from_slice(&body)
        .map_err(|e| OpenAiError::invalid(format!("expected {{\"auto_payout\": true}}: {e}")))?;
    let settings = pipeline
        .book()
        .set_auto_payout(who.into(), auto_payout)
        .await
        .map_err(|e| OpenAiError::unavailable("store", &e))?;
    let policy = pipeline.inner.config.auto_payout;
    Ok(Json(json!({
        "object": "account_settings",
        "auto_payout": settings.auto_payout,
        "idle_days": policy.idle_days,
        "min_msat": policy.min_msat,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopUp {
    amount_msat: u64,
}

/// The 402 for a call the caller's balance does not cover: an invoice for the shortfall,
/// rounded up to whole sats, that credits the caller when paid. It is bound to no call and
/// reserves nothing; the caller retries with a new NIP-98 event once it is paid. Minting it takes
/// a token from the top-up flood limit.
pub(super) async fn shortfall(
    api: &ApiConfig,
    pipeline: &Pipeline,
    who: PublicKey,
    client: IpAddr,
    quote_msat: u64,
    balance_msat: u64,
) -> OpenAiError {
    let amount_msat = quote_msat
        .saturating_sub(balance_msat)
        .div_ceil(1000)
        .max(1)
        * 1000;
    if !take_top_up(api, client) {
        return OpenAiError::rate_limited(format!(
            "your balance of {balance_msat} msat does not cover the quote of {quote_msat} msat, and too many top-up invoices were issued just now; retry in a minute"
        ));
    }
    let invoice = pipeline
        .top_up_invoice(who.into(), amount_msat, amount_msat.max(api.max_topup_msat))
        .await;
    let invoice = match invoice {
        Ok(invoice) => invoice,
        Err(e) => return top_up_refused(e),
    };
    pipeline
        .metrics()
        .challenged(crate::metrics::Challenge::TopUp);
    let mut error = OpenAiError::new(
        StatusCode::PAYMENT_REQUIRED,
        "insufficient_quota",
        "insufficient_balance",
        format!(
            "your balance of {balance_msat} msat does not cover the quote of {quote_msat} msat; pay the invoice in `top_up` ({} msat) to credit your account, then retry with a new NIP-98 event",
            invoice.amount_msat
        ),
    );
    error.extra = Some(Box::new((
        "top_up",
        json!({
            "bolt11": invoice.bolt11,
            "payment_hash": invoice.payment_hash.to_string(),
            "amount_msat": invoice.amount_msat,
            "expires_at": invoice.expires_at,
            "credits": who.to_hex(),
            "quote_msat": quote_msat,
            "balance_msat": balance_msat,
        }),
    )));
    error
}

/// A token from `client`'s top-up bucket, then from everyone's: a client over its own limit
/// takes nothing from the others. This host ([`crate::limits::is_this_host`]) has no bucket
/// of its own.
fn take_top_up(api: &ApiConfig, client: IpAddr) -> bool {
    let now = Instant::now();
    (crate::limits::is_this_host(client) || api.topups_per_client.try_take(client, now))
        && api.topups.try_take_at(now)
}

fn top_up_refused(e: TopUpRefusal) -> OpenAiError {
    match e {
        TopUpRefusal::Amount(reason) => OpenAiError::invalid(reason),
        TopUpRefusal::Wallet(e @ WalletError::InvalidInvoice(_)) => {
            OpenAiError::invalid(e.to_string())
        }
        TopUpRefusal::Wallet(e) => OpenAiError::unavailable("wallet", &e),
        TopUpRefusal::Book(e) => OpenAiError::unavailable("store", &e),
    }
}

pub(super) async fn topup(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Result<impl IntoResponse, OpenAiError> {
    let (api, pipeline) = parts(&state)?;
    let who = authorized(api, peer, &method, &uri, &headers, &body)?.pubkey;
    let TopUp { amount_msat } = serde_json::from_slice(&body)
        .map_err(|e| OpenAiError::invalid(format!("expected {{\"amount_msat\": <msat>}}: {e}")))?;
    // A refused amount costs no invoice, so it takes no token from the flood limit.
    check_top_up(amount_msat, api.max_topup_msat)
        .map_err(|e| OpenAiError::invalid(e.to_string()))?;
    if !take_top_up(api, api.proxies.client(peer.ip(), &headers)) {
        return Err(OpenAiError::rate_limited(
            "too many top-up invoices right now; retry in a minute",
        ));
    }
    let invoice = pipeline
        .top_up_invoice(who.into(), amount_msat, api.max_topup_msat)
        .await
        .map_err(top_up_refused)?;
    Ok(Json(json!({
        "object": "topup",
        "bolt11": invoice.bolt11,
        "payment_hash": invoice.payment_hash.to_string(),
        "amount_msat": invoice.amount_msat,
        "expires_at": invoice.expires_at,
        "credits": who.to_hex(),
    })))
}
