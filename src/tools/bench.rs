//! Throughput and latency measurement: the same synthetic prompts through several model variants
//! (segmented, segmented + steering, monolithic), interleaved repeat by repeat so that machine
//! drift hits every variant alike, and ratios computed inside one run.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::bundle::{Dtype, QuantizedWeights};
use crate::runtime::ExecutionProvider;

use crate::chain::profile::ProfileSummary;
use crate::chain::{CausalLm, Prompt};
use crate::generate::{generate, GenerateError, GenerationConfig, Sampling};
use crate::steer::{BatchSteering, Decision};
use crate::vision::{decode, VisionEncoder, VisionError};

/// One configuration to measure: a model (by index into the models passed to [`measure`]) and
/// the steering it runs with.
pub struct Variant {
    /// Name in the report, e.g. `segmented`, `segmented+refusal` (a spec's file stem), `monolithic`.
    pub name: String,
    /// Index into the models passed to [`measure`].
    pub model: usize,
    /// The steering the variant runs with.
    pub steering: BatchSteering,
}

/// Shape of one measured workload.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Workload {
    /// Rows generated together.
    pub batch: usize,
    /// Prompt length of each row, in tokens.
    pub prompt_tokens: usize,
    /// Tokens generated for each row.
    pub new_tokens: usize,
}

/// Summary of a sample: mean, spread and percentiles.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Arithmetic mean.
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Median (nearest rank).
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
}

impl Stats {
    /// Summarise `values` (must be non-empty).
    pub fn of(values: &[f64]) -> Self {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len().max(1) as f64;
        let mean = sorted.iter().sum::<f64>() / n;
        let var = sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let pick = |q: f64| {
            sorted[((q * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1)]
        };
        Self {
            mean,
            std: var.sqrt(),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            p50: pick(0.5),
            p99: pick(0.99),
        }
    }
}

/// What one variant measured on one workload.
#[derive(Debug, Clone, Serialize)]
pub struct VariantResult {
    /// The variant's [`Variant::name`].
    pub variant: String,
    /// Prompt tokens per second over the whole batch, one value per timed repeat.
    pub prefill_tokens_per_s: Stats,
    /// Generated tokens per second over the whole batch, one value per timed repeat (the first
    /// token, which prefill produces, is not counted).
    pub decode_tokens_per_s: Stats,
    /// Per decode step (one new token for every row), milliseconds, pooled over repeats.
    pub token_latency_ms: Stats,
    /// What row 0's learned interventions decided (e.g. whether AutoSteer's gate opened).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<Decision>,
    /// Row 0's greedy ids in the last timed run (to check that runtimes agree on the output).
    pub generated_ids: Vec<u32>,
    /// Milliseconds per step by segment, from one extra untimed run (segment chains only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileSummary>,
}

/// Timings of one repeat, and what row 0's learned interventions decided.
struct Run {
    prefill_s: f64,
    decode_s: f64,
    step_ms: Vec<f64>,
    decisions: Vec<Decision>,
    generated_ids: Vec<u32>,
}

/// One repeat of one variant.
fn run_once(
    model: &mut dyn CausalLm,
    steering: &BatchSteering,
    prompts: &[Vec<u32>],
    new_tokens: usize,
) -> Result<Run, GenerateError> {
    let config = GenerationConfig {
        max_new_tokens: new_tokens,
        sampling: Sampling::Greedy,
        stop_ids: Vec::new(),
        pad_id: 0,
        penalties: Default::default(),
        logprobs: None,
    };
    let started = Instant::now();
    let mut last = started;
    let mut first_token: Option<f64> = None;
    let mut steps = Vec::with_capacity(new_tokens);
    let prompts: Vec<Prompt> = prompts.iter().cloned().map(Prompt::from).collect();
    let generated = generate(model, &prompts, &config, steering, &mut |row, _| {
        if row != 0 {
            return;
        }
        let now = Instant::now();
        match first_token {
            None => first_token = Some((now - started).as_secs_f64()),
            Some(_) => steps.push((now - last).as_secs_f64() * 1e3),
        }
        last = now;
    })?;
    let total = started.elapsed().as_secs_f64();
    let prefill = first_token.unwrap_or(total);
    let first_row = generated.into_iter().next();
    let (generated_ids, decisions) =
        first_row.map_or_else(Default::default, |row| (row.token_ids, row.steering));
    Ok(Run {
        prefill_s: prefill,
        decode_s: total - prefill,
        step_ms: steps,
        decisions,
        generated_ids,
    })
}

/// Measure every variant on `prompts` (`batch` rows of `prompt_tokens` ids): `warmup` untimed runs,
/// then `repeats` timed runs, interleaved across variants.
pub fn measure(
    models: &mut [Box<dyn CausalLm>],
    variants: &[Variant],
    prompts: &[Vec<u32>],
    new_tokens: usize,
    warmup: usize,
    repeats: usize,
    mut progress: impl FnMut(),
) -> Result<Vec<VariantResult>, GenerateError> {
    let batch = prompts.len() as f64;
    let prompt_tokens = prompts.first().map_or(0, Vec::len) as f64;
    for variant in variants {
        for _ in 0..warmup {
            run_once(
                models[variant.model].as_mut(),
                &variant.steering,
                prompts,
                new_tokens,
            )?;
        }
    }
    type Samples = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<Decision>, Vec<u32>);
    let mut samples: Vec<Samples> = vec![Default::default(); variants.len()];
    for _ in 0..repeats.max(1) {
        for (variant, sample) in variants.iter().zip(samples.iter_mut()) {
            let model = models[variant.model].as_mut();
            let run = run_once(model, &variant.steering, prompts, new_tokens)?;
            sample.0.push(batch * prompt_tokens / run.prefill_s);
            sample.1.push(
                batch * new_tokens.saturating_sub(1) as f64 / run.decode_s.max(f64::MIN_POSITIVE),
            );
            sample.2.extend(run.step_ms);
            sample.3 = run.decisions;
            sample.4 = run.generated_ids;
            progress();
        }
    }
    let mut results = Vec::with_capacity(variants.len());
    for (variant, (prefill, decode, steps, decisions, generated_ids)) in
        variants.iter().zip(samples)
    {
        // Profiled apart from the timed repeats, so the clock reads cannot skew them.
        let model = models[variant.model].as_mut();
        model.start_profile();
        run_once(model, &variant.steering, prompts, new_tokens)?;
        let profile = model.take_profile().map(|profile| profile.summary());
        results.push(VariantResult {
            variant: variant.name.clone(),
            prefill_tokens_per_s: Stats::of(&prefill),
            decode_tokens_per_s: Stats::of(&decode),
            token_latency_ms: Stats::of(if steps.is_empty() { &[0.0] } else { &steps }),
            decisions,
            generated_ids,
            profile,
        });
    }
    Ok(results)
}

/// The CPU model name (Linux `/proc/cpuinfo`), for the machine description of a report.
pub fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// Sustained memory read bandwidth in GB/s: every available core sums its share of a 512 MiB
/// buffer (far larger than any cache) with independent accumulators, best of five passes.
///
/// Decode at batch 1 reads every weight once per token, so `weight bytes × tokens/s` over this is
/// the fraction of the machine's bandwidth limit a variant reaches. Neighbours on a shared host move
/// this figure by ±20% between runs; compare fractions within one report.
pub fn memory_read_gbs() -> f64 {
    const BYTES: usize = 512 << 20;
    let words = vec![1u64; BYTES / 8];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = words.len().div_ceil(threads);
    let sum = |part: &[u64]| {
        // Eight independent lanes keep enough loads in flight to saturate the memory bus.
        let mut lanes = [0u64; 8];
        for block in part.chunks_exact(8) {
            for (lane, word) in lanes.iter_mut().zip(block) {
                *lane = lane.wrapping_add(*word);
            }
        }
        lanes.iter().fold(0u64, |a, &l| a.wrapping_add(l))
    };
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let started = Instant::now();
        let total: u64 = std::thread::scope(|scope| {
            let parts: Vec<_> = words
                .chunks(chunk)
                .map(|part| scope.spawn(move || sum(part)))
                .collect();
            parts.into_iter().map(|p| p.join().unwrap_or(0)).sum()
        });
        // Using the sum keeps the reads from being optimised away.
        std::hint::black_box(total);
        best = best.min(started.elapsed().as_secs_f64());
    }
    BYTES as f64 / best / 1e9
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`), if readable.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Per-image cost of the vision side, each step timed on its own (`--image` of `onnx-steer bench`).
#[derive(Debug, Clone, Serialize)]
pub struct VisionTiming {
    /// File bytes → upright RGB.
    pub decode_ms: Stats,
    /// HF image-processor steps → `pixel_values`.
    pub preprocess_ms: Stats,
    /// Vision tower + projector on one image.
    pub encoder_ms: Stats,
}

/// Time decoding, preprocessing and encoding one image `repeats` times after one warm-up.
pub fn measure_vision(
    encoder: &mut VisionEncoder,
    bytes: &[u8],
    repeats: usize,
) -> Result<VisionTiming, VisionError> {
    let (mut decode_ms, mut preprocess_ms, mut encoder_ms) = (Vec::new(), Vec::new(), Vec::new());
    let elapsed_ms = |started: Instant| started.elapsed().as_secs_f64() * 1e3;
    for round in 0..=repeats.max(1) {
        let started = Instant::now();
        let image = decode(bytes, "bench image")?;
        let decoded = elapsed_ms(started);
        let started = Instant::now();
        let pixels = encoder.preprocess(std::slice::from_ref(&image))?;
        let preprocessed = elapsed_ms(started);
        let started = Instant::now();
        encoder.encode(pixels)?;
        if round > 0 {
            decode_ms.push(decoded);
            preprocess_ms.push(preprocessed);
            encoder_ms.push(elapsed_ms(started));
        }
    }
    Ok(VisionTiming {
        decode_ms: Stats::of(&decode_ms),
        preprocess_ms: Stats::of(&preprocess_ms),
        encoder_ms: Stats::of(&encoder_ms),
    })
}

/// Picks one statistic of a variant's results.
type StatOf = fn(&VariantResult) -> &Stats;

/// One workload of a report: its shape, every variant's results, and the ratios between them.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadReport {
    /// Rows decoding together.
    pub batch: usize,
    /// Tokens in each prompt.
    pub prompt_tokens: usize,
    /// Tokens generated per run.
    pub new_tokens: usize,
    /// The prompt every row ran.
    pub prompt_ids: Vec<u32>,
    /// Timed runs per variant.
    pub repeats: usize,
    /// Untimed runs per variant before timing.
    pub warmup: usize,
    /// Share of the memory bandwidth limit each variant's decode reaches (weights read per step).
    pub bandwidth_fraction: BTreeMap<String, f64>,
    /// Median decode and prefill speed of each steered variant over `segmented`, and of
    /// `segmented` over `monolithic` (`None` where a side was not measured).
    pub ratios: BTreeMap<String, Option<f64>>,
    /// What each variant measured.
    pub variants: Vec<VariantResult>,
}

impl WorkloadReport {
    /// The report of one workload from [`measure`]'s results; `steered` names the steered variants,
    /// `weight_bytes` is what a decode step streams and `bandwidth` the machine's limit in GB/s.
    pub fn new(
        workload: Workload,
        prompt_ids: Vec<u32>,
        (repeats, warmup): (usize, usize),
        variants: Vec<VariantResult>,
        steered: &[String],
        (weight_bytes, bandwidth): (f64, f64),
    ) -> Self {
        let median = |name: &str, of: StatOf| {
            variants
                .iter()
                .find(|r| r.variant == name)
                .map(|r| of(r).p50)
        };
        fn decode(r: &VariantResult) -> &Stats {
            &r.decode_tokens_per_s
        }
        fn prefill(r: &VariantResult) -> &Stats {
            &r.prefill_tokens_per_s
        }
        let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
        let mut ratios = BTreeMap::new();
        let pairs = steered
            .iter()
            .map(|name| (name.as_str(), "segmented"))
            .chain([("segmented", "monolithic")]);
        for (top, bottom) in pairs {
            let phases: [(&str, StatOf); 2] = [("decode", decode), ("prefill", prefill)];
            for (phase, of) in phases {
                ratios.insert(
                    format!("{phase}_{top}_over_{bottom}"),
                    ratio(median(top, of), median(bottom, of)),
                );
            }
        }
        let bandwidth_fraction = variants
            .iter()
            .map(|r| {
                let steps_per_s = r.decode_tokens_per_s.p50 / workload.batch as f64;
                (
                    r.variant.clone(),
                    weight_bytes * steps_per_s / 1e9 / bandwidth,
                )
            })
            .collect();
        Self {
            batch: workload.batch,
            prompt_tokens: workload.prompt_tokens,
            new_tokens: workload.new_tokens,
            prompt_ids,
            repeats,
            warmup,
            bandwidth_fraction,
            ratios,
            variants,
        }
    }
}

/// The machine a report was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Execution provider the sessions ran on.
    pub provider: ExecutionProvider,
    /// The ONNX Runtime library that was loaded.
    pub onnxruntime: PathBuf,
    /// `--threads`, if given.
    pub threads: Option<usize>,
    /// Cores the process may use.
    pub cpus: Option<usize>,
    /// The CPU's model name.
    pub cpu_model: Option<String>,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: Option<f64>,
    /// Memory read bandwidth, GB/s ([`memory_read_gbs`]).
    pub memory_read_gb_per_s: f64,
}

/// Everything `onnx-steer bench` measured; the JSON file and the printed table both come from it.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Bundle name.
    pub bundle: String,
    /// Activation dtype.
    pub dtype: Dtype,
    /// Quantized weights, if any.
    pub weights: Option<QuantizedWeights>,
    /// The steer spec files measured.
    pub steer: Vec<PathBuf>,
    /// Where it ran.
    #[serde(flatten)]
    pub machine: Machine,
    /// Bytes of weights a decode step streams.
    pub decode_weight_bytes: f64,
    /// One entry per batch size and prompt length.
    pub workloads: Vec<WorkloadReport>,
    /// Per-image vision costs, with `--image`.
    pub vision_per_image: Option<VisionTiming>,
}

impl BenchReport {
    /// The human-readable summary: a row per variant and workload, the ratios, the bandwidth
    /// shares and the decode breakdown by segment.
    pub fn write_table(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(
            out,
            "{:<28} {:>5} {:>6} {:>14} {:>14} {:>9} {:>9}",
            "variant", "batch", "prompt", "prefill tok/s", "decode tok/s", "p50 ms", "p99 ms"
        )?;
        for workload in &self.workloads {
            for v in &workload.variants {
                writeln!(
                    out,
                    "{:<28} {:>5} {:>6} {:>14.1} {:>14.1} {:>9.2} {:>9.2}",
                    v.variant,
                    workload.batch,
                    workload.prompt_tokens,
                    v.prefill_tokens_per_s.p50,
                    v.decode_tokens_per_s.p50,
                    v.token_latency_ms.p50,
                    v.token_latency_ms.p99,
                )?;
            }
            for (name, value) in &workload.ratios {
                if let Some(value) = value {
                    writeln!(out, "  {name}: {value:.3}")?;
                }
            }
        }
        writeln!(
            out,
            "memory read bandwidth {:.1} GB/s; a decode step streams {:.1} MB of weights",
            self.machine.memory_read_gb_per_s,
            self.decode_weight_bytes / 1e6
        )?;
        if let Some(vision) = &self.vision_per_image {
            writeln!(
                out,
                "vision per image (p50): decode {:.2} ms, preprocess {:.2} ms, encoder {:.2} ms",
                vision.decode_ms.p50, vision.preprocess_ms.p50, vision.encoder_ms.p50
            )?;
        }
        for workload in &self.workloads {
            for (name, fraction) in &workload.bandwidth_fraction {
                writeln!(
                    out,
                    "  {name} (batch {}): {:.0}% of the bandwidth limit",
                    workload.batch,
                    fraction * 100.0
                )?;
            }
        }
        for workload in &self.workloads {
            writeln!(
                out,
                "decode breakdown, batch {}, {}-token prompt:",
                workload.batch, workload.prompt_tokens
            )?;
            for result in &workload.variants {
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_bandwidth_is_plausible() {
        let gbs = memory_read_gbs();
        assert!(gbs > 0.5 && gbs < 10_000.0, "{gbs} GB/s");
    }

    #[test]
    fn stats_of_known_sample() {
        let s = Stats::of(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!((s.min, s.max, s.mean), (1.0, 4.0, 2.5));
        assert!((s.std - 1.118_034).abs() < 1e-6);
        assert_eq!(s.p99, 4.0);
    }
}
