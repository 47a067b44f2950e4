//! ONNX Runtime: finding and loading the shared library, one environment with one global
//! thread pool, and the execution-provider policy that every segment session shares.
//!
//! One global intra-op pool matters: 30+ sessions with their own spinning pools fight over the
//! cores and run an order of magnitude slower (see DESIGN.md). The one pool does spin: a decode
//! step runs some 1,500 small nodes, and waking sleeping workers for each cost 13% of decode speed.
//! CPU sessions allocate from the heap rather than a per-session arena, so that the growing KV
//! caches of 30 sessions reuse one pool of freed blocks.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use ort::environment::{Environment, GlobalThreadPoolOptions};
use ort::ep::{self, ExecutionProvider as _};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;

/// Environment variable that names the ONNX Runtime shared library explicitly.
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// Why ONNX Runtime or a session could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime library not found: {0}. Run `make setup` (it installs onnxruntime into .venv) or set ORT_DYLIB_PATH to libonnxruntime.so")]
    LibraryNotFound(String),
    #[error("could not load ONNX Runtime from {path}: {message}")]
    LibraryLoad { path: PathBuf, message: String },
    #[error("unknown execution provider {0:?}; choose cpu, cuda or tensorrt")]
    UnknownProvider(String),
    #[error("execution provider {provider} is not available: {reason}. Install onnxruntime-gpu with a matching CUDA, or pass --ep-fallback cpu")]
    ProviderUnavailable {
        provider: ExecutionProvider,
        reason: String,
    },
    #[error("ONNX Runtime failed to {context}: {source}")]
    Ort {
        context: String,
        #[source]
        source: ort::Error,
    },
}

impl RuntimeError {
    pub(crate) fn ort(context: impl Into<String>) -> impl FnOnce(ort::Error) -> Self {
        let context = context.into();
        move |source| Self::Ort { context, source }
    }
}

/// Which ONNX Runtime execution provider runs the segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    #[default]
    Cpu,
    Cuda,
    TensorRt,
}

impl FromStr for ExecutionProvider {
    type Err = RuntimeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "tensorrt" | "trt" => Ok(Self::TensorRt),
            _ => Err(RuntimeError::UnknownProvider(s.to_string())),
        }
    }
}

impl std::fmt::Display for ExecutionProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::TensorRt => "tensorrt",
        })
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
}

impl RuntimeOptions {
    /// The execution provider for every segment.
    pub fn with_provider(mut self, provider: ExecutionProvider) -> Self {
        self.provider = provider;
        self
    }

    /// Run on CPU (with a warning) when the requested provider cannot be registered.
    pub fn with_cpu_fallback(mut self, fallback: bool) -> Self {
        self.fallback_to_cpu = fallback;
        self
    }

    /// Size of the one global intra-op thread pool (default: available cores).
    pub fn with_intra_threads(mut self, threads: usize) -> Self {
        self.intra_threads = Some(threads);
        self
    }

    /// Use this libonnxruntime instead of searching `ORT_DYLIB_PATH` and the project venv.
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
    provider: ExecutionProvider,
    library: PathBuf,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("provider", &self.provider)
            .field("library", &self.library)
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
            Some(path) => check_library(&path)?,
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
        let provider = settle_provider(options.provider, options.fallback_to_cpu)?;
        tracing::info!(library = %library.display(), %provider, threads, "ONNX Runtime ready");
        Ok(Self {
            environment,
            provider,
            library,
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

    /// Build a session from ONNX bytes on this runtime's provider and global thread pool.
    pub fn session(&self, model: &[u8], name: &str) -> Result<Session, RuntimeError> {
        let context = || format!("create the session for {name}");
        // Builder errors carry the builder back; only their message is kept.
        let builder_error = |e: ort::Error<SessionBuilder>| RuntimeError::Ort {
            context: context(),
            source: ort::Error::new(e.message()),
        };
        let builder = Session::builder(&self.environment)
            .map_err(RuntimeError::ort(context()))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(builder_error)?;
        let mut builder = match self.provider {
            // Without the arena, the KV cache that grows every step reuses freed heap blocks across
            // all sessions; 30 per-session arenas each keep their own (int4 decode +12%, measured).
            ExecutionProvider::Cpu => builder
                .with_execution_providers([ep::CPU::default().with_arena_allocator(false).build()])
                .map_err(builder_error)?,
            ExecutionProvider::Cuda => builder
                .with_execution_providers([ep::CUDA::default().build().error_on_failure()])
                .map_err(builder_error)?,
            ExecutionProvider::TensorRt => builder
                .with_execution_providers([
                    ep::TensorRT::default().build().error_on_failure(),
                    ep::CUDA::default().build().error_on_failure(),
                ])
                .map_err(builder_error)?,
        };
        builder
            .commit_from_memory(model)
            .map_err(RuntimeError::ort(context()))
    }
}

fn provider_available(provider: ExecutionProvider) -> Result<bool, RuntimeError> {
    let check = match provider {
        ExecutionProvider::Cpu => return Ok(true),
        ExecutionProvider::Cuda => ep::CUDA::is_available(),
        ExecutionProvider::TensorRt => ep::TensorRT::is_available(),
    };
    check.map_err(RuntimeError::ort("list the available execution providers"))
}

fn settle_provider(
    requested: ExecutionProvider,
    fallback_to_cpu: bool,
) -> Result<ExecutionProvider, RuntimeError> {
    if provider_available(requested)? {
        return Ok(requested);
    }
    if fallback_to_cpu {
        tracing::warn!(
            "execution provider {requested} is not available in this ONNX Runtime build; falling back to cpu"
        );
        return Ok(ExecutionProvider::Cpu);
    }
    Err(RuntimeError::ProviderUnavailable {
        provider: requested,
        reason: "this ONNX Runtime build does not include it".into(),
    })
}

fn check_library(path: &Path) -> Result<PathBuf, RuntimeError> {
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        Err(RuntimeError::LibraryNotFound(format!(
            "{} does not exist",
            path.display()
        )))
    }
}

/// `ORT_DYLIB_PATH` if set, else `libonnxruntime.so*` from the onnxruntime wheel in a `.venv`
/// found in the working directory, next to the executable, or in any of their ancestors.
pub fn find_library() -> Result<PathBuf, RuntimeError> {
    if let Some(path) = std::env::var_os(ORT_DYLIB_ENV).filter(|p| !p.is_empty()) {
        return check_library(Path::new(&path)).map_err(|_| {
            RuntimeError::LibraryNotFound(format!(
                "{ORT_DYLIB_ENV}={} does not exist",
                Path::new(&path).display()
            ))
        });
    }
    let starts = [std::env::current_dir().ok(), std::env::current_exe().ok()];
    let mut searched = Vec::new();
    for start in starts.iter().flatten() {
        for dir in start.ancestors() {
            let venv = dir.join(".venv");
            if let Some(found) = library_in_venv(&venv) {
                return Ok(found);
            }
            searched.push(venv);
        }
    }
    Err(RuntimeError::LibraryNotFound(format!(
        "{ORT_DYLIB_ENV} is unset and no .venv with onnxruntime was found above {}",
        starts
            .iter()
            .flatten()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    )))
}

fn library_in_venv(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    let pythons = std::fs::read_dir(&lib).ok()?;
    for python in pythons.flatten() {
        let capi = python.path().join("site-packages/onnxruntime/capi");
        let Ok(entries) = std::fs::read_dir(&capi) else {
            continue;
        };
        let mut candidates: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so"))
            })
            .collect();
        candidates.sort();
        if let Some(found) = candidates.pop() {
            return Some(found);
        }
    }
    None
}

/// One runtime for all unit tests (it loads libonnxruntime, which tensors need too).
#[cfg(test)]
pub(crate) fn test_runtime() -> &'static Runtime {
    static RUNTIME: std::sync::OnceLock<Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| Runtime::new(RuntimeOptions::default()).expect("ONNX Runtime"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_names_parse() {
        assert_eq!(
            "CPU".parse::<ExecutionProvider>().ok(),
            Some(ExecutionProvider::Cpu)
        );
        assert_eq!(
            "cuda".parse::<ExecutionProvider>().ok(),
            Some(ExecutionProvider::Cuda)
        );
        assert_eq!(
            "tensorrt".parse::<ExecutionProvider>().ok(),
            Some(ExecutionProvider::TensorRt)
        );
        let err = "rocm".parse::<ExecutionProvider>().unwrap_err();
        assert!(err.to_string().contains("cpu, cuda or tensorrt"));
    }

    #[test]
    fn missing_explicit_library_is_reported() {
        let err = check_library(Path::new("/nonexistent/libonnxruntime.so")).unwrap_err();
        assert!(matches!(err, RuntimeError::LibraryNotFound(_)));
    }

    #[test]
    fn venv_search_finds_versioned_library() {
        let venv = tempfile::tempdir().unwrap();
        let capi = venv
            .path()
            .join("lib/python3.11/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        std::fs::write(capi.join("libonnxruntime.so.1.31.1"), b"").unwrap();
        std::fs::write(capi.join("libonnxruntime_providers_shared.so"), b"").unwrap();
        let found = library_in_venv(venv.path()).unwrap();
        assert!(found.ends_with("libonnxruntime.so.1.31.1"));
    }
}
