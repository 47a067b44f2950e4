//! The routes, with the body-size limit applied.

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use axum::Router;

use axum::http::{StatusCode, Uri};

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

/// Every route of the server over `state`.
pub fn router(state: AppState) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/health", get(handlers::health))
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
        .with_state(state)
}
