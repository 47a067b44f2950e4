//! `onnx-steer inspect`: validate a bundle and print a summary.

use std::path::PathBuf;

use clap::Args;

use indicatif::ProgressBar;
use onnx_steer::bundle::Verification;
use onnx_steer::Bundle;

use crate::args::bar_style;
use crate::CliError;

/// `onnx-steer inspect` arguments.
#[derive(Args)]
pub(crate) struct InspectArgs {
    /// Bundle directory written by `python -m onnx_steer_export export`.
    #[arg(long)]
    bundle: PathBuf,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Hash every file now, even those stamped as verified since they last changed (a start
    /// trusts the stamp; this is the full check, and it renews the stamps).
    #[arg(long)]
    verify: bool,
}

pub(crate) fn run(args: InspectArgs) -> Result<(), CliError> {
    let json = args.json;
    let bundle = Bundle::open(&args.bundle)?;
    let manifest = bundle.manifest();
    let total: u64 = manifest.files.values().map(|f| f.bytes).sum();
    let how = if args.verify {
        Verification::Full
    } else {
        Verification::Stamped
    };
    let bar = ProgressBar::new(total).with_style(bar_style(
        "verifying sha256 {bar:30} {bytes}/{total_bytes} {msg}",
    ));
    for (name, entry) in &manifest.files {
        bar.set_message(name.clone());
        bundle.verified_path(name, how)?;
        bar.inc(entry.bytes);
    }
    bar.finish_and_clear();
    let m = &manifest.model;
    if json {
        let summary = serde_json::json!({
            "name": manifest.name, "dir": bundle.dir(), "valid": true, "dtype": manifest.dtype,
            "model": m, "segments": manifest.segments.len(), "monolithic": manifest.monolithic.is_some(),
            "files": manifest.files.len(), "bytes": total, "hashed": args.verify,
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
            "files      {} · {:.1} MiB · sha256 verified{}",
            manifest.files.len(),
            total as f64 / (1 << 20) as f64,
            if args.verify {
                ", every file hashed now"
            } else {
                " (unchanged files by their stamps; --verify hashes all)"
            }
        );
        println!("eos ids    {:?}", m.eos_token_ids);
    }
    Ok(())
}
