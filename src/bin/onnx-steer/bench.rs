//! `onnx-steer bench`: prefill and decode speed of the chain, steered and unsteered, against the
//! monolithic baseline, in one run; the report comes from [`onnx_steer::tools::bench`].

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use indicatif::ProgressBar;
use onnx_steer::steer::{BatchSteering, SteerSpec};
use onnx_steer::text::TextCodec;
use onnx_steer::vision::{VisionEncoder, VisionError};
use onnx_steer::{Bundle, CausalLm, Monolithic};

use crate::args::{bar_style, RuntimeArgs};
use crate::CliError;

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Bundle directory (with full.onnx for the monolithic baseline).
    #[arg(long)]
    bundle: PathBuf,
    /// Also measure the segment chain with this steer spec (repeat the flag for several; each is
    /// a variant named after its file stem, with its own steered/unsteered ratios).
    #[arg(long)]
    steer: Vec<PathBuf>,
    /// Also measure one batch whose rows take the --steer specs in turn, a row per spec (rows
    /// past the specs start again): what a server's batch of different requests costs
    /// (`segmented+mixed`, against the unsteered batch of the same size).
    #[arg(long, requires = "steer")]
    mixed: bool,
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

pub(crate) fn run(args: BenchArgs) -> Result<(), CliError> {
    use onnx_steer::tools::bench::{
        cpu_model, measure, measure_vision, memory_read_gbs, peak_rss_mib, BenchReport, Machine,
        Variant, Workload, WorkloadReport,
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
    let mut models: Vec<Box<dyn CausalLm>> = vec![Box::new(args.runtime.chain(&bundle, &runtime)?)];
    let monolithic = !args.no_monolithic && bundle.manifest().monolithic.is_some();
    if monolithic {
        models.push(Box::new(Monolithic::load(&bundle, &runtime)?));
    }
    let workloads: Vec<(usize, usize)> = args
        .batch
        .iter()
        .flat_map(|&b| args.prompt_tokens.iter().map(move |&t| (b, t)))
        .collect();
    let variants_per = 1 + steered.len() + usize::from(args.mixed) + usize::from(monolithic);
    let bar = ProgressBar::new((workloads.len() * variants_per * args.repeats.max(1)) as u64)
        .with_style(bar_style("bench {bar:30} {pos}/{len} runs ({eta})"));
    let bandwidth = memory_read_gbs();
    let weight_bytes = bundle.decode_weight_bytes() as f64;
    const MIXED: &str = "segmented+mixed";
    let steered_names: Vec<String> = steered
        .iter()
        .map(|(name, _)| name.clone())
        .chain(args.mixed.then(|| MIXED.to_string()))
        .collect();
    let mut reports = Vec::new();
    for (batch, prompt_tokens) in workloads {
        let unsteered = |name: &str, model| Variant {
            name: name.into(),
            model,
            steering: BatchSteering::uniform(None, batch),
        };
        let mut variants = vec![unsteered("segmented", 0)];
        variants.extend(steered.iter().map(|(name, steering)| Variant {
            name: name.clone(),
            model: 0,
            steering: BatchSteering::uniform(Some(steering.clone()), batch),
        }));
        if args.mixed {
            let specs = steered.iter().map(|(_, spec)| Some(spec.clone()));
            variants.push(Variant {
                name: MIXED.into(),
                model: 0,
                steering: BatchSteering::new(specs.cycle().take(batch).collect()),
            });
        }
        if monolithic {
            variants.push(unsteered("monolithic", 1));
        }
        let prompt = bench_prompt(&codec, prompt_tokens)?;
        let mut prompts = vec![prompt; batch];
        let results = measure(
            &mut models,
            &variants,
            &prompts,
            args.new_tokens,
            args.warmup,
            args.repeats,
            || bar.inc(1),
        )?;
        let workload = Workload {
            batch,
            prompt_tokens,
            new_tokens: args.new_tokens,
        };
        reports.push(WorkloadReport::new(
            workload,
            prompts.swap_remove(0),
            (args.repeats, args.warmup),
            results,
            &steered_names,
            (weight_bytes, bandwidth),
        ));
    }
    bar.finish_and_clear();
    let manifest = bundle.manifest();
    let report = BenchReport {
        bundle: manifest.name.clone(),
        dtype: manifest.dtype,
        weights: manifest.weights.clone(),
        steer: args.steer.clone(),
        machine: Machine {
            provider: runtime.provider(),
            onnxruntime: runtime.library().to_path_buf(),
            threads: args.runtime.threads,
            cpus: std::thread::available_parallelism().map(|n| n.get()).ok(),
            cpu_model: cpu_model(),
            peak_rss_mib: peak_rss_mib(),
            memory_read_gb_per_s: bandwidth,
        },
        decode_weight_bytes: weight_bytes,
        workloads: reports,
        vision_per_image: vision,
    };
    let mut out = std::io::stdout().lock();
    report.write_table(&mut out)?;
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?;
        std::fs::write(path, json + "\n")?;
        writeln!(out, "wrote {}", path.display())?;
    }
    Ok(())
}
