//! The local API's errors: each says what went wrong in words a user can act on, and maps to
//! one HTTP status, so a client (the CNI plugin, the CLI) can tell its own mistake from the
//! daemon's.

use axum::{
    Json,
    extract::rejection::{JsonRejection, PathRejection, QueryRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use tapestry_api::types::ErrorBody;

use crate::guests::EndpointError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or names something impossible (400).
    #[error("{0}")]
    BadRequest(String),
    /// Something the request names does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The request collides with another in progress or with the node's limits (409).
    #[error("{0}")]
    Conflict(String),
    /// The daemon cannot serve this now; try again later (503).
    #[error("{0}")]
    Unavailable(String),
    /// The daemon failed (500).
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

impl From<EndpointError> for ApiError {
    fn from(e: EndpointError) -> Self {
        match e {
            EndpointError::Invalid(m) => ApiError::BadRequest(m),
            EndpointError::NotFound(m) => ApiError::NotFound(m),
            EndpointError::Conflict(m) => ApiError::Conflict(m),
            EndpointError::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError::BadRequest(format!("request body: {}", r.body_text()))
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::BadRequest(format!("request path: {}", r.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::BadRequest(format!("query: {}", r.body_text()))
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        ApiError::Internal(anyhow::anyhow!("the request's worker thread failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_own_status() {
        let cases = [
            (ApiError::BadRequest("x".into()), 400),
            (ApiError::NotFound("x".into()), 404),
            (ApiError::Conflict("x".into()), 409),
            (ApiError::Unavailable("x".into()), 503),
            (ApiError::Internal(anyhow::anyhow!("x")), 500),
        ];
        for (e, code) in cases {
            assert_eq!(e.status().as_u16(), code, "{e:?}");
        }
        let e: ApiError = EndpointError::Invalid("bad mac".into()).into();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let e: ApiError = EndpointError::Conflict("busy".into()).into();
        assert_eq!(e.status(), StatusCode::CONFLICT);
    }
}
