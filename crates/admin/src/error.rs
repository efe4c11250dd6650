//! API errors: a stable code and a human message; the cause is logged, not returned.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The stable error codes of the admin API (`error.code`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApiErrorCode {
    Unauthorized,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    ProviderNotConfigured,
    ReturnToNotAllowed,
    NotConfigured,
    SenderNotAllowed,
    InvalidSender,
    ConnectionUnknown,
    ConnectionUsed,
    ConnectionExpired,
    NotFound,
    Internal,
}

impl ApiErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiErrorCode::Unauthorized => "unauthorized",
            ApiErrorCode::InvalidRequest => "invalid_request",
            ApiErrorCode::PayloadTooLarge => "payload_too_large",
            ApiErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ApiErrorCode::ProviderNotConfigured => "provider_not_configured",
            ApiErrorCode::ReturnToNotAllowed => "return_to_not_allowed",
            ApiErrorCode::NotConfigured => "not_configured",
            ApiErrorCode::SenderNotAllowed => "sender_not_allowed",
            ApiErrorCode::InvalidSender => "invalid_sender",
            ApiErrorCode::ConnectionUnknown => "connection_unknown",
            ApiErrorCode::ConnectionUsed => "connection_used",
            ApiErrorCode::ConnectionExpired => "connection_expired",
            ApiErrorCode::NotFound => "not_found",
            ApiErrorCode::Internal => "internal",
        }
    }
}

/// The error body of every failed request.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, for programs.
    pub code: ApiErrorCode,
    /// For people.
    pub message: String,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ApiErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ApiErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ApiErrorCode::InvalidRequest,
            message,
        )
    }

    /// An unexpected failure: logged with its cause, answered opaquely.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "admin request failed");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ApiErrorCode::Internal,
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
