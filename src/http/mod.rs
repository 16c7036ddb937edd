//! The HTTP listener: `/healthz`, `/metrics` (Prometheus text), the Lightning address, the
//! `/v1` API ([`api`]), and in dev mode `/dev/pay` and `/dev/invoice`.

pub mod account;
pub mod admin;
pub mod api;
pub mod chat;
pub mod error;
pub mod jobs;
pub mod l402;
pub mod listener;
pub mod lnurl;
pub mod nip98;
mod open;
pub mod page;
pub mod session;
pub mod withdraw;

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::error::ApiError;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::wallet::dev::DevWallet;
use crate::wallet::Wallet;

/// What the handlers share.
#[derive(Clone)]
pub struct HttpState {
    /// Metrics to render.
    pub metrics: Arc<Metrics>,
    /// The store: its writer's health and figures.
    pub store: Store,
    /// The embedded relay's figures, in dev mode.
    pub relay: Option<crate::relay::embedded::RelayStats>,
    /// The wallet, for settlement webhooks.
    pub wallet: Arc<dyn Wallet>,
    /// The key a settlement webhook must carry ([`crate::identity::webhook_key`]).
    pub webhook_key: String,
    /// The dev wallet, only in dev mode (enables `/dev/pay`).
    pub dev_wallet: Option<Arc<DevWallet>>,
    /// Our public key (hex), reported by `/healthz` and LNURL (`nostrPubkey`).
    pub pubkey: String,
    /// The pipeline, for zap invoices.
    pub pipeline: Option<crate::job::Pipeline>,
    /// The Lightning address served, if any.
    pub lnurl: Option<lnurl::LnurlConfig>,
    /// The `/v1` API's settings (absent: `/v1` answers 503).
    pub api: Option<Arc<api::ApiConfig>>,
}

/// The router.
pub fn router(state: HttpState) -> Router {
    let mut router = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/hooks/wallet", post(wallet_hook))
        .route("/.well-known/lnurlp/{name}", get(lnurl::pay_request))
        .route("/lnurlp/{name}/callback", get(lnurl::callback))
        .merge(api::routes(state.api.as_deref()))
        .merge(page::routes());
    if state.dev_wallet.is_some() {
        router = router
            .route("/dev/pay", post(dev_pay))
            .route("/dev/invoice", post(dev_invoice));
    }
    router.with_state(state)
}

/// Serve `router` on `listener`, its connections held to `limits`, until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    limits: listener::ConnectionLimits,
    router: Router,
    cancel: CancellationToken,
) {
    listener::serve(listener, limits, router, cancel).await
}

/// 200 while the daemon can take jobs; 503 with the reason once the store cannot persist.
async fn healthz(State(state): State<HttpState>) -> impl IntoResponse {
    let (status, code, reason) = match state.store.failure() {
        None => ("ok", StatusCode::OK, None),
        Some(reason) => (
            "store_failed",
            StatusCode::SERVICE_UNAVAILABLE,
            Some(reason),
        ),
    };
    let mut body = json!({
        "status": status,
        "pubkey": state.pubkey,
        "version": env!("CARGO_PKG_VERSION"),
        "dev": state.dev_wallet.is_some(),
    });
    if let Some(reason) = reason {
        body["reason"] = reason.into();
    }
    (code, Json(body))
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    let mut text = state.metrics.render();
    state.store.render_metrics(&mut text);
    if let Some(relay) = &state.relay {
        relay.render(&mut text);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// The query of a wallet webhook.
#[derive(Deserialize)]
struct HookQuery {
    key: Option<String>,
}

/// A wallet webhook: only a hint. The pipeline confirms with the wallet before anything moves;
/// still, a post must carry the key dvmd gave the wallet with the URL, or anyone could fill the
/// hint channel until it lags, and each lag starts a reconcile pass (a lookup of every unpaid
/// invoice). With the key it answers 200 whatever the body, so a sender does not learn which
/// hashes exist.
async fn wallet_hook(
    State(state): State<HttpState>,
    Query(query): Query<HookQuery>,
    body: axum::body::Bytes,
) -> impl IntoResponse {
    let keyed = query
        .key
        .as_deref()
        .is_some_and(|key| admin::same_secret(key, &state.webhook_key));
    if !keyed {
        let refused = state.metrics.webhook_refused();
        // Loud at first (a wallet configured by hand with the bare URL), then ever more rarely.
        if refused.is_power_of_two() {
            tracing::warn!(
                refused,
                "wallet webhook without the key dvmd put in the URL it gave the wallet; refused (payments are still found by the reconciler, or by their credential)"
            );
        }
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "error": "this webhook URL needs the key dvmd gave the wallet" })),
        );
    }
    match state.wallet.webhook_hint(&body) {
        Some(hash) => tracing::debug!(payment_hash = %hash, "wallet webhook hint"),
        None => tracing::debug!(bytes = body.len(), "wallet webhook without a payment hash"),
    }
    (StatusCode::OK, Json(json!({ "ok": true })))
}

#[derive(Deserialize)]
struct DevPay {
    bolt11: String,
}

/// Simulate paying one of the dev wallet's invoices.
async fn dev_pay(
    State(state): State<HttpState>,
    body: Result<Json<DevPay>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(body) =
        body.map_err(|e| ApiError::bad_request(format!("expected {{\"bolt11\": \"...\"}}: {e}")))?;
    let wallet = state
        .dev_wallet
        .as_ref()
        .ok_or_else(|| ApiError::bad_request("not in dev mode"))?;
    let preimage = wallet.settle(&body.bolt11).await?;
    Ok(Json(json!({ "preimage": hex::encode(preimage) })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevInvoice {
    #[serde(default)]
    memo: String,
    #[serde(default = "a_day")]
    expiry_secs: u64,
}

fn a_day() -> u64 {
    24 * 60 * 60
}

/// An invoice of the dev wallet that names no amount, for a client that needs one (an HTTP
/// `Payment` session's `returnInvoice`); `GET`-able state is the wallet's own (`lookup`).
async fn dev_invoice(
    State(state): State<HttpState>,
    body: Result<Json<DevInvoice>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(body) = body.map_err(|e| {
        ApiError::bad_request(format!("expected {{\"memo\", \"expiry_secs\"}}: {e}"))
    })?;
    let wallet = state
        .dev_wallet
        .as_ref()
        .ok_or_else(|| ApiError::bad_request("not in dev mode"))?;
    let invoice = wallet
        .amountless_invoice(&body.memo, body.expiry_secs)
        .await?;
    Ok(Json(json!({
        "bolt11": invoice.bolt11,
        "payment_hash": invoice.payment_hash.to_string(),
        "expires_at": invoice.expires_at,
    })))
}
