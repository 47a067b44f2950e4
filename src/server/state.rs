//! [`AppState`]: what every handler shares (the engine handle, the tokenizer, the registry, the
//! limits, the metrics), cheap to clone.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
        let registry = SteeringRegistry::new(config.clone(), runtime, steer_dir)?;
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
        })
    }

    /// Accept images (`image_url` content parts) with this bundle's vision encoder.
    #[must_use]
    pub fn with_vision(mut self, encoder: VisionEncoder) -> Self {
        self.vision = Some(Arc::new(Mutex::new(encoder)));
        self
    }
}
