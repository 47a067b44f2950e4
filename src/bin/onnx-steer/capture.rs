//! `onnx-steer capture`: record layer outputs for training steering methods.

use std::path::{Path, PathBuf};

use clap::Args;
use indicatif::ProgressBar;
use onnx_steer::generate::validate_prompts;
use onnx_steer::text::TextCodec;
use onnx_steer::tools::capture::{capture, CaptureTokens};
use onnx_steer::vision::VisionEncoder;
use onnx_steer::Bundle;

use crate::args::{bar_style, read_images, vision_prompt, RuntimeArgs};
use crate::CliError;

#[derive(Args)]
pub(crate) struct CaptureArgs {
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
    #[arg(long, value_enum, default_value_t = CaptureTokens::Last)]
    tokens: CaptureTokens,
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
        let bad = |problem: &str| {
            CliError::Input(format!("{}:{}: {problem}", path.display(), number + 1))
        };
        let ids = if jsonl {
            let record: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad(&format!("not JSON: {e}")))?;
            if let Some(files) = record.get("images").and_then(|v| v.as_array()) {
                let files = files
                    .iter()
                    .map(|f| f.as_str().map(|f| base.join(f)))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("images must be file names"))?;
                images = read_images(&files)?;
            }
            if let Some(ids) = record.get("input_ids").and_then(|v| v.as_array()) {
                ids.iter()
                    .map(|id| id.as_u64().and_then(|id| u32::try_from(id).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| bad("input_ids must be token ids"))?
            } else if let Some(prompt) = record.get("prompt").and_then(|v| v.as_str()) {
                codec.encode_prompt(prompt, args.chat, images.len())?
            } else {
                return Err(bad("needs \"prompt\" or \"input_ids\""));
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

pub(crate) fn run(args: CaptureArgs) -> Result<(), CliError> {
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
    let mut chain = args.runtime.chain(&bundle, &runtime)?;
    let pad = config.pad_token_id.unwrap_or(config.eos_token_ids[0]);
    let bar = ProgressBar::new(prompts.len() as u64)
        .with_style(bar_style("capturing {bar:30} {pos}/{len} prompts ({eta})"));
    let captured = capture(
        &mut chain,
        &prompts,
        &layers,
        args.tokens,
        args.batch_size,
        pad,
        |n| bar.inc(n as u64),
    )?;
    bar.finish_and_clear();
    captured.write(&args.out)?;
    eprintln!(
        "captured {} prompts x {} layers into {}",
        captured.prompts(),
        layers.len(),
        args.out.display()
    );
    Ok(())
}
