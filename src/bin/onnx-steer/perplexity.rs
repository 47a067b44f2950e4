//! `onnx-steer perplexity`: perplexity of a text file, one token per decode step.

use std::path::PathBuf;

use clap::Args;
use indicatif::ProgressBar;
use onnx_steer::{Bundle, Error, TextCodec};

use crate::args::{bar_style, load_model, RuntimeArgs};
use crate::CliError;

#[derive(Args)]
pub(crate) struct PerplexityArgs {
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

pub(crate) fn run(args: PerplexityArgs) -> Result<(), CliError> {
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
    let mut model = load_model(&bundle, &runtime, &args.runtime, args.monolithic)?;
    let bar = ProgressBar::new(ids.len() as u64 - 1)
        .with_style(bar_style("perplexity {bar:30} {pos}/{len} tokens ({eta})"));
    let score = onnx_steer::tools::perplexity::perplexity(model.as_mut(), &ids, || bar.inc(1))
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
