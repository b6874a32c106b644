//! Errors as HTTP responses in the OpenAI shape: `{"error":{"message","type","code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use performer::Error as RtError;
use performer_engine::Error;

/// An HTTP error: status, OpenAI `type` and `code`, and a message.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// OpenAI's error `type`.
    pub kind: &'static str,
    /// A short machine-readable code.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code,
            message: message.into(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "code": self.code,
        }})
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, kind, code) = match &e {
            Error::Runtime(r) => match r {
                RtError::InvalidParameter { .. } => {
                    (400, "invalid_request_error", "invalid_parameter")
                }
                RtError::EmptyInput(_) => (400, "invalid_request_error", "empty_input"),
                RtError::Tokenizer(_) => (400, "invalid_request_error", "tokenizer"),
                RtError::ChatTemplate(_) => (400, "invalid_request_error", "chat_template"),
                RtError::InvalidConstraint { .. } => {
                    (400, "invalid_request_error", "invalid_constraint")
                }
                RtError::TokenOutOfRange { .. } => {
                    (400, "invalid_request_error", "token_out_of_range")
                }
                RtError::PositionOutOfRange { .. } => {
                    (400, "invalid_request_error", "context_length_exceeded")
                }
                RtError::InvalidSnapshot(_) => (400, "invalid_request_error", "invalid_snapshot"),
                RtError::StateMismatch(_) => {
                    (422, "invalid_request_error", "snapshot_model_mismatch")
                }
                _ => (500, "server_error", "internal_error"),
            },
            Error::QueueFull { .. } => (429, "rate_limit_error", "queue_full"),
            Error::SessionBusy(_) => (409, "conflict_error", "session_busy"),
            Error::SessionNotFound(_) => (404, "not_found_error", "session_not_found"),
            Error::VersionConflict { .. } => (409, "conflict_error", "version_conflict"),
            Error::ShuttingDown => (503, "server_error", "shutting_down"),
            Error::StoreUnavailable(_) => (503, "server_error", "store_unavailable"),
            Error::SessionStorage(_) => (507, "server_error", "session_storage"),
            Error::InsufficientStorage(_) => (507, "server_error", "insufficient_storage"),
            Error::TenantQueueFull { .. } => (429, "rate_limit_error", "tenant_queue_full"),
            _ => (500, "server_error", "internal_error"),
        };
        ApiError {
            status: StatusCode::from_u16(status).expect("valid status"),
            kind,
            code,
            message: e.to_string(),
        }
    }
}

impl From<RtError> for ApiError {
    fn from(e: RtError) -> Self {
        Error::from(e).into()
    }
}

/// The reason a request was refused, as the `rejected_requests` metric labels it; every error
/// response carries it as an extension and the request-counting middleware counts it. Server
/// faults (500) are not rejections and carry none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rejected(pub &'static str);

impl ApiError {
    /// The metric label of this error, `None` for a server fault.
    fn rejection(&self) -> Option<&'static str> {
        Some(match self.status.as_u16() {
            400 | 422 => "invalid",
            401 => "unauthorized",
            404 => "not_found",
            // session_busy or version_conflict
            409 => self.code,
            405 => "method_not_allowed",
            413 => "too_large",
            429 => "queue_full",
            503 | 507 => self.code,
            _ => return None,
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(reason) = self.rejection() {
            r.extensions_mut().insert(Rejected(reason));
        }
        // Worth retrying after a second: a full queue, a session store that is down (the next
        // request reconnects), the upload budget spent.
        if self.status == StatusCode::TOO_MANY_REQUESTS
            || matches!(self.code, "store_unavailable" | "uploads_busy")
        {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}
