//! The one place errors become HTTP statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

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
            WalletError::Refused(_) | WalletError::InsufficientBalance { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
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
