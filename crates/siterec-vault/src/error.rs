//! The vault's API error: an HTTP status plus an ARM error body
//! `{"error": {"code", "message"}}`.
//!
//! Business errors are 4xx (the Azure SDK retries POSTs on 500/503/504, so a
//! refusal must never look like a transient failure). Unexpected failures
//! (database, I/O) are logged with their context and answered with 500.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn not_found(what: &str, name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            format!("{what} '{name}' was not found; list them to see the names that exist"),
        )
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "Conflict", message)
    }
    /// A failure of the vault itself: the error is logged with its
    /// context, the client is told only where it happened (never the
    /// database's or the parser's text) and to look in the vault's log.
    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!("{context}: {err}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("the vault failed reading or writing {context}; the vault's log says why"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = siterec_api::ErrorResponse {
            error: siterec_api::ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::internal("database", e)
    }
}

impl From<siterec_core::names::NameError> for ApiError {
    fn from(e: siterec_core::names::NameError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_errors_reach_clients_as_a_code_and_a_message_without_their_text() {
        let e = ApiError::from(sqlx::Error::Protocol(
            "relation \"registration_keys\" does not exist".into(),
        ));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(e.code, "InternalError");
        assert!(!e.message.contains("registration_keys"), "{}", e.message);
        assert!(
            e.message.contains("database") && e.message.contains("log"),
            "{}",
            e.message
        );
    }
}
