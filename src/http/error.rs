//! The one place errors become HTTP statuses: [`ApiError`] for the service endpoints and
//! [`OpenAiError`] (OpenAI's shape, with the challenges of a 401 or 402) for `/v1`.

use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::nip98::AuthError;

use crate::incident::Incident;
use crate::wallet::WalletError;

/// An error answered as `{"error": reason}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    reason: String,
}

impl ApiError {
    /// 400 with `reason`.
    pub fn bad_request(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            reason: reason.into(),
        }
    }
}

impl From<WalletError> for ApiError {
    fn from(e: WalletError) -> Self {
        let status = match &e {
            WalletError::InvalidInvoice(_) => StatusCode::BAD_REQUEST,
            WalletError::Refused(_)
            | WalletError::Declined(_)
            | WalletError::NotFound(_)
            | WalletError::InsufficientBalance { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            WalletError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            WalletError::Store(crate::store::StoreError::WriterFailed(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            WalletError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let reason = match &e {
            // About the customer's own input: theirs to read.
            WalletError::InvalidInvoice(_)
            | WalletError::Refused(_)
            | WalletError::Declined(_)
            | WalletError::NotFound(_)
            | WalletError::InsufficientBalance { .. } => e.to_string(),
            // The wallet's or the store's insides: the log gets them.
            WalletError::Unavailable(_) | WalletError::Store(_) => format!(
                "the wallet is unavailable right now ({})",
                Incident::log("wallet", &e)
            ),
        };
        Self { status, reason }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.reason }))).into_response()
    }
}

/// What a 429 tells the caller to wait, seconds.
const RETRY_AFTER_SECS: u64 = 60;

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
