//! What several subcommands share: the runtime flags, model loading with a spinner, images.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use onnx_steer::bundle::ModelConfig;
use onnx_steer::chain::Prompt;
use onnx_steer::runtime::{ExecutionProvider, Runtime, RuntimeOptions};
use onnx_steer::steer::{ResolvedSteering, SteerSpec};
use onnx_steer::vision::{self, VisionEncoder, VisionError};
use onnx_steer::{Bundle, CausalLm, Error, Monolithic, SegmentChain};

use crate::CliError;

/// Where to run when `--ep` cannot be registered.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Fallback {
    /// ONNX Runtime's CPU kernels, with a warning.
    Cpu,
}

/// The runtime flags every model-loading subcommand takes.
#[derive(Args)]
pub(crate) struct RuntimeArgs {
    /// Execution provider for every segment.
    #[arg(long, value_enum, default_value_t = ExecutionProvider::Cpu)]
    pub(crate) ep: ExecutionProvider,
    /// Provider to fall back to (with a warning) when --ep cannot be registered.
    #[arg(long, value_enum)]
    pub(crate) ep_fallback: Option<Fallback>,
    /// Threads in the global ONNX Runtime pool (default: all cores).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Prompts longer than this run each layer in chunks of this many tokens, so that attention
    /// never holds [prompt x prompt] scores per head (0: never chunk; the monolithic baseline
    /// always runs whole). `serve` also prefills a prompt that joins running rows in chunks of
    /// at most this many tokens, each sized to take about one decode step, with a decode step
    /// between chunks (0: it joins whole and the running rows wait).
    #[arg(long, default_value_t = onnx_steer::chain::segmented::DEFAULT_PREFILL_CHUNK)]
    pub(crate) prefill_chunk: usize,
    /// Keep the weights as mapped from the bundle's files instead of repacking them for ONNX
    /// Runtime's CPU matrix products: start-up several times faster, weights shared with the page
    /// cache and other processes, decode as fast, long prompts prefill slower.
    #[arg(long)]
    pub(crate) no_prepack: bool,
}

impl RuntimeArgs {
    /// Load ONNX Runtime with these settings.
    pub(crate) fn runtime(&self) -> Result<Runtime, Error> {
        let mut options = RuntimeOptions::default()
            .with_provider(self.ep)
            .with_cpu_fallback(self.ep_fallback.is_some())
            .with_mapped_weights(self.no_prepack);
        if let Some(threads) = self.threads {
            options = options.with_intra_threads(threads);
        }
        Ok(Runtime::new(options)?)
    }

    /// The segment chain of `bundle` with these settings.
    pub(crate) fn chain(&self, bundle: &Bundle, runtime: &Runtime) -> Result<SegmentChain, Error> {
        Ok(SegmentChain::load(bundle, runtime)?.with_prefill_chunk(self.prefill_chunk))
    }
}

/// Decode image files (before any model is loaded, so a broken image fails fast).
pub(crate) fn read_images(paths: &[PathBuf]) -> Result<Vec<image::RgbImage>, CliError> {
    paths
        .iter()
        .map(|path| {
            let bytes = std::fs::read(path).map_err(|source| VisionError::Io {
                path: path.display().to_string(),
                source,
            })?;
            Ok(vision::decode(&bytes, &path.display().to_string())?)
        })
        .collect()
}

/// A prompt with its images embedded and spliced; text-only bundles take no images.
pub(crate) fn vision_prompt(
    encoder: Option<&mut VisionEncoder>,
    ids: Vec<u32>,
    images: &[image::RgbImage],
) -> Result<Prompt, CliError> {
    match encoder {
        None if images.is_empty() => Ok(ids.into()),
        None => Err(VisionError::TextOnlyBundle.into()),
        Some(encoder) => {
            let embeds = encoder.embed(images)?;
            Ok(encoder.prompt(&ids, embeds)?)
        }
    }
}

/// The segment chain, or the monolithic baseline, with a spinner while the sessions build.
pub(crate) fn load_model(
    bundle: &Bundle,
    runtime: &Runtime,
    args: &RuntimeArgs,
    monolithic: bool,
) -> Result<Box<dyn CausalLm>, Error> {
    let spinner = ProgressBar::new_spinner().with_style(bar_style("{spinner} {msg} ({elapsed})"));
    spinner.set_message(format!(
        "loading {} on {}",
        bundle.manifest().name,
        runtime.provider()
    ));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let model: Box<dyn CausalLm> = if monolithic {
        Box::new(Monolithic::load(bundle, runtime)?)
    } else {
        Box::new(args.chain(bundle, runtime)?)
    };
    spinner.finish_and_clear();
    Ok(model)
}

/// The specs at `paths` resolved and composed into one steering (`None` for no paths).
pub(crate) fn composed_steering(
    paths: &[PathBuf],
    config: &ModelConfig,
    runtime: &Runtime,
) -> Result<Option<Arc<ResolvedSteering>>, CliError> {
    if paths.is_empty() {
        return Ok(None);
    }
    let parts = paths
        .iter()
        .map(|path| SteerSpec::load(path)?.resolve(config, runtime))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Arc::new(ResolvedSteering::compose(parts)?)))
}

/// A progress style from a fixed template.
pub(crate) fn bar_style(template: &'static str) -> ProgressStyle {
    ProgressStyle::with_template(template).expect("static template")
}
