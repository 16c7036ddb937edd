//! The operator's door: `/admin/*` answers only loopback connections that carry the data
//! directory's admin token (`Authorization: Bearer <admin.token>`); the CLI (`dvmd account
//! withdraw`, `dvmd trust`) reaches the running daemon through it.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use nostr_sdk::{PublicKey, ToBech32};
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{parts, ApiConfig, ReadBody};
use super::error::OpenAiError;
use super::HttpState;
use crate::trust::{Standing, Tier};

/// Refuse anyone but the operator (403).
pub(super) fn check(
    api: &ApiConfig,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<(), OpenAiError> {
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let allowed = peer.ip().is_loopback()
        && api
            .admin_token
            .as_deref()
            .is_some_and(|token| same_secret(token, presented.trim()));
    if allowed {
        return Ok(());
    }
    Err(OpenAiError::new(
        StatusCode::FORBIDDEN,
        "permission_error",
        "admin_only",
        "the admin door takes loopback connections with the data directory's admin token"
            .to_owned(),
    ))
}

/// Whether two secrets are equal, compared in constant time (over their hashes, so the length
/// does not show either).
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    use bitcoin::hashes::{sha256, Hash};
    let (a, b) = (
        sha256::Hash::hash(a.as_bytes()),
        sha256::Hash::hash(b.as_bytes()),
    );
    a.as_byte_array()
        .iter()
        .zip(b.as_byte_array())
        .fold(0u8, |diff, (x, y)| diff | (x ^ y))
        == 0
}

/// An npub's standing and tier, as `dvmd trust show` prints it.
pub fn standing_view(npub: &PublicKey, standing: &Standing, tier: Tier) -> Value {
    json!({
        "npub": npub.to_bech32().unwrap_or_default(),
        "pubkey": npub.to_hex(),
        "tier": tier,
        "set_by_operator": standing.operator,
        "paid_msat": standing.paid_msat,
        "settled_jobs": standing.settled_jobs,
        "first_paid_at": standing.first_paid_at,
        "label": standing.label.as_ref().map(|label| json!({"id": label.id, "tier": label.tier})),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TrustQuery {
    npub: Option<String>,
}

fn parse_npub(text: &str) -> Result<PublicKey, OpenAiError> {
    PublicKey::parse(text.trim())
        .map_err(|e| OpenAiError::invalid(format!("`{text}` is not an npub or hex pubkey: {e}")))
}

/// `GET /admin/trust[?npub=]`: one npub's standing, or every npub with one.
pub(super) async fn trust_show(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<Query<TrustQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, OpenAiError> {
    let (api, pipeline) = parts(&state)?;
    check(api, peer, &headers)?;
    let Query(query) = query.map_err(|e| OpenAiError::invalid(e.body_text()))?;
    let trust = pipeline.trust();
    let now = crate::job::pipeline::unix_now();
    let unavailable = |e: crate::trust::TrustError| OpenAiError::unavailable("store", &e);
    let views: Vec<Value> = match query.npub {
        Some(text) => {
            let npub = parse_npub(&text)?;
            let standing = trust.standing(&npub).await.map_err(unavailable)?;
            let tier = standing.tier(&trust.policy().thresholds, now);
            vec![standing_view(&npub, &standing, tier)]
        }
        None => trust
            .all(now)
            .await
            .map_err(unavailable)?
            .iter()
            .map(|(npub, standing, tier)| standing_view(npub, standing, *tier))
            .collect(),
    };
    Ok(Json(json!({ "object": "list", "data": views })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustSetting {
    npub: String,
    /// A tier, or `auto` (history decides).
    tier: String,
}

/// `POST /admin/trust {"npub", "tier"}`: set the operator's word on an npub (`auto` leaves it
/// to history); the change is labelled like any other.
pub(super) async fn trust_set(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Result<Json<Value>, OpenAiError> {
    let (api, pipeline) = parts(&state)?;
    check(api, peer, &headers)?;
    let asked: TrustSetting = serde_json::from_slice(&body)
        .map_err(|e| OpenAiError::invalid(format!("expected {{\"npub\", \"tier\"}}: {e}")))?;
    let npub = parse_npub(&asked.npub)?;
    let setting = match asked.tier.as_str() {
        "auto" => None,
        tier => Some(tier.parse::<Tier>().map_err(OpenAiError::invalid)?),
    };
    let now = crate::job::pipeline::unix_now();
    let (standing, change) = pipeline
        .trust()
        .set(&npub, setting, now)
        .await
        .map_err(|e| OpenAiError::unavailable("store", &e))?;
    let tier = standing.tier(&pipeline.trust().policy().thresholds, now);
    tracing::info!(%npub, %tier, setting = ?setting, "tier set by the operator");
    if let Some(change) = change {
        let labeller = pipeline.clone();
        tokio::spawn(async move { labeller.label(change).await });
    }
    Ok(Json(standing_view(&npub, &standing, tier)))
}
