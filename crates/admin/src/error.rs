//! API errors: a stable code and a human message; the cause is logged, not returned.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The error body of every failed request.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, for programs: `unauthorized`, `invalid_request`, `payload_too_large`,
    /// `unsupported_media_type`, `provider_not_configured`, `return_to_not_allowed`,
    /// `not_configured`, `sender_not_allowed`, `invalid_sender`, `connection_unknown`,
    /// `connection_used`, `connection_expired`, `not_found`, `internal`.
    pub code: &'static str,
    /// For people.
    pub message: String,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    /// An unexpected failure: logged with its cause, answered opaquely.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "admin request failed");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "internal",
            "the service could not complete the request; try again",
        )
    }
}

impl From<mail_dispatch_store::StoreError> for ApiError {
    fn from(e: mail_dispatch_store::StoreError) -> Self {
        ApiError::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: ErrorDetail {
                    code: self.code,
                    message: self.message,
                },
            }),
        )
            .into_response()
    }
}
