//! The HTTP server (`onnx-steer serve`): OpenAI-compatible completions with steering per request,
//! served by one engine thread that batches concurrent requests.
//!
//! A chat request, file by file: [`routes`] → [`handlers`] (`chat_completions`: body →
//! [`openai`] types → chat template → [`images`] → `prepare`: limits, sampling, steering from
//! the [`registry`]) → a job in the [`engine`]'s queue (the engine owns the model and a
//! [`RunningBatch`](crate::generate::RunningBatch), whose rows pick tokens with
//! [`Sampling`](crate::generate::Sampling)) → the engine's events → a JSON body, or
//! server-sent events ([`stream`]); [`choices`] shapes each choice's log-probabilities.
//! [`error`] shapes failures as OpenAI does; [`metrics`] counts;
//! [`listen`] accepts connections, with header and idle timeouts.

pub mod choices;
pub mod engine;
pub mod error;
pub mod handlers;
pub mod images;
pub mod listen;
pub mod metrics;
pub mod openai;
pub mod registry;
pub mod routes;
pub mod state;
pub mod stream;

pub use error::ApiError;
pub use listen::serve;
pub use routes::router;
pub use state::{AppState, Limits, ServerError};
