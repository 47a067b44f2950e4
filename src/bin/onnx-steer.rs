//! The `onnx-steer` command line: inspect bundles and generate through the segment chain.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use onnx_steer::bundle::ModelConfig;
use onnx_steer::generate::{generate, validate_prompts, Generated, GenerationConfig, Sampling};
use onnx_steer::model::Prompt;
use onnx_steer::model::{CausalLm, Monolithic, SegmentChain};
use onnx_steer::runtime::{ExecutionProvider, Runtime, RuntimeOptions};
use onnx_steer::steer::{vector, BatchSteering, ResolvedSteering, SteerSpec};
use onnx_steer::text::{StreamDecoder, TextCodec};
use onnx_steer::vision::{self, VisionEncoder};
use onnx_steer::{
    Bundle, BundleError, Error, GenerateError, ModelError, RuntimeError, SteerError, TextError,
    VisionError,
};

/// What the CLI reports: a library error, or a problem with the command line's own input.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Library(#[from] Error),
    #[error("{0}")]
    Input(String),
    #[error("could not write output: {0}")]
    Output(#[from] std::io::Error),
}

macro_rules! cli_error_from_library {
    ($($error:ty),*) => {$(
        impl From<$error> for CliError {
            fn from(error: $error) -> Self {
                Self::Library(error.into())
            }
        }
    )*};
}
cli_error_from_library!(
    BundleError,
    RuntimeError,
    ModelError,
    TextError,
    GenerateError,
    SteerError,
    VisionError
);

#[derive(Parser)]
#[command(
    name = "onnx-steer",
    version,
    about = "Per-layer ONNX inference with steering between segments"
)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a bundle (manifest, files, sha256) and print a summary.
    Inspect {
        /// Bundle directory written by `python -m onnx_steer_export export`.
        #[arg(long)]
        bundle: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Generate text for one prompt or a batch of prompts.
    Generate(GenerateArgs),
    /// Steering-vector files.
    #[command(subcommand)]
    Vector(VectorCommand),
    /// Record residual-stream states (layer outputs) for training steering methods.
    Capture(CaptureArgs),
    /// Preprocess images exactly as the vision tower sees them (the bundle's HF image processor)
    /// and write `pixel_values` [N, 3, H, W] to a .safetensors file.
    Preprocess {
        /// A vision-language bundle directory.
        #[arg(long)]
        bundle: PathBuf,
        /// Image files (PNG, JPEG or WebP), in order.
        #[arg(long = "image", value_name = "FILE", required = true)]
        images: Vec<PathBuf>,
        /// Output .safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure prefill and decode speed: segmented vs monolithic, steered vs unsteered, in one run.
    Bench(BenchArgs),
    /// Serve OpenAI-compatible chat and text completions over HTTP, with steering per request.
    Serve(ServeArgs),
    /// Perplexity of a text file, one token per decode step: compare a quantized or fp16 bundle
    /// with its fp32 source on the same text.
    Perplexity(PerplexityArgs),
}

#[derive(Args)]
struct PerplexityArgs {
    /// Bundle directory written by `python -m onnx_steer_export export`.
    #[arg(long)]
    bundle: PathBuf,
    /// Plain-text file to score (encoded without special tokens).
    #[arg(long)]
    text: PathBuf,
    /// Score at most this many tokens of the text (also capped by the context length).
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Score with the monolithic full.onnx instead of the segment chain.
    #[arg(long)]
    monolithic: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn run_perplexity(args: PerplexityArgs) -> Result<(), CliError> {
    let bundle = Bundle::open(&args.bundle)?;
    let codec = TextCodec::load(&bundle)?;
    let text = std::fs::read_to_string(&args.text).map_err(|e| {
        CliError::Input(format!(
            "could not read text file {}: {e}",
            args.text.display()
        ))
    })?;
    let mut ids = codec.encode(&text, false)?;
    ids.truncate(args.max_tokens.min(bundle.config().max_position_embeddings));
    if ids.len() < 2 {
        return Err(CliError::Input(format!(
            "{} holds {} tokens; perplexity needs at least 2",
            args.text.display(),
            ids.len()
        )));
    }
    let runtime = args.runtime.runtime()?;
    let mut model = load_model(&bundle, &runtime, args.monolithic)?;
    let bar = ProgressBar::new(ids.len() as u64 - 1).with_style(
        ProgressStyle::with_template("perplexity {bar:30} {pos}/{len} tokens ({eta})")
            .expect("static template"),
    );
    let score = onnx_steer::perplexity::perplexity(model.as_mut(), &ids, || bar.inc(1))
        .map_err(Error::from)?;
    bar.finish_and_clear();
    if args.json {
        let report = serde_json::json!({
            "bundle": bundle.manifest().name, "text": args.text, "monolithic": args.monolithic,
            "tokens": score.tokens, "mean_nll": score.mean_nll, "perplexity": score.perplexity,
        });
        println!("{report}");
    } else {
        println!(
            "{}: perplexity {:.4} (mean NLL {:.5}) over {} tokens",
            bundle.manifest().name,
            score.perplexity,
            score.mean_nll,
            score.tokens
        );
    }
    Ok(())
}

#[derive(Args)]
struct ServeArgs {
    /// Bundle directory written by `python -m onnx_steer_export export`.
    #[arg(long)]
    bundle: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Folder of steer specs: each `NAME.json` is registered as `NAME`, and inline specs may only
    /// name files inside it.
    #[arg(long)]
    steer_dir: Option<PathBuf>,
    /// Most requests decoding together in one batch.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Most requests waiting for a batch slot; more get 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Tokens generated when a request gives no max_tokens.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
    /// Longest a request may take, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn run_serve(args: ServeArgs) -> Result<(), CliError> {
    use onnx_steer::server::{engine, router, AppState, Limits};

    let bundle = Bundle::open(&args.bundle)?;
    let runtime = std::sync::Arc::new(args.runtime.runtime()?);
    let model = SegmentChain::load(&bundle, &runtime)?;
    let encoder = VisionEncoder::load(&bundle, &runtime)?;
    let config = bundle.config().clone();
    let (handle, engine_thread) = engine::spawn(
        Box::new(model),
        engine::EngineOptions {
            max_batch: args.max_batch.max(1),
            max_queue: args.max_queue.max(1),
            pad_id: config.pad_token_id.unwrap_or(config.eos_token_ids[0]),
        },
    );
    let limits = Limits {
        max_body_bytes: args.max_body_bytes,
        default_max_tokens: args.default_max_tokens,
        timeout: std::time::Duration::from_secs(args.timeout_s),
    };
    let state = AppState::new(
        handle,
        TextCodec::load(&bundle)?,
        config,
        runtime,
        bundle.manifest().name.clone(),
        args.steer_dir.clone(),
        limits,
    )?;
    let state = match encoder {
        Some(encoder) => state.with_vision(encoder),
        None => state,
    };
    let address = format!("{}:{}", args.host, args.port);
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    server.block_on(async {
        let listener = tokio::net::TcpListener::bind(&address).await?;
        tracing::info!("serving {} on http://{address}", args.bundle.display());
        eprintln!("listening on http://{address}");
        axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await
    })?;
    // The router (and with it every engine handle) is gone: the engine drains and stops.
    engine_thread
        .join()
        .map_err(|_| CliError::Input("the engine thread panicked".into()))?;
    Ok(())
}

/// Ctrl-C or SIGTERM: stop accepting, let requests in flight finish.
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
    eprintln!("shutting down: finishing requests in flight");
}

#[derive(Args)]
struct BenchArgs {
    /// Bundle directory (with full.onnx for the monolithic baseline).
    #[arg(long)]
    bundle: PathBuf,
    /// Also measure the segment chain with this steer spec (repeat the flag for several; each is
    /// a variant named after its file stem, with its own steered/unsteered ratios).
    #[arg(long)]
    steer: Vec<PathBuf>,
    /// Batch sizes, comma-separated.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    batch: Vec<usize>,
    /// Prompt lengths in tokens, comma-separated.
    #[arg(long, default_value = "128", value_delimiter = ',')]
    prompt_tokens: Vec<usize>,
    /// Tokens generated per run (EOS does not stop a bench run).
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Timed runs per variant and workload (interleaved across variants); the table and the ratios
    /// use their median, the JSON also has mean, spread and extremes.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Untimed runs per variant before timing.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Skip the monolithic full.onnx baseline.
    #[arg(long)]
    no_monolithic: bool,
    /// Write the report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// With a vision-language bundle: also time decoding, preprocessing and the vision encoder
    /// (tower + projector) on this image, per image.
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// A prompt of exactly `tokens` ids: a fixed English paragraph, repeated as needed.
fn bench_prompt(codec: &TextCodec, tokens: usize) -> Result<Vec<u32>, CliError> {
    const TEXT: &str = "The history of the printing press is a story of craft, trade and ideas. \
        Movable type spread across Europe within decades, and with it came cheaper books, \
        new readers, and arguments that travelled faster than any messenger could ride. ";
    let base = codec.encode(TEXT, false)?;
    Ok(base.iter().copied().cycle().take(tokens).collect())
}

fn run_bench(args: BenchArgs) -> Result<(), CliError> {
    use onnx_steer::bench::{
        cpu_model, measure, measure_vision, memory_read_gbs, peak_rss_mib, Variant,
    };

    let bundle = Bundle::open(&args.bundle)?;
    let codec = TextCodec::load(&bundle)?;
    let config = bundle.config().clone();
    let runtime = args.runtime.runtime()?;
    let vision = match &args.image {
        None => None,
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|source| VisionError::Io {
                path: path.display().to_string(),
                source,
            })?;
            let mut encoder =
                VisionEncoder::load(&bundle, &runtime)?.ok_or(VisionError::TextOnlyBundle)?;
            Some(measure_vision(&mut encoder, &bytes, args.repeats)?)
        }
    };
    let steered = args
        .steer
        .iter()
        .map(|path| {
            let stem = path.file_stem().unwrap_or_default().to_string_lossy();
            let spec = SteerSpec::load(path)?.resolve(&config, &runtime)?;
            Ok((format!("segmented+{stem}"), Arc::new(spec)))
        })
        .collect::<Result<Vec<_>, CliError>>()?;
    let mut models: Vec<Box<dyn CausalLm>> = vec![Box::new(SegmentChain::load(&bundle, &runtime)?)];
    let monolithic = !args.no_monolithic && bundle.manifest().monolithic.is_some();
    if monolithic {
        models.push(Box::new(Monolithic::load(&bundle, &runtime)?));
    }
    let workloads: Vec<(usize, usize)> = args
        .batch
        .iter()
        .flat_map(|&b| args.prompt_tokens.iter().map(move |&t| (b, t)))
        .collect();
    let variants_per = 1 + steered.len() + usize::from(monolithic);
    let bar = ProgressBar::new((workloads.len() * variants_per * args.repeats.max(1)) as u64)
        .with_style(
            ProgressStyle::with_template("bench {bar:30} {pos}/{len} runs ({eta})")
                .expect("static template"),
        );
    let bandwidth = memory_read_gbs();
    let weight_bytes = bundle.decode_weight_bytes() as f64;
    let mut reports = Vec::new();
    let mut profiles = Vec::new();
    for (batch, prompt_tokens) in workloads {
        let mut variants = vec![Variant {
            name: "segmented".into(),
            model: 0,
            steering: BatchSteering::uniform(None, batch),
        }];
        for (name, steering) in &steered {
            variants.push(Variant {
                name: name.clone(),
                model: 0,
                steering: BatchSteering::uniform(Some(steering.clone()), batch),
            });
        }
        if monolithic {
            variants.push(Variant {
                name: "monolithic".into(),
                model: 1,
                steering: BatchSteering::uniform(None, batch),
            });
        }
        let prompt = bench_prompt(&codec, prompt_tokens)?;
        let prompts = vec![prompt; batch];
        let results = measure(
            &mut models,
            &variants,
            &prompts,
            args.new_tokens,
            args.warmup,
            args.repeats,
            || bar.inc(1),
        )?;
        let decode = |name: &str| {
            results
                .iter()
                .find(|r| r.variant == name)
                .map(|r| r.decode_tokens_per_s.p50)
        };
        let prefill = |name: &str| {
            results
                .iter()
                .find(|r| r.variant == name)
                .map(|r| r.prefill_tokens_per_s.p50)
        };
        let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
        let mut ratios = serde_json::Map::new();
        for (name, _) in &steered {
            ratios.insert(
                format!("decode_{name}_over_segmented"),
                ratio(decode(name), decode("segmented")).into(),
            );
            ratios.insert(
                format!("prefill_{name}_over_segmented"),
                ratio(prefill(name), prefill("segmented")).into(),
            );
        }
        ratios.insert(
            "decode_segmented_over_monolithic".into(),
            ratio(decode("segmented"), decode("monolithic")).into(),
        );
        ratios.insert(
            "prefill_segmented_over_monolithic".into(),
            ratio(prefill("segmented"), prefill("monolithic")).into(),
        );
        profiles.push((
            format!("batch {batch}, {prompt_tokens}-token prompt"),
            results.clone(),
        ));
        let bandwidth_fraction: serde_json::Map<String, serde_json::Value> = results
            .iter()
            .map(|r| {
                let steps_per_s = r.decode_tokens_per_s.p50 / batch as f64;
                (
                    r.variant.clone(),
                    (weight_bytes * steps_per_s / 1e9 / bandwidth).into(),
                )
            })
            .collect();
        reports.push(serde_json::json!({
            "batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": args.new_tokens,
            "prompt_ids": prompts[0], "bandwidth_fraction": bandwidth_fraction,
            "repeats": args.repeats, "warmup": args.warmup, "variants": results, "ratios": ratios,
        }));
    }
    bar.finish_and_clear();
    let report = serde_json::json!({
        "bundle": bundle.manifest().name, "dtype": bundle.manifest().dtype,
        "weights": bundle.manifest().weights, "provider": runtime.provider(),
        "steer": args.steer, "threads": args.runtime.threads,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "cpu_model": cpu_model(),
        "onnxruntime": runtime.library(),
        "peak_rss_mib": peak_rss_mib(), "memory_read_gb_per_s": bandwidth,
        "decode_weight_bytes": weight_bytes, "workloads": reports, "vision_per_image": vision,
    });
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<28} {:>5} {:>6} {:>14} {:>14} {:>9} {:>9}",
        "variant", "batch", "prompt", "prefill tok/s", "decode tok/s", "p50 ms", "p99 ms"
    )?;
    for workload in report["workloads"].as_array().into_iter().flatten() {
        for v in workload["variants"].as_array().into_iter().flatten() {
            writeln!(
                out,
                "{:<28} {:>5} {:>6} {:>14.1} {:>14.1} {:>9.2} {:>9.2}",
                v["variant"].as_str().unwrap_or(""),
                workload["batch"],
                workload["prompt_tokens"],
                v["prefill_tokens_per_s"]["p50"].as_f64().unwrap_or(0.0),
                v["decode_tokens_per_s"]["p50"].as_f64().unwrap_or(0.0),
                v["token_latency_ms"]["p50"].as_f64().unwrap_or(0.0),
                v["token_latency_ms"]["p99"].as_f64().unwrap_or(0.0),
            )?;
        }
        for (name, value) in workload["ratios"].as_object().into_iter().flatten() {
            if let Some(value) = value.as_f64() {
                writeln!(out, "  {name}: {value:.3}")?;
            }
        }
    }
    writeln!(
        out,
        "memory read bandwidth {bandwidth:.1} GB/s; a decode step streams {:.1} MB of weights",
        weight_bytes / 1e6
    )?;
    if let Some(vision) = &vision {
        writeln!(
            out,
            "vision per image (p50): decode {:.2} ms, preprocess {:.2} ms, encoder {:.2} ms",
            vision.decode_ms.p50, vision.preprocess_ms.p50, vision.encoder_ms.p50
        )?;
    }
    for workload in report["workloads"].as_array().into_iter().flatten() {
        for (name, fraction) in workload["bandwidth_fraction"]
            .as_object()
            .into_iter()
            .flatten()
        {
            writeln!(
                out,
                "  {name} (batch {}): {:.0}% of the bandwidth limit",
                workload["batch"],
                fraction.as_f64().unwrap_or(0.0) * 100.0
            )?;
        }
    }
    for (workload, results) in &profiles {
        writeln!(out, "decode breakdown, {workload}:")?;
        for result in results {
            if let Some(profile) = &result.profile {
                writeln!(
                    out,
                    "  {:<26} {}",
                    result.variant,
                    profile.decode.one_line()
                )?;
            }
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&report).unwrap_or_default() + "\n",
        )?;
        writeln!(out, "wrote {}", path.display())?;
    }
    Ok(())
}

#[derive(Args)]
struct CaptureArgs {
    /// Bundle directory.
    #[arg(long)]
    bundle: PathBuf,
    /// One prompt per line, or a .jsonl file of {"prompt": TEXT} or {"input_ids": [...]} objects;
    /// with a vision-language bundle a record may add {"images": [FILE, ...]} (relative to the file).
    #[arg(long)]
    prompts_file: PathBuf,
    /// Wrap text prompts in the chat template.
    #[arg(long)]
    chat: bool,
    /// Layers to record: `A-B`, `A,B,C` or `A` (layer L = output of decoder block L).
    #[arg(long)]
    layers: String,
    /// `last`: each prompt's last token ([N, d] per layer); `all`: every real token
    /// ([total, d] per layer, plus `lengths` [N]).
    #[arg(long, default_value = "last", value_parser = ["last", "all"])]
    tokens: String,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Output .safetensors: tensors `layer.{L}`.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn parse_layers(text: &str, num_layers: usize) -> Result<Vec<usize>, CliError> {
    let bad = || {
        CliError::Input(format!(
            "--layers {text:?}: use A-B, A,B,C or A with layers 0..{}",
            num_layers - 1
        ))
    };
    let layers: Vec<usize> = match text.split_once('-') {
        Some((a, b)) => {
            let (a, b): (usize, usize) = (
                a.trim().parse().map_err(|_| bad())?,
                b.trim().parse().map_err(|_| bad())?,
            );
            (a..=b).collect()
        }
        None => text
            .split(',')
            .map(|l| l.trim().parse().map_err(|_| bad()))
            .collect::<Result<_, _>>()?,
    };
    if layers.is_empty() || layers.iter().any(|&l| l >= num_layers) {
        return Err(bad());
    }
    Ok(layers)
}

/// Token ids and decoded images of each prompt in a capture prompts file.
type CapturePrompts = Vec<(Vec<u32>, Vec<image::RgbImage>)>;

fn read_capture_prompts(args: &CaptureArgs, codec: &TextCodec) -> Result<CapturePrompts, CliError> {
    let path = &args.prompts_file;
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::Input(format!(
            "could not read prompts file {}: {e}",
            path.display()
        ))
    })?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let base = path.parent().unwrap_or(Path::new("."));
    let mut prompts = Vec::new();
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let mut images = Vec::new();
        let ids = if jsonl {
            let record: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                CliError::Input(format!("{}:{}: not JSON: {e}", path.display(), number + 1))
            })?;
            if let Some(files) = record.get("images").and_then(|v| v.as_array()) {
                let files = files
                    .iter()
                    .map(|f| f.as_str().map(|f| base.join(f)))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        CliError::Input(format!(
                            "{}:{}: images must be file names",
                            path.display(),
                            number + 1
                        ))
                    })?;
                images = read_images(&files)?;
            }
            if let Some(ids) = record.get("input_ids").and_then(|v| v.as_array()) {
                ids.iter()
                    .map(|id| id.as_u64().and_then(|id| u32::try_from(id).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| {
                        CliError::Input(format!(
                            "{}:{}: input_ids must be token ids",
                            path.display(),
                            number + 1
                        ))
                    })?
            } else if let Some(prompt) = record.get("prompt").and_then(|v| v.as_str()) {
                codec.encode_prompt(prompt, args.chat, images.len())?
            } else {
                return Err(CliError::Input(format!(
                    "{}:{}: needs \"prompt\" or \"input_ids\"",
                    path.display(),
                    number + 1
                )));
            }
        } else {
            codec.encode_prompt(line, args.chat, 0)?
        };
        prompts.push((ids, images));
    }
    if prompts.is_empty() {
        return Err(CliError::Input(format!(
            "prompts file {} has no prompts",
            path.display()
        )));
    }
    Ok(prompts)
}

/// Decode image files (before any model is loaded, so a broken image fails fast).
fn read_images(paths: &[PathBuf]) -> Result<Vec<image::RgbImage>, CliError> {
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
fn vision_prompt(
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

fn run_preprocess(bundle_dir: &Path, files: &[PathBuf], out: &Path) -> Result<(), CliError> {
    let bundle = Bundle::open(bundle_dir)?;
    let settings = &bundle
        .manifest()
        .vision
        .as_ref()
        .ok_or(VisionError::TextOnlyBundle)?
        .processor;
    let processor = vision::ImageProcessor::new(settings)?;
    let rows: Vec<_> = read_images(files)?
        .iter()
        .map(|image| processor.preprocess(image))
        .collect();
    let shape = rows.first().map(|r| r.dim()).unwrap_or_default();
    let data: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    let dims = vec![rows.len(), shape.0, shape.1, shape.2];
    vector::write_f32_tensors(out, &[("pixel_values".into(), dims, &data)])?;
    eprintln!(
        "wrote pixel_values {:?} to {}",
        [rows.len(), shape.0, shape.1, shape.2],
        out.display()
    );
    Ok(())
}

fn run_capture(args: CaptureArgs) -> Result<(), CliError> {
    let bundle = Bundle::open(&args.bundle)?;
    let config = bundle.config().clone();
    let layers = parse_layers(&args.layers, config.num_layers)?;
    let codec = TextCodec::load(&bundle)?;
    let lines = read_capture_prompts(&args, &codec)?;
    let runtime = args.runtime.runtime()?;
    let mut encoder = VisionEncoder::load(&bundle, &runtime)?;
    let prompts = lines
        .into_iter()
        .map(|(ids, images)| vision_prompt(encoder.as_mut(), ids, &images))
        .collect::<Result<Vec<_>, _>>()?;
    validate_prompts(&prompts, config.max_position_embeddings)?;
    let mut chain = SegmentChain::load(&bundle, &runtime)?;
    let pad = config.pad_token_id.unwrap_or(config.eos_token_ids[0]);
    let last_only = args.tokens == "last";
    let mut collected: Vec<Vec<f32>> = vec![Vec::new(); layers.len()];
    let mut rows = 0usize;
    let bar = ProgressBar::new(prompts.len() as u64).with_style(
        ProgressStyle::with_template("capturing {bar:30} {pos}/{len} prompts ({eta})")
            .expect("static template"),
    );
    for chunk in prompts.chunks(args.batch_size.max(1)) {
        let step = onnx_steer::model::Step::for_prompts(chunk, pad);
        let captured = chain.capture(&step, &layers)?;
        for (slot, states) in captured.iter().enumerate() {
            let width = states.dim().1;
            for (r, prompt) in chunk.iter().enumerate() {
                let first = if last_only {
                    width - 1
                } else {
                    width - prompt.ids.len()
                };
                for t in first..width {
                    collected[slot].extend(states.slice(ndarray::s![r, t, ..]).iter());
                }
            }
        }
        rows += chunk.len();
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let d = config.hidden_size;
    let lengths: Vec<f32> = prompts.iter().map(|p| p.ids.len() as f32).collect();
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = layers
        .iter()
        .zip(&collected)
        .map(|(layer, data)| {
            (
                format!("layer.{layer}"),
                vec![data.len() / d, d],
                data.as_slice(),
            )
        })
        .collect();
    if !last_only {
        tensors.push(("lengths".into(), vec![rows], lengths.as_slice()));
    }
    vector::write_f32_tensors(&args.out, &tensors)?;
    eprintln!(
        "captured {rows} prompts x {} layers into {}",
        layers.len(),
        args.out.display()
    );
    Ok(())
}

#[derive(Subcommand)]
enum VectorCommand {
    /// Convert between .safetensors and .gguf control vectors (repeng / llama.cpp layout), exactly.
    Convert {
        /// Input vector file (.safetensors or .gguf).
        input: PathBuf,
        /// Output file; the extension picks the format.
        output: PathBuf,
        /// `controlvector.model_hint` written into GGUF output.
        #[arg(long, default_value = "llama")]
        model_hint: String,
    },
}

#[derive(Args)]
struct RuntimeArgs {
    /// Execution provider for every segment.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda", "tensorrt"])]
    ep: String,
    /// Provider to fall back to (with a warning) when --ep cannot be registered.
    #[arg(long, value_parser = ["cpu"])]
    ep_fallback: Option<String>,
    /// Threads in the global ONNX Runtime pool (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

impl RuntimeArgs {
    fn runtime(&self) -> Result<Runtime, Error> {
        let provider: ExecutionProvider = self.ep.parse()?;
        let mut options = RuntimeOptions::default()
            .with_provider(provider)
            .with_cpu_fallback(self.ep_fallback.is_some());
        if let Some(threads) = self.threads {
            options = options.with_intra_threads(threads);
        }
        Ok(Runtime::new(options)?)
    }
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["prompt", "prompts_file"]))]
struct GenerateArgs {
    /// Bundle directory written by `python -m onnx_steer_export export`.
    #[arg(long)]
    bundle: PathBuf,
    /// The prompt text.
    #[arg(long)]
    prompt: Option<String>,
    /// A file with one prompt per line, run together as one batch.
    #[arg(long)]
    prompts_file: Option<PathBuf>,
    /// An image (PNG, JPEG or WebP) for --prompt, with a vision-language bundle; repeat for several.
    /// With --chat each image gets a placeholder; a raw prompt writes one `<image>` per image.
    #[arg(long = "image", value_name = "FILE", conflicts_with = "prompts_file")]
    images: Vec<PathBuf>,
    /// Wrap each prompt as a user turn of the bundle's chat template.
    #[arg(long)]
    chat: bool,
    /// Stop after this many new tokens.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Always take the most likely token (the default unless --temperature is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    greedy: bool,
    /// Sample with this temperature instead of greedy decoding.
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability.
    #[arg(long, default_value_t = 1.0, requires = "temperature")]
    top_p: f32,
    /// Keep only the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0, requires = "temperature")]
    top_k: usize,
    /// Seed of the sampler; the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print text as it is generated (prompts then run one at a time).
    #[arg(long, conflicts_with = "json")]
    stream: bool,
    /// Print one JSON object per prompt instead of text.
    #[arg(long)]
    json: bool,
    /// Run the monolithic full.onnx instead of the segment chain (baseline; cannot steer).
    #[arg(long)]
    monolithic: bool,
    /// Steer spec JSON applied to every prompt; repeat to compose several (e.g. two SVF concepts).
    #[arg(long, conflicts_with = "steer_per_line")]
    steer: Vec<PathBuf>,
    /// With --prompts-file: each line is `PROMPT<TAB>SPEC.json` (spec optional), so one batch mixes specs.
    #[arg(long, requires = "prompts_file")]
    steer_per_line: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// A prompt and the steer spec its line names (with --steer-per-line).
struct PromptLine {
    prompt: String,
    spec: Option<PathBuf>,
}

fn read_prompts(args: &GenerateArgs) -> Result<Vec<PromptLine>, CliError> {
    if let Some(prompt) = &args.prompt {
        return Ok(vec![PromptLine {
            prompt: prompt.clone(),
            spec: None,
        }]);
    }
    let path = args
        .prompts_file
        .as_deref()
        .ok_or_else(|| CliError::Input("give --prompt or --prompts-file".into()))?;
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::Input(format!(
            "could not read prompts file {}: {e}",
            path.display()
        ))
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let prompts: Vec<PromptLine> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| match line.split_once('\t') {
            Some((prompt, spec)) if args.steer_per_line => PromptLine {
                prompt: prompt.to_string(),
                spec: Some(spec.trim())
                    .filter(|s| !s.is_empty())
                    .map(|s| base.join(s)),
            },
            _ => PromptLine {
                prompt: line.to_string(),
                spec: None,
            },
        })
        .collect();
    if prompts.is_empty() {
        return Err(CliError::Input(format!(
            "prompts file {} has no prompts; put one prompt per line",
            path.display()
        )));
    }
    Ok(prompts)
}

fn sampling(args: &GenerateArgs) -> Sampling {
    match args.temperature {
        Some(temperature) if !args.greedy => Sampling::Random {
            temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
        },
        _ => Sampling::Greedy,
    }
}

fn load_model(
    bundle: &Bundle,
    runtime: &Runtime,
    monolithic: bool,
) -> Result<Box<dyn CausalLm>, Error> {
    let spinner = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("static template"),
    );
    spinner.set_message(format!(
        "loading {} on {}",
        bundle.manifest().name,
        runtime.provider()
    ));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let model: Box<dyn CausalLm> = if monolithic {
        Box::new(Monolithic::load(bundle, runtime)?)
    } else {
        Box::new(SegmentChain::load(bundle, runtime)?)
    };
    spinner.finish_and_clear();
    Ok(model)
}

/// Resolve each row's spec once per distinct file.
fn row_steering(
    lines: &[PromptLine],
    shared: &[PathBuf],
    config: &ModelConfig,
    runtime: &Runtime,
) -> Result<Vec<Option<Arc<ResolvedSteering>>>, CliError> {
    if !shared.is_empty() {
        let parts = shared
            .iter()
            .map(|path| SteerSpec::load(path)?.resolve(config, runtime))
            .collect::<Result<Vec<_>, _>>()?;
        let composed = Arc::new(ResolvedSteering::compose(parts));
        return Ok(vec![Some(composed); lines.len()]);
    }
    let mut resolved: HashMap<PathBuf, Arc<ResolvedSteering>> = HashMap::new();
    lines
        .iter()
        .map(|line| {
            let Some(path) = line.spec.as_deref() else {
                return Ok(None);
            };
            if let Some(done) = resolved.get(path) {
                return Ok(Some(done.clone()));
            }
            let steering = Arc::new(SteerSpec::load(path)?.resolve(config, runtime)?);
            resolved.insert(path.to_path_buf(), steering.clone());
            Ok(Some(steering))
        })
        .collect()
}

fn run_generate(args: GenerateArgs) -> Result<(), CliError> {
    let lines = read_prompts(&args)?;
    let bundle = Bundle::open(&args.bundle)?;
    let images = read_images(&args.images)?;
    if !images.is_empty() && bundle.manifest().vision.is_none() {
        return Err(VisionError::TextOnlyBundle.into());
    }
    let codec = TextCodec::load(&bundle)?;
    let config = bundle.config();
    let runtime = args.runtime.runtime()?;
    let mut encoder = VisionEncoder::load(&bundle, &runtime)?;
    let encoded = lines
        .iter()
        .map(|line| {
            let ids = codec.encode_prompt(&line.prompt, args.chat, images.len())?;
            vision_prompt(encoder.as_mut(), ids, &images)
        })
        .collect::<Result<Vec<_>, _>>()?;
    validate_prompts(&encoded, config.max_position_embeddings)?;
    let steering = row_steering(&lines, &args.steer, config, &runtime)?;
    let mut model = load_model(&bundle, &runtime, args.monolithic)?;
    let generation = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling: sampling(&args),
        stop_ids: config.eos_token_ids.clone(),
        pad_id: config.pad_token_id.unwrap_or(config.eos_token_ids[0]),
    };

    let stdout = std::io::stdout();
    if args.stream {
        for (ids, row_steering) in encoded.iter().zip(&steering) {
            let mut decoder = StreamDecoder::default();
            let mut out = stdout.lock();
            let mut failure = None;
            generate(
                model.as_mut(),
                std::slice::from_ref(ids),
                &generation,
                &BatchSteering::uniform(row_steering.clone(), 1),
                &mut |_, id| match decoder.push(&codec, id) {
                    Ok(delta) => {
                        let _ = out.write_all(delta.as_bytes());
                        let _ = out.flush();
                    }
                    Err(e) => failure = Some(e),
                },
            )?;
            let _ = writeln!(out);
            if let Some(e) = failure {
                return Err(e.into());
            }
        }
        return Ok(());
    }

    let results = generate(
        model.as_mut(),
        &encoded,
        &generation,
        &BatchSteering::new(steering),
        &mut |_, _| {},
    )?;
    let mut out = stdout.lock();
    for (line, result) in lines.iter().zip(&results) {
        let prompt = &line.prompt;
        let text = codec.decode(&result.token_ids)?;
        let line = if args.json {
            json_record(prompt, &text, result).to_string()
        } else if results.len() > 1 {
            format!("### {prompt}\n{text}\n")
        } else {
            text
        };
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn json_record(prompt: &str, text: &str, result: &Generated) -> serde_json::Value {
    serde_json::json!({
        "prompt": prompt,
        "text": text,
        "token_ids": result.token_ids,
        "prompt_tokens": result.prompt_tokens,
        "finish_reason": result.finish_reason,
        "prefill_ms": result.prefill_ms,
        "decode_ms": result.decode_ms,
        "decode_tokens_per_s": result.decode_tokens_per_s(),
        "steering": result.steering,
    })
}

fn run_inspect(bundle_dir: &Path, json: bool) -> Result<(), CliError> {
    let bundle = Bundle::open(bundle_dir)?;
    let manifest = bundle.manifest();
    let total: u64 = manifest.files.values().map(|f| f.bytes).sum();
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("verifying sha256 {bar:30} {bytes}/{total_bytes} {msg}")
            .expect("static template"),
    );
    for (name, entry) in &manifest.files {
        bar.set_message(name.clone());
        bundle.read_verified(name)?;
        bar.inc(entry.bytes);
    }
    bar.finish_and_clear();
    let m = &manifest.model;
    if json {
        let summary = serde_json::json!({
            "name": manifest.name, "dir": bundle.dir(), "valid": true, "dtype": manifest.dtype,
            "model": m, "segments": manifest.segments.len(), "monolithic": manifest.monolithic.is_some(),
            "files": manifest.files.len(), "bytes": total,
        });
        println!("{summary}");
    } else {
        println!("bundle     {} ({})", manifest.name, bundle.dir().display());
        println!("source     {}", manifest.source);
        println!(
            "model      {} · {} layers · d={} · {} heads / {} kv · head_dim {} · vocab {} · ctx {}",
            m.architecture,
            m.num_layers,
            m.hidden_size,
            m.num_attention_heads,
            m.num_key_value_heads,
            m.head_dim,
            m.vocab_size,
            m.max_position_embeddings
        );
        println!(
            "segments   embed + {} layers + norm + head{} · {:?}",
            bundle.layers().len(),
            if manifest.monolithic.is_some() {
                " (+ full.onnx)"
            } else {
                ""
            },
            manifest.dtype
        );
        println!(
            "files      {} · {:.1} MiB · sha256 verified",
            manifest.files.len(),
            total as f64 / (1 << 20) as f64
        );
        println!("eos ids    {:?}", m.eos_token_ids);
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .init();
    let result = match cli.command {
        Command::Inspect { bundle, json } => run_inspect(&bundle, json),
        Command::Generate(args) => run_generate(args),
        Command::Capture(args) => run_capture(args),
        Command::Preprocess {
            bundle,
            images,
            out,
        } => run_preprocess(&bundle, &images, &out),
        Command::Serve(args) => run_serve(args),
        Command::Bench(args) => run_bench(args),
        Command::Perplexity(args) => run_perplexity(args),
        Command::Vector(VectorCommand::Convert {
            input,
            output,
            model_hint,
        }) => vector::convert(&input, &output, &model_hint).map_err(CliError::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
