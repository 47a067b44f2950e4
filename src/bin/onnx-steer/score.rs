//! `onnx-steer score`: log-probabilities of given continuations after their prompts, steered or
//! not, one JSON line per input line.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use clap::Args;
use indicatif::ProgressBar;
use onnx_steer::generate::{score, PositionLogprobs, ScoreOptions, ScoreRequest, Scored};
use onnx_steer::{Bundle, TextCodec};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::args::{bar_style, composed_steering, load_model, RuntimeArgs};
use crate::CliError;

#[derive(Args)]
pub(crate) struct ScoreArgs {
    /// Bundle directory written by `python -m onnx_steer_export export`.
    #[arg(long)]
    bundle: PathBuf,
    /// JSON lines `{"prompt": "...", "continuations": ["...", ...]}`; a continuation may also be
    /// token ids (`[id, ...]`, as `generate --json` reports them); "-" reads stdin.
    #[arg(long)]
    jsonl: PathBuf,
    /// Write the JSON lines here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Steer spec JSON applied to every row; repeat to compose several. Its `positions` act on
    /// prompt and continuation tokens as they would while generating the continuation.
    #[arg(long)]
    steer: Vec<PathBuf>,
    /// Render each prompt as a user turn of the chat template; continuations then start the
    /// assistant's answer.
    #[arg(long)]
    chat: bool,
    /// Report the K most likely tokens at every scored position.
    #[arg(long, value_name = "K", default_value_t = 0)]
    top_logprobs: usize,
    /// Also score the prompt's own tokens (from the second on), as OpenAI's `echo` does.
    #[arg(long)]
    echo: bool,
    /// Rows (prompt × continuation) per forward batch.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    batch: u64,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// One input line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScoreLine {
    prompt: String,
    #[serde(default)]
    continuations: Vec<Continuation>,
}

/// A continuation to score: text (tokenized after the prompt) or token ids, scored as given, for
/// tokens a model generated that need not survive a decode and re-encode.
#[derive(Deserialize)]
#[serde(untagged)]
enum Continuation {
    Text(String),
    Ids(Vec<u32>),
}

fn read_lines(args: &ScoreArgs) -> Result<Vec<ScoreLine>, CliError> {
    let name = args.jsonl.display().to_string();
    let reader: Box<dyn BufRead> = if name == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(&args.jsonl)
            .map_err(|e| CliError::Input(format!("could not read {name}: {e}")))?;
        Box::new(std::io::BufReader::new(file))
    };
    let mut lines = Vec::new();
    for (number, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| CliError::Input(format!("could not read {name}: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: ScoreLine = serde_json::from_str(&line).map_err(|e| {
            CliError::Input(format!(
                "{name} line {}: {e}; each line is {{\"prompt\": \"...\", \"continuations\": [\"...\" or [ids]]}}",
                number + 1
            ))
        })?;
        if parsed.continuations.is_empty() && !args.echo {
            return Err(CliError::Input(format!(
                "{name} line {}: no continuations to score (give some, or --echo to score the prompt)",
                number + 1
            )));
        }
        lines.push(parsed);
    }
    if lines.is_empty() {
        return Err(CliError::Input(format!("{name} has no lines to score")));
    }
    Ok(lines)
}

/// Log-probabilities as JSON: `{"token", "id", "logprob", "top_logprobs"?}` per position.
pub(crate) fn logprobs_json(positions: &[PositionLogprobs], codec: &TextCodec) -> Value {
    let token = |id: u32, logprob: f32| json!({"token": codec.token_text(id), "id": id, "logprob": logprob});
    Value::Array(
        positions
            .iter()
            .map(|p| {
                let mut entry = token(p.token.id, p.token.logprob);
                if !p.top.is_empty() {
                    entry["top_logprobs"] = p.top.iter().map(|t| token(t.id, t.logprob)).collect();
                }
                entry
            })
            .collect(),
    )
}

fn continuation_json(given: &Continuation, scored: &Scored, codec: &TextCodec) -> Value {
    let positions = &scored.continuation;
    let mut entry = json!({
        "token_ids": positions.iter().map(|p| p.token.id).collect::<Vec<_>>(),
        "tokens": positions.iter().map(|p| codec.token_text(p.token.id)).collect::<Vec<_>>(),
        "token_logprobs": positions.iter().map(|p| p.token.logprob).collect::<Vec<_>>(),
        "logprob": scored.continuation_logprob(),
    });
    if let Continuation::Text(text) = given {
        entry["text"] = json!(text);
    }
    if positions.iter().any(|p| !p.top.is_empty()) {
        entry["top_logprobs"] = logprobs_json(positions, codec);
    }
    entry
}

pub(crate) fn run(args: ScoreArgs) -> Result<(), CliError> {
    let lines = read_lines(&args)?;
    let bundle = Bundle::open(&args.bundle)?;
    let codec = TextCodec::load(&bundle)?;
    let config = bundle.config();
    let runtime = args.runtime.runtime()?;
    let steering = composed_steering(&args.steer, config, &runtime)?;
    // One row per continuation; a line without continuations (with --echo) scores its prompt.
    let empty = [Continuation::Text(String::new())];
    let mut rows: Vec<(usize, ScoreRequest)> = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        let given = match line.continuations.is_empty() {
            true => &empty[..],
            false => &line.continuations[..],
        };
        for continuation in given {
            let (prompt, continuation) = match continuation {
                Continuation::Text(text) => codec.encode_scored(&line.prompt, args.chat, text)?,
                Continuation::Ids(ids) => {
                    if let Some(bad) = ids.iter().find(|&&id| id as usize >= config.vocab_size) {
                        return Err(CliError::Input(format!(
                            "{} record {index}: token id {bad} is outside the model's vocabulary of {}",
                            args.jsonl.display(),
                            config.vocab_size
                        )));
                    }
                    (
                        codec.encode_scored(&line.prompt, args.chat, "")?.0,
                        ids.clone(),
                    )
                }
            };
            rows.push((
                index,
                ScoreRequest {
                    prompt: prompt.into(),
                    continuation,
                    steering: steering.clone(),
                },
            ));
        }
    }
    let mut model = load_model(&bundle, &runtime, &args.runtime, false)?;
    let options = ScoreOptions {
        top_logprobs: args.top_logprobs,
        prompt_logprobs: args.echo,
    };
    let pad_id = config.pad_token_id.unwrap_or(config.eos_token_ids[0]);
    let progress = ProgressBar::new(rows.len() as u64)
        .with_style(bar_style("scoring {bar:30} {pos}/{len} rows ({eta} left)"));
    let mut scored: Vec<Scored> = Vec::with_capacity(rows.len());
    for group in rows.chunks(args.batch as usize) {
        let requests: Vec<ScoreRequest> = group.iter().map(|(_, r)| r.clone()).collect();
        scored.extend(score(model.as_mut(), &requests, options, pad_id)?);
        progress.inc(group.len() as u64);
    }
    progress.finish_and_clear();

    let mut out: Box<dyn Write> = match &args.out {
        Some(path) => Box::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut next = 0;
    for (index, line) in lines.iter().enumerate() {
        let count = rows[next..].iter().take_while(|(i, _)| *i == index).count();
        let line_rows = &scored[next..next + count];
        let first = &line_rows[0];
        let mut record = json!({
            "index": index,
            "prompt_tokens": rows[next].1.prompt.ids.len(),
            "continuations": line
                .continuations
                .iter()
                .zip(line_rows)
                .map(|(given, scored)| continuation_json(given, scored, &codec))
                .collect::<Vec<_>>(),
        });
        if args.echo {
            record["prompt_logprobs"] = logprobs_json(&first.prompt, &codec);
        }
        if !first.steering.is_empty() {
            record["steering"] = serde_json::to_value(&first.steering)
                .map_err(|e| CliError::Input(e.to_string()))?;
        }
        writeln!(out, "{record}")?;
        next += count;
    }
    out.flush()?;
    Ok(())
}
