//! `POST /v1/chat/completions`: OpenAI's chat completions, billed to the npub that signs the
//! call with NIP-98, or paid with L402 (see [`super::l402`]).
//!
//! The call is validated and priced like a kind 5050 job, then opened on the caller's account
//! (the whole quote reserved, durably, before any byte of the answer; see [`crate::job::direct`]).
//! An npub whose balance does not cover the quote gets a 402 with a top-up invoice for the
//! shortfall; a call with no credential, or a token that ran dry, gets an L402 challenge.
//! `stream: true` answers in server-sent events, OpenAI's chunks, then a chunk with `usage`
//! (always sent, whether or not `stream_options.include_usage` asks), then `[DONE]`; a client
//! that goes away stops the generation and is charged for what was generated. Every answer names
//! its job and charge in a `dvmd` object beside OpenAI's fields, and in `X-Dvmd-Job`.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use std::net::SocketAddr;

use axum::extract::ConnectInfo;

use super::account::shortfall;
use super::api::{parts, OpenAiError, ReadBody};
use super::l402::{caller, challenge, payment_account, refuse_payment, token_account, Caller, Who};
use super::HttpState;
use crate::infer::{ChatMessage, FinishReason, GenerateRequest, Sampling};
use crate::job::direct::{Finished, HttpPayer, LiveEvent, OpenError, LIVE_BUFFER};
use crate::job::{Door, Job, JobId, Pipeline};
use crate::ledger::Account;
use crate::nip90::{RequestError, TextGeneration, TextGenerationLimits};

/// The NIP-90 kind a chat completion is metered as.
const TEXT_GENERATION: u16 = 5050;

/// The request fields dvmd reads; the rest of OpenAI's schema is accepted and ignored, except
/// the ones that would change the answer in ways it cannot honour (`n` above 1, `stop`, tools).
#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<InMessage>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    #[serde(default)]
    stream: bool,
    n: Option<u32>,
    stop: Option<Value>,
    tools: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Content,
}

#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
    #[default]
    None,
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

impl ChatRequest {
    /// The generation this asks for, checked against the operator's limits.
    fn generation(self, limits: &TextGenerationLimits) -> Result<TextGeneration, OpenAiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(param("n", "only n = 1 is served"));
        }
        if self.stop.as_ref().is_some_and(|stop| !stop.is_null()) {
            return Err(param("stop", "stop sequences are not supported"));
        }
        if self.tools.as_ref().is_some_and(|tools| !tools.is_null()) {
            return Err(param("tools", "tools are not supported"));
        }
        if self.messages.is_empty() {
            return Err(param("messages", "at least one message is required"));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        let mut bytes = 0usize;
        for message in self.messages {
            let role = match message.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(param(
                        "messages",
                        &format!("role `{other}` is not supported"),
                    ))
                }
            };
            let content = match message.content {
                Content::Text(text) => text,
                Content::None => String::new(),
                Content::Parts(parts) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(piece)) => text.push_str(&piece),
                            (kind, _) => {
                                return Err(param(
                                    "messages",
                                    &format!("content of type `{kind}` is not supported"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            bytes += content.len();
            messages.push(ChatMessage {
                role: role.to_owned(),
                content,
            });
        }
        if bytes > limits.max_prompt_bytes {
            return Err(param(
                "messages",
                &format!(
                    "the messages hold {bytes} bytes; at most {} are accepted",
                    limits.max_prompt_bytes
                ),
            ));
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => limits.default_max_tokens,
            Some(n) if (1..=limits.max_tokens_limit).contains(&n) => n,
            Some(n) => {
                return Err(param(
                    "max_tokens",
                    &format!("{n} is outside 1..={}", limits.max_tokens_limit),
                ))
            }
        };
        let temperature = in_range("temperature", self.temperature, 0.0..=2.0)?;
        let top_p = in_range("top_p", self.top_p, 0.0..=1.0)?;
        let seed = match self.seed {
            None => None,
            Some(seed) => Some(
                u32::try_from(seed)
                    .map_err(|_| param("seed", "must be a whole number in 0..2^32"))?,
            ),
        };
        Ok(TextGeneration {
            request: GenerateRequest {
                continue_from: None,
                model: self.model,
                messages,
                sampling: Sampling {
                    temperature,
                    top_p,
                    top_k: None,
                    seed,
                },
            },
            max_tokens,
        })
    }
}

fn in_range(
    name: &str,
    value: Option<f32>,
    range: std::ops::RangeInclusive<f32>,
) -> Result<Option<f32>, OpenAiError> {
    match value {
        Some(v) if !v.is_finite() || !range.contains(&v) => Err(param(
            name,
            &format!("{v} is outside {}..={}", range.start(), range.end()),
        )),
        value => Ok(value),
    }
}

fn param(name: &str, reason: &str) -> OpenAiError {
    OpenAiError::invalid(format!("`{name}`: {reason}"))
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
pub(super) async fn open(
    state: &HttpState,
    caller: Caller,
    door: Door,
    kind: u16,
    generation: TextGeneration,
    bid_msat: Option<u64>,
    answer_now: bool,
) -> Result<Opened, OpenAiError> {
    let (api, pipeline) = parts(state)?;
    // A token narrowed to a budget a call bids it: the call is reserved and charged within it.
    let budget = match &caller.who {
        Who::Token(credential) => credential.budget_msat(),
        _ => None,
    };
    let bid_msat = match (bid_msat, budget) {
        (Some(bid), Some(budget)) => Some(bid.min(budget)),
        (bid, budget) => bid.or(budget),
    };
    let priced = pipeline
        .price_http(kind, generation, bid_msat)
        .await
        .map_err(|e| match budget {
            Some(budget) if bid_msat == Some(budget) => OpenAiError::invalid(format!(
                "this token allows {budget} msat a call (its dvmd_budget_msat caveat): {e}"
            )),
            _ => refused(e),
        })?;
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
    match pipeline
        .open_http(
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
            &priced,
            answer_now,
        )
        .await
    {
        Ok(job) => Ok(Opened {
            job,
            receipt,
            session: priced.request.session,
        }),
        Err(OpenError::Shortfall {
            quote_msat,
            balance_msat,
        }) => Err(match &caller.who {
            Who::Npub(who) => shortfall(api, pipeline, *who, quote_msat, balance_msat).await,
            Who::Payment(_) if priced.request.session.is_some() => {
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
        .with_estimate(&priced.estimate)),
        Err(OpenError::Book(crate::job::BookError::SessionClosed(_))) => {
            let refused = refuse_payment(
                api,
                pipeline,
                caller.client,
                &crate::mpp::Refusal::SessionClosed,
                Some(quote),
            )
            .await;
            Err(refused.with_estimate(&priced.estimate))
        }
        Err(OpenError::Book(crate::job::BookError::ChallengeUsed(_))) => {
            let used = crate::mpp::Refusal::UnknownChallenge;
            let refused = refuse_payment(api, pipeline, caller.client, &used, Some(quote)).await;
            Err(refused.with_estimate(&priced.estimate))
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
    }
}

pub(super) async fn completions(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Result<Response, OpenAiError> {
    let (api, pipeline) = parts(&state)?;
    let who = caller(api, peer, &method, &uri, &headers, &body)?;
    if let Some(answered) = super::session::action(&state, &who).await {
        return answered;
    }
    super::l402::refuse_blocked(pipeline, &who)?;
    let request: ChatRequest = serde_json::from_slice(&body)
        .map_err(|e| OpenAiError::invalid(format!("not a chat completion request: {e}")))?;
    let stream = request.stream;
    let generation = request.generation(&pipeline.inner.config.limits)?;
    let Opened {
        job,
        receipt,
        session,
    } = open(
        &state,
        who,
        Door::HttpChat,
        TEXT_GENERATION,
        generation,
        None,
        stream,
    )
    .await?;
    let mut answer = Answer::of(pipeline, &job, receipt);
    answer.session = session;
    let (live, rx) = mpsc::channel(LIVE_BUFFER);
    pipeline.run_http(job, Some(live)).await;
    Ok(if stream {
        answer.stream(rx)
    } else {
        answer.whole(rx).await?
    })
}

/// What every answer to one call shares.
#[derive(Clone)]
struct Answer {
    id: String,
    job: String,
    model: String,
    created: u64,
    /// The `Payment-Receipt` (an HTTP `Payment` credential paid for the call).
    receipt: Option<String>,
    /// The HTTP `Payment` session that pays: a stream then says `payment-need-topup`,
    /// `session-timeout` and `payment-receipt` as the draft's events.
    session: Option<crate::wallet::PaymentHash>,
}

impl Answer {
    fn of(pipeline: &Pipeline, job: &Job, receipt: Option<String>) -> Self {
        Self {
            id: format!("chatcmpl-{}", job.id),
            job: job.id.to_hex(),
            model: pipeline.inner.config.model.clone(),
            created: job.received_at,
            receipt,
            session: None,
        }
    }

    fn header(&self, response: &mut Response) {
        add_receipt(response, self.receipt.as_deref());
        if let Ok(value) = HeaderValue::from_str(&self.job) {
            response.headers_mut().insert("x-dvmd-job", value);
        }
    }

    /// Wait for the whole answer, then write it.
    async fn whole(self, mut rx: mpsc::Receiver<LiveEvent>) -> Result<Response, OpenAiError> {
        let mut text = String::new();
        while let Some(event) = rx.recv().await {
            match event {
                LiveEvent::Text(piece) => text.push_str(&piece),
                LiveEvent::Failed(reason) => return Err(failed(reason)),
                // A whole answer has no way to say it; it waits, or ends at what was said.
                LiveEvent::NeedTopUp(_) | LiveEvent::SessionTimeout(_) => {}
                LiveEvent::Done(finished) => {
                    let body = json!({
                        "id": self.id,
                        "object": "chat.completion",
                        "created": self.created,
                        "model": self.model,
                        "choices": [{
                            "index": 0,
                            "message": { "role": "assistant", "content": text },
                            "logprobs": null,
                            "finish_reason": finish_reason(finished.finish),
                        }],
                        "usage": usage(&finished),
                        "dvmd": dvmd(&finished),
                    });
                    let mut response = Json(body).into_response();
                    self.header(&mut response);
                    return Ok(response);
                }
            }
        }
        Err(failed(
            "the worker stopped before the answer was complete".to_owned(),
        ))
    }

    /// Answer in server-sent events as the pieces come.
    fn stream(self, rx: mpsc::Receiver<LiveEvent>) -> Response {
        let first = self.chunk(json!({ "role": "assistant", "content": "" }), None);
        let answer = self.clone();
        let events = futures::stream::unfold((Some(rx), Some(first)), move |(rx, first)| {
            let answer = answer.clone();
            async move {
                if let Some(first) = first {
                    return Some((Ok::<_, Infallible>(first), (rx, None)));
                }
                let mut rx = rx?;
                let bytes = match rx.recv().await {
                    Some(LiveEvent::Text(piece)) => answer.chunk(json!({ "content": piece }), None),
                    Some(LiveEvent::NeedTopUp(wait)) => {
                        named("payment-need-topup", &topup_json(&wait))
                    }
                    Some(LiveEvent::SessionTimeout(wait)) => {
                        named("session-timeout", &topup_json(&wait))
                    }
                    Some(LiveEvent::Done(finished)) => {
                        let mut last = answer.chunk(json!({}), Some(finished.finish)).to_vec();
                        let usage = json!({
                            "id": answer.id,
                            "object": "chat.completion.chunk",
                            "created": answer.created,
                            "model": answer.model,
                            "choices": [],
                            "usage": usage(&finished),
                            "dvmd": dvmd(&finished),
                        });
                        last.extend_from_slice(&sse(&usage));
                        if let Some(session) = &answer.session {
                            let job = &finished.job;
                            let receipt = json!({
                                "method": crate::mpp::METHOD,
                                "reference": session.to_string(),
                                "status": "success",
                                "timestamp": crate::mpp::rfc3339(crate::job::pipeline::unix_now()),
                                "spent": crate::mpp::spent_sats(job.charge_msat.unwrap_or(0)),
                                "spentMsat": job.charge_msat.unwrap_or(0),
                                "units": job.usage.map_or(0, |u| u.completion_tokens),
                            });
                            last.extend_from_slice(&named("payment-receipt", &receipt));
                        }
                        last.extend_from_slice(b"data: [DONE]\n\n");
                        return Some((Ok(Bytes::from(last)), (None, None)));
                    }
                    Some(LiveEvent::Failed(reason)) => {
                        let error = json!({ "error": {
                            "message": reason, "type": "server_error", "code": "job_failed", "param": null
                        }});
                        return Some((Ok(sse(&error)), (None, None)));
                    }
                    None => return None,
                };
                Some((Ok(bytes), (Some(rx), None)))
            }
        });
        let mut response = Response::new(Body::from_stream(events));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        self.header(&mut response);
        response
    }

    fn chunk(&self, delta: Value, finish: Option<FinishReason>) -> Bytes {
        sse(&json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": null,
                "finish_reason": finish.map(finish_reason),
            }],
        }))
    }
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// A named server-sent event.
fn named(event: &str, value: &Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {value}\n\n"))
}

/// The draft's `payment-need-topup` and `session-timeout` data.
fn topup_json(wait: &crate::job::direct::TopUpWait) -> Value {
    json!({
        "sessionId": wait.session.to_string(),
        "balanceSpent": wait.spent_sats,
        "balanceRequired": wait.required_sats,
    })
}

fn failed(reason: String) -> OpenAiError {
    OpenAiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "job_failed",
        reason,
    )
}

fn finish_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(finished: &Finished) -> Value {
    let usage = finished.job.usage.unwrap_or_default();
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    })
}

/// The money side of an answer.
fn dvmd(finished: &Finished) -> Value {
    let job = &finished.job;
    let charged = job.charge_msat.unwrap_or(0);
    json!({
        "job": job.id.to_hex(),
        "quote_msat": job.quote_msat,
        "estimate": job.estimate.as_ref().map(super::error::estimate_json),
        "charge_msat": charged,
        "released_msat": job.funds_msat().saturating_sub(charged),
        "receipt": job.receipt,
        "pay_after": job.pay_after.then(|| super::jobs::owed_invoice(job)),
    })
}
