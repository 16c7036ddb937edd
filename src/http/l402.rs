//! The L402 door: who a `/v1` call is (an npub by NIP-98, an L402 token, or nobody yet), the
//! 402 challenges that sell tokens, and the token endpoints.
//!
//! - A call with no credential is priced first (a bad request gets 400, not an invoice), then
//!   answered 402 with `WWW-Authenticate: LSAT …` and `L402 …` (the same macaroon and invoice)
//!   for its quote rounded up to whole sats; the change stays on the token for later calls.
//! - `Authorization: L402|LSAT|Bearer <macaroon>:<preimage>` spends from the token's account
//!   (its payment hash) once the signature, preimage and caveats check out and our wallet has
//!   confirmed the payment. A token that runs dry gets a new challenge for the call.
//! - `POST /v1/l402/token {"amount_msat"}` answers 402 for that amount: a prepaid token.
//!   `GET /v1/l402/balance` shows what a token has left.
//!
//! - The same 402 offers the HTTP `Payment` scheme (`WWW-Authenticate: Payment …`, method
//!   `lightning`, intent `charge`; [`crate::mpp`]) for the same invoice. `Authorization:
//!   Payment <credential>` is accepted once per challenge; the answer carries `Payment-Receipt`.
//!   What the call leaves stays on the payment hash's account (the L402 credential of the same
//!   402 spends or withdraws it). A refused `Payment` credential gets a fresh challenge and the
//!   draft's problem type. Every 402 is `Cache-Control: no-store`.
//! - Where the wallet can refund to an invoice that names no amount, the same 402 also offers
//!   intent `session` with the same invoice as its deposit ([`super::session`]).
//!
//! Challenges cost an invoice and a stored record each, so they share a token bucket overall
//! and one per client address (`X-Forwarded-For` counts only from `[http] trusted_proxies`; see
//! [`super::api::Proxies`]).

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::Json;
use base64::Engine;
use nostr_sdk::PublicKey;
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{authorized, parts, ApiConfig, OpenAiError, ReadBody};
use super::lnurl::InvoiceLimiter;
use super::HttpState;
use crate::job::account::check_top_up;
use crate::job::tokens::{ChallengeError, PaymentRefusal, PaymentScheme, TokenRefusal};
use crate::job::Pipeline;
use crate::l402::{self, Credential, CredentialError, Grant, Use};
use crate::ledger::Account;
use crate::limits::Buckets;
use crate::mpp;
use crate::wallet::WalletError;

/// Client addresses a per-address bucket is kept for; when full, buckets that have refilled
/// are dropped, and a new address beyond that is limited.
const MAX_TRACKED_CLIENTS: usize = 65_536;

/// The L402 settings and per-process state.
pub struct L402Door {
    root_key: [u8; 32],
    /// Binds HTTP `Payment` challenge ids (derived from the root key).
    payment_key: [u8; 32],
    /// The HTTP `Payment` `realm`: the host of `[http] public_url`, or `dvmd`.
    realm: String,
    token_lifetime_secs: u64,
    overall: InvoiceLimiter,
    per_client: PerClient,
}

impl L402Door {
    /// From `[http]` and the root key in the data dir.
    pub fn new(http: &crate::config::HttpSection, root_key: [u8; 32]) -> Self {
        let realm = http
            .public_url
            .as_deref()
            .and_then(|url| reqwest::Url::parse(url).ok())
            .and_then(|url| url.host_str().map(str::to_owned))
            .unwrap_or_else(|| "dvmd".to_owned());
        Self {
            payment_key: derive_key(&root_key, b"dvmd http payment challenge ids"),
            realm,
            root_key,
            token_lifetime_secs: http.l402_token_lifetime_secs,
            overall: InvoiceLimiter::per_minute(http.max_challenges_per_minute),
            per_client: PerClient::per_minute(http.max_challenges_per_ip_per_minute),
        }
    }
}

impl L402Door {
    /// The key that binds HTTP `Payment` challenge ids.
    pub(super) fn payment_key(&self) -> &[u8] {
        &self.payment_key
    }
}

fn derive_key(root_key: &[u8], purpose: &[u8]) -> [u8; 32] {
    use bitcoin::hashes::{sha256, Hash, HashEngine, Hmac, HmacEngine};
    let mut engine = HmacEngine::<sha256::Hash>::new(root_key);
    engine.input(purpose);
    Hmac::<sha256::Hash>::from_engine(engine).to_byte_array()
}

/// One token bucket per client address (see [`crate::limits::address_key`]).
pub(super) struct PerClient(Buckets<IpAddr>);

impl PerClient {
    pub(super) fn per_minute(per_minute: u32) -> Self {
        let burst = f64::from(per_minute.max(1));
        Self(Buckets::new(burst, burst / 60.0, MAX_TRACKED_CLIENTS))
    }

    pub(super) fn try_take(&self, client: IpAddr, now: Instant) -> bool {
        self.0.try_take(crate::limits::address_key(client), now)
    }
}

/// Who is calling.
pub(super) enum Who {
    /// An npub that signed with NIP-98.
    Npub(PublicKey),
    /// An L402 credential, not yet checked against the call.
    Token(Box<Credential>),
    /// An HTTP `Payment` credential, not yet checked.
    Payment(Box<mpp::Credential>),
    /// An HTTP `Payment` credential that does not parse (refused with a fresh challenge once
    /// the call is priced).
    BadPayment(mpp::Refusal),
    /// No credential: the answer is a challenge.
    Nobody,
}

/// A call's caller and address.
pub(super) struct Caller {
    pub(super) who: Who,
    pub(super) client: IpAddr,
    /// The NIP-98 auth event of a signed call. The job the call opens takes its id, so the
    /// same signed call made again (the replay cache forgets at a restart, and the event stays
    /// inside its window for a minute) finds that job instead of opening and charging another.
    pub(super) signed: Option<nostr_sdk::EventId>,
    /// The call's `Idempotency-Key`, for callers that do not sign (L402, `Payment`): the job
    /// the call opens takes an id derived from it and the paying account, so the call retried
    /// with the same key finds that job instead of opening and charging another.
    pub(super) idempotency: Option<String>,
}

/// The longest `Idempotency-Key` taken.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The call's `Idempotency-Key`: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, OpenAiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key)
            if (1..=MAX_IDEMPOTENCY_KEY).contains(&key.len())
                && key.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(key.to_owned()))
        }
        _ => Err(OpenAiError::invalid(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
        ))),
    }
}

/// A new job from an npub the operator blocked is refused (403); its account stays readable
/// and withdrawable.
pub(super) fn refuse_blocked(
    pipeline: &crate::job::Pipeline,
    caller: &Caller,
) -> Result<(), OpenAiError> {
    match &caller.who {
        Who::Npub(npub) if pipeline.trust().tier(npub) == crate::trust::Tier::Blocked => {
            Err(OpenAiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "blocked",
                "this service takes no jobs from this key; its balance can still be withdrawn"
                    .to_owned(),
            ))
        }
        _ => Ok(()),
    }
}

/// Read the caller: NIP-98 (`Nostr`), L402 (`L402`, `LSAT`, `Bearer`), or none.
pub(super) fn caller(
    api: &ApiConfig,
    peer: SocketAddr,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Caller, OpenAiError> {
    let client = api.proxies.client(peer.ip(), headers);
    let mut signed = None;
    let who = match headers.get(header::AUTHORIZATION) {
        None => Who::Nobody,
        Some(value) => {
            let text = value.to_str().unwrap_or_default();
            if headers.get_all(header::AUTHORIZATION).iter().count() > 1 {
                return Err(OpenAiError::invalid(
                    "send one Authorization header".to_owned(),
                ));
            }
            match (
                mpp::parse_authorization(text),
                l402::parse_authorization(text),
            ) {
                (Some(Ok(credential)), _) => Who::Payment(Box::new(credential)),
                (Some(Err(e)), _) => Who::BadPayment(e),
                (None, Some(Ok(credential))) => Who::Token(Box::new(credential)),
                (None, Some(Err(e))) => return Err(refused(e)),
                (None, None) => {
                    let authorized = authorized(api, peer, method, uri, headers, body)?;
                    signed = Some(authorized.event_id);
                    Who::Npub(authorized.pubkey)
                }
            }
        }
    };
    Ok(Caller {
        who,
        client,
        signed,
        idempotency: idempotency_key(headers)?,
    })
}

fn refused(e: CredentialError) -> OpenAiError {
    let mut error = OpenAiError::new(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "invalid_l402",
        e.to_string(),
    );
    error.challenges = vec!["L402".to_owned(), "Nostr".to_owned()];
    error
}

/// A refused HTTP `Payment` credential: 402 with the draft's problem type (beside the OpenAI
/// error), and the fresh challenge `fresh` when there is one.
pub(super) fn payment_refused(e: &mpp::Refusal, fresh: Option<OpenAiError>) -> OpenAiError {
    let (kind, title) = e.problem();
    let status = match e {
        mpp::Refusal::Unsupported(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::PAYMENT_REQUIRED,
    };
    let mut error = match fresh {
        // No challenge could be issued (too many just now, the wallet is down): say that.
        Some(fresh) if fresh.status() != StatusCode::PAYMENT_REQUIRED => return fresh,
        Some(fresh) if status == StatusCode::PAYMENT_REQUIRED => fresh,
        _ => OpenAiError::new(
            status,
            "authentication_error",
            "invalid_payment",
            String::new(),
        ),
    };
    error.set_message(e.to_string());
    error.problem = Some(Box::new((kind, title)));
    error
}

/// The account an HTTP `Payment` credential pays into (`spend`: the call may run, and the
/// challenge is used up), with its receipt; or the refusal, with a fresh challenge for
/// `quote_msat` when there is a call to sell.
pub(super) async fn payment_account(
    api: &ApiConfig,
    pipeline: &Pipeline,
    client: IpAddr,
    credential: &mpp::Credential,
    quote_msat: Option<u64>,
) -> Result<(Account, Option<String>), OpenAiError> {
    match pipeline
        .payment_account(credential, quote_msat.is_some())
        .await
    {
        Ok((account, hash)) => {
            let receipt = quote_msat.map(|_| {
                mpp::receipt(
                    &credential.challenge.id,
                    &hash,
                    crate::job::pipeline::unix_now(),
                )
            });
            Ok((account, receipt))
        }
        Err(PaymentRefusal::Book(e)) => Err(OpenAiError::unavailable("store", &e)),
        Err(PaymentRefusal::Credential(e)) => {
            Err(refuse_payment(api, pipeline, client, &e, quote_msat).await)
        }
    }
}

/// A refused HTTP `Payment` credential, with a fresh challenge for `quote_msat` when there is a
/// call to sell.
pub(super) async fn refuse_payment(
    api: &ApiConfig,
    pipeline: &Pipeline,
    client: IpAddr,
    e: &mpp::Refusal,
    quote_msat: Option<u64>,
) -> OpenAiError {
    let fresh = match quote_msat {
        Some(quote) => {
            let why = format!("this call is quoted {quote} msat");
            Some(challenge(api, pipeline, client, quote, quote, &why).await)
        }
        None => None,
    };
    payment_refused(e, fresh)
}

/// The account a token spends from for a call quoted `quote_msat` (`None`: no call; see
/// [`Use::quote_msat`]), or why not.
pub(super) async fn token_account(
    api: &ApiConfig,
    pipeline: &Pipeline,
    credential: &Credential,
    quote_msat: Option<u64>,
) -> Result<Account, OpenAiError> {
    let call = Use {
        now: crate::job::pipeline::unix_now(),
        model: &pipeline.inner.config.model,
        quote_msat,
    };
    credential
        .verify(&api.l402.root_key, call)
        .map_err(refused)?;
    let account = pipeline
        .l402_account(&credential.id)
        .await
        .map_err(|e| match e {
            TokenRefusal::Book(e) => OpenAiError::unavailable("store", &e),
            e => {
                let mut error = OpenAiError::new(
                    StatusCode::UNAUTHORIZED,
                    "authentication_error",
                    "invalid_l402",
                    e.to_string(),
                );
                error.challenges = vec!["L402".to_owned()];
                error
            }
        })?;
    if quote_msat.is_some() && credential.narrowed() {
        // The preimage every L402 credential carries is, once the payment opened an HTTP
        // `Payment` session, that session's bearer secret (the draft's `bearer` needs nothing
        // else): caveats cannot bind a holder who has it, so a narrowed token of such a
        // payment is refused rather than trusted to stay within them.
        let session = pipeline
            .session(&credential.id.payment_hash)
            .await
            .map_err(|e| OpenAiError::unavailable("store", &e))?;
        if session.is_some() {
            return Err(OpenAiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "narrowed_session_token",
                "this token's payment opened an HTTP Payment session, which its preimage spends \
                 whole: caveats added to its macaroon cannot bind it. Narrow a token bought for \
                 L402 only"
                    .to_owned(),
            ));
        }
    }
    Ok(account)
}

/// A 402 selling a token of `amount_msat` (rounded up to whole sats, at least 1), whose calls
/// may each be quoted up to `budget_msat`; 429 when the challenge buckets are empty.
pub(super) async fn challenge(
    api: &ApiConfig,
    pipeline: &Pipeline,
    client: IpAddr,
    amount_msat: u64,
    budget_msat: u64,
    why: &str,
) -> OpenAiError {
    let now = Instant::now();
    if !api.l402.per_client.try_take(client, now) || !api.l402.overall.try_take_at(now) {
        return OpenAiError::rate_limited(format!(
            "{why}, and too many payment challenges were issued just now; retry in a minute"
        ));
    }
    let amount_msat = amount_msat.div_ceil(1000).max(1) * 1000;
    let grant = Grant {
        valid_until: crate::job::pipeline::unix_now() + api.l402.token_lifetime_secs,
        model: pipeline.inner.config.model.clone(),
        budget_msat: budget_msat.max(amount_msat),
    };
    let scheme = PaymentScheme {
        key: &api.l402.payment_key,
        realm: &api.l402.realm,
    };
    let issued = pipeline
        .l402_challenge(&api.l402.root_key, scheme, amount_msat, grant.clone())
        .await;
    let challenge = match issued {
        Ok(challenge) => challenge,
        Err(ChallengeError::Wallet(e @ WalletError::InvalidInvoice(_))) => {
            return OpenAiError::invalid(e.to_string())
        }
        Err(ChallengeError::Wallet(e)) => return OpenAiError::unavailable("wallet", &e),
        Err(ChallengeError::Book(e)) => return OpenAiError::unavailable("store", &e),
    };
    let bolt11 = &challenge.invoice.bolt11;
    let macaroon = base64::engine::general_purpose::STANDARD.encode(challenge.macaroon.to_bytes());
    let mut error = OpenAiError::new(
        StatusCode::PAYMENT_REQUIRED,
        "insufficient_quota",
        "payment_required",
        format!(
            "{why}: pay the invoice ({} msat), then send `Authorization: L402 <macaroon>:<preimage>` (or use `<macaroon>:<preimage>` as the API key), or answer the `Payment` challenge",
            challenge.invoice.amount_msat
        ),
    );
    error.challenges = l402::challenges(&challenge.macaroon, bolt11).to_vec();
    for payment in challenge.payment.iter().chain(challenge.session.iter()) {
        error.challenges.push(payment.header());
    }
    error.extra = Some(Box::new((
        "l402",
        json!({
            "macaroon": macaroon,
            "invoice": bolt11,
            "payment_hash": challenge.invoice.payment_hash.to_string(),
            "amount_msat": challenge.invoice.amount_msat,
            "budget_msat": grant.budget_msat,
            "valid_until": grant.valid_until,
        }),
    )));
    error
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Prepaid {
    amount_msat: u64,
}

/// `POST /v1/l402/token {"amount_msat"}`: 402 selling a prepaid token of that value.
pub(super) async fn buy(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Result<Json<Value>, OpenAiError> {
    let (api, pipeline) = parts(&state)?;
    let Prepaid { amount_msat } = serde_json::from_slice(&body)
        .map_err(|e| OpenAiError::invalid(format!("expected {{\"amount_msat\": <msat>}}: {e}")))?;
    check_top_up(amount_msat, api.max_topup_msat)
        .map_err(|e| OpenAiError::invalid(e.to_string()))?;
    let client = api.proxies.client(peer.ip(), &headers);
    let why = format!("a prepaid token of {amount_msat} msat");
    Err(challenge(api, pipeline, client, amount_msat, amount_msat, &why).await)
}

/// `GET /v1/l402/balance`: what an L402 token has left (or the account an HTTP `Payment`
/// credential paid into: the credential proves it, and is not used up by asking).
pub(super) async fn balance(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Json<Value>, OpenAiError> {
    let (api, pipeline) = parts(&state)?;
    let text = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let client = api.proxies.client(peer.ip(), &headers);
    let (account, hash) = match (
        mpp::parse_authorization(text),
        l402::parse_authorization(text),
    ) {
        (Some(Ok(credential)), _) => {
            let (account, _) = payment_account(api, pipeline, client, &credential, None).await?;
            (account, credential.payment_hash())
        }
        (Some(Err(e)), _) => return Err(payment_refused(&e, None)),
        (None, Some(Ok(credential))) => (
            token_account(api, pipeline, &credential, None).await?,
            credential.id.payment_hash,
        ),
        (None, Some(Err(e))) => return Err(refused(e)),
        (None, None) => {
            return Err(refused(CredentialError::Malformed(
                "send Authorization: L402 <macaroon>:<preimage> (or a Payment credential)"
                    .to_owned(),
            )))
        }
    };
    let balance_msat = pipeline
        .balance_of(account)
        .await
        .map_err(|e| OpenAiError::unavailable("store", &e))?;
    Ok(Json(json!({
        "object": "l402_balance",
        "payment_hash": hash.to_string(),
        "balance_msat": balance_msat,
    })))
}

/// The account a caller owns jobs on, for `GET /v1/jobs/{id}`.
pub(super) async fn owner(
    api: &ApiConfig,
    pipeline: &Pipeline,
    caller: Caller,
) -> Result<Account, OpenAiError> {
    match caller.who {
        Who::Npub(who) => Ok(who.into()),
        Who::Token(credential) => token_account(api, pipeline, &credential, None).await,
        Who::Payment(credential) => {
            payment_account(api, pipeline, caller.client, &credential, None)
                .await
                .map(|(account, _)| account)
        }
        Who::BadPayment(e) => Err(payment_refused(&e, None)),
        Who::Nobody => Err(refused(CredentialError::Malformed(
            "sign with NIP-98 or send the L402 credential the job was paid with".to_owned(),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_ipv6_slash_64_is_one_client() {
        let limits = PerClient::per_minute(2);
        let now = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let other: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert!(limits.try_take(a, now));
        assert!(limits.try_take(b, now));
        assert!(!limits.try_take(a, now), "the /64 has used its two");
        assert!(limits.try_take(other, now), "another /64 has its own");
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().expect("ip");
        assert_eq!(
            crate::limits::address_key(mapped),
            "192.0.2.1".parse::<IpAddr>().expect("ip")
        );
    }
}
