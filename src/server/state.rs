//! [`AppState`]: what every handler shares (the engine handle, the tokenizer, the registry, the
//! limits, the metrics), cheap to clone.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::engine::EngineHandle;
use super::metrics::Metrics;
use super::registry::SteeringRegistry;
use crate::bundle::ModelConfig;
use crate::runtime::Runtime;
use crate::steer::SteerError;
use crate::text::TextCodec;
use crate::vision::VisionEncoder;

/// Limits a request must stay within.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Tokens generated when a request does not say.
    pub default_max_tokens: usize,
    /// Longest a request may take, start to end.
    pub timeout: Duration,
    /// Longest the whole request body may take to arrive (HTTP 408 after).
    pub body_timeout: Duration,
    /// Bytes registered and cached steering specs may hold together (HTTP 507 beyond).
    pub steering_memory_bytes: usize,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The steering directory or a spec in it.
    #[error(transparent)]
    Steer(#[from] SteerError),
    /// The Prometheus registry.
    #[error("could not register the metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub(crate) engine: EngineHandle,
    pub(crate) codec: Arc<TextCodec>,
    pub(crate) config: Arc<ModelConfig>,
    pub(crate) model_name: String,
    pub(crate) registry: Arc<SteeringRegistry>,
    pub(crate) limits: Limits,
    pub(crate) metrics: Metrics,
    pub(crate) vision: Option<Arc<Mutex<VisionEncoder>>>,
    /// The sha256 of the bearer token `POST`/`DELETE /v1/steering` require; `None`: open.
    pub(crate) admin_token: Option<[u8; 32]>,
    /// Set when the server is about to stop: `GET /ready` answers 503 ([`AppState::drain_handle`]).
    pub(crate) draining: Arc<AtomicBool>,
}

impl AppState {
    /// State for a server over `engine`; registered specs are the `*.json` files of `steer_dir`,
    /// and inline specs may only name files inside it.
    pub fn new(
        engine: EngineHandle,
        codec: Arc<TextCodec>,
        config: ModelConfig,
        runtime: Arc<Runtime>,
        model_name: String,
        steer_dir: Option<PathBuf>,
        limits: Limits,
    ) -> Result<Self, ServerError> {
        let registry = SteeringRegistry::new(
            config.clone(),
            runtime,
            steer_dir,
            limits.steering_memory_bytes,
        )?;
        let metrics = Metrics::new()?;
        Ok(Self {
            engine,
            codec,
            config: Arc::new(config),
            model_name,
            registry: Arc::new(registry),
            limits,
            metrics,
            vision: None,
            admin_token: None,
            draining: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Require `Authorization: Bearer TOKEN` on `POST` and `DELETE /v1/steering`, so that only
    /// an operator can replace the specs every user's requests name. Without it they are open.
    #[must_use]
    pub fn with_admin_token(mut self, token: &str) -> Self {
        self.admin_token = Some(Sha256::digest(token.as_bytes()).into());
        self
    }

    /// Whether the request's headers carry the admin token (always, when none is set). Digests
    /// are compared whole, so the time taken says nothing about how much of a guess was right.
    pub(crate) fn is_admin(&self, headers: &axum::http::HeaderMap) -> bool {
        let Some(expected) = &self.admin_token else {
            return true;
        };
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        digest
            .iter()
            .zip(expected)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }

    /// The flag that marks the server as draining: once set, `GET /ready` answers 503 while
    /// requests are still served (a load balancer needs a moment to stop routing here before the
    /// listener closes). A signal handler sets it.
    pub fn drain_handle(&self) -> Arc<AtomicBool> {
        self.draining.clone()
    }

    /// Follow the steering directory: every `every`, specs whose files appeared, changed or went
    /// away are registered, replaced or removed ([`SteeringRegistry::sync_dir`]), on a thread of
    /// its own. Replicas that mount one directory converge on its specs.
    pub fn watch_steer_dir(&self, every: Duration) -> std::io::Result<()> {
        SteeringRegistry::watch(&self.registry, every)
    }

    /// Accept images (`image_url` content parts) with this bundle's vision encoder.
    #[must_use]
    pub fn with_vision(mut self, encoder: VisionEncoder) -> Self {
        self.vision = Some(Arc::new(Mutex::new(encoder)));
        self
    }
}
