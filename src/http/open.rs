//! Opening a paid HTTP call on the caller's account, for every door that runs a job over HTTP
//! (`/v1/chat/completions`, `/v1/jobs`): the credential read (NIP-98, L402, HTTP `Payment`),
//! the quote reserved before any answer (see [`crate::job::direct`]), and the refusals as the
//! API says them (a 402 with a top-up invoice or a challenge, 401, 409 for a call that ran).

use std::net::SocketAddr;

use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;

use super::account::shortfall;
use super::api::{parts, OpenAiError};
use super::l402::{
    caller, challenge, payment_account, refuse_blocked, refuse_payment, token_account, Caller, Who,
};
use super::HttpState;
use crate::job::direct::{HttpPayer, LiveSink, OpenError};
use crate::job::{Door, Job, JobId};
use crate::ledger::Account;
use crate::nip90::{RequestError, TextGeneration};

/// Who calls a door that runs a job, and whether the call goes on.
pub(super) enum Admitted {
    /// The caller, not blocked: price the call and [`open`] it.
    Call(Caller),
    /// An HTTP `Payment` session's `topUp` or `close`, answered already (it runs no job).
    Answered(Response),
}

/// The preamble every door that runs a job shares, in this order: the credential read (a bad
/// one refused), a session's `topUp` or `close` answered, a blocked npub refused.
pub(super) async fn admit(
    state: &HttpState,
    peer: SocketAddr,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Admitted, OpenAiError> {
    let (api, pipeline) = parts(state)?;
    let who = caller(api, peer, method, uri, headers, body)?;
    if let Some(answered) = super::session::action(state, &who).await {
        return answered.map(Admitted::Answered);
    }
    refuse_blocked(pipeline, &who)?;
    Ok(Admitted::Call(who))
}

/// `Payment-Receipt` on an answer an HTTP `Payment` credential paid for; such an answer is for
/// that payer only (`Cache-Control: private`, as the draft requires).
pub(super) fn add_receipt(response: &mut Response, receipt: Option<&str>) {
    let Some(Ok(value)) = receipt.map(HeaderValue::from_str) else {
        return;
    };
    let headers = response.headers_mut();
    headers.insert("payment-receipt", value);
    let cache = match headers.get(header::CACHE_CONTROL) {
        Some(existing) if existing == "no-cache" => "private, no-cache",
        _ => "private",
    };
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
}

/// What pricing refused, as the API says it.
pub(super) fn refused(e: RequestError) -> OpenAiError {
    match e {
        RequestError::UnknownModel { asked, served } => OpenAiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("model `{asked}` is not served here; use `{served}`"),
        ),
        RequestError::Unavailable(incident) => OpenAiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "unavailable",
            format!("the model cannot price this right now; retry later ({incident})"),
        ),
        e => OpenAiError::invalid(e.to_string()),
    }
}

/// A job opened, with the `Payment-Receipt` its answer carries when an HTTP `Payment`
/// credential paid for it.
pub(super) struct Opened {
    pub(super) job: Job,
    pub(super) receipt: Option<String>,
    /// The HTTP `Payment` session that pays, if one does.
    pub(super) session: Option<crate::wallet::PaymentHash>,
}

/// Open an HTTP job on the caller's account, or say why not: a 402 with a top-up invoice for an
/// npub whose balance is short, an L402 and `Payment` challenge for a caller with no credential
/// or a token that ran dry, 401 for a credential that does not hold (402 for a `Payment` one).
#[allow(clippy::too_many_arguments)]
pub(super) async fn open(
    state: &HttpState,
    caller: Caller,
    door: Door,
    kind: u16,
    generation: TextGeneration,
    bid_msat: Option<u64>,
    answer_now: bool,
    live: Option<LiveSink>,
) -> Result<Opened, OpenAiError> {
    let (api, pipeline) = parts(state)?;
    // A token narrowed to a budget a call bids it: the call is reserved and charged within it.
    let budget = match &caller.who {
        Who::Token(credential) => credential.budget_msat(),
        _ => None,
    };
    let bid = |sold: Option<u64>| match (bid_msat, sold) {
        (Some(bid), Some(sold)) => Some(bid.min(sold)),
        (bid, sold) => bid.or(sold),
    };
    let priced = pipeline
        .price_http(kind, generation, bid(budget))
        .await
        .map_err(|e| match budget {
            Some(budget) if bid(Some(budget)) == Some(budget) => OpenAiError::invalid(format!(
                "this token allows {budget} msat a call (its dvmd_budget_msat caveat): {e}"
            )),
            _ => refused(e),
        })?;
    // A `charge` credential paid for its call at the quote of its 402. The estimator moves with
    // every job that ends, so the same call may be quoted a little more by the time the paid
    // retry arrives: within a quarter more, it runs within what was paid (stopping there if it
    // must) rather than being refused with a second 402 for the whole quote while the first
    // payment sits on its hash. A call quoted further above it (a bigger call than the one the
    // challenge sold) still gets its 402.
    //
    // The sold amount is read from the echo before the credential is checked against the
    // challenge issued: a made-up one only lowers what this call may cost, and is then refused
    // with the rest.
    let sold = match &caller.who {
        Who::Payment(credential) => credential.charge_msat(),
        _ => None,
    };
    let priced = match sold {
        Some(sold) if priced.quote_msat > sold && priced.quote_msat <= sold + sold / 4 => {
            let quoted = priced.clone();
            priced.within(sold).unwrap_or(quoted)
        }
        _ => priced,
    };
    let mut priced = priced;
    let quote = priced.quote_msat;
    let mut receipt = None;
    let account = match &caller.who {
        Who::Payment(credential) if credential.action != crate::mpp::Action::Charge => {
            let paid = super::session::account(api, pipeline, caller.client, credential, quote)
                .await
                .unwrap_or_else(|| {
                    Err(OpenAiError::invalid(
                        "a topUp or close credential pays for no call".to_owned(),
                    ))
                });
            let paid = paid.map_err(|e| e.with_estimate(&priced.estimate))?;
            priced.request.session = Some(paid.session);
            receipt = Some(paid.receipt);
            paid.account
        }
        Who::Npub(who) => Account::from(*who),
        Who::Token(credential) => token_account(api, pipeline, credential, Some(quote))
            .await
            .map_err(|e| e.with_estimate(&priced.estimate))?,
        Who::Payment(credential) => {
            let (account, paid) =
                payment_account(api, pipeline, caller.client, credential, Some(quote))
                    .await
                    .map_err(|e| e.with_estimate(&priced.estimate))?;
            receipt = paid;
            account
        }
        Who::BadPayment(e) => {
            let refused = refuse_payment(api, pipeline, caller.client, e, Some(quote)).await;
            return Err(refused.with_estimate(&priced.estimate));
        }
        Who::Nobody => {
            let estimate = &priced.estimate;
            let why = format!(
                "this call is quoted {quote} msat (expected {} msat, 90% within {} msat, {}% confidence, at most {} msat)",
                estimate.p50_msat, estimate.p90_msat, estimate.confidence, estimate.cap_msat
            );
            let challenged = challenge(api, pipeline, caller.client, quote, quote, &why).await;
            return Err(challenged.with_estimate(&priced.estimate));
        }
    };
    let (estimate, session) = (priced.estimate, priced.request.session);
    match pipeline
        .start_http(
            caller.signed.map(JobId::from).or_else(|| {
                let key = caller.idempotency.as_deref()?;
                Some(JobId::idempotent(&account.key(), key))
            }),
            HttpPayer {
                account,
                charge: match &caller.who {
                    Who::Payment(credential) if credential.action == crate::mpp::Action::Charge => {
                        Some(credential.challenge.id.clone())
                    }
                    _ => None,
                },
            },
            door,
            kind,
            priced,
            answer_now,
            live,
        )
        .await
    {
        Ok(job) => Ok(Opened {
            job,
            receipt,
            session,
        }),
        Err(OpenError::Shortfall {
            quote_msat,
            balance_msat,
        }) => Err(match &caller.who {
            Who::Npub(who) => {
                shortfall(api, pipeline, *who, caller.client, quote_msat, balance_msat).await
            }
            Who::Payment(_) if session.is_some() => {
                let why = crate::mpp::Refusal::InsufficientBalance(format!(
                    "this session has {balance_msat} msat; this call needs at least {quote_msat} msat to start (its prompt and one token): top it up"
                ));
                refuse_payment(api, pipeline, caller.client, &why, Some(quote)).await
            }
            _ => {
                let why = format!(
                    "this token has {balance_msat} msat left and this call is quoted {quote_msat} msat"
                );
                challenge(api, pipeline, caller.client, quote, quote, &why).await
            }
        }
        .with_estimate(&estimate)),
        Err(OpenError::Book(crate::job::BookError::SessionClosed(_))) => {
            let refused = refuse_payment(
                api,
                pipeline,
                caller.client,
                &crate::mpp::Refusal::SessionClosed,
                Some(quote),
            )
            .await;
            Err(refused.with_estimate(&estimate))
        }
        Err(OpenError::Book(crate::job::BookError::ChallengeUsed(_))) => {
            let used = crate::mpp::Refusal::UnknownChallenge;
            let refused = refuse_payment(api, pipeline, caller.client, &used, Some(quote)).await;
            Err(refused.with_estimate(&estimate))
        }
        Err(OpenError::Book(crate::job::BookError::JobExists(id))) => Err(OpenAiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "already_ran",
            format!(
                "this request (its signature, or its Idempotency-Key) already opened job {id} (GET /v1/jobs/{id} shows it); sign a new request, or use a new key, to run it again"
            ),
        )),
        Err(OpenError::Book(e)) => Err(OpenAiError::unavailable("store", &e)),
        Err(e @ OpenError::Interrupted(_)) => Err(OpenAiError::unavailable("opening a job", &e)),
    }
}
