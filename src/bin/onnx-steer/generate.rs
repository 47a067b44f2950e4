//! `onnx-steer generate`: one prompt or a batch, steered per row or not.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use onnx_steer::bundle::ModelConfig;
use onnx_steer::generate::{
    generate, validate_prompts, Generated, GenerationConfig, Penalties, Sampling,
};
use onnx_steer::runtime::Runtime;
use onnx_steer::steer::{BatchSteering, ResolvedSteering, SteerSpec};
use onnx_steer::text::{StreamDecoder, TextCodec};
use onnx_steer::vision::{VisionEncoder, VisionError};
use onnx_steer::Bundle;

use crate::args::{composed_steering, load_model, read_images, vision_prompt, RuntimeArgs};
use crate::CliError;

#[derive(Args)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["prompt", "prompts_file"]))]
pub(crate) struct GenerateArgs {
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
    /// Sample with this temperature instead of greedy decoding (below 1e-5 it is greedy).
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
    /// Lower the logits of tokens the row already generated, once each (OpenAI's
    /// presence_penalty, in [-2, 2]).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Lower the logits of tokens the row already generated, per occurrence (OpenAI's
    /// frequency_penalty, in [-2, 2]).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// With --json: each generated token's log-probability and the K most likely alternatives
    /// (0: the chosen token's only).
    #[arg(long, value_name = "K", requires = "json")]
    logprobs: Option<usize>,
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
        Some(temperature) if !args.greedy => {
            Sampling::with_temperature(temperature, args.top_p, args.top_k, args.seed)
        }
        _ => Sampling::Greedy,
    }
}

/// Resolve each row's spec once per distinct file.
fn row_steering(
    lines: &[PromptLine],
    shared: &[PathBuf],
    config: &ModelConfig,
    runtime: &Runtime,
) -> Result<Vec<Option<Arc<ResolvedSteering>>>, CliError> {
    if let Some(composed) = composed_steering(shared, config, runtime)? {
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

pub(crate) fn run(args: GenerateArgs) -> Result<(), CliError> {
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
    let mut model = load_model(&bundle, &runtime, &args.runtime, args.monolithic)?;
    let generation = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling: sampling(&args),
        stop_ids: config.eos_token_ids.clone(),
        pad_id: config.pad_token_id.unwrap_or(config.eos_token_ids[0]),
        penalties: Penalties {
            presence: args.presence_penalty,
            frequency: args.frequency_penalty,
        },
        logprobs: args.logprobs,
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
            json_record(prompt, &text, result, &codec).to_string()
        } else if results.len() > 1 {
            format!("### {prompt}\n{text}\n")
        } else {
            text
        };
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn json_record(
    prompt: &str,
    text: &str,
    result: &Generated,
    codec: &TextCodec,
) -> serde_json::Value {
    let mut record = serde_json::json!({
        "prompt": prompt,
        "text": text,
        "token_ids": result.token_ids,
        "prompt_tokens": result.prompt_tokens,
        "finish_reason": result.finish_reason,
        "prefill_ms": result.prefill_ms,
        "decode_ms": result.decode_ms,
        "decode_tokens_per_s": result.decode_tokens_per_s(),
        "steering": result.steering,
    });
    if !result.logprobs.is_empty() {
        record["logprobs"] = crate::score::logprobs_json(&result.logprobs, codec);
    }
    record
}
