//! Request extractors whose rejections are JSON errors with a stable code.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ApiErrorCode};

/// `Json<T>` with errors in our shape.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(match &rejection {
                JsonRejection::MissingJsonContentType(_) => ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    ApiErrorCode::UnsupportedMediaType,
                    "send the body as JSON with Content-Type: application/json",
                ),
                JsonRejection::BytesRejection(_)
                    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE =>
                {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        ApiErrorCode::PayloadTooLarge,
                        "request body too large",
                    )
                }
                _ => ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ApiErrorCode::InvalidRequest,
                    rejection.body_text(),
                ),
            }),
        }
    }
}

/// A validated organization id from the path.
pub struct OrgId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for OrgId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(org) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e| ApiError::invalid(e.body_text()))?;
        if org.is_empty() || org.chars().count() > 128 || org.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                "organization id must be 1 to 128 characters",
            ));
        }
        Ok(OrgId(org))
    }
}
