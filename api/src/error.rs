//! The one API error type: every failure leaves the control plane as an ARM error body
//! `{"error":{"code","message","target","details"}}` with the matching HTTP status.
//!
//! Internal failures (storage, I/O) are logged with their detail and answered with a generic
//! message: the detail never reaches the client.

use axum::{
    Json,
    http::{HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use serde::Serialize;

use crate::engine::registry::ValidationError;

/// The `error` object of an ARM error response.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable code, e.g. `ResourceNotFound`.
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// The offending part of the request (JSON path or parameter name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Nested errors.
    #[serde(default)]
    pub details: Vec<ErrorDetail>,
}

/// An ARM error response body.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorDetail,
}

/// A failed request: status plus ARM error detail.
#[derive(Debug, thiserror::Error)]
#[error("{status} {}: {}", detail.code, detail.message)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// The ARM error object.
    pub detail: ErrorDetail,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            detail: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
                target: None,
                details: Vec::new(),
            },
        }
    }

    /// Sets the `target`.
    pub fn with_target(mut self, target: impl Into<String>) -> Self {
        self.detail.target = Some(target.into());
        self
    }

    /// 400 with `code`.
    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 `ResourceNotFound`.
    pub fn not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            format!("The resource '{id}' was not found."),
        )
    }

    /// 412 `PreconditionFailed`.
    pub fn precondition_failed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            message,
        )
    }

    /// 401 `InvalidAuthenticationToken` (or another 401 code).
    pub fn unauthorized(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 403 `AuthorizationFailed`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "AuthorizationFailed", message)
    }

    /// 500: logs `detail` (never returned) and answers a generic message.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            "An internal error occurred; see the server log.",
        )
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        Self::bad_request("InvalidRequestContent", e.message).with_target(e.target)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(ErrorResponse {
                error: self.detail.clone(),
            }),
        )
            .into_response();
        // ARM clients read the code from this header when the body is not parsed.
        if let Ok(v) = HeaderValue::from_str(&self.detail.code) {
            response.headers_mut().insert("x-ms-failure-cause", v);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                "www-authenticate",
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
        }
        response
    }
}
