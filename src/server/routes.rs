//! The routes, with the body-size limit applied.

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use axum::Router;

use super::handlers;
use super::state::AppState;

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
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}
