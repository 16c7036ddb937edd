//! `POST /v1/jobs` and `GET /v1/jobs/{id}`: a NIP-90 job as JSON, billed to the npub that
//! signs the call with NIP-98.
//!
//! The body is a job as a relay request carries it: `kind`, `inputs` (`[{"value", "type"}]`,
//! the `i` tags), `params` (`{name: value}`, the `param` tags) and an optional `bid_msat`. It is
//! validated by the kind's profile, priced by the same estimator, and opened on the caller's
//! balance like a chat completion (402 with a top-up invoice when short). The answer is 202 with
//! the job's id; the job runs on the workers, resumes after a restart, and its state, charge and
//! result are read with `GET /v1/jobs/{id}` by the npub that created it (anyone else gets 404).

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use std::net::SocketAddr;

use axum::extract::ConnectInfo;

use super::api::{parts, OpenAiError, ReadBody};
use super::l402::{caller, owner};
use super::open::{admit, open, Admitted};
use super::HttpState;
use crate::job::{Door, Job, JobId};
use crate::nip90::{InputType, JobInput, TextGeneration};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewJob {
    kind: u16,
    inputs: Vec<NewInput>,
    #[serde(default)]
    params: BTreeMap<String, Value>,
    bid_msat: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewInput {
    value: String,
    #[serde(rename = "type", default = "text")]
    kind: String,
}

fn text() -> String {
    "text".to_owned()
}

pub(super) async fn create(
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
    let new: NewJob = serde_json::from_slice(&body).map_err(|e| {
        OpenAiError::invalid(format!(
            "expected {{\"kind\", \"inputs\": [{{\"value\", \"type\"}}], \"params\": {{}}, \"bid_msat\"}}: {e}"
        ))
    })?;
    let config = &pipeline.inner.config;
    if !config.kinds.contains(&new.kind) {
        return Err(OpenAiError::invalid(format!(
            "kind {} is not served here; served: {:?}",
            new.kind, config.kinds
        )));
    }
    let inputs: Vec<JobInput> = new
        .inputs
        .into_iter()
        .map(|input| JobInput {
            value: input.value,
            input_type: InputType::parse(&input.kind),
            relay: None,
            marker: None,
        })
        .collect();
    let mut params = Vec::with_capacity(new.params.len());
    for (name, value) in new.params {
        let value = match value {
            Value::String(text) => text,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => {
                return Err(OpenAiError::invalid(format!(
                    "param `{name}`: {other} is not a string, number or boolean"
                )))
            }
        };
        params.push((name, value));
    }
    let generation = TextGeneration::from_parts(&inputs, &params, &config.limits)
        .map_err(super::open::refused)?;
    let super::open::Opened { job, receipt, .. } = open(
        &state,
        who,
        Door::HttpJob,
        new.kind,
        generation,
        new.bid_msat,
        true,
        None,
    )
    .await?;
    let location = format!("/v1/jobs/{}", job.id);
    let view = view(&job);
    let mut response = (StatusCode::ACCEPTED, Json(view)).into_response();
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    super::open::add_receipt(&mut response, receipt.as_deref());
    Ok(response)
}

pub(super) async fn show(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<Value>, OpenAiError> {
    let (api, pipeline) = parts(&state)?;
    let who = owner(
        api,
        pipeline,
        caller(api, peer, &method, &uri, &headers, &[])?,
    )
    .await?;
    let not_found = || {
        OpenAiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "job_not_found",
            format!("you have no job {id}"),
        )
    };
    let job_id = JobId::from_hex(&id).ok_or_else(not_found)?;
    let job = pipeline
        .http_job(&job_id, &who)
        .await
        .map_err(|e| OpenAiError::unavailable("store", &e))?
        .ok_or_else(not_found)?;
    Ok(Json(view(&job)))
}

/// A job as the API shows it to its owner.
fn view(job: &Job) -> Value {
    let charged = job.charge_msat;
    json!({
        "object": "job",
        "id": job.id.to_hex(),
        "door": job.door.as_str(),
        "kind": job.kind,
        "state": job.state.as_str(),
        "reason": job.reason,
        "quote_msat": job.quote_msat,
        "estimate": job.estimate.as_ref().map(super::error::estimate_json),
        "reserved_msat": job.credit_msat,
        "held_msat": job.held_msat,
        "charge_msat": charged,
        "released_msat": charged.map(|c| job.funds_msat().saturating_sub(c)),
        "usage": job.usage,
        "receipt": job.receipt,
        "pay_after": job.pay_after.then(|| owed_invoice(job)),
        "result": job.result,
        "created_at": job.received_at,
        "updated_at": job.updated_at,
    })
}

/// What a pay-after job owes and the invoice that pays it (`null` until it ran).
pub(super) fn owed_invoice(job: &Job) -> Value {
    json!({
        "owed_msat": job.charge_msat,
        "bolt11": job.invoice.as_ref().map(|invoice| invoice.bolt11.clone()),
        "payment_hash": job.invoice.as_ref().map(|invoice| invoice.payment_hash.to_string()),
    })
}
