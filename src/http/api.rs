//! The `/v1` API for programs: the OpenAI-shaped door to the same pipeline, book and ledger the
//! relays use.
//!
//! - `GET /v1/models`: the model served and its prices (no auth).
//! - `GET /v1/account[?limit=N]`: the caller's balance and latest ledger entries (NIP-98).
//! - `POST /v1/account/topup {"amount_msat"}`: an invoice that credits the caller's npub once
//!   our wallet confirms it (NIP-98). It is recorded before it is returned, bound to no job,
//!   and reserves nothing.
//! - `POST /v1/chat/completions` ([`super::chat`]) and `POST /v1/jobs`, `GET /v1/jobs/{id}`
//!   ([`super::jobs`]): jobs billed to the caller's npub (NIP-98); 402 with a top-up invoice
//!   for the shortfall when the balance does not cover the quote.
//!
//! NIP-98 events are checked against `[http] public_url` plus the request's path and query
//! (see [`super::nip98`]). Errors have OpenAI's shape, `{"error": {"message", "type", "code"}}`,
//! with the status that says what to do: 401 (sign again), 402 (pay `top_up`, then sign
//! again), 400/404/413 (fix the request), 429 (wait `Retry-After` seconds), 503 (the wallet or
//! store is down; retry later).

use std::net::SocketAddr;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nostr_sdk::{PublicKey, Timestamp, ToBech32};
use serde::Deserialize;
use serde_json::json;

use super::lnurl::InvoiceLimiter;
use super::nip98::{AuthError, Verifier};
use super::HttpState;
use crate::incident::Incident;
use crate::job::account::{check_top_up, TopUpRefusal};
use crate::job::Pipeline;
use crate::wallet::WalletError;

/// Entries `GET /v1/account` returns when the query names no `limit`, and the most it returns.
const DEFAULT_ENTRIES: usize = 50;
const MAX_ENTRIES: usize = 500;
/// What a 429 tells the caller to wait, seconds.
const RETRY_AFTER_SECS: u64 = 60;

/// The API's settings and per-process state.
pub struct ApiConfig {
    /// The URL the public reaches this listener at, without a trailing `/`.
    pub public_url: String,
    /// Whether `[http] public_url` set it (then `X-Forwarded-*` never changes it).
    pub public_url_set: bool,
    /// Reverse proxies whose `X-Forwarded-*` headers are believed.
    pub proxies: Proxies,
    /// NIP-98 checks and the replay cache.
    pub verifier: Verifier,
    /// Largest body read, bytes.
    pub max_body_bytes: usize,
    /// Longest a request body may take to arrive, seconds.
    pub body_timeout_secs: u64,
    /// Largest top-up, msat.
    pub max_topup_msat: u64,
    /// Top-up invoices for everyone together.
    pub topups: InvoiceLimiter,
    /// L402: the root key, token lifetime and challenge limits.
    pub l402: super::l402::L402Door,
    /// Origins allowed to call from a browser.
    pub cors: Cors,
    /// The operator's token for `/admin/*` (from the data directory; absent: no admin door).
    pub admin_token: Option<String>,
}

/// The reverse proxies named in `[http] trusted_proxies`. Only a connection from one of them
/// may say, in `X-Forwarded-*`, who the client is and which URL it called.
#[derive(Debug, Clone, Default)]
pub struct Proxies(Vec<std::net::IpAddr>);

impl Proxies {
    /// From the configured addresses (checked at start).
    pub fn new(addresses: &[String]) -> Self {
        Self(addresses.iter().filter_map(|a| a.parse().ok()).collect())
    }

    /// The client's address: the connection's, or the last untrusted hop of `X-Forwarded-For`
    /// when the connection is from a trusted proxy.
    pub fn client(&self, peer: std::net::IpAddr, headers: &HeaderMap) -> std::net::IpAddr {
        if !self.0.contains(&peer) {
            return peer;
        }
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|hop| hop.trim().parse::<std::net::IpAddr>().ok())
            .collect::<Vec<_>>();
        hops.into_iter()
            .rev()
            .find(|hop| !self.0.contains(hop))
            .unwrap_or(peer)
    }

    /// The public base URL a trusted proxy says the client called (`X-Forwarded-Proto`,
    /// `X-Forwarded-Host`), for NIP-98's `u` tag when `[http] public_url` is not set.
    pub fn public_base(&self, peer: std::net::IpAddr, headers: &HeaderMap) -> Option<String> {
        if !self.0.contains(&peer) {
            return None;
        }
        let first = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let host = first("x-forwarded-host")?;
        if host.contains(['/', ' ', '@', '?', '#']) {
            return None;
        }
        let proto = match first("x-forwarded-proto") {
            Some("https") => "https",
            _ => "http",
        };
        Some(format!("{proto}://{host}"))
    }
}

/// CORS for `/v1`: which origins' pages may call it (a NIP-07 extension signs NIP-98 there).
#[derive(Debug, Clone, Default)]
pub struct Cors {
    any: bool,
    origins: Vec<HeaderValue>,
}

impl Cors {
    /// From `[http] cors_origins` (`*` allows any origin).
    pub fn new(origins: &[String]) -> Self {
        Self {
            any: origins.iter().any(|o| o == "*"),
            origins: origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect(),
        }
    }

    fn allows(&self, origin: &HeaderValue) -> bool {
        self.any || self.origins.contains(origin)
    }
}

/// Answer a preflight from an allowed origin, and mark answers to it as readable there (with
/// the headers a client needs: the challenge, the job id, when to retry).
async fn cors(
    cors: Cors,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .filter(|origin| cors.allows(origin))
        .cloned();
    let Some(origin) = origin else {
        return next.run(request).await;
    };
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        let mut response = StatusCode::NO_CONTENT.into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        response
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.append(header::VARY, HeaderValue::from_static("origin"));
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("www-authenticate, retry-after, x-dvmd-job, location"),
    );
    response
}

impl ApiConfig {
    /// From `[http]`; `listen_url` is the listener's own address, the default public URL;
    /// `root_key` signs L402 macaroons.
    pub fn new(http: &crate::config::HttpSection, listen_url: &str, root_key: [u8; 32]) -> Self {
        Self {
            public_url: http
                .public_url
                .as_deref()
                .unwrap_or(listen_url)
                .trim_end_matches('/')
                .to_owned(),
            public_url_set: http.public_url.is_some(),
            proxies: Proxies::new(&http.trusted_proxies),
            verifier: Verifier::new(http.auth_window_secs, http.auth_replay_capacity),
            max_body_bytes: http.max_body_bytes,
            body_timeout_secs: http.body_timeout_secs,
            max_topup_msat: http.max_topup_msat,
            topups: InvoiceLimiter::per_minute(http.max_topups_per_minute),
            l402: super::l402::L402Door::new(http, root_key),
            cors: Cors::new(&http.cors_origins),
            admin_token: None,
        }
    }
}

/// The `/v1` routes, with their body limit and CORS (from `api`, when the daemon serves it).
pub fn routes(api: Option<&ApiConfig>) -> Router<HttpState> {
    let max_body_bytes = api.map_or(64 * 1024, |api| api.max_body_bytes);
    let allowed = api.map(|api| api.cors.clone()).unwrap_or_default();
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/account", get(account))
        .route("/v1/account/topup", post(topup))
        .route("/v1/account/withdraw", post(super::withdraw::withdraw))
        .route("/v1/account/settings", post(settings))
        .route("/admin/withdraw", post(super::withdraw::admin_withdraw))
        .route("/v1/chat/completions", post(super::chat::completions))
        .route("/v1/jobs", post(super::jobs::create))
        .route("/v1/jobs/{id}", get(super::jobs::show))
        .route("/v1/l402/token", post(super::l402::buy))
        .route("/v1/l402/balance", get(super::l402::balance))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn(move |request, next| {
            cors(allowed.clone(), request, next)
        }))
}

/// A request body, read within `[http] body_timeout_secs` and `max_body_bytes`: 408 for one
/// that does not arrive in time (a slow sender holds a connection and a task), 413 for one too
/// large.
pub struct ReadBody(pub Bytes);

impl axum::extract::FromRequest<HttpState> for ReadBody {
    type Rejection = OpenAiError;

    async fn from_request(
        request: axum::extract::Request,
        state: &HttpState,
    ) -> Result<Self, Self::Rejection> {
        let secs = state.api.as_ref().map_or(30, |api| api.body_timeout_secs);
        let read = <Bytes as axum::extract::FromRequest<HttpState>>::from_request(request, state);
        match tokio::time::timeout(std::time::Duration::from_secs(secs), read).await {
            Ok(Ok(bytes)) => Ok(Self(bytes)),
            Ok(Err(rejection)) => Err(rejection.into()),
            Err(_) => Err(OpenAiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "body_timeout",
                format!("the request body did not arrive within {secs} s"),
            )),
        }
    }
}

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct OpenAiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
    /// `WWW-Authenticate` values (a 401 or 402 that says how to authenticate).
    pub(super) challenges: Vec<String>,
    /// Beside `error`: a named object (the top-up invoice or the L402 challenge of a 402).
    pub(super) extra: Option<Box<(&'static str, serde_json::Value)>>,
    /// An RFC 9457 problem `type` and `title` (a refused HTTP `Payment` credential): the body
    /// also carries `type`, `title`, `status` and `detail`, as `application/problem+json`.
    pub(super) problem: Option<Box<(String, &'static str)>>,
}

impl OpenAiError {
    pub(super) fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: String,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            message,
            challenges: Vec::new(),
            extra: None,
            problem: None,
        }
    }

    /// Its status.
    pub(super) fn status(&self) -> StatusCode {
        self.status
    }

    /// The same answer with another message.
    pub(super) fn set_message(&mut self, message: String) {
        self.message = message;
    }

    /// The same answer with what the call is expected to cost beside its invoice: `estimate`
    /// (p50, p90, confidence, cap) in the top-up or L402 object of a 402.
    pub(super) fn with_estimate(mut self, estimate: &crate::pricing::Estimate) -> Self {
        if let Some(extra) = &mut self.extra {
            if let Some(object) = extra.1.as_object_mut() {
                object.insert("estimate".to_owned(), estimate_json(estimate));
            }
        }
        self
    }

    pub(super) fn invalid(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            message.into(),
        )
    }

    pub(super) fn unavailable(what: &str, error: &dyn std::fmt::Display) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "unavailable",
            format!(
                "the {what} is unavailable right now; retry later ({})",
                Incident::log(what, error)
            ),
        )
    }

    pub(super) fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limited",
            message.into(),
        )
    }
}

impl From<AuthError> for OpenAiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Busy => Self::rate_limited(e.to_string()),
            e => Self::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_nip98",
                e.to_string(),
            ),
        }
    }
}

impl From<BytesRejection> for OpenAiError {
    fn from(e: BytesRejection) -> Self {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "invalid_body"
        };
        Self::new(status, "invalid_request_error", code, e.body_text())
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "error": { "message": self.message, "type": self.kind, "code": self.code, "param": null }
        });
        if let Some(extra) = self.extra {
            let (name, value) = *extra;
            body[name] = value;
        }
        let problem = self.problem.is_some();
        if let Some(problem) = self.problem {
            let (kind, title) = *problem;
            body["type"] = json!(kind);
            body["title"] = json!(title);
            body["status"] = json!(self.status.as_u16());
            body["detail"] = json!(self.message);
        }
        let body = Json(body);
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        if problem {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            );
        }
        if self.status == StatusCode::PAYMENT_REQUIRED {
            // A 402's invoice and challenge are for this caller once: no cache may keep them.
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
        for challenge in &self.challenges {
            if let Ok(value) = HeaderValue::from_str(challenge) {
                headers.append(header::WWW_AUTHENTICATE, value);
            }
        }
        match self.status {
            StatusCode::UNAUTHORIZED if self.challenges.is_empty() => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Nostr"));
            }
            StatusCode::TOO_MANY_REQUESTS => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            }
            _ => {}
        }
        response
    }
}

/// The parts of `state` the `/v1` routes need, or 503 when the daemon runs without them.
pub(super) fn parts(state: &HttpState) -> Result<(&ApiConfig, &Pipeline), OpenAiError> {
    match (&state.api, &state.pipeline) {
        (Some(api), Some(pipeline)) => Ok((api, pipeline)),
        _ => Err(OpenAiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "unavailable",
            "this daemon does not serve the /v1 API".to_owned(),
        )),
    }
}

/// Who signed this request (NIP-98), checked against its public URL, method and body.
pub(super) fn authenticate(
    api: &ApiConfig,
    peer: SocketAddr,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<PublicKey, OpenAiError> {
    let forwarded = (!api.public_url_set)
        .then(|| api.proxies.public_base(peer.ip(), headers))
        .flatten();
    let url = format!(
        "{}{}",
        forwarded.as_deref().unwrap_or(&api.public_url),
        uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let header = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            OpenAiError::from(AuthError::Malformed(
                "the Authorization header is not text".to_owned(),
            ))
        })?),
    };
    match api
        .verifier
        .verify(header, &url, method.as_str(), body, Timestamp::now())
    {
        Ok(authorized) => Ok(authorized.pubkey),
        Err(e) => {
            tracing::debug!(%url, reason = %e, "NIP-98 refused");
            Err(e.into())
        }
    }
}

async fn models(State(state): State<HttpState>) -> Result<impl IntoResponse, OpenAiError> {
    let (_, pipeline) = parts(&state)?;
    let config = &pipeline.inner.config;
    let card = &config.rate_card;
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": config.model,
            "object": "model",
            "created": 0,
            "owned_by": state.pubkey,
            "pricing": {
                "currency": "msat",
                "base_fee_msat": card.base_fee_msat,
                "prompt_msat_per_1k_tokens": card.prompt_msat_per_1k_tokens,
                "completion_msat_per_1k_tokens": card.completion_msat_per_1k_tokens,
            },
            "max_tokens_limit": config.limits.max_tokens_limit,
            "context_tokens": config.context_tokens,
        }],
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountQuery {
    limit: Option<usize>,
}

async fn account(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    query: Result<Query<AccountQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, OpenAiError> {
    let (api, pipeline) = parts(&state)?;
    let who = authenticate(api, peer, &method, &uri, &headers, &[])?;
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
async fn settings(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Result<impl IntoResponse, OpenAiError> {
    let (api, pipeline) = parts(&state)?;
    let who = authenticate(api, peer, &method, &uri, &headers, &body)?;
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

/// An estimate as the API shows it.
pub(super) fn estimate_json(estimate: &crate::pricing::Estimate) -> serde_json::Value {
    json!({
        "p50_msat": estimate.p50_msat,
        "p90_msat": estimate.p90_msat,
        "confidence": estimate.confidence,
        "cap_msat": estimate.cap_msat,
        "prompt_tokens": estimate.prompt_tokens,
        "max_tokens": estimate.max_tokens,
    })
}

/// The 402 for a call the caller's balance does not cover: an invoice for the shortfall,
/// rounded up to whole sats, that credits the caller when paid. It is bound to no call and
/// reserves nothing; the caller retries with a new NIP-98 event once it is paid. Minting it takes
/// a token from the top-up flood limit.
pub(super) async fn shortfall(
    api: &ApiConfig,
    pipeline: &Pipeline,
    who: PublicKey,
    quote_msat: u64,
    balance_msat: u64,
) -> OpenAiError {
    let amount_msat = quote_msat
        .saturating_sub(balance_msat)
        .div_ceil(1000)
        .max(1)
        * 1000;
    if !api.topups.try_take_at(Instant::now()) {
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

async fn topup(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Result<impl IntoResponse, OpenAiError> {
    let (api, pipeline) = parts(&state)?;
    let who = authenticate(api, peer, &method, &uri, &headers, &body)?;
    let TopUp { amount_msat } = serde_json::from_slice(&body)
        .map_err(|e| OpenAiError::invalid(format!("expected {{\"amount_msat\": <msat>}}: {e}")))?;
    // A refused amount costs no invoice, so it takes no token from the flood limit.
    check_top_up(amount_msat, api.max_topup_msat)
        .map_err(|e| OpenAiError::invalid(e.to_string()))?;
    if !api.topups.try_take_at(Instant::now()) {
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
