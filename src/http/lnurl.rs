//! LNURL-pay (LUD-06, LUD-16) with NIP-57 zaps: `/.well-known/lnurlp/<name>` and its callback.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::HttpState;
use crate::incident::Incident;
use crate::job::zap::ZapRefusal;

/// The Lightning address dvmd serves.
#[derive(Debug, Clone)]
pub struct LnurlConfig {
    /// The name before `@` (`dvmd` in `dvmd@example.com`).
    pub username: String,
    /// The base URL clients reach this listener at, e.g. `https://dvm.example.com`.
    pub public_url: String,
    /// Smallest payment accepted, msat.
    pub min_sendable_msat: u64,
    /// Largest payment accepted, msat.
    pub max_sendable_msat: u64,
    /// Bounds the invoices the public callback issues.
    pub limiter: Arc<InvoiceLimiter>,
}

/// The callback's invoices share one token bucket (`per_minute` in a burst, refilled at
/// `per_minute` a minute): each costs a wallet invoice and a stored record, and anyone can call
/// it.
pub use crate::limits::TokenBucket as InvoiceLimiter;

impl LnurlConfig {
    /// `name@host` for profiles and announcements.
    pub fn lud16(&self) -> String {
        let host = self
            .public_url
            .split("://")
            .nth(1)
            .unwrap_or(&self.public_url)
            .trim_end_matches('/');
        format!("{}@{host}", self.username)
    }

    fn metadata(&self) -> String {
        json!([
            [
                "text/plain",
                format!("Pay {} (NIP-90 jobs and credit)", self.lud16())
            ],
            ["text/identifier", self.lud16()]
        ])
        .to_string()
    }
}

/// An LNURL error body (`{"status":"ERROR","reason":...}`).
fn refuse(reason: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "status": "ERROR", "reason": reason.into() })),
    )
        .into_response()
}

/// `GET /.well-known/lnurlp/{name}`: the pay request, announcing zap support.
pub async fn pay_request(State(state): State<HttpState>, Path(name): Path<String>) -> Response {
    let Some(lnurl) = &state.lnurl else {
        return refuse("this service has no lightning address");
    };
    if name != lnurl.username {
        return refuse(format!("unknown user `{name}`"));
    }
    Json(json!({
        "tag": "payRequest",
        "callback": format!("{}/lnurlp/{}/callback", lnurl.public_url.trim_end_matches('/'), lnurl.username),
        "minSendable": lnurl.min_sendable_msat,
        "maxSendable": lnurl.max_sendable_msat,
        "metadata": lnurl.metadata(),
        "allowsNostr": true,
        "nostrPubkey": state.pubkey,
    }))
    .into_response()
}

#[derive(Deserialize)]
/// The callback's query: amount in msat and the URI-decoded zap request.
pub struct CallbackQuery {
    amount: Option<u64>,
    nostr: Option<String>,
}

/// `GET /lnurlp/{name}/callback?amount=<msat>&nostr=<zap request>`: the invoice.
pub async fn callback(
    State(state): State<HttpState>,
    Path(name): Path<String>,
    Query(query): Query<CallbackQuery>,
) -> Response {
    let (Some(lnurl), Some(pipeline)) = (&state.lnurl, &state.pipeline) else {
        return refuse("this service has no lightning address");
    };
    if name != lnurl.username {
        return refuse(format!("unknown user `{name}`"));
    }
    let Some(amount) = query.amount else {
        return refuse("missing `amount` (msat)");
    };
    if amount < lnurl.min_sendable_msat || amount > lnurl.max_sendable_msat {
        return refuse(format!(
            "amount must be between {} and {} msat",
            lnurl.min_sendable_msat, lnurl.max_sendable_msat
        ));
    }
    if !lnurl.limiter.try_take_at(Instant::now()) {
        tracing::warn!("lnurl callback rate limit reached; invoice refused");
        return (
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({ "status": "ERROR", "reason": "too many invoice requests right now; try again in a minute" })),
        )
            .into_response();
    }
    // A zap is credited to its sender (or pays the job it names); a plain payment is a tip.
    let invoice = match query.nostr {
        Some(zap) => pipeline.zap_invoice(&zap, amount).await,
        None => pipeline.lnurl_invoice(amount, &lnurl.metadata()).await,
    };
    match invoice {
        Ok(invoice) => Json(json!({ "pr": invoice.bolt11, "routes": [] })).into_response(),
        Err(e @ (ZapRefusal::Wallet(_) | ZapRefusal::Book(_))) => refuse(format!(
            "cannot issue an invoice right now ({})",
            Incident::log("zap invoice", &e)
        )),
        Err(e) => {
            tracing::info!(error = %e, "zap refused");
            refuse(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_limiter_allows_a_burst_then_the_rate() {
        let limiter = InvoiceLimiter::per_minute(3);
        let start = Instant::now();
        assert!((0..3).all(|_| limiter.try_take_at(start)));
        assert!(!limiter.try_take_at(start), "the burst is spent");
        assert!(!limiter.try_take_at(start + Duration::from_secs(10)));
        assert!(
            limiter.try_take_at(start + Duration::from_secs(21)),
            "3 a minute: one more after 20 s"
        );
        assert!(!limiter.try_take_at(start + Duration::from_secs(22)));
        // A long idle spell refills the bucket, but never beyond its size.
        let later = start + Duration::from_secs(3600);
        assert!((0..3).all(|_| limiter.try_take_at(later)));
        assert!(!limiter.try_take_at(later));
    }
}
