//! The `/v1` API for programs: the OpenAI-shaped door to the same pipeline, book and ledger the
//! relays use.
//!
//! - `GET /v1/models`: the model served and its prices (no auth).
//! - `GET /v1/account`, `POST /v1/account/topup`, `/v1/account/settings`: the caller's own
//!   account ([`super::account`], NIP-98).
//! - `POST /v1/chat/completions` ([`super::chat`]) and `POST /v1/jobs`, `GET /v1/jobs/{id}`
//!   ([`super::jobs`]): jobs billed to the caller's npub (NIP-98); 402 with a top-up invoice
//!   for the shortfall when the balance does not cover the quote.
//!
//! NIP-98 events are checked against `[http] public_url` plus the request's path and query
//! (see [`super::nip98`]). Errors ([`super::error::OpenAiError`]) have OpenAI's shape, `{"error": {"message", "type", "code"}}`,
//! with the status that says what to do: 401 (sign again), 402 (pay `top_up`, then sign
//! again), 400/404/413 (fix the request), 429 (wait `Retry-After` seconds), 503 (the wallet or
//! store is down; retry later).

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nostr_sdk::Timestamp;
use serde_json::json;

pub use super::error::OpenAiError;
use super::lnurl::InvoiceLimiter;
use super::nip98::{AuthError, Authorized, Verifier};
use super::HttpState;
use crate::job::Pipeline;

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
    /// Top-up invoices for one client address: one client cannot spend everyone's.
    pub(super) topups_per_client: super::l402::PerClient,
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
            HeaderValue::from_static("authorization, content-type, idempotency-key"),
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
            topups_per_client: super::l402::PerClient::per_minute(
                http.max_topups_per_ip_per_minute,
            ),
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
        .route("/v1/account", get(super::account::account))
        .route("/v1/account/topup", post(super::account::topup))
        .route("/v1/account/withdraw", post(super::withdraw::withdraw))
        .route("/v1/account/settings", post(super::account::settings))
        .route("/admin/withdraw", post(super::withdraw::admin_withdraw))
        .route(
            "/admin/trust",
            get(super::admin::trust_show).post(super::admin::trust_set),
        )
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

/// Who signed this request (NIP-98), checked against its public URL, method and body, and the
/// auth event's id.
pub(super) fn authorized(
    api: &ApiConfig,
    peer: SocketAddr,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Authorized, OpenAiError> {
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
    match api.verifier.verify(
        api.proxies.client(peer.ip(), headers),
        header,
        &url,
        method.as_str(),
        body,
        Timestamp::now(),
    ) {
        Ok(authorized) => Ok(authorized),
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
