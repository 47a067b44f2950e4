//! Execution providers: which one runs the segments, whether this ONNX Runtime build has it, and
//! the provider list each session registers.

use std::str::FromStr;

use ort::ep::{self, ExecutionProvider as _, ExecutionProviderDispatch};

use super::RuntimeError;

/// Which ONNX Runtime execution provider runs the segments.
///
/// CPU runs everywhere; CUDA and TensorRT need an onnxruntime-gpu build and a matching driver
/// (TensorRT falls back to CUDA for nodes it does not take).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    /// ONNX Runtime's own CPU kernels.
    #[default]
    Cpu,
    /// NVIDIA CUDA.
    Cuda,
    /// NVIDIA TensorRT, with CUDA behind it.
    #[value(name = "tensorrt", alias = "trt")]
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

impl ExecutionProvider {
    /// The providers a session registers, in order of preference.
    pub(super) fn dispatch(self) -> Vec<ExecutionProviderDispatch> {
        match self {
            // Without the arena, the KV cache that grows every step reuses freed heap blocks across
            // all sessions; 30 per-session arenas each keep their own (int4 decode +12%, measured).
            Self::Cpu => vec![ep::CPU::default().with_arena_allocator(false).build()],
            Self::Cuda => vec![ep::CUDA::default().build().error_on_failure()],
            Self::TensorRt => vec![
                ep::TensorRT::default().build().error_on_failure(),
                ep::CUDA::default().build().error_on_failure(),
            ],
        }
    }

    fn available(self) -> Result<bool, RuntimeError> {
        let check = match self {
            Self::Cpu => return Ok(true),
            Self::Cuda => ep::CUDA::is_available(),
            Self::TensorRt => ep::TensorRT::is_available(),
        };
        check.map_err(RuntimeError::ort("list the available execution providers"))
    }

    /// This provider if the library has it, else CPU when `fallback_to_cpu`, else an error.
    pub(super) fn settle(self, fallback_to_cpu: bool) -> Result<Self, RuntimeError> {
        if self.available()? {
            return Ok(self);
        }
        if fallback_to_cpu {
            tracing::warn!(
                "execution provider {self} is not available in this ONNX Runtime build; falling back to cpu"
            );
            return Ok(Self::Cpu);
        }
        Err(RuntimeError::ProviderUnavailable {
            provider: self,
            reason: "this ONNX Runtime build does not include it".into(),
        })
    }
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
}
