//! The `onnx-steer` command line: one module per subcommand, each only parsing its arguments,
//! calling the library and printing.

mod args;
mod bench;
mod capture;
mod generate;
mod inspect;
mod perplexity;
mod preprocess;
mod score;
mod serve;
mod vector;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use onnx_steer::{
    BundleError, Error, GenerateError, ModelError, RuntimeError, SteerError, TextError, VisionError,
};

/// What the CLI reports: a library error, or a problem with the command line's own input.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    #[error(transparent)]
    Library(#[from] Error),
    #[error("{0}")]
    Input(String),
    #[error("could not write output: {0}")]
    Output(#[from] std::io::Error),
    #[error(transparent)]
    Server(#[from] onnx_steer::server::ServerError),
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
    Inspect(inspect::InspectArgs),
    /// Generate text for one prompt or a batch of prompts.
    Generate(generate::GenerateArgs),
    /// Steering-vector files.
    #[command(subcommand)]
    Vector(vector::VectorCommand),
    /// Record residual-stream states (layer outputs) for training steering methods.
    Capture(capture::CaptureArgs),
    /// Preprocess images exactly as the vision tower sees them (the bundle's HF image processor)
    /// and write `pixel_values` [N, 3, H, W] to a .safetensors file.
    Preprocess(preprocess::PreprocessArgs),
    /// Measure prefill and decode speed: segmented vs monolithic, steered vs unsteered, in one run.
    Bench(bench::BenchArgs),
    /// Serve OpenAI-compatible chat and text completions over HTTP, with steering per request.
    Serve(serve::ServeArgs),
    /// Log-probabilities of given continuations after their prompts, steered or not (JSON lines).
    Score(score::ScoreArgs),
    /// Perplexity of a text file, one token per decode step: compare a quantized or fp16 bundle
    /// with its fp32 source on the same text.
    Perplexity(perplexity::PerplexityArgs),
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
        Command::Inspect(args) => inspect::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Capture(args) => capture::run(args),
        Command::Preprocess(args) => preprocess::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Score(args) => score::run(args),
        Command::Vector(command) => vector::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
