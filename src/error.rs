//! The one table that turns a failed stage into an HTTP response.
//!
//! Every stage returns its own small error enum; [`ProxyError`] collects them and
//! [`IntoResponse`] maps each to a status code and a Prometheus-style JSON body
//! (`{"status":"error","errorType":…,"error":…}`) so Grafana shows the message.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::admission::Shed;
use crate::app::AdminError;
use crate::cache::CacheError;
use crate::identity::IdentityError;
use crate::limits::LimitError;
use crate::policy::SwitchError;
use crate::policy::verdict::Refused;
use crate::request::RequestError;
use crate::upstream::UpstreamError;

/// Where a failure came from, for logs and the `origin` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The caller sent something we refuse or cannot understand.
    Client,
    /// A backend failed, was slow, or answered nonsense.
    Upstream,
}

impl Origin {
    /// The `origin` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Client => "client",
            Origin::Upstream => "upstream",
        }
    }
}

/// Any reason the pipeline answers a request itself instead of with backend data.
/// `Clone` because requests that share one upstream call share its failure too.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// Credentials that cannot be verified (401, with `WWW-Authenticate`).
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A request promguard refuses to forward: bad parameters, a path it does not
    /// serve, a query over the scan's bounds (400, 403, 404 or 405).
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The caller is over a per-user budget (429 with `Retry-After`).
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// The backend's gate shed the request (503 with `Retry-After`).
    #[error(transparent)]
    Shed(#[from] Shed),
    /// A policy rule of the mode in force refuses the query, or an upstream call
    /// the cache cannot do without (422 `execution`, as Prometheus refuses a query,
    /// so Grafana shows it on the panel).
    #[error(transparent)]
    Policy(#[from] Refused),
    /// The backend call failed: unreachable (503), timed out (504), answer too large
    /// (422) or not an API answer (502).
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Waiting on a fetch shared with other requests failed (500, 504).
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// An admin call was refused.
    #[error(transparent)]
    Admin(#[from] AdminError),
}

impl ProxyError {
    /// Who is at fault, for the request log and the `origin` label: the caller, or
    /// what promguard depends on (a backend; the disk, for a switch it cannot save).
    pub fn origin(&self) -> Origin {
        match self {
            ProxyError::Identity(_)
            | ProxyError::Request(_)
            | ProxyError::Limit(_)
            | ProxyError::Policy(_) => Origin::Client,
            ProxyError::Admin(AdminError::Switch(SwitchError::Persist(_))) => Origin::Upstream,
            ProxyError::Admin(_) => Origin::Client,
            ProxyError::Shed(_) | ProxyError::Cache(_) => Origin::Upstream,
            ProxyError::Upstream(e) if e.is_client_fault() => Origin::Client,
            ProxyError::Upstream(_) => Origin::Upstream,
        }
    }

    /// Status code and Prometheus `errorType` for this error.
    fn classify(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::Identity(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ProxyError::Request(e) => match e {
                RequestError::Forbidden { .. } => (StatusCode::FORBIDDEN, "forbidden"),
                RequestError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
                RequestError::MethodNotAllowed { .. } => {
                    (StatusCode::METHOD_NOT_ALLOWED, "bad_data")
                }
                _ => (StatusCode::BAD_REQUEST, "bad_data"),
            },
            ProxyError::Limit(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            ProxyError::Shed(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            // 422 and "execution", as Prometheus answers a query it refuses to run:
            // Grafana shows the message on the panel.
            ProxyError::Policy(_) => (StatusCode::UNPROCESSABLE_ENTITY, "execution"),
            ProxyError::Admin(e) => match e {
                AdminError::Disabled => (StatusCode::FORBIDDEN, "forbidden"),
                AdminError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
                AdminError::Switch(SwitchError::Persist(_)) => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "internal")
                }
                AdminError::Reload(_) => (StatusCode::UNPROCESSABLE_ENTITY, "bad_data"),
                AdminError::Warm(_) => (StatusCode::CONFLICT, "unavailable"),
                AdminError::Body(_)
                | AdminError::Unaudited
                | AdminError::Duration(_)
                | AdminError::Switch(_) => (StatusCode::BAD_REQUEST, "bad_data"),
            },
            ProxyError::Cache(CacheError::Lost) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ProxyError::Cache(CacheError::Waited { .. }) => {
                (StatusCode::GATEWAY_TIMEOUT, "timeout")
            }
            ProxyError::Upstream(e) => match e {
                UpstreamError::Unavailable { .. } => {
                    (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
                }
                UpstreamError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
                UpstreamError::TooLarge { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "execution"),
                UpstreamError::InvalidResponse { .. } | UpstreamError::Transport { .. } => {
                    (StatusCode::BAD_GATEWAY, "unavailable")
                }
            },
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let (status, error_type) = self.classify();
        let mut response = error_response(status, error_type, &self.to_string());
        let retry_after = match &self {
            ProxyError::Limit(e) => Some(e.retry_after()),
            ProxyError::Shed(e) => Some(e.retry_after),
            _ => None,
        };
        let headers = response.headers_mut();
        if let Some(after) = retry_after {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(after.as_secs().max(1)),
            );
        }
        if matches!(self, ProxyError::Identity(_)) {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"promguard\""),
            );
        }
        if matches!(self, ProxyError::Admin(AdminError::Unauthorized)) {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"promguard admin\""),
            );
        }
        response
    }
}

/// A Prometheus API error body with the given status.
pub fn error_response(status: StatusCode, error_type: &str, message: &str) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        Bytes::from(error_body(error_type, message)),
    )
        .into_response()
}

/// The Prometheus API's JSON error shape, for answers written outside axum too
/// (the server's refusal of a connection past its bound).
pub fn error_body(error_type: &str, message: &str) -> Vec<u8> {
    /// Field order as Prometheus writes it, so the body reads the same.
    #[derive(serde::Serialize)]
    struct ErrorBody<'a> {
        status: &'static str,
        #[serde(rename = "errorType")]
        error_type: &'a str,
        error: &'a str,
    }
    serde_json::to_vec(&ErrorBody {
        status: "error",
        error_type,
        error: message,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(response: Response) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn request_errors_are_bad_data_with_the_message() {
        let err = ProxyError::from(RequestError::InvalidParam {
            param: "step",
            reason: "zero or negative".into(),
        });
        assert_eq!(err.origin(), Origin::Client);
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body = body_json(response).await;
        assert_eq!(body["status"], "error");
        assert_eq!(body["errorType"], "bad_data");
        assert!(body["error"].as_str().unwrap().contains("\"step\""));
    }

    #[tokio::test]
    async fn upstream_timeouts_name_the_backend() {
        let err = ProxyError::from(UpstreamError::Timeout {
            backend: "long_term",
            after_ms: 1500,
        });
        assert_eq!(err.origin(), Origin::Upstream);
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        let body = body_json(response).await;
        assert_eq!(body["errorType"], "timeout");
        assert!(body["error"].as_str().unwrap().contains("long_term"));
    }

    #[tokio::test]
    async fn overload_answers_carry_retry_after() {
        let shed = Shed {
            backend: "recent",
            class: crate::admission::Class::Explore,
            why: crate::admission::ShedReason::QueueFull,
            in_flight: 16,
            queued: 64,
            retry_after: std::time::Duration::from_secs(5),
        };
        let response = ProxyError::from(shed).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "5");
        let body = body_json(response).await;
        assert!(body["error"].as_str().unwrap().contains("shedding load"));
    }

    #[tokio::test]
    async fn identity_errors_ask_for_credentials() {
        let response = ProxyError::from(IdentityError::BadCredentials).into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
    }
}
