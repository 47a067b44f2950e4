//! ONNX Runtime: finding and loading the shared library, one environment with one global
//! thread pool, and the execution-provider policy that every segment session shares.
//!
//! One global intra-op pool matters: 30+ sessions with their own spinning pools fight over the
//! cores and run an order of magnitude slower (measured on this project's decode step). The one pool does spin: a decode
//! step runs some 1,500 small nodes, and waking sleeping workers for each cost 13% of decode speed.
//! CPU sessions allocate from the heap rather than a per-session arena, so that the growing KV
//! caches of 30 sessions reuse one pool of freed blocks.

//!
//! [`library`] finds the shared library, [`provider`] settles the execution provider, [`values`]
//! moves tensors between ndarray and ONNX Runtime values.

pub mod library;
pub mod provider;
pub mod values;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use sha2::{Digest, Sha256};

use ort::environment::{Environment, GlobalThreadPoolOptions};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;

pub use library::{find_library, ORT_DYLIB_ENV};
pub use provider::ExecutionProvider;

/// Why ONNX Runtime or a session could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No ONNX Runtime shared library at `ORT_DYLIB_PATH`, at the given path or in a `.venv`.
    #[error("ONNX Runtime library not found: {0}. Run `make setup` (it installs onnxruntime into .venv) or set ORT_DYLIB_PATH to libonnxruntime.so")]
    LibraryNotFound(String),
    /// The library was found, but ONNX Runtime could not be initialised from it.
    #[error("could not load ONNX Runtime from {path}: {message}")]
    LibraryLoad {
        /// The library file.
        path: PathBuf,
        /// ONNX Runtime's error.
        message: String,
    },
    /// A provider name other than `cpu`, `cuda` or `tensorrt` (`trt`).
    #[error("unknown execution provider {0:?}; choose cpu, cuda or tensorrt")]
    UnknownProvider(String),
    /// The requested provider is not in this ONNX Runtime build, and CPU fallback is off.
    #[error("execution provider {provider} is not available: {reason}. Install onnxruntime-gpu with a matching CUDA, or pass --ep-fallback cpu")]
    ProviderUnavailable {
        /// The provider asked for.
        provider: ExecutionProvider,
        /// Why it cannot be registered.
        reason: String,
    },
    /// A tensor does not have the shape expected of it.
    #[error("{0}")]
    Shape(String),
    /// A tensor could not be made from an array, or read back into one.
    #[error("ONNX Runtime could not make or read the tensor {what}: {source}")]
    Tensor {
        /// Which tensor.
        what: String,
        /// ONNX Runtime's error.
        #[source]
        source: ort::Error,
    },
    /// Another ONNX Runtime call failed (thread pool, environment, session).
    #[error("ONNX Runtime failed to {context}: {source}")]
    Ort {
        /// What was being done (`create the session for layer_00.onnx`).
        context: String,
        /// ONNX Runtime's error.
        #[source]
        source: ort::Error,
    },
}

impl RuntimeError {
    pub(crate) fn ort(context: impl Into<String>) -> impl FnOnce(ort::Error) -> Self {
        let context = context.into();
        move |source| Self::Ort { context, source }
    }

    pub(crate) fn tensor(what: &str) -> impl FnOnce(ort::Error) -> Self + '_ {
        move |source| Self::Tensor {
            what: what.to_string(),
            source,
        }
    }
}

/// How to build the ONNX Runtime environment; [`Runtime::new`] consumes it.
///
/// Use the builder methods; the defaults (CPU, all cores, no fallback) suit a CLI run.
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    provider: ExecutionProvider,
    fallback_to_cpu: bool,
    intra_threads: Option<usize>,
    library: Option<PathBuf>,
    keep_mapped_weights: bool,
}

impl RuntimeOptions {
    /// The execution provider for every segment.
    #[must_use]
    pub fn with_provider(mut self, provider: ExecutionProvider) -> Self {
        self.provider = provider;
        self
    }

    /// Run on CPU (with a warning) when the requested provider cannot be registered.
    #[must_use]
    pub fn with_cpu_fallback(mut self, fallback: bool) -> Self {
        self.fallback_to_cpu = fallback;
        self
    }

    /// Size of the one global intra-op thread pool (default: available cores).
    #[must_use]
    pub fn with_intra_threads(mut self, threads: usize) -> Self {
        self.intra_threads = Some(threads);
        self
    }

    /// Leave a bundle's weights as ONNX Runtime maps them from the weights files instead of
    /// repacking the matrices for its CPU GEMM (prepacking). Start-up is several times faster and
    /// the weights stay shared with the page cache (and with every process that serves the same
    /// bundle); decode is as fast; long prompts prefill slower. See `onnx-steer bench`.
    #[must_use]
    pub fn with_mapped_weights(mut self, keep: bool) -> Self {
        self.keep_mapped_weights = keep;
        self
    }

    /// Use this libonnxruntime instead of searching `ORT_DYLIB_PATH` and the project venv.
    #[must_use]
    pub fn with_library(mut self, path: impl Into<PathBuf>) -> Self {
        self.library = Some(path.into());
        self
    }
}

/// A loaded ONNX Runtime with its environment and the provider that sessions will use.
///
/// Create one per process with [`Runtime::new`] and build every segment session from it with
/// [`Runtime::session`].
pub struct Runtime {
    environment: Environment,
    /// Sessions by the sha256 of their model bytes ([`Runtime::shared_session`]).
    shared: Mutex<HashMap<[u8; 32], Weak<Mutex<Session>>>>,
    provider: ExecutionProvider,
    library: PathBuf,
    keep_mapped_weights: bool,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("provider", &self.provider)
            .field("library", &self.library)
            .field("keep_mapped_weights", &self.keep_mapped_weights)
            .finish()
    }
}

impl Runtime {
    /// Load the ONNX Runtime library, create the environment and settle the provider.
    ///
    /// Fails with [`RuntimeError::ProviderUnavailable`] when a GPU provider was asked for but this
    /// ONNX Runtime build cannot register it, unless CPU fallback was allowed.
    pub fn new(options: RuntimeOptions) -> Result<Self, RuntimeError> {
        let library = match options.library {
            Some(path) => library::check_library(&path)?,
            None => find_library()?,
        };
        // Checked above: init_from on a missing file has hung in some ort releases.
        let builder = ort::init_from(&library).map_err(|err| RuntimeError::LibraryLoad {
            path: library.clone(),
            message: err.to_string(),
        })?;
        let threads = options.intra_threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        let pool = GlobalThreadPoolOptions::default()
            .with_intra_threads(threads)
            .and_then(|p| p.with_inter_threads(1))
            .and_then(|p| p.with_spin_control(true))
            .map_err(RuntimeError::ort("configure the global thread pool"))?;
        let environment = builder
            .with_name("onnx-steer")
            .with_global_thread_pool(pool)
            .build()
            .map_err(RuntimeError::ort("create the environment"))?;
        let provider = options.provider.settle(options.fallback_to_cpu)?;
        tracing::info!(library = %library.display(), %provider, threads, "ONNX Runtime ready");
        Ok(Self {
            environment,
            shared: Mutex::new(HashMap::new()),
            provider,
            library,
            keep_mapped_weights: options.keep_mapped_weights,
        })
    }

    /// The provider sessions actually run on (CPU after a fallback).
    pub fn provider(&self) -> ExecutionProvider {
        self.provider
    }

    /// The shared library that was loaded.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// Build a session from ONNX bytes on this runtime's provider and global thread pool. For
    /// small graphs that are already in memory (steering nets); a bundle's graphs go through
    /// [`Runtime::session_from_file`].
    pub fn session(&self, model: &[u8], name: &str) -> Result<Session, RuntimeError> {
        self.commit(name, true, |builder| builder.commit_from_memory(model))
    }

    /// Build a session from an ONNX file. ONNX Runtime reads the graph and maps the page-aligned
    /// external weights beside it, using the mapping as the tensors: no copy of the weights is
    /// made on the CPU provider, and no graph is ever limited to protobuf's 2 GB.
    pub fn session_from_file(&self, model: &Path, name: &str) -> Result<Session, RuntimeError> {
        self.commit(name, !self.keep_mapped_weights, |builder| {
            builder.commit_from_file(model)
        })
    }

    fn commit(
        &self,
        name: &str,
        prepack: bool,
        commit: impl FnOnce(&mut SessionBuilder) -> ort::Result<Session>,
    ) -> Result<Session, RuntimeError> {
        let context = || format!("create the session for {name}");
        // Builder errors carry the builder back; only their message is kept.
        let builder_error = |e: ort::Error<SessionBuilder>| RuntimeError::Ort {
            context: context(),
            source: ort::Error::new(e.message()),
        };
        let builder = Session::builder(&self.environment)
            .map_err(RuntimeError::ort(context()))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(builder_error)?
            .with_prepacking(prepack)
            .map_err(builder_error)?;
        let mut builder = builder
            .with_execution_providers(self.provider.dispatch())
            .map_err(builder_error)?;
        commit(&mut builder).map_err(RuntimeError::ort(context()))
    }

    /// A session for `model` shared with every other holder of the same bytes (by sha256), made
    /// the first time they are seen. Steering nets use it: a hundred specs naming one net keep one
    /// session, not a hundred.
    pub fn shared_session(
        &self,
        model: &[u8],
        name: &str,
    ) -> Result<Arc<Mutex<Session>>, RuntimeError> {
        let key: [u8; 32] = Sha256::digest(model).into();
        let lookup = || {
            let shared = self
                .shared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            shared.get(&key).and_then(Weak::upgrade)
        };
        if let Some(session) = lookup() {
            return Ok(session);
        }
        // Built without the lock, so that one large net does not hold up every other; if another
        // thread built the same one meanwhile, its session wins and this one is dropped.
        let built = Arc::new(Mutex::new(self.session(model, name)?));
        let mut shared = self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(session) = shared.get(&key).and_then(Weak::upgrade) {
            return Ok(session);
        }
        shared.retain(|_, held| held.strong_count() > 0);
        shared.insert(key, Arc::downgrade(&built));
        Ok(built)
    }
}

/// One runtime for all unit tests (it loads libonnxruntime, which tensors need too).
#[cfg(test)]
pub(crate) fn test_runtime() -> &'static std::sync::Arc<Runtime> {
    static RUNTIME: std::sync::OnceLock<std::sync::Arc<Runtime>> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        std::sync::Arc::new(Runtime::new(RuntimeOptions::default()).expect("ONNX Runtime"))
    })
}
