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
//!
//! `request.rs` reads and checks the body; `super::open` opens the paid call (shared with
//! `/v1/jobs`); this module runs it and answers.

mod request;

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::api::{parts, OpenAiError, ReadBody};
use super::open::{add_receipt, admit, open, Admitted, Opened};
use super::HttpState;
use crate::infer::FinishReason;
use crate::job::direct::{live_channel, Finished, LiveEvent};
use crate::job::{Door, Job, Pipeline};
use request::ChatRequest;

/// The NIP-90 kind a chat completion is metered as.
const TEXT_GENERATION: u16 = 5050;

pub(super) async fn completions(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Result<Response, OpenAiError> {
    let who = match admit(&state, peer, &method, &uri, &headers, &body).await? {
        Admitted::Call(who) => who,
        Admitted::Answered(response) => return Ok(response),
    };
    let (_, pipeline) = parts(&state)?;
    let request: ChatRequest = serde_json::from_slice(&body)
        .map_err(|e| OpenAiError::invalid(format!("not a chat completion request: {e}")))?;
    let stream = request.stream;
    let generation = request.generation(&pipeline.inner.config.limits)?;
    let (live, rx) = live_channel(generation.max_tokens);
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
        Some(live),
    )
    .await?;
    let mut answer = Answer::of(pipeline, &job, receipt);
    answer.session = session;
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
