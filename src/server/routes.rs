//! The routes, with the body-size limit and the body-read deadline applied.

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::error::ApiError;
use super::handlers;
use super::state::AppState;

/// Unknown paths get an OpenAI-style JSON 404, like every other error.
async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

/// A known path with the wrong method gets a JSON 405.
async fn method_not_allowed(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take this method", uri.path()),
    )
}

/// The whole body must arrive within `body_timeout` (a client sending a byte every few seconds
/// would otherwise hold its connection and handler forever) and within the size limit; handlers
/// then read it from memory.
async fn read_body_in_time(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let limits = state.limits;
    let (parts, body) = request.into_parts();
    let collect = Limited::new(body, limits.max_body_bytes).collect();
    match tokio::time::timeout(limits.body_timeout, collect).await {
        Ok(Ok(collected)) => {
            let request = Request::from_parts(parts, Body::from(collected.to_bytes()));
            next.run(request).await
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than the limit of {} bytes",
                limits.max_body_bytes
            ),
        )
        .into_response(),
        Ok(Err(e)) => ApiError::bad_request(format!("the request body could not be read: {e}"))
            .into_response(),
        Err(_) => {
            let mut response = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    limits.body_timeout.as_secs_f64()
                ),
            )
            .into_response();
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            response
        }
    }
}

/// Every route of the server over `state`.
pub fn router(state: AppState) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/health", get(handlers::health))
        .route("/ready", get(handlers::ready))
        .route("/v1/models", get(handlers::models))
        .route("/metrics", get(handlers::metrics))
        .route(
            "/v1/steering",
            get(handlers::list_steering).post(handlers::register_steering),
        )
        .route("/v1/steering/{name}", delete(handlers::unregister_steering))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            read_body_in_time,
        ))
        .with_state(state)
}
