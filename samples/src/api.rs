//! What both HTTP APIs share: JSON errors with the CONTRACT's status codes, and a JSON body extractor that tells
//! malformed JSON (400) from well-formed JSON with invalid values (422).

use axum::Json;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

/// An error answered as `{"error": "<message>"}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// 400: the body is not JSON.
    pub fn malformed(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into() }
    }

    /// 404: no such resource.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self { status: StatusCode::NOT_FOUND, message: message.into() }
    }

    /// 422: well-formed, but a value is invalid.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self { status: StatusCode::UNPROCESSABLE_ENTITY, message: message.into() }
    }

    /// 503: the database (or bus) cannot be reached; the details go to the log, not to the client.
    pub fn unavailable(error: &dyn std::error::Error) -> Self {
        tracing::error!(%error, "request failed");
        Self { status: StatusCode::SERVICE_UNAVAILABLE, message: "the service cannot reach its database".into() }
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        Self::unavailable(&error)
    }
}

impl From<outbox::OutboxError> for ApiError {
    fn from(error: outbox::OutboxError) -> Self {
        Self::unavailable(&error)
    }
}

/// A JSON request body. Unlike `axum::Json` it does not insist on a `Content-Type` header (curl users forget
/// it), and it answers 400 for a body that is not JSON, 422 for JSON of the wrong shape (missing field, wrong
/// type, number out of range), naming the problem.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::malformed(format!("cannot read the body: {e}")))?;
        // Syntax first (400), then shape (422): `[1,` is malformed even though its first value has the wrong type.
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| ApiError::malformed(format!("malformed JSON: {e}")))?;
        T::deserialize(value).map(JsonBody).map_err(|e| ApiError::invalid(e.to_string()))
    }
}

/// Parses an id from the path; anything that is not a UUID cannot name a resource, so it is a 404 too.
///
/// # Errors
/// 404 naming `what`.
pub fn parse_id(what: &str, raw: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(raw).map_err(|_| ApiError::not_found(format!("no {what} {raw:?}")))
}

/// Checks a name-like field: 1 to 200 characters, not only blanks.
///
/// # Errors
/// 422 naming `field`.
pub fn check_name(field: &str, value: &str) -> Result<(), ApiError> {
    let chars = value.chars().count();
    if value.trim().is_empty() || chars > 200 {
        return Err(ApiError::invalid(format!("{field} must be 1 to 200 characters, not only blanks (got {chars})")));
    }
    Ok(())
}
